//! `walhoard archive-sync`: pghoard_archive_sync's job (pghoard/archive_sync.py), run on the
//! database host after an outage or a failover. It compares the server's `pg_wal` with the
//! archive, uploads what the archive lacks or holds other bytes of, then checks that the
//! chain of WAL from the newest basebackup to the server's current segment is complete.
//!
//! What it reads and writes:
//! - The server (the site's first node) over a replication connection: IDENTIFY_SYSTEM (system
//!   identifier, timeline, current position), `wal_segment_size`, TIMELINE_HISTORY. The
//!   archive's newest segment must be this cluster's (as the daemon checks, [`identity`]).
//! - `<pg_data_directory>/pg_wal`: every `.history` file, and the complete segments from the
//!   newest basebackup's start segment up to (not including) the current one, each on the
//!   timeline recovery reads it from (the server's history says which). The current segment is still being written and files named after it
//!   are recycled ones: neither is uploaded. `.partial` files are left to the daemon.
//! - Each file is read once into memory (one segment at a time), its page headers checked
//!   (magic, page address, timeline, system identifier, as the daemon checks what it streams)
//!   or, for a history file, parsed; those bytes are what is compared and uploaded, so a
//!   segment the server recycles meanwhile is never uploaded under its old name.
//! - Compared by the `hash` the archive records (one metadata read per file): the same bytes
//!   are left alone; missing ones are uploaded through the pipeline (compression, encryption,
//!   the site's retry policy), as the daemon would.
//! - **Other bytes under the same name** (the diverged last segment of a failed primary): the
//!   archived object is first copied, unchanged (same stored bytes, same metadata), to
//!   `<key>.diverged-<UTC time>`, the copy checked for its size, and only then is this
//!   server's file uploaded under the name. pghoard re-uploads over the old object; the
//!   daemon refuses to (it cannot tell which is right); an operator running archive-sync on
//!   the server that is now the primary has said which one is, and the old bytes stay
//!   available. archive-cleanup and retention delete such copies by their segment, like WAL.
//!
//! Then (unless `--no-verify`) [`chain::check`] over the archive's listing: a gap exits
//! non-zero naming the first missing file, or with `--create-new-backup-on-failure` asks for
//! a new basebackup (the daemon's `PUT /<site>/basebackup`, or taken here when no daemon
//! listens, as `walhoard basebackup`) so recovery is possible again from there.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde::Serialize;
use walhoard_protocol::xlog::{page_magic_for, validate_pages};
use walhoard_protocol::{
    PageExpectation, SegmentId, SegmentSize, TimelineHistory, TimelineId, WalSegmentName,
};

use crate::config::Config;
use crate::daemon::archiver::{wal_key, Existing, UploadContext};
use crate::daemon::identity;
use crate::daemon::wal_retention::DIVERGED_SUFFIX;
use crate::pipeline::transfer::Source;
use crate::settings::SiteSettings;
use crate::storage::retry::with_retries;
use crate::storage::ObjectStore;

pub mod chain;

/// `--no-verify`, `--create-new-backup-on-failure`.
#[derive(Debug, Clone, Copy)]
pub struct SyncOptions {
    pub verify: bool,
    pub new_backup_on_failure: bool,
}

/// What happened to one file of `pg_wal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    /// The archive holds the same bytes.
    Archived,
    /// The archive lacked it: uploaded.
    Uploaded,
    /// The archive held other bytes: those moved to `moved_to`, this file uploaded.
    ReplacedDiverged { moved_to: String, why: String },
    /// Not uploaded: the file is no valid WAL; the reason.
    Skipped { why: String },
    /// Removed by the server between the listing and the read (it no longer needed it).
    Vanished,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileResult {
    pub file: String,
    #[serde(flatten)]
    pub action: Action,
}

/// What archive-sync did and found.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    pub site: String,
    pub timeline: u32,
    /// The segment being written (never uploaded).
    pub current_segment: String,
    pub newest_basebackup: Option<String>,
    pub files: Vec<FileResult>,
    /// The chain check (absent with `--no-verify`).
    pub chain: Option<chain::ChainReport>,
    /// The basebackup taken because of a gap (`--create-new-backup-on-failure`).
    pub new_basebackup: Option<String>,
}

impl SyncReport {
    /// Whether the command should exit non-zero: a gap nobody answered with a new backup, or
    /// a file that could not be uploaded.
    pub fn failure(&self) -> Option<String> {
        let skipped = self.files.iter().find_map(|f| match &f.action {
            Action::Skipped { why } => Some(format!("{} was not archived: {why}", f.file)),
            _ => None,
        });
        if skipped.is_some() {
            return skipped;
        }
        let c = self.chain.as_ref()?;
        let gap = c.first_gap()?;
        if self.new_basebackup.is_some() {
            return None;
        }
        Some(format!(
            "the archive's WAL from {} to {} is incomplete: first gap {gap} ({} missing)",
            c.from,
            c.to,
            c.missing.len()
        ))
    }
}

/// What the server says about itself.
struct Server {
    system_id: u64,
    tli: TimelineId,
    seg: SegmentSize,
    magic: u16,
    history: TimelineHistory,
    current: SegmentId,
}

async fn ask_server(site: &SiteSettings) -> Result<Server> {
    let node = site.first_node()?;
    let (mut client, id, seg) = crate::server::identify(&node.params, " for archive-sync").await?;
    let major = client.server_major().context("server_version")?;
    let magic = page_magic_for(major)
        .with_context(|| format!("PostgreSQL {major}: unknown WAL page magic"))?;
    let history = if id.timeline.get() > 1 {
        let (_, content) = client
            .timeline_history(id.timeline)
            .await
            .with_context(|| format!("TIMELINE_HISTORY {}", id.timeline))?;
        TimelineHistory::parse(id.timeline, &content)?
    } else {
        TimelineHistory {
            tli: id.timeline,
            switches: Vec::new(),
        }
    };
    client.close().await.ok();
    Ok(Server {
        system_id: id.system_id,
        tli: id.timeline,
        seg,
        magic,
        history,
        current: SegmentId::containing(id.timeline, id.xlogpos, seg),
    })
}

/// The files of `pg_wal` to compare with the archive, history files first, then segments in
/// WAL order.
fn candidates(pg_wal: &Path, server: &Server, first: Option<u64>) -> Result<Vec<WalSegmentName>> {
    let current = server.current.segno(server.seg)?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(pg_wal).with_context(|| format!("read {}", pg_wal.display()))? {
        let entry = entry.with_context(|| format!("read {}", pg_wal.display()))?;
        let Some(name) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<WalSegmentName>().ok())
        else {
            continue;
        };
        match name {
            WalSegmentName::History(_) => out.push(name),
            WalSegmentName::Segment(id) => {
                let Ok(n) = id.segno(server.seg) else {
                    continue;
                };
                // Only the file recovery reads for that segment: not a leftover of a
                // timeline the server's history left (RemoveNonParentXlogFiles removes most).
                if n < current
                    && first.is_none_or(|f| n >= f)
                    && id.tli == chain::timeline_for(&server.history, n, server.seg)
                {
                    out.push(name);
                }
            }
            _ => {}
        }
    }
    out.sort_by_key(|n| match n {
        WalSegmentName::History(t) => (0, u64::from(t.get()), 0),
        other => {
            let id = other.segment().unwrap_or(server.current);
            (
                1,
                id.segno(server.seg).unwrap_or(0),
                u64::from(id.tli.get()),
            )
        }
    });
    Ok(out)
}

/// Reads and checks one file of `pg_wal`; `Err` is why it must not be uploaded.
fn read_checked(path: &Path, name: &WalSegmentName, server: &Server) -> Result<Bytes, String> {
    let data = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    match name {
        WalSegmentName::History(t) => {
            TimelineHistory::parse(*t, &data).map_err(|e| e.to_string())?;
        }
        WalSegmentName::Segment(id) => {
            if data.len() as u64 != server.seg.bytes() {
                return Err(format!(
                    "{} bytes, not the segment size {}",
                    data.len(),
                    server.seg.bytes()
                ));
            }
            let start = id.start_lsn(server.seg).map_err(|e| e.to_string())?;
            let expect = PageExpectation {
                magic: server.magic,
                seg_size: server.seg,
                system_id: Some(server.system_id),
                max_tli: Some(server.tli),
            };
            validate_pages(&data, start, &expect, true).map_err(|e| e.to_string())?;
        }
        _ => return Err("not a segment or history file".into()),
    }
    Ok(Bytes::from(data))
}

/// Copies the stored object `key` (its stored bytes and metadata, streamed) to
/// `<key>.diverged-<now>`; returns the copy's key once its size matches.
async fn move_aside(store: &ObjectStore, key: &str) -> Result<String> {
    let stamp = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ");
    let copy = format!("{key}{DIVERGED_SUFFIX}{stamp}");
    let (metadata, _) = store
        .metadata_and_size(key)
        .await
        .with_context(|| format!("metadata of {key}"))?;
    let (writer, reader) = tokio::io::duplex(1 << 20);
    // The copy is committed only at the end of the reader; a failed read ends the join first.
    let (got, put) = tokio::try_join!(
        async { store.get(key, writer).await.map(|(_, n)| n) },
        store.put(&copy, reader, &metadata),
    )
    .with_context(|| format!("copy {key} to {copy}"))?;
    if got != put {
        store.delete(&copy).await.ok();
        bail!("copy {key} to {copy}: read {got} bytes, stored {put}");
    }
    Ok(copy)
}

/// Uploads `data` as `key` through the pipeline, under the site's retry policy.
async fn upload(ctx: &UploadContext, key: &str, data: Bytes) -> Result<()> {
    with_retries(&ctx.retry, key, || {
        ctx.upload_source(key, Source::bytes(data.clone()))
    })
    .await
    .with_context(|| format!("upload {key}"))
}

/// Brings one file of `pg_wal` into the archive.
async fn sync_file(
    ctx: &UploadContext,
    pg_wal: &Path,
    name: WalSegmentName,
    server: &Server,
) -> Result<Action> {
    let path: PathBuf = pg_wal.join(name.to_string());
    if !path.exists() {
        return Ok(Action::Vanished);
    }
    let data = match read_checked(&path, &name, server) {
        Ok(d) => d,
        Err(_) if !path.exists() => return Ok(Action::Vanished),
        Err(why) => return Ok(Action::Skipped { why }),
    };
    let key = wal_key(&name);
    let ours = data.clone();
    let existing = ctx
        .existing_with(&key, move |algorithm| {
            let mut h = algorithm.hasher();
            h.update(&ours);
            Ok(h.finish_hex())
        })
        .await
        .map_err(|e| anyhow::anyhow!("look up {key}: {e}"))?;
    match existing {
        Existing::Same => Ok(Action::Archived),
        Existing::Absent => {
            upload(ctx, &key, data).await?;
            Ok(Action::Uploaded)
        }
        Existing::Different(why) => {
            let moved_to = move_aside(&ctx.store, &key).await?;
            tracing::warn!(object = %key, moved_to = %moved_to, "archived with other bytes ({why}); kept the old object aside, uploading this server's");
            upload(ctx, &key, data).await?;
            Ok(Action::ReplacedDiverged { moved_to, why })
        }
    }
}

/// What the archive lists: segments under `xlog/`, history files under `timeline/`.
async fn archived(store: &ObjectStore) -> Result<chain::Archived> {
    let mut a = chain::Archived::default();
    for dir in ["xlog", "timeline"] {
        for o in store
            .list(dir)
            .await
            .with_context(|| format!("list {dir}/"))?
        {
            let file = o.key.rsplit('/').next().unwrap_or("");
            match file.parse::<WalSegmentName>() {
                Ok(WalSegmentName::Segment(id)) => {
                    a.segments.insert(id);
                }
                Ok(WalSegmentName::History(t)) => {
                    a.histories.insert(t);
                }
                _ => {}
            }
        }
    }
    Ok(a)
}

/// Runs archive-sync for `site`; printing is the caller's. `Err` for what stopped it (the
/// server or the store unreachable, another cluster's archive); a gap is in the report.
pub async fn run(config: &Config, site: &str, opts: SyncOptions) -> Result<SyncReport> {
    let settings = SiteSettings::build(config, site)?;
    let pg_wal = settings
        .config
        .pg_data_directory
        .as_ref()
        .with_context(|| {
            format!(
                "backup_sites.{site}.pg_data_directory: archive-sync reads pg_wal there; set it"
            )
        })?
        .join("pg_wal");
    let ctx = crate::daemon::upload_context(&settings, crate::daemon::slots::UploadSlots::new(1))?;
    let server = ask_server(&settings).await?;
    let keys = settings.keys()?;
    if let Some(archive) = identity::archive_identity(&ctx.store, &keys).await? {
        if archive.system_id != server.system_id {
            bail!(identity::mismatch_message(site, &archive, server.system_id));
        }
    }
    let backups = crate::restore::list_basebackups(&ctx.store).await?;
    let newest = backups.last();
    let start: Option<SegmentId> = match newest {
        Some(b) => match b.start_wal_segment.parse::<WalSegmentName>() {
            Ok(WalSegmentName::Segment(id)) => Some(id),
            _ => bail!(
                "basebackup/{}: start-wal-segment {:?} is not a segment name",
                b.name,
                b.start_wal_segment
            ),
        },
        None => None,
    };
    let first = start.map(|s| s.segno(server.seg)).transpose()?;
    let mut report = SyncReport {
        site: site.to_string(),
        timeline: server.tli.get(),
        current_segment: server.current.to_string(),
        newest_basebackup: newest.map(|b| b.name.clone()),
        files: Vec::new(),
        chain: None,
        new_basebackup: None,
    };
    for name in candidates(&pg_wal, &server, first)? {
        let action = sync_file(&ctx, &pg_wal, name, &server).await?;
        eprintln!("{name}: {}", describe(&action));
        report.files.push(FileResult {
            file: name.to_string(),
            action,
        });
    }
    if !opts.verify {
        return Ok(report);
    }
    let Some(start) = start else {
        report.chain = Some(chain::ChainReport {
            from: "-".into(),
            to: server.current.to_string(),
            checked: 0,
            missing: vec!["no basebackup: nothing to restore from".into()],
        });
        return request_if_asked(config, site, opts, report).await;
    };
    let listed = archived(&ctx.store).await?;
    let current = server.current.segno(server.seg)?;
    report.chain = Some(chain::check(
        &server.history,
        start,
        current,
        server.seg,
        &listed,
    ));
    request_if_asked(config, site, opts, report).await
}

async fn request_if_asked(
    config: &Config,
    site: &str,
    opts: SyncOptions,
    mut report: SyncReport,
) -> Result<SyncReport> {
    let gap = report.chain.as_ref().and_then(|c| c.first_gap());
    if let (Some(gap), true) = (gap, opts.new_backup_on_failure) {
        eprintln!("archive-sync: first gap {gap}; requesting a new basebackup");
        let name = crate::basebackup::request::request_or_take(config, site)
            .await
            .with_context(|| format!("the WAL chain has a gap at {gap}; new basebackup"))?;
        report.new_basebackup = Some(name);
    }
    Ok(report)
}

fn describe(a: &Action) -> String {
    match a {
        Action::Archived => "already archived (same hash)".into(),
        Action::Uploaded => "uploaded".into(),
        Action::ReplacedDiverged { moved_to, why } => {
            format!("archived with other bytes ({why}); old object kept as {moved_to}, uploaded")
        }
        Action::Skipped { why } => format!("NOT uploaded: {why}"),
        Action::Vanished => "removed by the server meanwhile; not needed".into(),
    }
}

/// The text summary of a report.
pub fn render(r: &SyncReport) -> String {
    let count = |f: fn(&Action) -> bool| r.files.iter().filter(|x| f(&x.action)).count();
    let mut out = format!(
        "site {}: timeline {}, current segment {} (not uploaded), newest basebackup {}\n",
        r.site,
        r.timeline,
        r.current_segment,
        r.newest_basebackup.as_deref().unwrap_or("none")
    );
    out += &format!(
        "files: {} already archived, {} uploaded, {} diverged and replaced, {} not uploaded\n",
        count(|a| *a == Action::Archived),
        count(|a| *a == Action::Uploaded),
        count(|a| matches!(a, Action::ReplacedDiverged { .. })),
        count(|a| matches!(a, Action::Skipped { .. })),
    );
    match &r.chain {
        None => out += "chain: not checked (--no-verify)\n",
        Some(c) if c.missing.is_empty() => {
            out += &format!(
                "chain: complete from {} to {} ({} files)\n",
                c.from, c.to, c.checked
            )
        }
        Some(c) => {
            out += &format!(
                "chain: INCOMPLETE from {} to {}: {} missing, first gap {}\n",
                c.from,
                c.to,
                c.missing.len(),
                c.first_gap().unwrap_or("-")
            );
            for m in c.missing.iter().take(20) {
                out += &format!("  missing {m}\n");
            }
        }
    }
    if let Some(b) = &r.new_basebackup {
        out += &format!("new basebackup: {b}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> Server {
        let seg = SegmentSize::new(16 << 20).unwrap();
        Server {
            system_id: 7,
            tli: TimelineId(1),
            seg,
            magic: page_magic_for(15).unwrap(),
            history: TimelineHistory {
                tli: TimelineId(1),
                switches: Vec::new(),
            },
            current: SegmentId::from_segno(TimelineId(1), 9, seg),
        }
    }

    /// What is not WAL (a recycled file of zeros, a short file, a broken history file) is
    /// never uploaded, and makes the command fail naming it.
    #[test]
    fn files_that_are_not_wal_are_refused_and_fail_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let s = server();
        let name: WalSegmentName = "000000010000000000000003".parse().unwrap();
        let path = dir.path().join(name.to_string());
        std::fs::write(&path, vec![0u8; 16 << 20]).unwrap();
        assert!(read_checked(&path, &name, &s).is_err());
        std::fs::write(&path, b"short").unwrap();
        let why = read_checked(&path, &name, &s).unwrap_err();
        assert!(why.contains("not the segment size"), "{why}");
        let history: WalSegmentName = "00000002.history".parse().unwrap();
        let hpath = dir.path().join(history.to_string());
        std::fs::write(&hpath, b"garbage\n").unwrap();
        assert!(read_checked(&hpath, &history, &s).is_err());
        std::fs::write(&hpath, b"1\t0/3000000\tpromoted\n").unwrap();
        assert!(read_checked(&hpath, &history, &s).is_ok());

        let report = SyncReport {
            site: "s".into(),
            timeline: 1,
            current_segment: s.current.to_string(),
            newest_basebackup: None,
            files: vec![FileResult {
                file: name.to_string(),
                action: Action::Skipped { why },
            }],
            chain: None,
            new_basebackup: None,
        };
        let failure = report.failure().unwrap();
        assert!(
            failure.starts_with("000000010000000000000003 was not archived"),
            "{failure}"
        );
    }
}
