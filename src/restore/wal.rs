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

use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use walhoard_protocol::xlog::{major_for_page_magic, validate_pages, PageExpectation};
use walhoard_protocol::{SegmentId, SegmentSize, TimelineHistory, WalSegmentName, XLogPageHeader};

use crate::daemon::archiver::wal_key;
use crate::pipeline::encryption::KeyRing;
use crate::pipeline::transfer::{copy_checked, download_with, TransferError};
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
    /// Assembled from partial objects, zero-filled (the segment is not complete yet).
    Partial,
}

/// The system identifier of the cluster being restored: the first field of
/// `ControlFileData` (`system_identifier`, in the server's byte order) in `global/pg_control`
/// of the data directory that holds `output`. PostgreSQL passes %p as `pg_wal/<file>` and runs
/// restore_command in the data directory; the daemon's API gets the same path. `None` when
/// there is no pg_control there (a file fetched into a bare directory): nothing to compare.
pub fn expected_system_id(output: &Path) -> Option<u64> {
    let data_dir = output.parent()?.parent()?;
    let path = data_dir.join("global").join("pg_control");
    match std::fs::File::open(&path).and_then(|mut f| {
        let mut id = [0u8; 8];
        f.read_exact(&mut id).map(|()| id)
    }) {
        Ok(id) => Some(u64::from_ne_bytes(id)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the cluster's system identifier; segments are not checked against it");
            None
        }
    }
}

/// Checks a downloaded WAL file before PostgreSQL sees it: page headers against the segment's
/// address and timeline, and the long header's system identifier against `system_id` (the
/// cluster being restored), so that a segment of another cluster is never served.
pub(super) fn verify(
    name: &WalSegmentName,
    path: &Path,
    system_id: Option<u64>,
) -> anyhow::Result<()> {
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
                            system_id,
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
pub(super) fn temp_path(dir: &Path, file: &str) -> PathBuf {
    dir.join(format!(
        "{file}.{}{PREFETCH_SUFFIX}",
        crate::durable::temp_name()
    ))
}

/// Removes a temporary file when dropped, unless it was renamed into place: every way out
/// of [`fetch_one`] (an error, a panic, the future dropped) leaves nothing behind.
pub(super) struct TempFile<'a>(Option<&'a Path>);

impl<'a> TempFile<'a> {
    pub(super) fn new(path: &'a Path) -> Self {
        TempFile(Some(path))
    }
}

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
    system_id: Option<u64>,
) -> Result<(), WalFetchError> {
    let mut guard = TempFile(Some(tmp));
    let key = wal_key(name);
    let tmp2 = tmp.to_path_buf();
    let result = download_with(store, &key, keys, move |metadata, r| {
        // Plaintext WAL, like the spool's: private to PostgreSQL's user.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(walhoard_walreceiver::spool::FILE_MODE)
            .open(&tmp2)?;
        // Size and the recorded hash, before the file is looked at.
        copy_checked(metadata, r, &mut io::BufWriter::new(&mut f))?;
        Ok(())
    })
    .await;
    let checked = match result {
        Ok(_) => verify(name, tmp, system_id).map_err(|e| {
            WalFetchError::failed(anyhow::anyhow!(
                "{key}: downloaded file fails verification: {e:#}"
            ))
        }),
        // "Not found" ends PostgreSQL's archive recovery: only when it is the truth.
        Err(TransferError::Storage(StorageError::NotFound { .. })) => {
            match store.confirm_absent(&key).await {
                Ok(()) => Err(WalFetchError::NotFound { key: key.clone() }),
                Err(e) => Err(WalFetchError::failed(
                    anyhow::Error::new(e).context(format!("fetch {key}")),
                )),
            }
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
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        // Segment names sort by timeline then position; compare the position (a file name
        // that is no segment's, whatever its bytes, is left alone).
        let older = matches!(
            n.parse::<WalSegmentName>(),
            Ok(WalSegmentName::Segment(s)) if (s.log, s.seg) < (id.log, id.seg)
        );
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
    let system_id = expected_system_id(output);
    let WalSegmentName::Segment(id) = name else {
        let tmp = temp_path(out_dir, file);
        fetch_one(store, keys, &name, output, &tmp, system_id).await?;
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
        match fetch_one(store, keys, &name, output, &tmp, system_id).await {
            Ok(()) => {}
            // No complete object: the partial objects of the segment being received (issue
            // 16). Nothing is prefetched after a segment served from them.
            Err(WalFetchError::NotFound { key }) => {
                return serve_partial(store, keys, id, output, &tmp, system_id, key).await;
            }
            Err(e) => return Err(e),
        }
        let len = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
        (Served::Archive, SegmentSize::new(len).ok())
    };
    if let (Some(seg), true) = (seg, prefetch > 0) {
        let src = Source {
            store: store.clone(),
            keys: keys.clone(),
            system_id,
        };
        fill_prefetch(src, id, seg, &pdir, prefetch, served).await;
    }
    Ok(served)
}

/// Segment `id` from its partial objects, when it has no complete object (`missing`, the
/// complete object's key). Parts deleted under us mean the complete object was just stored:
/// it is fetched once more.
async fn serve_partial(
    store: &ObjectStore,
    keys: &KeyRing,
    id: SegmentId,
    output: &Path,
    tmp: &Path,
    system_id: Option<u64>,
    missing: String,
) -> Result<Served, WalFetchError> {
    use super::partial::{serve_from_parts, PartsError};
    match serve_from_parts(store, keys, id, output, system_id).await {
        Ok(()) => Ok(Served::Partial),
        Err(PartsError::NoChain) => Err(WalFetchError::NotFound { key: missing }),
        Err(PartsError::Gone(part)) => {
            let name = WalSegmentName::Segment(id);
            fetch_one(store, keys, &name, output, tmp, system_id)
                .await
                .map_err(|e| {
                    WalFetchError::failed(anyhow::anyhow!(
                        "{part} disappeared while being read, and the complete segment: {e}"
                    ))
                })?;
            Ok(Served::Archive)
        }
        Err(PartsError::Failed(e)) => Err(e),
    }
}

/// [`restore_wal_file`] over a site and its `moved_from` sites, in order, as pghoard's
/// webserver searches them (`get_wal_or_timeline_file`): the first that has `file` serves it;
/// "not found" only when every site that holds anything answered so; any other failure stops
/// the search. A site that holds nothing at all (the new site right after a move) is passed
/// over when another one is searched; alone it fails as any empty site does.
pub async fn restore_wal_file_from(
    sources: &[(&ObjectStore, &KeyRing)],
    file: &str,
    output: &Path,
    prefetch: usize,
) -> Result<Served, WalFetchError> {
    let mut not_found = None;
    let mut empty = None;
    for (store, keys) in sources {
        match restore_wal_file(store, keys, file, output, prefetch).await {
            Err(e @ WalFetchError::NotFound { .. }) => not_found = Some(e),
            Err(e) if sources.len() > 1 && holds_nothing(store).await => {
                empty.get_or_insert(e);
            }
            other => return other,
        }
    }
    match (not_found, empty) {
        (Some(e), _) | (None, Some(e)) => Err(e),
        (None, None) => Err(WalFetchError::failed(anyhow::anyhow!(
            "{file}: no site to search"
        ))),
    }
}

/// Whether a site's prefix holds no basebackup, history file or WAL at all (a listing error
/// counts as holding something: the failure stands).
async fn holds_nothing(store: &ObjectStore) -> bool {
    for dir in ["basebackup", "timeline", "xlog"] {
        match store.list(dir).await {
            Ok(l) if l.is_empty() => {}
            _ => return false,
        }
    }
    true
}

/// Where prefetched segments come from, and the system identifier they must carry.
#[derive(Clone)]
struct Source {
    store: ObjectStore,
    keys: KeyRing,
    system_id: Option<u64>,
}

/// Fetches the missing segments of the window after `id` in parallel (each checked as the
/// requested one is). Failures are left for
/// the request of that segment to report; a missing segment ends the window.
async fn fill_prefetch(
    src: Source,
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
    if let Err(e) = walhoard_walreceiver::spool::create_private_dir(dir) {
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
        let src = src.clone();
        set.spawn(async move {
            let name = WalSegmentName::Segment(n);
            let r = fetch_one(&src.store, &src.keys, &name, &dest, &tmp, src.system_id);
            (n, r.await)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_survives_a_file_name_whose_utf8_straddles_byte_8() {
        // "é" takes bytes 7 and 8: slicing the name at byte 8 panicked (exit 101, which
        // PostgreSQL reads as "not found").
        let dir = tempfile::tempdir().unwrap();
        let odd = "0000000\u{e9}000000000000000";
        assert_eq!(odd.len(), 24);
        std::fs::write(dir.path().join(odd), b"x").unwrap();
        let old = "000000010000000000000002";
        let kept = "000000010000000000000009";
        std::fs::write(dir.path().join(old), b"x").unwrap();
        std::fs::write(dir.path().join(kept), b"x").unwrap();
        let id = match "000000010000000000000005".parse::<WalSegmentName>() {
            Ok(WalSegmentName::Segment(id)) => id,
            other => panic!("{other:?}"),
        };
        prune(dir.path(), &id);
        assert!(dir.path().join(odd).exists(), "not a segment: left alone");
        assert!(!dir.path().join(old).exists(), "an older segment is pruned");
        assert!(dir.path().join(kept).exists(), "a later segment is kept");
    }
}
