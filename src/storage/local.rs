//! Direct writes to local storage, for [`super::ObjectStore::put_whole`]; every rename and new
//! directory made durable with [`crate::durable`]. Direct reads of metadata sidecars.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use crate::durable::{ensure_dir_durable, forget_dir, sync_parent};

/// What `O_DIRECT` asks of a buffer's address, a write's length and its file offset: a page,
/// which covers every logical block size up to 4 KiB. A buffer aligned to it (the one-shot
/// upload's sealed objects are) is written to local storage without the page cache.
pub const DIRECT_ALIGN: usize = 4096;

/// Writes an object and its sidecar to new files in `tmp_dir`, syncs both, renames the
/// sidecar and then the object into place (creating their directory; a reader never finds an
/// object without its metadata) and syncs their directory once, which makes both new names
/// durable: the two files synced at once, then the directory, where one file at a time took
/// four syncs one after the other (every small object is on this path, and a synchronous
/// site's commits wait for it). Each target is the old file or the whole new
/// one, never part of it. The object is an archive object, read again only by a restore: it
/// does not go through the page cache when it can be written with `O_DIRECT` (its address is
/// aligned and the file system takes it; the last partial page is written through the cache),
/// and what did go through the cache is dropped from it once it is on disk (objects of at
/// least [`DROP_CACHE_MIN`]).
///
/// The directories are made (durably) once and then remembered ([`ensure_dir_durable`]); one
/// removed behind the process' back makes the write fail with "not found", and the write is
/// made once more after looking at them again.
pub(super) fn write_object_synced(
    tmp_dir: &Path,
    side: (&Path, &[u8]),
    target: (&Path, &[u8]),
) -> io::Result<()> {
    let dirs = [side.0.parent(), target.0.parent(), Some(tmp_dir)];
    match write_object_once(tmp_dir, side, target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            for dir in dirs.into_iter().flatten() {
                forget_dir(dir);
            }
            write_object_once(tmp_dir, side, target)
        }
        done => done,
    }
}

/// Objects smaller than this are not dropped from the page cache after their write: the
/// advice is a system call per object (a synchronous site's partial objects are one per
/// commit, a few kB each), for a few pages the kernel reclaims like any others.
const DROP_CACHE_MIN: usize = 64 << 10;

fn write_object_once(
    tmp_dir: &Path,
    (side, side_data): (&Path, &[u8]),
    (target, data): (&Path, &[u8]),
) -> io::Result<()> {
    for dir in [side.parent(), target.parent(), Some(tmp_dir)]
        .into_iter()
        .flatten()
    {
        ensure_dir_durable(dir)?;
    }
    let tmp_side = tmp_dir.join(crate::durable::temp_name());
    let tmp = tmp_dir.join(crate::durable::temp_name());
    let result = (|| {
        let fs = write_file(&tmp_side, side_data, false)?;
        let f = write_file(&tmp, data, true)?;
        // At once, on two threads: the file system commits both in one journal transaction
        // where one after the other took two (measured: docs/benchmarks.md).
        sync_both(fs, &f)?;
        // Advice only: a failure changes nothing that was written.
        if data.len() >= DROP_CACHE_MIN {
            let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
        }
        std::fs::rename(&tmp_side, side)?;
        std::fs::rename(&tmp, target)?;
        if side.parent() != target.parent() {
            sync_parent(side)?;
        }
        sync_parent(target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp_side);
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Syncs `side` on another thread while this one syncs `f`. The other thread is one of the
/// runtime's pooled blocking threads when there is a runtime (a thread made and ended per
/// object cost every synchronous commit its creation: issue 16, docs/benchmarks.md), else a
/// new one. A helper that has not started by the time `f` is synced is not waited for: this
/// thread syncs `side` itself, so that a blocking pool with every thread busy cannot hold the
/// write up.
fn sync_both(side: File, f: &File) -> io::Result<()> {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return std::thread::scope(|scope| {
            let side_synced = scope.spawn(|| side.sync_all());
            let synced = f.sync_all();
            side_synced
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("sidecar sync thread panicked")))
                .and(synced)
        });
    };
    let job = Arc::new(SideSync {
        file: side,
        state: Mutex::new(SyncState::Waiting),
        done: Condvar::new(),
    });
    let helper = job.clone();
    rt.spawn_blocking(move || helper.run_if_waiting());
    let synced = f.sync_all();
    job.result_or_run().and(synced)
}

/// A sidecar sync handed to a helper thread ([`sync_both`]).
struct SideSync {
    file: File,
    state: Mutex<SyncState>,
    done: Condvar,
}

enum SyncState {
    Waiting,
    Running,
    Done(io::Result<()>),
    /// The caller synced it itself.
    Taken,
}

impl SideSync {
    fn lock(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The helper's side: syncs unless the caller took the job.
    fn run_if_waiting(&self) {
        {
            let mut st = self.lock();
            if !matches!(*st, SyncState::Waiting) {
                return;
            }
            *st = SyncState::Running;
        }
        let r = self.file.sync_all();
        *self.lock() = SyncState::Done(r);
        self.done.notify_all();
    }

    /// The caller's side: the helper's result, waiting for it while it runs, or the sync
    /// done here when the helper has not started.
    fn result_or_run(&self) -> io::Result<()> {
        let mut st = self.lock();
        loop {
            match std::mem::replace(&mut *st, SyncState::Taken) {
                SyncState::Waiting => {
                    drop(st);
                    return self.file.sync_all();
                }
                SyncState::Running => {
                    *st = SyncState::Running;
                    st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                SyncState::Done(r) => return r,
                SyncState::Taken => {
                    return Err(io::Error::other("sidecar sync result taken twice"))
                }
            }
        }
    }
}

/// Creates `tmp` holding `data`, not yet synced: an archive object in an aligned buffer with
/// `O_DIRECT` (all but its last partial page), anything else, or anything the direct write
/// failed on, through the page cache.
fn write_file(tmp: &Path, data: &[u8], archive: bool) -> io::Result<File> {
    let direct = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
    if archive && direct > 0 && data.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
        match write_direct(tmp, data, direct) {
            Ok(f) => return Ok(f),
            // Not every file system takes O_DIRECT (EINVAL, possibly after creating the
            // file); the cache always works.
            Err(e) => {
                tracing::debug!(file = %tmp.display(), error = %e, "O_DIRECT write failed; writing through the page cache");
                match std::fs::remove_file(tmp) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
    }
    let mut f = OpenOptions::new().write(true).create_new(true).open(tmp)?;
    f.write_all(data)?;
    Ok(f)
}

/// `data[..direct]` with `O_DIRECT`, the rest (less than a page) through the page cache;
/// returns the cached handle, whose `fsync` covers both.
fn write_direct(tmp: &Path, data: &[u8], direct: usize) -> io::Result<File> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(tmp)?;
    f.write_all(&data[..direct])?;
    let f = OpenOptions::new().write(true).open(tmp)?;
    f.write_all_at(&data[direct..], direct as u64)?;
    Ok(f)
}

/// The most a metadata sidecar may hold (pghoard's and ours are a few hundred bytes).
pub(super) const SIDECAR_MAX: u64 = 1 << 20;

/// A metadata sidecar's bytes, read here rather than through OpenDAL: its local reader
/// zero-fills a 2 MiB buffer for a read of any size and keeps it pooled in the store (up to
/// 16 of them), so one metadata read per site at start left about 2 MiB of RSS with every
/// site for good (docs/benchmarks.md, "Many sites"). `InvalidData` when it is larger than
/// [`SIDECAR_MAX`].
pub(super) fn read_sidecar(path: &Path) -> io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    File::open(path)?
        .take(SIDECAR_MAX + 1)
        .read_to_end(&mut raw)?;
    if raw.len() as u64 > SIDECAR_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {SIDECAR_MAX} bytes: not a metadata sidecar"),
        ));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use crate::durable::tests::synced_under;

    /// Issue 16: the sidecar's sync runs on a pooled helper thread, and the write never waits
    /// for a helper that has not started (a blocking pool with every thread busy): the caller
    /// syncs the file itself, and the late helper then does nothing.
    #[test]
    fn a_sidecar_sync_not_started_is_done_by_the_caller() {
        use std::sync::{Condvar, Mutex};
        let t = tempfile::tempdir().unwrap();
        let job = |name: &str| super::SideSync {
            file: std::fs::File::create(t.path().join(name)).unwrap(),
            state: Mutex::new(super::SyncState::Waiting),
            done: Condvar::new(),
        };
        // No helper ran: the caller syncs; a helper coming later leaves it alone.
        let j = job("a");
        j.result_or_run().unwrap();
        j.run_if_waiting();
        assert!(matches!(*j.lock(), super::SyncState::Taken));
        // The helper ran first: its result is the caller's.
        let j = job("b");
        j.run_if_waiting();
        assert!(matches!(*j.lock(), super::SyncState::Done(Ok(()))));
        j.result_or_run().unwrap();
        // Without a runtime (no pooled threads) and within one: both files synced.
        let (side, f) = (job("c").file, job("d").file);
        super::sync_both(side, &f).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (side, f) = (job("e").file, job("f").file);
        rt.block_on(async {
            tokio::task::spawn_blocking(move || super::sync_both(side, &f)).await
        })
        .unwrap()
        .unwrap();
    }

    /// Issue 14 item 17: an object (and its sidecar) renamed into place on local storage was
    /// not durable until its directory was synced, through either write path.
    #[tokio::test]
    async fn local_store_syncs_the_directory_of_each_object_and_sidecar() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("archive");
        let cfg = crate::config::ObjectStorageConfig::Local {
            directory: root.clone(),
            prefix: None,
        };
        let store = super::super::ObjectStore::open(&cfg, "site").unwrap();
        let meta = super::super::Metadata::new();
        let base = synced_under(&root).len();
        // Through OpenDAL (streamed uploads, sidecar then object).
        store.put_bytes("xlog/a/obj", b"one", &meta).await.unwrap();
        let dir = root.join("site/xlog/a");
        let synced = synced_under(&root)[base..].to_vec();
        assert!(
            synced.iter().filter(|d| **d == dir).count() >= 2,
            "the object and the sidecar need a sync of {}: {synced:?}",
            dir.display()
        );
        // The new directories themselves: site, xlog and a are entries of their parents.
        for d in [root.clone(), root.join("site"), root.join("site/xlog")] {
            assert!(
                synced.contains(&d),
                "{} not synced: {synced:?}",
                d.display()
            );
        }
        // put_whole (sealed segments): the same.
        let base = synced_under(&root).len();
        store
            .put_whole("xlog/b/obj", bytes::Bytes::from_static(b"two"), &meta)
            .await
            .unwrap();
        // One sync of the directory after both renames covers both new names.
        let dir = root.join("site/xlog/b");
        let synced = synced_under(&root)[base..].to_vec();
        assert!(synced.last() == Some(&dir), "{synced:?}");
        assert!(synced.contains(&root.join("site/xlog")), "{synced:?}");
        assert_eq!(store.get_bytes("xlog/b/obj").await.unwrap().0, b"two");
        // Issue 16: the directory is not looked at again for the next object, but one removed
        // behind the process' back is made (durably) again, and the write succeeds.
        let before = synced_under(&root).len();
        store
            .put_whole("xlog/b/obj2", bytes::Bytes::from_static(b"2"), &meta)
            .await
            .unwrap();
        assert_eq!(synced_under(&root)[before..], [dir]);
        std::fs::remove_dir_all(root.join("site/xlog")).unwrap();
        let before = synced_under(&root).len();
        store
            .put_whole("xlog/b/obj3", bytes::Bytes::from_static(b"3"), &meta)
            .await
            .unwrap();
        let synced = synced_under(&root)[before..].to_vec();
        assert!(synced.contains(&root.join("site/xlog")), "{synced:?}");
        assert_eq!(store.get_bytes("xlog/b/obj3").await.unwrap().0, b"3");
    }
}

#[cfg(test)]
mod sidecar_tests {
    use super::super::{Metadata, ObjectStore, StorageError};

    fn rss_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb * 1024
    }

    /// Issue 19: one metadata read per site (the daemon's start does one) must not leave
    /// memory with each store. Through OpenDAL's local reader each read zero-filled a 2 MiB
    /// buffer that the store kept pooled: 100 stores grew the RSS by about 200 MiB. A
    /// missing sidecar is "not found", an oversized one bad metadata naming the key.
    #[tokio::test]
    async fn local_sidecar_reads_keep_no_memory_per_store() {
        let t = tempfile::tempdir().unwrap();
        let cfg = crate::config::ObjectStorageConfig::Local {
            directory: t.path().join("archive"),
            prefix: None,
        };
        let mut meta = Metadata::new();
        meta.insert("compression-algorithm".into(), "zstd".into());
        let mut stores = Vec::new();
        for i in 0..100 {
            let s = ObjectStore::open(&cfg, &format!("s{i}")).unwrap();
            s.put_bytes("xlog/obj", b"x", &meta).await.unwrap();
            stores.push(s);
        }
        let before = rss_bytes();
        for s in &stores {
            assert_eq!(s.metadata("xlog/obj").await.unwrap(), meta);
        }
        let grown = rss_bytes().saturating_sub(before);
        assert!(
            grown < 48 << 20,
            "100 metadata reads grew the RSS by {} MiB",
            grown >> 20
        );
        let err = stores[0].metadata("xlog/none").await.unwrap_err();
        assert!(matches!(err, StorageError::NotFound { .. }), "{err}");
        let big = t.path().join("archive/s0/xlog/big.metadata");
        std::fs::write(&big, vec![b' '; (super::SIDECAR_MAX + 1) as usize]).unwrap();
        let err = stores[0]
            .metadata("xlog/big")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("xlog/big"), "{err}");
    }
}
