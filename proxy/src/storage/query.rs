//! SQL for reads. Every function is one round trip on one connection and
//! takes values only as bound parameters.
//!
//! Range reads take a plan from [`crate::domain::planner`] and sum its pieces in a
//! single statement (`UNION ALL` of one subquery per piece).

use std::collections::HashMap;

use mysql_async::Value;
use mysql_async::prelude::*;

use crate::domain::planner::Piece;
use crate::domain::tier::Tier;
use crate::storage::db::DbError;

/// Builds `SELECT <cols> FROM tier WHERE ns = ? [AND ckey IN (...)] AND
/// bucket >= ? AND bucket < ?` for every piece, joined by `UNION ALL`.
fn pieces_union(
    pieces: &[Piece],
    cols: &str,
    ns: &str,
    keys: Option<&[&str]>,
    params: &mut Vec<Value>,
) -> String {
    let key_filter = match keys {
        Some(keys) => format!(" AND ckey IN ({})", vec!["?"; keys.len()].join(",")),
        None => String::new(),
    };
    let mut parts = Vec::with_capacity(pieces.len());
    for p in pieces {
        parts.push(format!(
            "SELECT {cols} FROM {} WHERE ns = ?{key_filter} AND bucket >= ? AND bucket < ?",
            p.tier.table()
        ));
        params.push(Value::from(ns));
        for k in keys.unwrap_or_default() {
            params.push(Value::from(*k));
        }
        params.push(Value::Int(p.start));
        params.push(Value::Int(p.end));
    }
    parts.join(" UNION ALL ")
}

/// The stored all-time total of one counter (0 when absent).
pub async fn total(conn: &mut impl Queryable, ns: &str, key: &str) -> Result<i64, DbError> {
    let v: Option<i64> = conn
        .exec_first(
            "SELECT count FROM counter_total WHERE ns = ? AND ckey = ?",
            (ns, key),
        )
        .await?;
    Ok(v.unwrap_or(0))
}

/// The stored count of one counter over a planned range.
pub async fn count(
    conn: &mut impl Queryable,
    ns: &str,
    key: &str,
    pieces: &[Piece],
) -> Result<i64, DbError> {
    if pieces.is_empty() {
        return Ok(0);
    }
    let mut params = Vec::new();
    let inner = pieces_union(pieces, "count AS c", ns, Some(&[key]), &mut params);
    let sql = format!("SELECT CAST(COALESCE(SUM(c), 0) AS SIGNED) FROM ({inner}) AS t");
    let v: Option<i64> = conn.exec_first(sql, params).await?;
    Ok(v.unwrap_or(0))
}

/// A statement and its bound parameters.
pub struct Stmt {
    pub sql: String,
    pub params: Vec<Value>,
}

/// `SELECT bucket, count`: the stored non-zero buckets of one tier in
/// `[from, to)`, ascending.
pub fn series_stmt(ns: &str, key: &str, tier: Tier, from: i64, to: i64) -> Stmt {
    Stmt {
        sql: format!(
            "SELECT bucket, count FROM {} WHERE ns = ? AND ckey = ? AND bucket >= ? AND bucket < ? AND count <> 0 ORDER BY bucket",
            tier.table()
        ),
        params: vec![
            Value::from(ns),
            Value::from(key),
            Value::Int(from),
            Value::Int(to),
        ],
    }
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
            let inner = pieces_union(pieces, "ckey, count AS c", ns, Some(keys), &mut params);
            format!("SELECT ckey, CAST(SUM(c) AS SIGNED) AS c FROM ({inner}) AS t GROUP BY ckey")
        }
    };
    Some(Stmt { sql, params })
}

/// The top `limit` keys of a namespace by stored count (all-time without a
/// plan), non-zero only, ties by key ascending (bytewise, as VARBINARY sorts).
pub async fn top(
    conn: &mut impl Queryable,
    ns: &str,
    pieces: Option<&[Piece]>,
    limit: usize,
) -> Result<Vec<(Vec<u8>, i64)>, DbError> {
    let mut params = Vec::new();
    let sql = match pieces {
        None => {
            params.push(Value::from(ns));
            "SELECT ckey, count FROM counter_total WHERE ns = ? AND count <> 0 ORDER BY count DESC, ckey ASC LIMIT ?".to_owned()
        }
        Some([]) => return Ok(Vec::new()),
        Some(pieces) => {
            let inner = pieces_union(pieces, "ckey, count AS c", ns, None, &mut params);
            format!(
                "SELECT ckey, CAST(SUM(c) AS SIGNED) AS s FROM ({inner}) AS t GROUP BY ckey HAVING s <> 0 ORDER BY s DESC, ckey ASC LIMIT ?"
            )
        }
    };
    params.push(Value::UInt(limit as u64));
    Ok(conn.exec(sql, params).await?)
}
