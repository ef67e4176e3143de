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
    let old: Vec<String> = store
        .list("xlog")
        .await
        .context("list xlog/")?
        .into_iter()
        .filter(|o| {
            // Compare segment positions (log, seg), whatever the timeline.
            segment_of_key(&o.key).is_some_and(|id| (id.log, id.seg) < (before.log, before.seg))
        })
        .map(|o| o.key)
        .collect();
    let (mut ours, mut foreign) = (Vec::new(), Vec::new());
    for (key, written_by_us) in writers(store, old).await {
        match written_by_us {
            Ok(true) => ours.push(key),
            Ok(false) => foreign.push(key),
            Err(e) => {
                tracing::warn!(object = %key, error = %e, "WAL object's metadata unreadable; left alone");
                foreign.push(key);
            }
        }
    }
    Ok(WalPlan::Before {
        before,
        ours,
        foreign,
    })
}

/// Metadata reads in flight at once: an archive pghoard filled before the switch can hold
/// tens of thousands of segments older than every kept backup, each read on every pass.
const PARALLEL_METADATA: usize = 16;

/// Whether each object in `keys` carries walhoard's writer mark, in `keys`' order,
/// [`PARALLEL_METADATA`] reads at a time.
async fn writers(
    store: &ObjectStore,
    keys: Vec<String>,
) -> Vec<(String, Result<bool, crate::storage::StorageError>)> {
    let mut out: Vec<Option<Result<bool, _>>> = (0..keys.len()).map(|_| None).collect();
    let mut set = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < keys.len() || !set.is_empty() {
        while next < keys.len() && set.len() < PARALLEL_METADATA {
            let (store, key, i) = (store.clone(), keys[next].clone(), next);
            set.spawn(async move {
                let m = store.metadata(&key).await;
                (i, m.map(|m| m.contains_key(meta::WALHOARD_WRITER)))
            });
            next += 1;
        }
        if let Some(done) = set.join_next().await {
            let (i, r) = done.expect("a metadata read panicked");
            out[i] = Some(r);
        }
    }
    keys.into_iter()
        .zip(out)
        .map(|(k, r)| (k, r.expect("every read was joined")))
        .collect()
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
