//! pghoard's `pghoa1` encrypted objects, written by the real writer: rohmu (pghoard's storage
//! library, from PyPI, in a venv that tools/install-rohmu.sh makes) encrypts with its own
//! `EncryptorFile`, or compresses and encrypts with `rohmufile.write_file` as pghoard's
//! compressor does and stores through rohmu's local storage (which writes the `.metadata`
//! sidecar), and walhoard must give back the same bytes; tampered, truncated, extended and
//! wrong-key objects must be refused, naming the object and pghoard's format, before any
//! plaintext is used. A missing python or rohmu fails these tests (the install script runs
//! first), it never skips them.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use serde_json::json;
use walhoard::config::ObjectStorageConfig;
use walhoard::pipeline::encryption::{generate_key_pair, Decryptor, KeyRing, PrivateKey};
use walhoard::pipeline::pghoa1::{self, Pghoa1Decryptor};
use walhoard::pipeline::transfer::{download_file, download_with};
use walhoard::storage::ObjectStore;
use walhoard_testkit::PgCluster;

use crate::daemon_support::{switch_segment, DaemonDir};
use crate::restore::{
    assert_not_a_data_dir, get_basebackup, insert, primary, restore_and_promote, stderr, Primary,
    CHECKSUM,
};

/// The venv's python with rohmu; tools/install-rohmu.sh makes it when missing (once per test
/// process) and a failure there fails the test.
fn rohmu_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/install-rohmu.sh");
        let out = Command::new(&script)
            .output()
            .expect("run tools/install-rohmu.sh");
        assert!(
            out.status.success(),
            "tools/install-rohmu.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let venv = String::from_utf8(out.stdout).unwrap();
        PathBuf::from(venv.trim()).join("bin/python")
    })
}

/// rohmu as pghoard uses it. `raw PUBLIC SRC DST [SRC DST]...`: rohmu's `EncryptorFile` alone,
/// fed in 64 KiB + 1 pieces;
/// `raw-nonce`: the same with the CTR counter block rohmu draws (its second `os.urandom`) set
/// so that the counter carries out of its low 64 bits after two blocks. Otherwise the mode is
/// a compression algorithm: `rohmufile.write_file` (pghoard's compressor's call, hashing the
/// input as it does), then rohmu's local storage stores the object with pghoard's WAL metadata.
const ROHMU: &str = r#"
import hashlib, json, os, sys
mode, public, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
pub = open(public, "rb").read()
if mode.startswith("raw"):
    from rohmu import encryptor
    if mode == "raw-nonce":
        real, calls = os.urandom, []
        def urandom(n):
            calls.append(n)
            return bytes.fromhex("0123456789abcdeffffffffffffffffe") if len(calls) == 2 else real(n)
        encryptor.os.urandom = urandom
    for src, dst in zip(rest[0::2], rest[1::2]):
        with open(src, "rb") as i, open(dst, "wb") as o:
            f = encryptor.EncryptorFile(o, pub)
            data = i.read()
            for at in range(0, len(data), 65537):
                f.write(data[at:at + 65537])
            f.close()
else:
    import rohmu
    from rohmu import rohmufile
    src, dst, store_dir, prefix, key = rest
    h = hashlib.sha1()
    with open(src, "rb") as i, open(dst, "wb") as o:
        size, _ = rohmufile.write_file(input_obj=i, output_obj=o, data_callback=h.update,
                                       compression_algorithm=mode, compression_level=0,
                                       rsa_public_key=pub)
    metadata = {"pg-version": 150000, "compression-algorithm": mode, "compression-level": 0,
                "original-file-size": size, "host": "pghoard-host", "hash": h.hexdigest(),
                "hash-algorithm": "sha1", "encryption-key-id": "k1"}
    t = rohmu.get_transfer({"storage_type": "local", "directory": store_dir, "prefix": prefix})
    t.store_file_from_disk(key, dst, metadata=metadata)
"#;

fn rohmu(args: &[&std::ffi::OsStr]) {
    let mut cmd = Command::new(rohmu_python());
    crate::common::output_ok(cmd.arg("-c").arg(ROHMU).args(args), "rohmu");
}

/// A key pair, and a scratch directory holding the public half for rohmu.
struct Keys {
    dir: tempfile::TempDir,
    public_pem: PathBuf,
    private: String,
}

impl Keys {
    fn new() -> Keys {
        let (public, private) = generate_key_pair(2048).unwrap();
        Keys::of(public, private)
    }

    fn of(public: String, private: String) -> Keys {
        // `public` goes to rohmu as a file; walhoard reads with `private`.
        let dir = tempfile::tempdir().unwrap();
        let public_pem = dir.path().join("public.pem");
        std::fs::write(&public_pem, &public).unwrap();
        Keys {
            dir,
            public_pem,
            private,
        }
    }

    fn private_key(&self) -> PrivateKey {
        PrivateKey::from_pem(&self.private).unwrap()
    }

    fn ring(&self) -> KeyRing {
        let mut ring = KeyRing::default();
        ring.insert("k1", self.private_key());
        ring
    }

    /// `data` encrypted by rohmu's `EncryptorFile` (`mode` raw or raw-nonce).
    fn rohmu_encrypt(&self, mode: &str, data: &[u8]) -> Vec<u8> {
        let src = self.dir.path().join("plain");
        let dst = self.dir.path().join("encrypted");
        std::fs::write(&src, data).unwrap();
        rohmu(&[
            mode.as_ref(),
            self.public_pem.as_os_str(),
            src.as_os_str(),
            dst.as_os_str(),
        ]);
        std::fs::read(dst).unwrap()
    }

    /// `data` compressed with `algorithm` and encrypted as pghoard's compressor does, stored
    /// under `key` of site `prefix` in local storage at `store_dir`, with pghoard's metadata.
    fn rohmu_store(&self, algorithm: &str, data: &[u8], store_dir: &Path, prefix: &str, key: &str) {
        let src = self.dir.path().join("plain");
        let dst = self.dir.path().join("compressed");
        std::fs::write(&src, data).unwrap();
        rohmu(&[
            algorithm.as_ref(),
            self.public_pem.as_os_str(),
            src.as_os_str(),
            dst.as_os_str(),
            store_dir.as_os_str(),
            prefix.as_ref(),
            key.as_ref(),
        ]);
    }
}

/// walhoard's reading of a whole `pghoa1` object: the MAC pass, then the decrypting pass.
fn decrypt(obj: &[u8], private: &PrivateKey) -> std::io::Result<Vec<u8>> {
    let Some(verified) = pghoa1::verify(&[], obj, private, "k1")? else {
        return Ok(Vec::new());
    };
    let mut plain = Vec::new();
    Pghoa1Decryptor::new(verified, obj)?.read_to_end(&mut plain)?;
    Ok(plain)
}

/// A reader that hands out 1 to 37 bytes at a time, so that the footer and the header arrive
/// split across reads at every offset.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.step = self.step % 37 + 1;
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// [`decrypt`] with both reads trickling.
fn decrypt_trickled(obj: &[u8], private: &PrivateKey) -> std::io::Result<Vec<u8>> {
    let trickle = || Trickle { data: obj, step: 0 };
    let Some(verified) = pghoa1::verify(&[], trickle(), private, "k1")? else {
        return Ok(Vec::new());
    };
    let mut plain = Vec::new();
    Pghoa1Decryptor::new(verified, trickle())?.read_to_end(&mut plain)?;
    Ok(plain)
}

fn data(len: usize) -> Vec<u8> {
    let mut x: u32 = 99;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect()
}

#[test]
fn pghoa1_rohmu_encryptor_output_decrypts() {
    let k = Keys::new();
    let private = k.private_key();
    // Around the AES block, and more than one read piece (1 MiB) of the decryptor.
    for len in [0, 1, 15, 16, 17, 1000, 3 * 1024 * 1024 + 7] {
        let plain = data(len);
        let obj = k.rohmu_encrypt("raw", &plain);
        if len == 0 {
            assert!(obj.is_empty(), "rohmu writes an empty plaintext as nothing");
        } else {
            assert_eq!(&obj[..6], b"pghoa1");
            // Header, one ciphertext byte per plaintext byte, 32-byte HMAC footer.
            assert_eq!(obj.len(), 8 + 256 + len + 32, "len {len}");
        }
        assert!(decrypt(&obj, &private).unwrap() == plain, "len {len}");
        assert!(
            decrypt_trickled(&obj, &private).unwrap() == plain,
            "len {len}, read in small pieces"
        );
    }
    // The CTR counter carries across its low 64 bits, as OpenSSL's does (a 64- or 32-bit
    // counter would decrypt everything after the second block wrongly).
    let plain = data(100_000);
    let obj = k.rohmu_encrypt("raw-nonce", &plain);
    assert!(decrypt(&obj, &private).unwrap() == plain);
}

fn expect_refused(obj: &[u8], private: &PrivateKey, want: &str) {
    let err = decrypt(obj, private).expect_err("a damaged pghoa1 object was accepted");
    let msg = err.to_string();
    assert!(
        msg.contains("pghoard pghoa1 object") && msg.contains(want),
        "{msg:?} should name pghoard's format and {want:?}"
    );
}

#[test]
fn pghoa1_tampered_truncated_extended_and_wrong_key_are_refused() {
    let k = Keys::new();
    let private = k.private_key();
    let obj = k.rohmu_encrypt("raw", &data(70_000));
    let body = 8 + 256;
    let footer = obj.len() - 32;
    for at in [body + 40_000, footer + 5] {
        let mut bad = obj.clone();
        bad[at] ^= 1;
        expect_refused(&bad, &private, "HMAC-SHA256 mismatch");
    }
    let mut bad = obj.clone();
    bad[8 + 100] ^= 1; // inside the wrapped key
    expect_refused(&bad, &private, "does not unwrap");
    expect_refused(&obj[..obj.len() - 1], &private, "HMAC-SHA256 mismatch");
    expect_refused(&obj[..footer], &private, "HMAC-SHA256 mismatch");
    expect_refused(&obj[..body + 20], &private, "shorter than its 32-byte");
    expect_refused(&obj[..100], &private, "truncated inside its header");
    expect_refused(&obj[..5], &private, "truncated inside its header");
    let mut extended = obj.clone();
    extended.push(0);
    expect_refused(&extended, &private, "HMAC-SHA256 mismatch");
    let other = Keys::new();
    expect_refused(&obj, &other.private_key(), "does not unwrap");

    // The second read must be the object the first one verified.
    let verified = pghoa1::verify(&[], &obj[..], &private, "k1")
        .unwrap()
        .unwrap();
    let mut changed = obj.clone();
    changed[body + 10] ^= 1;
    let mut out = Vec::new();
    let err = Pghoa1Decryptor::new(verified, &changed[..])
        .unwrap()
        .read_to_end(&mut out)
        .unwrap_err();
    assert!(err.to_string().contains("changed between"), "{err}");
    let verified = pghoa1::verify(&[], &obj[..], &private, "k1")
        .unwrap()
        .unwrap();
    let Err(err) = Pghoa1Decryptor::new(verified, &other_header(&k, &obj)[..]) else {
        panic!("another object's header was taken for the verified one");
    };
    assert!(err.to_string().contains("changed between"), "{err}");
}

/// Another encryption of the same plaintext length: a different header.
fn other_header(k: &Keys, obj: &[u8]) -> Vec<u8> {
    k.rohmu_encrypt("raw", &data(obj.len() - 8 - 256 - 32))
}

fn local_store(dir: &Path) -> ObjectStore {
    let cfg: ObjectStorageConfig =
        serde_json::from_value(json!({"storage_type": "local", "directory": dir})).unwrap();
    ObjectStore::open(&cfg, "site").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pghoa1_objects_pghoard_stored_restore_through_download() {
    let k = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let store = local_store(&store_dir);
    let mut noisy = data(3 * 1024 * 1024 + 5);
    for (i, b) in noisy.iter_mut().enumerate() {
        if (i / 4096) % 4 == 0 {
            *b = 0;
        }
    }
    for algorithm in ["snappy", "zstd", "lzma"] {
        for plain in [Vec::new(), data(100), noisy.clone()] {
            let key = format!("xlog/{algorithm}-{}", plain.len());
            k.rohmu_store(algorithm, &plain, &store_dir, "site", &key);
            let out = dir.path().join("restored");
            let metadata = download_file(&store, &key, &out, &k.ring())
                .await
                .unwrap_or_else(|e| panic!("{key}: {e}"));
            assert!(std::fs::read(&out).unwrap() == plain, "{key}");
            assert_eq!(metadata.encryption_key_id.as_deref(), Some("k1"));
            std::fs::remove_file(&out).unwrap();
        }
    }

    // Damaged objects: refused with the object key and pghoard's format named, no file left,
    // and nothing of the object handed on (the MAC is checked before the plaintext exists).
    let key = "basebackup_chunk/b/b.00000001.pghoard";
    k.rohmu_store("zstd", &noisy, &store_dir, "site", key);
    let path = store_dir.join("site").join(key);
    let good = std::fs::read(&path).unwrap();
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x20;
    let other = Keys::new();
    let cases: Vec<(&str, Vec<u8>, KeyRing, &str)> = vec![
        ("tampered", flipped, k.ring(), "HMAC-SHA256 mismatch"),
        (
            "truncated",
            good[..good.len() - 1].to_vec(),
            k.ring(),
            "HMAC-SHA256 mismatch",
        ),
        ("wrong key", good.clone(), other.ring(), "does not unwrap"),
        (
            "unknown key id",
            good.clone(),
            KeyRing::default(),
            "no private key for its encryption-key-id \"k1\"",
        ),
    ];
    for (what, bytes, ring, want) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let out = dir.path().join("restored");
        let err = download_file(&store, key, &out, &ring)
            .await
            .expect_err(what)
            .to_string();
        assert!(
            err.contains(key) && err.contains("pghoard pghoa1 object") && err.contains(want),
            "{what}: {err}"
        );
        assert!(!out.exists(), "{what}: a file was left");
        let consumed = Arc::new(AtomicBool::new(false));
        let c = consumed.clone();
        let result = download_with(&store, key, &ring, move |_, r| {
            let mut byte = [0u8; 1];
            let n = r.read(&mut byte)?;
            c.store(n > 0, Ordering::SeqCst);
            Ok(())
        })
        .await;
        // A reader that stops early never reaches the end of the object: a MAC checked only
        // there (as pghoard does) would have let it take unauthenticated plaintext.
        assert!(
            !consumed.load(Ordering::SeqCst),
            "{what}: plaintext was handed on before the MAC check"
        );
        assert!(result.is_err(), "{what}: accepted by download_with");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pghoa1_wal_restore_command_serves_pghoard_segment() {
    let pg = PgCluster::start().unwrap();
    pg.psql("create table t as select g, md5(g::text) from generate_series(1, 2000) g")
        .unwrap();
    let name = switch_segment(&pg);
    let segment = std::fs::read(pg.wal_dir().join(&name)).unwrap();
    let d = DaemonDir::new();
    // pghoard's configuration shape: encryption_keys.k1.{public,private}; the segment as
    // pghoard archived it: zstd, then pghoa1, with pghoard's sidecar metadata.
    d.write_config(&pg, d.local_storage(), json!({}));
    let k = Keys::of(d.public.clone(), d.private.clone());
    let key = format!("xlog/{name}");
    k.rohmu_store("zstd", &segment, &d.path("archive"), "main", &key);
    let stored = d.path("archive").join("main").join(&key);
    let good = std::fs::read(&stored).unwrap();

    let pg_wal = tempfile::tempdir().unwrap();
    let output = pg_wal.path().join("RECOVERYXLOG");
    let restore = |xlog: &str| {
        Command::new(env!("CARGO_BIN_EXE_walhoard"))
            .args(crate::common::RESTORE_COMMAND)
            .args([xlog, "--output"])
            .arg(&output)
            .arg("--config")
            .arg(d.config_path())
            .output()
            .unwrap()
    };
    let out = restore(&name);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(std::fs::read(&output).unwrap() == segment);
    std::fs::remove_file(&output).unwrap();

    // Refused with exit 255 (never 1, which PostgreSQL takes as the end of the archive), and
    // nothing at %p.
    let mut flipped = good.clone();
    flipped[good.len() / 3] ^= 1;
    let wrong = DaemonDir::new().private;
    for (what, bytes, want) in [
        ("tampered", flipped, "HMAC-SHA256 mismatch"),
        (
            "truncated",
            good[..good.len() - 40].to_vec(),
            "HMAC-SHA256 mismatch",
        ),
        ("wrong key", good.clone(), "does not unwrap"),
    ] {
        std::fs::write(&stored, &bytes).unwrap();
        if what == "wrong key" {
            let mut cfg: serde_json::Value =
                serde_json::from_slice(&std::fs::read(d.config_path()).unwrap()).unwrap();
            cfg["backup_sites"]["main"]["encryption_keys"]["k1"]["private"] = json!(wrong);
            std::fs::write(d.config_path(), cfg.to_string()).unwrap();
        }
        let out = restore(&name);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(255), "{what}: {stderr}");
        assert!(
            stderr.contains(&key)
                && stderr.contains("pghoard pghoa1 object")
                && stderr.contains(want),
            "{what}: {stderr}"
        );
        assert!(!output.exists(), "{what}: something was left at %p");
        let left: Vec<_> = std::fs::read_dir(pg_wal.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != ".walhoard-prefetch")
            .collect();
        assert!(left.is_empty(), "{what}: left behind {left:?}");
    }
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Every object walhoard encrypted under `site_dir` (its sidecar says `encryption-format:
/// walhenc1`) written again as pghoard would have: the same compressed bytes encrypted by
/// rohmu's `EncryptorFile`, the sidecar without walhoard's `encryption-format`. Returns the
/// paths converted.
fn as_pghoard_wrote_it(site_dir: &Path, ring: &KeyRing, k: &Keys) -> Vec<PathBuf> {
    let scratch = k.dir.path().join("compressed");
    std::fs::create_dir_all(&scratch).unwrap();
    let mut args: Vec<std::ffi::OsString> = vec!["raw".into(), k.public_pem.clone().into()];
    let mut converted = Vec::new();
    for path in files(site_dir) {
        let sidecar = PathBuf::from(format!("{}.metadata", path.display()));
        let Ok(raw) = std::fs::read(&sidecar) else {
            continue;
        };
        let mut metadata: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&raw).unwrap();
        if metadata.remove("encryption-format") != Some(json!("walhenc1")) {
            continue;
        }
        let stored = std::fs::read(&path).unwrap();
        let mut compressed = Vec::new();
        Decryptor::new(&stored[..], ring)
            .unwrap()
            .read_to_end(&mut compressed)
            .unwrap();
        let src = scratch.join(converted.len().to_string());
        std::fs::write(&src, &compressed).unwrap();
        args.push(src.into());
        args.push(path.clone().into());
        std::fs::write(&sidecar, serde_json::to_vec(&metadata).unwrap()).unwrap();
        converted.push(path);
    }
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    rohmu(&args);
    converted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pghoa1_archive_restores_basebackup_and_replays_wal() {
    // A real archive (daemon-streamed WAL and a basebackup), then every encrypted object in it
    // turned into what pghoard writes: get-basebackup restores the pghoa1 chunks and control
    // object, and PostgreSQL replays the pghoa1 WAL through walhoard's restore_command.
    let p = primary(json!({})).await;
    insert(&p.pg, "after", 5_000);
    let want = p.pg.psql(CHECKSUM).unwrap();
    p.archive_all().await;
    let Primary {
        pg: _primary,
        d,
        mut daemon,
        ..
    } = p;
    daemon.kill9();
    let k = Keys::of(d.public.clone(), d.private.clone());
    let converted = as_pghoard_wrote_it(&d.path("archive").join("main"), &d.ring(), &k);
    let named = |part: &str| {
        converted
            .iter()
            .filter(|p| p.to_string_lossy().contains(part))
            .count()
    };
    assert!(
        named("/basebackup_chunk/") >= 1 && named("/basebackup/") == 1 && named("/xlog/") >= 2,
        "{converted:?}"
    );
    let first = converted
        .iter()
        .find(|p| p.to_string_lossy().contains("/xlog/"))
        .unwrap();
    assert_eq!(&std::fs::read(first).unwrap()[..6], b"pghoa1");

    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("restored");
    let restored = restore_and_promote(&d, &target, &["--restore-to-primary"]);
    assert_eq!(restored.psql(CHECKSUM).unwrap(), want);
    drop(restored);

    // One flipped byte in a chunk: refused naming the chunk and pghoard's format, nothing left
    // that looks like a data directory.
    let chunk = converted
        .iter()
        .filter(|p| p.to_string_lossy().contains("/basebackup_chunk/"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(chunk).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 4;
    std::fs::write(chunk, &bytes).unwrap();
    let target = work.path().join("tampered");
    let out = get_basebackup(&d, &target, &["--restore-to-primary"]);
    let err = stderr(&out);
    let chunk_name = chunk.file_name().unwrap().to_string_lossy().into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains(&chunk_name) && err.contains("pghoard pghoa1 object: HMAC-SHA256 mismatch"),
        "{err}"
    );
    assert_not_a_data_dir(&target);
}

/// Whose archive (the daemon's check before it streams, `walhoard check`'s `archive owner`):
/// the system identifier is read from the first page of pghoard's newest `pghoa1` segment
/// through the normal download path (its MAC checked first); a tampered one gives an error,
/// never an identifier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pghoa1_archive_identity_reads_pghoard_encrypted_segment() {
    use walhoard::daemon::identity::archive_identity;
    let pg = PgCluster::start().unwrap();
    let sysid: u64 = crate::common::system_identifier(&pg);
    let seg = switch_segment(&pg);
    let plain = std::fs::read(pg.data_dir().join("pg_wal").join(&seg)).unwrap();
    let k = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let store = local_store(&store_dir);
    // An older segment too: the newest is the one read.
    k.rohmu_store(
        "zstd",
        &plain,
        &store_dir,
        "site",
        "xlog/000000010000000000000000",
    );
    let key = format!("xlog/{seg}");
    k.rohmu_store("zstd", &plain, &store_dir, "site", &key);
    let found = archive_identity(&store, &k.ring()).await.unwrap().unwrap();
    assert_eq!((found.key.as_str(), found.system_id), (key.as_str(), sysid));
    let path = store_dir.join("site").join(&key);
    let mut obj = std::fs::read(&path).unwrap();
    let at = obj.len() / 2;
    obj[at] ^= 1;
    std::fs::write(&path, &obj).unwrap();
    let err = archive_identity(&store, &k.ring()).await.unwrap_err();
    assert!(format!("{err:#}").contains(&key), "{err:#}");
}
