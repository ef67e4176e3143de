//! `walhoard info`: one screen per site, like `pgbackrest info`. Backups (sizes, positions,
//! times, the WAL each needs and whether the archive has all of it), the archived WAL per
//! timeline with its gaps, the newest archived segment and its age, and the daemon's live
//! status from its state file (`json_state_file_path`), when it has written one. Everything
//! comes from listings and metadata, plus the (small) history files; nothing else is fetched.

use std::fmt::Write;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use walhoard_protocol::{Lsn, TimelineId};

use crate::restore::{BackupListing, RestoreSite};
use crate::verify::archive::{TimelineRange, WalIndex};
use crate::verify::partials::{self, PartialIndex, PartialInfo};
use crate::verify::{or, wal::load_histories, Problem};

/// One backup as `info` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BackupInfo {
    #[serde(flatten)]
    pub listing: BackupListing,
    /// The timeline a restore follows (the newest whose history contains the backup).
    pub target_timeline: u32,
    /// The WAL a restore reads, by segment: from the backup's start to the newest archived.
    pub wal_needed_from: Option<String>,
    pub wal_available_to: Option<String>,
    /// Segments of that chain the archive lacks.
    pub missing_segments: Vec<String>,
}

/// The newest archived segment.
#[derive(Debug, Clone, Serialize)]
pub struct Newest {
    pub segment: String,
    /// When the store says it was written (RFC 3339), if it says.
    pub archived_at: Option<String>,
    pub age_seconds: Option<i64>,
}

/// The daemon's view of the site, from its state file.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonInfo {
    pub state_file: String,
    /// Seconds since the daemon last wrote the file (it rewrites it each second that
    /// something changed).
    pub written_seconds_ago: Option<u64>,
    /// `backup_sites.<site>` of the state file as the daemon wrote it.
    pub site: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct SiteInfo {
    pub site: String,
    pub backups: Vec<BackupInfo>,
    pub segment_size: u64,
    pub timelines: Vec<TimelineRange>,
    pub partial_segments: Vec<String>,
    /// The partial objects (`xlog_partial/`) of segments not yet complete.
    pub partial_objects: PartialInfo,
    pub history_files: Vec<String>,
    pub newest: Option<Newest>,
    pub daemon: Option<DaemonInfo>,
    /// What could not be read (history files that do not parse, ...).
    pub problems: Vec<Problem>,
}

/// Describes `site`; `state_file` is the daemon's (`json_state_file_path`).
pub async fn site_info(site: &RestoreSite, state_file: &Path) -> Result<SiteInfo> {
    let listing = site.list_all().await?;
    let sources = site.wal_sources();
    let stores: Vec<_> = sources.iter().map(|(s, _)| *s).collect();
    let index = WalIndex::load(&stores).await?;
    let mut problems = Vec::new();
    let histories = load_histories(&sources, &index, &mut problems).await;
    let parts = PartialIndex::load(sources[0].0, &index).await?;
    let mut backups = Vec::new();
    for b in listing {
        let start = b.start_lsn.parse::<Lsn>().ok();
        let tli = TimelineId::new(b.start_timeline).ok();
        let (mut info, mut target) = (
            BackupInfo {
                target_timeline: b.start_timeline,
                wal_needed_from: None,
                wal_available_to: None,
                missing_segments: Vec::new(),
                listing: b,
            },
            None,
        );
        if let (Some(start), Some(tli)) = (start, tli) {
            let (t, h) = index.target_timeline(tli, start, &histories);
            target = Some(t);
            let steps = index.chain(start, h, t);
            info.wal_needed_from = steps.first().map(|s| s.id.to_string());
            info.wal_available_to = steps
                .iter()
                .rev()
                .find(|s| s.object.is_some())
                .map(|s| s.id.to_string());
            info.missing_segments = steps
                .iter()
                .filter(|s| s.object.is_none())
                .map(|s| s.id.to_string())
                .collect();
        }
        if let Some(t) = target {
            info.target_timeline = t.get();
        }
        backups.push(info);
    }
    let now = jiff::Timestamp::now().as_second();
    let newest = index.newest().map(|(id, o)| Newest {
        segment: id.to_string(),
        archived_at: o
            .info
            .last_modified
            .and_then(|t| jiff::Timestamp::from_second(t).ok())
            .map(|t| t.to_string()),
        age_seconds: o.info.last_modified.map(|t| now - t),
    });
    Ok(SiteInfo {
        site: site.name.clone(),
        backups,
        segment_size: index.seg_size.bytes(),
        timelines: index.ranges(),
        partial_segments: index
            .partials
            .iter()
            .map(|(id, _)| format!("{id}.partial"))
            .collect(),
        partial_objects: partials::info(&parts, index.seg_size, now),
        history_files: index
            .histories
            .keys()
            .map(|t| format!("{:08X}.history", t.get()))
            .collect(),
        newest,
        daemon: daemon_info(state_file, &site.name),
        problems,
    })
}

/// The site's entry of the daemon's state file, if there is one that parses.
fn daemon_info(path: &Path, site: &str) -> Option<DaemonInfo> {
    let text = std::fs::read(path).ok()?;
    let v: serde_json::Value = match serde_json::from_slice(&text) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the daemon's state file does not parse");
            return None;
        }
    };
    let written_seconds_ago = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map(|d| d.as_secs());
    Some(DaemonInfo {
        state_file: path.display().to_string(),
        written_seconds_ago,
        site: v["backup_sites"][site].clone(),
    })
}

/// The human screen of one site.
pub fn render(i: &SiteInfo) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "site: {}", i.site);
    let _ = writeln!(s, "  basebackups:");
    if i.backups.is_empty() {
        let _ = writeln!(s, "    (none)");
    }
    for b in &i.backups {
        let l = &b.listing;
        let _ = writeln!(
            s,
            "    {}  {} plain / {} stored  {} .. {}",
            l.name,
            l.size_plain,
            l.size_stored,
            l.start_time,
            or(&l.end_time, "?"),
        );
        let _ = writeln!(
            s,
            "      {}",
            match &l.incremental_parent {
                Some(p) => format!(
                    "{} on {p} (restore needs its chain)",
                    l.backup_type.as_str()
                ),
                None => l.backup_type.as_str().to_string(),
            }
        );
        let _ = writeln!(
            s,
            "      lsn {} .. {}  timeline {} (restore follows {})",
            l.start_lsn,
            or(&l.end_lsn, "?"),
            l.start_timeline,
            b.target_timeline
        );
        let _ = writeln!(
            s,
            "      wal needed from {}, archived to {}{}",
            b.wal_needed_from.as_deref().unwrap_or("?"),
            b.wal_available_to.as_deref().unwrap_or("(none)"),
            if b.missing_segments.is_empty() {
                String::new()
            } else {
                format!(
                    "; MISSING {} segment(s): {}",
                    b.missing_segments.len(),
                    b.missing_segments.join(", ")
                )
            }
        );
    }
    let _ = writeln!(s, "  wal (segment size {} bytes):", i.segment_size);
    if i.timelines.is_empty() {
        let _ = writeln!(s, "    (no segments)");
    }
    for t in &i.timelines {
        let gaps = if t.gaps.is_empty() {
            "no gaps".to_string()
        } else {
            let g: Vec<String> = t
                .gaps
                .iter()
                .map(|(a, b)| {
                    if a == b {
                        a.clone()
                    } else {
                        format!("{a}..{b}")
                    }
                })
                .collect();
            format!("GAPS: {}", g.join(", "))
        };
        let _ = writeln!(
            s,
            "    timeline {}: {} .. {} ({} segments), {gaps}",
            t.timeline, t.first, t.last, t.segments
        );
    }
    if !i.history_files.is_empty() {
        let _ = writeln!(s, "    history files: {}", i.history_files.join(", "));
    }
    if !i.partial_segments.is_empty() {
        let _ = writeln!(s, "    partial segments: {}", i.partial_segments.join(", "));
    }
    let p = &i.partial_objects;
    if p.objects > 0 {
        let _ = writeln!(
            s,
            "    partial objects: {} ({} bytes of WAL, {} stored){}",
            p.objects,
            p.plain_bytes,
            p.stored_bytes,
            if p.leftover_objects > 0 {
                format!(
                    ", {} leftover(s) of segments archived complete",
                    p.leftover_objects
                )
            } else {
                String::new()
            }
        );
        for d in &p.durable_end {
            let _ = writeln!(
                s,
                "      timeline {}: durable to {} (segment {} from its parts)",
                d.timeline, d.durable_lsn, d.segment
            );
        }
        if let Some(n) = &p.newest {
            let _ = writeln!(
                s,
                "      newest part: {} written {}{}",
                n.key,
                n.written_at.as_deref().unwrap_or("(time unknown)"),
                n.age_seconds
                    .map(|a| format!(" ({a} s ago)"))
                    .unwrap_or_default()
            );
        }
    }
    match &i.newest {
        Some(n) => {
            let _ = writeln!(
                s,
                "    newest: {} archived {}{}",
                n.segment,
                n.archived_at.as_deref().unwrap_or("(time unknown)"),
                n.age_seconds
                    .map(|a| format!(" ({a} s ago)"))
                    .unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(s, "    newest: (none)");
        }
    }
    match &i.daemon {
        None => {
            let _ = writeln!(s, "  daemon: no state file");
        }
        Some(d) => {
            let w = &d.site["walreceiver"];
            let _ = writeln!(
                s,
                "  daemon: state file {} written {}: {} timeline {} received {} archived {} lag {} bytes{}",
                d.state_file,
                d.written_seconds_ago
                    .map(|a| format!("{a} s ago"))
                    .unwrap_or_else(|| "(time unknown)".into()),
                if w["connected"].as_bool() == Some(true) { "connected" } else { "NOT connected" },
                w["timeline"],
                w["received_lsn"].as_str().unwrap_or("-"),
                w["archived_lsn"].as_str().unwrap_or("-"),
                w["archive_lag_bytes"],
                w["last_error"]
                    .as_str()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            );
        }
    }
    for p in &i.problems {
        let _ = writeln!(s, "  PROBLEM {}: {}", p.key, p.problem);
    }
    s
}

/// `walhoard info` as the command line gives it: every site of the configuration, or `site`.
pub async fn cli(config: &Path, site: Option<&str>, json: bool) -> Result<()> {
    let loaded = crate::config::Config::load(config)?;
    let names: Vec<String> = match site {
        Some(s) => vec![s.to_string()],
        None => loaded.backup_sites.keys().cloned().collect(),
    };
    let mut all = Vec::new();
    for name in &names {
        let site = RestoreSite::open(config, Some(name))?;
        all.push(site_info(&site, &loaded.json_state_file_path).await?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        for i in &all {
            print!("{}", render(i));
        }
    }
    Ok(())
}
