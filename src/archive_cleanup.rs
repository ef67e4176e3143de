//! Which WAL no kept basebackup needs, and `walhoard archive-cleanup` (pghoard_archive_cleanup's
//! job): delete the WAL objects (every timeline) before the start segment of the oldest
//! basebackup the site holds, printing each one (or, with `--dry-run`, only printing them).
//!
//! The rule is the daemon's retention rule ([`crate::daemon::basebackups::apply_retention`]
//! uses [`wal_floor`] and [`obsolete_wal`] too): every control object under `basebackup/`
//! that stays — walhoard's, pghoard's, or one neither recognises — keeps the WAL from its
//! start segment on, whatever the timeline; one whose start segment is unknown keeps all WAL;
//! without any basebackup nothing is deleted. History files (`timeline/`) are always kept.
//! pghoard's cleanup compared names as strings, timeline first, so a backup on timeline 2 let
//! it delete timeline 1's segments after the backup's start; here positions are compared.
//! A preserved backup is a kept backup: cleanup deletes no basebackup, so its WAL stays.

use anyhow::{Context, Result};
use serde::Serialize;
use walhoard_protocol::{SegmentId, WalSegmentName};

use crate::basebackup::inventory::{self, Inventory, Writer};
use crate::settings::SiteSettings;
use crate::storage::{ObjectInfo, ObjectStore};

/// The suffix archive-sync gives an archived WAL object it moved aside because this server's
/// file of that name holds other bytes: `xlog/<segment>.diverged-<UTC time>`.
pub const DIVERGED_SUFFIX: &str = ".diverged-";

/// From where on the archive's WAL is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalFloor {
    /// No basebackup stays: nothing is deleted (the WAL may be all that is left).
    NoBackups,
    /// A kept backup's start is unknown (its key, and why): all WAL is kept.
    KeepAll(String),
    /// WAL in segments before this one (any timeline) is needed by no kept backup.
    Before(SegmentId),
}

/// Where the WAL the controls of `inv` need begins, `removed` (walhoard's backups being
/// deleted) left out.
pub fn wal_floor(inv: &Inventory, removed: &[String]) -> WalFloor {
    let mut first: Option<SegmentId> = None;
    for c in &inv.controls {
        if c.writer == Writer::Walhoard && removed.contains(&c.name) {
            continue;
        }
        let Some(seg) = c.start_segment else {
            return WalFloor::KeepAll(format!(
                "{}: start-wal-segment {:?} unknown",
                c.key, c.start_wal_segment
            ));
        };
        if first.is_none_or(|f| (seg.log, seg.seg) < (f.log, f.seg)) {
            first = Some(seg);
        }
    }
    first.map_or(WalFloor::NoBackups, WalFloor::Before)
}

/// The segment a key under `xlog/` belongs to: a segment, `.partial`, `.backup`, or a copy
/// archive-sync moved aside ([`DIVERGED_SUFFIX`]); `None` for anything else (left alone).
pub fn segment_of_key(key: &str) -> Option<SegmentId> {
    let file = key.strip_prefix("xlog/")?;
    let name = match file.split_once(DIVERGED_SUFFIX) {
        Some((name, _)) => name,
        None => file,
    };
    name.parse::<WalSegmentName>().ok()?.segment()
}

/// The WAL objects in segments before `first`, whatever their timeline, in key order.
pub async fn obsolete_wal(store: &ObjectStore, first: SegmentId) -> Result<Vec<ObjectInfo>> {
    Ok(store
        .list("xlog")
        .await
        .context("list xlog/")?
        .into_iter()
        .filter(|o| {
            segment_of_key(&o.key).is_some_and(|id| (id.log, id.seg) < (first.log, first.seg))
        })
        .collect())
}

/// What archive-cleanup did (or would do).
#[derive(Debug, Clone, Serialize)]
pub struct CleanupReport {
    pub site: String,
    pub dry_run: bool,
    /// The oldest kept basebackup's start segment (deleted: everything before it).
    pub first_required: Option<String>,
    /// Why nothing was deleted, when nothing could be.
    pub kept_all: Option<String>,
    /// Objects deleted (or to delete), with their stored sizes.
    pub deleted: Vec<CleanedObject>,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CleanedObject {
    pub key: String,
    pub size: u64,
}

/// Runs archive-cleanup on `site`: prints each object as it is deleted (to stderr, so `--json`
/// output stays one document) and returns the report.
pub async fn run(site: &SiteSettings, dry_run: bool) -> Result<CleanupReport> {
    let store = site.open_store()?;
    let inv = inventory::scan(&store, crate::daemon::status::now_secs()).await?;
    let mut report = CleanupReport {
        site: site.name.clone(),
        dry_run,
        first_required: None,
        kept_all: None,
        deleted: Vec::new(),
        bytes: 0,
    };
    let first = match wal_floor(&inv, &[]) {
        WalFloor::Before(first) => first,
        WalFloor::NoBackups => {
            report.kept_all = Some("the site has no basebackup: all WAL is kept".into());
            return Ok(report);
        }
        WalFloor::KeepAll(why) => {
            report.kept_all = Some(format!("all WAL is kept: {why}"));
            return Ok(report);
        }
    };
    report.first_required = Some(first.to_string());
    for o in obsolete_wal(&store, first).await? {
        if dry_run {
            eprintln!("would delete {} ({} bytes)", o.key, o.size);
        } else {
            store
                .delete(&o.key)
                .await
                .with_context(|| format!("delete {}", o.key))?;
            eprintln!("deleted {} ({} bytes)", o.key, o.size);
        }
        report.bytes += o.size;
        report.deleted.push(CleanedObject {
            key: o.key,
            size: o.size,
        });
    }
    Ok(report)
}

/// The text summary of a report.
pub fn render(r: &CleanupReport) -> String {
    if let Some(why) = &r.kept_all {
        return format!("site {}: nothing deleted; {why}\n", r.site);
    }
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    format!(
        "site {}: first required WAL segment {}; {verb} {} WAL object(s), {} bytes\n",
        r.site,
        r.first_required.as_deref().unwrap_or("-"),
        r.deleted.len(),
        r.bytes
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_their_segment() {
        let seg = |k: &str| segment_of_key(k).map(|s| s.to_string());
        let s = Some("000000020000000100000003".to_string());
        assert_eq!(seg("xlog/000000020000000100000003"), s);
        assert_eq!(seg("xlog/000000020000000100000003.partial"), s);
        assert_eq!(
            seg("xlog/000000020000000100000003.diverged-20261204T231500Z"),
            s
        );
        assert_eq!(seg("xlog/000000020000000100000003.00000028.backup"), s);
        assert_eq!(seg("xlog/notes.txt"), None);
        assert_eq!(seg("timeline/00000002.history"), None);
    }
}
