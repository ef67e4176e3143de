//! The key layout of partial WAL objects (docs/formats.md): keys, listing, the run from
//! offset 0, deletion (only keys in the layout).

use std::collections::BTreeMap;

use walhoard_protocol::{SegmentId, WalSegmentName};

use crate::daemon::archiver::wal_key;
use crate::storage::{ObjectStore, StorageError};

/// The directory (key prefix) of all partial WAL objects of a site.
pub const PARTIAL_DIR: &str = "xlog_partial";

/// The key prefix of segment `id`'s partial objects.
pub fn partial_dir(id: &SegmentId) -> String {
    format!("{PARTIAL_DIR}/{}", WalSegmentName::Segment(*id))
}

/// The key of the partial object holding bytes `from..to` of segment `id`.
pub fn partial_key(id: &SegmentId, from: u64, to: u64) -> String {
    format!("{}/{from:08X}-{to:08X}", partial_dir(id))
}

/// The bytes `from..to` of a segment that one partial object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PartRange {
    pub from: u64,
    pub to: u64,
}

impl PartRange {
    /// Parses the last part of a partial object's key (`0000A000-0000B000`); `None` for
    /// anything else, which is never read or deleted.
    pub fn parse(name: &str) -> Option<Self> {
        let (a, b) = name.split_once('-')?;
        let hex = |s: &str| {
            (s.len() == 8
                && s.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase()))
            .then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
        };
        let (from, to) = (hex(a)?, hex(b)?);
        (from < to).then_some(PartRange { from, to })
    }

    pub fn bytes(&self) -> u64 {
        self.to - self.from
    }
}

/// One stored partial object.
#[derive(Debug, Clone)]
pub struct Part {
    pub range: PartRange,
    pub key: String,
}

/// The partial objects in the store, by segment (only keys in the layout), each segment's in
/// order of offset. `only` restricts the listing to one segment.
pub async fn list_parts(
    store: &ObjectStore,
    only: Option<&SegmentId>,
) -> Result<BTreeMap<SegmentId, Vec<Part>>, StorageError> {
    let dir = only.map_or_else(|| PARTIAL_DIR.to_string(), partial_dir);
    let mut out: BTreeMap<SegmentId, Vec<Part>> = BTreeMap::new();
    for o in store.list(&dir).await? {
        let Some(rest) = o
            .key
            .strip_prefix(PARTIAL_DIR)
            .and_then(|r| r.strip_prefix('/'))
        else {
            continue;
        };
        let Some((seg, name)) = rest.split_once('/') else {
            continue;
        };
        let (Ok(WalSegmentName::Segment(id)), Some(range)) = (seg.parse(), PartRange::parse(name))
        else {
            continue;
        };
        out.entry(id).or_default().push(Part { range, key: o.key });
    }
    for parts in out.values_mut() {
        parts.sort_by_key(|p| p.range);
    }
    Ok(out)
}

/// The contiguous run of `parts` (sorted) from offset 0, and where it ends. A part that starts
/// inside the run without continuing it exactly (never written by walhoard) ends the run.
pub fn chain_from_zero(parts: &[Part]) -> (Vec<&Part>, u64) {
    let mut end = 0;
    let mut chain = Vec::new();
    for p in parts {
        if p.range.from == end {
            end = p.range.to;
            chain.push(p);
        } else if p.range.from > end || p.range.to > end {
            break;
        }
    }
    (chain, end)
}

/// Deletes the partial objects of segment `id` (only keys in the layout that carry
/// walhoard's mark); returns how many.
pub async fn delete_parts(store: &ObjectStore, id: &SegmentId) -> Result<usize, StorageError> {
    let parts = list_parts(store, Some(id)).await?;
    delete_marked(store, parts.get(id).into_iter().flatten()).await
}

/// Deletes those of `parts` whose metadata carries walhoard's `walhoard-writer` mark (the
/// others, or any whose metadata cannot be read, are left alone with a warning).
async fn delete_marked(
    store: &ObjectStore,
    parts: impl IntoIterator<Item = &Part>,
) -> Result<usize, StorageError> {
    let mut n = 0;
    for p in parts {
        match store.object_meta(&p.key).await {
            Ok(m) if m.walhoard_writer.is_some() => {
                store.delete(&p.key).await?;
                n += 1;
            }
            Ok(_) => {
                tracing::warn!(object = %p.key, "partial WAL object without walhoard's mark; left alone")
            }
            Err(e) => {
                tracing::warn!(object = %p.key, error = %e, "partial WAL object's metadata unreadable; left alone")
            }
        }
    }
    Ok(n)
}

/// Whether the archive holds segment `id` complete, or as its timeline's last `.partial`.
pub(super) async fn complete_in_archive(
    store: &ObjectStore,
    id: &SegmentId,
) -> Result<bool, StorageError> {
    for name in [WalSegmentName::Segment(*id), WalSegmentName::Partial(*id)] {
        if store.stat(&wal_key(&name)).await?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Retention: deletes the partial objects of segments before `first` (the oldest kept
/// basebackup's start segment, compared by position whatever the timeline); returns how many.
pub async fn delete_parts_before(
    store: &ObjectStore,
    first: &SegmentId,
) -> Result<usize, StorageError> {
    let mut n = 0;
    for (id, parts) in list_parts(store, None).await? {
        if (id.log, id.seg) < (first.log, first.seg) {
            n += delete_marked(store, &parts).await?;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(from: u64, to: u64) -> Part {
        Part {
            range: PartRange { from, to },
            key: format!("k{from}"),
        }
    }

    #[test]
    fn part_names_parse_only_the_layout() {
        let id: SegmentId = match "000000010000000000000003".parse() {
            Ok(WalSegmentName::Segment(id)) => id,
            other => panic!("{other:?}"),
        };
        let key = partial_key(&id, 0x2000, 0x1F000);
        assert_eq!(
            key,
            "xlog_partial/000000010000000000000003/00002000-0001F000"
        );
        let name = key.rsplit('/').next().unwrap();
        assert_eq!(
            PartRange::parse(name),
            Some(PartRange {
                from: 0x2000,
                to: 0x1F000
            })
        );
        for bad in [
            "00002000-00001000",
            "2000-3000",
            "0000200a-0000300b",
            "x",
            "00002000-00002000",
        ] {
            assert_eq!(PartRange::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn chain_is_the_contiguous_run_from_zero() {
        let parts = [part(0, 100), part(100, 250), part(400, 500)];
        let (chain, end) = chain_from_zero(&parts);
        assert_eq!(end, 250);
        assert_eq!(chain.len(), 2);
        let lone = [part(100, 200)];
        let (chain, end) = chain_from_zero(&lone);
        assert!(chain.is_empty());
        assert_eq!(end, 0);
        // A part straddling the run's end was not written by walhoard: the run ends there.
        let (_, end) = chain_from_zero(&[part(0, 100), part(50, 300)]);
        assert_eq!(end, 100);
    }
}
