//! Flags several commands share, declared once and flattened into each (`#[command(flatten)]`),
//! under walhoard's and pghoard's command names alike.

use std::path::PathBuf;

use clap::Args;

/// `--config FILE --site NAME`: the site a command reads.
#[derive(Args, Debug, Clone)]
pub struct SiteFlags {
    /// pghoard.json-compatible configuration file.
    #[arg(long, short)]
    pub config: PathBuf,
    /// The backup site (a key of backup_sites); optional when the configuration has one
    /// (`check`: every site).
    #[arg(long)]
    pub site: Option<String>,
}

/// pghoard's `--config FILE --site NAME`: the file may come from `$PGHOARD_CONFIG` instead.
#[derive(Args, Debug, Clone)]
pub struct PghoardSiteFlags {
    /// Configuration file (default: $PGHOARD_CONFIG).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub site: Option<String>,
}

impl PghoardSiteFlags {
    /// `$PGHOARD_CONFIG`, where pghoard's commands look without `--config`.
    pub fn env_config() -> Option<PathBuf> {
        std::env::var_os("PGHOARD_CONFIG").map(PathBuf::from)
    }

    /// `--config`, else `$PGHOARD_CONFIG`.
    pub fn config_or_env(&self) -> Option<PathBuf> {
        self.config.clone().or_else(Self::env_config)
    }
}

/// `--json`: print JSON instead of text.
#[derive(Args, Debug, Clone, Copy)]
pub struct JsonFlag {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::{Cli, Command, RestoreCommand};

    /// Every command reading a site takes the one `--config/-c` and `--site` declaration.
    #[test]
    fn site_flags_are_the_same_everywhere() {
        for argv in [
            &["check", "-c", "f.json", "--site", "s", "--json"][..],
            &["basebackup", "--config", "f.json", "--site", "s"],
            &["basebackup", "-c", "f.json", "--site", "s"],
            &["archive-sync", "-c", "f.json", "--site", "s", "--json"],
            &["archive-cleanup", "-c", "f.json", "--site", "s", "--json"],
            &[
                "restore",
                "preservations",
                "-c",
                "f.json",
                "--site",
                "s",
                "--json",
            ],
            &[
                "restore",
                "list-basebackups",
                "-c",
                "f.json",
                "--site",
                "s",
                "--json",
            ],
            &[
                "restore",
                "get-basebackup",
                "--config",
                "f.json",
                "--site",
                "s",
                "--target-dir",
                "d",
            ],
            &["verify", "-c", "f.json", "--site", "s", "--json", "--wal"],
            &["info", "--config", "f.json", "--site", "s", "--json"],
        ] {
            let cli = Cli::try_parse_from(std::iter::once("walhoard").chain(argv.iter().copied()))
                .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            let site = match cli.command {
                Command::Check { site, json, .. } => {
                    assert!(json.json);
                    site
                }
                Command::Basebackup { site } => site,
                Command::Verify {
                    site, json, wal, ..
                } => {
                    assert!(json.json && wal);
                    site
                }
                Command::Info { site, json } => {
                    assert!(json.json);
                    site
                }
                Command::Restore {
                    command: RestoreCommand::ListBasebackups { site, json },
                } => {
                    assert!(json.json);
                    site
                }
                Command::Restore {
                    command: RestoreCommand::GetBasebackup { site, .. },
                } => site,
                Command::ArchiveSync { site, json, .. }
                | Command::ArchiveCleanup { site, json, .. }
                | Command::Restore {
                    command: RestoreCommand::Preservations { site, json, .. },
                } => {
                    assert!(json.json);
                    site
                }
                _ => panic!("{argv:?}: parsed as another command"),
            };
            assert_eq!(site.config.to_str(), Some("f.json"), "{argv:?}");
            assert_eq!(site.site.as_deref(), Some("s"), "{argv:?}");
        }
    }
}
