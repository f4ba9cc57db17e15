//! The background health checks: one task per group of a freshly built
//! map probes its servers every `health.interval` (see
//! [`crate::storage::health`] for what a probe records). A task holds its
//! group weakly and ends when the shard map it belongs to is gone, so a
//! topology swap needs no explicit cancellation.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::storage::health::probe_group;
use crate::storage::shard_map::GroupHandle;

/// Probes `group` every `interval` until the group's map is dropped.
pub async fn run(group: Weak<GroupHandle>, interval: Duration, timeout: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(group) = group.upgrade() else { return };
        probe_group(&group, timeout).await;
    }
}

/// Spawns a checker per group of a freshly built map.
pub fn spawn(groups: &[Arc<GroupHandle>], interval: Duration, timeout: Duration) {
    for g in groups {
        tokio::spawn(run(Arc::downgrade(g), interval, timeout));
    }
}
