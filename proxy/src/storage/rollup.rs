//! The rollup of minute rows into hour and day rows behind a per-group
//! watermark (`schema/008_rollup.sql`), and what the other writers need of
//! it: their entry (the watermark under a shared lock, [`enter`]), and the
//! conversion of a reshard chunk's rows from its source's watermark to its
//! target's ([`conform`]).
//!
//! Invariant (per group): an hour row exists only below the watermark and
//! holds its whole hour; a day row holds the minutes of `[d, min(d + 1 day,
//! watermark))`; minute rows at or above the watermark are never deleted.
//! So for any range, hour and day rows below the watermark plus minute rows
//! at or above it count every minute exactly once (`storage::query`).

use std::collections::BTreeMap;
use std::sync::Arc;

use mysql_async::prelude::*;
use mysql_async::{Conn, TxOpts};

use crate::domain::planner::floor;
use crate::domain::tier::Tier;
use crate::storage::db::DbError;
use crate::storage::rows::{self, FlushRows, Row};

const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

/// The watermark as a scalar subquery, for statements that must see it in
/// their own snapshot. A database without the row (schema version 1, not
/// yet migrated) has every tier complete: the watermark is then "never".
pub const WATERMARK_SQL: &str =
    "COALESCE((SELECT watermark FROM rollup_state WHERE id = 1), 9223372036854775807)";

/// A writer's entry (flush, WAL replay, quarantine re-apply, reshard copy
/// and undo), before it writes any row: reads the watermark with a shared
/// lock, so a rollup step (which raises it holding the row exclusively)
/// either committed before, and this writer writes the hour and day rows of
/// its minutes below the new watermark itself, or waits until this writer
/// has committed. When the writer's minutes (`first..=last`) reach into
/// the hour at the watermark, it also bumps `rollup_touch`: a step summing
/// that hour from an older snapshot then sums it again.
pub async fn enter(
    tx: &mut mysql_async::Transaction<'_>,
    minutes: Option<(i64, i64)>,
) -> Result<i64, mysql_async::Error> {
    let w: Option<i64> = tx
        .query_first("SELECT watermark FROM rollup_state WHERE id = 1 LOCK IN SHARE MODE")
        .await?;
    let Some(w) = w else {
        // Not migrated (schema version 1): every tier is written.
        return Ok(i64::MAX);
    };
    if minutes.is_some_and(|(first, last)| first < w.saturating_add(HOUR) && last >= w) {
        tx.query_drop("UPDATE rollup_touch SET seq = seq + 1 WHERE id = 1")
            .await?;
    }
    Ok(w)
}

/// The watermark of one server, as of now (for the lag metric and the
/// reshard copy's source snapshot).
pub async fn watermark(q: &mut impl Queryable) -> Result<Option<i64>, DbError> {
    Ok(
        q.query_first("SELECT watermark FROM rollup_state WHERE id = 1")
            .await?,
    )
}

/// What one rollup step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rolled {
    pub from: i64,
    pub to: i64,
    /// Counters whose hour (and day) rows it wrote (0: it skipped hours
    /// without minute rows).
    pub counters: usize,
}

/// Why a step rolled nothing.
#[derive(Debug, thiserror::Error)]
pub enum RollupError {
    #[error(transparent)]
    Db(#[from] DbError),
    /// A counter's hour or day sum would leave the BIGINT range: its hour
    /// cannot be rolled up until an operator deals with the counter (the
    /// watermark stays; reads stay exact from the minute rows).
    #[error("{counter} in the hour at {hour}: its hour or day sum does not fit a 64-bit count")]
    Unfit { counter: String, hour: i64 },
}

impl From<mysql_async::Error> for RollupError {
    fn from(e: mysql_async::Error) -> Self {
        RollupError::Db(DbError::Mysql(e))
    }
}

/// Summing an hour from a snapshot is retried this often when writers
/// touched it meanwhile; then it is summed holding the watermark row, with
/// writers of the group waiting.
const OPTIMISTIC_TRIES: usize = 3;

/// One rollup step on a master, at most up to `limit` (hour-aligned: the
/// end of the last hour considered closed): either raises the watermark
/// over hours without minute rows, or adds the hour at the watermark to the
/// hour and day rows and raises it by that hour, in one transaction.
/// `None` when there is nothing to roll up.
///
/// The hour is summed from a consistent snapshot without locking its minute
/// rows, so flushes go on meanwhile; the step then locks the watermark row
/// for update (waiting for writers inside their transaction) and commits
/// only if neither the watermark nor `rollup_touch` moved since the
/// snapshot ([`enter`]). After [`OPTIMISTIC_TRIES`] such tries it sums
/// under the lock. Writers take the watermark row before any row the step
/// touches (they may hold their dedup and id rows already, which the step
/// never touches), and the step takes it before it writes any row and
/// locks no minute row: no deadlock between them.
pub async fn step(
    conn: &mut Conn,
    max_packet: usize,
    limit: i64,
) -> Result<Option<Rolled>, RollupError> {
    if let Some(skipped) = skip_empty(conn, limit).await? {
        return Ok(Some(skipped));
    }
    for _ in 0..OPTIMISTIC_TRIES {
        if let Some(done) = roll_hour(conn, max_packet, limit, true).await? {
            return Ok(done);
        }
    }
    Ok(roll_hour(conn, max_packet, limit, false).await?.flatten())
}

/// Raises the watermark over hours without minute rows (up to the first
/// minute row's hour, or `limit`), under the exclusive lock: a short
/// transaction, one index lookup.
async fn skip_empty(conn: &mut Conn, limit: i64) -> Result<Option<Rolled>, RollupError> {
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    let Some(from) = tx
        .query_first::<i64, _>("SELECT watermark FROM rollup_state WHERE id = 1 FOR UPDATE")
        .await?
    else {
        tx.rollback().await?;
        return Ok(None);
    };
    // Read after the lock: every writer that could add a minute row below
    // it has committed, and this read's snapshot starts now.
    let mut firsts = Vec::new();
    for ns in minute_namespaces(&mut tx).await? {
        let first: Option<Option<i64>> = tx
            .exec_first(
                "SELECT MIN(bucket) FROM counter_minute WHERE ns = ? AND bucket >= ?",
                (ns, from),
            )
            .await?;
        firsts.push(first.flatten());
    }
    let next = firsts.into_iter().flatten().min();
    let to = next.map_or(limit, |m| floor(m, HOUR)).min(limit);
    if to <= from {
        tx.rollback().await?;
        return Ok(None);
    }
    tx.exec_drop("UPDATE rollup_state SET watermark = ? WHERE id = 1", (to,))
        .await?;
    tx.commit().await?;
    Ok(Some(Rolled {
        from,
        to,
        counters: 0,
    }))
}

/// `(ns, ckey, ring_pos, sum)` of one counter's minutes of an hour.
type HourSum = (Vec<u8>, Vec<u8>, u64, String);

/// One namespace's sums of an hour, through `by_bucket`.
const HOUR_SUMS_SQL: &str = "SELECT ns, ckey, MIN(ring_pos), CAST(SUM(count) AS CHAR) \
     FROM counter_minute WHERE ns = ? AND bucket >= ? AND bucket < ? GROUP BY ns, ckey";

/// The namespaces with minute rows (a loose scan of the primary key's
/// prefix): the minute table has no index on `bucket` alone (schema
/// version 3), so the rollup and retention read it per namespace through
/// `by_bucket`.
pub async fn minute_namespaces(q: &mut impl Queryable) -> Result<Vec<Vec<u8>>, mysql_async::Error> {
    q.query("SELECT DISTINCT ns FROM counter_minute").await
}

/// Every namespace's sums of the hour at `from`.
async fn hour_sums(
    tx: &mut mysql_async::Transaction<'_>,
    from: i64,
) -> Result<Vec<HourSum>, mysql_async::Error> {
    let mut sums = Vec::new();
    for ns in minute_namespaces(tx).await? {
        let part: Vec<HourSum> = tx.exec(HOUR_SUMS_SQL, (ns, from, from + HOUR)).await?;
        sums.extend(part);
    }
    Ok(sums)
}

/// Rolls up the hour at the watermark if it is closed. `Ok(None)`: an
/// optimistic try found the hour touched meanwhile (try again);
/// `Ok(Some(None))`: nothing to roll.
async fn roll_hour(
    conn: &mut Conn,
    max_packet: usize,
    limit: i64,
    optimistic: bool,
) -> Result<Option<Option<Rolled>>, RollupError> {
    let opts = TxOpts::default()
        .with_consistent_snapshot(optimistic)
        .clone();
    let mut tx = conn.start_transaction(opts).await?;
    // Optimistic: the watermark and the touch count of the snapshot taken
    // at START TRANSACTION, no lock yet. Otherwise the watermark row locked
    // first, and the sums read after it.
    let state: Option<(i64, Option<u64>)> = if optimistic {
        tx.query_first::<(i64, u64), _>(
            "SELECT s.watermark, t.seq FROM rollup_state s, rollup_touch t WHERE s.id = 1 AND t.id = 1",
        )
        .await?
        .map(|(w, seq)| (w, Some(seq)))
    } else {
        tx.query_first::<i64, _>("SELECT watermark FROM rollup_state WHERE id = 1 FOR UPDATE")
            .await?
            .map(|w| (w, None))
    };
    let Some((from, seq)) = state.filter(|(w, _)| w + HOUR <= limit) else {
        tx.rollback().await?;
        return Ok(Some(None));
    };
    let sums = hour_sums(&mut tx, from).await?;
    if let Some(seq) = seq {
        // Now the lock, then the current count (a locking read, after the
        // lock like a writer's bump: the same order, no deadlock).
        let now: Option<i64> = tx
            .query_first("SELECT watermark FROM rollup_state WHERE id = 1 FOR UPDATE")
            .await?;
        let touched: Option<u64> = tx
            .query_first("SELECT seq FROM rollup_touch WHERE id = 1 LOCK IN SHARE MODE")
            .await?;
        if (now, touched) != (Some(from), Some(seq)) {
            tx.rollback().await?;
            return Ok(None);
        }
    }
    let rows = hour_rows(&sums, from)?;
    let counters = rows.tiers[1].1.len();
    if let Err(e) = rows::upsert(&mut tx, max_packet, &rows).await {
        let _ = tx.rollback().await;
        return Err(match e {
            mysql_async::Error::Server(s) if s.code == 1690 || s.code == 1264 => {
                RollupError::Unfit {
                    counter: "a counter's day row".into(),
                    hour: from,
                }
            }
            e => e.into(),
        });
    }
    tx.exec_drop(
        "UPDATE rollup_state SET watermark = ? WHERE id = 1",
        (from + HOUR,),
    )
    .await?;
    tx.commit().await?;
    Ok(Some(Some(Rolled {
        from,
        to: from + HOUR,
        counters,
    })))
}

/// The hour and day rows adding one hour's minute sums.
fn hour_rows(sums: &[HourSum], hour: i64) -> Result<FlushRows, RollupError> {
    let mut hours = Vec::with_capacity(sums.len());
    let mut days = Vec::with_capacity(sums.len());
    for (ns, key, ring_pos, sum) in sums {
        let delta: i64 = sum.parse().map_err(|_| RollupError::Unfit {
            counter: format!(
                "{}/{}",
                String::from_utf8_lossy(ns),
                String::from_utf8_lossy(key)
            ),
            hour,
        })?;
        if delta == 0 {
            continue;
        }
        let row = Row::new(ns, key, hour, *ring_pos, delta);
        days.push(Row {
            bucket: floor(hour, DAY),
            ..row.clone()
        });
        hours.push(row);
    }
    Ok(FlushRows::stored([
        (Tier::Minute, Vec::new()),
        (Tier::Hour, hours),
        (Tier::Day, days),
        (Tier::Total, Vec::new()),
    ]))
}

/// Per (counter, bucket): its ring position and summed delta.
type Buckets = BTreeMap<(Arc<[u8]>, i64), (u64, i64)>;

/// A reshard chunk's rows as its source stores them (watermark `from`,
/// their `below`), converted to what its target (watermark `to`) must hold for the same
/// minutes: minute and total rows as they are; hour and day rows below
/// `min(from, to)` as they are where whole; the rest summed again from the
/// source's hour rows (below `from`) and minute rows (at or above it),
/// over `[bucket, min(bucket + width, to))`.
///
/// Minute rows the source's retention deleted are below its watermark, so
/// only whole hour and day rows stand for them, which this keeps; their
/// minutes cannot be re-summed when the target's watermark is lower than
/// that (a target whose rollup stalled for longer than the minute
/// retention), and those hours are then left out of its hour rows.
pub fn conform(rows: &FlushRows, to: i64) -> FlushRows {
    let from = rows.below;
    if from == to {
        return rows.clone();
    }
    let low = from.min(to);
    let find = |t: Tier| {
        rows.tiers
            .iter()
            .find(|(x, _)| *x == t)
            .map(|(_, r)| r.as_slice())
            .unwrap_or_default()
    };
    // Per counter, its hour-resolution data: hour rows below `from`, minute
    // rows at or above it summed per hour.
    let mut per_hour: Buckets = BTreeMap::new();
    for r in find(Tier::Hour).iter().filter(|r| r.bucket < from) {
        let e = per_hour
            .entry((r.counter.clone(), r.bucket))
            .or_insert((r.ring_pos, 0));
        e.1 = e.1.saturating_add(r.delta);
    }
    for r in find(Tier::Minute).iter().filter(|r| r.bucket >= from) {
        let e = per_hour
            .entry((r.counter.clone(), floor(r.bucket, HOUR)))
            .or_insert((r.ring_pos, 0));
        e.1 = e.1.saturating_add(r.delta);
    }
    let mut hours: Vec<Row> = find(Tier::Hour)
        .iter()
        .filter(|r| r.bucket < low)
        .cloned()
        .collect();
    let mut days: Vec<Row> = find(Tier::Day)
        .iter()
        .filter(|r| r.bucket + DAY <= low)
        .cloned()
        .collect();
    let mut partial_days: Buckets = BTreeMap::new();
    for ((counter, h), (ring_pos, delta)) in &per_hour {
        if *h >= to {
            continue;
        }
        if *h >= low {
            hours.push(Row {
                counter: counter.clone(),
                bucket: *h,
                ring_pos: *ring_pos,
                delta: *delta,
            });
        }
        let d = floor(*h, DAY);
        if d + DAY > low {
            let e = partial_days
                .entry((counter.clone(), d))
                .or_insert((*ring_pos, 0));
            e.1 = e.1.saturating_add(*delta);
        }
    }
    days.extend(
        partial_days
            .into_iter()
            .filter(|(_, (_, delta))| *delta != 0)
            .map(|((counter, bucket), (ring_pos, delta))| Row {
                counter,
                bucket,
                ring_pos,
                delta,
            }),
    );
    let key = |r: &Row| (r.counter.clone(), r.bucket);
    hours.sort_by_key(key);
    days.sort_by_key(key);
    FlushRows {
        below: to,
        ..FlushRows::stored([
            (Tier::Minute, find(Tier::Minute).to_vec()),
            (Tier::Hour, hours),
            (Tier::Day, days),
            (Tier::Total, find(Tier::Total).to_vec()),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2024-01-01T00:00Z, a day boundary.
    const DAY0: i64 = 1_704_067_200;

    fn row(key: &str, bucket: i64, delta: i64) -> Row {
        Row::new(b"v", key.as_bytes(), bucket, 7, delta)
    }

    /// A source holding `a` with 1 at DAY0+10min, 2 at DAY0+1h+5min,
    /// 4 at DAY0+2h, 8 at DAY0+1d+3h, rolled up to `w`.
    fn source(w: i64) -> FlushRows {
        let minutes = [
            (DAY0 + 600, 1),
            (DAY0 + HOUR + 300, 2),
            (DAY0 + 2 * HOUR, 4),
            (DAY0 + DAY + 3 * HOUR, 8),
        ];
        let mut hours: BTreeMap<i64, i64> = BTreeMap::new();
        let mut days: BTreeMap<i64, i64> = BTreeMap::new();
        for (m, d) in minutes.iter().filter(|(m, _)| *m < w) {
            *hours.entry(floor(*m, HOUR)).or_default() += d;
            *days.entry(floor(*m, DAY)).or_default() += d;
        }
        let tiers = [
            (
                Tier::Minute,
                minutes.iter().map(|(m, d)| row("a", *m, *d)).collect(),
            ),
            (
                Tier::Hour,
                hours.iter().map(|(b, d)| row("a", *b, *d)).collect(),
            ),
            (
                Tier::Day,
                days.iter().map(|(b, d)| row("a", *b, *d)).collect(),
            ),
            (Tier::Total, vec![row("a", 0, 15)]),
        ];
        FlushRows {
            below: w,
            ..FlushRows::stored(tiers)
        }
    }

    fn tier(rows: &FlushRows, t: Tier) -> Vec<(i64, i64)> {
        rows.tiers
            .iter()
            .find(|(x, _)| *x == t)
            .map(|(_, r)| r.iter().map(|r| (r.bucket, r.delta)).collect())
            .unwrap_or_default()
    }

    #[test]
    fn conforming_to_any_watermark_gives_what_that_watermark_stores() {
        let marks = [
            0,
            DAY0,
            DAY0 + HOUR,
            DAY0 + 2 * HOUR,
            DAY0 + 3 * HOUR,
            DAY0 + DAY + 3 * HOUR,
            DAY0 + DAY + 4 * HOUR,
            DAY0 + 3 * DAY,
        ];
        for from in marks {
            for to in marks {
                let got = conform(&source(from), to);
                let want = source(to);
                for t in [Tier::Minute, Tier::Hour, Tier::Day, Tier::Total] {
                    assert_eq!(tier(&got, t), tier(&want, t), "{t:?} from {from} to {to}");
                }
            }
        }
    }

    #[test]
    fn whole_rows_below_both_watermarks_are_kept_without_their_minutes() {
        // Retention deleted the minutes of the first day on the source.
        let mut src = source(DAY0 + DAY + 4 * HOUR);
        src.tiers[0].1.retain(|r| r.bucket >= DAY0 + DAY);
        let got = conform(&src, DAY0 + DAY + 3 * HOUR);
        assert_eq!(
            tier(&got, Tier::Hour),
            [(DAY0, 1), (DAY0 + HOUR, 2), (DAY0 + 2 * HOUR, 4)]
        );
        assert_eq!(tier(&got, Tier::Day), [(DAY0, 7)]);
    }
}
