//! The description of one backup: what restore needs to pick it and fetch its chunks. It is
//! stored as `.pghoard_tar_metadata.json` inside the backup's control object (pghoard's
//! `pghoard-bb-v2` layout); see docs/formats.md.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Name of the metadata member in the control tar (pghoard's TAR_METADATA_FILENAME).
pub const METADATA_MEMBER: &str = ".pghoard_tar_metadata.json";

/// Chunks are tars of `pgdata/…` and `tablespaces/<name>/…` members (pghoard's local-tar
/// format); the control tar adds `pgdata/global/pg_control` and `pgdata/backup_label`.
pub const FORMAT_LOCAL_TAR: &str = "pghoard-bb-v2";
/// Chunks are the server's BASE_BACKUP tars unchanged, one per tablespace (`base.tar`,
/// `<oid>.tar`), plus its `backup_manifest`.
pub const FORMAT_STREAM: &str = "walhoard-bb-stream-v1";

/// A user tablespace as recorded in the metadata (keyed by name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablespaceMeta {
    pub oid: u32,
    /// Its directory on the backed-up server.
    pub path: String,
}

/// What a chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkKind {
    /// Files of the data directory and/or tablespaces (local-tar), or `base.tar`.
    Data,
    /// A tablespace's tar from BASE_BACKUP (`<oid>.tar`).
    Tablespace,
    /// The server's `backup_manifest`.
    Manifest,
}

/// One stored chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMeta {
    /// Key relative to `<site>/basebackup_chunk/`.
    pub chunk_filename: String,
    /// Plain (uncompressed, unencrypted) bytes.
    pub input_size: u64,
    /// Bytes stored.
    pub result_size: u64,
    /// Top-level members (local-tar: every member, as pghoard lists them).
    #[serde(default)]
    pub files: Vec<String>,
    pub kind: ChunkKind,
    /// The tablespace of a `Tablespace` chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tablespace_oid: Option<u32>,
    /// SHA-1 of the plain bytes, hex.
    pub hash: String,
    /// PostgreSQL compressed the archive (BASE_BACKUP `COMPRESSION`); the stored object is its
    /// stream, encrypted, labelled with the same compression as the others.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub server_compressed: bool,
}

/// Whether a backup stands alone or needs its parent (PostgreSQL 17+ block-level incremental).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupType {
    /// Every file whole; absent from metadata written before incremental backups existed.
    #[default]
    Full,
    /// `BASE_BACKUP ( INCREMENTAL )` against the parent's `backup_manifest`: relation files
    /// may be `INCREMENTAL.<relfile>` members that restore combines with the parent chain.
    Incremental,
}

impl BackupType {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupType::Full => "full",
            BackupType::Incremental => "incremental",
        }
    }
}

impl std::str::FromStr for BackupType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(BackupType::Full),
            "incremental" => Ok(BackupType::Incremental),
            _ => Err(format!("unknown backup type {s:?} (full or incremental)")),
        }
    }
}

/// The whole description. Field names up to `host` are pghoard's; the rest are walhoard's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupMetadata {
    pub backup_start_time: String,
    pub backup_start_wal_segment: String,
    pub backup_end_time: String,
    pub backup_end_wal_segment: String,
    pub pgdata: Option<String>,
    pub pghoard_object: String,
    pub pghoard_version: String,
    pub tablespaces: BTreeMap<String, TablespaceMeta>,
    pub host: String,
    pub chunks: Vec<ChunkMeta>,
    pub format: String,
    pub start_lsn: String,
    pub end_lsn: String,
    pub start_timeline: u32,
    pub end_timeline: u32,
    /// `server_version_num`, e.g. 150018.
    pub pg_version: u32,
    pub system_identifier: Option<String>,
    /// `basic`, `pipe` or `local-tar`.
    pub basebackup_mode: String,
    pub active_backup_mode: String,
    /// The WAL from start to end LSN is inside the backup (standalone_hot_backup).
    pub wal_included: bool,
    pub compression_algorithm: String,
    pub encryption_key_id: Option<String>,
    pub total_size_plain: u64,
    pub total_size_enc: u64,
    /// The `tablespace_map` PostgreSQL returned (local-tar). Not placed in `pgdata/`: restore
    /// links `pg_tblspc/<oid>` to wherever it puts each tablespace.
    #[serde(default)]
    pub tablespace_map: String,
    /// `full` unless the metadata says `incremental` (older objects have no such key).
    #[serde(default)]
    pub backup_type: BackupType,
    /// The backup an incremental one was taken against (its name under `basebackup/`);
    /// `None` for a full backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental_parent: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_type_defaults_to_full_and_round_trips() {
        let old = r#"{"backup_start_time":"t","backup_start_wal_segment":"s","backup_end_time":"t",
            "backup_end_wal_segment":"s","pgdata":null,"pghoard_object":"basebackup",
            "pghoard_version":"v","tablespaces":{},"host":"h","chunks":[],"format":"walhoard-bb-stream-v1",
            "start_lsn":"0/2000028","end_lsn":"0/2000100","start_timeline":1,"end_timeline":1,
            "pg_version":170000,"system_identifier":null,"basebackup_mode":"basic",
            "active_backup_mode":"walreceiver","wal_included":false,"compression_algorithm":"zstd",
            "encryption_key_id":null,"total_size_plain":0,"total_size_enc":0}"#;
        let mut m: BackupMetadata = serde_json::from_str(old).unwrap();
        assert_eq!(m.backup_type, BackupType::Full);
        assert_eq!(m.incremental_parent, None);
        m.backup_type = BackupType::Incremental;
        m.incremental_parent = Some("2026-12-05_03-00_0".into());
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["backup_type"], "incremental");
        assert_eq!(json["incremental_parent"], "2026-12-05_03-00_0");
        let back: BackupMetadata = serde_json::from_value(json).unwrap();
        assert_eq!(back, m);
        assert_eq!(
            "incremental".parse::<BackupType>(),
            Ok(BackupType::Incremental)
        );
        assert!("partial".parse::<BackupType>().is_err());
    }
}
