//! 200k random events through the real proxy into two real groups: every
//! stored minute, hour, day and total row equals what the test computed, and
//! every row sits on the group the ring names, with the ring position the
//! ring uses.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tally_admin::{ShardRing, TopologyDoc, routing_key};
use tally_harness::{Cluster, ClusterSpec};
use tally_integration::{Client, TEST_TOKEN, TestProxy, eventually, stored};

const NS: &str = "exact";
const EVENTS: usize = 200_000;
const WORKERS: usize = 16;

#[derive(Clone)]
struct Ev {
    key: String,
    delta: i64,
    ts: i64,
}

/// A request to send: its events and how to encode them.
enum Req {
    Array(Vec<Ev>),
    Ndjson(Vec<Ev>),
    Object(Ev),
    Incr(Ev),
}

fn generate(now: i64) -> Vec<Ev> {
    let mut rng = fastrand::Rng::with_seed(20261125);
    (0..EVENTS)
        .map(|i| {
            // Skewed: a few hot keys take most events, a long tail the rest.
            let idx = (rng.f64().powi(3) * 5000.0) as usize;
            let key = if idx.is_multiple_of(7) {
                format!("vidéo-{idx}")
            } else {
                format!("k{idx}")
            };
            // 2% late events up to 6 days old; the rest within 3 days.
            let age = if i.is_multiple_of(50) {
                rng.i64(3 * 86400..6 * 86400)
            } else {
                rng.i64(0..3 * 86400)
            };
            Ev {
                key,
                delta: rng.i64(-5..=20),
                ts: now - age,
            }
        })
        .collect()
}

fn plan(events: Vec<Ev>) -> VecDeque<Req> {
    let sizes = [1usize, 10, 500, 2000, 37, 1, 250];
    let mut reqs = VecDeque::new();
    let mut it = events.into_iter().peekable();
    let mut n = 0usize;
    while it.peek().is_some() {
        let size = sizes[n % sizes.len()];
        let chunk: Vec<Ev> = it.by_ref().take(size).collect();
        let req = match (chunk.len(), n % 4) {
            (1, 0) | (1, 2) => Req::Object(chunk[0].clone()),
            (1, _) => Req::Incr(chunk[0].clone()),
            (_, 1) | (_, 3) => Req::Ndjson(chunk),
            _ => Req::Array(chunk),
        };
        reqs.push_back(req);
        n += 1;
    }
    reqs
}

fn event_json(e: &Ev) -> Value {
    json!({ "ns": NS, "key": e.key, "delta": e.delta, "ts": e.ts })
}

async fn send(client: &Client, proxy: &TestProxy, req: Req) -> usize {
    let (status, body) = match &req {
        Req::Array(evs) => client
            .post_json(
                &proxy.url("/v1/events"),
                &Value::Array(evs.iter().map(event_json).collect()),
            )
            .await
            .expect("post array"),
        Req::Ndjson(evs) => {
            let body: String = evs.iter().map(|e| format!("{}\n", event_json(e))).collect();
            client
                .post_body(
                    &proxy.url("/v1/events"),
                    "application/x-ndjson",
                    body.into_bytes(),
                )
                .await
                .expect("post ndjson")
        }
        Req::Object(e) => client
            .post_json(&proxy.url("/v1/events"), &event_json(e))
            .await
            .expect("post object"),
        Req::Incr(e) => {
            let key: String = url_encode(&e.key);
            client
                .post_body(
                    &proxy.url(&format!(
                        "/v1/counters/{NS}/{key}/incr?delta={}&ts={}",
                        e.delta, e.ts
                    )),
                    "application/json",
                    Vec::new(),
                )
                .await
                .expect("post incr")
        }
    };
    assert_eq!(status, 200, "{body}");
    body["accepted"].as_u64().expect("accepted count") as usize
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

type Expected = BTreeMap<(Vec<u8>, i64), i64>;

/// What each tier holds once the rollup has reached `watermark`: minute
/// rows and totals of every event, hour and day rows of the minutes below
/// it (schema version 2).
fn expected(events: &[Ev], watermark: i64) -> [(&'static str, Expected); 4] {
    let mut tiers: [(&'static str, Expected); 4] = [
        ("counter_minute", BTreeMap::new()),
        ("counter_hour", BTreeMap::new()),
        ("counter_day", BTreeMap::new()),
        ("counter_total", BTreeMap::new()),
    ];
    for e in events {
        for (table, map) in tiers.iter_mut() {
            let rolled = e.ts - e.ts.rem_euclid(60) < watermark;
            if matches!(*table, "counter_hour" | "counter_day") && !rolled {
                continue;
            }
            let bucket = match *table {
                "counter_minute" => e.ts - e.ts.rem_euclid(60),
                "counter_hour" => e.ts - e.ts.rem_euclid(3600),
                "counter_day" => e.ts - e.ts.rem_euclid(86400),
                _ => 0,
            };
            *map.entry((e.key.as_bytes().to_vec(), bucket)).or_default() += e.delta;
        }
    }
    for (_, map) in tiers.iter_mut() {
        // A bucket whose deltas cancel may or may not have a row (it does
        // when the cancelling deltas landed in different batches); either
        // way its count is 0, so compare non-zero buckets only.
        map.retain(|_, v| *v != 0);
    }
    tiers
}

/// Two groups without replicas, shared by this file's tests (each writes
/// its own namespace).
async fn shared_cluster() -> &'static Cluster {
    Cluster::shared(ClusterSpec {
        groups: 2,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_of_every_tier_matches_the_sum_of_200k_events() {
    let cluster = shared_cluster().await;
    let proxy = TestProxy::start(cluster, |c| {
        c.rollup.interval = Duration::from_millis(100);
        c.rollup.delay = Duration::ZERO;
    })
    .await;
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64
    };
    let now = unix_now();
    let events = generate(now);
    let queue = Arc::new(Mutex::new(plan(events.clone())));
    let client = Client::new();

    let workers = (0..WORKERS).map(|_| {
        let (queue, client, proxy) = (queue.clone(), client.clone(), &proxy);
        async move {
            let mut sent = 0;
            loop {
                let next = queue.lock().expect("queue").pop_front();
                let Some(req) = next else { return sent };
                sent += send(&client, proxy, req).await;
            }
        }
    });
    let accepted: usize = futures::future::join_all(workers).await.into_iter().sum();
    assert_eq!(accepted, EVENTS);

    let (status, body) = client
        .admin_post(&proxy.admin_url("/admin/v1/flush"), TEST_TOKEN)
        .await
        .expect("flush");
    assert_eq!(status, 200, "{body}");

    // Every group's rollup reaches the last whole hour: its hour and day
    // rows then hold every earlier minute.
    let watermark = eventually(
        Duration::from_secs(60),
        "every group rolled up to the last whole hour",
        || async {
            let limit = unix_now() - unix_now().rem_euclid(3600);
            for group in cluster.groups() {
                let rows = group
                    .master
                    .sql("SELECT watermark FROM tally.rollup_state WHERE id = 1")
                    .await
                    .expect("watermark");
                if rows[0].get::<i64, _>(0) != Some(limit) {
                    return None;
                }
            }
            Some(limit)
        },
    )
    .await;
    let want = expected(&events, watermark);
    let topology = TopologyDoc::parse_and_validate(&cluster.topology_yaml(160)).expect("topology");
    let ring = ShardRing::new(&topology);
    for (table, want) in &want {
        let mut got = BTreeMap::new();
        for group in cluster.groups() {
            for ((key, bucket), (count, pos)) in stored::rows(&group.master, table, NS).await {
                let rk = routing_key(NS, std::str::from_utf8(&key).expect("utf8 key"));
                assert_eq!(
                    ring.owner_name(&rk),
                    Some(group.name.as_str()),
                    "{table} row on the wrong group"
                );
                assert_eq!(
                    pos,
                    ShardRing::position(&rk),
                    "{table} ring_pos disagrees with the ring"
                );
                if count != 0 {
                    got.insert((key, bucket), count);
                }
            }
        }
        assert_eq!(got.len(), want.len(), "{table}: row count");
        for (k, v) in want {
            assert_eq!(
                got.get(k),
                Some(v),
                "{table} {:?} bucket {}",
                String::from_utf8_lossy(&k.0),
                k.1
            );
        }
    }
    // Both groups took part.
    for group in cluster.groups() {
        assert!(
            !stored::rows(&group.master, "counter_total", NS)
                .await
                .is_empty(),
            "{} got no rows",
            group.name
        );
    }

    // Totals read back through the API agree (strong: master + pending).
    for key in ["k0", "k1", "vidéo-0"] {
        let want_total = want[3]
            .1
            .get(&(key.as_bytes().to_vec(), 0))
            .copied()
            .unwrap_or(0);
        let (status, body) = client
            .get(&proxy.url(&format!(
                "/v1/counters/{NS}/{}?consistency=strong",
                url_encode(key)
            )))
            .await
            .expect("read");
        assert_eq!(status, 200);
        assert_eq!(body["total"], json!(want_total), "{key}");
    }
    proxy.stop().await.expect("clean stop");
}

/// The longest `writer_id` prefix `proxy.yaml` accepts (up to 200 bytes).
fn longest_accepted_writer_id() -> String {
    (1..=200)
        .map(|n| "w".repeat(n))
        .take_while(|id| {
            tally_proxy::ProxyConfig::from_yaml(&format!("writer_id: {id}\n"), std::iter::empty())
                .is_ok()
        })
        .last()
        .expect("some writer_id is accepted")
}

/// Issue #18, item 1: a restart must never reuse the previous life's dedup
/// identity. Two lives of a proxy with the longest prefix the config
/// accepts each commit one increment to the same 50 counters; every total
/// must read 2 (a collision makes the second life's batches look "already
/// applied", so they read 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_lives_with_the_longest_accepted_writer_id_count_every_committed_write() {
    let prefix = longest_accepted_writer_id();
    let cluster = shared_cluster().await;
    let client = Client::new();
    let events: Vec<Value> = (0..50)
        .map(|i| json!({ "ns": "lives", "key": format!("k{i}") }))
        .collect();
    for life in 1..=2 {
        let id = prefix.clone();
        let proxy = TestProxy::start(cluster, move |c| c.writer_id = Some(id)).await;
        let (status, body) = client
            .post_json(&proxy.url("/v1/events?ack=committed"), &json!(events))
            .await
            .expect("write");
        assert_eq!(status, 200, "life {life}: {body}");
        proxy.stop().await.expect("clean stop");
    }
    let proxy = TestProxy::start(cluster, |_| {}).await;
    for i in 0..50 {
        let (status, body) = client
            .get(&proxy.url(&format!("/v1/counters/lives/k{i}?consistency=strong")))
            .await
            .expect("read");
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["total"],
            2,
            "k{i}: both lives' committed increments must count (writer_id prefix of {} bytes)",
            prefix.len()
        );
    }
    proxy.stop().await.expect("clean stop");
}

/// A flusher that panics after its batch committed (a bug, simulated by a
/// failpoint) is restarted by its supervisor with the batch intact: the
/// restarted flusher retries it under the same `(writer_id, seq)`, finds it
/// applied, and wakes the `ack=committed` writer. Every increment counts
/// exactly once, the group keeps flushing, and the restart is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicked_flusher_restarts_with_its_batch_and_counts_it_once() {
    let cluster = shared_cluster().await;
    let client = Client::new();
    let prefix = "panicking-flusher";
    let proxy = TestProxy::start(cluster, |c| {
        c.writer_id = Some(prefix.into());
        c.buffer.commit_timeout = Duration::from_secs(20);
    })
    .await;
    let events: Vec<Value> = (0..40)
        .map(|i| json!({ "ns": "panics", "key": format!("k{i}"), "delta": 3 }))
        .collect();
    tally_proxy::failpoint::arm("flusher.after_commit", prefix);
    let (status, body) = client
        .post_json(&proxy.url("/v1/events?ack=committed"), &json!(events))
        .await
        .expect("write");
    assert_eq!(
        status, 200,
        "the write must commit across the panic: {body}"
    );
    // The restarted flusher keeps flushing later batches.
    let (status, body) = client
        .post_json(&proxy.url("/v1/events?ack=committed"), &json!(events))
        .await
        .expect("second write");
    assert_eq!(status, 200, "{body}");
    for i in 0..40 {
        let (status, body) = client
            .get(&proxy.url(&format!("/v1/counters/panics/k{i}?consistency=strong")))
            .await
            .expect("read");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["total"], 6, "k{i} counted once per write");
    }
    let metrics = proxy.metrics().await;
    let restarts: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("tally_flusher_restarts_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(restarts, 1, "{metrics}");
    proxy.stop().await.expect("clean stop");
}
