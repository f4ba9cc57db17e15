//! The read endpoints: query and body parsing, the documented response
//! shapes, and `X-Tally-Node`. Which server answers and how is the read
//! engine's (`engine::reads`); every response names the role that served
//! it.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::app::App;
use crate::domain::clock::unix_now;
use crate::domain::event::{MAX_KEY_BYTES, Timestamp, check_time, parse_time, valid_ns};
use crate::domain::planner::{self, Piece};
use crate::domain::role::Role;
use crate::domain::tier::Tier;
use crate::engine::reads::{self, Scope, Served};
use crate::error::ApiError;
use crate::http::api::LimitedBody;
use crate::http::error::ErrorBody;
use crate::http::params::{CounterPath, CounterPathDoc, NsPathDoc, Params, PathParam, json_body};
use crate::telemetry;

/// Which server answered a read, reported in `X-Tally-Node`.
pub const NODE_HEADER: &str = "x-tally-node";
pub const MAX_POINTS: i64 = 10_000;
pub use crate::engine::reads::MAX_KEYS;
pub const MAX_TOP: usize = 1_000;

/// A served read: its latency under `what` and the role in
/// `X-Tally-Node`, for every read endpoint alike.
fn respond(what: &'static str, started: Instant, body: impl Serialize, role: Role) -> Response {
    telemetry::read(what, role.as_str(), started.elapsed());
    let mut r = Json(body).into_response();
    r.headers_mut()
        .insert(NODE_HEADER, HeaderValue::from_static(role.as_str()));
    r
}

fn consistency(params: &Params) -> Result<bool, ApiError> {
    Ok(params.choice("consistency", &["eventual", "strong"], "eventual")? == "strong")
}

fn time_param(params: &Params, name: &str) -> Result<Option<i64>, ApiError> {
    params
        .get(name)
        .map(|v| parse_time(v).map_err(|why| ApiError::InvalidParam(format!("{name}: {why}"))))
        .transpose()
}

/// Required, ordered `from`/`to`.
fn range(params: &Params) -> Result<(i64, i64), ApiError> {
    match (time_param(params, "from")?, time_param(params, "to")?) {
        (Some(from), Some(to)) if from < to => Ok((from, to)),
        (Some(from), Some(to)) => Err(ApiError::InvalidRange(format!(
            "from ({from}) must be before to ({to})"
        ))),
        _ => Err(ApiError::InvalidParam(
            "from and to are required (unix seconds or RFC 3339)".into(),
        )),
    }
}

/// Optional range: both or neither.
fn optional_range(params: &Params) -> Result<Option<(i64, i64)>, ApiError> {
    match (params.get("from"), params.get("to")) {
        (None, None) => Ok(None),
        _ => range(params).map(Some),
    }
}

// ---- request parsing and planning -------------------------------------------
//
// Everything a read handler decides from its query string (and body) before
// touching a server, as pure functions: the handlers call them, and the
// fuzz targets in `fuzz/` drive them with arbitrary input.

/// `GET /v1/counters/{ns}/{key}`: whether the read is `strong`.
pub fn total_request(query: Option<&str>) -> Result<bool, ApiError> {
    consistency(&Params::parse(query, &["consistency"])?)
}

/// `GET /v1/counters/{ns}/{key}/count`, parsed and planned.
#[derive(Debug)]
pub struct CountRequest {
    /// Minute-floored range; `from <= to`.
    pub from: i64,
    pub to: i64,
    /// Tier pieces covering exactly `[from, to)`.
    pub pieces: Vec<Piece>,
    pub strong: bool,
}

pub fn count_request(query: Option<&str>) -> Result<CountRequest, ApiError> {
    let params = Params::parse(query, &["from", "to", "consistency"])?;
    let (from, to) = range(&params)?;
    let strong = consistency(&params)?;
    let (from, to) = planner::minute_range(from, to);
    Ok(CountRequest {
        from,
        to,
        pieces: planner::plan(from, to),
        strong,
    })
}

/// `GET /v1/counters/{ns}/{key}/series`, parsed.
#[derive(Debug)]
pub struct SeriesRequest {
    /// As the client named it: `minute`, `hour` or `day`.
    pub step: &'static str,
    pub tier: Tier,
    /// Floored to the step; at most [`MAX_POINTS`] steps apart.
    pub from: i64,
    pub to: i64,
    pub strong: bool,
}

pub fn series_request(query: Option<&str>) -> Result<SeriesRequest, ApiError> {
    let params = Params::parse(query, &["from", "to", "step", "consistency"])?;
    let step = params.choice("step", &["minute", "hour", "day"], "minute")?;
    let tier = match step {
        "day" => Tier::Day,
        "hour" => Tier::Hour,
        _ => Tier::Minute,
    };
    let width = tier.width().unwrap_or(60);
    let (from, to) = range(&params)?;
    let strong = consistency(&params)?;
    let (from, to) = (planner::floor(from, width), planner::floor(to, width));
    let points = (to - from) / width;
    if points > MAX_POINTS {
        return Err(ApiError::TooManyPoints(format!(
            "{points} {step} points requested; at most {MAX_POINTS} per request"
        )));
    }
    Ok(SeriesRequest {
        step,
        tier,
        from,
        to,
        strong,
    })
}

/// `POST /v1/counters/query`, parsed and planned.
#[derive(Debug)]
pub struct MultiRequest {
    pub ns: String,
    /// 1 to [`MAX_KEYS`] valid keys, in request order (duplicates kept).
    pub keys: Vec<String>,
    /// Minute-floored range, `None` for all-time totals.
    pub range: Option<(i64, i64)>,
    pub pieces: Option<Vec<Piece>>,
    pub strong: bool,
}

pub fn multi_request(query: Option<&str>, body: &[u8]) -> Result<MultiRequest, ApiError> {
    let params = Params::parse(query, &["consistency"])?;
    let strong = consistency(&params)?;
    let req: MultiQuery = json_body(body)?;
    if !valid_ns(&req.ns) {
        return Err(ApiError::InvalidParam(format!(
            "ns {:?} must match ^[a-z][a-z0-9_]{{0,63}}$",
            req.ns
        )));
    }
    if req.keys.is_empty() || req.keys.len() > MAX_KEYS {
        return Err(ApiError::InvalidParam(format!(
            "keys must hold 1 to {MAX_KEYS} keys, got {}",
            req.keys.len()
        )));
    }
    for k in &req.keys {
        check_key(k)?;
    }
    let range = match (json_time("from", req.from)?, json_time("to", req.to)?) {
        (None, None) => None,
        (Some(f), Some(t)) if f < t => Some(planner::minute_range(f, t)),
        (Some(f), Some(t)) => {
            return Err(ApiError::InvalidRange(format!(
                "from ({f}) must be before to ({t})"
            )));
        }
        _ => {
            return Err(ApiError::InvalidParam(
                "give both from and to, or neither".into(),
            ));
        }
    };
    Ok(MultiRequest {
        ns: req.ns,
        keys: req.keys,
        range,
        pieces: range.map(|(f, t)| planner::plan(f, t)),
        strong,
    })
}

/// `GET /v1/top/{ns}`, parsed and planned.
#[derive(Debug)]
pub struct TopRequest {
    /// 1 to [`MAX_TOP`].
    pub limit: usize,
    /// Minute-floored range, `None` for all-time totals.
    pub range: Option<(i64, i64)>,
    pub pieces: Option<Vec<Piece>>,
    pub strong: bool,
}

pub fn top_request(query: Option<&str>) -> Result<TopRequest, ApiError> {
    let params = Params::parse(query, &["from", "to", "limit", "consistency"])?;
    let limit = params.i64("limit")?.unwrap_or(10);
    if !(1..=MAX_TOP as i64).contains(&limit) {
        return Err(ApiError::InvalidParam(format!(
            "limit must be 1..={MAX_TOP}, got {limit}"
        )));
    }
    let strong = consistency(&params)?;
    let range = optional_range(&params)?.map(|(f, t)| planner::minute_range(f, t));
    Ok(TopRequest {
        limit: limit as usize,
        range,
        pieces: range.map(|(f, t)| planner::plan(f, t)),
        strong,
    })
}

/// How a read picks its server (SPEC §2).
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // documentation only: parsed by `consistency`
pub enum Consistency {
    /// A replica within `reads.max_replica_lag`, else the master (default).
    Eventual,
    /// The master plus this proxy's not yet committed deltas.
    Strong,
}

/// Bucket width of a series.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    Minute,
    Hour,
    Day,
}

/// `?consistency=`
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documentation only: parsed by `Params`, which refuses unknown names
pub(crate) struct ConsistencyQuery {
    consistency: Option<Consistency>,
}

/// A required half-open range `[from, to)`, floored to the minute.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documentation only: parsed by `Params`, which refuses unknown names
pub(crate) struct CountQuery {
    /// Unix seconds or RFC 3339.
    #[param(value_type = Timestamp)]
    from: String,
    /// Unix seconds or RFC 3339; after `from`.
    #[param(value_type = Timestamp)]
    to: String,
    consistency: Option<Consistency>,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documentation only: parsed by `Params`, which refuses unknown names
pub(crate) struct SeriesQuery {
    /// Unix seconds or RFC 3339; floored to the step.
    #[param(value_type = Timestamp)]
    from: String,
    /// Unix seconds or RFC 3339; floored to the step, after `from`.
    #[param(value_type = Timestamp)]
    to: String,
    /// `minute` (default), `hour` or `day`.
    step: Option<Step>,
    consistency: Option<Consistency>,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documentation only: parsed by `Params`, which refuses unknown names
pub(crate) struct TopQuery {
    /// Unix seconds or RFC 3339; give both `from` and `to` or neither
    /// (all time).
    #[param(value_type = Option<Timestamp>)]
    from: Option<String>,
    #[param(value_type = Option<Timestamp>)]
    to: Option<String>,
    /// 1 to 1,000; default 10.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    consistency: Option<Consistency>,
}

/// The all-time total of one counter.
#[derive(Serialize, ToSchema)]
pub struct Total {
    ns: String,
    key: String,
    total: i64,
}

/// The count of one counter in `[from, to)` (minute-floored).
#[derive(Serialize, ToSchema)]
pub struct Count {
    ns: String,
    key: String,
    from: i64,
    to: i64,
    count: i64,
}

/// One non-zero bucket of a series.
#[derive(Serialize, ToSchema)]
pub struct Point {
    /// The bucket's start, unix seconds.
    ts: i64,
    count: i64,
}

/// Non-zero buckets of `[from, to)`, ascending.
#[derive(Serialize, ToSchema)]
pub struct Series {
    ns: String,
    key: String,
    step: Step,
    from: i64,
    to: i64,
    points: Vec<Point>,
    /// False when part of the range lies beyond the step's retention.
    complete: bool,
}

/// A key and its count.
#[derive(Serialize, ToSchema)]
pub struct KeyCount {
    key: String,
    count: i64,
}

/// `POST /v1/counters/query` answer: one result per requested key, in
/// request order.
#[derive(Serialize, ToSchema)]
pub struct QueryResults {
    results: Vec<KeyCount>,
}

/// The top keys by count, ties broken by key ascending.
#[derive(Serialize, ToSchema)]
pub struct Top {
    ns: String,
    /// The minute-floored range, null for all time.
    from: Option<i64>,
    to: Option<i64>,
    items: Vec<KeyCount>,
}

/// The all-time total of a counter (unknown counters read 0).
#[utoipa::path(get, path = "/v1/counters/{ns}/{key}", tag = "read",
    params(CounterPathDoc, ConsistencyQuery),
    responses(
        (status = 200, description = "The total", body = Total, headers(("X-Tally-Node" = String, description = "`replica` or `master`: which served"))),
        (status = 400, description = "`invalid_param`", body = ErrorBody),
        (status = 409, description = "`count_out_of_range`: a strong read whose stored count plus pending deltas does not fit 64 bits (those deltas are quarantined when flushed)", body = ErrorBody),
        (status = 503, description = "`unavailable`: the group cannot be read", body = ErrorBody),
    ))]
pub async fn get_total(
    State(app): State<Arc<App>>,
    path: Result<CounterPath, ApiError>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    total(&app, path, q.as_deref()).await
}

/// [`get_total`]'s handling, shared with the data listener's shortcut past
/// the router (`api::counter_shortcut`).
pub async fn total(
    app: &App,
    path: Result<CounterPath, ApiError>,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let CounterPath { ns, key } = path?;
    let strong = total_request(query)?;
    let Served { value, role } = reads::total(app, &ns, &key, strong).await?;
    Ok(respond(
        "total",
        started,
        Total {
            ns,
            key,
            total: value,
        },
        role,
    ))
}

/// The count in `[from, to)` at minute resolution.
#[utoipa::path(get, path = "/v1/counters/{ns}/{key}/count", tag = "read",
    params(CounterPathDoc, CountQuery),
    responses(
        (status = 200, description = "The count", body = Count, headers(("X-Tally-Node" = String, description = "`replica` or `master`: which served"))),
        (status = 400, description = "`invalid_param`, `invalid_range`", body = ErrorBody),
        (status = 409, description = "`count_out_of_range`: a strong read whose stored count plus pending deltas does not fit 64 bits (those deltas are quarantined when flushed)", body = ErrorBody),
        (status = 503, description = "`unavailable`: the group cannot be read", body = ErrorBody),
    ))]
pub async fn get_count(
    State(app): State<Arc<App>>,
    path: Result<CounterPath, ApiError>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let CounterPath { ns, key } = path?;
    let CountRequest {
        from,
        to,
        pieces,
        strong,
    } = count_request(q.as_deref())?;
    let Served { value, role } = reads::count(&app, &ns, &key, (from, to), &pieces, strong).await?;
    Ok(respond(
        "count",
        started,
        Count {
            ns,
            key,
            from,
            to,
            count: value,
        },
        role,
    ))
}

/// Non-zero buckets of `[from, to)` at the given step (at most 10,000).
#[utoipa::path(get, path = "/v1/counters/{ns}/{key}/series", tag = "read",
    params(CounterPathDoc, SeriesQuery),
    responses(
        (status = 200, description = "The series", body = Series, headers(("X-Tally-Node" = String, description = "`replica` or `master`: which served"))),
        (status = 400, description = "`invalid_param`, `invalid_range`, `too_many_points`", body = ErrorBody),
        (status = 409, description = "`count_out_of_range`: a strong read whose stored count plus pending deltas does not fit 64 bits (those deltas are quarantined when flushed)", body = ErrorBody),
        (status = 503, description = "`unavailable`: the group cannot be read", body = ErrorBody),
    ))]
pub async fn get_series(
    State(app): State<Arc<App>>,
    path: Result<CounterPath, ApiError>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let CounterPath { ns, key } = path?;
    let SeriesRequest {
        step,
        tier,
        from,
        to,
        strong,
    } = series_request(q.as_deref())?;
    let retention = match tier {
        Tier::Day => app.config.retention.day,
        Tier::Hour => app.config.retention.hour,
        _ => app.config.retention.minute,
    };
    let step = match step {
        "day" => Step::Day,
        "hour" => Step::Hour,
        _ => Step::Minute,
    };
    let complete = retention.is_none_or(|r| from >= unix_now() - r.as_secs() as i64);
    let Served { value, role } = reads::series(&app, &ns, &key, tier, (from, to), strong).await?;
    let points: Vec<Point> = value
        .into_iter()
        .filter(|(_, count)| *count != 0)
        .map(|(ts, count)| Point { ts, count })
        .collect();
    Ok(respond(
        "series",
        started,
        Series {
            ns,
            key,
            step,
            from,
            to,
            points,
            complete,
        },
        role,
    ))
}

/// `POST /v1/counters/query` body: many keys of one namespace.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MultiQuery {
    #[schema(pattern = "^[a-z][a-z0-9_]{0,63}$", example = "views")]
    ns: String,
    /// 1 to 1,000 keys (each 1 to 256 bytes, no control characters).
    #[schema(min_items = 1, max_items = 1000)]
    keys: Vec<String>,
    /// Give both `from` and `to` (a range) or neither (totals).
    #[serde(default)]
    #[schema(value_type = Option<Timestamp>)]
    from: Option<serde_json::Value>,
    #[serde(default)]
    #[schema(value_type = Option<Timestamp>)]
    to: Option<serde_json::Value>,
}

fn json_time(name: &str, v: Option<serde_json::Value>) -> Result<Option<i64>, ApiError> {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| format!("{n} is not integer unix seconds"))
            .and_then(check_time)
            .map(Some)
            .map_err(|why| ApiError::InvalidParam(format!("{name}: {why}"))),
        Some(Value::String(s)) => parse_time(&s)
            .map(Some)
            .map_err(|why| ApiError::InvalidParam(format!("{name}: {why}"))),
        Some(_) => Err(ApiError::InvalidParam(format!(
            "{name} must be unix seconds or an RFC 3339 string"
        ))),
    }
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES || key.chars().any(char::is_control) {
        return Err(ApiError::InvalidParam(format!(
            "key {key:?} must be 1 to {MAX_KEY_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

/// `POST /v1/counters/query`: many keys of one namespace, grouped per
/// shard, shards queried in parallel, results in request order.
#[utoipa::path(post, path = "/v1/counters/query", tag = "read",
    params(ConsistencyQuery),
    request_body = MultiQuery,
    responses(
        (status = 200, description = "Counts in request order (totals without a range)", body = QueryResults, headers(("X-Tally-Node" = String, description = "`master` if any group was read on its master, else `replica`"))),
        (status = 400, description = "`invalid_json`, `invalid_param`, `invalid_range`", body = ErrorBody),
        (status = 408, description = "`body_timeout`: the body arrived too slowly (`connections.min_body_rate`, `connections.body_read_timeout`); the connection is closed", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body exceeds `limits.max_body_bytes`", body = ErrorBody),
        (status = 409, description = "`count_out_of_range`: a strong read whose stored count plus pending deltas does not fit 64 bits (those deltas are quarantined when flushed)", body = ErrorBody),
        (status = 503, description = "`unavailable`: a group cannot be read; `overloaded`: the listener holds `connections.max_body_bytes_in_flight` bytes of request bodies (retry after `Retry-After` seconds)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait (with `overloaded`)"))),
    ))]
pub async fn post_query(
    State(app): State<Arc<App>>,
    RawQuery(q): RawQuery,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let MultiRequest {
        ns,
        keys,
        range,
        pieces,
        strong,
    } = multi_request(q.as_deref(), &body)?;
    let Served { value: found, role } = reads::counts(
        &app,
        &ns,
        &keys,
        Scope {
            range,
            pieces: pieces.as_deref(),
            strong,
        },
    )
    .await?;
    let results: Vec<KeyCount> = keys
        .into_iter()
        .map(|key| KeyCount {
            count: found.get(key.as_bytes()).copied().unwrap_or(0),
            key,
        })
        .collect();
    Ok(respond("query", started, QueryResults { results }, role))
}

/// `GET /v1/top/{ns}`: the exact top keys by count. Each key lives on one
/// group, so the global top `limit` is the top `limit` of the union of every
/// group's top `limit`. A strong read adds this proxy's pending deltas;
/// what it reads grows with `limit`, not with the keys pending.
#[utoipa::path(get, path = "/v1/top/{ns}", tag = "read",
    params(NsPathDoc, TopQuery),
    responses(
        (status = 200, description = "The exact top `limit` keys", body = Top, headers(("X-Tally-Node" = String, description = "`master` if any group was read on its master, else `replica`"))),
        (status = 400, description = "`invalid_param`, `invalid_range`", body = ErrorBody),
        (status = 409, description = "`count_out_of_range`: a strong read whose stored count plus pending deltas does not fit 64 bits (those deltas are quarantined when flushed)", body = ErrorBody),
        (status = 503, description = "`unavailable`: a group cannot be read", body = ErrorBody),
    ))]
pub async fn get_top(
    State(app): State<Arc<App>>,
    PathParam(ns): PathParam<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    if !valid_ns(&ns) {
        return Err(ApiError::InvalidParam(format!(
            "ns {ns:?} must match ^[a-z][a-z0-9_]{{0,63}}$"
        )));
    }
    let TopRequest {
        limit,
        range,
        pieces,
        strong,
    } = top_request(q.as_deref())?;
    let Served { value, role } = reads::top(
        &app,
        &ns,
        limit,
        Scope {
            range,
            pieces: pieces.as_deref(),
            strong,
        },
    )
    .await?;
    let items: Vec<KeyCount> = value
        .into_iter()
        .map(|(k, count)| KeyCount {
            key: String::from_utf8_lossy(&k).into_owned(),
            count,
        })
        .collect();
    Ok(respond(
        "top",
        started,
        Top {
            ns,
            from: range.map(|r| r.0),
            to: range.map(|r| r.1),
            items,
        },
        role,
    ))
}
