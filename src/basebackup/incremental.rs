//! `incremental` mode (PostgreSQL 17+): which backup the next one is taken against.
//!
//! The parent is the site's newest backup. It can be one only when it is a walhoard stream
//! backup of the same cluster (system identifier), timeline and major version, its chain back
//! to a full backup is whole and shorter than `basebackup_incremental_max_chain`, and its
//! stored `backup_manifest` reads back with the size and SHA-1 its control object records.
//! Otherwise the backup is full, with the reason in the log. The server is then sent the
//! manifest with `UPLOAD_MANIFEST` ([`walhoard_protocol::ReplicationClient::upload_manifest`])
//! and runs `BASE_BACKUP ( INCREMENTAL )` (see stream.rs). Format: docs/formats.md.

use std::io::Read;

use anyhow::{bail, Context, Result};
use walhoard_basebackup::control::{
    BackupMetadata, BackupType, ChunkKind, FORMAT_STREAM, METADATA_MEMBER,
};
use walhoard_basebackup::untar::TarReader;
use walhoard_protocol::{ReplicationClient, SystemIdentity};

use super::BackupContext;
use crate::pipeline::encryption::KeyRing;
use crate::pipeline::transfer::download_with;
use crate::storage::ObjectStore;

/// What the next backup of an `incremental` site is.
#[derive(Debug)]
pub enum Plan {
    /// A full backup, and why.
    Full(String),
    /// Incremental against `parent`, whose `backup_manifest` is `manifest`.
    Incremental { parent: String, manifest: Vec<u8> },
}

/// The first PostgreSQL version that takes incremental backups.
pub const MIN_VERSION: u32 = 170000;

/// The error for a server too old for `incremental` mode.
pub fn check_version(site: &str, version: u32) -> Result<()> {
    if version < MIN_VERSION {
        bail!(
            "backup_sites.{site}.basebackup_mode \"incremental\" needs PostgreSQL 17 or later; \
             the server is {version} (server_version_num): use basic or pipe"
        );
    }
    Ok(())
}

/// Decides the next backup and, for an incremental one, uploads the parent's manifest on
/// `client` (which the BASE_BACKUP that follows must use). Returns the parent's name, or
/// `None` for a full backup. Anything that rules out an incremental backup is logged as a
/// warning and gives a full one; only a failing connection is an error.
pub async fn prepare(
    ctx: &BackupContext,
    client: &mut ReplicationClient,
    id: &SystemIdentity,
    version: u32,
) -> Result<Option<String>> {
    check_version(&ctx.site, version)?;
    let summarize = client
        .show("summarize_wal")
        .await
        .context("SHOW summarize_wal")?;
    if summarize != "on" {
        tracing::warn!(
            site = %ctx.site,
            "summarize_wal is {summarize} on the server: basebackup {} is full (incremental \
             backups need WAL summaries; set summarize_wal = on)",
            ctx.name
        );
        return Ok(None);
    }
    let plan = match plan(ctx, id, version).await {
        Ok(p) => p,
        Err(e) => Plan::Full(format!("{e:#}")),
    };
    let (parent, manifest) = match plan {
        Plan::Full(why) => {
            tracing::info!(site = %ctx.site, "basebackup {} is full: {why}", ctx.name);
            return Ok(None);
        }
        Plan::Incremental { parent, manifest } => (parent, manifest),
    };
    match client.upload_manifest(&manifest).await {
        Ok(()) => {
            tracing::info!(site = %ctx.site, "basebackup {} is incremental on {parent}", ctx.name);
            Ok(Some(parent))
        }
        Err(walhoard_protocol::Error::Server(e)) => {
            tracing::warn!(
                site = %ctx.site,
                "the server refused the manifest of {parent}: {e}; basebackup {} is full",
                ctx.name
            );
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("UPLOAD_MANIFEST of {parent}"))),
    }
}

/// The decision, from the store (no server involved but its identity).
pub async fn plan(ctx: &BackupContext, id: &SystemIdentity, version: u32) -> Result<Plan> {
    let max_chain = ctx.site_config.basebackup_incremental_max_chain;
    if max_chain == 0 {
        return Ok(Plan::Full(
            "basebackup_incremental_max_chain is 0".to_string(),
        ));
    }
    let keys = ctx
        .keys
        .as_ref()
        .context("the site's keys were not loaded")?;
    let listing = crate::restore::list_basebackups(&ctx.store).await?;
    let Some(newest) = listing.last() else {
        return Ok(Plan::Full("the site has no backup yet".to_string()));
    };
    if newest.format != FORMAT_STREAM {
        return Ok(Plan::Full(format!(
            "the newest backup {} has format {:?}, not {FORMAT_STREAM}",
            newest.name, newest.format
        )));
    }
    let parent = read_metadata(&ctx.store, keys, &newest.name).await?;
    if let Some(why) = unusable_parent(&parent, id, version) {
        return Ok(Plan::Full(format!(
            "the newest backup {} cannot be a parent: {why}",
            newest.name
        )));
    }
    let depth = chain_depth(&ctx.store, keys, &newest.name, &parent, max_chain).await?;
    if depth >= max_chain {
        return Ok(Plan::Full(format!(
            "the chain ending at {} has {depth} incremental backups \
             (basebackup_incremental_max_chain {max_chain})",
            newest.name
        )));
    }
    let manifest = read_manifest(&ctx.store, keys, &newest.name, &parent).await?;
    Ok(Plan::Incremental {
        parent: newest.name.clone(),
        manifest,
    })
}

/// Why `parent` cannot be the parent of a backup of the server `id` now, if it cannot.
fn unusable_parent(parent: &BackupMetadata, id: &SystemIdentity, version: u32) -> Option<String> {
    if parent.format != FORMAT_STREAM {
        return Some(format!("format {:?}", parent.format));
    }
    let system_id = id.system_id.to_string();
    if parent.system_identifier.as_deref() != Some(system_id.as_str()) {
        return Some(format!(
            "system identifier {:?}, the server's is {system_id}",
            parent.system_identifier
        ));
    }
    if parent.end_timeline != id.timeline.get() {
        return Some(format!(
            "timeline {}, the server is on {}",
            parent.end_timeline, id.timeline
        ));
    }
    if parent.pg_version / 10000 != version / 10000 {
        return Some(format!(
            "PostgreSQL {}, the server is {version}",
            parent.pg_version
        ));
    }
    None
}

/// How many incremental backups the chain ending at `newest` holds (0 for a full backup),
/// checking that every parent is there and of the same cluster. Stops counting past
/// `max_chain` (and so on a loop of parents).
async fn chain_depth(
    store: &ObjectStore,
    keys: &KeyRing,
    name: &str,
    newest: &BackupMetadata,
    max_chain: u32,
) -> Result<u32> {
    let mut depth = 0;
    let mut current = (name.to_string(), newest.clone());
    while current.1.backup_type == BackupType::Incremental {
        depth += 1;
        if depth >= max_chain {
            break;
        }
        let parent = current.1.incremental_parent.clone().with_context(|| {
            format!(
                "basebackup/{}: incremental with no incremental_parent",
                current.0
            )
        })?;
        let meta = read_metadata(store, keys, &parent)
            .await
            .with_context(|| format!("parent {parent} of {}", current.0))?;
        if meta.system_identifier != current.1.system_identifier {
            bail!("parent {parent} of {} is of another cluster", current.0);
        }
        current = (parent, meta);
    }
    Ok(depth)
}

/// The metadata of walhoard backup `name`, from its control object.
pub async fn read_metadata(
    store: &ObjectStore,
    keys: &KeyRing,
    name: &str,
) -> Result<BackupMetadata> {
    let key = format!("basebackup/{name}");
    let (_, json) = download_with(store, &key, keys, |_, r| {
        // A few kB in practice; bounded so that a corrupt object cannot exhaust memory.
        let mut limited = r.take(64 * 1024 * 1024);
        let mut tar = TarReader::new(&mut limited);
        while let Some(e) = tar.next_entry()? {
            let mut data = Vec::new();
            tar.body().read_to_end(&mut data)?;
            if e.path == METADATA_MEMBER {
                return Ok(Some(data));
            }
        }
        Ok(None)
    })
    .await
    .with_context(|| format!("read control object {key}"))?;
    let json = json.with_context(|| format!("{key} holds no {METADATA_MEMBER}"))?;
    serde_json::from_slice(&json).with_context(|| format!("{key}: {METADATA_MEMBER}"))
}

/// The stored `backup_manifest` of backup `name`, checked against the size and SHA-1 its
/// control object records.
async fn read_manifest(
    store: &ObjectStore,
    keys: &KeyRing,
    name: &str,
    meta: &BackupMetadata,
) -> Result<Vec<u8>> {
    let chunk = meta
        .chunks
        .iter()
        .find(|c| c.kind == ChunkKind::Manifest)
        .with_context(|| format!("basebackup/{name} records no backup_manifest chunk"))?;
    let key = format!("basebackup_chunk/{}", chunk.chunk_filename);
    let limit = chunk.input_size;
    let (_, data) = download_with(store, &key, keys, move |_, r| {
        let mut data = Vec::new();
        r.take(limit + 1).read_to_end(&mut data)?;
        Ok(data)
    })
    .await
    .with_context(|| format!("read {key}"))?;
    if data.len() as u64 != chunk.input_size {
        bail!(
            "{key}: {} bytes, the control object says {}",
            data.len(),
            chunk.input_size
        );
    }
    let sha1 = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        &data,
    ));
    if sha1 != chunk.hash {
        bail!(
            "{key}: SHA-1 {sha1} does not match the control object's {}",
            chunk.hash
        );
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_before_17_are_refused_by_key_path() {
        let e = check_version("main", 160004).unwrap_err().to_string();
        assert!(e.contains("backup_sites.main.basebackup_mode"), "{e}");
        assert!(e.contains("160004"), "{e}");
        check_version("main", 170000).unwrap();
    }
}
