//! The CPU floor of the WAL drain: what the daemon must spend on each segment whatever it does
//! around it (hash, zstd, encryption), measured with the daemon's own function.
//!
//!     WALHOARD_BENCH_WAL_DIR=<pg_wal> WALHOARD_BENCH_WAL_FIRST=<segment> \
//!       WALHOARD_BENCH_WAL_LAST=<segment> cargo bench --bench drain_floor
//!
//! Reads each segment from FIRST to LAST of the directory (one at a time, into one buffer; the
//! read is not counted) and runs `pipeline::transfer::one_shot_object` on it (SHA-1, zstd
//! level 1, with no frame checksum since the object is encrypted, and WALHENC1 encryption
//! with an RSA-3072 key) on one thread, then the SHA-1 alone. Prints the thread CPU of each.
//! `tools/bench/run.sh drain` runs it on the backlog it drained; docs/benchmarks.md explains
//! how the figure bounds the drain.

use std::time::Instant;

use walhoard::pipeline::compression::{Algorithm, CompressionSettings};
use walhoard::pipeline::encryption::{generate_key_pair, PublicKey};
use walhoard::pipeline::hash::HashAlgorithm;
use walhoard::pipeline::transfer::{one_shot_object, UploadEncryption};

fn thread_cpu() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        eprintln!("{name} is required (see the header of benches/drain_floor.rs)");
        std::process::exit(2)
    })
}

fn main() {
    let dir = std::path::PathBuf::from(env("WALHOARD_BENCH_WAL_DIR"));
    let (first, last) = (
        env("WALHOARD_BENCH_WAL_FIRST"),
        env("WALHOARD_BENCH_WAL_LAST"),
    );
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.len() == 24 && *n >= first && *n <= last)
        .collect();
    names.sort();
    assert!(
        !names.is_empty(),
        "no segments {first}..{last} in {}",
        dir.display()
    );
    let (public, _) = generate_key_pair(3072).unwrap();
    let encryption = UploadEncryption {
        key_id: "bench".into(),
        public: PublicKey::from_pem(&public).unwrap(),
    };
    let zstd1 = CompressionSettings {
        algorithm: Algorithm::Zstd,
        level: 1,
        threads: 0,
    };
    let mut buf = Vec::new();
    let (mut plain, mut stored, mut all_cpu, mut sha1_cpu) = (0u64, 0u64, 0f64, 0f64);
    let started = Instant::now();
    for name in &names {
        buf.clear();
        let mut f = std::fs::File::open(dir.join(name)).unwrap();
        std::io::Read::read_to_end(&mut f, &mut buf).unwrap();
        plain += buf.len() as u64;
        let c0 = thread_cpu();
        let (_, object) =
            one_shot_object(&buf, zstd1, Some(&encryption), HashAlgorithm::Sha1).unwrap();
        let c1 = thread_cpu();
        stored += object.as_ref().len() as u64;
        drop(object);
        let c2 = thread_cpu();
        let mut h = HashAlgorithm::Sha1.hasher();
        h.update(&buf);
        std::hint::black_box(h.finish_hex());
        let c3 = thread_cpu();
        all_cpu += c1 - c0;
        sha1_cpu += c3 - c2;
    }
    println!(
        "drain floor: {} segments, {} MB -> {} MB stored; SHA-1 + zstd 1 (no checksum: encrypted) + encryption {:.2} s CPU \
         ({:.0} MB/s on one core), of which SHA-1 {:.2} s; wall {:.2} s",
        names.len(),
        plain / 1_000_000,
        stored / 1_000_000,
        all_cpu,
        plain as f64 / 1e6 / all_cpu,
        sha1_cpu,
        started.elapsed().as_secs_f64()
    );
}
