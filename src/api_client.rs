//! The client side of the daemon's HTTP API, for the commands that talk to a running daemon
//! (`postgres-command`, `basebackup`): apart from the server so that they need none of it.

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// Header of `GET /<site>/archive/<file>` naming where the daemon writes the file (pghoard's).
pub const TARGET_PATH_HEADER: &str = "x-pghoard-target-path";

/// The `Authorization` header value of HTTP Basic credentials (RFC 7617), as the daemon
/// expects them when `webserver_username`/`webserver_password` are set.
pub fn basic_header(username: &str, password: &str) -> String {
    use base64::Engine;
    let pair = format!("{username}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// Credentials sent to the daemon's API.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, ..)", self.username)
    }
}

impl Credentials {
    /// The configuration's `webserver_username`/`webserver_password`, when both are set.
    pub fn from_config(config: &crate::config::Config) -> Option<Credentials> {
        match (&config.webserver_username, &config.webserver_password) {
            (Some(u), Some(p)) => Some(Credentials {
                username: u.clone(),
                password: p.0.clone(),
            }),
            _ => None,
        }
    }

    /// The request header carrying them.
    pub fn header(&self) -> (&'static str, String) {
        (
            "authorization",
            basic_header(&self.username, &self.password),
        )
    }
}

/// Sends one request to the daemon; its status and body.
pub async fn request(
    host: &str,
    port: u16,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
) -> Result<(StatusCode, String)> {
    request_with_body(host, port, method, path, headers, bytes::Bytes::new())
        .await
        .map_err(|e| e.context(format!("walhoard daemon at {host}:{port} (is it running?)")))
}

/// Sends one HTTP/1.1 request with `body` to `host:port` (the daemon, or a metrics
/// receiver); its status and body.
pub async fn request_with_body(
    host: &str,
    port: u16,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    body: bytes::Bytes,
) -> Result<(StatusCode, String)> {
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .with_context(|| format!("connect to {host}:{port}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method.clone())
        .uri(path)
        .header(hyper::header::HOST, format!("{host}:{port}"));
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let req = req.body(Full::new(body)).context("build request")?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("HTTP {} {path}", method.as_str()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("read the answer")?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
