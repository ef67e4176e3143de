//! Faults a real server cannot be made to produce: a connection cut in the middle of a message
//! and malformed frames. A hand-written fake primary on loopback plays the server here; this is
//! the only place the tests use one. Here too: XLogData payloads read straight off the socket,
//! whose tests need the server's writes split at chosen places, which a real walsender does not
//! let us choose (the receiver's tests cover the same path against real servers).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use walhoard_protocol::{ConnectParams, Connection, Error};

/// A loopback listener and its port.
async fn listen() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

/// Accepts one connection and reads its startup packet.
async fn accept_startup(listener: TcpListener) -> tokio::net::TcpStream {
    let (mut sock, _) = listener.accept().await.unwrap();
    let len = sock.read_i32().await.unwrap();
    let mut startup = vec![0u8; len as usize - 4];
    sock.read_exact(&mut startup).await.unwrap();
    sock
}

/// Accepts one connection, reads the startup packet, sends `reply` and closes.
async fn fake_primary(reply: &'static [u8]) -> u16 {
    let (listener, port) = listen().await;
    tokio::spawn(async move {
        let mut sock = accept_startup(listener).await;
        sock.write_all(reply).await.unwrap();
        sock.shutdown().await.unwrap();
    });
    port
}

async fn connect(port: u16) -> Error {
    let p = ConnectParams::parse(&format!(
        "host=127.0.0.1 port={port} user=u sslmode=disable"
    ))
    .unwrap();
    Connection::connect(&p).await.unwrap_err()
}

#[tokio::test]
async fn protocol_fault_cut_mid_message() {
    // AuthenticationOk, then half of a ParameterStatus.
    let port = fake_primary(b"R\0\0\0\x08\0\0\0\0S\0\0\0\x20server_ver").await;
    let err = connect(port).await;
    assert!(
        matches!(&err, Error::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof),
        "{err}"
    );
    assert!(err.is_retryable());
}

#[tokio::test]
async fn protocol_fault_malformed_frames() {
    for reply in [
        &b"R\0\0\0\x08\0\0\0\0Z\xff\xff\xff\xffI"[..], // negative length
        b"R\0\0\0\x08\0\0\0\0Q\0\0\0\x04",             // unknown message type
        b"R\0\0\0\x06\0\0",                            // auth message too short
        b"R\0\0\0\x08\0\0\0\0d\0\0\0\x05x",            // CopyData during startup
    ] {
        let port = fake_primary(reply).await;
        let err = connect(port).await;
        assert!(matches!(err, Error::Protocol(_)), "{reply:?}: {err}");
    }
}

#[tokio::test]
async fn protocol_fault_closed_before_answer() {
    let port = fake_primary(b"").await;
    let err = connect(port).await;
    assert!(matches!(err, Error::Closed), "{err}");
}

/// What the fake walsender does after START_REPLICATION.
enum Step {
    Send(Vec<u8>),
    Pause(u64),
}

/// A fake walsender: answers the startup with AuthenticationOk and ReadyForQuery, reads one
/// query (START_REPLICATION), answers CopyBothResponse, then plays `steps` and closes.
async fn fake_walsender(steps: Vec<Step>) -> u16 {
    let (listener, port) = listen().await;
    tokio::spawn(async move {
        let mut sock = accept_startup(listener).await;
        sock.write_all(b"R\0\0\0\x08\0\0\0\0Z\0\0\0\x05I")
            .await
            .unwrap();
        assert_eq!(sock.read_u8().await.unwrap(), b'Q');
        let len = sock.read_i32().await.unwrap();
        let mut query = vec![0u8; len as usize - 4];
        sock.read_exact(&mut query).await.unwrap();
        sock.write_all(b"W\0\0\0\x07\0\0\0").await.unwrap();
        for step in steps {
            match step {
                Step::Send(b) => sock.write_all(&b).await.unwrap(),
                Step::Pause(ms) => tokio::time::sleep(std::time::Duration::from_millis(ms)).await,
            }
        }
        let _ = sock.shutdown().await;
    });
    port
}

/// CopyData(XLogData) at `start` carrying `payload`.
fn xlogdata(start: u64, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![b'd'];
    m.extend_from_slice(&(4 + 25 + payload.len() as u32).to_be_bytes());
    m.push(b'w');
    m.extend_from_slice(&start.to_be_bytes());
    m.extend_from_slice(&(start + payload.len() as u64).to_be_bytes());
    m.extend_from_slice(&0u64.to_be_bytes());
    m.extend_from_slice(payload);
    m
}

fn keepalive(end: u64) -> Vec<u8> {
    let mut m = b"d\0\0\0\x16k".to_vec();
    m.extend_from_slice(&end.to_be_bytes());
    m.extend_from_slice(&0u64.to_be_bytes());
    m.push(1);
    m
}

async fn direct_stream_client(port: u16) -> walhoard_protocol::ReplicationClient {
    let p = ConnectParams::parse(&format!(
        "host=127.0.0.1 port={port} user=u sslmode=disable"
    ))
    .unwrap();
    walhoard_protocol::ReplicationClient::connect(&p)
        .await
        .unwrap()
}

/// START_REPLICATION at 0/1000000, payloads of 16 kB or more received directly.
async fn start_direct(
    client: &mut walhoard_protocol::ReplicationClient,
) -> walhoard_protocol::ReplicationStream<'_> {
    let mut stream = client
        .start_replication(None, walhoard_protocol::Lsn(0x1000000), None)
        .await
        .unwrap();
    stream.receive_payloads_directly(16 * 1024);
    stream
}

/// Payloads received directly arrive whole and in order however the server's writes split
/// them (the header alone, a header with part of the payload, payloads cut anywhere), with
/// small messages between them parsed as usual.
#[tokio::test]
async fn protocol_direct_payloads_arrive_whole_however_split() {
    use walhoard_protocol::{Lsn, ReplicationEvent};
    let big1: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let small: Vec<u8> = (0..1000u32).map(|i| (i % 13) as u8).collect();
    let big2: Vec<u8> = (0..40_000u32).map(|i| (i % 7) as u8).collect();
    let m1 = xlogdata(0x1000000, &big1);
    let m2 = xlogdata(0x1000000 + 100_000, &small);
    let m3 = xlogdata(0x1000000 + 101_000, &big2);
    let mut steps = vec![
        Step::Send(m1[..10].to_vec()),
        Step::Pause(20),
        Step::Send(m1[10..40_000].to_vec()),
        Step::Pause(20),
        Step::Send(m1[40_000..].to_vec()),
        Step::Send(keepalive(0x1000000 + 100_000)),
    ];
    let mut rest = m2.clone();
    rest.extend_from_slice(&m3[..30]);
    steps.push(Step::Send(rest));
    steps.push(Step::Pause(20));
    steps.push(Step::Send(m3[30..].to_vec()));
    steps.push(Step::Send(keepalive(0x1000000 + 141_000)));
    let port = fake_walsender(steps).await;
    let mut client = direct_stream_client(port).await;
    let mut stream = start_direct(&mut client).await;
    let mut got = Vec::new();
    let (mut keepalives, mut direct_messages) = (0, 0);
    while keepalives < 2 {
        match stream.next().await.unwrap() {
            ReplicationEvent::XLogData {
                wal_start,
                data,
                rest,
                ..
            } => {
                assert_eq!(wal_start, Lsn(0x1000000 + got.len() as u64));
                got.extend_from_slice(&data);
                if rest > 0 {
                    direct_messages += 1;
                    // Asking for the next message first is refused, not silently wrong.
                    assert!(matches!(stream.next().await, Err(Error::Protocol(_))));
                }
                let mut left = rest;
                while left > 0 {
                    got.reserve(left);
                    let n = stream.read_payload(&mut got, left).await.unwrap();
                    assert!(n > 0 && n <= left);
                    left -= n;
                }
                assert_eq!(stream.payload_pending(), 0);
            }
            ReplicationEvent::Keepalive { .. } => keepalives += 1,
            ReplicationEvent::EndOfTimeline(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(direct_messages, 2, "both large payloads were read directly");
    let mut want = big1.clone();
    want.extend_from_slice(&small);
    want.extend_from_slice(&big2);
    assert!(got == want, "received bytes differ from those sent");
}

/// A connection cut in the middle of a payload being read directly is an end-of-stream error
/// (retryable), and a CopyData length no server sends is a protocol error, not a read that
/// waits for 4 GB.
#[tokio::test]
async fn protocol_direct_payload_cut_or_malformed() {
    use walhoard_protocol::ReplicationEvent;
    let payload = vec![7u8; 100_000];
    let m = xlogdata(0x1000000, &payload);
    let port = fake_walsender(vec![Step::Send(m[..50_000].to_vec())]).await;
    let mut client = direct_stream_client(port).await;
    let mut stream = start_direct(&mut client).await;
    let ReplicationEvent::XLogData { data, rest, .. } = stream.next().await.unwrap() else {
        panic!("expected XLogData");
    };
    assert_eq!(data.len() + rest, 100_000);
    let mut sink = Vec::with_capacity(rest);
    let err = loop {
        match stream.read_payload(&mut sink, rest).await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&err, Error::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof),
        "{err}"
    );
    assert!(err.is_retryable());
    assert_eq!(data.len() + sink.len(), 50_000 - 30);

    let mut bad = b"d\xff\xff\xff\xf0w".to_vec();
    bad.extend_from_slice(&[0u8; 100]);
    let port = fake_walsender(vec![Step::Send(bad)]).await;
    let mut client = direct_stream_client(port).await;
    let mut stream = start_direct(&mut client).await;
    let err = stream.next().await.unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{err}");
}

/// A fake primary for the whole receiver (`walhoard_walreceiver::run`), for WAL a real server
/// cannot be made to send: a segment of zeros, an end of timeline that announces the same or
/// an earlier timeline. It answers the startup (PostgreSQL 15), IDENTIFY_SYSTEM, SHOW,
/// READ_REPLICATION_SLOT (slot at 0/1000000), then plays `script` after START_REPLICATION,
/// and records every flush position the receiver reports. Every connection plays it again.
mod fake_receiver_primary {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::{mpsc, watch};
    use tokio_util::sync::CancellationToken;
    use walhoard_protocol::{ConnectParams, Lsn};
    use walhoard_walreceiver::{run, ReceiverConfig, ReceiverEvent, ReceiverPositions};

    pub const SYSTEM_ID: u64 = 7_000_000_000_000_000_001;
    pub const START: u64 = 0x100_0000;

    #[derive(Clone)]
    pub enum Act {
        /// XLogData at the given LSN.
        Wal(u64, Vec<u8>),
        /// A pause (ms), long enough for the receiver's status updates.
        Pause(u64),
        /// The server ends the timeline (CopyDone) and, after the client's CopyDone, names
        /// the next timeline and where it starts.
        EndTimeline(u32, u64),
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// One result set of text columns, then CommandComplete and ReadyForQuery.
    fn rows(cols: &[&str], values: &[Option<&str>]) -> Vec<u8> {
        let mut out = result_set(cols, values);
        out.extend(msg(b'C', b"SELECT 1\0"));
        out.extend(msg(b'Z', b"I"));
        out
    }

    /// RowDescription and one DataRow of text columns.
    fn result_set(cols: &[&str], values: &[Option<&str>]) -> Vec<u8> {
        let mut t = (cols.len() as u16).to_be_bytes().to_vec();
        for c in cols {
            t.extend_from_slice(c.as_bytes());
            t.push(0);
            t.extend_from_slice(&0u32.to_be_bytes());
            t.extend_from_slice(&0u16.to_be_bytes());
            t.extend_from_slice(&25u32.to_be_bytes());
            t.extend_from_slice(&(-1i16).to_be_bytes());
            t.extend_from_slice(&(-1i32).to_be_bytes());
            t.extend_from_slice(&0u16.to_be_bytes());
        }
        let mut d = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                Some(v) => {
                    d.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    d.extend_from_slice(v.as_bytes());
                }
                None => d.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        let mut out = msg(b'T', &t);
        out.extend(msg(b'D', &d));
        out
    }

    /// Reads one frontend message: its tag and body; `None` at end of stream.
    async fn read_msg<R: AsyncRead + Unpin>(sock: &mut R) -> Option<(u8, Vec<u8>)> {
        let tag = sock.read_u8().await.ok()?;
        let len = sock.read_i32().await.ok()?;
        let mut body = vec![0u8; (len as usize).checked_sub(4)?];
        sock.read_exact(&mut body).await.ok()?;
        Some((tag, body))
    }

    /// Plays `script` after CopyBothResponse while another task reads what the receiver
    /// sends (its status updates are recorded even while the script writes), then waits for
    /// the receiver to hang up. This fake ends with the stream.
    async fn stream(sock: TcpStream, script: Vec<Act>, flushes: Arc<Mutex<Vec<Lsn>>>) {
        let (mut rd, mut wr) = sock.into_split();
        let (copy_done_tx, mut copy_done) = mpsc::channel::<()>(1);
        let reader = tokio::spawn(async move {
            while let Some((tag, body)) = read_msg(&mut rd).await {
                match tag {
                    b'd' => note_status(&body, &flushes),
                    b'c' => {
                        let _ = copy_done_tx.send(()).await;
                    }
                    _ => return,
                }
            }
        });
        for act in script {
            match act {
                Act::Wal(at, data) => {
                    for (i, chunk) in data.chunks(128 * 1024).enumerate() {
                        let start = at + (i * 128 * 1024) as u64;
                        if wr.write_all(&super::xlogdata(start, chunk)).await.is_err() {
                            break;
                        }
                    }
                }
                Act::Pause(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                Act::EndTimeline(next, next_start) => {
                    if wr.write_all(&msg(b'c', &[])).await.is_err() {
                        break;
                    }
                    // The client's CopyDone, then where the next timeline starts.
                    if copy_done.recv().await.is_none() {
                        break;
                    }
                    let start = format!("{:X}/{:X}", next_start >> 32, next_start & 0xffff_ffff);
                    let mut end = result_set(
                        &["next_tli", "next_tli_startpos"],
                        &[Some(&next.to_string()), Some(&start)],
                    );
                    // START_REPLICATION's own CommandComplete, as StartReplication sends it.
                    end.extend(msg(b'C', b"START_STREAMING\0"));
                    end.extend(msg(b'Z', b"I"));
                    if wr.write_all(&end).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), reader).await;
    }

    /// Records the flush position of a standby status update ('r').
    fn note_status(body: &[u8], flushes: &Mutex<Vec<Lsn>>) {
        if body.first() == Some(&b'r') && body.len() >= 17 {
            let mut f = [0u8; 8];
            f.copy_from_slice(&body[9..17]);
            flushes.lock().unwrap().push(Lsn(u64::from_be_bytes(f)));
        }
    }

    async fn serve(mut sock: TcpStream, tli: u32, script: Vec<Act>, flushes: Arc<Mutex<Vec<Lsn>>>) {
        let len = sock.read_i32().await.unwrap();
        let mut startup = vec![0u8; len as usize - 4];
        sock.read_exact(&mut startup).await.unwrap();
        let mut hello = msg(b'R', &0u32.to_be_bytes());
        hello.extend(msg(b'S', b"server_version\x0015.0\0"));
        hello.extend(msg(b'Z', b"I"));
        sock.write_all(&hello).await.unwrap();
        while let Some((tag, body)) = read_msg(&mut sock).await {
            if tag != b'Q' {
                return;
            }
            let q = String::from_utf8_lossy(&body)
                .trim_end_matches('\0')
                .to_string();
            let answer = if q == "IDENTIFY_SYSTEM" {
                rows(
                    &["systemid", "timeline", "xlogpos", "dbname"],
                    &[
                        Some(&SYSTEM_ID.to_string()),
                        Some(&tli.to_string()),
                        Some("0/5000000"),
                        None,
                    ],
                )
            } else if q == "SHOW wal_segment_size" {
                rows(&["wal_segment_size"], &[Some("16MB")])
            } else if q == "SHOW max_slot_wal_keep_size" {
                rows(&["max_slot_wal_keep_size"], &[Some("-1")])
            } else if q.starts_with("READ_REPLICATION_SLOT") {
                rows(
                    &["slot_type", "restart_lsn", "restart_tli"],
                    &[Some("physical"), Some("0/1000000"), Some(&tli.to_string())],
                )
            } else if q.starts_with("START_REPLICATION") {
                if sock.write_all(&msg(b'W', &[0, 0, 0])).await.is_err() {
                    return;
                }
                stream(sock, script, flushes).await;
                return;
            } else if q.starts_with("TIMELINE_HISTORY") {
                // The receiver archives the history of the timeline it starts on; this fake
                // answers for the server's timeline only: one switch per earlier timeline.
                let content: String = (1..tli)
                    .map(|t| format!("{t}\t0/{:X}\tfake\n", u64::from(t) << 24))
                    .collect();
                rows(
                    &["filename", "content"],
                    &[Some(&format!("{tli:08X}.history")), Some(&content)],
                )
            } else {
                // Anything else is beyond this fake: hang up.
                return;
            };
            if sock.write_all(&answer).await.is_err() {
                return;
            }
        }
    }

    /// Runs the receiver against the fake until `stop` says the events seen suffice (or 30 s
    /// pass); the archive is said to hold everything before 0/1000000. Returns the events and
    /// the flush positions the fake received.
    pub async fn receive(
        tli: u32,
        script: Vec<Act>,
        stop: impl Fn(&[ReceiverEvent]) -> bool,
    ) -> (Vec<ReceiverEvent>, Vec<Lsn>) {
        let (listener, port) = super::listen().await;
        let flushes = Arc::new(Mutex::new(Vec::new()));
        let f = flushes.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(sock, tli, script.clone(), f.clone()));
            }
        });
        let spool = tempfile::tempdir().unwrap();
        let conn = ConnectParams::parse(&format!(
            "host=127.0.0.1 port={port} user=u sslmode=disable"
        ))
        .unwrap();
        let mut cfg = ReceiverConfig::new(conn, "walhoard", spool.path().to_path_buf());
        cfg.status_interval = Duration::from_millis(50);
        cfg.reconnect_min = Duration::from_millis(50);
        let (tx, mut rx) = mpsc::channel(8);
        // The archive holds everything before the slot's segment: a flush past 0/1000000 would
        // say the receiver holds (part of) the segment it is sent.
        let (_archived_tx, archived) = watch::channel(Lsn(START));
        let (positions, _) = watch::channel(ReceiverPositions::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(cfg, None, tx, archived, positions, cancel.clone()));
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !stop(&events) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(ev)) => events.push(ev),
                _ => break,
            }
        }
        // Let the last status updates reach the fake.
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
        drop(rx);
        let _ = task.await;
        server.abort();
        let flushes = flushes.lock().unwrap().clone();
        (events, flushes)
    }

    /// The first page of a segment on timeline `tli` at `addr` (PostgreSQL 15's layout).
    pub fn long_header_page(tli: u32, addr: u64) -> Vec<u8> {
        let mut p = vec![0u8; 8192];
        p[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        p[2..4].copy_from_slice(&2u16.to_le_bytes()); // XLP_LONG_HEADER
        p[4..8].copy_from_slice(&tli.to_le_bytes());
        p[8..16].copy_from_slice(&addr.to_le_bytes());
        p[24..32].copy_from_slice(&SYSTEM_ID.to_le_bytes());
        p[32..36].copy_from_slice(&(16u32 << 20).to_le_bytes());
        p[36..40].copy_from_slice(&8192u32.to_le_bytes());
        p
    }

    pub fn disconnect_errors(events: &[ReceiverEvent]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                ReceiverEvent::Disconnected { error, .. } => Some(error.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Issue 14 item 7: a primary sending a 16 MiB segment of zeros had it verified as "a segment
/// with an empty tail", archived, and the slot moved past it. The first page must carry a
/// valid long header: the segment is refused with an error naming it, never handed on, and no
/// flush position covers any of it.
#[tokio::test]
async fn protocol_fault_zero_segment_is_not_archived() {
    use fake_receiver_primary::*;
    use walhoard_walreceiver::ReceiverEvent;
    // The first 100 bytes alone, then a pause (several status intervals), then the rest: a
    // first page still incomplete must not count as held either.
    let zeros = vec![0u8; 16 << 20];
    let script = vec![
        Act::Wal(START, zeros[..100].to_vec()),
        Act::Pause(300),
        Act::Wal(START + 100, zeros[100..].to_vec()),
    ];
    let (events, flushes) = receive(1, script, |evs| {
        !disconnect_errors(evs).is_empty()
            || evs
                .iter()
                .any(|e| matches!(e, ReceiverEvent::Segment { .. }))
    })
    .await;
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ReceiverEvent::Segment { .. })),
        "a segment of zeros was handed on for archiving: {events:?}"
    );
    let errors = disconnect_errors(&events);
    let err = errors
        .first()
        .expect("no error reported for a segment of zeros");
    assert!(
        err.contains("000000010000000000000001") && err.contains("long page header"),
        "{err}"
    );
    assert!(
        flushes.iter().all(|f| *f <= walhoard_protocol::Lsn(START)),
        "flush reported inside the refused segment: {flushes:?}"
    );
}

/// Issue 14 item 14: an end of timeline naming the same or an earlier timeline as the next
/// one was followed: the receiver archived the segment as a timeline `.partial` on every
/// reconnect. Timelines only go up; it is a protocol violation, reported with both timelines.
#[tokio::test]
async fn protocol_fault_end_of_timeline_to_same_or_lower_timeline_is_refused() {
    use fake_receiver_primary::*;
    use walhoard_walreceiver::ReceiverEvent;
    for next in [2u32, 1] {
        let page = long_header_page(2, START);
        let script = vec![Act::Wal(START, page), Act::EndTimeline(next, START + 8192)];
        let (events, _) = receive(2, script, |evs| {
            !disconnect_errors(evs).is_empty()
                || evs
                    .iter()
                    .any(|e| matches!(e, ReceiverEvent::TimelinePartial { .. }))
        })
        .await;
        // The one history file expected is the server's own timeline's, archived once when
        // the receiver starts on it; a followed switch would add a `.partial` and another.
        let histories: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                ReceiverEvent::History { name, .. } => Some(name.to_string()),
                _ => None,
            })
            .collect();
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, ReceiverEvent::TimelinePartial { .. }))
                && histories.len() <= 1
                && histories.iter().all(|h| h == "00000002.history"),
            "next timeline {next}: the switch was followed: {events:?}"
        );
        let errors = disconnect_errors(&events);
        let err = errors
            .first()
            .expect("no error for a timeline that does not go up");
        assert!(
            err.contains("timeline 2 ended")
                && err.contains(&format!("timeline {next} as the next")),
            "{err}"
        );
    }
}
