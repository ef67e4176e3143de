//! Incremental backups in `verify`: a backup taken with `BASE_BACKUP ( INCREMENTAL )` restores
//! only with every backup up its `incremental_parent` chain. Verifying one verifies its chain
//! ([`with_parents`]), and it is reported not restorable when a parent is missing or has
//! problems of its own ([`problems`]).

use std::collections::{BTreeMap, BTreeSet};

use super::{BackupReport, Problem};
use crate::restore::BackupListing;

/// `chosen` and, before each, the backups of `listed` it depends on (each once, oldest first
/// as listed).
pub fn with_parents<'a>(
    listed: &'a [BackupListing],
    chosen: Vec<&'a BackupListing>,
) -> Vec<&'a BackupListing> {
    let by_name: BTreeMap<&str, &BackupListing> =
        listed.iter().map(|b| (b.name.as_str(), b)).collect();
    let mut wanted: BTreeSet<&str> = BTreeSet::new();
    for b in chosen {
        let mut current = Some(b);
        while let Some(c) = current {
            if !wanted.insert(c.name.as_str()) {
                break;
            }
            current = c
                .incremental_parent
                .as_deref()
                .and_then(|p| by_name.get(p).copied());
        }
    }
    listed
        .iter()
        .filter(|b| wanted.contains(b.name.as_str()))
        .collect()
}

/// Problems of incremental backups whose chain is broken: a parent that is not listed, or one
/// whose own report has problems. `reports` are those of [`with_parents`]'s backups.
pub fn problems(listed: &[BackupListing], reports: &[BackupReport]) -> Vec<(usize, Problem)> {
    let parent_of: BTreeMap<&str, Option<&str>> = listed
        .iter()
        .map(|b| (b.name.as_str(), b.incremental_parent.as_deref()))
        .collect();
    let damaged: BTreeSet<&str> = reports
        .iter()
        .filter(|r| !r.problems.is_empty())
        .map(|r| r.name.as_str())
        .collect();
    let mut out = Vec::new();
    for (i, r) in reports.iter().enumerate() {
        let key = format!("basebackup/{}", r.name);
        let mut current = r.name.as_str();
        let mut seen = BTreeSet::new();
        while let Some(Some(parent)) = parent_of.get(current) {
            if !seen.insert(*parent) {
                out.push((
                    i,
                    Problem::new(
                        &key,
                        format!("its incremental_parent chain loops at {parent}"),
                    ),
                ));
                break;
            }
            if !parent_of.contains_key(parent) {
                out.push((
                    i,
                    Problem::new(
                        &key,
                        format!(
                            "not restorable: incremental on {parent}, which is not in the archive"
                        ),
                    ),
                ));
                break;
            }
            if damaged.contains(parent) {
                out.push((
                    i,
                    Problem::new(
                        &key,
                        format!("not restorable: incremental on {parent}, which has problems (see them)"),
                    ),
                ));
                break;
            }
            current = parent;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use walhoard_basebackup::control::BackupType;

    fn listing(name: &str, parent: Option<&str>) -> BackupListing {
        BackupListing {
            name: name.into(),
            format: String::new(),
            start_time: String::new(),
            end_time: String::new(),
            start_lsn: String::new(),
            end_lsn: String::new(),
            start_timeline: 1,
            start_wal_segment: String::new(),
            end_wal_segment: String::new(),
            size_plain: 0,
            size_stored: 0,
            compression: String::new(),
            encryption_key_id: None,
            pg_version: String::new(),
            site: None,
            backup_type: if parent.is_some() {
                BackupType::Incremental
            } else {
                BackupType::Full
            },
            incremental_parent: parent.map(str::to_string),
        }
    }

    fn report(name: &str, damaged: bool) -> BackupReport {
        BackupReport {
            name: name.into(),
            format: String::new(),
            start_lsn: String::new(),
            end_lsn: String::new(),
            start_timeline: 1,
            target_timeline: 1,
            chunks: 0,
            restorable_to: None,
            problems: if damaged {
                vec![Problem::new("x", "bad".into())]
            } else {
                Vec::new()
            },
        }
    }

    #[test]
    fn a_chain_is_verified_whole_and_breaks_at_a_missing_or_damaged_parent() {
        let listed = [
            listing("f", None),
            listing("i1", Some("f")),
            listing("i2", Some("i1")),
            listing("other", None),
            listing("lost", Some("gone")),
        ];
        let names: Vec<&str> = with_parents(&listed, vec![&listed[2]])
            .iter()
            .map(|b| b.name.as_str())
            .collect();
        assert_eq!(names, ["f", "i1", "i2"]);
        // f damaged: i1 and i2 are not restorable; "lost" names its missing parent.
        let reports = [
            report("f", true),
            report("i1", false),
            report("i2", false),
            report("lost", false),
        ];
        let found: Vec<(usize, String)> = problems(&listed, &reports)
            .into_iter()
            .map(|(i, p)| (i, p.problem))
            .collect();
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].1.contains("incremental on f, which has problems"));
        assert_eq!(found[1].0, 2);
        assert!(found[2]
            .1
            .contains("incremental on gone, which is not in the archive"));
        // Nothing damaged: no problem for the chain.
        let reports = [report("f", false), report("i1", false), report("i2", false)];
        assert!(problems(&listed[..3], &reports).is_empty());
    }
}
