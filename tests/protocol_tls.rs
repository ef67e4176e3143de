//! TLS with a test CA: sslmode require, verify-ca, verify-full, and what each must refuse.

use std::path::Path;

use walhoard_protocol::{ConnectParams, Connection, Error, ReplicationClient};
use walhoard_testkit::PgCluster;

use crate::common::sh;

/// A CA and a server certificate for DNS name `localhost` only (no IP SAN), made with openssl.
fn make_certs(dir: &Path) {
    let d = dir.display();
    sh(&format!(
        "cd {d} && openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=walhoard-test-ca \
           -keyout ca.key -out ca.crt 2>/dev/null && \
         openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out server.csr 2>/dev/null && \
         printf 'subjectAltName=DNS:localhost\\nbasicConstraints=CA:FALSE\\n' > ext.cnf && \
         openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile ext.cnf \
           -out server.crt 2>/dev/null && \
         openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=other-ca -keyout other.key -out other.crt 2>/dev/null"
    ));
}

fn tls_cluster(certs: &Path) -> PgCluster {
    let read = |f: &str| std::fs::read(certs.join(f)).unwrap();
    let pg = PgCluster::builder()
        .data_file("server.crt", &read("server.crt"), 0o644)
        .data_file("server.key", &read("server.key"), 0o600)
        .setting("ssl", "on")
        .setting("ssl_cert_file", "'server.crt'")
        .setting("ssl_key_file", "'server.key'")
        .hba("hostnossl all,replication tlsuser 127.0.0.1/32 reject")
        .hba("hostssl replication tlsuser 127.0.0.1/32 scram-sha-256")
        .hba("hostssl all tlsuser 127.0.0.1/32 scram-sha-256")
        .start()
        .unwrap();
    // PostgreSQL 13 still defaults to md5 hashes.
    pg.psql("set password_encryption = 'scram-sha-256'; create role tlsuser login replication password 'tlspw'")
        .unwrap();
    pg
}

fn params(pg: &PgCluster, host: &str, sslmode: &str, root: Option<&Path>) -> ConnectParams {
    let mut s = format!(
        "host={host} port={} user=tlsuser password=tlspw dbname=postgres sslmode={sslmode}",
        pg.port
    );
    if let Some(r) = root {
        s.push_str(&format!(" sslrootcert={}", r.display()));
    }
    ConnectParams::parse(&s).unwrap()
}

async fn server_sees_ssl(pg: &PgCluster, p: &ConnectParams) -> bool {
    let mut c = Connection::connect(p)
        .await
        .unwrap_or_else(|e| panic!("{e}; server log:\n{}", pg.log()));
    assert!(c.is_tls());
    let r = c
        .query_one_result("select ssl::text as ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .await
        .unwrap();
    r.required(0, "ssl").unwrap() == "true"
}

#[tokio::test]
async fn protocol_tls_modes() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let pg = tls_cluster(certs.path());
    let ca = certs.path().join("ca.crt");
    let other = certs.path().join("other.crt");

    // require: encrypted, certificate not checked.
    assert!(server_sees_ssl(&pg, &params(&pg, "127.0.0.1", "require", None)).await);
    // prefer: TLS is used when the server offers it.
    assert!(server_sees_ssl(&pg, &params(&pg, "127.0.0.1", "prefer", None)).await);
    // verify-full with the right CA and name.
    assert!(server_sees_ssl(&pg, &params(&pg, "localhost", "verify-full", Some(&ca))).await);
    // verify-ca ignores the name (the certificate does not cover 127.0.0.1).
    assert!(server_sees_ssl(&pg, &params(&pg, "127.0.0.1", "verify-ca", Some(&ca))).await);

    // Replication connections over TLS too.
    let mut repl = ReplicationClient::connect(&params(&pg, "localhost", "verify-full", Some(&ca)))
        .await
        .unwrap();
    assert!(repl.connection().is_tls());
    let id = repl.identify_system().await.unwrap();
    // Streaming over TLS, large payloads read straight off the TLS stream: the WAL equals
    // pg_wal's.
    let seg = repl.wal_segment_size().await.unwrap();
    let start = crate::protocol_replication::new_slot_start(&mut repl, "tls", seg).await;
    pg.psql("create table t as select g, repeat(md5(g::text), 16) as pad from generate_series(1, 30000) g")
        .unwrap();
    pg.psql("select pg_switch_wal()").unwrap();
    let target = crate::common::current_lsn(&pg);
    let received = crate::protocol_replication::receive_until(
        &mut repl,
        "tls",
        start,
        target,
        seg,
        Some(16 * 1024),
    )
    .await;
    assert!(received.direct_reads > 0, "no payload was read directly");
    let compared = crate::protocol_replication::assert_matches_pg_wal(
        &pg,
        &received.segments,
        (start, target),
        seg,
        id.system_id,
    );
    assert!(compared >= 1, "no complete segment streamed over TLS");

    // verify-full refuses a name the certificate does not cover.
    let err = Connection::connect(&params(&pg, "127.0.0.1", "verify-full", Some(&ca)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Tls(_)), "{err}");
    // verify-ca and verify-full refuse a certificate from another CA.
    for mode in ["verify-ca", "verify-full"] {
        let err = Connection::connect(&params(&pg, "localhost", mode, Some(&other)))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Tls(_)), "{mode}: {err}");
        assert!(!err.is_retryable());
    }
    // verify-full without any root certificate is a configuration error.
    let mut p = params(&pg, "localhost", "verify-full", None);
    p.sslrootcert = Some(certs.path().join("missing.crt"));
    let err = Connection::connect(&p).await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    // The server refuses plaintext for this user.
    let err = Connection::connect(&params(&pg, "127.0.0.1", "disable", None))
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("28000"), "{err}");
}

#[tokio::test]
async fn protocol_tls_required_but_server_has_none() {
    let pg = PgCluster::start().unwrap();
    let p =
        ConnectParams::parse(&format!("{} sslmode=require", pg.tcp_conninfo("postgres"))).unwrap();
    let err = Connection::connect(&p).await.unwrap_err();
    assert!(matches!(err, Error::Tls(_)), "{err}");
    // prefer falls back to plaintext.
    let p =
        ConnectParams::parse(&format!("{} sslmode=prefer", pg.tcp_conninfo("postgres"))).unwrap();
    let c = Connection::connect(&p).await.unwrap();
    assert!(!c.is_tls());
}
