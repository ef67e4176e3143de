//! Issue 16, part 3: `synchronous_archive`. The daemon reports as flushed only WAL the object
//! store holds, under the application_name `walhoard_<site>`; a primary listing it in
//! `synchronous_standby_names` acknowledges a commit only once it is archived. Real PostgreSQL
//! (15 by default, `WALHOARD_PG_VERSION` for others), the real daemon, local storage and
//! s3s-fs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use walhoard_protocol::{ConnectParams, Connection};
use walhoard_testkit::s3::S3Server;
use walhoard_testkit::PgCluster;

use crate::partial_wal::{current, lose_primary_and_restore, partial_objects, range};
use crate::restore::{primary, primary_on, Primary};

fn s3_storage(s3: &S3Server) -> serde_json::Value {
    crate::daemon_support::DaemonDir::s3_storage(s3.port, "wal")
}

/// `synchronous_standby_names` set to `names`, and waits until the daemon's connection is
/// the synchronous standby (pg_stat_replication under its application_name).
pub(crate) fn make_synchronous(pg: &PgCluster, names: &str) {
    pg.psql(&format!(
        "alter system set synchronous_standby_names = '{}'",
        names.replace('\'', "''")
    ))
    .unwrap();
    pg.reload().unwrap();
    let q = "select count(*) from pg_stat_replication where application_name = 'walhoard_main' and sync_state in ('sync', 'quorum')";
    assert!(
        crate::common::wait_until(Duration::from_secs(30), || pg
            .psql(q)
            .is_ok_and(|c| c.trim() == "1")),
        "walhoard_main is not the synchronous standby: {:?}",
        pg.psql("select application_name, state, sync_state from pg_stat_replication")
    );
}

fn sql_params(pg: &PgCluster) -> ConnectParams {
    ConnectParams::parse(&pg.socket_conninfo("postgres")).unwrap()
}

/// Commits numbered rows into `n`, one transaction each, on one connection, until the
/// connection fails (the primary is gone) or `stop` passes; records each acknowledged id.
fn committer(pg: &PgCluster, acked: Arc<Mutex<Vec<u32>>>) -> tokio::task::JoinHandle<()> {
    let params = sql_params(pg);
    tokio::spawn(async move {
        let Ok(mut c) = Connection::connect(&params).await else {
            return;
        };
        for i in 1.. {
            if c.simple_query(&format!("insert into n values ({i})"))
                .await
                .is_err()
            {
                return;
            }
            acked.lock().unwrap().push(i);
        }
    })
}

/// What the zero-loss test's archive is and what happens while the commits run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Run {
    /// Local storage: the parts go into part logs (asserted before the loss).
    LocalLog,
    /// Local storage, with pgbench's load alongside the numbered commits and the daemon
    /// killed (`kill -9`) and restarted this many times meanwhile.
    LocalLogDaemonKilled(u32),
    /// An S3 store: part objects.
    S3,
}

/// The zero-loss test: a client commits numbered rows one at a time while the primary is
/// lost (kill -9, data directory deleted); the restore brings back every acknowledged row.
pub(crate) async fn every_acknowledged_commit_survives(mut p: Primary, run: Run) {
    p.archive_all().await;
    p.pg.psql("create table n (id int primary key)").unwrap();
    if let Run::LocalLogDaemonKilled(_) = run {
        crate::restore::pgbench(&p.pg, &["-i", "-s", "1", "-q"]);
    }
    make_synchronous(&p.pg, "walhoard_main");
    let acked = Arc::new(Mutex::new(Vec::new()));
    let task = committer(&p.pg, acked.clone());
    // Long enough to cross a segment boundary at least once on a fast machine is not needed:
    // the rows are what matters; a few seconds of commits, lost mid-stream.
    let mut bench_done = None;
    match run {
        Run::LocalLogDaemonKilled(kills) => {
            let (pg, d, daemon) = (&p.pg, &p.d, &mut p.daemon);
            std::thread::scope(|s| {
                let bench = s.spawn(|| {
                    crate::restore::pgbench(
                        pg,
                        &["-n", "-c", "4", "-T", &(2 * kills + 2).to_string()],
                    )
                });
                for _ in 0..kills {
                    std::thread::sleep(Duration::from_secs(2));
                    daemon.kill9();
                    *daemon = crate::daemon_support::Daemon::start(d);
                }
                bench_done = Some(bench.join().unwrap());
            });
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        Run::LocalLog | Run::S3 => tokio::time::sleep(Duration::from_secs(6)).await,
    }
    if run != Run::S3 {
        assert_parts_in_logs(&p).await;
    }
    let work = tempfile::tempdir().unwrap();
    let restored = lose_primary_and_restore(&mut p, work.path());
    let _ = task.await;
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 10,
        "only {} commits acknowledged",
        acked.len()
    );
    let last = *acked.last().unwrap();
    let (count, max): (u32, u32) = {
        let row = restored
            .psql("select count(*) || ' ' || coalesce(max(id), 0) from n")
            .unwrap();
        let mut it = row.split_whitespace().map(|v| v.parse().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    };
    eprintln!(
        "{} commits acknowledged (last {last}), {count} rows restored (max {max})",
        acked.len()
    );
    assert_eq!(count, max, "rows missing below the last restored one");
    // At most the one commit in flight at the loss may be there unacknowledged.
    assert!(
        max >= last && max <= last + 1,
        "acknowledged up to {last}, restored up to {max}; restored log:\n{}",
        restored.log()
    );
    if let Some(out) = bench_done {
        // pgbench finished before the loss: every transaction it counted is restored.
        let processed: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no transaction count in pgbench's output:\n{out}"));
        let history: u64 = restored
            .psql("select count(*) from pgbench_history")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        eprintln!("pgbench: {processed} transactions acknowledged, {history} restored");
        assert!(processed > 0);
        assert_eq!(
            history, processed,
            "pgbench's acknowledged transactions restored"
        );
    }
}

/// A synchronous site on local storage stores no part objects: every part is a record of
/// its segment's part log, and the segment being written has one.
async fn assert_parts_in_logs(p: &Primary) {
    let (seg, _) = current(&p.pg);
    let keys: Vec<String> = p
        .store
        .list("xlog_partial")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert!(
        keys.iter().all(|k| k.ends_with("/log")),
        "part objects on a synchronous local site: {keys:?}"
    );
    let log = format!("xlog_partial/{seg}/log");
    assert!(
        keys.contains(&log),
        "no part log of the segment being written ({log}): {keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_archive_every_acknowledged_commit_survives_loss_of_the_primary() {
    let p = primary(json!({ "synchronous_archive": true })).await;
    every_acknowledged_commit_survives(p, Run::LocalLog).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_archive_every_acknowledged_commit_survives_loss_of_the_primary_s3() {
    let s3 = S3Server::start("wal").unwrap();
    let p = primary_on(|_| s3_storage(&s3), json!({ "synchronous_archive": true })).await;
    every_acknowledged_commit_survives(p, Run::S3).await;
}

/// With the store down a commit does not return (the flush position waits for the store, not
/// the spool); once the store is back it returns, and the archive holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_archive_commit_waits_for_the_store() {
    let mut s3 = S3Server::start("wal").unwrap();
    // The spool fdatasync'd at every status update (5 s): counting it would let the commit
    // return within the wait below.
    let site = json!({ "synchronous_archive": true, "pg_receivexlog": {"spool_fsync": "always"} });
    let p = primary_on(|_| s3_storage(&s3), site).await;
    p.archive_all().await;
    p.pg.psql("create table n (id int primary key)").unwrap();
    make_synchronous(&p.pg, "walhoard_main");
    p.pg.psql("insert into n values (1)").unwrap();
    s3.stop();
    let params = sql_params(&p.pg);
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut c = Connection::connect(&params).await.unwrap();
        let r = c.simple_query("insert into n values (2)").await.map(|_| ());
        let _ = tx.send((r, Instant::now()));
    });
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        rx.try_recv().is_err(),
        "a commit returned while the store was down"
    );
    let (_, commit) = current(&p.pg);
    s3.resume().unwrap();
    let resumed = Instant::now();
    let (r, done) = tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .expect("the commit did not return once the store was back")
        .unwrap();
    r.unwrap();
    eprintln!(
        "commit returned {:.2}s after the store came back",
        done.duration_since(resumed).as_secs_f64()
    );
    // What the server was told is durable, the store holds: partial objects of the segment
    // up to the commit at least, there the moment the commit returned.
    let (seg, _) = current(&p.pg);
    let seg_start = commit.0 & !((16u64 << 20) - 1);
    let parts = partial_objects(&p.store).await;
    let end = parts
        .keys()
        .filter(|k| k.starts_with(&format!("xlog_partial/{seg}/")))
        .map(|k| range(k).1)
        .max();
    assert!(
        end.is_some_and(|e| seg_start + e >= commit.0),
        "the store holds {seg} up to offset {end:?}, the commit is at {commit}: {:?}",
        parts.keys()
    );
}

/// `walhoard check` on a synchronous site reads the primary's synchronous_standby_names: not
/// listed is a warning (the check passes), listed says what an outage then costs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_archive_check_reads_synchronous_standby_names() {
    use crate::daemon_support::{check_passes_with, DaemonDir};
    let pg = PgCluster::start().unwrap();
    let d = DaemonDir::new();
    d.write_config(
        &pg,
        d.local_storage(),
        json!({ "synchronous_archive": true }),
    );
    let line =
        |want: &'static str| move |l: &str| l.contains("synchronous archive") && l.contains(want);
    check_passes_with(
        &d.config_path(),
        line("warning: synchronous_standby_names is empty"),
    );
    for (names, want) in [
        ("replica1", "does not list walhoard_main"),
        ("walhoard_main", "blocks every commit"),
        (
            "ANY 1 (walhoard_main, replica1)",
            "only if the other listed standbys are down too",
        ),
    ] {
        pg.psql(&format!(
            "alter system set synchronous_standby_names = '{names}'"
        ))
        .unwrap();
        pg.reload().unwrap();
        check_passes_with(&d.config_path(), line(want));
    }
}

/// A small commit at the very start of a segment (its WAL shorter than one page) returns:
/// the segment's first page is checked as soon as its header is in, not once the page is
/// full, which on a quiet database may be never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_archive_small_commit_at_the_start_of_a_segment_returns() {
    let p = primary(json!({ "synchronous_archive": true })).await;
    p.archive_all().await;
    p.pg.psql("create table n (id int primary key)").unwrap();
    make_synchronous(&p.pg, "walhoard_main");
    // The table's pages are in WAL since the last checkpoint: later inserts write no full
    // page images, only small records.
    p.pg.psql("insert into n values (0)").unwrap();
    for round in 1..=3 {
        let seg = crate::daemon_support::switch_segment(&p.pg);
        let params = sql_params(&p.pg);
        let insert = tokio::spawn(async move {
            let mut c = Connection::connect(&params).await.unwrap();
            c.simple_query(&format!("insert into n values ({round})"))
                .await
                .map(|_| ())
        });
        let (_, lsn) = current(&p.pg);
        let r = tokio::time::timeout(Duration::from_secs(30), insert).await;
        assert!(
            matches!(r, Ok(Ok(Ok(())))),
            "round {round}: the commit at {lsn} (after switching from {seg}) did not return: {r:?}\n{}",
            p.daemon.log_text()
        );
    }
}
