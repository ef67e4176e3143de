//! Running `walhoard daemon` (the real binary) against a real cluster, and reading back what it
//! archived.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use walhoard::config::ObjectStorageConfig;
use walhoard::pipeline::encryption::{generate_key_pair, KeyRing, PrivateKey};
use walhoard::pipeline::transfer::download_file;
use walhoard::storage::ObjectStore;
use walhoard_protocol::{Lsn, SegmentSize, WalSegmentName};
use walhoard_testkit::PgCluster;

use crate::common::wait_until;

/// A daemon's files: configuration, spool, state, alerts, and (for local storage) the archive.
pub struct DaemonDir {
    pub dir: tempfile::TempDir,
    pub http_port: u16,
    pub public: String,
    pub private: String,
}

impl DaemonDir {
    pub fn new() -> DaemonDir {
        let (public, private) = generate_key_pair(2048).unwrap();
        DaemonDir {
            dir: tempfile::Builder::new()
                .prefix("walhoard-daemon-")
                .tempdir()
                .unwrap(),
            http_port: std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
            public,
            private,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("walhoard.json")
    }

    pub fn alert_dir(&self) -> PathBuf {
        self.path("alerts")
    }

    /// The `object_storage` of bucket `bucket` on an s3s-fs server listening on `port`.
    pub fn s3_storage(port: u16, bucket: &str) -> Value {
        json!({
            "storage_type": "s3", "region": "us-east-1", "bucket_name": bucket,
            "host": "127.0.0.1", "port": port, "is_secure": false,
            "aws_access_key_id": walhoard_testkit::s3::ACCESS_KEY,
            "aws_secret_access_key": walhoard_testkit::s3::SECRET_KEY,
        })
    }

    pub fn local_storage(&self) -> Value {
        json!({"storage_type": "local", "directory": self.path("archive")})
    }

    /// A configuration with one site `main` streaming from `pg` over its socket (zstd level 1,
    /// encrypted), `site` merged into the site object.
    pub fn write_config(&self, pg: &PgCluster, storage: Value, site: Value) {
        let mut s = json!({
            "nodes": [{"host": pg.socket_dir(), "port": pg.port, "user": "postgres", "slot": "walhoard"}],
            "object_storage": storage,
            "encryption_key_id": "k1",
            "encryption_keys": {"k1": {"public": self.public, "private": self.private}},
            // Basebackups only where a test asks for them.
            "basebackup_interval_hours": null,
        });
        merge(&mut s, site);
        let mut config = self.config_for(json!({"main": s}));
        merge(
            &mut config,
            json!({
                "maintenance_mode_file": self.path("maintenance_mode_file"),
                "compression": {"algorithm": "zstd", "level": 1},
                "transfer": {"thread_count": 2, "retry_max_backoff_seconds": 1.0},
            }),
        );
        self.write_json_config(&config);
    }

    /// A configuration with this directory's spool, state file, alert directory and HTTP
    /// port, and `sites` as its `backup_sites`: nothing else of walhoard's own settings.
    pub fn config_for(&self, sites: Value) -> Value {
        json!({
            "backup_location": self.path("spool"),
            "json_state_file_path": self.path("state.json"),
            "alert_file_dir": self.alert_dir(),
            "http_port": self.http_port,
            "backup_sites": sites,
        })
    }

    /// Writes `config` as the configuration file.
    pub fn write_json_config(&self, config: &Value) {
        std::fs::write(
            self.config_path(),
            serde_json::to_vec_pretty(config).unwrap(),
        )
        .unwrap();
    }

    /// Writes [`DaemonDir::config_for`] `sites`, readable by the server's OS user (who runs
    /// restore_command).
    pub fn write_sites(&self, sites: Value) {
        self.write_json_config(&self.config_for(sites));
        crate::restore::readable_by_server(self);
    }

    /// Waits until a daemon answers on the HTTP port.
    pub fn wait_http(&self) {
        assert!(
            crate::common::wait_until(Duration::from_secs(30), || {
                std::net::TcpStream::connect(("127.0.0.1", self.http_port)).is_ok()
            }),
            "no daemon listens on port {}",
            self.http_port
        );
    }

    pub fn state(&self) -> Option<Value> {
        let text = std::fs::read(self.path("state.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn ring(&self) -> KeyRing {
        let mut ring = KeyRing::default();
        ring.insert("k1", PrivateKey::from_pem(&self.private).unwrap());
        ring
    }

    /// The store the site archives into.
    pub fn store(&self, storage: &Value) -> ObjectStore {
        let cfg: ObjectStorageConfig = serde_json::from_value(storage.clone()).unwrap();
        ObjectStore::open(&cfg, "main").unwrap()
    }
}

/// A daemon streaming a cluster's WAL into local storage with `DaemonDir::write_config`'s
/// site settings (and what a test adds), started.
pub struct LocalDaemon {
    pub d: DaemonDir,
    pub daemon: Daemon,
    pub store: ObjectStore,
}

impl LocalDaemon {
    /// Started with `site` merged into the site's settings.
    pub fn with_site(pg: &PgCluster, site: Value) -> LocalDaemon {
        let d = DaemonDir::new();
        let storage = d.local_storage();
        d.write_config(pg, storage.clone(), site);
        let daemon = Daemon::start(&d);
        let store = d.store(&storage);
        LocalDaemon { d, daemon, store }
    }

    /// Starts one and waits until it created its slot: its directory, the daemon, the
    /// archive and the segment the slot starts in.
    pub fn streaming(pg: &PgCluster) -> (DaemonDir, Daemon, ObjectStore, String) {
        LocalDaemon::streaming_with(pg, json!({}))
    }

    /// [`LocalDaemon::streaming`] with `site` merged into the site's settings.
    pub fn streaming_with(pg: &PgCluster, site: Value) -> (DaemonDir, Daemon, ObjectStore, String) {
        let LocalDaemon { d, daemon, store } = LocalDaemon::with_site(pg, site);
        let first = wait_slot(pg, &daemon);
        (d, daemon, store, first)
    }
}

/// Sets `extra`'s keys in the object `base` (a shallow merge).
pub fn merge(base: &mut Value, extra: Value) {
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
}

/// A running `walhoard daemon`; killed on drop.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(d: &DaemonDir) -> Daemon {
        let log = d.path("daemon.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_walhoard"))
            .args(["daemon", "--config"])
            .arg(d.config_path())
            .env("WALHOARD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn walhoard daemon");
        Daemon {
            child: Some(child),
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; the exit status.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        self.signal("TERM");
        let mut c = self.child.take()?;
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Segment objects in the archive: name → size.
/// Runs `walhoard check` on `config`, asserts that it fails and that one of its FAIL lines
/// satisfies `line`; returns what it printed.
pub fn check_fails_with(config: &Path, line: impl Fn(&str) -> bool) -> String {
    let (ok, text) = run_check(config);
    assert!(!ok, "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("FAIL") && line(l)),
        "{text}"
    );
    text
}

/// Runs `walhoard check` and asserts that one of its `ok` lines satisfies `line` (whatever
/// the other checks say); returns its output.
pub fn check_passes_with(config: &Path, line: impl Fn(&str) -> bool) -> String {
    let (_, text) = run_check(config);
    assert!(
        text.lines().any(|l| l.starts_with("ok") && line(l)),
        "{text}"
    );
    text
}

/// `walhoard check --config <config>`: whether it succeeded, and its output.
fn run_check(config: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_walhoard"))
        .args(["check", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

pub async fn archived_segments(store: &ObjectStore) -> BTreeMap<String, u64> {
    store
        .list("xlog")
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.key.trim_start_matches("xlog/").to_string(), o.size))
        .collect()
}

/// Whether the archive holds `name` (a segment, `.partial` or history file).
pub async fn has(store: &ObjectStore, name: &str) -> bool {
    let key = match name.parse::<WalSegmentName>() {
        Ok(n @ WalSegmentName::History(_)) => format!("timeline/{n}"),
        _ => format!("xlog/{name}"),
    };
    store.stat(&key).await.unwrap().is_some()
}

/// Waits until the archive holds `name`.
pub async fn wait_archived(store: &ObjectStore, name: &str, limit: Duration, daemon: &Daemon) {
    let deadline = std::time::Instant::now() + limit;
    while !has(store, name).await {
        assert!(
            std::time::Instant::now() < deadline,
            "{name} not archived within {limit:?}; daemon log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the archive holds every one of `names` (uploads finish in any order).
pub async fn wait_all_archived(
    store: &ObjectStore,
    names: &[String],
    limit: Duration,
    daemon: &Daemon,
) {
    for n in names {
        wait_archived(store, n, limit, daemon).await;
    }
}

/// Downloads (decrypts, decompresses, verifies) an archived WAL file into `dir`.
pub async fn restore(store: &ObjectStore, ring: &KeyRing, key: &str, dir: &Path) -> PathBuf {
    let name = key.rsplit('/').next().unwrap();
    let out = dir.join(name);
    download_file(store, key, &out, ring)
        .await
        .unwrap_or_else(|e| panic!("restore {key}: {e}"));
    out
}

pub fn slot_restart(pg: &PgCluster) -> Option<Lsn> {
    let v = pg
        .psql("select restart_lsn from pg_replication_slots where slot_name = 'walhoard'")
        .unwrap();
    v.trim().parse().ok()
}

/// Switches to a new segment and returns the name of the one just finished. Writes first:
/// with no WAL since the last switch, pg_switch_wal() does nothing and returns a position in
/// the segment still being written.
pub fn switch_segment(pg: &PgCluster) -> String {
    pg.psql("create table if not exists switch_marker (at timestamptz); insert into switch_marker values (now())")
        .unwrap();
    pg.psql("select pg_walfile_name(pg_switch_wal())")
        .unwrap()
        .trim()
        .to_string()
}

/// Generates WAL with small transactions (records that straddle page and segment edges)
/// and a bulk insert.
pub fn load(pg: &PgCluster, bulk_rows: u32, small_txns: u32) {
    pg.psql(&format!(
        "create table if not exists t (g int, pad text); insert into t select g, repeat(md5(g::text), 8) from generate_series(1, {bulk_rows}) g"
    ))
    .unwrap();
    if small_txns > 0 {
        pg.psql(&format!(
            "do $$ begin for i in 1..{small_txns} loop insert into t values (i, repeat('y', (i * 37) % 3000)); commit; end loop; end $$"
        ))
        .unwrap();
    }
}

/// The end of the contiguous run of archived segments on `tli` starting at `first`.
pub async fn contiguous_end(store: &ObjectStore, first: &str, seg: SegmentSize) -> Lsn {
    let mut id = match first.parse::<WalSegmentName>().unwrap() {
        WalSegmentName::Segment(id) => id,
        other => panic!("{other} is not a segment"),
    };
    loop {
        if !has(store, &id.to_string()).await {
            return id.start_lsn(seg).unwrap();
        }
        id = id.next(seg).unwrap();
    }
}

pub fn slot_segment(pg: &PgCluster) -> String {
    pg.psql("select pg_walfile_name(restart_lsn) from pg_replication_slots where slot_name = 'walhoard'")
        .unwrap()
        .trim()
        .to_string()
}

/// Waits until the daemon created its slot and returns the segment it starts in.
pub fn wait_slot(pg: &PgCluster, daemon: &Daemon) -> String {
    assert!(
        wait_until(Duration::from_secs(30), || slot_restart(pg).is_some()),
        "slot not created; log:\n{}",
        daemon.log_text()
    );
    slot_segment(pg)
}

/// `walhoard basebackup --site main --config <config>`.
pub fn basebackup_command(d: &DaemonDir) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_walhoard"));
    c.args(["basebackup", "--site", "main", "--config"])
        .arg(d.config_path());
    c
}
