//! The `walhoard` binary end to end.

use std::process::Command;

use walhoard_testkit::PgCluster;

fn walhoard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_walhoard"))
        .args(args)
        .output()
        .expect("run walhoard")
}

#[test]
fn cli_identify_reports_the_server() {
    let pg = PgCluster::start().unwrap();
    let out = walhoard(&[
        "identify",
        "--json",
        "--conninfo",
        &pg.socket_conninfo("postgres"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sysid = pg
        .psql("select system_identifier from pg_control_system()")
        .unwrap();
    assert_eq!(v["system_id"], sysid.trim());
    assert_eq!(v["timeline"], 1);
    assert_eq!(v["wal_segment_size"], 16 * 1024 * 1024);
}

#[test]
fn cli_bad_conninfo_names_the_problem() {
    let out = walhoard(&["identify", "--conninfo", "host=/nonexistent port=1 bogus=1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bogus"), "{err}");
    let out = walhoard(&["identify", "--conninfo", "host=/nonexistent port=1 user=x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/.s.PGSQL.1"), "{err}");
}
