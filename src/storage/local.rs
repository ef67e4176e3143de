//! Direct writes to local storage, for [`super::ObjectStore::put_whole`].

use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `data` to a new file in `tmp_dir`, syncs it and renames it onto `target` (creating
/// `target`'s directory): `target` is the old object or the whole new one, never part of it.
/// With `drop_cached`, the file's pages leave the page cache once they are on disk: an
/// archive object is read again only by a restore.
pub(super) fn write_synced(
    tmp_dir: &Path,
    target: &Path,
    data: &[u8],
    drop_cached: bool,
) -> io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::create_dir_all(tmp_dir)?;
    let tmp = tmp_dir.join(format!(
        "{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::File::create_new(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        if drop_cached {
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
