//! One WAL file out of the archive for PostgreSQL's restore_command, with prefetch.
//!
//! PostgreSQL asks for files by name: segments of the timeline it is replaying, `.history`
//! files while it looks for the latest timeline, and `.partial` files only by that name. Each
//! is fetched from `xlog/` or `timeline/`, decrypted, decompressed, checked (segments: every
//! page header against the segment's address and timeline; history files: parsed) and renamed
//! onto `%p` only then.
//!
//! Prefetch: after a segment, the next `restore_prefetch` segments of the same timeline are
//! fetched in parallel into `.walhoard-prefetch/` next to `%p` (inside pg_wal, the same file
//! system, so serving one later is a rename). Each is written under a `.walhoard.prefetch` name
//! and renamed once verified, so a half-written prefetch is never served. The window is
//! refilled when it is half used, so most requests are served by a rename.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use walhoard_protocol::xlog::{major_for_page_magic, validate_pages, PageExpectation};
use walhoard_protocol::{SegmentId, SegmentSize, TimelineHistory, WalSegmentName, XLogPageHeader};

use crate::daemon::archiver::wal_key;
use crate::pipeline::encryption::KeyRing;
use crate::pipeline::transfer::{download_with, TransferError};
use crate::storage::{ObjectStore, StorageError};

/// Directory (next to `%p`, i.e. in pg_wal) holding prefetched segments.
pub const PREFETCH_DIR: &str = ".walhoard-prefetch";
/// Suffix of a prefetch still being written.
pub const PREFETCH_SUFFIX: &str = ".walhoard.prefetch";

/// Why a file could not be served.
#[derive(Debug, thiserror::Error)]
pub enum WalFetchError {
    /// The archive answered that the object does not exist: the end of the archive for
    /// PostgreSQL.
    #[error("{key} is not in the archive")]
    NotFound { key: String },
    /// Anything else: recovery must stop rather than take it for the end of the archive.
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

impl WalFetchError {
    fn failed(e: impl Into<anyhow::Error>) -> Self {
        WalFetchError::Failed(e.into())
    }
}

/// Where a served file came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Archive,
    Prefetch,
}

/// Checks a downloaded WAL file before PostgreSQL sees it.
fn verify(name: &WalSegmentName, path: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(path)?;
    match name {
        WalSegmentName::History(tli) => {
            let mut text = Vec::new();
            f.read_to_end(&mut text)?;
            TimelineHistory::parse(*tli, &text)?;
            Ok(())
        }
        WalSegmentName::Segment(id) | WalSegmentName::Partial(id) => {
            let len = f.metadata()?.len();
            let seg = SegmentSize::new(len)
                .map_err(|e| anyhow::anyhow!("{len} bytes is not a WAL segment size: {e}"))?;
            let mut buf = vec![0u8; (1 << 20).min(len as usize)];
            let start = id.start_lsn(seg)?;
            let mut expect: Option<PageExpectation> = None;
            let mut off = 0u64;
            while off < len {
                f.read_exact(&mut buf)?;
                let e = match &expect {
                    Some(e) => e.clone(),
                    None => {
                        let h = XLogPageHeader::parse(&buf)?;
                        let magic = h.magic;
                        major_for_page_magic(magic).ok_or_else(|| {
                            anyhow::anyhow!("first page magic {magic:#06x} is no PostgreSQL's")
                        })?;
                        let e = PageExpectation {
                            magic,
                            seg_size: seg,
                            system_id: None,
                            max_tli: Some(id.tli),
                        };
                        expect = Some(e.clone());
                        e
                    }
                };
                let at = walhoard_protocol::Lsn(start.0 + off);
                // Zero pages may end a segment (after XLOG_SWITCH, or a .partial's tail).
                validate_pages(&buf, at, &e, true)?;
                if buf.iter().rev().take(8192).all(|b| *b == 0) {
                    // The rest must be zeros too; validate_pages checks within a buffer.
                    let mut rest = Vec::new();
                    f.read_to_end(&mut rest)?;
                    if rest.iter().any(|b| *b != 0) {
                        anyhow::bail!("WAL data after an empty page");
                    }
                    return Ok(());
                }
                off += buf.len() as u64;
            }
            Ok(())
        }
        WalSegmentName::Backup(..) => Ok(()),
    }
}

/// A temporary name for `file` in `dir` that no other request uses (two requests for the
/// same file, or prefetches of the same segment, must not write into one file).
fn temp_path(dir: &Path, file: &str) -> PathBuf {
    dir.join(format!(
        "{file}.{}{PREFETCH_SUFFIX}",
        crate::storage::temp_name()
    ))
}

/// Removes a temporary file when dropped, unless it was renamed into place: every way out
/// of [`fetch_one`] (an error, a panic, the future dropped) leaves nothing behind.
struct TempFile<'a>(Option<&'a Path>);

impl Drop for TempFile<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Downloads `name` into `dest` through a temporary name, verified before the rename.
async fn fetch_one(
    store: &ObjectStore,
    keys: &KeyRing,
    name: &WalSegmentName,
    dest: &Path,
    tmp: &Path,
) -> Result<(), WalFetchError> {
    let mut guard = TempFile(Some(tmp));
    let key = wal_key(name);
    let tmp2 = tmp.to_path_buf();
    let result = download_with(store, &key, keys, move |metadata, r| {
        let mut f = std::fs::File::create(&tmp2)?;
        let n = io::copy(r, &mut f)?;
        f.flush()?;
        if let Some(expect) = metadata
            .get("original-file-size")
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|s| *s != n)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("decoded {n} bytes, metadata says {expect}"),
            ));
        }
        Ok(())
    })
    .await;
    let checked = match result {
        Ok(_) => verify(name, tmp).map_err(|e| {
            WalFetchError::failed(anyhow::anyhow!(
                "{key}: downloaded file fails verification: {e:#}"
            ))
        }),
        Err(TransferError::Storage(StorageError::NotFound { .. })) => {
            Err(WalFetchError::NotFound { key: key.clone() })
        }
        Err(e) => Err(WalFetchError::failed(
            anyhow::Error::new(e).context(format!("fetch {key}")),
        )),
    };
    checked?;
    std::fs::rename(tmp, dest).map_err(|e| {
        WalFetchError::failed(anyhow::anyhow!("rename onto {}: {e}", dest.display()))
    })?;
    guard.0 = None;
    Ok(())
}

fn prefetch_dir(output: &Path) -> PathBuf {
    output
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(PREFETCH_DIR)
}

/// Removes prefetched segments before `id` (already replayed, or of a timeline left behind)
/// and prefetches that never completed.
fn prune(dir: &Path, id: &SegmentId) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let current = id.to_string();
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        // Segment names sort by timeline then position; compare the position part.
        let older = n.len() == 24 && n[8..] < current[8..];
        if older || n.ends_with(PREFETCH_SUFFIX) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Serves `file` (PostgreSQL's %f) into `output` (%p): from the prefetch directory when there,
/// else from the archive; then fills the prefetch window of `prefetch` segments.
pub async fn restore_wal_file(
    store: &ObjectStore,
    keys: &KeyRing,
    file: &str,
    output: &Path,
    prefetch: usize,
) -> Result<Served, WalFetchError> {
    let name: WalSegmentName = file.parse().map_err(|e| {
        WalFetchError::failed(anyhow::anyhow!("{file:?} is not a WAL file name: {e}"))
    })?;
    let pdir = prefetch_dir(output);
    let out_dir = output.parent().unwrap_or_else(|| Path::new("."));
    let WalSegmentName::Segment(id) = name else {
        let tmp = temp_path(out_dir, file);
        fetch_one(store, keys, &name, output, &tmp).await?;
        return Ok(Served::Archive);
    };
    prune(&pdir, &id);
    let ready = pdir.join(file);
    let len = std::fs::metadata(&ready)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    let from_prefetch = match len.map(|_| std::fs::rename(&ready, output)) {
        Some(Ok(())) => true,
        // Another request (the API serves several) took it first: fetch it again.
        Some(Err(e)) if e.kind() == io::ErrorKind::NotFound => false,
        Some(Err(e)) => {
            return Err(WalFetchError::failed(anyhow::anyhow!(
                "rename {} onto {}: {e}",
                ready.display(),
                output.display()
            )))
        }
        None => false,
    };
    let (served, seg) = if from_prefetch {
        (Served::Prefetch, len.and_then(|l| SegmentSize::new(l).ok()))
    } else {
        let tmp = temp_path(out_dir, file);
        fetch_one(store, keys, &name, output, &tmp).await?;
        let len = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
        (Served::Archive, SegmentSize::new(len).ok())
    };
    if let (Some(seg), true) = (seg, prefetch > 0) {
        fill_prefetch(store, keys, id, seg, &pdir, prefetch, served).await;
    }
    Ok(served)
}

/// Fetches the missing segments of the window after `id` in parallel. Failures are left for
/// the request of that segment to report; a missing segment ends the window.
async fn fill_prefetch(
    store: &ObjectStore,
    keys: &KeyRing,
    id: SegmentId,
    seg: SegmentSize,
    dir: &Path,
    window: usize,
    served: Served,
) {
    let mut next = Vec::new();
    let mut at = id;
    for _ in 0..window {
        match at.next(seg) {
            Ok(n) => {
                next.push(n);
                at = n;
            }
            Err(_) => break,
        }
    }
    let present = next
        .iter()
        .take_while(|n| dir.join(n.to_string()).is_file())
        .count();
    // Served from a full enough window: no download on this request.
    if served == Served::Prefetch && present * 2 >= window {
        return;
    }
    if let Err(e) = std::fs::create_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot create the prefetch directory");
        return;
    }
    let mut set = tokio::task::JoinSet::new();
    for n in next.into_iter().skip(present) {
        let dest = dir.join(n.to_string());
        if dest.is_file() {
            continue;
        }
        let tmp = temp_path(dir, &n.to_string());
        let store = store.clone();
        let keys = keys.clone();
        set.spawn(async move {
            let name = WalSegmentName::Segment(n);
            (n, fetch_one(&store, &keys, &name, &dest, &tmp).await)
        });
    }
    while let Some(r) = set.join_next().await {
        match r {
            Ok((_, Ok(()))) => {}
            Ok((_, Err(WalFetchError::NotFound { .. }))) => {}
            Ok((n, Err(e))) => tracing::warn!(segment = %n, error = %e, "prefetch failed"),
            Err(e) => tracing::warn!(error = %e, "prefetch task failed"),
        }
    }
}
