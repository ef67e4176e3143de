//! What the loopback servers of the tests share: a free port, a child process writing into a
//! log file, waiting until it listens, and finding the program.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A loopback port free right now (the kernel's pick).
pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Spawns `cmd` (named `what` in errors) with no input and its output into `log`.
pub(crate) fn spawn_logged(cmd: &mut Command, log: File, what: &str) -> Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("spawn {what}"))
}

/// Waits until something accepts connections on loopback `port`, at most `limit`; fails
/// early when `child` exits. Errors carry `what` and the log file's contents.
pub(crate) fn wait_listening(
    child: &mut Child,
    port: u16,
    limit: Duration,
    what: &str,
    log: &Path,
) -> Result<()> {
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + limit;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited with {status}: {}", log_text());
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on port {port}: {}", log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Runs `cmd` without input to its end; its standard output, or an error with the command,
/// its exit status and its output when it failed.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A program at `$var`, else at `default`; when missing, an error saying how to install it.
pub(crate) fn program(var: &str, default: PathBuf, install: &str) -> Result<PathBuf> {
    let p = std::env::var_os(var).map_or(default, PathBuf::from);
    if !p.exists() {
        bail!("{} not found; {install}", p.display());
    }
    Ok(p)
}
