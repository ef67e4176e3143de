//! `walhoard archive-sync` on a daemon-made archive of a real PostgreSQL 15: it repairs a
//! deleted WAL object, a WAL object holding other bytes (kept aside as `.diverged-<time>`) and
//! a missing history file, and names a gap it cannot repair (or takes a new basebackup when
//! asked). Local storage, and once on S3 (s3s-fs).

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{json, Value};
use walhoard::storage::{Metadata, ObjectStore};
use walhoard_testkit::PgCluster;

use crate::daemon::cluster;
use crate::daemon_support::*;

/// `walhoard archive-sync --config <d> --site main --json <extra>`; the parsed report (when
/// it printed one) and the output.
pub(crate) fn archive_sync(d: &DaemonDir, extra: &[&str]) -> (Option<Value>, Output) {
    let out = Command::new(env!("CARGO_BIN_EXE_walhoard"))
        .args(["archive-sync", "--site", "main", "--json", "--config"])
        .arg(d.config_path())
        .args(extra)
        .output()
        .unwrap();
    (serde_json::from_slice(&out.stdout).ok(), out)
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The action archive-sync reported for `file`.
fn action<'a>(report: &'a Value, file: &str) -> &'a Value {
    report["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["file"] == file)
        .unwrap_or_else(|| panic!("{file} not in the report: {report:#}"))
}

/// Archived `name` decrypted and decompressed equals the server's `pg_wal/<name>`.
async fn assert_same_as_pg_wal(pg: &PgCluster, d: &DaemonDir, store: &ObjectStore, name: &str) {
    let key = if name.ends_with(".history") {
        format!("timeline/{name}")
    } else {
        format!("xlog/{name}")
    };
    let out = tempfile::tempdir().unwrap();
    let got = restore(store, &d.ring(), &key, out.path()).await;
    assert!(
        std::fs::read(got).unwrap() == std::fs::read(pg.wal_dir().join(name)).unwrap(),
        "{key} differs from pg_wal/{name}"
    );
}

/// Deletes the archive's `deleted` and replaces `modified` with other bytes (and a hash that
/// is not the server's), runs archive-sync, and checks both repaired: `deleted` uploaded,
/// `modified`'s old object kept byte for byte (metadata too) under `.diverged-<time>`.
async fn damage_and_repair(
    pg: &PgCluster,
    d: &DaemonDir,
    store: &ObjectStore,
    deleted: &str,
    modified: &str,
) -> Value {
    store.delete(&format!("xlog/{deleted}")).await.unwrap();
    let mut other = Metadata::new();
    other.insert("hash".into(), "00".repeat(20));
    other.insert("hash-algorithm".into(), "sha1".into());
    other.insert("host".into(), "the-old-primary".into());
    store
        .put_bytes(
            &format!("xlog/{modified}"),
            b"the old primary's bytes",
            &other,
        )
        .await
        .unwrap();
    // Some WAL in the segment being written, so that its file exists and starts as WAL does.
    pg.psql("create table if not exists tail (x int); insert into tail values (1)")
        .unwrap();
    let (report, out) = archive_sync(d, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let report = report.unwrap();
    assert_eq!(action(&report, deleted)["action"], "uploaded", "{report:#}");
    // The segment still being written is neither compared nor uploaded.
    let current = report["current_segment"].as_str().unwrap();
    assert!(!has(store, current).await, "{current} uploaded");
    assert!(
        report["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["file"] != current),
        "{report:#}"
    );
    let m = action(&report, modified);
    assert_eq!(m["action"], "replaced_diverged", "{report:#}");
    let moved_to = m["moved_to"].as_str().unwrap();
    assert!(
        moved_to.starts_with(&format!("xlog/{modified}.diverged-")),
        "{moved_to}"
    );
    let (bytes, meta) = store.get_bytes(moved_to).await.unwrap();
    assert_eq!(bytes, b"the old primary's bytes");
    assert_eq!(
        meta.get("host").map(String::as_str),
        Some("the-old-primary")
    );
    assert_same_as_pg_wal(pg, d, store, deleted).await;
    // Uploaded as the daemon uploads: marked as walhoard's (retention may delete it later).
    let m = store.metadata(&format!("xlog/{deleted}")).await.unwrap();
    assert!(m.contains_key("walhoard-writer"), "{m:?}");
    assert_same_as_pg_wal(pg, d, store, modified).await;
    // Run again: everything is archived with the same bytes now, nothing uploaded.
    let (again, out) = archive_sync(d, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let again = again.unwrap();
    for f in again["files"].as_array().unwrap() {
        assert_eq!(f["action"], "archived", "{again:#}");
    }
    report
}

/// A daemon archiving `pg` into `storage`, with one basebackup and three finished segments
/// after it: (daemon, segments).
async fn archive_with_backup(
    pg: &PgCluster,
    d: &DaemonDir,
    storage: &Value,
) -> (Daemon, Vec<String>) {
    d.write_config(
        pg,
        storage.clone(),
        json!({"pg_data_directory": pg.data_dir()}),
    );
    let daemon = Daemon::start(d);
    wait_slot(pg, &daemon);
    d.wait_http();
    let out = basebackup_command(d).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let store = d.store(storage);
    let mut segments = Vec::new();
    for _ in 0..3 {
        load(pg, 2_000, 10);
        segments.push(switch_segment(pg));
    }
    wait_all_archived(&store, &segments, Duration::from_secs(60), &daemon).await;
    (daemon, segments)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_sync_repairs_objects_and_history_then_names_a_gap() {
    let mut pg = cluster();
    let d = DaemonDir::new();
    let storage = d.local_storage();
    let (mut daemon, segs) = archive_with_backup(&pg, &d, &storage).await;
    let store = d.store(&storage);
    // A timeline switch: the daemon archives 00000002.history and timeline 2's segments.
    pg.promote_to_new_timeline().unwrap();
    load(&pg, 2_000, 10);
    let s4 = switch_segment(&pg);
    assert!(s4.starts_with("00000002"), "{s4}");
    wait_all_archived(
        &store,
        &[s4.clone(), "00000002.history".into()],
        Duration::from_secs(90),
        &daemon,
    )
    .await;
    daemon.terminate(Duration::from_secs(30));

    store.delete("timeline/00000002.history").await.unwrap();
    let report = damage_and_repair(&pg, &d, &store, &segs[0], &segs[1]).await;
    assert_eq!(action(&report, "00000002.history")["action"], "uploaded");
    assert_same_as_pg_wal(&pg, &d, &store, "00000002.history").await;
    assert_eq!(report["chain"]["missing"], json!([]), "{report:#}");
    assert!(
        report["chain"]["checked"].as_u64().unwrap() >= 5,
        "{report:#}"
    );

    // A gap archive-sync cannot repair: the object is gone and pg_wal no longer has it.
    let gone = &segs[2];
    let aside = tempfile::tempdir().unwrap();
    let in_pg_wal = pg.wal_dir().join(gone);
    std::fs::rename(&in_pg_wal, aside.path().join(gone)).unwrap();
    store.delete(&format!("xlog/{gone}")).await.unwrap();
    let (report, out) = archive_sync(&d, &[]);
    std::fs::rename(aside.path().join(gone), &in_pg_wal).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("first gap {gone}")),
        "{}",
        text(&out)
    );
    assert_eq!(report.unwrap()["chain"]["missing"], json!([gone]));
    // --no-verify uploads (here: finds nothing to) without checking the chain.
    std::fs::rename(&in_pg_wal, aside.path().join(gone)).unwrap();
    let (report, out) = archive_sync(&d, &["--no-verify"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(report.unwrap()["chain"], Value::Null);
    // Asked to, it asks the running daemon for a new basebackup instead of failing.
    let mut daemon = Daemon::start(&d);
    d.wait_http();
    let before = walhoard::restore::list_basebackups(&store).await.unwrap();
    let (report, out) = archive_sync(&d, &["--create-new-backup-on-failure"]);
    std::fs::rename(aside.path().join(gone), &in_pg_wal).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let report = report.unwrap();
    let new = report["new_basebackup"].as_str().unwrap();
    let after = walhoard::restore::list_basebackups(&store).await.unwrap();
    assert_eq!(after.len(), before.len() + 1);
    assert!(after.iter().any(|b| b.name == new), "{report:#}");
    assert!(
        daemon.log_text().contains(new),
        "the daemon did not take {new}:\n{}",
        daemon.log_text()
    );
    daemon.terminate(Duration::from_secs(30));
    pg.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_sync_repairs_an_s3_archive() {
    let mut s3 = walhoard_testkit::s3::S3Server::start("wal").unwrap();
    let mut pg = cluster();
    let d = DaemonDir::new();
    let storage = DaemonDir::s3_storage(s3.port, "wal");
    let (mut daemon, segs) = archive_with_backup(&pg, &d, &storage).await;
    daemon.terminate(Duration::from_secs(30));
    let store = d.store(&storage);
    let report = damage_and_repair(&pg, &d, &store, &segs[2], &segs[0]).await;
    assert_eq!(report["chain"]["missing"], json!([]), "{report:#}");
    pg.stop().unwrap();
    s3.stop();
}

/// archive-sync refuses a server whose cluster is not the one whose WAL the archive holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_sync_refuses_another_clusters_archive() {
    let mut pg = cluster();
    let d = DaemonDir::new();
    let storage = d.local_storage();
    let (mut daemon, _) = archive_with_backup(&pg, &d, &storage).await;
    daemon.terminate(Duration::from_secs(30));
    pg.stop().unwrap();
    let mut other = cluster();
    d.write_config(
        &other,
        storage.clone(),
        json!({"pg_data_directory": other.data_dir()}),
    );
    let listed_before = d.store(&storage).list("xlog").await.unwrap();
    let (_, out) = archive_sync(&d, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("another cluster"), "{}", text(&out));
    assert_eq!(d.store(&storage).list("xlog").await.unwrap(), listed_before);
    other.stop().unwrap();
}
