//! A streaming tar reader for what restore extracts: PostgreSQL's ustar archives
//! (`tarCreateHeader` in src/port/tar.c), and ours ([`crate::tar`]: ustar prefix, GNU long
//! names and link targets, GNU base-256 sizes). pax headers are read for `path`, `linkpath` and
//! `size`. It only parses; deciding where (and whether) a member may be written is the caller's.

use std::io::{self, Read};

use crate::tar::BLOCK;

/// What a member is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink {
        target: String,
    },
    /// Hard links, devices, FIFOs...: never produced by PostgreSQL or us; the caller refuses.
    Other {
        typeflag: u8,
    },
}

/// A member's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    /// Body bytes ([`TarReader::body`] reads exactly these).
    pub size: u64,
}

/// Reads members one at a time from `R`.
pub struct TarReader<R: Read> {
    inner: R,
    /// Body bytes of the current member not yet read, then its padding.
    remaining: u64,
    padding: u64,
    ended: bool,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A NUL-terminated (or full) header field as text.
fn text(field: &[u8]) -> Result<String, io::Error> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8(field[..end].to_vec()).map_err(|_| invalid("tar member name is not UTF-8"))
}

fn number(field: &[u8]) -> io::Result<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // GNU base-256: big-endian binary after the marker bit.
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(b)))
                .ok_or_else(|| invalid("tar number overflows"))?;
        }
        return Ok(v);
    }
    let s = text(field)?;
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(s, 8).map_err(|_| invalid(format!("bad octal number {s:?} in tar header")))
}

fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) if n == 0 => return Ok(false),
            Ok(0) => return Err(invalid("tar stream ends inside a header")),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn padding_of(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        TarReader {
            inner,
            remaining: 0,
            padding: 0,
            ended: false,
        }
    }

    /// Skips what is left of the current member's body and padding.
    fn skip_rest(&mut self) -> io::Result<()> {
        let n = self.remaining + self.padding;
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        if copied != n {
            return Err(invalid("tar stream ends inside a member"));
        }
        self.remaining = 0;
        self.padding = 0;
        Ok(())
    }

    /// A whole (small) special member body: GNU long name, pax header.
    fn small_body(&mut self, size: u64) -> io::Result<Vec<u8>> {
        if size > 1024 * 1024 {
            return Err(invalid(format!("tar extension header of {size} bytes")));
        }
        let mut data = vec![0u8; size as usize];
        self.inner.read_exact(&mut data)?;
        let pad = padding_of(size);
        io::copy(&mut (&mut self.inner).take(pad), &mut io::sink())?;
        Ok(data)
    }

    /// The next member, `None` at the end of the archive (two zero blocks or end of stream).
    pub fn next_entry(&mut self) -> io::Result<Option<Entry>> {
        if self.ended {
            return Ok(None);
        }
        self.skip_rest()?;
        let mut long_name: Option<String> = None;
        let mut long_link: Option<String> = None;
        let mut pax_size: Option<u64> = None;
        loop {
            let mut h = [0u8; BLOCK];
            if !read_exact_or_eof(&mut self.inner, &mut h)? || h.iter().all(|&b| b == 0) {
                self.ended = true;
                return Ok(None);
            }
            let stored = number(&h[148..156])?;
            let mut check = h;
            check[148..156].fill(b' ');
            let sum: u64 = check.iter().map(|&b| u64::from(b)).sum();
            if sum != stored {
                return Err(invalid(
                    "tar header checksum mismatch (not a tar, or corrupted)",
                ));
            }
            let typeflag = h[156];
            let size = number(&h[124..136])?;
            match typeflag {
                b'L' => {
                    long_name = Some(text(&self.small_body(size)?)?);
                    continue;
                }
                b'K' => {
                    long_link = Some(text(&self.small_body(size)?)?);
                    continue;
                }
                b'x' => {
                    let body = self.small_body(size)?;
                    for (k, v) in parse_pax(&body)? {
                        match k.as_str() {
                            "path" => long_name = Some(v),
                            "linkpath" => long_link = Some(v),
                            "size" => {
                                pax_size = Some(v.parse().map_err(|_| invalid("bad pax size"))?)
                            }
                            _ => {}
                        }
                    }
                    continue;
                }
                b'g' => {
                    self.small_body(size)?;
                    continue;
                }
                _ => {}
            }
            let size = pax_size.unwrap_or(size);
            let path = match long_name {
                Some(n) => n,
                None => {
                    let name = text(&h[0..100])?;
                    let ustar = &h[257..262] == b"ustar";
                    let prefix = if ustar {
                        text(&h[345..500])?
                    } else {
                        String::new()
                    };
                    if prefix.is_empty() {
                        name
                    } else {
                        format!("{prefix}/{name}")
                    }
                }
            };
            let mode = number(&h[100..108])? as u32;
            let kind = match typeflag {
                b'0' | 0 | b'7' => EntryKind::File,
                b'5' => EntryKind::Dir,
                b'2' => EntryKind::Symlink {
                    target: match long_link {
                        Some(l) => l,
                        None => text(&h[157..257])?,
                    },
                },
                other => EntryKind::Other { typeflag: other },
            };
            // Only regular files have a body to read; others' sizes are ignored, as tar does.
            let body = if kind == EntryKind::File { size } else { 0 };
            // A base-256 or pax size can be anything up to u64::MAX: body and padding must
            // still add up, or skipping the member overflows.
            if body.checked_add(padding_of(body)).is_none() {
                return Err(invalid(format!(
                    "tar member {path:?} declares {body} bytes: more than any archive holds"
                )));
            }
            self.remaining = body;
            self.padding = padding_of(body);
            return Ok(Some(Entry {
                path,
                kind,
                mode,
                size: body,
            }));
        }
    }

    /// The current member's body (exactly its size).
    pub fn body(&mut self) -> impl Read + '_ {
        BodyReader { tar: self }
    }

    /// The underlying stream (after the end of the archive: what follows it).
    pub fn into_inner(self) -> R {
        self.inner
    }
}

struct BodyReader<'a, R: Read> {
    tar: &'a mut TarReader<R>,
}

impl<R: Read> Read for BodyReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.tar.remaining == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(self.tar.remaining.min(usize::MAX as u64) as usize);
        let n = self.tar.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(invalid("tar stream ends inside a member"));
        }
        self.tar.remaining -= n as u64;
        Ok(n)
    }
}

/// pax records: `<len> <key>=<value>\n`.
fn parse_pax(mut body: &[u8]) -> io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    while !body.is_empty() && body[0] != 0 {
        let sp = body
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| invalid("bad pax record"))?;
        let len: usize = std::str::from_utf8(&body[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&l| l > sp && l <= body.len())
            .ok_or_else(|| invalid("bad pax record length"))?;
        let rec = &body[sp + 1..len];
        let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
        let rec = String::from_utf8(rec.to_vec()).map_err(|_| invalid("pax record not UTF-8"))?;
        if let Some((k, v)) = rec.split_once('=') {
            out.push((k.to_string(), v.to_string()));
        }
        body = &body[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tar::{Member, MemberKind, TarWriter};

    #[test]
    fn reads_what_the_writer_writes() {
        let mut w = TarWriter::new(Vec::new());
        let long = format!("pgdata/{}/file", "d".repeat(150));
        w.append_entry(&Member {
            path: "pgdata".into(),
            kind: MemberKind::Dir,
            mode: 0o700,
            mtime: 0,
        })
        .unwrap();
        w.append_bytes("pgdata/PG_VERSION", 0o600, 0, b"15\n")
            .unwrap();
        w.append_bytes(&long, 0o640, 0, &[7u8; 1000]).unwrap();
        w.append_entry(&Member {
            path: "pgdata/link".into(),
            kind: MemberKind::Symlink {
                target: format!("/{}", "t".repeat(120)),
            },
            mode: 0o777,
            mtime: 0,
        })
        .unwrap();
        let bytes = w.finish().unwrap();
        let mut r = TarReader::new(&bytes[..]);
        let e = r.next_entry().unwrap().unwrap();
        assert_eq!((e.path.as_str(), &e.kind), ("pgdata/", &EntryKind::Dir));
        let e = r.next_entry().unwrap().unwrap();
        assert_eq!(e.path, "pgdata/PG_VERSION");
        let mut s = String::new();
        r.body().read_to_string(&mut s).unwrap();
        assert_eq!(s, "15\n");
        // The next member's body is skipped when not read.
        let e = r.next_entry().unwrap().unwrap();
        assert_eq!(
            (e.path.as_str(), e.size, e.mode),
            (long.as_str(), 1000, 0o640)
        );
        let e = r.next_entry().unwrap().unwrap();
        assert_eq!(
            e.kind,
            EntryKind::Symlink {
                target: format!("/{}", "t".repeat(120))
            }
        );
        assert!(r.next_entry().unwrap().is_none());
    }

    #[test]
    fn corrupted_header_is_an_error() {
        let mut w = TarWriter::new(Vec::new());
        w.append_bytes("a", 0o600, 0, b"x").unwrap();
        let mut bytes = w.finish().unwrap();
        bytes[3] ^= 1;
        assert!(TarReader::new(&bytes[..]).next_entry().is_err());
        // Cut inside the body.
        let mut w = TarWriter::new(Vec::new());
        w.append_bytes("a", 0o600, 0, &[1u8; 2000]).unwrap();
        let bytes = w.finish().unwrap();
        let mut r = TarReader::new(&bytes[..1000]);
        r.next_entry().unwrap().unwrap();
        assert!(io::copy(&mut r.body(), &mut io::sink()).is_err());
    }

    /// Found while writing the `untar` fuzz target: a member declaring u64::MAX bytes
    /// (GNU base-256 size) overflowed `remaining + padding` when it was skipped (a panic in
    /// debug builds, a wrapped skip of 0 bytes in release). It is an error naming the member.
    #[test]
    fn huge_member_size_is_an_error_not_an_overflow() {
        let mut w = TarWriter::new(Vec::new());
        w.append_bytes("big", 0o600, 0, b"").unwrap();
        let mut bytes = w.finish().unwrap();
        // Size field: base-256 marker, then u64::MAX big-endian in the last 8 bytes.
        bytes[124] = 0x80;
        bytes[125..128].fill(0);
        bytes[128..136].fill(0xff);
        bytes[148..156].fill(b' ');
        let sum: u64 = bytes[..512].iter().map(|&b| u64::from(b)).sum();
        bytes[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let mut r = TarReader::new(&bytes[..]);
        let err = r.next_entry().unwrap_err();
        assert!(err.to_string().contains("\"big\" declares"), "{err}");
    }
}
