//! The receive loop: connect, pick the start position, stream into the spool, verify and hand
//! on complete segments, follow timeline switches, report positions honestly, reconnect.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use walhoard_protocol::{
    Backoff, Error as PgError, Lsn, PageExpectation, ReplicationClient, ReplicationEvent,
    ReplicationStream, SegmentSize, StandbyStatus, TimelineId, WalSegmentName,
};

use crate::buffers::SegmentBuffer;
use crate::incoming::{sync_spool, Incoming};
use crate::partial::{Arrivals, Partials};
use crate::position::{flush_position, SpoolDurable};
use crate::{
    Batch, DisconnectReason, ReceiverConfig, ReceiverError, ReceiverEvent, ReceiverPositions,
    StartPosition,
};

/// XLogData payloads at least this long are read straight into the segment (the walsender
/// sends up to 128 kB at a time while catching up; small ones are not worth a second read).
const DIRECT_PAYLOAD_MIN: usize = 16 * 1024;

pub(crate) enum SessionEnd {
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
        arrivals: std::sync::Mutex::new(Arrivals::default()),
        sessions: 0,
    };
    let mut backoff = Backoff::new(state.cfg.reconnect_min, state.cfg.reconnect_max);
    let mut wait = backoff.next_wait();
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
                backoff.reset();
                wait = backoff.next_wait();
                continue;
            }
            Err(ReceiverError::EventsClosed) => return Err(ReceiverError::EventsClosed),
            // Retrying cannot help: whoever archives the output said no.
            Err(ReceiverError::Refused(why)) => return Err(ReceiverError::Refused(why)),
            Err(e) => e,
        };
        match &e {
            ReceiverError::Pg(pg) => {
                // A session that completed a segment made progress: retry quickly again.
                if state.next != before {
                    backoff.reset();
                    wait = backoff.next_wait();
                }
                if matches!(pg, PgError::Protocol(_)) {
                    // The server broke the protocol (or is not what it claims): worth more
                    // than a warning, although a reconnect may find it sane again.
                    tracing::error!(slot = %state.cfg.slot, error = %e, retry_in = ?wait, "protocol violation by the server");
                } else {
                    tracing::warn!(slot = %state.cfg.slot, error = %e, retry_in = ?wait, "replication connection failed");
                }
            }
            _ => {
                tracing::error!(slot = %state.cfg.slot, error = %e, retry_in = ?wait, "WAL receiving failed");
            }
        }
        let ev = ReceiverEvent::Disconnected {
            error: e.to_string(),
            reason: DisconnectReason::of(&e),
        };
        state
            .events
            .send(ev)
            .await
            .map_err(|_| ReceiverError::EventsClosed)?;
        tokio::select! {
            _ = state.cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
        wait = backoff.next_wait();
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

pub(crate) struct Session {
    pub(crate) cfg: ReceiverConfig,
    /// Where the next connection starts; advanced as segments are completed.
    pub(crate) next: Option<StartPosition>,
    pub(crate) events: mpsc::Sender<ReceiverEvent>,
    pub(crate) archived: watch::Receiver<Lsn>,
    pub(crate) positions: watch::Sender<ReceiverPositions>,
    pub(crate) cancel: CancellationToken,
    /// The slot's restart_lsn when this session began.
    pub(crate) flush_floor: Lsn,
    /// The spool is fdatasync'd in this session ([`SpoolSync`]).
    pub(crate) durable: bool,
    /// The server's WAL segment size (known once connected).
    pub(crate) seg: SegmentSize,
    /// When the received bytes not yet durable arrived (for the data-loss window).
    pub(crate) arrivals: std::sync::Mutex<Arrivals>,
    /// How many [`ReceiverEvent::Connected`] were sent.
    pub(crate) sessions: u64,
}

/// How one START_REPLICATION ended.
pub(crate) enum StreamEnd {
    Cancelled,
    Paused,
    /// The timeline ended; continue on `next_tli` at `next_start`.
    Switch {
        next_tli: TimelineId,
        next_start: Lsn,
    },
}

impl Session {
    pub(crate) async fn send(&self, ev: ReceiverEvent) -> Result<(), ReceiverError> {
        self.events
            .send(ev)
            .await
            .map_err(|_| ReceiverError::EventsClosed)
    }
    /// Hands a complete segment on. While whoever archives it is busy (the event channel is
    /// full: its uploads wait for upload slots, maybe held by other sites draining a backlog)
    /// the server still gets a status update every `status_interval`, so the session is never
    /// timed out (`wal_sender_timeout`) and the server hears of the archive's progress.
    async fn hand_on_segment(
        &self,
        ev: ReceiverEvent,
        stream: &mut ReplicationStream<'_>,
        ticker: &mut tokio::time::Interval,
        spool: &SpoolDurable,
        received: Lsn,
        tli: TimelineId,
    ) -> Result<(), ReceiverError> {
        loop {
            tokio::select! {
                permit = self.events.reserve() => {
                    permit.map_err(|_| ReceiverError::EventsClosed)?.send(ev);
                    return Ok(());
                }
                _ = ticker.tick() => {
                    stream.send_status(&self.report(received, spool, tli)).await?;
                }
            }
        }
    }

    /// Whether a segment starting at `at` should wait for a buffer rather than be received
    /// into its spool file alone when none is free: only while catching up (the server
    /// already holds the whole segment: `server_end` is at least a segment past `at`), only
    /// when the spool is a cache in front of a slot that keeps the WAL (not durable), never
    /// for a synchronous site (its WAL goes out as it arrives), only when this site can
    /// get a buffer at all, and only when the shared budget, not the site's own cap, is what
    /// it lacks ([`crate::buffers::SegmentBuffers::budget_bound`]: a single site draining a
    /// backlog keeps receiving into its spool while its uploads run, which measured 35-60 %
    /// faster than waiting). Receiving ahead of the uploads into the spool costs a write and
    /// two reads of every byte (verification, upload) and gains nothing the slot does not
    /// hold already; a site that keeps up with its server never waits, so its WAL and
    /// partial uploads are not delayed by other sites' backlogs (docs/benchmarks.md, "Many
    /// sites").
    fn waits_for_buffer(&self, at: Lsn, server_end: Lsn, seg: SegmentSize) -> bool {
        !self.durable
            && !self.cfg.partial.on_arrival()
            && at == at.segment_start(seg)
            && server_end.0 >= at.0.saturating_add(seg.bytes())
            && self.cfg.buffers.may_ever_take(seg.bytes() as usize)
            && self.cfg.buffers.budget_bound(seg.bytes() as usize)
    }

    /// Waits for a segment buffer (see [`Session::waits_for_buffer`]); the server gets a
    /// status update every `status_interval` meanwhile, as in [`Session::hand_on_segment`].
    /// `None` when cancelled first. Buffers come back as this or another site's uploads
    /// finish (the longest waiting site is woken first); the status ticks retry too, so a
    /// missed wake-up costs one interval.
    async fn wait_for_buffer(
        &self,
        stream: &mut ReplicationStream<'_>,
        ticker: &mut tokio::time::Interval,
        spool: &SpoolDurable,
        received: Lsn,
        tli: TimelineId,
    ) -> Result<Option<SegmentBuffer>, ReceiverError> {
        let size = self.seg.bytes() as usize;
        loop {
            let returned = self.cfg.buffers.returned();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(b) = self.cfg.buffers.try_take(size) {
                return Ok(Some(b));
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return Ok(None),
                _ = &mut returned => {}
                _ = ticker.tick() => {
                    stream.send_status(&self.report(received, spool, tli)).await?;
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
        let durable = self
            .cfg
            .partial
            .durable()
            .map_or(archived, |d| archived.max(*d.borrow()));
        // Synchronous: what the object store holds, never the spool alone.
        let no_spool = SpoolDurable::default();
        let spool = if self.cfg.partial.flush_counts_spool() {
            spool
        } else {
            &no_spool
        };
        let flush = flush_position(archived, durable, spool, self.flush_floor, self.seg);
        let undurable_since = self
            .arrivals()
            .undurable_since(durable.max(archived), received);
        self.positions.send_replace(ReceiverPositions {
            received_lsn: received,
            reported_flush_lsn: flush,
            timeline: Some(tli),
            undurable_since,
        });
        StandbyStatus::now(received, flush)
    }

    fn arrivals(&self) -> std::sync::MutexGuard<'_, Arrivals> {
        self.arrivals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands on the bytes of the segment being received that this session has not handed on
    /// yet, when the previous batch is done with ([`crate::PartialUploads`]). Never waits: with
    /// the event channel full the bytes stay for the next call. Callable whenever the stream
    /// is between messages (on a timer now; on demand in a synchronous mode).
    pub(crate) fn hand_on_partial(
        &self,
        current: Option<&Incoming>,
        partials: &mut Partials,
        deadline: std::time::Duration,
    ) -> Result<(), ReceiverError> {
        let Some(cur) = current else { return Ok(()) };
        // Nothing of a segment whose first page is unchecked (maybe no WAL at all) goes out,
        // nor of one the archive is not contiguous up to: its partial objects would extend
        // nothing (the segments before it are still to be stored), and while catching up the
        // segment is complete soon anyway.
        let archived = *self.archived.borrow();
        if !cur.first_page_checked
            || !partials.idle()
            || !archived.is_valid()
            || archived < cur.start
        {
            return Ok(());
        }
        let durable = self.cfg.partial.durable().map_or(archived, |d| *d.borrow());
        let from = partials.next_offset(cur.id, cur.start, durable);
        if partials.unlanded(cur.id, cur.start, durable) {
            partials.not_landed(self.cfg.partial.retry_after());
        }
        if !partials.due(deadline) || cur.written <= from {
            return Ok(());
        }
        let to = cur.written;
        if let Some(sink) = self.cfg.partial.sink() {
            (sink.0)(Batch {
                session: self.sessions,
                seg: self.seg,
                id: cur.id,
                start: cur.start,
                offset: from,
                data: cur.bytes_from(from)?.into(),
                in_flight: partials.token(),
            });
        } else {
            // A place in the channel first: with it full nothing is copied out (a synchronous
            // receiver calls this after every message).
            let permit = match self.events.try_reserve() {
                Ok(p) => p,
                Err(mpsc::error::TrySendError::Full(())) => return Ok(()),
                Err(mpsc::error::TrySendError::Closed(())) => {
                    return Err(ReceiverError::EventsClosed)
                }
            };
            permit.send(ReceiverEvent::Received {
                id: cur.id,
                start: cur.start,
                offset: from,
                data: cur.bytes_from(from)?.into(),
                in_flight: partials.token(),
            });
        }
        partials.handed(cur.id, to);
        self.arrivals().cut();
        Ok(())
    }

    pub(crate) async fn stream(
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
        // buffer for every read-back, of one verification piece (`Incoming::verify`): a fresh
        // 16 MiB allocation per segment let glibc raise its mmap threshold and keep freed
        // buffers in per-thread arenas, so the daemon's RSS grew with the backlog
        // (docs/benchmarks.md).
        let mut verify_buf = Vec::new();
        // XLogData payloads are read from the socket straight into the segment buffer (into
        // this, then the spool file, for a segment without one): no copy out of the
        // connection's buffer (docs/benchmarks.md).
        stream.receive_payloads_directly(DIRECT_PAYLOAD_MIN);
        let mut scratch = Vec::new();
        let durable = self.durable;
        let dir = self.cfg.spool_dir.clone();
        let mut partials = Partials::new();
        let mut partial_ticker = self.cfg.partial.tick().map(|i| {
            let mut t = tokio::time::interval(i);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let mut durable_rx = self.cfg.partial.durable();
        // Synchronous: hand on after every message, woken too when a batch is done with.
        let on_arrival = self.cfg.partial.on_arrival();
        let batch_done = partials.done();
        // Where reception stood at the last status update that saw progress, and when.
        let mut received_at_tick = received;
        let mut progress_at = tokio::time::Instant::now();
        self.arrivals().cut();
        loop {
            if on_arrival {
                self.hand_on_partial(current.as_ref(), &mut partials, std::time::Duration::ZERO)?;
            }
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
                    if received != received_at_tick {
                        received_at_tick = received;
                        progress_at = tokio::time::Instant::now();
                    } else if progress_at.elapsed() >= self.cfg.release_idle_after {
                        // Nothing arrived for a while: an idle site keeps neither its segment
                        // nor read-back room in memory (the segment continues in its spool
                        // file).
                        if let Some(cur) = current.as_mut() {
                            cur.release_buffer(&dir, seg)?;
                        }
                        verify_buf = Vec::new();
                        scratch = Vec::new();
                    }
                }
                _ = async { partial_ticker.as_mut().expect("guarded").tick().await }, if partial_ticker.is_some() => {
                    self.hand_on_partial(current.as_ref(), &mut partials, self.cfg.partial.deadline())?;
                }
                // The next batch goes at the top of the loop.
                _ = batch_done.notified(), if on_arrival => {}
                changed = async { durable_rx.as_mut().expect("guarded").changed().await }, if durable_rx.is_some() => {
                    if changed.is_ok() {
                        stream.send_status(&self.report(received, &spool, tli)).await?;
                    } else {
                        durable_rx = None;
                    }
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
                    ReplicationEvent::XLogData { wal_start, wal_end, data, rest: mut direct, .. } => {
                        if wal_start != received {
                            return Err(PgError::protocol(format!("WAL at {wal_start} does not continue at {received}")).into());
                        }
                        let mut rest = &data[..];
                        self.arrivals().arrived(received);
                        partials.arrived(false);
                        while !rest.is_empty() || direct > 0 {
                            let cur = match current.as_mut() {
                                Some(c) => c,
                                None => {
                                    let taken = if self.waits_for_buffer(received, wal_end, seg) {
                                        match self.wait_for_buffer(&mut stream, &mut ticker, &spool, received, tli).await? {
                                            Some(b) => Some(b),
                                            None => return self.leave(&mut stream, &mut current, &mut spool, received, tli, StreamEnd::Cancelled).await,
                                        }
                                    } else {
                                        None
                                    };
                                    // A new segment: its bytes get their own arrival mark.
                                    let mut a = self.arrivals();
                                    a.cut();
                                    a.arrived(received);
                                    drop(a);
                                    partials.arrived(true);
                                    current.insert(Incoming::open_with(&dir, tli, received, seg, durable, &self.cfg.buffers, taken)?)
                                }
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
                            received += n as u64;
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
                                let ev = ReceiverEvent::Segment { name: WalSegmentName::Segment(id), path, start: seg_start, data: data.map(Arc::new) };
                                self.hand_on_segment(ev, &mut stream, &mut ticker, &spool, received, tli).await?;
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
