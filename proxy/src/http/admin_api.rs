//! The admin listener: `/metrics` (open) and `/admin/v1/*` (bearer token).
//!
//! The token is compared in constant time. Topology changes arrive with the
//! control-plane work; this module serves what the data plane needs now:
//! the current topology, routing lookups and an explicit flush.
//!
//! `/admin/v1` serves tools, never web pages: without a token (loopback
//! only) a page in an operator's browser could otherwise change the
//! topology or promote a replica through it. Requests a browser marks as
//! coming from a page (`Origin`, `Sec-Fetch-Site`) are refused with 403
//! `forbidden_origin` before anything else, and bodies must be declared
//! JSON (or YAML where a topology is taken): the types a page may send
//! anywhere without a CORS preflight (`text/plain`, forms) get 415.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{FromRequest, RawQuery, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tally_admin::{TopologyDoc, routing_key};
use utoipa::{IntoParams, ToSchema};

use crate::app::App;
use crate::control::topology::{self, Source};
use crate::control::{failover, reshard};
use crate::domain::event::valid_ns;
use crate::error::ApiError;
use crate::http::api::{LimitedBody, not_found, track_latency};
use crate::http::error::ErrorBody;
use crate::http::params::{Params, PathParam, json_body};
use crate::http::{openapi, quarantine_api};
use crate::storage::store::ProxyInfo;
use crate::telemetry;

/// The longest `POST /admin/v1/flush` waits for a group that keeps trying.
const FLUSH_WAIT_MAX: Duration = Duration::from_secs(600);

pub fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/topology", get(get_topology).put(put_topology))
        .route("/reload", post(post_reload))
        .route("/route", get(get_route).post(post_route))
        .route("/flush", post(post_flush))
        .route("/health", get(get_health))
        .route("/proxies", get(get_proxies))
        .route("/groups/{group}/promote", post(post_promote))
        .route("/reshard", get(get_reshard).post(post_reshard))
        .route("/reshard/cancel", post(post_reshard_cancel))
        .route("/quarantine", get(quarantine_api::get_quarantine))
        .route("/quarantine/reapply", post(quarantine_api::post_reapply))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), require_token))
        .layer(middleware::from_fn(refuse_browsers));
    Router::new()
        .route("/metrics", get(get_metrics))
        .route("/openapi.json", get(openapi::admin_json))
        .nest("/admin/v1", v1)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(None, track_latency))
        .with_state(app)
}

async fn require_token(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(expected) = &app.admin_token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !token_matches(given.as_bytes(), expected.as_bytes()) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Refuses what a browser sends on behalf of a web page: an `Origin`
/// header (every cross-origin request, and every POST) or a
/// `Sec-Fetch-Site` other than `none` (an address typed by the user) and
/// `same-origin`. Tools such as tallyctl and curl send neither.
async fn refuse_browsers(req: Request, next: Next) -> Response {
    if let Some(mark) = browser_mark(req.headers()) {
        return ApiError::ForbiddenOrigin(format!(
            "the admin API does not serve web pages (this request carries {mark}); use tallyctl, curl or another HTTP client"
        ))
        .into_response();
    }
    next.run(req).await
}

/// The header by which a browser marked the request as a web page's.
fn browser_mark(headers: &HeaderMap) -> Option<&'static str> {
    if headers.contains_key(header::ORIGIN) {
        return Some("an Origin header");
    }
    match headers.get("sec-fetch-site")?.as_bytes() {
        b"none" | b"same-origin" => None,
        b"cross-site" => Some("Sec-Fetch-Site: cross-site"),
        b"same-site" => Some("Sec-Fetch-Site: same-site"),
        _ => Some("a Sec-Fetch-Site header"),
    }
}

/// The body of an admin request that takes one, read like [`LimitedBody`]
/// once its `Content-Type` is JSON (or, with `YAML`, YAML). A web page can
/// send `text/plain`, form and multipart bodies anywhere without a CORS
/// preflight; these types need one, and this listener grants none.
pub(crate) struct AdminBody<const YAML: bool>(bytes::Bytes);

impl<const YAML: bool> FromRequest<Arc<App>> for AdminBody<YAML> {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &Arc<App>) -> Result<Self, Self::Rejection> {
        media_type(req.headers(), YAML)?;
        let LimitedBody(body) = LimitedBody::from_request(req, app).await?;
        Ok(AdminBody(body))
    }
}

/// `Ok` for a JSON body, and for YAML where `yaml`; else 415.
fn media_type(headers: &HeaderMap, yaml: bool) -> Result<(), ApiError> {
    let mime = headers.get(header::CONTENT_TYPE).map(|v| {
        v.to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    let accepted = match mime.as_deref() {
        Some("application/json") => true,
        Some("application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml") => yaml,
        _ => false,
    };
    if accepted {
        return Ok(());
    }
    let want = if yaml {
        "application/json or application/yaml"
    } else {
        "application/json"
    };
    Err(ApiError::UnsupportedMediaType(match mime {
        Some(other) => format!("content type {other:?} is not accepted here; use {want}"),
        None => format!("a Content-Type is required: {want}"),
    }))
}

/// Whether the bearer token given is the expected one, in time that tells
/// nothing about the expected token: not its bytes, not its length. Slices
/// of different lengths compare unequal at once, so the comparison is of
/// SHA-256 digests (always 32 bytes, every byte compared); hashing the
/// given token takes time that depends only on the given token.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    let given = Sha256::digest(given);
    let expected = Sha256::digest(expected);
    bool::from(given.as_slice().ct_eq(expected.as_slice()))
}

/// Prometheus metrics (text exposition format); no token.
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "Every metric, Prometheus text format 0.0.4", body = String, content_type = "text/plain")))]
pub(crate) async fn get_metrics(State(app): State<Arc<App>>) -> Response {
    let pending: Vec<(String, usize)> = app
        .groups()
        .iter()
        .map(|g| (g.name.clone(), g.buffer.pending()))
        .collect();
    let body = telemetry::render(
        &app.metrics,
        app.map.load().version(),
        app.is_ready(),
        &pending,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// `{"version": N}`: the topology version a change produced.
#[derive(Serialize, ToSchema)]
pub struct Version {
    version: u64,
}

/// The running topology; DSN passwords are shown as `***`.
#[utoipa::path(get, path = "/admin/v1/topology", tag = "topology", security(("bearer" = [])),
    responses(
        (status = 200, description = "The running topology", body = TopologyDoc),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
    ))]
pub(crate) async fn get_topology(State(app): State<Arc<App>>) -> Json<TopologyDoc> {
    Json(app.map.load().topology.to_doc(true))
}

/// `PUT /admin/v1/topology` with `If-Match: "<version>"`: a compare-and-set
/// on the running version; the body's own `version` is ignored.
#[utoipa::path(put, path = "/admin/v1/topology", tag = "topology", security(("bearer" = [])),
    params(("If-Match" = String, Header, description = "The version the change is based on, quoted: `\"7\"`")),
    request_body(description = "The new topology (the shape `GET` returns; YAML is accepted too). A DSN password `***` keeps the server's current one.",
        content((TopologyDoc = "application/json"), (String = "application/yaml"))),
    responses(
        (status = 200, description = "Applied and persisted", body = Version),
        (status = 400, description = "`invalid_param` (malformed `If-Match`), `invalid_json` (body not UTF-8)", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 409, description = "`version_conflict` (stale `If-Match`), `reshard_required` (the change moves keys of groups holding data)", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not declared JSON or YAML (`Content-Type`)", body = ErrorBody),
        (status = 422, description = "`invalid_topology`, with every `problems` entry", body = ErrorBody),
        (status = 428, description = "`precondition_required`: no `If-Match`", body = ErrorBody),
        (status = 500, description = "`topology_storage`: the topology file could not be written", body = ErrorBody),
        (status = 503, description = "`unavailable`: the shared topology store cannot be reached", body = ErrorBody),
    ))]
pub(crate) async fn put_topology(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    AdminBody(body): AdminBody<true>,
) -> Result<Json<Version>, ApiError> {
    let Some(raw) = headers.get(header::IF_MATCH) else {
        return Err(ApiError::PreconditionRequired(
            "If-Match: \"<version>\" is required; GET /admin/v1/topology gives the current version"
                .into(),
        ));
    };
    let expected = raw
        .to_str()
        .ok()
        .map(|v| v.trim().trim_start_matches("W/").trim_matches('"'))
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError::InvalidParam("If-Match must be a quoted version number such as \"7\"".into())
        })?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::InvalidJson("the body is not UTF-8".into()))?;
    let doc = topology::parse_doc(text)?;
    let applied = topology::apply(&app, doc, Source::Api, Some(expected)).await?;
    Ok(Json(Version {
        version: applied.version,
    }))
}

/// The outcome of a reload.
#[derive(Serialize, ToSchema)]
pub struct Reloaded {
    version: u64,
    /// Whether the file differed from the running topology.
    changed: bool,
}

/// `POST /admin/v1/reload`: re-reads the topology file.
#[utoipa::path(post, path = "/admin/v1/reload", tag = "topology", security(("bearer" = [])),
    responses(
        (status = 200, description = "The file was read (and applied if it changed)", body = Reloaded),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 409, description = "`reshard_required`", body = ErrorBody),
        (status = 422, description = "`invalid_topology`: the file does not validate; nothing changed", body = ErrorBody),
        (status = 500, description = "`topology_storage`: the file cannot be read or written", body = ErrorBody),
        (status = 503, description = "`unavailable`: the shared topology store cannot be reached", body = ErrorBody),
    ))]
pub(crate) async fn post_reload(State(app): State<Arc<App>>) -> Result<Json<Reloaded>, ApiError> {
    let applied = topology::reload(&app).await?;
    Ok(Json(Reloaded {
        version: applied.version,
        changed: applied.changed,
    }))
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documentation only: parsed by `Params`, which refuses unknown names
pub(crate) struct RouteQuery {
    #[param(pattern = "^[a-z][a-z0-9_]{0,63}$", example = "views")]
    ns: String,
    #[param(example = "BV1x")]
    key: String,
}

/// The group owning a counter, under a topology version.
#[derive(Serialize, ToSchema)]
pub struct RouteAnswer {
    group: String,
    version: u64,
}

/// Which group owns `(ns, key)`.
#[utoipa::path(get, path = "/admin/v1/route", tag = "topology", security(("bearer" = [])),
    params(RouteQuery),
    responses(
        (status = 200, description = "The owner", body = RouteAnswer),
        (status = 400, description = "`invalid_param`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 503, description = "`unavailable`: the topology has no group", body = ErrorBody),
    ))]
pub(crate) async fn get_route(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
) -> Result<Json<RouteAnswer>, ApiError> {
    let params = Params::parse(query.as_deref(), &["ns", "key"])?;
    let (Some(ns), Some(key)) = (params.get("ns"), params.get("key")) else {
        return Err(ApiError::InvalidParam("ns and key are required".into()));
    };
    if !valid_ns(ns) {
        return Err(ApiError::InvalidParam(format!(
            "ns {ns:?} must match ^[a-z][a-z0-9_]{{0,63}}$"
        )));
    }
    let map = app.map.load();
    let group = map
        .ring
        .owner_name(&routing_key(ns, key))
        .ok_or_else(|| ApiError::Unavailable("the topology has no group".into()))?;
    Ok(Json(RouteAnswer {
        group: group.to_owned(),
        version: map.version(),
    }))
}

/// Every group's servers as the last health probe saw them.
#[derive(Serialize, ToSchema)]
pub struct HealthReport {
    groups: Vec<GroupHealth>,
}

#[derive(Serialize, ToSchema)]
pub struct GroupHealth {
    name: String,
    master: MasterHealth,
    replicas: Vec<ReplicaHealth>,
}

#[derive(Serialize, ToSchema)]
pub struct MasterHealth {
    /// `host:port`
    addr: String,
    up: bool,
    last_error: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ReplicaHealth {
    /// `host:port`
    addr: String,
    up: bool,
    /// Seconds behind the master; null when unknown (not replicating).
    lag_seconds: Option<u64>,
    io_running: bool,
    sql_running: bool,
    /// Whether eventual reads may use it now.
    eligible: bool,
    last_error: Option<String>,
}

/// The last probe result of every server, per group.
#[utoipa::path(get, path = "/admin/v1/health", tag = "operations", security(("bearer" = [])),
    responses(
        (status = 200, description = "Per group: master and replicas", body = HealthReport),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
    ))]
pub(crate) async fn get_health(State(app): State<Arc<App>>) -> Json<HealthReport> {
    let groups = app
        .groups()
        .iter()
        .map(|g| {
            let m = g.master.health.get();
            let replicas = g
                .replicas
                .iter()
                .map(|r| {
                    let h = r.health.get();
                    ReplicaHealth {
                        addr: r.dsn.addr(),
                        up: h.up == Some(true),
                        lag_seconds: h.lag_seconds,
                        io_running: h.io_running,
                        sql_running: h.sql_running,
                        eligible: r.health.eligible_replica(app.config.reads.max_replica_lag),
                        last_error: h.last_error,
                    }
                })
                .collect();
            GroupHealth {
                name: g.name.clone(),
                master: MasterHealth {
                    addr: g.master.dsn.addr(),
                    up: m.up == Some(true),
                    last_error: m.last_error,
                },
                replicas,
            }
        })
        .collect();
    Json(HealthReport { groups })
}

/// `POST /admin/v1/route` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteMany {
    #[schema(pattern = "^[a-z][a-z0-9_]{0,63}$", example = "views")]
    ns: String,
    /// At most 100,000 keys.
    #[schema(max_items = 100000)]
    keys: Vec<String>,
}

/// The owners of many keys, in request order.
#[derive(Serialize, ToSchema)]
pub struct RouteManyAnswer {
    groups: Vec<String>,
    version: u64,
}

/// `POST /admin/v1/route` `{"ns", "keys": [...]}` → `{"groups": [...],
/// "version"}`: the owners of up to 100,000 keys at once, in request order,
/// for tooling (reshard planning, cross-proxy routing checks).
#[utoipa::path(post, path = "/admin/v1/route", tag = "topology", security(("bearer" = [])),
    request_body = RouteMany,
    responses(
        (status = 200, description = "One group per key, in request order", body = RouteManyAnswer),
        (status = 400, description = "`invalid_json`, `invalid_param`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not declared JSON (`Content-Type`)", body = ErrorBody),
        (status = 503, description = "`unavailable`: the topology has no group", body = ErrorBody),
    ))]
pub(crate) async fn post_route(
    State(app): State<Arc<App>>,
    AdminBody(body): AdminBody<false>,
) -> Result<Json<RouteManyAnswer>, ApiError> {
    let req: RouteMany = json_body(&body)?;
    if !valid_ns(&req.ns) {
        return Err(ApiError::InvalidParam(format!(
            "ns {:?} must match ^[a-z][a-z0-9_]{{0,63}}$",
            req.ns
        )));
    }
    if req.keys.len() > 100_000 {
        return Err(ApiError::InvalidParam(
            "at most 100000 keys per request".into(),
        ));
    }
    let map = app.map.load();
    let groups = req
        .keys
        .iter()
        .map(|k| {
            map.ring
                .owner_name(&routing_key(&req.ns, k))
                .map(str::to_owned)
        })
        .collect::<Option<Vec<String>>>()
        .ok_or_else(|| ApiError::Unavailable("the topology has no group".into()))?;
    Ok(Json(RouteManyAnswer {
        groups,
        version: map.version(),
    }))
}

/// `POST /admin/v1/groups/{group}/promote` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PromoteRequest {
    /// The replica's `host:port`, as the topology lists it.
    #[schema(example = "127.0.0.1:3308")]
    replica: String,
    /// Promote even if another replica received more transactions
    /// (emergency promotion only).
    #[serde(default)]
    force: bool,
}

/// A completed promotion.
#[derive(Serialize, ToSchema)]
pub struct Promotion {
    /// The topology version with the new master.
    version: u64,
    /// The new master's `host:port`.
    master: String,
    /// `planned` (the old master answered) or `emergency`.
    #[schema(example = "planned")]
    mode: &'static str,
    took_ms: u64,
}

/// `POST /admin/v1/groups/{group}/promote` `{"replica": "host:port",
/// "force"?: bool}`.
#[utoipa::path(post, path = "/admin/v1/groups/{group}/promote", tag = "operations", security(("bearer" = [])),
    params(("group" = String, Path, description = "The group, e.g. `g0`")),
    request_body = PromoteRequest,
    responses(
        (status = 200, description = "Promoted; the new topology is persisted", body = Promotion),
        (status = 400, description = "`invalid_json`, `invalid_param` (not a replica of the group)", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such group", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not declared JSON (`Content-Type`)", body = ErrorBody),
        (status = 409, description = "`replica_behind` (emergency; use `force`), `version_conflict`", body = ErrorBody),
        (status = 503, description = "`promotion_failed`, `unavailable` (store or lease)", body = ErrorBody),
    ))]
pub(crate) async fn post_promote(
    State(app): State<Arc<App>>,
    PathParam(group): PathParam<String>,
    AdminBody(body): AdminBody<false>,
) -> Result<Json<Promotion>, ApiError> {
    let req: PromoteRequest = json_body(&body)?;
    let p = failover::promote(&app, &group, &req.replica, req.force).await?;
    Ok(Json(Promotion {
        version: p.version,
        master: p.master,
        mode: p.mode.as_str(),
        took_ms: p.took.as_millis() as u64,
    }))
}

/// The proxies sharing the topology store.
#[derive(Serialize, ToSchema)]
pub struct Proxies {
    proxies: Vec<ProxyInfo>,
}

/// `POST /admin/v1/reshard` with the target topology (YAML or JSON):
/// starts an online reshard and answers with its plan.
#[utoipa::path(post, path = "/admin/v1/reshard", tag = "topology", security(("bearer" = [])),
    request_body(description = "The target topology (groups added, removed or reweighted; the same servers for groups that stay). YAML is accepted too.",
        content((TopologyDoc = "application/json"), (String = "application/yaml"))),
    responses(
        (status = 202, description = "Started: `{id, version, phase, moves: [{source, target, ranges, fraction}], fraction}`", body = serde_json::Value),
        (status = 400, description = "`invalid_param`: nothing moves, or servers change in the same step; `invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 409, description = "`reshard_in_progress`, `version_conflict`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not declared JSON or YAML (`Content-Type`)", body = ErrorBody),
        (status = 422, description = "`invalid_topology`, with every `problems` entry", body = ErrorBody),
        (status = 500, description = "`topology_storage`: the topology file could not be written", body = ErrorBody),
        (status = 503, description = "`unavailable`: the shared topology store cannot be reached", body = ErrorBody),
    ))]
pub(crate) async fn post_reshard(
    State(app): State<Arc<App>>,
    AdminBody(body): AdminBody<true>,
) -> Result<Response, ApiError> {
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::InvalidJson("the body is not UTF-8".into()))?;
    let plan = reshard::start(&app, text).await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(plan)).into_response())
}

/// `GET /admin/v1/reshard`: the running or last reshard, the same on
/// every proxy (see `control::reshard::status`).
#[utoipa::path(get, path = "/admin/v1/reshard", tag = "topology", security(("bearer" = [])),
    responses(
        (status = 200, description = "The same on every proxy and across restarts (from the topology, where the outcome is persisted as `last_reshard`, and the copy markers): \
`{active, id, state, progress, version, last}`. \
`state`: while active `copying`, `cancelling` (also while the reverse reshard moves new writes back; `reverts` names the cancelled one), `cleaning`, or `failed` (its verification failed: nothing more is done until a cancel rolls it back); \
once ended `done`, `cancelled` or `failed`, with the `id` `POST` answered. `id`, `state` and `progress` are `null` when no reshard ever ran. \
`progress`: the fraction (0 to 1) of the moved key space copied to its new owners; 1 once cleaning or ended; it falls back while a cancel undoes copies; `null` when a target's master does not answer. \
`last`: the `LastReshard` schema (`id, state, version, at, reverted_by, error, verified`) plus `outcome` (= its `state`), or `null`. \
While active also `phase, since, reverts, moves: [{source, target, ranges, fraction}], ranges, fraction, verified, driver`; `driver` (rows copied, rate, ETA, proxies not yet settled, last error) only on the proxy driving it, else `null`.", body = serde_json::Value),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
    ))]
pub(crate) async fn get_reshard(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(reshard::status(&app).await)
}

/// `POST /admin/v1/reshard/cancel`: cancels a reshard before cutover.
#[utoipa::path(post, path = "/admin/v1/reshard/cancel", tag = "topology", security(("bearer" = [])),
    responses(
        (status = 200, description = "`{id, phase: cancelling, version}`", body = serde_json::Value),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: no reshard is in progress", body = ErrorBody),
        (status = 409, description = "`past_cutover`: verified and cleaning up, or itself an undo", body = ErrorBody),
        (status = 503, description = "`unavailable`: the shared topology store cannot be reached", body = ErrorBody),
    ))]
pub(crate) async fn post_reshard_cancel(
    State(app): State<Arc<App>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(reshard::cancel(&app).await?))
}

/// `GET /admin/v1/proxies`: the registry of the shared store; without a
/// store, just this proxy.
#[utoipa::path(get, path = "/admin/v1/proxies", tag = "operations", security(("bearer" = [])),
    responses(
        (status = 200, description = "Every registered proxy (only this one without a store)", body = Proxies),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 503, description = "`unavailable`: the shared topology store cannot be read", body = ErrorBody),
    ))]
pub(crate) async fn get_proxies(State(app): State<Arc<App>>) -> Result<Json<Proxies>, ApiError> {
    let proxies = match &app.store {
        Some(store) => store
            .proxies()
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?,
        None => {
            let (http, admin) = app.addrs.get().cloned().unwrap_or_default();
            let pending: usize = app.groups().iter().map(|g| g.buffer.pending()).sum();
            vec![ProxyInfo {
                id: app.writer_id.clone(),
                http,
                admin,
                version: app.map.load().version(),
                pending: pending as u64,
                settled: app.settled.load(std::sync::atomic::Ordering::Acquire),
                last_seen_ms: 0,
                alive: true,
            }]
        }
    };
    Ok(Json(Proxies { proxies }))
}

/// What a flush committed.
#[derive(Serialize, ToSchema)]
pub struct Flushed {
    /// Rows committed by this flush.
    flushed_rows: u64,
}

/// Flushes every group now and answers once all of it is committed.
/// A large backlog may take a while to commit; what makes a group fail the
/// flush is a failed attempt (its master cannot be reached), or no commit
/// at all within the overall cap.
#[utoipa::path(post, path = "/admin/v1/flush", tag = "operations", security(("bearer" = [])),
    responses(
        (status = 200, description = "Everything pending is committed", body = Flushed),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 503, description = "`unavailable`: a group could not be reached; its data stays queued", body = ErrorBody),
    ))]
pub(crate) async fn post_flush(State(app): State<Arc<App>>) -> Result<Json<Flushed>, ApiError> {
    let flushed = app.flush_all(FLUSH_WAIT_MAX).await.map_err(|failed| {
        ApiError::Unavailable(format!(
            "could not commit to group(s) {}; their data stays queued and is retried",
            failed.join(", ")
        ))
    })?;
    Ok(Json(Flushed {
        flushed_rows: flushed,
    }))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn only_the_expected_token_matches() {
        let expected = b"s3cret-token";
        assert!(token_matches(b"s3cret-token", expected));
        for wrong in [
            &b""[..],
            b"s3cret-toke",
            b"s3cret-token ",
            b"s3cret-tokeN",
            b"S3cret-token",
            b"x",
        ] {
            assert!(!token_matches(wrong, expected), "{wrong:?}");
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(*name, axum::http::HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn what_a_browser_marks_as_a_pages_request_is_recognised() {
        for marked in [
            &[("origin", "http://evil.example")][..],
            &[("origin", "null")],
            &[("sec-fetch-site", "cross-site")],
            &[("sec-fetch-site", "same-site")],
            &[("sec-fetch-site", "something-new")],
            &[("sec-fetch-site", "none"), ("origin", "http://a")],
        ] {
            assert!(browser_mark(&headers(marked)).is_some(), "{marked:?}");
        }
        for tool in [
            &[][..],
            &[("sec-fetch-site", "none")],
            &[("sec-fetch-site", "same-origin")],
            &[("user-agent", "curl/8.5.0")],
        ] {
            assert_eq!(browser_mark(&headers(tool)), None, "{tool:?}");
        }
    }

    #[test]
    fn admin_bodies_must_be_declared_json_or_yaml_where_taken() {
        let ct = |v: &'static str| headers(&[("content-type", v)]);
        for v in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
        ] {
            assert!(media_type(&ct(v), false).is_ok(), "{v}");
            assert!(media_type(&ct(v), true).is_ok(), "{v}");
        }
        for v in [
            "application/yaml",
            "application/x-yaml",
            "text/yaml",
            "text/x-yaml",
        ] {
            assert!(media_type(&ct(v), true).is_ok(), "{v}");
            assert!(media_type(&ct(v), false).is_err(), "{v}");
        }
        // What a page can send anywhere without a preflight.
        for v in [
            "text/plain",
            "text/plain; charset=utf-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
        ] {
            let err = media_type(&ct(v), true).expect_err(v);
            assert_eq!(err.code(), "unsupported_media_type");
        }
        let err = media_type(&HeaderMap::new(), false).expect_err("no content type");
        assert!(err.to_string().contains("application/json"), "{err}");
    }

    /// The fastest of `runs` comparisons of `given` with `expected`.
    fn fastest(given: &[u8], expected: &[u8], runs: usize) -> Duration {
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(token_matches(
                    std::hint::black_box(given),
                    std::hint::black_box(expected),
                ));
                t.elapsed()
            })
            .min()
            .unwrap_or_default()
    }

    /// Issue #20 item 6: the comparison took as long as the token when
    /// the lengths agreed and returned at once when they did not, so
    /// timing tokens of growing length told an attacker the expected
    /// token's length. A wrong token of the right length and one a byte
    /// longer must take about the same time. (A long token makes the
    /// difference large against timer noise; the fastest of many runs
    /// drops scheduling noise.)
    #[test]
    fn a_wrong_length_is_not_answered_sooner() {
        let expected = vec![b'a'; 16 * 1024];
        let same_length = vec![b'b'; expected.len()];
        let one_longer = vec![b'b'; expected.len() + 1];
        let mut same = Duration::MAX;
        let mut longer = Duration::MAX;
        for _ in 0..5 {
            same = same.min(fastest(&same_length, &expected, 40));
            longer = longer.min(fastest(&one_longer, &expected, 40));
        }
        let (lo, hi) = if same < longer {
            (same, longer)
        } else {
            (longer, same)
        };
        assert!(
            hi < lo * 3,
            "right length {same:?}, one byte longer {longer:?}: the length leaks"
        );
    }
}
