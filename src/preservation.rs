//! Backup preservation requests, as pghoard keeps them: an empty object
//! `<prefix>/preservation_request/<backup>_<until>` whose metadata says which backup
//! (`preserve-backup`) to keep until when (`preserve-until`). pghoard's restore writes one
//! for `get-basebackup --preserve-until` (`BaseBackupInfoFromBucket.request_backup_preservation`
//! in pghoard/object_store.py) and deletes it once the restore succeeded unless told not to;
//! its retention (`determine_backups_to_delete` in pghoard/pghoard.py) stops deleting at the
//! first preserved backup, so that backup, every newer one and the WAL from its start on stay.
//! walhoard reads and writes the same objects, so a request either tool wrote is honoured by
//! both, and a backup's latest request wins (`parse_preservation_requests`).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use jiff::Timestamp;
use serde::Serialize;

use crate::storage::{Metadata, ObjectStore};

/// The directory of the requests, under the site prefix.
pub const DIR: &str = "preservation_request";
/// Metadata: the backup's name (the key's file name, as listed).
pub const PRESERVE_BACKUP: &str = "preserve-backup";
/// Metadata: until when, as Python prints a datetime (`2030-01-01 00:00:00+00:00`).
pub const PRESERVE_UNTIL: &str = "preserve-until";

/// One request found under [`DIR`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Request {
    /// The request's name (its key without [`DIR`]), what `cancel` takes.
    pub name: String,
    pub backup: String,
    #[serde(serialize_with = "serialize_time")]
    pub until: Timestamp,
}

fn serialize_time<S: serde::Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_string())
}

/// The latest `preserve-until` of each preserved backup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Preservations(BTreeMap<String, Timestamp>);

impl Preservations {
    /// Until when `backup` is preserved, if a request names it.
    pub fn until(&self, backup: &str) -> Option<Timestamp> {
        self.0.get(backup).copied()
    }

    /// Whether `backup` must be kept at `now` (pghoard's `is_basebackup_preserved`).
    pub fn preserves(&self, backup: &str, now: Timestamp) -> bool {
        self.until(backup).is_some_and(|u| u > now)
    }

    pub fn from_requests(requests: &[Request]) -> Self {
        let mut map: BTreeMap<String, Timestamp> = BTreeMap::new();
        for r in requests {
            let e = map.entry(r.backup.clone()).or_insert(r.until);
            *e = (*e).max(r.until);
        }
        Preservations(map)
    }
}

/// Python's `str()` of an aware UTC datetime, which pghoard puts in the key and metadata.
fn python_str(t: Timestamp) -> String {
    let micros = t.subsec_microsecond();
    let base = t.strftime("%Y-%m-%d %H:%M:%S").to_string();
    if micros == 0 {
        format!("{base}+00:00")
    } else {
        format!("{base}.{micros:06}+00:00")
    }
}

/// Parses a `--preserve-until` or stored `preserve-until`: RFC 3339, pghoard's
/// `2030-01-01 00:00:00+00:00`, or a date and time without an offset, read as UTC (as
/// rohmu's `parse_timestamp` does), or a bare date (its midnight, UTC).
pub fn parse_until(text: &str) -> Result<Timestamp> {
    let t = text.trim();
    if let Ok(ts) = t.parse::<Timestamp>() {
        return Ok(ts);
    }
    let with_t = t.replacen(' ', "T", 1);
    if let Ok(ts) = with_t.parse::<Timestamp>() {
        return Ok(ts);
    }
    let utc = |dt: jiff::civil::DateTime| dt.to_zoned(jiff::tz::TimeZone::UTC).ok();
    if let Some(z) = with_t.parse::<jiff::civil::DateTime>().ok().and_then(utc) {
        return Ok(z.timestamp());
    }
    if let Some(z) = t
        .parse::<jiff::civil::Date>()
        .ok()
        .and_then(|d| utc(d.to_datetime(jiff::civil::Time::midnight())))
    {
        return Ok(z.timestamp());
    }
    anyhow::bail!(
        "{text:?} is not a date or time (e.g. 2030-01-01, 2030-01-01T12:00:00Z, \
         2030-01-01 12:00:00+00:00)"
    )
}

/// Stores a request to keep `backup` until `until`; returns its name.
pub async fn request(store: &ObjectStore, backup: &str, until: Timestamp) -> Result<String> {
    let until_text = python_str(until);
    let name = format!("{backup}_{until_text}");
    let mut metadata = Metadata::new();
    metadata.insert(PRESERVE_BACKUP.into(), backup.into());
    metadata.insert(PRESERVE_UNTIL.into(), until_text);
    store
        .put_bytes(&format!("{DIR}/{name}"), b"", &metadata)
        .await
        .with_context(|| format!("store preservation request {DIR}/{name}"))?;
    Ok(name)
}

/// Deletes the request `name` (as [`request`] returned it or [`list`] shows it).
pub async fn cancel(store: &ObjectStore, name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') {
        anyhow::bail!("{name:?} is not a preservation request's name");
    }
    let key = format!("{DIR}/{name}");
    if store.stat(&key).await?.is_none() {
        anyhow::bail!("no preservation request {key}");
    }
    store
        .delete(&key)
        .await
        .with_context(|| format!("delete preservation request {key}"))
}

/// `get-basebackup --preserve-until`: the restored backup is preserved before anything is
/// written, and (as pghoard's default `--cancel-preserve-on-success`) the request is deleted
/// once the restore succeeded; a failed restore leaves it, so a retry still finds the backup.
#[derive(Debug, Clone)]
pub struct RestorePreservation {
    pub until: Timestamp,
    pub cancel_on_success: bool,
}

impl RestorePreservation {
    /// Stores the request for `backup`; returns its name.
    pub async fn begin(&self, store: &ObjectStore, backup: &str) -> Result<String> {
        let name = request(store, backup, self.until).await?;
        eprintln!(
            "restore: basebackup {backup} preserved until {} ({DIR}/{name})",
            self.until
        );
        Ok(name)
    }

    /// After a successful restore: cancels the request unless told to keep it.
    pub async fn end(&self, store: &ObjectStore, name: &str) {
        if !self.cancel_on_success {
            return;
        }
        match cancel(store, name).await {
            Ok(()) => eprintln!("restore: preservation request {DIR}/{name} cancelled"),
            // The restore itself succeeded: the request only keeps the backup longer.
            Err(e) => eprintln!(
                "restore: warning: preservation request {DIR}/{name} not cancelled: {e:#}"
            ),
        }
    }
}

/// Every request of the site. One whose metadata cannot be read or parsed is an error naming
/// its key: skipping it could let retention delete a backup someone asked to keep.
pub async fn list(store: &ObjectStore) -> Result<Vec<Request>> {
    let mut out = Vec::new();
    for o in store
        .list(DIR)
        .await
        .with_context(|| format!("list {DIR}/"))?
    {
        let name = o.key.trim_start_matches(DIR).trim_start_matches('/');
        let m = store
            .metadata(&o.key)
            .await
            .with_context(|| format!("metadata of preservation request {}", o.key))?;
        let field = |k: &str| {
            m.get(k)
                .with_context(|| format!("preservation request {}: no {k} metadata", o.key))
        };
        let backup = field(PRESERVE_BACKUP)?.clone();
        let until = parse_until(field(PRESERVE_UNTIL)?)
            .with_context(|| format!("preservation request {}: {PRESERVE_UNTIL}", o.key))?;
        out.push(Request {
            name: name.to_string(),
            backup,
            until,
        });
    }
    Ok(out)
}

/// [`list`] folded into what retention and cleanup ask.
pub async fn load(store: &ObjectStore) -> Result<Preservations> {
    Ok(Preservations::from_requests(&list(store).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_parse_as_pghoard_and_rohmu_write_them() {
        let want: Timestamp = "2030-01-02T03:04:05Z".parse().unwrap();
        for text in [
            "2030-01-02T03:04:05Z",
            "2030-01-02 03:04:05+00:00",
            "2030-01-02T03:04:05",
            "2030-01-02 05:04:05+02:00",
        ] {
            assert_eq!(parse_until(text).unwrap(), want, "{text}");
        }
        assert_eq!(
            parse_until("2030-01-02").unwrap(),
            "2030-01-02T00:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert!(parse_until("next tuesday").is_err());
        assert_eq!(python_str(want), "2030-01-02 03:04:05+00:00");
        let micro: Timestamp = "2030-01-02T03:04:05.25Z".parse().unwrap();
        assert_eq!(python_str(micro), "2030-01-02 03:04:05.250000+00:00");
        assert_eq!(parse_until(&python_str(micro)).unwrap(), micro);
    }

    #[test]
    fn the_latest_request_of_a_backup_wins() {
        let t = |s: &str| parse_until(s).unwrap();
        let req = |b: &str, u: &str| Request {
            name: format!("{b}_{u}"),
            backup: b.into(),
            until: t(u),
        };
        let p = Preservations::from_requests(&[
            req("b1", "2030-01-01"),
            req("b1", "2031-01-01"),
            req("b1", "2029-01-01"),
        ]);
        assert_eq!(p.until("b1"), Some(t("2031-01-01")));
        assert!(p.preserves("b1", t("2030-06-01")));
        assert!(!p.preserves("b1", t("2031-01-01")));
        assert!(!p.preserves("b2", t("2000-01-01")));
    }
}
