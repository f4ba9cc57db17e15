//! Metrics as Prometheus expects them: right after a proxy starts, before
//! any traffic, `/metrics` already holds every metric the shipped
//! dashboard (`ops/grafana/tally.json`) and alert rules
//! (`ops/prometheus/alerts.yml`) reference, at 0 for counters, so `rate`
//! and `increase` count the first event and no alert starts on "no data";
//! plus the `process_*` metrics, the open connections and the configured
//! bounds.
//!
//! Its own test binary on purpose: in-process proxies share the one global
//! metrics recorder, so a proxy that served traffic in the same process
//! would have created series this test must see created by the start.

use std::collections::BTreeSet;

use tally_harness::{Cluster, ClusterSpec};
use tally_integration::TestProxy;
use tally_integration::exposition::{exported, metric_names};

const DASHBOARD: &str = include_str!("../../ops/grafana/tally.json");
const ALERTS: &str = include_str!("../../ops/prometheus/alerts.yml");

/// The value of the sample `series` (name and labels exactly as rendered).
fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_referenced_metric_is_exported_from_the_start() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 1,
        ..Default::default()
    })
    .await
    .expect("cluster");
    // Without a write-ahead log, like `cargo dev` by default: the WAL
    // panel's and alert's series must be there all the same (at 0).
    let proxy = TestProxy::start(&cluster, |c| {
        c.buffer.max_pending_rows = 123_456;
        c.connections.max_per_listener = 321;
        c.wal = None;
    })
    .await;
    // The only requests so far are `TestProxy::start`'s `GET /readyz`
    // polls (as a load balancer's): no write, no read, no admin call.
    let text = proxy.metrics().await;
    let exported = exported(&text);

    let referenced: BTreeSet<String> = metric_names(DASHBOARD, &["tally_", "process_"])
        .union(&metric_names(ALERTS, &["tally_", "process_"]))
        .cloned()
        .collect();
    assert!(referenced.len() > 40, "only {referenced:?}");
    let missing: Vec<&String> = referenced.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "referenced but not exported before any traffic: {missing:?}\n--- scrape ---\n{text}"
    );

    // Counters the alerts take `rate`/`increase` of start at 0, for every
    // group of the topology and every listener.
    for series in [
        "tally_events_rejected_total{reason=\"overloaded\"}",
        "tally_wal_failures_total",
        "tally_flush_errors_total{group=\"g0\"}",
        "tally_flush_batches_total{group=\"g0\"}",
        "tally_retention_errors_total{group=\"g0\"}",
        "tally_quarantined_deltas_total{group=\"g0\"}",
        "tally_promotions_total{group=\"g0\",mode=\"emergency\"}",
        "tally_connections_refused_total{listener=\"http\"}",
        "tally_connections_timed_out_total{listener=\"admin\",reason=\"header_read\"}",
        "tally_http_request_duration_seconds_count{route=\"/v1/events\",status=\"5xx\"}",
        "tally_wal_failed",
        "tally_store_fenced",
    ] {
        assert_eq!(value(&text, series), Some(0.0), "{series}\n{text}");
    }
    // Gauges: ready, the configured bounds, open connections.
    assert_eq!(value(&text, "tally_ready"), Some(1.0), "{text}");
    assert_eq!(
        value(&text, "tally_config_max_pending_rows"),
        Some(123_456.0)
    );
    assert_eq!(
        value(&text, "tally_config_wal_max_bytes"),
        Some(0.0),
        "no log, no bound"
    );
    assert_eq!(
        value(&text, "tally_config_max_connections{listener=\"http\"}"),
        Some(321.0)
    );
    assert_eq!(
        value(&text, "tally_config_commit_timeout_seconds"),
        Some(10.0)
    );
    // The scrape's own connection is open while it is rendered.
    let open = value(&text, "tally_connections_open{listener=\"admin\"}");
    assert!(open.is_some_and(|n| n >= 1.0), "{open:?}\n{text}");
    assert!(value(&text, "tally_connections_open{listener=\"http\"}").is_some());
    // The process: plausible values from /proc/self.
    let rss = value(&text, "process_resident_memory_bytes").expect("rss");
    assert!(rss > 1e6, "{rss}");
    let fds = value(&text, "process_open_fds").expect("open fds");
    let max_fds = value(&text, "process_max_fds").expect("max fds");
    assert!(fds > 3.0 && fds <= max_fds, "{fds} of {max_fds}");
    let start = value(&text, "process_start_time_seconds").expect("start time");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        start <= now + 1.0 && start > now - 3600.0,
        "{start} vs {now}"
    );
    assert!(value(&text, "process_cpu_seconds_total").is_some_and(|c| c >= 0.0));

    proxy.stop().await.expect("clean stop");
    cluster.shutdown().await;
}
