//! A synchronous site's part log (`xlog_partial/<segment>/log`, docs/formats.md) as restore,
//! verify and a restarted daemon read it: a valid header, then records made from the input
//! (some valid, as the writer makes them) followed by arbitrary bytes, with bytes of the
//! whole flipped where the input says. Scanning must return the valid records or an error,
//! never panic or read out of bounds; every record a scan reports must read back, whole
//! and through the streaming reader, with its CRC, the range the scan gave and within the
//! file; records are contiguous from offset 0.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use walhoard::daemon::partial::log::{
    decode_record, encode_record, open_record, read_record, scan, LogHeader,
};
use walhoard::daemon::partial::PartRange;
use walhoard_protocol::{SegmentSize, WalSegmentName};

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let seg = SegmentSize::DEFAULT;
    let Ok(WalSegmentName::Segment(segment)) = "000000010000000000000003".parse() else {
        unreachable!("a segment name");
    };
    let header = LogHeader {
        segment,
        seg,
        writer: "walhoard fuzz".into(),
    };
    let mut file = header.encode();
    let header_len = file.len();
    // Up to 7 valid records from the input's first bytes, then the rest as it is.
    let mut input = rest;
    let mut from = 0u64;
    for _ in 0..(control & 7) {
        let Some((&n, tail)) = input.split_first() else {
            break;
        };
        let take = (n as usize).min(tail.len());
        let (stored, tail) = tail.split_at(take);
        let to = from + 1 + n as u64;
        file.extend(encode_record(PartRange { from, to }, b"{}", stored));
        from = to;
        input = tail;
    }
    file.extend_from_slice(input);
    // Flip one byte past the header where the control byte says.
    if control & 8 != 0 && file.len() > header_len {
        let at = header_len + (control as usize * 31) % (file.len() - header_len);
        file[at] ^= 0x5a;
    }
    let _ = decode_record(&file[header_len..], seg.bytes());

    let path = std::env::temp_dir().join(format!("walhoard-fuzz-part-log-{}", std::process::id()));
    std::fs::write(&path, &file).expect("write the log");
    let f = std::fs::File::open(&path).expect("open the log");
    if let Ok(Some(s)) = scan(&f) {
        let mut end = 0;
        for r in &s.records {
            assert_eq!(r.range.from, end, "records contiguous from 0");
            assert!(r.range.to > r.range.from && r.range.to <= seg.bytes());
            assert!(
                r.at + r.len <= file.len() as u64,
                "a record within the file"
            );
            end = r.range.to;
            let whole = read_record(&path, r.at, r.len).expect("a scanned record reads back");
            assert_eq!(whole.range, r.range);
            let mut open = open_record(&path, r.at, r.len).expect("and opens");
            let mut stored = Vec::new();
            open.stored
                .read_to_end(&mut stored)
                .expect("its stored bytes stream with their CRC");
            assert_eq!(stored, whole.stored);
        }
        assert!(
            s.end >= header_len as u64 && s.end <= file.len() as u64,
            "the valid end within the file"
        );
    }
    let _ = std::fs::remove_file(&path);
});
