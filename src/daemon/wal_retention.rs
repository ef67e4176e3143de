//! Which WAL retention may delete: segments (and `.partial`s) of any timeline before the start
//! segment of every basebackup that stays, and of those only the ones walhoard wrote, marked
//! with [`meta::WALHOARD_WRITER`] (pghoard's WAL, an older walhoard's unmarked WAL and anything
//! else under `xlog/` is left alone and reported). Timeline history files are never deleted.
//!
//! Used by retention ([`super::basebackups::apply_retention`]) and `walhoard archive-cleanup`
//! ([`crate::archive_cleanup`]) to act, and by `walhoard check` to report what retention leaves.

use anyhow::{Context, Result};
use walhoard_protocol::{SegmentId, WalSegmentName};

use crate::basebackup::inventory::{Inventory, Writer};
use crate::storage::meta;
use crate::storage::ObjectStore;

/// The suffix archive-sync gives an archived WAL object it moved aside because the server's
/// file of that name holds other bytes: `xlog/<segment>.diverged-<UTC time>`.
pub const DIVERGED_SUFFIX: &str = ".diverged-";

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
        let Some(id) = segment_of_key(&o.key) else {
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
