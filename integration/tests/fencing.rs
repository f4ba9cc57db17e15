//! Issue #19: no old master can commit where nobody reads. The proxies
//! flush as the least-privilege data user (the harness's topologies name
//! `tally` in the DSNs and `tally_admin` in `admin:`), so `read_only` on a
//! master stops their writes; a promotion fences the old master, and a
//! master that is only slow is fenced and switched over as planned rather
//! than left writable next to a new one.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tally_harness::{Cluster, ClusterSpec, FaultRelay, Node};
use tally_integration::load::CommittedLoad;
use tally_integration::{Client, TEST_TOKEN, TestProxy, eventually, stored};

async fn total(node: &Node, key: &str) -> i64 {
    stored::rows(node, "counter_total", "fence")
        .await
        .into_iter()
        .find(|((k, _), _)| k == key.as_bytes())
        .map_or(0, |(_, (count, _))| count)
}

async fn read_only(node: &Node) -> bool {
    let rows = node
        .sql("SELECT @@GLOBAL.read_only")
        .await
        .expect("read_only");
    rows.first().and_then(|r| r.get::<i64, _>(0)) == Some(1)
}

async fn promote(client: &Client, proxy: &TestProxy, group: &str, replica: &Node) -> (u16, Value) {
    let resp = client
        .raw()
        .post(proxy.admin_url(&format!("/admin/v1/groups/{group}/promote")))
        .bearer_auth(TEST_TOKEN)
        .json(&json!({ "replica": replica.addr().to_string() }))
        .send()
        .await
        .expect("promote");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// SPEC §5 / issue #19 acceptance: `SET GLOBAL read_only=ON` on a master
/// (by an operator, as root) makes the proxy's committed writes to that
/// group wait instead of succeeding; once the master is writable again
/// they commit, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_master_holds_committed_writes_until_writable_then_counts_them_once() {
    let cluster = Cluster::start(ClusterSpec::default())
        .await
        .expect("cluster");
    let proxy = TestProxy::start(&cluster, |c| {
        c.buffer.commit_timeout = Duration::from_secs(2);
    })
    .await;
    let client = Client::new();
    let master = &cluster.group(0).master;
    let post = |delta: i64| {
        let (client, url) = (client.clone(), proxy.url("/v1/events?ack=committed"));
        async move {
            client
                .post_json(&url, &json!({ "ns": "fence", "key": "ro", "delta": delta }))
                .await
                .expect("write")
        }
    };
    assert_eq!(post(1).await.0, 200, "a writable master commits");

    master
        .exec("SET GLOBAL read_only = ON")
        .await
        .expect("read_only on");
    let (status, body) = post(10).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (504, Some("commit_timeout")),
        "a read-only master must not take the data user's batch: {body}"
    );
    assert_eq!(total(master, "ro").await, 1, "nothing committed meanwhile");

    master
        .exec("SET GLOBAL read_only = OFF")
        .await
        .expect("read_only off");
    eventually(
        Duration::from_secs(10),
        "the held batch commits",
        || async { (total(master, "ro").await == 11).then_some(()) },
    )
    .await;
    // Retried until applied, applied once: more time and a flush add nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = client
        .admin_post(&proxy.admin_url("/admin/v1/flush"), TEST_TOKEN)
        .await
        .expect("flush");
    assert_eq!(status, 200);
    assert_eq!(total(master, "ro").await, 11, "counted exactly once");
}

/// Issue #19 item 2: a master slower than the connect timeout but alive
/// is not taken for dead. The promotion fences it (read_only) and runs as
/// a planned switchover; before, it ran in emergency mode and left the old
/// master writable next to the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_master_is_fenced_and_switched_over_as_planned() {
    let cluster = Cluster::start(ClusterSpec::default())
        .await
        .expect("cluster");
    let g = cluster.group(0);
    let relay = FaultRelay::start(g.master.addr()).await.expect("relay");
    let topology = cluster
        .topology_yaml(160)
        .replace(&g.master.addr().to_string(), &relay.addr().to_string());
    assert!(topology.contains(&relay.addr().to_string()), "{topology}");
    let proxy = TestProxy::start_with_topology(&topology, |c| {
        c.pool.connect_timeout = Duration::from_millis(500);
    })
    .await;
    let client = Client::new();
    let (status, body) = client
        .post_json(
            &proxy.url("/v1/events?ack=committed"),
            &json!({ "ns": "fence", "key": "slow", "delta": 4 }),
        )
        .await
        .expect("write");
    assert_eq!(status, 200, "{body}");

    // Every packet to and from the master now takes longer than the
    // connect timeout: slow, not gone.
    relay.delay(Duration::from_millis(700));
    let (status, body) = promote(&client, &proxy, "g0", &g.replicas[0]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["mode"], "planned",
        "a master that answers is switched over, not abandoned: {body}"
    );
    assert!(
        read_only(&g.master).await,
        "the old master was fenced before the new one took writes"
    );
    relay.pass();
    let (status, body) = client
        .post_json(
            &proxy.url("/v1/events?ack=committed"),
            &json!({ "ns": "fence", "key": "slow", "delta": 1 }),
        )
        .await
        .expect("write");
    assert_eq!(status, 200, "{body}");
    assert_eq!(total(&g.replicas[0], "slow").await, 5, "nothing lost");
    g.master
        .wait_caught_up(&g.replicas[0], Duration::from_secs(20))
        .await
        .expect("the old master follows the new one");
    assert_eq!(total(&g.master, "slow").await, 5, "and agrees with it");
}

/// Issue #19 test (b): a planned switchover while two proxies (sharing a
/// topology store) write `ack=committed`, under the least-privilege data
/// user. The proxy that did not promote learns the new master only at its
/// next store poll; until then its batches reach the old master, which
/// must refuse them (read_only fences the data user, and its open sessions
/// were ended), so they are retried on the new master: nothing
/// acknowledged is lost and nothing is counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_under_two_writing_proxies_loses_and_doubles_nothing() {
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    // g1's master hosts the topology store; the data lives on g0.
    let mut doc: Value = serde_yaml_ng::from_str(&cluster.topology_yaml(160)).expect("yaml");
    doc["groups"].as_array_mut().expect("groups").truncate(1);
    let topology = serde_yaml_ng::to_string(&doc).expect("yaml");
    let store = tally_admin::Dsn::parse(&cluster.group(1).master.root_dsn("tally_meta"))
        .expect("store dsn");
    let mut proxies = Vec::new();
    for _ in 0..2 {
        let store = store.clone();
        proxies.push(Arc::new(
            TestProxy::start_with_topology(&topology, move |c| {
                c.topology_store = Some(store);
                c.store_poll_interval = Duration::from_millis(300);
                c.heartbeat_interval = Duration::from_millis(300);
                c.buffer.commit_timeout = Duration::from_secs(10);
            })
            .await,
        ));
    }
    let client = Client::new();
    let load = CommittedLoad::start(&proxies, 6, "fence");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let g = cluster.group(0);
    let (status, body) = promote(&client, &proxies[0], "g0", &g.replicas[0]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["mode"], "planned");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let report = load.stop().await;
    for p in &proxies {
        let (status, body) = client
            .admin_post(&p.admin_url("/admin/v1/flush"), TEST_TOKEN)
            .await
            .expect("flush");
        assert_eq!(status, 200, "{body}");
    }
    let ledger = report.ledger;
    let new_master = &g.replicas[0];
    let stored = stored::rows(new_master, "counter_total", "fence").await;
    for (key, (acked, sent)) in &ledger {
        let got = stored
            .iter()
            .find(|((k, _), _)| k == key.as_bytes())
            .map_or(0, |(_, (c, _))| *c);
        assert!(
            got >= *acked,
            "{key}: {got} stored < {acked} acknowledged (lost)"
        );
        assert!(
            got <= *sent,
            "{key}: {got} stored > {sent} sent (counted twice)"
        );
    }
    assert!(
        report.ok > 100,
        "the load ran ({} requests acknowledged)",
        report.ok
    );
    assert!(
        ledger.keys().any(|k| k.starts_with("p1-")),
        "both proxies wrote"
    );
    g.master
        .wait_caught_up(new_master, Duration::from_secs(20))
        .await
        .expect("the old master follows the new one");
    assert_eq!(
        stored::rows(&g.master, "counter_total", "fence").await,
        stored,
        "the old master holds nothing the new one lacks"
    );
}

/// Issue #19 test (a): a reshard while one of two proxies has lost the
/// topology store. Proxy B holds buffered increments routed by the old
/// ring when a relay in front of the store black-holes its path; proxy A
/// reshards g0 → g0 + g1 meanwhile (the driver stops waiting for B once B
/// is no longer alive, copies, verifies and cleans the source up). When B
/// reaches the store again and flushes, its batch must not land on the
/// source, where no read of a moved key looks and cleanup already ran: the
/// source's ring fence refuses it and B applies it to the current owners.
/// Every total then equals the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cut_off_from_the_store_during_a_reshard_loses_nothing() {
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let mut doc: Value = serde_yaml_ng::from_str(&cluster.topology_yaml(64)).expect("yaml");
    let target = doc.clone();
    doc["groups"].as_array_mut().expect("groups").truncate(1);
    let yaml = serde_yaml_ng::to_string(&doc).expect("yaml");
    // The store lives on g0's master, in its own database; B reaches it
    // through a relay only.
    let g0 = &cluster.group(0).master;
    let relay = FaultRelay::start(g0.addr()).await.expect("relay");
    let start = |store: String, flush_interval: Duration| {
        let yaml = yaml.clone();
        async move {
            let store = tally_admin::Dsn::parse(&store).expect("store dsn");
            TestProxy::start_with_topology(&yaml, move |c| {
                c.topology_store = Some(store);
                c.store_poll_interval = Duration::from_millis(200);
                c.heartbeat_interval = Duration::from_millis(200);
                c.buffer.flush_interval = flush_interval;
                c.reshard.poll_interval = Duration::from_millis(100);
                c.reshard.cleanup_grace = Duration::from_millis(300);
            })
            .await
        }
    };
    let a = start(g0.root_dsn("tally_meta"), Duration::from_millis(100)).await;
    // B flushes only when asked: its increments wait in its buffer.
    let b = start(
        format!("mysql://root@{}/tally_meta", relay.addr()),
        Duration::from_secs(3600),
    )
    .await;
    let client = Client::new();
    let keys: Vec<String> = (0..200).map(|i| format!("k{i}-{}", i * 7919)).collect();
    let post = |proxy: &TestProxy, ack: &str, delta: i64| {
        let events: Vec<Value> = keys
            .iter()
            .map(|k| json!({ "ns": "fence", "key": k, "delta": delta }))
            .collect();
        let (client, url) = (client.clone(), proxy.url(&format!("/v1/events?ack={ack}")));
        async move { client.post_json(&url, &json!(events)).await.expect("write") }
    };
    assert_eq!(post(&a, "committed", 10).await.0, 200);
    assert_eq!(post(&b, "buffered", 1).await.0, 200);

    relay.delay(Duration::from_secs(3600));
    let (status, body) = client
        .raw()
        .post(a.admin_url("/admin/v1/reshard"))
        .bearer_auth(TEST_TOKEN)
        .json(&target)
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .expect("post reshard");
    assert_eq!(status, 202, "{:?}", body.text().await);
    eventually(Duration::from_secs(90), "the reshard to finish", || async {
        let (_, t) = client
            .admin_get(&a.admin_url("/admin/v1/topology"), TEST_TOKEN)
            .await
            .ok()?;
        (t.get("migration").is_none() && t["groups"].as_array().map(Vec::len) == Some(2))
            .then_some(t["version"].as_u64()?)
    })
    .await;
    let moved: Vec<&String> = keys
        .iter()
        .filter(|k| {
            tally_integration::routing::owner(&cluster.topology_yaml(64), "fence", k) == "g1"
        })
        .collect();
    assert!(
        moved.len() > 20 && moved.len() < 180,
        "the reshard moved part of the keys ({})",
        moved.len()
    );

    // B reaches the store again, learns the new topology and flushes.
    relay.pass();
    let a_version = a.topology_version(&client).await;
    eventually(Duration::from_secs(20), "B to follow the store", || async {
        (b.topology_version(&client).await == a_version).then_some(())
    })
    .await;
    let (status, body) = client
        .admin_post(&b.admin_url("/admin/v1/flush"), TEST_TOKEN)
        .await
        .expect("flush");
    assert_eq!(status, 200, "{body}");
    for key in &keys {
        for p in [&a, &b] {
            let (status, body) = client
                .get(&p.url(&format!("/v1/counters/fence/{key}?consistency=strong")))
                .await
                .expect("read");
            assert_eq!(
                (status, body["total"].as_i64()),
                (200, Some(11)),
                "{key} (moved: {}): B's acknowledged increment must count once",
                moved.contains(&key)
            );
        }
    }
    // Nothing of a moved key is left on the source.
    let left: Vec<String> = stored::rows(g0, "counter_total", "fence")
        .await
        .into_keys()
        .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
        .filter(|k| moved.contains(&k))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "moved keys' rows on the source");
}
