//! Recovery configuration of a restored data directory.
//!
//! PostgreSQL 12 and later read recovery settings from the ordinary configuration and decide
//! the mode from a signal file: `recovery.signal` (archive recovery, then promotion: a new
//! primary) or `standby.signal` (stay a standby). The settings are appended to
//! `postgresql.auto.conf`, which is read last, so they win over anything the backup's own
//! configuration says. Before 12 everything went into `recovery.conf`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result};

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

/// Writes the recovery configuration into `data` for a server of `server_version_num`.
pub fn write(data: &Path, server_version_num: u32, s: &RecoverySettings) -> Result<()> {
    let mut text =
        String::from("\n# Recovery settings written by walhoard restore get-basebackup\n");
    for (k, v) in s.lines() {
        let _ = writeln!(text, "{k} = {}", conf_quote(&v));
    }
    let open = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(data.join(name))
            .with_context(|| format!("open {}", data.join(name).display()))
    };
    if server_version_num >= 120000 || server_version_num == 0 {
        let mut f = open("postgresql.auto.conf")?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .context("write postgresql.auto.conf")?;
        let signal = if s.to_primary {
            "recovery.signal"
        } else {
            "standby.signal"
        };
        open(signal)?
            .sync_all()
            .with_context(|| format!("sync {signal}"))?;
    } else {
        if !s.to_primary {
            text.push_str("standby_mode = 'on'\n");
        }
        let mut f = open("recovery.conf")?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .context("write recovery.conf")?;
    }
    Ok(())
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
}
