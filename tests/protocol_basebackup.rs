//! BASE_BACKUP framing against a real server, with a user tablespace; pg_verifybackup is the
//! oracle for the manifest and the files.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use walhoard_protocol::{BaseBackupEvent, BaseBackupOptions};
use walhoard_testkit::{tool_path, PgCluster};

use crate::common::sh;

#[tokio::test]
async fn protocol_base_backup_with_tablespace() {
    let pg = PgCluster::start().unwrap();
    let ts_dir = crate::common::create_tablespace(&pg, "ts1");
    pg.psql("create table in_ts tablespace ts1 as select g from generate_series(1, 10000) g")
        .unwrap();
    let ts_oid = crate::common::query(&pg, "select oid from pg_tablespace where spcname = 'ts1'");

    let mut c = crate::common::replication_client(&pg).await;
    let opts = BaseBackupOptions {
        label: "walhoard test".into(),
        wal: true,
        ..Default::default()
    };
    let mut bb = c.base_backup(&opts).await.unwrap();
    assert_eq!(bb.tablespaces.len(), 2, "{:?}", bb.tablespaces);
    assert!(bb
        .tablespaces
        .iter()
        .any(|t| t.location.as_deref() == Some(ts_dir.to_str().unwrap())));
    let start_lsn = bb.start_lsn;

    let out = tempfile::tempdir().unwrap();
    let mut files: BTreeMap<String, std::fs::File> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut progress = 0;
    let mut archives = Vec::new();
    let (end_lsn, _end_tli) = loop {
        match bb
            .next()
            .await
            .unwrap()
            .expect("stream ended without Finished")
        {
            BaseBackupEvent::Archive {
                name,
                tablespace_location,
            } => {
                archives.push((name.clone(), tablespace_location));
                files.insert(
                    name.clone(),
                    std::fs::File::create(out.path().join(&name)).unwrap(),
                );
                current = Some(name);
            }
            BaseBackupEvent::ArchiveData(d) => files
                .get_mut(current.as_ref().expect("data before archive"))
                .unwrap()
                .write_all(&d)
                .unwrap(),
            BaseBackupEvent::ManifestStart => {
                files.insert(
                    "backup_manifest".into(),
                    std::fs::File::create(out.path().join("backup_manifest")).unwrap(),
                );
                current = Some("backup_manifest".into());
            }
            BaseBackupEvent::ManifestData(d) => {
                assert_eq!(current.as_deref(), Some("backup_manifest"));
                files
                    .get_mut("backup_manifest")
                    .unwrap()
                    .write_all(&d)
                    .unwrap()
            }
            BaseBackupEvent::Progress(p) => {
                assert!(p >= progress);
                progress = p;
            }
            BaseBackupEvent::Finished { end_lsn, end_tli } => break (end_lsn, end_tli),
        }
    };
    assert!(bb.next().await.unwrap().is_none());
    drop(files);
    assert!(end_lsn > start_lsn);
    if pg.major >= 15 {
        assert!(progress > 0, "no progress messages");
    }
    let names: Vec<&str> = archives.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"base.tar"), "{names:?}");
    let ts_tar = format!("{ts_oid}.tar");
    assert!(names.contains(&ts_tar.as_str()), "{names:?}");
    // The connection is usable after the backup.
    c.identify_system().await.unwrap();

    let listing = sh(&format!(
        "tar -tf {}",
        out.path().join("base.tar").display()
    ));
    assert!(
        listing.lines().any(|l| l == "PG_VERSION"),
        "no PG_VERSION in base.tar"
    );
    assert!(listing.lines().any(|l| l == "backup_label"));
    assert!(
        listing.lines().any(|l| l.starts_with("pg_wal/0000000")),
        "WAL not included"
    );

    // Restore by plain extraction, tablespace remapped to a new directory.
    let restore = out.path().join("restore");
    let ts_restore = out.path().join("ts_restore");
    std::fs::create_dir_all(&restore).unwrap();
    std::fs::create_dir_all(&ts_restore).unwrap();
    sh(&format!(
        "tar -xf {} -C {}",
        out.path().join("base.tar").display(),
        restore.display()
    ));
    sh(&format!(
        "tar -xf {} -C {}",
        out.path().join(&ts_tar).display(),
        ts_restore.display()
    ));
    let link = restore.join("pg_tblspc").join(&ts_oid);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&ts_restore, &link).unwrap();
    std::fs::copy(
        out.path().join("backup_manifest"),
        restore.join("backup_manifest"),
    )
    .unwrap();

    let verify = tool_path("pg_verifybackup").unwrap();
    let debian_tool = verify.starts_with(walhoard_testkit::DEBIAN_PG15_BIN);
    if debian_tool && pg.major > 15 {
        // Manifest version 2 (PostgreSQL 17+) is unknown to pg_verifybackup 15: check every
        // listed file's presence and size ourselves.
        check_manifest_sizes(&restore, &ts_oid);
        corrupt(&restore.join("PG_VERSION"));
        return;
    }
    // Debian's pg_verifybackup 15 parses WAL of its own major only.
    let wal_check = if debian_tool && pg.major != 15 {
        "-n"
    } else {
        ""
    };
    let ok = sh(&format!(
        "{} {wal_check} {}",
        verify.display(),
        restore.display()
    ));
    assert!(ok.contains("successfully verified"), "{ok}");
    // The oracle is not vacuous: a changed file fails verification.
    corrupt(&restore.join("PG_VERSION"));
    let status = std::process::Command::new(&verify)
        .arg("-n")
        .arg(&restore)
        .output()
        .unwrap();
    assert!(
        !status.status.success(),
        "pg_verifybackup accepted a modified file"
    );
}

fn check_manifest_sizes(restore: &Path, ts_oid: &str) {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(restore.join("backup_manifest")).unwrap()).unwrap();
    let files = manifest["Files"].as_array().expect("manifest lists files");
    assert!(files.len() > 100, "only {} files in manifest", files.len());
    let mut tablespace_files = 0;
    for f in files {
        let path = f["Path"].as_str().expect("file path");
        let size = f["Size"].as_u64().expect("file size");
        if path.starts_with(&format!("pg_tblspc/{ts_oid}/")) {
            tablespace_files += 1;
        }
        let meta = std::fs::metadata(restore.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(meta.len(), size, "{path}");
    }
    assert!(tablespace_files > 0, "no tablespace files in the manifest");
}

fn corrupt(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    b[0] ^= 0x01;
    std::fs::write(path, b).unwrap();
}

/// UPLOAD_MANIFEST (PostgreSQL 17+): a manifest the server cannot parse is a server error after
/// which the connection still works; a real one (from a full BASE_BACKUP on the same server) is
/// accepted and the INCREMENTAL backup that follows on the connection sends `INCREMENTAL.*`
/// files. Before 17 both are refused here, before anything is sent.
#[tokio::test]
async fn protocol_upload_manifest_and_incremental_base_backup() {
    let mut pg = PgCluster::start().unwrap();
    let mut c = crate::common::replication_client(&pg).await;
    let incremental = BaseBackupOptions {
        incremental: true,
        ..Default::default()
    };
    if pg.major < 17 {
        let e = c.upload_manifest(b"{}").await.unwrap_err();
        assert!(matches!(e, walhoard_protocol::Error::Config(_)), "{e}");
        assert!(c.base_backup(&incremental).await.is_err());
        c.identify_system()
            .await
            .expect("the connection still works");
        return;
    }
    pg.restart_with(Some(("summarize_wal", "on"))).unwrap();
    pg.psql("create table t as select g from generate_series(1, 100000) g")
        .unwrap();
    let mut c = crate::common::replication_client(&pg).await;
    let e = c.upload_manifest(b"not a manifest").await.unwrap_err();
    assert!(matches!(e, walhoard_protocol::Error::Server(_)), "{e}");
    c.identify_system().await.expect("usable after the refusal");

    // A full backup's manifest, collected from the stream.
    let (manifest, _) = collect(&mut c, &BaseBackupOptions::default()).await;
    pg.psql("update t set g = g + 1 where g <= 100").unwrap();
    c.upload_manifest(&manifest).await.unwrap();
    let (_, members) = collect(&mut c, &incremental).await;
    assert!(
        members.iter().any(|m| m.contains("/INCREMENTAL.")),
        "{members:?}"
    );
}

/// Runs BASE_BACKUP on `c`: its manifest and the member names of `base.tar`.
async fn collect(
    c: &mut walhoard_protocol::ReplicationClient,
    opts: &BaseBackupOptions,
) -> (Vec<u8>, Vec<String>) {
    let mut bb = c.base_backup(opts).await.unwrap();
    let (mut manifest, mut base, mut in_base) = (Vec::new(), Vec::new(), false);
    while let Some(ev) = bb.next().await.unwrap() {
        match ev {
            BaseBackupEvent::Archive { name, .. } => in_base = name == "base.tar",
            BaseBackupEvent::ArchiveData(d) if in_base => base.extend_from_slice(&d),
            BaseBackupEvent::ManifestData(d) => manifest.extend_from_slice(&d),
            _ => {}
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("base.tar");
    std::fs::write(&tar, &base).unwrap();
    let members = sh(&format!("tar -tf {}", tar.display()))
        .lines()
        .map(str::to_string)
        .collect();
    (manifest, members)
}
