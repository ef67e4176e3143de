//! What WAL a site's archive holds, from one listing of `xlog/` and `timeline/` of the site
//! and of its `moved_from` sites: segments per timeline, `.partial` files, history files, and
//! the chain of segments a restore from a given position would read. `walhoard info` shows
//! it; `walhoard verify` walks it.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Serialize;
use walhoard_protocol::{Lsn, SegmentId, SegmentSize, TimelineHistory, TimelineId, WalSegmentName};

use crate::daemon::archiver::wal_key;
use crate::storage::{meta, ObjectInfo, ObjectStore};

/// An archived object and which of the WAL sources holds it (0: the site itself, then its
/// `moved_from` sites in order, as [`crate::restore::RestoreSite::wal_sources`] lists them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub source: usize,
    pub info: ObjectInfo,
}

/// A listing of a site's archived WAL.
#[derive(Debug, Clone)]
pub struct WalIndex {
    /// From the newest segment's `original-file-size` (the default when it records none).
    pub seg_size: SegmentSize,
    /// Complete segments: timeline → segment number → object.
    pub segments: BTreeMap<TimelineId, BTreeMap<u64, Stored>>,
    pub partials: Vec<(SegmentId, Stored)>,
    pub histories: BTreeMap<TimelineId, Stored>,
}

/// The archived segments of one timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimelineRange {
    pub timeline: u32,
    pub first: String,
    pub last: String,
    pub segments: usize,
    /// Runs of missing segments between `first` and `last`: (first missing, last missing).
    pub gaps: Vec<(String, String)>,
}

/// One segment of a chain: where it is read from, and whether the archive has it.
#[derive(Debug, Clone)]
pub struct Step {
    pub id: SegmentId,
    pub object: Option<Stored>,
}

impl Step {
    pub fn key(&self) -> String {
        wal_key(&WalSegmentName::Segment(self.id))
    }
}

impl WalIndex {
    /// Lists `xlog/` and `timeline/` of each of `sources`, in order: a file found in an
    /// earlier source hides the same name in later ones (as restore_command searches them).
    /// Keys that are not WAL file names are left out, and so are backup history files
    /// (`.backup`), which nothing reads.
    pub async fn load(sources: &[&ObjectStore]) -> Result<Self> {
        let mut segments: BTreeMap<TimelineId, BTreeMap<u64, Stored>> = BTreeMap::new();
        let mut partials = Vec::new();
        let mut histories = BTreeMap::new();
        let mut named: BTreeMap<WalSegmentName, Stored> = BTreeMap::new();
        for (source, store) in sources.iter().enumerate() {
            for dir in ["xlog", "timeline"] {
                for info in store
                    .list(dir)
                    .await
                    .with_context(|| format!("list {dir}/"))?
                {
                    let file = info.key.rsplit('/').next().unwrap_or_default();
                    if let Ok(name) = file.parse::<WalSegmentName>() {
                        named.entry(name).or_insert(Stored { source, info });
                    }
                }
            }
        }
        let newest_segment = named
            .iter()
            .filter_map(|(n, o)| match n {
                WalSegmentName::Segment(id) => Some(((id.log, id.seg, id.tli), o)),
                _ => None,
            })
            .max_by_key(|(at, _)| *at);
        let seg_size = match newest_segment {
            Some((_, o)) => segment_size_of(sources[o.source], &o.info.key).await?,
            None => SegmentSize::DEFAULT,
        };
        for (name, o) in named {
            match name {
                WalSegmentName::Segment(id) => {
                    let segno = id.segno(seg_size)?;
                    segments.entry(id.tli).or_default().insert(segno, o);
                }
                WalSegmentName::Partial(id) => partials.push((id, o)),
                WalSegmentName::History(tli) => {
                    histories.insert(tli, o);
                }
                WalSegmentName::Backup(..) => {}
            }
        }
        Ok(WalIndex {
            seg_size,
            segments,
            partials,
            histories,
        })
    }

    fn name(&self, tli: TimelineId, segno: u64) -> String {
        SegmentId::from_segno(tli, segno, self.seg_size).to_string()
    }

    /// Whether the archive holds segment `id` complete, or as its timeline's `.partial`.
    pub fn holds_complete(&self, id: &SegmentId) -> bool {
        let whole = id.segno(self.seg_size).is_ok_and(|n| {
            self.segments
                .get(&id.tli)
                .is_some_and(|m| m.contains_key(&n))
        });
        whole || self.partials.iter().any(|(p, _)| p == id)
    }

    /// Per timeline: first and last segment, how many, and the runs missing between them.
    pub fn ranges(&self) -> Vec<TimelineRange> {
        let mut out = Vec::new();
        for (tli, segs) in &self.segments {
            let (Some(first), Some(last)) = (segs.keys().next(), segs.keys().next_back()) else {
                continue;
            };
            let mut gaps = Vec::new();
            let mut expect = *first;
            for s in segs.keys() {
                if *s > expect {
                    gaps.push((self.name(*tli, expect), self.name(*tli, s - 1)));
                }
                expect = s + 1;
            }
            out.push(TimelineRange {
                timeline: tli.get(),
                first: self.name(*tli, *first),
                last: self.name(*tli, *last),
                segments: segs.len(),
                gaps,
            });
        }
        out
    }

    /// The segment holding the newest WAL (the highest position; the later timeline of two
    /// at the same position).
    pub fn newest(&self) -> Option<(SegmentId, &Stored)> {
        self.segments
            .iter()
            .filter_map(|(tli, segs)| segs.iter().next_back().map(|(s, o)| (*s, *tli, o)))
            .max_by_key(|(s, tli, _)| (*s, *tli))
            .map(|(s, tli, o)| (SegmentId::from_segno(tli, s, self.seg_size), o))
    }

    /// Every timeline the archive knows of, newest first.
    fn timelines(&self) -> Vec<TimelineId> {
        let mut t: Vec<TimelineId> = self
            .segments
            .keys()
            .chain(self.histories.keys())
            .copied()
            .collect();
        t.sort();
        t.dedup();
        t.reverse();
        t
    }

    /// The newest timeline whose history contains (`tli`, `start`), as
    /// `recovery_target_timeline = 'latest'` picks it, and that history (`None` for `tli`
    /// itself with no history file).
    pub fn target_timeline<'a>(
        &self,
        tli: TimelineId,
        start: Lsn,
        histories: &'a BTreeMap<TimelineId, TimelineHistory>,
    ) -> (TimelineId, Option<&'a TimelineHistory>) {
        for t in self.timelines() {
            if t < tli {
                break;
            }
            match histories.get(&t) {
                Some(h) if h.timeline_of(start) == tli => return (t, Some(h)),
                None if t == tli => return (t, None),
                _ => {}
            }
        }
        (tli, histories.get(&tli))
    }

    /// The segments a restore from `start` on `tli` reads, up to the newest one the archive
    /// holds on that line of timelines: for each segment number, the newest timeline of the
    /// history that began at or before the segment's last byte (as `XLogFileReadAnyTLI`
    /// picks it). A step without an object is a gap.
    pub fn chain(
        &self,
        start: Lsn,
        history: Option<&TimelineHistory>,
        tli: TimelineId,
    ) -> Vec<Step> {
        let seg = self.seg_size;
        let tli_of = |segno: u64| {
            let last_byte = Lsn((segno + 1) * seg.bytes() - 1);
            history.map_or(tli, |h| h.timeline_of(last_byte))
        };
        let first = start.segment_number(seg);
        let end = self
            .segments
            .iter()
            .flat_map(|(t, segs)| segs.range(first..).map(move |(s, _)| (*t, *s)))
            .filter(|(t, s)| tli_of(*s) == *t)
            .map(|(_, s)| s)
            .max();
        let Some(end) = end else {
            return vec![Step {
                id: SegmentId::from_segno(tli_of(first), first, seg),
                object: None,
            }];
        };
        (first..=end)
            .map(|s| {
                let t = tli_of(s);
                Step {
                    id: SegmentId::from_segno(t, s, seg),
                    object: self.segments.get(&t).and_then(|m| m.get(&s)).cloned(),
                }
            })
            .collect()
    }
}

/// A segment's size from its object's `original-file-size`.
async fn segment_size_of(store: &ObjectStore, key: &str) -> Result<SegmentSize> {
    let m = store
        .metadata(key)
        .await
        .with_context(|| format!("metadata of {key}"))?;
    match m.get(meta::ORIGINAL_FILE_SIZE) {
        None => Ok(SegmentSize::DEFAULT),
        Some(v) => {
            let n: u64 = v
                .parse()
                .with_context(|| format!("{key}: original-file-size {v:?}"))?;
            SegmentSize::new(n).with_context(|| format!("{key}: original-file-size {n}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(segs: &[(u32, u64)], histories: &[u32]) -> WalIndex {
        let o = |k: &str| Stored {
            source: 0,
            info: ObjectInfo {
                key: k.into(),
                size: 1,
                last_modified: None,
            },
        };
        let mut segments: BTreeMap<TimelineId, BTreeMap<u64, Stored>> = BTreeMap::new();
        for (t, s) in segs {
            segments
                .entry(TimelineId(*t))
                .or_default()
                .insert(*s, o("x"));
        }
        WalIndex {
            seg_size: SegmentSize::DEFAULT,
            segments,
            partials: Vec::new(),
            histories: histories.iter().map(|t| (TimelineId(*t), o("h"))).collect(),
        }
    }

    #[test]
    fn ranges_name_the_gaps() {
        let i = index(&[(1, 2), (1, 3), (1, 6), (1, 8), (2, 8)], &[2]);
        let r = i.ranges();
        assert_eq!(r[0].segments, 4);
        assert_eq!(
            r[0].gaps,
            [
                (
                    "000000010000000000000004".to_string(),
                    "000000010000000000000005".to_string()
                ),
                (
                    "000000010000000000000007".to_string(),
                    "000000010000000000000007".to_string()
                )
            ]
        );
        assert_eq!(
            i.newest().unwrap().0.to_string(),
            "000000020000000000000008"
        );
    }

    #[test]
    fn the_chain_follows_the_history_across_a_switch() {
        // Timeline 2 began at 0/5000100: segment 5 is read from timeline 2.
        let i = index(&[(1, 3), (1, 4), (2, 5), (2, 6), (1, 9)], &[2]);
        let h2 = TimelineHistory::parse(TimelineId(2), b"1\t0/5000100\tx\n").unwrap();
        let hs: BTreeMap<_, _> = [(TimelineId(2), h2)].into_iter().collect();
        let (t, h) = i.target_timeline(TimelineId(1), Lsn(0x300_0028), &hs);
        assert_eq!(t, TimelineId(2));
        let steps = i.chain(Lsn(0x300_0028), h, t);
        let names: Vec<(String, bool)> = steps
            .iter()
            .map(|s| (s.id.to_string(), s.object.is_some()))
            .collect();
        assert_eq!(
            names,
            [
                ("000000010000000000000003".into(), true),
                ("000000010000000000000004".into(), true),
                ("000000020000000000000005".into(), true),
                ("000000020000000000000006".into(), true),
            ],
            "timeline 1's segment 9 is not on timeline 2's line"
        );
        // A gap is a step without an object.
        let i = index(&[(1, 3), (1, 5)], &[]);
        let none = BTreeMap::new();
        let (t, h) = i.target_timeline(TimelineId(1), Lsn(0x300_0028), &none);
        let steps = i.chain(Lsn(0x300_0028), h, t);
        assert_eq!(steps.len(), 3);
        assert!(steps[1].object.is_none());
        assert_eq!(steps[1].key(), "xlog/000000010000000000000004");
    }
}
