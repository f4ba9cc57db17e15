//! The state shared by every request handler and background task.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::ProxyConfig;
use crate::event::Window;
use crate::shard_map::ShardMap;

/// Everything a handler needs; one per proxy process (or per in-process
/// test proxy).
pub struct App {
    pub config: ProxyConfig,
    /// The whole routing state, swapped atomically on topology changes.
    pub map: ArcSwap<ShardMap>,
    /// This process's identity in the `(writer_id, seq)` dedup rows. Unique
    /// per start, so a restarted proxy can never collide with batches its
    /// previous life applied.
    pub writer_id: String,
    seq: AtomicU64,
    ready: AtomicBool,
    pub metrics: PrometheusHandle,
    /// The admin bearer token; `None` only on a loopback admin listener.
    pub admin_token: Option<String>,
    /// The shared topology store, when `topology.store` is configured.
    pub store: Option<crate::store::Store>,
    /// The listeners' addresses, for the proxy registry.
    pub addrs: std::sync::OnceLock<(String, String)>,
    /// Serializes topology changes (see `topology_ctl`).
    pub topology_lock: tokio::sync::Mutex<()>,
    /// One flusher per group buffer, by group name.
    flushers: Mutex<HashMap<String, JoinHandle<()>>>,
    /// Tells background tasks (flushers, retention, file watch) to finish.
    stop: watch::Sender<bool>,
    /// The newest topology version whose routing change is settled here:
    /// everything accepted under older rings is committed (see
    /// `reshard::settle`).
    pub settled: AtomicU64,
    /// Settles run one at a time, in the order of their versions.
    pub settle_lock: tokio::sync::Mutex<()>,
    /// What this proxy's reshard driver is doing, for the status endpoint.
    pub reshard: Mutex<crate::reshard::Progress>,
    /// The write-ahead log (`durability: wal`), set once at start before
    /// any flusher runs.
    pub wal_log: std::sync::OnceLock<Arc<crate::wal::Wal>>,
    /// Copy markers seen by reads of moved keys (a routing hint).
    pub known_copies: crate::reshard::reads::KnownCopies,
    /// Recent request latencies of the data listener (the reshard copy's
    /// adaptive throttle).
    pub latency: crate::latency::LatencyWindow,
}

impl App {
    pub fn new(
        config: ProxyConfig,
        map: ShardMap,
        metrics: PrometheusHandle,
        admin_token: Option<String>,
    ) -> Arc<App> {
        let prefix = config.writer_id.clone().unwrap_or_else(|| "tally".into());
        // 64 random bits plus the start time: unique across restarts and
        // across proxies sharing a prefix.
        let writer_id = format!("{prefix}-{:x}-{:016x}", unix_now(), fastrand::u64(..));
        let writer_id: String = writer_id.chars().take(64).collect();
        let store = config
            .topology_store
            .clone()
            .map(|dsn| crate::store::Store::new(dsn, &config.pool));
        Arc::new(App {
            config,
            map: ArcSwap::from_pointee(map),
            writer_id,
            seq: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            metrics,
            admin_token,
            store,
            addrs: std::sync::OnceLock::new(),
            topology_lock: tokio::sync::Mutex::new(()),
            flushers: Mutex::new(HashMap::new()),
            stop: watch::Sender::new(false),
            settled: AtomicU64::new(0),
            settle_lock: tokio::sync::Mutex::new(()),
            reshard: Mutex::new(crate::reshard::Progress::default()),
            wal_log: std::sync::OnceLock::new(),
            known_copies: Default::default(),
            latency: Default::default(),
        })
    }

    /// Starts a flusher for every group of the current map that has none.
    /// A flusher of a group that left the topology ends by itself once its
    /// buffer is empty.
    pub fn start_flushers(self: &Arc<Self>) {
        let map = self.map.load();
        let mut flushers = self.flushers.lock();
        flushers.retain(|_, task| !task.is_finished());
        for g in &map.groups {
            flushers.entry(g.name.clone()).or_insert_with(|| {
                tokio::spawn(crate::flusher::run(
                    self.clone(),
                    g.buffer.clone(),
                    self.stop.subscribe(),
                ))
            });
        }
    }

    /// A receiver that turns true when background tasks must finish.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Stops every flusher after it flushed everything and waits for them.
    pub async fn stop_flushers(&self) {
        let _ = self.stop.send(true);
        let tasks: Vec<JoinHandle<()>> = self.flushers.lock().drain().map(|(_, t)| t).collect();
        for t in tasks {
            if let Err(e) = t.await {
                tracing::error!(error = %e, "flusher task failed");
            }
        }
    }

    /// Flushes every group now and waits until all of it is committed.
    /// Fails, naming the groups, when a group's flush attempt fails (its
    /// data stays queued) or nothing commits within `max_wait`.
    pub async fn flush_all(&self, max_wait: std::time::Duration) -> Result<u64, Vec<String>> {
        let groups = self.groups();
        let before: u64 = groups.iter().map(|g| g.buffer.entries_committed()).sum();
        let waits = groups.iter().map(|g| {
            let failures = g.buffer.flush_failures();
            let generation = g.buffer.request_flush();
            async move {
                let failed = async {
                    while g.buffer.flush_failures() == failures {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                };
                let outcome = tokio::select! {
                    _ = g.buffer.wait_committed(generation) => Ok(()),
                    _ = failed => Err("a flush attempt failed"),
                    _ = tokio::time::sleep(max_wait) => Err("no commit in time"),
                };
                (g.name.clone(), outcome)
            }
        });
        let failed: Vec<String> = futures::future::join_all(waits)
            .await
            .into_iter()
            .filter_map(|(name, r)| r.err().map(|why| format!("{name} ({why})")))
            .collect();
        if !failed.is_empty() {
            return Err(failed);
        }
        let after: u64 = groups.iter().map(|g| g.buffer.entries_committed()).sum();
        Ok(after - before)
    }

    /// The write-ahead log, when buffered acks are durable.
    pub fn wal(&self) -> Option<&crate::wal::Wal> {
        self.wal_log.get().map(|w| &**w)
    }

    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Ready to take traffic: started, not stopping, and (with a
    /// write-ahead log) the log still takes writes, so a balancer drains a
    /// proxy whose disk failed.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.wal().is_none_or(|w| !w.failed())
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        crate::telemetry::ready(ready);
    }

    /// The accepted event time window as of now.
    pub fn window(&self) -> Window {
        Window {
            now: unix_now(),
            max_age: self.config.events.max_age,
            max_future: self.config.events.max_future,
        }
    }

    pub fn groups(&self) -> Vec<Arc<crate::shard_map::GroupHandle>> {
        self.map.load().groups.clone()
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
