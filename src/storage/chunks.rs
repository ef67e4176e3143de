//! The byte streams between the pipeline and a store: [`ChunkSource`] (what an upload reads
//! its object from, a chunk at a time) and [`ChannelSink`] (a download written into a channel).

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

/// Where [`super::ObjectStore::put_chunks`] takes an object's bytes from, a chunk at a time; `None`
/// ends the object, an error aborts it.
pub trait ChunkSource: Send {
    fn next_chunk(
        &mut self,
    ) -> impl std::future::Future<Output = std::io::Result<Option<Bytes>>> + Send;
}

/// One object already in memory.
impl ChunkSource for Option<Bytes> {
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        Ok(self.take())
    }
}

/// Chunks sent by a producer (a compression thread); a sent error aborts the object.
impl ChunkSource for tokio::sync::mpsc::Receiver<std::io::Result<Bytes>> {
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        self.recv().await.transpose()
    }
}

/// An [`AsyncRead`] read in chunks of up to `chunk` bytes, into fresh uninitialised buffers
/// (the backend may keep a chunk after `write` returns).
pub(super) struct ReadChunks<R> {
    pub(super) source: R,
    pub(super) chunk: usize,
}

impl<R: AsyncRead + Unpin + Send> ChunkSource for ReadChunks<R> {
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        let mut buf = bytes::BytesMut::with_capacity(self.chunk);
        while buf.len() < self.chunk {
            if self.source.read_buf(&mut buf).await? == 0 {
                break;
            }
        }
        Ok((!buf.is_empty()).then(|| buf.freeze()))
    }
}

/// An AsyncWrite that forwards every write to a channel as one chunk (back-pressure from the
/// channel's bound).
pub(super) struct ChannelSink {
    pub(super) tx: tokio_util::sync::PollSender<std::io::Result<Bytes>>,
}

impl AsyncWrite for ChannelSink {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let closed =
            || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "download reader stopped");
        match self.tx.poll_reserve(cx) {
            std::task::Poll::Ready(Ok(())) => {
                self.tx
                    .send_item(Ok(Bytes::copy_from_slice(buf)))
                    .map_err(|_| closed())?;
                std::task::Poll::Ready(Ok(buf.len()))
            }
            std::task::Poll::Ready(Err(_)) => std::task::Poll::Ready(Err(closed())),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
