//! Combining a chain of PostgreSQL 17+ block-incremental backups into one data directory, as
//! `pg_combinebackup` does, while the chain's tars stream in.
//!
//! The chain (a full backup, then each incremental taken against the one before,
//! [`super::chain`]) is restored oldest first, one streaming pass per backup, into the same
//! directories:
//!
//! - a whole file replaces what an older backup left there;
//! - an `INCREMENTAL.<relfile>` member is applied to `<relfile>` as left by the older backups
//!   ([`apply`]): the file is cut to the member's truncation block length, the member's blocks
//!   are written at their block numbers, and the file is extended with zeros to
//!   `max(truncation length, highest block + 1)` blocks;
//! - whatever the newer backup does not have (a dropped table, a removed segment) is removed
//!   after its pass (the pass's [`Seen`]).
//!
//! By induction each pass leaves exactly the data directory that backup describes, which is
//! what `pg_combinebackup` computes for the newest backup (reconstruct.c): a block comes from
//! the newest backup that has it, below the newest truncation length; older blocks from the
//! file as the older backups left it. One difference, deliberate: a block an intermediate
//! backup truncated away and no later backup wrote is zero here (each backup's truncation is
//! honoured), where `pg_combinebackup` consults only the newest truncation length and may
//! bring back the pre-truncation contents from the full backup. WAL replay from the newest
//! backup's start rewrites any block that mattered either way.
//!
//! Then [`finish`] makes the newest backup's `backup_label` and `backup_manifest` describe the
//! combined directory: the `INCREMENTAL FROM` lines go (PostgreSQL refuses to start on an
//! incremental backup's label), and each `INCREMENTAL.<relfile>` entry of the manifest becomes
//! `<relfile>` with the size and CRC-32C of the reconstructed file, read back once (CRC-32C,
//! as `pg_combinebackup` writes by default: the files' integrity is already checked by the
//! chunks' SHA-1, and it is several times cheaper than SHA-256 to read back gigabytes).
//!
//! Memory: a buffer of up to 1 MiB of blocks (a run of consecutive ones) and an incremental
//! file's block list (at most `RELSEG_SIZE` numbers, 512 KiB) per file being applied; the
//! manifest while it is rewritten.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use aws_lc_rs::digest;

use super::beneath::Beneath;
use super::chain_delta::Plan;
use super::delta::Seen;
use crate::pipeline::encryption::read_full;
use std::sync::Arc;

/// Name prefix of PostgreSQL's incremental files (`INCREMENTAL_PREFIX` in basebackup.c).
pub const INCREMENTAL_PREFIX: &str = "INCREMENTAL.";
/// `INCREMENTAL_MAGIC` (basebackup_incremental.h).
const INCREMENTAL_MAGIC: u32 = 0xd3ae_1f0d;
/// PostgreSQL's block size (the default build, which walhoard's backups come from).
const BLCKSZ: u64 = 8192;
/// Blocks per relation segment (the default 1 GiB segments): no block number or count in an
/// incremental file may reach it.
const RELSEG_SIZE: u32 = 131_072;
/// Most blocks of an incremental file written in one call (1 MiB).
const RUN_BLOCKS: usize = 128;

/// One backup's pass over the chain's directories.
#[derive(Debug, Default)]
pub struct Combine {
    /// The backup this pass restores (named in errors).
    pub backup: String,
    /// Whether `INCREMENTAL.*` members are applied (an incremental backup) or refused (the
    /// chain's full backup, which has nothing older to combine them with).
    pub incremental: bool,
    /// Every path this backup has, below each restore root.
    pub seen: Seen,
    /// Incremental files applied and the block bytes they wrote.
    pub applied: AtomicU64,
    pub block_bytes: AtomicU64,
    /// `--delta`: this pass's place in the chain and what each file needs
    /// ([`super::chain_delta`]); `None` restores every member of the backup.
    pub delta: Option<(usize, Arc<Plan>)>,
}

impl Combine {
    pub fn new(backup: &str, incremental: bool) -> Self {
        Combine {
            backup: backup.to_string(),
            incremental,
            ..Default::default()
        }
    }

    /// Whether this pass writes the member for the file `path` (absolute; an incremental
    /// file's target): always, unless a delta plan says the file is settled
    /// ([`Plan::wants`]).
    pub fn wants(&self, path: &Path, incremental: bool, mode: u32) -> io::Result<bool> {
        match &self.delta {
            None => Ok(true),
            Some((member, plan)) => plan.wants(*member, path, incremental, mode, &self.backup),
        }
    }

    /// Applies the member `entry_path` (an incremental file for `rel`, below `root`).
    pub fn apply(
        &self,
        root: &Path,
        rel: &Path,
        entry_path: &str,
        size: u64,
        mode: u32,
        body: &mut dyn Read,
    ) -> io::Result<u64> {
        if !self.incremental {
            return Err(invalid(format!(
                "basebackup/{}: member {entry_path:?} is an incremental file, but the backup is the chain's full backup: refused",
                self.backup
            )));
        }
        let what = format!("basebackup/{}: member {entry_path:?}", self.backup);
        let n = apply(root, rel, &what, size, mode, body)?;
        if let Some((_, plan)) = &self.delta {
            plan.applied(&root.join(rel), n);
        }
        self.applied.fetch_add(1, Ordering::Relaxed);
        self.block_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// `dir/INCREMENTAL.<name>` → `dir/<name>`; `None` for any other path.
pub fn incremental_target(rel: &Path) -> Option<PathBuf> {
    let name = rel.file_name()?.to_str()?;
    let bare = name.strip_prefix(INCREMENTAL_PREFIX)?;
    if bare.is_empty() {
        return None;
    }
    Some(rel.with_file_name(bare))
}

/// An incremental file's header (reconstruct.c `make_incremental_rfile`).
#[derive(Debug, PartialEq, Eq)]
struct Header {
    blocks: Vec<u32>,
    truncation: u32,
    /// Bytes before the first block: 12 + 4 per block, rounded up to BLCKSZ when there are
    /// blocks.
    len: u64,
}

impl Header {
    /// Blocks of the file this one reconstructs.
    fn block_length(&self) -> u64 {
        let highest = self.blocks.iter().map(|b| u64::from(*b) + 1).max();
        highest.unwrap_or(0).max(u64::from(self.truncation))
    }
}

fn read_u32s(body: &mut dyn Read, out: &mut [u32], what: &str) -> io::Result<()> {
    let mut buf = vec![0u8; out.len() * 4];
    let n = read_full(&mut &mut *body, &mut buf)?;
    if n != buf.len() {
        return Err(invalid(format!(
            "{what}: the incremental file's header is cut short ({n} of {} bytes)",
            buf.len()
        )));
    }
    for (o, c) in out.iter_mut().zip(buf.chunks_exact(4)) {
        *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(())
}

/// Reads and checks the header of an incremental file of `size` bytes, consuming its padding.
fn read_header(body: &mut dyn Read, size: u64, what: &str) -> io::Result<Header> {
    let mut fixed = [0u32; 3];
    read_u32s(body, &mut fixed, what)?;
    let [magic, count, truncation] = fixed;
    if magic != INCREMENTAL_MAGIC {
        return Err(invalid(format!(
            "{what}: bad incremental magic number 0x{magic:08x} (not 0x{INCREMENTAL_MAGIC:08x}): refused"
        )));
    }
    if count > RELSEG_SIZE {
        return Err(invalid(format!(
            "{what}: block count {count} exceeds the segment size {RELSEG_SIZE}: refused"
        )));
    }
    if truncation > RELSEG_SIZE {
        return Err(invalid(format!(
            "{what}: truncation block length {truncation} exceeds the segment size {RELSEG_SIZE}: refused"
        )));
    }
    let mut blocks = vec![0u32; count as usize];
    read_u32s(body, &mut blocks, what)?;
    if let Some(b) = blocks.iter().find(|b| **b >= RELSEG_SIZE) {
        return Err(invalid(format!(
            "{what}: block number {b} is beyond the segment size {RELSEG_SIZE}: refused"
        )));
    }
    let mut len = 12 + 4 * u64::from(count);
    if count > 0 && len % BLCKSZ != 0 {
        len += BLCKSZ - len % BLCKSZ;
    }
    let expected = len + u64::from(count) * BLCKSZ;
    if size != expected {
        return Err(invalid(format!(
            "{what}: {size} bytes, but its header ({count} blocks) makes {expected}: refused"
        )));
    }
    let pad = len - 12 - 4 * u64::from(count);
    let skipped = io::copy(&mut body.take(pad), &mut io::sink())?;
    if skipped != pad {
        return Err(invalid(format!("{what}: cut short in its header padding")));
    }
    Ok(Header {
        blocks,
        truncation,
        len,
    })
}

/// Applies the incremental file `body` (`size` bytes, named `what` in errors) to `rel` below
/// `root`, as the older backups of the chain left it. Returns the block bytes written.
pub fn apply(
    root: &Path,
    rel: &Path,
    what: &str,
    size: u64,
    mode: u32,
    body: &mut dyn Read,
) -> io::Result<u64> {
    let header = read_header(body, size, what)?;
    let dir = Beneath::open(root)?;
    if header.truncation > 0 && !dir.exists(rel)? {
        return Err(invalid(format!(
            "{what}: needs the first {} blocks of {} from the older backups of the chain, which do not have that file: refused",
            header.truncation,
            rel.display()
        )));
    }
    let f = dir.open_rw(rel, mode)?;
    let old_blocks = f.metadata()?.len() / BLCKSZ;
    // Blocks at or past the truncation length are not the older backups' to give.
    let kept = old_blocks.min(u64::from(header.truncation));
    if f.metadata()?.len() != kept * BLCKSZ {
        f.set_len(kept * BLCKSZ)?;
    }
    // Runs of consecutive block numbers are written together, up to RUN_BLOCKS at a time.
    let mut buf = vec![0u8; (BLCKSZ as usize) * RUN_BLOCKS.min(header.blocks.len().max(1))];
    let mut written = 0;
    let mut rest = &header.blocks[..];
    while let Some(&first) = rest.first() {
        let run = rest
            .iter()
            .enumerate()
            .take(RUN_BLOCKS)
            .take_while(|(i, b)| u64::from(**b) == u64::from(first) + *i as u64)
            .count();
        let bytes = &mut buf[..run * BLCKSZ as usize];
        let n = read_full(&mut &mut *body, bytes)?;
        if n != bytes.len() {
            return Err(invalid(format!(
                "{what}: cut short in block {} ({n} of {} bytes of blocks {first}..)",
                rest[n / BLCKSZ as usize],
                bytes.len()
            )));
        }
        f.write_all_at(bytes, u64::from(first) * BLCKSZ)?;
        written += n as u64;
        rest = &rest[run..];
    }
    // Zeros up to the truncation length where no backup had the blocks (reconstruct.c: blocks
    // the server extended the file with and never logged).
    f.set_len(header.block_length() * BLCKSZ)?;
    f.sync_all()?;
    Ok(written)
}

/// Makes the newest backup's `backup_label` and `backup_manifest` in `target` describe the
/// combined directory (see the module documentation). `tablespaces` maps an oid to where
/// that tablespace was restored, for the manifest's `pg_tblspc/<oid>/…` entries.
///
/// `known` gives the size and CRC-32C of a reconstructed file (absolute path) when they are
/// known without reading it ([`super::chain_delta::Plan::known_final`]).
pub fn finish(
    target: &Path,
    backup: &str,
    tablespaces: &BTreeMap<u32, PathBuf>,
    known: &dyn Fn(&Path) -> Option<(u64, String)>,
) -> Result<()> {
    let root = Beneath::open(target).with_context(|| format!("open {}", target.display()))?;
    let label = root
        .read(Path::new("backup_label"))?
        .with_context(|| format!("basebackup/{backup} holds no backup_label"))?;
    let label = strip_incremental_lines(&label)
        .with_context(|| format!("basebackup/{backup}: backup_label"))?;
    root.replace(Path::new("backup_label"), &label, 0o600)
        .with_context(|| format!("write {}", target.join("backup_label").display()))?;
    let manifest = root
        .read(Path::new("backup_manifest"))?
        .with_context(|| format!("basebackup/{backup} holds no backup_manifest"))?;
    let sums = reconstructed_sums(&manifest, target, tablespaces, known)
        .with_context(|| format!("basebackup/{backup}: backup_manifest"))?;
    let rewritten = rewrite_manifest(&manifest, |path| {
        if path == "backup_label" {
            let s = summary(&mut &label[..])?;
            return Ok(Edit::Replace("backup_label".to_string(), s));
        }
        if path == "tablespace_map" {
            // Restore removes it and links pg_tblspc/<oid> itself (get.rs).
            return Ok(Edit::Drop);
        }
        let Some(real) = incremental_target(Path::new(path)) else {
            return Ok(Edit::Keep);
        };
        let s = sums.get(path).cloned().ok_or_else(|| {
            invalid(format!(
                "no summary of the reconstructed {}",
                real.display()
            ))
        })?;
        Ok(Edit::Replace(real.to_string_lossy().into_owned(), s))
    })
    .with_context(|| format!("basebackup/{backup}: backup_manifest"))?;
    root.replace(Path::new("backup_manifest"), &rewritten, 0o600)
        .with_context(|| format!("write {}", target.join("backup_manifest").display()))?;
    Ok(())
}

/// Size and CRC-32C of each file the manifest's `INCREMENTAL.*` entries were reconstructed
/// into (keyed by the entry's path), read back on every core, unless `known` has them.
fn reconstructed_sums(
    manifest: &[u8],
    target: &Path,
    tablespaces: &BTreeMap<u32, PathBuf>,
    known: &dyn Fn(&Path) -> Option<(u64, String)>,
) -> Result<HashMap<String, (u64, String)>> {
    let v: serde_json::Value = serde_json::from_slice(manifest).context("not JSON")?;
    let mut sums = HashMap::new();
    let mut todo = Vec::new();
    for f in v
        .get("Files")
        .and_then(|f| f.as_array())
        .into_iter()
        .flatten()
    {
        let Some(path) = f.get("Path").and_then(|p| p.as_str()) else {
            continue;
        };
        let Some(real) = incremental_target(Path::new(path)) else {
            continue;
        };
        let (dir, rel) =
            restored_at(target, &real, tablespaces).with_context(|| format!("entry {path:?}"))?;
        match known(&dir.join(&rel)) {
            Some(s) => {
                sums.insert(path.to_string(), s);
            }
            None => todo.push((path.to_string(), dir, rel)),
        }
    }
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::with_capacity(todo.len()));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((path, dir, rel)) = todo.get(i) else {
                    break;
                };
                let r = Beneath::open(dir)
                    .and_then(|b| b.open_read(rel))
                    .and_then(|mut f| summary(&mut f))
                    .map_err(|e| anyhow::Error::from(e).context(format!("entry {path:?}")));
                let failed = r.is_err();
                done.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((path.clone(), r));
                if failed {
                    next.store(usize::MAX / 2, Ordering::Relaxed);
                }
            });
        }
    });
    for (path, r) in done.into_inner().unwrap_or_else(|p| p.into_inner()) {
        sums.insert(path, r?);
    }
    Ok(sums)
}

/// `backup_label` without the `INCREMENTAL FROM LSN/TLI` lines; an error when it has none
/// (the newest backup of a chain is an incremental one).
fn strip_incremental_lines(label: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(label.len());
    let mut found = false;
    for line in label.split_inclusive(|b| *b == b'\n') {
        if line.starts_with(b"INCREMENTAL FROM ") {
            found = true;
        } else {
            out.extend_from_slice(line);
        }
    }
    if !found {
        bail!("no INCREMENTAL FROM line: not the label of an incremental backup");
    }
    Ok(out)
}

/// Where the manifest path `rel` (of the data directory) was restored: the target, or for
/// `pg_tblspc/<oid>/…` the tablespace's directory, so that nothing is read through a link.
pub(super) fn restored_at(
    target: &Path,
    rel: &Path,
    tablespaces: &BTreeMap<u32, PathBuf>,
) -> io::Result<(PathBuf, PathBuf)> {
    let mut c = rel.components();
    if c.next().map(|c| c.as_os_str()) == Some(OsStr::new("pg_tblspc")) {
        let oid = c
            .next()
            .and_then(|o| o.as_os_str().to_str()?.parse::<u32>().ok());
        let dir = oid.and_then(|o| tablespaces.get(&o)).ok_or_else(|| {
            invalid(format!(
                "manifest entry {}: not a restored tablespace",
                rel.display()
            ))
        })?;
        return Ok((dir.clone(), c.as_path().to_path_buf()));
    }
    Ok((target.to_path_buf(), rel.to_path_buf()))
}

/// Size and CRC-32C of what `r` holds, the checksum hex as PostgreSQL writes it in a
/// manifest (`pg_checksum_final`: the final value's bytes in memory order, little-endian).
pub(super) fn summary(r: &mut dyn Read) -> io::Result<(u64, String)> {
    let d = super::chain_delta::digests(r, false)?;
    Ok((d.size, d.crc32c))
}

/// What becomes of a manifest entry.
enum Edit {
    Keep,
    /// The file is not in the result.
    Drop,
    /// Another path, size and CRC-32C (hex).
    Replace(String, (u64, String)),
}

/// Keys of a manifest file entry in the order PostgreSQL writes them.
const FILE_KEYS: &[&str] = &[
    "Path",
    "Encoded-Path",
    "Size",
    "Last-Modified",
    "Checksum-Algorithm",
    "Checksum",
];

/// The manifest with its entries changed as `change` says (given the entry's path), in
/// PostgreSQL's layout (one entry per line), its
/// `Manifest-Checksum` recomputed (the SHA-256 of everything before that line).
fn rewrite_manifest(
    manifest: &[u8],
    mut change: impl FnMut(&str) -> io::Result<Edit>,
) -> Result<Vec<u8>> {
    use serde_json::Value;
    let v: Value = serde_json::from_slice(manifest).context("not JSON")?;
    let top = v.as_object().context("not a JSON object")?;
    let version = top
        .get("PostgreSQL-Backup-Manifest-Version")
        .context("no PostgreSQL-Backup-Manifest-Version")?;
    let files = top
        .get("Files")
        .and_then(Value::as_array)
        .context("no Files array")?;
    let json = |v: &Value| serde_json::to_string(v).expect("a JSON value serializes");
    let mut out = format!(
        "{{ \"PostgreSQL-Backup-Manifest-Version\": {},\n",
        json(version)
    );
    if let Some(id) = top.get("System-Identifier") {
        writeln!(out, "\"System-Identifier\": {},", json(id))?;
    }
    out.push_str("\"Files\": [");
    let mut first = true;
    for f in files {
        let mut f = f
            .as_object()
            .context("a Files entry is not an object")?
            .clone();
        if let Some(path) = f.get("Path").and_then(Value::as_str).map(str::to_string) {
            match change(&path).with_context(|| format!("entry {path:?}"))? {
                Edit::Keep => {}
                Edit::Drop => continue,
                Edit::Replace(new_path, (size, sha)) => {
                    f.insert("Path".into(), Value::from(new_path));
                    f.insert("Size".into(), Value::from(size));
                    f.insert("Checksum-Algorithm".into(), Value::from("CRC32C"));
                    f.insert("Checksum".into(), Value::from(sha));
                }
            }
        }
        let mut fields: Vec<String> = Vec::new();
        for k in FILE_KEYS {
            if let Some(v) = f.remove(*k) {
                fields.push(format!("{}: {}", json(&Value::from(*k)), json(&v)));
            }
        }
        for (k, v) in &f {
            fields.push(format!("{}: {}", json(&Value::from(k.as_str())), json(v)));
        }
        let sep = if first { "" } else { "," };
        first = false;
        write!(out, "{sep}\n{{ {} }}", fields.join(", "))?;
    }
    out.push_str(" ],\n");
    if let Some(ranges) = top.get("WAL-Ranges").and_then(Value::as_array) {
        out.push_str("\"WAL-Ranges\": [");
        for (i, r) in ranges.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(out, "{sep}\n{}", json(r))?;
        }
        out.push_str("\n],\n");
    }
    let sum = hex::encode(digest::digest(&digest::SHA256, out.as_bytes()));
    writeln!(out, "\"Manifest-Checksum\": \"{sum}\"}}")?;
    Ok(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An incremental file in PostgreSQL's format: `blocks` (number, fill byte).
    fn incremental(blocks: &[(u32, u8)], truncation: u32) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [INCREMENTAL_MAGIC, blocks.len() as u32, truncation] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        for (b, _) in blocks {
            v.extend_from_slice(&b.to_le_bytes());
        }
        if !blocks.is_empty() {
            v.resize(v.len().next_multiple_of(BLCKSZ as usize), 0);
        }
        for (_, fill) in blocks {
            v.extend(std::iter::repeat_n(*fill, BLCKSZ as usize));
        }
        v
    }

    fn blocks_of(path: &Path) -> Vec<u8> {
        std::fs::read(path)
            .unwrap()
            .chunks(BLCKSZ as usize)
            .map(|b| {
                assert!(b.iter().all(|x| *x == b[0]));
                b[0]
            })
            .collect()
    }

    fn run(root: &Path, inc: &[u8]) -> io::Result<u64> {
        apply(
            root,
            Path::new("base/5/16384"),
            "test",
            inc.len() as u64,
            0o600,
            &mut &inc[..],
        )
    }

    #[test]
    fn blocks_are_written_and_the_file_cut_and_extended() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("base/5")).unwrap();
        let file = dir.path().join("base/5/16384");
        let full: Vec<u8> = (1..=6u8)
            .flat_map(|b| std::iter::repeat_n(b, BLCKSZ as usize))
            .collect();
        std::fs::write(&file, &full).unwrap();
        // Block 1 changed, truncated to 4 blocks: blocks 4 and 5 go.
        run(dir.path(), &incremental(&[(1, 9)], 4)).unwrap();
        assert_eq!(blocks_of(&file), [1, 9, 3, 4]);
        // Extended: block 6 new, blocks 4 and 5 (never logged) zero.
        run(dir.path(), &incremental(&[(6, 7), (0, 8)], 4)).unwrap();
        assert_eq!(blocks_of(&file), [8, 9, 3, 4, 0, 0, 7]);
        // A run of consecutive blocks longer than one write, and one more after a gap.
        let long: Vec<(u32, u8)> = (0..300u32)
            .map(|b| (b, (b % 200) as u8 + 1))
            .chain([(302, 9)])
            .collect();
        run(dir.path(), &incremental(&long, 0)).unwrap();
        let want: Vec<u8> = (0..300u32)
            .map(|b| (b % 200) as u8 + 1)
            .chain([0, 0, 9])
            .collect();
        assert_eq!(blocks_of(&file), want);
        // Back to the earlier contents, so that the steps below read as before.
        let earlier = [(0, 8), (1, 9), (2, 3), (3, 4), (4, 0), (5, 0), (6, 7)];
        run(dir.path(), &incremental(&earlier, 7)).unwrap();
        // Nothing changed, nothing cut: the same file.
        run(dir.path(), &incremental(&[], 7)).unwrap();
        assert_eq!(blocks_of(&file), [8, 9, 3, 4, 0, 0, 7]);
        // Truncation length beyond the file: zeros.
        run(dir.path(), &incremental(&[], 9)).unwrap();
        assert_eq!(blocks_of(&file), [8, 9, 3, 4, 0, 0, 7, 0, 0]);
        // Truncated to nothing.
        run(dir.path(), &incremental(&[], 0)).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 0);
    }

    #[test]
    fn a_new_file_needs_no_older_blocks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("base/5")).unwrap();
        run(dir.path(), &incremental(&[(1, 3)], 0)).unwrap();
        assert_eq!(blocks_of(&dir.path().join("base/5/16384")), [0, 3]);
        // One that needs older blocks the chain does not have is refused.
        let err = apply(
            dir.path(),
            Path::new("base/5/16999"),
            "basebackup/x: member \"base/5/INCREMENTAL.16999\"",
            incremental(&[], 2).len() as u64,
            0o600,
            &mut &incremental(&[], 2)[..],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("INCREMENTAL.16999") && err.to_string().contains("2 blocks"),
            "{err}"
        );
    }

    #[test]
    fn malformed_incremental_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("base/5")).unwrap();
        let good = incremental(&[(1, 3)], 2);
        let mut bad_magic = good.clone();
        bad_magic[0] ^= 1;
        let mut big_block = good.clone();
        big_block[12..16].copy_from_slice(&RELSEG_SIZE.to_le_bytes());
        let mut big_count = good.clone();
        big_count[4..8].copy_from_slice(&(RELSEG_SIZE + 1).to_le_bytes());
        for (bytes, what) in [
            (&bad_magic[..], "magic"),
            (&big_block[..], "beyond the segment size"),
            (&big_count[..], "block count"),
            (&good[..good.len() - 1], "bytes, but its header"),
            (&good[..10], "cut short"),
        ] {
            let err = run(dir.path(), bytes).unwrap_err();
            assert!(err.to_string().contains(what), "{what}: {err}");
            assert!(!dir.path().join("base/5/16384").exists(), "{what}");
        }
    }

    #[test]
    fn incremental_names() {
        assert_eq!(
            incremental_target(Path::new("base/5/INCREMENTAL.16384.1")),
            Some(PathBuf::from("base/5/16384.1"))
        );
        assert_eq!(incremental_target(Path::new("base/5/16384")), None);
        assert_eq!(incremental_target(Path::new("base/5/INCREMENTAL.")), None);
    }

    /// CRC-32C in PostgreSQL's manifest spelling (a PostgreSQL 17 manifest's PG_VERSION).
    #[test]
    fn summaries_are_postgresqls_crc32c() {
        assert_eq!(summary(&mut &b"17\n"[..]).unwrap(), (3, "64440205".into()));
        assert_eq!(summary(&mut &b""[..]).unwrap(), (0, "00000000".into()));
    }

    #[test]
    fn the_label_loses_its_incremental_lines() {
        let label = b"START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\nINCREMENTAL FROM LSN: 0/2000028\nINCREMENTAL FROM TLI: 1\nSTART TIMELINE: 1\n";
        assert_eq!(
            strip_incremental_lines(label).unwrap(),
            b"START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\nSTART TIMELINE: 1\n"
        );
        assert!(strip_incremental_lines(b"START TIMELINE: 1\n").is_err());
    }

    #[test]
    fn the_manifest_is_rewritten_with_a_valid_checksum() {
        let m = br#"{ "PostgreSQL-Backup-Manifest-Version": 2,
"System-Identifier": 7440000000000000001,
"Files": [
{ "Path": "backup_label", "Size": 10, "Last-Modified": "2026-01-01 00:00:00 GMT", "Checksum-Algorithm": "CRC32C", "Checksum": "00000000" },
{ "Path": "base/5/INCREMENTAL.16384", "Size": 12, "Last-Modified": "2026-01-01 00:00:00 GMT", "Checksum-Algorithm": "CRC32C", "Checksum": "11111111" },
{ "Path": "PG_VERSION", "Size": 3, "Last-Modified": "2026-01-01 00:00:00 GMT", "Checksum-Algorithm": "CRC32C", "Checksum": "22222222" }
],
"WAL-Ranges": [
{ "Timeline": 1, "Start-LSN": "0/4000028", "End-LSN": "0/4000120" }
],
"Manifest-Checksum": "ignored"}
"#;
        let out = rewrite_manifest(m, |p| {
            Ok(match p {
                "base/5/INCREMENTAL.16384" => {
                    Edit::Replace("base/5/16384".into(), (8192, "ab".into()))
                }
                "backup_label" => Edit::Drop,
                _ => Edit::Keep,
            })
        })
        .unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"System-Identifier\": 7440000000000000001,\n"), "{text}");
        assert!(text.contains(r#"{ "Path": "base/5/16384", "Size": 8192, "Last-Modified": "2026-01-01 00:00:00 GMT", "Checksum-Algorithm": "CRC32C", "Checksum": "ab" }"#), "{text}");
        assert!(text.contains(r#""Checksum": "22222222" }"#), "{text}");
        // pg_verifybackup's rule: SHA-256 of everything up to the next-to-last newline.
        let body_end = text[..text.len() - 1].rfind('\n').unwrap() + 1;
        let sum = hex::encode(digest::digest(&digest::SHA256, &out[..body_end]));
        assert!(text[body_end..].starts_with("\"Manifest-Checksum\": \""));
        assert!(text.ends_with(&format!("\"{sum}\"}}\n")), "{text}");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["Files"].as_array().unwrap().len(), 2);
        assert!(
            text.contains("\"Files\": [\n{ \"Path\": \"base/5/16384\""),
            "{text}"
        );
        assert_eq!(v["WAL-Ranges"][0]["Timeline"], 1);
    }
}
