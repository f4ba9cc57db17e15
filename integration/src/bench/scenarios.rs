//! One function per measurement. Each returns named observations
//! (`"ingest-batch events/s" → value`); the caller collects them over runs
//! and reports medians.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_harness::Cluster;

use super::keys::{Dist, KeySpace};
use super::load::{self, LoadResult, LoadSpec, Workload};
use super::target::{self, BufferSettings, ChildProc, Endpoint};
use super::workloads::{IngestBatch, IngestSingle, Mixed, Query, ReadKind, Times};
use super::{Args, Scenario, baselines, verify};

mod ids;
mod reads;
mod reshard;
mod wal;

type Obs = Vec<(String, f64)>;

/// Everything a scenario needs: the target, the cluster (if ours), a
/// shared HTTP client for control calls.
pub struct Ctx {
    args: Args,
    client: reqwest::Client,
    cluster: Option<Cluster>,
    topology_yaml: Option<String>,
    proxy: Option<ChildProc>,
    ep: Endpoint,
    master: Option<SocketAddr>,
    run_id: String,
    next_ns: u32,
    keys: Arc<KeySpace>,
    /// A namespace holding every key of `keys` (for reads).
    read_ns: Option<String>,
    /// The older build of `--before-proxy`.
    before: Option<Before>,
}

/// Which build of the proxy a measurement runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Build {
    /// The proxy linked into this executable.
    Now,
    /// The `--before-proxy` executable.
    Before,
}

/// The database of the older build, on the same cluster: it creates its
/// own schema there at start, so the two layouts never share a table
/// (the harness gives `tally` the schema of the build linked in here).
const BEFORE_DATABASE: &str = "tally_before";

/// An older build (`--before-proxy`) measured side by side with this one.
struct Before {
    exe: PathBuf,
    /// The cluster's topology with DSNs on [`BEFORE_DATABASE`].
    topology_yaml: String,
    /// Its long-running proxy (default buffer settings, like the main
    /// one), started when a scenario first needs it. While a scenario runs
    /// against the older build, `Ctx::proxy`/`Ctx::ep` hold the older
    /// build's and these hold this build's (see [`Ctx::swap_build`]).
    proxy: Option<ChildProc>,
    ep: Option<Endpoint>,
}

impl Before {
    /// Lets the cluster's users use [`BEFORE_DATABASE`] (the data user
    /// its DML, the admin user everything, as the harness grants on its
    /// own database) and leaves creating it to the older proxy.
    async fn prepare(exe: &Path, cluster: &Cluster) -> Result<Before, String> {
        if !exe.is_file() {
            return Err(format!("--before-proxy {}: no such file", exe.display()));
        }
        // `_` is a wildcard in a GRANT's database name.
        let db = BEFORE_DATABASE.replace('_', "\\_");
        let grants = format!(
            "GRANT {} ON `{db}`.* TO '{}'@'127.0.0.1'; GRANT ALL PRIVILEGES ON `{db}`.* TO '{}'@'127.0.0.1'",
            tally_harness::DATA_PRIVILEGES,
            tally_harness::DATA_USER,
            tally_harness::ADMIN_USER
        );
        for g in cluster.groups() {
            g.master
                .exec(&grants)
                .await
                .map_err(|e| format!("grants on {BEFORE_DATABASE}: {e}"))?;
        }
        cluster
            .wait_replicas_caught_up()
            .await
            .map_err(|e| e.to_string())?;
        Ok(Before {
            exe: exe.to_owned(),
            topology_yaml: cluster.topology_yaml_for(BEFORE_DATABASE, 160),
            proxy: None,
            ep: None,
        })
    }
}

/// `/proc/loadavg`'s first three fields.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn self_cpu() -> f64 {
    target::cpu_seconds_of(std::process::id()).unwrap_or(0.0)
}

impl Ctx {
    pub async fn start(args: Args) -> Result<Ctx, String> {
        let client = reqwest::Client::new();
        let token = args
            .token
            .clone()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| format!("bench-{:016x}", fastrand::u64(..)));
        let keys = Arc::new(KeySpace::new(args.keys, args.dist));
        let run_id = format!("{:x}", fastrand::u32(..) & 0xfffff);
        let (cluster, topology_yaml, proxy, ep, master) = match &args.target {
            Some(url) => {
                let http = resolve(url).await?;
                let admin_url = args
                    .admin
                    .clone()
                    .unwrap_or_else(|| "http://127.0.0.1:9090".into())
                    .trim_end_matches('/')
                    .to_owned();
                let ep = Endpoint {
                    http,
                    admin_url,
                    token,
                };
                (None, None, None, ep, args.master)
            }
            None => {
                eprintln!(
                    "starting cluster: {} group(s) x (master + {} replica(s)), innodb_flush_log_at_trx_commit=1 ...",
                    args.groups, args.replicas
                );
                let t = Instant::now();
                let cluster = target::start_cluster(args.groups, args.replicas).await?;
                let topo = cluster.topology_yaml(160);
                let proxy = ChildProc::proxy(&topo, &BufferSettings::default(), &token).await?;
                let ep = proxy.endpoint(&token);
                let master = cluster.group(0).master.addr();
                eprintln!(
                    "cluster and proxy (pid {}) up in {:.1}s: http={} admin={}",
                    proxy.pid,
                    t.elapsed().as_secs_f64(),
                    ep.http,
                    ep.admin_url
                );
                (Some(cluster), Some(topo), Some(proxy), ep, Some(master))
            }
        };
        target::wait_ready(&ep, Duration::from_secs(60)).await?;
        let before = match (&args.before_proxy, &cluster) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(
                    "--before-proxy needs the benchmark's own cluster (no --target)".into(),
                );
            }
            (Some(exe), Some(c)) => {
                eprintln!(
                    "before build: {} on database {BEFORE_DATABASE} of the same cluster",
                    exe.display()
                );
                Some(Before::prepare(exe, c).await?)
            }
        };
        Ok(Ctx {
            args,
            client,
            cluster,
            topology_yaml,
            proxy,
            ep,
            master,
            run_id,
            next_ns: 0,
            keys,
            read_ns: None,
            before,
        })
    }

    pub async fn shutdown(&mut self) {
        if let Some(p) = self.proxy.take() {
            p.stop(Duration::from_secs(120)).await;
        }
        if let Some(p) = self.before.as_mut().and_then(|b| b.proxy.take()) {
            p.stop(Duration::from_secs(120)).await;
        }
        if let Some(c) = self.cluster.take() {
            c.shutdown().await;
        }
    }

    /// A fresh namespace for one run, so read-back compares exact counts.
    fn ns(&mut self, tag: &str) -> String {
        self.next_ns += 1;
        format!("b{}_{tag}_{}", self.run_id, self.next_ns)
    }

    fn spec(&self, label: &str, addr: SocketAddr, default_conns: usize) -> LoadSpec {
        LoadSpec {
            label: label.to_owned(),
            addr,
            conns: self.args.conns.unwrap_or(default_conns),
            duration: Some(self.args.duration),
            requests: self.args.requests,
            rate: self.args.rate,
            metrics_url: Some(self.ep.admin_url.clone()),
            quiet: self.args.quiet,
        }
    }

    /// Runs a load and prints its summary with load average and CPU use.
    async fn measure(&self, spec: &LoadSpec, w: Arc<dyn Workload>) -> LoadResult {
        let (la, cpu0, p0) = (loadavg(), self_cpu(), self.proxy_cpu());
        let r = load::run(spec, w).await;
        let secs = r.elapsed.as_secs_f64();
        let cpu = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{:.0}%", (b - a) / secs * 100.0),
            _ => "?".into(),
        };
        eprintln!(
            "  {}\n  cpu: generator {:.0}%, proxy {}; load average before {la}, after {}",
            r.summary(),
            (self_cpu() - cpu0) / secs * 100.0,
            cpu(p0, self.proxy_cpu()),
            loadavg()
        );
        r
    }

    fn proxy_cpu(&self) -> Option<f64> {
        self.proxy.as_ref().and_then(ChildProc::cpu_seconds)
    }

    /// The builds to measure in run `run`: this one, and with
    /// `--before-proxy` the older one, first on odd runs and second on
    /// even ones, so neither always runs on a server the other just wrote to.
    fn builds(&self, run: usize) -> Vec<Build> {
        match (&self.before, run % 2) {
            (None, _) => vec![Build::Now],
            (Some(_), 1) => vec![Build::Now, Build::Before],
            (Some(_), _) => vec![Build::Before, Build::Now],
        }
    }

    /// Starts the older build's long-running proxy unless it runs.
    async fn start_before(&mut self) -> Result<(), String> {
        let Some(b) = self.before.as_mut() else {
            return Err("no --before-proxy".into());
        };
        if b.ep.is_none() {
            let p = ChildProc::external_proxy(
                &b.exe,
                &b.topology_yaml,
                &BufferSettings::default(),
                &self.ep.token,
                "",
            )
            .await?;
            eprintln!("  before proxy (pid {}) up: http={}", p.pid, p.http);
            b.ep = Some(p.endpoint(&self.ep.token));
            b.proxy = Some(p);
        }
        Ok(())
    }

    /// Exchanges the long-running proxy (and its endpoint) with the other
    /// build's, which [`Ctx::start_before`] started: a scenario run
    /// between two swaps measures the older build with the same code.
    fn swap_build(&mut self) {
        if let Some(b) = self.before.as_mut()
            && let Some(ep) = b.ep.as_mut()
        {
            std::mem::swap(&mut self.ep, ep);
            std::mem::swap(&mut self.proxy, &mut b.proxy);
        }
    }

    /// `ingest-single` or `freshness` against every build of
    /// [`Ctx::builds`]; the older build's observations end in ` (before)`.
    async fn on_builds(&mut self, s: Scenario, run: usize) -> Result<Obs, String> {
        let mut obs = Vec::new();
        for build in self.builds(run) {
            if build == Build::Before {
                self.start_before().await?;
                self.swap_build();
            }
            let got = match s {
                Scenario::IngestSingle => self.ingest_single().await,
                Scenario::Freshness => self.freshness().await,
                _ => Err(format!("{s:?} does not run per build")),
            };
            if build == Build::Before {
                self.swap_build();
                obs.extend(got?.into_iter().map(|(k, v)| (before_named(&k), v)));
            } else {
                obs.extend(got?);
            }
        }
        Ok(obs)
    }

    pub async fn scenario(&mut self, s: Scenario, run: usize) -> Result<Obs, String> {
        eprintln!("--- {s:?} (run {run}) ---");
        match s {
            Scenario::Suite => {
                let mut obs = Vec::new();
                let batch = self.ingest_batch().await?;
                let upsert = self.naive_upsert().await?;
                let ratio =
                    get(&batch, "ingest-batch events/s") / get(&upsert, "naive-upsert events/s");
                obs.extend(batch);
                obs.extend(upsert);
                obs.push(("ratio ingest-batch / naive-upsert".into(), ratio));
                let single = self.on_builds(Scenario::IngestSingle, run).await?;
                let bare = self.bare_hyper().await?;
                obs.extend(single);
                obs.extend(bare);
                // `run_all` adds the ratio of each build to bare hyper.
                if self.args.single_keys != self.args.keys {
                    obs.extend(self.single_vs_bare_over(self.args.single_keys).await?);
                }
                obs.extend(self.query(ReadKind::Total, "query-total").await?);
                let now = unix_now();
                obs.extend(
                    self.query(
                        ReadKind::Range {
                            from: now - 3 * 3600 - 17 * 60,
                            to: now + 60,
                        },
                        "query-range",
                    )
                    .await?,
                );
                obs.extend(self.flush_vs_client(run).await?);
                obs.extend(self.on_builds(Scenario::Freshness, run).await?);
                obs.extend(self.memory(run == 1).await?);
                Ok(obs)
            }
            Scenario::IngestBatch => self.ingest_batch().await,
            Scenario::IngestSingle => self.on_builds(s, run).await,
            Scenario::BareHyper => self.bare_hyper().await,
            Scenario::NaiveUpsert => self.naive_upsert().await,
            Scenario::QueryTotal => self.query(ReadKind::Total, "query-total").await,
            Scenario::QueryRange => {
                let now = unix_now();
                self.query(
                    ReadKind::Range {
                        from: now - 3 * 3600 - 17 * 60,
                        to: now + 60,
                    },
                    "query-range",
                )
                .await
            }
            Scenario::Top => self.query(ReadKind::Top { limit: 10 }, "top").await,
            Scenario::Mixed => self.mixed().await,
            Scenario::Flush => self.flush_vs_client(run).await,
            Scenario::Freshness => self.on_builds(s, run).await,
            Scenario::Memory => self.memory(true).await,
            Scenario::Reshard => self.reshard().await,
            Scenario::Wal => self.wal().await,
            Scenario::IngestSpread => self.ingest_spread().await,
            Scenario::Reads => self.reads().await,
            Scenario::Ids => self.ids().await,
        }
    }

    /// 200 counters, events in the current minute, then the same 200
    /// counters with their events spread over 10,000 minutes: the ratio is
    /// what a wide spread costs per event.
    async fn ingest_spread(&mut self) -> Result<Obs, String> {
        let keys = Arc::new(KeySpace::new(200, self.args.dist));
        let mut obs = Vec::new();
        let now = unix_now();
        let mut rates = Vec::new();
        for (tag, times) in [
            ("narrow", Times::Now),
            (
                "spread",
                Times::Spread {
                    now,
                    minutes: 10_000,
                },
            ),
        ] {
            let ns = self.ns(tag);
            let w = Arc::new(IngestBatch::with_times(
                &ns,
                &keys,
                self.args.events_per_request,
                fastrand::u64(..),
                times,
            ));
            let label = format!("ingest-{tag} 200 keys");
            let spec = self.spec(&label, self.ep.http, 8);
            let r = self.measure(&spec, w.clone()).await;
            fail_on_errors(&r)?;
            let expected = w.expected(keys.len(), &r.body_credits);
            verify::flush_and_check(&self.client, &self.ep, &ns, &keys, &expected).await?;
            rates.push(r.eps());
            obs.push((format!("ingest-{tag} events/s"), r.eps()));
            obs.push((format!("ingest-{tag} p99 ms"), r.ms(0.99)));
        }
        obs.push((
            "ratio ingest-spread / ingest-narrow".into(),
            rates[1] / rates[0],
        ));
        Ok(obs)
    }

    /// A fresh namespace and a batched-ingest workload over all keys.
    fn batch_workload(&mut self, tag: &str) -> (String, Arc<IngestBatch>) {
        let ns = self.ns(tag);
        let w = Arc::new(IngestBatch::new(
            &ns,
            &self.keys,
            self.args.events_per_request,
            fastrand::u64(..),
        ));
        (ns, w)
    }

    async fn ingest_batch(&mut self) -> Result<Obs, String> {
        let (ns, w) = self.batch_workload("batch");
        let label = format!(
            "ingest-batch {}x{} {} keys {}",
            self.args.events_per_request,
            "events",
            self.keys.len(),
            self.args.dist
        );
        let spec = self.spec(&label, self.ep.http, 8);
        let r = self.measure(&spec, w.clone()).await;
        fail_on_errors(&r)?;
        let expected = w.expected(self.keys.len(), &r.body_credits);
        verify::flush_and_check(&self.client, &self.ep, &ns, &self.keys, &expected).await?;
        if self.read_ns.is_none() && expected.iter().all(|&c| c > 0) {
            self.read_ns = Some(ns);
        }
        Ok(vec![
            ("ingest-batch events/s".into(), r.eps()),
            ("ingest-batch p99 ms".into(), r.ms(0.99)),
            ("ingest-batch pending rows max".into(), r.pending_max),
        ])
    }

    async fn ingest_single(&mut self) -> Result<Obs, String> {
        let ns = self.ns("single");
        let w = Arc::new(IngestSingle {
            ns: ns.clone(),
            keys: self.keys.clone(),
        });
        let spec = self.spec("ingest-single", self.ep.http, 64);
        let r = self.measure(&spec, w).await;
        fail_on_errors(&r)?;
        let expected: Vec<i64> = r.key_credits.iter().map(|&c| c as i64).collect();
        verify::flush_and_check(&self.client, &self.ep, &ns, &self.keys, &expected).await?;
        Ok(vec![
            ("ingest-single req/s".into(), r.rps()),
            ("ingest-single p99 ms".into(), r.ms(0.99)),
        ])
    }

    /// Single events against bare hyper over `n` counters instead of
    /// `--keys`: with few counters the flush stores little and the request
    /// path is what is measured; with many, every event is a row for
    /// MariaDB (BENCHMARKS.md). Observations are named with `n`.
    async fn single_vs_bare_over(&mut self, n: usize) -> Result<Obs, String> {
        let all = std::mem::replace(&mut self.keys, Arc::new(KeySpace::new(n, self.args.dist)));
        let single = self.ingest_single().await;
        let bare = match &single {
            Ok(_) => self.bare_hyper().await,
            Err(e) => Err(e.clone()),
        };
        self.keys = all;
        let (single, bare) = (single?, bare?);
        let ratio = get(&single, "ingest-single req/s") / get(&bare, "bare-hyper req/s");
        let named = |(name, v): (String, f64)| (format!("{name} ({n} keys)"), v);
        let mut obs: Obs = single.into_iter().chain(bare).map(named).collect();
        obs.push((
            format!("ratio ingest-single / bare-hyper ({n} keys)"),
            ratio,
        ));
        Ok(obs)
    }

    async fn bare_hyper(&mut self) -> Result<Obs, String> {
        let bare = ChildProc::bare().await?;
        let w = Arc::new(IngestSingle {
            ns: "bare".into(),
            keys: self.keys.clone(),
        });
        let mut spec = self.spec("bare-hyper (same requests)", bare.http, 64);
        spec.metrics_url = None;
        let (c0, t0) = (bare.cpu_seconds(), Instant::now());
        let r = self.measure(&spec, w).await;
        if let (Some(a), Some(b)) = (c0, bare.cpu_seconds()) {
            eprintln!(
                "  bare server cpu {:.0}%",
                (b - a) / t0.elapsed().as_secs_f64() * 100.0
            );
        }
        bare.stop(Duration::from_secs(5)).await;
        fail_on_errors(&r)?;
        Ok(vec![
            ("bare-hyper req/s".into(), r.rps()),
            ("bare-hyper p99 ms".into(), r.ms(0.99)),
        ])
    }

    async fn naive_upsert(&mut self) -> Result<Obs, String> {
        let Some(master) = self.master else {
            return Err(
                "naive-upsert needs a master: run without --target or give --master".into(),
            );
        };
        let ns = self.ns("naive");
        // As many connections as the proxy's pool may open (pool.max).
        let conns = self.args.conns.unwrap_or(16);
        let (la, t) = (loadavg(), Instant::now());
        let r = baselines::naive_upserts(
            master,
            "tally",
            &ns,
            self.keys.clone(),
            conns,
            self.args.duration,
        )
        .await?;
        eprintln!(
            "  naive-upsert ({conns} connections, autocommit, innodb_flush_log_at_trx_commit=1): {:.0} events/s, p50 {:.2} ms p99 {:.2} ms over {:.1}s; load average before {la}, after {}",
            r.eps(),
            r.hist.value_at_quantile(0.5) as f64 / 1000.0,
            r.hist.value_at_quantile(0.99) as f64 / 1000.0,
            t.elapsed().as_secs_f64(),
            loadavg()
        );
        Ok(vec![("naive-upsert events/s".into(), r.eps())])
    }

    /// Makes sure a namespace holds every key (for read scenarios).
    async fn read_namespace(&mut self) -> Result<String, String> {
        if let Some(ns) = &self.read_ns {
            return Ok(ns.clone());
        }
        let ns = self.ns("reads");
        eprintln!("  preloading {} keys into {ns}", self.keys.len());
        let idx: Vec<u32> = (0..self.keys.len() as u32).collect();
        for chunk in idx.chunks(1000) {
            let body = super::workloads::events_json(&ns, &self.keys, chunk);
            let r = self
                .client
                .post(self.ep.url("/v1/events"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if r.status().as_u16() != 200 {
                return Err(format!("preload answered {}", r.status()));
            }
        }
        let expected = vec![1i64; self.keys.len()];
        verify::flush_and_check(&self.client, &self.ep, &ns, &self.keys, &expected).await?;
        self.read_ns = Some(ns.clone());
        Ok(ns)
    }

    async fn query(&mut self, kind: ReadKind, label: &str) -> Result<Obs, String> {
        let ns = self.read_namespace().await?;
        if let Some(c) = &self.cluster {
            c.wait_replicas_caught_up()
                .await
                .map_err(|e| e.to_string())?;
        }
        let is_top = matches!(kind, ReadKind::Top { .. });
        let w = Arc::new(Query {
            ns,
            keys: self.keys.clone(),
            kind,
            consistency: None,
        });
        let mut spec = self.spec(label, self.ep.http, if is_top { 4 } else { 32 });
        if spec.rate.is_none() && !is_top {
            spec.rate = Some(5000.0);
        }
        let r = self.measure(&spec, w).await;
        fail_on_errors(&r)?;
        Ok(vec![
            (format!("{label} req/s"), r.rps()),
            (format!("{label} p50 ms"), r.ms(0.5)),
            (format!("{label} p99 ms"), r.ms(0.99)),
            (format!("{label} p99.9 ms"), r.ms(0.999)),
        ])
    }

    async fn mixed(&mut self) -> Result<Obs, String> {
        let read_ns = self.read_namespace().await?;
        let ns = self.ns("mixed");
        let ingest = IngestBatch::new(&ns, &self.keys, 100, fastrand::u64(..));
        let now = unix_now();
        let q = |kind| Query {
            ns: read_ns.clone(),
            keys: self.keys.clone(),
            kind,
            consistency: None,
        };
        let w = Arc::new(Mixed {
            ingest,
            total: q(ReadKind::Total),
            range: q(ReadKind::Range {
                from: now - 3600,
                to: now + 60,
            }),
            write_pct: 50,
        });
        let spec = self.spec(
            "mixed (50% 100-event batches, 40% totals, 10% ranges)",
            self.ep.http,
            32,
        );
        let r = self.measure(&spec, w.clone()).await;
        fail_on_errors(&r)?;
        let expected = w.ingest.expected(self.keys.len(), &r.body_credits);
        verify::flush_and_check(&self.client, &self.ep, &ns, &self.keys, &expected).await?;
        Ok(vec![
            ("mixed req/s".into(), r.rps()),
            ("mixed p99 ms".into(), r.ms(0.99)),
        ])
    }

    /// The proxy's flush of `flush_keys` counters into group g0, one event
    /// each, so one (counter, minute) each: counter-minutes per second of
    /// flush time, whatever the storage layout makes of a counter-minute
    /// (rows per counter-minute are reported beside). With
    /// `--before-proxy` the older build flushes the same way into its own
    /// database. Baselines: the `mariadb` client loading into the same
    /// master one primary-key-only row per counter-minute, the four rows
    /// (minute, hour, day, total) of the four-row layout, and today's two
    /// (minute, total: the ceiling of any flush into this layout), each as
    /// 1,000-row statements in one transaction, like the flush.
    async fn flush_vs_client(&mut self, run: usize) -> Result<Obs, String> {
        let (Some(topo), Some(master)) = (self.topology_yaml.clone(), self.master) else {
            return Err("flush needs the benchmark's own cluster (no --target)".into());
        };
        let n = self.args.flush_keys;
        let mut obs = Vec::new();
        let (mut now_rate, mut before_rate) = (None, None);
        for build in self.builds(run) {
            let f = self.flush_one(build, run).await?;
            let rate = n as f64 / f.secs;
            let (suffix, slot) = match build {
                Build::Now => ("", &mut now_rate),
                Build::Before => (" (before)", &mut before_rate),
            };
            *slot = Some(rate);
            obs.push((format!("flush counter-minutes/s{suffix}"), rate));
            obs.push((
                format!("flush rows per counter-minute{suffix}"),
                f.rows / n as f64,
            ));
        }

        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let la = loadavg();
        let ns = self.ns("flushpk");
        let keys = crate::routing::keys_on(&topo, &ns, "k", "g0", n);
        baselines::prepare_pk_only(master).await?;
        let file = dir.path().join("pk_only.sql");
        let pk_rows = baselines::pk_only_sql(&file, &ns, &keys, unix_now());
        let took =
            baselines::mariadb_client_load(master, baselines::PK_ONLY_DATABASE, &file).await?;
        let stored = baselines::pk_only_rows(master, &ns).await?;
        if stored != pk_rows as u64 {
            return Err(format!(
                "mariadb client stored {stored} primary-key-only rows of {pk_rows}"
            ));
        }
        let pk_rate = n as f64 / took.as_secs_f64();
        eprintln!(
            "  flush baseline (run {run}): mariadb client loaded {pk_rows} primary-key-only rows in {:.2}s: {pk_rate:.0} counter-minutes/s; load average before {la}, after {}",
            took.as_secs_f64(),
            loadavg()
        );

        // The v1 layout's four rows, then today's two.
        let mut rates = [0.0; 2];
        for (rate, (name, tables)) in rates.iter_mut().zip([
            ("flushc", baselines::FOUR_ROWS),
            ("flushc2", baselines::TWO_ROWS),
        ]) {
            let la = loadavg();
            let ns = self.ns(name);
            let keys = crate::routing::keys_on(&topo, &ns, "k", "g0", n);
            let file = dir.path().join(format!("{name}.sql"));
            let sql_rows = baselines::flush_sql(&file, &ns, &keys, unix_now(), tables);
            let took = baselines::mariadb_client_load(master, "tally", &file).await?;
            *rate = n as f64 / took.as_secs_f64();
            let described = tables.iter().map(|t| t.0).collect::<Vec<_>>().join(", ");
            eprintln!(
                "  flush baseline (run {run}): mariadb client loaded {sql_rows} rows ({described}) in {:.2}s: {rate:.0} counter-minutes/s; load average before {la}, after {}",
                took.as_secs_f64(),
                loadavg()
            );
        }
        let [four_rate, two_rate] = rates;
        obs.push((
            "flush mariadb-client pk-only counter-minutes/s".into(),
            pk_rate,
        ));
        obs.push((
            "flush mariadb-client 4-row counter-minutes/s".into(),
            four_rate,
        ));
        obs.push((
            "flush mariadb-client 2-row counter-minutes/s".into(),
            two_rate,
        ));
        obs.push((
            "ratio mariadb-client 2-row / pk-only".into(),
            two_rate / pk_rate,
        ));
        if let Some(now) = now_rate {
            obs.push((
                "ratio flush now / mariadb-client pk-only".into(),
                now / pk_rate,
            ));
            obs.push((
                "ratio flush now / mariadb-client 4-row".into(),
                now / four_rate,
            ));
            obs.push((
                "ratio flush now / mariadb-client 2-row".into(),
                now / two_rate,
            ));
            if let Some(before) = before_rate {
                obs.push(("ratio flush now / before".into(), now / before));
            }
        }
        Ok(obs)
    }

    /// One build's flush: a proxy that flushes only when asked gets one
    /// event for each of `flush_keys` counters of g0 (fresh namespace),
    /// flushes once and must read every counter back as 1.
    async fn flush_one(&mut self, build: Build, run: usize) -> Result<FlushRun, String> {
        let n = self.args.flush_keys;
        let only_when_asked = BufferSettings {
            flush_interval: "1h".into(),
            flush_rows: 100_000_000,
            max_pending_rows: 100_000_000,
        };
        let token = self.ep.token.clone();
        let (tag, topo, p) = match build {
            Build::Now => {
                let topo = self.topology_yaml.clone().ok_or("no cluster")?;
                let p = ChildProc::proxy(&topo, &only_when_asked, &token).await?;
                ("flush", topo, p)
            }
            Build::Before => {
                let b = self.before.as_ref().ok_or("no --before-proxy")?;
                let topo = b.topology_yaml.clone();
                let p =
                    ChildProc::external_proxy(&b.exe, &topo, &only_when_asked, &token, "").await?;
                ("flushb", topo, p)
            }
        };
        let ns = self.ns(tag);
        let ep = p.endpoint(&token);
        target::wait_ready(&ep, Duration::from_secs(60)).await?;
        let keys = crate::routing::keys_on(&topo, &ns, "k", "g0", n);
        let ks = KeySpace::from_names(keys);
        let idx: Vec<u32> = (0..n as u32).collect();
        for chunk in idx.chunks(1000) {
            let body = super::workloads::events_json(&ns, &ks, chunk);
            let r = self
                .client
                .post(ep.url("/v1/events"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if r.status().as_u16() != 200 {
                return Err(format!("flush preload answered {}", r.status()));
            }
        }
        let metrics = |url: String| {
            let client = self.client.clone();
            async move {
                let text = client
                    .get(format!("{url}/metrics"))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .text()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((
                    load::sum_series(&text, "tally_flush_rows_total", Some("group=\"g0\"")),
                    load::sum_series(
                        &text,
                        "tally_flush_duration_seconds_sum",
                        Some("group=\"g0\""),
                    ),
                ))
            }
        };
        let (rows0, dur0) = metrics(ep.admin_url.clone()).await?;
        let la = loadavg();
        let wall = verify::flush(&self.client, &ep).await?;
        let (rows1, dur1) = metrics(ep.admin_url.clone()).await?;
        let (rows, secs) = (rows1 - rows0, dur1 - dur0);
        // A build without the metric would make every rate infinite.
        if !(secs > 0.0 && rows > 0.0) {
            return Err(format!(
                "flush ({build:?}): the proxy reported {rows} rows in {secs} s for g0 (tally_flush_rows_total, tally_flush_duration_seconds)"
            ));
        }
        verify::check_totals(&self.client, &ep, &ns, &ks, &vec![1i64; n]).await?;
        p.stop(Duration::from_secs(60)).await;
        eprintln!(
            "  flush {build:?} (run {run}): {n} counter-minutes flushed into g0 in {secs:.2}s: {:.0} counter-minutes/s; {rows:.0} rows ({:.2} per counter-minute); admin flush wall {:.2}s; read back 1 each; load average before {la}, after {}",
            n as f64 / secs,
            rows / n as f64,
            wall.as_secs_f64(),
            loadavg()
        );
        Ok(FlushRun { rows, secs })
    }

    /// p99 from a buffered write (`incr`) to its visibility through an
    /// eventual read, while batched ingest runs at `fresh_rate` events/s.
    async fn freshness(&mut self) -> Result<Obs, String> {
        let bg_ns = self.ns("freshbg");
        let probe_ns = self.ns("fresh");
        let per = self.args.events_per_request;
        let bg = Arc::new(IngestBatch::new(&bg_ns, &self.keys, per, fastrand::u64(..)));
        let mut spec = self.spec(
            &format!(
                "freshness background ingest {:.0} events/s",
                self.args.fresh_rate
            ),
            self.ep.http,
            4,
        );
        spec.rate = Some(self.args.fresh_rate / per as f64);
        spec.requests = None;
        let probes = {
            let client = self.client.clone();
            let ep = self.ep.clone();
            let duration = self.args.duration;
            let probe_ns = probe_ns.clone();
            tokio::spawn(async move { probes(&client, &ep, &probe_ns, duration).await })
        };
        let r = self.measure(&spec, bg.clone()).await;
        let samples = probes.await.map_err(|e| e.to_string())??;
        fail_on_errors(&r)?;
        let expected = bg.expected(self.keys.len(), &r.body_credits);
        verify::flush_and_check(&self.client, &self.ep, &bg_ns, &self.keys, &expected).await?;
        let mut ms: Vec<f64> = samples
            .iter()
            .map(|(d, _)| d.as_secs_f64() * 1000.0)
            .collect();
        ms.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1];
        let replica = samples.iter().filter(|(_, node)| node == "replica").count();
        eprintln!(
            "  freshness at {:.0} events/s: {} probes, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; served by a replica {replica} of {}",
            r.eps(),
            ms.len(),
            q(0.5),
            q(0.99),
            ms.last().copied().unwrap_or(0.0),
            ms.len()
        );
        Ok(vec![
            ("freshness p99 ms".into(), q(0.99)),
            ("freshness p50 ms".into(), q(0.5)),
            ("freshness background events/s".into(), r.eps()),
        ])
    }

    /// RSS of a proxy child holding `mem_entries` pending (counter, minute)
    /// entries (one minute per counter: the worst case per entry).
    async fn memory(&mut self, check: bool) -> Result<Obs, String> {
        let Some(topo) = self.topology_yaml.clone() else {
            return Err("memory needs the benchmark's own cluster (no --target)".into());
        };
        let n = self.args.mem_entries;
        let p = ChildProc::proxy(
            &topo,
            &BufferSettings {
                flush_interval: "1h".into(),
                flush_rows: 1_000_000_000 / 10,
                max_pending_rows: 1_000_000_000,
            },
            &self.ep.token,
        )
        .await?;
        let ep = p.endpoint(&self.ep.token);
        target::wait_ready(&ep, Duration::from_secs(60)).await?;
        let ns = self.ns("mem");
        let ks = Arc::new(KeySpace::new(n, Dist::Uniform));
        // Warm up (connections, first allocations, metrics), then measure.
        let warm: Vec<u32> = (0..1000).collect();
        let body = super::workloads::events_json(&format!("{ns}w"), &ks, &warm);
        let _ = self
            .client
            .post(ep.url("/v1/events"))
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        verify::flush(&self.client, &ep).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = p.rss().ok_or("no RSS")?;
        let idx: Vec<u32> = (0..n as u32).collect();
        let mut sent = 0;
        for chunk in idx.chunks(1000) {
            let body = super::workloads::events_json(&ns, &ks, chunk);
            let r = self
                .client
                .post(ep.url("/v1/events"))
                .body(body)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if r.status().as_u16() != 200 {
                return Err(format!("memory ingest answered {}", r.status()));
            }
            sent += chunk.len();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = p.rss().ok_or("no RSS")?;
        let per = (after as f64 - before as f64) / sent as f64;
        eprintln!(
            "  memory: RSS {:.1} MiB before, {:.1} MiB with {sent} pending entries: {per:.0} bytes per entry",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0
        );
        if check {
            // Strong reads add the pending deltas: every counter reads 1.
            verify::check_totals(&self.client, &ep, &ns, &ks, &vec![1; n]).await?;
            eprintln!("  verified: {n} pending counters read back 1 (strong)");
        }
        // The entries were only ever meant to be pending.
        p.kill().await;
        Ok(vec![
            ("memory bytes per pending entry".into(), per),
            (
                "memory RSS MiB with entries".into(),
                after as f64 / 1048576.0,
            ),
        ])
    }
}

/// Writes a probe counter (`incr`, ack=buffered) every 50 ms and polls
/// every outstanding probe with one eventual `POST /v1/counters/query`
/// every 20 ms (so the probing itself adds ~50 requests/s, not a read
/// storm); a probe's freshness is the time from sending its write until
/// the first poll that sees it. Returns `(freshness, node that served)`.
async fn probes(
    client: &reqwest::Client,
    ep: &Endpoint,
    ns: &str,
    duration: Duration,
) -> Result<Vec<(Duration, String)>, String> {
    // Let the background load reach its rate first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let end = Instant::now() + duration.saturating_sub(Duration::from_millis(500));
    let mut outstanding: Vec<(String, Instant)> = Vec::new();
    let mut done = Vec::new();
    let (mut next_write, mut i) = (Instant::now(), 0u32);
    loop {
        let now = Instant::now();
        if now < end && now >= next_write {
            i += 1;
            let key = format!("p{i}");
            let t = Instant::now();
            let r = client
                .post(ep.url(&format!("/v1/counters/{ns}/{key}/incr")))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if r.status().as_u16() != 200 {
                return Err(format!("probe write answered {}", r.status()));
            }
            outstanding.push((key, t));
            next_write += Duration::from_millis(50);
        }
        if now >= end && outstanding.is_empty() {
            return Ok(done);
        }
        if let Some((key, t)) = outstanding.first()
            && t.elapsed() > Duration::from_secs(300)
        {
            return Err(format!("probe {ns}/{key} not visible after 300 s"));
        }
        if !outstanding.is_empty() {
            let keys: Vec<&str> = outstanding
                .iter()
                .take(1000)
                .map(|(k, _)| k.as_str())
                .collect();
            let r = client
                .post(ep.url("/v1/counters/query"))
                .json(&serde_json::json!({ "ns": ns, "keys": keys }))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let node = r
                .headers()
                .get("x-tally-node")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let v: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
            let seen: std::collections::HashSet<String> = v["results"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|x| x["count"].as_i64() == Some(1))
                .filter_map(|x| x["key"].as_str().map(str::to_owned))
                .collect();
            outstanding.retain(|(k, t)| {
                if seen.contains(k) {
                    done.push((t.elapsed(), node.clone()));
                    false
                } else {
                    true
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What one build's flush measured.
struct FlushRun {
    /// Rows the proxy upserted (`tally_flush_rows_total`).
    rows: f64,
    /// Flush time (`tally_flush_duration_seconds_sum`).
    secs: f64,
}

/// `"ingest-single req/s"` → `"ingest-single req/s (before)"`.
pub fn before_named(name: &str) -> String {
    format!("{name} (before)")
}

fn get(obs: &Obs, name: &str) -> f64 {
    obs.iter()
        .find(|(k, _)| k == name)
        .map_or(f64::NAN, |(_, v)| *v)
}

/// Any failed request makes the expected counts uncertain: fail loudly.
fn fail_on_errors(r: &LoadResult) -> Result<(), String> {
    if r.errors() == 0 {
        return Ok(());
    }
    Err(format!(
        "{}: {} failed requests ({:?}, {} transport errors); first: {}",
        r.label,
        r.errors(),
        r.statuses,
        r.transport_errors,
        r.first_error.as_deref().unwrap_or("?")
    ))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

async fn resolve(url: &str) -> Result<SocketAddr, String> {
    let hostport = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("");
    tokio::net::lookup_host(hostport)
        .await
        .map_err(|e| format!("resolve {hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {hostport}"))
}
