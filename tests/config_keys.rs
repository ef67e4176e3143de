//! pghoard's keys that are not about storage or streaming: `log_level` and the syslog keys
//! (records on a unix datagram socket the test binds, as a syslog daemon's /dev/log), and the
//! warning for keys accepted for compatibility and ignored (daemon and `check`).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::wait_until;
use crate::daemon_support::{merge, DaemonDir};

/// An `archive_command` site on local storage (nothing to stream from: the daemon starts
/// without a server), `extra` merged into the top level; the configuration's path.
fn write_config(d: &DaemonDir, extra: Value) -> PathBuf {
    let mut config = d.config_for(json!({"main": {
        "active_backup_mode": "archive_command",
        "basebackup_interval_hours": null,
        "object_storage": d.local_storage(),
    }}));
    merge(
        &mut config,
        json!({"maintenance_mode_file": d.path("maintenance_mode_file")}),
    );
    merge(&mut config, extra);
    d.write_json_config(&config);
    d.config_path()
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
    let d = DaemonDir::new();
    let sock_path = d.path("dev-log");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_nonblocking(true).unwrap();
    let keys = |facility: &str, level: &str| {
        json!({"syslog": true, "syslog_address": sock_path, "syslog_facility": facility,
               "log_level": level, "tar_executable": "pghoard_gnutaremu"})
    };
    let config = write_config(&d, keys("local5", "INFO"));
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
    write_config(&d, keys("daemon", "WARNING"));
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
    let d = DaemonDir::new();
    let missing = d.path("no-such-socket");
    let config = write_config(&d, json!({"syslog": true, "syslog_address": missing}));
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
    let d = DaemonDir::new();
    let config = write_config(&d, json!({"tar_executable": "pghoard_gnutaremu"}));
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

/// The sample configuration the Debian package installs validates with `check --config-only`
/// (which connects to nothing), and a key that does not resolve fails it by key path.
#[test]
fn config_keys_packaged_sample_passes_check_config_only() {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/walhoard.json.example");
    let run = |config: &Path| {
        Command::new(env!("CARGO_BIN_EXE_walhoard"))
            .args(["check", "--config-only", "--config"])
            .arg(config)
            .output()
            .unwrap()
    };
    let out = run(&sample);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("ok   example      configuration"),
        "{stdout}"
    );
    // A public key that is not PEM: the file validates, the site's settings do not resolve.
    let d = DaemonDir::new();
    let mut config: Value = serde_json::from_slice(&std::fs::read(&sample).unwrap()).unwrap();
    merge(
        &mut config["backup_sites"]["example"],
        json!({"encryption_key_id": "k1", "encryption_keys": {"k1": {"public": "not a key"}}}),
    );
    d.write_json_config(&config);
    let out = run(&d.config_path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.starts_with("FAIL example      configuration")
            && stdout.contains("backup_sites.example.encryption_keys.k1"),
        "{stdout}"
    );
}

/// Process-wide keys reach the values the daemon and restore use (`settings.rs`): the
/// upload slots, the retry policy (both spellings of the warning limit, pghoard's top-level
/// one winning), alert files, restore prefetch and get-basebackup's parallel downloads.
#[test]
fn config_keys_process_wide_settings_resolve_from_their_keys() {
    use walhoard::config::Config;
    use walhoard::settings::{retry_policy, transfer_threads, SiteSettings};
    let d = DaemonDir::new();
    std::fs::create_dir_all(d.path("archive")).unwrap();
    let config = write_config(
        &d,
        json!({
            "transfer": {"thread_count": 7, "upload_retries_warning_limit": 9,
                         "retry_max_backoff_seconds": 2.5},
            "restore_prefetch": 11,
            "restore_process_count": 6,
        }),
    );
    let c = Config::load(&config).unwrap();
    assert_eq!(transfer_threads(&c), 7);
    let retry = retry_policy(&c);
    assert_eq!(retry.warning_limit, 9);
    assert_eq!(retry.max_backoff, Duration::from_millis(2500));
    assert_eq!(retry.alert_dir, Some(d.alert_dir()));
    assert_eq!(
        SiteSettings::build(&c, "main").unwrap().restore_prefetch,
        11
    );
    let site = walhoard::restore::RestoreSite::open(&config, Some("main")).unwrap();
    assert_eq!(site.restore_process_count, 6);
    let config = write_config(&d, json!({"upload_retries_warning_limit": 4}));
    assert_eq!(
        retry_policy(&Config::load(&config).unwrap()).warning_limit,
        4
    );
}

/// pghoard's `graceful_shutdown_upload_timeout` bounds how long a stopping daemon waits for
/// uploads that cannot finish (the store is down); the daemon says which bound it used, and
/// still exits cleanly, leaving the WAL in the spool and the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_keys_graceful_shutdown_upload_timeout_bounds_the_drain() {
    use crate::daemon_support::{load, switch_segment, wait_slot, Daemon};
    let pg = walhoard_testkit::PgCluster::builder()
        .setting("wal_keep_size", "'1GB'")
        .start()
        .unwrap();
    let mut s3 = walhoard_testkit::s3::S3Server::start("wal").unwrap();
    let d = DaemonDir::new();
    let storage = json!({
        "storage_type": "s3", "region": "us-east-1", "bucket_name": "wal",
        "host": "127.0.0.1", "port": s3.port, "is_secure": false,
        "aws_access_key_id": walhoard_testkit::s3::ACCESS_KEY,
        "aws_secret_access_key": walhoard_testkit::s3::SECRET_KEY,
    });
    d.write_config(&pg, storage, json!({}));
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(d.config_path()).unwrap()).unwrap();
    merge(
        &mut config,
        json!({"graceful_shutdown_upload_timeout": 1.5}),
    );
    d.write_json_config(&config);
    let mut daemon = Daemon::start(&d);
    wait_slot(&pg, &daemon);
    s3.stop();
    load(&pg, 20_000, 10);
    switch_segment(&pg);
    assert!(
        wait_until(Duration::from_secs(60), || d.state().is_some_and(|s| {
            s["backup_sites"]["main"]["walreceiver"]["upload_queue"]
                .as_u64()
                .is_some_and(|n| n > 0)
        })),
        "no upload waiting for the store: {}",
        daemon.log_text()
    );
    let status = daemon
        .terminate(Duration::from_secs(120))
        .expect("no exit on SIGTERM");
    let log = daemon.log_text();
    assert!(status.success(), "{status:?}: {log}");
    assert!(
        log.contains("uploads still running after the drain timeout (1.5s, graceful_shutdown_upload_timeout)"),
        "{log}"
    );
}
