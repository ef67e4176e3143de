//! Streaming compression codecs, byte-compatible with pghoard's:
//! - `snappy`: the Snappy framing format (python-snappy's `StreamCompressor`);
//! - `zstd`: standard zstd frames, optionally with zstd's own worker threads; concatenated
//!   frames are accepted on read;
//! - `lzma`: the xz container (Python's `lzma.LZMACompressor`), preset = level; concatenated
//!   streams are accepted on read.
//!
//! Encoders implement [`std::io::Write`] over any writer and must be [`Compressor::finish`]ed;
//! decoders implement [`std::io::Read`]. Each keeps a bounded window, never the whole object.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

/// A compression algorithm, named as in pghoard's `compression.algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Snappy,
    Zstd,
    Lzma,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Snappy => "snappy",
            Algorithm::Zstd => "zstd",
            Algorithm::Lzma => "lzma",
        }
    }

    /// pghoard's default level: 3 for zstd, 0 for lzma; snappy has none.
    pub fn default_level(self) -> i32 {
        match self {
            Algorithm::Zstd => 3,
            Algorithm::Lzma | Algorithm::Snappy => 0,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Algorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "snappy" => Ok(Algorithm::Snappy),
            "zstd" => Ok(Algorithm::Zstd),
            "lzma" => Ok(Algorithm::Lzma),
            other => Err(format!(
                "unknown compression algorithm {other:?}: expected snappy, zstd or lzma"
            )),
        }
    }
}

/// How to compress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressionSettings {
    pub algorithm: Algorithm,
    pub level: i32,
    /// zstd worker threads inside one stream (0 = none); ignored by the other codecs.
    pub threads: u32,
}

impl CompressionSettings {
    pub fn new(algorithm: Algorithm) -> Self {
        CompressionSettings {
            algorithm,
            level: algorithm.default_level(),
            threads: 0,
        }
    }

    /// Checks the level against what the codec accepts.
    pub fn validate(&self) -> Result<(), String> {
        let ok = match self.algorithm {
            Algorithm::Snappy => true,
            Algorithm::Zstd => zstd::compression_level_range().contains(&self.level),
            Algorithm::Lzma => (0..=9).contains(&self.level),
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "compression level {} is out of range for {}",
                self.level, self.algorithm
            ))
        }
    }
}

/// Whether a zstd frame carries a content checksum (XXH64 of the plain bytes, 4 bytes at the
/// end, which every zstd decoder checks, pghoard's included): on unencrypted objects, so that
/// their corruption is caught. An encrypted object's AES-GCM tags authenticate every chunk
/// before it is decompressed, so the checksum would only cost CPU (~0.15 s per 2.35 GB of
/// WAL: docs/benchmarks.md).
pub fn zstd_checksum(encrypted: bool) -> bool {
    !encrypted
}

/// A streaming compressor writing into `W`.
pub enum Compressor<W: Write> {
    Snappy(Box<snap::write::FrameEncoder<W>>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Lzma(liblzma::write::XzEncoder<W>),
}

impl<W: Write> Compressor<W> {
    /// `checksum`: whether zstd frames carry a content checksum (see [`zstd_checksum`]).
    pub fn new(inner: W, settings: &CompressionSettings, checksum: bool) -> io::Result<Self> {
        settings
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(match settings.algorithm {
            Algorithm::Snappy => {
                Compressor::Snappy(Box::new(snap::write::FrameEncoder::new(inner)))
            }
            Algorithm::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(inner, settings.level)?;
                e.include_checksum(checksum)?;
                if settings.threads > 0 {
                    e.multithread(settings.threads)?;
                }
                Compressor::Zstd(e)
            }
            Algorithm::Lzma => {
                Compressor::Lzma(liblzma::write::XzEncoder::new(inner, settings.level as u32))
            }
        })
    }

    /// Flushes the last block and the stream trailer; returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Compressor::Snappy(e) => e
                .into_inner()
                .map_err(|e| io::Error::other(format!("snappy: {}", e.error()))),
            Compressor::Zstd(e) => e.finish(),
            Compressor::Lzma(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Snappy(e) => e.write(buf),
            Compressor::Zstd(e) => e.write(buf),
            Compressor::Lzma(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Snappy(e) => e.flush(),
            Compressor::Zstd(e) => e.flush(),
            Compressor::Lzma(e) => e.flush(),
        }
    }
}

/// A streaming decompressor reading from `R`.
pub enum Decompressor<R: Read> {
    Snappy(snap::read::FrameDecoder<R>),
    Zstd(zstd::stream::read::Decoder<'static, io::BufReader<R>>),
    Lzma(liblzma::read::XzDecoder<R>),
}

impl<R: Read> Decompressor<R> {
    pub fn new(inner: R, algorithm: Algorithm) -> io::Result<Self> {
        Ok(match algorithm {
            Algorithm::Snappy => Decompressor::Snappy(snap::read::FrameDecoder::new(inner)),
            // zstd's reader continues across concatenated frames by default.
            Algorithm::Zstd => Decompressor::Zstd(zstd::stream::read::Decoder::new(inner)?),
            Algorithm::Lzma => {
                Decompressor::Lzma(liblzma::read::XzDecoder::new_multi_decoder(inner))
            }
        })
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            Decompressor::Snappy(_) => Algorithm::Snappy,
            Decompressor::Zstd(_) => Algorithm::Zstd,
            Decompressor::Lzma(_) => Algorithm::Lzma,
        }
    }
}

impl<R: Read> Read for Decompressor<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = match self {
            Decompressor::Snappy(d) => d.read(buf),
            Decompressor::Zstd(d) => d.read(buf),
            Decompressor::Lzma(d) => d.read(buf),
        };
        // Name the codec in errors: "corrupt input" alone does not say which object format.
        // Errors of the layer below (decryption, I/O) pass through as they are.
        r.map_err(|e| {
            let from_below = e.get_ref().is_some_and(|inner| {
                inner.is::<super::encryption::EncryptionError>()
                    || inner.is::<super::hash::StoredHashMismatch>()
            }) || !matches!(
                e.kind(),
                io::ErrorKind::InvalidData
                    | io::ErrorKind::InvalidInput
                    | io::ErrorKind::Other
                    | io::ErrorKind::UnexpectedEof
            );
            if from_below {
                e
            } else {
                io::Error::new(e.kind(), format!("{}: {e}", self.algorithm()))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Algorithm; 3] = [Algorithm::Snappy, Algorithm::Zstd, Algorithm::Lzma];

    fn sample(len: usize) -> Vec<u8> {
        // Half pseudo-random, half repetitive: like WAL with page images and padding.
        let mut x: u32 = 12345;
        (0..len)
            .map(|i| {
                if (i / 4096) % 2 == 0 {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                } else {
                    (i % 7) as u8
                }
            })
            .collect()
    }

    fn compress(data: &[u8], s: &CompressionSettings) -> Vec<u8> {
        let mut c = Compressor::new(Vec::new(), s, true).unwrap();
        // Odd-sized writes.
        for chunk in data.chunks(7919) {
            c.write_all(chunk).unwrap();
        }
        c.finish().unwrap()
    }

    fn decompress(data: &[u8], a: Algorithm) -> io::Result<Vec<u8>> {
        let mut d = Decompressor::new(data, a)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 3001];
        loop {
            let n = d.read(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn round_trips() {
        for a in ALL {
            for len in [0, 1, 5 * 1024 * 1024 + 3] {
                let data = sample(len);
                let c = compress(&data, &CompressionSettings::new(a));
                assert_eq!(decompress(&c, a).unwrap(), data, "{a} len {len}");
                if len > 1024 {
                    assert!(c.len() < data.len(), "{a} did not compress");
                }
            }
        }
    }

    #[test]
    fn zstd_threads_and_multiple_frames() {
        let data = sample(3 * 1024 * 1024);
        let s = CompressionSettings {
            algorithm: Algorithm::Zstd,
            level: 1,
            threads: 2,
        };
        let c = compress(&data, &s);
        assert_eq!(decompress(&c, Algorithm::Zstd).unwrap(), data);
        let mut two = compress(b"first frame|", &CompressionSettings::new(Algorithm::Zstd));
        two.extend(compress(
            b"second frame",
            &CompressionSettings::new(Algorithm::Zstd),
        ));
        assert_eq!(
            decompress(&two, Algorithm::Zstd).unwrap(),
            b"first frame|second frame"
        );
        let mut xz = compress(b"one|", &CompressionSettings::new(Algorithm::Lzma));
        xz.extend(compress(b"two", &CompressionSettings::new(Algorithm::Lzma)));
        assert_eq!(decompress(&xz, Algorithm::Lzma).unwrap(), b"one|two");
    }

    #[test]
    fn golden_stream_headers() {
        let snappy = compress(b"hello", &CompressionSettings::new(Algorithm::Snappy));
        assert_eq!(
            &snappy[..10],
            b"\xff\x06\x00\x00sNaPpY",
            "Snappy framing stream identifier"
        );
        let xz = compress(b"hello", &CompressionSettings::new(Algorithm::Lzma));
        assert_eq!(&xz[..6], b"\xfd7zXZ\x00", "xz magic");
        let z = compress(b"hello", &CompressionSettings::new(Algorithm::Zstd));
        assert_eq!(&z[..4], b"\x28\xb5\x2f\xfd", "zstd frame magic");
    }

    #[test]
    fn corrupt_and_truncated_input_is_an_error() {
        let data = sample(200_000);
        for a in ALL {
            let c = compress(&data, &CompressionSettings::new(a));
            let truncated = &c[..c.len() / 2];
            let err = decompress(truncated, a)
                .err()
                .unwrap_or_else(|| panic!("{a}: truncated input accepted"));
            assert!(err.to_string().starts_with(a.name()), "{err}");
            let mut flipped = c.clone();
            let at = flipped.len() / 3;
            flipped[at] ^= 0x40;
            match decompress(&flipped, a) {
                Err(e) => assert!(e.to_string().starts_with(a.name()), "{e}"),
                Ok(out) => panic!(
                    "{a}: a flipped byte went unnoticed ({} bytes out)",
                    out.len()
                ),
            }
        }
    }

    #[test]
    fn xz_interoperates_with_the_xz_tool() {
        use std::process::{Command, Stdio};
        let data = sample(300_000);
        let ours = compress(&data, &CompressionSettings::new(Algorithm::Lzma));
        let mut child = Command::new("xz")
            .args(["-dc"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("xz (Debian xz-utils)");
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || stdin.write_all(&ours));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(
            out.status.success() && out.stdout == data,
            "xz -dc could not read our stream"
        );
        let mut child = Command::new("xz")
            .args(["-c", "-0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = data.clone();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert_eq!(decompress(&out.stdout, Algorithm::Lzma).unwrap(), data);
    }

    /// pghoard writes snappy with python-snappy's StreamCompressor and reads with its
    /// StreamDecompressor; both directions must work (tools/test.sh installs python-snappy).
    #[test]
    fn snappy_interoperates_with_python_snappy() {
        use std::process::{Command, Stdio};
        let data = sample(700_000);
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.snappy");
        let plain = dir.path().join("plain");
        let theirs = dir.path().join("theirs.snappy");
        std::fs::write(
            &ours,
            compress(&data, &CompressionSettings::new(Algorithm::Snappy)),
        )
        .unwrap();
        std::fs::write(&plain, &data).unwrap();
        let script = "import snappy, sys\n\
            d = snappy.StreamDecompressor()\n\
            out = d.decompress(open(sys.argv[1], 'rb').read())\n\
            d.flush()\n\
            assert out == open(sys.argv[2], 'rb').read(), 'python-snappy read different bytes'\n\
            c = snappy.StreamCompressor()\n\
            open(sys.argv[3], 'wb').write(c.add_chunk(open(sys.argv[2], 'rb').read()))\n";
        let out = Command::new("python3")
            .args(["-c", script])
            .args([&ours, &plain, &theirs])
            .stdin(Stdio::null())
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "python-snappy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            decompress(&std::fs::read(&theirs).unwrap(), Algorithm::Snappy).unwrap(),
            data
        );
    }

    #[test]
    fn names_and_levels() {
        for a in ALL {
            assert_eq!(a.name().parse::<Algorithm>().unwrap(), a);
        }
        assert!("gzip".parse::<Algorithm>().is_err());
        assert!(CompressionSettings {
            algorithm: Algorithm::Lzma,
            level: 10,
            threads: 0
        }
        .validate()
        .is_err());
        assert!(CompressionSettings {
            algorithm: Algorithm::Zstd,
            level: 99,
            threads: 0
        }
        .validate()
        .is_err());
        assert!(CompressionSettings::new(Algorithm::Zstd).validate().is_ok());
    }
}
