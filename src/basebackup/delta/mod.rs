//! `delta` mode (pghoard's `basebackup_mode: delta`, format `pghoard-delta-v2`): a
//! non-exclusive backup over SQL like local-tar ([`super::local_tar::begin`]), the data
//! directory walked with the same exclusion rules, and every file stored where pghoard 2.7.0
//! stores it (docs/formats.md, "Delta backups"):
//! - files of at most 150 bytes embedded in the manifest;
//! - files smaller than `basebackup_delta_mode_min_delta_file_size` tarred into bundle
//!   chunks of about `basebackup_delta_mode_chunk_size`,
//!   `basebackup_delta_chunk/<name>/<name>.<n>.pghoard` (members relative to the data
//!   directory, `format: pghoard-bb-v2`);
//! - larger files as `basebackup_delta/<blake2s>` objects shared by every backup of the site
//!   ([`objects`]): an object already stored, by walhoard or by pghoard, is referenced;
//! - the control object `basebackup/<name>`: local-tar's metadata member with pghoard's
//!   `manifest` ([`manifest`]) and `pgdata/global/pg_control`, `pgdata/backup_label`.
//!
//! Every object carries the `walhoard-writer` mark; delta objects carry no backup name (they
//! belong to every backup that references them; retention deletes one only when no kept
//! backup does, `crate::daemon::delta_retention`). Before the control object is written,
//! every referenced object is looked up once more, so a backup is never listed with an object
//! another process deleted meanwhile. User tablespaces are refused: pghoard's delta layout
//! has no place for them (pghoard 2.7.0 itself fails on one).

pub mod manifest;
pub mod objects;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::task::JoinSet;
use walhoard_basebackup::control::{BackupMetadata, ChunkMeta, FORMAT_LOCAL_TAR};
use walhoard_basebackup::tar::MemberKind;
use walhoard_basebackup::walk::Entry;

use super::local_tar::{self, chunk_file, data_chunk, write_chunk};
use super::{now_rfc3339, BackupContext, Progress};
use crate::restore::pghoard_delta::CHUNK_PREFIX;
use manifest::{BackupManifest, Placement, SnapshotFile};
use objects::{hash_file, store_object, Stored, FORMAT_DELTA_V2};

/// A file of the data directory: its path below it, and the walked entry (member path made
/// relative, as pghoard's bundle chunks have it).
struct File {
    rel: String,
    entry: Entry,
}

impl File {
    fn size(&self) -> u64 {
        self.entry.size()
    }
    fn mtime(&self) -> u64 {
        self.entry.member.mtime
    }
}

/// The walked entries, sorted by where they go; `dirs` every directory, relative.
#[derive(Default)]
struct Plan {
    embedded: Vec<File>,
    bundled: Vec<File>,
    objects: Vec<File>,
    dirs: Vec<String>,
}

fn relative(member_path: &str) -> Option<String> {
    if member_path == "pgdata" {
        return Some(".".into());
    }
    member_path.strip_prefix("pgdata/").map(str::to_string)
}

fn plan(entries: Vec<Entry>, min_delta_file_size: u64) -> Result<Plan> {
    let mut p = Plan::default();
    for mut entry in entries {
        let rel = relative(&entry.member.path).with_context(|| {
            format!(
                "{}: outside the data directory; delta backups hold no tablespaces",
                entry.local.display()
            )
        })?;
        match entry.member.kind {
            MemberKind::Dir => p.dirs.push(rel),
            MemberKind::File { size } => {
                entry.member.path = rel.clone();
                let f = File { rel, entry };
                match Placement::of(size, min_delta_file_size) {
                    Placement::Embedded => p.embedded.push(f),
                    Placement::Bundled => p.bundled.push(f),
                    Placement::Object => p.objects.push(f),
                }
            }
            // A symbolic link in the data directory (pg_wal elsewhere is walked as a
            // directory): the manifest cannot say it; a bundle's tar can.
            MemberKind::Symlink { .. } => {
                entry.member.path = rel.clone();
                p.bundled.push(File { rel, entry });
            }
        }
    }
    Ok(p)
}

/// Groups files into bundles of at most `chunk_size` bytes (one bigger file alone), in
/// order, as pghoard's `_split_files_for_upload` does.
fn bundles(files: Vec<File>, chunk_size: u64) -> Vec<Vec<File>> {
    let mut out = Vec::new();
    let mut current: Vec<File> = Vec::new();
    let mut size = 0;
    for f in files {
        if !current.is_empty() && size + f.size() > chunk_size {
            out.push(std::mem::take(&mut current));
            size = 0;
        }
        size += f.size();
        current.push(f);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn parallel(ctx: &BackupContext) -> usize {
    ctx.site_config
        .basebackup_threads
        .min(ctx.site_config.basebackup_chunks_in_progress)
        .max(1) as usize
}

/// Stores the bundles (numbered from `first`), up to [`parallel`] at once.
async fn upload_bundles(
    ctx: &BackupContext,
    groups: Vec<Vec<File>>,
    first: usize,
    read: &Arc<AtomicU64>,
) -> Result<Vec<ChunkMeta>> {
    let mut tasks: JoinSet<Result<(usize, ChunkMeta)>> = JoinSet::new();
    let mut out: Vec<Option<ChunkMeta>> = vec![None; groups.len()];
    let mut pending = groups.into_iter().enumerate();
    loop {
        while tasks.len() < parallel(ctx) {
            let Some((i, files)) = pending.next() else {
                break;
            };
            let c = ctx.clone();
            let r = read.clone();
            tasks.spawn(async move {
                let names = files.iter().map(|f| f.rel.clone()).collect();
                let entries: Vec<Entry> = files.into_iter().map(|f| f.entry).collect();
                let (rel, up) = c
                    .upload_chunk_under(
                        CHUNK_PREFIX,
                        &chunk_file(&c.name, first + i),
                        FORMAT_LOCAL_TAR,
                        move |w| write_chunk(&entries, w, &r),
                    )
                    .await?;
                Ok((i, data_chunk(rel, up, names)))
            });
        }
        match tasks.join_next().await {
            None => break,
            Some(r) => {
                let (i, meta) = r.context("bundle upload task")??;
                tracing::info!(site = %ctx.site, "stored bundle {} ({} bytes plain, {} stored)", meta.chunk_filename, meta.input_size, meta.result_size);
                out[i] = Some(meta);
            }
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// What storing the large files gave: manifest entries, files to bundle after all, bytes
/// stored now and referenced digests.
#[derive(Default)]
struct ObjectsDone {
    files: Vec<SnapshotFile>,
    changed: Vec<File>,
    uploaded: (usize, u64),
    reused: BTreeMap<String, u64>,
}

/// Hashes every large file, then makes sure each distinct digest's object is stored.
async fn store_objects(
    ctx: &BackupContext,
    files: Vec<File>,
    read: &Arc<AtomicU64>,
    progress: &mut Progress,
) -> Result<ObjectsDone> {
    // Largest first, as pghoard does: the long uploads start early.
    let mut files = files;
    files.sort_by_key(|f| std::cmp::Reverse(f.size()));
    // Hashed `parallel` files at a time; digests in the files' order.
    let mut digests: Vec<Option<String>> = vec![None; files.len()];
    let mut hashing: JoinSet<std::io::Result<(usize, Option<String>)>> = JoinSet::new();
    let mut next = files.iter().enumerate();
    loop {
        while hashing.len() < parallel(ctx) {
            let Some((i, f)) = next.next() else {
                break;
            };
            let (p, size, r) = (f.entry.local.clone(), f.size(), read.clone());
            hashing.spawn_blocking(move || {
                let digest = hash_file(&p, size)?;
                r.fetch_add(size, Ordering::Relaxed);
                Ok((i, digest))
            });
        }
        let Some(joined) = hashing.join_next().await else {
            break;
        };
        let (i, digest) = joined.context("hash thread")??;
        digests[i] = digest;
        progress.update(read.load(Ordering::Relaxed));
    }
    // digest -> the files with those bytes.
    let mut by_digest: BTreeMap<String, Vec<File>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for (f, digest) in files.into_iter().zip(digests) {
        let Some(digest) = digest else {
            tracing::debug!("{} vanished during the backup", f.entry.local.display());
            continue;
        };
        let slot = by_digest.entry(digest.clone()).or_default();
        if slot.is_empty() {
            order.push(digest);
        }
        slot.push(f);
    }
    let mut done = ObjectsDone::default();
    let mut tasks: JoinSet<Result<(String, Stored)>> = JoinSet::new();
    let mut pending = order.into_iter();
    loop {
        while tasks.len() < parallel(ctx) {
            let Some(digest) = pending.next() else {
                break;
            };
            let f = &by_digest[&digest][0];
            let (c, p, size) = (ctx.clone(), f.entry.local.clone(), f.size());
            tasks.spawn(async move {
                let s = store_object(&c, p, size, &digest).await?;
                Ok((digest, s))
            });
        }
        let Some(r) = tasks.join_next().await else {
            break;
        };
        let (digest, stored) = r.context("delta object task")??;
        let files = by_digest.remove(&digest).unwrap_or_default();
        let stored_size = match stored {
            Stored::Changed => {
                tracing::info!(site = %ctx.site, "{} changed while being stored: bundled instead", files[0].rel);
                done.changed.extend(files);
                continue;
            }
            Stored::Reused(n) => {
                done.reused.insert(digest.clone(), n);
                n
            }
            Stored::Uploaded(n) => {
                done.uploaded.0 += 1;
                done.uploaded.1 += n;
                n
            }
        };
        for f in files {
            done.files.push(SnapshotFile::object(
                &f.rel,
                f.size(),
                f.mtime(),
                &digest,
                stored_size,
            ));
        }
    }
    Ok(done)
}

/// Embedded files' manifest entries, read now (a vanished one is left out).
fn read_embedded(files: &[File]) -> Result<Vec<SnapshotFile>> {
    let mut out = Vec::new();
    for f in files {
        // At most the walked size (a file that grew since is cut, as elsewhere).
        let read = std::fs::File::open(&f.entry.local).and_then(|file| {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(file, f.size()), &mut bytes)?;
            Ok(bytes)
        });
        match read {
            Ok(bytes) => out.push(SnapshotFile::embedded(&f.rel, &bytes, f.mtime())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("read {}: {e}", f.entry.local.display()),
        }
    }
    Ok(out)
}

/// The WAL entries of a standalone backup as bundle files (`pg_wal/<segment>`).
fn wal_files(wal: &[Entry]) -> Vec<File> {
    wal.iter()
        .filter_map(|e| {
            let rel = relative(&e.member.path)?;
            let mut entry = e.clone();
            entry.member.path = rel.clone();
            Some(File { rel, entry })
        })
        .collect()
}

/// Checks that the objects of `digests`, referenced by this backup, are still stored: one
/// another process deleted meanwhile fails the backup rather than list one that cannot be
/// restored.
async fn still_there(ctx: &BackupContext, digests: impl Iterator<Item = &String>) -> Result<()> {
    for digest in digests {
        let key = objects::object_key(digest);
        if ctx.store.stat(&key).await?.is_none() {
            bail!("{key} was deleted while this backup referenced it; take the backup again");
        }
    }
    Ok(())
}

pub async fn run(ctx: &BackupContext) -> Result<BackupMetadata> {
    let settings = (
        ctx.site_config.basebackup_delta_mode_min_delta_file_size,
        ctx.site_config.basebackup_delta_mode_chunk_size,
    );
    let mut s = local_tar::begin(ctx, "delta").await?;
    if !s.tablespaces.is_empty() {
        bail!(
            "backup_sites.{}.basebackup_mode delta: the cluster has user tablespaces ({}), which \
             pghoard's delta layout cannot hold; use local-tar",
            ctx.site,
            s.tablespaces
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let started = now_rfc3339();
    let (entries, vanished) = s.walk().await?;
    let total: u64 = entries.iter().map(Entry::size).sum();
    let plan = plan(entries, settings.0)?;
    tracing::info!(
        site = %ctx.site,
        "{:.1} MiB: {} files embedded, {} bundled, {} large ({} vanished while walking)",
        total as f64 / 1048576.0,
        plan.embedded.len(),
        plan.bundled.len(),
        plan.objects.len(),
        vanished
    );
    let read = Arc::new(AtomicU64::new(0));
    let mut progress = Progress::new(ctx, Some(total));
    let mut files = read_embedded(&plan.embedded)?;
    let embedded_size: u64 = files.iter().map(|f| f.file_size).sum();
    let objects = store_objects(ctx, plan.objects, &read, &mut progress).await?;
    tracing::info!(
        site = %ctx.site,
        "delta objects: {} stored ({} bytes), {} referenced, {} changed while read (bundled)",
        objects.uploaded.0,
        objects.uploaded.1,
        objects.reused.len(),
        objects.changed.len()
    );
    let objects_stored: u64 = objects.files.iter().map(|f| f.stored_file_size).sum();
    files.extend(objects.files);
    let mut to_bundle = plan.bundled;
    to_bundle.extend(objects.changed);
    to_bundle.sort_by(|a, b| a.rel.cmp(&b.rel));
    for f in &to_bundle {
        if matches!(f.entry.member.kind, MemberKind::File { .. }) {
            files.push(SnapshotFile::bundled(&f.rel, f.size(), f.mtime()));
        }
    }
    let groups = bundles(to_bundle, settings.1);
    let mut chunks = upload_bundles(ctx, groups, 1, &read).await?;
    progress.update(read.load(Ordering::Relaxed));

    let ended = s.end(ctx).await?;
    if let Some(wal) = &ended.wal {
        // standalone_hot_backup: the backup's WAL, one more bundle.
        let n = chunks.len() + 1;
        chunks.extend(upload_bundles(ctx, vec![wal_files(wal)], n, &read).await?);
    }
    still_there(ctx, objects.reused.keys()).await?;
    let chunks_plain: u64 = chunks.iter().map(|c| c.input_size).sum();
    let chunks_stored: u64 = chunks.iter().map(|c| c.result_size).sum();
    let manifest = BackupManifest::new(
        (started, now_rfc3339()),
        files,
        plan.dirs,
        chunks_stored + objects_stored + embedded_size,
    );
    let mut meta = local_tar::session_metadata(ctx, &s, &ended, FORMAT_DELTA_V2, chunks);
    s.conn.close().await.ok();
    // The bundles' plain bytes include the tar headers and the WAL, the manifest's do not.
    meta.total_size_plain = manifest.total_size().max(chunks_plain);
    meta.total_size_enc = chunks_stored + objects_stored;
    let manifest = serde_json::to_value(&manifest).context("delta manifest")?;
    ctx.upload_control_with(&meta, Some(manifest), local_tar::control_members(ended))
        .await?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use walhoard_basebackup::tar::Member;

    fn file(path: &str, size: u64) -> Entry {
        Entry {
            member: Member {
                path: path.into(),
                kind: MemberKind::File { size },
                mode: 0o600,
                mtime: 1,
            },
            local: PathBuf::from("/x").join(path),
        }
    }

    #[test]
    fn files_are_placed_by_size_and_bundled_in_order() {
        let dir = Entry {
            member: Member {
                path: "pgdata/base".into(),
                kind: MemberKind::Dir,
                mode: 0o700,
                mtime: 1,
            },
            local: "/x/base".into(),
        };
        let p = plan(
            vec![
                dir,
                file("pgdata/PG_VERSION", 3),
                file("pgdata/base/1", 8192),
                file("pgdata/base/2", 8192),
                file("pgdata/base/3", 100_000),
            ],
            65536,
        )
        .unwrap();
        assert_eq!(p.dirs, ["base"]);
        assert_eq!(p.embedded.len(), 1);
        assert_eq!(p.objects[0].rel, "base/3");
        assert_eq!(p.bundled[0].entry.member.path, "base/1");
        let b = bundles(p.bundled, 10000);
        assert_eq!(b.len(), 2);
        assert!(plan(vec![file("tablespaces/t/PG_15/1/2", 1)], 1).is_err());
    }
}
