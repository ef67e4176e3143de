//! The configuration file: pghoard.json compatible.
//!
//! pghoard's keys keep their meaning and defaults; walhoard adds keys, never re-purposes them.
//! Every object rejects unknown keys, and every error names the key path
//! (`backup_sites.main.nodes[0].prot`), so a typo fails at startup instead of being ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use walhoard_protocol::ConnectParams;

pub use crate::pipeline::compression::Algorithm;
use crate::pipeline::compression::CompressionSettings;
pub use crate::pipeline::hash::HashAlgorithm;

/// A configuration error, naming the key path and the file.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {path}: {message}")]
pub struct ConfigError {
    pub file: String,
    /// Dotted key path; `.` for the whole document.
    pub path: String,
    pub message: String,
}

fn default_true() -> bool {
    true
}
fn default_json_state_file_path() -> PathBuf {
    PathBuf::from("/var/lib/pghoard/pghoard_state.json")
}
fn default_maintenance_mode_file() -> PathBuf {
    PathBuf::from("/var/lib/pghoard/maintenance_mode_file")
}
fn default_http_address() -> String {
    "127.0.0.1".into()
}
fn default_http_port() -> u16 {
    16000
}
fn default_syslog_address() -> String {
    "/dev/log".into()
}
fn default_syslog_facility() -> String {
    "local2".into()
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_true")]
    pub active: bool,
    /// Local state: spool, temporary files.
    pub backup_location: Option<PathBuf>,
    #[serde(default)]
    pub backup_sites: BTreeMap<String, SiteConfig>,
    #[serde(default)]
    pub compression: CompressionConfig,
    /// The digest recorded with every object (pghoard's names; sha1 by default).
    #[serde(default)]
    pub hash_algorithm: HashAlgorithm,
    #[serde(default = "default_json_state_file_path")]
    pub json_state_file_path: PathBuf,
    #[serde(default = "default_maintenance_mode_file")]
    pub maintenance_mode_file: PathBuf,
    #[serde(default)]
    pub transfer: TransferConfig,
    /// Accepted for compatibility; walhoard extracts tars itself.
    pub tar_executable: Option<String>,
    /// Segments prefetched during archive recovery (default: transfer.thread_count).
    pub restore_prefetch: Option<u32>,
    /// Parallel downloads during get-basebackup.
    pub restore_process_count: Option<u32>,
    #[serde(default)]
    pub log_level: LogLevel,
    #[serde(default)]
    pub syslog: bool,
    #[serde(default = "default_syslog_address")]
    pub syslog_address: String,
    #[serde(default = "default_syslog_facility")]
    pub syslog_facility: String,
    /// Alert files go here (default: backup_location, else the working directory).
    pub alert_file_dir: Option<PathBuf>,
    pub statsd: Option<StatsdConfig>,
    pub push_gateway: Option<PushGatewayConfig>,
    pub prometheus: Option<serde_json::Value>,
    #[serde(default = "default_http_address")]
    pub http_address: String,
    #[serde(default = "default_http_port")]
    pub http_port: u16,
    /// walhoard: restore requests the HTTP API runs at once; more wait for a slot
    /// (default [`crate::http::DEFAULT_RESTORE_CONCURRENCY`]).
    pub http_restore_concurrency: Option<u32>,
    /// Older top-level spelling of transfer.upload_retries_warning_limit.
    pub upload_retries_warning_limit: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    #[serde(default = "CompressionConfig::default_algorithm")]
    pub algorithm: Algorithm,
    /// Algorithm-specific; the codec's default when absent.
    pub level: Option<i32>,
    /// Parallel compression workers (default: CPU count + 1).
    pub thread_count: Option<u32>,
}

impl CompressionConfig {
    fn default_algorithm() -> Algorithm {
        Algorithm::Snappy
    }
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            algorithm: Self::default_algorithm(),
            level: None,
            thread_count: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferConfig {
    /// Parallel uploads/downloads (default: min(CPU count + 3, 20)).
    pub thread_count: Option<u32>,
    #[serde(default = "TransferConfig::default_warning_limit")]
    pub upload_retries_warning_limit: u32,
    /// walhoard: the longest wait between two attempts at a failing upload (default 60).
    pub retry_max_backoff_seconds: Option<f64>,
}

impl TransferConfig {
    fn default_warning_limit() -> u32 {
        3
    }
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            thread_count: None,
            upload_retries_warning_limit: Self::default_warning_limit(),
            retry_max_backoff_seconds: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsdConfig {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub format: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushGatewayConfig {
    pub endpoint: String,
    #[serde(default)]
    pub tags: BTreeMap<String, serde_json::Value>,
}

/// How WAL reaches the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum BackupMode {
    /// The native receiver; `pg_receivexlog` is accepted as an alias (nothing is spawned).
    #[serde(
        rename = "walreceiver",
        alias = "pg_receivexlog",
        alias = "pg_receivewal"
    )]
    Walreceiver,
    #[serde(rename = "archive_command")]
    ArchiveCommand,
    #[serde(rename = "standalone_hot_backup")]
    StandaloneHotBackup,
}

/// How basebackups are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum BasebackupMode {
    #[serde(rename = "basic")]
    Basic,
    #[serde(rename = "pipe")]
    Pipe,
    #[serde(rename = "local-tar")]
    LocalTar,
    #[serde(rename = "delta")]
    Delta,
    #[serde(rename = "local-tar-delta-stats")]
    LocalTarDeltaStats,
}

fn default_backup_mode() -> BackupMode {
    BackupMode::Walreceiver
}
fn default_basebackup_mode() -> BasebackupMode {
    BasebackupMode::Basic
}
fn default_chunk_size() -> u64 {
    2 * 1024 * 1024 * 1024
}
fn default_chunks_in_progress() -> u32 {
    5
}
fn default_two() -> u32 {
    2
}
fn default_one() -> u32 {
    1
}
fn default_interval_hours() -> Option<f64> {
    Some(24.0)
}

/// One PostgreSQL cluster to back up (`backup_sites.<name>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    #[serde(default = "default_true")]
    pub active: bool,
    #[serde(default = "default_backup_mode")]
    pub active_backup_mode: BackupMode,
    pub basebackup_age_days_max: Option<f64>,
    #[serde(default = "default_chunk_size")]
    pub basebackup_chunk_size: u64,
    #[serde(default = "default_chunks_in_progress")]
    pub basebackup_chunks_in_progress: u32,
    #[serde(default)]
    pub basebackup_compression_threads: u32,
    #[serde(default = "default_two")]
    pub basebackup_count: u32,
    #[serde(default = "default_two")]
    pub basebackup_count_min: u32,
    pub basebackup_hour: Option<u32>,
    /// `null` turns scheduled basebackups off; absent means 24.
    #[serde(default = "default_interval_hours")]
    pub basebackup_interval_hours: Option<f64>,
    pub basebackup_minute: Option<u32>,
    #[serde(default = "default_basebackup_mode")]
    pub basebackup_mode: BasebackupMode,
    #[serde(default = "default_one")]
    pub basebackup_threads: u32,
    /// walhoard: let PostgreSQL 15+ compress BASE_BACKUP archives (zstd) in basic/pipe mode.
    /// Default (null): when the site compresses with zstd and the node is reached over TCP at
    /// a non-loopback address, where it saves bytes on the wire; on the same host it would
    /// only move the compression work onto the primary.
    pub basebackup_server_compression: Option<bool>,
    pub encryption_key_id: Option<String>,
    #[serde(default)]
    pub encryption_keys: BTreeMap<String, KeyPairConfig>,
    /// walhoard: with encryption configured, restore objects stored without encryption too
    /// (written before encryption was turned on). Off by default: such an object is refused,
    /// since anyone who can write the bucket can forge one.
    #[serde(default)]
    pub allow_unencrypted_objects: bool,
    /// pghoard: older sites of this cluster (names of other `backup_sites` entries, searched
    /// in this order after this one) whose basebackups list and restore, and whose WAL
    /// restore_command serves, as pghoard's restore does (`find_recovery_sites`). Only read:
    /// nothing is written to or deleted from them.
    #[serde(default)]
    pub moved_from: Vec<String>,
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
    pub object_storage: Option<ObjectStorageConfig>,
    pub pg_bin_directory: Option<PathBuf>,
    pub pg_data_directory: Option<PathBuf>,
    pub pg_data_directory_version: Option<String>,
    /// Accepted for compatibility; nothing is spawned.
    pub pg_receivexlog_path: Option<PathBuf>,
    /// Accepted for compatibility; nothing is spawned.
    pub pg_basebackup_path: Option<PathBuf>,
    /// Object key prefix (default: the site name).
    pub prefix: Option<String>,
    #[serde(default)]
    pub pg_receivexlog: ReceiveXlogConfig,
    #[serde(default)]
    pub stream_compression: bool,
    /// walhoard: when WAL the archive lacks turns out to be gone from the primary (a gap),
    /// take a new basebackup at once, so that point-in-time recovery is possible again from
    /// there. Default true.
    #[serde(default = "default_true")]
    pub basebackup_on_wal_gap: bool,
    /// walhoard: how often WAL of the segment being received is uploaded before the segment
    /// is complete (seconds; 0 turns it off). Default 5.
    #[serde(default)]
    pub partial_wal_upload_interval: PartialWalUploadInterval,
}

/// `backup_sites.<site>.partial_wal_upload_interval`: seconds, a non-negative number; 0 off.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "f64")]
pub struct PartialWalUploadInterval(Option<std::time::Duration>);

impl PartialWalUploadInterval {
    /// The interval, `None` when partial uploads are off.
    pub fn get(self) -> Option<std::time::Duration> {
        self.0
    }
}

impl Default for PartialWalUploadInterval {
    fn default() -> Self {
        PartialWalUploadInterval(Some(std::time::Duration::from_secs(5)))
    }
}

impl TryFrom<f64> for PartialWalUploadInterval {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        if !v.is_finite() || v < 0.0 {
            return Err(format!(
                "{v} is not a number of seconds (0 turns partial uploads off)"
            ));
        }
        Ok(PartialWalUploadInterval(
            (v > 0.0).then(|| std::time::Duration::from_secs_f64(v.max(0.05))),
        ))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveXlogConfig {
    #[serde(default = "ReceiveXlogConfig::default_interval")]
    pub disk_space_check_interval: f64,
    /// Pause receiving below this much free space in backup_location (off when null).
    pub min_disk_free_bytes: Option<u64>,
    #[serde(default = "ReceiveXlogConfig::default_multiplier")]
    pub resume_multiplier: f64,
    /// walhoard: when the spool is fdatasync'd (`auto` or `always`; README, "Spool durability").
    #[serde(default)]
    pub spool_fsync: SpoolFsync,
}

/// `pg_receivexlog.spool_fsync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpoolFsync {
    /// Only when the server may drop WAL the slot holds (`max_slot_wal_keep_size` set).
    #[default]
    Auto,
    /// Always: every status update and every complete segment.
    Always,
}

impl ReceiveXlogConfig {
    fn default_interval() -> f64 {
        10.0
    }
    fn default_multiplier() -> f64 {
        1.5
    }
}

impl Default for ReceiveXlogConfig {
    fn default() -> Self {
        ReceiveXlogConfig {
            disk_space_check_interval: Self::default_interval(),
            min_disk_free_bytes: None,
            resume_multiplier: Self::default_multiplier(),
            spool_fsync: SpoolFsync::default(),
        }
    }
}

/// PEM keys of one encryption key id. Debug never prints them.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPairConfig {
    pub public: Option<String>,
    pub private: Option<String>,
}

impl fmt::Debug for KeyPairConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPairConfig")
            .field("public", &self.public.as_ref().map(|_| "<pem>"))
            .field("private", &self.private.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// A node: a libpq connection string / URI, or an object of libpq keys plus `slot`.
#[derive(Clone, Deserialize)]
#[serde(untagged)]
pub enum NodeConfig {
    Conninfo(String),
    Object(BTreeMap<String, serde_json::Value>),
}

impl fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeConfig::Conninfo(_) => f.write_str("NodeConfig::Conninfo(<hidden>)"),
            NodeConfig::Object(m) => f.debug_set().entries(m.keys()).finish(),
        }
    }
}

impl NodeConfig {
    /// Connection settings and the replication slot name, if any.
    pub fn connect_params(&self) -> Result<(ConnectParams, Option<String>), String> {
        match self {
            NodeConfig::Conninfo(s) => {
                // Connection strings may carry `slot` too (not a libpq key): take it out.
                let pairs = if s.starts_with("postgres://") || s.starts_with("postgresql://") {
                    walhoard_protocol::params::parse_uri(s)
                } else {
                    walhoard_protocol::params::parse_conninfo(s)
                }
                .map_err(|e| e.to_string())?;
                ConnectParams::from_node_object(pairs, &walhoard_protocol::params::ProcessEnv)
                    .map_err(|e| e.to_string())
            }
            NodeConfig::Object(map) => {
                let mut pairs = Vec::with_capacity(map.len());
                for (k, v) in map {
                    let v = match v {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Number(n) => n.to_string(),
                        serde_json::Value::Bool(b) => b.to_string(),
                        serde_json::Value::Null => continue,
                        _ => return Err(format!("{k}: expected a string, number or boolean")),
                    };
                    pairs.push((k.clone(), v));
                }
                ConnectParams::from_node_object(pairs, &walhoard_protocol::params::ProcessEnv)
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// pghoard's `log_level`: Python's logging level names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum LogLevel {
    Debug,
    #[default]
    Info,
    #[serde(alias = "WARN")]
    Warning,
    Error,
    #[serde(alias = "FATAL")]
    Critical,
}

impl LogLevel {
    /// The `tracing` filter that shows what this level shows.
    pub fn filter(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warning => "warn",
            LogLevel::Error | LogLevel::Critical => "error",
        }
    }
}

/// The Azure cloud of an `azure` object storage (rohmu's `azure_cloud`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AzureCloud {
    #[default]
    Public,
    China,
    Germany,
    Usgov,
}

impl AzureCloud {
    /// The endpoint suffix after `<account>.blob.`.
    pub fn endpoint_suffix(self) -> &'static str {
        match self {
            AzureCloud::Public => "core.windows.net",
            AzureCloud::China => "core.chinacloudapi.cn",
            AzureCloud::Germany => "core.cloudapi.de",
            AzureCloud::Usgov => "core.usgovcloudapi.net",
        }
    }
}

/// Where a site's archive lives (`object_storage`, tagged by `storage_type`).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "storage_type", deny_unknown_fields)]
pub enum ObjectStorageConfig {
    #[serde(rename = "local")]
    Local {
        directory: PathBuf,
        prefix: Option<String>,
    },
    #[serde(rename = "s3")]
    S3 {
        region: Option<String>,
        bucket_name: String,
        aws_access_key_id: Option<String>,
        aws_secret_access_key: Option<String>,
        aws_session_token: Option<String>,
        host: Option<String>,
        port: Option<u16>,
        is_secure: Option<bool>,
        is_verify_tls: Option<bool>,
        encrypted: Option<bool>,
        prefix: Option<String>,
        segment_size: Option<u64>,
        proxy_info: Option<serde_json::Value>,
        storage_class: Option<String>,
        addressing_style: Option<String>,
    },
    #[serde(rename = "google")]
    Google {
        project_id: String,
        bucket_name: String,
        credential_file: Option<PathBuf>,
        credentials: Option<serde_json::Value>,
        prefix: Option<String>,
        proxy_info: Option<serde_json::Value>,
        /// walhoard extension (not pghoard's): a GCS-compatible server such as an emulator,
        /// like s3's `host`/`port`/`is_secure`. Without credentials its requests are unsigned.
        host: Option<String>,
        port: Option<u16>,
        is_secure: Option<bool>,
    },
    #[serde(rename = "azure")]
    Azure {
        account_name: String,
        account_key: Option<String>,
        sas_token: Option<String>,
        bucket_name: String,
        azure_cloud: Option<AzureCloud>,
        host: Option<String>,
        port: Option<u16>,
        is_secure: Option<bool>,
        prefix: Option<String>,
        proxy_info: Option<serde_json::Value>,
    },
    #[serde(rename = "swift")]
    Swift {
        user: String,
        key: String,
        auth_url: String,
        container_name: String,
        auth_version: Option<String>,
        segment_size: Option<u64>,
        tenant_name: Option<String>,
        region_name: Option<String>,
        user_id: Option<String>,
        user_domain_id: Option<String>,
        user_domain_name: Option<String>,
        tenant_id: Option<String>,
        project_id: Option<String>,
        project_name: Option<String>,
        project_domain_id: Option<String>,
        project_domain_name: Option<String>,
        service_type: Option<String>,
        endpoint_type: Option<String>,
        prefix: Option<String>,
    },
    #[serde(rename = "sftp")]
    Sftp {
        server: String,
        port: Option<u16>,
        username: String,
        password: Option<String>,
        private_key: Option<String>,
        prefix: Option<String>,
    },
}

/// Why `name` cannot be one component of a path (a directory under backup_location, a key
/// prefix): empty, `.`, `..`, or holding a `/` or NUL.
fn safe_component(name: &str) -> Result<(), &'static str> {
    match name {
        "" => Err("it is empty"),
        "." | ".." => Err("it names a directory relative to its parent"),
        _ if name.contains('/') => Err("it contains '/'"),
        _ if name.contains('\0') => Err("it contains a NUL character"),
        _ => Ok(()),
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            path: ".".into(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, &file)
    }

    /// Parses and validates configuration text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            ConfigError {
                file: file.to_string(),
                path,
                message: e.into_inner().to_string(),
            }
        })?;
        // `deserialize` stops after the first complete value: a second object, a stray brace
        // or a half-merged file after it would otherwise be ignored silently.
        de.end().map_err(|e| ConfigError {
            file: file.to_string(),
            path: ".".into(),
            message: format!(
                "trailing data after the JSON document at line {} column {}",
                e.line(),
                e.column()
            ),
        })?;
        config.validate().map_err(|(path, message)| ConfigError {
            file: file.to_string(),
            path,
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        // The codec's range, checked here so that `check` and the daemon refuse the same
        // files (snappy has no levels; a level given for it is ignored, as pghoard does).
        if let Some(level) = self.compression.level {
            let mut c = CompressionSettings::new(self.compression.algorithm);
            c.level = level;
            c.validate()
                .map_err(|e| ("compression.level".to_string(), e))?;
        }
        if let Some(b) = self.transfer.retry_max_backoff_seconds {
            if !(0.1..=3600.0).contains(&b) {
                return Err((
                    "transfer.retry_max_backoff_seconds".into(),
                    format!("{b} is not between 0.1 and 3600"),
                ));
            }
        }
        if self.http_restore_concurrency == Some(0) {
            return Err((
                "http_restore_concurrency".into(),
                "must be at least 1 (restore requests would wait forever)".into(),
            ));
        }
        if self.backup_sites.is_empty() {
            return Err(("backup_sites".into(), "no backup site is configured".into()));
        }
        for (name, site) in &self.backup_sites {
            let at = |key: &str| format!("backup_sites.{name}.{key}");
            // The name is a directory under backup_location and, by default, the object
            // key prefix: it must be one ordinary path component.
            if let Err(why) = safe_component(name) {
                return Err((
                    format!("backup_sites.{}", name.escape_debug()),
                    format!("{name:?} cannot be a site name: {why}"),
                ));
            }
            let storage_prefix = match &site.object_storage {
                Some(ObjectStorageConfig::Local { prefix, .. })
                | Some(ObjectStorageConfig::S3 { prefix, .. })
                | Some(ObjectStorageConfig::Google { prefix, .. })
                | Some(ObjectStorageConfig::Azure { prefix, .. })
                | Some(ObjectStorageConfig::Swift { prefix, .. })
                | Some(ObjectStorageConfig::Sftp { prefix, .. }) => prefix.as_deref(),
                None => None,
            };
            for (key, prefix) in [
                ("prefix", site.prefix.as_deref()),
                ("object_storage.prefix", storage_prefix),
            ] {
                let Some(prefix) = prefix else { continue };
                let parts = prefix.split('/').filter(|p| !p.is_empty());
                if let Some(why) = parts.map(safe_component).find_map(Result::err) {
                    return Err((
                        at(key),
                        format!("{prefix:?} is not a safe key prefix: {why}"),
                    ));
                }
            }
            for (i, older) in site.moved_from.iter().enumerate() {
                if older == name || !self.backup_sites.contains_key(older) {
                    return Err((
                        at(&format!("moved_from[{i}]")),
                        format!("{older:?} is not another site of backup_sites"),
                    ));
                }
            }
            if site.object_storage.is_none() {
                return Err((
                    at("object_storage"),
                    "missing: where should the archive go?".into(),
                ));
            }
            if site.active_backup_mode == BackupMode::Walreceiver
                && site.active
                && site.nodes.is_empty()
            {
                return Err((
                    at("nodes"),
                    "walreceiver mode needs at least one node to stream from".into(),
                ));
            }
            for (i, node) in site.nodes.iter().enumerate() {
                node.connect_params()
                    .map_err(|e| (at(&format!("nodes[{i}]")), e))?;
            }
            if let Some(id) = &site.encryption_key_id {
                match site.encryption_keys.get(id) {
                    None => {
                        return Err((
                            at("encryption_key_id"),
                            format!("key {id:?} is not in encryption_keys"),
                        ))
                    }
                    Some(k) if k.public.is_none() => {
                        return Err((
                            at(&format!("encryption_keys.{id}.public")),
                            "the public key is needed to store backups".into(),
                        ))
                    }
                    Some(_) => {}
                }
            }
            if let Some(h) = site.basebackup_hour {
                if h > 23 {
                    return Err((at("basebackup_hour"), format!("{h} is not an hour (0-23)")));
                }
            }
            if let Some(m) = site.basebackup_minute {
                if m > 59 {
                    return Err((
                        at("basebackup_minute"),
                        format!("{m} is not a minute (0-59)"),
                    ));
                }
            }
            if let Some(h) = site.basebackup_interval_hours {
                if h.is_nan() || h <= 0.0 {
                    return Err((
                        at("basebackup_interval_hours"),
                        format!("{h} must be positive or null"),
                    ));
                }
            }
            if site.basebackup_chunk_size < 1024 * 1024 {
                return Err((at("basebackup_chunk_size"), "must be at least 1 MiB".into()));
            }
            if site.pg_receivexlog.resume_multiplier < 1.0 {
                return Err((
                    at("pg_receivexlog.resume_multiplier"),
                    "must be at least 1".into(),
                ));
            }
            if matches!(
                site.basebackup_mode,
                BasebackupMode::Delta | BasebackupMode::LocalTarDeltaStats
            ) {
                return Err((
                    at("basebackup_mode"),
                    "delta modes are not supported yet; use basic, pipe or local-tar".into(),
                ));
            }
            if site.basebackup_mode == BasebackupMode::LocalTar && site.pg_data_directory.is_none()
            {
                return Err((
                    at("pg_data_directory"),
                    "local-tar basebackups read the data directory: set it".into(),
                ));
            }
        }
        Ok(())
    }

    /// The object key prefix of a site: its `prefix`, else its name.
    pub fn site_prefix<'a>(&'a self, name: &'a str) -> &'a str {
        self.backup_sites
            .get(name)
            .and_then(|s| s.prefix.as_deref())
            .unwrap_or(name)
    }

    /// Where alert files go.
    pub fn alert_dir(&self) -> PathBuf {
        self.alert_file_dir
            .clone()
            .or_else(|| self.backup_location.clone())
            .unwrap_or_else(|| std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{
        "backup_location": "/var/lib/walhoard",
        "backup_sites": {
            "main": {
                "nodes": [{"host": "127.0.0.1", "port": 5432, "user": "backup", "password": "secret", "slot": "walhoard"}],
                "object_storage": {"storage_type": "local", "directory": "/srv/backups"}
            }
        }
    }"#;

    #[test]
    fn spool_fsync_values() {
        let with = |v: &str| {
            Config::parse(
                &MINIMAL.replace(
                    r#""nodes":"#,
                    &format!(r#""pg_receivexlog": {{"spool_fsync": {v}}}, "nodes":"#),
                ),
                "t.json",
            )
        };
        let c = with(r#""always""#).unwrap();
        assert_eq!(
            c.backup_sites["main"].pg_receivexlog.spool_fsync,
            SpoolFsync::Always
        );
        let e = with(r#""sometimes""#).unwrap_err().to_string();
        assert!(
            e.contains("backup_sites.main.pg_receivexlog.spool_fsync"),
            "{e}"
        );
    }

    /// pghoard's `moved_from` was an unknown key (the whole file refused); it must name other
    /// sites of the file.
    #[test]
    fn moved_from_names_other_sites() {
        let two = MINIMAL.replace(
            r#""main": {"#,
            r#""old": {"active": false, "object_storage": {"storage_type": "local", "directory": "/srv/old"}},
            "main": {"moved_from": MOVED,"#,
        );
        let c = Config::parse(&two.replace("MOVED", r#"["old"]"#), "t.json").unwrap();
        assert_eq!(c.backup_sites["main"].moved_from, ["old"]);
        for bad in [r#"["gone"]"#, r#"["old", "main"]"#] {
            let e = Config::parse(&two.replace("MOVED", bad), "t.json")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("backup_sites.main.moved_from[") && e.contains("not another site"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn pghoard_defaults() {
        let c = Config::parse(MINIMAL, "t.json").unwrap();
        assert_eq!(
            c.http_address, "127.0.0.1",
            "the HTTP API binds loopback by default"
        );
        assert_eq!(c.http_port, 16000);
        assert_eq!(c.hash_algorithm, HashAlgorithm::Sha1);
        assert_eq!(c.log_level, LogLevel::Info);
        assert_eq!(c.compression.algorithm, Algorithm::Snappy);
        assert_eq!(c.transfer.upload_retries_warning_limit, 3);
        let s = &c.backup_sites["main"];
        assert_eq!(s.active_backup_mode, BackupMode::Walreceiver);
        assert_eq!(s.basebackup_mode, BasebackupMode::Basic);
        assert_eq!(s.basebackup_count, 2);
        assert_eq!(s.basebackup_interval_hours, Some(24.0));
        assert_eq!(s.basebackup_chunk_size, 2 << 30);
        assert_eq!(s.pg_receivexlog.resume_multiplier, 1.5);
        assert_eq!(s.pg_receivexlog.spool_fsync, SpoolFsync::Auto);
        assert_eq!(c.site_prefix("main"), "main");
        let (p, slot) = s.nodes[0].connect_params().unwrap();
        assert_eq!(slot.as_deref(), Some("walhoard"));
        assert_eq!(p.port, 5432);
        assert!(
            !format!("{c:?}").contains("secret"),
            "password in Debug output"
        );
    }

    #[test]
    fn aliases_and_null_interval() {
        let text = MINIMAL.replace(
            r#""nodes""#,
            r#""active_backup_mode": "pg_receivexlog", "basebackup_interval_hours": null, "nodes""#,
        );
        let c = Config::parse(&text, "t.json").unwrap();
        let s = &c.backup_sites["main"];
        assert_eq!(s.active_backup_mode, BackupMode::Walreceiver);
        assert_eq!(s.basebackup_interval_hours, None);
        let text = MINIMAL.replace(
            r#"[{"host""#,
            r#"["host=/tmp port=5433 user=u slot=s1", {"host""#,
        );
        let c = Config::parse(&text, "t.json").unwrap();
        let (p, slot) = c.backup_sites["main"].nodes[0].connect_params().unwrap();
        assert_eq!((p.port, slot.as_deref()), (5433, Some("s1")));
    }

    fn err(text: &str) -> String {
        Config::parse(text, "t.json").unwrap_err().to_string()
    }

    /// pghoard's spellings become enums once, here; nothing deeper parses them again.
    #[test]
    fn pghoard_spellings_are_typed_once() {
        let text = MINIMAL.replace(
            r#""backup_location""#,
            r#""log_level": "WARNING", "hash_algorithm": "sha256",
               "compression": {"algorithm": "zstd", "level": 5}, "backup_location""#,
        );
        let c = Config::parse(&text, "t.json").unwrap();
        assert_eq!(c.log_level, LogLevel::Warning);
        assert_eq!(c.log_level.filter(), "warn");
        assert_eq!(c.hash_algorithm, HashAlgorithm::Sha256);
        assert_eq!(c.compression.algorithm, Algorithm::Zstd);
        let azure = |cloud: &str| {
            MINIMAL.replace(
                r#"{"storage_type": "local", "directory": "/srv/backups"}"#,
                &format!(
                    r#"{{"storage_type": "azure", "account_name": "a", "bucket_name": "b", "azure_cloud": "{cloud}"}}"#
                ),
            )
        };
        let c = Config::parse(&azure("china"), "t.json").unwrap();
        match &c.backup_sites["main"].object_storage {
            Some(ObjectStorageConfig::Azure { azure_cloud, .. }) => {
                assert_eq!(*azure_cloud, Some(AzureCloud::China));
                assert_eq!(AzureCloud::China.endpoint_suffix(), "core.chinacloudapi.cn");
            }
            other => panic!("{other:?}"),
        }
        let e = err(&azure("mars"));
        assert!(e.contains("object_storage") && e.contains("mars"), "{e}");
    }

    #[test]
    fn errors_name_the_key_path() {
        let cases = [
            (
                MINIMAL.replace(r#""backup_location""#, r#""backup_locaton""#),
                "unknown field `backup_locaton`",
            ),
            (
                MINIMAL.replace(r#""nodes""#, r#""basebackup_cnt": 3, "nodes""#),
                "backup_sites.main.basebackup_cnt: unknown field `basebackup_cnt`",
            ),
            (
                MINIMAL.replace(r#""port": 5432"#, r#""prot": 5432"#),
                "backup_sites.main.nodes[0]",
            ),
            (
                MINIMAL.replace(r#""directory""#, r#""dir""#),
                "backup_sites.main.object_storage",
            ),
            (
                MINIMAL.replace(r#""local""#, r#""ftp""#),
                "backup_sites.main.object_storage",
            ),
            (
                MINIMAL.replace(r#""nodes""#, r#""basebackup_count": "two", "nodes""#),
                "backup_sites.main.basebackup_count",
            ),
            (
                MINIMAL.replace(r#""nodes""#, r#""active_backup_mode": "rsync", "nodes""#),
                "backup_sites.main.active_backup_mode",
            ),
            (
                MINIMAL.replace(r#""nodes""#, r#""basebackup_hour": 24, "nodes""#),
                "backup_sites.main.basebackup_hour",
            ),
            (
                MINIMAL.replace(r#""nodes""#, r#""encryption_key_id": "k1", "nodes""#),
                "backup_sites.main.encryption_key_id",
            ),
            (
                MINIMAL.replace(r#""nodes""#, r#""basebackup_mode": "local-tar", "nodes""#),
                "backup_sites.main.pg_data_directory",
            ),
            (
                MINIMAL.replace(r#""slot": "walhoard""#, r#""slot": "Bad Slot""#),
                "backup_sites.main.nodes[0]",
            ),
            (
                MINIMAL.replace(
                    r#""backup_location""#,
                    r#""compression": {"algorithm": "gzip"}, "backup_location""#,
                ),
                "compression.algorithm",
            ),
            (
                MINIMAL.replace(
                    r#""backup_location""#,
                    r#""http_port": 99999, "backup_location""#,
                ),
                "http_port",
            ),
            (
                MINIMAL.replace(
                    r#""backup_location""#,
                    r#""hash_algorithm": "sha3", "backup_location""#,
                ),
                "hash_algorithm",
            ),
            (
                MINIMAL.replace(
                    r#""backup_location""#,
                    r#""log_level": "VERBOSE", "backup_location""#,
                ),
                "log_level",
            ),
            ("{".to_string(), "t.json"),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "error {e:?} should contain {want:?}");
            assert!(e.starts_with("t.json: "), "{e}");
        }
    }

    /// Issue 14 item 13: `{...} garbage` parsed as the first object, the rest ignored.
    #[test]
    fn config_trailing_data_after_json_is_refused() {
        for tail in ["}", "{}", "x", r#"{"backup_sites": {}}"#] {
            let e = err(&format!("{MINIMAL}\n{tail}"));
            assert!(
                e.starts_with("t.json: .: trailing data after the JSON document at line"),
                "{tail:?}: {e}"
            );
        }
        Config::parse(&format!("{MINIMAL}\n \t\n"), "t.json").expect("whitespace is fine");
    }

    /// Issue 14 item 13: a zstd level of 1000 passed `check` and failed the daemon.
    #[test]
    fn config_compression_level_out_of_range_names_the_key() {
        for (algorithm, level) in [("zstd", 1000), ("zstd", 23), ("lzma", 10), ("lzma", -1)] {
            let text = MINIMAL.replace(
                r#""backup_location""#,
                &format!(
                    r#""compression": {{"algorithm": "{algorithm}", "level": {level}}}, "backup_location""#
                ),
            );
            let e = err(&text);
            assert!(
                e.contains("compression.level: compression level")
                    && e.contains(&level.to_string())
                    && e.contains(algorithm),
                "{e}"
            );
        }
        for (algorithm, level) in [("zstd", 19), ("lzma", 9), ("snappy", 1000)] {
            let text = MINIMAL.replace(
                r#""backup_location""#,
                &format!(
                    r#""compression": {{"algorithm": "{algorithm}", "level": {level}}}, "backup_location""#
                ),
            );
            Config::parse(&text, "t.json").unwrap_or_else(|e| panic!("{algorithm} {level}: {e}"));
        }
    }

    /// Issue 14 item 13: a site named `..` was accepted (its spool and key prefix would be
    /// the parent directory).
    #[test]
    fn config_site_name_must_be_one_path_component() {
        for (name, json_name, shown) in [
            ("..", "..", "backup_sites..."),
            (".", ".", "backup_sites.."),
            ("", "", "backup_sites.:"),
            ("a/b", "a/b", "backup_sites.a/b"),
            ("/", "/", "backup_sites./"),
            ("a\0b", "a\\u0000b", "backup_sites.a\\0b"),
        ] {
            let text = MINIMAL.replace(r#""main""#, &format!(r#""{json_name}""#));
            let e = err(&text);
            assert!(
                e.starts_with(&format!("t.json: {shown}")) && e.contains("cannot be a site name"),
                "{name:?}: {e}"
            );
        }
        for prefix in ["../other", "a/./b", "x/.."] {
            let text = MINIMAL.replace(r#""nodes""#, &format!(r#""prefix": "{prefix}", "nodes""#));
            let e = err(&text);
            assert!(e.contains("backup_sites.main.prefix"), "{e}");
            let text = MINIMAL.replace(
                r#""storage_type": "local""#,
                &format!(r#""storage_type": "local", "prefix": "{prefix}""#),
            );
            let e = err(&text);
            assert!(e.contains("backup_sites.main.object_storage.prefix"), "{e}");
        }
        for ok in ["main-2", "a.b", "...", "site_1"] {
            let text = MINIMAL.replace(r#""main""#, &format!(r#""{ok}""#));
            Config::parse(&text, "t.json").unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    /// The fuzz target `config` in miniature, deterministic: every truncation of a full
    /// configuration, and each byte replaced by characters that change JSON's structure,
    /// must give a configuration or an error, never a panic.
    #[test]
    fn config_parser_never_panics_on_mangled_files() {
        let full = MINIMAL.replace(
            r#""nodes""#,
            r#""prefix": "p/q", "basebackup_hour": 3, "encryption_key_id": "k1",
               "encryption_keys": {"k1": {"public": "-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----"}},
               "pg_receivexlog": {"spool_fsync": "always"}, "nodes""#,
        ) + "\n";
        let bytes = full.as_bytes();
        let mut inputs: Vec<Vec<u8>> = (0..bytes.len()).map(|n| bytes[..n].to_vec()).collect();
        for i in 0..bytes.len() {
            for b in [b'"', b'{', b'}', b'[', b':', b',', b'\\', b'0', 0xff, 0] {
                let mut v = bytes.to_vec();
                v[i] = b;
                inputs.push(v);
            }
        }
        for input in inputs {
            let text = String::from_utf8_lossy(&input);
            if let Ok(c) = Config::parse(&text, "t.json") {
                let _ = crate::settings::compression_settings(&c);
                for (name, site) in &c.backup_sites {
                    let _ = crate::settings::upload_encryption(name, site);
                    for node in &site.nodes {
                        let _ = node.connect_params();
                    }
                }
            }
        }
    }

    #[test]
    fn keys_are_not_printed() {
        let text = MINIMAL.replace(
            r#""nodes""#,
            r#""encryption_key_id": "k1", "encryption_keys": {"k1": {"public": "PUBPEM", "private": "PRIVPEM"}}, "nodes""#,
        );
        let c = Config::parse(&text, "t.json").unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("PRIVPEM") && !dbg.contains("PUBPEM"), "{dbg}");
    }

    #[test]
    fn partial_wal_upload_interval_values() {
        let with = |v: &str| {
            Config::parse(
                &MINIMAL.replace(
                    r#""nodes":"#,
                    &format!(r#""partial_wal_upload_interval": {v}, "nodes":"#),
                ),
                "t.json",
            )
        };
        let get = |c: Config| c.backup_sites["main"].partial_wal_upload_interval.get();
        let default = Config::parse(MINIMAL, "t.json").unwrap();
        assert_eq!(get(default), Some(std::time::Duration::from_secs(5)));
        assert_eq!(get(with("0").unwrap()), None);
        assert_eq!(
            get(with("2.5").unwrap()),
            Some(std::time::Duration::from_millis(2500))
        );
        for bad in ["-1", r#""5s""#] {
            let e = with(bad).unwrap_err().to_string();
            assert!(
                e.contains("backup_sites.main.partial_wal_upload_interval"),
                "{bad}: {e}"
            );
        }
    }
}
