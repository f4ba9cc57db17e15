//! Faults on the write path against real MariaDB: a COMMIT whose answer is
//! lost, a connection cut mid-transaction, and a dead master that must not
//! block other groups and must lose nothing once it is back.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tally_harness::{Cluster, ClusterSpec, FaultRelay};
use tally_integration::{Client, TEST_TOKEN, TestProxy, routing, stored};

fn one_group_via(relay: &FaultRelay) -> String {
    format!(
        "version: 1\nvnodes: 160\ngroups:\n  - name: g0\n    master: mysql://root@{}/tally\n",
        relay.addr()
    )
}

async fn total(node: &tally_harness::Node, ns: &str, key: &str) -> i64 {
    stored::rows(node, "counter_total", ns)
        .await
        .get(&(key.as_bytes().to_vec(), 0))
        .map_or(0, |(c, _)| *c)
}

fn batch(ns: &str, keys: usize, delta: i64) -> Value {
    Value::Array(
        (0..keys)
            .map(|i| json!({ "ns": ns, "key": format!("k{i}"), "delta": delta }))
            .collect(),
    )
}

/// The relay forwards COMMIT to the server and then cuts the connection,
/// so the proxy cannot know whether the batch was applied. The retry with
/// the same (writer_id, seq) must find the dedup row and apply nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_applied_exactly_once() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let master = &cluster.group(0).master;
    let relay = FaultRelay::start(master.addr()).await.expect("relay");
    // The relay holds a pattern-cut connection until the server's reply was
    // swallowed (up to 10 s), so give committed acks more than that.
    let proxy = TestProxy::start_with_topology(&one_group_via(&relay), |c| {
        c.buffer.commit_timeout = Duration::from_secs(30);
    })
    .await;
    let client = Client::new();

    relay.cut_on_pattern_once(b"COMMIT".to_vec());
    let (status, body) = client
        .post_json(
            &proxy.url("/v1/events?ack=committed"),
            &batch("ambig", 50, 3),
        )
        .await
        .expect("post");
    assert_eq!(
        status, 200,
        "committed ack must survive an ambiguous commit: {body}"
    );
    assert_eq!(relay.stats().pattern_cuts, 1, "the fault must have fired");
    for i in 0..50 {
        assert_eq!(
            total(master, "ambig", &format!("k{i}")).await,
            3,
            "k{i} applied once"
        );
    }
    let dedup = master
        .sql("SELECT COUNT(*) FROM tally.applied_batches")
        .await
        .expect("dedup rows");
    let batches: i64 = dedup[0].get(0).expect("count");
    assert!(batches >= 1);
    let metrics = client
        .get(&proxy.admin_url("/metrics"))
        .await
        .expect("metrics")
        .1;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics.lines().any(
            |l| l.starts_with("tally_flush_duplicates_total{group=\"g0\"}") && !l.ends_with(" 0")
        ),
        "the retry must have been recognised as a duplicate:\n{metrics}"
    );

    // A cut before COMMIT (while the hour rows are being prepared) rolls the
    // transaction back; the retry applies it, once.
    relay.cut_on_pattern_once(b"counter_hour".to_vec());
    let (status, body) = client
        .post_json(
            &proxy.url("/v1/events?ack=committed"),
            &batch("rolled", 20, 5),
        )
        .await
        .expect("post");
    assert_eq!(status, 200, "{body}");
    assert_eq!(relay.stats().pattern_cuts, 2);
    for i in 0..20 {
        assert_eq!(total(master, "rolled", &format!("k{i}")).await, 5);
    }
    proxy.stop().await.expect("clean stop");
}

/// g0's master is killed: committed writes to g1 keep succeeding, g0 writes
/// are accepted until g0's bound and then refused with 503 + Retry-After,
/// without touching g1. When g0's master returns, every accepted delta is
/// applied exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_master_blocks_only_its_group_and_loses_nothing() {
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let topo = cluster.topology_yaml(160);
    let proxy = TestProxy::start(&cluster, |c| {
        c.buffer.max_pending_rows = 40;
        c.buffer.flush_rows = 30;
        c.buffer.commit_timeout = Duration::from_secs(5);
    })
    .await;
    let client = Client::new();
    let g0_keys = routing::keys_on(&topo, "iso", "a", "g0", 60);
    let g1_keys = routing::keys_on(&topo, "iso", "b", "g1", 5);

    cluster.group(0).master.kill9();

    // g0 takes buffered writes until its bound, then 503s.
    let mut accepted = Vec::new();
    let mut refused = 0;
    for key in &g0_keys {
        let resp = client
            .raw()
            .post(proxy.url(&format!("/v1/counters/iso/{key}/incr?delta=2")))
            .send()
            .await
            .expect("incr");
        match resp.status().as_u16() {
            200 => accepted.push(key.clone()),
            503 => {
                assert!(
                    resp.headers().contains_key("retry-after"),
                    "503 without Retry-After"
                );
                let body: Value = resp.json().await.expect("json");
                assert_eq!(body["error"]["code"], "overloaded");
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(accepted.len(), 40, "exactly the bound is accepted");
    assert_eq!(refused, 20);

    // g1 is unaffected: committed writes succeed well within commit_timeout.
    for key in &g1_keys {
        let started = Instant::now();
        let (status, body) = client
            .post_json(
                &proxy.url("/v1/events?ack=committed"),
                &json!({ "ns": "iso", "key": key, "delta": 7 }),
            )
            .await
            .expect("post g1");
        assert_eq!(status, 200, "g1 write failed while g0 is down: {body}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // A request touching both groups is refused as a whole (all or nothing).
    let (status, _) = client
        .post_json(
            &proxy.url("/v1/events"),
            &json!([{ "ns": "iso", "key": g1_keys[0], "delta": 1000 }, { "ns": "iso", "key": g0_keys[59], "delta": 1000 }]),
        )
        .await
        .expect("post mixed");
    assert_eq!(status, 503);

    // Flush cannot complete while g0 is down; it names g0 only.
    let (status, body) = client
        .admin_post(&proxy.admin_url("/admin/v1/flush"), TEST_TOKEN)
        .await
        .expect("flush");
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("g0") && !message.contains("g1"), "{body}");

    cluster
        .group(0)
        .master
        .start()
        .await
        .expect("restart g0 master");
    let (status, body) = client
        .admin_post(&proxy.admin_url("/admin/v1/flush"), TEST_TOKEN)
        .await
        .expect("flush");
    assert_eq!(status, 200, "{body}");

    for key in &accepted {
        assert_eq!(
            total(&cluster.group(0).master, "iso", key).await,
            2,
            "{key}"
        );
    }
    for key in g0_keys.iter().filter(|k| !accepted.contains(k)) {
        assert_eq!(
            total(&cluster.group(0).master, "iso", key).await,
            0,
            "refused {key} must not count"
        );
    }
    for key in &g1_keys {
        assert_eq!(
            total(&cluster.group(1).master, "iso", key).await,
            7,
            "{key}"
        );
    }
    proxy.stop().await.expect("clean stop");
}
