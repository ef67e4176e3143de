//! What can go wrong with a store, and which of it is worth retrying.

use opendal::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {key} not found")]
    NotFound { key: String },
    #[error("{action} {key}: {source}{}", innermost_cause(source))]
    Backend {
        action: &'static str,
        key: String,
        #[source]
        source: Box<opendal::Error>,
    },
    #[error("{action} {key}: {source}")]
    Io {
        action: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid object storage configuration: {0}")]
    Config(String),
    #[error("metadata of {key}: {message}")]
    BadMetadata { key: String, message: String },
}

impl StorageError {
    /// Worth retrying: network trouble, throttling, server errors. Not: missing objects,
    /// refused credentials, missing buckets, bad configuration, local I/O of the caller.
    pub fn is_transient(&self) -> bool {
        // A full disk is not fixed by retrying at once: the archiver waits for space
        // (`is_out_of_space`) rather than spin in the transient-retry loop.
        match self {
            StorageError::Backend { source, .. } => {
                (source.is_temporary()
                    || source.kind() == ErrorKind::RateLimited
                    || unreachable_server(source))
                    && !self.is_out_of_space()
            }
            _ => false,
        }
    }

    /// The store has no room (ENOSPC, EDQUOT): a condition that ends when space is freed,
    /// which [`ObjectStore::free_bytes`] can tell on local storage.
    pub fn is_out_of_space(&self) -> bool {
        fn full(e: &(dyn std::error::Error + 'static)) -> bool {
            e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                io.kind() == std::io::ErrorKind::StorageFull
                    || io.kind() == std::io::ErrorKind::QuotaExceeded
                    || matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
            }) || e.to_string().contains("No space left on device")
        }
        match self {
            StorageError::Io { source, .. } => full(source),
            StorageError::Backend { source, .. } => {
                source.to_string().contains("No space left on device") || causes(source).any(full)
            }
            _ => false,
        }
    }
}

/// The sources of `e`, outermost first.
fn causes(e: &opendal::Error) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    std::iter::successors(std::error::Error::source(e), |c| c.source())
}

/// OpenDAL's sftp marks every ssh failure permanent, but a refused or timed-out connection
/// (the server is down) is an outage like any other.
fn unreachable_server(e: &opendal::Error) -> bool {
    use std::io::ErrorKind as K;
    causes(e).any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            // Not ConnectionAborted: the `openssh` crate's kind for any failure it does not
            // recognise, host key and authentication refusals included.
            matches!(
                io.kind(),
                K::ConnectionRefused | K::ConnectionReset | K::TimedOut
            )
        })
    })
}

/// The innermost cause when OpenDAL's message does not include it: the `ssh` client's log,
/// whose last line says what failed ("Host key verification failed.").
fn innermost_cause(e: &opendal::Error) -> String {
    match causes(e).last().map(|c| c.to_string()) {
        Some(c) if !e.to_string().contains(&c) => {
            match c.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
                Some(line) => format!(" ({line})"),
                None => String::new(),
            }
        }
        _ => String::new(),
    }
}

pub(super) fn backend<'a>(
    action: &'static str,
    key: &'a str,
) -> impl FnOnce(opendal::Error) -> StorageError + 'a {
    move |source| {
        if source.kind() == ErrorKind::NotFound {
            StorageError::NotFound {
                key: key.to_string(),
            }
        } else {
            StorageError::Backend {
                action,
                key: key.to_string(),
                source: Box::new(source),
            }
        }
    }
}
