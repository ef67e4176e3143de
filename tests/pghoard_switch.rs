//! The switch from pghoard to walhoard end to end (issue 15 item 5, docs/migrating-from-pghoard.md),
//! on the archive the real pghoard 2.7.0 wrote (tests/data/pghoard-pg15): walhoard restores
//! pghoard's local-tar backup and starts it as the primary (same system identifier; recovery
//! replays pghoard's WAL and promotion picks timeline 2), a walhoard daemon with pghoard's
//! site prefix streams that primary into the same archive, and then
//! (a) pghoard's backup restores to pghoard's WAL end, before the switch;
//! (b) pghoard's backup restores across the switch: pghoard's WAL, then walhoard's on timeline 2;
//! (c) walhoard's first basebackup restores;
//! and every object pghoard wrote is still byte-identical.

use std::time::Duration;

use serde_json::json;
use walhoard::config::ObjectStorageConfig;
use walhoard::storage::ObjectStore;

use crate::daemon_support::{switch_segment, wait_archived, Daemon, DaemonDir};
use crate::pghoard_restore::pghoard_site;
use crate::restore::{get_basebackup, insert, start_promoted, stderr, take_basebackup, CHECKSUM};
use crate::retention::{read_tree, unpack_pghoard_archive, PGHOARD_SITE};

/// pghoard's local-tar backup in the fixture, by the name pghoard lists it under.
const PGHOARD_BACKUP: &str = "2026-12-04_20-38_0";
/// The fixture's rows, all in pghoard's WAL (see tests/data/pghoard-pg15/README.md).
const FIXTURE_ROWS: &str = "1400";

/// The configuration a pghoard user keeps: site prefix `pgsite`, local storage, no
/// encryption; `node` is where the daemon streams from.
fn write_config(d: &DaemonDir, node: serde_json::Value) {
    let site = pghoard_site(
        d,
        json!({"nodes": [node], "basebackup_interval_hours": null}),
    );
    d.write_sites(json!({ "main": site }));
}

/// Restores `args` into a fresh directory, starts it, and returns (fixture rows, checksum of
/// `r` or "no r").
fn restore_and_read(d: &DaemonDir, name: &str, args: &[&str]) -> (String, String) {
    let target = d.path(&format!("restored-{name}"));
    let mut all = vec!["--restore-to-primary"];
    all.extend_from_slice(args);
    let out = get_basebackup(d, &target, &all);
    assert!(
        out.status.success(),
        "get-basebackup {name}: {}",
        stderr(&out)
    );
    let pg = start_promoted(&target);
    let fixture = pg.psql("select count(*) from fixture").unwrap();
    let r = if pg.psql("select to_regclass('r') is null").unwrap().trim() == "t" {
        "no r".to_string()
    } else {
        pg.psql(CHECKSUM).unwrap()
    };
    (fixture.trim().to_string(), r.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pghoard_switch_archives_the_new_timelines_history_and_restores_before_across_and_after() {
    let d = DaemonDir::new();
    unpack_pghoard_archive(&d.path("archive"));
    let site_root = d.path("archive").join(PGHOARD_SITE);
    let pghoards_objects = read_tree(&site_root);
    walhoard_testkit::give_to_server_user(&d.path("archive")).unwrap();
    // Nothing to stream from yet: the primary is what pghoard's backup restores to.
    write_config(
        &d,
        json!({"host": "127.0.0.1", "port": 1, "user": "postgres"}),
    );

    // The new primary: pghoard's backup plus pghoard's WAL, promoted onto timeline 2.
    let primary_dir = d.path("primary");
    let out = get_basebackup(
        &d,
        &primary_dir,
        &["--basebackup", PGHOARD_BACKUP, "--restore-to-primary"],
    );
    assert!(out.status.success(), "get-basebackup: {}", stderr(&out));
    let pg = start_promoted(&primary_dir);
    assert_eq!(
        pg.psql("select count(*) from fixture").unwrap().trim(),
        FIXTURE_ROWS
    );
    // pghoard's WAL ends where timeline 2 begins: the switchpoint in 00000002.history.
    let history = pg
        .psql("select pg_read_file('pg_wal/00000002.history')")
        .unwrap();
    let switchpoint = history
        .lines()
        .find_map(|l| l.trim().strip_prefix("1\t"))
        .and_then(|rest| rest.split('\t').next())
        .unwrap_or_else(|| panic!("no timeline 1 switchpoint in {history:?}"))
        .to_string();

    // walhoard's daemon on the same site and prefix, streaming the new primary.
    write_config(
        &d,
        json!({"host": pg.socket_dir(), "port": pg.port, "user": "postgres", "slot": "pghoard_slot"}),
    );
    let daemon = Daemon::start(&d);
    let cfg: ObjectStorageConfig = serde_json::from_value(d.local_storage()).unwrap();
    let store = ObjectStore::open(&cfg, PGHOARD_SITE).unwrap();
    wait_slot_named(&pg, &daemon);
    d.wait_http();
    pg.psql("create table r (id bigserial primary key, batch text, v text)")
        .unwrap();
    insert(&pg, "walhoard-1", 2_000);
    let seg = switch_segment(&pg);
    wait_archived(&store, &seg, Duration::from_secs(60), &daemon).await;
    // Recovery across the switch needs timeline 2's history in the archive.
    wait_archived(&store, "00000002.history", Duration::from_secs(30), &daemon).await;
    let before_backup = pg.psql(CHECKSUM).unwrap();

    let walhoard_backup = take_basebackup(&d);
    insert(&pg, "walhoard-2", 3_000);
    let latest = pg.psql(CHECKSUM).unwrap();
    let seg = switch_segment(&pg);
    wait_archived(&store, &seg, Duration::from_secs(60), &daemon).await;
    assert!(latest.trim().starts_with("5000:"), "{latest}");
    assert_ne!(before_backup, latest);

    // (a) pghoard's backup to pghoard's WAL end: the fixture's rows, none of walhoard's.
    let (fixture, r) = restore_and_read(
        &d,
        "before-switch",
        &[
            "--basebackup",
            PGHOARD_BACKUP,
            "--recovery-target-lsn",
            &switchpoint,
            "--recovery-target-action",
            "promote",
        ],
    );
    assert_eq!((fixture.as_str(), r.as_str()), (FIXTURE_ROWS, "no r"));

    // (b) pghoard's backup across the switch: pghoard's WAL, then walhoard's on timeline 2.
    let (fixture, r) = restore_and_read(&d, "across-switch", &["--basebackup", PGHOARD_BACKUP]);
    assert_eq!(fixture, FIXTURE_ROWS);
    assert_eq!(r, latest.trim());

    // (c) walhoard's own first backup, and its WAL after it.
    let (fixture, r) = restore_and_read(&d, "walhoard", &["--basebackup", &walhoard_backup]);
    assert_eq!(fixture, FIXTURE_ROWS);
    assert_eq!(r, latest.trim());

    // Nothing pghoard wrote was changed or removed.
    let now = read_tree(&site_root);
    for (key, bytes) in &pghoards_objects {
        match now.get(key) {
            None => panic!(
                "pghoard's {key} is gone; daemon log:\n{}",
                daemon.log_text()
            ),
            Some(b) => assert!(b == bytes, "pghoard's {key} changed"),
        }
    }
    drop(daemon);
}

/// Waits until the daemon holds its slot on `pg`.
fn wait_slot_named(pg: &walhoard_testkit::PgCluster, daemon: &Daemon) {
    assert!(
        crate::common::wait_until(Duration::from_secs(30), || {
            pg
            .psql("select count(*) from pg_replication_slots where slot_name = 'pghoard_slot' and active")
            .is_ok_and(|r| r.trim() == "1")
        }),
        "the daemon holds no slot; log:\n{}",
        daemon.log_text()
    );
}

/// pghoard's `moved_from` (issue 15 item 2): a site names the older site pghoard wrote
/// (another prefix, here `pgsite` in the same local storage); walhoard lists that site's
/// backups as the new site's, restores pghoard's local-tar backup by its name through the new
/// site, and the restore_command written for the new site serves pghoard's WAL from the older
/// one (the new site's prefix holds nothing yet, as right after a move). Before, `moved_from`
/// was an unknown key and the configuration was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pghoard_moved_from_site_lists_restores_and_serves_wal() {
    let d = DaemonDir::new();
    unpack_pghoard_archive(&d.path("archive"));
    let pghoards_objects = read_tree(&d.path("archive").join(PGHOARD_SITE));
    walhoard_testkit::give_to_server_user(&d.path("archive")).unwrap();
    d.write_sites(json!({
        "old": {
            "active": false,
            "prefix": PGHOARD_SITE,
            "object_storage": d.local_storage(),
        },
        "main": {
            "prefix": "moved",
            "moved_from": ["old"],
            "pg_data_directory": d.path("pgdata"),
            "basebackup_interval_hours": null,
            "nodes": [{"host": "127.0.0.1", "port": 1, "user": "postgres"}],
            "object_storage": d.local_storage(),
        },
    }));

    // The older site is inactive and has no node: `check` passes it (it failed with
    // "backup_sites.old.nodes is empty", though the daemon skips inactive sites).
    let mut check = std::process::Command::new(env!("CARGO_BIN_EXE_walhoard"));
    check
        .args(["check", "--site", "old", "--config"])
        .arg(d.config_path());
    crate::common::output_ok(&mut check, "check --site old");

    let list = crate::common::list_basebackups(&d.config_path());
    let names: Vec<(&str, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap(),
                b["site"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("2026-12-04_20-38_0.00000000.pghoard", "old"),
            ("2026-12-04_20-39_0", "old")
        ],
        "{list:#}"
    );

    // `get-basebackup --site main` with the restore_command of site main: every segment comes
    // from the older site.
    let (fixture, r) = restore_and_read(&d, "moved", &["--basebackup", PGHOARD_BACKUP]);
    assert_eq!((fixture.as_str(), r.as_str()), (FIXTURE_ROWS, "no r"));

    // The daemon's restore_command API (pghoard's `--port` recovery configuration) searches
    // the older site too: a segment only `old` has is served, one nobody has is "not found".
    std::fs::create_dir_all(d.path("pgdata").join("pg_wal")).unwrap();
    let daemon = Daemon::start(&d);
    d.wait_http();
    let fetch = |seg: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_walhoard"))
            .args(["postgres-command", "--mode", "restore", "--site", "main"])
            .args(["--host", "127.0.0.1", "--port", &d.http_port.to_string()])
            .args(["--xlog", seg, "--output"])
            .arg(d.path("pgdata").join("pg_wal").join(seg))
            .output()
            .unwrap()
    };
    let seg = "000000010000000000000003";
    let out = fetch(seg);
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        daemon.log_text()
    );
    let served = std::fs::metadata(d.path("pgdata").join("pg_wal").join(seg)).unwrap();
    assert_eq!(served.len(), 16 << 20);
    let out = fetch("000000010000000000000042");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    drop(daemon);
    assert_eq!(
        read_tree(&d.path("archive").join(PGHOARD_SITE)),
        pghoards_objects
    );
}
