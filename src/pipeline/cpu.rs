//! The compression worker pool: at most `compression.thread_count` objects are compressed
//! and encrypted at once across the whole process (pghoard's default: CPU count + 1), however
//! many uploads (`transfer.thread_count`) are in flight. An upload waits for a worker before
//! it starts, so no upload holds a connection open while it waits for the CPU.

use std::sync::{Arc, OnceLock, RwLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

static POOL: OnceLock<RwLock<Arc<Semaphore>>> = OnceLock::new();

/// pghoard's default worker count: CPU count + 1.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) + 1
}

fn pool() -> &'static RwLock<Arc<Semaphore>> {
    POOL.get_or_init(|| RwLock::new(Arc::new(Semaphore::new(default_threads()))))
}

/// Sets the number of workers (a configuration reload may change it; work already running
/// keeps the permit it has).
pub fn configure(threads: usize) {
    *pool().write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Semaphore::new(threads.max(1)));
}

/// Waits for a worker; the work holds the permit until it is done.
pub async fn worker() -> OwnedSemaphorePermit {
    let sem = pool().read().unwrap_or_else(|p| p.into_inner()).clone();
    // The semaphore is never closed.
    match sem.acquire_owned().await {
        Ok(p) => p,
        Err(_) => unreachable!("the compression pool's semaphore is never closed"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::config::ObjectStorageConfig;
    use crate::pipeline::compression::{Algorithm, CompressionSettings};
    use crate::pipeline::transfer::{upload, Hashing, Input, ObjectKind, Source, Upload};
    use crate::storage::ObjectStore;

    /// How many of `n` concurrent uploads compress at the same time with `threads` workers.
    async fn peak_concurrency(threads: usize, n: usize) -> usize {
        configure(threads);
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(
            &ObjectStorageConfig::Local {
                directory: dir.path().to_path_buf(),
                prefix: None,
            },
            "s",
        )
        .unwrap();
        let active = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..n {
            let (store, active, peak) = (store.clone(), active.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                let produce = move |w: &mut dyn std::io::Write| {
                    let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(150));
                    w.write_all(b"data")?;
                    active.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                };
                upload(
                    &store,
                    Upload {
                        kind: ObjectKind::BasebackupChunk,
                        key: format!("o{i}"),
                        source: Source::produced(produce),
                        input: Input::Plain,
                        hashing: Hashing::Sha1Returned,
                        compression: CompressionSettings::new(Algorithm::Zstd),
                        encryption: None,
                        metadata: Default::default(),
                    },
                )
                .await
                .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        peak.load(Ordering::SeqCst)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn workers_bound_concurrent_compression() {
        assert_eq!(peak_concurrency(1, 4).await, 1);
        assert!(
            peak_concurrency(3, 4).await >= 2,
            "no parallelism with 3 workers"
        );
        assert!(peak_concurrency(2, 6).await <= 2);
        configure(default_threads());
    }
}
