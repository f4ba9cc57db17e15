//! `cargo dev`: a complete local tally in the foreground.
//!
//! Spawns MariaDB groups (GTID + semi-sync replication) into a state
//! directory with the project's harness, writes the matching topology and
//! `proxy.yaml` there, runs the proxy in-process and prints one line when
//! everything is ready:
//!
//! `tally-dev ready http=<addr> admin=<addr> token=<token>`
//!
//! Ctrl-C or SIGTERM stops the proxy (which flushes everything pending) and
//! then the databases. The state directory is reused on the next start
//! (data kept) unless `--fresh`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use tally_harness::{Cluster, ClusterSpec};
use tally_proxy::config::Secret;
use tally_proxy::{Listeners, ProxyConfig};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(about = "Run a complete local tally: MariaDB groups + proxy")]
struct Args {
    /// Number of MariaDB groups (shards).
    #[arg(long, default_value_t = 2)]
    groups: usize,
    /// Replicas per group.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Data-plane listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Admin listen address.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin: SocketAddr,
    /// Where databases, topology.yaml and proxy.yaml live.
    #[arg(long, default_value = ".tally-dev")]
    state_dir: PathBuf,
    /// Wipe the state directory first.
    #[arg(long)]
    fresh: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tally_proxy::telemetry::init_logging("text");
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tally-dev: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let started = Instant::now();
    let token = std::env::var("TALLY_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)));
    // Bind first: a port in use should fail before minutes of database work.
    let http = TcpListener::bind(args.http)
        .await
        .map_err(|e| format!("cannot bind --http {}: {e}", args.http))?;
    let admin = TcpListener::bind(args.admin)
        .await
        .map_err(|e| format!("cannot bind --admin {}: {e}", args.admin))?;
    let (http_addr, admin_addr) = (
        http.local_addr().map_err(|e| e.to_string())?,
        admin.local_addr().map_err(|e| e.to_string())?,
    );

    std::fs::create_dir_all(&args.state_dir)
        .map_err(|e| format!("cannot create {}: {e}", args.state_dir.display()))?;
    let state_dir = args
        .state_dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", args.state_dir.display()))?;
    tracing::info!(groups = args.groups, replicas = args.replicas, dir = %state_dir.display(), "starting MariaDB");
    let cluster = Cluster::start(ClusterSpec {
        groups: args.groups,
        replicas: args.replicas,
        state_dir: Some(state_dir.join("mariadb")),
        fresh: args.fresh,
        ..ClusterSpec::default()
    })
    .await
    .map_err(|e| e.to_string())?;

    let topology_file = state_dir.join("topology.yaml");
    std::fs::write(&topology_file, cluster.topology_yaml(160)).map_err(|e| e.to_string())?;
    let proxy_yaml = state_dir.join("proxy.yaml");
    std::fs::write(
        &proxy_yaml,
        format!(
            "# Written by tally-dev; edit config/proxy.yaml for documented defaults.\n\
             listen:\n  http: {http_addr}\n  admin: {admin_addr}\ntopology:\n  file: topology.yaml\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut config = ProxyConfig::load(&proxy_yaml).map_err(|e| e.to_string())?;
    config.admin_token = Some(Secret(token.clone()));

    let proxy = tokio::spawn(tally_proxy::run(
        config,
        Listeners { http, admin },
        shutdown_signal(),
    ));
    wait_ready(http_addr, Duration::from_secs(60)).await?;
    tracing::info!(took_ms = started.elapsed().as_millis() as u64, "ready");
    println!("tally-dev ready http={http_addr} admin={admin_addr} token={token}");

    let result = match proxy.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("proxy task failed: {e}")),
    };
    tracing::info!("stopping MariaDB");
    cluster.shutdown().await;
    tracing::info!("stopped");
    result
}

async fn wait_ready(http: SocketAddr, within: Duration) -> Result<(), String> {
    let client = tally_integration::Client::new();
    let url = format!("http://{http}/readyz");
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok((200, _)) = client.get(&url).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("the proxy was not ready within {within:?}"))
}

async fn shutdown_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received: stopping the proxy (flushing), then MariaDB");
}
