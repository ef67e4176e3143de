//! Pipeline throughput per codec, with and without encryption, on real WAL.
//!
//!     cargo bench --bench pipeline            # WALHOARD_BENCH_SEGMENTS=16 by default
//!
//! Starts a throw-away PostgreSQL (walhoard-testkit), fills it with `pgbench -i`, takes the
//! completed WAL segments from pg_wal and runs each codec over them on one thread, reporting
//! MB/s of plaintext and the compression ratio. Results go to docs/benchmarks.md by hand.

use std::io::Write;
use std::time::Instant;

use walhoard::pipeline::compression::{zstd_checksum, Algorithm, CompressionSettings, Compressor};
use walhoard::pipeline::encryption::{generate_key_pair, Encryptor, PublicKey, DEFAULT_CHUNK_SIZE};
use walhoard_testkit::{tool_path, PgCluster};

/// Counts bytes instead of storing them: the sink is not what is measured.
struct CountingSink(u64);

impl Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn real_wal(segments: usize) -> Vec<Vec<u8>> {
    let pg = PgCluster::start().expect("start PostgreSQL");
    let scale = (segments * 2).to_string();
    let out = std::process::Command::new(tool_path("pgbench").unwrap())
        .args(["-i", "-q", "-s", &scale, "-h"])
        .arg(pg.socket_dir())
        .args(["-p", &pg.port.to_string(), "-U", "postgres", "postgres"])
        .output()
        .expect("run pgbench");
    assert!(
        out.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pg.psql("select pg_switch_wal()").unwrap();
    let current = pg
        .psql("select pg_walfile_name(pg_current_wal_lsn())")
        .unwrap();
    let mut names: Vec<String> = std::fs::read_dir(pg.wal_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.len() == 24 && n.as_str() < current.trim())
        .collect();
    names.sort();
    names
        .into_iter()
        .rev()
        .take(segments)
        .map(|n| std::fs::read(pg.wal_dir().join(n)).unwrap())
        .collect()
}

fn main() {
    let segments: usize = std::env::var("WALHOARD_BENCH_SEGMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let wal = real_wal(segments);
    let total: u64 = wal.iter().map(|s| s.len() as u64).sum();
    let (public, _) = generate_key_pair(3072).unwrap();
    let public = PublicKey::from_pem(&public).unwrap();
    println!(
        "{} segments of real WAL from pgbench -i ({} MiB), one thread",
        wal.len(),
        total >> 20
    );
    println!(
        "{:<10} {:>10} {:>12} {:>8}",
        "codec", "encrypted", "MB/s", "ratio"
    );
    let codecs = [
        ("snappy", CompressionSettings::new(Algorithm::Snappy)),
        (
            "zstd-1",
            CompressionSettings {
                algorithm: Algorithm::Zstd,
                level: 1,
                threads: 0,
            },
        ),
        (
            "zstd-3",
            CompressionSettings {
                algorithm: Algorithm::Zstd,
                level: 3,
                threads: 0,
            },
        ),
        ("lzma-0", CompressionSettings::new(Algorithm::Lzma)),
    ];
    for (name, settings) in codecs {
        for encrypted in [false, true] {
            let started = Instant::now();
            let mut stored = 0u64;
            for seg in &wal {
                let sink = CountingSink(0);
                let n = if encrypted {
                    let enc = Encryptor::new(sink, &public, "bench", DEFAULT_CHUNK_SIZE).unwrap();
                    let mut c = Compressor::new(enc, &settings, zstd_checksum(true)).unwrap();
                    c.write_all(seg).unwrap();
                    c.finish().unwrap().finish().unwrap().0
                } else {
                    let mut c = Compressor::new(sink, &settings, zstd_checksum(false)).unwrap();
                    c.write_all(seg).unwrap();
                    c.finish().unwrap().0
                };
                stored += n;
            }
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{:<10} {:>10} {:>12.1} {:>8.2}",
                name,
                if encrypted { "yes" } else { "no" },
                total as f64 / 1e6 / secs,
                total as f64 / stored as f64
            );
        }
    }
}
