//! A streaming tar writer: ustar headers, GNU long names when a path does not fit, and a file
//! body of exactly the size the header announced whatever the file does meanwhile.
//!
//! PostgreSQL's own archives are ustar (`tarCreateHeader` in src/port/tar.c); GNU tar, bsdtar
//! and Python's tarfile read what this writes.

use std::io::{self, Read, Write};

pub const BLOCK: usize = 512;

/// What kind of member, with its kind-specific data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberKind {
    File { size: u64 },
    Dir,
    Symlink { target: String },
}

/// A member's header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub path: String,
    pub kind: MemberKind,
    /// Permission bits.
    pub mode: u32,
    /// Seconds since the Unix epoch.
    pub mtime: u64,
}

/// Writes a tar stream into `W`, counting bytes.
pub struct TarWriter<W: Write> {
    out: W,
    written: u64,
}

fn octal(field: &mut [u8], value: u64) -> io::Result<()> {
    // Digits, then a NUL: `len - 1` digits, zero padded.
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    if s.len() > digits {
        // Sizes of 8 GiB and more: GNU base-256 (high bit set, big-endian binary).
        if field.len() == 12 {
            field.fill(0);
            field[0] = 0x80;
            field[4..].copy_from_slice(&value.to_be_bytes());
            return Ok(());
        }
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("tar header value {value} does not fit"),
        ));
    }
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
    Ok(())
}

/// Splits `path` into a ustar (prefix, name) pair, if it fits.
fn ustar_split(path: &str) -> Option<(&str, &str)> {
    if path.len() <= 100 {
        return Some(("", path));
    }
    let b = path.as_bytes();
    // The name part takes at most 100 bytes, the prefix at most 155; split at a '/'.
    let min = path.len().saturating_sub(101);
    (min..b.len().min(156))
        .find(|&i| b[i] == b'/')
        .map(|i| (&path[..i], &path[i + 1..]))
        .filter(|(_, n)| !n.is_empty() && n.len() <= 100)
}

fn header(
    path: &str,
    prefix: &str,
    typeflag: u8,
    size: u64,
    mode: u32,
    mtime: u64,
    link: &str,
) -> io::Result<[u8; BLOCK]> {
    let mut h = [0u8; BLOCK];
    h[..path.len()].copy_from_slice(path.as_bytes());
    octal(&mut h[100..108], u64::from(mode & 0o7777))?;
    octal(&mut h[108..116], 0)?;
    octal(&mut h[116..124], 0)?;
    octal(&mut h[124..136], size)?;
    octal(&mut h[136..148], mtime.min(0o77777777777))?;
    h[156] = typeflag;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..273].copy_from_slice(b"postgres");
    h[297..305].copy_from_slice(b"postgres");
    h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
    // The checksum is computed with its own field as spaces.
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    octal(&mut h[148..155], sum)?;
    h[155] = b' ';
    Ok(h)
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> Self {
        TarWriter { out, written: 0 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn put(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let rem = (size % BLOCK as u64) as usize;
        if rem != 0 {
            self.put(&[0u8; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }

    /// A GNU `././@LongLink` member carrying a name (typeflag `L`) or link target (`K`).
    fn long_link(&mut self, flag: u8, value: &str) -> io::Result<()> {
        let data = [value.as_bytes(), b"\0"].concat();
        let h = header("././@LongLink", "", flag, data.len() as u64, 0o644, 0, "")?;
        self.put(&h)?;
        self.put(&data)?;
        self.pad(data.len() as u64)
    }

    fn write_header(&mut self, m: &Member) -> io::Result<()> {
        if m.path.is_empty() || m.path.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad tar member name {:?}", m.path),
            ));
        }
        let (flag, size, link) = match &m.kind {
            MemberKind::File { size } => (b'0', *size, ""),
            MemberKind::Dir => (b'5', 0, ""),
            MemberKind::Symlink { target } => (b'2', 0, target.as_str()),
        };
        let link = if link.len() > 100 {
            self.long_link(b'K', link)?;
            &link[..100]
        } else {
            link
        };
        let dir_path;
        let path = if matches!(m.kind, MemberKind::Dir) && !m.path.ends_with('/') {
            dir_path = format!("{}/", m.path);
            dir_path.as_str()
        } else {
            m.path.as_str()
        };
        let (prefix, name) = match ustar_split(path) {
            Some(split) => split,
            None => {
                self.long_link(b'L', path)?;
                ("", &path[..100])
            }
        };
        let h = header(name, prefix, flag, size, m.mode, m.mtime, link)?;
        self.put(&h)
    }

    /// A directory or symlink member.
    pub fn append_entry(&mut self, m: &Member) -> io::Result<()> {
        if let MemberKind::File { .. } = m.kind {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "files need their data: use append_file",
            ));
        }
        self.write_header(m)
    }

    /// A file member whose body is read from `data`: exactly the size in `m`, so a file that
    /// grew is cut at that size and one that shrank is padded with zeros (as basebackup.c's
    /// sendFile does; WAL replay from the backup's start repairs both). Returns the bytes
    /// read from `data`.
    pub fn append_file(&mut self, m: &Member, data: &mut dyn Read) -> io::Result<u64> {
        let MemberKind::File { size } = m.kind else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "append_file needs a file member",
            ));
        };
        self.write_header(m)?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut done = 0u64;
        while done < size {
            let want = (size - done).min(buf.len() as u64) as usize;
            let n = match data.read(&mut buf[..want]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                break;
            }
            self.put(&buf[..n])?;
            done += n as u64;
        }
        let read = done;
        while done < size {
            let n = (size - done).min(buf.len() as u64) as usize;
            buf[..n].fill(0);
            self.put(&buf[..n])?;
            done += n as u64;
        }
        self.pad(size)?;
        Ok(read)
    }

    /// A file member from memory.
    pub fn append_bytes(
        &mut self,
        path: &str,
        mode: u32,
        mtime: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let m = Member {
            path: path.into(),
            kind: MemberKind::File {
                size: data.len() as u64,
            },
            mode,
            mtime,
        };
        self.append_file(&m, &mut &data[..]).map(|_| ())
    }

    /// Writes the end-of-archive marker (two zero blocks) and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.put(&[0u8; 2 * BLOCK])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(tar: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.tar");
        std::fs::write(&p, tar).unwrap();
        let out = std::process::Command::new("tar")
            .arg("-tvf")
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn gnu_tar_reads_long_names_and_exact_sizes() {
        let mut w = TarWriter::new(Vec::new());
        let long = format!(
            "tablespaces/{}/PG_15_202209061/5/{}",
            "t".repeat(63),
            "1".repeat(60)
        );
        let longer = format!("pgdata/{}", "x/".repeat(140));
        w.append_entry(&Member {
            path: "pgdata".into(),
            kind: MemberKind::Dir,
            mode: 0o700,
            mtime: 1,
        })
        .unwrap();
        w.append_bytes(&long, 0o600, 2, b"hello").unwrap();
        // A file that grew after the header was written: cut at the announced size.
        let grown = Member {
            path: "pgdata/grown".into(),
            kind: MemberKind::File { size: 3 },
            mode: 0o600,
            mtime: 3,
        };
        assert_eq!(w.append_file(&grown, &mut &b"abcdef"[..]).unwrap(), 3);
        // One that shrank: zero padded.
        let shrunk = Member {
            path: format!("{}f", longer),
            kind: MemberKind::File { size: 1000 },
            mode: 0o600,
            mtime: 4,
        };
        assert_eq!(w.append_file(&shrunk, &mut &b"xy"[..]).unwrap(), 2);
        w.append_entry(&Member {
            path: "pgdata/pg_wal".into(),
            kind: MemberKind::Symlink {
                target: "/elsewhere/".to_string() + &"w".repeat(120),
            },
            mode: 0o777,
            mtime: 5,
        })
        .unwrap();
        let tar = w.finish().unwrap();
        assert_eq!(tar.len() % BLOCK, 0);
        let listing = list(&tar);
        assert!(listing.contains(&long), "{listing}");
        assert!(listing.contains(&format!("{longer}f")), "{listing}");
        assert!(listing.contains(" 3 ") && listing.contains("pgdata/grown"));
        assert!(listing.contains(&"w".repeat(120)), "{listing}");
        assert!(listing.contains(" 1000 "), "{listing}");
    }

    #[test]
    fn ustar_split_respects_field_sizes() {
        assert_eq!(ustar_split("a/b"), Some(("", "a/b")));
        let p = format!("{}/{}", "a".repeat(150), "b".repeat(99));
        assert_eq!(ustar_split(&p), Some((&p[..150], &p[151..])));
        assert_eq!(ustar_split(&"c".repeat(101)), None);
    }
}
