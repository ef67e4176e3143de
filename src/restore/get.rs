//! `walhoard restore get-basebackup`: a stored basebackup into a data directory, ready to start.
//!
//! The control object is read first (the description: chunks, tablespaces, format). Then the
//! chunks are fetched in parallel (`restore_process_count`), each decrypted, decompressed,
//! hashed and extracted as its bytes arrive, with no copy on disk; each chunk's size and SHA-1
//! must equal the control object's. Tablespaces go to their original directories or where
//! `--tablespace-dir` says, linked from `pg_tblspc/<oid>`; `--overwrite` empties only
//! directories named on the command line, never one the backup's metadata names. Once all of
//! that succeeded, the backup's own signal files and recovery settings are replaced by the
//! restore's, and the files that make the directory a data directory (`PG_VERSION`,
//! `global/pg_control`) are renamed into place last. Every file walhoard writes there itself
//! is opened without following symlinks (`beneath`). On any failure everything written is
//! removed again.

use std::collections::BTreeMap;
use std::io::{self, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use walhoard_basebackup::control::{
    BackupMetadata, BackupType, ChunkKind, FORMAT_LOCAL_TAR, FORMAT_STREAM, METADATA_MEMBER,
};
use walhoard_basebackup::untar::{Entry, TarReader};

use super::beneath::Beneath;
use super::chain::{self, Member};
use super::chain_delta;
use super::chunks::{chunk_key, fetch_all, spawn_progress, Job, LocalTarRoutes, Route};
use super::combine::{self, Combine};
use super::delta::{self, Seen, SyncQueue};
pub use super::dest::Existing;
use super::dest::{backup_named_dir, check_disjoint, Dest, NamedBy};
use super::extract::{sync_dirs, Extractor, HELD_BACK_SUFFIX};
use super::pghoard::{self, FORMAT_PGHOARD_BASIC};
use super::pghoard_delta::{self, FORMAT_PGHOARD_DELTA};
use super::recovery::{self, RecoverySettings};
use super::{candidates, choose, RestoreSite, Target};
use crate::basebackup::inventory::{self, Writer};
use crate::pipeline::transfer::download_with;

/// What to restore and how.
#[derive(Debug, Clone)]
pub struct GetOptions {
    pub target_dir: PathBuf,
    /// A backup name, or "latest"/None.
    pub basebackup: Option<String>,
    pub target: Target,
    pub action: Option<String>,
    pub restore_to_primary: bool,
    pub primary_conninfo: Option<String>,
    /// A non-empty target: refused, emptied (`--overwrite`) or restored into (`--delta`).
    pub existing: Existing,
    /// `--tablespace-dir NAME=DIR`: key = tablespace name or oid.
    pub tablespace_dirs: Vec<(String, PathBuf)>,
    /// The restore_command written; default: this executable, daemonless.
    pub restore_command: Option<String>,
    /// `--preserve-until`: keep the chosen backup past retention (pghoard's request).
    pub preserve: Option<crate::preservation::RestorePreservation>,
}

/// What was restored.
#[derive(Debug, Clone)]
pub struct Restored {
    pub name: String,
    pub metadata: BackupMetadata,
    /// Tablespace oid → directory.
    pub tablespaces: BTreeMap<u32, PathBuf>,
}

/// [`read_control`], refusing a format walhoard cannot restore.
pub(crate) async fn read_known_control(
    site: &RestoreSite,
    name: &str,
) -> Result<(BackupMetadata, Vec<(Entry, Vec<u8>)>, bool)> {
    let (meta, extra, pghoard_written) = read_control(site, name).await?;
    if meta.format != FORMAT_STREAM
        && !local_tar_layout(&meta.format)
        && meta.format != FORMAT_PGHOARD_BASIC
    {
        bail!("basebackup/{name}: unknown format {:?}", meta.format);
    }
    Ok((meta, extra, pghoard_written))
}

/// The control object: the metadata and (local-tar) the extra members. pghoard's backups are
/// described from its own layouts ([`super::pghoard`]); its formats walhoard cannot restore
/// are refused by name.
async fn read_control(
    site: &RestoreSite,
    name: &str,
) -> Result<(BackupMetadata, Vec<(Entry, Vec<u8>)>, bool)> {
    let key = format!("basebackup/{name}");
    let (object_meta, size) = site
        .store
        .object_meta_and_size(&key)
        .await
        .with_context(|| format!("metadata of control object {key}"))?;
    let (_, writer) = inventory::classify(name, &Ok(object_meta.clone()));
    let pghoard = writer == Writer::Pghoard;
    if pghoard {
        pghoard::check_supported(&key, &object_meta)?;
        if object_meta.format.is_none() {
            // basic/pipe: the object is the backup's one tar.
            let size = match size {
                Some(s) => s,
                None => {
                    site.store
                        .stat(&key)
                        .await
                        .with_context(|| format!("stat {key}"))?
                        .with_context(|| format!("{key} disappeared"))?
                        .size
                }
            };
            return Ok((
                pghoard::basic_metadata(name, &object_meta, size)?,
                Vec::new(),
                true,
            ));
        }
    }
    let (_, members) = download_with(&site.store, &key, &site.keys, |_, r| {
        // A few kB in practice; bounded so that a corrupt object cannot exhaust memory.
        let mut limited = r.take(64 * 1024 * 1024);
        let mut tar = TarReader::new(&mut limited);
        let mut out = Vec::new();
        while let Some(e) = tar.next_entry()? {
            let mut data = Vec::new();
            tar.body().read_to_end(&mut data)?;
            out.push((e, data));
        }
        Ok(out)
    })
    .await
    .with_context(|| format!("read control object {key}"))?;
    let mut meta = None;
    let mut extra = Vec::new();
    let delta = pghoard_delta::is_delta(object_meta.format.as_deref());
    for (e, data) in members {
        if e.path == METADATA_MEMBER {
            meta = Some(if delta && pghoard {
                let files = pghoard_delta::delta_files(&key, &data)?;
                let m = pghoard_delta::delta_metadata(&key, &data, &object_meta, &files)?;
                // restore_into reads the delta files from it again.
                extra.push((e, data));
                m
            } else if delta {
                // walhoard's delta backup: its own metadata, pghoard's manifest beside it.
                pghoard_delta::delta_files(&key, &data)?;
                let mut m = serde_json::from_slice::<BackupMetadata>(&data)
                    .with_context(|| format!("{key}: {METADATA_MEMBER}"))?;
                m.format = pghoard_delta::FORMAT_PGHOARD_DELTA.into();
                extra.push((e, data));
                m
            } else if pghoard {
                pghoard::bb_v2_metadata(&key, &data, &object_meta)?
            } else {
                serde_json::from_slice::<BackupMetadata>(&data)
                    .with_context(|| format!("{key}: {METADATA_MEMBER}"))?
            });
        } else {
            extra.push((e, data));
        }
    }
    let meta = meta.with_context(|| format!("{key} holds no {METADATA_MEMBER}"))?;
    Ok((meta, extra, pghoard))
}

/// Restores a basebackup of `site` as `opts` say.
pub async fn get_basebackup(site: &RestoreSite, opts: &GetOptions) -> Result<Restored> {
    // The site's own backups and those of its `moved_from` sites, as pghoard lists them.
    let list = site.list_all().await?;
    let named = opts.basebackup.as_deref().filter(|n| *n != "latest");
    let choices = match named {
        Some(_) => vec![choose(&list, named, &opts.target)?],
        None => candidates(&list, &opts.target)?,
    };
    // A backup named explicitly must be that one; otherwise a damaged control object (not
    // readable, not walhoard's format) falls back to the next older backup that suits the
    // target, with a warning, instead of failing the restore.
    let mut picked = None;
    for (i, chosen) in choices.iter().enumerate() {
        let source = site.for_backup(chosen)?;
        let control = read_known_control(&source, &chosen.name).await;
        match control {
            Ok(c) => {
                picked = Some(((*chosen).clone(), c));
                break;
            }
            Err(e) if named.is_none() && i + 1 < choices.len() => {
                tracing::warn!(
                    "skipping basebackup {}: {e:#}; trying an older one",
                    chosen.name
                );
            }
            Err(e) => return Err(e),
        }
    }
    let (chosen, (meta, extra, pghoard_written)) = picked.context("no basebackup candidates")?;
    // An incremental backup: its whole chain is read and checked before anything is written.
    let chain = if meta.backup_type == BackupType::Incremental {
        if meta.format != FORMAT_STREAM {
            bail!(
                "basebackup/{}: an incremental backup in the format {:?}, not {FORMAT_STREAM:?}: refused",
                chosen.name,
                meta.format
            );
        }
        let chain = chain::resolve(site, &list, &chosen, &meta).await?;
        eprintln!(
            "restore: basebackup {} is incremental; its chain: {}",
            chosen.name,
            chain
                .iter()
                .map(|m| m.listing.name.as_str())
                .collect::<Vec<_>>()
                .join(" <- ")
        );
        Some(chain)
    } else {
        None
    };
    // From here on the backup's objects are read from the site that holds it.
    let source = site.for_backup(&chosen)?;
    let site = &source;
    let preservation = match &opts.preserve {
        Some(p) => Some(p.begin(&site.store, &chosen.name).await?),
        None => None,
    };
    eprintln!(
        "restore: basebackup {} (ends {} at {}, {} bytes)",
        chosen.name, chosen.end_time, chosen.end_lsn, chosen.size_plain
    );
    // Tablespace directories: remapped or original; every --tablespace-dir must match one.
    let mut ts_dirs: BTreeMap<String, (u32, PathBuf)> = BTreeMap::new();
    let mut named_by: BTreeMap<String, NamedBy> = BTreeMap::new();
    for (key, ts) in &meta.tablespaces {
        let mapped = opts
            .tablespace_dirs
            .iter()
            .find(|(k, _)| k == key || *k == ts.oid.to_string())
            .map(|(_, d)| d.clone());
        let (dir, by) = match mapped {
            Some(d) => (d, NamedBy::Operator),
            None => (
                backup_named_dir(&chosen.name, key, &ts.path)?,
                NamedBy::Backup,
            ),
        };
        ts_dirs.insert(key.clone(), (ts.oid, dir));
        named_by.insert(key.clone(), by);
    }
    for (k, _) in &opts.tablespace_dirs {
        if !meta
            .tablespaces
            .iter()
            .any(|(key, ts)| key == k || ts.oid.to_string() == *k)
        {
            bail!(
                "--tablespace-dir {k}=…: the backup has no tablespace {k:?} (it has: {})",
                meta.tablespaces
                    .iter()
                    .map(|(k, t)| format!("{k} (oid {})", t.oid))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    check_disjoint(&opts.target_dir, &ts_dirs)?;
    // A directory only the backup names must be empty (or absent) before anything is touched,
    // the target directory included.
    for (key, (_, dir)) in &ts_dirs {
        if named_by.get(key) == Some(&NamedBy::Backup) {
            Dest::check_empty(dir, &format!("tablespace {key:?} directory"))?;
        }
    }
    if opts.existing == Existing::Delta && opts.target_dir.is_dir() {
        // Before anything is changed: the server stopped, then the directory made one
        // PostgreSQL will not start on until the restore completed.
        delta::check_stopped(&opts.target_dir)?;
        delta::unmark(&opts.target_dir)?;
    }
    let mut dests = vec![Dest::prepare(
        &opts.target_dir,
        opts.existing,
        NamedBy::Operator,
        "target directory",
    )?];
    let result = async {
        for (key, (_, dir)) in &ts_dirs {
            let by = named_by.get(key).copied().unwrap_or(NamedBy::Backup);
            let what = format!("tablespace {key:?} directory");
            dests.push(Dest::prepare(dir, opts.existing, by, &what)?);
        }
        match &chain {
            Some(chain) => restore_chain(site, opts, chain, &ts_dirs).await,
            None => {
                restore_into(
                    site,
                    opts,
                    &chosen.name,
                    &meta,
                    extra,
                    &ts_dirs,
                    pghoard_written,
                    None,
                )
                .await
            }
        }
    }
    .await;
    if let (Ok(()), Some(p), Some(name)) = (&result, &opts.preserve, &preservation) {
        p.end(&site.store, name).await;
    }
    match result {
        Ok(()) => Ok(Restored {
            name: chosen.name.clone(),
            tablespaces: ts_dirs.values().cloned().collect(),
            metadata: meta,
        }),
        Err(e) => {
            for d in &dests {
                d.undo();
            }
            Err(e)
        }
    }
}

/// Whether a backup's chunks and control-object members are laid out as local-tar's
/// (`pgdata/…`, `tablespaces/<name>/…`): walhoard's and pghoard's local-tar, pghoard's delta.
fn local_tar_layout(format: &str) -> bool {
    format == FORMAT_LOCAL_TAR || format == FORMAT_PGHOARD_DELTA
}

/// Restores an incremental backup's chain (oldest first) into the prepared directories: one
/// pass per backup, what a newer backup does not have removed after its pass, then the
/// newest's `backup_label` and `backup_manifest` made to describe the result
/// ([`super::combine`]).
async fn restore_chain(
    site: &RestoreSite,
    opts: &GetOptions,
    chain: &[Member],
    ts_dirs: &BTreeMap<String, (u32, PathBuf)>,
) -> Result<()> {
    let newest = chain.last().context("an empty chain")?;
    let oids: BTreeMap<u32, PathBuf> = ts_dirs.values().cloned().collect();
    // `--delta`: what each file needs, from the manifests and the files already there.
    let plan = if opts.existing == Existing::Delta {
        let started = std::time::Instant::now();
        let plan = chain_delta::prepare(site, chain, &opts.target_dir, &oids).await?;
        eprintln!(
            "restore: delta: {} files already as in the backup, {} to patch with the newer incremental files, {} to rebuild ({} from an older backup of the chain; {} bytes compared in {:.1}s)",
            plan.kept.load(Ordering::Relaxed),
            plan.patched.load(Ordering::Relaxed),
            plan.rebuilt.load(Ordering::Relaxed),
            plan.rebuilt_older.load(Ordering::Relaxed),
            plan.hashed.load(Ordering::Relaxed),
            started.elapsed().as_secs_f64()
        );
        Some(Arc::new(plan))
    } else {
        None
    };
    for (i, m) in chain.iter().enumerate() {
        let name = &m.listing.name;
        if plan.as_ref().is_some_and(|p| !p.needs_member(i)) {
            eprintln!(
                "restore: chain {}/{}: basebackup {name}: nothing needed from it, not downloaded",
                i + 1,
                chain.len()
            );
            continue;
        }
        let source = site.for_backup(&m.listing)?;
        let mut pass = Combine::new(name, i > 0);
        pass.delta = plan.clone().map(|p| (i, p));
        let pass = Arc::new(pass);
        eprintln!(
            "restore: chain {}/{}: basebackup {name} ({})",
            i + 1,
            chain.len(),
            m.meta.backup_type.as_str()
        );
        restore_into(
            &source,
            opts,
            name,
            &m.meta,
            Vec::new(),
            ts_dirs,
            false,
            Some(pass.clone()),
        )
        .await?;
        let mut removed = 0;
        // A delta restore removes only what the newest backup does not have: an older pass
        // wrote only what some file still needs.
        if i > 0 && (plan.is_none() || i + 1 == chain.len()) {
            let dirs = std::iter::once(opts.target_dir.as_path())
                .chain(ts_dirs.values().map(|(_, d)| d.as_path()));
            for dir in dirs {
                removed += pass.seen.remove_unseen(dir).with_context(|| {
                    format!(
                        "remove what basebackup/{name} does not have from {}",
                        dir.display()
                    )
                })?;
            }
        }
        eprintln!(
            "restore: chain {}/{}: {} incremental files applied ({} bytes of blocks), {removed} entries the backup does not have removed",
            i + 1,
            chain.len(),
            pass.applied.load(Ordering::Relaxed),
            pass.block_bytes.load(Ordering::Relaxed)
        );
    }
    let started = std::time::Instant::now();
    combine::finish(&opts.target_dir, &newest.listing.name, &oids, &|p| {
        plan.as_ref().and_then(|plan| plan.known_final(p))
    })?;
    eprintln!(
        "restore: backup_label and backup_manifest rewritten for the combined files in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let data = Extractor::new(opts.target_dir.clone(), true);
    settle(
        site,
        opts,
        &newest.listing.name,
        &newest.meta,
        ts_dirs,
        &data,
    )
}

#[allow(clippy::too_many_arguments)]
async fn restore_into(
    site: &RestoreSite,
    opts: &GetOptions,
    name: &str,
    meta: &BackupMetadata,
    extra: Vec<(Entry, Vec<u8>)>,
    ts_dirs: &BTreeMap<String, (u32, PathBuf)>,
    pghoard_written: bool,
    chain_pass: Option<Arc<Combine>>,
) -> Result<()> {
    let seen = (opts.existing == Existing::Delta).then(|| Arc::new(Seen::default()));
    // A full restore of a stream-format backup (one writing thread per base.tar) syncs each
    // new file on a thread of its own (at most 64 open), waited for below before anything
    // counts as restored. local-tar chunks are written by `restore_process_count` threads,
    // each syncing its own files, which lets their syncs overlap as before.
    let syncs = (seen.is_none() && chain_pass.is_none() && !local_tar_layout(&meta.format))
        .then(|| Arc::new(SyncQueue::default()));
    let extractor = |dir: &Path, hold_back: bool| {
        Extractor::new(dir.to_path_buf(), hold_back)
            .with_delta(seen.clone())
            .with_combine(chain_pass.clone())
            .with_syncs(syncs.clone())
    };
    let data = extractor(&opts.target_dir, true);
    let local_tar = LocalTarRoutes {
        data: data.clone(),
        tablespaces: ts_dirs
            .iter()
            .map(|(k, (_, d))| (k.clone(), extractor(d, false)))
            .collect(),
    };
    let mut jobs = Vec::new();
    let plan = chain_pass.as_ref().and_then(|p| p.delta.clone());
    for c in &meta.chunks {
        // A delta restore of a chain: only the chunks that hold something still needed.
        if let Some((member, plan)) = &plan {
            let needed = match c.kind {
                ChunkKind::Data => plan.needs(*member, None),
                ChunkKind::Manifest => plan.is_newest(*member),
                ChunkKind::Tablespace => plan.needs(*member, c.tablespace_oid),
            };
            if !needed {
                continue;
            }
        }
        // pghoard's delta bundle chunks hold members relative to the data directory (no
        // `pgdata/`): they go the way of a base.tar's.
        let route = if meta.format == FORMAT_LOCAL_TAR {
            local_tar.route()
        } else {
            match c.kind {
                ChunkKind::Data => Route::Into(data.clone()),
                ChunkKind::Manifest => {
                    let p = opts.target_dir.join("backup_manifest");
                    if let Some(seen) = &seen {
                        seen.record(&opts.target_dir, &p);
                    }
                    if let Some(pass) = &chain_pass {
                        pass.seen.record(&opts.target_dir, &p);
                    }
                    Route::File {
                        dir: opts.target_dir.clone(),
                        name: "backup_manifest",
                    }
                }
                ChunkKind::Tablespace => {
                    let oid = c.tablespace_oid.with_context(|| {
                        format!(
                            "chunk {}: tablespace chunk without an oid",
                            c.chunk_filename
                        )
                    })?;
                    let dir = ts_dirs
                        .values()
                        .find(|(o, _)| *o == oid)
                        .map(|(_, d)| d.clone());
                    match dir {
                        Some(dir) => Route::Into(extractor(&dir, false)),
                        // An older backup of a chain: a tablespace dropped since is checked,
                        // not written.
                        None if chain_pass.is_some() => Route::Check { tar: true },
                        None => bail!(
                            "chunk {}: tablespace oid {oid} is not in the metadata",
                            c.chunk_filename
                        ),
                    }
                }
            }
        };
        jobs.push(Job {
            chunk: c.clone(),
            route,
            key: chunk_key(meta, c),
            check_sha1: !pghoard_written,
        });
    }
    let delta = match meta.format.as_str() {
        FORMAT_PGHOARD_DELTA => {
            let json = extra
                .iter()
                .find(|(e, _)| e.path == METADATA_MEMBER)
                .map(|(_, d)| d.as_slice())
                .unwrap_or_default();
            let files = pghoard_delta::delta_files(&format!("basebackup/{name}"), json)?;
            jobs.extend(pghoard_delta::object_jobs(&files, Some(&data)));
            Some(files)
        }
        _ => None,
    };
    let parallel = site.restore_process_count;
    let done = Arc::new(AtomicU64::new(0));
    let reporter = spawn_progress("restore", done.clone(), meta.total_size_plain);
    let started = std::time::Instant::now();
    // Chunks, and for pghoard's delta backups their delta objects too.
    let objects = jobs.len();
    let fetched = fetch_all(site, jobs, parallel, done.clone()).await;
    reporter.abort();
    if io::stderr().is_terminal() {
        eprintln!();
    }
    fetched?;
    if let Some(files) = &delta {
        pghoard_delta::write_embedded(files, &data)
            .with_context(|| format!("basebackup/{name}: embedded files"))?;
    }
    // `--delta`: the delta objects whose files were already right were not downloaded.
    let unfetched = seen
        .as_ref()
        .map_or(0, |s| s.unfetched.load(Ordering::Relaxed));
    eprintln!(
        "restore: {} objects, {} bytes in {:.1}s",
        objects as u64 - unfetched,
        done.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    // local-tar: pg_control and backup_label live in the control object.
    if local_tar_layout(&meta.format) {
        let route = local_tar.route();
        for (e, bytes) in &extra {
            if let Some((x, rel)) = route.place(&e.path)? {
                x.extract(e, rel, &mut &bytes[..])
                    .with_context(|| format!("basebackup/{name}: member {}", e.path))?;
            }
        }
    }
    if let Some(q) = &syncs {
        q.wait().context("sync the restored files")?;
    }
    // A chain's delta restore removes what the newest backup lacks once, in restore_chain;
    // each pass's files rewritten in place are synced before the next pass reads them.
    match (&seen, &chain_pass) {
        (Some(seen), None) => report_delta(seen, &opts.target_dir, ts_dirs)?,
        (Some(seen), Some(_)) => seen
            .syncs
            .wait()
            .context("sync the files the delta restore rewrote")?,
        (None, _) => {}
    }
    if chain_pass.is_some() {
        // The chain's last pass is followed by restore_chain's own completion.
        return Ok(());
    }
    settle(site, opts, name, meta, ts_dirs, &data)
}

/// The steps after every file of the backup is in place: tablespace links, the recovery
/// settings, and last the held-back files that make the directory a data directory.
fn settle(
    site: &RestoreSite,
    opts: &GetOptions,
    name: &str,
    meta: &BackupMetadata,
    ts_dirs: &BTreeMap<String, (u32, PathBuf)>,
    data: &Extractor,
) -> Result<()> {
    let root = Beneath::open(&opts.target_dir)
        .with_context(|| format!("open {}", opts.target_dir.display()))?;
    if !local_tar_layout(&meta.format) {
        // BASE_BACKUP's tablespace_map names the original directories; the links below say
        // where the tablespaces are now (docs/formats.md).
        root.remove_file(Path::new("tablespace_map"))
            .with_context(|| {
                format!(
                    "remove {}",
                    opts.target_dir.join("tablespace_map").display()
                )
            })?;
    }
    link_tablespaces(&root, name, ts_dirs)?;
    if !root.exists(Path::new(&format!("PG_VERSION{HELD_BACK_SUFFIX}")))? {
        bail!("basebackup/{name} holds no PG_VERSION: not a data directory backup");
    }
    for (_, dir) in ts_dirs.values() {
        sync_dirs(dir).with_context(|| format!("sync {}", dir.display()))?;
    }
    // The recovery settings last, once everything else is in place: a restore that failed
    // never got this far, and its target is removed or emptied again.
    let restore_command = match &opts.restore_command {
        Some(c) => c.clone(),
        None => {
            let exe = std::env::current_exe().context("path of the walhoard executable")?;
            recovery::restore_command(&exe, &site.config_path, &site.name)
        }
    };
    let removed = recovery::write(
        &opts.target_dir,
        meta.pg_version,
        &RecoverySettings {
            restore_command,
            target: opts.target.clone(),
            action: opts.action.clone(),
            to_primary: opts.restore_to_primary,
            primary_conninfo: opts.primary_conninfo.clone(),
        },
    )?;
    for r in removed {
        eprintln!("restore: removed the backup's recovery configuration: {r}");
    }
    data.finish()
        .with_context(|| format!("finish {}", opts.target_dir.display()))?;
    Ok(())
}

/// `--delta`: removes what the backup does not have, and says what was kept and written.
fn report_delta(
    seen: &Seen,
    target: &Path,
    ts_dirs: &BTreeMap<String, (u32, PathBuf)>,
) -> Result<()> {
    // The files rewritten in place, synced meanwhile on a thread of their own.
    seen.syncs
        .wait()
        .context("sync the files the delta restore rewrote")?;
    let mut removed = 0;
    for dir in std::iter::once(target).chain(ts_dirs.values().map(|(_, d)| d.as_path())) {
        removed += seen.remove_unseen(dir).with_context(|| {
            format!(
                "remove what the backup does not have from {}",
                dir.display()
            )
        })?;
    }
    eprintln!(
        "restore: delta: {} files already identical ({} objects not downloaded), {} bytes written, {removed} entries not in the backup removed",
        seen.kept.load(Ordering::Relaxed),
        seen.unfetched.load(Ordering::Relaxed),
        seen.written.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Links `pg_tblspc/<oid>` to where each tablespace was restored. A link the backup itself
/// brought (base.tar has one per tablespace) is replaced; one for a tablespace the metadata
/// does not list is refused, since PostgreSQL would write wherever it points.
fn link_tablespaces(
    root: &Beneath,
    name: &str,
    ts_dirs: &BTreeMap<String, (u32, PathBuf)>,
) -> Result<()> {
    let tblspc = Path::new("pg_tblspc");
    for (link, to) in root.symlinks_in(tblspc)? {
        if !ts_dirs.values().any(|(oid, _)| oid.to_string() == link) {
            bail!(
                "basebackup/{name}: member pg_tblspc/{link} links to {}, but the backup's metadata has no tablespace with oid {link}: refused",
                to.display()
            );
        }
    }
    if !ts_dirs.is_empty() {
        root.create_dir(tblspc)?;
    }
    for (oid, dir) in ts_dirs.values() {
        let abs = std::path::absolute(dir)?;
        root.symlink(&tblspc.join(oid.to_string()), &abs)
            .with_context(|| format!("link pg_tblspc/{oid} to {}", abs.display()))?;
    }
    Ok(())
}
