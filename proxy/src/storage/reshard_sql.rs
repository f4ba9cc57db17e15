//! The SQL of a reshard: choosing chunk boundaries on a source, copying a
//! chunk to its target with its marker in one transaction, undoing a copy,
//! the verification sums and the chunked cleanup.
//!
//! Every statement selects rows by `ring_pos BETWEEN ? AND ?` (the `by_ring`
//! index; minute rows through their counters' total rows, since the minute
//! table has no `by_ring`), so a chunk is an exact hash range and never
//! splits a counter.
//! A counter's event ids (`applied_ids`) move with it: read with the
//! chunk, inserted on the target in the chunk's transaction (`INSERT
//! IGNORE`: an id the target counted meanwhile stays counted once), and
//! deleted from the source by the cleanup.

use mysql_async::prelude::*;
use mysql_async::{Conn, TxOpts, Value};

use crate::domain::tier::Tier;
use crate::storage::db::{self, DbError};
use crate::storage::ids;
use crate::storage::rollup;
use crate::storage::rows::{self, FlushRows, Row};

const TIERS: [Tier; 4] = [Tier::Minute, Tier::Hour, Tier::Day, Tier::Total];

/// The minute rows of the counters in a span (`t.ring_pos BETWEEN ? AND
/// ?`), found through their total rows: the minute table has no `by_ring`
/// (schema version 3), and every counter with a minute row has a total row.
const MINUTES_IN_SPAN: &str = "counter_total t JOIN counter_minute m \
     ON m.ns = t.ns AND m.ckey = t.ckey WHERE t.ring_pos BETWEEN ? AND ?";

/// `(ns, ckey, bucket, ring_pos, count)` as stored.
type StoredRow = (Vec<u8>, Vec<u8>, i64, u64, i64);

/// One chunk of a moved range, `[start, end]` in ring positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub end: u64,
}

/// What a chunk carried, as recorded in its marker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkSums {
    pub rows: u64,
    pub counters: u64,
    pub total_sum: i64,
}

/// The end of the next chunk starting at `start` within `[start, end]`:
/// the position of the `rows`-th counter, or `end` when fewer remain.
pub async fn chunk_end(conn: &mut Conn, start: u64, end: u64, rows: usize) -> Result<u64, DbError> {
    let pos: Option<u64> = conn
        .exec_first(
            "SELECT ring_pos FROM counter_total WHERE ring_pos BETWEEN ? AND ? \
             ORDER BY ring_pos LIMIT 1 OFFSET ?",
            (start, end, rows.saturating_sub(1) as u64),
        )
        .await?;
    Ok(pos.unwrap_or(end))
}

/// Every row of every tier in `span`, as upsert rows adding their count,
/// read in one snapshot with the source's rollup watermark (their
/// `below`): the source's rollup may add to the span's hour and day rows
/// meanwhile, and a copy converts them to the target's watermark
/// ([`rollup::conform`]).
pub async fn read_span(conn: &mut Conn, span: Span) -> Result<(FlushRows, ChunkSums), DbError> {
    let mut tiers = TIERS.map(|t| (t, Vec::new()));
    let mut sums = ChunkSums::default();
    let mut tx = conn
        .start_transaction(
            TxOpts::default()
                .with_consistent_snapshot(true)
                .with_readonly(Some(true))
                .clone(),
        )
        .await?;
    let watermark = rollup::watermark(&mut tx).await?.unwrap_or(i64::MAX);
    for (tier, rows) in tiers.iter_mut() {
        let sql = match tier {
            Tier::Total => "SELECT ns, ckey, 0, ring_pos, count FROM counter_total \
                 WHERE ring_pos BETWEEN ? AND ? ORDER BY ns, ckey"
                .to_owned(),
            Tier::Minute => format!(
                "SELECT m.ns, m.ckey, m.bucket, m.ring_pos, m.count FROM {MINUTES_IN_SPAN} \
                 ORDER BY m.ns, m.ckey, m.bucket"
            ),
            _ => format!(
                "SELECT ns, ckey, bucket, ring_pos, count FROM {} WHERE ring_pos BETWEEN ? AND ? \
                 ORDER BY ns, ckey, bucket",
                tier.table()
            ),
        };
        let found: Vec<StoredRow> = tx.exec(sql, (span.start, span.end)).await?;
        for (ns, key, bucket, ring_pos, count) in found {
            if *tier == Tier::Total {
                sums.counters += 1;
                sums.total_sum += count;
            }
            rows.push(Row::new(&ns, &key, bucket, ring_pos, count));
        }
        sums.rows += rows.len() as u64;
    }
    tx.commit().await?;
    Ok((
        FlushRows {
            below: watermark,
            ..FlushRows::stored(tiers)
        },
        sums,
    ))
}

/// An `applied_ids` row as stored: `(ns, ckey, id, ring_pos, at, src)`.
pub type IdRow = (Vec<u8>, Vec<u8>, Vec<u8>, u64, i64, u64);

/// The event ids of the counters in `span`.
pub async fn read_span_ids(conn: &mut Conn, span: Span) -> Result<Vec<IdRow>, DbError> {
    Ok(conn
        .exec(
            "SELECT ns, ckey, id, ring_pos, at, src FROM applied_ids              WHERE ring_pos BETWEEN ? AND ? ORDER BY ns, ckey, id",
            (span.start, span.end),
        )
        .await?)
}

/// Copies every event id set of a source to a target, in pages of set
/// keys, each merged in one target transaction ([`ids::merge_sets`]): a
/// set mixes counters of every range, and its entries say "counted",
/// which stays true wherever a counter moves, so the whole table goes.
/// Run after the ring fence (the source's sets of moved counters are
/// final then); idempotent, so a pass run again copies again. Returns the
/// rows read.
///
/// A source still in its change-over to packed sets
/// (`schema/011_packed_sets.sql`) hands it on first: the target then also
/// looks the copied ids up at their old keys.
pub async fn copy_id_sets(
    src: &mut Conn,
    dst: &mut Conn,
    max_packet: usize,
) -> Result<u64, DbError> {
    let at = ids::packed_at(src).await?;
    if at > 0 {
        dst.exec_drop(
            "UPDATE id_sets_state SET packed_at = GREATEST(COALESCE(packed_at, 0), ?) WHERE id = 1",
            (at,),
        )
        .await?;
    }
    let mut after: Vec<u8> = Vec::new();
    let mut copied = 0u64;
    loop {
        let page: Vec<ids::SetRowStored> = src
            .exec(
                "SELECT skey, n, at, segs FROM applied_id_sets WHERE skey > ? ORDER BY skey LIMIT 256",
                (after.as_slice(),),
            )
            .await?;
        let Some(last) = page.last() else {
            return Ok(copied);
        };
        after = last.0.clone();
        let mut tx = dst.start_transaction(TxOpts::default()).await?;
        ids::merge_sets(&mut tx, &page, (max_packet / 2).max(64 * 1024)).await?;
        tx.commit().await?;
        copied += page.len() as u64;
    }
}

/// Id rows of the counters in `spans` counted at `since` or later on one
/// server (the verification: a target must hold at least the source's;
/// older ones may be expiring on either side).
pub async fn count_ids(conn: &mut Conn, spans: &[Span], since: i64) -> Result<u64, DbError> {
    let mut n = 0u64;
    for s in spans {
        let c: Option<i64> = conn
            .exec_first(
                "SELECT COUNT(*) FROM applied_ids WHERE ring_pos BETWEEN ? AND ? AND at >= ?",
                (s.start, s.end, since),
            )
            .await?;
        n += c.unwrap_or(0) as u64;
    }
    Ok(n)
}

/// Inserts id rows (primary-key order) in chunks, keeping rows present.
async fn insert_ids(tx: &mut mysql_async::Transaction<'_>, ids: &[IdRow]) -> Result<(), DbError> {
    for chunk in ids.chunks(256) {
        let mut sql = String::from(
            "INSERT IGNORE INTO applied_ids (ns, ckey, id, ring_pos, at, src) VALUES ",
        );
        let mut params: Vec<Value> = Vec::with_capacity(chunk.len() * 6);
        for (i, (ns, key, id, pos, at, src)) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str("(?, ?, ?, ?, ?, ?)");
            params.extend([
                ns.as_slice().into(),
                key.as_slice().into(),
                id.as_slice().into(),
                Value::UInt(*pos),
                Value::Int(*at),
                Value::UInt(*src),
            ]);
        }
        tx.exec_drop(sql, params).await?;
    }
    Ok(())
}

/// Copies a chunk: inserts its marker and adds its rows (and inserts its
/// counters' event ids) on the target in one transaction. `false` when the marker exists (copied before: a retry
/// after a lost COMMIT answer, or another driver), in which case nothing is
/// applied.
#[allow(clippy::too_many_arguments)]
pub async fn copy_span(
    conn: &mut Conn,
    max_packet: usize,
    reshard_id: &str,
    source: &str,
    span: Span,
    rows: &FlushRows,
    ids: &[IdRow],
    sums: ChunkSums,
) -> Result<bool, DbError> {
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    let marker = tx
        .exec_drop(
            "INSERT INTO reshard_chunks (reshard_id, range_start, range_end, source, row_count, counters, total_sum) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
            (reshard_id, span.start, span.end, source, sums.rows, sums.counters, sums.total_sum),
        )
        .await;
    match marker {
        Ok(()) => {}
        Err(mysql_async::Error::Server(e)) if e.code == db::ER_DUP_ENTRY => {
            tx.rollback().await?;
            return Ok(false);
        }
        Err(e) => return Err(e.into()),
    }
    // Under the target's watermark, read with a shared lock: its rollup
    // cannot move between this conversion and the commit (and one summing
    // the hour at the watermark from an older snapshot sums it again).
    let watermark = rollup::enter(&mut tx, rows.minutes.or(Some((i64::MIN, i64::MAX)))).await?;
    rows::upsert(&mut tx, max_packet, &rollup::conform(rows, watermark)).await?;
    insert_ids(&mut tx, ids).await?;
    tx.commit().await?;
    Ok(true)
}

/// Undoes a copied chunk (cancel): deletes its marker and subtracts `rows`
/// (the source's rows of the span, unchanged since the copy because no
/// write reaches the source for a moved key) in one transaction. `false`
/// when the marker is already gone.
pub async fn undo_span(
    conn: &mut Conn,
    max_packet: usize,
    reshard_id: &str,
    span: Span,
    rows: &FlushRows,
) -> Result<bool, DbError> {
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    tx.exec_drop(
        "DELETE FROM reshard_chunks WHERE reshard_id = ? AND range_start = ?",
        (reshard_id, span.start),
    )
    .await?;
    if tx.affected_rows() == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    // What the copy added, as the target holds it now: its rollup may have
    // raised its watermark since.
    let watermark = rollup::enter(&mut tx, Some((i64::MIN, i64::MAX))).await?;
    let rows = rollup::conform(rows, watermark);
    let negated = FlushRows::stored(rows.tiers.clone().map(|(t, rows)| {
        (
            t,
            rows.into_iter()
                .map(|r| Row {
                    delta: -r.delta,
                    ..r
                })
                .collect(),
        )
    }));
    rows::upsert(&mut tx, max_packet, &negated).await?;
    tx.commit().await?;
    Ok(true)
}

/// The spans copied so far for `reshard_id` on a target (optionally only
/// those from `source`), in position order.
pub async fn copied_spans(q: &mut impl Queryable, reshard_id: &str) -> Result<Vec<Span>, DbError> {
    let rows: Vec<(u64, u64)> = q
        .exec(
            "SELECT range_start, range_end FROM reshard_chunks WHERE reshard_id = ? ORDER BY range_start",
            (reshard_id,),
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|(start, end)| Span { start, end })
        .collect())
}

/// What arrived on a target from `source`, per the markers.
pub async fn copied_sums(
    conn: &mut Conn,
    reshard_id: &str,
    source: &str,
) -> Result<ChunkSums, DbError> {
    let row: Option<(i64, i64, i64)> = conn
        .exec_first(
            "SELECT CAST(COALESCE(SUM(row_count), 0) AS SIGNED), CAST(COALESCE(SUM(counters), 0) AS SIGNED), \
             CAST(COALESCE(SUM(total_sum), 0) AS SIGNED) FROM reshard_chunks WHERE reshard_id = ? AND source = ?",
            (reshard_id, source),
        )
        .await?;
    let (rows, counters, total_sum) = row.unwrap_or_default();
    Ok(ChunkSums {
        rows: rows as u64,
        counters: counters as u64,
        total_sum,
    })
}

/// Counters and the sum of their totals a source holds in `spans`.
pub async fn source_sums(conn: &mut Conn, spans: &[Span]) -> Result<ChunkSums, DbError> {
    let mut sums = ChunkSums::default();
    for s in spans {
        let row: Option<(i64, i64)> = conn
            .exec_first(
                "SELECT COUNT(*), CAST(COALESCE(SUM(count), 0) AS SIGNED) FROM counter_total \
                 WHERE ring_pos BETWEEN ? AND ?",
                (s.start, s.end),
            )
            .await?;
        let (n, sum) = row.unwrap_or_default();
        sums.counters += n as u64;
        sums.total_sum += sum;
    }
    Ok(sums)
}

/// Rows of every tier a source holds in `spans` (for the progress ETA).
pub async fn count_rows(conn: &mut Conn, spans: &[Span]) -> Result<u64, DbError> {
    let mut n = 0u64;
    for s in spans {
        for t in TIERS {
            let from = match t {
                Tier::Minute => MINUTES_IN_SPAN.to_owned(),
                _ => format!("{} WHERE ring_pos BETWEEN ? AND ?", t.table()),
            };
            let c: Option<i64> = conn
                .exec_first(format!("SELECT COUNT(*) FROM {from}"), (s.start, s.end))
                .await?;
            n += c.unwrap_or(0) as u64;
        }
    }
    Ok(n)
}

/// Deletes at most `limit` rows of one table in `span` (the tiers, then
/// the event ids: [`TABLE_COUNT`]); the number deleted.
pub async fn delete_some(
    conn: &mut Conn,
    table_index: usize,
    span: Span,
    limit: usize,
) -> Result<u64, DbError> {
    let table = TIERS.get(table_index).map_or("applied_ids", |t| t.table());
    // The minute rows go first, while their counters' total rows (through
    // which they are found) are still there.
    let filter = if table_index == 0 {
        "(ns, ckey) IN (SELECT ns, ckey FROM counter_total WHERE ring_pos BETWEEN ? AND ?)"
    } else {
        "ring_pos BETWEEN ? AND ?"
    };
    conn.exec_drop(
        format!("DELETE FROM {table} WHERE {filter} LIMIT ?"),
        (span.start, span.end, limit as u64),
    )
    .await?;
    Ok(conn.affected_rows())
}

/// How many tables [`delete_some`] cycles through: the tiers and the ids.
pub const TABLE_COUNT: usize = TIERS.len() + 1;

/// Markers of `reshard_id` on a server (a target's replica catching up).
pub async fn marker_count(conn: &mut Conn, reshard_id: &str) -> Result<u64, DbError> {
    let n: Option<i64> = conn
        .exec_first(
            "SELECT COUNT(*) FROM reshard_chunks WHERE reshard_id = ?",
            (reshard_id,),
        )
        .await?;
    Ok(n.unwrap_or(0) as u64)
}

/// Whether `pos` lies in one of `spans` (sorted, disjoint).
pub fn covered(spans: &[Span], pos: u64) -> bool {
    let i = spans.partition_point(|s| s.end < pos);
    spans.get(i).is_some_and(|s| s.start <= pos)
}

/// Parameters of `ring_pos BETWEEN` filters, for callers building SQL.
pub fn span_params(spans: &[Span]) -> Vec<Value> {
    spans
        .iter()
        .flat_map(|s| [Value::UInt(s.start), Value::UInt(s.end)])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covered_finds_the_span_of_a_position() {
        let spans = [Span { start: 10, end: 20 }, Span { start: 30, end: 30 }];
        for (pos, want) in [
            (9, false),
            (10, true),
            (20, true),
            (21, false),
            (30, true),
            (31, false),
        ] {
            assert_eq!(covered(&spans, pos), want, "{pos}");
        }
        assert!(!covered(&[], 5));
    }
}
