//! Wire messages: backend message parsing and frontend message encoding, with no I/O.
//!
//! Backend parsing is our own because `postgres-protocol` does not know CopyBothResponse ('W')
//! or NegotiateProtocolVersion ('v'), and because every malformed input must become an error,
//! never a panic (the parser is fuzzed: `fuzz/fuzz_targets/backend_message.rs`). Frontend
//! encoding delegates to `postgres-protocol` where it has the message.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::frontend;

use crate::error::{Error, Result, ServerError};

/// Upper bound on one backend message. The largest legitimate ones are DataRows holding a
/// timeline history file and CopyData chunks (a few hundred kB); a bigger length means a
/// corrupt stream, and must not make us allocate it.
pub const MAX_MESSAGE_LEN: usize = 256 * 1024 * 1024;

/// Authentication request sub-types ('R').
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<String>,
    },
    SaslContinue {
        data: Bytes,
    },
    SaslFinal {
        data: Bytes,
    },
    /// Kerberos, GSS, SSPI...: not supported, reported by code.
    Unsupported(u32),
}

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDescription {
    pub name: String,
    pub type_oid: u32,
    pub format: i16,
}

/// A message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    Authentication(AuthRequest),
    ParameterStatus {
        name: String,
        value: String,
    },
    BackendKeyData {
        pid: i32,
        secret: i32,
    },
    ReadyForQuery {
        status: u8,
    },
    RowDescription(Vec<FieldDescription>),
    DataRow(Vec<Option<Bytes>>),
    CommandComplete {
        tag: String,
    },
    EmptyQueryResponse,
    ErrorResponse(ServerError),
    NoticeResponse(ServerError),
    CopyOutResponse,
    CopyInResponse,
    CopyBothResponse,
    CopyData(Bytes),
    CopyDone,
    NegotiateProtocolVersion {
        newest_minor: i32,
        unrecognized: Vec<String>,
    },
    NotificationResponse,
    ParameterDescription,
    NoData,
}

struct Reader {
    tag: u8,
    body: Bytes,
}

impl Reader {
    fn short(&self, what: &str) -> Error {
        Error::protocol(format!(
            "message '{}' too short for {what}",
            self.tag as char
        ))
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        if self.body.remaining() < 1 {
            return Err(self.short(what));
        }
        Ok(self.body.get_u8())
    }
    fn i16(&mut self, what: &str) -> Result<i16> {
        if self.body.remaining() < 2 {
            return Err(self.short(what));
        }
        Ok(self.body.get_i16())
    }
    fn i32(&mut self, what: &str) -> Result<i32> {
        if self.body.remaining() < 4 {
            return Err(self.short(what));
        }
        Ok(self.body.get_i32())
    }
    fn bytes(&mut self, n: usize, what: &str) -> Result<Bytes> {
        if self.body.remaining() < n {
            return Err(self.short(what));
        }
        Ok(self.body.split_to(n))
    }
    fn cstr(&mut self, what: &str) -> Result<String> {
        let end = self.body.iter().position(|b| *b == 0).ok_or_else(|| {
            Error::protocol(format!(
                "unterminated string for {what} in '{}'",
                self.tag as char
            ))
        })?;
        let s = self.body.split_to(end);
        self.body.advance(1);
        String::from_utf8(s.to_vec())
            .map_err(|_| Error::protocol(format!("{what} in '{}' is not UTF-8", self.tag as char)))
    }
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.body)
    }
    fn count(&mut self, what: &str) -> Result<usize> {
        let n = self.i16(what)?;
        usize::try_from(n).map_err(|_| Error::protocol(format!("negative {what}: {n}")))
    }
}

fn parse_error_fields(r: &mut Reader) -> Result<ServerError> {
    let mut e = ServerError {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    let mut localized_severity = String::new();
    loop {
        let field = r.u8("error field type")?;
        if field == 0 {
            break;
        }
        let value = r.cstr("error field")?;
        match field {
            b'V' => e.severity = value,
            b'S' => localized_severity = value,
            b'C' => e.code = value,
            b'M' => e.message = value,
            b'D' => e.detail = Some(value),
            b'H' => e.hint = Some(value),
            _ => {}
        }
    }
    if e.severity.is_empty() {
        e.severity = localized_severity;
    }
    Ok(e)
}

/// Parses one complete message from the front of `buf`, consuming it. `Ok(None)` means more
/// bytes are needed; nothing is consumed then.
pub fn parse_backend(buf: &mut BytesMut) -> Result<Option<BackendMessage>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let len = usize::try_from(len)
        .ok()
        .filter(|l| (4..=MAX_MESSAGE_LEN).contains(l))
        .ok_or_else(|| {
            Error::protocol(format!("invalid length {len} of message '{}'", tag as char))
        })?;
    if buf.len() < 1 + len {
        buf.reserve(1 + len - buf.len());
        return Ok(None);
    }
    buf.advance(5);
    let body = buf.split_to(len - 4).freeze();
    let mut r = Reader { tag, body };
    let msg = match tag {
        b'R' => {
            let code = r.i32("authentication code")?;
            BackendMessage::Authentication(match code {
                0 => AuthRequest::Ok,
                3 => AuthRequest::CleartextPassword,
                5 => {
                    let salt = r.bytes(4, "md5 salt")?;
                    AuthRequest::Md5Password {
                        salt: [salt[0], salt[1], salt[2], salt[3]],
                    }
                }
                10 => {
                    let mut mechanisms = Vec::new();
                    loop {
                        let m = r.cstr("SASL mechanism")?;
                        if m.is_empty() {
                            break;
                        }
                        mechanisms.push(m);
                    }
                    AuthRequest::Sasl { mechanisms }
                }
                11 => AuthRequest::SaslContinue { data: r.rest() },
                12 => AuthRequest::SaslFinal { data: r.rest() },
                other => AuthRequest::Unsupported(other as u32),
            })
        }
        b'S' => BackendMessage::ParameterStatus {
            name: r.cstr("parameter name")?,
            value: r.cstr("parameter value")?,
        },
        b'K' => BackendMessage::BackendKeyData {
            pid: r.i32("pid")?,
            secret: r.i32("secret key")?,
        },
        b'Z' => BackendMessage::ReadyForQuery {
            status: r.u8("transaction status")?,
        },
        b'T' => {
            let n = r.count("field count")?;
            let mut fields = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let name = r.cstr("field name")?;
                r.i32("table oid")?;
                r.i16("column number")?;
                let type_oid = r.i32("type oid")? as u32;
                r.i16("type size")?;
                r.i32("type modifier")?;
                let format = r.i16("format code")?;
                fields.push(FieldDescription {
                    name,
                    type_oid,
                    format,
                });
            }
            BackendMessage::RowDescription(fields)
        }
        b'D' => {
            let n = r.count("column count")?;
            let mut cols = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let l = r.i32("column length")?;
                if l == -1 {
                    cols.push(None);
                } else {
                    let l = usize::try_from(l)
                        .map_err(|_| Error::protocol(format!("invalid column length {l}")))?;
                    cols.push(Some(r.bytes(l, "column value")?));
                }
            }
            BackendMessage::DataRow(cols)
        }
        b'C' => BackendMessage::CommandComplete {
            tag: r.cstr("command tag")?,
        },
        b'I' => BackendMessage::EmptyQueryResponse,
        b'E' => BackendMessage::ErrorResponse(parse_error_fields(&mut r)?),
        b'N' => BackendMessage::NoticeResponse(parse_error_fields(&mut r)?),
        b'H' | b'G' | b'W' => {
            r.u8("copy format")?;
            let n = r.count("copy column count")?;
            for _ in 0..n {
                r.i16("copy column format")?;
            }
            match tag {
                b'H' => BackendMessage::CopyOutResponse,
                b'G' => BackendMessage::CopyInResponse,
                _ => BackendMessage::CopyBothResponse,
            }
        }
        b'd' => BackendMessage::CopyData(r.rest()),
        b'c' => BackendMessage::CopyDone,
        b'v' => {
            let newest_minor = r.i32("protocol minor version")?;
            let n = r.i32("option count")?;
            let n = usize::try_from(n).map_err(|_| Error::protocol("negative option count"))?;
            let mut unrecognized = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                unrecognized.push(r.cstr("option name")?);
            }
            BackendMessage::NegotiateProtocolVersion {
                newest_minor,
                unrecognized,
            }
        }
        b'A' => BackendMessage::NotificationResponse,
        b't' => BackendMessage::ParameterDescription,
        b'n' => BackendMessage::NoData,
        other => {
            return Err(Error::protocol(format!(
                "unknown message type {:?} ({other:#04x})",
                other as char
            )))
        }
    };
    Ok(Some(msg))
}

/// Frontend messages, encoded into a buffer that the connection flushes.
pub mod frontend_msg {
    use super::*;

    fn io(e: std::io::Error) -> Error {
        Error::protocol(format!("cannot encode message: {e}"))
    }

    pub fn startup<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
        buf: &mut BytesMut,
    ) -> Result<()> {
        frontend::startup_message(params, buf).map_err(io)
    }

    /// SSLRequest: length 8, code 80877103.
    pub fn ssl_request(buf: &mut BytesMut) {
        frontend::ssl_request(buf)
    }

    pub fn password(password: &[u8], buf: &mut BytesMut) -> Result<()> {
        frontend::password_message(password, buf).map_err(io)
    }

    pub fn sasl_initial_response(mechanism: &str, data: &[u8], buf: &mut BytesMut) -> Result<()> {
        frontend::sasl_initial_response(mechanism, data, buf).map_err(io)
    }

    pub fn sasl_response(data: &[u8], buf: &mut BytesMut) -> Result<()> {
        frontend::sasl_response(data, buf).map_err(io)
    }

    pub fn query(sql: &str, buf: &mut BytesMut) -> Result<()> {
        if sql.as_bytes().contains(&0) {
            return Err(Error::protocol("query contains a NUL byte"));
        }
        frontend::query(sql, buf).map_err(io)
    }

    /// CopyData wrapping `payload`.
    pub fn copy_data(payload: &[u8], buf: &mut BytesMut) -> Result<()> {
        let len =
            i32::try_from(payload.len() + 4).map_err(|_| Error::protocol("CopyData too large"))?;
        buf.put_u8(b'd');
        buf.put_i32(len);
        buf.put_slice(payload);
        Ok(())
    }

    pub fn copy_done(buf: &mut BytesMut) {
        frontend::copy_done(buf)
    }

    pub fn terminate(buf: &mut BytesMut) {
        frontend::terminate(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8]) -> Vec<BackendMessage> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(m) = parse_backend(&mut buf).unwrap() {
            out.push(m);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        out
    }

    #[test]
    fn golden_auth_messages() {
        assert_eq!(
            parse_all(b"R\0\0\0\x08\0\0\0\0"),
            vec![BackendMessage::Authentication(AuthRequest::Ok)]
        );
        assert_eq!(
            parse_all(b"R\0\0\0\x0c\0\0\0\x05abcd"),
            vec![BackendMessage::Authentication(AuthRequest::Md5Password {
                salt: *b"abcd"
            })]
        );
        assert_eq!(
            parse_all(b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0"),
            vec![BackendMessage::Authentication(AuthRequest::Sasl {
                mechanisms: vec!["SCRAM-SHA-256".into()]
            })]
        );
        assert_eq!(
            parse_all(b"R\0\0\0\x0b\0\0\0\x0br=x"),
            vec![BackendMessage::Authentication(AuthRequest::SaslContinue {
                data: Bytes::from_static(b"r=x")
            })]
        );
        assert_eq!(
            parse_all(b"R\0\0\0\x08\0\0\0\x07"),
            vec![BackendMessage::Authentication(AuthRequest::Unsupported(7))]
        );
    }

    #[test]
    fn golden_query_result() {
        // RowDescription with one text column "systemid", one DataRow, CommandComplete, ReadyForQuery.
        let mut b = Vec::new();
        b.extend_from_slice(
            b"T\0\0\0\x21\0\x01systemid\0\0\0\0\0\0\0\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0",
        );
        b.extend_from_slice(b"D\0\0\0\x10\0\x02\0\0\0\x02ab\xff\xff\xff\xff");
        b.extend_from_slice(b"C\0\0\0\x0bSELECT\0");
        b.extend_from_slice(b"Z\0\0\0\x05I");
        let msgs = parse_all(&b);
        assert_eq!(
            msgs,
            vec![
                BackendMessage::RowDescription(vec![FieldDescription {
                    name: "systemid".into(),
                    type_oid: 25,
                    format: 0
                }]),
                BackendMessage::DataRow(vec![Some(Bytes::from_static(b"ab")), None]),
                BackendMessage::CommandComplete {
                    tag: "SELECT".into()
                },
                BackendMessage::ReadyForQuery { status: b'I' },
            ]
        );
    }

    #[test]
    fn golden_error_response() {
        let b = b"E\0\0\0\x2bSFATAL\0VFATAL\0C28P01\0Mpassword failed\0\0";
        assert_eq!(
            parse_all(b),
            vec![BackendMessage::ErrorResponse(ServerError {
                severity: "FATAL".into(),
                code: "28P01".into(),
                message: "password failed".into(),
                detail: None,
                hint: None
            })]
        );
    }

    #[test]
    fn golden_copy_messages() {
        assert_eq!(
            parse_all(b"W\0\0\0\x07\0\0\0"),
            vec![BackendMessage::CopyBothResponse]
        );
        assert_eq!(
            parse_all(b"H\0\0\0\x09\0\0\x01\0\0"),
            vec![BackendMessage::CopyOutResponse]
        );
        assert_eq!(
            parse_all(b"d\0\0\0\x07abc"),
            vec![BackendMessage::CopyData(Bytes::from_static(b"abc"))]
        );
        assert_eq!(parse_all(b"c\0\0\0\x04"), vec![BackendMessage::CopyDone]);
        assert_eq!(
            parse_all(b"v\0\0\0\x13\0\0\0\0\0\0\0\x01_pq_.x\0"),
            vec![BackendMessage::NegotiateProtocolVersion {
                newest_minor: 0,
                unrecognized: vec!["_pq_.x".into()]
            }]
        );
    }

    #[test]
    fn golden_remaining_backend_messages() {
        let mut b = Vec::new();
        b.extend_from_slice(b"S\0\0\0\x18server_version\x0015.4\0");
        b.extend_from_slice(b"K\0\0\0\x0c\0\0\x30\x39\x01\x02\x03\x04");
        b.extend_from_slice(b"N\0\0\0\x18SNOTICE\0C00000\0Mhi\0\0");
        b.extend_from_slice(b"G\0\0\0\x07\0\0\0");
        b.extend_from_slice(b"I\0\0\0\x04");
        b.extend_from_slice(b"R\0\0\0\x0b\0\0\0\x0cv=x");
        b.extend_from_slice(b"R\0\0\0\x08\0\0\0\x03");
        b.extend_from_slice(b"A\0\0\0\x0e\0\0\0\x01ch\0pl\0");
        b.extend_from_slice(b"n\0\0\0\x04");
        assert_eq!(
            parse_all(&b),
            vec![
                BackendMessage::ParameterStatus {
                    name: "server_version".into(),
                    value: "15.4".into()
                },
                BackendMessage::BackendKeyData {
                    pid: 12345,
                    secret: 0x01020304
                },
                BackendMessage::NoticeResponse(ServerError {
                    severity: "NOTICE".into(),
                    code: "00000".into(),
                    message: "hi".into(),
                    detail: None,
                    hint: None
                }),
                BackendMessage::CopyInResponse,
                BackendMessage::EmptyQueryResponse,
                BackendMessage::Authentication(AuthRequest::SaslFinal {
                    data: Bytes::from_static(b"v=x")
                }),
                BackendMessage::Authentication(AuthRequest::CleartextPassword),
                BackendMessage::NotificationResponse,
                BackendMessage::NoData,
            ]
        );
    }

    #[test]
    fn incomplete_input_waits_and_consumes_nothing() {
        let full = b"d\0\0\0\x07abc";
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(parse_backend(&mut buf).unwrap(), None);
            assert_eq!(buf.len(), cut);
        }
    }

    #[test]
    fn malformed_input_is_an_error() {
        for bad in [
            &b"d\0\0\0\x03"[..],
            b"d\xff\xff\xff\xff",
            b"d\x7f\xff\xff\xff",
            b"R\0\0\0\x06\0\0",
            b"R\0\0\0\x0a\0\0\0\x05ab",
            b"S\0\0\0\x08abc\0",
            b"D\0\0\0\x0a\0\x01\0\0\0\x09",
            b"D\0\0\0\x06\xff\xff",
            b"T\0\0\0\x06\0\x01",
            b"q\0\0\0\x04",
            b"E\0\0\0\x06Mx",
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(parse_backend(&mut buf).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn golden_frontend_messages() {
        let mut b = BytesMut::new();
        frontend_msg::startup([("user", "u"), ("replication", "true")], &mut b).unwrap();
        assert_eq!(
            &b[..],
            b"\0\0\0\x21\0\x03\0\0user\0u\0replication\0true\0\0"
        );
        b.clear();
        frontend_msg::ssl_request(&mut b);
        assert_eq!(&b[..], b"\0\0\0\x08\x04\xd2\x16\x2f");
        b.clear();
        frontend_msg::query("IDENTIFY_SYSTEM", &mut b).unwrap();
        assert_eq!(&b[..], b"Q\0\0\0\x14IDENTIFY_SYSTEM\0");
        b.clear();
        frontend_msg::copy_data(b"xy", &mut b).unwrap();
        assert_eq!(&b[..], b"d\0\0\0\x06xy");
        b.clear();
        frontend_msg::copy_done(&mut b);
        assert_eq!(&b[..], b"c\0\0\0\x04");
        b.clear();
        frontend_msg::password(b"pw", &mut b).unwrap();
        assert_eq!(&b[..], b"p\0\0\0\x07pw\0");
        b.clear();
        frontend_msg::sasl_initial_response("SCRAM-SHA-256", b"n,,", &mut b).unwrap();
        assert_eq!(&b[..], b"p\0\0\0\x19SCRAM-SHA-256\0\0\0\0\x03n,,");
        b.clear();
        frontend_msg::sasl_response(b"c=biws,r=x", &mut b).unwrap();
        assert_eq!(&b[..], b"p\0\0\0\x0ec=biws,r=x");
        b.clear();
        frontend_msg::terminate(&mut b);
        assert_eq!(&b[..], b"X\0\0\0\x04");
        assert!(frontend_msg::query("a\0b", &mut b).is_err());
    }
}
