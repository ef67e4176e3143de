//! walhoard writing `basebackup_mode: delta` backups in pghoard's layout (issue 18):
//! `pghoard-delta-v2` control objects with rohmu's manifest, `basebackup_delta/<blake2s>`
//! objects shared between backups, small files embedded or in
//! `basebackup_delta_chunk/<name>/` bundles. Real PostgreSQL (the suite's major, or
//! `WALHOARD_PG_VERSION`); the names start with `basebackup_` so tools/test.sh's per-major
//! loop runs them on 13 and 17 too.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use walhoard_testkit::PgCluster;

use crate::daemon_support::DaemonDir;
use crate::restore::{get_basebackup, insert, start_promoted, stderr, take_basebackup, CHECKSUM};

/// A primary with `r` and forty tables of ~200 kB each (each its own delta object at the
/// 64 KiB threshold the tests configure).
pub(crate) fn primary() -> PgCluster {
    // No autovacuum: it would rewrite the new tables' pages (hint bits, visibility map) at a
    // moment of its choosing, and the tests count which files changed between backups.
    let pg = PgCluster::builder()
        .setting("wal_keep_size", "'1GB'")
        .setting("autovacuum", "off")
        .start()
        .unwrap();
    pg.psql("create table r (id bigserial primary key, batch text, v text)")
        .unwrap();
    insert(&pg, "first", 5000);
    for i in 0..40 {
        pg.psql(&format!(
            "create table t{i} as select g, md5((g * {i})::text) as v from generate_series(1, 3000) g"
        ))
        .unwrap();
    }
    // Hint bits set and pages frozen now, not by the first reader after a backup.
    pg.psql("vacuum freeze").unwrap();
    pg.psql("checkpoint").unwrap();
    pg
}

/// Delta mode, standalone (the WAL inside: restores without an archive), 64 KiB threshold,
/// two threads, `extra` merged in.
pub(crate) fn delta_site(pg: &PgCluster, d: &DaemonDir, extra: Value) {
    let mut site = json!({
        "basebackup_mode": "delta",
        "active_backup_mode": "standalone_hot_backup",
        "pg_data_directory": pg.data_dir(),
        "basebackup_delta_mode_min_delta_file_size": 65536,
        "basebackup_delta_mode_chunk_size": 1048576,
        // Two files hashed, two objects and two bundles stored at a time.
        "basebackup_threads": 2,
    });
    crate::daemon_support::merge(&mut site, extra);
    d.write_config(pg, d.local_storage(), site);
}

/// `(key, stored size)` of every object under `dir/` of the site's local store.
pub(crate) fn objects(d: &DaemonDir, dir: &str) -> BTreeMap<String, u64> {
    let root = d.path("archive").join("main").join(dir);
    let mut out = BTreeMap::new();
    let mut stack = vec![root.clone()];
    while let Some(p) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in rd {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_none_or(|x| x != "metadata") {
                let rel = path.strip_prefix(&root).unwrap().display().to_string();
                out.insert(
                    format!("{dir}/{rel}"),
                    std::fs::metadata(&path).unwrap().len(),
                );
            }
        }
    }
    out
}

/// The modification time of every object under `dir/`: an object stored again gets a new one.
pub(crate) fn mtimes(d: &DaemonDir, dir: &str) -> BTreeMap<String, std::time::SystemTime> {
    let root = d.path("archive").join("main");
    objects(d, dir)
        .into_keys()
        .map(|k| {
            let t = std::fs::metadata(root.join(&k))
                .unwrap()
                .modified()
                .unwrap();
            (k, t)
        })
        .collect()
}

/// The object `key`'s metadata sidecar.
pub(crate) fn sidecar(d: &DaemonDir, key: &str) -> Value {
    let p = d
        .path("archive")
        .join("main")
        .join(format!("{key}.metadata"));
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

/// The control object's manifest file entries (and its members checked).
pub(crate) async fn manifest_files(d: &DaemonDir, name: &str) -> Vec<Value> {
    let store = d.store(&d.local_storage());
    let dir = d.path(&format!("control-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let body =
        crate::daemon_support::restore(&store, &d.ring(), &format!("basebackup/{name}"), &dir)
            .await;
    let bytes = std::fs::read(&body).unwrap();
    let mut tar = tar_members(&bytes);
    let json = tar.remove(".pghoard_tar_metadata.json").unwrap();
    let v: Value = serde_json::from_slice(&json).unwrap();
    assert!(
        tar.contains_key("pgdata/global/pg_control"),
        "{:?}",
        tar.keys()
    );
    assert!(tar.contains_key("pgdata/backup_label"), "{:?}", tar.keys());
    v["manifest"]["snapshot_result"]["state"]["files"]
        .as_array()
        .unwrap()
        .clone()
}

/// A ustar archive's regular members by name.
fn tar_members(mut b: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    while b.len() >= 512 && b[0] != 0 {
        let h = &b[..512];
        let name = String::from_utf8_lossy(&h[..100])
            .trim_end_matches('\0')
            .to_string();
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&h[124..136]).trim_matches(|c: char| c == '\0' || c == ' '),
            8,
        )
        .unwrap();
        let body = b[512..512 + size].to_vec();
        out.insert(name, body);
        b = &b[512 + size.div_ceil(512) * 512..];
    }
    out
}

fn restore_and_check(d: &DaemonDir, name: &str, want: &str) {
    let target = d.path(&format!("restored-{name}"));
    let out = get_basebackup(d, &target, &["--basebackup", name, "--restore-to-primary"]);
    assert!(
        out.status.success(),
        "get-basebackup {name}: {}",
        stderr(&out)
    );
    let pg = start_promoted(&target);
    assert_eq!(pg.psql(CHECKSUM).unwrap(), want, "{}", pg.log());
    assert_eq!(pg.psql("select count(*) from t39").unwrap().trim(), "3000");
}

/// First a full delta backup, then one after ~1% of the data changed: the second stores only
/// the objects of the files that changed (and its small-file bundles), both restore, and
/// PostgreSQL started on each holds the rows of its time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basebackup_delta_stores_changed_files_only_and_restores() {
    let mut pg = primary();
    let d = DaemonDir::new();
    delta_site(&pg, &d, json!({}));
    let first = take_basebackup(&d);
    let want_first = pg.psql(CHECKSUM).unwrap();
    let after_first = objects(&d, "basebackup_delta");
    let written_first = mtimes(&d, "basebackup_delta");
    let bundles_first = objects(&d, &format!("basebackup_delta_chunk/{first}"));
    assert!(after_first.len() >= 40, "{after_first:?}");
    assert!(!bundles_first.is_empty());

    // Every object walhoard wrote carries its mark; shared objects no backup name.
    for key in after_first.keys() {
        let m = sidecar(&d, key);
        assert!(
            m["walhoard-writer"]
                .as_str()
                .is_some_and(|w| w.starts_with("walhoard ")),
            "{key}: {m}"
        );
        assert_eq!(m["format"], "pghoard-delta-v2", "{key}: {m}");
        assert!(m.get("backup-name").is_none(), "{key}: {m}");
    }
    let control = sidecar(&d, &format!("basebackup/{first}"));
    assert_eq!(control["format"], "pghoard-delta-v2", "{control}");
    assert_eq!(control["basebackup-mode"], "delta", "{control}");
    assert!(control["walhoard-writer"].is_string(), "{control}");
    for key in bundles_first.keys() {
        let m = sidecar(&d, key);
        assert_eq!(m["format"], "pghoard-bb-v2", "{key}: {m}");
        assert!(m["walhoard-writer"].is_string(), "{key}: {m}");
    }
    // The manifest names every large file by its object, embeds the tiny ones.
    let files = manifest_files(&d, &first).await;
    let hashed: Vec<&Value> = files.iter().filter(|f| f["hexdigest"] != "").collect();
    assert!(hashed.len() >= 40);
    for f in &hashed {
        let key = format!("basebackup_delta/{}", f["hexdigest"].as_str().unwrap());
        assert_eq!(
            after_first.get(&key).copied(),
            f["stored_file_size"].as_u64(),
            "{f}"
        );
        assert!(f["file_size"].as_u64().unwrap() >= 65536, "{f}");
    }
    let pg_version = files
        .iter()
        .find(|f| f["relative_path"] == "PG_VERSION")
        .unwrap();
    assert!(pg_version["content_b64"].is_string(), "{pg_version}");

    // About 1% of the data: one table of forty rewritten, a few rows added.
    pg.psql("update t7 set v = md5(v)").unwrap();
    insert(&pg, "second", 50);
    pg.psql("checkpoint").unwrap();
    let second = take_basebackup(&d);
    let want_second = pg.psql(CHECKSUM).unwrap();
    let after_second = objects(&d, "basebackup_delta");
    // Stored by the second backup: new keys, or the first's stored again (a new mtime).
    let written_second = mtimes(&d, "basebackup_delta");
    let new: Vec<(&String, &u64)> = after_second
        .iter()
        .filter(|(k, _)| written_first.get(*k) != written_second.get(*k))
        .collect();
    let stored = |objs: &[(&String, &u64)], bundles: &BTreeMap<String, u64>| -> u64 {
        objs.iter().map(|(_, n)| **n).sum::<u64>() + bundles.values().sum::<u64>()
    };
    let first_objs: Vec<(&String, &u64)> = after_first.iter().collect();
    let bundles_second = objects(&d, &format!("basebackup_delta_chunk/{second}"));
    let (bytes_first, bytes_second) = (
        stored(&first_objs, &bundles_first),
        stored(&new, &bundles_second),
    );
    eprintln!(
        "first backup: {} objects, {} bytes stored; second: {} new objects, {} bytes stored",
        after_first.len(),
        bytes_first,
        new.len(),
        bytes_second
    );
    assert!(
        new.len() * 4 <= after_first.len(),
        "{} of {} objects stored again: {new:?}",
        new.len(),
        after_first.len()
    );
    assert!(
        bytes_second * 3 < bytes_first,
        "second backup stored {bytes_second} bytes, the first {bytes_first}"
    );
    // The second backup references the first's unchanged objects.
    let second_files = manifest_files(&d, &second).await;
    let shared = second_files
        .iter()
        .filter(|f| {
            after_first.contains_key(&format!(
                "basebackup_delta/{}",
                f["hexdigest"].as_str().unwrap_or_default()
            ))
        })
        .count();
    assert!(shared >= 30, "{shared} files shared");
    pg.stop().unwrap();

    restore_and_check(&d, &first, &want_first);
    restore_and_check(&d, &second, &want_second);
}

/// A delta object missing or tampered with: `walhoard verify` (finding nothing wrong with the
/// backup before) names it, the
/// restore fails naming its key and leaves no data directory behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basebackup_delta_restore_refuses_a_missing_or_tampered_object() {
    let pg = primary();
    let d = DaemonDir::new();
    delta_site(
        &pg,
        &d,
        json!({"encryption_key_id": null, "encryption_keys": {}}),
    );
    let name = take_basebackup(&d);
    // `walhoard verify` reads every delta object as restore does. (It also reports the site's
    // WAL archive missing: these standalone backups have their WAL inside and no archive.)
    let v = crate::verify::verify_fails(&d.config_path(), &[]);
    assert_eq!(v["backups"][0]["problems"], json!([]), "{v:#}");
    let objs = objects(&d, "basebackup_delta");
    let mut keys = objs.keys();
    let (victim, gone) = (keys.next().unwrap().clone(), keys.next().unwrap().clone());
    let root = d.path("archive").join("main");

    // Tampered: one plain byte changed, stored again as walhoard would (zstd, size updated).
    let path = root.join(&victim);
    let original = std::fs::read(&path).unwrap();
    let mut plain = zstd::stream::decode_all(&original[..]).unwrap();
    let at = plain.len() / 2;
    plain[at] ^= 0x55;
    std::fs::write(&path, zstd::stream::encode_all(&plain[..], 3).unwrap()).unwrap();
    let v = crate::verify::verify_fails(&d.config_path(), &[]);
    let bad: Vec<_> = crate::verify::problems(&v)
        .into_iter()
        .filter(|(k, p)| *k == victim && p.contains("BLAKE2s-256"))
        .collect();
    // One problem per file whose content the object holds: two files with the same bytes (a
    // catalog of template0 and of template1, say) share one object and are both named.
    assert!(!bad.is_empty(), "verify: {v:#}");
    let target = d.path("tampered");
    let out = get_basebackup(&d, &target, &["--basebackup", &name]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&victim), "{err}");
    assert!(err.contains("BLAKE2s-256"), "{err}");
    crate::restore::assert_not_a_data_dir(&target);

    // Missing (the tampered one put back).
    std::fs::write(&path, original).unwrap();
    std::fs::remove_file(root.join(&gone)).unwrap();
    std::fs::remove_file(root.join(format!("{gone}.metadata"))).unwrap();
    let target = d.path("missing");
    let out = get_basebackup(&d, &target, &["--basebackup", &name]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&gone), "{err}");
    crate::restore::assert_not_a_data_dir(&target);
}

/// Retention with `basebackup_count` 1 after two delta backups: the first backup, its bundles,
/// the bundles of an interrupted delta backup and the walhoard objects only the first
/// referenced go; every object the kept backup references
/// stays (it still restores); an unreferenced object walhoard did not write stays, and so does
/// an unreferenced walhoard object written recently (a backup running elsewhere may be about
/// to reference it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basebackup_delta_retention_deletes_only_unreferenced_walhoard_objects() {
    let mut pg = primary();
    let d = DaemonDir::new();
    delta_site(
        &pg,
        &d,
        json!({"basebackup_count": 1, "basebackup_count_min": 1}),
    );
    let first = take_basebackup(&d);
    let first_objects = objects(&d, "basebackup_delta");
    pg.psql("update t7 set v = md5(v)").unwrap();
    pg.psql("update t8 set v = md5(v)").unwrap();
    pg.psql("checkpoint").unwrap();
    let second = take_basebackup(&d);
    let want = pg.psql(CHECKSUM).unwrap();
    pg.stop().unwrap();
    let second_refs: std::collections::BTreeSet<String> = manifest_files(&d, &second)
        .await
        .iter()
        .filter_map(|f| f["hexdigest"].as_str().filter(|h| !h.is_empty()))
        .map(|h| format!("basebackup_delta/{h}"))
        .collect();
    let only_first: Vec<&String> = first_objects
        .keys()
        .filter(|k| !second_refs.contains(*k))
        .collect();
    assert!(
        only_first.len() >= 2,
        "t7's and t8's old objects: {only_first:?}"
    );

    let root = d.path("archive").join("main");
    let delta_dir = root.join("basebackup_delta");
    let some = root.join(first_objects.keys().next().unwrap());
    // pghoard's (no mark), referenced by nothing.
    let foreign = format!("basebackup_delta/{}", "f".repeat(64));
    std::fs::copy(&some, root.join(&foreign)).unwrap();
    let mut m = sidecar(&d, first_objects.keys().next().unwrap());
    m.as_object_mut().unwrap().remove("walhoard-writer");
    std::fs::write(root.join(format!("{foreign}.metadata")), m.to_string()).unwrap();
    // Bundles of an interrupted delta backup (no control object), walhoard's.
    let orphan = "2020-01-01_00-00_0";
    let orphan_dir = root.join("basebackup_delta_chunk").join(orphan);
    std::fs::create_dir_all(&orphan_dir).unwrap();
    let (bundle, _) = objects(&d, &format!("basebackup_delta_chunk/{second}"))
        .into_iter()
        .next()
        .unwrap();
    let orphan_key = format!("basebackup_delta_chunk/{orphan}/{orphan}.00000001.pghoard");
    std::fs::copy(root.join(&bundle), root.join(&orphan_key)).unwrap();
    let mut m = sidecar(&d, &bundle);
    m["backup-name"] = orphan.into();
    std::fs::write(root.join(format!("{orphan_key}.metadata")), m.to_string()).unwrap();
    crate::retention::backdate_tree(&orphan_dir, std::time::Duration::from_secs(3 * 86400));
    crate::retention::backdate_tree(&delta_dir, std::time::Duration::from_secs(3 * 86400));
    // walhoard's, referenced by nothing, but just written.
    let recent = format!("basebackup_delta/{}", "e".repeat(64));
    std::fs::copy(&some, root.join(&recent)).unwrap();
    std::fs::copy(
        root.join(format!("{}.metadata", first_objects.keys().next().unwrap())),
        root.join(format!("{recent}.metadata")),
    )
    .unwrap();

    let text = std::fs::read_to_string(d.config_path()).unwrap();
    let config = walhoard::config::Config::parse(&text, "walhoard.json").unwrap();
    let store = d.store(&d.local_storage());
    let (deleted, _) = walhoard::daemon::basebackups::apply_retention(
        &store,
        "main",
        &config.backup_sites["main"],
    )
    .await
    .unwrap();
    assert_eq!(deleted, std::slice::from_ref(&first));
    let left = objects(&d, "basebackup_delta");
    for k in &second_refs {
        assert!(
            left.contains_key(k),
            "{k}, referenced by the kept backup, deleted"
        );
    }
    for k in &only_first {
        assert!(
            !left.contains_key(*k),
            "{k}, referenced by no kept backup, kept"
        );
    }
    assert!(left.contains_key(&foreign), "pghoard's object deleted");
    assert!(left.contains_key(&recent), "a recent object deleted");
    assert!(objects(&d, &format!("basebackup_delta_chunk/{first}")).is_empty());
    assert!(!objects(&d, &format!("basebackup_delta_chunk/{second}")).is_empty());
    assert!(
        objects(&d, &format!("basebackup_delta_chunk/{orphan}")).is_empty(),
        "an interrupted delta backup's bundles kept"
    );

    restore_and_check(&d, &second, &want);
}
