//! WAL deletion acts only on WAL walhoard wrote (issue 15 item 1): every WAL object the daemon
//! stores carries `walhoard-writer`; retention deletes old WAL only when it carries it, so the
//! WAL the real pghoard wrote (tests/data/pghoard-pg15) survives, reported, however old.

use std::time::Duration;

use walhoard::config::ObjectStorageConfig;
use walhoard::storage::meta;
use walhoard::storage::ObjectStore;
use walhoard_protocol::WalSegmentName;

use crate::daemon_support::*;
use crate::retention::{
    cluster_past_the_fixtures_wal, read_tree, requested_backup, unpack_pghoard_archive,
    wait_retention_applied, write_pghoard_site_config, PGHOARD_SITE,
};

/// `(log, seg)` of a WAL file name, for comparing positions whatever the timeline.
fn position(name: &str) -> (u32, u32) {
    let id = name
        .parse::<WalSegmentName>()
        .unwrap()
        .segment()
        .unwrap_or_else(|| panic!("{name} is not a segment"));
    (id.log, id.seg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_the_wal_walhoard_wrote() {
    let pg = cluster_past_the_fixtures_wal();
    let d = DaemonDir::new();
    let fixture = d.path("fixture");
    unpack_pghoard_archive(&fixture);
    let pghoard_wal = read_tree(&fixture.join(PGHOARD_SITE).join("xlog"));
    assert!(
        pghoard_wal.len() >= 14,
        "fixture has {} WAL files",
        pghoard_wal.len()
    );

    // The pghoard user deleted pghoard's old backups (docs/migrating-from-pghoard.md), so
    // pghoard's WAL is older than every backup that stays.
    write_pghoard_site_config(&d, &pg);
    let cfg: ObjectStorageConfig = serde_json::from_value(d.local_storage()).unwrap();
    let store = ObjectStore::open(&cfg, PGHOARD_SITE).unwrap();
    let daemon = Daemon::start(&d);
    wait_slot(&pg, &daemon);
    d.wait_http();
    let first = requested_backup(&d, &daemon);
    let written: Vec<String> = (0..3).map(|_| switch_segment(&pg)).collect();
    wait_all_archived(&store, &written, Duration::from_secs(60), &daemon).await;
    // pghoard's WAL joins the archive now, after the daemon compared the archive's newest WAL
    // with the primary (it is another cluster's: the fixture's).
    let xlog = d.path("archive").join(PGHOARD_SITE).join("xlog");
    for (rel, bytes) in &pghoard_wal {
        std::fs::write(xlog.join(rel), bytes).unwrap();
    }
    // Every WAL object the daemon stored carries the mark.
    for name in &written {
        let m = store.metadata(&format!("xlog/{name}")).await.unwrap();
        assert_eq!(
            m.get(meta::WALHOARD_WRITER).map(String::as_str),
            Some(meta::WALHOARD_WRITER_VALUE),
            "xlog/{name}: {m:?}"
        );
    }

    let second = requested_backup(&d, &daemon);
    wait_retention_applied(&daemon);
    assert!(store
        .stat(&format!("basebackup/{first}"))
        .await
        .unwrap()
        .is_none());
    let start = store
        .metadata(&format!("basebackup/{second}"))
        .await
        .unwrap()
        .get(meta::START_WAL_SEGMENT)
        .cloned()
        .unwrap();
    // walhoard's WAL before the kept backup's start is deleted...
    for name in &written {
        assert!(position(name) < position(&start), "{name} vs {start}");
        assert!(
            !has(&store, name).await,
            "walhoard's xlog/{name} (before {start}) survived retention; log:\n{}",
            daemon.log_text()
        );
    }
    // ...pghoard's, older still, is all there, byte for byte (objects and sidecars).
    let now = read_tree(&xlog);
    for (rel, bytes) in &pghoard_wal {
        assert!(
            now.get(rel) == Some(bytes),
            "pghoard's xlog/{rel} deleted or changed; log:\n{}",
            daemon.log_text()
        );
    }
    let log = daemon.log_text();
    assert!(
        log.contains("lack walhoard's walhoard-writer metadata")
            && log.contains("xlog/000000010000000000000002"),
        "{log}"
    );
    // `walhoard check` reports what retention leaves (not as a failure).
    let wal_objects = pghoard_wal
        .keys()
        .filter(|k| !k.ends_with(".metadata"))
        .count();
    check_passes_with(&d.config_path(), |l| {
        l.contains("WAL retention") && l.contains(&format!("{wal_objects} WAL object(s)"))
    });
}
