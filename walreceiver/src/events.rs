//! What the receiver tells whoever archives its output: events and positions.

use std::path::PathBuf;
use std::sync::Arc;

use walhoard_protocol::{Lsn, SegmentId, SegmentSize, TimelineId, WalSegmentName};

use crate::buffers::SegmentBuffer;
use crate::partial::InFlight;
use crate::ReceiverError;
#[cfg(doc)]
use crate::SpoolSync;

/// What the receiver reports to whoever archives its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// Streaming (re)started.
    Connected {
        system_id: u64,
        seg_size: SegmentSize,
        server_tli: TimelineId,
        start: Lsn,
        start_tli: TimelineId,
        /// How many `Connected` this receiver sent, this one included: the batches a
        /// [`crate::BatchSink`] gets name the one they follow ([`crate::Batch::session`]).
        session: u64,
    },
    /// A complete segment, verified. `data` holds its bytes when a segment buffer was free;
    /// `path` is its spool file (durable unless the spool is only a cache,
    /// [`SpoolSync::Auto`]), which does not exist when the spool is not durable and the
    /// segment was received into its buffer alone.
    Segment {
        name: WalSegmentName,
        path: PathBuf,
        start: Lsn,
        data: Option<Arc<SegmentBuffer>>,
    },
    /// The last segment of a timeline that ended at `end`, durable under its `.partial` name.
    TimelinePartial {
        name: WalSegmentName,
        path: PathBuf,
        end: Lsn,
    },
    /// Bytes of segment `id` (which starts at `start`) received but not yet handed on by an
    /// earlier `Received` of this session: `data` holds the segment's bytes from `offset` on
    /// ([`crate::PartialUploads`]). A new session hands the segment on again from offset 0
    /// (the same bytes on the same timeline). No further batch is handed on while a clone of
    /// `in_flight` lives.
    Received {
        id: SegmentId,
        start: Lsn,
        offset: u64,
        data: bytes::Bytes,
        in_flight: InFlight,
    },
    /// A timeline history file fetched from the server, durable in the spool.
    History { name: WalSegmentName, path: PathBuf },
    /// WAL from `from` up to `to` (segment boundaries, timeline `tli`) is lost: it was to be
    /// streamed because the archive does not hold it, but the primary has removed it
    /// (SQLSTATE 58P01, "requested WAL segment ... has already been removed") and the slot
    /// starts only at `to`. Streaming continues at `to`.
    WalGap {
        from: Lsn,
        to: Lsn,
        tli: TimelineId,
        /// The server's error.
        error: String,
    },
    /// The connection was lost or could not be made; the receiver retries.
    Disconnected {
        error: String,
        reason: DisconnectReason,
    },
}

/// Why a session ended, as far as the operator must tell the cases apart (pghoard raises a
/// different alert file for each of the first three). The receiver retries every one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The server lets us not in at all: no pg_hba.conf entry matches (SQLSTATE 28000).
    NotPermitted,
    /// Authentication failed: a wrong password, an unsupported method, a failed SCRAM exchange.
    AuthenticationFailed,
    /// The server's major version is not one walhoard reads.
    UnsupportedVersion,
    /// Anything else: the connection broke, the server refused a command or broke the
    /// protocol, the spool failed. `retryable` is false when only a change of configuration
    /// or on the server can help (a missing database, a refused command).
    Failed { retryable: bool },
}

impl DisconnectReason {
    pub(crate) fn of(e: &ReceiverError) -> Self {
        match e {
            ReceiverError::Unsupported(_) => DisconnectReason::UnsupportedVersion,
            ReceiverError::Pg(pg) if pg.is_not_permitted() => DisconnectReason::NotPermitted,
            ReceiverError::Pg(pg) if pg.is_auth_failure() => DisconnectReason::AuthenticationFailed,
            ReceiverError::Pg(pg) => DisconnectReason::Failed {
                retryable: pg.is_retryable(),
            },
            _ => DisconnectReason::Failed { retryable: true },
        }
    }

    /// Whether a retry can succeed without a change of configuration or on the server.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            DisconnectReason::UnsupportedVersion | DisconnectReason::Failed { retryable: true }
        )
    }
}

/// Positions the receiver has reached, for status reporting (state file, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReceiverPositions {
    /// Every byte before this has been received and written to the spool.
    pub received_lsn: Lsn,
    /// The flush position last reported to the server (`position::flush_position`): the
    /// archive's end, or past it by what the spool holds durably of the first segment the
    /// archive lacks, never beyond that segment's last byte; so the slot never releases WAL
    /// the archive does not hold.
    pub reported_flush_lsn: Lsn,
    /// The timeline being received (none before the first connection).
    pub timeline: Option<TimelineId>,
    /// When the oldest received byte that is durable nowhere yet (neither in the archive,
    /// partial objects included, nor, for this purpose, in the spool) arrived; `None` when
    /// every received byte is in the archive.
    pub undurable_since: Option<std::time::SystemTime>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use walhoard_protocol::Error as PgError;
    use walhoard_protocol::ServerError;

    fn server(code: &str) -> ReceiverError {
        ReceiverError::Pg(PgError::Server(ServerError::new("FATAL", code, "m")))
    }

    /// The daemon raises pghoard's alert files from these: a refused pg_hba entry is a
    /// configuration error, a refused password an authentication error.
    #[test]
    fn disconnect_reasons_tell_the_alerts_apart() {
        use DisconnectReason::*;
        assert_eq!(DisconnectReason::of(&server("28000")), NotPermitted);
        assert_eq!(DisconnectReason::of(&server("28P01")), AuthenticationFailed);
        assert_eq!(
            DisconnectReason::of(&ReceiverError::Unsupported(12)),
            UnsupportedVersion
        );
        assert_eq!(
            DisconnectReason::of(&server("3D000")),
            Failed { retryable: false }
        );
        let io = ReceiverError::Pg(PgError::Io(std::io::Error::other("reset")));
        assert_eq!(DisconnectReason::of(&io), Failed { retryable: true });
        assert!(!NotPermitted.is_retryable() && !AuthenticationFailed.is_retryable());
        assert!(UnsupportedVersion.is_retryable());
    }
}
