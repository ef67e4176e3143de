//! The basebackup half of `walhoard verify`: the control object read as restore reads it,
//! then every chunk: it exists, its stored size is the control object's `result_size`, and it
//! is fetched through restore's own path ([`restore_chunk`] with nowhere to extract to):
//! decrypted, decompressed, its plain size and SHA-1 compared, its tar read member by member.
//! A pghoard delta backup's `basebackup_delta/<hash>` objects are checked the same way, their
//! BLAKE2s-256 against their name. Nothing is written to disk.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use walhoard_basebackup::control::{BackupMetadata, ChunkKind, METADATA_MEMBER};

use super::Problem;
use crate::restore::chunks::{chunk_key, restore_chunk, Job, Route};
use crate::restore::get::read_known_control;
use crate::restore::pghoard_delta::{self, FORMAT_PGHOARD_DELTA};
use crate::restore::{BackupListing, RestoreSite};

/// A backup whose control object could be read, with the site that holds its objects.
pub struct Described {
    pub listing: BackupListing,
    pub source: RestoreSite,
    pub meta: BackupMetadata,
    pub pghoard_written: bool,
    /// pghoard delta backups: one check per `basebackup_delta/<hash>` object (read, never
    /// written; its size and BLAKE2s-256 checked as restore checks them).
    pub(crate) delta_objects: Vec<Job>,
}

/// Reads the control object of `b`; a problem (named by the control object's key) when it
/// cannot be read or describes a format restore does not know.
pub async fn describe(site: &RestoreSite, b: &BackupListing) -> Result<Described, Problem> {
    let key = format!("basebackup/{}", b.name);
    let source = site
        .for_backup(b)
        .map_err(|e| Problem::new(&key, format!("{e:#}")))?;
    let (meta, extra, pghoard_written) = read_known_control(&source, &b.name)
        .await
        .map_err(|e| Problem::new(&key, format!("{e:#}")))?;
    // A pghoard delta backup's files are objects of their own, named in its manifest.
    let delta_objects = if meta.format == FORMAT_PGHOARD_DELTA {
        let json = extra
            .iter()
            .find(|(e, _)| e.path == METADATA_MEMBER)
            .map(|(_, d)| d.as_slice())
            .unwrap_or_default();
        let files = pghoard_delta::delta_files(&key, json)
            .map_err(|e| Problem::new(&key, format!("{e:#}")))?;
        pghoard_delta::object_jobs(&files, None)
    } else {
        Vec::new()
    };
    Ok(Described {
        listing: b.clone(),
        source,
        meta,
        pghoard_written,
        delta_objects,
    })
}

/// Checks every chunk of `d`, `parallel` at a time; returns the problems, each named by the
/// chunk's object key.
pub async fn check_chunks(
    d: &Described,
    parallel: usize,
    progress: &Arc<AtomicU64>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut set = tokio::task::JoinSet::new();
    let mut jobs = d
        .meta
        .chunks
        .iter()
        .map(|c| Job {
            chunk: c.clone(),
            route: Route::Check {
                tar: c.kind != ChunkKind::Manifest,
            },
            key: chunk_key(&d.meta, c),
            check_sha1: !d.pghoard_written,
        })
        .chain(d.delta_objects.iter().cloned());
    // Never set: every chunk is checked, whatever another's outcome.
    let stop = Arc::new(AtomicBool::new(false));
    loop {
        while set.len() < parallel.max(1) {
            let Some(job) = jobs.next() else { break };
            let source = d.source.clone();
            let (progress, stop) = (progress.clone(), stop.clone());
            set.spawn(async move { check_chunk(&source, &job, progress, stop).await });
        }
        match set.join_next().await {
            None => break,
            Some(Ok(found)) => problems.extend(found),
            Some(Err(e)) => problems.push(Problem::new(
                &format!("basebackup/{}", d.listing.name),
                format!("verify task failed: {e}"),
            )),
        }
    }
    problems.sort_by(|a, b| a.key.cmp(&b.key));
    problems
}

async fn check_chunk(
    site: &RestoreSite,
    job: &Job,
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Vec<Problem> {
    let key = &job.key;
    let mut out = Vec::new();
    match site.store.stat(key).await {
        Ok(None) => {
            out.push(Problem::new(key, "missing".to_string()));
            return out;
        }
        Ok(Some(info)) if info.size != job.chunk.result_size => out.push(Problem::new(
            key,
            format!(
                "stored size {} bytes, the control object says {}",
                info.size, job.chunk.result_size
            ),
        )),
        Ok(Some(_)) => {}
        Err(e) => {
            out.push(Problem::new(key, format!("stat: {e}")));
            return out;
        }
    }
    if let Err(e) = restore_chunk(site, job, progress, stop).await {
        out.push(Problem::new(key, format!("{e:#}")));
    }
    out
}
