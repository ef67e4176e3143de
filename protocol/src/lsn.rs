//! WAL positions, timelines, segment sizes and PostgreSQL timestamps.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::FormatError;

/// WAL page size (`XLOG_BLCKSZ`); every supported server uses the default.
pub const XLOG_BLCKSZ: usize = 8192;

/// A position in the write-ahead log (`XLogRecPtr`), printed as PostgreSQL does: `X/X` in hex.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `InvalidXLogRecPtr`.
    pub const INVALID: Lsn = Lsn(0);

    pub fn is_valid(self) -> bool {
        self.0 != 0
    }

    /// Segment number containing this position (`XLByteToSeg`).
    pub fn segment_number(self, seg: SegmentSize) -> u64 {
        self.0 / seg.bytes()
    }

    /// Offset of this position inside its segment (`XLogSegmentOffset`).
    pub fn segment_offset(self, seg: SegmentSize) -> u64 {
        self.0 % seg.bytes()
    }

    /// Start of the segment containing this position.
    pub fn segment_start(self, seg: SegmentSize) -> Lsn {
        self - self.segment_offset(seg)
    }

    /// Offset of this position inside its WAL page.
    pub fn page_offset(self) -> u64 {
        self.0 % XLOG_BLCKSZ as u64
    }

    pub fn checked_add(self, n: u64) -> Option<Lsn> {
        self.0.checked_add(n).map(Lsn)
    }

    /// Number of bytes from `earlier` to `self`, zero when `earlier` is later.
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// `lsn + bytes`: the position that many bytes further on.
impl std::ops::Add<u64> for Lsn {
    type Output = Lsn;
    fn add(self, bytes: u64) -> Lsn {
        Lsn(self.0 + bytes)
    }
}

impl std::ops::AddAssign<u64> for Lsn {
    fn add_assign(&mut self, bytes: u64) {
        self.0 += bytes;
    }
}

/// `lsn - bytes`: the position that many bytes before.
impl std::ops::Sub<u64> for Lsn {
    type Output = Lsn;
    fn sub(self, bytes: u64) -> Lsn {
        Lsn(self.0 - bytes)
    }
}

/// `end - start`: the number of bytes between two positions (`end` must not be before `start`).
impl std::ops::Sub<Lsn> for Lsn {
    type Output = u64;
    fn sub(self, start: Lsn) -> u64 {
        self.0 - start.0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl FromStr for Lsn {
    type Err = FormatError;

    /// Parses `X/X` as printed by PostgreSQL (`pg_lsn` input).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || FormatError::new(format!("invalid LSN {s:?}: expected hex 'X/X'"));
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(bad());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

/// A timeline id (`TimeLineID`). Timeline 0 does not exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimelineId(pub u32);

impl TimelineId {
    pub fn new(v: u32) -> Result<Self, FormatError> {
        if v == 0 {
            return Err(FormatError::new("timeline 0 is not valid"));
        }
        Ok(TimelineId(v))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// WAL segment size: a power of two from 1 MiB to 1 GiB (`IsValidWalSegSize`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SegmentSize(u64);

impl SegmentSize {
    pub const DEFAULT: SegmentSize = SegmentSize(16 * 1024 * 1024);
    pub const MIN: u64 = 1024 * 1024;
    pub const MAX: u64 = 1024 * 1024 * 1024;

    pub fn new(bytes: u64) -> Result<Self, FormatError> {
        if !bytes.is_power_of_two() || !(Self::MIN..=Self::MAX).contains(&bytes) {
            return Err(FormatError::new(format!(
                "invalid WAL segment size {bytes}: must be a power of two between 1 MiB and 1 GiB"
            )));
        }
        Ok(SegmentSize(bytes))
    }

    /// Parses the value of `SHOW wal_segment_size`, e.g. `16MB` or `1GB`.
    pub fn from_show(value: &str) -> Result<Self, FormatError> {
        let v = value.trim();
        let (num, mult) = if let Some(n) = v.strip_suffix("GB") {
            (n, 1024 * 1024 * 1024)
        } else if let Some(n) = v.strip_suffix("MB") {
            (n, 1024 * 1024)
        } else if let Some(n) = v.strip_suffix("kB") {
            (n, 1024)
        } else {
            (v, 1)
        };
        let n: u64 = num.trim().parse().map_err(|_| {
            FormatError::new(format!("invalid wal_segment_size {value:?} from server"))
        })?;
        let bytes = n.checked_mul(mult).ok_or_else(|| {
            FormatError::new(format!("wal_segment_size {value:?} is out of range"))
        })?;
        Self::new(bytes)
    }

    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Segments per "xlogid" (`XLogSegmentsPerXLogId`): how many segments make up 4 GiB.
    pub fn segments_per_xlogid(self) -> u64 {
        0x1_0000_0000 / self.0
    }
}

impl Default for SegmentSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Microseconds between the Unix epoch and the PostgreSQL epoch (2000-01-01 00:00:00 UTC).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800 * 1_000_000;

/// A PostgreSQL `TimestampTz` as sent on the replication protocol: µs since 2000-01-01 UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    pub fn now() -> Self {
        Self::from_system_time(SystemTime::now())
    }

    pub fn from_system_time(t: SystemTime) -> Self {
        let unix_us = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_micros() as i64,
            Err(e) => -(e.duration().as_micros() as i64),
        };
        PgTimestamp(unix_us - PG_EPOCH_OFFSET_US)
    }

    pub fn to_system_time(self) -> SystemTime {
        let unix_us = self.0 + PG_EPOCH_OFFSET_US;
        if unix_us >= 0 {
            UNIX_EPOCH + Duration::from_micros(unix_us as u64)
        } else {
            UNIX_EPOCH - Duration::from_micros(unix_us.unsigned_abs())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_arithmetic() {
        let a: Lsn = "0/1000000".parse().unwrap();
        assert_eq!(a + 0x10, Lsn(0x1000010));
        assert_eq!(a - 0x10, Lsn(0xFFFFF0));
        assert_eq!((a + 0x10) - a, 0x10);
        let mut b = a;
        b += 7;
        assert_eq!(b, Lsn(0x1000007));
        assert_eq!((a + 0x1234).segment_start(SegmentSize::DEFAULT), a);
    }

    #[test]
    fn lsn_round_trip() {
        for s in [
            "0/0",
            "0/16B3748",
            "1/0",
            "FFFFFFFF/FFFFFFFF",
            "16/B374D848",
        ] {
            assert_eq!(s.parse::<Lsn>().unwrap().to_string(), s);
        }
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap(), Lsn(0x16_B374_D848));
        assert_eq!(" 0/1 ".parse::<Lsn>().unwrap(), Lsn(1));
    }

    #[test]
    fn lsn_rejects_garbage() {
        for s in ["", "0", "/1", "1/", "g/0", "0/123456789", "1/2/3", "-1/0"] {
            assert!(s.parse::<Lsn>().is_err(), "{s} accepted");
        }
    }

    #[test]
    fn segment_maths() {
        let seg = SegmentSize::DEFAULT;
        let l = Lsn(0x1_0300_0010);
        assert_eq!(l.segment_number(seg), 0x103);
        assert_eq!(l.segment_offset(seg), 0x10);
        assert_eq!(l.segment_start(seg), Lsn(0x1_0300_0000));
        assert_eq!(seg.segments_per_xlogid(), 256);
        let big = SegmentSize::new(1 << 30).unwrap();
        assert_eq!(big.segments_per_xlogid(), 4);
        assert_eq!(Lsn(0x8000_0001).segment_number(big), 2);
    }

    #[test]
    fn segment_size_validation() {
        assert!(SegmentSize::new(1 << 20).is_ok());
        assert!(SegmentSize::new(1 << 30).is_ok());
        assert!(SegmentSize::new(1 << 19).is_err());
        assert!(SegmentSize::new(1 << 31).is_err());
        assert!(SegmentSize::new(3 << 20).is_err());
        assert_eq!(SegmentSize::from_show("16MB").unwrap().bytes(), 16 << 20);
        assert_eq!(SegmentSize::from_show("1GB").unwrap().bytes(), 1 << 30);
        assert_eq!(SegmentSize::from_show("64MB").unwrap().bytes(), 64 << 20);
        assert!(SegmentSize::from_show("sixteen").is_err());
    }

    /// Found by the page_header fuzz target: the multiplication overflowed.
    #[test]
    fn huge_wal_segment_size_is_an_error_not_an_overflow() {
        assert!(SegmentSize::from_show("55555550055555MB").is_err());
        assert!(SegmentSize::from_show("18446744073709551615GB").is_err());
    }

    #[test]
    fn pg_epoch() {
        let t = UNIX_EPOCH + Duration::from_secs(946_684_800);
        assert_eq!(PgTimestamp::from_system_time(t), PgTimestamp(0));
        let later = PgTimestamp(1_234_567);
        assert_eq!(PgTimestamp::from_system_time(later.to_system_time()), later);
        let before = PgTimestamp(-5_000_000);
        assert_eq!(
            PgTimestamp::from_system_time(before.to_system_time()),
            before
        );
    }

    #[test]
    fn timeline_zero_rejected() {
        assert!(TimelineId::new(0).is_err());
        assert_eq!(TimelineId::new(3).unwrap().get(), 3);
    }
}
