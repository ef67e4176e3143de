//! pghoard's command names and flags, so systemd units, recovery configurations and scripts
//! written for pghoard keep working after the switch.
//!
//! The binary answers as `pghoard`, `pghoard_restore`, `pghoard_postgres_command`,
//! `pghoard_create_keys`, `pghoard_archive_sync` and `pghoard_archive_cleanup`, either by the
//! name it was started under (a symlink or hard link so named) or as the first argument
//! (`walhoard pghoard_restore list-basebackups ...`). pghoard's flags are parsed here, with
//! pghoard's names and defaults (its `argparse` parsers in pghoard/pghoard.py, restore.py,
//! postgres_command.py and create_keys.py), and turned into the walhoard command that does the
//! same thing; that command then runs as if typed. Everything pghoard offers that walhoard does
//! not do is refused with a message naming what to use instead, never accepted and dropped.
//!
//! Exit codes stay walhoard's: restore_command exits 0 (found), 1 (the archive has no such
//! object) or 255 (anything else, PostgreSQL stops recovery), also on a flag it cannot parse.
//! pghoard's restore_command exits 4 when not found and 5 on any other failure, both of which
//! PostgreSQL takes as "not found" (`RestoreArchivedFile()` in xlogarchive.c ends recovery on
//! any exit status up to 125), so a daemon that is down made pghoard's restores end early.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Parser;

use crate::cli_flags::PghoardSiteFlags;

mod archive;
mod create_keys;
mod flags;
use archive::{archive_cleanup, archive_sync};
use create_keys::create_keys;
use flags::{
    ArchiveCleanupFlags, ArchiveSyncFlags, CreateKeysFlags, DaemonFlags, Generic,
    PostgresCommandFlags, RestoreFlags, RestoreSub,
};

/// The names pghoard installs its commands under (pghoard's pyproject.toml `[project.scripts]`),
/// except `pghoard_gnutaremu`, pghoard's internal tar helper.
pub const NAMES: [&str; 6] = [
    "pghoard",
    "pghoard_restore",
    "pghoard_postgres_command",
    "pghoard_create_keys",
    "pghoard_archive_sync",
    "pghoard_archive_cleanup",
];

/// What `main` does with an invocation.
#[derive(Debug, PartialEq)]
pub enum Dispatch {
    /// Not a pghoard name: walhoard's own command line, unchanged.
    Walhoard(Vec<OsString>),
    /// A pghoard command translated into walhoard's arguments (argv[0] included); `debug` is
    /// pghoard's `-D/--debug` (log at debug level unless WALHOARD_LOG says otherwise).
    Translated { argv: Vec<OsString>, debug: bool },
    /// Done (handled here, or refused with a message already printed): exit with this code.
    Exit(u8),
}

/// The pghoard name an invocation uses, and the arguments after it.
fn pghoard_name(argv: &[OsString]) -> Option<(&'static str, &[OsString])> {
    let is = |a: &OsString| NAMES.iter().copied().find(|n| a.as_os_str() == *n);
    let invoked = argv
        .first()
        .and_then(|a0| Path::new(a0).file_name().map(OsString::from));
    if let Some(name) = invoked.as_ref().and_then(is) {
        return Some((name, &argv[1..]));
    }
    let name = argv.get(1).and_then(is)?;
    Some((name, &argv[2..]))
}

/// Decides what an invocation means (see [`Dispatch`]); pghoard_create_keys runs here.
pub fn dispatch(argv: Vec<OsString>) -> Dispatch {
    let Some((name, rest)) = pghoard_name(&argv) else {
        return Dispatch::Walhoard(argv);
    };
    let with_name = || std::iter::once(OsString::from(name)).chain(rest.iter().cloned());
    let result = match name {
        "pghoard" => parse::<DaemonFlags>(with_name(), 2).map(daemon),
        "pghoard_restore" => parse::<RestoreFlags>(with_name(), 2).map(restore),
        // A flag restore_command cannot parse must stop recovery, not end it (exit 255).
        "pghoard_postgres_command" => {
            parse::<PostgresCommandFlags>(with_name(), walhoard::postgres_command::EXIT_FAILED)
                .map(postgres_command)
        }
        "pghoard_create_keys" => parse::<CreateKeysFlags>(with_name(), 2).map(create_keys),
        "pghoard_archive_sync" => parse::<ArchiveSyncFlags>(with_name(), 2).map(archive_sync),
        _ => parse::<ArchiveCleanupFlags>(with_name(), 2).map(archive_cleanup),
    };
    result.unwrap_or_else(Dispatch::Exit)
}

/// clap parse; `--help`/`--version` exit 0, a usage error exits `usage_exit`.
fn parse<T: Parser>(args: impl Iterator<Item = OsString>, usage_exit: u8) -> Result<T, u8> {
    T::try_parse_from(args).map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            usage_exit
        } else {
            0
        }
    })
}

fn refuse(message: &str) -> Dispatch {
    eprintln!("walhoard: {message}");
    Dispatch::Exit(1)
}

fn config_or_env(config: Option<PathBuf>, what: &str) -> Result<PathBuf, u8> {
    config.or_else(PghoardSiteFlags::env_config).ok_or_else(|| {
        eprintln!("walhoard: {what}: give the configuration file with --config or PGHOARD_CONFIG");
        1
    })
}

/// `--config F [--site S]` for the walhoard command, `F` from `$PGHOARD_CONFIG` if need be.
fn site_args(site: PghoardSiteFlags, what: &str) -> Result<Vec<OsString>, u8> {
    let config = config_or_env(site.config, what)?;
    let mut v: Vec<OsString> = vec!["--config".into(), config.into()];
    if let Some(site) = site.site {
        v.extend(["--site".into(), site.into()]);
    }
    Ok(v)
}

fn translated<I, S>(args: I, debug: bool) -> Dispatch
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let argv = std::iter::once(OsString::from("walhoard"))
        .chain(args.into_iter().map(Into::into))
        .collect();
    Dispatch::Translated { argv, debug }
}

fn daemon(f: DaemonFlags) -> Dispatch {
    let _ = f.short_log;
    match config_or_env(f.config.or(f.config_file), "pghoard") {
        Ok(config) => translated(
            [OsString::from("daemon"), "--config".into(), config.into()],
            f.debug,
        ),
        Err(code) => Dispatch::Exit(code),
    }
}

fn restore(f: RestoreFlags) -> Dispatch {
    if let Some(file) = &f.status_output_file {
        return refuse(&format!(
            "--status-output-file {}: walhoard does not write restore progress to a file; \
             leave the flag out (progress and the result are on stderr, the exit code says \
             whether the restore completed)",
            file.display()
        ));
    }
    let generic_args = |g: Generic| -> Result<Vec<OsString>, u8> {
        let _ = g.verbose;
        site_args(g.site, "pghoard_restore")
    };
    match f.command {
        RestoreSub::ListBasebackups { generic } => match generic_args(generic) {
            Ok(g) => translated(
                ["restore".into(), "list-basebackups".into()]
                    .into_iter()
                    .chain(g),
                f.debug,
            ),
            Err(code) => Dispatch::Exit(code),
        },
        RestoreSub::ListBasebackupsHttp { .. } => refuse(
            "list-basebackups-http is not translated (the daemon answers GET /<site>/basebackup \
             as pghoard's does, for scripts); use `pghoard_restore list-basebackups --config \
             FILE`, which reads the object store directly",
        ),
        RestoreSub::GetBasebackup {
            generic,
            basebackup,
            primary_conninfo,
            target_dir,
            overwrite,
            tablespace_dir,
            tablespace_base_dir,
            recovery_end_command,
            recovery_target_action,
            recovery_target_name,
            recovery_target_time,
            recovery_target_xid,
            restore_to_primary,
            preserve_until,
            cancel_preserve_on_success: _,
            no_cancel_preserve_on_success,
            pghoard_postgres_command_bin,
        } => {
            if tablespace_base_dir.is_some() {
                return refuse(
                    "--tablespace-base-dir is not supported by walhoard; map each tablespace \
                     with --tablespace-dir NAME=DIRECTORY (list-basebackups names them)",
                );
            }
            if recovery_end_command.is_some() {
                return refuse(
                    "--recovery-end-command is not supported by walhoard: add \
                     recovery_end_command to the restored postgresql.auto.conf before starting \
                     PostgreSQL",
                );
            }
            if [
                &recovery_target_name,
                &recovery_target_time,
                &recovery_target_xid,
            ]
            .iter()
            .filter(|t| t.is_some())
            .count()
                > 1
            {
                return refuse("give at most one of --recovery-target-name, -time and -xid");
            }
            if let Some(bin) = pghoard_postgres_command_bin {
                eprintln!(
                    "walhoard: --pghoard-postgres-command-bin {bin}: not used; the recovery \
                     configuration runs walhoard's own restore_command, which reads the archive \
                     with the configuration file (no daemon needed)"
                );
            }
            let mut v: Vec<OsString> = match generic_args(generic) {
                Ok(g) => ["restore".into(), "get-basebackup".into()]
                    .into_iter()
                    .chain(g)
                    .collect(),
                Err(code) => return Dispatch::Exit(code),
            };
            v.extend(["--target-dir".into(), target_dir.into()]);
            v.extend(["--basebackup".into(), basebackup.into()]);
            if !primary_conninfo.is_empty() {
                v.extend(["--primary-conninfo".into(), primary_conninfo.into()]);
            }
            if overwrite {
                v.push("--overwrite".into());
            }
            if restore_to_primary {
                v.push("--restore-to-primary".into());
            }
            for (flag, value) in [
                ("--recovery-target-action", recovery_target_action),
                ("--recovery-target-name", recovery_target_name),
                ("--recovery-target-time", recovery_target_time),
                ("--recovery-target-xid", recovery_target_xid),
            ] {
                if let Some(value) = value {
                    v.extend([flag.into(), value.into()]);
                }
            }
            for t in tablespace_dir {
                v.extend(["--tablespace-dir".into(), t.into()]);
            }
            if let Some(until) = preserve_until {
                v.extend(["--preserve-until".into(), until.into()]);
                if no_cancel_preserve_on_success {
                    v.push("--no-cancel-preserve-on-success".into());
                }
            }
            translated(v, f.debug)
        }
    }
}

fn postgres_command(f: PostgresCommandFlags) -> Dispatch {
    let f = f.args;
    let mut v: Vec<OsString> = vec![
        "postgres-command".into(),
        "--mode".into(),
        f.mode.name().into(),
        "--site".into(),
        f.site.into(),
        "--xlog".into(),
        f.xlog.into(),
    ];
    if let Some(output) = f.output {
        v.extend(["--output".into(), output.into()]);
    }
    if let Some(host) = f.host {
        v.extend(["--host".into(), host.into()]);
    }
    if let Some(port) = f.port {
        v.extend(["--port".into(), port.to_string().into()]);
    }
    // pghoard sends them only when both are given (HTTPBasicAuth when username and password).
    if let (Some(user), Some(password)) = (f.username, f.password) {
        v.extend(["--username".into(), user.into()]);
        v.extend(["--password".into(), password.into()]);
    }
    if let Some(config) = f.config {
        v.extend(["--config".into(), config.into()]);
    }
    translated(v, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn args_of(d: Dispatch) -> Vec<String> {
        match d {
            Dispatch::Translated { argv, .. } => argv
                .into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            other => panic!("not translated: {other:?}"),
        }
    }

    #[test]
    fn walhoards_own_command_line_is_left_alone() {
        let argv = os(&["/usr/bin/walhoard", "daemon", "--config", "x"]);
        assert_eq!(dispatch(argv.clone()), Dispatch::Walhoard(argv));
    }

    #[test]
    fn pghoards_recovery_conf_restore_command_maps_to_postgres_command() {
        let want =
            "walhoard postgres-command --mode restore --site s --xlog %f --output %p --port 16001";
        let flags = [
            "--mode", "restore", "--port", "16001", "--site", "s", "--output", "%p", "--xlog", "%f",
        ];
        for prefix in [
            &["/opt/x/pghoard_postgres_command"][..],
            &["walhoard", "pghoard_postgres_command"][..],
        ] {
            let argv = os(&[prefix, &flags[..]].concat());
            assert_eq!(args_of(dispatch(argv)).join(" "), want);
        }
    }

    #[test]
    fn pghoard_postgres_command_credentials_sent_only_together() {
        let base = [
            "pghoard_postgres_command",
            "--mode",
            "restore",
            "--site",
            "s",
            "--xlog",
            "%f",
            "--output",
            "%p",
        ];
        let with = |extra: &[&str]| {
            let argv: Vec<&str> = base.iter().chain(extra).copied().collect();
            args_of(dispatch(os(&argv))).join(" ")
        };
        assert!(with(&["--username", "u", "--password", "p"])
            .ends_with("--output %p --username u --password p"));
        // pghoard authenticates only with both (HTTPBasicAuth when username and password).
        assert!(!with(&["--username", "u"]).contains("--username"));
        assert!(!with(&["--password", "p"]).contains("--password"));
    }

    #[test]
    fn pghoard_postgres_command_usage_error_stops_recovery() {
        // `--mode` missing or unknown: PostgreSQL must not read it as "not found".
        for argv in [
            os(&["pghoard_postgres_command", "--site", "s", "--xlog", "x"]),
            os(&[
                "pghoard_postgres_command",
                "--mode",
                "fetch",
                "--site",
                "s",
                "--xlog",
                "x",
            ]),
        ] {
            assert_eq!(dispatch(argv), Dispatch::Exit(255));
        }
    }

    #[test]
    fn pghoard_daemon_takes_config_by_flag_or_position() {
        for argv in [
            os(&[
                "pghoard",
                "--short-log",
                "--config",
                "/etc/pghoard/pghoard.json",
            ]),
            os(&["pghoard", "/etc/pghoard/pghoard.json"]),
        ] {
            assert_eq!(
                args_of(dispatch(argv)).join(" "),
                "walhoard daemon --config /etc/pghoard/pghoard.json"
            );
        }
    }

    #[test]
    fn pghoard_restore_get_basebackup_flags_map_to_walhoards() {
        let got = args_of(dispatch(os(&[
            "pghoard_restore",
            "get-basebackup",
            "--config",
            "c.json",
            "--site",
            "s",
            "--target-dir",
            "/data",
            "--restore-to-master",
            "--recovery-target-time",
            "2026-01-01T00:00:00Z",
            "--recovery-target-action",
            "promote",
            "--overwrite",
            "--tablespace-dir",
            "ts1=/ts",
        ])));
        assert_eq!(
            got.join(" "),
            "walhoard restore get-basebackup --config c.json --site s --target-dir /data \
             --basebackup latest --overwrite --restore-to-primary --recovery-target-action \
             promote --recovery-target-time 2026-01-01T00:00:00Z --tablespace-dir ts1=/ts"
        );
    }

    #[test]
    fn pghoard_archive_sync_cleanup_and_preserve_until_map_to_walhoards() {
        let get = "pghoard_restore get-basebackup --config c --target-dir d \
                   --preserve-until 2030-01-01";
        let want_get = "walhoard restore get-basebackup --config c --target-dir d --basebackup \
                        latest --preserve-until 2030-01-01";
        let cases = [
            (
                "pghoard_archive_sync --config c --site s --no-verify \
                 --create-new-backup-on-failure --max-hash-checks 5"
                    .to_string(),
                "walhoard archive-sync --config c --site s --no-verify \
                 --create-new-backup-on-failure"
                    .to_string(),
            ),
            (
                "walhoard pghoard_archive_cleanup --config c --dry-run".to_string(),
                "walhoard archive-cleanup --config c --dry-run".to_string(),
            ),
            (get.to_string(), want_get.to_string()),
            (
                format!("{get} --no-cancel-preserve-on-success"),
                format!("{want_get} --no-cancel-preserve-on-success"),
            ),
        ];
        for (argv, want) in cases {
            let argv: Vec<&str> = argv.split_whitespace().collect();
            let want = want.split_whitespace().collect::<Vec<_>>().join(" ");
            assert_eq!(args_of(dispatch(os(&argv))).join(" "), want, "{argv:?}");
        }
    }

    #[test]
    fn pghoard_only_features_are_refused_not_dropped() {
        for argv in [
            os(&[
                "pghoard_restore",
                "get-basebackup",
                "--config",
                "c",
                "--target-dir",
                "d",
                "--recovery-end-command",
                "x",
            ]),
            os(&[
                "pghoard_restore",
                "get-basebackup",
                "--config",
                "c",
                "--target-dir",
                "d",
                "--tablespace-base-dir",
                "/t",
            ]),
            os(&["pghoard_restore", "list-basebackups-http", "--site", "s"]),
        ] {
            assert_eq!(dispatch(argv.clone()), Dispatch::Exit(1), "{argv:?}");
        }
    }
}
