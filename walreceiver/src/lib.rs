//! Slot-based WAL streaming into verified segment buffers and a local spool.
//!
//! [`receiver::run`] attaches to a primary through a physical replication slot, receives each
//! segment into a segment buffer ([`buffers`]) or a pre-sized `<segment>.partial` file
//! ([`spool`]) or both ([`SpoolSync`] says when the spool must be durable), verifies every
//! completed segment's page headers and reports it as a [`ReceiverEvent`]. It knows
//! nothing of object storage: the archiver tells it, through a `watch` channel, up to where
//! the archive holds WAL, and only that position is ever reported to the server as flushed,
//! so the slot never releases WAL the archive does not hold.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use walhoard_protocol::{ConnectParams, Lsn};
//! use walhoard_walreceiver::{run, ReceiverConfig, ReceiverEvent, ReceiverPositions};
//! let cfg = ReceiverConfig::new(ConnectParams::parse("host=/var/run/postgresql")?, "walhoard", "/var/spool/wh".into());
//! let (events_tx, mut events) = tokio::sync::mpsc::channel(8);
//! let (archived_tx, archived) = tokio::sync::watch::channel(Lsn::INVALID);
//! let (positions, _) = tokio::sync::watch::channel(ReceiverPositions::default());
//! let cancel = tokio_util::sync::CancellationToken::new();
//! tokio::spawn(run(cfg, None, events_tx, archived, positions, cancel.clone()));
//! while let Some(ReceiverEvent::Segment { path, start, .. }) = events.recv().await {
//!     // ... upload `path`, then:
//!     archived_tx.send_replace(start + 16 * 1024 * 1024);
//! }
//! # Ok(()) }
//! ```

pub mod buffers;
mod config;
mod events;
mod incoming;
mod partial;
mod position;
pub mod receiver;
mod session;
pub mod spool;

pub use buffers::{BufferBudget, SegmentBuffer, SegmentBuffers};
pub use config::{ReceiverConfig, ResumeHook, SpoolSync, StartPosition};
pub use events::{DisconnectReason, ReceiverEvent, ReceiverPositions};
pub use partial::{Batch, BatchSink, InFlight, PartialUploads};
pub use receiver::run;

/// Why receiving stopped or a session failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    #[error(transparent)]
    Pg(#[from] walhoard_protocol::Error),
    #[error("spool I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A received segment failed verification; it was not handed on.
    #[error("received WAL failed verification: {0}")]
    BadWal(String),
    #[error("PostgreSQL {0} is not supported (13 to 18 are)")]
    Unsupported(u32),
    /// Whoever consumed the events went away.
    #[error("event receiver closed")]
    EventsClosed,
    /// The resume hook refused streaming (the archive belongs to another cluster); final.
    #[error("streaming refused: {0}")]
    Refused(String),
}
