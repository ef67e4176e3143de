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

/// Runs `cmd`, panicking with its stderr unless it exits 0; its output.
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
