//! Recovery configuration of a restored data directory.
//!
//! PostgreSQL 12 and later read recovery settings from the ordinary configuration and decide
//! the mode from a signal file: `recovery.signal` (archive recovery, then promotion: a new
//! primary) or `standby.signal` (stay a standby). The settings are appended to
//! `postgresql.auto.conf`, which is read last, so they win over anything the backup's own
//! configuration says. Before 12 everything went into `recovery.conf`. The signal files and
//! recovery settings that came with the backup are removed first: the restore's own are the
//! only ones left.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::beneath::Beneath;
use super::Target;

/// What recovery should do.
#[derive(Debug, Clone)]
pub struct RecoverySettings {
    pub restore_command: String,
    pub target: Target,
    /// `recovery_target_action`: pause, promote or shutdown (PostgreSQL's default: pause).
    pub action: Option<String>,
    /// Archive recovery then promotion (`recovery.signal`), rather than a standby.
    pub to_primary: bool,
    pub primary_conninfo: Option<String>,
}

/// A configuration-file string literal: single quotes, embedded ones doubled.
pub fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A POSIX shell word.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-=:+,@".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The daemonless restore_command: this executable reading the archive with `config`.
pub fn restore_command(exe: &Path, config: &Path, site: &str) -> String {
    format!(
        "{} postgres-command --mode restore --config {} --site {} --xlog %f --output %p",
        shell_quote(&exe.display().to_string()),
        shell_quote(&config.display().to_string()),
        shell_quote(site)
    )
}

impl RecoverySettings {
    fn lines(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("restore_command", self.restore_command.clone()),
            ("recovery_target_timeline", "latest".to_string()),
        ];
        match &self.target {
            Target::Latest => {}
            Target::Time(text, _) => v.push(("recovery_target_time", text.clone())),
            Target::Xid(x) => v.push(("recovery_target_xid", x.clone())),
            Target::Name(n) => v.push(("recovery_target_name", n.clone())),
            Target::Lsn(l) => v.push(("recovery_target_lsn", l.to_string())),
        }
        if let Some(a) = &self.action {
            v.push(("recovery_target_action", a.clone()));
        }
        if let Some(c) = &self.primary_conninfo {
            v.push(("primary_conninfo", c.clone()));
        }
        v
    }
}

/// Settings of PostgreSQL's archive recovery, recovery target and standby groups (and
/// `standby_mode`, which recovery.conf had): what a backup taken from a standby carries
/// (`pg_basebackup -R` writes primary_conninfo there) and what a restore decides anew.
const RECOVERY_SETTINGS: &[&str] = &[
    "restore_command",
    "archive_cleanup_command",
    "recovery_end_command",
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_inclusive",
    "recovery_target_timeline",
    "recovery_target_action",
    "primary_conninfo",
    "primary_slot_name",
    "promote_trigger_file",
    "recovery_min_apply_delay",
    "standby_mode",
];

/// Files that put a server into recovery: the signal files PostgreSQL 12+ looks for
/// (`readRecoverySignalFile`) and the recovery.conf of older ones, which 12+ refuses to start
/// with.
const RECOVERY_FILES: &[&str] = &["standby.signal", "recovery.signal", "recovery.conf"];

const HEADER: &str = "# Recovery settings written by walhoard restore get-basebackup";

/// The setting a configuration line sets (lower case, as guc-file.l compares names), if any.
fn setting_name(line: &str) -> Option<String> {
    let name: String = line
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
        .collect();
    (!name.is_empty()).then(|| name.to_ascii_lowercase())
}

/// `text` without the lines that set a recovery setting (and without walhoard's own header
/// comment from an earlier restore); the removed lines are returned.
fn without_recovery_settings(text: &str) -> (String, Vec<String>) {
    let mut kept = String::with_capacity(text.len());
    let mut removed = Vec::new();
    for line in text.split_inclusive('\n') {
        let is_recovery =
            setting_name(line).is_some_and(|n| RECOVERY_SETTINGS.contains(&n.as_str()));
        if is_recovery {
            removed.push(line.trim_end().to_string());
        } else if line.trim() != HEADER {
            kept.push_str(line);
        }
    }
    (kept, removed)
}

/// Writes the recovery configuration into `data` for a server of `server_version_num`, after
/// removing the recovery configuration the backup brought along (a backup of a standby holds
/// its `standby.signal`, and its primary_conninfo/restore_command in postgresql.auto.conf;
/// left there, standby.signal wins over the recovery.signal written here and the server
/// waits for the old primary forever). Every file is opened below `data` without following a
/// symlink ([`Beneath`]). Returns what was removed, for the caller to report.
pub fn write(data: &Path, server_version_num: u32, s: &RecoverySettings) -> Result<Vec<String>> {
    let dir = Beneath::open(data).with_context(|| format!("open {}", data.display()))?;
    let mut removed = Vec::new();
    for name in RECOVERY_FILES {
        if dir
            .remove_file(Path::new(name))
            .with_context(|| format!("remove the backup's {name}"))?
        {
            removed.push(format!("{name} (from the backup)"));
        }
    }
    let auto = Path::new("postgresql.auto.conf");
    let existing = dir
        .read(auto)
        .with_context(|| format!("read {}", data.join(auto).display()))?
        .unwrap_or_default();
    let existing = String::from_utf8(existing)
        .with_context(|| format!("{} is not UTF-8", data.join(auto).display()))?;
    let (mut kept, dropped) = without_recovery_settings(&existing);
    for line in dropped {
        removed.push(format!("postgresql.auto.conf: {line}"));
    }
    let mut text = format!("{HEADER}\n");
    for (k, v) in s.lines() {
        let _ = writeln!(text, "{k} = {}", conf_quote(&v));
    }
    if server_version_num >= 120000 || server_version_num == 0 {
        if !kept.is_empty() && !kept.ends_with('\n') {
            kept.push('\n');
        }
        kept.push_str(&text);
        dir.replace(auto, kept.as_bytes(), 0o600)
            .with_context(|| format!("write {}", data.join(auto).display()))?;
        let signal = if s.to_primary {
            "recovery.signal"
        } else {
            "standby.signal"
        };
        dir.create(Path::new(signal), 0o600)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("write {}", data.join(signal).display()))?;
    } else {
        if !removed.is_empty() {
            dir.replace(auto, kept.as_bytes(), 0o600)
                .with_context(|| format!("write {}", data.join(auto).display()))?;
        }
        if !s.to_primary {
            text.push_str("standby_mode = 'on'\n");
        }
        dir.replace(Path::new("recovery.conf"), text.as_bytes(), 0o600)
            .with_context(|| format!("write {}", data.join("recovery.conf").display()))?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/usr/bin/walhoard"), "/usr/bin/walhoard");
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
        assert_eq!(conf_quote("it's"), "'it''s'");
        let cmd = restore_command(Path::new("/x/walhoard"), Path::new("/etc/w h.json"), "main");
        assert_eq!(
            cmd,
            "/x/walhoard postgres-command --mode restore --config '/etc/w h.json' --site main --xlog %f --output %p"
        );
    }

    #[test]
    fn standby_with_target() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            150004,
            &RecoverySettings {
                restore_command: "cmd %f %p".into(),
                target: Target::Name("before".into()),
                action: Some("promote".into()),
                to_primary: false,
                primary_conninfo: Some("host=x user='a'".into()),
            },
        )
        .unwrap();
        let conf = std::fs::read_to_string(d.path().join("postgresql.auto.conf")).unwrap();
        assert!(conf.contains("restore_command = 'cmd %f %p'"));
        assert!(conf.contains("recovery_target_name = 'before'"));
        assert!(conf.contains("recovery_target_timeline = 'latest'"));
        assert!(conf.contains("primary_conninfo = 'host=x user=''a'''"));
        assert!(d.path().join("standby.signal").exists());
        assert!(!d.path().join("recovery.signal").exists());
    }

    fn to_primary() -> RecoverySettings {
        RecoverySettings {
            restore_command: "cmd %f %p".into(),
            target: Target::Latest,
            action: None,
            to_primary: true,
            primary_conninfo: None,
        }
    }

    /// Regression (issue 14, item 18): a backup of a standby carries standby.signal and the
    /// standby's primary_conninfo; restored with --restore-to-primary, standby.signal won over
    /// recovery.signal and the server waited for the old primary forever.
    #[test]
    fn the_backups_own_recovery_configuration_is_replaced() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("standby.signal"), b"").unwrap();
        std::fs::write(
            d.path().join("postgresql.auto.conf"),
            "# Do not edit this file manually!\nwork_mem = '4MB'\nprimary_conninfo = 'host=old'\n  Restore_Command='cp x'\nprimary_slot_name = 's'\n",
        )
        .unwrap();
        let removed = write(d.path(), 150004, &to_primary()).unwrap();
        assert_eq!(removed.len(), 4, "{removed:?}");
        assert!(removed[0].starts_with("standby.signal"), "{removed:?}");
        assert!(!d.path().join("standby.signal").exists());
        assert!(d.path().join("recovery.signal").exists());
        let conf = std::fs::read_to_string(d.path().join("postgresql.auto.conf")).unwrap();
        assert!(conf.contains("work_mem = '4MB'"), "{conf}");
        assert!(
            !conf.contains("old") && !conf.contains("primary_slot_name"),
            "{conf}"
        );
        assert!(!conf.contains("cp x"), "{conf}");
        assert_eq!(conf.matches("restore_command").count(), 1, "{conf}");
        // A second restore over it replaces walhoard's block too, not appends another.
        write(d.path(), 150004, &to_primary()).unwrap();
        let again = std::fs::read_to_string(d.path().join("postgresql.auto.conf")).unwrap();
        assert_eq!(again, conf);
    }

    /// Regression (issue 14, item 3): postgresql.auto.conf or a signal file that is a symlink
    /// to a file outside the data directory got the recovery block appended / was created
    /// there. Now a symlinked postgresql.auto.conf is refused, a symlinked signal file is
    /// removed (the link, not its target), and nothing outside is written.
    #[test]
    fn symlinked_recovery_files_are_not_followed() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join("postgresql.auto.conf")).unwrap();
        let err = format!("{:#}", write(d.path(), 150004, &to_primary()).unwrap_err());
        assert!(
            err.contains("postgresql.auto.conf") && err.contains("symbolic link"),
            "{err}"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");

        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path().join("new"), d.path().join("recovery.signal"))
            .unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join("standby.signal")).unwrap();
        write(d.path(), 150004, &to_primary()).unwrap();
        assert!(std::fs::symlink_metadata(d.path().join("recovery.signal"))
            .unwrap()
            .is_file());
        assert!(!d.path().join("standby.signal").exists());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
    }
}
