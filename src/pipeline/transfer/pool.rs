//! Reused output buffers of the one-shot WAL upload ([`super::one_shot_object`]).

use crate::storage::DIRECT_ALIGN;

/// Output buffers of one-shot zstd compression and encryption ([`super::upload`] of WAL from memory), reused. A
/// compression worker holds one or two (compressed, then sealed; the compressed one is back
/// once sealed), and an upload holds its object's until the store has it, so there are never
/// more than workers + uploads in flight. A fresh
/// `compress_bound`-sized allocation per segment made glibc keep freed 16 MiB blocks, each
/// touched in other places, and the daemon's RSS grew (docs/benchmarks.md). A buffer taken
/// with [`OutputPool::take_aligned`] starts its content at a [`DIRECT_ALIGN`] boundary, so
/// that local storage can write it with `O_DIRECT` ([`ObjectStore::put_whole`]).
pub(super) static ONE_SHOT_OUTPUT: OutputPool = OutputPool(std::sync::Mutex::new(Vec::new()));

pub(super) struct OutputPool(std::sync::Mutex<Vec<Vec<u8>>>);

impl OutputPool {
    /// An empty buffer with room for `capacity` bytes, aligned or not (every buffer gets the
    /// same capacity, room for the alignment included, so that none ever grows).
    pub(super) fn take(&'static self, capacity: usize) -> PooledOutput {
        let mut v = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        v.clear();
        v.reserve(capacity + DIRECT_ALIGN);
        PooledOutput {
            buf: v,
            start: 0,
            pool: self,
        }
    }

    /// A buffer whose content (what is written into it from now on) starts at an address
    /// that is a multiple of [`DIRECT_ALIGN`].
    pub(super) fn take_aligned(&'static self, capacity: usize) -> PooledOutput {
        let mut out = self.take(capacity);
        let pad = out.buf.as_ptr().align_offset(DIRECT_ALIGN);
        out.buf.resize(pad, 0);
        out.start = pad;
        out
    }
}

/// A pooled buffer. Writers append to `buf` (through `DerefMut`); the content is
/// `buf[start..]`.
pub(super) struct PooledOutput {
    buf: Vec<u8>,
    start: usize,
    pool: &'static OutputPool,
}

impl AsRef<[u8]> for PooledOutput {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl std::ops::Deref for PooledOutput {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.buf
    }
}

impl std::ops::DerefMut for PooledOutput {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl Drop for PooledOutput {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.buf);
        self.pool
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(v);
    }
}
