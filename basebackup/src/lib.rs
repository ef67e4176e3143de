//! Basebackups as a stream of tar chunks plus a description, independent of storage.
//!
//! - [`tar`]: a streaming tar writer (ustar, GNU long names, exact file sizes).
//! - [`untar`]: the matching streaming reader, for restore.
//! - [`walk`]: what a local-tar backup reads from a data directory, with PostgreSQL's own
//!   exclusion rules, and how it is split into chunks of about `basebackup_chunk_size`.
//! - [`sql`]: non-exclusive `pg_backup_start` / `pg_backup_stop` and tablespace discovery.
//! - [`label`]: the `backup_label` file.
//! - [`control`]: the JSON description of a backup that restore reads.
//!
//! BASE_BACKUP itself is in `walhoard_protocol::backup`; the binary wires either source into
//! the compression/encryption/storage pipeline.
//!
//! ```
//! use walhoard_basebackup::tar::TarWriter;
//! let mut tar = TarWriter::new(Vec::new());
//! tar.append_bytes("pgdata/backup_label", 0o600, 0, b"START WAL LOCATION: ...").unwrap();
//! let bytes = tar.finish().unwrap();
//! assert_eq!(bytes.len() % 512, 0);
//! ```

pub mod control;
pub mod label;
pub mod sql;
pub mod tar;
pub mod untar;
pub mod walk;
