//! The plaintext digest recorded with every object (`hash`, `hash-algorithm` metadata, as
//! pghoard): the configured `hash_algorithm` on upload, whichever the metadata names on
//! restore.

use std::fmt;
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
