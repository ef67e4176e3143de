//! The names of object metadata keys, as pghoard (rohmu) writes them, and walhoard's own
//! additions: every key in one place, so that no module spells one differently.

/// Hex digest of the plain bytes (`hash_algorithm`).
pub const HASH: &str = "hash";
/// Which digest `hash` is (sha1 when absent, as in objects older than the setting).
pub const HASH_ALGORITHM: &str = "hash-algorithm";
/// snappy, zstd, lzma, or none.
pub const COMPRESSION_ALGORITHM: &str = "compression-algorithm";
/// The key id of an encrypted object; absent on plaintext objects.
pub const ENCRYPTION_KEY_ID: &str = "encryption-key-id";
/// walhoard's: `walhenc1` for its own encryption format.
pub const ENCRYPTION_FORMAT: &str = "encryption-format";
/// Size of the plain bytes.
pub const ORIGINAL_FILE_SIZE: &str = "original-file-size";
/// server_version_num of the cluster that wrote it.
pub const PG_VERSION: &str = "pg-version";
/// The host that uploaded it.
pub const HOST: &str = "host";
/// A basebackup's (or a local-tar chunk's) format: `pghoard-bb-v2`, `walhoard-bb-stream-v1`, ...
pub const FORMAT: &str = "format";
/// walhoard's: the backup an object belongs to (pghoard never writes it).
pub const BACKUP_NAME: &str = "backup-name";
/// A basebackup's first WAL segment.
pub const START_WAL_SEGMENT: &str = "start-wal-segment";
/// A basebackup's start time.
pub const START_TIME: &str = "start-time";
/// A basebackup's last WAL segment.
pub const END_WAL_SEGMENT: &str = "end-wal-segment";
/// A basebackup's end time.
pub const END_TIME: &str = "end-time";
/// walhoard's: the WAL segment size of a partial WAL object's segment (bytes).
pub const WAL_SEGMENT_SIZE: &str = "wal-segment-size";
/// walhoard's: a basebackup's start LSN (and a partial WAL object's first byte).
pub const START_LSN: &str = "start-lsn";
/// walhoard's: a basebackup's end LSN (and the end of a partial WAL object's bytes).
pub const END_LSN: &str = "end-lsn";
/// rohmu's local storage: SHA-256 of the stored bytes.
pub const STORED_SHA256: &str = "_hash";
/// walhoard's: a basebackup's timeline.
pub const START_TIMELINE: &str = "start-timeline";
/// A basebackup's plain size.
pub const TOTAL_SIZE_PLAIN: &str = "total-size-plain";
/// A basebackup's stored size.
pub const TOTAL_SIZE_ENC: &str = "total-size-enc";
/// basic, local-tar, ...
pub const BASEBACKUP_MODE: &str = "basebackup-mode";
/// The site's active_backup_mode when the backup was taken.
pub const ACTIVE_BACKUP_MODE: &str = "active-backup-mode";
/// walhoard's: a basebackup's `full` or `incremental` (absent: full).
pub const BACKUP_TYPE: &str = "backup-type";
/// walhoard's: the backup an incremental basebackup was taken against.
pub const INCREMENTAL_PARENT: &str = "incremental-parent";
/// walhoard's: on every WAL segment, `.partial` and timeline history object walhoard stores,
/// the version of walhoard that wrote it. Retention deletes only WAL that carries it, so
/// pghoard's WAL (and anything else's) under the same prefix is never deleted. pghoard reads
/// metadata by name (`metadata.get("compression-algorithm")` ... in its webserver and
/// restore) and rohmu's `sanitize_metadata` passes other keys through untouched, so pghoard
/// ignores it.
pub const WALHOARD_WRITER: &str = "walhoard-writer";

/// walhoard's: on WAL objects the daemon streamed, the system identifier of the cluster whose
/// WAL it is (decimal), as the primary's IDENTIFY_SYSTEM gave it once the archive was found to be
/// that cluster's. The archive-owner check reads it from the metadata, so it needs no private
/// key to tell whose encrypted WAL a prefix holds (older objects: their first page is decoded).
pub const SYSTEM_IDENTIFIER: &str = "walhoard-system-identifier";

/// The value of [`WALHOARD_WRITER`] this build writes.
pub const WALHOARD_WRITER_VALUE: &str = concat!("walhoard ", env!("CARGO_PKG_VERSION"));

use std::collections::BTreeMap;
use std::str::FromStr;

use walhoard_protocol::Lsn;

use super::{Metadata, StorageError};
use crate::pipeline::compression::Algorithm;
use crate::pipeline::hash::HashAlgorithm;

/// walhoard's own encryption format, the one value of [`ENCRYPTION_FORMAT`] it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncryptionFormat {
    Walhenc1,
}

impl EncryptionFormat {
    pub fn name(self) -> &'static str {
        match self {
            EncryptionFormat::Walhenc1 => "walhenc1",
        }
    }
}

impl FromStr for EncryptionFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "walhenc1" => Ok(EncryptionFormat::Walhenc1),
            other => Err(format!(
                "unknown encryption format {other:?}: expected walhenc1"
            )),
        }
    }
}

/// An object's metadata, typed: what pghoard (rohmu) and walhoard write, parsed once where
/// it is read ([`ObjectMeta::parse`]) and turned back into the stored key/value pairs where
/// it is written ([`ObjectMeta::to_map`]), under the key names above. Free-form values
/// (times, segment names, formats, modes) stay strings as pghoard wrote them; keys walhoard
/// does not know are kept in `extra`, so that nothing another writer stored is lost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectMeta {
    /// [`COMPRESSION_ALGORITHM`]: how the stored bytes are compressed.
    pub compression_algorithm: Option<Algorithm>,
    /// [`ENCRYPTION_KEY_ID`]: set exactly when the object is encrypted.
    pub encryption_key_id: Option<String>,
    /// [`ENCRYPTION_FORMAT`]: walhoard's label; pghoard's `pghoa1` objects have none.
    pub encryption_format: Option<EncryptionFormat>,
    /// [`ORIGINAL_FILE_SIZE`]: bytes of the plaintext.
    pub original_file_size: Option<u64>,
    /// [`HASH`]: hex digest of the plaintext, with `hash_algorithm`.
    pub hash: Option<String>,
    /// [`HASH_ALGORITHM`]: absent on objects older than pghoard's setting (then SHA-1).
    pub hash_algorithm: Option<HashAlgorithm>,
    /// [`STORED_SHA256`]: rohmu's local storage's SHA-256 of the stored bytes, hex.
    pub stored_sha256: Option<String>,
    /// [`PG_VERSION`]: server_version_num of the cluster that wrote it.
    pub pg_version: Option<u32>,
    /// [`HOST`]: the host that uploaded it.
    pub host: Option<String>,
    /// [`FORMAT`]: a basebackup's (or a local-tar chunk's) format.
    pub format: Option<String>,
    /// [`BACKUP_NAME`]: walhoard's: the backup an object belongs to.
    pub backup_name: Option<String>,
    /// [`START_WAL_SEGMENT`]: a basebackup's first WAL segment.
    pub start_wal_segment: Option<String>,
    /// [`START_TIME`]: a basebackup's start time, as written.
    pub start_time: Option<String>,
    /// [`END_WAL_SEGMENT`]: a basebackup's last WAL segment.
    pub end_wal_segment: Option<String>,
    /// [`END_TIME`]: a basebackup's end time, as written.
    pub end_time: Option<String>,
    /// [`START_LSN`]: walhoard's: where a basebackup's WAL starts (its redo point).
    pub start_lsn: Option<Lsn>,
    /// [`END_LSN`]: walhoard's: the LSN a restore of the basebackup must reach.
    pub end_lsn: Option<Lsn>,
    /// [`START_TIMELINE`]: walhoard's: a basebackup's timeline.
    pub start_timeline: Option<u32>,
    /// [`WAL_SEGMENT_SIZE`]: walhoard's: the segment size of a partial WAL object's segment.
    pub wal_segment_size: Option<u64>,
    /// [`TOTAL_SIZE_PLAIN`]: a basebackup's plain size.
    pub total_size_plain: Option<u64>,
    /// [`TOTAL_SIZE_ENC`]: a basebackup's stored size.
    pub total_size_enc: Option<u64>,
    /// [`BASEBACKUP_MODE`]: basic, local-tar, ...
    pub basebackup_mode: Option<String>,
    /// [`ACTIVE_BACKUP_MODE`]: the site's active_backup_mode when the backup was taken.
    pub active_backup_mode: Option<String>,
    /// [`WALHOARD_WRITER`]: walhoard's mark on the WAL it stores (what retention may delete).
    pub walhoard_writer: Option<String>,
    /// [`BACKUP_TYPE`]: walhoard's: a basebackup's type; absent means full.
    pub backup_type: Option<walhoard_basebackup::control::BackupType>,
    /// [`INCREMENTAL_PARENT`]: walhoard's: the parent of an incremental basebackup.
    pub incremental_parent: Option<String>,
    /// [`SYSTEM_IDENTIFIER`].
    pub system_identifier: Option<u64>,
    /// Every other key, as stored.
    pub extra: BTreeMap<String, String>,
}

impl ObjectMeta {
    /// Parses the metadata of object `key`. A value that does not parse is an error naming
    /// the object and the metadata key ([`StorageError::BadMetadata`]).
    pub fn parse(key: &str, map: &Metadata) -> Result<ObjectMeta, StorageError> {
        let mut out = ObjectMeta::default();
        for (name, value) in map {
            let text = || Some(value.clone());
            let typed = |e: String| StorageError::BadMetadata {
                key: key.to_string(),
                message: format!("{name} {value:?}: {e}"),
            };
            match name.as_str() {
                COMPRESSION_ALGORITHM => {
                    out.compression_algorithm = Some(value.parse().map_err(typed)?)
                }
                ENCRYPTION_KEY_ID => out.encryption_key_id = text(),
                ENCRYPTION_FORMAT => out.encryption_format = Some(value.parse().map_err(typed)?),
                ORIGINAL_FILE_SIZE => out.original_file_size = Some(number(value).map_err(typed)?),
                HASH => out.hash = text(),
                HASH_ALGORITHM => out.hash_algorithm = Some(value.parse().map_err(typed)?),
                STORED_SHA256 => out.stored_sha256 = text(),
                PG_VERSION => out.pg_version = Some(number(value).map_err(typed)?),
                HOST => out.host = text(),
                FORMAT => out.format = text(),
                BACKUP_NAME => out.backup_name = text(),
                START_WAL_SEGMENT => out.start_wal_segment = text(),
                START_TIME => out.start_time = text(),
                END_WAL_SEGMENT => out.end_wal_segment = text(),
                END_TIME => out.end_time = text(),
                START_LSN => {
                    out.start_lsn = Some(value.parse().map_err(|e| typed(format!("{e}")))?)
                }
                END_LSN => out.end_lsn = Some(value.parse().map_err(|e| typed(format!("{e}")))?),
                START_TIMELINE => out.start_timeline = Some(number(value).map_err(typed)?),
                WAL_SEGMENT_SIZE => out.wal_segment_size = Some(number(value).map_err(typed)?),
                TOTAL_SIZE_PLAIN => out.total_size_plain = Some(number(value).map_err(typed)?),
                TOTAL_SIZE_ENC => out.total_size_enc = Some(number(value).map_err(typed)?),
                BASEBACKUP_MODE => out.basebackup_mode = text(),
                ACTIVE_BACKUP_MODE => out.active_backup_mode = text(),
                WALHOARD_WRITER => out.walhoard_writer = text(),
                BACKUP_TYPE => out.backup_type = Some(value.parse().map_err(typed)?),
                INCREMENTAL_PARENT => out.incremental_parent = text(),
                SYSTEM_IDENTIFIER => out.system_identifier = Some(number(value).map_err(typed)?),
                _ => {
                    out.extra.insert(name.clone(), value.clone());
                }
            }
        }
        Ok(out)
    }

    /// The key/value pairs to store, under pghoard's (and walhoard's) key names.
    pub fn to_map(&self) -> Metadata {
        let mut m = self.extra.clone();
        let mut put = |name: &str, value: Option<String>| {
            if let Some(v) = value {
                m.insert(name.to_string(), v);
            }
        };
        put(
            COMPRESSION_ALGORITHM,
            self.compression_algorithm.map(|a| a.name().into()),
        );
        put(ENCRYPTION_KEY_ID, self.encryption_key_id.clone());
        put(
            ENCRYPTION_FORMAT,
            self.encryption_format.map(|f| f.name().into()),
        );
        put(
            ORIGINAL_FILE_SIZE,
            self.original_file_size.map(|n| n.to_string()),
        );
        put(HASH, self.hash.clone());
        put(HASH_ALGORITHM, self.hash_algorithm.map(|a| a.name().into()));
        put(STORED_SHA256, self.stored_sha256.clone());
        put(PG_VERSION, self.pg_version.map(|n| n.to_string()));
        put(HOST, self.host.clone());
        put(FORMAT, self.format.clone());
        put(BACKUP_NAME, self.backup_name.clone());
        put(START_WAL_SEGMENT, self.start_wal_segment.clone());
        put(START_TIME, self.start_time.clone());
        put(END_WAL_SEGMENT, self.end_wal_segment.clone());
        put(END_TIME, self.end_time.clone());
        put(START_LSN, self.start_lsn.map(|l| l.to_string()));
        put(END_LSN, self.end_lsn.map(|l| l.to_string()));
        put(START_TIMELINE, self.start_timeline.map(|n| n.to_string()));
        put(
            WAL_SEGMENT_SIZE,
            self.wal_segment_size.map(|n| n.to_string()),
        );
        put(
            TOTAL_SIZE_PLAIN,
            self.total_size_plain.map(|n| n.to_string()),
        );
        put(TOTAL_SIZE_ENC, self.total_size_enc.map(|n| n.to_string()));
        put(BASEBACKUP_MODE, self.basebackup_mode.clone());
        put(ACTIVE_BACKUP_MODE, self.active_backup_mode.clone());
        put(WALHOARD_WRITER, self.walhoard_writer.clone());
        put(BACKUP_TYPE, self.backup_type.map(|t| t.as_str().into()));
        put(INCREMENTAL_PARENT, self.incremental_parent.clone());
        put(
            SYSTEM_IDENTIFIER,
            self.system_identifier.map(|n| n.to_string()),
        );
        m
    }

    /// The digest `hash` was made with: SHA-1 when not recorded (objects from before pghoard's
    /// `hash_algorithm` setting).
    pub fn hash_algorithm_or_default(&self) -> HashAlgorithm {
        self.hash_algorithm.unwrap_or(HashAlgorithm::Sha1)
    }
}

/// A decimal number as pghoard writes it (Python's `str(int)`).
fn number<T: FromStr<Err = std::num::ParseIntError>>(value: &str) -> Result<T, String> {
    value.parse().map_err(|e| format!("not a number: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What pghoard and walhoard write parses into typed fields and back into the same
    /// key/value pairs, byte for byte; unknown keys survive.
    #[test]
    fn object_meta_round_trips_every_key_byte_identically() {
        let stored: Metadata = [
            (COMPRESSION_ALGORITHM, "zstd"),
            (ENCRYPTION_KEY_ID, "k1"),
            (ENCRYPTION_FORMAT, "walhenc1"),
            (ORIGINAL_FILE_SIZE, "16777216"),
            (HASH, "ab01"),
            (HASH_ALGORITHM, "sha256"),
            (STORED_SHA256, "cd02"),
            (PG_VERSION, "150018"),
            (HOST, "db1"),
            (FORMAT, "pghoard-bb-v2"),
            (BACKUP_NAME, "2026-12-04_0"),
            (START_WAL_SEGMENT, "000000010000000000000003"),
            (START_TIME, "2026-12-04T00:00:00+00:00"),
            (END_WAL_SEGMENT, "000000010000000000000004"),
            (END_TIME, "2026-12-04T00:01:00+00:00"),
            (START_LSN, "0/3000028"),
            (END_LSN, "1/A0000100"),
            (START_TIMELINE, "2"),
            (WAL_SEGMENT_SIZE, "16777216"),
            (TOTAL_SIZE_PLAIN, "1000"),
            (TOTAL_SIZE_ENC, "900"),
            (BASEBACKUP_MODE, "local-tar"),
            (ACTIVE_BACKUP_MODE, "pg_receivexlog"),
            (WALHOARD_WRITER, "walhoard 0.1.0"),
            ("normalized-backup-time", "2026-12-04T00:00:00+00:00"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let m = ObjectMeta::parse("basebackup/x", &stored).unwrap();
        assert_eq!(m.compression_algorithm, Some(Algorithm::Zstd));
        assert_eq!(m.hash_algorithm, Some(HashAlgorithm::Sha256));
        assert_eq!(m.end_lsn, Some(Lsn(0x1_a000_0100)));
        assert_eq!(m.pg_version, Some(150018));
        assert_eq!(m.extra.len(), 1, "{:?}", m.extra);
        assert_eq!(m.to_map(), stored);
    }

    /// A typed value that does not parse names the object and the metadata key.
    #[test]
    fn object_meta_errors_name_the_object_and_the_key() {
        for (name, value) in [
            (ORIGINAL_FILE_SIZE, "12x"),
            (COMPRESSION_ALGORITHM, "brotli"),
            (HASH_ALGORITHM, "sha3"),
            (START_LSN, "nope"),
            (ENCRYPTION_FORMAT, "pghoa2"),
        ] {
            let stored: Metadata = [(name.to_string(), value.to_string())].into();
            let err = ObjectMeta::parse("xlog/000000010000000000000001", &stored)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("xlog/000000010000000000000001") && err.contains(name),
                "{err}"
            );
        }
    }
}
