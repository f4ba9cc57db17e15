//! Several proxies sharing one topology store (a MariaDB database): changes
//! propagate to all within 2 s, routing is identical, the registry lists
//! every proxy, a store outage leaves reads alone and fences writes (a
//! proxy cut off from the store may be taken for gone by the others), and
//! automatic failover promotes exactly once.

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
    let store = tally_admin::Dsn::parse(&cluster.group(1).master.root_dsn("tally_meta"))
        .expect("store dsn");
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

    // The store goes down: reads keep flowing, changes are refused, and
    // so are writes once the proxies' leases lapse (issue #19 item 4: a
    // proxy that cannot heartbeat may be taken for gone by the others).
    for (i, p) in proxies.iter().enumerate() {
        let (status, body) = client
            .post_json(
                &p.url("/v1/events?ack=committed"),
                &json!({ "ns": "outage", "key": format!("k{i}"), "delta": 1 }),
            )
            .await
            .expect("write");
        assert_eq!(status, 200, "{body}");
    }
    let store = &cluster.group(1).master;
    store.kill9();
    for (i, p) in proxies.iter().enumerate() {
        eventually(
            Duration::from_secs(6),
            "writes refused without the store",
            || async {
                let (status, body) = client
                    .post_json(
                        &p.url("/v1/events"),
                        &json!({ "ns": "outage", "key": "fenced", "delta": 1 }),
                    )
                    .await
                    .ok()?;
                (status == 503).then(|| assert_eq!(body["error"]["code"], "store_unreachable"))
            },
        )
        .await;
        let (status, body) = client
            .get(&p.url(&format!("/v1/counters/outage/k{i}?consistency=strong")))
            .await
            .expect("read");
        assert_eq!((status, &body["total"]), (200, &json!(1)), "{body}");
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
        eventually(Duration::from_secs(5), "writes accepted again", || async {
            let (status, _) = client
                .post_json(
                    &p.url("/v1/events"),
                    &json!({ "ns": "outage", "key": "back", "delta": 1 }),
                )
                .await
                .ok()?;
            (status == 200).then_some(())
        })
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
        tally_admin::Dsn::parse(&cluster.group(1).master.root_dsn("tally_meta")).expect("dsn"),
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

/// A proxy started in the background without waiting for it to be ready
/// ([`TestProxy`] waits, and one that cannot reach its store never is).
struct Unready {
    http: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tally_proxy::StartError>>,
    _dir: tempfile::TempDir,
}

impl Unready {
    async fn start(
        topology_yaml: &str,
        tweak: impl FnOnce(&mut tally_proxy::ProxyConfig),
    ) -> Unready {
        let dir = tempfile::tempdir().expect("temp dir");
        let topology_file = dir.path().join("topology.yaml");
        std::fs::write(&topology_file, topology_yaml).expect("topology file");
        let mut config = tally_proxy::ProxyConfig::defaults();
        config.topology_file = topology_file;
        config.admin_token = Some(tally_proxy::config::Secret(TEST_TOKEN.into()));
        config.buffer.flush_interval = Duration::from_millis(100);
        config.buffer.retry_max = Duration::from_millis(500);
        tweak(&mut config);
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = http.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tally_proxy::run(
            config,
            tally_proxy::Listeners { http, admin },
            async move {
                let _ = stopped.await;
            },
        ));
        Unready {
            http: addr,
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("proxy task").expect("clean stop");
    }
}

/// A write's status, error code and `Retry-After` header.
async fn write(client: &Client, url: &str, key: &str, delta: i64) -> (u16, String, Option<String>) {
    let resp = client
        .raw()
        .post(url.to_owned() + "/v1/events")
        .json(&json!({ "ns": "lease", "key": key, "delta": delta }))
        .send()
        .await
        .expect("write");
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
    (status, code, retry)
}

/// Issue #19 item 4: a proxy that cannot reach the topology store could
/// route by a ring the others have left (a reshard copies once every
/// *live* proxy settled, and a silent proxy stops counting as live after
/// the alive window). (c) Started while its store is unreachable, it is
/// not ready and refuses writes until it has read the store, whose
/// version may be newer than its file. Running, with its store path
/// black-holed, it refuses writes (503 `store_unreachable`, Retry-After)
/// within the fence time, keeps answering reads, and takes writes again
/// once it has read the store; nothing it acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cut_off_from_the_store_refuses_writes_until_it_reads_it_again() {
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let client = Client::new();
    // A first proxy seeds the store (version 1) and writes version 2.
    let direct = start_proxies(&cluster, 1, false).await.remove(0);
    let mut doc = data_topology(&cluster);
    doc["vnodes"] = json!(161);
    let (status, body) = direct.put_topology(&client, &doc, 1).await;
    assert_eq!((status, body), (200, json!({ "version": 2 })));

    // (c) The second proxy's store path refuses connections at its start;
    // its file holds version 1.
    let relay = tally_harness::FaultRelay::start(cluster.group(1).master.addr())
        .await
        .expect("relay");
    relay.refuse();
    let store = tally_admin::Dsn::parse(&format!("mysql://root@{}/tally_meta", relay.addr()))
        .expect("store dsn");
    let topology = serde_yaml_ng::to_string(&data_topology(&cluster)).expect("yaml");
    let cut = Unready::start(&topology, move |c| {
        c.topology_store = Some(store);
        c.store_poll_interval = Duration::from_millis(200);
        c.heartbeat_interval = Duration::from_millis(200);
    })
    .await;
    eventually(Duration::from_secs(10), "the proxy serves HTTP", || async {
        client.get(&cut.url("/healthz")).await.ok().map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, body) = client.get(&cut.url("/readyz")).await.expect("readyz");
    assert_eq!(status, 503, "not ready before the store is read: {body}");
    let (status, code, retry) = write(&client, &cut.url(""), "a", 1).await;
    assert_eq!((status, code.as_str()), (503, "store_unreachable"));
    assert!(retry.is_some(), "Retry-After");
    let resp = client
        .raw()
        .post(cut.url("/v1/counters/lease/a/incr"))
        .send()
        .await
        .expect("incr");
    assert_eq!(
        resp.status().as_u16(),
        503,
        "the incr shortcut is refused too"
    );
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "store_unreachable", "{body}");

    // The path passes: ready, at the store's version, writes accepted.
    relay.pass();
    eventually(
        Duration::from_secs(10),
        "ready once the store is read",
        || async {
            let (status, body) = client.get(&cut.url("/readyz")).await.ok()?;
            (status == 200).then_some(body)
        },
    )
    .await;
    let (_, body) = client.get(&cut.url("/readyz")).await.expect("readyz");
    assert_eq!(
        body["topology_version"], 2,
        "the store's version, not the file's"
    );
    let acknowledged = std::cell::Cell::new(0);
    for i in 0..20 {
        let (status, code, _) = write(&client, &cut.url(""), "a", i).await;
        assert_eq!(status, 200, "{code}");
        acknowledged.set(acknowledged.get() + i);
    }

    // The running proxy's store path becomes a black hole.
    relay.delay(Duration::from_secs(3600));
    let cut_at = Instant::now();
    let refused_after = eventually(Duration::from_secs(10), "writes refused", || async {
        let (status, code, retry) = write(&client, &cut.url(""), "a", 1).await;
        if status == 200 {
            acknowledged.set(acknowledged.get() + 1);
            return None;
        }
        assert_eq!((status, code.as_str()), (503, "store_unreachable"));
        assert!(retry.is_some(), "Retry-After");
        Some(cut_at.elapsed())
    })
    .await;
    println!("writes refused {refused_after:?} after the store path was cut");
    assert!(
        refused_after < Duration::from_secs(5),
        "fenced within the alive window: {refused_after:?}"
    );
    let (status, body) = client
        .get(&cut.url("/v1/counters/lease/a?consistency=strong"))
        .await
        .expect("read");
    assert_eq!(status, 200, "reads keep working: {body}");
    assert_eq!(body["total"], acknowledged.get());
    let (status, body) = client.get(&cut.url("/readyz")).await.expect("readyz");
    assert_eq!(status, 200, "a fenced proxy still serves reads: {body}");
    let metrics = client
        .raw()
        .get(format!("http://{}/metrics", direct.admin))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("tally_store_fenced"), "{metrics}");
    // The other proxy is not cut off.
    let (status, code, _) = write(&client, &direct.url(""), "b", 1).await;
    assert_eq!(status, 200, "{code}");

    // The path is restored (the connections held meanwhile stay stuck).
    relay.pass();
    eventually(Duration::from_secs(10), "writes accepted again", || async {
        let (status, _, _) = write(&client, &cut.url(""), "a", 1).await;
        (status == 200).then(|| acknowledged.set(acknowledged.get() + 1))
    })
    .await;
    let (_, body) = client
        .get(&cut.url("/v1/counters/lease/a?consistency=strong"))
        .await
        .expect("read");
    assert_eq!(
        body["total"],
        acknowledged.get(),
        "nothing acknowledged is lost"
    );
    cut.stop().await;
    direct.stop().await.expect("clean stop");
}
