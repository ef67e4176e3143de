//! Retrying transient storage failures with capped exponential backoff, and the
//! `upload_retries_warning` alert file of pghoard: created in the alert directory after
//! `upload_retries_warning_limit` failed attempts at one object, removed by the next upload
//! that succeeds.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

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
    // Before the write: the next success must look for the file again.
    absent().remove(&path);
    // Atomically: a monitor (or a test) reading the file as it appears sees all of it.
    if let Err(e) = crate::durable::write_atomic(&path, body.to_string().as_bytes()) {
        tracing::error!(path = %path.display(), error = %e, "cannot write alert file");
    }
}

/// How long the absence of an alert file seen by [`clear_alert`] is trusted: within it a
/// success does not look for the file again. A file this process writes is looked for at the
/// next success whatever the time ([`write_alert`]); one left by an earlier run is found at the
/// first success; one another process writes is removed by the first success at least this
/// long after the last look.
pub const ALERT_RECHECK: Duration = Duration::from_secs(1);

/// Alert files found absent (or removed) by [`clear_alert`], and when: shared by every site's
/// policy of this process, as the file is (the alert directory is the daemon's).
fn absent() -> std::sync::MutexGuard<'static, HashMap<PathBuf, Instant>> {
    static ABSENT: OnceLock<Mutex<HashMap<PathBuf, Instant>>> = OnceLock::new();
    ABSENT
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Removes the `upload_retries_warning` alert after a success, whoever raised it (another
/// object, or an earlier run of the daemon): the store works again. Every success calls this
/// (a synchronous site: every commit), so a file known to be absent is not looked for again
/// within [`ALERT_RECHECK`]: a `stat` per commit, on the path of the reply the commit waits
/// for, was one of the syscalls of every synchronous commit (issue 16, docs/benchmarks.md).
pub fn clear_alert(policy: &RetryPolicy) {
    let Some(dir) = policy.alert_dir.as_ref() else {
        return;
    };
    let path = dir.join(UPLOAD_RETRIES_WARNING);
    if absent()
        .get(&path)
        .is_some_and(|seen| seen.elapsed() < ALERT_RECHECK)
    {
        return;
    }
    // Looked at before the check, so that a file written meanwhile is looked for again.
    let now = Instant::now();
    let gone = match std::fs::remove_file(&path) {
        Ok(()) => {
            tracing::info!(alert = %path.display(), "upload_retries_warning removed: uploads succeed again");
            true
        }
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    };
    if gone {
        absent().insert(path, now);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 16: a success does not look for the alert file again within [`ALERT_RECHECK`] of
    /// finding it absent (one `stat` per synchronous commit), yet the file still goes: at once
    /// when this process wrote it, at the first success when an earlier run left it, and
    /// within [`ALERT_RECHECK`] when someone else wrote it. Fails when every success looks
    /// (the file written behind its back goes at once) or when a known absence is trusted
    /// for ever (it never goes).
    #[test]
    fn the_retries_warning_goes_without_a_stat_per_success() {
        let t = tempfile::tempdir().unwrap();
        let alert = t.path().join(UPLOAD_RETRIES_WARNING);
        // Left by an earlier run: the first success removes it.
        std::fs::write(&alert, "{}").unwrap();
        let policy = RetryPolicy {
            alert_dir: Some(t.path().to_path_buf()),
            ..RetryPolicy::default()
        };
        clear_alert(&policy);
        assert!(!alert.exists(), "left by an earlier run");
        // Known absent: a file written behind the process' back stays for now.
        std::fs::write(&alert, "{}").unwrap();
        clear_alert(&policy);
        assert!(alert.exists(), "looked for again within {ALERT_RECHECK:?}");
        // Written by this process: the next success removes it, however recent the last look.
        write_alert(t.path(), "xlog/x", 3, &"refused");
        clear_alert(&policy);
        assert!(!alert.exists(), "written by this process");
        // Behind its back again: gone with the first success after ALERT_RECHECK.
        std::fs::write(&alert, "{}").unwrap();
        clear_alert(&policy);
        assert!(alert.exists());
        std::thread::sleep(ALERT_RECHECK + Duration::from_millis(50));
        clear_alert(&policy);
        assert!(
            !alert.exists(),
            "not looked for again after {ALERT_RECHECK:?}"
        );
    }
}
