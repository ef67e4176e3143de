//! A site's basebackups inside the daemon: taken on schedule (`basebackup_interval_hours`,
//! `basebackup_hour`, `basebackup_minute`; never while `maintenance_mode_file` exists) or on
//! request (HTTP `PUT /<site>/basebackup`, which `walhoard basebackup` uses), one at a time,
//! then retention.
//!
//! Retention (pghoard's rules, run after every successful backup, so a backup is only ever
//! deleted once a newer one is complete): keep at most `basebackup_count`; then, when
//! `basebackup_age_days_max` is set, delete those older than that while more than
//! `basebackup_count_min` remain; deleting stops at the oldest backup a preservation request
//! keeps ([`crate::preservation`], pghoard's). Only walhoard's own backups are counted and deleted:
//! pghoard's and unrecognised ones are kept (and keep their WAL). WAL (every timeline) in
//! segments before the start segment of every kept backup is deleted when walhoard wrote it
//! (its `walhoard-writer` mark; others' is kept and reported, [`super::wal_retention`]);
//! history files are kept; a kept backup whose start segment is unknown keeps all WAL.
//! Chunks of walhoard's backups that never completed (an interrupted run) are deleted once
//! `ORPHAN_MIN_AGE` old; see [`crate::basebackup::inventory`].

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::wal_retention::{self, KeepAllReason, WalPlan};
use crate::basebackup::inventory::{self, ChunkDirState, Inventory, Writer};
use crate::basebackup::{BackupContext, BackupProgress};
use crate::config::SiteConfig;
use crate::preservation::Preservations;
use crate::settings::SiteSettings;
use crate::storage::ObjectStore;

use super::status::{now_secs, BasebackupState};

/// A request for a backup now; answered with its name or the error.
pub type BackupRequest = oneshot::Sender<Result<String, String>>;

/// Shared between the scheduler and the status readers.
#[derive(Debug, Default)]
pub struct BasebackupStatus {
    state: Mutex<BasebackupState>,
    progress: Mutex<Option<Arc<BackupProgress>>>,
}

impl BasebackupStatus {
    pub fn snapshot(&self) -> BasebackupState {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(p) = &*self.progress.lock().unwrap_or_else(|p| p.into_inner()) {
            s.progress_bytes = p.done_bytes.load(Ordering::Relaxed);
            s.progress_total_bytes = p.total_bytes.load(Ordering::Relaxed);
        }
        s
    }

    fn with(&self, f: impl FnOnce(&mut BasebackupState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn set_progress(&self, p: Option<Arc<BackupProgress>>) {
        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = p;
    }
}

/// A listed backup, as retention and scheduling see it.
#[derive(Debug, Clone)]
pub struct ListedBackup {
    pub name: String,
    /// Seconds since the epoch.
    pub start_time: f64,
    pub start_wal_segment: Option<String>,
    /// Written by walhoard, with a start time and start segment its metadata gives: the only
    /// backups retention counts and deletes. Else pghoard's, or walhoard's but not parsable.
    pub own: bool,
    /// The backup an incremental one depends on ([`super::chains`]).
    pub incremental_parent: Option<String>,
}

/// The backups of an inventory walhoard or pghoard wrote, oldest first.
fn listed(inv: &Inventory) -> Vec<ListedBackup> {
    let mut out: Vec<ListedBackup> = inv
        .controls
        .iter()
        .filter(|c| matches!(c.writer, Writer::Walhoard | Writer::Pghoard))
        .map(|c| ListedBackup {
            name: c.name.clone(),
            start_time: c.start_time.or(c.modified.map(|t| t as f64)).unwrap_or(0.0),
            start_wal_segment: c.start_wal_segment.clone(),
            // A backup walhoard cannot place in time or in the WAL is never deleted.
            own: c.writer == Writer::Walhoard
                && c.start_time.is_some()
                && c.start_segment.is_some(),
            incremental_parent: c.incremental_parent.clone(),
        })
        .collect();
    out.sort_by(|a, b| {
        a.start_time
            .total_cmp(&b.start_time)
            .then_with(|| a.name.cmp(&b.name))
    });
    out
}

/// Listed backups (walhoard's and pghoard's), oldest first. Objects under `basebackup/` that
/// are neither are not listed (see [`Inventory::unrecognised`]).
pub async fn list_backups(store: &ObjectStore) -> Result<Vec<ListedBackup>> {
    Ok(listed(&inventory::scan(store, now_secs()).await?))
}

/// Which backups the rules delete (oldest first), pghoard's `determine_backups_to_delete`
/// counting chains of incremental backups as one ([`super::chains`]): deleting stops at the
/// oldest chain a preservation request keeps past `now`, so it, every newer backup and the
/// WAL from its start on stay ([`crate::preservation`]).
pub fn backups_to_delete(
    site: &SiteConfig,
    backups: &[ListedBackup],
    now: f64,
    preserved: &Preservations,
) -> Vec<ListedBackup> {
    let now_ts =
        jiff::Timestamp::from_millisecond((now * 1000.0) as i64).unwrap_or(jiff::Timestamp::MIN);
    // Whole chains (a full backup and the incremental ones on it) are counted and deleted:
    // a backup goes only with every backup that depends on it.
    let deletable = |c: &[ListedBackup]| c.iter().all(|b| !preserved.preserves(&b.name, now_ts));
    let mut kept = super::chains::chains(backups);
    let mut delete = Vec::new();
    let count = site.basebackup_count.max(1) as usize;
    while kept.len() > count && deletable(&kept[0]) {
        delete.extend(kept.remove(0));
    }
    if let Some(days) = site.basebackup_age_days_max {
        let min = site.basebackup_count_min.max(1) as usize;
        while kept.len() > min
            && now - super::chains::newest_start(&kept[0]) > days * 86400.0
            && deletable(&kept[0])
        {
            delete.extend(kept.remove(0));
        }
    }
    delete
}

async fn delete_backup(store: &ObjectStore, name: &str) -> Result<()> {
    // Unlist first: a half-deleted backup must not look restorable.
    store.delete(&format!("basebackup/{name}")).await?;
    delete_chunks(store, name).await?;
    // A delta backup's bundles; its delta objects go in `delta_retention` once unreferenced.
    delete_chunks_under(store, crate::restore::pghoard_delta::CHUNK_PREFIX, name).await
}

/// Deletes the chunks of walhoard's backup `name`: the objects under its directory that carry
/// `backup-name: <name>`. Anything else there (another tool's, or a chunk whose metadata cannot
/// be read) is left alone with a warning.
async fn delete_chunks(store: &ObjectStore, name: &str) -> Result<()> {
    delete_chunks_under(store, "basebackup_chunk", name).await
}

/// [`delete_chunks`] in `<prefix>/<name>/`.
async fn delete_chunks_under(store: &ObjectStore, prefix: &str, name: &str) -> Result<()> {
    for o in store.list(&format!("{prefix}/{name}")).await? {
        match store.object_meta(&o.key).await {
            Ok(m) if m.backup_name.as_deref() == Some(name) => {
                store.delete(&o.key).await?;
            }
            Ok(_) => {
                tracing::warn!(object = %o.key, "left alone: in the directory of a deleted basebackup but not written by walhoard for it (no backup-name: {name})");
            }
            Err(e) => {
                tracing::warn!(object = %o.key, error = %e, "left alone: in the directory of a deleted basebackup, metadata unreadable");
            }
        }
    }
    Ok(())
}

/// Applies retention; returns the names of the deleted backups and the number of WAL objects
/// deleted. Acts only on what it positively identifies ([`crate::basebackup::inventory`]):
/// only walhoard's own backups are counted and deleted, only walhoard's unlisted chunk
/// directories older than `ORPHAN_MIN_AGE` are deleted, and WAL is deleted only before the
/// start segment of every backup that stays, of any kind; anything else is logged and kept.
pub async fn apply_retention(
    store: &ObjectStore,
    site_name: &str,
    site: &SiteConfig,
) -> Result<(Vec<String>, usize)> {
    let now = now_secs();
    let inv = inventory::scan(store, now).await?;
    for what in inv.unrecognised() {
        tracing::warn!(site = %site_name, "left alone, not recognised as walhoard's or pghoard's: {what}");
    }
    let backups = listed(&inv);
    let own: Vec<ListedBackup> = backups.iter().filter(|b| b.own).cloned().collect();
    // A request that cannot be read fails retention: it may be keeping a backup.
    let preserved = crate::preservation::load(store).await?;
    let doomed = backups_to_delete(site, &own, now, &preserved);
    for b in &own {
        if let Some(until) = preserved.until(&b.name) {
            tracing::info!(site = %site_name, backup = %b.name, %until, "preservation request");
        }
    }
    // Newest first: an interrupted run never leaves an incremental without its parent.
    for b in doomed.iter().rev() {
        tracing::info!(site = %site_name, backup = %b.name, "deleting basebackup (retention)");
        delete_backup(store, &b.name)
            .await
            .with_context(|| format!("delete basebackup {}", b.name))?;
    }
    // Chunks of walhoard's backups that never completed and are not being written.
    for d in &inv.chunk_dirs {
        if d.state == ChunkDirState::Orphan {
            tracing::info!(site = %site_name, backup = %d.name, dir = d.prefix, "deleting chunks of an interrupted basebackup");
            delete_chunks_under(store, d.prefix, &d.name).await?;
        }
    }
    let deleted: Vec<String> = doomed.iter().map(|b| b.name.clone()).collect();
    delta_objects(store, site_name, site, &inv, &deleted, now).await?;
    // Every control object that stays (walhoard's, pghoard's or unrecognised) keeps the WAL
    // from its start segment on; of the WAL before, only walhoard's own is deleted.
    let (before, ours, foreign) = match wal_retention::plan(store, &inv, &deleted).await? {
        WalPlan::KeepAll(KeepAllReason::NoBackup) => return Ok((deleted, 0)),
        WalPlan::KeepAll(KeepAllReason::UnknownStart { key, stored }) => {
            tracing::warn!(site = %site_name, object = %key, start_wal_segment = ?stored, "basebackup's start segment unknown; keeping all WAL");
            return Ok((deleted, 0));
        }
        WalPlan::Before {
            before,
            ours,
            foreign,
        } => (before, ours, foreign),
    };
    if let Some(line) = wal_retention::foreign_summary(&foreign, before) {
        tracing::warn!(site = %site_name, "left alone: {line}");
    }
    let mut wal_deleted = 0;
    for key in &ours {
        store
            .delete(key)
            .await
            .with_context(|| format!("delete {key}"))?;
        wal_deleted += 1;
    }
    // Partial objects of those segments (issue 16): only keys in their layout, marked.
    wal_deleted += super::partial::delete_parts_before(store, &before).await?;
    if wal_deleted > 0 {
        tracing::info!(site = %site_name, before = %before, count = wal_deleted, "deleted walhoard's WAL older than the oldest kept basebackup");
    }
    Ok((deleted, wal_deleted))
}

/// Deletes walhoard's delta objects that no backup that stays references
/// ([`super::delta_retention`]), and logs what it kept.
async fn delta_objects(
    store: &ObjectStore,
    site_name: &str,
    site: &SiteConfig,
    inv: &Inventory,
    deleted: &[String],
    now: f64,
) -> Result<()> {
    let keys = match crate::settings::key_ring(site_name, site) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(site = %site_name, error = format!("{e:#}"), "delta objects kept: the site's keys are unusable");
            return Ok(());
        }
    };
    let out = super::delta_retention::apply(store, &keys, inv, deleted, now).await?;
    if let Some(why) = &out.kept_all {
        tracing::warn!(site = %site_name, reason = %why, "every delta object kept: what a backup references cannot be known");
    }
    if !out.deleted.is_empty() {
        tracing::info!(site = %site_name, count = out.deleted.len(), "deleted walhoard's delta objects no kept backup references");
    }
    if out.foreign > 0 {
        tracing::info!(site = %site_name, count = out.foreign, "left alone: unreferenced delta objects walhoard did not write");
    }
    Ok(())
}

/// The latest scheduled time at or before `now` (seconds), or `None` when only requests
/// take backups. With `basebackup_hour`/`basebackup_minute` the schedule is anchored at that
/// time of day (UTC) and repeats every interval; without, a backup is due `interval` after
/// the previous one started.
pub fn due(site: &SiteConfig, newest_start: Option<f64>, now: f64) -> bool {
    let Some(hours) = site.basebackup_interval_hours else {
        return false;
    };
    let Some(newest) = newest_start else {
        return true;
    };
    let interval = hours * 3600.0;
    if site.basebackup_hour.is_none() && site.basebackup_minute.is_none() {
        return now - newest >= interval;
    }
    let anchor_of_day = f64::from(site.basebackup_hour.unwrap_or(0)) * 3600.0
        + f64::from(site.basebackup_minute.unwrap_or(0)) * 60.0;
    let day_start = (now / 86400.0).floor() * 86400.0;
    let mut slot = day_start + anchor_of_day;
    if slot > now {
        slot -= 86400.0;
    }
    // Later slots of the same anchor, every interval.
    while slot + interval <= now {
        slot += interval;
    }
    newest < slot
}

/// How long after the `failures`-th failed scheduled backup in a row the next may start (a
/// requested one starts at once). A minute, except in delta mode, which follows pghoard:
/// `3^failures` seconds up to an hour, and after `basebackup_delta_mode_max_retries` retries
/// the next scheduled interval.
pub fn retry_pause(site: &SiteConfig, failures: u32) -> Duration {
    if site.basebackup_mode != crate::config::BasebackupMode::Delta {
        return Duration::from_secs(60);
    }
    if failures > site.basebackup_delta_mode_max_retries {
        let hours = site.basebackup_interval_hours.unwrap_or(24.0);
        return Duration::from_secs_f64((hours * 3600.0).max(60.0));
    }
    Duration::from_secs(3u64.saturating_pow(failures).min(3600))
}

/// Runs a site's backups until `stop` fires; none are scheduled while `maintenance_mode_file`
/// exists.
pub async fn run(
    settings: Arc<SiteSettings>,
    maintenance_mode_file: PathBuf,
    status: Arc<BasebackupStatus>,
    mut requests: mpsc::Receiver<BackupRequest>,
    stop: CancellationToken,
) {
    let (site_name, site) = (&settings.name, &settings.config);
    let store = match settings.open_store() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(site = %site_name, error = format!("{e:#}"), "basebackups disabled");
            return;
        }
    };
    // Often enough for short test intervals, rarely enough to cost nothing.
    let check_every = site
        .basebackup_interval_hours
        .map_or(Duration::from_secs(10), |h| {
            Duration::from_secs_f64((h * 3600.0 / 4.0).clamp(1.0, 10.0))
        });
    let mut newest: Option<f64> = None;
    let mut listed = false;
    // Scheduled backups that failed in a row, and when the next may start.
    let mut failures = 0u32;
    let mut retry_at: Option<f64> = None;
    loop {
        if !listed {
            match list_backups(&store).await {
                Ok(b) => {
                    newest = b.last().map(|b| b.start_time);
                    status.with(|s| s.backups_listed = b.len());
                    listed = true;
                }
                Err(e) => {
                    tracing::warn!(site = %site_name, error = format!("{e:#}"), "cannot list basebackups")
                }
            }
        }
        let maintenance = maintenance_mode_file.exists();
        let scheduled = listed
            && !maintenance
            && due(site, newest, now_secs())
            && retry_at.is_none_or(|t| now_secs() >= t);
        // A site without a schedule has nothing to look at until a request comes (an idle
        // daemon of many sites should not wake each of them every few seconds); only a
        // listing that failed is tried again.
        let recheck = !listed || site.basebackup_interval_hours.is_some();
        let reply = if scheduled {
            None
        } else {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = requests.recv() => match r {
                    Some(r) => Some(r),
                    None => return,
                },
                _ = tokio::time::sleep(check_every), if recheck => continue,
            }
        };
        let result = tokio::select! {
            _ = stop.cancelled() => {
                // Dropping the backup future leaves its chunks unlisted; retention of the next
                // run deletes them.
                status.set_progress(None);
                return;
            }
            r = take_one(&settings, &status) => r,
        };
        match &result {
            Ok(name) => {
                (failures, retry_at) = (0, None);
                newest = Some(now_secs());
                listed = false;
                status.with(|s| {
                    s.last_name = Some(name.clone());
                    s.last_end_time = Some(now_secs());
                });
                match apply_retention(&store, site_name, site).await {
                    Ok((deleted, wal)) if !deleted.is_empty() || wal > 0 => {
                        tracing::info!(site = %site_name, backups = ?deleted, wal_objects = wal, "retention applied")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(site = %site_name, error = format!("{e:#}"), "retention failed")
                    }
                }
            }
            Err(e) => {
                tracing::error!(site = %site_name, error = %e, "basebackup failed");
                status.with(|s| {
                    s.last_error = Some(e.clone());
                    s.last_error_time = Some(now_secs());
                });
                if reply.is_none() {
                    // Do not retry a failing scheduled backup in a tight loop.
                    failures += 1;
                    retry_at = Some(now_secs() + retry_pause(site, failures).as_secs_f64());
                }
            }
        }
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }
}

async fn take_one(site: &SiteSettings, status: &BasebackupStatus) -> Result<String, String> {
    let ctx = BackupContext::for_site(site)
        .await
        .map_err(|e| format!("{e:#}"))?;
    status.set_progress(Some(ctx.progress.clone()));
    status.with(|s| s.in_progress = Some(ctx.name.clone()));
    crate::metrics::basebackup_started(&site.name);
    let result = crate::basebackup::take_with(ctx).await;
    status.set_progress(None);
    status.with(|s| s.in_progress = None);
    match &result {
        Ok(b) => crate::metrics::basebackup_finished(
            &site.name,
            Ok((
                &b.metadata.basebackup_mode,
                b.metadata.total_size_plain,
                b.elapsed.as_secs_f64(),
            )),
        ),
        Err(_) => {
            crate::metrics::basebackup_finished(&site.name, Err(()));
            crate::metrics::exception("BasebackupError", "PGBaseBackup");
        }
    }
    result.map(|b| b.name).map_err(|e| format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn site(extra: &str) -> SiteConfig {
        let text = format!(
            r#"{{"backup_location": "/tmp/x", "backup_sites": {{"s": {{{extra} "nodes": ["host=/tmp"], "object_storage": {{"storage_type": "local", "directory": "/tmp/y"}}}}}}}}"#
        );
        Config::parse(&text, "t.json").unwrap().backup_sites["s"].clone()
    }

    fn backups(starts: &[f64]) -> Vec<ListedBackup> {
        starts
            .iter()
            .enumerate()
            .map(|(i, &t)| ListedBackup {
                name: format!("b{i}"),
                start_time: t,
                start_wal_segment: None,
                own: true,
                incremental_parent: None,
            })
            .collect()
    }

    /// (a day, now, backups started 10, 5, 2 and 1 days ago).
    fn four_backups() -> (f64, f64, Vec<ListedBackup>) {
        let day = 86400.0;
        let now = 100.0 * day;
        let starts = [10.0, 5.0, 2.0, 1.0].map(|d| now - d * day);
        (day, now, backups(&starts))
    }

    fn names(v: Vec<ListedBackup>) -> Vec<String> {
        v.into_iter().map(|b| b.name).collect()
    }

    #[test]
    fn delta_retries_back_off_and_give_up_until_the_next_interval() {
        let local = site(r#""basebackup_mode": "local-tar", "pg_data_directory": "/d","#);
        assert_eq!(retry_pause(&local, 30), Duration::from_secs(60));
        let delta = site(
            r#""basebackup_mode": "delta", "pg_data_directory": "/d",
               "basebackup_delta_mode_max_retries": 8, "basebackup_interval_hours": 12,"#,
        );
        assert_eq!(retry_pause(&delta, 1), Duration::from_secs(3));
        assert_eq!(retry_pause(&delta, 2), Duration::from_secs(9));
        assert_eq!(retry_pause(&delta, 8), Duration::from_secs(3600));
        assert_eq!(retry_pause(&delta, 9), Duration::from_secs(12 * 3600));
    }

    #[test]
    fn retention_rules_as_pghoard() {
        let none = Preservations::default();
        let (day, now, b) = four_backups();
        // basebackup_count 2 (default): the two oldest go.
        assert_eq!(
            names(backups_to_delete(&site(""), &b, now, &none)),
            ["b0", "b1"]
        );
        // count 10 and a maximum age of 3 days: older ones go, but count_min (2) stay.
        let s = site(r#""basebackup_count": 10, "basebackup_age_days_max": 3,"#);
        assert_eq!(names(backups_to_delete(&s, &b, now, &none)), ["b0", "b1"]);
        let s = site(
            r#""basebackup_count": 10, "basebackup_age_days_max": 0.5, "basebackup_count_min": 3,"#,
        );
        assert_eq!(names(backups_to_delete(&s, &b, now, &none)), ["b0"]);
        // Never delete the only backup.
        let s = site(
            r#""basebackup_count": 0, "basebackup_age_days_max": 0.1, "basebackup_count_min": 0,"#,
        );
        assert!(backups_to_delete(&s, &backups(&[now - 9.0 * day]), now, &none).is_empty());
    }

    #[test]
    fn retention_stops_at_a_preserved_backup_until_its_date() {
        use crate::preservation::{parse_until, Request};
        let (day, now, b) = four_backups();
        let preserve_b1_until = |secs: f64| {
            Preservations::from_requests(&[Request {
                name: "b1_x".into(),
                backup: "b1".into(),
                until: jiff::Timestamp::from_second(secs as i64).unwrap(),
            }])
        };
        // b1 is kept (and so every newer one): only b0 goes at basebackup_count 2.
        let p = preserve_b1_until(now + day);
        assert_eq!(names(backups_to_delete(&site(""), &b, now, &p)), ["b0"]);
        // By age as well.
        let s = site(r#""basebackup_count": 10, "basebackup_age_days_max": 3,"#);
        assert_eq!(names(backups_to_delete(&s, &b, now, &p)), ["b0"]);
        // Once the date has passed, the rules apply again.
        let p = preserve_b1_until(now - 1.0);
        assert_eq!(
            names(backups_to_delete(&site(""), &b, now, &p)),
            ["b0", "b1"]
        );
        // A preserved oldest backup stops everything.
        let p = Preservations::from_requests(&[Request {
            name: "b0_x".into(),
            backup: "b0".into(),
            until: parse_until("2999-01-01").unwrap(),
        }]);
        assert!(backups_to_delete(&site(""), &b, now, &p).is_empty());
    }

    #[test]
    fn retention_keeps_whole_incremental_chains() {
        let none = Preservations::default();
        let (day, now, mut b) = four_backups();
        // b0 full ← b1 ← b2 incremental, b3 full: two chains; count 2 deletes nothing,
        // count 1 the whole first chain, newest first.
        b[1].incremental_parent = Some("b0".into());
        b[2].incremental_parent = Some("b1".into());
        assert!(backups_to_delete(&site(""), &b, now, &none).is_empty());
        let s = site(r#""basebackup_count": 1,"#);
        assert_eq!(
            names(backups_to_delete(&s, &b, now, &none)),
            ["b0", "b1", "b2"]
        );
        // b3 incremental on b2: one chain, nothing to delete even at count 1.
        b[3].incremental_parent = Some("b2".into());
        assert!(backups_to_delete(&s, &b, now, &none).is_empty());
        // By age, a chain goes only when its newest backup is too old: b0 (10 days) and
        // b1 (5 days) are older than 3 days but b2 (2 days) depends on them.
        b[3].incremental_parent = None;
        let s = site(
            r#""basebackup_count": 10, "basebackup_age_days_max": 3, "basebackup_count_min": 1,"#,
        );
        assert!(backups_to_delete(&s, &b, now, &none).is_empty());
        let s = site(
            r#""basebackup_count": 10, "basebackup_age_days_max": 1.5, "basebackup_count_min": 1,"#,
        );
        assert_eq!(
            names(backups_to_delete(&s, &b, now, &none)),
            ["b0", "b1", "b2"]
        );
        let _ = day;
    }

    #[test]
    fn schedule() {
        let h = 3600.0;
        let day = 24.0 * h;
        let now = 1000.0 * day + 10.0 * h; // 10:00 UTC
        let s = site("");
        assert!(due(&s, None, now), "no backup yet");
        assert!(!due(&s, Some(now - 23.0 * h), now));
        assert!(due(&s, Some(now - 24.0 * h), now));
        let s = site(r#""basebackup_interval_hours": null,"#);
        assert!(!due(&s, None, now), "null interval: only on request");
        // Anchored at 03:30 daily: the 03:30 slot passed today.
        let s = site(r#""basebackup_hour": 3, "basebackup_minute": 30,"#);
        assert!(
            due(&s, Some(now - 7.0 * h), now),
            "last one at 03:00, before today's 03:30"
        );
        assert!(
            !due(&s, Some(now - 6.0 * h), now),
            "last one at 04:00, after 03:30"
        );
        // Every 6 hours from 03:30: slots 03:30, 09:30, 15:30, 21:30.
        let s = site(
            r#""basebackup_hour": 3, "basebackup_minute": 30, "basebackup_interval_hours": 6,"#,
        );
        assert!(
            due(&s, Some(now - 1.0 * h), now),
            "09:00 is before the 09:30 slot"
        );
        assert!(!due(&s, Some(now - 0.25 * h), now), "09:45 is after it");
    }
}
