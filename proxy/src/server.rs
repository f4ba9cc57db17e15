//! Process wiring: load the topology, build the shard map, start flushers
//! and both listeners, and shut down in order.
//!
//! [`run`] takes already-bound listeners and a shutdown future (the
//! mini-redis shape), so tests bind port 0 and drive a real proxy
//! in-process. Shutdown order: stop being ready → stop accepting and finish
//! in-flight requests → flush every pending aggregate → return.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tally_admin::{Invalid, Topology, TopologyDoc};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::App;
use crate::config::ProxyConfig;
use crate::shard_map::ShardMap;
use crate::{admin_api, api, flusher, telemetry};

/// The two listeners of a proxy, bound by the caller.
pub struct Listeners {
    pub http: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the configured addresses.
    pub async fn bind(cfg: &ProxyConfig) -> Result<Listeners, StartError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        Ok(Listeners {
            http: bind(cfg.http_addr).await?,
            admin: bind(cfg.admin_addr).await?,
        })
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read topology file {path}: {source}")]
    TopologyRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid topology file {path}: {invalid}")]
    TopologyInvalid { path: PathBuf, invalid: Invalid },
    #[error(
        "the admin listener {addr} is not loopback and no admin token is set: export {env} (or bind the admin listener to 127.0.0.1)"
    )]
    NoAdminToken { addr: SocketAddr, env: String },
    #[error("listener failed: {0}")]
    Serve(std::io::Error),
}

/// Reads and validates the topology file.
pub fn load_topology(path: &Path) -> Result<Topology, StartError> {
    let text = std::fs::read_to_string(path).map_err(|source| StartError::TopologyRead {
        path: path.to_owned(),
        source,
    })?;
    TopologyDoc::parse_and_validate(&text).map_err(|invalid| StartError::TopologyInvalid {
        path: path.to_owned(),
        invalid,
    })
}

/// Runs a proxy until `shutdown` completes, then drains and flushes.
pub async fn run(
    config: ProxyConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let metrics = telemetry::install();
    let admin_addr = listeners.admin.local_addr().map_err(StartError::Serve)?;
    let admin_token = config.admin_token.as_ref().map(|t| t.expose().to_owned());
    if admin_token.is_none() {
        if !admin_addr.ip().is_loopback() {
            return Err(StartError::NoAdminToken {
                addr: admin_addr,
                env: config.admin_token_env.clone(),
            });
        }
        tracing::warn!(env = %config.admin_token_env, "no admin token set: the loopback admin API is open to local users");
    }
    let topology = load_topology(&config.topology_file)?;
    telemetry::topology_version(topology.version);
    let map = ShardMap::build(topology, &config, None);
    let app = App::new(config, map, metrics, admin_token);
    tracing::info!(writer_id = %app.writer_id, "proxy starting");

    // Schema on every master; a master that is down now gets it before its
    // group's first flush.
    let connect_timeout = app.config.pool.connect_timeout;
    let groups = app.groups();
    let schema = groups.iter().map(|g| async move {
        if let Err(e) = g.ensure_schema(connect_timeout).await {
            tracing::warn!(group = %g.name, master = %g.master.dsn, error = %e, "cannot apply the schema now; will retry before the first flush");
        }
    });
    futures::future::join_all(schema).await;
    // One probe round before serving, so the first reads already know which
    // replicas are eligible; then a checker per group.
    let health = &app.config.health;
    futures::future::join_all(
        groups
            .iter()
            .map(|g| crate::health::probe_group(g, health.timeout)),
    )
    .await;
    crate::health::spawn(&groups, health.interval, health.timeout);

    let (stop_flushers, stop_rx) = watch::channel(false);
    let flushers: Vec<_> = groups
        .iter()
        .map(|g| tokio::spawn(flusher::run(app.clone(), g.buffer.clone(), stop_rx.clone())))
        .collect();
    let retention = tokio::spawn(crate::retention::run(app.clone(), stop_rx.clone()));

    let (drain_tx, drain_rx) = watch::channel(false);
    let drained = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|d| *d).await;
    };
    let http_addr = listeners.http.local_addr().map_err(StartError::Serve)?;
    let http = tokio::spawn(
        axum::serve(listeners.http, api::router(app.clone()))
            .with_graceful_shutdown(drained(drain_rx.clone()))
            .into_future(),
    );
    let admin = tokio::spawn(
        axum::serve(listeners.admin, admin_api::router(app.clone()))
            .with_graceful_shutdown(drained(drain_rx))
            .into_future(),
    );
    app.set_ready(true);
    tracing::info!(http = %http_addr, admin = %admin_addr, version = app.map.load().version(), "proxy ready");

    shutdown.await;
    tracing::info!("shutting down: draining requests");
    app.set_ready(false);
    let _ = drain_tx.send(true);
    for server in [http, admin] {
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "listener failed"),
            Err(e) => tracing::error!(error = %e, "listener task failed"),
        }
    }
    tracing::info!(
        pending = groups.iter().map(|g| g.buffer.pending()).sum::<usize>(),
        "flushing pending aggregates"
    );
    let _ = stop_flushers.send(true);
    for f in flushers.into_iter().chain([retention]) {
        if let Err(e) = f.await {
            tracing::error!(error = %e, "flusher task failed");
        }
    }
    tracing::info!("stopped cleanly");
    Ok(())
}
