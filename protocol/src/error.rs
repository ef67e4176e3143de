//! Error types at the crate's edge. A caller tells apart what to retry from what to report.

use std::fmt;

/// A malformed value in a PostgreSQL file format or name (LSN, WAL file name, page header...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(String);

impl FormatError {
    pub fn new(msg: impl Into<String>) -> Self {
        FormatError(msg.into())
    }
}

/// A server's ErrorResponse, with the fields an operator needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    /// SQLSTATE, e.g. `28P01` for a wrong password.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(d) = &self.detail {
            write!(f, "; detail: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

impl ServerError {
    /// An error without detail or hint, as a fake server or a test sends it.
    pub fn new(severity: &str, code: &str, message: &str) -> Self {
        ServerError {
            severity: severity.into(),
            code: code.into(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// Class 28: invalid authorization specification (wrong password, no pg_hba entry...).
    pub fn is_auth_failure(&self) -> bool {
        self.code.starts_with("28")
    }

    /// `ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION` (28000): the server lets this user not in
    /// at all (no pg_hba.conf entry, or a role that may not log in), as opposed to a failed
    /// password (28P01).
    pub fn is_not_permitted(&self) -> bool {
        self.code == "28000"
    }

    /// The walsender's "requested WAL segment ... has already been removed": SQLSTATE 58P01
    /// (`errcode_for_file_access` on ENOENT, ERRCODE_UNDEFINED_FILE, in WalSndSegmentOpen).
    pub fn is_wal_removed(&self) -> bool {
        self.code == "58P01"
    }
}

/// Everything that can go wrong talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Socket-level failure: refused, reset, timed out, closed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered with an ErrorResponse.
    #[error("server error: {0}")]
    Server(ServerError),
    /// Authentication could not be performed (unsupported method, no password, SCRAM failure)
    /// or was refused by the server.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// TLS negotiation or certificate verification failed.
    #[error("TLS error: {0}")]
    Tls(String),
    /// The server sent something the protocol does not allow here, or a malformed message.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Connection settings that cannot work (bad URI, unknown sslmode, missing file...).
    #[error("invalid connection settings: {0}")]
    Config(String),
    /// The connection was closed by the server at a point where that is not an error of ours
    /// (e.g. end of stream); callers normally reconnect.
    #[error("connection closed by the server")]
    Closed,
}

impl Error {
    pub fn protocol(msg: impl Into<String>) -> Self {
        Error::Protocol(msg.into())
    }

    /// Whether trying again later (reconnecting) can reasonably succeed without an operator.
    ///
    /// Server errors are retryable unless they are about authorization, configuration or a
    /// feature the server lacks; protocol violations are retryable because a fresh connection
    /// re-synchronises the stream.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io(_) | Error::Closed | Error::Protocol(_) => true,
            Error::Server(e) => {
                let class = e.code.get(0..2).unwrap_or("");
                // 28 auth, 42 syntax/access, 0A feature not supported, 3D bad database,
                // 55 object in use is transient (slot active elsewhere) so it stays retryable.
                !matches!(class, "28" | "42" | "0A" | "3D" | "22")
            }
            Error::Auth(_) | Error::Tls(_) | Error::Config(_) => false,
        }
    }

    /// The server's SQLSTATE when this is a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Server(e) => Some(&e.code),
            _ => None,
        }
    }

    /// True for failures an operator must fix in credentials or pg_hba.conf.
    pub fn is_auth_failure(&self) -> bool {
        match self {
            Error::Auth(_) => true,
            Error::Server(e) => e.is_auth_failure(),
            _ => false,
        }
    }

    /// The server refused this user outright ([`ServerError::is_not_permitted`]).
    pub fn is_not_permitted(&self) -> bool {
        matches!(self, Error::Server(e) if e.is_not_permitted())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> Error {
        Error::Server(ServerError::new("FATAL", code, "m"))
    }

    #[test]
    fn retryability() {
        assert!(Error::Io(std::io::Error::other("x")).is_retryable());
        assert!(Error::Closed.is_retryable());
        assert!(server("57P01").is_retryable(), "admin shutdown");
        assert!(server("55006").is_retryable(), "slot in use");
        assert!(!server("28P01").is_retryable(), "wrong password");
        assert!(!server("28000").is_retryable(), "no pg_hba entry");
        assert!(!server("42704").is_retryable(), "slot does not exist");
        assert!(!Error::Auth("x".into()).is_retryable());
        assert!(server("28P01").is_auth_failure());
        assert_eq!(server("28P01").sqlstate(), Some("28P01"));
    }
}
