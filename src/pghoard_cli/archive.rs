//! `pghoard_archive_sync` and `pghoard_archive_cleanup` ([`super::flags`]) as `walhoard
//! archive-sync` and `walhoard archive-cleanup`.

use std::ffi::OsString;

use super::flags::{ArchiveCleanupFlags, ArchiveSyncFlags};
use super::{site_args, translated, Dispatch};

fn command(
    name: &str,
    what: &str,
    f_site: crate::cli_flags::PghoardSiteFlags,
) -> Result<Vec<OsString>, u8> {
    let mut v: Vec<OsString> = vec![name.into()];
    v.extend(site_args(f_site, what)?);
    Ok(v)
}

pub(super) fn archive_sync(f: ArchiveSyncFlags) -> Dispatch {
    if let Some(n) = f.max_hash_checks {
        eprintln!(
            "walhoard: --max-hash-checks {n}: walhoard compares the hash of every file it \
             finds in pg_wal since the newest basebackup"
        );
    }
    let mut v = match command("archive-sync", "pghoard_archive_sync", f.site) {
        Ok(v) => v,
        Err(code) => return Dispatch::Exit(code),
    };
    if f.no_verify {
        v.push("--no-verify".into());
    }
    if f.create_new_backup_on_failure {
        v.push("--create-new-backup-on-failure".into());
    }
    translated(v, f.debug)
}

pub(super) fn archive_cleanup(f: ArchiveCleanupFlags) -> Dispatch {
    let mut v = match command("archive-cleanup", "pghoard_archive_cleanup", f.site) {
        Ok(v) => v,
        Err(code) => return Dispatch::Exit(code),
    };
    if f.dry_run {
        v.push("--dry-run".into());
    }
    translated(v, false)
}
