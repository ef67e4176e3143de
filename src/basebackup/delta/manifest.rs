//! The manifest of a delta backup, as pghoard 2.7.0 writes it into the control object's
//! metadata member (`manifest`: rohmu's `BackupManifest`, rohmu/delta/common.py) and reads it
//! back, both to restore and to find the hash objects a new delta backup may reuse
//! (`DeltaBaseBackup._list_existing_files`, which parses every file entry with pydantic's
//! `extra = "forbid"`: exactly these fields, no others).
//!
//! Which file goes where is rohmu's `Snapshotter` rule ([`Placement::of`]): at most
//! [`EMBEDDED_FILE_SIZE`] bytes are embedded (`content_b64`), smaller than
//! `basebackup_delta_mode_min_delta_file_size` go into bundle chunks (`should_be_bundled`),
//! the rest are `basebackup_delta/<hexdigest>` objects.

use base64::Engine;
use serde::Serialize;

/// rohmu's `EMBEDDED_FILE_SIZE`: files of at most this many bytes are embedded.
pub const EMBEDDED_FILE_SIZE: u64 = 150;

/// Where one file of the data directory is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Embedded,
    Bundled,
    Object,
}

impl Placement {
    /// rohmu's rule (`Snapshotter._snapshot_file`): embedded up to [`EMBEDDED_FILE_SIZE`],
    /// bundled below `min_delta_file_size`, an object of its own otherwise.
    pub fn of(size: u64, min_delta_file_size: u64) -> Placement {
        if size <= EMBEDDED_FILE_SIZE {
            Placement::Embedded
        } else if size < min_delta_file_size {
            Placement::Bundled
        } else {
            Placement::Object
        }
    }
}

/// rohmu's `SnapshotFile`, field for field.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SnapshotFile {
    /// Below the data directory.
    pub relative_path: String,
    pub file_size: u64,
    /// Bytes stored for a hash object; 0 otherwise.
    pub stored_file_size: u64,
    pub mtime_ns: u64,
    /// BLAKE2s-256 of the plain bytes for a hash object; empty otherwise.
    pub hexdigest: String,
    pub content_b64: Option<String>,
    pub should_be_bundled: bool,
    pub missing_ok: bool,
}

impl SnapshotFile {
    fn new(relative_path: &str, file_size: u64, mtime: u64) -> Self {
        SnapshotFile {
            relative_path: relative_path.to_string(),
            file_size,
            stored_file_size: 0,
            mtime_ns: mtime.saturating_mul(1_000_000_000),
            hexdigest: String::new(),
            content_b64: None,
            should_be_bundled: false,
            // pghoard: files directly in the data directory (PG_VERSION, the configuration)
            // must exist; relation files may vanish (a dropped table).
            missing_ok: relative_path.contains('/'),
        }
    }

    pub fn embedded(relative_path: &str, bytes: &[u8], mtime: u64) -> Self {
        SnapshotFile {
            content_b64: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            ..Self::new(relative_path, bytes.len() as u64, mtime)
        }
    }

    pub fn bundled(relative_path: &str, size: u64, mtime: u64) -> Self {
        SnapshotFile {
            should_be_bundled: true,
            ..Self::new(relative_path, size, mtime)
        }
    }

    pub fn object(
        relative_path: &str,
        size: u64,
        mtime: u64,
        hexdigest: &str,
        stored_size: u64,
    ) -> Self {
        SnapshotFile {
            hexdigest: hexdigest.to_string(),
            stored_file_size: stored_size,
            ..Self::new(relative_path, size, mtime)
        }
    }
}

#[derive(Debug, Serialize)]
struct SnapshotHash {
    hexdigest: String,
    size: u64,
}

#[derive(Debug, Serialize)]
struct SnapshotState {
    root_globs: Vec<String>,
    files: Vec<SnapshotFile>,
    empty_dirs: Vec<String>,
}

#[derive(Debug, Serialize)]
struct SnapshotResult {
    start: String,
    end: String,
    state: SnapshotState,
    files: usize,
    total_size: u64,
    hashes: Vec<SnapshotHash>,
}

#[derive(Debug, Serialize)]
struct UploadResult {
    total_size: u64,
    total_stored_size: u64,
}

/// rohmu's `BackupManifest`.
#[derive(Debug, Serialize)]
pub struct BackupManifest {
    start: String,
    end: String,
    snapshot_result: SnapshotResult,
    upload_result: UploadResult,
}

impl BackupManifest {
    /// `files` in any order (sorted here by path, as rohmu sorts them); `dirs` every
    /// directory of the data directory (`.` included), which pghoard's restore creates
    /// before it writes any file; `stored` the bytes stored for the whole backup.
    pub fn new(
        times: (String, String),
        mut files: Vec<SnapshotFile>,
        mut dirs: Vec<String>,
        stored: u64,
    ) -> Self {
        files.sort_by(|a, b| a.relative_path.cmp(&b.relative_path));
        dirs.sort();
        dirs.dedup();
        let total_size = files.iter().map(|f| f.file_size).sum();
        let hashes = files
            .iter()
            .filter(|f| !f.hexdigest.is_empty())
            .map(|f| SnapshotHash {
                hexdigest: f.hexdigest.clone(),
                size: f.file_size,
            })
            .collect();
        BackupManifest {
            start: times.0.clone(),
            end: times.1.clone(),
            snapshot_result: SnapshotResult {
                start: times.0,
                end: times.1,
                files: files.len(),
                total_size,
                hashes,
                state: SnapshotState {
                    root_globs: vec!["**/*".into()],
                    files,
                    empty_dirs: dirs,
                },
            },
            upload_result: UploadResult {
                total_size,
                total_stored_size: stored,
            },
        }
    }

    pub fn total_size(&self) -> u64 {
        self.upload_result.total_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_follows_rohmus_thresholds() {
        let min = 65536;
        assert_eq!(Placement::of(0, min), Placement::Embedded);
        assert_eq!(Placement::of(150, min), Placement::Embedded);
        assert_eq!(Placement::of(151, min), Placement::Bundled);
        assert_eq!(Placement::of(65535, min), Placement::Bundled);
        assert_eq!(Placement::of(65536, min), Placement::Object);
        // A threshold at or below the embedded size bundles nothing.
        assert_eq!(Placement::of(151, 100), Placement::Object);
    }

    /// The manifest reads back through walhoard's own reader of pghoard's manifests, and every
    /// file entry has exactly rohmu's `SnapshotFile` fields (pghoard parses them with
    /// `extra = "forbid"`).
    #[test]
    fn manifest_round_trips_through_the_restore_reader() {
        let d = "ab".repeat(32);
        let m = BackupManifest::new(
            ("2026-01-01T00:00:00Z".into(), "2026-01-01T00:00:01Z".into()),
            vec![
                SnapshotFile::object("base/5/16384", 90000, 1, &d, 900),
                SnapshotFile::embedded("PG_VERSION", b"15\n", 1),
                SnapshotFile::bundled("base/5/112", 8192, 1),
            ],
            vec!["base".into(), ".".into(), "base/5".into()],
            1000,
        );
        let doc = serde_json::json!({ "manifest": m });
        let files =
            crate::restore::pghoard_delta::delta_files("basebackup/x", doc.to_string().as_bytes())
                .unwrap();
        assert_eq!(files.objects.len(), 1);
        assert_eq!(files.objects[0].key(), format!("basebackup_delta/{d}"));
        assert_eq!(
            files.embedded,
            vec![("PG_VERSION".to_string(), b"15\n".to_vec())]
        );
        assert_eq!(files.empty_dirs, [".", "base", "base/5"]);
        let entry = &doc["manifest"]["snapshot_result"]["state"]["files"][0];
        let mut keys: Vec<&str> = entry
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "content_b64",
                "file_size",
                "hexdigest",
                "missing_ok",
                "mtime_ns",
                "relative_path",
                "should_be_bundled",
                "stored_file_size"
            ]
        );
        assert_eq!(entry["relative_path"], "PG_VERSION");
        assert_eq!(m.total_size(), 90000 + 3 + 8192);
        assert_eq!(
            doc["manifest"]["snapshot_result"]["hashes"][0]["size"],
            90000
        );
    }
}
