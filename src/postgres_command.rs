//! `walhoard postgres-command`: what PostgreSQL runs as archive_command, with
//! pghoard_postgres_command's flags. `--mode archive` asks the daemon (HTTP API) to store
//! `pg_wal/<xlog>` and exits 0 only when the daemon says it is durable in the archive.

use std::path::Path;

use anyhow::{bail, Result};
use hyper::{Method, StatusCode};

use crate::config::Config;
use crate::http::request;

pub async fn run(
    mode: &str,
    site: &str,
    xlog: &str,
    host: Option<String>,
    port: Option<u16>,
    config: Option<&Path>,
) -> Result<()> {
    let cfg = config.map(Config::load).transpose()?;
    let host = host
        .or_else(|| cfg.as_ref().map(|c| c.http_address.clone()))
        .unwrap_or_else(|| "127.0.0.1".into());
    let port = port
        .or_else(|| cfg.as_ref().map(|c| c.http_port))
        .unwrap_or(16000);
    if xlog.is_empty() || xlog.contains('/') {
        bail!("--xlog {xlog:?} is not a WAL file name");
    }
    match mode {
        "archive" => {
            let (status, body) =
                request(&host, port, Method::PUT, &format!("/{site}/archive/{xlog}")).await?;
            if status != StatusCode::CREATED {
                bail!("archiving {xlog} failed: the daemon answered {status}: {body}");
            }
            Ok(())
        }
        other => bail!("--mode {other:?} is not supported (archive)"),
    }
}
