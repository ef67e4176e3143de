//! An outage that starts in the middle of a multipart upload: s3s-fs is killed after the first
//! part went out and restarted seconds later. The upload restarts from a re-opened source and
//! completes; nothing is visible under the key until then; the alert file comes and goes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use walhoard::storage::retry::UPLOAD_RETRIES_WARNING;
use walhoard::storage::ObjectStore;
use walhoard_testkit::s3::{S3Server, SECRET_KEY};

use crate::storage::{metadata, payload, s3_config};

/// A slow source over `data`: 256 KiB every 30 ms from a feeder task; sends on `fed` once
/// `mark` bytes went in (first attempt only).
fn slow_source(
    data: Arc<Vec<u8>>,
    mark: usize,
    fed: Option<tokio::sync::oneshot::Sender<()>>,
) -> tokio::io::DuplexStream {
    let (mut tx, rx) = tokio::io::duplex(256 << 10);
    tokio::spawn(async move {
        let mut fed = fed;
        for (i, piece) in data.chunks(256 << 10).enumerate() {
            if tx.write_all(piece).await.is_err() {
                return; // the attempt was abandoned
            }
            if (i + 1) * (256 << 10) >= mark {
                if let Some(f) = fed.take() {
                    let _ = f.send(());
                }
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_s3_outage_mid_multipart_upload() {
    let mut server = S3Server::start("archive").unwrap();
    let store = ObjectStore::open(&s3_config(&server, SECRET_KEY), "site1")
        .unwrap()
        .with_chunk_size(5 << 20);
    let alerts = tempfile::tempdir().unwrap();
    let alert = alerts.path().join(UPLOAD_RETRIES_WARNING);
    let policy = crate::common::alerting_retry_policy(alerts.path());
    let key = "basebackup/2026-11-24_0";
    let data = Arc::new(payload(20 << 20));
    let attempts = Arc::new(AtomicUsize::new(0));
    let (fed_tx, fed_rx) = tokio::sync::oneshot::channel();
    let upload = {
        let (store, data, attempts) = (store.clone(), data.clone(), attempts.clone());
        let mut fed_tx = Some(fed_tx);
        tokio::spawn(async move {
            let meta = metadata();
            store
                .put_retrying(
                    &policy,
                    key,
                    || {
                        attempts.fetch_add(1, Ordering::SeqCst);
                        // OpenDAL sends a part once the next one is buffered: after 10 MiB.
                        Ok(slow_source(data.clone(), 11 << 20, fed_tx.take()))
                    },
                    &meta,
                )
                .await
        })
    };
    fed_rx.await.unwrap();
    // The outage must hit mid-upload: wait until s3s-fs holds the first part of the
    // uncompleted upload, then kill it.
    let has_part = || {
        std::fs::read_dir(server.data_dir())
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .any(|n| n.starts_with(".upload_id-") && n.ends_with(".part-1"))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !has_part() {
        assert!(Instant::now() < deadline, "no part reached s3s-fs");
        assert!(
            !upload.is_finished(),
            "the upload finished before the outage"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.stop();
    let object = server.data_dir().join("archive/site1").join(key);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !alert.exists() {
        assert!(Instant::now() < deadline, "no alert file during the outage");
        assert!(!object.exists(), "partial object visible during the outage");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(std::fs::read_to_string(&alert).unwrap().contains(key));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !upload.is_finished(),
        "the upload cannot finish while s3s-fs is down"
    );
    server.resume().unwrap();

    // Until the restarted upload completes, nothing (or only the whole object) is visible.
    let mut seen_absent = false;
    while !upload.is_finished() {
        match store.stat(key).await.unwrap() {
            None => {
                seen_absent = true;
                assert!(store.list("basebackup").await.unwrap().is_empty());
            }
            Some(info) => assert_eq!(info.size, data.len() as u64, "partial object visible"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        seen_absent,
        "the object appeared before the restarted upload could finish"
    );
    assert_eq!(upload.await.unwrap().unwrap(), data.len() as u64);
    assert!(attempts.load(Ordering::SeqCst) >= 2);
    assert!(
        !alert.exists(),
        "alert file not removed after the upload succeeded"
    );
    let (got, meta) = store.get_bytes(key).await.unwrap();
    assert!(got == *data, "object differs after the outage");
    assert_eq!(meta, metadata());
}
