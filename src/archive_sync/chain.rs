//! Is the archive's WAL complete from a basebackup's start to the server's current segment?
//! Pure: the caller lists the archive and asks the server for its timeline history.
//!
//! Which file recovery reads for a segment: the newest timeline of the history that began at
//! or before the segment (`XLogFileReadAnyTLI` walks `expectedTLEs` newest first, skipping
//! timelines that begin after it). So the segment holding a switchpoint is needed from the new
//! timeline, whose file starts with the old timeline's bytes, never the old timeline's
//! `.partial`. And every history file of a timeline after the backup's is needed:
//! `findNewestTimeLine` probes `<tli+1>.history`, `<tli+2>.history`, ... and stops at the
//! first one missing, so a hole there leaves recovery on an older timeline.

use std::collections::BTreeSet;

use serde::Serialize;
use walhoard_protocol::{Lsn, SegmentId, SegmentSize, TimelineHistory, TimelineId};

/// What the chain check found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    /// The backup's start segment, where the chain begins.
    pub from: String,
    /// The server's current segment (not needed: it is still being written).
    pub to: String,
    /// Segments and history files checked.
    pub checked: u64,
    /// Every file missing, oldest first: segment names, `NNNNNNNN.history`, or why the
    /// backup is not on the server's history at all.
    pub missing: Vec<String>,
}

impl ChainReport {
    pub fn first_gap(&self) -> Option<&str> {
        self.missing.first().map(String::as_str)
    }
}

/// What the archive holds, as listed.
#[derive(Debug, Default)]
pub struct Archived {
    pub segments: BTreeSet<SegmentId>,
    pub histories: BTreeSet<TimelineId>,
}

/// The timeline whose file of segment `segno` recovery along `history` reads.
pub fn timeline_for(history: &TimelineHistory, segno: u64, seg: SegmentSize) -> TimelineId {
    history.timeline_of(Lsn((segno + 1) * seg.bytes() - 1))
}

/// Checks the files recovery from a backup starting in `start` needs up to (not including)
/// segment number `current_segno` of `history`'s timeline.
pub fn check(
    history: &TimelineHistory,
    start: SegmentId,
    current_segno: u64,
    seg: SegmentSize,
    archived: &Archived,
) -> ChainReport {
    let current = SegmentId::from_segno(history.tli, current_segno, seg);
    let mut report = ChainReport {
        from: start.to_string(),
        to: current.to_string(),
        checked: 0,
        missing: Vec::new(),
    };
    let start_segno = match start.segno(seg) {
        Ok(n) => n,
        Err(e) => {
            report.missing.push(format!("{start}: {e}"));
            return report;
        }
    };
    // The backup must lie on this history: its timeline wrote its start segment.
    let on_history = history.tli == start.tli
        || history
            .switches
            .iter()
            .any(|s| s.tli == start.tli && s.switchpoint.segment_number(seg) >= start_segno);
    if !on_history {
        report.missing.push(format!(
            "{start}: the basebackup starts on timeline {}, which is not in the history of the \
             server's timeline {} at that segment",
            start.tli, history.tli
        ));
        return report;
    }
    let mut tlis: Vec<TimelineId> = history
        .switches
        .iter()
        .map(|s| s.tli)
        .chain(std::iter::once(history.tli))
        .filter(|t| *t > start.tli)
        .collect();
    tlis.sort();
    for t in tlis {
        report.checked += 1;
        if !archived.histories.contains(&t) {
            report.missing.push(format!("{:08X}.history", t.get()));
        }
    }
    for segno in start_segno..current_segno {
        report.checked += 1;
        let id = SegmentId::from_segno(timeline_for(history, segno, seg), segno, seg);
        if !archived.segments.contains(&id) {
            report.missing.push(id.to_string());
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    fn id(name: &str) -> SegmentId {
        match name.parse() {
            Ok(walhoard_protocol::WalSegmentName::Segment(s)) => s,
            _ => panic!("{name}"),
        }
    }

    #[test]
    fn follows_the_history_across_a_switch() {
        let seg = SegmentSize::new(SEG).unwrap();
        // Timeline 2 began inside segment 5 of timeline 1.
        let h = TimelineHistory::parse(TimelineId(2), b"1\t0/5000100\tpromoted\n").unwrap();
        let mut archived = Archived::default();
        for n in ["000000010000000000000003", "000000010000000000000004"] {
            archived.segments.insert(id(n));
        }
        // Timeline 1's segment 5 is not the one needed: timeline 2's is.
        archived.segments.insert(id("000000010000000000000005"));
        archived.segments.insert(id("000000020000000000000006"));
        let r = check(&h, id("000000010000000000000003"), 7, seg, &archived);
        assert_eq!(r.missing, ["00000002.history", "000000020000000000000005"]);
        assert_eq!(r.first_gap(), Some("00000002.history"));
        assert_eq!(r.checked, 5);
        archived.histories.insert(TimelineId(2));
        archived.segments.insert(id("000000020000000000000005"));
        assert!(check(&h, id("000000010000000000000003"), 7, seg, &archived)
            .missing
            .is_empty());
        // The current segment (7) is never required.
        assert!(check(&h, id("000000020000000000000006"), 7, seg, &archived)
            .missing
            .is_empty());
    }

    #[test]
    fn a_backup_off_the_history_is_a_gap() {
        let seg = SegmentSize::new(SEG).unwrap();
        let h = TimelineHistory::parse(TimelineId(3), b"1\t0/5000100\tx\n").unwrap();
        // Timeline 2 is a sibling branch, not an ancestor of 3.
        let r = check(
            &h,
            id("000000020000000000000006"),
            9,
            seg,
            &Archived::default(),
        );
        assert_eq!(r.missing.len(), 1);
        assert!(r.missing[0].contains("not in the history"), "{r:?}");
        // Timeline 1 past its switchpoint is not on this history either.
        let r = check(
            &h,
            id("000000010000000000000006"),
            9,
            seg,
            &Archived::default(),
        );
        assert!(r.missing[0].contains("not in the history"), "{r:?}");
    }
}
