//! Back out of the archive: fetch → decrypt → decompress → verify.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{io_at, BlockingChannelReader, TransferError, PIPE_CHUNK, QUEUE_CHUNKS};
use crate::pipeline::compression::{Algorithm, Decompressor};
use crate::pipeline::encryption::{read_full, Decryptor, KeyRing};
use crate::pipeline::hash::StoredSha256;
use crate::pipeline::pghoa1;
use crate::storage::meta::{EncryptionFormat, ObjectMeta};
use crate::storage::{ObjectStore, StorageError};

/// thread) as they arrive, without a temporary copy: tar extraction reads chunks this way.
/// `consume` gets the object's metadata first. What `consume` returns is returned once the
/// fetch completed too; when both failed, the cause is reported (a failed fetch is forwarded to
/// the reader, a reader that gave up makes the fetch fail with BrokenPipe). A missing object is
/// `TransferError::Storage(StorageError::NotFound)`, before `consume` is called. A pghoard
/// `pghoa1` object is fetched twice: the first read checks its MAC, and `consume` gets the
/// plaintext of the second ([`pghoa1`]).
/// Fetches `key` and hands its decrypted, decompressed bytes to `consume` (on a blocking
pub async fn download_with<T, F>(
    store: &ObjectStore,
    key: &str,
    keys: &KeyRing,
    consume: F,
) -> Result<(ObjectMeta, T), TransferError>
where
    T: Send + 'static,
    F: FnOnce(&ObjectMeta, &mut dyn Read) -> io::Result<T> + Send + 'static,
{
    let (stored, size) = store.metadata_and_size(key).await?;
    let metadata = ObjectMeta::parse(key, &stored)?;
    let bad = |m: String| TransferError::Object {
        key: key.to_string(),
        message: m,
    };
    let (algorithm, encrypted) = decoding(key, &metadata, keys)?;
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(QUEUE_CHUNKS);
    // A pghoard `pghoa1` object is read twice (its MAC is checked before it is decrypted):
    // the reading side asks for the second read by sending a new channel.
    let (again_tx, again_rx) = tokio::sync::oneshot::channel::<mpsc::Sender<io::Result<Bytes>>>();
    let keys = keys.clone();
    let meta2 = metadata.clone();
    let cpu = tokio::task::spawn_blocking(move || -> io::Result<T> {
        let input = BlockingChannelReader {
            rx,
            current: Bytes::new(),
        };
        let reread = move || {
            let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
            again_tx
                .send(tx)
                .map_err(|_| io::Error::other("the second read was not started"))?;
            Ok(BlockingChannelReader {
                rx,
                current: Bytes::new(),
            })
        };
        let plain: Box<dyn Read> = if encrypted {
            decrypting(input, &meta2, &keys, reread)?
        } else {
            drop(reread);
            match &meta2.stored_sha256 {
                Some(expected) => Box::new(StoredSha256::new(input, expected)),
                None => Box::new(input),
            }
        };
        let mut d = Decompressor::new(plain, algorithm)?;
        consume(&meta2, &mut d)
    });
    let fetched = store.get_to_channel(key, size, tx).await;
    let fetched = match again_rx.await {
        // The object was there for the first read: gone now is a failure, not "not found"
        // (which restore_command answers as the end of the archive).
        Ok(tx) if fetched.is_ok() => {
            store
                .get_to_channel(key, size, tx)
                .await
                .map_err(|e| match e {
                    StorageError::NotFound { key } => StorageError::Io {
                        action: "read again",
                        key,
                        source: io::Error::other(
                            "the object disappeared after its MAC was checked",
                        ),
                    },
                    other => other,
                })
        }
        _ => fetched,
    };
    let decoded = cpu
        .await
        .map_err(|e| bad(format!("pipeline thread failed: {e}")))?;
    let reader_gone = |e: &crate::storage::StorageError| matches!(e, crate::storage::StorageError::Io { source, .. } if source.kind() == io::ErrorKind::BrokenPipe);
    match (fetched, decoded) {
        (Ok(_), Ok(v)) => Ok((metadata, v)),
        (Err(f), Err(d)) if reader_gone(&f) => Err(bad(format!("cannot decode: {d}"))),
        (Err(f), _) => Err(f.into()),
        (Ok(_), Err(d)) => Err(bad(format!("cannot decode: {d}"))),
    }
}

/// How an object with `metadata` is decoded: its compression and whether it is encrypted.
/// Refuses an unencrypted object when the site encrypts.
fn decoding(
    key: &str,
    metadata: &ObjectMeta,
    keys: &KeyRing,
) -> Result<(Algorithm, bool), TransferError> {
    let bad = |m: String| TransferError::Object {
        key: key.to_string(),
        message: m,
    };
    let algorithm: Algorithm = metadata
        .compression_algorithm
        .ok_or_else(|| bad("no compression-algorithm metadata".into()))?;
    let encrypted = metadata.encryption_key_id.is_some();
    if !encrypted && keys.requires_encrypted() {
        // A downgrade: whoever can write the bucket can store plaintext with a sidecar that
        // simply omits the key id, and it would be restored as if it were ours.
        return Err(bad(
            "stored without encryption (its metadata names no encryption-key-id), but the site \
             encrypts its backups: refused; set the site's allow_unencrypted_objects to true \
             to restore objects written before encryption was turned on"
                .into(),
        ));
    }
    Ok((algorithm, encrypted))
}

/// [`download_with`] of stored bytes read from `stored` with their metadata already known
/// (a record of a synchronous site's part log, `daemon::partial::log`), on the caller's
/// (blocking) thread: decrypted (walhoard's `walhenc1` only: a part log never holds
/// pghoard's objects) and decompressed into `consume`, with the same refusals. `name` names
/// it in errors.
pub fn decode_stream<T>(
    name: &str,
    metadata: &ObjectMeta,
    stored: impl Read,
    keys: &KeyRing,
    consume: impl FnOnce(&ObjectMeta, &mut dyn Read) -> io::Result<T>,
) -> Result<T, TransferError> {
    let (algorithm, encrypted) = decoding(name, metadata, keys)?;
    let bad = |m: String| TransferError::Object {
        key: name.to_string(),
        message: m,
    };
    let run = || -> io::Result<T> {
        let plain: Box<dyn Read + '_> = if encrypted {
            if metadata.encryption_format != Some(EncryptionFormat::Walhenc1) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "encrypted, but not labelled encryption-format walhenc1",
                ));
            }
            Box::new(Decryptor::new(stored, keys)?)
        } else {
            match &metadata.stored_sha256 {
                Some(expected) => Box::new(StoredSha256::new(stored, expected)),
                None => Box::new(stored),
            }
        };
        let mut d = Decompressor::new(plain, algorithm)?;
        consume(metadata, &mut d)
    };
    run().map_err(|e| bad(format!("cannot decode: {e}")))
}

/// The plaintext of an encrypted object: walhoard's `walhenc1` ([`Decryptor`]) or pghoard's
/// `pghoa1` ([`pghoa1`]), told apart by their magic. A `pghoa1` object is read to its
/// end and its MAC checked first; `reread` then gives a second read of it to decrypt. An
/// empty object is pghoard's encryption of an empty file (walhoard's objects never are).
fn decrypting<R: Read + 'static>(
    mut input: BlockingChannelReader,
    metadata: &ObjectMeta,
    keys: &KeyRing,
    reread: impl FnOnce() -> io::Result<R>,
) -> io::Result<Box<dyn Read>> {
    let mut head = [0u8; 8];
    let n = read_full(&mut input, &mut head)?;
    let head = &head[..n];
    let m = n.min(pghoa1::MAGIC.len());
    let labelled_walhenc1 = metadata.encryption_format == Some(EncryptionFormat::Walhenc1);
    let is_pghoa1 = head[..m] == pghoa1::MAGIC[..m] && !(n == 0 && labelled_walhenc1);
    if !is_pghoa1 {
        return Ok(Box::new(Decryptor::new(
            io::Cursor::new(head.to_vec()).chain(input),
            keys,
        )?));
    }
    if labelled_walhenc1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "labelled encryption-format walhenc1 but holds a pghoard pghoa1 object",
        ));
    }
    let key_id = metadata.encryption_key_id.as_deref();
    let private = pghoa1::key_for(keys, key_id)?;
    match pghoa1::verify(head, input, private, key_id.unwrap_or_default())? {
        None => Ok(Box::new(io::empty())),
        Some(verified) => Ok(Box::new(pghoa1::Pghoa1Decryptor::new(verified, reread()?)?)),
    }
}

/// Copies an object's decoded bytes from `d` into `out`, then checks them against what its
/// metadata records: `original-file-size`, and `hash` with `hash-algorithm` (SHA-1 when that
/// is absent: objects from before pghoard's setting). Call it before anything is renamed
/// where it is used. Returns the size.
pub fn copy_checked(
    metadata: &ObjectMeta,
    d: &mut dyn Read,
    out: &mut dyn Write,
) -> io::Result<u64> {
    let hash_algorithm = metadata.hash_algorithm_or_default();
    let mut hash = hash_algorithm.hasher();
    let mut buf = vec![0u8; PIPE_CHUNK];
    let mut size = 0u64;
    loop {
        let n = match d.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hash.update(&buf[..n]);
        size += n as u64;
        out.write_all(&buf[..n])?;
    }
    out.flush()?;
    if let Some(expect) = metadata.original_file_size.filter(|s| *s != size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("decoded {size} bytes, metadata says {expect}"),
        ));
    }
    let hash = hash.finish_hex();
    if let Some(recorded) = metadata
        .hash
        .as_ref()
        .filter(|h| !h.eq_ignore_ascii_case(&hash))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{hash_algorithm} {hash} does not match the recorded hash {recorded}"),
        ));
    }
    Ok(size)
}

/// Fetches `key`, decrypts and decompresses it into `target` (written to a temporary name and
/// renamed only after the size and hash in the metadata matched). Returns the metadata.
pub async fn download_file(
    store: &ObjectStore,
    key: &str,
    target: &Path,
    keys: &KeyRing,
) -> Result<ObjectMeta, TransferError> {
    let tmp: PathBuf = target.with_file_name(format!(
        ".{}.walhoard-tmp",
        target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("download")
    ));
    let tmp2 = tmp.clone();
    let result = download_with(store, key, keys, move |metadata, d| {
        let mut out = io::BufWriter::new(std::fs::File::create(&tmp2)?);
        copy_checked(metadata, d, &mut out)?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    })
    .await;
    match result {
        Ok((metadata, ())) => {
            std::fs::rename(&tmp, target).map_err(io_at("rename into", target))?;
            Ok(metadata)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}
