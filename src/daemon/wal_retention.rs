//! Which WAL retention may delete: segments (and `.partial`s) of any timeline before the start
//! segment of every basebackup that stays, and of those only the ones walhoard wrote, marked
//! with [`meta::WALHOARD_WRITER`] (pghoard's WAL, an older walhoard's unmarked WAL and anything
//! else under `xlog/` is left alone and reported). Timeline history files are never deleted.
//!
//! Used by retention ([`super::basebackups::apply_retention`]) to act, and by `walhoard check`
//! to report what retention leaves.

use anyhow::{Context, Result};
use walhoard_protocol::{SegmentId, WalSegmentName};

use crate::basebackup::inventory::{Inventory, Writer};
use crate::storage::meta;
use crate::storage::ObjectStore;

/// What retention does with the site's WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalPlan {
    /// Nothing of the WAL may go: no backup stays, or one that stays has no known start.
    KeepAll(KeepAllReason),
    /// WAL before `before` (segment position, whatever the timeline): `ours` is walhoard's
    /// and deleted, `foreign` lacks walhoard's mark (or its metadata could not be read) and
    /// is kept.
    Before {
        before: SegmentId,
        ours: Vec<String>,
        foreign: Vec<String>,
    },
}

/// Why no WAL may be deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeepAllReason {
    /// No basebackup stays: deleting WAL would leave nothing to restore from.
    NoBackup,
    /// This control object stays and its `start-wal-segment` is missing or not a segment name
    /// (the stored value, if any).
    UnknownStart { key: String, stored: Option<String> },
}

/// The WAL plan when the backups named in `deleted` (walhoard's, being deleted by retention)
/// are gone and every other control object in `inv` stays. Reads the metadata of the WAL
/// objects before the oldest start only.
pub async fn plan(store: &ObjectStore, inv: &Inventory, deleted: &[String]) -> Result<WalPlan> {
    let mut first: Option<SegmentId> = None;
    for c in &inv.controls {
        if c.writer == Writer::Walhoard && deleted.contains(&c.name) {
            continue;
        }
        let Some(seg) = c.start_segment else {
            return Ok(WalPlan::KeepAll(KeepAllReason::UnknownStart {
                key: c.key.clone(),
                stored: c.start_wal_segment.clone(),
            }));
        };
        if first.is_none_or(|f| (seg.log, seg.seg) < (f.log, f.seg)) {
            first = Some(seg);
        }
    }
    let Some(before) = first else {
        return Ok(WalPlan::KeepAll(KeepAllReason::NoBackup));
    };
    let mut ours = Vec::new();
    let mut foreign = Vec::new();
    for o in store.list("xlog").await.context("list xlog/")? {
        let file = o.key.trim_start_matches("xlog/");
        let Some(id) = file
            .parse::<WalSegmentName>()
            .ok()
            .and_then(|w| w.segment())
        else {
            continue;
        };
        // Compare segment positions (log, seg), whatever the timeline.
        if (id.log, id.seg) >= (before.log, before.seg) {
            continue;
        }
        match store.metadata(&o.key).await {
            Ok(m) if m.contains_key(meta::WALHOARD_WRITER) => ours.push(o.key),
            Ok(_) => foreign.push(o.key),
            Err(e) => {
                tracing::warn!(object = %o.key, error = %e, "WAL object's metadata unreadable; left alone");
                foreign.push(o.key);
            }
        }
    }
    Ok(WalPlan::Before {
        before,
        ours,
        foreign,
    })
}

/// One line about WAL retention leaves although it is older than every backup that stays:
/// how many objects, the first and last key. `None` when there is none.
pub fn foreign_summary(foreign: &[String], before: SegmentId) -> Option<String> {
    let (first, last) = (foreign.first()?, foreign.last()?);
    let range = if first == last {
        first.clone()
    } else {
        format!("{first} … {last}")
    };
    Some(format!(
        "{} WAL object(s) before {before} (the oldest kept basebackup's start) lack walhoard's \
         {} metadata (pghoard's, or an older walhoard's): kept, delete them yourself once no \
         backup needs them: {range}",
        foreign.len(),
        meta::WALHOARD_WRITER
    ))
}
