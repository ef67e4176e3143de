//! Into the archive: one [`Upload`] description → compress → encrypt → store → one
//! [`Uploaded`].

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::pool::{ONE_SHOT_INPUT, ONE_SHOT_OUTPUT, ONE_SHOT_ZSTD};
use super::{io_at, ChannelWriter, TransferError, UploadEncryption, PIPE_CHUNK, QUEUE_CHUNKS};
use crate::pipeline::compression::{zstd_checksum, Algorithm, CompressionSettings, Compressor};
use crate::pipeline::encryption::{Encryptor, DEFAULT_CHUNK_SIZE};
use crate::pipeline::hash::{HashAlgorithm, Hasher};
use crate::storage::meta::{EncryptionFormat, ObjectMeta};
use crate::storage::{ObjectStore, StorageError};

/// How the stored bytes were made: `compression-algorithm`, and the encryption key and format.
fn record_codec(
    metadata: &mut ObjectMeta,
    compression: CompressionSettings,
    encryption: Option<&UploadEncryption>,
) {
    metadata.compression_algorithm = Some(compression.algorithm);
    if let Some(e) = encryption {
        metadata.encryption_key_id = Some(e.key_id.clone());
        metadata.encryption_format = Some(EncryptionFormat::Walhenc1);
    }
}

/// pghoard's metadata of the plaintext: `original-file-size`, `hash`, `hash-algorithm`.
fn record_plain(metadata: &mut ObjectMeta, size: u64, hash: String, algorithm: HashAlgorithm) {
    metadata.original_file_size = Some(size);
    metadata.hash = Some(hash);
    metadata.hash_algorithm = Some(algorithm);
}

/// What an upload stores; named in its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A WAL segment, a history file or a timeline's `.partial`.
    Wal,
    /// A basebackup's data chunk (`basebackup_chunk/<backup>/...`).
    BasebackupChunk,
    /// A basebackup's control object (`basebackup/<backup>`).
    BasebackupControl,
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ObjectKind::Wal => "WAL file",
            ObjectKind::BasebackupChunk => "basebackup chunk",
            ObjectKind::BasebackupControl => "basebackup control object",
        })
    }
}

/// A producer: writes an object's bytes into the pipeline, on a blocking thread.
pub type Produce = Box<dyn FnOnce(&mut dyn Write) -> io::Result<()> + Send>;

/// Where an upload's bytes come from.
pub enum Source {
    /// A local file (a spool segment, an archive_command upload). With [`Hashing::Recorded`]
    /// it is read twice, to hash it and to store it; a file that changed in between fails the
    /// upload.
    File(PathBuf),
    /// The whole object in memory (a receiver's segment buffer): no file read at all.
    Bytes(Arc<dyn AsRef<[u8]> + Send + Sync>),
    /// Whatever the function writes, without a temporary copy (basebackup chunks). The object
    /// appears only if it returned `Ok`; an error, a panic or the upload being dropped leaves
    /// nothing under the key.
    Produced(Produce),
}

impl Source {
    pub fn bytes(data: impl AsRef<[u8]> + Send + Sync + 'static) -> Self {
        Source::Bytes(Arc::new(data))
    }

    pub fn produced(f: impl FnOnce(&mut dyn Write) -> io::Result<()> + Send + 'static) -> Self {
        Source::Produced(Box::new(f))
    }
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

/// What an upload hashes, and where the hash goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hashing {
    /// The plain bytes, with this algorithm, recorded as pghoard's `hash`, `hash-algorithm`
    /// and `original-file-size` metadata before the upload starts (S3-likes take metadata only
    /// at the start of an upload). Needs [`Input::Plain`] from a [`Source::File`] or
    /// [`Source::Bytes`]: a produced stream is known only at its end.
    Recorded(HashAlgorithm),
    /// SHA-1 of the bytes the source gives (the compressed stream with
    /// [`Input::Compressed`]), computed on their way and only returned: a basebackup chunk's
    /// entry in its control object.
    Sha1Returned,
}

/// One upload: what [`upload`] stores, from where, and how.
pub struct Upload {
    pub kind: ObjectKind,
    /// The object key.
    pub key: String,
    pub source: Source,
    pub input: Input,
    pub hashing: Hashing,
    pub compression: CompressionSettings,
    pub encryption: Option<UploadEncryption>,
    /// The caller's metadata (host, backup name, ...); the upload adds the codec's
    /// (`compression-algorithm`, encryption key id and format) and, with
    /// [`Hashing::Recorded`], the plaintext's.
    pub metadata: ObjectMeta,
}

impl Upload {
    /// A WAL file as pghoard stores one: plain bytes from `source`, the plaintext's size and
    /// hash (`hash_algorithm`) recorded, no metadata of the caller's yet.
    pub fn wal(
        key: impl Into<String>,
        source: Source,
        compression: CompressionSettings,
        encryption: Option<UploadEncryption>,
        hash_algorithm: HashAlgorithm,
    ) -> Self {
        Upload {
            kind: ObjectKind::Wal,
            key: key.into(),
            source,
            input: Input::Plain,
            hashing: Hashing::Recorded(hash_algorithm),
            compression,
            encryption,
            metadata: ObjectMeta::default(),
        }
    }
}

/// What [`upload`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// Bytes the source gave.
    pub plain_size: u64,
    /// Bytes stored (compressed, encrypted).
    pub stored_size: u64,
    /// Hex digest of the source's bytes, as [`Upload::hashing`] says.
    pub hash: String,
    /// The object metadata stored with it.
    pub metadata: ObjectMeta,
}

/// Where a stream goes: everything of an [`Upload`] but its source, hashing and metadata.
struct Target<'a> {
    store: &'a ObjectStore,
    key: &'a str,
    input: Input,
    compression: CompressionSettings,
    encryption: Option<UploadEncryption>,
}

impl Target<'_> {
    fn failed(&self, message: String) -> TransferError {
        TransferError::Object {
            key: self.key.into(),
            message,
        }
    }
}

/// Compresses (and encrypts) `upload.source` into `upload.key`, recording pghoard's metadata:
/// compression algorithm, encryption key id and, with [`Hashing::Recorded`], the original size
/// and `hash` with `hash-algorithm`. WAL from memory with single-threaded zstd takes the
/// one-shot path ([`one_shot_object`]); everything else streams through the pipeline.
pub async fn upload(store: &ObjectStore, upload: Upload) -> Result<Uploaded, TransferError> {
    let Upload {
        kind,
        key,
        source,
        input,
        hashing,
        compression,
        encryption,
        metadata,
    } = upload;
    let target = Target {
        store,
        key: &key,
        input,
        compression,
        encryption,
    };
    let uploaded = match (hashing, source) {
        (Hashing::Recorded(_), Source::Produced(_)) => {
            return Err(target
                .failed("a produced stream's hash cannot be recorded before it is stored".into()))
        }
        (Hashing::Recorded(_), _) if input == Input::Compressed => {
            return Err(
                target.failed("a compressed stream's plaintext hash cannot be recorded".into())
            )
        }
        (Hashing::Recorded(a), Source::File(path)) => {
            upload_file(&target, &path, a, metadata).await?
        }
        (Hashing::Recorded(a), Source::Bytes(data)) => {
            upload_bytes(&target, data, a, metadata).await?
        }
        (Hashing::Sha1Returned, source) => {
            let produce: Produce = match source {
                Source::File(path) => Box::new(move |w| {
                    let file = std::fs::File::open(&path)?;
                    io::copy(&mut io::BufReader::with_capacity(PIPE_CHUNK, file), w)?;
                    Ok(())
                }),
                Source::Bytes(data) => Box::new(move |w| w.write_all((*data).as_ref())),
                Source::Produced(p) => p,
            };
            upload_stream(&target, metadata, Digest::Sha1, produce).await?
        }
    };
    tracing::debug!(
        key,
        plain_size = uploaded.plain_size,
        stored_size = uploaded.stored_size,
        "stored {kind}"
    );
    Ok(uploaded)
}

/// [`upload`] of a file with its hash recorded.
async fn upload_file(
    target: &Target<'_>,
    path: &Path,
    hash_algorithm: HashAlgorithm,
    mut metadata: ObjectMeta,
) -> Result<Uploaded, TransferError> {
    let len = std::fs::metadata(path).map_err(io_at("read", path))?.len();
    if one_shot(target.compression) && len <= ONE_SHOT_FILE_MAX {
        // A spool segment received without a buffer (no room in the budget when it began):
        // one read into a pooled buffer, then the one-shot path, instead of a hashing pass
        // and a streaming pass over the file (issue 19: at 50 sites most segments came this
        // way and cost 25-45 % more CPU per GB than those from memory).
        let (p, compression, enc) = (
            path.to_path_buf(),
            target.compression,
            target.encryption.clone(),
        );
        let made = make_and_store(
            target,
            metadata,
            hash_algorithm,
            move || {
                let mut plain = ONE_SHOT_INPUT.take(len as usize);
                std::fs::File::open(&p)?
                    .take(ONE_SHOT_FILE_MAX + 1)
                    .read_to_end(&mut plain)?;
                let (hash, object) =
                    one_shot_object(plain.as_ref(), compression, enc.as_ref(), hash_algorithm)?;
                Ok((plain.as_ref().len() as u64, hash, object))
            },
            None,
        )
        .await;
        return made.map_err(|e| e.into_transfer(|e| io_at("read", path)(e)));
    }
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
    .map_err(|e| target.failed(format!("hash thread failed: {e}")))?
    .map_err(io_at("read", path))?;
    let file = std::fs::File::open(path).map_err(io_at("open", path))?;
    record_plain(&mut metadata, expect_size, hash.clone(), hash_algorithm);
    let src = path.to_path_buf();
    // The hash is already in the metadata: hashing the bytes again on their way into the
    // compressor cost as much CPU as a fifth of the whole WAL drain (docs/benchmarks.md).
    upload_stream(
        target,
        metadata,
        Digest::Recorded(hash),
        Box::new(move |w| {
            let mut input = io::BufReader::with_capacity(PIPE_CHUNK, file);
            let size = io::copy(&mut input, w)?;
            if size != expect_size {
                return Err(io::Error::other(format!(
                    "{}: file changed while being archived ({expect_size} then {size} bytes)",
                    src.display()
                )));
            }
            Ok(())
        }),
    )
    .await
}

/// [`upload`] of a whole file already in memory (a WAL segment the receiver handed on in its
/// buffer), with its hash recorded: no read of the spool file at all. zstd compresses the
/// buffer in one call, which is faster than the streaming encoder (it works on one contiguous
/// input instead of copying it into a window: docs/benchmarks.md); the frame is an ordinary
/// zstd frame, with a checksum when the object is not encrypted ([`zstd_checksum`]).
async fn upload_bytes(
    target: &Target<'_>,
    data: Arc<dyn AsRef<[u8]> + Send + Sync>,
    hash_algorithm: HashAlgorithm,
    mut metadata: ObjectMeta,
) -> Result<Uploaded, TransferError> {
    let compression = target.compression;
    let size = (*data).as_ref().len() as u64;
    if one_shot(compression) {
        // One worker hashes, compresses and encrypts the whole file into pooled buffers, and
        // the store gets the finished object in one piece: no channel, no chunk allocations,
        // one hand-off to a blocking thread instead of three. Those hand-offs and the page
        // faults of fresh chunk buffers cost a tenth of the WAL drain's CPU on a saturated
        // two-core machine (docs/benchmarks.md).
        let enc = target.encryption.clone();
        let made = make_and_store(
            target,
            metadata,
            hash_algorithm,
            move || {
                let (hash, object) =
                    one_shot_object((*data).as_ref(), compression, enc.as_ref(), hash_algorithm)?;
                Ok((size, hash, object))
            },
            None,
        )
        .await;
        return made.map_err(|e| e.into_transfer(|e| target.failed(e.to_string())));
    }
    let input = data.clone();
    let worker = crate::pipeline::cpu::worker().await;
    let hash = tokio::task::spawn_blocking(move || {
        let _worker = worker;
        let mut hash = hash_algorithm.hasher();
        hash.update((*input).as_ref());
        hash.finish_hex()
    })
    .await
    .map_err(|e| target.failed(format!("hash thread failed: {e}")))?;
    record_plain(&mut metadata, size, hash.clone(), hash_algorithm);
    upload_stream(
        target,
        metadata,
        Digest::Recorded(hash),
        Box::new(move |w| w.write_all((*data).as_ref())),
    )
    .await
}

/// Files up to this size (a WAL segment of up to 64 MiB) go the one-shot way when the
/// compression allows it: read whole into one pooled buffer per compression worker.
const ONE_SHOT_FILE_MAX: u64 = 64 << 20;

/// Whether whole objects are made in one call ([`one_shot_object`]): zstd without threads
/// of its own.
fn one_shot(compression: CompressionSettings) -> bool {
    compression.algorithm == Algorithm::Zstd && compression.threads == 0
}

/// Why [`make_and_store`] failed: making the object (the caller names what it read) or
/// storing it.
enum OneShotError {
    Make(io::Error),
    Store(TransferError),
}

impl OneShotError {
    fn into_transfer(self, make: impl FnOnce(io::Error) -> TransferError) -> TransferError {
        match self {
            OneShotError::Make(e) => make(e),
            OneShotError::Store(e) => e,
        }
    }
}

/// Makes an object with `make` (on a blocking thread, holding a compression worker: it gives
/// the plain size, the plain bytes' hash and the sealed object, [`one_shot_object`]) and
/// stores it under the target's key with pghoard's metadata. On local storage the same
/// blocking thread writes it ([`ObjectStore::local_write`]), the compression worker given
/// back first (a worker never waits for a disk): one hand-off to a blocking thread per
/// object instead of two and two back, which every synchronous commit waited for (issue 16,
/// docs/benchmarks.md). Other stores get the object from the async side.
async fn make_and_store<O>(
    target: &Target<'_>,
    mut metadata: ObjectMeta,
    hash_algorithm: HashAlgorithm,
    make: impl FnOnce() -> io::Result<(u64, String, O)> + Send + 'static,
    store_made: Option<StoreMade>,
) -> Result<Uploaded, OneShotError>
where
    O: AsRef<[u8]> + Send + Sync + 'static,
{
    record_codec(
        &mut metadata,
        target.compression,
        target.encryption.as_ref(),
    );
    let local: Option<StoreMade> = match store_made {
        Some(f) => Some(f),
        None => target
            .store
            .local_write(target.key)
            .map_err(|e| OneShotError::Store(e.into()))?
            .map(|l| -> StoreMade { Box::new(move |object, m| l.write(object, &m.to_map())) }),
    };
    let worker = crate::pipeline::cpu::worker().await;
    let joined = |e: tokio::task::JoinError| {
        OneShotError::Store(target.failed(format!("compression thread failed: {e}")))
    };
    let Some(local) = local else {
        let (size, hash, object) = tokio::task::spawn_blocking(move || {
            let _worker = worker;
            make()
        })
        .await
        .map_err(joined)?
        .map_err(OneShotError::Make)?;
        record_plain(&mut metadata, size, hash.clone(), hash_algorithm);
        let object = Bytes::from_owner(object);
        let stored_size = object.len() as u64;
        target
            .store
            .put_whole(target.key, object, &metadata.to_map())
            .await
            .map_err(|e| OneShotError::Store(e.into()))?;
        return Ok(Uploaded {
            plain_size: size,
            stored_size,
            hash,
            metadata,
        });
    };
    // In place on a synchronous site's own thread (`pipeline::blocking`).
    crate::pipeline::blocking::blocking(move || {
        let made = make();
        drop(worker);
        let (size, hash, object) = made.map_err(OneShotError::Make)?;
        record_plain(&mut metadata, size, hash.clone(), hash_algorithm);
        let stored_size =
            local(object.as_ref(), &metadata).map_err(|e| OneShotError::Store(e.into()))?;
        Ok(Uploaded {
            plain_size: size,
            stored_size,
            hash,
            metadata,
        })
    })
    .await
    .map_err(joined)?
}

/// Stores an object made on a blocking thread, on that thread, with its complete metadata;
/// returns the bytes stored. [`upload_made_into`] gives it in place of the store's own write.
pub type StoreMade = Box<dyn FnOnce(&[u8], &ObjectMeta) -> Result<u64, StorageError> + Send>;

/// [`upload`] of plain bytes in memory with their hash recorded (a partial WAL batch), made
/// exactly as [`upload`] makes them (one-shot zstd when the compression allows it, else the
/// streaming compressor and encryptor into memory), but stored by `store_made` on the
/// blocking thread that made the object: a synchronous site's record in its part log
/// (`daemon::partial::log`) instead of an object of its own.
pub async fn upload_made_into(
    store: &ObjectStore,
    upload: Upload,
    store_made: StoreMade,
) -> Result<Uploaded, TransferError> {
    let Upload {
        key,
        source,
        input,
        hashing,
        compression,
        encryption,
        metadata,
        ..
    } = upload;
    let target = Target {
        store,
        key: &key,
        input,
        compression,
        encryption,
    };
    let (Source::Bytes(data), Hashing::Recorded(hash_algorithm), Input::Plain) =
        (source, hashing, input)
    else {
        return Err(target.failed(
            "only plain bytes in memory with a recorded hash can be made into a caller's store"
                .into(),
        ));
    };
    let enc = target.encryption.clone();
    let made = make_and_store(
        &target,
        metadata,
        hash_algorithm,
        move || {
            let plain = (*data).as_ref();
            let size = plain.len() as u64;
            if one_shot(compression) {
                let (hash, object) =
                    one_shot_object(plain, compression, enc.as_ref(), hash_algorithm)?;
                return Ok((size, hash, MadeObject::Pooled(Box::new(object))));
            }
            let (hash, object) =
                object_in_memory(plain, compression, enc.as_ref(), hash_algorithm)?;
            Ok((size, hash, MadeObject::Vec(object)))
        },
        Some(store_made),
    )
    .await;
    made.map_err(|e| e.into_transfer(|e| target.failed(e.to_string())))
}

/// An object made in memory by one of the two makers.
enum MadeObject {
    Pooled(Box<dyn AsRef<[u8]> + Send + Sync>),
    Vec(Vec<u8>),
}

impl AsRef<[u8]> for MadeObject {
    fn as_ref(&self) -> &[u8] {
        match self {
            MadeObject::Pooled(b) => (**b).as_ref(),
            MadeObject::Vec(v) => v,
        }
    }
}

/// The object the streaming compressor (and encryptor) makes of `plain`, in memory, with the
/// hash of `plain`: what [`upload`] streams to the store for a compression without the
/// one-shot path.
fn object_in_memory(
    plain: &[u8],
    compression: CompressionSettings,
    encryption: Option<&UploadEncryption>,
    hash_algorithm: HashAlgorithm,
) -> io::Result<(String, Vec<u8>)> {
    let mut hash = hash_algorithm.hasher();
    hash.update(plain);
    let out = Vec::with_capacity(plain.len() / 2 + 1024);
    let object = match encryption {
        Some(e) => {
            let sealed = Encryptor::new(out, &e.public, &e.key_id, DEFAULT_CHUNK_SIZE)?;
            let mut c = Compressor::new(sealed, &compression, zstd_checksum(true))?;
            c.write_all(plain)?;
            c.finish()?.finish()?
        }
        None => {
            let mut c = Compressor::new(out, &compression, zstd_checksum(false))?;
            c.write_all(plain)?;
            c.finish()?
        }
    };
    Ok((hash.finish_hex(), object))
}

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
    let mut c = ONE_SHOT_ZSTD.take(compression.level, zstd_checksum(encryption.is_some()))?;
    if let Err(e) = c.compress_to_buffer(plain, &mut *compressed) {
        c.discard();
        return Err(e);
    }
    drop(c);
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

/// Counts (and, when asked, hashes) the plain bytes on their way into the compressor.
struct Counting<'a> {
    inner: &'a mut dyn Write,
    hash: Option<Hasher>,
    size: u64,
}

impl Write for Counting<'_> {
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

/// Whether [`upload_stream`] hashes the bytes it is given on their way.
enum Digest {
    /// SHA-1 of the bytes, returned ([`Hashing::Sha1Returned`]).
    Sha1,
    /// Not again: the caller recorded this hash in the metadata already (WAL).
    Recorded(String),
}

/// Stores into the target whatever `produce` writes (on a blocking thread), compressed and
/// encrypted on the way, without a temporary copy. The object appears only if `produce`
/// returned `Ok`; an error, a panic or this future being dropped leaves nothing under the key.
async fn upload_stream(
    target: &Target<'_>,
    mut metadata: ObjectMeta,
    digest: Digest,
    produce: Produce,
) -> Result<Uploaded, TransferError> {
    let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
    let enc = target.encryption.clone();
    let (compression, input) = (target.compression, target.input);
    let hash_on_the_way = matches!(digest, Digest::Sha1);
    let worker = crate::pipeline::cpu::worker().await;
    let cpu = tokio::task::spawn_blocking(move || -> io::Result<(u64, Option<String>)> {
        let _worker = worker;
        let err_tx = tx.clone();
        let result: io::Result<(u64, Option<String>)> = (|| {
            let sink = ChannelWriter {
                tx,
                buf: Vec::with_capacity(PIPE_CHUNK),
            };
            let run = |c: &mut dyn Write| -> io::Result<(u64, Option<String>)> {
                let mut h = Counting {
                    inner: c,
                    hash: hash_on_the_way.then(|| HashAlgorithm::Sha1.hasher()),
                    size: 0,
                };
                // A panic would close the channel like a clean end and complete a short
                // object: turn it into an error that aborts the upload.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| produce(&mut h)))
                    .map_err(|_| io::Error::other("the producer panicked"))??;
                Ok((h.size, h.hash.map(Hasher::finish_hex)))
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
    record_codec(&mut metadata, compression, target.encryption.as_ref());
    let stored = target
        .store
        .put_chunks(target.key, rx, &metadata.to_map())
        .await;
    let produced = cpu
        .await
        .map_err(|e| target.failed(format!("producer thread failed: {e}")))?;
    match (stored, produced) {
        (Ok(stored_size), Ok((plain_size, sha1))) => Ok(Uploaded {
            plain_size,
            stored_size,
            hash: match digest {
                Digest::Recorded(hash) => hash,
                // Asked for above, so always there.
                Digest::Sha1 => sha1.unwrap_or_default(),
            },
            metadata,
        }),
        (Err(s), Err(e)) if e.kind() == io::ErrorKind::BrokenPipe => Err(s.into()),
        (_, Err(e)) => Err(target.failed(e.to_string())),
        (Err(s), Ok(_)) => Err(s.into()),
    }
}
