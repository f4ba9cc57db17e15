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
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use mysql_async::Conn;
use serde::Deserialize;
use serde_json::{Value, json};
use tally_admin::{ShardRing, routing_key};

use crate::app::{App, unix_now};
use crate::db::{self, DbError, Tier};
use crate::error::ApiError;
use crate::event::{MAX_KEY_BYTES, parse_time, valid_ns};
use crate::params::{CounterPath, Params};
use crate::planner::{self, Piece};
use crate::query;
use crate::shard_map::{GroupHandle, Node};
use crate::telemetry;

/// Which server answered a read, reported in `X-Tally-Node`.
pub const NODE_HEADER: &str = "x-tally-node";
pub const MAX_POINTS: i64 = 10_000;
pub const MAX_KEYS: usize = 1_000;
pub const MAX_TOP: usize = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Master,
    Replica,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Replica => "replica",
        }
    }
}

fn respond(body: Value, role: Role) -> Response {
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
    let req: MultiQuery = crate::params::json_body(body)?;
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
    map: &'m crate::shard_map::ShardMap,
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
    Ok(respond(
        json!({ "ns": ns, "key": key, "total": total }),
        role,
    ))
}

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
        json!({ "ns": ns, "key": key, "from": from, "to": to, "count": count }),
        role,
    ))
}

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
    let complete = retention.is_none_or(|r| from >= unix_now() - r.as_secs() as i64);
    let map = app.map.load_full();
    let rk = routing_key(&ns, &key);
    let group = route(&map, &rk)?;
    let read = |mut c: Conn| {
        let (ns, key) = (ns.as_str(), key.as_str());
        async move { query::series(&mut c, ns, key, tier, from, to).await }
    };
    let (mut buckets, role): (Vec<(i64, i64)>, Role) = if strong_read {
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
    let points: Vec<Value> = buckets
        .iter()
        .map(|(ts, c)| json!({ "ts": ts, "count": c }))
        .collect();
    telemetry::read("series", role.as_str(), started.elapsed());
    Ok(respond(
        json!({ "ns": ns, "key": key, "step": step, "from": from, "to": to, "points": points, "complete": complete }),
        role,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MultiQuery {
    ns: String,
    keys: Vec<String>,
    #[serde(default)]
    from: Option<Value>,
    #[serde(default)]
    to: Option<Value>,
}

fn json_time(name: &str, v: Option<Value>) -> Result<Option<i64>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| format!("{n} is not integer unix seconds"))
            .and_then(crate::event::check_time)
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
pub async fn post_query(
    State(app): State<Arc<App>>,
    RawQuery(q): RawQuery,
    body: Bytes,
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
    // Distinct keys per owning group.
    let mut per_group: HashMap<usize, Vec<&str>> = HashMap::new();
    for k in &keys {
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
    for r in futures::future::join_all(lookups).await {
        let (counts, r) = r?;
        if r == Role::Master {
            role = Role::Master;
        }
        found.extend(counts);
    }
    let results: Vec<Value> = keys
        .iter()
        .map(|k| json!({ "key": k, "count": found.get(k.as_bytes()).copied().unwrap_or(0) }))
        .collect();
    telemetry::read("query", role.as_str(), started.elapsed());
    Ok(respond(json!({ "results": results }), role))
}

/// `GET /v1/top/{ns}`: the exact top keys by count. Each key lives on one
/// group, so the global top `limit` is the top `limit` of the union of every
/// group's top `limit`. A strong read also considers every key with pending
/// deltas: a key without any keeps its stored rank among the others.
pub async fn get_top(
    State(app): State<Arc<App>>,
    Path(ns): Path<String>,
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
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(limit);
    let items: Vec<Value> = all
        .iter()
        .map(|(k, c)| json!({ "key": String::from_utf8_lossy(k), "count": c }))
        .collect();
    let (from, to) = match range {
        Some((f, t)) => (json!(f), json!(t)),
        None => (Value::Null, Value::Null),
    };
    telemetry::read("top", role.as_str(), started.elapsed());
    Ok(respond(
        json!({ "ns": ns, "from": from, "to": to, "items": items }),
        role,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code<T: std::fmt::Debug>(r: Result<T, ApiError>) -> &'static str {
        r.expect_err("must be refused").code()
    }

    #[test]
    fn count_request_plans_the_floored_range() {
        let r = count_request(Some(
            "from=1704067261&to=2024-01-02T01:00:59Z&consistency=strong",
        ))
        .expect("valid");
        assert_eq!((r.from, r.to), (1_704_067_260, 1_704_157_200));
        assert!(r.strong);
        assert_eq!(r.pieces.first().map(|p| p.start), Some(r.from));
        assert_eq!(r.pieces.last().map(|p| p.end), Some(r.to));
        assert_eq!(code(count_request(Some("from=5&to=5"))), "invalid_range");
        assert_eq!(code(count_request(Some("from=5"))), "invalid_param");
        assert_eq!(
            code(count_request(Some("from=1&to=2&step=day"))),
            "invalid_param"
        );
    }

    /// Times beyond years 0000..=9999 are refused before any arithmetic
    /// (the planner overflowed near `i64::MIN`, found by fuzzing).
    #[test]
    fn times_outside_the_supported_years_are_invalid_params() {
        for q in [
            "from=-9223372036854764451&to=0",
            "from=0&to=9223372036854775807",
            "from=-62167219201&to=0",
        ] {
            assert_eq!(code(count_request(Some(q))), "invalid_param", "{q}");
            assert_eq!(code(series_request(Some(q))), "invalid_param", "{q}");
            assert_eq!(code(top_request(Some(q))), "invalid_param", "{q}");
        }
        let body = br#"{"ns":"v","keys":["k"],"from":-9223372036854775808,"to":0}"#;
        assert_eq!(code(multi_request(None, body)), "invalid_param");
        // The extremes themselves are fine.
        let r = count_request(Some("from=-62167219200&to=253402300799")).expect("valid");
        assert_eq!(r.pieces.last().map(|p| p.end), Some(r.to));
    }

    #[test]
    fn series_and_top_bounds() {
        let r = series_request(Some("from=0&to=864000000&step=day")).expect("10,000 days");
        assert_eq!((r.tier, r.to / 86400), (Tier::Day, 10_000));
        assert_eq!(
            code(series_request(Some("from=0&to=864086400&step=day"))),
            "too_many_points"
        );
        assert_eq!(top_request(None).expect("defaults").limit, 10);
        assert_eq!(code(top_request(Some("limit=1001"))), "invalid_param");
        assert_eq!(code(top_request(Some("from=60"))), "invalid_param");
    }
}
