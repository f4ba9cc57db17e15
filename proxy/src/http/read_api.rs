//! The read endpoints and how a read picks its server.
//!
//! `eventual` (default) reads an eligible replica (up, replicating, lag at
//! most `reads.max_replica_lag`), falling back to the master when none is
//! eligible or the replica query fails (retried once there). `strong` reads
//! the master and adds this proxy's not yet committed deltas, consistently
//! with a batch that commits meanwhile (see the buffer's commit epoch).
//! Every response names the role that served it in `X-Tally-Node`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use mysql_async::Conn;
use serde::{Deserialize, Serialize};
use tally_admin::{ShardRing, routing_key};
use utoipa::{IntoParams, ToSchema};

use crate::app::App;
use crate::domain::clock::unix_now;
use crate::domain::event::{MAX_KEY_BYTES, Timestamp, parse_time, valid_ns};
use crate::domain::planner::{self, Piece};
use crate::domain::role::Role;
use crate::domain::tier::Tier;
use crate::engine::moved_reads::{self, Ask};
use crate::error::ApiError;
use crate::http::api::LimitedBody;
use crate::http::error::ErrorBody;
use crate::http::params::{CounterPath, CounterPathDoc, NsPathDoc, Params, PathParam};
use crate::storage::db::{self, DbError};
use crate::storage::query;
use crate::storage::reshard_sql::Span;
use crate::storage::shard_map::{GroupHandle, Node, ShardMap};
use crate::telemetry;

/// Which server answered a read, reported in `X-Tally-Node`.
pub const NODE_HEADER: &str = "x-tally-node";
pub const MAX_POINTS: i64 = 10_000;
pub const MAX_KEYS: usize = 1_000;
pub const MAX_TOP: usize = 1_000;

fn respond(body: impl Serialize, role: Role) -> Response {
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
    let req: MultiQuery = crate::http::params::json_body(body)?;
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

fn route<'m>(
    map: &'m crate::storage::shard_map::ShardMap,
    rk: &[u8],
) -> Result<&'m Arc<GroupHandle>, ApiError> {
    map.route(rk)
        .ok_or_else(|| ApiError::Unavailable("the topology has no group".into()))
}

fn unavailable(group: &GroupHandle, e: DbError) -> ApiError {
    ApiError::Unavailable(format!("group {} cannot be read: {e}", group.name))
}

/// Runs `f` on a connection of `node` within the read timeout.
async fn run_on<T, F, Fut>(app: &App, node: &Node, f: &F) -> Result<T, DbError>
where
    F: Fn(Conn) -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let timeout = app.config.pool.connect_timeout;
    let work = async { f(db::conn(&node.pool, timeout).await?).await };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(DbError::Timeout(timeout)))
}

/// An `eventual` read: an eligible replica, else (or after its failure)
/// the master.
async fn eventual<T, F, Fut>(app: &App, group: &GroupHandle, f: F) -> Result<(T, Role), ApiError>
where
    F: Fn(Conn) -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    match group.pick_replica(app.config.reads.max_replica_lag) {
        Some(replica) => match run_on(app, replica, &f).await {
            Ok(v) => return Ok((v, Role::Replica)),
            Err(e) => {
                tracing::warn!(group = %group.name, replica = %replica.dsn.addr(), error = %e, "replica read failed; retrying on the master");
                replica.health.mark_down(e.to_string());
                telemetry::read_fallback(&group.name, "replica_error");
            }
        },
        None if !group.replicas.is_empty() => telemetry::read_fallback(&group.name, "no_replica"),
        None => {}
    }
    let v = run_on(app, &group.master, &f)
        .await
        .map_err(|e| unavailable(group, e))?;
    Ok((v, Role::Master))
}

/// A `strong` read: master rows and `snapshot()` of the pending deltas,
/// taken within one unchanged commit epoch so a batch committing meanwhile
/// is counted exactly once.
async fn strong<T, P, F, Fut>(
    app: &App,
    group: &GroupHandle,
    snapshot: impl Fn() -> P,
    f: F,
) -> Result<(T, P), ApiError>
where
    F: Fn(Conn) -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let deadline = Instant::now() + app.config.pool.connect_timeout;
    while Instant::now() < deadline {
        let Some(epoch) = group.buffer.read_epoch() else {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        let pending = snapshot();
        let stored = run_on(app, &group.master, &f)
            .await
            .map_err(|e| unavailable(group, e))?;
        if group.buffer.epoch_unchanged(epoch) {
            return Ok((stored, pending));
        }
    }
    Err(ApiError::Unavailable(format!(
        "group {} is committing a batch whose outcome is not known yet; retry",
        group.name
    )))
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
        (status = 503, description = "`unavailable`: the group cannot be read", body = ErrorBody),
    ))]
pub async fn get_total(
    State(app): State<Arc<App>>,
    path: Result<CounterPath, ApiError>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let CounterPath { ns, key } = path?;
    let strong_read = total_request(q.as_deref())?;
    let map = app.map.load_full();
    let rk = routing_key(&ns, &key);
    if let Some(mv) = map.moved(ShardRing::position(&rk)) {
        let (found, role) = moved_reads::read(
            &app,
            &mv,
            &ns,
            &[&key],
            Ask::Counts(None),
            strong_read,
            None,
        )
        .await?;
        let total = found
            .into_counts()
            .get(key.as_bytes())
            .copied()
            .unwrap_or(0);
        telemetry::read("total", role.as_str(), started.elapsed());
        return Ok(respond(Total { ns, key, total }, role));
    }
    let group = route(&map, &rk)?;
    let read = |mut c: Conn| {
        let (ns, key) = (ns.as_str(), key.as_str());
        async move { query::total(&mut c, ns, key).await }
    };
    let (total, role) = if strong_read {
        let pos = ShardRing::position(&rk);
        let (stored, pending) = strong(
            &app,
            group,
            || group.buffer.pending_sum(&rk, pos, None),
            read,
        )
        .await?;
        (stored + pending, Role::Master)
    } else {
        eventual(&app, group, read).await?
    };
    telemetry::read("total", role.as_str(), started.elapsed());
    Ok(respond(Total { ns, key, total }, role))
}

/// The count in `[from, to)` at minute resolution.
#[utoipa::path(get, path = "/v1/counters/{ns}/{key}/count", tag = "read",
    params(CounterPathDoc, CountQuery),
    responses(
        (status = 200, description = "The count", body = Count, headers(("X-Tally-Node" = String, description = "`replica` or `master`: which served"))),
        (status = 400, description = "`invalid_param`, `invalid_range`", body = ErrorBody),
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
        strong: strong_read,
    } = count_request(q.as_deref())?;
    let map = app.map.load_full();
    let rk = routing_key(&ns, &key);
    if let Some(mv) = map.moved(ShardRing::position(&rk)) {
        let ask = Ask::Counts(Some(&pieces));
        let (found, role) =
            moved_reads::read(&app, &mv, &ns, &[&key], ask, strong_read, Some((from, to))).await?;
        let count = found
            .into_counts()
            .get(key.as_bytes())
            .copied()
            .unwrap_or(0);
        telemetry::read("count", role.as_str(), started.elapsed());
        return Ok(respond(
            Count {
                ns,
                key,
                from,
                to,
                count,
            },
            role,
        ));
    }
    let group = route(&map, &rk)?;
    let read = |mut c: Conn| {
        let (ns, key, pieces) = (ns.as_str(), key.as_str(), pieces.as_slice());
        async move { query::count(&mut c, ns, key, pieces).await }
    };
    let (count, role) = if strong_read {
        let pos = ShardRing::position(&rk);
        let (stored, pending) = strong(
            &app,
            group,
            || group.buffer.pending_sum(&rk, pos, Some((from, to))),
            read,
        )
        .await?;
        (stored + pending, Role::Master)
    } else {
        eventual(&app, group, read).await?
    };
    telemetry::read("count", role.as_str(), started.elapsed());
    Ok(respond(
        Count {
            ns,
            key,
            from,
            to,
            count,
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
        strong: strong_read,
    } = series_request(q.as_deref())?;
    let width = tier.width().unwrap_or(60);
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
    let map = app.map.load_full();
    let rk = routing_key(&ns, &key);
    let group = route(&map, &rk)?;
    let read = |mut c: Conn| {
        let (ns, key) = (ns.as_str(), key.as_str());
        async move { query::series(&mut c, ns, key, tier, from, to).await }
    };
    let moved = map.moved(ShardRing::position(&rk));
    let (mut buckets, role): (Vec<(i64, i64)>, Role) = if let Some(mv) = moved {
        let ask = Ask::Series { tier, from, to };
        let (found, role) =
            moved_reads::read(&app, &mv, &ns, &[&key], ask, strong_read, None).await?;
        (found.into_series().into_iter().collect(), role)
    } else if strong_read {
        let pos = ShardRing::position(&rk);
        let (stored, pending) =
            strong(&app, group, || group.buffer.pending_minutes(&rk, pos), read).await?;
        let mut sums: std::collections::BTreeMap<i64, i64> = stored.into_iter().collect();
        for (minute, delta) in pending {
            let b = planner::floor(minute, width);
            if (from..to).contains(&b) {
                *sums.entry(b).or_default() += delta;
            }
        }
        (sums.into_iter().collect(), Role::Master)
    } else {
        eventual(&app, group, read).await?
    };
    buckets.retain(|(_, c)| *c != 0);
    let points: Vec<Point> = buckets
        .into_iter()
        .map(|(ts, count)| Point { ts, count })
        .collect();
    telemetry::read("series", role.as_str(), started.elapsed());
    Ok(respond(
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
            .and_then(crate::domain::event::check_time)
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
        (status = 413, description = "`payload_too_large`: the body exceeds `limits.max_body_bytes`", body = ErrorBody),
        (status = 503, description = "`unavailable`: a group cannot be read", body = ErrorBody),
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
        strong: strong_read,
    } = multi_request(q.as_deref(), &body)?;
    let map = app.map.load_full();
    // Distinct keys per owning group; keys a running reshard moves, per
    // source/target pair (read from both, see `reshard::reads`).
    let mut per_group: HashMap<usize, Vec<&str>> = HashMap::new();
    let mut moved: Vec<&str> = Vec::new();
    for k in &keys {
        if map
            .moved(ShardRing::position(&routing_key(&ns, k)))
            .is_some()
        {
            if !moved.contains(&k.as_str()) {
                moved.push(k);
            }
            continue;
        }
        let owner = map
            .ring
            .owner(&routing_key(&ns, k))
            .ok_or_else(|| ApiError::Unavailable("the topology has no group".into()))?;
        let keys = per_group.entry(owner).or_default();
        if !keys.contains(&k.as_str()) {
            keys.push(k);
        }
    }
    let ns = ns.as_str();
    let lookups = per_group.into_iter().map(|(gi, keys)| {
        let (app, group, pieces) = (&app, &map.groups[gi], pieces.as_deref());
        async move {
            let read = |mut c: Conn| {
                let keys = keys.as_slice();
                async move { query::counts(&mut c, ns, keys, pieces).await }
            };
            if strong_read {
                let snapshot = || {
                    keys.iter()
                        .map(|k| {
                            let rk = routing_key(ns, k);
                            let sum =
                                group
                                    .buffer
                                    .pending_sum(&rk, ShardRing::position(&rk), range);
                            (k.as_bytes().to_vec(), sum)
                        })
                        .collect::<Vec<_>>()
                };
                let (mut stored, pending) = strong(app, group, snapshot, read).await?;
                for (k, d) in pending {
                    *stored.entry(k).or_default() += d;
                }
                Ok::<_, ApiError>((stored, Role::Master))
            } else {
                eventual(app, group, read).await
            }
        }
    });
    let mut found: HashMap<Vec<u8>, i64> = HashMap::new();
    let mut role = Role::Replica;
    if !moved.is_empty() {
        found.extend(
            moved_counts(
                &app,
                &map,
                ns,
                &moved,
                pieces.as_deref(),
                strong_read,
                range,
            )
            .await?,
        );
        role = Role::Master;
    }
    for r in futures::future::join_all(lookups).await {
        let (counts, r) = r?;
        if r == Role::Master {
            role = Role::Master;
        }
        found.extend(counts);
    }
    let results: Vec<KeyCount> = keys
        .iter()
        .map(|k| KeyCount {
            count: found.get(k.as_bytes()).copied().unwrap_or(0),
            key: k.clone(),
        })
        .collect();
    telemetry::read("query", role.as_str(), started.elapsed());
    Ok(respond(QueryResults { results }, role))
}

/// `GET /v1/top/{ns}`: the exact top keys by count. Each key lives on one
/// group, so the global top `limit` is the top `limit` of the union of every
/// group's top `limit`. A strong read also considers every key with pending
/// deltas: a key without any keeps its stored rank among the others.
#[utoipa::path(get, path = "/v1/top/{ns}", tag = "read",
    params(NsPathDoc, TopQuery),
    responses(
        (status = 200, description = "The exact top `limit` keys", body = Top, headers(("X-Tally-Node" = String, description = "`master` if any group was read on its master, else `replica`"))),
        (status = 400, description = "`invalid_param`, `invalid_range`", body = ErrorBody),
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
        strong: strong_read,
    } = top_request(q.as_deref())?;
    let map = app.map.load_full();
    let ns_ref = ns.as_str();
    let scatter = map.groups.iter().map(|group| {
        let (app, pieces) = (&app, pieces.as_deref());
        async move {
            let read_top =
                |mut c: Conn| async move { query::top(&mut c, ns_ref, pieces, limit).await };
            if !strong_read {
                return eventual(app, group, read_top).await;
            }
            let mut prefix = ns_ref.as_bytes().to_vec();
            prefix.push(0);
            let snapshot = || group.buffer.pending_with_prefix(&prefix, range);
            // Candidates: the stored top plus every key with pending deltas,
            // whose stored values are read in the same epoch.
            let read = |mut c: Conn| {
                let pending_keys: Vec<String> = snapshot()
                    .into_keys()
                    .map(|k| String::from_utf8_lossy(&k).into_owned())
                    .collect();
                async move {
                    let mut top: HashMap<Vec<u8>, i64> = query::top(&mut c, ns_ref, pieces, limit)
                        .await?
                        .into_iter()
                        .collect();
                    for chunk in pending_keys.chunks(MAX_KEYS) {
                        let keys: Vec<&str> = chunk.iter().map(String::as_str).collect();
                        let stored = query::counts(&mut c, ns_ref, &keys, pieces).await?;
                        for k in keys {
                            let v = stored.get(k.as_bytes()).copied().unwrap_or(0);
                            top.insert(k.as_bytes().to_vec(), v);
                        }
                    }
                    Ok(top)
                }
            };
            let (mut stored, pending) = strong(app, group, snapshot, read).await?;
            for (k, d) in pending {
                *stored.entry(k).or_default() += d;
            }
            Ok((stored.into_iter().collect::<Vec<_>>(), Role::Master))
        }
    });
    let mut all: Vec<(Vec<u8>, i64)> = Vec::new();
    let mut role = Role::Replica;
    for r in futures::future::join_all(scatter).await {
        let (items, r) = r?;
        if r == Role::Master {
            role = Role::Master;
        }
        all.extend(items.into_iter().filter(|(_, c)| *c != 0));
    }
    if !map.moves.is_empty() {
        // A reshard splits moved keys over two groups: neither group's top
        // list has their whole value. Read every moved key exactly and let
        // that value replace the partial ones.
        let exact = moved_values(&app, &map, &ns, pieces.as_deref(), strong_read, range).await?;
        all.retain(|(k, _)| !exact.contains_key(k));
        all.extend(exact.into_iter().filter(|(_, c)| *c != 0));
        role = Role::Master;
    }
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(limit);
    let items: Vec<KeyCount> = all
        .into_iter()
        .map(|(k, count)| KeyCount {
            key: String::from_utf8_lossy(&k).into_owned(),
            count,
        })
        .collect();
    telemetry::read("top", role.as_str(), started.elapsed());
    Ok(respond(
        Top {
            ns,
            from: range.map(|r| r.0),
            to: range.map(|r| r.1),
            items,
        },
        role,
    ))
}

/// Exact values of every key of `ns` that a running reshard moves, from
/// both groups of each moved range (for the top-K).
async fn moved_values(
    app: &App,
    map: &ShardMap,
    ns: &str,
    pieces: Option<&[Piece]>,
    strong: bool,
    range: Option<(i64, i64)>,
) -> Result<HashMap<Vec<u8>, i64>, ApiError> {
    let mut keys: Vec<String> = Vec::new();
    for p in tally_admin::reshard::pairs(&map.moves) {
        let spans: Vec<Span> = map
            .moves
            .iter()
            .filter(|m| m.source == p.source && m.target == p.target)
            .map(|m| Span {
                start: m.start,
                end: m.end,
            })
            .collect();
        for name in [&p.source, &p.target] {
            if let Some(g) = map.group(name) {
                keys.extend(moved_reads::keys_in(app, g, ns, &spans).await?);
            }
        }
    }
    keys.sort_unstable();
    keys.dedup();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    moved_counts(app, map, ns, &keys, pieces, strong, range).await
}

/// Values of `keys` (all in ranges a running reshard moves), read from both
/// groups of their range, [`MAX_KEYS`] at a time; every key is in the
/// answer (0 when absent).
async fn moved_counts(
    app: &App,
    map: &ShardMap,
    ns: &str,
    keys: &[&str],
    pieces: Option<&[Piece]>,
    strong: bool,
    range: Option<(i64, i64)>,
) -> Result<HashMap<Vec<u8>, i64>, ApiError> {
    let mut per_move: HashMap<(&str, &str), (crate::storage::shard_map::Moved<'_>, Vec<&str>)> =
        HashMap::new();
    for k in keys {
        if let Some(mv) = map.moved(ShardRing::position(&routing_key(ns, k))) {
            per_move
                .entry((mv.source.name.as_str(), mv.target.name.as_str()))
                .or_insert_with(|| (mv, Vec::new()))
                .1
                .push(k);
        }
    }
    let mut out = HashMap::new();
    for (mv, group_keys) in per_move.values() {
        for chunk in group_keys.chunks(MAX_KEYS) {
            let (found, _) =
                moved_reads::read(app, mv, ns, chunk, Ask::Counts(pieces), strong, range).await?;
            let mut found = found.into_counts();
            for k in chunk {
                let v = found.remove(k.as_bytes()).unwrap_or(0);
                out.insert(k.as_bytes().to_vec(), v);
            }
        }
    }
    Ok(out)
}
