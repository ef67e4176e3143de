//! The replication connection a command opens to ask a server about itself.

use anyhow::{Context, Result};
use walhoard_protocol::SystemIdentity;
use walhoard_protocol::{ConnectParams, ReplicationClient, SegmentSize};

/// Connects to `params` and asks IDENTIFY_SYSTEM and `wal_segment_size`; `purpose` (e.g.
/// "for BASE_BACKUP") completes the connection error's context.
pub async fn identify(
    params: &ConnectParams,
    purpose: &str,
) -> Result<(ReplicationClient, SystemIdentity, SegmentSize)> {
    let mut client = ReplicationClient::connect(params)
        .await
        .with_context(|| format!("connect to {params}{purpose}"))?;
    let id = client.identify_system().await.context("IDENTIFY_SYSTEM")?;
    let seg = client
        .wal_segment_size()
        .await
        .context("SHOW wal_segment_size")?;
    Ok((client, id, seg))
}
