//! `walhoard archive-cleanup` and backup preservation on a daemon-made archive of a real
//! PostgreSQL 15: cleanup deletes the WAL before the oldest basebackup and nothing a kept
//! backup needs (`--dry-run` deletes nothing); a preserved backup and its WAL survive the
//! daemon's retention and cleanup until the request's date, whether walhoard's
//! `get-basebackup --preserve-until` or pghoard wrote the request.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{json, Value};
use walhoard::storage::{Metadata, ObjectStore};
use walhoard_protocol::SegmentSize;
use walhoard_testkit::PgCluster;

use crate::daemon_support::*;
use crate::retention::read_tree;

fn walhoard(d: &DaemonDir, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_walhoard"))
        .args(args)
        .arg("--config")
        .arg(d.config_path())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn cleanup(d: &DaemonDir, dry_run: bool) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walhoard"));
    cmd.args(["archive-cleanup", "--site", "main", "--json", "--config"])
        .arg(d.config_path());
    if dry_run {
        cmd.arg("--dry-run");
    }
    let out = crate::common::output_ok(&mut cmd, "archive-cleanup");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn take_backup(d: &DaemonDir, daemon: &Daemon) -> String {
    let out = basebackup_command(d).output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        daemon.log_text()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn start_segment(store: &ObjectStore, name: &str) -> String {
    walhoard::restore::list_basebackups(store)
        .await
        .unwrap()
        .into_iter()
        .find(|b| b.name == name)
        .unwrap_or_else(|| panic!("basebackup {name} not listed"))
        .start_wal_segment
}

async fn listed(store: &ObjectStore) -> Vec<String> {
    walhoard::restore::list_basebackups(store)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .collect()
}

/// Segments `from` (a segment name) up to `last` are all archived.
async fn assert_wal_complete(store: &ObjectStore, from: &str, last: &str) {
    let seg = SegmentSize::default();
    let end = contiguous_end(store, from, seg).await;
    let last_end = match last.parse::<walhoard_protocol::WalSegmentName>().unwrap() {
        walhoard_protocol::WalSegmentName::Segment(id) => id.next(seg).unwrap().start_lsn(seg),
        other => panic!("{other}"),
    }
    .unwrap();
    assert!(
        end >= last_end,
        "WAL from {from} ends at {end}, before {last} ends"
    );
}

async fn make_segments(
    pg: &PgCluster,
    store: &ObjectStore,
    daemon: &Daemon,
    n: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        load(pg, 1_000, 5);
        out.push(switch_segment(pg));
    }
    wait_all_archived(store, &out, Duration::from_secs(60), daemon).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_cleanup_and_retention_keep_what_kept_and_preserved_backups_need() {
    let mut pg = crate::daemon::cluster();
    let d = DaemonDir::new();
    let storage = d.local_storage();
    d.write_config(
        &pg,
        storage.clone(),
        json!({"basebackup_count": 1, "basebackup_count_min": 1}),
    );
    let mut daemon = Daemon::start(&d);
    wait_slot(&pg, &daemon);
    d.wait_http();
    let store = d.store(&storage);
    let early = make_segments(&pg, &store, &daemon, 2).await;
    // b1 taken with no daemon listening (by the command itself): no retention runs after it,
    // so the WAL before it is still there for archive-cleanup.
    daemon.terminate(Duration::from_secs(30));
    let b1 = take_backup(&d, &daemon);
    let mut daemon = Daemon::start(&d);
    d.wait_http();
    let b1_start = start_segment(&store, &b1).await;
    let mid = make_segments(&pg, &store, &daemon, 2).await;

    // --dry-run: names the WAL before b1's start, deletes nothing.
    let root = d.path("archive");
    let before = read_tree(&root);
    let report = cleanup(&d, true);
    assert_eq!(report["first_required"], b1_start.as_str(), "{report:#}");
    let named: Vec<&str> = report["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    for e in &early {
        assert!(
            named.contains(&format!("xlog/{e}").as_str()),
            "{e} not in {named:?}"
        );
    }
    assert!(
        named
            .iter()
            .all(|k| k.rsplit('/').next().unwrap() < b1_start.as_str()),
        "{named:?} reaches {b1_start}"
    );
    // The daemon marked all of it as walhoard's: nothing is left for being another's.
    assert_eq!(report["kept_foreign"], json!([]), "{report:#}");
    assert!(read_tree(&root) == before, "--dry-run changed the archive");
    // For real: exactly those go; the WAL b1 needs stays.
    let report = cleanup(&d, false);
    let deleted: Vec<&str> = report["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    assert_eq!(deleted, named);
    for e in &early {
        assert!(!has(&store, e).await, "{e} kept");
    }
    assert_wal_complete(&store, &b1_start, mid.last().unwrap()).await;
    // WAL before b1 that walhoard did not write (no walhoard-writer mark): named, kept.
    let foreign = format!("xlog/{}", early[0]);
    store
        .put_bytes(&foreign, b"pghoard's", &Metadata::new())
        .await
        .unwrap();
    let report = cleanup(&d, false);
    assert_eq!(report["deleted"], json!([]), "{report:#}");
    assert_eq!(report["kept_foreign"], json!([foreign]), "{report:#}");
    assert!(has(&store, &early[0]).await);

    // Preserve b1 through a restore, as pghoard_restore would, keeping the request.
    let target = tempfile::tempdir().unwrap();
    let out = walhoard(
        &d,
        &[
            "restore",
            "get-basebackup",
            "--site",
            "main",
            "--basebackup",
            &b1,
            "--target-dir",
            target.path().join("data").to_str().unwrap(),
            "--preserve-until",
            "2999-01-01",
            "--no-cancel-preserve-on-success",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    // Stored as pghoard stores it (an empty object; its name and metadata).
    let request = format!("{b1}_2999-01-01 00:00:00+00:00");
    let (body, meta) = store
        .get_bytes(&format!("preservation_request/{request}"))
        .await
        .unwrap();
    assert!(body.is_empty());
    assert_eq!(meta.get("preserve-backup"), Some(&b1));
    assert_eq!(
        meta.get("preserve-until").map(String::as_str),
        Some("2999-01-01 00:00:00+00:00")
    );

    // basebackup_count 1: the daemon's retention after b2 would delete b1; it is preserved.
    let b2 = take_backup(&d, &daemon);
    let late = make_segments(&pg, &store, &daemon, 1).await;
    assert_eq!(
        listed(&store).await,
        [b1.clone(), b2.clone()],
        "{}",
        daemon.log_text()
    );
    assert_wal_complete(&store, &b1_start, late.last().unwrap()).await;
    let report = cleanup(&d, false);
    assert_eq!(report["deleted"], json!([]), "{report:#}");
    assert_wal_complete(&store, &b1_start, late.last().unwrap()).await;

    // Cancelled (walhoard's command), and a request pghoard wrote whose date has passed: the
    // next backup's retention deletes b1 and b2.
    let out = walhoard(
        &d,
        &["restore", "preservations", "--site", "main", "--json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], request.as_str(), "{list:#}");
    let out = walhoard(
        &d,
        &[
            "restore",
            "preservations",
            "--site",
            "main",
            "--cancel",
            &request,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let mut pghoards = Metadata::new();
    pghoards.insert("preserve-backup".into(), b1.clone());
    pghoards.insert("preserve-until".into(), "2020-01-01 00:00:00+00:00".into());
    store
        .put_bytes(
            &format!("preservation_request/{b1}_2020-01-01 00:00:00+00:00"),
            b"",
            &pghoards,
        )
        .await
        .unwrap();
    let b3 = take_backup(&d, &daemon);
    assert_eq!(listed(&store).await, [b3.as_str()], "{}", daemon.log_text());
    assert!(!has(&store, &b1_start).await);
    let b3_start = start_segment(&store, &b3).await;
    let report = cleanup(&d, false);
    assert_eq!(report["first_required"], b3_start.as_str());
    daemon.terminate(Duration::from_secs(30));
    pg.stop().unwrap();
}
