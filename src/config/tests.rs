//! Unit tests of the configuration file: parsing, key paths in errors, pghoard's spellings.

use super::*;

const MINIMAL: &str = r#"{
    "backup_location": "/var/lib/walhoard",
    "backup_sites": {
        "main": {
            "nodes": [{"host": "127.0.0.1", "port": 5432, "user": "backup", "password": "secret", "slot": "walhoard"}],
            "object_storage": {"storage_type": "local", "directory": "/srv/backups"}
        }
    }
}"#;

#[test]
fn spool_fsync_values() {
    let with = |v: &str| {
        Config::parse(
            &MINIMAL.replace(
                r#""nodes":"#,
                &format!(r#""pg_receivexlog": {{"spool_fsync": {v}}}, "nodes":"#),
            ),
            "t.json",
        )
    };
    let c = with(r#""always""#).unwrap();
    assert_eq!(
        c.backup_sites["main"].pg_receivexlog.spool_fsync,
        SpoolFsync::Always
    );
    let e = with(r#""sometimes""#).unwrap_err().to_string();
    assert!(
        e.contains("backup_sites.main.pg_receivexlog.spool_fsync"),
        "{e}"
    );
}

#[test]
fn wal_buffer_memory_in_mib() {
    let with = |v: &str| {
        Config::parse(
            &MINIMAL.replacen('{', &format!(r#"{{"wal_buffer_memory_mib": {v},"#), 1),
            "t.json",
        )
    };
    let default = Config::parse(MINIMAL, "t.json").unwrap();
    assert_eq!(default.wal_buffer_bytes(), 512 << 20);
    assert_eq!(with("64").unwrap().wal_buffer_bytes(), 64 << 20);
    assert_eq!(with("0").unwrap().wal_buffer_bytes(), 0);
    for bad in [r#""512MiB""#, "-1", "1.5"] {
        let e = with(bad).unwrap_err().to_string();
        assert!(e.contains("t.json: wal_buffer_memory_mib:"), "{bad}: {e}");
    }
}

/// A pghoard configuration spells the Pushgateway key `pushgateway`: it must load and
/// configure the same client as `push_gateway`.
#[test]
fn pushgateway_in_pghoards_spelling() {
    for key in ["pushgateway", "push_gateway"] {
        let text = MINIMAL.replacen(
            '{',
            &format!(r#"{{"{key}": {{"endpoint": "http://127.0.0.1:9091"}},"#),
            1,
        );
        let c = Config::parse(&text, "t.json").unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(
            c.push_gateway.map(|p| p.endpoint).as_deref(),
            Some("http://127.0.0.1:9091"),
            "{key}"
        );
    }
}

/// pghoard's `moved_from` was an unknown key (the whole file refused); it must name other
/// sites of the file.
#[test]
fn moved_from_names_other_sites() {
    let two = MINIMAL.replace(
        r#""main": {"#,
        r#""old": {"active": false, "object_storage": {"storage_type": "local", "directory": "/srv/old"}},
        "main": {"moved_from": MOVED,"#,
    );
    let c = Config::parse(&two.replace("MOVED", r#"["old"]"#), "t.json").unwrap();
    assert_eq!(c.backup_sites["main"].moved_from, ["old"]);
    for bad in [r#"["gone"]"#, r#"["old", "main"]"#] {
        let e = Config::parse(&two.replace("MOVED", bad), "t.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("backup_sites.main.moved_from[") && e.contains("not another site"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn pghoard_defaults() {
    let c = Config::parse(MINIMAL, "t.json").unwrap();
    assert_eq!(
        c.http_address, "127.0.0.1",
        "the HTTP API binds loopback by default"
    );
    assert_eq!(c.http_port, 16000);
    assert_eq!(c.hash_algorithm, HashAlgorithm::Sha1);
    assert_eq!(c.log_level, LogLevel::Info);
    assert_eq!(c.compression.algorithm, Algorithm::Snappy);
    assert_eq!(c.transfer.upload_retries_warning_limit, 3);
    let s = &c.backup_sites["main"];
    assert_eq!(s.active_backup_mode, BackupMode::Walreceiver);
    assert_eq!(s.basebackup_mode, BasebackupMode::Basic);
    assert_eq!(s.basebackup_count, 2);
    assert_eq!(s.basebackup_interval_hours, Some(24.0));
    assert_eq!(s.basebackup_chunk_size, 2 << 30);
    assert_eq!(s.pg_receivexlog.resume_multiplier, 1.5);
    assert_eq!(s.pg_receivexlog.spool_fsync, SpoolFsync::Auto);
    assert_eq!(
        crate::settings::SiteSettings::build(&c, "main")
            .unwrap()
            .prefix,
        "main"
    );
    let (p, slot) = s.nodes[0].connect_params().unwrap();
    assert_eq!(slot.as_deref(), Some("walhoard"));
    assert_eq!(p.port, 5432);
    assert!(
        !format!("{c:?}").contains("secret"),
        "password in Debug output"
    );
}

#[test]
fn aliases_and_null_interval() {
    let text = MINIMAL.replace(
        r#""nodes""#,
        r#""active_backup_mode": "pg_receivexlog", "basebackup_interval_hours": null, "nodes""#,
    );
    let c = Config::parse(&text, "t.json").unwrap();
    let s = &c.backup_sites["main"];
    assert_eq!(s.active_backup_mode, BackupMode::Walreceiver);
    assert_eq!(s.basebackup_interval_hours, None);
    let text = MINIMAL.replace(
        r#"[{"host""#,
        r#"["host=/tmp port=5433 user=u slot=s1", {"host""#,
    );
    let c = Config::parse(&text, "t.json").unwrap();
    let (p, slot) = c.backup_sites["main"].nodes[0].connect_params().unwrap();
    assert_eq!((p.port, slot.as_deref()), (5433, Some("s1")));
}

fn err(text: &str) -> String {
    Config::parse(text, "t.json").unwrap_err().to_string()
}

/// pghoard's spellings become enums once, here; nothing deeper parses them again.
#[test]
fn pghoard_spellings_are_typed_once() {
    let text = MINIMAL.replace(
        r#""backup_location""#,
        r#""log_level": "WARNING", "hash_algorithm": "sha256",
           "compression": {"algorithm": "zstd", "level": 5}, "backup_location""#,
    );
    let c = Config::parse(&text, "t.json").unwrap();
    assert_eq!(c.log_level, LogLevel::Warning);
    assert_eq!(c.log_level.filter(), "warn");
    assert_eq!(c.hash_algorithm, HashAlgorithm::Sha256);
    assert_eq!(c.compression.algorithm, Algorithm::Zstd);
    let azure = |cloud: &str| {
        MINIMAL.replace(
            r#"{"storage_type": "local", "directory": "/srv/backups"}"#,
            &format!(
                r#"{{"storage_type": "azure", "account_name": "a", "bucket_name": "b", "azure_cloud": "{cloud}"}}"#
            ),
        )
    };
    let c = Config::parse(&azure("china"), "t.json").unwrap();
    match &c.backup_sites["main"].object_storage {
        Some(ObjectStorageConfig::Azure { azure_cloud, .. }) => {
            assert_eq!(*azure_cloud, Some(AzureCloud::China));
            assert_eq!(AzureCloud::China.endpoint_suffix(), "core.chinacloudapi.cn");
        }
        other => panic!("{other:?}"),
    }
    let e = err(&azure("mars"));
    assert!(e.contains("object_storage") && e.contains("mars"), "{e}");
}

#[test]
fn errors_name_the_key_path() {
    let cases = [
        (
            MINIMAL.replace(r#""backup_location""#, r#""backup_locaton""#),
            "unknown field `backup_locaton`",
        ),
        (
            MINIMAL.replace(r#""nodes""#, r#""basebackup_cnt": 3, "nodes""#),
            "backup_sites.main.basebackup_cnt: unknown field `basebackup_cnt`",
        ),
        (
            MINIMAL.replace(r#""port": 5432"#, r#""prot": 5432"#),
            "backup_sites.main.nodes[0]",
        ),
        (
            MINIMAL.replace(r#""directory""#, r#""dir""#),
            "backup_sites.main.object_storage",
        ),
        (
            MINIMAL.replace(r#""local""#, r#""ftp""#),
            "backup_sites.main.object_storage",
        ),
        (
            MINIMAL.replace(r#""nodes""#, r#""basebackup_count": "two", "nodes""#),
            "backup_sites.main.basebackup_count",
        ),
        (
            MINIMAL.replace(
                r#""nodes""#,
                r#""basebackup_mode": "incremental", "basebackup_incremental_max_chain": -1, "nodes""#,
            ),
            "backup_sites.main.basebackup_incremental_max_chain",
        ),
        (
            MINIMAL.replace(r#""nodes""#, r#""active_backup_mode": "rsync", "nodes""#),
            "backup_sites.main.active_backup_mode",
        ),
        (
            MINIMAL.replace(r#""nodes""#, r#""basebackup_hour": 24, "nodes""#),
            "backup_sites.main.basebackup_hour",
        ),
        (
            MINIMAL.replace(r#""nodes""#, r#""encryption_key_id": "k1", "nodes""#),
            "backup_sites.main.encryption_key_id",
        ),
        (
            MINIMAL.replace(r#""nodes""#, r#""basebackup_mode": "local-tar", "nodes""#),
            "backup_sites.main.pg_data_directory",
        ),
        (
            MINIMAL.replace(r#""slot": "walhoard""#, r#""slot": "Bad Slot""#),
            "backup_sites.main.nodes[0]",
        ),
        (
            MINIMAL.replace(
                r#""backup_location""#,
                r#""compression": {"algorithm": "gzip"}, "backup_location""#,
            ),
            "compression.algorithm",
        ),
        (
            MINIMAL.replace(
                r#""backup_location""#,
                r#""http_port": 99999, "backup_location""#,
            ),
            "http_port",
        ),
        (
            MINIMAL.replace(
                r#""backup_location""#,
                r#""hash_algorithm": "sha3", "backup_location""#,
            ),
            "hash_algorithm",
        ),
        (
            MINIMAL.replace(
                r#""backup_location""#,
                r#""log_level": "VERBOSE", "backup_location""#,
            ),
            "log_level",
        ),
        (
            MINIMAL.replace(
                r#""backup_location""#,
                r#""graceful_shutdown_upload_timeout": -1, "backup_location""#,
            ),
            "graceful_shutdown_upload_timeout: -1 is not between 0 and 86400 seconds",
        ),
        ("{".to_string(), "t.json"),
    ];
    for (text, want) in cases {
        let e = err(&text);
        assert!(e.contains(want), "error {e:?} should contain {want:?}");
        assert!(e.starts_with("t.json: "), "{e}");
    }
}

/// Issue 14 item 13: `{...} garbage` parsed as the first object, the rest ignored.
#[test]
fn config_trailing_data_after_json_is_refused() {
    for tail in ["}", "{}", "x", r#"{"backup_sites": {}}"#] {
        let e = err(&format!("{MINIMAL}\n{tail}"));
        assert!(
            e.starts_with("t.json: .: trailing data after the JSON document at line"),
            "{tail:?}: {e}"
        );
    }
    Config::parse(&format!("{MINIMAL}\n \t\n"), "t.json").expect("whitespace is fine");
}

/// Issue 14 item 13: a zstd level of 1000 passed `check` and failed the daemon.
#[test]
fn config_compression_level_out_of_range_names_the_key() {
    for (algorithm, level) in [("zstd", 1000), ("zstd", 23), ("lzma", 10), ("lzma", -1)] {
        let text = MINIMAL.replace(
            r#""backup_location""#,
            &format!(
                r#""compression": {{"algorithm": "{algorithm}", "level": {level}}}, "backup_location""#
            ),
        );
        let e = err(&text);
        assert!(
            e.contains("compression.level: compression level")
                && e.contains(&level.to_string())
                && e.contains(algorithm),
            "{e}"
        );
    }
    for (algorithm, level) in [("zstd", 19), ("lzma", 9), ("snappy", 1000)] {
        let text = MINIMAL.replace(
            r#""backup_location""#,
            &format!(
                r#""compression": {{"algorithm": "{algorithm}", "level": {level}}}, "backup_location""#
            ),
        );
        Config::parse(&text, "t.json").unwrap_or_else(|e| panic!("{algorithm} {level}: {e}"));
    }
}

/// Issue 14 item 13: a site named `..` was accepted (its spool and key prefix would be
/// the parent directory).
#[test]
fn config_site_name_must_be_one_path_component() {
    for (name, json_name, shown) in [
        ("..", "..", "backup_sites..."),
        (".", ".", "backup_sites.."),
        ("", "", "backup_sites.:"),
        ("a/b", "a/b", "backup_sites.a/b"),
        ("/", "/", "backup_sites./"),
        ("a\0b", "a\\u0000b", "backup_sites.a\\0b"),
    ] {
        let text = MINIMAL.replace(r#""main""#, &format!(r#""{json_name}""#));
        let e = err(&text);
        assert!(
            e.starts_with(&format!("t.json: {shown}")) && e.contains("cannot be a site name"),
            "{name:?}: {e}"
        );
    }
    for prefix in ["../other", "a/./b", "x/.."] {
        let text = MINIMAL.replace(r#""nodes""#, &format!(r#""prefix": "{prefix}", "nodes""#));
        let e = err(&text);
        assert!(e.contains("backup_sites.main.prefix"), "{e}");
        let text = MINIMAL.replace(
            r#""storage_type": "local""#,
            &format!(r#""storage_type": "local", "prefix": "{prefix}""#),
        );
        let e = err(&text);
        assert!(e.contains("backup_sites.main.object_storage.prefix"), "{e}");
    }
    for ok in ["main-2", "a.b", "...", "site_1"] {
        let text = MINIMAL.replace(r#""main""#, &format!(r#""{ok}""#));
        Config::parse(&text, "t.json").unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

/// The fuzz target `config` in miniature, deterministic: every truncation of a full
/// configuration, and each byte replaced by characters that change JSON's structure,
/// must give a configuration or an error, never a panic.
#[test]
fn config_parser_never_panics_on_mangled_files() {
    let full = MINIMAL.replace(
        r#""nodes""#,
        r#""prefix": "p/q", "basebackup_hour": 3, "encryption_key_id": "k1",
           "encryption_keys": {"k1": {"public": "-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----"}},
           "pg_receivexlog": {"spool_fsync": "always"}, "nodes""#,
    ) + "\n";
    let bytes = full.as_bytes();
    let mut inputs: Vec<Vec<u8>> = (0..bytes.len()).map(|n| bytes[..n].to_vec()).collect();
    for i in 0..bytes.len() {
        for b in [b'"', b'{', b'}', b'[', b':', b',', b'\\', b'0', 0xff, 0] {
            let mut v = bytes.to_vec();
            v[i] = b;
            inputs.push(v);
        }
    }
    for input in inputs {
        let text = String::from_utf8_lossy(&input);
        if let Ok(c) = Config::parse(&text, "t.json") {
            let _ = crate::settings::compression_settings(&c);
            for name in c.backup_sites.keys() {
                let _ = crate::settings::SiteSettings::build(&c, name);
            }
        }
    }
}

#[test]
fn keys_are_not_printed() {
    let text = MINIMAL.replace(
        r#""nodes""#,
        r#""encryption_key_id": "k1", "encryption_keys": {"k1": {"public": "PUBPEM", "private": "PRIVPEM"}}, "nodes""#,
    );
    let c = Config::parse(&text, "t.json").unwrap();
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("PRIVPEM") && !dbg.contains("PUBPEM"), "{dbg}");
}

#[test]
fn partial_wal_upload_interval_values() {
    let with = |v: &str| {
        Config::parse(
            &MINIMAL.replace(
                r#""nodes":"#,
                &format!(r#""partial_wal_upload_interval": {v}, "nodes":"#),
            ),
            "t.json",
        )
    };
    let get = |c: Config| c.backup_sites["main"].partial_wal_upload_interval.get();
    let default = Config::parse(MINIMAL, "t.json").unwrap();
    assert_eq!(get(default), Some(std::time::Duration::from_secs(5)));
    assert_eq!(get(with("0").unwrap()), None);
    assert_eq!(
        get(with("2.5").unwrap()),
        Some(std::time::Duration::from_millis(2500))
    );
    for bad in ["-1", r#""5s""#] {
        let e = with(bad).unwrap_err().to_string();
        assert!(
            e.contains("backup_sites.main.partial_wal_upload_interval"),
            "{bad}: {e}"
        );
    }
}

/// `synchronous_archive`: a boolean, false by default; a wrong type names the key path; with
/// partial uploads turned off (interval 0) it is refused, naming both keys.
#[test]
fn synchronous_archive_values() {
    let with = |v: &str| {
        Config::parse(
            &MINIMAL.replace(r#""nodes":"#, &format!(r#"{v}, "nodes":"#)),
            "t.json",
        )
    };
    let get = |c: Config| c.backup_sites["main"].synchronous_archive;
    assert!(!get(Config::parse(MINIMAL, "t.json").unwrap()));
    assert!(get(with(r#""synchronous_archive": true"#).unwrap()));
    assert!(get(with(
        r#""synchronous_archive": true, "partial_wal_upload_interval": 1"#
    )
    .unwrap()));
    for bad in [r#""yes""#, "1", "null"] {
        let e = with(&format!(r#""synchronous_archive": {bad}"#))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("backup_sites.main.synchronous_archive"),
            "{bad}: {e}"
        );
    }
    let e = with(r#""synchronous_archive": true, "partial_wal_upload_interval": 0"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("backup_sites.main.synchronous_archive")
            && e.contains("backup_sites.main.partial_wal_upload_interval"),
        "{e}"
    );
}
