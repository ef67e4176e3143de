//! Replication commands and the START_REPLICATION stream against a real server.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use walhoard_protocol::xlog::{page_magic_for, validate_pages, XLOG_BLCKSZ};
use walhoard_protocol::{
    Lsn, PageExpectation, ReplicationClient, ReplicationEvent, SegmentId, SegmentSize,
    StandbyStatus, TimelineHistory, TimelineId,
};
use walhoard_testkit::PgCluster;

use crate::common::{current_lsn, psql_lsn, replication_client, wait_until};

#[tokio::test]
async fn protocol_replication_commands() {
    let pg = PgCluster::start().unwrap();
    let mut c = replication_client(&pg).await;
    assert_eq!(c.server_major().unwrap(), pg.major);

    let id = c.identify_system().await.unwrap();
    assert_eq!(id.system_id, crate::common::system_identifier(&pg));
    assert_eq!(id.timeline, TimelineId(1));
    assert!(id.xlogpos <= current_lsn(&pg));
    assert_eq!(c.wal_segment_size().await.unwrap(), SegmentSize::DEFAULT);
    assert_eq!(c.show("max_wal_senders").await.unwrap(), "10");

    assert_eq!(c.read_replication_slot("wh_slot").await.unwrap(), None);
    c.create_physical_slot("wh_slot", true).await.unwrap();
    let info = c
        .read_replication_slot("wh_slot")
        .await
        .unwrap()
        .expect("slot exists");
    assert_eq!(info.slot_type, "physical");
    let sql_restart = pg
        .psql("select restart_lsn from pg_replication_slots where slot_name = 'wh_slot'")
        .unwrap();
    assert_eq!(
        info.restart_lsn.expect("RESERVE_WAL reserves").to_string(),
        sql_restart.trim()
    );
    if pg.major >= 15 {
        assert_eq!(info.restart_tli, Some(TimelineId(1)));
    }
    // A second create is the server's duplicate_object error, not a protocol failure.
    let err = c.create_physical_slot("wh_slot", true).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("42710"), "{err}");
    // The connection is usable after a server error.
    c.drop_slot("wh_slot", false).await.unwrap();
    assert_eq!(c.read_replication_slot("wh_slot").await.unwrap(), None);
    assert_eq!(
        pg.psql("select count(*) from pg_replication_slots")
            .unwrap()
            .trim(),
        "0"
    );
    // A slot without reserved WAL.
    c.create_physical_slot("lazy", false).await.unwrap();
    assert_eq!(
        c.read_replication_slot("lazy")
            .await
            .unwrap()
            .unwrap()
            .restart_lsn,
        None
    );
    // TIMELINE_HISTORY of timeline 1 does not exist.
    let err = c.timeline_history(TimelineId(1)).await.unwrap_err();
    assert!(err.sqlstate().is_some(), "{err}");
}

/// Creates physical slot `name` with reserved WAL; returns the start of its first segment.
pub(crate) async fn new_slot_start(c: &mut ReplicationClient, name: &str, seg: SegmentSize) -> Lsn {
    c.create_physical_slot(name, true).await.unwrap();
    c.read_replication_slot(name)
        .await
        .unwrap()
        .unwrap()
        .restart_lsn
        .unwrap()
        .segment_start(seg)
}

/// What [`receive_until`] received and how.
pub(crate) struct Received {
    /// The WAL per segment number (zeros where nothing was received).
    pub(crate) segments: BTreeMap<u64, Vec<u8>>,
    /// XLogData messages that crossed a segment boundary.
    pub(crate) crossings: usize,
    /// XLogData payloads read straight off the socket.
    pub(crate) direct_reads: usize,
    /// Messages that did both: read directly while crossing into the next segment.
    pub(crate) direct_crossings: usize,
}

/// Receives WAL from `start` until `target`, storing it per segment (split at segment
/// boundaries, as a message may cross one), answering every reply request. With `direct`,
/// payloads of at least that many bytes are read straight off the socket
/// ([`ReplicationStream::receive_payloads_directly`]).
pub(crate) async fn receive_until(
    c: &mut ReplicationClient,
    slot: &str,
    start: Lsn,
    target: Lsn,
    seg: SegmentSize,
    direct: Option<usize>,
) -> Received {
    let mut segments: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let (mut crossings, mut direct_reads, mut direct_crossings) = (0, 0, 0);
    let mut stream = c
        .start_replication(Some(slot), start, Some(TimelineId(1)))
        .await
        .unwrap();
    if let Some(min) = direct {
        stream.receive_payloads_directly(min);
    }
    let mut pos = start;
    let deadline = Instant::now() + Duration::from_secs(120);
    while pos < target {
        assert!(Instant::now() < deadline, "stuck at {pos}, want {target}");
        match tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("no message in 30s")
            .unwrap()
        {
            ReplicationEvent::XLogData {
                wal_start,
                data,
                rest,
                ..
            } => {
                assert_eq!(wal_start, pos, "gap or overlap in the stream");
                let mut data = data.to_vec();
                if rest > 0 {
                    direct_reads += 1;
                    data.reserve(rest);
                    let mut left = rest;
                    while left > 0 {
                        left -= stream.read_payload(&mut data, left).await.unwrap();
                    }
                }
                let read_directly = rest > 0;
                let mut at = wal_start;
                let mut rest = &data[..];
                if at.segment_number(seg) != (at + (data.len() as u64 - 1)).segment_number(seg) {
                    crossings += 1;
                    if read_directly {
                        direct_crossings += 1;
                    }
                }
                while !rest.is_empty() {
                    let off = at.segment_offset(seg) as usize;
                    let n = rest.len().min(seg.bytes() as usize - off);
                    let buf = segments
                        .entry(at.segment_number(seg))
                        .or_insert_with(|| vec![0; seg.bytes() as usize]);
                    buf[off..off + n].copy_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    at += n as u64;
                }
                pos = at;
            }
            ReplicationEvent::Keepalive {
                reply_requested, ..
            } => {
                if reply_requested {
                    let s = StandbyStatus::now(pos, start);
                    stream.send_status(&s).await.unwrap();
                }
            }
            ReplicationEvent::EndOfTimeline(e) => panic!("unexpected end of timeline {e:?}"),
        }
    }
    // Acknowledge everything received, then stop from our side.
    let s = StandbyStatus {
        reply_requested: true,
        ..StandbyStatus::now(pos, pos)
    };
    stream.send_status(&s).await.unwrap();
    stream.stop().await.unwrap();
    Received {
        segments,
        crossings,
        direct_reads,
        direct_crossings,
    }
}

/// Checks every complete segment received (from `from` and below `target`) against pg_wal
/// and its page headers; returns how many were compared.
pub(crate) fn assert_matches_pg_wal(
    pg: &PgCluster,
    segments: &BTreeMap<u64, Vec<u8>>,
    (from, target): (Lsn, Lsn),
    seg: SegmentSize,
    system_id: u64,
) -> usize {
    let expect = PageExpectation {
        magic: page_magic_for(pg.major).expect("supported major"),
        seg_size: seg,
        system_id: Some(system_id),
        max_tli: Some(TimelineId(1)),
    };
    let complete: Vec<u64> = segments
        .keys()
        .copied()
        .filter(|s| s * seg.bytes() >= from.0 && (s + 1) * seg.bytes() <= target.0)
        .collect();
    for segno in &complete {
        let name = SegmentId::from_segno(TimelineId(1), *segno, seg).to_string();
        let on_disk = std::fs::read(pg.wal_dir().join(&name)).unwrap();
        assert!(
            segments[segno] == on_disk,
            "segment {name} differs from pg_wal"
        );
        // pg_switch_wal leaves zero pages after the XLOG_SWITCH record.
        validate_pages(&segments[segno], Lsn(segno * seg.bytes()), &expect, true).unwrap();
    }
    complete.len()
}

#[tokio::test]
async fn protocol_streamed_wal_matches_pg_wal() {
    let pg = PgCluster::start().unwrap();
    let mut c = replication_client(&pg).await;
    let id = c.identify_system().await.unwrap();
    let seg = c.wal_segment_size().await.unwrap();
    c.create_physical_slot("wh", true).await.unwrap();
    c.create_physical_slot("wh_direct", true).await.unwrap();
    let restart = c
        .read_replication_slot("wh")
        .await
        .unwrap()
        .unwrap()
        .restart_lsn
        .unwrap();
    let start = restart.segment_start(seg);

    // Several segments of real WAL: a bulk load and many small transactions.
    pg.psql("create table t as select g, repeat(md5(g::text), 16) as pad from generate_series(1, 60000) g").unwrap();
    pg.psql(
        "do $$ begin for i in 1..2000 loop insert into t values (i, 'x'); commit; end loop; end $$",
    )
    .unwrap();
    pg.psql("select pg_switch_wal()").unwrap();
    let target = current_lsn(&pg);
    assert!(
        target.segment_number(seg) >= start.segment_number(seg) + 3,
        "test wrote too little WAL"
    );

    let whole = receive_until(&mut c, "wh", start, target, seg, None).await;
    let compared = assert_matches_pg_wal(&pg, &whole.segments, (start, target), seg, id.system_id);
    assert!(compared >= 3);
    // Again on a second slot, resumed one page into the first segment as after a reconnect,
    // with every payload not yet whole read straight off the socket. The walsender sends
    // WAL that is already flushed in MAX_SEND_SIZE pieces (16 pages) from where streaming
    // starts (XLogSendPhysical in walsender.c): from a segment start they end exactly on
    // every segment boundary, from one page further one piece straddles each boundary. So
    // the receiver certainly reads a payload directly while it crosses into the next
    // segment, at least at the two boundaries below `target` that lie a piece before it.
    let resumed = start + XLOG_BLCKSZ as u64;
    let direct = receive_until(&mut c, "wh_direct", resumed, target, seg, Some(1)).await;
    assert!(direct.direct_reads > 0, "no payload was read directly");
    // Every such piece is larger than the connection's read buffer, so each is read directly.
    assert!(
        direct.crossings >= 2 && direct.direct_crossings >= 2,
        "{} messages crossed a segment boundary, {} of them read directly",
        direct.crossings,
        direct.direct_crossings
    );
    // The first segment was received from its second page only.
    assert_eq!(
        assert_matches_pg_wal(&pg, &direct.segments, (resumed, target), seg, id.system_id),
        compared - 1
    );

    // The final status update moved the slot: restart_lsn follows the reported flush position.
    assert!(wait_until(Duration::from_secs(10), || {
        let r = psql_lsn(
            &pg,
            "select restart_lsn from pg_replication_slots where slot_name = 'wh'",
        );
        r >= target.segment_start(seg)
    }));
}

#[tokio::test]
async fn protocol_keepalive_reply_keeps_connection() {
    let pg = PgCluster::builder()
        .setting("wal_sender_timeout", "'2s'")
        .start()
        .unwrap();
    let mut c = replication_client(&pg).await;
    let seg = c.wal_segment_size().await.unwrap();
    let start = new_slot_start(&mut c, "ka", seg).await;
    let mut stream = c.start_replication(Some("ka"), start, None).await.unwrap();
    let mut pos = start;
    let mut answered = 0;
    // What the last reply said; WAL may arrive after it.
    let mut reported = start;
    let began = Instant::now();
    // Stay connected for three times wal_sender_timeout, replying only when asked.
    while began.elapsed() < Duration::from_secs(6) {
        match tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("walsender went silent")
            .unwrap()
        {
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => pos = wal_start + data.len() as u64,
            ReplicationEvent::Keepalive {
                reply_requested: true,
                ..
            } => {
                let s = StandbyStatus::now(pos, start);
                stream.send_status(&s).await.unwrap();
                answered += 1;
                reported = pos;
            }
            ReplicationEvent::Keepalive { .. } => {}
            ReplicationEvent::EndOfTimeline(e) => panic!("{e:?}"),
        }
    }
    assert!(
        answered >= 2,
        "only {answered} reply requests in 6s with wal_sender_timeout=2s"
    );
    // The server saw our reply: pg_stat_replication shows the positions we sent.
    let seen = pg
        .psql("select write_lsn, flush_lsn from pg_stat_replication")
        .unwrap();
    assert_eq!(seen.trim(), format!("{reported}|{start}"));
}

#[tokio::test]
async fn protocol_end_of_timeline_after_promotion() {
    let mut pg = PgCluster::start().unwrap();
    pg.psql("create table before_switch as select 1").unwrap();
    // Restart the same cluster as a standby and promote it: timeline 2 begins.
    pg.promote_to_new_timeline().unwrap();
    pg.psql("create table after_switch as select 2").unwrap();

    let mut c = replication_client(&pg).await;
    let id = c.identify_system().await.unwrap();
    assert_eq!(id.timeline, TimelineId(2));
    let seg = c.wal_segment_size().await.unwrap();
    let (name, content) = c.timeline_history(TimelineId(2)).await.unwrap();
    assert_eq!(name, "00000002.history");
    assert_eq!(content, std::fs::read(pg.wal_dir().join(&name)).unwrap());
    let history = TimelineHistory::parse(TimelineId(2), &content).unwrap();
    let switchpoint = history.switchpoint_of(TimelineId(1)).unwrap();

    // Streaming timeline 1 ends at the switchpoint and names timeline 2.
    let start = switchpoint.segment_start(seg);
    let mut stream = c
        .start_replication(None, start, Some(TimelineId(1)))
        .await
        .unwrap();
    let mut pos = start;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .unwrap()
            .unwrap()
        {
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => {
                assert_eq!(wal_start, pos);
                pos = wal_start + data.len() as u64;
            }
            ReplicationEvent::Keepalive { .. } => {}
            ReplicationEvent::EndOfTimeline(end) => break end,
        }
    };
    assert_eq!(
        pos, switchpoint,
        "timeline 1 data must stop exactly at the switchpoint"
    );
    assert_eq!(end.next_tli, Some(TimelineId(2)));
    assert_eq!(end.next_tli_start, Some(switchpoint));

    // The connection is idle again: continue on timeline 2 from the switchpoint.
    let mut stream = c
        .start_replication(None, switchpoint.segment_start(seg), Some(TimelineId(2)))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .unwrap()
        .unwrap()
    {
        ReplicationEvent::XLogData { wal_start, .. } => {
            assert_eq!(wal_start, switchpoint.segment_start(seg))
        }
        other => panic!("expected WAL on timeline 2, got {other:?}"),
    }
    stream.stop().await.unwrap();

    // Asking for exactly the end of timeline 1 yields the end at once, without CopyBoth.
    let mut stream = c
        .start_replication(None, switchpoint, Some(TimelineId(1)))
        .await
        .unwrap();
    match stream.next().await.unwrap() {
        ReplicationEvent::EndOfTimeline(e) => assert_eq!(e.next_tli, Some(TimelineId(2))),
        other => panic!("expected end of timeline, got {other:?}"),
    }
}
