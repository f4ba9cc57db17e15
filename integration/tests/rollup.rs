//! Issue #21: schema version 2. Flushes write minute and total rows only;
//! hours and days are rolled up from closed hours behind a per-group
//! watermark. Every total, range, series and top-K must equal the client's
//! ledger at every read, while the rollup runs, while late events (below
//! the watermark) arrive, after a rolling proxy is killed mid-rollup, and
//! on a database written by schema version 1.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tally_harness::mysql_async::prelude::Queryable;
use tally_harness::{Cluster, ClusterSpec, Node};
use tally_integration::{
    Client, KillOnDrop, TEST_TOKEN, TestProxy, eventually, expected, free_port,
};

const NS: &str = "roll";
const KEYS: usize = 12;
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn floor(t: i64, step: i64) -> i64 {
    t - t.rem_euclid(step)
}

/// What the client was told is counted: (key, ts, delta).
type Ledger = Arc<Mutex<Vec<(String, i64, i64)>>>;

async fn watermark(node: &Node, db: &str) -> i64 {
    let mut conn = node.connect().await.expect("connect");
    let w: Option<i64> = conn
        .query_first(format!(
            "SELECT watermark FROM {db}.rollup_state WHERE id = 1"
        ))
        .await
        .expect("watermark");
    w.expect("a rollup_state row")
}

/// The stored layout's invariant on one server: below the watermark every
/// hour row is its hour's minute sum and every day row its minutes below
/// the watermark; at or above it there are no hour rows. Checked per
/// counter of the namespace; returns the number of hour rows checked.
async fn check_invariant(node: &Node, db: &str) -> usize {
    let mut conn = node.connect().await.expect("connect");
    // One snapshot: the rollers may raise the watermark meanwhile.
    conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
        .await
        .expect("snapshot");
    let w: i64 = conn
        .query_first(format!(
            "SELECT watermark FROM {db}.rollup_state WHERE id = 1"
        ))
        .await
        .expect("watermark")
        .expect("row");
    let minutes: Vec<(Vec<u8>, i64, i64)> = conn
        .exec(
            format!("SELECT ckey, bucket, count FROM {db}.counter_minute WHERE ns = ?"),
            (NS,),
        )
        .await
        .expect("minutes");
    let mut hours_want: BTreeMap<(Vec<u8>, i64), i64> = BTreeMap::new();
    let mut days_want: BTreeMap<(Vec<u8>, i64), i64> = BTreeMap::new();
    for (k, b, c) in minutes {
        if b < w {
            *hours_want.entry((k.clone(), floor(b, HOUR))).or_default() += c;
            *days_want.entry((k, floor(b, DAY))).or_default() += c;
        }
    }
    hours_want.retain(|_, v| *v != 0);
    days_want.retain(|_, v| *v != 0);
    let read = |table: &'static str| {
        format!("SELECT ckey, bucket, count FROM {db}.{table} WHERE ns = ? AND count <> 0")
    };
    let hours: Vec<(Vec<u8>, i64, i64)> =
        conn.exec(read("counter_hour"), (NS,)).await.expect("hours");
    let days: Vec<(Vec<u8>, i64, i64)> = conn.exec(read("counter_day"), (NS,)).await.expect("days");
    conn.query_drop("COMMIT")
        .await
        .expect("end of the snapshot");
    let hours: BTreeMap<_, _> = hours.into_iter().map(|(k, b, c)| ((k, b), c)).collect();
    let days: BTreeMap<_, _> = days.into_iter().map(|(k, b, c)| ((k, b), c)).collect();
    assert!(
        hours.keys().all(|(_, b)| *b < w),
        "an hour row at or above the watermark {w}"
    );
    assert_eq!(hours, hours_want, "hour rows below the watermark {w}");
    assert_eq!(days, days_want, "day rows below the watermark {w}");
    hours.len()
}

/// Brute-force answers from the ledger.
struct Truth(Vec<(String, i64, i64)>);

impl Truth {
    fn count(&self, key: &str, from: i64, to: i64) -> i64 {
        let (f, t) = (floor(from, 60), floor(to, 60));
        self.0
            .iter()
            .filter(|(k, ts, _)| k == key && floor(*ts, 60) >= f && floor(*ts, 60) < t)
            .map(|(_, _, d)| d)
            .sum()
    }

    fn series(&self, key: &str, from: i64, to: i64, width: i64) -> BTreeMap<i64, i64> {
        let (f, t) = (floor(from, width), floor(to, width));
        let mut out: BTreeMap<i64, i64> = BTreeMap::new();
        for (k, ts, d) in &self.0 {
            let b = floor(*ts, width);
            if k == key && b >= f && b < t {
                *out.entry(b).or_default() += d;
            }
        }
        out.retain(|_, v| *v != 0);
        out
    }

    fn totals(&self, from: i64, to: i64) -> BTreeMap<String, i64> {
        let mut out: BTreeMap<String, i64> = BTreeMap::new();
        for k in 0..KEYS {
            let key = format!("k{k}");
            out.insert(key.clone(), self.count(&key, from, to));
        }
        out
    }
}

/// Every read kind through `proxy` against the ledger: totals, counts over
/// `ranges`, series at every step, top-K all-time and over a range. With
/// `eventual`, reads go to the replica and are retried until they agree
/// (replication lag), and must never exceed what was sent.
async fn reads_equal_ledger(
    client: &Client,
    base: &str,
    truth: &Truth,
    t0: i64,
    rng: &mut fastrand::Rng,
    consistency: &str,
) {
    let get = |path: String| {
        let url = format!("{base}{path}");
        async move {
            let (status, body) = client.get(&url).await.expect("read");
            assert_eq!(status, 200, "{url}: {body}");
            body
        }
    };
    let all = truth.totals(i64::MIN / 4, i64::MAX / 4);
    for (key, want) in &all {
        let path = format!("/v1/counters/{NS}/{key}?consistency={consistency}");
        let mut got = get(path.clone()).await;
        for _ in 0..200 {
            if got["total"] == json!(want) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            got = get(path.clone()).await;
        }
        assert_eq!(got["total"], json!(want), "total of {key} ({consistency})");
    }
    for _ in 0..60 {
        let key = format!("k{}", rng.usize(0..KEYS));
        let from = t0 - 3 * DAY - 2 * HOUR + rng.i64(0..3 * DAY + 2 * HOUR);
        let to = from + 1 + rng.i64(0..(t0 + 600 - from));
        let body = get(format!(
            "/v1/counters/{NS}/{key}/count?from={from}&to={to}&consistency={consistency}"
        ))
        .await;
        assert_eq!(
            body["count"],
            json!(truth.count(&key, from, to)),
            "{key} [{from}, {to}) {consistency}"
        );
    }
    for (step, width, span) in [
        ("minute", 60, 5 * HOUR),
        ("hour", HOUR, 3 * DAY + HOUR),
        ("day", DAY, 4 * DAY),
    ] {
        let key = format!("k{}", rng.usize(0..KEYS));
        let from = t0 - span + rng.i64(0..HOUR);
        let to = t0 + 60;
        let body = get(format!(
            "/v1/counters/{NS}/{key}/series?from={from}&to={to}&step={step}&consistency={consistency}"
        ))
        .await;
        let got: BTreeMap<i64, i64> = body["points"]
            .as_array()
            .expect("points")
            .iter()
            .map(|p| {
                (
                    p["ts"].as_i64().expect("ts"),
                    p["count"].as_i64().expect("count"),
                )
            })
            .collect();
        assert_eq!(
            got,
            truth.series(&key, from, to, width),
            "{key} step {step} {consistency}"
        );
    }
    let body = get(format!("/v1/top/{NS}?limit=5&consistency={consistency}")).await;
    assert_eq!(body["items"], expected::top_k(&all, 5), "top-K all time");
    let (from, to) = (t0 - 2 * DAY - 1234, t0 - 5 * HOUR + 77);
    let body = get(format!(
        "/v1/top/{NS}?limit=5&from={from}&to={to}&consistency={consistency}"
    ))
    .await;
    assert_eq!(
        body["items"],
        expected::top_k(&truth.totals(from, to), 5),
        "top-K over [{from}, {to})"
    );
}

/// One writer: batches of 20 events with ids at random times of the last
/// three days, `ack=committed`, each retried (same ids) through the next
/// proxy until acknowledged; the ledger gets a batch once acknowledged.
async fn write(
    bases: Arc<Mutex<Vec<String>>>,
    ledger: Ledger,
    stop: Arc<AtomicBool>,
    t0: i64,
    seed: u64,
) {
    let client = Client::new();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let events: Vec<(String, i64, i64)> = (0..20)
            .map(|_| {
                (
                    format!("k{}", rng.usize(0..KEYS)),
                    t0 - rng.i64(0..3 * DAY),
                    rng.i64(1..=5),
                )
            })
            .collect();
        let body: Vec<Value> = events
            .iter()
            .enumerate()
            .map(|(i, (k, ts, d))| {
                json!({ "ns": NS, "key": k, "ts": ts, "delta": d, "id": format!("w{seed}-{n}-{i}") })
            })
            .collect();
        let mut attempt = 0usize;
        loop {
            let base = {
                let bases = bases.lock().expect("bases");
                bases[(n as usize + attempt) % bases.len()].clone()
            };
            attempt += 1;
            if let Ok((200, _)) = client
                .post_json(&format!("{base}/v1/events?ack=committed"), &json!(body))
                .await
            {
                ledger.lock().expect("ledger").extend(events);
                break;
            }
            assert!(attempt < 400, "a write was refused for too long");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A `tally-proxy` process that rolls up every 50 ms with no delay.
fn spawn_roller(bin: &std::path::Path, config: &std::path::Path) -> KillOnDrop {
    KillOnDrop(
        Command::new(bin)
            .arg("--config")
            .arg(config)
            .env("TALLY_ADMIN_TOKEN", TEST_TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn proxy"),
    )
}

/// Acceptance of issue #21 (exactness): three days of events are written
/// before any rollup runs; then two proxies roll up (one a process,
/// killed with SIGKILL while the watermark is between the first and the
/// last hour, and started again) while writers keep sending events into
/// the hours being rolled up and below the watermark. At checkpoints during
/// the rollup and after it, strong and eventual totals, 60 random ranges,
/// series at every step and top-K equal the ledger, and the stored tiers
/// keep the watermark's invariant on the master and the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hours_and_days_roll_up_exactly_while_late_events_arrive_and_a_roller_is_killed() {
    let bin =
        tokio::task::spawn_blocking(|| tally_integration::cargo_bin("tally-proxy", "tally-proxy"))
            .await
            .expect("build");
    let cluster = Cluster::start(ClusterSpec {
        groups: 1,
        replicas: 1,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let db = cluster.database().to_owned();
    let master = &cluster.group(0).master;
    let replica = &cluster.group(0).replicas[0];
    assert_eq!(
        watermark(master, &db).await,
        0,
        "an empty database starts at 0"
    );
    let t0 = now();
    let limit = floor(t0, HOUR);

    // A proxy that writes but does not roll up: three days of events go in
    // before any rollup.
    let writer = TestProxy::start(&cluster, |c| {
        c.rollup.enabled = false;
    })
    .await;
    let bases = Arc::new(Mutex::new(vec![format!("http://{}", writer.http)]));
    let ledger: Ledger = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| tokio::spawn(write(bases.clone(), ledger.clone(), stop.clone(), t0, w)))
        .collect();
    eventually(Duration::from_secs(120), "3,000 events written", || async {
        (ledger.lock().expect("ledger").len() >= 3000).then_some(())
    })
    .await;
    assert_eq!(watermark(master, &db).await, 0, "nothing rolled up yet");

    // Two rollers: a process (killed mid-rollup below) and one in process.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("topology.yaml"), cluster.topology_yaml(160)).expect("write");
    let (http, admin) = (free_port(), free_port());
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: {{ http: 127.0.0.1:{http}, admin: 127.0.0.1:{admin} }}\n\
             buffer: {{ flush_interval: 100ms, retry_max: 200ms }}\n\
             rollup: {{ interval: 50ms, delay: 0s }}\n"
        ),
    )
    .expect("write config");
    let roller_base = format!("http://127.0.0.1:{http}");
    let mut roller = spawn_roller(&bin, &config);
    let other = TestProxy::start(&cluster, |c| {
        c.rollup.interval = Duration::from_millis(300);
        c.rollup.delay = Duration::ZERO;
    })
    .await;
    bases
        .lock()
        .expect("bases")
        .extend([roller_base.clone(), format!("http://{}", other.http)]);

    // Kill the process while the watermark is strictly inside the data.
    let first = floor(t0 - 3 * DAY, HOUR);
    let killed_at = eventually(Duration::from_secs(120), "the rollup under way", || async {
        let w = watermark(master, &db).await;
        (w > first + 2 * HOUR && w < limit - 12 * HOUR).then_some(w)
    })
    .await;
    roller.kill().expect("SIGKILL");
    roller.wait().expect("reap");
    bases.lock().expect("bases").retain(|b| *b != roller_base);
    let client = Client::new();
    let mut rng = fastrand::Rng::with_seed(21);

    // A checkpoint mid-rollup: writers paused, everything flushed.
    let checkpoint = |rng: &mut fastrand::Rng| {
        let truth = Truth(ledger.lock().expect("ledger").clone());
        let client = &client;
        let base = format!("http://{}", other.http);
        let mut rng = fastrand::Rng::with_seed(rng.u64(..));
        async move {
            reads_equal_ledger(client, &base, &truth, t0, &mut rng, "strong").await;
            reads_equal_ledger(client, &base, &truth, t0, &mut rng, "eventual").await;
        }
    };
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let mid = watermark(master, &db).await;
    checkpoint(&mut rng).await;
    let hours_mid = check_invariant(master, &db).await;

    // The process comes back and the writers go on (late events now).
    let mut roller = spawn_roller(&bin, &config);
    eventually(Duration::from_secs(60), "roller ready", || async {
        matches!(
            client.get(&format!("{roller_base}/readyz")).await,
            Ok((200, _))
        )
        .then_some(())
    })
    .await;
    bases.lock().expect("bases").push(roller_base.clone());
    stop.store(false, Ordering::Relaxed);
    let writers: Vec<_> = (3..6)
        .map(|w| tokio::spawn(write(bases.clone(), ledger.clone(), stop.clone(), t0, w)))
        .collect();
    eventually(
        Duration::from_secs(180),
        "every closed hour rolled up",
        || async { (watermark(master, &db).await == limit).then_some(()) },
    )
    .await;
    let before = ledger.lock().expect("ledger").len();
    eventually(
        Duration::from_secs(60),
        "late events after the rollup",
        || async { (ledger.lock().expect("ledger").len() >= before + 600).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    checkpoint(&mut rng).await;
    let hours_end = check_invariant(master, &db).await;
    eventually(Duration::from_secs(20), "the replica caught up", || async {
        (watermark(replica, &db).await == limit).then_some(())
    })
    .await;
    check_invariant(replica, &db).await;
    assert!(
        killed_at > first && killed_at < limit && mid < limit,
        "killed at {killed_at}, checkpoint at {mid}, limit {limit}"
    );
    assert!(hours_end > hours_mid, "{hours_end} > {hours_mid} hour rows");

    let metrics = other.metrics().await;
    assert!(
        metrics.contains("tally_rollup_lag_seconds{group=\"g0\"}"),
        "lag gauge exported"
    );
    roller.kill().expect("SIGKILL");
    let _ = roller.wait();
    other.stop().await.expect("stop");
    writer.stop().await.expect("stop");
}

/// A database written by schema version 1 (all four tiers per flush, no
/// `rollup_state`) migrates when a proxy starts: its watermark is set two
/// hours past the current hour (every stored minute is below it), a second
/// start changes nothing, and every read is exact for the old rows and for
/// new writes on top of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_with_data_migrates_at_start_and_stays_exact() {
    let cluster = Cluster::start(ClusterSpec {
        groups: 1,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let db = cluster.database().to_owned();
    let master = &cluster.group(0).master;
    let t0 = now();
    let mut rng = fastrand::Rng::with_seed(1);
    let old: Vec<(String, i64, i64)> = (0..2000)
        .map(|_| {
            (
                format!("k{}", rng.usize(0..KEYS)),
                t0 - rng.i64(0..3 * DAY),
                rng.i64(-2..=9),
            )
        })
        .collect();
    {
        // Version 1's layout and rows, as its flushes wrote them.
        let mut conn = master.connect().await.expect("connect");
        conn.query_drop(format!("DROP TABLE {db}.rollup_state, {db}.schema_version"))
            .await
            .expect("back to version 1");
        // Version 1's minute table had two more indexes.
        for (name, col) in [("by_ring", "ring_pos"), ("by_age", "bucket")] {
            conn.query_drop(format!(
                "CREATE INDEX {name} ON {db}.counter_minute ({col})"
            ))
            .await
            .expect("version 1 index");
        }
        let mut tiers: [BTreeMap<(String, i64), i64>; 4] = Default::default();
        for (k, ts, d) in &old {
            for (i, width) in [60, HOUR, DAY, 0].into_iter().enumerate() {
                let b = if width == 0 { 0 } else { floor(*ts, width) };
                *tiers[i].entry((k.clone(), b)).or_default() += d;
            }
        }
        for (i, table) in ["counter_minute", "counter_hour", "counter_day"]
            .iter()
            .enumerate()
        {
            for ((k, b), c) in &tiers[i] {
                conn.exec_drop(
                    format!("INSERT INTO {db}.{table} (ns, ckey, bucket, ring_pos, count) VALUES (?, ?, ?, 0, ?)"),
                    (NS, k, b, c),
                )
                .await
                .expect("v1 row");
            }
        }
        for ((k, _), c) in &tiers[3] {
            conn.exec_drop(
                format!(
                    "INSERT INTO {db}.counter_total (ns, ckey, ring_pos, count) VALUES (?, ?, 0, ?)"
                ),
                (NS, k, c),
            )
            .await
            .expect("v1 total");
        }
    }
    let proxy = TestProxy::start(&cluster, |c| {
        c.rollup.interval = Duration::from_millis(100);
        c.rollup.delay = Duration::ZERO;
    })
    .await;
    let w = watermark(master, &db).await;
    assert_eq!(
        w,
        floor(t0, HOUR) + 2 * HOUR,
        "every stored minute below the watermark"
    );
    let version: Option<u32> = master
        .connect()
        .await
        .expect("connect")
        .query_first(format!(
            "SELECT version FROM {db}.schema_version WHERE id = 1"
        ))
        .await
        .expect("version");
    assert_eq!(version, Some(tally_schema::VERSION));
    let indexes: std::collections::BTreeSet<String> = master
        .connect()
        .await
        .expect("connect")
        .query(format!(
            "SELECT DISTINCT index_name FROM information_schema.statistics \
             WHERE table_schema = '{db}' AND table_name = 'counter_minute'"
        ))
        .await
        .map(|v: Vec<String>| v.into_iter().collect())
        .expect("indexes");
    let want: std::collections::BTreeSet<String> =
        ["PRIMARY", "by_bucket"].map(String::from).into();
    assert_eq!(indexes, want, "version 3 drops two");
    check_invariant(master, &db).await;
    let client = Client::new();
    let base = format!("http://{}", proxy.http);
    let mut truth = Truth(old);
    reads_equal_ledger(&client, &base, &truth, t0, &mut rng, "strong").await;

    // New writes (all below the watermark: the late path, as version 1
    // wrote them) and a restart that must not move the watermark.
    let events: Vec<(String, i64, i64)> = (0..500)
        .map(|_| {
            (
                format!("k{}", rng.usize(0..KEYS)),
                t0 - rng.i64(0..3 * DAY),
                3,
            )
        })
        .collect();
    let body: Vec<Value> = events
        .iter()
        .map(|(k, ts, d)| json!({ "ns": NS, "key": k, "ts": ts, "delta": d }))
        .collect();
    let (status, answer) = client
        .post_json(&format!("{base}/v1/events?ack=committed"), &json!(body))
        .await
        .expect("post");
    assert_eq!(status, 200, "{answer}");
    truth.0.extend(events);
    proxy.stop().await.expect("stop");
    let proxy = TestProxy::start(&cluster, |_| {}).await;
    assert_eq!(
        watermark(master, &db).await,
        w,
        "a second start keeps the watermark"
    );
    let base = format!("http://{}", proxy.http);
    reads_equal_ledger(&client, &base, &truth, t0, &mut rng, "strong").await;
    check_invariant(master, &db).await;
    let (status, _) = client
        .admin_post(&proxy.admin_url("/admin/v1/flush"), TEST_TOKEN)
        .await
        .expect("flush");
    assert_eq!(status, 200);
    proxy.stop().await.expect("stop");
}

/// A reshard from a group whose rollup reached the last whole hour to one
/// that never rolled up (watermark 0): the copy converts the moved
/// counters' rows to the target's watermark (minute rows only there), so
/// every read stays exact; once the target rolls up too, its tiers keep the
/// invariant and the reads are still exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reshard_between_groups_at_different_watermarks_stays_exact() {
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let db = cluster.database().to_owned();
    let (g0, g1) = (&cluster.group(0).master, &cluster.group(1).master);
    // The topology store lives in g1's master (another database).
    let store = tally_admin::Dsn::parse(&g1.root_dsn("tally_meta")).expect("store dsn");
    let two: Value = serde_yaml_ng::from_str(&cluster.topology_yaml(64)).expect("yaml");
    let yaml = |d: &Value| serde_yaml_ng::to_string(d).expect("yaml");
    let only = |i: usize| {
        let mut d = two.clone();
        let g = d["groups"][i].clone();
        d["groups"] = json!([g]);
        yaml(&d)
    };
    // Writes and the reshard go through a proxy that never rolls up; one
    // roller per group is started when that group is to roll up.
    let proxy = TestProxy::start_with_topology(&yaml(&two), {
        let store = store.clone();
        move |c| {
            c.topology_store = Some(store);
            c.store_poll_interval = Duration::from_millis(100);
            c.heartbeat_interval = Duration::from_millis(100);
            c.reshard.poll_interval = Duration::from_millis(100);
            c.reshard.chunk_counters = 5;
            c.reshard.cleanup_grace = Duration::from_millis(300);
            c.rollup.enabled = false;
        }
    })
    .await;
    let roller = |i: usize| {
        let topology = only(i);
        async move {
            TestProxy::start_with_topology(&topology, |c| {
                c.rollup.interval = Duration::from_millis(100);
                c.rollup.delay = Duration::ZERO;
            })
            .await
        }
    };
    let client = Client::new();
    let base = format!("http://{}", proxy.http);
    let t0 = now();
    let limit = floor(t0, HOUR);
    let mut rng = fastrand::Rng::with_seed(9);
    let events: Vec<(String, i64, i64)> = (0..3000)
        .map(|_| {
            (
                format!("k{}", rng.usize(0..KEYS)),
                t0 - rng.i64(0..3 * DAY),
                rng.i64(1..=9),
            )
        })
        .collect();
    for chunk in events.chunks(1000) {
        let body: Vec<Value> = chunk
            .iter()
            .map(|(k, ts, d)| json!({ "ns": NS, "key": k, "ts": ts, "delta": d }))
            .collect();
        let (status, answer) = client
            .post_json(&format!("{base}/v1/events?ack=committed"), &json!(body))
            .await
            .expect("post");
        assert_eq!(status, 200, "{answer}");
    }
    let truth = Truth(events);

    // g1 rolls up to the last whole hour; g0 never did.
    let r1 = roller(1).await;
    eventually(Duration::from_secs(60), "g1 rolled up", || async {
        (watermark(g1, &db).await == limit).then_some(())
    })
    .await;
    r1.stop().await.expect("stop");
    assert_eq!(watermark(g0, &db).await, 0);
    assert!(check_invariant(g1, &db).await > 0, "g1 has hour rows");

    // g0 takes three quarters of the ring: counters move from g1 to g0.
    let mut heavier = two.clone();
    heavier["groups"][0]["weight"] = json!(3);
    let owner = |d: &Value, k: &str| tally_integration::routing::owner(&yaml(d), NS, k);
    let moved = (0..KEYS)
        .map(|k| format!("k{k}"))
        .filter(|k| owner(&two, k) == "g1" && owner(&heavier, k) == "g0")
        .count();
    assert!(moved > 0, "some counters move from g1 to g0");
    let resp = client
        .raw()
        .post(proxy.admin_url("/admin/v1/reshard"))
        .bearer_auth(TEST_TOKEN)
        .json(&heavier)
        .send()
        .await
        .expect("post reshard");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(status, 202, "{text}");
    eventually(Duration::from_secs(120), "the reshard done", || async {
        let (_, s) = client
            .admin_get(&proxy.admin_url("/admin/v1/reshard"), TEST_TOKEN)
            .await
            .ok()?;
        (s["state"] == "done").then_some(())
    })
    .await;
    // The moved counters arrived as minute rows only (g0's watermark is 0).
    assert_eq!(watermark(g0, &db).await, 0);
    assert_eq!(check_invariant(g0, &db).await, 0, "no hour rows on g0 yet");
    reads_equal_ledger(&client, &base, &truth, t0, &mut rng, "strong").await;
    reads_equal_ledger(&client, &base, &truth, t0, &mut rng, "eventual").await;

    // g0 rolls up: its hour and day rows, moved counters included.
    let r0 = roller(0).await;
    eventually(Duration::from_secs(60), "g0 rolled up", || async {
        (watermark(g0, &db).await == limit).then_some(())
    })
    .await;
    r0.stop().await.expect("stop");
    assert!(check_invariant(g0, &db).await > 0, "g0 has hour rows");
    check_invariant(g1, &db).await;
    reads_equal_ledger(&client, &base, &truth, t0, &mut rng, "strong").await;
    proxy.stop().await.expect("stop");
}
