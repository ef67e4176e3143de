//! `pghoard_archive_sync` and `pghoard_archive_cleanup` with pghoard's flags (the `argparse`
//! parsers of pghoard/archive_sync.py and archive_cleanup.py), as `walhoard archive-sync` and
//! `walhoard archive-cleanup`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

use super::{config_or_env, translated, Dispatch, VERSION};

/// `pghoard_archive_sync`.
#[derive(Parser, Debug)]
#[command(
    name = "pghoard_archive_sync",
    version = VERSION,
    about = "walhoard archive-sync, with pghoard's flags"
)]
pub(super) struct ArchiveSyncFlags {
    #[arg(short = 'D', long)]
    debug: bool,
    #[arg(long)]
    site: Option<String>,
    /// Configuration file (default: $PGHOARD_CONFIG).
    #[arg(long)]
    config: Option<PathBuf>,
    /// pghoard compares the hash of this many files at most; walhoard compares every one.
    #[arg(long)]
    max_hash_checks: Option<i64>,
    #[arg(long)]
    no_verify: bool,
    #[arg(long)]
    create_new_backup_on_failure: bool,
}

/// `pghoard_archive_cleanup`.
#[derive(Parser, Debug)]
#[command(
    name = "pghoard_archive_cleanup",
    version = VERSION,
    about = "walhoard archive-cleanup, with pghoard's flags"
)]
pub(super) struct ArchiveCleanupFlags {
    #[arg(long)]
    site: Option<String>,
    /// Configuration file (default: $PGHOARD_CONFIG).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    dry_run: bool,
}

fn command(
    name: &str,
    what: &str,
    config: Option<PathBuf>,
    site: Option<String>,
) -> Result<Vec<OsString>, u8> {
    let config = config_or_env(config, what)?;
    let mut v: Vec<OsString> = vec![name.into(), "--config".into(), config.into()];
    if let Some(site) = site {
        v.extend(["--site".into(), site.into()]);
    }
    Ok(v)
}

pub(super) fn archive_sync(f: ArchiveSyncFlags) -> Dispatch {
    if let Some(n) = f.max_hash_checks {
        eprintln!(
            "walhoard: --max-hash-checks {n}: walhoard compares the hash of every file it \
             finds in pg_wal since the newest basebackup"
        );
    }
    let mut v = match command("archive-sync", "pghoard_archive_sync", f.config, f.site) {
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
    let mut v = match command(
        "archive-cleanup",
        "pghoard_archive_cleanup",
        f.config,
        f.site,
    ) {
        Ok(v) => v,
        Err(code) => return Dispatch::Exit(code),
    };
    if f.dry_run {
        v.push("--dry-run".into());
    }
    translated(v, false)
}
