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
