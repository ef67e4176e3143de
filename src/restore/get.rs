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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use aws_lc_rs::digest;
use walhoard_basebackup::control::{
    BackupMetadata, ChunkKind, ChunkMeta, FORMAT_LOCAL_TAR, FORMAT_STREAM, METADATA_MEMBER,
};
use walhoard_basebackup::untar::{Entry, TarReader};

use super::beneath::Beneath;
use super::dest::{backup_named_dir, check_disjoint, Dest, NamedBy};
use super::extract::{sync_dirs, Extractor, HELD_BACK_SUFFIX};
use super::pghoard::{self, FORMAT_PGHOARD_BASIC};
use super::recovery::{self, RecoverySettings};
use super::{candidates, choose, RestoreSite, Target};
use crate::basebackup::inventory::{self, Writer};
use crate::pipeline::transfer::download_with;
use crate::storage::meta;

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
    pub overwrite: bool,
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

/// Counts, hashes (SHA-1) and reports the plain bytes of a chunk as they are read, and passes
/// on no more than the size the control object declares.
struct Verifying<'a> {
    inner: &'a mut dyn Read,
    hash: digest::Context,
    size: u64,
    /// The chunk's declared plain size (`input_size`): a chunk that decompresses to more is
    /// refused at this size, before anything beyond it reaches the extractor (a tiny object
    /// can decompress to gigabytes).
    limit: u64,
    /// The chunk's object key, for the error.
    key: String,
    progress: Arc<AtomicU64>,
    /// Set when another chunk failed: stop at the next read.
    stop: Arc<AtomicBool>,
}

impl Read for Verifying<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(io::Error::other("stopped: another chunk failed"));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        if self.size >= self.limit {
            // At the declared size: the stream must end here. One byte more is refused.
            let mut probe = [0u8; 1];
            let more = loop {
                match self.inner.read(&mut probe) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r?,
                }
            };
            if more == 0 {
                return Ok(0);
            }
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} decompresses to more than the {} bytes the control object declares: refused at that size",
                    self.key, self.limit
                ),
            ));
        }
        let room = usize::try_from(self.limit - self.size).unwrap_or(usize::MAX);
        let want = buf.len().min(room);
        let n = self.inner.read(&mut buf[..want])?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        self.progress.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Where a chunk's members go.
#[derive(Clone)]
enum Route {
    /// base.tar / a tablespace tar: every member below one extractor.
    Into(Extractor),
    /// local-tar: `pgdata/…` to the data directory, `tablespaces/<name>/…` to that tablespace.
    LocalTar {
        data: Extractor,
        tablespaces: BTreeMap<String, Extractor>,
    },
    /// The backup_manifest: a plain file `name` in the directory `dir`.
    File { dir: PathBuf, name: &'static str },
}

impl Route {
    /// The extractor and relative path of a member; `None` for members to skip.
    fn place<'a>(&'a self, path: &'a str) -> io::Result<Option<(&'a Extractor, &'a str)>> {
        match self {
            Route::Into(x) => Ok(Some((x, path))),
            Route::File { .. } => Ok(None),
            Route::LocalTar { data, tablespaces } => {
                let p = path.trim_start_matches("./");
                if p == METADATA_MEMBER {
                    return Ok(None);
                }
                if p == "pgdata" || p == "pgdata/" {
                    return Ok(Some((data, "")));
                }
                if let Some(rest) = p.strip_prefix("pgdata/") {
                    return Ok(Some((data, rest)));
                }
                if p == "tablespaces" || p == "tablespaces/" {
                    return Ok(None);
                }
                if let Some(rest) = p.strip_prefix("tablespaces/") {
                    let (name, rel) = rest.split_once('/').unwrap_or((rest, ""));
                    return match tablespaces.get(name) {
                        Some(x) => Ok(Some((x, rel))),
                        None => Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("tar member {path:?}: tablespace {name:?} is not in the backup's metadata"),
                        )),
                    };
                }
                Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "tar member {path:?} is neither under pgdata/ nor tablespaces/: refused"
                    ),
                ))
            }
        }
    }

    /// Reads a whole chunk (tar or file) from `r`.
    fn consume(&self, r: &mut dyn Read) -> io::Result<()> {
        if let Route::File { dir, name } = self {
            // Never through a symlink the backup placed at that name (Beneath).
            let mut f = Beneath::open(dir)?.create(Path::new(name), 0o600)?;
            io::copy(r, &mut f)?;
            return f.sync_all();
        }
        let mut tar = TarReader::new(&mut *r);
        while let Some(entry) = tar.next_entry()? {
            if let Some((x, rel)) = self.place(&entry.path)? {
                x.extract(&entry, rel, &mut tar.body())?;
            }
        }
        // Whatever follows the end-of-archive blocks is part of the chunk's hash.
        io::copy(&mut tar.into_inner(), &mut io::sink())?;
        Ok(())
    }
}

/// Fetches one chunk and extracts it, checking size and SHA-1.
async fn restore_chunk(
    site: &RestoreSite,
    job: &Job,
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let (chunk, key) = (&job.chunk, &job.key);
    let route = job.route.clone();
    let limit = chunk.input_size;
    let key2 = key.clone();
    let (_, (size, sha1)) = download_with(&site.store, key, &site.keys, move |_, r| {
        let mut v = Verifying {
            inner: r,
            hash: digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY),
            size: 0,
            limit,
            key: key2,
            progress,
            stop,
        };
        route.consume(&mut v)?;
        Ok((v.size, hex::encode(v.hash.finish())))
    })
    .await
    .with_context(|| format!("restore chunk {key}"))?;
    if size != chunk.input_size {
        bail!(
            "chunk {key}: {size} plain bytes, the control object says {}",
            chunk.input_size
        );
    }
    // pghoard records no hash of a chunk's plain bytes (see super::pghoard for what is
    // checked instead).
    if job.check_sha1 && sha1 != chunk.hash {
        bail!(
            "chunk {key}: SHA-1 {sha1} does not match the control object's {}",
            chunk.hash
        );
    }
    Ok(())
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
        .metadata_and_size(&key)
        .await
        .with_context(|| format!("metadata of control object {key}"))?;
    let (_, writer) = inventory::classify(name, &Ok(object_meta.clone()));
    let pghoard = writer == Writer::Pghoard;
    if pghoard {
        pghoard::check_supported(&key, &object_meta)?;
        if !object_meta.contains_key(meta::FORMAT) {
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
    for (e, data) in members {
        if e.path == METADATA_MEMBER {
            meta = Some(if pghoard {
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

/// Prints progress: a bar redrawn in place on a terminal, a line every few seconds otherwise.
fn spawn_progress(done: Arc<AtomicU64>, total: u64) -> tokio::task::JoinHandle<()> {
    let tty = io::stderr().is_terminal();
    tokio::spawn(async move {
        let every = if tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        loop {
            tokio::time::sleep(every).await;
            let d = done.load(Ordering::Relaxed);
            let pct = if total == 0 {
                100
            } else {
                d * 100 / total.max(1)
            };
            if tty {
                let filled = (pct.min(100) / 5) as usize;
                eprint!(
                    "\r[{}{}] {pct:>3}% {} / {} MiB",
                    "#".repeat(filled),
                    " ".repeat(20 - filled),
                    d >> 20,
                    total >> 20
                );
            } else {
                eprintln!("restore: {d} / {total} bytes ({pct}%)");
            }
        }
    })
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
        let control =
            read_control(&source, &chosen.name)
                .await
                .and_then(|(meta, extra, pghoard_written)| {
                    if meta.format != FORMAT_STREAM
                        && meta.format != FORMAT_LOCAL_TAR
                        && meta.format != FORMAT_PGHOARD_BASIC
                    {
                        bail!(
                            "basebackup/{}: unknown format {:?}",
                            chosen.name,
                            meta.format
                        );
                    }
                    Ok((meta, extra, pghoard_written))
                });
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
    let mut dests = vec![Dest::prepare(
        &opts.target_dir,
        opts.overwrite,
        NamedBy::Operator,
        "target directory",
    )?];
    let result = async {
        for (key, (_, dir)) in &ts_dirs {
            let by = named_by.get(key).copied().unwrap_or(NamedBy::Backup);
            let what = format!("tablespace {key:?} directory");
            dests.push(Dest::prepare(dir, opts.overwrite, by, &what)?);
        }
        restore_into(
            site,
            opts,
            &chosen.name,
            &meta,
            extra,
            &ts_dirs,
            pghoard_written,
        )
        .await
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

async fn restore_into(
    site: &RestoreSite,
    opts: &GetOptions,
    name: &str,
    meta: &BackupMetadata,
    extra: Vec<(Entry, Vec<u8>)>,
    ts_dirs: &BTreeMap<String, (u32, PathBuf)>,
    pghoard_written: bool,
) -> Result<()> {
    let data = Extractor::new(opts.target_dir.clone(), true);
    let local_tar = LocalTarRoutes {
        data: data.clone(),
        tablespaces: ts_dirs
            .iter()
            .map(|(k, (_, d))| (k.clone(), Extractor::new(d.clone(), false)))
            .collect(),
    };
    let mut jobs = Vec::new();
    for c in &meta.chunks {
        let route = if meta.format == FORMAT_LOCAL_TAR {
            local_tar.route()
        } else {
            match c.kind {
                ChunkKind::Data => Route::Into(data.clone()),
                ChunkKind::Manifest => Route::File {
                    dir: opts.target_dir.clone(),
                    name: "backup_manifest",
                },
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
                        .map(|(_, d)| d.clone())
                        .with_context(|| {
                            format!(
                                "chunk {}: tablespace oid {oid} is not in the metadata",
                                c.chunk_filename
                            )
                        })?;
                    Route::Into(Extractor::new(dir, false))
                }
            }
        };
        let pghoard_basic = meta.format == FORMAT_PGHOARD_BASIC;
        jobs.push(Job {
            chunk: c.clone(),
            route,
            // pghoard's basic backup is its control object.
            key: if pghoard_basic {
                format!("basebackup/{}", c.chunk_filename)
            } else {
                format!("basebackup_chunk/{}", c.chunk_filename)
            },
            check_sha1: !pghoard_written,
        });
    }
    let parallel = site.config.restore_process_count.unwrap_or(4).max(1) as usize;
    let done = Arc::new(AtomicU64::new(0));
    let reporter = spawn_progress(done.clone(), meta.total_size_plain);
    let started = std::time::Instant::now();
    let fetched = fetch_all(site, jobs, parallel, done.clone()).await;
    reporter.abort();
    if io::stderr().is_terminal() {
        eprintln!();
    }
    fetched?;
    eprintln!(
        "restore: {} chunks, {} bytes in {:.1}s",
        meta.chunks.len(),
        done.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    // local-tar: pg_control and backup_label live in the control object.
    if meta.format == FORMAT_LOCAL_TAR {
        let route = local_tar.route();
        for (e, bytes) in &extra {
            if let Some((x, rel)) = route.place(&e.path)? {
                x.extract(e, rel, &mut &bytes[..])
                    .with_context(|| format!("basebackup/{name}: member {}", e.path))?;
            }
        }
    }
    let root = Beneath::open(&opts.target_dir)
        .with_context(|| format!("open {}", opts.target_dir.display()))?;
    if meta.format != FORMAT_LOCAL_TAR {
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

/// One chunk to fetch: its description, where its members go, its object key.
struct Job {
    chunk: ChunkMeta,
    route: Route,
    key: String,
    /// walhoard's chunks carry the SHA-1 of their plain bytes; pghoard's do not.
    check_sha1: bool,
}

/// The local-tar routing, shared by every chunk.
struct LocalTarRoutes {
    data: Extractor,
    tablespaces: BTreeMap<String, Extractor>,
}

impl LocalTarRoutes {
    fn route(&self) -> Route {
        Route::LocalTar {
            data: self.data.clone(),
            tablespaces: self.tablespaces.clone(),
        }
    }
}

/// Runs the chunk jobs, `parallel` at a time. The first failure stops the others at their next
/// read; all are waited for, so nothing writes into the target after this returns.
async fn fetch_all(
    site: &RestoreSite,
    jobs: Vec<Job>,
    parallel: usize,
    done: Arc<AtomicU64>,
) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut set = tokio::task::JoinSet::new();
    let mut pending = jobs.into_iter();
    let mut first_err: Option<anyhow::Error> = None;
    loop {
        while set.len() < parallel && first_err.is_none() {
            let Some(job) = pending.next() else {
                break;
            };
            let site = site.clone();
            let done = done.clone();
            let stop = stop.clone();
            set.spawn(async move { restore_chunk(&site, &job, done, stop).await });
        }
        let failed = match set.join_next().await {
            None => break,
            Some(Ok(Ok(()))) => None,
            Some(Ok(Err(e))) => Some(e),
            Some(Err(e)) => Some(anyhow::anyhow!("restore task failed: {e}")),
        };
        if let Some(e) = failed {
            stop.store(true, Ordering::Relaxed);
            // Later failures are mostly "stopped": the first is the cause.
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walhoard_basebackup::tar::TarWriter;

    fn verifying<'a>(r: &'a mut dyn Read, limit: u64) -> Verifying<'a> {
        Verifying {
            inner: r,
            hash: digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY),
            size: 0,
            limit,
            key: "basebackup_chunk/b/base.tar".into(),
            progress: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Regression (issue 14, item 15): a chunk that decompressed far beyond its declared size
    /// was written in full and refused only afterwards. Now nothing past the declared size
    /// reaches the extractor.
    #[test]
    fn a_chunk_larger_than_declared_is_cut_at_the_declared_size() {
        let mut w = TarWriter::new(Vec::new());
        w.append_bytes("big", 0o600, 0, &vec![7u8; 4 << 20])
            .unwrap();
        let tar = w.finish().unwrap();
        let root = tempfile::tempdir().unwrap();
        let route = Route::Into(Extractor::new(root.path().to_path_buf(), false));
        let declared = 64 * 1024;
        let mut src = &tar[..];
        let mut v = verifying(&mut src, declared);
        let err = route.consume(&mut v).unwrap_err();
        assert!(
            err.to_string().contains("basebackup_chunk/b/base.tar")
                && err.to_string().contains("more than the 65536 bytes"),
            "{err}"
        );
        assert_eq!(v.size, declared);
        let written = std::fs::metadata(root.path().join("big")).unwrap().len();
        assert!(written <= declared, "{written} bytes written");

        // Exactly the declared size passes, trailing zero blocks and all.
        let mut src = &tar[..];
        let mut v = verifying(&mut src, tar.len() as u64);
        let root = tempfile::tempdir().unwrap();
        Route::Into(Extractor::new(root.path().to_path_buf(), false))
            .consume(&mut v)
            .unwrap();
        assert_eq!(v.size, tar.len() as u64);
    }
}
