//! Blocking calls from async code: on the runtime's blocking pool, except on a thread that
//! does nothing but one synchronous site's receiving and storing (`daemon::own_thread`),
//! where they run in place.
//!
//! A synchronous site's commit waits for its batch to be stored; handing the store's write to
//! a pooled thread and waking the runtime again when it is done cost every commit two thread
//! wake-ups (issue 16, docs/benchmarks.md). On the site's own thread nothing else waits while
//! the write runs (the receiver has nothing to report before it is done), exactly as
//! pg_receivewal writes and syncs on the thread that receives.

use std::future::Future;

use tokio::runtime::{Handle, RuntimeFlavor};

tokio::task_local! {
    static MAY_BLOCK: ();
}

/// Runs `fut` so that [`blocking`] calls within it run in place when it is polled on a
/// single-threaded runtime (a thread of its own); on any other runtime they still go to the
/// blocking pool, so that no worker of a shared runtime ever blocks.
pub fn may_block<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    MAY_BLOCK.scope((), fut)
}

/// Whether a blocking call may run right here ([`may_block`]).
pub fn in_place() -> bool {
    MAY_BLOCK.try_with(|_| ()).is_ok()
        && Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::CurrentThread)
}

/// Runs the blocking `f`: in place within [`may_block`] on a thread of its own, else on the
/// blocking pool.
pub async fn blocking<R, F>(f: F) -> Result<R, tokio::task::JoinError>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    if in_place() {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread() -> std::thread::ThreadId {
        std::thread::current().id()
    }

    /// In place only within `may_block` on a single-threaded runtime; a shared (multi-thread)
    /// runtime's workers never block, scope or not.
    #[test]
    fn blocking_runs_in_place_only_on_a_thread_of_its_own() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let here = thread();
            assert_ne!(blocking(thread).await.unwrap(), here);
            let inside = may_block(async { blocking(thread).await.unwrap() }).await;
            assert_eq!(inside, here);
        });
        let shared = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        shared.block_on(async {
            let task = tokio::spawn(may_block(async {
                let here = thread();
                (here, blocking(thread).await.unwrap())
            }));
            let (worker, ran) = task.await.unwrap();
            assert_ne!(worker, ran);
        });
    }
}
