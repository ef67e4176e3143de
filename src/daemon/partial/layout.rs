//! The key layout of partial WAL objects (docs/formats.md): keys, listing, the run from
//! offset 0, deletion (only keys in the layout).

use std::collections::BTreeMap;

use walhoard_protocol::{SegmentId, WalSegmentName};

use super::log::LOG_NAME;
use crate::daemon::archiver::wal_key;
use crate::storage::meta::ObjectMeta;
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

/// One stored part: a partial object, or a record of the segment's part log (`key` is the
/// log's then).
#[derive(Debug, Clone)]
pub struct Part {
    pub range: PartRange,
    pub key: String,
    pub record: Option<InLog>,
}

/// Where a part lies in its part log ([`super::log`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InLog {
    pub at: u64,
    pub len: u64,
    /// The record does not check but a valid one follows it (or the log's header is
    /// damaged): reading it fails.
    pub damage: Option<String>,
}

impl Part {
    /// A partial object's part.
    pub fn object(range: PartRange, key: String) -> Part {
        Part {
            range,
            key,
            record: None,
        }
    }

    /// How errors and reports name it: the object's key, or the log's key and the record.
    pub fn label(&self) -> String {
        match &self.record {
            None => self.key.clone(),
            Some(r) => format!(
                "{} record at byte {} ({:08X}-{:08X})",
                self.key, r.at, self.range.from, self.range.to
            ),
        }
    }
}

/// What the store holds of a segment's parts, unread: its part objects and its part log.
#[derive(Debug, Default)]
pub(super) struct Stored {
    pub objects: Vec<Part>,
    pub log: Option<String>,
}

/// The partial objects and part logs in the store, by segment, without reading the logs.
pub(super) async fn list_stored(
    store: &ObjectStore,
    only: Option<&SegmentId>,
) -> Result<BTreeMap<SegmentId, Stored>, StorageError> {
    let dir = only.map_or_else(|| PARTIAL_DIR.to_string(), partial_dir);
    let mut out: BTreeMap<SegmentId, Stored> = BTreeMap::new();
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
        let Ok(WalSegmentName::Segment(id)) = seg.parse() else {
            continue;
        };
        if name == LOG_NAME {
            out.entry(id).or_default().log = Some(o.key);
        } else if let Some(range) = PartRange::parse(name) {
            out.entry(id)
                .or_default()
                .objects
                .push(Part::object(range, o.key));
        }
    }
    Ok(out)
}

/// Opens the record of the part log that `part` names: its head bounded and its length and
/// offsets the ones the scan found, its metadata read, its stored bytes a stream whose end
/// checks the record's CRC. A log gone meanwhile (its segment was archived complete and its
/// parts deleted) is "not found".
pub async fn open_log_record(
    store: &ObjectStore,
    part: &Part,
) -> Result<super::log::OpenRecord, StorageError> {
    let key = part.key.clone();
    let Some(rec) = &part.record else {
        return Err(StorageError::Config(format!(
            "{key} is not a part log record"
        )));
    };
    if let Some(why) = &rec.damage {
        return Err(StorageError::BadMetadata {
            key: part.label(),
            message: why.clone(),
        });
    }
    let Some((path, _)) = store.local_file(&key)? else {
        return Err(StorageError::Config(format!(
            "{key}: part logs are read from local storage only"
        )));
    };
    let (at, len) = (rec.at, rec.len);
    let read = tokio::task::spawn_blocking(move || super::log::open_record(&path, at, len))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|r| r);
    match read {
        Ok(r) if r.range == part.range => Ok(r),
        Ok(r) => Err(StorageError::BadMetadata {
            key: part.label(),
            message: format!(
                "the record now holds offsets {:08X}-{:08X}",
                r.range.from, r.range.to
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StorageError::NotFound { key }),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Err(StorageError::BadMetadata {
            key: part.label(),
            message: e.to_string(),
        }),
        Err(source) => Err(StorageError::Io {
            action: "read",
            key: part.label(),
            source,
        }),
    }
}

/// The parsed metadata a part log record holds.
pub fn record_meta(part: &Part, meta: &[u8]) -> Result<ObjectMeta, StorageError> {
    let map: crate::storage::Metadata =
        serde_json::from_slice(meta).map_err(|e| StorageError::BadMetadata {
            key: part.label(),
            message: format!("metadata is not a JSON object of strings: {e}"),
        })?;
    ObjectMeta::parse(&part.label(), &map)
}

/// The segments that have parts in the store (objects or a log).
pub async fn segments_with_parts(
    store: &ObjectStore,
) -> Result<std::collections::BTreeSet<SegmentId>, StorageError> {
    Ok(list_stored(store, None).await?.into_keys().collect())
}

/// The records of the part log at `key` as parts (read as a stream on a blocking thread):
/// its valid records, and a damaged one (a record that does not check with a valid one
/// after it, or a header that does not check) as a part whose read fails. Empty when the
/// store is not local (only local stores hold logs) or the file is not a part log.
async fn log_parts(
    store: &ObjectStore,
    key: &str,
    id: SegmentId,
) -> Result<Vec<Part>, StorageError> {
    let Some((path, _)) = store.local_file(key)? else {
        return Ok(Vec::new());
    };
    let k = key.to_string();
    let scanned = tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&path)?;
        super::log::scan(&f)
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()));
    let io_err = |source| StorageError::Io {
        action: "read the part log",
        key: key.into(),
        source,
    };
    let part = |range, at, len, damage| Part {
        range,
        key: k.clone(),
        record: Some(InLog { at, len, damage }),
    };
    let scan = match scanned.and_then(|r| r) {
        Ok(Some(scan)) => scan,
        Ok(None) => {
            tracing::warn!(file = key, "not a part log (no magic); left alone");
            return Ok(Vec::new());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            // Its magic, but a header that does not check: whatever it held is unreadable.
            return Ok(vec![part(
                PartRange { from: 0, to: 1 },
                0,
                0,
                Some(e.to_string()),
            )]);
        }
        Err(e) => return Err(io_err(e)),
    };
    if scan.header.segment != id {
        return Ok(vec![part(
            PartRange { from: 0, to: 1 },
            0,
            0,
            Some(format!("its header names segment {}", scan.header.segment)),
        )]);
    }
    let mut parts: Vec<Part> = scan
        .records
        .iter()
        .map(|r| part(r.range, r.at, r.len, None))
        .collect();
    if let Some(d) = scan.damage {
        let from = scan.records.last().map_or(0, |r| r.range.to);
        let to = d.next.range.from.max(from + 1);
        parts.push(part(
            PartRange { from, to },
            d.at,
            0,
            Some(format!(
                "damaged record ({}), valid records after it",
                d.why
            )),
        ));
    }
    Ok(parts)
}

/// The parts in the store, by segment (partial objects in the layout and the records of part
/// logs), each segment's in order of offset. `only` restricts the listing to one segment.
pub async fn list_parts(
    store: &ObjectStore,
    only: Option<&SegmentId>,
) -> Result<BTreeMap<SegmentId, Vec<Part>>, StorageError> {
    let mut out = BTreeMap::new();
    for (id, stored) in list_stored(store, only).await? {
        let mut parts = stored.objects;
        if let Some(log) = &stored.log {
            parts.extend(log_parts(store, log, id).await?);
        }
        if parts.is_empty() {
            continue;
        }
        parts.sort_by_key(|p| p.range);
        out.insert(id, parts);
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
    let mut listed = list_stored(store, Some(id)).await?;
    match listed.remove(id) {
        Some(stored) => delete_stored(store, &stored).await,
        None => Ok(0),
    }
}

/// Deletes a segment's part objects and part log, walhoard's only; returns how many.
async fn delete_stored(store: &ObjectStore, stored: &Stored) -> Result<usize, StorageError> {
    let mut n = delete_marked(store, &stored.objects).await?;
    if let Some(log) = &stored.log {
        n += delete_log(store, log).await? as usize;
    }
    Ok(n)
}

/// Deletes the part log at `key` when its header carries walhoard's mark (else, or when
/// its header cannot be read, it is left alone with a warning); whether it did.
async fn delete_log(store: &ObjectStore, key: &str) -> Result<bool, StorageError> {
    let Some((path, _)) = store.local_file(key)? else {
        return Ok(false);
    };
    let header =
        tokio::task::spawn_blocking(move || super::log::read_header(&std::fs::File::open(path)?))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r);
    match header {
        Ok(Some((h, _))) if h.is_walhoards() => {
            store.delete(key).await?;
            Ok(true)
        }
        Ok(_) => {
            tracing::warn!(file = key, "part log without walhoard's mark; left alone");
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => {
            tracing::warn!(file = key, error = %e, "part log's header unreadable; left alone");
            Ok(false)
        }
    }
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
    for (id, stored) in list_stored(store, None).await? {
        if (id.log, id.seg) < (first.log, first.seg) {
            n += delete_stored(store, &stored).await?;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(from: u64, to: u64) -> Part {
        Part::object(PartRange { from, to }, format!("k{from}"))
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
