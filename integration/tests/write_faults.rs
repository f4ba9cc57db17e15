//! Faults on the write path against real MariaDB: a COMMIT whose answer is
//! lost (and strong reads while its outcome is in doubt), a connection cut
//! mid-transaction, a dead master that must not
//! block other groups and must lose nothing once it is back, and sustained
//! overload from many writers while the master is slow and then dead.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tally_harness::{ADMIN_USER, Cluster, ClusterSpec, DATA_USER, FaultRelay};
use tally_integration::{Client, TEST_TOKEN, TestProxy, routing, stored};

/// The default groups without replicas, and a fault relay in front of
/// g0's master (route to it with [`one_group_via`]).
async fn masters_behind_a_relay() -> (Cluster, FaultRelay) {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let relay = FaultRelay::start(cluster.group(0).master.addr())
        .await
        .expect("relay");
    (cluster, relay)
}

fn one_group_via(relay: &FaultRelay) -> String {
    group_via(relay, "g0")
}

/// One group named `name` behind the relay. Metrics are process-wide and
/// the tests of this file run side by side in one process under `cargo
/// test`: a test that reads a per-group metric names its group alone.
fn group_via(relay: &FaultRelay, name: &str) -> String {
    format!(
        "version: 1\nvnodes: 160\nadmin:\n  user: {ADMIN_USER}\ngroups:\n  - name: {name}\n    master: mysql://{DATA_USER}@{}/tally\n",
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

/// A retry of `group`'s flush found its batch already applied (its dedup
/// row): the attempt before had lost the answer to a COMMIT that went
/// through.
async fn assert_found_a_batch_applied(proxy: &TestProxy, group: &str) {
    let metrics = proxy.metrics().await;
    let series = format!("tally_flush_duplicates_total{{group=\"{group}\"}}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(&series) && !l.ends_with(" 0")),
        "the retry must have been recognised as a duplicate:\n{metrics}"
    );
}

/// `tally_flush_commit_in_doubt{group="doubt"}` (the group of the test
/// that reads it, named apart from the others').
async fn in_doubt(proxy: &TestProxy) -> Option<f64> {
    proxy.metrics().await.lines().find_map(|l| {
        l.strip_prefix("tally_flush_commit_in_doubt{group=\"doubt\"} ")
            .and_then(|v| v.trim().parse().ok())
    })
}

/// The relay forwards COMMIT to the server and then cuts the connection,
/// so the proxy cannot know whether the batch was applied. The retry with
/// the same (writer_id, seq) must find the dedup row and apply nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_applied_exactly_once() {
    let (cluster, relay) = masters_behind_a_relay().await;
    let master = &cluster.group(0).master;
    // The relay holds a pattern-cut connection until the server's reply was
    // swallowed (up to 10 s), and a held flush attempt runs into its 30 s
    // bound, so give committed acks more than that (below the test
    // client's 60 s).
    let proxy = TestProxy::start_with_topology(&one_group_via(&relay), |c| {
        c.buffer.commit_timeout = Duration::from_secs(50);
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
    assert_found_a_batch_applied(&proxy, "g0").await;

    // A cut before COMMIT (while the total rows are being prepared, after
    // the minute rows) rolls the transaction back; the retry applies it,
    // once.
    relay.cut_on_pattern_once(b"INSERT INTO counter_total".to_vec());
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

    // Issue #18, item 3: a connection black-holed mid-transaction (no
    // answer, no close: a dead network path) times out after the attempt
    // bound, and its server session lives on holding the lock on the
    // batch's dedup row. The retry must end that session first, or it
    // waits on the lock forever; then the batch commits exactly once. The
    // hold comes after BEGIN and the dedup row: at the prepare of a 37-row
    // minute upsert, a statement text no connection has prepared yet.
    relay.hold_on_pattern_once(b"INSERT INTO counter_minute".to_vec());
    let (status, body) = client
        .post_json(
            &proxy.url("/v1/events?ack=committed"),
            &batch("held", 37, 4),
        )
        .await
        .expect("post");
    assert_eq!(relay.stats().holds, 1, "the hold must have fired");
    assert_eq!(
        status, 200,
        "the batch must commit once the held session is ended: {body}"
    );
    for i in 0..37 {
        assert_eq!(total(master, "held", &format!("k{i}")).await, 4, "k{i}");
    }
    proxy.stop().await.expect("clean stop");
}

/// Regression: a COMMIT whose answer is lost leaves its batch in doubt, and
/// an attempt after it that fails before its own COMMIT (here the master
/// turned `read_only`, so the dedup row cannot be written) proves nothing
/// about the first. Meanwhile the batch is both stored and still pending,
/// so a strong read ("stored + pending") that ran then would count it
/// twice. Strong reads must wait (or answer 503) until a later attempt
/// finds the dedup row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_in_doubt_is_never_counted_twice_by_strong_reads() {
    let (cluster, relay) = masters_behind_a_relay().await;
    let master = &cluster.group(0).master;
    let proxy = TestProxy::start_with_topology(&group_via(&relay, "doubt"), |c| {
        // Time between the ambiguous attempt and the next to fence the
        // master, and a long window of failed attempts after it.
        c.buffer.retry_min = Duration::from_secs(2);
        c.buffer.retry_max = Duration::from_secs(2);
    })
    .await;
    let client = Client::new();
    let read = |key: &'static str| {
        let (client, url) = (
            &client,
            proxy.url(&format!("/v1/counters/doubt/{key}?consistency=strong")),
        );
        async move {
            let (status, body) = client.get(&url).await.expect("strong read");
            (status, body["total"].as_i64())
        }
    };

    relay.cut_on_pattern_once(b"COMMIT".to_vec());
    let (status, body) = client
        .post_json(&proxy.url("/v1/events"), &batch("doubt", 5, 3))
        .await
        .expect("post");
    assert_eq!(status, 200, "{body}");
    let cut_by = Instant::now() + Duration::from_secs(30);
    while relay.stats().pattern_cuts == 0 {
        assert!(Instant::now() < cut_by, "the COMMIT was never cut");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    master
        .exec("SET GLOBAL read_only = 1")
        .await
        .expect("read_only");
    // The cut COMMIT was applied: the batch is stored, and the proxy does
    // not know it.
    assert_eq!(total(master, "doubt", "k0").await, 3, "the commit landed");

    let (mut answered, mut refused) = (0, 0);
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        match read("k0").await {
            (200, total) => {
                assert_eq!(
                    total,
                    Some(3),
                    "a strong read counted the batch in doubt twice"
                );
                answered += 1;
            }
            (503, _) => refused += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(answered + refused > 0);
    assert_eq!(in_doubt(&proxy).await, Some(1.0), "the gauge says so");

    master
        .exec("SET GLOBAL read_only = 0")
        .await
        .expect("writable");
    let resolved_by = Instant::now() + Duration::from_secs(30);
    loop {
        match read("k4").await {
            (200, Some(3)) => break,
            (503, _) => {}
            other => panic!("unexpected answer {other:?}"),
        }
        assert!(Instant::now() < resolved_by, "the doubt was never resolved");
    }
    for i in 0..5 {
        assert_eq!(total(master, "doubt", &format!("k{i}")).await, 3, "k{i}");
    }
    // The cut COMMIT was the flush's, found applied by a retry.
    assert_found_a_batch_applied(&proxy, "doubt").await;
    assert_eq!(in_doubt(&proxy).await, Some(0.0));
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
        // A group whose flush fails does not drain: its writes are refused
        // at once, not after this wait.
        c.buffer.admission_wait = Duration::from_secs(30);
    })
    .await;
    let client = Client::new();
    let g0_keys = routing::keys_on(&topo, "iso", "a", "g0", 60);
    let g1_keys = routing::keys_on(&topo, "iso", "b", "g1", 5);

    cluster.group(0).master.kill9();

    // g0 takes buffered writes until its bound, then 503s.
    let mut accepted = Vec::new();
    let mut refused = 0;
    let started = Instant::now();
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
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "writes to a group whose flush fails must not wait buffer.admission_wait (30 s) each: {:?}",
        started.elapsed()
    );

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

/// A write that finds its group's buffer full while the batch that filled
/// it is in flight waits for that batch's commit and is then accepted
/// (not answered 503 to be sent and parsed again), and every event counts
/// once. The relay delays every packet to the master, so the batch is
/// still in flight when the second write arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_finds_its_group_full_waits_for_the_flush_in_flight() {
    let (cluster, relay) = masters_behind_a_relay().await;
    let master = &cluster.group(0).master;
    let proxy = TestProxy::start_with_topology(&one_group_via(&relay), |c| {
        c.buffer.max_pending_rows = 20;
        c.buffer.flush_rows = 20;
        c.buffer.admission_wait = Duration::from_secs(30);
    })
    .await;
    let client = Client::new();
    relay.delay(Duration::from_millis(200));
    // Fills the bound and wakes the flusher, whose batch commits slowly.
    let (status, body) = client
        .post_json(&proxy.url("/v1/events"), &batch("adm", 20, 1))
        .await
        .expect("post");
    assert_eq!(status, 200, "{body}");
    let more: Vec<Value> = (20..25)
        .map(|i| json!({ "ns": "adm", "key": format!("k{i}"), "delta": 1 }))
        .collect();
    let (status, body) = client
        .post_json(&proxy.url("/v1/events"), &Value::Array(more))
        .await
        .expect("post more");
    assert_eq!(
        status, 200,
        "a write that finds the buffer full must wait for the flush in flight: {body}"
    );
    // It was let in by the commit of the batch that filled the buffer.
    for i in 0..20 {
        assert_eq!(total(master, "adm", &format!("k{i}")).await, 1, "k{i}");
    }
    relay.pass();
    let (status, body) = client
        .admin_post(&proxy.admin_url("/admin/v1/flush"), TEST_TOKEN)
        .await
        .expect("flush");
    assert_eq!(status, 200, "{body}");
    for i in 0..25 {
        assert_eq!(total(master, "adm", &format!("k{i}")).await, 1, "k{i}");
    }
    proxy.stop().await.expect("clean stop");
}

/// Sustained overload with recovery: 32 concurrent writers push batches of
/// 10 new counters as fast as they are answered, far beyond a bound of 200
/// pending entries, while the only master is first slowed (every packet
/// through the relay delayed 50 ms, so batches still commit, slowly, and
/// the writers race for the room each commit frees) and then killed. Every
/// answer must be 200 or 503 `overloaded` with `Retry-After`; the pending
/// count, sampled throughout, never exceeds the bound (it is a
/// reservation, not a check concurrent writers can overshoot). Once the
/// master is back, exactly the acknowledged events are in the database,
/// nothing refused is, and new writes succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_overload_holds_the_bound_and_recovers_exactly() {
    const BOUND: usize = 200;
    const WRITERS: usize = 32;
    const BATCH: usize = 10;
    let (cluster, relay) = masters_behind_a_relay().await;
    let master = &cluster.group(0).master;
    let proxy = TestProxy::start_with_topology(&one_group_via(&relay), |c| {
        c.buffer.max_pending_rows = BOUND;
        c.buffer.flush_rows = 50;
    })
    .await;
    let client = Client::new();
    let stop = Arc::new(AtomicBool::new(false));

    relay.delay(Duration::from_millis(50));
    // The proxy's own pending count (the admin registry of this proxy).
    let sampler = tokio::spawn({
        let (client, stop) = (client.clone(), stop.clone());
        let url = proxy.admin_url("/admin/v1/proxies");
        async move {
            let (mut max, mut samples) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = client.admin_get(&url, TEST_TOKEN).await.expect("proxies");
                assert_eq!(status, 200, "{body}");
                let pending = body["proxies"][0]["pending"].as_u64().expect("pending");
                max = max.max(pending);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (max, samples)
        }
    });
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (client, stop) = (client.clone(), stop.clone());
            let url = proxy.url("/v1/events");
            tokio::spawn(async move {
                let (mut acked, mut refused) = (Vec::new(), Vec::new());
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let keys: Vec<String> = (0..BATCH).map(|i| format!("w{w}-{n}-{i}")).collect();
                    n += 1;
                    let body: Vec<Value> = keys
                        .iter()
                        .map(|k| json!({ "ns": "ovl", "key": k }))
                        .collect();
                    let resp = client
                        .raw()
                        .post(&url)
                        .json(&body)
                        .send()
                        .await
                        .expect("every request is answered");
                    match resp.status().as_u16() {
                        200 => acked.extend(keys),
                        503 => {
                            assert!(
                                resp.headers().contains_key("retry-after"),
                                "503 without Retry-After"
                            );
                            let body: Value = resp.json().await.expect("json");
                            assert_eq!(body["error"]["code"], "overloaded", "{body}");
                            refused.extend(keys);
                            // Ignore Retry-After on purpose, but do not spin.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        other => panic!("unexpected status {other}: {:?}", resp.text().await),
                    }
                }
                (acked, refused)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(4)).await;
    master.kill9();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    for w in writers {
        let (a, r) = w.await.expect("writer");
        acked.extend(a);
        refused.extend(r);
    }
    let (max_pending, samples) = sampler.await.expect("sampler");
    let attempted = acked.len() + refused.len();
    println!(
        "overload: {attempted} events attempted, {} acknowledged, {} refused; pending max {max_pending} of {BOUND} over {samples} samples",
        acked.len(),
        refused.len()
    );
    assert!(
        attempted >= 10 * BOUND,
        "the load must go far beyond the bound: {attempted} events attempted"
    );
    assert!(!refused.is_empty(), "a full buffer must refuse writes");
    assert!(acked.len() >= BATCH, "writes are accepted until the bound");
    assert!(samples >= 20, "pending sampled only {samples} times");
    assert!(
        max_pending <= BOUND as u64,
        "pending reached {max_pending}, over the bound {BOUND}"
    );

    // Recovery: the master returns, the backlog drains exactly.
    master.start().await.expect("restart master");
    relay.pass();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, body) = client
            .admin_post(&proxy.admin_url("/admin/v1/flush"), TEST_TOKEN)
            .await
            .expect("flush");
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "backlog not flushed: {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rows: BTreeMap<Vec<u8>, i64> = stored::rows(master, "counter_total", "ovl")
        .await
        .into_iter()
        .map(|((key, _), (count, _))| (key, count))
        .collect();
    for key in &acked {
        assert_eq!(rows.get(key.as_bytes()), Some(&1), "acknowledged {key}");
    }
    for key in &refused {
        assert_eq!(
            rows.get(key.as_bytes()),
            None,
            "refused {key} must not count"
        );
    }
    assert_eq!(
        rows.len(),
        acked.len(),
        "nothing beyond what was acknowledged"
    );

    // New writes succeed, committed on the recovered master.
    let (status, body) = client
        .post_json(
            &proxy.url("/v1/events?ack=committed"),
            &json!({ "ns": "ovl", "key": "after", "delta": 5 }),
        )
        .await
        .expect("post after recovery");
    assert_eq!(status, 200, "{body}");
    assert_eq!(total(master, "ovl", "after").await, 5);
    proxy.stop().await.expect("clean stop");
}

/// A counter whose stored total is near the 64-bit limit (a long-lived
/// counter, or a client sending large deltas) is incremented past it: its
/// upsert fails with "BIGINT value is out of range" on every attempt. That
/// one counter must not stall its group: committed writes to other counters
/// of the group succeed and count exactly, the overflowing counter's deltas
/// land in the `quarantine` table (all of its tiers untouched), the
/// quarantine is counted in `/metrics`, and a stop finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_counter_is_quarantined_and_never_stalls_its_group() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let master = &cluster.group(0).master;
    let proxy = TestProxy::start(&cluster, |c| {
        c.buffer.commit_timeout = Duration::from_secs(10);
        c.shutdown.flush_deadline = Some(Duration::from_secs(30));
    })
    .await;
    let client = Client::new();
    let near_max = i64::MAX - 5;
    let pos = tally_admin::ShardRing::position(&tally_admin::routing_key("ovf", "big"));
    master
        .exec(&format!(
            "INSERT INTO tally.counter_total (ns, ckey, ring_pos, count) \
             VALUES ('ovf', 'big', {pos}, {near_max})"
        ))
        .await
        .expect("seed a counter near the limit");

    let (status, body) = client
        .post_json(
            &proxy.url("/v1/events"),
            &json!({ "ns": "ovf", "key": "big", "delta": 10 }),
        )
        .await
        .expect("post big");
    assert_eq!(status, 200, "{body}");
    for round in 1..=2 {
        let (status, body) = client
            .post_json(&proxy.url("/v1/events?ack=committed"), &batch("ovf", 20, 3))
            .await
            .expect("post others");
        assert_eq!(status, 200, "round {round}: other counters stalled: {body}");
        for i in 0..20 {
            assert_eq!(
                total(master, "ovf", &format!("k{i}")).await,
                3 * round,
                "k{i}"
            );
        }
        if round == 1 {
            // A second overflowing delta, in a later batch, is held too.
            let (status, _) = client
                .post_json(
                    &proxy.url("/v1/events?ack=committed"),
                    &json!({ "ns": "ovf", "key": "big", "delta": 7 }),
                )
                .await
                .expect("post big again");
            assert_eq!(status, 200);
        }
    }

    assert_eq!(
        total(master, "ovf", "big").await,
        near_max,
        "total untouched"
    );
    for tier in ["counter_minute", "counter_hour", "counter_day"] {
        let rows = stored::rows(master, tier, "ovf").await;
        assert!(
            !rows.keys().any(|(k, _)| k == b"big"),
            "{tier} has rows of the quarantined counter: {rows:?}"
        );
    }
    let held = master
        .sql("SELECT delta, reason FROM tally.quarantine WHERE ns = 'ovf' AND ckey = 'big' ORDER BY id")
        .await
        .expect("quarantine table");
    let deltas: Vec<i64> = held
        .iter()
        .map(|r| r.get::<i64, _>(0).expect("delta"))
        .collect();
    assert_eq!(deltas, vec![10, 7], "held deltas");
    let reason: String = held[0].get(1).expect("reason");
    assert!(reason.contains("out of range"), "{reason}");

    let metrics = proxy.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tally_quarantined_deltas_total{group=\"g0\"} 2")),
        "{metrics}"
    );

    // An operator lists what is held, ...
    let (status, body) = client
        .admin_get(&proxy.admin_url("/admin/v1/quarantine"), TEST_TOKEN)
        .await
        .expect("list");
    assert_eq!(status, 200, "{body}");
    let g0 = &body["groups"][0];
    assert_eq!(
        (g0["group"].as_str(), g0["held_rows"].as_u64()),
        (Some("g0"), Some(2)),
        "{body}"
    );
    let listed: Vec<&str> = g0["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["delta"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(listed, ["10", "7"], "{body}");
    assert_eq!(g0["rows"][0]["key"], "big");
    // ... a re-apply while the cause is still there changes nothing, ...
    let reapply = || async {
        let (status, body) = client
            .admin_post(&proxy.admin_url("/admin/v1/quarantine/reapply"), TEST_TOKEN)
            .await
            .expect("reapply");
        assert_eq!(status, 200, "{body}");
        let g0 = &body["groups"][0];
        (g0["applied_rows"].as_u64(), g0["refused_rows"].as_u64())
    };
    assert_eq!(reapply().await, (Some(0), Some(2)));
    assert_eq!(total(master, "ovf", "big").await, near_max);
    // ... and once the counter is reset, the held deltas count exactly once.
    master
        .exec("UPDATE tally.counter_total SET count = 100 WHERE ns = 'ovf' AND ckey = 'big'")
        .await
        .expect("reset the counter");
    assert_eq!(reapply().await, (Some(2), Some(0)));
    assert_eq!(reapply().await, (Some(0), Some(0)), "applied once only");
    assert_eq!(total(master, "ovf", "big").await, 117);
    let minutes: i64 = stored::rows(master, "counter_minute", "ovf")
        .await
        .iter()
        .filter(|((k, _), _)| k == b"big")
        .map(|(_, (c, _))| c)
        .sum();
    assert_eq!(minutes, 17, "minute rows of the re-applied deltas");
    proxy.stop().await.expect("a stop finishes");
}
