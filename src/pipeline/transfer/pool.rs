//! Reused output buffers of the one-shot WAL upload ([`super::one_shot_object`]).

use std::time::{Duration, Instant};

use crate::storage::DIRECT_ALIGN;

/// Output buffers of one-shot zstd compression and encryption ([`super::upload`] of WAL from memory), reused. A
/// compression worker holds one or two (compressed, then sealed; the compressed one is back
/// once sealed), and an upload holds its object's until the store has it, so there are never
/// more than workers + uploads in flight. A fresh
/// `compress_bound`-sized allocation per segment made glibc keep freed 16 MiB blocks, each
/// touched in other places, and the daemon's RSS grew (docs/benchmarks.md). A buffer taken
/// with [`OutputPool::take_aligned`] starts its content at a [`DIRECT_ALIGN`] boundary, so
/// that local storage can write it with `O_DIRECT` ([`ObjectStore::put_whole`]). Buffers
/// nobody took for a while are freed ([`trim_idle_output`]), so a burst's buffers do not
/// stay with the process.
pub(super) static ONE_SHOT_OUTPUT: OutputPool = OutputPool(std::sync::Mutex::new(Vec::new()));

/// Input buffers of the one-shot upload of a file (a spool segment read whole): one per
/// compression worker at most, taken while it holds the worker.
pub(super) static ONE_SHOT_INPUT: OutputPool = OutputPool(std::sync::Mutex::new(Vec::new()));

/// Frees the pooled one-shot buffers that have not been taken for `idle` or longer;
/// returns the bytes freed.
pub fn trim_idle_output(idle: Duration) -> usize {
    ONE_SHOT_OUTPUT.trim_idle(idle) + ONE_SHOT_INPUT.trim_idle(idle) + ONE_SHOT_ZSTD.trim_idle(idle)
}

/// zstd compression contexts of the one-shot upload, reused: a context made per object
/// (`ZSTD_createCCtx`, its workspace allocated and its tables cleared) cost a synchronous
/// site, whose objects are one commit's WAL each, a tenth of its CPU (issue 16,
/// docs/benchmarks.md). Taken while holding a compression worker, so there are never more
/// than workers; idle ones are freed with the buffers ([`trim_idle_output`]).
pub(super) static ONE_SHOT_ZSTD: ContextPool = ContextPool(std::sync::Mutex::new(Vec::new()));

/// Free zstd contexts, each with when it came back.
pub(super) struct ContextPool(std::sync::Mutex<Vec<(zstd::bulk::Compressor<'static>, Instant)>>);

impl ContextPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(zstd::bulk::Compressor<'static>, Instant)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A context set to `level`, with or without zstd's frame checksum. Every parameter the
    /// one-shot upload sets is set here again: a pooled context keeps what it was last set to.
    pub(super) fn take(
        &'static self,
        level: i32,
        checksum: bool,
    ) -> std::io::Result<PooledContext> {
        let pooled = self.lock().pop().map(|(c, _)| c);
        let mut c = match pooled {
            Some(mut c) => {
                c.set_compression_level(level)?;
                c
            }
            None => zstd::bulk::Compressor::new(level)?,
        };
        c.include_checksum(checksum)?;
        Ok(PooledContext {
            c: Some(c),
            pool: self,
        })
    }

    /// Frees the contexts idle for `idle`; returns their bytes.
    fn trim_idle(&self, idle: Duration) -> usize {
        let now = Instant::now();
        let mut freed: Vec<_> = {
            let mut pool = self.lock();
            let (old, keep) = std::mem::take(&mut *pool)
                .into_iter()
                .partition(|(_, since)| now.saturating_duration_since(*since) >= idle);
            *pool = keep;
            old
        };
        // Freed outside the lock.
        freed
            .iter_mut()
            .map(|(c, _)| c.context_mut().sizeof())
            .sum()
    }
}

/// A pooled zstd context, back in the pool when dropped, unless [`PooledContext::discard`]ed.
pub(super) struct PooledContext {
    c: Option<zstd::bulk::Compressor<'static>>,
    pool: &'static ContextPool,
}

impl PooledContext {
    /// Frees the context instead of pooling it (a compression failed with it: nothing of
    /// that one is reused).
    pub(super) fn discard(mut self) {
        self.c = None;
    }
}

impl std::ops::Deref for PooledContext {
    type Target = zstd::bulk::Compressor<'static>;
    fn deref(&self) -> &Self::Target {
        self.c.as_ref().expect("taken until dropped")
    }
}

impl std::ops::DerefMut for PooledContext {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.c.as_mut().expect("taken until dropped")
    }
}

impl Drop for PooledContext {
    fn drop(&mut self) {
        if let Some(c) = self.c.take() {
            self.pool.lock().push((c, Instant::now()));
        }
    }
}

/// Free buffers, each with when it came back.
pub(super) struct OutputPool(std::sync::Mutex<Vec<(Vec<u8>, Instant)>>);

impl OutputPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Vec<u8>, Instant)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn trim_idle(&self, idle: Duration) -> usize {
        let now = Instant::now();
        let mut freed = Vec::new();
        self.lock().retain_mut(|(buf, since)| {
            if now.saturating_duration_since(*since) >= idle {
                freed.push(std::mem::take(buf));
                false
            } else {
                true
            }
        });
        // Deallocated outside the lock.
        freed.iter().map(Vec::capacity).sum()
    }

    /// An empty buffer with room for `capacity` bytes, aligned or not (every buffer gets the
    /// same capacity, room for the alignment included, so that none ever grows).
    pub(super) fn take(&'static self, capacity: usize) -> PooledOutput {
        // The most recently returned: the older ones are the first to become idle.
        let mut v = self.lock().pop().map(|(v, _)| v).unwrap_or_default();
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
        self.pool.lock().push((v, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buffers back in the pool for the idle time are freed; one taken since is not.
    #[test]
    fn idle_output_buffers_are_freed() {
        static POOL: OutputPool = OutputPool(std::sync::Mutex::new(Vec::new()));
        let (a, b) = (POOL.take(1000), POOL.take_aligned(1000));
        drop((a, b));
        assert_eq!(POOL.trim_idle(Duration::from_secs(3600)), 0);
        let c = POOL.take(1000);
        let freed = POOL.trim_idle(Duration::ZERO);
        assert!(freed >= 1000, "{freed}");
        assert!(POOL.lock().is_empty());
        drop(c);
        assert_eq!(POOL.lock().len(), 1, "the buffer in use came back");
    }

    /// Issue 16: a reused zstd context takes each object's own settings (the frame checksum
    /// is on exactly for unencrypted objects, whatever the context made before); one context
    /// serves object after object, and one a compression failed with is not reused.
    #[test]
    fn pooled_zstd_contexts_take_each_objects_settings() {
        static POOL: ContextPool = ContextPool(std::sync::Mutex::new(Vec::new()));
        let plain = vec![7u8; 20_000];
        // The frame header descriptor (after the 4-byte magic): bit 2 is the checksum flag.
        let frame = |level, checksum| {
            let mut c = POOL.take(level, checksum).unwrap();
            let out = c.compress(&plain).unwrap();
            drop(c);
            assert_eq!(zstd::bulk::decompress(&out, plain.len()).unwrap(), plain);
            out[4] & 0b100 != 0
        };
        assert!(frame(1, true));
        assert!(!frame(3, false));
        assert!(frame(1, true));
        assert_eq!(
            POOL.lock().len(),
            1,
            "one context for objects one after the other"
        );
        POOL.take(1, false).unwrap().discard();
        assert!(POOL.lock().is_empty(), "a discarded context came back");
        let _ = frame(1, false);
        assert!(POOL.trim_idle(Duration::ZERO) > 0);
        assert!(POOL.lock().is_empty());
    }
}
