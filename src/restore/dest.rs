//! The directories a restore writes into: which of them may be emptied, and how a failed
//! restore is undone.
//!
//! `--overwrite` empties only directories the operator named (`--target-dir`,
//! `--tablespace-dir`). A tablespace directory that only the backup's metadata names is data
//! from elsewhere: a forged path could name any directory on the host, so such a directory must
//! be empty (or absent), absolute and plain, and no directory may contain another, or the
//! restore stops before anything is changed.

use std::collections::BTreeMap;
use std::io;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::extract::empty_dir;

/// A directory restore writes into, and how to undo that.
pub(super) struct Dest {
    path: PathBuf,
    undo: Undo,
}

/// What a failed restore does to a directory it wrote into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Undo {
    /// Made by us: removed.
    Remove,
    /// Found empty (or emptied by `--overwrite`): emptied again.
    Empty,
    /// `--delta` into an existing directory: left as it is (without `global/pg_control`,
    /// [`super::delta::unmark`]), so that running the restore again needs to write less.
    Leave,
}

/// What get-basebackup does with a target (or tablespace) directory that is not empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse it (the default).
    Refuse,
    /// `--overwrite`: empty it first.
    Overwrite,
    /// `--delta`: keep what matches the backup, rewrite what differs, remove the rest.
    Delta,
}

/// Who named a directory restore writes into, which decides whether `--overwrite` may empty it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NamedBy {
    /// `--target-dir` or `--tablespace-dir`: the operator chose it; `--overwrite` empties it.
    Operator,
    /// A tablespace path from the backup's metadata: data from elsewhere, so it is never
    /// emptied, whatever the flags say (a forged path could name any directory).
    Backup,
}

impl Dest {
    /// Refuses a non-empty directory that the backup's metadata names (see [`NamedBy::Backup`]).
    pub(super) fn check_empty(path: &Path, what: &str) -> Result<()> {
        let busy = std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_some());
        if busy {
            bail!(
                "{what} {} is not empty; it was named by the backup's metadata, not on the command line, so --overwrite does not empty it: \
                 choose a directory with --tablespace-dir (or empty this one yourself)",
                path.display()
            );
        }
        Ok(())
    }

    pub(super) fn prepare(
        path: &Path,
        existing: Existing,
        named_by: NamedBy,
        what: &str,
    ) -> Result<Dest> {
        match std::fs::read_dir(path) {
            Ok(mut entries) => {
                let mut undo = Undo::Empty;
                if entries.next().is_some() {
                    if named_by == NamedBy::Backup {
                        Self::check_empty(path, what)?;
                    }
                    match existing {
                        Existing::Refuse => bail!(
                            "{what} {} is not empty (use --overwrite to replace its contents, or --delta to write only what differs)",
                            path.display()
                        ),
                        Existing::Overwrite => {
                            empty_dir(path)
                                .with_context(|| format!("empty {}", path.display()))?;
                        }
                        Existing::Delta => undo = Undo::Leave,
                    }
                }
                set_mode(path, 0o700)?;
                Ok(Dest {
                    path: path.to_path_buf(),
                    undo,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(path)
                    .with_context(|| format!("create {what} {}", path.display()))?;
                set_mode(path, 0o700)?;
                Ok(Dest {
                    path: path.to_path_buf(),
                    undo: Undo::Remove,
                })
            }
            Err(e) => Err(e).with_context(|| format!("{what} {}", path.display())),
        }
    }

    pub(super) fn undo(&self) {
        let r = match self.undo {
            Undo::Remove => std::fs::remove_dir_all(&self.path),
            Undo::Empty => empty_dir(&self.path),
            Undo::Leave => {
                tracing::warn!(dir = %self.path.display(), "the --delta restore failed: the directory is left without global/pg_control (PostgreSQL will not start on it); run the restore again");
                Ok(())
            }
        };
        if let Err(e) = r {
            tracing::warn!(dir = %self.path.display(), error = %e, "cannot remove what a failed restore wrote");
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// A tablespace directory as the backup's metadata gives it: an absolute path of plain
/// components (PostgreSQL's tablespace locations are absolute), or an error naming it.
pub(super) fn backup_named_dir(backup: &str, name: &str, path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    let plain = p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !plain {
        bail!(
            "basebackup/{backup}: tablespace {name:?} has the directory {path:?} in the backup's metadata, \
             not an absolute path without '.' or '..': refused (choose one with --tablespace-dir {name}=DIR)"
        );
    }
    Ok(p.to_path_buf())
}

/// The target directory and the tablespace directories must not contain one another:
/// emptying or removing one (--overwrite, or the undo of a failed restore) would take the
/// other's contents with it, and files would be extracted into the wrong one.
pub(super) fn check_disjoint(
    target: &Path,
    ts_dirs: &BTreeMap<String, (u32, PathBuf)>,
) -> Result<()> {
    // Lexically absolute, and resolved where the directory exists (a symlinked alias).
    let resolve = |p: &Path| -> Result<PathBuf> {
        let abs =
            std::path::absolute(p).with_context(|| format!("absolute path of {}", p.display()))?;
        Ok(std::fs::canonicalize(&abs).unwrap_or(abs))
    };
    let mut dirs = vec![("the target directory".to_string(), resolve(target)?)];
    for (key, (_, d)) in ts_dirs {
        dirs.push((format!("tablespace {key:?}'s directory"), resolve(d)?));
    }
    for (i, (a_what, a)) in dirs.iter().enumerate() {
        for (b_what, b) in &dirs[i + 1..] {
            if a.starts_with(b) || b.starts_with(a) {
                bail!(
                    "{a_what} {} and {b_what} {} overlap (one is inside the other): refused, nothing was changed",
                    a.display(),
                    b.display()
                );
            }
        }
    }
    Ok(())
}
