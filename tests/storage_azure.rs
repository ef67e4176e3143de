//! Azure Blob storage against Azurite, configured with pghoard's azure keys.

use walhoard::config::ObjectStorageConfig;
use walhoard::storage::ObjectStore;
use walhoard_testkit::azure::{AzuriteServer, ACCOUNT, ACCOUNT_KEY};

use crate::storage::{exercise, metadata, upload_breaks_midway};

pub(crate) fn azure_config(server: &AzuriteServer, key: &str) -> ObjectStorageConfig {
    serde_json::from_value(serde_json::json!({
        "storage_type": "azure",
        "account_name": ACCOUNT,
        "account_key": key,
        "bucket_name": "archive",
        "host": "127.0.0.1",
        "port": server.port,
        "is_secure": false,
    }))
    .unwrap()
}

/// An Azure store with 1 MiB blocks, so a few MiB make a multi-block upload.
pub(crate) fn azure_store(server: &AzuriteServer) -> ObjectStore {
    ObjectStore::open(&azure_config(server, ACCOUNT_KEY), "site1")
        .unwrap()
        .with_chunk_size(1 << 20)
}

#[tokio::test]
async fn storage_azure_round_trip_blocks_and_native_metadata() {
    let server = AzuriteServer::start("archive").unwrap();
    let store = azure_store(&server);
    // 3 MiB + 5 in 1 MiB blocks: Put Block ×4, then Put Block List.
    exercise(&store, 3 * (1 << 20) + 5).await;
    // Metadata is native (x-ms-meta-*): no sidecar blob next to the object.
    store
        .put_bytes("xlog/00000001000000000000000A", b"segment", &metadata())
        .await
        .unwrap();
    assert_eq!(
        store
            .metadata("xlog/00000001000000000000000A")
            .await
            .unwrap(),
        metadata()
    );
    assert_eq!(
        store
            .stat("xlog/00000001000000000000000A.metadata")
            .await
            .unwrap(),
        None
    );
    // Uncommitted blocks of a broken upload are never visible.
    upload_breaks_midway(&store, 3 << 20).await;
    assert_eq!(
        crate::common::keys(&store, "xlog").await,
        vec!["xlog/00000001000000000000000A"]
    );
}

#[tokio::test]
async fn storage_azure_wrong_key_is_permanent() {
    let server = AzuriteServer::start("archive").unwrap();
    // A valid base64 key that is not the account's.
    let wrong = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmcta2V5LXdyb25nLWtleQ==";
    let store = ObjectStore::open(&azure_config(&server, wrong), "site1").unwrap();
    let err = store
        .put_bytes("xlog/x", b"data", &metadata())
        .await
        .unwrap_err();
    assert!(
        !err.is_transient(),
        "refused key must not be retried: {err}"
    );
    assert!(err.to_string().contains("xlog/x"), "{err}");
}
