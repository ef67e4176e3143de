//! Retrying transient storage failures with capped exponential backoff, and the
//! `upload_retries_warning` alert file of pghoard: created in the alert directory after
//! `upload_retries_warning_limit` failed attempts at one object, removed by the next upload
//! that succeeds.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncRead;

use walhoard_protocol::Backoff;

use super::{Metadata, ObjectStore, StorageError};

/// Name of the alert file (pghoard's).
pub const UPLOAD_RETRIES_WARNING: &str = "upload_retries_warning";

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Failed attempts at one object before the alert file appears.
    pub warning_limit: u32,
    /// Where alert files go; none means no alert file.
    pub alert_dir: Option<PathBuf>,
    /// Give up after this many attempts; `None` retries transient errors forever.
    pub max_attempts: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            warning_limit: 3,
            alert_dir: None,
            max_attempts: None,
        }
    }
}

/// An error that knows whether trying the same operation again can succeed (a lost
/// connection, a throttled or unavailable service) or not without a change (refused
/// credentials, a missing bucket, a full disk, a corrupt source).
pub trait Transient: std::fmt::Display {
    fn is_transient(&self) -> bool;
}

impl Transient for StorageError {
    fn is_transient(&self) -> bool {
        StorageError::is_transient(self)
    }
}

/// Writes the `upload_retries_warning` alert file naming `what` and the last error.
pub fn write_alert(dir: &Path, what: &str, failures: u32, err: &dyn std::fmt::Display) {
    let body =
        serde_json::json!({ "object": what, "failures": failures, "error": err.to_string() });
    let path = dir.join(UPLOAD_RETRIES_WARNING);
    // Atomically: a monitor (or a test) reading the file as it appears sees all of it.
    if let Err(e) = crate::durable::write_atomic(&path, body.to_string().as_bytes()) {
        tracing::error!(path = %path.display(), error = %e, "cannot write alert file");
    }
}

/// Removes the `upload_retries_warning` alert after a success, whoever raised it (another
/// object, or an earlier run of the daemon): the store works again.
pub fn clear_alert(policy: &RetryPolicy) {
    if let Some(path) = policy
        .alert_dir
        .as_ref()
        .map(|d| d.join(UPLOAD_RETRIES_WARNING))
    {
        if path.exists() && std::fs::remove_file(&path).is_ok() {
            tracing::info!(alert = %path.display(), "upload_retries_warning removed: uploads succeed again");
        }
    }
}

/// Runs `op` until it succeeds, a permanent error occurs, or `max_attempts` is reached.
/// `what` names the object in logs and the alert file.
pub async fn with_retries<T, E, F, Fut>(policy: &RetryPolicy, what: &str, mut op: F) -> Result<T, E>
where
    E: Transient,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut failures = 0u32;
    let mut alerted = false;
    let mut backoff = Backoff::new(policy.initial_backoff, policy.max_backoff);
    loop {
        match op().await {
            Ok(v) => {
                clear_alert(policy);
                if failures > 0 {
                    tracing::info!(object = what, failures, "transfer succeeded after retries");
                }
                return Ok(v);
            }
            Err(e) if e.is_transient() => {
                failures += 1;
                if policy.max_attempts.is_some_and(|m| failures >= m) {
                    return Err(e);
                }
                let wait = backoff.next_wait();
                tracing::warn!(object = what, failures, error = %e, retry_in = ?wait, "transient storage error");
                if failures >= policy.warning_limit && !alerted {
                    if let Some(dir) = &policy.alert_dir {
                        write_alert(dir, what, failures, &e);
                        alerted = true;
                    }
                }
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

impl ObjectStore {
    /// Stores `key` from a source that `open` opens anew for every attempt, retrying transient
    /// failures under `policy` (alert file included). A lost connection in the middle of a
    /// chunked upload (S3 multipart, Azure blocks, an sftp file) cannot be resumed: the failed
    /// attempt is aborted where the store allows and the next one starts again from the first
    /// byte, so the source must be re-readable (a file, not a stream). The object is visible
    /// only once an attempt completed.
    pub async fn put_retrying<R, F>(
        &self,
        policy: &RetryPolicy,
        key: &str,
        mut open: F,
        metadata: &Metadata,
    ) -> Result<u64, StorageError>
    where
        F: FnMut() -> std::io::Result<R>,
        R: AsyncRead + Unpin + Send,
    {
        with_retries(policy, key, || {
            let source = open();
            async move {
                let source = source.map_err(|e| StorageError::Io {
                    action: "open source of",
                    key: key.into(),
                    source: e,
                })?;
                self.put(key, source, metadata).await
            }
        })
        .await
    }
}
