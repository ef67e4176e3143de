//! `walhoard postgres-command --mode restore` against forged, damaged and unreachable archives
//! (issue 14, items 4, 5 and 6): whatever is not the archive positively answering "this object
//! does not exist" must exit 255, so that PostgreSQL stops recovery instead of taking it for
//! the end of the archive and promoting early. Segments are real WAL from a real cluster,
//! uploaded as the daemon would (zstd, encrypted with the site's key) unless a test forges
//! them.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::{json, Value};
use walhoard::pipeline::compression::{Algorithm, CompressionSettings};
use walhoard::pipeline::encryption::PublicKey;
use walhoard::pipeline::hash::HashAlgorithm;
use walhoard::pipeline::transfer::{upload, Source, Upload, UploadEncryption};
use walhoard::storage::ObjectStore;
use walhoard_testkit::PgCluster;

use crate::common::wait_until;
use crate::daemon_support::*;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A cluster's completed segments in a local archive, and a data directory (its pg_control
/// and an empty pg_wal) to restore them into.
struct Archive {
    pg: PgCluster,
    d: DaemonDir,
    store: ObjectStore,
    /// Archived segment names.
    segs: Vec<String>,
    data: tempfile::TempDir,
}

/// Uploads `path` as the WAL object `name`, encrypted with `d`'s key when `encrypt`.
pub(crate) async fn upload_wal(
    store: &ObjectStore,
    d: &DaemonDir,
    name: &str,
    path: &Path,
    encrypt: bool,
) {
    let encryption = encrypt.then(|| UploadEncryption {
        key_id: "k1".into(),
        public: PublicKey::from_pem(&d.public).unwrap(),
    });
    upload(
        store,
        Upload::wal(
            format!("xlog/{name}"),
            Source::File(path.to_path_buf()),
            CompressionSettings::new(Algorithm::Zstd),
            encryption,
            HashAlgorithm::Sha1,
        ),
    )
    .await
    .unwrap();
}

/// A data directory of `pg`'s cluster for restore_command: `global/pg_control`, `pg_wal/`.
fn data_dir_of(pg: &PgCluster) -> tempfile::TempDir {
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("global")).unwrap();
    std::fs::create_dir_all(data.path().join("pg_wal")).unwrap();
    std::fs::copy(
        pg.data_dir().join("global/pg_control"),
        data.path().join("global/pg_control"),
    )
    .unwrap();
    data
}

async fn archive(site: Value) -> Archive {
    let pg = PgCluster::start().unwrap();
    let d = DaemonDir::new();
    let storage = d.local_storage();
    d.write_config(&pg, storage.clone(), site);
    let store = d.store(&storage);
    let mut segs = Vec::new();
    for i in 0..2 {
        pg.psql(&format!(
            "create table t{i} as select g, md5(g::text) from generate_series(1, 5000) g"
        ))
        .unwrap();
        segs.push(switch_segment(&pg));
    }
    for s in &segs {
        upload_wal(&store, &d, s, &pg.wal_dir().join(s), true).await;
    }
    let data = data_dir_of(&pg);
    Archive {
        pg,
        d,
        store,
        segs,
        data,
    }
}

impl Archive {
    fn output(&self, data: &Path) -> PathBuf {
        data.join("pg_wal/RECOVERYXLOG")
    }

    /// restore_command as PostgreSQL runs it: in the data directory, %p under pg_wal.
    fn restore_into(&self, config: &Path, xlog: &str, data: &Path) -> Output {
        let output = self.output(data);
        let _ = std::fs::remove_file(&output);
        std::process::Command::new(env!("CARGO_BIN_EXE_walhoard"))
            .current_dir(data)
            .args(crate::common::RESTORE_COMMAND)
            .args([xlog, "--output"])
            .arg(&output)
            .arg("--config")
            .arg(config)
            .output()
            .unwrap()
    }

    fn restore(&self, xlog: &str) -> Output {
        self.restore_into(&self.d.config_path(), xlog, self.data.path())
    }

    /// The served file equals the cluster's own segment.
    fn served(&self, name: &str) -> bool {
        std::fs::read(self.output(self.data.path())).ok()
            == Some(std::fs::read(self.pg.wal_dir().join(name)).unwrap())
    }

    /// Rewrites the configuration with `f` applied to the site object; returns its path.
    fn config_with(&self, name: &str, f: impl FnOnce(&mut Value)) -> PathBuf {
        let mut cfg: Value =
            serde_json::from_slice(&std::fs::read(self.d.config_path()).unwrap()).unwrap();
        f(&mut cfg["backup_sites"]["main"]);
        let path = self.d.path(name);
        std::fs::write(&path, cfg.to_string()).unwrap();
        path
    }

    fn object_path(&self, name: &str) -> PathBuf {
        self.d.path("archive").join("main/xlog").join(name)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_command_refuses_a_plaintext_segment_in_an_encrypted_site() {
    let a = archive(json!({})).await;
    let seg = &a.segs[0];
    let out = a.restore(seg);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(a.served(seg));
    // Forged: the same WAL stored without encryption, its sidecar naming no key.
    upload_wal(&a.store, &a.d, seg, &a.pg.wal_dir().join(seg), false).await;
    let sidecar = std::fs::read_to_string(a.object_path(&format!("{seg}.metadata"))).unwrap();
    assert!(!sidecar.contains("encryption-key-id"), "{sidecar}");
    let out = a.restore(seg);
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("without encryption") && stderr(&out).contains(seg.as_str()),
        "{}",
        stderr(&out)
    );
    assert!(
        !a.output(a.data.path()).exists(),
        "a refused file was served"
    );
    // The explicit setting for archives written before encryption was turned on.
    let legacy = a.config_with("legacy.json", |site| {
        site["allow_unencrypted_objects"] = json!(true)
    });
    let out = a.restore_into(&legacy, seg, a.data.path());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(a.served(seg));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_command_missing_sidecar_or_storage_is_255_not_end_of_archive() {
    let a = archive(json!({})).await;
    // Truly absent from a reachable archive: 1, the end of the archive for PostgreSQL.
    let out = a.restore("0000000100000000000000F0");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // The object is there, its metadata sidecar is not: 255.
    let seg = &a.segs[0];
    std::fs::remove_file(a.object_path(&format!("{seg}.metadata"))).unwrap();
    let out = a.restore(seg);
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    assert!(stderr(&out).contains(".metadata"), "{}", stderr(&out));
    // The sidecar is there, the object is not: 255.
    let other = &a.segs[1];
    std::fs::remove_file(a.object_path(other)).unwrap();
    let out = a.restore(other);
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    // The storage directory does not exist (a typo, an unmounted disk): 255, and neither
    // restore_command nor list-basebackups creates it.
    let missing = a.d.path("not-mounted");
    let typo = a.config_with("typo.json", |site| {
        site["object_storage"]["directory"] = json!(missing)
    });
    let out = a.restore_into(&typo, seg, a.data.path());
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    assert!(stderr(&out).contains("not-mounted"), "{}", stderr(&out));
    let list = std::process::Command::new(env!("CARGO_BIN_EXE_walhoard"))
        .args(["restore", "list-basebackups", "--site", "main", "--config"])
        .arg(&typo)
        .output()
        .unwrap();
    assert!(!list.status.success(), "{}", stderr(&list));
    assert!(!missing.exists(), "a read-only command created the storage");
    // A mount point left empty (the disk is not mounted): nothing of the site is there.
    std::fs::create_dir(&missing).unwrap();
    let out = a.restore_into(&typo, "0000000100000000000000F0", a.data.path());
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_command_checks_the_recorded_hash_and_the_system_identifier() {
    let a = archive(json!({})).await;
    // A sidecar whose hash does not match the content (a damaged object or sidecar): 255.
    let seg = &a.segs[0];
    let side = a.object_path(&format!("{seg}.metadata"));
    let mut meta: Value = serde_json::from_slice(&std::fs::read(&side).unwrap()).unwrap();
    assert_eq!(meta["hash-algorithm"], "sha1");
    meta["hash"] = json!("0".repeat(40));
    std::fs::write(&side, meta.to_string()).unwrap();
    let out = a.restore(seg);
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    assert!(stderr(&out).contains("hash"), "{}", stderr(&out));
    assert!(
        !a.output(a.data.path()).exists(),
        "a file failing its hash was served"
    );

    // A segment of another cluster under a name this archive uses, validly encrypted with
    // the site's key: its long page header names another system identifier.
    let other = PgCluster::start().unwrap();
    other
        .psql("create table x as select generate_series(1, 5000) g")
        .unwrap();
    let foreign = switch_segment(&other);
    upload_wal(
        &a.store,
        &a.d,
        &foreign,
        &other.wal_dir().join(&foreign),
        true,
    )
    .await;
    let out = a.restore(&foreign);
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("system identifier"),
        "{}",
        stderr(&out)
    );
    assert!(!a.output(a.data.path()).exists());
    // Restoring the other cluster's data directory, the same object is its own WAL.
    let theirs = data_dir_of(&other);
    let out = a.restore_into(&a.d.config_path(), &foreign, theirs.path());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// The issue's reproduction: a segment's sidecar deleted in the middle of the WAL a restore
/// replays. restore_command answered 1, PostgreSQL took it for the end of the archive and
/// promoted with part of the data; it must stop instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_stops_instead_of_promoting_early_when_a_sidecar_is_missing() {
    let pg = PgCluster::builder()
        .setting("wal_keep_size", "'1GB'")
        .start()
        .unwrap();
    let d = DaemonDir::new();
    let storage = d.local_storage();
    d.write_config(&pg, storage.clone(), json!({}));
    {
        use std::os::unix::fs::PermissionsExt;
        // restore_command runs as the server's OS user.
        std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(d.config_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let daemon = Daemon::start(&d);
    let store = d.store(&storage);
    wait_slot(&pg, &daemon);
    pg.psql("create table r as select g from generate_series(1, 1000) g")
        .unwrap();
    let backup = basebackup_command(&d).output().unwrap();
    assert!(backup.status.success(), "{}", stderr(&backup));
    let mut names = Vec::new();
    for _ in 0..3 {
        pg.psql("insert into r select generate_series(1, 20000)")
            .unwrap();
        names.push(switch_segment(&pg));
    }
    wait_all_archived(&store, &names, Duration::from_secs(60), &daemon).await;
    let full: u64 = pg
        .psql("select count(*) from r")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::fs::remove_file(
        d.path("archive")
            .join("main/xlog")
            .join(format!("{}.metadata", names[1])),
    )
    .unwrap();
    let target = tempfile::tempdir().unwrap();
    let data = target.path().join("data");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walhoard"))
        .args(["restore", "get-basebackup", "--site", "main"])
        .args(crate::restore::PROMOTED_PRIMARY)
        .arg("--config")
        .arg(d.config_path())
        .arg("--target-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    const STOPPED: &str = "could not restore file";
    match PgCluster::builder().start_on(&data) {
        // Recovery stopped before the server accepted connections.
        Err(e) => assert!(format!("{e:#}").contains(STOPPED), "{e:#}"),
        Ok(restored) => {
            let promoted = || {
                restored
                    .psql("select pg_is_in_recovery()")
                    .is_ok_and(|r| r.trim() == "f")
            };
            wait_until(Duration::from_secs(60), || {
                restored.log().contains(STOPPED) || promoted()
            });
            let rows = restored.psql("select count(*) from r").ok();
            assert!(
                !promoted(),
                "promoted with {rows:?} of {full} rows at a gap: {}",
                restored.log()
            );
            assert!(restored.log().contains(STOPPED), "{}", restored.log());
        }
    }
}
