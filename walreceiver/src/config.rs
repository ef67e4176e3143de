//! What the receiver is told: where to connect, which slot, the spool, how often to report,
//! how to find where to resume.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use walhoard_protocol::{ConnectParams, Lsn, SegmentSize, TimelineId};

use crate::buffers::SegmentBuffers;
use crate::partial::PartialUploads;
#[cfg(doc)]
use crate::ReceiverEvent;

/// Called once, on the first connection, with the slot's position (its restart_lsn at a segment
/// boundary, on the timeline that wrote it): returns where streaming should really start, after
/// the segments the archive (or a local spool) already holds. It must not return a position
/// past WAL that is not held somewhere: the receiver skips straight to it. It may return a
/// position *before* the slot's (the archive ends there: the slot was dropped and created
/// again): the receiver then streams from there while the primary still has that WAL, and
/// reports a [`ReceiverEvent::WalGap`] when it does not.
///
/// It also gets the primary's system identifier (IDENTIFY_SYSTEM) and may refuse to stream
/// at all (`Err`: the archive belongs to another cluster): the receiver then drops the slot
/// if this session created it and stops with [`crate::ReceiverError::Refused`], never retrying.
pub type ResumeHook = Arc<
    dyn Fn(
            StartPosition,
            SegmentSize,
            u64,
        ) -> Pin<Box<dyn Future<Output = Result<Lsn, String>> + Send>>
        + Send
        + Sync,
>;

/// What the receiver needs to know.
#[derive(Clone)]
pub struct ReceiverConfig {
    pub conn: ConnectParams,
    pub slot: String,
    /// Create the slot (with RESERVE_WAL) when it does not exist.
    pub create_slot: bool,
    pub spool_dir: PathBuf,
    /// How often a status update is sent unprompted; keep it below wal_sender_timeout.
    pub status_interval: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Where to really start when no start position was given; see [`ResumeHook`].
    pub resume: Option<ResumeHook>,
    /// While this says true the receiver stays disconnected (the daemon's disk guard); the
    /// slot keeps the WAL meanwhile.
    pub pause: Option<watch::Receiver<bool>>,
    /// Whether spool files are fdatasync'd; see [`SpoolSync`].
    pub spool_sync: SpoolSync,
    /// Buffers complete segments are handed on in (see [`crate::buffers`]).
    pub buffers: SegmentBuffers,
    /// Whether the segment being received is handed on before it is complete.
    pub partial: PartialUploads,
    /// After this long with no WAL arriving (checked on each status update), the segment
    /// being received leaves its buffer for its spool file, and the read-back room is freed:
    /// an idle site holds no WAL in memory.
    pub release_idle_after: Duration,
}

/// When the spool is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolSync {
    /// Every status update fdatasyncs the segment being received; complete segments and the
    /// renames are durable before they are handed on.
    Always,
    /// Only when the server may drop WAL the slot holds (`max_slot_wal_keep_size` is set): the
    /// flush position reported is the archive's, so the slot keeps every byte the archive does
    /// not hold yet, and the spool is then only a cache in front of it. A crash of the process
    /// keeps its files (the page cache survives); after a crash of the machine the daemon
    /// trusts no spool file of the earlier boot.
    Auto,
}

impl std::fmt::Debug for ReceiverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverConfig")
            .field("conn", &self.conn)
            .field("slot", &self.slot)
            .field("create_slot", &self.create_slot)
            .field("spool_dir", &self.spool_dir)
            .field("status_interval", &self.status_interval)
            .field("resume", &self.resume.is_some())
            .finish()
    }
}

impl ReceiverConfig {
    pub fn new(conn: ConnectParams, slot: &str, spool_dir: PathBuf) -> Self {
        ReceiverConfig {
            conn,
            slot: slot.to_string(),
            create_slot: true,
            spool_dir,
            status_interval: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            resume: None,
            pause: None,
            spool_sync: SpoolSync::Always,
            buffers: SegmentBuffers::new(2),
            partial: PartialUploads::Off,
            release_idle_after: Duration::from_secs(10),
        }
    }
}

/// Where to resume: the first byte the archive does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartPosition {
    pub lsn: Lsn,
    /// The timeline `lsn` belongs to; the server's current one when unknown.
    pub tli: Option<TimelineId>,
}
