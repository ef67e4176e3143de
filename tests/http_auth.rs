//! HTTP Basic authentication of the daemon's API (pghoard's `webserver_username` /
//! `webserver_password`), the refusal to expose an unauthenticated API, and the routes
//! pghoard's webserver has beside restore: `HEAD /<site>/archive/<file>` and
//! `GET /<site>/basebackup`. A real daemon streaming a real cluster.

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use walhoard::api_client::basic_header;
use walhoard_testkit::PgCluster;

use crate::common::output_ok;
use crate::daemon_support::*;
use crate::http_api::api;

const USER: &str = "walhoard";
const PASSWORD: &str = "s3cr3t pass:word";

/// One raw HTTP/1.1 request: status, header lines (lower-cased names) and body.
pub(crate) fn raw(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Every route refuses a request without credentials or with wrong ones (401, pghoard's
/// `WWW-Authenticate: Basic realm="pghoard"`) and serves it with the right ones; the
/// restore_command (walhoard's and pghoard's name) and `walhoard basebackup` reach the daemon
/// with them; the password never reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_basic_auth_guards_every_route_and_clients_send_credentials() {
    let a = api(json!({
        "webserver_username": USER,
        "webserver_password": PASSWORD,
        "restore_prefetch": 1,
    }))
    .await;
    let port = a.d.http_port;
    let seg = a.names[0].clone();
    let right = basic_header(USER, PASSWORD);
    let wrong_password = basic_header(USER, "s3cr3t pass:wordX");
    let wrong_user = basic_header("walhoarD", PASSWORD);
    let target = a.data.join("pg_wal/RECOVERYXLOG");
    let target_text = target.display().to_string();
    let archive = format!("/main/archive/{seg}");
    // (method, path, headers besides Authorization, status with the right credentials)
    type Route<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, u16);
    let routes: Vec<Route> = vec![
        ("GET", "/status".into(), vec![], 200),
        ("GET", "/metrics".into(), vec![], 501),
        ("GET", "/main/basebackup".into(), vec![], 200),
        ("HEAD", archive.clone(), vec![], 200),
        (
            "GET",
            archive.clone(),
            vec![("x-pghoard-target-path", target_text.as_str())],
            201,
        ),
        (
            "PUT",
            "/main/archive/000000010000000000000001".into(),
            vec![],
            404,
        ),
        ("GET", "/nowhere".into(), vec![], 404),
    ];
    for (method, path, extra, ok) in &routes {
        for (auth, why) in [
            (None, "no credentials"),
            (Some(wrong_password.as_str()), "a wrong password"),
            (Some(wrong_user.as_str()), "a wrong user"),
            (Some("Bearer x"), "another scheme"),
        ] {
            let mut headers = extra.clone();
            headers.extend(auth.map(|a| ("Authorization", a)));
            let (status, h, _) = raw(port, method, path, &headers);
            assert_eq!(status, 401, "{method} {path} with {why}");
            assert_eq!(
                header(&h, "www-authenticate"),
                Some("Basic realm=\"pghoard\""),
                "{method} {path}"
            );
        }
        let mut headers = extra.clone();
        headers.push(("Authorization", right.as_str()));
        let (status, _, body) = raw(port, method, path, &headers);
        assert_eq!(
            status, *ok,
            "{method} {path} with the right credentials: {body}"
        );
    }
    assert!(a.same_as_pg_wal(&target, &seg), "restored through the API");
    std::fs::remove_file(&target).unwrap();

    // restore_command with credentials: walhoard's flags, then pghoard's command name.
    let postgres_command = |bin: &std::path::Path, creds: &[&str]| {
        let mut c = Command::new(bin);
        if bin.ends_with("walhoard") {
            c.arg("postgres-command");
        }
        c.args(["--mode", "restore", "--site", "main"])
            .args(["--port", &port.to_string(), "--xlog", &seg, "--output"])
            .arg(&target)
            .args(creds);
        c
    };
    let walhoard = std::path::Path::new(env!("CARGO_BIN_EXE_walhoard"));
    let pghoard = crate::pghoard_cli::pghoard_bin(&["pghoard_postgres_command"]);
    let pghoard = pghoard.path().join("pghoard_postgres_command");
    for bin in [walhoard, &pghoard] {
        output_ok(
            &mut postgres_command(bin, &["--username", USER, "--password", PASSWORD]),
            "postgres-command with credentials",
        );
        assert!(a.same_as_pg_wal(&target, &seg), "{}", bin.display());
        std::fs::remove_file(&target).unwrap();
    }
    // Without them, or with wrong ones: the daemon refuses, and recovery must stop (255),
    // not take it for the end of the archive (1).
    for creds in [&[][..], &["--username", USER, "--password", "nope"][..]] {
        let out = postgres_command(walhoard, creds).output().unwrap();
        assert_eq!(out.status.code(), Some(255), "{creds:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("401"), "{err}");
        assert!(!target.exists());
    }

    // `walhoard basebackup` asks the daemon with the configuration's credentials; the new
    // backup is listed by GET /main/basebackup as pghoard lists it.
    let out = output_ok(&mut basebackup_command(&a.d), "walhoard basebackup");
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (status, _, body) = raw(
        port,
        "GET",
        "/main/basebackup",
        &[("Authorization", &right)],
    );
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    let items = listed["basebackups"].as_array().unwrap();
    let item = items
        .iter()
        .find(|b| {
            b["name"]
                .as_str()
                .unwrap()
                .ends_with(&format!("basebackup/{name}"))
        })
        .unwrap_or_else(|| panic!("{name} not in {body}"));
    assert!(item["size"].as_u64().unwrap() > 0, "{body}");
    assert!(item["metadata"]["start-time"].is_string(), "{body}");
    assert!(item["last_modified"].is_string(), "{body}");

    assert!(
        !a.daemon.log_text().contains(PASSWORD),
        "the password is in the daemon's log"
    );
}

/// HEAD answers whether the archive holds a file and its hash, as the object's metadata
/// records it (pghoard's `metadata-hash` / `metadata-hash-algorithm` headers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_head_archive_returns_the_stored_hash() {
    let a = api(json!({})).await;
    let port = a.d.http_port;
    let store = a.d.store(&a.d.local_storage());
    for seg in &a.names {
        let (status, h, body) = raw(port, "HEAD", &format!("/main/archive/{seg}"), &[]);
        assert_eq!(status, 200, "{seg}");
        assert!(body.is_empty());
        let meta = store.metadata(&format!("xlog/{seg}")).await.unwrap();
        assert_eq!(
            header(&h, "metadata-hash"),
            meta.get("hash").map(String::as_str)
        );
        assert_eq!(header(&h, "metadata-hash-algorithm"), Some("sha1"));
        // The hash is the plain segment's.
        let plain = std::fs::read(a.pg.wal_dir().join(seg)).unwrap();
        let sha1 = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &plain);
        assert_eq!(
            header(&h, "metadata-hash"),
            Some(hex::encode(sha1).as_str())
        );
    }
    let (status, _, _) = raw(port, "HEAD", "/main/archive/0000000100000000000000FF", &[]);
    assert_eq!(status, 404);
    let (status, _, _) = raw(port, "HEAD", "/other/archive/0000000100000000000000FF", &[]);
    assert_eq!(status, 404);
    let (status, _, _) = raw(
        port,
        "HEAD",
        &format!("/main/archive/{}", a.names[0]),
        &[("x-pghoard-target-path", "/tmp/x")],
    );
    assert_eq!(status, 400, "the target header belongs to downloads");
}

/// An API on a non-loopback address without credentials is refused at start, naming the
/// keys; `http_allow_unauthenticated_remote` is the explicit way to accept it.
#[test]
fn http_non_loopback_without_credentials_refuses_to_start() {
    let pg = PgCluster::start().unwrap();
    let d = DaemonDir::new();
    d.write_config(&pg, d.local_storage(), json!({}));
    let set = |key: &str, value: serde_json::Value| {
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.config_path()).unwrap()).unwrap();
        cfg[key] = value;
        std::fs::write(d.config_path(), cfg.to_string()).unwrap();
    };
    set("http_address", json!("0.0.0.0"));
    let mut daemon = Daemon::start(&d);
    let exited = crate::common::wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&daemon.log).is_ok_and(|l| l.contains("http_address"))
    });
    let log = daemon.log_text();
    assert!(exited, "{log}");
    assert!(
        log.contains("\"0.0.0.0\" is not a loopback address")
            && log.contains("webserver_password")
            && log.contains("http_allow_unauthenticated_remote"),
        "{log}"
    );
    let status = daemon.terminate(Duration::from_secs(10));
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    assert!(
        slot_restart(&pg).is_none(),
        "nothing started before the refusal"
    );

    set("http_allow_unauthenticated_remote", json!(true));
    let _daemon = Daemon::start(&d);
    d.wait_http();
}
