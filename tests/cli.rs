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
    let sysid = crate::common::system_identifier(&pg);
    assert_eq!(v["system_id"], sysid.to_string());
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

#[test]
fn cli_create_keys_prints_usable_config() {
    let out = walhoard(&["create-keys", "--key-id", "site1-2026", "--bits", "2048"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let k = &v["encryption_keys"]["site1-2026"];
    let public = k["public"].as_str().unwrap();
    let private = k["private"].as_str().unwrap();
    // The keys go straight into a site's configuration and work there.
    let cfg = serde_json::json!({
        "backup_sites": {"s": {
            "nodes": ["host=/tmp"],
            "object_storage": {"storage_type": "local", "directory": "/tmp/x"},
            "encryption_key_id": "site1-2026",
            "encryption_keys": v["encryption_keys"],
        }}
    });
    walhoard::config::Config::parse(&cfg.to_string(), "generated").unwrap();
    use std::io::{Read, Write};
    use walhoard::pipeline::encryption::{Decryptor, Encryptor, KeyRing, PrivateKey, PublicKey};
    let mut e = Encryptor::new(
        Vec::new(),
        &PublicKey::from_pem(public).unwrap(),
        "site1-2026",
        4096,
    )
    .unwrap();
    e.write_all(b"secret WAL").unwrap();
    let enc = e.finish().unwrap();
    let mut ring = KeyRing::default();
    ring.insert("site1-2026", PrivateKey::from_pem(private).unwrap());
    let mut out = Vec::new();
    Decryptor::new(&enc[..], &ring)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    assert_eq!(out, b"secret WAL");
    let bad = walhoard(&["create-keys", "--key-id", "x", "--bits", "1000"]);
    assert!(!bad.status.success());
}

/// A change to a configuration's JSON, giving the file's text.
type Edit = Box<dyn FnOnce(&mut serde_json::Value) -> String>;

/// `walhoard check --config <file>` on a configuration with one archive_command site (no
/// server needed) writing to local storage under `dir`, `edit` applied to the JSON first.
fn check_with(
    dir: &std::path::Path,
    edit: impl FnOnce(&mut serde_json::Value) -> String,
) -> std::process::Output {
    let mut cfg = serde_json::json!({
        "backup_location": dir.join("state"),
        "backup_sites": {"main": {
            "active_backup_mode": "archive_command",
            "object_storage": {"storage_type": "local", "directory": dir.join("archive")},
        }},
    });
    let text = edit(&mut cfg);
    let path = dir.join("walhoard.json");
    std::fs::write(&path, text).unwrap();
    Command::new(env!("CARGO_BIN_EXE_walhoard"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run walhoard check")
}

/// Issue 14 item 13: `check` passed configurations the daemon then refused (a zstd level of
/// 1000, a backup_location it cannot write), and accepted trailing data after the JSON and a
/// site named `..`.
#[test]
fn cli_check_refuses_what_the_daemon_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    // The baseline passes, and says it wrote into backup_location.
    let out = check_with(dir.path(), |c| c.to_string());
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out)
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("backup_location")),
        "{}",
        text(&out)
    );

    // backup_location is a regular file: the daemon cannot create its directories there.
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"x").unwrap();
    let out = check_with(dir.path(), |c| {
        c["backup_location"] = serde_json::json!(file);
        c.to_string()
    });
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).lines().any(|l| l.starts_with("FAIL")
            && l.contains("backup_location")
            && l.contains(&file.display().to_string())),
        "{}",
        text(&out)
    );

    let refused: [(&str, Edit); 5] = [
        (
            "http_address \"0.0.0.0\" is not a loopback address",
            Box::new(|c| {
                c["http_address"] = serde_json::json!("0.0.0.0");
                c.to_string()
            }),
        ),
        (
            "compression.level: compression level 1000 is out of range for zstd",
            Box::new(|c| {
                c["compression"] = serde_json::json!({"algorithm": "zstd", "level": 1000});
                c.to_string()
            }),
        ),
        (
            ".: trailing data after the JSON document",
            Box::new(|c| format!("{c}\n{{\"backup_sites\": {{}}}}")),
        ),
        (
            "backup_sites...: \"..\" cannot be a site name",
            Box::new(|c| {
                let site = c["backup_sites"]["main"].take();
                c["backup_sites"] = serde_json::json!({ "..": site });
                c.to_string()
            }),
        ),
        (
            "backup_sites.: \"\" cannot be a site name",
            Box::new(|c| {
                let site = c["backup_sites"]["main"].take();
                c["backup_sites"] = serde_json::json!({ "": site });
                c.to_string()
            }),
        ),
    ];
    for (want, edit) in refused {
        let out = check_with(dir.path(), edit);
        assert!(!out.status.success(), "{want}: {}", text(&out));
        assert!(text(&out).contains(want), "{want}: {}", text(&out));
    }
}

#[test]
fn cli_restore_command_with_a_bad_flag_exits_255_not_2() {
    // clap's usage error is 2, which PostgreSQL would read as "not found" and end recovery:
    // a typo in restore_command must stop it instead.
    let mut args = crate::common::RESTORE_COMMAND.to_vec();
    args.extend([
        "000000010000000000000001",
        "--outptu",
        "pg_wal/RECOVERYXLOG",
    ]);
    let out = walhoard(&args);
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    // Other commands keep clap's usual code.
    let out = walhoard(&["postgres-command", "--mode", "archive", "--bogus"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
