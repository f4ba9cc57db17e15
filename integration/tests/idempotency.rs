//! Issue #22: idempotent increments. A client that retries after a lost
//! answer (a cut connection, a killed proxy) counts each event exactly
//! once when the event carries an `id` (or the request an
//! `Idempotency-Key`), whichever proxy the retry goes to.
//!
//! The answers are lost by a TCP relay between the client and a proxy: a
//! request whose bytes end with [`CUT`] (trailing JSON whitespace) reaches
//! the proxy whole, the proxy answers, and the relay swallows the answer
//! and closes the connection. The retry sends the same events without the
//! trailing bytes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tally_harness::{Cluster, ClusterSpec, FaultRelay};
use tally_integration::{Client, TEST_TOKEN, TestProxy, expected};

const NS: &str = "idem";
/// Trailing whitespace that marks a request whose answer the relays drop.
const CUT: &[u8] = b"]\n\t \t\n";

/// `POST {base}/v1/events?ack={ack}` with `body` (+ [`CUT`] when `cut`):
/// the answer, or `None` when the connection failed.
async fn post(
    client: &Client,
    base: &str,
    ack: &str,
    events: &Value,
    key: Option<&str>,
    cut: bool,
) -> Option<(u16, Value)> {
    let mut body = serde_json::to_vec(events).expect("json");
    if cut {
        // `]` is the last byte already: the mark ends the same way.
        body.pop();
        body.extend_from_slice(CUT);
    }
    let mut req = client
        .raw()
        .post(format!("{base}/v1/events?ack={ack}"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let resp = req.send().await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    Some((status, body))
}

async fn flush(client: &Client, proxy: &TestProxy) {
    let (status, body) = client
        .admin_post(&proxy.admin_url("/admin/v1/flush"), TEST_TOKEN)
        .await
        .expect("flush");
    assert_eq!(status, 200, "{body}");
}

async fn total(client: &Client, proxy: &TestProxy, key: &str) -> i64 {
    let (status, body) = client
        .get(&proxy.url(&format!("/v1/counters/{NS}/{key}?consistency=strong")))
        .await
        .expect("read");
    assert_eq!(status, 200, "{body}");
    body["total"].as_i64().expect("total")
}

/// Acceptance of issue #22: writers send events with ids through two
/// proxies behind answer-dropping relays and a third proxy that is killed
/// mid-load, retrying every failure (on another proxy) until it succeeds;
/// every total, range and the top-K equal the ledger exactly. First, one
/// plain request under an `Idempotency-Key` whose answer is lost and which
/// is retried three times is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_events_with_ids_count_exactly_once_across_proxies_cuts_and_a_kill() {
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let tweak = |c: &mut tally_proxy::ProxyConfig| {
        c.buffer.commit_timeout = Duration::from_secs(20);
    };
    let p0 = TestProxy::start(&cluster, tweak).await;
    let p1 = TestProxy::start(&cluster, tweak).await;
    let p2 = TestProxy::start(&cluster, tweak).await;
    let r0 = FaultRelay::start(p0.http).await.expect("relay 0");
    let r1 = FaultRelay::start(p1.http).await.expect("relay 1");
    r0.cut_on_pattern(CUT);
    r1.cut_on_pattern(CUT);
    let client = Client::new();
    let via = |r: &FaultRelay| format!("http://{}", r.addr());
    let (b0, b1, b2) = (via(&r0), via(&r1), format!("http://{}", p2.http));

    // One plain request under an Idempotency-Key: its committed answer is
    // lost, then it is retried through the other proxy (committed and
    // buffered) and once more through the first.
    let plain = json!([
        { "ns": NS, "key": "plain", "delta": 5 },
        { "ns": NS, "key": "plain", "delta": 7 },
        { "ns": NS, "key": "other", "delta": 1 },
    ]);
    let key = Some("req-0001");
    assert_eq!(
        post(&client, &b0, "committed", &plain, key, true).await,
        None,
        "the relay dropped the answer"
    );
    let mut answers = Vec::new();
    for (base, ack) in [(&b1, "committed"), (&b1, "buffered"), (&b0, "committed")] {
        let (status, answer) = post(&client, base, ack, &plain, key, false)
            .await
            .expect("retry answered");
        assert_eq!((status, &answer["accepted"]), (200, &json!(3)), "{answer}");
        answers.push(answer);
    }
    for p in [&p0, &p1, &p2] {
        flush(&client, p).await;
    }
    assert_eq!(total(&client, &p2, "plain").await, 12, "counted once");
    assert_eq!(total(&client, &p2, "other").await, 1, "counted once");
    // Committed answers say the events were counted before; a buffered
    // answer cannot know yet and says nothing.
    assert_eq!(answers[0]["duplicates"], 3, "{}", answers[0]);
    assert_eq!(answers[1]["duplicates"], 0, "{}", answers[1]);
    assert_eq!(answers[2]["duplicates"], 3, "{}", answers[2]);

    // The load: writer w sends requests of 1 to 12 events with ids
    // `w{w}-r{n}-e{i}` over 40 keys; one request in three is cut (its
    // answer lost); a failure is retried with the same ids on the next
    // proxy until it is answered 200. Committed acks everywhere, buffered
    // ones only through the proxies that are stopped gracefully.
    let ledger: Arc<Mutex<BTreeMap<String, i64>>> = Arc::default();
    let bases = Arc::new(vec![b0.clone(), b1.clone(), b2.clone()]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let (client, ledger, bases, stop) =
                (client.clone(), ledger.clone(), bases.clone(), stop.clone());
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(22 + w);
                let (mut cut, mut retried, mut sent) = (0u64, 0u64, 0u64);
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let events: Vec<Value> = (0..rng.usize(1..=12))
                        .map(|i| {
                            let key = format!("k{}", rng.usize(0..40));
                            let delta = rng.i64(1..=9);
                            *ledger.lock().expect("ledger").entry(key.clone()).or_default() +=
                                delta;
                            json!({ "ns": NS, "key": key, "delta": delta, "id": format!("w{w}-r{n}-e{i}") })
                        })
                        .collect();
                    let events = Value::Array(events);
                    let mut target = rng.usize(0..3);
                    let mut first = true;
                    loop {
                        let committed = target == 2 || rng.bool();
                        let ack = if committed { "committed" } else { "buffered" };
                        let cut_this = first && target != 2 && rng.usize(0..3) == 0;
                        cut += u64::from(cut_this);
                        let answer =
                            post(&client, &bases[target], ack, &events, None, cut_this).await;
                        first = false;
                        if let Some((200, _)) = answer {
                            break;
                        }
                        retried += 1;
                        target = (target + 1) % 3;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    sent += 1;
                }
                (sent, cut, retried)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Killed mid-load: its buffer is gone, and requests in flight to it
    // may or may not have committed.
    p2.crash();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut sent, mut cut, mut retried) = (0, 0, 0);
    for w in writers {
        let (s, c, r) = w.await.expect("writer");
        sent += s;
        cut += c;
        retried += r;
    }
    assert!(
        sent > 50 && cut > 5 && retried > cut,
        "the load ran: {sent} requests, {cut} cut, {retried} retried"
    );
    // Stopped gracefully: every buffered ack is flushed.
    p0.stop().await.expect("stop p0");
    p1.stop().await.expect("stop p1");

    let reader = TestProxy::start(&cluster, |_| {}).await;
    let ledger = ledger.lock().expect("ledger").clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let (from, to) = (now - 3600, now + 3600);
    for (key, want) in &ledger {
        assert_eq!(total(&client, &reader, key).await, *want, "total of {key}");
        let (status, body) = client
            .get(&reader.url(&format!(
                "/v1/counters/{NS}/{key}/count?from={from}&to={to}"
            )))
            .await
            .expect("range");
        assert_eq!(
            (status, body["count"].as_i64()),
            (200, Some(*want)),
            "range of {key}: {body}"
        );
    }
    let mut values: BTreeMap<String, i64> = ledger.clone();
    values.insert("plain".into(), 12);
    values.insert("other".into(), 1);
    let (status, top) = client
        .get(&reader.url(&format!("/v1/top/{NS}?limit=10")))
        .await
        .expect("top");
    assert_eq!(status, 200, "{top}");
    assert_eq!(top["items"], expected::top_k(&values, 10));
}

/// Events with ids in a killed proxy's write-ahead log, retried through
/// another proxy while it was down: the replay finds their ids counted
/// and applies none of them again; the copy of an id the log holds twice
/// counts once too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_replayed_from_the_log_after_a_retry_elsewhere_count_once() {
    use std::process::{Command, Stdio};
    use tally_integration::{KillOnDrop, eventually, free_port, stored};

    let bin =
        tokio::task::spawn_blocking(|| tally_integration::cargo_bin("tally-proxy", "tally-proxy"))
            .await
            .expect("build");
    let cluster = Cluster::start(ClusterSpec {
        groups: 1,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let master = &cluster.group(0).master;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("topology.yaml"), cluster.topology_yaml(160)).expect("write");
    let (http, admin) = (free_port(), free_port());
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: {{ http: 127.0.0.1:{http}, admin: 127.0.0.1:{admin} }}\n\
             durability: wal\n\
             wal: {{ dir: wal }}\n\
             buffer: {{ flush_interval: 100ms, retry_max: 200ms }}\n"
        ),
    )
    .expect("write config");
    let spawn = || {
        KillOnDrop(
            Command::new(&bin)
                .arg("--config")
                .arg(&config)
                .env("TALLY_ADMIN_TOKEN", "t")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn proxy"),
        )
    };
    let client = Client::new();
    let base = format!("http://127.0.0.1:{http}");
    let ready = || async {
        eventually(Duration::from_secs(60), "proxy ready", || async {
            matches!(client.get(&format!("{base}/readyz")).await, Ok((200, _))).then_some(())
        })
        .await;
    };

    // Life 1 acknowledges three requests from its log (the master is
    // down), the first one twice, and is killed.
    let mut proxy = spawn();
    ready().await;
    master.stop().await;
    let requests: Vec<Value> = (0..3)
        .map(|r| {
            Value::Array(
                (0..10)
                    .map(|i| json!({ "ns": NS, "key": format!("w{}", i % 4), "delta": r + 1, "id": format!("wal-{r}-{i}") }))
                    .collect(),
            )
        })
        .collect();
    let mut want: BTreeMap<String, i64> = BTreeMap::new();
    for (r, events) in requests.iter().enumerate() {
        for i in 0..10 {
            *want.entry(format!("w{}", i % 4)).or_default() += r as i64 + 1;
        }
        let (status, body) = post(&client, &base, "buffered", events, None, false)
            .await
            .expect("answered");
        assert_eq!(status, 200, "{body}");
    }
    let (status, _) = post(&client, &base, "buffered", &requests[0], None, false)
        .await
        .expect("answered");
    assert_eq!(status, 200);
    proxy.kill().expect("SIGKILL");
    proxy.wait().expect("reap");
    master.start().await.expect("master back");

    // The client retries everything through another proxy meanwhile.
    let other = TestProxy::start(&cluster, |_| {}).await;
    let other_base = format!("http://{}", other.http);
    for events in &requests {
        let (status, body) = post(&client, &other_base, "committed", events, None, false)
            .await
            .expect("answered");
        assert_eq!((status, &body["duplicates"]), (200, &json!(0)), "{body}");
    }

    // Life 2 replays life 1: every id is counted already.
    let _proxy = spawn();
    ready().await;
    let wal = dir.path().join("wal");
    let lives = || {
        std::fs::read_dir(&wal).map_or(0, |d| {
            d.filter(|e| e.as_ref().is_ok_and(|e| e.path().is_dir()))
                .count()
        })
    };
    eventually(Duration::from_secs(30), "life 1 replayed", || async {
        (lives() == 1).then_some(())
    })
    .await;
    let stored: BTreeMap<String, i64> = stored::rows(master, "counter_total", NS)
        .await
        .into_iter()
        .map(|((k, _), (c, _))| (String::from_utf8_lossy(&k).into_owned(), c))
        .collect();
    assert_eq!(stored, want, "each id once");
    let (_, metrics) = client
        .get(&format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .expect("metrics");
    let replayed_duplicates: f64 = metrics
        .as_str()
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("tally_duplicate_events_total") && l.contains("stage=\"store\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    // The log holds 40 id'd events: the 30 counted through the other
    // proxy, and the first request's 10 again (its second copy was
    // dropped from the buffer, not from the log).
    assert_eq!(replayed_duplicates, 40.0, "the replay counted none of them");
}

/// Ids expire after `idempotency.window` in chunked deletes (retention):
/// a retry within the window is a duplicate, one after it a new event;
/// ids younger than the window stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_expire_after_the_window_in_chunks_and_a_later_retry_counts_again() {
    use tally_integration::eventually;

    let cluster = Cluster::start(ClusterSpec {
        groups: 1,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let master = &cluster.group(0).master;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    // 7 expired id rows and 2 that stay young for the whole test.
    let rows: Vec<String> = (0..7)
        .map(|i| format!("('{NS}','old','o{i}',0,{},0)", now - 3600))
        .chain((0..2).map(|i| format!("('{NS}','old','y{i}',0,{},0)", now + 3600)))
        .collect();
    master
        .exec(&format!(
            "INSERT INTO tally.applied_ids (ns, ckey, id, ring_pos, at, src) VALUES {}",
            rows.join(",")
        ))
        .await
        .expect("insert ids");
    // And id sets (schema 010): 7 expired, 2 young.
    let sets: Vec<String> = (0..7)
        .map(|i| format!("('so{i}',0,{},'')", now - 3600))
        .chain((0..2).map(|i| format!("('sy{i}',0,{},'')", now + 3600)))
        .collect();
    master
        .exec(&format!(
            "INSERT INTO tally.applied_id_sets (skey, n, at, segs) VALUES {}",
            sets.join(",")
        ))
        .await
        .expect("insert id sets");
    let proxy = TestProxy::start(&cluster, |c| {
        c.idempotency.window = Duration::from_secs(2);
        c.retention.interval = Duration::from_millis(200);
        c.retention.chunk_rows = 3;
    })
    .await;
    let client = Client::new();
    let base = format!("http://{}", proxy.http);
    let event = json!([{ "ns": NS, "key": "exp", "delta": 4, "id": "late-1" }]);
    let dups = |answer: Option<(u16, Value)>| {
        let (status, body) = answer.expect("answered");
        assert_eq!(status, 200, "{body}");
        body["duplicates"].as_u64().expect("duplicates")
    };
    assert_eq!(
        dups(post(&client, &base, "committed", &event, None, false).await),
        0
    );
    assert_eq!(
        dups(post(&client, &base, "committed", &event, None, false).await),
        1,
        "within the window: a duplicate"
    );
    let ids_left = || async {
        master
            .sql(&format!(
                "SELECT id FROM tally.applied_ids WHERE ns = '{NS}' ORDER BY id"
            ))
            .await
            .expect("ids")
            .into_iter()
            .filter_map(|r| r.get::<String, _>(0))
            .collect::<Vec<_>>()
    };
    let sets_left = || async {
        master
            .sql("SELECT skey FROM tally.applied_id_sets ORDER BY skey")
            .await
            .expect("id sets")
            .into_iter()
            .filter_map(|r| r.get::<String, _>(0))
            .collect::<Vec<_>>()
    };
    // `late-1`'s set ("late-1", counted once) expires with the old ones.
    eventually(Duration::from_secs(30), "expired ids deleted", || async {
        (ids_left().await == ["y0", "y1"] && sets_left().await == ["sy0", "sy1"]).then_some(())
    })
    .await;
    assert_eq!(
        dups(post(&client, &base, "committed", &event, None, false).await),
        0,
        "after the window: a new event"
    );
    assert_eq!(total(&client, &proxy, "exp").await, 8);
}
