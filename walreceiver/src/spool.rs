//! The local spool: one pre-sized `<segment>.partial` file per segment being received, written
//! in place at the right offset, renamed to its final name when complete. A durable spool is
//! made so with fdatasync and a directory fsync after the rename; a spool that is only a cache
//! in front of the slot (the slot holds the same WAL until the archive does) skips both, and
//! its files are only trusted by the boot that wrote them (see the daemon's resume).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use walhoard_protocol::{Lsn, SegmentId, SegmentSize, TimelineId, WalSegmentName};

/// Mode of spool files: they hold plaintext WAL, which only the daemon's user may read (as
/// PostgreSQL's own pg_wal, `pg_file_create_mode`).
pub const FILE_MODE: u32 = 0o600;
/// Mode of the spool directory (as PostgreSQL's `pg_dir_create_mode`).
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` (and its parents) and makes it private ([`DIR_MODE`]), also when it existed
/// with a wider mode (made by an older version).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    if fs::metadata(dir)?.permissions().mode() & 0o777 != DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// Narrows an existing file (written by an older version) to [`FILE_MODE`].
fn make_private(file: &File) -> io::Result<()> {
    if file.metadata()?.permissions().mode() & 0o777 != FILE_MODE {
        file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    }
    Ok(())
}

/// Syncs a directory so that renames and creations in it are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A segment being received into the spool.
#[derive(Debug)]
pub struct SegmentFile {
    file: File,
    pub id: SegmentId,
    /// First LSN of the segment.
    pub start: Lsn,
    seg_size: SegmentSize,
    /// Bytes from the segment start that are written (not necessarily synced).
    written: u64,
    /// Bytes from the segment start that are durable on disk (or, when the spool is not made
    /// durable, simply written).
    synced: u64,
    /// fdatasync and directory fsyncs are done.
    durable: bool,
    path: PathBuf,
    dir: PathBuf,
}

impl SegmentFile {
    /// Opens (creating and pre-sizing) `<dir>/<segment>.partial` for the segment holding `at`.
    /// Receiving starts at `at`, so what lies before it in an existing file is kept. With
    /// `durable` false nothing is ever synced (see the module comment).
    pub fn open(
        dir: &Path,
        tli: TimelineId,
        at: Lsn,
        seg_size: SegmentSize,
        durable: bool,
    ) -> io::Result<Self> {
        let id = SegmentId::containing(tli, at, seg_size);
        let start = at.segment_start(seg_size);
        let path = dir.join(WalSegmentName::Partial(id).to_string());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&path)?;
        make_private(&file)?;
        if file.metadata()?.len() != seg_size.bytes() {
            // Pre-size so that later writes never extend the file (no metadata updates per
            // fdatasync) and a crash leaves zeros, which verification treats as unwritten.
            file.set_len(seg_size.bytes())?;
            if durable {
                file.sync_all()?;
                fsync_dir(dir)?;
            }
        }
        let offset = at.segment_offset(seg_size);
        Ok(SegmentFile {
            file,
            id,
            start,
            seg_size,
            written: offset,
            synced: offset,
            durable,
            path,
            dir: dir.to_path_buf(),
        })
    }

    /// The LSN up to which data is written.
    pub fn written_lsn(&self) -> Lsn {
        self.start + self.written
    }

    /// The LSN up to which data is durable.
    pub fn synced_lsn(&self) -> Lsn {
        self.start + self.synced
    }

    /// Writes `data` that starts at `at` (which must be the current end). Returns how many bytes
    /// fit in this segment; the caller continues with the rest in the next segment.
    pub fn write(&mut self, at: Lsn, data: &[u8]) -> io::Result<usize> {
        if at != self.written_lsn() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "WAL at {at} does not continue segment {} at {}",
                    self.id,
                    self.written_lsn()
                ),
            ));
        }
        let room = (self.seg_size.bytes() - self.written) as usize;
        let n = room.min(data.len());
        self.file.write_all_at(&data[..n], self.written)?;
        self.written += n as u64;
        Ok(n)
    }

    /// Whether this file is made durable (fdatasync, directory fsyncs).
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// Makes the file durable from now on, whatever it was opened as: its size and what is
    /// written so far are synced, and its directory entry, then every later sync and the
    /// rename are durable too.
    pub fn make_durable(&mut self) -> io::Result<()> {
        if !self.durable {
            self.file.sync_all()?;
            fsync_dir(&self.dir)?;
            self.durable = true;
            self.synced = self.written;
            return Ok(());
        }
        self.sync()
    }

    /// Makes everything written durable (fdatasync), when the spool is durable.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.synced != self.written {
            if self.durable {
                self.file.sync_data()?;
            }
            self.synced = self.written;
        }
        Ok(())
    }

    /// Reads the whole file back into `buf`, replacing its content (for verification before
    /// it is handed on; the receiver reuses one buffer for every segment).
    pub fn read_all_into(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        self.read_prefix_into(buf, self.seg_size.bytes())
    }

    /// Reads the segment's bytes from offset `from` to `to` (both within what is written):
    /// a partial upload of a segment received without a buffer.
    pub fn read_range(&self, from: u64, to: u64) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut out = vec![0u8; to.saturating_sub(from) as usize];
        self.file.read_exact_at(&mut out, from)?;
        Ok(out)
    }

    /// Reads the segment's first `len` bytes into `buf` (replacing its content).
    pub fn read_first_page_into(&self, buf: &mut Vec<u8>, len: usize) -> io::Result<()> {
        self.read_prefix_into(buf, len as u64)
    }

    fn read_prefix_into(&self, buf: &mut Vec<u8>, len: u64) -> io::Result<()> {
        // read_to_end fills spare capacity without zeroing it first: zeroing 16 MiB per
        // segment was a few per cent of the receiver's CPU (docs/benchmarks.md).
        buf.clear();
        buf.reserve(len as usize);
        let mut f = &self.file;
        f.seek(SeekFrom::Start(0))?;
        f.take(len).read_to_end(buf)?;
        if buf.len() as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: {} of {len} bytes", self.path.display(), buf.len()),
            ));
        }
        Ok(())
    }

    /// Syncs, renames `<segment>.partial` to `<segment>` and syncs the directory.
    pub fn complete(mut self) -> io::Result<PathBuf> {
        self.sync()?;
        let final_path = self.dir.join(WalSegmentName::Segment(self.id).to_string());
        fs::rename(&self.path, &final_path)?;
        if self.durable {
            fsync_dir(&self.dir)?;
        }
        Ok(final_path)
    }

    /// Syncs and leaves the file under its `.partial` name (end of a timeline). Always made
    /// durable: after a switch the server may no longer serve the old timeline's last segment.
    pub fn finish_partial(mut self) -> io::Result<PathBuf> {
        self.durable = true;
        self.file.sync_data()?;
        self.synced = self.written;
        Ok(self.path)
    }
}

/// Writes a small file atomically and durably: temp name, fsync, rename, directory fsync.
pub fn write_durable(dir: &Path, name: &str, content: &[u8]) -> io::Result<PathBuf> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        make_private(&f)?;
        f.write_all_at(content, 0)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    fsync_dir(dir)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_split_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let seg = SegmentSize::new(1 << 20).unwrap();
        let tli = TimelineId(1);
        let start = Lsn(3 << 20);
        let mut f = SegmentFile::open(dir.path(), tli, start, seg, true).unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join("000000010000000000000003.partial"))
                .unwrap()
                .len(),
            1 << 20
        );
        let data = vec![7u8; (1 << 20) + 100];
        let n = f.write(start, &data).unwrap();
        assert_eq!(n, 1 << 20, "only the segment's share is written");
        assert_eq!(f.written_lsn(), start + (1 << 20), "segment not full");
        let mut back = b"stale".to_vec();
        f.read_all_into(&mut back).unwrap();
        assert_eq!(back, &data[..1 << 20], "read back differs");
        assert!(
            f.write(start + 5, b"x").is_err(),
            "non-contiguous write accepted"
        );
        let path = f.complete().unwrap();
        assert_eq!(path, dir.path().join("000000010000000000000003"));
        assert!(!dir.path().join("000000010000000000000003.partial").exists());
        // Resuming in the middle keeps the earlier bytes.
        let mid = Lsn((4 << 20) + 10);
        let mut g = SegmentFile::open(dir.path(), tli, mid, seg, false).unwrap();
        assert_eq!(g.written_lsn(), mid);
        assert_eq!(g.write(mid, b"abc").unwrap(), 3);
        g.sync().unwrap();
        assert_eq!(g.synced_lsn(), mid + 3);
        let p = g.finish_partial().unwrap();
        let content = std::fs::read(p).unwrap();
        assert_eq!(&content[10..13], b"abc");
    }

    #[test]
    fn spool_files_and_directory_are_private() {
        // Plaintext WAL: 0600 files in a 0700 directory, like PostgreSQL's pg_wal (they were
        // 0644 in 0755), also when an older version left them wider.
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("site/xlog_incoming");
        create_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        std::fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700, "an existing wider directory is narrowed");
        let seg = SegmentSize::new(1 << 20).unwrap();
        let start = Lsn(3 << 20);
        let mut f = SegmentFile::open(&dir, TimelineId(1), start, seg, true).unwrap();
        let partial = dir.join("000000010000000000000003.partial");
        assert_eq!(mode(&partial), 0o600);
        f.write(start, &vec![1u8; 1 << 20]).unwrap();
        let done = f.complete().unwrap();
        assert_eq!(mode(&done), 0o600);
        let old = dir.join("000000010000000000000004.partial");
        std::fs::write(&old, b"").unwrap();
        std::fs::set_permissions(&old, fs::Permissions::from_mode(0o644)).unwrap();
        SegmentFile::open(&dir, TimelineId(1), Lsn(4 << 20), seg, false).unwrap();
        assert_eq!(
            mode(&old),
            0o600,
            "a spool file of an older version is narrowed"
        );
        let history = write_durable(&dir, "00000002.history", b"1\t0/3000000\tx\n").unwrap();
        assert_eq!(mode(&history), 0o600);
    }

    #[test]
    fn durable_small_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_durable(dir.path(), "00000002.history", b"1\t0/3000000\treason\n").unwrap();
        assert_eq!(std::fs::read(p).unwrap(), b"1\t0/3000000\treason\n");
        assert!(!dir.path().join(".00000002.history.tmp").exists());
    }
}
