//! `walhoard restore get-basebackup` (the CLI) on forged backups: control objects and chunks
//! written straight into a local store by the test, as someone who can write the bucket (and
//! holds the public key, or where objects are not encrypted) would. No PostgreSQL is needed:
//! the restore must refuse them before or while extracting, write nothing outside the
//! directories the operator named, and leave nothing that looks like a data directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::json;
use walhoard::config::ObjectStorageConfig;
use walhoard::pipeline::compression::{Algorithm, CompressionSettings};
use walhoard::pipeline::hash::HashAlgorithm;
use walhoard::pipeline::transfer::{upload, Source, Upload};
use walhoard::storage::ObjectStore;
use walhoard_basebackup::control::{
    BackupMetadata, ChunkKind, ChunkMeta, TablespaceMeta, FORMAT_STREAM, METADATA_MEMBER,
};
use walhoard_basebackup::tar::{Member, MemberKind, TarWriter};

/// A site whose local store the test writes forged objects into.
struct Forge {
    dir: tempfile::TempDir,
    store: ObjectStore,
}

/// One chunk of a forged backup.
struct Chunk {
    file: &'static str,
    kind: ChunkKind,
    oid: Option<u32>,
    data: Vec<u8>,
    /// The plain size the control object declares (default: the real one).
    declared: Option<u64>,
}

impl Chunk {
    fn new(file: &'static str, kind: ChunkKind, data: Vec<u8>) -> Chunk {
        Chunk {
            file,
            kind,
            oid: None,
            data,
            declared: None,
        }
    }
}

impl Forge {
    fn new() -> Forge {
        let dir = tempfile::tempdir().unwrap();
        let storage = json!({"storage_type": "local", "directory": dir.path().join("archive")});
        let config = json!({
            "backup_location": dir.path().join("spool"),
            // One chunk at a time, in the control object's order: a forged member extracted
            // by an earlier chunk is in place when a later one is written.
            "restore_process_count": 1,
            "backup_sites": {"main": {
                "nodes": [{"host": "127.0.0.1", "port": 9}],
                "object_storage": storage,
                "basebackup_interval_hours": null,
            }},
        });
        std::fs::write(dir.path().join("walhoard.json"), config.to_string()).unwrap();
        let cfg: ObjectStorageConfig = serde_json::from_value(storage).unwrap();
        let store = ObjectStore::open(&cfg, "main").unwrap();
        Forge { dir, store }
    }

    async fn put(&self, key: &str, data: Vec<u8>) {
        upload(
            &self.store,
            Upload::wal(
                key,
                Source::bytes(data),
                CompressionSettings::new(Algorithm::Zstd),
                None,
                HashAlgorithm::Sha1,
            ),
        )
        .await
        .unwrap();
    }

    /// Stores a `walhoard-bb-stream-v1` backup `name` made of `chunks`.
    async fn backup(
        &self,
        name: &str,
        chunks: Vec<Chunk>,
        tablespaces: BTreeMap<String, TablespaceMeta>,
    ) {
        let mut metas = Vec::new();
        for c in chunks {
            let hash = hex::encode(aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
                &c.data,
            ));
            metas.push(ChunkMeta {
                chunk_filename: format!("{name}/{}", c.file),
                input_size: c.declared.unwrap_or(c.data.len() as u64),
                result_size: 0,
                files: Vec::new(),
                kind: c.kind,
                tablespace_oid: c.oid,
                hash,
                server_compressed: false,
            });
            self.put(&format!("basebackup_chunk/{name}/{}", c.file), c.data)
                .await;
        }
        let meta = BackupMetadata {
            backup_start_time: "2026-01-01T00:00:00Z".into(),
            backup_start_wal_segment: "000000010000000000000002".into(),
            backup_end_time: "2026-01-01T00:00:01Z".into(),
            backup_end_wal_segment: "000000010000000000000002".into(),
            pgdata: None,
            pghoard_object: "basebackup".into(),
            pghoard_version: "forged".into(),
            tablespaces,
            host: "forger".into(),
            chunks: metas,
            format: FORMAT_STREAM.into(),
            start_lsn: "0/2000028".into(),
            end_lsn: "0/2000100".into(),
            start_timeline: 1,
            end_timeline: 1,
            pg_version: 150000,
            system_identifier: None,
            basebackup_mode: "basic".into(),
            active_backup_mode: "walreceiver".into(),
            wal_included: false,
            compression_algorithm: "zstd".into(),
            encryption_key_id: None,
            total_size_plain: 0,
            total_size_enc: 0,
            tablespace_map: String::new(),
            backup_type: Default::default(),
            incremental_parent: None,
        };
        let mut w = TarWriter::new(Vec::new());
        w.append_bytes(
            METADATA_MEMBER,
            0o600,
            0,
            &serde_json::to_vec(&meta).unwrap(),
        )
        .unwrap();
        self.put(&format!("basebackup/{name}"), w.finish().unwrap())
            .await;
    }

    /// `walhoard restore get-basebackup --basebackup name --target-dir target args…`.
    fn restore(&self, name: &str, target: &Path, args: &[&str]) -> Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_walhoard"))
            .args([
                "restore",
                "get-basebackup",
                "--site",
                "main",
                "--basebackup",
                name,
            ])
            .arg("--config")
            .arg(self.dir.path().join("walhoard.json"))
            .arg("--target-dir")
            .arg(target)
            .args(args)
            .output()
            .unwrap()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A base.tar with what makes a data directory, then whatever `extra` adds.
fn base_tar(extra: impl FnOnce(&mut TarWriter<Vec<u8>>)) -> Vec<u8> {
    let mut w = TarWriter::new(Vec::new());
    w.append_bytes("PG_VERSION", 0o600, 0, b"15\n").unwrap();
    w.append_bytes("global/pg_control", 0o600, 0, &[0u8; 8192])
        .unwrap();
    extra(&mut w);
    w.finish().unwrap()
}

fn symlink_member(w: &mut TarWriter<Vec<u8>>, path: &str, target: &Path) {
    w.append_entry(&Member {
        path: path.into(),
        kind: MemberKind::Symlink {
            target: target.display().to_string(),
        },
        mode: 0o777,
        mtime: 0,
    })
    .unwrap();
}

/// Names and contents of the files directly in `dir`.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect()
}

/// Regression (issue 14, item 3): a symlink member named like a file walhoard writes itself
/// made get-basebackup write the manifest through it, append the recovery settings to what it
/// pointed at, or create the signal file wherever it pointed. Each is refused naming the
/// member, nothing outside the target is created or modified, and the target is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_forged_symlink_members_write_nothing_outside() {
    let f = Forge::new();
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    let before = contents(outside.path());
    let work = tempfile::tempdir().unwrap();
    let mut n = 0;
    for member in [
        "backup_manifest",
        "postgresql.auto.conf",
        "standby.signal",
        "recovery.signal",
    ] {
        // To an existing file (overwritten or appended to) and to a new one (created).
        for to in [victim.clone(), outside.path().join(format!("new-{member}"))] {
            n += 1;
            let name = format!("2026-01-01_00-00_{n}");
            let tar = base_tar(|w| symlink_member(w, member, &to));
            f.backup(
                &name,
                vec![
                    Chunk::new("base.tar", ChunkKind::Data, tar),
                    Chunk::new(
                        "backup_manifest",
                        ChunkKind::Manifest,
                        b"forged manifest".to_vec(),
                    ),
                ],
                BTreeMap::new(),
            )
            .await;
            let target = work.path().join(&name);
            let primary = if member == "recovery.signal" {
                &["--restore-to-primary"][..]
            } else {
                &[][..]
            };
            let out = f.restore(&name, &target, primary);
            assert_eq!(
                contents(outside.path()),
                before,
                "{member} -> {}",
                to.display()
            );
            assert!(!out.status.success(), "{member} -> {}", to.display());
            assert!(
                stderr(&out).contains(&format!("tar member \"{member}\" is a symlink")),
                "{member}: {}",
                stderr(&out)
            );
            assert!(
                !target.exists(),
                "{member}: a failed restore removes its target"
            );
        }
    }
    // pg_tblspc/<oid> may be a link, but only for a tablespace the metadata lists (restore
    // relinks those): PostgreSQL would write through any other.
    let name = "2026-01-01_00-00_99";
    let tar = base_tar(|w| symlink_member(w, "pg_tblspc/16999", outside.path()));
    f.backup(
        name,
        vec![Chunk::new("base.tar", ChunkKind::Data, tar)],
        BTreeMap::new(),
    )
    .await;
    let target = work.path().join(name);
    let out = f.restore(name, &target, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("member pg_tblspc/16999 links to")
            && stderr(&out).contains("no tablespace with oid 16999"),
        "{}",
        stderr(&out)
    );
    assert_eq!(contents(outside.path()), before);
    assert!(!target.exists());
}

/// A backup with a tablespace `ts1` (oid 16400) whose directory the metadata gives as `path`.
async fn forged_with_tablespace(f: &Forge, name: &str, path: String) {
    let mut ts_tar = TarWriter::new(Vec::new());
    ts_tar
        .append_bytes("PG_15_202209061/5/16401", 0o600, 0, b"rows")
        .unwrap();
    let mut tablespaces = BTreeMap::new();
    tablespaces.insert("ts1".to_string(), TablespaceMeta { oid: 16400, path });
    let mut ts = Chunk::new("16400.tar", ChunkKind::Tablespace, ts_tar.finish().unwrap());
    ts.oid = Some(16400);
    f.backup(
        name,
        vec![
            Chunk::new("base.tar", ChunkKind::Data, base_tar(|_| {})),
            ts,
        ],
        tablespaces,
    )
    .await;
}

/// Regression (issue 14, item 9): with `--overwrite`, a tablespace path in the backup's
/// metadata pointing at an unrelated non-empty directory (or at the target's parent) got that
/// directory emptied. Only directories named on the command line are emptied; a directory the
/// metadata names must be empty, absolute, plain and apart from the others, or nothing at all
/// is changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_forged_tablespace_path_is_never_emptied() {
    let f = Forge::new();
    let work = tempfile::tempdir().unwrap();
    let victim = work.path().join("unrelated");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("precious"), b"keep").unwrap();
    let target = work.path().join("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("old"), b"old").unwrap();
    let forged = |name: &'static str, path: String| forged_with_tablespace(&f, name, path);
    let unchanged = |what: &str| {
        assert_eq!(
            std::fs::read(victim.join("precious")).unwrap(),
            b"keep",
            "{what}"
        );
        assert_eq!(std::fs::read(target.join("old")).unwrap(), b"old", "{what}");
    };

    forged("2026-01-01_00-00_1", victim.display().to_string()).await;
    let out = f.restore("2026-01-01_00-00_1", &target, &["--overwrite"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&victim.display().to_string()) && err.contains("--tablespace-dir"),
        "{err}"
    );
    unchanged("non-empty directory named by the metadata");

    // The target's parent: it contains the target (and the victim).
    forged("2026-01-01_00-00_2", work.path().display().to_string()).await;
    let out = f.restore("2026-01-01_00-00_2", &target, &["--overwrite"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("overlap"), "{}", stderr(&out));
    unchanged("the target's parent");

    // Not an absolute plain path.
    for (name, path) in [
        ("2026-01-01_00-00_3", format!("{}/x/..", victim.display())),
        ("2026-01-01_00-00_4", "relative/dir".to_string()),
    ] {
        forged(name, path.clone()).await;
        let out = f.restore(name, &target, &["--overwrite"]);
        assert!(!out.status.success(), "{path}");
        assert!(
            stderr(&out).contains("not an absolute path"),
            "{}",
            stderr(&out)
        );
        unchanged(&path);
    }

    // Named by the operator, the same directory is replaced.
    let ts_arg = format!("ts1={}", victim.display());
    let out = f.restore(
        "2026-01-01_00-00_1",
        &target,
        &["--overwrite", "--tablespace-dir", &ts_arg],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!victim.join("precious").exists());
    assert_eq!(
        std::fs::read(victim.join("PG_15_202209061/5/16401")).unwrap(),
        b"rows"
    );
    assert_eq!(
        std::fs::read_link(target.join("pg_tblspc/16400")).unwrap(),
        victim
    );
    assert!(target.join("PG_VERSION").exists() && !target.join("old").exists());
}

/// Regression (issue 14, item 15): a chunk whose plaintext is far larger than the control
/// object declares (a tiny zstd object of 64 MiB of zeros, declared as 1 MiB) was written in
/// full and refused only afterwards. It is cut at the declared size with an error naming the
/// object, and no directory is left that looks like a data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_forged_chunk_larger_than_declared_is_cut_off() {
    let f = Forge::new();
    let tar = base_tar(|w| {
        w.append_bytes("base/1/16384", 0o600, 0, &vec![0u8; 64 << 20])
            .unwrap();
    });
    let mut c = Chunk::new("base.tar", ChunkKind::Data, tar);
    c.declared = Some(1 << 20);
    let name = "2026-01-01_00-00_1";
    f.backup(name, vec![c], BTreeMap::new()).await;
    let stored = std::fs::metadata(
        f.dir
            .path()
            .join("archive/main/basebackup_chunk")
            .join(name)
            .join("base.tar"),
    )
    .unwrap()
    .len();
    assert!(
        stored < 1 << 20,
        "the forged object is small ({stored} bytes)"
    );
    let work = tempfile::tempdir().unwrap();
    for existing in [false, true] {
        let target: PathBuf = work.path().join(format!("t{existing}"));
        if existing {
            std::fs::create_dir(&target).unwrap();
        }
        let out = f.restore(name, &target, &[]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains(&format!("basebackup_chunk/{name}/base.tar"))
                && err.contains("more than the 1048576 bytes the control object declares"),
            "{err}"
        );
        if existing {
            assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
        } else {
            assert!(!target.exists());
        }
    }
}
