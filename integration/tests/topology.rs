//! The topology control plane against real MariaDB: hot changes under
//! load, compare-and-set versions, validation that changes nothing, auth,
//! redacted passwords and the reshard guard.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tally_harness::{Cluster, ClusterSpec};
use tally_integration::{Client, TEST_TOKEN, TestProxy, eventually, routing, stored};

fn yaml_to_json(yaml: &str) -> Value {
    serde_yaml_ng::from_str(yaml).expect("topology yaml")
}

/// The cluster's topology without any replica.
fn without_replicas(cluster: &Cluster) -> Value {
    let mut doc = yaml_to_json(&cluster.topology_yaml(160));
    for g in doc["groups"].as_array_mut().expect("groups") {
        g["replicas"] = json!([]);
    }
    doc
}

/// 8 writers and 4 readers run while every replica is removed and re-added
/// 20 times through PUT and 20 times through the file: no request fails and
/// the totals are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_come_and_go_under_load_without_a_failed_request() {
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let proxy = Arc::new(
        TestProxy::start(&cluster, |c| {
            c.topology_watch_interval = Duration::from_millis(50);
            c.health.interval = Duration::from_millis(100);
        })
        .await,
    );
    let client = Client::new();
    let with = yaml_to_json(&cluster.topology_yaml(160));
    let without = without_replicas(&cluster);
    let done = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));

    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (client, proxy, done, failures) = (
                client.clone(),
                proxy.clone(),
                done.clone(),
                failures.clone(),
            );
            tokio::spawn(async move {
                let mut sent = 0i64;
                while !done.load(Ordering::Relaxed) {
                    let batch: Vec<Value> = (0..20)
                        .map(|i| json!({ "ns": "hot", "key": format!("w{w}-{i}"), "delta": 1 }))
                        .collect();
                    let ack = if sent % 3 == 0 {
                        "committed"
                    } else {
                        "buffered"
                    };
                    match client
                        .post_json(
                            &proxy.url(&format!("/v1/events?ack={ack}")),
                            &Value::Array(batch),
                        )
                        .await
                    {
                        Ok((200, _)) => sent += 1,
                        other => {
                            eprintln!("writer {w}: {other:?}");
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                sent
            })
        })
        .collect();
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let (client, proxy, done, failures) = (
                client.clone(),
                proxy.clone(),
                done.clone(),
                failures.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0u64;
                while !done.load(Ordering::Relaxed) {
                    match client
                        .get(&proxy.url(&format!("/v1/counters/hot/w{r}-0")))
                        .await
                    {
                        Ok((200, _)) => n += 1,
                        other => {
                            eprintln!("reader {r}: {other:?}");
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                n
            })
        })
        .collect();

    // 20 remove/re-add cycles through PUT.
    for _ in 0..20 {
        for doc in [&without, &with] {
            let v = proxy.topology_version(&client).await.expect("version");
            let (status, body) = proxy.put_topology(&client, doc, v).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["version"], json!(v + 1));
        }
    }
    // 20 cycles through the file, picked up by the watcher.
    for _ in 0..20 {
        for doc in [&without, &with] {
            let v = proxy.topology_version(&client).await.expect("version");
            let yaml = serde_yaml_ng::to_string(doc).expect("yaml");
            std::fs::write(&proxy.topology_file, yaml).expect("write topology file");
            eventually(Duration::from_secs(10), "file change applied", || async {
                (proxy.topology_version(&client).await.expect("version") > v).then_some(())
            })
            .await;
        }
    }
    let (_, topo) = client
        .admin_get(&proxy.admin_url("/admin/v1/topology"), TEST_TOKEN)
        .await
        .expect("topology");
    assert_eq!(topo["version"], json!(81), "1 + 40 PUTs + 40 file changes");
    assert_eq!(
        topo["groups"][0]["replicas"].as_array().map(Vec::len),
        Some(1)
    );

    done.store(true, Ordering::Relaxed);
    let mut batches = 0i64;
    for w in writers {
        batches += w.await.expect("writer");
    }
    let mut reads = 0;
    for r in readers {
        reads += r.await.expect("reader");
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed requests during hot changes"
    );
    assert!(
        batches > 40 && reads > 40,
        "load ran: {batches} batches, {reads} reads"
    );

    let (status, _) = client
        .admin_post(&proxy.admin_url("/admin/v1/flush"), TEST_TOKEN)
        .await
        .expect("flush");
    assert_eq!(status, 200);
    let mut total = 0;
    for g in cluster.groups() {
        total += stored::rows(&g.master, "counter_total", "hot")
            .await
            .values()
            .map(|(c, _)| c)
            .sum::<i64>();
    }
    assert_eq!(total, batches * 20, "every accepted event counted once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_validation_auth_passwords_and_the_reshard_guard() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        groups: 2,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    // A password-protected data user, to see redaction and `***` round
    // trips (the admin user stays the harness's).
    for g in cluster.groups() {
        g.master
            .exec("CREATE USER 'app'@'127.0.0.1' IDENTIFIED BY 's3cr3t'; GRANT SELECT, INSERT, UPDATE, DELETE ON tally.* TO 'app'@'127.0.0.1'")
            .await
            .expect("create user");
    }
    let topo = cluster
        .topology_yaml(160)
        .replace("mysql://tally@", "mysql://app:s3cr3t@");
    let proxy = TestProxy::start_with_topology(&topo, |_| {}).await;
    let client = Client::new();
    let file_before = std::fs::read_to_string(&proxy.topology_file).expect("file");

    // GET never shows a password.
    let (_, current) = client
        .admin_get(&proxy.admin_url("/admin/v1/topology"), TEST_TOKEN)
        .await
        .expect("get");
    let text = current.to_string();
    assert!(
        !text.contains("s3cr3t") && text.contains("app:***@"),
        "{text}"
    );

    // Five mistakes: all reported, nothing changed.
    let bad = json!({
        "vnodes": 0,
        "groups": [
            { "name": "G0", "weight": 0, "master": "mysql://root@127.0.0.1:1/tally" },
            { "name": "g1", "master": "postgres://x@y/z" },
            { "name": "g2", "master": "mysql://root@127.0.0.1:1/tally" },
        ],
    });
    let (status, body) = proxy.put_topology(&client, &bad, 1).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_topology");
    let paths: Vec<&str> = body["error"]["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter_map(|p| p["path"].as_str())
        .collect();
    assert_eq!(
        paths,
        [
            "vnodes",
            "groups[0].name",
            "groups[0].weight",
            "groups[1].master",
            "groups[2].master"
        ],
        "{body}"
    );
    assert_eq!(proxy.topology_version(&client).await.expect("version"), 1);
    assert_eq!(
        std::fs::read_to_string(&proxy.topology_file).expect("file"),
        file_before
    );

    // An unknown key is a problem too.
    let mut typo = current.clone();
    typo["vnode"] = json!(7);
    let (status, body) = proxy.put_topology(&client, &typo, 1).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["problems"][0]["path"], "vnode");

    // Missing If-Match.
    let resp = client
        .raw()
        .put(proxy.admin_url("/admin/v1/topology"))
        .bearer_auth(TEST_TOKEN)
        .json(&current)
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), 428);

    // An identical document (passwords as `***`) is not a change.
    let (status, body) = proxy.put_topology(&client, &current, 1).await;
    assert_eq!((status, body), (200, json!({ "version": 1 })));

    // Two PUTs of a change with the same If-Match: one wins, one conflicts.
    // The body is the GET answer with `***` passwords: they keep the real
    // ones. Weight changes move keys: fine while no group holds data.
    let mut heavier = current.clone();
    heavier["groups"][1]["weight"] = json!(2);
    let (a, b) = tokio::join!(
        proxy.put_topology(&client, &heavier, 1),
        proxy.put_topology(&client, &heavier, 1)
    );
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "{a:?} {b:?}");
    let (won, lost) = if a.0 == 200 {
        (&a.1, &b.1)
    } else {
        (&b.1, &a.1)
    };
    assert_eq!(won["version"], json!(2));
    assert_eq!(lost["error"]["code"], "version_conflict");
    let file = std::fs::read_to_string(&proxy.topology_file).expect("file");
    assert!(
        file.contains("app:s3cr3t@") && file.contains("weight: 2") && file.contains("version: 2"),
        "persisted with the real password: {file}"
    );

    // With data, key-moving changes need a reshard; server changes do not.
    let (status, _) = client
        .post_json(
            &proxy.url("/v1/events?ack=committed"),
            &json!({ "ns": "guard", "key": "k", "delta": 1 }),
        )
        .await
        .expect("write");
    assert_eq!(
        status, 200,
        "the app account (password kept behind ***) can write"
    );
    let mut lighter = heavier.clone();
    lighter["groups"][1]["weight"] = json!(1);
    let (status, body) = proxy.put_topology(&client, &lighter, 2).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "reshard_required");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("hash space"),
        "{body}"
    );
    let mut three = heavier.clone();
    three["groups"]
        .as_array_mut()
        .expect("groups")
        .push(json!({ "name": "g2", "master": "mysql://root@127.0.0.1:9/tally" }));
    let (status, _) = proxy.put_topology(&client, &three, 2).await;
    assert_eq!(status, 409, "adding a group moves keys");
    assert_eq!(proxy.topology_version(&client).await.expect("version"), 2);

    // `***` for a server that is not running is a problem, not a password.
    let mut unknown = heavier.clone();
    unknown["groups"][0]["replicas"] = json!(["mysql://app:***@127.0.0.1:9/tally"]);
    let (status, body) = proxy.put_topology(&client, &unknown, 2).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["problems"][0]["message"]
            .as_str()
            .unwrap_or("")
            .contains("no running server")
    );

    // Reload of an unchanged file changes nothing; of a broken file, nothing either.
    let (status, body) = client
        .admin_post(&proxy.admin_url("/admin/v1/reload"), TEST_TOKEN)
        .await
        .expect("reload");
    assert_eq!(
        (status, body),
        (200, json!({ "version": 2, "changed": false }))
    );
    std::fs::write(&proxy.topology_file, "groups: [ {name: 'x'} ]\n").expect("break file");
    let (status, body) = client
        .admin_post(&proxy.admin_url("/admin/v1/reload"), TEST_TOKEN)
        .await
        .expect("reload");
    assert_eq!(status, 422, "{body}");
    assert_eq!(proxy.topology_version(&client).await.expect("version"), 2);
    let (status, _) = client
        .post_json(
            &proxy.url("/v1/events?ack=committed"),
            &json!({ "ns": "guard", "key": "k" }),
        )
        .await
        .expect("write");
    assert_eq!(status, 200, "still serving on the previous topology");
    proxy.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_route_needs_the_token_and_metrics_do_not() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let proxy = TestProxy::start(&cluster, |_| {}).await;
    let client = Client::new();
    let routes = [
        ("GET", "/admin/v1/topology"),
        ("PUT", "/admin/v1/topology"),
        ("GET", "/admin/v1/route?ns=a&key=b"),
        ("GET", "/admin/v1/health"),
        ("POST", "/admin/v1/flush"),
        ("POST", "/admin/v1/reload"),
        ("GET", "/admin/v1/nonexistent"),
    ];
    for (method, path) in routes {
        for token in [None, Some("wrong"), Some("")] {
            let mut req = client
                .raw()
                .request(method.parse().expect("method"), proxy.admin_url(path));
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            let resp = req.send().await.expect("request");
            assert_eq!(resp.status(), 401, "{method} {path} with {token:?}");
            let body: Value = resp.json().await.expect("json");
            assert_eq!(body["error"]["code"], "unauthorized");
        }
    }
    let (status, _) = client
        .get(&proxy.admin_url("/metrics"))
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    proxy.stop().await.expect("clean stop");
}

/// Malformed admin input gets the JSON error body like everything else.
/// Regressions: a group segment that is not UTF-8 was answered by axum in
/// plain text, and so was a body over axum's default 2 MB limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_admin_input_gets_json_errors() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let proxy = TestProxy::start(&cluster, |c| c.limits.max_body_bytes = 1 << 20).await;
    let client = Client::new();
    let resp = client
        .raw()
        .post(proxy.admin_url("/admin/v1/groups/%FF/promote"))
        .bearer_auth(TEST_TOKEN)
        .json(&json!({ "replica": "127.0.0.1:1" }))
        .send()
        .await
        .expect("promote");
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["code"], "invalid_param", "{body}");

    let keys: Vec<String> = (0..200_000).map(|i| format!("key-{i}")).collect();
    let resp = client
        .raw()
        .post(proxy.admin_url("/admin/v1/route"))
        .bearer_auth(TEST_TOKEN)
        .json(&json!({ "ns": "v", "keys": keys }))
        .send()
        .await
        .expect("route");
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    proxy.stop().await.expect("clean stop");
}

/// Issue #18, item 7: a group removed and added back under the same name
/// while its old flusher still waits for its next turn gets a new buffer,
/// and that buffer must get a flusher of its own. With an hour-long flush
/// interval the old flusher sleeps through the whole test; writes with
/// `ack=committed` to keys of the re-added group must still commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_removed_and_added_back_gets_a_flusher_again() {
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let proxy = TestProxy::start(&cluster, |c| {
        c.buffer.flush_interval = Duration::from_secs(3600);
        c.buffer.commit_timeout = Duration::from_secs(5);
    })
    .await;
    let client = Client::new();
    let both = yaml_to_json(&cluster.topology_yaml(160));
    let mut only_g0 = both.clone();
    only_g0["groups"]
        .as_array_mut()
        .expect("groups")
        .retain(|g| g["name"] == "g0");
    let (status, body) = proxy.put_topology(&client, &only_g0, 1).await;
    assert_eq!(
        status, 200,
        "no data yet, so removing g1 is allowed: {body}"
    );
    let (status, body) = proxy.put_topology(&client, &both, 2).await;
    assert_eq!(status, 200, "{body}");

    let yaml = cluster.topology_yaml(160);
    let keys = [
        routing::keys_on(&yaml, "readd", "k", "g0", 20),
        routing::keys_on(&yaml, "readd", "k", "g1", 20),
    ]
    .concat();
    let events: Vec<Value> = keys
        .iter()
        .map(|k| json!({ "ns": "readd", "key": k }))
        .collect();
    let (status, body) = client
        .post_json(&proxy.url("/v1/events?ack=committed"), &json!(events))
        .await
        .expect("write");
    assert_eq!(
        status, 200,
        "keys of the re-added group must commit: {body}"
    );
    let mut total = 0;
    for group in cluster.groups() {
        let rows = stored::rows(&group.master, "counter_total", "readd").await;
        assert!(!rows.is_empty(), "some keys live on {}", group.name);
        total += rows.values().map(|(count, _)| count).sum::<i64>();
    }
    assert_eq!(total, 40, "every committed event is stored once");
    proxy.stop().await.expect("clean stop");
}
