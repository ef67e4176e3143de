//! The daemon's metrics, under pghoard's names so that existing dashboards and alerts keep
//! working, plus walhoard's own (`walhoard.*`), and the three ways out pghoard has: a
//! Prometheus endpoint (`GET /metrics`, [`prometheus`]), statsd over UDP ([`statsd`]) and a
//! Pushgateway over HTTP ([`pushgateway`]). docs/metrics.md lists every metric.
//!
//! Events (an upload stored, a backup finished) go to one process-wide [`Registry`] of atomic
//! cells; a cell is found once per event (a segment, not a replication message) and updated
//! without a lock held. Positions (lags, LSNs, the spool) are not recorded at all: they are
//! read from the sites' live status when metrics are collected ([`collect`]).

pub mod live;
pub mod prometheus;
pub mod push;
pub mod pushgateway;
pub mod statsd;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::daemon::status::now_secs;
use crate::pipeline::transfer::Uploaded;

/// What a metric's value means over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only grows (statsd `|c`, Prometheus `counter`).
    Counter,
    /// A current value (statsd `|g`, Prometheus `gauge`).
    Gauge,
    /// A gauge stored as the Unix time of an event and shown as the seconds since it.
    Age,
}

/// A metric: its pghoard-style dotted name, kind and one line of meaning.
#[derive(Debug, PartialEq, Eq)]
pub struct Def {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

macro_rules! defs {
    ($($(#[$m:meta])* $id:ident = $name:literal, $kind:ident, $help:literal;)*) => {
        $($(#[$m])* pub const $id: &Def = &Def { name: $name, kind: Kind::$kind, help: $help };)*
        /// Every metric, in the order docs/metrics.md lists them.
        pub const ALL: &[&Def] = &[$($id),*];
    };
}

defs! {
    UPLOAD_SIZE = "pghoard.upload_size", Counter,
        "Bytes stored (compressed and encrypted) by uploads, by result, type and site.";
    TOTAL_UPLOAD_SIZE = "pghoard.total_upload_size", Gauge,
        "Bytes stored by successful uploads since the daemon started, by type and site.";
    DOWNLOAD_SIZE = "pghoard.download_size", Counter,
        "Bytes of WAL served by the restore_command API, by result, type and site.";
    LAST_UPLOAD_AGE = "pghoard.last_upload_age", Age,
        "Seconds since the last successful upload of this type for the site.";
    XLOGS_SINCE_BASEBACKUP = "pghoard.xlogs_since_basebackup", Gauge,
        "WAL segments archived since the site's last basebackup completed.";
    COMPRESSED_SIZE_RATIO = "pghoard.compressed_size_ratio", Gauge,
        "Stored size / original size of the last object uploaded, by algorithm, type and site.";
    BASEBACKUP_REQUESTED = "pghoard.backup_stream.basebackup_requested", Counter,
        "Basebackups started, scheduled or requested, by site.";
    BASEBACKUP_COMPLETED = "pghoard.basebackup_completed", Counter,
        "Basebackups stored and listed.";
    BASEBACKUP_FAILED = "pghoard.basebackup_failed", Counter,
        "Basebackups that failed (nothing of them is listed).";
    BASEBACKUP_BYTES_UPLOADED = "pghoard.basebackup_bytes_uploaded", Counter,
        "Original bytes of completed basebackups (delta is always false).";
    BACKUP_TIME = "pghoard.backup_time", Gauge,
        "Seconds the last completed basebackup took, by basebackup_mode.";
    BASEBACKUP_ESTIMATED_PROGRESS = "pghoard.basebackup_estimated_progress", Gauge,
        "Percent done of the running basebackup (100 when none runs), by site.";
    TRANSFER_OPERATION_ERRORS = "pghoard.transfer_operation_errors", Counter,
        "Failed attempts at an upload or a download (each retry counts).";
    EXCEPTION = "pghoard.exception", Counter,
        "Unexpected failures, by exception (the error's kind) and where (the routine).";
    ARCHIVE_LAG_BYTES = "walhoard.archive_lag_bytes", Gauge,
        "WAL received but not yet durable in the archive, in bytes, by site.";
    ARCHIVE_LAG_SECONDS = "walhoard.archive_lag_seconds", Gauge,
        "Age of the oldest WAL byte received but not yet in the archive (the data-loss window), by site.";
    RECEIVED_LSN = "walhoard.received_lsn", Gauge,
        "Every WAL byte before this position (as a number) was received and spooled, by site.";
    ARCHIVED_LSN = "walhoard.archived_lsn", Gauge,
        "Every WAL byte before this position (as a number) is durable in the archive, by site.";
    REPORTED_FLUSH_LSN = "walhoard.reported_flush_lsn", Gauge,
        "The flush position last reported to the server (the slot follows it), as a number, by site.";
    CONNECTED = "walhoard.connected", Gauge,
        "1 while the site's replication connection is up, else 0.";
    UPLOAD_QUEUE = "walhoard.upload_queue", Gauge,
        "WAL uploads queued or running, by site.";
    SPOOL_BYTES = "walhoard.spool_bytes", Gauge,
        "Bytes of files in the site's spool directory (backup_location/<site>/xlog_incoming).";
    SPOOL_FILES = "walhoard.spool_files", Gauge,
        "Files in the site's spool directory.";
}

/// A metric's labels, sorted by name.
pub type Labels = Vec<(&'static str, String)>;

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    let mut v: Labels = pairs.iter().map(|(k, v)| (*k, v.to_string())).collect();
    v.sort();
    v
}

/// One value: the bits of an `f64`, so that gauges hold fractions and counters add.
#[derive(Debug, Default)]
pub struct Cell(AtomicU64);

impl Cell {
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    pub fn add(&self, v: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((f64::from_bits(b) + v).to_bits())
            });
    }
}

/// One sample as collected.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub def: &'static Def,
    pub labels: Labels,
    pub value: f64,
}

type Key = (&'static str, Labels);

/// Every recorded metric of the process.
#[derive(Default)]
pub struct Registry {
    cells: Mutex<BTreeMap<Key, (&'static Def, Arc<Cell>)>>,
}

impl Registry {
    /// The cell of `def` with these labels, created at zero.
    pub fn cell(&self, def: &'static Def, pairs: &[(&'static str, &str)]) -> Arc<Cell> {
        let key = (def.name, labels(pairs));
        let mut cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        cells
            .entry(key)
            .or_insert_with(|| (def, Arc::default()))
            .1
            .clone()
    }

    /// Every recorded sample, [`Kind::Age`] turned into seconds since.
    pub fn samples(&self) -> Vec<Sample> {
        let now = now_secs();
        let cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        cells
            .iter()
            .map(|((_, labels), (def, cell))| Sample {
                def,
                labels: labels.clone(),
                value: match def.kind {
                    Kind::Age => (now - cell.get()).max(0.0),
                    _ => cell.get(),
                },
            })
            .collect()
    }
}

/// The process's registry.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

/// What kind of object moved (pghoard's `FileType`, the `type` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    Xlog,
    Timeline,
    Basebackup,
    BasebackupChunk,
}

impl FileType {
    pub fn name(self) -> &'static str {
        match self {
            FileType::Xlog => "xlog",
            FileType::Timeline => "timeline",
            FileType::Basebackup => "basebackup",
            FileType::BasebackupChunk => "basebackup_chunk",
        }
    }

    /// The type of the object under `key` (`xlog/…`, `timeline/…`, `basebackup_chunk/…`).
    pub fn of_key(key: &str) -> FileType {
        match key.split('/').next() {
            Some("timeline") => FileType::Timeline,
            Some("basebackup_chunk") => FileType::BasebackupChunk,
            Some("basebackup") => FileType::Basebackup,
            _ => FileType::Xlog,
        }
    }
}

/// Whether an operation succeeded (the `result` label).
fn result_label(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "failed"
    }
}

/// An upload attempt of `site` finished, stored or failed.
pub fn upload<E>(site: &str, ty: FileType, algorithm: &str, outcome: &Result<Uploaded, E>) {
    let r = registry();
    let t = ty.name();
    match outcome {
        Ok(u) => {
            let (original, stored) = (u.plain_size, u.stored_size);
            r.cell(
                UPLOAD_SIZE,
                &[("result", "ok"), ("type", t), ("site", site)],
            )
            .add(stored as f64);
            r.cell(TOTAL_UPLOAD_SIZE, &[("type", t), ("site", site)])
                .add(stored as f64);
            r.cell(LAST_UPLOAD_AGE, &[("type", t), ("site", site)])
                .set(now_secs());
            if original > 0 {
                r.cell(
                    COMPRESSED_SIZE_RATIO,
                    &[("algorithm", algorithm), ("type", t), ("site", site)],
                )
                .set(stored as f64 / original as f64);
            }
            if ty == FileType::Xlog {
                r.cell(XLOGS_SINCE_BASEBACKUP, &[("site", site)]).add(1.0);
            }
        }
        Err(_) => {
            r.cell(TRANSFER_OPERATION_ERRORS, &[]).add(1.0);
            exception("UploadError", "handle_upload");
            r.cell(
                UPLOAD_SIZE,
                &[("result", result_label(false)), ("type", t), ("site", site)],
            )
            .add(0.0);
        }
    }
}

/// The restore_command API served `bytes` of the WAL or history `file`, or failed (not "not
/// found").
pub fn download(site: &str, file: &str, outcome: Result<u64, ()>) {
    let ty = match file.parse() {
        Ok(walhoard_protocol::WalSegmentName::History(_)) => FileType::Timeline,
        _ => FileType::Xlog,
    };
    let r = registry();
    let (ok, bytes) = match outcome {
        Ok(b) => (true, b),
        Err(()) => {
            r.cell(TRANSFER_OPERATION_ERRORS, &[]).add(1.0);
            exception("DownloadError", "handle_download");
            (false, 0)
        }
    };
    r.cell(
        DOWNLOAD_SIZE,
        &[
            ("result", result_label(ok)),
            ("type", ty.name()),
            ("site", site),
        ],
    )
    .add(bytes as f64);
}

/// A basebackup started.
pub fn basebackup_started(site: &str) {
    registry()
        .cell(BASEBACKUP_REQUESTED, &[("site", site)])
        .add(1.0);
}

/// A basebackup finished: its mode, plain bytes and seconds, or failed.
pub fn basebackup_finished(site: &str, outcome: Result<(&str, u64, f64), ()>) {
    let r = registry();
    match outcome {
        Ok((mode, bytes, seconds)) => {
            r.cell(BASEBACKUP_COMPLETED, &[]).add(1.0);
            r.cell(BASEBACKUP_BYTES_UPLOADED, &[("delta", "False")])
                .add(bytes as f64);
            r.cell(BACKUP_TIME, &[("basebackup_mode", mode)])
                .set(seconds);
            // pghoard resets the count when a basebackup is uploaded.
            r.cell(XLOGS_SINCE_BASEBACKUP, &[("site", site)]).set(0.0);
        }
        Err(()) => r.cell(BASEBACKUP_FAILED, &[]).add(1.0),
    }
}

/// An unexpected failure `where_` (a routine's name) of kind `exception`.
pub fn exception(exception: &str, where_: &str) {
    registry()
        .cell(EXCEPTION, &[("exception", exception), ("where", where_)])
        .add(1.0);
}

/// Everything to report now: the registry's samples and the sites' live values.
pub fn collect(sites: &crate::daemon::Sites) -> Vec<Sample> {
    let mut v = registry().samples();
    v.extend(live::samples(sites));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_add_and_set() {
        let r = Registry::default();
        r.cell(UPLOAD_SIZE, &[("site", "a"), ("type", "xlog")])
            .add(5.0);
        // Same labels in another order: the same cell.
        r.cell(UPLOAD_SIZE, &[("type", "xlog"), ("site", "a")])
            .add(2.0);
        r.cell(BACKUP_TIME, &[]).set(1.5);
        r.cell(LAST_UPLOAD_AGE, &[]).set(now_secs() - 30.0);
        let s = r.samples();
        assert_eq!(s.len(), 3);
        let get = |d: &Def| s.iter().find(|x| x.def == d).unwrap().value;
        assert_eq!(get(UPLOAD_SIZE), 7.0);
        assert_eq!(get(BACKUP_TIME), 1.5);
        assert!((29.0..60.0).contains(&get(LAST_UPLOAD_AGE)));
    }

    #[test]
    fn failures_count_as_transfer_errors_and_exceptions() {
        let get =
            |def: &'static Def, pairs: &[(&'static str, &str)]| registry().cell(def, pairs).get();
        let where_ = [("exception", "UploadError"), ("where", "handle_upload")];
        let (errors, exceptions) = (get(TRANSFER_OPERATION_ERRORS, &[]), get(EXCEPTION, &where_));
        upload::<()>("unit-test-site", FileType::Xlog, "zstd", &Err(()));
        // Other tests of this process may count too: at least one more each.
        assert!(get(TRANSFER_OPERATION_ERRORS, &[]) >= errors + 1.0);
        assert!(get(EXCEPTION, &where_) >= exceptions + 1.0);
        let failed = [
            ("result", "failed"),
            ("type", "xlog"),
            ("site", "unit-test-site"),
        ];
        assert!(registry()
            .samples()
            .iter()
            .any(|s| s.def == UPLOAD_SIZE && s.labels == labels(&failed)));
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = ALL.iter().map(|d| d.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
    }
}
