//! The OpenAPI 3.1 documents of both listeners, served at `GET /openapi.json`.
//!
//! Why a module of its own: the operations are described by `#[utoipa::path]`
//! attributes on the handlers themselves and the bodies by `ToSchema` on the
//! types the handlers serialize (errors go through
//! [`crate::error::ErrorBody`]), so a change to a handler changes the
//! document with it. What is left is assembling two documents from those
//! parts, which would only clutter the router modules.
//!
//! Each listener serves the document of what *it* serves: the data listener
//! the data plane, the admin listener `/metrics` and `/admin/v1`. A client
//! or tool pointed at a listener (schemathesis in `.ci/schemathesis`, a
//! generated SDK) can then exercise every operation it reads there; one
//! combined document would list admin routes that answer 404 on the data
//! port and vice versa. Both documents are public: they describe the API,
//! not its data (the admin one is as open as `/metrics`).
//!
//! `integration/tests/openapi.rs` checks that every route of both routers
//! is in its document and that nothing else is.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use tally_admin::topology::LastReshard;

use crate::domain::event::Timestamp;
use crate::http::{admin_api, api, quarantine_api, read_api};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tally data plane",
        description = "Counter ingest and reads (README.md, \"Using it\"). Every error is \
                       `{\"error\": {\"code\", \"message\", \"index\"?}}`; every response \
                       carries `X-Request-Id` (the client's or a generated one)."
    ),
    paths(
        api::healthz,
        api::readyz,
        api::post_events,
        api::post_incr,
        read_api::get_total,
        read_api::get_count,
        read_api::get_series,
        read_api::post_query,
        read_api::get_top,
        data_plane_json,
    ),
    // Types referenced only by query parameters are not collected from the
    // operations; `every_reference_resolves` catches a missing one.
    components(schemas(api::Ack, read_api::Consistency, read_api::Step, Timestamp)),
    tags(
        (name = "ingest", description = "Counter increments"),
        (name = "read", description = "Totals, ranges, series, top keys"),
        (name = "health", description = "Liveness and readiness"),
        (name = "meta", description = "This document"),
    )
)]
struct DataPlaneDoc;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tally admin",
        description = "Operator API (README.md, \"Using it\"; docs/operations.md). Everything under `/admin/v1` needs \
                       `Authorization: Bearer <token>` (401 `unauthorized` otherwise); \
                       `/metrics` and `/openapi.json` are open."
    ),
    paths(
        admin_api::get_metrics,
        admin_json,
        admin_api::get_topology,
        admin_api::put_topology,
        admin_api::post_reload,
        admin_api::get_route,
        admin_api::post_route,
        admin_api::get_health,
        admin_api::post_flush,
        admin_api::get_proxies,
        admin_api::post_promote,
        admin_api::post_reshard,
        admin_api::get_reshard,
        admin_api::post_reshard_cancel,
        quarantine_api::get_quarantine,
        quarantine_api::post_reapply,
    ),
    // Named by `GET /admin/v1/reshard`'s description (its `last`).
    components(schemas(LastReshard)),
    modifiers(&BearerAuth, &BrowserRefusal),
    tags(
        (name = "topology", description = "The shard map and routing"),
        (name = "operations", description = "Health, flush, proxies, failover"),
        (name = "metrics", description = "Prometheus scrape endpoint"),
        (name = "meta", description = "This document"),
    )
)]
struct AdminDoc;

/// Declares the `bearer` scheme that the `/admin/v1` operations require.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The admin token (env var named by `admin.token_env`, default \
                         `TALLY_ADMIN_TOKEN`), compared in constant time",
                    ))
                    .build(),
            ),
        );
    }
}

/// Documents the 403 `forbidden_origin` of every `/admin/v1` operation
/// (the `refuse_browsers` middleware of the admin router), in one place so
/// that a new operation cannot miss it.
struct BrowserRefusal;

impl Modify for BrowserRefusal {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder, schema::Ref};
        let refusal = ResponseBuilder::new()
            .description(
                "`forbidden_origin`: a browser marked the request as a web page's \
                 (`Origin`, `Sec-Fetch-Site: cross-site` or `same-site`); the admin \
                 API serves tools only",
            )
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build();
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/admin/v1/") {
                continue;
            }
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in operations.into_iter().flatten() {
                op.responses
                    .responses
                    .insert("403".into(), RefOr::T(refusal.clone()));
            }
        }
    }
}

/// The data-plane document.
pub fn data_plane() -> utoipa::openapi::OpenApi {
    DataPlaneDoc::openapi()
}

/// The admin document.
pub fn admin() -> utoipa::openapi::OpenApi {
    AdminDoc::openapi()
}

// Rendered once: the documents are fixed at build time.
static DATA_PLANE_JSON: LazyLock<String> = LazyLock::new(|| render(data_plane()));
static ADMIN_JSON: LazyLock<String> = LazyLock::new(|| render(admin()));

fn render(doc: utoipa::openapi::OpenApi) -> String {
    // Serializing a tree of strings, maps and numbers cannot fail; should it
    // ever, a readable error body beats a panic in a request.
    doc.to_pretty_json().unwrap_or_else(|e| {
        serde_json::json!({ "error": { "code": "internal", "message": e.to_string() } }).to_string()
    })
}

fn json(body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// This listener's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of the data listener", body = serde_json::Value)))]
pub(crate) async fn data_plane_json() -> Response {
    json(DATA_PLANE_JSON.as_str())
}

/// This listener's OpenAPI 3.1 document; no token needed.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of the admin listener", body = serde_json::Value)))]
pub(crate) async fn admin_json() -> Response {
    json(ADMIN_JSON.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn refs<'v>(v: &'v Value, out: &mut Vec<&'v str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r);
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    /// Every `$ref` points at a schema the document defines: a type named
    /// in an annotation but not reachable would leave clients a dangling
    /// reference.
    #[test]
    fn every_reference_resolves() {
        for (name, doc) in [("data plane", data_plane()), ("admin", admin())] {
            let v = serde_json::to_value(doc).expect("serializable");
            assert_eq!(v["openapi"], "3.1.0", "{name}");
            let mut found = Vec::new();
            refs(&v, &mut found);
            assert!(!found.is_empty(), "{name}: no schema references at all");
            for r in found {
                let schema = r
                    .strip_prefix("#/components/schemas/")
                    .unwrap_or_else(|| panic!("{name}: unexpected reference {r}"));
                assert!(
                    v["components"]["schemas"].get(schema).is_some(),
                    "{name}: {r} is not defined"
                );
            }
        }
    }

    /// How the last reshard ended is documented as part of the topology
    /// and as the `last` of `GET /admin/v1/reshard` (issue #19 item 6).
    #[test]
    fn the_reshard_outcome_is_documented() {
        let v = serde_json::to_value(admin()).expect("serializable");
        let schemas = &v["components"]["schemas"];
        assert!(schemas["LastReshard"]["properties"]["state"].is_object());
        assert!(schemas["TopologyDoc"]["properties"]["last_reshard"].is_object());
        assert_eq!(
            schemas["Outcome"]["enum"],
            serde_json::json!(["done", "cancelled", "failed"]),
            "{}",
            schemas["Outcome"]
        );
        let get = &v["paths"]["/admin/v1/reshard"]["get"]["responses"]["200"]["description"];
        assert!(
            get.as_str().is_some_and(|d| d.contains("`progress`")),
            "{get}"
        );
    }

    /// The admin routes require the bearer scheme and refuse browsers;
    /// the open ones do neither.
    #[test]
    fn admin_operations_require_the_bearer_token() {
        let v = serde_json::to_value(admin()).expect("serializable");
        assert_eq!(
            v["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        let paths = v["paths"].as_object().expect("paths");
        for (path, ops) in paths {
            for (method, op) in ops.as_object().expect("operations") {
                let secured = op["security"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
                assert_eq!(
                    secured,
                    path.starts_with("/admin/v1/"),
                    "{method} {path}: security {}",
                    op["security"]
                );
                if secured {
                    assert!(
                        op["responses"].get("401").is_some(),
                        "{method} {path} documents no 401"
                    );
                    let refusal = &op["responses"]["403"];
                    assert!(
                        refusal["description"]
                            .as_str()
                            .is_some_and(|d| d.contains("forbidden_origin")),
                        "{method} {path} documents no 403 forbidden_origin: {refusal}"
                    );
                } else {
                    assert!(
                        op["responses"].get("403").is_none(),
                        "{method} {path} is open"
                    );
                }
            }
        }
    }

    /// Every error answer documented uses the one error body.
    #[test]
    fn error_responses_use_the_error_body() {
        for doc in [data_plane(), admin()] {
            let v = serde_json::to_value(doc).expect("serializable");
            for (path, ops) in v["paths"].as_object().expect("paths") {
                for (method, op) in ops.as_object().expect("operations") {
                    for (status, resp) in op["responses"].as_object().expect("responses") {
                        if status.starts_with('4') || status.starts_with('5') {
                            let schema = &resp["content"]["application/json"]["schema"]["$ref"];
                            let expected = if path == "/readyz" {
                                "#/components/schemas/Status"
                            } else {
                                "#/components/schemas/ErrorBody"
                            };
                            assert_eq!(schema, expected, "{method} {path} {status}");
                        }
                    }
                }
            }
        }
    }
}
