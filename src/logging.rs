//! Where log records go: always stderr; for the daemon also syslog when the configuration says
//! `syslog: true`, as pghoard does (`PGHoard.load_config` adds `logutil.set_syslog_handler`,
//! a Python `SysLogHandler`). The daemon's `log_level` is the filter unless `WALHOARD_LOG` (or
//! pghoard's `-D/--debug`) pins one; both are applied at start and on every reload.
//!
//! Framing is what `SysLogHandler.emit` sends: `<PRI>` then the formatted record then a NUL,
//! PRI = facility * 8 + severity (RFC 3164 section 4.1.1; the severity from the record's level
//! as `SysLogHandler.mapPriority` maps Python's levels). No timestamp or hostname, as Python
//! leaves those to the syslog daemon. The record starts with the tag `walhoard[PID]: ` so that
//! syslog daemons and journald file it under walhoard.
//!
//! Sending never blocks the daemon: a unix datagram socket is non-blocking and a record that
//! does not fit the socket's queue (a stalled syslog daemon) is dropped; a stream socket (what
//! `SysLogHandler` falls back to when the path is not a datagram socket) has a short write
//! timeout. A failed send reconnects once and tries again, as `SysLogHandler.emit` does.

use std::io::{self, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::{Level, Metadata};
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, Layer, Registry};

use crate::config::{Config, SyslogAddress, SyslogFacility};

/// The filter handle when the configuration may set the level (nothing pinned it).
static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();
/// Whether records are formatted for syslog at all (no cost while off).
static SYSLOG_ON: AtomicBool = AtomicBool::new(false);
static SYSLOG: Mutex<Option<Syslog>> = Mutex::new(None);

/// How long a stream socket may take one record before the record is dropped.
const STREAM_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Installs the process's logger. `debug` is pghoard's `-D/--debug`. With `WALHOARD_LOG` set
/// (to a valid filter) or `debug`, the filter is fixed; otherwise it starts at `info` and
/// [`apply`] sets it from `log_level`.
pub fn init(debug: bool) {
    let pinned = EnvFilter::try_from_env("WALHOARD_LOG")
        .ok()
        .or_else(|| debug.then(|| EnvFilter::new("debug")));
    let reloadable = pinned.is_none();
    let (filter, handle) = reload::Layer::new(pinned.unwrap_or_else(|| EnvFilter::new("info")));
    let stderr = tracing_subscriber::fmt::layer().with_writer(io::stderr);
    let syslog = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .without_time()
        .with_writer(SyslogWriter)
        .with_filter(filter_fn(|_| SYSLOG_ON.load(Ordering::Relaxed)));
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(syslog)
        .try_init();
    if installed.is_ok() && reloadable {
        let _ = LEVEL.set(handle);
    }
}

/// Applies the configuration's logging keys: `log_level` (unless pinned at [`init`]) and
/// `syslog`/`syslog_address`/`syslog_facility`. An unreachable syslog address is an error
/// naming it; the previous logging stays as it was then.
pub fn apply(config: &Config) -> Result<()> {
    let sink = if config.syslog {
        Some(
            Syslog::connect(&config.syslog_address, config.syslog_facility).with_context(|| {
                format!("syslog_address {}: cannot connect", config.syslog_address)
            })?,
        )
    } else {
        None
    };
    if let Some(handle) = LEVEL.get() {
        handle
            .reload(EnvFilter::new(config.log_level.filter()))
            .context("set log_level")?;
    }
    let on = sink.is_some();
    *SYSLOG.lock().unwrap_or_else(|p| p.into_inner()) = sink;
    SYSLOG_ON.store(on, Ordering::Relaxed);
    Ok(())
}

/// RFC 3164 severities of `tracing`'s levels, as `SysLogHandler.mapPriority` maps Python's
/// (DEBUG → debug, INFO → info, WARNING → warning, ERROR → err; TRACE has no Python level).
fn severity(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

enum Conn {
    Datagram(UnixDatagram),
    Stream(UnixStream),
    Udp(std::net::UdpSocket),
}

/// A connected syslog destination.
struct Syslog {
    address: SyslogAddress,
    facility: SyslogFacility,
    conn: Conn,
    tag: String,
}

impl Syslog {
    fn connect(address: &SyslogAddress, facility: SyslogFacility) -> io::Result<Syslog> {
        Ok(Syslog {
            conn: Self::open(address)?,
            address: address.clone(),
            facility,
            tag: format!("walhoard[{}]: ", std::process::id()),
        })
    }

    /// As `SysLogHandler._connect_unixsocket`: a datagram socket first, a stream socket when
    /// the path is one (EPROTOTYPE).
    fn open(address: &SyslogAddress) -> io::Result<Conn> {
        match address {
            SyslogAddress::Unix(path) => {
                let d = UnixDatagram::unbound()?;
                match d.connect(path) {
                    Ok(()) => {
                        d.set_nonblocking(true)?;
                        Ok(Conn::Datagram(d))
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => {
                        let s = UnixStream::connect(path)?;
                        s.set_write_timeout(Some(STREAM_WRITE_TIMEOUT))?;
                        Ok(Conn::Stream(s))
                    }
                    Err(e) => Err(e),
                }
            }
            SyslogAddress::Udp(host, port) => {
                let u = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
                u.connect((host.as_str(), *port))?;
                u.set_nonblocking(true)?;
                Ok(Conn::Udp(u))
            }
        }
    }

    fn write(&mut self, frame: &[u8]) -> io::Result<()> {
        match &mut self.conn {
            Conn::Datagram(d) => d.send(frame).map(drop),
            Conn::Stream(s) => s.write_all(frame),
            Conn::Udp(u) => u.send(frame).map(drop),
        }
    }

    /// Sends one formatted record (without its trailing newline) at `level`.
    fn send(&mut self, level: &Level, line: &[u8]) {
        let pri = u32::from(self.facility.code()) * 8 + u32::from(severity(level));
        let mut frame = Vec::with_capacity(line.len() + self.tag.len() + 8);
        frame.extend_from_slice(format!("<{pri}>").as_bytes());
        frame.extend_from_slice(self.tag.as_bytes());
        frame.extend_from_slice(line);
        frame.push(0);
        match self.write(&frame) {
            Ok(()) => {}
            // The syslog daemon is not keeping up: drop rather than stall the daemon.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // The daemon restarted (new socket) or a stream broke: reconnect once.
            Err(_) => {
                if let Ok(conn) = Self::open(&self.address) {
                    self.conn = conn;
                    let _ = self.write(&frame);
                }
            }
        }
    }
}

/// Formats each record into its own buffer and sends it when the formatter is done with it.
struct SyslogWriter;

struct Record {
    level: Level,
    buf: Vec<u8>,
}

impl Write for Record {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        // The formatter pads levels to five columns (" INFO"); the tag needs no padding.
        let line = self
            .buf
            .strip_suffix(b"\n")
            .unwrap_or(&self.buf)
            .trim_ascii_start();
        if line.is_empty() {
            return;
        }
        if let Some(s) = SYSLOG.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            s.send(&self.level, line);
        }
    }
}

impl<'a> MakeWriter<'a> for SyslogWriter {
    type Writer = Record;
    fn make_writer(&'a self) -> Record {
        Record {
            level: Level::INFO,
            buf: Vec::new(),
        }
    }
    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Record {
        Record {
            level: *meta.level(),
            buf: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PRI values as Python's `SysLogHandler.encodePriority` computes them.
    #[test]
    fn priorities_and_framing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let rx = UnixDatagram::bind(&path).unwrap();
        let facility: SyslogFacility = serde_json::from_str(r#""local5""#).unwrap();
        let mut s = Syslog::connect(&SyslogAddress::Unix(path), facility).unwrap();
        let mut buf = [0u8; 256];
        for (level, pri) in [
            (Level::ERROR, 171),
            (Level::WARN, 172),
            (Level::INFO, 174),
            (Level::DEBUG, 175),
        ] {
            s.send(&level, b"INFO t: hello");
            let n = rx.recv(&mut buf).unwrap();
            let want = format!("<{pri}>walhoard[{}]: INFO t: hello\0", std::process::id());
            assert_eq!(&buf[..n], want.as_bytes());
        }
        let daemon: SyslogFacility = serde_json::from_str("3").unwrap();
        assert_eq!(daemon.code(), 3);
        for bad in [r#""local8""#, "24", "-1", "true"] {
            assert!(
                serde_json::from_str::<SyslogFacility>(bad).is_err(),
                "{bad}"
            );
        }
    }

    /// The transports besides a unix datagram socket: a unix stream socket at the path (what
    /// `SysLogHandler` falls back to on EPROTOTYPE), NUL-terminated records one after the
    /// other; and `[host, port]` over UDP.
    #[test]
    fn stream_socket_and_udp_transports() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut s = Syslog::connect(&SyslogAddress::Unix(path), SyslogFacility::LOCAL2).unwrap();
        assert!(matches!(s.conn, Conn::Stream(_)));
        let (mut conn, _) = listener.accept().unwrap();
        s.send(&Level::WARN, b"one");
        s.send(&Level::ERROR, b"two");
        drop(s);
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap();
        let tag = format!("walhoard[{}]: ", std::process::id());
        assert_eq!(
            String::from_utf8(got).unwrap(),
            format!("<148>{tag}one\0<147>{tag}two\0")
        );

        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = rx.local_addr().unwrap().port();
        let address: SyslogAddress =
            serde_json::from_str(&format!(r#"["127.0.0.1", {port}]"#)).unwrap();
        let mut s = Syslog::connect(&address, SyslogFacility::LOCAL2).unwrap();
        s.send(&Level::INFO, b"over udp");
        let mut buf = [0u8; 128];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], format!("<150>{tag}over udp\0").as_bytes());
    }

    /// A syslog daemon that restarted (its socket replaced) gets the next record: one
    /// reconnect, as `SysLogHandler.emit` does.
    #[test]
    fn reconnects_after_the_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let rx = UnixDatagram::bind(&path).unwrap();
        let mut s =
            Syslog::connect(&SyslogAddress::Unix(path.clone()), SyslogFacility::LOCAL2).unwrap();
        drop(rx);
        std::fs::remove_file(&path).unwrap();
        let rx = UnixDatagram::bind(&path).unwrap();
        s.send(&Level::INFO, b"again");
        let mut buf = [0u8; 128];
        let n = rx.recv(&mut buf).unwrap();
        assert!(buf[..n].ends_with(b"again\0"), "{:?}", &buf[..n]);
    }
}
