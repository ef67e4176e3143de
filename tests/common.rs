//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use walhoard::storage::retry::RetryPolicy;
use walhoard::storage::ObjectStore;
use walhoard_protocol::{ConnectParams, Lsn};
use walhoard_testkit::PgCluster;

/// `walhoard postgres-command --mode restore --site main --xlog`, the segment name to follow:
/// what PostgreSQL's restore_command runs.
pub const RESTORE_COMMAND: [&str; 6] = [
    "postgres-command",
    "--mode",
    "restore",
    "--site",
    "main",
    "--xlog",
];

/// Connection settings for the cluster's socket as user `postgres`.
pub fn socket_params(pg: &PgCluster) -> ConnectParams {
    ConnectParams::parse(&pg.socket_conninfo("postgres")).expect("socket conninfo")
}

/// Polls `f` until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Runs `cmd`, panicking with `what` and its output unless it succeeds.
pub fn output_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a shell command, panicking with its output on failure.
pub fn sh(cmd: &str) -> String {
    let out = output_ok(Command::new("bash").args(["-c", cmd]), cmd);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The one value the query `sql` returns, as text.
pub fn query(pg: &PgCluster, sql: &str) -> String {
    let out = pg.psql(sql).unwrap_or_else(|e| panic!("{sql}: {e:#}"));
    out.trim().to_string()
}

/// An LSN the query `sql` returns.
pub fn psql_lsn(pg: &PgCluster, sql: &str) -> Lsn {
    query(pg, sql).parse().unwrap()
}

/// The cluster's system identifier (pg_control).
pub fn system_identifier(pg: &PgCluster) -> u64 {
    let sql = "select system_identifier from pg_control_system()";
    query(pg, sql).parse().unwrap()
}

/// A replication connection to the cluster's socket as user `postgres`.
pub async fn replication_client(pg: &PgCluster) -> walhoard_protocol::ReplicationClient {
    let params = socket_params(pg);
    walhoard_protocol::ReplicationClient::connect(&params)
        .await
        .unwrap()
}

/// The server's current WAL write position.
pub fn current_lsn(pg: &PgCluster) -> Lsn {
    psql_lsn(pg, "select pg_current_wal_lsn()")
}

/// The keys of the objects under `prefix`, in listing order.
pub async fn keys(store: &ObjectStore, prefix: &str) -> Vec<String> {
    let objects = store.list(prefix).await.unwrap();
    objects.into_iter().map(|o| o.key).collect()
}

/// A retry policy that warns (into `alert_dir`) after three quick attempts and never gives
/// up: an outage test sees the alert within a second.
pub fn alerting_retry_policy(alert_dir: &Path) -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(400),
        warning_limit: 3,
        alert_dir: Some(alert_dir.to_path_buf()),
        max_attempts: None,
    }
}

/// Creates tablespace `name` in a fresh directory of the cluster's scratch space; returns it.
pub fn create_tablespace(pg: &PgCluster, name: &str) -> PathBuf {
    let dir = pg.scratch_dir(name).expect("tablespace directory");
    let sql = format!("create tablespace {name} location '{}'", dir.display());
    pg.psql(&sql).expect("create tablespace");
    dir
}

/// `walhoard restore list-basebackups --site main --json --config <config>`, which must
/// succeed: the listing.
pub fn list_basebackups(config: &Path) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walhoard"));
    cmd.args(["restore", "list-basebackups", "--site", "main", "--json"])
        .arg("--config")
        .arg(config);
    let out = output_ok(&mut cmd, "list-basebackups");
    serde_json::from_slice(&out.stdout).expect("a JSON listing")
}
