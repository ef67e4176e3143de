//! Extracting tar members into a directory without ever writing outside it.
//!
//! A backup is data from elsewhere (a compromised primary, a tampered bucket with the key): a
//! member may not name an absolute path or `..`, and no member is written through a symlink,
//! whether the symlink came from an earlier member or was already there. Files are created
//! with `O_NOFOLLOW` after removing whatever was in the way. The only symlink members accepted
//! are `pg_tblspc/<oid>` in the data directory; any other is refused, naming the member.
//!
//! Permissions follow PostgreSQL's rules (it refuses a data directory others can read): files
//! get 0600 and directories 0700, plus the group bits only when the backup had them
//! (`initdb --allow-group-access`).

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use walhoard_basebackup::untar::{Entry, EntryKind};
use walhoard_walreceiver::spool::fsync_dir;

use super::beneath::Beneath;
use super::combine::{incremental_target, Combine};
use super::delta::{self, Seen, SyncQueue};
use std::sync::Arc;

/// Suffix of files held back until the restore completed (see [`Extractor::finish`]).
pub const HELD_BACK_SUFFIX: &str = ".walhoard-partial";

/// Files that make a directory look like a PostgreSQL data directory: written under a
/// temporary name and renamed only once everything else is in place, so a failed or killed
/// restore never leaves something `postgres -D` would try to start.
pub const HELD_BACK: &[&str] = &["PG_VERSION", "global/pg_control"];

/// Writes members under one root directory.
#[derive(Debug, Clone)]
pub struct Extractor {
    root: PathBuf,
    /// Hold back [`HELD_BACK`] (the data directory, not tablespaces).
    hold_back: bool,
    /// `--delta`: files already there are rewritten in place where they differ, and every
    /// path the backup has is recorded ([`super::delta`]).
    delta: Option<Arc<Seen>>,
    /// One pass of an incremental chain's restore: `INCREMENTAL.*` members are applied to
    /// what the older backups left, and every path is recorded ([`super::combine`]).
    combine: Option<Arc<Combine>>,
    /// New files are synced on the queue's thread instead of on the writing thread (a full
    /// restore); whoever set it waits for the queue before anything is renamed into place.
    syncs: Option<Arc<SyncQueue>>,
}

fn refuse(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// `path` as a relative path of normal components, or an error naming it.
pub fn safe_relative(path: &str) -> io::Result<PathBuf> {
    let p = Path::new(path);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse(format!(
                    "tar member {path:?} is an absolute path: refused"
                )))
            }
            Component::ParentDir => {
                return Err(refuse(format!(
                    "tar member {path:?} contains '..': refused"
                )))
            }
        }
    }
    Ok(out)
}

impl Extractor {
    pub fn new(root: PathBuf, hold_back: bool) -> Self {
        Extractor {
            root,
            hold_back,
            delta: None,
            combine: None,
            syncs: None,
        }
    }

    /// This extractor syncing the files it creates on `syncs`'s thread: the caller must
    /// [`SyncQueue::wait`] before the restore's files count as durable (before
    /// [`Extractor::finish`] and before the directories are synced).
    pub fn with_syncs(mut self, syncs: Option<Arc<SyncQueue>>) -> Self {
        self.syncs = syncs;
        self
    }

    /// This extractor in a pass of an incremental chain's restore.
    pub fn with_combine(mut self, combine: Option<Arc<Combine>>) -> Self {
        self.combine = combine;
        self
    }

    /// This extractor in a `--delta` restore sharing `seen`.
    pub fn with_delta(mut self, seen: Option<Arc<Seen>>) -> Self {
        self.delta = seen;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the directories of `rel` below the root (not `rel` itself), refusing to pass
    /// through anything that is not a real directory.
    fn make_parents(&self, rel: &Path, mode: u32) -> io::Result<()> {
        let mut at = self.root.clone();
        let parents: Vec<_> = rel.components().collect();
        for c in parents.iter().take(parents.len().saturating_sub(1)) {
            at.push(c);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(refuse(format!(
                        "{} is a symlink: refusing to extract {} through it",
                        at.display(),
                        rel.display()
                    )))
                }
                Ok(_) => {
                    return Err(refuse(format!(
                        "{} is not a directory (extracting {})",
                        at.display(),
                        rel.display()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if Self::create_dir_shared(&at)? {
                        fs::set_permissions(&at, fs::Permissions::from_mode(mode))?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Creates a directory that a chunk extracting in parallel may create at the same moment
    /// (local-tar chunks each begin with the directories they are inside of). Returns whether
    /// this call created it. An existing directory is fine; anything else there is refused.
    fn create_dir_shared(path: &Path) -> io::Result<bool> {
        match fs::create_dir(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                match fs::symlink_metadata(path) {
                    Ok(m) if m.is_dir() => Ok(false),
                    _ => Err(refuse(format!(
                        "{} appeared as something other than a directory",
                        path.display()
                    ))),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Removes a non-directory in the way of `path` (overwrite), never following it.
    fn clear(path: &Path) -> io::Result<()> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => Err(refuse(format!(
                "{} is a directory where the backup has a file",
                path.display()
            ))),
            Ok(_) => fs::remove_file(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn dir_mode(mode: u32) -> u32 {
        0o700 | (mode & 0o050)
    }

    fn file_mode(mode: u32) -> u32 {
        0o600 | (mode & 0o040)
    }

    /// `--delta`: whether the file `rel` below the root already is a regular file (not a
    /// symlink, not reached through one) of `size` bytes whose contents `same` accepts. If so
    /// it is kept as it is, given the mode a restore gives a member of mode `mode`, synced,
    /// recorded as part of the backup and counted as not fetched ([`Seen::unfetched`]): the
    /// caller need not download it. Always false outside a delta restore and for the files
    /// held back ([`HELD_BACK`]), which are always written.
    pub fn keep_if_same(
        &self,
        rel: &str,
        size: u64,
        mode: u32,
        same: impl FnOnce(&mut dyn Read) -> io::Result<bool>,
    ) -> io::Result<bool> {
        let Some(seen) = &self.delta else {
            return Ok(false);
        };
        let rel = safe_relative(rel)?;
        if rel.as_os_str().is_empty()
            || (self.hold_back && HELD_BACK.iter().any(|h| Path::new(h) == rel))
        {
            return Ok(false);
        }
        // Refuses a parent that is a symlink, as extracting the member would.
        self.make_parents(&rel, 0o700)?;
        let path = self.root.join(&rel);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() && m.len() == size => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        let mut f = match fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => f,
            // Replaced by a link (ELOOP) or removed since: extracting it deals with that.
            Err(_) => return Ok(false),
        };
        let m = f.metadata()?;
        if !m.is_file() || m.len() != size || !same(&mut f)? {
            return Ok(false);
        }
        f.set_permissions(fs::Permissions::from_mode(Self::file_mode(mode)))?;
        // Its contents may still be only in the page cache of the server that wrote them.
        f.sync_all()?;
        seen.record(&self.root, &path);
        seen.kept.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        seen.unfetched
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(true)
    }

    /// Writes one member, its body read from `body`. Returns the bytes written.
    pub fn extract(&self, entry: &Entry, rel: &str, body: &mut dyn Read) -> io::Result<u64> {
        let rel = safe_relative(rel)?;
        let dir_mode = Self::dir_mode(0o750 & entry.mode);
        if rel.as_os_str().is_empty() {
            // The root itself ("./" or "pgdata/"): only its mode matters.
            if entry.kind == EntryKind::Dir {
                fs::set_permissions(&self.root, fs::Permissions::from_mode(dir_mode))?;
            }
            return Ok(0);
        }
        // Parents get the default mode; their own members (which come first in every tar we
        // read) set theirs.
        self.make_parents(&rel, 0o700)?;
        let target = self.root.join(&rel);
        if let Some(seen) = &self.delta {
            seen.record(&self.root, &target);
        }
        if let Some(c) = &self.combine {
            let mode = Self::file_mode(entry.mode);
            if let (EntryKind::File, Some(real)) = (&entry.kind, incremental_target(&rel)) {
                let path = self.root.join(&real);
                c.seen.record(&self.root, &path);
                if !c.wants(&path, true, mode)? {
                    return Ok(0);
                }
                return c.apply(&self.root, &real, &entry.path, entry.size, mode, body);
            }
            c.seen.record(&self.root, &target);
            if entry.kind == EntryKind::File && !c.wants(&target, false, mode)? {
                return Ok(0);
            }
        }
        match &entry.kind {
            EntryKind::Dir => {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        Self::clear(&target)?;
                        fs::create_dir(&target)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        Self::create_dir_shared(&target)?;
                    }
                    Err(e) => return Err(e),
                }
                fs::set_permissions(&target, fs::Permissions::from_mode(dir_mode))?;
                Ok(0)
            }
            EntryKind::Symlink { target: to } => {
                // The only links a data directory needs are pg_tblspc/<oid> (BASE_BACKUP's
                // base.tar has one per tablespace, as sendDir writes them); restore replaces
                // those with links to where it put each tablespace. Any other link is a way
                // for a forged backup to make walhoard's own writes (backup_manifest,
                // postgresql.auto.conf, the signal files) or PostgreSQL's land outside.
                if !(self.hold_back && is_tablespace_link(&rel)) {
                    return Err(refuse(format!(
                        "tar member {:?} is a symlink (to {to:?}): only pg_tblspc/<oid> may be one in a backup; refused",
                        entry.path
                    )));
                }
                Self::clear(&target)?;
                std::os::unix::fs::symlink(to, &target)?;
                Ok(0)
            }
            EntryKind::File => {
                let held = self.hold_back && HELD_BACK.iter().any(|h| Path::new(h) == rel);
                let path = if held {
                    self.root
                        .join(format!("{}{HELD_BACK_SUFFIX}", rel.display()))
                } else {
                    target
                };
                if let Some(c) = &self.combine {
                    c.seen.record(&self.root, &path);
                }
                if let Some(seen) = &self.delta {
                    seen.record(&self.root, &path);
                    let existing = fs::symlink_metadata(&path)
                        .ok()
                        .filter(|m| m.is_file())
                        .map(|m| m.len());
                    if let (Some(len), false) = (existing, held) {
                        let (n, unsynced) = delta::rewrite_in_place(
                            &path,
                            body,
                            entry.size,
                            Self::file_mode(entry.mode),
                        )?;
                        if let Some(f) = unsynced {
                            // Synced before `finish` (and before the delta report).
                            seen.syncs.push(path.clone(), f)?;
                        }
                        seen.written
                            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        if n == 0 && len == entry.size {
                            seen.kept.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        return Ok(n);
                    }
                }
                Self::clear(&path)?;
                let f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(Self::file_mode(entry.mode))
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("create {}: {e}", path.display()))
                    })?;
                // Whole pages at page-aligned offsets: the tar body arrives in pieces of any
                // size, and writes that started mid-page made ext4 zero and merge partial
                // pages (a quarter of a restore's CPU, docs/benchmarks.md).
                let cap = (entry.size as usize).clamp(4096, WRITE_CHUNK);
                let mut w = io::BufWriter::with_capacity(cap, f);
                let n = io::copy(body, &mut w)?;
                let f = w.into_inner().map_err(|e| e.into_error())?;
                if let Some(seen) = &self.delta {
                    seen.written
                        .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
                // create mode is filtered by the umask: set it exactly.
                f.set_permissions(fs::Permissions::from_mode(Self::file_mode(entry.mode)))?;
                // Durable before the directory can look like a data directory: the held-back
                // files are renamed in only after every file and directory is synced. With a
                // sync queue the disk writes this file back while the next one is written.
                match &self.syncs {
                    Some(q) => q.push(path, f)?,
                    None => f.sync_all()?,
                }
                Ok(n)
            }
            EntryKind::Other { typeflag } => Err(refuse(format!(
                "tar member {} has type {:?}, which a backup never holds: refused",
                rel.display(),
                char::from(*typeflag)
            ))),
        }
    }

    /// Moves the held-back files to their names: the directory becomes a data directory.
    /// Every directory below the root is synced first (files are synced as they are written,
    /// or on the sync queue, waited for here), and the renames after, so what a crash leaves
    /// is either complete or not a data directory.
    pub fn finish(&self) -> io::Result<()> {
        if let Some(seen) = &self.delta {
            seen.syncs.wait()?;
        }
        if let Some(q) = &self.syncs {
            q.wait()?;
        }
        sync_dirs(&self.root)?;
        if !self.hold_back {
            return Ok(());
        }
        let root = Beneath::open(&self.root)?;
        for h in HELD_BACK {
            let held = PathBuf::from(format!("{h}{HELD_BACK_SUFFIX}"));
            if root.exists(&held)? {
                root.rename(&held, Path::new(h))?;
            }
        }
        Ok(())
    }
}

/// `pg_tblspc/<oid>`: where a data directory links a tablespace.
pub fn is_tablespace_link(rel: &Path) -> bool {
    let mut c = rel.components();
    matches!(
        (c.next(), c.next(), c.next()),
        (Some(Component::Normal(d)), Some(Component::Normal(oid)), None)
            if d == "pg_tblspc"
                && oid.to_str().is_some_and(|o| !o.is_empty() && o.bytes().all(|b| b.is_ascii_digit()))
    )
}

/// Largest write of a restored file (and its buffer).
const WRITE_CHUNK: usize = 1 << 20;

/// Syncs `dir` and every directory below it (not following symlinks), so that the entries
/// created in them are durable.
pub fn sync_dirs(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            sync_dirs(&e.path())?;
        }
    }
    fsync_dir(dir)
}

/// Removes everything inside `dir` (not `dir` itself), never following symlinks.
pub fn empty_dir(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if fs::symlink_metadata(&p)?.is_dir() {
            fs::remove_dir_all(&p)?;
        } else {
            fs::remove_file(&p)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use walhoard_basebackup::tar::{Member, MemberKind, TarWriter};
    use walhoard_basebackup::untar::TarReader;

    /// `keep_if_same` keeps only a regular file of the right size whose contents are
    /// accepted, never through a symlink (the file's or a parent's), never a held-back file,
    /// and only in a delta restore; a kept file gets the restore's mode and is counted.
    #[test]
    fn keep_if_same_keeps_only_a_matching_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        fs::create_dir_all(root.join("base/1")).unwrap();
        fs::write(root.join("base/1/100"), b"abc").unwrap();
        fs::set_permissions(root.join("base/1/100"), fs::Permissions::from_mode(0o644)).unwrap();
        let same = |r: &mut dyn Read| {
            let mut b = Vec::new();
            r.read_to_end(&mut b)?;
            Ok(b == b"abc")
        };
        let plain = Extractor::new(root.clone(), true);
        assert!(!plain.keep_if_same("base/1/100", 3, 0o600, same).unwrap());
        let seen = Arc::new(Seen::default());
        let x = Extractor::new(root.clone(), true).with_delta(Some(seen.clone()));
        assert!(!x.keep_if_same("base/1/100", 4, 0o600, same).unwrap());
        assert!(!x
            .keep_if_same("base/1/100", 3, 0o600, |_| Ok(false))
            .unwrap());
        assert!(!x.keep_if_same("base/1/missing", 3, 0o600, same).unwrap());
        assert!(x.keep_if_same("base/1/100", 3, 0o600, same).unwrap());
        let mode = fs::metadata(root.join("base/1/100"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(seen.unfetched.load(std::sync::atomic::Ordering::Relaxed), 1);
        // A symlink to the right bytes, or a file below a symlinked directory: not kept.
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("100"), b"abc").unwrap();
        std::os::unix::fs::symlink(outside.join("100"), root.join("base/1/101")).unwrap();
        assert!(!x.keep_if_same("base/1/101", 3, 0o600, same).unwrap());
        std::os::unix::fs::symlink(&outside, root.join("base/2")).unwrap();
        assert!(x.keep_if_same("base/2/100", 3, 0o600, same).is_err());
        // The held-back files are always written.
        fs::create_dir_all(root.join("global")).unwrap();
        fs::write(root.join("global/pg_control"), b"abc").unwrap();
        assert!(!x.keep_if_same("global/pg_control", 3, 0o600, same).unwrap());
        assert_eq!(seen.unfetched.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    fn extract_all(bytes: &[u8], x: &Extractor) -> io::Result<()> {
        let mut r = TarReader::new(bytes);
        while let Some(e) = r.next_entry()? {
            let p = e.path.clone();
            x.extract(&e, &p, &mut r.body())?;
        }
        Ok(())
    }

    fn tar_with(build: impl FnOnce(&mut TarWriter<Vec<u8>>)) -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new());
        build(&mut w);
        w.finish().unwrap()
    }

    fn symlink(w: &mut TarWriter<Vec<u8>>, path: &str, target: &str) {
        w.append_entry(&Member {
            path: path.into(),
            kind: MemberKind::Symlink {
                target: target.into(),
            },
            mode: 0o777,
            mtime: 0,
        })
        .unwrap();
    }

    #[test]
    fn members_escaping_the_target_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let x = Extractor::new(root.path().to_path_buf(), true);
        let abs = format!("{}/evil", outside.path().display());
        for (bytes, what) in [
            (
                tar_with(|w| w.append_bytes(&abs, 0o600, 0, b"x").unwrap()),
                "absolute",
            ),
            (
                tar_with(|w| w.append_bytes("a/../../evil", 0o600, 0, b"x").unwrap()),
                "'..'",
            ),
            (
                tar_with(|w| {
                    symlink(w, "link", &outside.path().display().to_string());
                    w.append_bytes("link/evil", 0o600, 0, b"x").unwrap();
                }),
                "symlink",
            ),
            (
                tar_with(|w| {
                    symlink(w, "dir", &outside.path().display().to_string());
                    symlink(w, "dir/evil", "/etc/passwd");
                }),
                "symlink",
            ),
        ] {
            let err = extract_all(&bytes, &x).unwrap_err();
            assert!(err.to_string().contains(what), "{what}: {err}");
            assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0, "{what}");
        }
        // A (tablespace) symlink member replaced by a file member: the file is written at the
        // link's place, not through it.
        let target = outside.path().join("victim");
        fs::write(&target, b"keep").unwrap();
        let bytes = tar_with(|w| {
            symlink(w, "pg_tblspc/16400", &target.display().to_string());
            w.append_bytes("pg_tblspc/16400", 0o600, 0, b"new").unwrap();
        });
        extract_all(&bytes, &x).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"keep");
        assert_eq!(
            fs::read(root.path().join("pg_tblspc/16400")).unwrap(),
            b"new"
        );
    }

    /// Regression (issue 14, item 3): a symlink member named like a file walhoard writes
    /// itself (backup_manifest, postgresql.auto.conf, the signal files) made those writes land
    /// outside the target. Only `pg_tblspc/<oid>` in the data directory may be a symlink.
    #[test]
    fn symlink_members_other_than_tablespace_links_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        let to = outside.path().join("victim").display().to_string();
        let root = tempfile::tempdir().unwrap();
        let data = Extractor::new(root.path().to_path_buf(), true);
        for name in [
            "backup_manifest",
            "postgresql.auto.conf",
            "standby.signal",
            "recovery.signal",
            "pg_wal",
            "pg_tblspc/x1",
            "pg_tblspc/1/2",
            "base/pg_tblspc/1",
        ] {
            let bytes = tar_with(|w| symlink(w, name, &to));
            let err = extract_all(&bytes, &data).unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("tar member {name:?} is a symlink")),
                "{name}: {err}"
            );
            assert!(
                fs::symlink_metadata(root.path().join(name)).is_err(),
                "{name}"
            );
        }
        // In a tablespace directory not even pg_tblspc/<oid> is one.
        let ts = tempfile::tempdir().unwrap();
        let tablespace = Extractor::new(ts.path().to_path_buf(), false);
        let bytes = tar_with(|w| symlink(w, "pg_tblspc/16400", &to));
        assert!(extract_all(&bytes, &tablespace).is_err());
        // The one that is allowed.
        let bytes = tar_with(|w| symlink(w, "pg_tblspc/16400", &to));
        extract_all(&bytes, &data).unwrap();
        assert_eq!(
            fs::read_link(root.path().join("pg_tblspc/16400")).unwrap(),
            Path::new(&to)
        );
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    /// Regression: chunks extracting in parallel each create the directories they begin with;
    /// the loser of that race saw EEXIST and failed the restore.
    #[test]
    fn parallel_chunks_share_their_directories() {
        let root = tempfile::tempdir().unwrap();
        let x = std::sync::Arc::new(Extractor::new(root.path().to_path_buf(), false));
        let dir = |p: &str| Entry {
            path: p.into(),
            kind: EntryKind::Dir,
            mode: 0o700,
            size: 0,
        };
        for round in 0..20 {
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let (x, barrier) = (x.clone(), barrier.clone());
                    let base = format!("r{round}/base/1");
                    std::thread::spawn(move || {
                        barrier.wait();
                        for d in [
                            format!("r{round}/"),
                            format!("r{round}/base/"),
                            format!("{base}/"),
                        ] {
                            x.extract(&dir(&d), &d, &mut io::empty())?;
                        }
                        let f = Entry {
                            path: format!("{base}/f{i}"),
                            kind: EntryKind::File,
                            mode: 0o600,
                            size: 1,
                        };
                        x.extract(&f, &f.path.clone(), &mut &b"x"[..])
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap().unwrap();
            }
        }
        assert_eq!(
            fs::read_dir(root.path().join("r0/base/1")).unwrap().count(),
            8
        );
    }

    /// A full restore's files are synced on a queue's thread: `finish` waits for it, and a
    /// failed sync stops the restore before the held-back files make it a data directory.
    #[test]
    fn finish_waits_for_the_sync_queue_and_stops_at_a_failed_sync() {
        let tar = tar_with(|w| {
            w.append_bytes("PG_VERSION", 0o600, 0, b"15\n").unwrap();
            w.append_bytes("global/pg_control", 0o600, 0, b"c").unwrap();
            w.append_bytes("base/1/1259", 0o600, 0, &[7u8; 70_000])
                .unwrap();
        });
        let root = tempfile::tempdir().unwrap();
        let q = Arc::new(SyncQueue::default());
        let x = Extractor::new(root.path().to_path_buf(), true).with_syncs(Some(q.clone()));
        extract_all(&tar, &x).unwrap();
        x.finish().unwrap();
        assert_eq!(fs::read(root.path().join("PG_VERSION")).unwrap(), b"15\n");
        assert_eq!(
            fs::read(root.path().join("global/pg_control")).unwrap(),
            b"c"
        );
        assert_eq!(
            fs::read(root.path().join("base/1/1259")).unwrap().len(),
            70_000
        );

        let root = tempfile::tempdir().unwrap();
        let x = Extractor::new(root.path().to_path_buf(), true).with_syncs(Some(q.clone()));
        extract_all(&tar, &x).unwrap();
        // A file whose sync fails (fsync of a character device: EINVAL), as a disk error would.
        let _ = q.push(
            PathBuf::from("/dev/null"),
            fs::File::open("/dev/null").unwrap(),
        );
        let err = x.finish().unwrap_err();
        assert!(err.to_string().contains("/dev/null"), "{err}");
        assert!(!root.path().join("PG_VERSION").exists());
        assert!(!root.path().join("global/pg_control").exists());
    }

    #[test]
    fn modes_and_held_back_files() {
        let root = tempfile::tempdir().unwrap();
        let x = Extractor::new(root.path().to_path_buf(), true);
        let bytes = tar_with(|w| {
            w.append_entry(&Member {
                path: "global".into(),
                kind: MemberKind::Dir,
                mode: 0o777,
                mtime: 0,
            })
            .unwrap();
            w.append_bytes("PG_VERSION", 0o644, 0, b"15\n").unwrap();
            w.append_bytes("global/pg_control", 0o640, 0, b"c").unwrap();
            w.append_bytes("base/1/1259", 0o666, 0, b"d").unwrap();
        });
        extract_all(&bytes, &x).unwrap();
        let mode = |p: &str| {
            fs::metadata(root.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("global"), 0o750);
        assert_eq!(mode("base/1"), 0o700);
        assert_eq!(mode("base/1/1259"), 0o640);
        assert!(!root.path().join("PG_VERSION").exists());
        assert!(!root.path().join("global/pg_control").exists());
        x.finish().unwrap();
        assert_eq!(fs::read(root.path().join("PG_VERSION")).unwrap(), b"15\n");
        assert_eq!(mode("PG_VERSION"), 0o640);
        assert_eq!(mode("global/pg_control"), 0o640);
    }
}
