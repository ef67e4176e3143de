//! The client side of the daemon's HTTP API, for the commands that talk to a running daemon
//! (`postgres-command`, `basebackup`): apart from the server so that they need none of it.

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// Header of `GET /<site>/archive/<file>` naming where the daemon writes the file (pghoard's).
pub const TARGET_PATH_HEADER: &str = "x-pghoard-target-path";

/// Sends one request to the daemon; its status and body.
pub async fn request(
    host: &str,
    port: u16,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
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
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, format!("{host}:{port}"));
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let req = req
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
