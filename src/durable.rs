//! Files that survive a crash once a call returns: atomic replacement ([`write_atomic`]),
//! renames and new directories whose directory entries are synced.
//!
//! `rename(2)` is atomic but not durable: until the directory holding the new name is synced,
//! a crash can bring back the old entry (or none) although the file's data was synced, and a
//! directory `create_dir_all` made can vanish with everything in it. PostgreSQL does the same
//! for its own files (`durable_rename` and `fsync_parent_path` in fd.c). Nothing here knows
//! about the rest of walhoard: the state file, alert files and local storage all use it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A temporary file name no other write uses: process id, time and a counter, so that a file
/// left by a crashed process whose id is reused does not collide.
pub fn temp_name() -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}-{seq}", pid())
}

/// This process' id, asked of the kernel once: `getpid` is a system call each time (glibc
/// caches nothing), and every object stored on local storage takes two temporary names
/// (issue 16: two per synchronous commit). walhoard never forks without exec, so the id
/// cannot change under it.
fn pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

/// Reads `buf.len()` bytes of `f` at `at`, fewer only at the end of the file; how many.
pub fn read_full_at(f: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Replaces `path` with `content`: a uniquely named temporary file in the same directory
/// (created with it), written and synced, renamed over `path`, the directory synced. A reader
/// sees the old file or the new one, never half of one, and after a crash the new one is there
/// once this returned. The temporary file is removed when anything fails.
pub fn write_atomic(path: &Path, content: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all_durable(dir)?;
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", temp_name()));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(content)?;
        f.sync_all()?;
        rename_durable(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Renames `from` onto `to` and syncs `to`'s directory, so that the new name survives a
/// crash once this returns (as PostgreSQL's `durable_rename`; `from`'s data must already be
/// synced). `from`'s directory is not synced: a temporary name that comes back after a crash
/// is garbage, not a lost object.
pub fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    sync_parent(to)
}

/// Syncs the directory holding `path` (after an entry in it was created or renamed).
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => sync_dir(Path::new(".")),
    }
}

/// `create_dir_all` whose new directories survive a crash: each one's parent is synced once
/// the directory exists (as `fsync_parent_path` after `MakePGDirectory`).
pub fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
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

/// How many directories [`ensure_dir_durable`] remembers (the most recent ones): a store's
/// current segment directory, its temporary directory and a few more; memory does not grow
/// with the archive.
const KNOWN_DIRS: usize = 32;

fn known_dirs() -> std::sync::MutexGuard<'static, std::collections::VecDeque<PathBuf>> {
    static KNOWN: std::sync::Mutex<std::collections::VecDeque<PathBuf>> =
        std::sync::Mutex::new(std::collections::VecDeque::new());
    KNOWN.lock().unwrap_or_else(|p| p.into_inner())
}

/// [`create_dir_all_durable`] for a directory written to again and again (local storage:
/// every object of a segment goes into the same one): a directory this process made durable,
/// or found, recently is not looked at again. The stats of every directory and a `mkdir` per
/// object were system calls of every synchronous commit (issue 16). A directory removed
/// behind the process' back is found by the write into it failing: [`forget_dir`], then this
/// again.
pub fn ensure_dir_durable(dir: &Path) -> io::Result<()> {
    if known_dirs().iter().any(|d| d == dir) {
        return Ok(());
    }
    create_dir_all_durable(dir)?;
    let mut known = known_dirs();
    if !known.iter().any(|d| d == dir) {
        if known.len() >= KNOWN_DIRS {
            known.pop_front();
        }
        known.push_back(dir.to_path_buf());
    }
    Ok(())
}

/// Forgets that `dir` exists ([`ensure_dir_durable`]): the next call looks again.
pub fn forget_dir(dir: &Path) {
    known_dirs().retain(|d| d != dir);
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
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
pub(crate) fn synced_dirs() -> &'static std::sync::Mutex<Vec<std::path::PathBuf>> {
    static DIRS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    &DIRS
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The directories synced below `root` (tests run in parallel: each looks at its own).
    pub(crate) fn synced_under(root: &Path) -> Vec<PathBuf> {
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

    /// The state file and alert files: replaced whole, durable, no temporary file left either
    /// way (the state file's writer used to leave the directory unsynced and a fixed temporary
    /// name two writers could share).
    #[test]
    fn write_atomic_replaces_whole_and_syncs_its_directory() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("state/pghoard_state.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let dir = t.path().join("state");
        assert!(synced_under(t.path()).contains(&dir));
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "a temporary file was left"
        );
        // A target that cannot be replaced (a directory) fails and leaves nothing behind.
        let blocked = dir.join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"x").unwrap();
        assert!(write_atomic(&blocked, b"three").is_err());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
    }
}
