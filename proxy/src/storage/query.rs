//! SQL for reads. Every function is one round trip on one connection and
//! takes values only as bound parameters.
//!
//! Range reads take a plan from [`crate::domain::planner`] and sum its pieces in a
//! single statement (`UNION ALL` of one subquery per piece). An hour or day
//! piece also reads the minute rows of its span at or above the group's
//! rollup watermark, in the same statement and so the same snapshot: the
//! tiers hold only what is below it (`storage::rollup`).

use std::collections::HashMap;

use mysql_async::Value;
use mysql_async::prelude::*;

use crate::domain::planner::Piece;
use crate::domain::tier::Tier;
use crate::storage::db::DbError;
use crate::storage::reshard_sql::{Span, span_params};
use crate::storage::rollup::WATERMARK_SQL;

/// Which ring positions a top-K statement ranks: only those inside some
/// spans (keys a running reshard moves between two groups), or only those
/// outside them (every other key; all of them outside no span).
#[derive(Clone, Copy, Debug)]
pub enum Positions<'a> {
    Within(&'a [Span]),
    Outside(&'a [Span]),
}

impl Positions<'_> {
    /// ` AND [NOT ](ring_pos BETWEEN ? AND ? OR ...)` and its parameters;
    /// `None` when no position qualifies.
    fn filter(self) -> Option<(String, Vec<Value>)> {
        let (spans, not) = match self {
            Positions::Outside([]) => return Some((String::new(), Vec::new())),
            Positions::Within([]) => return None,
            Positions::Within(spans) => (spans, ""),
            Positions::Outside(spans) => (spans, "NOT "),
        };
        let sql = format!(
            " AND {not}({})",
            vec!["ring_pos BETWEEN ? AND ?"; spans.len()].join(" OR ")
        );
        Some((sql, span_params(spans)))
    }
}

/// Builds `SELECT <cols> FROM tier WHERE ns = ? [AND ckey IN (...)]
/// [<position filter>] AND bucket >= ? AND bucket < ?` for every piece,
/// joined by `UNION ALL`.
fn pieces_union(
    pieces: &[Piece],
    cols: &str,
    ns: &str,
    keys: Option<&[&str]>,
    positions: (&str, &[Value]),
    params: &mut Vec<Value>,
) -> String {
    let key_filter = match keys {
        Some(keys) => format!(" AND ckey IN ({})", vec!["?"; keys.len()].join(",")),
        None => String::new(),
    };
    let (pos_filter, pos_params) = positions;
    let mut parts = Vec::with_capacity(pieces.len());
    let mut push = |table: &str, lower: &str, p: &Piece, params: &mut Vec<Value>| {
        parts.push(format!(
            "SELECT {cols} FROM {table} WHERE ns = ?{key_filter}{pos_filter} AND bucket >= {lower} AND bucket < ?"
        ));
        params.push(Value::from(ns));
        for k in keys.unwrap_or_default() {
            params.push(Value::from(*k));
        }
        params.extend_from_slice(pos_params);
        params.push(Value::Int(p.start));
        params.push(Value::Int(p.end));
    };
    for p in pieces {
        push(p.tier.table(), "?", p, params);
        // Hour and day rows hold only the minutes below the rollup
        // watermark (`storage::rollup`); the piece's minutes at or above
        // it come from minute rows, read in the same snapshot.
        if matches!(p.tier, Tier::Hour | Tier::Day) {
            let lower = format!("GREATEST(?, {WATERMARK_SQL})");
            push(Tier::Minute.table(), &lower, p, params);
        }
    }
    parts.join(" UNION ALL ")
}

/// The statement of [`total`]; binds `(ns, key)`.
const TOTAL_SQL: &str = "SELECT count FROM counter_total WHERE ns = ? AND ckey = ?";

/// The stored all-time total of one counter (0 when absent).
pub async fn total(conn: &mut impl Queryable, ns: &str, key: &str) -> Result<i64, DbError> {
    let v: Option<i64> = conn.exec_first(TOTAL_SQL, (ns, key)).await?;
    Ok(v.unwrap_or(0))
}

/// The stored count of one counter over a planned range.
pub async fn count(
    conn: &mut impl Queryable,
    ns: &str,
    key: &str,
    pieces: &[Piece],
) -> Result<i64, DbError> {
    let Some(Stmt { sql, params }) = count_stmt(ns, key, pieces) else {
        return Ok(0);
    };
    let v: Option<i64> = conn.exec_first(sql, params).await?;
    Ok(v.unwrap_or(0))
}

/// `SELECT sum`: the statement of [`count`]; `None` for an empty plan
/// (the count is 0 without asking).
pub fn count_stmt(ns: &str, key: &str, pieces: &[Piece]) -> Option<Stmt> {
    if pieces.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    let inner = pieces_union(
        pieces,
        "count AS c",
        ns,
        Some(&[key]),
        ("", &[]),
        &mut params,
    );
    let sql = format!("SELECT CAST(COALESCE(SUM(c), 0) AS SIGNED) FROM ({inner}) AS t");
    Some(Stmt { sql, params })
}

/// A statement and its bound parameters.
pub struct Stmt {
    pub sql: String,
    pub params: Vec<Value>,
}

/// `SELECT bucket, count`: the stored non-zero buckets of one tier in
/// `[from, to)`, ascending. Hour and day buckets add the minute rows at or
/// above the rollup watermark, summed per bucket, to the rows below it.
pub fn series_stmt(ns: &str, key: &str, tier: Tier, from: i64, to: i64) -> Stmt {
    let mut params = vec![
        Value::from(ns),
        Value::from(key),
        Value::Int(from),
        Value::Int(to),
    ];
    let sql = match tier.width() {
        Some(width) if tier != Tier::Minute => {
            params.extend_from_slice(&params.clone());
            format!(
                "SELECT b, CAST(SUM(c) AS SIGNED) AS s FROM (\
                 SELECT bucket AS b, count AS c FROM {} WHERE ns = ? AND ckey = ? AND bucket >= ? AND bucket < ? \
                 UNION ALL SELECT CAST(FLOOR(bucket / {width}) * {width} AS SIGNED) AS b, count AS c FROM counter_minute \
                 WHERE ns = ? AND ckey = ? AND bucket >= GREATEST(?, {WATERMARK_SQL}) AND bucket < ?\
                 ) AS t GROUP BY b HAVING s <> 0 ORDER BY b",
                tier.table()
            )
        }
        _ => format!(
            "SELECT bucket, count FROM {} WHERE ns = ? AND ckey = ? AND bucket >= ? AND bucket < ? AND count <> 0 ORDER BY bucket",
            tier.table()
        ),
    };
    Stmt { sql, params }
}

/// Stored non-zero buckets of one tier in `[from, to)`, ascending.
pub async fn series(
    conn: &mut impl Queryable,
    ns: &str,
    key: &str,
    tier: Tier,
    from: i64,
    to: i64,
) -> Result<Vec<(i64, i64)>, DbError> {
    let Stmt { sql, params } = series_stmt(ns, key, tier, from, to);
    Ok(conn.exec(sql, params).await?)
}

/// Stored totals (no plan) or range counts (with a plan) of many keys of
/// one namespace; absent keys are absent from the map.
pub async fn counts(
    conn: &mut impl Queryable,
    ns: &str,
    keys: &[&str],
    pieces: Option<&[Piece]>,
) -> Result<HashMap<Vec<u8>, i64>, DbError> {
    let Some(Stmt { sql, params }) = counts_stmt(ns, keys, pieces) else {
        return Ok(HashMap::new());
    };
    let rows: Vec<(Vec<u8>, i64)> = conn.exec(sql, params).await?;
    Ok(rows.into_iter().collect())
}

/// `SELECT ckey, count`: the statement of [`counts`]; `None` when it could
/// find nothing (no keys, or an empty plan).
pub fn counts_stmt(ns: &str, keys: &[&str], pieces: Option<&[Piece]>) -> Option<Stmt> {
    if keys.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    let sql = match pieces {
        None => {
            params.push(Value::from(ns));
            params.extend(keys.iter().map(|k| Value::from(*k)));
            format!(
                "SELECT ckey, count FROM counter_total WHERE ns = ? AND ckey IN ({})",
                vec!["?"; keys.len()].join(",")
            )
        }
        Some([]) => return None,
        Some(pieces) => {
            let inner = pieces_union(
                pieces,
                "ckey, count AS c",
                ns,
                Some(keys),
                ("", &[]),
                &mut params,
            );
            format!("SELECT ckey, CAST(SUM(c) AS SIGNED) AS c FROM ({inner}) AS t GROUP BY ckey")
        }
    };
    Some(Stmt { sql, params })
}

/// Stored counts of many keys of one namespace over a planned range, like
/// [`counts`] with a plan, but without the derived table and its `GROUP
/// BY`: the rows of every piece come back (`UNION ALL`, at most a few per
/// key and piece) and are summed here. A coalesced read's statement; on
/// a replica this saves the two temporary tables of the derived form.
/// Sums beyond 64 bits saturate, as `CAST(... AS SIGNED)` does.
pub async fn range_counts(
    conn: &mut impl Queryable,
    ns: &str,
    keys: &[&str],
    pieces: &[Piece],
) -> Result<HashMap<Vec<u8>, i64>, DbError> {
    let Some(Stmt { sql, params }) = range_rows_stmt(ns, keys, pieces) else {
        return Ok(HashMap::new());
    };
    let rows: Vec<(Vec<u8>, i64)> = conn.exec(sql, params).await?;
    Ok(summed(rows))
}

/// `SELECT ckey, count ... UNION ALL ...`: the statement of
/// [`range_counts`]; `None` when it could find nothing.
pub fn range_rows_stmt(ns: &str, keys: &[&str], pieces: &[Piece]) -> Option<Stmt> {
    if keys.is_empty() || pieces.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    let sql = pieces_union(
        pieces,
        "ckey, count",
        ns,
        Some(keys),
        ("", &[]),
        &mut params,
    );
    Some(Stmt { sql, params })
}

/// Per key, the sum of its rows (saturating at the 64-bit bounds).
fn summed(rows: Vec<(Vec<u8>, i64)>) -> HashMap<Vec<u8>, i64> {
    let mut sums: HashMap<Vec<u8>, i128> = HashMap::new();
    for (k, c) in rows {
        *sums.entry(k).or_default() += i128::from(c);
    }
    sums.into_iter()
        .map(|(k, s)| (k, s.clamp(i64::MIN.into(), i64::MAX.into()) as i64))
        .collect()
}

/// The top `limit` keys of a namespace by stored count (all-time without a
/// plan), non-zero only, ties by key ascending (bytewise, as VARBINARY
/// sorts), among the keys at `positions`. In rank order: the last row
/// is the lowest ranked, which bounds every key not listed.
pub async fn top(
    conn: &mut impl Queryable,
    ns: &str,
    pieces: Option<&[Piece]>,
    limit: usize,
    positions: Positions<'_>,
) -> Result<Vec<(Vec<u8>, i64)>, DbError> {
    let Some(Stmt { sql, params }) = top_stmt(ns, pieces, limit, positions) else {
        return Ok(Vec::new());
    };
    Ok(conn.exec(sql, params).await?)
}

/// `SELECT ckey, sum ... ORDER BY ... LIMIT ?`: the statement of [`top`];
/// `None` when nothing can rank (an empty plan, no position).
pub fn top_stmt(
    ns: &str,
    pieces: Option<&[Piece]>,
    limit: usize,
    positions: Positions<'_>,
) -> Option<Stmt> {
    let (filter, filter_params) = positions.filter()?;
    let mut params = Vec::new();
    let sql = match pieces {
        None => {
            params.push(Value::from(ns));
            params.extend(filter_params);
            format!(
                "SELECT ckey, count FROM counter_total WHERE ns = ?{filter} AND count <> 0 ORDER BY count DESC, ckey ASC LIMIT ?"
            )
        }
        Some([]) => return None,
        Some(pieces) => {
            let inner = pieces_union(
                pieces,
                "ckey, count AS c",
                ns,
                None,
                (&filter, &filter_params),
                &mut params,
            );
            format!(
                "SELECT ckey, CAST(SUM(c) AS SIGNED) AS s FROM ({inner}) AS t GROUP BY ckey HAVING s <> 0 ORDER BY s DESC, ckey ASC LIMIT ?"
            )
        }
    };
    params.push(Value::UInt(limit as u64));
    Some(Stmt { sql, params })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::planner::plan;

    #[test]
    fn range_rows_are_summed_per_key_and_saturate() {
        let rows = vec![
            (b"a".to_vec(), 3),
            (b"b".to_vec(), -1),
            (b"a".to_vec(), 4),
            (b"c".to_vec(), i64::MAX),
            (b"c".to_vec(), 1),
        ];
        let sums = summed(rows);
        assert_eq!(sums[b"a".as_slice()], 7);
        assert_eq!(sums[b"b".as_slice()], -1);
        assert_eq!(sums[b"c".as_slice()], i64::MAX);
        let pieces = plan(0, 7200 + 120);
        let stmt = range_rows_stmt("n", &["x", "y"], &pieces).expect("statement");
        assert!(!stmt.sql.contains("GROUP BY") && !stmt.sql.contains("AS t"));
        assert_eq!(
            stmt.sql.matches("UNION ALL").count(),
            reads(&pieces).len() - 1
        );
        assert!(range_rows_stmt("n", &[], &pieces).is_none());
        assert!(range_rows_stmt("n", &["x"], &[]).is_none());
    }

    // 2024-01-01T00:00Z, a day boundary.
    const DAY0: i64 = 1_704_067_200;

    fn s(v: &str) -> Value {
        Value::Bytes(v.as_bytes().to_vec())
    }

    fn piece(tier: Tier, start: i64, end: i64) -> Piece {
        Piece { tier, start, end }
    }

    /// A plan with all three tiers: minutes, then hours, then a day.
    fn three_pieces() -> Vec<Piece> {
        vec![
            piece(Tier::Minute, DAY0 - 3600 - 600, DAY0 - 3600),
            piece(Tier::Hour, DAY0 - 3600, DAY0),
            piece(Tier::Day, DAY0, DAY0 + 86_400),
        ]
    }

    /// The selects a plan's statement makes, in order: each piece, and
    /// after an hour or day piece the same span's minute rows at or above
    /// the watermark (`true`).
    fn reads(pieces: &[Piece]) -> Vec<(Piece, bool)> {
        pieces
            .iter()
            .flat_map(|p| {
                let complement = (p.tier != Tier::Minute).then_some((*p, true));
                std::iter::once((*p, false)).chain(complement)
            })
            .collect()
    }

    fn placeholders(stmt: &Stmt) -> usize {
        stmt.sql.matches('?').count()
    }

    #[test]
    fn the_total_reads_one_row_by_its_primary_key() {
        assert_eq!(
            TOTAL_SQL,
            "SELECT count FROM counter_total WHERE ns = ? AND ckey = ?"
        );
    }

    #[test]
    fn pieces_union_selects_each_piece_from_its_tier_with_its_bounds() {
        let mut params = Vec::new();
        let sql = pieces_union(
            &three_pieces(),
            "count AS c",
            "views",
            Some(&["a", "b"]),
            ("", &[]),
            &mut params,
        );
        let parts: Vec<&str> = sql.split(" UNION ALL ").collect();
        let above = format!(
            "SELECT count AS c FROM counter_minute WHERE ns = ? AND ckey IN (?,?) AND bucket >= GREATEST(?, {WATERMARK_SQL}) AND bucket < ?"
        );
        assert_eq!(
            parts,
            [
                "SELECT count AS c FROM counter_minute WHERE ns = ? AND ckey IN (?,?) AND bucket >= ? AND bucket < ?",
                "SELECT count AS c FROM counter_hour WHERE ns = ? AND ckey IN (?,?) AND bucket >= ? AND bucket < ?",
                &above,
                "SELECT count AS c FROM counter_day WHERE ns = ? AND ckey IN (?,?) AND bucket >= ? AND bucket < ?",
                &above,
            ]
        );
        // Per select, in placeholder order: ns, the keys, [start, end).
        let mut want = Vec::new();
        for (p, _) in reads(&three_pieces()) {
            want.extend([
                s("views"),
                s("a"),
                s("b"),
                Value::Int(p.start),
                Value::Int(p.end),
            ]);
        }
        assert_eq!(params, want);
        // Without keys: the whole namespace.
        let mut params = Vec::new();
        let sql = pieces_union(
            &[piece(Tier::Hour, DAY0, DAY0 + 7200)],
            "ckey, count AS c",
            "views",
            None,
            ("", &[]),
            &mut params,
        );
        assert_eq!(
            sql,
            format!(
                "SELECT ckey, count AS c FROM counter_hour WHERE ns = ? AND bucket >= ? AND bucket < ? UNION ALL \
                 SELECT ckey, count AS c FROM counter_minute WHERE ns = ? AND bucket >= GREATEST(?, {WATERMARK_SQL}) AND bucket < ?"
            )
        );
        assert_eq!(
            params,
            [s("views"), Value::Int(DAY0), Value::Int(DAY0 + 7200)]
                .iter()
                .cycle()
                .take(6)
                .cloned()
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn count_sums_every_piece_of_one_counter_in_one_statement() {
        let pieces = three_pieces();
        let stmt = count_stmt("views", "BV1x", &pieces).expect("a plan");
        let inner = stmt
            .sql
            .strip_prefix("SELECT CAST(COALESCE(SUM(c), 0) AS SIGNED) FROM (")
            .and_then(|r| r.strip_suffix(") AS t"))
            .unwrap_or_else(|| panic!("not a sum over a union: {}", stmt.sql));
        assert_eq!(inner.matches("SELECT count AS c FROM ").count(), 5);
        assert_eq!(inner.matches(" AND ckey IN (?) AND ").count(), 5);
        let want: Vec<Value> = reads(&pieces)
            .into_iter()
            .flat_map(|(p, _)| {
                [
                    s("views"),
                    s("BV1x"),
                    Value::Int(p.start),
                    Value::Int(p.end),
                ]
            })
            .collect();
        assert_eq!(stmt.params, want);
        assert_eq!(placeholders(&stmt), stmt.params.len());
        // An empty range needs no round trip.
        assert!(count_stmt("views", "BV1x", &[]).is_none());
    }

    #[test]
    fn a_planned_range_becomes_one_select_per_piece() {
        // 2023-12-31T22:50Z to 2024-01-02T01:10Z: minutes, hours, one
        // whole day, hours, minutes.
        let pieces = plan(DAY0 - 4200, DAY0 + 86_400 + 4200);
        assert_eq!(pieces.len(), 5);
        let stmt = count_stmt("views", "a", &pieces).expect("a plan");
        // Two minute pieces, and the minutes above the watermark of each
        // of the three hour and day pieces.
        assert_eq!(
            stmt.sql
                .matches("SELECT count AS c FROM counter_minute")
                .count(),
            5
        );
        assert_eq!(
            stmt.sql
                .matches("SELECT count AS c FROM counter_hour")
                .count(),
            2
        );
        assert_eq!(
            stmt.sql
                .matches("SELECT count AS c FROM counter_day")
                .count(),
            1
        );
        assert_eq!(stmt.params.len(), 8 * 4);
        assert_eq!(placeholders(&stmt), stmt.params.len());
    }

    #[test]
    fn counts_of_many_keys_bind_them_in_request_order() {
        let keys = ["k3", "k1", "k2"];
        // Totals: one primary-key lookup per key.
        let stmt = counts_stmt("views", &keys, None).expect("keys");
        assert_eq!(
            stmt.sql,
            "SELECT ckey, count FROM counter_total WHERE ns = ? AND ckey IN (?,?,?)"
        );
        assert_eq!(stmt.params, [s("views"), s("k3"), s("k1"), s("k2")]);
        // Over a range: every piece filters the same keys, summed per key.
        let pieces = three_pieces();
        let stmt = counts_stmt("views", &keys, Some(&pieces)).expect("keys and a plan");
        assert!(
            stmt.sql
                .starts_with("SELECT ckey, CAST(SUM(c) AS SIGNED) AS c FROM ("),
            "{}",
            stmt.sql
        );
        assert!(stmt.sql.ends_with(") AS t GROUP BY ckey"), "{}", stmt.sql);
        assert_eq!(stmt.sql.matches("SELECT ckey, count AS c FROM ").count(), 5);
        assert_eq!(stmt.sql.matches(" AND ckey IN (?,?,?) AND ").count(), 5);
        assert_eq!(stmt.params.len(), 5 * (1 + keys.len() + 2));
        for (i, (p, _)) in reads(&pieces).iter().enumerate() {
            assert_eq!(
                stmt.params[i * 6..(i + 1) * 6],
                [
                    s("views"),
                    s("k3"),
                    s("k1"),
                    s("k2"),
                    Value::Int(p.start),
                    Value::Int(p.end)
                ]
            );
        }
        assert_eq!(placeholders(&stmt), stmt.params.len());
        // Nothing to find: no statement.
        assert!(counts_stmt("views", &[], None).is_none());
        assert!(counts_stmt("views", &[], Some(&pieces)).is_none());
        assert!(counts_stmt("views", &keys, Some(&[])).is_none());
    }

    #[test]
    fn series_reads_non_zero_buckets_of_one_tier_ascending() {
        let bounds = [
            s("views"),
            s("a"),
            Value::Int(DAY0),
            Value::Int(DAY0 + 86_400),
        ];
        let stmt = series_stmt("views", "a", Tier::Minute, DAY0, DAY0 + 86_400);
        assert_eq!(
            stmt.sql,
            "SELECT bucket, count FROM counter_minute WHERE ns = ? AND ckey = ? AND bucket >= ? AND bucket < ? AND count <> 0 ORDER BY bucket"
        );
        assert_eq!(stmt.params, bounds);
        // Hours and days: their rows below the watermark and the minutes
        // at or above it, summed per bucket.
        for (tier, table, width) in [
            (Tier::Hour, "counter_hour", 3600),
            (Tier::Day, "counter_day", 86_400),
        ] {
            let stmt = series_stmt("views", "a", tier, DAY0, DAY0 + 86_400);
            assert_eq!(
                stmt.sql,
                format!(
                    "SELECT b, CAST(SUM(c) AS SIGNED) AS s FROM (\
                     SELECT bucket AS b, count AS c FROM {table} WHERE ns = ? AND ckey = ? AND bucket >= ? AND bucket < ? \
                     UNION ALL SELECT CAST(FLOOR(bucket / {width}) * {width} AS SIGNED) AS b, count AS c FROM counter_minute \
                     WHERE ns = ? AND ckey = ? AND bucket >= GREATEST(?, {WATERMARK_SQL}) AND bucket < ?\
                     ) AS t GROUP BY b HAVING s <> 0 ORDER BY b"
                )
            );
            assert_eq!(stmt.params, [bounds.clone(), bounds.clone()].concat());
            assert_eq!(placeholders(&stmt), stmt.params.len());
        }
    }

    #[test]
    fn top_ranks_by_count_then_key_and_binds_the_limit_last() {
        // All time: the totals of the namespace.
        let stmt = top_stmt("views", None, 10, Positions::Outside(&[])).expect("all time");
        assert_eq!(
            stmt.sql,
            "SELECT ckey, count FROM counter_total WHERE ns = ? AND count <> 0 ORDER BY count DESC, ckey ASC LIMIT ?"
        );
        assert_eq!(stmt.params, [s("views"), Value::UInt(10)]);
        // Over a range: per-key sums of every piece, zero sums dropped.
        let pieces = three_pieces();
        let stmt = top_stmt("views", Some(&pieces), 1000, Positions::Outside(&[])).expect("a plan");
        assert!(
            stmt.sql
                .starts_with("SELECT ckey, CAST(SUM(c) AS SIGNED) AS s FROM ("),
            "{}",
            stmt.sql
        );
        assert!(
            stmt.sql
                .ends_with(") AS t GROUP BY ckey HAVING s <> 0 ORDER BY s DESC, ckey ASC LIMIT ?"),
            "{}",
            stmt.sql
        );
        // The whole namespace: no key filter.
        assert!(!stmt.sql.contains("ckey IN"), "{}", stmt.sql);
        let mut want = Vec::new();
        for (p, _) in reads(&pieces) {
            want.extend([s("views"), Value::Int(p.start), Value::Int(p.end)]);
        }
        want.push(Value::UInt(1000));
        assert_eq!(stmt.params, want);
        assert_eq!(placeholders(&stmt), stmt.params.len());
        // An empty range ranks nothing.
        assert!(top_stmt("views", Some(&[]), 10, Positions::Outside(&[])).is_none());
    }

    #[test]
    fn top_ranks_only_the_positions_asked_for_and_always_carries_a_limit() {
        let spans = [Span { start: 10, end: 19 }, Span { start: 40, end: 49 }];
        let span_params = [
            Value::UInt(10),
            Value::UInt(19),
            Value::UInt(40),
            Value::UInt(49),
        ];
        // All time: one filter on the totals, then the limit.
        for (positions, not) in [
            (Positions::Within(&spans), ""),
            (Positions::Outside(&spans), "NOT "),
        ] {
            let stmt = top_stmt("views", None, 20, positions).expect("positions");
            assert_eq!(
                stmt.sql,
                format!(
                    "SELECT ckey, count FROM counter_total WHERE ns = ? AND {not}(ring_pos BETWEEN ? AND ? OR ring_pos BETWEEN ? AND ?) AND count <> 0 ORDER BY count DESC, ckey ASC LIMIT ?"
                )
            );
            let mut want = vec![s("views")];
            want.extend(span_params.clone());
            want.push(Value::UInt(20));
            assert_eq!(stmt.params, want);
            assert_eq!(placeholders(&stmt), stmt.params.len());
        }
        // Over a range: every piece filters the same positions.
        let pieces = three_pieces();
        let stmt = top_stmt("views", Some(&pieces), 7, Positions::Within(&spans)).expect("plan");
        assert_eq!(
            stmt.sql
                .matches(
                    " AND (ring_pos BETWEEN ? AND ? OR ring_pos BETWEEN ? AND ?) AND bucket >= "
                )
                .count(),
            5,
            "{}",
            stmt.sql
        );
        assert!(stmt.sql.ends_with(" LIMIT ?"), "{}", stmt.sql);
        let mut want = Vec::new();
        for (p, _) in reads(&pieces) {
            want.push(s("views"));
            want.extend(span_params.clone());
            want.extend([Value::Int(p.start), Value::Int(p.end)]);
        }
        want.push(Value::UInt(7));
        assert_eq!(stmt.params, want);
        assert_eq!(placeholders(&stmt), stmt.params.len());
        // No span: within none ranks nothing, outside none ranks all.
        assert!(top_stmt("views", None, 5, Positions::Within(&[])).is_none());
        assert_eq!(
            top_stmt("views", None, 5, Positions::Outside(&[]))
                .expect("all")
                .sql,
            top_stmt("views", None, 5, Positions::Outside(&[]))
                .expect("all")
                .sql
        );
    }

    #[test]
    fn values_are_bound_never_spliced() {
        let hostile = "'; DROP TABLE counter_total; --";
        let pieces = three_pieces();
        let stmts = [
            count_stmt(hostile, hostile, &pieces).expect("plan"),
            counts_stmt(hostile, &[hostile], None).expect("keys"),
            counts_stmt(hostile, &[hostile], Some(&pieces)).expect("plan"),
            series_stmt(hostile, hostile, Tier::Minute, DAY0, DAY0 + 60),
            top_stmt(hostile, None, 5, Positions::Outside(&[])).expect("all time"),
            top_stmt(hostile, Some(&pieces), 5, Positions::Outside(&[])).expect("plan"),
        ];
        for stmt in stmts {
            assert!(!stmt.sql.contains("DROP"), "{}", stmt.sql);
            assert!(!stmt.sql.contains('\''), "{}", stmt.sql);
            assert_eq!(stmt.params[0], s(hostile));
            assert_eq!(placeholders(&stmt), stmt.params.len());
        }
    }
}
