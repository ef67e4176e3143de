//! The daemon never writes into another cluster's archive: a site whose prefix holds WAL of
//! another system identifier (here the real pghoard's archive, tests/data/pghoard-pg15) is
//! refused before anything streams, said loudly, and `walhoard check` fails with the reason.

use std::time::Duration;

use serde_json::json;
use walhoard::config::ObjectStorageConfig;
use walhoard::storage::ObjectStore;
use walhoard_testkit::PgCluster;

use crate::common::wait_until;
use crate::daemon_support::*;
use crate::retention::{read_tree, unpack_pghoard_archive, PGHOARD_SITE};

/// The fixture's newest WAL object: the one whose first page names pghoard's cluster.
const NEWEST: &str = "xlog/000000010000000000000008";

/// Regression: a daemon attached to a new cluster (another system identifier) on a prefix that
/// held pghoard's WAL streamed from 0/1000000 and replaced `xlog/…02`..`…08` with its own WAL.
/// Now it refuses: no object changes, the slot it created is dropped, the ERROR, the alert
/// file, the state file and `walhoard check` all name both identifiers and the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_refuses_an_archive_of_another_cluster() {
    let pg = PgCluster::start().unwrap();
    let primary: u64 = crate::common::system_identifier(&pg);
    let d = DaemonDir::new();
    let archive = d.path("archive");
    unpack_pghoard_archive(&archive);
    let site_root = archive.join(PGHOARD_SITE);
    let pghoard_wrote = read_tree(&site_root);
    // pghoard's cluster, read from its newest segment's long page header (xlp_sysid at byte
    // 24) as the oracle, not from walhoard's code under test.
    let cfg: ObjectStorageConfig = serde_json::from_value(d.local_storage()).unwrap();
    let store = ObjectStore::open(&cfg, PGHOARD_SITE).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let seg = std::fs::read(restore(&store, &d.ring(), NEWEST, scratch.path()).await).unwrap();
    let theirs = u64::from_le_bytes(seg[24..32].try_into().unwrap());
    assert_ne!(theirs, primary, "initdb gave the same system identifier");

    d.write_config(
        &pg,
        d.local_storage(),
        json!({"prefix": PGHOARD_SITE, "encryption_key_id": null}),
    );
    let mut daemon = Daemon::start(&d);
    let alert = d.alert_dir().join("foreign_archive_main");
    assert!(
        wait_until(Duration::from_secs(30), || alert.exists()),
        "no foreign_archive alert; log:\n{}",
        daemon.log_text()
    );
    // The new cluster writes segments 1..5 (the names of pghoard's 2..8 included): an old
    // daemon archived them over pghoard's objects within a second or two.
    for _ in 0..5 {
        switch_segment(&pg);
    }
    std::thread::sleep(Duration::from_secs(3));
    let want = |text: &str| {
        text.contains(&theirs.to_string())
            && text.contains(&primary.to_string())
            && text.contains(NEWEST)
    };
    let log = daemon.log_text();
    assert!(
        log.lines().any(|l| l.contains("ERROR") && want(l)),
        "no ERROR naming both identifiers and {NEWEST}; log:\n{log}"
    );
    let detail = std::fs::read_to_string(&alert).unwrap();
    assert!(want(&detail), "{detail}");
    assert!(
        wait_until(Duration::from_secs(5), || d
            .state()
            .and_then(
                |s| s["backup_sites"]["main"]["walreceiver"]["foreign_archive"]
                    .as_str()
                    .map(want)
            )
            .unwrap_or(false)),
        "state file: {:?}",
        d.state()
    );
    assert!(
        slot_restart(&pg).is_none(),
        "the slot created for a refused site holds the primary's WAL; log:\n{log}"
    );
    daemon.terminate(Duration::from_secs(30));
    // Nothing uploaded, nothing deleted, nothing changed.
    let now = read_tree(&site_root);
    let changed: Vec<&String> = now
        .keys()
        .chain(pghoard_wrote.keys())
        .filter(|k| now.get(*k) != pghoard_wrote.get(*k))
        .collect();
    assert!(
        changed.is_empty(),
        "objects changed: {changed:?}; log:\n{log}"
    );

    check_fails_with(&d.config_path(), |l| l.contains("archive owner") && want(l));
}

/// The same check passes on the primary's own archive, and the daemon archives as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_accepts_the_clusters_own_archive() {
    let pg = PgCluster::start().unwrap();
    let (d, daemon, store, _) = LocalDaemon::streaming(&pg);
    let done = switch_segment(&pg);
    wait_archived(&store, &done, Duration::from_secs(30), &daemon).await;
    check_passes_with(&d.config_path(), |l| l.contains("archive owner"));
    assert!(!d.alert_dir().join("foreign_archive_main").exists());
}

/// Regression: a daemon configured with only the public key (it encrypts, it cannot decrypt)
/// could not read the first page of the archive's newest encrypted segment, logged "cannot
/// tell whose WAL the archive holds" and streamed anyway — into another cluster's walhoard
/// archive. The identifier walhoard records in each WAL object's metadata now tells it
/// without a key: it refuses, and `walhoard check` (also without the private key) fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_without_private_key_refuses_another_clusters_archive() {
    let first = PgCluster::start().unwrap();
    let (d, mut daemon, store, _) = LocalDaemon::streaming(&first);
    let done = switch_segment(&first);
    wait_archived(&store, &done, Duration::from_secs(30), &daemon).await;
    daemon.terminate(Duration::from_secs(30));
    let key = format!("xlog/{done}");
    let recorded =
        walhoard::storage::meta::ObjectMeta::parse(&key, &store.metadata(&key).await.unwrap())
            .unwrap();
    let theirs = crate::common::system_identifier(&first);
    assert_eq!(recorded.system_identifier, Some(theirs));
    let before = read_tree(&d.path("archive"));
    drop(first);

    let second = PgCluster::start().unwrap();
    let primary = crate::common::system_identifier(&second);
    assert_ne!(theirs, primary, "initdb gave the same system identifier");
    d.write_config(
        &second,
        d.local_storage(),
        json!({"encryption_keys": {"k1": {"public": d.public}}}),
    );
    let mut daemon = Daemon::start(&d);
    let alert = d.alert_dir().join("foreign_archive_main");
    assert!(
        wait_until(Duration::from_secs(30), || alert.exists()),
        "no foreign_archive alert; log:\n{}",
        daemon.log_text()
    );
    for _ in 0..3 {
        switch_segment(&second);
    }
    std::thread::sleep(Duration::from_secs(2));
    let detail = std::fs::read_to_string(&alert).unwrap();
    assert!(
        detail.contains(&theirs.to_string()) && detail.contains(&primary.to_string()),
        "{detail}"
    );
    daemon.terminate(Duration::from_secs(30));
    let now = read_tree(&d.path("archive"));
    let changed: Vec<&String> = now
        .keys()
        .chain(before.keys())
        .filter(|k| now.get(*k) != before.get(*k))
        .collect();
    assert!(changed.is_empty(), "objects changed: {changed:?}");
    check_fails_with(&d.config_path(), |l| {
        l.contains("archive owner") && l.contains(&theirs.to_string())
    });
}
