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

use std::sync::Arc;

use tally_admin::Invalid;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::App;
use crate::config::ProxyConfig;
use crate::control::topology::{self, ChangeError, Source};
use crate::http::{admin_api, api, serve};
use crate::storage::shard_map::ShardMap;
use crate::telemetry;

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
    #[error("{0}")]
    Topology(ChangeError),
    #[error("{0}")]
    Wal(crate::storage::wal::WalError),
}

impl StartError {
    fn topology(path: &Path, e: ChangeError) -> StartError {
        match e {
            ChangeError::Invalid(invalid) => StartError::TopologyInvalid {
                path: path.to_owned(),
                invalid,
            },
            other => StartError::Topology(other),
        }
    }
}

/// SIGHUP re-reads the topology file, as operators expect of a daemon.
async fn reload_on_sighup(app: Arc<App>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot install a SIGHUP handler; use POST /admin/v1/reload");
        return;
    };
    while hup.recv().await.is_some() {
        match topology::reload(&app).await {
            Ok(a) => tracing::info!(
                version = a.version,
                changed = a.changed,
                "SIGHUP: topology reloaded"
            ),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: topology change rejected; still running the previous topology")
            }
        }
    }
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
    let topology_path = config.topology_file.clone();
    let read_file = || {
        std::fs::read_to_string(&topology_path).map_err(|source| StartError::TopologyRead {
            path: topology_path.clone(),
            source,
        })
    };
    let http_addr = listeners.http.local_addr().map_err(StartError::Serve)?;
    let app = App::new(config, ShardMap::empty(), metrics, admin_token);
    let _ = app
        .addrs
        .set((http_addr.to_string(), admin_addr.to_string()));
    tracing::info!(writer_id = %app.writer_id, "proxy starting");
    // The log opens before any write can be accepted; earlier lives found
    // in its directory are replayed once the topology is known.
    let earlier_lives = match &app.config.wal {
        Some(cfg) => {
            let (wal, old) =
                crate::storage::wal::Wal::open(cfg, &app.writer_id).map_err(StartError::Wal)?;
            tracing::info!(dir = %cfg.dir.display(), earlier_lives = old.len(), "durability: wal (buffered acks wait for fsync)");
            let _ = app.wal_log.set(wal);
            old
        }
        None => Vec::new(),
    };
    // Startup is a topology change from the empty map: the same path as a
    // reload (schema, health probe, flushers). With a shared store, the
    // store's newest version wins; the file only seeds an empty store (or
    // stands in while the store is unreachable).
    let mut seed = false;
    let doc = match &app.store {
        Some(store) => match async {
            store.init().await?;
            store.latest().await
        }
        .await
        {
            Ok(Some((version, text))) => {
                let mut doc = topology::parse_doc(&text)
                    .map_err(|e| StartError::topology(&topology_path, e))?;
                doc.version = version;
                doc
            }
            Ok(None) => {
                seed = true;
                topology::parse_doc(&read_file()?)
                    .map_err(|e| StartError::topology(&topology_path, e))?
            }
            Err(e) => {
                tracing::warn!(error = %e, "topology store unreachable at start; starting from the file and following the store once it answers");
                topology::parse_doc(&read_file()?)
                    .map_err(|e| StartError::topology(&topology_path, e))?
            }
        },
        None => topology::parse_doc(&read_file()?)
            .map_err(|e| StartError::topology(&topology_path, e))?,
    };
    let applied = topology::apply(&app, doc, Source::Startup, None)
        .await
        .map_err(|e| StartError::topology(&topology_path, e))?;
    if seed && let Some(store) = &app.store {
        let yaml = app.map.load().topology.to_yaml();
        match store
            .insert(applied.version, &yaml, "seed", &app.writer_id)
            .await
        {
            Ok(()) => tracing::info!(
                version = applied.version,
                "seeded the topology store from the file"
            ),
            // Another proxy seeded first: follow it.
            Err(_) => {
                let _ = topology::follow_store(&app).await;
            }
        }
    }
    let retention = tokio::spawn(crate::engine::retention::run(
        app.clone(),
        app.stop_signal(),
    ));
    let watcher = if app.store.is_some() {
        tokio::spawn(topology::watch_store(
            app.clone(),
            app.config.store_poll_interval,
            app.stop_signal(),
        ))
    } else {
        tokio::spawn(topology::watch_file(
            app.clone(),
            app.config.topology_watch_interval,
            app.stop_signal(),
        ))
    };
    let heartbeat = tokio::spawn(crate::control::heartbeat::run(
        app.clone(),
        app.stop_signal(),
    ));
    let reshard = tokio::spawn(crate::control::reshard::driver::run(
        app.clone(),
        app.stop_signal(),
    ));
    let sighup = tokio::spawn(reload_on_sighup(app.clone()));
    let auto_failover = app.config.failover.auto.then(|| {
        tokio::spawn(crate::control::failover::auto(
            app.clone(),
            app.stop_signal(),
        ))
    });

    let (drain_tx, drain_rx) = watch::channel(false);
    let limits = &app.config.connections;
    let http = tokio::spawn(serve::serve(
        listeners.http,
        serve::Routes {
            router: api::router(app.clone()),
            shortcut: Some(api::incr_shortcut(app.clone())),
        },
        limits.clone(),
        "http",
        drain_rx.clone(),
    ));
    let admin = tokio::spawn(serve::serve(
        listeners.admin,
        serve::Routes {
            router: admin_api::router(app.clone()),
            shortcut: None,
        },
        limits.clone(),
        "admin",
        drain_rx,
    ));
    let mut replay = tokio::spawn(crate::engine::replay::run(app.clone(), earlier_lives));
    if let Some(cfg) = &app.config.wal
        && tokio::time::timeout(cfg.replay_wait, &mut replay)
            .await
            .is_err()
    {
        tracing::warn!(
            "the write-ahead-log replay is still running; serving meanwhile (replayed counts appear once it is done)"
        );
    }
    app.set_ready(true);
    tracing::info!(http = %http_addr, admin = %admin_addr, version = app.map.load().version(), "proxy ready");

    shutdown.await;
    tracing::info!("shutting down: draining requests");
    app.set_ready(false);
    let _ = drain_tx.send(true);
    for server in [http, admin] {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "listener task failed");
        }
    }
    let pending: usize = app.groups().iter().map(|g| g.buffer.pending()).sum();
    tracing::info!(pending, "flushing pending aggregates");
    sighup.abort();
    replay.abort();
    crate::engine::flusher::stop_all(&app).await;
    if let Some(wal) = app.wal_log.get().cloned() {
        let committed = app.groups().iter().all(|g| g.buffer.pending() == 0);
        let _ = tokio::task::spawn_blocking(move || wal.close(committed)).await;
    }
    for task in [retention, watcher, heartbeat, reshard]
        .into_iter()
        .chain(auto_failover)
    {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "background task failed");
        }
    }
    tracing::info!("stopped cleanly");
    Ok(())
}
