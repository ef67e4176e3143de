//! The daemon's HTTP API as a hostile local process would use it: restore requests whose
//! target is outside the site's pg_data_directory, or reaches out of it through `..` or a
//! symlink, and many restore requests at once. A real daemon streaming a real cluster.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::json;
use walhoard_testkit::PgCluster;

use crate::daemon_support::*;

const TARGET: &str = "x-pghoard-target-path";

/// A daemon whose site `main` has `pg_data_directory` = `<dir>/pgdata`, with three archived
/// segments; `top` is merged into the configuration's top level.
pub(crate) struct Api {
    pub(crate) pg: PgCluster,
    pub(crate) d: DaemonDir,
    pub(crate) daemon: Daemon,
    pub(crate) data: PathBuf,
    pub(crate) names: Vec<String>,
}

pub(crate) async fn api(top: serde_json::Value) -> Api {
    let pg = PgCluster::builder()
        .setting("wal_keep_size", "'1GB'")
        .start()
        .unwrap();
    let d = DaemonDir::new();
    let data = d.path("pgdata");
    std::fs::create_dir_all(data.join("pg_wal")).unwrap();
    let storage = d.local_storage();
    d.write_config(&pg, storage.clone(), json!({ "pg_data_directory": data }));
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.config_path()).unwrap()).unwrap();
    for (k, v) in top.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    std::fs::write(d.config_path(), cfg.to_string()).unwrap();
    let daemon = Daemon::start(&d);
    wait_slot(&pg, &daemon);
    d.wait_http();
    let store = d.store(&storage);
    let mut names = Vec::new();
    for _ in 0..3 {
        load(&pg, 2_000, 0);
        names.push(switch_segment(&pg));
    }
    wait_all_archived(&store, &names, Duration::from_secs(60), &daemon).await;
    Api {
        pg,
        d,
        daemon,
        data,
        names,
    }
}

impl Api {
    /// `GET /main/archive/<file>` with the target header (if any): status and body.
    pub(crate) async fn restore(&self, file: &str, target: Option<&Path>) -> (StatusCode, String) {
        let headers: Vec<(&str, String)> = target
            .map(|t| (TARGET, t.display().to_string()))
            .into_iter()
            .collect();
        walhoard::api_client::request(
            "127.0.0.1",
            self.d.http_port,
            Method::GET,
            &format!("/main/archive/{file}"),
            &headers,
        )
        .await
        .unwrap()
    }

    async fn status(&self) -> serde_json::Value {
        let (status, body) = walhoard::api_client::request(
            "127.0.0.1",
            self.d.http_port,
            Method::GET,
            "/status",
            &[],
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    pub(crate) fn same_as_pg_wal(&self, restored: &Path, name: &str) -> bool {
        std::fs::read(restored).ok() == std::fs::read(self.pg.wal_dir().join(name)).ok()
    }
}

/// Every entry under `dir`, recursively, without following links: (path, file content).
fn tree(dir: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                todo.push(p.clone());
                out.push((p, None));
            } else if meta.is_file() {
                out.push((p.clone(), Some(std::fs::read(&p).unwrap())));
            } else {
                out.push((p, None));
            }
        }
    }
    out.sort();
    out
}

/// Issue 14 item 8: `x-pghoard-target-path` was written wherever it pointed (with ~96 MB of
/// prefetch beside it): any local process could make the daemon overwrite any file it can
/// write. Anywhere but a file directly in `<pg_data_directory>/pg_wal` (where PostgreSQL's %p
/// points), through `..`, or through a symlink: 400, nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_restore_target_outside_pg_data_directory_is_refused() {
    let a = api(json!({ "restore_prefetch": 2 })).await;
    let outside = a.d.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("victim"), b"keep").unwrap();
    let pg_wal = a.data.join("pg_wal");
    std::os::unix::fs::symlink(&outside, pg_wal.join("dir-link")).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), pg_wal.join("file-link")).unwrap();
    std::os::unix::fs::symlink(&outside, a.data.join("data-link")).unwrap();
    std::fs::create_dir_all(a.data.join("global")).unwrap();
    std::fs::write(a.data.join("global/pg_control"), b"control").unwrap();
    let outside_before = tree(&outside);
    let data_before = tree(&a.data);
    let seg = &a.names[0];
    for (target, why) in [
        (
            outside.join("victim"),
            "outside the site's pg_data_directory",
        ),
        (outside.join("new"), "outside the site's pg_data_directory"),
        (a.data.join("../outside/new"), "'..' is not allowed"),
        (pg_wal.join("../../outside/victim"), "'..' is not allowed"),
        (pg_wal.join("dir-link/new"), "not a file directly in"),
        (pg_wal.join("dir-link"), "is a symlink"),
        (
            a.data.join("data-link/pg_wal/new"),
            "not a file directly in",
        ),
        (pg_wal.join("file-link"), "is a symlink"),
        (a.data.join("global/pg_control"), "not a file directly in"),
        (PathBuf::from("pg_wal/RECOVERYXLOG"), "not an absolute path"),
    ] {
        let (status, body) = a.restore(seg, Some(&target)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{target:?}: {body}");
        assert!(body.contains(why), "{target:?}: {body}");
    }
    let (status, body) = a.restore(seg, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        tree(&outside),
        outside_before,
        "written outside pg_data_directory"
    );
    assert_eq!(
        tree(&a.data),
        data_before,
        "a refused request wrote into the data directory"
    );

    // Inside: served, and the prefetch lands beside it, with no temporary file left.
    let target = pg_wal.join("RECOVERYXLOG");
    let (status, body) = a.restore(seg, Some(&target)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(a.same_as_pg_wal(&target, seg));
    let left: Vec<_> = tree(&a.data)
        .into_iter()
        .filter(|(p, _)| p.to_string_lossy().ends_with(".walhoard.prefetch"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    assert!(pg_wal
        .join(".walhoard-prefetch")
        .join(&a.names[1])
        .is_file());
    assert_eq!(tree(&outside), outside_before);
    // The daemon says what it refused.
    assert!(a
        .daemon
        .log_text()
        .contains("restore_command request refused"));
}

/// Issue 14 item 8: 50 restore requests at once all ran at once (RSS 186 → 680 MB, not
/// returned). With `http_restore_concurrency` 2, a burst of requests is answered in full
/// while no more than two run at a time (the daemon reports what it observed in /status).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_restore_concurrency_is_bounded() {
    let a = std::sync::Arc::new(
        api(json!({ "restore_prefetch": 2, "http_restore_concurrency": 2 })).await,
    );
    let burst = 12;
    for round in 0..5 {
        let mut requests = tokio::task::JoinSet::new();
        for i in 0..burst {
            let a = a.clone();
            requests.spawn(async move {
                let name = &a.names[i % a.names.len()];
                let target = a.data.join(format!("pg_wal/RECOVERYXLOG-{round}-{i}"));
                let (status, body) = a.restore(name, Some(&target)).await;
                assert_eq!(status, StatusCode::CREATED, "{body}");
                assert!(a.same_as_pg_wal(&target, name), "{name} differs");
            });
        }
        while let Some(r) = requests.join_next().await {
            r.unwrap();
        }
        let s = &a.status().await["http_restores"];
        assert_eq!(s["limit"], 2, "{s}");
        let running_max = s["running_max"].as_u64().unwrap();
        assert!((1..=2).contains(&running_max), "{s}");
        assert_eq!(
            (s["running"].as_u64(), s["in_flight"].as_u64()),
            (Some(0), Some(0)),
            "{s}"
        );
        // The bound was tested only if requests did wait for a slot.
        if s["in_flight_max"].as_u64().unwrap() > 2 {
            return;
        }
        eprintln!("round {round}: the burst never had more than 2 requests in flight: {s}");
    }
    panic!("no burst had more than 2 restore requests in flight at once");
}

/// Issue 14 item 8: the restore's temporary file (then named `<file>.walhoard.prefetch`,
/// the same for every request) stayed behind when the rename onto the target failed.
#[tokio::test]
async fn restore_wal_file_removes_its_temporary_file_when_the_rename_fails() {
    use walhoard::pipeline::compression::{Algorithm, CompressionSettings};
    let t = tempfile::tempdir().unwrap();
    let store = walhoard::storage::ObjectStore::open(
        &serde_json::from_value(
            json!({"storage_type": "local", "directory": t.path().join("archive")}),
        )
        .unwrap(),
        "main",
    )
    .unwrap();
    let history = t.path().join("00000002.history");
    std::fs::write(&history, "1\t0/3000000\tno recovery target specified\n").unwrap();
    walhoard::pipeline::transfer::upload(
        &store,
        walhoard::pipeline::transfer::Upload::wal(
            "timeline/00000002.history",
            walhoard::pipeline::transfer::Source::File(history.to_path_buf()),
            CompressionSettings::new(Algorithm::Snappy),
            None,
            walhoard::pipeline::hash::HashAlgorithm::Sha1,
        ),
    )
    .await
    .unwrap();
    let pg_wal = t.path().join("pg_wal");
    // The target is a directory that is not empty: the download and the check succeed, the
    // rename onto it fails.
    std::fs::create_dir_all(pg_wal.join("RECOVERYHISTORY/x")).unwrap();
    let keys = walhoard::pipeline::encryption::KeyRing::default();
    let r = walhoard::restore::wal::restore_wal_file(
        &store,
        &keys,
        "00000002.history",
        &pg_wal.join("RECOVERYHISTORY"),
        0,
    )
    .await;
    let e = r.expect_err("renamed onto a directory");
    assert!(e.to_string().contains("rename onto"), "{e}");
    let left: Vec<_> = std::fs::read_dir(&pg_wal)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["RECOVERYHISTORY"], "temporary files left");
    // And the same request into a free name succeeds.
    walhoard::restore::wal::restore_wal_file(
        &store,
        &keys,
        "00000002.history",
        &pg_wal.join("H"),
        0,
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read(pg_wal.join("H")).unwrap(),
        std::fs::read(&history).unwrap()
    );
}
