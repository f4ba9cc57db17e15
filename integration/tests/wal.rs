//! `durability: wal` end to end: a `tally-proxy` process acknowledges
//! buffered writes, part of them commit, the master goes away, more are
//! acknowledged, the proxy is SIGKILLed. The next process replays its log:
//! every acknowledged increment is stored exactly once (the committed part
//! is not applied again although it is still in the log), and another kill
//! and start applies nothing twice. Also: one proxy per WAL directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tally_harness::{Cluster, ClusterSpec, Node};
use tally_integration::{Client, KillOnDrop, TestProxy, eventually, free_port, routing, stored};

const NS: &str = "walns";
const KEYS: usize = 20;

struct Setup {
    bin: PathBuf,
    config: PathBuf,
    http: u16,
}

impl Setup {
    /// Writes `topology.yaml` and a `proxy.yaml` (free ports, `durability:
    /// wal` in `dir/wal` with 4 KiB segments, fast flushes) into `dir`;
    /// returns the setup and the admin port.
    fn write(bin: PathBuf, dir: &Path, topology_yaml: &str) -> (Setup, u16) {
        std::fs::write(dir.join("topology.yaml"), topology_yaml).expect("write");
        let (http, admin) = (free_port(), free_port());
        let config = dir.join("proxy.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: {{ http: 127.0.0.1:{http}, admin: 127.0.0.1:{admin} }}\n\
                 durability: wal\n\
                 wal: {{ dir: wal, segment_bytes: 4096 }}\n\
                 buffer: {{ flush_interval: 100ms, retry_max: 200ms }}\n"
            ),
        )
        .expect("write config");
        (Setup { bin, config, http }, admin)
    }

    fn spawn(&self) -> KillOnDrop {
        KillOnDrop(
            Command::new(&self.bin)
                .arg("--config")
                .arg(&self.config)
                .env("TALLY_ADMIN_TOKEN", "t")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn proxy"),
        )
    }

    async fn ready(&self, client: &Client) {
        let url = format!("http://127.0.0.1:{}/readyz", self.http);
        eventually(Duration::from_secs(60), "proxy ready", || async {
            matches!(client.get(&url).await, Ok((200, _))).then_some(())
        })
        .await;
    }
}

/// Posts `requests` batches of 10 buffered events; returns what was sent
/// per key. Every request must be acknowledged.
async fn post_batches(
    client: &Client,
    http: u16,
    requests: usize,
    seed: i64,
) -> BTreeMap<String, i64> {
    let mut sent = BTreeMap::new();
    let url = format!("http://127.0.0.1:{http}/v1/events");
    for r in 0..requests {
        let events: Vec<Value> = (0..10)
            .map(|i| {
                let n = (r * 10 + i) as i64 + seed;
                let key = format!("k{}", n as usize % KEYS);
                let delta = n % 7 + 1;
                *sent.entry(key.clone()).or_default() += delta;
                json!({"ns": NS, "key": key, "delta": delta})
            })
            .collect();
        let (status, body) = client
            .post_json(&url, &Value::Array(events))
            .await
            .expect("post");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["ack"], "buffered", "{body}");
    }
    sent
}

async fn totals(master: &Node) -> BTreeMap<String, i64> {
    stored::rows(master, "counter_total", NS)
        .await
        .into_iter()
        .map(|((k, _), (c, _))| (String::from_utf8_lossy(&k).into_owned(), c))
        .collect()
}

async fn minute_sums(master: &Node) -> BTreeMap<String, i64> {
    let mut sums = BTreeMap::new();
    for ((k, _), (c, _)) in stored::rows(master, "counter_minute", NS).await {
        *sums
            .entry(String::from_utf8_lossy(&k).into_owned())
            .or_default() += c;
    }
    sums
}

fn add(a: &mut BTreeMap<String, i64>, b: &BTreeMap<String, i64>) {
    for (k, v) in b {
        *a.entry(k.clone()).or_default() += v;
    }
}

/// Life directories (one per proxy process that has not finished) in the
/// WAL directory.
fn lives(wal: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(wal)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The `tally-proxy` binary, built if needed (off the async workers).
async fn proxy_binary() -> PathBuf {
    tokio::task::spawn_blocking(|| tally_integration::cargo_bin("tally-proxy", "tally-proxy"))
        .await
        .expect("build")
}

fn kill9(child: &mut KillOnDrop) {
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_acks_survive_kill_9_and_replay_exactly_once() {
    let bin = proxy_binary().await;
    let cluster = Cluster::start(ClusterSpec {
        groups: 1,
        replicas: 1,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let master = &cluster.group(0).master;
    let dir = tempfile::tempdir().expect("tempdir");
    let (setup, admin) = Setup::write(bin, dir.path(), &cluster.topology_yaml(160));
    let http = setup.http;
    let wal = dir.path().join("wal");
    let client = Client::new();

    // Life 1: a first part commits.
    let mut proxy = setup.spawn();
    setup.ready(&client).await;
    let mut expected = post_batches(&client, http, 40, 0).await;
    eventually(Duration::from_secs(30), "first part committed", || async {
        (totals(master).await == expected).then_some(())
    })
    .await;
    // Small segments: the log rotated, and closed segments whose events
    // all committed were deleted while the proxy ran.
    let life1 = lives(&wal);
    assert_eq!(life1.len(), 1, "{life1:?}");
    // The master goes away; the second part is acknowledged from memory
    // and the log only.
    master.stop().await;
    let second = post_batches(&client, http, 40, 1000).await;
    add(&mut expected, &second);
    kill9(&mut proxy);
    let segments = std::fs::read_dir(wal.join(&life1[0]))
        .expect("life dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".wal"))
        })
        .count();
    assert!(
        segments >= 2,
        "the killed life left its log ({segments} segments)"
    );
    master.start().await.expect("master back");

    // Life 2 replays life 1: only what had not committed.
    let mut proxy = setup.spawn();
    setup.ready(&client).await;
    eventually(Duration::from_secs(30), "life 1 replayed", || async {
        (!lives(&wal).contains(&life1[0])).then_some(())
    })
    .await;
    assert_eq!(totals(master).await, expected, "totals after replay");
    assert_eq!(
        minute_sums(master).await,
        expected,
        "minute rows after replay"
    );
    let (status, metrics) = client
        .get(&format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    let replayed: f64 = metrics
        .as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("tally_wal_replayed_entries_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("replay metric");
    assert!(
        // One entry per key and minute: a part written across a minute
        // boundary holds two per key.
        (1.0..=((2 * KEYS) as f64)).contains(&replayed),
        "replayed {replayed} entries: the second part's keys, within one minute or two"
    );

    // Life 3 after another kill: nothing left to apply, nothing applied
    // twice; then a third part goes through normally.
    kill9(&mut proxy);
    let mut proxy = setup.spawn();
    setup.ready(&client).await;
    let third = post_batches(&client, http, 5, 7).await;
    add(&mut expected, &third);
    eventually(Duration::from_secs(30), "third part committed", || async {
        (totals(master).await == expected).then_some(())
    })
    .await;
    // Settle: a late double application would show up here.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        totals(master).await,
        expected,
        "totals after the third life"
    );

    // A second process on the same WAL directory is refused at start.
    let refused = Command::new(&setup.bin)
        .arg("--config")
        .arg(&setup.config)
        .env("TALLY_ADMIN_TOKEN", "t")
        .env("TALLY__LISTEN__HTTP", format!("127.0.0.1:{}", free_port()))
        .env("TALLY__LISTEN__ADMIN", format!("127.0.0.1:{}", free_port()))
        .output()
        .expect("run a second proxy");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("in use by another process"), "{stderr}");

    // A clean stop commits everything and leaves no life to replay.
    // SAFETY: kill(2) on the pid of our own, still unreaped child.
    unsafe { libc::kill(proxy.id() as i32, libc::SIGTERM) };
    let status = proxy.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    assert_eq!(lives(&wal), Vec::<String>::new());
    assert_eq!(totals(master).await, expected);
}

/// `groups` groups of masters without replicas.
async fn masters_only(groups: usize) -> Cluster {
    Cluster::start(ClusterSpec {
        groups,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster")
}

/// Starts a stopped master and waits until it stores exactly `accepted`
/// events of this file's namespace (what the proxy held for it).
async fn start_and_wait_committed(master: &Node, accepted: i64) {
    master.start().await.expect("master back");
    eventually(
        Duration::from_secs(30),
        "accepted events committed",
        || async {
            let sum: i64 = totals(master).await.values().sum();
            (sum == accepted).then_some(())
        },
    )
    .await;
}

/// One group without replicas and an in-process proxy with its log in
/// `<temp dir>/wal`.
async fn one_group_with_wal(
    segment_bytes: u64,
    max_bytes: u64,
) -> (Cluster, tempfile::TempDir, TestProxy) {
    groups_with_wal(1, segment_bytes, max_bytes).await
}

/// `groups` groups without replicas and an in-process proxy with its log
/// in `<temp dir>/wal`.
async fn groups_with_wal(
    groups: usize,
    segment_bytes: u64,
    max_bytes: u64,
) -> (Cluster, tempfile::TempDir, TestProxy) {
    let cluster = masters_only(groups).await;
    let wal_dir = tempfile::tempdir().expect("tempdir");
    let dir = wal_dir.path().join("wal");
    let proxy = TestProxy::start(&cluster, |c| {
        c.wal = Some(tally_proxy::config::WalConfig {
            dir,
            segment_bytes,
            max_bytes,
            replay_wait: Duration::from_secs(1),
        });
    })
    .await;
    (cluster, wal_dir, proxy)
}

/// The log's disk goes away under a running proxy (its directory is
/// deleted, so the next segment cannot be opened): the write whose fsync
/// failed gets 503 `wal_failed` saying its events are held in memory, every
/// later write gets 503 `wal_failed` and changes nothing, `/readyz` turns
/// 503, and what was accepted is still committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_log_refuses_writes_and_keeps_what_it_accepted() {
    let (cluster, wal_dir, proxy) = one_group_with_wal(4096, 1 << 30).await;
    let root = wal_dir.path().join("wal");
    let client = Client::new();
    let url = proxy.url("/v1/events");
    let post = |i: usize| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .post_json(&url, &json!({"ns": NS, "key": format!("f{}", i % 5)}))
                .await
                .expect("post")
        }
    };
    let (status, body) = post(0).await;
    assert_eq!(status, 200, "{body}");
    let mut accepted = 1;
    std::fs::remove_dir_all(&root).expect("remove the WAL directory");
    // Writes still go to the open segment (its file stays open) until
    // the log needs its next one.
    let mut in_memory = None;
    for i in 1..2000 {
        let (status, body) = post(i).await;
        if status == 200 {
            accepted += 1;
            continue;
        }
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "wal_failed", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("held in memory"), "{message}");
        in_memory = Some(i);
        break;
    }
    assert!(in_memory.is_some(), "the log never needed a new segment");
    for i in 0..3 {
        let (status, body) = post(i).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "wal_failed", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("nothing of this request"), "{message}");
    }
    let (status, body) = client.get(&proxy.url("/readyz")).await.expect("readyz");
    assert_eq!(status, 503, "{body}");
    // The accepted writes and the one held in memory are committed; the
    // refused ones are not.
    eventually(
        Duration::from_secs(20),
        "accepted writes committed",
        || async {
            let sum: i64 = totals(&cluster.group(0).master).await.values().sum();
            (sum == accepted + 1).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sum: i64 = totals(&cluster.group(0).master).await.values().sum();
    assert_eq!(sum, accepted + 1);
}

/// While the only master is down nothing commits, so no segment can be
/// deleted: at `wal.max_bytes` writes get 503 `overloaded` with
/// `Retry-After` and change nothing; once the master is back, exactly the
/// accepted events are stored and writes are accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_refuses_writes_until_the_master_catches_up() {
    let (cluster, _wal_dir, proxy) = one_group_with_wal(64 * 1024, 1 << 20).await;
    let master = &cluster.group(0).master;
    let client = Client::new();
    master.stop().await;
    let url = proxy.url("/v1/events");
    // 1,000 events on 10 counters per request: about 30 KB of log each,
    // but only 10 pending entries, so the buffer bound never trips.
    let batch = |r: usize| {
        Value::Array(
            (0..1000)
                .map(|i| json!({"ns": NS, "key": format!("full{}", (r + i) % 10)}))
                .collect(),
        )
    };
    let mut accepted = 0i64;
    let mut refused = None;
    for r in 0..200 {
        let resp = client
            .raw()
            .post(&url)
            .json(&batch(r))
            .send()
            .await
            .expect("post");
        let status = resp.status().as_u16();
        let retry_after = resp.headers().get("retry-after").cloned();
        let body: Value = resp.json().await.expect("json");
        if status == 200 {
            accepted += 1000;
            continue;
        }
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "overloaded", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("wal.max_bytes")),
            "{body}"
        );
        assert!(retry_after.is_some(), "503 without Retry-After");
        refused = Some(r);
        break;
    }
    let refused = refused.expect("the log never filled up");
    assert!(refused >= 20, "refused after {refused} requests: too early");
    let (status, _) = client.get(&proxy.url("/readyz")).await.expect("readyz");
    assert_eq!(status, 200, "a full log is overload, not a failure");
    start_and_wait_committed(master, accepted).await;
    eventually(Duration::from_secs(30), "writes accepted again", || async {
        let (status, _) = client.post_json(&url, &batch(0)).await.ok()?;
        (status == 200).then_some(())
    })
    .await;
    accepted += 1000;
    eventually(Duration::from_secs(30), "all committed", || async {
        let sum: i64 = totals(master).await.values().sum();
        (sum == accepted).then_some(())
    })
    .await;
}

/// Issue #18, item 5: one dead master must not fill the log for everyone
/// (SPEC §6: a dead group never blocks another). g0's master is stopped
/// and writes to g0 fill its share of `wal.max_bytes` until they get 503;
/// writes to g1 are still accepted and committed meanwhile, and once g0's
/// master is back exactly the accepted g0 events are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_master_fills_only_its_own_share_of_the_log() {
    let (cluster, _wal_dir, proxy) = groups_with_wal(2, 64 * 1024, 2 << 20).await;
    let yaml = cluster.topology_yaml(160);
    let on_g0 = routing::keys_on(&yaml, NS, "share", "g0", 10);
    let on_g1 = routing::keys_on(&yaml, NS, "share", "g1", 10);
    let g0 = &cluster.group(0).master;
    let g1 = &cluster.group(1).master;
    let client = Client::new();
    g0.stop().await;
    let url = proxy.url("/v1/events");
    // 1,000 events on 10 counters of one group per request (~30 KB of log).
    let batch = |keys: &[String], r: usize| {
        Value::Array(
            (0..1000)
                .map(|i| json!({"ns": NS, "key": keys[(r + i) % keys.len()]}))
                .collect(),
        )
    };
    let mut accepted_g0 = 0i64;
    let mut full = false;
    for r in 0..200 {
        let (status, body) = client
            .post_json(&url, &batch(&on_g0, r))
            .await
            .expect("post");
        if status == 200 {
            accepted_g0 += 1000;
            continue;
        }
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "overloaded", "{body}");
        full = true;
        break;
    }
    assert!(full, "g0's share of the log never filled up");
    for r in 0..5 {
        let (status, body) = client
            .post_json(&format!("{url}?ack=committed"), &batch(&on_g1, r))
            .await
            .expect("post");
        assert_eq!(
            status, 200,
            "g1 must not be blocked by g0's dead master: {body}"
        );
    }
    let g1_sum: i64 = totals(g1).await.values().sum();
    assert_eq!(g1_sum, 5000, "g1's writes committed");
    start_and_wait_committed(g0, accepted_g0).await;
    proxy.stop().await.expect("clean stop");
}

/// Issue #18, item 6: records of keys that moved to another group while
/// the proxy was down are applied to their new owner at replay, exactly
/// once, instead of being written to a file for manual re-posting. Life 1
/// runs with g0 only, its master stopped, and is killed with buffered
/// events in its log; life 2 starts with g0 and g1: every acknowledged
/// event is stored once, on the group that owns its key now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_keys_that_moved_while_down_replay_to_their_new_owner() {
    let bin = proxy_binary().await;
    let cluster = masters_only(2).await;
    let both = cluster.topology_yaml(160);
    let mut only_g0: serde_yaml_ng::Value = serde_yaml_ng::from_str(&both).expect("yaml");
    if let Some(groups) = only_g0["groups"].as_sequence_mut() {
        groups.retain(|g| g["name"].as_str() == Some("g0"));
    }
    let only_g0 = serde_yaml_ng::to_string(&only_g0).expect("yaml");
    let dir = tempfile::tempdir().expect("tempdir");
    let (setup, _admin) = Setup::write(bin, dir.path(), &only_g0);
    let (topology, http) = (dir.path().join("topology.yaml"), setup.http);
    let client = Client::new();
    let (g0, g1) = (&cluster.group(0).master, &cluster.group(1).master);

    // Life 1: g0 only; its master is down, so everything stays in the log.
    let mut proxy = setup.spawn();
    setup.ready(&client).await;
    g0.stop().await;
    let expected = post_batches(&client, http, 30, 0).await;
    kill9(&mut proxy);
    g0.start().await.expect("master back");

    // Life 2: g0 and g1 (the file changed while the proxy was down).
    std::fs::write(&topology, &both).expect("write");
    let _proxy = setup.spawn();
    setup.ready(&client).await;
    let wal = dir.path().join("wal");
    eventually(Duration::from_secs(30), "life 1 replayed", || async {
        (lives(&wal).len() == 1).then_some(())
    })
    .await;
    let mut stored = totals(g0).await;
    let on_g1 = totals(g1).await;
    assert!(!on_g1.is_empty(), "some keys moved to g1");
    for (k, v) in &on_g1 {
        assert!(!stored.contains_key(k), "{k} stored on both groups");
        stored.insert(k.clone(), *v);
    }
    assert_eq!(stored, expected, "every acknowledged event stored once");
    for k in on_g1.keys() {
        assert_eq!(
            routing::owner(&both, NS, k),
            "g1",
            "{k} stored on the group that owns it"
        );
    }
}
