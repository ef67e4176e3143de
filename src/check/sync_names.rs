//! `synchronous_standby_names` as the server reads it (syncrep_scanner.l and syncrep_gram.y in
//! PostgreSQL): `FIRST n (a, b)`, `ANY n (a, b)`, `n (a, b)` (FIRST), a plain list (FIRST 1),
//! `*` for any standby; names are identifiers or double-quoted (`""` for a quote) and match an
//! application_name case-insensitively (SyncRepGetStandbyPriority uses pg_strcasecmp).

/// How the listed standbys are waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `FIRST n`: the first `n` connected standbys of the list, in its order.
    Priority,
    /// `ANY n`: any `n` of the list.
    Quorum,
}

/// A parsed `synchronous_standby_names`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStandbys {
    pub method: Method,
    pub num: u32,
    pub names: Vec<String>,
}

#[derive(Debug, PartialEq)]
enum Token {
    Name(String),
    Num(String),
    Any,
    First,
    Comma,
    Open,
    Close,
}

fn tokens(s: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || !c.is_ascii();
    let ident_cont = |c: char| ident_start(c) || c.is_ascii_digit() || c == '$';
    while let Some(&c) = it.peek() {
        match c {
            c if c.is_whitespace() => {
                it.next();
            }
            '"' => {
                it.next();
                let mut name = String::new();
                loop {
                    match it.next() {
                        Some('"') if it.peek() == Some(&'"') => {
                            it.next();
                            name.push('"');
                        }
                        Some('"') => break,
                        Some(c) => name.push(c),
                        None => return Err("unterminated quoted identifier".into()),
                    }
                }
                out.push(Token::Name(name));
            }
            c if ident_start(c) => {
                let mut word = String::new();
                while let Some(&c) = it.peek().filter(|c| ident_cont(**c)) {
                    word.push(c);
                    it.next();
                }
                out.push(if word.eq_ignore_ascii_case("any") {
                    Token::Any
                } else if word.eq_ignore_ascii_case("first") {
                    Token::First
                } else {
                    Token::Name(word)
                });
            }
            c if c.is_ascii_digit() => {
                let mut num = String::new();
                while let Some(&c) = it.peek().filter(|c| c.is_ascii_digit()) {
                    num.push(c);
                    it.next();
                }
                out.push(Token::Num(num));
            }
            '*' | ',' | '(' | ')' => {
                it.next();
                out.push(match c {
                    '*' => Token::Name("*".into()),
                    ',' => Token::Comma,
                    '(' => Token::Open,
                    _ => Token::Close,
                });
            }
            other => return Err(format!("unexpected {other:?}")),
        }
    }
    Ok(out)
}

/// Parses a non-empty value; `None` for an empty one (no synchronous standby).
pub fn parse(s: &str) -> Result<Option<SyncStandbys>, String> {
    let toks = tokens(s)?;
    if toks.is_empty() {
        return Ok(None);
    }
    let num = |t: &Token| match t {
        Token::Num(n) => n
            .parse::<u32>()
            .map_err(|_| format!("number of standbys {n} is out of range")),
        other => Err(format!("expected a number, found {other:?}")),
    };
    let (method, num, list) = match toks.as_slice() {
        [Token::First, n, Token::Open, list @ .., Token::Close] => {
            (Method::Priority, num(n)?, list)
        }
        [Token::Any, n, Token::Open, list @ .., Token::Close] => (Method::Quorum, num(n)?, list),
        [n @ Token::Num(_), Token::Open, list @ .., Token::Close] => {
            (Method::Priority, num(n)?, list)
        }
        list => (Method::Priority, 1, list),
    };
    let mut names = Vec::new();
    for (i, t) in list.iter().enumerate() {
        match (i % 2, t) {
            (0, Token::Name(n) | Token::Num(n)) => names.push(n.clone()),
            (1, Token::Comma) => {}
            (_, other) => return Err(format!("syntax error at {other:?}")),
        }
    }
    if list.len() % 2 == 0 {
        return Err("a standby name is missing".into());
    }
    Ok(Some(SyncStandbys { method, num, names }))
}

impl SyncStandbys {
    /// Whether a walsender with `application_name` is a candidate.
    pub fn lists(&self, application_name: &str) -> bool {
        self.names
            .iter()
            .any(|n| n == "*" || n.eq_ignore_ascii_case(application_name))
    }
}

/// `name` as it must be written in `synchronous_standby_names`: quoted unless it is a plain
/// identifier that is not a keyword.
pub fn quoted(name: &str) -> String {
    let plain = matches!(tokens(name).as_deref(), Ok([Token::Name(n)]) if n == name && n != "*");
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> SyncStandbys {
        parse(s).unwrap().unwrap()
    }

    #[test]
    fn the_server_s_forms() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("  ").unwrap(), None);
        let s = p("walhoard_main");
        assert_eq!(
            (s.method, s.num, s.names),
            (Method::Priority, 1, names(&["walhoard_main"]))
        );
        let s = p("a, b ,c");
        assert_eq!(
            (s.method, s.num, s.names),
            (Method::Priority, 1, names(&["a", "b", "c"]))
        );
        let s = p("FIRST 2 (a, \"B c\")");
        assert_eq!(
            (s.method, s.num, s.names),
            (Method::Priority, 2, names(&["a", "B c"]))
        );
        let s = p("any 1 (walhoard_main,replica)");
        assert_eq!(
            (s.method, s.num, s.names.clone()),
            (Method::Quorum, 1, names(&["walhoard_main", "replica"]))
        );
        assert!(s.lists("WALHOARD_MAIN") && s.lists("replica") && !s.lists("walhoard"));
        let s = p("2 (x, y, z)");
        assert_eq!((s.method, s.num), (Method::Priority, 2));
        assert!(p("*").lists("anything"));
        assert!(p("first 1 (*)").lists("walhoard_main"));
        // Quotes: a doubled quote is one; quoted keywords are names.
        let s = p(r#""a""b", "first", "walhoard_my-site""#);
        assert_eq!(s.names, names(&["a\"b", "first", "walhoard_my-site"]));
        assert!(s.lists("walhoard_my-site"));
        // Identifiers may hold digits and $ after the first character; a number is a name.
        assert_eq!(p("s$1, 42").names, names(&["s$1", "42"]));
        for bad in [
            "\"open",
            "a,",
            ",a",
            "a b",
            "FIRST (a)",
            "ANY 1 a",
            "a;b",
            "any",
        ] {
            assert!(parse(bad).is_err(), "{bad} parsed: {:?}", parse(bad));
        }
    }

    #[test]
    fn names_are_quoted_when_they_must_be() {
        assert_eq!(quoted("walhoard_main"), "walhoard_main");
        assert_eq!(quoted("walhoard_my-site"), "\"walhoard_my-site\"");
        assert_eq!(quoted("first"), "\"first\"");
        assert_eq!(quoted("1a"), "\"1a\"");
        assert_eq!(quoted("a\"b"), "\"a\"\"b\"");
        assert_eq!(p(&quoted("a\"b")).names, vec!["a\"b".to_string()]);
    }
}
