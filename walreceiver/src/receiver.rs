//! The receive loop: connect, pick the start position, stream into the spool, verify and hand
//! on complete segments, follow timeline switches, report positions honestly, reconnect.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use walhoard_protocol::xlog::{page_magic_for, validate_pages};
use walhoard_protocol::{
    ConnectParams, Error as PgError, Lsn, PageExpectation, ReplicationClient, ReplicationEvent,
    ReplicationStream, SegmentId, SegmentSize, StandbyStatus, TimelineId, WalSegmentName,
};

use crate::buffers::{SegmentBuffer, SegmentBuffers};
use crate::position::{flush_position, SpoolDurable};
use crate::spool::{write_durable, SegmentFile};
use crate::ReceiverError;

/// SQLSTATE of "requested WAL segment ... has already been removed" (errcode_for_file_access
/// on ENOENT: ERRCODE_UNDEFINED_FILE).
const WAL_REMOVED: &str = "58P01";

/// XLogData payloads at least this long are read straight into the segment (the walsender
/// sends up to 128 kB at a time while catching up; small ones are not worth a second read).
const DIRECT_PAYLOAD_MIN: usize = 16 * 1024;

/// Called once, on the first connection, with the slot's position (its restart_lsn at a segment
/// boundary, on the timeline that wrote it): returns where streaming should really start, after
/// the segments the archive (or a local spool) already holds. It must not return a position
/// past WAL that is not held somewhere: the receiver skips straight to it. It may return a
/// position *before* the slot's (the archive ends there: the slot was dropped and created
/// again): the receiver then streams from there while the primary still has that WAL, and
/// reports a [`ReceiverEvent::WalGap`] when it does not.
///
/// It also gets the primary's system identifier (IDENTIFY_SYSTEM) and may refuse to stream
/// at all (`Err`: the archive belongs to another cluster): the receiver then drops the slot
/// if this session created it and stops with [`crate::ReceiverError::Refused`], never retrying.
pub type ResumeHook = Arc<
    dyn Fn(
            StartPosition,
            SegmentSize,
            u64,
        ) -> Pin<Box<dyn Future<Output = Result<Lsn, String>> + Send>>
        + Send
        + Sync,
>;

/// What the receiver needs to know.
#[derive(Clone)]
pub struct ReceiverConfig {
    pub conn: ConnectParams,
    pub slot: String,
    /// Create the slot (with RESERVE_WAL) when it does not exist.
    pub create_slot: bool,
    pub spool_dir: PathBuf,
    /// How often a status update is sent unprompted; keep it below wal_sender_timeout.
    pub status_interval: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Where to really start when no start position was given; see [`ResumeHook`].
    pub resume: Option<ResumeHook>,
    /// While this says true the receiver stays disconnected (the daemon's disk guard); the
    /// slot keeps the WAL meanwhile.
    pub pause: Option<watch::Receiver<bool>>,
    /// Whether spool files are fdatasync'd; see [`SpoolSync`].
    pub spool_sync: SpoolSync,
    /// Buffers complete segments are handed on in (see [`crate::buffers`]).
    pub buffers: SegmentBuffers,
}

/// When the spool is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolSync {
    /// Every status update fdatasyncs the segment being received; complete segments and the
    /// renames are durable before they are handed on.
    Always,
    /// Only when the server may drop WAL the slot holds (`max_slot_wal_keep_size` is set): the
    /// flush position reported is the archive's, so the slot keeps every byte the archive does
    /// not hold yet, and the spool is then only a cache in front of it. A crash of the process
    /// keeps its files (the page cache survives); after a crash of the machine the daemon
    /// trusts no spool file of the earlier boot.
    Auto,
}

impl std::fmt::Debug for ReceiverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverConfig")
            .field("conn", &self.conn)
            .field("slot", &self.slot)
            .field("create_slot", &self.create_slot)
            .field("spool_dir", &self.spool_dir)
            .field("status_interval", &self.status_interval)
            .field("resume", &self.resume.is_some())
            .finish()
    }
}

impl ReceiverConfig {
    pub fn new(conn: ConnectParams, slot: &str, spool_dir: PathBuf) -> Self {
        ReceiverConfig {
            conn,
            slot: slot.to_string(),
            create_slot: true,
            spool_dir,
            status_interval: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            resume: None,
            pause: None,
            spool_sync: SpoolSync::Always,
            buffers: SegmentBuffers::new(2),
        }
    }
}

/// Where to resume: the first byte the archive does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartPosition {
    pub lsn: Lsn,
    /// The timeline `lsn` belongs to; the server's current one when unknown.
    pub tli: Option<TimelineId>,
}

/// What the receiver reports to whoever archives its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// Streaming (re)started.
    Connected {
        system_id: u64,
        seg_size: SegmentSize,
        server_tli: TimelineId,
        start: Lsn,
        start_tli: TimelineId,
    },
    /// A complete segment, verified. `data` holds its bytes when a segment buffer was free;
    /// `path` is its spool file (durable unless the spool is only a cache,
    /// [`SpoolSync::Auto`]), which does not exist when the spool is not durable and the
    /// segment was received into its buffer alone.
    Segment {
        name: WalSegmentName,
        path: PathBuf,
        start: Lsn,
        data: Option<Arc<SegmentBuffer>>,
    },
    /// The last segment of a timeline that ended at `end`, durable under its `.partial` name.
    TimelinePartial {
        name: WalSegmentName,
        path: PathBuf,
        end: Lsn,
    },
    /// A timeline history file fetched from the server, durable in the spool.
    History { name: WalSegmentName, path: PathBuf },
    /// WAL from `from` up to `to` (segment boundaries, timeline `tli`) is lost: it was to be
    /// streamed because the archive does not hold it, but the primary has removed it
    /// (SQLSTATE 58P01, "requested WAL segment ... has already been removed") and the slot
    /// starts only at `to`. Streaming continues at `to`.
    WalGap {
        from: Lsn,
        to: Lsn,
        tli: TimelineId,
        /// The server's error.
        error: String,
    },
    /// The connection was lost or could not be made; the receiver retries.
    Disconnected {
        error: String,
        retryable: bool,
        auth_failure: bool,
        /// The server's SQLSTATE when it refused us (28P01 wrong password, 28000 no pg_hba
        /// entry, ...).
        sqlstate: Option<String>,
        /// The server's major version is not one walhoard reads.
        unsupported_version: bool,
    },
}

/// Positions the receiver has reached, for status reporting (state file, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReceiverPositions {
    /// Every byte before this has been received and written to the spool.
    pub received_lsn: Lsn,
    /// The flush position last reported to the server (`position::flush_position`): the
    /// archive's end, or past it by what the spool holds durably of the first segment the
    /// archive lacks, never beyond that segment's last byte; so the slot never releases WAL
    /// the archive does not hold.
    pub reported_flush_lsn: Lsn,
    /// The timeline being received (0 before the first connection).
    pub timeline: u32,
}

enum SessionEnd {
    Cancelled,
    Paused,
}

/// Streams WAL until `cancel` fires. `archived` carries the archive's end: every byte before it
/// is durable in the archive. Errors are reported as [`ReceiverEvent::Disconnected`] and retried
/// with capped exponential backoff; only a closed event channel ends the loop with an error.
pub async fn run(
    cfg: ReceiverConfig,
    start: Option<StartPosition>,
    events: mpsc::Sender<ReceiverEvent>,
    archived: watch::Receiver<Lsn>,
    positions: watch::Sender<ReceiverPositions>,
    cancel: CancellationToken,
) -> Result<(), ReceiverError> {
    let mut state = Session {
        cfg,
        next: start,
        events,
        archived,
        positions,
        cancel,
        flush_floor: Lsn::INVALID,
        durable: true,
        seg: SegmentSize::DEFAULT,
    };
    let mut backoff = state.cfg.reconnect_min;
    loop {
        if state.cancel.is_cancelled() {
            return Ok(());
        }
        let before = state.next;
        if let Some(pause) = state.cfg.pause.clone() {
            if !wait_unpaused(pause, &state.cancel, &state.cfg.slot).await {
                return Ok(());
            }
        }
        let e = match state.session().await {
            Ok(SessionEnd::Cancelled) => return Ok(()),
            Ok(SessionEnd::Paused) => {
                backoff = state.cfg.reconnect_min;
                continue;
            }
            Err(ReceiverError::EventsClosed) => return Err(ReceiverError::EventsClosed),
            // Retrying cannot help: whoever archives the output said no.
            Err(ReceiverError::Refused(why)) => return Err(ReceiverError::Refused(why)),
            Err(e) => e,
        };
        let sqlstate = match &e {
            ReceiverError::Pg(PgError::Server(s)) => Some(s.code.clone()),
            _ => None,
        };
        let unsupported_version = matches!(e, ReceiverError::Unsupported(_));
        let (retryable, auth_failure) = match &e {
            ReceiverError::Pg(pg) => {
                // A session that completed a segment made progress: retry quickly again.
                if state.next != before {
                    backoff = state.cfg.reconnect_min;
                }
                if matches!(pg, PgError::Protocol(_)) {
                    // The server broke the protocol (or is not what it claims): worth more
                    // than a warning, although a reconnect may find it sane again.
                    tracing::error!(slot = %state.cfg.slot, error = %e, retry_in = ?backoff, "protocol violation by the server");
                } else {
                    tracing::warn!(slot = %state.cfg.slot, error = %e, retry_in = ?backoff, "replication connection failed");
                }
                (pg.is_retryable(), pg.is_auth_failure())
            }
            _ => {
                tracing::error!(slot = %state.cfg.slot, error = %e, retry_in = ?backoff, "WAL receiving failed");
                (true, false)
            }
        };
        let ev = ReceiverEvent::Disconnected {
            error: e.to_string(),
            retryable,
            auth_failure,
            sqlstate,
            unsupported_version,
        };
        state
            .events
            .send(ev)
            .await
            .map_err(|_| ReceiverError::EventsClosed)?;
        tokio::select! {
            _ = state.cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(state.cfg.reconnect_max);
    }
}

/// Waits while `pause` says true; false when cancelled first.
async fn wait_unpaused(
    mut pause: watch::Receiver<bool>,
    cancel: &CancellationToken,
    slot: &str,
) -> bool {
    if *pause.borrow() {
        tracing::warn!(%slot, "receiving paused");
        tokio::select! {
            _ = cancel.cancelled() => return false,
            r = pause.wait_for(|p| !*p) => if r.is_err() { return true },
        }
        tracing::info!(%slot, "receiving resumed");
    }
    true
}

struct Session {
    cfg: ReceiverConfig,
    /// Where the next connection starts; advanced as segments are completed.
    next: Option<StartPosition>,
    events: mpsc::Sender<ReceiverEvent>,
    archived: watch::Receiver<Lsn>,
    positions: watch::Sender<ReceiverPositions>,
    cancel: CancellationToken,
    /// The slot's restart_lsn when this session began.
    flush_floor: Lsn,
    /// The spool is fdatasync'd in this session ([`SpoolSync`]).
    durable: bool,
    /// The server's WAL segment size (known once connected).
    seg: SegmentSize,
}

/// How one START_REPLICATION ended.
enum StreamEnd {
    Cancelled,
    Paused,
    /// The timeline ended; continue on `next_tli` at `next_start`.
    Switch {
        next_tli: TimelineId,
        next_start: Lsn,
    },
}

impl Session {
    async fn send(&self, ev: ReceiverEvent) -> Result<(), ReceiverError> {
        self.events
            .send(ev)
            .await
            .map_err(|_| ReceiverError::EventsClosed)
    }

    async fn session(&mut self) -> Result<SessionEnd, ReceiverError> {
        let mut client = ReplicationClient::connect(&self.cfg.conn).await?;
        let id = client.identify_system().await?;
        let seg = client.wal_segment_size().await?;
        self.seg = seg;
        let major = client.server_major()?;
        let magic = page_magic_for(major).ok_or(ReceiverError::Unsupported(major))?;
        let durable = match self.cfg.spool_sync {
            SpoolSync::Always => true,
            SpoolSync::Auto => match client.show("max_slot_wal_keep_size").await {
                // -1: the slot keeps WAL for as long as it is not confirmed.
                Ok(v) => v.trim() != "-1",
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read max_slot_wal_keep_size; keeping the spool durable");
                    true
                }
            },
        };
        if durable != self.durable {
            tracing::info!(slot = %self.cfg.slot, durable, "spool durability");
            self.durable = durable;
        }
        let slot = self.cfg.slot.clone();
        let slot = slot.as_str();
        let mut info = client.read_replication_slot(slot).await?;
        let created_slot = info.is_none() && self.cfg.create_slot;
        if created_slot {
            client.create_physical_slot(slot, true).await?;
            tracing::info!(%slot, "created physical replication slot");
            info = client.read_replication_slot(slot).await?;
        }
        let info = info.ok_or_else(|| {
            PgError::Config(format!(
                "replication slot {slot:?} does not exist and create_slot is off"
            ))
        })?;
        let restart = info.restart_lsn;
        let (mut pos, known_tli) = match self.next {
            Some(p) => (p.lsn, p.tli),
            None => (restart.unwrap_or(id.xlogpos), info.restart_tli),
        };
        // Always stream whole segments: a segment in the archive is complete or absent.
        pos = pos.segment_start(seg);
        if let Some(r) = restart {
            if pos < r.segment_start(seg) {
                // START_REPLICATION on a physical slot does not check the slot's restart_lsn
                // (StartReplication in walsender.c): the server streams what it still has and
                // fails with 58P01 where it has not (handled below).
                tracing::warn!(%slot, wanted = %pos, slot_at = %r, "the slot starts after the archive's end (was it dropped and created again?): streaming from the archive's end while the primary still has that WAL");
            }
        }
        let first_session = self.next.is_none();
        let mut tli = match known_tli {
            Some(t) => t,
            // Which timeline wrote `pos`: the server's history says (tliOfPointInHistory).
            None if id.timeline.get() > 1 => {
                let (_, content) = client.timeline_history(id.timeline).await?;
                walhoard_protocol::TimelineHistory::parse(id.timeline, &content)
                    .map_err(|e| ReceiverError::BadWal(e.to_string()))?
                    .timeline_of(pos)
            }
            None => id.timeline,
        };
        if first_session {
            if let Some(hook) = &self.cfg.resume {
                let verdict = hook(
                    StartPosition {
                        lsn: pos,
                        tli: Some(tli),
                    },
                    seg,
                    id.system_id,
                )
                .await;
                let mut at = match verdict {
                    Ok(at) => at,
                    Err(why) => {
                        // A slot nobody will ever read would hold the primary's WAL forever.
                        if created_slot {
                            if let Err(e) = client.drop_slot(slot, false).await {
                                tracing::warn!(%slot, error = %e, "cannot drop the slot this session created");
                            } else {
                                tracing::info!(%slot, "dropped the slot this session created: nothing will stream");
                            }
                        }
                        client.close().await.ok();
                        return Err(ReceiverError::Refused(why));
                    }
                };
                if tli != id.timeline {
                    // Never skip past the end of an old timeline: the segment holding the
                    // switchpoint must be streamed so that it ends in a `.partial`.
                    let (_, content) = client.timeline_history(id.timeline).await?;
                    let history = walhoard_protocol::TimelineHistory::parse(id.timeline, &content)
                        .map_err(|e| ReceiverError::BadWal(e.to_string()))?;
                    if let Some(end) = history.switchpoint_of(tli) {
                        at = at.min(end.segment_start(seg));
                    }
                }
                if at > pos {
                    tracing::info!(%slot, slot_at = %pos, resume_at = %at, "segments from the slot's position on are already held; skipping them");
                    pos = at.segment_start(seg);
                } else if at.is_valid() && at < pos {
                    tracing::warn!(%slot, slot_at = %pos, resume_at = %at, "the archive ends before the slot's position: streaming from the archive's end while the primary still has that WAL");
                    pos = at.segment_start(seg);
                }
            }
            // The hook ran (and may have queued work): later sessions continue from here.
            self.next = Some(StartPosition {
                lsn: pos,
                tli: Some(tli),
            });
        }
        // Reporting a flush position below the slot's restart_lsn would move the slot back;
        // until the archive passes it, report none (the server ignores an invalid flush).
        self.flush_floor = restart.unwrap_or(Lsn::INVALID);
        loop {
            let expect = PageExpectation {
                magic,
                seg_size: seg,
                system_id: Some(id.system_id),
                max_tli: Some(tli),
            };
            self.send(ReceiverEvent::Connected {
                system_id: id.system_id,
                seg_size: seg,
                server_tli: id.timeline,
                start: pos,
                start_tli: tli,
            })
            .await?;
            tracing::info!(%slot, start = %pos, timeline = %tli, "streaming");
            let streamed = self.stream(&mut client, pos, tli, seg, &expect).await;
            let streamed = match streamed {
                Err(ReceiverError::Pg(PgError::Server(e))) if e.code == WAL_REMOVED => {
                    // Where streaming would resume: what the primary no longer has.
                    let from = self.next.map_or(pos, |p| p.lsn).segment_start(seg);
                    let to = restart.map(|r| r.segment_start(seg));
                    match to {
                        Some(to) if from < to => {
                            let error = format!("{}: {}", e.code, e.message);
                            tracing::error!(%slot, from = %from, to = %to, timeline = %tli, %error, "WAL the archive lacks is gone from the primary: continuing at the slot's position");
                            self.send(ReceiverEvent::WalGap {
                                from,
                                to,
                                tli,
                                error,
                            })
                            .await?;
                            self.next = Some(StartPosition {
                                lsn: to,
                                tli: Some(tli),
                            });
                        }
                        _ => {}
                    }
                    return Err(PgError::Server(e).into());
                }
                other => other?,
            };
            match streamed {
                StreamEnd::Cancelled => return Ok(SessionEnd::Cancelled),
                StreamEnd::Paused => {
                    client.close().await.ok();
                    return Ok(SessionEnd::Paused);
                }
                StreamEnd::Switch {
                    next_tli,
                    next_start,
                } => {
                    let (name, content) = client.timeline_history(next_tli).await?;
                    let parsed: WalSegmentName = name
                        .parse()
                        .map_err(|e| PgError::protocol(format!("history file name: {e}")))?;
                    if parsed != WalSegmentName::History(next_tli) {
                        return Err(PgError::protocol(format!(
                            "TIMELINE_HISTORY {next_tli} returned {name}"
                        ))
                        .into());
                    }
                    walhoard_protocol::TimelineHistory::parse(next_tli, &content)
                        .map_err(|e| ReceiverError::BadWal(e.to_string()))?;
                    let path = write_durable(&self.cfg.spool_dir, &name, &content)?;
                    self.send(ReceiverEvent::History { name: parsed, path })
                        .await?;
                    tracing::info!(%slot, from = %tli, to = %next_tli, at = %next_start, "timeline switch");
                    // Continue from the start of the segment holding the switchpoint, as
                    // pg_receivewal does: the new timeline's copy of that segment is complete.
                    tli = next_tli;
                    pos = next_start.segment_start(seg);
                    self.next = Some(StartPosition {
                        lsn: pos,
                        tli: Some(tli),
                    });
                }
            }
        }
    }

    /// Leaves the stream with `end`: the segment being received made durable, and the
    /// server told where we are (a failed report is ignored: the next session reports).
    async fn leave(
        &self,
        stream: &mut ReplicationStream<'_>,
        current: &mut Option<Incoming>,
        spool: &mut SpoolDurable,
        received: Lsn,
        tli: TimelineId,
        end: StreamEnd,
    ) -> Result<StreamEnd, ReceiverError> {
        sync_spool(current, spool)?;
        let _ = stream.send_status(&self.report(received, spool, tli)).await;
        Ok(end)
    }

    fn report(&self, received: Lsn, spool: &SpoolDurable, tli: TimelineId) -> StandbyStatus {
        let archived = *self.archived.borrow();
        let flush = flush_position(archived, spool, self.flush_floor, self.seg);
        self.positions.send_replace(ReceiverPositions {
            received_lsn: received,
            reported_flush_lsn: flush,
            timeline: tli.get(),
        });
        StandbyStatus::now(received, flush)
    }

    async fn stream(
        &mut self,
        client: &mut ReplicationClient,
        start: Lsn,
        tli: TimelineId,
        seg: SegmentSize,
        expect: &PageExpectation,
    ) -> Result<StreamEnd, ReceiverError> {
        let mut stream = client
            .start_replication(Some(&self.cfg.slot), start, Some(tli))
            .await?;
        let mut current: Option<Incoming> = None;
        let mut received = start;
        // What the spool holds durably: from the start in a durable spool; in a spool that is
        // only a cache, nothing until a reply-requested keepalive makes the segment being
        // received durable.
        let mut spool = SpoolDurable::default();
        if self.durable {
            spool.extend(start, start);
        }
        let mut ticker = tokio::time::interval(self.cfg.status_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut archived = self.archived.clone();
        let mut archive_open = true;
        let mut pause = self.cfg.pause.clone();
        // For segments received without a buffer (none free, or started mid-segment), one
        // buffer for every read-back: a fresh 16 MiB allocation per segment let glibc raise
        // its mmap threshold and keep freed buffers in per-thread arenas, so the daemon's RSS
        // grew with the backlog (docs/benchmarks.md).
        let mut verify_buf = Vec::new();
        // XLogData payloads are read from the socket straight into the segment buffer (into
        // this, then the spool file, for a segment without one): no copy out of the
        // connection's buffer (docs/benchmarks.md).
        stream.receive_payloads_directly(DIRECT_PAYLOAD_MIN);
        let mut scratch = Vec::new();
        let durable = self.durable;
        let dir = self.cfg.spool_dir.clone();
        loop {
            // The spool writes below are synchronous: they go to the page cache, and the one
            // fdatasync per status update is what bounds how stale the reported flush is.
            tokio::select! {
                _ = self.cancel.cancelled() => {
                    return self.leave(&mut stream, &mut current, &mut spool, received, tli, StreamEnd::Cancelled).await;
                }
                Ok(_) = async { pause.as_mut().expect("guarded").wait_for(|p| *p).await.map(|_| ()) }, if pause.is_some() => {
                    return self.leave(&mut stream, &mut current, &mut spool, received, tli, StreamEnd::Paused).await;
                }
                _ = ticker.tick() => {
                    sync_spool(&mut current, &mut spool)?;
                    stream.send_status(&self.report(received, &spool, tli)).await?;
                }
                changed = archived.changed(), if archive_open => {
                    if changed.is_ok() {
                        // Let the slot advance as soon as the archive does.
                        stream.send_status(&self.report(received, &spool, tli)).await?;
                    } else {
                        archive_open = false;
                    }
                }
                ev = stream.next() => match ev? {
                    ReplicationEvent::XLogData { wal_start, data, rest: mut direct, .. } => {
                        if wal_start != received {
                            return Err(PgError::protocol(format!("WAL at {wal_start} does not continue at {received}")).into());
                        }
                        let mut rest = &data[..];
                        while !rest.is_empty() || direct > 0 {
                            let cur = match current.as_mut() {
                                Some(c) => c,
                                None => current.insert(Incoming::open(&dir, tli, received, seg, durable, &self.cfg.buffers)?),
                            };
                            let n = if !rest.is_empty() {
                                let n = cur.write(received, rest)?;
                                rest = &rest[n..];
                                n
                            } else {
                                // The payload's remainder, from the socket into the segment.
                                let n = tokio::select! {
                                    _ = self.cancel.cancelled() => {
                                        return self.leave(&mut stream, &mut current, &mut spool, received, tli, StreamEnd::Cancelled).await;
                                    }
                                    n = cur.read_direct(&mut stream, direct, &mut scratch) => n?,
                                };
                                direct -= n;
                                n
                            };
                            received = Lsn(received.0 + n as u64);
                            if let Some(cur) = current.as_mut() {
                                // A segment that does not begin with a valid long page header
                                // is refused at once, before any of it counts as held.
                                cur.check_first_page(expect, &mut verify_buf)?;
                            }
                            if current.as_ref().is_some_and(Incoming::is_full) {
                                let done = current.take().expect("current segment");
                                done.verify(expect, &mut verify_buf)?;
                                let (id, seg_start) = (done.id, done.start);
                                let was_durable = done.is_durable();
                                let (path, data) = done.complete(&dir)?;
                                if was_durable {
                                    spool.extend(seg_start, received);
                                }
                                self.next = Some(StartPosition { lsn: received, tli: Some(tli) });
                                // A bounded channel: a slow archive slows receiving, never drops WAL.
                                self.send(ReceiverEvent::Segment { name: WalSegmentName::Segment(id), path, start: seg_start, data: data.map(Arc::new) }).await?;
                            }
                        }
                    }
                    ReplicationEvent::Keepalive { reply_requested, .. } => {
                        if reply_requested {
                            // The walsender asks when it waits for us, above all at shutdown
                            // (WalSndDone exits once the reported flush reaches what it sent):
                            // make the segment being received durable even in a spool that is
                            // only a cache, as pg_receivewal's ProcessKeepaliveMsg syncs its
                            // file, so the flush can reach it when the archive holds the rest.
                            if let Some(cur) = current.as_mut() {
                                let to = cur.make_durable(&dir, seg)?;
                                if cur.first_page_checked {
                                    spool.extend(cur.start, to);
                                }
                            }
                            stream.send_status(&self.report(received, &spool, tli)).await?;
                        }
                    }
                    ReplicationEvent::EndOfTimeline(end) => {
                        let next_tli = end.next_tli.ok_or_else(|| PgError::protocol("server ended the timeline without naming the next one"))?;
                        let next_start = end.next_tli_start.unwrap_or(received);
                        // Timelines only ever go up (a promotion picks a new, higher one:
                        // findNewestTimeLine + 1); a server announcing the same or an earlier
                        // one is broken or not the server we streamed from.
                        if next_tli <= tli {
                            return Err(PgError::protocol(format!("timeline {tli} ended at {received} announcing timeline {next_tli} as the next one, which is not later than {tli}")).into());
                        }
                        if next_start != received {
                            return Err(PgError::protocol(format!("timeline {tli} ended at {received}, but timeline {next_tli} starts at {next_start}")).into());
                        }
                        if let Some(cur) = current.take() {
                            let id = cur.id;
                            let path = cur.finish_partial(&dir, expect, &mut verify_buf)?;
                            self.send(ReceiverEvent::TimelinePartial { name: WalSegmentName::Partial(id), path, end: received }).await?;
                        }
                        return Ok(StreamEnd::Switch { next_tli, next_start });
                    }
                }
            }
        }
    }
}

/// Makes the segment being received durable (when the spool is) and records it in `spool`.
fn sync_spool(current: &mut Option<Incoming>, spool: &mut SpoolDurable) -> std::io::Result<()> {
    if let Some(cur) = current.as_mut() {
        if let Some(to) = cur.sync()? {
            spool.extend(cur.start, to);
        }
    }
    Ok(())
}

/// The segment being received: into a segment buffer, into its spool file, or both.
///
/// A buffer alone when the spool is not durable ([`SpoolSync::Auto`] on a server whose slots
/// keep all WAL) and a buffer was free at the segment's first byte: such a file would only
/// ever be read by a daemon restarted in the same boot, which the slot serves as well, and
/// writing it took a fifth of the daemon's CPU in the WAL drain (docs/benchmarks.md). The
/// spool file alone when no buffer was free (the archive is behind: the spool absorbs the
/// backlog, memory stays at `buffers × segment size`). Both when the spool is durable.
struct Incoming {
    id: SegmentId,
    start: Lsn,
    seg_bytes: u64,
    /// Bytes from the segment start that are received.
    written: u64,
    file: Option<SegmentFile>,
    buf: Option<SegmentBuffer>,
    /// The first page's header was checked ([`Incoming::check_first_page`]).
    first_page_checked: bool,
}

impl Incoming {
    fn open(
        dir: &Path,
        tli: TimelineId,
        at: Lsn,
        seg: SegmentSize,
        durable: bool,
        buffers: &SegmentBuffers,
    ) -> std::io::Result<Self> {
        let start = at.segment_start(seg);
        // Only a segment received from its first byte is whole in memory.
        let buf = if at == start {
            buffers.try_take(seg.bytes() as usize)
        } else {
            None
        };
        let file = if durable || buf.is_none() {
            Some(SegmentFile::open(dir, tli, at, seg, durable)?)
        } else {
            None
        };
        Ok(Incoming {
            id: SegmentId::containing(tli, at, seg),
            start,
            seg_bytes: seg.bytes(),
            written: at.segment_offset(seg),
            file,
            buf,
            // Received from the middle: the first page came in an earlier session and is
            // checked with the whole segment.
            first_page_checked: at != start,
        })
    }

    /// Checks the segment's first page as soon as it is all received, so that a segment that
    /// is no WAL (zeros, another cluster's) fails at once, before any of it is reported held.
    fn check_first_page(
        &mut self,
        expect: &PageExpectation,
        scratch: &mut Vec<u8>,
    ) -> Result<(), ReceiverError> {
        let page = walhoard_protocol::xlog::XLOG_BLCKSZ;
        if self.first_page_checked || (self.written as usize) < page {
            return Ok(());
        }
        let data: &[u8] = match (&self.buf, &self.file) {
            (Some(b), _) => &b[..page],
            (None, Some(f)) => {
                f.read_first_page_into(scratch, page)?;
                scratch
            }
            (None, None) => unreachable!("a segment is received into a buffer or a file"),
        };
        validate_pages(data, self.start, expect, true)
            .map_err(|e| ReceiverError::BadWal(format!("segment {}: {e}", self.id)))?;
        self.first_page_checked = true;
        Ok(())
    }

    /// Whether the segment is being written to a durable spool file.
    fn is_durable(&self) -> bool {
        self.file.as_ref().is_some_and(SegmentFile::is_durable)
    }

    /// Makes what is received of this segment durable in the spool even when the spool is
    /// only a cache (writing the buffer out to a file first if the segment has none); the
    /// segment stays durable from then on. Returns the durable end.
    fn make_durable(&mut self, dir: &Path, seg: SegmentSize) -> std::io::Result<Lsn> {
        if self.file.is_none() {
            let mut f = SegmentFile::open(dir, self.id.tli, self.start, seg, true)?;
            if let Some(b) = &self.buf {
                f.write(self.start, b)?;
            }
            self.file = Some(f);
        }
        let f = self.file.as_mut().expect("just opened");
        f.make_durable()?;
        Ok(f.synced_lsn())
    }

    fn written_lsn(&self) -> Lsn {
        Lsn(self.start.0 + self.written)
    }

    fn is_full(&self) -> bool {
        self.written == self.seg_bytes
    }

    /// Takes `data`, which starts at `at` (the current end); returns how many bytes fit in
    /// this segment.
    fn write(&mut self, at: Lsn, data: &[u8]) -> std::io::Result<usize> {
        if at != self.written_lsn() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "WAL at {at} does not continue segment {} at {}",
                    self.id,
                    self.written_lsn()
                ),
            ));
        }
        let n = ((self.seg_bytes - self.written) as usize).min(data.len());
        if let Some(f) = self.file.as_mut() {
            f.write(at, &data[..n])?;
        }
        if let Some(b) = self.buf.as_mut() {
            b.extend(&data[..n]);
        }
        self.written += n as u64;
        Ok(n)
    }

    /// Reads up to `want` bytes of the stream's pending XLogData payload (which continues this
    /// segment at its end) straight into the segment buffer, or through `scratch` into the
    /// spool file when the segment has no buffer; the spool file, when there is one, gets the
    /// same bytes. Returns how many. Cancel-safe: a cancelled read took nothing.
    async fn read_direct(
        &mut self,
        stream: &mut ReplicationStream<'_>,
        want: usize,
        scratch: &mut Vec<u8>,
    ) -> Result<usize, ReceiverError> {
        let at = self.written_lsn();
        let want = want.min((self.seg_bytes - self.written) as usize);
        let n = match self.buf.as_mut() {
            Some(b) => {
                let from = b.len();
                let n = stream.read_payload(b.vec_mut(), want).await?;
                if let Some(f) = self.file.as_mut() {
                    f.write(at, &b[from..from + n])?;
                }
                n
            }
            None => {
                scratch.clear();
                scratch.reserve(want);
                let n = stream.read_payload(scratch, want).await?;
                self.file
                    .as_mut()
                    .expect("a segment without a buffer is received into a file")
                    .write(at, &scratch[..n])?;
                n
            }
        };
        self.written += n as u64;
        Ok(n)
    }

    /// Syncs the spool file when it is durable and returns its durable end; `None` when the
    /// segment is not durable (only a cache in front of the slot) or its first page is not
    /// checked yet (nothing of a segment that may be no WAL at all counts as held).
    fn sync(&mut self) -> std::io::Result<Option<Lsn>> {
        match self.file.as_mut() {
            Some(f) if f.is_durable() && self.first_page_checked => {
                f.sync()?;
                Ok(Some(f.synced_lsn()))
            }
            _ => Ok(None),
        }
    }

    /// Checks the page headers of the whole segment before it is handed on as good: in its
    /// buffer, or read back from the spool file into `scratch`.
    fn verify(&self, expect: &PageExpectation, scratch: &mut Vec<u8>) -> Result<(), ReceiverError> {
        let data: &[u8] = match (&self.buf, &self.file) {
            (Some(b), _) => b,
            (None, Some(f)) => {
                f.read_all_into(scratch)?;
                scratch
            }
            (None, None) => unreachable!("a segment is received into a buffer or a file"),
        };
        // Zero pages may end a segment (after an XLOG_SWITCH record).
        validate_pages(data, self.start, expect, true)
            .map_err(|e| ReceiverError::BadWal(format!("segment {}: {e}", self.id)))
    }

    /// Renames the spool file to the segment's name; returns that path (which does not exist
    /// when the segment was received into its buffer alone) and the buffer.
    fn complete(self, dir: &Path) -> std::io::Result<(PathBuf, Option<SegmentBuffer>)> {
        let path = match self.file {
            Some(f) => f.complete()?,
            None => dir.join(WalSegmentName::Segment(self.id).to_string()),
        };
        Ok((path, self.buf))
    }

    /// The last segment of a timeline: verified and left durable under its `.partial` name
    /// (after a switch the server may no longer serve it), zeros after the end as PostgreSQL
    /// leaves it.
    fn finish_partial(
        mut self,
        dir: &Path,
        expect: &PageExpectation,
        scratch: &mut Vec<u8>,
    ) -> Result<PathBuf, ReceiverError> {
        if let Some(b) = self.buf.as_mut() {
            b.zero_fill(self.seg_bytes as usize);
        }
        self.verify(expect, scratch)?;
        Ok(match (self.file, self.buf) {
            (Some(f), _) => f.finish_partial()?,
            (None, Some(b)) => {
                write_durable(dir, &WalSegmentName::Partial(self.id).to_string(), &b)?
            }
            (None, None) => unreachable!("a segment is received into a buffer or a file"),
        })
    }
}
