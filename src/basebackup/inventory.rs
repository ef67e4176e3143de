//! What is under a site's `basebackup/` and `basebackup_chunk/`, classified by who wrote it,
//! so that retention and orphan cleanup act only on objects they positively identify
//! (docs/formats.md, "What retention may delete").
//!
//! A control object (`basebackup/<file>`) is
//! - **walhoard's** when its metadata carries `backup-name` equal to its key's name (walhoard
//!   writes that key on every object of a backup; pghoard writes it on none);
//! - **pghoard's** when its key is pghoard's local-tar naming `<name>.00000000.pghoard`, or its
//!   metadata names a pghoard format (`pghoard-bb-v1`/`v2`, `pghoard-delta-v1`/`v2`), or it has
//!   no `format` but pghoard's `start-wal-segment` (a `basic`/`pipe` backup);
//! - **unrecognised** otherwise, including when its metadata cannot be read at all.
//!
//! Only walhoard's backups are ever deleted by retention. Every backup of any kind keeps the
//! WAL from its start segment on; one whose start segment is unknown keeps all WAL.
//!
//! A chunk directory `basebackup_chunk/<name>/` is an orphan (deleted by retention) only when
//! no control object's key names it (`basebackup/<name>` or `basebackup/<name>.<anything>`,
//! whatever its kind or health), every object in it carries walhoard's `backup-name: <name>`,
//! and its newest object is older than [`ORPHAN_MIN_AGE`]. One not written by walhoard is
//! left alone and reported.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use walhoard_protocol::{SegmentId, WalSegmentName};

use crate::storage::meta::ObjectMeta;
use crate::storage::{ObjectInfo, ObjectStore};

/// How long a chunk directory without a control object must have been left unwritten before
/// it counts as an interrupted backup's. A running backup (of this daemon, of another process
/// on the same archive, or of pghoard) stores a chunk far more often than this; an interrupted
/// one wastes its space for at most this long.
pub const ORPHAN_MIN_AGE: Duration = Duration::from_secs(24 * 3600);

/// pghoard's suffix of a local-tar control object: `basebackup/<name>.00000000.pghoard`.
pub const PGHOARD_CONTROL_SUFFIX: &str = ".00000000.pghoard";

/// Formats pghoard writes into a control object's `format` metadata.
const PGHOARD_FORMATS: [&str; 4] = [
    "pghoard-bb-v1",
    "pghoard-bb-v2",
    "pghoard-delta-v1",
    "pghoard-delta-v2",
];

/// Who wrote a control object, as far as its key and metadata tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writer {
    Walhoard,
    Pghoard,
    /// Neither; the reason, for the log and `check`.
    Unrecognised(String),
}

/// One object under `basebackup/`.
#[derive(Debug, Clone)]
pub struct Control {
    /// `basebackup/<file>`.
    pub key: String,
    /// The backup's name: the key's file name, pghoard's local-tar suffix removed.
    pub name: String,
    pub writer: Writer,
    /// Seconds since the epoch, from `start-time` (`None`: missing or not a time).
    pub start_time: Option<f64>,
    /// The object's modification time (seconds since the epoch), when the store tells.
    pub modified: Option<i64>,
    /// `start-wal-segment`, when present and a segment name.
    pub start_segment: Option<SegmentId>,
    /// `start-wal-segment` as stored (for messages).
    pub start_wal_segment: Option<String>,
    /// `incremental-parent`: the backup an incremental one needs (walhoard's).
    pub incremental_parent: Option<String>,
}

/// What a chunk directory without a control object is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkDirState {
    /// A control object names it.
    Referenced,
    /// walhoard's, unlisted, and older than [`ORPHAN_MIN_AGE`]: an interrupted backup's.
    Orphan,
    /// walhoard's and unlisted, but written to recently: maybe a backup still running.
    Recent,
    /// Not (entirely) walhoard's: left alone; the reason.
    Foreign(String),
}

/// One `basebackup_chunk/<name>/` directory.
#[derive(Debug, Clone)]
pub struct ChunkDir {
    pub name: String,
    pub objects: Vec<ObjectInfo>,
    pub state: ChunkDirState,
}

/// A site's basebackup objects, classified.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub controls: Vec<Control>,
    pub chunk_dirs: Vec<ChunkDir>,
}

impl Inventory {
    /// What nothing here may delete and nobody has explained: unrecognised control objects
    /// and foreign unlisted chunk directories, one line each.
    pub fn unrecognised(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.controls {
            if let Writer::Unrecognised(why) = &c.writer {
                out.push(format!("{}: {why}", c.key));
            }
        }
        for d in &self.chunk_dirs {
            if let ChunkDirState::Foreign(why) = &d.state {
                out.push(format!("basebackup_chunk/{}/: {why}", d.name));
            }
        }
        out
    }
}

fn parse_time(s: &str) -> Option<f64> {
    // walhoard writes RFC 3339; pghoard writes `2024-05-01T12:00:00+00:00` or with a space.
    let ts: jiff::Timestamp = s
        .parse()
        .or_else(|_| s.replacen(' ', "T", 1).parse())
        .ok()?;
    Some(ts.as_millisecond() as f64 / 1000.0)
}

/// The key's backup name and who wrote it, from the key and its metadata (`Err`: the
/// metadata could not be read).
pub fn classify(
    file: &str,
    metadata: &std::result::Result<ObjectMeta, String>,
) -> (String, Writer) {
    if let Some(stem) = file.strip_suffix(PGHOARD_CONTROL_SUFFIX) {
        if !stem.is_empty() {
            return (stem.to_string(), Writer::Pghoard);
        }
    }
    let name = file.to_string();
    let m = match metadata {
        Ok(m) => m,
        Err(e) => {
            return (
                name,
                Writer::Unrecognised(format!("metadata unreadable: {e}")),
            )
        }
    };
    if m.backup_name.as_deref() == Some(file) {
        return (name, Writer::Walhoard);
    }
    match &m.format {
        Some(f) if PGHOARD_FORMATS.contains(&f.as_str()) => (name, Writer::Pghoard),
        None if m.start_wal_segment.is_some() => (name, Writer::Pghoard),
        Some(f) => (
            name,
            Writer::Unrecognised(format!(
                "format {f:?} written by neither walhoard nor pghoard"
            )),
        ),
        None => (
            name,
            Writer::Unrecognised("no backup-name, format or start-wal-segment metadata".into()),
        ),
    }
}

/// Reads and classifies the site's `basebackup/` and `basebackup_chunk/` objects. `now` is
/// seconds since the epoch.
pub async fn scan(store: &ObjectStore, now: f64) -> Result<Inventory> {
    let mut controls = Vec::new();
    for o in store.list("basebackup").await.context("list basebackup/")? {
        let file = o.key.trim_start_matches("basebackup/");
        if file.is_empty() {
            continue;
        }
        if file.contains('/') {
            controls.push(Control {
                key: o.key.clone(),
                name: file.to_string(),
                writer: Writer::Unrecognised("not a backup's control object (nested key)".into()),
                start_time: None,
                modified: o.last_modified,
                start_segment: None,
                start_wal_segment: None,
                incremental_parent: None,
            });
            continue;
        }
        let metadata = store.object_meta(&o.key).await.map_err(|e| e.to_string());
        let (name, writer) = classify(file, &metadata);
        let m = metadata.unwrap_or_default();
        let start_wal_segment = m.start_wal_segment.clone();
        controls.push(Control {
            key: o.key.clone(),
            name,
            writer,
            start_time: m.start_time.as_deref().and_then(parse_time),
            modified: o.last_modified,
            start_segment: start_wal_segment
                .as_deref()
                .and_then(|s| s.parse::<WalSegmentName>().ok())
                .and_then(|w| w.segment()),
            start_wal_segment,
            incremental_parent: m.incremental_parent.clone(),
        });
    }

    let mut dirs: BTreeMap<String, Vec<ObjectInfo>> = BTreeMap::new();
    for o in store
        .list("basebackup_chunk")
        .await
        .context("list basebackup_chunk/")?
    {
        let mut parts = o.key.splitn(3, '/');
        let (_, Some(dir)) = (parts.next(), parts.next()) else {
            continue;
        };
        dirs.entry(dir.to_string()).or_default().push(o);
    }
    let mut chunk_dirs = Vec::new();
    for (name, objects) in dirs {
        let referenced = controls.iter().any(|c| {
            let file = c.key.trim_start_matches("basebackup/");
            c.name == name
                || file == name
                || file
                    .strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
        });
        let state = if referenced {
            ChunkDirState::Referenced
        } else {
            unlisted_state(store, &name, &objects, now).await?
        };
        chunk_dirs.push(ChunkDir {
            name,
            objects,
            state,
        });
    }
    Ok(Inventory {
        controls,
        chunk_dirs,
    })
}

/// Whether an unlisted chunk directory is walhoard's and old enough to be an orphan.
async fn unlisted_state(
    store: &ObjectStore,
    name: &str,
    objects: &[ObjectInfo],
    now: f64,
) -> Result<ChunkDirState> {
    let mut newest: i64 = 0;
    for o in objects {
        if o.key.matches('/').count() != 2 {
            return Ok(ChunkDirState::Foreign(format!(
                "{} is not a chunk walhoard writes",
                o.key
            )));
        }
        match store.object_meta(&o.key).await {
            Ok(m) if m.backup_name.as_deref() == Some(name) => {}
            Ok(_) => {
                return Ok(ChunkDirState::Foreign(format!(
                    "{} lacks walhoard's backup-name metadata (pghoard's or another tool's?)",
                    o.key
                )))
            }
            Err(e) => {
                return Ok(ChunkDirState::Foreign(format!(
                    "{}: metadata unreadable: {e}",
                    o.key
                )))
            }
        }
        let modified = match o.last_modified {
            Some(t) => Some(t),
            None => store
                .stat(&o.key)
                .await
                .with_context(|| format!("stat {}", o.key))?
                .and_then(|i| i.last_modified),
        };
        match modified {
            Some(t) => newest = newest.max(t),
            // No time: it may be a running backup's; never an orphan.
            None => return Ok(ChunkDirState::Recent),
        }
    }
    if now - (newest as f64) < ORPHAN_MIN_AGE.as_secs_f64() {
        Ok(ChunkDirState::Recent)
    } else {
        Ok(ChunkDirState::Orphan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> std::result::Result<ObjectMeta, String> {
        let m = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(ObjectMeta::parse("basebackup/test", &m).unwrap())
    }

    #[test]
    fn control_objects_are_classified_by_who_wrote_them() {
        let n = "2026-12-04_20-36_0";
        assert_eq!(
            classify(n, &meta(&[("backup-name", n), ("format", "pghoard-bb-v2")])),
            (n.to_string(), Writer::Walhoard)
        );
        // pghoard's local-tar control object, whatever its metadata says.
        assert_eq!(
            classify(&format!("{n}.00000000.pghoard"), &Err("gone".into())),
            (n.to_string(), Writer::Pghoard)
        );
        // pghoard's basic backup: no format, a start segment.
        assert_eq!(
            classify(
                n,
                &meta(&[("start-wal-segment", "000000010000000000000007")])
            )
            .1,
            Writer::Pghoard
        );
        assert_eq!(
            classify(n, &meta(&[("format", "pghoard-delta-v2")])).1,
            Writer::Pghoard
        );
        // Another backup's name in backup-name is not walhoard's backup of this name.
        assert!(matches!(
            classify(n, &meta(&[("backup-name", "other"), ("format", "x")])).1,
            Writer::Unrecognised(_)
        ));
        assert!(matches!(
            classify(n, &Err("expected value at line 1".into())).1,
            Writer::Unrecognised(_)
        ));
    }

    #[test]
    fn pghoard_times_parse() {
        assert_eq!(parse_time("2026-12-04T20:36:15+00:00"), Some(1796416575.0));
        assert_eq!(
            parse_time("2026-12-04 20:36:16.275143+00:00"),
            Some(1796416576.275)
        );
        assert_eq!(parse_time("garbage"), None);
    }
}
