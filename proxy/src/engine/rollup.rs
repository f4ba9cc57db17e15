//! The rollup task: every `rollup.interval`, each group's master rolls up
//! the closed hours behind its watermark into hour and day rows, one
//! transaction per hour (`storage::rollup::step`), until it is
//! `rollup.delay` past the last whole hour.
//!
//! Every proxy runs it for every group: a step checks under an exclusive
//! lock that the watermark did not move since it read it, so a second
//! roller of the same group commits nothing, and a step interrupted by a
//! kill or a failover rolls back and is redone. Groups are handled
//! concurrently, each bounded in time ([`each_group`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::app::App;
use crate::domain::clock::unix_now;
use crate::domain::planner::floor;
use crate::engine::each_group::each_group;
use crate::storage::db;
use crate::storage::rollup::{self, RollupError};
use crate::storage::shard_map::GroupHandle;
use crate::telemetry;

/// Steps one look takes per group at most, so a group far behind (a
/// database migrated from schema version 1, a long outage) catches up
/// over a few looks without holding one connection for long.
const STEPS_PER_LOOK: usize = 48;

/// Runs looks every `rollup.interval`, the first at start (a restarted
/// proxy catches up at once), until `stop` turns true.
pub async fn run(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    if !app.config.rollup.enabled {
        let _ = stop.changed().await;
        return;
    }
    loop {
        tokio::select! {
            _ = look(&app) => {}
            _ = stop.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(app.config.rollup.interval) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One look at every group: the steps committed per group (`None` where
/// a step failed).
pub async fn look(app: &App) -> Vec<(String, Option<usize>)> {
    each_group(
        app,
        "rollup step",
        telemetry::rollup_failed,
        |g| async move { group_look(app, &g).await },
    )
    .await
}

/// The end of the last hour that ended at least `delay` before `now`.
pub fn closed_limit(now: i64, delay: Duration) -> i64 {
    floor(now.saturating_sub(delay.as_secs() as i64), 3600)
}

/// Up to [`STEPS_PER_LOOK`] steps on the group's master; how many
/// committed. The lag gauge is set from the watermark afterwards.
async fn group_look(app: &App, group: &GroupHandle) -> Result<usize, RollupError> {
    let now = unix_now();
    let limit = closed_limit(now, app.config.rollup.delay);
    let mut conn = db::conn(&group.master.pool, app.config.pool.connect_timeout).await?;
    let mut steps = 0;
    while steps < STEPS_PER_LOOK {
        let Some(rolled) = rollup::step(&mut conn, group.max_packet(), limit).await? else {
            break;
        };
        telemetry::rollup_stepped(&group.name);
        tracing::debug!(group = %group.name, from = rolled.from, to = rolled.to, counters = rolled.counters, "rolled up");
        steps += 1;
    }
    if let Some(w) = rollup::watermark(&mut conn).await? {
        telemetry::rollup_watermark(&group.name, w, now);
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_the_end_of_the_last_hour_older_than_the_delay() {
        let h = 1_704_067_200; // an hour boundary
        let two_min = Duration::from_secs(120);
        assert_eq!(closed_limit(h + 119, two_min), h - 3600);
        assert_eq!(closed_limit(h + 120, two_min), h);
        assert_eq!(closed_limit(h + 3600 + 119, two_min), h);
        assert_eq!(closed_limit(h + 5, Duration::ZERO), h);
    }
}
