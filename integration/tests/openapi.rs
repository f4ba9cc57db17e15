//! The OpenAPI documents against the routers that really serve: each
//! listener's `GET /openapi.json` is OpenAPI 3.1, lists exactly the routes
//! that listener serves (no more, no fewer), and every operation it lists
//! reaches a handler on that listener.
//!
//! `.ci/schemathesis` fuzzes the operations against these documents; this
//! test makes sure the documents cover the routers in the first place.

use std::collections::BTreeSet;

use serde_json::Value;
use tally_harness::{Cluster, ClusterSpec};
use tally_integration::{Client, TEST_TOKEN, TestProxy};

/// Every route of the data-plane router (`proxy/src/api.rs`).
const DATA_PLANE: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/openapi.json"),
    ("post", "/v1/events"),
    ("post", "/v1/counters/{ns}/{key}/incr"),
    ("get", "/v1/counters/{ns}/{key}"),
    ("get", "/v1/counters/{ns}/{key}/count"),
    ("get", "/v1/counters/{ns}/{key}/series"),
    ("post", "/v1/counters/query"),
    ("get", "/v1/top/{ns}"),
];

/// Every route of the admin router (`proxy/src/admin_api.rs`).
const ADMIN: &[(&str, &str)] = &[
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/admin/v1/topology"),
    ("put", "/admin/v1/topology"),
    ("post", "/admin/v1/reload"),
    ("get", "/admin/v1/route"),
    ("post", "/admin/v1/route"),
    ("post", "/admin/v1/flush"),
    ("get", "/admin/v1/health"),
    ("get", "/admin/v1/proxies"),
    ("post", "/admin/v1/groups/{group}/promote"),
    ("post", "/admin/v1/reshard"),
    ("get", "/admin/v1/reshard"),
    ("post", "/admin/v1/reshard/cancel"),
    ("get", "/admin/v1/quarantine"),
    ("post", "/admin/v1/quarantine/reapply"),
];

const METHODS: &[&str] = &["get", "put", "post", "delete", "patch", "head", "options"];

/// `(method, path)` of every operation in `doc`.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths object");
    paths
        .iter()
        .flat_map(|(path, item)| {
            let item = item.as_object().expect("path item object");
            item.keys()
                .filter(|k| METHODS.contains(&k.as_str()))
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect()
}

fn expected(routes: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    routes
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect()
}

/// Fetches `url` without any token and checks it is an OpenAPI 3.1 JSON
/// document.
async fn fetch_doc(client: &Client, url: &str) -> Value {
    let resp = client
        .raw()
        .get(url)
        .send()
        .await
        .expect("GET openapi.json");
    assert_eq!(resp.status(), 200, "{url} (no token)");
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(
        ct.starts_with("application/json"),
        "{url}: content-type {ct}"
    );
    let doc: Value = resp.json().await.expect("JSON document");
    let version = doc["openapi"].as_str().unwrap_or("");
    assert!(version.starts_with("3.1."), "{url}: openapi {version:?}");
    assert!(doc["info"]["title"].is_string(), "{url}: no info.title");
    doc
}

/// Sends `method path` (path parameters filled in) and asserts that a
/// handler answered: not the router's fallback 404 and not a 405.
async fn assert_routed(client: &Client, base: &str, method: &str, path: &str, token: Option<&str>) {
    let concrete = path
        .replace("{ns}", "views")
        .replace("{key}", "k")
        .replace("{group}", "no-such-group");
    let mut req = client.raw().request(
        method.to_uppercase().parse().expect("method"),
        format!("{base}{concrete}"),
    );
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let fallback = status == 404 && body["error"]["message"] == "no such route";
    assert!(
        !fallback && status != 405,
        "{method} {path} is documented but not routed on {base}: {status} {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_listeners_document_exactly_the_routes_they_serve() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        groups: 1,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let proxy = TestProxy::start(&cluster, |_| {}).await;
    let client = Client::new();

    let data = fetch_doc(&client, &proxy.url("/openapi.json")).await;
    assert_eq!(
        operations(&data),
        expected(DATA_PLANE),
        "data-plane document"
    );
    let admin = fetch_doc(&client, &proxy.admin_url("/openapi.json")).await;
    assert_eq!(operations(&admin), expected(ADMIN), "admin document");

    // Documented means served, on that listener.
    let base = format!("http://{}", proxy.http);
    for (method, path) in operations(&data) {
        assert_routed(&client, &base, &method, &path, None).await;
    }
    let base = format!("http://{}", proxy.admin);
    for (method, path) in operations(&admin) {
        assert_routed(&client, &base, &method, &path, Some(TEST_TOKEN)).await;
    }

    // The admin document declares the bearer scheme and every /admin/v1
    // operation requires it.
    assert_eq!(
        admin["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    for (method, path) in operations(&admin) {
        let security = &admin["paths"][&path][&method]["security"];
        let needs_token = security
            .as_array()
            .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
        assert_eq!(
            needs_token,
            path.starts_with("/admin/v1/"),
            "{method} {path}: security {security}"
        );
    }
    // The error body is documented once and used by the data plane too.
    assert!(
        data["components"]["schemas"]["ErrorBody"].is_object(),
        "no ErrorBody schema"
    );
    assert_eq!(
        data["paths"]["/v1/events"]["post"]["responses"]["413"]["content"]["application/json"]["schema"]
            ["$ref"],
        "#/components/schemas/ErrorBody"
    );
    proxy.stop().await.expect("clean stop");
}
