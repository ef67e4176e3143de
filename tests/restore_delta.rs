//! `restore get-basebackup --delta` into the data directory of a stopped primary that moved
//! on after its backup (rows added, files modified, removed and added behind its back): the
//! result must be the tree a full restore into an empty directory gives, byte for byte and
//! mode for mode, and PostgreSQL must start on it with the backup's rows.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::json;
use walhoard_testkit::{give_to_server_user, PgCluster};

use walhoard_basebackup::control::METADATA_MEMBER;
use walhoard_basebackup::untar::TarReader;

use crate::common::{create_tablespace, query};
use crate::daemon_support::*;
use crate::pghoard_restore::{fixture_archive, pghoard_archive_of};
use crate::restore::{
    get_basebackup, insert, readable_by_server, start_promoted, stderr, take_basebackup, CHECKSUM,
};
use crate::retention::PGHOARD_SITE;

/// What a tree holds: each path below the root → kind, mode and contents (a link's target,
/// with `links` mapping one tablespace directory onto the other tree's).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Node {
    Dir(u32),
    File(u32, Vec<u8>),
    Link(PathBuf),
}

pub(crate) fn tree(root: &Path, links: &BTreeMap<PathBuf, PathBuf>) -> BTreeMap<PathBuf, Node> {
    fn walk(
        root: &Path,
        dir: &Path,
        links: &BTreeMap<PathBuf, PathBuf>,
        out: &mut BTreeMap<PathBuf, Node>,
    ) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let node = if m.file_type().is_symlink() {
                let to = std::fs::read_link(&p).unwrap();
                Node::Link(links.get(&to).cloned().unwrap_or(to))
            } else if m.is_dir() {
                walk(root, &p, links, out);
                Node::Dir(mode)
            } else {
                Node::File(mode, std::fs::read(&p).unwrap())
            };
            out.insert(rel, node);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, links, &mut out);
    out
}

/// Asserts two trees are the same, naming the first paths that differ.
pub(crate) fn assert_same_tree(
    a: &BTreeMap<PathBuf, Node>,
    b: &BTreeMap<PathBuf, Node>,
    what: &str,
) {
    let differ: Vec<_> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .take(10)
        .collect();
    assert!(differ.is_empty(), "{what}: differ at {differ:?}");
}

fn file_bytes(t: &BTreeMap<PathBuf, Node>) -> usize {
    t.values()
        .map(|n| match n {
            Node::File(_, b) => b.len(),
            _ => 0,
        })
        .sum()
}

/// The number just before `label` on the line of `text` holding it ("… 123 bytes written" →
/// 123 for label " bytes written").
pub(crate) fn number_before(text: &str, label: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.contains(label))
        .unwrap_or_else(|| panic!("no {label:?} in {text}"));
    let head = &line[..line.find(label).unwrap()];
    head.rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Flips a few bytes in the middle of `path`.
pub(crate) fn scribble(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let mid = b.len() / 2;
    for x in &mut b[mid..mid + 16] {
        *x ^= 0x5a;
    }
    std::fs::write(path, b).unwrap();
}

async fn delta_over_a_primary_that_moved_on(mode: &str) {
    let mut pg = PgCluster::builder()
        .setting("wal_keep_size", "'1GB'")
        .start()
        .unwrap();
    let ts = create_tablespace(&pg, "ts1");
    pg.psql("create table r (id bigserial primary key, batch text, v text)")
        .unwrap();
    pg.psql("create table gone (v text); insert into gone select md5(g::text) from generate_series(1, 1000) g")
        .unwrap();
    pg.psql("create table t (v text) tablespace ts1; insert into t select md5(g::text) from generate_series(1, 5000) g")
        .unwrap();
    insert(&pg, "base", 20_000);
    let d = DaemonDir::new();
    let storage = d.local_storage();
    d.write_config(
        &pg,
        storage,
        json!({"basebackup_mode": mode, "active_backup_mode": "standalone_hot_backup",
               "pg_data_directory": pg.data_dir(), "basebackup_chunk_size": 1048576}),
    );
    readable_by_server(&d);
    let backup = take_basebackup(&d);
    let want = pg.psql(CHECKSUM).unwrap();
    let data = pg.data_dir();
    // Named by oid: the stream format records tablespaces by oid, local-tar by name.
    let oid = query(&pg, "select oid from pg_tablespace where spcname = 'ts1'");
    let ts_map = format!("{oid}={}", ts.display());
    let args = [
        "--basebackup",
        backup.as_str(),
        "--restore-to-primary",
        "--tablespace-dir",
        ts_map.as_str(),
    ];

    // The server is running: refused before anything is changed.
    let out = get_basebackup(&d, &data, &[&args[..], &["--delta"]].concat());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is running"), "{}", stderr(&out));
    assert!(data.join("global/pg_control").exists());
    assert_eq!(query(&pg, "select 1"), "1");

    // The reference: a full restore into an empty directory.
    let work = tempfile::tempdir().unwrap();
    let (ref_data, ref_ts) = (work.path().join("ref"), work.path().join("ref-ts"));
    let ref_map = format!("{oid}={}", ref_ts.display());
    let out = get_basebackup(
        &d,
        &ref_data,
        &[
            "--basebackup",
            &backup,
            "--restore-to-primary",
            "--tablespace-dir",
            &ref_map,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let full_fetched = number_before(&stderr(&out), " bytes in ");

    // The primary moves on, then is stopped and its files are changed behind its back.
    insert(&pg, "after", 5_000);
    pg.psql("create table newer as select * from r").unwrap();
    let r_file = data.join(query(&pg, "select pg_relation_filepath('r')"));
    let gone_file = data.join(query(&pg, "select pg_relation_filepath('gone')"));
    let t_file = ts.join(
        query(&pg, "select pg_relation_filepath('t')")
            .split_once('/')
            .and_then(|(_, rest)| rest.split_once('/'))
            .map(|(_, rest)| rest.to_string())
            .unwrap(),
    );
    pg.stop().unwrap();
    scribble(&r_file);
    scribble(&t_file);
    std::fs::remove_file(&gone_file).unwrap();
    std::fs::write(r_file.with_file_name("999999"), b"extra").unwrap();
    std::fs::create_dir_all(data.join("extra_dir/sub")).unwrap();
    std::fs::write(data.join("extra_dir/sub/x"), b"x").unwrap();
    std::fs::write(ts.join("stray"), b"x").unwrap();
    // A stale postmaster.pid (its process gone) does not stop a delta restore.
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    dead.wait().unwrap();
    std::fs::write(
        data.join("postmaster.pid"),
        format!("{}\n{}\n", dead.id(), data.display()),
    )
    .unwrap();
    assert!(t_file.exists() && r_file.exists());

    // A directory where the backup has a file: the delta restore fails and leaves the
    // directory without global/pg_control, so PostgreSQL would not start on it.
    std::fs::remove_file(&gone_file).ok();
    std::fs::create_dir(&gone_file).unwrap();
    let out = get_basebackup(&d, &data, &[&args[..], &["--delta"]].concat());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is a directory"), "{}", stderr(&out));
    assert!(!data.join("global/pg_control").exists());
    assert!(data.join("PG_VERSION").exists() && data.join("extra_dir").exists());
    std::fs::remove_dir(&gone_file).unwrap();

    let out = get_basebackup(&d, &data, &[&args[..], &["--delta"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    let fetched = number_before(&err, " bytes in ");
    let written = number_before(&err, " bytes written");
    let links = BTreeMap::from([(std::path::absolute(&ts).unwrap(), ref_ts.clone())]);
    let (got, reference) = (tree(&data, &links), tree(&ref_data, &BTreeMap::new()));
    assert_same_tree(&got, &reference, "data directory");
    let ts_tree = tree(&ts, &BTreeMap::new());
    assert_same_tree(&ts_tree, &tree(&ref_ts, &BTreeMap::new()), "tablespace");
    let full_written = file_bytes(&reference) + file_bytes(&ts_tree);
    eprintln!(
        "delta restore ({mode}): fetched {fetched} bytes (full restore {full_fetched}), wrote {written} bytes (full restore {full_written})"
    );
    assert_eq!(fetched, full_fetched, "every chunk is still fetched");
    assert!(
        (written as usize) < full_written / 2,
        "{written} of {full_written} bytes rewritten"
    );

    give_to_server_user(&ts).unwrap();
    let restored = start_promoted(&data);
    assert_eq!(restored.psql(CHECKSUM).unwrap(), want);
    assert_eq!(query(&restored, "select count(*) from gone"), "1000");
    assert_eq!(query(&restored, "select count(*) from t"), "5000");
    assert_eq!(query(&restored, "select to_regclass('newer') is null"), "t");
    drop(restored);
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_delta_stream_format_over_a_primary_that_moved_on() {
    delta_over_a_primary_that_moved_on("basic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_delta_local_tar_over_a_primary_that_moved_on() {
    delta_over_a_primary_that_moved_on("local-tar").await;
}

/// The files of pghoard's delta backup `name` (in the fixture archive of `d`) that are
/// `basebackup_delta/<hash>` objects of their own: their paths below the data directory.
fn delta_object_files(d: &DaemonDir, name: &str) -> Vec<PathBuf> {
    let control = d
        .path("archive")
        .join(PGHOARD_SITE)
        .join(format!("basebackup/{name}.00000000.pghoard"));
    let plain = zstd::stream::decode_all(&std::fs::read(&control).unwrap()[..]).unwrap();
    let mut tar = TarReader::new(&plain[..]);
    while let Some(e) = tar.next_entry().unwrap() {
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut tar.body(), &mut body).unwrap();
        if e.path.trim_start_matches("./") != METADATA_MEMBER {
            continue;
        }
        let meta: serde_json::Value = serde_json::from_slice(&body).unwrap();
        return meta["manifest"]["snapshot_result"]["state"]["files"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| !f["hexdigest"].as_str().unwrap_or("").is_empty())
            .map(|f| PathBuf::from(f["relative_path"].as_str().unwrap()))
            .collect();
    }
    panic!("{} holds no {METADATA_MEMBER}", control.display());
}

/// `--delta` with a delta-layout backup (pghoard's, tests/data/pghoard-pg15-delta): a data
/// directory restored from the first backup is brought to the second. A file stored as a
/// `basebackup_delta/<hash>` object whose local copy already has the manifest's size and
/// BLAKE2s-256 is kept without downloading its object; only the others (changed between the
/// backups, scribbled on, removed, or a symlink where the file belongs, even one pointing at
/// the right bytes) are fetched, with the bundle chunk. The result is the full restore's tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_delta_of_a_delta_backup_fetches_only_the_objects_whose_files_differ() {
    use crate::pghoard_delta::{FIRST, ROWS, SECOND};
    let d = pghoard_archive_of(&fixture_archive("pghoard-pg15-delta"));
    let data = d.path("standby");
    let flags = ["--restore-to-primary"];
    let out = get_basebackup(&d, &data, &[&["--basebackup", FIRST][..], &flags].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    // The reference: a full restore of the second backup into an empty directory.
    let ref_data = d.path("reference");
    let out = get_basebackup(
        &d,
        &ref_data,
        &[&["--basebackup", SECOND][..], &flags].concat(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let hashed = delta_object_files(&d, SECOND);
    assert!(hashed.len() > 10, "{hashed:?}");
    // Every object: the bundle chunk and one per hashed file.
    let full_objects = number_before(&stderr(&out), " objects, ");
    assert_eq!(full_objects as usize, 1 + hashed.len(), "{}", stderr(&out));
    let reference = tree(&ref_data, &BTreeMap::new());

    // Behind the backup's back: one hashed file scribbled on, one removed, one a symlink to
    // a copy of the right bytes outside, one that is right but has another mode; a bundled
    // file changed; files and a directory the backup does not have.
    let unchanged: Vec<&PathBuf> = hashed
        .iter()
        .filter(|p| std::fs::read(data.join(p)).ok() == std::fs::read(ref_data.join(p)).ok())
        .collect();
    assert!(unchanged.len() >= 8, "{unchanged:?}");
    scribble(&data.join(unchanged[0]));
    std::fs::remove_file(data.join(unchanged[1])).unwrap();
    let outside = d.path("outside-copy");
    std::fs::copy(ref_data.join(unchanged[2]), &outside).unwrap();
    std::fs::remove_file(data.join(unchanged[2])).unwrap();
    std::os::unix::fs::symlink(&outside, data.join(unchanged[2])).unwrap();
    std::fs::set_permissions(
        data.join(unchanged[3]),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    scribble(&data.join("pg_xact/0000"));
    std::fs::write(data.join("base/1/999999"), b"extra").unwrap();
    std::fs::create_dir_all(data.join("extra_dir/sub")).unwrap();
    std::fs::write(data.join("extra_dir/sub/x"), b"x").unwrap();
    let before = tree(&data, &BTreeMap::new());
    // The objects that must be fetched: those whose file is not already a regular file
    // holding the backup's bytes (a mode alone does not need a download).
    let differ = hashed
        .iter()
        .filter(|p| {
            let want = match reference.get(*p) {
                Some(Node::File(_, b)) => b,
                other => panic!("{p:?} in the reference: {other:?}"),
            };
            !matches!(before.get(*p), Some(Node::File(_, b)) if b == want)
        })
        .count();
    assert!(
        differ >= 3 && differ < hashed.len() / 2,
        "{differ} of {}",
        hashed.len()
    );

    let out = get_basebackup(
        &d,
        &data,
        &[&["--basebackup", SECOND, "--delta"][..], &flags].concat(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    eprintln!("{err}");
    assert_same_tree(&tree(&data, &BTreeMap::new()), &reference, "data directory");
    assert_eq!(
        std::fs::read(&outside).unwrap(),
        std::fs::read(ref_data.join(unchanged[2])).unwrap()
    );
    // Only the bundle chunk and the objects of the files that differed were downloaded.
    assert_eq!(
        number_before(&err, " objects, ") as usize,
        1 + differ,
        "{err}"
    );
    assert_eq!(
        number_before(&err, " objects not downloaded") as usize,
        hashed.len() - differ,
        "{err}"
    );

    let restored = start_promoted(&data);
    assert_eq!(
        restored
            .psql("select count(*) from fixture")
            .unwrap()
            .trim(),
        ROWS
    );
}
