//! A real S3 server for tests: s3s-fs (SigV4 enforced) on a loopback port, storing into a temp
//! directory. `tools/test.sh` installs it into `$WALHOARD_CACHE/s3s-fs/bin/s3s-fs`.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub const ACCESS_KEY: &str = "walhoard-test-ak";
pub const SECRET_KEY: &str = "walhoard-test-secret-key";

/// The s3s-fs binary: `WALHOARD_S3S_FS`, else the cache.
pub fn s3s_fs_path() -> Result<PathBuf> {
    let p = std::env::var_os("WALHOARD_S3S_FS")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::cache_dir().join("s3s-fs").join("bin").join("s3s-fs"));
    if !p.exists() {
        bail!("s3s-fs not found at {}; run tools/test.sh (or cargo install s3s-fs@0.14.1 --features binary --locked --root {})", p.display(), crate::cache_dir().join("s3s-fs").display());
    }
    Ok(p)
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
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
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
        let child = Command::new(s3s_fs_path()?)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--access-key",
                ACCESS_KEY,
                "--secret-key",
                SECRET_KEY,
            ])
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn s3s-fs")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                bail!("s3s-fs did not listen on port {}", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
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
