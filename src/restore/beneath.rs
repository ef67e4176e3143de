//! The files walhoard itself writes into a restore target (`backup_manifest`, the recovery
//! settings in `postgresql.auto.conf`, the signal files, the `pg_tblspc` links, the held-back
//! `PG_VERSION` and `pg_control`), opened relative to the target directory one path component
//! at a time with `O_NOFOLLOW`.
//!
//! The backup decides what else is in that directory, so any of those names may already be a
//! symlink (a forged member, or one left by an earlier restore): opening it by its full path
//! would write wherever it points. Here every directory on the way is opened with
//! `O_DIRECTORY | O_NOFOLLOW` and the file itself with `O_NOFOLLOW`, so a symlink anywhere
//! below the root is refused (`ELOOP`) instead of followed. The root is the directory the
//! operator named; it is opened normally.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, CWD};
use rustix::io::Errno;

/// A directory walhoard writes its own files below, never through a symlink.
#[derive(Debug)]
pub struct Beneath {
    dir: OwnedFd,
    path: PathBuf,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// `e` from an operation on `path`, with the path, and a symlink in the way said as such.
fn annotate(e: Errno, path: &Path) -> io::Error {
    if e == Errno::LOOP {
        // O_NOFOLLOW on a symlink: open(2) fails with ELOOP.
        invalid(format!(
            "{} is a symbolic link: walhoard does not write through it (refused)",
            path.display()
        ))
    } else if e == Errno::NOTDIR {
        invalid(format!("{} is not a directory: refused", path.display()))
    } else {
        let e = io::Error::from(e);
        io::Error::new(e.kind(), format!("{}: {e}", path.display()))
    }
}

/// Opens the directory `name` in `dir`, not following a symlink. `O_DIRECTORY` makes open(2)
/// answer ENOTDIR rather than ELOOP for a symlink: that case is told apart so the error says
/// "symbolic link".
fn open_dir(dir: &OwnedFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty()).map_err(|e| {
        let link = e == Errno::NOTDIR
            && rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
        if link {
            Errno::LOOP
        } else {
            e
        }
    })
}

impl Beneath {
    /// Opens `root`, a directory the operator named (it may be reached through symlinks).
    pub fn open(root: &Path) -> io::Result<Beneath> {
        let dir = rustix::fs::openat(
            CWD,
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| annotate(e, root))?;
        Ok(Beneath {
            dir,
            path: root.to_path_buf(),
        })
    }

    /// The directory holding `rel`'s last component (opened component by component, never
    /// through a symlink), and that component.
    fn parent<'a>(&self, rel: &'a Path) -> io::Result<(OwnedFd, &'a OsStr)> {
        let mut names = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(n) => names.push(n),
                Component::CurDir => {}
                _ => {
                    return Err(invalid(format!(
                        "{}: not a plain path below {}",
                        rel.display(),
                        self.path.display()
                    )))
                }
            }
        }
        let Some((last, dirs)) = names.split_last() else {
            return Err(invalid(format!("empty path below {}", self.path.display())));
        };
        let mut fd = self.dir.try_clone()?;
        let mut at = self.path.clone();
        for d in dirs {
            at.push(d);
            fd = open_dir(&fd, d).map_err(|e| annotate(e, &at))?;
        }
        Ok((fd, last))
    }

    fn full(&self, rel: &Path) -> PathBuf {
        self.path.join(rel)
    }

    fn open_file(&self, rel: &Path, flags: OFlags, mode: u32) -> io::Result<File> {
        let (dir, name) = self.parent(rel)?;
        let fd = rustix::fs::openat(
            &dir,
            name,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(|e| annotate(e, &self.full(rel)))?;
        Ok(File::from(fd))
    }

    /// Creates or truncates `rel` for writing, with exactly `mode` (the umask does not apply).
    pub fn create(&self, rel: &Path, mode: u32) -> io::Result<File> {
        let f = self.open_file(rel, OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC, mode)?;
        rustix::fs::fchmod(&f, Mode::from_raw_mode(mode))?;
        Ok(f)
    }

    /// Opens `rel` for reading and writing, creating it (with exactly `mode`) when absent;
    /// an existing file keeps its contents.
    pub fn open_rw(&self, rel: &Path, mode: u32) -> io::Result<File> {
        let f = self.open_file(rel, OFlags::RDWR | OFlags::CREATE, mode)?;
        rustix::fs::fchmod(&f, Mode::from_raw_mode(mode))?;
        Ok(f)
    }

    /// Opens `rel` for reading.
    pub fn open_read(&self, rel: &Path) -> io::Result<File> {
        self.open_file(rel, OFlags::RDONLY, 0)
    }

    /// The contents of `rel`, or `None` when it does not exist.
    pub fn read(&self, rel: &Path) -> io::Result<Option<Vec<u8>>> {
        match self.open_file(rel, OFlags::RDONLY, 0) {
            Ok(mut f) => {
                let mut v = Vec::new();
                io::Read::read_to_end(&mut f, &mut v)?;
                Ok(Some(v))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces `rel` with `bytes` in one step: written to a temporary name beside it, synced,
    /// renamed over it, the directory synced. A symlink at `rel` is replaced, not followed.
    pub fn replace(&self, rel: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(".walhoard-tmp");
        let tmp = rel.with_file_name(&tmp_name);
        match rustix::fs::unlinkat(&dir, &tmp_name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(annotate(e, &self.full(&tmp))),
        }
        let fd = rustix::fs::openat(
            &dir,
            &tmp_name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(|e| annotate(e, &self.full(&tmp)))?;
        let mut f = File::from(fd);
        let written = f
            .write_all(bytes)
            .and_then(|()| rustix::fs::fchmod(&f, Mode::from_raw_mode(mode)).map_err(Into::into))
            .and_then(|()| f.sync_all())
            .and_then(|()| {
                rustix::fs::renameat(&dir, &tmp_name, &dir, name)
                    .map_err(|e| annotate(e, &self.full(rel)))
            });
        if let Err(e) = written {
            let _ = rustix::fs::unlinkat(&dir, &tmp_name, AtFlags::empty());
            return Err(e);
        }
        rustix::fs::fsync(&dir).map_err(|e| annotate(e, &self.full(rel)))
    }

    /// Removes the file or symlink `rel` (never what a symlink points to). Returns whether
    /// there was one.
    pub fn remove_file(&self, rel: &Path) -> io::Result<bool> {
        let (dir, name) = self.parent(rel)?;
        match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(annotate(e, &self.full(rel))),
        }
    }

    /// Creates the directory `rel` (mode 0700) unless a real directory is already there.
    pub fn create_dir(&self, rel: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700)) {
            Ok(()) => Ok(()),
            Err(Errno::EXIST) => {
                // Only a directory will do: opening it refuses a symlink or a file.
                open_dir(&dir, name)
                    .map(drop)
                    .map_err(|e| annotate(e, &self.full(rel)))
            }
            Err(e) => Err(annotate(e, &self.full(rel))),
        }
    }

    /// Makes `rel` a symlink to `to`, replacing a file or symlink already there.
    pub fn symlink(&self, rel: &Path, to: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(annotate(e, &self.full(rel))),
        }
        rustix::fs::symlinkat(to, &dir, name).map_err(|e| annotate(e, &self.full(rel)))
    }

    /// Renames `from` to `to` (both below the root) and syncs `to`'s directory.
    pub fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from_dir, from_name) = self.parent(from)?;
        let (to_dir, to_name) = self.parent(to)?;
        rustix::fs::renameat(&from_dir, from_name, &to_dir, to_name)
            .map_err(|e| annotate(e, &self.full(from)))?;
        rustix::fs::fsync(&to_dir).map_err(|e| annotate(e, &self.full(to)))
    }

    /// Whether `rel` exists (a symlink counts, whatever it points to).
    pub fn exists(&self, rel: &Path) -> io::Result<bool> {
        let (dir, name) = self.parent(rel)?;
        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(annotate(e, &self.full(rel))),
        }
    }

    /// The symlinks directly inside the directory `rel` (none when it does not exist), with
    /// their targets.
    pub fn symlinks_in(&self, rel: &Path) -> io::Result<Vec<(String, PathBuf)>> {
        let (parent, name) = self.parent(rel)?;
        let dir = match open_dir(&parent, name) {
            Ok(d) => d,
            Err(Errno::NOENT) => return Ok(Vec::new()),
            Err(e) => return Err(annotate(e, &self.full(rel))),
        };
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::read_from(dir.as_fd())? {
            let entry = entry?;
            if entry.file_type() != FileType::Symlink {
                continue;
            }
            let n = entry.file_name().to_string_lossy().into_owned();
            let target = rustix::fs::readlinkat(&dir, entry.file_name(), Vec::new())
                .map_err(|e| annotate(e, &self.full(&rel.join(&n))))?;
            out.push((n, PathBuf::from(target.to_string_lossy().into_owned())));
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way of writing refuses a symlink at the name and in the directories on the way,
    /// and leaves what it points to alone.
    #[test]
    fn symlinks_below_the_root_are_never_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, root.path().join("file")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("dir")).unwrap();
        let b = Beneath::open(root.path()).unwrap();
        let err = b.create(Path::new("file"), 0o600).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        let err = b.read(Path::new("file")).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        for rel in ["dir/new", "dir/victim"] {
            let err = b.create(Path::new(rel), 0o600).unwrap_err();
            assert!(err.to_string().contains("symbolic link"), "{rel}: {err}");
            assert!(b.replace(Path::new(rel), b"x", 0o600).is_err(), "{rel}");
            assert!(b.remove_file(Path::new(rel)).is_err(), "{rel}");
            assert!(b.symlink(Path::new(rel), Path::new("/x")).is_err(), "{rel}");
        }
        assert!(b.create_dir(Path::new("dir")).is_err());
        assert!(b
            .rename(Path::new("file"), Path::new("dir/victim"))
            .is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
        // Replacing or removing the link itself is fine: the link goes, the victim stays.
        b.replace(Path::new("file"), b"mine", 0o600).unwrap();
        assert_eq!(std::fs::read(root.path().join("file")).unwrap(), b"mine");
        assert!(b.remove_file(Path::new("dir")).unwrap());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }
}
