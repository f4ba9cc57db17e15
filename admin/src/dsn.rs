//! MySQL DSNs as they appear in the topology: `mysql://user[:pass]@host[:port]/db`,
//! or, with the password kept out of the document,
//! `mysql://user@host[:port]/db?password_file=/abs/path` or
//! `mysql://user@host[:port]/db?password_env=NAME` (see [`Secret`]).
//! TLS to the server is chosen per DSN in the style of MySQL's `ssl-mode`:
//! `?ssl_mode=disabled|required|verify_ca|verify_identity` and
//! `ssl_ca=/abs/path` (see [`Tls`]), e.g.
//! `mysql://tally@db1:3306/tally?ssl_mode=verify_identity&ssl_ca=/etc/tally/ca.pem`;
//! they combine with `password_file` / `password_env`.
//!
//! The parsed form keeps the password out of `Display` and `Debug`, so a DSN
//! can be logged or returned by the admin API without leaking it.

use std::fmt;

/// The placeholder shown instead of a password.
pub const REDACTED: &str = "***";

/// The largest password file read (a secret is a line, not a document).
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// A parsed MySQL DSN. Equality compares every field, password included.
///
/// With a [`Secret`] reference, `password` is `None` as parsed and holds
/// the secret once [`Dsn::resolve`] read it; the reference, never the
/// secret, is what [`Dsn::expose`] and [`Dsn::redacted`] render.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Dsn {
    pub user: String,
    pub password: Option<String>,
    pub host: String,
    pub port: u16,
    pub database: String,
    /// Where the password comes from when it is not written inline.
    pub secret: Option<Secret>,
    /// TLS to the server (`ssl_mode`, `ssl_ca`); disabled by default.
    pub tls: Tls,
}

/// How a connection to the server is secured, MySQL's `--ssl-mode`:
/// nothing, encryption without checking the server's certificate, or
/// encryption with the certificate checked against a CA (`verify_ca`) and
/// also against the DSN's host (`verify_identity`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SslMode {
    #[default]
    Disabled,
    Required,
    VerifyCa,
    VerifyIdentity,
}

impl SslMode {
    pub const ALL: [SslMode; 4] = [
        SslMode::Disabled,
        SslMode::Required,
        SslMode::VerifyCa,
        SslMode::VerifyIdentity,
    ];

    /// The parameter value: `disabled`, `required`, `verify_ca`,
    /// `verify_identity`.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disabled => "disabled",
            SslMode::Required => "required",
            SslMode::VerifyCa => "verify_ca",
            SslMode::VerifyIdentity => "verify_identity",
        }
    }

    /// Whether the server's certificate is checked against `ssl_ca`.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyIdentity)
    }

    fn parse(text: &str) -> Result<SslMode, String> {
        SslMode::ALL
            .into_iter()
            .find(|m| m.as_str() == text)
            .ok_or_else(|| {
                format!(
                    "ssl_mode must be one of disabled, required, verify_ca, verify_identity, not {text:?}"
                )
            })
    }
}

/// A DSN's TLS settings: the mode and, for the verifying modes, the CA
/// certificates (PEM, an absolute path on the proxy's host, read at each
/// new connection, so a replaced file applies to new connections).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Tls {
    pub mode: SslMode,
    pub ca: Option<String>,
}

impl Tls {
    /// Checks the combination: `ssl_ca` is required by, and only taken
    /// with, `verify_ca` and `verify_identity`.
    pub fn check(&self) -> Result<(), String> {
        match (&self.ca, self.mode.verifies()) {
            (None, true) => Err(format!(
                "ssl_mode={} needs ssl_ca=/path/to/ca.pem (the CA that signed the server's certificate)",
                self.mode.as_str()
            )),
            (Some(_), false) => Err(format!(
                "ssl_ca is only used with ssl_mode=verify_ca or verify_identity, not ssl_mode={}",
                self.mode.as_str()
            )),
            (Some(path), true) if !path.starts_with('/') => {
                Err(format!("ssl_ca must be an absolute path, not {path:?}"))
            }
            (Some(path), true) if path.chars().any(char::is_control) => {
                Err("ssl_ca must not contain control characters".into())
            }
            _ => Ok(()),
        }
    }

    /// The query parameters, in a fixed order (none when disabled).
    fn params(&self) -> Vec<(&'static str, &str)> {
        let mut out = Vec::new();
        if self.mode != SslMode::Disabled {
            out.push(("ssl_mode", self.mode.as_str()));
        }
        if let Some(ca) = &self.ca {
            out.push(("ssl_ca", ca.as_str()));
        }
        out
    }
}

/// A reference to a password kept outside the topology document: a file
/// on the proxy's host (`password_file`, an absolute path; the content
/// without one trailing newline) or an environment variable of the proxy
/// (`password_env`). The reference is not a secret: it is persisted and
/// shown as written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Secret {
    File(String),
    Env(String),
}

impl Secret {
    /// From the two optional fields of a document (`password_file`,
    /// `password_env`); both set is refused by [`Secret::check_exclusive`].
    pub fn from_fields(file: Option<&str>, env: Option<&str>) -> Option<Secret> {
        match (file, env) {
            (Some(f), _) => Some(Secret::File(f.to_owned())),
            (None, Some(e)) => Some(Secret::Env(e.to_owned())),
            (None, None) => None,
        }
    }

    /// The parameter name: `password_file` or `password_env`.
    pub fn key(&self) -> &'static str {
        match self {
            Secret::File(_) => "password_file",
            Secret::Env(_) => "password_env",
        }
    }

    /// The path or the variable name.
    pub fn value(&self) -> &str {
        match self {
            Secret::File(v) | Secret::Env(v) => v,
        }
    }

    /// Checks the reference's form (not whether it can be read: a topology
    /// is also validated by `tallyctl`, away from the proxy's host).
    pub fn check(&self) -> Result<(), String> {
        match self {
            Secret::File(path) => {
                if !path.starts_with('/') {
                    return Err(format!(
                        "password_file must be an absolute path, not {path:?}"
                    ));
                }
                if path.chars().any(char::is_control) {
                    return Err("password_file must not contain control characters".into());
                }
            }
            Secret::Env(name) => {
                let mut chars = name.chars();
                let ok = chars
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !ok || name.len() > 255 {
                    return Err(format!(
                        "password_env must be a variable name ([A-Za-z_][A-Za-z0-9_]*), not {name:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reads the secret: the file's content without one trailing newline
    /// (`\n` or `\r\n`), or the variable's value. An unreadable, empty or
    /// non-UTF-8 secret is an error naming the path or variable, never
    /// quoting the content.
    pub fn read(&self) -> Result<String, String> {
        match self {
            Secret::File(path) => {
                use std::io::Read;
                let mut bytes = Vec::new();
                std::fs::File::open(path)
                    .and_then(|f| f.take(MAX_SECRET_FILE + 1).read_to_end(&mut bytes))
                    .map_err(|e| format!("cannot read password_file {path}: {e}"))?;
                if bytes.len() as u64 > MAX_SECRET_FILE {
                    return Err(format!(
                        "password_file {path} is larger than {MAX_SECRET_FILE} bytes"
                    ));
                }
                let mut text = String::from_utf8(bytes)
                    .map_err(|_| format!("password_file {path} is not UTF-8 text"))?;
                if text.ends_with('\n') {
                    text.pop();
                    if text.ends_with('\r') {
                        text.pop();
                    }
                }
                if text.is_empty() {
                    return Err(format!("password_file {path} is empty"));
                }
                Ok(text)
            }
            Secret::Env(name) => match std::env::var(name) {
                Ok(v) if v.is_empty() => Err(format!("environment variable {name} is empty")),
                Ok(v) => Ok(v),
                Err(std::env::VarError::NotPresent) => {
                    Err(format!("environment variable {name} is not set"))
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    Err(format!("environment variable {name} is not valid UTF-8"))
                }
            },
        }
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.key(), self.value())
    }
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
        if url.fragment().is_some() {
            return Err("a fragment (#...) is not supported in DSNs".into());
        }
        let (secret, tls) = parse_query(&url)?;
        if secret.is_some() && password.is_some() {
            return Err(
                "a password in the DSN and password_file or password_env are exclusive".into(),
            );
        }
        Ok(Dsn {
            user,
            password,
            host,
            port: url.port().unwrap_or(3306),
            database,
            secret,
            tls,
        })
    }

    /// Reads the password of a DSN with a [`Secret`] reference into
    /// `password` (no-op without one).
    pub fn resolve(&mut self) -> Result<(), String> {
        if let Some(secret) = &self.secret {
            self.password = Some(secret.read()?);
        }
        Ok(())
    }

    /// `host:port`, the identity of a server across groups.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The DSN with an inline password (if any) replaced by `***`; a
    /// [`Secret`] reference is shown as is.
    pub fn redacted(&self) -> String {
        self.render(self.inline_password().map(|_| REDACTED))
    }

    /// The DSN as written in a document: an inline password in clear (the
    /// persisted form), a [`Secret`] reference as the reference, never its
    /// secret.
    pub fn expose(&self) -> String {
        self.render(self.inline_password())
    }

    /// Whether the password is the redaction placeholder, which the admin API
    /// reads as "keep the current password".
    pub fn password_is_redacted(&self) -> bool {
        self.inline_password() == Some(REDACTED)
    }

    /// The password written in the DSN itself (not one read from a
    /// [`Secret`]).
    pub fn inline_password(&self) -> Option<&str> {
        match self.secret {
            Some(_) => None,
            None => self.password.as_deref(),
        }
    }

    fn render(&self, password: Option<&str>) -> String {
        let user = encode(&self.user);
        let auth = match password {
            Some(REDACTED) => format!("{user}:{REDACTED}"),
            Some(p) => format!("{user}:{}", encode(p)),
            None => user,
        };
        let params: Vec<String> = self
            .secret
            .iter()
            .map(|s| (s.key(), s.value()))
            .chain(self.tls.params())
            .map(|(k, v)| format!("{k}={}", encode_query(v)))
            .collect();
        let query = if params.is_empty() {
            String::new()
        } else {
            format!("?{}", params.join("&"))
        };
        format!("mysql://{auth}@{}/{}{query}", self.addr(), self.database)
    }
}

/// The parameters a DSN's query may hold.
const PARAMS: &str = "password_file, password_env, ssl_mode, ssl_ca";

/// The DSN's query: nothing, or parameters (form-decoded, as query strings
/// are), each at most once: at most one of `password_file=` and
/// `password_env=`, and `ssl_mode=` / `ssl_ca=` (see [`Tls::check`]).
/// Errors quote parameter names, never values (but an `ssl_mode` value).
fn parse_query(url: &url::Url) -> Result<(Option<Secret>, Tls), String> {
    let Some(query) = url.query() else {
        return Ok((None, Tls::default()));
    };
    let mut secret: Option<Secret> = None;
    let mut mode: Option<SslMode> = None;
    let mut ca: Option<String> = None;
    let mut any = false;
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        any = true;
        let twice = || format!("query parameter {key} is given twice");
        match key.as_ref() {
            "ssl_mode" => {
                if mode.is_some() {
                    return Err(twice());
                }
                mode = Some(SslMode::parse(&value)?);
                continue;
            }
            "ssl_ca" => {
                if ca.is_some() {
                    return Err(twice());
                }
                ca = Some(value.into_owned());
                continue;
            }
            _ => {}
        }
        let found = match key.as_ref() {
            "password_file" => Secret::File(value.into_owned()),
            "password_env" => Secret::Env(value.into_owned()),
            other => {
                return Err(format!(
                    "unknown query parameter {other:?}: a DSN takes only {PARAMS}"
                ));
            }
        };
        if let Some(first) = &secret {
            return Err(if first.key() == found.key() {
                twice()
            } else {
                "password_file and password_env are exclusive".into()
            });
        }
        found.check()?;
        secret = Some(found);
    }
    if !any {
        return Err(format!("an empty query: a DSN takes only {PARAMS}"));
    }
    let tls = Tls {
        mode: mode.unwrap_or_default(),
        ca,
    };
    tls.check()?;
    Ok((secret, tls))
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

/// A query value: like [`encode`], but `/` stays as is (paths read as
/// written).
fn encode_query(s: &str) -> String {
    encode(s).replace("%2F", "/")
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

    /// Issue #23 item 2: a password from a file or an environment
    /// variable. The reference is what renders, redacted or not, and it
    /// parses back to the same DSN.
    #[test]
    fn secret_references_parse_render_and_round_trip() {
        let d =
            Dsn::parse("mysql://tally@10.0.0.1:3306/tally?password_file=/etc/tally/db%20pw+x.pw")
                .expect("valid");
        assert_eq!(d.secret, Some(Secret::File("/etc/tally/db pw x.pw".into())));
        assert_eq!(d.password, None);
        assert_eq!(
            d.expose(),
            "mysql://tally@10.0.0.1:3306/tally?password_file=/etc/tally/db%20pw%20x.pw"
        );
        assert_eq!(d.redacted(), d.expose(), "a reference is not a secret");
        assert_eq!(Dsn::parse(&d.expose()).expect("round trip"), d);

        let mut d = Dsn::parse("mysql://tally@h/tally?password_env=TALLY_DB_PW").expect("valid");
        assert_eq!(d.secret, Some(Secret::Env("TALLY_DB_PW".into())));
        assert_eq!(
            d.expose(),
            "mysql://tally@h:3306/tally?password_env=TALLY_DB_PW"
        );
        assert_eq!(Dsn::parse(&d.expose()).expect("round trip"), d);
        // Once read, the secret is used for connections, never rendered.
        d.password = Some("s3cret".into());
        assert_eq!(d.inline_password(), None);
        assert!(!d.password_is_redacted());
        for shown in [d.expose(), d.redacted(), format!("{d} {d:?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("password_env=TALLY_DB_PW"), "{shown}");
        }
    }

    #[test]
    fn secret_references_are_refused_with_reasons_never_quoting_a_password() {
        for (bad, why) in [
            ("mysql://u:s3cret@h/db?password_file=/p", "exclusive"),
            (
                "mysql://u@h/db?password_file=/p&password_env=X",
                "exclusive",
            ),
            ("mysql://u@h/db?password_env=X&password_env=Y", "twice"),
            (
                "mysql://u@h/db?password=s3cret",
                "unknown query parameter \"password\"",
            ),
            ("mysql://u@h/db?", "empty query"),
            ("mysql://u@h/db?password_file=", "absolute path"),
            ("mysql://u@h/db?password_file=etc/db.pw", "absolute path"),
            ("mysql://u@h/db?password_env=", "variable name"),
            ("mysql://u@h/db?password_env=1X", "variable name"),
            ("mysql://u@h/db?password_env=A%3DB", "variable name"),
            ("mysql://u@h/db#frag", "fragment"),
        ] {
            let err = Dsn::parse(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
            assert!(!err.contains("s3cret"), "{bad}: {err}");
        }
    }

    /// Issue #23 item 1: TLS per server, MySQL's `ssl-mode` style, with
    /// or without a password reference; rendered back unchanged.
    #[test]
    fn tls_parameters_parse_render_and_round_trip() {
        let d = Dsn::parse("mysql://tally@db1:3306/tally").expect("valid");
        assert_eq!(d.tls, Tls::default());
        assert_eq!(d.tls.mode, SslMode::Disabled);

        for (text, mode, ca) in [
            (
                "mysql://tally@db1:3306/tally?ssl_mode=verify_identity&ssl_ca=/etc/tally/ca.pem",
                SslMode::VerifyIdentity,
                Some("/etc/tally/ca.pem"),
            ),
            (
                "mysql://tally@db1:3306/tally?ssl_mode=verify_ca&ssl_ca=/etc/tally/ca%20x.pem",
                SslMode::VerifyCa,
                Some("/etc/tally/ca x.pem"),
            ),
            (
                "mysql://tally@db1:3306/tally?ssl_mode=required",
                SslMode::Required,
                None,
            ),
            (
                "mysql://tally@db1:3306/tally?ssl_mode=disabled",
                SslMode::Disabled,
                None,
            ),
        ] {
            let d = Dsn::parse(text).expect(text);
            assert_eq!(d.tls.mode, mode, "{text}");
            assert_eq!(d.tls.ca.as_deref(), ca, "{text}");
            assert_eq!(Dsn::parse(&d.expose()).expect("round trip"), d, "{text}");
        }
        // The default renders as no parameter at all.
        let d = Dsn::parse("mysql://tally@db1/tally?ssl_mode=disabled").expect("valid");
        assert_eq!(d.expose(), "mysql://tally@db1:3306/tally");

        // With a password reference, in any order; rendered in a fixed one.
        let d = Dsn::parse(
            "mysql://tally@db1/tally?ssl_ca=/etc/tally/ca.pem&password_file=/etc/tally/db.pw&ssl_mode=verify_identity",
        )
        .expect("valid");
        assert_eq!(d.secret, Some(Secret::File("/etc/tally/db.pw".into())));
        let want = "mysql://tally@db1:3306/tally?password_file=/etc/tally/db.pw&ssl_mode=verify_identity&ssl_ca=/etc/tally/ca.pem";
        assert_eq!(d.expose(), want);
        assert_eq!(d.redacted(), want);
        assert_eq!(Dsn::parse(want).expect("round trip"), d);

        // With an inline password: redacted, the TLS settings shown.
        let d = Dsn::parse("mysql://tally:s3cret@db1/tally?ssl_mode=required").expect("valid");
        assert_eq!(
            d.redacted(),
            "mysql://tally:***@db1:3306/tally?ssl_mode=required"
        );
        assert_eq!(Dsn::parse(&d.expose()).expect("round trip"), d);
    }

    #[test]
    fn tls_parameters_are_refused_with_reasons() {
        for (bad, why) in [
            (
                "mysql://u@h/db?ssl_mode=preferred",
                "ssl_mode must be one of",
            ),
            (
                "mysql://u@h/db?ssl_mode=VERIFY_CA&ssl_ca=/ca",
                "ssl_mode must be one of",
            ),
            ("mysql://u@h/db?ssl_mode=verify_ca", "needs ssl_ca"),
            ("mysql://u@h/db?ssl_mode=verify_identity", "needs ssl_ca"),
            (
                "mysql://u@h/db?ssl_ca=/ca.pem",
                "only used with ssl_mode=verify_ca",
            ),
            (
                "mysql://u@h/db?ssl_mode=required&ssl_ca=/ca.pem",
                "not ssl_mode=required",
            ),
            (
                "mysql://u@h/db?ssl_mode=verify_ca&ssl_ca=ca.pem",
                "ssl_ca must be an absolute path",
            ),
            (
                "mysql://u@h/db?ssl_mode=required&ssl_mode=required",
                "ssl_mode is given twice",
            ),
            (
                "mysql://u@h/db?ssl_mode=verify_ca&ssl_ca=/a&ssl_ca=/b",
                "ssl_ca is given twice",
            ),
            (
                "mysql://u@h/db?sslmode=require",
                "unknown query parameter \"sslmode\": a DSN takes only password_file, password_env, ssl_mode, ssl_ca",
            ),
            (
                "mysql://u:s3cret@h/db?ssl_mode=required&password_env=X",
                "exclusive",
            ),
        ] {
            let err = Dsn::parse(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
            assert!(!err.contains("s3cret"), "{bad}: {err}");
        }
    }

    #[test]
    fn secrets_are_read_from_a_file_or_the_environment() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = |name: &str| dir.path().join(name).display().to_string();
        for (name, content, want) in [
            ("plain", "s3cret", "s3cret"),
            ("newline", "s3cret\n", "s3cret"),
            ("crlf", "s3cret\r\n", "s3cret"),
            ("two", "s3cret\n\n", "s3cret\n"),
            ("spaces", " s3 cret ", " s3 cret "),
        ] {
            std::fs::write(path(name), content).expect("write");
            let mut d =
                Dsn::parse(&format!("mysql://u@h/db?password_file={}", path(name))).expect("valid");
            d.resolve().expect(name);
            assert_eq!(d.password.as_deref(), Some(want), "{name}");
        }
        std::fs::write(path("empty"), "\n").expect("write");
        std::fs::write(path("binary"), b"s3cret\xff").expect("write");
        for (name, why) in [
            ("missing", "cannot read password_file"),
            ("empty", "is empty"),
            ("binary", "not UTF-8"),
        ] {
            let err = Secret::File(path(name)).read().expect_err(name);
            assert!(err.contains(why) && err.contains(&path(name)), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
        // No `unsafe` here (`set_var`): a variable every test run has, and
        // one it has not.
        let var = "TALLY_DSN_TEST_UNSET_2f9c";
        let err = Secret::Env(var.into()).read().expect_err("unset");
        assert_eq!(err, format!("environment variable {var} is not set"));
        let mut d = Dsn::parse("mysql://u@h/db?password_env=PATH").expect("valid");
        d.resolve().expect("set");
        assert_eq!(d.password, std::env::var("PATH").ok());
    }
}
