//! Issue 16: a synchronous site on local storage stores its partial WAL as records of one
//! part log per segment (`xlog_partial/<segment>/log`, docs/formats.md). A torn tail (a write
//! never acknowledged) is the log's end: restore serves the records before it and a restarted
//! daemon overwrites it; a damaged record with valid ones after it is damage: restore_command
//! exits 255 and verify names it. Real PostgreSQL, the real daemon, local storage.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use serde_json::json;
use walhoard::daemon::partial::log::{scan, End, Scan};
use walhoard_protocol::Lsn;

use crate::daemon_support::Daemon;
use crate::partial_wal::{current, restore_command};
use crate::restore::{primary, stderr, Primary};
use crate::sync_archive::{every_acknowledged_commit_survives, make_synchronous, Run};

/// A synchronous primary on local storage with `commits` small commits acknowledged in the
/// segment being written; the daemon stopped (`kill -9`) so that nothing changes under the
/// test. Returns the segment, the last commit's LSN and the path of its part log.
async fn logged_commits(commits: u32) -> (Primary, String, Lsn, PathBuf) {
    let mut p = primary(json!({ "synchronous_archive": true })).await;
    p.archive_all().await;
    p.pg.psql("create table n (id int primary key)").unwrap();
    make_synchronous(&p.pg, "walhoard_main");
    let (seg0, _) = current(&p.pg);
    for i in 0..commits {
        // Each returns only once its WAL is a record of the log.
        p.pg.psql(&format!("insert into n values ({i})")).unwrap();
    }
    let (seg, lsn) = current(&p.pg);
    assert_eq!(seg, seg0, "the commits left the segment");
    p.daemon.kill9();
    let key = format!("xlog_partial/{seg}/log");
    let path = p.store.local_file(&key).unwrap().unwrap().0;
    (p, seg, lsn, path)
}

fn scan_log(path: &PathBuf) -> Scan {
    scan(&std::fs::File::open(path).unwrap()).unwrap().unwrap()
}

fn seg_offset(lsn: Lsn) -> u64 {
    lsn.0 & ((16u64 << 20) - 1)
}

/// Serves `seg` with restore_command; asserts it exits 0 and serves pg_wal's bytes up to
/// `end`.
fn served_matches(p: &Primary, seg: &str, end: u64) {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("RECOVERYXLOG");
    let out = restore_command(p, seg, &out_path);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let served = std::fs::read(&out_path).unwrap();
    let live = std::fs::read(p.pg.wal_dir().join(seg)).unwrap();
    let end = end as usize;
    assert!(
        served[..end] == live[..end],
        "served prefix differs from pg_wal"
    );
}

/// A torn tail (half a record after the last valid one) ends the log: restore serves every
/// acknowledged commit; a restarted daemon finds the valid end, overwrites the tail and
/// appends the next commits there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn part_log_torn_tail_is_ignored_by_restore_and_overwritten_by_the_daemon() {
    let (mut p, seg, lsn, path) = logged_commits(20).await;
    let s = scan_log(&path);
    assert_eq!(s.how, End::Clean);
    assert!(s.damage.is_none());
    assert!(s.records.len() >= 10, "{} records", s.records.len());
    let end = s.records.last().unwrap().range.to;
    assert!(end >= seg_offset(lsn), "acknowledged WAL not in the log");
    // Half a record: its head and some garbage, no CRC.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    let mut torn = b"WHRC".to_vec();
    torn.extend_from_slice(&4000u32.to_le_bytes());
    torn.extend_from_slice(&end.to_le_bytes());
    torn.extend_from_slice(&(end + 0x100).to_le_bytes());
    torn.extend_from_slice(&[0x5A; 300]);
    f.write_all_at(&torn, s.end).unwrap();
    let torn_scan = scan_log(&path);
    assert!(matches!(torn_scan.how, End::Torn(_)), "{:?}", torn_scan.how);
    assert_eq!(torn_scan.records.len(), s.records.len());
    served_matches(&p, &seg, end);

    // Restarted: the tail is overwritten by the next commits' records.
    p.daemon = Daemon::start(&p.d);
    make_synchronous(&p.pg, "walhoard_main");
    for i in 100..110 {
        p.pg.psql(&format!("insert into n values ({i})")).unwrap();
    }
    let (seg2, lsn2) = current(&p.pg);
    assert_eq!(seg2, seg);
    p.daemon.kill9();
    let after = scan_log(&path);
    assert_eq!(after.how, End::Clean, "{:?}", after.how);
    assert!(after.damage.is_none());
    assert!(after.records.len() > s.records.len());
    assert_eq!(
        after.records[s.records.len()].at,
        s.end,
        "the next record is not where the torn one was"
    );
    assert_eq!(&after.records[..s.records.len()], &s.records[..]);
    let end2 = after.records.last().unwrap().range.to;
    assert!(end2 >= seg_offset(lsn2));
    served_matches(&p, &seg, end2);
}

/// A record damaged in the middle of the log (valid records after it) is damage, not the
/// log's end: restore_command exits 255 and verify names the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn part_log_damaged_record_fails_restore_and_verify() {
    let (p, seg, _, path) = logged_commits(12).await;
    let s = scan_log(&path);
    assert!(s.records.len() >= 6);
    let victim = s.records[3];
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let at = victim.at + victim.len - 8;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
    let d = scan_log(&path).damage.expect("damage found");
    assert_eq!(d.at, victim.at);

    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("RECOVERYXLOG");
    let out = restore_command(&p, &seg, &out_path);
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("xlog_partial/") && err.contains("log record"),
        "{err}"
    );
    assert!(!out_path.exists());

    let v = crate::verify::verify_fails(&p.d.config_path(), &[]);
    let problems = v["partial"]["problems"].as_array().unwrap();
    let named = format!("xlog_partial/{seg}/log record at byte {}", victim.at);
    assert!(
        problems
            .iter()
            .any(|q| q["key"].as_str().is_some_and(|k| k.starts_with(&named))),
        "verify does not name {named}: {problems:?}"
    );
}

/// kill -9 of the daemon, three times, while pgbench and a client committing numbered rows
/// run on a synchronous site on local storage; then the primary is lost: every acknowledged
/// row and every transaction pgbench counted is restored (the zero-loss test's run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn part_log_daemon_killed_under_pgbench_loses_no_acknowledged_commit() {
    let p = primary(json!({ "synchronous_archive": true })).await;
    every_acknowledged_commit_survives(p, Run::LocalLogDaemonKilled(3)).await;
}
