//! Direct writes to local storage, for [`super::ObjectStore::put_whole`].

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// What `O_DIRECT` asks of a buffer's address, a write's length and its file offset: a page,
/// which covers every logical block size up to 4 KiB. A buffer aligned to it (the one-shot
/// upload's sealed objects are) is written to local storage without the page cache.
pub const DIRECT_ALIGN: usize = 4096;

/// Writes `data` to a new file in `tmp_dir`, syncs it and renames it onto `target` (creating
/// `target`'s directory): `target` is the old object or the whole new one, never part of it.
/// With `archive`, `data` is an archive object, read again only by a restore: it does not go
/// through the page cache when it can be written with `O_DIRECT` (its address is aligned and
/// the file system takes it; the last partial page is written through the cache), and what
/// did go through the cache is dropped from it once it is on disk.
pub(super) fn write_synced(
    tmp_dir: &Path,
    target: &Path,
    data: &[u8],
    archive: bool,
) -> io::Result<()> {
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::create_dir_all(tmp_dir)?;
    let tmp = tmp_dir.join(super::temp_name());
    let result = (|| {
        let f = write_file(&tmp, data, archive)?;
        f.sync_all()?;
        if archive {
            // Advice only: a failure changes nothing that was written.
            let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
        }
        std::fs::rename(&tmp, target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates `tmp` holding `data`, not yet synced: an archive object in an aligned buffer with
/// `O_DIRECT` (all but its last partial page), anything else, or anything the direct write
/// failed on, through the page cache.
fn write_file(tmp: &Path, data: &[u8], archive: bool) -> io::Result<File> {
    let direct = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
    if archive && direct > 0 && data.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
        match write_direct(tmp, data, direct) {
            Ok(f) => return Ok(f),
            // Not every file system takes O_DIRECT (EINVAL, possibly after creating the
            // file); the cache always works.
            Err(e) => {
                tracing::debug!(file = %tmp.display(), error = %e, "O_DIRECT write failed; writing through the page cache");
                match std::fs::remove_file(tmp) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
    }
    let mut f = OpenOptions::new().write(true).create_new(true).open(tmp)?;
    f.write_all(data)?;
    Ok(f)
}

/// `data[..direct]` with `O_DIRECT`, the rest (less than a page) through the page cache;
/// returns the cached handle, whose `fsync` covers both.
fn write_direct(tmp: &Path, data: &[u8], direct: usize) -> io::Result<File> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(tmp)?;
    f.write_all(&data[..direct])?;
    let f = OpenOptions::new().write(true).open(tmp)?;
    f.write_all_at(&data[direct..], direct as u64)?;
    Ok(f)
}
