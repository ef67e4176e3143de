//! A synchronous site's receiver on a thread of its own (issue 16).
//!
//! Every commit on a primary that lists the site in `synchronous_standby_names` waits for the
//! round trip WAL → batch stored → flush reported. On the shared runtime that trip crossed
//! threads four times: the receiver's worker handed the batch to the site loop and a batch
//! task, the store's write went to a pooled blocking thread, its end woke a runtime worker
//! (which woke another), and the reply went out from there (docs/benchmarks.md). Here the
//! receiver, its batches and their writes share one thread with a single-threaded runtime, as
//! pg_receivewal receives, writes, syncs and replies on one: the batch is spawned next to the
//! receiver ([`walhoard_walreceiver::BatchSink`]), its write runs in place
//! ([`crate::pipeline::blocking`]), and the durable end it publishes wakes the receiver on the
//! same thread. Complete segments still go to the site loop on the shared runtime.

use std::future::Future;

use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

/// Runs `fut` to its end on a new thread named after `site`, then every task spawned there on
/// `batches` (a batch being stored is finished, not dropped, when the receiver stops); returns
/// `fut`'s output, or why there is none (the thread could not start, or panicked).
pub fn spawn<F>(
    site: &str,
    fut: F,
    batches: TaskTracker,
) -> impl Future<Output = Result<F::Output, String>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let started = std::thread::Builder::new()
        .name(format!("wh-sync-{site}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(format!("cannot start its runtime: {e}")));
                    return;
                }
            };
            let out = rt.block_on(async {
                let out = fut.await;
                batches.close();
                batches.wait().await;
                out
            });
            let _ = tx.send(Ok(out));
        });
    async move {
        started.map_err(|e| format!("cannot start its thread: {e}"))?;
        rx.await
            .map_err(|_| "its thread ended without a result".to_string())?
    }
}

#[cfg(test)]
mod tests {
    /// The future and the tasks it spawned on `batches` run on the new thread, and the output
    /// comes back only once those tasks are done.
    #[tokio::test]
    async fn runs_the_receiver_and_its_batches_on_one_new_thread() {
        let batches = tokio_util::task::TaskTracker::new();
        let here = std::thread::current().id();
        let b = batches.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let out = super::spawn(
            "t",
            async move {
                let receiver = std::thread::current().id();
                b.spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    tx.send(std::thread::current().id()).unwrap();
                });
                receiver
            },
            batches,
        )
        .await
        .unwrap();
        assert_ne!(out, here);
        // Sent before the output came back, from the same thread.
        assert_eq!(rx.try_recv().unwrap(), out);
    }
}
