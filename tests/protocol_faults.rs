//! Faults a real server cannot be made to produce: a connection cut in the middle of a message
//! and malformed frames. A hand-written fake primary on loopback plays the server here; this is
//! the only place the tests use one.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use walhoard_protocol::{ConnectParams, Connection, Error};

/// Accepts one connection, reads the startup packet, sends `reply` and closes.
async fn fake_primary(reply: &'static [u8]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let len = sock.read_i32().await.unwrap();
        let mut startup = vec![0u8; len as usize - 4];
        sock.read_exact(&mut startup).await.unwrap();
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
