//! Arbitrary bytes as `.pghoard_tar_metadata.json`, the control object's description of a
//! backup (chunks, sizes, hashes, tablespaces): parsing must return the metadata or an error,
//! never panic, and what parses must serialize and parse back to the same value (restore and
//! the listing read what the backup wrote).
#![no_main]

use libfuzzer_sys::fuzz_target;
use walhoard_basebackup::control::BackupMetadata;

fuzz_target!(|data: &[u8]| {
    if let Ok(meta) = serde_json::from_slice::<BackupMetadata>(data) {
        let text = serde_json::to_vec(&meta).expect("metadata serializes");
        let back: BackupMetadata = serde_json::from_slice(&text).expect("and parses back");
        assert_eq!(back, meta);
    }
});
