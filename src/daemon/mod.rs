//! `walhoard daemon`: streams every active site's WAL into its archive, writes the state file,
//! serves the HTTP API, drains and exits on SIGTERM/SIGINT and reloads its configuration on
//! SIGHUP.
//!
//! Every long-lived task observes one cancellation token; on shutdown receiving stops first
//! (the last status update tells the server what the archive holds), then running uploads get
//! `graceful_shutdown_upload_timeout` (default [`archiver::DRAIN_TIMEOUT`]) to finish. Whatever is not archived by then stays in the spool
//! and the slot, and the next start archives it first.

pub mod archiver;
pub mod basebackups;
pub mod chains;
pub mod delta_retention;
pub mod identity;
mod lag;
mod memory;
mod own_thread;
pub mod partial;
mod resume;
pub mod site;
pub mod sites;
pub mod slots;
pub mod status;
pub mod systemd;
pub mod upload;
pub mod wal_retention;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{BackupMode, Config};
use crate::settings::{hostname, transfer_threads, SiteSettings};
use crate::storage::meta::ObjectMeta;

use archiver::UploadContext;
use slots::UploadSlots;
use walhoard_walreceiver::BufferBudget;

pub use sites::{daemon_state, SiteHandle, Sites};
use status::{now_secs, Alerts, SiteStatus};

/// Opens a site's store and gathers what its uploads need.
pub fn upload_context(site: &SiteSettings, slots: UploadSlots) -> Result<UploadContext> {
    let store = site.open_store()?;
    let base_metadata = ObjectMeta {
        host: Some(hostname()),
        ..ObjectMeta::default()
    };
    Ok(UploadContext {
        site: site.name.clone(),
        store,
        compression: site.compression,
        encryption: site.encryption()?,
        hash_algorithm: site.hash_algorithm,
        retry: site.retry.clone(),
        upload_slots: slots,
        base_metadata,
        system_id: Default::default(),
    })
}

/// One configuration's worth of running sites.
struct Generation {
    /// How long `shutdown` lets running uploads finish (`graceful_shutdown_upload_timeout`).
    drain: Duration,
    stop: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
    sites: Sites,
}

impl Generation {
    fn start(config: &Config) -> Result<Generation> {
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        let tracker = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(transfer_threads(config)));
        // One budget for the complete segments every site holds in memory
        // (`wal_buffer_memory_mib`), shared fairly (`walreceiver::buffers`).
        let buffers = BufferBudget::new(config.wal_buffer_bytes());
        crate::pipeline::cpu::configure(
            config
                .compression
                .thread_count
                .map_or_else(crate::pipeline::cpu::default_threads, |n| n as usize),
        );
        let alerts = Alerts {
            dir: config.alert_dir(),
        };
        std::fs::create_dir_all(&alerts.dir)
            .with_context(|| format!("alert_file_dir {}", alerts.dir.display()))?;
        let mut sites = Sites::default();
        let mut runs = Vec::new();
        let all = SiteSettings::all(config)?;
        let active_sites = all.values().filter(|s| s.config.active).count();
        for (name, settings) in &all {
            let site = &settings.config;
            if !site.active {
                tracing::info!(site = %name, "site inactive; skipped");
                continue;
            }
            let settings = Arc::new(settings.clone());
            let upload = Arc::new(upload_context(
                &settings,
                UploadSlots::for_site(&slots, active_sites),
            )?);
            let (backup_tx, backup_rx) = if site.nodes.is_empty() {
                (None, None)
            } else {
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                (Some(tx), Some(rx))
            };
            let status = match site.active_backup_mode {
                BackupMode::Walreceiver => {
                    let mut wal = site::SiteWal::new(
                        &settings,
                        upload.clone(),
                        alerts.clone(),
                        // Every running upload, the one waiting for a slot and the one being
                        // received: segments past that wait in the spool, not in memory, and
                        // so do segments past the site's share of the budget.
                        buffers.site(transfer_threads(config) + 2),
                    )?;
                    if site.basebackup_on_wal_gap {
                        wal.gap_backups = backup_tx.clone();
                    }
                    let status = wal.status.clone();
                    runs.push(wal);
                    status
                }
                // WAL arrives through archive_command (the HTTP API) or with the backups.
                BackupMode::ArchiveCommand | BackupMode::StandaloneHotBackup => {
                    Arc::new(SiteStatus::default())
                }
            };
            let basebackup = Arc::new(basebackups::BasebackupStatus::default());
            if let Some(rx) = backup_rx {
                tracker.spawn(basebackups::run(
                    settings.clone(),
                    config.maintenance_mode_file.clone(),
                    basebackup.clone(),
                    rx,
                    stop.clone(),
                ));
            }
            let backup_requests = backup_tx;
            // Opened now, so that a `moved_from` site the API cannot read fails the start
            // rather than answering "not found" for WAL it holds.
            let older = crate::restore::older_sites(name, &site.moved_from, |o| Ok(all.get(o)))?;
            sites.by_name.insert(
                name.clone(),
                SiteHandle {
                    settings,
                    upload,
                    status,
                    basebackup,
                    backup_requests,
                    older,
                },
            );
        }
        // Buffers a burst needed go back to the system once they are idle.
        tracker.spawn(memory::give_back_idle(buffers.clone(), stop.clone()));
        for wal in runs {
            let name = wal.name.clone();
            let (stop, abort, t) = (stop.clone(), abort.clone(), tracker.clone());
            tracker.spawn(async move {
                if let Err(e) = wal.run(stop, abort, t).await {
                    crate::metrics::exception("SiteError", "site_run");
                    tracing::error!(site = %name, error = format!("{e:#}"), "site stopped");
                }
            });
        }
        Ok(Generation {
            drain: config
                .graceful_shutdown_upload_timeout
                .map_or(archiver::DRAIN_TIMEOUT, Duration::from_secs_f64),
            stop,
            abort,
            tracker,
            sites,
        })
    }

    /// Stops receiving, lets uploads finish for up to the drain timeout, then aborts them.
    async fn shutdown(self) {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(self.drain, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "uploads still running after the drain timeout ({:?}, graceful_shutdown_upload_timeout); they stay in the spool for the next start",
                self.drain
            );
            self.abort.cancel();
            self.tracker.wait().await;
        }
    }
}

fn state_json(sites: &Sites, startup_time: f64) -> Vec<u8> {
    serde_json::to_vec_pretty(&daemon_state(sites, startup_time)).unwrap_or_default()
}

/// Keys of the file that change nothing here: said at start and on each reload
/// (`config/ignored.rs`), so an operator does not rely on them.
fn warn_ignored_keys(config: &Config) {
    for ignored in config.ignored_keys() {
        tracing::warn!("{ignored}");
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config_path: &Path) -> Result<()> {
    let mut config = Config::load(config_path)?;
    // Before anything starts: an API open to the network is a configuration error.
    crate::http::auth::check_exposure(&config).map_err(anyhow::Error::msg)?;
    crate::logging::apply(&config)?;
    warn_ignored_keys(&config);
    let startup_time = now_secs();
    let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("install SIGHUP handler")?;
    let mut generation = Generation::start(&config)?;
    let http = crate::http::serve(&config, generation.sites.clone())
        .await
        .with_context(|| format!("HTTP API on {}:{}", config.http_address, config.http_port))?;
    let metrics_stop = CancellationToken::new();
    let metrics_task = crate::metrics::push::Pusher::from_config(&config)?
        .map(|p| tokio::spawn(p.run(http.sites_handle(), metrics_stop.clone())));
    tracing::info!(sites = generation.sites.by_name.len(), http = %http.addr, "walhoard daemon started");
    systemd::notify("READY=1");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_state = Vec::new();
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                match Config::load(config_path) {
                    Err(e) => tracing::error!(error = %e, "configuration reload failed; keeping the running configuration"),
                    Ok(new) => {
                        tracing::info!("reloading configuration");
                        if let Err(e) = crate::logging::apply(&new) {
                            tracing::error!(error = %format!("{e:#}"), "logging settings not applied; keeping the previous ones");
                        }
                        warn_ignored_keys(&new);
                        generation.shutdown().await;
                        config = new;
                        generation = Generation::start(&config)?;
                        http.set_sites(generation.sites.clone());
                    }
                }
            }
            _ = tick.tick() => {
                let state = state_json(&generation.sites, startup_time);
                if state != last_state {
                    if let Err(e) = crate::durable::write_atomic(&config.json_state_file_path, &state) {
                        tracing::warn!(path = %config.json_state_file_path.display(), error = %e, "cannot write the state file");
                    }
                    last_state = state;
                }
            }
        }
    }
    tracing::info!("stopping: draining uploads");
    systemd::notify("STOPPING=1");
    let sites = generation.sites.clone();
    generation.shutdown().await;
    let _ = crate::durable::write_atomic(
        &config.json_state_file_path,
        &state_json(&sites, startup_time),
    );
    http.stop().await;
    metrics_stop.cancel();
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    tracing::info!("walhoard daemon stopped");
    Ok(())
}
