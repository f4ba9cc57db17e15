//! Events: parsing request bodies and validating every field.
//!
//! A body is one JSON object, a JSON array of objects, or NDJSON. Parsing is
//! all or nothing: the first bad event fails the request with its index.
//! Strings borrow from the body where they contain no escapes, so a large
//! batch is parsed without an allocation per event.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};

use crate::error::ApiError;

pub const MIN_DELTA: i64 = -1_000_000_000;
pub const MAX_DELTA: i64 = 1_000_000_000;
pub const MAX_KEY_BYTES: usize = 256;
/// The longest event `id` and `Idempotency-Key`.
pub const MAX_ID_BYTES: usize = 128;

/// A validated event. `ts` is unix seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    pub ns: Cow<'a, str>,
    pub key: Cow<'a, str>,
    pub delta: i64,
    pub ts: i64,
    /// The client's idempotency id: counted at most once per `(ns, key,
    /// id)` within `idempotency.window`. `None`: counted every time.
    pub id: Option<Cow<'a, str>>,
}

/// The accepted time window, fixed per request.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub now: i64,
    pub max_age: Duration,
    pub max_future: Duration,
}

impl Window {
    fn check(&self, ts: i64, index: Option<usize>) -> Result<i64, ApiError> {
        let oldest = self.now.saturating_sub(self.max_age.as_secs() as i64);
        let newest = self.now.saturating_add(self.max_future.as_secs() as i64);
        if (oldest..=newest).contains(&ts) {
            Ok(ts)
        } else {
            Err(ApiError::TsOutOfRange {
                index,
                message: format!(
                    "ts {ts} is outside the accepted window [{oldest}, {newest}] (now {})",
                    self.now
                ),
            })
        }
    }
}

// An event as written by the client, before validation. Its OpenAPI
// schema (`Event`) is derived from this type, so the documented fields are
// the parsed ones; the limits are the ones `validate` enforces. (`///`
// text is the schema's description in the OpenAPI document.)
/// A counter increment. Unknown fields are rejected.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Event)]
pub(crate) struct RawEvent<'a> {
    /// Namespace.
    #[serde(borrow)]
    #[schema(value_type = String, pattern = "^[a-z][a-z0-9_]{0,63}$", example = "views")]
    ns: Cow<'a, str>,
    /// Counter key: 1 to 256 bytes of UTF-8, no control characters.
    #[serde(borrow)]
    #[schema(value_type = String, min_length = 1, max_length = 256, example = "BV1x")]
    key: Cow<'a, str>,
    /// Default 1; negative deltas are allowed.
    #[serde(default)]
    #[schema(minimum = -1_000_000_000, maximum = 1_000_000_000)]
    delta: Option<i64>,
    /// Default: when the proxy received it. Accepted from
    /// `now - events.max_age` (7 days) to `now + events.max_future` (5 min).
    #[serde(default, borrow)]
    #[schema(value_type = Option<Timestamp>)]
    ts: Option<RawTs<'a>>,
    /// Idempotency id: 1 to 128 bytes of printable ASCII. The event is
    /// counted at most once per `(ns, key, id)` within
    /// `idempotency.window` (24 h by default), whichever proxy receives
    /// it and however often it is retried; after the window a retry is a
    /// new event. Without an id the event counts every time it is sent
    /// (unless the request carries an `Idempotency-Key`).
    #[serde(default, borrow)]
    #[schema(value_type = Option<String>, min_length = 1, max_length = 128, pattern = "^[ -~]{1,128}$", example = "pv-8f3a2c")]
    id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawTs<'a> {
    Unix(i64),
    Text(#[serde(borrow)] Cow<'a, str>),
}

/// A point in time: unix seconds, or an RFC 3339 string. Documentation
/// only (times are parsed by [`parse_time`] and the event parser); its
/// schema is written by hand so that the bounds are [`MIN_TIME`] and
/// [`MAX_TIME`] themselves.
pub struct Timestamp;

impl utoipa::PartialSchema for Timestamp {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{
            KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type,
        };
        OneOfBuilder::new()
            .description(Some(
                "Unix seconds or an RFC 3339 string (UTC), years 1 to 9999",
            ))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                    .minimum(Some(MIN_TIME))
                    .maximum(Some(MAX_TIME)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
            )
            .into()
    }
}

impl utoipa::ToSchema for Timestamp {}

// Documentation only: the body is parsed by `parse_body`, which stops at
// the event limit instead of materialising an oversized array.
/// One event or an array of events.
#[derive(utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // never built: it only names the shape in the OpenAPI document
pub(crate) enum EventsBody<'a> {
    One(RawEvent<'a>),
    Many(Vec<RawEvent<'a>>),
}

/// Body encodings the ingest endpoint accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Json,
    Ndjson,
}

/// Parses and validates a whole body; `limit` is the maximum event count.
pub fn parse_body(
    body: &[u8],
    format: BodyFormat,
    window: Window,
    limit: usize,
) -> Result<Vec<Event<'_>>, ApiError> {
    let raw = match format {
        BodyFormat::Json => parse_json(body, limit)?,
        BodyFormat::Ndjson => parse_ndjson(body, limit)?,
    };
    if raw.is_empty() {
        return Err(ApiError::InvalidEvent {
            index: None,
            message: "the body holds no event".into(),
        });
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, r)| validate(r, Some(i), window))
        .collect()
}

/// Validates one event given as parts (the REST `incr` shape).
pub fn single<'a>(
    ns: &'a str,
    key: &'a str,
    delta: Option<i64>,
    ts: Option<&'a str>,
    window: Window,
) -> Result<Event<'a>, ApiError> {
    let ts = ts.map(|t| match t.parse::<i64>() {
        Ok(secs) => RawTs::Unix(secs),
        Err(_) => RawTs::Text(Cow::Borrowed(t)),
    });
    validate(
        RawEvent {
            ns: Cow::Borrowed(ns),
            key: Cow::Borrowed(key),
            delta,
            ts,
            id: None,
        },
        None,
        window,
    )
}

/// Whether `id` is a valid event id or `Idempotency-Key`: 1 to
/// [`MAX_ID_BYTES`] bytes of printable ASCII (space to `~`).
pub fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_BYTES).contains(&id.len()) && id.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// Gives every event without an id the id `<key>/<index in the request>`
/// (the request's `Idempotency-Key`), so resending the identical request
/// counts nothing twice. The key is checked by the caller ([`valid_id`]).
pub fn apply_idempotency_key(events: &mut [Event<'_>], key: &str) {
    for (i, e) in events.iter_mut().enumerate() {
        if e.id.is_none() {
            e.id = Some(Cow::Owned(indexed_id(key, i)));
        }
    }
}

/// `<key>/<i>`, built without the formatting machinery: with a request of
/// a thousand keyed events, `format!` was 7 % of the proxy's CPU.
fn indexed_id(key: &str, i: usize) -> String {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = i;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let digits = &digits[at..];
    let mut id = String::with_capacity(key.len() + 1 + digits.len());
    id.push_str(key);
    id.push('/');
    // ASCII digits, one char each.
    id.extend(digits.iter().map(|d| char::from(*d)));
    id
}

fn parse_json(body: &[u8], limit: usize) -> Result<Vec<RawEvent<'_>>, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let index = Cell::new(0usize);
    let mut de = serde_json::Deserializer::from_slice(body);
    let result = match first {
        Some(b'[') => EventsSeed {
            index: &index,
            limit,
        }
        .deserialize(&mut de),
        Some(b'{') => RawEvent::deserialize(&mut de).map(|e| vec![e]),
        None => return Err(ApiError::InvalidJson("the body is empty".into())),
        Some(_) => {
            return Err(ApiError::InvalidJson(
                "expected a JSON object or array of objects".into(),
            ));
        }
    };
    let events = result.and_then(|events| de.end().map(|()| events));
    events.map_err(|e| json_error(e, index.get(), first == Some(&b'[')))
}

fn parse_ndjson(body: &[u8], limit: usize) -> Result<Vec<RawEvent<'_>>, ApiError> {
    let mut events = Vec::new();
    for line in body.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if events.len() == limit {
            return Err(too_many(limit));
        }
        let index = events.len();
        let event =
            serde_json::from_slice::<RawEvent<'_>>(line).map_err(|e| json_error(e, index, true))?;
        events.push(event);
    }
    Ok(events)
}

fn too_many(limit: usize) -> ApiError {
    ApiError::PayloadTooLarge(format!("a request holds at most {limit} events"))
}

/// Syntax errors make the whole body unreadable (`invalid_json`); a
/// well-formed value of the wrong shape is a bad event at `index`.
fn json_error(e: serde_json::Error, index: usize, batch: bool) -> ApiError {
    use serde_json::error::Category;
    let msg = e.to_string();
    if msg.starts_with(TOO_MANY) {
        return ApiError::PayloadTooLarge(msg);
    }
    match e.classify() {
        Category::Data => ApiError::InvalidEvent {
            index: batch.then_some(index),
            message: msg,
        },
        _ => ApiError::InvalidJson(msg),
    }
}

const TOO_MANY: &str = "a request holds at most";

/// Deserializes a JSON array of events, tracking the index of the element
/// being read so that an error can name it, and stopping at the limit
/// instead of materialising an oversized batch.
struct EventsSeed<'c> {
    index: &'c Cell<usize>,
    limit: usize,
}

impl<'de> DeserializeSeed<'de> for EventsSeed<'_> {
    type Value = Vec<RawEvent<'de>>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EventsSeed<'_> {
    type Value = Vec<RawEvent<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of event objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.limit));
        loop {
            self.index.set(out.len());
            if out.len() == self.limit {
                // Any further element is one too many, whatever it holds:
                // skim it as plain JSON, so that a bad event beyond the
                // limit cannot be reported instead of the limit.
                return match seq.next_element::<de::IgnoredAny>()? {
                    Some(_) => Err(de::Error::custom(format!(
                        "{TOO_MANY} {} events",
                        self.limit
                    ))),
                    None => Ok(out),
                };
            }
            match seq.next_element::<RawEvent<'de>>()? {
                Some(e) => out.push(e),
                None => return Ok(out),
            }
        }
    }
}

fn validate<'a>(
    raw: RawEvent<'a>,
    index: Option<usize>,
    window: Window,
) -> Result<Event<'a>, ApiError> {
    let bad = |message: String| ApiError::InvalidEvent { index, message };
    if !valid_ns(&raw.ns) {
        return Err(bad(format!(
            "ns {:?} must match ^[a-z][a-z0-9_]{{0,63}}$",
            raw.ns
        )));
    }
    if raw.key.is_empty() || raw.key.len() > MAX_KEY_BYTES {
        return Err(bad(format!(
            "key must be 1 to {MAX_KEY_BYTES} bytes, got {}",
            raw.key.len()
        )));
    }
    if raw.key.chars().any(char::is_control) {
        return Err(bad("key must not contain control characters".into()));
    }
    let delta = raw.delta.unwrap_or(1);
    if !(MIN_DELTA..=MAX_DELTA).contains(&delta) {
        return Err(bad(format!(
            "delta {delta} is outside [{MIN_DELTA}, {MAX_DELTA}]"
        )));
    }
    let ts = match raw.ts {
        None => window.now,
        Some(RawTs::Unix(secs)) => window.check(secs, index)?,
        Some(RawTs::Text(text)) => window.check(parse_rfc3339(&text).map_err(bad)?, index)?,
    };
    if let Some(id) = &raw.id
        && !valid_id(id)
    {
        return Err(bad(format!(
            "id must be 1 to {MAX_ID_BYTES} bytes of printable ASCII, got {} bytes",
            id.len()
        )));
    }
    Ok(Event {
        ns: raw.ns,
        key: raw.key,
        delta,
        ts,
        id: raw.id,
    })
}

/// `^[a-z][a-z0-9_]{0,63}$`
pub fn valid_ns(ns: &str) -> bool {
    let b = ns.as_bytes();
    (1..=64).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

/// Parses unix seconds or an RFC 3339 timestamp (any offset) to unix
/// seconds, for read ranges: years 0000 to 9999 (what RFC 3339 can write),
/// so range arithmetic never overflows.
pub fn parse_time(text: &str) -> Result<i64, String> {
    match text.parse::<i64>() {
        Ok(secs) => check_time(secs),
        Err(_) => parse_rfc3339(text).and_then(check_time),
    }
}

/// The earliest time a query may name: `0001-01-01T00:00:00Z`.
pub const MIN_TIME: i64 = -62_135_596_800;
/// The latest: `9999-12-31T23:59:59Z`, the last instant RFC 3339 can write.
pub const MAX_TIME: i64 = 253_402_300_799;

/// Unix seconds an RFC 3339 string could also express. Bounding them keeps
/// the range arithmetic (flooring to a step, adding a day) far from
/// overflow: `from=-9223372036854775808` used to panic the handler, and the
/// client saw its connection closed without an answer.
pub fn check_time(secs: i64) -> Result<i64, String> {
    if (MIN_TIME..=MAX_TIME).contains(&secs) {
        Ok(secs)
    } else {
        Err(format!(
            "{secs} is outside the representable range [{MIN_TIME}, {MAX_TIME}] (years 1 to 9999)"
        ))
    }
}

fn parse_rfc3339(text: &str) -> Result<i64, String> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| format!("ts {text:?} is neither unix seconds nor RFC 3339 ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_750_000_000;

    fn window() -> Window {
        Window {
            now: NOW,
            max_age: Duration::from_secs(7 * 86400),
            max_future: Duration::from_secs(300),
        }
    }

    fn parse(body: &str, format: BodyFormat) -> Result<Vec<Event<'_>>, ApiError> {
        parse_body(body.as_bytes(), format, window(), 3)
    }

    #[test]
    fn accepts_object_array_and_ndjson_with_defaults() {
        let one = parse(r#"{"ns":"views","key":"BV1x"}"#, BodyFormat::Json).expect("valid");
        assert_eq!(
            one,
            vec![Event {
                ns: "views".into(),
                key: "BV1x".into(),
                delta: 1,
                ts: NOW,
                id: None,
            }]
        );

        let arr = parse(
            r#"[{"ns":"views","key":"a","delta":-3,"ts":1749999000},{"ns":"views","key":"b","ts":"2025-06-15T15:06:40+00:00"}]"#,
            BodyFormat::Json,
        )
        .expect("valid");
        assert_eq!(arr[0].delta, -3);
        assert_eq!(arr[0].ts, 1_749_999_000);
        assert_eq!(arr[1].ts, 1_750_000_000);

        let nd = parse(
            "{\"ns\":\"a\",\"key\":\"x\"}\n\n{\"ns\":\"a\",\"key\":\"y\",\"delta\":5}\n",
            BodyFormat::Ndjson,
        )
        .expect("valid");
        assert_eq!(nd.len(), 2);
        assert_eq!(nd[1].delta, 5);
    }

    fn code_and_index(r: Result<Vec<Event<'_>>, ApiError>) -> (&'static str, Option<usize>) {
        match r.expect_err("must fail") {
            e @ (ApiError::InvalidEvent { index, .. } | ApiError::TsOutOfRange { index, .. }) => {
                (e.code(), index)
            }
            e => (e.code(), None),
        }
    }

    #[test]
    fn names_the_first_bad_event() {
        let cases = [
            (
                r#"[{"ns":"a","key":"x"},{"ns":"a","key":"x","detla":1}]"#,
                ("invalid_event", Some(1)),
            ),
            (
                r#"[{"ns":"a","key":"x"},{"ns":"a","key":"x","delta":"1"}]"#,
                ("invalid_event", Some(1)),
            ),
            (r#"[{"ns":"A","key":"x"}]"#, ("invalid_event", Some(0))),
            (r#"[{"ns":"a","key":""}]"#, ("invalid_event", Some(0))),
            (
                r#"[{"ns":"a","key":"x\u0001"}]"#,
                ("invalid_event", Some(0)),
            ),
            (
                r#"[{"ns":"a","key":"x","delta":1000000001}]"#,
                ("invalid_event", Some(0)),
            ),
            (
                r#"[{"ns":"a","key":"x","delta":1.5}]"#,
                ("invalid_event", Some(0)),
            ),
            (
                r#"[{"ns":"a","key":"x"},{"ns":"a","key":"x","ts":1}]"#,
                ("ts_out_of_range", Some(1)),
            ),
            (
                r#"[{"ns":"a","key":"x","ts":"yesterday"}]"#,
                ("invalid_event", Some(0)),
            ),
            (r#"[{"ns":"a","key":"x"}"#, ("invalid_json", None)),
            (r#"{"ns":"a","key":"x"} trailing"#, ("invalid_json", None)),
            ("42", ("invalid_json", None)),
            ("", ("invalid_json", None)),
            ("[]", ("invalid_event", None)),
            (
                r#"[{"ns":"a","key":"1"},{"ns":"a","key":"2"},{"ns":"a","key":"3"},{"ns":"a","key":"4"}]"#,
                ("payload_too_large", None),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                code_and_index(parse(body, BodyFormat::Json)),
                want,
                "{body}"
            );
        }
    }

    /// Found by `cargo fuzz run events`: with a limit of 2, a third event
    /// with an unknown field was reported as `invalid_event` at index 2, an
    /// index the request may not have. Beyond the limit an element is now
    /// only read as JSON: well-formed is too many, malformed is bad JSON.
    #[test]
    fn an_event_beyond_the_limit_is_too_many_whatever_it_holds() {
        let limit =
            |body: &str| code_and_index(parse_body(body.as_bytes(), BodyFormat::Json, window(), 2));
        // The fuzzer's input: the third element is not even JSON.
        let crash = r#"[{"ns":"a","key":"1"},{"ns":"a","key":"2"},{"ns":"a","kye:""3"}]"#;
        assert_eq!(limit(crash), ("invalid_json", None));
        let unknown = r#"[{"ns":"a","key":"1"},{"ns":"a","key":"2"},{"ns":"a","kye":"3"}]"#;
        assert_eq!(limit(unknown), ("payload_too_large", None));
        let bad_ns = r#"[{"ns":"a","key":"1"},{"ns":"a","key":"2"},{"ns":"A","key":"3"}]"#;
        assert_eq!(limit(bad_ns), ("payload_too_large", None));
        let exact = r#"[{"ns":"a","key":"1"},{"ns":"a","key":"2"}]"#;
        let r = parse_body(exact.as_bytes(), BodyFormat::Json, window(), 2);
        assert_eq!(r.map(|e| e.len()).ok(), Some(2));
    }

    #[test]
    fn key_length_is_counted_in_bytes() {
        let ok = format!(r#"{{"ns":"a","key":"{}"}}"#, "é".repeat(128));
        assert!(parse(&ok, BodyFormat::Json).is_ok());
        let long = format!(r#"{{"ns":"a","key":"{}x"}}"#, "é".repeat(128));
        assert_eq!(
            code_and_index(parse(&long, BodyFormat::Json)).0,
            "invalid_event"
        );
    }

    #[test]
    fn window_edges_are_inclusive() {
        let w = window();
        assert_eq!(w.check(NOW - 7 * 86400, None).ok(), Some(NOW - 7 * 86400));
        assert_eq!(w.check(NOW + 300, None).ok(), Some(NOW + 300));
        assert!(w.check(NOW + 301, None).is_err());
        assert!(w.check(NOW - 7 * 86400 - 1, None).is_err());
    }

    #[test]
    fn ndjson_reports_line_index_and_limit() {
        let body = "{\"ns\":\"a\",\"key\":\"x\"}\n{\"ns\":\"a\",\"key\":\"x\",\"bad\":1}\n";
        assert_eq!(
            code_and_index(parse(body, BodyFormat::Ndjson)),
            ("invalid_event", Some(1))
        );
        let four = "{\"ns\":\"a\",\"key\":\"x\"}\n".repeat(4);
        assert_eq!(
            code_and_index(parse(&four, BodyFormat::Ndjson)).0,
            "payload_too_large"
        );
    }

    #[test]
    fn ids_are_printable_ascii_up_to_128_bytes_and_a_key_fills_the_missing_ones() {
        let ok = parse(
            r#"[{"ns":"v","key":"a","id":"pv 1/~"},{"ns":"v","key":"a"}]"#,
            BodyFormat::Json,
        )
        .expect("valid");
        assert_eq!(ok[0].id.as_deref(), Some("pv 1/~"));
        assert_eq!(ok[1].id, None);
        let mut keyed = ok.clone();
        apply_idempotency_key(&mut keyed, "req-7");
        assert_eq!(keyed[0].id.as_deref(), Some("pv 1/~"), "its own id stays");
        assert_eq!(keyed[1].id.as_deref(), Some("req-7/1"));
        for i in [0, 9, 10, 999, 1024, usize::MAX] {
            assert_eq!(indexed_id("k", i), format!("k/{i}"));
        }
        let long = "x".repeat(MAX_ID_BYTES);
        assert!(valid_id(&long) && !valid_id(&format!("{long}x")));
        for bad in ["", "é", r"a\tb", r"a\u0000"] {
            let body = format!(r#"{{"ns":"v","key":"a","id":"{bad}"}}"#);
            let e = parse(&body, BodyFormat::Json).expect_err(bad);
            assert!(matches!(e, ApiError::InvalidEvent { .. }), "{bad:?}: {e:?}");
        }
        assert!(!valid_id("a\nb") && valid_id("a b"));
        assert!(!valid_id("a\u{7f}"));
    }

    #[test]
    fn ns_rule() {
        for ok in ["a", "views", "a_1", &format!("a{}", "b".repeat(63))] {
            assert!(valid_ns(ok), "{ok}");
        }
        for bad in [
            "",
            "1a",
            "_a",
            "Views",
            "a-b",
            &format!("a{}", "b".repeat(64)),
        ] {
            assert!(!valid_ns(bad), "{bad}");
        }
    }

    /// Regression (schemathesis): `from=-9223372036854775808` overflowed
    /// the minute flooring and panicked the read handler.
    #[test]
    fn query_times_are_bounded_to_years_1_to_9999() {
        assert_eq!(parse_time("253402300799"), Ok(MAX_TIME));
        assert_eq!(parse_time("-62135596800"), Ok(MIN_TIME));
        assert_eq!(parse_time("9999-12-31T23:59:59Z"), Ok(MAX_TIME));
        assert_eq!(parse_time("0001-01-01T00:00:00Z"), Ok(MIN_TIME));
        for bad in [
            "253402300800",
            "-62135596801",
            "-9223372036854775808",
            "9223372036854775807",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
