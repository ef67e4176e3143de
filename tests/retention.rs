//! Retention, orphan cleanup and WAL deletion act only on what they positively identify
//! (issue 15 item 1): run on an archive the real pghoard wrote (tests/data/pghoard-pg15), the
//! daemon deletes none of pghoard's objects.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::json;
use walhoard::config::ObjectStorageConfig;
use walhoard::storage::ObjectStore;
use walhoard_testkit::PgCluster;

use crate::daemon_support::*;

const PGHOARD_ARCHIVE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/pghoard-pg15/archive.tar.zst"
);
/// The site (and key prefix) pghoard wrote the fixture for.
pub(crate) const PGHOARD_SITE: &str = "pgsite";

/// Every file under `root` (objects and their `.metadata` sidecars), by relative path.
pub fn read_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Sets the modification time of every file under `root` to `age` ago: chunks left by a
/// backup interrupted that long ago.
pub fn backdate_tree(root: &Path, age: Duration) {
    let when = SystemTime::now() - age;
    for rel in read_tree(root).keys() {
        std::fs::File::options()
            .write(true)
            .open(root.join(rel))
            .unwrap()
            .set_modified(when)
            .unwrap();
    }
}

/// Unpacks the pghoard fixture into `dir` (`dir/pgsite/...`): zstd decoded here (no `zstd`
/// program needed), the tar by `tar`.
pub(crate) fn unpack_pghoard_archive(dir: &Path) {
    unpack_fixture(PGHOARD_ARCHIVE, dir)
}

/// Unpacks a fixture `archive.tar.zst` into `dir`.
pub(crate) fn unpack_fixture(archive: &str, dir: &Path) {
    use std::io::Write;
    std::fs::create_dir_all(dir).unwrap();
    let packed = std::fs::read(archive).unwrap();
    let tar = zstd::stream::decode_all(&packed[..]).unwrap();
    let mut child = std::process::Command::new("tar")
        .args(["-xf", "-", "-C"])
        .arg(dir)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&tar).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "unpack {archive}: {status}");
}

/// A fresh cluster moved past the fixture's segment names: a fresh cluster's would be
/// pghoard's (timeline 1, segments 2-8). Checkpoints remove the old segments from pg_wal, so
/// that a daemon (which archives what pg_wal still holds) never writes onto pghoard's keys.
pub(crate) fn cluster_past_the_fixtures_wal() -> PgCluster {
    let pg = PgCluster::start().unwrap();
    for _ in 0..9 {
        pg.psql(
            "create table if not exists t(x int); insert into t values (1); select pg_switch_wal()",
        )
        .unwrap();
    }
    pg.psql("checkpoint").unwrap();
    pg.psql("checkpoint").unwrap();
    pg
}

/// pghoard's configuration as a pghoard user would keep it: same site prefix, local storage,
/// unencrypted; retention set to act (one backup kept).
pub(crate) fn write_pghoard_site_config(d: &DaemonDir, pg: &PgCluster) {
    d.write_config(
        pg,
        d.local_storage(),
        json!({"prefix": PGHOARD_SITE, "encryption_key_id": null, "basebackup_mode": "basic",
               "basebackup_count": 1, "basebackup_count_min": 1}),
    );
}

/// `walhoard basebackup` against the running `daemon`: the new backup's name.
pub(crate) fn requested_backup(d: &DaemonDir, daemon: &Daemon) -> String {
    let out = basebackup_command(d).output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits until the daemon logged that retention deleted something.
pub(crate) fn wait_retention_applied(daemon: &Daemon) {
    assert!(
        crate::common::wait_until(Duration::from_secs(30), || daemon
            .log_text()
            .contains("retention applied")),
        "retention did not run; log:\n{}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_every_object_pghoard_wrote() {
    let pg = cluster_past_the_fixtures_wal();
    let d = DaemonDir::new();
    let archive = d.path("archive");
    unpack_pghoard_archive(&archive);
    let site_root = archive.join(PGHOARD_SITE);
    // Chunks of a pghoard backup that never completed (no control object), written two days
    // ago: not walhoard's, so never an orphan to delete, whatever their age.
    let stray = site_root.join("basebackup_chunk/2026-01-01_00-00_0");
    std::fs::create_dir_all(&stray).unwrap();
    let pghoard_dir = site_root.join("basebackup_chunk/2026-12-04_20-38_0");
    for f in [
        "2026-12-04_20-38_0.00000001.pghoard",
        "2026-12-04_20-38_0.00000001.pghoard.metadata",
    ] {
        std::fs::copy(
            pghoard_dir.join(f),
            stray.join(f.replace("2026-12-04_20-38_0", "2026-01-01_00-00_0")),
        )
        .unwrap();
    }
    backdate_tree(&stray, Duration::from_secs(2 * 86400));
    let pghoard_wrote = read_tree(&site_root);
    // Two unlisted chunk directories walhoard wrote (its `backup-name` metadata): one left two
    // days ago by an interrupted backup (an orphan: deleted), one written just now, as by a
    // backup another walhoard process is taking (kept: ORPHAN_MIN_AGE).
    let cfg: ObjectStorageConfig = serde_json::from_value(d.local_storage()).unwrap();
    let store = ObjectStore::open(&cfg, PGHOARD_SITE).unwrap();
    for name in ["2026-01-02_00-00_0", "2026-01-03_00-00_0"] {
        let mut meta = walhoard::storage::Metadata::new();
        meta.insert("backup-name".into(), name.into());
        store
            .put_bytes(
                &format!("basebackup_chunk/{name}/{name}.00000001.pghoard"),
                b"chunk",
                &meta,
            )
            .await
            .unwrap();
    }
    backdate_tree(
        &site_root.join("basebackup_chunk/2026-01-02_00-00_0"),
        Duration::from_secs(2 * 86400),
    );
    assert!(
        pghoard_wrote.len() > 60,
        "fixture unpacked {} files",
        pghoard_wrote.len()
    );

    write_pghoard_site_config(&d, &pg);
    let daemon = Daemon::start(&d);
    // The archive's WAL is another cluster's: the site streams nothing (it drops the slot it
    // created and raises this alert), while basebackups and retention still run.
    assert!(
        crate::common::wait_until(Duration::from_secs(30), || d
            .alert_dir()
            .join("foreign_archive_main")
            .exists()),
        "the site did not refuse pghoard's archive; log:\n{}",
        daemon.log_text()
    );
    d.wait_http();
    let taken = [requested_backup(&d, &daemon), requested_backup(&d, &daemon)];
    // Retention ran after the second backup (it does so before answering the request): it
    // acted on walhoard's own backups...
    wait_retention_applied(&daemon);
    assert!(
        store
            .stat(&format!("basebackup/{}", taken[0]))
            .await
            .unwrap()
            .is_none(),
        "retention kept walhoard's older backup {}; log:\n{}",
        taken[0],
        daemon.log_text()
    );
    assert!(store
        .stat(&format!("basebackup/{}", taken[1]))
        .await
        .unwrap()
        .is_some());
    // ...and every object pghoard wrote is still there, byte for byte.
    let now = read_tree(&site_root);
    let mut lost = Vec::new();
    for (rel, bytes) in &pghoard_wrote {
        match now.get(rel) {
            Some(b) if b == bytes => {}
            Some(_) => lost.push(format!("{rel} (changed)")),
            None => lost.push(format!("{rel} (deleted)")),
        }
    }
    assert!(
        lost.is_empty(),
        "pghoard's objects lost: {lost:?}; log:\n{}",
        daemon.log_text()
    );
    assert!(
        store
            .list("basebackup_chunk/2026-01-02_00-00_0")
            .await
            .unwrap()
            .is_empty(),
        "walhoard's interrupted backup's chunks survived; log:\n{}",
        daemon.log_text()
    );
    assert_eq!(
        store
            .list("basebackup_chunk/2026-01-03_00-00_0")
            .await
            .unwrap()
            .len(),
        1,
        "chunks written a moment ago (a backup maybe still running) were deleted"
    );
    // The stray directory was reported, not deleted.
    assert!(
        daemon
            .log_text()
            .contains("basebackup_chunk/2026-01-01_00-00_0/"),
        "{}",
        daemon.log_text()
    );
    // pghoard's backups are listed for scheduling (and their WAL kept), walhoard's own apart.
    let listed = walhoard::daemon::basebackups::list_backups(&store)
        .await
        .unwrap();
    let mut names: Vec<(&str, bool)> = listed.iter().map(|b| (b.name.as_str(), b.own)).collect();
    names.sort();
    let mut want = vec![
        ("2026-12-04_20-38_0", false),
        ("2026-12-04_20-39_0", false),
        (taken[1].as_str(), true),
    ];
    want.sort();
    assert_eq!(names, want);

    // `walhoard check` names what retention left alone.
    check_fails_with(&d.config_path(), |l| {
        l.contains("archive contents") && l.contains("basebackup_chunk/2026-01-01_00-00_0/")
    });
}

/// Applies retention to site `s`, which must delete no backup; how many WAL segments it
/// deleted.
async fn retention_keeping_every_backup(
    store: &ObjectStore,
    site: &walhoard::config::SiteConfig,
) -> usize {
    let (deleted, wal) = walhoard::daemon::basebackups::apply_retention(store, "s", site)
        .await
        .unwrap();
    assert!(deleted.is_empty(), "{deleted:?}");
    wal
}

/// Site `s` in local storage under `dir`, with the site settings `counts` (JSON members, the
/// basebackup counts): its configuration and its store.
fn local_site(dir: &Path, counts: &str) -> (walhoard::config::SiteConfig, ObjectStore) {
    let text = format!(
        r#"{{"backup_location": "{0}/spool", "backup_sites": {{"s": {{"nodes": ["host=/tmp"],
            {counts},
            "object_storage": {{"storage_type": "local", "directory": "{0}/archive"}}}}}}}}"#,
        dir.display()
    );
    let config = walhoard::config::Config::parse(&text, "t.json").unwrap();
    let store = walhoard::settings::open_store(&config, "s").unwrap();
    (config.backup_sites["s"].clone(), store)
}

/// A forged archive in local storage (no server needed: retention reads only the store):
/// walhoard's backups B1 (start segment 3) and B2 (start 5), WAL segments 1-6, an object
/// under `basebackup/` that neither walhoard nor pghoard wrote and whose start is unknown, and
/// a walhoard control object whose start does not parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_all_wal_when_a_backup_start_is_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let (site, store) = local_site(
        dir.path(),
        r#""basebackup_count": 2, "basebackup_count_min": 2"#,
    );
    let put = |key: String, pairs: Vec<(&'static str, String)>| {
        let store = store.clone();
        async move {
            let meta: walhoard::storage::Metadata =
                pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            store.put_bytes(&key, b"x", &meta).await.unwrap();
        }
    };
    for (name, seg, time) in [
        ("b1", "000000010000000000000003", "2026-01-01T00:00:00Z"),
        ("b2", "000000010000000000000005", "2026-01-02T00:00:00Z"),
    ] {
        put(
            format!("basebackup/{name}"),
            vec![
                ("backup-name", name.into()),
                ("format", "walhoard-bb-stream-v1".into()),
                ("start-wal-segment", seg.into()),
                ("start-time", time.into()),
            ],
        )
        .await;
    }
    // Not written by walhoard nor pghoard: it may be a backup of a kind this version does not
    // know, needing WAL from anywhere.
    put(
        "basebackup/unknown".into(),
        vec![("format", "other-tool-v9".into())],
    )
    .await;
    // walhoard's, but with a start that does not parse: neither counted nor deleted (it
    // would be the newest by modification time, pushing b1 out at count 2).
    put(
        "basebackup/b0".into(),
        vec![
            ("backup-name", "b0".into()),
            ("format", "walhoard-bb-stream-v1".into()),
            ("start-wal-segment", "garbage".into()),
        ],
    )
    .await;
    // walhoard's WAL (its mark), which retention may delete once no kept backup needs it.
    for seg in 1..=6 {
        put(
            format!("xlog/00000001000000000000000{seg}"),
            vec![(walhoard::storage::meta::WALHOARD_WRITER, "walhoard".into())],
        )
        .await;
    }
    let wal = retention_keeping_every_backup(&store, &site).await;
    assert_eq!(
        wal, 0,
        "WAL deleted although a kept backup's start is unknown"
    );
    assert_eq!(store.list("xlog").await.unwrap().len(), 6);
    assert!(store.stat("basebackup/unknown").await.unwrap().is_some());
    assert!(store.stat("basebackup/b0").await.unwrap().is_some());

    // WAL another tool wrote (no walhoard-writer), older than every backup: never deleted.
    put("xlog/000000020000000000000001".into(), vec![]).await;
    // Once both are gone, walhoard's WAL before b1's start goes (b1 and b2 are both kept at
    // count 2).
    store.delete("basebackup/unknown").await.unwrap();
    store.delete("basebackup/b0").await.unwrap();
    let wal = retention_keeping_every_backup(&store, &site).await;
    assert_eq!(wal, 2);
    let left = crate::common::keys(&store, "xlog").await;
    assert_eq!(
        left.first().map(String::as_str),
        Some("xlog/000000010000000000000003")
    );
    assert!(
        left.iter().any(|k| k == "xlog/000000020000000000000001"),
        "WAL without walhoard's mark deleted: {left:?}"
    );
}

/// Issue 14 item 11 in the daemon: a `basebackup/` entry whose sidecar is not JSON made
/// `list_backups` fail, so the scheduler never listed (and never took a scheduled backup) and
/// retention failed every time. Now it is left alone, reported, and keeps all WAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_and_scheduling_survive_a_damaged_basebackup_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (site, store) = local_site(dir.path(), r#""basebackup_count": 1"#);
    let mut meta = walhoard::storage::Metadata::new();
    meta.insert("backup-name".into(), "b1".into());
    meta.insert(
        "start-wal-segment".into(),
        "000000010000000000000003".into(),
    );
    meta.insert("start-time".into(), "2026-01-01T00:00:00Z".into());
    store.put_bytes("basebackup/b1", b"x", &meta).await.unwrap();
    store
        .put_bytes("xlog/000000010000000000000001", b"x", &Default::default())
        .await
        .unwrap();
    std::fs::write(dir.path().join("archive/s/basebackup/damaged"), b"x").unwrap();
    std::fs::write(
        dir.path().join("archive/s/basebackup/damaged.metadata"),
        b"{not json",
    )
    .unwrap();

    let listed = walhoard::daemon::basebackups::list_backups(&store)
        .await
        .unwrap();
    let names: Vec<&str> = listed.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["b1"]);
    let wal = retention_keeping_every_backup(&store, &site).await;
    assert_eq!(
        wal, 0,
        "WAL deleted although a damaged entry's start is unknown"
    );
    assert!(store.stat("basebackup/damaged").await.unwrap().is_some());
    let inv = walhoard::basebackup::inventory::scan(&store, 0.0)
        .await
        .unwrap();
    let unrecognised = inv.unrecognised();
    assert!(
        unrecognised.len() == 1 && unrecognised[0].starts_with("basebackup/damaged: metadata"),
        "{unrecognised:?}"
    );
}

/// Deleting one of walhoard's backups deletes only the objects walhoard wrote for it: an
/// object another tool put into its chunk directory stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_the_chunks_walhoard_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let (site, store) = local_site(dir.path(), r#""basebackup_count": 1"#);
    for (name, seg, time) in [
        ("b1", "000000010000000000000003", "2026-01-01T00:00:00Z"),
        ("b2", "000000010000000000000005", "2026-01-02T00:00:00Z"),
    ] {
        let mut meta = walhoard::storage::Metadata::new();
        meta.insert("backup-name".into(), name.into());
        meta.insert("start-wal-segment".into(), seg.into());
        meta.insert("start-time".into(), time.into());
        store
            .put_bytes(&format!("basebackup/{name}"), b"x", &meta)
            .await
            .unwrap();
        store
            .put_bytes(&format!("basebackup_chunk/{name}/base.tar"), b"x", &meta)
            .await
            .unwrap();
    }
    store
        .put_bytes(
            "basebackup_chunk/b1/someone-elses",
            b"x",
            &Default::default(),
        )
        .await
        .unwrap();
    let (deleted, _) = walhoard::daemon::basebackups::apply_retention(&store, "s", &site)
        .await
        .unwrap();
    assert_eq!(deleted, ["b1"]);
    let left = crate::common::keys(&store, "basebackup_chunk").await;
    assert_eq!(
        left,
        [
            "basebackup_chunk/b1/someone-elses",
            "basebackup_chunk/b2/base.tar"
        ]
    );
    assert!(store.stat("basebackup/b1").await.unwrap().is_none());
}
