//! pghoard's delta backups (`basebackup_mode: delta`; formats `pghoard-delta-v1` and
//! `pghoard-delta-v2`), read through walhoard's restore (issue 15 item 2).
//!
//! Layout, as pghoard 2.7.0's `DeltaBaseBackup` writes it and its restore.py
//! (`_get_delta_basebackup_data`) reads it:
//! - the control object `basebackup/<name>` is a tar like local-tar's: the
//!   `.pghoard_tar_metadata.json` member (backup times and segments, `tablespaces`, `chunks`,
//!   and `manifest`: rohmu's backup manifest) and `pgdata/global/pg_control`,
//!   `pgdata/backup_label`;
//! - `manifest.snapshot_result.state.files` lists every file of the data directory with its
//!   `relative_path` (below the data directory) and `file_size`. A file with a `hexdigest` is
//!   the object `basebackup_delta/<hexdigest>` (its plain bytes compressed and encrypted like
//!   any pghoard object, `stored_file_size` bytes stored); the digest is BLAKE2s-256 of the
//!   plain bytes, so objects are shared between backups. A file with `content_b64` is embedded
//!   in the manifest. Any other file is in a bundle chunk;
//! - bundle chunks (`pghoard-delta-v2` only) are `basebackup_delta_chunk/<chunk_filename>`,
//!   tars of `pgdata/…` members exactly like local-tar chunks;
//! - `manifest.snapshot_result.state.empty_dirs`: directories to create.
//!
//! v1 differs from v2 only by having no bundle chunks (pghoard's restore reads both with the
//! same code). Checked on restore, beyond what pghoard checks: every delta object's BLAKE2s
//! against its name and its plain size against `file_size`, every embedded file's size,
//! bundle chunks as local-tar chunks (plain size, rohmu's `_hash`, `pghoa1` MAC).
//! Tablespaces in a delta backup are refused by name: pghoard 2.7.0 cannot take one (its delta
//! mode fails on a tablespace outside the data directory: rohmu's `Snapshotter.snapshot`
//! raises "is not in the subpath of"; tried with tools/pghoard-fixture.sh
//! `FIXTURE_TABLESPACE=1 FIXTURE_MODES=delta`), so there is no layout to follow.

use std::io::{self, Read};

use anyhow::{bail, Context, Result};
use base64::Engine;
use serde::Deserialize;
use walhoard_basebackup::control::{BackupMetadata, ChunkKind, ChunkMeta};
use walhoard_basebackup::untar::{Entry, EntryKind};

use super::chunks::{Job, Route};
use super::extract::Extractor;
use crate::pipeline::blake2s::Blake2s;
use crate::storage::meta::ObjectMeta;

/// The control tar member pghoard's restore excludes from delta chunks (`--exclude`).
pub const MANIFEST_MEMBER: &str = ".manifest.json";

/// walhoard's name for the delta formats once read (both are restored alike).
pub const FORMAT_PGHOARD_DELTA: &str = "pghoard-delta";

/// Where bundle chunks live (pghoard's `FileType.Basebackup_delta_chunk`).
pub const CHUNK_PREFIX: &str = "basebackup_delta_chunk";

/// Where delta objects live.
pub const OBJECT_PREFIX: &str = "basebackup_delta";

#[derive(Debug, Deserialize)]
struct Control {
    manifest: Manifest,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    snapshot_result: SnapshotResult,
}

#[derive(Debug, Deserialize)]
struct SnapshotResult {
    state: SnapshotState,
}

#[derive(Debug, Deserialize)]
struct SnapshotState {
    files: Vec<SnapshotFile>,
    #[serde(default)]
    empty_dirs: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct SnapshotFile {
    relative_path: String,
    file_size: u64,
    #[serde(default)]
    stored_file_size: u64,
    #[serde(default)]
    hexdigest: String,
    #[serde(default)]
    content_b64: Option<String>,
}

/// A file restored from its own `basebackup_delta/<hexdigest>` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaObject {
    /// Below the data directory.
    pub relative_path: String,
    /// Plain size.
    pub file_size: u64,
    pub stored_file_size: u64,
    /// Lowercase hex BLAKE2s-256 of the plain bytes: the object's name.
    pub hexdigest: String,
}

impl DeltaObject {
    pub fn key(&self) -> String {
        format!("{OBJECT_PREFIX}/{}", self.hexdigest)
    }
}

/// What a delta backup's manifest says beyond the bundle chunks.
#[derive(Debug, Default)]
pub struct DeltaFiles {
    pub objects: Vec<DeltaObject>,
    /// (relative path, bytes): files embedded in the manifest.
    pub embedded: Vec<(String, Vec<u8>)>,
    pub empty_dirs: Vec<String>,
}

impl DeltaFiles {
    /// Plain bytes of the delta objects and embedded files.
    pub fn plain_size(&self) -> u64 {
        self.objects.iter().map(|o| o.file_size).sum::<u64>()
            + self
                .embedded
                .iter()
                .map(|(_, b)| b.len() as u64)
                .sum::<u64>()
    }

    pub fn stored_size(&self) -> u64 {
        self.objects.iter().map(|o| o.stored_file_size).sum()
    }
}

/// Whether `format` (a control object's `format` metadata) is one of pghoard's delta formats.
pub fn is_delta(format: Option<&str>) -> bool {
    matches!(format, Some("pghoard-delta-v1" | "pghoard-delta-v2"))
}

/// The delta objects, embedded files and empty directories of the control object `key`'s
/// metadata member `json`.
pub fn delta_files(key: &str, json: &[u8]) -> Result<DeltaFiles> {
    let c: Control =
        serde_json::from_slice(json).with_context(|| format!("{key}: pghoard's delta manifest"))?;
    let state = c.manifest.snapshot_result.state;
    let mut out = DeltaFiles {
        empty_dirs: state.empty_dirs,
        ..Default::default()
    };
    for f in state.files {
        if !f.hexdigest.is_empty() {
            // The digest becomes part of an object key: only what BLAKE2s-256 hex can be.
            if f.hexdigest.len() != 64
                || !f
                    .hexdigest
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                bail!(
                    "{key}: file {:?} has hexdigest {:?}, not a BLAKE2s-256 hex digest",
                    f.relative_path,
                    f.hexdigest
                );
            }
            out.objects.push(DeltaObject {
                relative_path: f.relative_path,
                file_size: f.file_size,
                stored_file_size: f.stored_file_size,
                hexdigest: f.hexdigest,
            });
        } else if let Some(b64) = f.content_b64 {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .with_context(|| {
                    format!("{key}: embedded file {:?}: not base64", f.relative_path)
                })?;
            if bytes.len() as u64 != f.file_size {
                bail!(
                    "{key}: embedded file {:?} holds {} bytes, the manifest says {}",
                    f.relative_path,
                    bytes.len(),
                    f.file_size
                );
            }
            out.embedded.push((f.relative_path, bytes));
        }
        // Else the file is in a bundle chunk.
    }
    Ok(out)
}

/// The description of pghoard's delta backup `key`: local-tar's (times, segments, bundle
/// chunks), with the format and sizes of a delta backup. Refuses tablespaces.
pub fn delta_metadata(
    key: &str,
    json: &[u8],
    m: &ObjectMeta,
    files: &DeltaFiles,
) -> Result<BackupMetadata> {
    let mut b = super::pghoard::bb_v2_metadata(key, json, m)?;
    if !b.tablespaces.is_empty() {
        bail!(
            "{key}: pghoard delta backup with tablespaces ({}): not supported by walhoard's restore; \
             restore it with pghoard",
            b.tablespaces.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    b.format = FORMAT_PGHOARD_DELTA.into();
    b.total_size_plain += files.plain_size();
    b.total_size_enc += files.stored_size();
    Ok(b)
}

/// One fetch job per delta object, extracted as its file of the data directory. A digest
/// shared by several files (identical contents) is fetched once per file, as pghoard does.
pub(crate) fn object_jobs(files: &DeltaFiles, data: Option<&Extractor>) -> Vec<Job> {
    files
        .objects
        .iter()
        .map(|o| Job {
            chunk: ChunkMeta {
                chunk_filename: o.hexdigest.clone(),
                input_size: o.file_size,
                result_size: o.stored_file_size,
                files: vec![o.relative_path.clone()],
                kind: ChunkKind::Data,
                tablespace_oid: None,
                hash: String::new(),
                server_compressed: false,
            },
            route: Route::DeltaFile {
                data: data.cloned(),
                rel: o.relative_path.clone(),
                hexdigest: o.hexdigest.clone(),
            },
            key: o.key(),
            // Checked by BLAKE2s instead ([`extract_object`]).
            check_sha1: false,
        })
        .collect()
}

/// Writes a delta object's plain bytes `r` as the data directory's file `rel` (with `data`;
/// without, `walhoard verify`, they are only read) and checks their BLAKE2s-256 against
/// `hexdigest` (the caller checks the size). A mismatch is an error, and the restore's
/// cleanup removes the file with everything else.
pub(super) fn extract_object(
    data: Option<&Extractor>,
    rel: &str,
    hexdigest: &str,
    r: &mut dyn Read,
) -> io::Result<()> {
    struct Hashing<'a> {
        inner: &'a mut dyn Read,
        hash: Blake2s,
    }
    impl Read for Hashing<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.hash.update(&buf[..n]);
            Ok(n)
        }
    }
    let mut h = Hashing {
        inner: r,
        hash: Blake2s::new(),
    };
    match data {
        Some(data) => data.extract(&file_entry(rel, 0), rel, &mut h)?,
        None => io::copy(&mut h, &mut io::sink())?,
    };
    let got = h.hash.finish_hex();
    if got != hexdigest {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{rel}: BLAKE2s-256 of the plain bytes is {got}, not {hexdigest} (the object's name)"),
        ));
    }
    Ok(())
}

/// `--delta`: keeps the data directory's file `rel` without fetching its object when it
/// already is `size` bytes whose BLAKE2s-256 is `hexdigest` (the object's name, which the
/// restore would check the object against). False when it is not, or outside a delta restore.
pub(super) fn keep_local(
    data: &Extractor,
    rel: &str,
    hexdigest: &str,
    size: u64,
) -> io::Result<bool> {
    data.keep_if_same(rel, size, FILE_MODE, |r| {
        let mut hash = Blake2s::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hash.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(hash.finish_hex() == hexdigest)
    })
}

/// Writes the files embedded in the manifest and creates its empty directories.
pub(super) fn write_embedded(files: &DeltaFiles, data: &Extractor) -> io::Result<()> {
    for d in &files.empty_dirs {
        let entry = Entry {
            path: d.clone(),
            kind: EntryKind::Dir,
            mode: 0o700,
            size: 0,
        };
        data.extract(&entry, d, &mut io::empty())?;
    }
    for (rel, bytes) in &files.embedded {
        data.extract(&file_entry(rel, bytes.len() as u64), rel, &mut &bytes[..])?;
    }
    Ok(())
}

/// The mode of a file restored from a delta object or the manifest (no mode is recorded).
const FILE_MODE: u32 = 0o600;

/// A regular file member named `rel` (mode 0600, as PostgreSQL creates its files).
fn file_entry(rel: &str, size: u64) -> Entry {
    Entry {
        path: rel.to_string(),
        kind: EntryKind::File,
        mode: FILE_MODE,
        size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_files_are_sorted_into_objects_embedded_and_bundled() {
        let d = "0".repeat(63) + "a";
        let json = format!(
            r#"{{"chunks": [], "manifest": {{"snapshot_result": {{"state": {{
                "files": [
                  {{"relative_path": "base/1/1259", "file_size": 90000, "stored_file_size": 900, "hexdigest": "{d}", "content_b64": null}},
                  {{"relative_path": "PG_VERSION", "file_size": 3, "stored_file_size": 0, "hexdigest": "", "content_b64": "MTUK"}},
                  {{"relative_path": "base/1/112", "file_size": 8192, "stored_file_size": 0, "hexdigest": "", "content_b64": null}}
                ],
                "empty_dirs": ["pg_notify"]}}}}}}}}"#
        );
        let f = delta_files("basebackup/b", json.as_bytes()).unwrap();
        assert_eq!(f.objects.len(), 1);
        assert_eq!(f.objects[0].key(), format!("basebackup_delta/{d}"));
        assert_eq!(
            f.embedded,
            vec![("PG_VERSION".to_string(), b"15\n".to_vec())]
        );
        assert_eq!(f.empty_dirs, ["pg_notify"]);
        assert_eq!(f.plain_size(), 90003);
    }

    #[test]
    fn a_digest_that_is_not_hex_or_a_wrong_embedded_size_is_refused() {
        let bad = r#"{"manifest": {"snapshot_result": {"state": {"files": [
            {"relative_path": "x", "file_size": 1, "hexdigest": "../../etc/passwd"}]}}}}"#;
        let e = delta_files("basebackup/b", bad.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("not a BLAKE2s-256"), "{e:#}");
        let short = r#"{"manifest": {"snapshot_result": {"state": {"files": [
            {"relative_path": "x", "file_size": 5, "content_b64": "MTUK"}]}}}}"#;
        let e = delta_files("basebackup/b", short.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("holds 3 bytes"), "{e:#}");
    }
}
