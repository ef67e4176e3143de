//! Arbitrary bytes from a "server": the backend message parser and the CopyData payload
//! parsers must return messages or errors, never panic or allocate without bound.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use walhoard_protocol::message::{parse_backend, BackendMessage};
use walhoard_protocol::replmsg::{parse_backup_copy, parse_walsender};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(msg)) = parse_backend(&mut buf) {
        if let BackendMessage::CopyData(payload) = msg {
            let _ = parse_walsender(payload.clone());
            let _ = parse_backup_copy(payload);
        }
    }
    // The payload parsers also see raw input directly.
    let _ = parse_walsender(bytes::Bytes::copy_from_slice(data));
    let _ = parse_backup_copy(bytes::Bytes::copy_from_slice(data));
});
