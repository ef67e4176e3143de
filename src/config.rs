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
fn default_hash_algorithm() -> String {
    "sha1".into()
}
fn default_http_address() -> String {
    "127.0.0.1".into()
}
fn default_http_port() -> u16 {
    16000
}
fn default_log_level() -> String {
    "INFO".into()
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
    #[serde(default = "default_hash_algorithm")]
    pub hash_algorithm: String,
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
    #[serde(default = "default_log_level")]
    pub log_level: String,
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
    /// Older top-level spelling of transfer.upload_retries_warning_limit.
    pub upload_retries_warning_limit: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    #[serde(default = "CompressionConfig::default_algorithm")]
    pub algorithm: String,
    /// Algorithm-specific; the codec's default when absent.
    pub level: Option<i32>,
    /// Parallel compression workers (default: CPU count + 1).
    pub thread_count: Option<u32>,
}

impl CompressionConfig {
    fn default_algorithm() -> String {
        "snappy".into()
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
        azure_cloud: Option<String>,
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
        let de = &mut serde_json::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            ConfigError {
                file: file.to_string(),
                path,
                message: e.into_inner().to_string(),
            }
        })?;
        config.validate().map_err(|(path, message)| ConfigError {
            file: file.to_string(),
            path,
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let hashes = crate::pipeline::hash::HashAlgorithm::ALL.map(|h| h.name());
        if !hashes.contains(&self.hash_algorithm.as_str()) {
            return Err((
                "hash_algorithm".into(),
                format!("{:?} is not one of {hashes:?}", self.hash_algorithm),
            ));
        }
        let algorithms = ["snappy", "zstd", "lzma"];
        if !algorithms.contains(&self.compression.algorithm.as_str()) {
            return Err((
                "compression.algorithm".into(),
                format!(
                    "{:?} is not one of {algorithms:?}",
                    self.compression.algorithm
                ),
            ));
        }
        if let Some(b) = self.transfer.retry_max_backoff_seconds {
            if !(0.1..=3600.0).contains(&b) {
                return Err((
                    "transfer.retry_max_backoff_seconds".into(),
                    format!("{b} is not between 0.1 and 3600"),
                ));
            }
        }
        if self.backup_sites.is_empty() {
            return Err(("backup_sites".into(), "no backup site is configured".into()));
        }
        for (name, site) in &self.backup_sites {
            let at = |key: &str| format!("backup_sites.{name}.{key}");
            if name.is_empty() || name.contains('/') {
                return Err((
                    format!("backup_sites.{name}"),
                    "a site name must be non-empty and contain no '/'".into(),
                ));
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

    #[test]
    fn pghoard_defaults() {
        let c = Config::parse(MINIMAL, "t.json").unwrap();
        assert_eq!(
            c.http_address, "127.0.0.1",
            "the HTTP API binds loopback by default"
        );
        assert_eq!(c.http_port, 16000);
        assert_eq!(c.hash_algorithm, "sha1");
        assert_eq!(c.compression.algorithm, "snappy");
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
            ("{".to_string(), "t.json"),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "error {e:?} should contain {want:?}");
            assert!(e.starts_with("t.json: "), "{e}");
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
}
