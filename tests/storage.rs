//! Object storage against real backends: local directories and S3 through s3s-fs (SigV4); the
//! shared contract ([`exercise`]) that the other backends' modules (`storage_azure`, ...) run too.

use std::time::Duration;

use walhoard::config::ObjectStorageConfig;
use walhoard::storage::retry::{with_retries, RetryPolicy, UPLOAD_RETRIES_WARNING};
use walhoard::storage::{Metadata, ObjectStore, StorageError, DIRECT_ALIGN};
use walhoard_testkit::s3::{S3Server, ACCESS_KEY, SECRET_KEY};

pub(crate) fn metadata() -> Metadata {
    [
        ("compression-algorithm", "zstd"),
        ("original-file-size", "16777216"),
        ("pg-version", "150018"),
        ("hash-algorithm", "sha1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Deterministic, not very compressible bytes.
pub(crate) fn payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn local_store(dir: &std::path::Path) -> ObjectStore {
    let cfg: ObjectStorageConfig =
        serde_json::from_value(serde_json::json!({"storage_type": "local", "directory": dir}))
            .unwrap();
    ObjectStore::open(&cfg, "site1")
        .unwrap()
        .with_chunk_size(1 << 20)
}

pub(crate) fn s3_config(server: &S3Server, secret: &str) -> ObjectStorageConfig {
    serde_json::from_value(serde_json::json!({
        "storage_type": "s3",
        "bucket_name": "archive",
        "region": "us-east-1",
        "aws_access_key_id": ACCESS_KEY,
        "aws_secret_access_key": secret,
        "host": server.endpoint_host(),
        "port": server.port,
        "is_secure": false,
    }))
    .unwrap()
}

/// Round trips, listing, metadata, deletion: the same contract on every backend.
pub(crate) async fn exercise(store: &ObjectStore, big: usize) {
    let small = b"history file contents\n".to_vec();
    store
        .put_bytes("timeline/00000002.history", &small, &metadata())
        .await
        .unwrap();
    let data = payload(big);
    let n = store
        .put("xlog/000000010000000000000003", &data[..], &metadata())
        .await
        .unwrap();
    assert_eq!(n, data.len() as u64);

    let (got, meta) = store.get_bytes("timeline/00000002.history").await.unwrap();
    assert_eq!(got, small);
    assert_eq!(meta, metadata());
    let mut out = Vec::new();
    let (meta, size) = store
        .get("xlog/000000010000000000000003", &mut out)
        .await
        .unwrap();
    assert_eq!(size, data.len() as u64);
    assert!(out == data, "large object differs after the round trip");
    assert_eq!(meta["original-file-size"], "16777216");

    // A whole object from memory (a sealed WAL segment; on local storage written directly,
    // not through OpenDAL), then gone again.
    let whole = payload(big / 2 + 7);
    let n = store
        .put_whole(
            "xlog/000000010000000000000004",
            bytes::Bytes::from(whole.clone()),
            &metadata(),
        )
        .await
        .unwrap();
    assert_eq!(n, whole.len() as u64);
    let mut out = Vec::new();
    let (meta, size) = store
        .get("xlog/000000010000000000000004", &mut out)
        .await
        .unwrap();
    assert_eq!((size, meta), (whole.len() as u64, metadata()));
    assert!(out == whole, "whole object differs after the round trip");
    store.delete("xlog/000000010000000000000004").await.unwrap();

    let info = store
        .stat("xlog/000000010000000000000003")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(
        store.stat("xlog/000000010000000000000004").await.unwrap(),
        None
    );
    let keys = crate::common::keys(store, "xlog").await;
    assert_eq!(keys, vec!["xlog/000000010000000000000003"]);
    assert!(store.list("basebackup").await.unwrap().is_empty());

    let err = store
        .get_bytes("xlog/000000010000000000000009")
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::NotFound { .. }), "{err}");
    assert!(!err.is_transient());
    assert!(store
        .put_bytes("../escape", b"x", &Metadata::new())
        .await
        .is_err());

    store.delete("xlog/000000010000000000000003").await.unwrap();
    assert_eq!(
        store.stat("xlog/000000010000000000000003").await.unwrap(),
        None
    );
    assert!(store.list("xlog").await.unwrap().is_empty());
}

#[tokio::test]
async fn storage_local_round_trip_with_sidecar_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let store = local_store(dir.path());
    exercise(&store, 5 * (1 << 20) + 123).await;
    // pghoard layout: <directory>/<site>/<key> with a JSON sidecar.
    let side = dir.path().join("site1/timeline/00000002.history.metadata");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(side).unwrap()).unwrap();
    assert_eq!(v["compression-algorithm"], "zstd");
    assert!(dir.path().join("site1/timeline/00000002.history").exists());
}

/// A source that fails midway: nothing may appear under the key.
pub(crate) struct FailingSource {
    pub(crate) left: usize,
}

impl tokio::io::AsyncRead for FailingSource {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.left == 0 {
            return std::task::Poll::Ready(Err(std::io::Error::other("source broke")));
        }
        let n = self.left.min(buf.remaining()).min(64 * 1024);
        buf.put_slice(&vec![1u8; n]);
        self.left -= n;
        std::task::Poll::Ready(Ok(()))
    }
}

/// Uploads from a source that breaks after `good` bytes: nothing may be visible afterwards.
pub(crate) async fn upload_breaks_midway(store: &ObjectStore, good: usize) {
    let key = "xlog/000000010000000000000005";
    let err = store
        .put(key, FailingSource { left: good }, &metadata())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("source broke"), "{err}");
    assert_eq!(store.stat(key).await.unwrap(), None);
}

/// A whole object written directly to local storage (with O_DIRECT when its buffer is
/// aligned) comes back as written and replaces the old one in one step, and a write that
/// fails leaves the old object (or none) and no temporary file.
#[tokio::test]
async fn storage_local_whole_object_replaced_or_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = local_store(dir.path());
    let key = "xlog/000000010000000000000005";
    for content in [&b"first"[..], &b"second, longer"[..]] {
        store
            .put_whole(key, bytes::Bytes::copy_from_slice(content), &metadata())
            .await
            .unwrap();
        assert_eq!(
            store.get_bytes(key).await.unwrap(),
            (content.to_vec(), metadata())
        );
    }
    // A buffer at a page boundary goes to disk with O_DIRECT (all but its last partial page);
    // a short one, or one that is not aligned, through the page cache: the same bytes back.
    let data = payload(3 * DIRECT_ALIGN + 123);
    for (len, aligned) in [
        (data.len(), true),
        (3 * DIRECT_ALIGN, true),
        (100, true),
        (data.len(), false),
    ] {
        let mut v = vec![0u8; len + 2 * DIRECT_ALIGN];
        let at = v.as_ptr().align_offset(DIRECT_ALIGN) + usize::from(!aligned);
        v[at..at + len].copy_from_slice(&data[..len]);
        let buf = bytes::Bytes::from(v).slice(at..at + len);
        assert_eq!(buf.as_ptr().align_offset(DIRECT_ALIGN) == 0, aligned);
        store.put_whole(key, buf, &metadata()).await.unwrap();
        assert!(
            store.get_bytes(key).await.unwrap().0 == data[..len],
            "{len} bytes, aligned {aligned}: differ after the round trip"
        );
    }
    // A directory where the object would go: the rename fails.
    let blocked = "xlog/000000010000000000000006";
    std::fs::create_dir_all(dir.path().join("site1").join(blocked).join("x")).unwrap();
    let err = store
        .put_whole(blocked, bytes::Bytes::from_static(b"data"), &metadata())
        .await
        .unwrap_err();
    assert!(err.to_string().contains(blocked), "{err}");
    assert!(dir.path().join("site1").join(blocked).join("x").is_dir());
    let tmp = dir.path().join(".walhoard-tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    assert!(store.get_bytes(key).await.unwrap().0 == data[..]);
}

#[tokio::test]
async fn storage_failed_upload_leaves_nothing_visible() {
    let dir = tempfile::tempdir().unwrap();
    let store = local_store(dir.path());
    upload_breaks_midway(&store, 3 << 20).await;
    assert!(store.list("xlog").await.unwrap().is_empty());

    let server = S3Server::start("archive").unwrap();
    let store = ObjectStore::open(&s3_config(&server, SECRET_KEY), "site1")
        .unwrap()
        .with_chunk_size(5 << 20);
    upload_breaks_midway(&store, 12 << 20).await;
}

#[tokio::test]
async fn storage_s3_round_trip_multipart() {
    let server = S3Server::start("archive").unwrap();
    // 5 MiB parts: a 12 MiB object is a three-part multipart upload.
    let store = ObjectStore::open(&s3_config(&server, SECRET_KEY), "site1")
        .unwrap()
        .with_chunk_size(5 << 20);
    exercise(&store, 12 * (1 << 20) + 7).await;
    // pghoard layout inside the bucket.
    assert!(server
        .data_dir()
        .join("archive/site1/timeline/00000002.history")
        .exists());
}

#[tokio::test]
async fn storage_s3_wrong_credentials_fail_fast() {
    let server = S3Server::start("archive").unwrap();
    let store = ObjectStore::open(&s3_config(&server, "not-the-secret"), "site1").unwrap();
    let policy = RetryPolicy {
        initial_backoff: Duration::from_millis(10),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let meta = metadata();
    let err = with_retries(&policy, "xlog/x", || {
        store.put_bytes("xlog/x", b"data", &meta)
    })
    .await
    .unwrap_err();
    assert!(
        !err.is_transient(),
        "refused credentials must not be retried: {err}"
    );
    assert!(err.to_string().contains("PermissionDenied"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn storage_s3_outage_retries_and_alerts() {
    let mut server = S3Server::start("archive").unwrap();
    let store = ObjectStore::open(&s3_config(&server, SECRET_KEY), "site1").unwrap();
    let alerts = tempfile::tempdir().unwrap();
    let policy = crate::common::alerting_retry_policy(alerts.path());
    server.stop();
    let alert = alerts.path().join(UPLOAD_RETRIES_WARNING);
    let data = payload(100_000);
    let upload = {
        let store = store.clone();
        let data = data.clone();
        let policy = policy.clone();
        tokio::spawn(async move {
            let meta = metadata();
            with_retries(&policy, "xlog/000000010000000000000007", || {
                store.put_bytes("xlog/000000010000000000000007", &data, &meta)
            })
            .await
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !alert.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no alert file during the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(std::fs::read_to_string(&alert)
        .unwrap()
        .contains("000000010000000000000007"));
    server.resume().unwrap();
    upload.await.unwrap().unwrap();
    assert!(
        !alert.exists(),
        "alert file not removed after the upload succeeded"
    );
    let (got, _) = store
        .get_bytes("xlog/000000010000000000000007")
        .await
        .unwrap();
    assert!(got == data);
}
