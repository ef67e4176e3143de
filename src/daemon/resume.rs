//! Where a site's streaming resumes after a start: the spool is trusted only from this boot,
//! the archive's end is found past the slot's position, and spool segments beyond the resume
//! point are dropped (they are received again).

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use walhoard_protocol::{Lsn, SegmentId, SegmentSize, TimelineId, WalSegmentName};
use walhoard_walreceiver::StartPosition;

use super::archiver::{wal_key, Archiver, KeyState};

/// How far past the slot's position the resume check looks for already-archived segments.
const RESUME_SCAN_LIMIT: u64 = 100_000;

/// The machine restarted since the spool's segments were written: drop those that are held
/// elsewhere, so that none is archived from a file that may have lost writes. From the slot's
/// position on the slot holds them (the flush position reported never passes the archive) and
/// they are received again; below it, those the archive holds are dropped. What is left (below
/// the slot and not archived: someone else moved the slot) is the only copy and is archived.
pub(super) async fn distrust_spool(
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
pub(super) fn spool_files(dir: &Path) -> Result<BTreeSet<String>> {
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
pub(super) const SPOOL_BOOT_FILE: &str = "walhoard-boot-id";

pub(super) fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Whether the spool's files were written in this boot of the machine, and records this boot
/// for the next start. Segments are not fdatasync'd when the spool is only a cache in front of
/// the slot (`spool_fsync: auto`): a killed daemon's files are intact in the page cache, but
/// after a crash of the machine they may hold zeros or stale blocks where writes were lost.
/// A spool without the file (new, or written by a version that always synced) is trusted.
pub(super) fn spool_from_this_boot(dir: &Path) -> Result<bool> {
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
pub(super) async fn archive_end_below(
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

pub(super) async fn resume_point(
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
