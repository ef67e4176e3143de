//! pghoard's command names and flags (src/pghoard_cli.rs), through the real binary started
//! under pghoard's names: symlinks named as pghoard installs its commands.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::json;

use walhoard_testkit::{give_to_server_user, PgCluster};

use crate::daemon_support::DaemonDir;
use crate::restore::{insert, primary, start_promoted_with, stderr, CHECKSUM};

/// The daemon as the OS user PostgreSQL runs as, the way pghoard's systemd unit runs pghoard
/// (User=postgres): the files restore_command has it write into pg_wal must be the server's,
/// which opens them read-write (`XLogFileRead()`).
struct ServerUserDaemon(std::process::Child);

impl ServerUserDaemon {
    fn start(d: &DaemonDir) -> ServerUserDaemon {
        give_to_server_user(d.dir.path()).unwrap();
        let exe = env!("CARGO_BIN_EXE_walhoard");
        let root = is_root();
        let mut c = if root {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", exe]);
            c
        } else {
            Command::new(exe)
        };
        let log = std::fs::File::create(d.path("daemon-server-user.log")).unwrap();
        let child = c
            .args(["daemon", "--config"])
            .arg(d.config_path())
            .env("WALHOARD_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        d.wait_http();
        ServerUserDaemon(child)
    }
}

impl Drop for ServerUserDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// A directory, readable by the server's OS user, with `names` symlinked to the walhoard binary.
pub(crate) fn pghoard_bin(names: &[&str]) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for name in names {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_walhoard"), dir.path().join(name)).unwrap();
    }
    dir
}

fn run(bin: &Path, args: &[&str], extra: &[&Path]) -> Output {
    Command::new(bin).args(args).args(extra).output().unwrap()
}

/// The restore_command pghoard's `create_recovery_conf` writes, in place of walhoard's.
fn use_pghoards_restore_command(data: &Path, command: &str) {
    let conf = data.join("postgresql.auto.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    let mut kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("restore_command"))
        .collect();
    let line = format!("restore_command = '{command}'");
    kept.push(&line);
    std::fs::write(&conf, kept.join("\n") + "\n").unwrap();
}

/// A recovery configuration written for pghoard (`pghoard_postgres_command --mode restore
/// --port P --site S --output %p --xlog %f`, the daemon's HTTP API) restores the archive
/// walhoard's daemon wrote, and the backup is found and restored with pghoard_restore's flags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pghoard_names_restore_through_pghoards_recovery_config() {
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("restored");
    // The restore target is the site's data directory, as on a real host (the daemon writes
    // restore_command's files only there).
    let mut p = primary(json!({ "pg_data_directory": target })).await;
    insert(&p.pg, "after-backup", 30_000);
    let want = p.pg.psql(CHECKSUM).unwrap();
    p.archive_all().await;
    assert!(p.daemon.terminate(Duration::from_secs(30)).is_some());
    let daemon = ServerUserDaemon::start(&p.d);

    let bin = pghoard_bin(&["pghoard_restore", "pghoard_postgres_command"]);
    let restore = bin.path().join("pghoard_restore");
    let config = p.d.config_path();
    // pghoard_restore by argv[0], and `walhoard pghoard_restore` as a subcommand.
    let listed = run(&restore, &["list-basebackups", "--config"], &[&config]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains(&p.backup),
        "{}",
        String::from_utf8_lossy(&listed.stdout)
    );
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_walhoard"));
    let listed = run(
        &exe,
        &[
            "pghoard_restore",
            "list-basebackups",
            "--site",
            "main",
            "--config",
        ],
        &[&config],
    );
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&p.backup));

    let got = Command::new(&restore)
        .args(["get-basebackup", "--site", "main", "--restore-to-master"])
        .args(["--recovery-target-action", "promote", "--target-dir"])
        .arg(&target)
        .env("PGHOARD_CONFIG", &config)
        .output()
        .unwrap();
    assert!(got.status.success(), "{}", stderr(&got));
    assert!(target.join("recovery.signal").exists());

    let postgres_command = bin.path().join("pghoard_postgres_command");
    use_pghoards_restore_command(
        &target,
        &format!(
            "{} --mode restore --port {} --site main --output %p --xlog %f",
            postgres_command.display(),
            p.d.http_port
        ),
    );
    // The daemon confines restores to pg_data_directory: the restored directory moves into
    // the test cluster's own, and the configured path must keep leading there.
    let restored = start_promoted_with(PgCluster::builder().link_old_path(), &target);
    assert_eq!(restored.psql(CHECKSUM).unwrap(), want);
    assert!(
        restored.log().contains("restored log file"),
        "{}",
        restored.log()
    );
    drop(restored);

    // With the daemon gone, pghoard's restore_command exited 5, which PostgreSQL takes for
    // the end of the archive; walhoard's exits 255 and recovery stops.
    let first = first_archived_segment(&p.store).await;
    drop(daemon);
    let out = run(
        &postgres_command,
        &[
            "--mode",
            "restore",
            "--port",
            &p.d.http_port.to_string(),
            "--site",
            "main",
            "--xlog",
            &first,
            "--output",
        ],
        &[&work.path().join("RECOVERYXLOG")],
    );
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
}

/// The first WAL segment the archive holds.
async fn first_archived_segment(store: &walhoard::storage::ObjectStore) -> String {
    let segments = crate::daemon_support::archived_segments(store).await;
    segments.keys().next().cloned().unwrap()
}

/// pghoard_postgres_command with flags it cannot parse must not tell PostgreSQL "not found"
/// (an exit status 1..125 ends recovery early): walhoard exits 255.
#[test]
fn pghoard_postgres_command_bad_flags_exit_255() {
    let bin = pghoard_bin(&["pghoard_postgres_command"]);
    let cmd = bin.path().join("pghoard_postgres_command");
    for args in [
        &["--mode", "restore", "--site", "s", "--output", "x"][..],
        &[
            "--mode", "fetch", "--site", "s", "--xlog", "x", "--output", "x",
        ][..],
        &[
            "--mode", "restore", "--port", "notaport", "--site", "s", "--xlog", "x",
        ][..],
    ] {
        let out = run(&cmd, args, &[]);
        assert_eq!(out.status.code(), Some(255), "{args:?}: {}", stderr(&out));
    }
    let out = run(&cmd, &["--version"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// pghoard_archive_sync and pghoard_archive_cleanup run walhoard's archive-sync and
/// archive-cleanup, by symlink and as `walhoard <name>`, with $PGHOARD_CONFIG as pghoard's.
#[test]
fn pghoard_archive_sync_and_cleanup_run_walhoards_commands() {
    let bin = pghoard_bin(&["pghoard_archive_sync", "pghoard_archive_cleanup"]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pghoard.json");
    std::fs::write(
        &config,
        serde_json::json!({"backup_sites": {"s": {"nodes": ["host=/tmp"], "object_storage":
            {"storage_type": "local", "directory": dir.path().join("archive")}}}})
        .to_string(),
    )
    .unwrap();
    let with_env = |bin: &Path, args: &[&str]| {
        Command::new(bin)
            .args(args)
            .env("PGHOARD_CONFIG", &config)
            .output()
            .unwrap()
    };
    // The archive has no basebackup: cleanup deletes nothing and says why.
    let out = with_env(&bin.path().join("pghoard_archive_cleanup"), &["--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("site s: nothing deleted"), "{text}");
    // archive-sync needs the site's pg_data_directory and server: an error naming the key.
    let sync = bin.path().join("pghoard_archive_sync");
    for (cmd, argv) in [
        (sync.as_path(), &[][..]),
        (
            Path::new(env!("CARGO_BIN_EXE_walhoard")),
            &["pghoard_archive_sync"][..],
        ),
    ] {
        let out = with_env(cmd, argv);
        assert_eq!(out.status.code(), Some(1), "{argv:?}");
        assert!(
            stderr(&out).contains("backup_sites.s.pg_data_directory"),
            "{argv:?}: {}",
            stderr(&out)
        );
    }
}

/// pghoard_create_keys prints pghoard's form ({"backup_sites": {S: {...}}}) and, with
/// --config, stores the key into the file as the site's encryption_key_id, keeping the
/// file's permissions; the result loads as walhoard's configuration.
#[test]
fn pghoard_create_keys_prints_and_saves_pghoards_form() {
    use std::os::unix::fs::PermissionsExt;
    let bin = pghoard_bin(&["pghoard_create_keys"]);
    let cmd = bin.path().join("pghoard_create_keys");
    let out = run(
        &cmd,
        &["--site", "s1", "--key-id", "k9", "--bits", "2048"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["backup_sites"]["s1"]["encryption_key_id"], "k9");
    let printed = &v["backup_sites"]["s1"]["encryption_keys"]["k9"];
    assert!(printed["private"]
        .as_str()
        .unwrap()
        .contains("BEGIN PRIVATE KEY"));
    // pghoard refuses without a site or a configuration file.
    let out = run(&cmd, &["--key-id", "k9"], &[]);
    assert_eq!(out.status.code(), Some(1));

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pghoard.json");
    let cfg = json!({"backup_sites": {"s1": {
        "nodes": ["host=/tmp"],
        "object_storage": {"storage_type": "local", "directory": "/tmp/x"},
    }}});
    std::fs::write(&config, cfg.to_string()).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run(
        &cmd,
        &["--key-id", "k9", "--bits", "2048", "--config"],
        &[&config],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let saved = std::fs::read_to_string(&config).unwrap();
    let parsed = walhoard::config::Config::parse(&saved, "saved").unwrap();
    let site = &parsed.backup_sites["s1"];
    assert_eq!(site.encryption_key_id.as_deref(), Some("k9"));
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // The same id again: refused, file unchanged.
    let out = run(
        &cmd,
        &["--key-id", "k9", "--bits", "2048", "--config"],
        &[&config],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already defined"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), saved);
}

/// pghoard's systemd unit (`Type=notify`, `ExecStart=/usr/bin/pghoard <config>`) started
/// walhoard as `pghoard <config>`: it must run the daemon and send `READY=1` to
/// `$NOTIFY_SOCKET`, or systemd kills it after TimeoutStartSec and restarts it forever.
#[test]
fn pghoard_daemon_under_pghoards_notify_unit_reports_ready() {
    let pg = walhoard_testkit::PgCluster::start().unwrap();
    let d = DaemonDir::new();
    d.write_config(&pg, d.local_storage(), json!({}));
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let bin = pghoard_bin(&["pghoard"]);
    let mut child = Command::new(bin.path().join("pghoard"))
        .arg(d.config_path())
        .env("NOTIFY_SOCKET", &socket_path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    let got = socket.recv(&mut buf);
    // The daemon, not a one-shot command: its HTTP API answers.
    d.wait_http();
    let _ = child.kill();
    let _ = child.wait();
    let n = got.expect("no READY=1 from the daemon within 60 s");
    assert_eq!(&buf[..n], b"READY=1");
}
