//! systemd's readiness protocol (sd_notify(3)), for units with `Type=notify` such as the one
//! pghoard ships (pghoard.unit: `Type=notify`, `ExecStart=/usr/bin/pghoard <config>`). Without
//! `READY=1` systemd would kill such a daemon after `TimeoutStartSec` and restart it forever.

use std::path::PathBuf;

/// Sends `state` (e.g. `READY=1`) to `$NOTIFY_SOCKET` when systemd set it; otherwise does
/// nothing. A failure is logged, never fatal: the daemon works without systemd.
pub fn notify(state: &str) {
    let Some(addr) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&addr, state) {
        tracing::warn!(socket = ?addr, error = %e, "cannot notify systemd ({state})");
    }
}

fn send(addr: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let sock = UnixDatagram::unbound()?;
    let bytes = addr.as_bytes();
    // A leading '@' names a socket in the abstract namespace (sd_notify(3)).
    let target = if let Some(name) = bytes.strip_prefix(b"@") {
        abstract_addr(name)?
    } else {
        SocketAddr::from_pathname(PathBuf::from(addr))?
    };
    sock.send_to_addr(state.as_bytes(), &target)?;
    Ok(())
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &[u8]) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_: &[u8]) -> std::io::Result<std::os::unix::net::SocketAddr> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract socket names exist on Linux only",
    ))
}
