//! Delta backups across walhoard and pghoard on one archive (issue 18), with the real
//! pghoard: a release with delta mode (2.2 or later; PyPI's newest, 2.1.0, has none), from
//! the venv `WALHOARD_PGHOARD_VENV` names (`tools/pghoard-venv.sh <pghoard checkout> <venv>`,
//! e.g. tag 2.7.0). Hence `#[ignore]`: run with
//!
//!     WALHOARD_PGHOARD_VENV=<venv> cargo test --locked --test tests -- --ignored delta_interop
//!
//! tools/test.sh runs it when that variable is set.
//!
//! One cluster, one local store (site `main`, unencrypted): walhoard takes a delta backup;
//! the real pghoard daemon takes one (reading walhoard's manifest to find the objects it may
//! reuse); walhoard takes another, after a change, referencing pghoard's objects. pghoard's
//! `pghoard_restore get-basebackup` restores walhoard's latest backup, walhoard's restore
//! pghoard's, and PostgreSQL started on each holds the rows of its time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use serde_json::json;

use crate::common::wait_until;
use crate::daemon_support::DaemonDir;
use crate::delta_backup::{delta_site, objects, primary, sidecar};
use crate::pghoard_rollback::{restore_to_primary_supported, set_restore_command};
use crate::restore::{get_basebackup, insert, start_promoted, stderr, take_basebackup, CHECKSUM};

/// The venv `WALHOARD_PGHOARD_VENV` names; it must hold a pghoard with delta mode.
fn delta_pghoard() -> PathBuf {
    let venv =
        PathBuf::from(std::env::var_os("WALHOARD_PGHOARD_VENV").expect(
            "WALHOARD_PGHOARD_VENV: a venv with pghoard 2.2 or later (tools/pghoard-venv.sh)",
        ));
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", "import pghoard.basebackup.delta"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: this pghoard has no delta mode: {}",
        venv.display(),
        stderr(&out)
    );
    venv
}

/// The real pghoard daemon on the test's cluster and store, as the server's OS user.
struct Pghoard {
    child: Child,
    port: u16,
}

impl Pghoard {
    fn start(venv: &Path, work: &Path, pg: &walhoard_testkit::PgCluster, d: &DaemonDir) -> Self {
        let port = 20000 + (std::process::id() % 10000) as u16;
        let state = work.join("pghoard-state");
        std::fs::create_dir_all(&state).unwrap();
        let cfg = json!({
            "backup_location": state,
            "json_state_file_path": state.join("state.json"),
            "maintenance_mode_file": state.join("maintenance"),
            "alert_file_dir": state,
            "http_address": "127.0.0.1",
            "http_port": port,
            "compression": {"algorithm": "zstd", "level": 3},
            "backup_sites": {"main": {
                "nodes": [{"host": pg.socket_dir(), "port": pg.port, "user": "postgres"}],
                "pg_bin_directory": walhoard_testkit::pg_bin_dir().unwrap(),
                "pg_data_directory": pg.data_dir(),
                "active_backup_mode": "archive_command",
                "basebackup_mode": "delta",
                "basebackup_delta_mode_min_delta_file_size": 65536,
                "basebackup_interval_hours": null,
                "encryption_key_id": null,
                "object_storage": d.local_storage(),
            }},
        });
        let path = work.join("pghoard.json");
        std::fs::write(&path, cfg.to_string()).unwrap();
        walhoard_testkit::give_to_server_user(work).unwrap();
        walhoard_testkit::give_to_server_user(&d.path("archive")).unwrap();
        let log = std::fs::File::create(work.join("pghoard.log")).unwrap();
        let child = Command::new("setsid")
            .arg("runuser")
            .args(["-u", "postgres", "--", "env"])
            .arg(format!(
                "PATH={}:{}",
                venv.join("bin").display(),
                std::env::var("PATH").unwrap_or_default()
            ))
            .arg(venv.join("bin/pghoard"))
            .arg(&path)
            .current_dir(&state)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Pghoard { child, port };
        let up = wait_until(Duration::from_secs(60), || {
            p.curl(&["-sf", &p.url("status")])
        });
        assert!(up, "pghoard did not start: {}", p.log(work));
        p
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    fn curl(&self, args: &[&str]) -> bool {
        Command::new("curl")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn log(&self, work: &Path) -> String {
        std::fs::read_to_string(work.join("pghoard.log")).unwrap_or_default()
    }
}

impl Drop for Pghoard {
    fn drop(&mut self) {
        // setsid made it a process group of its own: pghoard's helpers go with it.
        let pgid = self.child.id() as i32;
        // SAFETY: a signal to the group this test started.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

fn controls(d: &DaemonDir) -> Vec<String> {
    objects(d, "basebackup").into_keys().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs WALHOARD_PGHOARD_VENV: pghoard 2.2+ with delta mode (tools/pghoard-venv.sh)"]
async fn delta_interop_walhoard_and_pghoard_share_objects_and_restore_each_other() {
    let venv = delta_pghoard();
    let mut pg = primary();
    let d = DaemonDir::new();
    delta_site(
        &pg,
        &d,
        json!({"encryption_key_id": null, "encryption_keys": {}}),
    );
    let work = tempfile::Builder::new()
        .prefix("pghoard-")
        .tempdir()
        .unwrap();

    // 1. walhoard's first delta backup.
    let first = take_basebackup(&d);
    let after_first = objects(&d, "basebackup_delta");

    // 2. pghoard's, after a change: it finds walhoard's objects through walhoard's manifest.
    pg.psql("update t3 set v = md5(v)").unwrap();
    insert(&pg, "pghoard", 100);
    pg.psql("checkpoint").unwrap();
    let want_pghoard = pg.psql(CHECKSUM).unwrap();
    // pghoard names a backup by the minute without looking at the store (its
    // `get_backup_path`), so in walhoard's first backup's minute it would write its bundles
    // over that backup's: a minute later.
    let minute = |t: jiff::Timestamp| t.strftime("%Y-%m-%d_%H-%M").to_string();
    while first.starts_with(&minute(jiff::Timestamp::now())) {
        std::thread::sleep(Duration::from_millis(500));
    }
    let before = controls(&d);
    let pghoard_name = {
        let p = Pghoard::start(&venv, work.path(), &pg, &d);
        assert!(
            p.curl(&["-sS", "-f", "-X", "PUT", &p.url("main/basebackup")]),
            "request: {}",
            p.log(work.path())
        );
        let stored = wait_until(Duration::from_secs(180), || {
            controls(&d).len() > before.len()
        });
        assert!(stored, "pghoard stored no backup: {}", p.log(work.path()));
        let new: Vec<String> = controls(&d)
            .into_iter()
            .filter(|k| !before.contains(k))
            .collect();
        new[0].trim_start_matches("basebackup/").to_string()
    };
    let after_pghoard = objects(&d, "basebackup_delta");
    let pghoard_new: Vec<&String> = after_pghoard
        .keys()
        .filter(|k| !after_first.contains_key(*k))
        .collect();
    eprintln!(
        "pghoard backup {pghoard_name}: {} objects new of {}",
        pghoard_new.len(),
        after_pghoard.len()
    );
    // pghoard reused walhoard's objects: it stored only what changed.
    assert!(!pghoard_new.is_empty());
    assert!(pghoard_new.len() * 4 < after_first.len(), "{pghoard_new:?}");
    for k in &pghoard_new {
        assert!(sidecar(&d, k).get("walhoard-writer").is_none(), "{k}");
    }

    // 3. walhoard's second: pghoard's objects of unchanged files are referenced.
    pg.psql("update t5 set v = md5(v)").unwrap();
    insert(&pg, "second", 100);
    pg.psql("checkpoint").unwrap();
    let second = take_basebackup(&d);
    let want_second = pg.psql(CHECKSUM).unwrap();
    let after_second = objects(&d, "basebackup_delta");
    // In the same minute as pghoard's: a name of its own, pghoard's bundles untouched.
    let stem = pghoard_name.trim_end_matches(".00000000.pghoard");
    assert_ne!(second, stem);
    let bundles = objects(&d, &format!("basebackup_delta_chunk/{stem}"));
    assert!(!bundles.is_empty());
    for k in bundles.keys() {
        assert!(
            sidecar(&d, k).get("walhoard-writer").is_none(),
            "{k} overwritten"
        );
    }
    for k in &pghoard_new {
        // Not stored again: still pghoard's object, unmarked.
        assert!(sidecar(&d, k).get("walhoard-writer").is_none(), "{k}");
    }
    let refs = crate::delta_backup::manifest_files(&d, &second).await;
    let reused = refs
        .iter()
        .filter_map(|f| f["hexdigest"].as_str())
        .filter(|h| pghoard_new.contains(&&format!("basebackup_delta/{h}")))
        .count();
    assert!(
        reused > 0,
        "walhoard's backup references none of pghoard's objects"
    );
    let walhoard_new = after_second
        .keys()
        .filter(|k| !after_pghoard.contains_key(*k))
        .count();
    assert!(walhoard_new * 4 < after_first.len(), "{walhoard_new} new");
    pg.stop().unwrap();

    // 4. pghoard restores walhoard's latest delta backup.
    let target = work.path().join("by-pghoard");
    let mut restore = Command::new(venv.join("bin/pghoard_restore"));
    // The latest: walhoard's second (pghoard matches --basebackup against its full keys).
    restore.args(["get-basebackup", "--site", "main"]);
    if restore_to_primary_supported(&venv) {
        restore.arg("--restore-to-primary");
    }
    let out = restore
        .arg("--config")
        .arg(work.path().join("pghoard.json"))
        .arg("--target-dir")
        .arg(&target)
        .env(
            "PATH",
            format!(
                "{}:{}",
                venv.join("bin").display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pghoard_restore: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    // The WAL is inside walhoard's standalone backup; pghoard's daemon is not running.
    set_restore_command(&target, "/bin/false");
    let _ = std::fs::remove_file(target.join("recovery.conf"));
    let restored = start_promoted(&target);
    assert_eq!(
        restored.psql(CHECKSUM).unwrap(),
        want_second,
        "{}",
        restored.log()
    );
    drop(restored);

    // 5. walhoard restores pghoard's delta backup. pghoard (archive_command mode, no
    // archive_command set) archived no WAL: the stopped primary's pg_wal serves it.
    let target = d.path("by-walhoard");
    let out = get_basebackup(
        &d,
        &target,
        &["--basebackup", &pghoard_name, "--restore-to-primary"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    copy_wal(&pg.wal_dir(), &target.join("pg_wal"));
    set_restore_command(&target, "/bin/false");
    walhoard_testkit::give_to_server_user(&target).unwrap();
    let restored = start_promoted(&target);
    assert!(
        restored.log().contains("consistent recovery state reached"),
        "{}",
        restored.log()
    );
    // Replayed to the primary's last WAL: everything it had.
    assert_eq!(
        restored.psql(CHECKSUM).unwrap(),
        want_second,
        "{}",
        restored.log()
    );
    let got = restored
        .psql("select count(*) from r where batch = 'pghoard'")
        .unwrap();
    assert_eq!(got.trim(), "100");
    let _ = (want_pghoard, first);
}

/// The WAL segments of `from` (a stopped primary's pg_wal) into `to`.
fn copy_wal(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if p.is_file() && name.len() == 24 {
            std::fs::copy(&p, to.join(&name)).unwrap();
        }
    }
}
