//! Retention: deletes expired minute and hour (and, if configured, day)
//! rows, and old dedup rows, on every master.
//!
//! Deletes go in chunks of `retention.chunk_rows` through the `by_age`
//! index, so a pass never holds locks for long and replicas apply it in
//! small transactions. Every group is handled concurrently and bounded by
//! the connect timeout, so a dead master delays nobody else. Several proxies
//! may run passes against the same masters; deleting expired rows is
//! idempotent, so that only costs duplicate work.

use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::*;
use tokio::sync::watch;

use crate::app::App;
use crate::domain::clock::unix_now;
use crate::domain::planner::floor;
use crate::domain::tier::Tier;
use crate::storage::db::{self, DbError};
use crate::storage::shard_map::GroupHandle;
use crate::telemetry;

/// Dedup rows are kept this long: far longer than any batch can be retried
/// (a batch is retried until applied, and an ambiguous one is resolved by
/// its next attempt).
pub const DEDUP_KEEP_DAYS: u32 = 7;

/// Runs passes every `retention.interval` until `stop` turns true.
pub async fn run(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(app.config.retention.interval) => {}
            _ = stop.changed() => return,
        }
        pass(&app).await;
    }
}

/// One retention pass over every group; returns rows deleted per group.
pub async fn pass(app: &App) -> Vec<(String, u64)> {
    let groups = app.groups();
    let work = groups.iter().map(|g| async move {
        match tokio::time::timeout(Duration::from_secs(300), group_pass(app, g)).await {
            Ok(Ok(n)) => (g.name.clone(), n),
            Ok(Err(e)) => {
                telemetry::retention_failed(&g.name);
                tracing::warn!(group = %g.name, error = %e, "retention pass failed; will retry next interval");
                (g.name.clone(), 0)
            }
            Err(_) => {
                telemetry::retention_failed(&g.name);
                tracing::warn!(group = %g.name, "retention pass took over 5 minutes; abandoned");
                (g.name.clone(), 0)
            }
        }
    });
    futures::future::join_all(work).await
}

async fn group_pass(app: &App, group: &GroupHandle) -> Result<u64, DbError> {
    let cfg = &app.config.retention;
    let now = unix_now();
    let mut conn = db::conn(&group.master.pool, app.config.pool.connect_timeout).await?;
    let mut deleted = 0;
    for (tier, keep) in [
        (Tier::Minute, cfg.minute),
        (Tier::Hour, cfg.hour),
        (Tier::Day, cfg.day),
    ] {
        let (Some(keep), Some(width)) = (keep, tier.width()) else {
            continue;
        };
        // Only whole buckets older than the retention go.
        let cutoff = floor(now - keep.as_secs() as i64, width);
        let sql = format!(
            "DELETE FROM {} WHERE bucket < ? LIMIT {}",
            tier.table(),
            cfg.chunk_rows
        );
        loop {
            conn.exec_drop(&sql, (cutoff,)).await?;
            let n = conn.affected_rows();
            if n > 0 {
                telemetry::retention_deleted(&group.name, tier.table(), n);
                deleted += n;
            }
            if n < cfg.chunk_rows as u64 {
                break;
            }
        }
    }
    let sql = format!(
        "DELETE FROM applied_batches WHERE applied_at < NOW() - INTERVAL {DEDUP_KEEP_DAYS} DAY LIMIT {}",
        cfg.chunk_rows
    );
    loop {
        conn.exec_drop(&sql, ()).await?;
        let n = conn.affected_rows();
        telemetry::retention_deleted(&group.name, "applied_batches", n);
        if n < cfg.chunk_rows as u64 {
            break;
        }
    }
    if deleted > 0 {
        tracing::info!(group = %group.name, deleted, "retention pass");
    }
    Ok(deleted)
}
