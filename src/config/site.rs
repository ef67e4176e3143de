//! `backup_sites.<name>`: one PostgreSQL cluster to back up, its nodes and keys.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use walhoard_protocol::ConnectParams;

use super::{default_true, ObjectStorageConfig};

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
    /// walhoard: PostgreSQL 17+ block-level incremental backups (`BASE_BACKUP ( INCREMENTAL )`
    /// against the previous backup's manifest), stored in the basic mode's format.
    #[serde(rename = "incremental")]
    Incremental,
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
fn default_incremental_max_chain() -> u32 {
    6
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
    /// walhoard (basebackup_mode `incremental`): how many incremental backups may follow a
    /// full one before the next is full again; 0 makes every backup full. Default 6.
    #[serde(default = "default_incremental_max_chain")]
    pub basebackup_incremental_max_chain: u32,
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
    /// walhoard: report to the server as flushed only WAL the object store holds (partial
    /// objects uploaded as soon as WAL arrives), so that a primary listing the site's
    /// application_name in `synchronous_standby_names` acknowledges a commit only once it is
    /// archived (RPO 0). Default false.
    #[serde(default)]
    pub synchronous_archive: bool,
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
        ConnectParams::from_node_object(self.pairs()?, &walhoard_protocol::params::ProcessEnv)
            .map_err(|e| e.to_string())
    }

    /// Whether the node names its application_name (or a fallback_application_name), which
    /// replication connections then use instead of `walhoard_<site>`.
    pub fn names_application(&self) -> bool {
        self.pairs().is_ok_and(|pairs| {
            pairs
                .iter()
                .any(|(k, _)| k == "application_name" || k == "fallback_application_name")
        })
    }

    /// The node's libpq keys and values (and `slot`).
    fn pairs(&self) -> Result<Vec<(String, String)>, String> {
        match self {
            // Connection strings may carry `slot` too (not a libpq key): taken out later.
            NodeConfig::Conninfo(s) => {
                if s.starts_with("postgres://") || s.starts_with("postgresql://") {
                    walhoard_protocol::params::parse_uri(s)
                } else {
                    walhoard_protocol::params::parse_conninfo(s)
                }
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
                Ok(pairs)
            }
        }
    }
}
