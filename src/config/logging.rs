//! pghoard's logging keys: `log_level`, `syslog`, `syslog_address`, `syslog_facility`, parsed
//! into types once. What they do is in `crate::logging`.

use std::path::PathBuf;

use serde::Deserialize;

/// pghoard's `log_level`: Python's logging level names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum LogLevel {
    Debug,
    #[default]
    Info,
    #[serde(alias = "WARN")]
    Warning,
    Error,
    #[serde(alias = "FATAL")]
    Critical,
}

impl LogLevel {
    /// The `tracing` filter that shows what this level shows.
    pub fn filter(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warning => "warn",
            LogLevel::Error | LogLevel::Critical => "error",
        }
    }
}

/// `syslog_address`. pghoard hands it to Python's `SysLogHandler(address=...)`: a string is a
/// unix socket path; a two-element list (Python unpacks it as `(host, port)`) is UDP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, expecting = "a unix socket path or [host, port]")]
pub enum SyslogAddress {
    Unix(PathBuf),
    Udp(String, u16),
}

impl Default for SyslogAddress {
    fn default() -> Self {
        SyslogAddress::Unix(PathBuf::from("/dev/log"))
    }
}

impl std::fmt::Display for SyslogAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyslogAddress::Unix(p) => write!(f, "{}", p.display()),
            SyslogAddress::Udp(h, p) => write!(f, "udp {h}:{p}"),
        }
    }
}

/// `syslog_facility`: the names Python's `SysLogHandler.facility_names` knows, or a number as
/// `SysLogHandler.encodePriority` also takes (RFC 3164 section 4.1.1 codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyslogFacility(u8);

/// Python's `SysLogHandler.facility_names`.
const FACILITY_NAMES: &[(&str, u8)] = &[
    ("kern", 0),
    ("user", 1),
    ("mail", 2),
    ("daemon", 3),
    ("auth", 4),
    ("security", 4),
    ("syslog", 5),
    ("lpr", 6),
    ("news", 7),
    ("uucp", 8),
    ("cron", 9),
    ("authpriv", 10),
    ("ftp", 11),
    ("ntp", 12),
    ("audit", 13),
    ("console", 14),
    ("solaris-cron", 15),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

impl SyslogFacility {
    /// pghoard's default.
    pub const LOCAL2: SyslogFacility = SyslogFacility(18);

    pub fn code(self) -> u8 {
        self.0
    }
}

impl Default for SyslogFacility {
    fn default() -> Self {
        SyslogFacility::LOCAL2
    }
}

impl<'de> Deserialize<'de> for SyslogFacility {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            Code(u64),
        }
        use serde::de::Error;
        match Raw::deserialize(d)
            .map_err(|_| D::Error::custom("expected a facility name or number"))?
        {
            Raw::Name(n) => FACILITY_NAMES
                .iter()
                .find(|(name, _)| *name == n.to_ascii_lowercase())
                .map(|&(_, code)| SyslogFacility(code))
                .ok_or_else(|| {
                    D::Error::custom(format!(
                        "unknown syslog facility {n:?} (kern, user, daemon, ..., local0 to local7)"
                    ))
                }),
            Raw::Code(c) if c <= 23 => Ok(SyslogFacility(c as u8)),
            Raw::Code(c) => Err(D::Error::custom(format!(
                "syslog facility {c} is not between 0 and 23"
            ))),
        }
    }
}
