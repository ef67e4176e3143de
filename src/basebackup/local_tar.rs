//! `local-tar` mode: a non-exclusive backup started over SQL, the data directory read here,
//! tarred into chunks of about `basebackup_chunk_size` (pghoard's `pghoard-bb-v2` layout) and
//! stored by up to `min(basebackup_threads, basebackup_chunks_in_progress)` uploads at once.
//! Nothing is staged on disk.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::task::JoinSet;
use walhoard_basebackup::control::{
    BackupMetadata, ChunkKind, ChunkMeta, TablespaceMeta, FORMAT_LOCAL_TAR,
};
use walhoard_basebackup::label::parse_backup_label;
use walhoard_basebackup::sql::{self, StoppedBackup};
use walhoard_basebackup::tar::{Member, MemberKind, TarWriter};
use walhoard_basebackup::walk;
use walhoard_basebackup::walk::{plan_chunks, Entry, Walker};
use walhoard_protocol::xlog::{page_magic_for, validate_pages, PageExpectation};
use walhoard_protocol::{Connection, Lsn, SegmentId, SegmentSize, TimelineId};

use super::{describe, last_needed_segment, now_rfc3339, BackupContext, Progress};

/// Writes one chunk's entries as a tar. Files that vanished since the walk are skipped;
/// files that changed size are cut or zero-padded to the walked size (see TarWriter).
pub(super) fn write_chunk(
    entries: &[Entry],
    out: &mut dyn io::Write,
    read: &AtomicU64,
) -> io::Result<()> {
    let mut tar = TarWriter::new(out);
    for e in entries {
        match &e.member.kind {
            MemberKind::File { .. } => {
                let mut f = match std::fs::File::open(&e.local) {
                    Ok(f) => f,
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {
                        tracing::debug!("{} vanished during the backup", e.local.display());
                        continue;
                    }
                    Err(err) => {
                        return Err(io::Error::new(
                            err.kind(),
                            format!("open {}: {err}", e.local.display()),
                        ))
                    }
                };
                let n = tar.append_file(&e.member, &mut f).map_err(|err| {
                    io::Error::new(err.kind(), format!("read {}: {err}", e.local.display()))
                })?;
                read.fetch_add(n, Ordering::Relaxed);
            }
            _ => tar.append_entry(&e.member)?,
        }
    }
    tar.finish()?;
    Ok(())
}

pub(super) fn data_chunk(
    rel: String,
    up: crate::pipeline::transfer::Uploaded,
    files: Vec<String>,
) -> ChunkMeta {
    ChunkMeta {
        chunk_filename: rel,
        input_size: up.plain_size,
        result_size: up.stored_size,
        files,
        kind: ChunkKind::Data,
        tablespace_oid: None,
        hash: up.hash,
        server_compressed: false,
    }
}

pub(super) fn chunk_file(name: &str, n: usize) -> String {
    format!("{name}.{n:08}.pghoard")
}

/// The WAL from the start segment to the last needed one, read from `pg_wal` and checked page
/// by page, as `pgdata/pg_wal/<segment>` members.
fn wal_entries(
    pgdata: &Path,
    first: SegmentId,
    last: SegmentId,
    seg: SegmentSize,
) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut s = first;
    loop {
        let local = pgdata.join("pg_wal").join(s.to_string());
        let meta = std::fs::metadata(&local).with_context(|| {
            format!(
                "WAL segment {s} for the standalone backup: {}",
                local.display()
            )
        })?;
        if meta.len() != seg.bytes() {
            bail!(
                "WAL segment {} is {} bytes, not {}",
                local.display(),
                meta.len(),
                seg.bytes()
            );
        }
        out.push(Entry {
            member: Member {
                path: format!("pgdata/pg_wal/{s}"),
                kind: MemberKind::File { size: meta.len() },
                mode: 0o600,
                mtime: 0,
            },
            local,
        });
        if s == last {
            return Ok(out);
        }
        s = s.next(seg)?;
    }
}

fn check_wal(
    entries: &[Entry],
    seg: SegmentSize,
    major: u32,
    system_id: u64,
    tli: TimelineId,
) -> Result<()> {
    let magic = page_magic_for(major)
        .with_context(|| format!("no WAL page magic known for PostgreSQL {major}"))?;
    let expect = PageExpectation {
        magic,
        seg_size: seg,
        system_id: Some(system_id),
        max_tli: Some(tli),
    };
    for e in entries {
        let name = e.member.path.rsplit('/').next().unwrap_or_default();
        let id: walhoard_protocol::WalSegmentName = name
            .parse()
            .with_context(|| format!("WAL file name {name}"))?;
        let start = id
            .segment()
            .with_context(|| format!("{name} is not a segment"))?
            .start_lsn(seg)?;
        let data =
            std::fs::read(&e.local).with_context(|| format!("read {}", e.local.display()))?;
        validate_pages(&data, start, &expect, true)
            .with_context(|| format!("WAL segment {name} in pg_wal"))?;
    }
    Ok(())
}

async fn query_text(conn: &mut Connection, sql: &str, col: &str) -> Result<String> {
    let r = conn
        .query_one_result(sql)
        .await
        .with_context(|| sql.to_string())?;
    Ok(r.required(0, col)?)
}

/// A non-exclusive backup in progress on an SQL session: what local-tar and delta mode share.
pub(super) struct Session {
    pub conn: Connection,
    pub pgdata: PathBuf,
    /// `server_version_num`.
    pub version: u32,
    pub major: u32,
    pub seg: SegmentSize,
    pub system_id: u64,
    pub start_time: String,
    pub start_lsn: Lsn,
    pub tablespaces: Vec<walk::Tablespace>,
}

/// What the end of the backup gave.
pub(super) struct Ended {
    pub pg_control: Vec<u8>,
    pub stopped: StoppedBackup,
    pub end_time: String,
    pub tli: TimelineId,
    /// standalone_hot_backup: the WAL from the start to the end of the backup, checked.
    pub wal: Option<Vec<Entry>>,
}

/// Checks the data directory, connects and starts the backup (`mode` names it in errors).
pub(super) async fn begin(ctx: &BackupContext, mode: &str) -> Result<Session> {
    let pgdata: PathBuf = ctx
        .site_config
        .pg_data_directory
        .clone()
        .with_context(|| format!("backup_sites.{}.pg_data_directory is not set", ctx.site))?;
    if !pgdata.join("PG_VERSION").is_file() {
        bail!(
            "backup_sites.{}.pg_data_directory {} is not a PostgreSQL data directory",
            ctx.site,
            pgdata.display()
        );
    }
    let params = ctx.node_params()?.for_sql();
    let mut conn = Connection::connect(&params)
        .await
        .with_context(|| format!("connect to {params} for a {mode} backup"))?;
    let version = conn.server_version_num()?;
    let major = version / 10000;
    let seg = SegmentSize::from_show(
        &query_text(&mut conn, "SHOW wal_segment_size", "wal_segment_size").await?,
    )?;
    let system_id: u64 = query_text(
        &mut conn,
        "SELECT system_identifier::text AS id FROM pg_control_system()",
        "id",
    )
    .await?
    .parse()
    .context("system_identifier")?;
    if ctx.standalone() {
        // Holds the WAL from the backup's start until this session ends, so the segments the
        // standalone backup must carry are still in pg_wal when it stops.
        conn.simple_query(&format!(
            "SELECT pg_create_physical_replication_slot('walhoard_bb_{}', true, true)",
            conn.backend_pid()
        ))
        .await
        .context("create a temporary slot to keep the backup's WAL")?;
    }
    let start_time = now_rfc3339();
    let start_lsn = sql::start_backup(
        &mut conn,
        &format!("walhoard {}", ctx.name),
        ctx.fast_checkpoint,
    )
    .await
    .context("start the backup")?;
    let tablespaces = sql::tablespaces(&mut conn, &pgdata)
        .await
        .map_err(anyhow::Error::msg)?;
    tracing::info!(site = %ctx.site, "backup started at {start_lsn}; reading {} and {} tablespaces", pgdata.display(), tablespaces.len());
    Ok(Session {
        conn,
        pgdata,
        version,
        major,
        seg,
        system_id,
        start_time,
        start_lsn,
        tablespaces,
    })
}

impl Session {
    /// Walks the data directory and tablespaces (PostgreSQL's exclusion rules).
    pub(super) fn walk(&self) -> impl std::future::Future<Output = Result<(Vec<Entry>, u64)>> {
        let (walk_dir, walk_ts, major) =
            (self.pgdata.clone(), self.tablespaces.clone(), self.major);
        async move {
            Ok(tokio::task::spawn_blocking(move || -> io::Result<_> {
                let mut w = Walker::new();
                let e = w.walk(&walk_dir, &walk_ts, major)?;
                Ok((e, w.vanished))
            })
            .await??)
        }
    }

    /// Reads `pg_control` (after every data file, as basebackup.c sends it last), stops the
    /// backup, checks the label and, standalone, collects the backup's WAL from `pg_wal`.
    pub(super) async fn end(&mut self, ctx: &BackupContext) -> Result<Ended> {
        let pgdata = self.pgdata.clone();
        let pg_control = tokio::fs::read(pgdata.join("global/pg_control"))
            .await
            .with_context(|| format!("read {}/global/pg_control", pgdata.display()))?;
        let stopped = sql::stop_backup(&mut self.conn)
            .await
            .context("stop the backup")?;
        let end_time = now_rfc3339();
        let label = parse_backup_label(&stopped.backup_label).map_err(anyhow::Error::msg)?;
        let tli = label.start_timeline.unwrap_or(TimelineId(1));
        if label.start_lsn != self.start_lsn {
            bail!(
                "backup_label starts at {}, pg_backup_start returned {}",
                label.start_lsn,
                self.start_lsn
            );
        }
        let wal = if ctx.standalone() {
            let (seg, major, system_id) = (self.seg, self.major, self.system_id);
            let first = SegmentId::containing(tli, self.start_lsn, seg);
            let last = last_needed_segment(tli, stopped.end_lsn, seg);
            Some(
                tokio::task::spawn_blocking(move || -> Result<Vec<Entry>> {
                    let e = wal_entries(&pgdata, first, last, seg)?;
                    check_wal(&e, seg, major, system_id, tli)?;
                    Ok(e)
                })
                .await??,
            )
        } else {
            None
        };
        Ok(Ended {
            pg_control,
            stopped,
            end_time,
            tli,
            wal,
        })
    }
}

pub async fn run(ctx: &BackupContext) -> Result<BackupMetadata> {
    let mut s = begin(ctx, "local-tar").await?;
    let (entries, vanished) = s.walk().await?;
    let total: u64 = entries.iter().map(Entry::size).sum();
    let planned = plan_chunks(entries, ctx.site_config.basebackup_chunk_size);
    tracing::info!(
        site = %ctx.site,
        "{:.1} MiB in {} chunks ({} files vanished while walking)",
        total as f64 / 1048576.0,
        planned.len(),
        vanished
    );

    let parallel = ctx
        .site_config
        .basebackup_threads
        .min(ctx.site_config.basebackup_chunks_in_progress)
        .max(1) as usize;
    let read = Arc::new(AtomicU64::new(0));
    let mut progress = Progress::new(ctx, Some(total));
    let mut tasks: JoinSet<Result<(usize, ChunkMeta)>> = JoinSet::new();
    let mut chunks: Vec<Option<ChunkMeta>> = vec![None; planned.len()];
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut pending = planned.into_iter().enumerate();
    loop {
        while tasks.len() < parallel {
            let Some((i, entries)) = pending.next() else {
                break;
            };
            let c = ctx.clone();
            let r = read.clone();
            tasks.spawn(async move {
                let files = entries.iter().map(|e| e.member.path.clone()).collect();
                let entries = Arc::new(entries);
                let (rel, up) = c
                    .upload_chunk_with_format(
                        &chunk_file(&c.name, i + 1),
                        FORMAT_LOCAL_TAR,
                        move |w| write_chunk(&entries, w, &r),
                    )
                    .await?;
                Ok((i, data_chunk(rel, up, files)))
            });
        }
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(r) => {
                    let (i, meta) = r.context("chunk upload task")??;
                    tracing::info!(site = %ctx.site, "stored chunk {} ({} bytes plain, {} stored)", meta.chunk_filename, meta.input_size, meta.result_size);
                    chunks[i] = Some(meta);
                }
            },
            _ = tick.tick() => progress.update(read.load(Ordering::Relaxed)),
        }
    }
    let mut chunks: Vec<ChunkMeta> = chunks.into_iter().flatten().collect();

    let mut ended = s.end(ctx).await?;
    if let Some(wal) = ended.wal.take() {
        let files = wal.iter().map(|e| e.member.path.clone()).collect();
        let n = chunks.len() + 1;
        let r = read.clone();
        let (rel, up) = ctx
            .upload_chunk_with_format(&chunk_file(&ctx.name, n), FORMAT_LOCAL_TAR, move |w| {
                write_chunk(&wal, w, &r)
            })
            .await?;
        chunks.push(data_chunk(rel, up, files));
    }
    let meta = session_metadata(ctx, &s, &ended, FORMAT_LOCAL_TAR, chunks);
    s.conn.close().await.ok();
    ctx.upload_control(&meta, control_members(ended)).await?;
    Ok(meta)
}

/// The backup's description, as local-tar and delta mode record it.
pub(super) fn session_metadata(
    ctx: &BackupContext,
    s: &Session,
    ended: &Ended,
    format: &str,
    chunks: Vec<ChunkMeta>,
) -> BackupMetadata {
    let ts_meta: BTreeMap<String, TablespaceMeta> = s
        .tablespaces
        .iter()
        .map(|t: &walk::Tablespace| {
            (
                t.name.clone(),
                TablespaceMeta {
                    oid: t.oid,
                    path: t.path.display().to_string(),
                },
            )
        })
        .collect();
    let mut meta = describe(
        ctx,
        format,
        s.version,
        (s.start_lsn, ended.tli, s.start_time.clone()),
        (ended.stopped.end_lsn, ended.tli, ended.end_time.clone()),
        s.seg,
        chunks,
        ts_meta,
        ctx.standalone(),
    );
    meta.system_identifier = Some(s.system_id.to_string());
    meta.tablespace_map = ended.stopped.tablespace_map.clone();
    meta
}

/// The control object's members besides the metadata: `pg_control` and `backup_label`.
pub(super) fn control_members(ended: Ended) -> Vec<(String, Vec<u8>)> {
    vec![
        ("pgdata/global/pg_control".into(), ended.pg_control),
        (
            "pgdata/backup_label".into(),
            ended.stopped.backup_label.into_bytes(),
        ),
    ]
}
