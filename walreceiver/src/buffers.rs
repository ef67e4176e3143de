//! Segment buffers: a fixed number of segment-sized buffers the receiver copies each segment
//! into while it writes the spool file. A complete segment is verified in its buffer and handed
//! on with it, so whoever archives it compresses and hashes from memory instead of reading the
//! spool file back (three reads of every byte before: verification, hash, compression).
//!
//! Taking a buffer never waits: when all are in use (the archive is behind) a segment is
//! received into the spool file alone and handed on without one, and the archiver reads the
//! file. Memory is therefore bounded by `count × segment size`, whatever the backlog.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

/// The pool. Cloning shares it.
#[derive(Clone, Default)]
pub struct SegmentBuffers {
    inner: Arc<Mutex<Pool>>,
}

#[derive(Default)]
struct Pool {
    /// Buffers that may still be created.
    unborn: usize,
    /// Buffers created so far.
    born: usize,
    /// Bytes all buffers together may hold.
    max_bytes: usize,
    /// Returned buffers, ready for reuse.
    free: Vec<Vec<u8>>,
}

impl fmt::Debug for SegmentBuffers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("SegmentBuffers")
            .field("unborn", &p.unborn)
            .field("free", &p.free.len())
            .finish()
    }
}

impl SegmentBuffers {
    /// At most `count` buffers exist at once; 0 turns in-memory hand-off off.
    pub fn new(count: usize) -> Self {
        Self::with_limit(count, usize::MAX)
    }

    /// At most `count` buffers, and no more than `max_bytes` in all (fewer buffers for larger
    /// segments: none at all for 1 GiB segments under a 256 MiB limit).
    pub fn with_limit(count: usize, max_bytes: usize) -> Self {
        SegmentBuffers {
            inner: Arc::new(Mutex::new(Pool {
                unborn: count,
                born: 0,
                max_bytes,
                free: Vec::new(),
            })),
        }
    }

    /// An empty buffer with room for `size` bytes, if one is free.
    pub fn try_take(&self, size: usize) -> Option<SegmentBuffer> {
        let mut p = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut buf = match p.free.pop() {
            Some(b) => b,
            None if p.unborn > 0 && (p.born + 1).saturating_mul(size) <= p.max_bytes => {
                p.unborn -= 1;
                p.born += 1;
                Vec::new()
            }
            None => return None,
        };
        drop(p);
        buf.clear();
        if buf.capacity() != size {
            // Exactly one segment: a different segment size (another server) replaces it.
            buf = Vec::with_capacity(size);
        }
        Some(SegmentBuffer {
            buf,
            pool: self.inner.clone(),
        })
    }
}

/// One segment's bytes; goes back to its pool when dropped.
pub struct SegmentBuffer {
    buf: Vec<u8>,
    pool: Arc<Mutex<Pool>>,
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
        let buf = std::mem::take(&mut self.buf);
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free
            .push(buf);
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
}
