//! `tally-proxy --config proxy.yaml`: the production binary. Thin on
//! purpose; everything testable lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tally_proxy::{Listeners, ProxyConfig, StartError};
use tokio::signal::unix::{SignalKind, signal};

/// mimalloc instead of glibc malloc: the request path allocates small,
/// short-lived objects from many threads, where glibc's free lists cost
/// about a fifth of the proxy's CPU (BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// tally: a sharded counting proxy over MariaDB.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of proxy.yaml (process settings; names the topology file).
    #[arg(long, env = "TALLY_CONFIG", default_value = "config/proxy.yaml")]
    config: PathBuf,
    /// Log format: `text` (readable) or `json`.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// Transparent huge pages off for this process (inherited by nothing: the
/// proxy spawns no programs). mimalloc asks for them (`madvise`), and then
/// each batch the flusher frees and the next one faults back in is zeroed
/// 2 MiB at a time: under ingest with ids that was ~15 % of the proxy's
/// CPU (`clear_page`, BENCHMARKS.md #22). Best effort, as most databases
/// recommend: a kernel without the flag leaves the default.
/// `tally-bench`'s proxy child does the same (`bench::target::child_main`).
fn no_transparent_huge_pages() {
    // SAFETY: prctl(2) with integer arguments only; it reads and writes
    // none of our memory.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

#[tokio::main]
async fn main() -> ExitCode {
    no_transparent_huge_pages();
    let args = Args::parse();
    tally_proxy::init_logging(&args.log_format);
    let config = match ProxyConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tally-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let listeners = match Listeners::bind(&config).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tally-proxy: {e}");
            return ExitCode::from(1);
        }
    };
    match tally_proxy::run(config, listeners, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        // Its own code, so a supervisor can tell "stopped, but something
        // was not committed" from a failure to start.
        Err(e @ StartError::Unflushed { .. }) => {
            eprintln!("tally-proxy: {e}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("tally-proxy: {e}");
            ExitCode::from(1)
        }
    }
}

/// Completes on the first SIGTERM or SIGINT. A second one exits at once:
/// the operator chose to give up on flushing (pending buffered events of
/// unreachable groups are then lost, and we say so).
async fn shutdown_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::error!(
            "second signal: exiting without finishing the flush; unflushed buffered events are lost"
        );
        std::process::exit(130);
    });
}
