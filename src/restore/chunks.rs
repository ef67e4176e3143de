//! The chunks of a basebackup being restored: each fetched, decrypted and decompressed as a
//! stream, its plain bytes counted ([`Verifying`]) and hashed against the control object and
//! its members routed to the data directory or a tablespace ([`Route`]), `parallel` at a time
//! ([`fetch_all`]).

use std::collections::BTreeMap;
use std::io::{self, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use aws_lc_rs::digest;
use walhoard_basebackup::control::{BackupMetadata, ChunkMeta, METADATA_MEMBER};
use walhoard_basebackup::untar::TarReader;

use super::beneath::Beneath;
use super::extract::Extractor;
use super::pghoard::FORMAT_PGHOARD_BASIC;
use super::pghoard_delta;
use super::RestoreSite;
use crate::pipeline::handoff;
use crate::pipeline::transfer::download_with;

/// Counts and reports the plain bytes of a chunk as they are read, and passes
/// on no more than the size the control object declares.
struct Verifying<'a> {
    inner: &'a mut dyn Read,
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
        self.size += n as u64;
        self.progress.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Where a chunk's members go.
#[derive(Clone)]
pub(crate) enum Route {
    /// base.tar / a tablespace tar: every member below one extractor.
    Into(Extractor),
    /// local-tar: `pgdata/…` to the data directory, `tablespaces/<name>/…` to that tablespace.
    LocalTar {
        data: Extractor,
        tablespaces: BTreeMap<String, Extractor>,
    },
    /// The backup_manifest: a plain file `name` in the directory `dir`.
    File { dir: PathBuf, name: &'static str },
    /// A pghoard delta object: the whole plain body is the file `rel` of the data directory
    /// (`data`; `None` for `walhoard verify`, which writes nothing), whose BLAKE2s-256 must be
    /// `hexdigest` ([`super::pghoard_delta`]).
    DeltaFile {
        data: Option<Extractor>,
        rel: String,
        hexdigest: String,
    },
    /// Nowhere (`walhoard verify`): a tar chunk is read member by member, so that a
    /// malformed one fails as it would in a restore; any other chunk is read to its end.
    Check { tar: bool },
}

impl Route {
    /// The extractor and relative path of a member; `None` for members to skip.
    pub(super) fn place<'a>(
        &'a self,
        path: &'a str,
    ) -> io::Result<Option<(&'a Extractor, &'a str)>> {
        match self {
            Route::Into(x) => Ok(Some((x, path))),
            Route::File { .. } | Route::DeltaFile { .. } | Route::Check { .. } => Ok(None),
            Route::LocalTar { data, tablespaces } => {
                let p = path.trim_start_matches("./");
                if p == METADATA_MEMBER || p == pghoard_delta::MANIFEST_MEMBER {
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
        if let Route::DeltaFile {
            data,
            rel,
            hexdigest,
        } = self
        {
            return pghoard_delta::extract_object(data.as_ref(), rel, hexdigest, r);
        }
        if let Route::Check { tar: false } = self {
            io::copy(r, &mut io::sink())?;
            return Ok(());
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
pub(crate) async fn restore_chunk(
    site: &RestoreSite,
    job: &Job,
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let (chunk, key) = (&job.chunk, &job.key);
    if let Route::DeltaFile {
        data: Some(data),
        rel,
        hexdigest,
    } = &job.route
    {
        // `--delta`: a file already there with the object's size and digest is kept.
        let (data, rel, hexdigest, size) = (
            data.clone(),
            rel.clone(),
            hexdigest.clone(),
            chunk.input_size,
        );
        let kept = tokio::task::spawn_blocking(move || {
            pghoard_delta::keep_local(&data, &rel, &hexdigest, size)
                .with_context(|| format!("compare {rel} with the backup's"))
        })
        .await
        .context("delta restore task failed")??;
        if kept {
            return Ok(());
        }
    }
    let route = job.route.clone();
    let limit = chunk.input_size;
    let key2 = key.clone();
    let check_sha1 = job.check_sha1;
    let (_, (size, sha1)) = download_with(&site.store, key, &site.keys, move |_, r| {
        // Decryption and decompression stay on this thread; the tar parsing and the writes
        // (or, with --delta, the comparison with the files there) go to another, the SHA-1
        // to a third (docs/benchmarks.md, issue 18: one thread did all of it).
        let consume = move |r: &mut dyn Read| {
            let mut v = Verifying {
                inner: r,
                size: 0,
                limit,
                key: key2,
                progress,
                stop,
            };
            route.consume(&mut v)?;
            Ok(v.size)
        };
        if !check_sha1 {
            return Ok((handoff::pipelined(r, consume)?, None));
        }
        // Every plain byte of the chunk: when the restore succeeds, the consumer read them
        // all, no more than `limit`.
        let mut hash = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
        let (size, _) = handoff::pipelined_tapped(r, |b: &[u8]| hash.update(b), consume)?;
        Ok((size, Some(hex::encode(hash.finish()))))
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
    if let Some(sha1) = sha1.filter(|s| *s != chunk.hash) {
        bail!(
            "chunk {key}: SHA-1 {sha1} does not match the control object's {}",
            chunk.hash
        );
    }
    Ok(())
}

/// Prints progress: a bar redrawn in place on a terminal, a line every few seconds otherwise,
/// `what` naming the command.
pub(crate) fn spawn_progress(
    what: &'static str,
    done: Arc<AtomicU64>,
    total: u64,
) -> tokio::task::JoinHandle<()> {
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
                eprintln!("{what}: {d} / {total} bytes ({pct}%)");
            }
        }
    })
}

/// The object key of a chunk of the backup `meta` describes.
pub(crate) fn chunk_key(meta: &BackupMetadata, c: &ChunkMeta) -> String {
    match meta.format.as_str() {
        // pghoard's basic backup is its control object.
        FORMAT_PGHOARD_BASIC => format!("basebackup/{}", c.chunk_filename),
        pghoard_delta::FORMAT_PGHOARD_DELTA => {
            format!("{}/{}", pghoard_delta::CHUNK_PREFIX, c.chunk_filename)
        }
        _ => format!("basebackup_chunk/{}", c.chunk_filename),
    }
}

/// One chunk to fetch: its description, where its members go, its object key.
#[derive(Clone)]
pub(crate) struct Job {
    pub(crate) chunk: ChunkMeta,
    pub(crate) route: Route,
    pub(crate) key: String,
    /// walhoard's chunks carry the SHA-1 of their plain bytes; pghoard's do not.
    pub(crate) check_sha1: bool,
}

/// The local-tar routing, shared by every chunk.
pub(super) struct LocalTarRoutes {
    pub(super) data: Extractor,
    pub(super) tablespaces: BTreeMap<String, Extractor>,
}

impl LocalTarRoutes {
    pub(super) fn route(&self) -> Route {
        Route::LocalTar {
            data: self.data.clone(),
            tablespaces: self.tablespaces.clone(),
        }
    }
}

/// Runs the chunk jobs, `parallel` at a time. The first failure stops the others at their next
/// read; all are waited for, so nothing writes into the target after this returns.
pub(super) async fn fetch_all(
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
