//! `walhoard archive-cleanup` (pghoard_archive_cleanup's job): delete the WAL objects (every
//! timeline) before the start segment of the oldest basebackup the site holds, printing each
//! one (or, with `--dry-run`, only printing them).
//!
//! The rule is the daemon's retention rule for WAL, one copy of it
//! ([`crate::daemon::wal_retention::plan`]) with no backup being deleted: every control object
//! under `basebackup/` — walhoard's, pghoard's, or one neither recognises — keeps the WAL from
//! its start segment on, whatever the timeline; one whose start segment is unknown keeps all
//! WAL; without any basebackup nothing is deleted; history files (`timeline/`) are always kept.
//! Of the WAL before, only what walhoard wrote (its `walhoard-writer` mark) is deleted; the
//! rest (pghoard's, an older walhoard's) is listed as kept, for the operator to delete.
//! pghoard's cleanup compared names as strings, timeline first, so a backup on timeline 2 let
//! it delete timeline 1's segments after the backup's start; here positions are compared.
//! Partial WAL objects (`xlog_partial/<segment>/`) of the segments before go by the same rule
//! (`daemon::partial::delete_parts_before`), as in retention.
//! A preserved backup is a kept backup: cleanup deletes no basebackup, so its WAL stays.

use anyhow::{Context, Result};
use serde::Serialize;

use crate::basebackup::inventory;
use crate::daemon::wal_retention::{self, KeepAllReason, WalPlan};
use crate::settings::SiteSettings;

/// What archive-cleanup did (or would do).
#[derive(Debug, Clone, Serialize)]
pub struct CleanupReport {
    pub site: String,
    pub dry_run: bool,
    /// The oldest kept basebackup's start segment (deleted: walhoard's WAL before it).
    pub first_required: Option<String>,
    /// Why nothing was deleted, when nothing could be.
    pub kept_all: Option<String>,
    /// Objects deleted (or to delete).
    pub deleted: Vec<String>,
    /// WAL before `first_required` that walhoard did not write: kept.
    pub kept_foreign: Vec<String>,
    /// Partial WAL objects (`xlog_partial/`) of those segments deleted, walhoard's only, as
    /// retention deletes them (not counted by `--dry-run`).
    pub partial_objects_deleted: usize,
}

/// Runs archive-cleanup on `site`: prints each object as it is deleted (to stderr, so `--json`
/// output stays one document) and returns the report.
pub async fn run(site: &SiteSettings, dry_run: bool) -> Result<CleanupReport> {
    let store = site.open_store()?;
    let inv = inventory::scan(&store, crate::daemon::status::now_secs()).await?;
    let mut report = CleanupReport {
        site: site.name.clone(),
        dry_run,
        first_required: None,
        kept_all: None,
        deleted: Vec::new(),
        kept_foreign: Vec::new(),
        partial_objects_deleted: 0,
    };
    let (before, ours, foreign) = match wal_retention::plan(&store, &inv, &[]).await? {
        WalPlan::Before {
            before,
            ours,
            foreign,
        } => (before, ours, foreign),
        WalPlan::KeepAll(KeepAllReason::NoBackup) => {
            report.kept_all = Some("the site has no basebackup: all WAL is kept".into());
            return Ok(report);
        }
        WalPlan::KeepAll(KeepAllReason::UnknownStart { key, stored }) => {
            report.kept_all = Some(format!(
                "all WAL is kept: {key}: start-wal-segment {stored:?} unknown"
            ));
            return Ok(report);
        }
    };
    report.first_required = Some(before.to_string());
    if let Some(line) = wal_retention::foreign_summary(&foreign, before) {
        eprintln!("left alone: {line}");
    }
    report.kept_foreign = foreign;
    for key in ours {
        if dry_run {
            eprintln!("would delete {key}");
        } else {
            store
                .delete(&key)
                .await
                .with_context(|| format!("delete {key}"))?;
            eprintln!("deleted {key}");
        }
        report.deleted.push(key);
    }
    if !dry_run {
        report.partial_objects_deleted =
            crate::daemon::partial::delete_parts_before(&store, &before)
                .await
                .context("delete partial WAL objects (xlog_partial/)")?;
    }
    Ok(report)
}

/// The text summary of a report.
pub fn render(r: &CleanupReport) -> String {
    if let Some(why) = &r.kept_all {
        return format!("site {}: nothing deleted; {why}\n", r.site);
    }
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    format!(
        "site {}: first required WAL segment {}; {verb} {} WAL object(s); kept {} not written \
         by walhoard\n",
        r.site,
        r.first_required.as_deref().unwrap_or("-"),
        r.deleted.len(),
        r.kept_foreign.len()
    )
}
