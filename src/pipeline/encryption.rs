//! Encryption of archive objects: a random per-object AES-256 key wrapped with RSA-OAEP-SHA256
//! under the site's public key, and the body in fixed-size chunks sealed with AES-256-GCM.
//! The byte layout is in docs/formats.md ("Encrypted objects").
//!
//! Every chunk's nonce carries its counter and a last-chunk flag, and every chunk
//! authenticates the whole header, so reordered, dropped, truncated or appended chunks and
//! swapped headers all fail authentication. Decryption verifies a chunk before any of its
//! plaintext is handed out.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeySize, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
    PublicEncryptingKey, OAEP_SHA256_MGF1SHA256,
};
use base64::Engine;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};

pub const MAGIC: &[u8; 8] = b"WALHENC1";
pub const VERSION: u8 = 1;
pub const TAG_LEN: usize = 16;
pub const DEFAULT_CHUNK_SIZE: usize = 1024 * 1024;
const LAST_FLAG: u32 = 0x8000_0000;

#[derive(Debug, thiserror::Error)]
pub enum EncryptionError {
    #[error("not a walhoard encrypted object (bad magic)")]
    BadMagic,
    #[error("unsupported encrypted object version {0}")]
    BadVersion(u8),
    #[error("malformed encryption header: {0}")]
    BadHeader(String),
    #[error("unknown encryption key id {0:?}")]
    UnknownKey(String),
    #[error("wrong private key for key id {0:?} (the object key does not unwrap)")]
    WrongKey(String),
    #[error("chunk {0} failed authentication (tampered, reordered, truncated or extended)")]
    ChunkAuth(u64),
    #[error("object truncated inside the header")]
    TruncatedHeader,
    #[error("too many chunks (more than 2^31)")]
    TooManyChunks,
    #[error("invalid key: {0}")]
    BadKey(String),
}

fn io_err(e: EncryptionError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// An RSA public key (SubjectPublicKeyInfo PEM, as pghoard writes). Debug prints no key.
#[derive(Clone)]
pub struct PublicKey(PublicEncryptingKey);

/// An RSA private key (PKCS#8 PEM). Debug prints no key.
#[derive(Clone)]
pub struct PrivateKey(PrivateDecryptingKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey(RSA-{})", self.0.key_size_bits())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<hidden>)")
    }
}

impl PublicKey {
    pub fn from_pem(pem: &str) -> Result<Self, EncryptionError> {
        let der = SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
            EncryptionError::BadKey(format!("public key is not a PUBLIC KEY PEM: {e}"))
        })?;
        let key = PublicEncryptingKey::from_der(der.as_ref())
            .map_err(|e| EncryptionError::BadKey(format!("public key is not an RSA key: {e}")))?;
        if key.key_size_bits() < 2048 {
            return Err(EncryptionError::BadKey(format!(
                "RSA key of {} bits is too small",
                key.key_size_bits()
            )));
        }
        Ok(PublicKey(key))
    }
}

impl PrivateKey {
    pub fn from_pem(pem: &str) -> Result<Self, EncryptionError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| {
            EncryptionError::BadKey("private key is not a PKCS#8 PRIVATE KEY PEM".into())
        })?;
        let key = PrivateDecryptingKey::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|_| EncryptionError::BadKey("private key is not a usable RSA key".into()))?;
        Ok(PrivateKey(key))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.public_key())
    }

    /// The RSA key, for pghoard's `pghoa1` objects ([`super::pghoa1`]).
    pub(crate) fn rsa(&self) -> &PrivateDecryptingKey {
        &self.0
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A new RSA key pair as (public PEM, private PEM), in pghoard's formats.
pub fn generate_key_pair(bits: usize) -> Result<(String, String), EncryptionError> {
    let size = match bits {
        2048 => KeySize::Rsa2048,
        3072 => KeySize::Rsa3072,
        4096 => KeySize::Rsa4096,
        8192 => KeySize::Rsa8192,
        other => {
            return Err(EncryptionError::BadKey(format!(
                "{other} bits: use 2048, 3072, 4096 or 8192"
            )))
        }
    };
    let key = PrivateDecryptingKey::generate(size)
        .map_err(|_| EncryptionError::BadKey("key generation failed".into()))?;
    let private = key
        .as_der()
        .map_err(|_| EncryptionError::BadKey("cannot encode private key".into()))?;
    let public = key
        .public_key()
        .as_der()
        .map_err(|_| EncryptionError::BadKey("cannot encode public key".into()))?;
    Ok((
        pem("PUBLIC KEY", public.as_ref()),
        pem("PRIVATE KEY", private.as_ref()),
    ))
}

/// Private keys by key id, for reading, and whether objects stored without encryption are
/// acceptable.
#[derive(Debug, Default, Clone)]
pub struct KeyRing {
    keys: HashMap<String, PrivateKey>,
    /// Refuse objects whose metadata names no key: in a site that encrypts, a plaintext
    /// object is a downgrade anyone who can write the bucket can forge.
    require_encrypted: bool,
}

impl KeyRing {
    pub fn insert(&mut self, id: &str, key: PrivateKey) {
        self.keys.insert(id.to_string(), key);
    }

    /// Makes readers refuse objects stored without encryption.
    pub fn require_encrypted(mut self, require: bool) -> Self {
        self.require_encrypted = require;
        self
    }

    /// Whether objects stored without encryption are refused.
    pub fn requires_encrypted(&self) -> bool {
        self.require_encrypted
    }

    /// The private key of key id `id`.
    pub fn get(&self, id: &str) -> Option<&PrivateKey> {
        self.keys.get(id)
    }
}

fn nonce(prefix: &[u8; 8], counter: u64, last: bool) -> Result<Nonce, EncryptionError> {
    let c = u32::try_from(counter)
        .ok()
        .filter(|c| c & LAST_FLAG == 0)
        .ok_or(EncryptionError::TooManyChunks)?;
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(prefix);
    n[8..].copy_from_slice(&(c | if last { LAST_FLAG } else { 0 }).to_be_bytes());
    Ok(Nonce::assume_unique_for_key(n))
}

/// Encrypts everything written to it into `W`. Call [`Encryptor::finish`] to seal the last chunk.
pub struct Encryptor<W: Write> {
    inner: W,
    key: LessSafeKey,
    header: Vec<u8>,
    prefix: [u8; 8],
    chunk_size: usize,
    buf: Vec<u8>,
    counter: u64,
}

impl<W: Write> Encryptor<W> {
    pub fn new(
        mut inner: W,
        public: &PublicKey,
        key_id: &str,
        chunk_size: usize,
    ) -> io::Result<Self> {
        if !chunk_size.is_power_of_two() || !(4096..=16 * 1024 * 1024).contains(&chunk_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("chunk size {chunk_size} must be a power of two from 4 KiB to 16 MiB"),
            ));
        }
        let id = key_id.as_bytes();
        if id.is_empty() || id.len() > 255 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "key id must be 1 to 255 bytes",
            ));
        }
        let mut object_key = [0u8; 32];
        let mut prefix = [0u8; 8];
        aws_lc_rs::rand::fill(&mut object_key)
            .map_err(|_| io::Error::other("random generator failed"))?;
        aws_lc_rs::rand::fill(&mut prefix)
            .map_err(|_| io::Error::other("random generator failed"))?;
        let oaep = OaepPublicEncryptingKey::new(public.0.clone())
            .map_err(|_| io::Error::other("unusable public key"))?;
        let mut wrapped = vec![0u8; oaep.ciphertext_size()];
        let wrapped_len = oaep
            .encrypt(&OAEP_SHA256_MGF1SHA256, &object_key, &mut wrapped, None)
            .map_err(|_| io::Error::other("RSA-OAEP wrap failed"))?
            .len();
        wrapped.truncate(wrapped_len);
        let mut header = Vec::with_capacity(32 + id.len() + wrapped.len());
        header.extend_from_slice(MAGIC);
        header.push(VERSION);
        header.push(id.len() as u8);
        header.extend_from_slice(id);
        header.extend_from_slice(&(chunk_size as u32).to_be_bytes());
        header.extend_from_slice(&prefix);
        header.extend_from_slice(&(wrapped.len() as u16).to_be_bytes());
        header.extend_from_slice(&wrapped);
        inner.write_all(&header)?;
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &object_key)
                .map_err(|_| io::Error::other("AES key setup failed"))?,
        );
        Ok(Encryptor {
            inner,
            key,
            header,
            prefix,
            chunk_size,
            buf: Vec::with_capacity(chunk_size + TAG_LEN),
            counter: 0,
        })
    }

    fn seal(&mut self, last: bool) -> io::Result<()> {
        let n = nonce(&self.prefix, self.counter, last).map_err(io_err)?;
        self.key
            .seal_in_place_append_tag(n, Aad::from(&self.header[..]), &mut self.buf)
            .map_err(|_| io::Error::other("AES-GCM seal failed"))?;
        self.inner.write_all(&self.buf)?;
        self.buf.clear();
        self.counter += 1;
        Ok(())
    }

    /// Seals the last (possibly empty) chunk and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.seal(true)?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for Encryptor<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // A full chunk is sealed only when more data follows: the last chunk carries the flag.
        if self.buf.len() == self.chunk_size && !data.is_empty() {
            self.seal(false)?;
        }
        let n = data.len().min(self.chunk_size - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Decrypts an object read from `R`; every chunk is verified before its plaintext is returned.
pub struct Decryptor<R: Read> {
    inner: R,
    key: LessSafeKey,
    header: Vec<u8>,
    prefix: [u8; 8],
    chunk_size: usize,
    /// Ciphertext of the next record, possibly with one byte read ahead.
    record: Vec<u8>,
    /// Verified plaintext not yet handed out: `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
    counter: u64,
    done: bool,
}

pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl<R: Read> Decryptor<R> {
    pub fn new(mut inner: R, keys: &KeyRing) -> io::Result<Self> {
        let mut fixed = [0u8; 10];
        if read_full(&mut inner, &mut fixed)? < 10 {
            return Err(io_err(EncryptionError::TruncatedHeader));
        }
        if &fixed[..8] != MAGIC {
            return Err(io_err(EncryptionError::BadMagic));
        }
        if fixed[8] != VERSION {
            return Err(io_err(EncryptionError::BadVersion(fixed[8])));
        }
        let mut header = fixed.to_vec();
        let mut take = |n: usize, header: &mut Vec<u8>| -> io::Result<Vec<u8>> {
            let mut b = vec![0u8; n];
            if read_full(&mut inner, &mut b)? < n {
                return Err(io_err(EncryptionError::TruncatedHeader));
            }
            header.extend_from_slice(&b);
            Ok(b)
        };
        let id = take(fixed[9] as usize, &mut header)?;
        let id = String::from_utf8(id)
            .map_err(|_| io_err(EncryptionError::BadHeader("key id is not UTF-8".into())))?;
        let cs = take(4, &mut header)?;
        let chunk_size = u32::from_be_bytes([cs[0], cs[1], cs[2], cs[3]]) as usize;
        if !chunk_size.is_power_of_two() || !(4096..=16 * 1024 * 1024).contains(&chunk_size) {
            return Err(io_err(EncryptionError::BadHeader(format!(
                "chunk size {chunk_size}"
            ))));
        }
        let p = take(8, &mut header)?;
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&p);
        let wl = take(2, &mut header)?;
        let wrapped = take(u16::from_be_bytes([wl[0], wl[1]]) as usize, &mut header)?;
        let private = keys
            .keys
            .get(&id)
            .ok_or_else(|| io_err(EncryptionError::UnknownKey(id.clone())))?;
        let oaep = OaepPrivateDecryptingKey::new(private.0.clone())
            .map_err(|_| io::Error::other("unusable private key"))?;
        let mut object_key = vec![0u8; oaep.min_output_size()];
        let unwrapped = oaep
            .decrypt(&OAEP_SHA256_MGF1SHA256, &wrapped, &mut object_key, None)
            .map_err(|_| io_err(EncryptionError::WrongKey(id.clone())))?;
        if unwrapped.len() != 32 {
            return Err(io_err(EncryptionError::WrongKey(id)));
        }
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, unwrapped)
                .map_err(|_| io::Error::other("AES key setup failed"))?,
        );
        Ok(Decryptor {
            inner,
            key,
            header,
            prefix,
            chunk_size,
            record: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            counter: 0,
            done: false,
        })
    }

    /// Reads, verifies and decrypts the next chunk into `out`.
    fn next_chunk(&mut self) -> io::Result<()> {
        let full = self.chunk_size + TAG_LEN;
        let have = self.record.len();
        self.record.resize(full + 1, 0);
        let got = have + read_full(&mut self.inner, &mut self.record[have..])?;
        // One byte beyond a full record means more follows; anything less means this is last.
        let last = got <= full;
        let extra = if last { None } else { Some(self.record[full]) };
        self.record.truncate(got.min(full));
        let n = nonce(&self.prefix, self.counter, last).map_err(io_err)?;
        let counter = self.counter;
        let plain = self
            .key
            .open_in_place(n, Aad::from(&self.header[..]), &mut self.record)
            .map_err(|_| io_err(EncryptionError::ChunkAuth(counter)))?;
        self.out.clear();
        self.out.extend_from_slice(plain);
        self.out_pos = 0;
        self.record.clear();
        if let Some(b) = extra {
            self.record.push(b);
        }
        self.counter += 1;
        self.done = last;
        Ok(())
    }
}

impl<R: Read> Read for Decryptor<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.out_pos == self.out.len() {
            if self.done {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let n = buf.len().min(self.out.len() - self.out_pos);
        buf[..n].copy_from_slice(&self.out[self.out_pos..self.out_pos + n]);
        self.out_pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;

    fn keys() -> &'static (String, String) {
        static K: OnceLock<(String, String)> = OnceLock::new();
        K.get_or_init(|| generate_key_pair(2048).unwrap())
    }

    fn ring() -> KeyRing {
        let mut r = KeyRing::default();
        r.insert("k1", PrivateKey::from_pem(&keys().1).unwrap());
        r
    }

    const CS: usize = 4096;

    fn encrypt(data: &[u8]) -> Vec<u8> {
        let public = PublicKey::from_pem(&keys().0).unwrap();
        let mut e = Encryptor::new(Vec::new(), &public, "k1", CS).unwrap();
        for piece in data.chunks(1000) {
            e.write_all(piece).unwrap();
        }
        e.finish().unwrap()
    }

    fn decrypt(data: &[u8], ring: &KeyRing) -> io::Result<Vec<u8>> {
        let mut d = Decryptor::new(data, ring)?;
        let mut out = Vec::new();
        let mut buf = [0u8; 777];
        loop {
            let n = d.read(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    fn header_len(obj: &[u8]) -> usize {
        let id = obj[9] as usize;
        let wl_at = 10 + id + 4 + 8;
        wl_at + 2 + u16::from_be_bytes([obj[wl_at], obj[wl_at + 1]]) as usize
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn round_trips_at_chunk_edges() {
        for len in [0, 1, CS - 1, CS, CS + 1, 3 * CS + CS / 2] {
            let d = data(len);
            let enc = encrypt(&d);
            let chunks = len.div_ceil(CS).max(1);
            assert_eq!(
                enc.len(),
                header_len(&enc) + len + chunks * TAG_LEN,
                "len {len}"
            );
            assert_eq!(decrypt(&enc, &ring()).unwrap(), d, "len {len}");
        }
    }

    fn expect_err(obj: &[u8], want: &str) {
        let err = decrypt(obj, &ring()).expect_err("tampered object accepted");
        assert!(
            err.to_string().contains(want),
            "{err} should mention {want:?}"
        );
    }

    #[test]
    fn tampering_is_detected() {
        let d = data(3 * CS + 100);
        let enc = encrypt(&d);
        let h = header_len(&enc);
        let rec = CS + TAG_LEN;
        let mut flipped_body = enc.clone();
        flipped_body[h + rec + 5] ^= 1;
        expect_err(&flipped_body, "chunk 1 failed");
        let mut flipped_tag = enc.clone();
        flipped_tag[h + rec - 1] ^= 1;
        expect_err(&flipped_tag, "chunk 0 failed");
        let mut flipped_header = enc.clone();
        flipped_header[10 + 2 + 4 + 1] ^= 1; // inside the nonce prefix
        expect_err(&flipped_header, "chunk 0 failed");
        let mut dropped = enc[..h + rec].to_vec();
        dropped.extend_from_slice(&enc[h + 2 * rec..]);
        expect_err(&dropped, "chunk 1 failed");
        let mut swapped = enc[..h].to_vec();
        swapped.extend_from_slice(&enc[h + rec..h + 2 * rec]);
        swapped.extend_from_slice(&enc[h..h + rec]);
        swapped.extend_from_slice(&enc[h + 2 * rec..]);
        expect_err(&swapped, "chunk 0 failed");
        expect_err(&enc[..h + 3 * rec], "chunk 2 failed"); // last chunk dropped at a boundary
        expect_err(&enc[..enc.len() - 7], "chunk 3 failed"); // cut inside the last chunk
        let mut extended = enc.clone();
        extended.extend_from_slice(b"garbage");
        expect_err(&extended, "chunk 3 failed");
        expect_err(&enc[..h - 3], "truncated inside the header");
        expect_err(b"PGHOARD1xxxxxxxxxx", "bad magic");
    }

    #[test]
    fn no_plaintext_from_a_failed_chunk() {
        let d = data(2 * CS);
        let mut enc = encrypt(&d);
        let h = header_len(&enc);
        enc[h + CS + TAG_LEN + 10] ^= 1; // chunk 1
        let mut dec = Decryptor::new(&enc[..], &ring()).unwrap();
        let mut out = Vec::new();
        let err = dec.read_to_end(&mut out).unwrap_err();
        assert!(err.to_string().contains("chunk 1"), "{err}");
        assert_eq!(out, d[..CS], "only the verified first chunk may come out");
    }

    #[test]
    fn header_swap_between_objects_is_detected() {
        let a = encrypt(&data(CS + 10));
        let b = encrypt(&data(CS + 10));
        let (ha, hb) = (header_len(&a), header_len(&b));
        let mut mixed = a[..ha].to_vec();
        mixed.extend_from_slice(&b[hb..]);
        expect_err(&mixed, "chunk 0 failed");
    }

    #[test]
    fn wrong_and_unknown_keys() {
        let enc = encrypt(&data(100));
        let (_, other_private) = generate_key_pair(2048).unwrap();
        let mut wrong = KeyRing::default();
        wrong.insert("k1", PrivateKey::from_pem(&other_private).unwrap());
        let err = decrypt(&enc, &wrong).unwrap_err();
        assert!(
            err.to_string()
                .contains("wrong private key for key id \"k1\""),
            "{err}"
        );
        let err = decrypt(&enc, &KeyRing::default()).unwrap_err();
        assert!(
            err.to_string().contains("unknown encryption key id \"k1\""),
            "{err}"
        );
    }

    #[test]
    fn pem_round_trip_and_no_key_material_in_debug() {
        let (public, private) = keys();
        assert!(public.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert!(private.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let p = PrivateKey::from_pem(private).unwrap();
        assert_eq!(format!("{p:?}"), "PrivateKey(<hidden>)");
        assert!(PublicKey::from_pem(private).is_err());
        assert!(PrivateKey::from_pem(public).is_err());
        assert!(generate_key_pair(1024).is_err());
        // The public half derived from the private key encrypts for it.
        let derived = p.public_key();
        let mut e = Encryptor::new(Vec::new(), &derived, "k1", CS).unwrap();
        e.write_all(b"x").unwrap();
        assert_eq!(decrypt(&e.finish().unwrap(), &ring()).unwrap(), b"x");
    }
}
