//! `walhoard postgres-command`: what PostgreSQL runs as archive_command, with
//! pghoard_postgres_command's flags. `--mode archive` asks the daemon (HTTP API) to store
//! `pg_wal/<xlog>` and exits 0 only when the daemon says it is durable in the archive.

use std::path::Path;

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use crate::config::Config;

/// Sends one request to the daemon; its status and body.
async fn request(
    host: &str,
    port: u16,
    method: Method,
    path: &str,
) -> Result<(StatusCode, String)> {
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .with_context(|| {
            format!("connect to the walhoard daemon at {host}:{port} (is it running?)")
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake with the daemon")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .body(Empty::<bytes::Bytes>::new())
        .context("build request")?;
    let resp = sender
        .send_request(req)
        .await
        .context("HTTP request to the daemon")?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("read the daemon's answer")?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

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
