//! Idempotent increments (issue #22): batched and single-event ingest with
//! an id on every event versus without, side by side on the same proxy
//! and cluster, in events per second and in rows stored (counter tiers +
//! `applied_ids` + `applied_id_sets`).
//!
//! Every request carries a fresh `Idempotency-Key`, so each event gets
//! its own id (`<key>/<index>`) and none is a duplicate: the runs count
//! the same events and are read back exactly like `ingest-batch`.
//!
//! An id'd event cannot be folded into a per-minute sum, so the buffer of
//! an id'd load fills much faster than a plain one's: 503 `overloaded`
//! answers (backpressure, nothing applied) are counted, not failures, and
//! besides the accepted events/s of the run the scenario reports the
//! *sustained* rate: events accepted / (run + the final flush that commits
//! them).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::super::http::Req;
use super::super::load::LoadResult;
use super::super::load::{Credit, Workload};
use super::super::verify;
use super::super::workloads::IngestSingle;
use super::{Ctx, Obs};

/// Another workload whose every request carries a new `Idempotency-Key`.
struct WithIds {
    inner: Arc<dyn Workload>,
    prefix: String,
    next: AtomicU64,
}

impl Workload for WithIds {
    fn events(&self, credit: Credit) -> u64 {
        self.inner.events(credit)
    }
    fn next(&self, rng: &mut fastrand::Rng) -> (Req, Credit) {
        let (mut req, credit) = self.inner.next(rng);
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        req.idempotency_key = Some(format!("{}-{n}", self.prefix));
        (req, credit)
    }
    fn credit_sizes(&self) -> (usize, usize) {
        self.inner.credit_sizes()
    }
}

/// One measured run: its accepted rate, its sustained rate (including
/// the final flush), the 503s it got and the rows its namespace stored.
struct Measured {
    per_sec: f64,
    sustained: f64,
    overloaded: u64,
    rows: u64,
}

/// Only 503 `overloaded` (backpressure, nothing applied) is tolerated.
fn fail_on_errors_but_overload(r: &LoadResult) -> Result<(), String> {
    let other: u64 = r
        .statuses
        .iter()
        .filter(|(s, _)| **s != 503)
        .map(|(_, n)| n)
        .sum();
    if other + r.transport_errors == 0 {
        return Ok(());
    }
    Err(format!(
        "{}: {} failed requests ({:?}, {} transport errors); first: {}",
        r.label,
        other + r.transport_errors,
        r.statuses,
        r.transport_errors,
        r.first_error.as_deref().unwrap_or("?")
    ))
}

impl Ctx {
    pub(super) async fn ids(&mut self) -> Result<Obs, String> {
        if self.cluster.is_none() {
            return Err("ids needs the benchmark's own cluster (no --target)".into());
        }
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        let mut obs = Vec::new();
        let plain = self.batch_ids(false).await?;
        let ids = self.batch_ids(true).await?;
        obs.push(("ids ingest-batch events/s plain".into(), plain.per_sec));
        obs.push(("ids ingest-batch events/s ids".into(), ids.per_sec));
        obs.push((
            "ratio ids / plain ingest-batch events/s".into(),
            ratio(ids.per_sec, plain.per_sec),
        ));
        obs.push((
            "ids ingest-batch sustained events/s plain".into(),
            plain.sustained,
        ));
        obs.push((
            "ids ingest-batch sustained events/s ids".into(),
            ids.sustained,
        ));
        obs.push((
            "ratio ids / plain ingest-batch sustained events/s".into(),
            ratio(ids.sustained, plain.sustained),
        ));
        obs.push((
            "ids ingest-batch 503s plain".into(),
            plain.overloaded as f64,
        ));
        obs.push(("ids ingest-batch 503s ids".into(), ids.overloaded as f64));
        obs.push(("ids ingest-batch rows plain".into(), plain.rows as f64));
        obs.push(("ids ingest-batch rows ids".into(), ids.rows as f64));
        obs.push((
            "ratio ids / plain ingest-batch stored rows".into(),
            ratio(ids.rows as f64, plain.rows as f64),
        ));
        let plain = self.single_ids(false).await?;
        let ids = self.single_ids(true).await?;
        obs.push(("ids ingest-single req/s plain".into(), plain.per_sec));
        obs.push(("ids ingest-single req/s ids".into(), ids.per_sec));
        obs.push((
            "ratio ids / plain ingest-single req/s".into(),
            ratio(ids.per_sec, plain.per_sec),
        ));
        obs.push((
            "ratio ids / plain ingest-single sustained events/s".into(),
            ratio(ids.sustained, plain.sustained),
        ));
        obs.push(("ids ingest-single 503s ids".into(), ids.overloaded as f64));
        obs.push(("ids ingest-single rows plain".into(), plain.rows as f64));
        obs.push(("ids ingest-single rows ids".into(), ids.rows as f64));
        obs.push((
            "ratio ids / plain ingest-single stored rows".into(),
            ratio(ids.rows as f64, plain.rows as f64),
        ));
        Ok(obs)
    }

    fn with_ids(&self, w: Arc<dyn Workload>, ns: &str, ids: bool) -> Arc<dyn Workload> {
        if !ids {
            return w;
        }
        Arc::new(WithIds {
            inner: w,
            prefix: ns.to_owned(),
            next: AtomicU64::new(0),
        })
    }

    async fn batch_ids(&mut self, ids: bool) -> Result<Measured, String> {
        let mode = if ids { "ids" } else { "plain" };
        let (ns, w) = self.batch_workload(&format!("ids_batch_{mode}"));
        let label = format!(
            "ingest-batch {}x events, {mode}",
            self.args.events_per_request
        );
        let spec = self.spec(&label, self.ep.http, 8);
        let r = self
            .measure(&spec, self.with_ids(w.clone(), &ns, ids))
            .await;
        let expected = w.expected(self.keys.len(), &r.body_credits);
        let per_sec = r.eps();
        self.verified(&ns, &r, &expected, per_sec).await
    }

    async fn single_ids(&mut self, ids: bool) -> Result<Measured, String> {
        let mode = if ids { "ids" } else { "plain" };
        let ns = self.ns(&format!("ids_single_{mode}"));
        let w = Arc::new(IngestSingle {
            ns: ns.clone(),
            keys: self.keys.clone(),
        });
        let spec = self.spec(&format!("ingest-single, {mode}"), self.ep.http, 64);
        let r = self.measure(&spec, self.with_ids(w, &ns, ids)).await;
        let expected: Vec<i64> = r.key_credits.iter().map(|&c| c as i64).collect();
        let per_sec = r.rps();
        self.verified(&ns, &r, &expected, per_sec).await
    }

    /// The common end of a run: no error but backpressure, flush, every
    /// total exactly as sent, and the figures (`per_sec` is the run's own
    /// rate: events/s for batches, requests/s for single events).
    async fn verified(
        &mut self,
        ns: &str,
        r: &LoadResult,
        expected: &[i64],
        per_sec: f64,
    ) -> Result<Measured, String> {
        fail_on_errors_but_overload(r)?;
        let flushed = verify::flush(&self.client, &self.ep).await?;
        verify::check_totals(&self.client, &self.ep, ns, &self.keys, expected).await?;
        eprintln!(
            "  verified exact; final flush took {:.2}s",
            flushed.as_secs_f64()
        );
        Ok(Measured {
            per_sec,
            sustained: r.events as f64 / (r.elapsed + flushed).as_secs_f64(),
            overloaded: r.statuses.get(&503).copied().unwrap_or(0),
            rows: self.stored_rows(ns).await?,
        })
    }

    /// Rows of `ns` on every master: the four counter tiers, the id rows
    /// and the id sets.
    async fn stored_rows(&self, ns: &str) -> Result<u64, String> {
        let Some(cluster) = &self.cluster else {
            return Ok(0);
        };
        let db = cluster.database();
        let mut n = 0u64;
        // The id sets of the run: its `Idempotency-Key`s are `<ns>-<n>`
        // (set keys `<ns>-<n> 0x00 <block>`), so a key range finds them.
        let of_ns = format!("ns = '{ns}'");
        let of_run = format!("skey >= '{ns}-' AND skey < '{ns}.'");
        for g in cluster.groups() {
            for (table, filter) in [
                ("counter_minute", &of_ns),
                ("counter_hour", &of_ns),
                ("counter_day", &of_ns),
                ("counter_total", &of_ns),
                ("applied_ids", &of_ns),
                ("applied_id_sets", &of_run),
            ] {
                let rows = g
                    .master
                    .sql(&format!(
                        "SELECT COUNT(*) FROM `{db}`.{table} WHERE {filter}"
                    ))
                    .await
                    .map_err(|e| e.to_string())?;
                n += rows.first().and_then(|r| r.get::<u64, _>(0)).unwrap_or(0);
            }
        }
        Ok(n)
    }
}
