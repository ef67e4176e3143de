//! `get-basebackup --delta` over a chain of PostgreSQL 17+ block-incremental backups (a full
//! backup and two incrementals, with a tablespace): into (a) a directory restored from the
//! newest backup's parent, (b) the same with a relation file modified, one removed, a stray
//! file and directory added, and (c) one PostgreSQL was started on and ran for a while. Each
//! result must be the tree a full restore of the chain into an empty directory gives, byte for
//! byte and mode for mode; in (a) only the newest member may be downloaded (the older two are
//! reported as not downloaded, no file rebuilt); PostgreSQL starts on (c)'s result with the
//! primary's data. Skipped below PostgreSQL 17.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use walhoard_testkit::give_to_server_user;

use crate::common::query;
use crate::daemon_support::*;
use crate::restore::{
    get_basebackup, insert, start_promoted, stderr, take_basebackup, PROMOTED_PRIMARY,
};
use crate::restore_delta::{assert_same_tree, number_before, scribble, tree};
use crate::restore_incremental::{incremental_primary, state, IncrementalPrimary};

struct Chain {
    d: DaemonDir,
    oid: String,
    full: String,
    inc1: String,
    inc2: String,
}

impl Chain {
    /// Restores `backup` into `data` (its tablespace into `ts`) with `extra` flags.
    fn restore(&self, backup: &str, data: &Path, ts: &Path, extra: &[&str]) -> String {
        let map = format!("{}={}", self.oid, ts.display());
        let args = [
            &["--basebackup", backup, "--tablespace-dir", &map][..],
            &PROMOTED_PRIMARY,
            extra,
        ]
        .concat();
        let out = get_basebackup(&self.d, data, &args);
        let err = stderr(&out);
        assert!(out.status.success(), "{err}");
        err
    }

    /// Restores the newest backup with `--delta` into `data`/`ts` and compares the result
    /// with the reference, naming `what`. Returns the restore's stderr.
    fn delta_matches(
        &self,
        data: &Path,
        ts: &Path,
        reference: &(PathBuf, PathBuf),
        what: &str,
    ) -> String {
        let err = self.restore(&self.inc2, data, ts, &["--delta"]);
        eprintln!("{what}:\n{err}");
        let links = BTreeMap::from([(std::path::absolute(ts).unwrap(), reference.1.clone())]);
        assert_same_tree(
            &tree(data, &links),
            &tree(&reference.0, &BTreeMap::new()),
            &format!("{what}: data directory"),
        );
        assert_same_tree(
            &tree(ts, &BTreeMap::new()),
            &tree(&reference.1, &BTreeMap::new()),
            &format!("{what}: tablespace"),
        );
        err
    }

    fn not_downloaded(&self, err: &str, name: &str) -> bool {
        err.contains(&format!(
            "basebackup {name}: nothing needed from it, not downloaded"
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_incremental_delta_over_parent_modified_and_started_directories() {
    let Some(IncrementalPrimary {
        pg,
        d,
        daemon,
        store,
        full,
        ..
    }) = incremental_primary()
    else {
        return;
    };
    insert(&pg, "i1", 5_000);
    pg.psql("update r set v = 'u1' where id % 7 = 0").unwrap();
    pg.psql("create table fresh1 as select g as id from generate_series(1, 3000) g")
        .unwrap();
    pg.psql("update ts_t set v = 'u1' where id % 5 = 0")
        .unwrap();
    let inc1 = take_basebackup(&d);
    insert(&pg, "i2", 3_000);
    pg.psql("delete from r where id % 11 = 0; update r set v = 'u2' where id % 13 = 0")
        .unwrap();
    pg.psql("drop table gone").unwrap();
    pg.psql("truncate trunc; insert into trunc values (1, 'after truncate')")
        .unwrap();
    pg.psql("create table fresh2 (id int); insert into fresh2 select generate_series(1, 100)")
        .unwrap();
    pg.psql("insert into ts_t select g, 'more' from generate_series(1, 2000) g")
        .unwrap();
    let inc2 = take_basebackup(&d);
    let want = state(&pg);
    let r_path = query(&pg, "select pg_relation_filepath('r')");
    let fresh1_path = query(&pg, "select pg_relation_filepath('fresh1')");
    let ts_t_path = query(&pg, "select pg_relation_filepath('ts_t')");
    let last = switch_segment(&pg);
    wait_archived(&store, &last, Duration::from_secs(60), &daemon).await;
    let oid = query(&pg, "select oid from pg_tablespace where spcname = 'ts1'");
    let chain = Chain {
        d,
        oid,
        full,
        inc1,
        inc2,
    };
    let work = tempfile::tempdir().unwrap();
    let dirs = |name: &str| {
        (
            work.path().join(name),
            work.path().join(format!("{name}-ts")),
        )
    };

    // The reference: the chain restored into empty directories.
    let reference = dirs("ref");
    let err = chain.restore(&chain.inc2, &reference.0, &reference.1, &[]);
    assert!(
        err.contains(&format!(
            "its chain: {} <- {} <- {}",
            chain.full, chain.inc1, chain.inc2
        )),
        "{err}"
    );

    // (a) A directory restored from the parent: only the newest backup is downloaded, every
    // file kept or patched with its incremental file, none rebuilt.
    let (a, a_ts) = dirs("a");
    chain.restore(&chain.inc1, &a, &a_ts, &[]);
    let err = chain.delta_matches(&a, &a_ts, &reference, "(a) restored from the parent");
    assert!(chain.not_downloaded(&err, &chain.full), "{err}");
    assert!(chain.not_downloaded(&err, &chain.inc1), "{err}");
    assert!(
        err.contains(&format!(
            "chain 3/3: basebackup {} (incremental)",
            chain.inc2
        )),
        "{err}"
    );
    assert_eq!(number_before(&err, " from an older backup"), 0, "{err}");
    assert!(number_before(&err, " to patch with") > 100, "{err}");
    // Run again over its own result: everything is already as in the backup.
    let err = chain.delta_matches(&a, &a_ts, &reference, "(a) again");
    assert!(
        chain.not_downloaded(&err, &chain.full) && chain.not_downloaded(&err, &chain.inc1),
        "{err}"
    );
    assert_eq!(number_before(&err, " to patch with"), 0, "{err}");

    // (b) Modified, missing and extra files: those are rebuilt from the chain (so the older
    // members are read again), the rest kept or patched.
    let (b, b_ts) = dirs("b");
    chain.restore(&chain.inc1, &b, &b_ts, &[]);
    scribble(&b.join(&r_path));
    std::fs::remove_file(b.join(&fresh1_path)).unwrap();
    let ts_rel: PathBuf = Path::new(&ts_t_path).iter().skip(2).collect();
    scribble(&b_ts.join(&ts_rel));
    std::fs::write(b.join(&r_path).with_file_name("999999"), b"extra").unwrap();
    std::fs::create_dir_all(b.join("extra_dir/sub")).unwrap();
    std::fs::write(b.join("extra_dir/sub/x"), b"x").unwrap();
    std::fs::write(b_ts.join("stray"), b"x").unwrap();
    let err = chain.delta_matches(&b, &b_ts, &reference, "(b) modified, missing, extra");
    // r's and fresh1's files (the tablespace's table may be whole in the newest backup).
    assert!(number_before(&err, " from an older backup") >= 2, "{err}");
    assert!(
        !chain.not_downloaded(&err, &chain.full) || !chain.not_downloaded(&err, &chain.inc1),
        "{err}"
    );

    // (c) A directory PostgreSQL started on and ran for a while.
    let (c, c_ts) = dirs("c");
    chain.restore(&chain.inc1, &c, &c_ts, &[]);
    give_to_server_user(&c_ts).unwrap();
    let mut ran = start_promoted(&c);
    insert(&ran, "ran", 2_000);
    ran.psql("create table ran_only as select g from generate_series(1, 1000) g; checkpoint")
        .unwrap();
    ran.stop().unwrap();
    let c = ran.data_dir();
    chain.delta_matches(&c, &c_ts, &reference, "(c) started and run");
    give_to_server_user(&c_ts).unwrap();
    let restored = start_promoted(&c);
    assert_eq!(state(&restored), want);
    assert_eq!(
        query(&restored, "select to_regclass('ran_only') is null"),
        "t"
    );
    drop(restored);
    drop(ran);
    drop(daemon);
    drop(pg);
}
