//! A real Azure Blob server for tests: Azurite (`azurite-blob`, npm) on a loopback port, storing
//! into a temp directory, with the well-known development account. `tools/test.sh` installs it
//! into `$WALHOARD_CACHE/azurite` (`npm install --prefix`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Result};

/// Azurite's published development account and key (not a secret).
pub const ACCOUNT: &str = "devstoreaccount1";
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The azurite-blob launcher: `WALHOARD_AZURITE`, else the cache.
pub fn azurite_path() -> Result<PathBuf> {
    let dir = crate::cache_dir().join("azurite");
    let install = format!(
        "run tools/test.sh (or npm install --prefix {} azurite@3.35.0)",
        dir.display()
    );
    let default = dir.join("node_modules").join(".bin").join("azurite-blob");
    crate::server::program("WALHOARD_AZURITE", default, &install)
}

/// A running Azurite blob service; stopped on drop. `stop`/`resume` simulate an outage.
pub struct AzuriteServer {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl AzuriteServer {
    /// Starts a server with one container, `container`.
    pub fn start(container: &str) -> Result<AzuriteServer> {
        let dir = tempfile::Builder::new()
            .prefix("walhoard-azurite-")
            .tempdir()?;
        let port = crate::server::free_port()?;
        let mut s = AzuriteServer {
            dir,
            port,
            child: None,
        };
        s.resume()?;
        s.create_container(container)?;
        Ok(s)
    }

    /// Starts (again) on the same port and data directory.
    pub fn resume(&mut self) -> Result<()> {
        let log_path = self.dir.path().join("azurite.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(azurite_path()?);
        cmd.args(["--blobHost", "127.0.0.1", "--blobPort"])
            .arg(self.port.to_string())
            .arg("--location")
            .arg(self.dir.path().join("data"))
            // The default dev client sends newer API versions than Azurite knows; telemetry
            // would try to reach the internet.
            .args([
                "--loose",
                "--skipApiVersionCheck",
                "--disableTelemetry",
                "--disableProductStyleUrl",
                "--silent",
            ])
            .current_dir(self.dir.path());
        let what = "azurite-blob";
        let child = self
            .child
            .insert(crate::server::spawn_logged(&mut cmd, log, what)?);
        let limit = Duration::from_secs(30);
        crate::server::wait_listening(child, self.port, limit, what, &log_path)
    }

    /// Azurite's output, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("azurite.log")).unwrap_or_default()
    }

    /// Kills the server (an outage); blobs stay on disk.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Creates a container with a SharedKey-signed `Create Container` request.
    pub fn create_container(&self, name: &str) -> Result<()> {
        let date = http_date(SystemTime::now());
        let version = "2021-08-06";
        // Path-style URLs: the canonical resource repeats the account (as the path's first
        // segment after the account itself).
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
        );
        let key = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, ACCOUNT_KEY)?;
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key);
        let sig = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            aws_lc_rs::hmac::sign(&key, to_sign.as_bytes()).as_ref(),
        );
        let request = format!(
            "PUT /{ACCOUNT}/{name}?restype=container HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nx-ms-date: {date}\r\nx-ms-version: {version}\r\nAuthorization: SharedKey {ACCOUNT}:{sig}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        );
        let mut conn = TcpStream::connect(("127.0.0.1", self.port))?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        conn.write_all(request.as_bytes())?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        let status = response.split(' ').nth(1).unwrap_or("");
        if status != "201" {
            bail!("create container {name}: {response}");
        }
        Ok(())
    }
}

impl Drop for AzuriteServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// RFC 7231 date (`Tue, 24 Nov 2026 16:03:25 GMT`), computed without a date crate.
fn http_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn http_date_matches_known_instants() {
        let at = |s| std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        assert_eq!(super::http_date(at(0)), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            super::http_date(at(1_795_536_205)),
            "Tue, 24 Nov 2026 16:03:25 GMT"
        );
        assert_eq!(
            super::http_date(at(951_782_400)),
            "Tue, 29 Feb 2000 00:00:00 GMT"
        );
    }
}
