//! Rolling back to pghoard: what walhoard writes unencrypted in local-tar mode is what
//! pghoard's restore reads (docs/formats.md, "What pghoard can restore").
//!
//! `rollback_pghoard_restores_walhoards_local_tar_backup` runs the real pghoard: by default the
//! newest release on PyPI (2.1.0, installed by tools/install-pghoard.sh), or the venv
//! `WALHOARD_PGHOARD_VENV` names (`tools/pghoard-venv.sh <pghoard checkout> <venv>` builds one
//! from a source checkout, e.g. 2.7.0, which is on GitHub only).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use walhoard_testkit::PgCluster;

use crate::daemon_support::DaemonDir;
use crate::restore::{insert, start_promoted, stderr, CHECKSUM};

/// A primary with rows in a user tablespace and the main one, and an unencrypted local-tar
/// standalone backup of it (WAL inside, so it restores without an archive).
struct Backup {
    pg: PgCluster,
    d: DaemonDir,
    name: String,
    want: String,
}

fn local_tar_backup() -> Backup {
    let pg = PgCluster::builder()
        .setting("wal_keep_size", "'1GB'")
        .start()
        .unwrap();
    crate::common::create_tablespace(&pg, "ts1");
    pg.psql("create table r (id bigserial primary key, batch text, v text) tablespace ts1")
        .unwrap();
    insert(&pg, "ts", 20_000);
    pg.psql("create table plain as select g, md5(g::text) from generate_series(1, 5000) g")
        .unwrap();
    let d = DaemonDir::new();
    d.write_config(
        &pg,
        d.local_storage(),
        json!({
            "basebackup_mode": "local-tar",
            "active_backup_mode": "standalone_hot_backup",
            "pg_data_directory": pg.data_dir(),
            "basebackup_chunk_size": 1048576,
            "encryption_key_id": null,
        }),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_walhoard"))
        .args(["basebackup", "--site", "main", "--config"])
        .arg(d.config_path())
        .output()
        .unwrap();
    assert!(out.status.success(), "basebackup: {}", stderr(&out));
    let name = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let want = pg.psql(CHECKSUM).unwrap();
    Backup { pg, d, name, want }
}

/// pghoard's restore extracts a chunk with `--transform s,^pgdata/,,` only when the chunk's
/// own metadata says `format: pghoard-bb-v2` (`_build_tar_args` in pghoard/restore.py);
/// walhoard's chunks lacked it, and pghoard restored them into `<target>/pgdata/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_local_tar_chunks_carry_pghoard_bb_v2_format() {
    let b = local_tar_backup();
    let store = b.d.store(&b.d.local_storage());
    let chunks = store
        .list(&format!("basebackup_chunk/{}", b.name))
        .await
        .unwrap();
    // Data chunks, the tablespace's and the WAL chunk: more than one.
    assert!(chunks.len() > 2, "{chunks:?}");
    for c in &chunks {
        let m = store.metadata(&c.key).await.unwrap();
        assert_eq!(
            m.get("format").map(String::as_str),
            Some("pghoard-bb-v2"),
            "{}: {m:?}",
            c.key
        );
        assert_eq!(m.get("backup-name"), Some(&b.name), "{}", c.key);
        assert!(!m.contains_key("encryption-key-id"), "{}: {m:?}", c.key);
    }
    let control = store
        .metadata(&format!("basebackup/{}", b.name))
        .await
        .unwrap();
    assert_eq!(
        control.get("format").map(String::as_str),
        Some("pghoard-bb-v2")
    );
}

/// A venv with the real pghoard: the one `WALHOARD_PGHOARD_VENV` names (e.g. a newer pghoard
/// from source, tools/pghoard-venv.sh), else pghoard from PyPI installed by
/// tools/install-pghoard.sh. A failed install fails the test; it never skips.
fn pghoard_venv() -> PathBuf {
    let venv = match std::env::var_os("WALHOARD_PGHOARD_VENV") {
        Some(v) => PathBuf::from(v),
        None => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/install-pghoard.sh");
            let out = Command::new(&script)
                .output()
                .expect("run tools/install-pghoard.sh");
            assert!(
                out.status.success(),
                "tools/install-pghoard.sh failed: {}",
                stderr(&out)
            );
            PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
        }
    };
    assert!(
        venv.join("bin/pghoard_restore").is_file(),
        "{}: no bin/pghoard_restore",
        venv.display()
    );
    venv
}

/// The real pghoard_restore brings back walhoard's unencrypted local-tar backup, tablespace
/// included, and PostgreSQL started on it holds the primary's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_pghoard_restores_walhoards_local_tar_backup() {
    let venv = pghoard_venv();
    let mut b = local_tar_backup();
    b.pg.stop().unwrap();
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("data");
    let new_ts = work.path().join("ts-new");
    std::fs::create_dir(&new_ts).unwrap();
    // pghoard's configuration for the same archive: the object storage is all it reads.
    let cfg = json!({
        "backup_location": work.path().join("pghoard-state"),
        "backup_sites": {"main": {
            "object_storage": b.d.local_storage(),
            "pg_data_directory": target,
        }},
    });
    let cfg_path = work.path().join("pghoard.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    // pghoard_restore runs tar as `pghoard_gnutaremu`, from the venv's bin.
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // pghoard before 2.2 (the release on PyPI, which the suite installs) predates PostgreSQL 12:
    // it has no --restore-to-primary and writes a recovery.conf, which is removed below.
    let modern = restore_to_primary_supported(&venv);
    let mut restore = Command::new(venv.join("bin/pghoard_restore"));
    restore.args(["get-basebackup", "--site", "main"]);
    if modern {
        restore.arg("--restore-to-primary");
    }
    let out = restore
        .arg("--config")
        .arg(&cfg_path)
        .arg("--target-dir")
        .arg(&target)
        .arg("--tablespace-dir")
        .arg(format!("ts1={}", new_ts.display()))
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pghoard_restore: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    // The bug: everything landed in <target>/pgdata/.
    assert!(
        !target.join("pgdata").exists(),
        "extracted into pgdata/pgdata"
    );
    assert!(target.join("PG_VERSION").is_file());
    assert!(target.join("global/pg_control").is_file());
    // pghoard's restore_command asks pghoard's daemon, which is not running here; the WAL the
    // backup needs is inside it (standalone_hot_backup), in pg_wal.
    if !modern {
        let conf = target.join("recovery.conf");
        assert!(
            conf.is_file(),
            "pghoard {} wrote no recovery.conf",
            venv.display()
        );
        std::fs::remove_file(conf).unwrap();
    }
    set_restore_command(&target, "/bin/false");
    walhoard_testkit::give_to_server_user(&new_ts).unwrap();
    let restored = start_promoted(&target);
    assert_eq!(restored.psql(CHECKSUM).unwrap(), b.want);
    assert_eq!(
        restored.psql("select count(*) from plain").unwrap().trim(),
        "5000"
    );
}

/// Whether this pghoard_restore knows `--restore-to-primary` (pghoard 2.2 and later).
pub(crate) fn restore_to_primary_supported(venv: &Path) -> bool {
    let out = Command::new(venv.join("bin/pghoard_restore"))
        .args(["get-basebackup", "--help"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("--restore-to-primary")
}

pub(crate) fn set_restore_command(data: &Path, command: &str) {
    let conf = data.join("postgresql.auto.conf");
    let text = std::fs::read_to_string(&conf).unwrap_or_default();
    let mut kept: Vec<String> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("restore_command"))
        .map(str::to_string)
        .collect();
    kept.push(format!("restore_command = '{command}'"));
    std::fs::write(&conf, kept.join("\n") + "\n").unwrap();
}
