//! Metrics read from the running sites when they are collected, so that the receive path
//! records nothing for them: positions, lags, the upload queue, the spool and basebackup
//! progress.

use crate::config::BackupMode;
use crate::daemon::Sites;

use super::*;

/// The spool directory's files and bytes; zeros when it cannot be read (not created yet).
fn spool_usage(dir: &std::path::Path) -> (u64, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .fold((0, 0), |(n, bytes), m| (n + 1, bytes + m.len()))
}

/// The live samples of every site.
pub fn samples(sites: &Sites) -> Vec<Sample> {
    let mut v = Vec::new();
    for (name, s) in &sites.by_name {
        let site = vec![("site", name.clone())];
        let mut push = |def: &'static Def, value: f64| {
            v.push(Sample {
                def,
                labels: site.clone(),
                value,
            })
        };
        let wal = s.status.snapshot();
        let at = s.status.positions();
        push(ARCHIVE_LAG_BYTES, wal.archive_lag_bytes as f64);
        push(ARCHIVE_LAG_SECONDS, wal.archive_lag_seconds);
        push(RECEIVED_LSN, at.received.0 as f64);
        push(ARCHIVED_LSN, at.archived.0 as f64);
        push(REPORTED_FLUSH_LSN, at.reported_flush.0 as f64);
        push(CONNECTED, if wal.connected { 1.0 } else { 0.0 });
        push(UPLOAD_QUEUE, wal.upload_queue as f64);
        let receives = s.settings.config.active_backup_mode == BackupMode::Walreceiver;
        if let Some(dir) = receives.then(|| s.settings.spool_dir().ok()).flatten() {
            let (files, bytes) = spool_usage(&dir);
            push(SPOOL_BYTES, bytes as f64);
            push(SPOOL_FILES, files as f64);
        }
        let bb = s.basebackup.snapshot();
        let progress = match (&bb.in_progress, bb.progress_total_bytes) {
            (None, _) => 100.0,
            (Some(_), 0) => 0.0,
            (Some(_), total) => (100.0 * bb.progress_bytes as f64 / total as f64).min(100.0),
        };
        push(BASEBACKUP_ESTIMATED_PROGRESS, progress);
    }
    v
}
