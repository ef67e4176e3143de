//! Issue 16 in `walhoard verify` and `walhoard info`: the partial objects a real daemon wrote
//! (real PostgreSQL 15, local storage) are checked (they tile the segment from offset 0, each
//! reads back) and reported (count, bytes, durable end, newest); a damaged part, an
//! overlapping one, and leftovers of an archived segment are each named by their key.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use walhoard_protocol::Lsn;

use crate::daemon_support::*;
use crate::partial_wal::{current, range, tiling, wait_parts_up_to};
use crate::restore::{insert, primary};
use crate::verify::{verify_fails, verify_passes};

fn info_json(p: &crate::restore::Primary) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_walhoard"))
        .args(["info", "--json", "--config"])
        .arg(p.d.config_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0].clone()
}

fn partial_problem<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v["partial"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["key"] == key)
        .and_then(|p| p["problem"].as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_wal_verify_checks_and_info_reports_partial_objects() {
    let mut p = primary(json!({ "partial_wal_upload_interval": 1 })).await;
    p.archive_all().await;
    for i in 0..3 {
        insert(&p.pg, &format!("v{i}"), 50);
        std::thread::sleep(Duration::from_secs(1));
    }
    let (seg, lsn) = current(&p.pg);
    let seg_start = Lsn(lsn.0 & !((16u64 << 20) - 1));
    let dir = format!("xlog_partial/{seg}/");
    let parts = wait_parts_up_to(&p, &dir, lsn.0 - seg_start.0).await;
    // Frozen: nothing changes under verify.
    p.daemon.terminate(Duration::from_secs(30));
    let ranges = tiling(&parts, &dir);
    let end = ranges.last().unwrap().1;
    let durable = seg_start + end;

    // Good parts: verify passes, names the segment and its durable end, and the backup is
    // restorable into the parts (its WAL ends there).
    let config = p.d.config_path();
    let v = verify_passes(&config, &[]);
    let segs = v["partial"]["segments"].as_array().unwrap();
    assert_eq!(segs.len(), 1, "{v:#}");
    assert_eq!(segs[0]["segment"], seg.as_str());
    assert_eq!(segs[0]["parts"], ranges.len());
    assert_eq!(segs[0]["durable_to"], durable.to_string(), "{v:#}");
    assert_eq!(
        v["backups"][0]["restorable_to"],
        durable.to_string(),
        "{v:#}"
    );
    // info: count, bytes, durable end of the timeline, the newest part.
    let i = info_json(&p);
    let po = &i["partial_objects"];
    assert_eq!(po["objects"], parts.len(), "{i:#}");
    assert_eq!(po["plain_bytes"], end, "{i:#}");
    let stored: usize = parts.values().map(Vec::len).sum();
    assert_eq!(po["stored_bytes"], stored, "{i:#}");
    assert_eq!(po["durable_end"][0]["timeline"], 1);
    assert_eq!(po["durable_end"][0]["durable_lsn"], durable.to_string());
    assert!(
        po["newest"]["key"]
            .as_str()
            .is_some_and(|k| k.starts_with(&dir)),
        "{i:#}"
    );
    assert_eq!(po["leftover_objects"], 0);

    // A damaged part (its bytes changed, its metadata kept): named, exit 1.
    let store = p.store.clone();
    let (a, b) = ranges[ranges.len() / 2];
    let victim = format!("{dir}{a:08X}-{b:08X}");
    let good = parts[&victim].clone();
    let meta = store.metadata(&victim).await.unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    store.put_bytes(&victim, &bad, &meta).await.unwrap();
    let v = verify_fails(&config, &[]);
    assert!(partial_problem(&v, &victim).is_some(), "{v:#}");
    // The parts before it still count: the durable end stops at the damaged one.
    assert_eq!(
        v["partial"]["segments"][0]["durable_to"],
        (seg_start + a).to_string(),
        "{v:#}"
    );
    store.put_bytes(&victim, &good, &meta).await.unwrap();
    verify_passes(&config, &[]);

    // A part overlapping the run (never written by walhoard): named.
    let first = format!("{dir}{:08X}-{:08X}", ranges[0].0, ranges[0].1);
    let overlap = format!("{dir}00000008-{:08X}", ranges[0].1);
    let first_meta = store.metadata(&first).await.unwrap();
    store
        .put_bytes(&overlap, &parts[&first], &first_meta)
        .await
        .unwrap();
    let v = verify_fails(&config, &[]);
    assert!(
        partial_problem(&v, &overlap).is_some_and(|t| t.contains("overlap")),
        "{v:#}"
    );
    store.delete(&overlap).await.unwrap();

    // The segment archived complete: the daemon deletes its parts; one put back is a
    // leftover, reported, not a problem.
    p.daemon = Daemon::start(&p.d);
    assert_eq!(switch_segment(&p.pg), seg);
    wait_archived(&store, &seg, Duration::from_secs(60), &p.daemon).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !store
        .list(dir.trim_end_matches('/'))
        .await
        .unwrap()
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "parts of {seg} left after it was archived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    p.daemon.terminate(Duration::from_secs(30));
    store
        .put_bytes(&first, &parts[&first], &first_meta)
        .await
        .unwrap();
    let v = verify_passes(&config, &[]);
    assert_eq!(v["partial"]["leftovers"], json!([first]), "{v:#}");
    assert!(v["partial"]["segments"].as_array().unwrap().is_empty());
    let i = info_json(&p);
    assert_eq!(i["partial_objects"]["leftover_objects"], 1, "{i:#}");
    assert_eq!(range(&first).0, 0);
}
