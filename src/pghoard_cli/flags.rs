//! pghoard's flags, with pghoard's names and defaults (its `argparse` parsers in
//! pghoard/pghoard.py, restore.py, postgres_command.py, create_keys.py, archive_sync.py and
//! archive_cleanup.py).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use walhoard::postgres_command::CommandArgs;

use crate::cli_flags::PghoardSiteFlags;

/// `--version` under pghoard's names: walhoard's version, saying whose it is.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (walhoard)");

/// `pghoard`: the daemon.
#[derive(Parser, Debug)]
#[command(
    name = "pghoard",
    version = VERSION,
    about = "walhoard daemon, with pghoard's flags"
)]
pub(super) struct DaemonFlags {
    #[arg(short = 'D', long)]
    pub(super) debug: bool,
    /// Accepted: walhoard's log lines are short already.
    #[arg(short = 's', long)]
    pub(super) short_log: bool,
    /// Configuration file (default: $PGHOARD_CONFIG).
    #[arg(long)]
    pub(super) config: Option<PathBuf>,
    /// Configuration file, positional (pghoard's backward-compatible form).
    pub(super) config_file: Option<PathBuf>,
}

/// `pghoard_restore`.
#[derive(Parser, Debug)]
#[command(
    name = "pghoard_restore",
    version = VERSION,
    about = "walhoard restore, with pghoard's flags"
)]
pub(super) struct RestoreFlags {
    #[arg(short = 'D', long, global = true)]
    pub(super) debug: bool,
    /// pghoard writes its progress here; walhoard does not (refused).
    #[arg(long, global = true)]
    pub(super) status_output_file: Option<PathBuf>,
    #[command(subcommand)]
    pub(super) command: RestoreSub,
}

#[derive(Args, Debug)]
pub(super) struct Generic {
    /// Accepted: walhoard's output does not change with it.
    #[arg(short = 'v', long)]
    pub(super) verbose: bool,
    #[command(flatten)]
    pub(super) site: PghoardSiteFlags,
}

#[derive(Subcommand, Debug)]
// Parsed once per process: the size of the flags does not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum RestoreSub {
    /// List basebackups from the object store.
    ListBasebackups {
        #[command(flatten)]
        generic: Generic,
    },
    /// pghoard: list basebackups through the daemon's HTTP API (walhoard's has no such listing).
    ListBasebackupsHttp {
        #[command(flatten)]
        generic: Generic,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        port: Option<String>,
        #[arg(long)]
        username: Option<String>,
        #[arg(long)]
        password: Option<String>,
    },
    /// Download a basebackup from the object store.
    GetBasebackup {
        #[command(flatten)]
        generic: Generic,
        #[arg(long, default_value = "latest")]
        basebackup: String,
        #[arg(long, default_value = "")]
        primary_conninfo: String,
        #[arg(long)]
        target_dir: PathBuf,
        #[arg(long)]
        overwrite: bool,
        /// NAME=DIRECTORY, repeatable.
        #[arg(long)]
        tablespace_dir: Vec<String>,
        #[arg(long)]
        tablespace_base_dir: Option<PathBuf>,
        #[arg(long)]
        recovery_end_command: Option<String>,
        #[arg(long, value_parser = ["pause", "promote", "shutdown"])]
        recovery_target_action: Option<String>,
        #[arg(long)]
        recovery_target_name: Option<String>,
        #[arg(long)]
        recovery_target_time: Option<String>,
        #[arg(long)]
        recovery_target_xid: Option<String>,
        #[arg(long, alias = "restore-to-master")]
        restore_to_primary: bool,
        #[arg(long)]
        preserve_until: Option<String>,
        #[arg(long, overrides_with = "no_cancel_preserve_on_success")]
        cancel_preserve_on_success: bool,
        #[arg(long)]
        no_cancel_preserve_on_success: bool,
        /// pghoard writes this binary into restore_command; walhoard writes its own.
        #[arg(long)]
        pghoard_postgres_command_bin: Option<String>,
    },
}

/// `pghoard_postgres_command`.
#[derive(Parser, Debug)]
#[command(
    name = "pghoard_postgres_command",
    version = VERSION,
    about = "walhoard postgres-command, with pghoard's flags"
)]
pub(super) struct PostgresCommandFlags {
    /// walhoard's flags, which are pghoard's (plus `--config`, walhoard's own: read the
    /// object store with this configuration, no daemon), `--username`/`--password` included.
    #[command(flatten)]
    pub(super) args: CommandArgs,
}

/// `pghoard_create_keys`.
#[derive(Parser, Debug)]
#[command(
    name = "pghoard_create_keys",
    version = VERSION,
    about = "walhoard create-keys, with pghoard's flags and output"
)]
pub(super) struct CreateKeysFlags {
    #[arg(short = 'D', long)]
    pub(super) debug: bool,
    #[arg(long)]
    pub(super) key_id: String,
    #[arg(long, default_value_t = 3072)]
    pub(super) bits: usize,
    /// `--config`: store the keys into this configuration file.
    #[command(flatten)]
    pub(super) site: PghoardSiteFlags,
}

/// `pghoard_archive_sync`.
#[derive(Parser, Debug)]
#[command(
    name = "pghoard_archive_sync",
    version = VERSION,
    about = "walhoard archive-sync, with pghoard's flags"
)]
pub(super) struct ArchiveSyncFlags {
    #[arg(short = 'D', long)]
    pub(super) debug: bool,
    #[command(flatten)]
    pub(super) site: PghoardSiteFlags,
    /// pghoard compares the hash of this many files at most; walhoard compares every one.
    #[arg(long)]
    pub(super) max_hash_checks: Option<i64>,
    #[arg(long)]
    pub(super) no_verify: bool,
    #[arg(long)]
    pub(super) create_new_backup_on_failure: bool,
}

/// `pghoard_archive_cleanup`.
#[derive(Parser, Debug)]
#[command(
    name = "pghoard_archive_cleanup",
    version = VERSION,
    about = "walhoard archive-cleanup, with pghoard's flags"
)]
pub(super) struct ArchiveCleanupFlags {
    #[command(flatten)]
    pub(super) site: PghoardSiteFlags,
    #[arg(long)]
    pub(super) dry_run: bool,
}
