//! A file through the whole path and back: compress → encrypt → store → fetch → decrypt →
//! decompress → verify, on local storage, S3 (s3s-fs), Azure (Azurite) and SFTP (sshd), every
//! codec, with and without encryption, small and larger than the upload part size; every
//! hash algorithm checked against coreutils; tampered objects are rejected and leave no file.
//! Every round trip is made twice: from a file and from memory (`Source::Bytes`).

use walhoard::config::ObjectStorageConfig;
use walhoard::pipeline::compression::{Algorithm, CompressionSettings};
use walhoard::pipeline::encryption::{
    generate_key_pair, Decryptor, KeyRing, PrivateKey, PublicKey,
};
use walhoard::pipeline::hash::HashAlgorithm;
use walhoard::pipeline::transfer::{
    download_file, upload, Hashing, Input, ObjectKind, Source, Upload, UploadEncryption,
};
use walhoard::storage::ObjectStore;
use walhoard_testkit::azure::AzuriteServer;
use walhoard_testkit::s3::{S3Server, ACCESS_KEY, SECRET_KEY};
use walhoard_testkit::sftp::SftpServer;

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

/// Mostly incompressible bytes: compressed, still larger than `len` × 3/4.
fn noisy(len: usize) -> Vec<u8> {
    let mut out = crate::storage::payload(len);
    for (i, b) in out.iter_mut().enumerate() {
        if (i / 4096) % 8 == 0 {
            *b = 0;
        }
    }
    out
}

/// Local storage in `<dir>/store` for site `site`; objects are at `<store>/site/<key>`.
fn local_store(dir: &std::path::Path) -> (ObjectStore, std::path::PathBuf) {
    let store_dir = dir.join("store");
    let cfg: ObjectStorageConfig = serde_json::from_value(
        serde_json::json!({"storage_type": "local", "directory": store_dir}),
    )
    .unwrap();
    (ObjectStore::open(&cfg, "site").unwrap(), store_dir)
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

/// Every codec × {plain, encrypted} × {small, `big`}: bytes, size and hash verified after the
/// round trip; `big` must compress to more than the store's part size, so it is a multipart
/// (multi-block, multi-write) upload. The hash algorithm rotates through all four.
async fn round_trips(store: &ObjectStore, big: usize) {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("00000002.history");
    std::fs::write(&small, wal_like(20_000)).unwrap();
    let large = dir.path().join("000000010000000000000003");
    std::fs::write(&large, noisy(big)).unwrap();
    let (enc, ring) = keys();
    let mut hashes = HashAlgorithm::ALL.into_iter().cycle();
    for (size, src) in [("small", &small), ("big", &large)] {
        let data = std::fs::read(src).unwrap();
        for algorithm in [Algorithm::Snappy, Algorithm::Zstd, Algorithm::Lzma] {
            for encryption in [None, Some(enc.clone())] {
                let key = format!("xlog/{size}-{algorithm}-{}", encryption.is_some());
                let hash = hashes.next().unwrap();
                let meta = upload(
                    store,
                    Upload::wal(
                        &key,
                        Source::File(src.to_path_buf()),
                        CompressionSettings::new(algorithm),
                        encryption.clone(),
                        hash,
                    ),
                )
                .await
                .unwrap_or_else(|e| panic!("{} {key}: {e}", store.kind()))
                .metadata
                .to_map();
                assert_eq!(meta["original-file-size"], data.len().to_string());
                assert_eq!(meta["hash-algorithm"], hash.name());
                let stored = store.stat(&key).await.unwrap().unwrap().size;
                if size == "big" {
                    assert!(
                        stored > store.chunk_size() as u64,
                        "{key}: {stored} bytes stored, not more than one part"
                    );
                }
                let out = dir.path().join("restored");
                let got = download_file(store, &key, &out, &ring).await.unwrap();
                assert_eq!(
                    got.to_map(),
                    meta,
                    "{} {key}: metadata changed",
                    store.kind()
                );
                assert!(
                    std::fs::read(&out).unwrap() == data,
                    "{} {key}: restored bytes differ",
                    store.kind()
                );
                if encryption.is_some() && size == "small" {
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
                store.delete(&key).await.unwrap();
                // The same bytes from memory (a segment the receiver handed on in its buffer;
                // zstd compresses it in one call): the same metadata, the same bytes back.
                let mem_key = format!("{key}-memory");
                let mem_meta = upload(
                    store,
                    Upload::wal(
                        &mem_key,
                        Source::bytes(data.clone()),
                        CompressionSettings::new(algorithm),
                        encryption.clone(),
                        hash,
                    ),
                )
                .await
                .unwrap_or_else(|e| panic!("{} {mem_key}: {e}", store.kind()))
                .metadata
                .to_map();
                assert_eq!(
                    mem_meta, meta,
                    "{mem_key}: metadata differs from the file's"
                );
                let out = dir.path().join("restored-memory");
                download_file(store, &mem_key, &out, &ring).await.unwrap();
                assert!(
                    std::fs::read(&out).unwrap() == data,
                    "{} {mem_key}: restored bytes differ",
                    store.kind()
                );
                store.delete(&mem_key).await.unwrap();
            }
        }
    }
}

/// 6.5 MiB of mostly incompressible bytes: more than one part at every store's part size.
const BIG: usize = 13 << 19;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_round_trips_local() {
    let dir = tempfile::tempdir().unwrap();
    let cfg: ObjectStorageConfig = serde_json::from_value(
        serde_json::json!({"storage_type": "local", "directory": dir.path()}),
    )
    .unwrap();
    let store = ObjectStore::open(&cfg, "site")
        .unwrap()
        .with_chunk_size(1 << 20);
    round_trips(&store, BIG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_round_trips_s3() {
    let server = S3Server::start("archive").unwrap();
    let cfg: ObjectStorageConfig = serde_json::from_value(serde_json::json!({
        "storage_type": "s3", "bucket_name": "archive", "aws_access_key_id": ACCESS_KEY,
        "aws_secret_access_key": SECRET_KEY, "host": "127.0.0.1", "port": server.port, "is_secure": false,
    }))
    .unwrap();
    // S3's smallest part is 5 MiB.
    let store = ObjectStore::open(&cfg, "site")
        .unwrap()
        .with_chunk_size(5 << 20);
    round_trips(&store, BIG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_round_trips_azure() {
    let server = AzuriteServer::start("archive").unwrap();
    round_trips(&crate::storage_azure::azure_store(&server), BIG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_round_trips_sftp() {
    let server = SftpServer::start().unwrap();
    round_trips(&crate::storage_sftp::sftp_store(&server), BIG).await;
}

/// The configured algorithm's digest, as coreutils computes it, is what the upload records;
/// the download verifies with the algorithm the metadata names and refuses a mismatch or an
/// algorithm it does not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_hash_algorithm_recorded_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let (store, store_dir) = local_store(dir.path());
    let src = dir.path().join("segment");
    std::fs::write(&src, wal_like(1 << 20)).unwrap();
    let settings = CompressionSettings::new(Algorithm::Snappy);
    let mut sha1_meta = None;
    for hash in HashAlgorithm::ALL {
        let key = format!("xlog/{hash}");
        let meta = upload(
            &store,
            Upload::wal(&key, Source::File(src.to_path_buf()), settings, None, hash),
        )
        .await
        .unwrap()
        .metadata
        .to_map();
        let oracle = crate::common::sh(&format!("{hash}sum {}", src.display()));
        assert_eq!(
            meta["hash"],
            oracle.split_whitespace().next().unwrap(),
            "{hash}"
        );
        assert_eq!(meta["hash-algorithm"], hash.name());
        if hash == HashAlgorithm::Sha1 {
            sha1_meta = Some(meta.clone());
        }
        let out = dir.path().join(format!("restored-{hash}"));
        download_file(&store, &key, &out, &KeyRing::default())
            .await
            .unwrap();

        // Another file's digest in the sidecar: refused, naming the algorithm.
        let side = store_dir.join("site").join(format!("{key}.metadata"));
        let mut forged = meta.clone();
        let mut other = hash.hasher();
        other.update(b"another file");
        forged.insert("hash".into(), other.finish_hex());
        std::fs::write(&side, serde_json::to_vec(&forged).unwrap()).unwrap();
        let out = dir.path().join(format!("forged-{hash}"));
        let err = download_file(&store, &key, &out, &KeyRing::default())
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("{hash} {} does not match", meta["hash"])),
            "{err}"
        );
        assert!(!out.exists());
    }
    // An algorithm walhoard does not know is refused before anything is written.
    let side = store_dir.join("site/xlog/sha1.metadata");
    let mut meta = sha1_meta.expect("sha1 was uploaded");
    meta.insert("hash-algorithm".into(), "sha3-256".into());
    std::fs::write(&side, serde_json::to_vec(&meta).unwrap()).unwrap();
    let out = dir.path().join("unknown");
    let err = download_file(&store, "xlog/sha1", &out, &KeyRing::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("sha3-256"), "{err}");
    assert!(!out.exists());
    // Without `hash-algorithm` (older objects) the hash is SHA-1.
    meta.remove("hash-algorithm");
    std::fs::write(&side, serde_json::to_vec(&meta).unwrap()).unwrap();
    download_file(&store, "xlog/sha1", &out, &KeyRing::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_rejects_tampered_objects() {
    let dir = tempfile::tempdir().unwrap();
    let (store, store_dir) = local_store(dir.path());
    let src = dir.path().join("segment");
    std::fs::write(&src, wal_like(2 * 1024 * 1024)).unwrap();
    let (enc, ring) = keys();
    for (name, encryption) in [("plain", None), ("encrypted", Some(enc))] {
        let key = format!("xlog/{name}");
        upload(
            &store,
            Upload::wal(
                &key,
                Source::File(src.to_path_buf()),
                CompressionSettings::new(Algorithm::Zstd),
                encryption,
                HashAlgorithm::Sha1,
            ),
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

/// Whether the zstd frame at the start of `frame` declares a content checksum
/// (Frame_Header_Descriptor bit 2, RFC 8878 3.1.1.1.1).
fn zstd_frame_has_checksum(frame: &[u8]) -> bool {
    assert_eq!(frame[..4], [0x28, 0xb5, 0x2f, 0xfd], "not a zstd frame");
    frame[4] & 0x04 != 0
}

/// An unencrypted zstd object carries a frame checksum (its only integrity check before the
/// hash); an encrypted one does not (AES-GCM authenticates every chunk), from a file and from
/// memory alike, and both restore to the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_zstd_checksum_only_on_unencrypted_objects() {
    let dir = tempfile::tempdir().unwrap();
    let (store, store_dir) = local_store(dir.path());
    let data = wal_like(3 * 1024 * 1024);
    let src = dir.path().join("segment");
    std::fs::write(&src, &data).unwrap();
    let (enc, ring) = keys();
    for (name, encryption) in [("plain", None), ("encrypted", Some(enc))] {
        for from in ["file", "memory"] {
            let key = format!("xlog/{name}-{from}");
            let zstd = CompressionSettings::new(Algorithm::Zstd);
            if from == "file" {
                upload(
                    &store,
                    Upload::wal(
                        &key,
                        Source::File(src.to_path_buf()),
                        zstd,
                        encryption.clone(),
                        HashAlgorithm::Sha1,
                    ),
                )
                .await
            } else {
                upload(
                    &store,
                    Upload::wal(
                        &key,
                        Source::bytes(data.clone()),
                        zstd,
                        encryption.clone(),
                        HashAlgorithm::Sha1,
                    ),
                )
                .await
            }
            .unwrap();
            let stored = std::fs::read(store_dir.join("site").join(&key)).unwrap();
            let frame = if encryption.is_some() {
                let mut plain = Vec::new();
                std::io::Read::read_to_end(
                    &mut Decryptor::new(&stored[..], &ring).unwrap(),
                    &mut plain,
                )
                .unwrap();
                plain
            } else {
                stored
            };
            assert_eq!(
                zstd_frame_has_checksum(&frame),
                encryption.is_none(),
                "{key}: frame checksum flag"
            );
            let out = dir.path().join(format!("restored-{name}-{from}"));
            download_file(&store, &key, &out, &ring).await.unwrap();
            assert!(
                std::fs::read(&out).unwrap() == data,
                "{key}: restored bytes differ"
            );
        }
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
    let err = upload(
        &store,
        Upload::wal(
            "xlog/x",
            Source::File(src.to_path_buf()),
            settings,
            None,
            HashAlgorithm::Sha1,
        ),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("PermissionDenied"), "{err}");
    let missing = dir.path().join("missing");
    let err = upload(
        &store,
        Upload::wal(
            "xlog/y",
            Source::File(missing.to_path_buf()),
            settings,
            None,
            HashAlgorithm::Sha1,
        ),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

/// An `Upload` whose hash is to be recorded in metadata before the upload starts needs plain
/// bytes known first: a produced or compressed stream is refused, naming the key, and nothing
/// is stored. A returned SHA-1 is that of the bytes given, whatever the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_upload_hashing_follows_the_description() {
    let dir = tempfile::tempdir().unwrap();
    let (store, store_dir) = local_store(dir.path());
    let data = wal_like(100_000);
    let snappy = CompressionSettings::new(Algorithm::Snappy);
    let recorded = |key: &str, source: Source, input: Input| Upload {
        input,
        ..Upload::wal(key, source, snappy, None, HashAlgorithm::Sha256)
    };
    let d = data.clone();
    let produced = Source::produced(move |w| w.write_all(&d));
    for (key, up) in [
        (
            "xlog/produced",
            recorded("xlog/produced", produced, Input::Plain),
        ),
        (
            "xlog/compressed",
            recorded(
                "xlog/compressed",
                Source::bytes(data.clone()),
                Input::Compressed,
            ),
        ),
    ] {
        let err = upload(&store, up).await.unwrap_err().to_string();
        assert!(
            err.contains(key) && err.contains("cannot be recorded"),
            "{err}"
        );
        assert!(store.stat(key).await.unwrap().is_none(), "{key} stored");
    }
    let src = dir.path().join("segment");
    std::fs::write(&src, &data).unwrap();
    let oracle = crate::common::sh(&format!("sha1sum {}", src.display()));
    let oracle = oracle.split_whitespace().next().unwrap();
    for (name, source) in [
        ("file", Source::File(src.clone())),
        ("bytes", Source::bytes(data.clone())),
    ] {
        let key = format!("basebackup_chunk/b/{name}");
        let up = upload(
            &store,
            Upload {
                kind: ObjectKind::BasebackupChunk,
                hashing: Hashing::Sha1Returned,
                ..Upload::wal(&key, source, snappy, None, HashAlgorithm::Sha256)
            },
        )
        .await
        .unwrap();
        assert_eq!(up.hash, oracle, "{name}");
        assert_eq!(up.plain_size, data.len() as u64, "{name}");
        let stored = std::fs::metadata(store_dir.join("site").join(&key)).unwrap();
        assert_eq!(up.stored_size, stored.len(), "{name}");
        // Returned only: the metadata records no plaintext hash.
        assert_eq!(up.metadata.hash, None, "{name}");
    }
}
