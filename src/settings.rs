//! Typed settings resolved once from the configuration, shared by the daemon, basebackups
//! and `check`: nothing deeper re-reads raw configuration values.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::{Config, SiteConfig};
use crate::pipeline::compression::CompressionSettings;
use crate::pipeline::encryption::PublicKey;
use crate::pipeline::transfer::UploadEncryption;
use crate::storage::retry::RetryPolicy;
use crate::storage::ObjectStore;

/// The number of uploads running at once: `transfer.thread_count`, else pghoard's default
/// min(CPU count + 3, 20).
pub fn transfer_threads(config: &Config) -> usize {
    config.transfer.thread_count.map_or_else(
        || {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cpus + 3).min(20)
        },
        |n| n.max(1) as usize,
    )
}

/// The compression new objects get, from the `compression` section (`threads` 0: one
/// thread per stream).
pub fn compression_settings(config: &Config) -> Result<CompressionSettings> {
    let mut c = CompressionSettings::new(config.compression.algorithm);
    if let Some(level) = config.compression.level {
        c.level = level;
    }
    c.validate()
        .map_err(|e| anyhow::anyhow!("compression.level: {e}"))?;
    Ok(c)
}

/// The site's upload encryption: its `encryption_key_id`'s public key, if it has one.
pub fn upload_encryption(name: &str, site: &SiteConfig) -> Result<Option<UploadEncryption>> {
    let Some(id) = &site.encryption_key_id else {
        return Ok(None);
    };
    let pem = site
        .encryption_keys
        .get(id)
        .and_then(|k| k.public.as_deref())
        .with_context(|| format!("backup_sites.{name}.encryption_keys.{id}.public: missing"))?;
    let public = PublicKey::from_pem(pem)
        .with_context(|| format!("backup_sites.{name}.encryption_keys.{id}.public"))?;
    Ok(Some(UploadEncryption {
        key_id: id.clone(),
        public,
    }))
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// The retry policy of uploads: pghoard's warning limit, alert files in alert_file_dir.
pub fn retry_policy(config: &Config) -> RetryPolicy {
    RetryPolicy {
        warning_limit: config
            .upload_retries_warning_limit
            .unwrap_or(config.transfer.upload_retries_warning_limit),
        alert_dir: Some(config.alert_dir()),
        max_backoff: config
            .transfer
            .retry_max_backoff_seconds
            .map_or(RetryPolicy::default().max_backoff, Duration::from_secs_f64),
        ..RetryPolicy::default()
    }
}

/// Opens the object store of site `name` (its `object_storage`, under its prefix).
pub fn open_store(config: &Config, name: &str) -> Result<ObjectStore> {
    open_store_as(config, name, false)
}

/// [`open_store`] for commands that only read: creates nothing (a missing local storage
/// directory is an error, see [`ObjectStore::open_read_only`]).
pub fn open_store_read_only(config: &Config, name: &str) -> Result<ObjectStore> {
    open_store_as(config, name, true)
}

fn open_store_as(config: &Config, name: &str, read_only: bool) -> Result<ObjectStore> {
    let storage = config
        .backup_sites
        .get(name)
        .with_context(|| format!("no backup site {name:?} in the configuration"))?
        .object_storage
        .as_ref()
        .with_context(|| format!("backup_sites.{name}.object_storage: missing"))?;
    let prefix = config.site_prefix(name);
    if read_only {
        ObjectStore::open_read_only(storage, prefix)
    } else {
        ObjectStore::open(storage, prefix)
    }
    .with_context(|| format!("backup_sites.{name}.object_storage"))
}
