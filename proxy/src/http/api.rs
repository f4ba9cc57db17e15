//! The data-plane HTTP API: ingest, counter reads and health probes.
//!
//! Handlers translate HTTP to calls on the buffer and the database and
//! nothing else; status codes live in [`crate::error`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::future::Either;
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

use crate::app::App;
use crate::domain::event::{self, BodyFormat};
use crate::engine::ingest;
use crate::error::ApiError;
use crate::http::error::ErrorBody;
use crate::http::openapi;
use crate::http::params::{CounterPath, CounterPathDoc, Params};
use crate::http::read_api;
use crate::http::serve::{self, Shortcut};
use crate::telemetry;

/// The data-plane router. There is no `DefaultBodyLimit` layer: no handler
/// uses axum's size-limited extractors (`Bytes`, `Json`, `String`); bodies
/// are read by [`read_body`] under `limits.max_body_bytes`, and every layer
/// costs each request a boxed service clone.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/events", post(post_events))
        .route(INCR_ROUTE, post(post_incr))
        .route("/v1/counters/{ns}/{key}", get(read_api::get_total))
        .route("/v1/counters/{ns}/{key}/count", get(read_api::get_count))
        .route("/v1/counters/{ns}/{key}/series", get(read_api::get_series))
        .route("/v1/counters/query", post(read_api::post_query))
        .route("/v1/top/{ns}", get(read_api::get_top))
        .route("/openapi.json", get(openapi::data_plane_json))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            Some(app.clone()),
            track_latency,
        ))
        .with_state(app)
}

/// The one middleware of both listeners (one layer, because every layer
/// costs the single-event path a boxed future and a service clone):
/// records request latency per matched route and status class, and gives
/// every request an id: the client's `X-Request-Id` (if it is a short,
/// printable token) or a generated one. The id is on every log line of the
/// request (a tracing span) and echoed in the response.
///
/// With `Some(app)` (the data listener) the latency also goes to
/// `app.latency`, the window the reshard copy's adaptive throttle reads.
pub async fn track_latency(
    State(app): State<Option<Arc<App>>>,
    req: Request,
    next: Next,
) -> Response {
    // `MatchedPath` is a shared string: cloning it allocates nothing.
    let route = req.extensions().get::<MatchedPath>().cloned();
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let (id, method) = (request_id(&req), req.method().clone());
    tracked(app.as_deref(), route, id, &method, next.run(req)).await
}

/// What [`track_latency`] does around a request's handling, shared with
/// [`counter_shortcut`].
async fn tracked(
    app: Option<&App>,
    route: &str,
    id: axum::http::HeaderValue,
    method: &axum::http::Method,
    handling: impl Future<Output = Response>,
) -> Response {
    use tracing::Instrument;
    let span = tracing::info_span!("request", id = %id.to_str().unwrap_or("-"), method = %method, route = %route);
    let started = Instant::now();
    let mut response = handling.instrument(span).await;
    let took = started.elapsed();
    telemetry::request(route, response.status().as_u16(), took);
    if let Some(app) = app {
        app.latency.record(took);
    }
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

/// The client's `X-Request-Id` if it is a short, printable token, else a
/// generated one.
fn request_id(req: &Request) -> axum::http::HeaderValue {
    req.headers()
        .get(REQUEST_ID)
        .filter(|v| {
            (1..=64).contains(&v.len()) && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(generated_request_id)
}

/// 16 hex digits, written without a `String` in between.
fn generated_request_id() -> axum::http::HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = fastrand::u64(..);
    let mut digits = [0u8; 16];
    for (i, d) in digits.iter_mut().enumerate() {
        *d = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    axum::http::HeaderValue::from_bytes(&digits).expect("hex digits are a valid header value")
}

/// The request-id header, read from clients and set on every response.
pub const REQUEST_ID: &str = "x-request-id";

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

/// `GET /healthz` and `GET /readyz` answers.
#[derive(Serialize, ToSchema)]
pub struct Status {
    /// `ok` (healthz), `ready` or `not_ready` (readyz).
    #[schema(example = "ready")]
    status: &'static str,
    /// readyz when ready: the running topology version.
    #[serde(skip_serializing_if = "Option::is_none")]
    topology_version: Option<u64>,
}

/// Process liveness: answers as long as the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process is alive", body = Status)))]
pub(crate) async fn healthz() -> Json<Status> {
    Json(Status {
        status: "ok",
        topology_version: None,
    })
}

/// Readiness: the topology is loaded, the proxy is not shutting down,
/// (with `durability: wal`) its write-ahead log still takes writes and
/// (with a shared topology store) it has read the store once: a proxy that
/// started while the store was unreachable routes by its file, which may
/// predate promotions and reshards, and is not ready until it has.
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, description = "Ready to serve", body = Status),
    (status = 503, description = "Starting (with a shared store: until the store has been read once) or shutting down", body = Status),
))]
pub(crate) async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.is_ready() {
        Json(Status {
            status: "ready",
            topology_version: Some(app.map.load().version()),
        })
        .into_response()
    } else {
        let body = Status {
            status: "not_ready",
            topology_version: None,
        };
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// When a write is answered (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Ack {
    /// Once validated and merged into memory (the default).
    #[default]
    Buffered,
    /// Once committed on every target group's master.
    Committed,
}

impl Ack {
    fn parse(params: &Params) -> Result<Ack, ApiError> {
        Ok(
            match params.choice("ack", &["buffered", "committed"], "buffered")? {
                "committed" => Ack::Committed,
                _ => Ack::Buffered,
            },
        )
    }
}

/// Query parameters of `POST /v1/events`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documentation only: parsed by `Params`, which refuses unknown names
pub(crate) struct IngestQuery {
    /// `buffered` (default) or `committed`.
    ack: Option<Ack>,
}

/// Query parameters of `POST /v1/counters/{ns}/{key}/incr`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documentation only: parsed by `Params`, which refuses unknown names
pub(crate) struct IncrQuery {
    /// Default 1.
    #[param(minimum = -1_000_000_000, maximum = 1_000_000_000)]
    delta: Option<i64>,
    /// Unix seconds or RFC 3339; default: now.
    #[param(value_type = Option<String>)]
    ts: Option<String>,
    /// `buffered` (default) or `committed`.
    ack: Option<Ack>,
}

/// A successful write.
#[derive(Serialize, ToSchema)]
pub struct Accepted {
    /// Events accepted (all of the request's).
    accepted: usize,
    /// Only when the request's events carry ids (their own or from
    /// `Idempotency-Key`); absent otherwise, so plain writes are answered
    /// as before. With `ack=committed`: how many of the accepted events
    /// were already counted, and so were not counted again. Always 0 with
    /// `ack=buffered` (decided later, when their batch commits; counted in
    /// the metric `tally_duplicate_events_total`).
    #[serde(skip_serializing_if = "Option::is_none")]
    duplicates: Option<usize>,
    ack: Ack,
}

/// Ingest: one event, a JSON array of events, or NDJSON; all or nothing.
#[utoipa::path(post, path = "/v1/events", tag = "ingest",
    params(IngestQuery, ("Idempotency-Key" = Option<String>, Header, description = "1 to 128 bytes of printable ASCII: every event without its own `id` gets the id `<key>/<index in the request>`, so resending the identical request counts nothing twice (within `idempotency.window`, 24 h by default)")),
    request_body(description = "One event, an array of events (at most 10,000 and 8 MiB by default), or NDJSON",
        content(
            (event::EventsBody = "application/json"),
            (String = "application/x-ndjson"),
        )),
    responses(
        (status = 200, description = "Accepted", body = Accepted),
        (status = 400, description = "`invalid_json`, `invalid_event` (with `index`), `ts_out_of_range`, `invalid_param`", body = ErrorBody),
        (status = 408, description = "`body_timeout`: the body arrived slower than `connections.min_body_rate` (after `body_rate_grace`) or was not complete within `connections.body_read_timeout`; the connection is closed", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: too many events or bytes", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 503, description = "`overloaded`: a target group's pending buffer is full, or the listener holds `connections.max_body_bytes_in_flight` bytes of request bodies (retry after `Retry-After` seconds); `unavailable`; `wal_failed` (`durability: wal`): the write-ahead log cannot make writes durable; `store_unreachable` (with a shared topology store): this proxy has not reached the store within its lease and refuses writes until it has read it again (retry after `Retry-After` seconds, or through another proxy)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait (with `overloaded` and `store_unreachable`)"))),
        (status = 504, description = "`commit_timeout` (`ack=committed`): not yet committed; the events stay queued and will be applied", body = ErrorBody),
    ))]
pub(crate) async fn post_events(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Accepted>, ApiError> {
    let result: Result<Json<Accepted>, ApiError> = async {
        let params = Params::parse(query.as_deref(), &["ack"])?;
        let ack = Ack::parse(&params)?;
        let format = body_format(&headers)?;
        let bytes = read_body(body, &headers, app.config.limits.max_body_bytes).await?;
        let mut events =
            event::parse_body(&bytes, format, app.window(), app.config.limits.max_events)?;
        if let Some(key) = idempotency_key(&headers)? {
            event::apply_idempotency_key(&mut events, key);
        }
        let duplicates = ingest::ingest(&app, &events, ack == Ack::Committed).await?;
        Ok(Json(Accepted {
            accepted: events.len(),
            duplicates: events.iter().any(|e| e.id.is_some()).then_some(duplicates),
            ack,
        }))
    }
    .await;
    if let Err(e) = &result {
        telemetry::events_rejected(e.code(), 1);
    }
    result
}

/// Ingest of one event in REST shape; same semantics as `POST /v1/events`.
#[utoipa::path(post, path = "/v1/counters/{ns}/{key}/incr", tag = "ingest",
    params(CounterPathDoc, IncrQuery, ("Idempotency-Key" = Option<String>, Header, description = "1 to 128 bytes of printable ASCII: the event gets the id `<key>/0`, so resending the request counts it once (within `idempotency.window`)")),
    responses(
        (status = 200, description = "Accepted", body = Accepted),
        (status = 400, description = "`invalid_event`, `ts_out_of_range`, `invalid_param`", body = ErrorBody),
        (status = 503, description = "`overloaded` (with `Retry-After`), `unavailable`, `wal_failed`, `store_unreachable` (with `Retry-After`)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait (with `overloaded` and `store_unreachable`)"))),
        (status = 504, description = "`commit_timeout` (`ack=committed`)", body = ErrorBody),
    ))]
pub(crate) async fn post_incr(
    State(app): State<Arc<App>>,
    path: Result<CounterPath, ApiError>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<Accepted>, ApiError> {
    incr(&app, path, query.as_deref(), &headers).await
}

/// `POST /v1/counters/{ns}/{key}/incr`, for the router and the shortcut.
async fn incr(
    app: &App,
    path: Result<CounterPath, ApiError>,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Json<Accepted>, ApiError> {
    let result: Result<Json<Accepted>, ApiError> = async {
        let CounterPath { ns, key } = path?;
        let idempotency_key = idempotency_key(headers)?;
        let params = Params::parse(query, &["delta", "ts", "ack"])?;
        let ack = Ack::parse(&params)?;
        let mut event = [event::single(
            &ns,
            &key,
            params.i64("delta")?,
            params.get("ts"),
            app.window(),
        )?];
        if let Some(k) = idempotency_key {
            event::apply_idempotency_key(&mut event, k);
        }
        let duplicates = ingest::ingest(app, &event, ack == Ack::Committed).await?;
        Ok(Json(Accepted {
            accepted: 1,
            duplicates: idempotency_key.map(|_| duplicates),
            ack,
        }))
    }
    .await;
    if let Err(e) = &result {
        telemetry::events_rejected(e.code(), 1);
    }
    result
}

/// The route of single-event ingest, as the router and the metrics name it.
const INCR_ROUTE: &str = "/v1/counters/{ns}/{key}/incr";

/// The route of a counter's total, as the router and the metrics name it.
const TOTAL_ROUTE: &str = "/v1/counters/{ns}/{key}";

/// Single-event ingest and a counter's total without the router, for the
/// data listener ([`crate::http::serve::Shortcut`]). They are the hottest
/// requests there are (one write, one read), and the router's layers (a
/// boxed service clone and a boxed future each, the path parameters decoded
/// into a map, the matched path stored in the request's extensions) cost
/// about as much CPU as the ingest itself, and as a total served from the
/// read cache.
///
/// It takes only `POST .../incr` and `GET` of a total whose path has plain
/// segments; anything else (percent escapes, extra segments, another
/// method) is not accepted and goes through the router, which decodes
/// escapes and answers 404/405. Both run the same handler ([`incr`],
/// [`read_api::total`]) inside [`tracked`], so answers, metrics and logs are
/// the same.
pub fn counter_shortcut(app: Arc<App>) -> Shortcut {
    Shortcut {
        accepts: |req| plain_counter_path(req).is_some(),
        handle: Arc::new(move |req: Request| {
            let (kind, path) = match plain_counter_path(&req) {
                Some((kind, ns, key)) => (kind, CounterPath::new(ns.to_owned(), key.to_owned())),
                // Not reached: only accepted requests come here.
                None => (
                    Plain::Total,
                    Err(ApiError::NotFound("no such route".into())),
                ),
            };
            let id = request_id(&req);
            // The body is not read (neither request has one that counts,
            // as with the router's handlers); the head's parts are what the
            // future keeps.
            let (parts, _body) = req.into_parts();
            let app = app.clone();
            Box::pin(async move {
                let query = parts.uri.query();
                let (route, handling) = match kind {
                    Plain::Incr => (
                        INCR_ROUTE,
                        Either::Left(async {
                            incr(&app, path, query, &parts.headers)
                                .await
                                .into_response()
                        }),
                    ),
                    Plain::Total => (
                        TOTAL_ROUTE,
                        Either::Right(async {
                            read_api::total(&app, path, query).await.into_response()
                        }),
                    ),
                };
                tracked(Some(&app), route, id, &parts.method, handling).await
            })
        }),
    }
}

/// Which request [`counter_shortcut`] serves.
#[derive(Clone, Copy)]
enum Plain {
    Incr,
    Total,
}

/// What `POST /v1/counters/{ns}/{key}/incr` or `GET /v1/counters/{ns}/{key}`
/// names when `ns` and `key` are plain (non-empty, no `/`, no `%`): then
/// they are exactly what the router would decode.
fn plain_counter_path(req: &Request) -> Option<(Plain, &str, &str)> {
    let rest = req.uri().path().strip_prefix("/v1/counters/")?;
    let (kind, rest) = match (req.method(), rest.strip_suffix("/incr")) {
        (&axum::http::Method::POST, Some(rest)) => (Plain::Incr, rest),
        (&axum::http::Method::GET, _) => (Plain::Total, rest),
        _ => return None,
    };
    let (ns, key) = rest.split_once('/')?;
    let plain = !ns.is_empty() && !key.is_empty() && !key.contains('/') && !rest.contains('%');
    plain.then_some((kind, ns, key))
}

/// The `Idempotency-Key` header, if any: 1 to 128 bytes of printable
/// ASCII (an event's id charset), else 400 `invalid_param`.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if event::valid_id(key) => Ok(Some(key)),
        _ => Err(ApiError::InvalidParam(format!(
            "Idempotency-Key must be 1 to {} bytes of printable ASCII",
            event::MAX_ID_BYTES
        ))),
    }
}

fn body_format(headers: &HeaderMap) -> Result<BodyFormat, ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(BodyFormat::Json);
    };
    let mime = ct
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Ok(BodyFormat::Json),
        "application/x-ndjson" | "application/ndjson" => Ok(BodyFormat::Ndjson),
        other => Err(ApiError::UnsupportedMediaType(format!(
            "content type {other:?} is not accepted; use application/json or application/x-ndjson"
        ))),
    }
}

/// Reads the body, refusing it as soon as it passes `limit` bytes: a
/// declared `Content-Length` over the limit is refused without buffering,
/// and a streamed body is never held beyond the limit. The buffer grows
/// with the bytes that arrive, never ahead of them to the declared length
/// (a client declaring 8 MiB and sending nothing holds [`FIRST_BUFFER`] at
/// most). A body refused while it arrives (too slow, or over the
/// listener's body budget: [`serve::BodyError`]) is answered as such.
///
/// Before answering 413 the rest of a moderately oversized body (up to
/// another `limit` bytes, for at most [`LINGER`]) is read and discarded,
/// like nginx's lingering close: closing a socket with unread input makes
/// the kernel send a reset that can destroy the 413 before the client reads
/// it. Anything larger is cut off at once.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    use futures::StreamExt;
    let too_large =
        || ApiError::PayloadTooLarge(format!("a request body holds at most {limit} bytes"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut stream = body.into_data_stream();
    let mut received = 0usize;
    if declared.is_none_or(|n| n <= limit as u64) {
        let first = declared.map_or(0, |n| n.min(FIRST_BUFFER as u64) as usize);
        let mut buf = bytes::BytesMut::with_capacity(first);
        loop {
            match stream.next().await {
                None => return Ok(buf.freeze()),
                Some(Err(e)) => return Err(unreadable(e)),
                Some(Ok(chunk)) => {
                    received += chunk.len();
                    if received > limit {
                        break;
                    }
                    buf.extend_from_slice(&chunk);
                }
            }
        }
    }
    if declared.is_none_or(|n| n <= 2 * limit as u64) {
        let drain = async {
            while let Some(Ok(chunk)) = stream.next().await {
                received += chunk.len();
                if received > 2 * limit {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }
    Err(too_large())
}

/// The largest buffer a body starts with, whatever its declared length;
/// beyond it the buffer grows (doubling) as bytes arrive.
const FIRST_BUFFER: usize = 64 * 1024;

/// Why a body could not be read: refused by the listener's body rules
/// (408, or 503 over the budget), or broken (the client went away, a bad
/// chunked encoding).
fn unreadable(e: axum::Error) -> ApiError {
    match e.into_inner().downcast::<serve::BodyError>() {
        Ok(refused) => ApiError::from(*refused),
        Err(e) => ApiError::InvalidJson(format!("cannot read the request body: {e}")),
    }
}

/// A whole request body read with [`read_body`] under
/// `limits.max_body_bytes`, for the endpoints that take one JSON document.
/// axum's `Bytes` extractor had no limit on the data listener (the router
/// disables the default one for ingest) and answered its own failures in
/// plain text.
pub struct LimitedBody(pub bytes::Bytes);

impl axum::extract::FromRequest<Arc<App>> for LimitedBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &Arc<App>) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        read_body(body, &parts.headers, app.config.limits.max_body_bytes)
            .await
            .map(LimitedBody)
    }
}

/// How long an oversized body is drained before the 413 (see `read_body`).
const LINGER: Duration = Duration::from_secs(5);
