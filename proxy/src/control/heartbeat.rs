//! This proxy's row in the shared store's registry, refreshed in the
//! background: other proxies and the reshard driver read it to know who is
//! alive, which version it runs and whether its routing change settled.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;

use crate::app::App;

/// Refreshes this proxy's registry row every `topology.heartbeat_interval`
/// until `stop`.
pub async fn run(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let Some(store) = &app.store else { return };
    loop {
        let (http, admin) = app.addrs.get().cloned().unwrap_or_default();
        let pending: usize = app.groups().iter().map(|g| g.buffer.pending()).sum();
        if let Err(e) = store
            .heartbeat(
                &app.writer_id,
                &http,
                &admin,
                app.map.load().version(),
                pending as u64,
                app.settled.load(Ordering::Acquire),
            )
            .await
        {
            tracing::debug!(error = %e, "heartbeat not recorded");
        }
        tokio::select! {
            _ = tokio::time::sleep(app.config.heartbeat_interval) => {}
            _ = stop.changed() => return,
        }
    }
}
