//! `cargo dev`: a complete local tally in the foreground.
//!
//! Spawns MariaDB groups (GTID + semi-sync replication) into a state
//! directory with the project's harness, writes the matching topology and
//! `proxy.yaml` there, runs the proxy in-process and prints one line when
//! everything is ready:
//!
//! `tally-dev ready http=<addr> admin=<addr> token=<token>`
//!
//! With `--proxies N` the addresses are comma-separated lists, proxy i on
//! the i-th of each, all sharing a topology store.
//!
//! With `--tls` a throwaway CA and a certificate for 127.0.0.1/localhost
//! are written to `<state-dir>/mariadb/tls/` (kept with the state
//! directory), the MariaDB servers serve TLS with them, the proxy's DSNs
//! ask for `ssl_mode=verify_identity` with that CA, both listeners serve
//! HTTPS with the same certificate, and the ready line ends with
//! `ca=<path>` (for `curl --cacert` and `tallyctl --ca`).
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
    /// Run this many proxies on consecutive ports (from --http and --admin),
    /// sharing a topology store in the `tally_meta` database of g0's master.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    proxies: u16,
    /// Durable buffered acks (`durability: wal`): each proxy logs accepted
    /// writes to `<state-dir>/wal[-i]` and replays them after a crash.
    #[arg(long)]
    wal: bool,
    /// TLS everywhere: MariaDB serves TLS, the proxy verifies it
    /// (`ssl_mode=verify_identity`), both listeners serve HTTPS; the ready
    /// line adds `ca=<path>` of the throwaway CA.
    #[arg(long)]
    tls: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tally_proxy::init_logging("text");
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
    // Proxy i listens on the i-th port after --http and --admin (port 0:
    // each picks a free one).
    let nth = |base: SocketAddr, i: u16| {
        let port = if base.port() == 0 { 0 } else { base.port() + i };
        SocketAddr::new(base.ip(), port)
    };
    let mut listeners = Vec::new();
    for i in 0..args.proxies {
        let (h, a) = (nth(args.http, i), nth(args.admin, i));
        let http = TcpListener::bind(h)
            .await
            .map_err(|e| format!("cannot bind --http {h}: {e}"))?;
        let admin = TcpListener::bind(a)
            .await
            .map_err(|e| format!("cannot bind --admin {a}: {e}"))?;
        listeners.push((http, admin));
    }
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
        tls: args.tls,
        ..ClusterSpec::default()
    })
    .await
    .map_err(|e| e.to_string())?;

    let topology_file = state_dir.join("topology.yaml");
    std::fs::write(&topology_file, cluster.topology_yaml(160)).map_err(|e| e.to_string())?;
    // Several proxies share one topology store (on g0's master); the
    // store is reseeded from the fresh topology on every start, since the
    // servers' ports may have changed.
    let store = (args.proxies > 1).then(|| {
        format!(
            "{}{}",
            cluster.group(0).master.root_dsn("tally_meta"),
            cluster.tls_query()
        )
    });
    let tls = cluster.tls().cloned();
    let tls_lines = tls
        .as_ref()
        .map(|t| {
            format!(
                "  tls:\n    cert: {}\n    key: {}\n",
                t.cert.display(),
                t.key.display()
            )
        })
        .unwrap_or_default();
    let client = match &tls {
        Some(t) => {
            let pem = std::fs::read(&t.ca).map_err(|e| format!("{}: {e}", t.ca.display()))?;
            tally_integration::Client::with_ca(&pem)
        }
        None => tally_integration::Client::new(),
    };
    if store.is_some() {
        cluster
            .group(0)
            .master
            .exec("DROP DATABASE IF EXISTS tally_meta")
            .await
            .map_err(|e| e.to_string())?;
    }
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut proxies = Vec::new();
    let (mut https, mut admins) = (Vec::new(), Vec::new());
    for (i, (http, admin)) in listeners.into_iter().enumerate() {
        let (http_addr, admin_addr) = (
            http.local_addr().map_err(|e| e.to_string())?,
            admin.local_addr().map_err(|e| e.to_string())?,
        );
        let name = if args.proxies > 1 {
            format!("proxy-{i}.yaml")
        } else {
            "proxy.yaml".to_owned()
        };
        let proxy_yaml = state_dir.join(name);
        let store_line = store
            .as_ref()
            .map(|dsn| format!("  store: {dsn}\n"))
            .unwrap_or_default();
        let wal_lines = if !args.wal {
            String::new()
        } else if args.proxies > 1 {
            format!("durability: wal\nwal:\n  dir: wal-{i}\n")
        } else {
            "durability: wal\nwal:\n  dir: wal\n".to_owned()
        };
        std::fs::write(
            &proxy_yaml,
            format!(
                "# Written by tally-dev; edit config/proxy.yaml for documented defaults.\n\
                 listen:\n  http: {http_addr}\n  admin: {admin_addr}\n{tls_lines}topology:\n  file: topology.yaml\n{store_line}{wal_lines}"
            ),
        )
        .map_err(|e| e.to_string())?;
        let mut config = ProxyConfig::load(&proxy_yaml).map_err(|e| e.to_string())?;
        config.admin_token = Some(Secret(token.clone()));
        let mut stopped = stop.subscribe();
        proxies.push(tokio::spawn(tally_proxy::run(
            config,
            Listeners { http, admin },
            async move {
                let _ = stopped.recv().await;
            },
        )));
        https.push(http_addr.to_string());
        admins.push(admin_addr.to_string());
        // The first proxy seeds the store; the others then follow it.
        let scheme = if tls.is_some() { "https" } else { "http" };
        let ready = format!("{scheme}://{http_addr}/readyz");
        wait_ready(&client, &ready, Duration::from_secs(60)).await?;
    }
    tracing::info!(took_ms = started.elapsed().as_millis() as u64, "ready");
    // SPEC §7: extra fields may follow; the first three stay first.
    let ca_field = tls
        .as_ref()
        .map(|t| format!(" ca={}", t.ca.display()))
        .unwrap_or_default();
    println!(
        "tally-dev ready http={} admin={} token={token}{ca_field}",
        https.join(","),
        admins.join(",")
    );

    shutdown_signal().await;
    let _ = stop.send(());
    let mut result = Ok(());
    for proxy in proxies {
        let r = match proxy.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("proxy task failed: {e}")),
        };
        result = result.and(r);
    }
    tracing::info!("stopping MariaDB");
    cluster.shutdown().await;
    tracing::info!("stopped");
    result
}

async fn wait_ready(
    client: &tally_integration::Client,
    url: &str,
    within: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok((200, _)) = client.get(url).await {
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
