//! Process wiring: load the topology, build the shard map, start flushers
//! and both listeners, and shut down in order.
//!
//! [`run`] takes already-bound listeners and a shutdown future (the
//! mini-redis shape), so tests bind port 0 and drive a real proxy
//! in-process. Shutdown order: stop being ready → stop accepting and finish
//! in-flight requests (those still running at `shutdown.drain_deadline`
//! are cut) → flush every pending aggregate → return.
//!
//! Under a service manager (`NOTIFY_SOCKET` set, systemd `Type=notify`)
//! the same steps are announced: `READY=1` once `/readyz` would answer 200
//! (topology applied, WAL replay waited for, with a store: the store read
//! once), `STOPPING=1` when the stop begins, `STATUS=` lines on the way
//! and, when the manager asks for it (`WATCHDOG_USEC`), `WATCHDOG=1`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tally_admin::{Invalid, TopologyDoc};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::app::App;
use crate::config::ProxyConfig;
use crate::control::topology::{self, ChangeError, Source};
use crate::control::{failover, heartbeat, reshard};
use crate::engine::{flusher, replay, retention, rollup};
use crate::http::{admin_api, api, serve};
use crate::notify::Notifier;
use crate::storage::shard_map::ShardMap;
use crate::storage::store::{Store, StoreError};
use crate::storage::wal::lives::OldLife;
use crate::storage::wal::{Wal, WalError};
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
    #[error("{listener} listener TLS: {problem}")]
    Tls {
        listener: &'static str,
        problem: String,
    },
    #[error("{0}")]
    Topology(ChangeError),
    #[error("{0}")]
    Wal(WalError),
    #[error(
        "the final flush did not finish within shutdown.flush_deadline ({deadline:?}); not committed: {groups}; {fate}"
    )]
    Unflushed {
        deadline: Duration,
        groups: String,
        fate: &'static str,
    },
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
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
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
    // rustls may be built with more than one crypto provider (a test
    // binary also links reqwest's); mysql_async's TLS needs one chosen.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = telemetry::install();
    telemetry::configured(telemetry::Bounds {
        max_pending_rows: config.buffer.max_pending_rows,
        commit_timeout: config.buffer.commit_timeout,
        max_replica_lag: config.reads.max_replica_lag,
        wal_max_bytes: config.wal.as_ref().map(|w| w.max_bytes),
    });
    let notifier = Notifier::from_env().map(Arc::new);
    // Pings until `run` returns, also when it fails to start.
    let _watchdog = AbortOnDrop(notifier.clone().and_then(|n| {
        let every = n.watchdog()?;
        Some(tokio::spawn(ping_watchdog(n, every)))
    }));
    let admin_addr = listeners.admin.local_addr().map_err(StartError::Serve)?;
    let http_addr = listeners.http.local_addr().map_err(StartError::Serve)?;
    let admin_token = admin_token(&config, admin_addr)?;
    let http_tls = listener_tls("http", config.http_tls.as_ref())?;
    let admin_tls = listener_tls("admin", config.admin_tls.as_ref())?;
    let _certificates = AbortOnDrop((http_tls.is_some() || admin_tls.is_some()).then(|| {
        tokio::spawn(reload_certificates(
            [("http", http_tls.clone()), ("admin", admin_tls.clone())],
            config.topology_watch_interval,
        ))
    }));
    let app = App::new(config, ShardMap::empty(), metrics, admin_token);
    let _ = app
        .addrs
        .set((http_addr.to_string(), admin_addr.to_string()));
    tracing::info!(writer_id = %app.writer_id, "proxy starting");
    let status = |text: &str| {
        if let Some(n) = &notifier {
            n.send(&[("STATUS", text)]);
        }
    };
    status("starting: applying the topology");
    let earlier_lives = open_wal(&app)?;
    apply_first_topology(&app).await?;
    let background = Background::spawn(&app);
    // The admin listener drains only after the final flush, so a stop
    // held up by a dead master can be rescued by a promotion.
    let (http_drain, http_drain_rx) = watch::channel(false);
    let (admin_drain, admin_drain_rx) = watch::channel(false);
    let http = tokio::spawn(serve::serve(
        listeners.http,
        serve::Routes {
            router: api::router(app.clone()),
            shortcut: Some(api::counter_shortcut(app.clone())),
        },
        app.config.connections.clone(),
        Some(app.config.shutdown.drain_deadline),
        "http",
        http_tls,
        http_drain_rx,
    ));
    let admin = tokio::spawn(serve::serve(
        listeners.admin,
        serve::Routes {
            router: admin_api::router(app.clone()),
            shortcut: None,
        },
        app.config.connections.clone(),
        // Drained after the final flush, which it may be needed for (a
        // promotion), and bounded by shutdown.flush_deadline instead.
        None,
        "admin",
        admin_tls,
        admin_drain_rx,
    ));
    if !earlier_lives.is_empty() {
        status("starting: replaying earlier lives' write-ahead logs");
    }
    let replay = start_replay(&app, earlier_lives).await;
    app.set_ready(true);
    tracing::info!(http = %http_addr, admin = %admin_addr, version = app.map.load().version(), "proxy ready");
    let announcer = notifier
        .clone()
        .map(|n| tokio::spawn(announce_readiness(app.clone(), n)));

    shutdown.await;
    tracing::info!(deadline = ?app.config.shutdown.drain_deadline, "shutting down: draining data requests");
    // No READY=1 or ready STATUS after STOPPING=1.
    if let Some(announcer) = announcer {
        announcer.abort();
        let _ = announcer.await;
    }
    if let Some(n) = &notifier {
        n.send(&[
            ("STOPPING", "1"),
            ("STATUS", "stopping: draining data requests"),
        ]);
    }
    app.set_ready(false);
    let _ = http_drain.send(true);
    join_listener(http).await;
    // No reload or replay may race the final flush.
    background.sighup.abort();
    replay.abort();
    status("stopping: flushing pending aggregates");
    let flushed = final_flush(&app).await;
    let _ = admin_drain.send(true);
    join_listener(admin).await;
    background.join().await;
    flushed?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Sends `READY=1` the first time the proxy is ready as `/readyz` sees it
/// ([`App::is_ready`]), and a `STATUS=` line whenever readiness or the
/// topology version changes (`systemctl status` shows it). Polls: readiness
/// is a few atomics that other tasks flip (the store follower, the WAL).
async fn announce_readiness(app: Arc<App>, notifier: Arc<Notifier>) {
    let mut sent_ready = false;
    let mut shown: Option<(bool, u64)> = None;
    loop {
        let now = (app.is_ready(), app.map.load().version());
        if shown != Some(now) {
            let (ready, version) = now;
            if ready {
                let status = format!("ready: topology version {version}");
                if sent_ready {
                    notifier.send(&[("STATUS", &status)]);
                } else {
                    notifier.send(&[("READY", "1"), ("STATUS", &status)]);
                    sent_ready = true;
                }
            } else {
                let status = format!("not ready: {}", not_ready_reason(&app));
                notifier.send(&[("STATUS", &status)]);
            }
            shown = Some(now);
        }
        let pause = if sent_ready { 500 } else { 50 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// Why [`App::is_ready`] says no, in words for `STATUS=`.
fn not_ready_reason(app: &App) -> &'static str {
    if app.wal().is_some_and(|w| w.failed()) {
        "the write-ahead log failed (see the log); restart once the disk is fixed"
    } else if app.store.is_some() && !app.store_lease.ever_synced() {
        "waiting to read the topology store (routing by the file meanwhile, refusing writes)"
    } else {
        "starting"
    }
}

/// `WATCHDOG=1` every `every` (half of `WATCHDOG_USEC`) until aborted at
/// the end of `run`: a runtime that no longer runs its tasks stops pinging.
async fn ping_watchdog(notifier: Arc<Notifier>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        notifier.send(&[("WATCHDOG", "1")]);
    }
}

/// A listener's HTTPS, if configured: its certificate read now, a
/// problem stops the start.
fn listener_tls(
    listener: &'static str,
    config: Option<&crate::config::TlsConfig>,
) -> Result<Option<Arc<serve::ListenerTls>>, StartError> {
    let Some(config) = config else {
        return Ok(None);
    };
    let tls =
        serve::ListenerTls::new(config).map_err(|problem| StartError::Tls { listener, problem })?;
    tracing::info!(listener, cert = %config.cert.display(), "serving HTTPS");
    Ok(Some(tls))
}

/// Reloads the listeners' certificates on SIGHUP (always) and when their
/// files change (checked every `every`, the topology file's interval). New
/// handshakes get the new certificate; open connections keep theirs. A
/// certificate that does not load is logged and the previous one kept.
async fn reload_certificates(
    listeners: [(&'static str, Option<Arc<serve::ListenerTls>>); 2],
    every: Duration,
) {
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let force = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async { hup.as_mut()?.recv().await } => true,
        };
        for (listener, tls) in &listeners {
            let Some(tls) = tls else { continue };
            match tls.reload(force) {
                Ok(true) => {
                    tracing::info!(listener, cert = %tls.config().cert.display(), "TLS certificate reloaded")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(listener, error = %e, "TLS certificate not reloaded; still serving the previous one")
                }
            }
        }
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(Option<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

async fn join_listener(server: JoinHandle<()>) {
    if let Err(e) = server.await {
        tracing::error!(error = %e, "listener task failed");
    }
}

/// The admin bearer token; none is allowed only on a loopback listener
/// (with a warning).
fn admin_token(config: &ProxyConfig, admin_addr: SocketAddr) -> Result<Option<String>, StartError> {
    let token = config.admin_token.as_ref().map(|t| t.expose().to_owned());
    if token.is_none() {
        if !admin_addr.ip().is_loopback() {
            return Err(StartError::NoAdminToken {
                addr: admin_addr,
                env: config.admin_token_env.clone(),
            });
        }
        tracing::warn!(env = %config.admin_token_env, "no admin token set: the loopback admin API is open to local users");
    }
    Ok(token)
}

/// Opens the write-ahead log (`durability: wal`) before any write can be
/// accepted, and returns the earlier lives found in its directory (they
/// are replayed once the topology is known).
fn open_wal(app: &App) -> Result<Vec<OldLife>, StartError> {
    let Some(cfg) = &app.config.wal else {
        return Ok(Vec::new());
    };
    let (wal, old) = Wal::open(cfg, &app.writer_id).map_err(StartError::Wal)?;
    tracing::info!(dir = %cfg.dir.display(), earlier_lives = old.len(), "durability: wal (buffered acks wait for fsync)");
    let _ = app.wal_log.set(wal);
    Ok(old)
}

/// Startup is a topology change from the empty map: the same path as a
/// reload (schema, health probe, flushers). With a shared store, the
/// store's newest version wins; the file only seeds an empty store (or
/// stands in while the store is unreachable: then the proxy is not ready
/// and refuses writes until it has read the store, see `App::is_ready`).
/// Writes start once the first heartbeat is recorded and the store read
/// after it (`control::heartbeat`), so that no reshard can start copying
/// without waiting for this proxy.
async fn apply_first_topology(app: &Arc<App>) -> Result<(), StartError> {
    let path = app.config.topology_file.clone();
    let from_file = || -> Result<TopologyDoc, StartError> {
        let text = std::fs::read_to_string(&path).map_err(|source| StartError::TopologyRead {
            path: path.clone(),
            source,
        })?;
        topology::parse_doc(&text).map_err(|e| StartError::topology(&path, e))
    };
    let mut seed = false;
    let doc = match &app.store {
        None => from_file()?,
        Some(store) => match store_latest(store).await {
            Ok(Some((version, text))) => {
                let mut doc =
                    topology::parse_doc(&text).map_err(|e| StartError::topology(&path, e))?;
                doc.version = version;
                doc
            }
            Ok(None) => {
                seed = true;
                from_file()?
            }
            Err(e) => {
                tracing::warn!(error = %e, "topology store unreachable at start; routing by the file meanwhile, but not ready and refusing writes (503 store_unreachable) until the store has been read");
                from_file()?
            }
        },
    };
    let applied = topology::apply(app, doc, Source::Startup, None)
        .await
        .map_err(|e| StartError::topology(&path, e))?;
    if seed && let Some(store) = &app.store {
        seed_store(app, store, applied.version).await;
    }
    Ok(())
}

/// The store's newest topology version and text, creating its tables
/// first.
async fn store_latest(store: &Store) -> Result<Option<(u64, String)>, StoreError> {
    store.init().await?;
    store.latest().await
}

/// Writes the file's topology as the store's first version; when another
/// proxy seeded first, follows it instead.
async fn seed_store(app: &Arc<App>, store: &Store, version: u64) {
    let yaml = app.map.load().topology.to_yaml();
    match store.insert(version, &yaml, "seed", &app.writer_id).await {
        Ok(()) => tracing::info!(version, "seeded the topology store from the file"),
        Err(_) => {
            let _ = topology::follow_store(app).await;
        }
    }
}

/// The tasks that run beside the listeners until the stop signal.
struct Background {
    retention: JoinHandle<()>,
    rollup: JoinHandle<()>,
    watcher: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
    reshard: JoinHandle<()>,
    sighup: JoinHandle<()>,
    auto_failover: Option<JoinHandle<()>>,
}

impl Background {
    fn spawn(app: &Arc<App>) -> Background {
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
        Background {
            retention: tokio::spawn(retention::run(app.clone(), app.stop_signal())),
            rollup: tokio::spawn(rollup::run(app.clone(), app.stop_signal())),
            watcher,
            heartbeat: tokio::spawn(heartbeat::run(app.clone(), app.stop_signal())),
            reshard: tokio::spawn(reshard::driver::run(app.clone(), app.stop_signal())),
            sighup: tokio::spawn(reload_on_sighup(app.clone())),
            auto_failover: app
                .config
                .failover
                .auto
                .then(|| tokio::spawn(failover::auto(app.clone(), app.stop_signal()))),
        }
    }

    /// Waits for the tasks that end on the stop signal (sent by the final
    /// flush); the SIGHUP listener never ends by itself and is aborted.
    async fn join(self) {
        self.sighup.abort();
        let tasks = [
            self.retention,
            self.rollup,
            self.watcher,
            self.heartbeat,
            self.reshard,
        ];
        for task in tasks.into_iter().chain(self.auto_failover) {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "background task failed");
            }
        }
    }
}

/// Replays earlier lives' logs; with a log, waits up to `wal.replay_wait`
/// before serving so that replayed counts are usually visible at once.
async fn start_replay(app: &Arc<App>, lives: Vec<OldLife>) -> JoinHandle<()> {
    let mut replay = tokio::spawn(replay::run(app.clone(), lives));
    if let Some(cfg) = &app.config.wal
        && tokio::time::timeout(cfg.replay_wait, &mut replay)
            .await
            .is_err()
    {
        tracing::warn!(
            "the write-ahead-log replay is still running; serving meanwhile (replayed counts appear once it is done)"
        );
    }
    replay
}

/// Stops the flushers after everything pending committed, then closes
/// the log (deleted when nothing is left to replay).
/// Within `shutdown.flush_deadline` when one is set; past it, the error
/// names what was not committed (kept in the log with `durability: wal`).
async fn final_flush(app: &App) -> Result<(), StartError> {
    let pending: usize = app.groups().iter().map(|g| g.buffer.pending()).sum();
    tracing::info!(
        pending,
        "flushing pending aggregates (the admin listener serves until this is done)"
    );
    let deadline = app.config.shutdown.flush_deadline;
    let done = match deadline {
        None => {
            flusher::stop_all(app).await;
            true
        }
        Some(d) => tokio::time::timeout(d, flusher::stop_all(app))
            .await
            .is_ok(),
    };
    if let Some(wal) = app.wal_log.get().cloned() {
        let committed = app.groups().iter().all(|g| g.buffer.pending() == 0);
        let _ = tokio::task::spawn_blocking(move || wal.close(committed)).await;
    }
    match deadline {
        Some(deadline) if !done => {
            let unflushed: Vec<String> = app
                .groups()
                .iter()
                .filter(|g| g.buffer.pending() > 0)
                .map(|g| format!("{} ({} entries)", g.name, g.buffer.pending()))
                .collect();
            let fate = if app.wal().is_some() {
                "they stay in the write-ahead log and are replayed at the next start"
            } else {
                "without a write-ahead log they are lost"
            };
            Err(StartError::Unflushed {
                deadline,
                groups: unflushed.join(", "),
                fate,
            })
        }
        _ => Ok(()),
    }
}
