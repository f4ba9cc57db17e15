//! Read throughput (#24), side by side in one run:
//!
//! - the benchmark's proxy (documented defaults: coalesced eventual reads,
//!   the bounded-staleness cache) and a second proxy child on the same
//!   cluster with both switched off (`reads.coalesce.enabled: false`,
//!   `reads.cache.enabled: false`: one statement per read, as before #24);
//! - on each: eventual totals over every counter at saturation, one hot
//!   counter read by every connection at saturation (closed loops,
//!   `--conns`, default 32), then totals and range counts paced at 5,000/s
//!   (p99 from the scheduled send);
//! - Redis `GET` over as many keys with as many connections (the
//!   benchmark's own `redis-server`, see [`redis`]); without one the
//!   baseline is skipped with a message.
//!
//! Both proxies read the same preloaded namespace from the same replicas.

use std::sync::Arc;
use std::time::Duration;

use super::super::keys::KeySpace;
use super::super::load::{self, LoadResult};
use super::super::redis::{self, RedisServer};
use super::super::target::{self, BufferSettings, ChildProc, Endpoint, cpu_seconds_of};
use super::super::workloads::{Query, ReadKind};
use super::{Ctx, Obs, fail_on_errors, loadavg, unix_now};

/// Connections of the saturation loads unless `--conns` says otherwise.
const READ_CONNS: usize = 32;

/// The paced rate of the latency rows (SPEC §8).
const PACED_RATE: f64 = 5_000.0;

/// `proxy.yaml` of the comparison proxy: reads as before #24.
const READS_OFF: &str = "reads:\n  coalesce:\n    enabled: false\n  cache:\n    enabled: false\n";

/// One proxy under test: its data endpoint and process (for CPU).
struct Subject<'a> {
    tag: &'static str,
    ep: &'a Endpoint,
    pid: Option<u32>,
}

impl Ctx {
    pub(super) async fn reads(&mut self) -> Result<Obs, String> {
        let Some(topology) = self.topology_yaml.clone() else {
            return Err("reads needs the benchmark's own cluster (no --target)".into());
        };
        let ns = self.read_namespace().await?;
        let off = ChildProc::proxy_with(
            &topology,
            &BufferSettings::default(),
            &self.ep.token,
            READS_OFF,
        )
        .await?;
        let off_ep = off.endpoint(&self.ep.token);
        target::wait_ready(&off_ep, Duration::from_secs(60)).await?;
        if let Some(c) = &self.cluster {
            c.wait_replicas_caught_up()
                .await
                .map_err(|e| e.to_string())?;
        }
        let on_ep = self.ep.clone();
        let subjects = [
            Subject {
                tag: "off",
                ep: &off_ep,
                pid: Some(off.pid),
            },
            Subject {
                tag: "on",
                ep: &on_ep,
                pid: self.proxy.as_ref().map(|p| p.pid),
            },
        ];
        let mut obs = Vec::new();
        let hot = Arc::new(KeySpace::from_names(vec![self.keys.name(0).to_owned()]));
        let now = unix_now();
        // The range of the SPEC's range row: 3 h 17 min, to the next minute.
        let (from, to) = (now - 3 * 3600 - 17 * 60, now + 60);
        let mut uniform = [0.0; 2];
        let mut hot_rps = [0.0; 2];
        for (i, s) in subjects.iter().enumerate() {
            let r = self
                .read_load(
                    s,
                    "reads-eventual",
                    &ns,
                    self.keys.clone(),
                    ReadKind::Total,
                    None,
                )
                .await?;
            uniform[i] = r.rps();
            obs.push((format!("reads-eventual {} req/s", s.tag), r.rps()));
            obs.push((format!("reads-eventual {} p99 ms", s.tag), r.ms(0.99)));
            let r = self
                .read_load(s, "reads-hot", &ns, hot.clone(), ReadKind::Total, None)
                .await?;
            hot_rps[i] = r.rps();
            obs.push((format!("reads-hot {} req/s", s.tag), r.rps()));
            obs.push((format!("reads-hot {} p99 ms", s.tag), r.ms(0.99)));
            let paced = Some(PACED_RATE);
            let r = self
                .read_load(
                    s,
                    "total@5000",
                    &ns,
                    self.keys.clone(),
                    ReadKind::Total,
                    paced,
                )
                .await?;
            obs.push((format!("total@5000 {} p99 ms", s.tag), r.ms(0.99)));
            obs.push((format!("total@5000 {} req/s", s.tag), r.rps()));
            let kind = ReadKind::Range { from, to };
            let r = self
                .read_load(s, "range@5000", &ns, self.keys.clone(), kind, paced)
                .await?;
            obs.push((format!("range@5000 {} p99 ms", s.tag), r.ms(0.99)));
            obs.push((format!("range@5000 {} req/s", s.tag), r.rps()));
        }
        off.stop(Duration::from_secs(60)).await;
        obs.push((
            "ratio reads-eventual on / off".into(),
            uniform[1] / uniform[0],
        ));
        obs.push(("ratio reads-hot on / off".into(), hot_rps[1] / hot_rps[0]));
        match RedisServer::start().await? {
            None => eprintln!(
                "  redis-get: SKIPPED, no redis-server on PATH or in /usr/bin (install redis-server for the baseline)"
            ),
            Some(server) => {
                server.load(&self.keys).await?;
                let conns = self.args.conns.unwrap_or(READ_CONNS);
                let r = redis::get_load(server.addr, self.keys.clone(), conns, self.args.duration)
                    .await?;
                eprintln!(
                    "  redis-get ({} keys, {conns} connections): {:.0} GET/s | latency ms p50 {:.3} p99 {:.3}; load average {}",
                    self.keys.len(),
                    r.rps(),
                    r.ms(0.5),
                    r.ms(0.99),
                    loadavg()
                );
                obs.push(("redis-get req/s".into(), r.rps()));
                obs.push(("redis-get p99 ms".into(), r.ms(0.99)));
                obs.push((
                    "ratio reads-eventual on / redis-get".into(),
                    uniform[1] / r.rps(),
                ));
                obs.push((
                    "ratio reads-eventual off / redis-get".into(),
                    uniform[0] / r.rps(),
                ));
            }
        }
        Ok(obs)
    }

    /// Eventual reads of `keys` of `ns` on one subject: closed loop
    /// (`rate` is `None`) or paced; prints the summary with the subject's
    /// CPU.
    async fn read_load(
        &self,
        s: &Subject<'_>,
        label: &str,
        ns: &str,
        keys: Arc<KeySpace>,
        kind: ReadKind,
        rate: Option<f64>,
    ) -> Result<LoadResult, String> {
        let w = Arc::new(Query {
            ns: ns.to_owned(),
            keys,
            kind,
            consistency: None,
        });
        let label = format!("{label} {}", s.tag);
        let mut spec = self.spec(&label, s.ep.http, READ_CONNS);
        spec.rate = rate;
        spec.metrics_url = Some(s.ep.admin_url.clone());
        let (la, cpu0) = (loadavg(), s.pid.and_then(cpu_seconds_of));
        let r = load::run(&spec, w).await;
        let secs = r.elapsed.as_secs_f64();
        let cpu = match (cpu0, s.pid.and_then(cpu_seconds_of)) {
            (Some(a), Some(b)) => format!("{:.0}%", (b - a) / secs * 100.0),
            _ => "?".into(),
        };
        eprintln!(
            "  {}\n  cpu: proxy {cpu}; load average before {la}, after {}",
            r.summary(),
            loadavg()
        );
        fail_on_errors(&r)?;
        Ok(r)
    }
}
