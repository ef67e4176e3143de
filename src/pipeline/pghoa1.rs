//! Reading pghoard's `pghoa1` encrypted objects, as rohmu's `Encryptor` writes them (layout in
//! docs/formats.md, "pghoard's pghoa1 objects"): `b"pghoa1"`, the wrapped key's length (u16 BE),
//! the wrapped key — RSA-OAEP (SHA-1, MGF1-SHA-1) of an AES-128 key (16 bytes) ‖ the initial
//! CTR counter block (16) ‖ an HMAC-SHA256 key (32) — then the body in AES-128-CTR and a
//! 32-byte footer, the HMAC-SHA256 of the body's ciphertext. An empty plaintext is an empty
//! object (no header at all).
//!
//! pghoard decrypts as it reads and compares the MAC only at the end, after the plaintext went
//! on. walhoard checks it before any plaintext exists: [`verify`] reads the whole object once,
//! unwraps its key and checks the MAC without decrypting; only then does [`Pghoa1Decryptor`]
//! decrypt a second read of it. Reading twice (rather than decrypting into a temporary copy
//! that is published after the check) keeps memory bounded and needs no local space for
//! objects of any size; the cost is a second download of pghoard's legacy objects, which are
//! only read at restore. The second read is held to the first: the same header bytes, and a
//! MAC that checks and equals the first read's footer, or it fails at its end ("changed
//! between the two reads"), where the callers' usual failure handling removes what was written.

use std::io::{self, Read};

use aws_lc_rs::cipher::{DecryptionContext, StreamingDecryptingKey, UnboundCipherKey, AES_128};
use aws_lc_rs::constant_time::verify_slices_are_equal;
use aws_lc_rs::hmac;
use aws_lc_rs::iv::FixedLength;
use aws_lc_rs::rsa::{OaepPrivateDecryptingKey, OAEP_SHA1_MGF1SHA1};

use super::encryption::{read_full, KeyRing, PrivateKey};

/// The first bytes of every non-empty `pghoa1` object.
pub const MAGIC: &[u8; 6] = b"pghoa1";
/// The HMAC-SHA256 footer.
pub const MAC_LEN: usize = 32;
/// AES-128 key ‖ initial counter block ‖ HMAC key, as rohmu's `Encryptor.init_cipher` makes it.
const KEY_MATERIAL_LEN: usize = 16 + 16 + 32;
/// Ciphertext read and decrypted at a time.
const PIECE: usize = 1024 * 1024;

/// Every message says the object is pghoard's, so that an operator reading
/// "object xlog/…: cannot decode: …" knows which reader refused it.
#[derive(Debug, thiserror::Error)]
pub enum Pghoa1Error {
    #[error("pghoard pghoa1 object: truncated inside its header")]
    TruncatedHeader,
    #[error("pghoard pghoa1 object: bad magic")]
    BadMagic,
    #[error(
        "pghoard pghoa1 object: no private key for its encryption-key-id {0:?} in encryption_keys"
    )]
    UnknownKey(String),
    #[error(
        "pghoard pghoa1 object: the private key of encryption-key-id {0:?} does not unwrap its key \
         (wrong key, or a damaged header)"
    )]
    WrongKey(String),
    #[error("pghoard pghoa1 object: its unwrapped key material is {0} bytes, not 64")]
    BadKeyMaterial(usize),
    #[error("pghoard pghoa1 object: shorter than its 32-byte HMAC-SHA256 footer (truncated)")]
    Truncated,
    #[error(
        "pghoard pghoa1 object: HMAC-SHA256 mismatch (tampered, truncated or extended); \
         nothing of it was decrypted"
    )]
    BadMac,
    #[error("pghoard pghoa1 object: changed between the MAC check and decryption")]
    Changed,
}

fn invalid(e: Pghoa1Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The header of one object and the keys it wraps. Debug prints no key.
struct Header {
    /// The header's bytes, for holding the second read to the first.
    raw: Vec<u8>,
    cipher_key: [u8; 16],
    counter: [u8; 16],
    mac_key: hmac::Key,
}

impl Header {
    /// Reads the rest of a header whose first bytes, already read, are `start`.
    fn read(
        start: &[u8],
        r: &mut impl Read,
        private: &PrivateKey,
        key_id: &str,
    ) -> io::Result<Self> {
        let mut raw = start.to_vec();
        if raw.len() < MAGIC.len() + 2 {
            let have = raw.len();
            raw.resize(MAGIC.len() + 2, 0);
            if have + read_full(r, &mut raw[have..])? < raw.len() {
                return Err(invalid(Pghoa1Error::TruncatedHeader));
            }
        }
        if &raw[..MAGIC.len()] != MAGIC {
            return Err(invalid(Pghoa1Error::BadMagic));
        }
        let wrapped_len = u16::from_be_bytes([raw[6], raw[7]]) as usize;
        let have = raw.len();
        raw.resize(MAGIC.len() + 2 + wrapped_len, 0);
        if have > raw.len() || have + read_full(r, &mut raw[have..])? < raw.len() {
            return Err(invalid(Pghoa1Error::TruncatedHeader));
        }
        let oaep = OaepPrivateDecryptingKey::new(private.rsa().clone())
            .map_err(|_| io::Error::other("unusable private key"))?;
        let mut material = vec![0u8; oaep.min_output_size()];
        // rohmu wraps with OAEP(MGF1(SHA1), SHA1, label None): `Encryptor.init_cipher`.
        let unwrapped = oaep
            .decrypt(&OAEP_SHA1_MGF1SHA1, &raw[8..], &mut material, None)
            .map_err(|_| invalid(Pghoa1Error::WrongKey(key_id.to_string())))?;
        if unwrapped.len() != KEY_MATERIAL_LEN {
            return Err(invalid(Pghoa1Error::BadKeyMaterial(unwrapped.len())));
        }
        let mut cipher_key = [0u8; 16];
        let mut counter = [0u8; 16];
        cipher_key.copy_from_slice(&unwrapped[..16]);
        counter.copy_from_slice(&unwrapped[16..32]);
        let mac_key = hmac::Key::new(hmac::HMAC_SHA256, &unwrapped[32..]);
        material.fill(0);
        Ok(Header {
            raw,
            cipher_key,
            counter,
            mac_key,
        })
    }
}

// The AES key and counter do not outlive the object in memory (aws-lc-rs clears its own keys).
impl Drop for Header {
    fn drop(&mut self) {
        self.cipher_key.fill(0);
        self.counter.fill(0);
    }
}

/// The body of an object whose last [`MAC_LEN`] bytes are the footer: what is read is handed
/// out except the last 32 bytes seen so far, which are the footer once the input ends.
struct Body<R> {
    inner: R,
    buf: Vec<u8>,
    /// Bytes at `buf[..held]` carried over from the last piece (at most `MAC_LEN`).
    held: usize,
    /// Body bytes handed out so far.
    len: u64,
}

impl<R: Read> Body<R> {
    fn new(inner: R) -> Self {
        Body {
            inner,
            buf: vec![0u8; PIECE + MAC_LEN],
            held: 0,
            len: 0,
        }
    }

    /// The next piece of body, `buf[..k]`, as `Some(k)`; `None` at the end of the input, when
    /// `buf[..held]` is what should be the footer. Call [`Body::consume`] after a piece.
    fn fill(&mut self) -> io::Result<Option<usize>> {
        loop {
            let n = loop {
                match self.inner.read(&mut self.buf[self.held..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    other => break other?,
                }
            };
            if n == 0 {
                return Ok(None);
            }
            self.held += n;
            if self.held > MAC_LEN {
                let k = self.held - MAC_LEN;
                self.len += k as u64;
                return Ok(Some(k));
            }
        }
    }

    /// Keeps the bytes after the piece `buf[..k]` for the next one.
    fn consume(&mut self, k: usize) {
        self.buf.copy_within(k..k + MAC_LEN, 0);
        self.held = MAC_LEN;
    }

    /// The footer, once [`Body::fill`] returned `None`.
    fn footer(&self) -> Result<[u8; MAC_LEN], Pghoa1Error> {
        let mut f = [0u8; MAC_LEN];
        if self.held != MAC_LEN {
            return Err(Pghoa1Error::Truncated);
        }
        f.copy_from_slice(&self.buf[..MAC_LEN]);
        Ok(f)
    }
}

/// What the first read established: the object's keys and its checked footer.
pub struct Verified {
    header: Header,
    footer: [u8; MAC_LEN],
    body_len: u64,
}

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verified(pghoa1, {} body bytes)", self.body_len)
    }
}

/// Finds the private key for a `pghoa1` object's `encryption-key-id` (its metadata; the object
/// itself does not name its key).
pub fn key_for<'a>(keys: &'a KeyRing, key_id: Option<&str>) -> io::Result<&'a PrivateKey> {
    let id = key_id.unwrap_or_default();
    keys.get(id)
        .ok_or_else(|| invalid(Pghoa1Error::UnknownKey(id.to_string())))
}

/// The first read: `start` (the bytes already taken off `r` to recognise the format) and the
/// rest of `r` are one whole object. Unwraps its key and checks its MAC; decrypts nothing.
/// `None` for an empty object, whose plaintext is empty.
pub fn verify(
    start: &[u8],
    mut r: impl Read,
    private: &PrivateKey,
    key_id: &str,
) -> io::Result<Option<Verified>> {
    let mut first = start.to_vec();
    if first.is_empty() {
        let mut one = [0u8; 1];
        if read_full(&mut r, &mut one)? == 0 {
            return Ok(None);
        }
        first.push(one[0]);
    }
    let header = Header::read(&first, &mut r, private, key_id)?;
    let mut mac = hmac::Context::with_key(&header.mac_key);
    let mut body = Body::new(r);
    while let Some(k) = body.fill()? {
        mac.update(&body.buf[..k]);
        body.consume(k);
    }
    let footer = body.footer().map_err(invalid)?;
    verify_slices_are_equal(mac.sign().as_ref(), &footer)
        .map_err(|_| invalid(Pghoa1Error::BadMac))?;
    Ok(Some(Verified {
        header,
        footer,
        body_len: body.len,
    }))
}

/// The second read: decrypts the object [`verify`] checked, from a new read `r` of it. Fails
/// (at the end, as pghoard would at once) when that read is not the object verified.
pub struct Pghoa1Decryptor<R: Read> {
    body: Body<R>,
    verified: Verified,
    cipher: Option<StreamingDecryptingKey>,
    mac: Option<hmac::Context>,
    plain: Vec<u8>,
    plain_pos: usize,
    plain_len: usize,
}

impl<R: Read> Pghoa1Decryptor<R> {
    pub fn new(verified: Verified, mut r: R) -> io::Result<Self> {
        let mut raw = vec![0u8; verified.header.raw.len()];
        if read_full(&mut r, &mut raw)? < raw.len() || raw != verified.header.raw {
            return Err(invalid(Pghoa1Error::Changed));
        }
        let key = UnboundCipherKey::new(&AES_128, &verified.header.cipher_key)
            .map_err(|_| io::Error::other("AES key setup failed"))?;
        // CTR over the whole 128-bit block as a big-endian counter, as OpenSSL's (and so
        // pyca/cryptography's, which rohmu uses) `modes.CTR`.
        let cipher = StreamingDecryptingKey::ctr(
            key,
            DecryptionContext::Iv128(FixedLength::from(verified.header.counter)),
        )
        .map_err(|_| io::Error::other("AES-CTR setup failed"))?;
        let mac = hmac::Context::with_key(&verified.header.mac_key);
        Ok(Pghoa1Decryptor {
            body: Body::new(r),
            verified,
            cipher: Some(cipher),
            mac: Some(mac),
            plain: vec![0u8; PIECE + MAC_LEN + 16],
            plain_pos: 0,
            plain_len: 0,
        })
    }

    /// Decrypts the next piece into `plain`; at the end, checks that this read was the
    /// verified object.
    fn next_piece(&mut self) -> io::Result<bool> {
        let (Some(cipher), Some(mac)) = (self.cipher.as_mut(), self.mac.as_mut()) else {
            return Ok(false);
        };
        match self.body.fill()? {
            Some(k) => {
                if self.body.len > self.verified.body_len {
                    return Err(invalid(Pghoa1Error::Changed));
                }
                let piece = &self.body.buf[..k];
                mac.update(piece);
                let out = cipher
                    .update(piece, &mut self.plain)
                    .map_err(|_| io::Error::other("AES-CTR failed"))?;
                self.plain_len = out.written().len();
                self.plain_pos = 0;
                self.body.consume(k);
                Ok(true)
            }
            None => {
                let footer = self.body.footer().map_err(invalid)?;
                let mac = self.mac.take().map(|m| m.sign());
                let same = mac
                    .is_some_and(|m| verify_slices_are_equal(m.as_ref(), &footer).is_ok())
                    && footer == self.verified.footer
                    && self.body.len == self.verified.body_len;
                if !same {
                    return Err(invalid(Pghoa1Error::Changed));
                }
                // CTR holds nothing back: `finish` only releases the context.
                if let Some(cipher) = self.cipher.take() {
                    let mut rest = [0u8; 16];
                    let out = cipher
                        .finish(&mut rest)
                        .map_err(|_| io::Error::other("AES-CTR failed"))?;
                    if !out.written().is_empty() {
                        return Err(io::Error::other("AES-CTR held back plaintext"));
                    }
                }
                Ok(false)
            }
        }
    }
}

impl<R: Read> Read for Pghoa1Decryptor<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.plain_pos == self.plain_len {
            if !self.next_piece()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.plain_len - self.plain_pos);
        buf[..n].copy_from_slice(&self.plain[self.plain_pos..self.plain_pos + n]);
        self.plain_pos += n;
        Ok(n)
    }
}
