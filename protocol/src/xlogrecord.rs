//! WAL records (`XLogRecord` in xlogrecord.h) walked page by page, each one's CRC-32C checked,
//! as PostgreSQL's xlogreader.c reads them: `ValidXLogRecordHeader` (length, `xl_prev`),
//! `ValidXLogRecord` (the CRC over the record's data, then its header up to `xl_crc`), and the
//! continuation rules of `XLogDecodeNextRecord` (a record spans pages and segments; each page
//! it continues on carries `XLP_FIRST_IS_CONTRECORD` and the bytes still to come in
//! `xlp_rem_len`).
//!
//! [`RecordWalker`] takes pages in LSN order and keeps only a record's 24-byte header and a
//! running CRC, so memory does not depend on record or segment size. Page headers themselves
//! are checked by [`crate::xlog::validate_pages`]; the walker only reads their flags.

use crate::error::FormatError;
use crate::lsn::{Lsn, SegmentSize, XLOG_BLCKSZ};
use crate::xlog::{
    XLogPageHeader, LONG_HEADER_LEN, SHORT_HEADER_LEN, XLP_FIRST_IS_CONTRECORD,
    XLP_FIRST_IS_OVERWRITE_CONTRECORD,
};

/// `SizeOfXLogRecord`.
pub const SIZE_OF_XLOG_RECORD: usize = 24;
/// `offsetof(XLogRecord, xl_crc)`: the CRC covers the header up to here.
const CRC_OFFSET: usize = 20;
/// `RM_XLOG_ID` and its `XLOG_SWITCH` info: the rest of the segment is unused.
const RM_XLOG_ID: u8 = 0;
const XLOG_SWITCH: u8 = 0x40;
/// `XLR_RMGR_INFO_MASK`.
const RMGR_INFO_MASK: u8 = 0xF0;
/// No record is longer (`XLogRecordMaxSize`, PostgreSQL 16; older servers allocate at most
/// about 1 GB too): a larger `xl_tot_len` is garbage, not a record.
const MAX_RECORD_LEN: u32 = 1020 * 1024 * 1024;

/// `MAXALIGN` (8 on every platform PostgreSQL supports that walhoard runs on).
fn maxalign(n: usize) -> usize {
    (n + 7) & !7
}

/// Where the walker is.
// One walker per chain, moved between states per record: boxing the large variant would
// allocate for every record that spans a page.
#[allow(clippy::large_enum_variant)]
enum State {
    /// Not at a known record boundary (the walk's first page, or after a gap or an error):
    /// the continuation at the start of the next page is skipped, then records are read.
    Unsynced,
    /// The next record starts at the current position.
    Between,
    /// Inside the record that starts at `start`.
    InRecord(Partial),
    /// After an `XLOG_SWITCH` record: nothing more until the next segment.
    Switched,
    /// The WAL ended (zeros where a record should start) at this position.
    Ended(Lsn),
}

struct Partial {
    start: Lsn,
    header: [u8; SIZE_OF_XLOG_RECORD],
    /// Header bytes collected so far.
    have: usize,
    tot_len: u32,
    /// Bytes of the record (header included) consumed so far.
    got: u32,
    /// CRC-32C over the data after the header, so far.
    crc: crc_fast::Digest,
}

/// Walks WAL records across pages and segments; see the module comment.
pub struct RecordWalker {
    seg_size: SegmentSize,
    state: State,
    /// Start of the last complete record: the next one's `xl_prev` must equal it.
    prev: Option<Lsn>,
    /// End of the last record that checked.
    valid_end: Option<Lsn>,
    /// Records checked.
    pub records: u64,
}

impl RecordWalker {
    pub fn new(seg_size: SegmentSize) -> Self {
        RecordWalker {
            seg_size,
            state: State::Unsynced,
            prev: None,
            valid_end: None,
            records: 0,
        }
    }

    /// Forgets the record in progress: the next page is not a continuation of what came
    /// before (a missing segment, a segment that could not be read).
    pub fn reset(&mut self) {
        self.state = State::Unsynced;
        self.prev = None;
    }

    /// End of the last record whose CRC checked.
    pub fn valid_end(&self) -> Option<Lsn> {
        self.valid_end
    }

    /// Where the WAL ended inside the pages walked so far (zeros where a record should
    /// start, no `XLOG_SWITCH` before them), if it did.
    pub fn ended_at(&self) -> Option<Lsn> {
        match self.state {
            State::Ended(at) => Some(at),
            _ => None,
        }
    }

    /// Whether the walk stopped inside a record (its rest is on later pages).
    pub fn in_record(&self) -> bool {
        matches!(self.state, State::InRecord(_))
    }

    /// Walks the records on the page at `addr` (page aligned, one `XLOG_BLCKSZ` page). An
    /// error names the record's LSN; the walker then skips to the next record boundary it can
    /// find, so a later call may report further problems.
    pub fn page(&mut self, addr: Lsn, page: &[u8]) -> Result<(), FormatError> {
        let r = self.walk_page(addr, page);
        if r.is_err() {
            self.state = State::Unsynced;
            self.prev = None;
        }
        r
    }

    fn walk_page(&mut self, addr: Lsn, page: &[u8]) -> Result<(), FormatError> {
        if page.len() != XLOG_BLCKSZ || addr.page_offset() != 0 {
            return Err(FormatError::new(format!(
                "WAL page at {addr}: {} bytes, not one aligned {XLOG_BLCKSZ}-byte page",
                page.len()
            )));
        }
        let segment_start = addr.segment_offset(self.seg_size) == 0;
        if segment_start && matches!(self.state, State::Switched) {
            self.state = State::Between;
        }
        if page.iter().all(|b| *b == 0) {
            // validate_pages allows an unwritten tail only at the end of the data.
            return match &self.state {
                State::InRecord(p) => Err(FormatError::new(format!(
                    "record at {} continues at {addr}, but that page is empty",
                    p.start
                ))),
                State::Between => {
                    self.state = State::Ended(addr);
                    Ok(())
                }
                _ => Ok(()),
            };
        }
        if matches!(self.state, State::Switched | State::Ended(_)) {
            if !segment_start {
                return match self.state {
                    State::Ended(at) => Err(FormatError::new(format!(
                        "WAL ended at {at} (no record there), but the page at {addr} holds data"
                    ))),
                    _ => Ok(()),
                };
            }
            self.state = State::Unsynced;
        }
        let h = XLogPageHeader::parse(page)
            .map_err(|e| FormatError::new(format!("WAL page at {addr}: {e}")))?;
        let mut pos = if h.long.is_some() {
            LONG_HEADER_LEN
        } else {
            SHORT_HEADER_LEN
        };
        let contrecord = h.info & XLP_FIRST_IS_CONTRECORD != 0;
        match std::mem::replace(&mut self.state, State::Unsynced) {
            State::InRecord(p) if !contrecord => {
                if h.info & XLP_FIRST_IS_OVERWRITE_CONTRECORD == 0 {
                    return Err(FormatError::new(format!(
                        "record at {} continues at {addr}, but that page has no contrecord flag",
                        p.start
                    )));
                }
                // The server abandoned the record after a crash (`XLOG_OVERWRITE_CONTRECORD`
                // follows): so does the reader.
                self.prev = None;
                self.state = State::Between;
            }
            State::InRecord(p) => {
                let remaining = p.tot_len - p.got;
                if h.rem_len != remaining {
                    return Err(FormatError::new(format!(
                        "record at {}: invalid contrecord length {} at {addr}, {remaining} bytes were expected",
                        p.start, h.rem_len
                    )));
                }
                match self.feed(p, page, pos)? {
                    Some(next) => pos = next,
                    None => return Ok(()),
                }
            }
            State::Unsynced if contrecord => {
                // The rest of a record that began before the walk: its start is not here.
                let rem = h.rem_len as usize;
                if rem > page.len() - pos {
                    return Ok(());
                }
                pos = maxalign(pos + rem);
                self.state = State::Between;
            }
            State::Between if contrecord => {
                return Err(FormatError::new(format!(
                    "WAL page at {addr} continues a record ({} bytes), but the previous record ended on the page before",
                    h.rem_len
                )));
            }
            _ => self.state = State::Between,
        }
        self.records_from(addr, page, pos)
    }

    /// Reads records from `pos` to the end of the page, `self.state` being `Between`.
    fn records_from(&mut self, addr: Lsn, page: &[u8], mut pos: usize) -> Result<(), FormatError> {
        while pos < page.len() && matches!(self.state, State::Between) {
            let start = addr + pos as u64;
            // Records are MAXALIGNed, so xl_tot_len is never split across pages.
            let tot_len =
                u32::from_le_bytes([page[pos], page[pos + 1], page[pos + 2], page[pos + 3]]);
            if tot_len == 0 {
                // Nothing was written here: the end of the WAL, unless more follows.
                if let Some(off) = page[pos..].iter().position(|b| *b != 0) {
                    return Err(FormatError::new(format!(
                        "invalid record length at {start}: 0, yet data follows at {}",
                        start + off as u64
                    )));
                }
                self.state = State::Ended(start);
                return Ok(());
            }
            if (tot_len as usize) < SIZE_OF_XLOG_RECORD || tot_len > MAX_RECORD_LEN {
                return Err(FormatError::new(format!(
                    "invalid record length at {start}: expected at least {SIZE_OF_XLOG_RECORD}, got {tot_len}"
                )));
            }
            let p = Partial {
                start,
                header: [0; SIZE_OF_XLOG_RECORD],
                have: 0,
                tot_len,
                got: 0,
                crc: crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi),
            };
            match self.feed(p, page, pos)? {
                Some(next) => pos = next,
                None => return Ok(()),
            }
        }
        Ok(())
    }

    /// Feeds record `p` the bytes of `page` from `pos`: the position after it (MAXALIGNed)
    /// once it is complete and checked, `None` when it continues on the next page (it is then
    /// the walker's state).
    fn feed(
        &mut self,
        mut p: Partial,
        page: &[u8],
        pos: usize,
    ) -> Result<Option<usize>, FormatError> {
        let n = ((p.tot_len - p.got) as usize).min(page.len() - pos);
        p.take(&page[pos..pos + n]);
        if p.got < p.tot_len {
            self.state = State::InRecord(p);
            return Ok(None);
        }
        self.finish(p)?;
        Ok(Some(maxalign(pos + n)))
    }

    /// Checks a complete record (`ValidXLogRecordHeader`, `ValidXLogRecord`).
    fn finish(&mut self, p: Partial) -> Result<(), FormatError> {
        let h = &p.header;
        let xl_prev = Lsn(u64::from_le_bytes([
            h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15],
        ]));
        if let Some(prev) = self.prev {
            if xl_prev != prev {
                return Err(FormatError::new(format!(
                    "record with incorrect prev-link {xl_prev} at {}, {prev} was expected",
                    p.start
                )));
            }
        }
        let stored = u32::from_le_bytes([h[20], h[21], h[22], h[23]]);
        let mut crc = p.crc;
        crc.update(&h[..CRC_OFFSET]);
        let computed = crc.finalize() as u32;
        if computed != stored {
            return Err(FormatError::new(format!(
                "incorrect resource manager data checksum in record at {}: CRC-32C {computed:08X}, the record says {stored:08X}",
                p.start
            )));
        }
        self.records += 1;
        self.prev = Some(p.start);
        self.valid_end = Some(p.start + u64::from(p.tot_len));
        let (info, rmid) = (h[16], h[17]);
        self.state = if rmid == RM_XLOG_ID && info & RMGR_INFO_MASK == XLOG_SWITCH {
            State::Switched
        } else {
            State::Between
        };
        Ok(())
    }
}

impl Partial {
    /// Takes the next bytes of the record: header first, then data into the CRC.
    fn take(&mut self, mut bytes: &[u8]) {
        if self.have < SIZE_OF_XLOG_RECORD {
            let n = (SIZE_OF_XLOG_RECORD - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            self.got += n as u32;
        }
        self.crc.update(bytes);
        self.got += bytes.len() as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xlog::XLP_LONG_HEADER;

    const SEG: u64 = 16 << 20;

    /// A record of `len` bytes with a correct CRC and `prev` link.
    fn record(len: usize, prev: u64, fill: u8) -> Vec<u8> {
        let mut r = vec![fill; len];
        r[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        r[8..16].copy_from_slice(&prev.to_le_bytes());
        r[16] = 0;
        r[17] = 1; // RM_XACT_ID
        let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
        d.update(&r[SIZE_OF_XLOG_RECORD..]);
        d.update(&r[..CRC_OFFSET]);
        let crc = d.finalize() as u32;
        r[20..24].copy_from_slice(&crc.to_le_bytes());
        r
    }

    /// Lays `records` out as PostgreSQL does from the start of a segment at `base`: page
    /// headers, continuation flags and `xlp_rem_len`, MAXALIGN padding. Returns the pages
    /// and each record's LSN.
    fn lay_out(base: u64, records: &[Vec<u8>], pages: usize) -> (Vec<u8>, Vec<u64>) {
        let mut out = vec![0u8; pages * XLOG_BLCKSZ];
        let mut starts = Vec::new();
        let mut pos = 0usize;
        let header = |out: &mut Vec<u8>, page: usize, rem: u32| {
            let o = page * XLOG_BLCKSZ;
            let long = (base + o as u64) % SEG == 0;
            let mut info = if rem > 0 { XLP_FIRST_IS_CONTRECORD } else { 0 };
            if long {
                info |= XLP_LONG_HEADER;
            }
            out[o..o + 2].copy_from_slice(&0xD110u16.to_le_bytes());
            out[o + 2..o + 4].copy_from_slice(&info.to_le_bytes());
            out[o + 4..o + 8].copy_from_slice(&1u32.to_le_bytes());
            out[o + 8..o + 16].copy_from_slice(&(base + o as u64).to_le_bytes());
            out[o + 16..o + 20].copy_from_slice(&rem.to_le_bytes());
            if long {
                out[o + 32..o + 36].copy_from_slice(&(SEG as u32).to_le_bytes());
                out[o + 36..o + 40].copy_from_slice(&(XLOG_BLCKSZ as u32).to_le_bytes());
                LONG_HEADER_LEN
            } else {
                SHORT_HEADER_LEN
            }
        };
        pos += header(&mut out, 0, 0);
        for r in records {
            starts.push(base + pos as u64);
            let mut left = &r[..];
            loop {
                let room = XLOG_BLCKSZ - pos % XLOG_BLCKSZ;
                let n = room.min(left.len());
                out[pos..pos + n].copy_from_slice(&left[..n]);
                pos += n;
                left = &left[n..];
                if pos % XLOG_BLCKSZ == 0 {
                    let page = pos / XLOG_BLCKSZ;
                    pos += header(&mut out, page, left.len() as u32);
                }
                if left.is_empty() {
                    break;
                }
            }
            pos = maxalign(pos);
        }
        (out, starts)
    }

    fn walk(data: &[u8], base: u64) -> (RecordWalker, Vec<String>) {
        let mut w = RecordWalker::new(SegmentSize::new(SEG).unwrap());
        let mut errors = Vec::new();
        for (i, page) in data.chunks(XLOG_BLCKSZ).enumerate() {
            if let Err(e) = w.page(Lsn(base + (i * XLOG_BLCKSZ) as u64), page) {
                errors.push(e.to_string());
            }
        }
        (w, errors)
    }

    fn chain(base: u64, lens: &[usize]) -> Vec<Vec<u8>> {
        // The prev links need the layout: lay out once for the starts, then again.
        let plain: Vec<Vec<u8>> = lens.iter().map(|l| record(*l, 0, 0x5A)).collect();
        let (_, starts) = lay_out(base, &plain, 8);
        lens.iter()
            .enumerate()
            .map(|(i, l)| record(*l, if i == 0 { 0 } else { starts[i - 1] }, 0x5A))
            .collect()
    }

    #[test]
    fn records_across_pages_pass_and_are_counted() {
        let base = 0x300_0000;
        // Short records, one header split across a page edge, one spanning three pages.
        let lens = [100, 8000, 60, 20_000, 30, 8152, 77];
        let recs = chain(base, &lens);
        let (data, starts) = lay_out(base, &recs, 8);
        let (w, errors) = walk(&data, base);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(w.records, lens.len() as u64);
        assert_eq!(
            w.valid_end(),
            Some(Lsn(starts[6] + 77)),
            "the last record's end"
        );
        assert_eq!(
            w.ended_at(),
            Some(Lsn(maxalign((starts[6] + 77) as usize) as u64))
        );
    }

    #[test]
    fn a_header_split_across_pages_is_read_whole() {
        let base = 0x300_0000;
        // 40 + 8144 = 8184: the second record's header has 8 bytes on the first page.
        let recs = chain(base, &[8144, 100, 50]);
        let (data, starts) = lay_out(base, &recs, 2);
        assert_eq!(starts[1] % XLOG_BLCKSZ as u64, 8184);
        let (w, errors) = walk(&data, base);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(w.records, 3);
        // Its CRC covers the header bytes of both pages: one changed on the second page counts.
        let mut bad = data.clone();
        bad[XLOG_BLCKSZ + SHORT_HEADER_LEN + 8] ^= 0x01; // xl_info, header byte 16
        let (_, errors) = walk(&bad, base);
        assert!(
            errors[0].contains("checksum") && errors[0].contains(&Lsn(starts[1]).to_string()),
            "{errors:?}"
        );
    }

    #[test]
    fn a_flipped_data_byte_is_a_crc_error_naming_the_record() {
        let base = 0x300_0000;
        let recs = chain(base, &[100, 20_000, 50]);
        let (mut data, starts) = lay_out(base, &recs, 8);
        // A byte of the long record's data on its second page.
        let at = (starts[1] - base) as usize + 9000;
        data[at] ^= 0x01;
        let (w, errors) = walk(&data, base);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("incorrect resource manager data checksum")
                && errors[0].contains(&Lsn(starts[1]).to_string()),
            "{errors:?}"
        );
        assert_eq!(w.records, 1, "the record before the broken one checked");
    }

    #[test]
    fn a_broken_prev_link_or_length_is_refused() {
        let base = 0x300_0000;
        let mut recs = chain(base, &[100, 200]);
        recs[1] = record(200, 0x1234, 0x5A);
        let (data, _) = lay_out(base, &recs, 2);
        let (_, errors) = walk(&data, base);
        assert!(
            errors[0].contains("incorrect prev-link 0/1234"),
            "{errors:?}"
        );

        let recs = chain(base, &[100, 200]);
        let (mut data, starts) = lay_out(base, &recs, 2);
        let at = (starts[1] - base) as usize;
        data[at..at + 4].copy_from_slice(&10u32.to_le_bytes());
        let (_, errors) = walk(&data, base);
        assert!(errors[0].contains("invalid record length"), "{errors:?}");
    }

    #[test]
    fn a_wrong_contrecord_length_is_refused() {
        let base = 0x300_0000;
        let recs = chain(base, &[20_000]);
        let (mut data, _) = lay_out(base, &recs, 4);
        data[XLOG_BLCKSZ + 16..XLOG_BLCKSZ + 20].copy_from_slice(&5u32.to_le_bytes());
        let (_, errors) = walk(&data, base);
        assert!(
            errors[0].contains("invalid contrecord length 5"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_walk_starting_inside_a_record_skips_its_rest() {
        let base = 0x300_0000;
        let recs = chain(base, &[20_000, 100, 100]);
        let (data, _) = lay_out(base, &recs, 4);
        // Start on the second page: the first record's rest is skipped, the others checked.
        let (w, errors) = walk(&data[XLOG_BLCKSZ..], base + XLOG_BLCKSZ as u64);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(w.records, 2);
    }

    #[test]
    fn after_xlog_switch_the_rest_of_the_segment_is_skipped() {
        let base = 0x300_0000;
        let mut recs = chain(base, &[100, 24]);
        // Make the second an XLOG_SWITCH (rmid 0, info 0x40) with a correct CRC.
        let r = &mut recs[1];
        r[16] = XLOG_SWITCH;
        r[17] = RM_XLOG_ID;
        let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
        d.update(&r[..CRC_OFFSET]);
        let crc = d.finalize() as u32;
        r[20..24].copy_from_slice(&crc.to_le_bytes());
        let (data, _) = lay_out(base, &recs, 3);
        let (w, errors) = walk(&data, base);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(w.records, 2);
        assert_eq!(w.ended_at(), None, "a switch is not an early end");
    }
}
