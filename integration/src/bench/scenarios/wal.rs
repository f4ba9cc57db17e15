//! Durable buffered acks: ingest throughput with `durability: wal` versus
//! the default in-memory buffering, side by side on the same cluster.
//!
//! The benchmark's own proxy (in-memory) and a second proxy child with a
//! write-ahead log in its temp directory (same disk as the databases) take
//! the same batched and then the same single-event load, one after the
//! other; every run is read back exactly like `ingest-batch`.

use std::sync::Arc;
use std::time::Duration;

use super::super::load::{self, LoadResult, Workload};
use super::super::target::{self, BufferSettings, ChildProc, Endpoint};
use super::super::verify;
use super::super::workloads::IngestSingle;
use super::{Ctx, Obs, fail_on_errors};

/// One measured ingest load against one proxy.
struct Measured {
    per_sec: f64,
    p99_ms: f64,
}

impl Ctx {
    pub(super) async fn wal(&mut self) -> Result<Obs, String> {
        let Some(topology) = self.topology_yaml.clone() else {
            return Err("wal needs the benchmark's own cluster (no --target)".into());
        };
        let p = ChildProc::proxy_with(
            &topology,
            &BufferSettings::default(),
            &self.ep.token,
            "durability: wal\nwal:\n  dir: wal\n",
        )
        .await?;
        let wal_ep = p.endpoint(&self.ep.token);
        target::wait_ready(&wal_ep, Duration::from_secs(60)).await?;
        let memory_ep = self.ep.clone();
        let mut obs = Vec::new();
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        let mem = self.batch_on(&memory_ep, None, "memory").await?;
        let wal = self.batch_on(&wal_ep, Some(&p), "wal").await?;
        obs.push(("wal ingest-batch events/s memory".into(), mem.per_sec));
        obs.push(("wal ingest-batch events/s wal".into(), wal.per_sec));
        obs.push((
            "ratio wal / memory ingest-batch".into(),
            ratio(wal.per_sec, mem.per_sec),
        ));
        obs.push(("wal ingest-batch p99 ms memory".into(), mem.p99_ms));
        obs.push(("wal ingest-batch p99 ms wal".into(), wal.p99_ms));
        let mem = self.single_on(&memory_ep, None, "memory").await?;
        let wal = self.single_on(&wal_ep, Some(&p), "wal").await?;
        obs.push(("wal ingest-single req/s memory".into(), mem.per_sec));
        obs.push(("wal ingest-single req/s wal".into(), wal.per_sec));
        obs.push((
            "ratio wal / memory ingest-single".into(),
            ratio(wal.per_sec, mem.per_sec),
        ));
        obs.push(("wal ingest-single p99 ms memory".into(), mem.p99_ms));
        obs.push(("wal ingest-single p99 ms wal".into(), wal.p99_ms));
        p.stop(Duration::from_secs(120)).await;
        Ok(obs)
    }

    /// Runs a load against `ep`; `child` is the WAL proxy (the in-memory
    /// one is the context's own, whose CPU `measure` prints).
    async fn run_on(
        &mut self,
        ep: &Endpoint,
        child: Option<&ChildProc>,
        label: &str,
        conns: usize,
        w: Arc<dyn Workload>,
    ) -> LoadResult {
        let mut spec = self.spec(label, ep.http, conns);
        spec.metrics_url = Some(ep.admin_url.clone());
        let fsyncs = || async {
            let sum = load::metric_sum(&self.client, &ep.admin_url, "tally_wal_fsync_seconds_sum");
            let count =
                load::metric_sum(&self.client, &ep.admin_url, "tally_wal_fsync_seconds_count");
            (sum.await.unwrap_or(0.0), count.await.unwrap_or(0.0))
        };
        let (before, (sum0, n0)) = (child.and_then(ChildProc::cpu_seconds), fsyncs().await);
        let r = self.measure(&spec, w).await;
        let secs = r.elapsed.as_secs_f64();
        if let (Some(a), Some(b)) = (before, child.and_then(ChildProc::cpu_seconds)) {
            let (sum1, n1) = fsyncs().await;
            let n = (n1 - n0).max(1.0);
            eprintln!(
                "  wal proxy cpu {:.0}%; {:.0} log writes+fsyncs/s, {:.2} ms each on average, {:.1} requests per fsync",
                (b - a) / secs * 100.0,
                n / secs,
                (sum1 - sum0) / n * 1000.0,
                r.ok as f64 / n
            );
        }
        r
    }

    async fn batch_on(
        &mut self,
        ep: &Endpoint,
        child: Option<&ChildProc>,
        mode: &str,
    ) -> Result<Measured, String> {
        let (ns, w) = self.batch_workload(&format!("wal_batch_{mode}"));
        let label = format!(
            "ingest-batch {}x events, {mode}",
            self.args.events_per_request
        );
        let r = self.run_on(ep, child, &label, 8, w.clone()).await;
        fail_on_errors(&r)?;
        let expected = w.expected(self.keys.len(), &r.body_credits);
        verify::flush_and_check(&self.client, ep, &ns, &self.keys, &expected).await?;
        Ok(Measured {
            per_sec: r.eps(),
            p99_ms: r.ms(0.99),
        })
    }

    async fn single_on(
        &mut self,
        ep: &Endpoint,
        child: Option<&ChildProc>,
        mode: &str,
    ) -> Result<Measured, String> {
        let ns = self.ns(&format!("wal_single_{mode}"));
        let w = Arc::new(IngestSingle {
            ns: ns.clone(),
            keys: self.keys.clone(),
        });
        let r = self
            .run_on(ep, child, &format!("ingest-single, {mode}"), 64, w)
            .await;
        fail_on_errors(&r)?;
        let expected: Vec<i64> = r.key_credits.iter().map(|&c| c as i64).collect();
        verify::flush_and_check(&self.client, ep, &ns, &self.keys, &expected).await?;
        Ok(Measured {
            per_sec: r.rps(),
            p99_ms: r.ms(0.99),
        })
    }
}
