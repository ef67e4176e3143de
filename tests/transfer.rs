//! A file through the whole path and back: compress → encrypt → store → fetch → decrypt →
//! decompress → verify, on local storage and S3 (s3s-fs), every codec, with and without
//! encryption; tampered objects are rejected and leave no file behind.

use walhoard::config::ObjectStorageConfig;
use walhoard::pipeline::compression::{Algorithm, CompressionSettings};
use walhoard::pipeline::encryption::{generate_key_pair, KeyRing, PrivateKey, PublicKey};
use walhoard::pipeline::transfer::{download_file, upload_file, UploadEncryption};
use walhoard::storage::{Metadata, ObjectStore};
use walhoard_testkit::s3::{S3Server, ACCESS_KEY, SECRET_KEY};

fn wal_like(len: usize) -> Vec<u8> {
    let mut x: u32 = 7;
    (0..len)
        .map(|i| {
            if (i / 8192) % 3 == 0 {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            } else {
                (i % 13) as u8
            }
        })
        .collect()
}

fn keys() -> (UploadEncryption, KeyRing) {
    let (public, private) = generate_key_pair(2048).unwrap();
    let mut ring = KeyRing::default();
    ring.insert("k1", PrivateKey::from_pem(&private).unwrap());
    (
        UploadEncryption {
            key_id: "k1".into(),
            public: PublicKey::from_pem(&public).unwrap(),
        },
        ring,
    )
}

async fn round_trips(store: &ObjectStore) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("000000010000000000000003");
    let data = wal_like(3 * 1024 * 1024 + 17);
    std::fs::write(&src, &data).unwrap();
    let (enc, ring) = keys();
    for algorithm in [Algorithm::Snappy, Algorithm::Zstd, Algorithm::Lzma] {
        for encryption in [None, Some(enc.clone())] {
            let key = format!("xlog/{}-{}", algorithm, encryption.is_some());
            let meta = upload_file(
                store,
                &key,
                &src,
                CompressionSettings::new(algorithm),
                encryption.clone(),
                Metadata::new(),
            )
            .await
            .unwrap();
            assert_eq!(meta["original-file-size"], data.len().to_string());
            assert_eq!(meta["hash-algorithm"], "sha1");
            let stored = store.stat(&key).await.unwrap().unwrap().size;
            assert!(
                stored < data.len() as u64,
                "{key}: {stored} bytes stored, not compressed"
            );
            let out = dir.path().join("restored");
            let got = download_file(store, &key, &out, &ring).await.unwrap();
            assert_eq!(got, meta);
            assert!(
                std::fs::read(&out).unwrap() == data,
                "{key}: restored bytes differ"
            );
            if encryption.is_some() {
                // Without the private key the object cannot be restored, and nothing is left.
                let out2 = dir.path().join("nokey");
                let err = download_file(store, &key, &out2, &KeyRing::default())
                    .await
                    .unwrap_err();
                assert!(
                    err.to_string().contains("unknown encryption key id"),
                    "{err}"
                );
                assert!(!out2.exists());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_round_trips_local_and_s3() {
    let dir = tempfile::tempdir().unwrap();
    let cfg: ObjectStorageConfig = serde_json::from_value(
        serde_json::json!({"storage_type": "local", "directory": dir.path()}),
    )
    .unwrap();
    round_trips(&ObjectStore::open(&cfg, "site").unwrap()).await;
    let server = S3Server::start("archive").unwrap();
    let cfg: ObjectStorageConfig = serde_json::from_value(serde_json::json!({
        "storage_type": "s3", "bucket_name": "archive", "aws_access_key_id": ACCESS_KEY,
        "aws_secret_access_key": SECRET_KEY, "host": "127.0.0.1", "port": server.port, "is_secure": false,
    }))
    .unwrap();
    round_trips(
        &ObjectStore::open(&cfg, "site")
            .unwrap()
            .with_chunk_size(5 << 20),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_rejects_tampered_objects() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let cfg: ObjectStorageConfig = serde_json::from_value(
        serde_json::json!({"storage_type": "local", "directory": store_dir}),
    )
    .unwrap();
    let store = ObjectStore::open(&cfg, "site").unwrap();
    let src = dir.path().join("segment");
    std::fs::write(&src, wal_like(2 * 1024 * 1024)).unwrap();
    let (enc, ring) = keys();
    for (name, encryption) in [("plain", None), ("encrypted", Some(enc))] {
        let key = format!("xlog/{name}");
        upload_file(
            &store,
            &key,
            &src,
            CompressionSettings::new(Algorithm::Zstd),
            encryption,
            Metadata::new(),
        )
        .await
        .unwrap();
        let object = store_dir.join("site").join(&key);
        let mut bytes = std::fs::read(&object).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x10;
        std::fs::write(&object, &bytes).unwrap();
        let out = dir.path().join(format!("restored-{name}"));
        let err = download_file(&store, &key, &out, &ring).await.unwrap_err();
        assert!(!out.exists(), "{name}: a tampered object was restored");
        assert!(
            !dir.path()
                .join(format!(".restored-{name}.walhoard-tmp"))
                .exists(),
            "{name}: temp file left"
        );
        let want = if name == "plain" {
            "zstd"
        } else {
            "failed authentication"
        };
        assert!(err.to_string().contains(want), "{name}: {err}");
        // Truncated: cut the last quarter.
        std::fs::write(&object, &bytes[..bytes.len() * 3 / 4]).unwrap();
        assert!(
            download_file(&store, &key, &out, &ring).await.is_err(),
            "{name}: truncated object restored"
        );
        assert!(!out.exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_reports_the_store_failure_not_the_broken_pipe() {
    let server = S3Server::start("archive").unwrap();
    let cfg: ObjectStorageConfig = serde_json::from_value(serde_json::json!({
        "storage_type": "s3", "bucket_name": "archive", "aws_access_key_id": ACCESS_KEY,
        "aws_secret_access_key": "wrong", "host": "127.0.0.1", "port": server.port, "is_secure": false,
    }))
    .unwrap();
    let store = ObjectStore::open(&cfg, "site")
        .unwrap()
        .with_chunk_size(5 << 20);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("segment");
    std::fs::write(&src, wal_like(16 << 20)).unwrap();
    let settings = CompressionSettings::new(Algorithm::Snappy);
    let err = upload_file(&store, "xlog/x", &src, settings, None, Metadata::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("PermissionDenied"), "{err}");
    let missing = dir.path().join("missing");
    let err = upload_file(&store, "xlog/y", &missing, settings, None, Metadata::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}
