//! `walhoard daemon` end to end: the real binary streaming a real cluster's WAL through zstd +
//! encryption into real storage, checked against the server's own pg_wal and pg_waldump.

use std::time::Duration;

use serde_json::json;
use walhoard_protocol::{SegmentSize, WalSegmentName};
use walhoard_testkit::PgCluster;

use crate::common::wait_until;
use crate::daemon_support::*;

/// A cluster that keeps its WAL around (so the test can compare) and times out quiet
/// walsenders quickly.
pub(crate) fn cluster() -> PgCluster {
    PgCluster::builder()
        .setting("wal_keep_size", "'2GB'")
        .setting("wal_sender_timeout", "'10s'")
        .start()
        .unwrap()
}

/// Every archived segment from `first` on is byte-identical to pg_wal's copy.
pub(crate) async fn assert_archive_equals_pg_wal(
    pg: &PgCluster,
    d: &DaemonDir,
    store: &walhoard::storage::ObjectStore,
    names: &[String],
) {
    let out = tempfile::tempdir().unwrap();
    for name in names {
        let restored = restore(store, &d.ring(), &format!("xlog/{name}"), out.path()).await;
        let ours = std::fs::read(&restored).unwrap();
        let theirs = std::fs::read(pg.wal_dir().join(name)).unwrap();
        assert!(ours == theirs, "archived {name} differs from pg_wal");
        std::fs::remove_file(restored).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_archive_is_byte_identical_and_readable_by_pg_waldump() {
    let pg = cluster();
    let (d, daemon, store, first) = LocalDaemon::streaming(&pg);
    // Small transactions make XLogData messages end anywhere, including across segment
    // boundaries; the bulk load fills several segments.
    load(&pg, 150_000, 3000);
    let last = switch_segment(&pg);
    wait_archived(&store, &last, Duration::from_secs(120), &daemon).await;
    let segs = archived_segments(&store).await;
    let names: Vec<String> = segs
        .keys()
        .filter(|n| n.as_str() >= first.as_str() && n.as_str() <= last.as_str())
        .cloned()
        .collect();
    assert!(names.len() >= 4, "only {names:?} archived");
    let seg = SegmentSize::DEFAULT;
    let end = contiguous_end(&store, &first, seg).await;
    assert!(
        end.segment_number(seg)
            > last
                .parse::<WalSegmentName>()
                .unwrap()
                .segment()
                .unwrap()
                .segno(seg)
                .unwrap(),
        "archive has a gap before {end}"
    );
    assert_archive_equals_pg_wal(&pg, &d, &store, &names).await;

    // pg_waldump reads the archive's decompressed copies from first to last (where a
    // pg_waldump of the server's major is at hand: it reads only its own major's WAL).
    if walhoard_testkit::tool_matches_major("pg_waldump", pg.major) {
        let dump_dir = pg.scratch_dir("waldump").unwrap();
        for n in &names {
            restore(&store, &d.ring(), &format!("xlog/{n}"), &dump_dir).await;
        }
        let out = pg
            .run_tool(
                "pg_waldump",
                &[
                    "--stats".as_ref(),
                    "-p".as_ref(),
                    dump_dir.as_os_str(),
                    names[0].as_ref(),
                    names[names.len() - 1].as_ref(),
                ],
            )
            .unwrap();
        assert!(out.contains("Total"), "pg_waldump: {out}");
    } else {
        println!(
            "no pg_waldump for PostgreSQL {}: byte comparison only",
            pg.major
        );
    }

    // The slot followed the archive: never past it (at most into the first segment it lacks,
    // which the server keeps whole), and not stuck behind it.
    let restart = slot_restart(&pg).unwrap();
    let end = contiguous_end(&store, &first, seg).await;
    assert!(
        restart.segment_start(seg) <= end,
        "slot at {restart} is past the archive's end {end}"
    );
    assert!(
        wait_until(Duration::from_secs(20), || slot_restart(&pg).unwrap()
            >= last
                .parse::<WalSegmentName>()
                .unwrap()
                .segment()
                .unwrap()
                .start_lsn(seg)
                .unwrap()),
        "slot stuck at {:?}",
        slot_restart(&pg)
    );

    // Metadata and the state file tell what happened.
    let meta = store.metadata(&format!("xlog/{last}")).await.unwrap();
    assert_eq!(meta["compression-algorithm"], "zstd");
    assert_eq!(meta["encryption-key-id"], "k1");
    assert_eq!(meta["original-file-size"], (16u64 << 20).to_string());
    // The state file is rewritten every second.
    let want = names.len() as u64;
    assert!(
        wait_until(Duration::from_secs(10), || d.state().is_some_and(|s| {
            let wal = &s["backup_sites"]["main"]["walreceiver"];
            wal["connected"] == true && wal["files_archived"].as_u64().unwrap_or(0) >= want
        })),
        "state file: {:?}",
        d.state()
    );
    let state = d.state().unwrap();
    let wal = &state["backup_sites"]["main"]["walreceiver"];
    let archived: walhoard_protocol::Lsn = wal["archived_lsn"].as_str().unwrap().parse().unwrap();
    assert!(
        archived <= contiguous_end(&store, &first, seg).await,
        "{state}"
    );
    assert_eq!(wal["timeline"], 1);
}

/// Segment names from `first` to `last` (inclusive) on `first`'s timeline.
pub(crate) fn segment_range(first: &str, last: &str, seg: SegmentSize) -> Vec<String> {
    let mut id = first.parse::<WalSegmentName>().unwrap().segment().unwrap();
    let mut out = Vec::new();
    loop {
        let n = id.to_string();
        let done = n == last;
        out.push(n);
        if done || out.len() > 10_000 {
            return out;
        }
        id = id.next(seg).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_kill_9_twenty_times_leaves_no_gap() {
    let pg = cluster();
    let (d, mut daemon, store, first) = LocalDaemon::streaming(&pg);
    let seg = SegmentSize::DEFAULT;
    let stop = std::sync::atomic::AtomicBool::new(false);
    // A pseudo-random kill schedule, different on every run, printed for reproduction.
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("kill schedule seed {seed}");
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // Throttled: the comparison needs pg_wal to keep every segment (wal_keep_size),
            // and an unthrottled loop writes gigabytes on a fast server.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                load(&pg, 10_000, 100);
                switch_segment(&pg);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        for _ in 0..20 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let ms = 200 + (seed >> 33) % 2300;
            std::thread::sleep(Duration::from_millis(ms));
            daemon.kill9();
            daemon = Daemon::start(&d);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let last = switch_segment(&pg);
    wait_archived(&store, &last, Duration::from_secs(180), &daemon).await;
    let names = segment_range(&first, &last, seg);
    assert!(names.len() >= 10, "too little WAL for the test: {names:?}");
    for n in &names {
        assert!(has(&store, n).await, "gap in the archive at {n}");
    }
    // Each segment was stored once or again with the same bytes: every copy equals pg_wal.
    assert_archive_equals_pg_wal(&pg, &d, &store, &names).await;
    let end = contiguous_end(&store, &first, seg).await;
    assert!(slot_restart(&pg).unwrap().segment_start(seg) <= end);
    assert!(
        daemon.log_text().matches("walhoard daemon started").count() >= 21,
        "not every restart got going"
    );
}

/// With `spool_fsync: auto` (the default) spool segments are not fdatasync'd: a spool left by
/// an earlier boot of the machine may have lost writes, so it must not be archived from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_distrusts_spool_written_before_a_reboot() {
    let pg = cluster();
    let (d, mut daemon, store, first) = LocalDaemon::streaming(&pg);
    let seg = SegmentSize::DEFAULT;
    load(&pg, 5_000, 10);
    let before = switch_segment(&pg);
    wait_archived(&store, &before, Duration::from_secs(60), &daemon).await;
    let spool = d.path("spool").join("main").join("xlog_incoming");
    let boot_file = spool.join("walhoard-boot-id");
    let this_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(
        std::fs::read_to_string(&boot_file).unwrap().trim(),
        this_boot.trim()
    );
    let status = daemon.terminate(Duration::from_secs(60)).unwrap();
    assert!(status.success());

    // WAL the slot holds while no daemon runs, and a spool that claims to hold it, written
    // "before a reboot": segments whose writes were lost (stale bytes where WAL should be).
    let from = pg
        .psql("select pg_walfile_name(restart_lsn + 1) from pg_replication_slots where slot_name = 'walhoard'")
        .unwrap()
        .trim()
        .to_string();
    load(&pg, 60_000, 50);
    let last = switch_segment(&pg);
    let names = segment_range(&from, &last, seg);
    assert!(names.len() >= 2, "{names:?}");
    for n in &names {
        std::fs::write(spool.join(n), vec![0x55u8; seg.bytes() as usize]).unwrap();
    }
    std::fs::write(&boot_file, "00000000-0000-0000-0000-000000000000\n").unwrap();

    let daemon = Daemon::start(&d);
    let all = segment_range(&first, &last, seg);
    wait_all_archived(&store, &all, Duration::from_secs(120), &daemon).await;
    // Received again from the slot, not taken from the stale files.
    assert_archive_equals_pg_wal(&pg, &d, &store, &names).await;
    assert!(
        daemon.log_text().contains("the machine restarted"),
        "{}",
        daemon.log_text()
    );
    assert_eq!(
        std::fs::read_to_string(&boot_file).unwrap().trim(),
        this_boot.trim()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_storage_outage_loses_nothing_and_slot_holds_wal() {
    let pg = cluster();
    let mut s3 = walhoard_testkit::s3::S3Server::start("wal").unwrap();
    let d = DaemonDir::new();
    let storage = DaemonDir::s3_storage(s3.port, "wal");
    d.write_config(&pg, storage.clone(), json!({}));
    let daemon = Daemon::start(&d);
    let store = d.store(&storage);
    let first = wait_slot(&pg, &daemon);
    let seg = SegmentSize::DEFAULT;
    load(&pg, 30_000, 100);
    let before = switch_segment(&pg);
    wait_archived(&store, &before, Duration::from_secs(60), &daemon).await;
    let archive_end = contiguous_end(&store, &first, seg).await;

    // The store goes away for more than a minute while WAL keeps coming.
    s3.stop();
    let outage = std::time::Instant::now();
    load(&pg, 100_000, 500);
    let last = switch_segment(&pg);
    let alert = d.alert_dir().join("upload_retries_warning");
    let mut max_restart = slot_restart(&pg).unwrap();
    while outage.elapsed() < Duration::from_secs(65) {
        let r = slot_restart(&pg).unwrap();
        assert!(
            r.segment_start(seg) <= archive_end,
            "slot advanced to {r} past the archive's end {archive_end} during the outage"
        );
        max_restart = max_restart.max(r);
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        alert.exists(),
        "no upload_retries_warning alert during the outage"
    );
    let state = d.state().unwrap();
    assert!(
        state["backup_sites"]["main"]["walreceiver"]["archive_lag_bytes"]
            .as_u64()
            .unwrap()
            > 16 << 20,
        "{state}"
    );

    // SIGTERM while uploads cannot finish: the daemon still stops (after the drain timeout),
    // leaving the backlog in the spool and the slot; a new daemon picks it up.
    let mut daemon = daemon;
    let stopped = std::time::Instant::now();
    let status = daemon
        .terminate(Duration::from_secs(60))
        .expect("no exit on SIGTERM during the outage");
    assert!(status.success(), "exit {status:?}: {}", daemon.log_text());
    assert!(stopped.elapsed() < Duration::from_secs(45));
    assert!(slot_restart(&pg).unwrap().segment_start(seg) <= archive_end);
    let daemon = Daemon::start(&d);

    // The store returns: the backlog drains, nothing is missing, the alert goes away.
    s3.resume().unwrap();
    let names = segment_range(&first, &last, seg);
    wait_all_archived(&store, &names, Duration::from_secs(120), &daemon).await;
    assert_archive_equals_pg_wal(&pg, &d, &store, &names).await;
    assert!(
        wait_until(Duration::from_secs(20), || !alert.exists()),
        "alert file not removed after recovery"
    );
    assert!(max_restart.segment_start(seg) <= archive_end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_follows_promotion_to_new_timeline() {
    let mut pg = cluster();
    let (d, daemon, store, _) = LocalDaemon::streaming(&pg);
    load(&pg, 10_000, 50);
    let s1 = switch_segment(&pg);
    wait_archived(&store, &s1, Duration::from_secs(60), &daemon).await;
    load(&pg, 5_000, 20);
    pg.promote_to_new_timeline().unwrap();
    load(&pg, 10_000, 50);
    let s2 = switch_segment(&pg);
    assert!(s2.starts_with("00000002"), "{s2}");
    wait_archived(&store, &s2, Duration::from_secs(90), &daemon).await;
    wait_archived(&store, "00000002.history", Duration::from_secs(10), &daemon).await;
    let out = tempfile::tempdir().unwrap();
    let history = restore(&store, &d.ring(), "timeline/00000002.history", out.path()).await;
    assert_eq!(
        std::fs::read(history).unwrap(),
        std::fs::read(pg.wal_dir().join("00000002.history")).unwrap()
    );
    // Timeline 1's last segment is archived as .partial, equal to the server's copy up to
    // the switchpoint.
    let partials: Vec<String> = archived_segments(&store)
        .await
        .into_keys()
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert_eq!(partials.len(), 1, "{partials:?}");
    assert!(partials[0].starts_with("00000001"), "{partials:?}");
    let ours = std::fs::read(
        restore(
            &store,
            &d.ring(),
            &format!("xlog/{}", partials[0]),
            out.path(),
        )
        .await,
    )
    .unwrap();
    let server_copy = std::fs::read(pg.wal_dir().join(&partials[0]))
        .or_else(|_| std::fs::read(pg.wal_dir().join(partials[0].trim_end_matches(".partial"))))
        .unwrap();
    let switch: walhoard_protocol::Lsn =
        std::fs::read_to_string(pg.wal_dir().join("00000002.history"))
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .split('\t')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
    let upto = switch.segment_offset(SegmentSize::DEFAULT) as usize;
    assert!(
        ours[..upto] == server_copy[..upto],
        "partial differs before the switchpoint {switch}"
    );
    let names = vec![s2.clone()];
    assert_archive_equals_pg_wal(&pg, &d, &store, &names).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_alerts_on_auth_and_hba_errors_then_recovers() {
    let pg = PgCluster::builder()
        .hba("host replication walrep 127.0.0.1/32 scram-sha-256")
        .hba("host replication norep 127.0.0.1/32 reject")
        .start()
        .unwrap();
    pg.psql("set password_encryption = 'scram-sha-256'; create role walrep replication login password 'right-Pw-42'; create role norep replication login")
        .unwrap();
    let d = DaemonDir::new();
    let storage = d.local_storage();
    let node = |user: &str, pw: &str| json!({"nodes": [{"host": "127.0.0.1", "port": pg.port, "user": user, "password": pw, "slot": "walhoard"}]});
    let secret = "Wr0ng-Secret-Pw-9";
    d.write_config(&pg, storage.clone(), node("walrep", secret));
    let daemon = Daemon::start(&d);
    let auth = d.alert_dir().join("authentication_error");
    let conf = d.alert_dir().join("configuration_error");
    assert!(
        wait_until(Duration::from_secs(20), || auth.exists()),
        "no authentication_error alert; log:\n{}",
        daemon.log_text()
    );
    assert!(daemon.log_text().contains("28P01"), "{}", daemon.log_text());

    // A user pg_hba.conf rejects: a configuration error.
    d.write_config(&pg, storage.clone(), node("norep", ""));
    daemon.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(20), || conf.exists()),
        "no configuration_error alert; log:\n{}",
        daemon.log_text()
    );

    // Fixed: streaming starts, the alerts go away.
    d.write_config(&pg, storage.clone(), node("walrep", "right-Pw-42"));
    daemon.signal("HUP");
    let store = d.store(&storage);
    assert!(
        wait_until(Duration::from_secs(30), || slot_restart(&pg).is_some()),
        "{}",
        daemon.log_text()
    );
    load(&pg, 10_000, 10);
    let s = switch_segment(&pg);
    wait_archived(&store, &s, Duration::from_secs(60), &daemon).await;
    assert!(wait_until(Duration::from_secs(10), || !auth.exists() && !conf.exists()));
    let log = daemon.log_text();
    assert!(
        !log.contains(secret) && !log.contains("right-Pw-42"),
        "a password was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_64mb_segments() {
    let pg = PgCluster::builder()
        .initdb_arg("--wal-segsize=64")
        .setting("wal_keep_size", "'2GB'")
        .start()
        .unwrap();
    let (d, daemon, store, first) = LocalDaemon::streaming(&pg);
    load(&pg, 200_000, 500);
    let last = switch_segment(&pg);
    wait_archived(&store, &last, Duration::from_secs(120), &daemon).await;
    let seg = SegmentSize::new(64 << 20).unwrap();
    let names = segment_range(&first, &last, seg);
    assert!(names.len() >= 2, "{names:?}");
    for n in &names {
        assert!(has(&store, n).await, "gap at {n}");
    }
    assert_archive_equals_pg_wal(&pg, &d, &store, &names).await;
    let meta = store.metadata(&format!("xlog/{last}")).await.unwrap();
    assert_eq!(meta["original-file-size"], (64u64 << 20).to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_archive_command_mode() {
    let d = DaemonDir::new();
    let command = format!(
        "{} postgres-command --mode archive --site main --xlog %f --port {}",
        env!("CARGO_BIN_EXE_walhoard"),
        d.http_port
    );
    let pg = PgCluster::builder()
        .setting("archive_mode", "on")
        .setting("archive_command", &format!("'{command}'"))
        .setting("wal_keep_size", "'1GB'")
        .start()
        .unwrap();
    let storage = d.local_storage();
    d.write_config(
        &pg,
        storage.clone(),
        json!({"active_backup_mode": "archive_command", "pg_data_directory": pg.data_dir(), "nodes": []}),
    );
    let mut daemon = Daemon::start(&d);
    let store = d.store(&storage);
    load(&pg, 10_000, 10);
    let s1 = switch_segment(&pg);
    wait_archived(&store, &s1, Duration::from_secs(60), &daemon).await;
    assert_archive_equals_pg_wal(&pg, &d, &store, std::slice::from_ref(&s1)).await;

    // Daemon down: archive_command fails, PostgreSQL keeps the segment and retries.
    daemon.kill9();
    load(&pg, 1_000, 1);
    let s2 = switch_segment(&pg);
    assert!(
        wait_until(Duration::from_secs(30), || {
            pg.psql("select failed_count from pg_stat_archiver")
                .unwrap()
                .trim()
                != "0"
        }),
        "archive_command did not fail with the daemon down"
    );
    assert!(!has(&store, &s2).await);
    let daemon = Daemon::start(&d);
    wait_archived(&store, &s2, Duration::from_secs(90), &daemon).await;
    assert_archive_equals_pg_wal(&pg, &d, &store, std::slice::from_ref(&s2)).await;
    // A name that is not a WAL file is refused with a clear error.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walhoard"))
        .args([
            "postgres-command",
            "--mode",
            "archive",
            "--site",
            "main",
            "--xlog",
            "postgresql.conf",
            "--port",
        ])
        .arg(d.http_port.to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a WAL file name"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_disk_guard_pauses_reload_resumes_sigterm_drains() {
    let pg = cluster();
    let (d, mut daemon, store, _) = LocalDaemon::streaming(&pg);
    let storage = d.local_storage();
    load(&pg, 10_000, 10);
    let s0 = switch_segment(&pg);
    wait_archived(&store, &s0, Duration::from_secs(60), &daemon).await;

    // Less free space than required (an impossible amount): receiving pauses.
    d.write_config(
        &pg,
        storage.clone(),
        json!({"pg_receivexlog": {"min_disk_free_bytes": 1u64 << 62, "disk_space_check_interval": 0.2}}),
    );
    daemon.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(20), || d.state().is_some_and(|s| {
            s["backup_sites"]["main"]["walreceiver"]["paused_for_disk_space"] == true
        })),
        "not paused; log:\n{}",
        daemon.log_text()
    );
    let held = slot_restart(&pg).unwrap();
    load(&pg, 30_000, 10);
    let s1 = switch_segment(&pg);
    std::thread::sleep(Duration::from_secs(3));
    assert!(!has(&store, &s1).await, "archived while paused");
    assert_eq!(slot_restart(&pg).unwrap(), held, "slot moved while paused");
    assert_eq!(
        pg.psql("select count(*) from pg_stat_replication")
            .unwrap()
            .trim(),
        "0",
        "still streaming while paused"
    );

    // Space requirement lifted by a reload: receiving resumes and catches up.
    d.write_config(&pg, storage.clone(), json!({}));
    daemon.signal("HUP");
    wait_archived(&store, &s1, Duration::from_secs(60), &daemon).await;

    // SIGTERM: a clean, prompt exit that tells the server what the archive holds.
    let status = daemon
        .terminate(Duration::from_secs(40))
        .expect("daemon did not stop");
    assert!(status.success(), "exit {status:?}");
    assert!(daemon.log_text().contains("walhoard daemon stopped"));
    assert_eq!(
        pg.psql("select active from pg_replication_slots where slot_name = 'walhoard'")
            .unwrap()
            .trim(),
        "f"
    );
}

#[test]
fn daemon_check_reports_each_requirement() {
    let pg = cluster();
    let d = DaemonDir::new();
    d.write_config(&pg, d.local_storage(), json!({}));
    let run = |config: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_walhoard"))
            .args(["check", "--config"])
            .arg(config)
            .output()
            .unwrap()
    };
    let out = run(&d.config_path());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in [
        "replication connection",
        "wal_level",
        "max_wal_senders",
        "replication slot",
        "object storage",
        "encryption",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("ok") && l.contains(check)),
            "no ok line for {check}: {text}"
        );
    }
    assert!(text.contains("does not exist yet"), "{text}");

    // A closed port and an unusable storage directory: both named, exit non-zero.
    let bad = d.path("bad.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.config_path()).unwrap()).unwrap();
    cfg["backup_sites"]["main"]["nodes"][0]["port"] = json!(1);
    cfg["backup_sites"]["main"]["object_storage"]["directory"] = json!("/dev/null/archive");
    std::fs::write(&bad, cfg.to_string()).unwrap();
    let out = run(&bad);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("replication connection")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("FAIL")
            && l.contains("object storage")
            && l.contains("/dev/null/archive")),
        "{text}"
    );
}

/// Names of the basebackups the daemon reported stored, in order.
fn backups_taken(daemon: &Daemon) -> Vec<String> {
    daemon
        .log_text()
        .lines()
        .filter(|l| l.contains(" stored: ") && l.contains("basebackup "))
        .filter_map(|l| {
            l.split("basebackup ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_string)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_schedules_basebackups_and_applies_retention() {
    let pg = cluster();
    // A backup every 7.2 s, two kept.
    let site = json!({"basebackup_interval_hours": 0.002, "basebackup_count": 2, "basebackup_mode": "basic"});
    let (d, daemon, store, _) = LocalDaemon::streaming_with(&pg, site);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while backups_taken(&daemon).len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than 3 scheduled backups; log:\n{}",
            daemon.log_text()
        );
        load(&pg, 20_000, 10);
        switch_segment(&pg);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // maintenance_mode_file: no new scheduled backups. One may be running when the file
    // appears; it finishes, and after it none starts (two intervals and more, checked last).
    std::fs::write(d.path("maintenance_mode_file"), b"").unwrap();
    while backups_started(&daemon) > backups_taken(&daemon).len() + backups_failed(&daemon) {
        assert!(
            std::time::Instant::now() < deadline,
            "a basebackup never finished; log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = backups_started(&daemon);
    assert!(before >= 3, "no \"starting basebackup\" lines to count");
    // Retention runs after each stored backup: it unlists a backup, deletes its chunks, then
    // the WAL before the oldest kept start, and logs "retention applied" when all of it is
    // done. Every backup stored beyond the second deletes one, so the archive is settled once
    // there is a line for each (the listing shrinks before the chunks and WAL are gone).
    let taken = backups_taken(&daemon);
    while log_lines_with(&daemon, "retention applied") < taken.len() - 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} backups stored but fewer retention passes; log:\n{}",
            taken.len(),
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listed = walhoard::daemon::basebackups::list_backups(&store)
        .await
        .unwrap();
    let listed_names: Vec<&str> = listed.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(
        listed_names,
        taken[taken.len() - 2..],
        "basebackup_count 2 keeps the two newest; log:\n{}",
        daemon.log_text()
    );
    for gone in &taken[..taken.len() - 2] {
        assert!(
            store
                .list(&format!("basebackup_chunk/{gone}"))
                .await
                .unwrap()
                .is_empty(),
            "chunks of deleted backup {gone} remain"
        );
    }
    // WAL before the oldest kept backup's start is deleted; from there on nothing is missing.
    let oldest = &listed[0];
    let start = oldest.start_wal_segment.clone().unwrap();
    let segs = archived_segments(&store).await;
    let first_kept = segs.keys().next().unwrap().clone();
    assert!(
        first_kept[8..] >= start[8..],
        "WAL {first_kept} older than the oldest kept backup's start {start} survived"
    );
    let last = switch_segment(&pg);
    wait_archived(&store, &last, Duration::from_secs(60), &daemon).await;
    for n in segment_range(&start, &last, SegmentSize::DEFAULT) {
        assert!(
            has(&store, &n).await,
            "WAL {n} that a kept backup needs is missing"
        );
    }
    // The state file reports the backups.
    let state = d.state().unwrap();
    assert!(
        state["backup_sites"]["main"]["basebackup"]["last_name"].is_string(),
        "{state}"
    );
    // Still no new backup in maintenance mode, more than two intervals after the file.
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert_eq!(
        backups_started(&daemon),
        before,
        "backup started in maintenance mode; log:\n{}",
        daemon.log_text()
    );
}

fn backups_started(daemon: &Daemon) -> usize {
    log_lines_with(daemon, "starting basebackup ")
}

fn backups_failed(daemon: &Daemon) -> usize {
    log_lines_with(daemon, "basebackup failed")
}

fn log_lines_with(daemon: &Daemon, needle: &str) -> usize {
    daemon
        .log_text()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_basebackup_on_request_or_directly() {
    let pg = cluster();
    let site = json!({"basebackup_mode": "basic"});
    let (d, mut daemon, store, _) = LocalDaemon::streaming_with(&pg, site);
    d.wait_http();
    let ask = || basebackup_command(&d).output().unwrap();
    let out = ask();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        backups_taken(&daemon).contains(&name),
        "the daemon did not take {name}"
    );
    assert!(store
        .stat(&format!("basebackup/{name}"))
        .await
        .unwrap()
        .is_some());
    // No daemon: taken directly.
    daemon.kill9();
    let out = ask();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no daemon listens"));
    let second = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_ne!(second, name);
    assert!(store
        .stat(&format!("basebackup/{second}"))
        .await
        .unwrap()
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_mid_basebackup_lists_nothing_and_next_succeeds() {
    let pg = cluster();
    // ~150 MB of table data, so the backup is still running when the daemon is killed.
    pg.run_tool(
        "pgbench",
        &[
            "-i".as_ref(),
            "-s".as_ref(),
            "10".as_ref(),
            "-h".as_ref(),
            pg.socket_dir().as_os_str(),
            "-p".as_ref(),
            pg.port.to_string().as_ref(),
            "-U".as_ref(),
            "postgres".as_ref(),
            "postgres".as_ref(),
        ],
    )
    .unwrap();
    let d = DaemonDir::new();
    let storage = d.local_storage();
    d.write_config(
        &pg,
        storage.clone(),
        json!({"basebackup_mode": "local-tar", "pg_data_directory": pg.data_dir(),
               "basebackup_chunk_size": 1048576, "basebackup_threads": 1,
               "basebackup_chunks_in_progress": 1}),
    );
    let mut daemon = Daemon::start(&d);
    let store = d.store(&storage);
    wait_slot(&pg, &daemon);
    let ask = || {
        basebackup_command(&d)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let cli = ask();
    // Killed once the first chunks are stored.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while store.list("basebackup_chunk").await.unwrap().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.kill9();
    let out = cli.wait_with_output().unwrap();
    assert!(!out.status.success(), "the request survived the daemon");
    assert!(
        walhoard::daemon::basebackups::list_backups(&store)
            .await
            .unwrap()
            .is_empty(),
        "a half backup is listed"
    );
    let orphans = walhoard::basebackup::orphan_chunk_dirs(&store)
        .await
        .unwrap();
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    // Retention deletes unlisted chunks only once nothing could still be writing them
    // (ORPHAN_MIN_AGE): these were left two days ago.
    crate::retention::backdate_tree(
        &d.path("archive")
            .join("main/basebackup_chunk")
            .join(&orphans[0]),
        Duration::from_secs(2 * 86400),
    );

    // Restarted: the next backup succeeds and retention removes the interrupted one's chunks.
    let daemon = Daemon::start(&d);
    d.wait_http();
    let out = ask().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let listed = walhoard::daemon::basebackups::list_backups(&store)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, name);
    let left = walhoard::basebackup::orphan_chunk_dirs(&store)
        .await
        .unwrap();
    assert!(
        left.is_empty(),
        "interrupted chunks left: {left:?}; log:\n{}",
        daemon.log_text()
    );
    let chunks = format!("basebackup_chunk/{}", orphans[0]);
    assert!(crate::common::keys(&store, &chunks).await.is_empty());
}
