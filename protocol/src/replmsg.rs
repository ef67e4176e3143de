//! Payloads carried inside CopyData during streaming replication and BASE_BACKUP, with no I/O.
//!
//! Streaming (see walsender.c / receivelog.c): the server sends XLogData ('w') and primary
//! keepalive ('k'); the client sends standby status updates ('r'). walhoard never sends hot
//! standby feedback ('h'): it has no snapshots to protect.
//! BASE_BACKUP on PostgreSQL 15+: new archive ('n'), archive or manifest data ('d'),
//! progress ('p'), manifest start ('m').

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{Error, Result};
use crate::lsn::{Lsn, PgTimestamp, TimelineId};

/// Where the server continues after the streamed timeline ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndOfTimeline {
    /// The next timeline, when the server reported one.
    pub next_tli: Option<TimelineId>,
    /// Where `next_tli` starts (the switchpoint).
    pub next_tli_start: Option<Lsn>,
}

/// What a START_REPLICATION stream yields: the walsender's messages, and the end of the timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationEvent {
    /// WAL bytes starting at `wal_start`.
    XLogData {
        /// LSN of the first byte of `data`.
        wal_start: Lsn,
        /// The server's current end of WAL (its flush position) when it sent this.
        wal_end: Lsn,
        server_time: PgTimestamp,
        /// The payload, or (with [`crate::ReplicationStream::receive_payloads_directly`]) the
        /// part of it that was already buffered.
        data: Bytes,
        /// Payload bytes after `data` still to be read with
        /// [`crate::ReplicationStream::read_payload`]; 0 unless payloads are received directly.
        rest: usize,
    },
    /// Primary keepalive.
    Keepalive {
        /// The server's current end of WAL.
        wal_end: Lsn,
        server_time: PgTimestamp,
        /// The server wants a status update now, or it will time us out.
        reply_requested: bool,
    },
    /// The server finished sending the requested timeline; the connection is idle again.
    /// (Never produced by [`parse_walsender`]: it follows CopyDone.)
    EndOfTimeline(EndOfTimeline),
}

/// Parses a CopyData payload received during START_REPLICATION.
pub fn parse_walsender(mut payload: Bytes) -> Result<ReplicationEvent> {
    let short = |what: &str| {
        Error::protocol(format!(
            "{what} message too short ({} bytes)",
            payload.len()
        ))
    };
    match payload.first() {
        Some(b'w') => {
            if payload.len() < 25 {
                return Err(short("XLogData"));
            }
            payload.advance(1);
            let wal_start = Lsn(payload.get_u64());
            let wal_end = Lsn(payload.get_u64());
            let server_time = PgTimestamp(payload.get_i64());
            Ok(ReplicationEvent::XLogData {
                wal_start,
                wal_end,
                server_time,
                data: payload,
                rest: 0,
            })
        }
        Some(b'k') => {
            if payload.len() != 18 {
                return Err(Error::protocol(format!(
                    "keepalive message has {} bytes, not 18",
                    payload.len()
                )));
            }
            payload.advance(1);
            let wal_end = Lsn(payload.get_u64());
            let server_time = PgTimestamp(payload.get_i64());
            let reply_requested = payload.get_u8() != 0;
            Ok(ReplicationEvent::Keepalive {
                wal_end,
                server_time,
                reply_requested,
            })
        }
        Some(other) => Err(Error::protocol(format!(
            "unexpected streaming message type {:?} ({other:#04x})",
            *other as char
        ))),
        None => Err(Error::protocol("empty CopyData during streaming")),
    }
}

/// Positions reported to the primary in a standby status update.
///
/// Each says a different thing; mixing them up is how WAL gets lost:
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatus {
    /// Every byte before this LSN has been received and written to the spool.
    pub write_lsn: Lsn,
    /// Every byte before this LSN is durable where walhoard promised it (normally the archive).
    /// The primary may recycle WAL before it, and the slot's restart_lsn follows it.
    pub flush_lsn: Lsn,
    /// walhoard replays nothing; by convention the same as `flush_lsn`.
    pub apply_lsn: Lsn,
    pub client_time: PgTimestamp,
    /// Ask the server to answer with a keepalive at once.
    pub reply_requested: bool,
}

impl StandbyStatus {
    /// A status stamped now, applying what is flushed (walhoard replays nothing), asking for
    /// no reply.
    pub fn now(write_lsn: Lsn, flush_lsn: Lsn) -> Self {
        StandbyStatus {
            write_lsn,
            flush_lsn,
            apply_lsn: flush_lsn,
            client_time: PgTimestamp::now(),
            reply_requested: false,
        }
    }

    /// Encodes the 'r' payload (to be wrapped in CopyData).
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u8(b'r');
        buf.put_u64(self.write_lsn.0);
        buf.put_u64(self.flush_lsn.0);
        buf.put_u64(self.apply_lsn.0);
        buf.put_i64(self.client_time.0);
        buf.put_u8(u8::from(self.reply_requested));
    }
}

/// A CopyData payload of the PostgreSQL 15+ BASE_BACKUP stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupCopyMessage {
    /// A new archive begins (`base.tar`, `16385.tar`...); location is empty for the data dir.
    NewArchive {
        name: String,
        tablespace_location: String,
    },
    /// Archive or manifest bytes, depending on what came last.
    Data(Bytes),
    /// Bytes of the backup done so far, as estimated by the server.
    Progress(u64),
    /// The backup manifest follows as Data.
    ManifestStart,
}

fn take_cstr(p: &mut Bytes, what: &str) -> Result<String> {
    let end = p
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| Error::protocol(format!("unterminated {what} in BASE_BACKUP message")))?;
    let s = p.split_to(end);
    p.advance(1);
    String::from_utf8(s.to_vec()).map_err(|_| Error::protocol(format!("{what} is not UTF-8")))
}

/// Parses a CopyData payload of a PostgreSQL 15+ BASE_BACKUP stream.
pub fn parse_backup_copy(mut payload: Bytes) -> Result<BackupCopyMessage> {
    let Some(&kind) = payload.first() else {
        return Err(Error::protocol("empty CopyData in BASE_BACKUP stream"));
    };
    payload.advance(1);
    match kind {
        b'n' => {
            let name = take_cstr(&mut payload, "archive name")?;
            let tablespace_location = take_cstr(&mut payload, "tablespace location")?;
            Ok(BackupCopyMessage::NewArchive {
                name,
                tablespace_location,
            })
        }
        b'd' => Ok(BackupCopyMessage::Data(payload)),
        b'p' => {
            if payload.len() != 8 {
                return Err(Error::protocol("progress message is not 8 bytes"));
            }
            Ok(BackupCopyMessage::Progress(payload.get_u64()))
        }
        b'm' => Ok(BackupCopyMessage::ManifestStart),
        other => Err(Error::protocol(format!(
            "unexpected BASE_BACKUP message type {:?} ({other:#04x})",
            other as char
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_xlogdata() {
        let mut p = vec![b'w'];
        p.extend_from_slice(&0x0000_0001_0200_0000u64.to_be_bytes());
        p.extend_from_slice(&0x0000_0001_0300_0000u64.to_be_bytes());
        p.extend_from_slice(&5i64.to_be_bytes());
        p.extend_from_slice(b"WAL");
        assert_eq!(
            parse_walsender(Bytes::from(p)).unwrap(),
            ReplicationEvent::XLogData {
                wal_start: Lsn(0x1_0200_0000),
                wal_end: Lsn(0x1_0300_0000),
                server_time: PgTimestamp(5),
                data: Bytes::from_static(b"WAL"),
                rest: 0,
            }
        );
    }

    #[test]
    fn golden_keepalive() {
        let p = b"k\0\0\0\x01\0\0\0\0\0\0\0\0\0\0\0\x07\x01";
        assert_eq!(
            parse_walsender(Bytes::from_static(p)).unwrap(),
            ReplicationEvent::Keepalive {
                wal_end: Lsn(0x1_0000_0000),
                server_time: PgTimestamp(7),
                reply_requested: true
            }
        );
        assert!(parse_walsender(Bytes::from_static(&p[..17])).is_err());
    }

    #[test]
    fn golden_status_update() {
        let mut b = BytesMut::new();
        StandbyStatus {
            write_lsn: Lsn(0x1_0000_0010),
            flush_lsn: Lsn(0x20),
            apply_lsn: Lsn(0x20),
            client_time: PgTimestamp(1),
            reply_requested: false,
        }
        .encode(&mut b);
        assert_eq!(
            &b[..],
            b"r\0\0\0\x01\0\0\0\x10\0\0\0\0\0\0\0\x20\0\0\0\0\0\0\0\x20\0\0\0\0\0\0\0\x01\0"
        );
    }

    #[test]
    fn malformed_stream_messages() {
        for bad in [&b""[..], b"w", b"wshort", b"h\0", b"k\0\0"] {
            assert!(
                parse_walsender(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn golden_backup_messages() {
        assert_eq!(
            parse_backup_copy(Bytes::from_static(b"nbase.tar\0\0")).unwrap(),
            BackupCopyMessage::NewArchive {
                name: "base.tar".into(),
                tablespace_location: String::new()
            }
        );
        assert_eq!(
            parse_backup_copy(Bytes::from_static(b"n16385.tar\0/srv/ts\0")).unwrap(),
            BackupCopyMessage::NewArchive {
                name: "16385.tar".into(),
                tablespace_location: "/srv/ts".into()
            }
        );
        assert_eq!(
            parse_backup_copy(Bytes::from_static(b"dtar")).unwrap(),
            BackupCopyMessage::Data(Bytes::from_static(b"tar"))
        );
        assert_eq!(
            parse_backup_copy(Bytes::from_static(b"p\0\0\0\0\0\0\x01\0")).unwrap(),
            BackupCopyMessage::Progress(256)
        );
        assert_eq!(
            parse_backup_copy(Bytes::from_static(b"m")).unwrap(),
            BackupCopyMessage::ManifestStart
        );
        for bad in [&b""[..], b"nbase.tar", b"p\0", b"x"] {
            assert!(
                parse_backup_copy(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
    }
}
