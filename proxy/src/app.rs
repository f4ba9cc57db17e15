//! The state shared by every request handler and background task.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::Mutex;
use tokio::sync::Mutex as AsyncMutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::ProxyConfig;
use crate::domain::clock::unix_now;
use crate::domain::event::Window;
use crate::domain::latency::LatencyWindow;
use crate::storage::buffer::{Batch, GroupBuffer};
use crate::storage::known_copies::KnownCopies;
use crate::storage::read_cache::ReadCache;
use crate::storage::shard_map::{GroupHandle, ShardMap};
use crate::storage::store::{Store, StoreLease};
use crate::storage::wal::Wal;
use crate::telemetry;

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
    pub store: Option<Store>,
    /// With a store: when this proxy last reached it, and whether it may
    /// write (see [`StoreLease`]).
    pub store_lease: StoreLease,
    /// The listeners' addresses, for the proxy registry.
    pub addrs: OnceLock<(String, String)>,
    /// Serializes topology changes (see `topology_ctl`).
    pub topology_lock: AsyncMutex<()>,
    /// The running flushers, one per buffer. Keyed by the buffer itself,
    /// not the group name: a group removed and added back gets a new buffer
    /// (and so a new flusher) while the old one may still be draining.
    pub(crate) flushers: Mutex<Vec<FlusherTask>>,
    /// Tells background tasks (flushers, retention, file watch) to finish.
    pub(crate) stop: watch::Sender<bool>,
    /// The newest topology version whose routing change is settled here:
    /// everything accepted under older rings is committed (see
    /// `reshard::settle`).
    pub settled: AtomicU64,
    /// Settles run one at a time, in the order of their versions.
    pub settle_lock: AsyncMutex<()>,
    /// What this proxy's reshard driver is doing, for the status endpoint.
    pub reshard: Mutex<ReshardProgress>,
    /// The write-ahead log (`durability: wal`), set once at start before
    /// any flusher runs.
    pub wal_log: OnceLock<Arc<Wal>>,
    /// Copy markers seen by reads of moved keys (a routing hint).
    pub known_copies: KnownCopies,
    /// Recent request latencies of the data listener (the reshard copy's
    /// adaptive throttle).
    pub latency: LatencyWindow,
    /// The bounded-staleness cache of eventual totals (`reads.cache`;
    /// `None` when off). Strong reads never use it.
    pub read_cache: Option<ReadCache>,
}

impl App {
    pub fn new(
        config: ProxyConfig,
        map: ShardMap,
        metrics: PrometheusHandle,
        admin_token: Option<String>,
    ) -> Arc<App> {
        let prefix = config.writer_id.as_deref().unwrap_or("tally");
        let writer_id = writer_identity(prefix, start_nanos(), fastrand::u64(..));
        let store = config
            .topology_store
            .clone()
            .map(|dsn| Store::new(dsn, &config.pool).with_alive_window(config.store_alive_window));
        let store_lease = StoreLease::new(config.store_fence_after());
        let read_cache = config.reads.cache.as_ref().map(ReadCache::new);
        Arc::new(App {
            config,
            map: ArcSwap::from_pointee(map),
            writer_id,
            seq: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            metrics,
            admin_token,
            store,
            store_lease,
            addrs: OnceLock::new(),
            topology_lock: AsyncMutex::new(()),
            flushers: Mutex::new(Vec::new()),
            stop: watch::Sender::new(false),
            settled: AtomicU64::new(0),
            settle_lock: AsyncMutex::new(()),
            reshard: Mutex::new(ReshardProgress::default()),
            wal_log: OnceLock::new(),
            known_copies: Default::default(),
            latency: Default::default(),
            read_cache,
        })
    }

    /// Tells the read cache which counters a batch of this proxy just
    /// committed: their cached totals are dropped, and reads sent before
    /// now are not cached for them afterwards (see `storage::read_cache`).
    pub fn committed_to(&self, batch: &Batch) {
        if let Some(cache) = &self.read_cache {
            let rks = batch.counters.iter().map(|(rk, _)| &**rk);
            telemetry::read_cache_forgotten(cache.forget(rks, Instant::now()));
        }
    }

    /// A receiver that turns true when background tasks must finish.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Flushes every group now and waits until all of it is committed.
    /// Fails, naming the groups, when a group's flush attempt fails (its
    /// data stays queued) or nothing commits within `max_wait`.
    pub async fn flush_all(&self, max_wait: Duration) -> Result<u64, Vec<String>> {
        let groups = self.groups();
        let before: u64 = groups.iter().map(|g| g.buffer.entries_committed()).sum();
        let waits = groups.iter().map(|g| {
            let failures = g.buffer.flush_failures();
            let generation = g.buffer.request_flush();
            async move {
                let failed = async {
                    while g.buffer.flush_failures() == failures {
                        tokio::time::sleep(Duration::from_millis(20)).await;
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
    pub fn wal(&self) -> Option<&Wal> {
        self.wal_log.get().map(|w| &**w)
    }

    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Ready to take traffic: started, not stopping, (with a write-ahead
    /// log) the log still takes writes, so a balancer drains a proxy whose
    /// disk failed, and (with a shared store) the store has been read once:
    /// the local file may predate promotions and reshards.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && self.wal().is_none_or(|w| !w.failed())
            && (self.store.is_none() || self.store_lease.ever_synced())
    }

    /// With a shared store, whether writes are refused now because this
    /// proxy's lease lapsed (see [`StoreLease`]); the first refusal after
    /// a change is logged.
    pub fn store_fenced(&self) -> bool {
        self.store.is_some() && self.store_lease.fenced()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        telemetry::ready(ready);
    }

    /// The accepted event time window as of now.
    pub fn window(&self) -> Window {
        Window {
            now: unix_now(),
            max_age: self.config.events.max_age,
            max_future: self.config.events.max_future,
        }
    }

    pub fn groups(&self) -> Vec<Arc<GroupHandle>> {
        self.map.load().groups.clone()
    }
}

/// This process's dedup identity: the configured prefix (at most
/// `WRITER_ID_PREFIX_MAX` = 32 plain ASCII bytes, checked by the config),
/// the start time in nanoseconds and 48 random bits, each part fixed-width
/// and never cut: at most 62 bytes, inside the dedup rows' `VARBINARY(64)`.
/// Two lives of one proxy start at different nanoseconds, so they never
/// share an identity; two proxies could only if they also drew the same
/// random bits.
fn writer_identity(prefix: &str, started_nanos: u64, random: u64) -> String {
    format!(
        "{prefix}-{started_nanos:016x}-{:012x}",
        random & 0xffff_ffff_ffff
    )
}

/// Nanoseconds since the Unix epoch, for the identity (0 before it).
fn start_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A flusher task and the buffer it drains.
pub struct FlusherTask {
    pub buffer: Arc<GroupBuffer>,
    pub task: JoinHandle<()>,
}

/// What this proxy's driver did and is doing (the durable state is the
/// topology and the markers; this adds rates and waits for the status).
#[derive(Debug, Default)]
pub struct ReshardProgress {
    pub id: String,
    pub step: String,
    pub rows_total: Option<u64>,
    pub rows_copied: u64,
    pub copy_started: Option<Instant>,
    pub waiting_for: Vec<String>,
    pub last_error: Option<String>,
    /// This proxy's request p99 when its driver took up the reshard (the
    /// adaptive throttle's reference); `None` with too few requests.
    pub latency_before: Option<Duration>,
    /// The adaptive throttle's current rows/s, and when it last moved.
    pub rate: Option<f64>,
    pub rate_adjusted: Option<Instant>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WRITER_ID_PREFIX_MAX;

    #[test]
    fn the_identity_keeps_its_unique_parts_whole_and_fits_the_dedup_column() {
        let prefix = "w".repeat(WRITER_ID_PREFIX_MAX);
        let id = writer_identity(&prefix, u64::MAX, u64::MAX);
        assert!(id.len() <= 64, "{} bytes: {id}", id.len());
        assert_eq!(id, format!("{prefix}-ffffffffffffffff-ffffffffffff"));
        // Lives one nanosecond apart never share an identity, whatever
        // random bits they drew.
        let a = writer_identity(&prefix, 1_700_000_000_000_000_000, 7);
        let b = writer_identity(&prefix, 1_700_000_000_000_000_001, 7);
        assert_ne!(a, b);
        assert!(a.starts_with(&prefix) && b.starts_with(&prefix));
    }
}
