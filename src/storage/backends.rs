//! From a site's `object_storage` configuration (pghoard's keys) to an OpenDAL operator.

use opendal::Operator;

use super::{StorageError, StorageKind};
use crate::config::ObjectStorageConfig;

/// What [`operator`] makes of a configuration.
pub(super) struct Backend {
    pub op: Operator,
    /// Metadata as `<key>.metadata` JSON objects (local, sftp).
    pub sidecar: bool,
    pub kind: StorageKind,
    /// The storage's own key prefix (`prefix`), before the site's.
    pub prefix: Option<String>,
}

fn err_config(e: opendal::Error) -> StorageError {
    StorageError::Config(e.to_string())
}

/// `read_only`: for commands that only read (restore): local storage is neither created nor
/// given its temp directory, and a missing directory is an error (an unmounted disk or a typo
/// must not look like an empty archive).
pub(super) fn operator(
    cfg: &ObjectStorageConfig,
    read_only: bool,
) -> Result<Backend, StorageError> {
    // Registers the services and the HTTP transport (idempotent).
    opendal::install_default();
    Ok(match cfg {
        ObjectStorageConfig::Local { directory, prefix } => {
            if read_only {
                if !directory.is_dir() {
                    return Err(StorageError::Config(format!(
                        "object_storage.directory {} does not exist or is not a directory (not mounted?)",
                        directory.display()
                    )));
                }
            } else {
                std::fs::create_dir_all(directory).map_err(|e| {
                    StorageError::Config(format!(
                        "cannot create directory {}: {e}",
                        directory.display()
                    ))
                })?;
            }
            let root = directory
                .to_str()
                .ok_or_else(|| StorageError::Config("directory is not UTF-8".into()))?;
            let mut b = opendal::services::Fs::default().root(root);
            if !read_only {
                // Writes land in a temp dir inside the store and are renamed into place
                // (OpenDAL creates it when the operator is built).
                let tmp = directory.join(super::TEMP_DIR);
                b = b.atomic_write_dir(tmp.to_str().unwrap_or(".walhoard-tmp"));
            }
            backend(b, StorageKind::Local, prefix.clone())?
        }
        ObjectStorageConfig::S3 {
            region,
            bucket_name,
            aws_access_key_id,
            aws_secret_access_key,
            aws_session_token,
            host,
            port,
            is_secure,
            prefix,
            ..
        } => {
            let mut b = opendal::services::S3::default()
                .bucket(bucket_name)
                .region(region.as_deref().unwrap_or("us-east-1"))
                .disable_config_load()
                .disable_ec2_metadata();
            if let Some(h) = host {
                b = b.endpoint(&host_endpoint(*is_secure, h, *port));
            }
            if let Some(k) = aws_access_key_id {
                b = b.access_key_id(k);
            }
            if let Some(s) = aws_secret_access_key {
                b = b.secret_access_key(s);
            }
            if let Some(t) = aws_session_token {
                b = b.session_token(t);
            }
            backend(b, StorageKind::S3, prefix.clone())?
        }
        ObjectStorageConfig::Google {
            bucket_name,
            credential_file,
            credentials,
            prefix,
            host,
            port,
            is_secure,
            ..
        } => {
            let mut b = opendal::services::Gcs::default()
                .bucket(bucket_name)
                .disable_vm_metadata();
            if let Some(f) = credential_file {
                b = b.credential_path(f.to_str().ok_or_else(|| {
                    StorageError::Config("object_storage.credential_file is not UTF-8".into())
                })?);
            }
            if let Some(c) = credentials {
                // OpenDAL takes the service account JSON base64-encoded.
                b = b.credential(&base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    c.to_string(),
                ));
            }
            if let Some(h) = host {
                b = b.endpoint(&host_endpoint(*is_secure, h, *port));
                if credential_file.is_none() && credentials.is_none() {
                    b = b.skip_signature().disable_config_load();
                }
            }
            backend(b, StorageKind::Google, prefix.clone())?
        }
        ObjectStorageConfig::Azure {
            account_name,
            account_key,
            sas_token,
            bucket_name,
            azure_cloud,
            host,
            port,
            is_secure,
            prefix,
            ..
        } => {
            let scheme = scheme(*is_secure);
            // As pghoard (rohmu) builds its connection string: a custom host means an
            // Azurite-style endpoint that carries the account as the first path segment.
            let endpoint = match (host, port) {
                (Some(h), Some(p)) => format!("{scheme}://{h}:{p}/{account_name}"),
                (Some(h), None) => format!("{scheme}://{h}/{account_name}"),
                (None, _) => {
                    let suffix = azure_cloud.unwrap_or_default().endpoint_suffix();
                    format!("{scheme}://{account_name}.blob.{suffix}")
                }
            };
            let mut b = opendal::services::Azblob::default()
                .container(bucket_name)
                .account_name(account_name)
                .endpoint(&endpoint);
            if let Some(k) = account_key {
                b = b.account_key(k);
            }
            if let Some(t) = sas_token {
                b = b.sas_token(t);
            }
            backend(b, StorageKind::Azure, prefix.clone())?
        }
        ObjectStorageConfig::Swift {
            auth_url,
            container_name,
            prefix,
            ..
        } => {
            let b = opendal::services::Swift::default()
                .endpoint(auth_url)
                .container(container_name);
            backend(b, StorageKind::Swift, prefix.clone())?
        }
        ObjectStorageConfig::Sftp {
            server,
            port,
            username,
            password,
            private_key,
            prefix,
        } => {
            // OpenDAL's sftp runs the system `ssh` client in batch mode: keys only.
            if password.is_some() {
                return Err(StorageError::Config(
                    "object_storage.password: sftp password authentication is not supported, use private_key".into(),
                ));
            }
            let endpoint = format!("ssh://{username}@{server}:{}", port.unwrap_or(22));
            // The server's host key must be known (known_hosts or ssh_config): never accept
            // an unknown key for the archive's server.
            let mut b = opendal::services::Sftp::default()
                .endpoint(&endpoint)
                .user(username)
                .known_hosts_strategy("strict");
            if let Some(k) = private_key {
                b = b.key(k);
            }
            // As with pghoard, a relative prefix (or none) is under the login directory,
            // where an SFTP session starts; an absolute one is the service's root.
            let prefix = match prefix {
                Some(p) if p.starts_with('/') => {
                    b = b.root(p);
                    None
                }
                other => other.clone(),
            };
            backend(b, StorageKind::Sftp, prefix)?
        }
    })
}

/// The operator `b` builds, for a store of `kind` under `prefix`.
fn backend(
    b: impl opendal::Builder,
    kind: StorageKind,
    prefix: Option<String>,
) -> Result<Backend, StorageError> {
    Ok(Backend {
        op: Operator::new(b).map_err(err_config)?,
        // The stores without object metadata of their own (pghoard's local and sftp).
        sidecar: matches!(kind, StorageKind::Local | StorageKind::Sftp),
        kind,
        prefix,
    })
}

/// `http` or `https` as `is_secure` says (pghoard's default: secure).
fn scheme(is_secure: Option<bool>) -> &'static str {
    if is_secure.unwrap_or(true) {
        "https"
    } else {
        "http"
    }
}

/// The endpoint URL of a custom S3 or GCS `host`.
fn host_endpoint(is_secure: Option<bool>, host: &str, port: Option<u16>) -> String {
    let scheme = scheme(is_secure);
    match port {
        Some(p) => format!("{scheme}://{host}:{p}"),
        None => format!("{scheme}://{host}"),
    }
}
