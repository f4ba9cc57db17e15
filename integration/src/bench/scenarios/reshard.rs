//! The online reshard measurement: rows moved per second, and write and
//! read p99 before versus during a reshard from 2 to 3 groups.
//!
//! A proxy child over the first two groups of the benchmark's cluster is
//! seeded with every key at three minutes in three different hours (eight
//! rows per counter over the four tiers), then a fixed-rate batched-write
//! load and a fixed-rate total-read load run side by side, once before and
//! once while the reshard copies. Afterwards every counter is read back
//! against what was sent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::super::load::{self, LoadResult, LoadSpec};
use super::super::target::{self, BufferSettings, ChildProc, Endpoint};
use super::super::verify;
use super::super::workloads::{IngestBatch, Query, ReadKind};
use super::{Ctx, Obs, fail_on_errors, unix_now};

/// Writes per second (100-event batches) and reads per second of the
/// side-by-side loads.
const WRITE_RATE: f64 = 100.0;
const READ_RATE: f64 = 500.0;

impl Ctx {
    pub(super) async fn reshard(&mut self) -> Result<Obs, String> {
        let Some(cluster) = &self.cluster else {
            return Err("reshard needs the benchmark's own cluster (no --target)".into());
        };
        if self.args.groups < 3 {
            return Err("reshard needs --groups 3 (it grows from the first 2 to all 3)".into());
        }
        let three = cluster.topology_yaml(160);
        let mut doc: Value = serde_yaml_ng::from_str(&three).map_err(|e| e.to_string())?;
        if let Some(groups) = doc["groups"].as_array_mut() {
            groups.truncate(2);
        }
        let two = serde_yaml_ng::to_string(&doc).map_err(|e| e.to_string())?;
        let target_doc: Value = serde_yaml_ng::from_str(&three).map_err(|e| e.to_string())?;
        let rate = self.args.reshard_rate;
        let p = ChildProc::proxy_with(
            &two,
            &BufferSettings::default(),
            &self.ep.token,
            &format!(
                "reshard:\n  max_rows_per_sec: {rate}\n  chunk_counters: {}\n  adaptive_ratio: {}\n  poll_interval: 200ms\n  cleanup_grace: 2s\n",
                self.args.reshard_chunk, self.args.reshard_adaptive
            ),
        )
        .await?;
        let ep = p.endpoint(&self.ep.token);
        target::wait_ready(&ep, Duration::from_secs(60)).await?;

        let seeded = self.ns("reshard_seed");
        self.seed(&ep, &seeded).await?;
        if let Some(c) = &self.cluster {
            c.wait_replicas_caught_up()
                .await
                .map_err(|e| e.to_string())?;
        }
        let before = self.side_by_side(&ep, &seeded, "before").await?;

        let t0 = Instant::now();
        let r = self
            .client
            .post(format!("{}/admin/v1/reshard", ep.admin_url))
            .bearer_auth(&ep.token)
            .json(&target_doc)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status().as_u16() != 202 {
            return Err(format!("reshard start answered {}", r.status()));
        }
        let during = self.side_by_side(&ep, &seeded, "during").await?;
        let still_copying = self.status(&ep).await?["phase"] == "copying";
        // Copy and verification end when the phase leaves `copying`.
        let copied = loop {
            let s = self.status(&ep).await?;
            if s["phase"] != "copying" {
                break s;
            }
            if t0.elapsed() > Duration::from_secs(1800) {
                return Err("the reshard did not finish copying within 30 min".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let copy_secs = t0.elapsed().as_secs_f64();
        let rows = copied["driver"]["rows_copied"].as_f64().unwrap_or(0.0);
        loop {
            let s = self.status(&ep).await?;
            if s["active"] == json!(false) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!(
            "  reshard 2 -> 3: {rows:.0} rows copied and verified in {copy_secs:.1}s ({:.0} rows/s, throttle {rate}); loads {} the copy",
            rows / copy_secs,
            if still_copying {
                "ended inside"
            } else {
                "outlasted"
            }
        );
        // Everything reads back exactly on the new topology.
        verify::check_totals(
            &self.client,
            &ep,
            &seeded,
            &self.keys,
            &vec![3; self.keys.len()],
        )
        .await?;
        for phase in [&before, &during] {
            let expected = phase
                .ingest
                .expected(self.keys.len(), &phase.writes.body_credits);
            verify::flush_and_check(&self.client, &ep, &phase.write_ns, &self.keys, &expected)
                .await?;
        }
        p.stop(Duration::from_secs(60)).await;
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        Ok(vec![
            ("reshard rows moved/s".into(), rows / copy_secs),
            ("reshard write p99 before ms".into(), before.writes.ms(0.99)),
            ("reshard write p99 during ms".into(), during.writes.ms(0.99)),
            (
                "ratio reshard write p99 during / before".into(),
                ratio(during.writes.ms(0.99), before.writes.ms(0.99)),
            ),
            ("reshard read p99 before ms".into(), before.reads.ms(0.99)),
            ("reshard read p99 during ms".into(), during.reads.ms(0.99)),
            (
                "ratio reshard read p99 during / before".into(),
                ratio(during.reads.ms(0.99), before.reads.ms(0.99)),
            ),
        ])
    }

    async fn status(&self, ep: &Endpoint) -> Result<Value, String> {
        self.client
            .get(format!("{}/admin/v1/reshard", ep.admin_url))
            .bearer_auth(&ep.token)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())
    }

    /// Every key three times: 1, 2 and 3 hours ago (one event each).
    async fn seed(&self, ep: &Endpoint, ns: &str) -> Result<(), String> {
        let now = unix_now();
        let names = self.keys.names();
        for chunk in names.chunks(3000) {
            let events: Vec<Value> = chunk
                .iter()
                .flat_map(|k| {
                    (1..=3).map(
                        move |h| json!({ "ns": ns, "key": k, "delta": 1, "ts": now - h * 3600 }),
                    )
                })
                .collect();
            let r = self
                .client
                .post(ep.url("/v1/events"))
                .json(&events)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if r.status().as_u16() != 200 {
                return Err(format!("seeding answered {}", r.status()));
            }
        }
        verify::flush(&self.client, ep).await?;
        Ok(())
    }

    /// A fixed-rate batched-write load and a fixed-rate read load at once.
    async fn side_by_side(
        &mut self,
        ep: &Endpoint,
        read_ns: &str,
        when: &str,
    ) -> Result<Phase, String> {
        let write_ns = self.ns(&format!("reshard_{when}"));
        let ingest = Arc::new(IngestBatch::new(
            &write_ns,
            &self.keys,
            100,
            fastrand::u64(..),
        ));
        let reads = Arc::new(Query {
            ns: read_ns.to_owned(),
            keys: self.keys.clone(),
            kind: ReadKind::Total,
            consistency: None,
        });
        let spec = |label: String, rate: f64, conns: usize| LoadSpec {
            label,
            addr: ep.http,
            conns,
            duration: Some(self.args.duration),
            requests: None,
            rate: Some(rate),
            metrics_url: None,
            quiet: true,
        };
        let ws = spec(
            format!("reshard {when}: writes {WRITE_RATE}/s x 100 events"),
            WRITE_RATE,
            8,
        );
        let rs = spec(
            format!("reshard {when}: reads {READ_RATE}/s totals"),
            READ_RATE,
            16,
        );
        let (writes, reads) = tokio::join!(load::run(&ws, ingest.clone()), load::run(&rs, reads));
        eprintln!("  {}\n  {}", writes.summary(), reads.summary());
        fail_on_errors(&writes)?;
        fail_on_errors(&reads)?;
        Ok(Phase {
            writes,
            reads,
            write_ns,
            ingest,
        })
    }
}

/// One side-by-side measurement and what its writes sent.
struct Phase {
    writes: LoadResult,
    reads: LoadResult,
    write_ns: String,
    ingest: Arc<IngestBatch>,
}
