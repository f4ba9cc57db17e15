//! The state shared by every request handler and background task.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use metrics_exporter_prometheus::PrometheusHandle;

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
        Arc::new(App {
            config,
            map: ArcSwap::from_pointee(map),
            writer_id,
            seq: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            metrics,
            admin_token,
        })
    }

    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
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
