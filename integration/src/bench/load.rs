//! The load engine: many keep-alive connections, closed loop or paced to a
//! rate, bounded by time or by request count, with per-worker HDR
//! histograms and a progress line every second.
//!
//! Paced runs measure latency from the *scheduled* send time, so a stalled
//! server cannot hide its stall by slowing the generator down (coordinated
//! omission).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fastrand::Rng;
use hdrhistogram::Histogram;
use tokio::task::JoinHandle;
use tokio::time::{interval, sleep, sleep_until};

use super::http::{Conn, Req};

/// What a successful (200) request adds to the expected counts.
#[derive(Clone, Copy, Debug)]
pub enum Credit {
    None,
    /// One event of delta 1 on key `i`.
    Key(u32),
    /// Every event of pre-built body `i`.
    Body(u32),
}

/// A request generator. Implementations are shared by every worker.
pub trait Workload: Send + Sync + 'static {
    /// Events carried by one request of this credit (0 for reads).
    fn events(&self, credit: Credit) -> u64;
    /// The next request and what it credits when answered 200.
    fn next(&self, rng: &mut fastrand::Rng) -> (Req, Credit);
    /// Sizes of the credit tables (keys, bodies).
    fn credit_sizes(&self) -> (usize, usize);
}

/// How to run a workload.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub label: String,
    pub addr: SocketAddr,
    pub conns: usize,
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
    /// Requests per second over all connections; `None`: closed loop.
    pub rate: Option<f64>,
    /// Admin base URL whose `/metrics` gives the pending rows for the
    /// progress line.
    pub metrics_url: Option<String>,
    pub quiet: bool,
}

/// The outcome of one run.
pub struct LoadResult {
    pub label: String,
    pub elapsed: Duration,
    pub ok: u64,
    pub events: u64,
    /// Non-200 answers by status.
    pub statuses: BTreeMap<u16, u64>,
    /// Transport errors: the request may or may not have been applied.
    pub transport_errors: u64,
    pub first_error: Option<String>,
    pub hist: Histogram<u64>,
    pub key_credits: Vec<u64>,
    pub body_credits: Vec<u64>,
    /// Highest pending-row gauge seen while running, and the last one.
    pub pending_max: f64,
    pub pending_last: f64,
}

impl LoadResult {
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
    pub fn eps(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
    /// Latency quantile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
    pub fn errors(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.transport_errors
    }
    pub fn summary(&self) -> String {
        format!(
            "{}: {:.0} req/s, {:.0} events/s, {} ok, {} errors {:?}{} | latency ms p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3} | pending max {:.0} last {:.0}",
            self.label,
            self.rps(),
            self.eps(),
            self.ok,
            self.errors(),
            self.statuses,
            self.first_error
                .as_deref()
                .map(|e| format!(" first transport error: {e}"))
                .unwrap_or_default(),
            self.ms(0.5),
            self.ms(0.9),
            self.ms(0.99),
            self.ms(0.999),
            self.hist.max() as f64 / 1000.0,
            self.pending_max,
            self.pending_last,
        )
    }
}

/// One worker's counts; the run's total is the same struct, merged.
struct Tally {
    hist: Histogram<u64>,
    ok: u64,
    events: u64,
    statuses: BTreeMap<u16, u64>,
    transport_errors: u64,
    first_error: Option<String>,
    keys: Vec<u64>,
    bodies: Vec<u64>,
}

impl Tally {
    fn new(sizes: CreditSizes) -> Tally {
        Tally {
            hist: histogram(),
            ok: 0,
            events: 0,
            statuses: BTreeMap::new(),
            transport_errors: 0,
            first_error: None,
            keys: vec![0; sizes.keys],
            bodies: vec![0; sizes.bodies],
        }
    }

    /// A 200: its latency (from the scheduled send), its events, its credit.
    fn record_ok(&mut self, latency: Duration, events: u64, credit: Credit) {
        let us = latency.as_micros() as u64;
        self.hist.saturating_record(us.max(1));
        self.ok += 1;
        self.events += events;
        match credit {
            Credit::None => {}
            Credit::Key(k) => self.keys[k as usize] += 1,
            Credit::Body(b) => self.bodies[b as usize] += 1,
        }
    }

    /// A non-200 answer; the first one's body is kept for the summary.
    fn record_status(&mut self, status: u16, body: &[u8]) {
        *self.statuses.entry(status).or_default() += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            ));
        }
    }

    /// A connect or send failure: the request may or may not have been
    /// applied, so it is counted apart from HTTP errors.
    fn record_transport_error(&mut self, e: String) {
        self.transport_errors += 1;
        self.first_error.get_or_insert(e);
    }

    /// Adds a finished worker's counts; the first error of the first
    /// worker that had one is the one reported.
    fn merge(&mut self, w: Tally) {
        self.hist.add(&w.hist).expect("same histogram bounds");
        self.ok += w.ok;
        self.events += w.events;
        self.transport_errors += w.transport_errors;
        if self.first_error.is_none() {
            self.first_error = w.first_error;
        }
        for (s, n) in w.statuses {
            *self.statuses.entry(s).or_default() += n;
        }
        for (a, b) in self.keys.iter_mut().zip(&w.keys) {
            *a += b;
        }
        for (a, b) in self.bodies.iter_mut().zip(&w.bodies) {
            *a += b;
        }
    }

    /// The run's outcome: the merged counts with the run's timing and the
    /// pending-row gauge.
    fn into_result(self, label: String, elapsed: Duration, pending: Pending) -> LoadResult {
        LoadResult {
            label,
            elapsed,
            ok: self.ok,
            events: self.events,
            statuses: self.statuses,
            transport_errors: self.transport_errors,
            first_error: self.first_error,
            hist: self.hist,
            key_credits: self.keys,
            body_credits: self.bodies,
            pending_max: pending.max,
            pending_last: pending.last,
        }
    }
}

fn histogram() -> Histogram<u64> {
    // Microseconds from 1 µs to 10 minutes, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// Sizes of a workload's credit tables.
#[derive(Clone, Copy, Debug)]
struct CreditSizes {
    keys: usize,
    bodies: usize,
}

/// What every worker needs to know about the run (copied into each).
#[derive(Clone, Copy, Debug)]
struct Plan {
    addr: SocketAddr,
    conns: usize,
    /// Stop handing out requests after this many (over all workers).
    requests: Option<u64>,
    deadline: Option<Instant>,
    /// Per worker: time between two scheduled sends; `None`: closed loop.
    interval: Option<Duration>,
    sizes: CreditSizes,
}

impl Plan {
    fn new(spec: &LoadSpec, sizes: CreditSizes, started: Instant) -> Plan {
        let conns = spec.conns.max(1);
        Plan {
            addr: spec.addr,
            conns,
            requests: spec.requests,
            deadline: spec.duration.map(|d| started + d),
            // The rate is over all connections; each worker paces its share.
            interval: spec.rate.map(|r| Duration::from_secs_f64(conns as f64 / r)),
            sizes,
        }
    }
}

/// The counters shared by the workers and the progress line.
///
/// Separate `Arc`s rather than one `Arc` of a struct: every worker bumps
/// these on every request, and one allocation would pack them all onto one
/// cache line.
#[derive(Clone, Default)]
struct Shared {
    /// Requests handed out so far (the `--requests` bound).
    tickets: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
    done_events: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// The pending-row gauge as the progress line saw it.
#[derive(Clone, Copy, Debug, Default)]
struct Pending {
    max: f64,
    last: f64,
}

/// Completed requests and events at one progress tick.
#[derive(Clone, Copy, Debug)]
struct Sample {
    requests: u64,
    events: u64,
    at: Instant,
}

/// Runs `workload` as `spec` says.
pub async fn run(spec: &LoadSpec, workload: Arc<dyn Workload>) -> LoadResult {
    let (keys, bodies) = workload.credit_sizes();
    let started = Instant::now();
    let plan = Plan::new(spec, CreditSizes { keys, bodies }, started);
    let shared = Shared::default();
    let workers = spawn_workers(plan, &workload, &shared);
    let progress = spawn_progress(spec, shared.clone(), started);
    let total = join_workers(workers, plan.sizes).await;
    let elapsed = started.elapsed();
    shared.stop.store(true, Ordering::Relaxed);
    let pending = progress.await.unwrap_or_default();
    total.into_result(spec.label.clone(), elapsed, pending)
}

/// A worker's send schedule. Latency is measured from the *scheduled*
/// time, so a stalled server cannot hide its stall by holding the
/// generator back (coordinated omission).
struct Pacer {
    /// `None`: closed loop, every request is scheduled when it is sent.
    interval: Option<Duration>,
    next_at: Instant,
}

impl Pacer {
    fn new(plan: &Plan, w: usize) -> Pacer {
        // Spread paced workers over one interval.
        let offset = plan
            .interval
            .map_or(Duration::ZERO, |i| i.mul_f64(w as f64 / plan.conns as f64));
        Pacer {
            interval: plan.interval,
            next_at: Instant::now() + offset,
        }
    }

    /// Waits for this worker's next slot, if it is still ahead, and
    /// returns the time the request was scheduled for.
    async fn wait_turn(&mut self) -> Instant {
        match self.interval {
            Some(i) => {
                let at = self.next_at;
                self.next_at += i;
                if at > Instant::now() {
                    sleep_until(at.into()).await;
                }
                at
            }
            None => Instant::now(),
        }
    }
}

/// One task per connection, so that the connections send concurrently.
fn spawn_workers(
    plan: Plan,
    workload: &Arc<dyn Workload>,
    shared: &Shared,
) -> Vec<JoinHandle<Tally>> {
    (0..plan.conns)
        .map(|w| tokio::spawn(drive(w, plan, workload.clone(), shared.clone())))
        .collect()
}

/// Worker `w`: sends requests on one keep-alive connection until the
/// deadline, the request budget or the stop flag, and tallies the answers.
async fn drive(w: usize, plan: Plan, workload: Arc<dyn Workload>, shared: Shared) -> Tally {
    let mut me = Tally::new(plan.sizes);
    let mut rng = Rng::with_seed(0x7a11 + w as u64 * 7919 + fastrand::u64(..));
    let mut conn: Option<Conn> = None;
    let mut pacer = Pacer::new(&plan, w);
    loop {
        if shared.stop.load(Ordering::Relaxed) || plan.deadline.is_some_and(|d| Instant::now() >= d)
        {
            break;
        }
        if let Some(max) = plan.requests
            && shared.tickets.fetch_add(1, Ordering::Relaxed) >= max
        {
            break;
        }
        let (req, credit) = workload.next(&mut rng);
        let scheduled = pacer.wait_turn().await;
        if conn.is_none() {
            match Conn::connect(plan.addr).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    me.record_transport_error(e);
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                    sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected");
        match c.send(&req).await {
            Ok((200, _)) => {
                // Taken first, as the answer is in: nothing else belongs
                // in the latency.
                let latency = scheduled.elapsed();
                let ev = workload.events(credit);
                me.record_ok(latency, ev, credit);
                shared.done.fetch_add(1, Ordering::Relaxed);
                shared.done_events.fetch_add(ev, Ordering::Relaxed);
            }
            Ok((status, body)) => {
                me.record_status(status, &body);
                shared.failed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                me.record_transport_error(e);
                shared.failed.fetch_add(1, Ordering::Relaxed);
                // The connection's state is unknown after a transport
                // error; the next request opens a new one.
                conn = None;
            }
        }
    }
    me
}

/// The progress line every second (rates since the last line, errors so
/// far, the pending-row gauge when the admin URL is known); returns the
/// gauge's highest and last values for the result.
fn spawn_progress(spec: &LoadSpec, shared: Shared, started: Instant) -> JoinHandle<Pending> {
    let label = spec.label.clone();
    let metrics_url = spec.metrics_url.clone();
    let quiet = spec.quiet;
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut last = Sample {
            requests: 0,
            events: 0,
            at: Instant::now(),
        };
        let mut pending = Pending::default();
        let mut tick = interval(Duration::from_secs(1));
        tick.tick().await;
        while !shared.stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let now = Sample {
                requests: shared.done.load(Ordering::Relaxed),
                events: shared.done_events.load(Ordering::Relaxed),
                at: Instant::now(),
            };
            let dt = now.at.duration_since(last.at).as_secs_f64();
            let pending_text = match &metrics_url {
                Some(url) => poll_pending(&client, url, &mut pending).await,
                None => String::new(),
            };
            if !quiet {
                eprintln!(
                    "  [{label}] t={:>3.0}s {:>9.0} req/s {:>11.0} events/s errors={}{pending_text}",
                    now.at.duration_since(started).as_secs_f64(),
                    (now.requests - last.requests) as f64 / dt,
                    (now.events - last.events) as f64 / dt,
                    shared.failed.load(Ordering::Relaxed),
                );
            }
            last = now;
        }
        pending
    })
}

/// Reads the pending-row gauge into `pending`; its part of the progress
/// line (empty when the metrics page could not be read).
async fn poll_pending(client: &reqwest::Client, url: &str, pending: &mut Pending) -> String {
    match metric_sum(client, url, "tally_pending_rows").await {
        Some(p) => {
            pending.max = pending.max.max(p);
            pending.last = p;
            format!(" pending_rows={p:.0}")
        }
        None => String::new(),
    }
}

/// Waits for every worker and merges their tallies into the run's total.
async fn join_workers(workers: Vec<JoinHandle<Tally>>, sizes: CreditSizes) -> Tally {
    let mut total = Tally::new(sizes);
    for t in workers {
        total.merge(t.await.expect("load worker panicked"));
    }
    total
}

/// Sum of every series of one metric in a Prometheus text page.
pub async fn metric_sum(client: &reqwest::Client, admin_url: &str, name: &str) -> Option<f64> {
    let text = client
        .get(format!("{admin_url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(sum_series(&text, name, None))
}

/// Sum of the series of `name` (optionally only those whose labels contain
/// `label`, e.g. `group="g0"`).
pub fn sum_series(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            if let Some(lbl) = label
                && !rest.contains(lbl)
            {
                return None;
            }
            l.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .sum()
}
