//! Issue 16, parts 1 and 2: partial WAL objects (`partial_wal_upload_interval`) bound the
//! archive's data-loss window in seconds, and restore serves a segment that is not complete
//! from them. Real PostgreSQL 15, the real daemon, local storage.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::json;
use walhoard::storage::ObjectStore;
use walhoard_protocol::Lsn;

use crate::daemon_support::*;
use crate::restore::{
    get_basebackup, insert, pgbench, primary, primary_on, start_promoted, stderr, Primary,
};

/// The partial objects in the store: key → stored bytes.
pub(crate) async fn partial_objects(store: &ObjectStore) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for o in store.list("xlog_partial").await.unwrap() {
        let (bytes, _) = store.get_bytes(&o.key).await.unwrap();
        out.insert(o.key, bytes);
    }
    out
}

/// The segment being written and the server's flush position.
pub(crate) fn current(pg: &walhoard_testkit::PgCluster) -> (String, Lsn) {
    let row = pg
        .psql("select pg_walfile_name(pg_current_wal_flush_lsn()) || ' ' || pg_current_wal_flush_lsn()")
        .unwrap();
    let mut it = row.split_whitespace();
    let seg = it.next().unwrap().to_string();
    let lsn: Lsn = it.next().unwrap().parse().unwrap();
    (seg, lsn)
}

pub(crate) fn durable_lsn(p: &Primary) -> Option<Lsn> {
    p.d.state()?["backup_sites"]["main"]["walreceiver"]["durable_lsn"]
        .as_str()?
        .parse()
        .ok()
}

/// Waits until the partial objects under `dir` reach offset `end`; returns all of them.
pub(crate) async fn wait_parts_up_to(
    p: &Primary,
    dir: &str,
    end: u64,
) -> BTreeMap<String, Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let objs = partial_objects(&p.store).await;
        let reached = objs
            .keys()
            .filter(|k| k.starts_with(dir))
            .map(|k| range(k).1)
            .max();
        if reached.is_some_and(|e| e >= end) {
            return objs;
        }
        assert!(
            Instant::now() < deadline,
            "no partial objects up to offset {end:#x} in {dir}: {:?}\n{}",
            objs.keys(),
            p.daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The ranges of the parts under `dir`, in order, asserted to tile the segment from offset 0
/// without gap or overlap.
pub(crate) fn tiling(parts: &BTreeMap<String, Vec<u8>>, dir: &str) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = parts
        .keys()
        .filter(|k| k.starts_with(dir))
        .map(|k| range(k))
        .collect();
    ranges.sort();
    assert_eq!(ranges.first().map(|r| r.0), Some(0), "{ranges:?}");
    for w in ranges.windows(2) {
        assert_eq!(w[0].1, w[1].0, "not one run without overlap: {ranges:?}");
    }
    ranges
}

/// The offsets `from-to` of a partial object key.
pub(crate) fn range(key: &str) -> (u64, u64) {
    let (a, b) = key.rsplit('/').next().unwrap().split_once('-').unwrap();
    (
        u64::from_str_radix(a, 16).unwrap(),
        u64::from_str_radix(b, 16).unwrap(),
    )
}

pub(crate) fn restore_command(p: &Primary, xlog: &str, output: &Path) -> Output {
    restore_command_via(p, xlog, output, Via::Store)
}

/// Where restore_command gets the file: the store itself, or the daemon's archive endpoint.
#[derive(Clone, Copy, Debug)]
enum Via {
    Store,
    Daemon,
}

fn restore_command_via(p: &Primary, xlog: &str, output: &Path, via: Via) -> Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_walhoard"));
    c.args(["postgres-command", "--mode", "restore", "--site", "main"])
        .args(["--xlog", xlog, "--output"])
        .arg(output);
    match via {
        Via::Store => c.arg("--config").arg(p.d.config_path()),
        Via::Daemon => c.args(["--port", &p.d.http_port.to_string()]),
    };
    c.output().unwrap()
}

/// Destroys the primary as a lost machine would (kill -9 of the postmaster and the daemon,
/// data directory deleted), restores the latest basebackup and recovers through the archive.
pub(crate) fn lose_primary_and_restore(
    p: &mut Primary,
    work: &Path,
) -> walhoard_testkit::PgCluster {
    p.pg.kill9();
    p.daemon.kill9();
    std::fs::remove_dir_all(p.pg.data_dir()).unwrap();
    let target = work.join("restored");
    let out = get_basebackup(&p.d, &target, &["--restore-to-primary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    start_promoted(&target)
}

/// A quiet database: one small commit, nothing after it, so its segment never fills. Twice
/// the interval later the machine is lost; the restore brings the commit back.
async fn quiet_commit_survives(mut p: Primary, interval: f64) {
    p.archive_all().await;
    p.pg.psql("insert into r (batch, v) values ('quiet', 'one small commit')")
        .unwrap();
    let (_, commit) = current(&p.pg);
    std::thread::sleep(Duration::from_secs_f64(2.0 * interval));
    let durable = durable_lsn(&p);
    eprintln!(
        "commit at {commit}, durable_lsn {durable:?} after {}s",
        2.0 * interval
    );
    let work = tempfile::tempdir().unwrap();
    let restored = lose_primary_and_restore(&mut p, work.path());
    assert_eq!(
        restored
            .psql("select count(*) from r where batch = 'quiet'")
            .unwrap()
            .trim(),
        "1",
        "the commit is lost; restored log:\n{}",
        restored.log()
    );
    assert!(
        durable.is_some_and(|d| d >= commit),
        "durable_lsn {durable:?} < {commit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_wal_quiet_database_commit_survives_loss_of_the_primary() {
    let p = primary(json!({ "partial_wal_upload_interval": 1 })).await;
    quiet_commit_survives(p, 1.0).await;
}

/// The same through S3 (s3s-fs on loopback): partial objects stored and listed there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_wal_quiet_database_commit_survives_loss_of_the_primary_s3() {
    let s3 = walhoard_testkit::s3::S3Server::start("wal").unwrap();
    let storage = json!({
        "storage_type": "s3", "region": "us-east-1", "bucket_name": "wal",
        "host": "127.0.0.1", "port": s3.port, "is_secure": false,
        "aws_access_key_id": walhoard_testkit::s3::ACCESS_KEY,
        "aws_secret_access_key": walhoard_testkit::s3::SECRET_KEY,
    });
    let p = primary_on(|_| storage, json!({ "partial_wal_upload_interval": 1 })).await;
    quiet_commit_survives(p, 1.0).await;
}

/// Numbered rows, one transaction each, each acknowledged commit recorded; the machine is
/// lost mid-stream. Every row acknowledged more than the interval before the loss is restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_wal_async_loses_at_most_the_interval() {
    let interval = 2.0;
    let mut p = primary(json!({ "partial_wal_upload_interval": interval })).await;
    p.archive_all().await;
    p.pg.psql("create table n (id int primary key)").unwrap();
    let mut acked: Vec<(u32, Instant)> = Vec::new();
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(8) {
        i += 1;
        p.pg.psql(&format!("insert into n values ({i})")).unwrap();
        acked.push((i, Instant::now()));
    }
    let killed = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let restored = lose_primary_and_restore(&mut p, work.path());
    let max: u32 = restored
        .psql("select coalesce(max(id), 0) from n")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let count: u32 = restored
        .psql("select count(*) from n")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(count, max, "rows missing below the last restored one");
    let lost_window = acked
        .iter()
        .find(|(id, _)| *id > max)
        .map_or(Duration::ZERO, |(_, t)| killed.duration_since(*t));
    eprintln!(
        "{} rows acknowledged, {max} restored; measured loss window {:.2}s (interval {interval}s)",
        acked.len(),
        lost_window.as_secs_f64()
    );
    for (id, t) in &acked {
        if killed.duration_since(*t) > Duration::from_secs_f64(interval) {
            assert!(
                *id <= max,
                "row {id} acknowledged {:?} before the loss is missing (restored up to {max})",
                killed.duration_since(*t)
            );
        }
    }
}

/// Partial objects: only new bytes each, the usual metadata, byte-identical to pg_wal when
/// served by restore_command (zero-filled), immutable across a kill -9 and restart of the
/// daemon (identical ranges not uploaded again), a damaged one is exit 255, a missing chain
/// exit 1, and all are deleted once the complete segment is archived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_wal_objects_immutable_served_and_deleted_after_the_segment() {
    let interval = 1.0;
    // The daemon's archive endpoint restores only into the site's pg_data_directory.
    let out_dir = tempfile::tempdir().unwrap();
    let mut p = primary(json!({
        "partial_wal_upload_interval": interval,
        "pg_data_directory": out_dir.path(),
    }))
    .await;
    p.archive_all().await;
    for i in 0..3 {
        insert(&p.pg, &format!("p{i}"), 50);
        std::thread::sleep(Duration::from_secs_f64(interval));
    }
    let (seg, lsn) = current(&p.pg);
    let seg_start = Lsn(lsn.0 & !((16u64 << 20) - 1));
    let dir = format!("xlog_partial/{seg}/");
    let wanted_end = lsn.0 - seg_start.0;
    let store = p.store.clone();
    let before = wait_parts_up_to(&p, &dir, wanted_end).await;
    // Only new bytes each: the ranges of the segment tile it from 0 without overlap.
    let ranges = tiling(&before, &dir);
    assert!(ranges.len() >= 2, "{ranges:?}");
    // The usual metadata, and the LSN range.
    let first_key = format!("{dir}{:08X}-{:08X}", ranges[0].0, ranges[0].1);
    let m = store.metadata(&first_key).await.unwrap();
    for k in [
        "hash",
        "hash-algorithm",
        "compression-algorithm",
        "encryption-key-id",
        "original-file-size",
        "wal-segment-size",
        "walhoard-writer",
    ] {
        assert!(m.contains_key(k), "{k} missing: {m:?}");
    }
    assert_eq!(m["start-lsn"], seg_start.to_string());
    assert_eq!(m["end-lsn"], (seg_start + ranges[0].1).to_string());
    assert_eq!(m["original-file-size"], ranges[0].1.to_string());

    // restore_command serves the prefix, zero-filled: byte-identical to pg_wal up to the
    // chain's end, zeros after.
    let pg_wal = out_dir.path().join("pg_wal");
    std::fs::create_dir(&pg_wal).unwrap();
    let output = pg_wal.join("RECOVERYXLOG");
    let end = ranges.last().unwrap().1 as usize;
    let live = std::fs::read(p.pg.wal_dir().join(&seg)).unwrap();
    for via in [Via::Store, Via::Daemon] {
        let out = restore_command_via(&p, &seg, &output, via);
        assert_eq!(out.status.code(), Some(0), "{via:?}: {}", stderr(&out));
        let served = std::fs::read(&output).unwrap();
        assert_eq!(served.len(), 16 << 20);
        assert!(
            served[..end] == live[..end],
            "{via:?}: served prefix differs from pg_wal"
        );
        assert!(
            served[end..].iter().all(|b| *b == 0),
            "{via:?}: not zero-filled"
        );
        std::fs::remove_file(&output).unwrap();
    }

    // kill -9 of the daemon, more WAL, restart: the stored ranges are compared, not uploaded
    // again, and the new bytes continue the chain.
    p.daemon.kill9();
    insert(&p.pg, "after-kill", 50);
    let (_, lsn2) = current(&p.pg);
    p.daemon = Daemon::start(&p.d);
    let after = wait_parts_up_to(&p, &dir, lsn2.0 - seg_start.0).await;
    for (k, bytes) in &before {
        assert!(after.get(k) == Some(bytes), "{k} was rewritten or removed");
    }
    for k in after.keys().filter(|k| !before.contains_key(*k)) {
        assert!(
            range(k).0 >= end as u64,
            "{k} overlaps what was stored before the kill"
        );
    }

    // A damaged partial object: 255. The daemon is stopped first (it would not rewrite it:
    // its recorded hash is of the plain bytes, still the same).
    p.daemon.kill9();
    let mut damaged = after[&first_key].clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x40;
    let meta = store.metadata(&first_key).await.unwrap();
    store.put_bytes(&first_key, &damaged, &meta).await.unwrap();
    let out = restore_command(&p, &seg, &output);
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    assert!(stderr(&out).contains(&first_key), "{}", stderr(&out));
    assert!(!output.exists());
    // No chain from offset 0: not found, 1.
    store.delete(&first_key).await.unwrap();
    let out = restore_command(&p, &seg, &output);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    store
        .put_bytes(&first_key, &after[&first_key], &meta)
        .await
        .unwrap();

    // The complete segment lands: its partial objects are deleted.
    p.daemon = Daemon::start(&p.d);
    let done = switch_segment(&p.pg);
    assert_eq!(done, seg);
    wait_archived(&store, &seg, Duration::from_secs(60), &p.daemon).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut gone = false;
    while !gone && Instant::now() < deadline {
        gone = store
            .list(dir.trim_end_matches('/'))
            .await
            .unwrap()
            .is_empty();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        gone,
        "partial objects of {seg} left after it was archived:\n{}",
        p.daemon.log_text()
    );
    // The state file carries the durable end (at least the archived one) and the window.
    let seg_end = seg_start + (16u64 << 20);
    let deadline = Instant::now() + Duration::from_secs(30);
    while durable_lsn(&p).is_none_or(|d| d < seg_end) {
        assert!(Instant::now() < deadline, "durable_lsn: {:?}", p.d.state());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let state = p.d.state().unwrap();
    assert!(state["backup_sites"]["main"]["walreceiver"]["undurable_age_seconds"].is_number());
    // And GET /status, the same values live.
    p.d.wait_http();
    let (code, body) = walhoard::api_client::request(
        "127.0.0.1",
        p.d.http_port,
        hyper::Method::GET,
        "/status",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(code, hyper::StatusCode::OK, "{body}");
    let live: serde_json::Value = serde_json::from_str(&body).unwrap();
    let w = &live["backup_sites"]["main"]["walreceiver"];
    let live_durable: Lsn = w["durable_lsn"].as_str().unwrap().parse().unwrap();
    assert!(live_durable >= seg_end, "{w}");
    assert!(w["undurable_age_seconds"].as_f64().is_some(), "{w}");
}

fn wal_counter(p: &Primary, name: &str) -> u64 {
    p.d.state()
        .and_then(|s| s["backup_sites"]["main"]["walreceiver"][name].as_u64())
        .unwrap_or(0)
}

/// Issue 16's measurement (docs/benchmarks.md; run with `--ignored --nocapture`): plain bytes
/// uploaded in partial objects per byte of WAL written, on a quiet workload (one small
/// commit a second) and a busy one (pgbench), with the default interval (5 s), and the
/// stored size of the quiet run's objects (per-object overhead: encryption, zstd frame).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn partial_wal_upload_amplification() {
    let p = primary(json!({})).await;
    p.archive_all().await;
    p.pg.psql("create table q (id int)").unwrap();
    std::thread::sleep(Duration::from_secs(6));
    let lsn = |p: &Primary| current(&p.pg).1;
    let (start, bytes0) = (lsn(&p), wal_counter(&p, "partial_bytes_uploaded"));
    let objects0 = wal_counter(&p, "partial_objects_uploaded");
    for i in 0..60 {
        p.pg.psql(&format!("insert into q values ({i})")).unwrap();
        std::thread::sleep(Duration::from_secs(1));
    }
    std::thread::sleep(Duration::from_secs(6));
    let wal = lsn(&p).0 - start.0;
    let up = wal_counter(&p, "partial_bytes_uploaded") - bytes0;
    let objects = wal_counter(&p, "partial_objects_uploaded") - objects0;
    let listed = p.store.list("xlog_partial").await.unwrap();
    let stored: u64 = listed.iter().map(|o| o.size).sum();
    let plain: u64 = listed
        .iter()
        .map(|o| range(&o.key))
        .map(|(a, b)| b - a)
        .sum();
    eprintln!(
        "quiet: WAL {wal} B, partial plain {up} B in {objects} objects = {:.3}x; all partial objects now stored: {} objects, {plain} B plain, {stored} B stored ({:.0} B/object overhead)",
        up as f64 / wal as f64,
        listed.len(),
        (stored as f64 - plain as f64) / listed.len().max(1) as f64,
    );

    p.archive_all().await;
    let (start, bytes0) = (lsn(&p), wal_counter(&p, "partial_bytes_uploaded"));
    let objects0 = wal_counter(&p, "partial_objects_uploaded");
    let files0 = wal_counter(&p, "files_archived");
    pgbench(&p.pg, &["-i", "-s", "5", "-q"]);
    pgbench(&p.pg, &["-n", "-c", "4", "-T", "30"]);
    std::thread::sleep(Duration::from_secs(6));
    let wal = lsn(&p).0 - start.0;
    let up = wal_counter(&p, "partial_bytes_uploaded") - bytes0;
    let objects = wal_counter(&p, "partial_objects_uploaded") - objects0;
    let files = wal_counter(&p, "files_archived") - files0;
    eprintln!(
        "busy: WAL {wal} B, {files} segments archived, partial plain {up} B in {objects} objects = {:.3}x on top of the segments ({:.3}x in all)",
        up as f64 / wal as f64,
        1.0 + up as f64 / wal as f64,
    );
}

/// A standby replaying the archive alone (no primary_conninfo) is served the segment being
/// written from its partial objects, and, asking for it again, the longer prefix stored later:
/// it sees a commit made after it started, with the segment still incomplete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_wal_standby_replaying_the_archive_gets_the_longer_prefix() {
    let p = primary(json!({ "partial_wal_upload_interval": 1 })).await;
    p.archive_all().await;
    let wait_durable = |what: &str| {
        let (_, lsn) = current(&p.pg);
        assert!(
            crate::common::wait_until(Duration::from_secs(30), || durable_lsn(&p)
                .is_some_and(|d| d >= lsn)),
            "{what}: durable_lsn {:?} never reached {lsn}",
            durable_lsn(&p)
        );
    };
    insert(&p.pg, "first", 1);
    wait_durable("first");
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("standby");
    let out = get_basebackup(&p.d, &target, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(target.join("standby.signal").exists());
    let standby = walhoard_testkit::PgCluster::builder()
        .setting("wal_retrieve_retry_interval", "'200ms'")
        .start_on(&target)
        .unwrap();
    let count = |batch: &str| {
        standby
            .psql(&format!("select count(*) from r where batch = '{batch}'"))
            .map(|c| c.trim().to_string())
    };
    assert!(
        crate::common::wait_until(Duration::from_secs(60), || count("first")
            .is_ok_and(|c| c == "1")),
        "the standby did not replay the partial segment: {}",
        standby.log()
    );
    let (seg_before, _) = current(&p.pg);
    insert(&p.pg, "second", 1);
    wait_durable("second");
    assert!(
        crate::common::wait_until(Duration::from_secs(60), || count("second")
            .is_ok_and(|c| c == "1")),
        "the standby did not get the longer prefix: {}",
        standby.log()
    );
    // Still the same, unfinished segment, and still a standby.
    assert_eq!(current(&p.pg).0, seg_before);
    assert!(!has(&p.store, &seg_before).await);
    assert_eq!(
        standby.psql("select pg_is_in_recovery()").unwrap().trim(),
        "t"
    );
}

/// `kill -9` of the daemon while partial uploads run (a 0.2 s interval, commits all along),
/// five times: the segment's parts still tile it from offset 0 without overlap, and
/// restore_command serves it byte-identical to `pg_wal` up to their end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_wal_daemon_killed_during_partial_uploads_loses_nothing() {
    let mut p = primary(json!({ "partial_wal_upload_interval": 0.2 })).await;
    p.archive_all().await;
    insert(&p.pg, "k0", 5);
    let (seg, _) = current(&p.pg);
    let mut n = 0;
    for _ in 0..5 {
        let until = Instant::now() + Duration::from_millis(700);
        while Instant::now() < until {
            n += 1;
            insert(&p.pg, &format!("k{n}"), 5);
        }
        p.daemon.kill9();
        p.daemon = Daemon::start(&p.d);
    }
    let (seg_now, lsn) = current(&p.pg);
    assert_eq!(seg_now, seg, "the test's WAL left the segment");
    let seg_start = Lsn(lsn.0 & !((16u64 << 20) - 1));
    let dir = format!("xlog_partial/{seg}/");
    let parts = wait_parts_up_to(&p, &dir, lsn.0 - seg_start.0).await;
    let ranges = tiling(&parts, &dir);
    let end = ranges.last().unwrap().1 as usize;
    let out_dir = tempfile::tempdir().unwrap();
    let output = out_dir.path().join("RECOVERYXLOG");
    let out = restore_command(&p, &seg, &output);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let served = std::fs::read(&output).unwrap();
    let live = std::fs::read(p.pg.wal_dir().join(&seg)).unwrap();
    assert!(
        served[..end] == live[..end],
        "served prefix differs from pg_wal"
    );
    eprintln!("{n} commits, {} parts over 5 kills", ranges.len());
}
