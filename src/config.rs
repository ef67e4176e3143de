//! The configuration file: pghoard.json compatible.
//!
//! pghoard's keys keep their meaning and defaults; walhoard adds keys, never re-purposes them.
//! Every object rejects unknown keys, and every error names the key path
//! (`backup_sites.main.nodes[0].prot`), so a typo fails at startup instead of being ignored.

mod ignored;
mod logging;
mod monitoring;
mod site;
mod storage;
mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::pipeline::compression::Algorithm;
pub use crate::pipeline::hash::HashAlgorithm;
pub use ignored::{IgnoredKey, IgnoredSetting};
pub use logging::{LogLevel, SyslogAddress, SyslogFacility};
pub use monitoring::{
    PrometheusConfig, PushGatewayConfig, Secret, StatsdConfig, StatsdFormat, TagValue,
};
pub use site::{
    BackupMode, BasebackupMode, KeyPairConfig, NodeConfig, ReceiveXlogConfig, SiteConfig,
    SpoolFsync,
};
pub use storage::{AzureCloud, ObjectStorageConfig};

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

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Accepted and ignored (`ignored.rs`): pghoard reads `active` per site.
    pub active: Option<bool>,
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
    /// The daemon's log filter unless `WALHOARD_LOG` sets one (`crate::logging`).
    #[serde(default)]
    pub log_level: LogLevel,
    /// Also send the daemon's log records to syslog (`crate::logging`).
    #[serde(default)]
    pub syslog: bool,
    #[serde(default)]
    pub syslog_address: SyslogAddress,
    #[serde(default)]
    pub syslog_facility: SyslogFacility,
    /// Alert files go here (default: backup_location, else the working directory).
    pub alert_file_dir: Option<PathBuf>,
    /// pghoard's statsd client: metrics sent over UDP ([`crate::metrics`]).
    pub statsd: Option<StatsdConfig>,
    /// pghoard's Pushgateway client: metrics POSTed over HTTP. pghoard's code and README spell
    /// the key `pushgateway` (pghoard.py, `self.config.get("pushgateway")`); `push_gateway` is
    /// accepted too.
    #[serde(alias = "pushgateway")]
    pub push_gateway: Option<PushGatewayConfig>,
    /// pghoard's Prometheus client: `GET /metrics` on the HTTP API (501 without it).
    pub prometheus: Option<PrometheusConfig>,
    /// walhoard: seconds between two sends to statsd and the Pushgateway (default 10, as
    /// pghoard's `transmit_metrics`).
    pub metrics_push_interval: Option<f64>,
    #[serde(default = "default_http_address")]
    pub http_address: String,
    #[serde(default = "default_http_port")]
    pub http_port: u16,
    /// pghoard's HTTP Basic auth of the API: every route needs both when both are set.
    pub webserver_username: Option<String>,
    pub webserver_password: Option<Secret>,
    /// walhoard: let the API listen on a non-loopback `http_address` without
    /// `webserver_username`/`webserver_password` (the daemon refuses to start otherwise).
    #[serde(default)]
    pub http_allow_unauthenticated_remote: bool,
    /// walhoard: restore requests the HTTP API runs at once; more wait for a slot
    /// (default [`crate::http::DEFAULT_RESTORE_CONCURRENCY`]).
    pub http_restore_concurrency: Option<u32>,
    /// Seconds a stopping daemon lets running uploads finish (pghoard's key; walhoard's default
    /// 30, `daemon::archiver::DRAIN_TIMEOUT`); what is left stays in the spool.
    pub graceful_shutdown_upload_timeout: Option<f64>,
    /// Accepted and ignored (`ignored.rs`): compression happens inside each upload.
    pub graceful_shutdown_compression_timeout: Option<f64>,
    /// Older top-level spelling of transfer.upload_retries_warning_limit.
    pub upload_retries_warning_limit: Option<u32>,
    /// walhoard: MiB that complete WAL segments held in memory by all sites together may
    /// take (default [`DEFAULT_WAL_BUFFER_MEMORY_MIB`]); past it segments go through the
    /// spool. 0 turns the in-memory hand-off off.
    pub wal_buffer_memory_mib: Option<u32>,
}

/// The default of `wal_buffer_memory_mib`: 32 segments of 16 MiB.
pub const DEFAULT_WAL_BUFFER_MEMORY_MIB: u32 = 512;

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

    /// Bytes of the daemon-wide segment buffer budget (`wal_buffer_memory_mib`).
    pub fn wal_buffer_bytes(&self) -> usize {
        (self
            .wal_buffer_memory_mib
            .unwrap_or(DEFAULT_WAL_BUFFER_MEMORY_MIB) as usize)
            .saturating_mul(1 << 20)
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
mod tests;
