//! Arbitrary bytes as a tar stream, as restore reads a chunk or a control object once it is
//! decrypted and decompressed: the reader must return members or an error, never panic, and
//! never hand out more body bytes than a member declares. A `.pghoard_tar_metadata.json`
//! member goes on to the control-object parser, as `get-basebackup` does with it.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use walhoard_basebackup::control::{BackupMetadata, METADATA_MEMBER};
use walhoard_basebackup::untar::TarReader;

fuzz_target!(|data: &[u8]| {
    let mut tar = TarReader::new(data);
    while let Ok(Some(entry)) = tar.next_entry() {
        let mut body = Vec::new();
        // The input bounds what can be read, whatever size the header claims.
        let read = tar.body().read_to_end(&mut body);
        assert!(body.len() as u64 <= entry.size);
        if read.is_ok() {
            assert_eq!(body.len() as u64, entry.size);
            if entry.path == METADATA_MEMBER {
                let _ = serde_json::from_slice::<BackupMetadata>(&body);
            }
        }
    }
});
