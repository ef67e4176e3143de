//! Integration tests against real PostgreSQL servers started per test (see walhoard-testkit).
//! Run the protocol ones against another major with `WALHOARD_PG_VERSION=13 cargo test --test tests protocol_`.

mod archive_cleanup;
mod archive_sync;
mod basebackup;
mod cli;
mod common;
mod daemon;
mod daemon_stream;
mod daemon_support;
mod foreign_archive;
mod http_api;
mod pghoa1;
mod pghoard_cli;
mod pghoard_restore;
mod pghoard_rollback;
mod pghoard_switch;
mod protocol_auth;
mod protocol_basebackup;
mod protocol_faults;
mod protocol_replication;
mod protocol_tls;
mod restore;
mod restore_command;
mod restore_forged;
mod retention;
mod storage;
mod storage_azure;
mod storage_gcs;
mod storage_outage;
mod storage_sftp;
mod transfer;
mod walreceiver;
