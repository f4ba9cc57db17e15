//! Query-string and path parameters with our error shape.
//!
//! axum's own extractors answer malformed input with plain-text bodies; the
//! contract wants `{"error": {...}}` everywhere, so parameters are parsed
//! here and every problem becomes an [`ApiError`].

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;

use crate::domain::event::{MAX_KEY_BYTES, valid_ns};
use crate::error::ApiError;

/// Decoded query parameters; names outside the endpoint's list are refused
/// so that a typo (`dleta=5`) is not silently ignored.
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Params, ApiError> {
        let pairs: Vec<(String, String)> =
            url::form_urlencoded::parse(raw.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        for (k, _) in &pairs {
            if !allowed.contains(&k.as_str()) {
                return Err(ApiError::InvalidParam(format!(
                    "unknown query parameter {k:?}; accepted: {}",
                    allowed.join(", ")
                )));
            }
        }
        Ok(Params(pairs))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn i64(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| ApiError::InvalidParam(format!("{name}={v:?} is not an integer")))
            })
            .transpose()
    }

    /// One of `choices`, or `default` when absent.
    pub fn choice<'c>(
        &self,
        name: &str,
        choices: &[&'c str],
        default: &'c str,
    ) -> Result<&'c str, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => choices.iter().find(|c| **c == v).copied().ok_or_else(|| {
                ApiError::InvalidParam(format!("{name}={v:?}; accepted: {}", choices.join(", ")))
            }),
        }
    }
}

/// The OpenAPI description of [`CounterPath`]'s two segments.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // documentation only: the path is parsed by `CounterPath`
pub struct CounterPathDoc {
    /// Namespace.
    #[param(pattern = "^[a-z][a-z0-9_]{0,63}$", example = "views")]
    ns: String,
    /// Counter key, percent-encoded: 1 to 256 bytes of UTF-8, no control
    /// characters.
    #[param(min_length = 1, max_length = 256, example = "BV1x")]
    key: String,
}

/// The OpenAPI description of a `{ns}` path segment.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // documentation only: the handler parses the path
pub struct NsPathDoc {
    /// Namespace.
    #[param(pattern = "^[a-z][a-z0-9_]{0,63}$", example = "views")]
    ns: String,
}

/// axum's `Path` with our error shape. Its own rejection is a plain-text
/// 400 (`/v1/top/%FF` answered `Invalid URL: Invalid UTF-8 in ns`), which
/// breaks the contract that every error is `{"error": {...}}`.
pub struct PathParam<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for PathParam<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| PathParam(v))
            .map_err(|e| ApiError::InvalidParam(format!("bad path: {e}")))
    }
}

/// `{ns}/{key}` from the path, percent-decoded and validated.
pub struct CounterPath {
    pub ns: String,
    pub key: String,
}

impl<S: Send + Sync> FromRequestParts<S> for CounterPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let PathParam((ns, key)) =
            PathParam::<(String, String)>::from_request_parts(parts, state).await?;
        CounterPath::new(ns, key)
    }
}

impl CounterPath {
    /// Validates decoded path segments.
    pub fn new(ns: String, key: String) -> Result<CounterPath, ApiError> {
        if !valid_ns(&ns) {
            return Err(ApiError::InvalidParam(format!(
                "ns {ns:?} must match ^[a-z][a-z0-9_]{{0,63}}$"
            )));
        }
        if key.is_empty() || key.len() > MAX_KEY_BYTES || key.chars().any(char::is_control) {
            return Err(ApiError::InvalidParam(format!(
                "key must be 1 to {MAX_KEY_BYTES} bytes without control characters"
            )));
        }
        Ok(CounterPath { ns, key })
    }
}

/// Parses a JSON request body: malformed JSON is `invalid_json`, a
/// well-formed body of the wrong shape (unknown field, wrong type) is
/// `invalid_param`.
pub fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::InvalidParam(e.to_string()),
        _ => ApiError::InvalidJson(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error's code and message, or a panic naming what was accepted.
    fn refused<T>(r: Result<T, ApiError>) -> (&'static str, String) {
        match r {
            Ok(_) => panic!("accepted"),
            Err(e) => (e.code(), e.to_string()),
        }
    }

    const COUNT: &[&str] = &["from", "to", "consistency"];

    #[test]
    fn no_query_string_and_an_empty_one_parse_to_nothing() {
        for raw in [None, Some("")] {
            let p = Params::parse(raw, COUNT).expect("accepted");
            assert_eq!(p.get("from"), None);
            assert_eq!(p.i64("from").expect("absent is fine"), None);
        }
    }

    #[test]
    fn listed_names_are_accepted_and_percent_decoded() {
        let p = Params::parse(
            Some("from=2024-01-01T00%3A00%3A00Z&to=1704070800&consistency=strong"),
            COUNT,
        )
        .expect("accepted");
        assert_eq!(p.get("from"), Some("2024-01-01T00:00:00Z"));
        assert_eq!(p.get("to"), Some("1704070800"));
        assert_eq!(p.get("consistency"), Some("strong"));
        // Form encoding: `+` is a space.
        let p = Params::parse(Some("from=a+b%2Bc"), COUNT).expect("accepted");
        assert_eq!(p.get("from"), Some("a b+c"));
    }

    #[test]
    fn an_unknown_name_is_refused_and_named_with_the_accepted_ones() {
        // The contract's example: a typo must not be silently ignored.
        let (code, message) = refused(Params::parse(
            Some("delta=2&dleta=5"),
            &["delta", "ts", "ack"],
        ));
        assert_eq!(code, "invalid_param");
        assert!(message.contains("\"dleta\""), "{message}");
        for accepted in ["delta", "ts", "ack"] {
            assert!(message.contains(accepted), "{message}");
        }
        // Names are case-sensitive and a name without a value still counts.
        assert_eq!(
            refused(Params::parse(Some("From=1"), COUNT)).0,
            "invalid_param"
        );
        assert_eq!(
            refused(Params::parse(Some("limit"), COUNT)).0,
            "invalid_param"
        );
        // An endpoint without parameters refuses any.
        assert_eq!(refused(Params::parse(Some("x=1"), &[])).0, "invalid_param");
    }

    #[test]
    fn a_repeated_name_reads_its_last_value() {
        // One value per name: the last one wins, as with most query parsers.
        let p = Params::parse(Some("to=1&to=2&to=3"), COUNT).expect("accepted");
        assert_eq!(p.get("to"), Some("3"));
        assert_eq!(p.i64("to").expect("integer"), Some(3));
    }

    #[test]
    fn integers_accept_the_whole_i64_range_and_nothing_else() {
        let p = |raw: &str| Params::parse(Some(raw), &["delta"]).expect("accepted");
        assert_eq!(p("delta=42").i64("delta").expect("ok"), Some(42));
        assert_eq!(p("delta=-7").i64("delta").expect("ok"), Some(-7));
        assert_eq!(p("delta=%2B5").i64("delta").expect("ok"), Some(5));
        assert_eq!(
            p("delta=9223372036854775807").i64("delta").expect("ok"),
            Some(i64::MAX)
        );
        assert_eq!(
            p("delta=-9223372036854775808").i64("delta").expect("ok"),
            Some(i64::MIN)
        );
        for bad in [
            "delta=",
            "delta=1.5",
            "delta=1e3",
            "delta=abc",
            "delta=%201",
            "delta=0x10",
            "delta=9223372036854775808",
        ] {
            let (code, message) = refused(p(bad).i64("delta"));
            assert_eq!(code, "invalid_param", "{bad}");
            assert!(message.starts_with("delta="), "{bad}: {message}");
            assert!(message.contains("not an integer"), "{bad}: {message}");
        }
    }

    #[test]
    fn choices_default_when_absent_and_refuse_anything_unlisted() {
        let choices = ["eventual", "strong"];
        let absent = Params::parse(None, COUNT).expect("accepted");
        assert_eq!(
            absent
                .choice("consistency", &choices, "eventual")
                .expect("default"),
            "eventual"
        );
        let strong = Params::parse(Some("consistency=strong"), COUNT).expect("accepted");
        assert_eq!(
            strong
                .choice("consistency", &choices, "eventual")
                .expect("listed"),
            "strong"
        );
        for bad in [
            "consistency=Strong",
            "consistency=",
            "consistency=strong%20",
        ] {
            let p = Params::parse(Some(bad), COUNT).expect("accepted");
            let (code, message) = refused(p.choice("consistency", &choices, "eventual"));
            assert_eq!(code, "invalid_param", "{bad}");
            assert!(message.contains("eventual, strong"), "{bad}: {message}");
        }
    }

    #[test]
    fn counter_paths_accept_valid_namespaces_and_keys() {
        let ns64 = format!("a{}", "b_9".repeat(21));
        assert_eq!(ns64.len(), 64);
        let key256 = "k".repeat(256);
        // 128 two-byte characters are 256 bytes.
        let key_multibyte = "é".repeat(128);
        for (ns, key) in [
            ("views", "BV1x"),
            ("a", "k"),
            ("follows_2", "user 42/with spaces"),
            (ns64.as_str(), key256.as_str()),
            ("views", key_multibyte.as_str()),
            // Hostile text is a legal key: values only ever reach SQL bound.
            ("views", "'; DROP TABLE counter_total; --"),
        ] {
            let path = CounterPath::new(ns.into(), key.into())
                .unwrap_or_else(|e| panic!("{ns:?}/{key:?} refused: {e}"));
            assert_eq!((path.ns.as_str(), path.key.as_str()), (ns, key));
        }
    }

    #[test]
    fn counter_paths_refuse_namespaces_outside_the_pattern() {
        let ns65 = "a".repeat(65);
        // ^[a-z][a-z0-9_]{0,63}$
        for ns in [
            "", "Views", "1views", "_views", "vi-ews", "views.x", "vïews", &ns65,
        ] {
            let (code, message) = refused(CounterPath::new(ns.into(), "k".into()));
            assert_eq!(code, "invalid_param", "{ns:?}");
            assert!(message.starts_with("ns "), "{ns:?}: {message}");
        }
    }

    #[test]
    fn counter_paths_refuse_empty_long_or_control_character_keys() {
        let key257 = "k".repeat(257);
        // 129 two-byte characters: 129 characters but 258 bytes.
        let bytes258 = "é".repeat(129);
        for key in [
            "",
            &key257,
            &bytes258,
            "a\nb",
            "tab\t",
            "nul\0",
            "del\u{7f}",
            "c1\u{85}",
        ] {
            let (code, message) = refused(CounterPath::new("views".into(), key.into()));
            assert_eq!(code, "invalid_param", "{key:?}");
            assert!(
                message.starts_with("key must be 1 to 256 bytes"),
                "{key:?}: {message}"
            );
        }
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // the fields are read through Debug only
    struct Query {
        ns: String,
        keys: Vec<String>,
    }

    #[test]
    fn json_bodies_split_malformed_json_from_a_wrong_shape() {
        let q: Query = json_body(br#"{"ns":"views","keys":["a","b"]}"#).expect("valid");
        assert_eq!((q.ns.as_str(), q.keys.len()), ("views", 2));
        // Not JSON at all, or cut short: the body cannot be read.
        for malformed in [
            &b"{"[..],
            b"",
            b"{ns: 1}",
            b"\xff\xfe",
            br#"{"ns":"views",}"#,
        ] {
            let (code, _) = refused(json_body::<Query>(malformed));
            assert_eq!(
                code,
                "invalid_json",
                "{:?}",
                String::from_utf8_lossy(malformed)
            );
        }
        // Well-formed JSON that is not this request.
        for wrong in [
            &br#"{"ns":"views","keys":["a"],"from":1,"kyes":[]}"#[..],
            br#"{"ns":"views","keys":"a"}"#,
            br#"{"ns":"views"}"#,
            br#"[]"#,
        ] {
            let (code, _) = refused(json_body::<Query>(wrong));
            assert_eq!(code, "invalid_param", "{}", String::from_utf8_lossy(wrong));
        }
    }
}
