//! One file into the archive and back: compress → encrypt → store, and fetch → decrypt →
//! decompress → verify. CPU work runs on a blocking thread, I/O on the async side; between
//! them a bounded channel of chunks, so memory is `QUEUE_CHUNKS` × chunk size whatever the
//! object size.
//!
//! [`upload`] (`uploading.rs`) takes one [`Upload`] description to one [`Uploaded`] result;
//! [`download_with`] and [`download_file`] (`downloading.rs`) go back; `pool.rs` holds the
//! reused output buffers of the one-shot WAL path.

mod downloading;
mod pool;
mod uploading;

use std::io::{self, Read, Write};
use std::path::Path;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::encryption::PublicKey;

pub use downloading::{copy_checked, decode_stream, download_file, download_with};
pub use pool::trim_idle_output;
pub use uploading::{
    one_shot_object, upload, upload_made_into, Hashing, Input, ObjectKind, Produce, Source,
    StoreMade, Upload, Uploaded,
};

const QUEUE_CHUNKS: usize = 4;

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
