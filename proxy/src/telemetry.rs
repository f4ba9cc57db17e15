//! Every metric the proxy exports, named and described in one place.
//!
//! Call sites use the small functions here instead of `metrics` macros with
//! string names, so a dashboard can be checked against this file alone and a
//! typo cannot create a second, silent series. The Prometheus recorder is
//! process-global (the `metrics` facade allows one), so several in-process
//! proxies in a test share it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use metrics::{
    Histogram, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use parking_lot::{Mutex, RwLock};

/// A gauge not updated for this long disappears from `/metrics`.
pub const GAUGE_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static STARTED: OnceLock<Instant> = OnceLock::new();
/// `tally_store_fenced`, kept here so every scrape exports it (0 from the
/// start, and without a store).
static STORE_FENCED: AtomicBool = AtomicBool::new(false);
/// When the newest heartbeat the store recorded was sent, for
/// `tally_store_contact_age_seconds`: nanoseconds after [`STARTED`] plus
/// one; 0 before the first one; [`NO_STORE`] without a store.
static STORE_RENEWED: AtomicU64 = AtomicU64::new(NO_STORE);
const NO_STORE: u64 = u64::MAX;
/// `tally_wal_failed`: set by the first write-ahead-log failure; the log
/// refuses writes from then on, so it is never cleared (a new run of the
/// proxy, see [`configured`], starts with a new log).
static WAL_FAILED: AtomicBool = AtomicBool::new(false);
/// The configured bounds of the running proxy (`tally_config_*`).
static BOUNDS: Mutex<Option<Bounds>> = Mutex::new(None);
/// Groups whose series are registered (see [`group_series`]).
static GROUPS: LazyLock<RwLock<HashSet<Box<str>>>> = LazyLock::new(Default::default);
/// Per listener: open connections and body bytes (gauges kept here, so a
/// scrape can set them again: see [`GAUGE_IDLE_TIMEOUT`]) and its bounds.
static LISTENERS: LazyLock<RwLock<Vec<Arc<ListenerState>>>> = LazyLock::new(Default::default);

/// Labels known in advance, exported at 0 from the start so that `rate`
/// and `increase` count the first event and alerts never start on "no
/// data". A label value not listed here still works: its series appears
/// with its first event.
///
/// `reason` of `tally_events_rejected_total`: the error codes a write can
/// be refused with (`error.rs`).
const WRITE_REJECT_REASONS: &[&str] = &[
    "invalid_json",
    "invalid_event",
    "ts_out_of_range",
    "invalid_param",
    "payload_too_large",
    "unsupported_media_type",
    "body_timeout",
    "overloaded",
    "unavailable",
    "commit_timeout",
    "wal_failed",
    "store_unreachable",
    "shutting_down",
    "internal",
];
/// `source` of `tally_topology_changes_total` (`control::topology::Source`).
const TOPOLOGY_SOURCES: &[&str] = &["startup", "api", "file", "promotion", "store", "reshard"];
/// `route` of `tally_read_duration_seconds` (the read endpoints) and its
/// `role`.
const READ_ROUTES: &[&str] = &["total", "count", "series", "query", "top"];
const ROLES: &[&str] = &["master", "replica"];
/// The data listener's API routes (router templates) for
/// `tally_http_request_duration_seconds`; every other route gets its three
/// status classes at 0 on its first request.
const DATA_ROUTES: &[&str] = &[
    "/v1/events",
    "/v1/counters/{ns}/{key}/incr",
    "/v1/counters/{ns}/{key}",
    "/v1/counters/{ns}/{key}/count",
    "/v1/counters/{ns}/{key}/series",
    "/v1/counters/query",
    "/v1/top/{ns}",
];
/// `reason` of `tally_connections_timed_out_total`.
const TIMEOUT_REASONS: &[&str] = &["header_read", "idle", "body", "drain"];
/// `reason` of `tally_read_fallbacks_total`, `mode` of
/// `tally_promotions_total`, `table` of `tally_retention_deleted_rows_total`.
const FALLBACK_REASONS: &[&str] = &["no_replica", "replica_error"];
const PROMOTION_MODES: &[&str] = &["planned", "emergency"];
const RETENTION_TABLES: &[&str] = &[
    "counter_minute",
    "counter_hour",
    "counter_day",
    "applied_batches",
    "applied_ids",
    "applied_id_sets",
];

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn install() -> PrometheusHandle {
    STARTED.get_or_init(Instant::now);
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0,
                    ],
                )
                .unwrap_or_else(|_| PrometheusBuilder::new())
                // Gauges of servers that left the topology would otherwise
                // report their last value forever (a removed master "down"
                // keeps alerting). Live gauges are refreshed by the health
                // checks (every `health.interval`) or at every scrape.
                .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE_TIMEOUT));
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness);
            // then our handle still renders what we record through it only
            // if it is the global one, which is the normal case.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            gauge!("tally_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            gauge!("tally_store_fenced").set(0.0);
            gauge!("tally_store_contact_age_seconds").set(0.0);
            gauge!("tally_ready").set(0.0);
            gauge!("tally_wal_failed").set(0.0);
            register_known();
            process_metrics();
            handle
        })
        .clone()
}

/// Renders the text exposition. Gauges that change rarely are set again
/// here so the idle timeout never drops them, and the `process_*` gauges
/// are read from `/proc/self`.
pub fn render(
    handle: &PrometheusHandle,
    topology_version: u64,
    is_ready: bool,
    pending: &[(String, usize)],
) -> String {
    if let Some(start) = STARTED.get() {
        gauge!("tally_uptime_seconds").set(start.elapsed().as_secs_f64());
    }
    gauge!("tally_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    self::topology_version(topology_version);
    ready(is_ready);
    gauge!("tally_store_fenced").set(f64::from(u8::from(STORE_FENCED.load(Ordering::Relaxed))));
    gauge!("tally_store_contact_age_seconds").set(store_contact_age().as_secs_f64());
    gauge!("tally_wal_failed").set(f64::from(u8::from(WAL_FAILED.load(Ordering::Relaxed))));
    for (group, rows) in pending {
        pending_rows(group, *rows);
    }
    for l in LISTENERS.read().iter() {
        l.refresh();
    }
    if let Some(b) = *BOUNDS.lock() {
        b.export();
    }
    process_metrics();
    handle.render()
}

/// The configured bounds a dashboard draws next to their usage
/// (`tally_config_*`); the listeners' own are given to [`listener`].
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_pending_rows: usize,
    pub commit_timeout: Duration,
    pub max_replica_lag: Duration,
    /// `None` without a write-ahead log.
    pub wal_max_bytes: Option<u64>,
}

impl Bounds {
    fn export(&self) {
        gauge!("tally_config_max_pending_rows").set(self.max_pending_rows as f64);
        gauge!("tally_config_commit_timeout_seconds").set(self.commit_timeout.as_secs_f64());
        gauge!("tally_config_max_replica_lag_seconds").set(self.max_replica_lag.as_secs_f64());
        // 0 without a write-ahead log (nothing is bounded).
        gauge!("tally_config_wal_max_bytes").set(self.wal_max_bytes.unwrap_or(0) as f64);
    }
}

/// A proxy run starts with these bounds (after [`install`]): exports them,
/// and the write-ahead log's series at 0 (a new log has not failed; a
/// proxy without one writes nothing to it), so the dashboard's WAL panel
/// and its alert have data with or without a log.
pub fn configured(bounds: Bounds) {
    *BOUNDS.lock() = Some(bounds);
    bounds.export();
    WAL_FAILED.store(false, Ordering::Relaxed);
    gauge!("tally_wal_failed").set(0.0);
    for name in [
        "tally_wal_bytes_written_total",
        "tally_wal_segments_deleted_total",
        "tally_wal_failures_total",
        "tally_wal_replayed_entries_total",
        "tally_wal_replay_stuck_total",
    ] {
        counter!(name).increment(0);
    }
    let _ = histogram!("tally_wal_fsync_seconds");
}

/// Series whose labels are known in advance, at 0 (see
/// [`WRITE_REJECT_REASONS`]).
fn register_known() {
    LazyLock::force(&READ_SERIES);
    counter!("tally_events_accepted_total").increment(0);
    for reason in WRITE_REJECT_REASONS {
        counter!("tally_events_rejected_total", "reason" => *reason).increment(0);
    }
    for source in TOPOLOGY_SOURCES {
        counter!("tally_topology_changes_total", "source" => *source).increment(0);
    }
    counter!("tally_reshard_rows_copied_total").increment(0);
    for route in READ_ROUTES {
        for role in ROLES {
            let _ = histogram!("tally_read_duration_seconds", "route" => *route, "role" => *role);
        }
    }
    for route in DATA_ROUTES {
        let _ = request_series(route);
    }
}

/// Registers every per-group series of `group` at 0 the first time the
/// group is seen (its flusher starts, its schema is applied, a scrape
/// lists it), so a group added later is exported as it appears.
fn group_series(group: &str) {
    if HANDLE.get().is_none() || GROUPS.read().contains(group) {
        return;
    }
    if !GROUPS.write().insert(group.into()) {
        return;
    }
    let g = || group.to_owned();
    for name in [
        "tally_flush_batches_total",
        "tally_flush_rows_total",
        "tally_flush_errors_total",
        "tally_flush_duplicates_total",
        "tally_flusher_restarts_total",
        "tally_quarantined_deltas_total",
        "tally_schema_applied_total",
        "tally_retention_errors_total",
        "tally_rollup_hours_total",
        "tally_rollup_errors_total",
    ] {
        counter!(name, "group" => g()).increment(0);
    }
    for reason in FALLBACK_REASONS {
        counter!("tally_read_fallbacks_total", "group" => g(), "reason" => *reason).increment(0);
    }
    // 0 until the rollup's first look (at start) reads the watermark.
    gauge!("tally_rollup_lag_seconds", "group" => g()).set(0.0);
    gauge!("tally_flush_commit_in_doubt", "group" => g()).set(0.0);
    for stage in ["buffer", "store"] {
        counter!("tally_duplicate_events_total", "group" => g(), "stage" => stage).increment(0);
    }
    for table in RETENTION_TABLES {
        counter!("tally_retention_deleted_rows_total", "group" => g(), "table" => *table)
            .increment(0);
    }
    for mode in PROMOTION_MODES {
        counter!("tally_promotions_total", "group" => g(), "mode" => *mode).increment(0);
    }
    for name in [
        "tally_flush_duration_seconds",
        "tally_promotion_duration_seconds",
        "tally_write_pause_seconds",
    ] {
        let _ = histogram!(name, "group" => g());
    }
}

/// One listener's gauges and bounds.
struct ListenerState {
    name: &'static str,
    open: AtomicI64,
    body_bytes: AtomicI64,
    max_connections: AtomicU64,
    max_body_bytes: AtomicU64,
}

impl ListenerState {
    fn refresh(&self) {
        let name = self.name;
        gauge!("tally_connections_open", "listener" => name)
            .set(self.open.load(Ordering::Relaxed) as f64);
        gauge!("tally_request_body_bytes", "listener" => name)
            .set(self.body_bytes.load(Ordering::Relaxed) as f64);
        gauge!("tally_config_max_connections", "listener" => name)
            .set(self.max_connections.load(Ordering::Relaxed) as f64);
        gauge!("tally_config_max_body_bytes_in_flight", "listener" => name)
            .set(self.max_body_bytes.load(Ordering::Relaxed) as f64);
    }
}

fn listener_state(name: &'static str) -> Arc<ListenerState> {
    if let Some(l) = LISTENERS.read().iter().find(|l| l.name == name) {
        return l.clone();
    }
    let mut all = LISTENERS.write();
    if let Some(l) = all.iter().find(|l| l.name == name) {
        return l.clone();
    }
    let l = Arc::new(ListenerState {
        name,
        open: AtomicI64::new(0),
        body_bytes: AtomicI64::new(0),
        max_connections: AtomicU64::new(0),
        max_body_bytes: AtomicU64::new(0),
    });
    all.push(l.clone());
    l
}

/// A listener starts serving with these bounds: its series exist (at 0)
/// from now on.
pub fn listener(name: &'static str, max_connections: usize, max_body_bytes_in_flight: usize) {
    let l = listener_state(name);
    l.max_connections
        .store(max_connections as u64, Ordering::Relaxed);
    l.max_body_bytes
        .store(max_body_bytes_in_flight as u64, Ordering::Relaxed);
    l.refresh();
    counter!("tally_connections_accepted_total", "listener" => name).increment(0);
    counter!("tally_connections_refused_total", "listener" => name).increment(0);
    counter!("tally_request_bodies_refused_total", "listener" => name).increment(0);
    for reason in TIMEOUT_REASONS {
        counter!("tally_connections_timed_out_total", "listener" => name, "reason" => *reason)
            .increment(0);
    }
}

/// An open client connection of a listener (`tally_connections_open`),
/// counted until dropped.
#[must_use = "the connection counts as open until this is dropped"]
pub struct OpenConnection(Arc<ListenerState>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let open = self.0.open.fetch_sub(1, Ordering::Relaxed) - 1;
        gauge!("tally_connections_open", "listener" => self.0.name).set(open as f64);
    }
}

/// The `process_*` metrics of the Prometheus client libraries, from
/// `/proc/self` (Linux; elsewhere none): CPU seconds, resident and virtual
/// memory, open and maximum file descriptors, start time. Read at every
/// scrape: four small files and a directory listing, no dependency (the
/// crate forbids `unsafe`, so no `sysconf`/`getrlimit` either).
fn process_metrics() {
    #[cfg(target_os = "linux")]
    {
        if let Some(stat) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| parse_proc_stat(&s, boot_time()))
        {
            // Monotonic, hence `_total`; a gauge because the `metrics`
            // counters are integers and CPU time is fractional seconds.
            gauge!("process_cpu_seconds_total").set(stat.cpu_seconds);
            if let Some(start) = stat.start_time_seconds {
                gauge!("process_start_time_seconds").set(start);
            }
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            for (key, name) in [
                ("VmRSS:", "process_resident_memory_bytes"),
                ("VmSize:", "process_virtual_memory_bytes"),
            ] {
                if let Some(kib) = status_kib(&status, key) {
                    gauge!(name).set(kib * 1024.0);
                }
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            // The directory being listed is one of them.
            gauge!("process_open_fds").set(fds.count().saturating_sub(1) as f64);
        }
        if let Some(max) = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| max_open_files(&l))
        {
            gauge!("process_max_fds").set(max);
        }
    }
}

/// The kernel reports process times in USER_HZ ticks, 100 per second on
/// every architecture Linux runs this on (fixed ABI, unlike `HZ`).
#[cfg(target_os = "linux")]
const USER_HZ: f64 = 100.0;

#[cfg(target_os = "linux")]
struct ProcStat {
    cpu_seconds: f64,
    start_time_seconds: Option<f64>,
}

/// Fields of `/proc/self/stat` (proc(5)): utime 14, stime 15, starttime
/// 22 (ticks after boot); the command name (2) is in parentheses and may
/// hold spaces, so fields are counted after its closing one.
#[cfg(target_os = "linux")]
fn parse_proc_stat(stat: &str, boot: Option<f64>) -> Option<ProcStat> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3.
    let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
    Some(ProcStat {
        cpu_seconds: (field(14)? + field(15)?) / USER_HZ,
        start_time_seconds: boot
            .zip(field(22))
            .map(|(boot, start)| boot + start / USER_HZ),
    })
}

/// `VmRSS:     1234 kB` in `/proc/self/status`: the number.
#[cfg(target_os = "linux")]
fn status_kib(status: &str, key: &str) -> Option<f64> {
    let line = status.lines().find_map(|l| l.strip_prefix(key))?;
    line.split_whitespace().next()?.parse().ok()
}

/// The soft limit of `Max open files` in `/proc/self/limits`.
#[cfg(target_os = "linux")]
fn max_open_files(limits: &str) -> Option<f64> {
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    match line.split_whitespace().next()? {
        "unlimited" => Some(f64::INFINITY),
        n => n.parse().ok(),
    }
}

/// The boot time (`btime` of `/proc/stat`), read once.
#[cfg(target_os = "linux")]
fn boot_time() -> Option<f64> {
    static BOOT: OnceLock<Option<f64>> = OnceLock::new();
    *BOOT.get_or_init(|| {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        stat.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())
    })
}

fn describe() {
    describe_gauge!(
        "tally_build_info",
        "Build information; the value is always 1."
    );
    describe_gauge!(
        "tally_uptime_seconds",
        "Seconds since the proxy process started."
    );
    describe_gauge!(
        "tally_topology_version",
        "Version of the topology this proxy routes by."
    );
    describe_gauge!(
        "tally_ready",
        "1 when the proxy is ready to serve, 0 otherwise."
    );
    describe_gauge!(
        "tally_store_fenced",
        "1 while this proxy refuses writes (503 store_unreachable) because no heartbeat reached the shared topology store within 3/4 of topology.alive_window, or it has not read the store since; 0 otherwise (always 0 without a store)."
    );
    describe_gauge!(
        "tally_store_contact_age_seconds",
        "With a shared topology store: seconds since the newest heartbeat the store recorded was sent (since the start before the first one); writes are refused past 3/4 of topology.alive_window. 0 without a store."
    );
    describe_counter!(
        "tally_connections_accepted_total",
        "Client connections accepted, per listener (http, admin)."
    );
    describe_gauge!(
        "tally_connections_open",
        "Client connections open now, per listener (bounded by connections.max_per_listener, tally_config_max_connections)."
    );
    describe_counter!(
        "tally_connections_refused_total",
        "Client connections answered 503 and closed because the listener held connections.max_per_listener."
    );
    describe_counter!(
        "tally_connections_timed_out_total",
        "Client connections closed by the proxy, per listener and reason: header_read (request head too slow), idle (keep-alive unused), body (request body too slow or past connections.body_read_timeout, answered 408) or drain (request still in progress at shutdown.drain_deadline, cut without an answer)."
    );
    describe_gauge!(
        "tally_request_body_bytes",
        "Bytes of request bodies read and not yet answered, per listener (bounded by connections.max_body_bytes_in_flight)."
    );
    describe_counter!(
        "tally_request_bodies_refused_total",
        "Request bodies answered 503 overloaded because the listener held connections.max_body_bytes_in_flight bytes of bodies, per listener."
    );
    describe_counter!(
        "tally_events_accepted_total",
        "Events accepted into the aggregation buffer."
    );
    describe_counter!(
        "tally_events_rejected_total",
        "Events rejected, by reason (the error code)."
    );
    describe_gauge!(
        "tally_pending_rows",
        "Pending (counter, minute) entries and events with an id per group, not yet committed: what buffer.max_pending_rows bounds."
    );
    describe_counter!(
        "tally_flush_batches_total",
        "Flush batches committed per group."
    );
    describe_counter!(
        "tally_flush_rows_total",
        "Rows (all tiers) written by committed flushes per group."
    );
    describe_counter!(
        "tally_flush_errors_total",
        "Failed flush attempts per group (each is retried)."
    );
    describe_counter!(
        "tally_flush_duplicates_total",
        "Retried batches found already applied (dedup row present) per group."
    );
    describe_counter!(
        "tally_duplicate_events_total",
        "Events with an idempotency id found already counted and discarded, per group: stage=buffer when a copy was pending in this proxy, stage=store when the flush found the id in the database."
    );
    describe_histogram!(
        "tally_flush_duration_seconds",
        "Time to apply one flush batch per group."
    );
    describe_histogram!(
        "tally_http_request_duration_seconds",
        "HTTP request latency per route and status class."
    );
    describe_counter!(
        "tally_flusher_restarts_total",
        "Flusher tasks restarted after a panic (a bug), per group; the batch in flight is kept and applied exactly once."
    );
    describe_counter!(
        "tally_quarantined_deltas_total",
        "Counter-minute deltas the database refused deterministically (e.g. a total past the 64-bit range), kept in the quarantine table instead of counted; per group."
    );
    describe_counter!(
        "tally_schema_applied_total",
        "Schema applications to masters per group."
    );
    describe_gauge!(
        "tally_node_up",
        "1 when the last health probe of a server succeeded."
    );
    describe_gauge!(
        "tally_replica_lag_seconds",
        "Replica lag (Seconds_Behind_Master); -1 when unknown."
    );
    describe_histogram!(
        "tally_read_duration_seconds",
        "Read latency per route and serving role (master/replica)."
    );
    describe_counter!(
        "tally_read_fallbacks_total",
        "Eventual reads served by the master, by reason."
    );
    describe_counter!(
        "tally_retention_deleted_rows_total",
        "Rows deleted by retention per group and table."
    );
    describe_counter!(
        "tally_retention_errors_total",
        "Failed retention passes per group."
    );
    describe_gauge!(
        "tally_rollup_lag_seconds",
        "Seconds between now and the group's rollup watermark: minutes younger than this are read from minute rows; alert when it grows past an hour plus rollup.delay."
    );
    describe_counter!(
        "tally_rollup_hours_total",
        "Rollup steps committed per group (each rolls one hour of minute rows into hour and day rows, or skips empty hours)."
    );
    describe_counter!(
        "tally_rollup_errors_total",
        "Failed rollup steps per group (retried at the next rollup.interval)."
    );
    describe_counter!(
        "tally_topology_changes_total",
        "Topology changes applied, by source."
    );
    describe_counter!(
        "tally_promotions_total",
        "Replica promotions per group and mode (planned/emergency)."
    );
    describe_histogram!(
        "tally_promotion_duration_seconds",
        "Time from a promotion request to the new map."
    );
    describe_counter!(
        "tally_read_cache_lookups_total",
        "Eventual totals looked up in the read cache, by outcome (hit/miss); hit / (hit + miss) is the hit ratio."
    );
    describe_histogram!(
        "tally_read_cache_age_seconds",
        "Age of the cached totals served (since their read was sent): the staleness the cache adds, at most reads.cache.max_age."
    );
    describe_counter!(
        "tally_read_cache_forgotten_total",
        "Cached totals dropped because this proxy committed a batch touching their counters."
    );
    describe_histogram!(
        "tally_read_batch_keys",
        "Distinct keys asked by one coalesced read statement."
    );
    describe_counter!(
        "tally_read_coalesced_total",
        "Eventual point reads answered by a statement another read had started (coalesced)."
    );
    describe_counter!(
        "tally_reshard_rows_copied_total",
        "Rows (all tiers) copied to their new group by online reshards."
    );
    describe_counter!(
        "tally_wal_bytes_written_total",
        "Bytes written to the write-ahead log (durability: wal)."
    );
    describe_histogram!(
        "tally_wal_fsync_seconds",
        "Time of one write-ahead-log group write + fdatasync; every buffered write waits for one."
    );
    describe_counter!(
        "tally_wal_segments_deleted_total",
        "Write-ahead-log segments deleted because every event in them is committed."
    );
    describe_counter!(
        "tally_wal_failures_total",
        "Write-ahead-log write or fsync failures; after one, writes are refused with 503 wal_failed until restart."
    );
    describe_counter!(
        "tally_wal_replayed_entries_total",
        "(counter, minute) entries applied by replaying an earlier life's write-ahead log at start."
    );
    describe_counter!(
        "tally_wal_replay_stuck_total",
        "Replays that found records of a group no longer in the topology (kept on disk, see the log)."
    );
    describe_histogram!(
        "tally_write_pause_seconds",
        "How long a promotion held the group's flushes."
    );
    describe_gauge!(
        "tally_wal_failed",
        "1 once the write-ahead log failed: the proxy refuses writes (503 wal_failed) until it is restarted; 0 otherwise (always 0 without a WAL)."
    );
    describe_gauge!(
        "tally_config_max_pending_rows",
        "buffer.max_pending_rows: the per-group bound of tally_pending_rows; writes to a group at it get 503 overloaded."
    );
    describe_gauge!(
        "tally_config_commit_timeout_seconds",
        "buffer.commit_timeout: how long an ack=committed write waits before 504 commit_timeout."
    );
    describe_gauge!(
        "tally_config_max_replica_lag_seconds",
        "reads.max_replica_lag: replicas further behind serve no eventual reads."
    );
    describe_gauge!(
        "tally_config_wal_max_bytes",
        "wal.max_bytes: bytes of write-ahead-log segments not yet deletable at which writes get 503 overloaded (only with durability: wal; 0 without a log)."
    );
    describe_gauge!(
        "tally_config_max_connections",
        "connections.max_per_listener: the bound of tally_connections_open, per listener."
    );
    describe_gauge!(
        "tally_config_max_body_bytes_in_flight",
        "connections.max_body_bytes_in_flight: the bound of tally_request_body_bytes, per listener."
    );
    describe_gauge!(
        "process_cpu_seconds_total",
        "User and system CPU time of the proxy process, in seconds."
    );
    describe_gauge!(
        "process_resident_memory_bytes",
        "Resident memory of the proxy process, in bytes."
    );
    describe_gauge!(
        "process_virtual_memory_bytes",
        "Virtual memory of the proxy process, in bytes."
    );
    describe_gauge!(
        "process_open_fds",
        "File descriptors the proxy process has open."
    );
    describe_gauge!(
        "process_max_fds",
        "The proxy process's limit of open file descriptors (RLIMIT_NOFILE)."
    );
    describe_gauge!(
        "process_start_time_seconds",
        "Start time of the proxy process, in seconds since the Unix epoch."
    );
}

pub fn wal_synced(bytes: usize, took: Duration) {
    counter!("tally_wal_bytes_written_total").increment(bytes as u64);
    histogram!("tally_wal_fsync_seconds").record(took.as_secs_f64());
}

pub fn wal_segment_deleted() {
    counter!("tally_wal_segments_deleted_total").increment(1);
}

pub fn wal_failed() {
    counter!("tally_wal_failures_total").increment(1);
    WAL_FAILED.store(true, Ordering::Relaxed);
    gauge!("tally_wal_failed").set(1.0);
}

pub fn wal_replayed(entries: usize) {
    counter!("tally_wal_replayed_entries_total").increment(entries as u64);
}

pub fn wal_replay_stuck() {
    counter!("tally_wal_replay_stuck_total").increment(1);
}

pub fn reshard_rows_copied(rows: u64) {
    counter!("tally_reshard_rows_copied_total").increment(rows);
}

pub fn topology_version(version: u64) {
    gauge!("tally_topology_version").set(version as f64);
}

pub fn store_fenced(fenced: bool) {
    STORE_FENCED.store(fenced, Ordering::Relaxed);
    gauge!("tally_store_fenced").set(if fenced { 1.0 } else { 0.0 });
}

/// With a store: the newest heartbeat the store recorded was sent at `at`
/// (`None`: none yet).
pub fn store_renewed(at: Option<Instant>) {
    let started = *STARTED.get_or_init(Instant::now);
    let n = at.map_or(0, |at| {
        at.saturating_duration_since(started).as_nanos() as u64 + 1
    });
    STORE_RENEWED.store(n.min(NO_STORE - 1), Ordering::Relaxed);
    gauge!("tally_store_contact_age_seconds").set(store_contact_age().as_secs_f64());
}

fn store_contact_age() -> Duration {
    let Some(started) = STARTED.get() else {
        return Duration::ZERO;
    };
    match STORE_RENEWED.load(Ordering::Relaxed) {
        NO_STORE => Duration::ZERO,
        0 => started.elapsed(),
        n => (*started + Duration::from_nanos(n - 1)).elapsed(),
    }
}

pub fn ready(is_ready: bool) {
    gauge!("tally_ready").set(if is_ready { 1.0 } else { 0.0 });
}

/// A connection accepted by `listener`, open until the returned value is
/// dropped.
pub fn connection_accepted(listener: &'static str) -> OpenConnection {
    counter!("tally_connections_accepted_total", "listener" => listener).increment(1);
    let l = listener_state(listener);
    let open = l.open.fetch_add(1, Ordering::Relaxed) + 1;
    gauge!("tally_connections_open", "listener" => listener).set(open as f64);
    OpenConnection(l)
}

pub fn connection_refused(listener: &'static str) {
    counter!("tally_connections_refused_total", "listener" => listener).increment(1);
}

pub fn connection_timed_out(listener: &'static str, reason: &'static str) {
    counter!("tally_connections_timed_out_total", "listener" => listener, "reason" => reason)
        .increment(1);
}

/// `bytes` more of request bodies held by the listener's requests.
pub fn body_bytes_held(listener: &'static str, bytes: usize) {
    let l = listener_state(listener);
    let held = l.body_bytes.fetch_add(bytes as i64, Ordering::Relaxed) + bytes as i64;
    gauge!("tally_request_body_bytes", "listener" => listener).set(held as f64);
}

/// `bytes` of request bodies given back (their requests were answered).
pub fn body_bytes_released(listener: &'static str, bytes: usize) {
    let l = listener_state(listener);
    let held = l.body_bytes.fetch_sub(bytes as i64, Ordering::Relaxed) - bytes as i64;
    gauge!("tally_request_body_bytes", "listener" => listener).set(held as f64);
}

pub fn body_refused(listener: &'static str) {
    counter!("tally_request_bodies_refused_total", "listener" => listener).increment(1);
}

pub fn events_accepted(n: usize) {
    counter!("tally_events_accepted_total").increment(n as u64);
}

pub fn events_rejected(reason: &'static str, n: usize) {
    counter!("tally_events_rejected_total", "reason" => reason).increment(n as u64);
}

/// 1 while a COMMIT of the group's batch got no answer and no attempt
/// since has found out whether it was applied (strong reads of the group
/// answer 503 meanwhile), else 0.
pub fn commit_in_doubt(group: &str, in_doubt: bool) {
    group_series(group);
    gauge!("tally_flush_commit_in_doubt", "group" => group.to_owned())
        .set(f64::from(u8::from(in_doubt)));
}

pub fn pending_rows(group: &str, rows: usize) {
    group_series(group);
    gauge!("tally_pending_rows", "group" => group.to_owned()).set(rows as f64);
}

pub fn flush_committed(group: &str, rows: usize, took: Duration) {
    counter!("tally_flush_batches_total", "group" => group.to_owned()).increment(1);
    counter!("tally_flush_rows_total", "group" => group.to_owned()).increment(rows as u64);
    histogram!("tally_flush_duration_seconds", "group" => group.to_owned())
        .record(took.as_secs_f64());
}

pub fn flush_failed(group: &str) {
    counter!("tally_flush_errors_total", "group" => group.to_owned()).increment(1);
}

/// Events with an id discarded as already counted (`stage`: `buffer` or
/// `store`).
pub fn duplicate_events(group: &str, stage: &'static str, n: usize) {
    group_series(group);
    counter!("tally_duplicate_events_total", "group" => group.to_owned(), "stage" => stage)
        .increment(n as u64);
}

pub fn flush_duplicate(group: &str) {
    counter!("tally_flush_duplicates_total", "group" => group.to_owned()).increment(1);
}

/// Deltas written to the quarantine table; called with 0 when a group's
/// flusher starts, so the series exists (and alerts can use `increase`)
/// before the first one.
pub fn quarantined(group: &str, deltas: usize) {
    group_series(group);
    counter!("tally_quarantined_deltas_total", "group" => group.to_owned())
        .increment(deltas as u64);
}

/// Flusher restarts after a panic; called with 0 when the flusher starts.
pub fn flusher_restarted(group: &str, n: u64) {
    group_series(group);
    counter!("tally_flusher_restarts_total", "group" => group.to_owned()).increment(n);
}

pub fn schema_applied(group: &str) {
    group_series(group);
    counter!("tally_schema_applied_total", "group" => group.to_owned()).increment(1);
}

pub fn request(route: &str, status: u16, took: Duration) {
    let class = match status {
        200..=299 => 0,
        400..=499 => 1,
        _ => 2,
    };
    // Before the recorder is installed a handle would be a no-op forever.
    if HANDLE.get().is_none() {
        return histogram!("tally_http_request_duration_seconds", "route" => route.to_owned(), "status" => STATUS_CLASSES[class]).record(took.as_secs_f64());
    }
    if let Some(h) = REQUEST_HISTOGRAMS.read().get(route).map(|c| &c[class]) {
        return h.record(took.as_secs_f64());
    }
    request_series(route)[class].record(took.as_secs_f64());
}

/// Registers `route`'s histograms of every status class (so the first 5xx
/// of a route is counted by `rate` too) and returns them.
fn request_series(route: &str) -> [Histogram; 3] {
    let mut all = REQUEST_HISTOGRAMS.write();
    all.entry(route.into())
        .or_insert_with(|| {
            STATUS_CLASSES.map(|class| histogram!("tally_http_request_duration_seconds", "route" => route.to_owned(), "status" => class))
        })
        .clone()
}

const STATUS_CLASSES: [&str; 3] = ["2xx", "4xx", "5xx"];

/// `tally_http_request_duration_seconds` handles per route (the router's
/// patterns and `unmatched`, a fixed set) and status class. Resolving a
/// handle through the registry allocates the labels and hashes them, once
/// per request on the hottest path; histograms never expire (only gauges
/// do, see [`install`]), so a handle stays valid.
static REQUEST_HISTOGRAMS: LazyLock<RwLock<RouteHistograms>> = LazyLock::new(Default::default);

type RouteHistograms = HashMap<Box<str>, [Histogram; 3]>;

/// Logs to stderr: readable text by default, one JSON object per line with
/// `json`. `RUST_LOG` filters (default `info`).
pub fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

pub fn node_health(group: &str, role: &'static str, addr: &str, up: bool, lag: Option<u64>) {
    gauge!("tally_node_up", "group" => group.to_owned(), "role" => role, "addr" => addr.to_owned())
        .set(if up { 1.0 } else { 0.0 });
    if role == "replica" {
        // -1 when the lag is unknown (replication stopped or server down).
        let v = lag.map_or(-1.0, |l| l as f64);
        gauge!("tally_replica_lag_seconds", "group" => group.to_owned(), "addr" => addr.to_owned())
            .set(v);
    }
}

pub fn read(route: &'static str, role: &'static str, took: Duration) {
    histogram!("tally_read_duration_seconds", "route" => route, "role" => role)
        .record(took.as_secs_f64());
}

/// An `eventual` read served by the master: `no_replica` (none eligible) or
/// `replica_error` (the replica failed and the read was retried).
pub fn read_fallback(group: &str, reason: &'static str) {
    counter!("tally_read_fallbacks_total", "group" => group.to_owned(), "reason" => reason)
        .increment(1);
}

/// Handles of the read-path series touched on every eventual read,
/// resolved once (a labelled lookup per read would cost more than the
/// cache hit it counts).
struct ReadSeries {
    hit: metrics::Counter,
    miss: metrics::Counter,
    age: Histogram,
    forgotten: metrics::Counter,
    batch_keys: Histogram,
    shared: metrics::Counter,
}

static READ_SERIES: LazyLock<ReadSeries> = LazyLock::new(|| ReadSeries {
    hit: counter!("tally_read_cache_lookups_total", "outcome" => "hit"),
    miss: counter!("tally_read_cache_lookups_total", "outcome" => "miss"),
    age: histogram!("tally_read_cache_age_seconds"),
    forgotten: counter!("tally_read_cache_forgotten_total"),
    batch_keys: histogram!("tally_read_batch_keys"),
    shared: counter!("tally_read_coalesced_total"),
});

/// An eventual total answered from the read cache, `age` after its read
/// was sent (the staleness the cache added).
pub fn read_cache_hit(age: Duration) {
    READ_SERIES.hit.increment(1);
    READ_SERIES.age.record(age.as_secs_f64());
}

/// An eventual total the read cache did not hold (or held too old).
pub fn read_cache_miss() {
    READ_SERIES.miss.increment(1);
}

/// Cached totals dropped because this proxy committed to their counters.
pub fn read_cache_forgotten(n: usize) {
    READ_SERIES.forgotten.increment(n as u64);
}

/// One coalesced read statement: the reads it answered and the distinct
/// keys it asked.
pub fn read_batch(reads: usize, keys: usize) {
    READ_SERIES.batch_keys.record(keys as f64);
    READ_SERIES.shared.increment(reads.saturating_sub(1) as u64);
}

pub fn retention_deleted(group: &str, table: &'static str, rows: u64) {
    counter!("tally_retention_deleted_rows_total", "group" => group.to_owned(), "table" => table)
        .increment(rows);
}

pub fn retention_failed(group: &str) {
    counter!("tally_retention_errors_total", "group" => group.to_owned()).increment(1);
}

/// The group's rollup watermark as last read: its lag behind `now`.
pub fn rollup_watermark(group: &str, watermark: i64, now: i64) {
    gauge!("tally_rollup_lag_seconds", "group" => group.to_owned())
        .set(now.saturating_sub(watermark).max(0) as f64);
}

pub fn rollup_stepped(group: &str) {
    counter!("tally_rollup_hours_total", "group" => group.to_owned()).increment(1);
}

pub fn rollup_failed(group: &str) {
    counter!("tally_rollup_errors_total", "group" => group.to_owned()).increment(1);
}

pub fn topology_change(source: &'static str) {
    counter!("tally_topology_changes_total", "source" => source).increment(1);
}

pub fn promotion(group: &str, mode: &'static str, took: Duration, write_pause: Duration) {
    counter!("tally_promotions_total", "group" => group.to_owned(), "mode" => mode).increment(1);
    histogram!("tally_promotion_duration_seconds", "group" => group.to_owned())
        .record(took.as_secs_f64());
    histogram!("tally_write_pause_seconds", "group" => group.to_owned())
        .record(write_pause.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn proc_files_parse() {
        // A command name with spaces and a parenthesis.
        let stat = "4242 (tally (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 12345 100000000 5000 18446744073709551615";
        let p = parse_proc_stat(stat, Some(1_700_000_000.0)).expect("parsed");
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.start_time_seconds, Some(1_700_000_123.45));
        assert_eq!(
            parse_proc_stat(stat, None).unwrap().start_time_seconds,
            None
        );
        let status = "Name:\ttally\nVmSize:\t  200 kB\nVmRSS:\t    12 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(12.0));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \nMax processes             127431               127431               processes \nMax open files            1024                 524288               files     \n";
        assert_eq!(max_open_files(limits), Some(1024.0));
    }

    /// Every series an alert or panel starts from is there before any
    /// event: process metrics, bounds, listeners, groups.
    #[test]
    fn a_scrape_without_traffic_has_the_known_series() {
        let handle = install();
        configured(Bounds {
            max_pending_rows: 7,
            commit_timeout: Duration::from_secs(3),
            max_replica_lag: Duration::from_secs(5),
            wal_max_bytes: Some(1 << 20),
        });
        listener("unit", 11, 22);
        let open = connection_accepted("unit");
        let text = render(&handle, 1, true, &[("unit-group".into(), 0)]);
        for line in [
            "tally_config_max_pending_rows 7",
            "tally_config_commit_timeout_seconds 3",
            "tally_config_wal_max_bytes 1048576",
            "tally_config_max_connections{listener=\"unit\"} 11",
            "tally_config_max_body_bytes_in_flight{listener=\"unit\"} 22",
            "tally_connections_open{listener=\"unit\"} 1",
            "tally_connections_refused_total{listener=\"unit\"} 0",
            "tally_connections_timed_out_total{listener=\"unit\",reason=\"idle\"} 0",
            "tally_wal_failures_total 0",
            "tally_flush_errors_total{group=\"unit-group\"} 0",
            "tally_promotions_total{group=\"unit-group\",mode=\"emergency\"} 0",
            "tally_write_pause_seconds_count{group=\"unit-group\"} 0",
            "tally_events_rejected_total{reason=\"overloaded\"} 0",
            "tally_http_request_duration_seconds_count{route=\"/v1/events\",status=\"5xx\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        #[cfg(target_os = "linux")]
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name} "))),
                "no {name} in\n{text}"
            );
        }
        drop(open);
        let text = render(&handle, 1, true, &[]);
        assert!(
            text.contains("tally_connections_open{listener=\"unit\"} 0"),
            "{text}"
        );
    }
}
