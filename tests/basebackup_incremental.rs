//! `basebackup_mode: "incremental"` against a real PostgreSQL 17+ (`WALHOARD_PG_VERSION=17`;
//! tools/test.sh runs `basebackup_` on every major): a full backup, incremental ones whose
//! stored tars hold PostgreSQL's `INCREMENTAL.*` files and are a fraction of the full, each
//! naming its parent; a full one again when the chain is at `basebackup_incremental_max_chain`
//! or when the server cannot take an incremental one (summarize_wal off, WAL summaries
//! missing); retention keeping whole chains; the listing and `check` saying so. On a server
//! before 17 the mode is refused with the key path.

use std::path::{Path, PathBuf};
use std::process::Command;

use walhoard::basebackup::{take_with, BackupContext, BackupInfo};
use walhoard::config::Config;
use walhoard::pipeline::encryption::{generate_key_pair, KeyRing, PrivateKey};
use walhoard::pipeline::transfer::download_file;
use walhoard::storage::ObjectStore;
use walhoard_basebackup::control::{BackupType, ChunkKind};
use walhoard_testkit::PgCluster;

use crate::common::sh;

struct Site {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    store: ObjectStore,
    ring: KeyRing,
}

/// Site `main` of `pg` in incremental mode, zstd-compressed and encrypted.
fn site(pg: &PgCluster, max_chain: u32) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let (public, private) = generate_key_pair(2048).unwrap();
    let json = serde_json::json!({
        "backup_location": dir.path().join("state"),
        "compression": {"algorithm": "zstd"},
        "backup_sites": {"main": {
            "basebackup_mode": "incremental",
            "basebackup_incremental_max_chain": max_chain,
            "basebackup_count": 1,
            "nodes": [{"host": pg.socket_dir(), "port": pg.port, "user": "postgres", "dbname": "postgres"}],
            "object_storage": {"storage_type": "local", "directory": dir.path().join("archive")},
            "encryption_key_id": "k1",
            "encryption_keys": {"k1": {"public": public, "private": private}},
        }},
    });
    let config_path = dir.path().join("walhoard.json");
    std::fs::write(&config_path, json.to_string()).unwrap();
    let config = Config::load(&config_path).unwrap();
    let store = ObjectStore::open(
        config.backup_sites["main"].object_storage.as_ref().unwrap(),
        "main",
    )
    .unwrap();
    let mut ring = KeyRing::default();
    ring.insert("k1", PrivateKey::from_pem(&private).unwrap());
    Site {
        dir,
        config_path,
        store,
        ring,
    }
}

async fn take(site: &Site) -> anyhow::Result<BackupInfo> {
    let config = Config::load(&site.config_path).unwrap();
    take_with(BackupContext::new(&config, "main").await?).await
}

/// The member names of the backup's `base.tar`, downloaded and decrypted.
async fn base_tar_members(site: &Site, b: &BackupInfo, work: &Path) -> Vec<String> {
    let c = b
        .metadata
        .chunks
        .iter()
        .find(|c| c.kind == ChunkKind::Data)
        .expect("a base.tar chunk");
    let out = work.join(format!("{}.tar", b.name));
    download_file(
        &site.store,
        &format!("basebackup_chunk/{}", c.chunk_filename),
        &out,
        &site.ring,
    )
    .await
    .unwrap();
    sh(&format!("tar -tf {}", out.display()))
        .lines()
        .map(str::to_string)
        .collect()
}

fn assert_full(b: &BackupInfo) {
    assert_eq!(b.metadata.backup_type, BackupType::Full, "{}", b.name);
    assert_eq!(b.metadata.incremental_parent, None, "{}", b.name);
    assert_eq!(b.metadata.basebackup_mode, "incremental");
}

fn assert_incremental_on(b: &BackupInfo, parent: &BackupInfo) {
    assert_eq!(
        b.metadata.backup_type,
        BackupType::Incremental,
        "{}",
        b.name
    );
    assert_eq!(
        b.metadata.incremental_parent.as_deref(),
        Some(parent.name.as_str()),
        "{}",
        b.name
    );
}

/// Changes a few hundred rows at the start of `t` (a handful of its blocks).
fn touch_some_rows(pg: &PgCluster, round: u32) {
    pg.psql(&format!(
        "update t set h = md5(h || '{round}') where g <= 500"
    ))
    .unwrap();
}

fn skip_before_17(pg: &PgCluster, test: &str) -> bool {
    if pg.major < 17 {
        eprintln!(
            "{test}: skipped, PostgreSQL {} has no incremental backups (run with WALHOARD_PG_VERSION=17)",
            pg.major
        );
        return true;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basebackup_incremental_chain_retention_and_listing() {
    let pg = PgCluster::builder().setting("summarize_wal", "on").start();
    let pg = match pg {
        Ok(pg) => pg,
        // PostgreSQL before 17 does not know the setting: the mode must be refused there.
        Err(_) => {
            let pg = PgCluster::start().unwrap();
            assert!(
                pg.major < 17,
                "a 17+ cluster with summarize_wal=on must start"
            );
            let site = site(&pg, 6);
            let e = format!("{:#}", take(&site).await.unwrap_err());
            assert!(
                e.contains("backup_sites.main.basebackup_mode") && e.contains("17"),
                "{e}"
            );
            assert!(crate::common::keys(&site.store, "basebackup")
                .await
                .is_empty());
            skip_before_17(&pg, "basebackup_incremental_chain_retention_and_listing");
            return;
        }
    };
    pg.psql("create table t as select g, md5(g::text) as h from generate_series(1, 200000) g")
        .unwrap();
    // Hint bits set now: with data checksums (initdb's default from 18) setting them later
    // WAL-logs every block, which the next incremental backup would then carry.
    pg.psql("vacuum freeze t").unwrap();
    let site = site(&pg, 2);
    let work = site.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();

    // The first through the command line, as an operator would.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walhoard"));
    cmd.args(["basebackup", "--site", "main", "--config"])
        .arg(&site.config_path);
    let out = crate::common::output_ok(&mut cmd, "walhoard basebackup");
    let name = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let meta = walhoard::basebackup::incremental::read_metadata(&site.store, &site.ring, &name)
        .await
        .unwrap();
    let full = BackupInfo {
        name,
        metadata: meta,
        elapsed: std::time::Duration::ZERO,
    };
    assert_full(&full);
    touch_some_rows(&pg, 1);
    let inc1 = take(&site).await.unwrap();
    assert_incremental_on(&inc1, &full);
    touch_some_rows(&pg, 2);
    let inc2 = take(&site).await.unwrap();
    assert_incremental_on(&inc2, &inc1);

    // The full backup holds t's file whole; the incremental ones hold INCREMENTAL.* files,
    // and are a small part of the full one.
    let full_members = base_tar_members(&site, &full, &work).await;
    assert!(!full_members.iter().any(|m| m.contains("INCREMENTAL.")));
    for inc in [&inc1, &inc2] {
        let members = base_tar_members(&site, inc, &work).await;
        assert!(
            members.iter().any(|m| m.contains("/INCREMENTAL.")),
            "{}: no INCREMENTAL.* member in {members:?}",
            inc.name
        );
        assert!(
            inc.metadata.total_size_plain * 4 < full.metadata.total_size_plain,
            "{}: {} plain bytes, the full backup {}",
            inc.name,
            inc.metadata.total_size_plain,
            full.metadata.total_size_plain
        );
        assert!(inc
            .metadata
            .chunks
            .iter()
            .any(|c| c.kind == ChunkKind::Manifest));
    }

    // basebackup_incremental_max_chain 2: the next is full, and the one after is on it.
    let full2 = take(&site).await.unwrap();
    assert_full(&full2);
    touch_some_rows(&pg, 3);
    let inc3 = take(&site).await.unwrap();
    assert_incremental_on(&inc3, &full2);

    // list-basebackups (JSON) says each backup's type and parent.
    let list = crate::common::list_basebackups(&site.config_path);
    let row = |name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed in {list}"))
            .clone()
    };
    assert_eq!(row(&full.name)["backup_type"], "full");
    assert!(row(&full.name).get("incremental_parent").is_none());
    assert_eq!(row(&inc2.name)["backup_type"], "incremental");
    assert_eq!(row(&inc2.name)["incremental_parent"], inc1.name.as_str());
    // ... and so does the text listing.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walhoard"));
    cmd.args(["restore", "list-basebackups", "--site", "main", "--config"])
        .arg(&site.config_path);
    let text = String::from_utf8(crate::common::output_ok(&mut cmd, "list").stdout).unwrap();
    assert!(
        text.contains(&format!("incremental on {}", inc1.name)),
        "{text}"
    );

    // Retention at basebackup_count 1: the first chain goes whole; full2 stays although
    // it is older than the newest backup, because inc3 needs it.
    let config = Config::load(&site.config_path).unwrap();
    let (deleted, _) = walhoard::daemon::basebackups::apply_retention(
        &site.store,
        "main",
        &config.backup_sites["main"],
    )
    .await
    .unwrap();
    let mut want = vec![full.name.clone(), inc1.name.clone(), inc2.name.clone()];
    want.sort();
    let mut deleted = deleted;
    deleted.sort();
    assert_eq!(deleted, want);
    let left = crate::common::keys(&site.store, "basebackup").await;
    assert_eq!(
        left,
        [
            format!("basebackup/{}", full2.name),
            format!("basebackup/{}", inc3.name)
        ]
    );
    assert!(
        crate::common::keys(&site.store, &format!("basebackup_chunk/{}", inc1.name))
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basebackup_incremental_without_wal_summaries_is_full() {
    let mut pg = PgCluster::start().unwrap();
    if skip_before_17(&pg, "basebackup_incremental_without_wal_summaries_is_full") {
        return;
    }
    pg.psql("create table t as select g, md5(g::text) as h from generate_series(1, 20000) g")
        .unwrap();
    let site = site(&pg, 6);

    // `check` says what summarize_wal off means for the site.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walhoard"));
    cmd.args(["check", "--site", "main", "--json", "--config"])
        .arg(&site.config_path);
    let out = cmd.output().unwrap();
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check --json: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let summarize = results
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["check"] == "summarize_wal")
        .unwrap_or_else(|| panic!("no summarize_wal check in {results}"));
    assert_eq!(summarize["ok"], false, "{summarize}");
    assert!(
        summarize["detail"]
            .as_str()
            .unwrap()
            .contains("full backups"),
        "{summarize}"
    );
    assert!(!out.status.success());

    // summarize_wal off: every backup is full.
    let b1 = take(&site).await.unwrap();
    assert_full(&b1);
    touch_some_rows(&pg, 1);
    let b2 = take(&site).await.unwrap();
    assert_full(&b2);

    // Turned on now: the server has no summaries of b2's WAL, refuses an incremental one,
    // and the backup is full again; the next one is incremental on it.
    pg.restart_with(Some(("summarize_wal", "on"))).unwrap();
    touch_some_rows(&pg, 2);
    let b3 = take(&site).await.unwrap();
    assert_full(&b3);
    let log = pg.log();
    assert!(
        log.contains("WAL summaries are required"),
        "the server refused the incremental backup: {log}"
    );
    touch_some_rows(&pg, 3);
    let b4 = take(&site).await.unwrap();
    assert_incremental_on(&b4, &b3);

    // The newest backup's manifest tampered with (its SHA-1 no longer matches): full.
    let manifest = b4
        .metadata
        .chunks
        .iter()
        .find(|c| c.kind == ChunkKind::Manifest)
        .unwrap();
    let key = format!("basebackup_chunk/{}", manifest.chunk_filename);
    let path = site.dir.path().join("archive").join("main").join(&key);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let b5 = take(&site).await.unwrap();
    assert_full(&b5);
    // A chain whose middle backup is gone (b6 ← b7, b6's control object deleted): full.
    let b6 = take(&site).await.unwrap();
    assert_incremental_on(&b6, &b5);
    let b7 = take(&site).await.unwrap();
    assert_incremental_on(&b7, &b6);
    site.store
        .delete(&format!("basebackup/{}", b6.name))
        .await
        .unwrap();
    let b8 = take(&site).await.unwrap();
    assert_full(&b8);
    // verify names the broken chain of b7 (and fails).
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walhoard"));
    cmd.args([
        "verify",
        "--site",
        "main",
        "--json",
        "--basebackup",
        &b7.name,
        "--config",
    ])
    .arg(&site.config_path);
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify --json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let text = v.to_string();
    assert!(
        text.contains(&format!(
            "incremental on {}, which is not in the archive",
            b6.name
        )),
        "{v:#}"
    );
}
