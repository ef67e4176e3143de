//! A connection to a PostgreSQL server: transport (TCP, unix socket, TLS), startup and
//! authentication, message I/O, and the simple-query protocol for ordinary SQL.

use std::collections::HashMap;
use std::io;

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::error::{Error, Result, ServerError};
use crate::message::{frontend_msg, parse_backend, AuthRequest, BackendMessage, FieldDescription};
use crate::params::{ConnectParams, Host, ReplicationMode, SslMode};
use crate::tls;

/// Byte stream under a connection.
pub trait AsyncIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncIo for T {}

/// The rows of one statement's result, in text format.
#[derive(Debug, Clone, Default)]
pub struct QueryResult {
    pub columns: Vec<FieldDescription>,
    pub rows: Vec<Vec<Option<Bytes>>>,
    /// The CommandComplete tag (`SELECT 1`, `CREATE_REPLICATION_SLOT`...).
    pub tag: Option<String>,
}

impl QueryResult {
    /// Column `name` of row `row` as text; `Ok(None)` for SQL NULL.
    pub fn text(&self, row: usize, name: &str) -> Result<Option<String>> {
        let col = self
            .columns
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| Error::protocol(format!("result has no column {name:?}")))?;
        let r = self
            .rows
            .get(row)
            .ok_or_else(|| Error::protocol(format!("result has no row {row}")))?;
        match r.get(col) {
            Some(Some(b)) => String::from_utf8(b.to_vec())
                .map(Some)
                .map_err(|_| Error::protocol(format!("column {name:?} is not UTF-8"))),
            Some(None) => Ok(None),
            None => Err(Error::protocol(format!("row {row} lacks column {name:?}"))),
        }
    }

    /// Column `name` of row `row` as an LSN (`X/X`); `Ok(None)` for NULL.
    pub fn lsn(&self, row: usize, name: &str) -> Result<Option<crate::Lsn>> {
        self.text(row, name)?
            .map(|v| {
                v.parse()
                    .map_err(|e| Error::protocol(format!("column {name:?}: {e}")))
            })
            .transpose()
    }

    /// Column `name` of row `row` as a timeline id; `Ok(None)` for NULL.
    pub fn timeline(&self, row: usize, name: &str) -> Result<Option<crate::TimelineId>> {
        self.text(row, name)?
            .map(|v| {
                v.parse::<u32>()
                    .ok()
                    .and_then(|t| crate::TimelineId::new(t).ok())
                    .ok_or_else(|| Error::protocol(format!("column {name:?}: bad timeline {v:?}")))
            })
            .transpose()
    }

    /// Like [`QueryResult::text`], but NULL is an error.
    pub fn required(&self, row: usize, name: &str) -> Result<String> {
        self.text(row, name)?
            .ok_or_else(|| Error::protocol(format!("column {name:?} is NULL")))
    }
}

/// An open, authenticated connection, idle between commands.
pub struct Connection {
    io: Box<dyn AsyncIo>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    server_params: HashMap<String, String>,
    backend_pid: i32,
    tls: bool,
    describe: String,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("server", &self.describe)
            .field("pid", &self.backend_pid)
            .finish()
    }
}

fn io_err(action: &str, target: &str, e: io::Error) -> Error {
    Error::Io(io::Error::new(e.kind(), format!("{action} {target}: {e}")))
}

impl Connection {
    /// Connects, negotiates TLS as `sslmode` says, authenticates and waits for ReadyForQuery.
    pub async fn connect(params: &ConnectParams) -> Result<Self> {
        let fut = Self::connect_inner(params);
        match params.connect_timeout {
            Some(t) => tokio::time::timeout(t, fut).await.map_err(|_| {
                Error::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {params} timed out"),
                ))
            })?,
            None => fut.await,
        }
    }

    async fn connect_inner(params: &ConnectParams) -> Result<Self> {
        let describe = params.to_string();
        let (io, tls): (Box<dyn AsyncIo>, bool) = match &params.host {
            // libpq never uses TLS on unix sockets; sslmode is ignored there.
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", params.port));
                let s = UnixStream::connect(&path)
                    .await
                    .map_err(|e| io_err("connect to", &path.display().to_string(), e))?;
                (Box::new(s), false)
            }
            Host::Tcp(host) => {
                let target = format!("{host}:{}", params.port);
                let mut s = TcpStream::connect((host.as_str(), params.port))
                    .await
                    .map_err(|e| io_err("connect to", &target, e))?;
                s.set_nodelay(true)?;
                match tls::client_config(params)? {
                    None => (Box::new(s), false),
                    Some(config) => {
                        let mut req = BytesMut::new();
                        frontend_msg::ssl_request(&mut req);
                        s.write_all(&req)
                            .await
                            .map_err(|e| io_err("send SSLRequest to", &target, e))?;
                        let answer = s
                            .read_u8()
                            .await
                            .map_err(|e| io_err("read SSL answer from", &target, e))?;
                        match answer {
                            b'S' => {
                                let connector = tokio_rustls::TlsConnector::from(config);
                                let name = tls::server_name(host)?;
                                let t = connector
                                    .connect(name, s)
                                    .await
                                    .map_err(|e| Error::Tls(format!("handshake with {target}: {e}")))?;
                                (Box::new(t), true)
                            }
                            b'N' if params.sslmode == SslMode::Prefer => (Box::new(s), false),
                            b'N' => {
                                return Err(Error::Tls(format!(
                                    "server {target} does not support SSL, but sslmode {:?} requires it",
                                    params.sslmode
                                )))
                            }
                            other => {
                                return Err(Error::protocol(format!(
                                    "unexpected answer {other:#04x} to SSLRequest from {target}"
                                )))
                            }
                        }
                    }
                }
            }
        };
        let mut conn = Connection {
            io,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(1024),
            server_params: HashMap::new(),
            backend_pid: 0,
            tls,
            describe,
        };
        conn.startup(params).await?;
        Ok(conn)
    }

    async fn startup(&mut self, params: &ConnectParams) -> Result<()> {
        let mut startup: Vec<(&str, &str)> = vec![
            ("user", &params.user),
            ("application_name", &params.application_name),
        ];
        match params.replication {
            ReplicationMode::Physical => startup.push(("replication", "true")),
            ReplicationMode::Off => startup.push(("database", params.database())),
        }
        if let Some(o) = &params.options {
            startup.push(("options", o));
        }
        frontend_msg::startup(startup, &mut self.wbuf)?;
        self.flush().await?;

        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.read_message().await? {
                BackendMessage::Authentication(req) => match req {
                    AuthRequest::Ok => break,
                    AuthRequest::CleartextPassword => {
                        let pw = self.password(params)?;
                        frontend_msg::password(pw.as_bytes(), &mut self.wbuf)?;
                        self.flush().await?;
                    }
                    AuthRequest::Md5Password { salt } => {
                        let pw = self.password(params)?;
                        let hash = postgres_protocol::authentication::md5_hash(params.user.as_bytes(), pw.as_bytes(), salt);
                        frontend_msg::password(hash.as_bytes(), &mut self.wbuf)?;
                        self.flush().await?;
                    }
                    AuthRequest::Sasl { mechanisms } => {
                        if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                            return Err(Error::Auth(format!("server offers SASL mechanisms {mechanisms:?}, none supported")));
                        }
                        let pw = self.password(params)?;
                        // Channel binding is not offered ('n'); the TLS layer already
                        // authenticates the server where sslmode asks for it.
                        let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                        frontend_msg::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.wbuf)?;
                        self.flush().await?;
                        scram = Some(s);
                    }
                    AuthRequest::SaslContinue { data } => {
                        let s = scram.as_mut().ok_or_else(|| Error::protocol("SASLContinue without SASL"))?;
                        s.update(&data).map_err(|e| Error::Auth(format!("SCRAM exchange failed: {e}")))?;
                        frontend_msg::sasl_response(s.message(), &mut self.wbuf)?;
                        self.flush().await?;
                    }
                    AuthRequest::SaslFinal { data } => {
                        let s = scram.as_mut().ok_or_else(|| Error::protocol("SASLFinal without SASL"))?;
                        s.finish(&data).map_err(|e| Error::Auth(format!("SCRAM server signature rejected: {e}")))?;
                    }
                    AuthRequest::Unsupported(code) => {
                        return Err(Error::Auth(format!("server requests authentication method {code}, which walhoard does not support")))
                    }
                },
                BackendMessage::ErrorResponse(e) => return Err(Error::Server(e)),
                BackendMessage::NegotiateProtocolVersion { newest_minor, unrecognized } => {
                    tracing::debug!(newest_minor, ?unrecognized, "server negotiated protocol version");
                }
                other => return Err(Error::protocol(format!("unexpected message during authentication: {other:?}"))),
            }
        }
        loop {
            match self.read_message().await? {
                BackendMessage::BackendKeyData { pid, .. } => self.backend_pid = pid,
                BackendMessage::ReadyForQuery { .. } => return Ok(()),
                BackendMessage::ErrorResponse(e) => return Err(Error::Server(e)),
                BackendMessage::NegotiateProtocolVersion { .. } => {}
                other => {
                    return Err(Error::protocol(format!(
                        "unexpected message after authentication: {other:?}"
                    )))
                }
            }
        }
    }

    fn password(&self, params: &ConnectParams) -> Result<String> {
        params.resolve_password().ok_or_else(|| {
            Error::Auth(format!(
                "server {} requests a password for user {:?} but none was given (password, PGPASSWORD or .pgpass)",
                self.describe, params.user
            ))
        })
    }

    /// Reads the next message that callers care about. Notices are logged and parameter
    /// changes recorded here. Cancel-safe: a partly received message stays buffered.
    pub async fn read_message(&mut self) -> Result<BackendMessage> {
        loop {
            if let Some(msg) = parse_backend(&mut self.rbuf)? {
                match msg {
                    BackendMessage::NoticeResponse(n) => {
                        tracing::info!(server = %self.describe, "server notice: {n}");
                    }
                    BackendMessage::ParameterStatus { name, value } => {
                        self.server_params.insert(name, value);
                    }
                    other => return Ok(other),
                }
                continue;
            }
            self.fill(None).await?;
        }
    }

    /// The received bytes not yet parsed (the replication stream peeks at message headers).
    pub(crate) fn read_buffer(&mut self) -> &mut BytesMut {
        &mut self.rbuf
    }

    /// Reads from the server into the read buffer: at most `limit` bytes when given, else as
    /// much as the buffer takes. Cancel-safe (one read). End of stream is an error naming how
    /// much of a message was buffered.
    pub(crate) async fn fill(&mut self, limit: Option<usize>) -> Result<()> {
        let n = match limit {
            Some(limit) => {
                let mut tmp = [0u8; 64];
                let want = limit.clamp(1, tmp.len());
                let n = self.io.read(&mut tmp[..want]).await?;
                self.rbuf.extend_from_slice(&tmp[..n]);
                n
            }
            None => self.io.read_buf(&mut self.rbuf).await?,
        };
        if n == 0 {
            return Err(self.closed());
        }
        Ok(())
    }

    /// Reads the next bytes of a message body straight into `dest`, at most `limit` (the read
    /// buffer must not hold any of them). Cancel-safe (one read); returns how many bytes, never
    /// 0. `dest` is filled in its spare capacity, uninitialised memory included.
    pub(crate) async fn read_into<B: bytes::BufMut + Send>(
        &mut self,
        dest: &mut B,
        limit: usize,
    ) -> Result<usize> {
        debug_assert!(self.rbuf.is_empty());
        let mut dest = bytes::BufMut::limit(dest, limit);
        let n = self.io.read_buf(&mut dest).await?;
        if n == 0 {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection in the middle of a message",
            )));
        }
        Ok(n)
    }

    fn closed(&self) -> Error {
        if self.rbuf.is_empty() {
            Error::Closed
        } else {
            Error::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "server closed the connection in the middle of a message ({} bytes buffered)",
                    self.rbuf.len()
                ),
            ))
        }
    }

    /// The buffer outgoing messages are encoded into; [`Connection::flush`] sends it.
    pub fn write_buffer(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    pub async fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            self.io.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        self.io.flush().await?;
        Ok(())
    }

    /// Sends a simple query and collects every result until ReadyForQuery. A server error is
    /// returned after the connection is back at ReadyForQuery, so it stays usable.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<QueryResult>> {
        frontend_msg::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        let mut results = Vec::new();
        let mut current: Option<QueryResult> = None;
        let mut error: Option<ServerError> = None;
        loop {
            match self.read_message().await? {
                BackendMessage::RowDescription(columns) => {
                    current = Some(QueryResult {
                        columns,
                        ..Default::default()
                    })
                }
                BackendMessage::DataRow(row) => current
                    .as_mut()
                    .ok_or_else(|| Error::protocol("DataRow without RowDescription"))?
                    .rows
                    .push(row),
                BackendMessage::CommandComplete { tag } => {
                    let mut r = current.take().unwrap_or_default();
                    r.tag = Some(tag);
                    results.push(r);
                }
                BackendMessage::EmptyQueryResponse => {}
                BackendMessage::ErrorResponse(e) => error = Some(e),
                BackendMessage::ReadyForQuery { .. } => break,
                BackendMessage::CopyInResponse
                | BackendMessage::CopyOutResponse
                | BackendMessage::CopyBothResponse => {
                    return Err(Error::protocol(format!(
                        "query {sql:?} started a COPY; use the streaming API"
                    )))
                }
                other => {
                    return Err(Error::protocol(format!(
                        "unexpected message in query result: {other:?}"
                    )))
                }
            }
        }
        match error {
            Some(e) => Err(Error::Server(e)),
            None => Ok(results),
        }
    }

    /// Runs a query expected to return exactly one result set.
    pub async fn query_one_result(&mut self, sql: &str) -> Result<QueryResult> {
        let mut results = self.simple_query(sql).await?;
        if results.len() != 1 {
            return Err(Error::protocol(format!(
                "{sql:?} returned {} result sets, expected 1",
                results.len()
            )));
        }
        Ok(results.remove(0))
    }

    /// Reads and discards messages until ReadyForQuery; returns the first error seen.
    pub(crate) async fn drain_until_ready(&mut self) -> Result<Option<ServerError>> {
        let mut first_error = None;
        loop {
            match self.read_message().await? {
                BackendMessage::ReadyForQuery { .. } => return Ok(first_error),
                BackendMessage::ErrorResponse(e) => {
                    first_error.get_or_insert(e);
                }
                _ => {}
            }
        }
    }

    /// A parameter the server reported (`server_version`, `integer_datetimes`...).
    pub fn server_param(&self, name: &str) -> Option<&str> {
        self.server_params.get(name).map(String::as_str)
    }

    /// `server_version_num` derived from the reported `server_version` (e.g. 150018, 170010).
    pub fn server_version_num(&self) -> Result<u32> {
        let v = self
            .server_param("server_version")
            .ok_or_else(|| Error::protocol("server did not report server_version"))?;
        parse_server_version(v)
    }

    /// The server's major version (13, 14, ..., 18).
    pub fn server_major(&self) -> Result<u32> {
        Ok(self.server_version_num()? / 10000)
    }

    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Sends Terminate and closes the socket.
    pub async fn close(mut self) -> Result<()> {
        frontend_msg::terminate(&mut self.wbuf);
        self.flush().await?;
        self.io.shutdown().await?;
        Ok(())
    }
}

/// Parses `server_version` as reported at startup: "15.18 (Debian 15.18-0+deb12u1)", "17.10",
/// "18beta1" → 150018, 170010, 180000.
pub fn parse_server_version(v: &str) -> Result<u32> {
    let bad = || Error::protocol(format!("cannot parse server_version {v:?}"));
    let digits_and_dots: String = v
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = digits_and_dots.split('.').filter(|p| !p.is_empty());
    let major: u32 = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    let minor: u32 = parts
        .next()
        .map(|m| m.parse().map_err(|_| bad()))
        .transpose()?
        .unwrap_or(0);
    if major < 10 {
        return Err(Error::protocol(format!(
            "server_version {v:?} is older than walhoard supports"
        )));
    }
    Ok(major * 10000 + minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        assert_eq!(
            parse_server_version("15.18 (Debian 15.18-0+deb12u1)").unwrap(),
            150018
        );
        assert_eq!(parse_server_version("17.10").unwrap(), 170010);
        assert_eq!(parse_server_version("18beta1").unwrap(), 180000);
        assert_eq!(parse_server_version("13.23").unwrap(), 130023);
        assert!(parse_server_version("9.6.1").is_err());
        assert!(parse_server_version("devel").is_err());
    }

    #[test]
    fn query_result_accessors() {
        let r = QueryResult {
            columns: vec![FieldDescription {
                name: "a".into(),
                type_oid: 25,
                format: 0,
            }],
            rows: vec![vec![Some(Bytes::from_static(b"x"))], vec![None]],
            tag: None,
        };
        assert_eq!(r.text(0, "a").unwrap().as_deref(), Some("x"));
        assert_eq!(r.text(1, "a").unwrap(), None);
        assert!(r.required(1, "a").is_err());
        assert!(r.text(0, "b").is_err());
        assert!(r.text(2, "a").is_err());
    }
}
