//! pghoard's keys that are not about storage or streaming: `log_level` and the syslog keys
//! (records on a unix datagram socket the test binds, as a syslog daemon's /dev/log), and the
//! warning for keys accepted for compatibility and ignored (daemon and `check`).

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::wait_until;

/// An `archive_command` site on local storage (nothing to stream from: the daemon starts
/// without a server), `extra` merged into the top level.
fn write_config(dir: &Path, http_port: u16, extra: Value) -> std::path::PathBuf {
    let mut config = json!({
        "backup_location": dir.join("spool"),
        "json_state_file_path": dir.join("state.json"),
        "alert_file_dir": dir.join("alerts"),
        "maintenance_mode_file": dir.join("maintenance_mode_file"),
        "http_port": http_port,
        "backup_sites": {"main": {
            "active_backup_mode": "archive_command",
            "basebackup_interval_hours": null,
            "object_storage": {"storage_type": "local", "directory": dir.join("archive")},
        }},
    });
    if let (Some(base), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    let path = dir.join("walhoard.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the daemon when a test fails half-way.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `walhoard daemon` with the configuration's own log level (no WALHOARD_LOG).
fn spawn_daemon(config: &Path) -> Running {
    let child = Command::new(env!("CARGO_BIN_EXE_walhoard"))
        .args(["daemon", "--config"])
        .arg(config)
        .env_remove("WALHOARD_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn walhoard daemon");
    Running(child)
}

/// Records received until one contains `until` (or `limit` passes): the whole datagrams.
fn receive_until(sock: &UnixDatagram, until: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let record = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = record.contains(until);
                got.push(record);
                if done {
                    return got;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
    panic!("no record containing {until:?} within {limit:?}; got {got:#?}");
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status();
}

/// pghoard's `syslog`, `syslog_address`, `syslog_facility` and `log_level`: the daemon's
/// records reach the socket as Python's SysLogHandler frames them (`<PRI>...\0`, PRI =
/// facility * 8 + severity), filtered by `log_level`; a reload applies new values.
#[test]
fn config_keys_syslog_receives_daemon_records_with_facility_and_level() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("dev-log");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_nonblocking(true).unwrap();
    let port = free_port();
    let keys = |facility: &str, level: &str| {
        json!({"syslog": true, "syslog_address": sock_path, "syslog_facility": facility,
               "log_level": level, "tar_executable": "pghoard_gnutaremu"})
    };
    let config = write_config(dir.path(), port, keys("local5", "INFO"));
    let mut running = spawn_daemon(&config);
    let child = &mut running.0;
    let tag = format!("walhoard[{}]: ", child.id());
    let got = receive_until(&sock, "walhoard daemon started", Duration::from_secs(30));
    // local5 = 21: warning 21*8+4, info 21*8+6.
    let warning = format!("<172>{tag}WARN ");
    assert!(
        got.iter().any(|r| r.starts_with(&warning)
            && r.contains("tar_executable: accepted for compatibility and ignored")
            && r.ends_with('\0')),
        "{got:#?}"
    );
    let started = got.last().unwrap();
    assert!(
        started.starts_with(&format!("<174>{tag}INFO ")) && started.ends_with('\0'),
        "{started:?}"
    );
    assert_eq!(started.matches('\0').count(), 1, "one record per datagram");

    // Reload with facility daemon (3) and level WARNING: the ignored-key warning comes again,
    // now as <28>, and the info records of the shutdown are filtered out.
    write_config(dir.path(), port, keys("daemon", "WARNING"));
    signal(child, "HUP");
    let got = receive_until(&sock, "<28>", Duration::from_secs(30));
    assert!(
        got.last().unwrap().starts_with(&format!("<28>{tag}WARN "))
            && got.last().unwrap().contains("tar_executable"),
        "{got:#?}"
    );
    signal(child, "TERM");
    assert!(
        wait_until(Duration::from_secs(30), || matches!(
            child.try_wait(),
            Ok(Some(_))
        )),
        "daemon did not stop"
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    // stderr follows the same level: info before the reload, none after it.
    assert!(
        stderr.contains("walhoard daemon started")
            && !stderr.contains("stopping: draining uploads"),
        "{stderr}"
    );
    let mut rest = Vec::new();
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = sock.recv(&mut buf) {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        rest.iter().all(|r| !r.contains("stopping")),
        "info records after log_level WARNING: {rest:#?}"
    );
}

/// A syslog address nothing listens on stops the daemon at start with the key named.
#[test]
fn config_keys_unreachable_syslog_address_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-socket");
    let config = write_config(
        dir.path(),
        free_port(),
        json!({"syslog": true, "syslog_address": missing}),
    );
    let mut running = spawn_daemon(&config);
    let child = &mut running.0;
    let mut status = None;
    wait_until(Duration::from_secs(30), || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    let mut stderr = String::new();
    if status.is_some() {
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    }
    assert!(
        status.is_some_and(|s| !s.success()),
        "the daemon did not fail at start: {status:?} {stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "syslog_address {}: cannot connect",
            missing.display()
        )),
        "{stderr}"
    );
}

/// `check` prints the same accepted-and-ignored list as the daemon.
#[test]
fn config_keys_check_warns_about_ignored_keys() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        free_port(),
        json!({"tar_executable": "pghoard_gnutaremu"}),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_walhoard"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "walhoard: warning: tar_executable: accepted for compatibility and ignored: walhoard reads and writes tar itself"
        ),
        "{stderr}"
    );
}
