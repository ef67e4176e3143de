//! Partial WAL objects (`xlog_partial/<segment>/<from>-<to>`, issue 16) in `walhoard verify`
//! and `walhoard info`: what the site's store holds of segments not yet complete, whether the
//! parts of each segment tile it from offset 0 without gap or overlap, whether each part
//! reads back (MAC, plain size and hash, the LSN range and segment size its key names), and
//! which segments the archive also holds complete (leftovers the daemon deletes at its next
//! start or by retention; restore never reads them). See docs/verify-and-info.md.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Serialize;
use walhoard_protocol::{Lsn, SegmentId, SegmentSize, WalSegmentName};

use super::archive::WalIndex;
use super::Problem;
use crate::daemon::archiver::wal_key;
use crate::daemon::partial::{list_parts, Part, PARTIAL_DIR};
use crate::pipeline::encryption::KeyRing;
use crate::restore::partial::{read_part, PartsError};
use crate::storage::ObjectStore;

/// One stored part and what the listing says of it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub part: Part,
    pub stored_bytes: u64,
    pub last_modified: Option<i64>,
}

/// The parts of one segment.
#[derive(Debug, Clone)]
pub struct SegmentParts {
    pub parts: Vec<Listed>,
    /// The archive holds the segment complete (or as its timeline's `.partial`).
    pub complete: bool,
}

impl SegmentParts {
    /// Where the run of parts from offset 0 ends (0 when none starts there).
    pub fn run_end(&self) -> u64 {
        let mut end = 0;
        for l in &self.parts {
            if l.part.range.from != end {
                break;
            }
            end = l.part.range.to;
        }
        end
    }
}

/// The partial objects of a site, by segment (each segment's in order of offset).
#[derive(Debug, Clone, Default)]
pub struct PartialIndex {
    pub segments: BTreeMap<SegmentId, SegmentParts>,
}

impl PartialIndex {
    /// Lists the site's own `xlog_partial/` (only keys in the layout); `index` says which
    /// segments are complete.
    pub async fn load(store: &ObjectStore, index: &WalIndex) -> Result<Self> {
        let infos: BTreeMap<String, (u64, Option<i64>)> = store
            .list(PARTIAL_DIR)
            .await
            .with_context(|| format!("list {PARTIAL_DIR}/"))?
            .into_iter()
            .map(|o| (o.key, (o.size, o.last_modified)))
            .collect();
        let listed = list_parts(store, None)
            .await
            .with_context(|| format!("list {PARTIAL_DIR}/"))?;
        let mut segments = BTreeMap::new();
        for (id, parts) in listed {
            let parts = parts
                .into_iter()
                .map(|part| {
                    let (mut stored_bytes, last_modified) =
                        infos.get(&part.key).copied().unwrap_or_default();
                    if let Some(r) = &part.record {
                        // A part log's record: its own length, the log's time.
                        stored_bytes = r.len;
                    }
                    Listed {
                        part,
                        stored_bytes,
                        last_modified,
                    }
                })
                .collect();
            let complete = index.holds_complete(&id);
            segments.insert(id, SegmentParts { parts, complete });
        }
        Ok(PartialIndex { segments })
    }

    /// Segments the archive also holds complete: their parts are leftovers.
    pub fn leftovers(&self) -> impl Iterator<Item = (&SegmentId, &SegmentParts)> {
        self.segments.iter().filter(|(_, s)| s.complete)
    }

    /// Segments only their parts hold.
    pub fn open(&self) -> impl Iterator<Item = (&SegmentId, &SegmentParts)> {
        self.segments.iter().filter(|(_, s)| !s.complete)
    }
}

/// The parts of each segment must tile it from offset 0, one after the other, within the
/// segment: a gap, an overlap or a part past the segment's end is a problem (walhoard never
/// writes one). Restore reads the run from offset 0 only.
pub fn tiling_problems(idx: &PartialIndex, seg: SegmentSize) -> Vec<Problem> {
    let mut out = Vec::new();
    for (id, s) in &idx.segments {
        let mut end = 0;
        for l in &s.parts {
            let r = l.part.range;
            if r.to > seg.bytes() {
                out.push(Problem::new(
                    &l.part.label(),
                    format!(
                        "ends at offset {:#X}, past the segment size {:#X}",
                        r.to,
                        seg.bytes()
                    ),
                ));
                break;
            }
            if r.from < end {
                out.push(Problem::new(
                    &l.part.label(),
                    format!(
                        "overlaps the parts before it (they end at offset {end:#X}): not one run without overlap"
                    ),
                ));
                break;
            }
            if r.from > end {
                out.push(Problem::new(
                    &l.part.label(),
                    format!(
                        "starts at offset {:#X}, but the parts of {id} from offset 0 end at {end:#X}: a gap (restore reads the bytes before it only)",
                        r.from
                    ),
                ));
                break;
            }
            end = r.to;
        }
    }
    out
}

/// Reads every part of `idx` through its checks ([`read_part`]), nothing written anywhere.
/// Returns the problems, and for each segment only parts hold, where its checked run from
/// offset 0 ends (the archive's durable end inside it).
pub async fn check_parts(
    store: &ObjectStore,
    keys: &KeyRing,
    idx: &PartialIndex,
    seg: SegmentSize,
) -> (Vec<Problem>, BTreeMap<SegmentId, Lsn>) {
    let mut problems = Vec::new();
    let mut ends = BTreeMap::new();
    for (id, s) in &idx.segments {
        let mut run = Some(0u64);
        for l in &s.parts {
            let part = &l.part;
            let result = read_part(store, keys, id, part, std::io::sink()).await;
            let ok = match result {
                Ok((size, _)) if size != seg => {
                    problems.push(Problem::new(
                        &part.label(),
                        format!(
                            "its wal-segment-size is {}, the archive's segments are {} bytes",
                            size.bytes(),
                            seg.bytes()
                        ),
                    ));
                    false
                }
                Ok(_) => true,
                // Deleted while we read: its segment was archived complete meanwhile.
                Err(PartsError::Gone(key)) => {
                    if !complete_now(store, id).await {
                        problems.push(Problem::new(
                            &key,
                            "listed, then gone, and the segment is not archived complete"
                                .to_string(),
                        ));
                    }
                    false
                }
                Err(PartsError::Failed(e)) => {
                    problems.push(Problem::new(&part.label(), format!("{e}")));
                    false
                }
                Err(PartsError::NoChain) => false,
            };
            run = match run {
                Some(end) if ok && part.range.from == end => Some(part.range.to),
                Some(end) => {
                    if !s.complete && end > 0 {
                        record_end(&mut ends, id, seg, end);
                    }
                    None
                }
                None => None,
            };
        }
        if let Some(end) = run.filter(|e| *e > 0 && !s.complete) {
            record_end(&mut ends, id, seg, end);
        }
    }
    (problems, ends)
}

fn record_end(ends: &mut BTreeMap<SegmentId, Lsn>, id: &SegmentId, seg: SegmentSize, end: u64) {
    if let Ok(start) = id.start_lsn(seg) {
        ends.insert(*id, start + end);
    }
}

/// Whether the archive holds segment `id` complete now (after its parts went away).
async fn complete_now(store: &ObjectStore, id: &SegmentId) -> bool {
    for name in [WalSegmentName::Segment(*id), WalSegmentName::Partial(*id)] {
        if matches!(store.stat(&wal_key(&name)).await, Ok(Some(_))) {
            return true;
        }
    }
    false
}

/// What `verify` reports of the partial objects.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PartialReport {
    /// Segments held only by their parts, each with the LSN its checked run from offset 0
    /// reaches.
    pub segments: Vec<PartialSegment>,
    /// Keys of parts of segments the archive also holds complete (deleted by the daemon at
    /// its next start or by retention; not a problem).
    pub leftovers: Vec<String>,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartialSegment {
    pub segment: String,
    pub parts: usize,
    /// Where the checked run of parts from offset 0 ends; `None` when it holds nothing.
    pub durable_to: Option<String>,
}

/// Verifies the partial objects of `idx`: tiling, then every part read back.
pub async fn verify(
    store: &ObjectStore,
    keys: &KeyRing,
    idx: &PartialIndex,
    seg: SegmentSize,
) -> (PartialReport, BTreeMap<SegmentId, Lsn>) {
    let mut problems = tiling_problems(idx, seg);
    let (found, ends) = check_parts(store, keys, idx, seg).await;
    problems.extend(found);
    problems.sort_by(|a, b| a.key.cmp(&b.key));
    problems.dedup();
    let segments = idx
        .open()
        .map(|(id, s)| PartialSegment {
            segment: id.to_string(),
            parts: s.parts.len(),
            durable_to: ends.get(id).map(Lsn::to_string),
        })
        .collect();
    let leftovers = idx
        .leftovers()
        .flat_map(|(_, s)| s.parts.iter().map(|l| l.part.label()))
        .collect();
    (
        PartialReport {
            segments,
            leftovers,
            problems,
        },
        ends,
    )
}

/// What `info` shows of the partial objects (from the listing alone).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PartialInfo {
    pub objects: usize,
    /// Plain WAL bytes they hold (from their keys) and what the store holds.
    pub plain_bytes: u64,
    pub stored_bytes: u64,
    /// Per timeline, the archive's durable end including parts: the end of the newest
    /// segment's run of parts from offset 0 (segments held only by parts).
    pub durable_end: Vec<TimelineDurable>,
    /// The most recently written part.
    pub newest: Option<NewestPart>,
    /// Parts of segments the archive also holds complete.
    pub leftover_objects: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimelineDurable {
    pub timeline: u32,
    pub segment: String,
    pub durable_lsn: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct NewestPart {
    pub key: String,
    pub written_at: Option<String>,
    pub age_seconds: Option<i64>,
}

/// The summary `info` shows; `now` in seconds since the epoch.
pub fn info(idx: &PartialIndex, seg: SegmentSize, now: i64) -> PartialInfo {
    let all = || idx.segments.values().flat_map(|s| s.parts.iter());
    let mut durable: BTreeMap<u32, (SegmentId, Lsn)> = BTreeMap::new();
    for (id, s) in idx.open() {
        let (Ok(start), end) = (id.start_lsn(seg), s.run_end()) else {
            continue;
        };
        if end == 0 {
            continue;
        }
        let at = start + end;
        let e = durable.entry(id.tli.get()).or_insert((*id, at));
        if at > e.1 {
            *e = (*id, at);
        }
    }
    let newest = all()
        .max_by_key(|l| (l.last_modified, l.part.range.to, l.part.key.clone()))
        .map(|l| NewestPart {
            key: l.part.label(),
            written_at: l
                .last_modified
                .and_then(|t| jiff::Timestamp::from_second(t).ok())
                .map(|t| t.to_string()),
            age_seconds: l.last_modified.map(|t| now - t),
        });
    PartialInfo {
        objects: all().count(),
        plain_bytes: all().map(|l| l.part.range.bytes()).sum(),
        stored_bytes: all().map(|l| l.stored_bytes).sum(),
        durable_end: durable
            .into_iter()
            .map(|(timeline, (id, at))| TimelineDurable {
                timeline,
                segment: id.to_string(),
                durable_lsn: at.to_string(),
            })
            .collect(),
        newest,
        leftover_objects: idx.leftovers().map(|(_, s)| s.parts.len()).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::partial::{partial_key, PartRange};
    use walhoard_protocol::TimelineId;

    fn listed(id: &SegmentId, from: u64, to: u64) -> Listed {
        Listed {
            part: Part::object(PartRange { from, to }, partial_key(id, from, to)),
            stored_bytes: 10,
            last_modified: Some(from as i64),
        }
    }

    #[test]
    fn tiling_names_the_gap_the_overlap_and_the_overrun() {
        let seg = SegmentSize::DEFAULT;
        let id = |s| SegmentId::from_segno(TimelineId(1), s, seg);
        let (good, gap, overlap, over) = (id(3), id(4), id(5), id(6));
        let segs = [
            (good, vec![(0, 0x100), (0x100, 0x300)]),
            (gap, vec![(0, 0x100), (0x200, 0x300)]),
            (overlap, vec![(0, 0x100), (0x80, 0x300)]),
            (over, vec![(0, seg.bytes() + 1)]),
        ];
        let idx = PartialIndex {
            segments: segs
                .iter()
                .map(|(i, r)| {
                    let parts = r.iter().map(|(a, b)| listed(i, *a, *b)).collect();
                    (
                        *i,
                        SegmentParts {
                            parts,
                            complete: false,
                        },
                    )
                })
                .collect(),
        };
        let p = tiling_problems(&idx, seg);
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                partial_key(&gap, 0x200, 0x300),
                partial_key(&overlap, 0x80, 0x300),
                partial_key(&over, 0, seg.bytes() + 1),
            ]
        );
        assert!(p[0].problem.contains("a gap"), "{p:?}");
        assert!(p[1].problem.contains("overlap"), "{p:?}");
        let i = info(&idx, seg, 0x500);
        assert_eq!(i.objects, 7);
        assert_eq!(i.durable_end.len(), 1);
        // The newest segment's run: segment 6's one part (past the end, still counted).
        assert_eq!(i.durable_end[0].segment, over.to_string());
        assert_eq!(idx.segments[&gap].run_end(), 0x100);
        assert_eq!(i.newest.unwrap().age_seconds, Some(0x500 - 0x200));
    }
}
