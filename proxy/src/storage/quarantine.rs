//! Counters the database refuses deterministically, held aside instead of
//! failing their batch forever (`schema/005_quarantine.sql`).
//!
//! An upsert that fails with an error its values cause (a total past the
//! BIGINT range, a value too long) fails the same way on every retry; left
//! alone it would stall its group's flusher, every `ack=committed` writer
//! of the group and the final flush at shutdown. [`upsert_or_hold`] applies
//! everything else of the batch and writes the refused counters' deltas to
//! the `quarantine` table, in the same transaction, so they are kept
//! exactly once and visible. [`list`] and [`reapply`] are what the admin
//! API offers operators once the cause is fixed.

use mysql_async::prelude::*;
use mysql_async::{Conn, Value};

use crate::storage::buffer::{Minutes, Sum};
use crate::storage::db::{self, DbError, FlushError};
use crate::storage::rollup;
use crate::storage::rows::{Counter, FlushRows, bucket_sums, ns_and_key, upsert};

/// Errors a statement gets from the values it carries, the same on every
/// retry: out of range (1690 BIGINT overflow in `count + VALUES(count)`,
/// 1264), data too long (1406), incorrect value (1366, 1292). Retrying
/// them cannot succeed, so they are isolated to their counters
/// ([`upsert_or_hold`]) instead of failing the batch.
const DETERMINISTIC: [u16; 5] = [1690, 1264, 1406, 1366, 1292];

fn is_deterministic(e: &mysql_async::Error) -> bool {
    matches!(e, mysql_async::Error::Server(s) if DETERMINISTIC.contains(&s.code))
}

/// What went to the quarantine table instead of the counter tables.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Counters whose deltas were held.
    pub counters: usize,
    /// Quarantine rows written: one per held counter and minute.
    pub deltas: usize,
}

/// Upserts the rows of `counters` (`rows` is their derivation) inside
/// `tx`, holding back each counter the database refuses deterministically
/// (see [`DETERMINISTIC`]) in the `quarantine` table, labelled `source`.
/// Everything else is applied; a held counter writes none of its tiers.
///
/// The group's rollup watermark is read first, with a shared lock
/// ([`rollup::enter`]): minutes below it also get their hour and
/// day rows here (`rows` is derived again when it was derived for another
/// watermark and that matters).
pub async fn upsert_or_hold(
    tx: &mut mysql_async::Transaction<'_>,
    max_packet: usize,
    counters: &[Counter],
    rows: &FlushRows,
    source: &str,
) -> Result<Held, mysql_async::Error> {
    let watermark = rollup::enter(tx, rows.minutes).await?;
    let rows = rows.for_watermark(counters, watermark);
    let mut held = Held::default();
    for (i, reason) in upsert_isolating(tx, max_packet, counters, &rows).await? {
        hold(tx, &counters[i], source, &reason, &mut held).await?;
    }
    Ok(held)
}

/// Upserts every counter the database accepts; returns the refused ones
/// (index, reason), of which nothing was written.
///
/// The fast path is one savepoint and the usual statements. When they fail
/// deterministically they are rolled back to the savepoint and the
/// counters are bisected, each part under a savepoint again, down to the
/// single counters that fail: O(k log n) statement groups for k refused
/// counters among n. Any other error is returned (the caller retries the
/// whole transaction).
async fn upsert_isolating(
    tx: &mut mysql_async::Transaction<'_>,
    max_packet: usize,
    counters: &[Counter],
    rows: &FlushRows,
) -> Result<Vec<(usize, String)>, mysql_async::Error> {
    let unfit = "a sum does not fit a 64-bit count";
    let mut refused: Vec<(usize, String)> =
        rows.unfit.iter().map(|&i| (i, unfit.to_owned())).collect();
    if try_upsert(tx, max_packet, rows).await?.is_ok() {
        return Ok(refused);
    }
    // Parts still to try, the next one last.
    let mut todo = vec![(0, counters.len())];
    while let Some((lo, hi)) = todo.pop() {
        let part = FlushRows::derive_below(&counters[lo..hi], rows.below);
        // Unfit counters are refused already and have no rows.
        if part.is_empty() {
            continue;
        }
        match try_upsert(tx, max_packet, &part).await? {
            Ok(()) => {}
            Err(reason) if hi - lo == 1 => refused.push((lo, reason)),
            Err(_) => {
                let mid = lo + (hi - lo) / 2;
                todo.push((mid, hi));
                todo.push((lo, mid));
            }
        }
    }
    refused.sort_unstable_by_key(|(i, _)| *i);
    Ok(refused)
}

/// Upserts `rows` under a savepoint. `Ok(Err(reason))`: a deterministic
/// error, everything since the savepoint rolled back.
async fn try_upsert(
    tx: &mut mysql_async::Transaction<'_>,
    max_packet: usize,
    rows: &FlushRows,
) -> Result<Result<(), String>, mysql_async::Error> {
    tx.query_drop("SAVEPOINT upsert_part").await?;
    match upsert(tx, max_packet, rows).await {
        Ok(()) => Ok(Ok(())),
        Err(e) if is_deterministic(&e) => {
            tx.query_drop("ROLLBACK TO SAVEPOINT upsert_part").await?;
            Ok(Err(e.to_string()))
        }
        Err(e) => Err(e),
    }
}

/// Quarantine rows per statement at most.
const HOLD_ROWS_PER_STATEMENT: usize = 500;

/// Writes one counter's deltas to the quarantine table, one row per minute
/// (summed exactly; a sum past the BIGINT range is kept as a decimal).
async fn hold(
    tx: &mut mysql_async::Transaction<'_>,
    (rk, minutes): &Counter,
    source: &str,
    reason: &str,
    held: &mut Held,
) -> Result<(), mysql_async::Error> {
    let (ns, key) = ns_and_key(rk);
    let ring_pos = tally_admin::ShardRing::position(rk);
    let mut sorted: Vec<(i64, Sum)> = minutes.iter().collect();
    sorted.sort_unstable_by_key(|(m, _)| *m);
    let mut per_minute = Vec::new();
    bucket_sums(&sorted, Some(60), &mut per_minute);
    let reason: String = reason.chars().take(250).collect();
    tracing::error!(
        ns = %String::from_utf8_lossy(ns),
        key = %String::from_utf8_lossy(key),
        minutes = per_minute.len(),
        source,
        %reason,
        "counter quarantined: its deltas are kept in the quarantine table, not counted (docs/operations.md)"
    );
    for chunk in per_minute.chunks(HOLD_ROWS_PER_STATEMENT) {
        let mut sql = String::from(
            "INSERT INTO quarantine (ns, ckey, bucket, ring_pos, delta, source, reason) VALUES ",
        );
        let mut params = Vec::with_capacity(chunk.len() * 7);
        for (i, (minute, delta)) in chunk.iter().enumerate() {
            sql.push_str(if i == 0 {
                "(?,?,?,?,?,?,?)"
            } else {
                ",(?,?,?,?,?,?,?)"
            });
            params.extend([
                Value::Bytes(ns.to_vec()),
                Value::Bytes(key.to_vec()),
                Value::Int(*minute),
                Value::UInt(ring_pos),
                // DECIMAL(39,0) takes every i128 value written as text.
                Value::Bytes(delta.to_string().into_bytes()),
                Value::Bytes(source.as_bytes().to_vec()),
                Value::Bytes(reason.as_bytes().to_vec()),
            ]);
        }
        tx.exec_drop(sql, params).await?;
        held.deltas += chunk.len();
    }
    held.counters += 1;
    Ok(())
}

/// One quarantined delta, as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldRow {
    pub id: u64,
    pub ns: Vec<u8>,
    pub key: Vec<u8>,
    /// Unix seconds of the minute the delta belongs to.
    pub minute: i64,
    /// Exact, as text: it may be beyond 64 bits.
    pub delta: String,
    pub source: String,
    pub reason: String,
    /// Unix seconds.
    pub quarantined_at: i64,
}

/// The number of held rows and the oldest `limit` of them.
pub async fn list(conn: &mut Conn, limit: usize) -> Result<(u64, Vec<HeldRow>), DbError> {
    let total: Option<u64> = conn.query_first("SELECT COUNT(*) FROM quarantine").await?;
    type Found = (u64, Vec<u8>, Vec<u8>, i64, String, Vec<u8>, String, i64);
    let found: Vec<Found> = conn
        .exec(
            "SELECT id, ns, ckey, bucket, CAST(delta AS CHAR), source, reason, \
             UNIX_TIMESTAMP(quarantined_at) FROM quarantine ORDER BY id LIMIT ?",
            (limit as u64,),
        )
        .await?;
    let rows = found
        .into_iter()
        .map(|(id, ns, key, minute, delta, source, reason, at)| HeldRow {
            id,
            ns,
            key,
            minute,
            delta,
            source: String::from_utf8_lossy(&source).into_owned(),
            reason,
            quarantined_at: at,
        })
        .collect();
    Ok((total.unwrap_or(0), rows))
}

/// What one [`reapply`] pass did, in quarantine rows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reapplied {
    /// Added to their counters and deleted from the quarantine.
    pub applied: usize,
    /// Refused again (the cause is still there); kept.
    pub refused: usize,
    /// Of counters this group does not own now (moved by a reshard, or in
    /// a range being moved); kept, to be re-applied by hand.
    pub not_owned: usize,
}

/// Re-applies up to `limit` held rows (oldest counters first) in one
/// transaction: the rows of every counter the database now accepts are
/// added to its tiers and deleted from the quarantine together, so each is
/// applied exactly once however often this runs; refused counters stay.
/// `owned(routing_key)` says whether this group owns a counter now.
pub async fn reapply(
    conn: &mut Conn,
    max_packet: usize,
    limit: usize,
    owned: impl Fn(&[u8]) -> bool,
) -> Result<Reapplied, FlushError> {
    let not_applied = FlushError::not_applied;
    let mut tx = db::begin(conn).await?;
    // id, ns, ckey, minute, delta
    type Found = (u64, Vec<u8>, Vec<u8>, i64, String);
    let found: Vec<Found> = tx
        .exec(
            "SELECT id, ns, ckey, bucket, CAST(delta AS CHAR) FROM quarantine \
             ORDER BY ns, ckey, id LIMIT ? FOR UPDATE",
            (limit as u64,),
        )
        .await
        .map_err(not_applied)?;
    let mut done = Reapplied::default();
    let mut counters: Vec<Counter> = Vec::new();
    let mut ids: Vec<Vec<u64>> = Vec::new();
    for (id, ns, key, minute, delta) in found {
        let mut rk = ns;
        rk.push(0);
        rk.extend_from_slice(&key);
        let Ok(delta) = delta.parse::<Sum>() else {
            done.refused += 1;
            continue;
        };
        if !owned(&rk) {
            done.not_owned += 1;
            continue;
        }
        match counters.last_mut() {
            Some((last, minutes)) if **last == *rk => {
                minutes.add(minute, delta);
                if let Some(l) = ids.last_mut() {
                    l.push(id);
                }
            }
            _ => {
                let minutes = Minutes::one(minute, delta);
                counters.push((rk.into_boxed_slice(), minutes));
                ids.push(vec![id]);
            }
        }
    }
    // Late minutes (below the rollup watermark) get their hour and day rows.
    let fresh = FlushRows::derive_fresh(&counters);
    let watermark = rollup::enter(&mut tx, fresh.minutes)
        .await
        .map_err(not_applied)?;
    let rows = fresh.for_watermark(&counters, watermark);
    let refused = upsert_isolating(&mut tx, max_packet, &counters, &rows)
        .await
        .map_err(not_applied)?;
    let mut delete = Vec::new();
    for (i, counter_ids) in ids.iter().enumerate() {
        if refused.binary_search_by_key(&i, |(r, _)| *r).is_ok() {
            done.refused += counter_ids.len();
        } else {
            delete.extend_from_slice(counter_ids);
        }
    }
    done.applied = delete.len();
    for chunk in delete.chunks(HOLD_ROWS_PER_STATEMENT) {
        let marks = vec!["?"; chunk.len()].join(",");
        let params: Vec<Value> = chunk.iter().map(|id| Value::UInt(*id)).collect();
        tx.exec_drop(
            format!("DELETE FROM quarantine WHERE id IN ({marks})"),
            params,
        )
        .await
        .map_err(not_applied)?;
    }
    db::commit(tx).await?;
    Ok(done)
}
