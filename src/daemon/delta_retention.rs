//! Retention of delta objects (`basebackup_delta/<blake2s>`, docs/formats.md "Delta
//! backups"): shared by every delta backup that references them, walhoard's and pghoard's, so
//! they go only when no backup that stays references them. Run after retention deleted its
//! backups. An object is deleted only when
//! - every control object that stays could be read: a delta backup's manifest (walhoard's or
//!   pghoard's) lists what it references; an unrecognised control object, or one whose
//!   metadata or manifest cannot be read, might reference anything, so nothing is deleted;
//! - no manifest names it;
//! - it carries walhoard's `walhoard-writer` mark (pghoard's objects are never deleted), and
//! - it was last written more than [`ORPHAN_MIN_AGE`] ago: a backup still running (in another
//!   process on the same archive) references the objects it stores only once it is listed.

use std::collections::BTreeSet;
use std::io::Read;

use anyhow::{Context, Result};
use walhoard_basebackup::control::METADATA_MEMBER;
use walhoard_basebackup::untar::TarReader;

use crate::basebackup::inventory::{Inventory, Writer, ORPHAN_MIN_AGE};
use crate::pipeline::encryption::KeyRing;
use crate::pipeline::transfer::download_with;
use crate::restore::pghoard_delta::{self, OBJECT_PREFIX};
use crate::storage::ObjectStore;

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// walhoard's unreferenced objects deleted.
    pub deleted: Vec<String>,
    /// Unreferenced objects kept because walhoard did not write them.
    pub foreign: usize,
    /// Unreferenced walhoard objects kept because they are recent.
    pub recent: usize,
    /// Why nothing was deleted, when so.
    pub kept_all: Option<String>,
}

/// The metadata member of the control object `key`.
async fn control_json(store: &ObjectStore, keys: &KeyRing, key: &str) -> Result<Vec<u8>> {
    let (_, json) = download_with(store, key, keys, |_, r| {
        let mut limited = r.take(64 * 1024 * 1024);
        let mut tar = TarReader::new(&mut limited);
        while let Some(e) = tar.next_entry()? {
            if e.path == METADATA_MEMBER {
                let mut data = Vec::new();
                tar.body().read_to_end(&mut data)?;
                return Ok(Some(data));
            }
        }
        Ok(None)
    })
    .await
    .with_context(|| format!("read {key}"))?;
    json.with_context(|| format!("{key} holds no {METADATA_MEMBER}"))
}

/// The digests the control objects of `inv` that are not in `deleted` reference, or why they
/// cannot all be known.
async fn referenced(
    store: &ObjectStore,
    keys: &KeyRing,
    inv: &Inventory,
    deleted: &[String],
) -> std::result::Result<BTreeSet<String>, String> {
    let mut out = BTreeSet::new();
    for c in &inv.controls {
        if deleted.contains(&c.name) {
            continue;
        }
        if let Writer::Unrecognised(why) = &c.writer {
            return Err(format!("{}: {why}", c.key));
        }
        let meta = store
            .object_meta(&c.key)
            .await
            .map_err(|e| format!("{}: metadata: {e}", c.key))?;
        if !pghoard_delta::is_delta(meta.format.as_deref()) {
            continue;
        }
        let json = control_json(store, keys, &c.key)
            .await
            .map_err(|e| format!("{e:#}"))?;
        let files = pghoard_delta::delta_files(&c.key, &json).map_err(|e| format!("{e:#}"))?;
        out.extend(files.objects.into_iter().map(|o| o.hexdigest));
    }
    Ok(out)
}

/// Deletes walhoard's delta objects no backup that stays references (see the module's
/// rules). `inv` is the inventory retention worked from, `deleted` the backups it deleted,
/// `now` seconds since the epoch.
pub async fn apply(
    store: &ObjectStore,
    keys: &KeyRing,
    inv: &Inventory,
    deleted: &[String],
    now: f64,
) -> Result<Outcome> {
    let objects = store
        .list(OBJECT_PREFIX)
        .await
        .with_context(|| format!("list {OBJECT_PREFIX}/"))?;
    let mut out = Outcome::default();
    if objects.is_empty() {
        return Ok(out);
    }
    let refs = match referenced(store, keys, inv, deleted).await {
        Ok(r) => r,
        Err(why) => {
            out.kept_all = Some(why);
            return Ok(out);
        }
    };
    for o in objects {
        let digest = o.key.rsplit('/').next().unwrap_or_default();
        if refs.contains(digest) {
            continue;
        }
        let meta = match store.object_meta(&o.key).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(object = %o.key, error = %e, "left alone: metadata unreadable");
                out.foreign += 1;
                continue;
            }
        };
        if meta.walhoard_writer.is_none() {
            out.foreign += 1;
            continue;
        }
        let young = o
            .last_modified
            .is_none_or(|t| now - (t as f64) < ORPHAN_MIN_AGE.as_secs_f64());
        if young {
            out.recent += 1;
            continue;
        }
        store
            .delete(&o.key)
            .await
            .with_context(|| format!("delete {}", o.key))?;
        out.deleted.push(o.key);
    }
    Ok(out)
}
