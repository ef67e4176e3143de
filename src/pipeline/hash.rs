//! The plaintext digest recorded with every object (`hash`, `hash-algorithm` metadata, as
//! pghoard): the configured `hash_algorithm` on upload, whichever the metadata names on
//! restore.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use aws_lc_rs::digest;
use md5::Digest as _;

/// pghoard's `hash_algorithm` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HashAlgorithm {
    /// pghoard's default.
    #[default]
    Sha1,
    Sha256,
    Sha512,
    Md5,
}

impl HashAlgorithm {
    pub const ALL: [HashAlgorithm; 4] = [
        HashAlgorithm::Sha1,
        HashAlgorithm::Sha256,
        HashAlgorithm::Sha512,
        HashAlgorithm::Md5,
    ];

    /// The name in configuration and metadata.
    pub fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Sha1 => "sha1",
            HashAlgorithm::Sha256 => "sha256",
            HashAlgorithm::Sha512 => "sha512",
            HashAlgorithm::Md5 => "md5",
        }
    }

    pub fn hasher(self) -> Hasher {
        Hasher(match self {
            HashAlgorithm::Sha1 => {
                Inner::Lc(digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY))
            }
            HashAlgorithm::Sha256 => Inner::Lc(digest::Context::new(&digest::SHA256)),
            HashAlgorithm::Sha512 => Inner::Lc(digest::Context::new(&digest::SHA512)),
            HashAlgorithm::Md5 => Inner::Md5(md5::Md5::new()),
        })
    }
}

impl fmt::Display for HashAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        HashAlgorithm::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| format!("unknown hash algorithm {s:?}"))
    }
}

/// A running digest.
pub struct Hasher(Inner);

enum Inner {
    Lc(digest::Context),
    Md5(md5::Md5),
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.0 {
            Inner::Lc(c) => c.update(data),
            Inner::Md5(c) => c.update(data),
        }
    }

    /// Lower-case hex, as pghoard records it.
    pub fn finish_hex(self) -> String {
        match self.0 {
            Inner::Lc(c) => hex::encode(c.finish()),
            Inner::Md5(c) => hex::encode(c.finalize()),
        }
    }
}

/// The stored bytes of an object did not hash to its `_hash` metadata.
#[derive(Debug)]
pub struct StoredHashMismatch(String);

impl std::fmt::Display for StoredHashMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoredHashMismatch {}

/// Checks the stored bytes against rohmu's `_hash` metadata (the SHA-256 of the object as
/// pghoard's local storage wrote it; rohmu's LocalTransfer records it, walhoard writes none),
/// when they have been read to their end: an unencrypted pghoard object changed after it was
/// written fails there, even where its compression has no checksum of its own.
pub(crate) struct StoredSha256<R> {
    inner: R,
    hash: digest::Context,
    expected: String,
    checked: bool,
}

impl<R: Read> StoredSha256<R> {
    pub(crate) fn new(inner: R, expected: &str) -> Self {
        StoredSha256 {
            inner,
            hash: digest::Context::new(&digest::SHA256),
            expected: expected.to_ascii_lowercase(),
            checked: false,
        }
    }
}

impl<R: Read> Read for StoredSha256<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        if n > 0 {
            self.hash.update(&out[..n]);
        } else if !out.is_empty() && !self.checked {
            self.checked = true;
            let got = hex::encode(self.hash.clone().finish());
            if got != self.expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    StoredHashMismatch(format!(
                        "stored bytes have SHA-256 {got}, the _hash metadata says {}: the object was changed after it was written",
                        self.expected
                    )),
                ));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_of(a: HashAlgorithm, data: &[u8]) -> String {
        let mut h = a.hasher();
        // In two pieces: updates must compose.
        h.update(&data[..1]);
        h.update(&data[1..]);
        h.finish_hex()
    }

    #[test]
    fn known_digests_of_abc() {
        // FIPS 180-2 / RFC 1321 test vectors.
        assert_eq!(
            hex_of(HashAlgorithm::Sha1, b"abc"),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex_of(HashAlgorithm::Sha256, b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(hex_of(HashAlgorithm::Sha512, b"abc").starts_with("ddaf35a193617aba"));
        assert_eq!(hex_of(HashAlgorithm::Sha512, b"abc").len(), 128);
        assert_eq!(
            hex_of(HashAlgorithm::Md5, b"abc"),
            "900150983cd24fb0d6963f7d28e17f72"
        );
    }

    #[test]
    fn names_round_trip_and_unknown_is_refused() {
        for a in HashAlgorithm::ALL {
            assert_eq!(a.name().parse::<HashAlgorithm>(), Ok(a));
        }
        assert_eq!(HashAlgorithm::default(), HashAlgorithm::Sha1);
        assert!("sha3".parse::<HashAlgorithm>().is_err());
    }
}
