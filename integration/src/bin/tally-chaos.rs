//! `cargo chaos --duration 10m`: the fault soak (see
//! `tally_integration::chaos`). Exits 1 when an acknowledged increment was
//! lost, one was counted twice, the system did not recover from a fault,
//! the writers went unserved between two faults, a fault turn found a
//! problem (a switchover not planned or not followed by the second proxy,
//! a proxy not serving while the other restarted), or (`--hostile`) a
//! hostile client found a bound that did not hold. With `--ids`, events
//! carry idempotency ids, failures are retried until acknowledged, and a
//! counter that differs from the ledger at all fails the soak.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tally_integration::chaos::{self, ChaosConfig};

/// Mixed load with a client ledger while faults hit MariaDB, two proxies and
/// their shared topology store.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// How long faults are injected (`60s`, `10m`, ...).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Pause between two faults.
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    every: Duration,
    /// Seed of the fault order and the load (random when absent; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Run the proxies with `durability: wal` and add kill -9 of one proxy
    /// (the log's replay must keep every buffered write).
    #[arg(long)]
    wal: bool,
    /// Run hostile clients next to the writers, in namespaces of their own:
    /// slow bodies, maximal bodies, colliding keys, wide minute spreads and
    /// strong top-K storms, against proxy 1 (the proxies get a 4 s body
    /// deadline).
    #[arg(long)]
    hostile: bool,
    /// Give every writer event an idempotency id and retry every failed
    /// request (same ids, either proxy) until it is acknowledged; the
    /// verdict is then exact: every counter holds what was acknowledged.
    #[arg(long)]
    ids: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    tally_proxy::config::parse_duration(s)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    eprintln!(
        "tally-chaos: seed {seed}, {:?} of faults, one every {:?}{}",
        args.duration,
        args.every,
        if args.hostile {
            ", hostile clients"
        } else {
            ""
        }
    );
    if args.ids {
        eprintln!("tally-chaos: events with ids, failures retried; exact verdict");
    }
    let proxy_bin = tally_integration::cargo_bin("tally-proxy", "tally-proxy");
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tally-chaos: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cfg = ChaosConfig {
        duration: args.duration,
        every: args.every,
        seed,
        proxy_bin,
        wal: args.wal,
        min_rounds: 0,
        hostile: args.hostile,
        ids: args.ids,
    };
    match rt.block_on(chaos::run(cfg)) {
        Ok(report) => {
            println!("{}", report.render());
            if report.ok() {
                println!("tally-chaos: PASS (seed {seed})");
                ExitCode::SUCCESS
            } else {
                let failures = report.lost.iter().chain(&report.doubled);
                for l in failures.chain(&report.problems).take(20) {
                    println!("  {l}");
                }
                println!("tally-chaos: FAIL (seed {seed})");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("tally-chaos: could not run: {e}");
            ExitCode::FAILURE
        }
    }
}
