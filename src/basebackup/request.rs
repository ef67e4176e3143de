//! A basebackup taken now for a command (`walhoard basebackup`, `archive-sync
//! --create-new-backup-on-failure`): asked of the running daemon when one listens on the
//! configured HTTP address (`PUT /<site>/basebackup`, so a site never has two backups running
//! at once and the daemon's retention follows), else taken by this process.

use anyhow::Result;

use crate::config::Config;

/// Returns the new backup's name once it is stored and listed.
pub async fn request_or_take(config: &Config, site: &str) -> Result<String> {
    if !config.backup_sites.contains_key(site) {
        anyhow::bail!("no backup site {site:?} in the configuration");
    }
    let (host, port) = (config.http_address.as_str(), config.http_port);
    if tokio::net::TcpStream::connect((host, port)).await.is_ok() {
        // The daemon's webserver_username/webserver_password, when it asks for them.
        let headers: Vec<_> = crate::api_client::Credentials::from_config(config)
            .map(|c| c.header())
            .into_iter()
            .collect();
        let (status, body) = crate::api_client::request(
            host,
            port,
            hyper::Method::PUT,
            &format!("/{site}/basebackup"),
            &headers,
        )
        .await?;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        return match v["basebackup"].as_str() {
            Some(name) if status == hyper::StatusCode::CREATED => Ok(name.to_string()),
            _ => anyhow::bail!(
                "the daemon at {host}:{port} could not take the backup ({status}): {}",
                v["error"].as_str().unwrap_or(&body)
            ),
        };
    }
    eprintln!("walhoard: no daemon listens on {host}:{port}; taking the backup here");
    Ok(super::take(config, site).await?.name)
}
