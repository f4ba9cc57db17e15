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

use hdrhistogram::Histogram;

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

struct Worker {
    hist: Histogram<u64>,
    ok: u64,
    events: u64,
    statuses: BTreeMap<u16, u64>,
    transport_errors: u64,
    first_error: Option<String>,
    keys: Vec<u64>,
    bodies: Vec<u64>,
}

fn histogram() -> Histogram<u64> {
    // Microseconds from 1 µs to 10 minutes, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// Runs `workload` as `spec` says.
pub async fn run(spec: &LoadSpec, workload: Arc<dyn Workload>) -> LoadResult {
    let (nkeys, nbodies) = workload.credit_sizes();
    let started = Instant::now();
    let deadline = spec.duration.map(|d| started + d);
    let tickets = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let done_events = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let conns = spec.conns.max(1);
    let interval = spec.rate.map(|r| Duration::from_secs_f64(conns as f64 / r));

    let mut tasks = Vec::new();
    for w in 0..conns {
        let workload = workload.clone();
        let (tickets, done, done_events, failed, stop) = (
            tickets.clone(),
            done.clone(),
            done_events.clone(),
            failed.clone(),
            stop.clone(),
        );
        let spec = spec.clone();
        tasks.push(tokio::spawn(async move {
            let mut me = Worker {
                hist: histogram(),
                ok: 0,
                events: 0,
                statuses: BTreeMap::new(),
                transport_errors: 0,
                first_error: None,
                keys: vec![0; nkeys],
                bodies: vec![0; nbodies],
            };
            let mut rng = fastrand::Rng::with_seed(0x7a11 + w as u64 * 7919 + fastrand::u64(..));
            let mut conn: Option<Conn> = None;
            // Spread paced workers over one interval.
            let mut next_at = Instant::now()
                + interval.map_or(Duration::ZERO, |i| i.mul_f64(w as f64 / conns as f64));
            loop {
                if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                if let Some(max) = spec.requests
                    && tickets.fetch_add(1, Ordering::Relaxed) >= max
                {
                    break;
                }
                let (req, credit) = workload.next(&mut rng);
                let scheduled = match interval {
                    Some(i) => {
                        let at = next_at;
                        next_at += i;
                        if at > Instant::now() {
                            tokio::time::sleep_until(at.into()).await;
                        }
                        at
                    }
                    None => Instant::now(),
                };
                if conn.is_none() {
                    match Conn::connect(spec.addr).await {
                        Ok(c) => conn = Some(c),
                        Err(e) => {
                            me.transport_errors += 1;
                            me.first_error.get_or_insert(e);
                            failed.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    }
                }
                let c = conn.as_mut().expect("connected");
                match c.send(&req).await {
                    Ok((200, _)) => {
                        let us = scheduled.elapsed().as_micros() as u64;
                        me.hist.saturating_record(us.max(1));
                        me.ok += 1;
                        let ev = workload.events(credit);
                        me.events += ev;
                        match credit {
                            Credit::None => {}
                            Credit::Key(k) => me.keys[k as usize] += 1,
                            Credit::Body(b) => me.bodies[b as usize] += 1,
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                        done_events.fetch_add(ev, Ordering::Relaxed);
                    }
                    Ok((status, body)) => {
                        *me.statuses.entry(status).or_default() += 1;
                        if me.first_error.is_none() {
                            me.first_error = Some(format!(
                                "HTTP {status}: {}",
                                String::from_utf8_lossy(&body[..body.len().min(300)])
                            ));
                        }
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        me.transport_errors += 1;
                        me.first_error.get_or_insert(e);
                        failed.fetch_add(1, Ordering::Relaxed);
                        conn = None;
                    }
                }
            }
            me
        }));
    }

    // Progress line every second.
    let progress = {
        let (done, done_events, failed, stop) = (
            done.clone(),
            done_events.clone(),
            failed.clone(),
            stop.clone(),
        );
        let label = spec.label.clone();
        let metrics_url = spec.metrics_url.clone();
        let quiet = spec.quiet;
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let (mut last_req, mut last_ev, mut last_t) = (0u64, 0u64, Instant::now());
            let (mut pending_max, mut pending_last) = (0f64, 0f64);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let (r, e, now) = (
                    done.load(Ordering::Relaxed),
                    done_events.load(Ordering::Relaxed),
                    Instant::now(),
                );
                let dt = now.duration_since(last_t).as_secs_f64();
                let pending = match &metrics_url {
                    Some(url) => match metric_sum(&client, url, "tally_pending_rows").await {
                        Some(p) => {
                            pending_max = pending_max.max(p);
                            pending_last = p;
                            format!(" pending_rows={p:.0}")
                        }
                        None => String::new(),
                    },
                    None => String::new(),
                };
                if !quiet {
                    eprintln!(
                        "  [{label}] t={:>3.0}s {:>9.0} req/s {:>11.0} events/s errors={}{pending}",
                        now.duration_since(started).as_secs_f64(),
                        (r - last_req) as f64 / dt,
                        (e - last_ev) as f64 / dt,
                        failed.load(Ordering::Relaxed),
                    );
                }
                (last_req, last_ev, last_t) = (r, e, now);
            }
            (pending_max, pending_last)
        })
    };

    let mut total = Worker {
        hist: histogram(),
        ok: 0,
        events: 0,
        statuses: BTreeMap::new(),
        transport_errors: 0,
        first_error: None,
        keys: vec![0; nkeys],
        bodies: vec![0; nbodies],
    };
    for t in tasks {
        let w = t.await.expect("load worker panicked");
        total.hist.add(&w.hist).expect("same histogram bounds");
        total.ok += w.ok;
        total.events += w.events;
        total.transport_errors += w.transport_errors;
        if total.first_error.is_none() {
            total.first_error = w.first_error;
        }
        for (s, n) in w.statuses {
            *total.statuses.entry(s).or_default() += n;
        }
        for (a, b) in total.keys.iter_mut().zip(&w.keys) {
            *a += b;
        }
        for (a, b) in total.bodies.iter_mut().zip(&w.bodies) {
            *a += b;
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (pending_max, pending_last) = progress.await.unwrap_or((0.0, 0.0));
    LoadResult {
        label: spec.label.clone(),
        elapsed,
        ok: total.ok,
        events: total.events,
        statuses: total.statuses,
        transport_errors: total.transport_errors,
        first_error: total.first_error,
        hist: total.hist,
        key_credits: total.keys,
        body_credits: total.bodies,
        pending_max,
        pending_last,
    }
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
