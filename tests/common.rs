//! Helpers shared by the integration tests.

use std::time::{Duration, Instant};

use walhoard_protocol::ConnectParams;
use walhoard_testkit::PgCluster;

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

/// Runs a shell command, panicking with its output on failure.
pub fn sh(cmd: &str) -> String {
    let out = std::process::Command::new("bash")
        .args(["-c", cmd])
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "{cmd} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates tablespace `name` in a fresh directory of the cluster's scratch space; returns it.
pub fn create_tablespace(pg: &PgCluster, name: &str) -> std::path::PathBuf {
    let dir = pg.scratch_dir(name).expect("tablespace directory");
    pg.psql(&format!(
        "create tablespace {name} location '{}'",
        dir.display()
    ))
    .expect("create tablespace");
    dir
}

/// `walhoard restore list-basebackups --site main --json --config <config>`, which must
/// succeed: the listing.
pub fn list_basebackups(config: &std::path::Path) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walhoard"))
        .args(["restore", "list-basebackups", "--site", "main", "--json"])
        .arg("--config")
        .arg(config)
        .output()
        .expect("run walhoard");
    assert!(
        out.status.success(),
        "list-basebackups: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON listing")
}
