//! Memory a burst needed goes back to the system once idle: the segment buffers of the
//! daemon's budget (`wal_buffer_memory_mib`) and the pooled one-shot output buffers are kept
//! for reuse while WAL flows, but a buffer nobody took for [`IDLE`] is freed, and the
//! allocator is told to return the freed pages. Without this, the RSS of a daemon that once
//! drained a backlog stayed near the budget for good (docs/benchmarks.md, "Many sites").

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use walhoard_walreceiver::BufferBudget;

/// How long a free buffer is kept for reuse.
pub const IDLE: Duration = Duration::from_secs(10);
/// How often free buffers are looked at (one timer for the daemon, not one per site).
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Frees idle buffers every [`CHECK_EVERY`] until `stop`; also returns free pages once when
/// the start has settled ([`IDLE`] after it): starting every site (connections, archive
/// listings, spool scans, on up to a few hundred blocking threads at once) leaves freed
/// memory in the allocator's per-thread arenas, which nothing else would trim when no
/// segment buffer was ever taken: 50 sites started idle held 64 MiB where 50 sites
/// restarted after a drain (whose buffers were trimmed) held 28 (docs/benchmarks.md).
pub async fn give_back_idle(budget: BufferBudget, stop: CancellationToken) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = tokio::time::Instant::now();
    let mut settled = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let freed = budget.trim_idle(IDLE) + crate::pipeline::transfer::trim_idle_output(IDLE);
        let settling = !settled && started.elapsed() >= IDLE;
        settled |= settling;
        if freed > 0 || settling {
            tracing::debug!(bytes = freed, "freed idle WAL buffers");
            // Walks every allocator arena: off the runtime's threads.
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
        }
    }
}

/// Returns the allocator's free pages to the system. glibc keeps freed blocks of segment
/// size in its heaps once its mmap threshold has risen past them (it rises to the size of
/// the largest block freed), so freeing alone does not lower the RSS; `malloc_trim` releases
/// free pages in every arena.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}
