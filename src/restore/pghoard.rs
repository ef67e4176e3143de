//! Backups written by pghoard, read through walhoard's restore (issue 15 item 2).
//!
//! What [`super::get`] needs is a [`BackupMetadata`]: the chunks to fetch and where their
//! members go. walhoard's own control objects carry one; pghoard's are turned into one here:
//! - `basic` / `pipe` (no `format` metadata): the control object `basebackup/<name>` *is* the
//!   backup, one compressed (optionally `pghoa1`-encrypted) tar of the data directory as
//!   `pg_basebackup -Ft` writes `base.tar` (members relative to the data directory). It is
//!   fetched as the backup's only chunk. pghoard's restore extracts it without a path
//!   transform (restore.py `_build_tar_args`, no `format`).
//! - `local-tar` (`format: pghoard-bb-v2`): the control object `basebackup/<name>.00000000.pghoard`
//!   is a tar holding `.pghoard_tar_metadata.json`, `pgdata/global/pg_control`,
//!   `pgdata/backup_label` and some empty directories; the JSON lists the chunks
//!   `basebackup_chunk/<chunk_filename>` with only `chunk_filename`, `input_size`,
//!   `result_size` and `files`. Every tar has `pgdata/…` and `tablespaces/<name>/…` members;
//!   pghoard's restore strips `pgdata/` and maps `tablespaces/<name>/` to the tablespace's
//!   directory, which walhoard's local-tar routing does the same way.
//!
//! pghoard records no per-chunk hash. What is checked instead: every chunk's plain size
//! against `input_size` (the object's `original-file-size` for `basic`), and, when the
//! object's metadata has rohmu's local-storage `_hash` (SHA-256 of the stored bytes), that
//! hash ([`crate::pipeline::transfer::download_with`]); `pghoa1` objects have their MAC.
//! Delta backups are read by [`super::pghoard_delta`]; `pghoard-bb-v1` is refused by name.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use walhoard_basebackup::control::{BackupMetadata, ChunkKind, ChunkMeta, TablespaceMeta};
use walhoard_protocol::{SegmentSize, WalSegmentName};

use crate::storage::meta::ObjectMeta;

/// walhoard's internal name for pghoard's `basic`/`pipe` layout (pghoard writes no `format`).
pub const FORMAT_PGHOARD_BASIC: &str = "pghoard-basic";

/// pghoard's local-tar control object metadata member, as pghoard writes it.
#[derive(Debug, Deserialize)]
struct PghoardBbV2 {
    #[serde(default)]
    backup_start_time: Option<String>,
    #[serde(default)]
    backup_start_wal_segment: Option<String>,
    #[serde(default)]
    backup_end_time: Option<String>,
    #[serde(default)]
    backup_end_wal_segment: Option<String>,
    #[serde(default)]
    pgdata: Option<String>,
    #[serde(default)]
    pghoard_version: Option<String>,
    #[serde(default)]
    tablespaces: BTreeMap<String, PghoardTablespace>,
    #[serde(default)]
    host: Option<String>,
    chunks: Vec<PghoardChunk>,
}

#[derive(Debug, Deserialize)]
struct PghoardTablespace {
    oid: serde_json::Value,
    path: String,
}

#[derive(Debug, Deserialize)]
struct PghoardChunk {
    chunk_filename: String,
    input_size: u64,
    result_size: u64,
    #[serde(default)]
    files: Vec<String>,
}

/// The timeline named by a segment name (`start-wal-segment`), 0 when it is not one.
pub fn segment_timeline(segment: &str) -> u32 {
    segment
        .parse::<WalSegmentName>()
        .map(|w| w.timeline().get())
        .unwrap_or(0)
}

/// The LSN a segment starts at, with the default 16 MiB segment size: pghoard records only
/// segment names, and its own restore never needs an LSN. Empty when not a segment name.
pub fn segment_start_lsn(segment: &str) -> String {
    segment
        .parse::<WalSegmentName>()
        .ok()
        .and_then(|w| w.segment())
        .and_then(|s| s.start_lsn(SegmentSize::DEFAULT).ok())
        .map(|l| l.to_string())
        .unwrap_or_default()
}

/// Refuses the pghoard formats walhoard cannot restore yet, naming them.
pub fn check_supported(key: &str, object_meta: &ObjectMeta) -> Result<()> {
    match object_meta.format.as_deref() {
        None | Some("pghoard-bb-v2") => Ok(()),
        f if super::pghoard_delta::is_delta(f) => Ok(()),
        // pghoard wrote this single-tar local-tar layout before 1.6.0 (2017); no pghoard that
        // runs on today's Python and PostgreSQL writes it, so there is no real archive to
        // test a reader against.
        Some("pghoard-bb-v1") => bail!(
            "{key}: pghoard's basebackup format \"pghoard-bb-v1\" (written by pghoard before \
             1.6.0) is not supported by walhoard's restore; restore it with pghoard"
        ),
        Some(f) => bail!(
            "{key}: pghoard's basebackup format {f:?} is not supported by walhoard's restore \
             (supported: pghoard's basic/pipe backups, local-tar pghoard-bb-v2 and delta \
             pghoard-delta-v1/v2)"
        ),
    }
}

/// The description of pghoard's `basic`/`pipe` backup `basebackup/<file>` from its object
/// metadata: one chunk, the control object itself (`chunk_filename` is the file name).
pub fn basic_metadata(file: &str, m: &ObjectMeta, stored_size: u64) -> Result<BackupMetadata> {
    let key = format!("basebackup/{file}");
    let plain: u64 = m.original_file_size.with_context(|| {
        format!("{key}: pghoard basic backup without original-file-size metadata")
    })?;
    let chunk = ChunkMeta {
        chunk_filename: file.to_string(),
        input_size: plain,
        result_size: stored_size,
        files: Vec::new(),
        kind: ChunkKind::Data,
        tablespace_oid: None,
        hash: String::new(),
        server_compressed: false,
    };
    let start_seg = m.start_wal_segment.clone().unwrap_or_default();
    pghoard_backup(&key, m, start_seg, vec![chunk])
}

/// The description of a pghoard backup with `chunks` starting in segment `start_seg`, from
/// what its object metadata `m` says (`key` names it in errors), as a `basic` backup: the
/// fields only walhoard writes (end LSN, system identifier, tablespace map) are unknown and
/// the WAL is not included; the local-tar layout sets what its own description adds.
fn pghoard_backup(
    key: &str,
    m: &ObjectMeta,
    start_seg: String,
    chunks: Vec<ChunkMeta>,
) -> Result<BackupMetadata> {
    let pg_version: u32 = m
        .pg_version
        .with_context(|| format!("{key}: no pg-version metadata"))?;
    Ok(BackupMetadata {
        backup_start_time: m.start_time.clone().unwrap_or_default(),
        start_lsn: segment_start_lsn(&start_seg),
        start_timeline: segment_timeline(&start_seg),
        backup_start_wal_segment: start_seg,
        backup_end_time: m.end_time.clone().unwrap_or_default(),
        backup_end_wal_segment: m.end_wal_segment.clone().unwrap_or_default(),
        pgdata: None,
        pghoard_object: "basebackup".into(),
        pghoard_version: "pghoard".into(),
        tablespaces: BTreeMap::new(),
        host: m.host.clone().unwrap_or_default(),
        total_size_plain: chunks.iter().map(|c| c.input_size).sum(),
        total_size_enc: chunks.iter().map(|c| c.result_size).sum(),
        chunks,
        format: FORMAT_PGHOARD_BASIC.into(),
        end_lsn: String::new(),
        end_timeline: 0,
        pg_version,
        system_identifier: None,
        basebackup_mode: m.basebackup_mode.clone().unwrap_or_default(),
        active_backup_mode: m.active_backup_mode.clone().unwrap_or_default(),
        wal_included: false,
        compression_algorithm: m
            .compression_algorithm
            .map(|a| a.name().to_string())
            .unwrap_or_default(),
        encryption_key_id: m.encryption_key_id.clone(),
        tablespace_map: String::new(),
        backup_type: Default::default(),
        incremental_parent: None,
    })
}

/// The description of pghoard's local-tar backup from its `.pghoard_tar_metadata.json`
/// (`json`) and the control object's metadata.
pub fn bb_v2_metadata(key: &str, json: &[u8], m: &ObjectMeta) -> Result<BackupMetadata> {
    let p: PghoardBbV2 = serde_json::from_slice(json).with_context(|| {
        format!(
            "{key}: pghoard's {}",
            walhoard_basebackup::control::METADATA_MEMBER
        )
    })?;
    let mut tablespaces = BTreeMap::new();
    for (name, ts) in p.tablespaces {
        // pghoard stores the oid as a number or, in older versions, as text.
        let oid = match &ts.oid {
            serde_json::Value::Number(n) => n.as_u64().and_then(|v| u32::try_from(v).ok()),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        }
        .with_context(|| format!("{key}: tablespace {name:?} has no valid oid ({})", ts.oid))?;
        tablespaces.insert(name, TablespaceMeta { oid, path: ts.path });
    }
    let chunks: Vec<ChunkMeta> = p
        .chunks
        .into_iter()
        .map(|c| ChunkMeta {
            chunk_filename: c.chunk_filename,
            input_size: c.input_size,
            result_size: c.result_size,
            files: c.files,
            kind: ChunkKind::Data,
            tablespace_oid: None,
            hash: String::new(),
            server_compressed: false,
        })
        .collect();
    let start_seg = p
        .backup_start_wal_segment
        .unwrap_or_else(|| m.start_wal_segment.clone().unwrap_or_default());
    let end_seg = p
        .backup_end_wal_segment
        .unwrap_or_else(|| m.end_wal_segment.clone().unwrap_or_default());
    let base = pghoard_backup(key, m, start_seg, chunks)?;
    Ok(BackupMetadata {
        backup_start_time: p.backup_start_time.unwrap_or(base.backup_start_time),
        backup_end_time: p.backup_end_time.unwrap_or(base.backup_end_time),
        end_timeline: segment_timeline(&end_seg),
        backup_end_wal_segment: end_seg,
        pgdata: p.pgdata,
        pghoard_version: p.pghoard_version.unwrap_or_default(),
        tablespaces,
        host: p.host.unwrap_or_default(),
        format: walhoard_basebackup::control::FORMAT_LOCAL_TAR.into(),
        ..base
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pghoard_bb_v2_chunk_entries_without_kind_or_hash_parse() {
        let json = br#"{"backup_start_time":"2026-12-04T20:38:55+00:00",
            "backup_start_wal_segment":"000000020000000100000003","tablespaces":{"ts":{"oid":16390,"path":"/t"}},
            "chunks":[{"chunk_filename":"n/n.00000001.pghoard","input_size":10,"result_size":5,"files":["pgdata/x"]}]}"#;
        let m = ObjectMeta {
            pg_version: Some(150018),
            ..ObjectMeta::default()
        };
        let b = bb_v2_metadata("basebackup/n.00000000.pghoard", json, &m).unwrap();
        assert_eq!(b.chunks.len(), 1);
        assert_eq!(b.chunks[0].input_size, 10);
        assert_eq!(b.start_timeline, 2);
        assert_eq!(b.start_lsn, "1/3000000");
        assert_eq!(b.tablespaces["ts"].oid, 16390);
    }

    #[test]
    fn unsupported_pghoard_formats_are_named() {
        let mut m = ObjectMeta {
            format: Some("pghoard-bb-v1".into()),
            ..ObjectMeta::default()
        };
        let e = check_supported("basebackup/x", &m).unwrap_err().to_string();
        assert!(
            e.contains("pghoard-bb-v1") && e.contains("basebackup/x") && e.contains("with pghoard"),
            "{e}"
        );
        m.format = Some("pghoard-bb-v9".into());
        let e = check_supported("basebackup/x", &m).unwrap_err().to_string();
        assert!(e.contains("pghoard-bb-v9"), "{e}");
        for f in ["pghoard-delta-v1", "pghoard-delta-v2", "pghoard-bb-v2"] {
            m.format = Some(f.into());
            assert!(check_supported("basebackup/x", &m).is_ok(), "{f}");
        }
    }
}
