//! Taking a basebackup into a site's archive.
//!
//! [`take`] connects to the site's first node and runs the configured `basebackup_mode`:
//! - `basic` / `pipe` ([`stream`]): BASE_BACKUP over a replication connection; each
//!   tablespace's tar and the backup_manifest stream straight through compress → encrypt →
//!   store, one chunk object each.
//! - `local-tar` ([`local_tar`]): `pg_backup_start` on an SQL session, the data directory read
//!   here and tarred into chunks of about `basebackup_chunk_size`, uploaded in parallel.
//!
//! Chunks go to `basebackup_chunk/<name>/…`; the control object `basebackup/<name>` is
//! written last, so a backup is listed only when every chunk is stored. A failed backup
//! deletes the chunks it stored; one interrupted harder (process killed, future dropped) leaves
//! unlisted chunks that [`orphan_chunk_dirs`] finds ([`inventory`] says which objects walhoard
//! may delete). Format: docs/formats.md.

pub mod incremental;
pub mod inventory;
pub mod local_tar;
pub mod request;
pub mod stream;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use walhoard_basebackup::control::{BackupMetadata, METADATA_MEMBER};
use walhoard_basebackup::tar::TarWriter;
use walhoard_protocol::{Lsn, SegmentId, SegmentSize, TimelineId};

use crate::config::{BackupMode, BasebackupMode, Config, SiteConfig};
use crate::pipeline::compression::CompressionSettings;
use crate::pipeline::hash::HashAlgorithm;
use crate::pipeline::transfer::{
    upload, Hashing, Input, ObjectKind, Source, Upload, UploadEncryption, Uploaded,
};
use crate::settings::{Node, SiteSettings};
use crate::storage::meta::ObjectMeta;
use crate::storage::ObjectStore;

/// A backup that is stored and listed.
#[derive(Debug, Clone)]
pub struct BackupInfo {
    /// `basebackup/<name>` is its control object.
    pub name: String,
    pub metadata: BackupMetadata,
    /// Wall-clock duration of the backup.
    pub elapsed: Duration,
}

/// Everything a backup run needs, resolved once from the configuration.
#[derive(Clone)]
pub struct BackupContext {
    pub site: String,
    pub store: ObjectStore,
    pub site_config: SiteConfig,
    /// The site's nodes, parsed; backups are taken from the first.
    pub nodes: Vec<Node>,
    pub compression: CompressionSettings,
    pub encryption: Option<UploadEncryption>,
    pub name: String,
    pub host: String,
    /// `CHECKPOINT 'fast'` rather than a spread checkpoint.
    pub fast_checkpoint: bool,
    /// BASE_BACKUP's MAX_RATE in kB/s (basic/pipe), to spare a busy primary.
    pub max_rate_kbps: Option<u32>,
    /// The site's private keys, to read the parent's manifest (`incremental` mode only).
    pub keys: Option<crate::pipeline::encryption::KeyRing>,
    /// Keys of chunks stored so far, deleted if the backup fails.
    stored: Arc<std::sync::Mutex<Vec<String>>>,
    /// Bytes read so far and the estimated total, for the daemon's state file.
    pub progress: Arc<BackupProgress>,
}

/// How far a running backup is, shared with whoever reports it.
#[derive(Debug, Default)]
pub struct BackupProgress {
    pub done_bytes: std::sync::atomic::AtomicU64,
    /// 0 while unknown.
    pub total_bytes: std::sync::atomic::AtomicU64,
}

/// RFC 3339 UTC timestamp of now.
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

/// A backup name not used by a listed backup nor by chunks of an interrupted one:
/// pghoard's `YYYY-MM-DD_HH-MM_<n>`.
pub async fn choose_name(store: &ObjectStore) -> Result<String> {
    let stamp = jiff::Timestamp::now()
        .strftime("%Y-%m-%d_%H-%M")
        .to_string();
    for i in 0..10_000 {
        let name = format!("{stamp}_{i}");
        if store.stat(&format!("basebackup/{name}")).await?.is_none()
            && store
                .list(&format!("basebackup_chunk/{name}"))
                .await?
                .is_empty()
        {
            return Ok(name);
        }
    }
    bail!("no free basebackup name for {stamp}")
}

impl BackupContext {
    /// [`BackupContext::for_site`] for site `site` of a raw configuration (the command line,
    /// tests).
    pub async fn new(config: &Config, site: &str) -> Result<Self> {
        Self::for_site(&SiteSettings::build(config, site)?).await
    }

    /// Opens the site's store and picks the backup's name.
    pub async fn for_site(site: &SiteSettings) -> Result<Self> {
        let store = site.open_store()?;
        let name = choose_name(&store).await?;
        Ok(BackupContext {
            site: site.name.clone(),
            compression: site.basebackup_compression,
            encryption: site.encryption()?,
            store,
            site_config: site.config.clone(),
            nodes: site.nodes.clone(),
            name,
            host: crate::settings::hostname(),
            fast_checkpoint: true,
            max_rate_kbps: None,
            keys: match site.config.basebackup_mode {
                BasebackupMode::Incremental => Some(site.keys()?),
                _ => None,
            },
            stored: Arc::default(),
            progress: Arc::default(),
        })
    }

    /// Connection settings of the site's first node.
    pub fn node_params(&self) -> Result<walhoard_protocol::ConnectParams> {
        let node = self.nodes.first().with_context(|| {
            format!(
                "backup_sites.{}.nodes is empty: nothing to back up",
                self.site
            )
        })?;
        Ok(node.params.clone())
    }

    pub fn standalone(&self) -> bool {
        self.site_config.active_backup_mode == BackupMode::StandaloneHotBackup
    }

    /// Metadata every object of this backup carries.
    fn base_metadata(&self) -> ObjectMeta {
        ObjectMeta {
            host: Some(self.host.clone()),
            backup_name: Some(self.name.clone()),
            ..ObjectMeta::default()
        }
    }

    /// Stores a chunk produced by `produce` under `basebackup_chunk/<name>/<file>`.
    pub async fn upload_chunk<F>(&self, file: &str, produce: F) -> Result<(String, Uploaded)>
    where
        F: FnOnce(&mut dyn Write) -> std::io::Result<()> + Send + 'static,
    {
        self.store_chunk(file, Input::Plain, None, produce).await
    }

    /// [`BackupContext::upload_chunk`] with `format` in the chunk's own object metadata.
    /// pghoard's restore picks each chunk's tar path transform by it (`_build_tar_args` in
    /// pghoard/restore.py strips `pgdata/` only for a `pghoard-bb-*` chunk), so local-tar
    /// chunks must say `pghoard-bb-v2` for pghoard to restore them.
    pub async fn upload_chunk_with_format<F>(
        &self,
        file: &str,
        format: &str,
        produce: F,
    ) -> Result<(String, Uploaded)>
    where
        F: FnOnce(&mut dyn Write) -> std::io::Result<()> + Send + 'static,
    {
        self.store_chunk(file, Input::Plain, Some(format), produce)
            .await
    }

    /// [`BackupContext::upload_chunk`] for bytes that are a stream of the site's compression
    /// already (server-side compressed): encrypted and stored as they are.
    pub async fn upload_precompressed_chunk<F>(
        &self,
        file: &str,
        produce: F,
    ) -> Result<(String, Uploaded)>
    where
        F: FnOnce(&mut dyn Write) -> std::io::Result<()> + Send + 'static,
    {
        self.store_chunk(file, Input::Compressed, None, produce)
            .await
    }

    async fn store_chunk<F>(
        &self,
        file: &str,
        input: Input,
        format: Option<&str>,
        produce: F,
    ) -> Result<(String, Uploaded)>
    where
        F: FnOnce(&mut dyn Write) -> std::io::Result<()> + Send + 'static,
    {
        let rel = format!("{}/{file}", self.name);
        let key = format!("basebackup_chunk/{rel}");
        // Recorded before the upload: a failure may still have left parts behind.
        if let Ok(mut s) = self.stored.lock() {
            s.push(key.clone());
        }
        let metadata = ObjectMeta {
            format: format.map(str::to_string),
            ..self.base_metadata()
        };
        let uploaded = upload(
            &self.store,
            Upload {
                kind: ObjectKind::BasebackupChunk,
                key: key.clone(),
                source: Source::produced(produce),
                input,
                hashing: Hashing::Sha1Returned,
                compression: self.compression,
                encryption: self.encryption.clone(),
                metadata,
            },
        )
        .await;
        self.count_upload(crate::metrics::FileType::BasebackupChunk, &uploaded);
        let uploaded = uploaded.with_context(|| format!("store basebackup chunk {key}"))?;
        Ok((rel, uploaded))
    }

    /// Writes the control object `basebackup/<name>`: a tar of the metadata JSON and `extra`
    /// members (name, bytes). Its object metadata carries pghoard's basebackup keys.
    pub async fn upload_control(
        &self,
        meta: &BackupMetadata,
        extra: Vec<(String, Vec<u8>)>,
    ) -> Result<Uploaded> {
        let json = serde_json::to_vec_pretty(meta)?;
        let mtime = jiff::Timestamp::now().as_second().max(0) as u64;
        let mut tar = TarWriter::new(Vec::new());
        tar.append_bytes(METADATA_MEMBER, 0o600, mtime, &json)?;
        for (path, data) in &extra {
            tar.append_bytes(path, 0o600, mtime, data)?;
        }
        let body = tar.finish()?;
        let lsn = |what: &str, l: &str| -> Result<Lsn> {
            l.parse()
                .with_context(|| format!("basebackup {}: {what} {l:?}", self.name))
        };
        let m = ObjectMeta {
            format: Some(meta.format.clone()),
            start_wal_segment: Some(meta.backup_start_wal_segment.clone()),
            start_time: Some(meta.backup_start_time.clone()),
            end_wal_segment: Some(meta.backup_end_wal_segment.clone()),
            end_time: Some(meta.backup_end_time.clone()),
            start_lsn: Some(lsn("start-lsn", &meta.start_lsn)?),
            end_lsn: Some(lsn("end-lsn", &meta.end_lsn)?),
            start_timeline: Some(meta.start_timeline),
            pg_version: Some(meta.pg_version),
            total_size_plain: Some(meta.total_size_plain),
            total_size_enc: Some(meta.total_size_enc),
            basebackup_mode: Some(meta.basebackup_mode.clone()),
            active_backup_mode: Some(meta.active_backup_mode.clone()),
            backup_type: Some(meta.backup_type),
            incremental_parent: meta.incremental_parent.clone(),
            ..self.base_metadata()
        };
        let key = format!("basebackup/{}", self.name);
        // pghoard's control objects record the SHA-1 of the tar (`original-file-size`,
        // `hash`, `hash-algorithm`), whatever the site's hash_algorithm.
        let uploaded = upload(
            &self.store,
            Upload {
                kind: ObjectKind::BasebackupControl,
                key: key.clone(),
                source: Source::bytes(body),
                input: Input::Plain,
                hashing: Hashing::Recorded(HashAlgorithm::Sha1),
                compression: self.compression,
                encryption: self.encryption.clone(),
                metadata: m,
            },
        )
        .await;
        self.count_upload(crate::metrics::FileType::Basebackup, &uploaded);
        uploaded.with_context(|| format!("store basebackup control object {key}"))
    }

    /// `pghoard.upload_size` and its companions for one object of this backup.
    fn count_upload<E>(&self, ty: crate::metrics::FileType, uploaded: &Result<Uploaded, E>) {
        let algorithm = self.compression.algorithm.name();
        crate::metrics::upload(&self.site, ty, algorithm, uploaded);
    }

    /// Deletes the chunks this backup stored (after a failure). Best effort: what remains is
    /// unlisted and found by [`orphan_chunk_dirs`].
    pub async fn delete_stored_chunks(&self) {
        let keys = self.stored.lock().map(|s| s.clone()).unwrap_or_default();
        for key in keys {
            if let Err(e) = self.store.delete(&key).await {
                tracing::warn!(site = %self.site, "cannot delete chunk {key} of a failed backup: {e}");
            }
        }
    }
}

/// The segment holding the last byte before `end` (XLByteToPrevSeg): the last WAL file a
/// backup ending at `end` needs.
pub fn last_needed_segment(tli: TimelineId, end: Lsn, seg: SegmentSize) -> SegmentId {
    SegmentId::containing(tli, Lsn(end.0.saturating_sub(1)), seg)
}

/// Fills the fields every mode records the same way.
#[allow(clippy::too_many_arguments)]
pub(crate) fn describe(
    ctx: &BackupContext,
    format: &str,
    pg_version: u32,
    start: (Lsn, TimelineId, String),
    end: (Lsn, TimelineId, String),
    seg: SegmentSize,
    chunks: Vec<walhoard_basebackup::control::ChunkMeta>,
    tablespaces: BTreeMap<String, walhoard_basebackup::control::TablespaceMeta>,
    wal_included: bool,
) -> BackupMetadata {
    let mode = match ctx.site_config.basebackup_mode {
        BasebackupMode::Basic => "basic",
        BasebackupMode::Pipe => "pipe",
        BasebackupMode::LocalTar => "local-tar",
        BasebackupMode::Delta => "delta",
        BasebackupMode::LocalTarDeltaStats => "local-tar-delta-stats",
        BasebackupMode::Incremental => "incremental",
    };
    let active = match ctx.site_config.active_backup_mode {
        BackupMode::Walreceiver => "walreceiver",
        BackupMode::ArchiveCommand => "archive_command",
        BackupMode::StandaloneHotBackup => "standalone_hot_backup",
    };
    BackupMetadata {
        backup_start_time: start.2,
        backup_start_wal_segment: SegmentId::containing(start.1, start.0, seg).to_string(),
        backup_end_time: end.2,
        backup_end_wal_segment: last_needed_segment(end.1, end.0, seg).to_string(),
        pgdata: ctx
            .site_config
            .pg_data_directory
            .as_ref()
            .map(|p: &PathBuf| p.display().to_string()),
        pghoard_object: "basebackup".into(),
        pghoard_version: format!("walhoard {}", env!("CARGO_PKG_VERSION")),
        tablespaces,
        host: ctx.host.clone(),
        total_size_plain: chunks.iter().map(|c| c.input_size).sum(),
        total_size_enc: chunks.iter().map(|c| c.result_size).sum(),
        chunks,
        format: format.into(),
        start_lsn: start.0.to_string(),
        end_lsn: end.0.to_string(),
        start_timeline: start.1.get(),
        end_timeline: end.1.get(),
        pg_version,
        system_identifier: None,
        basebackup_mode: mode.into(),
        active_backup_mode: active.into(),
        wal_included,
        compression_algorithm: ctx.compression.algorithm.name().into(),
        encryption_key_id: ctx.encryption.as_ref().map(|e| e.key_id.clone()),
        tablespace_map: String::new(),
        backup_type: Default::default(),
        incremental_parent: None,
    }
}

/// Logs progress at most every few seconds.
pub(crate) struct Progress {
    what: String,
    total: Option<u64>,
    last: Instant,
    started: Instant,
    shared: Arc<BackupProgress>,
}

impl Progress {
    pub(crate) fn new(ctx: &BackupContext, total: Option<u64>) -> Self {
        use std::sync::atomic::Ordering;
        ctx.progress
            .total_bytes
            .store(total.unwrap_or(0), Ordering::Relaxed);
        ctx.progress.done_bytes.store(0, Ordering::Relaxed);
        Progress {
            what: format!("basebackup {}", ctx.name),
            total,
            last: Instant::now(),
            started: Instant::now(),
            shared: ctx.progress.clone(),
        }
    }

    pub(crate) fn update(&mut self, done: u64) {
        self.shared
            .done_bytes
            .store(done, std::sync::atomic::Ordering::Relaxed);
        if self.last.elapsed() < Duration::from_secs(5) {
            return;
        }
        self.last = Instant::now();
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        match self.total {
            Some(t) if t > 0 => tracing::info!(
                "{}: {:.1} of ~{:.1} MiB ({:.0}%), {:.0}s",
                self.what,
                mib(done),
                mib(t),
                100.0 * done as f64 / t as f64,
                self.started.elapsed().as_secs_f64()
            ),
            _ => tracing::info!(
                "{}: {:.1} MiB, {:.0}s",
                self.what,
                mib(done),
                self.started.elapsed().as_secs_f64()
            ),
        }
    }
}

/// Takes one basebackup of `site` now, as its configuration says; returns it once listed.
pub async fn take(config: &Config, site: &str) -> Result<BackupInfo> {
    let ctx = BackupContext::new(config, site).await?;
    take_with(ctx).await
}

/// [`take`] with a prepared context (tests set the name or the checkpoint mode).
pub async fn take_with(ctx: BackupContext) -> Result<BackupInfo> {
    let started = Instant::now();
    tracing::info!(site = %ctx.site, "starting basebackup {} ({:?})", ctx.name, ctx.site_config.basebackup_mode);
    let result = match ctx.site_config.basebackup_mode {
        BasebackupMode::Basic | BasebackupMode::Pipe | BasebackupMode::Incremental => {
            stream::run(&ctx).await
        }
        BasebackupMode::LocalTar => local_tar::run(&ctx).await,
        other => Err(anyhow::anyhow!(
            "backup_sites.{}.basebackup_mode {other:?} is not supported",
            ctx.site
        )),
    };
    match result {
        Ok(metadata) => {
            let elapsed = started.elapsed();
            tracing::info!(
                site = %ctx.site,
                "basebackup {} stored: {} chunks, {} bytes plain, {} stored, {:.1}s",
                ctx.name,
                metadata.chunks.len(),
                metadata.total_size_plain,
                metadata.total_size_enc,
                elapsed.as_secs_f64()
            );
            Ok(BackupInfo {
                name: ctx.name.clone(),
                metadata,
                elapsed,
            })
        }
        Err(e) => {
            ctx.delete_stored_chunks().await;
            Err(e.context(format!("basebackup {} of site {}", ctx.name, ctx.site)))
        }
    }
}

/// Names of `basebackup_chunk/<name>` directories that walhoard wrote and no control object
/// names: chunks of backups that were interrupted (or are being taken right now). Retention
/// deletes only those older than [`inventory::ORPHAN_MIN_AGE`]; directories walhoard did not
/// write are never among them ([`inventory`]).
pub async fn orphan_chunk_dirs(store: &ObjectStore) -> Result<Vec<String>> {
    let now = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
    Ok(inventory::scan(store, now)
        .await?
        .chunk_dirs
        .into_iter()
        .filter(|d| {
            matches!(
                d.state,
                inventory::ChunkDirState::Orphan | inventory::ChunkDirState::Recent
            )
        })
        .map(|d| d.name)
        .collect())
}
