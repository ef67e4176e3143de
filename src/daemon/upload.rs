//! One WAL file into the archive, retried until it is stored: the site's [`UploadContext`]
//! (store, codec settings, the upload slots shared by every site), the slow retry loop with
//! its alert, and the wait for room on a full archive disk.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use walhoard_protocol::{Backoff, WalSegmentName};
use walhoard_walreceiver::SegmentBuffer;

use crate::pipeline::compression::CompressionSettings;
use crate::pipeline::hash::HashAlgorithm;
use crate::pipeline::transfer::{upload, Source, TransferError, Upload, UploadEncryption};
use crate::storage::meta::{self, ObjectMeta};
use crate::storage::retry::{clear_alert, with_retries, write_alert, RetryPolicy, Transient};
use crate::storage::{ObjectStore, StorageError};

use super::slots::UploadSlots;
use super::status::SiteStatus;

/// Everything an upload needs, shared by a site's uploads.
#[derive(Debug, Clone)]
pub struct UploadContext {
    pub site: String,
    pub store: ObjectStore,
    pub compression: CompressionSettings,
    pub encryption: Option<UploadEncryption>,
    /// The plaintext hash recorded in each object's metadata (`hash_algorithm`).
    pub hash_algorithm: HashAlgorithm,
    pub retry: RetryPolicy,
    /// Bounds concurrent uploads (transfer.thread_count), shared fairly by all of a daemon's
    /// sites.
    pub upload_slots: UploadSlots,
    /// Metadata every WAL object carries (pg-version, host).
    pub base_metadata: ObjectMeta,
    /// The system identifier of the cluster whose WAL this site archives, once the archive
    /// was found to be that cluster's ([`super::identity::ArchiveGuard`]): recorded on every
    /// WAL object stored after that.
    pub system_id: Arc<OnceLock<u64>>,
}

/// The object key a WAL file is archived under, as pghoard lays them out.
pub fn wal_key(name: &WalSegmentName) -> String {
    match name {
        WalSegmentName::History(_) => format!("timeline/{name}"),
        _ => format!("xlog/{name}"),
    }
}

impl UploadContext {
    /// Uploads `path` (whose bytes `data` holds, when the receiver handed them on) as `key`
    /// until it is stored or `cancel` fires: the one retry loop of WAL uploads. Every failure
    /// is retried, a transient one (a lost connection, a throttled store) as a warning, any
    /// other (refused credentials, a missing bucket, a full disk) as an error recorded in the
    /// status: the WAL stays in the spool and in the slot until the store takes it. Waits
    /// follow the site's [`RetryPolicy`] ([`Backoff`]: capped, jittered). Returns false when
    /// cancelled first.
    ///
    /// Failures count towards `upload_retries_warning` (a full archive disk raises it too),
    /// which the next stored object removes, as does the status' `last_error`. While the store
    /// is out of space the wait is capped at [`SPACE_MAX_BACKOFF`], and on local storage cut
    /// short as soon as a free-space probe shows room for the object, so that catching up does
    /// not wait out a long backoff.
    pub async fn upload_until_stored(
        &self,
        key: &str,
        path: &Path,
        data: Option<&Arc<SegmentBuffer>>,
        status: &SiteStatus,
        cancel: &CancellationToken,
    ) -> bool {
        let needed = || match data {
            Some(d) => d.len() as u64,
            None => std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        };
        self.retry_until_stored(key, needed, status, cancel, || {
            self.upload_once(key, path, data)
        })
        .await
    }

    /// The loop of [`UploadContext::upload_until_stored`] around any upload of `key`:
    /// `attempt` is one try, `needed` the bytes it needs free on a full local disk. Partial
    /// WAL objects (`daemon::partial`) are retried by it too.
    pub async fn retry_until_stored<F, Fut>(
        &self,
        key: &str,
        needed: impl Fn() -> u64,
        status: &SiteStatus,
        cancel: &CancellationToken,
        mut attempt: F,
    ) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), TransferError>>,
    {
        let mut backoff = Backoff::new(self.retry.initial_backoff, self.retry.max_backoff);
        let mut failures = 0u32;
        let mut alerted = false;
        let mut reported: Option<String> = None;
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return false,
                r = attempt() => r,
            };
            let e = match result {
                Ok(()) => {
                    clear_alert(&self.retry);
                    if let Some(e) = reported {
                        status.clear_error_if(&e);
                    }
                    if failures > 0 {
                        tracing::info!(site = %self.site, object = key, failures, "archived after retries");
                    }
                    return true;
                }
                Err(e) => e,
            };
            failures += 1;
            let full = e.is_out_of_space();
            let wait = backoff.next_wait();
            let wait = if full {
                wait.min(SPACE_MAX_BACKOFF)
            } else {
                wait
            };
            if e.is_transient() {
                tracing::warn!(site = %self.site, object = key, failures, error = %e, retry_in = ?wait, "transient storage error; the WAL stays in the spool and the slot");
            } else {
                tracing::error!(site = %self.site, object = key, failures, error = %e, retry_in = ?wait, "cannot archive; the WAL stays in the spool and the slot");
                let message = format!("archive {key}: {e}");
                status.set_error(message.clone());
                reported = Some(message);
            }
            if failures >= self.retry.warning_limit && !alerted {
                if let Some(dir) = &self.retry.alert_dir {
                    write_alert(dir, key, failures, &e);
                    alerted = true;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = self.wait_to_retry(wait, full.then(&needed)) => {}
            }
        }
    }

    /// Sleeps `wait`; with `needed` (the store was full), wakes early once local storage has
    /// that many bytes free again (the stored object is at most about the plain size).
    async fn wait_to_retry(&self, wait: Duration, needed: Option<u64>) {
        let Some(needed) = needed.filter(|_| self.store.free_bytes().is_some()) else {
            tokio::time::sleep(wait).await;
            return;
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return;
            }
            tokio::time::sleep((deadline - now).min(SPACE_PROBE_INTERVAL)).await;
            if self.store.free_bytes().is_some_and(|free| free > needed) {
                return;
            }
        }
    }

    /// One attempt at storing `path` (or `data`, its bytes in memory) as `key`.
    pub async fn upload_once(
        &self,
        key: &str,
        path: &Path,
        data: Option<&Arc<SegmentBuffer>>,
    ) -> Result<(), TransferError> {
        let source = match data {
            Some(d) => Source::bytes(InMemory(d.clone())),
            None => Source::File(path.to_path_buf()),
        };
        self.upload_source(key, source).await
    }

    /// One attempt at storing `source` as the WAL object `key`, with the site's codecs and
    /// the metadata every WAL object carries.
    pub async fn upload_source(&self, key: &str, source: Source) -> Result<(), TransferError> {
        let wal = Upload::wal(
            key,
            source,
            self.compression,
            self.encryption.clone(),
            self.hash_algorithm,
        );
        let result = upload(
            &self.store,
            Upload {
                metadata: self.wal_metadata(),
                ..wal
            },
        )
        .await;
        let ty = crate::metrics::FileType::of_key(key);
        crate::metrics::upload(&self.site, ty, self.compression.algorithm.name(), &result);
        result.map(|_| ())
    }

    /// The metadata of a WAL object this site stores: `base_metadata` and the
    /// [`meta::WALHOARD_WRITER`] mark that lets retention tell walhoard's WAL from pghoard's.
    /// Set here, where every WAL upload passes (the receiver's, `PUT /<site>/archive`), so no
    /// path can store unmarked WAL, which retention would then keep forever.
    pub(crate) fn wal_metadata(&self) -> ObjectMeta {
        ObjectMeta {
            walhoard_writer: Some(meta::WALHOARD_WRITER_VALUE.into()),
            system_identifier: self.system_id.get().copied(),
            ..self.base_metadata.clone()
        }
    }

    /// Whether `key` already holds an object, and whether its recorded plaintext hash is the
    /// one `hash_of` computes (on a blocking thread, in the algorithm the object was hashed
    /// with): one metadata read (HEAD, or the sidecar).
    pub async fn existing_with<H>(&self, key: &str, hash_of: H) -> Result<Existing, String>
    where
        H: FnOnce(HashAlgorithm) -> std::io::Result<String> + Send + 'static,
    {
        let stored = match self.store.metadata(key).await {
            Ok(m) => m,
            Err(StorageError::NotFound { .. }) => return Ok(Existing::Absent),
            Err(e) => return Err(e.to_string()),
        };
        let stored = match ObjectMeta::parse(key, &stored) {
            Ok(m) => m,
            Err(e) => return Ok(Existing::Different(e.to_string())),
        };
        let (Some(hash), Some(algorithm)) = (stored.hash, stored.hash_algorithm) else {
            return Ok(Existing::Different(
                "it records no hash to compare with".into(),
            ));
        };
        let ours = tokio::task::spawn_blocking(move || hash_of(algorithm))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        Ok(if ours.eq_ignore_ascii_case(&hash) {
            Existing::Same
        } else {
            Existing::Different(format!("its {algorithm} is {hash}, this WAL's is {ours}"))
        })
    }

    /// [`UploadContext::upload_once`] retried under `policy` while the failure is transient
    /// (archive_command's uploads, which PostgreSQL retries itself after `max_attempts`).
    pub async fn upload_retrying(
        &self,
        policy: &RetryPolicy,
        key: &str,
        path: &Path,
    ) -> Result<(), TransferError> {
        with_retries(policy, key, || self.upload_once(key, path, None)).await
    }
}

/// What the archive holds under a key about to be written.
#[derive(Debug, PartialEq, Eq)]
pub enum Existing {
    Absent,
    /// The same bytes (the recorded hash matches): nothing to upload.
    Same,
    /// Other bytes, or none recorded to compare with: never overwritten by the daemon.
    Different(String),
}

/// A receiver's segment buffer as upload input.
struct InMemory(Arc<SegmentBuffer>);

impl AsRef<[u8]> for InMemory {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Longest wait between attempts while the store is out of space: freeing space is an
/// operator's action that should show at once, not after a backoff grown through the outage.
pub const SPACE_MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often local storage's free space is looked at while waiting for room.
const SPACE_PROBE_INTERVAL: Duration = Duration::from_millis(250);
