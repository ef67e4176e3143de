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
