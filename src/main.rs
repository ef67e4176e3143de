//! The `walhoard` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use walhoard_protocol::ConnectParams;

mod cli_flags;
mod pghoard_cli;

use cli_flags::{JsonFlag, SiteFlags};

#[derive(Parser)]
#[command(
    name = "walhoard",
    version,
    about = "PostgreSQL backup daemon and restore tool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// `postgres-command` is pghoard_postgres_command's name, which the variant spells out.
#[allow(clippy::enum_variant_names)]
enum Command {
    /// Connect over the replication protocol and print what the server reports about itself.
    Identify {
        /// libpq connection string or postgres:// URI (PG* variables and ~/.pgpass apply).
        #[arg(long, default_value = "")]
        conninfo: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Generate an RSA key pair and print it in configuration form, like pghoard_create_keys:
    /// {"encryption_keys": {ID: {"public": PEM, "private": PEM}}}.
    CreateKeys {
        /// The key id to store under (also the site's encryption_key_id).
        #[arg(long)]
        key_id: String,
        /// RSA modulus size: 2048, 3072, 4096 or 8192.
        #[arg(long, default_value_t = 3072)]
        bits: usize,
    },
    /// Run the backup daemon: stream every active site's WAL into its archive.
    Daemon {
        /// pghoard.json-compatible configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check what the daemon needs, per site: replication connection, wal_level,
    /// max_wal_senders, the slot, the object store, the encryption keys. Exit 1 on any failure.
    /// With --site, only that site.
    Check {
        #[command(flatten)]
        site: SiteFlags,
        #[command(flatten)]
        json: JsonFlag,
        /// Only the configuration: the file validates and each site's settings and keys
        /// resolve. Connects to nothing (for a file written before its server or store exists).
        #[arg(long)]
        config_only: bool,
    },
    /// archive_command / restore_command helper (pghoard_postgres_command compatible flags).
    /// Restore mode exits 0 when the file is at --output, 1 when the archive does not have it
    /// (PostgreSQL: end of archive), 255 on any other failure (PostgreSQL stops recovery).
    PostgresCommand(walhoard::postgres_command::CommandArgs),
    /// Restore tooling: list basebackups, restore one into a data directory.
    Restore {
        #[command(subcommand)]
        command: RestoreCommand,
    },
    /// pghoard_archive_sync: upload the WAL and history files of the server's pg_wal (since
    /// the newest basebackup) that the archive lacks or holds other bytes of (those are kept
    /// as `<key>.diverged-<time>`), then check the chain of WAL from the newest basebackup to
    /// the current segment; exit 1 naming the first gap.
    ArchiveSync {
        #[command(flatten)]
        site: SiteFlags,
        /// Do not check the chain after uploading.
        #[arg(long)]
        no_verify: bool,
        /// On a gap, take a new basebackup (through the daemon when one runs) instead of
        /// failing.
        #[arg(long)]
        create_new_backup_on_failure: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// pghoard_archive_cleanup: delete the WAL (every timeline) before the start of the oldest
    /// basebackup the site holds; print what is deleted.
    ArchiveCleanup {
        #[command(flatten)]
        site: SiteFlags,
        /// Only print what would be deleted.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Check that the archive is restorable: every basebackup's chunks (present, stored size,
    /// decrypt, decompress, size and SHA-1, tar) and the WAL chain from each backup on (gaps,
    /// history files; with --wal every segment fetched and each record's CRC checked).
    /// Prints "restorable to LSN X" per backup and every problem with its object key.
    /// Exit 0 only when nothing is wrong, 1 otherwise.
    Verify {
        #[command(flatten)]
        site: SiteFlags,
        /// One backup by name, or `all` (the default).
        #[arg(long)]
        basebackup: Option<String>,
        /// Fetch, decrypt and walk every WAL segment the backups need, record by record.
        #[arg(long)]
        wal: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// One screen per site: basebackups, archived WAL per timeline with gaps, the newest
    /// segment and its age, the daemon's status from its state file. With --site, only that
    /// site.
    Info {
        #[command(flatten)]
        site: SiteFlags,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Take one basebackup of a site now, as its configuration says (basebackup_mode), and
    /// print its name once it is stored and listed.
    Basebackup {
        #[command(flatten)]
        site: SiteFlags,
    },
}

#[derive(Subcommand)]
// Parsed once per process: the size of the flags does not matter.
#[allow(clippy::large_enum_variant)]
enum RestoreCommand {
    /// List a site's basebackups (name, sizes, times, LSNs, compression, key id).
    ListBasebackups {
        #[command(flatten)]
        site: SiteFlags,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Download, decrypt, decompress and extract a basebackup into --target-dir and write the
    /// recovery configuration (restore_command reading the archive directly).
    GetBasebackup {
        #[command(flatten)]
        site: SiteFlags,
        /// The data directory to create (absent or empty unless --overwrite).
        #[arg(long)]
        target_dir: PathBuf,
        /// A backup name, or `latest` (default: the newest that ends before the target).
        #[arg(long)]
        basebackup: Option<String>,
        #[arg(long, group = "target")]
        recovery_target_time: Option<String>,
        #[arg(long, group = "target")]
        recovery_target_xid: Option<String>,
        #[arg(long, group = "target")]
        recovery_target_name: Option<String>,
        #[arg(long, group = "target")]
        recovery_target_lsn: Option<String>,
        /// What PostgreSQL does at the target: pause (its default), promote or shutdown.
        #[arg(long, value_parser = ["pause", "promote", "shutdown"])]
        recovery_target_action: Option<String>,
        /// Recover and become a primary (recovery.signal) instead of a standby (standby.signal).
        #[arg(long)]
        restore_to_primary: bool,
        /// primary_conninfo of the standby (streaming once the archive is replayed).
        #[arg(long)]
        primary_conninfo: Option<String>,
        /// Replace the contents of a non-empty target (and tablespace) directory.
        #[arg(long, conflicts_with = "delta")]
        overwrite: bool,
        /// Restore into an existing data directory of a stopped server, writing only what
        /// differs and removing what the backup does not have (docs/restore-delta.md).
        #[arg(long)]
        delta: bool,
        /// NAME=DIR: restore tablespace NAME (name or oid as recorded) into DIR.
        #[arg(long, value_parser = parse_tablespace_dir)]
        tablespace_dir: Vec<(String, PathBuf)>,
        /// Keep the restored backup (and the WAL it needs) past retention until this date
        /// (pghoard's preservation request, honoured by pghoard too).
        #[arg(long, value_parser = parse_preserve_until)]
        preserve_until: Option<jiff::Timestamp>,
        /// Delete the preservation request once the restore succeeded (the default, as
        /// pghoard's).
        #[arg(long, overrides_with = "no_cancel_preserve_on_success")]
        cancel_preserve_on_success: bool,
        /// Keep the preservation request after a successful restore.
        #[arg(long)]
        no_cancel_preserve_on_success: bool,
    },
    /// List the site's preservation requests, or cancel one.
    Preservations {
        #[command(flatten)]
        site: SiteFlags,
        /// Delete this request (its name, as listed).
        #[arg(long)]
        cancel: Option<String>,
        #[command(flatten)]
        json: JsonFlag,
    },
}

fn parse_preserve_until(s: &str) -> Result<jiff::Timestamp, String> {
    walhoard::preservation::parse_until(s).map_err(|e| format!("{e:#}"))
}

fn parse_tablespace_dir(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), PathBuf::from(v))),
        _ => Err(format!("{s:?}: expected NAME=DIR")),
    }
}

async fn restore(command: RestoreCommand) -> Result<()> {
    use walhoard::restore::{self as r, get, RestoreSite, Target};
    match command {
        RestoreCommand::ListBasebackups { site, json } => {
            let site = RestoreSite::open(&site.config, site.site.as_deref())?;
            let list = site.list_all().await?;
            if json.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", r::render_listing(&list));
            }
            Ok(())
        }
        RestoreCommand::GetBasebackup {
            site,
            target_dir,
            basebackup,
            recovery_target_time,
            recovery_target_xid,
            recovery_target_name,
            recovery_target_lsn,
            recovery_target_action,
            restore_to_primary,
            primary_conninfo,
            overwrite,
            delta,
            tablespace_dir,
            preserve_until,
            cancel_preserve_on_success: _,
            no_cancel_preserve_on_success,
        } => {
            let target = if let Some(t) = recovery_target_time {
                let ts = r::parse_target_time(&t)?;
                Target::Time(t, ts)
            } else if let Some(x) = recovery_target_xid {
                Target::Xid(x)
            } else if let Some(n) = recovery_target_name {
                Target::Name(n)
            } else if let Some(l) = recovery_target_lsn {
                Target::Lsn(
                    l.parse()
                        .map_err(|e| anyhow::anyhow!("--recovery-target-lsn {l:?}: {e}"))?,
                )
            } else {
                Target::Latest
            };
            let site = RestoreSite::open(&site.config, site.site.as_deref())?;
            let opts = get::GetOptions {
                target_dir,
                basebackup,
                target,
                action: recovery_target_action,
                restore_to_primary,
                primary_conninfo,
                existing: if delta {
                    get::Existing::Delta
                } else if overwrite {
                    get::Existing::Overwrite
                } else {
                    get::Existing::Refuse
                },
                tablespace_dirs: tablespace_dir,
                restore_command: None,
                preserve: preserve_until.map(|until| walhoard::preservation::RestorePreservation {
                    until,
                    cancel_on_success: !no_cancel_preserve_on_success,
                }),
            };
            let restored = get::get_basebackup(&site, &opts).await?;
            eprintln!(
                "restore: basebackup {} restored into {}",
                restored.name,
                opts.target_dir.display()
            );
            Ok(())
        }
        RestoreCommand::Preservations { site, cancel, json } => {
            use walhoard::preservation;
            let site = RestoreSite::open(&site.config, site.site.as_deref())?;
            if let Some(name) = cancel {
                preservation::cancel(&site.store, &name).await?;
                eprintln!("preservation request {name} cancelled");
                return Ok(());
            }
            let list = preservation::list(&site.store).await?;
            if json.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for r in &list {
                    println!("{}\t{}\t{}", r.backup, r.until, r.name);
                }
            }
            Ok(())
        }
    }
}

async fn archive_sync(
    flags: &SiteFlags,
    opts: walhoard::archive_sync::SyncOptions,
    json: bool,
) -> Result<()> {
    let config = walhoard::config::Config::load(&flags.config)?;
    let site = &walhoard::settings::chosen_site(&config, flags.site.as_deref(), &flags.config)?;
    let report = walhoard::archive_sync::run(&config, site, opts).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", walhoard::archive_sync::render(&report));
    }
    match report.failure() {
        Some(why) => anyhow::bail!("archive-sync, site {site}: {why}"),
        None => Ok(()),
    }
}

async fn archive_cleanup(flags: &SiteFlags, dry_run: bool, json: bool) -> Result<()> {
    let config = walhoard::config::Config::load(&flags.config)?;
    let site = &walhoard::settings::chosen_site(&config, flags.site.as_deref(), &flags.config)?;
    let settings = walhoard::settings::SiteSettings::build(&config, site)?;
    let report = walhoard::archive_cleanup::run(&settings, dry_run).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", walhoard::archive_cleanup::render(&report));
    }
    Ok(())
}

fn create_keys(key_id: &str, bits: usize) -> Result<()> {
    if key_id.is_empty() || key_id.len() > 255 {
        anyhow::bail!("--key-id must be 1 to 255 bytes");
    }
    let (public, private) = walhoard::pipeline::encryption::generate_key_pair(bits)?;
    let v = serde_json::json!({ "encryption_keys": { key_id: { "public": public, "private": private } } });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// Asks the running daemon for a backup (so it is never taken twice at once), or takes it
/// here when no daemon listens.
async fn basebackup(flags: &SiteFlags) -> Result<()> {
    let config = walhoard::config::Config::load(&flags.config)?;
    let site = &walhoard::settings::chosen_site(&config, flags.site.as_deref(), &flags.config)?;
    let name = walhoard::basebackup::request::request_or_take(&config, site).await?;
    println!("{name}");
    Ok(())
}

async fn identify(conninfo: &str, json: bool) -> Result<()> {
    let params = ConnectParams::parse(conninfo).context("parse --conninfo")?;
    let (mut client, id, seg) = walhoard::server::identify(&params, "").await?;
    let version = client
        .connection()
        .server_param("server_version")
        .unwrap_or("unknown")
        .to_string();
    if json {
        let v = serde_json::json!({
            "system_id": id.system_id.to_string(),
            "timeline": id.timeline.get(),
            "xlogpos": id.xlogpos.to_string(),
            "wal_segment_size": seg.bytes(),
            "server_version": version,
        });
        println!("{v}");
    } else {
        println!("system_id:        {}", id.system_id);
        println!("timeline:         {}", id.timeline);
        println!("xlogpos:          {}", id.xlogpos);
        println!("wal_segment_size: {}", seg.bytes());
        println!("server_version:   {version}");
    }
    client.close().await.ok();
    Ok(())
}

async fn check(
    config: &std::path::Path,
    site: Option<&str>,
    json: bool,
    config_only: bool,
) -> Result<()> {
    let cfg = walhoard::config::Config::load(config)?;
    for ignored in cfg.ignored_keys() {
        eprintln!("walhoard: warning: {ignored}");
    }
    let results = if config_only {
        walhoard::check::run_config_only(&cfg, site)?
    } else {
        walhoard::check::run(&cfg, site).await?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print!("{}", walhoard::check::render(&results));
    }
    let failed = results.iter().filter(|r| !r.ok).count();
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed");
    }
    Ok(())
}

fn main() -> ExitCode {
    // pghoard's command names (argv[0] or the first argument) become walhoard commands here.
    let (argv, debug) = match pghoard_cli::dispatch(std::env::args_os().collect()) {
        pghoard_cli::Dispatch::Walhoard(argv) => (argv, false),
        pghoard_cli::Dispatch::Translated { argv, debug } => (argv, debug),
        pghoard_cli::Dispatch::Exit(code) => return ExitCode::from(code),
    };
    // restore_command: every way out is 0, 1 or 255 (postgres_command's module comment).
    // pghoard_postgres_command has become `postgres-command` in `argv` by now.
    let restore_mode =
        walhoard::postgres_command::is_restore_invocation(&argv[1.min(argv.len())..]);
    let failure = if restore_mode {
        ExitCode::from(walhoard::postgres_command::EXIT_FAILED)
    } else {
        ExitCode::FAILURE
    };
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) if restore_mode && e.use_stderr() => {
            let _ = e.print();
            return failure;
        }
        Err(e) => e.exit(),
    };
    // The daemon applies its configuration's log_level and syslog keys (`daemon::run`).
    walhoard::logging::init(debug);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walhoard: cannot start the async runtime: {e}");
            return failure;
        }
    };
    let result: Result<u8> = rt.block_on(async {
        let r = match cli.command {
            Command::Identify { conninfo, json } => identify(&conninfo, json.json).await,
            Command::CreateKeys { key_id, bits } => create_keys(&key_id, bits),
            Command::Daemon { config } => walhoard::daemon::run(&config).await,
            Command::Check {
                site,
                json,
                config_only,
            } => check(&site.config, site.site.as_deref(), json.json, config_only).await,
            Command::PostgresCommand(args) => {
                return Ok(walhoard::postgres_command::run(&args).await);
            }
            Command::Restore { command } => restore(command).await,
            Command::Basebackup { site } => basebackup(&site).await,
            Command::ArchiveSync {
                site,
                no_verify,
                create_new_backup_on_failure,
                json,
            } => {
                let opts = walhoard::archive_sync::SyncOptions {
                    verify: !no_verify,
                    new_backup_on_failure: create_new_backup_on_failure,
                };
                archive_sync(&site, opts, json.json).await
            }
            Command::ArchiveCleanup {
                site,
                dry_run,
                json,
            } => archive_cleanup(&site, dry_run, json.json).await,
            Command::Verify {
                site,
                basebackup,
                wal,
                json,
            } => {
                walhoard::verify::cli(
                    &site.config,
                    site.site.as_deref(),
                    basebackup.as_deref(),
                    wal,
                    json.json,
                )
                .await
            }
            Command::Info { site, json } => {
                walhoard::info::cli(&site.config, site.site.as_deref(), json.json).await
            }
        };
        r.map(|()| 0)
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("walhoard: {e:#}");
            ExitCode::FAILURE
        }
    }
}
