//! Typed settings resolved once from the configuration, shared by the daemon, basebackups,
//! restore and `check`: [`SiteSettings`] is one site as everything past the edge sees it, so
//! nothing deeper looks a site up by name in the raw configuration or re-reads its values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use walhoard_protocol::ConnectParams;

use crate::config::{Config, HashAlgorithm, ObjectStorageConfig, SiteConfig};
use crate::pipeline::compression::CompressionSettings;
use crate::pipeline::encryption::{KeyRing, PrivateKey, PublicKey};
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

/// A value resolved at build time whose failure only matters to the code that uses it (a
/// private key the daemon need not read, a public key `check` reports on): kept with its
/// message, naming the key path, so each user decides whether it is fatal.
pub type Resolved<T> = std::result::Result<T, String>;

fn resolved<T>(r: Result<T>) -> Resolved<T> {
    r.map_err(|e| format!("{e:#}"))
}

/// A node of `backup_sites.<site>.nodes`: its connection settings and replication slot.
/// (`ConnectParams`'s Debug prints no password.)
#[derive(Debug, Clone)]
pub struct Node {
    pub params: ConnectParams,
    /// pghoard's `slot` key, when the node names one.
    pub slot: Option<String>,
    /// Whether the node gives its own application_name (see
    /// [`SiteSettings::application_name`]).
    pub names_application: bool,
}

/// One site (`backup_sites.<name>`), resolved once from the configuration.
#[derive(Debug, Clone)]
pub struct SiteSettings {
    pub name: String,
    /// The site's section as deserialized: the schedule, retention and receiver settings are
    /// typed values there already.
    pub config: SiteConfig,
    /// The object key prefix: the site's `prefix`, else its name.
    pub prefix: String,
    pub storage: ObjectStorageConfig,
    pub nodes: Vec<Node>,
    /// `<backup_location>/<site>/xlog_incoming`, as pghoard's; `None` without backup_location.
    spool_dir: Option<PathBuf>,
    /// What new WAL objects get (the `compression` section).
    pub compression: CompressionSettings,
    /// [`SiteSettings::compression`] with `basebackup_compression_threads` zstd threads.
    pub basebackup_compression: CompressionSettings,
    pub hash_algorithm: HashAlgorithm,
    /// The upload encryption of `encryption_key_id` (its public key), if the site has one.
    pub encryption: Resolved<Option<UploadEncryption>>,
    /// Every private key of the site, by key id (see [`key_ring`]).
    pub keys: Resolved<KeyRing>,
    pub retry: RetryPolicy,
    /// Segments restore_command prefetches: `restore_prefetch`, else `transfer_threads`.
    pub restore_prefetch: usize,
}

impl SiteSettings {
    /// Resolves site `name` of a validated configuration. Errors name the key path.
    pub fn build(config: &Config, name: &str) -> Result<SiteSettings> {
        let site = config
            .backup_sites
            .get(name)
            .with_context(|| format!("no backup site {name:?} in the configuration"))?;
        let at = |key: &str| format!("backup_sites.{name}.{key}");
        let storage = site
            .object_storage
            .clone()
            .with_context(|| format!("{}: missing", at("object_storage")))?;
        let nodes = site
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let (params, slot) = node
                    .connect_params()
                    .map_err(|e| anyhow::anyhow!("{}: {e}", at(&format!("nodes[{i}]"))))?;
                Ok(Node {
                    params,
                    slot,
                    names_application: node.names_application(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let compression = compression_settings(config)?;
        let mut basebackup_compression = compression;
        basebackup_compression.threads = site.basebackup_compression_threads;
        Ok(SiteSettings {
            name: name.to_string(),
            prefix: site.prefix.clone().unwrap_or_else(|| name.to_string()),
            storage,
            nodes,
            spool_dir: config
                .backup_location
                .as_ref()
                .map(|b| b.join(name).join("xlog_incoming")),
            compression,
            basebackup_compression,
            hash_algorithm: config.hash_algorithm,
            encryption: resolved(upload_encryption(name, site)),
            keys: resolved(key_ring(name, site)),
            retry: retry_policy(config),
            restore_prefetch: config
                .restore_prefetch
                .map_or_else(|| transfer_threads(config), |n| n as usize),
            config: site.clone(),
        })
    }

    /// The application_name of the site's replication connection (what pg_stat_replication
    /// shows and `synchronous_standby_names` must list for `synchronous_archive`): the first
    /// node's own, when it gives one (as pghoard's nodes may), else `walhoard_<site>`.
    pub fn application_name(&self) -> String {
        match self.nodes.first() {
            Some(n) if n.names_application => n.params.application_name.clone(),
            _ => format!("walhoard_{}", self.name),
        }
    }

    /// Every site of the configuration, by name.
    pub fn all(config: &Config) -> Result<BTreeMap<String, SiteSettings>> {
        config
            .backup_sites
            .keys()
            .map(|name| Ok((name.clone(), SiteSettings::build(config, name)?)))
            .collect()
    }

    /// The spool directory: `<backup_location>/<site>/xlog_incoming`, as pghoard's.
    pub fn spool_dir(&self) -> Result<PathBuf> {
        self.spool_dir
            .clone()
            .context("backup_location: the daemon needs it for its spool; set it")
    }

    /// The first node, which the receiver streams from and backups are taken from.
    pub fn first_node(&self) -> Result<&Node> {
        self.nodes
            .first()
            .with_context(|| format!("backup_sites.{}.nodes is empty", self.name))
    }

    /// The upload encryption, or the error that made it unusable.
    pub fn encryption(&self) -> Result<Option<UploadEncryption>> {
        self.encryption.clone().map_err(anyhow::Error::msg)
    }

    /// The private keys, or the error that made one unusable.
    pub fn keys(&self) -> Result<KeyRing> {
        self.keys.clone().map_err(anyhow::Error::msg)
    }

    /// Opens the site's object store (its `object_storage`, under its prefix).
    pub fn open_store(&self) -> Result<ObjectStore> {
        ObjectStore::open(&self.storage, &self.prefix)
            .with_context(|| format!("backup_sites.{}.object_storage", self.name))
    }

    /// [`SiteSettings::open_store`] for commands that only read: creates nothing (a missing
    /// local storage directory is an error, see [`ObjectStore::open_read_only`]).
    pub fn open_store_read_only(&self) -> Result<ObjectStore> {
        ObjectStore::open_read_only(&self.storage, &self.prefix)
            .with_context(|| format!("backup_sites.{}.object_storage", self.name))
    }
}

/// The site's upload encryption: its `encryption_key_id`'s public key, if it has one.
fn upload_encryption(name: &str, site: &SiteConfig) -> Result<Option<UploadEncryption>> {
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

/// Every private key of a site, by key id: objects name the key they were written with, which
/// need not be today's `encryption_key_id`. A site with encryption configured (a key id or
/// keys) refuses objects stored without encryption unless `allow_unencrypted_objects` is set.
pub fn key_ring(name: &str, site: &SiteConfig) -> Result<KeyRing> {
    let encrypts = site.encryption_key_id.is_some() || !site.encryption_keys.is_empty();
    let mut ring =
        KeyRing::default().require_encrypted(encrypts && !site.allow_unencrypted_objects);
    for (id, pair) in &site.encryption_keys {
        if let Some(pem) = &pair.private {
            let key = PrivateKey::from_pem(pem)
                .with_context(|| format!("backup_sites.{name}.encryption_keys.{id}.private"))?;
            ring.insert(id, key);
        }
    }
    Ok(ring)
}

/// The site a command names with `--site`, else the configuration's only site.
pub fn chosen_site(config: &Config, site: Option<&str>, file: &Path) -> Result<String> {
    let name = match site {
        Some(s) => s.to_string(),
        None => match config.backup_sites.keys().collect::<Vec<_>>().as_slice() {
            [only] => (*only).clone(),
            [] => bail!("{}: no backup_sites", file.display()),
            many => bail!(
                "{} has several backup sites ({}): choose one with --site",
                file.display(),
                many.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    };
    if !config.backup_sites.contains_key(&name) {
        bail!("no backup site {name:?} in {}", file.display());
    }
    Ok(name)
}

/// Opens the object store of site `name`: for callers at the edge that hold a raw
/// configuration (tests, one-off tools).
pub fn open_store(config: &Config, name: &str) -> Result<ObjectStore> {
    SiteSettings::build(config, name)?.open_store()
}

/// [`open_store`], read only.
pub fn open_store_read_only(config: &Config, name: &str) -> Result<ObjectStore> {
    SiteSettings::build(config, name)?.open_store_read_only()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(site: &str) -> Config {
        let text = format!(
            r#"{{"backup_location": "/var/lib/walhoard", "restore_prefetch": 3,
                "compression": {{"algorithm": "zstd", "level": 5}},
                "backup_sites": {{"main": {{{site}
                    "nodes": ["host=/tmp port=5433 slot=s1"],
                    "object_storage": {{"storage_type": "local", "directory": "/srv/b"}}}}}}}}"#
        );
        Config::parse(&text, "t.json").unwrap()
    }

    #[test]
    fn a_site_is_resolved_once_with_its_defaults() {
        let s = SiteSettings::build(&config(r#""basebackup_compression_threads": 2,"#), "main")
            .unwrap();
        assert_eq!(s.prefix, "main");
        assert_eq!(
            s.spool_dir().unwrap(),
            PathBuf::from("/var/lib/walhoard/main/xlog_incoming")
        );
        assert_eq!(s.nodes.len(), 1);
        assert_eq!(s.nodes[0].slot.as_deref(), Some("s1"));
        assert_eq!(s.compression.level, 5);
        assert_eq!(s.compression.threads, 0);
        assert_eq!(s.basebackup_compression.threads, 2);
        assert_eq!(s.restore_prefetch, 3);
        assert!(s.encryption().unwrap().is_none());
        assert!(!s.keys().unwrap().requires_encrypted());
        let s = SiteSettings::build(&config(r#""prefix": "p/q","#), "main").unwrap();
        assert_eq!(s.prefix, "p/q");
        let e = SiteSettings::build(&config(""), "other").unwrap_err();
        assert!(format!("{e:#}").contains("\"other\""), "{e:#}");
    }

    /// Replication connections are named after the site unless the node names itself
    /// (pghoard's nodes may carry application_name).
    #[test]
    fn application_name_is_the_nodes_else_walhoard_site() {
        let s = SiteSettings::build(&config(""), "main").unwrap();
        assert_eq!(s.application_name(), "walhoard_main");
        let text = r#"{"backup_location": "/b", "backup_sites": {"main": {
            "nodes": [{"host": "/tmp", "application_name": "archive1"}],
            "object_storage": {"storage_type": "local", "directory": "/srv/b"}}}}"#;
        let s = SiteSettings::build(&Config::parse(text, "t.json").unwrap(), "main").unwrap();
        assert_eq!(s.application_name(), "archive1");
        let text = text.replace(
            r#"{"host": "/tmp", "application_name": "archive1"}"#,
            r#""host=/tmp application_name=a2""#,
        );
        let s = SiteSettings::build(&Config::parse(&text, "t.json").unwrap(), "main").unwrap();
        assert_eq!(s.application_name(), "a2");
    }

    #[test]
    fn the_only_site_is_chosen_unless_one_is_named() {
        let one = config("");
        let file = Path::new("f.json");
        assert_eq!(chosen_site(&one, None, file).unwrap(), "main");
        assert_eq!(chosen_site(&one, Some("main"), file).unwrap(), "main");
        let e = chosen_site(&one, Some("other"), file).unwrap_err();
        assert_eq!(e.to_string(), "no backup site \"other\" in f.json");
        let mut two = one.clone();
        two.backup_sites
            .insert("b".into(), two.backup_sites["main"].clone());
        let e = chosen_site(&two, None, file).unwrap_err();
        assert!(
            e.to_string().contains("several backup sites (b, main)"),
            "{e}"
        );
        assert_eq!(chosen_site(&two, Some("b"), file).unwrap(), "b");
    }

    #[test]
    fn unusable_keys_are_errors_naming_the_key_path_for_whoever_needs_them() {
        let s = SiteSettings::build(
            &config(
                r#""encryption_key_id": "k1",
                   "encryption_keys": {"k1": {"public": "not a pem", "private": "nor this"}},"#,
            ),
            "main",
        )
        .unwrap();
        let e = format!("{:#}", s.encryption().unwrap_err());
        assert!(
            e.contains("backup_sites.main.encryption_keys.k1.public"),
            "{e}"
        );
        let e = format!("{:#}", s.keys().unwrap_err());
        assert!(
            e.contains("backup_sites.main.encryption_keys.k1.private"),
            "{e}"
        );
        assert!(!format!("{s:?}").contains("nor this"));
    }
}
