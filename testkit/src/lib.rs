//! Throw-away real PostgreSQL clusters for integration tests.
//!
//! Each [`PgCluster`] lives in its own temp directory with its own port and socket directory,
//! and is shut down and removed on drop. PostgreSQL refuses to run as root, so when the tests
//! run as root the server runs as the `postgres` OS user (its files are owned by that user).
//!
//! Which PostgreSQL: `WALHOARD_PG_BIN` (a bin directory) if set, else `WALHOARD_PG_VERSION`
//! (13..18) looked up in the cache that `tools/install-pg.sh` fills, else Debian's 15.
//!
//! ```no_run
//! let pg = walhoard_testkit::PgCluster::builder().setting("wal_keep_size", "64MB").start().unwrap();
//! let rows = pg.psql("select 1").unwrap();
//! assert_eq!(rows.trim(), "1");
//! ```

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub mod azure;
pub mod gcs;
pub mod s3;
mod server;
pub mod sftp;

use server::free_port;

/// Debian's PostgreSQL 15, the default server and the source of oracle tools.
pub const DEBIAN_PG15_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Where `tools/install-pg.sh` puts other majors: `$WALHOARD_CACHE/pg/<major>/bin`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WALHOARD_CACHE") {
        return PathBuf::from(d);
    }
    if is_root() {
        PathBuf::from("/var/cache/walhoard")
    } else {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        home.join(".cache").join("walhoard")
    }
}

/// The PostgreSQL bin directory the tests use.
pub fn pg_bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("WALHOARD_PG_BIN") {
        return Ok(PathBuf::from(d));
    }
    match std::env::var("WALHOARD_PG_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
    {
        None => Ok(PathBuf::from(DEBIAN_PG15_BIN)),
        Some(v) => match v.parse() {
            Ok(major) => bin_dir_for_major(major),
            Err(_) => bail!("WALHOARD_PG_VERSION={v:?} is not a major version"),
        },
    }
}

/// The bin directory of an installed major: Debian's 15, else tools/install-pg.sh's.
pub fn bin_dir_for_major(major: u32) -> Result<PathBuf> {
    if major == 15 && Path::new(DEBIAN_PG15_BIN).join("postgres").exists() {
        return Ok(PathBuf::from(DEBIAN_PG15_BIN));
    }
    let d = cache_dir().join("pg").join(major.to_string()).join("bin");
    if !d.join("postgres").exists() {
        bail!(
            "PostgreSQL {major} is not installed at {}; run tools/install-pg.sh {major}",
            d.display()
        );
    }
    Ok(d)
}

/// The major version of `<bin>/postgres` (`postgres (PostgreSQL) 15.18 …`).
fn server_major(bin: &Path) -> Result<u32> {
    let out = Command::new(bin.join("postgres"))
        .arg("--version")
        .output()
        .with_context(|| format!("run {}/postgres --version", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("{}/postgres --version said {text:?}", bin.display()))
}

/// An oracle tool (pg_waldump, pg_verifybackup...): from the server's bin directory when it
/// has it, else Debian's 15.
pub fn tool_path(name: &str) -> Result<PathBuf> {
    let own = pg_bin_dir()?.join(name);
    if own.exists() {
        return Ok(own);
    }
    let deb = Path::new(DEBIAN_PG15_BIN).join(name);
    if deb.exists() {
        return Ok(deb);
    }
    bail!(
        "{name} not found in {} nor {DEBIAN_PG15_BIN}",
        pg_bin_dir()?.display()
    )
}

/// Whether [`tool_path`] finds `name` built for `major` (the npm builds of other majors ship
/// only the server; Debian's oracles are 15's, and pg_waldump reads only its own major's WAL).
pub fn tool_matches_major(name: &str, major: u32) -> bool {
    pg_bin_dir().is_ok_and(|d| d.join(name).exists())
        || (major == 15 && Path::new(DEBIAN_PG15_BIN).join(name).exists())
}

fn is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// uid and gid of the `postgres` OS user, when we are root and must drop to it.
fn server_user() -> Result<Option<(u32, u32)>> {
    if !is_root() {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == "postgres" {
            return Ok(Some((f[2].parse()?, f[3].parse()?)));
        }
    }
    bail!("running as root, but there is no 'postgres' OS user to run PostgreSQL as (apt-get install postgresql-15 creates it)")
}

/// Settings for a cluster to start.
#[derive(Debug, Clone, Default)]
pub struct PgBuilder {
    settings: Vec<(String, String)>,
    hba: Vec<String>,
    initdb_args: Vec<String>,
    files: Vec<(String, Vec<u8>, u32)>,
    link_old_path: bool,
}

impl PgBuilder {
    /// A postgresql.conf setting (value written verbatim, quote strings yourself).
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// A pg_hba.conf line placed before the default trust lines.
    pub fn hba(mut self, line: &str) -> Self {
        self.hba.push(line.into());
        self
    }

    pub fn initdb_arg(mut self, arg: &str) -> Self {
        self.initdb_args.push(arg.into());
        self
    }

    /// [`PgBuilder::start_on`] leaves a symlink at the data directory's old path.
    pub fn link_old_path(mut self) -> Self {
        self.link_old_path = true;
        self
    }

    /// A file placed in the data directory before start, owned by the server user.
    pub fn data_file(mut self, name: &str, content: &[u8], mode: u32) -> Self {
        self.files.push((name.into(), content.to_vec(), mode));
        self
    }

    pub fn start(self) -> Result<PgCluster> {
        PgCluster::init_and_start(self)
    }

    /// Starts a server on an existing data directory (a restored backup), moved into the new
    /// cluster's temp dir (with [`PgBuilder::link_old_path`], a symlink left at its old path)
    /// and handed to the server user. The settings are appended to its
    /// postgresql.conf after the test defaults (port, socket directory); `data_file`s are
    /// written into it (`recovery.signal`...). Does not wait for recovery to finish beyond
    /// the server accepting connections.
    pub fn start_on(self, data: &Path) -> Result<PgCluster> {
        let mut cluster = PgCluster::unstarted()?;
        let owner = cluster.owner;
        let target = cluster.data_dir();
        fs::rename(data, &target)
            .with_context(|| format!("move {} to {}", data.display(), target.display()))?;
        if self.link_old_path {
            // The old path still leads there: a configuration naming it (a daemon's
            // `pg_data_directory`) keeps naming the server's data directory.
            std::os::unix::fs::symlink(&target, data)
                .with_context(|| format!("link {} to {}", data.display(), target.display()))?;
        }
        cluster.major = fs::read_to_string(target.join("PG_VERSION"))?
            .trim()
            .parse()?;
        // A data directory of another major (a fixture written on PostgreSQL 13 or 17) can
        // only start with that major's server.
        if server_major(&cluster.bin)? != cluster.major {
            cluster.bin = bin_dir_for_major(cluster.major)?;
        }
        fs::create_dir_all(cluster.socket_dir())?;
        let header = format!(
            "\n# walhoard restored-cluster settings\nunix_socket_directories = '{}'\n",
            cluster.socket_dir().display()
        );
        append_conf(&target, header, &self.settings)?;
        for (name, content, mode) in &self.files {
            fs::write(target.join(name), content)?;
            fs::set_permissions(target.join(name), fs::Permissions::from_mode(*mode))?;
        }
        fs::set_permissions(&target, fs::Permissions::from_mode(0o700))?;
        chown_tree(cluster.root.path(), owner)?;
        cluster.start_server()?;
        Ok(cluster)
    }
}

/// Appends `header` and then `settings` as `name = value` lines to the data directory's
/// postgresql.conf.
fn append_conf(data: &Path, mut header: String, settings: &[(String, String)]) -> Result<()> {
    for (k, v) in settings {
        header.push_str(&format!("{k} = {v}\n"));
    }
    fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))?
        .write_all(header.as_bytes())?;
    Ok(())
}

/// Hands `path` and everything under it (symlinks not followed) to `owner`.
pub fn chown_tree(path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    let Some((uid, gid)) = owner else {
        return Ok(());
    };
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))?;
    if fs::symlink_metadata(path)?.is_dir() {
        for e in fs::read_dir(path)? {
            chown_tree(&e?.path(), Some((uid, gid)))?;
        }
    }
    Ok(())
}

/// [`chown_tree`] to the user the servers run as (when the tests run as root).
pub fn give_to_server_user(path: &Path) -> Result<()> {
    chown_tree(path, server_user()?)
}

/// A running PostgreSQL cluster owned by a test.
pub struct PgCluster {
    root: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    child: Option<Child>,
    /// Major version of the server (from PG_VERSION).
    pub major: u32,
}

impl PgCluster {
    pub fn builder() -> PgBuilder {
        PgBuilder::default()
    }

    /// A cluster with default test settings.
    pub fn start() -> Result<PgCluster> {
        PgBuilder::default().start()
    }

    fn command(&self, program: &Path) -> Command {
        command_as(program, self.owner)
    }

    /// A cluster with its temporary root and no data directory yet, not running.
    fn unstarted() -> Result<PgCluster> {
        Ok(PgCluster {
            root: tempfile::Builder::new().prefix("walhoard-pg-").tempdir()?,
            port: 0,
            bin: pg_bin_dir()?,
            owner: server_user()?,
            child: None,
            major: 0,
        })
    }

    fn init_and_start(b: PgBuilder) -> Result<PgCluster> {
        let mut cluster = PgCluster::unstarted()?;
        let owner = cluster.owner;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(cluster.root.path(), Some(uid), Some(gid))?;
        }
        let data = cluster.data_dir();
        let out = cluster
            .command(&cluster.bin.join("initdb"))
            .args(["-D".as_ref(), data.as_os_str()])
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .args(&b.initdb_args)
            .output()
            .context("run initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cluster.major = fs::read_to_string(data.join("PG_VERSION"))?
            .trim()
            .parse()?;
        fs::create_dir_all(cluster.socket_dir())?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(cluster.socket_dir(), Some(uid), Some(gid))?;
        }
        let mut conf = String::from(
            "\n# walhoard test settings\nlisten_addresses = '127.0.0.1'\nmax_wal_senders = 10\nmax_replication_slots = 10\n\
             wal_level = replica\nfsync = off\nsynchronous_commit = on\nlogging_collector = off\nlog_min_messages = warning\n",
        );
        conf.push_str(&format!(
            "unix_socket_directories = '{}'\n",
            cluster.socket_dir().display()
        ));
        append_conf(&data, conf, &b.settings)?;
        let mut hba = String::new();
        for line in &b.hba {
            hba.push_str(line);
            hba.push('\n');
        }
        hba.push_str(
            "local all all trust\nlocal replication all trust\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n",
        );
        fs::write(data.join("pg_hba.conf"), hba)?;
        for (name, content, mode) in &b.files {
            cluster.write_owned(&data.join(name), content, *mode)?;
        }
        cluster.start_server()?;
        Ok(cluster)
    }

    /// Writes a file owned by the server's OS user.
    pub fn write_owned(&self, path: &Path, content: &[u8], mode: u32) -> Result<()> {
        fs::write(path, content).with_context(|| format!("write {}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    fn start_server(&mut self) -> Result<()> {
        let mut last_err = anyhow!("not started");
        for _attempt in 0..5 {
            self.port = free_port()?;
            self.spawn_server()?;
            match self.wait_ready(Duration::from_secs(60)) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last_err = e;
                    self.kill();
                    // Port taken by someone else between our probe and the bind: try another.
                    if !self.log().contains("could not bind")
                        && !self.log().contains("could not create")
                    {
                        break;
                    }
                }
            }
        }
        Err(last_err.context(format!("postgres did not start; log:\n{}", self.log())))
    }

    /// Starts the postmaster on `self.port`, appending to the log.
    fn spawn_server(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(self.log_path(), Some(uid), Some(gid))?;
        }
        let mut cmd = self.command(&self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()]);
        self.child = Some(server::spawn_logged(&mut cmd, log, "postgres")?);
        Ok(())
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let pidfile = self.data_dir().join("postmaster.pid");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("postgres exited with {status}");
                }
            }
            // Line 8 of postmaster.pid is the postmaster's status (PM_STATUS_READY).
            if let Ok(pid) = fs::read_to_string(&pidfile) {
                if pid.lines().nth(7).map(str::trim) == Some("ready") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("postgres not ready after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.root.path().join("sock")
    }

    /// A scratch directory inside the cluster's temp dir, owned by the server user.
    pub fn scratch_dir(&self, name: &str) -> Result<PathBuf> {
        let d = self.root.path().join(name);
        fs::create_dir_all(&d)?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&d, Some(uid), Some(gid))?;
        }
        Ok(d)
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("postgres.log")
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// libpq conninfo over the unix socket.
    pub fn socket_conninfo(&self, user: &str) -> String {
        format!(
            "host={} port={} user={user} dbname=postgres sslmode=disable",
            self.socket_dir().display(),
            self.port
        )
    }

    /// libpq conninfo over TCP on 127.0.0.1.
    pub fn tcp_conninfo(&self, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=postgres",
            self.port
        )
    }

    /// Runs SQL through psql over the socket as `postgres`; returns unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let psql = tool_path("psql").or_else(|_| Ok::<_, anyhow::Error>(PathBuf::from("psql")))?;
        let out = Command::new(psql)
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.socket_dir())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .output()
            .context("run psql")?;
        if !out.status.success() {
            bail!(
                "psql {sql:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Runs a PostgreSQL tool (oracle) and returns its stdout; fails on non-zero exit.
    pub fn run_tool(&self, name: &str, args: &[&std::ffi::OsStr]) -> Result<String> {
        server::run(Command::new(tool_path(name)?).args(args))
    }

    /// Re-reads configuration files (pg_hba.conf, postgresql.conf) like `pg_ctl reload`.
    pub fn reload(&self) -> Result<()> {
        self.psql("select pg_reload_conf()").map(|_| ())
    }

    /// Appends a postgresql.conf line and restarts the server (same port).
    pub fn restart_with(&mut self, setting: Option<(&str, &str)>) -> Result<()> {
        if let Some((k, v)) = setting {
            fs::OpenOptions::new()
                .append(true)
                .open(self.data_dir().join("postgresql.conf"))?
                .write_all(format!("{k} = {v}\n").as_bytes())?;
        }
        self.stop()?;
        self.spawn_server()?;
        self.wait_ready(Duration::from_secs(60))
    }

    /// Starts a new timeline: restarts this cluster as a standby (standby.signal) and promotes
    /// it, waiting until it accepts writes. Slots and data are kept.
    pub fn promote_to_new_timeline(&mut self) -> Result<()> {
        self.stop()?;
        self.write_owned(&self.data_dir().join("standby.signal"), b"", 0o600)?;
        self.restart_with(None)?;
        // pg_promote(wait => true) returns once the promotion is complete.
        let promoted = self.psql("select pg_promote(true, 60)")?;
        if promoted.trim() != "t" || self.psql("select pg_is_in_recovery()")?.trim() != "f" {
            bail!("promotion did not complete: {promoted}");
        }
        Ok(())
    }

    /// `pg_ctl stop -m fast -t <limit>` as the server's user, the way an operator stops it;
    /// fails when the server is not down within `limit`. Returns how long it took.
    pub fn pg_ctl_stop_fast(&mut self, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        let mut cmd = self.command(&tool_path("pg_ctl")?);
        cmd.args(["stop", "-m", "fast", "-t", &limit.as_secs().to_string()])
            .arg("-D")
            .arg(self.data_dir());
        let stopped = server::run(&mut cmd);
        let took = started.elapsed();
        stopped.with_context(|| format!("pg_ctl stop -m fast failed after {took:?}"))?;
        if let Some(mut child) = self.child.take() {
            child.wait()?;
        }
        Ok(took)
    }

    /// Fast shutdown; waits for the postmaster to exit.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SIGINT = fast shutdown.
            unsafe_free_kill(child.id(), "INT");
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT = immediate shutdown; children exit too.
            unsafe_free_kill(child.id(), "QUIT");
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `kill -9` of the postmaster and then of its children (what a lost machine leaves:
    /// no shutdown checkpoint, nothing more sent).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Its children, named before it dies (they are reparented after).
            let children = Command::new("pgrep")
                .args(["-P", &child.id().to_string()])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let _ = child.kill();
            let _ = child.wait();
            for pid in children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                if pid > 1 {
                    unsafe_free_kill(pid, "KILL");
                }
            }
        }
    }

    /// The server's pg_wal directory.
    pub fn wal_dir(&self) -> PathBuf {
        self.data_dir().join("pg_wal")
    }
}

/// Sends a signal by name with kill(1), keeping this crate free of `unsafe`.
fn unsafe_free_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// A command that runs as `owner` when given (we are root), else as ourselves.
pub fn command_as(program: &Path, owner: Option<(u32, u32)>) -> Command {
    let mut c = Command::new(program);
    if let Some((uid, gid)) = owner {
        c.uid(uid).gid(gid);
        // The server user cannot read root's home; keep tools from looking there.
        c.env("HOME", "/tmp");
    }
    c
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.kill();
    }
}
