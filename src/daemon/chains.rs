//! Incremental backup chains as retention sees them: a full backup and the incremental ones
//! that depend on it (directly or through each other, `incremental-parent`). Retention counts
//! and deletes whole chains, so a kept incremental never loses a backup it needs; a site
//! without incremental backups has chains of one, which is pghoard's counting.

use std::collections::HashMap;

use super::basebackups::ListedBackup;

/// `backups` (oldest first) grouped into chains, ordered by their first (oldest) backup, each
/// oldest first. An incremental backup whose parent is not among `backups` starts a chain of
/// its own (it is kept or deleted with whatever depends on it).
pub fn chains(backups: &[ListedBackup]) -> Vec<Vec<ListedBackup>> {
    let mut out: Vec<Vec<ListedBackup>> = Vec::new();
    let mut chain_of: HashMap<&str, usize> = HashMap::new();
    for b in backups {
        let parent_chain = b
            .incremental_parent
            .as_deref()
            .and_then(|p| chain_of.get(p).copied());
        let i = match parent_chain {
            Some(i) => {
                out[i].push(b.clone());
                i
            }
            None => {
                out.push(vec![b.clone()]);
                out.len() - 1
            }
        };
        chain_of.insert(&b.name, i);
    }
    out
}

/// The start time of a chain's newest backup: the chain is as old as that.
pub fn newest_start(chain: &[ListedBackup]) -> f64 {
    chain
        .iter()
        .map(|b| b.start_time)
        .fold(f64::NEG_INFINITY, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &str, parent: Option<&str>) -> ListedBackup {
        ListedBackup {
            name: name.into(),
            start_time: 0.0,
            start_wal_segment: None,
            own: true,
            incremental_parent: parent.map(str::to_string),
        }
    }

    #[test]
    fn incrementals_join_their_parents_chain() {
        let list = [
            b("f1", None),
            b("i1", Some("f1")),
            b("i2", Some("i1")),
            b("f2", None),
            b("i3", Some("f2")),
            b("orphan", Some("gone")),
        ];
        let grouped = chains(&list);
        let c: Vec<Vec<&str>> = grouped
            .iter()
            .map(|c| c.iter().map(|b| b.name.as_str()).collect())
            .collect();
        assert_eq!(
            c,
            [vec!["f1", "i1", "i2"], vec!["f2", "i3"], vec!["orphan"]]
        );
    }
}
