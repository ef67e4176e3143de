//! `walhoard check`: what the daemon needs, tested the way the daemon would use it, per site:
//! the replication connection (and its authentication), wal_level, max_wal_senders,
//! summarize_wal (basebackup_mode `incremental`), the slot,
//! the local directories it writes (spool under backup_location, alerts), the object store (a
//! probe object written, read back and deleted), what the archive holds (objects retention does
//! not recognise fail the check), whose WAL the archive holds (another cluster's fails the
//! check) and the encryption keys.

use std::fmt::Write as _;

use anyhow::{bail, Context, Result};
use walhoard_protocol::{Connection, ReplicationClient};

use crate::config::{BackupMode, BasebackupMode, Config};
use crate::pipeline::encryption::{Decryptor, Encryptor, DEFAULT_CHUNK_SIZE};
use crate::settings::SiteSettings;
use crate::storage::Metadata;

mod sync_names;

/// One check's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckResult {
    pub site: String,
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

/// The primary's system identifier, when IDENTIFY_SYSTEM answered.
async fn check_replication(site: &SiteSettings, out: &mut Vec<CheckResult>) -> Option<u64> {
    let name = site.name.as_str();
    let mut push = |check: &str, r: Result<String>| {
        out.push(CheckResult {
            site: name.into(),
            check: check.into(),
            ok: r.is_ok(),
            detail: match r {
                Ok(d) => d,
                Err(e) => format!("{e:#}"),
            },
        })
    };
    let Some(node) = site.nodes.first() else {
        push(
            "replication connection",
            Err(anyhow::anyhow!("backup_sites.{name}.nodes is empty")),
        );
        return None;
    };
    let (params, slot) = (&node.params, node.slot.clone());
    let mut client = match ReplicationClient::connect(params).await {
        Ok(c) => c,
        Err(e) => {
            let hint = if e.is_auth_failure() {
                " (authentication: check the user, password and pg_hba.conf)"
            } else {
                ""
            };
            push(
                "replication connection",
                Err(anyhow::anyhow!("connect to {params}: {e}{hint}")),
            );
            return None;
        }
    };
    let version = client
        .connection()
        .server_param("server_version")
        .unwrap_or("?")
        .to_string();
    let identity = client.identify_system().await;
    let system_id = identity.as_ref().ok().map(|id| id.system_id);
    push(
        "replication connection",
        identity
            .map(|id| {
                format!(
                    "{params}: PostgreSQL {version}, system {}, timeline {}",
                    id.system_id, id.timeline
                )
            })
            .context("IDENTIFY_SYSTEM"),
    );
    let major = client.server_major();
    push(
        "server version",
        match major {
            Ok(m) if (13..=18).contains(&m) => Ok(format!("{m} is supported")),
            Ok(m) => Err(anyhow::anyhow!(
                "PostgreSQL {m} is not supported (13 to 18 are)"
            )),
            Err(e) => Err(e.into()),
        },
    );
    let wal_level = client.show("wal_level").await;
    push(
        "wal_level",
        match wal_level {
            Ok(l) if l == "replica" || l == "logical" => Ok(l),
            Ok(l) => Err(anyhow::anyhow!(
                "wal_level is {l}; streaming needs replica or logical"
            )),
            Err(e) => Err(e.into()),
        },
    );
    let senders = client.show("max_wal_senders").await;
    push(
        "max_wal_senders",
        match senders.map(|s| s.parse::<u32>().unwrap_or(0)) {
            Ok(0) => Err(anyhow::anyhow!(
                "max_wal_senders is 0: no replication connection is possible"
            )),
            Ok(n) => Ok(n.to_string()),
            Err(e) => Err(e.into()),
        },
    );
    if site.config.basebackup_mode == BasebackupMode::Incremental {
        let r = match client.server_major() {
            Ok(m) if m < 17 => Err(anyhow::anyhow!(
                "backup_sites.{name}.basebackup_mode \"incremental\" needs PostgreSQL 17 or \
                 later; the server is {m}: basebackups fail"
            )),
            _ => match client.show("summarize_wal").await {
                Ok(v) if v == "on" => Ok("on: basebackups are incremental".to_string()),
                Ok(v) => Err(anyhow::anyhow!(
                    "summarize_wal is {v}: backup_sites.{name}.basebackup_mode \"incremental\" \
                     takes full backups until it is on (set summarize_wal = on and reload)"
                )),
                Err(e) => Err(e.into()),
            },
        };
        push("summarize_wal", r);
    }
    if site.config.synchronous_archive {
        let names = client.show("synchronous_standby_names").await;
        let commit = client.show("synchronous_commit").await;
        push(
            "synchronous archive",
            match (names, commit) {
                (Ok(n), Ok(c)) => Ok(synchronous_archive(&site.application_name(), &n, &c)),
                (Err(e), _) | (_, Err(e)) => Err(e.into()),
            },
        );
    }
    if site.config.active_backup_mode == BackupMode::Walreceiver {
        let slot = slot.unwrap_or_else(|| format!("walhoard_{}", name.replace('-', "_")));
        let info = client.read_replication_slot(&slot).await;
        let active = slot_active(params, &slot).await;
        push(
            "replication slot",
            match info {
                Ok(Some(i)) if i.slot_type != "physical" => Err(anyhow::anyhow!(
                    "slot {slot} is a {} slot; walhoard needs a physical one",
                    i.slot_type
                )),
                Ok(Some(i)) => Ok(format!(
                    "{slot}: exists, restart_lsn {}{}",
                    i.restart_lsn.map_or("none".to_string(), |l| l.to_string()),
                    match active {
                        Some(true) => ", active",
                        Some(false) => ", not active",
                        None => "",
                    }
                )),
                Ok(None) => Ok(format!(
                    "{slot}: does not exist yet; the daemon creates it (RESERVE_WAL) on start"
                )),
                Err(e) => Err(anyhow::anyhow!("slot {slot}: {e}")),
            },
        );
    }
    let _ = client.close().await;
    system_id
}

/// What `synchronous_archive` buys on a primary with these `synchronous_standby_names` and
/// `synchronous_commit`: always a passing check (the archive is right either way), with a
/// warning when commits do not wait for the archive, and the price when they do.
fn synchronous_archive(app: &str, names: &str, commit: &str) -> String {
    let q = sync_names::quoted(app);
    let advice = format!("list it, best as ANY 1 ({q}, <replica>): commits then wait for the archive or a replica, whichever is first, and an object store outage does not block them while the replica is up");
    let parsed = match sync_names::parse(names) {
        Ok(Some(p)) => p,
        Ok(None) => {
            return format!("warning: synchronous_standby_names is empty: commits do not wait for {q}, so synchronous_archive buys nothing over partial uploads; {advice}")
        }
        Err(e) => {
            return format!("warning: cannot read synchronous_standby_names {names:?} ({e}); it must list {q}")
        }
    };
    if !parsed.lists(app) {
        return format!("warning: synchronous_standby_names ({names}) does not list {q}: commits do not wait for the archive, so synchronous_archive buys nothing over partial uploads; {advice}");
    }
    let mut out = format!("{q} is listed in synchronous_standby_names ({names}): commits wait for the archive (or, as the list says, other standbys)");
    if matches!(commit, "off" | "local" | "remote_write") {
        let _ = write!(out, "; warning: synchronous_commit is {commit}, so commits do not wait for WAL to be archived (on or remote_apply do)");
    }
    let others = parsed
        .names
        .iter()
        .filter(|n| !n.eq_ignore_ascii_case(app))
        .count() as u32;
    if others < parsed.num {
        let _ = write!(out, "; warning: no other standby can stand in for it, so an object store outage blocks every commit until the store is back; consider ANY 1 ({q}, <replica>)");
    } else {
        let _ = write!(
            out,
            "; a store outage blocks commits only if the other listed standbys are down too"
        );
    }
    out
}

/// The archive's newest WAL object must carry the primary's system identifier: the daemon
/// refuses to archive into another cluster's archive, with the same message.
async fn check_archive_owner(site: &SiteSettings, primary: u64, out: &mut Vec<CheckResult>) {
    use crate::daemon::identity;
    let name = site.name.as_str();
    let result: Result<String> = async {
        let store = site.open_store()?;
        let keys = site.keys()?;
        match identity::archive_identity(&store, &keys).await? {
            None => Ok(format!(
                "the archive holds no WAL yet; it becomes system {primary}'s"
            )),
            Some(a) if a.system_id == primary => Ok(format!(
                "{} has system identifier {primary}, the primary's",
                a.key
            )),
            Some(a) => bail!("{}", identity::mismatch_message(name, &a, primary)),
        }
    }
    .await;
    out.push(CheckResult {
        site: name.into(),
        check: "archive owner".into(),
        ok: result.is_ok(),
        detail: result.unwrap_or_else(|e| format!("{e:#}")),
    });
}

/// Whether a walsender uses the slot, when an ordinary connection may ask.
async fn slot_active(params: &walhoard_protocol::ConnectParams, slot: &str) -> Option<bool> {
    let mut sql = Connection::connect(&params.for_sql()).await.ok()?;
    let r = sql
        .query_one_result(&format!(
            "SELECT active::text AS active FROM pg_catalog.pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .await
        .ok();
    let _ = sql.close().await;
    r?.text(0, "active").ok()?.map(|a| a == "true")
}

async fn check_storage(site: &SiteSettings, out: &mut Vec<CheckResult>) {
    let name = site.name.as_str();
    let result: Result<String> = async {
        let store = site.open_store()?;
        let key = format!(
            "walhoard_check/probe-{}-{}",
            std::process::id(),
            crate::daemon::status::now_secs() as u64
        );
        let body = b"walhoard check probe".to_vec();
        let mut meta = Metadata::new();
        meta.insert("walhoard-check".into(), "1".into());
        store
            .put_bytes(&key, &body, &meta)
            .await
            .context("write a probe object")?;
        let read = store
            .get_bytes(&key)
            .await
            .context("read the probe object back");
        let deleted = store.delete(&key).await.context("delete the probe object");
        let (data, _) = read?;
        deleted?;
        if data != body {
            bail!("the probe object {key} came back different");
        }
        Ok(format!(
            "{} store: wrote, read and deleted {key}",
            store.kind()
        ))
    }
    .await;
    out.push(CheckResult {
        site: name.into(),
        check: "object storage".into(),
        ok: result.is_ok(),
        detail: result.unwrap_or_else(|e| format!("{e:#}")),
    });
}

/// What is under `basebackup/` and `basebackup_chunk/`: anything retention does not recognise
/// as walhoard's or pghoard's is left alone by it, and reported here so someone looks.
async fn check_archive(site: &SiteSettings, out: &mut Vec<CheckResult>) {
    use crate::basebackup::inventory::{self, ChunkDirState, Writer};
    use crate::daemon::wal_retention::{self, WalPlan};
    let name = site.name.as_str();
    let result: Result<String> = async {
        let store = site.open_store()?;
        let inv = inventory::scan(&store, crate::daemon::status::now_secs()).await?;
        let unrecognised = inv.unrecognised();
        if !unrecognised.is_empty() {
            bail!(
                "left alone by retention, not recognised as walhoard's or pghoard's: {}",
                unrecognised.join("; ")
            );
        }
        let count = |w: &Writer| inv.controls.iter().filter(|c| c.writer == *w).count();
        // WAL retention would leave (not walhoard's, older than every backup): reported,
        // not a failure: after a switch from pghoard it is pghoard's, expected until the
        // operator deletes it with pghoard's backups.
        if let WalPlan::Before {
            before, foreign, ..
        } = wal_retention::plan(&store, &inv, &[]).await?
        {
            if let Some(line) = wal_retention::foreign_summary(&foreign, before) {
                out.push(CheckResult {
                    site: name.into(),
                    check: "WAL retention".into(),
                    ok: true,
                    detail: line,
                });
            }
        }
        let orphans = inv
            .chunk_dirs
            .iter()
            .filter(|d| matches!(d.state, ChunkDirState::Orphan | ChunkDirState::Recent))
            .count();
        Ok(format!(
            "{} walhoard and {} pghoard basebackups; {orphans} unlisted walhoard chunk directories",
            count(&Writer::Walhoard),
            count(&Writer::Pghoard)
        ))
    }
    .await;
    out.push(CheckResult {
        site: name.into(),
        check: "archive contents".into(),
        ok: result.is_ok(),
        detail: result.unwrap_or_else(|e| format!("{e:#}")),
    });
}

/// The local directories the daemon writes at start (the site's spool under
/// `backup_location`, the alert directory), created and written as the daemon would: a
/// file-system error there stops the daemon, so it fails the check too.
fn check_local_dirs(config: &Config, settings: &SiteSettings, out: &mut Vec<CheckResult>) {
    let (name, site) = (settings.name.as_str(), &settings.config);
    let mut dirs = Vec::new();
    if site.active && site.active_backup_mode == BackupMode::Walreceiver {
        match settings.spool_dir() {
            Ok(d) => dirs.push(("backup_location", d)),
            Err(e) => {
                out.push(CheckResult {
                    site: name.into(),
                    check: "backup_location".into(),
                    ok: false,
                    detail: format!("{e:#}"),
                });
                return;
            }
        }
    }
    let alert_key = if config.alert_file_dir.is_some() {
        "alert_file_dir"
    } else {
        "backup_location"
    };
    dirs.push((alert_key, config.alert_dir()));
    for (key, dir) in dirs {
        let result = probe_dir(&dir)
            .with_context(|| format!("{key}: the daemon cannot write {}", dir.display()));
        out.push(CheckResult {
            site: name.into(),
            check: key.into(),
            ok: result.is_ok(),
            detail: match result {
                Ok(()) => format!(
                    "{}: created, written and synced a probe file",
                    dir.display()
                ),
                Err(e) => format!("{e:#}"),
            },
        });
    }
}

/// Creates `dir` and a probe file in it, syncs and removes it.
fn probe_dir(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).context("create the directory")?;
    let probe = dir.join(format!(".walhoard-check-{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)?;
        std::io::Write::write_all(&mut f, b"walhoard check probe")?;
        f.sync_all()
    })();
    let removed = std::fs::remove_file(&probe);
    written.context("write a probe file")?;
    removed.context("remove the probe file")?;
    Ok(())
}

fn check_keys(settings: &SiteSettings, out: &mut Vec<CheckResult>) {
    let (name, site) = (settings.name.as_str(), &settings.config);
    let Some(id) = &site.encryption_key_id else {
        out.push(CheckResult {
            site: name.into(),
            check: "encryption".into(),
            ok: true,
            detail: "no encryption_key_id: objects are stored unencrypted".into(),
        });
        return;
    };
    let result: Result<String> = (|| {
        let enc = settings
            .encryption()?
            .context("encryption_key_id set but no key")?;
        let ring = settings.keys()?;
        if ring.get(id).is_none() {
            return Ok(format!(
                "key {id}: public key usable; no private key here (restores need it)"
            ));
        }
        let mut sealed = Vec::new();
        {
            let mut e = Encryptor::new(&mut sealed, &enc.public, id, DEFAULT_CHUNK_SIZE)?;
            std::io::Write::write_all(&mut e, b"walhoard check")?;
            e.finish()?;
        }
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut Decryptor::new(&sealed[..], &ring)?, &mut plain)?;
        if plain != b"walhoard check" {
            bail!("key {id}: the round trip gave different bytes");
        }
        Ok(format!("key {id}: encrypts, and its private key decrypts"))
    })();
    out.push(CheckResult {
        site: name.into(),
        check: "encryption".into(),
        ok: result.is_ok(),
        detail: result.unwrap_or_else(|e| format!("backup_sites.{name}.encryption_keys: {e:#}")),
    });
}

/// `site`, or every site of the configuration.
fn site_names<'a>(config: &'a Config, site: Option<&str>) -> Result<Vec<&'a String>> {
    Ok(match site {
        Some(s) => vec![config
            .backup_sites
            .keys()
            .find(|k| k.as_str() == s)
            .with_context(|| format!("no backup site {s:?} in the configuration"))?],
        None => config.backup_sites.keys().collect(),
    })
}

/// `check --config-only`: what holds without a server or a store, for a file written before
/// either exists (a packaged sample, a configuration management template). The file parsed
/// and validated when it was loaded; here the HTTP API's exposure rule (as the daemon applies
/// it), and each site's settings resolve and its encryption keys parse. Nothing is connected
/// to or written.
pub fn run_config_only(config: &Config, site: Option<&str>) -> Result<Vec<CheckResult>> {
    crate::http::auth::check_exposure(config).map_err(anyhow::Error::msg)?;
    let mut out = Vec::new();
    for name in site_names(config, site)? {
        let result = SiteSettings::build(config, name).and_then(|s| {
            s.encryption()?;
            s.keys()?;
            Ok(format!(
                "settings resolve: {} node(s), object key prefix {:?}",
                s.nodes.len(),
                s.prefix
            ))
        });
        out.push(CheckResult {
            site: name.clone(),
            check: "configuration".into(),
            ok: result.is_ok(),
            detail: result.unwrap_or_else(|e| format!("{e:#}")),
        });
    }
    Ok(out)
}

/// Runs every check for `site` (or all sites); the results in order.
pub async fn run(config: &Config, site: Option<&str>) -> Result<Vec<CheckResult>> {
    // The daemon refuses to start with an API open to the network: so does check.
    crate::http::auth::check_exposure(config).map_err(anyhow::Error::msg)?;
    let mut out = Vec::new();
    for name in site_names(config, site)? {
        let settings = SiteSettings::build(config, name)?;
        let s = &settings.config;
        // An inactive site (pghoard: one that only holds backups, such as a `moved_from`
        // site) streams nothing; the daemon skips it, so it needs no node.
        if (s.active && s.active_backup_mode == BackupMode::Walreceiver) || !s.nodes.is_empty() {
            if let Some(primary) = check_replication(&settings, &mut out).await {
                check_archive_owner(&settings, primary, &mut out).await;
            }
        }
        check_local_dirs(config, &settings, &mut out);
        check_storage(&settings, &mut out).await;
        check_archive(&settings, &mut out).await;
        check_keys(&settings, &mut out);
        check_wal_gap(config, name, &mut out);
    }
    Ok(out)
}

/// Fails while the daemon's alert file says the site's archive has an unresolved WAL gap
/// (WAL the primary removed before it was archived; resolved by a basebackup taken after it).
fn check_wal_gap(config: &Config, name: &str, out: &mut Vec<CheckResult>) {
    let path = config
        .alert_dir()
        .join(crate::daemon::status::wal_gap_alert(name));
    if let Ok(text) = std::fs::read_to_string(&path) {
        let detail = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_string))
            .unwrap_or(text);
        out.push(CheckResult {
            site: name.into(),
            check: "WAL gap".into(),
            ok: false,
            detail: format!(
                "{detail} (alert file {}; a basebackup taken after the gap resolves it)",
                path.display()
            ),
        });
    }
}

/// The results as a table for a terminal.
pub fn render(results: &[CheckResult]) -> String {
    let mut s = String::new();
    for r in results {
        let _ = writeln!(
            s,
            "{:<4} {:<12} {:<24} {}",
            if r.ok { "ok" } else { "FAIL" },
            r.site,
            r.check,
            r.detail
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::synchronous_archive as verdict;

    #[test]
    fn synchronous_archive_says_whether_commits_wait_for_it() {
        let app = "walhoard_main";
        let v = verdict(app, "", "on");
        assert!(v.starts_with("warning:") && v.contains("empty"), "{v}");
        let v = verdict(app, "FIRST 1 (replica)", "on");
        assert!(
            v.starts_with("warning:") && v.contains("does not list walhoard_main"),
            "{v}"
        );
        assert!(v.contains("ANY 1 (walhoard_main, <replica>)"), "{v}");
        // Alone: an outage blocks commits.
        let v = verdict(app, "walhoard_main", "on");
        assert!(
            !v.starts_with("warning:") && v.contains("blocks every commit"),
            "{v}"
        );
        let v = verdict(app, "\"WALHOARD_MAIN\"", "on");
        assert!(v.contains("is listed"), "{v}");
        // With a replica that can stand in.
        let v = verdict(app, "ANY 1 (walhoard_main, replica)", "on");
        assert!(
            v.contains("is listed") && !v.contains("blocks every"),
            "{v}"
        );
        let v = verdict(app, "FIRST 2 (walhoard_main, replica)", "on");
        assert!(v.contains("blocks every commit"), "{v}");
        let v = verdict(app, "*", "remote_write");
        assert!(v.contains("synchronous_commit is remote_write"), "{v}");
        // A site name that needs quoting is written quoted in the advice.
        let v = verdict("walhoard_my-site", "", "on");
        assert!(v.contains("ANY 1 (\"walhoard_my-site\", <replica>)"), "{v}");
        let v = verdict(app, "FIRST 1 (a", "on");
        assert!(v.starts_with("warning: cannot read"), "{v}");
    }
}
