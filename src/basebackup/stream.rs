//! `basic` / `pipe` mode: BASE_BACKUP over a replication connection. Each archive the server
//! sends (`base.tar`, `<oid>.tar`) and the `backup_manifest` becomes one chunk object, streamed
//! through compress → encrypt → store as it arrives: no temporary copy, memory bounded by the
//! pipeline's queues.

use std::collections::BTreeMap;
use std::io;

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use walhoard_basebackup::control::{
    BackupMetadata, ChunkKind, ChunkMeta, TablespaceMeta, FORMAT_STREAM,
};
use walhoard_protocol::{BaseBackupEvent, BaseBackupOptions, ReplicationClient};

use super::{describe, now_rfc3339, BackupContext, Progress};
use crate::pipeline::transfer::Uploaded;

/// Messages to a chunk's producer thread. The explicit end tells a complete archive from a
/// stream that stopped (connection lost, backup cancelled), which must not be stored.
enum Piece {
    Data(Bytes),
    End,
}

/// What the producer thread is handed at a time. CopyData messages are 8-64 kB; handing each
/// over separately made scheduler work ~30 % of a `basic` backup's CPU (docs/benchmarks.md).
const PIECE_SIZE: usize = 1024 * 1024;

/// A chunk being stored while the stream goes on.
struct OpenChunk {
    file: String,
    kind: ChunkKind,
    tablespace_oid: Option<u32>,
    /// Data not yet handed over, less than [`PIECE_SIZE`].
    pending: BytesMut,
    tx: mpsc::Sender<Piece>,
    task: JoinHandle<Result<(String, Uploaded)>>,
}

impl OpenChunk {
    fn start(
        ctx: &BackupContext,
        file: String,
        kind: ChunkKind,
        tablespace_oid: Option<u32>,
    ) -> Self {
        let (tx, mut rx) = mpsc::channel::<Piece>(4);
        let what = file.clone();
        let c = ctx.clone();
        let f = file.clone();
        let task = tokio::spawn(async move {
            c.upload_chunk(&f, move |w| {
                while let Some(piece) = rx.blocking_recv() {
                    match piece {
                        Piece::Data(d) => w.write_all(&d)?,
                        Piece::End => return Ok(()),
                    }
                }
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("BASE_BACKUP stopped in the middle of {what}"),
                ))
            })
            .await
        });
        OpenChunk {
            file,
            kind,
            tablespace_oid,
            pending: BytesMut::with_capacity(PIECE_SIZE),
            tx,
            task,
        }
    }

    /// Feeds data; a failed upload is reported by [`OpenChunk::finish`].
    async fn send(&mut self, d: Bytes) -> bool {
        self.pending.extend_from_slice(&d);
        if self.pending.len() < PIECE_SIZE {
            return true;
        }
        let piece = std::mem::replace(&mut self.pending, BytesMut::with_capacity(PIECE_SIZE));
        self.tx.send(Piece::Data(piece.freeze())).await.is_ok()
    }

    async fn finish(mut self) -> Result<ChunkMeta> {
        if !self.pending.is_empty() {
            let piece = self.pending.split().freeze();
            let _ = self.tx.send(Piece::Data(piece)).await;
        }
        let _ = self.tx.send(Piece::End).await;
        drop(self.tx);
        let (rel, up) = self
            .task
            .await
            .with_context(|| format!("upload task of {}", self.file))??;
        Ok(ChunkMeta {
            chunk_filename: rel,
            input_size: up.plain_size,
            result_size: up.stored_size,
            files: Vec::new(),
            kind: self.kind,
            tablespace_oid: self.tablespace_oid,
            hash: up.sha1,
        })
    }

    fn abort(self) {
        self.task.abort();
    }
}

pub async fn run(ctx: &BackupContext) -> Result<BackupMetadata> {
    let params = ctx.node_params()?;
    let mut client = ReplicationClient::connect(&params)
        .await
        .with_context(|| format!("connect to {params} for BASE_BACKUP"))?;
    let id = client.identify_system().await.context("IDENTIFY_SYSTEM")?;
    let seg = client
        .wal_segment_size()
        .await
        .context("SHOW wal_segment_size")?;
    let version = client.connection().server_version_num()?;
    let opts = BaseBackupOptions {
        label: format!("walhoard {}", ctx.name),
        progress: true,
        fast_checkpoint: ctx.fast_checkpoint,
        wal: ctx.standalone(),
        wait_for_archive: false,
        manifest: true,
        manifest_checksums: None,
        tablespace_map: true,
        max_rate: ctx.max_rate_kbps,
        compression: None,
        compression_detail: None,
    };
    let start_time = now_rfc3339();
    let mut bb = client
        .base_backup(&opts)
        .await
        .context("start BASE_BACKUP")?;
    let (start_lsn, start_tli) = (bb.start_lsn, bb.start_tli);
    let estimate: u64 = bb.tablespaces.iter().filter_map(|t| t.size_kb).sum::<u64>() * 1024;
    let mut tablespaces = BTreeMap::new();
    for t in &bb.tablespaces {
        if let (Some(oid), Some(loc)) = (t.oid, &t.location) {
            tablespaces.insert(
                oid.to_string(),
                TablespaceMeta {
                    oid,
                    path: loc.clone(),
                },
            );
        }
    }
    tracing::info!(
        site = %ctx.site,
        "BASE_BACKUP started at {start_lsn} on timeline {start_tli}, {} tablespaces, ~{} MiB",
        bb.tablespaces.len(),
        estimate >> 20
    );
    let mut progress = Progress::new(ctx, Some(estimate));
    let mut done_bytes = 0u64;
    let mut chunks = Vec::new();
    let mut current: Option<OpenChunk> = None;
    let streamed: Result<_> = async {
        loop {
            let event = bb
                .next()
                .await
                .context("BASE_BACKUP stream")?
                .context("BASE_BACKUP ended without its end position")?;
            match event {
                BaseBackupEvent::Archive {
                    name,
                    tablespace_location,
                } => {
                    if let Some(c) = current.take() {
                        chunks.push(c.finish().await?);
                    }
                    if name.is_empty() || name.contains('/') || name == "backup_manifest" {
                        bail!("server sent an archive with an unusable name {name:?}");
                    }
                    let oid = tablespace_location
                        .as_ref()
                        .and_then(|_| name.strip_suffix(".tar")?.parse().ok());
                    let kind = if oid.is_some() {
                        ChunkKind::Tablespace
                    } else {
                        ChunkKind::Data
                    };
                    current = Some(OpenChunk::start(ctx, name, kind, oid));
                }
                BaseBackupEvent::ManifestStart => {
                    if let Some(c) = current.take() {
                        chunks.push(c.finish().await?);
                    }
                    current = Some(OpenChunk::start(
                        ctx,
                        "backup_manifest".into(),
                        ChunkKind::Manifest,
                        None,
                    ));
                }
                BaseBackupEvent::ArchiveData(d) | BaseBackupEvent::ManifestData(d) => {
                    done_bytes += d.len() as u64;
                    let c = current
                        .as_mut()
                        .context("BASE_BACKUP sent data before any archive")?;
                    if !c.send(d).await {
                        // The upload failed: its error is the one to report.
                        if let Some(c) = current.take() {
                            c.finish().await?;
                        }
                        bail!("upload stopped");
                    }
                    progress.update(done_bytes);
                }
                BaseBackupEvent::Progress(_) => {}
                BaseBackupEvent::Finished { end_lsn, end_tli } => {
                    if let Some(c) = current.take() {
                        chunks.push(c.finish().await?);
                    }
                    return Ok((end_lsn, end_tli));
                }
            }
        }
    }
    .await;
    let (end_lsn, end_tli) = match streamed {
        Ok(v) => v,
        Err(e) => {
            if let Some(c) = current.take() {
                c.abort();
            }
            return Err(e);
        }
    };
    let end_time = now_rfc3339();
    client.close().await.ok();
    if !chunks.iter().any(|c| c.kind == ChunkKind::Manifest) {
        bail!("BASE_BACKUP sent no backup_manifest");
    }
    let mut meta = describe(
        ctx,
        FORMAT_STREAM,
        version,
        (start_lsn, start_tli, start_time),
        (end_lsn, end_tli, end_time),
        seg,
        chunks,
        tablespaces,
        ctx.standalone(),
    );
    meta.system_identifier = Some(id.system_id.to_string());
    ctx.upload_control(&meta, Vec::new()).await?;
    Ok(meta)
}
