//! End-to-end support for tally: in-process proxies driven against real
//! MariaDB groups from [`tally_harness`], plus the `tally-dev` launcher.
//!
//! # Layout
//! - [`TestProxy`]: a real proxy (`tally_proxy::run`) on port-0 listeners,
//!   with its own topology file, stopped gracefully or abandoned like a
//!   crashed process.
//! - [`Client`]: a small JSON HTTP client for tests and tools.
//! - `src/bin/tally-dev.rs`: `cargo dev`.
//! - [`chaos`] and `src/bin/tally-chaos.rs`: the fault soak with a ledger.
//! - `tests/`: the end-to-end suites.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use tally_harness::Cluster;
use tally_proxy::config::Secret;
use tally_proxy::{Listeners, ProxyConfig, StartError};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use tally_harness;

pub mod bench;
pub mod chaos;

/// The admin token of every [`TestProxy`].
pub const TEST_TOKEN: &str = "test-token";

/// A proxy running inside the test process.
pub struct TestProxy {
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub topology_file: PathBuf,
    /// `https` when the listener serves TLS (`listen.http_tls`), else `http`.
    http_scheme: &'static str,
    admin_scheme: &'static str,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), StartError>>>,
    _dir: tempfile::TempDir,
}

impl TestProxy {
    /// Starts a proxy routing over every group of `cluster`, with test-sized
    /// defaults (fast flushes) changed further by `tweak`.
    pub async fn start(cluster: &Cluster, tweak: impl FnOnce(&mut ProxyConfig)) -> TestProxy {
        Self::start_with_topology(&cluster.topology_yaml(160), tweak).await
    }

    /// Starts a proxy with the given topology document.
    pub async fn start_with_topology(
        topology_yaml: &str,
        tweak: impl FnOnce(&mut ProxyConfig),
    ) -> TestProxy {
        // Proxy logs go to the test's captured output: shown when it fails.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("temp dir for the proxy");
        let topology_file = dir.path().join("topology.yaml");
        std::fs::write(&topology_file, topology_yaml).expect("write topology file");
        let mut config = ProxyConfig::defaults();
        config.topology_file = topology_file.clone();
        config.admin_token = Some(Secret(TEST_TOKEN.into()));
        config.buffer.flush_interval = Duration::from_millis(100);
        config.buffer.retry_max = Duration::from_millis(500);
        tweak(&mut config);
        let scheme = |tls: bool| if tls { "https" } else { "http" };
        let http_scheme = scheme(config.http_tls.is_some());
        let admin_scheme = scheme(config.admin_tls.is_some());
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let (http_addr, admin_addr) = (
            http.local_addr().expect("addr"),
            admin.local_addr().expect("addr"),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(tally_proxy::run(
            config,
            Listeners { http, admin },
            async move {
                let _ = stopped.await;
            },
        ));
        let proxy = TestProxy {
            http: http_addr,
            admin: admin_addr,
            topology_file,
            http_scheme,
            admin_scheme,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        };
        proxy.wait_ready(Duration::from_secs(30)).await;
        proxy
    }

    async fn wait_ready(&self, within: Duration) {
        // Readiness only: an HTTPS listener's certificate is the test's to
        // check.
        let client = Client {
            inner: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .tls_danger_accept_invalid_certs(true)
                .build()
                .expect("reqwest client"),
        };
        let deadline = Instant::now() + within;
        loop {
            if let Ok((200, _)) = client.get(&self.url("/readyz")).await {
                return;
            }
            if let Some(task) = &self.task
                && task.is_finished()
            {
                panic!("proxy exited during startup");
            }
            assert!(
                Instant::now() < deadline,
                "proxy not ready within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `http://<data addr><path>` (`https://` with TLS on the listener)
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.http_scheme, self.http)
    }

    /// `http://<admin addr><path>` (`https://` with TLS on the listener)
    pub fn admin_url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.admin_scheme, self.admin)
    }

    /// The Prometheus text of `GET /metrics` (panics when it cannot be read).
    pub async fn metrics(&self) -> String {
        Client::new()
            .raw()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("scrape /metrics")
            .text()
            .await
            .expect("/metrics body")
    }

    /// The running topology version, `None` when the admin API fails.
    pub async fn topology_version(&self, client: &Client) -> Option<u64> {
        let (status, body) = client
            .admin_get(&self.admin_url("/admin/v1/topology"), TEST_TOKEN)
            .await
            .ok()?;
        (status == 200).then(|| body["version"].as_u64()).flatten()
    }

    /// `PUT /admin/v1/topology` with `If-Match: "<if_match>"`.
    pub async fn put_topology(&self, client: &Client, doc: &Value, if_match: u64) -> (u16, Value) {
        let resp = client
            .raw()
            .put(self.admin_url("/admin/v1/topology"))
            .bearer_auth(TEST_TOKEN)
            .header("if-match", format!("\"{if_match}\""))
            .json(doc)
            .send()
            .await
            .expect("put topology");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Starts a graceful stop (what SIGTERM does) without waiting for it;
    /// [`TestProxy::stop`] then waits for its end.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Graceful stop (what SIGTERM does): drain, flush, return.
    pub async fn stop(mut self) -> Result<(), StartError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.expect("proxy task panicked"),
            None => Ok(()),
        }
    }

    /// Abandons the proxy without flushing, like a crashed process: its
    /// tasks are aborted and unflushed buffered events are gone.
    pub fn crash(mut self) {
        self.stop.take();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A JSON-over-HTTP client returning `(status, body)`.
#[derive(Clone)]
pub struct Client {
    inner: reqwest::Client,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Client {
        Client {
            inner: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("reqwest client"),
        }
    }

    /// A client that trusts only the CA certificate(s) in `ca_pem` (for
    /// HTTPS listeners with a test CA).
    pub fn with_ca(ca_pem: &[u8]) -> Client {
        let certs = reqwest::Certificate::from_pem_bundle(ca_pem).expect("CA PEM");
        Client {
            inner: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .tls_certs_only(certs)
                .build()
                .expect("reqwest client"),
        }
    }

    pub fn raw(&self) -> &reqwest::Client {
        &self.inner
    }

    pub async fn get(&self, url: &str) -> Result<(u16, Value), reqwest::Error> {
        Self::finish(self.inner.get(url).send().await?).await
    }

    pub async fn get_with_headers(
        &self,
        url: &str,
    ) -> Result<(u16, Value, reqwest::header::HeaderMap), reqwest::Error> {
        let resp = self.inner.get(url).send().await?;
        let headers = resp.headers().clone();
        let (status, body) = Self::finish(resp).await?;
        Ok((status, body, headers))
    }

    pub async fn post_json(&self, url: &str, body: &Value) -> Result<(u16, Value), reqwest::Error> {
        Self::finish(self.inner.post(url).json(body).send().await?).await
    }

    pub async fn post_body(
        &self,
        url: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let resp = self
            .inner
            .post(url)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await?;
        Self::finish(resp).await
    }

    pub async fn admin_post(&self, url: &str, token: &str) -> Result<(u16, Value), reqwest::Error> {
        Self::finish(self.inner.post(url).bearer_auth(token).send().await?).await
    }

    pub async fn admin_get(&self, url: &str, token: &str) -> Result<(u16, Value), reqwest::Error> {
        Self::finish(self.inner.get(url).bearer_auth(token).send().await?).await
    }

    async fn finish(resp: reqwest::Response) -> Result<(u16, Value), reqwest::Error> {
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, body))
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Routing helpers computed from a topology document, independent of any
/// running proxy: tests use them to aim keys at a chosen group.
pub mod routing {
    use tally_admin::{ShardRing, TopologyDoc, routing_key};

    /// The owning group of `(ns, key)` under `topology_yaml`.
    pub fn owner(topology_yaml: &str, ns: &str, key: &str) -> String {
        let topology = TopologyDoc::parse_and_validate(topology_yaml).expect("valid topology");
        ShardRing::new(&topology)
            .owner_name(&routing_key(ns, key))
            .expect("non-empty ring")
            .to_owned()
    }

    /// `n` distinct keys (`{prefix}-{i}`) owned by `group`.
    pub fn keys_on(
        topology_yaml: &str,
        ns: &str,
        prefix: &str,
        group: &str,
        n: usize,
    ) -> Vec<String> {
        let topology = TopologyDoc::parse_and_validate(topology_yaml).expect("valid topology");
        let ring = ShardRing::new(&topology);
        (0..)
            .map(|i| format!("{prefix}-{i}"))
            .filter(|k| ring.owner_name(&routing_key(ns, k)) == Some(group))
            .take(n)
            .collect()
    }
}

/// Reading stored counter rows straight from a master, for assertions.
pub mod stored {
    use std::collections::BTreeMap;

    use tally_harness::Node;
    use tally_harness::mysql_async::prelude::Queryable;

    /// `(key, bucket) → (count, ring_pos)` of one tier table for one
    /// namespace; the total table reports bucket 0.
    pub async fn rows(node: &Node, table: &str, ns: &str) -> BTreeMap<(Vec<u8>, i64), (i64, u64)> {
        let bucket = if table == "counter_total" {
            "0"
        } else {
            "bucket"
        };
        let mut conn = node.connect().await.expect("connect to node");
        let rows: Vec<(Vec<u8>, i64, i64, u64)> = conn
            .exec(
                format!("SELECT ckey, {bucket}, count, ring_pos FROM tally.{table} WHERE ns = ?"),
                (ns,),
            )
            .await
            .expect("select rows");
        rows.into_iter()
            .map(|(k, b, c, p)| ((k, b), (c, p)))
            .collect()
    }

    /// `Rows_sent` of a server since its start: rows it answered
    /// statements with (how much a read fetched).
    pub async fn rows_sent(node: &Node) -> u64 {
        let rows = node
            .sql("SHOW GLOBAL STATUS LIKE 'Rows_sent'")
            .await
            .expect("status");
        rows[0]
            .get::<String, _>(1)
            .and_then(|v| v.parse().ok())
            .expect("Rows_sent")
    }
}

/// What an answer must be, computed from a test's own ledger.
pub mod expected {
    use serde_json::{Value, json};

    /// The exact top `limit` of `(key, count)` pairs as `GET /v1/top`
    /// answers it: non-zero counts, by count descending, ties by key
    /// bytes ascending.
    pub fn top_k<'a>(
        values: impl IntoIterator<Item = (&'a String, &'a i64)>,
        limit: usize,
    ) -> Value {
        let mut v: Vec<(&String, i64)> = values
            .into_iter()
            .filter(|(_, c)| **c != 0)
            .map(|(k, c)| (k, *c))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.as_bytes().cmp(b.0.as_bytes())));
        v.into_iter()
            .take(limit)
            .map(|(k, c)| json!({ "key": k, "count": c }))
            .collect()
    }
}

/// Builds a binary of another workspace package (not reachable through
/// `CARGO_BIN_EXE_*`) with the cargo running the tests, and returns its path.
pub fn cargo_bin(package: &str, bin: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "build",
            "-q",
            "-p",
            package,
            "--bin",
            bin,
            "--message-format=json",
        ])
        .output()
        .expect("cargo build");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .find(|p| p.file_name().is_some_and(|n| n == bin))
        .unwrap_or_else(|| panic!("{bin} executable in cargo output"))
}

/// A TCP port that was free a moment ago (for a child process's listener).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so a
/// failing test cannot leave it (or the databases it owns) running.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Reading metric names out of the shipped dashboard and alert rules and
/// out of a `/metrics` scrape, for the tests that hold them together.
pub mod exposition {
    use std::collections::BTreeSet;

    /// Every metric name in `text` that starts with one of `prefixes` and
    /// is not part of a longer word (`x_tally_y` does not count).
    pub fn metric_names(text: &str, prefixes: &[&str]) -> BTreeSet<String> {
        let bytes = text.as_bytes();
        let name_char = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let mut names = BTreeSet::new();
        for prefix in prefixes {
            let mut from = 0;
            while let Some(i) = text[from..].find(prefix).map(|i| i + from) {
                let mut end = i + prefix.len();
                while end < bytes.len() && name_char(bytes[end]) {
                    end += 1;
                }
                if !(i > 0 && name_char(bytes[i - 1])) && end > i + prefix.len() {
                    names.insert(text[i..end].to_owned());
                }
                from = end;
            }
        }
        names
    }

    /// A histogram's series name without its `_bucket`/`_sum`/`_count`
    /// suffix.
    pub fn base(name: &str) -> &str {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name)
    }

    /// The sample names of a Prometheus text exposition, plus the base name
    /// of every histogram series (so a reference to the histogram itself
    /// counts as exported).
    pub fn exported(scrape: &str) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for line in scrape.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            if name.is_empty() {
                continue;
            }
            names.insert(name.to_owned());
            names.insert(base(name).to_owned());
        }
        names
    }
}

/// A committed-write load with a client ledger, for the fault tests
/// (promotion, fencing): whatever happens to the servers, every counter
/// must end up holding at least what was acknowledged and at most what
/// was sent.
pub mod load {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use serde_json::json;
    use tokio::task::JoinHandle;

    use crate::{Client, TestProxy};

    /// Per key: (acknowledged sum, sent sum).
    pub type Ledger = HashMap<String, (i64, i64)>;

    /// Writer tasks running until [`CommittedLoad::stop`].
    pub struct CommittedLoad {
        done: Arc<AtomicBool>,
        ledger: Arc<Mutex<Ledger>>,
        tasks: Vec<JoinHandle<(u64, u64, Duration)>>,
    }

    /// What the writers did.
    pub struct LoadReport {
        /// Requests answered 200.
        pub ok: u64,
        /// Requests answered otherwise, or not at all.
        pub failed: u64,
        /// The slowest request.
        pub slowest: Duration,
        pub ledger: Ledger,
    }

    impl CommittedLoad {
        /// `writers` tasks sending `ack=committed` increments (1 to 3) of
        /// namespace `ns`, writer `w` through `proxies[w % len]`, to keys
        /// `p{proxy}-w{w}-{0..5}`. Each delta counts as sent before its
        /// request goes out and as acknowledged on a 200; after a failure
        /// a writer pauses 50 ms.
        pub fn start(proxies: &[Arc<TestProxy>], writers: usize, ns: &str) -> CommittedLoad {
            let done = Arc::new(AtomicBool::new(false));
            let ledger: Arc<Mutex<Ledger>> = Arc::default();
            let client = Client::new();
            let tasks = (0..writers)
                .map(|w| {
                    let p = w % proxies.len();
                    let url = proxies[p].url("/v1/events?ack=committed");
                    let (done, ledger, client, ns) =
                        (done.clone(), ledger.clone(), client.clone(), ns.to_owned());
                    tokio::spawn(async move {
                        let (mut ok, mut failed, mut slowest) = (0u64, 0u64, Duration::ZERO);
                        let mut i = 0i64;
                        while !done.load(Ordering::Relaxed) {
                            i += 1;
                            let key = format!("p{p}-w{w}-{}", i % 5);
                            let delta = 1 + i % 3;
                            ledger
                                .lock()
                                .expect("ledger")
                                .entry(key.clone())
                                .or_default()
                                .1 += delta;
                            let started = Instant::now();
                            let r = client
                                .post_json(&url, &json!({ "ns": ns, "key": key, "delta": delta }))
                                .await;
                            slowest = slowest.max(started.elapsed());
                            match r {
                                Ok((200, _)) => {
                                    ok += 1;
                                    ledger.lock().expect("ledger").entry(key).or_default().0 +=
                                        delta;
                                }
                                _ => {
                                    failed += 1;
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            }
                        }
                        (ok, failed, slowest)
                    })
                })
                .collect();
            CommittedLoad {
                done,
                ledger,
                tasks,
            }
        }

        /// Stops the writers and waits for their requests in flight.
        pub async fn stop(self) -> LoadReport {
            self.done.store(true, Ordering::Relaxed);
            let (mut ok, mut failed, mut slowest) = (0, 0, Duration::ZERO);
            for t in self.tasks {
                let (o, f, s) = t.await.expect("writer");
                ok += o;
                failed += f;
                slowest = slowest.max(s);
            }
            let ledger = self.ledger.lock().expect("ledger").clone();
            LoadReport {
                ok,
                failed,
                slowest,
                ledger,
            }
        }
    }
}
