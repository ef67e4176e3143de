//! Basebackups into a local archive (zstd + encryption) and back: every object downloaded,
//! decrypted and decompressed, its size and SHA-1 checked against the control object, the tars
//! extracted with plain `tar`, pg_verifybackup run where a manifest exists, and PostgreSQL
//! started on the result; its tables must equal the primary's. Interrupted backups must leave
//! nothing listed, and the next backup must succeed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use walhoard::basebackup::{orphan_chunk_dirs, take_with, BackupContext, BackupInfo};
use walhoard::config::Config;
use walhoard::pipeline::encryption::{generate_key_pair, KeyRing, PrivateKey};
use walhoard::pipeline::transfer::download_file;
use walhoard::storage::ObjectStore;
use walhoard_basebackup::control::{BackupMetadata, ChunkKind, METADATA_MEMBER};
use walhoard_testkit::{give_to_server_user, tool_path, PgCluster};

use crate::common::sh;

/// A site archiving `pg` into a local directory, zstd-compressed and encrypted.
struct Site {
    _dir: tempfile::TempDir,
    config_path: PathBuf,
    config: Config,
    store: ObjectStore,
    ring: KeyRing,
    /// The site's public key (PEM), to store an object as the site would.
    public: String,
}

fn site(pg: &PgCluster, basebackup_mode: &str, active_backup_mode: &str) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let (public, private) = generate_key_pair(2048).unwrap();
    let json = serde_json::json!({
        "backup_location": dir.path().join("state"),
        "compression": {"algorithm": "zstd"},
        "backup_sites": {"s1": {
            "active_backup_mode": active_backup_mode,
            "basebackup_mode": basebackup_mode,
            "basebackup_chunk_size": 1048576,
            "basebackup_threads": 2,
            "basebackup_chunks_in_progress": 3,
            "nodes": [{"host": pg.socket_dir(), "port": pg.port, "user": "postgres", "dbname": "postgres"}],
            "pg_data_directory": pg.data_dir(),
            "object_storage": {"storage_type": "local", "directory": dir.path().join("archive")},
            "encryption_key_id": "k1",
            "encryption_keys": {"k1": {"public": public, "private": private}},
        }},
    });
    let config_path = dir.path().join("walhoard.json");
    std::fs::write(&config_path, json.to_string()).unwrap();
    let config = Config::load(&config_path).unwrap();
    let store = ObjectStore::open(
        config.backup_sites["s1"].object_storage.as_ref().unwrap(),
        "s1",
    )
    .unwrap();
    let mut ring = KeyRing::default();
    ring.insert("k1", PrivateKey::from_pem(&private).unwrap());
    Site {
        _dir: dir,
        config_path,
        config,
        store,
        ring,
        public,
    }
}

/// Tables in the default tablespace and in `ts1`, big enough for several 1 MiB chunks.
fn load_data(pg: &PgCluster) -> PathBuf {
    let ts_dir = crate::common::create_tablespace(pg, "ts1");
    pg.psql("create table main_t as select g, md5(g::text) as h from generate_series(1, 100000) g")
        .unwrap();
    pg.psql("create table ts_t tablespace ts1 as select g, repeat(md5(g::text), 3) as h from generate_series(1, 50000) g")
        .unwrap();
    pg.psql("create unlogged table scratch as select g from generate_series(1, 1000) g")
        .unwrap();
    ts_dir
}

const CHECKSUM: &str = "select (select md5(string_agg(g::text || h, ',' order by g)) from main_t) \
     || ' ' || (select md5(string_agg(g::text || h, ',' order by g)) from ts_t)";

/// A cluster with a table `t` of `rows` rows.
fn cluster_with_rows(rows: u32) -> PgCluster {
    let pg = PgCluster::start().unwrap();
    let sql = format!("create table t as select g, md5(g::text) from generate_series(1, {rows}) g");
    pg.psql(&sql).unwrap();
    pg
}

/// A cluster that keeps enough WAL for a backup's recovery to read it from pg_wal.
fn keeping_cluster() -> PgCluster {
    let b = PgCluster::builder().setting("wal_keep_size", "'256MB'");
    b.start().unwrap()
}

/// The restored cluster holds [`load_data`]'s tables as they were (`want`, their
/// [`CHECKSUM`]) and its unlogged table exists, empty (only its init fork was backed up).
fn assert_restored(restored: &PgCluster, want: &str) {
    assert_eq!(restored.psql(CHECKSUM).unwrap(), want);
    let scratch = restored.psql("select count(*) from scratch").unwrap();
    assert_eq!(scratch.trim(), "0");
}

fn sha1_of(path: &Path) -> String {
    sh(&format!("sha1sum {}", path.display()))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Downloads the backup: control tar and every chunk, each checked against the metadata.
async fn fetch(site: &Site, name: &str, work: &Path) -> (BackupMetadata, PathBuf, Vec<PathBuf>) {
    std::fs::create_dir_all(work).unwrap();
    let control = work.join("control.tar");
    let objmeta = download_file(
        &site.store,
        &format!("basebackup/{name}"),
        &control,
        &site.ring,
    )
    .await
    .unwrap()
    .to_map();
    let json = sh(&format!("tar -xOf {} {METADATA_MEMBER}", control.display()));
    let meta: BackupMetadata = serde_json::from_str(&json).unwrap();
    assert_eq!(objmeta["format"], meta.format);
    assert_eq!(objmeta["start-wal-segment"], meta.backup_start_wal_segment);
    assert_eq!(objmeta["end-wal-segment"], meta.backup_end_wal_segment);
    assert_eq!(objmeta["encryption-key-id"], "k1");
    assert_eq!(objmeta["compression-algorithm"], "zstd");
    assert_eq!(meta.encryption_key_id.as_deref(), Some("k1"));
    let mut files = Vec::new();
    for (i, c) in meta.chunks.iter().enumerate() {
        let key = format!("basebackup_chunk/{}", c.chunk_filename);
        let stored = site.store.stat(&key).await.unwrap().expect("chunk stored");
        assert_eq!(stored.size, c.result_size, "{key}");
        let out = work.join(format!("chunk{i}"));
        download_file(&site.store, &key, &out, &site.ring)
            .await
            .unwrap();
        assert_eq!(
            std::fs::metadata(&out).unwrap().len(),
            c.input_size,
            "{key}"
        );
        assert_eq!(sha1_of(&out), c.hash, "{key}");
        files.push(out);
    }
    (meta, control, files)
}

/// Extracts a local-tar backup (chunks, then the control tar) into `staging` and links the
/// tablespaces from there; returns the data directory, handed to the server user.
fn extract_local_tar(
    meta: &BackupMetadata,
    control: &Path,
    chunks: &[PathBuf],
    staging: &Path,
) -> PathBuf {
    std::fs::create_dir_all(staging).unwrap();
    for c in chunks.iter().chain([&control.to_path_buf()]) {
        sh(&format!("tar -xf {} -C {}", c.display(), staging.display()));
    }
    let data = staging.join("pgdata");
    for (name, ts) in &meta.tablespaces {
        std::os::unix::fs::symlink(
            staging.join("tablespaces").join(name),
            data.join("pg_tblspc").join(ts.oid.to_string()),
        )
        .unwrap();
    }
    give_to_server_user(staging).unwrap();
    data
}

async fn listed(store: &ObjectStore) -> Vec<String> {
    crate::common::keys(store, "basebackup").await
}

/// Takes a basebackup of site `s1`, which is then the only one listed.
async fn take_the_only_backup(site: &Site) -> BackupInfo {
    let ctx = BackupContext::new(&site.config, "s1").await.unwrap();
    let info = take_with(ctx).await.unwrap();
    let want = [format!("basebackup/{}", info.name)];
    assert_eq!(listed(&site.store).await, want);
    info
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basebackup_basic_standalone_with_tablespace_restores() {
    let pg = keeping_cluster();
    let ts_dir = load_data(&pg);
    let ts_oid = crate::common::query(&pg, "select oid from pg_tablespace where spcname = 'ts1'");
    let want = pg.psql(CHECKSUM).unwrap();
    let site = site(&pg, "basic", "standalone_hot_backup");

    // Through the command line, as an operator would.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_walhoard"));
    cmd.args(["basebackup", "--site", "s1", "--config"])
        .arg(&site.config_path);
    let out = crate::common::output_ok(&mut cmd, "walhoard basebackup");
    let name = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(listed(&site.store).await, [format!("basebackup/{name}")]);

    let work = tempfile::tempdir().unwrap();
    let (meta, _control, chunks) = fetch(&site, &name, &work.path().join("dl")).await;
    assert_eq!(meta.format, "walhoard-bb-stream-v1");
    assert!(meta.wal_included);
    assert_eq!(meta.pg_version / 10000, pg.major);
    assert_eq!(meta.tablespaces[&ts_oid].path, ts_dir.display().to_string());
    // The server sends tablespaces first, base.tar, then the manifest.
    let kinds: Vec<ChunkKind> = meta.chunks.iter().map(|c| c.kind).collect();
    assert_eq!(
        kinds,
        [ChunkKind::Tablespace, ChunkKind::Data, ChunkKind::Manifest]
    );
    assert_eq!(
        meta.chunks[0].tablespace_oid.map(|o| o.to_string()),
        Some(ts_oid.clone())
    );
    let (ts_chunk, base_chunk, manifest) = (&chunks[0], &chunks[1], &chunks[2]);
    assert!(meta.end_lsn != meta.start_lsn);
    assert!(meta.total_size_enc < meta.total_size_plain);

    // Plain tar extraction, the tablespace into a new directory.
    let data = work.path().join("data");
    let ts_new = work.path().join("ts1");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&ts_new).unwrap();
    sh(&format!(
        "tar -xf {} -C {}",
        base_chunk.display(),
        data.display()
    ));
    sh(&format!(
        "tar -xf {} -C {}",
        ts_chunk.display(),
        ts_new.display()
    ));
    std::fs::copy(manifest, data.join("backup_manifest")).unwrap();
    let link = data.join("pg_tblspc").join(&ts_oid);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&ts_new, &link).unwrap();
    let verify = tool_path("pg_verifybackup").unwrap();
    // Debian's 15 tool reads only its own major's WAL and manifest version; other majors'
    // packages bring their own.
    if pg.major == 15 || !verify.starts_with(walhoard_testkit::DEBIAN_PG15_BIN) {
        // WAL included: pg_verifybackup also parses it from start to end.
        let ok = sh(&format!("{} {}", verify.display(), data.display()));
        assert!(ok.contains("successfully verified"), "{ok}");
    }
    // The links are in place; tablespace_map would point at the primary's directory.
    std::fs::remove_file(data.join("tablespace_map")).unwrap();
    give_to_server_user(&ts_new).unwrap();
    let restored = PgCluster::builder().start_on(&data).unwrap();
    assert_restored(&restored, &want);
    let loc = restored
        .psql("select pg_tablespace_location(oid) from pg_tablespace where spcname = 'ts1'")
        .unwrap();
    assert_eq!(loc.trim(), ts_new.display().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basebackup_local_tar_with_tablespace_restores_from_wal() {
    let pg = keeping_cluster();
    load_data(&pg);
    let site = site(&pg, "local-tar", "walreceiver");
    let ctx = BackupContext::new(&site.config, "s1").await.unwrap();
    // Writes while the data directory is read.
    let writer_port = pg.port;
    let writer_sock = pg.socket_dir();
    let writer = std::thread::spawn(move || {
        for i in 0..20 {
            let _ = std::process::Command::new(tool_path("psql").unwrap())
                .args(["-X", "-q", "-h"])
                .arg(&writer_sock)
                .args([
                    "-p",
                    &writer_port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-c",
                ])
                .arg(format!(
                    "insert into main_t select g, 'w{i}' from generate_series({}, {}) g",
                    200000 + i * 1000,
                    200000 + i * 1000 + 999
                ))
                .output();
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let info = take_with(ctx).await.unwrap();
    writer.join().unwrap();
    let want = pg.psql(CHECKSUM).unwrap();
    assert_eq!(
        listed(&site.store).await,
        [format!("basebackup/{}", info.name)]
    );
    let meta = &info.metadata;
    assert_eq!(meta.format, "pghoard-bb-v2");
    assert!(!meta.wal_included);
    assert!(meta.chunks.len() >= 5, "{} chunks", meta.chunks.len());
    assert!(meta.tablespace_map.contains(&meta.tablespaces["ts1"].path));

    let work = tempfile::tempdir().unwrap();
    let (got, control, chunks) = fetch(&site, &info.name, &work.path().join("dl")).await;
    assert_eq!(&got, meta);
    // pghoard's layout: pgdata/… and tablespaces/<name>/… in every chunk, control files last.
    let data = extract_local_tar(meta, &control, &chunks, &work.path().join("restore"));
    for excluded in [
        "postmaster.pid",
        "postmaster.opts",
        "pg_wal/000000010000000000000001",
    ] {
        assert!(!data.join(excluded).exists(), "{excluded} was backed up");
    }
    assert!(data.join("pg_wal/archive_status").is_dir());
    assert!(data.join("backup_label").is_file() && data.join("global/pg_control").is_file());
    // The WAL comes from the primary's pg_wal, as from an archive.
    let builder = PgCluster::builder()
        .setting(
            "restore_command",
            &format!("'cp {}/%f %p'", pg.wal_dir().display()),
        )
        .data_file("recovery.signal", b"", 0o600);
    let restored = crate::restore::start_promoted_with(builder, &data);
    assert_restored(&restored, &want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basebackup_dropped_connection_lists_nothing_and_next_succeeds() {
    let pg = cluster_with_rows(200000);
    let site = site(&pg, "basic", "walreceiver");
    let mut ctx = BackupContext::new(&site.config, "s1").await.unwrap();
    // Slow enough (1 MB/s) that the backup is surely in the middle of base.tar when cut.
    ctx.max_rate_kbps = Some(1024);
    let name = ctx.name.clone();
    let task = tokio::spawn(take_with(ctx));
    let sql = "select pid from pg_stat_progress_basebackup \
               where phase = 'streaming database files' and backup_streamed > 2000000";
    let mut pid = String::new();
    for _ in 0..600 {
        // psql blocks this worker briefly; the backup runs on the others.
        pid = pg.psql(sql).unwrap().trim().to_string();
        if !pid.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!pid.is_empty(), "the backup never got 2 MB into base.tar");
    // One chunk is being stored right now.
    assert!(crate::common::keys(&site.store, "basebackup_chunk")
        .await
        .is_empty());
    pg.psql(&format!("select pg_terminate_backend({pid})"))
        .unwrap();
    let err = task.await.unwrap().unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&name) && msg.contains("BASE_BACKUP"), "{msg}");
    assert!(listed(&site.store).await.is_empty());
    assert!(crate::common::keys(&site.store, "basebackup_chunk")
        .await
        .is_empty());

    // The failed backup cleaned up after itself, so its name may be reused.
    take_the_only_backup(&site).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basebackup_cancelled_local_tar_lists_nothing_and_next_succeeds() {
    let pg = cluster_with_rows(400000);
    let site = site(&pg, "local-tar", "walreceiver");
    let ctx = BackupContext::new(&site.config, "s1").await.unwrap();
    let name = ctx.name.clone();
    let task = tokio::spawn(take_with(ctx));
    let store = site.store.clone();
    let mut seen = false;
    for _ in 0..2000 {
        if !store.list("basebackup_chunk").await.unwrap().is_empty() {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(seen, "no chunk was ever stored");
    // Cancel the backup as a shutting-down daemon would: drop its future.
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert!(listed(&site.store).await.is_empty());
    assert_eq!(
        orphan_chunk_dirs(&site.store).await.unwrap(),
        std::slice::from_ref(&name)
    );
    // The server ended the aborted backup with its session: a new one starts at once.
    let info = take_the_only_backup(&site).await;
    assert_ne!(info.name, name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basebackup_local_tar_standalone_carries_its_wal() {
    let pg = PgCluster::start().unwrap();
    load_data(&pg);
    let want = pg.psql(CHECKSUM).unwrap();
    let site = site(&pg, "local-tar", "standalone_hot_backup");
    let ctx = BackupContext::new(&site.config, "s1").await.unwrap();
    let info = take_with(ctx).await.unwrap();
    assert!(info.metadata.wal_included);
    // Nothing of the backup's temporary slot is left on the server.
    assert_eq!(
        pg.psql("select count(*) from pg_replication_slots")
            .unwrap()
            .trim(),
        "0"
    );
    // Writes after the backup are not in it: the restored cluster stops at the backup's end.
    pg.psql("insert into main_t values (-1, 'after')").unwrap();

    let work = tempfile::tempdir().unwrap();
    let (meta, control, chunks) = fetch(&site, &info.name, &work.path().join("dl")).await;
    let wal_chunk = meta.chunks.last().unwrap();
    assert!(
        wal_chunk
            .files
            .contains(&format!("pgdata/pg_wal/{}", meta.backup_end_wal_segment)),
        "{:?}",
        wal_chunk.files
    );
    let data = extract_local_tar(&meta, &control, &chunks, &work.path().join("restore"));
    // No restore_command: only the WAL inside the backup.
    let restored = PgCluster::builder().start_on(&data).unwrap();
    assert_eq!(restored.psql(CHECKSUM).unwrap(), want);
}

/// A chunk replaced by one that decrypts, decompresses and parses as well and has the same
/// size, but whose plain bytes differ from what the control object records (one byte of
/// `PG_VERSION`): only the chunk's SHA-1 tells, and the restore must refuse it, naming the
/// chunk, and leave nothing. (The SHA-1 is computed on a thread of its own, beside the
/// extraction: this fails if that hash stopped covering the bytes that were extracted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restore_refuses_a_chunk_whose_sha1_differs_from_the_control_object() {
    use walhoard::pipeline::compression::{Algorithm, CompressionSettings};
    use walhoard::pipeline::encryption::PublicKey;
    use walhoard::pipeline::hash::HashAlgorithm;
    use walhoard::pipeline::transfer::{
        upload, Hashing, ObjectKind, Source, Upload, UploadEncryption,
    };

    let pg = cluster_with_rows(1000);
    let site = site(&pg, "basic", "standalone_hot_backup");
    let info = take_the_only_backup(&site).await;
    let work = tempfile::tempdir().unwrap();
    let (meta, _control, chunks) = fetch(&site, &info.name, &work.path().join("dl")).await;
    let i = meta
        .chunks
        .iter()
        .position(|c| c.kind == ChunkKind::Data)
        .unwrap();
    let key = format!("basebackup_chunk/{}", meta.chunks[i].chunk_filename);
    let mut tar = std::fs::read(&chunks[i]).unwrap();
    // The header block of the member PG_VERSION; its body ("15\n", ...) follows it.
    let header = (0..tar.len())
        .step_by(512)
        .find(|&at| tar[at..].starts_with(b"PG_VERSION\0"))
        .expect("PG_VERSION in base.tar");
    tar[header + 512] = b'9';
    let stored = site.store.metadata(&key).await.unwrap();
    let original = walhoard::storage::meta::ObjectMeta::parse(&key, &stored).unwrap();
    let up = upload(
        &site.store,
        Upload {
            kind: ObjectKind::BasebackupChunk,
            hashing: Hashing::Sha1Returned,
            metadata: original,
            ..Upload::wal(
                &key,
                Source::bytes(tar),
                CompressionSettings::new(Algorithm::Zstd),
                Some(UploadEncryption {
                    key_id: "k1".into(),
                    public: PublicKey::from_pem(&site.public).unwrap(),
                }),
                HashAlgorithm::Sha1,
            )
        },
    )
    .await
    .unwrap();
    assert_eq!(up.plain_size, meta.chunks[i].input_size);
    assert_ne!(up.hash, meta.chunks[i].hash);

    let target = work.path().join("restored");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_walhoard"));
    cmd.args(["restore", "get-basebackup", "--site", "s1", "--basebackup"])
        .arg(&info.name)
        .arg("--target-dir")
        .arg(&target)
        .arg("--config")
        .arg(&site.config_path);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "restored: {err}");
    assert!(
        err.contains(&key) && err.contains(&format!("SHA-1 {}", up.hash)),
        "{err}"
    );
    assert!(
        !target.exists(),
        "the failed restore left {}",
        target.display()
    );
}
