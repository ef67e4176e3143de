//! The sites of a running daemon as the HTTP API and the state file read them: a registry the
//! daemon fills and replaces on reload, below both.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::settings::SiteSettings;

use super::archiver::UploadContext;
use super::basebackups;
use super::status::{DaemonState, SiteState, SiteStatus};

/// The sites of a running daemon, as the HTTP API and the state file see them.
#[derive(Clone, Default)]
pub struct Sites {
    pub by_name: BTreeMap<String, SiteHandle>,
}

/// What the rest of the daemon can reach of a site.
#[derive(Clone)]
pub struct SiteHandle {
    pub settings: Arc<SiteSettings>,
    pub upload: Arc<UploadContext>,
    pub status: Arc<SiteStatus>,
    pub basebackup: Arc<basebackups::BasebackupStatus>,
    /// Asks the site's backup task for a backup now; `None` when the site cannot take any
    /// (no node to connect to).
    pub backup_requests: Option<tokio::sync::mpsc::Sender<basebackups::BackupRequest>>,
    /// The site's `moved_from` sites, searched for WAL after it by the restore_command API.
    pub older: Vec<crate::restore::OlderSite>,
}

/// The daemon's state, as the state file and `GET /status` show it.
pub fn daemon_state(sites: &Sites, startup_time: f64) -> DaemonState {
    DaemonState {
        startup_time,
        pid: std::process::id(),
        backup_sites: sites
            .by_name
            .iter()
            .map(|(n, s)| {
                (
                    n.clone(),
                    SiteState {
                        walreceiver: s.status.snapshot(),
                        basebackup: s.basebackup.snapshot(),
                    },
                )
            })
            .collect(),
    }
}
