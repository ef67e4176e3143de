//! One backup site's WAL streaming: the receiver (slot → spool), the archiver (spool →
//! archive), the resume point on start, the disk guard and the alert files.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use walhoard_protocol::{Lsn, SegmentId, SegmentSize, TimelineId};
use walhoard_walreceiver::{
    DisconnectReason, PartialUploads, ReceiverConfig, ReceiverEvent, ReceiverPositions, ResumeHook,
    SegmentBuffers, SpoolSync, StartPosition,
};

use super::archiver::{Archiver, KeyState, UploadContext};
use super::basebackups::BackupRequest;
use super::identity::ArchiveGuard;
use super::own_thread;
use super::partial::{Cadence, PartialArchiver};
use super::resume::resume_point;
use super::status::{
    now_secs, wal_gap_alert, Alerts, SiteStatus, WalGapState, AUTHENTICATION_ERROR,
    CONFIGURATION_ERROR, VERSION_UNSUPPORTED_ERROR,
};
use crate::config::SpoolFsync;
use crate::pipeline::encryption::KeyRing;
use crate::settings::SiteSettings;

/// A site ready to stream.
pub struct SiteWal {
    pub name: String,
    pub receiver: ReceiverConfig,
    pub archiver: Archiver,
    pub status: Arc<SiteStatus>,
    pub alerts: Alerts,
    pub disk_guard: Option<DiskGuard>,
    archived_rx: watch::Receiver<Lsn>,
    /// Where to ask for a basebackup when a WAL gap is found (`basebackup_on_wal_gap`).
    pub gap_backups: Option<mpsc::Sender<BackupRequest>>,
    /// Whose archive this is; see [`ArchiveGuard`].
    guard: ArchiveGuard,
    /// Uploads of the segment being received (`partial_wal_upload_interval` or
    /// `synchronous_archive`; none when the interval is 0 and the site is not synchronous).
    partial: Option<PartialArchiver>,
}

/// How long to wait before asking again for the basebackup a WAL gap needs, after one failed.
const GAP_BACKUP_RETRY: Duration = Duration::from_secs(60);

/// Pause receiving below `min_free` bytes free in `dir`, resume at `resume_free`.
#[derive(Debug, Clone)]
pub struct DiskGuard {
    pub dir: PathBuf,
    pub min_free: u64,
    pub resume_free: u64,
    pub interval: Duration,
}

/// Free bytes for an unprivileged user in the file system holding `dir` (df's "Available":
/// blocks available to non-root times the fragment size).
pub fn free_bytes(dir: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(dir)
        .with_context(|| format!("cannot read free space of {}", dir.display()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

impl SiteWal {
    pub fn new(
        settings: &SiteSettings,
        ctx: Arc<UploadContext>,
        alerts: Alerts,
        segment_buffers: SegmentBuffers,
    ) -> Result<Self> {
        let (name, site) = (settings.name.as_str(), &settings.config);
        let node = settings
            .nodes
            .first()
            .with_context(|| format!("backup_sites.{name}.nodes: no node to stream from"))?;
        let (mut conn, slot) = (node.params.clone(), node.slot.clone());
        // What pg_stat_replication shows and synchronous_standby_names lists.
        conn.application_name = settings.application_name();
        let spool_dir = settings.spool_dir()?;
        walhoard_walreceiver::spool::create_private_dir(&spool_dir)
            .with_context(|| format!("create spool directory {}", spool_dir.display()))?;
        let status = Arc::new(SiteStatus::default());
        let keys = settings.keys().unwrap_or_else(|e| {
            tracing::warn!(site = %name, error = format!("{e:#}"), "private keys unusable: the archive's encrypted WAL cannot be read to tell whose it is");
            KeyRing::default()
        });
        let guard = ArchiveGuard::new(name, keys, status.clone(), alerts.clone());
        let (archived_tx, archived_rx) = watch::channel(Lsn::INVALID);
        let mut archiver = Archiver::new(ctx, status.clone(), spool_dir.clone(), archived_tx);
        archiver.set_alerts(alerts.clone());
        let slot = slot.unwrap_or_else(|| format!("walhoard_{}", name.replace('-', "_")));
        let mut receiver = ReceiverConfig::new(conn, &slot, spool_dir);
        receiver.status_interval = Duration::from_secs(5);
        receiver.spool_sync = match site.pg_receivexlog.spool_fsync {
            SpoolFsync::Auto => SpoolSync::Auto,
            SpoolFsync::Always => SpoolSync::Always,
        };
        receiver.buffers = segment_buffers;
        let partial = Cadence::of_site(site).map(|cadence| {
            let (uploads, partial) = PartialArchiver::for_site(
                cadence,
                archiver.context_arc(),
                status.clone(),
                alerts.clone(),
                archived_rx.clone(),
            );
            receiver.partial = uploads;
            partial
        });
        let disk_guard = site
            .pg_receivexlog
            .min_disk_free_bytes
            .map(|min| DiskGuard {
                dir: receiver.spool_dir.clone(),
                min_free: min,
                resume_free: (min as f64 * site.pg_receivexlog.resume_multiplier) as u64,
                interval: Duration::from_secs_f64(
                    site.pg_receivexlog.disk_space_check_interval.max(0.1),
                ),
            });
        Ok(SiteWal {
            name: name.to_string(),
            receiver,
            archiver,
            status,
            alerts,
            disk_guard,
            archived_rx,
            gap_backups: None,
            guard,
            partial,
        })
    }

    /// Streams until `stop` fires; uploads run on `tracker` and stop when `abort` fires.
    pub async fn run(
        mut self,
        stop: CancellationToken,
        abort: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<()> {
        let (events_tx, mut events) = mpsc::channel(1);
        let (positions_tx, mut positions) = watch::channel(ReceiverPositions::default());
        self.receiver.resume = Some(self.resume_hook(tracker.clone(), abort.clone()));
        if let Some(guard) = self.disk_guard.clone() {
            let (pause_tx, pause_rx) = watch::channel(false);
            self.receiver.pause = Some(pause_rx);
            let status = self.status.clone();
            let stop = stop.clone();
            let site = self.name.clone();
            tokio::spawn(async move {
                loop {
                    match free_bytes(&guard.dir) {
                        Ok(free) => {
                            let paused = *pause_tx.borrow();
                            if !paused && free < guard.min_free {
                                tracing::warn!(%site, free, min = guard.min_free, "backup_location is short of space: pausing WAL receiving (the slot keeps the WAL)");
                                pause_tx.send_replace(true);
                                status.set_paused(true);
                            } else if paused && free >= guard.resume_free {
                                tracing::info!(%site, free, "enough space again: resuming WAL receiving");
                                pause_tx.send_replace(false);
                                status.set_paused(false);
                            }
                        }
                        Err(e) => tracing::warn!(%site, error = %e, "disk space check failed"),
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(guard.interval) => {}
                    }
                }
            });
        }
        // A synchronous site's receiver, its batches and their writes on a thread of their
        // own (`own_thread`); any other receiver on the shared runtime.
        let batches = TaskTracker::new();
        let synchronous = matches!(self.receiver.partial, PartialUploads::OnArrival { .. });
        if let Some(partial) = self.partial.as_ref().filter(|_| synchronous) {
            let sink = partial.sink(&tracker, &batches, &abort);
            self.receiver.partial = std::mem::take(&mut self.receiver.partial).with_sink(sink);
        }
        let status = self.status.clone();
        let forward_positions = async move {
            while positions.changed().await.is_ok() {
                let p = *positions.borrow();
                status.set_positions(p.received_lsn, p.reported_flush_lsn, p.timeline);
                status.set_undurable_since(p.undurable_since);
            }
        };
        let receiving = walhoard_walreceiver::run(
            self.receiver.clone(),
            None,
            events_tx,
            self.archived_rx.clone(),
            positions_tx,
            stop.clone(),
        );
        // The positions of every status update go to the site's status next to the
        // receiver: on its own thread, a wake-up of the shared runtime per commit fewer.
        let receiving = async move {
            let forwarding = tokio::spawn(forward_positions);
            let received = receiving.await;
            let _ = forwarding.await;
            received
        };
        let receiver: Pin<Box<dyn Future<Output = Result<_, String>> + Send>> = if synchronous {
            Box::pin(own_thread::spawn(&self.name, receiving, batches))
        } else {
            let task = tokio::spawn(receiving);
            Box::pin(async move { task.await.map_err(|e| e.to_string()) })
        };
        if let Some(partial) = &self.partial {
            partial.follow_archive(&tracker, &abort);
        }
        let mut seg_size: Option<SegmentSize> = None;
        // Archiving fails only when uploads are aborted (the daemon stops): streaming ends.
        let archive = |name, path, data, end, key_state| {
            self.archiver
                .archive(name, path, data, end, &tracker, &abort, key_state)
        };
        while let Some(ev) = events.recv().await {
            match ev {
                ReceiverEvent::Connected {
                    system_id,
                    seg_size: s,
                    server_tli,
                    start,
                    start_tli,
                    session,
                } => {
                    // A reconnect may reach another cluster (a node replaced behind the same
                    // address): nothing it sends is archived. Segments come after this event.
                    if self.guard.check(&self.archiver, system_id).await.is_err() {
                        break;
                    }
                    seg_size = Some(s);
                    if let Some(p) = &self.partial {
                        p.connected(s, session);
                    }
                    self.status.set_connected(true, Some(server_tli));
                    for a in [
                        AUTHENTICATION_ERROR,
                        CONFIGURATION_ERROR,
                        VERSION_UNSUPPORTED_ERROR,
                    ] {
                        self.alerts.clear(a);
                    }
                    tracing::info!(site = %self.name, %start, timeline = %start_tli, "streaming WAL");
                }
                ReceiverEvent::Segment {
                    name,
                    path,
                    start,
                    data,
                } => {
                    let end = seg_size.map(|s| start + s.bytes());
                    if archive(name, path, data, end, KeyState::New).await.is_err() {
                        break;
                    }
                }
                ReceiverEvent::Received {
                    id,
                    start,
                    offset,
                    data,
                    in_flight,
                } => {
                    if let (Some(partial), Some(seg)) = (&self.partial, seg_size) {
                        partial
                            .spawn_batch(&tracker, &abort, id, start, seg, offset, data, in_flight);
                    }
                }
                // A partial or history file may be stored already (a restart after its upload).
                ReceiverEvent::TimelinePartial { name, path, .. }
                | ReceiverEvent::History { name, path } => {
                    if archive(name, path, None, None, KeyState::MayExist)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                ReceiverEvent::WalGap {
                    from,
                    to,
                    tli,
                    error,
                } => {
                    let seg = seg_size.unwrap_or(SegmentSize::DEFAULT);
                    self.wal_gap(from, to, tli, seg, &error, &stop);
                }
                ReceiverEvent::Disconnected { error, reason } => {
                    self.status.set_connected(false, None);
                    self.status.set_error(error.clone());
                    // pghoard: a refused password is an authentication error, a server that
                    // does not let us in at all (pg_hba.conf) a configuration error.
                    let alert = match reason {
                        DisconnectReason::NotPermitted => Some(CONFIGURATION_ERROR),
                        DisconnectReason::AuthenticationFailed => Some(AUTHENTICATION_ERROR),
                        DisconnectReason::UnsupportedVersion => Some(VERSION_UNSUPPORTED_ERROR),
                        DisconnectReason::Failed { .. } => None,
                    };
                    if let Some(alert) = alert {
                        self.alerts.raise(alert, &error);
                    }
                }
            }
        }
        // A receiver blocked handing on a segment (uploads stuck) sees the closed channel
        // and stops; its segment stays in the spool for the next start. Batches waiting for
        // a session's check are dropped.
        if let Some(p) = &self.partial {
            p.close();
        }
        drop(events);
        match receiver.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(walhoard_walreceiver::ReceiverError::EventsClosed)) if stop.is_cancelled() => {
                Ok(())
            }
            Ok(Err(e)) => Err(e).with_context(|| format!("site {}: WAL receiver", self.name)),
            Err(e) => Err(anyhow::anyhow!(
                "site {}: receiver task failed: {e}",
                self.name
            )),
        }
    }

    /// WAL from `from` to `to` is lost (the archive never got it, the primary removed it):
    /// said loudly (ERROR log, alert file, state file and `/status`, `walhoard check`), and a
    /// basebackup is requested at once when the site allows it, so that point-in-time
    /// recovery is possible again from there; it resolves the gap once stored.
    fn wal_gap(
        &self,
        from: Lsn,
        to: Lsn,
        tli: TimelineId,
        seg: SegmentSize,
        error: &str,
        stop: &CancellationToken,
    ) {
        let first = SegmentId::containing(tli, from, seg).to_string();
        let last = SegmentId::containing(tli, Lsn(to.0.saturating_sub(1)), seg).to_string();
        tracing::error!(site = %self.name, from = %from, to = %to, first_missing_segment = %first, last_missing_segment = %last, %error,
            "WAL gap: these segments are neither in the archive nor on the primary any more; no restore can cross them (point-in-time recovery before {to} needs a basebackup taken after it)");
        self.status.set_wal_gap(WalGapState {
            from_lsn: from.to_string(),
            to_lsn: to.to_string(),
            timeline: tli.get(),
            first_missing_segment: first.clone(),
            last_missing_segment: last.clone(),
            detected_time: now_secs(),
            error: error.to_string(),
            resolved_by_basebackup: None,
        });
        let alert = wal_gap_alert(&self.name);
        let detail = format!(
            "site {}: WAL from {from} to {to} (segments {first} to {last}) is neither archived nor on the primary: {error}",
            self.name
        );
        // A new gap replaces an older one's alert.
        self.alerts.clear(&alert);
        self.alerts.raise(&alert, &detail);
        let Some(requests) = self.gap_backups.clone() else {
            tracing::warn!(site = %self.name, "basebackup_on_wal_gap is off: take a basebackup to make point-in-time recovery possible again");
            return;
        };
        let (site, status, alerts, stop) = (
            self.name.clone(),
            self.status.clone(),
            self.alerts.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let answer = tokio::select! {
                    _ = stop.cancelled() => return,
                    sent = requests.send(tx) => match sent {
                        Ok(()) => rx.await.unwrap_or_else(|_| Err("the backup task stopped".into())),
                        Err(_) => return,
                    },
                };
                match answer {
                    Ok(name) => {
                        tracing::info!(%site, backup = %name, "basebackup after the WAL gap stored: point-in-time recovery is possible again from its start");
                        status.resolve_wal_gap(&name);
                        alerts.clear(&alert);
                        return;
                    }
                    Err(e) => {
                        tracing::error!(%site, error = %e, retry_in = ?GAP_BACKUP_RETRY, "the basebackup a WAL gap needs failed");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(GAP_BACKUP_RETRY) => {}
                        }
                    }
                }
            }
        });
    }

    /// On the first connection: hand the spool's complete files to the archiver, then skip
    /// the segments from the slot's position on that the spool or the archive already holds;
    /// or, when the archive ends before the slot's position, start at the archive's end.
    ///
    /// Before any of that, the archive must be the primary's cluster's ([`ArchiveGuard`]):
    /// otherwise nothing is archived, skipped or streamed.
    ///
    /// The scan runs (and spawns its uploads) on the runtime this is called on, also for a
    /// receiver on a thread of its own (`own_thread`).
    fn resume_hook(&self, tracker: TaskTracker, abort: CancellationToken) -> ResumeHook {
        let archiver = self.archiver.clone();
        let guard = self.guard.clone();
        let runtime = tokio::runtime::Handle::current();
        Arc::new(
            move |from: StartPosition, seg: SegmentSize, system_id: u64| {
                let archiver = archiver.clone();
                let tracker = tracker.clone();
                let abort = abort.clone();
                let guard = guard.clone();
                let scan = runtime.spawn(async move {
                    guard.check(&archiver, system_id).await?;
                    Ok(
                        match resume_point(&archiver, from, seg, &tracker, &abort).await {
                            Ok(at) => at,
                            Err(e) => {
                                tracing::warn!(error = %e, "resume scan failed; streaming from the slot's position");
                                from.lsn
                            }
                        },
                    )
                });
                Box::pin(async move {
                    scan.await
                        .map_err(|e| format!("the resume scan failed: {e}"))?
                })
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::free_bytes;

    #[test]
    fn free_bytes_agrees_with_df_and_names_a_missing_dir() {
        let dir = tempfile::tempdir().unwrap();
        let ours = free_bytes(dir.path()).unwrap();
        // df(1) as the oracle: "Available" in bytes. The file system is live, so allow drift.
        let out = std::process::Command::new("df")
            .args(["-P", "-B1"])
            .arg(dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let df: u64 = text
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!(ours.abs_diff(df) < 256 << 20, "statvfs {ours} vs df {df}");
        let missing = dir.path().join("nope");
        let err = free_bytes(&missing).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }
}
