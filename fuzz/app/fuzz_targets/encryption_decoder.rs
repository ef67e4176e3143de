//! Arbitrary bytes as encrypted objects (docs/formats.md): the decoder must return an error or
//! the exact plaintext, never panic, and never hand out the plaintext of an object that was
//! altered after it was sealed (a flipped, inserted or removed byte, a truncation).
#![no_main]

use std::io::{Read, Write};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use walhoard::pipeline::encryption::{
    generate_key_pair, Decryptor, Encryptor, KeyRing, PrivateKey, PublicKey,
};

struct Keys {
    public: PublicKey,
    ring: KeyRing,
}

/// One key pair for the whole run: generating one per input would be all the fuzzer does.
fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let (public, private) = generate_key_pair(2048).expect("key pair");
        let mut ring = KeyRing::default();
        ring.insert("k1", PrivateKey::from_pem(&private).expect("private key"));
        Keys {
            public: PublicKey::from_pem(&public).expect("public key"),
            ring,
        }
    })
}

fn decrypt(object: &[u8], ring: &KeyRing) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    Decryptor::new(object, ring)?.read_to_end(&mut out)?;
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    let k = keys();
    // The input as an object: a header, a wrapped key and chunks nobody sealed.
    let _ = decrypt(data, &k.ring);
    // The input's tail sealed (4 KiB chunks, the smallest, so that short inputs span several),
    // then altered as its first four bytes say.
    let Some((edit, plain)) = data.split_first_chunk::<4>() else {
        return;
    };
    let mut w = Encryptor::new(Vec::new(), &k.public, "k1", 4096).expect("encryptor");
    w.write_all(plain).expect("seal");
    let sealed = w.finish().expect("finish");
    let mut object = sealed.clone();
    let at = usize::from(u16::from_le_bytes([edit[1], edit[2]]));
    match edit[0] % 4 {
        0 => {
            let i = at % object.len();
            object[i] ^= edit[3];
        }
        1 => object.truncate(at % (object.len() + 1)),
        2 => object.insert(at % (object.len() + 1), edit[3]),
        _ => {
            let from = at % (object.len() + 1);
            let to = (from + usize::from(edit[3])).min(object.len());
            object.drain(from..to);
        }
    }
    match decrypt(&object, &k.ring) {
        Ok(p) => assert!(
            object == sealed && p == plain,
            "an altered object decrypted ({} of {} bytes)",
            p.len(),
            plain.len()
        ),
        Err(e) => assert!(object != sealed, "an intact object failed: {e}"),
    }
});
