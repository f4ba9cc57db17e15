//! Several proxies sharing one topology store (a MariaDB database): changes
//! propagate to all within 2 s, routing is identical, the registry lists
//! every proxy, a store outage leaves the data plane alone, and automatic
//! failover promotes exactly once.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tally_harness::{Cluster, ClusterSpec};
use tally_integration::{Client, TEST_TOKEN, TestProxy, eventually};

/// g0 only (g1's master hosts the store), as a JSON document.
fn data_topology(cluster: &Cluster) -> Value {
    let mut doc: Value = serde_yaml_ng::from_str(&cluster.topology_yaml(160)).expect("yaml");
    doc["groups"].as_array_mut().expect("groups").truncate(1);
    doc
}

async fn start_proxies(cluster: &Cluster, n: usize, auto_failover: bool) -> Vec<TestProxy> {
    let topology = serde_yaml_ng::to_string(&data_topology(cluster)).expect("yaml");
    let store =
        tally_admin::Dsn::parse(&cluster.group(1).master.dsn("tally_meta")).expect("store dsn");
    let mut proxies = Vec::new();
    for _ in 0..n {
        let store = store.clone();
        proxies.push(
            TestProxy::start_with_topology(&topology, move |c| {
                c.topology_store = Some(store);
                c.store_poll_interval = Duration::from_millis(200);
                c.heartbeat_interval = Duration::from_millis(200);
                c.health.interval = Duration::from_millis(200);
                c.failover.auto = auto_failover;
                c.failover.after = 3;
            })
            .await,
        );
    }
    proxies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_follow_one_store() {
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let proxies = start_proxies(&cluster, 3, false).await;
    let client = Client::new();
    for p in &proxies {
        assert_eq!(p.topology_version(&client).await, Some(1));
    }

    // A change through one proxy reaches all three within 2 s.
    let mut doc = data_topology(&cluster);
    doc["groups"][0]["replicas"] = json!([]);
    let started = Instant::now();
    let (status, body) = proxies[1].put_topology(&client, &doc, 1).await;
    assert_eq!((status, body), (200, json!({ "version": 2 })));
    for p in &proxies {
        eventually(
            Duration::from_secs(2),
            "every proxy applies version 2",
            || async { (p.topology_version(&client).await == Some(2)).then_some(()) },
        )
        .await;
    }
    println!(
        "version 2 on all three proxies after {:?}",
        started.elapsed()
    );
    // A stale If-Match on another proxy conflicts: the store is the arbiter.
    let (status, body) = proxies[2]
        .put_topology(&client, &data_topology(&cluster), 1)
        .await;
    assert_eq!(status, 409, "{body}");

    // All three route 100k keys identically.
    let keys: Vec<String> = (0..100_000).map(|i| format!("k{i}")).collect();
    let mut answers = Vec::new();
    for p in &proxies {
        let mut groups = Vec::new();
        for chunk in keys.chunks(5000) {
            let (status, body) = client
                .raw()
                .post(p.admin_url("/admin/v1/route"))
                .bearer_auth(TEST_TOKEN)
                .json(&json!({ "ns": "views", "keys": chunk }))
                .send()
                .await
                .map(|r| (r.status().as_u16(), r))
                .expect("route");
            assert_eq!(status, 200);
            let body: Value = body.json().await.expect("json");
            groups.extend(body["groups"].as_array().expect("groups").clone());
        }
        answers.push(groups);
    }
    assert_eq!(answers[0].len(), 100_000);
    assert!(
        answers.iter().all(|a| a == &answers[0]),
        "proxies disagree on routing"
    );

    // The registry lists all three, alive, at version 2.
    let (status, body) = client
        .admin_get(&proxies[0].admin_url("/admin/v1/proxies"), TEST_TOKEN)
        .await
        .expect("proxies");
    assert_eq!(status, 200, "{body}");
    let list = body["proxies"].as_array().expect("list");
    assert_eq!(list.len(), 3, "{body}");
    for p in list {
        assert_eq!(p["alive"], json!(true), "{p}");
        assert_eq!(p["version"], json!(2), "{p}");
    }
    let admins: Vec<String> = list
        .iter()
        .filter_map(|p| p["admin"].as_str().map(str::to_owned))
        .collect();
    for p in &proxies {
        assert!(
            admins.contains(&p.admin.to_string()),
            "{} registered",
            p.admin
        );
    }

    // The store goes down: data keeps flowing, changes are refused.
    let store = &cluster.group(1).master;
    store.kill9();
    for (i, p) in proxies.iter().enumerate() {
        let (status, body) = client
            .post_json(
                &p.url("/v1/events?ack=committed"),
                &json!({ "ns": "outage", "key": format!("k{i}"), "delta": 1 }),
            )
            .await
            .expect("write");
        assert_eq!(status, 200, "writes work without the store: {body}");
        let (status, _) = client
            .get(&p.url(&format!("/v1/counters/outage/k{i}?consistency=strong")))
            .await
            .expect("read");
        assert_eq!(status, 200);
    }
    let (status, body) = proxies[0]
        .put_topology(&client, &data_topology(&cluster), 2)
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("store"),
        "{body}"
    );
    assert_eq!(
        proxies[0].topology_version(&client).await,
        Some(2),
        "nothing changed"
    );

    // The store is back: changes work again and propagate.
    store.start().await.expect("restart the store");
    let (status, body) = proxies[0]
        .put_topology(&client, &data_topology(&cluster), 2)
        .await;
    assert_eq!((status, body), (200, json!({ "version": 3 })));
    for p in &proxies {
        eventually(
            Duration::from_secs(2),
            "every proxy applies version 3",
            || async { (p.topology_version(&client).await == Some(3)).then_some(()) },
        )
        .await;
    }
    for p in proxies {
        p.stop().await.expect("clean stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_with_auto_failover_promote_exactly_once() {
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let proxies = start_proxies(&cluster, 2, true).await;
    let client = Client::new();
    let g0 = cluster.group(0);
    let (status, _) = client
        .post_json(
            &proxies[0].url("/v1/events?ack=committed"),
            &json!({ "ns": "af", "key": "k", "delta": 2 }),
        )
        .await
        .expect("write");
    assert_eq!(status, 200);

    g0.master.kill9();
    let replica = g0.replicas[0].addr().to_string();
    for p in &proxies {
        eventually(
            Duration::from_secs(20),
            "both proxies route to the promoted replica",
            || async {
                let (_, topo) = client
                    .admin_get(&p.admin_url("/admin/v1/topology"), TEST_TOKEN)
                    .await
                    .ok()?;
                topo["groups"][0]["master"]
                    .as_str()?
                    .contains(&replica)
                    .then_some(())
            },
        )
        .await;
    }
    // Give a second promotion every chance to happen, then count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let store = tally_proxy::testing::Store::new(
        tally_admin::Dsn::parse(&cluster.group(1).master.dsn("tally_meta")).expect("dsn"),
        &tally_proxy::ProxyConfig::defaults().pool,
    );
    assert_eq!(
        store.count_source("promotion").await.expect("count"),
        1,
        "exactly one promotion"
    );
    let (status, body) = client
        .post_json(
            &proxies[1].url("/v1/events?ack=committed"),
            &json!({ "ns": "af", "key": "k", "delta": 3 }),
        )
        .await
        .expect("write");
    assert_eq!(status, 200, "writes go to the new master: {body}");
    let (_, body) = client
        .get(&proxies[0].url("/v1/counters/af/k?consistency=strong"))
        .await
        .expect("read");
    assert_eq!(
        body["total"], 5,
        "the committed write before the crash survived"
    );
    for p in proxies {
        p.stop().await.expect("clean stop");
    }
}
