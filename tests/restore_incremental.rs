//! Restoring a chain of PostgreSQL 17+ block-incremental backups (`basebackup_mode:
//! "incremental"`): a full backup and two incrementals with inserts, updates, a dropped table,
//! a truncated table and new tables between them (and a tablespace); `get-basebackup` combines
//! the chain, PostgreSQL starts on the result with the primary's data, the rewritten
//! `backup_manifest` describes exactly the files restored; PITR to a point between the two
//! incrementals restores the shorter chain; a chain with a corrupted chunk or a missing middle
//! backup is refused, naming it, and leaves nothing behind. Skipped below PostgreSQL 17.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use aws_lc_rs::digest;
use serde_json::{json, Value};
use walhoard_testkit::{give_to_server_user, PgCluster};

use crate::common::{create_tablespace, query, sh};
use crate::daemon_support::*;
use crate::restore::{
    get_basebackup, insert, readable_by_server, start_promoted, stderr, take_basebackup,
    PROMOTED_PRIMARY,
};

/// Every table the test changes, as one checksum each ("-" for a table that does not exist).
pub(crate) fn state(pg: &PgCluster) -> String {
    let mut out = Vec::new();
    for t in ["r", "gone", "trunc", "ts_t", "fresh1", "fresh2"] {
        let exists = query(pg, &format!("select to_regclass('{t}') is not null"));
        let sum = if exists == "t" {
            query(
                pg,
                &format!("select count(*) || ':' || coalesce(md5(string_agg(x::text, ',' order by x::text)), '') from {t} x"),
            )
        } else {
            "-".to_string()
        };
        out.push(format!("{t}:{sum}"));
    }
    out.join(" ")
}

/// The type and parent the control object of `name` records.
async fn backup_type(store: &walhoard::storage::ObjectStore, d: &DaemonDir, name: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let path = restore(store, &d.ring(), &format!("basebackup/{name}"), dir.path()).await;
    let mut tar = walhoard_basebackup::untar::TarReader::new(std::fs::File::open(path).unwrap());
    while let Some(e) = tar.next_entry().unwrap() {
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut tar.body(), &mut body).unwrap();
        if e.path == walhoard_basebackup::control::METADATA_MEMBER {
            let v: Value = serde_json::from_slice(&body).unwrap();
            return json!({"type": v["backup_type"], "parent": v["incremental_parent"]});
        }
    }
    panic!("basebackup/{name} holds no metadata");
}

/// What pg_verifybackup checks of a manifest, for servers whose package has none: its own
/// checksum, and every file it lists there with its size and checksum (SHA-256 or CRC-32C); no
/// incremental file left anywhere.
fn check_manifest(data: &Path, ts: &BTreeMap<String, std::path::PathBuf>) {
    let bytes = std::fs::read(data.join("backup_manifest")).unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    let body_end = text[..text.len() - 1].rfind('\n').unwrap() + 1;
    let sum = hex::encode(digest::digest(&digest::SHA256, &bytes[..body_end]));
    assert!(
        text.ends_with(&format!("\"{sum}\"}}\n")),
        "manifest checksum"
    );
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    let files = v["Files"].as_array().unwrap();
    assert!(files.len() > 100);
    for f in files {
        let path = f["Path"].as_str().unwrap();
        assert!(!path.contains("INCREMENTAL."), "{path}");
        // Restore writes its own recovery settings; pg_verifybackup ignores that file too.
        if path == "postgresql.auto.conf" {
            continue;
        }
        let on_disk = match path.strip_prefix("pg_tblspc/") {
            Some(rest) => {
                let (oid, rel) = rest.split_once('/').unwrap();
                ts[oid].join(rel)
            }
            None => data.join(path),
        };
        let content = std::fs::read(&on_disk).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(content.len() as u64, f["Size"].as_u64().unwrap(), "{path}");
        if f["Checksum-Algorithm"] == "SHA256" {
            let got = hex::encode(digest::digest(&digest::SHA256, &content));
            assert_eq!(got, f["Checksum"].as_str().unwrap(), "{path}");
        }
        if f["Checksum-Algorithm"] == "CRC32C" {
            // PostgreSQL's spelling: the final value's bytes in memory (little-endian) order.
            let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, &content) as u32;
            let got = hex::encode(crc.to_le_bytes());
            assert_eq!(got, f["Checksum"].as_str().unwrap(), "{path}");
        }
    }
    // And nothing on disk that the manifest does not list (pg_verifybackup's "present on
    // disk but not in the manifest"): what a newer backup dropped was removed.
    let listed: std::collections::BTreeSet<&str> =
        files.iter().map(|f| f["Path"].as_str().unwrap()).collect();
    let mut on_disk = walk(data)
        .into_iter()
        .map(|p| p.strip_prefix(data).unwrap().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    for (oid, dir) in ts {
        on_disk.extend(
            walk(dir)
                .into_iter()
                .map(|p| format!("pg_tblspc/{oid}/{}", p.strip_prefix(dir).unwrap().display())),
        );
    }
    for path in on_disk {
        let ignored = ["backup_manifest", "postgresql.auto.conf", "recovery.signal", "standby.signal"]
            .contains(&path.as_str())
            || path.starts_with("pg_wal/")
            // The links to the tablespaces, whose files are checked above.
            || (path.starts_with("pg_tblspc/") && path.matches('/').count() == 1);
        assert!(
            ignored || listed.contains(path.as_str()),
            "{path} is not in the manifest"
        );
    }
    let label = std::fs::read_to_string(data.join("backup_label")).unwrap();
    assert!(!label.contains("INCREMENTAL"), "{label}");
}

/// What both chain tests start from: a PostgreSQL 17+ primary with `summarize_wal` on, the
/// tablespace `ts1` and the tables [`state`] checks, a daemon on a local store in
/// `incremental` mode, and its first (full) backup.
pub(crate) struct IncrementalPrimary {
    pub pg: PgCluster,
    pub d: DaemonDir,
    pub daemon: Daemon,
    pub store: walhoard::storage::ObjectStore,
    pub storage: Value,
    pub full: String,
}

/// [`IncrementalPrimary`], or `None` (the test is skipped, saying so) below PostgreSQL 17.
pub(crate) fn incremental_primary() -> Option<IncrementalPrimary> {
    let mut pg = PgCluster::builder()
        .setting("wal_keep_size", "'1GB'")
        .start()
        .unwrap();
    if pg.major < 17 {
        eprintln!(
            "skipped: block-incremental backups need PostgreSQL 17 (this is {}; WALHOARD_PG_VERSION=17)",
            pg.major
        );
        return None;
    }
    pg.restart_with(Some(("summarize_wal", "on"))).unwrap();
    create_tablespace(&pg, "ts1");
    pg.psql("create table r (id bigserial primary key, batch text, v text)")
        .unwrap();
    insert(&pg, "base", 20_000);
    pg.psql("create table gone as select g as id, md5(g::text) v from generate_series(1, 1000) g")
        .unwrap();
    pg.psql("create table trunc as select g as id, md5(g::text) v from generate_series(1, 5000) g")
        .unwrap();
    pg.psql("create table ts_t (id int, v text) tablespace ts1; insert into ts_t select g, md5(g::text) from generate_series(1, 5000) g")
        .unwrap();
    let d = DaemonDir::new();
    let storage = d.local_storage();
    d.write_config(
        &pg,
        storage.clone(),
        json!({"basebackup_mode": "incremental", "basebackup_count": 10}),
    );
    readable_by_server(&d);
    let daemon = Daemon::start(&d);
    let store = d.store(&storage);
    wait_slot(&pg, &daemon);
    let full = take_basebackup(&d);
    Some(IncrementalPrimary {
        pg,
        d,
        daemon,
        store,
        storage,
        full,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_incremental_chain_with_pitr_and_broken_chains_refused() {
    let Some(IncrementalPrimary {
        pg,
        d,
        daemon,
        store,
        storage,
        full,
    }) = incremental_primary()
    else {
        return;
    };

    // Inserts, updates, a dropped table, a truncated one, a new one, the tablespace's table.
    insert(&pg, "i1", 5_000);
    pg.psql("update r set v = 'u1' where id % 7 = 0").unwrap();
    pg.psql("drop table gone").unwrap();
    pg.psql("truncate trunc; insert into trunc values (1, 'after truncate')")
        .unwrap();
    pg.psql("create table fresh1 as select g as id from generate_series(1, 3000) g")
        .unwrap();
    pg.psql("update ts_t set v = 'u1' where id % 5 = 0")
        .unwrap();
    let inc1 = take_basebackup(&d);
    // A point between the two incrementals.
    insert(&pg, "mid", 1_000);
    let want_mid = state(&pg);
    let mid_lsn = query(&pg, "select pg_current_wal_lsn()");

    insert(&pg, "i2", 3_000);
    pg.psql("delete from r where id % 11 = 0; update r set v = 'u2' where id % 13 = 0")
        .unwrap();
    pg.psql("create table fresh2 (id int); insert into fresh2 select generate_series(1, 100)")
        .unwrap();
    pg.psql("insert into ts_t select g, 'more' from generate_series(1, 2000) g")
        .unwrap();
    let inc2 = take_basebackup(&d);
    insert(&pg, "after", 500);
    let want_latest = state(&pg);
    let last = switch_segment(&pg);
    wait_archived(&store, &last, Duration::from_secs(60), &daemon).await;

    assert_eq!(
        backup_type(&store, &d, &full).await,
        json!({"type": "full", "parent": null})
    );
    assert_eq!(
        backup_type(&store, &d, &inc1).await,
        json!({"type": "incremental", "parent": full})
    );
    assert_eq!(
        backup_type(&store, &d, &inc2).await,
        json!({"type": "incremental", "parent": inc1})
    );
    let oid = query(&pg, "select oid from pg_tablespace where spcname = 'ts1'");
    let work = tempfile::tempdir().unwrap();

    // The whole chain, then WAL to the end of the archive.
    let (data, ts_dir) = (work.path().join("latest"), work.path().join("latest-ts"));
    let ts_map = format!("{oid}={}", ts_dir.display());
    let out = get_basebackup(
        &d,
        &data,
        &[&["--tablespace-dir", &ts_map][..], &PROMOTED_PRIMARY].concat(),
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("its chain: {full} <- {inc1} <- {inc2}")),
        "{err}"
    );
    check_manifest(&data, &BTreeMap::from([(oid.clone(), ts_dir.clone())]));
    if walhoard_testkit::tool_matches_major("pg_verifybackup", pg.major) {
        let out =
            std::process::Command::new(walhoard_testkit::tool_path("pg_verifybackup").unwrap())
                .args(["-n".as_ref(), data.as_os_str()])
                .output()
                .unwrap();
        assert!(out.status.success(), "pg_verifybackup: {}", stderr(&out));
    }
    if walhoard_testkit::tool_matches_major("pg_combinebackup", pg.major) {
        let chain = [full.as_str(), inc1.as_str(), inc2.as_str()];
        same_as_pg_combinebackup(&store, &d, &chain, &oid, &data, &ts_dir, work.path()).await;
    }
    give_to_server_user(&ts_dir).unwrap();
    let restored = start_promoted(&data);
    assert_eq!(state(&restored), want_latest);
    assert!(want_latest.contains("gone:-") && want_latest.contains("trunc:1:"));
    drop(restored);

    // PITR between the incrementals: the chain full <- inc1, then WAL.
    let (data, ts_dir) = (work.path().join("mid"), work.path().join("mid-ts"));
    let ts_map = format!("{oid}={}", ts_dir.display());
    let out = get_basebackup(
        &d,
        &data,
        &[
            &[
                "--recovery-target-lsn",
                &mid_lsn,
                "--tablespace-dir",
                &ts_map,
            ][..],
            &PROMOTED_PRIMARY,
        ]
        .concat(),
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("its chain: {full} <- {inc1}\n")),
        "{err}"
    );
    give_to_server_user(&ts_dir).unwrap();
    let restored = start_promoted(&data);
    assert_eq!(state(&restored), want_mid);
    drop(restored);

    // A corrupted chunk of the middle backup: refused, nothing left behind.
    let archive = Path::new(storage["directory"].as_str().unwrap()).to_path_buf();
    let chunk = walk(&archive)
        .into_iter()
        .find(|p| {
            let s = p.to_string_lossy();
            s.contains("basebackup_chunk") && s.contains(&inc1) && s.contains("base.tar")
        })
        .expect("inc1's base.tar chunk");
    let original = std::fs::read(&chunk).unwrap();
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    std::fs::write(&chunk, &bad).unwrap();
    let target = work.path().join("corrupt");
    let out = get_basebackup(&d, &target, &["--basebackup", &inc2]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&inc1), "{}", stderr(&out));
    assert!(!target.exists(), "a failed restore leaves nothing");
    std::fs::write(&chunk, &original).unwrap();

    // The middle backup missing: refused before anything is written, naming it.
    store.delete(&format!("basebackup/{inc1}")).await.unwrap();
    let target = work.path().join("missing");
    let out = get_basebackup(&d, &target, &["--basebackup", &inc2]);
    assert!(!out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("its parent basebackup/{inc1} is missing")),
        "{err}"
    );
    assert!(!target.exists());
    drop(daemon);
    drop(pg);
}

/// PostgreSQL's own `pg_combinebackup` on the chain's backups (their chunks downloaded and
/// unpacked as `pg_basebackup -Ft` would have left them) must give the same files, byte for
/// byte, as get-basebackup restored into `data` and `ts_dir` (the tablespace `oid`): all but
/// the files that restore writes itself or leaves out on purpose, and the manifest (whose
/// checksums are pg_combinebackup's CRC-32C, walhoard's SHA-256).
async fn same_as_pg_combinebackup(
    store: &walhoard::storage::ObjectStore,
    d: &DaemonDir,
    chain: &[&str],
    oid: &str,
    data: &Path,
    ts_dir: &Path,
    work: &Path,
) {
    let base = work.join("pg_combinebackup");
    let mut dirs = Vec::new();
    for (i, name) in chain.iter().enumerate() {
        let (dir, ts) = (base.join(i.to_string()), base.join(format!("{i}-ts")));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&ts).unwrap();
        let dl = base.join(format!("{i}-dl"));
        std::fs::create_dir_all(&dl).unwrap();
        for (chunk, into) in [("base.tar", &dir), (&format!("{oid}.tar")[..], &ts)] {
            let key = format!("basebackup_chunk/{name}/{chunk}");
            let file = restore(store, &d.ring(), &key, &dl).await;
            sh(&format!("tar -xf {} -C {}", file.display(), into.display()));
        }
        let key = format!("basebackup_chunk/{name}/backup_manifest");
        let manifest = restore(store, &d.ring(), &key, &dl).await;
        std::fs::rename(manifest, dir.join("backup_manifest")).unwrap();
        let link = dir.join("pg_tblspc").join(oid);
        // BASE_BACKUP with a tablespace_map has no links in base.tar: pg_combinebackup finds
        // the tablespaces by their links.
        std::fs::remove_file(&link).ok();
        std::fs::create_dir_all(dir.join("pg_tblspc")).unwrap();
        std::os::unix::fs::symlink(&ts, &link).unwrap();
        dirs.push(dir);
    }
    let (out, out_ts) = (base.join("out"), base.join("out-ts"));
    let newest_ts = base.join(format!("{}-ts", chain.len() - 1));
    let mut cmd =
        std::process::Command::new(walhoard_testkit::tool_path("pg_combinebackup").unwrap());
    cmd.arg("-o")
        .arg(&out)
        .arg("-T")
        .arg(format!("{}={}", newest_ts.display(), out_ts.display()));
    cmd.args(&dirs);
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "pg_combinebackup: {}", stderr(&o));
    let ours: Vec<String> = files_below(data)
        .into_iter()
        .filter(|p| {
            ![
                "backup_manifest",
                "postgresql.auto.conf",
                "recovery.signal",
                "standby.signal",
            ]
            .contains(&p.as_str())
                && !p.starts_with("pg_tblspc/")
        })
        .collect();
    let theirs: Vec<String> = files_below(&out)
        .into_iter()
        .filter(|p| {
            !["backup_manifest", "tablespace_map", "postgresql.auto.conf"].contains(&p.as_str())
                && !p.starts_with("pg_tblspc/")
        })
        .collect();
    let only = |a: &[String], b: &[String]| -> Vec<String> {
        a.iter().filter(|p| !b.contains(p)).cloned().collect()
    };
    assert_eq!(
        (only(&ours, &theirs), only(&theirs, &ours)),
        (vec![], vec![]),
        "files only ours, only pg_combinebackup's"
    );
    for p in &ours {
        assert!(
            std::fs::read(data.join(p)).unwrap() == std::fs::read(out.join(p)).unwrap(),
            "{p} differs from pg_combinebackup's"
        );
    }
    let (ours, theirs) = (files_below(ts_dir), files_below(&out_ts));
    assert_eq!(ours, theirs, "the same tablespace files");
    for p in &ours {
        assert!(
            std::fs::read(ts_dir.join(p)).unwrap() == std::fs::read(out_ts.join(p)).unwrap(),
            "tablespace {p} differs from pg_combinebackup's"
        );
    }
    eprintln!(
        "identical to pg_combinebackup: {} files and {} in the tablespace",
        files_below(data).len(),
        ours.len()
    );
}

/// The files below `dir` as sorted relative paths.
fn files_below(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = walk(dir)
        .into_iter()
        .map(|p| p.strip_prefix(dir).unwrap().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Every file below `dir` (not following symlinks; a symlink counts as a file).
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
