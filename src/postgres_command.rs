//! `walhoard postgres-command`: what PostgreSQL runs as archive_command and restore_command,
//! with pghoard_postgres_command's flags.
//!
//! - `--mode archive` asks the daemon (HTTP API) to store `pg_wal/<xlog>` and exits 0 only
//!   when the daemon says it is durable in the archive.
//! - `--mode restore --output %p` serves a WAL file: with `--config` straight from the object
//!   store (no daemon needed), else through the daemon's `GET /<site>/archive/<xlog>`.
//!
//! Exit codes of restore mode. PostgreSQL's documentation of restore_command ("Recovering
//! Using a Continuous Archive Backup", and `RestoreArchivedFile()` in
//! src/backend/access/transam/xlogarchive.c): a non-zero exit means "file not found" and ends
//! archive recovery (or makes a standby switch to streaming), *except* that "if the command was
//! terminated by a signal (other than SIGTERM ...) or an error by the shell (such as command
//! not found), then recovery will abort and the server will not start up" — PostgreSQL treats
//! an exit status above 125 as such a shell error (`wait_result_is_any_signal`). So:
//! - [`EXIT_FOUND`] 0: the file is at %p;
//! - [`EXIT_NOT_FOUND`] 1: the archive answered that the object does not exist;
//! - [`EXIT_FAILED`] 255: anything else (daemon down, storage error, decryption failure, bad
//!   page header). Recovery stops instead of ending early at a gap it took for the end.

use anyhow::{bail, Context, Result};
use hyper::{Method, StatusCode};

use crate::api_client::{request, Credentials, TARGET_PATH_HEADER};
use crate::config::Config;
use crate::restore::wal::{restore_wal_file_from, WalFetchError};
use crate::restore::RestoreSite;

pub const EXIT_FOUND: u8 = 0;
pub const EXIT_NOT_FOUND: u8 = 1;
pub const EXIT_FAILED: u8 = 255;

/// What `postgres-command` does (pghoard's `--mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// archive_command: hand `pg_wal/<xlog>` to the daemon; 0 once it is in the archive.
    Archive,
    /// restore_command: fetch `<xlog>` into `--output`; 0, 1 (not in the archive) or 255.
    Restore,
}

impl Mode {
    /// pghoard's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Archive => "archive",
            Mode::Restore => "restore",
        }
    }
}

/// The flags of `walhoard postgres-command`, which `pghoard_postgres_command` shares.
#[derive(Debug, Clone, clap::Args)]
pub struct CommandArgs {
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// The backup site (a key of backup_sites).
    #[arg(long)]
    pub site: String,
    /// The WAL file name (%f).
    #[arg(long)]
    pub xlog: String,
    /// Where to write the file (%p), restore mode.
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
    /// Where the daemon's HTTP API listens (default: the configuration's, else 127.0.0.1).
    #[arg(long)]
    pub host: Option<String>,
    /// (default: the configuration's http_port, else 16000).
    #[arg(long)]
    pub port: Option<u16>,
    /// Configuration file: restore mode reads the object store directly with it (no daemon
    /// needed) unless --host/--port are given; archive mode takes the daemon's address.
    #[arg(long, short)]
    pub config: Option<std::path::PathBuf>,
    /// HTTP Basic credentials for the daemon's API (its webserver_username /
    /// webserver_password), sent only when both are given, as pghoard's; without them, the
    /// configuration's, with --config.
    #[arg(long)]
    pub username: Option<String>,
    #[arg(long)]
    pub password: Option<String>,
}

/// Runs the command; returns the process exit code (errors are printed here).
pub async fn run(req: &CommandArgs) -> u8 {
    match req.mode {
        Mode::Restore => {
            let args = req.clone();
            restore_exit_code(&req.xlog, async move { restore(&args).await }).await
        }
        Mode::Archive => match archive(req).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("walhoard: {e:#}");
                1
            }
        },
    }
}

/// The exit code of a restore that `serve` performs: 0, 1 or 255 and nothing else. A panic
/// would otherwise end the process with Rust's 101, which PostgreSQL takes for "not found"
/// (the end of the archive) and promotes early; it runs as a task of its own so that it is
/// caught and answered with [`EXIT_FAILED`].
pub async fn restore_exit_code<F>(xlog: &str, serve: F) -> u8
where
    F: std::future::Future<Output = Result<(), WalFetchError>> + Send + 'static,
{
    match tokio::spawn(serve).await {
        Ok(Ok(())) => EXIT_FOUND,
        Ok(Err(WalFetchError::NotFound { key })) => {
            eprintln!("walhoard: {xlog} not found in the archive ({key})");
            EXIT_NOT_FOUND
        }
        Ok(Err(WalFetchError::Failed(e))) => {
            eprintln!("walhoard: restore of {xlog} failed: {e:#}");
            EXIT_FAILED
        }
        Err(e) => {
            eprintln!("walhoard: restore of {xlog} failed: internal error: {e}");
            EXIT_FAILED
        }
    }
}

/// Whether the command line (without the program name) asks for `postgres-command --mode
/// restore`: then a command line clap refuses must exit [`EXIT_FAILED`] too, not clap's 2,
/// which PostgreSQL would take for "not found" (a typo in restore_command would end recovery
/// at the first segment).
pub fn is_restore_invocation<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> bool {
    let args: Vec<&str> = args.iter().filter_map(|a| a.as_ref().to_str()).collect();
    args.contains(&"postgres-command")
        && (args.contains(&"--mode=restore") || args.windows(2).any(|w| w == ["--mode", "restore"]))
}

fn daemon_address(req: &CommandArgs, cfg: Option<&Config>) -> (String, u16) {
    let host = req
        .host
        .clone()
        .or_else(|| cfg.map(|c| c.http_address.clone()))
        .unwrap_or_else(|| "127.0.0.1".into());
    let port = req
        .port
        .or_else(|| cfg.map(|c| c.http_port))
        .unwrap_or(16000);
    (host, port)
}

/// The `Authorization` header to send, if any.
fn auth_header(req: &CommandArgs, cfg: Option<&Config>) -> Option<(&'static str, String)> {
    let given = req.username.clone().zip(req.password.clone());
    given
        .map(|(username, password)| Credentials { username, password })
        .or_else(|| cfg.and_then(Credentials::from_config))
        .map(|c| c.header())
}

fn check_name(xlog: &str) -> Result<()> {
    if xlog.is_empty() || xlog.contains('/') {
        bail!("--xlog {xlog:?} is not a WAL file name");
    }
    Ok(())
}

async fn restore(req: &CommandArgs) -> Result<(), WalFetchError> {
    let failed = WalFetchError::Failed;
    check_name(&req.xlog).map_err(failed)?;
    let output = req
        .output
        .as_ref()
        .context("--output %p is required in restore mode")
        .map_err(failed)?;
    let output = std::path::absolute(output)
        .with_context(|| format!("absolute path of {}", output.display()))
        .map_err(failed)?;
    match &req.config {
        Some(config) if req.host.is_none() && req.port.is_none() => {
            // Daemonless: read the object store directly.
            let site = RestoreSite::open(config, Some(&req.site)).map_err(failed)?;
            let prefetch = site.settings.restore_prefetch;
            // This site first, then its `moved_from` sites.
            restore_wal_file_from(&site.wal_sources(), &req.xlog, &output, prefetch)
                .await
                .map(|_| ())
        }
        _ => {
            let cfg = req
                .config
                .as_deref()
                .map(Config::load)
                .transpose()
                .map_err(|e| failed(e.into()))?;
            let (host, port) = daemon_address(req, cfg.as_ref());
            let mut headers = vec![(TARGET_PATH_HEADER, output.display().to_string())];
            headers.extend(auth_header(req, cfg.as_ref()));
            let (status, body) = request(
                &host,
                port,
                Method::GET,
                &format!("/{}/archive/{}", req.site, req.xlog),
                &headers,
            )
            .await
            .map_err(failed)?;
            match status {
                StatusCode::CREATED | StatusCode::OK => Ok(()),
                StatusCode::NOT_FOUND if body.contains("\"not_found\"") => {
                    Err(WalFetchError::NotFound {
                        key: req.xlog.clone(),
                    })
                }
                other => Err(failed(anyhow::anyhow!(
                    "the daemon at {host}:{port} answered {other}: {body}"
                ))),
            }
        }
    }
}

async fn archive(req: &CommandArgs) -> Result<()> {
    check_name(&req.xlog)?;
    let cfg = req.config.as_deref().map(Config::load).transpose()?;
    let (host, port) = daemon_address(req, cfg.as_ref());
    let xlog = &req.xlog;
    let headers: Vec<_> = auth_header(req, cfg.as_ref()).into_iter().collect();
    let (status, body) = request(
        &host,
        port,
        Method::PUT,
        &format!("/{}/archive/{xlog}", req.site),
        &headers,
    )
    .await?;
    if status != StatusCode::CREATED {
        bail!("archiving {xlog} failed: the daemon answered {status}: {body}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn restore_panic_exits_255_not_101() {
        // A panic anywhere in serving a file must stop recovery, not end it.
        let code = restore_exit_code("000000010000000000000001", async {
            let v: Vec<u8> = Vec::new();
            if v.is_empty() {
                panic!("a bug in serving the file");
            }
            Ok(())
        })
        .await;
        assert_eq!(code, EXIT_FAILED);
        let not_found = restore_exit_code("000000010000000000000001", async {
            Err(WalFetchError::NotFound {
                key: "xlog/x".into(),
            })
        })
        .await;
        assert_eq!(not_found, EXIT_NOT_FOUND);
    }

    #[test]
    fn restore_invocation_is_recognised_for_exit_codes() {
        let restore = ["postgres-command", "--mode", "restore", "--xlog", "x"];
        assert!(is_restore_invocation(&restore));
        assert!(is_restore_invocation(&[
            "postgres-command",
            "--mode=restore"
        ]));
        assert!(!is_restore_invocation(&[
            "postgres-command",
            "--mode",
            "archive"
        ]));
        assert!(!is_restore_invocation(&["daemon", "--mode", "restore"]));
    }
}
