//! MySQL DSNs as they appear in the topology: `mysql://user[:pass]@host[:port]/db`.
//!
//! The parsed form keeps the password out of `Display` and `Debug`, so a DSN
//! can be logged or returned by the admin API without leaking it.

use std::fmt;

/// The placeholder shown instead of a password.
pub const REDACTED: &str = "***";

/// A parsed MySQL DSN. Equality compares every field, password included.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Dsn {
    pub user: String,
    pub password: Option<String>,
    pub host: String,
    pub port: u16,
    pub database: String,
}

impl Dsn {
    /// Parses a DSN, explaining what is wrong when it does not parse.
    pub fn parse(text: &str) -> Result<Dsn, String> {
        let url = url::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
        if url.scheme() != "mysql" {
            return Err(format!("scheme must be mysql://, not {}://", url.scheme()));
        }
        let host = match url.host_str() {
            Some(h) if !h.is_empty() => h.trim_matches(['[', ']']).to_owned(),
            _ => return Err("missing host".into()),
        };
        let user = decode(url.username(), "user")?;
        if user.is_empty() {
            return Err("missing user (mysql://USER@host/db)".into());
        }
        let password = url.password().map(|p| decode(p, "password")).transpose()?;
        let database = decode(url.path().trim_start_matches('/'), "database name")?;
        if database.is_empty() {
            return Err("missing database name (mysql://user@host/DB)".into());
        }
        if !database
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || database.len() > 64
        {
            return Err(format!(
                "database name {database:?} must match [A-Za-z0-9_]{{1,64}}"
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err("query parameters are not supported in DSNs".into());
        }
        Ok(Dsn {
            user,
            password,
            host,
            port: url.port().unwrap_or(3306),
            database,
        })
    }

    /// `host:port`, the identity of a server across groups.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The DSN with its password (if any) replaced by `***`.
    pub fn redacted(&self) -> String {
        self.render(self.password.as_ref().map(|_| REDACTED))
    }

    /// The DSN with its real password, for building connections.
    pub fn expose(&self) -> String {
        self.render(self.password.as_deref())
    }

    /// Whether the password is the redaction placeholder, which the admin API
    /// reads as "keep the current password".
    pub fn password_is_redacted(&self) -> bool {
        self.password.as_deref() == Some(REDACTED)
    }

    fn render(&self, password: Option<&str>) -> String {
        let user = encode(&self.user);
        let auth = match password {
            Some(REDACTED) => format!("{user}:{REDACTED}"),
            Some(p) => format!("{user}:{}", encode(p)),
            None => user,
        };
        format!("mysql://{auth}@{}/{}", self.addr(), self.database)
    }
}

impl fmt::Display for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dsn({})", self.redacted())
    }
}

/// `text` with the password of every `scheme://user:password@...` in it
/// replaced by `***`, for messages that quote a document's text (a YAML
/// type error quotes the value it did not expect), which may hold a DSN
/// that never parsed. A quoted DSN runs to its closing quote (so a password
/// with unencoded spaces is covered too), any other to the next space; its
/// userinfo runs to the last `@` in it. Where the scan cannot tell a
/// password from what follows it, it redacts rather than shows.
pub fn redact_passwords(text: &str) -> String {
    const QUOTES: [char; 3] = ['"', '\'', '`'];
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let scheme =
            head[..i].trim_end_matches(|c: char| c.is_ascii_alphanumeric() || "+-.".contains(c));
        let quote = scheme.chars().next_back().filter(|c| QUOTES.contains(c));
        let end = match quote {
            // Debug-escaped quotes end with a backslash first.
            Some(q) => tail.find([q, '\\', '\n', '\r']),
            None => tail.find(|c: char| c.is_whitespace() || QUOTES.contains(&c) || c == '\\'),
        }
        .unwrap_or(tail.len());
        let (dsn, after) = tail.split_at(end);
        match dsn
            .rfind('@')
            .and_then(|at| Some((at, dsn[..at].find(':')?)))
        {
            Some((at, colon)) => {
                out.push_str(&dsn[..=colon]);
                out.push_str(REDACTED);
                out.push_str(&dsn[at..]);
            }
            None => out.push_str(dsn),
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Percent-decodes a URL component (RFC 3986: `+` is a plus, `&` and `=`
/// are ordinary characters; not the form encoding of query strings). The
/// error names the `part` but never quotes it: problems are answered in
/// 422 bodies and logged, and the part may be a password.
fn decode(s: &str, part: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|d| d.into_owned())
        .map_err(|_| format!("the {part} does not percent-decode to UTF-8"))
}

fn encode(s: &str) -> String {
    const SAFE: fn(u8) -> bool = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
    s.bytes()
        .map(|b| {
            if SAFE(b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_dsn_and_redacts_password() {
        let d = Dsn::parse("mysql://app:s%40cret@db1.internal:3307/tally").expect("valid");
        assert_eq!(d.user, "app");
        assert_eq!(d.password.as_deref(), Some("s@cret"));
        assert_eq!(d.addr(), "db1.internal:3307");
        assert_eq!(d.redacted(), "mysql://app:***@db1.internal:3307/tally");
        assert_eq!(d.expose(), "mysql://app:s%40cret@db1.internal:3307/tally");
        assert!(!format!("{d:?}{d}").contains("cret"));
        assert_eq!(Dsn::parse(&d.expose()).expect("round trip"), d);
    }

    #[test]
    fn default_port_and_no_password() {
        let d = Dsn::parse("mysql://root@127.0.0.1/tally").expect("valid");
        assert_eq!(d.port, 3306);
        assert_eq!(d.password, None);
        assert_eq!(d.redacted(), "mysql://root@127.0.0.1:3306/tally");
    }

    #[test]
    fn rejects_bad_dsns_with_reasons() {
        for (bad, why) in [
            ("postgres://u@h/db", "scheme"),
            ("mysql://h:3306/db", "user"),
            ("mysql://u@h:3306/", "database"),
            ("mysql://u@h/db?x=1", "query"),
            ("mysql://u@h/d-b", "database name"),
            ("not a url", "URL"),
        ] {
            let err = Dsn::parse(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    /// Found by `cargo fuzz run topology` (an accepted topology did not
    /// parse back equal from the file the proxy writes): user and password
    /// were decoded as a form body, so `&` cut them short and `+` became a
    /// space. A password `p&ss+w=rd` reached MariaDB as `p`.
    #[test]
    fn userinfo_is_percent_decoded_not_form_decoded() {
        for text in [
            "mysql://app:p&ss+w=rd@h/db",
            "mysql://app:p%26ss%2Bw%3Drd@h/db",
        ] {
            let d = Dsn::parse(text).expect("valid");
            assert_eq!(d.password.as_deref(), Some("p&ss+w=rd"), "{text}");
            assert_eq!(Dsn::parse(&d.expose()).expect("round trip"), d);
        }
        let d = Dsn::parse("mysql://a+b%20c@h/db").expect("valid");
        assert_eq!(d.user, "a+b c");
        // The fuzzer's input: an `@` and `&`s in the userinfo.
        let fuzzed =
            "mysql://root@12bb{\"lroc\":&g-r0::&g-:&g-r0bb7.0.0.1:33cre^t@[::1]:3309/tally";
        let d = Dsn::parse(fuzzed).expect("valid");
        assert_eq!(d.user, "root@12bb{\"lroc\"");
        assert_eq!(
            d.password.as_deref(),
            Some("&g-r0::&g-:&g-r0bb7.0.0.1:33cre^t")
        );
        assert_eq!(Dsn::parse(&d.expose()).expect("round trip"), d);
        assert!(Dsn::parse("mysql://u:%FF@h/db").is_err(), "not UTF-8");
    }

    /// Issue #20 item 6: a DSN whose userinfo does not percent-decode to
    /// UTF-8 was echoed in the problem (422 bodies, logs) with the
    /// password. The problem names the part, never its text.
    #[test]
    fn a_password_that_does_not_decode_is_not_echoed() {
        for (text, part) in [
            ("mysql://app:s3cret%FF@db1:3306/tally", "password"),
            ("mysql://app:%C3s3cret@db1/tally", "password"),
            ("mysql://s3cret%FF:pw@db1/tally", "user"),
            ("mysql://app:pw@db1/s3cret%FF", "database"),
        ] {
            let err = Dsn::parse(text).expect_err(text);
            assert!(!err.contains("s3cret"), "{text}: {err}");
            assert!(err.contains(part), "{text}: {err}");
            assert!(err.contains("UTF-8"), "{text}: {err}");
        }
    }

    #[test]
    fn passwords_in_free_text_are_redacted() {
        for (text, want) in [
            (
                r#"invalid type: string "mysql://app:s3cret@h:3308/tally", expected a sequence"#,
                r#"invalid type: string "mysql://app:***@h:3308/tally", expected a sequence"#,
            ),
            // Debug-quoted, twice over.
            (
                r#"message: "string \"mysql://a:s3cret@h/db\"""#,
                r#"message: "string \"mysql://a:***@h/db\"""#,
            ),
            // Unencoded `/`, `@` and spaces in the password.
            (
                "'mysql://a:s3/c r@et@h/db' and mysql://b:s3cret@h2/db",
                "'mysql://a:***@h/db' and mysql://b:***@h2/db",
            ),
            // No password, no userinfo, no DSN: unchanged.
            (
                "mysql://root@h/db, http://x/y, a:b@c",
                "mysql://root@h/db, http://x/y, a:b@c",
            ),
        ] {
            assert_eq!(redact_passwords(text), want, "{text}");
        }
    }

    #[test]
    fn redacted_placeholder_is_recognised() {
        let d = Dsn::parse("mysql://u:***@h/db").expect("valid");
        assert!(d.password_is_redacted());
    }
}
