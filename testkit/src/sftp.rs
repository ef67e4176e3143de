//! A real SFTP server for tests: OpenSSH's `sshd` (Debian `openssh-server`, installed by
//! `tools/test.sh`) with its own configuration, host key and client key in a temp directory, on
//! a loopback port, serving `internal-sftp`.
//!
//! OpenDAL's sftp service runs the system `ssh` client with strict host key checking and no
//! way to name a known_hosts file. So that the client trusts exactly this server's key without
//! touching `~/.ssh`, the server adds an ssh_config drop-in,
//! `/etc/ssh/ssh_config.d/walhoard-test-<port>.conf`, for the host alias [`SftpServer::host`]
//! (known_hosts file in the temp directory), and removes it on drop. That needs root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::server::run;

const SSHD: &str = "/usr/sbin/sshd";
const SSH_CONFIG_DIR: &str = "/etc/ssh/ssh_config.d";

/// A running sshd; stopped (with its sessions) on drop.
pub struct SftpServer {
    dir: tempfile::TempDir,
    pub port: u16,
    /// The OS user the client logs in as (the one running the tests).
    pub username: String,
    child: Option<Child>,
    ssh_config: PathBuf,
}

/// sshd's privilege separation needs its empty directory and the `sshd` user (the Debian
/// package makes both, but /run is a tmpfs).
fn privsep_ready() -> Result<()> {
    if !crate::is_root() {
        return Ok(());
    }
    std::fs::create_dir_all("/run/sshd").context("create /run/sshd")?;
    let known = Command::new("id")
        .arg("sshd")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !known {
        run(Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--home-dir",
            "/run/sshd",
            "--shell",
            "/usr/sbin/nologin",
            "sshd",
        ]))?;
    }
    Ok(())
}

impl SftpServer {
    /// Starts a server whose only accepted key is [`SftpServer::private_key`].
    pub fn start() -> Result<SftpServer> {
        if !Path::new(SSHD).exists() {
            bail!("{SSHD} not found; run tools/test.sh (Debian package openssh-server)");
        }
        if !crate::is_root() {
            bail!("the sftp tests need root (they add an ssh_config drop-in in {SSH_CONFIG_DIR})");
        }
        privsep_ready()?;
        let dir = tempfile::Builder::new()
            .prefix("walhoard-sftp-")
            .tempdir()?;
        let d = dir.path();
        for name in ["host_key", "client_key"] {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                .arg(d.join(name)))?;
        }
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys"))?;
        std::fs::create_dir(d.join("data"))?;
        let username = run(Command::new("id").arg("-un"))?.trim().to_string();
        let port = crate::server::free_port()?;
        let host_key = std::fs::read_to_string(d.join("host_key.pub"))?;
        let alias = format!("walhoard-sftp-{port}");
        std::fs::write(d.join("known_hosts"), format!("{alias} {host_key}"))?;
        // StrictModes off: the temp directory's parents (/tmp) are world-writable.
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {pid}\n\
                 AuthorizedKeysFile {ak}\nStrictModes no\nPubkeyAuthentication yes\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 PermitRootLogin prohibit-password\nAllowUsers {username}\n\
                 Subsystem sftp internal-sftp\nLogLevel ERROR\n",
                hk = d.join("host_key").display(),
                pid = d.join("sshd.pid").display(),
                ak = d.join("authorized_keys").display(),
            ),
        )?;
        let ssh_config = Path::new(SSH_CONFIG_DIR).join(format!("walhoard-test-{port}.conf"));
        std::fs::create_dir_all(SSH_CONFIG_DIR)?;
        std::fs::write(
            &ssh_config,
            format!(
                "# written by walhoard's tests, removed when the test server stops\n\
                 Host {alias}\n    HostName 127.0.0.1\n    HostKeyAlias {alias}\n    \
                 UserKnownHostsFile {kh}\n    GlobalKnownHostsFile /dev/null\n",
                kh = d.join("known_hosts").display()
            ),
        )
        .with_context(|| format!("write {}", ssh_config.display()))?;
        let mut s = SftpServer {
            dir,
            port,
            username,
            child: None,
            ssh_config,
        };
        s.resume()?;
        Ok(s)
    }

    /// The host name the client connects to (an ssh_config alias for 127.0.0.1).
    pub fn host(&self) -> String {
        format!("walhoard-sftp-{}", self.port)
    }

    /// The client's private key file (`private_key` in the configuration).
    pub fn private_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// An empty directory for the archive (absolute, as `prefix`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Makes the client expect another host key (as after a server swap): connections must
    /// then be refused.
    pub fn distrust_host_key(&self) -> Result<()> {
        let d = self.dir.path();
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "impostor", "-f"])
            .arg(d.join("other_key")))?;
        let other = std::fs::read_to_string(d.join("other_key.pub"))?;
        std::fs::write(d.join("known_hosts"), format!("{} {other}", self.host()))?;
        Ok(())
    }

    /// sshd's own output, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// Starts (again) on the same port.
    pub fn resume(&mut self) -> Result<()> {
        let log_path = self.dir.path().join("sshd.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(SSHD);
        cmd.args(["-D", "-e", "-f"])
            .arg(self.dir.path().join("sshd_config"));
        let child = self
            .child
            .insert(crate::server::spawn_logged(&mut cmd, log, "sshd")?);
        let limit = Duration::from_secs(20);
        crate::server::wait_listening(child, self.port, limit, "sshd", &log_path)?;
        Ok(())
    }

    /// Kills the server and the sessions it forked (each in a session of its own, so they
    /// are found by parent pid).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let listener = c.id();
            for pid in children_of(listener) {
                // It may have exited meanwhile: quietly.
                let _ = Command::new("kill")
                    .arg(pid.to_string())
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Pids whose parent is `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    // The command name may contain spaces: fields follow the last ')'.
                    let rest = s.get(s.rfind(')')? + 2..)?;
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

impl Drop for SftpServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.ssh_config);
    }
}
