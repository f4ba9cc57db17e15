//! Online resharding against real MariaDB groups, with two proxies sharing
//! a topology store:
//! - 2 → 3 groups and back to 2 under continuous writes and reads through
//!   both proxies: keys written before the reshard read exactly at every
//!   sample; afterwards every total and range count equals the ledger and
//!   every row lives only on its owner;
//! - the proxy driving a copy is killed (SIGKILL); the other resumes and the
//!   result is exact;
//! - a reshard cancelled while copying restores the original topology with
//!   exact counts.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tally_harness::{Cluster, ClusterSpec};
use tally_integration::{Client, KillOnDrop, TEST_TOKEN, TestProxy, eventually, expected, stored};

/// The two tests each run a 4-group cluster and a copy; one at a time keeps
/// a 2-core CI machine from starving either (a proxy process once missed
/// its startup deadline while the other test was copying).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Unix seconds of a whole hour well inside the accepted event window.
fn base_ts() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    now - now % 3600 - 6 * 3600
}

/// The cluster's topology with only the first `n` data groups.
fn topology(cluster: &Cluster, n: usize) -> Value {
    let mut doc: Value = serde_yaml_ng::from_str(&cluster.topology_yaml(64)).expect("yaml");
    doc["groups"].as_array_mut().expect("groups").truncate(n);
    doc
}

fn store_dsn(cluster: &Cluster) -> tally_admin::Dsn {
    // g3's master hosts the store; it is never a data group.
    tally_admin::Dsn::parse(&cluster.group(3).master.root_dsn("tally_meta")).expect("store dsn")
}

async fn proxy(cluster: &Cluster, groups: usize, poll: Duration, rate: usize) -> TestProxy {
    let store = store_dsn(cluster);
    let yaml = serde_yaml_ng::to_string(&topology(cluster, groups)).expect("yaml");
    TestProxy::start_with_topology(&yaml, move |c| {
        c.topology_store = Some(store);
        c.store_poll_interval = Duration::from_millis(100);
        c.heartbeat_interval = Duration::from_millis(100);
        c.health.interval = Duration::from_millis(200);
        c.reshard.poll_interval = poll;
        c.reshard.chunk_counters = 25;
        c.reshard.max_rows_per_sec = rate;
        c.reshard.cleanup_grace = Duration::from_secs(2);
        c.reshard.delete_rows = 100;
    })
    .await
}

/// Writes `(key, delta, ts)` events of namespace `ns` and returns the HTTP status.
async fn write(client: &Client, url: &str, ns: &str, events: &[(String, i64, i64)]) -> u16 {
    let body: Vec<Value> = events
        .iter()
        .map(|(k, d, ts)| json!({ "ns": ns, "key": k, "delta": d, "ts": ts }))
        .collect();
    client
        .post_json(&format!("{url}/v1/events"), &json!(body))
        .await
        .map(|(s, _)| s)
        .unwrap_or(0)
}

/// Seeds `n` keys of `ns` with a known history over three hours; returns
/// the ledger `key → [(ts, delta)]`.
async fn seed(
    client: &Client,
    p: &TestProxy,
    ns: &str,
    n: usize,
) -> HashMap<String, Vec<(i64, i64)>> {
    let base = base_ts();
    let mut ledger: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
    let mut events = Vec::new();
    for i in 0..n {
        let key = format!("k{i}");
        for j in 0..3 {
            let (ts, d) = (
                base + j * 3600 + (i as i64 % 50) * 60,
                1 + ((i + j as usize) % 7) as i64,
            );
            events.push((key.clone(), d, ts));
            ledger.entry(key.clone()).or_default().push((ts, d));
        }
    }
    for chunk in events.chunks(2000) {
        assert_eq!(write(client, &p.url(""), ns, chunk).await, 200);
    }
    flush(client, p).await;
    ledger
}

async fn flush(client: &Client, p: &TestProxy) {
    let (status, body) = client
        .admin_post(&p.admin_url("/admin/v1/flush"), TEST_TOKEN)
        .await
        .expect("flush");
    assert_eq!(status, 200, "{body}");
}

async fn total(client: &Client, base: &str, ns: &str, key: &str, strong: bool) -> Option<i64> {
    let c = if strong { "strong" } else { "eventual" };
    match client
        .get(&format!("{base}/v1/counters/{ns}/{key}?consistency={c}"))
        .await
    {
        Ok((200, v)) => v["total"].as_i64(),
        _ => None,
    }
}

async fn count(
    client: &Client,
    base: &str,
    ns: &str,
    key: &str,
    from: i64,
    to: i64,
) -> Option<i64> {
    match client
        .get(&format!(
            "{base}/v1/counters/{ns}/{key}/count?from={from}&to={to}"
        ))
        .await
    {
        Ok((200, v)) => v["count"].as_i64(),
        _ => None,
    }
}

async fn start_reshard(client: &Client, p: &TestProxy, target: &Value) -> Value {
    let (status, body) = client
        .raw()
        .post(p.admin_url("/admin/v1/reshard"))
        .bearer_auth(TEST_TOKEN)
        .json(target)
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .expect("post reshard");
    let body: Value = body.json().await.expect("json");
    assert_eq!(status, 202, "{body}");
    body
}

async fn reshard_status(client: &Client, admin_url: &str) -> Value {
    client
        .admin_get(&format!("{admin_url}/admin/v1/reshard"), TEST_TOKEN)
        .await
        .map(|(_, v)| v)
        .unwrap_or(Value::Null)
}

/// Waits until no reshard runs and the topology has `groups` groups.
async fn wait_done(client: &Client, p: &TestProxy, groups: usize, within: Duration) {
    eventually(within, "the reshard to finish", || async {
        let s = reshard_status(client, &p.admin_url("")).await;
        let (_, t) = client
            .admin_get(&p.admin_url("/admin/v1/topology"), TEST_TOKEN)
            .await
            .ok()?;
        (s["active"] == json!(false)
            && t.get("migration").is_none()
            && t["groups"].as_array().map(Vec::len) == Some(groups))
        .then_some(())
    })
    .await;
}

/// Every key's total equals the ledger on both proxies, every range count
/// over the first two seeded hours too, and the stored rows of each key are
/// on one master only.
async fn check_exact(
    client: &Client,
    proxies: &[&TestProxy],
    cluster: &Cluster,
    data_groups: usize,
    ns: &str,
    ledger: &HashMap<String, Vec<(i64, i64)>>,
) {
    let base = base_ts();
    for p in proxies {
        for (key, events) in ledger {
            let want: i64 = events.iter().map(|(_, d)| d).sum();
            assert_eq!(
                total(client, &p.url(""), ns, key, false).await,
                Some(want),
                "total of {key}"
            );
            let want_range: i64 = events
                .iter()
                .filter(|(ts, _)| (base..base + 7200).contains(ts))
                .map(|(_, d)| d)
                .sum();
            assert_eq!(
                count(client, &p.url(""), ns, key, base, base + 7200).await,
                Some(want_range),
                "count of {key}"
            );
        }
    }
    let mut holders: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut sums: HashMap<Vec<u8>, i64> = HashMap::new();
    for g in 0..data_groups {
        for ((key, _), (c, _)) in stored::rows(&cluster.group(g).master, "counter_total", ns).await
        {
            *holders.entry(key.clone()).or_default() += 1;
            *sums.entry(key).or_default() += c;
        }
    }
    for (key, events) in ledger {
        let k = key.as_bytes().to_vec();
        assert_eq!(
            holders.get(&k),
            Some(&1),
            "{key} is stored on exactly one master"
        );
        assert_eq!(
            sums.get(&k),
            Some(&events.iter().map(|(_, d)| d).sum()),
            "{key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grow_and_shrink_under_load_through_two_proxies() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::start(ClusterSpec {
        groups: 4,
        replicas: 1,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let p0 = proxy(&cluster, 2, Duration::from_millis(100), 50_000).await;
    let p1 = proxy(&cluster, 2, Duration::from_millis(100), 50_000).await;
    let client = Client::new();
    let old = seed(&client, &p0, "old", 600).await;
    // Issue #22: events with ids counted before the reshards; their
    // retries after each one find the ids moved with their counters.
    let with_ids: Value = (0..200)
        .map(|i| json!({ "ns": "ids", "key": format!("i{}", i % 100), "delta": 1 + i % 3, "id": format!("e{i}") }))
        .collect();
    let retry = |want_duplicates: u64| {
        let (client, url, body) = (
            client.clone(),
            p1.url("/v1/events?ack=committed"),
            with_ids.clone(),
        );
        async move {
            let (status, answer) = client.post_json(&url, &body).await.expect("post ids");
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["duplicates"], want_duplicates, "{answer}");
        }
    };
    retry(0).await;
    // Readers below read replicas too: start them once the seed is there.
    cluster
        .wait_replicas_caught_up()
        .await
        .expect("replicas caught up");

    // Writers through both proxies keep a ledger of acknowledged deltas;
    // readers check the pre-reshard keys at every sample.
    let stop = Arc::new(AtomicBool::new(false));
    let live: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let wrong: Arc<Mutex<Vec<String>>> = Arc::default();
    let samples = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Batch-query and top answers that were compared (200s only).
    let compared = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (w, url) in [p0.url(""), p1.url("")].into_iter().enumerate() {
        let (stop, live, client) = (stop.clone(), live.clone(), Client::new());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let events: Vec<(String, i64, i64)> = (0..20)
                    .map(|j| {
                        (
                            format!("w{}", (i * 7 + j + w as u64 * 3) % 300),
                            1,
                            base_ts() + 4 * 3600,
                        )
                    })
                    .collect();
                if write(&client, &url, "live", &events).await == 200 {
                    let mut l = live.lock().expect("ledger");
                    for (k, d, _) in &events {
                        *l.entry(k.clone()).or_default() += d;
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    for url in [p0.url(""), p1.url("")] {
        let (stop, wrong, samples, client) =
            (stop.clone(), wrong.clone(), samples.clone(), Client::new());
        let compared = compared.clone();
        let old = old.clone();
        let keys: Vec<String> = old.keys().cloned().collect();
        // The top 5 of the seeded keys: by total, ties by key bytes.
        let mut ranked: Vec<(i64, &String)> = old
            .iter()
            .map(|(k, e)| (e.iter().map(|(_, d)| d).sum(), k))
            .collect();
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        let top5: Value = ranked
            .iter()
            .take(5)
            .map(|(c, k)| json!({ "key": k, "count": c }))
            .collect();
        tasks.push(tokio::spawn(async move {
            let base = base_ts();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let key = &keys[(i * 31) % keys.len()];
                let want: i64 = old[key].iter().map(|(_, d)| d).sum();
                let want_range: i64 = old[key]
                    .iter()
                    .filter(|(ts, _)| (base + 3600..base + 3 * 3600).contains(ts))
                    .map(|(_, d)| d)
                    .sum();
                let got = total(&client, &url, "old", key, i.is_multiple_of(2)).await;
                let got_range = count(&client, &url, "old", key, base + 3600, base + 3 * 3600).await;
                // A failed read (None) is not a wrong answer; a number must be exact.
                if got.is_some_and(|g| g != want) || got_range.is_some_and(|g| g != want_range) {
                    wrong.lock().expect("wrong").push(format!(
                        "{key} at {:?} via {url}: total {got:?} (want {want}, strong {}), count {got_range:?} (want {want_range})",
                        std::time::SystemTime::now(), i.is_multiple_of(2)
                    ));
                }
                // Every 8th sample: a batch query of 8 keys and the top 5,
                // which take their own moved-key paths.
                if i.is_multiple_of(8) {
                    let batch: Vec<&String> = (0..8).map(|j| &keys[(i + j * 97) % keys.len()]).collect();
                    let (status, v) = client
                        .post_json(&format!("{url}/v1/counters/query"), &json!({ "ns": "old", "keys": batch }))
                        .await
                        .unwrap_or((0, Value::Null));
                    if status == 200 {
                        compared.fetch_add(1, Ordering::Relaxed);
                        for r in v["results"].as_array().into_iter().flatten() {
                            let k = r["key"].as_str().unwrap_or_default();
                            let want: i64 = old.get(k).map_or(-1, |e| e.iter().map(|(_, d)| d).sum());
                            if r["count"].as_i64() != Some(want) {
                                wrong.lock().expect("wrong").push(format!("query {k}: {r} (want {want})"));
                            }
                        }
                    }
                    let (status, v) = client.get(&format!("{url}/v1/top/old?limit=5")).await.unwrap_or((0, Value::Null));
                    if status == 200 {
                        compared.fetch_add(1, Ordering::Relaxed);
                        if v["items"] != top5 {
                            wrong.lock().expect("wrong").push(format!("top: {} (want {top5})", v["items"]));
                        }
                    }
                }
                samples.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }

    // 2 → 3, started through p1.
    let plan = start_reshard(&client, &p1, &topology(&cluster, 3)).await;
    assert!(
        plan["moves"]
            .as_array()
            .is_some_and(|m| m.iter().all(|x| x["target"] == "g2")),
        "{plan}"
    );
    let f = plan["fraction"].as_f64().unwrap_or(0.0);
    assert!((0.2..0.5).contains(&f), "{plan}");
    // While it runs, a plain topology change is refused with a pointer.
    let v = eventually(
        Duration::from_secs(5),
        "p0 to follow the reshard",
        || async { p0.topology_version(&client).await.filter(|v| *v >= 2) },
    )
    .await;
    let (status, body) = p0.put_topology(&client, &topology(&cluster, 2), v).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "reshard_in_progress", "{body}");
    wait_done(&client, &p0, 3, Duration::from_secs(120)).await;
    wait_done(&client, &p1, 3, Duration::from_secs(10)).await;
    // Persisted with the topology: both proxies answer it, whichever drove.
    let done = reshard_status(&client, &p1.admin_url("")).await;
    assert_eq!(done, reshard_status(&client, &p0.admin_url("")).await);
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["last"]["outcome"], "done", "{done}");
    let verified = done["last"]["verified"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!verified.is_empty(), "{done}");
    for v in &verified {
        assert_eq!(v["source_sum"], v["copied_sum"], "{v}");
        assert_eq!(v["source_counters"], v["copied_counters"], "{v}");
    }
    let mid = samples.load(Ordering::Relaxed);
    retry(200).await;

    // 3 → 2, started through p0.
    start_reshard(&client, &p0, &topology(&cluster, 2)).await;
    wait_done(&client, &p1, 2, Duration::from_secs(120)).await;
    wait_done(&client, &p0, 2, Duration::from_secs(10)).await;
    retry(200).await;

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("task");
    }
    flush(&client, &p0).await;
    flush(&client, &p1).await;
    let wrong = wrong.lock().expect("wrong").clone();
    let samples = samples.load(Ordering::Relaxed);
    println!(
        "{samples} samples of pre-reshard keys ({mid} during 2→3), {} wrong",
        wrong.len()
    );
    assert!(
        wrong.is_empty(),
        "reads during the reshards were wrong: {:?}",
        &wrong[..wrong.len().min(10)]
    );
    let compared = compared.load(Ordering::Relaxed);
    assert!(compared > 20, "batch queries and tops compared: {compared}");
    assert!(
        mid > 20 && samples > mid,
        "readers sampled during both reshards ({mid}, {samples})"
    );

    check_exact(&client, &[&p0, &p1], &cluster, 3, "old", &old).await;
    for k in 0..100 {
        let want: i64 = (0..200).filter(|i| i % 100 == k).map(|i| 1 + i % 3).sum();
        let got = total(&client, &p0.url(""), "ids", &format!("i{k}"), true).await;
        assert_eq!(got, Some(want), "i{k} counted once across both reshards");
    }
    // The id sets went whole to g2 with the grow (from g0 and g1) and back
    // to both with the shrink: every group holds all 200 (an entry says
    // "counted", true wherever its counter moves).
    for g in 0..3 {
        let sets = cluster
            .group(g)
            .master
            .sql("SELECT COUNT(*) FROM tally.applied_id_sets WHERE skey LIKE 'e%'")
            .await
            .expect("count id sets");
        assert_eq!(sets[0].get::<i64, _>(0), Some(200), "g{g}'s id sets");
    }
    let live: HashMap<String, Vec<(i64, i64)>> = live
        .lock()
        .expect("ledger")
        .iter()
        .map(|(k, d)| (k.clone(), vec![(base_ts() + 4 * 3600, *d)]))
        .collect();
    assert!(!live.is_empty());
    check_exact(&client, &[&p0, &p1], &cluster, 3, "live", &live).await;
    // g2 was drained completely.
    assert!(
        stored::rows(&cluster.group(2).master, "counter_total", "old")
            .await
            .is_empty()
    );
    assert!(
        stored::rows(&cluster.group(2).master, "counter_minute", "live")
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_driver_is_replaced_and_a_cancel_restores_the_topology() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let bin =
        tokio::task::spawn_blocking(|| tally_integration::cargo_bin("tally-proxy", "tally-proxy"))
            .await
            .expect("build");
    let cluster = Cluster::start(ClusterSpec {
        groups: 4,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    // The survivor polls slowly, so the process below wins the lease first.
    let survivor = proxy(&cluster, 2, Duration::from_secs(2), 400).await;
    let client = Client::new();
    let old = seed(&client, &survivor, "old", 600).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port")
    };
    let (http, admin) = (free(), free());
    std::fs::write(
        dir.path().join("topology.yaml"),
        serde_yaml_ng::to_string(&topology(&cluster, 2)).expect("yaml"),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("proxy.yaml"),
        format!(
            "listen: {{ http: 127.0.0.1:{http}, admin: 127.0.0.1:{admin} }}\n\
             topology: {{ file: topology.yaml, store: '{}', poll_interval: 100ms, heartbeat_interval: 100ms }}\n\
             buffer: {{ flush_interval: 100ms }}\n\
             reshard: {{ poll_interval: 100ms, chunk_counters: 10, max_rows_per_sec: 400, cleanup_grace: 2s }}\n",
            store_dsn(&cluster).expose()
        ),
    )
    .expect("write config");
    let mut driver = KillOnDrop(
        Command::new(&bin)
            .arg("--config")
            .arg(dir.path().join("proxy.yaml"))
            .env("TALLY_ADMIN_TOKEN", TEST_TOKEN)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("proxy.log")).expect("log file"))
            .spawn()
            .expect("spawn proxy"),
    );
    let driver_admin = format!("http://127.0.0.1:{admin}");
    // Ready within a minute, or fail with what the process said.
    let log = dir.path().join("proxy.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !matches!(
        client.get(&format!("http://127.0.0.1:{http}/readyz")).await,
        Ok((200, _))
    ) {
        let exited = driver.0.try_wait().ok().flatten();
        if exited.is_some() || std::time::Instant::now() > deadline {
            panic!(
                "the proxy process is not ready ({exited:?}); its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Kill the driving process in the middle of the copy.
    start_reshard(&client, &survivor, &topology(&cluster, 3)).await;
    let copied = eventually(
        Duration::from_secs(60),
        "the process to drive and copy",
        || async {
            let s = reshard_status(&client, &driver_admin).await;
            let n = s["driver"]["rows_copied"].as_u64().unwrap_or(0);
            (n > 0 && s["phase"] == "copying").then_some(n)
        },
    )
    .await;
    driver.0.kill().expect("kill -9");
    let _ = driver.0.wait();
    println!("killed the driver after {copied} rows were copied");
    // Exact while nobody drives, then the survivor takes over and finishes.
    let some: Vec<&String> = old.keys().take(50).collect();
    for key in &some {
        let want: i64 = old[*key].iter().map(|(_, d)| d).sum();
        assert_eq!(
            total(&client, &survivor.url(""), "old", key, false).await,
            Some(want)
        );
    }
    wait_done(&client, &survivor, 3, Duration::from_secs(120)).await;
    let s = reshard_status(&client, &survivor.admin_url("")).await;
    assert_eq!(s["last"]["outcome"], "done", "{s}");
    check_exact(&client, &[&survivor], &cluster, 3, "old", &old).await;

    // A cancelled reshard (3 → 2) comes back to 3 groups, exact.
    let extra = seed(&client, &survivor, "extra", 100).await;
    start_reshard(&client, &survivor, &topology(&cluster, 2)).await;
    eventually(Duration::from_secs(60), "some rows copied", || async {
        let s = reshard_status(&client, &survivor.admin_url("")).await;
        (s["driver"]["rows_copied"].as_u64().unwrap_or(0) > 0).then_some(())
    })
    .await;
    let (status, body) = client
        .admin_post(&survivor.admin_url("/admin/v1/reshard/cancel"), TEST_TOKEN)
        .await
        .expect("cancel");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["phase"], "cancelling", "{body}");
    wait_done(&client, &survivor, 3, Duration::from_secs(120)).await;
    let s = reshard_status(&client, &survivor.admin_url("")).await;
    assert_eq!(s["state"], "cancelled", "{s}");
    assert!(s["last"]["reverted_by"].is_string(), "{s}");
    let (_, t) = client
        .admin_get(&survivor.admin_url("/admin/v1/topology"), TEST_TOKEN)
        .await
        .expect("topology");
    let names: Vec<&str> = t["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g["name"].as_str())
        .collect();
    assert_eq!(names, ["g0", "g1", "g2"], "{t}");
    check_exact(&client, &[&survivor], &cluster, 3, "old", &old).await;
    check_exact(&client, &[&survivor], &cluster, 3, "extra", &extra).await;
    // Cancelling when nothing runs is a clear 404.
    let (status, _) = client
        .admin_post(&survivor.admin_url("/admin/v1/reshard/cancel"), TEST_TOKEN)
        .await
        .expect("cancel");
    assert_eq!(status, 404);
}

/// While a reshard moves keys (held before its copy here, so every moved
/// key is split: its history on the source, newer writes on the target),
/// top-K is exact, eventual and strong, and reads a number of keys that
/// depends on the limit, not on how many keys the reshard moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_k_during_a_reshard_is_exact_and_reads_few_keys() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::start(ClusterSpec {
        groups: 3,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let yaml = serde_yaml_ng::to_string(&topology(&cluster, 2)).expect("yaml");
    // No driver pass within the test (nothing is copied) and no flush but
    // the admin flushes below.
    let p = TestProxy::start_with_topology(&yaml, |c| {
        c.buffer.flush_interval = Duration::from_secs(3600);
        c.reshard.poll_interval = Duration::from_secs(3600);
    })
    .await;
    let client = Client::new();
    let base = base_ts();
    let mut rng = fastrand::Rng::with_seed(23);
    // Far-apart totals: a top-K needs a few rows per group.
    let mut before: HashMap<String, i64> = HashMap::new();
    let mut events = Vec::new();
    for i in 0..3000i64 {
        let (key, c) = (format!("t{i:04}"), (i * 7919 % 3000) * 10 + 1);
        let ts = base + (i % 2) * 3600;
        events.push((key.clone(), c, ts));
        before.insert(key, c);
    }
    for chunk in events.chunks(2000) {
        assert_eq!(write(&client, &p.url(""), "top", chunk).await, 200);
    }
    flush(&client, &p).await;
    let plan = start_reshard(&client, &p, &topology(&cluster, 3)).await;
    assert!(
        plan["moves"]
            .as_array()
            .is_some_and(|m| m.iter().all(|x| x["target"] == "g2")),
        "{plan}"
    );
    // After the switch: small deltas on every key (moved keys' go to g2),
    // large ones on a few, new keys; all pending until flushed.
    let mut after: Vec<(String, i64, i64)> = Vec::new();
    for i in 0..3000i64 {
        after.push((format!("t{i:04}"), rng.i64(-5..=5), base + 3600));
    }
    for i in [7i64, 123, 2999] {
        after.push((format!("t{i:04}"), 40_000 + i, base + 3600));
    }
    let top_keys: Vec<String> = {
        let mut v: Vec<(&String, &i64)> = before.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        v.iter().take(4).map(|(k, _)| (*k).clone()).collect()
    };
    for k in &top_keys {
        after.push((k.clone(), -29_000, base));
    }
    for j in 0..5i64 {
        after.push((format!("new{j}"), 29_995 + j, base + 3600));
    }
    assert_eq!(write(&client, &p.url(""), "top", &after).await, 200);
    let with_after = |range: Option<(i64, i64)>| {
        let mut out: HashMap<String, i64> = HashMap::new();
        for (k, c, ts) in events.iter().chain(&after) {
            if range.is_none_or(|(f, t)| (f..t).contains(ts)) {
                *out.entry(k.clone()).or_default() += c;
            }
        }
        out
    };
    let only_before = |range: Option<(i64, i64)>| {
        let mut out: HashMap<String, i64> = HashMap::new();
        for (k, c, ts) in &events {
            if range.is_none_or(|(f, t)| (f..t).contains(ts)) {
                *out.entry(k.clone()).or_default() += c;
            }
        }
        out
    };
    let top = |limit: usize, range: Option<(i64, i64)>, consistency: &'static str| {
        let q = match range {
            Some((f, t)) => format!("/v1/top/top?limit={limit}&from={f}&to={t}"),
            None => format!("/v1/top/top?limit={limit}"),
        };
        let url = p.url(&format!("{q}&consistency={consistency}"));
        let client = &client;
        async move {
            let (status, body) = client.get(&url).await.expect("top");
            assert_eq!(status, 200, "{url}: {body}");
            body["items"].clone()
        }
    };
    let second_hour = Some((base + 3600, base + 7200));
    for limit in [1, 5, 50] {
        for range in [None, second_hour] {
            assert_eq!(
                top(limit, range, "strong").await,
                expected::top_k(&with_after(range), limit),
                "strong top {limit} over {range:?}, deltas pending"
            );
            assert_eq!(
                top(limit, range, "eventual").await,
                expected::top_k(&only_before(range), limit),
                "eventual top {limit} over {range:?}, deltas pending"
            );
        }
    }
    // Flushed: moved keys now have rows on both groups.
    flush(&client, &p).await;
    for limit in [1, 5, 50] {
        for range in [None, second_hour] {
            for consistency in ["eventual", "strong"] {
                assert_eq!(
                    top(limit, range, consistency).await,
                    expected::top_k(&with_after(range), limit),
                    "{consistency} top {limit} over {range:?}, flushed"
                );
            }
        }
    }
    // About a third of 3,000 keys moved, every one with rows on both
    // groups; the top 5 reads a few dozen rows, not all of theirs.
    let masters: Vec<&tally_harness::Node> = (0..3).map(|g| &cluster.group(g).master).collect();
    let mut sent_before = 0;
    for m in &masters {
        sent_before += stored::rows_sent(m).await;
    }
    let limit = 5;
    assert_eq!(
        top(limit, None, "eventual").await,
        expected::top_k(&with_after(None), limit)
    );
    let mut sent_after = 0;
    for m in &masters {
        sent_after += stored::rows_sent(m).await;
    }
    // Minus the `SHOW STATUS` row each master sent us.
    let rows = sent_after - sent_before - masters.len() as u64;
    println!("eventual top {limit} during the reshard: {rows} rows sent");
    assert!(
        rows <= 50 * limit as u64,
        "an eventual top {limit} during a reshard read {rows} rows from the masters"
    );
    p.crash();
}

/// Issue #19 item 6: how a reshard ended is persisted with the topology,
/// so every proxy answers the same `GET /admin/v1/reshard` (`id`, `state`,
/// `progress`), from the shared store and from the file, also after a
/// restart: `done` for a finished reshard, `cancelled` for a cancelled one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_proxy_answers_how_the_last_reshard_ended_also_after_a_restart() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    // g0 and g1 hold data; the store lives in g1's master (another database).
    let store =
        tally_admin::Dsn::parse(&cluster.group(1).master.root_dsn("tally_meta")).expect("dsn");
    let two: Value = serde_yaml_ng::from_str(&cluster.topology_yaml(64)).expect("yaml");
    let start = |store: Option<tally_admin::Dsn>, doc: &Value| {
        let yaml = serde_yaml_ng::to_string(doc).expect("yaml");
        async move {
            TestProxy::start_with_topology(&yaml, move |c| {
                c.topology_store = store;
                c.store_poll_interval = Duration::from_millis(100);
                c.heartbeat_interval = Duration::from_millis(100);
                c.reshard.poll_interval = Duration::from_millis(100);
                c.reshard.chunk_counters = 25;
                c.reshard.max_rows_per_sec = 200;
                c.reshard.cleanup_grace = Duration::from_millis(300);
            })
            .await
        }
    };
    let p0 = start(Some(store.clone()), &two).await;
    let mut p1 = start(Some(store.clone()), &two).await;
    let client = Client::new();
    let status = |p: &TestProxy| {
        let (client, url) = (client.clone(), p.admin_url(""));
        async move { reshard_status(&client, &url).await }
    };

    // No reshard ever ran: inactive, no state, the old fields still there.
    let s = status(&p1).await;
    assert_eq!(s["active"], json!(false), "{s}");
    assert!(s["state"].is_null() && s["id"].is_null(), "{s}");
    assert_eq!(s["version"], json!(1), "{s}");
    let old = seed(&client, &p0, "old", 100).await;

    // A reshard started through p0 (g0 weight 1 → 3, which moves seeded
    // keys) ends `done`; every proxy answers the same id, whichever drove it.
    let mut heavier = two.clone();
    heavier["groups"][0]["weight"] = json!(3);
    let yaml = |d: &Value| serde_yaml_ng::to_string(d).expect("yaml");
    let owner = |d: &Value, k: &str| tally_integration::routing::owner(&yaml(d), "old", k);
    assert!(old.keys().any(|k| owner(&two, k) != owner(&heavier, k)));
    let id = start_reshard(&client, &p0, &heavier).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let s = eventually(Duration::from_secs(10), "p1 to see it", || async {
        let s = status(&p1).await;
        (s["id"] == json!(id)).then_some(s)
    })
    .await;
    assert!(
        ["copying", "cleaning", "done"].contains(&s["state"].as_str().unwrap_or("")),
        "{s}"
    );
    for p in [&p0, &p1] {
        let s = eventually(Duration::from_secs(60), "the reshard to end", || async {
            let s = status(p).await;
            (s["state"] == "done").then_some(s)
        })
        .await;
        assert_eq!(s["id"], json!(id), "{s}");
        assert_eq!(s["active"], json!(false), "{s}");
        assert_eq!(s["progress"], json!(1.0), "{s}");
        assert_eq!(s["last"]["state"], "done", "{s}");
        // Keys moved, and the copies matched the source.
        let v = &s["last"]["verified"][0];
        assert!(v["source_counters"].as_u64() > Some(0), "{s}");
        assert_eq!(v["source_sum"], v["copied_sum"], "{s}");
    }
    check_exact(&client, &[&p0, &p1], &cluster, 2, "old", &old).await;

    // A PUT that omits the outcome is not refused and does not drop it
    // (groups reordered: a new version that moves no key).
    let (_, t) = client
        .admin_get(&p1.admin_url("/admin/v1/topology"), TEST_TOKEN)
        .await
        .expect("topology");
    assert_eq!(t["last_reshard"]["id"], json!(id), "{t}");
    let mut put = t.clone();
    put.as_object_mut().expect("doc").remove("last_reshard");
    put["groups"].as_array_mut().expect("groups").reverse();
    let v = t["version"].as_u64().expect("version");
    let (code, body) = p1.put_topology(&client, &put, v).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["version"], json!(v + 1), "{body}");
    let s = status(&p1).await;
    assert_eq!((&s["state"], &s["id"]), (&json!("done"), &json!(id)), "{s}");

    // After a restart (through the store), and on a proxy started from the
    // persisted document alone (the file), the answer is the same.
    p1.stop().await.expect("stop");
    p1 = start(Some(store.clone()), &two).await;
    let s = eventually(Duration::from_secs(10), "the restarted proxy", || async {
        let s = status(&p1).await;
        (s["version"] == json!(v + 1)).then_some(s)
    })
    .await;
    assert_eq!((&s["state"], &s["id"]), (&json!("done"), &json!(id)), "{s}");
    let (_, t) = client
        .admin_get(&p1.admin_url("/admin/v1/topology"), TEST_TOKEN)
        .await
        .expect("topology");
    let alone = start(None, &t).await;
    let s = status(&alone).await;
    assert_eq!((&s["state"], &s["id"]), (&json!("done"), &json!(id)), "{s}");
    alone.stop().await.expect("stop");

    // A reshard cancelled while copying (through the other proxy) ends
    // `cancelled` under its own id, on every proxy and after a restart.
    let mut back = t.clone();
    back.as_object_mut().expect("doc").remove("last_reshard");
    for g in back["groups"].as_array_mut().expect("groups") {
        g["weight"] = json!(1);
    }
    // p0 starts the next reshard from the newest version (a reshard
    // start from an older one is a 409 version_conflict).
    eventually(Duration::from_secs(10), "p0 to follow the PUT", || async {
        (p0.topology_version(&client).await == Some(v + 1)).then_some(())
    })
    .await;
    let id2 = start_reshard(&client, &p0, &back).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    eventually(Duration::from_secs(10), "p1 to see it", || async {
        let s = status(&p1).await;
        (s["id"] == json!(id2) && s["state"] == "copying").then_some(())
    })
    .await;
    let (code, body) = client
        .admin_post(&p1.admin_url("/admin/v1/reshard/cancel"), TEST_TOKEN)
        .await
        .expect("cancel");
    assert_eq!(code, 200, "{body}");
    let s = status(&p1).await;
    assert!(
        ["cancelling", "cancelled"].contains(&s["state"].as_str().unwrap_or("")),
        "{s}"
    );
    for p in [&p0, &p1] {
        let s = eventually(Duration::from_secs(60), "the cancel to end", || async {
            let s = status(p).await;
            (s["state"] == "cancelled").then_some(s)
        })
        .await;
        assert_eq!(s["id"], json!(id2), "{s}");
        assert_eq!(s["active"], json!(false), "{s}");
        assert_eq!(s["progress"], json!(1.0), "{s}");
    }
    p1.stop().await.expect("stop");
    let p1 = start(Some(store), &two).await;
    let s = status(&p1).await;
    assert_eq!(
        (&s["state"], &s["id"]),
        (&json!("cancelled"), &json!(id2)),
        "{s}"
    );
    check_exact(&client, &[&p0, &p1], &cluster, 2, "old", &old).await;
}
