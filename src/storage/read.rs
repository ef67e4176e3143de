//! Reading objects and their metadata.

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{backend, meta, user_metadata, ChannelSink, Metadata, ObjectStore, StorageError};

/// A local sidecar ([`super::local::read_sidecar`]) on a blocking thread; errors as OpenDAL's
/// read would give them (`NotFound` for a missing file).
async fn read_local_sidecar(path: std::path::PathBuf, key: &str) -> Result<Vec<u8>, StorageError> {
    let read = tokio::task::spawn_blocking(move || super::local::read_sidecar(&path))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|r| r);
    read.map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => StorageError::NotFound { key: key.into() },
        std::io::ErrorKind::InvalidData => StorageError::BadMetadata {
            key: key.into(),
            message: source.to_string(),
        },
        _ => StorageError::Io {
            action: "read metadata of",
            key: key.into(),
            source,
        },
    })
}

impl ObjectStore {
    /// The object's metadata.
    pub async fn metadata(&self, key: &str) -> Result<Metadata, StorageError> {
        Ok(self.metadata_and_size(key).await?.0)
    }

    /// The object's metadata, typed ([`meta::ObjectMeta::parse`]).
    pub async fn object_meta(&self, key: &str) -> Result<meta::ObjectMeta, StorageError> {
        Ok(self.object_meta_and_size(key).await?.0)
    }

    /// [`ObjectStore::metadata_and_size`], the metadata typed.
    pub async fn object_meta_and_size(
        &self,
        key: &str,
    ) -> Result<(meta::ObjectMeta, Option<u64>), StorageError> {
        let (m, size) = self.metadata_and_size(key).await?;
        Ok((meta::ObjectMeta::parse(key, &m)?, size))
    }

    /// The object's metadata, and its size when that came with it (stores with native
    /// metadata answer both in one request; sidecar stores read the sidecar only).
    pub async fn metadata_and_size(
        &self,
        key: &str,
    ) -> Result<(Metadata, Option<u64>), StorageError> {
        if self.sidecar {
            let side = self.path(&Self::sidecar_key(key))?;
            let raw = match &self.local_root {
                Some(root) => read_local_sidecar(root.join(side), key).await?,
                None => self
                    .op
                    .read(&side)
                    .await
                    .map_err(backend("read metadata of", key))?
                    .to_vec(),
            };
            let metadata = serde_json::from_slice(&raw).map_err(|e| StorageError::BadMetadata {
                key: key.into(),
                message: e.to_string(),
            })?;
            return Ok((metadata, None));
        }
        let meta = self
            .op
            .stat(&self.path(key)?)
            .await
            .map_err(backend("stat", key))?;
        Ok((
            user_metadata(&meta, self.underscores),
            Some(meta.content_length()),
        ))
    }

    /// `size` when known, else the object's length from a stat.
    async fn size_or_stat(
        &self,
        key: &str,
        path: &str,
        size: Option<u64>,
    ) -> Result<u64, StorageError> {
        match size {
            Some(size) => Ok(size),
            None => Ok(self
                .op
                .stat(path)
                .await
                .map_err(backend("stat", key))?
                .content_length()),
        }
    }

    /// Streams the object into `sink`; returns its metadata and size.
    pub async fn get(
        &self,
        key: &str,
        sink: impl AsyncWrite + Unpin,
    ) -> Result<(Metadata, u64), StorageError> {
        let path = self.path(key)?;
        // Native user metadata comes with the size in one stat; sidecars are read, then the
        // object stat'ed for its size.
        let (metadata, size) = self.metadata_and_size(key).await?;
        let size = self.size_or_stat(key, &path, size).await?;
        let size = self.copy_data(key, &path, size, sink).await?;
        Ok((metadata, size))
    }

    /// Copies `size` bytes of the object at `path` into `sink`, a chunk at a time.
    async fn copy_data(
        &self,
        key: &str,
        path: &str,
        size: u64,
        mut sink: impl AsyncWrite + Unpin,
    ) -> Result<u64, StorageError> {
        let reader = self
            .op
            .reader(path)
            .await
            .map_err(backend("download", key))?;
        let mut off = 0u64;
        while off < size {
            let end = (off + self.chunk as u64).min(size);
            let buf = reader
                .read(off..end)
                .await
                .map_err(backend("download", key))?;
            if buf.is_empty() {
                return Err(StorageError::Io {
                    action: "download",
                    key: key.into(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("object ended at {off} of {size} bytes"),
                    ),
                });
            }
            off += buf.len() as u64;
            for chunk in buf {
                sink.write_all(&chunk).await.map_err(|e| StorageError::Io {
                    action: "write download of",
                    key: key.into(),
                    source: e,
                })?;
            }
        }
        sink.flush().await.map_err(|e| StorageError::Io {
            action: "write download of",
            key: key.into(),
            source: e,
        })?;
        Ok(size)
    }

    /// Sends the object's bytes into `tx` chunk by chunk (bounded by the channel); a failure is
    /// also sent, so the reading side stops with it.
    pub async fn get_to_channel(
        &self,
        key: &str,
        size: Option<u64>,
        tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    ) -> Result<u64, StorageError> {
        // The caller has the metadata already (it needs it to set up decoding), and the size
        // when it came with it ([`ObjectStore::metadata_and_size`]): data only.
        let sink = ChannelSink {
            tx: tokio_util::sync::PollSender::new(tx.clone()),
        };
        let result = async {
            let path = self.path(key)?;
            let size = self.size_or_stat(key, &path, size).await?;
            self.copy_data(key, &path, size, sink).await
        }
        .await;
        if let Err(e) = &result {
            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
        }
        result
    }

    /// Reads a small object into memory.
    pub async fn get_bytes(&self, key: &str) -> Result<(Vec<u8>, Metadata), StorageError> {
        let mut out = Vec::new();
        let (meta, _) = self.get(key, &mut out).await?;
        Ok((out, meta))
    }
}
