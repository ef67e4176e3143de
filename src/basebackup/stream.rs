//! `basic` / `pipe` mode: BASE_BACKUP over a replication connection. Each archive the server
//! sends (`base.tar`, `<oid>.tar`) and the `backup_manifest` becomes one chunk object, streamed
//! through compress → encrypt → store as it arrives: no temporary copy, memory bounded by the
//! pipeline's queues.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use walhoard_basebackup::control::{
    BackupMetadata, BackupType, ChunkKind, ChunkMeta, TablespaceMeta, FORMAT_STREAM,
};
use walhoard_protocol::{BaseBackupEvent, BaseBackupOptions, BaseBackupStream};

use super::{describe, now_rfc3339, BackupContext, Progress};
use crate::config::BasebackupMode;
use crate::pipeline::compression::Algorithm;
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
    /// Set for a server-compressed archive: the plain size and SHA-1, from decoding the
    /// server's stream on the way (the stored bytes are the compressed stream).
    plain: Option<PlainResult>,
}

/// Plain size and SHA-1 (hex) of a decoded server-compressed archive, once it ended.
type PlainResult = Arc<Mutex<Option<(u64, String)>>>;

/// Counts and hashes what a decoder writes into it.
struct PlainDigest {
    size: u64,
    hash: aws_lc_rs::digest::Context,
}

impl Write for PlainDigest {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.size += data.len() as u64;
        self.hash.update(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl OpenChunk {
    /// `server_compressed`: the archive arrives as a zstd stream from the server.
    fn start(
        ctx: &BackupContext,
        file: String,
        kind: ChunkKind,
        tablespace_oid: Option<u32>,
        server_compressed: bool,
    ) -> Self {
        let (tx, mut rx) = mpsc::channel::<Piece>(4);
        let what = file.clone();
        let c = ctx.clone();
        let f = file.clone();
        let plain = server_compressed.then(|| Arc::new(Mutex::new(None)));
        let plain_out = plain.clone();
        let task = tokio::spawn(async move {
            let produce = move |w: &mut dyn Write| {
                // Decoding as it goes both checks the server's stream and gives the plain
                // size and hash that restore verifies.
                let mut decoder = match &plain_out {
                    Some(_) => Some(zstd::stream::write::Decoder::new(PlainDigest {
                        size: 0,
                        hash: aws_lc_rs::digest::Context::new(
                            &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
                        ),
                    })?),
                    None => None,
                };
                while let Some(piece) = rx.blocking_recv() {
                    match piece {
                        Piece::Data(d) => {
                            w.write_all(&d)?;
                            if let Some(dec) = decoder.as_mut() {
                                dec.write_all(&d)?;
                            }
                        }
                        Piece::End => {
                            if let (Some(mut dec), Some(cell)) = (decoder, &plain_out) {
                                dec.flush()?;
                                let digest = dec.into_inner();
                                let hash = hex::encode(digest.hash.finish());
                                *cell.lock().unwrap_or_else(|p| p.into_inner()) =
                                    Some((digest.size, hash));
                            }
                            return Ok(());
                        }
                    }
                }
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("BASE_BACKUP stopped in the middle of {what}"),
                ))
            };
            if server_compressed {
                c.upload_precompressed_chunk(&f, produce).await
            } else {
                c.upload_chunk(&f, produce).await
            }
        });
        OpenChunk {
            file,
            kind,
            tablespace_oid,
            pending: BytesMut::with_capacity(PIECE_SIZE),
            tx,
            task,
            plain,
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
        let (input_size, hash, server_compressed) = match &self.plain {
            Some(cell) => {
                let (size, hash) = cell
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .with_context(|| format!("{}: the server's stream did not end", self.file))?;
                (size, hash, true)
            }
            None => (up.plain_size, up.hash, false),
        };
        Ok(ChunkMeta {
            chunk_filename: rel,
            input_size,
            result_size: up.stored_size,
            files: Vec::new(),
            kind: self.kind,
            tablespace_oid: self.tablespace_oid,
            hash,
            server_compressed,
        })
    }

    fn abort(self) {
        self.task.abort();
    }
}

/// Whether PostgreSQL should compress the archives: the site's `basebackup_server_compression`
/// when set; by default when the site compresses with zstd and the node is reached over TCP at
/// a non-loopback address (fewer bytes on the wire; on the same machine it only moves the work
/// onto the primary). Needs PostgreSQL 15 and zstd as the site's compression either way.
fn server_compression(
    ctx: &BackupContext,
    params: &walhoard_protocol::ConnectParams,
    version: u32,
) -> bool {
    if version < 150000 || ctx.compression.algorithm != Algorithm::Zstd {
        return false;
    }
    ctx.site_config
        .basebackup_server_compression
        .unwrap_or_else(|| match &params.host {
            walhoard_protocol::Host::Tcp(h) => {
                let loopback = h == "localhost"
                    || h.parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                !loopback
            }
            walhoard_protocol::Host::Unix(_) => false,
        })
}

/// What one BASE_BACKUP stored.
struct Streamed {
    start: (walhoard_protocol::Lsn, walhoard_protocol::TimelineId),
    end: (walhoard_protocol::Lsn, walhoard_protocol::TimelineId),
    tablespaces: BTreeMap<String, TablespaceMeta>,
    chunks: Vec<ChunkMeta>,
}

pub async fn run(ctx: &BackupContext) -> Result<BackupMetadata> {
    let params = ctx.node_params()?;
    let (mut client, id, seg) = crate::server::identify(&params, " for BASE_BACKUP").await?;
    let version = client.connection().server_version_num()?;
    let mut parent = match ctx.site_config.basebackup_mode {
        BasebackupMode::Incremental => {
            super::incremental::prepare(ctx, &mut client, &id, version).await?
        }
        _ => None,
    };
    let server_zstd = server_compression(ctx, &params, version);
    if server_zstd {
        tracing::info!(site = %ctx.site, "PostgreSQL compresses the archives (zstd level {})", ctx.compression.level);
    }
    let mut opts = BaseBackupOptions {
        label: format!("walhoard {}", ctx.name),
        progress: true,
        fast_checkpoint: ctx.fast_checkpoint,
        wal: ctx.standalone(),
        wait_for_archive: false,
        manifest: true,
        manifest_checksums: None,
        tablespace_map: true,
        max_rate: ctx.max_rate_kbps,
        compression: server_zstd.then(|| "zstd".to_string()),
        compression_detail: server_zstd.then(|| format!("level={}", ctx.compression.level)),
        incremental: parent.is_some(),
    };
    let start_time = now_rfc3339();
    let streamed = match client.base_backup(&opts).await {
        Ok(bb) => Some(stream(ctx, bb, server_zstd).await?),
        // The server cannot take this one incrementally (WAL summaries missing for the
        // parent's range, ...): a full backup instead, on the same connection.
        Err(walhoard_protocol::Error::Server(e)) if opts.incremental => {
            tracing::warn!(
                site = %ctx.site,
                "incremental BASE_BACKUP on {} refused: {e}; basebackup {} is full",
                parent.as_deref().unwrap_or_default(),
                ctx.name
            );
            None
        }
        Err(e) => return Err(anyhow::Error::new(e).context("start BASE_BACKUP")),
    };
    let streamed = match streamed {
        Some(s) => s,
        None => {
            parent = None;
            opts.incremental = false;
            let bb = client
                .base_backup(&opts)
                .await
                .context("start BASE_BACKUP")?;
            stream(ctx, bb, server_zstd).await?
        }
    };
    let end_time = now_rfc3339();
    client.close().await.ok();
    let Streamed {
        start: (start_lsn, start_tli),
        end: (end_lsn, end_tli),
        tablespaces,
        chunks,
    } = streamed;
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
    if let Some(p) = parent {
        meta.backup_type = BackupType::Incremental;
        meta.incremental_parent = Some(p);
    }
    ctx.upload_control(&meta, Vec::new()).await?;
    Ok(meta)
}

/// Stores the archives and the manifest of a started BASE_BACKUP, one chunk each.
async fn stream(
    ctx: &BackupContext,
    mut bb: BaseBackupStream<'_>,
    server_zstd: bool,
) -> Result<Streamed> {
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
                    // Compressed archives are named `<name>.tar.zst`; stored under the plain
                    // name, as restore expects, labelled with the compression.
                    let name = match (server_zstd, name.strip_suffix(".zst")) {
                        (true, Some(n)) => n.to_string(),
                        (true, None) => bail!("server-compressed archive {name:?} is not .zst"),
                        (false, _) => name,
                    };
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
                    current = Some(OpenChunk::start(ctx, name, kind, oid, server_zstd));
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
                        false,
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
    Ok(Streamed {
        start: (start_lsn, start_tli),
        end: (end_lsn, end_tli),
        tablespaces,
        chunks,
    })
}
