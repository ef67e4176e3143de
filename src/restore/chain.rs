//! The chain of an incremental backup: its parent, the parent's parent, … back to a full
//! backup, read and checked before anything is written.
//!
//! Each member's control object must be readable and in the stream format (only those keep
//! the `backup_manifest` an incremental backup is taken against). A member is refused, by
//! name and with the reason, when it is missing from the archive, when its system identifier
//! or PostgreSQL major differs from its child's, when it ends at or after its child's start
//! LSN, or when it is on a later timeline than its child (a child's history can only
//! continue its parent's timeline). A parent already in the chain (a forged loop) is refused,
//! and the chain is at most [`MAX_CHAIN`] long.

use anyhow::{bail, Context, Result};
use walhoard_basebackup::control::{BackupMetadata, BackupType, FORMAT_STREAM};
use walhoard_protocol::Lsn;

use super::get::read_known_control;
use super::{BackupListing, RestoreSite};

/// More backups than any chain walhoard takes (`basebackup_incremental_max_chain`) could
/// reach; a longer one is refused as damaged.
pub const MAX_CHAIN: usize = 1000;

/// One backup of a chain, its control object read.
#[derive(Debug, Clone)]
pub struct Member {
    pub listing: BackupListing,
    pub meta: BackupMetadata,
}

fn lsn(name: &str, what: &str, v: &str) -> Result<Lsn> {
    v.parse::<Lsn>()
        .map_err(|e| anyhow::anyhow!("basebackup/{name}: {what} {v:?} is not an LSN: {e}"))
}

/// Checks that `parent` can be the parent of `child`.
pub fn check_link(child: &str, c: &BackupMetadata, parent: &str, p: &BackupMetadata) -> Result<()> {
    let refuse = |why: String| -> Result<()> {
        bail!("basebackup/{child}: its parent basebackup/{parent} {why}: the chain cannot be restored")
    };
    if p.format != FORMAT_STREAM {
        return refuse(format!(
            "has the format {:?}, not {FORMAT_STREAM:?} (an incremental backup's parent keeps its backup_manifest)",
            p.format
        ));
    }
    if let (Some(a), Some(b)) = (&c.system_identifier, &p.system_identifier) {
        if a != b {
            return refuse(format!(
                "is of another database system (system identifier {b}, the child's {a})"
            ));
        }
    }
    if c.pg_version / 10000 != p.pg_version / 10000 {
        return refuse(format!(
            "is of PostgreSQL {} (server_version_num {}), the child of {}",
            p.pg_version / 10000,
            p.pg_version,
            c.pg_version
        ));
    }
    let parent_end = lsn(parent, "end LSN", &p.end_lsn)?;
    let child_start = lsn(child, "start LSN", &c.start_lsn)?;
    if parent_end > child_start {
        return refuse(format!(
            "ends at {parent_end}, after the child's start {child_start}"
        ));
    }
    if p.end_timeline > c.start_timeline {
        return refuse(format!(
            "ends on timeline {}, later than the child's start timeline {}",
            p.end_timeline, c.start_timeline
        ));
    }
    Ok(())
}

/// The chain of the incremental backup `newest` (its listing and metadata), oldest (the full
/// backup) first, newest last. `list` is every backup of the site.
pub async fn resolve(
    site: &RestoreSite,
    list: &[BackupListing],
    newest: &BackupListing,
    meta: &BackupMetadata,
) -> Result<Vec<Member>> {
    let mut chain = vec![Member {
        listing: newest.clone(),
        meta: meta.clone(),
    }];
    loop {
        let child = chain.last().expect("the chain has its newest member");
        if child.meta.backup_type == BackupType::Full {
            break;
        }
        let name = &child.listing.name;
        if chain.len() > MAX_CHAIN {
            bail!(
                "basebackup/{}: its chain is longer than {MAX_CHAIN} backups without reaching a full backup (a loop of parents?): refused",
                newest.name
            );
        }
        let parent_name = child.meta.incremental_parent.as_deref().with_context(|| {
            format!("basebackup/{name} is incremental but names no parent (incremental_parent)")
        })?;
        if chain.iter().any(|m| m.listing.name == parent_name) {
            bail!(
                "basebackup/{name}: its parent basebackup/{parent_name} is already in the chain of basebackup/{} (a loop of parents): refused",
                newest.name
            );
        }
        let Some(parent) = list.iter().find(|b| b.name == parent_name) else {
            bail!(
                "basebackup/{name}: its parent basebackup/{parent_name} is missing from the archive: \
                 the chain of basebackup/{} cannot be restored",
                newest.name
            );
        };
        let source = site.for_backup(parent)?;
        let (pmeta, _, _) = read_known_control(&source, parent_name)
            .await
            .with_context(|| {
                format!(
                    "basebackup/{name}: its parent basebackup/{parent_name} is damaged: the chain of basebackup/{} cannot be restored",
                    newest.name
                )
            })?;
        check_link(name, &child.meta, parent_name, &pmeta)?;
        chain.push(Member {
            listing: parent.clone(),
            meta: pmeta,
        });
    }
    chain.reverse();
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(start: &str, end: &str, tli: u32, sysid: &str) -> BackupMetadata {
        serde_json::from_value(serde_json::json!({
            "backup_start_time": "", "backup_start_wal_segment": "", "backup_end_time": "",
            "backup_end_wal_segment": "", "pgdata": null, "pghoard_object": "", "pghoard_version": "",
            "tablespaces": {}, "host": "", "chunks": [], "format": FORMAT_STREAM,
            "start_lsn": start, "end_lsn": end, "start_timeline": tli, "end_timeline": tli,
            "pg_version": 170005, "system_identifier": sysid, "basebackup_mode": "incremental",
            "active_backup_mode": "", "wal_included": false, "compression_algorithm": "zstd",
            "encryption_key_id": null, "total_size_plain": 0, "total_size_enc": 0
        }))
        .unwrap()
    }

    #[test]
    fn links_are_checked() {
        let p = meta("0/2000028", "0/2000100", 1, "7");
        check_link("c", &meta("0/4000028", "0/4000100", 1, "7"), "p", &p).unwrap();
        check_link("c", &meta("0/4000028", "0/4000100", 2, "7"), "p", &p).unwrap();
        for (c, why) in [
            (
                meta("0/4000028", "0/4000100", 1, "8"),
                "another database system",
            ),
            (
                meta("0/2000050", "0/4000100", 1, "7"),
                "after the child's start",
            ),
        ] {
            let err = check_link("c", &c, "p", &p).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains("basebackup/p"), "{err}");
        }
        let later = meta("0/2000028", "0/2000100", 3, "7");
        let err = check_link("c", &meta("0/4000028", "0/4000100", 2, "7"), "p", &later)
            .unwrap_err()
            .to_string();
        assert!(err.contains("timeline"), "{err}");
        let mut other = meta("0/4000028", "0/4000100", 1, "7");
        other.pg_version = 180001;
        assert!(check_link("c", &other, "p", &p).is_err());
        let mut tar = p.clone();
        tar.format = "pghoard-bb-v2".into();
        assert!(check_link("c", &meta("0/4000028", "0/4000100", 1, "7"), "p", &tar).is_err());
    }
}
