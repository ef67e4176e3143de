//! Where a restore request may write: the `x-pghoard-target-path` of `GET
//! /<site>/archive/<file>` must name a file directly in the site's `pg_data_directory/pg_wal`.
//! That is all PostgreSQL ever sends as `%p` (`pg_wal/RECOVERYXLOG`, `pg_wal/RECOVERYHISTORY`,
//! made absolute against its working directory, the data directory; pg_rewind's
//! `<datadir>/pg_wal/<file>`). Without the check any local process that can reach the API
//! could make the daemon overwrite any file the daemon's user can write; confining it to the
//! data directory alone would still let it replace `global/pg_control` or
//! `postgresql.conf` with a WAL segment.
//!
//! The path is checked without trusting anything in it: a `..` component is refused (the
//! kernel would resolve it after following whatever symlink precedes it, so a lexical answer
//! could differ from where the write lands), `pg_wal` is opened relative to the data
//! directory and the file name is looked at without following it: a symlink there is refused
//! rather than followed. The restore then writes through the opened `pg_wal` itself
//! (`/proc/self/fd/<fd>/<name>`), so swapping a directory for a symlink after the check
//! changes nothing. The data directory's own path is the operator's and is followed as
//! given; so is `pg_wal` when it is a symlink, which is how `initdb --waldir` and
//! `pg_basebackup --waldir` place WAL elsewhere (only the data directory's owner can make it).

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

/// A refusal: `BadRequest` for a target the API never writes to (400), `Failed` for a
/// file-system error on the way (500).
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Failed(String),
}

/// A checked target: its directory, open, and the file name in it.
#[derive(Debug)]
pub struct Target {
    dir: OwnedFd,
    name: OsString,
    /// The target as the client named it, for messages.
    pub shown: PathBuf,
}

impl Target {
    /// A path that reaches the target through the open directory, whatever happens to the
    /// path's components after the check (the directory descriptor stays open while `self`
    /// lives).
    pub fn through_fd(&self) -> PathBuf {
        self.fd_dir().join(&self.name)
    }

    /// The open directory as a path (`/proc/self/fd/<fd>`), to translate messages back.
    pub fn fd_dir(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd()))
    }
}

/// Checks `target` against `data_dir` and opens its directory; see the module comment.
pub fn confine(data_dir: &Path, target: &Path) -> Result<Target, TargetError> {
    let bad = |why: String| TargetError::BadRequest(format!("{}: {why}", target.display()));
    if !target.is_absolute() {
        return Err(bad("not an absolute path".into()));
    }
    if target.components().any(|c| c == Component::ParentDir) {
        return Err(bad("'..' is not allowed in a target path".into()));
    }
    // The operator may have configured the data directory through a symlink; PostgreSQL's
    // working directory (and so %p) is its resolved form. Either spelling is inside.
    let canonical = std::fs::canonicalize(data_dir).map_err(|e| {
        TargetError::Failed(format!("pg_data_directory {}: {e}", data_dir.display()))
    })?;
    let rel = [data_dir, canonical.as_path()]
        .iter()
        .find_map(|d| target.strip_prefix(d).ok())
        .ok_or_else(|| {
            bad(format!(
                "outside the site's pg_data_directory {}",
                data_dir.display()
            ))
        })?;
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(p) => parts.push(p),
            Component::CurDir => {}
            _ => return Err(bad("not a plain path below pg_data_directory".into())),
        }
    }
    let (wal, name) = match parts[..] {
        [wal, name] if wal == "pg_wal" => (wal, name),
        _ => {
            return Err(bad(format!(
                "not a file directly in {}/pg_wal, where PostgreSQL's %p points",
                data_dir.display()
            )))
        }
    };
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let data = rustix::fs::open(&canonical, dir_flags, Mode::empty()).map_err(|e| {
        TargetError::Failed(format!(
            "open pg_data_directory {}: {e}",
            canonical.display()
        ))
    })?;
    let dir = rustix::fs::openat(&data, wal, dir_flags, Mode::empty()).map_err(|e| {
        let msg = format!("open {}/pg_wal: {e}", canonical.display());
        match e {
            Errno::NOENT | Errno::NOTDIR => bad(msg),
            _ => TargetError::Failed(msg),
        }
    })?;
    match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => {}
            FileType::Symlink => {
                return Err(bad(
                    "is a symlink; the API replaces only regular files".into()
                ))
            }
            other => return Err(bad(format!("is a {other:?}, not a regular file"))),
        },
        Err(Errno::NOENT) => {}
        Err(e) => return Err(TargetError::Failed(format!("{}: {e}", target.display()))),
    }
    let confined = Target {
        dir,
        name: name.to_os_string(),
        shown: target.to_path_buf(),
    };
    // Without /proc there is no way to hand the open directory to path-based code.
    if !confined.fd_dir().is_dir() {
        return Err(TargetError::Failed(format!(
            "{} is not available (is /proc mounted?)",
            confined.fd_dir().display()
        )));
    }
    Ok(confined)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        std::fs::create_dir_all(data.join("pg_wal")).unwrap();
        std::fs::create_dir_all(data.join("global")).unwrap();
        std::fs::create_dir_all(t.path().join("outside")).unwrap();
        (t, data)
    }

    fn refused(data: &Path, target: &Path) -> String {
        match confine(data, target) {
            Err(TargetError::BadRequest(m)) => m,
            other => panic!("{} should be refused: {other:?}", target.display()),
        }
    }

    #[test]
    fn confine_accepts_files_in_pg_wal_in_either_spelling() {
        let (t, data) = setup();
        let link = t.path().join("data-link");
        std::os::unix::fs::symlink(&data, &link).unwrap();
        // Configured through a symlink, named by PostgreSQL through its resolved path (its
        // working directory), or as configured.
        for (configured, target) in [
            (&data, data.join("pg_wal/RECOVERYXLOG")),
            (&link, data.join("pg_wal/RECOVERYXLOG")),
            (&link, link.join("pg_wal/RECOVERYXLOG")),
            (&data, data.join("./pg_wal/RECOVERYHISTORY")),
        ] {
            let c = confine(configured, &target).unwrap_or_else(|e| panic!("{target:?}: {e}"));
            std::fs::write(c.through_fd(), b"x").unwrap();
        }
        assert_eq!(
            std::fs::read(data.join("pg_wal/RECOVERYXLOG")).unwrap(),
            b"x"
        );
        assert_eq!(
            std::fs::read(data.join("pg_wal/RECOVERYHISTORY")).unwrap(),
            b"x"
        );
        // Through another link to the same directory: not the configured spelling.
        let m = refused(&data, &link.join("pg_wal/RECOVERYXLOG"));
        assert!(m.contains("outside the site's pg_data_directory"), "{m}");
    }

    #[test]
    fn confine_follows_a_pg_wal_symlink_made_by_initdb_waldir() {
        let (t, data) = setup();
        let wal = t.path().join("waldisk");
        std::fs::create_dir_all(&wal).unwrap();
        std::fs::remove_dir(data.join("pg_wal")).unwrap();
        std::os::unix::fs::symlink(&wal, data.join("pg_wal")).unwrap();
        let c = confine(&data, &data.join("pg_wal/RECOVERYXLOG")).unwrap();
        std::fs::write(c.through_fd(), b"x").unwrap();
        assert_eq!(std::fs::read(wal.join("RECOVERYXLOG")).unwrap(), b"x");
    }

    #[test]
    fn confine_refuses_escapes() {
        let (t, data) = setup();
        let outside = t.path().join("outside");
        std::os::unix::fs::symlink(&outside, data.join("pg_wal/escape")).unwrap();
        std::os::unix::fs::symlink(outside.join("f"), data.join("pg_wal/file-link")).unwrap();
        let in_pg_wal = "not a file directly in";
        for (target, why) in [
            (outside.join("f"), "outside the site's pg_data_directory"),
            (data.join("../outside/f"), "'..' is not allowed"),
            (data.join("pg_wal/../../outside/f"), "'..' is not allowed"),
            (data.join("pg_wal/escape/f"), in_pg_wal),
            (data.join("pg_wal/file-link"), "is a symlink"),
            (data.join("pg_wal/escape"), "is a symlink"),
            (data.join("global/pg_control"), in_pg_wal),
            (data.join("postgresql.conf"), in_pg_wal),
            (data.clone(), in_pg_wal),
            (data.join("pg_wal"), in_pg_wal),
            (PathBuf::from("pg_wal/RECOVERYXLOG"), "not an absolute path"),
            (
                PathBuf::from(format!("{}x/pg_wal/f", data.display())),
                "outside the site's pg_data_directory",
            ),
        ] {
            let m = refused(&data, &target);
            assert!(m.contains(why), "{target:?}: {m}");
        }
        std::fs::create_dir(data.join("pg_wal/subdir")).unwrap();
        let m = refused(&data, &data.join("pg_wal/subdir"));
        assert!(m.contains("not a regular file"), "{m}");
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
    }
}
