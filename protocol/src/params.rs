//! Connection settings: libpq `key=value` strings, `postgres://` URIs, pghoard node objects,
//! the PG* environment variables and `~/.pgpass`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Tcp(String),
    /// Directory holding `.s.PGSQL.<port>`.
    Unix(PathBuf),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(h) => write!(f, "{h}"),
            Host::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// libpq's sslmode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// libpq tries plaintext first and TLS second; walhoard treats it as `Disable`, since a
    /// server that insists on TLS is served better by `prefer`.
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::Config(format!(
                    "invalid sslmode {other:?}: expected disable, allow, prefer, require, verify-ca or verify-full"
                )))
            }
        })
    }
}

/// Whether and how the connection is a replication connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicationMode {
    /// An ordinary SQL connection.
    Off,
    /// `replication=true`: physical replication commands only.
    Physical,
}

/// Everything needed to open a connection. Build it with [`ConnectParams::parse`] (a conninfo
/// string or URI) or [`ConnectParams::from_pairs`] (a pghoard node object).
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectParams {
    pub host: Host,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: Option<String>,
    pub application_name: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub connect_timeout: Option<Duration>,
    pub options: Option<String>,
    pub passfile: Option<PathBuf>,
    pub replication: ReplicationMode,
}

// Passwords never reach logs: Debug hides them.
impl fmt::Debug for ConnectParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("replication", &self.replication)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for ConnectParams {
    /// A loggable description: no password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "host={} port={} user={}",
            self.host, self.port, self.user
        )?;
        if let Some(db) = &self.dbname {
            write!(f, " dbname={db}")?;
        }
        Ok(())
    }
}

/// Keys understood in conninfo strings, URIs and node objects.
pub const KNOWN_KEYS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "application_name",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "connect_timeout",
    "options",
    "passfile",
    "replication",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "target_session_attrs",
    "channel_binding",
    "gssencmode",
];

/// The environment a connection's defaults come from; tests supply their own.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn var(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

impl ConnectParams {
    /// Parses a libpq conninfo string (`host=... port=...`) or a `postgres://` URI, filling in
    /// what is missing from PG* environment variables and libpq's defaults.
    pub fn parse(s: &str) -> Result<Self> {
        Self::parse_with_env(s, &ProcessEnv)
    }

    pub fn parse_with_env(s: &str, env: &dyn Env) -> Result<Self> {
        let pairs = if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            parse_uri(s)?
        } else {
            parse_conninfo(s)?
        };
        Self::from_pairs_with_env(pairs, env)
    }

    /// Builds settings from key/value pairs, as found in a pghoard node object. Unknown keys
    /// are an error naming the key.
    pub fn from_pairs<I, K, V>(pairs: I) -> Result<Self>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self::from_pairs_with_env(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            &ProcessEnv,
        )
    }

    pub fn from_pairs_with_env(pairs: Vec<(String, String)>, env: &dyn Env) -> Result<Self> {
        let mut map: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in pairs {
            if !KNOWN_KEYS.contains(&k.as_str()) {
                return Err(Error::Config(format!("unknown connection parameter {k:?}")));
            }
            map.insert(k, v);
        }
        let get = |key: &str, envvar: &str| map.get(key).cloned().or_else(|| env.var(envvar));

        let host = match get("host", "PGHOST").or_else(|| map.get("hostaddr").cloned()) {
            Some(h) if h.contains(',') => {
                return Err(Error::Config(format!(
                    "multiple hosts ({h}) are not supported; name one"
                )))
            }
            Some(h) if h.starts_with('/') => Host::Unix(PathBuf::from(h)),
            Some(h) if !h.is_empty() => Host::Tcp(h),
            _ => Host::Unix(PathBuf::from("/var/run/postgresql")),
        };
        let port = match get("port", "PGPORT") {
            Some(p) => p
                .parse()
                .map_err(|_| Error::Config(format!("invalid port {p:?}")))?,
            None => 5432,
        };
        let user = get("user", "PGUSER")
            .or_else(|| env.var("USER"))
            .or_else(current_os_user)
            .ok_or_else(|| Error::Config("no user given and the OS user is unknown".into()))?;
        let sslmode = match get("sslmode", "PGSSLMODE") {
            Some(m) => SslMode::parse(&m)?,
            None => SslMode::Prefer,
        };
        let connect_timeout = match get("connect_timeout", "PGCONNECT_TIMEOUT") {
            Some(t) => {
                let secs: u64 = t
                    .parse()
                    .map_err(|_| Error::Config(format!("invalid connect_timeout {t:?}")))?;
                (secs > 0).then(|| Duration::from_secs(secs.max(2)))
            }
            None => None,
        };
        let replication = match map.get("replication").map(String::as_str) {
            None | Some("false" | "off" | "no" | "0") => ReplicationMode::Off,
            Some("true" | "on" | "yes" | "1") => ReplicationMode::Physical,
            Some(other) => {
                return Err(Error::Config(format!(
                "replication={other:?} is not supported; walhoard uses physical replication (true)"
            )))
            }
        };
        let path = |key: &str, envvar: &str| get(key, envvar).map(PathBuf::from);
        Ok(ConnectParams {
            host,
            port,
            password: get("password", "PGPASSWORD"),
            dbname: get("dbname", "PGDATABASE"),
            application_name: get("application_name", "PGAPPNAME")
                .or_else(|| map.get("fallback_application_name").cloned())
                .unwrap_or_else(|| "walhoard".to_string()),
            sslmode,
            sslrootcert: path("sslrootcert", "PGSSLROOTCERT"),
            sslcert: path("sslcert", "PGSSLCERT"),
            sslkey: path("sslkey", "PGSSLKEY"),
            connect_timeout,
            options: get("options", "PGOPTIONS"),
            passfile: path("passfile", "PGPASSFILE")
                .or_else(|| env.var("HOME").map(|h| Path::new(&h).join(".pgpass"))),
            replication,
            user,
        })
    }

    /// Reads a pghoard node object (`{"host": ..., "port": ..., "slot": ...}`) given as
    /// key/value pairs: `slot` names the replication slot, every other key is a connection
    /// parameter. Returns the settings and the slot name.
    pub fn from_node_object(
        pairs: Vec<(String, String)>,
        env: &dyn Env,
    ) -> Result<(Self, Option<String>)> {
        let mut slot = None;
        let mut rest = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            if k == "slot" {
                slot = Some(v);
            } else {
                rest.push((k, v));
            }
        }
        if let Some(s) = &slot {
            validate_slot_name(s)?;
        }
        Ok((Self::from_pairs_with_env(rest, env)?, slot))
    }

    /// The same settings as a physical replication connection.
    pub fn for_replication(&self) -> Self {
        ConnectParams {
            replication: ReplicationMode::Physical,
            ..self.clone()
        }
    }

    /// The same settings as an ordinary SQL connection.
    pub fn for_sql(&self) -> Self {
        ConnectParams {
            replication: ReplicationMode::Off,
            ..self.clone()
        }
    }

    /// The database to connect to: `dbname`, else the user name (libpq's rule).
    pub fn database(&self) -> &str {
        self.dbname.as_deref().unwrap_or(&self.user)
    }

    /// The password to use: the explicit one, else a matching `.pgpass` line.
    pub fn resolve_password(&self) -> Option<String> {
        if let Some(p) = &self.password {
            return Some(p.clone());
        }
        let file = self.passfile.as_ref()?;
        let host = match &self.host {
            Host::Tcp(h) => h.as_str(),
            // libpq matches socket connections against "localhost".
            Host::Unix(_) => "localhost",
        };
        let db = if self.replication == ReplicationMode::Physical {
            "replication"
        } else {
            self.database()
        };
        pgpass_lookup(file, host, self.port, db, &self.user)
    }
}

fn current_os_user() -> Option<String> {
    // SAFETY-free lookup: the effective uid's name from /etc/passwd.
    let uid = std::fs::metadata("/proc/self")
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))?;
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2].parse() == Ok(uid)).then(|| f[0].to_string())
    })
}

/// Looks up a password in a pgpass file, as libpq's `passwordFromFile` does: fields
/// `host:port:db:user:password`, `*` matches anything, `\` escapes `:` and `\`. A file that
/// group or others can read is ignored, as libpq does.
pub fn pgpass_lookup(file: &Path, host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(file).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %file.display(), "password file has group or world access; ignoring it (chmod 0600)");
        return None;
    }
    let content = std::fs::read_to_string(file).ok()?;
    let port = port.to_string();
    for line in content.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass_line(line);
        if fields.len() < 5 {
            continue;
        }
        let ok = |pat: &str, v: &str| pat == "*" || pat == v;
        if ok(&fields[0], host)
            && ok(&fields[1], &port)
            && ok(&fields[2], db)
            && ok(&fields[3], user)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

fn split_pgpass_line(line: &str) -> Vec<String> {
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => field.extend(chars.next()),
            // The password is the rest of the line, colons and all, once four fields are read.
            ':' if fields.len() < 4 => fields.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// Parses `key=value key='quoted \' value'` as libpq's `conninfo_parse`.
pub fn parse_conninfo(s: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(Error::Config(format!(
                "missing \"=\" after {key:?} in connection info string"
            )));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.push(
                        chars
                            .next()
                            .ok_or_else(|| Error::Config("dangling backslash".into()))?,
                    ),
                    '\'' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(Error::Config(format!(
                    "unterminated quoted value for {key:?}"
                )));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.push(
                        chars
                            .next()
                            .ok_or_else(|| Error::Config("dangling backslash".into()))?,
                    );
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .ok_or_else(|| Error::Config(format!("bad percent-encoding in {s:?}")))?;
            out.push(
                u8::from_str_radix(hex, 16)
                    .map_err(|_| Error::Config(format!("bad percent-encoding in {s:?}")))?,
            );
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::Config(format!("percent-decoded {s:?} is not UTF-8")))
}

/// Parses `postgres[ql]://[user[:password]@][host][:port][/dbname][?key=value&...]`.
pub fn parse_uri(s: &str) -> Result<Vec<(String, String)>> {
    let rest = s
        .strip_prefix("postgresql://")
        .or_else(|| s.strip_prefix("postgres://"))
        .ok_or_else(|| Error::Config("URI must start with postgres:// or postgresql://".into()))?;
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = main.split_once('/').unwrap_or((main, ""));
    let mut out = Vec::new();
    let hostport = match authority.rsplit_once('@') {
        Some((userinfo, hp)) => {
            let (user, pw) = userinfo
                .split_once(':')
                .map_or((userinfo, None), |(u, p)| (u, Some(p)));
            if !user.is_empty() {
                out.push(("user".to_string(), percent_decode(user)?));
            }
            if let Some(pw) = pw {
                out.push(("password".to_string(), percent_decode(pw)?));
            }
            hp
        }
        None => authority,
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| Error::Config("unterminated [IPv6] host".into()))?;
        (h.to_string(), after.strip_prefix(':').map(str::to_string))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (percent_decode(h)?, Some(p.to_string())),
            None => (percent_decode(hostport)?, None),
        }
    };
    if !host.is_empty() {
        out.push(("host".to_string(), host));
    }
    if let Some(p) = port.filter(|p| !p.is_empty()) {
        out.push(("port".to_string(), p));
    }
    if !path.is_empty() {
        out.push(("dbname".to_string(), percent_decode(path)?));
    }
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Error::Config(format!("URI parameter {kv:?} lacks '='")))?;
        out.push((percent_decode(k)?, percent_decode(v)?));
    }
    Ok(out)
}

/// Checks a slot name as `ReplicationSlotValidateName` does; names go into commands unquoted.
pub fn validate_slot_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(Error::Config(format!(
            "invalid replication slot name {name:?}: use 1-63 characters of a-z, 0-9 and _"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOENV: [(&str, &str); 1] = [("USER", "osuser")];

    #[test]
    fn slot_names() {
        assert!(validate_slot_name("walhoard_site1").is_ok());
        for bad in ["", "Upper", "a-b", "a b", "x;DROP", &"a".repeat(64)] {
            assert!(validate_slot_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn conninfo_strings() {
        let p = ConnectParams::parse_with_env(
            "host=db.example port=6543 user=rep password='a b\\'c' dbname=x sslmode=verify-full application_name = wh",
            &NOENV,
        )
        .unwrap();
        assert_eq!(p.host, Host::Tcp("db.example".into()));
        assert_eq!(p.port, 6543);
        assert_eq!(p.user, "rep");
        assert_eq!(p.password.as_deref(), Some("a b'c"));
        assert_eq!(p.dbname.as_deref(), Some("x"));
        assert_eq!(p.sslmode, SslMode::VerifyFull);
        assert_eq!(p.application_name, "wh");
        assert!(
            !format!("{p:?}").contains("a b'c"),
            "password in Debug output"
        );
        assert!(
            !p.to_string().contains("a b'c"),
            "password in Display output"
        );
    }

    #[test]
    fn defaults_from_env() {
        let env = [
            ("PGHOST", "/tmp/sock"),
            ("PGPORT", "5499"),
            ("PGUSER", "envuser"),
            ("HOME", "/home/x"),
        ];
        let p = ConnectParams::parse_with_env("", &env).unwrap();
        assert_eq!(p.host, Host::Unix("/tmp/sock".into()));
        assert_eq!(p.port, 5499);
        assert_eq!(p.user, "envuser");
        assert_eq!(p.database(), "envuser");
        assert_eq!(p.sslmode, SslMode::Prefer);
        assert_eq!(p.passfile, Some(PathBuf::from("/home/x/.pgpass")));
        let p = ConnectParams::parse_with_env("", &NOENV).unwrap();
        assert_eq!(p.host, Host::Unix("/var/run/postgresql".into()));
        assert_eq!(p.port, 5432);
        assert_eq!(p.user, "osuser");
    }

    #[test]
    fn uris() {
        let p = ConnectParams::parse_with_env(
            "postgres://u%40x:p%3Aw@[::1]:7000/my%20db?sslmode=require&application_name=a",
            &NOENV,
        )
        .unwrap();
        assert_eq!(p.user, "u@x");
        assert_eq!(p.password.as_deref(), Some("p:w"));
        assert_eq!(p.host, Host::Tcp("::1".into()));
        assert_eq!(p.port, 7000);
        assert_eq!(p.dbname.as_deref(), Some("my db"));
        assert_eq!(p.sslmode, SslMode::Require);
        let p = ConnectParams::parse_with_env("postgresql://h/db?host=%2Ftmp", &NOENV).unwrap();
        assert_eq!(p.host, Host::Unix("/tmp".into()));
    }

    #[test]
    fn bad_settings_name_the_problem() {
        for (s, want) in [
            ("host=x bogus=1", "bogus"),
            ("host", "missing \"=\""),
            ("password='abc", "unterminated"),
            ("port=abc", "invalid port"),
            ("sslmode=sometimes", "sslmode"),
            ("replication=database", "replication"),
            ("postgres://h:1/d?x", "lacks '='"),
            ("host=a,b", "multiple hosts"),
        ] {
            let err = ConnectParams::parse_with_env(s, &NOENV)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{s}: {err}");
        }
    }

    #[test]
    fn node_object_pairs() {
        let p = ConnectParams::from_pairs_with_env(
            vec![
                ("host".into(), "127.0.0.1".into()),
                ("port".into(), "5432".into()),
                ("user".into(), "r".into()),
            ],
            &NOENV,
        )
        .unwrap();
        assert_eq!(p.host, Host::Tcp("127.0.0.1".into()));
        assert_eq!(p.for_replication().replication, ReplicationMode::Physical);
        let node = vec![
            ("host".to_string(), "db1".to_string()),
            ("slot".to_string(), "walhoard_s1".to_string()),
            ("sslmode".to_string(), "require".to_string()),
        ];
        let (p, slot) = ConnectParams::from_node_object(node, &NOENV).unwrap();
        assert_eq!(slot.as_deref(), Some("walhoard_s1"));
        assert_eq!(p.sslmode, SslMode::Require);
        let bad = vec![("slot".to_string(), "Bad-Slot".to_string())];
        let err = ConnectParams::from_node_object(bad, &NOENV).unwrap_err();
        assert!(err.to_string().contains("Bad-Slot"), "{err}");
    }

    #[test]
    fn pgpass_matching_and_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pgpass");
        std::fs::write(
            &f,
            "# comment\nother:*:*:*:nope\nlocalhost:5499:replication:rep:s3cr\\:et:x\n*:*:*:rep:fallback\n",
        )
        .unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            pgpass_lookup(&f, "localhost", 5499, "replication", "rep").as_deref(),
            Some("s3cr:et:x")
        );
        assert_eq!(
            pgpass_lookup(&f, "db", 1, "postgres", "rep").as_deref(),
            Some("fallback")
        );
        assert_eq!(pgpass_lookup(&f, "db", 1, "postgres", "other"), None);
        let mut p =
            ConnectParams::parse_with_env("host=/tmp/s port=5499 user=rep", &NOENV).unwrap();
        p.passfile = Some(f.clone());
        assert_eq!(
            p.for_replication().resolve_password().as_deref(),
            Some("s3cr:et:x")
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            pgpass_lookup(&f, "localhost", 5499, "replication", "rep"),
            None,
            "world-readable file used"
        );
    }
}
