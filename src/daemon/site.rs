//! One backup site's WAL streaming: the receiver (slot → spool), the archiver (spool →
//! archive), the resume point on start, the disk guard and the alert files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use walhoard_protocol::{Lsn, SegmentId, SegmentSize, TimelineId, WalSegmentName};
use walhoard_walreceiver::{
    DisconnectReason, ReceiverConfig, ReceiverEvent, ReceiverPositions, ResumeHook, SegmentBuffers,
    SpoolSync, StartPosition,
};

use super::archiver::{wal_key, Archiver, KeyState, UploadContext};
use super::basebackups::BackupRequest;
use super::identity::ArchiveGuard;
use super::partial::PartialArchiver;
use super::status::{
    now_secs, wal_gap_alert, Alerts, SiteStatus, WalGapState, AUTHENTICATION_ERROR,
    CONFIGURATION_ERROR, VERSION_UNSUPPORTED_ERROR,
};
use crate::config::SpoolFsync;
use crate::pipeline::encryption::KeyRing;
use crate::settings::SiteSettings;

/// How far past the slot's position the resume check looks for already-archived segments.
const RESUME_SCAN_LIMIT: u64 = 100_000;

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
    /// Uploads of the segment being received (`partial_wal_upload_interval`; none when 0).
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
        let (conn, slot) = (node.params.clone(), node.slot.clone());
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
        let partial = site.partial_wal_upload_interval.get().map(|interval| {
            let (uploads, partial) = PartialArchiver::for_site(
                interval,
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
        let receiver = tokio::spawn(walhoard_walreceiver::run(
            self.receiver.clone(),
            None,
            events_tx,
            self.archived_rx.clone(),
            positions_tx,
            stop.clone(),
        ));
        let status = self.status.clone();
        tokio::spawn(async move {
            while positions.changed().await.is_ok() {
                let p = *positions.borrow();
                status.set_positions(p.received_lsn, p.reported_flush_lsn, p.timeline);
                status.set_undurable_since(p.undurable_since);
            }
        });
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
                } => {
                    // A reconnect may reach another cluster (a node replaced behind the same
                    // address): nothing it sends is archived. Segments come after this event.
                    if self.guard.check(&self.archiver, system_id).await.is_err() {
                        break;
                    }
                    seg_size = Some(s);
                    if let Some(p) = &self.partial {
                        p.connected(s);
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
        // and stops; its segment stays in the spool for the next start.
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
    fn resume_hook(&self, tracker: TaskTracker, abort: CancellationToken) -> ResumeHook {
        let archiver = self.archiver.clone();
        let guard = self.guard.clone();
        Arc::new(
            move |from: StartPosition, seg: SegmentSize, system_id: u64| {
                let archiver = archiver.clone();
                let tracker = tracker.clone();
                let abort = abort.clone();
                let guard = guard.clone();
                Box::pin(async move {
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
                })
            },
        )
    }
}

/// The machine restarted since the spool's segments were written: drop those that are held
/// elsewhere, so that none is archived from a file that may have lost writes. From the slot's
/// position on the slot holds them (the flush position reported never passes the archive) and
/// they are received again; below it, those the archive holds are dropped. What is left (below
/// the slot and not archived: someone else moved the slot) is the only copy and is archived.
async fn distrust_spool(
    archiver: &Archiver,
    spool: &mut BTreeSet<String>,
    slot_at: Lsn,
    seg: SegmentSize,
) {
    let dir = archiver.spool_dir();
    let segments: Vec<(String, SegmentId)> = spool
        .iter()
        .filter_map(|n| match n.parse::<WalSegmentName>() {
            Ok(WalSegmentName::Segment(id)) => Some((n.clone(), id)),
            _ => None,
        })
        .collect();
    for (file, id) in segments {
        let held = if id.start_lsn(seg).is_ok_and(|s| s >= slot_at) {
            true
        } else {
            let key = wal_key(&WalSegmentName::Segment(id));
            matches!(archiver.context().store.stat(&key).await, Ok(Some(_)))
        };
        if held {
            tracing::warn!(segment = %file, "the machine restarted since this spool segment was written: receiving it again instead of trusting the file");
            spool.remove(&file);
            let _ = std::fs::remove_file(dir.join(&file));
        } else {
            tracing::warn!(segment = %file, "the machine restarted since this spool segment was written, and it is held nowhere else: archiving it as it is");
        }
    }
}

/// Complete WAL files (segments and history files) left in the spool by an earlier run.
fn spool_files(dir: &Path) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("read spool {}", dir.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if matches!(
            name.parse::<WalSegmentName>(),
            Ok(WalSegmentName::Segment(_) | WalSegmentName::History(_))
        ) {
            out.insert(name);
        }
    }
    Ok(out)
}

/// The spool file naming the boot (`/proc/sys/kernel/random/boot_id`) its files were written in.
pub const SPOOL_BOOT_FILE: &str = "walhoard-boot-id";

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Whether the spool's files were written in this boot of the machine, and records this boot
/// for the next start. Segments are not fdatasync'd when the spool is only a cache in front of
/// the slot (`spool_fsync: auto`): a killed daemon's files are intact in the page cache, but
/// after a crash of the machine they may hold zeros or stale blocks where writes were lost.
/// A spool without the file (new, or written by a version that always synced) is trusted.
fn spool_from_this_boot(dir: &Path) -> Result<bool> {
    let now = boot_id();
    let before = match std::fs::read_to_string(dir.join(SPOOL_BOOT_FILE)) {
        Ok(s) => Some(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).context(format!("read {}", dir.join(SPOOL_BOOT_FILE).display())),
    };
    if let Some(id) = &now {
        walhoard_walreceiver::spool::write_durable(dir, SPOOL_BOOT_FILE, id.as_bytes())
            .with_context(|| format!("write {}", dir.join(SPOOL_BOOT_FILE).display()))?;
    }
    Ok(match (before, now) {
        (None, _) => true,
        (Some(b), Some(n)) => b == n,
        (Some(_), None) => false,
    })
}

/// The end of the archive's newest segment on `tli`, when that is before `slot_at`: the WAL in
/// between was never archived (the slot was dropped and created again at a later position, or
/// moved by someone else), and streaming must start there for as long as the primary has it.
/// `None` when the segment before `slot_at` is archived (the usual case, one stat) or the
/// archive holds no segment of `tli` (a new site).
async fn archive_end_below(
    archiver: &Archiver,
    tli: TimelineId,
    slot_at: Lsn,
    seg: SegmentSize,
) -> Option<Lsn> {
    let store = &archiver.context().store;
    let slot_segno = slot_at.segment_number(seg);
    if slot_segno == 0 {
        return None;
    }
    let before = WalSegmentName::Segment(SegmentId::from_segno(tli, slot_segno - 1, seg));
    match store.stat(&wal_key(&before)).await {
        Ok(Some(_)) => return None,
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell where the archive ends; streaming from the slot's position");
            return None;
        }
    }
    let listed = match store.list("xlog").await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the archive's WAL; streaming from the slot's position");
            return None;
        }
    };
    let newest = listed
        .iter()
        .filter_map(|o| match o.key.trim_start_matches("xlog/").parse() {
            Ok(WalSegmentName::Segment(id)) if id.tli == tli => id.segno(seg).ok(),
            _ => None,
        })
        .filter(|n| *n < slot_segno)
        .max()?;
    Some(Lsn((newest + 1) * seg.bytes()))
}

async fn resume_point(
    archiver: &Archiver,
    from: StartPosition,
    seg: SegmentSize,
    tracker: &TaskTracker,
    abort: &CancellationToken,
) -> Result<Lsn> {
    let dir = archiver.spool_dir().to_path_buf();
    let mut spool = spool_files(&dir)?;
    let tli = from
        .tli
        .context("the receiver gave no timeline for its start")?;
    let mut lsn = from.lsn.segment_start(seg);
    if !spool_from_this_boot(&dir)? {
        distrust_spool(archiver, &mut spool, lsn, seg).await;
    }
    if let Some(end) = archive_end_below(archiver, tli, lsn, seg).await {
        tracing::warn!(slot_at = %lsn, archive_end = %end, "the archive ends before the slot's position (the slot was dropped and created again, or moved): streaming from the archive's end");
        lsn = end;
    }
    // Everything before the start is as archived as it will ever be (or lost, which the
    // receiver finds out and reports).
    archiver.start_at(lsn);
    // History files are small and order-free: archive any left behind.
    let histories: Vec<String> = spool
        .iter()
        .filter(|n| n.ends_with(".history"))
        .cloned()
        .collect();
    // A file left in the spool may be archived already (the crash came after its upload). A
    // failed (aborted) upload ends the resume here.
    let dir = &dir;
    let archive_left = move |name, file: &str, end| {
        let path = dir.join(file);
        archiver.archive(name, path, None, end, tracker, abort, KeyState::MayExist)
    };
    for h in histories {
        spool.remove(&h);
        let name: WalSegmentName = h.parse().map_err(|e| anyhow::anyhow!("{h}: {e}"))?;
        if archive_left(name, &h, None).await.is_err() {
            return Ok(lsn);
        }
    }
    // Segments below the slot's position are nowhere else any more (the slot was moved on
    // by someone else): archive them rather than lose them.
    let below: Vec<(String, WalSegmentName)> = spool
        .iter()
        .filter_map(|n| match n.parse::<WalSegmentName>() {
            Ok(w @ WalSegmentName::Segment(id)) if id.start_lsn(seg).is_ok_and(|s| s < lsn) => {
                Some((n.clone(), w))
            }
            _ => None,
        })
        .collect();
    for (file, name) in below {
        spool.remove(&file);
        if archive_left(name, &file, None).await.is_err() {
            return Ok(lsn);
        }
    }
    let mut id = SegmentId::containing(tli, lsn, seg);
    for _ in 0..RESUME_SCAN_LIMIT {
        let name = WalSegmentName::Segment(id);
        let end = Lsn(lsn.0 + seg.bytes());
        let file = name.to_string();
        if spool.remove(&file) {
            tracing::info!(segment = %file, "archiving a segment left in the spool");
            if archive_left(name, &file, Some(end)).await.is_err() {
                return Ok(lsn);
            }
        } else {
            let key = wal_key(&name);
            match archiver.context().store.stat(&key).await {
                Ok(Some(_)) => archiver.already_archived(end),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(object = %key, error = %e, "cannot tell whether the archive holds this segment; streaming it again");
                    break;
                }
            }
        }
        lsn = end;
        id = id.next(seg).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    // Spool segments past a gap will be received again (the slot still holds them).
    for stale in spool {
        tracing::warn!(segment = %stale, resume = %lsn, "spool segment beyond the resume point; it will be received again");
        let _ = std::fs::remove_file(dir.join(&stale));
    }
    Ok(lsn)
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
