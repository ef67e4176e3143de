//! `get-basebackup --delta`: restore into an existing data directory (a standby that fell
//! behind, a failed primary to rejoin), writing only what differs.
//!
//! Downloads: a delta-layout backup (pghoard's `pghoard-delta-v1`/`-v2`, and walhoard's own
//! delta mode, which writes the same layout) stores every file above a size as an object of
//! its own named by the BLAKE2s-256 of its contents, with its size, in the manifest: a local
//! file of that size and digest is kept and its object never fetched
//! ([`super::extract::Extractor::keep_if_same`], counted in [`Seen::unfetched`]). Every
//! other object is fetched: the stream format's chunks are whole `BASE_BACKUP` tars, one
//! compressed stream each; local-tar chunks and delta bundle chunks list their files' names
//! but no size or hash, so nothing tells that a chunk's files are already right.
//!
//! Writes: each file that is fetched is compared with the file already there block by block
//! ([`rewrite_in_place`]) as its bytes arrive, up to 1 MiB per read of each side, and only
//! blocks that differ are written (adjacent ones at once); a file of another length is cut
//! or extended. A file that was written to is synced on a thread of its own
//! ([`SyncQueue`]), waited for before the report and before `global/pg_control` is back.
//! The chunk's decryption and decompression, its SHA-1 and this comparison each run on a
//! thread of their own ([`crate::pipeline::handoff`]). Everything below the target (and each
//! tablespace directory) that the backup does not have is then removed
//! ([`Seen::remove_unseen`]): the result is the tree a restore into an empty directory gives.
//!
//! Safety: the server must be stopped ([`check_stopped`], PostgreSQL's own `postmaster.pid`
//! test in `CreateLockFile`); `global/pg_control` is removed before anything else is
//! touched and written back (held back, [`super::extract::HELD_BACK`]) last, so a delta
//! restore that fails or is killed leaves a directory PostgreSQL refuses to start on
//! ("could not open file global/pg_control"); running it again finishes the job.

use crate::durable::read_full_at;
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

use super::beneath::Beneath;
use crate::pipeline::encryption::read_full;

/// Compared and written in units of PostgreSQL's block size (BLCKSZ).
const BLOCK: usize = 8192;

/// Refuses a data directory whose `postmaster.pid` names a live process: PostgreSQL's
/// `CreateLockFile` reasoning (the first line is the postmaster's pid; `kill(pid, 0)` tells
/// whether it still exists, EPERM meaning it does but belongs to someone else).
pub fn check_stopped(dir: &Path) -> Result<()> {
    let pidfile = dir.join("postmaster.pid");
    let text = match fs::read_to_string(&pidfile) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("read {}", pidfile.display())),
    };
    let pid = text.lines().next().unwrap_or("").trim();
    let Ok(pid) = pid.parse::<i32>() else {
        // Not a pid (an empty file left by a crash while it was being written): nothing runs.
        return Ok(());
    };
    if pid > 0 && alive(pid) {
        bail!(
            "{}: PostgreSQL (pid {pid}) is running on {}: stop it before a --delta restore \
             (if that pid is not a postmaster, remove postmaster.pid yourself)",
            pidfile.display(),
            dir.display()
        );
    }
    Ok(())
}

fn alive(pid: i32) -> bool {
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        return false;
    };
    // Signal 0 sends nothing; it only checks that the process exists.
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        Err(e) => e == rustix::io::Errno::PERM,
    }
}

/// Removes `global/pg_control` (durably) so that, until the restore finished, the directory
/// is not one PostgreSQL starts on.
pub fn unmark(dir: &Path) -> Result<()> {
    let root = Beneath::open(dir).with_context(|| format!("open {}", dir.display()))?;
    let rel = Path::new("global/pg_control");
    let global = dir.join("global");
    if root
        .remove_file(rel)
        .with_context(|| format!("remove {}", dir.join(rel).display()))?
    {
        walhoard_walreceiver::spool::fsync_dir(&global)
            .with_context(|| format!("sync {}", global.display()))?;
    }
    Ok(())
}

/// What a delta restore kept and wrote, and every path the backup has.
#[derive(Debug, Default)]
pub struct Seen {
    paths: Mutex<HashSet<PathBuf>>,
    /// Bytes written into files (whole blocks that differed, and new files).
    pub written: AtomicU64,
    /// Files that were already identical.
    pub kept: AtomicU64,
    /// Objects not downloaded at all: files a delta-layout backup stores as objects of their
    /// own, whose local copy already had the size and digest the manifest records
    /// ([`super::extract::Extractor::keep_if_same`]).
    pub unfetched: AtomicU64,
    /// Files rewritten in place, waiting to be synced.
    pub syncs: SyncQueue,
}

/// Files synced on a thread of their own, so that the comparison of the next files goes on
/// while the disk writes the blocks that differed. [`SyncQueue::wait`] returns once every
/// file pushed is synced (or with the first error); the restore waits before anything makes
/// the directory a data directory again. At most [`SYNC_QUEUE`] files wait (open).
#[derive(Debug, Default)]
pub struct SyncQueue {
    inner: Mutex<Option<Syncing>>,
}

type Syncing = (
    std::sync::mpsc::SyncSender<(PathBuf, File)>,
    std::thread::JoinHandle<io::Result<()>>,
);

/// Files (open descriptors) waiting for the sync thread.
const SYNC_QUEUE: usize = 64;

impl SyncQueue {
    /// Syncs `f` (the file at `path`) soon, on the sync thread.
    pub fn push(&self, path: PathBuf, f: File) -> io::Result<()> {
        let tx = {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if inner.is_none() {
                let (tx, rx) = std::sync::mpsc::sync_channel::<(PathBuf, File)>(SYNC_QUEUE);
                let h = std::thread::Builder::new()
                    .name("restore-sync".into())
                    .spawn(move || {
                        for (path, f) in rx {
                            f.sync_all().map_err(|e| {
                                io::Error::new(e.kind(), format!("sync {}: {e}", path.display()))
                            })?;
                        }
                        Ok(())
                    })?;
                *inner = Some((tx, h));
            }
            inner.as_ref().map(|(tx, _)| tx.clone())
        };
        match tx.map(|tx| tx.send((path, f))) {
            Some(Ok(())) => Ok(()),
            // The thread stopped at an error: that one is the cause.
            _ => match self.wait() {
                Err(e) => Err(e),
                Ok(()) => Err(io::Error::other("the sync thread stopped")),
            },
        }
    }

    /// Waits until every file pushed so far is synced.
    pub fn wait(&self) -> io::Result<()> {
        let taken = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some((tx, h)) = taken else {
            return Ok(());
        };
        drop(tx);
        h.join()
            .unwrap_or_else(|_| Err(io::Error::other("the sync thread panicked")))
    }
}

impl Seen {
    /// Records `path` (absolute, below a restore root `root`) and its directories.
    pub fn record(&self, root: &Path, path: &Path) {
        let mut paths = self.paths.lock().unwrap_or_else(|p| p.into_inner());
        let mut p = path.to_path_buf();
        while p.starts_with(root) && paths.insert(p.clone()) {
            if !p.pop() {
                break;
            }
        }
    }

    /// Removes everything below `root` that no member of the backup named; never follows a
    /// symlink (a link is removed, not what it points to). Returns how many entries went.
    pub fn remove_unseen(&self, root: &Path) -> io::Result<u64> {
        let paths = self.paths.lock().unwrap_or_else(|p| p.into_inner());
        remove_unseen_in(root, &paths)
    }
}

fn remove_unseen_in(dir: &Path, seen: &HashSet<PathBuf>) -> io::Result<u64> {
    let mut removed = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        let kind = e.file_type()?;
        if seen.contains(&p) {
            if kind.is_dir() {
                removed += remove_unseen_in(&p, seen)?;
            }
            continue;
        }
        if kind.is_dir() {
            // remove_dir_all does not follow symlinks inside.
            fs::remove_dir_all(&p)?;
        } else {
            fs::remove_file(&p)?;
        }
        tracing::debug!(path = %p.display(), "delta restore: removed, not in the backup");
        removed += 1;
    }
    Ok(removed)
}

/// Compared and written at most this much at a time: one `read` of the new bytes, one
/// `pread` of the old (a syscall per 8 KiB block made the comparison of an 800 MB `base.tar`
/// cost 100,000 `pread`s).
const RUN: usize = 1 << 20;

/// Makes the regular file at `path` hold `body` (`size` bytes, which sizes the buffers; the
/// body decides the length), writing only the blocks that differ, runs of adjacent differing
/// blocks in one write. Opened with `O_NOFOLLOW` (the caller checked it is a regular file,
/// not a link). Returns the bytes written and, if something was written or the length
/// changed, the file, which the caller must sync (nothing else is written to it).
pub fn rewrite_in_place(
    path: &Path,
    body: &mut dyn Read,
    size: u64,
    mode: u32,
) -> io::Result<(u64, Option<File>)> {
    use std::os::unix::fs::PermissionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
    let meta = f.metadata()?;
    let old_len = meta.len();
    // Read front to back once: a larger readahead where the old file is not cached. Advice
    // only; a failure changes nothing.
    let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::Sequential);
    let cap = usize::try_from(size)
        .unwrap_or(RUN)
        .clamp(BLOCK, RUN)
        .next_multiple_of(BLOCK)
        .min(RUN);
    let mut new = vec![0u8; cap];
    let mut old = vec![0u8; cap];
    let mut at = 0u64;
    let mut written = 0u64;
    loop {
        let n = read_full(&mut &mut *body, &mut new)?;
        if n == 0 {
            break;
        }
        let have = if at < old_len {
            let want = usize::try_from(old_len - at).map_or(n, |left| left.min(n));
            read_full_at(&f, &mut old[..want], at)?
        } else {
            0
        };
        for (from, to) in differing_runs(&new[..n], &old[..have]) {
            f.write_all_at(&new[from..to], at + from as u64)?;
            written += (to - from) as u64;
        }
        at += n as u64;
    }
    if old_len != at {
        f.set_len(at)?;
    }
    if meta.permissions().mode() & 0o7777 != mode {
        f.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    let unsynced = (written > 0 || old_len != at).then_some(f);
    Ok((written, unsynced))
}

/// The byte ranges of `new` to write over `old` (which may be shorter: what the file had at
/// that place), in [`BLOCK`]s, adjacent differing blocks merged into one range.
fn differing_runs<'a>(new: &'a [u8], old: &'a [u8]) -> impl Iterator<Item = (usize, usize)> + 'a {
    let differs = move |from: usize| {
        let to = (from + BLOCK).min(new.len());
        to > old.len() || new[from..to] != old[from..to]
    };
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < new.len() && !differs(i) {
            i += BLOCK;
        }
        if i >= new.len() {
            return None;
        }
        let from = i;
        while i < new.len() && differs(i) {
            i += BLOCK;
        }
        Some((from, i.min(new.len())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_differing_blocks_are_written_and_length_follows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut want = vec![1u8; BLOCK * 3 + 100];
        fs::write(&p, &want).unwrap();
        let size = want.len() as u64;
        // Nothing written: nothing to sync.
        let (n, unsynced) = rewrite_in_place(&p, &mut &want[..], size, 0o600).unwrap();
        assert_eq!((n, unsynced.is_none()), (0, true));
        want[BLOCK + 5] = 9;
        let (n, unsynced) = rewrite_in_place(&p, &mut &want[..], size, 0o600).unwrap();
        assert_eq!((n, unsynced.is_some()), (BLOCK as u64, true));
        assert_eq!(fs::read(&p).unwrap(), want);
        // Shorter: cut; longer: the new tail written.
        let short = &want[..BLOCK];
        rewrite_in_place(&p, &mut &short[..], BLOCK as u64, 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), short);
        assert_eq!(
            rewrite_in_place(&p, &mut &want[..], size, 0o600).unwrap().0,
            (want.len() - BLOCK) as u64
        );
        assert_eq!(fs::read(&p).unwrap(), want);
    }

    #[test]
    fn differing_blocks_are_merged_into_runs() {
        let old = vec![0u8; BLOCK * 6 + 10];
        let mut new = old.clone();
        new[BLOCK] = 1;
        new[BLOCK * 2 + 7] = 1;
        new[BLOCK * 4] = 1;
        let runs: Vec<_> = differing_runs(&new, &old).collect();
        assert_eq!(runs, [(BLOCK, BLOCK * 3), (BLOCK * 4, BLOCK * 5)]);
        // The short last block, and where the old file ends early.
        new[BLOCK * 6 + 9] = 1;
        let runs: Vec<_> = differing_runs(&new, &old[..BLOCK * 4 + 3]).collect();
        assert_eq!(runs, [(BLOCK, BLOCK * 3), (BLOCK * 4, BLOCK * 6 + 10)]);
        assert_eq!(differing_runs(&old, &old).count(), 0);
    }

    /// Files larger than one compare run: changes on both sides of a run's edge, at the very
    /// end, and a body delivered in reads of odd sizes, all end up exactly as the body says.
    #[test]
    fn changes_across_run_edges_are_all_written() {
        struct Odd<'a>(&'a [u8], usize);
        impl Read for Odd<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.1 = self.1 % 9_973 + 1_237;
                let n = buf.len().min(self.1).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let len = RUN * 3 + BLOCK * 2 + 77;
        let old: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        fs::write(&p, &old).unwrap();
        let mut want = old.clone();
        for at in [0, RUN - 1, RUN, 2 * RUN + BLOCK, len - 1] {
            want[at] ^= 0xff;
        }
        let n = rewrite_in_place(&p, &mut Odd(&want, 0), len as u64, 0o600)
            .unwrap()
            .0;
        assert_eq!(fs::read(&p).unwrap(), want);
        // Blocks 0, the two around the first edge, the one after 2 MiB, the last (short) one.
        assert_eq!(n, (BLOCK * 4 + 77) as u64);
        // A longer body over it: the tail past the old end is written whole.
        want.extend((0..RUN / 2).map(|i| (i % 13) as u8));
        let n = rewrite_in_place(&p, &mut Odd(&want, 0), want.len() as u64, 0o640)
            .unwrap()
            .0;
        assert_eq!(fs::read(&p).unwrap(), want);
        assert_eq!(n, (want.len() - (len - 77)) as u64);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
    }

    /// Pushed files are synced by the time `wait` returns; a failed sync is reported by
    /// `wait` (or the next push), naming the file.
    #[test]
    fn the_sync_queue_syncs_and_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        let q = SyncQueue::default();
        assert!(q.wait().is_ok());
        for i in 0..(SYNC_QUEUE * 2) {
            let p = dir.path().join(format!("f{i}"));
            fs::write(&p, b"x").unwrap();
            q.push(p.clone(), File::open(&p).unwrap()).unwrap();
        }
        q.wait().unwrap();
        // fsync of a character device fails with EINVAL.
        let bad = File::open("/dev/null").unwrap();
        let first = q.push(PathBuf::from("/dev/null"), bad);
        let err = first.and_then(|()| q.wait()).unwrap_err();
        assert!(
            err.to_string().contains("sync ") && err.to_string().contains("/dev/null"),
            "{err}"
        );
    }
}
