//! Retention: deletes expired minute and hour (and, if configured, day)
//! rows, old dedup rows, and event ids older than `idempotency.window`
//! (a retry after the window is a new event), on every master.
//!
//! Deletes go in chunks of `retention.chunk_rows` through the `by_age`
//! index (minute rows: per namespace through `by_bucket`), so a pass never
//! holds locks for long and replicas apply it in small transactions. Every group is handled concurrently and bounded by
//! the connect timeout, so a dead master delays nobody else. Several proxies
//! may run passes against the same masters; deleting expired rows is
//! idempotent, so that only costs duplicate work.

use std::sync::Arc;

use mysql_async::prelude::*;
use tokio::sync::watch;

use crate::app::App;
use crate::config::RetentionConfig;
use crate::domain::clock::unix_now;
use crate::domain::planner::floor;
use crate::domain::tier::Tier;
use crate::engine::each_group::each_group;
use crate::storage::db::{self, DbError};
use crate::storage::ids;
use crate::storage::rollup::{self, WATERMARK_SQL};
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

/// One retention pass over every group; returns rows deleted per group
/// (0 where the pass failed).
pub async fn pass(app: &App) -> Vec<(String, u64)> {
    each_group(
        app,
        "retention pass",
        telemetry::retention_failed,
        |g| async move { group_pass(app, &g).await },
    )
    .await
    .into_iter()
    .map(|(group, n)| (group, n.unwrap_or(0)))
    .collect()
}

/// The tiers a pass deletes from, each with its cutoff: rows with
/// `bucket < cutoff` are expired. Only whole buckets older than the
/// retention go, so the cutoff is the start of the bucket that holds
/// `now - keep`. Tiers kept forever are absent; the total is never expired.
fn cutoffs(now: i64, cfg: &RetentionConfig) -> Vec<(Tier, i64)> {
    [
        (Tier::Minute, cfg.minute),
        (Tier::Hour, cfg.hour),
        (Tier::Day, cfg.day),
    ]
    .into_iter()
    .filter_map(|(tier, keep)| {
        let (keep, width) = (keep?, tier.width()?);
        Some((tier, floor(now - keep.as_secs() as i64, width)))
    })
    .collect()
}

/// Runs `sql` (a `DELETE ... LIMIT chunk_rows`) until it deletes fewer
/// than a chunk; the rows deleted.
async fn delete_chunks(
    conn: &mut mysql_async::Conn,
    group: &str,
    table: &'static str,
    sql: &str,
    params: mysql_async::Params,
    chunk_rows: usize,
) -> Result<u64, DbError> {
    let mut deleted = 0;
    loop {
        conn.exec_drop(sql, params.clone()).await?;
        let n = conn.affected_rows();
        if n > 0 {
            telemetry::retention_deleted(group, table, n);
            deleted += n;
        }
        if n < chunk_rows as u64 {
            return Ok(deleted);
        }
    }
}

/// Expired minute rows, per namespace through `by_bucket` (the minute
/// table has no index on `bucket` alone since schema version 3). Minute
/// rows at or above the rollup watermark are the only copy of their
/// minutes (`storage::rollup`): never expired before they are rolled up.
async fn expire_minutes(
    conn: &mut mysql_async::Conn,
    group: &str,
    cutoff: i64,
    chunk_rows: usize,
) -> Result<u64, DbError> {
    let namespaces = rollup::minute_namespaces(conn).await?;
    let sql = format!(
        "DELETE FROM counter_minute WHERE ns = ? AND bucket < LEAST(?, {WATERMARK_SQL}) LIMIT {chunk_rows}"
    );
    let mut deleted = 0;
    for ns in namespaces {
        deleted += delete_chunks(
            conn,
            group,
            "counter_minute",
            &sql,
            (ns, cutoff).into(),
            chunk_rows,
        )
        .await?;
    }
    Ok(deleted)
}

async fn group_pass(app: &App, group: &GroupHandle) -> Result<u64, DbError> {
    let cfg = &app.config.retention;
    let now = unix_now();
    let mut conn = db::conn(&group.master.pool, app.config.pool.connect_timeout).await?;
    let mut deleted = 0;
    for (tier, cutoff) in cutoffs(now, cfg) {
        if tier == Tier::Minute {
            deleted += expire_minutes(&mut conn, &group.name, cutoff, cfg.chunk_rows).await?;
            continue;
        }
        let sql = format!(
            "DELETE FROM {} WHERE bucket < ? LIMIT {}",
            tier.table(),
            cfg.chunk_rows
        );
        deleted += delete_chunks(
            &mut conn,
            &group.name,
            tier.table(),
            &sql,
            (cutoff,).into(),
            cfg.chunk_rows,
        )
        .await?;
    }
    let sql = format!(
        "DELETE FROM applied_batches WHERE applied_at < NOW() - INTERVAL {DEDUP_KEEP_DAYS} DAY LIMIT {}",
        cfg.chunk_rows
    );
    // Dedup rows are bookkeeping: not in the pass's count of expired rows.
    delete_chunks(
        &mut conn,
        &group.name,
        "applied_batches",
        &sql,
        mysql_async::Params::Empty,
        cfg.chunk_rows,
    )
    .await?;
    // Event ids past the idempotency window, through the `by_age` indexes:
    // the rows of closed sets, and the sets whose last entry is that old
    // (a closed set's `at` is renewed by every id it sends to
    // `applied_ids`, so it outlives them).
    let expired_before = now.saturating_sub(app.config.idempotency.window.as_secs() as i64);
    for table in ["applied_ids", "applied_id_sets"] {
        let sql = format!("DELETE FROM {table} WHERE at < ? LIMIT {}", cfg.chunk_rows);
        deleted += delete_chunks(
            &mut conn,
            &group.name,
            table,
            &sql,
            (expired_before,).into(),
            cfg.chunk_rows,
        )
        .await?;
    }
    // A window after the change to packed sets began, no entry at an old
    // key can be in the window any more: flushes stop looking there.
    if ids::end_packing_change_over(&mut conn, expired_before).await? {
        tracing::info!(group = %group.name, "ids: the change-over to packed sets ended");
    }
    if deleted > 0 {
        tracing::info!(group = %group.name, deleted, "retention pass");
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MINUTE: i64 = 60;
    const HOUR: i64 = 3600;
    const DAY: i64 = 86_400;

    fn days(n: u64) -> Option<Duration> {
        Some(Duration::from_secs(n * 86_400))
    }

    /// SPEC §5 defaults: minute 7 days, hour 90 days, day forever.
    fn defaults() -> RetentionConfig {
        RetentionConfig {
            minute: days(7),
            hour: days(90),
            day: None,
            interval: Duration::from_secs(600),
            chunk_rows: 1000,
        }
    }

    // 2024-03-10T12:34:56Z
    const NOW: i64 = 1_710_074_096;

    #[test]
    fn defaults_expire_minutes_after_7_days_and_hours_after_90_and_keep_days() {
        assert_eq!(
            cutoffs(NOW, &defaults()),
            [
                // now - 7 d = 2024-03-03T12:34:56Z lies in the minute that
                // starts at 12:34:00; that minute still holds events
                // younger than 7 days, the minutes before it do not.
                (Tier::Minute, 1_709_469_240), // 2024-03-03T12:34:00Z
                // now - 90 d = 2023-12-11T12:34:56Z (2024 is a leap year).
                (Tier::Hour, 1_702_296_000), // 2023-12-11T12:00:00Z
            ]
        );
    }

    #[test]
    fn a_configured_day_retention_cuts_at_a_utc_midnight() {
        let cfg = RetentionConfig {
            day: days(400),
            ..defaults()
        };
        let cut = cutoffs(NOW, &cfg);
        assert_eq!(cut.len(), 3);
        // now - 400 d = 2023-02-04T12:34:56Z.
        assert_eq!(cut[2], (Tier::Day, 1_675_468_800)); // 2023-02-04T00:00Z
    }

    #[test]
    fn tiers_kept_forever_have_no_cutoff() {
        let forever = RetentionConfig {
            minute: None,
            hour: None,
            day: None,
            ..defaults()
        };
        assert!(cutoffs(NOW, &forever).is_empty());
        let only_hours = RetentionConfig {
            minute: None,
            ..defaults()
        };
        let tiers: Vec<Tier> = cutoffs(NOW, &only_hours).iter().map(|(t, _)| *t).collect();
        assert_eq!(tiers, [Tier::Hour]);
    }

    #[test]
    fn exactly_the_buckets_wholly_older_than_the_retention_are_expired() {
        // For many `now`s and retentions, including ones shorter than a
        // bucket: the bucket just below the cutoff ends at or before
        // now - keep (all of its events are older than the retention); the
        // bucket at the cutoff still covers now - keep (it is kept).
        let keeps = [
            Duration::from_secs(1),
            Duration::from_secs(59),
            Duration::from_secs(30 * 60),
            Duration::from_secs(36 * 3600),
            Duration::from_secs(7 * 86_400),
            Duration::from_secs(90 * 86_400 + 1),
        ];
        let mut now = NOW;
        for step in 0..500 {
            now += 7919 * step; // a prime stride over minutes, hours, days
            for keep in keeps {
                let cfg = RetentionConfig {
                    minute: Some(keep),
                    hour: Some(keep),
                    day: Some(keep),
                    ..defaults()
                };
                let oldest_kept = now - keep.as_secs() as i64;
                for (tier, cutoff) in cutoffs(now, &cfg) {
                    let width = tier.width().expect("bucketed tier");
                    assert_eq!(
                        cutoff.rem_euclid(width),
                        0,
                        "{tier:?} cutoff on a bucket start"
                    );
                    assert!(
                        cutoff <= oldest_kept,
                        "{tier:?} at {now}: would delete kept events"
                    );
                    assert!(
                        oldest_kept < cutoff + width,
                        "{tier:?} at {now}: a wholly expired bucket survives"
                    );
                }
            }
        }
    }

    #[test]
    fn a_retention_ending_on_a_bucket_boundary_keeps_that_bucket() {
        // now - keep = 2024-03-03T12:00:00Z exactly: the hour starting then
        // holds events exactly 7 days old, which are kept; 11:00 goes.
        let now = 1_710_072_000; // 2024-03-10T12:00:00Z
        let cfg = RetentionConfig {
            minute: days(7),
            hour: days(7),
            day: days(7),
            ..defaults()
        };
        let boundary = now - 7 * DAY;
        assert_eq!(
            cutoffs(now, &cfg),
            [
                (Tier::Minute, boundary),
                (Tier::Hour, boundary),
                (Tier::Day, boundary - 12 * HOUR),
            ]
        );
        assert_eq!(boundary % MINUTE, 0);
    }
}
