//! Writers and readers race (#24): with coalesced eventual reads and the
//! bounded-staleness cache on (the defaults), a client ledger per counter
//! checks what the README promises of reads:
//!
//! - an eventual read never exceeds what was sent;
//! - a write acknowledged as committed is visible to eventual reads within
//!   2 s (so a client never sees a counter go backwards by more than what
//!   was committed in the last 2 s);
//! - a strong read is at least everything acknowledged before it was sent
//!   and at most everything sent, and exact once the writers stopped;
//! - this proxy's own commits correct its cache at once (a read on the
//!   master right after an acknowledged commit sees it, whatever the
//!   cache's `max_age`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tally_harness::{Cluster, ClusterSpec};
use tally_integration::{Client, TestProxy};

/// What the README bounds an eventual read's staleness by in this test:
/// acknowledged commits are visible within it.
const VISIBLE_WITHIN: Duration = Duration::from_secs(2);

const KEYS: usize = 6;

/// Per counter: every committed acknowledgement (when it came, the sum
/// acknowledged so far) and the sum sent so far.
#[derive(Default)]
struct Ledger {
    acked: Vec<Vec<(Instant, i64)>>,
    sent: Vec<i64>,
}

impl Ledger {
    fn new() -> Ledger {
        Ledger {
            acked: vec![Vec::new(); KEYS],
            sent: vec![0; KEYS],
        }
    }

    /// The sum acknowledged for `k` before `t`.
    fn acked_before(&self, k: usize, t: Instant) -> i64 {
        let acks = &self.acked[k];
        let n = acks.partition_point(|(at, _)| *at < t);
        if n == 0 { 0 } else { acks[n - 1].1 }
    }

    fn acked(&self, k: usize) -> i64 {
        self.acked[k].last().map_or(0, |(_, s)| *s)
    }
}

fn key(k: usize) -> String {
    format!("race{k}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eventual_reads_stay_within_their_bound_and_strong_reads_exact_while_writers_race() {
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        replicas: 1,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    // A replica lagging a second is no longer read: together with the
    // cache's 100 ms and a probe interval, within the 2 s bound.
    let proxy = Arc::new(
        TestProxy::start(&cluster, |c| {
            c.reads.max_replica_lag = Duration::from_millis(500);
        })
        .await,
    );
    let defaults = tally_proxy::ProxyConfig::defaults();
    assert!(
        defaults.reads.coalesce.is_some() && defaults.reads.cache.is_some(),
        "the race runs with coalescing and the cache on, as by default"
    );
    let ledger = Arc::new(Mutex::new(Ledger::new()));
    let until = Instant::now() + Duration::from_secs(8);
    let client = Client::new();

    let mut writers = Vec::new();
    for w in 0..3usize {
        let (proxy, ledger, client) = (proxy.clone(), ledger.clone(), client.clone());
        writers.push(tokio::spawn(async move {
            let mut failed = 0u32;
            let mut i = w;
            while Instant::now() < until {
                i += 1;
                let k = i % KEYS;
                let delta = 1 + (i % 3) as i64;
                ledger.lock().expect("ledger").sent[k] += delta;
                let body = json!({ "ns": "race", "key": key(k), "delta": delta });
                let r = client
                    .post_json(&proxy.url("/v1/events?ack=committed"), &body)
                    .await;
                match r {
                    Ok((200, _)) => {
                        let now = Instant::now();
                        let mut l = ledger.lock().expect("ledger");
                        let sum = l.acked(k) + delta;
                        l.acked[k].push((now, sum));
                    }
                    _ => failed += 1,
                }
            }
            failed
        }));
    }

    let mut readers = Vec::new();
    for r in 0..8usize {
        let (proxy, ledger, client) = (proxy.clone(), ledger.clone(), client.clone());
        readers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(r as u64);
            let mut reads = 0u64;
            // Per counter: the highest value this client saw and when.
            let mut seen: HashMap<usize, i64> = HashMap::new();
            while Instant::now() < until {
                // Most reads on two hot counters, so they coalesce and hit.
                let k = if rng.bool() { rng.usize(0..2) } else { rng.usize(0..KEYS) };
                let strong = rng.u8(0..10) == 0;
                let q = if strong { "?consistency=strong" } else { "" };
                let url = proxy.url(&format!("/v1/counters/race/{}{q}", key(k)));
                let sent_at = Instant::now();
                let (status, body) = client.get(&url).await.expect("read");
                assert_eq!(status, 200, "{body}");
                let v = body["total"].as_i64().expect("total");
                let l = ledger.lock().expect("ledger");
                assert!(
                    v <= l.sent[k],
                    "{} read {v}, more than the {} sent",
                    key(k),
                    l.sent[k]
                );
                if strong {
                    let floor = l.acked_before(k, sent_at);
                    assert!(
                        v >= floor,
                        "strong read of {} = {v}, below the {floor} acknowledged before it was sent",
                        key(k)
                    );
                } else {
                    let floor = sent_at
                        .checked_sub(VISIBLE_WITHIN)
                        .map_or(0, |t| l.acked_before(k, t));
                    assert!(
                        v >= floor,
                        "eventual read of {} = {v}, below the {floor} acknowledged more than {VISIBLE_WITHIN:?} before it was sent",
                        key(k)
                    );
                    let before = seen.entry(k).or_insert(v);
                    // Backwards only by what was committed within the bound.
                    let recent = l.acked(k) - floor;
                    assert!(
                        *before - v <= recent,
                        "eventual read of {} went back from {before} to {v}, more than the {recent} committed in the last {VISIBLE_WITHIN:?}",
                        key(k)
                    );
                    *before = (*before).max(v);
                }
                drop(l);
                reads += 1;
            }
            reads
        }));
    }
    let mut failed = 0;
    for w in writers {
        failed += w.await.expect("writer");
    }
    let mut reads = 0;
    for r in readers {
        reads += r.await.expect("reader");
    }
    assert_eq!(failed, 0, "every committed write was acknowledged");
    assert!(reads > 100, "the readers ran ({reads} reads)");

    // Quiet: every counter reads exactly what was acknowledged, strong at
    // once and eventual within the bound.
    let (expected, sent) = {
        let l = ledger.lock().expect("ledger");
        let acked: Vec<i64> = (0..KEYS).map(|k| l.acked(k)).collect();
        (acked, l.sent.clone())
    };
    assert_eq!(
        expected, sent,
        "nothing failed, so everything sent was acknowledged"
    );
    let quiet = Instant::now();
    for (k, want) in expected.iter().enumerate() {
        let url = proxy.url(&format!("/v1/counters/race/{}?consistency=strong", key(k)));
        let (_, body) = client.get(&url).await.expect("strong");
        assert_eq!(body["total"], json!(want), "strong {}", key(k));
    }
    for (k, want) in expected.iter().enumerate() {
        loop {
            let (_, body) = client
                .get(&proxy.url(&format!("/v1/counters/race/{}", key(k))))
                .await
                .expect("eventual");
            if body["total"] == json!(want) {
                break;
            }
            assert!(
                quiet.elapsed() < VISIBLE_WITHIN,
                "eventual {} still {} after {VISIBLE_WITHIN:?}, want {want}",
                key(k),
                body["total"]
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // The race went through the new machinery.
    let metrics = proxy.metrics().await;
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        value("tally_read_cache_lookups_total{outcome=\"hit\"}") > 0.0,
        "some reads came from the cache:\n{metrics}"
    );
    assert!(
        value("tally_read_cache_forgotten_total") > 0.0,
        "commits corrected the cache"
    );
    assert!(
        value("tally_read_coalesced_total") > 0.0 || value("tally_read_batch_keys_count") > 0.0,
        "reads went through coalesced statements"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_proxys_commit_corrects_its_cache_at_once() {
    // No replica: eventual reads go to the master, so only the cache could
    // hide a committed write.
    let cluster = Cluster::start(ClusterSpec {
        groups: 1,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let proxy = TestProxy::start(&cluster, |c| {
        if let Some(cache) = c.reads.cache.as_mut() {
            cache.max_age = Duration::from_secs(60);
        }
    })
    .await;
    let client = Client::new();
    let url = proxy.url("/v1/counters/own/k");
    for i in 1..=20i64 {
        let (_, body) = client.get(&url).await.expect("read");
        assert_eq!(body["total"], json!(i - 1), "before write {i}");
        let (status, body) = client
            .post_json(
                &proxy.url("/v1/events?ack=committed"),
                &json!({ "ns": "own", "key": "k", "delta": 1 }),
            )
            .await
            .expect("write");
        assert_eq!(status, 200, "{body}");
        let (_, body) = client.get(&url).await.expect("read");
        assert_eq!(
            body["total"],
            json!(i),
            "an eventual read right after this proxy committed write {i}"
        );
    }
    let scrape = proxy.metrics().await;
    assert!(
        scrape.lines().any(
            |l| l.starts_with("tally_read_cache_lookups_total{outcome=\"hit\"}")
                && !l.ends_with(" 0")
        ),
        "the cache served reads between the commits:\n{scrape}"
    );
}
