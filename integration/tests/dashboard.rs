//! The shipped Grafana dashboard (`ops/grafana/tally.json`) and Prometheus
//! alert rules (`ops/prometheus/alerts.yml`) against a real proxy (with a
//! write-ahead log): traffic, one scrape of `/metrics`, and no `tally_*`
//! name in either file that the proxy does not export. (That every one is
//! exported already before any traffic is `tests/metrics.rs`.) Also: the
//! dashboard's datasource input, the alerts' annotations and runbook
//! sections, the `route` label of a 401 (which the auth alert relies on),
//! and every metric of `proxy/src/telemetry.rs` shown on the dashboard.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tally_harness::{Cluster, ClusterSpec};
use tally_integration::exposition::{self, exported};
use tally_integration::{Client, TEST_TOKEN, TestProxy};

const DASHBOARD: &str = include_str!("../../ops/grafana/tally.json");
const ALERTS: &str = include_str!("../../ops/prometheus/alerts.yml");
const RUNBOOK: &str = include_str!("../../docs/operations.md");
const SYSTEMD_UNIT: &str = include_str!("../../ops/systemd/tally-proxy.service");
/// Read as text: every metric name the proxy can ever export is a string
/// literal in this file (its module promises so).
const TELEMETRY: &str = include_str!("../../proxy/src/telemetry.rs");

/// Every `tally_…` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    exposition::metric_names(text, &["tally_"])
}

/// Metric names that `proxy/src/telemetry.rs` uses as string literals.
fn declared() -> BTreeSet<String> {
    metric_names(TELEMETRY)
        .into_iter()
        .filter(|n| TELEMETRY.contains(&format!("\"{n}\"")))
        .collect()
}

fn expect_status(what: &str, got: (u16, Value), want: u16) {
    assert_eq!(got.0, want, "{what}: {}", got.1);
}

/// Writes (accepted and rejected), a flush, eventual reads on the replica
/// and on the master (replication stopped: a fallback), strong reads, and
/// admin requests without a token.
async fn drive_traffic(client: &Client, proxy: &TestProxy, cluster: &Cluster) {
    let events = json!([{"ns": "dash", "key": "a", "delta": 3}, {"ns": "dash", "key": "b"}]);
    let r = client.post_json(&proxy.url("/v1/events"), &events).await;
    expect_status("batch write", r.expect("post"), 200);
    let r = client
        .post_body(
            &proxy.url("/v1/counters/dash/a/incr?delta=2"),
            "application/json",
            Vec::new(),
        )
        .await;
    expect_status("incr", r.expect("incr"), 200);
    let typo = json!({"ns": "dash", "key": "a", "detla": 1});
    let r = client.post_json(&proxy.url("/v1/events"), &typo).await;
    expect_status("rejected write", r.expect("post"), 400);
    let r = client
        .admin_post(&proxy.admin_url("/admin/v1/flush"), TEST_TOKEN)
        .await;
    expect_status("flush", r.expect("flush"), 200);
    cluster
        .wait_replicas_caught_up()
        .await
        .expect("replica caught up");

    // Eventual reads on the replica, once a health probe found it eligible.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body, headers) = client
            .get_with_headers(&proxy.url("/v1/counters/dash/a"))
            .await
            .expect("eventual read");
        assert_eq!(status, 200, "{body}");
        if headers.get("x-tally-node").and_then(|v| v.to_str().ok()) == Some("replica") {
            assert_eq!(body["total"], json!(5), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "no read served by the replica");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = client
        .get(&proxy.url("/v1/counters/dash/a/count?from=0&to=4000000000"))
        .await;
    expect_status("eventual count", r.expect("count"), 200);
    let r = client
        .get(&proxy.url("/v1/counters/dash/b?consistency=strong"))
        .await;
    expect_status("strong read", r.expect("strong"), 200);
    let r = client
        .get(&proxy.url("/v1/top/dash?consistency=strong"))
        .await;
    expect_status("strong top", r.expect("top"), 200);

    // Replication stopped: the replica is ineligible, eventual reads fall
    // back to the master (`tally_read_fallbacks_total`, lag -1).
    let replica = &cluster.group(0).replicas[0];
    replica.stop_replication().await.expect("stop replication");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body, headers) = client
            .get_with_headers(&proxy.url("/v1/counters/dash/a"))
            .await
            .expect("eventual read");
        assert_eq!(status, 200, "{body}");
        if headers.get("x-tally-node").and_then(|v| v.to_str().ok()) == Some("master") {
            break;
        }
        assert!(Instant::now() < deadline, "no fallback to the master");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    replica
        .start_replication()
        .await
        .expect("start replication");

    // Admin requests without the token.
    let r = client
        .admin_post(&proxy.admin_url("/admin/v1/flush"), "wrong")
        .await;
    expect_status("flush with a wrong token", r.expect("flush"), 401);
    let r = client.get(&proxy.admin_url("/admin/v1/topology")).await;
    expect_status("topology without a token", r.expect("topology"), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_reference_only_exported_metrics() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 1,
        ..Default::default()
    })
    .await
    .expect("cluster");
    // The WAL's series exist only with `durability: wal`.
    let wal_dir = tempfile::tempdir().expect("tempdir");
    let proxy = TestProxy::start(&cluster, |c| {
        c.retention.interval = Duration::from_millis(200);
        c.rollup.interval = Duration::from_millis(200);
        c.wal = Some(tally_proxy::config::WalConfig {
            dir: wal_dir.path().join("wal"),
            segment_bytes: 1 << 20,
            max_bytes: 64 << 20,
            replay_wait: Duration::from_secs(1),
        });
    })
    .await;
    let client = Client::new();
    drive_traffic(&client, &proxy, &cluster).await;

    let dashboard_names = metric_names(DASHBOARD);
    let alert_names = metric_names(ALERTS);
    let referenced: BTreeSet<String> = dashboard_names.union(&alert_names).cloned().collect();
    let declared = declared();

    // Series appear asynchronously (health probes): scrape until every
    // reference is there.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (text, exported) = loop {
        let text = proxy.metrics().await;
        let exported = exported(&text);
        let waiting = referenced.iter().any(|n| !exported.contains(n));
        if !waiting || Instant::now() > deadline {
            break (text, exported);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    for (file, names) in [
        ("ops/grafana/tally.json", &dashboard_names),
        ("ops/prometheus/alerts.yml", &alert_names),
    ] {
        let unknown: Vec<&String> = names.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{file} references metrics the proxy does not export: {unknown:?}\n--- scrape ---\n{text}"
        );
    }

    // The 401 of the token middleware is labelled with the matched route
    // template, which TallyAdminAuthFailures selects with route=~"/admin/.*".
    for route in ["/admin/v1/flush", "/admin/v1/topology"] {
        assert!(
            text.lines().any(|l| {
                l.starts_with("tally_http_request_duration_seconds_count{")
                    && l.contains(&format!("route=\"{route}\""))
                    && l.contains("status=\"4xx\"")
            }),
            "no 4xx series for {route}:\n{text}"
        );
    }

    // Every metric the proxy declares is on the dashboard.
    let missing: Vec<&String> = declared.difference(&dashboard_names).collect();
    assert!(
        missing.is_empty(),
        "metrics of proxy/src/telemetry.rs missing from the dashboard: {missing:?}"
    );

    proxy.stop().await.expect("clean stop");
    cluster.shutdown().await;
}

/// Every panel queries the `${DS_PROMETHEUS}` input; no panel is empty.
#[test]
fn dashboard_uses_the_datasource_input() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("dashboard is JSON");
    assert_eq!(dashboard["__inputs"][0]["name"], json!("DS_PROMETHEUS"));
    assert_eq!(dashboard["__inputs"][0]["pluginId"], json!("prometheus"));
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queries = 0;
    for panel in panels.iter().filter(|p| p["type"] != json!("row")) {
        let title = panel["title"].as_str().expect("a title");
        assert_eq!(
            panel["datasource"]["uid"],
            json!("${DS_PROMETHEUS}"),
            "{title}"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets {
            assert_eq!(
                target["datasource"]["uid"],
                json!("${DS_PROMETHEUS}"),
                "{title}"
            );
            let expr = target["expr"].as_str().unwrap_or("");
            assert!(
                expr.contains("tally_") || expr.contains("up{") || expr.contains("process_"),
                "{title}: {expr}"
            );
            queries += 1;
        }
        assert!(panel["gridPos"]["w"].as_u64().is_some(), "{title}");
    }
    assert!(queries >= 20, "only {queries} queries");
}

/// Every alert has a summary, a description and a runbook link to a
/// section of docs/operations.md named after it.
#[test]
fn alerts_have_annotations_and_runbook_sections() {
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(ALERTS).expect("alerts are YAML");
    let rules = doc["groups"][0]["rules"].as_sequence().expect("rules");
    assert!(rules.len() >= 8, "only {} rules", rules.len());
    for rule in rules {
        let name = rule["alert"].as_str().expect("alert name");
        assert!(rule["expr"].as_str().is_some(), "{name}: no expr");
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.trim().is_empty()),
                "{name}: no {key} annotation"
            );
        }
        let runbook = rule["annotations"]["runbook_url"].as_str().unwrap_or("");
        assert_eq!(
            runbook,
            format!("docs/operations.md#{}", name.to_lowercase()),
            "{name}"
        );
        assert!(
            RUNBOOK.lines().any(|l| l.trim() == format!("### {name}")),
            "docs/operations.md has no section `### {name}`"
        );
    }
}

/// The code blocks of docs/operations.md in a given language, in order.
fn code_blocks<'a>(doc: &'a str, lang: &str) -> Vec<&'a str> {
    let fence = format!("```{lang}\n");
    let mut blocks = Vec::new();
    let mut rest = doc;
    while let Some(start) = rest.find(&fence) {
        let body = &rest[start + fence.len()..];
        let end = body.find("```").expect("closed code block");
        blocks.push(&body[..end]);
        rest = &body[end..];
    }
    blocks
}

/// The runbook's sample proxy.yaml and topology file are accepted by the
/// proxy's own parsers (a copied sample must not fail at 3 a.m.).
#[test]
fn runbook_samples_are_valid() {
    let yaml = code_blocks(RUNBOOK, "yaml");
    let proxy = yaml
        .iter()
        .find(|b| b.starts_with("# /etc/tally/proxy.yaml"))
        .expect("a sample proxy.yaml");
    if let Err(e) = tally_proxy::ProxyConfig::from_yaml(proxy, std::iter::empty()) {
        panic!("sample proxy.yaml: {e}");
    }
    let topology = yaml
        .iter()
        .find(|b| b.starts_with("# /var/lib/tally/topology.yaml"))
        .expect("a sample topology file");
    if let Err(e) = tally_admin::TopologyDoc::parse_and_validate(topology) {
        panic!("sample topology: {e}");
    }
    // The systemd unit moved out of the runbook into its own file, which
    // the runbook points to.
    assert!(
        RUNBOOK.contains("ops/systemd/tally-proxy.service"),
        "the runbook does not point to the systemd unit"
    );
    assert!(
        SYSTEMD_UNIT.contains("EnvironmentFile=")
            && SYSTEMD_UNIT.contains("ExecReload=/bin/kill -HUP $MAINPID"),
        "no systemd unit"
    );
}
