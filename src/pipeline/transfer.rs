//! One file into the archive and back: compress → encrypt → store, and fetch → decrypt →
//! decompress → verify. CPU work runs on a blocking thread, I/O on the async side; between
//! them a bounded channel of chunks, so memory is `QUEUE_CHUNKS` × chunk size whatever the
//! object size.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use aws_lc_rs::digest;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::compression::{zstd_checksum, Algorithm, CompressionSettings, Compressor, Decompressor};
use super::encryption::{read_full, Decryptor, Encryptor, KeyRing, PublicKey, DEFAULT_CHUNK_SIZE};
use super::hash::{HashAlgorithm, StoredSha256};
use super::pghoa1;
use crate::storage::meta;
use crate::storage::{Metadata, ObjectStore, StorageError, DIRECT_ALIGN};

const QUEUE_CHUNKS: usize = 4;

/// Output buffers of one-shot zstd compression and encryption ([`upload_bytes`]), reused. A
/// compression worker holds one or two (compressed, then sealed; the compressed one is back
/// once sealed), and an upload holds its object's until the store has it, so there are never
/// more than workers + uploads in flight. A fresh
/// `compress_bound`-sized allocation per segment made glibc keep freed 16 MiB blocks, each
/// touched in other places, and the daemon's RSS grew (docs/benchmarks.md). A buffer taken
/// with [`OutputPool::take_aligned`] starts its content at a [`DIRECT_ALIGN`] boundary, so
/// that local storage can write it with `O_DIRECT` ([`ObjectStore::put_whole`]).
static ONE_SHOT_OUTPUT: OutputPool = OutputPool(std::sync::Mutex::new(Vec::new()));

struct OutputPool(std::sync::Mutex<Vec<Vec<u8>>>);

impl OutputPool {
    /// An empty buffer with room for `capacity` bytes, aligned or not (every buffer gets the
    /// same capacity, room for the alignment included, so that none ever grows).
    fn take(&'static self, capacity: usize) -> PooledOutput {
        let mut v = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        v.clear();
        v.reserve(capacity + DIRECT_ALIGN);
        PooledOutput {
            buf: v,
            start: 0,
            pool: self,
        }
    }

    /// A buffer whose content (what is written into it from now on) starts at an address
    /// that is a multiple of [`DIRECT_ALIGN`].
    fn take_aligned(&'static self, capacity: usize) -> PooledOutput {
        let mut out = self.take(capacity);
        let pad = out.buf.as_ptr().align_offset(DIRECT_ALIGN);
        out.buf.resize(pad, 0);
        out.start = pad;
        out
    }
}

/// A pooled buffer. Writers append to `buf` (through `DerefMut`); the content is
/// `buf[start..]`.
struct PooledOutput {
    buf: Vec<u8>,
    start: usize,
    pool: &'static OutputPool,
}

impl AsRef<[u8]> for PooledOutput {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl std::ops::Deref for PooledOutput {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.buf
    }
}

impl std::ops::DerefMut for PooledOutput {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl Drop for PooledOutput {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.buf);
        self.pool
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(v);
    }
}
const PIPE_CHUNK: usize = 1024 * 1024;

/// Encryption for uploads: the site's key id and public key.
#[derive(Debug, Clone)]
pub struct UploadEncryption {
    pub key_id: String,
    pub public: PublicKey,
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("object {key}: {message}")]
    Object { key: String, message: String },
}

impl TransferError {
    /// The store has no room: retrying helps once space is freed, not sooner.
    pub fn is_out_of_space(&self) -> bool {
        matches!(self, TransferError::Storage(s) if s.is_out_of_space())
    }
}

/// Only the store's own failures can pass by themselves; a local file that cannot be read or
/// an object that does not decode stays so.
impl crate::storage::retry::Transient for TransferError {
    fn is_transient(&self) -> bool {
        matches!(self, TransferError::Storage(s) if s.is_transient())
    }
}

/// Sync writer side of the pipe: chunks go to the async side.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = Bytes::from(std::mem::replace(
                &mut self.buf,
                Vec::with_capacity(PIPE_CHUNK),
            ));
            self.tx
                .blocking_send(Ok(chunk))
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "upload stopped"))?;
        }
        Ok(())
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(PIPE_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PIPE_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Sync reader over chunks fetched by the async side.
struct BlockingChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for BlockingChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

fn io_at<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TransferError + 'a {
    move |source| TransferError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

/// How the stored bytes were made: `compression-algorithm`, and the encryption key and format.
fn record_codec(
    metadata: &mut Metadata,
    compression: CompressionSettings,
    encryption: Option<&UploadEncryption>,
) {
    metadata.insert(
        meta::COMPRESSION_ALGORITHM.into(),
        compression.algorithm.name().into(),
    );
    if let Some(e) = encryption {
        metadata.insert(meta::ENCRYPTION_KEY_ID.into(), e.key_id.clone());
        metadata.insert(meta::ENCRYPTION_FORMAT.into(), "walhenc1".into());
    }
}

/// pghoard's metadata of the plaintext: `original-file-size`, `hash`, `hash-algorithm`.
fn record_plain(metadata: &mut Metadata, size: u64, hash: String, algorithm: HashAlgorithm) {
    metadata.insert(meta::ORIGINAL_FILE_SIZE.into(), size.to_string());
    metadata.insert(meta::HASH.into(), hash);
    metadata.insert(meta::HASH_ALGORITHM.into(), algorithm.name().into());
}

/// What [`upload_file`] and [`upload_bytes`] stored: the metadata, and the sizes the metrics
/// report (`pghoard.upload_size`, `compressed_size_ratio`).
#[derive(Debug, Clone)]
pub struct Stored {
    pub metadata: Metadata,
    /// Bytes read from the input.
    pub plain_size: u64,
    /// Bytes of the object (compressed, encrypted).
    pub stored_size: u64,
}

/// Compresses (and encrypts) `path` into `key`. Records pghoard's metadata: compression
/// algorithm, encryption key id, original size, `hash` of the plaintext with `hash-algorithm`.
pub async fn upload_file(
    store: &ObjectStore,
    key: &str,
    path: &Path,
    compression: CompressionSettings,
    encryption: Option<UploadEncryption>,
    hash_algorithm: HashAlgorithm,
    mut metadata: Metadata,
) -> Result<Stored, TransferError> {
    // Size and hash travel as metadata, which S3-likes take only at the start of an upload:
    // a first pass over the (local, usually cached) file computes them.
    let p = path.to_path_buf();
    let (expect_size, hash) = tokio::task::spawn_blocking(move || -> io::Result<(u64, String)> {
        let mut f = std::fs::File::open(&p)?;
        let mut hash = hash_algorithm.hasher();
        let mut buf = vec![0u8; PIPE_CHUNK];
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok((size, hash.finish_hex()));
            }
            hash.update(&buf[..n]);
            size += n as u64;
        }
    })
    .await
    .map_err(|e| TransferError::Object {
        key: key.into(),
        message: format!("hash thread failed: {e}"),
    })?
    .map_err(io_at("read", path))?;
    let file = std::fs::File::open(path).map_err(io_at("open", path))?;
    record_plain(&mut metadata, expect_size, hash, hash_algorithm);
    let src = path.to_path_buf();
    // The hash is already in the metadata: hashing the bytes again on their way into the
    // compressor cost as much CPU as a fifth of the whole WAL drain (docs/benchmarks.md).
    let uploaded = upload_stream(
        store,
        key,
        compression,
        Input::Plain,
        encryption,
        metadata,
        Digest::Recorded,
        move |w| {
            let mut input = io::BufReader::with_capacity(PIPE_CHUNK, file);
            let size = io::copy(&mut input, w)?;
            if size != expect_size {
                return Err(io::Error::other(format!(
                    "{}: file changed while being archived ({expect_size} then {size} bytes)",
                    src.display()
                )));
            }
            Ok(())
        },
    )
    .await?;
    Ok(Stored {
        plain_size: expect_size,
        stored_size: uploaded.stored_size,
        metadata: uploaded.metadata,
    })
}

/// Compresses (and encrypts) `data`, a whole file already in memory (a WAL segment the
/// receiver handed on in its buffer), into `key`, with the same metadata as [`upload_file`]:
/// no read of the spool file at all. zstd compresses the buffer in one call, which is faster
/// than the streaming encoder (it works on one contiguous input instead of copying it into a
/// window: docs/benchmarks.md); the frame is an ordinary zstd frame, with a checksum when the
/// object is not encrypted ([`zstd_checksum`]).
pub async fn upload_bytes<D>(
    store: &ObjectStore,
    key: &str,
    data: D,
    compression: CompressionSettings,
    encryption: Option<UploadEncryption>,
    hash_algorithm: HashAlgorithm,
    mut metadata: Metadata,
) -> Result<Stored, TransferError>
where
    D: AsRef<[u8]> + Send + Sync + 'static,
{
    if compression.algorithm == Algorithm::Zstd && compression.threads == 0 {
        // One worker hashes, compresses and encrypts the whole file into pooled buffers, and
        // the store gets the finished object in one piece: no channel, no chunk allocations,
        // one hand-off to a blocking thread instead of three. Those hand-offs and the page
        // faults of fresh chunk buffers cost a tenth of the WAL drain's CPU on a saturated
        // two-core machine (docs/benchmarks.md).
        let size = data.as_ref().len() as u64;
        let worker = super::cpu::worker().await;
        let enc = encryption.clone();
        let (hash, object) = tokio::task::spawn_blocking(move || {
            let _worker = worker;
            one_shot_object(data.as_ref(), compression, enc.as_ref(), hash_algorithm)
        })
        .await
        .map_err(|e| TransferError::Object {
            key: key.into(),
            message: format!("compression thread failed: {e}"),
        })?
        .map_err(|e| TransferError::Object {
            key: key.into(),
            message: e.to_string(),
        })?;
        record_plain(&mut metadata, size, hash, hash_algorithm);
        record_codec(&mut metadata, compression, encryption.as_ref());
        let stored_size = object.as_ref().len() as u64;
        store
            .put_whole(key, Bytes::from_owner(object), &metadata)
            .await?;
        return Ok(Stored {
            metadata,
            plain_size: size,
            stored_size,
        });
    }
    let data = std::sync::Arc::new(data);
    let input = data.clone();
    let worker = super::cpu::worker().await;
    let hash = tokio::task::spawn_blocking(move || {
        let _worker = worker;
        let mut hash = hash_algorithm.hasher();
        hash.update((*input).as_ref());
        hash.finish_hex()
    })
    .await
    .map_err(|e| TransferError::Object {
        key: key.into(),
        message: format!("hash thread failed: {e}"),
    })?;
    let plain_size = (*data).as_ref().len() as u64;
    record_plain(&mut metadata, plain_size, hash, hash_algorithm);
    let uploaded = upload_stream(
        store,
        key,
        compression,
        Input::Plain,
        encryption,
        metadata,
        Digest::Recorded,
        move |w| w.write_all((*data).as_ref()),
    )
    .await?;
    Ok(Stored {
        plain_size,
        stored_size: uploaded.stored_size,
        metadata: uploaded.metadata,
    })
}

/// The CPU work of one WAL segment's upload from memory ([`upload_bytes`] with single-threaded
/// zstd): the plaintext hash (hex), and the stored object, compressed in one zstd call (level
/// `compression.level`; a checksum unless encrypted) and sealed when `encryption` is given.
/// Public so that `benches/drain_floor.rs` measures exactly what the daemon does.
pub fn one_shot_object(
    plain: &[u8],
    compression: CompressionSettings,
    encryption: Option<&UploadEncryption>,
    hash_algorithm: HashAlgorithm,
) -> io::Result<(String, impl AsRef<[u8]> + Send + Sync + 'static)> {
    let mut hash = hash_algorithm.hasher();
    hash.update(plain);
    // Both buffers of one capacity, so that a pooled one never needs to grow (a realloc of a
    // buffer this size is a fresh mapping, page faults and all). The sealed object is the
    // compressed one, a header (a wrapped key) and a tag per chunk longer.
    let capacity =
        zstd::zstd_safe::compress_bound(plain.len()) + plain.len() / DEFAULT_CHUNK_SIZE * 16 + 8192;
    let mut compressed = ONE_SHOT_OUTPUT.take(capacity);
    let mut c = zstd::bulk::Compressor::new(compression.level)?;
    c.include_checksum(zstd_checksum(encryption.is_some()))?;
    c.compress_to_buffer(plain, &mut *compressed)?;
    let object = match encryption {
        None => compressed,
        Some(e) => {
            let mut sealed = ONE_SHOT_OUTPUT.take_aligned(capacity);
            let mut w = Encryptor::new(&mut *sealed, &e.public, &e.key_id, DEFAULT_CHUNK_SIZE)?;
            w.write_all(compressed.as_ref())?;
            w.finish()?;
            sealed
        }
    };
    Ok((hash.finish_hex(), object))
}

/// What [`upload_produced`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// Plain bytes the producer wrote.
    pub plain_size: u64,
    /// Bytes stored (compressed, encrypted).
    pub stored_size: u64,
    /// SHA-1 of the plain bytes, hex.
    pub sha1: String,
    /// The object metadata stored with it.
    pub metadata: Metadata,
}

/// Counts (and, when asked, hashes) the plain bytes on their way into the compressor.
struct Hashing<'a> {
    inner: &'a mut dyn Write,
    hash: Option<digest::Context>,
    size: u64,
}

impl Write for Hashing<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        if let Some(h) = self.hash.as_mut() {
            h.update(&data[..n]);
        }
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Stores into `key` whatever `produce` writes (on a blocking thread), compressed and
/// encrypted on the way, without a temporary copy. The object appears only if `produce`
/// returned `Ok`; an error, a panic or this future being dropped leaves nothing under `key`.
/// The plain size and hash are known only at the end, so they are returned rather than stored
/// as object metadata (the caller records them elsewhere).
pub async fn upload_produced<F>(
    store: &ObjectStore,
    key: &str,
    compression: CompressionSettings,
    encryption: Option<UploadEncryption>,
    metadata: Metadata,
    produce: F,
) -> Result<Uploaded, TransferError>
where
    F: FnOnce(&mut dyn Write) -> io::Result<()> + Send + 'static,
{
    upload_produced_as(
        store,
        key,
        compression,
        Input::Plain,
        encryption,
        metadata,
        produce,
    )
    .await
}

/// [`upload_produced`] for `input` ([`Input::Compressed`]: the returned `plain_size` and
/// `sha1` are then those of the bytes `produce` wrote, the compressed stream).
pub async fn upload_produced_as<F>(
    store: &ObjectStore,
    key: &str,
    compression: CompressionSettings,
    input: Input,
    encryption: Option<UploadEncryption>,
    metadata: Metadata,
    produce: F,
) -> Result<Uploaded, TransferError>
where
    F: FnOnce(&mut dyn Write) -> io::Result<()> + Send + 'static,
{
    let streamed = upload_stream(
        store,
        key,
        compression,
        input,
        encryption,
        metadata,
        Digest::Sha1,
        produce,
    )
    .await?;
    Ok(Uploaded {
        plain_size: streamed.plain_size,
        stored_size: streamed.stored_size,
        // Asked for above, so always there.
        sha1: streamed.sha1.unwrap_or_default(),
        metadata: streamed.metadata,
    })
}

/// What the bytes an upload is given are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// Plain bytes: compressed with the site's settings on the way.
    Plain,
    /// A `compression.algorithm` stream already (a server-compressed BASE_BACKUP archive):
    /// encrypted and stored as it is, labelled so that restore decompresses it.
    Compressed,
}

/// Whether an upload hashes the bytes it is given on their way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Digest {
    /// SHA-1 of the bytes, returned (a basebackup chunk's control-object entry).
    Sha1,
    /// Not again: the caller recorded the hash in the metadata already (WAL).
    Recorded,
}

/// What [`upload_stream`] stored.
struct Streamed {
    plain_size: u64,
    stored_size: u64,
    /// With [`Digest::Sha1`].
    sha1: Option<String>,
    metadata: Metadata,
}

/// [`upload_produced`], hashing the plain bytes as `digest` says.
#[allow(clippy::too_many_arguments)]
async fn upload_stream<F>(
    store: &ObjectStore,
    key: &str,
    compression: CompressionSettings,
    input: Input,
    encryption: Option<UploadEncryption>,
    mut metadata: Metadata,
    hashing: Digest,
    produce: F,
) -> Result<Streamed, TransferError>
where
    F: FnOnce(&mut dyn Write) -> io::Result<()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
    let enc = encryption.clone();
    let worker = super::cpu::worker().await;
    let cpu = tokio::task::spawn_blocking(move || -> io::Result<(u64, Option<String>)> {
        let _worker = worker;
        let err_tx = tx.clone();
        let result: io::Result<(u64, Option<String>)> = (|| {
            let sink = ChannelWriter {
                tx,
                buf: Vec::with_capacity(PIPE_CHUNK),
            };
            let run = |c: &mut dyn Write| -> io::Result<(u64, Option<String>)> {
                let mut h = Hashing {
                    inner: c,
                    hash: (hashing == Digest::Sha1)
                        .then(|| digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY)),
                    size: 0,
                };
                // A panic would close the channel like a clean end and complete a short
                // object: turn it into an error that aborts the upload.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| produce(&mut h)))
                    .map_err(|_| io::Error::other("the producer panicked"))??;
                Ok((h.size, h.hash.map(|d| hex::encode(d.finish()))))
            };
            // Compresses what `run` writes into `w` (or passes it through when it is
            // compressed already).
            fn compressed<W: Write>(
                w: W,
                compression: &CompressionSettings,
                input: Input,
                encrypted: bool,
                run: impl FnOnce(&mut dyn Write) -> io::Result<(u64, Option<String>)>,
            ) -> io::Result<((u64, Option<String>), W)> {
                if input == Input::Compressed {
                    let mut w = w;
                    let out = run(&mut w)?;
                    return Ok((out, w));
                }
                let mut c = Compressor::new(w, compression, zstd_checksum(encrypted))?;
                let out = run(&mut c)?;
                Ok((out, c.finish()?))
            }
            let (out, mut sink) = match enc {
                Some(e) => {
                    let encryptor = Encryptor::new(sink, &e.public, &e.key_id, DEFAULT_CHUNK_SIZE)?;
                    let (out, encryptor) = compressed(encryptor, &compression, input, true, run)?;
                    (out, encryptor.finish()?)
                }
                None => compressed(sink, &compression, input, false, run)?,
            };
            sink.flush()?;
            Ok(out)
        })();
        if let Err(e) = &result {
            // Fail the upload rather than let it complete with a short object.
            let _ = err_tx.blocking_send(Err(io::Error::new(e.kind(), e.to_string())));
        }
        result
    });
    record_codec(&mut metadata, compression, encryption.as_ref());
    let stored = store.put_chunks(key, rx, &metadata).await;
    let produced = cpu.await.map_err(|e| TransferError::Object {
        key: key.into(),
        message: format!("producer thread failed: {e}"),
    })?;
    match (stored, produced) {
        (Ok(stored_size), Ok((plain_size, sha1))) => Ok(Streamed {
            plain_size,
            stored_size,
            sha1,
            metadata,
        }),
        (Err(s), Err(e)) if e.kind() == io::ErrorKind::BrokenPipe => Err(s.into()),
        (_, Err(e)) => Err(TransferError::Object {
            key: key.into(),
            message: e.to_string(),
        }),
        (Err(s), Ok(_)) => Err(s.into()),
    }
}

/// Fetches `key` and hands its decrypted, decompressed bytes to `consume` (on a blocking
/// thread) as they arrive, without a temporary copy: tar extraction reads chunks this way.
/// `consume` gets the object's metadata first. What `consume` returns is returned once the
/// fetch completed too; when both failed, the cause is reported (a failed fetch is forwarded to
/// the reader, a reader that gave up makes the fetch fail with BrokenPipe). A missing object is
/// `TransferError::Storage(StorageError::NotFound)`, before `consume` is called. A pghoard
/// `pghoa1` object is fetched twice: the first read checks its MAC, and `consume` gets the
/// plaintext of the second ([`super::pghoa1`]).
pub async fn download_with<T, F>(
    store: &ObjectStore,
    key: &str,
    keys: &KeyRing,
    consume: F,
) -> Result<(Metadata, T), TransferError>
where
    T: Send + 'static,
    F: FnOnce(&Metadata, &mut dyn Read) -> io::Result<T> + Send + 'static,
{
    let (metadata, size) = store.metadata_and_size(key).await?;
    let bad = |m: String| TransferError::Object {
        key: key.to_string(),
        message: m,
    };
    let algorithm: Algorithm = metadata
        .get(meta::COMPRESSION_ALGORITHM)
        .ok_or_else(|| bad("no compression-algorithm metadata".into()))?
        .parse()
        .map_err(bad)?;
    let encrypted = metadata.contains_key(meta::ENCRYPTION_KEY_ID);
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
            match meta2.get(meta::STORED_SHA256) {
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

/// The plaintext of an encrypted object: walhoard's `walhenc1` ([`Decryptor`]) or pghoard's
/// `pghoa1` ([`super::pghoa1`]), told apart by their magic. A `pghoa1` object is read to its
/// end and its MAC checked first; `reread` then gives a second read of it to decrypt. An
/// empty object is pghoard's encryption of an empty file (walhoard's objects never are).
fn decrypting<R: Read + 'static>(
    mut input: BlockingChannelReader,
    metadata: &Metadata,
    keys: &KeyRing,
    reread: impl FnOnce() -> io::Result<R>,
) -> io::Result<Box<dyn Read>> {
    let mut head = [0u8; 8];
    let n = read_full(&mut input, &mut head)?;
    let head = &head[..n];
    let m = n.min(pghoa1::MAGIC.len());
    let labelled_walhenc1 =
        metadata.get(meta::ENCRYPTION_FORMAT).map(String::as_str) == Some("walhenc1");
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
    let key_id = metadata.get(meta::ENCRYPTION_KEY_ID).map(String::as_str);
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
pub fn copy_checked(metadata: &Metadata, d: &mut dyn Read, out: &mut dyn Write) -> io::Result<u64> {
    let hash_algorithm: HashAlgorithm = match metadata.get(meta::HASH_ALGORITHM) {
        Some(name) => name
            .parse()
            .map_err(|e: String| io::Error::new(io::ErrorKind::InvalidData, e))?,
        None => HashAlgorithm::Sha1,
    };
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
    let expect_size: Option<u64> = metadata
        .get(meta::ORIGINAL_FILE_SIZE)
        .and_then(|s| s.parse().ok());
    if let Some(expect) = expect_size.filter(|s| *s != size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("decoded {size} bytes, metadata says {expect}"),
        ));
    }
    let hash = hash.finish_hex();
    if let Some(recorded) = metadata
        .get(meta::HASH)
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
) -> Result<Metadata, TransferError> {
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
