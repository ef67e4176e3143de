//! A synchronous site's part log on local storage (issue 16, docs/formats.md "Part logs"):
//! the parts of one segment as records appended to one file, `xlog_partial/<segment>/log`,
//! instead of one object (and one metadata sidecar) each. A commit batch then costs one
//! `pwrite` and one `fdatasync` into a region written with zeros beforehand, no new file,
//! rename or directory sync: what pg_receivewal does with its `.partial` file.
//!
//! The name `log` is not in the object layout (`PartRange::parse` refuses it), so code that
//! knows only part objects neither reads nor deletes it.
//!
//! File: a header (magic, format version, the segment size, the segment's name, walhoard's
//! writer mark, CRC-32C), then records one after the other, each: magic, its whole length,
//! `from`, `to` (offsets in the segment), the length of the metadata, the metadata JSON
//! exactly as the part object's sidecar would hold it, the stored bytes exactly as the
//! object would hold them, and a CRC-32C over everything before it in the record. The
//! records of a log are contiguous (each starts where the one before ends). Everything past
//! the last record is zeros written ahead ([`LogWriter`]).
//!
//! The end: a zeroed record header, the end of the file, or a record that does not check
//! (bad magic, a length out of bounds, a CRC that fails) with no valid record after it is
//! the log's end: a write that was never acknowledged, torn by a crash, like the end of
//! PostgreSQL's own WAL. A record that does not check followed by one that does is damage:
//! the part that record held is unreadable, and restore fails rather than end the segment
//! early.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use walhoard_protocol::{SegmentId, SegmentSize, WalSegmentName};

use super::layout::{partial_dir, PartRange};
use crate::durable::{create_dir_all_durable, read_full_at, sync_parent, temp_name};

/// The last part of a part log's key.
pub const LOG_NAME: &str = "log";

/// The key of segment `id`'s part log.
pub fn log_key(id: &SegmentId) -> String {
    format!("{}/{LOG_NAME}", partial_dir(id))
}

const FILE_MAGIC: [u8; 8] = *b"WHPLOG\r\n";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// The longest writer mark a header may hold.
const WRITER_MAX: usize = 256;
/// magic, version, segment size, segment name, writer length.
const HEADER_FIXED: usize = 8 + 4 + 8 + 24 + 2;
const REC_MAGIC: [u8; 4] = *b"WHRC";
/// magic, length, from, to, metadata length.
const REC_HEAD: usize = 4 + 4 + 8 + 8 + 4;
/// A record's head and CRC.
const REC_FIXED: u64 = REC_HEAD as u64 + 4;
/// The longest metadata JSON a record may hold (a sidecar is a few hundred bytes).
pub const META_MAX: u64 = 64 << 10;
/// The first region written with zeros ahead of the records; each next one doubles, up to
/// [`ZERO_STEP_MAX`].
const ZERO_STEP_FIRST: u64 = 1 << 20;
const ZERO_STEP_MAX: u64 = 16 << 20;
/// Candidate record starts examined after a record that does not check, looking for a valid
/// one behind it (hostile input: bounded work).
const SEARCH_CANDIDATES: usize = 4096;

/// The most bytes one record may claim in a log of segments of `seg` bytes: the whole
/// segment stored (compression can grow incompressible bytes a little, encryption adds a
/// header and a tag per chunk), its metadata and a fixed overhead.
pub fn record_max(seg: u64) -> u64 {
    REC_FIXED + META_MAX + seg + seg / 64 + (64 << 10)
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

fn crc32c(parts: &[&[u8]]) -> u32 {
    let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    for p in parts {
        d.update(p);
    }
    d.finalize() as u32
}

/// A part log's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogHeader {
    pub segment: SegmentId,
    pub seg: SegmentSize,
    /// walhoard's `walhoard-writer` mark: only logs that carry it are ever deleted.
    pub writer: String,
}

impl LogHeader {
    pub fn encode(&self) -> Vec<u8> {
        let w = self.writer.as_bytes();
        let w = &w[..w.len().min(WRITER_MAX)];
        let mut out = Vec::with_capacity(HEADER_FIXED + w.len() + 4);
        out.extend_from_slice(&FILE_MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.seg.bytes().to_le_bytes());
        let name = WalSegmentName::Segment(self.segment).to_string();
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(w.len() as u16).to_le_bytes());
        out.extend_from_slice(w);
        let crc = crc32c(&[&out]);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a header from the first bytes of a file; returns it and its length.
    /// `Ok(None)` when the bytes do not start with the magic (not a part log).
    pub fn decode(b: &[u8]) -> io::Result<Option<(LogHeader, u64)>> {
        if b.len() < FILE_MAGIC.len() || b[..8] != FILE_MAGIC {
            return Ok(None);
        }
        if b.len() < HEADER_FIXED {
            return Err(invalid("part log header truncated"));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(invalid(format!(
                "part log format version {version}, this walhoard reads {VERSION}"
            )));
        }
        let seg = u64::from_le_bytes(b[12..20].try_into().expect("8 bytes"));
        let name = std::str::from_utf8(&b[20..44]).map_err(|_| invalid("segment name"))?;
        let wlen = u16::from_le_bytes(b[44..46].try_into().expect("2 bytes")) as usize;
        if wlen > WRITER_MAX {
            return Err(invalid(format!(
                "part log header: writer mark of {wlen} bytes"
            )));
        }
        let len = HEADER_FIXED + wlen + 4;
        if b.len() < len {
            return Err(invalid("part log header truncated"));
        }
        let stored = u32::from_le_bytes(b[len - 4..len].try_into().expect("4 bytes"));
        if crc32c(&[&b[..len - 4]]) != stored {
            return Err(invalid("part log header: CRC-32C does not match"));
        }
        let seg = SegmentSize::new(seg)
            .map_err(|e| invalid(format!("part log header: segment size: {e}")))?;
        let segment = match name.parse() {
            Ok(WalSegmentName::Segment(id)) => id,
            _ => return Err(invalid(format!("part log header: segment name {name:?}"))),
        };
        let writer = String::from_utf8(b[HEADER_FIXED..HEADER_FIXED + wlen].to_vec())
            .map_err(|_| invalid("part log header: writer mark is not UTF-8"))?;
        Ok(Some((
            LogHeader {
                segment,
                seg,
                writer,
            },
            len as u64,
        )))
    }

    /// Whether walhoard wrote this log (only then is it ever deleted).
    pub fn is_walhoards(&self) -> bool {
        self.writer.starts_with("walhoard ")
    }
}

/// Reads the header of the log `f`; `Ok(None)` when it is not a part log.
pub fn read_header(f: &File) -> io::Result<Option<(LogHeader, u64)>> {
    let mut b = vec![0u8; HEADER_FIXED + WRITER_MAX + 4];
    let n = read_full_at(f, &mut b, 0)?;
    LogHeader::decode(&b[..n])
}

/// A record as stored: `range`, the metadata JSON, the stored bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub range: PartRange,
    pub meta: Vec<u8>,
    pub stored: Vec<u8>,
}

/// A record's bytes.
pub fn encode_record(range: PartRange, meta: &[u8], stored: &[u8]) -> Vec<u8> {
    let len = REC_FIXED as usize + meta.len() + stored.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&REC_MAGIC);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&range.from.to_le_bytes());
    out.extend_from_slice(&range.to.to_le_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(meta);
    out.extend_from_slice(stored);
    let crc = crc32c(&[&out]);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// What a record's head claims, checked against the bounds of a log of `seg`-byte segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    len: u64,
    range: PartRange,
    meta_len: u64,
}

fn parse_head(b: &[u8; REC_HEAD], seg: u64) -> Result<Head, String> {
    if b[..4] != REC_MAGIC {
        return Err("no record magic".into());
    }
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes")) as u64;
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let (len, from, to, meta_len) = (u32_at(4), u64_at(8), u64_at(16), u32_at(24));
    let max = record_max(seg);
    if len < REC_FIXED || len > max {
        return Err(format!(
            "claims {len} bytes, the bounds are {REC_FIXED}..={max}"
        ));
    }
    if from >= to || to > seg {
        return Err(format!(
            "claims offsets {from:#X}..{to:#X}, not a range within the segment size {seg:#X}"
        ));
    }
    if meta_len > META_MAX || REC_FIXED + meta_len > len {
        return Err(format!(
            "claims {meta_len} bytes of metadata in a record of {len}"
        ));
    }
    Ok(Head {
        len,
        range: PartRange { from, to },
        meta_len,
    })
}

/// Decodes one whole record, every bound and the CRC checked.
pub fn decode_record(b: &[u8], seg: u64) -> Result<Record, String> {
    let head: &[u8; REC_HEAD] = b
        .get(..REC_HEAD)
        .and_then(|h| h.try_into().ok())
        .ok_or("shorter than a record head")?;
    let h = parse_head(head, seg)?;
    if b.len() as u64 != h.len {
        return Err(format!("{} bytes, its head claims {}", b.len(), h.len));
    }
    let body = b.len() - 4;
    let stored = u32::from_le_bytes(b[body..].try_into().expect("4 bytes"));
    if crc32c(&[&b[..body]]) != stored {
        return Err("CRC-32C does not match".into());
    }
    let meta_end = REC_HEAD + h.meta_len as usize;
    Ok(Record {
        range: h.range,
        meta: b[REC_HEAD..meta_end].to_vec(),
        stored: b[meta_end..body].to_vec(),
    })
}

/// Where a valid record lies in a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    pub at: u64,
    pub len: u64,
    pub range: PartRange,
}

/// A record that does not check with a valid record after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub at: u64,
    pub why: String,
    /// The valid record found after it.
    pub next: Located,
}

/// How a scan ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// At a zeroed record head or the end of the file.
    Clean,
    /// At a record that does not check, with nothing valid after it: a torn write.
    Torn(String),
}

/// What a scan of a log found: its valid records in order, where they end, and how.
#[derive(Debug, Clone)]
pub struct Scan {
    pub header: LogHeader,
    pub records: Vec<Located>,
    /// The valid end: where the next record goes.
    pub end: u64,
    pub how: End,
    pub damage: Option<Damage>,
}

/// Scans the log `f` from its header on, reading records as a stream (nothing larger than
/// one read buffer is held); `Ok(None)` when it is not a part log.
pub fn scan(f: &File) -> io::Result<Option<Scan>> {
    let Some((header, header_len)) = read_header(f)? else {
        return Ok(None);
    };
    let seg = header.seg.bytes();
    let file_len = f.metadata()?.len();
    let mut records: Vec<Located> = Vec::new();
    let mut pos = header_len;
    let mut buf = vec![0u8; 64 << 10];
    let how = loop {
        let mut head = [0u8; REC_HEAD];
        let n = read_full_at(f, &mut head, pos)?;
        if n == 0 || head[..n].iter().all(|b| *b == 0) {
            break End::Clean;
        }
        let checked = check_at(f, pos, seg, &mut buf)?;
        let prev_to = records.last().map(|r| r.range.to);
        match checked {
            Ok(h) if prev_to.is_none_or(|p| p == h.range.from) => {
                records.push(Located {
                    at: pos,
                    len: h.len,
                    range: h.range,
                });
                pos += h.len;
            }
            Ok(h) => {
                // Valid, but not where the records before end: walhoard never writes that.
                let why = format!(
                    "holds offsets {:#X}..{:#X}, the records before end at {:#X}",
                    h.range.from,
                    h.range.to,
                    prev_to.unwrap_or_default()
                );
                let next = Located {
                    at: pos,
                    len: h.len,
                    range: h.range,
                };
                return Ok(Some(Scan {
                    header,
                    end: pos,
                    records,
                    how: End::Torn(why.clone()),
                    damage: Some(Damage { at: pos, why, next }),
                }));
            }
            Err(why) => {
                let min_from = prev_to.unwrap_or(0);
                if let Some(next) = find_valid_after(f, pos + 1, file_len, seg, min_from)? {
                    return Ok(Some(Scan {
                        header,
                        end: pos,
                        records,
                        how: End::Torn(why.clone()),
                        damage: Some(Damage { at: pos, why, next }),
                    }));
                }
                break End::Torn(why);
            }
        }
    };
    Ok(Some(Scan {
        header,
        records,
        end: pos,
        how,
        damage: None,
    }))
}

/// Checks the record at `at` as a stream: its head's bounds and its CRC.
fn check_at(f: &File, at: u64, seg: u64, buf: &mut [u8]) -> io::Result<Result<Head, String>> {
    let mut head = [0u8; REC_HEAD];
    if read_full_at(f, &mut head, at)? < REC_HEAD {
        return Ok(Err("the file ends inside a record head".into()));
    }
    let h = match parse_head(&head, seg) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    d.update(&head);
    let body_end = at + h.len - 4;
    let mut p = at + REC_HEAD as u64;
    while p < body_end {
        let want = ((body_end - p) as usize).min(buf.len());
        let n = read_full_at(f, &mut buf[..want], p)?;
        if n < want {
            return Ok(Err("the file ends inside the record".into()));
        }
        d.update(&buf[..n]);
        p += n as u64;
    }
    let mut crc = [0u8; 4];
    if read_full_at(f, &mut crc, body_end)? < 4 {
        return Ok(Err("the file ends inside the record".into()));
    }
    if d.finalize() as u32 != u32::from_le_bytes(crc) {
        return Ok(Err("CRC-32C does not match".into()));
    }
    Ok(Ok(h))
}

/// The first valid record starting at or after `from` whose offsets start at or after
/// `min_from`, looking at record magics only and at most [`SEARCH_CANDIDATES`] of them.
fn find_valid_after(
    f: &File,
    from: u64,
    file_len: u64,
    seg: u64,
    min_from: u64,
) -> io::Result<Option<Located>> {
    let mut chunk = vec![0u8; 1 << 20];
    let mut crc_buf = vec![0u8; 64 << 10];
    let mut pos = from;
    let mut candidates = 0;
    while pos < file_len {
        let n = read_full_at(f, &mut chunk, pos)?;
        if n < REC_MAGIC.len() {
            break;
        }
        for i in 0..=n - REC_MAGIC.len() {
            if chunk[i..i + 4] != REC_MAGIC {
                continue;
            }
            candidates += 1;
            if candidates > SEARCH_CANDIDATES {
                return Ok(None);
            }
            let at = pos + i as u64;
            if let Ok(h) = check_at(f, at, seg, &mut crc_buf)? {
                if h.range.from >= min_from {
                    return Ok(Some(Located {
                        at,
                        len: h.len,
                        range: h.range,
                    }));
                }
            }
        }
        // Overlap by a magic's length less one, so one split between chunks is seen.
        pos += (n - (REC_MAGIC.len() - 1)) as u64;
    }
    Ok(None)
}

/// A record opened for reading: its offsets and metadata in memory, its stored bytes read
/// from the file as a stream (a record may be as large as a segment; restore reads eight at
/// once).
#[derive(Debug)]
pub struct OpenRecord {
    pub range: PartRange,
    pub meta: Vec<u8>,
    pub stored: StoredReader,
}

/// The stored bytes of a record, read from its log; at their end the record's CRC is
/// checked (a mismatch is an `InvalidData` error instead of the end).
#[derive(Debug)]
pub struct StoredReader {
    file: File,
    pos: u64,
    end: u64,
    crc: crc_fast::Digest,
    checked: bool,
}

impl io::Read for StoredReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.end {
            if !self.checked {
                let mut crc = [0u8; 4];
                if read_full_at(&self.file, &mut crc, self.end)? < 4 {
                    return Err(invalid("the file ends inside the record"));
                }
                if self.crc.clone().finalize() as u32 != u32::from_le_bytes(crc) {
                    return Err(invalid("record CRC-32C does not match"));
                }
                self.checked = true;
            }
            return Ok(0);
        }
        let want = ((self.end - self.pos) as usize).min(buf.len());
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(invalid("the file ends inside the record"));
        }
        self.crc.update(&buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

/// Opens the record at `at` (`len` bytes, as a scan found it) of the log at `path`: its head
/// and metadata read and bounded, its stored bytes to be read as a stream whose end checks
/// the CRC.
pub fn open_record(path: &Path, at: u64, len: u64) -> io::Result<OpenRecord> {
    let file = File::open(path)?;
    let Some((header, _)) = read_header(&file)? else {
        return Err(invalid("not a part log (no magic)"));
    };
    let mut head = [0u8; REC_HEAD];
    if read_full_at(&file, &mut head, at)? < REC_HEAD {
        return Err(invalid(format!(
            "the file ends inside the record at byte {at}"
        )));
    }
    let h = parse_head(&head, header.seg.bytes())
        .map_err(|e| invalid(format!("record at byte {at}: {e}")))?;
    if h.len != len {
        return Err(invalid(format!(
            "record at byte {at}: {} bytes, listed as {len}",
            h.len
        )));
    }
    let mut meta = vec![0u8; h.meta_len as usize];
    let meta_at = at + REC_HEAD as u64;
    if read_full_at(&file, &mut meta, meta_at)? < meta.len() {
        return Err(invalid(format!(
            "the file ends inside the record at byte {at}"
        )));
    }
    let mut crc = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    crc.update(&head);
    crc.update(&meta);
    Ok(OpenRecord {
        range: h.range,
        meta,
        stored: StoredReader {
            file,
            pos: meta_at + h.meta_len,
            end: at + h.len - 4,
            crc,
            checked: false,
        },
    })
}

/// Reads the record at `at` (`len` bytes, as a scan found it) of the log at `path`, every
/// bound and its CRC checked again.
pub fn read_record(path: &Path, at: u64, len: u64) -> io::Result<Record> {
    let f = File::open(path)?;
    let Some((header, _)) = read_header(&f)? else {
        return Err(invalid("not a part log (no magic)"));
    };
    let seg = header.seg.bytes();
    if len > record_max(seg) {
        return Err(invalid(format!("a record of {len} bytes is out of bounds")));
    }
    let mut b = vec![0u8; len as usize];
    if read_full_at(&f, &mut b, at)? < b.len() {
        return Err(invalid(format!(
            "the file ends inside the record at byte {at}"
        )));
    }
    decode_record(&b, seg).map_err(|e| invalid(format!("record at byte {at}: {e}")))
}

/// The open part log of the segment a synchronous site is receiving: records go at its
/// valid end, each acknowledged only once `fdatasync` returned.
#[derive(Debug)]
pub struct LogWriter {
    file: File,
    segment: SegmentId,
    seg: u64,
    /// Where the next record goes.
    pos: u64,
    /// The file is written (with zeros past `pos`) up to here.
    zeroed_to: u64,
    /// The next zeroed region's size.
    step: u64,
    /// The last record's `to`.
    last_to: Option<u64>,
    /// Where the last record appended by this writer lies, and its length.
    last_record: Option<(u64, u64)>,
}

impl LogWriter {
    /// Opens the log of `segment` at `path` and finds its valid end, or creates it durably
    /// (through a temporary file in `tmp_dir`, on the same file system). A torn tail is
    /// zeroed so that nothing of it can be taken for a record later; a damaged log, one of
    /// another segment or segment size, or a file that is not a part log is refused.
    pub fn open(
        path: &Path,
        tmp_dir: &Path,
        segment: SegmentId,
        seg: SegmentSize,
        writer: &str,
    ) -> io::Result<LogWriter> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Self::create(path, tmp_dir, segment, seg, writer)
            }
            Err(e) => return Err(e),
        };
        let Some(scan) = scan(&file)? else {
            return Err(invalid(format!("{}: not a part log", path.display())));
        };
        if scan.header.segment != segment || scan.header.seg != seg {
            return Err(invalid(format!(
                "{}: a part log of segment {} ({} bytes), not of {segment} ({} bytes)",
                path.display(),
                scan.header.segment,
                scan.header.seg.bytes(),
                seg.bytes()
            )));
        }
        if let Some(d) = &scan.damage {
            return Err(invalid(format!(
                "{}: damaged record at byte {}: {}; not appended to",
                path.display(),
                d.at,
                d.why
            )));
        }
        let file_len = file.metadata()?.len();
        if let End::Torn(why) = &scan.how {
            tracing::info!(log = %path.display(), at = scan.end, %why, "part log ends in a torn record (never acknowledged); overwriting it");
        }
        // Whatever lies past the end (a torn record, even one whose head alone was lost) is
        // zeroed, so that no rest of it can follow a shorter record written there later.
        write_zeros(&file, scan.end, file_len)?;
        file.sync_all()?;
        Ok(LogWriter {
            file,
            segment,
            seg: seg.bytes(),
            pos: scan.end,
            zeroed_to: file_len.max(scan.end),
            step: file_len.clamp(ZERO_STEP_FIRST, ZERO_STEP_MAX),
            last_to: scan.records.last().map(|r| r.range.to),
            last_record: None,
        })
    }

    fn create(
        path: &Path,
        tmp_dir: &Path,
        segment: SegmentId,
        seg: SegmentSize,
        writer: &str,
    ) -> io::Result<LogWriter> {
        let header = LogHeader {
            segment,
            seg,
            writer: writer.into(),
        }
        .encode();
        std::fs::create_dir_all(tmp_dir)?;
        let tmp = tmp_dir.join(temp_name());
        let made = (|| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            file.write_all_at(&header, 0)?;
            let zeroed_to = header.len() as u64 + ZERO_STEP_FIRST;
            write_zeros(&file, header.len() as u64, zeroed_to)?;
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                create_dir_all_durable(dir)?;
            }
            std::fs::rename(&tmp, path)?;
            sync_parent(path)?;
            Ok(LogWriter {
                file,
                segment,
                seg: seg.bytes(),
                pos: header.len() as u64,
                zeroed_to,
                step: ZERO_STEP_FIRST * 2,
                last_to: None,
                last_record: None,
            })
        })();
        if made.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        made
    }

    pub fn segment(&self) -> SegmentId {
        self.segment
    }

    /// The last record's `to`; `None` when the log holds none.
    pub fn last_to(&self) -> Option<u64> {
        self.last_to
    }

    /// Where the last record this writer appended lies, and its length.
    pub fn last_record(&self) -> Option<(u64, u64)> {
        self.last_record
    }

    /// Appends a record of `range` and returns once it is durable (`fdatasync`); returns the
    /// record's length. On an error the log is to be opened again (its end found anew).
    pub fn append(&mut self, range: PartRange, meta: &[u8], stored: &[u8]) -> io::Result<u64> {
        if self.last_to.is_some_and(|t| t != range.from) || range.to > self.seg {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "offsets {:#X}..{:#X} do not continue the log (its records end at {:?})",
                    range.from, range.to, self.last_to
                ),
            ));
        }
        if meta.len() as u64 > META_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "metadata larger than a record may hold",
            ));
        }
        let rec = encode_record(range, meta, stored);
        let len = rec.len() as u64;
        if len > record_max(self.seg) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a record of {len} bytes is larger than a log of this segment size takes"),
            ));
        }
        let need = self.pos + len;
        if need > self.zeroed_to {
            self.zero_ahead(need)?;
        }
        self.file.write_all_at(&rec, self.pos)?;
        // Within the region written with zeros: no size or block allocation to commit.
        if let Err(e) = self.file.sync_data() {
            // After a failed sync the page cache may hold the record while the disk does
            // not: its head is zeroed (and synced, if that works) so that a scan of this
            // log, the next open's included, never takes an unacknowledged record for a
            // durable one.
            let _ = self
                .file
                .write_all_at(&[0u8; REC_HEAD], self.pos)
                .and_then(|()| self.file.sync_data());
            return Err(e);
        }
        self.last_record = Some((self.pos, len));
        self.pos = need;
        self.last_to = Some(range.to);
        Ok(len)
    }

    /// Writes zeros ahead until the file reaches past `need`, in growing steps, and syncs
    /// the file (its new size and blocks) once.
    fn zero_ahead(&mut self, need: u64) -> io::Result<()> {
        let mut to = self.zeroed_to;
        while to < need {
            to += self.step;
            self.step = (self.step * 2).min(ZERO_STEP_MAX);
        }
        write_zeros(&self.file, self.zeroed_to, to)?;
        self.file.sync_all()?;
        self.zeroed_to = to;
        Ok(())
    }
}

fn write_zeros(f: &File, from: u64, to: u64) -> io::Result<()> {
    let zeros = vec![0u8; (1usize << 20).min(to.saturating_sub(from) as usize)];
    let mut p = from;
    while p < to {
        let n = ((to - p) as usize).min(zeros.len());
        f.write_all_at(&zeros[..n], p)?;
        p += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use walhoard_protocol::TimelineId;

    fn seg_id(n: u64) -> SegmentId {
        SegmentId::from_segno(TimelineId(1), n, SegmentSize::DEFAULT)
    }

    fn range(from: u64, to: u64) -> PartRange {
        PartRange { from, to }
    }

    const MARK: &str = crate::storage::meta::WALHOARD_WRITER_VALUE;

    #[test]
    fn header_and_record_round_trip() {
        let h = LogHeader {
            segment: seg_id(7),
            seg: SegmentSize::DEFAULT,
            writer: MARK.into(),
        };
        let b = h.encode();
        let (back, len) = LogHeader::decode(&b).unwrap().unwrap();
        assert_eq!((back, len), (h.clone(), b.len() as u64));
        assert!(h.is_walhoards());
        // Any flipped byte is refused (the CRC, or a bound before it).
        for i in 8..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x40;
            assert!(LogHeader::decode(&bad).is_err(), "byte {i}");
        }
        assert!(LogHeader::decode(b"not a log at all").unwrap().is_none());
        assert!(LogHeader::decode(&b[..20]).is_err());

        let seg = SegmentSize::DEFAULT.bytes();
        let r = encode_record(range(0x100, 0x300), b"{\"a\":\"b\"}", b"stored bytes");
        let d = decode_record(&r, seg).unwrap();
        assert_eq!(d.range, range(0x100, 0x300));
        assert_eq!(d.meta, b"{\"a\":\"b\"}");
        assert_eq!(d.stored, b"stored bytes");
        for i in 0..r.len() {
            let mut bad = r.clone();
            bad[i] ^= 1;
            assert!(decode_record(&bad, seg).is_err(), "byte {i}");
        }
        assert!(decode_record(&r[..r.len() - 1], seg).is_err());
    }

    /// Every length a record's head claims is bounded: its length, its offsets (within the
    /// segment, from < to), its metadata.
    #[test]
    fn record_heads_are_bounded() {
        let seg = SegmentSize::DEFAULT.bytes();
        let head = |len: u64, from: u64, to: u64, meta: u64| {
            let mut b = [0u8; REC_HEAD];
            b[..4].copy_from_slice(&REC_MAGIC);
            b[4..8].copy_from_slice(&(len as u32).to_le_bytes());
            b[8..16].copy_from_slice(&from.to_le_bytes());
            b[16..24].copy_from_slice(&to.to_le_bytes());
            b[24..28].copy_from_slice(&(meta as u32).to_le_bytes());
            parse_head(&b, seg)
        };
        assert!(head(100, 0, 10, 10).is_ok());
        assert!(head(REC_FIXED - 1, 0, 10, 0).is_err());
        assert!(head(record_max(seg), 0, 10, 10).is_ok());
        assert!(head(record_max(seg) + 1, 0, 10, 10).is_err());
        assert!(head(100, 10, 10, 0).is_err());
        assert!(head(100, 20, 10, 0).is_err());
        assert!(head(100, 0, seg, 0).is_ok());
        assert!(head(100, 0, seg + 1, 0).is_err());
        assert!(head(100, 0, 10, 100 - REC_FIXED + 1).is_err());
        assert!(head(META_MAX + 1000, 0, 10, META_MAX + 1).is_err());
        let mut b = [0u8; REC_HEAD];
        b[..4].copy_from_slice(b"XXXX");
        assert!(parse_head(&b, seg).is_err());
    }

    fn writer(dir: &Path) -> (std::path::PathBuf, LogWriter) {
        let path = dir.join("seg/log");
        let w = LogWriter::open(
            &path,
            &dir.join("tmp"),
            seg_id(3),
            SegmentSize::DEFAULT,
            MARK,
        )
        .unwrap();
        (path, w)
    }

    /// Appends go into zeros written ahead; a scan finds the records, a torn tail ends the
    /// log and is overwritten on reopening, a bad record with a valid one after it is damage.
    #[test]
    fn writer_scan_torn_tail_and_damage() {
        let t = tempfile::tempdir().unwrap();
        let (path, mut w) = writer(t.path());
        let len0 = std::fs::metadata(&path).unwrap().len();
        assert!(len0 > ZERO_STEP_FIRST);
        w.append(range(0, 0x100), b"{}", &[1u8; 50]).unwrap();
        w.append(range(0x100, 0x180), b"{}", &[2u8; 70]).unwrap();
        assert!(w.append(range(0x200, 0x300), b"{}", b"x").is_err());
        // A record larger than the zeroed region grows it in steps.
        w.append(range(0x180, 0x200), b"{}", &vec![3u8; 3 << 20])
            .unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() >= len0 + (3 << 20));
        drop(w);
        let f = File::open(&path).unwrap();
        let s = scan(&f).unwrap().unwrap();
        assert_eq!(s.how, End::Clean);
        assert_eq!(s.records.len(), 3);
        assert!(s.damage.is_none());
        let end = s.end;
        let r = read_record(&path, s.records[1].at, s.records[1].len).unwrap();
        assert_eq!(r.stored, vec![2u8; 70]);
        let mut o = open_record(&path, s.records[1].at, s.records[1].len).unwrap();
        assert_eq!(
            (o.range, o.meta.as_slice()),
            (range(0x100, 0x180), &b"{}"[..])
        );
        let mut streamed = Vec::new();
        io::Read::read_to_end(&mut o.stored, &mut streamed).unwrap();
        assert_eq!(streamed, vec![2u8; 70]);
        assert!(open_record(&path, s.records[1].at, s.records[1].len + 1).is_err());

        // A torn tail: half a record after the last valid one.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let half = encode_record(range(0x200, 0x280), b"{}", &[9u8; 100]);
        f.write_all_at(&half[..60], end).unwrap();
        let s = scan(&File::open(&path).unwrap()).unwrap().unwrap();
        assert!(matches!(s.how, End::Torn(_)), "{:?}", s.how);
        assert!(s.damage.is_none());
        assert_eq!((s.end, s.records.len()), (end, 3));
        // Reopened: the tail is zeroed and overwritten.
        let (_, mut w) = writer(t.path());
        assert_eq!(w.last_to(), Some(0x200));
        w.append(range(0x200, 0x210), b"{}", b"short").unwrap();
        let s = scan(&File::open(&path).unwrap()).unwrap().unwrap();
        assert_eq!((s.how.clone(), s.records.len()), (End::Clean, 4));

        // Damage: a record in the middle flipped, valid ones after it.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xFF], s.records[1].at + 40).unwrap();
        let s2 = scan(&File::open(&path).unwrap()).unwrap().unwrap();
        let d = s2.damage.clone().unwrap();
        assert_eq!(d.at, s.records[1].at);
        // Streamed, the flipped record fails at its end (its CRC).
        let mut o = open_record(&path, s.records[1].at, s.records[1].len).unwrap();
        let err = io::Read::read_to_end(&mut o.stored, &mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(d.next.at, s.records[2].at);
        assert_eq!(s2.records.len(), 1);
        assert!(LogWriter::open(
            &path,
            &t.path().join("tmp"),
            seg_id(3),
            SegmentSize::DEFAULT,
            MARK
        )
        .is_err());
        // Its head's length destroyed: found by the magic search all the same.
        f.write_all_at(&[0xFF, 0xFF, 0xFF, 0x7F], s.records[1].at + 4)
            .unwrap();
        let s3 = scan(&File::open(&path).unwrap()).unwrap().unwrap();
        assert_eq!(s3.damage.unwrap().next.at, s.records[2].at);
        // Another segment's log is refused.
        assert!(LogWriter::open(
            &path,
            &t.path().join("tmp"),
            seg_id(4),
            SegmentSize::DEFAULT,
            MARK
        )
        .is_err());
    }

    /// A torn record whose head alone was lost (zeros, then the rest of its bytes) ends the
    /// log like a clean end; reopening zeroes everything past the end, so a shorter record
    /// written there later is not followed by the rest of the torn one.
    #[test]
    fn reopening_zeroes_past_the_end() {
        let t = tempfile::tempdir().unwrap();
        let (path, mut w) = writer(t.path());
        w.append(range(0, 0x100), b"{}", &[1u8; 50]).unwrap();
        drop(w);
        let end = scan_path(&path).end;
        let torn = encode_record(range(0x100, 0x200), b"{}", &[7u8; 400]);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&torn[REC_HEAD..], end + REC_HEAD as u64)
            .unwrap();
        assert_eq!(scan_path(&path).how, End::Clean);
        let (_, mut w) = writer(t.path());
        w.append(range(0x100, 0x110), b"{}", b"short").unwrap();
        drop(w);
        let s = scan_path(&path);
        assert_eq!((s.how, s.records.len()), (End::Clean, 2));
        let mut rest = vec![0u8; 1000];
        let n = read_full_at(&File::open(&path).unwrap(), &mut rest, s.end).unwrap();
        assert!(
            rest[..n].iter().all(|b| *b == 0),
            "the torn record's rest is still there"
        );
    }

    fn scan_path(path: &Path) -> Scan {
        scan(&File::open(path).unwrap()).unwrap().unwrap()
    }
}
