//! Which files of a data directory go into a local-tar backup, and how they are split into
//! chunks.
//!
//! The exclusion rules are PostgreSQL's own (`excludeDirContents`, `excludeFiles` and the
//! unlogged-relation and temp-relation checks in basebackup.c), so a local-tar backup holds what
//! BASE_BACKUP would send. Member names follow pghoard's local-tar format: `pgdata/<path>` for
//! the data directory and `tablespaces/<name>/<path>` for a user tablespace.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::tar::{Member, MemberKind};

/// Directories whose contents are not backed up, but which are created empty (basebackup.c's
/// excludeDirContents, plus pg_wal whose contents come from the WAL archive).
pub const EXCLUDE_DIR_CONTENTS: &[&str] = &[
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
    "pg_wal",
];

/// Files never backed up, anywhere in the tree (basebackup.c's excludeFiles).
const EXCLUDE_FILES: &[&str] = &[
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "pg_internal.init",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "postmaster.pid",
    "postmaster.opts",
];

/// A member to archive: its name in the tar and where to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub member: Member,
    pub local: PathBuf,
}

impl Entry {
    /// Size of the file's data (0 for directories and links).
    pub fn size(&self) -> u64 {
        match self.member.kind {
            MemberKind::File { size } => size,
            _ => 0,
        }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.member.kind, MemberKind::Dir)
    }
}

/// A user tablespace to back up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tablespace {
    pub oid: u32,
    pub name: String,
    /// Its directory (the target of `pg_tblspc/<oid>`).
    pub path: PathBuf,
}

fn member_of(path: String, meta: &fs::Metadata, kind: MemberKind) -> Member {
    Member {
        path,
        kind,
        mode: meta.permissions().mode() & 0o7777,
        mtime: u64::try_from(meta.mtime()).unwrap_or(0),
    }
}

/// `t<digits>_<digits>` plus an optional fork/segment suffix: a temporary relation
/// (looks_like_temp_rel_name in fd.c).
fn looks_like_temp_rel(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('t') else {
        return false;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || rest.as_bytes().get(digits) != Some(&b'_') {
        return false;
    }
    let rest = &rest[digits + 1..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && {
        let tail = &rest[digits..];
        tail.is_empty()
            || ["_fsm", "_vm", "_init"].iter().any(|f| {
                tail.strip_prefix(f)
                    .is_some_and(|t| t.is_empty() || is_segment_suffix(t))
            })
            || is_segment_suffix(tail)
    }
}

fn is_segment_suffix(s: &str) -> bool {
    s.strip_prefix('.')
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// The relfilenode of a relation file name (`16384`, `16384.1`, `16384_fsm`...).
fn relfilenode(name: &str) -> Option<&str> {
    let digits = name.bytes().take_while(u8::is_ascii_digit).count();
    (digits > 0).then(|| &name[..digits])
}

/// Whether `dir` is a database directory (`base/<oid>` or `<tablespace>/PG_*/<oid>`), where
/// the unlogged-relation rule applies.
fn is_database_dir(archive_dir: &str) -> bool {
    let parts: Vec<&str> = archive_dir.split('/').collect();
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match parts.as_slice() {
        ["pgdata", "base", db] => numeric(db),
        ["tablespaces", _, version, db] => version.starts_with("PG_") && numeric(db),
        _ => false,
    }
}

/// Walks what a backup needs; entries come in tar order (a directory before its contents).
pub struct Walker {
    /// Files that vanished while walking are skipped; counted for the log.
    pub vanished: u64,
}

impl Default for Walker {
    fn default() -> Self {
        Self::new()
    }
}

impl Walker {
    pub fn new() -> Self {
        Walker { vanished: 0 }
    }

    /// Everything to back up from `pgdata` and `tablespaces`, except `global/pg_control`
    /// (taken last, after every chunk, like basebackup.c does) and the files PostgreSQL
    /// excludes. `major` selects the tablespace version directory (`PG_<major>_*`).
    pub fn walk(
        &mut self,
        pgdata: &Path,
        tablespaces: &[Tablespace],
        major: u32,
    ) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        let meta = fs::metadata(pgdata)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", pgdata.display())))?;
        out.push(Entry {
            member: member_of("pgdata".into(), &meta, MemberKind::Dir),
            local: pgdata.to_path_buf(),
        });
        self.dir(pgdata, "pgdata", true, &mut out)?;
        for ts in tablespaces {
            let base = format!("tablespaces/{}", ts.name);
            let meta = fs::metadata(&ts.path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("tablespace {} at {}: {e}", ts.name, ts.path.display()),
                )
            })?;
            out.push(Entry {
                member: member_of(base.clone(), &meta, MemberKind::Dir),
                local: ts.path.clone(),
            });
            // Only this server's version directory: another major may share the location.
            let version_prefix = format!("PG_{major}_");
            for name in sorted_names(&ts.path)? {
                if name.starts_with(&version_prefix) {
                    self.entry(&ts.path.join(&name), &format!("{base}/{name}"), &mut out)?;
                }
            }
        }
        Ok(out)
    }

    /// An error reading `local`: a file that vanished while walking (when it `may_vanish`) is
    /// counted and skipped; anything else is returned, naming the path.
    fn vanished_or(&mut self, e: io::Error, local: &Path, may_vanish: bool) -> io::Result<()> {
        if may_vanish && e.kind() == io::ErrorKind::NotFound {
            self.vanished += 1;
            return Ok(());
        }
        Err(io::Error::new(
            e.kind(),
            format!("{}: {e}", local.display()),
        ))
    }

    fn dir(
        &mut self,
        local: &Path,
        archive: &str,
        top: bool,
        out: &mut Vec<Entry>,
    ) -> io::Result<()> {
        let names = match sorted_names(local) {
            Ok(n) => n,
            Err(e) => return self.vanished_or(e, local, !top),
        };
        // Unlogged relations: only their init fork is backed up (basebackup.c sendDir).
        let unlogged: HashSet<String> = if is_database_dir(archive) {
            names
                .iter()
                .filter_map(|n| n.strip_suffix("_init"))
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                .map(str::to_string)
                .collect()
        } else {
            HashSet::new()
        };
        for name in names {
            if EXCLUDE_FILES.contains(&name.as_str()) || name.starts_with("pgsql_tmp") {
                continue;
            }
            if top && (name == "pg_tblspc" || name.starts_with(".s.PGSQL.")) {
                // Tablespaces are archived under tablespaces/<name> and linked at restore.
                if name == "pg_tblspc" {
                    let meta = fs::symlink_metadata(local.join(&name))?;
                    out.push(Entry {
                        member: member_of(format!("{archive}/pg_tblspc"), &meta, MemberKind::Dir),
                        local: local.join(&name),
                    });
                }
                continue;
            }
            if !unlogged.is_empty() {
                if let Some(node) = relfilenode(&name) {
                    if unlogged.contains(node) && !name.starts_with(&format!("{node}_init")) {
                        continue;
                    }
                }
            }
            if is_database_dir(archive) && looks_like_temp_rel(&name) {
                continue;
            }
            let path = local.join(&name);
            let child = format!("{archive}/{name}");
            if top && EXCLUDE_DIR_CONTENTS.contains(&name.as_str()) {
                match fs::metadata(&path) {
                    Ok(meta) if meta.is_dir() => {
                        out.push(Entry {
                            member: member_of(child.clone(), &meta, MemberKind::Dir),
                            local: path.clone(),
                        });
                        if name == "pg_wal" {
                            out.push(Entry {
                                member: member_of(
                                    format!("{child}/archive_status"),
                                    &meta,
                                    MemberKind::Dir,
                                ),
                                local: path.join("archive_status"),
                            });
                        }
                    }
                    _ => {}
                }
                continue;
            }
            if top && archive == "pgdata" && name == "global" {
                self.global(&path, &child, out)?;
                continue;
            }
            self.entry(&path, &child, out)?;
        }
        Ok(())
    }

    fn global(&mut self, local: &Path, archive: &str, out: &mut Vec<Entry>) -> io::Result<()> {
        let meta = fs::metadata(local)?;
        out.push(Entry {
            member: member_of(archive.into(), &meta, MemberKind::Dir),
            local: local.to_path_buf(),
        });
        for name in sorted_names(local)? {
            if name == "pg_control" || EXCLUDE_FILES.contains(&name.as_str()) {
                continue;
            }
            self.entry(&local.join(&name), &format!("{archive}/{name}"), out)?;
        }
        Ok(())
    }

    fn entry(&mut self, local: &Path, archive: &str, out: &mut Vec<Entry>) -> io::Result<()> {
        let meta = match fs::symlink_metadata(local) {
            Ok(m) => m,
            Err(e) => return self.vanished_or(e, local, true),
        };
        let ft = meta.file_type();
        if ft.is_file() {
            out.push(Entry {
                member: member_of(archive.into(), &meta, MemberKind::File { size: meta.len() }),
                local: local.to_path_buf(),
            });
        } else if ft.is_dir() {
            out.push(Entry {
                member: member_of(archive.into(), &meta, MemberKind::Dir),
                local: local.to_path_buf(),
            });
            self.dir(local, archive, false, out)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(local)?;
            out.push(Entry {
                member: member_of(
                    archive.into(),
                    &meta,
                    MemberKind::Symlink {
                        target: target.to_string_lossy().into_owned(),
                    },
                ),
                local: local.to_path_buf(),
            });
        }
        // Sockets, FIFOs and devices are skipped, as basebackup.c does.
        Ok(())
    }
}

fn sorted_names(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        match e.file_name().into_string() {
            Ok(n) => names.push(n),
            Err(n) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: file name {n:?} is not UTF-8", dir.display()),
                ))
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Splits entries into chunks of about `target` bytes of file data, as pghoard does: a chunk
/// is closed when it holds over a fifth of the target and the next file would tip it over.
/// Each chunk starts with the directories it is inside of, so extracting chunks in any order
/// creates directories with their own modes.
pub fn plan_chunks(entries: Vec<Entry>, target: u64) -> Vec<Vec<Entry>> {
    let mut chunks = Vec::new();
    let mut current: Vec<Entry> = Vec::new();
    let mut size = 0u64;
    // Directories enclosing the current position, by archive path.
    let mut open: Vec<Entry> = Vec::new();
    for e in entries {
        while let Some(last) = open.last() {
            let p = format!("{}/", last.member.path);
            if e.member.path.starts_with(&p) {
                break;
            }
            open.pop();
        }
        if size > target / 5 && size + e.size() > target {
            chunks.push(std::mem::take(&mut current));
            size = 0;
            current.extend(open.iter().cloned());
        }
        size += e.size();
        if e.is_dir() {
            open.push(e.clone());
        }
        current.push(e);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_relations() {
        for yes in [
            "t3_16384",
            "t3_16384.1",
            "t3_16384_fsm",
            "t12_5_vm.3",
            "t1_2_init",
        ] {
            assert!(looks_like_temp_rel(yes), "{yes}");
        }
        for no in [
            "16384",
            "t3",
            "t_1",
            "t3_",
            "t3_1x",
            "tablespace_map",
            "t3_1_xyz",
        ] {
            assert!(!looks_like_temp_rel(no), "{no}");
        }
    }

    #[test]
    fn walk_applies_postgres_exclusions() {
        let d = tempfile::tempdir().unwrap();
        let pg = d.path().join("data");
        let mk = |p: &str, data: &[u8]| {
            let f = pg.join(p);
            fs::create_dir_all(f.parent().unwrap()).unwrap();
            fs::write(f, data).unwrap();
        };
        mk("PG_VERSION", b"15\n");
        mk("postmaster.pid", b"1");
        mk("postmaster.opts", b"x");
        mk("backup_label", b"old");
        mk("global/pg_control", b"ctl");
        mk("global/1262", b"db");
        mk("global/pg_internal.init", b"cache");
        mk("base/5/16384", b"rel");
        mk("base/5/16390", b"unlogged main");
        mk("base/5/16390_init", b"");
        mk("base/5/16390.1", b"unlogged seg");
        mk("base/5/t3_16400", b"temp");
        mk("base/pgsql_tmp/pgsql_tmp1.0", b"sort");
        mk("pg_wal/000000010000000000000001", b"wal");
        mk("pg_wal/archive_status/000000010000000000000001.done", b"");
        mk("pg_replslot/s/state", b"slot");
        mk("pg_stat_tmp/x", b"");
        mk("pg_tblspc/.keep", b"");
        let ts_dir = d.path().join("ts");
        for (p, data) in [
            ("PG_15_202209061/5/16500", &b"ts rel"[..]),
            ("PG_16_202307071/5/16500", b"other major"),
        ] {
            fs::create_dir_all(ts_dir.join(p).parent().unwrap()).unwrap();
            fs::write(ts_dir.join(p), data).unwrap();
        }
        let ts = Tablespace {
            oid: 16499,
            name: "ts1".into(),
            path: ts_dir,
        };
        let mut w = Walker::new();
        let entries = w.walk(&pg, &[ts], 15).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.member.path.as_str()).collect();
        for want in [
            "pgdata",
            "pgdata/PG_VERSION",
            "pgdata/global/1262",
            "pgdata/base/5/16384",
            "pgdata/base/5/16390_init",
            "pgdata/pg_wal",
            "pgdata/pg_wal/archive_status",
            "pgdata/pg_replslot",
            "pgdata/pg_tblspc",
            "tablespaces/ts1",
            "tablespaces/ts1/PG_15_202209061/5/16500",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        for not in [
            "pgdata/postmaster.pid",
            "pgdata/postmaster.opts",
            "pgdata/backup_label",
            "pgdata/global/pg_control",
            "pgdata/global/pg_internal.init",
            "pgdata/base/5/16390",
            "pgdata/base/5/16390.1",
            "pgdata/base/5/t3_16400",
            "pgdata/base/pgsql_tmp",
            "pgdata/pg_wal/000000010000000000000001",
            "pgdata/pg_replslot/s",
            "pgdata/pg_tblspc/.keep",
            "tablespaces/ts1/PG_16_202307071",
        ] {
            assert!(
                !names
                    .iter()
                    .any(|n| *n == not || n.starts_with(&format!("{not}/"))),
                "{not} in {names:?}"
            );
        }
    }

    #[test]
    fn chunks_reopen_their_directories() {
        let e = |p: &str, size: Option<u64>| Entry {
            member: Member {
                path: p.into(),
                kind: match size {
                    Some(size) => MemberKind::File { size },
                    None => MemberKind::Dir,
                },
                mode: 0o700,
                mtime: 0,
            },
            local: PathBuf::from(p),
        };
        let entries = vec![
            e("pgdata", None),
            e("pgdata/base", None),
            e("pgdata/base/1", Some(60)),
            e("pgdata/base/2", Some(60)),
            e("pgdata/global", None),
            e("pgdata/global/3", Some(10)),
        ];
        let chunks = plan_chunks(entries, 100);
        assert_eq!(chunks.len(), 2);
        let second: Vec<&str> = chunks[1].iter().map(|e| e.member.path.as_str()).collect();
        assert_eq!(
            second,
            [
                "pgdata",
                "pgdata/base",
                "pgdata/base/2",
                "pgdata/global",
                "pgdata/global/3"
            ]
        );
    }
}
