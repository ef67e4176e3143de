//! Peak memory of a large object through the whole path and back.
//!
//!     cargo bench --bench memory           # WALHOARD_BENCH_GIB=2 by default
//!
//! Streams a sparse file of WALHOARD_BENCH_GIB GiB through zstd level 1 + encryption into a
//! local store and back into a file, and reports the process's peak RSS (VmHWM) before and
//! after: the difference is what the pipeline needs, and must not grow with the object size.

use walhoard::config::ObjectStorageConfig;
use walhoard::pipeline::compression::{Algorithm, CompressionSettings};
use walhoard::pipeline::encryption::{generate_key_pair, KeyRing, PrivateKey, PublicKey};
use walhoard::pipeline::hash::HashAlgorithm;
use walhoard::pipeline::transfer::{download_file, upload, Source, Upload, UploadEncryption};
use walhoard::storage::ObjectStore;

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap())
        })
        .unwrap()
}

fn main() {
    let gib: u64 = std::env::var("WALHOARD_BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("big");
        std::fs::File::create(&src)
            .unwrap()
            .set_len(gib << 30)
            .unwrap();
        let cfg: ObjectStorageConfig = serde_json::from_value(
            serde_json::json!({"storage_type": "local", "directory": dir.path().join("store")}),
        )
        .unwrap();
        let store = ObjectStore::open(&cfg, "site").unwrap();
        let (public, private) = generate_key_pair(3072).unwrap();
        let enc = UploadEncryption {
            key_id: "k".into(),
            public: PublicKey::from_pem(&public).unwrap(),
        };
        let mut ring = KeyRing::default();
        ring.insert("k", PrivateKey::from_pem(&private).unwrap());
        let settings = CompressionSettings {
            algorithm: Algorithm::Zstd,
            level: 1,
            threads: 0,
        };
        let before = vm_hwm_kib();
        let started = std::time::Instant::now();
        upload(
            &store,
            Upload::wal(
                "basebackup/big",
                Source::File(src.to_path_buf()),
                settings,
                Some(enc),
                HashAlgorithm::Sha1,
            ),
        )
        .await
        .unwrap();
        let up = started.elapsed();
        let after_upload = vm_hwm_kib();
        let out = dir.path().join("restored");
        let started = std::time::Instant::now();
        download_file(&store, "basebackup/big", &out, &ring)
            .await
            .unwrap();
        let down = started.elapsed();
        let after_download = vm_hwm_kib();
        assert_eq!(std::fs::metadata(&out).unwrap().len(), gib << 30);
        println!("{gib} GiB object, zstd-1 + encryption, local storage");
        println!("peak RSS before: {} MiB", before / 1024);
        println!(
            "peak RSS after upload ({:.1} s): {} MiB",
            up.as_secs_f64(),
            after_upload / 1024
        );
        println!(
            "peak RSS after download ({:.1} s): {} MiB",
            down.as_secs_f64(),
            after_download / 1024
        );
        println!(
            "pipeline peak above baseline: {} MiB",
            (after_download - before) / 1024
        );
    });
}
