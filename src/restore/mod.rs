//! Restore tooling: `walhoard restore list-basebackups`, `walhoard restore get-basebackup`
//! and the restore_command (`walhoard postgres-command --mode restore`).
//!
//! - [`beneath`]: walhoard's own files in a restore target, never through a symlink.
//! - `dest`: which directories a restore may create, empty and undo.
//! - [`extract`]: tar members into a directory, never outside it.
//! - [`get`]: a basebackup into a data directory (parallel streaming chunks, tablespaces,
//!   recovery configuration).
//! - [`recovery`]: the recovery settings and signal files PostgreSQL reads.
//! - [`wal`]: one WAL file out of the archive for PostgreSQL, with prefetch.
//! - `partial`: a segment not complete yet, from its partial objects.
//! - [`chain`], [`combine`]: an incremental backup's chain, checked, then combined pass by pass
//!   into one data directory.

pub mod beneath;
pub mod chain;
pub mod chain_delta;
pub(crate) mod chunks;
pub mod combine;
pub mod delta;
mod dest;
pub mod extract;
pub mod get;
pub mod partial;
pub mod pghoard;
pub mod pghoard_delta;
pub mod recovery;
pub mod wal;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use walhoard_basebackup::control::BackupType;
use walhoard_protocol::Lsn;

use crate::config::Config;
use crate::pipeline::encryption::KeyRing;
use crate::settings::SiteSettings;
use crate::storage::ObjectStore;

/// A site opened for reading: its store and private keys.
#[derive(Debug, Clone)]
pub struct RestoreSite {
    pub name: String,
    /// Absolute path of the configuration file (written into restore_command).
    pub config_path: PathBuf,
    pub settings: SiteSettings,
    /// Parallel downloads of get-basebackup (`restore_process_count`, default 4).
    pub restore_process_count: usize,
    pub store: ObjectStore,
    pub keys: KeyRing,
    /// The site's `moved_from` sites, in order: read after this one (pghoard's
    /// `find_recovery_sites`).
    pub older: Vec<OlderSite>,
}

/// A site named by another's `moved_from`, opened for reading.
#[derive(Debug, Clone)]
pub struct OlderSite {
    pub name: String,
    pub store: ObjectStore,
    pub keys: KeyRing,
}

impl OlderSite {
    /// Opens `older`, named by `site`'s `moved_from`, for reading.
    pub fn open(site: &str, older: &SiteSettings) -> Result<Self> {
        let o = &older.name;
        Ok(OlderSite {
            name: o.clone(),
            store: older
                .open_store_read_only()
                .with_context(|| format!("backup_sites.{site}.moved_from: site {o:?}"))?,
            keys: older.keys()?,
        })
    }
}

/// The sites `name` was moved from (`moved_from`, in order), opened read-only; `settings_of`
/// resolves a site name, and an unknown name or an unreadable store is an error naming the key.
pub fn older_sites<S: std::borrow::Borrow<SiteSettings>>(
    name: &str,
    moved_from: &[String],
    mut settings_of: impl FnMut(&str) -> Result<Option<S>>,
) -> Result<Vec<OlderSite>> {
    moved_from
        .iter()
        .map(|o| {
            let theirs = settings_of(o)?
                .with_context(|| format!("backup_sites.{name}.moved_from: no site {o:?}"))?;
            OlderSite::open(name, theirs.borrow())
        })
        .collect()
}

impl RestoreSite {
    /// Loads `config_path` and opens `site` (optional when the configuration has one site).
    pub fn open(config_path: &Path, site: Option<&str>) -> Result<Self> {
        let config = Config::load(config_path)?;
        let name = crate::settings::chosen_site(&config, site, config_path)?;
        let settings = SiteSettings::build(&config, &name)?;
        // Restore only reads: an archive that is not there must not be created empty.
        let store = settings.open_store_read_only()?;
        let keys = settings.keys()?;
        let config_path = std::path::absolute(config_path)
            .with_context(|| format!("absolute path of {}", config_path.display()))?;
        let older = older_sites(&name, &settings.config.moved_from, |o| {
            config
                .backup_sites
                .contains_key(o)
                .then(|| SiteSettings::build(&config, o))
                .transpose()
        })?;
        Ok(RestoreSite {
            name,
            config_path,
            restore_process_count: config.restore_process_count.unwrap_or(4).max(1) as usize,
            settings,
            store,
            keys,
            older,
        })
    }

    /// The basebackups of this site and of its `moved_from` sites (those with `site` set),
    /// ordered as [`list_basebackups`] orders one site's.
    pub async fn list_all(&self) -> Result<Vec<BackupListing>> {
        let mut all = list_basebackups(&self.store).await?;
        for o in &self.older {
            let mut theirs = list_basebackups(&o.store)
                .await
                .with_context(|| format!("site {:?} (moved_from)", o.name))?;
            for b in &mut theirs {
                b.site = Some(o.name.clone());
            }
            all.extend(theirs);
        }
        sort_listing(&mut all);
        Ok(all)
    }

    /// This site reading `backup`'s objects: from the `moved_from` site that holds it, with
    /// that site's keys. The name and configuration stay this site's, so the restore_command
    /// written for the restored server searches this site and its older ones alike.
    pub fn for_backup(&self, backup: &BackupListing) -> Result<RestoreSite> {
        let Some(from) = &backup.site else {
            return Ok(self.clone());
        };
        let o = self
            .older
            .iter()
            .find(|o| &o.name == from)
            .with_context(|| format!("basebackup {}: no moved_from site {from:?}", backup.name))?;
        let mut s = self.clone();
        s.store = o.store.clone();
        s.keys = o.keys.clone();
        Ok(s)
    }

    /// Where WAL is searched, in order: this site, then its `moved_from` sites.
    pub fn wal_sources(&self) -> Vec<(&ObjectStore, &KeyRing)> {
        std::iter::once((&self.store, &self.keys))
            .chain(self.older.iter().map(|o| (&o.store, &o.keys)))
            .collect()
    }
}

/// A listed basebackup, from its control object's metadata (nothing downloaded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupListing {
    pub name: String,
    pub format: String,
    pub start_time: String,
    pub end_time: String,
    pub start_lsn: String,
    pub end_lsn: String,
    pub start_timeline: u32,
    pub start_wal_segment: String,
    pub end_wal_segment: String,
    /// Plain bytes of the chunks.
    pub size_plain: u64,
    /// Stored (compressed, encrypted) bytes of the chunks.
    pub size_stored: u64,
    pub compression: String,
    pub encryption_key_id: Option<String>,
    /// `server_version_num` of the backed-up server.
    pub pg_version: String,
    /// The `moved_from` site the backup is in; absent for the site's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// `full` or `incremental` (PostgreSQL 17+ block-level; needs its parent chain).
    pub backup_type: BackupType,
    /// The backup an incremental one was taken against; absent for a full one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incremental_parent: Option<String>,
}

impl BackupListing {
    /// When the backup ended; for pghoard's basic backups, which record no end, when it
    /// started (as pghoard's own restore picks backups by `start-time`).
    fn end_timestamp(&self) -> Result<jiff::Timestamp> {
        let (what, t) = if self.end_time.is_empty() && self.format.is_empty() {
            ("start-time", &self.start_time)
        } else {
            ("end-time", &self.end_time)
        };
        t.parse()
            .with_context(|| format!("basebackup/{}: {what} {t:?}", self.name))
    }

    fn end_lsn(&self) -> Result<Lsn> {
        self.end_lsn.parse().map_err(|e| {
            anyhow::anyhow!("basebackup/{}: end-lsn {:?}: {e}", self.name, self.end_lsn)
        })
    }
}

/// The site's basebackups, oldest first.
pub async fn list_basebackups(store: &ObjectStore) -> Result<Vec<BackupListing>> {
    let objects = store.list("basebackup").await.context("list basebackup/")?;
    let mut out = Vec::new();
    for o in objects {
        let name = o.key.trim_start_matches("basebackup/").to_string();
        if name.contains('/') {
            continue;
        }
        // One damaged entry (sidecar missing or not JSON) must not hide every healthy backup:
        // skipped with a warning. A store that cannot answer now fails the listing instead, so
        // that an outage never silently picks an older backup.
        let m = match store.object_meta(&o.key).await {
            Ok(m) => m,
            Err(e) if e.is_transient() => {
                return Err(anyhow::Error::new(e).context(format!("metadata of {}", o.key)))
            }
            Err(e) => {
                tracing::warn!(object = %o.key, error = %e, "skipping a damaged basebackup entry: its metadata cannot be read");
                continue;
            }
        };
        // pghoard's basic backups record neither sizes nor LSNs nor a timeline: the object's
        // own size, `original-file-size` and `start-wal-segment` say them (super::pghoard).
        let text = |v: &Option<String>| v.clone().unwrap_or_default();
        let start_wal_segment = text(&m.start_wal_segment);
        let start_lsn = match m.start_lsn {
            Some(l) => l.to_string(),
            None => pghoard::segment_start_lsn(&start_wal_segment),
        };
        let start_timeline = m
            .start_timeline
            .unwrap_or_else(|| pghoard::segment_timeline(&start_wal_segment));
        out.push(BackupListing {
            format: text(&m.format),
            start_time: normalise_time(&text(&m.start_time)),
            end_time: normalise_time(&text(&m.end_time)),
            start_lsn,
            end_lsn: m.end_lsn.map(|l| l.to_string()).unwrap_or_default(),
            start_timeline,
            start_wal_segment,
            end_wal_segment: text(&m.end_wal_segment),
            size_plain: m.total_size_plain.or(m.original_file_size).unwrap_or(0),
            size_stored: m.total_size_enc.unwrap_or(o.size),
            compression: m
                .compression_algorithm
                .map(|a| a.name().to_string())
                .unwrap_or_default(),
            encryption_key_id: m.encryption_key_id.clone(),
            pg_version: m.pg_version.map(|v| v.to_string()).unwrap_or_default(),
            name,
            site: None,
            backup_type: m.backup_type.unwrap_or_default(),
            incremental_parent: m.incremental_parent.clone(),
        });
    }
    sort_listing(&mut out);
    Ok(out)
}

/// Oldest first: by end, or start where no end is recorded (pghoard's basic backups).
fn sort_listing(list: &mut [BackupListing]) {
    let when = |b: &BackupListing| {
        if b.end_time.is_empty() {
            b.start_time.clone()
        } else {
            b.end_time.clone()
        }
    };
    list.sort_by(|a, b| (when(a), &a.name).cmp(&(when(b), &b.name)));
}

/// Times as walhoard writes them (RFC 3339 in UTC), so that listings sort and compare alike:
/// pghoard writes `2026-12-04 20:39:07.582849+00:00` (a space) or `…T20:39:18+00:00`. Kept
/// as stored when it does not parse (the entry is then skipped for targets, with a warning).
fn normalise_time(t: &str) -> String {
    match t
        .parse::<jiff::Timestamp>()
        .or_else(|_| t.replacen(' ', "T", 1).parse())
    {
        Ok(ts) => ts.to_string(),
        Err(_) => t.to_string(),
    }
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The human table of `list-basebackups`.
pub fn render_listing(list: &[BackupListing]) -> String {
    let mut rows = vec![[
        "name".to_string(),
        "size (plain/stored)".into(),
        "start time".into(),
        "end time".into(),
        "start lsn".into(),
        "end lsn".into(),
        "tli".into(),
        "compression".into(),
        "key id".into(),
        "type".into(),
    ]];
    for b in list {
        rows.push([
            b.name.clone(),
            format!(
                "{} / {}",
                human_size(b.size_plain),
                human_size(b.size_stored)
            ),
            b.start_time.clone(),
            b.end_time.clone(),
            b.start_lsn.clone(),
            b.end_lsn.clone(),
            b.start_timeline.to_string(),
            b.compression.clone(),
            b.encryption_key_id.clone().unwrap_or_else(|| "-".into()),
            match &b.incremental_parent {
                Some(p) => format!("{} on {p}", b.backup_type.as_str()),
                None => b.backup_type.as_str().to_string(),
            },
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if list.is_empty() {
        out.push_str("(no basebackups)\n");
    }
    out
}

/// A recovery target (at most one, as PostgreSQL allows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Replay all WAL there is.
    Latest,
    /// `recovery_target_time`: the text as given (PostgreSQL parses it) and its instant.
    Time(String, jiff::Timestamp),
    Xid(String),
    Name(String),
    Lsn(Lsn),
}

/// Parses a recovery_target_time as PostgreSQL writes timestamps (`2024-05-01 12:00:00.123+00`)
/// or RFC 3339. An offset is required: PostgreSQL would read a bare time in its own TimeZone,
/// which this tool cannot know when picking a backup.
pub fn parse_target_time(text: &str) -> Result<jiff::Timestamp> {
    let t = text.trim();
    if let Ok(ts) = t.parse::<jiff::Timestamp>() {
        return Ok(ts);
    }
    // PostgreSQL prints offsets as `+00` or `+05:30`; jiff wants `+00:00`.
    let fixed = match t.rfind(['+', '-']) {
        Some(i) if i > 10 && t[i + 1..].len() == 2 => format!("{t}:00"),
        _ => t.to_string(),
    };
    fixed.parse::<jiff::Timestamp>().with_context(|| {
        format!("--recovery-target-time {text:?}: not a timestamp with a UTC offset (e.g. '2024-05-01 12:00:00+00')")
    })
}

/// The backup to restore: `name` if given ("latest" = the newest), else the newest that ends
/// before the target (time and LSN targets), else the newest.
pub fn choose<'a>(
    list: &'a [BackupListing],
    name: Option<&str>,
    target: &Target,
) -> Result<&'a BackupListing> {
    if let Some(n) = name.filter(|n| *n != "latest") {
        // pghoard lists its backups by key (`<site>/basebackup/<file>`) and names local-tar
        // ones `<name>.00000000.pghoard`: each of those forms finds the backup.
        let file = n.rsplit_once("basebackup/").map_or(n, |(_, f)| f);
        let pghoard_local_tar = format!(
            "{file}{}",
            crate::basebackup::inventory::PGHOARD_CONTROL_SUFFIX
        );
        return list
            .iter()
            .find(|b| b.name == file)
            .or_else(|| list.iter().find(|b| b.name == pghoard_local_tar))
            .with_context(|| format!("no basebackup named {n:?} (object basebackup/{n} does not exist); `walhoard restore list-basebackups` lists them"));
    }
    candidates(list, target)?
        .first()
        .copied()
        .context("no basebackup candidates")
}

/// The backups that suit `target`, newest first (never empty). A backup whose end time or
/// LSN does not parse cannot be placed against a target: it is skipped with a warning rather
/// than failing the choice of every other backup.
pub fn candidates<'a>(
    list: &'a [BackupListing],
    target: &Target,
) -> Result<Vec<&'a BackupListing>> {
    let mut out = Vec::new();
    for b in list.iter().rev() {
        let ok = match target {
            Target::Time(_, t) => b.end_timestamp().map(|e| e < *t),
            Target::Lsn(l) => b.end_lsn().map(|e| e <= *l),
            _ => b.end_timestamp().map(|_| true),
        };
        match ok {
            Ok(true) => out.push(b),
            Ok(false) => {}
            Err(e) => tracing::warn!("skipping basebackup {}: {e:#}", b.name),
        }
    }
    if out.is_empty() {
        if list.is_empty() {
            bail!("the site has no basebackups (nothing under basebackup/)");
        }
        bail!("no basebackup ends before the recovery target {target:?}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_times() {
        let a = parse_target_time("2026-11-24 16:30:00.123456+00").unwrap();
        let b = parse_target_time("2026-11-24T16:30:00.123456Z").unwrap();
        assert_eq!(a, b);
        let c = parse_target_time("2026-11-24 18:30:00.123456+02").unwrap();
        assert_eq!(a, c);
        assert!(parse_target_time("2026-11-24 16:30:00").is_err());
    }

    fn listing(name: &str, end: &str, lsn: &str) -> BackupListing {
        BackupListing {
            name: name.into(),
            format: String::new(),
            start_time: end.into(),
            end_time: end.into(),
            start_lsn: lsn.into(),
            end_lsn: lsn.into(),
            start_timeline: 1,
            start_wal_segment: String::new(),
            end_wal_segment: String::new(),
            size_plain: 0,
            size_stored: 0,
            compression: String::new(),
            encryption_key_id: None,
            pg_version: String::new(),
            site: None,
            backup_type: BackupType::Full,
            incremental_parent: None,
        }
    }

    #[test]
    fn chooses_the_newest_before_the_target() {
        let list = [
            listing("a", "2026-01-01T00:00:00Z", "0/3000000"),
            listing("b", "2026-01-02T00:00:00Z", "0/5000000"),
        ];
        let t = |s: &str| Target::Time(s.into(), parse_target_time(s).unwrap());
        assert_eq!(
            choose(&list, None, &t("2026-01-01 12:00:00+00"))
                .unwrap()
                .name,
            "a"
        );
        assert_eq!(
            choose(&list, None, &t("2026-01-03 12:00:00+00"))
                .unwrap()
                .name,
            "b"
        );
        assert!(choose(&list, None, &t("2025-01-03 12:00:00+00")).is_err());
        assert_eq!(
            choose(&list, None, &Target::Lsn("0/4000000".parse().unwrap()))
                .unwrap()
                .name,
            "a"
        );
        assert_eq!(
            choose(&list, None, &Target::Name("x".into())).unwrap().name,
            "b"
        );
        assert_eq!(choose(&list, Some("a"), &Target::Latest).unwrap().name, "a");
        let e = choose(&list, Some("zz"), &Target::Latest).unwrap_err();
        assert!(e.to_string().contains("basebackup/zz"), "{e}");
    }

    #[test]
    fn damaged_basebackup_entry_is_skipped_by_latest_and_targets() {
        // "zz" has an end time that does not parse (it sorts last, as the newest would).
        let list = [
            listing("a", "2026-01-01T00:00:00Z", "0/3000000"),
            listing("b", "2026-01-02T00:00:00Z", "0/5000000"),
            listing("zz", "garbage", "not an lsn"),
        ];
        assert_eq!(choose(&list, None, &Target::Latest).unwrap().name, "b");
        assert_eq!(
            choose(&list, Some("latest"), &Target::Latest).unwrap().name,
            "b"
        );
        let t = "2026-01-01 12:00:00+00";
        let time = Target::Time(t.into(), parse_target_time(t).unwrap());
        assert_eq!(choose(&list, None, &time).unwrap().name, "a");
        let lsn = Target::Lsn("0/6000000".parse().unwrap());
        assert_eq!(choose(&list, None, &lsn).unwrap().name, "b");
        let names: Vec<&str> = candidates(&list, &Target::Latest)
            .unwrap()
            .iter()
            .map(|b| b.name.as_str())
            .collect();
        assert_eq!(names, ["b", "a"]);
        // Named explicitly, it is still that one (and fails later, naming it).
        assert_eq!(
            choose(&list, Some("zz"), &Target::Latest).unwrap().name,
            "zz"
        );
    }
}
