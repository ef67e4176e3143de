//! Segment buffers: segment-sized buffers the receiver copies each segment into while it
//! writes the spool file. A complete segment is verified in its buffer and handed on with it,
//! so whoever archives it compresses and hashes from memory instead of reading the spool file
//! back (three reads of every byte before: verification, hash, compression).
//!
//! One [`BufferBudget`] holds the bytes every site's buffers together may take (the daemon's
//! `wal_buffer_memory_mib`); each site takes its buffers through its own [`SegmentBuffers`]
//! handle. Taking a buffer never waits: when the budget is spent, or the site holds its share
//! of it, a segment is received into the spool file alone and handed on without one, and the
//! archiver reads the file. Memory is therefore bounded by the budget, whatever the backlog
//! and however many sites there are.
//!
//! **Fair share.** A site may hold at most `max_count` buffers (its running uploads + 2) and
//! at most `budget / (segment size × busy sites)` of them (at least one), where busy sites are
//! those holding a buffer, counting the one asking. So one site draining a backlog cannot keep
//! the whole budget while another gets none: as its buffers come back, it cannot take more
//! than its share again. Returned buffers go to one free list shared by all sites, so an idle
//! site keeps none.
//!
//! **After a burst.** Free buffers are kept for reuse while WAL flows, but a buffer nobody
//! took for a while is given back ([`BufferBudget::trim_idle`], called by the daemon on a
//! timer), so the memory a burst needed does not stay with the process up to the budget.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// The daemon-wide budget. Cloning shares it.
#[derive(Clone, Default)]
pub struct BufferBudget {
    inner: Arc<Mutex<Pool>>,
    /// Woken (one waiter at a time, the longest waiting first) when a buffer comes back.
    returned: Arc<Notify>,
}

#[derive(Default)]
struct Pool {
    /// Bytes all buffers together may hold (their capacity).
    max_bytes: usize,
    /// Capacity of the buffers that exist (free or taken).
    born_bytes: usize,
    /// Returned buffers, ready for reuse by any site, with when each came back.
    free: Vec<(Vec<u8>, Instant)>,
    /// Buffers each site holds now, by [`SegmentBuffers::site`].
    held: Vec<usize>,
    /// Sites holding at least one buffer.
    busy: usize,
}

impl fmt::Debug for BufferBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.lock();
        f.debug_struct("BufferBudget")
            .field("max_bytes", &p.max_bytes)
            .field("born_bytes", &p.born_bytes)
            .field("free", &p.free.len())
            .finish()
    }
}

impl BufferBudget {
    /// Buffers of all sites together hold at most `max_bytes` (0: no buffers at all).
    pub fn new(max_bytes: usize) -> Self {
        BufferBudget {
            inner: Arc::new(Mutex::new(Pool {
                max_bytes,
                ..Pool::default()
            })),
            returned: Arc::default(),
        }
    }

    /// A site's handle: it holds at most `max_count` buffers at once, and its fair share.
    pub fn site(&self, max_count: usize) -> SegmentBuffers {
        let mut p = self.lock();
        p.held.push(0);
        SegmentBuffers {
            budget: self.clone(),
            site: p.held.len() - 1,
            max_count,
        }
    }

    /// Bytes the buffers that exist now take (free ones included).
    pub fn allocated_bytes(&self) -> usize {
        self.lock().born_bytes
    }

    /// Frees the buffers that have been back on the free list for `idle` or longer (nobody
    /// needed them since); returns the bytes freed. Buffers reused within `idle` stay, so a
    /// steady stream of segments allocates nothing.
    pub fn trim_idle(&self, idle: Duration) -> usize {
        let now = Instant::now();
        let mut p = self.lock();
        let before = p.born_bytes;
        let mut freed = Vec::new();
        let mut i = 0;
        while i < p.free.len() {
            if now.saturating_duration_since(p.free[i].1) >= idle {
                let (buf, _) = p.free.swap_remove(i);
                p.born_bytes -= buf.capacity();
                freed.push(buf);
            } else {
                i += 1;
            }
        }
        let bytes = before - p.born_bytes;
        drop(p);
        // Deallocated outside the lock.
        drop(freed);
        bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One site's way into the budget. Cloning shares the site's count.
#[derive(Clone, Default)]
pub struct SegmentBuffers {
    budget: BufferBudget,
    site: usize,
    max_count: usize,
}

impl fmt::Debug for SegmentBuffers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = self.held();
        f.debug_struct("SegmentBuffers")
            .field("site", &self.site)
            .field("held", &held)
            .field("max_count", &self.max_count)
            .finish()
    }
}

impl SegmentBuffers {
    /// A pool of its own with at most `count` buffers; 0 turns in-memory hand-off off.
    pub fn new(count: usize) -> Self {
        Self::with_limit(count, usize::MAX)
    }

    /// A pool of its own: at most `count` buffers, and no more than `max_bytes` in all (fewer
    /// buffers for larger segments: none at all for 1 GiB segments under a 256 MiB limit).
    pub fn with_limit(count: usize, max_bytes: usize) -> Self {
        BufferBudget::new(max_bytes).site(count)
    }

    /// Buffers this site holds now.
    pub fn held(&self) -> usize {
        self.budget.lock().held.get(self.site).copied().unwrap_or(0)
    }

    /// Whether a buffer of `size` bytes can ever be had here (the budget holds one, the site
    /// may hold one): when not, waiting for one would wait forever.
    pub fn may_ever_take(&self, size: usize) -> bool {
        self.max_count > 0 && self.budget.lock().max_bytes >= size
    }

    /// Whether what keeps this site from a buffer of `size` bytes is the shared budget, not its
    /// own cap: the budget's equal part for the sites holding buffers (this one included) is
    /// below `max_count`. A site alone under a roomy budget is held back by its own uploads
    /// only, and receives ahead into its spool as before; one of many sharing a budget that
    /// is spent waits instead (docs/benchmarks.md, "Many sites").
    pub fn budget_bound(&self, size: usize) -> bool {
        let p = self.budget.lock();
        let held = p.held.get(self.site).copied().unwrap_or(0);
        let busy = p.busy + usize::from(held == 0);
        let share = (p.max_bytes / size.max(1) / busy.max(1)).max(1);
        share < self.max_count
    }

    /// Resolves when a buffer came back to the budget (from any site): the longest waiting
    /// site is woken first, one per buffer (`enable` it before trying, so that a buffer
    /// returned in between wakes it). A wake-up is a hint,
    /// not a reservation: [`SegmentBuffers::try_take`] may still find none (another site took
    /// it, or this site holds its share).
    pub fn returned(&self) -> Notified<'_> {
        self.budget.returned.notified()
    }

    /// An empty buffer with room for `size` bytes, if the budget and this site's share allow.
    pub fn try_take(&self, size: usize) -> Option<SegmentBuffer> {
        let mut guard = self.budget.lock();
        let p = &mut *guard;
        let held = p.held.get(self.site).copied().unwrap_or(0);
        // Sites holding buffers, this one included: each gets an equal part of the budget.
        let busy = p.busy + usize::from(held == 0);
        let share = (p.max_bytes / size.max(1) / busy.max(1)).max(1);
        if held >= self.max_count.min(share) {
            return None;
        }
        let buf = match p.free.iter().position(|(b, _)| b.capacity() == size) {
            Some(i) => p.free.swap_remove(i).0,
            None => {
                // Free buffers of another size (another server's segments) make room first.
                while p.born_bytes.saturating_add(size) > p.max_bytes {
                    let i = p.free.iter().position(|(b, _)| b.capacity() != size)?;
                    let (old, _) = p.free.swap_remove(i);
                    p.born_bytes -= old.capacity();
                }
                p.born_bytes += size;
                Vec::with_capacity(size)
            }
        };
        if let Some(h) = p.held.get_mut(self.site) {
            *h += 1;
            if *h == 1 {
                p.busy += 1;
            }
        }
        drop(guard);
        Some(SegmentBuffer {
            buf,
            budget: self.budget.clone(),
            site: self.site,
        })
    }
}

/// One segment's bytes; goes back to the budget's free list when dropped.
pub struct SegmentBuffer {
    buf: Vec<u8>,
    budget: BufferBudget,
    site: usize,
}

impl SegmentBuffer {
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The bytes and the room after them, for reading received WAL straight in: the
    /// receiver never grows it past the segment (its capacity).
    pub(crate) fn vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Zeros up to `len` bytes (the unwritten rest of a timeline's last segment).
    pub fn zero_fill(&mut self, len: usize) {
        self.buf.resize(len.max(self.buf.len()), 0);
    }
}

impl Deref for SegmentBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl AsRef<[u8]> for SegmentBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl fmt::Debug for SegmentBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SegmentBuffer({} bytes)", self.buf.len())
    }
}

impl PartialEq for SegmentBuffer {
    fn eq(&self, other: &Self) -> bool {
        self.buf == other.buf
    }
}

impl Eq for SegmentBuffer {}

impl Drop for SegmentBuffer {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut p = self.budget.lock();
        if let Some(h) = p.held.get_mut(self.site) {
            *h -= 1;
            if *h == 0 {
                p.busy -= 1;
            }
        }
        p.free.push((buf, Instant::now()));
        drop(p);
        self.budget.returned.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_reused() {
        let pool = SegmentBuffers::new(2);
        let mut a = pool.try_take(8).unwrap();
        a.extend(b"abc");
        let b = pool.try_take(8).unwrap();
        assert!(
            pool.try_take(8).is_none(),
            "a third buffer out of a pool of two"
        );
        let a_ptr = a.as_ptr();
        drop(a);
        let c = pool.try_take(8).unwrap();
        assert!(c.is_empty(), "a reused buffer keeps its old bytes");
        assert_eq!(c.as_ptr(), a_ptr, "the returned buffer was not reused");
        drop((b, c));
        assert!(SegmentBuffers::new(0).try_take(8).is_none());
        let bytes = SegmentBuffers::with_limit(4, 20);
        let _one = bytes.try_take(8).unwrap();
        let _two = bytes.try_take(8).unwrap();
        assert!(bytes.try_take(8).is_none(), "past the byte limit");
    }

    #[test]
    fn budget_shared_by_sites() {
        // Room for four 8-byte buffers in all; each site may hold up to three.
        let budget = BufferBudget::new(32);
        let (a, b) = (budget.site(3), budget.site(3));
        let a1 = a.try_take(8).unwrap();
        let a2 = a.try_take(8).unwrap();
        let a3 = a.try_take(8).unwrap();
        assert!(a.try_take(8).is_none(), "past the site's own count");
        // Site b is alone with nothing; it still gets the last buffer of the budget.
        let b1 = b.try_take(8).unwrap();
        assert!(b.try_take(8).is_none(), "past the budget");
        assert_eq!(budget.allocated_bytes(), 32);
        // Two busy sites: a's share is now 2 of 4, so one of its buffers coming back does
        // not let it take a third again, while b may.
        drop(a3);
        assert!(
            a.try_take(8).is_none(),
            "a busy site took more than its share"
        );
        let b2 = b.try_take(8).unwrap();
        assert_eq!((a.held(), b.held()), (2, 2));
        // Buffers come back to one free list: an idle site keeps none, and its memory is
        // reused by the other site, never allocated twice.
        drop((b1, b2));
        assert_eq!(b.held(), 0);
        let a3 = a.try_take(8).unwrap();
        assert_eq!(budget.allocated_bytes(), 32);
        drop((a1, a2, a3));
        // Another segment size: free buffers of the old size make room, the total stays.
        let big = b.try_take(16).unwrap();
        let big2 = a.try_take(16).unwrap();
        assert!(a.try_take(16).is_none());
        assert_eq!(budget.allocated_bytes(), 32);
        drop((big, big2));
    }

    /// Buffers back on the free list for the idle time are freed (the budget's allocated
    /// bytes fall), those still in use or returned more recently stay; a site can take a
    /// buffer again afterwards.
    #[test]
    fn idle_free_buffers_are_given_back() {
        let budget = BufferBudget::new(64);
        let a = budget.site(8);
        let taken: Vec<_> = (0..4).map(|_| a.try_take(8).unwrap()).collect();
        let kept = a.try_take(8).unwrap();
        assert_eq!(budget.allocated_bytes(), 40);
        drop(taken);
        assert_eq!(budget.trim_idle(Duration::from_secs(3600)), 0, "too recent");
        assert_eq!(budget.allocated_bytes(), 40);
        assert_eq!(budget.trim_idle(Duration::ZERO), 32);
        assert_eq!(budget.allocated_bytes(), 8, "the buffer in use stays");
        drop(kept);
        assert_eq!(budget.trim_idle(Duration::ZERO), 8);
        assert_eq!(budget.allocated_bytes(), 0);
        let again = a.try_take(8).unwrap();
        assert_eq!(again.buf.capacity(), 8);
        assert_eq!(budget.allocated_bytes(), 8);
    }

    #[test]
    fn one_site_may_use_the_whole_budget_when_alone() {
        let budget = BufferBudget::new(64);
        let a = budget.site(100);
        let taken: Vec<_> = (0..8).map(|_| a.try_take(8).unwrap()).collect();
        assert!(a.try_take(8).is_none());
        assert_eq!(taken.len(), 8);
        assert!(
            BufferBudget::new(4).site(3).try_take(8).is_none(),
            "a buffer larger than the budget"
        );
    }
}
