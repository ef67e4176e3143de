//! The daemon's metrics as their consumers see them: `GET /metrics` read by the Prometheus
//! client library's own parser (PyPI `prometheus-client`, installed by tools/test.sh), statsd
//! datagrams on a real UDP socket, and Pushgateway POSTs on a small HTTP listener, while a
//! real daemon archives a real cluster's WAL, serves a restore and takes a basebackup.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{output_ok, wait_until};
use crate::daemon_support::*;
use crate::http_api::api;
use crate::http_auth::raw;

/// `(type, sample name, labels, value)` of every sample, as prometheus_client parses `text`
/// (it names a counter's samples `<name>_total`).
fn parse_exposition(text: &str) -> Vec<(String, String, Value, f64)> {
    let dir = walhoard_testkit::cache_dir().join("prometheus-client");
    let script = "import sys, json\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        out = []\n\
        for f in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in f.samples:\n\
        \x20       out.append([f.type, s.name, s.labels, s.value])\n\
        print(json.dumps(out))\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .env("PYTHONPATH", &dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the exposition ({}; is it installed in {}? tools/test.sh does):\n{text}",
        String::from_utf8_lossy(&out.stderr),
        dir.display()
    );
    serde_json::from_slice::<Vec<(String, String, Value, f64)>>(&out.stdout).unwrap()
}

/// The value of the sample `name` whose labels include `labels`.
fn value(
    samples: &[(String, String, Value, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    samples
        .iter()
        .find(|(_, n, l, _)| n == name && labels.iter().all(|(k, v)| l[*k] == *v))
        .map(|s| s.3)
}

fn scrape(port: u16) -> Vec<(String, String, Value, f64)> {
    let (status, headers, body) = raw(port, "GET", "/metrics", &[]);
    assert_eq!(status, 200, "{body}");
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("text/plain; version=0.0.4")),
        "{headers:?}"
    );
    parse_exposition(&body)
}

/// A Pushgateway stand-in: records each request's line and body, answers 200.
/// (request line, body) of each request received.
type Requests = Arc<Mutex<Vec<(String, String)>>>;

fn pushgateway() -> (u16, Requests) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let record = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut reader = BufReader::new(conn);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut length = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0u8; length];
            let _ = reader.read_exact(&mut body);
            record.lock().unwrap().push((
                line.trim().to_string(),
                String::from_utf8_lossy(&body).into_owned(),
            ));
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (port, got)
}

/// statsd lines received by a real UDP socket, read as they come (so that none is dropped
/// from a full socket buffer).
struct Statsd {
    lines: Arc<Mutex<Vec<String>>>,
    port: u16,
}

impl Statsd {
    fn listen() -> Statsd {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let record = lines.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = socket.recv(&mut buf) {
                let line = String::from_utf8_lossy(&buf[..n]).into_owned();
                record.lock().unwrap().push(line);
            }
        });
        Statsd { lines, port }
    }

    /// The sum of the counter lines `<prefix>N|c`.
    fn counter_sum(&self, prefix: &str) -> f64 {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                l.strip_prefix(prefix)?
                    .strip_suffix("|c")?
                    .parse::<f64>()
                    .ok()
            })
            .sum()
    }

    /// Whether a gauge line `<prefix>N|g` arrived.
    fn has_gauge(&self, prefix: &str) -> bool {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.strip_prefix(prefix).is_some_and(|v| v.ends_with("|g")))
    }
}

/// `GET /metrics` parses with Prometheus' own parser and its counters follow the daemon as it
/// archives, serves a restore and takes a basebackup; statsd and the Pushgateway receive the
/// same metrics under pghoard's names, with the configured tags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_prometheus_statsd_and_pushgateway_follow_the_daemon() {
    let statsd = Statsd::listen();
    let (gw_port, pushed) = pushgateway();
    let a = api(json!({
        "prometheus": {"tags": {"env": "test"}},
        "statsd": {"host": "127.0.0.1", "port": statsd.port,
                   "format": "telegraf", "tags": {"env": "test"}},
        "push_gateway": {"endpoint": format!("http://127.0.0.1:{gw_port}")},
        "metrics_push_interval": 0.5,
    }))
    .await;
    let port = a.d.http_port;
    let xlog_ok = [
        ("result", "ok"),
        ("type", "xlog"),
        ("site", "main"),
        ("env", "test"),
    ];

    let first = scrape(port);
    for (ty, name, _, _) in &first {
        if name.starts_with("pghoard_upload_size_total")
            || name.starts_with("pghoard_transfer_operation_errors")
        {
            assert_eq!(ty, "counter", "{name}");
        }
    }
    let uploaded = value(&first, "pghoard_upload_size_total", &xlog_ok)
        .unwrap_or_else(|| panic!("no pghoard_upload_size sample: {first:?}"));
    assert!(uploaded > 0.0);
    let since = value(
        &first,
        "pghoard_xlogs_since_basebackup",
        &[("site", "main")],
    )
    .unwrap();
    assert!(since >= 3.0, "three segments archived, {since}");
    let archived = value(&first, "walhoard_archived_lsn", &[("site", "main")]).unwrap();
    assert!(value(&first, "walhoard_archive_lag_bytes", &[("site", "main")]).is_some());
    assert!(value(&first, "walhoard_archive_lag_seconds", &[("site", "main")]).is_some());
    assert!(value(&first, "walhoard_reported_flush_lsn", &[("site", "main")]).unwrap() > 0.0);
    assert!(value(&first, "walhoard_spool_bytes", &[("site", "main")]).is_some());
    let ratio = value(
        &first,
        "pghoard_compressed_size_ratio",
        &[("algorithm", "zstd"), ("type", "xlog"), ("site", "main")],
    )
    .unwrap();
    assert!(ratio > 0.0 && ratio < 1.0, "{ratio}");
    let age = value(
        &first,
        "pghoard_last_upload_age",
        &[("type", "xlog"), ("site", "main")],
    )
    .unwrap();
    assert!(age >= 0.0);

    // Two more segments: the counters move by at least their stored sizes.
    let store = a.d.store(&a.d.local_storage());
    let mut more = Vec::new();
    for _ in 0..2 {
        load(&a.pg, 2_000, 0);
        more.push(switch_segment(&a.pg));
    }
    wait_all_archived(&store, &more, Duration::from_secs(60), &a.daemon).await;
    let mut stored = 0.0;
    for name in &more {
        stored += store
            .stat(&format!("xlog/{name}"))
            .await
            .unwrap()
            .unwrap()
            .size as f64;
    }
    // An object is visible in the store a moment before its upload task counts it.
    let mut second = scrape(port);
    let grew = wait_until(Duration::from_secs(30), || {
        second = scrape(port);
        value(&second, "pghoard_upload_size_total", &xlog_ok).unwrap() >= uploaded + stored
    });
    let uploaded2 = value(&second, "pghoard_upload_size_total", &xlog_ok).unwrap();
    assert!(grew, "{uploaded} + {stored} > {uploaded2}");
    assert!(
        value(
            &second,
            "pghoard_xlogs_since_basebackup",
            &[("site", "main")]
        )
        .unwrap()
            >= since + 2.0
    );
    assert!(value(&second, "walhoard_archived_lsn", &[("site", "main")]).unwrap() > archived);

    // A restore through the API: pghoard_download_size counts the segment.
    let target = a.data.join("pg_wal/RECOVERYXLOG");
    let (status, body) = a.restore(&a.names[1], Some(&target)).await;
    assert_eq!(status.as_u16(), 201, "{body}");
    let third = scrape(port);
    let downloaded = value(
        &third,
        "pghoard_download_size_total",
        &[("result", "ok"), ("type", "xlog"), ("site", "main")],
    )
    .unwrap();
    assert_eq!(downloaded, std::fs::metadata(&target).unwrap().len() as f64);

    // A basebackup: the basebackup counters, and xlogs_since_basebackup starts over.
    let before = value(
        &third,
        "pghoard_xlogs_since_basebackup",
        &[("site", "main")],
    )
    .unwrap();
    output_ok(&mut basebackup_command(&a.d), "walhoard basebackup");
    let fourth = scrape(port);
    assert_eq!(
        value(&fourth, "pghoard_basebackup_completed_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        value(
            &fourth,
            "pghoard_backup_stream_basebackup_requested_total",
            &[("site", "main")]
        ),
        Some(1.0)
    );
    assert!(
        value(
            &fourth,
            "pghoard_basebackup_bytes_uploaded_total",
            &[("delta", "False")]
        )
        .unwrap()
            > 0.0
    );
    assert!(
        value(
            &fourth,
            "pghoard_backup_time",
            &[("basebackup_mode", "basic")]
        )
        .unwrap()
            > 0.0
    );
    assert!(
        value(
            &fourth,
            "pghoard_xlogs_since_basebackup",
            &[("site", "main")]
        )
        .unwrap()
            < before
    );
    for ty in ["basebackup", "basebackup_chunk"] {
        let labels = [("result", "ok"), ("type", ty), ("site", "main")];
        let stored = value(&fourth, "pghoard_upload_size_total", &labels);
        assert!(stored.is_some_and(|v| v > 0.0), "{ty}: {stored:?}");
    }
    assert_eq!(
        value(
            &fourth,
            "pghoard_basebackup_estimated_progress",
            &[("site", "main")]
        ),
        Some(100.0)
    );

    // statsd: telegraf lines, tags sorted; the counters' increases add up to what the
    // exposition shows (give the pusher a few intervals to send the last of them).
    let prefix = "pghoard.upload_size,env=test,result=ok,site=main,type=xlog:";
    let want = value(&fourth, "pghoard_upload_size_total", &xlog_ok).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || statsd.counter_sum(prefix)
            >= want),
        "statsd got {} of {want}: {:?}",
        statsd.counter_sum(prefix),
        statsd
            .lines
            .lock()
            .unwrap()
            .iter()
            .take(20)
            .collect::<Vec<_>>()
    );
    // Increases, not totals: never more than the counter itself.
    let sent = statsd.counter_sum(prefix);
    let now = value(&scrape(port), "pghoard_upload_size_total", &xlog_ok).unwrap();
    assert!(sent <= now, "statsd got {sent}, the counter is {now}");
    assert!(statsd.has_gauge("walhoard.archive_lag_bytes,env=test,site=main:"));
    // The xlog counter above may have reached its value in a push made before the backup
    // was counted: wait for the push that carries the backup too.
    assert!(wait_until(Duration::from_secs(30), || statsd
        .counter_sum("pghoard.basebackup_completed,env=test:")
        >= 1.0));

    // Pushgateway: POSTs to /metrics/job/pghoard/instance/<site>, in the text format.
    assert!(
        wait_until(Duration::from_secs(30), || {
            pushed.lock().unwrap().iter().any(|(line, body)| {
                line.starts_with("POST /metrics/job/pghoard/instance/")
                    && body.contains("pghoard_basebackup_completed 1")
            })
        }),
        "{:?}",
        pushed
            .lock()
            .unwrap()
            .iter()
            .map(|p| &p.0)
            .collect::<Vec<_>>()
    );
    let bodies: Vec<(String, String)> = pushed.lock().unwrap().clone();
    let (_, site_body) = bodies
        .iter()
        .rev()
        .find(|(l, _)| l == "POST /metrics/job/pghoard/instance/main HTTP/1.1")
        .unwrap();
    let pushed_samples = parse_exposition(site_body);
    assert!(
        value(
            &pushed_samples,
            "pghoard_upload_size_total",
            &[("result", "ok"), ("type", "xlog"), ("site", "main")]
        )
        .unwrap()
            > 0.0
    );
}

/// pghoard answers `GET /metrics` with 501 when `prometheus` is not configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_is_501_without_prometheus() {
    let a = api(json!({})).await;
    let (status, _, body) = raw(a.d.http_port, "GET", "/metrics", &[]);
    assert_eq!(status, 501, "{body}");
    assert!(body.contains("prometheus"), "{body}");
}
