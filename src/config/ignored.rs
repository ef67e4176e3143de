//! The keys walhoard accepts from pghoard's configuration but does not act on, and the ones it
//! refuses because ignoring them would do something other than what the operator asked for.
//! docs/configuration-keys.md lists every key with its status; this module is the one place
//! that decides "ignored" and "refused" (the daemon warns at start and on reload, `check`
//! prints the same list).

use std::fmt;

use super::{Config, ObjectStorageConfig, SiteConfig};

/// A key accepted for compatibility whose value changes nothing here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IgnoredKey {
    /// Top-level `active`: pghoard reads `active` per site only.
    Active,
    TarExecutable,
    GracefulShutdownCompressionTimeout,
    PgBinDirectory,
    PgDataDirectoryVersion,
    PgReceivexlogPath,
    PgBasebackupPath,
    StreamCompression,
    S3SegmentSize,
    S3StorageClass,
    S3AddressingStyle,
    /// Only `false` is reported: certificates are always verified.
    S3IsVerifyTls,
    GoogleProjectId,
}

impl IgnoredKey {
    /// The key's own name (the last component of its path).
    pub fn key(self) -> &'static str {
        match self {
            IgnoredKey::Active => "active",
            IgnoredKey::TarExecutable => "tar_executable",
            IgnoredKey::GracefulShutdownCompressionTimeout => {
                "graceful_shutdown_compression_timeout"
            }
            IgnoredKey::PgBinDirectory => "pg_bin_directory",
            IgnoredKey::PgDataDirectoryVersion => "pg_data_directory_version",
            IgnoredKey::PgReceivexlogPath => "pg_receivexlog_path",
            IgnoredKey::PgBasebackupPath => "pg_basebackup_path",
            IgnoredKey::StreamCompression => "stream_compression",
            IgnoredKey::S3SegmentSize => "segment_size",
            IgnoredKey::S3StorageClass => "storage_class",
            IgnoredKey::S3AddressingStyle => "addressing_style",
            IgnoredKey::S3IsVerifyTls => "is_verify_tls",
            IgnoredKey::GoogleProjectId => "project_id",
        }
    }

    /// Why nothing depends on it, and what happens instead.
    pub fn why(self) -> &'static str {
        match self {
            IgnoredKey::Active => "pghoard reads `active` per backup site; set it there",
            IgnoredKey::TarExecutable => "walhoard reads and writes tar itself",
            IgnoredKey::GracefulShutdownCompressionTimeout => {
                "compression runs inside each upload; graceful_shutdown_upload_timeout bounds both"
            }
            IgnoredKey::PgBinDirectory
            | IgnoredKey::PgReceivexlogPath
            | IgnoredKey::PgBasebackupPath => {
                "walhoard speaks the replication protocol itself and runs no PostgreSQL program"
            }
            IgnoredKey::PgDataDirectoryVersion => {
                "the server version is read from the server (and from PG_VERSION on restore)"
            }
            IgnoredKey::StreamCompression => {
                "basic and pipe basebackups both stream into compression; choose basebackup_mode"
            }
            IgnoredKey::S3SegmentSize => "multipart uploads use parts of 8 MiB",
            IgnoredKey::S3StorageClass => "objects get the bucket's default storage class",
            IgnoredKey::S3AddressingStyle => "requests use path-style addressing",
            IgnoredKey::S3IsVerifyTls => {
                "TLS certificates are always verified (the system's and webpki roots)"
            }
            IgnoredKey::GoogleProjectId => "bucket operations do not need it",
        }
    }
}

/// One ignored key as it appears in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredSetting {
    /// Dotted key path, as in configuration errors.
    pub path: String,
    pub key: IgnoredKey,
}

impl fmt::Display for IgnoredSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: accepted for compatibility and ignored: {}",
            self.path,
            self.key.why()
        )
    }
}

impl Config {
    /// The keys of this configuration that are accepted and ignored, in file order of sites.
    pub fn ignored_keys(&self) -> Vec<IgnoredSetting> {
        let mut out = Vec::new();
        let mut push = |path: String, key: IgnoredKey, set: bool| {
            if set {
                out.push(IgnoredSetting { path, key });
            }
        };
        push("active".into(), IgnoredKey::Active, self.active.is_some());
        push(
            "tar_executable".into(),
            IgnoredKey::TarExecutable,
            self.tar_executable.is_some(),
        );
        push(
            "graceful_shutdown_compression_timeout".into(),
            IgnoredKey::GracefulShutdownCompressionTimeout,
            self.graceful_shutdown_compression_timeout.is_some(),
        );
        for (name, site) in &self.backup_sites {
            let at = |key: IgnoredKey| format!("backup_sites.{name}.{}", key.key());
            let storage =
                |key: IgnoredKey| format!("backup_sites.{name}.object_storage.{}", key.key());
            for (key, set) in [
                (IgnoredKey::PgBinDirectory, site.pg_bin_directory.is_some()),
                (
                    IgnoredKey::PgDataDirectoryVersion,
                    site.pg_data_directory_version.is_some(),
                ),
                (
                    IgnoredKey::PgReceivexlogPath,
                    site.pg_receivexlog_path.is_some(),
                ),
                (
                    IgnoredKey::PgBasebackupPath,
                    site.pg_basebackup_path.is_some(),
                ),
                (IgnoredKey::StreamCompression, site.stream_compression),
            ] {
                push(at(key), key, set);
            }
            match &site.object_storage {
                Some(ObjectStorageConfig::S3 {
                    segment_size,
                    storage_class,
                    addressing_style,
                    is_verify_tls,
                    ..
                }) => {
                    for (key, set) in [
                        (IgnoredKey::S3SegmentSize, segment_size.is_some()),
                        (IgnoredKey::S3StorageClass, storage_class.is_some()),
                        (IgnoredKey::S3AddressingStyle, addressing_style.is_some()),
                        (IgnoredKey::S3IsVerifyTls, *is_verify_tls == Some(false)),
                    ] {
                        push(storage(key), key, set);
                    }
                }
                Some(ObjectStorageConfig::Google { project_id, .. }) => push(
                    storage(IgnoredKey::GoogleProjectId),
                    IgnoredKey::GoogleProjectId,
                    project_id.is_some(),
                ),
                _ => {}
            }
        }
        out
    }
}

/// Keys that would do something else than the operator asked for if ignored: refused, with the
/// key path. `name` is the site.
pub(super) fn refused(name: &str, site: &SiteConfig) -> Result<(), (String, String)> {
    let at = |key: &str| format!("backup_sites.{name}.object_storage.{key}");
    match &site.object_storage {
        // OpenDAL's Swift service takes a pre-issued token; pghoard's user/key authentication
        // against auth_url (Keystone) is not implemented, so no request could authenticate.
        Some(ObjectStorageConfig::Swift { .. }) => Err((
            at("storage_type"),
            "swift is not supported (user/key authentication against auth_url is not implemented)"
                .into(),
        )),
        // Connecting directly where a proxy was required would bypass the network policy.
        Some(ObjectStorageConfig::S3 {
            proxy_info: Some(_),
            ..
        })
        | Some(ObjectStorageConfig::Google {
            proxy_info: Some(_),
            ..
        })
        | Some(ObjectStorageConfig::Azure {
            proxy_info: Some(_),
            ..
        }) => Err((
            at("proxy_info"),
            "connecting through a proxy is not supported; remove it to connect directly".into(),
        )),
        // S3 server-side encryption was asked for; objects stored without it must not look fine.
        Some(ObjectStorageConfig::S3 {
            encrypted: Some(true),
            ..
        }) => Err((
            at("encrypted"),
            "S3 server-side encryption is not supported; walhoard encrypts objects before \
             upload with encryption_key_id"
                .into(),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{
        "backup_sites": {
            "main": {
                "active_backup_mode": "archive_command",
                "object_storage": STORAGE
            }
        }
    }"#;

    fn parse(top: &str, site: &str, storage: &str) -> Result<Config, String> {
        let text = BASE
            .replace("STORAGE", storage)
            .replace(
                r#""active_backup_mode""#,
                &format!("{site}\"active_backup_mode\""),
            )
            .replacen('{', &format!("{{{top}"), 1);
        Config::parse(&text, "t.json").map_err(|e| e.to_string())
    }

    const LOCAL: &str = r#"{"storage_type": "local", "directory": "/srv/b"}"#;

    /// Every ignored key is reported with its path, and nothing is reported for a file that
    /// sets none of them.
    #[test]
    fn ignored_keys_are_listed_with_their_paths() {
        let c = parse("", "", LOCAL).unwrap();
        assert_eq!(c.ignored_keys(), []);
        let c = parse(
            r#""active": true, "tar_executable": "pghoard_gnutaremu",
               "graceful_shutdown_compression_timeout": 180,"#,
            r#""pg_bin_directory": "/usr/lib/postgresql/15/bin", "pg_data_directory_version": "15",
               "pg_receivexlog_path": "/x", "pg_basebackup_path": "/y", "stream_compression": true,"#,
            r#"{"storage_type": "s3", "bucket_name": "b", "segment_size": 1048576,
                "storage_class": "STANDARD_IA", "addressing_style": "virtual", "is_verify_tls": false}"#,
        )
        .unwrap();
        let paths: Vec<String> = c.ignored_keys().iter().map(|i| i.path.clone()).collect();
        assert_eq!(
            paths,
            [
                "active",
                "tar_executable",
                "graceful_shutdown_compression_timeout",
                "backup_sites.main.pg_bin_directory",
                "backup_sites.main.pg_data_directory_version",
                "backup_sites.main.pg_receivexlog_path",
                "backup_sites.main.pg_basebackup_path",
                "backup_sites.main.stream_compression",
                "backup_sites.main.object_storage.segment_size",
                "backup_sites.main.object_storage.storage_class",
                "backup_sites.main.object_storage.addressing_style",
                "backup_sites.main.object_storage.is_verify_tls",
            ]
        );
        let shown = c.ignored_keys()[1].to_string();
        assert_eq!(
            shown,
            "tar_executable: accepted for compatibility and ignored: walhoard reads and writes tar itself"
        );
        // Values that ask for what walhoard does anyway are not reported.
        let c = parse(
            "",
            r#""stream_compression": false,"#,
            r#"{"storage_type": "s3", "bucket_name": "b", "is_verify_tls": true, "encrypted": false}"#,
        )
        .unwrap();
        assert_eq!(c.ignored_keys(), []);
        let c = parse(
            "",
            "",
            r#"{"storage_type": "google", "project_id": "p", "bucket_name": "b"}"#,
        )
        .unwrap();
        assert_eq!(
            c.ignored_keys(),
            [IgnoredSetting {
                path: "backup_sites.main.object_storage.project_id".into(),
                key: IgnoredKey::GoogleProjectId
            }]
        );
    }

    /// Keys whose ignoring would store or connect differently from what was asked are refused.
    #[test]
    fn keys_that_cannot_be_ignored_are_refused_by_path() {
        for (storage, want) in [
            (
                r#"{"storage_type": "swift", "user": "u", "key": "k", "auth_url": "https://ks", "container_name": "c"}"#,
                "t.json: backup_sites.main.object_storage.storage_type: swift is not supported",
            ),
            (
                r#"{"storage_type": "s3", "bucket_name": "b", "proxy_info": {"host": "p", "port": 3128}}"#,
                "t.json: backup_sites.main.object_storage.proxy_info: connecting through a proxy",
            ),
            (
                r#"{"storage_type": "azure", "account_name": "a", "bucket_name": "b", "proxy_info": {"host": "p"}}"#,
                "t.json: backup_sites.main.object_storage.proxy_info: connecting through a proxy",
            ),
            (
                r#"{"storage_type": "google", "bucket_name": "b", "proxy_info": {"host": "p"}}"#,
                "t.json: backup_sites.main.object_storage.proxy_info: connecting through a proxy",
            ),
            (
                r#"{"storage_type": "s3", "bucket_name": "b", "encrypted": true}"#,
                "t.json: backup_sites.main.object_storage.encrypted: S3 server-side encryption",
            ),
        ] {
            let e = parse("", "", storage).unwrap_err();
            assert!(e.starts_with(want), "{storage}: {e}");
        }
    }
}
