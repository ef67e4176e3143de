//! Direct writes to local storage, for [`super::ObjectStore::put_whole`], and the directory
//! syncs that make any write to local storage durable once it returns.
//!
//! `rename(2)` is atomic but not durable: until the directory holding the new name is synced,
//! a crash can bring back the old entry (or none) although the file's data was synced, and a
//! directory `create_dir_all` made can vanish with everything in it. PostgreSQL does the same
//! for its own files (`durable_rename` and `fsync_parent_path` in fd.c).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// What `O_DIRECT` asks of a buffer's address, a write's length and its file offset: a page,
/// which covers every logical block size up to 4 KiB. A buffer aligned to it (the one-shot
/// upload's sealed objects are) is written to local storage without the page cache.
pub const DIRECT_ALIGN: usize = 4096;

/// Writes `data` to a new file in `tmp_dir`, syncs it and renames it onto `target` (creating
/// `target`'s directory): `target` is the old object or the whole new one, never part of it.
/// With `archive`, `data` is an archive object, read again only by a restore: it does not go
/// through the page cache when it can be written with `O_DIRECT` (its address is aligned and
/// the file system takes it; the last partial page is written through the cache), and what
/// did go through the cache is dropped from it once it is on disk.
pub(super) fn write_synced(
    tmp_dir: &Path,
    target: &Path,
    data: &[u8],
    archive: bool,
) -> io::Result<()> {
    if let Some(dir) = target.parent() {
        create_dir_all_durable(dir)?;
    }
    std::fs::create_dir_all(tmp_dir)?;
    let tmp = tmp_dir.join(super::temp_name());
    let result = (|| {
        let f = write_file(&tmp, data, archive)?;
        f.sync_all()?;
        if archive {
            // Advice only: a failure changes nothing that was written.
            let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
        }
        rename_durable(&tmp, target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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

/// Renames `from` onto `to` and syncs `to`'s directory, so that the new name survives a
/// crash once this returns (as PostgreSQL's `durable_rename`; `from`'s data must already be
/// synced). `from`'s directory is not synced: a temporary name that comes back after a crash
/// is garbage, not a lost object.
pub(super) fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    sync_parent(to)
}

/// Syncs the directory holding `path` (after an entry in it was created or renamed).
pub(super) fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => sync_dir(Path::new(".")),
    }
}

/// `create_dir_all` whose new directories survive a crash: each one's parent is synced once
/// the directory exists (as `fsync_parent_path` after `MakePGDirectory`).
pub(super) fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.is_dir() {
        missing.push(at.to_path_buf());
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            _ => break,
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    // Top down: a directory's entry is durable before anything below it is relied on.
    for d in missing.iter().rev() {
        sync_parent(d)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()?;
    #[cfg(test)]
    synced_dirs()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(dir.to_path_buf());
    Ok(())
}

/// Every directory [`sync_dir`] synced, in order: what the tests can observe of durability
/// without a crash (tests run in parallel; each looks only at paths under its own temp dir).
#[cfg(test)]
fn synced_dirs() -> &'static std::sync::Mutex<Vec<std::path::PathBuf>> {
    static DIRS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    &DIRS
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn synced_under(root: &Path) -> Vec<PathBuf> {
        synced_dirs()
            .lock()
            .unwrap()
            .iter()
            .filter(|d| d.starts_with(root))
            .cloned()
            .collect()
    }

    #[test]
    fn rename_durable_syncs_the_new_names_directory() {
        let t = tempfile::tempdir().unwrap();
        let (tmp, dest) = (t.path().join("tmp"), t.path().join("dest"));
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::write(tmp.join("f"), b"x").unwrap();
        rename_durable(&tmp.join("f"), &dest.join("f")).unwrap();
        assert_eq!(std::fs::read(dest.join("f")).unwrap(), b"x");
        assert_eq!(synced_under(t.path()), vec![dest.clone()]);
        // A failed rename syncs nothing and reports the error.
        assert!(rename_durable(&tmp.join("absent"), &dest.join("g")).is_err());
        assert_eq!(synced_under(t.path()), vec![dest]);
    }

    #[test]
    fn create_dir_all_durable_syncs_each_new_directorys_parent() {
        let t = tempfile::tempdir().unwrap();
        let deep = t.path().join("a/b/c");
        create_dir_all_durable(&deep).unwrap();
        assert!(deep.is_dir());
        let root = t.path().to_path_buf();
        assert_eq!(
            synced_under(&root),
            vec![root.clone(), root.join("a"), root.join("a/b")]
        );
        // Existing directories: nothing to make durable.
        create_dir_all_durable(&deep).unwrap();
        assert_eq!(synced_under(&root).len(), 3);
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
        let dir = root.join("site/xlog/b");
        let synced = synced_under(&root)[base..].to_vec();
        assert!(
            synced.iter().filter(|d| **d == dir).count() >= 2,
            "{synced:?}"
        );
        assert!(synced.contains(&root.join("site/xlog")), "{synced:?}");
        assert_eq!(store.get_bytes("xlog/b/obj").await.unwrap().0, b"two");
    }
}
