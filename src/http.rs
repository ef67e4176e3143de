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
//!   The target must be a file inside the site's `pg_data_directory`, reached without a
//!   symlink ([`target`]); anything else is `400` and nothing is written.
//!
//! - `HEAD /<site>/archive/<file>`, `GET /<site>/basebackup`, `GET /metrics`: see
//!   [`catalog`].
//!
//! With `webserver_username` and `webserver_password` set, every route needs them as HTTP
//! Basic credentials (`401` otherwise, as pghoard's); without them the daemon refuses to
//! listen on a non-loopback `http_address` unless `http_allow_unauthenticated_remote` is set
//! ([`auth`]).
//!
//! Limits, so that a local process cannot exhaust the daemon: at most
//! `http_restore_concurrency` restore requests run at once (each holds up to
//! `restore_prefetch` + 1 downloads in memory; the others wait for a slot), and a connection
//! that does not send a complete request head within [`HEADER_READ_TIMEOUT`], whether it is
//! new or idle between keep-alive requests, is closed.

pub mod auth;
mod catalog;
mod target;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use walhoard_protocol::WalSegmentName;

use crate::config::Config;
use crate::daemon::archiver::wal_key;
use crate::daemon::sites::{daemon_state, Sites};
use crate::daemon::status::now_secs;
use crate::restore::wal::{restore_wal_file_from, WalFetchError};
use crate::storage::retry::RetryPolicy;

/// How long a connection may take to send a request head, counted from when the server
/// starts waiting for it (a new connection, or an idle keep-alive one).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Default of `http_restore_concurrency`: PostgreSQL's startup process runs one
/// restore_command at a time, so two covers a standby catching up beside a restore.
pub const DEFAULT_RESTORE_CONCURRENCY: usize = 2;

/// What one server allows.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    /// Restore requests running at once.
    pub restore_concurrency: usize,
}

impl Limits {
    pub fn from_config(config: &Config) -> Limits {
        Limits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            restore_concurrency: config
                .http_restore_concurrency
                .map_or(DEFAULT_RESTORE_CONCURRENCY, |n| n.max(1) as usize),
        }
    }
}

/// Restore requests: the slots that bound them and what was observed (in `/status` as
/// `http_restores`, so that the bound can be checked from outside).
struct Restores {
    slots: Arc<Semaphore>,
    limit: usize,
    /// Requests received and not answered yet, waiting for a slot or running.
    in_flight: AtomicUsize,
    in_flight_max: AtomicUsize,
    running: AtomicUsize,
    running_max: AtomicUsize,
}

impl Restores {
    fn new(limit: usize) -> Restores {
        Restores {
            slots: Arc::new(Semaphore::new(limit)),
            limit,
            in_flight: AtomicUsize::new(0),
            in_flight_max: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            running_max: AtomicUsize::new(0),
        }
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "limit": self.limit,
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "in_flight_max": self.in_flight_max.load(Ordering::Relaxed),
            "running": self.running.load(Ordering::Relaxed),
            "running_max": self.running_max.load(Ordering::Relaxed),
        })
    }
}

/// Counts one unit in `count` (and its high-water mark) while alive.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(count: &'a AtomicUsize, max: &AtomicUsize) -> Counted<'a> {
        let now = count.fetch_add(1, Ordering::Relaxed) + 1;
        max.fetch_max(now, Ordering::Relaxed);
        Counted(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What every request of one server checks and answers, from the configuration it started
/// with.
#[derive(Clone)]
struct Fixed {
    startup_time: f64,
    auth: auth::Auth,
    prometheus: Option<crate::config::PrometheusConfig>,
}

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

    /// The sites the API serves, as replaced on reload (the metrics pusher reads them).
    pub fn sites_handle(&self) -> Arc<RwLock<Sites>> {
        self.sites.clone()
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Binds and starts serving.
pub async fn serve(config: &Config, sites: Sites) -> Result<Server> {
    serve_with(config, sites, Limits::from_config(config)).await
}

/// [`serve`] with explicit limits.
pub async fn serve_with(config: &Config, sites: Sites, limits: Limits) -> Result<Server> {
    auth::check_exposure(config).map_err(anyhow::Error::msg)?;
    let listener = TcpListener::bind((config.http_address.as_str(), config.http_port))
        .await
        .with_context(|| format!("bind {}:{}", config.http_address, config.http_port))?;
    let addr = listener.local_addr()?;
    let sites = Arc::new(RwLock::new(sites));
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let fixed = Fixed {
        startup_time: now_secs(),
        auth: auth::Auth::from_config(config),
        prometheus: config.prometheus.clone(),
    };
    let restores = Arc::new(Restores::new(limits.restore_concurrency));
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
                let restores = restores.clone();
                let fixed = fixed.clone();
                let header_read_timeout = limits.header_read_timeout;
                let tasks = t.clone();
                t.spawn(async move {
                    let service = service_fn(move |req| {
                        let sites = sites.read().unwrap_or_else(|p| p.into_inner()).clone();
                        let api = Api {
                            sites,
                            fixed: fixed.clone(),
                            restores: restores.clone(),
                            tasks: tasks.clone(),
                        };
                        async move { Ok::<_, Infallible>(handle(req, api).await) }
                    });
                    // Without a timer hyper applies no header timeout: a client that never
                    // finishes its request head (or idles on keep-alive) would hold the
                    // connection, its task and its buffers forever.
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(header_read_timeout)
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

/// What a request handler sees.
struct Api {
    sites: Sites,
    fixed: Fixed,
    restores: Arc<Restores>,
    /// The server's tasks: restores run in one of their own (see [`restore`]).
    tasks: TaskTracker,
}

async fn handle(req: Request<Incoming>, api: Api) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let sites = &api.sites;
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if !api.fixed.auth.allows(authorization) {
        // Logged without the header: it may hold a password that is almost right.
        tracing::warn!(method = %req.method(), %path, "HTTP request refused: missing or wrong credentials");
        let mut r = reply(StatusCode::UNAUTHORIZED, "Authentication required");
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Basic realm=\"pghoard\""),
        );
        return r;
    }
    let has_target = req
        .headers()
        .contains_key(crate::api_client::TARGET_PATH_HEADER);
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["metrics"]) => catalog::metrics(sites, api.fixed.prometheus.as_ref()),
        (&Method::GET, [site, "basebackup"]) => catalog::list_basebackups(sites, site).await,
        (&Method::HEAD, [site, "archive" | "xlog" | "timeline", file]) => {
            catalog::head(sites, site, file, has_target).await
        }
        (&Method::GET, ["status"]) => {
            let mut state = serde_json::to_value(daemon_state(sites, api.fixed.startup_time))
                .unwrap_or_default();
            if let Some(o) = state.as_object_mut() {
                o.insert("http_restores".into(), api.restores.status());
            }
            json(StatusCode::OK, state)
        }
        (&Method::PUT, [site, "basebackup"]) => basebackup(sites, site).await,
        (&Method::PUT, [site, "archive", file]) => archive(sites, site, file).await,
        (&Method::GET, [site, "archive", file]) => {
            let target = req
                .headers()
                .get(crate::api_client::TARGET_PATH_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(std::path::PathBuf::from);
            restore(&api, site, file, target).await
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

/// The WAL file a route names, or its `400` answer.
#[allow(clippy::result_large_err)]
fn wal_name(file: &str) -> Result<WalSegmentName, Response<Full<Bytes>>> {
    file.parse().map_err(|e| {
        json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": format!("{file:?} is not a WAL file name: {e}") }),
        )
    })
}

/// archive_command: stores `<pg_data_directory>/pg_wal/<file>` and answers once it is durable.
async fn archive(sites: &Sites, site: &str, file: &str) -> Response<Full<Bytes>> {
    let err = |status, msg: String| json(status, serde_json::json!({ "error": msg }));
    let Some(handle) = sites.by_name.get(site) else {
        return err(StatusCode::NOT_FOUND, format!("no backup site {site:?}"));
    };
    let name = match wal_name(file) {
        Ok(n) => n,
        Err(refused) => return refused,
    };
    let Some(data_dir) = &handle.settings.config.pg_data_directory else {
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
    let result = handle.upload.upload_retrying(&policy, &key, &path).await;
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

/// restore_command: fetches `file` from the archive into `target`, a file inside the site's
/// `pg_data_directory` ([`target::confine`]).
async fn restore(
    api: &Api,
    site: &str,
    file: &str,
    target: Option<std::path::PathBuf>,
) -> Response<Full<Bytes>> {
    let err = |status, msg: String| json(status, serde_json::json!({ "error": msg }));
    let Some(handle) = api.sites.by_name.get(site) else {
        return err(StatusCode::NOT_FOUND, format!("no backup site {site:?}"));
    };
    let header = crate::api_client::TARGET_PATH_HEADER;
    let Some(target) = target else {
        return err(
            StatusCode::BAD_REQUEST,
            format!("{header} must name the file to restore into"),
        );
    };
    let Some(data_dir) = &handle.settings.config.pg_data_directory else {
        return err(
            StatusCode::BAD_REQUEST,
            format!("backup_sites.{site}.pg_data_directory is not set; the API restores only into files inside it"),
        );
    };
    let target = match target::confine(data_dir, &target) {
        Ok(t) => t,
        Err(target::TargetError::BadRequest(m)) => {
            tracing::warn!(%site, %file, "restore_command request refused: {header} {m}");
            return err(StatusCode::BAD_REQUEST, format!("{header} {m}"));
        }
        Err(target::TargetError::Failed(m)) => {
            return err(StatusCode::INTERNAL_SERVER_ERROR, m);
        }
    };
    let keys = match handle.settings.keys() {
        Ok(k) => k,
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    };
    // The work runs in a task of its own holding its slot: a client that disconnects does
    // not cancel a download halfway (its temporary files are removed by the code that made
    // them), and does not free the slot before the memory is.
    let restores = api.restores.clone();
    let (store, prefetch) = (
        handle.upload.store.clone(),
        handle.settings.restore_prefetch,
    );
    let older = handle.older.clone();
    let (site_name, file_name) = (site.to_string(), file.to_string());
    let work = api.tasks.spawn(async move {
        let _in_flight = Counted::new(&restores.in_flight, &restores.in_flight_max);
        let Ok(_slot) = restores.slots.clone().acquire_owned().await else {
            return Err(WalFetchError::Failed(anyhow::anyhow!("the daemon is stopping")));
        };
        let _running = Counted::new(&restores.running, &restores.running_max);
        let started = std::time::Instant::now();
        let output = target.through_fd();
        // This site first, then its `moved_from` sites (pghoard's get_related_sites).
        let sources: Vec<_> = std::iter::once((&store, &keys))
            .chain(older.iter().map(|o| (&o.store, &o.keys)))
            .collect();
        let result = restore_wal_file_from(&sources, &file_name, &output, prefetch).await;
        if let Ok(served) = &result {
            tracing::info!(site = %site_name, file = %file_name, target = %target.shown.display(), ?served, elapsed = ?started.elapsed(), "restored (restore_command)");
        }
        // Messages name the target as the client did, not through /proc.
        let fd_dir = target.fd_dir().display().to_string();
        let real_dir = target
            .shown
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let size = |_| std::fs::metadata(&output).map_or(0, |m| m.len());
        result.map(size).map_err(|e| match e {
            WalFetchError::Failed(e) => WalFetchError::Failed(anyhow::anyhow!(
                "{}",
                format!("{e:#}").replace(&fd_dir, &real_dir)
            )),
            other => other,
        })
    });
    let result = work.await;
    match &result {
        Ok(Ok(size)) => crate::metrics::download(site, file, Ok(*size)),
        Ok(Err(WalFetchError::NotFound { .. })) => {}
        _ => crate::metrics::download(site, file, Err(())),
    }
    match result {
        Ok(Ok(_)) => json(StatusCode::CREATED, serde_json::json!({ "restored": file })),
        Ok(Err(WalFetchError::NotFound { key })) => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": format!("{key} is not in the archive"), "not_found": true }),
        ),
        Ok(Err(e)) => {
            tracing::error!(%site, %file, error = %e, "restore_command fetch failed");
            err(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("restore {file}: {e}"),
            )
        }
        Err(e) => err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("restore {file}: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn config() -> Config {
        Config::parse(
            r#"{"http_port": 0, "backup_sites": {"s": {"active_backup_mode": "archive_command",
                "object_storage": {"storage_type": "local", "directory": "/nonexistent"}}}}"#,
            "t.json",
        )
        .unwrap()
    }

    /// Reads until the server closes the connection; false if it is still open after `limit`
    /// (a guard against hanging the test, not a timing assertion).
    fn closed_by_server(s: &mut std::net::TcpStream, limit: Duration) -> bool {
        s.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// Issue 14 item 8: connections that never finished a request head, or idled after one,
    /// were held open forever (hyper applies its header timeout only with a timer).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_slow_header_and_idle_connections_are_closed() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            restore_concurrency: 1,
        };
        let server = serve_with(&config(), Sites::default(), limits)
            .await
            .unwrap();
        let addr = server.addr;
        let outcome = tokio::task::spawn_blocking(move || {
            // Half a request head, then nothing.
            let mut slow = std::net::TcpStream::connect(addr).unwrap();
            slow.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            // A complete request, then an idle keep-alive connection.
            let mut idle = std::net::TcpStream::connect(addr).unwrap();
            idle.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut first = [0u8; 12];
            idle.read_exact(&mut first).unwrap();
            (
                closed_by_server(&mut slow, Duration::from_secs(20)),
                first,
                closed_by_server(&mut idle, Duration::from_secs(20)),
            )
        })
        .await
        .unwrap();
        assert!(
            outcome.0,
            "a connection with half a request head stays open"
        );
        assert_eq!(&outcome.1, b"HTTP/1.1 200");
        assert!(outcome.2, "an idle keep-alive connection stays open");
        server.stop().await;
    }

    #[tokio::test]
    async fn http_binds_loopback_by_default() {
        let server = serve(&config(), Sites::default()).await.unwrap();
        assert_eq!(server.addr.ip().to_string(), "127.0.0.1");
        server.stop().await;
    }
}
