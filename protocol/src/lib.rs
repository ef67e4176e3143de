//! PostgreSQL wire and streaming-replication protocol client, and the PostgreSQL WAL file
//! formats walhoard needs. No storage, no configuration files.
//!
//! Two halves, kept apart:
//! - file formats: [`lsn`] (positions, timelines, segment sizes, timestamps), [`walname`]
//!   (WAL file names), [`xlog`] (page headers and their validation), [`timeline`] (history files);
//! - the wire: [`message`] and [`replmsg`] (pure codecs, no I/O), [`params`] (connection
//!   settings), [`conn`] (transport, TLS, authentication, simple queries), [`replication`]
//!   (replication commands and the START_REPLICATION stream) and [`backup`] (BASE_BACKUP).
//!
//! ```no_run
//! # async fn demo() -> Result<(), walhoard_protocol::Error> {
//! use walhoard_protocol::{ConnectParams, ReplicationClient, ReplicationEvent};
//! let params = ConnectParams::parse("host=/var/run/postgresql user=postgres")?;
//! let mut client = ReplicationClient::connect(&params).await?;
//! let id = client.identify_system().await?;
//! let seg = client.wal_segment_size().await?;
//! let mut stream = client.start_replication(None, id.xlogpos.segment_start(seg), Some(id.timeline)).await?;
//! if let ReplicationEvent::XLogData { wal_start, data, .. } = stream.next().await? {
//!     println!("{} bytes at {wal_start}", data.len());
//! }
//! # Ok(()) }
//! ```

pub mod backoff;
pub mod backup;
pub mod conn;
pub mod error;
pub mod lsn;
pub mod message;
pub mod params;
pub mod replication;
pub mod replmsg;
pub mod timeline;
mod tls;
pub mod walname;
pub mod xlog;
pub mod xlogrecord;

pub use backoff::Backoff;
pub use backup::{BaseBackupEvent, BaseBackupOptions, BaseBackupStream, TablespaceInfo};
pub use conn::{Connection, QueryResult};
pub use error::{Error, FormatError, Result, ServerError};
pub use lsn::{Lsn, PgTimestamp, SegmentSize, TimelineId};
pub use params::{ConnectParams, Host, ReplicationMode, SslMode};
pub use replication::{
    EndOfTimeline, ReplicationClient, ReplicationEvent, ReplicationStream, SlotInfo, SystemIdentity,
};
pub use replmsg::StandbyStatus;
pub use timeline::TimelineHistory;
pub use walname::{SegmentId, WalSegmentName};
pub use xlog::{PageExpectation, XLogPageHeader};
