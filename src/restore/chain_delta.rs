//! `get-basebackup --delta` over a chain of PostgreSQL 17+ block-incremental backups: what each
//! file of the newest backup needs, decided from the chain's `backup_manifest`s and the files
//! already there, before anything is downloaded ([`Plan`]).
//!
//! Every member's manifest lists each file it holds with its size and checksum (CRC-32C,
//! PostgreSQL's default; SHA-256 is understood too): a relation file either whole, or as
//! `INCREMENTAL.<file>`, the blocks changed since the member before it. For a file of the
//! newest backup, the newest member `k` that holds it whole is found; the members after `k`
//! hold it as incremental files. Its *known versions* are the one after member `k` (the whole
//! file's checksum) and, when the directory's own `backup_manifest` is the one a restore of
//! member `j` of this chain wrote ([`local_versions`]: the same WAL range and system
//! identifier, every entry of that member's manifest there with the same checksum or, for an
//! incremental entry, as the reconstructed file), the one after member `j`. The local file is
//! hashed and compared with them, newest first:
//!
//! 1. it is the version after the newest member: kept, not touched;
//! 2. it is the version after member `j`: only the incremental files of the members after `j`
//!    are applied to it, in place ([`super::combine::apply`]);
//! 3. otherwise (missing, modified, a server ran on it): rebuilt from member `k`'s whole file
//!    and the incremental files after it, as a full chain restore does.
//!
//! A checksum match is the only test (never a modification time). Only the chunks of the
//! members that hold something a file still needs are downloaded ([`Plan::needs`]); the
//! newest member's always are (it holds `global/pg_control`, which a delta restore always
//! writes, last, and `backup_label`). Everything else follows the chain restore
//! ([`super::get`]): what the newest backup does not have is removed, its `backup_label` and
//! `backup_manifest` rewritten ([`super::combine::finish`]), for which the checksums of files
//! known not to have changed are not computed again ([`Plan::known_final`]).
//!
//! Memory: the chain's manifests (about 200 bytes per file per member) and one entry per file
//! of the newest backup.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use aws_lc_rs::digest;
use serde_json::Value;

use walhoard_basebackup::control::ChunkKind;

use super::beneath::Beneath;
use super::chain::Member;
use super::chunks::chunk_key;
use super::combine::{incremental_target, restored_at, INCREMENTAL_PREFIX};
use super::extract::{safe_relative, HELD_BACK};
use super::RestoreSite;
use crate::pipeline::encryption::read_full;
use crate::pipeline::transfer::download_with;

/// A file's size and CRC-32C (hex, as in a manifest).
pub type Sum = (u64, String);

/// A manifest's checksum of a file, in the algorithms walhoard's backups and restores use:
/// CRC-32C (PostgreSQL's default, which walhoard asks for, and what a chain restore writes
/// for the files it reconstructed) and SHA-256 (what earlier chain restores wrote). Hex as
/// PostgreSQL writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Crc32c(String),
    Sha256(String),
}

/// A version of a file: its size and checksum.
pub type Version = (u64, Check);

/// What a local file is: size, SHA-256 (when asked for) and CRC-32C, hex as in a manifest.
pub(super) struct Digests {
    pub(super) size: u64,
    sha256: Option<String>,
    /// Hex, as a manifest holds it.
    pub(super) crc32c: String,
}

impl Digests {
    fn matches(&self, (size, check): &Version) -> bool {
        *size == self.size
            && match check {
                Check::Sha256(s) => self.sha256.as_ref() == Some(s),
                Check::Crc32c(c) => *c == self.crc32c,
            }
    }
}

/// The parts of a `backup_manifest` a delta restore compares.
#[derive(Debug)]
pub struct Manifest {
    system_identifier: Option<Value>,
    wal_ranges: Option<Value>,
    /// Path → size and checksum; `None` for an entry with another checksum algorithm.
    files: HashMap<String, Option<Version>>,
}

impl Manifest {
    /// Parses a manifest (`what` names it in errors).
    pub fn parse(bytes: &[u8], what: &str) -> Result<Manifest> {
        let v: Value =
            serde_json::from_slice(bytes).with_context(|| format!("{what}: not JSON"))?;
        let files = v
            .get("Files")
            .and_then(Value::as_array)
            .with_context(|| format!("{what}: no Files array"))?;
        let mut out = HashMap::with_capacity(files.len());
        for f in files {
            // An Encoded-Path entry (a name that is not UTF-8) is never a relation file: the
            // newest backup's copy of it is written.
            let Some(path) = f.get("Path").and_then(Value::as_str) else {
                continue;
            };
            let size = f
                .get("Size")
                .and_then(Value::as_u64)
                .with_context(|| format!("{what}: entry {path:?} has no Size"))?;
            let sum = match (
                f.get("Checksum-Algorithm").and_then(Value::as_str),
                f.get("Checksum").and_then(Value::as_str),
            ) {
                (Some(a), Some(c)) if a.eq_ignore_ascii_case("SHA256") => {
                    Some((size, Check::Sha256(c.to_ascii_lowercase())))
                }
                (Some(a), Some(c)) if a.eq_ignore_ascii_case("CRC32C") => {
                    Some((size, Check::Crc32c(c.to_ascii_lowercase())))
                }
                _ => None,
            };
            out.insert(path.to_string(), sum);
        }
        Ok(Manifest {
            system_identifier: v.get("System-Identifier").cloned(),
            wal_ranges: v.get("WAL-Ranges").cloned(),
            files: out,
        })
    }
}

/// How a file of the newest backup comes to be: from its state after chain member `member`,
/// taken from the local file (`local`, whose checksum matched that version) or written from
/// that member's whole file; then every newer member's incremental file applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub member: usize,
    pub local: bool,
}

/// What a delta restore of a chain does with each file (see the module documentation).
#[derive(Debug, Default)]
pub struct Plan {
    newest: usize,
    /// Absolute path (below the target or a tablespace directory) → where it comes from.
    files: HashMap<PathBuf, Source>,
    /// (member, tablespace oid or `None` for the data directory) whose chunk is needed.
    needed: BTreeSet<(usize, Option<u32>)>,
    /// Files whose contents are known (size and CRC-32C) without reading them: those whose
    /// local version matched and that no incremental file has changed since.
    known: Mutex<HashMap<PathBuf, Sum>>,
    pub kept: AtomicU64,
    pub patched: AtomicU64,
    pub rebuilt: AtomicU64,
    /// Of those, the ones rebuilt from an older member than the newest (whose chunks are
    /// downloaded for them).
    pub rebuilt_older: AtomicU64,
    /// Bytes of local files hashed to compare them.
    pub hashed: AtomicU64,
}

impl Plan {
    /// Whether the chunk of member `member` for the data directory (`None`) or tablespace
    /// `oid` holds anything this restore needs.
    pub fn needs(&self, member: usize, oid: Option<u32>) -> bool {
        member == self.newest || self.needed.contains(&(member, oid))
    }

    /// Whether `member` is the chain's newest.
    pub fn is_newest(&self, member: usize) -> bool {
        member == self.newest
    }

    /// Whether any chunk of `member` is needed.
    pub fn needs_member(&self, member: usize) -> bool {
        member == self.newest || self.needed.iter().any(|(m, _)| *m == member)
    }

    /// Whether the pass of chain member `member` writes the member for the file at `path`
    /// (absolute; an incremental file's target), which that member holds as an incremental
    /// file or whole. A member that is not acted upon has its body skipped; a kept file gets
    /// the mode a restore gives it (`mode`, in the newest member's pass). An entry that
    /// disagrees with the manifests (whole where they say incremental) is refused.
    pub fn wants(
        &self,
        member: usize,
        path: &Path,
        incremental: bool,
        mode: u32,
        backup: &str,
    ) -> io::Result<bool> {
        let Some(src) = self.files.get(path) else {
            // Not in the newest backup: removed at the end; the newest's own entries are
            // always written.
            return Ok(member == self.newest);
        };
        let refuse = |what: &str| {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "basebackup/{backup}: holds {} {what}, but the chain's manifests say otherwise: refused",
                    path.display()
                ),
            ))
        };
        if member < src.member || (member == src.member && src.local) {
            if member == self.newest {
                keep_mode(path, mode)?;
            }
            return Ok(false);
        }
        if member == src.member {
            if incremental {
                return refuse("as an incremental file");
            }
            return Ok(true);
        }
        if !incremental {
            return refuse("whole");
        }
        Ok(true)
    }

    /// After the pass of a member applied an incremental file to `path`: its contents are no
    /// longer known unless nothing changed (no block written, the same length).
    pub fn applied(&self, path: &Path, block_bytes: u64) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let unchanged = block_bytes == 0
            && known.get(path).is_some_and(|(size, _)| {
                fs::symlink_metadata(path).is_ok_and(|m| m.len() == *size)
            });
        if !unchanged {
            known.remove(path);
        }
    }

    /// Size and CRC-32C of the file at `path` (absolute) after the restore, when known
    /// without reading it.
    pub fn known_final(&self, path: &Path) -> Option<Sum> {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.get(path).cloned()
    }
}

/// Gives a kept file the mode a restore gives it (never following a link).
fn keep_mode(path: &Path, mode: u32) -> io::Result<()> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
}

/// The versions the directory's own `backup_manifest` (`local`) describes: when it is the
/// manifest a restore of chain member `j` wrote (the member's WAL range and system
/// identifier, each of its entries there unchanged or, for an incremental file, as the
/// reconstructed file with a checksum), `j` and each path's size and checksum after member
/// `j`.
pub fn local_versions(
    local: &Manifest,
    chain: &[Manifest],
) -> Option<(usize, HashMap<String, Version>)> {
    let j = chain.iter().rposition(|m| {
        m.wal_ranges.is_some()
            && m.wal_ranges == local.wal_ranges
            && m.system_identifier == local.system_identifier
    })?;
    for (path, sum) in &chain[j].files {
        // Rewritten or dropped by every restore.
        if path == "backup_label" || path == "tablespace_map" {
            continue;
        }
        let ok = match incremental_target(Path::new(path)) {
            Some(real) => matches!(local.files.get(real.to_str()?), Some(Some(_))),
            None => local.files.get(path) == Some(sum),
        };
        if !ok {
            tracing::debug!(
                path,
                "delta restore: the local backup_manifest is not the restore of member {j}"
            );
            return None;
        }
    }
    let versions = local
        .files
        .iter()
        .filter_map(|(p, s)| Some((p.clone(), s.clone()?)))
        .collect();
    Some((j, versions))
}

/// One file of the newest backup, being planned.
struct Candidate {
    /// The restore root (target or tablespace directory) it is below, and its path there.
    root: PathBuf,
    rel: PathBuf,
    path: PathBuf,
    /// Where its chunks are: `None` the data directory, or a tablespace oid.
    oid: Option<u32>,
    /// The newest member that holds it whole.
    whole_at: usize,
    /// Known versions, newest first: (member, the version after it).
    versions: Vec<(usize, Version)>,
    /// Whether its SHA-256 is needed: a version is known by one.
    want_sha: bool,
}

/// Plans the delta restore of the chain whose manifests are `chain` (oldest first; `names`
/// for errors) into `target` and the tablespace directories `tablespaces` (oid → directory),
/// whose own `backup_manifest` was `local`. Hashes the local files that could match,
/// `threads` at a time.
pub fn plan(
    chain: &[Manifest],
    names: &[String],
    local: Option<&Manifest>,
    target: &Path,
    tablespaces: &BTreeMap<u32, PathBuf>,
    threads: usize,
) -> Result<Plan> {
    let newest = chain.len().checked_sub(1).context("an empty chain")?;
    let local = local.and_then(|l| local_versions(l, chain));
    if let Some((j, _)) = &local {
        eprintln!(
            "restore: delta: the directory's backup_manifest is that of a restore of basebackup {}",
            names[*j]
        );
    }
    let mut candidates = Vec::new();
    for (path, sum) in &chain[newest].files {
        let real = incremental_target(Path::new(path));
        let real_str = match &real {
            Some(r) => r.to_string_lossy().into_owned(),
            None => path.clone(),
        };
        if path == "backup_manifest" {
            continue;
        }
        // Find the newest member holding it whole; the ones after hold it incrementally.
        let mut whole_at = newest;
        let mut whole_sum = sum.clone();
        if real.is_some() {
            loop {
                if whole_at == 0 {
                    bail!(
                        "basebackup/{}: holds {path:?} as an incremental file, but it is the chain's full backup: refused",
                        names[0]
                    );
                }
                whole_at -= 1;
                let m = &chain[whole_at].files;
                if let Some(s) = m.get(&real_str) {
                    whole_sum = s.clone();
                    break;
                }
                if !m.contains_key(&incremental_path(&real_str)) {
                    bail!(
                        "basebackup/{}: holds {path:?} as an incremental file, but its parent basebackup/{} has no {real_str:?}: the chain cannot be restored",
                        names[whole_at + 1],
                        names[whole_at]
                    );
                }
            }
        }
        // A forged manifest naming a path outside is refused, as such a tar member is.
        safe_relative(&real_str)
            .with_context(|| format!("basebackup/{}: manifest entry {path:?}", names[newest]))?;
        let (dir, rel) = restored_at(target, Path::new(&real_str), tablespaces)
            .with_context(|| format!("basebackup/{}: manifest entry {path:?}", names[newest]))?;
        let oid = Path::new(&real_str)
            .strip_prefix("pg_tblspc")
            .ok()
            .and_then(|r| r.iter().next()?.to_str()?.parse::<u32>().ok());
        let mut versions = Vec::new();
        // Always written from the newest member: the files held back, and backup_label
        // (rewritten by every chain restore, so a local copy is never the member's).
        let held_back = oid.is_none()
            && (HELD_BACK.iter().any(|h| Path::new(h) == rel) || rel == Path::new("backup_label"));
        if !held_back {
            if let Some((j, local)) = &local {
                if *j >= whole_at {
                    if let Some(s) = local.get(&real_str) {
                        versions.push((*j, s.clone()));
                    }
                }
            }
            if let Some(s) = whole_sum {
                if versions.first().is_none_or(|(j, _)| *j != whole_at) {
                    versions.push((whole_at, s));
                }
            }
        }
        let want_sha = versions
            .iter()
            .any(|(_, (_, c))| matches!(c, Check::Sha256(_)));
        candidates.push(Candidate {
            want_sha,
            path: dir.join(&rel),
            root: dir,
            rel,
            oid,
            whole_at,
            versions,
        });
    }
    let out = Plan {
        newest,
        ..Default::default()
    };
    let sources = Mutex::new(Vec::with_capacity(candidates.len()));
    let next = AtomicUsize::new(0);
    let failed = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(c) = candidates.get(i) else { break };
                match matching_version(c, &out.hashed) {
                    Ok(v) => sources
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((i, v)),
                    Err(e) => {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(
                            anyhow::Error::from(e).context(format!("compare {}", c.path.display())),
                        );
                        next.store(usize::MAX / 2, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut out = out;
    let known = out.known.get_mut().unwrap_or_else(|p| p.into_inner());
    for (i, matched) in sources.into_inner().unwrap_or_else(|p| p.into_inner()) {
        let c = &candidates[i];
        let src = match matched {
            Some((j, sum)) => {
                known.insert(c.path.clone(), sum);
                if j == newest {
                    out.kept.fetch_add(1, Ordering::Relaxed);
                } else {
                    out.patched.fetch_add(1, Ordering::Relaxed);
                }
                Source {
                    member: j,
                    local: true,
                }
            }
            None => {
                out.rebuilt.fetch_add(1, Ordering::Relaxed);
                if c.whole_at < newest {
                    out.rebuilt_older.fetch_add(1, Ordering::Relaxed);
                }
                out.needed.insert((c.whole_at, c.oid));
                Source {
                    member: c.whole_at,
                    local: false,
                }
            }
        };
        for m in src.member + 1..=newest {
            out.needed.insert((m, c.oid));
        }
        out.files.insert(c.path.clone(), src);
    }
    Ok(out)
}

fn incremental_path(real: &str) -> String {
    match real.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/{INCREMENTAL_PREFIX}{name}"),
        None => format!("{INCREMENTAL_PREFIX}{real}"),
    }
}

/// The newest known version the local file is: the member, and the file's size and CRC-32C.
/// A file that matches is synced: its contents may be only in the page cache of whatever
/// wrote them.
fn matching_version(c: &Candidate, hashed: &AtomicU64) -> io::Result<Option<(usize, Sum)>> {
    if c.versions.is_empty() {
        return Ok(None);
    }
    // Never through a symlink, the file's or a directory's on the way (Beneath): missing,
    // a link, not a directory where one is needed — rebuilt, and extracting deals with it.
    let Ok(mut f) = Beneath::open(&c.root).and_then(|b| b.open_read(&c.rel)) else {
        return Ok(None);
    };
    let m = f.metadata()?;
    if !m.is_file() || !c.versions.iter().any(|(_, (size, _))| *size == m.len()) {
        return Ok(None);
    }
    let d = digests(&mut f, c.want_sha)?;
    hashed.fetch_add(d.size, Ordering::Relaxed);
    let found = c
        .versions
        .iter()
        .find(|(_, v)| d.matches(v))
        .map(|(j, _)| (*j, (d.size, d.crc32c.clone())));
    if found.is_some() {
        f.sync_all()?;
    }
    Ok(found)
}

/// Size, SHA-256 and CRC-32C of what `r` holds, in one read. CRC-32C as PostgreSQL writes
/// it in a manifest (`pg_checksum_final`: the final value's bytes in memory order, on the
/// little-endian machines PostgreSQL runs on here).
pub(super) fn digests(r: &mut dyn Read, with_sha: bool) -> io::Result<Digests> {
    let mut sha = with_sha.then(|| digest::Context::new(&digest::SHA256));
    let mut crc = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = read_full(&mut &mut *r, &mut buf)?;
        if n == 0 {
            break;
        }
        if let Some(sha) = &mut sha {
            sha.update(&buf[..n]);
        }
        crc.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Digests {
        size,
        sha256: sha.map(|s| hex::encode(s.finish())),
        crc32c: hex::encode((crc.finalize() as u32).to_le_bytes()),
    })
}

/// Reads a manifest chunk's bytes (at most `limit`).
pub fn read_limited(r: &mut dyn Read, limit: u64) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.take(limit + 1).read_to_end(&mut v)?;
    Ok(v)
}

/// Plans a delta restore of `chain` into `target` and the tablespace directories
/// `tablespaces` (oid → directory): each member's `backup_manifest` chunk is downloaded
/// (checked against its size and SHA-1), the directory's own manifest read, the local files
/// compared ([`plan`]).
pub async fn prepare(
    site: &RestoreSite,
    chain: &[Member],
    target: &Path,
    tablespaces: &BTreeMap<u32, PathBuf>,
) -> Result<Plan> {
    let mut manifests = Vec::with_capacity(chain.len());
    let mut names = Vec::with_capacity(chain.len());
    for m in chain {
        let name = &m.listing.name;
        let source = site.for_backup(&m.listing)?;
        let c = m
            .meta
            .chunks
            .iter()
            .find(|c| c.kind == ChunkKind::Manifest)
            .with_context(|| format!("basebackup/{name} has no backup_manifest chunk"))?;
        let key = chunk_key(&m.meta, c);
        let limit = c.input_size;
        let (_, bytes) = download_with(&source.store, &key, &source.keys, move |_, r| {
            read_limited(r, limit)
        })
        .await
        .with_context(|| format!("read {key}"))?;
        let sha1 = hex::encode(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &bytes));
        if bytes.len() as u64 != c.input_size || sha1 != c.hash {
            bail!(
                "{key}: {} bytes with SHA-1 {sha1}, the control object says {} bytes with SHA-1 {}: refused",
                bytes.len(),
                c.input_size,
                c.hash
            );
        }
        manifests.push(Manifest::parse(&bytes, &key)?);
        names.push(name.clone());
    }
    let local = match Beneath::open(target) {
        Ok(root) => root.read(Path::new("backup_manifest"))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("open {}", target.display())),
    };
    let local = local.and_then(|b| {
        Manifest::parse(&b, "the directory's backup_manifest")
            .map_err(|e| tracing::info!("delta restore: {e:#}; not used"))
            .ok()
    });
    let (target, tablespaces) = (target.to_path_buf(), tablespaces.clone());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    tokio::task::spawn_blocking(move || {
        plan(
            &manifests,
            &names,
            local.as_ref(),
            &target,
            &tablespaces,
            threads,
        )
    })
    .await
    .context("delta restore planning failed")?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        hex::encode(digest::digest(&digest::SHA256, b))
    }

    fn manifest(wal: &str, files: &[(&str, &[u8])]) -> Manifest {
        let files: Vec<Value> = files
            .iter()
            .map(|(p, b)| {
                serde_json::json!({"Path": p, "Size": b.len(), "Checksum-Algorithm": "SHA256", "Checksum": sha(b)})
            })
            .collect();
        let v = serde_json::json!({"PostgreSQL-Backup-Manifest-Version": 2, "System-Identifier": 7,
            "Files": files, "WAL-Ranges": [{"Timeline": 1, "Start-LSN": wal, "End-LSN": wal}]});
        Manifest::parse(v.to_string().as_bytes(), "test").unwrap()
    }

    /// A file that is the newest version is kept; one that is the parent's gets only the
    /// newest's incremental file; a modified or missing one is rebuilt from the member that
    /// holds it whole, and only the chunks those need are asked for.
    #[test]
    fn each_file_gets_the_least_work_its_contents_allow() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("base/5")).unwrap();
        fs::write(root.join("PG_VERSION"), b"17\n").unwrap();
        fs::write(root.join("base/5/1"), b"parent").unwrap();
        fs::write(root.join("base/5/2"), b"changed!").unwrap();
        fs::write(root.join("base/5/4"), b"newest").unwrap();
        let full = manifest(
            "0/1",
            &[
                ("PG_VERSION", b"17\n"),
                ("base/5/1", b"parent"),
                ("base/5/2", b"parent"),
            ],
        );
        let inc = manifest(
            "0/2",
            &[
                ("PG_VERSION", b"17\n"),
                ("base/5/INCREMENTAL.1", b"i"),
                ("base/5/INCREMENTAL.2", b"i"),
                ("base/5/3", b"new"),
                ("base/5/4", b"newest"),
            ],
        );
        let names = vec!["f".to_string(), "i".to_string()];
        let p = plan(&[full, inc], &names, None, root, &BTreeMap::new(), 2).unwrap();
        let src = |f: &str| p.files[&root.join(f)];
        assert_eq!(
            src("base/5/1"),
            Source {
                member: 0,
                local: true
            }
        );
        assert_eq!(
            src("base/5/2"),
            Source {
                member: 0,
                local: false
            }
        );
        assert_eq!(
            src("base/5/3"),
            Source {
                member: 1,
                local: false
            }
        );
        assert_eq!(
            src("base/5/4"),
            Source {
                member: 1,
                local: true
            }
        );
        // PG_VERSION is held back: always written.
        assert_eq!(
            src("PG_VERSION"),
            Source {
                member: 1,
                local: false
            }
        );
        assert!(p.needs(0, None) && p.needs(1, None) && !p.needs(0, Some(16400)));
        // Member 0 writes base/5/2 and skips base/5/1; member 1 applies both.
        assert!(p
            .wants(0, &root.join("base/5/2"), false, 0o600, "f")
            .unwrap());
        assert!(!p
            .wants(0, &root.join("base/5/1"), false, 0o600, "f")
            .unwrap());
        assert!(p
            .wants(1, &root.join("base/5/1"), true, 0o600, "i")
            .unwrap());
        assert!(!p
            .wants(1, &root.join("base/5/4"), false, 0o600, "i")
            .unwrap());
        // A member that disagrees with its manifest is refused.
        assert!(p
            .wants(1, &root.join("base/5/1"), false, 0o600, "i")
            .is_err());
        assert_eq!(p.known_final(&root.join("base/5/4")).unwrap().0, 6);

        // Only the parent's version matches, and the file is not at the newest: nothing of
        // the full backup is needed once base/5/2 is right too.
        fs::write(root.join("base/5/2"), b"parent").unwrap();
        let full = manifest(
            "0/1",
            &[
                ("PG_VERSION", b"17\n"),
                ("base/5/1", b"parent"),
                ("base/5/2", b"parent"),
            ],
        );
        let inc = manifest(
            "0/2",
            &[
                ("PG_VERSION", b"17\n"),
                ("base/5/INCREMENTAL.1", b"i"),
                ("base/5/INCREMENTAL.2", b"i"),
            ],
        );
        let p = plan(&[full, inc], &names, None, root, &BTreeMap::new(), 1).unwrap();
        assert!(!p.needs_member(0));
    }

    /// The directory's own manifest counts only when it is a restore of a member of the
    /// chain: that member's entries there, unchanged or reconstructed.
    /// CRC-32C as PostgreSQL writes it in a manifest (values from a PostgreSQL 17
    /// backup_manifest: PG_VERSION "17\n", and an empty file).
    #[test]
    fn crc32c_is_written_as_postgresql_does() {
        assert_eq!(digests(&mut &b"17\n"[..], true).unwrap().crc32c, "64440205");
        assert_eq!(digests(&mut &b""[..], false).unwrap().crc32c, "00000000");
        let v = serde_json::json!({"Files": [{"Path": "PG_VERSION", "Size": 3,
            "Checksum-Algorithm": "CRC32C", "Checksum": "64440205"}]});
        let m = Manifest::parse(v.to_string().as_bytes(), "test").unwrap();
        let d = digests(&mut &b"17\n"[..], true).unwrap();
        assert!(d.matches(m.files["PG_VERSION"].as_ref().unwrap()));
        assert!(!digests(&mut &b"18\n"[..], false)
            .unwrap()
            .matches(m.files["PG_VERSION"].as_ref().unwrap()));
    }

    /// A manifest path outside the target is refused; a local file reached through a
    /// symlinked directory is never taken as matching.
    #[test]
    fn paths_outside_and_links_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        fs::create_dir_all(&root).unwrap();
        let names = vec!["f".to_string()];
        let evil = manifest("0/1", &[("../outside", b"x")]);
        let err = plan(&[evil], &names, None, &root, &BTreeMap::new(), 1).unwrap_err();
        assert!(format!("{err:#}").contains("../outside"), "{err:#}");
        fs::create_dir_all(dir.path().join("elsewhere")).unwrap();
        fs::write(dir.path().join("elsewhere/1"), b"a").unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), root.join("base")).unwrap();
        let m = manifest("0/1", &[("base/1", b"a")]);
        let p = plan(&[m], &names, None, &root, &BTreeMap::new(), 1).unwrap();
        assert_eq!(
            p.files[&root.join("base/1")],
            Source {
                member: 0,
                local: false
            }
        );
    }

    #[test]
    fn the_local_manifest_must_be_a_restore_of_a_member() {
        let full = manifest("0/1", &[("PG_VERSION", b"17\n"), ("base/5/1", b"a")]);
        let inc = manifest(
            "0/2",
            &[("PG_VERSION", b"17\n"), ("base/5/INCREMENTAL.1", b"i")],
        );
        let restored = manifest("0/2", &[("PG_VERSION", b"17\n"), ("base/5/1", b"ab")]);
        let chain = [full, inc];
        let (j, v) = local_versions(&restored, &chain).unwrap();
        assert_eq!((j, v["base/5/1"].0), (1, 2));
        let other = manifest("0/3", &[("PG_VERSION", b"17\n"), ("base/5/1", b"ab")]);
        assert!(local_versions(&other, &chain).is_none());
        let edited = manifest("0/2", &[("PG_VERSION", b"18\n"), ("base/5/1", b"ab")]);
        assert!(local_versions(&edited, &chain).is_none());
        let missing = manifest("0/2", &[("PG_VERSION", b"17\n")]);
        assert!(local_versions(&missing, &chain).is_none());
    }
}
