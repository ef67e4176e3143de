//! walhoard as a library: the binary (`src/main.rs`) is a thin command line over this.
//!
//! - [`basebackup`]: taking a basebackup into a site's archive (basic/pipe and local-tar).
//! - [`config`]: the pghoard.json-compatible configuration file.
//! - [`pipeline`]: hashing, compression and encryption of archive objects, and the transfer
//!   to and from storage; byte-compatible with pghoard.
//! - [`storage`]: object storage over OpenDAL, with retries and alert files.
//! - [`daemon`]: `walhoard daemon`, streaming every site's WAL into its archive.
//! - [`durable`]: files replaced atomically and renames that survive a crash (the bottom).
//! - [`http`]: the daemon's HTTP API (status, archive_command, restore_command); its client
//!   side, for the commands that talk to a daemon, is [`api_client`].
//! - [`metrics`]: pghoard's metrics (and walhoard's own) for Prometheus, statsd and a
//!   Pushgateway.
//! - [`restore`]: listing and restoring basebackups, and the restore_command.
//! - [`archive_sync`], [`archive_cleanup`], [`preservation`]: pghoard's archive-sync,
//!   archive-cleanup and backup preservation requests.

pub mod api_client;
pub mod archive_cleanup;
pub mod archive_sync;
pub mod basebackup;
pub mod check;
pub mod config;
pub mod daemon;
pub mod durable;
pub mod http;
pub mod info;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod postgres_command;
pub mod preservation;
pub mod restore;
pub mod server;
pub mod settings;
pub mod storage;
pub mod verify;
