//! Restoring and listing the basebackups the real pghoard wrote (issue 15 item 2), from the
//! archive in tests/data/pghoard-pg15 (tools/pghoard-fixture.sh): its local-tar backup
//! (`pghoard-bb-v2`: control object `basebackup/<name>.00000000.pghoard`, chunks without a
//! `kind` or hash) and its basic backup (one zstd tar, no `format`), each restored by
//! `walhoard restore get-basebackup` and started with walhoard's restore_command serving
//! pghoard's WAL from the same archive.

use std::path::Path;

use serde_json::json;

use crate::common::list_basebackups;
use crate::daemon_support::{merge, DaemonDir};
use crate::restore::{get_basebackup, start_promoted, stderr};
use crate::retention::PGHOARD_SITE;

pub(crate) const LOCAL_TAR: &str = "2026-12-04_20-38_0";
const LOCAL_TAR_CONTROL: &str = "2026-12-04_20-38_0.00000000.pghoard";
const BASIC: &str = "2026-12-04_20-39_0";
/// The fixture's table: 1000 rows, then 100 more before each of four WAL switches, all of
/// them archived by pghoard (segments 2 to 8).
const FIXTURE_ROWS: &str = "1400";

/// The site a pghoard user keeps for its archive (site prefix `pgsite`, local storage, no
/// encryption, a node nothing connects to) with `extra` set.
pub(crate) fn pghoard_site(d: &DaemonDir, extra: serde_json::Value) -> serde_json::Value {
    let mut site = json!({
        "prefix": PGHOARD_SITE,
        "nodes": [{"host": "127.0.0.1", "port": 1, "user": "postgres"}],
        "object_storage": d.local_storage(),
    });
    merge(&mut site, extra);
    site
}

/// A walhoard configuration for pghoard's archive as a pghoard user keeps it: site prefix
/// `pgsite`, local storage, no encryption; a node nothing connects to.
pub(crate) fn pghoard_archive() -> DaemonDir {
    pghoard_archive_of(&fixture_archive("pghoard-pg15"))
}

/// `tests/data/<fixture>/archive.tar.zst`.
pub(crate) fn fixture_archive(fixture: &str) -> String {
    format!(
        "{}/tests/data/{fixture}/archive.tar.zst",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// [`pghoard_archive`] for the fixture archive `archive`.
pub(crate) fn pghoard_archive_of(archive: &str) -> DaemonDir {
    let d = DaemonDir::new();
    crate::retention::unpack_fixture(archive, &d.path("archive"));
    d.write_sites(json!({"main": pghoard_site(&d, json!({}))}));
    // pghoard's local storage wrote its objects 0600: the server's user runs restore_command.
    walhoard_testkit::give_to_server_user(&d.path("archive")).unwrap();
    d
}

/// Restores `name`, starts PostgreSQL on it (the server of the backup's major) and checks the
/// fixture table holds `rows`; returns the major.
pub(crate) fn restore_and_count(d: &DaemonDir, name: &str, rows: &str) -> u32 {
    let target = d.path(&format!("restored-{name}"));
    let out = get_basebackup(d, &target, &["--basebackup", name, "--restore-to-primary"]);
    assert!(
        out.status.success(),
        "get-basebackup {name}: {}",
        stderr(&out)
    );
    assert!(target.join("global/pg_control").is_file());
    assert!(target.join("backup_label").is_file());
    assert!(!target.join("pgdata").exists(), "pgdata/ was not stripped");
    let pg = start_promoted(&target);
    let got = pg.psql("select count(*) from fixture").unwrap();
    assert_eq!(got.trim(), rows, "{}", pg.log());
    assert!(
        pg.log().contains("consistent recovery state reached"),
        "{}",
        pg.log()
    );
    pg.major
}

/// pghoard's local-tar backups on each PostgreSQL major a fixture was written on
/// (tools/pghoard-fixture.sh; pghoard 2.7.0 supports 9.3 to 18): the fixture, its major, the
/// backup's name as pghoard lists it, its start segment's LSN, and the fixture table's rows
/// once all its WAL is replayed.
pub(crate) const LOCAL_TAR_BY_MAJOR: [(&str, u32, &str, &str, &str); 3] = [
    ("pghoard-pg15", 15, LOCAL_TAR, "0/2000000", FIXTURE_ROWS),
    (
        "pghoard-pg13",
        13,
        "2026-12-04_23-40_0",
        "0/2000000",
        "1200",
    ),
    (
        "pghoard-pg17",
        17,
        "2026-12-04_23-43_0",
        "0/2000000",
        "1200",
    ),
];

#[test]
fn pghoard_basebackups_list_with_sizes_lsns_and_timeline() {
    let d = pghoard_archive();
    let list = list_basebackups(&d.config_path());
    let by_name = |n: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == n)
            .unwrap_or_else(|| panic!("{n} not listed: {list:#}"))
            .clone()
    };
    let lt = by_name(LOCAL_TAR_CONTROL);
    assert_eq!(lt["start_lsn"], "0/2000000", "{lt:#}");
    assert_eq!(lt["start_timeline"], 1);
    assert_eq!(lt["size_plain"], 25026560);
    assert_eq!(lt["size_stored"], 2273444);
    let basic = by_name(BASIC);
    // Before: 0 B, no start LSN, timeline 0.
    assert_eq!(basic["start_lsn"], "0/6000000", "{basic:#}");
    assert_eq!(basic["start_timeline"], 1);
    assert_eq!(basic["size_plain"], 23621632);
    assert_eq!(basic["size_stored"], 761446);
    assert_eq!(basic["start_time"], "2026-12-04T20:39:18Z");
    // The basic backup started after the local-tar one ended: it is the latest.
    assert_eq!(list.as_array().unwrap().last().unwrap()["name"], BASIC);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_pghoard_local_tar_backup_and_replay_pghoards_wal() {
    for (fixture, major, name, _, rows) in LOCAL_TAR_BY_MAJOR {
        let d = pghoard_archive_of(&fixture_archive(fixture));
        // By pghoard's backup name, without the `.00000000.pghoard` of its control object.
        assert_eq!(restore_and_count(&d, name, rows), major, "{fixture}");
    }
}

#[test]
fn pghoard_local_tar_backups_of_every_major_list_with_lsn_timeline_and_version() {
    for (fixture, major, name, start_lsn, _) in LOCAL_TAR_BY_MAJOR {
        let d = pghoard_archive_of(&fixture_archive(fixture));
        let list = list_basebackups(&d.config_path());
        let b = list
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == format!("{name}.00000000.pghoard"))
            .unwrap_or_else(|| panic!("{fixture}: {name} not listed: {list:#}"));
        assert_eq!(b["start_lsn"], start_lsn, "{fixture}: {b:#}");
        assert_eq!(b["start_timeline"], 1, "{fixture}: {b:#}");
        let version: u32 = b["pg_version"].as_str().unwrap().parse().unwrap();
        assert_eq!(version / 10000, major, "{fixture}: {b:#}");
        assert!(b["size_plain"].as_u64() > Some(1 << 20), "{fixture}: {b:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_pghoard_basic_backup_and_replay_pghoards_wal() {
    let d = pghoard_archive();
    restore_and_count(&d, BASIC, FIXTURE_ROWS);
}

/// Replaces one byte of file data inside a stored zstd tar with another value and stores it
/// compressed again: a valid zstd stream and a valid tar of the same size, which only the
/// object's `_hash` tells apart from what pghoard wrote.
pub(crate) fn tamper(object: &Path) {
    let plain = zstd::stream::decode_all(&std::fs::read(object).unwrap()[..]).unwrap();
    let mut plain = plain;
    // Halfway: inside a relation file's data (chunk 3 is nine members, almost all data).
    let at = plain.len() / 2;
    plain[at] ^= 0x55;
    std::fs::write(object, zstd::stream::encode_all(&plain[..], 3).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_a_tampered_pghoard_chunk_and_leaves_nothing() {
    let d = pghoard_archive();
    let chunk = format!("basebackup_chunk/{LOCAL_TAR}/{LOCAL_TAR}.00000003.pghoard");
    tamper(&d.path("archive").join(PGHOARD_SITE).join(&chunk));
    let target = d.path("restored");
    let out = get_basebackup(&d, &target, &["--basebackup", LOCAL_TAR]);
    assert!(!out.status.success(), "a tampered chunk was restored");
    let err = stderr(&out);
    assert!(err.contains(&chunk) && err.contains("_hash"), "{err}");
    assert!(
        !target.exists(),
        "the failed restore left {}",
        target.display()
    );

    // The basic backup truncated: refused too, naming the object.
    let basic = format!("basebackup/{BASIC}");
    let path = d.path("archive").join(PGHOARD_SITE).join(&basic);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let out = get_basebackup(&d, &target, &["--basebackup", BASIC]);
    assert!(
        !out.status.success(),
        "a truncated basic backup was restored"
    );
    assert!(stderr(&out).contains(&basic), "{}", stderr(&out));
    assert!(
        !target.exists(),
        "the failed restore left {}",
        target.display()
    );
}

const ENC_TS_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/pghoard-pg15-enc-ts"
);

/// pghoard's `pghoa1`-encrypted archive with a tablespace (tests/data/pghoard-pg15-enc-ts),
/// configured with the test key pair pghoard wrote it with.
pub(crate) fn pghoard_encrypted_archive() -> DaemonDir {
    let d = DaemonDir::new();
    crate::retention::unpack_fixture(&format!("{ENC_TS_DIR}/archive.tar.zst"), &d.path("archive"));
    let keys: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{ENC_TS_DIR}/key.json")).unwrap()).unwrap();
    let site = pghoard_site(
        &d,
        json!({"encryption_key_id": "k1", "encryption_keys": keys}),
    );
    d.write_sites(json!({ "main": site }));
    walhoard_testkit::give_to_server_user(&d.path("archive")).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_pghoard_encrypted_local_tar_backup_with_a_tablespace() {
    let d = pghoard_encrypted_archive();
    let list = list_basebackups(&d.config_path());
    let backups = list.as_array().unwrap();
    assert_eq!(backups.len(), 1, "{list:#}");
    assert_eq!(backups[0]["encryption_key_id"], "k1", "{list:#}");
    assert_eq!(backups[0]["start_timeline"], 1, "{list:#}");
    let target = d.path("restored");
    let ts = d.path("ts");
    let ts_arg = format!("fixture_ts={}", ts.display());
    let out = get_basebackup(
        &d,
        &target,
        &["--restore-to-primary", "--tablespace-dir", &ts_arg],
    );
    assert!(out.status.success(), "get-basebackup: {}", stderr(&out));
    // pghoard's `tablespaces/fixture_ts/…` members are in the tablespace directory, linked
    // from pg_tblspc/<oid>.
    let links: Vec<_> = std::fs::read_dir(target.join("pg_tblspc"))
        .unwrap()
        .map(|e| std::fs::read_link(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(links, std::slice::from_ref(&ts));
    assert!(
        std::fs::read_dir(&ts).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("PG_15_")),
        "no PG_15_* in the tablespace directory"
    );
    walhoard_testkit::give_to_server_user(&ts).unwrap();
    let pg = start_promoted(&target);
    let rows = pg
        .psql("select count(*) || ' ' || (select spcname from pg_tablespace t join pg_class c on c.reltablespace = t.oid where c.relname = 'fixture') from fixture")
        .unwrap();
    // 1000 rows, and the first 100-row batch after the backup: pghoard was stopped before it
    // handed over the segment of the second batch (the archive ends at segment 4).
    assert_eq!(rows.trim(), "1100 fixture_ts", "{}", pg.log());
}
