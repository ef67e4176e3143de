//! What the daemon knows about each site, for the state file (`json_state_file_path`), the
//! HTTP status endpoint and the alert files of pghoard's README.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use walhoard_protocol::{Lsn, TimelineId, WalSegmentName};

/// pghoard's alert file names.
pub const AUTHENTICATION_ERROR: &str = "authentication_error";
pub const CONFIGURATION_ERROR: &str = "configuration_error";
pub const VERSION_UNSUPPORTED_ERROR: &str = "version_unsupported_error";

/// One site's WAL streaming, as shown in the state file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WalState {
    pub connected: bool,
    pub server_timeline: Option<u32>,
    /// Timeline being received.
    pub timeline: Option<u32>,
    /// Every byte before this was received and written to the spool.
    pub received_lsn: Option<String>,
    /// The flush position last reported to the server (the slot follows it).
    pub reported_flush_lsn: Option<String>,
    /// Every byte before this is durable in the archive.
    pub archived_lsn: Option<String>,
    /// The archive's durable end counting partial WAL objects (issue 16); the archived end
    /// when partial uploads are off.
    pub durable_lsn: Option<String>,
    /// Seconds since the oldest received byte that is not durable in the archive yet arrived
    /// (the current data-loss window); 0 when all of it is.
    pub undurable_age_seconds: f64,
    /// Partial WAL objects stored since start, and the plain bytes they hold.
    pub partial_objects_uploaded: u64,
    pub partial_bytes_uploaded: u64,
    /// received − archived, in bytes.
    pub archive_lag_bytes: u64,
    /// Seconds since the first byte not yet archived was received (0 when nothing waits):
    /// the data-loss window.
    pub archive_lag_seconds: f64,
    /// Uploads queued or running.
    pub upload_queue: usize,
    pub last_archived: Option<String>,
    pub last_archived_time: Option<f64>,
    pub last_activity_time: Option<f64>,
    pub last_error: Option<String>,
    pub last_error_time: Option<f64>,
    pub files_archived: u64,
    /// Receiving is paused because backup_location is short of space.
    pub paused_for_disk_space: bool,
    /// The last gap found in the archive's WAL (WAL the primary removed before it was
    /// archived); `null` when none was found since the daemon started.
    pub wal_gap: Option<WalGapState>,
    /// Set when the site's archive holds WAL of another cluster (another system identifier):
    /// nothing is archived while it is set. Names both identifiers and the object.
    pub foreign_archive: Option<String>,
}

/// A range of WAL that is neither in the archive nor on the primary any more.
#[derive(Debug, Clone, Serialize)]
pub struct WalGapState {
    /// The first missing byte (a segment boundary).
    pub from_lsn: String,
    /// Streaming continued here (the slot's position).
    pub to_lsn: String,
    pub timeline: u32,
    pub first_missing_segment: String,
    pub last_missing_segment: String,
    pub detected_time: f64,
    /// The primary's error.
    pub error: String,
    /// The basebackup taken after the gap, once it is stored: point-in-time recovery is
    /// possible again from its start. `null` while the gap is unresolved.
    pub resolved_by_basebackup: Option<String>,
}

/// The alert file of a site's unresolved WAL gap (`walhoard check` fails while it exists).
pub fn wal_gap_alert(site: &str) -> String {
    format!("wal_gap_{site}")
}

#[derive(Debug, Default)]
struct Inner {
    wal: WalState,
    received: Lsn,
    archived: Lsn,
    durable: Lsn,
    undurable_since: Option<SystemTime>,
    reported_flush: Lsn,
    lag_clock: super::lag::LagClock,
}

/// A site's positions as numbers, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Positions {
    pub received: Lsn,
    pub archived: Lsn,
    pub reported_flush: Lsn,
}

/// A site's live state, shared by its tasks.
#[derive(Debug, Default)]
pub struct SiteStatus {
    inner: Mutex<Inner>,
}

pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl SiteStatus {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    fn lag(i: &mut Inner) {
        i.wal.archive_lag_bytes = if i.archived.is_valid() {
            i.received.bytes_since(i.archived)
        } else {
            0
        };
    }

    pub fn snapshot(&self) -> WalState {
        self.with(|i| {
            let mut w = i.wal.clone();
            // Partial objects hold WAL as durably as segments: the lag is up to the durable end.
            w.archive_lag_seconds = i
                .lag_clock
                .lag_seconds(i.durable.max(i.archived), now_secs());
            w.undurable_age_seconds = i
                .undurable_since
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .map_or(0.0, |d| (d.as_secs_f64() * 10.0).round() / 10.0);
            w
        })
    }

    /// The archive's durable end including partial objects moved to `durable`.
    pub fn set_durable(&self, durable: Lsn) {
        self.with(|i| {
            if durable > i.durable {
                i.durable = durable;
                i.wal.durable_lsn = Some(durable.to_string());
                i.lag_clock.archived(durable);
            }
        });
    }

    /// A partial WAL object of `bytes` plain bytes was stored.
    pub fn partial_uploaded(&self, bytes: u64) {
        self.with(|i| {
            i.wal.partial_objects_uploaded += 1;
            i.wal.partial_bytes_uploaded += bytes;
        });
    }

    /// When the oldest byte not yet durable in the archive arrived (the receiver's account).
    pub fn set_undurable_since(&self, since: Option<SystemTime>) {
        self.with(|i| i.undurable_since = since);
    }

    pub fn positions(&self) -> Positions {
        self.with(|i| Positions {
            received: i.received,
            archived: i.archived,
            reported_flush: i.reported_flush,
        })
    }

    pub fn set_connected(&self, connected: bool, server_timeline: Option<TimelineId>) {
        self.with(|i| {
            i.wal.connected = connected;
            if let Some(t) = server_timeline {
                i.wal.server_timeline = Some(t.get());
            }
        });
    }

    pub fn set_positions(&self, received: Lsn, reported_flush: Lsn, timeline: Option<TimelineId>) {
        self.with(|i| {
            if received != i.received {
                i.wal.last_activity_time = Some(now_secs());
            }
            i.received = received;
            i.lag_clock.received(received, now_secs());
            i.reported_flush = reported_flush;
            i.wal.received_lsn = Some(received.to_string());
            i.wal.reported_flush_lsn = Some(reported_flush.to_string());
            if let Some(t) = timeline {
                i.wal.timeline = Some(t.get());
            }
            Self::lag(i);
        });
    }

    pub fn set_archived(&self, archived: Lsn) {
        self.with(|i| {
            i.archived = archived;
            i.lag_clock.archived(archived);
            i.wal.archived_lsn = Some(archived.to_string());
            if archived > i.durable {
                i.durable = archived;
                i.wal.durable_lsn = Some(archived.to_string());
            }
            Self::lag(i);
        });
    }

    pub fn archived_file(&self, name: &WalSegmentName) {
        self.with(|i| {
            i.wal.last_archived = Some(name.to_string());
            i.wal.last_archived_time = Some(now_secs());
            i.wal.files_archived += 1;
        });
    }

    pub fn set_queue_len(&self, n: usize) {
        self.with(|i| i.wal.upload_queue = n);
    }

    pub fn set_error(&self, e: String) {
        self.with(|i| {
            i.wal.last_error = Some(e);
            i.wal.last_error_time = Some(now_secs());
        });
    }

    pub fn set_wal_gap(&self, gap: WalGapState) {
        self.with(|i| i.wal.wal_gap = Some(gap));
    }

    /// The gap recorded is resolved by `backup`.
    pub fn resolve_wal_gap(&self, backup: &str) {
        self.with(|i| {
            if let Some(g) = i.wal.wal_gap.as_mut() {
                g.resolved_by_basebackup = Some(backup.to_string());
            }
        });
    }

    /// Clears `last_error` if it is still `e`: the failure it reported is over (another
    /// failure recorded since stays).
    pub fn clear_error_if(&self, e: &str) {
        self.with(|i| {
            if i.wal.last_error.as_deref() == Some(e) {
                i.wal.last_error = None;
                i.wal.last_error_time = None;
            }
        });
    }

    pub fn set_foreign_archive(&self, detail: String) {
        self.with(|i| i.wal.foreign_archive = Some(detail));
    }

    pub fn set_paused(&self, paused: bool) {
        self.with(|i| i.wal.paused_for_disk_space = paused);
    }
}

/// What the state file shows of a site's basebackups.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BasebackupState {
    pub in_progress: Option<String>,
    pub progress_bytes: u64,
    /// BASE_BACKUP's estimate or the data directory's size; 0 when unknown.
    pub progress_total_bytes: u64,
    pub last_name: Option<String>,
    pub last_end_time: Option<f64>,
    pub last_error: Option<String>,
    pub last_error_time: Option<f64>,
    pub backups_listed: usize,
}

/// The state file's content.
#[derive(Debug, Serialize)]
pub struct DaemonState {
    pub startup_time: f64,
    pub pid: u32,
    pub backup_sites: BTreeMap<String, SiteState>,
}

#[derive(Debug, Serialize)]
pub struct SiteState {
    pub walreceiver: WalState,
    pub basebackup: BasebackupState,
}

/// Creates or removes pghoard-style alert files.
#[derive(Debug, Clone)]
pub struct Alerts {
    pub dir: PathBuf,
}

impl Alerts {
    pub fn raise(&self, name: &str, detail: &str) {
        let path = self.dir.join(name);
        if path.exists() {
            return;
        }
        let body = serde_json::json!({ "time": now_secs(), "detail": detail });
        match crate::durable::write_atomic(&path, body.to_string().as_bytes()) {
            Ok(()) => tracing::warn!(alert = %path.display(), "alert file created"),
            Err(e) => {
                tracing::error!(alert = %path.display(), error = %e, "cannot write alert file")
            }
        }
    }

    pub fn clear(&self, name: &str) {
        let path = self.dir.join(name);
        if path.exists() && std::fs::remove_file(&path).is_ok() {
            tracing::info!(alert = %path.display(), "alert file removed: the condition is gone");
        }
    }
}
