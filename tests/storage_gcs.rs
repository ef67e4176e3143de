//! Google Cloud Storage against fake-gcs-server (unsigned requests to a `host`/`port`
//! endpoint). Only single-request uploads: OpenDAL writes larger objects with GCS's XML
//! multipart API, which fake-gcs-server does not implement (see docs/testing.md).

use walhoard::config::ObjectStorageConfig;
use walhoard::storage::ObjectStore;
use walhoard_testkit::gcs::GcsServer;

use crate::storage::{exercise, metadata, payload, upload_breaks_midway};

pub(crate) fn gcs_store(server: &GcsServer, chunk: usize) -> ObjectStore {
    let cfg: ObjectStorageConfig = serde_json::from_value(serde_json::json!({
        "storage_type": "google",
        "project_id": "walhoard-test",
        "bucket_name": "archive",
        "host": "127.0.0.1",
        "port": server.port,
        "is_secure": false,
    }))
    .unwrap();
    ObjectStore::open(&cfg, "site1")
        .unwrap()
        .with_chunk_size(chunk)
}

#[tokio::test]
async fn storage_gcs_round_trip_single_shot() {
    let server = GcsServer::start("archive").unwrap();
    // A chunk larger than the object: one upload request.
    let store = gcs_store(&server, 8 << 20);
    exercise(&store, 3 * (1 << 20) + 3).await;
    assert_eq!(
        store
            .stat("timeline/00000002.history.metadata")
            .await
            .unwrap(),
        None,
        "GCS metadata is native, no sidecar"
    );
    assert_eq!(
        store.metadata("timeline/00000002.history").await.unwrap(),
        metadata()
    );
}

/// Pins the emulator's limit, so the day it lifts this test says so: a multipart upload
/// (OpenDAL's XML API, `POST <object>?uploads`) is refused, and nothing becomes visible.
#[tokio::test]
async fn storage_gcs_multipart_refused_by_emulator_leaves_nothing() {
    let server = GcsServer::start("archive").unwrap();
    let store = gcs_store(&server, 5 << 20);
    let data = payload(12 << 20);
    let err = store
        .put("xlog/000000010000000000000003", &data[..], &metadata())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid uploadType"), "{err}");
    assert_eq!(
        store.stat("xlog/000000010000000000000003").await.unwrap(),
        None
    );
    upload_breaks_midway(&store, 3 << 20).await;
    assert!(store.list("xlog").await.unwrap().is_empty());
}
