//! Names of files in `pg_wal` and in the WAL archive (`XLogFileName`, `TLHistoryFileName`,
//! `BackupHistoryFileName` and the `.partial` suffix of pg_receivewal).

use std::fmt;
use std::str::FromStr;

use crate::error::FormatError;
use crate::lsn::{Lsn, SegmentSize, TimelineId};

/// Which segment of which timeline: the 24 hex digits of a WAL file name.
///
/// `log` and `seg` are the two halves printed by `XLogFileName`; how they map to a segment
/// number depends on the segment size, so conversions take a [`SegmentSize`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId {
    pub tli: TimelineId,
    pub log: u32,
    pub seg: u32,
}

impl SegmentId {
    /// The segment holding segment number `segno` on timeline `tli`.
    pub fn from_segno(tli: TimelineId, segno: u64, size: SegmentSize) -> Self {
        let per = size.segments_per_xlogid();
        SegmentId {
            tli,
            log: (segno / per) as u32,
            seg: (segno % per) as u32,
        }
    }

    /// The segment holding `lsn`.
    pub fn containing(tli: TimelineId, lsn: Lsn, size: SegmentSize) -> Self {
        Self::from_segno(tli, lsn.segment_number(size), size)
    }

    /// Segment number; an error when `seg` is out of range for this segment size
    /// (the name cannot come from a cluster with that size).
    pub fn segno(&self, size: SegmentSize) -> Result<u64, FormatError> {
        let per = size.segments_per_xlogid();
        if u64::from(self.seg) >= per {
            return Err(FormatError::new(format!(
                "WAL file {self} is not valid for a {} byte segment size",
                size.bytes()
            )));
        }
        Ok(u64::from(self.log) * per + u64::from(self.seg))
    }

    /// First LSN of the segment.
    pub fn start_lsn(&self, size: SegmentSize) -> Result<Lsn, FormatError> {
        Ok(Lsn(self.segno(size)? * size.bytes()))
    }

    /// The next segment on the same timeline.
    pub fn next(&self, size: SegmentSize) -> Result<Self, FormatError> {
        let next = self.segno(size)? + 1;
        if next / size.segments_per_xlogid() > u64::from(u32::MAX) {
            return Err(FormatError::new(format!(
                "WAL file {self} is the last possible segment"
            )));
        }
        Ok(Self::from_segno(self.tli, next, size))
    }
}

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}{:08X}{:08X}", self.tli.0, self.log, self.seg)
    }
}

/// A WAL archive file name of any of the kinds PostgreSQL and pg_receivewal write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WalSegmentName {
    /// A complete segment, `000000010000000000000003`.
    Segment(SegmentId),
    /// An incomplete segment (end of a timeline, or streamed so far), `…03.partial`.
    Partial(SegmentId),
    /// A backup history file, `…03.00000028.backup` (offset of the backup start in the segment).
    Backup(SegmentId, u32),
    /// A timeline history file, `00000002.history`.
    History(TimelineId),
}

impl WalSegmentName {
    pub fn timeline(&self) -> TimelineId {
        match self {
            WalSegmentName::Segment(s)
            | WalSegmentName::Partial(s)
            | WalSegmentName::Backup(s, _) => s.tli,
            WalSegmentName::History(t) => *t,
        }
    }

    /// The segment this name refers to, if it refers to one.
    pub fn segment(&self) -> Option<SegmentId> {
        match self {
            WalSegmentName::Segment(s)
            | WalSegmentName::Partial(s)
            | WalSegmentName::Backup(s, _) => Some(*s),
            WalSegmentName::History(_) => None,
        }
    }
}

impl fmt::Display for WalSegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalSegmentName::Segment(s) => write!(f, "{s}"),
            WalSegmentName::Partial(s) => write!(f, "{s}.partial"),
            WalSegmentName::Backup(s, off) => write!(f, "{s}.{off:08X}.backup"),
            WalSegmentName::History(t) => write!(f, "{:08X}.history", t.0),
        }
    }
}

fn hex8(s: &str) -> Option<u32> {
    if s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        u32::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

fn parse_segment_id(s: &str) -> Option<SegmentId> {
    // ASCII first: slicing a 24-byte string with multi-byte characters would not fall on
    // character boundaries.
    if s.len() != 24 || !s.is_ascii() {
        return None;
    }
    let tli = TimelineId::new(hex8(&s[0..8])?).ok()?;
    Some(SegmentId {
        tli,
        log: hex8(&s[8..16])?,
        seg: hex8(&s[16..24])?,
    })
}

impl FromStr for WalSegmentName {
    type Err = FormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parsed = if let Some(stem) = s.strip_suffix(".history") {
            hex8(stem)
                .and_then(|t| TimelineId::new(t).ok())
                .map(WalSegmentName::History)
        } else if let Some(stem) = s.strip_suffix(".partial") {
            parse_segment_id(stem).map(WalSegmentName::Partial)
        } else if let Some(stem) = s.strip_suffix(".backup") {
            stem.split_once('.').and_then(|(seg, off)| {
                Some(WalSegmentName::Backup(parse_segment_id(seg)?, hex8(off)?))
            })
        } else {
            parse_segment_id(s).map(WalSegmentName::Segment)
        };
        parsed.ok_or_else(|| FormatError::new(format!("not a WAL file name: {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tli(n: u32) -> TimelineId {
        TimelineId::new(n).unwrap()
    }

    #[test]
    fn names_round_trip() {
        for s in [
            "000000010000000000000003",
            "0000000A00000001000000FF",
            "000000010000000000000003.partial",
            "000000010000000000000003.00000028.backup",
            "00000002.history",
        ] {
            assert_eq!(s.parse::<WalSegmentName>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_non_wal_names() {
        for s in [
            "",
            "00000000000000000000003",
            "0000000100000000000000030",
            "00000001000000000000000G",
            "000000000000000000000003",
            "00000000.history",
            "1.history",
            "000000010000000000000003.backup",
            "000000010000000000000003.partial.tmp",
            "archive_status",
        ] {
            assert!(s.parse::<WalSegmentName>().is_err(), "{s} accepted");
        }
    }

    /// Found by the page_header fuzz target: eight U+FFFD characters are 24 bytes long.
    #[test]
    fn multibyte_name_of_24_bytes_is_rejected_not_a_panic() {
        let s = String::from_utf8_lossy(&[0xff; 8]).into_owned();
        assert_eq!(s.len(), 24);
        assert!(s.parse::<WalSegmentName>().is_err());
        assert!(format!("{s}.partial").parse::<WalSegmentName>().is_err());
        assert!("\u{e9}\u{e9}\u{e9}\u{e9}.history"
            .parse::<WalSegmentName>()
            .is_err());
    }

    #[test]
    fn segno_depends_on_segment_size() {
        let s16 = SegmentSize::DEFAULT;
        let s64 = SegmentSize::new(64 << 20).unwrap();
        let s1g = SegmentSize::new(1 << 30).unwrap();
        let id = SegmentId::from_segno(tli(1), 0x1FF, s16);
        assert_eq!(id.to_string(), "0000000100000001000000FF");
        assert_eq!(id.segno(s16).unwrap(), 0x1FF);
        assert_eq!(id.start_lsn(s16).unwrap(), Lsn(0x1_FF00_0000));
        // 0xFF is out of range with 64 MiB segments (64 per xlogid).
        assert!(id.segno(s64).is_err());
        let id = SegmentId::from_segno(tli(2), 5, s1g);
        assert_eq!(id.to_string(), "000000020000000100000001");
        assert_eq!(id.start_lsn(s1g).unwrap(), Lsn(5 << 30));
        let last = SegmentId::from_segno(tli(1), 0xFF, s16);
        assert_eq!(
            last.next(s16).unwrap().to_string(),
            "000000010000000100000000"
        );
        let end = SegmentId {
            tli: tli(1),
            log: u32::MAX,
            seg: 0xFF,
        };
        assert!(end.next(s16).is_err(), "the last segment has no successor");
        let c = SegmentId::containing(tli(3), Lsn(0x2_0400_0001), s64);
        assert_eq!(c.to_string(), "000000030000000200000001");
    }
}
