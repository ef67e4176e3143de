//! The physical replication client: replication commands and the START_REPLICATION stream.
//! The message flow follows walsender.c and receivelog.c.

use bytes::{Bytes, BytesMut};

use crate::conn::{Connection, QueryResult};
use crate::error::{Error, Result};
use crate::lsn::{Lsn, SegmentSize, TimelineId};
use crate::message::{frontend_msg, BackendMessage};
use crate::params::{validate_slot_name, ConnectParams};
use crate::replmsg::{parse_walsender, StandbyStatus};
pub use crate::replmsg::{EndOfTimeline, ReplicationEvent};

/// The answer to IDENTIFY_SYSTEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    pub system_id: u64,
    /// The server's current timeline.
    pub timeline: TimelineId,
    /// The server's current WAL flush position (write position on a standby).
    pub xlogpos: Lsn,
    pub dbname: Option<String>,
}

/// What READ_REPLICATION_SLOT (or pg_replication_slots) says of a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// `physical` or `logical`.
    pub slot_type: String,
    /// Oldest WAL the slot holds; `None` when no WAL is reserved.
    pub restart_lsn: Option<Lsn>,
    /// Timeline of `restart_lsn` (known on PostgreSQL 15+ only).
    pub restart_tli: Option<TimelineId>,
}

/// A connection in physical replication mode.
pub struct ReplicationClient {
    conn: Connection,
    params: ConnectParams,
}

impl ReplicationClient {
    /// Opens a `replication=true` connection with `params`.
    pub async fn connect(params: &ConnectParams) -> Result<Self> {
        let params = params.for_replication();
        let conn = Connection::connect(&params).await?;
        Ok(ReplicationClient { conn, params })
    }

    pub fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    pub fn server_major(&self) -> Result<u32> {
        self.conn.server_major()
    }

    async fn one_row(&mut self, command: &str) -> Result<QueryResult> {
        let r = self.conn.query_one_result(command).await?;
        if r.rows.len() != 1 {
            return Err(Error::protocol(format!(
                "{command} returned {} rows, expected 1",
                r.rows.len()
            )));
        }
        Ok(r)
    }

    pub async fn identify_system(&mut self) -> Result<SystemIdentity> {
        let r = self.one_row("IDENTIFY_SYSTEM").await?;
        let system_id = r.required(0, "systemid")?;
        let missing = |c: &str| Error::protocol(format!("IDENTIFY_SYSTEM returned no {c}"));
        Ok(SystemIdentity {
            system_id: system_id
                .parse()
                .map_err(|_| Error::protocol(format!("bad systemid {system_id:?}")))?,
            timeline: r
                .timeline(0, "timeline")?
                .ok_or_else(|| missing("timeline"))?,
            xlogpos: r.lsn(0, "xlogpos")?.ok_or_else(|| missing("xlogpos"))?,
            dbname: r.text(0, "dbname")?,
        })
    }

    /// `SHOW name` over the replication connection.
    pub async fn show(&mut self, name: &str) -> Result<String> {
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            return Err(Error::Config(format!("invalid setting name {name:?}")));
        }
        let r = self.one_row(&format!("SHOW {name}")).await?;
        let col = r
            .columns
            .first()
            .map(|c| c.name.clone())
            .unwrap_or_default();
        r.required(0, &col)
    }

    /// The server's WAL segment size (`SHOW wal_segment_size`).
    pub async fn wal_segment_size(&mut self) -> Result<SegmentSize> {
        let v = self.show("wal_segment_size").await?;
        SegmentSize::from_show(&v).map_err(|e| Error::protocol(e.to_string()))
    }

    /// TIMELINE_HISTORY: the history file's name and raw contents.
    pub async fn timeline_history(&mut self, tli: TimelineId) -> Result<(String, Bytes)> {
        let r = self
            .one_row(&format!("TIMELINE_HISTORY {}", tli.get()))
            .await?;
        let filename = r.required(0, "filename")?;
        let content = r.rows[0]
            .get(1)
            .cloned()
            .flatten()
            .ok_or_else(|| Error::protocol("TIMELINE_HISTORY returned no content"))?;
        Ok((filename, content))
    }

    /// CREATE_REPLICATION_SLOT name PHYSICAL [RESERVE_WAL]. Returns the position WAL is
    /// reserved from, when the server reports one.
    pub async fn create_physical_slot(
        &mut self,
        name: &str,
        reserve_wal: bool,
    ) -> Result<Option<Lsn>> {
        validate_slot_name(name)?;
        let cmd = match (self.server_major()? >= 15, reserve_wal) {
            (true, true) => format!("CREATE_REPLICATION_SLOT {name} PHYSICAL (RESERVE_WAL)"),
            (false, true) => format!("CREATE_REPLICATION_SLOT {name} PHYSICAL RESERVE_WAL"),
            (_, false) => format!("CREATE_REPLICATION_SLOT {name} PHYSICAL"),
        };
        let r = self.one_row(&cmd).await?;
        match r.text(0, "consistent_point")? {
            Some(p) => {
                Ok(Some(p.parse().map_err(|e| {
                    Error::protocol(format!("bad consistent_point: {e}"))
                })?))
            }
            None => Ok(None),
        }
    }

    /// The slot's state, `None` when it does not exist. Uses READ_REPLICATION_SLOT on
    /// PostgreSQL 15+, and a query of pg_replication_slots over an ordinary connection (same
    /// settings) before that, since replication connections cannot run SQL.
    pub async fn read_replication_slot(&mut self, name: &str) -> Result<Option<SlotInfo>> {
        validate_slot_name(name)?;
        if self.server_major()? >= 15 {
            let r = self
                .one_row(&format!("READ_REPLICATION_SLOT {name}"))
                .await?;
            let Some(slot_type) = r.text(0, "slot_type")? else {
                return Ok(None);
            };
            return Ok(Some(SlotInfo {
                slot_type,
                restart_lsn: r.lsn(0, "restart_lsn")?,
                restart_tli: r.timeline(0, "restart_tli")?,
            }));
        }
        let mut sql = Connection::connect(&self.params.for_sql()).await?;
        let r = sql
            .query_one_result(&format!(
                "SELECT slot_type, restart_lsn::text AS restart_lsn FROM pg_catalog.pg_replication_slots WHERE slot_name = '{name}'"
            ))
            .await;
        let _ = sql.close().await;
        let r = r?;
        if r.rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(SlotInfo {
            restart_lsn: r.lsn(0, "restart_lsn")?,
            slot_type: r.required(0, "slot_type")?,
            restart_tli: None,
        }))
    }

    /// DROP_REPLICATION_SLOT name [WAIT].
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<()> {
        validate_slot_name(name)?;
        let cmd = if wait {
            format!("DROP_REPLICATION_SLOT {name} WAIT")
        } else {
            format!("DROP_REPLICATION_SLOT {name}")
        };
        self.conn.simple_query(&cmd).await?;
        Ok(())
    }

    /// START_REPLICATION [SLOT s] PHYSICAL lsn [TIMELINE t]. The returned stream borrows the
    /// connection until the timeline ends or the stream is stopped.
    pub async fn start_replication(
        &mut self,
        slot: Option<&str>,
        start: Lsn,
        timeline: Option<TimelineId>,
    ) -> Result<ReplicationStream<'_>> {
        let mut cmd = String::from("START_REPLICATION ");
        if let Some(s) = slot {
            validate_slot_name(s)?;
            cmd.push_str(&format!("SLOT {s} "));
        }
        cmd.push_str(&format!("PHYSICAL {start}"));
        if let Some(t) = timeline {
            cmd.push_str(&format!(" TIMELINE {}", t.get()));
        }
        frontend_msg::query(&cmd, self.conn.write_buffer())?;
        self.conn.flush().await?;
        match self.conn.read_message().await? {
            BackendMessage::CopyBothResponse => Ok(ReplicationStream {
                conn: &mut self.conn,
                state: StreamState::Streaming,
                end: None,
                direct_min: None,
                pending: 0,
                expect_large: false,
            }),
            // Asked for the exact end of a historic timeline: no CopyBoth, only the
            // next-timeline result set (see StartReplication in walsender.c).
            BackendMessage::RowDescription(_) => {
                let end = read_end_of_copy(&mut self.conn, true).await?;
                Ok(ReplicationStream {
                    conn: &mut self.conn,
                    state: StreamState::Ended,
                    end: Some(end),
                    direct_min: None,
                    pending: 0,
                    expect_large: false,
                })
            }
            BackendMessage::ErrorResponse(e) => {
                let _ = self.conn.drain_until_ready().await;
                Err(Error::Server(e))
            }
            other => Err(Error::protocol(format!(
                "unexpected answer to START_REPLICATION: {other:?}"
            ))),
        }
    }

    /// `UPLOAD_MANIFEST` (PostgreSQL 17+): sends the `backup_manifest` of an earlier backup
    /// (COPY IN), which the next `BASE_BACKUP ( INCREMENTAL )` on this connection is taken
    /// against (UploadManifest in walsender.c). A manifest the server rejects is a
    /// [`Error::Server`], after which the connection is usable again.
    pub async fn upload_manifest(&mut self, manifest: &[u8]) -> Result<()> {
        let major = self.server_major()?;
        if major < 17 {
            return Err(Error::Config(format!(
                "UPLOAD_MANIFEST needs PostgreSQL 17+, server is {major}"
            )));
        }
        let conn = &mut self.conn;
        frontend_msg::query("UPLOAD_MANIFEST", conn.write_buffer())?;
        conn.flush().await?;
        match conn.read_message().await? {
            BackendMessage::CopyInResponse => {}
            BackendMessage::ErrorResponse(e) => {
                let _ = conn.drain_until_ready().await;
                return Err(Error::Server(e));
            }
            other => {
                return Err(Error::protocol(format!(
                    "unexpected answer to UPLOAD_MANIFEST: {other:?}"
                )))
            }
        }
        // The server reads as we send; an error it raises meanwhile arrives after CopyDone
        // (it ignores the CopyData that follows an error).
        const PIECE: usize = 64 * 1024;
        for piece in manifest.chunks(PIECE) {
            frontend_msg::copy_data(piece, conn.write_buffer())?;
            conn.flush().await?;
        }
        frontend_msg::copy_done(conn.write_buffer());
        conn.flush().await?;
        let mut error = None;
        let mut completed = false;
        loop {
            match conn.read_message().await? {
                BackendMessage::CommandComplete { .. } => completed = true,
                BackendMessage::ErrorResponse(e) => {
                    error.get_or_insert(e);
                }
                BackendMessage::ReadyForQuery { .. } => break,
                BackendMessage::NoticeResponse(_) | BackendMessage::ParameterStatus { .. } => {}
                other => {
                    return Err(Error::protocol(format!(
                        "unexpected message after UPLOAD_MANIFEST: {other:?}"
                    )))
                }
            }
        }
        match error {
            Some(e) => Err(Error::Server(e)),
            None if completed => Ok(()),
            None => Err(Error::protocol(
                "UPLOAD_MANIFEST ended without CommandComplete",
            )),
        }
    }

    /// Starts BASE_BACKUP; see [`crate::backup`].
    pub async fn base_backup(
        &mut self,
        opts: &crate::backup::BaseBackupOptions,
    ) -> Result<crate::backup::BaseBackupStream<'_>> {
        let major = self.server_major()?;
        crate::backup::BaseBackupStream::start(&mut self.conn, major, opts).await
    }

    pub async fn close(self) -> Result<()> {
        self.conn.close().await
    }
}

#[derive(Debug)]
enum StreamState {
    Streaming,
    /// The server sent CopyDone; we answered and are reading where to continue.
    Ending(EndReader),
    Ended,
}

/// An active START_REPLICATION.
pub struct ReplicationStream<'a> {
    conn: &'a mut Connection,
    state: StreamState,
    end: Option<EndOfTimeline>,
    /// XLogData payloads of at least this many bytes are handed over before they are read
    /// ([`ReplicationStream::receive_payloads_directly`]).
    direct_min: Option<usize>,
    /// Bytes of the current XLogData payload still on the socket.
    pending: usize,
    /// The last XLogData was received directly: read the next message header alone, so that
    /// its payload is not read into the buffer with it.
    expect_large: bool,
}

/// Collects what follows CopyDone: the optional next-timeline result set, CommandComplete,
/// ReadyForQuery. Fed one message at a time so that a stream stays cancel-safe.
#[derive(Debug, Default)]
struct EndReader {
    in_result: bool,
    next_tli: Option<TimelineId>,
    next_tli_start: Option<Lsn>,
}

impl EndReader {
    /// Returns the end once ReadyForQuery arrives.
    fn on_message(&mut self, msg: BackendMessage) -> Result<Option<EndOfTimeline>> {
        match msg {
            BackendMessage::RowDescription(_) => self.in_result = true,
            BackendMessage::DataRow(cols) if self.in_result => {
                let text = |i: usize| -> Result<Option<String>> {
                    cols.get(i)
                        .cloned()
                        .flatten()
                        .map(|b| {
                            String::from_utf8(b.to_vec())
                                .map_err(|_| Error::protocol("next timeline row is not UTF-8"))
                        })
                        .transpose()
                };
                self.next_tli = text(0)?
                    .map(|t| {
                        t.parse::<u32>()
                            .ok()
                            .and_then(|t| TimelineId::new(t).ok())
                            .ok_or_else(|| Error::protocol(format!("bad next timeline {t:?}")))
                    })
                    .transpose()?;
                self.next_tli_start = text(1)?
                    .map(|l| l.parse::<Lsn>())
                    .transpose()
                    .map_err(|e| Error::protocol(e.to_string()))?;
            }
            BackendMessage::CommandComplete { .. }
            | BackendMessage::CopyData(_)
            | BackendMessage::CopyDone => {}
            BackendMessage::ReadyForQuery { .. } => {
                return Ok(Some(EndOfTimeline {
                    next_tli: self.next_tli,
                    next_tli_start: self.next_tli_start,
                }))
            }
            BackendMessage::ErrorResponse(e) => return Err(Error::Server(e)),
            other => {
                return Err(Error::protocol(format!(
                    "unexpected message at end of streaming: {other:?}"
                )))
            }
        }
        Ok(None)
    }
}

/// Reads the end of a COPY to completion. `in_result` is set when a RowDescription was
/// already consumed.
async fn read_end_of_copy(conn: &mut Connection, in_result: bool) -> Result<EndOfTimeline> {
    let mut reader = EndReader {
        in_result,
        ..Default::default()
    };
    loop {
        let msg = conn.read_message().await?;
        let is_error = matches!(msg, BackendMessage::ErrorResponse(_));
        match reader.on_message(msg) {
            Ok(Some(end)) => return Ok(end),
            Ok(None) => {}
            Err(e) => {
                if is_error {
                    let _ = conn.drain_until_ready().await;
                }
                return Err(e);
            }
        }
    }
}

/// CopyData ('d', length) and XLogData ('w', start, end, time) headers before a payload.
const XLOG_HEADER: usize = 5 + 1 + 8 + 8 + 8;

/// The tag and length of the message the buffer starts with, once its 5-byte header is in and
/// the length is one the parser accepts (`None` otherwise: too short, or a length that
/// [`crate::message::parse_backend`] rejects when asked to parse it).
fn frame_header(buf: &[u8]) -> Option<(u8, usize)> {
    let b = buf.get(..5)?;
    let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
    (4..=crate::message::MAX_MESSAGE_LEN)
        .contains(&len)
        .then_some((b[0], len))
}

impl ReplicationStream<'_> {
    /// From now on, an XLogData payload of at least `min_len` bytes is not read into the
    /// connection's buffer: [`ReplicationStream::next`] returns it as soon as its header is
    /// in, with the bytes that came along as `data` and the count still on the socket as
    /// `rest`, which the caller reads straight into its own memory with
    /// [`ReplicationStream::read_payload`] before it asks for the next message. A receiver
    /// that keeps WAL in segment buffers saves a copy of every byte (docs/benchmarks.md).
    pub fn receive_payloads_directly(&mut self, min_len: usize) {
        self.direct_min = Some(min_len.max(1));
    }

    /// Bytes of the current XLogData payload still to be read with
    /// [`ReplicationStream::read_payload`].
    pub fn payload_pending(&self) -> usize {
        self.pending
    }

    /// Reads the next bytes of the current XLogData payload into `dest`'s spare room (at most
    /// `limit` and the bytes pending; a `Vec` must have the capacity reserved, or it reads in
    /// small pieces); returns how many, never 0. Cancel-safe: a cancelled call read nothing.
    pub async fn read_payload<B: bytes::BufMut + Send>(
        &mut self,
        dest: &mut B,
        limit: usize,
    ) -> Result<usize> {
        if self.pending == 0 {
            return Err(Error::protocol("no XLogData payload is pending"));
        }
        let want = limit.min(self.pending).min(dest.remaining_mut());
        if want == 0 {
            return Err(Error::protocol(
                "read_payload needs room for at least one byte",
            ));
        }
        let n = self.conn.read_into(dest, want).await?;
        self.pending -= n;
        if self.pending == 0 {
            self.expect_large = true;
        }
        Ok(n)
    }

    /// With direct payloads on: the header of a large XLogData whose payload is not all
    /// buffered, taken off the buffer with the payload bytes that are; `Ok(None)` when the
    /// buffer holds something else (a whole message, or not a whole header yet).
    fn take_direct_header(&mut self, min: usize) -> Result<Option<ReplicationEvent>> {
        let buf = self.conn.read_buffer();
        // Not XLogData-sized, or already whole: the ordinary path parses (and checks) it.
        let Some((b'd', len)) = frame_header(buf) else {
            return Ok(None);
        };
        if len < XLOG_HEADER - 1 || buf.len() > len || buf.len() < XLOG_HEADER || buf[5] != b'w' {
            return Ok(None);
        }
        let payload = 1 + len - XLOG_HEADER;
        if payload < min {
            return Ok(None);
        }
        // The XLogData header ('w', start, end, time) is parsed as any other; its payload is
        // what the buffer holds, the rest follows on the socket.
        let header = buf.split_to(XLOG_HEADER).freeze().slice(5..);
        let buffered = buf.split().freeze();
        self.pending = payload - buffered.len();
        let mut ev = parse_walsender(header)?;
        if let ReplicationEvent::XLogData { data, rest, .. } = &mut ev {
            *data = buffered;
            *rest = self.pending;
        }
        Ok(Some(ev))
    }

    /// The next message from the server. Cancel-safe (for `select!` with a status timer): all
    /// progress lives in `self` between awaits.
    pub async fn next(&mut self) -> Result<ReplicationEvent> {
        if self.pending > 0 {
            return Err(Error::protocol(format!(
                "{} bytes of an XLogData payload are still to be read with read_payload",
                self.pending
            )));
        }
        loop {
            match &mut self.state {
                StreamState::Ended => {
                    return match self.end.take() {
                        Some(end) => Ok(ReplicationEvent::EndOfTimeline(end)),
                        None => Err(Error::protocol("replication stream already ended")),
                    }
                }
                StreamState::Ending(reader) => {
                    // Our CopyDone may still sit in the buffer if a flush was interrupted.
                    self.conn.flush().await?;
                    let msg = self.conn.read_message().await?;
                    if let Some(end) = reader.on_message(msg)? {
                        self.state = StreamState::Ended;
                        return Ok(ReplicationEvent::EndOfTimeline(end));
                    }
                }
                StreamState::Streaming if self.direct_min.is_some() => {
                    let min = self.direct_min.expect("guarded");
                    if let Some(ev) = self.take_direct_header(min)? {
                        return Ok(ev);
                    }
                    let buffered = self.conn.read_buffer().len();
                    // A whole message, or a length the ordinary parser rejects: parse now.
                    let parse_now = match frame_header(self.conn.read_buffer()) {
                        Some((_, len)) => buffered > len,
                        None => buffered >= 5,
                    };
                    if parse_now {
                        self.expect_large = false;
                        if let Some(ev) = self.on_streaming_message().await? {
                            return Ok(ev);
                        }
                    } else if self.expect_large && buffered < XLOG_HEADER {
                        // Only the header: the payload after it is read directly.
                        self.conn.fill(Some(XLOG_HEADER - buffered)).await?;
                    } else {
                        self.conn.fill(None).await?;
                    }
                }
                StreamState::Streaming => {
                    if let Some(ev) = self.on_streaming_message().await? {
                        return Ok(ev);
                    }
                }
            }
        }
    }

    /// Reads (or parses the buffered) next message while streaming: an event to return, or
    /// `None` after the server's CopyDone (the stream is then ending).
    async fn on_streaming_message(&mut self) -> Result<Option<ReplicationEvent>> {
        match self.conn.read_message().await? {
            BackendMessage::CopyData(payload) => parse_walsender(payload).map(Some),
            BackendMessage::CopyDone => {
                // End of timeline: answer with our CopyDone, then read where to continue.
                frontend_msg::copy_done(self.conn.write_buffer());
                self.state = StreamState::Ending(EndReader::default());
                Ok(None)
            }
            BackendMessage::ErrorResponse(e) => Err(Error::Server(e)),
            other => Err(Error::protocol(format!(
                "unexpected message during streaming: {other:?}"
            ))),
        }
    }

    /// Sends a standby status update at once.
    pub async fn send_status(&mut self, status: &StandbyStatus) -> Result<()> {
        if !matches!(self.state, StreamState::Streaming) {
            // The server ended this timeline; nothing more is streamed on it, and CopyData
            // after our CopyDone would be a protocol violation. The next stream reports.
            return Ok(());
        }
        let mut payload = BytesMut::with_capacity(34);
        status.encode(&mut payload);
        frontend_msg::copy_data(&payload, self.conn.write_buffer())?;
        self.conn.flush().await
    }

    /// Ends streaming from our side (client CopyDone) and waits until the connection is idle.
    /// WAL the server still sends meanwhile is discarded; the caller has not acknowledged it.
    pub async fn stop(mut self) -> Result<EndOfTimeline> {
        // The server may already have ended the stream: finish reading that end.
        while !matches!(self.state, StreamState::Streaming) {
            if let ReplicationEvent::EndOfTimeline(end) = self.next().await? {
                return Ok(end);
            }
        }
        frontend_msg::copy_done(self.conn.write_buffer());
        self.conn.flush().await?;
        loop {
            match self.conn.read_message().await? {
                BackendMessage::CopyData(_) => {}
                BackendMessage::CopyDone => return read_end_of_copy(self.conn, false).await,
                BackendMessage::ErrorResponse(e) => return Err(Error::Server(e)),
                other => {
                    return Err(Error::protocol(format!(
                        "unexpected message while stopping streaming: {other:?}"
                    )))
                }
            }
        }
    }
}
