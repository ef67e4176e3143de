//! A real S3 server for tests: s3s-fs (SigV4 enforced) on a loopback port, storing into a temp
//! directory. `tools/test.sh` installs it into `$WALHOARD_CACHE/s3s-fs/bin/s3s-fs`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::Result;

pub const ACCESS_KEY: &str = "walhoard-test-ak";
pub const SECRET_KEY: &str = "walhoard-test-secret-key";

/// The s3s-fs binary: `WALHOARD_S3S_FS`, else the cache.
pub fn s3s_fs_path() -> Result<PathBuf> {
    let dir = crate::cache_dir().join("s3s-fs");
    let install = format!(
        "run tools/test.sh (or cargo install s3s-fs@0.14.1 --features binary --locked --root {})",
        dir.display()
    );
    crate::server::program("WALHOARD_S3S_FS", dir.join("bin").join("s3s-fs"), &install)
}

/// A running s3s-fs; stopped on drop. `stop`/`start` simulate an outage on the same port.
pub struct S3Server {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl S3Server {
    /// Starts a server with one bucket, `bucket`.
    pub fn start(bucket: &str) -> Result<S3Server> {
        let dir = tempfile::Builder::new().prefix("walhoard-s3-").tempdir()?;
        std::fs::create_dir_all(dir.path().join(bucket))?;
        let port = crate::server::free_port()?;
        let mut s = S3Server {
            dir,
            port,
            child: None,
        };
        s.resume()?;
        Ok(s)
    }

    pub fn endpoint_host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// Where the server keeps objects (one directory per bucket).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Starts (again) on the same port.
    pub fn resume(&mut self) -> Result<()> {
        // Its output is dropped: a log file in its directory would stand among the buckets.
        let log_path = Path::new("/dev/null");
        let log = std::fs::OpenOptions::new().write(true).open(log_path)?;
        let mut cmd = Command::new(s3s_fs_path()?);
        cmd.args([
            "--host",
            "127.0.0.1",
            "--port",
            &self.port.to_string(),
            "--access-key",
            ACCESS_KEY,
            "--secret-key",
            SECRET_KEY,
        ])
        .arg(self.dir.path());
        let child = self
            .child
            .insert(crate::server::spawn_logged(&mut cmd, log, "s3s-fs")?);
        let limit = Duration::from_secs(20);
        crate::server::wait_listening(child, self.port, limit, "s3s-fs", log_path)
    }

    /// Kills the server (an outage); objects stay on disk.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
