//! Every metric the proxy exports, named and described in one place.
//!
//! Call sites use the small functions here instead of `metrics` macros with
//! string names, so a dashboard can be checked against this file alone and a
//! typo cannot create a second, silent series. The Prometheus recorder is
//! process-global (the `metrics` facade allows one), so several in-process
//! proxies in a test share it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, Instant};

use metrics::{
    Histogram, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use parking_lot::RwLock;

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
            handle
        })
        .clone()
}

/// Renders the text exposition, refreshing time-based gauges first.
/// Renders the text exposition. Gauges that change rarely are set again
/// here so the idle timeout never drops them.
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
    for (group, rows) in pending {
        pending_rows(group, *rows);
    }
    handle.render()
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
        "Pending (counter, minute) entries per group, not yet committed."
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

pub fn connection_accepted(listener: &'static str) {
    counter!("tally_connections_accepted_total", "listener" => listener).increment(1);
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
    gauge!("tally_request_body_bytes", "listener" => listener).increment(bytes as f64);
}

/// `bytes` of request bodies given back (their requests were answered).
pub fn body_bytes_released(listener: &'static str, bytes: usize) {
    gauge!("tally_request_body_bytes", "listener" => listener).decrement(bytes as f64);
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

pub fn pending_rows(group: &str, rows: usize) {
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

pub fn flush_duplicate(group: &str) {
    counter!("tally_flush_duplicates_total", "group" => group.to_owned()).increment(1);
}

/// Deltas written to the quarantine table; called with 0 when a group's
/// flusher starts, so the series exists (and alerts can use `increase`)
/// before the first one.
pub fn quarantined(group: &str, deltas: usize) {
    counter!("tally_quarantined_deltas_total", "group" => group.to_owned())
        .increment(deltas as u64);
}

/// Flusher restarts after a panic; called with 0 when the flusher starts.
pub fn flusher_restarted(group: &str, n: u64) {
    counter!("tally_flusher_restarts_total", "group" => group.to_owned()).increment(n);
}

pub fn schema_applied(group: &str) {
    counter!("tally_schema_applied_total", "group" => group.to_owned()).increment(1);
}

pub fn request(route: &str, status: u16, took: Duration) {
    let class = match status {
        200..=299 => 0,
        400..=499 => 1,
        _ => 2,
    };
    let resolve = || histogram!("tally_http_request_duration_seconds", "route" => route.to_owned(), "status" => STATUS_CLASSES[class]);
    // Before the recorder is installed a handle would be a no-op forever.
    if HANDLE.get().is_none() {
        return resolve().record(took.as_secs_f64());
    }
    if let Some(Some(h)) = REQUEST_HISTOGRAMS.read().get(route).map(|c| &c[class]) {
        return h.record(took.as_secs_f64());
    }
    let h = resolve();
    h.record(took.as_secs_f64());
    REQUEST_HISTOGRAMS.write().entry(route.into()).or_default()[class] = Some(h);
}

const STATUS_CLASSES: [&str; 3] = ["2xx", "4xx", "5xx"];

/// `tally_http_request_duration_seconds` handles per route (the router's
/// patterns and `unmatched`, a fixed set) and status class. Resolving a
/// handle through the registry allocates the labels and hashes them, once
/// per request on the hottest path; histograms never expire (only gauges
/// do, see [`install`]), so a handle stays valid.
static REQUEST_HISTOGRAMS: LazyLock<RwLock<RouteHistograms>> = LazyLock::new(Default::default);

type RouteHistograms = HashMap<Box<str>, [Option<Histogram>; 3]>;

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

pub fn retention_deleted(group: &str, table: &'static str, rows: u64) {
    counter!("tally_retention_deleted_rows_total", "group" => group.to_owned(), "table" => table)
        .increment(rows);
}

pub fn retention_failed(group: &str) {
    counter!("tally_retention_errors_total", "group" => group.to_owned()).increment(1);
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
