//! A segment that has no complete object yet, served from its partial objects (issue 16;
//! layout in `daemon::partial` and docs/formats.md): the contiguous run from offset 0, each
//! object decrypted (MAC), decompressed and checked against its recorded size and hash and
//! its LSN range, written one after the other and zero-filled to the segment size; then
//! checked as any segment is (page headers, system identifier) and renamed onto `%p`.
//!
//! This is what renaming pg_receivewal's `.partial` gives PostgreSQL: replay ends at the last
//! valid record of the prefix. A standby that keeps replaying asks for the same segment again
//! (it retries the segment whose record it could not read), and is served the longer prefix
//! stored by then, or the complete segment once it is archived. Nothing assembled from parts
//! is ever kept in the prefetch directory.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use walhoard_protocol::{SegmentId, SegmentSize, WalSegmentName};

use super::wal::{temp_path, verify, TempFile, WalFetchError};
use crate::daemon::partial::{
    chain_from_zero, list_parts, open_log_record, partial_dir, record_meta, Part,
};
use crate::pipeline::encryption::KeyRing;
use crate::pipeline::transfer::{copy_checked, decode_stream, download_with, TransferError};
use crate::storage::meta::{self, ObjectMeta};
use crate::storage::{ObjectStore, StorageError};

/// Why a segment was not served from its partial objects.
#[derive(Debug)]
pub enum PartsError {
    /// No object holds the segment's first bytes: not in the archive (exit 1).
    NoChain,
    /// A listed part was gone when read (deleted because the complete segment was stored).
    Gone(String),
    /// A part is damaged or does not hold what its key says (exit 255).
    Failed(WalFetchError),
}

impl From<WalFetchError> for PartsError {
    fn from(e: WalFetchError) -> Self {
        PartsError::Failed(e)
    }
}

/// Serves segment `id` into `dest` from its partial objects.
pub async fn serve_from_parts(
    store: &ObjectStore,
    keys: &KeyRing,
    id: SegmentId,
    dest: &Path,
    system_id: Option<u64>,
) -> Result<(), PartsError> {
    let dir = partial_dir(&id);
    let listed = list_parts(store, Some(&id))
        .await
        .map_err(|e| WalFetchError::Failed(anyhow::Error::new(e).context(format!("list {dir}"))))?;
    let parts = listed.get(&id).map(Vec::as_slice).unwrap_or_default();
    let (chain, end) = chain_from_zero(parts);
    if chain.is_empty() {
        return Err(PartsError::NoChain);
    }
    let out_dir = dest.parent().unwrap_or_else(|| Path::new("."));
    let file = WalSegmentName::Segment(id).to_string();
    let tmp = temp_path(out_dir, &file);
    let _guard = TempFile::new(&tmp);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(walhoard_walreceiver::spool::FILE_MODE)
        .open(&tmp)
        .map_err(|e| WalFetchError::Failed(anyhow::anyhow!("create {}: {e}", tmp.display())))?;
    let f = std::sync::Arc::new(f);
    let sizes = fetch_parts(store, keys, id, &chain, &f).await?;
    let mut seg: Option<SegmentSize> = None;
    for (part, s) in chain.iter().zip(sizes) {
        if seg.is_some_and(|x| x != s) {
            return Err(failed(part, "its wal-segment-size differs from the other parts'").into());
        }
        seg = Some(s);
    }
    let seg = seg.expect("a chain has a part");
    if end > seg.bytes() {
        return Err(WalFetchError::Failed(anyhow::anyhow!(
            "{dir}: parts end at {end}, past the segment size {}",
            seg.bytes()
        ))
        .into());
    }
    // Zero-filled to the segment size, as PostgreSQL leaves an unfinished segment.
    f.set_len(seg.bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| WalFetchError::Failed(anyhow::anyhow!("write {}: {e}", tmp.display())))?;
    drop(f);
    verify(&WalSegmentName::Segment(id), &tmp, system_id).map_err(|e| {
        WalFetchError::Failed(anyhow::anyhow!(
            "{dir}: assembled segment fails verification: {e:#}"
        ))
    })?;
    std::fs::rename(&tmp, dest).map_err(|e| {
        WalFetchError::Failed(anyhow::anyhow!("rename onto {}: {e}", dest.display()))
    })?;
    tracing::info!(segment = %file, bytes = end, "served from partial WAL objects (zero-filled)");
    Ok(())
}

/// Parts fetched at once: a synchronous site stores one part per commit batch, thousands in a
/// segment, and one round trip at a time made a restore wait tens of seconds on S3.
const PARALLEL_PARTS: usize = 8;

/// Fetches every part of `chain` into `out` at its offset, [`PARALLEL_PARTS`] at a time;
/// returns the segment size each records, in chain order. After a failure no more are
/// started; of the failures the earliest part's is returned.
async fn fetch_parts(
    store: &ObjectStore,
    keys: &KeyRing,
    id: SegmentId,
    chain: &[&Part],
    out: &std::sync::Arc<std::fs::File>,
) -> Result<Vec<SegmentSize>, PartsError> {
    let mut results: Vec<Option<Result<SegmentSize, PartsError>>> =
        (0..chain.len()).map(|_| None).collect();
    let mut set = tokio::task::JoinSet::new();
    let mut next = 0;
    loop {
        while next < chain.len() && set.len() < PARALLEL_PARTS {
            let (store, keys, part, out) = (
                store.clone(),
                keys.clone(),
                (*chain[next]).clone(),
                out.clone(),
            );
            let i = next;
            set.spawn(async move { (i, fetch_part(&store, &keys, &id, &part, &out).await) });
            next += 1;
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let (i, r) = joined.map_err(|e| {
            WalFetchError::Failed(anyhow::anyhow!(
                "{}: fetch task failed: {e}",
                partial_dir(&id)
            ))
        })?;
        let failed = r.is_err();
        results[i] = Some(r);
        if failed {
            // No more started; those running finish (their writes land in a file that is
            // removed).
            next = chain.len();
        }
    }
    let mut sizes = Vec::with_capacity(chain.len());
    for r in results {
        match r {
            Some(Ok(s)) => sizes.push(s),
            Some(Err(e)) => return Err(e),
            // Not started after a later part failed: that failure is returned below.
            None => {}
        }
    }
    if sizes.len() < chain.len() {
        return Err(WalFetchError::Failed(anyhow::anyhow!(
            "{}: not every part was fetched",
            partial_dir(&id)
        ))
        .into());
    }
    Ok(sizes)
}

fn failed(part: &Part, why: impl std::fmt::Display) -> WalFetchError {
    WalFetchError::Failed(anyhow::anyhow!("{}: {why}", part.label()))
}

/// Writes `part`'s checked plaintext into `out` at the part's offset; returns the segment
/// size it records.
async fn fetch_part(
    store: &ObjectStore,
    keys: &KeyRing,
    id: &SegmentId,
    part: &Part,
    out: &std::sync::Arc<std::fs::File>,
) -> Result<SegmentSize, PartsError> {
    let w = WriteAt {
        file: out.clone(),
        pos: part.range.from,
    };
    read_part(store, keys, id, part, w).await.map(|(s, _)| s)
}

/// Reads `part` into `out` through every check: decrypted (MAC), decompressed, its plain
/// size and hash as its metadata records them, as many bytes as its key says, and the LSN
/// range and segment size its metadata records matching its key. Returns the segment size
/// and `out`. `walhoard verify` reads parts with it too.
pub async fn read_part<W: Write + Send + 'static>(
    store: &ObjectStore,
    keys: &KeyRing,
    id: &SegmentId,
    part: &Part,
    mut out: W,
) -> Result<(SegmentSize, W), PartsError> {
    let expect = part.range.bytes();
    if part.record.is_some() {
        return read_log_part(store, keys, id, part, out).await;
    }
    let fetched = download_with(store, &part.key, keys, move |metadata, r| {
        let mut buf = io::BufWriter::new(&mut out);
        let n = copy_checked(metadata, r, &mut buf)?;
        buf.flush()?;
        drop(buf);
        if n != expect {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("holds {n} bytes, its key says {expect}"),
            ));
        }
        Ok(out)
    })
    .await;
    let (metadata, out) = match fetched {
        Ok(x) => x,
        // Listed a moment ago: gone now means it was deleted under us (its segment was just
        // archived complete); the caller fetches the complete segment instead.
        Err(TransferError::Storage(StorageError::NotFound { key })) => {
            return Err(PartsError::Gone(key))
        }
        Err(e) => return Err(failed(part, e).into()),
    };
    Ok((check_range(&metadata, id, part)?, out))
}

/// [`read_part`] of a record of a part log (`daemon::partial::log`): the record read again
/// (bounds, CRC), its metadata parsed, its stored bytes decrypted and decompressed and
/// checked exactly as an object's.
async fn read_log_part<W: Write + Send + 'static>(
    store: &ObjectStore,
    keys: &KeyRing,
    id: &SegmentId,
    part: &Part,
    mut out: W,
) -> Result<(SegmentSize, W), PartsError> {
    let mut rec = match open_log_record(store, part).await {
        Ok(r) => r,
        Err(StorageError::NotFound { key }) => return Err(PartsError::Gone(key)),
        Err(e) => return Err(failed(part, e).into()),
    };
    let metadata = record_meta(part, &rec.meta).map_err(|e| failed(part, e))?;
    let (label, keys, m) = (part.label(), keys.clone(), metadata.clone());
    let expect = part.range.bytes();
    let decoded = tokio::task::spawn_blocking(move || {
        decode_stream(&label, &m, &mut rec.stored, &keys, |metadata, r| {
            let mut buf = io::BufWriter::new(&mut out);
            let n = copy_checked(metadata, r, &mut buf)?;
            buf.flush()?;
            drop(buf);
            if n != expect {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("holds {n} bytes, its offsets say {expect}"),
                ));
            }
            Ok(())
        })?;
        // To the record's end, where its CRC is checked (a decoder may stop at its frame's).
        io::copy(&mut rec.stored, &mut io::sink())
            .map_err(|e| TransferError::Object {
                key: label,
                message: e.to_string(),
            })
            .map(|_| out)
    })
    .await
    .map_err(|e| failed(part, format!("decode thread failed: {e}")))?;
    let out = decoded.map_err(|e| failed(part, e))?;
    Ok((check_range(&metadata, id, part)?, out))
}

/// Writes at its own position in a shared file (parts are fetched concurrently; a cloned
/// descriptor would share one file offset).
struct WriteAt {
    file: std::sync::Arc<std::fs::File>,
    pos: u64,
}

impl Write for WriteAt {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.write_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The LSN range and segment size a part's metadata records must be the ones its key names.
fn check_range(m: &ObjectMeta, id: &SegmentId, part: &Part) -> Result<SegmentSize, WalFetchError> {
    let seg = m
        .wal_segment_size
        .and_then(|s| SegmentSize::new(s).ok())
        .ok_or_else(|| {
            failed(
                part,
                format!("no valid {} metadata", meta::WAL_SEGMENT_SIZE),
            )
        })?;
    let start = id
        .start_lsn(seg)
        .map_err(|e| failed(part, format!("segment start: {e}")))?;
    for (name, got, want) in [
        (meta::START_LSN, m.start_lsn, start + part.range.from),
        (meta::END_LSN, m.end_lsn, start + part.range.to),
    ] {
        if got != Some(want) {
            return Err(failed(
                part,
                format!("its {name} is {got:?}, its key says {want}"),
            ));
        }
    }
    Ok(seg)
}
