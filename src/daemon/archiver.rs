//! From spool to archive: takes what the receiver hands on (segments, timeline `.partial`s,
//! `.history` files), uploads each through compress → encrypt → store with up to
//! `transfer.thread_count` uploads at once, deletes the spool file once it is stored, and
//! publishes how far the archive is contiguous.
//!
//! Uploads finish in any order, but the position told to the receiver (and so to the server's
//! slot) only moves over a prefix of jobs that are *all* stored: jobs are queued in the order
//! the receiver produced them, and the archive's end is the largest end among the completed
//! prefix. A segment uploaded ahead of a slower one below it does not move the slot.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use walhoard_protocol::{Backoff, Lsn, WalSegmentName};
use walhoard_walreceiver::SegmentBuffer;

use crate::pipeline::hash::HashAlgorithm;

use super::status::{Alerts, SiteStatus};

pub use super::upload::{wal_key, Existing, UploadContext, SPACE_MAX_BACKOFF};

#[derive(Debug)]
struct Job {
    /// What the archive holds up to once this job and all before it are done; `None` for
    /// files that do not extend the WAL stream (history files, a timeline's `.partial`).
    end: Option<Lsn>,
    done: bool,
}

/// Jobs in the order the receiver produced them, and the archive's contiguous end.
#[derive(Debug)]
struct Queue {
    archived: Lsn,
    jobs: VecDeque<(u64, Job)>,
    next_id: u64,
}

/// The ordered queue of a site's uploads. Cloning shares it.
#[derive(Clone)]
pub struct Archiver {
    queue: Arc<Mutex<Queue>>,
    archived_tx: Arc<watch::Sender<Lsn>>,
    ctx: Arc<UploadContext>,
    status: Arc<SiteStatus>,
    spool_dir: PathBuf,
    /// Where a refused overwrite is reported (`wal_overwrite_<site>`).
    alerts: Option<Alerts>,
}

/// The alert file of a site that refused to replace an archived WAL object with other bytes.
pub fn wal_overwrite_alert(site: &str) -> String {
    format!("wal_overwrite_{site}")
}

/// Whether the key of an upload may already hold an object, so it must be looked up first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Streamed past the resume point: the resume scan found the archive ends before it.
    New,
    /// Left by an earlier run, a `.history` or a timeline's `.partial`.
    MayExist,
}

/// The plaintext hash of what is about to be archived, in the algorithm `stored` was hashed with.
fn local_hash(
    algorithm: HashAlgorithm,
    path: &Path,
    data: Option<&Arc<SegmentBuffer>>,
) -> std::io::Result<String> {
    let mut h = algorithm.hasher();
    match data {
        Some(d) => h.update(d),
        None => {
            use std::io::Read;
            let mut f = std::fs::File::open(path)?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
    }
    Ok(h.finish_hex())
}

impl Archiver {
    /// `archived` is the watch the receiver reads its flush position from.
    pub fn new(
        ctx: Arc<UploadContext>,
        status: Arc<SiteStatus>,
        spool_dir: PathBuf,
        archived: watch::Sender<Lsn>,
    ) -> Self {
        Archiver {
            queue: Arc::new(Mutex::new(Queue {
                archived: Lsn::INVALID,
                jobs: VecDeque::new(),
                next_id: 0,
            })),
            archived_tx: Arc::new(archived),
            ctx,
            status,
            spool_dir,
            alerts: None,
        }
    }

    /// Report refused overwrites in alert files too.
    pub fn set_alerts(&mut self, alerts: Alerts) {
        self.alerts = Some(alerts);
    }

    /// Whether `key` already holds an object, and whether it is the one at `path`: one
    /// metadata read (HEAD, or the sidecar) and a hash of the local file.
    async fn existing(
        &self,
        key: &str,
        path: &Path,
        data: Option<&Arc<SegmentBuffer>>,
    ) -> Result<Existing, String> {
        let (path, data) = (path.to_path_buf(), data.cloned());
        self.ctx
            .existing_with(key, move |algorithm| {
                local_hash(algorithm, &path, data.as_ref())
            })
            .await
    }

    pub fn spool_dir(&self) -> &Path {
        &self.spool_dir
    }

    pub fn context(&self) -> &UploadContext {
        &self.ctx
    }

    pub fn context_arc(&self) -> Arc<UploadContext> {
        self.ctx.clone()
    }

    /// The archive holds everything before `at` (the resume point): start counting there.
    pub fn start_at(&self, at: Lsn) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.jobs.is_empty() && at > q.archived {
            q.archived = at;
            drop(q);
            self.publish(at);
        }
    }

    fn publish(&self, archived: Lsn) {
        self.archived_tx.send_replace(archived);
        self.status.set_archived(archived);
    }

    /// Queues a job; returns its id.
    fn push(&self, end: Option<Lsn>, done: bool) -> u64 {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let id = q.next_id;
        q.next_id += 1;
        q.jobs.push_back((id, Job { end, done }));
        self.status.set_queue_len(q.jobs.len());
        drop(q);
        if done {
            self.advance();
        }
        id
    }

    fn complete(&self, id: u64) {
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, job)) = q.jobs.iter_mut().find(|(i, _)| *i == id) {
                job.done = true;
            }
        }
        self.advance();
    }

    fn advance(&self) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let before = q.archived;
        while q.jobs.front().is_some_and(|(_, j)| j.done) {
            if let Some((_, job)) = q.jobs.pop_front() {
                if let Some(end) = job.end {
                    q.archived = q.archived.max(end);
                }
            }
        }
        let archived = q.archived;
        self.status.set_queue_len(q.jobs.len());
        drop(q);
        if archived != before {
            self.publish(archived);
        }
    }

    /// A segment that is already in the archive (found while resuming): counts as done.
    pub fn already_archived(&self, end: Lsn) {
        self.push(Some(end), true);
    }

    /// Uploads the spool file `path` as `name` (from `data`, the same bytes in memory, when
    /// the receiver handed them on), deleting it once stored. Waits for an upload slot first
    /// (the back-pressure that bounds the spool), then runs the upload on `tracker`. `end` is
    /// what the archive holds up to once this and everything queued before it is stored.
    ///
    /// With [`KeyState::MayExist`] (a spool file left by an earlier run, a `.history`, a
    /// timeline's `.partial`) the key is looked up first (one metadata read): the same bytes
    /// count as archived; other bytes are never overwritten (ERROR, `wal_overwrite_<site>`
    /// alert, the file stays in the spool and the archive's position stops below it, so the
    /// slot keeps the WAL). Segments streamed past the resume point are [`KeyState::New`]: the
    /// resume scan found the archive ends there, so a lookup per segment would only slow the
    /// hot path.
    #[allow(clippy::too_many_arguments)]
    pub async fn archive(
        &self,
        name: WalSegmentName,
        path: PathBuf,
        data: Option<Arc<SegmentBuffer>>,
        end: Option<Lsn>,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
        key_state: KeyState,
    ) -> Result<(), Cancelled> {
        let permit = tokio::select! {
            _ = cancel.cancelled() => return Err(Cancelled),
            p = self.ctx.upload_slots.acquire() => p.map_err(|_| Cancelled)?,
        };
        let id = self.push(end, false);
        let this = self.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let key = wal_key(&name);
            let started = std::time::Instant::now();
            let mut existing = Existing::Absent;
            let mut backoff =
                Backoff::new(this.ctx.retry.initial_backoff, this.ctx.retry.max_backoff);
            if key_state == KeyState::MayExist {
                loop {
                    match this.existing(&key, &path, data.as_ref()).await {
                        Ok(e) => {
                            existing = e;
                            break;
                        }
                        Err(e) => {
                            // Unknown is not absent: uploading now could overwrite.
                            let wait = backoff.next_wait();
                            tracing::warn!(site = %this.ctx.site, object = %key, error = %e, retry_in = ?wait, "cannot tell whether this is already archived; asking again before uploading");
                            this.status.set_error(format!("look up {key}: {e}"));
                            tokio::select! {
                                _ = cancel.cancelled() => return,
                                _ = tokio::time::sleep(wait) => {}
                            }
                        }
                    }
                }
            }
            match existing {
                Existing::Absent => {
                    if !this
                        .ctx
                        .upload_until_stored(&key, &path, data.as_ref(), &this.status, &cancel)
                        .await
                    {
                        return;
                    }
                }
                Existing::Same => {
                    tracing::info!(site = %this.ctx.site, object = %key, "already archived with the same content; not uploaded again");
                }
                Existing::Different(why) => {
                    let detail = format!("site {}: {key} is already archived with other content ({why}); refusing to replace it: {} stays in the spool and the slot keeps its WAL", this.ctx.site, path.display());
                    tracing::error!(site = %this.ctx.site, object = %key, "{detail}");
                    this.status.set_error(detail.clone());
                    if let Some(a) = &this.alerts {
                        a.raise(&wal_overwrite_alert(&this.ctx.site), &detail);
                    }
                    // The job never completes: the archive's position stays below it.
                    return;
                }
            }
            // The buffer goes back to the receiver now, before the file system work below.
            let in_memory = data.is_some();
            drop(data);
            tracing::info!(site = %this.ctx.site, object = %key, in_memory, elapsed = ?started.elapsed(), "archived");
            match std::fs::remove_file(&path) {
                // A segment received into memory alone never had a spool file.
                Err(e) if !(in_memory && e.kind() == std::io::ErrorKind::NotFound) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove archived spool file");
                }
                _ => {}
            }
            this.status.archived_file(&name);
            this.complete(id);
        });
        Ok(())
    }
}

/// The daemon is stopping.
#[derive(Debug)]
pub struct Cancelled;

/// How long a stopping daemon lets running uploads finish before it leaves them to the next
/// start (they stay in the spool; the slot holds their WAL).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::ObjectStorageConfig;
    use crate::pipeline::compression::{Algorithm, CompressionSettings};
    use crate::storage::meta::ObjectMeta;
    use crate::storage::retry::RetryPolicy;
    use crate::storage::ObjectStore;

    /// Site `site` uploading into local storage at `dir`, zstd, no encryption, defaults.
    pub(crate) fn local_context(dir: &Path) -> UploadContext {
        let store = ObjectStore::open(
            &ObjectStorageConfig::Local {
                directory: dir.to_path_buf(),
                prefix: None,
            },
            "site",
        )
        .unwrap();
        UploadContext {
            site: "site".into(),
            store,
            compression: CompressionSettings::new(Algorithm::Zstd),
            encryption: None,
            hash_algorithm: HashAlgorithm::Sha1,
            retry: RetryPolicy::default(),
            upload_slots: crate::daemon::slots::UploadSlots::new(4),
            base_metadata: ObjectMeta::default(),
            system_id: Default::default(),
        }
    }

    fn archiver(dir: &Path) -> (Archiver, watch::Receiver<Lsn>) {
        let ctx = local_context(&dir.join("archive"));
        let (tx, rx) = watch::channel(Lsn::INVALID);
        let a = Archiver::new(
            Arc::new(ctx),
            Arc::new(SiteStatus::default()),
            dir.to_path_buf(),
            tx,
        );
        (a, rx)
    }

    #[test]
    fn position_moves_only_over_a_completed_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let (a, rx) = archiver(dir.path());
        a.start_at(Lsn(0x1000000));
        assert_eq!(*rx.borrow(), Lsn(0x1000000));
        let s2 = a.push(Some(Lsn(0x2000000)), false);
        let history = a.push(None, false);
        let s3 = a.push(Some(Lsn(0x3000000)), false);
        // The later segment and the history file finish first: nothing moves.
        a.complete(s3);
        a.complete(history);
        assert_eq!(
            *rx.borrow(),
            Lsn(0x1000000),
            "moved past an unfinished upload"
        );
        // The slow one below finishes: everything up to the end of the prefix is held.
        a.complete(s2);
        assert_eq!(*rx.borrow(), Lsn(0x3000000));
        // A segment found already archived counts at once when nothing is pending.
        a.already_archived(Lsn(0x4000000));
        assert_eq!(*rx.borrow(), Lsn(0x4000000));
        // start_at never moves an archive that already has work queued.
        let _pending = a.push(Some(Lsn(0x5000000)), false);
        a.start_at(Lsn(0x9000000));
        assert_eq!(*rx.borrow(), Lsn(0x4000000));
    }

    /// Regression (a daemon on another cluster's archive replaced its `xlog/` objects): a
    /// spool file whose key already holds other bytes is never uploaded over them; the file
    /// stays, the archive's position stays below it, an alert file says why. The same bytes
    /// count as archived without an upload.
    #[tokio::test]
    async fn archive_never_replaces_a_wal_object_with_other_content() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, rx) = archiver(dir.path());
        let alerts = Alerts {
            dir: dir.path().join("alerts"),
        };
        a.set_alerts(alerts.clone());
        a.start_at(Lsn(0x1000000));
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let store = &a.context().store;
        // Another writer's segment 1, recorded with the hash of its bytes (as pghoard does).
        let theirs = vec![1u8; 1 << 20];
        let mut h = HashAlgorithm::Sha1.hasher();
        h.update(&theirs);
        let meta = ObjectMeta {
            hash: Some(h.finish_hex()),
            hash_algorithm: Some(HashAlgorithm::Sha1),
            compression_algorithm: Some(crate::pipeline::compression::Algorithm::Zstd),
            ..ObjectMeta::default()
        }
        .to_map();
        let key1 = "xlog/000000010000000000000001";
        store.put_bytes(key1, b"their object", &meta).await.unwrap();
        let ours: WalSegmentName = "000000010000000000000001".parse().unwrap();
        let path = dir.path().join(ours.to_string());
        std::fs::write(&path, vec![2u8; 1 << 20]).unwrap();
        a.archive(
            ours,
            path.clone(),
            None,
            Some(Lsn(0x2000000)),
            &tracker,
            &cancel,
            KeyState::MayExist,
        )
        .await
        .unwrap();
        let alert = dir.path().join("alerts").join(wal_overwrite_alert("site"));
        for _ in 0..200 {
            if alert.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let detail = std::fs::read_to_string(&alert).unwrap_or_default();
        assert!(detail.contains(key1), "alert: {detail:?}");
        assert_eq!(store.get_bytes(key1).await.unwrap().0, b"their object");
        assert!(path.exists(), "the refused WAL left the spool");
        assert_eq!(*rx.borrow(), Lsn(0x1000000), "moved past refused WAL");

        // The same bytes under segment 2's key: archived without uploading them again.
        let (b, mut rx2) = archiver(&dir.path().join("second"));
        std::fs::create_dir_all(dir.path().join("second")).unwrap();
        b.start_at(Lsn(0x2000000));
        let key2 = "xlog/000000010000000000000002";
        b.context()
            .store
            .put_bytes(key2, b"kept as is", &meta)
            .await
            .unwrap();
        let same: WalSegmentName = "000000010000000000000002".parse().unwrap();
        let path2 = dir.path().join("second").join(same.to_string());
        std::fs::write(&path2, &theirs).unwrap();
        b.archive(
            same,
            path2.clone(),
            None,
            Some(Lsn(0x3000000)),
            &tracker,
            &cancel,
            KeyState::MayExist,
        )
        .await
        .unwrap();
        rx2.wait_for(|l| *l == Lsn(0x3000000)).await.unwrap();
        assert_eq!(
            b.context().store.get_bytes(key2).await.unwrap().0,
            b"kept as is"
        );
        assert!(!path2.exists());
        tracker.close();
        tracker.wait().await;
    }

    /// A tmpfs mounted on a new directory, unmounted on drop.
    struct SmallDisk(PathBuf);

    impl SmallDisk {
        /// `None` where mounting is not allowed (not root): the test then cannot run.
        fn mount(at: PathBuf, size: &str) -> Option<SmallDisk> {
            std::fs::create_dir_all(&at).unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(&at)
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(SmallDisk(at))
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }

    /// Bytes zstd cannot shrink (xorshift).
    fn incompressible(n: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_archive_disk_alerts_clears_last_error_and_catches_up_quickly() {
        // The daemon's usual path (a segment in memory, written whole) and the spool file's.
        full_archive_disk(true).await;
        full_archive_disk(false).await;
    }

    async fn full_archive_disk(in_memory: bool) {
        let dir = tempfile::tempdir().unwrap();
        let Some(disk) = SmallDisk::mount(dir.path().join("archive"), "2m") else {
            eprintln!("cannot mount a tmpfs (not root?): skipped");
            return;
        };
        // Fill the archive disk.
        let filler = disk.0.join("filler");
        let _ = std::fs::write(&filler, vec![0u8; 4 << 20]);
        let store = ObjectStore::open(
            &ObjectStorageConfig::Local {
                directory: disk.0.clone(),
                prefix: None,
            },
            "site",
        )
        .unwrap();
        let alerts = dir.path().join("alerts");
        std::fs::create_dir(&alerts).unwrap();
        let ctx = UploadContext {
            site: "site".into(),
            store: store.clone(),
            compression: CompressionSettings::new(Algorithm::Zstd),
            encryption: None,
            hash_algorithm: HashAlgorithm::Sha1,
            // As the daemon's defaults would grow it: 60 s once the outage lasted a while.
            retry: RetryPolicy {
                initial_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(60),
                warning_limit: 2,
                alert_dir: Some(alerts.clone()),
                max_attempts: None,
            },
            upload_slots: crate::daemon::slots::UploadSlots::new(1),
            base_metadata: ObjectMeta::default(),
            system_id: Default::default(),
        };
        let spool = dir.path().join("000000010000000000000001");
        let bytes = incompressible(512 << 10);
        std::fs::write(&spool, &bytes).unwrap();
        let data = in_memory.then(|| {
            let mut b = walhoard_walreceiver::SegmentBuffers::new(1)
                .try_take(bytes.len())
                .unwrap();
            b.extend(&bytes);
            Arc::new(b)
        });
        let status = Arc::new(SiteStatus::default());
        let cancel = CancellationToken::new();
        let upload = {
            let (status, cancel, spool) = (status.clone(), cancel.clone(), spool.clone());
            tokio::spawn(async move {
                let key = "xlog/000000010000000000000001";
                ctx.upload_until_stored(key, &spool, data.as_ref(), &status, &cancel)
                    .await
            })
        };
        let alert = alerts.join(crate::storage::retry::UPLOAD_RETRIES_WARNING);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !alert.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "no upload_retries_warning while the archive disk is full (in memory: {in_memory})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let error = status.snapshot().last_error.unwrap_or_default();
        assert!(
            error.contains("000000010000000000000001"),
            "in memory: {in_memory}: {error:?}"
        );
        // The outage lasts long enough for the backoff to grow past seconds (100 ms doubled
        // six times: the next wait would be 6.4 s).
        tokio::time::sleep(Duration::from_millis(6500)).await;
        assert!(!upload.is_finished());
        std::fs::remove_file(&filler).unwrap();
        let freed = std::time::Instant::now();
        let stored = tokio::time::timeout(Duration::from_secs(30), upload)
            .await
            .unwrap()
            .unwrap();
        assert!(stored);
        let took = freed.elapsed();
        eprintln!("in memory: {in_memory}: stored {took:?} after space was freed");
        assert!(
            took < Duration::from_secs(2),
            "took {took:?} to catch up after space returned (in memory: {in_memory})"
        );
        assert!(store
            .stat("xlog/000000010000000000000001")
            .await
            .unwrap()
            .is_some());
        assert_eq!(
            status.snapshot().last_error,
            None,
            "last_error kept after recovery"
        );
        assert!(!alert.exists(), "alert kept after recovery");
        drop(store);
        drop(disk);
    }

    #[tokio::test]
    async fn archive_uploads_then_deletes_the_spool_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, mut rx) = archiver(dir.path());
        a.start_at(Lsn(0x1000000));
        let name: WalSegmentName = "000000010000000000000001".parse().unwrap();
        let path = dir.path().join(name.to_string());
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        a.archive(
            name,
            path.clone(),
            None,
            Some(Lsn(0x2000000)),
            &tracker,
            &cancel,
            KeyState::New,
        )
        .await
        .unwrap();
        rx.wait_for(|l| *l == Lsn(0x2000000)).await.unwrap();
        tracker.close();
        tracker.wait().await;
        assert!(!path.exists(), "spool file kept after archiving");
        let stored = a
            .context()
            .store
            .stat("xlog/000000010000000000000001")
            .await
            .unwrap();
        assert!(stored.is_some());
    }
}
