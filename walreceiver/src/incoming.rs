//! The segment being received: its bytes land in a segment buffer, a spool file or both; it
//! is checked, made durable and handed on complete (or as a `.partial` at a timeline's end).

use std::path::{Path, PathBuf};

use walhoard_protocol::xlog::validate_pages;
use walhoard_protocol::{
    Lsn, PageExpectation, ReplicationStream, SegmentId, SegmentSize, TimelineId, WalSegmentName,
};

use crate::buffers::{SegmentBuffer, SegmentBuffers};
use crate::position::SpoolDurable;
use crate::spool::{write_durable, SegmentFile};
use crate::ReceiverError;

/// Bytes of a spool file verified at once ([`Incoming::verify`]): a multiple of the WAL page.
const VERIFY_PIECE: u64 = 1 << 20;
#[cfg(doc)]
use crate::SpoolSync;

/// Makes the segment being received durable (when the spool is) and records it in `spool`.
pub(crate) fn sync_spool(
    current: &mut Option<Incoming>,
    spool: &mut SpoolDurable,
) -> std::io::Result<()> {
    if let Some(cur) = current.as_mut() {
        if let Some(to) = cur.sync()? {
            spool.extend(cur.start, to);
        }
    }
    Ok(())
}

/// The segment being received: into a segment buffer, into its spool file, or both.
///
/// A buffer alone when the spool is not durable ([`SpoolSync::Auto`] on a server whose slots
/// keep all WAL) and a buffer was free at the segment's first byte: such a file would only
/// ever be read by a daemon restarted in the same boot, which the slot serves as well, and
/// writing it took a fifth of the daemon's CPU in the WAL drain (docs/benchmarks.md). The
/// spool file alone when no buffer was free (the archive is behind: the spool absorbs the
/// backlog, memory stays at `buffers × segment size`). Both when the spool is durable.
pub(crate) struct Incoming {
    pub(crate) id: SegmentId,
    pub(crate) start: Lsn,
    pub(crate) seg_bytes: u64,
    /// Bytes from the segment start that are received.
    pub(crate) written: u64,
    pub(crate) file: Option<SegmentFile>,
    pub(crate) buf: Option<SegmentBuffer>,
    /// The first page's header was checked ([`Incoming::check_first_page`]).
    pub(crate) first_page_checked: bool,
}

impl Incoming {
    #[cfg(test)]
    pub(crate) fn open(
        dir: &Path,
        tli: TimelineId,
        at: Lsn,
        seg: SegmentSize,
        durable: bool,
        buffers: &SegmentBuffers,
    ) -> std::io::Result<Self> {
        Self::open_with(dir, tli, at, seg, durable, buffers, None)
    }

    /// As [`Incoming::open`], into `taken` when the caller already holds a buffer for it.
    pub(crate) fn open_with(
        dir: &Path,
        tli: TimelineId,
        at: Lsn,
        seg: SegmentSize,
        durable: bool,
        buffers: &SegmentBuffers,
        taken: Option<SegmentBuffer>,
    ) -> std::io::Result<Self> {
        let start = at.segment_start(seg);
        // Only a segment received from its first byte is whole in memory.
        let buf = match taken {
            Some(b) if at == start => Some(b),
            _ if at == start => buffers.try_take(seg.bytes() as usize),
            _ => None,
        };
        let file = if durable || buf.is_none() {
            Some(SegmentFile::open(dir, tli, at, seg, durable)?)
        } else {
            None
        };
        Ok(Incoming {
            id: SegmentId::containing(tli, at, seg),
            start,
            seg_bytes: seg.bytes(),
            written: at.segment_offset(seg),
            file,
            buf,
            // Received from the middle: the first page came in an earlier session and is
            // checked with the whole segment.
            first_page_checked: at != start,
        })
    }

    /// Checks the segment's first page header (its long header) as soon as it is received, so
    /// that a segment that is no WAL (zeros, another cluster's) fails at once, before any of it
    /// is reported held or handed on. Not later: a commit in the first page of a segment on a
    /// quiet database may be all there is for a long time, and partial uploads (a synchronous
    /// site's commits) wait for this. The whole page is checked with the complete segment.
    pub(crate) fn check_first_page(
        &mut self,
        expect: &PageExpectation,
        scratch: &mut Vec<u8>,
    ) -> Result<(), ReceiverError> {
        let header = walhoard_protocol::xlog::LONG_HEADER_LEN;
        if self.first_page_checked || (self.written as usize) < header {
            return Ok(());
        }
        let len = (self.written as usize).min(walhoard_protocol::xlog::XLOG_BLCKSZ);
        let data: &[u8] = match (&self.buf, &self.file) {
            (Some(b), _) => &b[..len],
            (None, Some(f)) => {
                f.read_first_page_into(scratch, len)?;
                scratch
            }
            (None, None) => unreachable!("a segment is received into a buffer or a file"),
        };
        validate_pages(data, self.start, expect, true)
            .map_err(|e| ReceiverError::BadWal(format!("segment {}: {e}", self.id)))?;
        self.first_page_checked = true;
        Ok(())
    }

    /// Whether the segment is being written to a durable spool file.
    pub(crate) fn is_durable(&self) -> bool {
        self.file.as_ref().is_some_and(SegmentFile::is_durable)
    }

    /// Makes what is received of this segment durable in the spool even when the spool is
    /// only a cache (writing the buffer out to a file first if the segment has none); the
    /// segment stays durable from then on. Returns the durable end.
    pub(crate) fn make_durable(&mut self, dir: &Path, seg: SegmentSize) -> std::io::Result<Lsn> {
        if self.file.is_none() {
            let mut f = SegmentFile::open(dir, self.id.tli, self.start, seg, true)?;
            if let Some(b) = &self.buf {
                f.write(self.start, b)?;
            }
            self.file = Some(f);
        }
        let f = self.file.as_mut().expect("just opened");
        f.make_durable()?;
        Ok(f.synced_lsn())
    }

    /// Moves what is received of this segment out of its buffer into its spool file (a new
    /// one, only a cache like the rest of such a spool, when the segment had none) and gives
    /// the buffer back to the budget: a site whose WAL stopped flowing keeps no segment in
    /// memory, however long it waits. The rest of the segment is received into the file.
    pub(crate) fn release_buffer(&mut self, dir: &Path, seg: SegmentSize) -> std::io::Result<()> {
        let Some(buf) = self.buf.as_ref() else {
            return Ok(());
        };
        if self.file.is_none() {
            // Written before the buffer goes: a failure leaves the segment as it was.
            let mut f = SegmentFile::open(dir, self.id.tli, self.start, seg, false)?;
            f.write(self.start, buf)?;
            self.file = Some(f);
        }
        self.buf = None;
        Ok(())
    }

    /// A copy of the bytes received from segment offset `from` on (for a partial upload).
    pub(crate) fn bytes_from(&self, from: u64) -> std::io::Result<Vec<u8>> {
        let from = from.min(self.written);
        match (&self.buf, &self.file) {
            (Some(b), _) => Ok(b[from as usize..self.written as usize].to_vec()),
            (None, Some(f)) => f.read_range(from, self.written),
            (None, None) => unreachable!("a segment is received into a buffer or a file"),
        }
    }

    pub(crate) fn written_lsn(&self) -> Lsn {
        self.start + self.written
    }

    pub(crate) fn is_full(&self) -> bool {
        self.written == self.seg_bytes
    }

    /// Takes `data`, which starts at `at` (the current end); returns how many bytes fit in
    /// this segment.
    pub(crate) fn write(&mut self, at: Lsn, data: &[u8]) -> std::io::Result<usize> {
        if at != self.written_lsn() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "WAL at {at} does not continue segment {} at {}",
                    self.id,
                    self.written_lsn()
                ),
            ));
        }
        let n = ((self.seg_bytes - self.written) as usize).min(data.len());
        if let Some(f) = self.file.as_mut() {
            f.write(at, &data[..n])?;
        }
        if let Some(b) = self.buf.as_mut() {
            b.extend(&data[..n]);
        }
        self.written += n as u64;
        Ok(n)
    }

    /// Reads up to `want` bytes of the stream's pending XLogData payload (which continues this
    /// segment at its end) straight into the segment buffer, or through `scratch` into the
    /// spool file when the segment has no buffer; the spool file, when there is one, gets the
    /// same bytes. Returns how many. Cancel-safe: a cancelled read took nothing.
    pub(crate) async fn read_direct(
        &mut self,
        stream: &mut ReplicationStream<'_>,
        want: usize,
        scratch: &mut Vec<u8>,
    ) -> Result<usize, ReceiverError> {
        let at = self.written_lsn();
        let want = want.min((self.seg_bytes - self.written) as usize);
        let n = match self.buf.as_mut() {
            Some(b) => {
                let from = b.len();
                let n = stream.read_payload(b.vec_mut(), want).await?;
                if let Some(f) = self.file.as_mut() {
                    f.write(at, &b[from..from + n])?;
                }
                n
            }
            None => {
                scratch.clear();
                scratch.reserve(want);
                let n = stream.read_payload(scratch, want).await?;
                self.file
                    .as_mut()
                    .expect("a segment without a buffer is received into a file")
                    .write(at, &scratch[..n])?;
                n
            }
        };
        self.written += n as u64;
        Ok(n)
    }

    /// Syncs the spool file when it is durable and returns its durable end; `None` when the
    /// segment is not durable (only a cache in front of the slot) or its first page is not
    /// checked yet (nothing of a segment that may be no WAL at all counts as held).
    pub(crate) fn sync(&mut self) -> std::io::Result<Option<Lsn>> {
        match self.file.as_mut() {
            Some(f) if f.is_durable() && self.first_page_checked => {
                f.sync()?;
                Ok(Some(f.synced_lsn()))
            }
            _ => Ok(None),
        }
    }

    /// Checks the page headers of the whole segment before it is handed on as good: in its
    /// buffer, or read back from the spool file into `scratch`.
    pub(crate) fn verify(
        &self,
        expect: &PageExpectation,
        scratch: &mut Vec<u8>,
    ) -> Result<(), ReceiverError> {
        let bad = |e: walhoard_protocol::error::FormatError| {
            ReceiverError::BadWal(format!("segment {}: {e}", self.id))
        };
        let f = match (&self.buf, &self.file) {
            // Zero pages may end a segment (after an XLOG_SWITCH record).
            (Some(b), _) => return validate_pages(b, self.start, expect, true).map_err(bad),
            (None, Some(f)) => f,
            (None, None) => unreachable!("a segment is received into a buffer or a file"),
        };
        // Read back in pieces: a whole segment per site in memory would put every site that
        // is behind (no buffer of the budget left for it) a segment above the budget.
        let mut zero_tail = false;
        let mut offset = 0u64;
        while offset < self.seg_bytes {
            let len = (self.seg_bytes - offset).min(VERIFY_PIECE) as usize;
            f.read_range_into(scratch, offset, len)?;
            let at = self.start + offset;
            if zero_tail {
                if let Some(p) = scratch.iter().position(|b| *b != 0) {
                    return Err(bad(walhoard_protocol::error::FormatError::new(format!(
                        "WAL at {} follows an empty page",
                        at + p as u64
                    ))));
                }
            } else {
                validate_pages(scratch, at, expect, true).map_err(bad)?;
                // validate_pages accepted zeros to the piece's end: the tail began in it.
                let last = scratch
                    .len()
                    .saturating_sub(walhoard_protocol::xlog::XLOG_BLCKSZ);
                zero_tail = scratch[last..].iter().all(|b| *b == 0);
            }
            offset += len as u64;
        }
        Ok(())
    }

    /// Renames the spool file to the segment's name; returns that path (which does not exist
    /// when the segment was received into its buffer alone) and the buffer.
    pub(crate) fn complete(self, dir: &Path) -> std::io::Result<(PathBuf, Option<SegmentBuffer>)> {
        let path = match self.file {
            Some(f) => f.complete()?,
            None => dir.join(WalSegmentName::Segment(self.id).to_string()),
        };
        Ok((path, self.buf))
    }

    /// The last segment of a timeline: verified and left durable under its `.partial` name
    /// (after a switch the server may no longer serve it), zeros after the end as PostgreSQL
    /// leaves it.
    pub(crate) fn finish_partial(
        mut self,
        dir: &Path,
        expect: &PageExpectation,
        scratch: &mut Vec<u8>,
    ) -> Result<PathBuf, ReceiverError> {
        if let Some(b) = self.buf.as_mut() {
            b.zero_fill(self.seg_bytes as usize);
        }
        self.verify(expect, scratch)?;
        Ok(match (self.file, self.buf) {
            (Some(f), _) => f.finish_partial()?,
            (None, Some(b)) => {
                write_durable(dir, &WalSegmentName::Partial(self.id).to_string(), &b)?
            }
            (None, None) => unreachable!("a segment is received into a buffer or a file"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walhoard_protocol::xlog::{XLOG_BLCKSZ, XLP_LONG_HEADER};

    const SYSID: u64 = 7_000_000_000_000_000_042;
    const MAGIC: u16 = 0xD110;

    fn seg() -> SegmentSize {
        SegmentSize::new(1 << 20).unwrap()
    }

    fn expect() -> PageExpectation {
        expect_in(seg())
    }

    fn expect_in(seg: SegmentSize) -> PageExpectation {
        PageExpectation {
            magic: MAGIC,
            seg_size: seg,
            system_id: Some(SYSID),
            max_tli: Some(TimelineId(1)),
        }
    }

    /// WAL pages as PostgreSQL lays them out from `start` (XLogPageHeaderData; a long header
    /// with the system identifier on a segment's first page), `pages` of them.
    fn wal(start: Lsn, pages: usize) -> Vec<u8> {
        wal_in(start, pages, seg())
    }

    fn wal_in(start: Lsn, pages: usize, seg: SegmentSize) -> Vec<u8> {
        let mut out = vec![0u8; pages * XLOG_BLCKSZ];
        for (i, p) in out.chunks_mut(XLOG_BLCKSZ).enumerate() {
            let addr = start + (i * XLOG_BLCKSZ) as u64;
            let long = addr.segment_offset(seg) == 0;
            let info = if long { XLP_LONG_HEADER } else { 0 };
            p[0..2].copy_from_slice(&MAGIC.to_le_bytes());
            p[2..4].copy_from_slice(&info.to_le_bytes());
            p[4..8].copy_from_slice(&1u32.to_le_bytes());
            p[8..16].copy_from_slice(&addr.0.to_le_bytes());
            if long {
                p[24..32].copy_from_slice(&SYSID.to_le_bytes());
                p[32..36].copy_from_slice(&(seg.bytes() as u32).to_le_bytes());
                p[36..40].copy_from_slice(&(XLOG_BLCKSZ as u32).to_le_bytes());
            }
            p[100] = i as u8; // some record bytes
        }
        out
    }

    fn seg_start(n: u64) -> Lsn {
        Lsn(n * seg().bytes())
    }

    /// One XLogData message may run past the segment's end (it often does while the server
    /// streams live WAL): the segment takes exactly what belongs to it and the rest is left
    /// for the next one.
    #[test]
    fn incoming_message_crossing_a_segment_takes_only_what_fits() {
        let dir = tempfile::tempdir().unwrap();
        let buffers = SegmentBuffers::new(2);
        let start = seg_start(3);
        let bytes = wal(start, 130); // 128 pages in this segment, 2 in the next
        let mut cur =
            Incoming::open(dir.path(), TimelineId(1), start, seg(), true, &buffers).unwrap();
        assert!(cur.buf.is_some() && cur.file.is_some());
        let n = cur.write(start, &bytes).unwrap();
        assert_eq!(n as u64, seg().bytes());
        assert!(cur.is_full());
        let mut scratch = Vec::new();
        cur.check_first_page(&expect(), &mut scratch).unwrap();
        cur.verify(&expect(), &mut scratch).unwrap();
        let (path, buf) = cur.complete(dir.path()).unwrap();
        assert_eq!(
            path.file_name().unwrap().to_str().unwrap(),
            "000000010000000000000003"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes[..n]);
        assert_eq!(&buf.unwrap()[..], &bytes[..n]);

        // The rest opens the next segment and continues exactly there.
        let mut next = Incoming::open(
            dir.path(),
            TimelineId(1),
            seg_start(4),
            seg(),
            true,
            &buffers,
        )
        .unwrap();
        assert_eq!(
            next.write(seg_start(4), &bytes[n..]).unwrap(),
            2 * XLOG_BLCKSZ
        );
        // Bytes that do not continue the segment are refused, naming where it stands.
        let err = next.write(seg_start(4) + 1, b"x").unwrap_err().to_string();
        assert!(err.contains("does not continue"), "{err}");
    }

    /// With no buffer free (the archive is behind) a segment goes to its spool file alone and
    /// is verified by reading the file back; with a buffer free and a spool that is only a
    /// cache, it lives in the buffer alone until something asks for it to be durable.
    #[test]
    fn incoming_spool_fallback_and_buffer_alone() {
        let dir = tempfile::tempdir().unwrap();
        let start = seg_start(5);
        let bytes = wal(start, 128);
        let mut scratch = Vec::new();

        let none = SegmentBuffers::new(0);
        let mut cur =
            Incoming::open(dir.path(), TimelineId(1), start, seg(), false, &none).unwrap();
        assert!(cur.buf.is_none() && cur.file.is_some());
        cur.write(start, &bytes).unwrap();
        cur.verify(&expect(), &mut scratch).unwrap();
        let (path, buf) = cur.complete(dir.path()).unwrap();
        assert!(buf.is_none());
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        std::fs::remove_file(&path).unwrap();

        let one = SegmentBuffers::new(1);
        let mut cur = Incoming::open(dir.path(), TimelineId(1), start, seg(), false, &one).unwrap();
        assert!(cur.buf.is_some() && cur.file.is_none());
        cur.write(start, &bytes[..3 * XLOG_BLCKSZ]).unwrap();
        // Not durable: nothing of it counts as held in the spool.
        assert_eq!(cur.sync().unwrap(), None);
        // A reply-requested keepalive (shutdown) makes it durable: written out, synced.
        let to = cur.make_durable(dir.path(), seg()).unwrap();
        assert_eq!(to, start + 3 * XLOG_BLCKSZ as u64);
        cur.check_first_page(&expect(), &mut scratch).unwrap();
        assert_eq!(cur.sync().unwrap(), Some(to));
        let partial = dir.path().join("000000010000000000000005.partial");
        assert_eq!(
            std::fs::read(&partial).unwrap()[..3 * XLOG_BLCKSZ],
            bytes[..3 * XLOG_BLCKSZ]
        );
    }

    /// A segment whose first page is no WAL (zeros) fails as soon as that page is in, and
    /// until its first page is checked nothing of it counts as durable.
    #[test]
    fn incoming_zero_first_page_fails_before_anything_counts() {
        let dir = tempfile::tempdir().unwrap();
        let start = seg_start(6);
        let buffers = SegmentBuffers::new(1);
        let mut cur =
            Incoming::open(dir.path(), TimelineId(1), start, seg(), true, &buffers).unwrap();
        let mut scratch = Vec::new();
        cur.write(start, &[0u8; 20]).unwrap();
        // Less than a long page header: not checkable yet, and not counted.
        cur.check_first_page(&expect(), &mut scratch).unwrap();
        assert_eq!(cur.sync().unwrap(), None);
        // The header is in (not the whole page): checked at once.
        cur.write(start + 20, &[0u8; 80]).unwrap();
        let err = cur
            .check_first_page(&expect(), &mut scratch)
            .unwrap_err()
            .to_string();
        assert!(err.contains("000000010000000000000006"), "{err}");
        assert_eq!(cur.sync().unwrap(), None);
    }

    /// A segment without a buffer is verified from its spool file piece by piece: the memory
    /// it takes is one piece, not a segment, and a zero tail or a bad page in a later piece
    /// is judged as it would be in one piece.
    #[test]
    fn incoming_file_verified_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let seg4 = SegmentSize::new(4 << 20).unwrap();
        let start = Lsn(7 * seg4.bytes());
        let pages = (seg4.bytes() as usize) / XLOG_BLCKSZ;
        let none = SegmentBuffers::new(0);
        let check = |bytes: &[u8]| {
            let mut cur =
                Incoming::open(dir.path(), TimelineId(1), start, seg4, false, &none).unwrap();
            assert!(cur.buf.is_none());
            cur.write(start, bytes).unwrap();
            let mut scratch = Vec::new();
            let r = cur.verify(&expect_in(seg4), &mut scratch);
            assert!(
                scratch.capacity() <= VERIFY_PIECE as usize * 3 / 2,
                "read back {} bytes at once",
                scratch.capacity()
            );
            r.map_err(|e| e.to_string())
        };
        let good = wal_in(start, pages, seg4);
        check(&good).unwrap();
        // WAL up to the middle of the second piece, zeros after it (an XLOG_SWITCH).
        let mut tail = good.clone();
        let wal_end = (VERIFY_PIECE as usize) * 3 / 2;
        tail[wal_end..].fill(0);
        check(&tail).unwrap();
        // A byte after the zero tail, two pieces later.
        let mut after = tail.clone();
        after[3 * VERIFY_PIECE as usize + 5] = 1;
        let err = check(&after).unwrap_err();
        assert!(err.contains("follows an empty page"), "{err}");
        // A page with the wrong address in the last piece.
        let mut bad = good.clone();
        let p = 3 * VERIFY_PIECE as usize + 2 * XLOG_BLCKSZ;
        bad[p + 8] ^= 0x40;
        let err = check(&bad).unwrap_err();
        assert!(err.contains("000000010000000000000007"), "{err}");
    }
}
