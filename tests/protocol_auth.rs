//! Authentication through pg_hba.conf: md5, SCRAM-SHA-256, .pgpass, refusals.

use std::os::unix::fs::PermissionsExt;

use walhoard_protocol::{ConnectParams, Connection, Error, ReplicationClient};
use walhoard_testkit::PgCluster;

fn auth_cluster() -> PgCluster {
    let pg = PgCluster::builder()
        .hba("host replication md5user 127.0.0.1/32 md5")
        .hba("host all md5user 127.0.0.1/32 md5")
        .hba("host replication scramuser 127.0.0.1/32 scram-sha-256")
        .hba("host all scramuser 127.0.0.1/32 scram-sha-256")
        .hba("host all,replication nobody 127.0.0.1/32 reject")
        .start()
        .unwrap();
    pg.psql(
        "set password_encryption = 'md5'; create role md5user login replication password 'md5 pw';\
         set password_encryption = 'scram-sha-256'; create role scramuser login replication password 'scr:am\\pw';\
         create role nobody login replication",
    )
    .unwrap();
    pg
}

fn params(pg: &PgCluster, extra: &str) -> ConnectParams {
    ConnectParams::parse(&format!("{} sslmode=disable {extra}", pg.tcp_conninfo("x"))).unwrap()
}

#[tokio::test]
async fn protocol_md5_and_scram_logins() {
    let pg = auth_cluster();
    for (user, pw) in [("md5user", "'md5 pw'"), ("scramuser", "'scr:am\\\\pw'")] {
        let p = params(&pg, &format!("user={user} password={pw}"));
        let mut sql = Connection::connect(&p)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        let r = sql
            .query_one_result("select current_user as u")
            .await
            .unwrap();
        assert_eq!(r.required(0, "u").unwrap(), user);
        sql.close().await.unwrap();
        let mut repl = ReplicationClient::connect(&p).await.unwrap();
        repl.identify_system().await.unwrap();
    }
    // The server confirms which method it used.
    let log_check = pg
        .psql("select rolname, left(rolpassword, 13) from pg_authid where rolname in ('md5user','scramuser') order by 1")
        .unwrap();
    assert!(log_check.contains("md5user|md5"), "{log_check}");
    assert!(log_check.contains("scramuser|SCRAM-SHA-256"), "{log_check}");
}

#[tokio::test]
async fn protocol_auth_failures_are_typed() {
    let pg = auth_cluster();
    for user in ["md5user", "scramuser"] {
        let err = Connection::connect(&params(&pg, &format!("user={user} password=wrong")))
            .await
            .unwrap_err();
        assert_eq!(err.sqlstate(), Some("28P01"), "{user}: {err}");
        assert!(err.is_auth_failure() && !err.is_retryable(), "{err}");
        let err = ReplicationClient::connect(&params(&pg, &format!("user={user} password=wrong")))
            .await
            .err()
            .unwrap();
        assert_eq!(err.sqlstate(), Some("28P01"), "{user}: {err}");
        // No password at all: a clear local error, not a server round trip failure.
        let mut p = params(&pg, &format!("user={user}"));
        p.password = None;
        p.passfile = None;
        let err = Connection::connect(&p).await.unwrap_err();
        assert!(matches!(err, Error::Auth(_)), "{err}");
        assert!(err.to_string().contains("password"), "{err}");
    }
    let err = ReplicationClient::connect(&params(&pg, "user=nobody"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.sqlstate(), Some("28000"), "{err}");
    assert!(err.to_string().contains("pg_hba.conf"), "{err}");
}

#[tokio::test]
async fn protocol_password_from_pgpass() {
    let pg = auth_cluster();
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("pgpass");
    std::fs::write(
        &pass,
        "127.0.0.1:*:replication:scramuser:scr\\:am\\\\pw\n127.0.0.1:*:postgres:md5user:md5 pw\n",
    )
    .unwrap();
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let passfile = format!("passfile={}", pass.display());
    let mut repl = ReplicationClient::connect(&params(&pg, &format!("user=scramuser {passfile}")))
        .await
        .unwrap();
    repl.identify_system().await.unwrap();
    let mut sql = Connection::connect(&params(&pg, &format!("user=md5user {passfile}")))
        .await
        .unwrap();
    sql.simple_query("select 1").await.unwrap();
}

#[tokio::test]
async fn protocol_cleartext_password_login() {
    let pg = PgCluster::builder()
        .hba("host replication pwuser 127.0.0.1/32 password")
        .hba("host all pwuser 127.0.0.1/32 password")
        .start()
        .unwrap();
    pg.psql("create role pwuser login replication password 'plain pw'")
        .unwrap();
    let mut repl = ReplicationClient::connect(&params(&pg, "user=pwuser password='plain pw'"))
        .await
        .unwrap();
    repl.identify_system().await.unwrap();
    let err = Connection::connect(&params(&pg, "user=pwuser password=nope"))
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("28P01"), "{err}");
}
