//! WAL page headers (`XLogPageHeaderData`, `XLogLongPageHeaderData` in xlog_internal.h) and
//! the checks a received segment must pass before it may be archived as good.
//!
//! WAL is written in the server's byte order; walhoard, like PostgreSQL's own frontend tools,
//! only handles little-endian servers.

use crate::error::FormatError;
pub use crate::lsn::XLOG_BLCKSZ;
use crate::lsn::{Lsn, SegmentSize, TimelineId};

/// `SizeOfXLogShortPHD`: MAXALIGN(sizeof(XLogPageHeaderData)).
pub const SHORT_HEADER_LEN: usize = 24;
/// `SizeOfXLogLongPHD`: MAXALIGN(sizeof(XLogLongPageHeaderData)).
pub const LONG_HEADER_LEN: usize = 40;

pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
pub const XLP_LONG_HEADER: u16 = 0x0002;
pub const XLP_BKP_REMOVABLE: u16 = 0x0004;
/// PostgreSQL 15 and later (also back-patched to minor releases of 10..14).
pub const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
pub const XLP_ALL_FLAGS: u16 = 0x000F;

/// `XLOG_PAGE_MAGIC` of each supported major version.
pub const PAGE_MAGICS: &[(u32, u16)] = &[
    (13, 0xD106),
    (14, 0xD10D),
    (15, 0xD110),
    (16, 0xD113),
    (17, 0xD116),
    (18, 0xD118),
];

/// The page magic a server of `major` version writes, if walhoard supports that version.
pub fn page_magic_for(major: u32) -> Option<u16> {
    PAGE_MAGICS
        .iter()
        .find(|(m, _)| *m == major)
        .map(|(_, magic)| *magic)
}

/// The major version that writes `magic`.
pub fn major_for_page_magic(magic: u16) -> Option<u32> {
    PAGE_MAGICS
        .iter()
        .find(|(_, m)| *m == magic)
        .map(|(major, _)| *major)
}

/// A parsed WAL page header; `long` is present on the first page of every segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XLogPageHeader {
    pub magic: u16,
    pub info: u16,
    /// Timeline of the first record on the page.
    pub tli: TimelineId,
    /// WAL position of this page's first byte.
    pub pageaddr: Lsn,
    /// Bytes of a record continued from the previous page.
    pub rem_len: u32,
    pub long: Option<XLogLongHeader>,
}

/// The extra fields of the first page of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XLogLongHeader {
    pub system_id: u64,
    pub seg_size: u32,
    pub xlog_blcksz: u32,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl XLogPageHeader {
    /// Parses the header at the start of `page`. Only the layout is checked here; use
    /// [`XLogPageHeader::validate`] for the checks against what the page should be.
    pub fn parse(page: &[u8]) -> Result<Self, FormatError> {
        if page.len() < SHORT_HEADER_LEN {
            return Err(FormatError::new(format!(
                "WAL page header needs {SHORT_HEADER_LEN} bytes, got {}",
                page.len()
            )));
        }
        let info = u16_at(page, 2);
        let tli = TimelineId::new(u32_at(page, 4))
            .map_err(|_| FormatError::new("WAL page header has timeline 0"))?;
        let long = if info & XLP_LONG_HEADER != 0 {
            if page.len() < LONG_HEADER_LEN {
                return Err(FormatError::new(format!(
                    "WAL long page header needs {LONG_HEADER_LEN} bytes, got {}",
                    page.len()
                )));
            }
            Some(XLogLongHeader {
                system_id: u64_at(page, 24),
                seg_size: u32_at(page, 32),
                xlog_blcksz: u32_at(page, 36),
            })
        } else {
            None
        };
        Ok(XLogPageHeader {
            magic: u16_at(page, 0),
            info,
            tli,
            pageaddr: Lsn(u64_at(page, 8)),
            rem_len: u32_at(page, 16),
            long,
        })
    }

    /// Checks this header against what the page at `expected_addr` must hold, as
    /// `XLogReaderValidatePageHeader` does.
    pub fn validate(
        &self,
        expect: &PageExpectation,
        expected_addr: Lsn,
    ) -> Result<(), FormatError> {
        let at = |msg: String| FormatError::new(format!("WAL page at {expected_addr}: {msg}"));
        if self.magic != expect.magic {
            return Err(at(format!(
                "magic {:#06X} where {:#06X} was expected (PostgreSQL {})",
                self.magic,
                expect.magic,
                major_for_page_magic(expect.magic).map_or("?".to_string(), |m| m.to_string())
            )));
        }
        if self.info & !XLP_ALL_FLAGS != 0 {
            return Err(at(format!("invalid info bits {:#06X}", self.info)));
        }
        if self.pageaddr != expected_addr {
            return Err(at(format!("page address is {}", self.pageaddr)));
        }
        let first_in_segment = expected_addr.segment_offset(expect.seg_size) == 0;
        match (&self.long, first_in_segment) {
            (None, true) => return Err(at("first page of a segment lacks the long header".into())),
            (Some(_), false) => {
                return Err(at(
                    "long header on a page that does not start a segment".into()
                ))
            }
            (Some(long), true) => {
                if let Some(sysid) = expect.system_id {
                    if long.system_id != sysid {
                        return Err(at(format!(
                            "system identifier {} where {sysid} was expected",
                            long.system_id
                        )));
                    }
                }
                if u64::from(long.seg_size) != expect.seg_size.bytes() {
                    return Err(at(format!(
                        "segment size {} where {} was expected",
                        long.seg_size,
                        expect.seg_size.bytes()
                    )));
                }
                if long.xlog_blcksz as usize != XLOG_BLCKSZ {
                    return Err(at(format!("WAL block size {}", long.xlog_blcksz)));
                }
            }
            (None, false) => {}
        }
        if let Some(max_tli) = expect.max_tli {
            if self.tli > max_tli {
                return Err(at(format!("timeline {} is later than {max_tli}", self.tli)));
            }
        }
        Ok(())
    }
}

/// What the pages of a segment are checked against.
#[derive(Clone, Debug)]
pub struct PageExpectation {
    pub magic: u16,
    pub seg_size: SegmentSize,
    /// System identifier from IDENTIFY_SYSTEM; not checked when unknown.
    pub system_id: Option<u64>,
    /// The page's timeline may be earlier (records before a switch) but never later than this.
    pub max_tli: Option<TimelineId>,
}

/// Validates every page header of `data`, which holds WAL starting at `start` (page aligned).
/// With `allow_zero_tail`, the data may end in all-zero pages: the unwritten tail of a partial
/// segment, or what follows an XLOG_SWITCH record. Non-zero bytes after such a page are an error,
/// and so is an all-zero first page of a segment: PostgreSQL begins every segment with a long
/// page header (`XLP_LONG_HEADER`, system identifier, segment size, block size; see
/// `XLogReaderValidatePageHeader`), so a segment of zeros is no WAL at all, never a short one.
pub fn validate_pages(
    data: &[u8],
    start: Lsn,
    expect: &PageExpectation,
    allow_zero_tail: bool,
) -> Result<(), FormatError> {
    if start.page_offset() != 0 {
        return Err(FormatError::new(format!(
            "WAL check must start on a page boundary, not {start}"
        )));
    }
    for (i, page) in data.chunks(XLOG_BLCKSZ).enumerate() {
        let addr = start + (i * XLOG_BLCKSZ) as u64;
        if allow_zero_tail && page.iter().all(|b| *b == 0) {
            if addr.segment_offset(expect.seg_size) == 0 {
                return Err(FormatError::new(format!(
                    "WAL page at {addr} is empty (all zeros), but the first page of a segment must carry a long page header"
                )));
            }
            let rest = &data[i * XLOG_BLCKSZ..];
            return match rest.iter().position(|b| *b != 0) {
                None => Ok(()),
                Some(p) => Err(FormatError::new(format!(
                    "WAL at {} follows an empty page at {addr}",
                    addr + p as u64
                ))),
            };
        }
        XLogPageHeader::parse(page)
            .map_err(|e| FormatError::new(format!("WAL page at {addr}: {e}")))?
            .validate(expect, addr)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a page header as PostgreSQL lays it out in memory (little-endian, MAXALIGNed).
    pub(crate) fn page(
        magic: u16,
        info: u16,
        tli: u32,
        addr: u64,
        long: Option<(u64, u32)>,
    ) -> Vec<u8> {
        let mut p = vec![0u8; XLOG_BLCKSZ];
        p[0..2].copy_from_slice(&magic.to_le_bytes());
        p[2..4].copy_from_slice(&info.to_le_bytes());
        p[4..8].copy_from_slice(&tli.to_le_bytes());
        p[8..16].copy_from_slice(&addr.to_le_bytes());
        p[16..20].copy_from_slice(&7u32.to_le_bytes());
        if let Some((sysid, seg)) = long {
            p[24..32].copy_from_slice(&sysid.to_le_bytes());
            p[32..36].copy_from_slice(&seg.to_le_bytes());
            p[36..40].copy_from_slice(&(XLOG_BLCKSZ as u32).to_le_bytes());
        }
        p
    }

    fn expect() -> PageExpectation {
        PageExpectation {
            magic: 0xD110,
            seg_size: SegmentSize::DEFAULT,
            system_id: Some(42),
            max_tli: Some(TimelineId(2)),
        }
    }

    #[test]
    fn parses_long_header() {
        let p = page(0xD110, XLP_LONG_HEADER, 1, 0x100_0000, Some((42, 16 << 20)));
        let h = XLogPageHeader::parse(&p).unwrap();
        assert_eq!(h.magic, 0xD110);
        assert_eq!(h.tli, TimelineId(1));
        assert_eq!(h.pageaddr, Lsn(0x100_0000));
        assert_eq!(h.rem_len, 7);
        assert_eq!(
            h.long,
            Some(XLogLongHeader {
                system_id: 42,
                seg_size: 16 << 20,
                xlog_blcksz: 8192
            })
        );
        h.validate(&expect(), Lsn(0x100_0000)).unwrap();
    }

    #[test]
    fn validation_failures_name_the_problem() {
        let e = expect();
        let cases: Vec<(Vec<u8>, u64, &str)> = vec![
            (
                page(0xD106, XLP_LONG_HEADER, 1, 0x100_0000, Some((42, 16 << 20))),
                0x100_0000,
                "magic",
            ),
            (
                page(0xD110, XLP_LONG_HEADER, 1, 0x200_0000, Some((42, 16 << 20))),
                0x100_0000,
                "page address",
            ),
            (
                page(0xD110, XLP_LONG_HEADER, 1, 0x100_0000, Some((43, 16 << 20))),
                0x100_0000,
                "system identifier",
            ),
            (
                page(0xD110, XLP_LONG_HEADER, 1, 0x100_0000, Some((42, 64 << 20))),
                0x100_0000,
                "segment size",
            ),
            (
                page(0xD110, 0, 1, 0x100_0000, None),
                0x100_0000,
                "lacks the long header",
            ),
            (
                page(0xD110, XLP_LONG_HEADER, 1, 0x100_2000, Some((42, 16 << 20))),
                0x100_2000,
                "does not start",
            ),
            (
                page(0xD110, 0, 3, 0x100_2000, None),
                0x100_2000,
                "timeline 3",
            ),
            (
                page(0xD110, 0x10, 1, 0x100_2000, None),
                0x100_2000,
                "info bits",
            ),
        ];
        for (p, addr, want) in cases {
            let err = XLogPageHeader::parse(&p)
                .unwrap()
                .validate(&e, Lsn(addr))
                .unwrap_err();
            assert!(
                err.to_string().contains(want),
                "{err} should mention {want}"
            );
        }
    }

    #[test]
    fn short_input_is_an_error_not_a_panic() {
        assert!(XLogPageHeader::parse(&[0u8; 10]).is_err());
        let mut p = page(0xD110, XLP_LONG_HEADER, 1, 0, None);
        p.truncate(30);
        assert!(XLogPageHeader::parse(&p).is_err());
        assert!(XLogPageHeader::parse(&[0u8; 24]).is_err(), "timeline 0");
    }

    #[test]
    fn validates_a_segment_with_zero_tail() {
        let mut data = page(0xD110, XLP_LONG_HEADER, 1, 0x100_0000, Some((42, 16 << 20)));
        data.extend(page(0xD110, XLP_FIRST_IS_CONTRECORD, 1, 0x100_2000, None));
        data.extend(vec![0u8; XLOG_BLCKSZ]);
        validate_pages(&data, Lsn(0x100_0000), &expect(), true).unwrap();
        assert!(validate_pages(&data, Lsn(0x100_0000), &expect(), false).is_err());
        let mut hole = data.clone();
        hole.extend(page(0xD110, 0, 1, 0x100_6000, None));
        let err = validate_pages(&hole, Lsn(0x100_0000), &expect(), true).unwrap_err();
        assert!(err.to_string().contains("follows an empty page"), "{err}");
        assert!(validate_pages(&data, Lsn(0x100_0001), &expect(), true).is_err());
    }

    /// Issue 14 item 7: a segment of zeros passed as "a segment with a zero tail" and was
    /// archived; the first page of a segment must hold a long header.
    #[test]
    fn zero_first_page_of_a_segment_is_refused() {
        let zeros = vec![0u8; 4 * XLOG_BLCKSZ];
        let err = validate_pages(&zeros, Lsn(0x100_0000), &expect(), true).unwrap_err();
        assert!(err.to_string().contains("first page of a segment"), "{err}");
        assert!(err.to_string().contains("0/1000000"), "{err}");
        // A zero page later in a segment is still a valid (unwritten) tail.
        validate_pages(&zeros, Lsn(0x100_2000), &expect(), true).unwrap();
    }

    #[test]
    fn magic_table() {
        assert_eq!(page_magic_for(15), Some(0xD110));
        assert_eq!(major_for_page_magic(0xD116), Some(17));
        assert_eq!(page_magic_for(12), None);
    }
}
