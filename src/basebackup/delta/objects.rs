//! Delta mode's hash objects: a file of at least `basebackup_delta_mode_min_delta_file_size`
//! bytes is stored once as `basebackup_delta/<hexdigest>`, the BLAKE2s-256 of its plain bytes
//! (as pghoard names them: `DeltaBaseBackup._delta_upload_hexdigest`), compressed and
//! encrypted like every object of the site. An object already there (walhoard's or pghoard's,
//! from any earlier backup of the site) is referenced, not stored again.
//!
//! A file is read exactly at the size the walk saw (cut if it grew, zero-padded if it shrank,
//! as basebackup.c's `sendFile` does; WAL replay repairs both). It is hashed first, so that
//! the object's name is known before the upload starts (object stores take the key first and
//! nothing is staged on disk), then read again into the upload, hashed on the way: when the
//! bytes differ (the server wrote the file in between) the upload fails, nothing is stored
//! under the name, and the caller puts the file into a bundle chunk instead
//! ([`Stored::Changed`]).

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

use super::super::BackupContext;
use crate::pipeline::blake2s::Blake2s;
use crate::pipeline::transfer::{upload, Hashing, Input, ObjectKind, Source, Upload};
use crate::restore::pghoard_delta::OBJECT_PREFIX;
use crate::storage::meta::ObjectMeta;

/// pghoard's format label on a delta object (`BaseBackupFormat.delta_v2`).
pub const FORMAT_DELTA_V2: &str = "pghoard-delta-v2";

/// The key of the object holding the bytes whose BLAKE2s-256 is `hexdigest`.
pub fn object_key(hexdigest: &str) -> String {
    format!("{OBJECT_PREFIX}/{hexdigest}")
}

/// Feeds exactly `size` bytes of `path` to `f`: cut if the file grew, zeros after its end if
/// it shrank. `Ok(false)`: the file is gone.
pub fn read_sized(
    path: &Path,
    size: u64,
    mut f: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<bool> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("open {}: {e}", path.display()),
            ))
        }
    };
    let mut r = file.take(size);
    let mut buf = vec![0u8; 256 * 1024];
    let mut done = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("read {}: {e}", path.display()),
                ))
            }
        };
        f(&buf[..n])?;
        done += n as u64;
    }
    buf.fill(0);
    while done < size {
        let n = (size - done).min(buf.len() as u64) as usize;
        f(&buf[..n])?;
        done += n as u64;
    }
    Ok(true)
}

/// The hex BLAKE2s-256 of `size` bytes of `path` ([`read_sized`]); `None`: the file is gone.
pub fn hash_file(path: &Path, size: u64) -> io::Result<Option<String>> {
    let mut h = Blake2s::new();
    let found = read_sized(path, size, |b| {
        h.update(b);
        Ok(())
    })?;
    Ok(found.then(|| h.finish_hex()))
}

/// What became of one hash object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Already in the store (this many bytes stored): referenced.
    Reused(u64),
    /// Stored now (this many bytes).
    Uploaded(u64),
    /// The file's bytes changed (or it vanished) after it was hashed: nothing stored.
    Changed,
}

/// Makes sure `basebackup_delta/<hexdigest>` holds `size` bytes of `path`: referenced when the
/// store has it, else stored from the file (checked against `hexdigest` on the way).
pub async fn store_object(
    ctx: &BackupContext,
    path: PathBuf,
    size: u64,
    hexdigest: &str,
) -> Result<Stored> {
    let key = object_key(hexdigest);
    if let Some(info) = ctx
        .store
        .stat(&key)
        .await
        .with_context(|| format!("stat {key}"))?
    {
        return Ok(Stored::Reused(info.size));
    }
    let changed = Arc::new(AtomicBool::new(false));
    let flag = changed.clone();
    let expect = hexdigest.to_string();
    let produce = move |w: &mut dyn Write| -> io::Result<()> {
        let mut h = Blake2s::new();
        let found = read_sized(&path, size, |b| {
            h.update(b);
            w.write_all(b)
        })?;
        if !found || h.finish_hex() != expect {
            flag.store(true, Ordering::Relaxed);
            return Err(io::Error::other(format!(
                "{} changed after it was hashed",
                path.display()
            )));
        }
        Ok(())
    };
    let metadata = ObjectMeta {
        format: Some(FORMAT_DELTA_V2.into()),
        original_file_size: Some(size),
        ..ctx.shared_metadata()
    };
    let uploaded = upload(
        &ctx.store,
        Upload {
            kind: ObjectKind::BasebackupChunk,
            key: key.clone(),
            source: Source::produced(produce),
            input: Input::Plain,
            hashing: Hashing::Sha1Returned,
            compression: ctx.compression,
            encryption: ctx.encryption.clone(),
            metadata,
        },
    )
    .await;
    if uploaded.is_err() && changed.load(Ordering::Relaxed) {
        return Ok(Stored::Changed);
    }
    ctx.count_upload(crate::metrics::FileType::BasebackupChunk, &uploaded);
    let up = uploaded.with_context(|| format!("store delta object {key}"))?;
    // A failed backup deletes what it stored. Recorded only once stored: a failed upload of a
    // produced stream leaves nothing, and an object of the same name another writer stored
    // meanwhile must not be deleted on this backup's failure.
    ctx.record_stored(&key);
    Ok(Stored::Uploaded(up.stored_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_sized_cuts_and_pads_like_send_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abcdef").unwrap();
        let collect = |size| {
            let mut out = Vec::new();
            let found = read_sized(&p, size, |b| {
                out.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
            (found, out)
        };
        assert_eq!(collect(3), (true, b"abc".to_vec()));
        assert_eq!(collect(8), (true, b"abcdef\0\0".to_vec()));
        assert_eq!(
            hash_file(&dir.path().join("gone"), 5).unwrap(),
            None,
            "a vanished file"
        );
        // Python: hashlib.blake2s(b"abc").hexdigest()
        assert_eq!(
            hash_file(&p, 3).unwrap().unwrap(),
            "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"
        );
    }
}
