//! Object storage behind one type, [`ObjectStore`], over Apache OpenDAL: local directories, S3
//! and S3-compatibles, Google Cloud Storage, Azure Blob, Swift and SFTP.
//!
//! Contract:
//! - keys are relative to the site's prefix (`xlog/000000010000000000000003`);
//! - an object is never visible under its final key until complete: local and SFTP writes go
//!   to a temporary name (`.walhoard-tmp/`) and are renamed, S3/GCS commit multipart uploads
//!   and Azure its block list at the end;
//! - metadata (pghoard's names: `compression-algorithm`, `encryption-key-id`, ...) travels as
//!   native user metadata (on Azure with `_` for `-`, as pghoard stores it), or as a
//!   `<key>.metadata` JSON sidecar on local and SFTP storage, written *before* the object, so a
//!   visible object always has its metadata;
//! - uploads and downloads stream in chunks; memory is bounded by the chunk size, not the
//!   object size;
//! - [`StorageError::is_transient`] tells a retry from a failure an operator must fix; see
//!   [`retry`] for the retry loop and its `upload_retries_warning` alert file.

mod backends;
mod chunks;
mod error;
mod local;
mod read;
pub use local::DIRECT_ALIGN;
pub mod meta;
pub mod retry;

pub use chunks::ChunkSource;
use chunks::{ChannelSink, ReadChunks};
use error::backend;
pub use error::StorageError;

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use opendal::{ErrorKind, Operator};
use tokio::io::AsyncRead;

use crate::config::ObjectStorageConfig;

/// Per-object metadata, pghoard's key names.
pub type Metadata = BTreeMap<String, String>;

/// Suffix of metadata sidecar objects on storages without user metadata.
pub const SIDECAR_SUFFIX: &str = ".metadata";

/// Size of the pieces uploads are written in (the multipart part size on S3-likes) and
/// downloads are read in.
pub const DEFAULT_CHUNK: usize = 8 * 1024 * 1024;

/// Longest time one storage request (stat, delete, a part upload...) may take.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// Longest wait for the next bytes of a streaming read or write.
const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The user metadata a store returned with a stat, in pghoard's names.
fn user_metadata(meta: &opendal::Metadata, underscores: bool) -> Metadata {
    meta.user_metadata()
        .map(|m| {
            m.into_iter()
                .map(|(k, v)| {
                    let k = if underscores {
                        k.replace('_', "-")
                    } else {
                        k.to_string()
                    };
                    (k, v.to_string())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// An object in a listing or stat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the site prefix.
    pub key: String,
    pub size: u64,
    /// Seconds since the Unix epoch, when the store reports it.
    pub last_modified: Option<i64>,
}

/// Where writes that are renamed into place start: a directory of the store's root (local
/// storage: OpenDAL's `atomic_write_dir` and [`ObjectStore::put_whole`]) or of the site's
/// prefix (sftp).
const TEMP_DIR: &str = ".walhoard-tmp";

/// A site's archive.
#[derive(Clone)]
pub struct ObjectStore {
    op: Operator,
    /// Metadata as `<key>.metadata` JSON objects (local, sftp).
    sidecar: bool,
    /// Site prefix, no leading or trailing slash.
    prefix: String,
    kind: StorageKind,
    chunk: usize,
    /// Azure metadata names must be C# identifiers: `-` is stored as `_` (as pghoard does)
    /// and turned back on read.
    underscores: bool,
    /// Writes go to a temporary name and are renamed (sftp, whose writes are in place).
    rename_into_place: bool,
    /// The directory of local storage, which [`ObjectStore::put_whole`] writes to directly.
    local_root: Option<std::path::PathBuf>,
}

/// A write of one object to local storage, prepared by [`ObjectStore::local_write`] and done
/// on a blocking thread by [`LocalWrite::write`].
#[derive(Debug)]
pub struct LocalWrite {
    key: String,
    tmp_dir: std::path::PathBuf,
    side: std::path::PathBuf,
    target: std::path::PathBuf,
}

impl LocalWrite {
    /// Writes `data` with `metadata` as its sidecar, both synced and renamed into place
    /// ([`local::write_object_synced`]); blocks. Returns the bytes stored.
    pub fn write(&self, data: &[u8], metadata: &Metadata) -> Result<u64, StorageError> {
        let json = serde_json::to_vec(metadata).map_err(|e| StorageError::BadMetadata {
            key: self.key.clone(),
            message: e.to_string(),
        })?;
        local::write_object_synced(&self.tmp_dir, (&self.side, &json), (&self.target, data))
            .map_err(|source| StorageError::Io {
                action: "write",
                key: self.key.clone(),
                source,
            })?;
        Ok(data.len() as u64)
    }
}

/// Which service a store is (pghoard's `storage_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    Local,
    S3,
    Google,
    Azure,
    Swift,
    Sftp,
}

impl StorageKind {
    /// pghoard's `storage_type` spelling.
    pub fn name(self) -> &'static str {
        match self {
            StorageKind::Local => "local",
            StorageKind::S3 => "s3",
            StorageKind::Google => "google",
            StorageKind::Azure => "azure",
            StorageKind::Swift => "swift",
            StorageKind::Sftp => "sftp",
        }
    }
}

impl fmt::Display for StorageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ObjectStore({} prefix={:?})",
            self.kind.name(),
            self.prefix
        )
    }
}

impl ObjectStore {
    /// Opens the store described by a site's `object_storage`, under `site_prefix`.
    pub fn open(cfg: &ObjectStorageConfig, site_prefix: &str) -> Result<Self, StorageError> {
        Self::open_as(cfg, site_prefix, false)
    }

    /// [`ObjectStore::open`] for reading only (restore): creates nothing, and a local
    /// storage directory that does not exist is an error.
    pub fn open_read_only(
        cfg: &ObjectStorageConfig,
        site_prefix: &str,
    ) -> Result<Self, StorageError> {
        Self::open_as(cfg, site_prefix, true)
    }

    fn open_as(
        cfg: &ObjectStorageConfig,
        site_prefix: &str,
        read_only: bool,
    ) -> Result<Self, StorageError> {
        let backends::Backend {
            op,
            sidecar,
            kind,
            prefix: storage_prefix,
        } = backends::operator(cfg, read_only)?;
        let local_root = match cfg {
            ObjectStorageConfig::Local { directory, .. } => Some(directory.clone()),
            _ => None,
        };
        let mut full = String::new();
        for part in [storage_prefix.as_deref().unwrap_or(""), site_prefix] {
            let part = part.trim_matches('/');
            if !part.is_empty() {
                if !full.is_empty() {
                    full.push('/');
                }
                full.push_str(part);
            }
        }
        // A store that stops answering (a network partition rather than a refused
        // connection) must fail the request, so that it is retried, not hang an upload forever.
        let op = op.layer(
            opendal::layers::TimeoutLayer::new()
                .with_timeout(REQUEST_TIMEOUT)
                .with_io_timeout(IO_TIMEOUT),
        );
        Ok(ObjectStore {
            op,
            sidecar,
            prefix: full,
            kind,
            chunk: DEFAULT_CHUNK,
            underscores: kind == StorageKind::Azure,
            rename_into_place: kind == StorageKind::Sftp,
            local_root,
        })
    }

    /// Sets the upload part / download read size.
    pub fn with_chunk_size(mut self, chunk: usize) -> Self {
        self.chunk = chunk;
        self
    }

    /// The upload part / download read size.
    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    pub fn kind(&self) -> StorageKind {
        self.kind
    }

    /// The site prefix keys are relative to (no leading or trailing slash; may be empty).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn path(&self, key: &str) -> Result<String, StorageError> {
        if key.is_empty() || key.starts_with('/') || key.split('/').any(|p| p == ".." || p == ".") {
            return Err(StorageError::Config(format!("invalid object key {key:?}")));
        }
        Ok(if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        })
    }

    fn sidecar_key(key: &str) -> String {
        format!("{key}{SIDECAR_SUFFIX}")
    }

    /// Streams `source` into `key`. The object appears only once complete; on any error the
    /// partial upload is aborted. Returns the bytes stored.
    pub async fn put(
        &self,
        key: &str,
        source: impl AsyncRead + Unpin + Send,
        metadata: &Metadata,
    ) -> Result<u64, StorageError> {
        let chunk = self.chunk.min(1024 * 1024);
        self.put_chunks(key, ReadChunks { source, chunk }, metadata)
            .await
    }

    /// [`ObjectStore::put`] from chunks that are already in memory: each is handed to the
    /// backend as it is, without a copy.
    pub async fn put_chunks(
        &self,
        key: &str,
        mut source: impl ChunkSource,
        metadata: &Metadata,
    ) -> Result<u64, StorageError> {
        let path = self.path(key)?;
        self.local_dirs(&path, key).await?;
        if self.sidecar {
            let json = serde_json::to_vec(metadata).map_err(|e| StorageError::BadMetadata {
                key: key.into(),
                message: e.to_string(),
            })?;
            let side = self.path(&Self::sidecar_key(key))?;
            let target = self.write_target(&side);
            let written = self
                .op
                .write(&target, json)
                .await
                .map_err(backend("write metadata of", key));
            if let Err(e) = written {
                self.discard(&target, &side).await;
                return Err(e);
            }
            self.move_into_place(&target, &side, key).await?;
        }
        let target = self.write_target(&path);
        let mut w = self.op.writer_with(&target).chunk(self.chunk);
        if !self.sidecar {
            w = w.user_metadata(metadata.iter().map(|(k, v)| {
                let k = if self.underscores {
                    k.replace('-', "_")
                } else {
                    k.clone()
                };
                (k, v.clone())
            }));
        }
        let mut writer = w.await.map_err(backend("start upload of", key))?;
        let mut total = 0u64;
        let result: Result<(), StorageError> = async {
            while let Some(chunk) = source.next_chunk().await.map_err(|e| StorageError::Io {
                action: "read source of",
                key: key.into(),
                source: e,
            })? {
                total += chunk.len() as u64;
                writer.write(chunk).await.map_err(backend("upload", key))?;
            }
            writer
                .close()
                .await
                .map_err(backend("complete upload of", key))?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            // sftp cannot abort: its partial file is the temporary one, removed below.
            let _ = writer.abort().await;
            self.discard(&target, &path).await;
            return Err(e);
        }
        self.move_into_place(&target, &path, key).await?;
        Ok(total)
    }

    /// Where a write to `path` goes first: a temporary name on stores that write in place.
    fn write_target(&self, path: &str) -> String {
        if !self.rename_into_place {
            return path.to_string();
        }
        let tmp = format!("{TEMP_DIR}/{}", crate::durable::temp_name());
        if self.prefix.is_empty() {
            tmp
        } else {
            format!("{}/{tmp}", self.prefix)
        }
    }

    /// Renames a completed temporary write onto its final name (an atomic overwrite: OpenSSH
    /// servers offer posix-rename, which OpenDAL's sftp client uses).
    async fn move_into_place(
        &self,
        target: &str,
        path: &str,
        key: &str,
    ) -> Result<(), StorageError> {
        if target != path {
            if let Err(e) = self.op.rename(target, path).await {
                self.discard(target, path).await;
                return Err(backend("move into place", key)(e));
            }
        }
        // OpenDAL's fs writer renames its synced temporary file into place but does not sync
        // the directory: the object is not durable until that is done.
        self.on_local(
            path,
            key,
            "sync the directory of",
            crate::durable::sync_parent,
        )
        .await
    }

    /// Creates the directories a local write to `path` needs, durably (OpenDAL would create
    /// them without syncing their parents).
    async fn local_dirs(&self, path: &str, key: &str) -> Result<(), StorageError> {
        self.on_local(path, key, "create the directory of", |p| match p.parent() {
            Some(dir) => crate::durable::create_dir_all_durable(dir),
            None => Ok(()),
        })
        .await
    }

    /// Runs `f` on the local file of `path` on a blocking thread; nothing on other stores.
    async fn on_local(
        &self,
        path: &str,
        key: &str,
        action: &'static str,
        f: fn(&std::path::Path) -> std::io::Result<()>,
    ) -> Result<(), StorageError> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let file = root.join(path);
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(|source| StorageError::Io {
                action,
                key: key.into(),
                source,
            })
    }

    /// Removes what a failed write to a temporary name left.
    async fn discard(&self, target: &str, path: &str) {
        if target != path {
            if let Err(e) = self.op.delete(target).await {
                tracing::warn!(temp = target, error = %e, "cannot remove a failed upload's temporary file");
            }
        }
    }

    /// Stores an object that is whole in memory (a sealed WAL segment). On local storage one
    /// blocking thread writes the sidecar and the object, each to a temporary file that is
    /// synced and renamed into place, as [`ObjectStore::put_chunks`] does through OpenDAL
    /// (which takes a dozen hand-offs to blocking threads for it); the object bypasses the
    /// page cache (`O_DIRECT`) when `data` starts at a [`DIRECT_ALIGN`] boundary, and what
    /// did go through the cache is dropped from it once on disk: copying an archive into
    /// fresh page-cache memory cost the drain up to a fifth of its system time, and the
    /// archive is read again only by a restore (docs/benchmarks.md). Other stores get it as
    /// one chunk.
    pub async fn put_whole(
        &self,
        key: &str,
        data: Bytes,
        metadata: &Metadata,
    ) -> Result<u64, StorageError> {
        let Some(local) = self.local_write(key)? else {
            return self.put_chunks(key, Some(data), metadata).await;
        };
        let metadata = metadata.clone();
        tokio::task::spawn_blocking(move || local.write(&data, &metadata))
            .await
            .map_err(|e| StorageError::Io {
                action: "write",
                key: key.into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    /// On local storage, a write of `key` as [`ObjectStore::put_whole`] does it, for a caller
    /// already on a blocking thread: the one-shot upload makes the object and writes it on
    /// one thread, where a hand-off back to the async side and out to another blocking thread
    /// between the two cost every synchronous commit two thread wake-ups (issue 16).
    /// `None` for other stores.
    pub fn local_write(&self, key: &str) -> Result<Option<LocalWrite>, StorageError> {
        let Some(root) = &self.local_root else {
            return Ok(None);
        };
        Ok(Some(LocalWrite {
            key: key.into(),
            tmp_dir: root.join(TEMP_DIR),
            side: root.join(self.path(&Self::sidecar_key(key))?),
            target: root.join(self.path(key)?),
        }))
    }

    /// On local storage, the file of `key` and the directory temporary files go to (on the
    /// same file system): for a file walhoard writes in place, a synchronous site's part log
    /// (`daemon::partial::log`). `None` for other stores.
    pub fn local_file(
        &self,
        key: &str,
    ) -> Result<Option<(std::path::PathBuf, std::path::PathBuf)>, StorageError> {
        let Some(root) = &self.local_root else {
            return Ok(None);
        };
        Ok(Some((root.join(self.path(key)?), root.join(TEMP_DIR))))
    }

    /// Stores a small object from memory.
    pub async fn put_bytes(
        &self,
        key: &str,
        data: &[u8],
        metadata: &Metadata,
    ) -> Result<u64, StorageError> {
        self.put(key, data, metadata).await
    }

    /// Size and time of `key`, `None` when absent.
    pub async fn stat(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        match self.op.stat(&self.path(key)?).await {
            Ok(m) => Ok(Some(ObjectInfo {
                key: key.to_string(),
                size: m.content_length(),
                last_modified: m.last_modified().map(|t| t.into_inner().as_second()),
            })),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(backend("stat", key)(e)),
        }
    }

    /// Bytes free for writing on local storage (statvfs of its directory); `None` on other
    /// stores, or when that cannot be told.
    pub fn free_bytes(&self) -> Option<u64> {
        let root = self.local_root.as_ref()?;
        let st = rustix::fs::statvfs(root).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// After a read of `key` answered "not found": `Ok` only when that is the truth about a
    /// reachable archive, which is what PostgreSQL takes as the end of the archive. An error
    /// when the object exists without its metadata sidecar (or the sidecar without the
    /// object), or when the site's part of the store cannot be seen at all: its local
    /// directory is gone (an unmounted disk), or its prefix holds nothing (a typo).
    pub async fn confirm_absent(&self, key: &str) -> Result<(), StorageError> {
        let object = self.stat(key).await?.is_some();
        let sidecar = self.sidecar && self.stat(&Self::sidecar_key(key)).await?.is_some();
        if self.sidecar && object != sidecar {
            let message = if object {
                format!("the object exists but its metadata sidecar {key}{SIDECAR_SUFFIX} does not")
            } else {
                format!("the metadata sidecar {key}{SIDECAR_SUFFIX} exists but the object does not")
            };
            return Err(StorageError::BadMetadata {
                key: key.into(),
                message,
            });
        }
        if object {
            // Answered "not found" a moment ago: the archive is changing under us.
            return Err(StorageError::BadMetadata {
                key: key.into(),
                message: "the object appeared after a read found none".into(),
            });
        }
        if let Some(root) = &self.local_root {
            if !root.is_dir() {
                return Err(StorageError::Config(format!(
                    "{key} not found, and the storage directory {} is gone (not mounted?)",
                    root.display()
                )));
            }
        }
        // One level only: the site's top directories (xlog/, timeline/, basebackup/...).
        let base = if self.prefix.is_empty() {
            "/".to_string()
        } else {
            format!("{}/", self.prefix)
        };
        let entries = match self.op.list(&base).await {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(backend("list the site prefix for", key)(e)),
        };
        if !entries
            .iter()
            .any(|e| e.path() != base && !e.path().contains(TEMP_DIR))
        {
            return Err(StorageError::Config(format!(
                "{key} not found, and the site's prefix {base:?} holds nothing: wrong storage, \
                 prefix or site name?"
            )));
        }
        Ok(())
    }

    /// Objects whose keys start with `dir/` (recursively), sidecars and temp files left out.
    pub async fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let base = format!("{}/", self.path(dir.trim_end_matches('/'))?);
        let entries = match self.op.list_with(&base).recursive(true).await {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(backend("list", dir)(e)),
        };
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out = Vec::new();
        for e in entries {
            let p = e.path();
            if p.ends_with('/')
                || p.ends_with(SIDECAR_SUFFIX)
                || p.contains("/.walhoard-tmp/")
                || p.starts_with(".walhoard-tmp/")
            {
                continue;
            }
            let meta = e.metadata();
            out.push(ObjectInfo {
                key: p.get(strip..).unwrap_or(p).to_string(),
                size: meta.content_length(),
                last_modified: meta.last_modified().map(|t| t.into_inner().as_second()),
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Deletes the object (and its sidecar). Deleting a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.op
            .delete(&self.path(key)?)
            .await
            .map_err(backend("delete", key))?;
        if self.sidecar {
            self.op
                .delete(&self.path(&Self::sidecar_key(key))?)
                .await
                .map_err(backend("delete metadata of", key))?;
        }
        Ok(())
    }
}
