//! Replica promotion against real MariaDB with semi-sync replication:
//! planned switchover and crash failover under committed load lose nothing
//! acknowledged and count nothing twice; a lagging candidate is refused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tally_harness::{Cluster, ClusterSpec, Node};
use tally_integration::load::{CommittedLoad, LoadReport};
use tally_integration::{Client, TEST_TOKEN, TestProxy, stored};

async fn promote(
    client: &Client,
    proxy: &TestProxy,
    group: &str,
    replica: &Node,
    force: bool,
) -> (u16, Value) {
    let resp = client
        .raw()
        .post(proxy.admin_url(&format!("/admin/v1/groups/{group}/promote")))
        .bearer_auth(TEST_TOKEN)
        .json(&json!({ "replica": replica.addr().to_string(), "force": force }))
        .send()
        .await
        .expect("promote");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn totals(node: &Node) -> HashMap<String, i64> {
    stored::rows(node, "counter_total", "fo")
        .await
        .into_iter()
        .map(|((k, _), (c, _))| (String::from_utf8_lossy(&k).into_owned(), c))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switchover_under_committed_load_loses_nothing() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 2,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let proxy = Arc::new(
        TestProxy::start(&cluster, |c| c.health.interval = Duration::from_millis(200)).await,
    );
    let client = Client::new();
    let g = cluster.group(0);
    let load = CommittedLoad::start(std::slice::from_ref(&proxy), 8, "fo");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (status, body) = promote(&client, &proxy, "g0", &g.replicas[0], false).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["mode"], "planned");
    assert_eq!(body["master"], json!(g.replicas[0].addr().to_string()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let LoadReport {
        ok,
        failed,
        slowest,
        ledger,
    } = load.stop().await;
    println!(
        "planned switchover: {ok} acknowledged, {failed} failed, slowest request {slowest:?}, promotion took {} ms",
        body["took_ms"]
    );
    assert_eq!(failed, 0, "no request may fail during a planned switchover");
    assert!(ok > 50, "load ran ({ok} requests)");
    assert!(
        slowest < Duration::from_secs(10),
        "pause bounded by commit_timeout: {slowest:?}"
    );

    // The topology names the new master; the old one follows it.
    let (_, topo) = client
        .admin_get(&proxy.admin_url("/admin/v1/topology"), TEST_TOKEN)
        .await
        .expect("topology");
    assert_eq!(topo["version"], 2);
    let replicas = topo["groups"][0]["replicas"].to_string();
    assert!(
        replicas.contains(&g.master.addr().to_string()),
        "old master is a replica now: {topo}"
    );

    let new_master = &g.replicas[0];
    let stored = totals(new_master).await;
    for (key, (acked, sent)) in &ledger {
        assert_eq!(acked, sent, "{key}: every request was acknowledged");
        assert_eq!(stored.get(key), Some(acked), "{key} on the new master");
    }
    // Both former peers replicate from the new master and agree.
    for follower in [&g.master, &g.replicas[1]] {
        follower
            .wait_caught_up(new_master, Duration::from_secs(20))
            .await
            .expect("follower catches up with the new master");
        assert_eq!(totals(follower).await, stored, "{} agrees", follower.addr());
    }
    let m = client
        .get(&proxy.admin_url("/metrics"))
        .await
        .expect("metrics")
        .1;
    let m = m.as_str().unwrap_or_default();
    assert!(
        m.contains("tally_promotions_total{group=\"g0\",mode=\"planned\"} 1"),
        "{m}"
    );
    // Metrics are process-wide and the other tests of this file promote in
    // groups named g0 too: only the planned promotion count is ours alone.
    assert!(
        m.contains("tally_write_pause_seconds_count{group=\"g0\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_failover_keeps_every_acknowledged_increment() {
    let cluster = Cluster::start(ClusterSpec::default())
        .await
        .expect("cluster");
    let proxy = Arc::new(
        TestProxy::start(&cluster, |c| {
            c.health.interval = Duration::from_millis(200);
            c.buffer.commit_timeout = Duration::from_secs(3);
            // The master is dead: the explicit probe need not wait long.
            c.failover.unreachable_after = Duration::from_secs(1);
        })
        .await,
    );
    let client = Client::new();
    let g = cluster.group(0);
    let load = CommittedLoad::start(std::slice::from_ref(&proxy), 6, "fo");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    g.master.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = promote(&client, &proxy, "g0", &g.replicas[0], false).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["mode"], "emergency");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let LoadReport {
        ok, failed, ledger, ..
    } = load.stop().await;
    println!("crash failover: {ok} acknowledged, {failed} not acknowledged");
    assert!(ok > 50, "load ran ({ok} requests)");

    // Unacknowledged (504) events stay queued and are applied too: flush.
    let (status, body) = client
        .admin_post(&proxy.admin_url("/admin/v1/flush"), TEST_TOKEN)
        .await
        .expect("flush");
    assert_eq!(status, 200, "{body}");
    let stored = totals(&g.replicas[0]).await;
    for (key, (acked, sent)) in &ledger {
        let got = stored.get(key).copied().unwrap_or(0);
        assert!(
            got >= *acked,
            "{key}: {got} stored < {acked} acknowledged (lost)"
        );
        assert!(
            got <= *sent,
            "{key}: {got} stored > {sent} sent (counted twice)"
        );
    }
    let (_, topo) = client
        .admin_get(&proxy.admin_url("/admin/v1/topology"), TEST_TOKEN)
        .await
        .expect("topology");
    assert_eq!(
        topo["groups"][0]["replicas"],
        json!([]),
        "the dead master left the group: {topo}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_is_refused_unless_forced() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 2,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let proxy = TestProxy::start(&cluster, |c| {
        c.failover.unreachable_after = Duration::from_secs(1);
    })
    .await;
    let client = Client::new();
    let g = cluster.group(0);
    let (behind, ahead) = (&g.replicas[0], &g.replicas[1]);
    behind.stop_replication().await.expect("stop slave");
    let (status, _) = client
        .post_json(
            &proxy.url("/v1/events?ack=committed"),
            &json!({ "ns": "fo", "key": "late", "delta": 5 }),
        )
        .await
        .expect("write");
    assert_eq!(status, 200);
    ahead
        .wait_caught_up(&g.master, Duration::from_secs(10))
        .await
        .expect("ahead catches up");
    g.master.kill9();

    let (status, body) = promote(&client, &proxy, "g0", behind, false).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "replica_behind");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&ahead.addr().to_string()) && msg.contains("force"),
        "{msg}"
    );
    let (_, topo) = client
        .admin_get(&proxy.admin_url("/admin/v1/topology"), TEST_TOKEN)
        .await
        .expect("topology");
    assert_eq!(topo["version"], 1, "a refused promotion changes nothing");

    let (status, body) = promote(&client, &proxy, "g0", behind, true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["mode"], "emergency");
    let (status, body) = client
        .post_json(
            &proxy.url("/v1/events?ack=committed"),
            &json!({ "ns": "fo", "key": "after", "delta": 1 }),
        )
        .await
        .expect("write");
    assert_eq!(status, 200, "the forced master takes writes: {body}");
    assert_eq!(totals(behind).await.get("after"), Some(&1));

    let (status, body) = promote(&client, &proxy, "g0", &g.master, false).await;
    assert_eq!(status, 400, "not a replica of g0 any more: {body}");
}

/// Issue #18, item 4: a stop while a master is dead can be rescued. The
/// data listener closes, but the admin listener serves until the final
/// flush is done, so an operator can promote the replica; the final flush
/// then commits every buffered event there and the stop ends cleanly.
/// Without a rescue, `shutdown.flush_deadline` ends the stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_a_dead_master_is_rescued_by_a_promotion_or_ends_at_its_deadline() {
    let cluster = Cluster::start(ClusterSpec::default())
        .await
        .expect("cluster");
    let mut proxy = TestProxy::start(&cluster, |c| {
        c.buffer.flush_interval = Duration::from_secs(3600);
    })
    .await;
    let client = Client::new();
    let events: Vec<Value> = (0..50)
        .map(|i| json!({ "ns": "fo", "key": format!("s{i}"), "delta": 2 }))
        .collect();
    let (status, body) = client
        .post_json(&proxy.url("/v1/events"), &json!(events))
        .await
        .expect("write");
    assert_eq!(status, 200, "{body}");
    let g = cluster.group(0);
    g.master.kill9();
    proxy.signal_stop();
    // The data listener stops taking requests...
    tally_integration::eventually(Duration::from_secs(10), "data listener closed", || async {
        client
            .get(&proxy.url("/readyz"))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // ... while the admin listener still promotes.
    let (status, body) = promote(&client, &proxy, "g0", &g.replicas[0], false).await;
    assert_eq!(status, 200, "{body}");
    tokio::time::timeout(Duration::from_secs(30), proxy.stop())
        .await
        .expect("the stop ends once the flush committed on the new master")
        .expect("clean stop");
    let stored = totals(&g.replicas[0]).await;
    for i in 0..50 {
        assert_eq!(stored.get(&format!("s{i}")), Some(&2), "s{i}");
    }

    // With `shutdown.flush_deadline`, a stop that cannot flush (a proxy
    // still configured with the dead master, and nobody promotes) ends
    // after the deadline with an error naming what was not committed,
    // instead of never.
    let proxy = TestProxy::start(&cluster, |c| {
        c.buffer.flush_interval = Duration::from_secs(3600);
        c.shutdown.flush_deadline = Some(Duration::from_secs(2));
    })
    .await;
    let (status, body) = client
        .post_json(
            &proxy.url("/v1/events"),
            &json!([{ "ns": "fo", "key": "lost", "delta": 1 }]),
        )
        .await
        .expect("write");
    assert_eq!(status, 200, "{body}");
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(30), proxy.stop())
        .await
        .expect("the stop ends at its deadline");
    let err = result.expect_err("a stop that left events unflushed is an error");
    let text = err.to_string();
    assert!(
        text.contains("g0") && text.contains("flush_deadline"),
        "names the group and the setting: {text}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "waited for the deadline"
    );
}
