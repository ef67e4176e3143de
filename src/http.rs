//! The daemon's HTTP API on `http_address:http_port` (127.0.0.1:16000 by default, as
//! pghoard's), for the tools that run beside PostgreSQL:
//!
//! - `GET /status`: the state file's content, live.
//! - `PUT /<site>/basebackup`: take a basebackup now; `201` with its name once it is listed.
//! - `PUT /<site>/archive/<wal file>`: archive_command mode. The daemon reads the file from
//!   the site's `pg_data_directory/pg_wal`, stores it and answers `201 Created` only once it is
//!   durable in the archive; any failure is a 5xx (PostgreSQL then keeps the file and retries).
//! - `GET /<site>/archive/<wal file>` with header `x-pghoard-target-path: <absolute path>`:
//!   restore_command mode (as pghoard's). The daemon fetches the file (a segment, `.partial` or
//!   `.history`), verifies it, writes it at the target path, prefetching the next
//!   `restore_prefetch` segments next to it, and answers `201 Created`; `404` with
//!   `"not_found": true` only when the archive has no such object; anything else is a 5xx.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use walhoard_protocol::WalSegmentName;

use crate::config::Config;
use crate::daemon::archiver::wal_key;
use crate::daemon::status::now_secs;
use crate::daemon::Sites;
use crate::restore::wal::{restore_wal_file, WalFetchError};
use crate::storage::retry::RetryPolicy;

/// The running server.
pub struct Server {
    pub addr: SocketAddr,
    sites: Arc<RwLock<Sites>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Server {
    /// Points the API at a new set of sites (after a reload).
    pub fn set_sites(&self, sites: Sites) {
        *self.sites.write().unwrap_or_else(|p| p.into_inner()) = sites;
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Binds and starts serving.
pub async fn serve(config: &Config, sites: Sites) -> Result<Server> {
    let listener = TcpListener::bind((config.http_address.as_str(), config.http_port))
        .await
        .context("bind")?;
    let addr = listener.local_addr()?;
    let sites = Arc::new(RwLock::new(sites));
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let startup_time = now_secs();
    {
        let sites = sites.clone();
        let cancel = cancel.clone();
        let t = tracker.clone();
        tracker.spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = cancel.cancelled() => return,
                    a = listener.accept() => match a {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "HTTP accept failed");
                            continue;
                        }
                    },
                };
                let sites = sites.clone();
                let cancel = cancel.clone();
                t.spawn(async move {
                    let service = service_fn(move |req| {
                        let sites = sites.read().unwrap_or_else(|p| p.into_inner()).clone();
                        async move { Ok::<_, Infallible>(handle(req, sites, startup_time).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        r = conn => if let Err(e) = r { tracing::debug!(error = %e, "HTTP connection") },
                    }
                });
            }
        });
    }
    Ok(Server {
        addr,
        sites,
        cancel,
        tracker,
    })
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = reply(status, v.to_string());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(req: Request<Incoming>, sites: Sites, startup_time: f64) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["status"]) => json(
            StatusCode::OK,
            serde_json::to_value(crate::daemon::daemon_state(&sites, startup_time))
                .unwrap_or_default(),
        ),
        (&Method::PUT, [site, "basebackup"]) => basebackup(&sites, site).await,
        (&Method::PUT, [site, "archive", file]) => archive(&sites, site, file).await,
        (&Method::GET, [site, "archive", file]) => {
            let target = req
                .headers()
                .get(crate::postgres_command::TARGET_PATH_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(std::path::PathBuf::from);
            restore(&sites, site, file, target).await
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("no such endpoint: {} {path}", req.method())}),
        ),
    }
}

/// Takes a basebackup now (through the site's backup task, so never two at once); answers
/// `201` with its name once it is stored and listed.
async fn basebackup(sites: &Sites, site: &str) -> Response<Full<Bytes>> {
    let err = |status, msg: String| json(status, serde_json::json!({ "error": msg }));
    let Some(handle) = sites.by_name.get(site) else {
        return err(StatusCode::NOT_FOUND, format!("no backup site {site:?}"));
    };
    let Some(requests) = &handle.backup_requests else {
        return err(
            StatusCode::CONFLICT,
            format!("backup_sites.{site}.nodes is empty: nothing to back up"),
        );
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if requests.send(tx).await.is_err() {
        return err(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is stopping".into(),
        );
    }
    match rx.await {
        Ok(Ok(name)) => json(
            StatusCode::CREATED,
            serde_json::json!({ "basebackup": name }),
        ),
        Ok(Err(e)) => err(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(_) => err(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon stopped the backup".into(),
        ),
    }
}

/// archive_command: stores `<pg_data_directory>/pg_wal/<file>` and answers once it is durable.
async fn archive(sites: &Sites, site: &str, file: &str) -> Response<Full<Bytes>> {
    let err = |status, msg: String| json(status, serde_json::json!({ "error": msg }));
    let Some(handle) = sites.by_name.get(site) else {
        return err(StatusCode::NOT_FOUND, format!("no backup site {site:?}"));
    };
    let name: WalSegmentName = match file.parse() {
        Ok(n) => n,
        Err(e) => {
            return err(
                StatusCode::BAD_REQUEST,
                format!("{file:?} is not a WAL file name: {e}"),
            )
        }
    };
    let Some(data_dir) = &handle.config.pg_data_directory else {
        return err(
            StatusCode::CONFLICT,
            format!("backup_sites.{site}.pg_data_directory is not set; archive_command mode reads WAL from it"),
        );
    };
    let path = data_dir.join("pg_wal").join(file);
    if !path.is_file() {
        return err(
            StatusCode::NOT_FOUND,
            format!("{} does not exist", path.display()),
        );
    }
    let key = wal_key(&name);
    // PostgreSQL retries a failed archive_command itself: give up after a few attempts
    // rather than hold its archiver forever.
    let policy = RetryPolicy {
        max_attempts: Some(4),
        ..handle.upload.retry.clone()
    };
    let started = std::time::Instant::now();
    let permit = handle.upload.upload_slots.clone().acquire_owned().await;
    let result = handle.upload.upload(&policy, &key, &path, None).await;
    drop(permit);
    match result {
        Ok(()) => {
            handle.status.archived_file(&name);
            tracing::info!(%site, object = %key, elapsed = ?started.elapsed(), "archived (archive_command)");
            json(StatusCode::CREATED, serde_json::json!({ "archived": key }))
        }
        Err(e) => {
            tracing::error!(%site, object = %key, error = %e, "archive_command upload failed");
            handle.status.set_error(format!("archive {key}: {e}"));
            err(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("archive {key}: {e}"),
            )
        }
    }
}

/// restore_command: fetches `file` from the archive into `target` (absolute).
async fn restore(
    sites: &Sites,
    site: &str,
    file: &str,
    target: Option<std::path::PathBuf>,
) -> Response<Full<Bytes>> {
    let err = |status, msg: String| json(status, serde_json::json!({ "error": msg }));
    let Some(handle) = sites.by_name.get(site) else {
        return err(StatusCode::NOT_FOUND, format!("no backup site {site:?}"));
    };
    let Some(target) = target.filter(|t| t.is_absolute()) else {
        return err(
            StatusCode::BAD_REQUEST,
            format!(
                "{} must name an absolute target path",
                crate::postgres_command::TARGET_PATH_HEADER
            ),
        );
    };
    let keys = match crate::restore::key_ring(site, &handle.config) {
        Ok(k) => k,
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    };
    let started = std::time::Instant::now();
    match restore_wal_file(
        &handle.upload.store,
        &keys,
        file,
        &target,
        handle.restore_prefetch,
    )
    .await
    {
        Ok(served) => {
            tracing::info!(%site, %file, ?served, elapsed = ?started.elapsed(), "restored (restore_command)");
            json(StatusCode::CREATED, serde_json::json!({ "restored": file }))
        }
        Err(WalFetchError::NotFound { key }) => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": format!("{key} is not in the archive"), "not_found": true }),
        ),
        Err(e) => {
            tracing::error!(%site, %file, error = %e, "restore_command fetch failed");
            err(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("restore {file}: {e}"),
            )
        }
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
