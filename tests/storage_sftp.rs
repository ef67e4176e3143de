//! SFTP storage against OpenSSH's sshd (internal-sftp), configured with pghoard's sftp keys:
//! key authentication, strict host key checking, `.metadata` sidecars, writes renamed into place.

use walhoard::config::ObjectStorageConfig;
use walhoard::storage::{ObjectStore, StorageError};
use walhoard_testkit::sftp::SftpServer;

use crate::storage::{exercise, metadata, upload_breaks_midway};

pub(crate) fn sftp_config(server: &SftpServer) -> ObjectStorageConfig {
    serde_json::from_value(serde_json::json!({
        "storage_type": "sftp",
        "server": server.host(),
        "port": server.port,
        "username": server.username,
        "private_key": server.private_key(),
        "prefix": server.data_dir(),
    }))
    .unwrap()
}

pub(crate) fn sftp_store(server: &SftpServer) -> ObjectStore {
    ObjectStore::open(&sftp_config(server), "site1")
        .unwrap()
        .with_chunk_size(1 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_sftp_round_trip_with_sidecar_metadata() {
    let server = SftpServer::start().unwrap();
    let store = sftp_store(&server);
    exercise(&store, 3 * (1 << 20) + 11).await;
    // pghoard's layout under the prefix, with the JSON sidecar beside the object.
    let site = server.data_dir().join("site1");
    let side = site.join("timeline/00000002.history.metadata");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&side).unwrap()).unwrap();
    assert_eq!(v["compression-algorithm"], "zstd");
    assert_eq!(
        std::fs::read(site.join("timeline/00000002.history")).unwrap(),
        b"history file contents\n"
    );
    // Deleting removes the sidecar too.
    assert!(!site.join("xlog/000000010000000000000003.metadata").exists());

    // A broken upload leaves neither the object nor its temporary file.
    upload_breaks_midway(&store, 3 << 20).await;
    assert!(store.list("xlog").await.unwrap().is_empty());
    let tmp = site.join(".walhoard-tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "temporary files left: {left:?}");

    // Overwriting replaces the object in one rename.
    store
        .put_bytes("timeline/00000002.history", b"second", &metadata())
        .await
        .unwrap();
    let (got, meta) = store.get_bytes("timeline/00000002.history").await.unwrap();
    assert_eq!(got, b"second");
    assert_eq!(meta, metadata());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_sftp_refuses_passwords_unknown_keys_and_host_keys() {
    let server = SftpServer::start().unwrap();
    let mut cfg = serde_json::to_value(serde_json::json!({
        "storage_type": "sftp", "server": server.host(), "port": server.port,
        "username": server.username, "password": "secret", "prefix": server.data_dir(),
    }))
    .unwrap();
    let parse = |v: &serde_json::Value| -> ObjectStorageConfig {
        serde_json::from_value(v.clone()).unwrap()
    };
    let err = ObjectStore::open(&parse(&cfg), "site1").unwrap_err();
    assert!(err.to_string().contains("object_storage.password"), "{err}");
    assert!(
        !err.to_string().contains("secret"),
        "password leaked: {err}"
    );
    cfg.as_object_mut().unwrap().remove("password");

    // A key the server does not accept: refused, and not worth retrying.
    let other = tempfile::tempdir().unwrap();
    let key = other.path().join("id");
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(status.success());
    cfg["private_key"] = key.to_str().unwrap().into();
    let store = ObjectStore::open(&parse(&cfg), "site1").unwrap();
    let err = store
        .put_bytes("xlog/x", b"data", &metadata())
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Backend { .. }), "{err}");
    assert!(err.to_string().contains("xlog/x"), "{err}");
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("Permission denied"), "{err}");

    // The right client key, but the server's host key is not the one known: refused.
    server.distrust_host_key().unwrap();
    let store = sftp_store(&server);
    let err = store
        .put_bytes("xlog/y", b"data", &metadata())
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(
        err.to_string().contains("Host key verification failed"),
        "{err}"
    );
    assert!(!server.data_dir().join("site1/xlog/y").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_sftp_server_down_is_transient() {
    let mut server = SftpServer::start().unwrap();
    server.stop();
    let store = sftp_store(&server);
    let err = store
        .put_bytes("xlog/z", b"data", &metadata())
        .await
        .unwrap_err();
    assert!(err.is_transient(), "an sftp outage must be retried: {err}");
    server.resume().unwrap();
    store
        .put_bytes("xlog/z", b"data", &metadata())
        .await
        .unwrap();
    assert_eq!(store.get_bytes("xlog/z").await.unwrap().0, b"data");
}
