//! The API's read-only routes over the archive, answered as pghoard's webserver answers them:
//!
//! - `HEAD /<site>/archive/<file>` (also `/<site>/xlog/<file>`, `/<site>/timeline/<file>`):
//!   `200` with headers `metadata-hash` and `metadata-hash-algorithm` (when the object
//!   records both) if the site, or one of its `moved_from` sites, holds the file; `404`
//!   otherwise. A `x-pghoard-target-path` header is refused (`400`): it belongs to downloads.
//! - `GET /<site>/basebackup`: `{"basebackups": [{"name", "size", "last_modified",
//!   "metadata"}]}`, every object under `basebackup/` of the site and its `moved_from` sites,
//!   `name` being the full object key (prefix included), as rohmu's `list_path` items.
//! - `GET /metrics`: the Prometheus exposition when `prometheus` is configured, else `501`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

use crate::daemon::archiver::wal_key;
use crate::daemon::{SiteHandle, Sites};
use crate::storage::{ObjectStore, StorageError};

use super::{json, reply};

/// The stores to search for a site's files: its own, then its `moved_from` sites' (pghoard's
/// `get_related_sites`).
fn stores(handle: &SiteHandle) -> Vec<&ObjectStore> {
    std::iter::once(&handle.upload.store)
        .chain(handle.older.iter().map(|o| &o.store))
        .collect()
}

fn error(status: StatusCode, msg: String) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": msg }))
}

/// `HEAD /<site>/<kind>/<file>`: whether the archive holds `file`, and its hash.
pub async fn head(
    sites: &Sites,
    site: &str,
    file: &str,
    has_target_header: bool,
) -> Response<Full<Bytes>> {
    let Some(handle) = sites.by_name.get(site) else {
        return error(StatusCode::NOT_FOUND, format!("no backup site {site:?}"));
    };
    if has_target_header {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "{} header is only valid for downloads",
                crate::api_client::TARGET_PATH_HEADER
            ),
        );
    }
    let name = match super::wal_name(file) {
        Ok(n) => n,
        Err(refused) => return refused,
    };
    let key = wal_key(&name);
    for store in stores(handle) {
        match store.object_meta(&key).await {
            Ok(m) => {
                let mut r = reply(StatusCode::OK, Bytes::new());
                if let (Some(hash), Some(algorithm)) = (&m.hash, m.hash_algorithm) {
                    for (name, v) in [
                        ("metadata-hash", hash.as_str()),
                        ("metadata-hash-algorithm", algorithm.name()),
                    ] {
                        if let Ok(v) = hyper::header::HeaderValue::from_str(v) {
                            r.headers_mut().insert(name, v);
                        }
                    }
                }
                return r;
            }
            Err(StorageError::NotFound { .. }) => continue,
            Err(e) => {
                tracing::error!(%site, object = %key, error = %e, "HEAD: cannot read metadata");
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("metadata of {key}: {e}"),
                );
            }
        }
    }
    error(
        StatusCode::NOT_FOUND,
        format!("{key} is not in the archive"),
    )
}

/// `GET /<site>/basebackup`: the basebackup objects with their metadata.
pub async fn list_basebackups(sites: &Sites, site: &str) -> Response<Full<Bytes>> {
    let Some(handle) = sites.by_name.get(site) else {
        return error(StatusCode::NOT_FOUND, format!("no backup site {site:?}"));
    };
    let mut items = Vec::new();
    for store in stores(handle) {
        let listed = match store.list("basebackup").await {
            Ok(l) => l,
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("list basebackup/: {e}"),
                )
            }
        };
        for object in listed {
            let metadata = match store.metadata(&object.key).await {
                Ok(m) => m,
                // Deleted by retention between the listing and now.
                Err(StorageError::NotFound { .. }) => continue,
                Err(e) => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("metadata of {}: {e}", object.key),
                    )
                }
            };
            let name = match store.prefix() {
                "" => object.key.clone(),
                p => format!("{p}/{}", object.key),
            };
            let last_modified = object
                .last_modified
                .and_then(|s| jiff::Timestamp::from_second(s).ok())
                .map(|t| t.to_string());
            items.push(serde_json::json!({
                "name": name,
                "size": object.size,
                "last_modified": last_modified,
                "metadata": metadata,
            }));
        }
    }
    json(StatusCode::OK, serde_json::json!({ "basebackups": items }))
}

/// `GET /metrics`.
pub fn metrics(
    sites: &Sites,
    prometheus: Option<&crate::config::PrometheusConfig>,
) -> Response<Full<Bytes>> {
    let Some(prometheus) = prometheus else {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            "prometheus is not configured: add \"prometheus\": {} to enable GET /metrics".into(),
        );
    };
    let text =
        crate::metrics::prometheus::render(&crate::metrics::collect(sites), &prometheus.tags);
    let mut r = reply(StatusCode::OK, text);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(crate::metrics::prometheus::CONTENT_TYPE),
    );
    r
}
