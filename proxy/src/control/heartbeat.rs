//! This proxy's row in the shared store's registry, refreshed in the
//! background: other proxies and the reshard driver read it to know who is
//! alive, which version it runs and whether its routing change settled.
//! Each recorded heartbeat renews this proxy's [`StoreLease`]; a lapsed
//! lease fences writes until the store has been read again.
//!
//! [`StoreLease`]: crate::storage::store::StoreLease

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::app::App;
use crate::control::topology;
use crate::telemetry;

/// How often the lease is checked for a lapse (the log line and the gauge;
/// writes check it themselves).
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// Refreshes this proxy's registry row every `topology.heartbeat_interval`
/// (counted from one heartbeat's sending to the next, so a slow answer does
/// not stretch the period) until `stop`, and reports the lease's state.
pub async fn run(app: Arc<App>, stop: watch::Receiver<bool>) {
    if app.store.is_none() {
        return;
    }
    telemetry::store_fenced(true);
    tokio::join!(beat(&app, stop.clone()), check(&app, stop));
}

async fn beat(app: &Arc<App>, mut stop: watch::Receiver<bool>) {
    let Some(store) = &app.store else { return };
    let mut every = tokio::time::interval(app.config.heartbeat_interval);
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return,
        }
        let (http, admin) = app.addrs.get().cloned().unwrap_or_default();
        let pending: usize = app.groups().iter().map(|g| g.buffer.pending()).sum();
        let sent = Instant::now();
        let recorded = store
            .heartbeat(
                &app.writer_id,
                &http,
                &admin,
                app.map.load().version(),
                pending as u64,
                app.settled.load(Ordering::Acquire),
            )
            .await;
        match recorded {
            Ok(()) => {
                // After a lapse (or at start) the store is read at once
                // rather than at the next poll, so writes resume sooner.
                if app.store_lease.heartbeat_recorded(sent)
                    && let Err(e) = topology::follow_store(app).await
                {
                    tracing::debug!(error = %e, "cannot read the topology store after a heartbeat");
                }
            }
            Err(e) => tracing::debug!(error = %e, "heartbeat not recorded"),
        }
        app.store_lease.report();
    }
}

/// Notices a lapse between heartbeats (a hung one included).
async fn check(app: &App, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = stop.changed() => return,
        }
        app.store_lease.report();
    }
}
