//! The admin listener: `/metrics` (open) and `/admin/v1/*` (bearer token).
//!
//! The token is compared in constant time. Topology changes arrive with the
//! control-plane work; this module serves what the data plane needs now:
//! the current topology, routing lookups and an explicit flush.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tally_admin::routing_key;

use crate::api::{not_found, track_latency};
use crate::app::App;
use crate::error::ApiError;
use crate::event::valid_ns;
use crate::params::Params;
use crate::telemetry;
use crate::topology_ctl::{self, Source};

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
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .route("/metrics", get(get_metrics))
        .nest("/admin/v1", v1)
        .fallback(not_found)
        .layer(middleware::from_fn(track_latency))
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
        if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

async fn get_metrics(State(app): State<Arc<App>>) -> Response {
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

async fn get_topology(State(app): State<Arc<App>>) -> Json<Value> {
    let doc = app.map.load().topology.to_doc(true);
    Json(json!(doc))
}

/// `PUT /admin/v1/topology` with `If-Match: "<version>"`: a compare-and-set
/// on the running version; the body's own `version` is ignored.
async fn put_topology(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
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
    let doc = topology_ctl::parse_doc(text)?;
    let applied = topology_ctl::apply(&app, doc, Source::Api, Some(expected)).await?;
    Ok(Json(json!({ "version": applied.version })))
}

/// `POST /admin/v1/reload`: re-reads the topology file.
async fn post_reload(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let applied = topology_ctl::reload(&app).await?;
    Ok(Json(
        json!({ "version": applied.version, "changed": applied.changed }),
    ))
}

async fn get_route(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({ "group": group, "version": map.version() })))
}

/// The last probe result of every server, per group.
async fn get_health(State(app): State<Arc<App>>) -> Json<Value> {
    let groups: Vec<Value> = app
        .groups()
        .iter()
        .map(|g| {
            let m = g.master.health.get();
            let replicas: Vec<Value> = g
                .replicas
                .iter()
                .map(|r| {
                    let h = r.health.get();
                    json!({
                        "addr": r.dsn.addr(),
                        "up": h.up == Some(true),
                        "lag_seconds": h.lag_seconds,
                        "io_running": h.io_running,
                        "sql_running": h.sql_running,
                        "eligible": r.health.eligible_replica(app.config.reads.max_replica_lag),
                        "last_error": h.last_error,
                    })
                })
                .collect();
            json!({
                "name": g.name,
                "master": { "addr": g.master.dsn.addr(), "up": m.up == Some(true), "last_error": m.last_error },
                "replicas": replicas,
            })
        })
        .collect();
    Json(json!({ "groups": groups }))
}

/// `POST /admin/v1/route` `{"ns", "keys": [...]}` → `{"groups": [...],
/// "version"}`: the owners of up to 100,000 keys at once, in request order,
/// for tooling (reshard planning, cross-proxy routing checks).
async fn post_route(State(app): State<Arc<App>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Req {
        ns: String,
        keys: Vec<String>,
    }
    let req: Req = crate::params::json_body(&body)?;
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
    Ok(Json(json!({ "groups": groups, "version": map.version() })))
}

/// `POST /admin/v1/groups/{group}/promote` `{"replica": "host:port",
/// "force"?: bool}`.
async fn post_promote(
    State(app): State<Arc<App>>,
    axum::extract::Path(group): axum::extract::Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Req {
        replica: String,
        #[serde(default)]
        force: bool,
    }
    let req: Req = crate::params::json_body(&body)?;
    let p = crate::failover::promote(&app, &group, &req.replica, req.force).await?;
    Ok(Json(json!({
        "version": p.version,
        "master": p.master,
        "mode": p.mode.as_str(),
        "took_ms": p.took.as_millis() as u64,
    })))
}

/// `POST /admin/v1/reshard` with the target topology (YAML or JSON):
/// starts an online reshard and answers with its plan.
async fn post_reshard(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ApiError> {
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::InvalidJson("the body is not UTF-8".into()))?;
    let plan = crate::reshard::start(&app, text).await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(plan)).into_response())
}

/// `GET /admin/v1/reshard`: phase, plan, verification and progress.
async fn get_reshard(State(app): State<Arc<App>>) -> Json<Value> {
    Json(crate::reshard::status(&app))
}

/// `POST /admin/v1/reshard/cancel`: cancels a reshard before cutover.
async fn post_reshard_cancel(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(crate::reshard::cancel(&app).await?))
}

/// `GET /admin/v1/proxies`: the registry of the shared store; without a
/// store, just this proxy.
async fn get_proxies(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let proxies = match &app.store {
        Some(store) => {
            let list = store
                .proxies()
                .await
                .map_err(|e| ApiError::Unavailable(e.to_string()))?;
            json!(list)
        }
        None => {
            let (http, admin) = app.addrs.get().cloned().unwrap_or_default();
            let pending: usize = app.groups().iter().map(|g| g.buffer.pending()).sum();
            json!([{
                "id": app.writer_id, "http": http, "admin": admin, "version": app.map.load().version(),
                "pending": pending, "last_seen_ms": 0, "alive": true,
            }])
        }
    };
    Ok(Json(json!({ "proxies": proxies })))
}

/// Flushes every group now and answers once all of it is committed.
/// A large backlog may take a while to commit; what makes a group fail the
/// flush is a failed attempt (its master cannot be reached), or no commit
/// at all within the overall cap.
async fn post_flush(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let flushed = app.flush_all(FLUSH_WAIT_MAX).await.map_err(|failed| {
        ApiError::Unavailable(format!(
            "could not commit to group(s) {}; their data stays queued and is retried",
            failed.join(", ")
        ))
    })?;
    Ok(Json(json!({ "flushed_rows": flushed })))
}
