//! Restore end to end: the real `walhoard daemon` streams a real cluster's WAL into a local
//! archive (zstd + encryption), `walhoard basebackup` stores a backup, and
//! `walhoard restore get-basebackup` brings it back to a recovery target; PostgreSQL replays
//! the archive through `walhoard postgres-command --mode restore` and its tables must equal
//! what the primary had at that target.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::json;
use walhoard_testkit::{give_to_server_user, PgBuilder, PgCluster};

use crate::common::wait_until;
use crate::daemon_support::*;

/// Rows of `r`, as one checksum.
/// Table `r`, and pgbench's accounts and history where the test ran pgbench (queried through
/// query_to_xml, so a cluster without those tables does not fail to parse the query).
pub(crate) const CHECKSUM: &str = "select (select count(*) || ':' || coalesce(md5(string_agg(id::text || batch || v, ',' order by id)), '') from r) \
     || case when to_regclass('pgbench_accounts') is null then '' else ' pgbench:' || coalesce(\
     (xpath('/row/c/text()', query_to_xml('select (select md5(string_agg(aid::text || '':'' || abalance, '','' order by aid)) from pgbench_accounts) \
     || '':'' || (select count(*) || '':'' || coalesce(sum(delta), 0) from pgbench_history) as c', false, true, '')))[1]::text, 'MISSING') end";

/// A pgbench run (TPC-B-like transactions) against `pg`, finished before it returns.
pub(crate) fn pgbench(pg: &PgCluster, args: &[&str]) -> String {
    let mut all: Vec<std::ffi::OsString> = vec!["-h".into(), pg.socket_dir().into()];
    all.extend([
        "-p".into(),
        pg.port.to_string().into(),
        "-U".into(),
        "postgres".into(),
    ]);
    all.extend(args.iter().map(std::ffi::OsString::from));
    all.push("postgres".into());
    let all: Vec<&std::ffi::OsStr> = all.iter().map(|a| a.as_os_str()).collect();
    pg.run_tool("pgbench", &all).unwrap()
}

fn cluster() -> PgCluster {
    PgCluster::builder()
        .setting("wal_keep_size", "'1GB'")
        .start()
        .unwrap()
}

/// The daemon's files readable by the server's OS user, who runs restore_command.
pub(crate) fn readable_by_server(d: &DaemonDir) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(d.config_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
}

fn walhoard(args: &[&str], extra: &[&Path]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_walhoard"))
        .args(args)
        .args(extra)
        .output()
        .expect("run walhoard")
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub(crate) fn take_basebackup(d: &DaemonDir) -> String {
    let out = walhoard(
        &["basebackup", "--site", "main", "--config"],
        &[&d.config_path()],
    );
    assert!(out.status.success(), "basebackup: {}", stderr(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `restore get-basebackup` into `target` with `args`.
pub(crate) fn get_basebackup(d: &DaemonDir, target: &Path, args: &[&str]) -> Output {
    let mut all = vec!["restore", "get-basebackup", "--site", "main"];
    all.extend_from_slice(args);
    std::process::Command::new(env!("CARGO_BIN_EXE_walhoard"))
        .args(&all)
        .arg("--config")
        .arg(d.config_path())
        .arg("--target-dir")
        .arg(target)
        .output()
        .unwrap()
}

/// Restore flags for a copy that ends recovery as a primary of its own.
pub(crate) const PROMOTED_PRIMARY: [&str; 3] = [
    "--restore-to-primary",
    "--recovery-target-action",
    "promote",
];

/// Restores into `target` with `args`, which must succeed, and starts it promoted.
pub(crate) fn restore_and_promote(d: &DaemonDir, target: &Path, args: &[&str]) -> PgCluster {
    let out = get_basebackup(d, target, args);
    assert!(out.status.success(), "{}", stderr(&out));
    start_promoted(target)
}

/// Starts PostgreSQL on a restored directory and waits until recovery ended (promoted).
pub(crate) fn start_promoted(data: &Path) -> PgCluster {
    start_promoted_with(PgCluster::builder(), data)
}

/// [`start_promoted`] with `builder`'s settings.
pub(crate) fn start_promoted_with(builder: PgBuilder, data: &Path) -> PgCluster {
    let pg = builder.start_on(data).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || pg
            .psql("select pg_is_in_recovery()")
            .is_ok_and(|r| r.trim() == "f")),
        "recovery did not end: {}",
        pg.log()
    );
    pg
}

pub(crate) fn insert(pg: &PgCluster, batch: &str, rows: u32) {
    pg.psql(&format!(
        "insert into r (batch, v) select '{batch}', md5(g::text) from generate_series(1, {rows}) g"
    ))
    .unwrap();
}

/// A primary streamed by the daemon, with one basebackup taken after the first rows.
pub(crate) struct Primary {
    pub(crate) pg: PgCluster,
    pub(crate) d: DaemonDir,
    pub(crate) daemon: Daemon,
    pub(crate) store: walhoard::storage::ObjectStore,
    pub(crate) backup: String,
}

pub(crate) async fn primary(site: serde_json::Value) -> Primary {
    primary_on(DaemonDir::local_storage, site).await
}

/// [`primary`] archiving into the `object_storage` that `storage` gives.
pub(crate) async fn primary_on(
    storage: impl FnOnce(&DaemonDir) -> serde_json::Value,
    site: serde_json::Value,
) -> Primary {
    let pg = cluster();
    let d = DaemonDir::new();
    let storage = storage(&d);
    d.write_config(&pg, storage.clone(), site);
    readable_by_server(&d);
    let daemon = Daemon::start(&d);
    let store = d.store(&storage);
    wait_slot(&pg, &daemon);
    d.wait_http();
    pg.psql("create table r (id bigserial primary key, batch text, v text)")
        .unwrap();
    insert(&pg, "base", 20_000);
    let backup = take_basebackup(&d);
    Primary {
        pg,
        d,
        daemon,
        store,
        backup,
    }
}

impl Primary {
    /// Switches segments and waits until everything written so far is archived.
    pub(crate) async fn archive_all(&self) {
        let name = switch_segment(&self.pg);
        wait_archived(&self.store, &name, Duration::from_secs(60), &self.daemon).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_pitr_to_name_xid_time_lsn_and_latest() {
    let mut p = primary(json!({})).await;
    let pg = &p.pg;
    // pgbench's TPC-B-like load between the targets, as well as plain inserts.
    pgbench(pg, &["-i", "-s", "2", "-q"]);
    pgbench(pg, &["-n", "-c", "2", "-t", "300"]);
    let with_pgbench = pg.psql(CHECKSUM).unwrap();
    assert!(
        with_pgbench.contains(" pgbench:") && !with_pgbench.contains("MISSING"),
        "the checksum does not cover pgbench's tables: {with_pgbench}"
    );
    insert(pg, "a", 5_000);
    pg.psql("select pg_create_restore_point('rp1')").unwrap();
    let want_name = pg.psql(CHECKSUM).unwrap();
    let xid = pg
        .psql("begin; insert into r (batch, v) values ('b', 'xid'); select txid_current(); commit;")
        .unwrap()
        .lines()
        .find(|l| l.trim().parse::<u64>().is_ok())
        .unwrap()
        .trim()
        .to_string();
    let want_xid = pg.psql(CHECKSUM).unwrap();
    pgbench(pg, &["-n", "-c", "2", "-t", "300"]);
    insert(pg, "b2", 3_000);
    std::thread::sleep(Duration::from_millis(300));
    let time = crate::common::query(pg, "select clock_timestamp()");
    let want_time = pg.psql(CHECKSUM).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    pgbench(pg, &["-n", "-c", "2", "-t", "300"]);
    insert(pg, "c", 3_000);
    let lsn = crate::common::query(pg, "select pg_current_wal_insert_lsn()");
    let want_lsn = pg.psql(CHECKSUM).unwrap();
    insert(pg, "d", 40_000);
    let want_latest = pg.psql(CHECKSUM).unwrap();
    p.archive_all().await;

    // The listing shows the backup, as JSON and as a table.
    let list = crate::common::list_basebackups(&p.d.config_path());
    assert_eq!(list[0]["name"], p.backup.as_str());
    assert_eq!(list[0]["compression"], "zstd");
    assert_eq!(list[0]["encryption_key_id"], "k1");
    assert!(list[0]["size_plain"].as_u64().unwrap() > list[0]["size_stored"].as_u64().unwrap());
    let out = walhoard(
        &["restore", "list-basebackups", "--config"],
        &[&p.d.config_path()],
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&p.backup) && table.contains("zstd"),
        "{table}"
    );

    let work = tempfile::tempdir().unwrap();
    for (flag, value, want) in [
        ("--recovery-target-name", "rp1", &want_name),
        ("--recovery-target-xid", xid.as_str(), &want_xid),
        ("--recovery-target-time", time.as_str(), &want_time),
        ("--recovery-target-lsn", lsn.as_str(), &want_lsn),
    ] {
        let target = work.path().join(flag.trim_start_matches('-'));
        let out = get_basebackup(
            &p.d,
            &target,
            &[&[flag, value][..], &PROMOTED_PRIMARY].concat(),
        );
        assert!(out.status.success(), "{flag}: {}", stderr(&out));
        let conf = std::fs::read_to_string(target.join("postgresql.auto.conf")).unwrap();
        assert!(
            conf.contains("postgres-command --mode restore --config"),
            "{conf}"
        );
        assert!(target.join("recovery.signal").exists());
        let restored = start_promoted(&target);
        assert_eq!(&restored.psql(CHECKSUM).unwrap(), want, "{flag} {value}");
        // Served by our restore_command, prefetch included.
        assert!(
            restored.log().contains("restored log file"),
            "{}",
            restored.log()
        );
    }

    // Latest, with the primary gone: everything committed before the last switch is there.
    p.pg.stop().unwrap();
    let target = work.path().join("latest");
    let restored = restore_and_promote(
        &p.d,
        &target,
        &["--basebackup", "latest", "--restore-to-primary"],
    );
    assert_eq!(restored.psql(CHECKSUM).unwrap(), want_latest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_command_exit_codes_prefetch_and_daemon_api() {
    // The daemon's API restores only into the site's pg_data_directory.
    let dir = tempfile::tempdir().unwrap();
    let p = primary(json!({ "pg_data_directory": dir.path() })).await;
    // Make restore_prefetch 2 (the config is rewritten with the extra key).
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.d.config_path()).unwrap()).unwrap();
    cfg["restore_prefetch"] = json!(2);
    std::fs::write(p.d.config_path(), cfg.to_string()).unwrap();
    let mut names = Vec::new();
    for i in 0..4 {
        insert(&p.pg, &format!("s{i}"), 2_000);
        names.push(switch_segment(&p.pg));
    }
    wait_archived(&p.store, &names[3], Duration::from_secs(60), &p.daemon).await;
    let pg_wal = dir.path().join("pg_wal");
    std::fs::create_dir(&pg_wal).unwrap();
    let output = pg_wal.join("RECOVERYXLOG");
    let cfg_path = p.d.config_path();
    let run = |xlog: &str, daemon: bool| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_walhoard"));
        c.args(crate::common::RESTORE_COMMAND)
            .args([xlog, "--output"])
            .arg(&output);
        if daemon {
            c.args(["--port", &p.d.http_port.to_string()]);
        } else {
            c.arg("--config").arg(&cfg_path);
        }
        c.output().unwrap()
    };
    let same_as_pg_wal = |name: &str| {
        std::fs::read(&output).unwrap() == std::fs::read(p.pg.wal_dir().join(name)).unwrap()
    };
    // Daemonless: the file, and the next two prefetched.
    let out = run(&names[0], false);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(same_as_pg_wal(&names[0]));
    let prefetch = pg_wal.join(".walhoard-prefetch");
    assert!(prefetch.join(&names[1]).is_file() && prefetch.join(&names[2]).is_file());
    // Served from the prefetch: the archive's copy is not needed any more.
    p.store.delete(&format!("xlog/{}", names[1])).await.unwrap();
    let out = run(&names[1], false);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(same_as_pg_wal(&names[1]));
    assert!(!prefetch.join(&names[1]).exists());
    // Truly absent: 1 (end of archive for PostgreSQL). The history of a timeline never made.
    for absent in [
        names[1].as_str(),
        "00000009.history",
        "0000000100000000000000F0",
    ] {
        let out = run(absent, false);
        assert_eq!(out.status.code(), Some(1), "{absent}: {}", stderr(&out));
        assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    }
    // A corrupted object: 255, never "not found".
    std::fs::remove_dir_all(&prefetch).unwrap();
    let stored = p.d.path("archive").join("main/xlog").join(&names[2]);
    let mut bytes = std::fs::read(&stored).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&stored, &bytes).unwrap();
    let out = run(&names[2], false);
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    assert!(stderr(&out).contains(&names[2]), "{}", stderr(&out));
    // A segment whose content belongs elsewhere (decrypts fine, wrong page addresses): 255.
    let fake = "000000010000000000000070";
    walhoard::pipeline::transfer::upload(
        &p.store,
        walhoard::pipeline::transfer::Upload::wal(
            format!("xlog/{fake}"),
            walhoard::pipeline::transfer::Source::File(p.pg.wal_dir().join(&names[3])),
            walhoard::pipeline::compression::CompressionSettings::new(
                walhoard::pipeline::compression::Algorithm::Zstd,
            ),
            Some(walhoard::pipeline::transfer::UploadEncryption {
                key_id: "k1".into(),
                public: walhoard::pipeline::encryption::PublicKey::from_pem(&p.d.public).unwrap(),
            }),
            walhoard::pipeline::hash::HashAlgorithm::Sha1,
        ),
    )
    .await
    .unwrap();
    let out = run(fake, false);
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    assert!(stderr(&out).contains("verification"), "{}", stderr(&out));
    assert!(!output.exists() || !same_as_pg_wal(&names[3]));

    // Through the daemon's HTTP API.
    let _ = std::fs::remove_dir_all(&prefetch);
    let out = run(&names[3], true);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(same_as_pg_wal(&names[3]));
    let out = run("0000000100000000000000F0", true);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = run(&names[2], true);
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    // Daemon down: 255.
    let mut daemon = p.daemon;
    daemon.kill9();
    let out = run(&names[3], true);
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
}

/// A restore that failed leaves nothing that looks like a data directory.
pub(crate) fn assert_not_a_data_dir(target: &Path) {
    for f in [
        "PG_VERSION",
        "global/pg_control",
        "recovery.signal",
        "standby.signal",
    ] {
        assert!(
            !target.join(f).exists(),
            "{} left behind",
            target.join(f).display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_bad_inputs_fail_cleanly() {
    let p = primary(json!({})).await;
    let work = tempfile::tempdir().unwrap();

    // A backup that does not exist.
    let target = work.path().join("missing");
    let out = get_basebackup(&p.d, &target, &["--basebackup", "2001-01-01_00-00_0"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("basebackup/2001-01-01_00-00_0"),
        "{}",
        stderr(&out)
    );
    assert!(!target.exists());

    // A target that is not empty: untouched.
    let target = work.path().join("busy");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"x").unwrap();
    let out = get_basebackup(&p.d, &target, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
    assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"x");
    // --overwrite replaces it.
    let out = get_basebackup(&p.d, &target, &["--overwrite"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(target.join("PG_VERSION").exists() && !target.join("keep").exists());

    // A corrupted chunk: its name in the error, nothing left.
    let chunk_dir =
        p.d.path("archive")
            .join("main/basebackup_chunk")
            .join(&p.backup);
    let base = chunk_dir.join("base.tar");
    let original = std::fs::read(&base).unwrap();
    let mut bad = original.clone();
    let at = bad.len() * 2 / 3;
    bad[at] ^= 1;
    std::fs::write(&base, &bad).unwrap();
    let target = work.path().join("corrupt");
    let out = get_basebackup(&p.d, &target, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("basebackup_chunk/{}/base.tar", p.backup)),
        "{}",
        stderr(&out)
    );
    assert!(
        !target.exists(),
        "a failed restore into a new directory removes it"
    );
    // Into an existing empty directory: emptied again.
    std::fs::create_dir(&target).unwrap();
    let out = get_basebackup(&p.d, &target, &[]);
    assert!(!out.status.success());
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
    std::fs::write(&base, &original).unwrap();

    // The wrong private key for the key id.
    let (_, other_private) = walhoard::pipeline::encryption::generate_key_pair(2048).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.d.config_path()).unwrap()).unwrap();
    let good = cfg.clone();
    cfg["backup_sites"]["main"]["encryption_keys"]["k1"]["private"] = json!(other_private);
    std::fs::write(p.d.config_path(), cfg.to_string()).unwrap();
    let target = work.path().join("wrongkey");
    let out = get_basebackup(&p.d, &target, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("wrong private key"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains(&format!("basebackup/{}", p.backup)),
        "{}",
        stderr(&out)
    );
    assert!(!target.exists());

    // The store unreachable (an S3 endpoint nobody listens on).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = good.clone();
    cfg["backup_sites"]["main"]["object_storage"] = json!({
        "storage_type": "s3", "region": "us-east-1", "bucket_name": "b",
        "host": "127.0.0.1", "port": port, "is_secure": false,
        "aws_access_key_id": "a", "aws_secret_access_key": "s",
    });
    std::fs::write(p.d.config_path(), cfg.to_string()).unwrap();
    let target = work.path().join("unreachable");
    let started = std::time::Instant::now();
    let out = get_basebackup(&p.d, &target, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("basebackup"), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(120));
    assert_not_a_data_dir(&target);
    std::fs::write(p.d.config_path(), good.to_string()).unwrap();
}

/// Restores `p`'s backup into `target` as a standby of `p` (`--primary-conninfo` naming
/// `application_name`), starts it and waits until it streams from `p`.
fn restore_streaming_standby(p: &Primary, target: &Path, application_name: &str) -> PgCluster {
    let conninfo = format!(
        "host={} port={} user=postgres application_name={application_name}",
        p.pg.socket_dir().display(),
        p.pg.port
    );
    let out = get_basebackup(&p.d, target, &["--primary-conninfo", &conninfo]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(target.join("standby.signal").exists());
    let standby = PgCluster::builder().start_on(target).unwrap();
    let streaming = format!("select count(*) from pg_stat_replication where application_name = '{application_name}' and state = 'streaming'");
    assert!(
        wait_until(Duration::from_secs(60), || p
            .pg
            .psql(&streaming)
            .is_ok_and(|r| r.trim() == "1")),
        "the standby does not stream: {}",
        standby.log()
    );
    standby
}

/// Inserts `rows` rows of `batch` on `p` and waits until `standby` has replayed them.
fn insert_and_wait_replayed(p: &Primary, standby: &PgCluster, batch: &str, rows: u32) {
    insert(&p.pg, batch, rows);
    let want = p.pg.psql(CHECKSUM).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || standby
            .psql(CHECKSUM)
            .is_ok_and(|c| c == want)),
        "the standby did not catch up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_standby_catches_up_from_archive_then_streams() {
    let p = primary(json!({})).await;
    insert(&p.pg, "after-backup", 10_000);
    p.archive_all().await;
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("standby");
    let standby = restore_streaming_standby(&p, &target, "restored_standby");
    assert!(
        standby.log().contains("restored log file"),
        "{}",
        standby.log()
    );
    insert_and_wait_replayed(&p, &standby, "streamed", 100);
    assert_eq!(
        standby.psql("select pg_is_in_recovery()").unwrap().trim(),
        "t"
    );
}

/// A local-tar backup read from a streaming standby's data directory (pg_backup_start and
/// pg_backup_stop run on the standby), stored beside the primary's WAL, restores to the
/// primary's data.
///
/// Regression (issue 14, item 18): that backup carries the standby's `standby.signal` and its
/// primary_conninfo in postgresql.auto.conf. Restored with `--restore-to-primary`, the
/// backup's standby.signal won over walhoard's recovery.signal and the copy stayed a standby
/// of the old primary for ever. The restore must remove both (and say so), and the copy must
/// finish recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_to_primary_of_a_standby_backup_ends_recovery() {
    let p = primary(json!({})).await;
    p.archive_all().await;
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("standby");
    let standby = restore_streaming_standby(&p, &target, "bb_standby");
    insert_and_wait_replayed(&p, &standby, "before-standby-backup", 10_000);

    // A second configuration: the same archive and keys, the standby as its node.
    let d2 = DaemonDir::new();
    d2.write_config(
        &standby,
        p.d.local_storage(),
        json!({
            "basebackup_mode": "local-tar",
            "pg_data_directory": standby.data_dir(),
            "basebackup_chunk_size": 1048576,
            "encryption_keys": {"k1": {"public": p.d.public, "private": p.d.private}},
        }),
    );
    readable_by_server(&d2);
    let name = take_basebackup(&d2);
    assert_eq!(
        standby.psql("select pg_is_in_recovery()").unwrap().trim(),
        "t",
        "backup taken from a standby"
    );
    // The WAL up to the backup's end must reach the archive (the primary's daemon streams it).
    insert(&p.pg, "after-standby-backup", 100);
    p.archive_all().await;
    let restored = work.path().join("from-standby");
    let out = get_basebackup(
        &d2,
        &restored,
        &[&["--basebackup", &name][..], &PROMOTED_PRIMARY].concat(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // What the backup carried (the standby's own files), and what the restore left of it.
    assert!(standby.data_dir().join("standby.signal").exists());
    let standby_conf =
        std::fs::read_to_string(standby.data_dir().join("postgresql.auto.conf")).unwrap();
    assert!(
        standby_conf.contains("application_name=bb_standby"),
        "{standby_conf}"
    );
    assert!(
        stderr(&out).contains("removed the backup's recovery configuration: standby.signal"),
        "{}",
        stderr(&out)
    );
    assert!(!restored.join("standby.signal").exists());
    assert!(restored.join("recovery.signal").exists());
    let conf = std::fs::read_to_string(restored.join("postgresql.auto.conf")).unwrap();
    assert!(
        !conf.contains("primary_conninfo") && !conf.contains("bb_standby"),
        "{conf}"
    );
    assert_eq!(conf.matches("restore_command").count(), 1, "{conf}");
    let copy = start_promoted(&restored);
    let want_latest = p.pg.psql(CHECKSUM).unwrap();
    assert_eq!(
        copy.psql(CHECKSUM).unwrap(),
        want_latest,
        "restored copy of the standby's backup differs; log:\n{}",
        copy.log()
    );
    assert!(
        copy.psql("select count(*) from pg_stat_wal_receiver")
            .is_ok_and(|r| r.trim() == "0"),
        "the copy streams from the old primary"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_pitr_across_a_timeline_switch() {
    let mut p = primary(json!({})).await;
    insert(&p.pg, "tli1", 5_000);
    p.pg.promote_to_new_timeline().unwrap();
    insert(&p.pg, "tli2", 5_000);
    p.pg.psql("select pg_create_restore_point('on_tli2')")
        .unwrap();
    let want = p.pg.psql(CHECKSUM).unwrap();
    insert(&p.pg, "later", 5_000);
    p.archive_all().await;
    wait_archived(
        &p.store,
        "00000002.history",
        Duration::from_secs(30),
        &p.daemon,
    )
    .await;
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("tli");
    let restored = restore_and_promote(
        &p.d,
        &target,
        &[
            &["--recovery-target-name", "on_tli2"][..],
            &PROMOTED_PRIMARY,
        ]
        .concat(),
    );
    assert_eq!(restored.psql(CHECKSUM).unwrap(), want);
    let tli: u32 = restored
        .psql("select timeline_id from pg_control_checkpoint()")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(tli >= 3, "promoted after timeline 2, got {tli}");
    let _ = p.pg.stop();
}

/// Tablespaces are restored where `--tablespace-dir` says and linked from pg_tblspc.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_local_tar_with_remapped_tablespace() {
    let pg = cluster();
    crate::common::create_tablespace(&pg, "ts1");
    pg.psql("create table r (id bigserial primary key, batch text, v text) tablespace ts1")
        .unwrap();
    insert(&pg, "ts", 20_000);
    let d = DaemonDir::new();
    let storage = d.local_storage();
    d.write_config(&pg, storage.clone(), json!({"basebackup_mode": "local-tar", "active_backup_mode": "standalone_hot_backup", "pg_data_directory": pg.data_dir(), "basebackup_chunk_size": 1048576}));
    readable_by_server(&d);
    let backup = take_basebackup(&d);
    let want = pg.psql(CHECKSUM).unwrap();
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("data");
    let new_ts: PathBuf = work.path().join("ts-new");
    let map = format!("ts1={}", new_ts.display());
    let out = get_basebackup(
        &d,
        &target,
        &[
            "--basebackup",
            &backup,
            "--tablespace-dir",
            &map,
            "--restore-to-primary",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let oid = crate::common::query(&pg, "select oid from pg_tablespace where spcname = 'ts1'");
    assert_eq!(
        std::fs::read_link(target.join("pg_tblspc").join(&oid)).unwrap(),
        new_ts
    );
    give_to_server_user(&new_ts).unwrap();
    let restored = start_promoted(&target);
    assert_eq!(restored.psql(CHECKSUM).unwrap(), want);
    assert_eq!(
        restored
            .psql("select pg_tablespace_location(oid) from pg_tablespace where spcname = 'ts1'")
            .unwrap()
            .trim(),
        new_ts.display().to_string()
    );
    // An unknown tablespace name is refused before anything is written.
    let out = get_basebackup(
        &d,
        &work.path().join("x"),
        &["--tablespace-dir", "nope=/tmp/nope"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no tablespace \"nope\""),
        "{}",
        stderr(&out)
    );
    assert!(!work.path().join("x").exists());
}

/// basic mode with PostgreSQL compressing the archives (`basebackup_server_compression`):
/// the control object says so, restore decompresses what the server compressed, and the
/// restored cluster holds the primary's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_server_compressed_basebackup() {
    let p =
        primary(json!({"basebackup_mode": "basic", "basebackup_server_compression": true})).await;
    // The control object is a tar holding the description.
    let work = tempfile::tempdir().unwrap();
    let control = restore(
        &p.store,
        &p.d.ring(),
        &format!("basebackup/{}", p.backup),
        work.path(),
    )
    .await;
    let out = std::process::Command::new("tar")
        .arg("-xOf")
        .arg(&control)
        .arg(walhoard_basebackup::control::METADATA_MEMBER)
        .output()
        .unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let chunks = meta["chunks"].as_array().unwrap();
    let data: Vec<&serde_json::Value> = chunks.iter().filter(|c| c["kind"] != "manifest").collect();
    assert!(!data.is_empty(), "{meta}");
    for c in &data {
        assert_eq!(c["server_compressed"], true, "{c}");
        assert!(
            c["input_size"].as_u64().unwrap() > c["result_size"].as_u64().unwrap(),
            "{c}"
        );
    }
    insert(&p.pg, "after", 1_000);
    p.archive_all().await;
    let want = p.pg.psql(CHECKSUM).unwrap();
    let target = work.path().join("restored");
    let copy = restore_and_promote(&p.d, &target, &PROMOTED_PRIMARY);
    assert_eq!(copy.psql(CHECKSUM).unwrap(), want);
}

/// Issue 14 item 11: damaged entries in `basebackup/` beside a healthy backup (forged here, as
/// a bit rot, a half-finished copy or another tool could leave them) no longer fail every
/// restore: the listing skips or lists them with a warning, the healthy backup restores when
/// named, and `latest` falls back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_skips_a_damaged_basebackup_entry() {
    let p = primary(json!({})).await;
    p.archive_all().await;
    let want = p.pg.psql(CHECKSUM).unwrap();
    let dir = p.d.path("archive").join("main/basebackup");
    let sidecar = |name: &str| dir.join(format!("{name}.metadata"));
    // Newer than the healthy backup in every respect its listing can show.
    let no_sidecar = "2999-01-01_00-00_0";
    std::fs::write(dir.join(no_sidecar), b"control").unwrap();
    let garbage_sidecar = "2999-01-01_00-00_1";
    std::fs::write(dir.join(garbage_sidecar), b"control").unwrap();
    std::fs::write(sidecar(garbage_sidecar), b"{not json").unwrap();
    // A sidecar that claims the newest backup, over a control object that is not one.
    let bad_control = "2999-01-01_00-00_2";
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sidecar(&p.backup)).unwrap()).unwrap();
    meta["end-time"] = json!("2999-01-01T00:00:00Z");
    meta["backup-name"] = json!(bad_control);
    std::fs::write(dir.join(bad_control), b"not a tar, not encrypted").unwrap();
    std::fs::write(sidecar(bad_control), meta.to_string()).unwrap();
    // An end time that cannot be placed against any target.
    let bad_time = "2999-01-01_00-00_3";
    meta["end-time"] = json!("yesterday");
    meta["backup-name"] = json!(bad_time);
    std::fs::write(dir.join(bad_time), b"x").unwrap();
    std::fs::write(sidecar(bad_time), meta.to_string()).unwrap();

    let out = walhoard(
        &["restore", "list-basebackups", "--json", "--config"],
        &[&p.d.config_path()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["name"].as_str())
        .collect();
    assert!(names.contains(&p.backup.as_str()), "{names:?}");
    assert!(
        !names.contains(&no_sidecar) && !names.contains(&garbage_sidecar),
        "{names:?}"
    );
    for damaged in [no_sidecar, garbage_sidecar] {
        assert!(
            stderr(&out).contains(&format!("basebackup/{damaged}")),
            "no warning for {damaged}: {}",
            stderr(&out)
        );
    }

    let work = tempfile::tempdir().unwrap();
    // Named explicitly: that backup, whatever else is there.
    let target = work.path().join("named");
    let out = get_basebackup(&p.d, &target, &["--basebackup", &p.backup]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(target.join("PG_VERSION").exists());
    // latest: the damaged newer ones are skipped with a warning naming them, the healthy one
    // restored, and PostgreSQL recovers from it to the archive's end.
    let target = work.path().join("latest");
    let out = get_basebackup(&p.d, &target, &["--restore-to-primary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("restore: basebackup {} ", p.backup)),
        "{}",
        stderr(&out)
    );
    for damaged in [bad_control, bad_time] {
        assert!(
            stderr(&out).contains(damaged),
            "no warning for {damaged}: {}",
            stderr(&out)
        );
    }
    let copy = start_promoted(&target);
    assert_eq!(copy.psql(CHECKSUM).unwrap(), want);
    // A damaged backup named explicitly fails, naming its object; nothing is left behind.
    let target = work.path().join("damaged");
    let out = get_basebackup(&p.d, &target, &["--basebackup", bad_control]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("basebackup/{bad_control}")),
        "{}",
        stderr(&out)
    );
    assert!(!target.exists());
}
