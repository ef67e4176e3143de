//! `walhoard verify` and `walhoard info` (issue 17) on archives made here by the daemon and a
//! basebackup of a real PostgreSQL 15, on local storage and S3 (s3s-fs), and on the archive the
//! real pghoard wrote (tests/data/pghoard-pg15). Each kind of damage is made in the store and
//! must be reported with its object key; pg_waldump is the oracle for the record walk.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use walhoard::storage::ObjectStore;
use walhoard_protocol::{Lsn, SegmentSize, WalSegmentName};
use walhoard_testkit::PgCluster;

use crate::daemon_support::{
    basebackup_command, load, restore, switch_segment, wait_all_archived, wait_slot, Daemon,
    DaemonDir,
};
use crate::pghoard_restore::{
    pghoard_archive, pghoard_encrypted_archive, pghoard_site, tamper, LOCAL_TAR,
};
use crate::retention::PGHOARD_SITE;

fn cluster() -> PgCluster {
    PgCluster::builder()
        .setting("wal_keep_size", "'1GB'")
        .start()
        .unwrap()
}

/// Runs `walhoard <command> --json --config <config> <args>`: exit code, parsed stdout,
/// stderr.
fn walhoard_json(command: &str, config: &Path, args: &[&str]) -> (Option<i32>, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_walhoard"))
        .args([command, "--json", "--config"])
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{command} --json printed no JSON ({e}): {err}"));
    (out.status.code(), v, err)
}

/// `walhoard verify` that must fail: its report.
pub(crate) fn verify_fails(config: &Path, args: &[&str]) -> Value {
    let (code, v, err) = walhoard_json("verify", config, args);
    assert_eq!(code, Some(1), "verify should have failed: {v:#}\n{err}");
    assert_eq!(v["ok"], false, "{v:#}");
    v
}

/// `walhoard verify` that must pass: its report.
pub(crate) fn verify_passes(config: &Path, args: &[&str]) -> Value {
    let (code, v, err) = walhoard_json("verify", config, args);
    assert_eq!(code, Some(0), "verify failed: {v:#}\n{err}");
    assert_eq!(v["ok"], true, "{v:#}");
    v
}

/// Every problem of a report: (key, text), backups' and WAL's.
pub(crate) fn problems(v: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let lists = v["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| &b["problems"])
        .chain(std::iter::once(&v["wal"]["problems"]));
    for list in lists {
        for p in list.as_array().unwrap() {
            out.push((
                p["key"].as_str().unwrap().to_string(),
                p["problem"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

fn has_problem(v: &Value, key: &str, text: &str) -> bool {
    problems(v)
        .iter()
        .any(|(k, p)| k == key && p.contains(text))
}

/// pg_waldump's records from segment `first` to `last` in `dir` (one line per record).
fn waldump(dir: &Path, first: &str, last: &str) -> (Vec<String>, String) {
    let out = Command::new(walhoard_testkit::tool_path("pg_waldump").unwrap())
        .arg("-p")
        .arg(dir)
        .args([first, last])
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("rmgr:"))
        .map(str::to_string)
        .collect();
    (lines, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A field of a pg_waldump line: `lsn: 0/0300A0B8,` → "0/0300A0B8".
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let rest = &line[line.find(name).unwrap() + name.len()..];
    rest.trim_start().split([',', ' ']).next().unwrap()
}

fn segment_start(name: &str) -> Lsn {
    match name.parse::<WalSegmentName>().unwrap() {
        WalSegmentName::Segment(id) => id.start_lsn(SegmentSize::DEFAULT).unwrap(),
        other => panic!("{other} is not a segment"),
    }
}

/// A daemon archiving `pg` into `storage`, one basebackup, then four switched segments of
/// WAL (records across pages and segments), all archived; the daemon stopped. Returns the
/// backup's name and the four segment names.
async fn archive_with_backup(
    pg: &PgCluster,
    d: &DaemonDir,
    store: &ObjectStore,
) -> (String, Vec<String>) {
    let mut daemon = Daemon::start(d);
    wait_slot(pg, &daemon);
    load(pg, 5_000, 50);
    let out = basebackup_command(d).output().unwrap();
    assert!(
        out.status.success(),
        "basebackup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut names = Vec::new();
    for _ in 0..4 {
        load(pg, 20_000, 100);
        names.push(switch_segment(pg));
    }
    wait_all_archived(store, &names, Duration::from_secs(90), &daemon).await;
    daemon.terminate(Duration::from_secs(30));
    (name, names)
}

fn object_path(d: &DaemonDir, key: &str) -> PathBuf {
    d.path("archive").join("main").join(key)
}

/// Moves an object and its metadata sidecar aside; moving them back undoes it.
fn move_object(from: &Path, to: &Path) {
    std::fs::rename(from, to).unwrap();
    let side = |p: &Path| PathBuf::from(format!("{}.metadata", p.display()));
    std::fs::rename(side(from), side(to)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_each_damage_and_info_shows_the_gap() {
    let pg = cluster();
    let d = DaemonDir::new();
    let storage = d.local_storage();
    d.write_config(&pg, storage.clone(), json!({}));
    let store = d.store(&storage);
    let (backup, names) = archive_with_backup(&pg, &d, &store).await;
    let config = d.config_path();

    // Healthy: every chunk and record checks; the backup restores to the end of the archive.
    let v = verify_passes(&config, &["--wal"]);
    let b = &v["backups"][0];
    assert_eq!(b["name"], backup.as_str(), "{v:#}");
    let archive_end = segment_start(&names[3]) + SegmentSize::DEFAULT.bytes();
    assert_eq!(b["restorable_to"], archive_end.to_string(), "{v:#}");
    // pg_waldump, reading the same segments decrypted, sees as many records.
    let plain = d.path("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let first = b["start_lsn"].as_str().unwrap().parse::<Lsn>().unwrap();
    let first = walhoard_protocol::SegmentId::containing(
        walhoard_protocol::TimelineId(1),
        first,
        SegmentSize::DEFAULT,
    );
    let mut id = first;
    loop {
        restore(&store, &d.ring(), &format!("xlog/{id}"), &plain).await;
        if id.to_string() == names[3] {
            break;
        }
        id = id.next(SegmentSize::DEFAULT).unwrap();
    }
    let (records, err) = waldump(&plain, &first.to_string(), &names[3]);
    assert!(records.len() > 1000, "{err}");
    assert_eq!(v["wal"]["records"], records.len(), "pg_waldump: {err}");

    // A deleted segment: a gap, named; the backup restores only up to it; info shows it.
    let gap_key = format!("xlog/{}", names[1]);
    let aside = d.path("aside");
    move_object(&object_path(&d, &gap_key), &aside);
    let v = verify_fails(&config, &[]);
    assert!(has_problem(&v, &gap_key, "missing"), "{v:#}");
    assert_eq!(
        v["backups"][0]["restorable_to"],
        segment_start(&names[1]).to_string(),
        "{v:#}"
    );
    let (code, info, err) = walhoard_json("info", &config, &[]);
    assert_eq!(code, Some(0), "{err}");
    let site = &info[0];
    let tl = &site["timelines"][0];
    assert_eq!(tl["gaps"], json!([[names[1], names[1]]]), "{info:#}");
    assert_eq!(tl["last"], names[3].as_str(), "{info:#}");
    assert_eq!(site["newest"]["segment"], names[3].as_str(), "{info:#}");
    assert_eq!(site["backups"][0]["name"], backup.as_str(), "{info:#}");
    // The daemon's last state file: its view of the site.
    assert!(
        site["daemon"]["site"]["walreceiver"]["archived_lsn"].is_string(),
        "{info:#}"
    );
    assert_eq!(
        site["backups"][0]["missing_segments"],
        json!([names[1]]),
        "{info:#}"
    );
    assert_eq!(
        site["backups"][0]["wal_needed_from"],
        first.to_string(),
        "{info:#}"
    );
    move_object(&aside, &object_path(&d, &gap_key));
    verify_passes(&config, &[]);

    // A flipped byte in a chunk: named, whatever else passes.
    let chunk_dir = object_path(&d, &format!("basebackup_chunk/{backup}"));
    let chunk_file = std::fs::read_dir(&chunk_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".metadata"))
        .min()
        .unwrap();
    let chunk_key = format!("basebackup_chunk/{backup}/{chunk_file}");
    let path = object_path(&d, &chunk_key);
    let original = std::fs::read(&path).unwrap();
    let mut bytes = original.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let v = verify_fails(&config, &["--basebackup", &backup]);
    assert!(problems(&v).iter().any(|(k, _)| *k == chunk_key), "{v:#}");
    std::fs::write(&path, &original).unwrap();

    // A truncated segment object: found when the WAL is fetched.
    let seg_key = format!("xlog/{}", names[2]);
    let path = object_path(&d, &seg_key);
    let original = std::fs::read(&path).unwrap();
    std::fs::write(&path, &original[..original.len() / 2]).unwrap();
    let v = verify_fails(&config, &["--wal"]);
    assert!(problems(&v).iter().any(|(k, _)| *k == seg_key), "{v:#}");
    std::fs::write(&path, &original).unwrap();

    // A record's byte changed in the plaintext and the segment archived again with a correct
    // hash: only the record CRC walk can tell (pg_waldump agrees).
    let one = d.path("one");
    std::fs::create_dir_all(&one).unwrap();
    let seg_file = restore(&store, &d.ring(), &seg_key, &one).await;
    let (records, _) = waldump(&one, &names[2], &names[2]);
    let seg_start = segment_start(&names[2]);
    let victim = records
        .iter()
        .find_map(|l| {
            let lsn: Lsn = field(l, "lsn:").parse().ok()?;
            // `len (rec/tot):     54/    54,`
            let len = &l[l.find("len (rec/tot):")? + 14..];
            let tot: u64 = len[..len.find(',')?]
                .split('/')
                .nth(1)?
                .trim()
                .parse()
                .ok()?;
            let in_page = lsn.0 % 8192;
            (lsn > seg_start + 16384 && tot >= 64 && in_page > 64 && in_page + tot < 8192)
                .then_some(lsn)
        })
        .expect("a record inside one page");
    let mut plain = std::fs::read(&seg_file).unwrap();
    plain[(victim.0 - seg_start.0) as usize + 40] ^= 0x01;
    std::fs::write(&seg_file, &plain).unwrap();
    let (_, dump_err) = waldump(&one, &names[2], &names[2]);
    assert!(
        dump_err.contains("incorrect resource manager data checksum"),
        "pg_waldump: {dump_err}"
    );
    crate::restore_command::upload_wal(&store, &d, &names[2], &seg_file, true).await;
    // The listing and the object's size and hash are fine: only --wal finds it.
    verify_passes(&config, &[]);
    let v = verify_fails(&config, &["--wal"]);
    let want = format!("incorrect resource manager data checksum in record at {victim}");
    assert!(has_problem(&v, &seg_key, &want), "{v:#}");
    let to: Lsn = v["backups"][0]["restorable_to"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        to > seg_start && to <= victim,
        "restorable to {to}, broken record at {victim}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_on_s3_passes_then_names_a_deleted_segment() {
    let pg = cluster();
    let s3 = walhoard_testkit::s3::S3Server::start("wal").unwrap();
    let d = DaemonDir::new();
    let storage = DaemonDir::s3_storage(s3.port, "wal");
    d.write_config(&pg, storage.clone(), json!({}));
    let store = d.store(&storage);
    let (backup, names) = archive_with_backup(&pg, &d, &store).await;
    let config = d.config_path();
    let v = verify_passes(&config, &["--wal", "--basebackup", "all"]);
    assert_eq!(v["backups"][0]["name"], backup.as_str());
    assert!(v["wal"]["records"].as_u64().unwrap() > 1000, "{v:#}");
    let key = format!("xlog/{}", names[2]);
    store.delete(&key).await.unwrap();
    let v = verify_fails(&config, &["--wal"]);
    assert!(has_problem(&v, &key, "missing"), "{v:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_pghoards_archive_then_a_tampered_chunk() {
    let d = pghoard_archive();
    let config = d.config_path();
    let v = verify_passes(&config, &["--wal"]);
    assert_eq!(v["backups"].as_array().unwrap().len(), 2, "{v:#}");
    for b in v["backups"].as_array().unwrap() {
        assert_eq!(b["restorable_to"], "0/9000000", "{v:#}");
    }
    // As many records as pg_waldump reads in pghoard's segments 2 to 8.
    let plain = d.path("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let site = d.path("archive").join(PGHOARD_SITE);
    for n in 2..=8 {
        let name = format!("0000000100000000000000{n:02X}");
        let packed = std::fs::read(site.join("xlog").join(&name)).unwrap();
        std::fs::write(
            plain.join(&name),
            zstd::stream::decode_all(&packed[..]).unwrap(),
        )
        .unwrap();
    }
    let (records, err) = waldump(
        &plain,
        "000000010000000000000002",
        "000000010000000000000008",
    );
    assert_eq!(v["wal"]["records"], records.len(), "pg_waldump: {err}");

    let chunk = format!("basebackup_chunk/{LOCAL_TAR}/{LOCAL_TAR}.00000003.pghoard");
    tamper(&site.join(&chunk));
    let v = verify_fails(&config, &[]);
    assert!(has_problem(&v, &chunk, "_hash"), "{v:#}");
    // The other backup is still fine and says so.
    let basic = v["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["format"] == "")
        .unwrap();
    assert_eq!(basic["problems"], json!([]), "{v:#}");

    // pghoard's pghoa1-encrypted archive with a tablespace: every chunk's MAC and every
    // record of segments 2 to 4.
    let d = pghoard_encrypted_archive();
    let v = verify_passes(&d.config_path(), &["--wal"]);
    assert_eq!(v["backups"][0]["chunks"], 26, "{v:#}");
    assert_eq!(v["backups"][0]["restorable_to"], "0/5000000", "{v:#}");
    assert_eq!(v["wal"]["segments"], 3, "{v:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_follows_a_promotion_to_the_new_timeline() {
    let mut pg = cluster();
    let d = DaemonDir::new();
    let storage = d.local_storage();
    d.write_config(&pg, storage.clone(), json!({}));
    let store = d.store(&storage);
    let mut daemon = Daemon::start(&d);
    wait_slot(&pg, &daemon);
    load(&pg, 5_000, 20);
    let out = basebackup_command(&d).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    load(&pg, 10_000, 50);
    let s1 = switch_segment(&pg);
    wait_all_archived(&store, &[s1], Duration::from_secs(60), &daemon).await;
    load(&pg, 5_000, 50);
    pg.promote_to_new_timeline().unwrap();
    load(&pg, 10_000, 50);
    let s2 = switch_segment(&pg);
    assert!(s2.starts_with("00000002"), "{s2}");
    let wanted = [s2.clone(), "00000002.history".to_string()];
    wait_all_archived(&store, &wanted, Duration::from_secs(90), &daemon).await;
    daemon.terminate(Duration::from_secs(30));
    let config = d.config_path();

    // The chain goes through timeline 2's history: the backup on timeline 1 restores to the
    // end of timeline 2's newest segment, every record checked across the switch.
    let v = verify_passes(&config, &["--wal"]);
    let b = &v["backups"][0];
    assert_eq!(b["start_timeline"], 1, "{v:#}");
    assert_eq!(b["target_timeline"], 2, "{v:#}");
    let end = segment_start(&s2) + SegmentSize::DEFAULT.bytes();
    assert_eq!(b["restorable_to"], end.to_string(), "{v:#}");
    let (_, info, _) = walhoard_json("info", &config, &["--site", "main"]);
    assert_eq!(
        info[0]["history_files"],
        json!(["00000002.history"]),
        "{info:#}"
    );
    assert_eq!(
        info[0]["partial_segments"].as_array().unwrap().len(),
        1,
        "{info:#}"
    );
    assert_eq!(info[0]["backups"][0]["target_timeline"], 2, "{info:#}");

    // Without the history file a restore cannot follow timeline 2: named.
    let key = "timeline/00000002.history";
    move_object(&object_path(&d, key), &d.path("aside"));
    let v = verify_fails(&config, &[]);
    assert!(has_problem(&v, key, "missing"), "{v:#}");
}

/// A site that names pghoard's archive in `moved_from` (right after a move: its own prefix
/// holds nothing): its backups and its WAL are read from the older site, as restore reads
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_moved_from_reads_the_older_sites_wal() {
    let d = DaemonDir::new();
    crate::retention::unpack_pghoard_archive(&d.path("archive"));
    let old = json!({"active": false, "prefix": PGHOARD_SITE, "object_storage": d.local_storage()});
    let main = pghoard_site(&d, json!({"prefix": "moved", "moved_from": ["old"]}));
    d.write_sites(json!({"old": old, "main": main}));
    let v = verify_passes(&d.config_path(), &["--site", "main", "--wal"]);
    for b in v["backups"].as_array().unwrap() {
        assert_eq!(b["restorable_to"], "0/9000000", "{v:#}");
    }
    assert_eq!(v["wal"]["segments"], 7, "{v:#}");
    let (_, info, _) = walhoard_json("info", &d.config_path(), &["--site", "main"]);
    assert_eq!(
        info[0]["timelines"][0]["first"], "000000010000000000000002",
        "{info:#}"
    );
    assert_eq!(
        info[0]["timelines"][0]["last"], "000000010000000000000008",
        "{info:#}"
    );
    // A segment gone from the older site is a gap of the new one's chain.
    let seg = d
        .path("archive")
        .join(PGHOARD_SITE)
        .join("xlog/000000010000000000000004");
    std::fs::remove_file(&seg).unwrap();
    let v = verify_fails(&d.config_path(), &["--site", "main"]);
    assert!(
        has_problem(&v, "xlog/000000010000000000000004", "missing"),
        "{v:#}"
    );
}
