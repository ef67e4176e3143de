//! One daemon, many sites on one server (issue 19): the segment buffers of all sites share
//! one budget (`wal_buffer_memory_mib`), so the daemon's peak RSS is bounded by configuration,
//! not by the number of sites or their backlog; and one site's uploads cannot take every
//! upload slot while another site waits.

use std::time::Duration;

use serde_json::{json, Value};
use walhoard::config::ObjectStorageConfig;
use walhoard::storage::ObjectStore;
use walhoard_protocol::{Lsn, SegmentSize, WalSegmentName};
use walhoard_testkit::PgCluster;

use crate::common::wait_until;
use crate::daemon::segment_range;
use crate::daemon_support::*;

/// `n` sites `s0`, `s1`, ... streaming from `pg`, each with its own slot, all archiving into
/// one local directory under their own prefix (their name); zstd 1 and encryption as in
/// [`DaemonDir::write_config`]. `extra` is merged into the top level.
fn write_sites(d: &DaemonDir, pg: &PgCluster, names: &[String], extra: Value) {
    let mut sites = serde_json::Map::new();
    for name in names {
        sites.insert(
            name.clone(),
            json!({
                "nodes": [{"host": pg.socket_dir(), "port": pg.port, "user": "postgres", "slot": format!("walhoard_{name}")}],
                "object_storage": d.local_storage(),
                "encryption_key_id": "k1",
                "encryption_keys": {"k1": {"public": d.public, "private": d.private}},
                "basebackup_interval_hours": null,
            }),
        );
    }
    let mut config = d.config_for(Value::Object(sites));
    merge(
        &mut config,
        json!({
            "maintenance_mode_file": d.path("maintenance_mode_file"),
            "compression": {"algorithm": "zstd", "level": 1, "thread_count": 1},
            "transfer": {"thread_count": 2, "retry_max_backoff_seconds": 1.0},
        }),
    );
    merge(&mut config, extra);
    d.write_json_config(&config);
}

fn site_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("s{i}")).collect()
}

fn site_store(d: &DaemonDir, name: &str) -> ObjectStore {
    let cfg: ObjectStorageConfig = serde_json::from_value(d.local_storage()).unwrap();
    ObjectStore::open(&cfg, name).unwrap()
}

fn slot_exists(pg: &PgCluster, slot: &str) -> bool {
    pg.psql(&format!(
        "select count(*) from pg_replication_slots where slot_name = '{slot}'"
    ))
    .is_ok_and(|v| v.trim() == "1")
}

/// Waits until the daemon created every site's slot.
fn wait_slots(pg: &PgCluster, names: &[String], daemon: &Daemon) {
    for n in names {
        assert!(
            wait_until(Duration::from_secs(60), || slot_exists(
                pg,
                &format!("walhoard_{n}")
            )),
            "slot of site {n} not created; log:\n{}",
            daemon.log_text()
        );
    }
}

/// A memory figure of a process (`field` of /proc/<pid>/status), in bytes.
fn vm_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/<pid>/status"));
    kib << 10
}

/// Peak RSS of a process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    vm_bytes(pid, "VmHWM")
}

/// A site's `archived_lsn` in the state file.
fn archived_lsn(d: &DaemonDir, site: &str) -> Option<Lsn> {
    d.state()?["backup_sites"][site]["walreceiver"]["archived_lsn"]
        .as_str()?
        .parse()
        .ok()
}

const MIB: u64 = 1 << 20;
/// What the daemon holds whatever the number of sites and the backlog, over the budget:
/// - the process itself (binary, runtime, TLS and HTTP stacks, allocator arenas): 40 MiB;
/// - the pooled one-shot buffers (`pipeline::transfer::pool`): up to one spool segment read
///   in, one compressed and one sealed segment per compression worker and one sealed segment
///   per running upload, i.e. (3 × 1 worker + 2 uploads) × 16 MiB = 80 MiB with this
///   configuration;
/// - per site a few small buffers (1 MiB spool read-back piece, socket buffer, scratch): 2 MiB.
fn fixed_overhead(sites: u64) -> u64 {
    40 * MIB + 80 * MIB + 2 * MIB * sites
}

/// Six busy sites drain the same backlog under a 64 MiB budget: the daemon's peak RSS stays
/// under the budget plus the fixed overhead above, and every site's archive is complete
/// from the slot's first segment to the last one written. Before the budget, each site could
/// hold `thread_count + 2` = 4 segments (64 MiB) and a 16 MiB read-back buffer of its own:
/// 6 × 80 MiB over the overhead, far over this bound. Once idle, the RSS falls well below
/// that peak again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_sites_memory_bounded_by_budget() {
    let pg = PgCluster::start().unwrap();
    let d = DaemonDir::new();
    let names = site_names(6);
    write_sites(&d, &pg, &names, json!({"wal_buffer_memory_mib": 64}));
    let mut daemon = Daemon::start(&d);
    wait_slots(&pg, &names, &daemon);
    let first = slot_segment_of(&pg, "walhoard_s0");
    assert!(daemon.terminate(Duration::from_secs(60)).is_some());

    // A backlog of about ten segments, held by every site's slot.
    load(&pg, 600_000, 0);
    let last = switch_segment(&pg);
    let daemon = Daemon::start(&d);
    let seg = SegmentSize::DEFAULT;
    let expected = segment_range(&first, &last, seg);
    assert!(expected.len() >= 8, "backlog too small: {expected:?}");
    for n in &names {
        let store = site_store(&d, n);
        wait_all_archived(&store, &expected, Duration::from_secs(600), &daemon).await;
        let end = contiguous_end(&store, &first, seg).await;
        let last_id = last.parse::<WalSegmentName>().unwrap().segment().unwrap();
        assert!(
            end > last_id.start_lsn(seg).unwrap(),
            "site {n}: archive ends at {end}, before {last}"
        );
    }
    let peak = peak_rss(daemon.pid());
    let bound = 64 * MIB + fixed_overhead(names.len() as u64);
    println!(
        "6 busy sites, 64 MiB budget: peak RSS {} MiB (bound {} MiB)",
        peak / MIB,
        bound / MIB
    );
    assert!(
        peak < bound,
        "peak RSS {} MiB over the budget plus overhead ({} MiB)",
        peak / MIB,
        bound / MIB
    );
    // Idle after the burst: the segment buffers and the one-shot buffers nobody takes any
    // more are freed and their pages returned (`daemon::memory`); the RSS falls far below
    // the peak. (Before, it stayed near the peak for good.)
    let fallen = |rss: u64| rss + 48 * MIB < peak;
    let rss = || vm_bytes(daemon.pid(), "VmRSS");
    assert!(
        wait_until(Duration::from_secs(120), || fallen(rss())),
        "RSS {} MiB still near the peak {} MiB after the burst",
        rss() / MIB,
        peak / MIB
    );
    println!(
        "after the burst, idle: RSS {} MiB (peak {} MiB)",
        rss() / MIB,
        peak / MIB
    );
}

fn slot_segment_of(pg: &PgCluster, slot: &str) -> String {
    pg.psql(&format!(
        "select pg_walfile_name(restart_lsn) from pg_replication_slots where slot_name = '{slot}'"
    ))
    .unwrap()
    .trim()
    .to_string()
}

/// Two sites on one server, two upload slots. Site `s0`'s store refuses its second and third
/// segments (their metadata sidecars' paths are directories), so their uploads retry for as
/// long as that lasts, each holding a slot. Site `s1` still archives every segment and
/// reports it in the state file meanwhile: `s0` holds at most one slot of two. (With one
/// semaphore for all, `s0`'s two stuck uploads took both slots and `s1` archived nothing.)
/// Once the store takes them, `s0` catches up and both archives are complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_sites_quiet_site_archives_while_another_holds_uploads() {
    let pg = PgCluster::start().unwrap();
    let d = DaemonDir::new();
    let names = site_names(2);
    write_sites(&d, &pg, &names, json!({}));
    let daemon = Daemon::start(&d);
    wait_slots(&pg, &names, &daemon);
    let first = slot_segment_of(&pg, "walhoard_s0");
    let seg = SegmentSize::DEFAULT;
    let first_id = first.parse::<WalSegmentName>().unwrap().segment().unwrap();
    let second = first_id.next(seg).unwrap();
    let blocked: Vec<String> = [second, second.next(seg).unwrap()]
        .iter()
        .map(|id| id.to_string())
        .collect();
    let xlog = d.path("archive").join("s0").join("xlog");
    for b in &blocked {
        let dir = xlog.join(format!("{b}.metadata"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("blocker"), b"").unwrap();
    }
    let mut last = String::new();
    for _ in 0..5 {
        load(&pg, 2_000, 0);
        last = switch_segment(&pg);
    }
    let expected = segment_range(&first, &last, seg);
    let (busy, quiet) = (site_store(&d, "s0"), site_store(&d, "s1"));
    wait_all_archived(&quiet, &expected, Duration::from_secs(120), &daemon).await;
    let last_id = last.parse::<WalSegmentName>().unwrap().segment().unwrap();
    let quiet_end = last_id.next(seg).unwrap().start_lsn(seg).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || archived_lsn(&d, "s1")
            .is_some_and(|a| a >= quiet_end)),
        "s1's archived_lsn in the state file did not reach {quiet_end}: {:?}",
        d.state()
    );
    // s0 is still stuck on its second segment, and says so.
    assert!(!has(&busy, &blocked[0]).await);
    let state = d.state().unwrap();
    let busy_state = &state["backup_sites"]["s0"]["walreceiver"];
    assert!(
        busy_state["last_error"]
            .as_str()
            .is_some_and(|e| blocked.iter().any(|b| e.contains(b.as_str()))),
        "{busy_state}"
    );

    for b in &blocked {
        std::fs::remove_dir_all(xlog.join(format!("{b}.metadata"))).unwrap();
    }
    wait_all_archived(&busy, &expected, Duration::from_secs(120), &daemon).await;
    for (n, store) in [("s0", &busy), ("s1", &quiet)] {
        let end = contiguous_end(store, &first, seg).await;
        assert!(end >= quiet_end, "site {n}: archive ends at {end}");
    }
}
