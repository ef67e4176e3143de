//! The WAL receiver against real servers: spool contents equal pg_wal, the slot never passes
//! the archive's end, reconnects resume without gaps, timeline switches are followed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use walhoard_protocol::{Lsn, SegmentSize, WalSegmentName};
use walhoard_testkit::PgCluster;
use walhoard_walreceiver::{
    run, ReceiverConfig, ReceiverEvent, ReceiverPositions, SegmentBuffers, SpoolSync,
};

use crate::common::{current_lsn, psql_lsn, socket_params, wait_until};

struct Running {
    events: mpsc::Receiver<ReceiverEvent>,
    archived: watch::Sender<Lsn>,
    positions: watch::Receiver<ReceiverPositions>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), walhoard_walreceiver::ReceiverError>>,
    /// Segment buffers the receiver was given: 0 makes every segment go through the
    /// read-back of its spool file, otherwise some are handed on in memory.
    buffers: usize,
    /// The receiver's buffers (the test looks at how many it holds).
    pool: SegmentBuffers,
    spool: tempfile::TempDir,
}

impl Running {
    /// Cancels the receiver, which must then end without an error.
    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn start(pg: &PgCluster) -> Running {
    start_with(pg, 2)
}

fn start_with(pg: &PgCluster, buffers: usize) -> Running {
    start_sync(pg, buffers, SpoolSync::Always)
}

fn start_sync(pg: &PgCluster, buffers: usize, sync: SpoolSync) -> Running {
    start_tuned(pg, buffers, sync, |_| {})
}

/// As [`start_sync`], with `tune` changing the receiver's configuration last.
fn start_tuned(
    pg: &PgCluster,
    buffers: usize,
    sync: SpoolSync,
    tune: impl FnOnce(&mut ReceiverConfig),
) -> Running {
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = ReceiverConfig::new(socket_params(pg), "walhoard", spool.path().to_path_buf());
    let pool = SegmentBuffers::new(buffers);
    cfg.buffers = pool.clone();
    cfg.spool_sync = sync;
    cfg.status_interval = Duration::from_millis(500);
    cfg.reconnect_min = Duration::from_millis(100);
    cfg.reconnect_max = Duration::from_millis(500);
    tune(&mut cfg);
    // A small queue: the test drains it; backpressure is part of what runs.
    let (tx, events) = mpsc::channel(2);
    let (archived, archived_rx) = watch::channel(Lsn::INVALID);
    let (positions_tx, positions) = watch::channel(ReceiverPositions::default());
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run(
        cfg,
        None,
        tx,
        archived_rx,
        positions_tx,
        cancel.clone(),
    ));
    Running {
        events,
        archived,
        positions,
        cancel,
        task,
        buffers,
        pool,
        spool,
    }
}

/// A segment's bytes as handed on, if in memory, must be the spool file's. Returns whether
/// they were in memory.
fn check_in_memory(r: &Running, name: &WalSegmentName, file: &[u8], data: Option<&[u8]>) -> bool {
    let Some(d) = data else { return false };
    assert!(r.buffers > 0, "{name} in memory without buffers");
    assert!(
        d == file,
        "{name}: bytes handed on differ from the spool file"
    );
    true
}

async fn next_event(r: &mut Running) -> ReceiverEvent {
    tokio::time::timeout(Duration::from_secs(60), r.events.recv())
        .await
        .expect("no receiver event in 60s")
        .expect("receiver stopped")
}

fn slot_restart(pg: &PgCluster) -> Lsn {
    let sql = "select restart_lsn from pg_replication_slots where slot_name = 'walhoard'";
    psql_lsn(pg, sql)
}

/// Segments the receiver completed, checked against pg_wal as they arrive.
async fn collect_segments(
    pg: &PgCluster,
    r: &mut Running,
    upto: Lsn,
    seg: SegmentSize,
    archive: bool,
) -> BTreeMap<u64, PathBuf> {
    let mut got = BTreeMap::new();
    let mut in_memory = 0;
    loop {
        match next_event(r).await {
            ReceiverEvent::Segment {
                name,
                path,
                start,
                data,
            } => {
                let ours = std::fs::read(&path).unwrap();
                let theirs = std::fs::read(pg.wal_dir().join(name.to_string())).unwrap();
                assert!(ours == theirs, "spool {name} differs from pg_wal");
                if check_in_memory(r, &name, &ours, data.as_deref().map(|b| &b[..])) {
                    in_memory += 1;
                }
                let segno = start.segment_number(seg);
                got.insert(segno, path);
                if archive {
                    r.archived.send_replace(start + seg.bytes());
                }
                if start + seg.bytes() >= upto.segment_start(seg) {
                    // The first segment always finds a free buffer.
                    assert_eq!(
                        in_memory > 0,
                        r.buffers > 0,
                        "{in_memory} segments in memory with {} buffers",
                        r.buffers
                    );
                    return got;
                }
            }
            ReceiverEvent::Connected { .. } | ReceiverEvent::Disconnected { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Follows the receiver until the archive reaches `target`'s segment, archiving each segment
/// as it arrives and checking it against pg_wal and for gaps. Returns the disconnects seen.
async fn follow_without_gaps(
    pg: &PgCluster,
    r: &mut Running,
    mut next_segno: u64,
    target: Lsn,
    seg: SegmentSize,
) -> usize {
    let mut disconnects = 0;
    loop {
        match next_event(r).await {
            ReceiverEvent::Disconnected { reason, .. } => {
                assert!(reason.is_retryable(), "{reason:?}");
                disconnects += 1;
            }
            ReceiverEvent::Connected { start, .. } => {
                assert!(
                    start.segment_number(seg) <= next_segno,
                    "resumed after a gap"
                )
            }
            ReceiverEvent::Segment {
                start,
                name,
                path,
                data,
            } => {
                let segno = start.segment_number(seg);
                assert!(
                    segno <= next_segno,
                    "segment {name} skips ahead of {next_segno}"
                );
                let ours = std::fs::read(&path).unwrap();
                assert!(ours == std::fs::read(pg.wal_dir().join(name.to_string())).unwrap());
                check_in_memory(r, &name, &ours, data.as_deref().map(|b| &b[..]));
                next_segno = next_segno.max(segno + 1);
                r.archived.send_replace(Lsn((segno + 1) * seg.bytes()));
                if Lsn((segno + 1) * seg.bytes()) >= target.segment_start(seg) {
                    return disconnects;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn write_wal(pg: &PgCluster, rows: u32) -> Lsn {
    pg.psql(&format!(
        "create table if not exists t (g int, pad text); insert into t select g, repeat(md5(g::text), 16) from generate_series(1, {rows}) g"
    ))
    .unwrap();
    pg.psql(
        "do $$ begin for i in 1..500 loop insert into t values (i, 'x'); commit; end loop; end $$",
    )
    .unwrap();
    pg.psql("select pg_switch_wal()").unwrap();
    current_lsn(pg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walreceiver_slot_waits_for_archive_and_resumes() {
    let pg = PgCluster::start().unwrap();
    let seg = SegmentSize::DEFAULT;
    let mut r = start(&pg);
    match next_event(&mut r).await {
        ReceiverEvent::Connected { seg_size, .. } => assert_eq!(seg_size, seg),
        other => panic!("{other:?}"),
    }
    let initial_restart = slot_restart(&pg);

    // Nothing archived yet: several segments arrive, the slot does not move.
    let target = write_wal(&pg, 40000);
    let got = collect_segments(&pg, &mut r, target, seg, false).await;
    assert!(got.len() >= 2, "{got:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await; // three status intervals
    assert_eq!(
        slot_restart(&pg),
        initial_restart,
        "slot advanced past an archive that holds nothing"
    );
    assert_eq!(r.positions.borrow().reported_flush_lsn, Lsn::INVALID);

    // Archive up to the second segment only: the slot follows there, at most into the first
    // segment the archive lacks (as far as the spool holds it durably) and never past its
    // last byte, so the server keeps that whole segment.
    let (&first, _) = got.iter().next().unwrap();
    let archived_to = Lsn((first + 2) * seg.bytes());
    r.archived.send_replace(archived_to);
    assert!(
        wait_until(Duration::from_secs(10), || slot_restart(&pg)
            .segment_start(seg)
            == archived_to),
        "slot at {}",
        slot_restart(&pg)
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(slot_restart(&pg).segment_start(seg), archived_to);

    // Kill the walsender: the receiver reconnects and continues without a gap.
    let last = *got.keys().last().unwrap();
    pg.psql("select pg_terminate_backend(pid) from pg_stat_replication")
        .unwrap();
    let target = write_wal(&pg, 20000);
    let disconnects = follow_without_gaps(&pg, &mut r, last + 1, target, seg).await;
    assert!(
        disconnects >= 1,
        "the walsender was terminated but no disconnect was reported"
    );
    let archived_end = *r.archived.borrow();
    assert!(wait_until(Duration::from_secs(10), || slot_restart(&pg)
        .segment_start(seg)
        == archived_end));
    assert!(r.positions.borrow().received_lsn >= archived_end);

    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walreceiver_follows_timeline_switch() {
    let mut pg = PgCluster::start().unwrap();
    let seg = SegmentSize::DEFAULT;
    pg.psql("select pg_create_physical_replication_slot('walhoard', true)")
        .unwrap();
    write_wal(&pg, 5000);
    pg.psql("create table before_switch as select 1").unwrap();
    // Same cluster restarted as a standby and promoted: timeline 2; the slot persists.
    pg.promote_to_new_timeline().unwrap();
    pg.psql("create table after_switch as select 2").unwrap();
    let history = std::fs::read(pg.wal_dir().join("00000002.history")).unwrap();
    let switchpoint =
        walhoard_protocol::TimelineHistory::parse(walhoard_protocol::TimelineId(2), &history)
            .unwrap()
            .switchpoint_of(walhoard_protocol::TimelineId(1))
            .unwrap();

    let mut r = start(&pg);
    let mut partial = None;
    let mut hist = None;
    let target = loop {
        match next_event(&mut r).await {
            ReceiverEvent::Segment { name, path, .. } => {
                assert_eq!(
                    std::fs::read(&path).unwrap(),
                    std::fs::read(pg.wal_dir().join(name.to_string())).unwrap()
                );
                if name.timeline().get() == 2 {
                    break name;
                }
            }
            ReceiverEvent::TimelinePartial { name, path, end } => {
                assert_eq!(end, switchpoint);
                partial = Some((name, path));
                // Complete a segment on the new timeline.
                pg.psql("select pg_switch_wal()").unwrap();
            }
            ReceiverEvent::History { name, path } => {
                assert_eq!(
                    name,
                    WalSegmentName::History(walhoard_protocol::TimelineId(2))
                );
                assert_eq!(std::fs::read(path).unwrap(), history);
                hist = Some(name);
            }
            ReceiverEvent::Connected { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    let (pname, ppath) = partial.expect("no .partial for timeline 1");
    assert!(hist.is_some(), "no history file");
    assert_eq!(
        pname.to_string(),
        format!(
            "{}.partial",
            walhoard_protocol::SegmentId::containing(
                walhoard_protocol::TimelineId(1),
                switchpoint,
                seg
            )
        )
    );
    // The partial segment holds timeline 1 exactly up to the switchpoint.
    let ours = std::fs::read(&ppath).unwrap();
    let old = pname.segment().unwrap();
    let theirs = std::fs::read(pg.wal_dir().join(old.to_string())).unwrap();
    let upto = switchpoint.segment_offset(seg) as usize;
    assert!(
        ours[..upto] == theirs[..upto],
        "partial segment differs from timeline 1's"
    );
    assert_eq!(
        target.segment().unwrap().tli,
        walhoard_protocol::TimelineId(2)
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walreceiver_64mb_segments() {
    let pg = PgCluster::builder()
        .initdb_arg("--wal-segsize=64")
        .start()
        .unwrap();
    let seg = SegmentSize::new(64 << 20).unwrap();
    let mut r = start(&pg);
    match next_event(&mut r).await {
        ReceiverEvent::Connected { seg_size, .. } => assert_eq!(seg_size, seg),
        other => panic!("{other:?}"),
    }
    let target = write_wal(&pg, 10000);
    let got = collect_segments(&pg, &mut r, target, seg, true).await;
    for path in got.values() {
        assert_eq!(std::fs::metadata(path).unwrap().len(), 64 << 20);
    }
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walreceiver_survives_server_restart() {
    let mut pg = PgCluster::start().unwrap();
    let seg = SegmentSize::DEFAULT;
    // No buffers: every segment is verified by reading its spool file back.
    let mut r = start_with(&pg, 0);
    assert!(matches!(
        next_event(&mut r).await,
        ReceiverEvent::Connected { .. }
    ));
    let target = write_wal(&pg, 20000);
    let got = collect_segments(&pg, &mut r, target, seg, true).await;
    let next_segno = got.keys().last().unwrap() + 1;

    // The server goes away for a few seconds (fast shutdown), then comes back on the same port.
    pg.stop().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.restart_with(None).unwrap();
    let target = write_wal(&pg, 20000);
    let disconnects = follow_without_gaps(&pg, &mut r, next_segno, target, seg).await;
    assert!(
        disconnects >= 1,
        "the server restarted but no disconnect was reported"
    );
    r.stop().await;
}

/// `SpoolSync::Auto`: a server whose slots keep all WAL (`max_slot_wal_keep_size = -1`, the
/// default) gets segments handed on from memory with no spool file written; one that may drop
/// WAL a slot holds gets every segment in a spool file as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walreceiver_spool_written_only_when_the_slot_may_lose_wal() {
    for keep in ["-1", "'4GB'"] {
        let pg = PgCluster::builder()
            .setting("max_slot_wal_keep_size", keep)
            .start()
            .unwrap();
        let seg = SegmentSize::DEFAULT;
        // More buffers than the segments in flight: every segment finds one.
        let mut r = start_sync(&pg, 8, SpoolSync::Auto);
        let target = write_wal(&pg, 20000);
        let mut seen = 0;
        loop {
            match next_event(&mut r).await {
                ReceiverEvent::Segment {
                    name,
                    path,
                    start,
                    data,
                } => {
                    let theirs = std::fs::read(pg.wal_dir().join(name.to_string())).unwrap();
                    let data = data.unwrap_or_else(|| panic!("{name} not in memory"));
                    assert!(data[..] == theirs[..], "{name} differs from pg_wal");
                    if keep == "-1" {
                        assert!(!path.exists(), "{name} written to the spool: {path:?}");
                    } else {
                        assert!(
                            std::fs::read(&path).unwrap() == theirs,
                            "{name}: spool file differs"
                        );
                    }
                    seen += 1;
                    r.archived.send_replace(start + seg.bytes());
                    if start + seg.bytes() >= target.segment_start(seg) {
                        break;
                    }
                }
                ReceiverEvent::Connected { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(seen >= 2, "{seen} segments");
        r.stop().await;
    }
}

/// When the walsender last got a status update from us (`pg_stat_replication.reply_time`,
/// seconds since the epoch).
fn reply_time(pg: &PgCluster) -> f64 {
    pg.psql("select extract(epoch from reply_time)::float8 from pg_stat_replication")
        .unwrap()
        .trim()
        .parse()
        .unwrap_or(0.0)
}

/// Issue 19: whoever archives the segments is busy (its uploads wait for upload slots other
/// sites hold) and takes no more: the receiver, blocked handing on the next segment, still
/// sends its status updates, so the server neither times the session out nor waits for
/// replies. (Before, a receiver blocked on the full event channel sent nothing at all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walreceiver_status_updates_go_out_while_segments_wait() {
    let pg = PgCluster::start().unwrap();
    let seg = SegmentSize::DEFAULT;
    let mut r = start(&pg);
    assert!(matches!(
        next_event(&mut r).await,
        ReceiverEvent::Connected { .. }
    ));
    // Far more than the two segments the event queue holds.
    let first = slot_restart(&pg).segment_number(seg);
    let target = write_wal(&pg, 100_000);
    assert!(target.segment_number(seg) >= first + 4, "{target}");
    // Nobody takes events: the queue fills, then the receiver waits with a third segment.
    assert!(
        wait_until(Duration::from_secs(60), || r.events.len() == 2),
        "the event queue did not fill"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = r.positions.borrow().received_lsn;
    let before = reply_time(&pg);
    tokio::time::sleep(Duration::from_secs(3)).await; // six status intervals
    let after = reply_time(&pg);
    assert_eq!(
        r.events.len(),
        2,
        "the test took no event, yet the queue moved"
    );
    assert_eq!(
        r.positions.borrow().received_lsn,
        received,
        "the receiver is not waiting"
    );
    assert!(
        before > 0.0 && after > before,
        "no status update while the receiver waited: reply_time {before:?} then {after:?}"
    );
    assert!(
        received.is_valid() && received.segment_offset(seg) == 0,
        "waiting with a complete segment: {received}"
    );
    // Taken again, everything arrives, equal to pg_wal.
    let got = collect_segments(&pg, &mut r, target, seg, true).await;
    assert!(got.len() >= 3, "{got:?}");
    r.stop().await;
}

/// Issue 19: a site whose WAL stops flowing gives its segment buffer back: what it received
/// of the segment moves to its spool file (written for the purpose: the spool is only a
/// cache here, `max_slot_wal_keep_size = -1`), and the segment, once complete, is handed on
/// from that file, equal to pg_wal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walreceiver_idle_segment_leaves_memory() {
    let pg = PgCluster::start().unwrap();
    let seg = SegmentSize::DEFAULT;
    let mut r = start_tuned(&pg, 2, SpoolSync::Auto, |c| {
        c.release_idle_after = Duration::from_secs(1);
    });
    assert!(matches!(
        next_event(&mut r).await,
        ReceiverEvent::Connected { .. }
    ));
    // The segment the receiver started in is completed, handed on and archived; the next
    // one starts at its first byte, so it gets a buffer.
    let start = current_lsn(&pg).segment_number(seg);
    pg.psql("select pg_switch_wal()").unwrap();
    loop {
        match next_event(&mut r).await {
            ReceiverEvent::Segment { start: s, .. } => {
                r.archived.send_replace(s + seg.bytes());
                if s.segment_number(seg) >= start {
                    break;
                }
            }
            ReceiverEvent::Connected { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // A little WAL, then nothing.
    pg.psql("create table idle (g int); insert into idle select generate_series(1, 1000)")
        .unwrap();
    let written = current_lsn(&pg);
    assert!(written.segment_number(seg) > start, "{written}");
    assert!(
        wait_until(Duration::from_secs(30), || r
            .positions
            .borrow()
            .received_lsn
            >= written),
        "not received"
    );
    let name = WalSegmentName::Segment(walhoard_protocol::SegmentId::containing(
        walhoard_protocol::TimelineId(1),
        written,
        seg,
    ));
    let partial = r.spool.path().join(format!("{name}.partial"));
    assert!(
        wait_until(Duration::from_secs(30), || r.pool.held() == 0),
        "the idle segment still holds its buffer"
    );
    let upto = written.segment_offset(seg) as usize;
    let ours = std::fs::read(&partial).unwrap();
    let theirs = std::fs::read(pg.wal_dir().join(name.to_string())).unwrap();
    assert!(
        ours[..upto] == theirs[..upto],
        "{partial:?} differs from pg_wal"
    );
    // More WAL completes the segment: handed on from the spool file, not from memory.
    pg.psql("insert into idle select generate_series(1, 1000)")
        .unwrap();
    pg.psql("select pg_switch_wal()").unwrap();
    loop {
        match next_event(&mut r).await {
            ReceiverEvent::Segment {
                name: got,
                path,
                data,
                ..
            } if got == name => {
                assert!(data.is_none(), "{name} handed on from memory");
                let theirs = std::fs::read(pg.wal_dir().join(name.to_string())).unwrap();
                assert!(std::fs::read(&path).unwrap() == theirs, "{name} differs");
                break;
            }
            ReceiverEvent::Segment { start, .. } => {
                r.archived.send_replace(start + seg.bytes());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    r.stop().await;
}

/// Issue 19: a receiver catching up (its server already holds the segments it has yet to
/// receive) whose share of a spent shared budget is taken (the segment handed on, its upload
/// still running) waits for that buffer instead of receiving the next segments into spool files:
/// the spool is only a cache here (`spool_fsync` auto, a slot that keeps all WAL), and each
/// spooled byte cost a write and two reads. While it waits its status updates go on. Every
/// segment received from its first byte comes in memory, equal to pg_wal. (Before, every
/// segment received while the buffer was held went through the spool file: the consumer
/// here holds each buffer for 200 ms, so nearly all of them did.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walreceiver_catching_up_waits_for_a_buffer_instead_of_spooling() {
    let pg = PgCluster::start().unwrap();
    let seg = SegmentSize::DEFAULT;
    // The receiver creates the slot and stops: the WAL written next is a backlog it holds.
    let mut r = start_sync(&pg, 1, SpoolSync::Auto);
    assert!(matches!(
        next_event(&mut r).await,
        ReceiverEvent::Connected { .. }
    ));
    r.stop().await;
    let first = slot_restart(&pg).segment_number(seg);
    let target = write_wal(&pg, 250_000);
    assert!(target.segment_number(seg) >= first + 6, "{target}");
    // The shared budget is what it lacks: one segment's worth, which this site may hold
    // three of on its own (alone under a roomy budget it would receive ahead into its spool).
    let mut r = start_tuned(&pg, 1, SpoolSync::Auto, |c| {
        c.buffers = SegmentBuffers::with_limit(3, seg.bytes() as usize)
    });
    let mut seen: Vec<(u64, bool)> = Vec::new();
    let mut held_long = false;
    loop {
        match next_event(&mut r).await {
            ReceiverEvent::Segment {
                name,
                path,
                start,
                data,
            } => {
                let theirs = std::fs::read(pg.wal_dir().join(name.to_string())).unwrap();
                match &data {
                    Some(d) => {
                        assert!(d[..] == theirs[..], "{name} differs from pg_wal");
                        assert!(!path.exists(), "{name} in memory and in the spool");
                    }
                    None => assert!(
                        std::fs::read(&path).unwrap() == theirs,
                        "{name}: spool file differs"
                    ),
                }
                seen.push((start.segment_number(seg), data.is_some()));
                if data.is_some() && !held_long {
                    // A long upload: the receiver waits at the next segment's first byte
                    // and keeps reporting.
                    held_long = true;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let received = r.positions.borrow().received_lsn;
                    let before = reply_time(&pg);
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    assert_eq!(
                        r.positions.borrow().received_lsn,
                        received,
                        "received on while its buffer was held"
                    );
                    assert_eq!(received.segment_offset(seg), 0, "waiting at {received}");
                    assert!(
                        before > 0.0 && reply_time(&pg) > before,
                        "no status update while waiting for a buffer"
                    );
                } else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                drop(data);
                r.archived.send_replace(start + seg.bytes());
                if start + seg.bytes() >= target.segment_start(seg) {
                    break;
                }
            }
            ReceiverEvent::Connected { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // The first segment may have begun before the slot's position (received from its
    // middle: never in memory); every later one must have come in memory.
    assert!(held_long && seen.len() >= 5, "{seen:?}");
    assert!(
        seen.iter().skip(1).all(|(_, in_memory)| *in_memory),
        "segments received into the spool while catching up: {seen:?}"
    );
    r.stop().await;
}
