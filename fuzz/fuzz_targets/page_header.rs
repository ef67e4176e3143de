//! Arbitrary bytes as WAL pages, history files and names: parsing and validation must return
//! a result, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walhoard_protocol::xlog::{validate_pages, XLogPageHeader};
use walhoard_protocol::{
    Lsn, PageExpectation, SegmentSize, TimelineHistory, TimelineId, WalSegmentName,
};

fuzz_target!(|data: &[u8]| {
    let expect = PageExpectation {
        magic: 0xD110,
        seg_size: SegmentSize::DEFAULT,
        system_id: Some(7),
        max_tli: Some(TimelineId(3)),
    };
    if let Ok(h) = XLogPageHeader::parse(data) {
        let _ = h.validate(&expect, h.pageaddr);
        let _ = h.validate(&expect, Lsn(0x100_0000));
    }
    let _ = validate_pages(data, Lsn(0x100_0000), &expect, true);
    let _ = validate_pages(data, Lsn(0x100_2000), &expect, false);
    let _ = TimelineHistory::parse(TimelineId(5), data);
    let text = String::from_utf8_lossy(data);
    if let Ok(name) = text.parse::<WalSegmentName>() {
        if let Some(seg) = name.segment() {
            let _ = seg.segno(SegmentSize::DEFAULT);
            let _ = seg.next(SegmentSize::new(1 << 30).unwrap());
        }
    }
    let _ = text.parse::<Lsn>();
    let _ = SegmentSize::from_show(&text);
});
