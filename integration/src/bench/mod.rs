//! `tally-bench`: the project's load generator and the SPEC §8 benchmark.
//!
//! ```text
//! cargo bench-tally suite --runs 3          # every §8 row with its baseline
//! cargo bench-tally ingest-batch --dist zipf --duration 20s
//! cargo bench-tally query-total --rate 5000 --target http://127.0.0.1:8080 \
//!     --admin http://127.0.0.1:9090 --token $TALLY_ADMIN_TOKEN
//! ```
//!
//! Without `--target` it starts its own cluster through the harness
//! (`--groups` groups of a master and `--replicas` replicas, GTID
//! semi-sync, `innodb_flush_log_at_trx_commit=1`) and runs the proxy as a
//! child process (see [`target`]).
//!
//! # An older build side by side (`--before-proxy`)
//!
//! ```text
//! git worktree add /tmp/v1 <commit> && (cd /tmp/v1 && cargo build --release -p tally-proxy)
//! cargo bench-tally flush ingest-single bare-hyper freshness --runs 3 \
//!     --before-proxy /tmp/v1/target/release/tally-proxy
//! ```
//!
//! `flush`, `ingest-single` and `freshness` (also within `suite`) then run
//! in every run against this build and against that executable, started
//! as `tally-proxy --config proxy.yaml` with the config this build's child
//! gets (plus `listen:` on free ports), on database `tally_before` of the
//! same cluster (the older build creates its own schema there; this
//! build's tables are in `tally`). The builds take turns going first
//! (odd runs this build, even runs the older one). The older build's
//! observations end in ` (before)`; per run the bench adds
//! `ratio flush now / before`, `ratio ingest-single now / before` and each
//! build's `ratio ingest-single … / bare-hyper`, so the report gives
//! medians of per-run ratios. `flush` counts counter-minutes (one event
//! for each of `--flush-keys` counters), not rows: the layouts store a
//! counter-minute as different numbers of rows (`flush rows per
//! counter-minute` shows how many).
//!
//! # Layout
//! - [`keys`]: uniform and Zipf key distributions.
//! - [`http`]: hyper keep-alive client connection; the bare hyper server.
//! - [`load`]: the load engine (connections, pacing, HDR histograms,
//!   progress line).
//! - [`workloads`]: the scenarios' request generators.
//! - [`verify`]: flush and read-back after every ingest run.
//! - [`baselines`]: naive upserts, the `mariadb` client load.
//! - [`redis`]: the Redis GET baseline of the read scenarios.
//! - [`target`]: cluster, proxy and bare-server child processes.
//! - [`scenarios`]: one function per measurement.

pub mod baselines;
pub mod http;
pub mod keys;
pub mod load;
pub mod redis;
pub mod scenarios;
pub mod target;
pub mod verify;
pub mod workloads;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use self::keys::Dist;
use self::scenarios::Ctx;

/// tally's load generator and benchmark.
#[derive(Parser, Debug, Clone)]
#[command(about = "Load generator and benchmark for tally (the figures are in BENCHMARKS.md)")]
pub struct Args {
    /// Scenarios to run, in order (`suite` = every target row of BENCHMARKS.md with its baseline).
    #[arg(value_enum, required = true)]
    pub scenarios: Vec<Scenario>,
    /// Repeat the scenarios this many times; the report gives the median.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Distinct counters.
    #[arg(long, default_value_t = 100_000)]
    pub keys: usize,
    /// The suite measures single events vs bare hyper over `--keys` and
    /// again over this many counters (the request path, little to store).
    #[arg(long, default_value_t = 1_000)]
    pub single_keys: usize,
    /// Key distribution: uniform, zipf or zipf:S.
    #[arg(long, default_value = "uniform")]
    pub dist: Dist,
    /// Events per request for batched ingest.
    #[arg(long, default_value_t = 1000)]
    pub events_per_request: usize,
    /// Length of each measured run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop each run after this many requests instead (overrides --duration).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Keep-alive connections (default per scenario: 8 batched, 64 single, 32 reads).
    #[arg(long)]
    pub conns: Option<usize>,
    /// Requests per second (default: closed loop; 5,000/s for query-total and query-range).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Ingest rate (events/s) under which freshness is measured.
    #[arg(long, default_value_t = 100_000.0)]
    pub fresh_rate: f64,
    /// Pending (counter, minute) entries for the memory measurement.
    #[arg(long, default_value_t = 1_000_000)]
    pub mem_entries: usize,
    /// Counters flushed into one group for the flush-path measurement.
    #[arg(long, default_value_t = 100_000)]
    pub flush_keys: usize,
    /// Groups of the benchmark's own cluster.
    #[arg(long, default_value_t = 2)]
    pub groups: usize,
    /// Replicas per group of the benchmark's own cluster.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Data-plane URL of a running proxy (then no cluster is started).
    #[arg(long)]
    pub target: Option<String>,
    /// Admin URL of the running proxy.
    #[arg(long, requires = "target")]
    pub admin: Option<String>,
    /// Admin token of the running proxy.
    #[arg(long, env = "TALLY_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A master (host:port, user root, no password) for the SQL baselines
    /// when benchmarking a running proxy.
    #[arg(long)]
    pub master: Option<SocketAddr>,
    /// Copy throttle of the reshard scenario (`reshard.max_rows_per_sec`).
    #[arg(long, default_value_t = 5_000)]
    pub reshard_rate: usize,
    /// Counters per copy transaction of the reshard scenario (`reshard.chunk_counters`).
    #[arg(long, default_value_t = 100)]
    pub reshard_chunk: usize,
    /// Adaptive throttle of the reshard scenario (`reshard.adaptive_ratio`;
    /// 0 = a fixed `--reshard-rate`).
    #[arg(long, default_value_t = 1.5)]
    pub reshard_adaptive: f64,
    /// A `tally-proxy` executable of an older build: `flush`,
    /// `ingest-single` and `freshness` (also in `suite`) then run against
    /// it too, in the same run, on its own database of the same cluster,
    /// reported with ` (before)` (needs the benchmark's own cluster).
    #[arg(long, conflicts_with = "target")]
    pub before_proxy: Option<std::path::PathBuf>,
    /// Less output: no progress lines.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Suite,
    IngestBatch,
    IngestSingle,
    QueryTotal,
    QueryRange,
    Top,
    Mixed,
    /// The bare hyper server with the ingest-single workload.
    BareHyper,
    /// One autocommit upsert per event, straight into a master.
    NaiveUpsert,
    /// The proxy's flush into one group vs the `mariadb` client loading the same rows.
    Flush,
    Freshness,
    Memory,
    /// Rows moved per second and write/read p99 before vs during a 2 → 3
    /// group reshard (needs `--groups 3`).
    Reshard,
    /// Batched and single-event ingest with `durability: wal` versus in
    /// memory, side by side (needs the benchmark's own cluster).
    Wal,
    /// Batched ingest into 200 counters whose events spread over 10,000
    /// minutes (a week) versus the same counters in the current minute, side
    /// by side: what a counter's many pending minutes cost to merge and flush.
    IngestSpread,
    /// Read throughput side by side: the proxy with coalesced reads and the
    /// read cache (defaults) and one with both off, each at saturation over
    /// `--keys` counters, on one hot counter, and paced totals and range
    /// counts at 5,000/s; Redis GET over as many keys (its own
    /// `redis-server`; skipped with a message when absent).
    Reads,
    /// Batched and single-event ingest with an idempotency id on every
    /// event versus without, side by side: events/s and rows stored.
    Ids,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    tally_proxy::config::parse_duration(s)
}

/// Entry point of the binary (after the child-process check).
pub fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if let Some(code) = target::child_main(&argv) {
        return code;
    }
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        match run(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tally-bench: FAILED: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn run(args: Args) -> Result<(), String> {
    print_machine();
    let mut ctx = Ctx::start(args.clone()).await?;
    let result = run_all(&mut ctx, &args).await;
    ctx.shutdown().await;
    let obs = result?;
    report(&obs);
    Ok(())
}

async fn run_all(ctx: &mut Ctx, args: &Args) -> Result<BTreeMap<String, Vec<f64>>, String> {
    let mut obs: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for run in 1..=args.runs {
        eprintln!("=== run {run} of {} ===", args.runs);
        let mut this_run = Vec::new();
        for &s in &args.scenarios {
            this_run.extend(ctx.scenario(s, run).await?);
        }
        let ratios = run_ratios(&this_run);
        for (k, v) in this_run.into_iter().chain(ratios) {
            obs.entry(k).or_default().push(v);
        }
    }
    Ok(obs)
}

/// Ratios between observations of different scenarios of one run (so a
/// median of ratios, not a ratio of medians): single events to bare hyper
/// for each build, and the builds to each other.
fn run_ratios(run: &[(String, f64)]) -> Vec<(String, f64)> {
    let get = |name: &str| run.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
    let single = "ingest-single req/s";
    let before = scenarios::before_named(single);
    let pairs = [
        (
            "ratio ingest-single / bare-hyper",
            single,
            "bare-hyper req/s",
        ),
        (
            "ratio ingest-single (before) / bare-hyper",
            before.as_str(),
            "bare-hyper req/s",
        ),
        ("ratio ingest-single now / before", single, before.as_str()),
    ];
    pairs
        .into_iter()
        .filter_map(|(name, a, b)| Some((name.to_owned(), get(a)? / get(b)?)))
        .collect()
}

fn print_machine() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!(
        "machine: {cores} cores, {cpu}; load average {}",
        scenarios::loadavg()
    );
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn report(obs: &BTreeMap<String, Vec<f64>>) {
    println!("\n| measurement | median | runs |");
    println!("| --- | ---: | --- |");
    for (k, v) in obs {
        let runs: Vec<String> = v.iter().map(|x| fmt_num(*x)).collect();
        println!("| {k} | {} | {} |", fmt_num(median(v)), runs.join(", "));
    }
}

pub fn fmt_num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ratios_pair_each_build_with_bare_hyper_and_the_builds_together() {
        let run = vec![
            ("ingest-single req/s".to_owned(), 60.0),
            ("ingest-single req/s (before)".to_owned(), 40.0),
            ("bare-hyper req/s".to_owned(), 100.0),
        ];
        let got: BTreeMap<String, f64> = run_ratios(&run).into_iter().collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got["ratio ingest-single / bare-hyper"], 0.6);
        assert_eq!(got["ratio ingest-single (before) / bare-hyper"], 0.4);
        assert_eq!(got["ratio ingest-single now / before"], 1.5);
        // Without an older build or bare hyper, nothing to pair.
        assert!(run_ratios(&run[..1]).is_empty());
    }

    #[test]
    fn before_proxy_needs_the_benchmarks_own_cluster() {
        let parse = |extra: &[&str]| {
            Args::try_parse_from(
                ["tally-bench", "flush", "--before-proxy", "/x"]
                    .iter()
                    .chain(extra),
            )
        };
        let args = parse(&[]).expect("parses");
        assert_eq!(
            args.before_proxy.as_deref(),
            Some(std::path::Path::new("/x"))
        );
        assert!(parse(&["--target", "http://127.0.0.1:8080"]).is_err());
    }
}
