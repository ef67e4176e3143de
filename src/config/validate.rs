//! What serde cannot check: ranges, references between keys and values a path is built from.
//! Each error names the key path it is about.

use super::{BackupMode, BasebackupMode, Config, ObjectStorageConfig};
use crate::pipeline::compression::CompressionSettings;

/// Why `name` cannot be one component of a path (a directory under backup_location, a key
/// prefix): empty, `.`, `..`, or holding a `/` or NUL.
fn safe_component(name: &str) -> Result<(), &'static str> {
    match name {
        "" => Err("it is empty"),
        "." | ".." => Err("it names a directory relative to its parent"),
        _ if name.contains('/') => Err("it contains '/'"),
        _ if name.contains('\0') => Err("it contains a NUL character"),
        _ => Ok(()),
    }
}

impl Config {
    /// The HTTP API's credentials and the metrics' destinations.
    fn validate_http_and_metrics(&self) -> Result<(), (String, String)> {
        if let Some(i) = self.metrics_push_interval {
            if !(0.1..=3600.0).contains(&i) {
                return Err((
                    "metrics_push_interval".into(),
                    format!("{i} is not between 0.1 and 3600"),
                ));
            }
        }
        if let Some(p) = &self.push_gateway {
            if let Err(e) = crate::metrics::pushgateway::Endpoint::parse(&p.endpoint) {
                return Err(("push_gateway.endpoint".into(), e));
            }
        }
        if self.webserver_username.is_some() != self.webserver_password.is_some() {
            let missing = if self.webserver_username.is_some() {
                "webserver_password"
            } else {
                "webserver_username"
            };
            return Err((
                missing.into(),
                "webserver_username and webserver_password go together; one without the other \
                 would leave the HTTP API open"
                    .into(),
            ));
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        // The codec's range, checked here so that `check` and the daemon refuse the same
        // files (snappy has no levels; a level given for it is ignored, as pghoard does).
        if let Some(level) = self.compression.level {
            let mut c = CompressionSettings::new(self.compression.algorithm);
            c.level = level;
            c.validate()
                .map_err(|e| ("compression.level".to_string(), e))?;
        }
        if let Some(b) = self.transfer.retry_max_backoff_seconds {
            if !(0.1..=3600.0).contains(&b) {
                return Err((
                    "transfer.retry_max_backoff_seconds".into(),
                    format!("{b} is not between 0.1 and 3600"),
                ));
            }
        }
        if let Some(t) = self.graceful_shutdown_upload_timeout {
            if !(0.0..=86400.0).contains(&t) {
                return Err((
                    "graceful_shutdown_upload_timeout".into(),
                    format!("{t} is not between 0 and 86400 seconds"),
                ));
            }
        }
        self.validate_http_and_metrics()?;
        if self.http_restore_concurrency == Some(0) {
            return Err((
                "http_restore_concurrency".into(),
                "must be at least 1 (restore requests would wait forever)".into(),
            ));
        }
        if self.backup_sites.is_empty() {
            return Err(("backup_sites".into(), "no backup site is configured".into()));
        }
        for (name, site) in &self.backup_sites {
            let at = |key: &str| format!("backup_sites.{name}.{key}");
            // The name is a directory under backup_location and, by default, the object
            // key prefix: it must be one ordinary path component.
            if let Err(why) = safe_component(name) {
                return Err((
                    format!("backup_sites.{}", name.escape_debug()),
                    format!("{name:?} cannot be a site name: {why}"),
                ));
            }
            let storage_prefix = match &site.object_storage {
                Some(ObjectStorageConfig::Local { prefix, .. })
                | Some(ObjectStorageConfig::S3 { prefix, .. })
                | Some(ObjectStorageConfig::Google { prefix, .. })
                | Some(ObjectStorageConfig::Azure { prefix, .. })
                | Some(ObjectStorageConfig::Swift { prefix, .. })
                | Some(ObjectStorageConfig::Sftp { prefix, .. }) => prefix.as_deref(),
                None => None,
            };
            for (key, prefix) in [
                ("prefix", site.prefix.as_deref()),
                ("object_storage.prefix", storage_prefix),
            ] {
                let Some(prefix) = prefix else { continue };
                let parts = prefix.split('/').filter(|p| !p.is_empty());
                if let Some(why) = parts.map(safe_component).find_map(Result::err) {
                    return Err((
                        at(key),
                        format!("{prefix:?} is not a safe key prefix: {why}"),
                    ));
                }
            }
            for (i, older) in site.moved_from.iter().enumerate() {
                if older == name || !self.backup_sites.contains_key(older) {
                    return Err((
                        at(&format!("moved_from[{i}]")),
                        format!("{older:?} is not another site of backup_sites"),
                    ));
                }
            }
            super::ignored::refused(name, site)?;
            if site.object_storage.is_none() {
                return Err((
                    at("object_storage"),
                    "missing: where should the archive go?".into(),
                ));
            }
            if site.active_backup_mode == BackupMode::Walreceiver
                && site.active
                && site.nodes.is_empty()
            {
                return Err((
                    at("nodes"),
                    "walreceiver mode needs at least one node to stream from".into(),
                ));
            }
            for (i, node) in site.nodes.iter().enumerate() {
                node.connect_params()
                    .map_err(|e| (at(&format!("nodes[{i}]")), e))?;
            }
            if site.synchronous_archive && site.partial_wal_upload_interval.get().is_none() {
                // Synchronous archiving stores WAL as partial objects as soon as it arrives;
                // an interval of 0 says there must be none. Which one is meant is the
                // operator's call, not a guess of ours.
                return Err((
                    at("synchronous_archive"),
                    format!(
                        "true needs partial WAL objects, but {} is 0 (off): remove that key or set it above 0 (a synchronous site uploads on arrival, whatever the interval)",
                        at("partial_wal_upload_interval")
                    ),
                ));
            }
            if let Some(id) = &site.encryption_key_id {
                match site.encryption_keys.get(id) {
                    None => {
                        return Err((
                            at("encryption_key_id"),
                            format!("key {id:?} is not in encryption_keys"),
                        ))
                    }
                    Some(k) if k.public.is_none() => {
                        return Err((
                            at(&format!("encryption_keys.{id}.public")),
                            "the public key is needed to store backups".into(),
                        ))
                    }
                    Some(_) => {}
                }
            }
            if let Some(h) = site.basebackup_hour {
                if h > 23 {
                    return Err((at("basebackup_hour"), format!("{h} is not an hour (0-23)")));
                }
            }
            if let Some(m) = site.basebackup_minute {
                if m > 59 {
                    return Err((
                        at("basebackup_minute"),
                        format!("{m} is not a minute (0-59)"),
                    ));
                }
            }
            if let Some(h) = site.basebackup_interval_hours {
                if h.is_nan() || h <= 0.0 {
                    return Err((
                        at("basebackup_interval_hours"),
                        format!("{h} must be positive or null"),
                    ));
                }
            }
            if site.basebackup_chunk_size < 1024 * 1024 {
                return Err((at("basebackup_chunk_size"), "must be at least 1 MiB".into()));
            }
            if site.pg_receivexlog.resume_multiplier < 1.0 {
                return Err((
                    at("pg_receivexlog.resume_multiplier"),
                    "must be at least 1".into(),
                ));
            }
            if site.basebackup_mode == BasebackupMode::LocalTarDeltaStats {
                return Err((
                    at("basebackup_mode"),
                    "local-tar-delta-stats is not supported; use delta, local-tar, basic or pipe"
                        .into(),
                ));
            }
            if matches!(
                site.basebackup_mode,
                BasebackupMode::LocalTar | BasebackupMode::Delta
            ) && site.pg_data_directory.is_none()
            {
                return Err((
                    at("pg_data_directory"),
                    "local-tar and delta basebackups read the data directory: set it".into(),
                ));
            }
            if site.basebackup_delta_mode_chunk_size < 1024 * 1024 {
                return Err((
                    at("basebackup_delta_mode_chunk_size"),
                    "must be at least 1 MiB".into(),
                ));
            }
        }
        Ok(())
    }
}
