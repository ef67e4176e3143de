//! pghoard's delta backups (issue 15 item 2), from the archive the real pghoard 2.7.0 wrote
//! with `basebackup_mode: delta` (tests/data/pghoard-pg15-delta, tools/pghoard-fixture.sh):
//! two `pghoard-delta-v2` backups whose files are `basebackup_delta/<blake2s>` objects (the
//! second backup reuses the first's unchanged ones), files embedded in the manifest, and one
//! bundle chunk each under `basebackup_delta_chunk/`.

use std::path::Path;

use crate::common::list_basebackups;
use crate::pghoard_restore::{fixture_archive, pghoard_archive_of, restore_and_count};
use crate::restore::{get_basebackup, stderr};
use crate::retention::PGHOARD_SITE;

pub(crate) const FIRST: &str = "2026-12-04_23-24_0";
pub(crate) const SECOND: &str = "2026-12-04_23-25_0";
/// 1000 rows, 100 more before each of the four WAL switches; pghoard was stopped before it
/// handed over the segment of the last batch (the archive ends at segment 9).
pub(crate) const ROWS: &str = "1300";

fn delta_archive() -> crate::daemon_support::DaemonDir {
    pghoard_archive_of(&fixture_archive("pghoard-pg15-delta"))
}

#[test]
fn pghoard_delta_backups_list_with_sizes_lsns_and_timeline() {
    let d = delta_archive();
    let list = list_basebackups(&d.config_path());
    let backups = list.as_array().unwrap();
    let names: Vec<&str> = backups
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            format!("{FIRST}.00000000.pghoard"),
            format!("{SECOND}.00000000.pghoard")
        ],
        "{list:#}"
    );
    assert_eq!(backups[0]["start_lsn"], "0/2000000", "{list:#}");
    assert_eq!(backups[1]["start_lsn"], "0/7000000", "{list:#}");
    for b in backups {
        assert_eq!(b["start_timeline"], 1, "{b:#}");
    }
    // pghoard's own totals (every file's plain size; what it stored for this backup).
    assert_eq!(backups[0]["size_plain"], 24396752, "{list:#}");
    assert_eq!(backups[1]["size_plain"], 24435664, "{list:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_pghoard_delta_backups_and_replay_pghoards_wal() {
    let d = delta_archive();
    // The first backup, and the second, whose unchanged files are the first's objects.
    restore_and_count(&d, FIRST, ROWS);
    restore_and_count(&d, SECOND, ROWS);
}

/// Replaces one byte of every delta object's plain bytes and stores it again as pghoard's
/// local storage would (zstd, the sidecar's `_hash` and `Content-Length` updated): only the
/// BLAKE2s-256 the object is named by tells it from what pghoard wrote.
fn tamper_delta_objects(site: &Path) -> usize {
    let dir = site.join("basebackup_delta");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "metadata") {
            continue;
        }
        let mut plain = zstd::stream::decode_all(&std::fs::read(&path).unwrap()[..]).unwrap();
        let at = plain.len() / 2;
        plain[at] ^= 0x55;
        let stored = zstd::stream::encode_all(&plain[..], 3).unwrap();
        std::fs::write(&path, &stored).unwrap();
        let sidecar = path.with_extension("metadata");
        let mut meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&sidecar).unwrap()).unwrap();
        let sha256 = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &stored);
        meta["_hash"] = hex::encode(sha256.as_ref()).into();
        meta["Content-Length"] = stored.len().to_string().into();
        std::fs::write(&sidecar, serde_json::to_vec(&meta).unwrap()).unwrap();
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_a_tampered_pghoard_delta_object_and_leaves_nothing() {
    let d = delta_archive();
    let site = d.path("archive").join(PGHOARD_SITE);
    assert!(tamper_delta_objects(&site) > 10);
    let target = d.path("restored");
    let out = get_basebackup(&d, &target, &["--basebackup", SECOND]);
    assert!(
        !out.status.success(),
        "tampered delta objects were restored"
    );
    let err = stderr(&out);
    assert!(
        err.contains("basebackup_delta/") && err.contains("BLAKE2s-256"),
        "{err}"
    );
    assert!(
        !target.exists(),
        "the failed restore left {}",
        target.display()
    );
}

/// `walhoard verify` reads every `basebackup_delta/<hash>` object a delta backup's manifest
/// names, not only its bundle chunks: a healthy archive passes, and after the objects are
/// tampered with (stored consistently, so only their BLAKE2s-256 names tell) each backup is
/// reported with the objects' keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reads_every_pghoard_delta_object() {
    let d = delta_archive();
    let config = d.config_path();
    let v = crate::verify::verify_passes(&config, &[]);
    assert_eq!(v["backups"].as_array().unwrap().len(), 2, "{v:#}");
    let site = d.path("archive").join(PGHOARD_SITE);
    assert!(tamper_delta_objects(&site) > 10);
    let v = crate::verify::verify_fails(&config, &[]);
    let bad: Vec<_> = crate::verify::problems(&v)
        .into_iter()
        .filter(|(k, p)| k.starts_with("basebackup_delta/") && p.contains("BLAKE2s-256"))
        .collect();
    assert!(bad.len() > 10, "{v:#}");
}
