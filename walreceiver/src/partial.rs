//! Handing on the bytes of the segment being received before it is complete (partial
//! uploads), and when the bytes not yet durable anywhere arrived.
//!
//! The receiver never uploads anything: it hands on, as a [`ReceiverEvent::Received`], the bytes
//! of the current segment that no earlier event of this session handed on, at most one batch
//! at a time ([`InFlight`]), and whoever archives them reports the archive's durable end back
//! through [`PartialUploads::durable`]. The hand-off is a method of the session, run on a timer
//! ([`PartialUploads::Every`]) or on demand ([`PartialUploads::OnArrival`], the synchronous
//! mode: as soon as WAL arrives and nothing is in flight, so that group commit batches
//! naturally: the next batch takes everything that arrived while one was being stored).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{watch, Notify};
use walhoard_protocol::{Lsn, SegmentId, SegmentSize};

#[cfg(doc)]
use crate::ReceiverEvent;

/// Whether and how often the bytes of the segment being received are handed on.
#[derive(Debug, Clone, Default)]
pub enum PartialUploads {
    /// Only complete segments are handed on.
    #[default]
    Off,
    /// At least this often, when there are new bytes and the previous batch is done.
    Every {
        interval: Duration,
        /// The archive's durable end including partial objects (the archive's end when
        /// nothing more is held): it may raise the flush position inside the first segment
        /// the archive lacks, and it ends the age of the bytes below it.
        durable: watch::Receiver<Lsn>,
    },
    /// Synchronous: as soon as bytes arrive and the previous batch is done with, and the flush
    /// position reported to the server counts only what the archive holds (complete segments
    /// and partial objects the store acknowledged), never the spool: a server that lists this
    /// receiver in `synchronous_standby_names` then acknowledges a commit only once its WAL is
    /// in the object store.
    OnArrival {
        /// As for [`PartialUploads::Every`].
        durable: watch::Receiver<Lsn>,
        /// Where batches go instead of the event channel, called on the receiver's task:
        /// whoever archives them can then store them on the receiver's own thread, without a
        /// hop through the event channel's consumer (a synchronous commit waits for every
        /// hop). `None`: as [`ReceiverEvent::Received`].
        sink: Option<BatchSink>,
    },
}

/// A batch of the segment being received, as [`ReceiverEvent::Received`] carries it.
#[derive(Debug)]
pub struct Batch {
    /// The [`ReceiverEvent::Connected`] it follows (its `session`): whoever checks what a
    /// connection reached before archiving anything of it lets the batch through only once
    /// that event is checked.
    pub session: u64,
    pub seg: SegmentSize,
    pub id: SegmentId,
    pub start: Lsn,
    pub offset: u64,
    pub data: bytes::Bytes,
    pub in_flight: InFlight,
}

/// Takes the batches of a synchronous receiver ([`PartialUploads::OnArrival`]); it must not
/// wait (it is called between messages of the stream): it starts the batch's storing and
/// returns.
#[derive(Clone)]
pub struct BatchSink(pub Arc<dyn Fn(Batch) + Send + Sync>);

impl std::fmt::Debug for BatchSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BatchSink")
    }
}

/// How long a synchronous receiver waits before handing on again bytes whose batch was not
/// stored (the archiver gave it up: the store failed in a way its retries do not cover), so
/// that a failing store is not asked in a tight loop. A stored batch is followed at once.
const SYNC_RETRY: Duration = Duration::from_millis(500);

impl PartialUploads {
    /// How often whether a batch is due is checked: a tenth of the interval.
    pub(crate) fn tick(&self) -> Option<Duration> {
        match self {
            PartialUploads::Off => None,
            PartialUploads::Every { interval, .. } => {
                Some((*interval / 10).max(Duration::from_millis(10)))
            }
            // Only for batches that were not stored: every other hand-off is on demand.
            PartialUploads::OnArrival { .. } => Some(SYNC_RETRY / 2),
        }
    }

    /// Whether batches are handed on as soon as bytes arrive (the synchronous mode).
    pub(crate) fn on_arrival(&self) -> bool {
        matches!(self, PartialUploads::OnArrival { .. })
    }

    /// Whether the flush position reported may count what the spool holds durably: not in the
    /// synchronous mode, whose flush position says what the object store holds.
    pub(crate) fn flush_counts_spool(&self) -> bool {
        !self.on_arrival()
    }

    /// How long after a batch was not stored its bytes are handed on again.
    pub(crate) fn retry_after(&self) -> Duration {
        match self {
            PartialUploads::OnArrival { .. } => SYNC_RETRY,
            _ => Duration::ZERO,
        }
    }

    /// How old the oldest byte not handed on may grow before a batch is due: three quarters
    /// of the interval, the last quarter being the upload's. Not sooner: a byte whose
    /// segment completes within that time goes up once, in the complete segment, so the
    /// faster WAL comes, the less is uploaded twice (docs/benchmarks.md).
    pub(crate) fn deadline(&self) -> Duration {
        match self {
            PartialUploads::Off => Duration::MAX,
            PartialUploads::Every { interval, .. } => *interval * 3 / 4,
            PartialUploads::OnArrival { .. } => Duration::ZERO,
        }
    }

    pub(crate) fn durable(&self) -> Option<watch::Receiver<Lsn>> {
        match self {
            PartialUploads::Off => None,
            PartialUploads::Every { durable, .. } | PartialUploads::OnArrival { durable, .. } => {
                Some(durable.clone())
            }
        }
    }

    /// Where batches go when not on the event channel.
    pub(crate) fn sink(&self) -> Option<&BatchSink> {
        match self {
            PartialUploads::OnArrival { sink, .. } => sink.as_ref(),
            _ => None,
        }
    }

    /// The synchronous mode with its batches handed to `sink`; other modes unchanged.
    pub fn with_sink(self, sink: BatchSink) -> Self {
        match self {
            PartialUploads::OnArrival { durable, .. } => PartialUploads::OnArrival {
                durable,
                sink: Some(sink),
            },
            other => other,
        }
    }
}

/// Rides with a batch of handed-on bytes: while any clone of it lives, the receiver hands on
/// no further batch, so at most one is in memory and the batches stay in order. Whoever
/// consumes the batch drops it when the batch is stored (or given up); the receiver is woken
/// then, so that a synchronous one hands on the next batch at once.
#[derive(Debug, Clone)]
pub struct InFlight {
    token: Option<Arc<()>>,
    done: Arc<Notify>,
}

impl InFlight {
    /// A token of no receiver's: `done` is notified when it is dropped (for whoever hands on
    /// batches by hand, as tests do).
    pub fn standalone(done: Arc<Notify>) -> Self {
        InFlight {
            token: Some(Arc::new(())),
            done,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // The count first, then the wake-up: the receiver woken must find itself idle.
        drop(self.token.take());
        self.done.notify_one();
    }
}

/// Tokens compare equal: they carry no data ([`ReceiverEvent`] is compared in tests).
impl PartialEq for InFlight {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for InFlight {}

/// The session's state of partial hand-offs.
pub(crate) struct Partials {
    /// The segment being handed on and the offset up to which this session handed it on.
    handed: Option<(SegmentId, u64)>,
    token: Arc<()>,
    /// Told when a clone of the token is dropped.
    done: Arc<Notify>,
    /// When the oldest byte not handed on arrived.
    pending_since: Option<Instant>,
    /// A batch was not stored: its bytes are not handed on again before this.
    retry_at: Option<Instant>,
}

impl Partials {
    pub(crate) fn new() -> Self {
        Partials {
            handed: None,
            token: Arc::new(()),
            done: Arc::new(Notify::new()),
            pending_since: None,
            retry_at: None,
        }
    }

    /// Bytes arrived; `new_segment` when they open a segment (what was pending goes up with
    /// the complete segment before it).
    pub(crate) fn arrived(&mut self, new_segment: bool) {
        if new_segment || self.pending_since.is_none() {
            self.pending_since = Some(Instant::now());
        }
    }

    /// Whether the oldest byte not handed on is `deadline` old.
    pub(crate) fn due(&self, deadline: Duration) -> bool {
        self.pending_since.is_some_and(|t| t.elapsed() >= deadline)
            && self.retry_at.is_none_or(|t| Instant::now() >= t)
    }

    /// Notified whenever a batch's token is dropped (see [`InFlight`]).
    pub(crate) fn done(&self) -> Arc<Notify> {
        self.done.clone()
    }

    /// Whether the last batch is done with.
    pub(crate) fn idle(&self) -> bool {
        Arc::strong_count(&self.token) == 1
    }

    /// Where the next batch of segment `id` (starting at `start`) starts, given the archive's
    /// durable end: where the last batch ended when it landed, else (it was not stored) the
    /// durable end within the segment, so that nothing is skipped; 0 for a segment not
    /// handed on yet in this session.
    pub(crate) fn next_offset(&self, id: SegmentId, start: Lsn, durable: Lsn) -> u64 {
        match self.handed {
            Some((h, off)) if h == id => {
                if durable >= start + off {
                    off
                } else {
                    durable.0.saturating_sub(start.0)
                }
            }
            _ => 0,
        }
    }

    /// Whether the last batch of `id` has not landed: the durable end is short of its end.
    pub(crate) fn unlanded(&self, id: SegmentId, start: Lsn, durable: Lsn) -> bool {
        matches!(self.handed, Some((h, off)) if h == id && durable < start + off)
    }

    /// The token to send with a batch.
    pub(crate) fn token(&self) -> InFlight {
        InFlight {
            token: Some(self.token.clone()),
            done: self.done.clone(),
        }
    }

    /// A batch of `id` up to `to` was handed on.
    pub(crate) fn handed(&mut self, id: SegmentId, to: u64) {
        self.handed = Some((id, to));
        self.pending_since = None;
        self.retry_at = None;
    }

    /// The last batch was not stored: its bytes are pending again from now (so a segment
    /// the archiver refuses is not copied out on every tick), and handed on again no sooner
    /// than `retry_after` from the first time this is seen.
    pub(crate) fn not_landed(&mut self, retry_after: Duration) {
        self.pending_since.get_or_insert_with(Instant::now);
        self.retry_at
            .get_or_insert_with(|| Instant::now() + retry_after);
    }
}

/// At most this many arrival marks are kept (one per hand-off and per segment, so only a
/// stuck archive reaches it): past it the oldest mark still stands, the age is never
/// understated.
const MAX_MARKS: usize = 1024;

/// When the bytes not yet durable arrived: marks `(lsn, time)` saying that the bytes from
/// `lsn` on (up to the next mark) arrived from `time` on. A mark is set at the first byte after
/// each cut (a hand-off, a new segment), so the age of the oldest byte not durable is exact
/// when the durable end is at a cut and otherwise overstated by less than one interval.
#[derive(Debug, Default)]
pub(crate) struct Arrivals {
    marks: VecDeque<(Lsn, SystemTime)>,
    cut: bool,
}

impl Arrivals {
    /// Bytes from `at` on arrive now. Bytes received again (a new session starts at the
    /// segment's first byte) keep the older mark.
    pub(crate) fn arrived(&mut self, at: Lsn) {
        let later = self.marks.back().is_none_or(|m| at > m.0);
        if (self.cut || self.marks.is_empty()) && later && self.marks.len() < MAX_MARKS {
            self.marks.push_back((at, SystemTime::now()));
        }
        self.cut = false;
    }

    pub(crate) fn cut(&mut self) {
        self.cut = true;
    }

    /// When the oldest byte between `durable` and `received` arrived; `None` when every
    /// received byte is durable.
    pub(crate) fn undurable_since(&mut self, durable: Lsn, received: Lsn) -> Option<SystemTime> {
        if received <= durable {
            self.marks.clear();
            return None;
        }
        while self.marks.len() >= 2 && self.marks[1].0 <= durable {
            self.marks.pop_front();
        }
        self.marks.front().map(|m| m.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_give_the_oldest_undurable_byte() {
        let mut a = Arrivals::default();
        a.arrived(Lsn(100));
        let t0 = a.marks[0].1;
        a.arrived(Lsn(150)); // no cut: same mark
        assert_eq!(a.marks.len(), 1);
        a.cut();
        std::thread::sleep(Duration::from_millis(5));
        a.arrived(Lsn(200));
        let t1 = a.marks[1].1;
        assert!(t1 > t0);
        assert_eq!(a.undurable_since(Lsn(100), Lsn(300)), Some(t0));
        // Durable up to the cut: the bytes after it are the oldest.
        assert_eq!(a.undurable_since(Lsn(200), Lsn(300)), Some(t1));
        // Inside the second run: still its mark (overstated, never understated).
        assert_eq!(a.undurable_since(Lsn(250), Lsn(300)), Some(t1));
        assert_eq!(a.undurable_since(Lsn(300), Lsn(300)), None);
    }

    /// The synchronous mode: a batch is due as soon as bytes arrived; the receiver is woken
    /// when the batch's token goes and then finds itself idle; a batch that was not stored is
    /// handed on again only after the pause, not in a tight loop.
    #[tokio::test]
    async fn on_arrival_hands_on_at_once_and_pauses_after_a_failed_batch() {
        let (_tx, durable) = watch::channel(Lsn::INVALID);
        let mode = PartialUploads::OnArrival {
            durable,
            sink: None,
        };
        assert!(!mode.flush_counts_spool() && mode.on_arrival());
        assert_eq!(mode.deadline(), Duration::ZERO);
        let mut p = Partials::new();
        let id = SegmentId {
            tli: walhoard_protocol::TimelineId(1),
            log: 0,
            seg: 3,
        };
        p.arrived(false);
        assert!(p.due(mode.deadline()));
        let t = p.token();
        p.handed(id, 100);
        assert!(!p.idle());
        let done = p.done();
        drop(t);
        tokio::time::timeout(Duration::from_secs(5), done.notified())
            .await
            .expect("dropping the token wakes the receiver");
        assert!(p.idle());
        // Not stored: pending again, but not due before the pause.
        p.not_landed(mode.retry_after());
        assert!(!p.due(mode.deadline()));
        std::thread::sleep(mode.retry_after());
        assert!(p.due(mode.deadline()));
        // The timer mode is unchanged: no pause.
        let (_tx, durable) = watch::channel(Lsn::INVALID);
        let every = PartialUploads::Every {
            interval: Duration::from_secs(1),
            durable,
        };
        assert!(every.flush_counts_spool() && every.retry_after().is_zero());
    }

    #[test]
    fn one_batch_at_a_time() {
        let mut p = Partials::new();
        let id = SegmentId {
            tli: walhoard_protocol::TimelineId(1),
            log: 0,
            seg: 3,
        };
        assert!(p.idle());
        let start = Lsn(3 << 24);
        assert_eq!(p.next_offset(id, start, start), 0);
        let t = p.token();
        p.handed(id, 500);
        assert!(!p.idle());
        drop(t);
        assert!(p.idle());
        // Landed: continue after it.
        assert_eq!(p.next_offset(id, start, start + 500), 500);
        // Not stored: again from the durable end, nothing skipped.
        assert!(p.unlanded(id, start, start + 200) && !p.unlanded(id, start, start + 500));
        assert_eq!(p.next_offset(id, start, start + 200), 200);
        assert_eq!(p.next_offset(id, start, Lsn(start.0 - 1)), 0);
        // Another segment (the next one, or the same on a new timeline): from its start.
        let other = SegmentId { seg: 4, ..id };
        assert_eq!(p.next_offset(other, start, start + 500), 0);
    }
}
