//! Reads of keys in a range a running reshard moves.
//!
//! The target master is read in one consistent snapshot together with the
//! reshard's copy markers; keys whose position no marker covers are then
//! read on the source master and added. The target is read *first*: a copy
//! that commits between the two reads is then not seen on the target, and
//! the source still holds those rows (cleanup waits out a grace period), so
//! every row is counted exactly once. Strong reads add both groups' pending
//! deltas within unchanged commit epochs of both buffers.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use mysql_async::{IsolationLevel, TxOpts, Value};
use tally_admin::{ShardRing, routing_key};

use super::sql::{self, Span};
use crate::app::App;
use crate::db::{self, DbError, Tier};
use crate::error::ApiError;
use crate::planner::{self, Piece};
use crate::query;
use crate::shard_map::{GroupHandle, Moved};

/// Up to this many keys, a read probes the marker of each key instead of
/// reading every marker of the reshard.
const FEW_KEYS: usize = 8;

/// What to read for a set of keys of one namespace.
#[derive(Clone, Copy)]
pub enum Ask<'a> {
    /// Totals (`None`) or range counts, per key.
    Counts(Option<&'a [Piece]>),
    /// Non-zero buckets of one tier in `[from, to)` (one key).
    Series { tier: Tier, from: i64, to: i64 },
}

/// The answer to an [`Ask`]; answers of two groups add up.
#[derive(Debug)]
pub enum Answer {
    Counts(HashMap<Vec<u8>, i64>),
    Series(BTreeMap<i64, i64>),
}

impl Answer {
    fn add(&mut self, other: Answer) {
        match (self, other) {
            (Answer::Counts(a), Answer::Counts(b)) => {
                for (k, v) in b {
                    *a.entry(k).or_default() += v;
                }
            }
            (Answer::Series(a), Answer::Series(b)) => {
                for (k, v) in b {
                    *a.entry(k).or_default() += v;
                }
            }
            _ => {}
        }
    }

    pub fn into_counts(self) -> HashMap<Vec<u8>, i64> {
        match self {
            Answer::Counts(c) => c,
            Answer::Series(_) => HashMap::new(),
        }
    }

    pub fn into_series(self) -> BTreeMap<i64, i64> {
        match self {
            Answer::Series(s) => s,
            Answer::Counts(_) => BTreeMap::new(),
        }
    }
}

async fn ask_on(
    q: &mut impl Queryable,
    ns: &str,
    keys: &[&str],
    ask: Ask<'_>,
) -> Result<Answer, DbError> {
    Ok(match ask {
        Ask::Counts(pieces) => Answer::Counts(query::counts(q, ns, keys, pieces).await?),
        Ask::Series { tier, from, to } => match keys.first() {
            Some(key) => Answer::Series(
                query::series(q, ns, key, tier, from, to)
                    .await?
                    .into_iter()
                    .collect(),
            ),
            None => Answer::Series(BTreeMap::new()),
        },
    })
}

/// Stored values of `keys` (all in ranges `mv` moves): target snapshot with
/// markers, then the source for keys not yet copied.
async fn stored(
    app: &App,
    mv: &Moved<'_>,
    ns: &str,
    keys: &[&str],
    ask: Ask<'_>,
) -> Result<Answer, ApiError> {
    let timeout = app.config.pool.connect_timeout;
    let unavailable = |g: &GroupHandle, e: DbError| {
        ApiError::Unavailable(format!("group {} cannot be read: {e}", g.name))
    };
    let on_target = async {
        let mut conn = db::conn(&mv.target.master.pool, timeout).await?;
        // One REPEATABLE READ transaction: its first read fixes the snapshot
        // both statements see (the level is set explicitly, since a server
        // may default to READ COMMITTED, where each statement would see a
        // newer state). `WITH CONSISTENT SNAPSHOT` is not needed: the
        // first read of the transaction fixes its snapshot.
        let opts = TxOpts::new()
            .with_isolation_level(IsolationLevel::RepeatableRead)
            .with_readonly(Some(true))
            .clone();
        let mut tx = conn.start_transaction(opts).await?;
        // A few keys: probe the marker covering each (a primary-key range
        // lookup); many keys: read the reshard's markers once.
        let spans = if keys.len() <= FEW_KEYS {
            let mut spans = Vec::new();
            for k in keys {
                let pos = ShardRing::position(&routing_key(ns, k));
                spans.extend(sql::span_at(&mut tx, mv.reshard_id, pos).await?);
            }
            spans.sort_by_key(|s| s.start);
            spans.dedup();
            spans
        } else {
            sql::copied_spans(&mut tx, mv.reshard_id).await?
        };
        let answer = ask_on(&mut tx, ns, keys, ask).await?;
        tx.commit().await?;
        Ok::<_, DbError>((spans, answer))
    };
    let (spans, mut answer): (Vec<Span>, Answer) = tokio::time::timeout(timeout, on_target)
        .await
        .unwrap_or(Err(DbError::Timeout(timeout)))
        .map_err(|e| unavailable(mv.target, e))?;
    let rest: Vec<&str> = keys
        .iter()
        .copied()
        .filter(|k| !sql::covered(&spans, ShardRing::position(&routing_key(ns, k))))
        .collect();
    if !rest.is_empty() {
        let on_source = async {
            let mut c = db::conn(&mv.source.master.pool, timeout).await?;
            ask_on(&mut c, ns, &rest, ask).await
        };
        let more = tokio::time::timeout(timeout, on_source)
            .await
            .unwrap_or(Err(DbError::Timeout(timeout)))
            .map_err(|e| unavailable(mv.source, e))?;
        answer.add(more);
    }
    Ok(answer)
}

/// Pending deltas of `keys` in one buffer, shaped like the ask's answer.
fn pending(
    group: &GroupHandle,
    ns: &str,
    keys: &[&str],
    ask: Ask<'_>,
    range: Option<(i64, i64)>,
) -> Answer {
    match ask {
        Ask::Counts(_) => Answer::Counts(
            keys.iter()
                .map(|k| {
                    let rk = routing_key(ns, k);
                    let sum = group
                        .buffer
                        .pending_sum(&rk, ShardRing::position(&rk), range);
                    (k.as_bytes().to_vec(), sum)
                })
                .collect(),
        ),
        Ask::Series { tier, from, to } => {
            let width = tier.width().unwrap_or(60);
            let mut out = BTreeMap::new();
            for k in keys.iter().take(1) {
                let rk = routing_key(ns, k);
                for (minute, d) in group.buffer.pending_minutes(&rk, ShardRing::position(&rk)) {
                    let b = planner::floor(minute, width);
                    if (from..to).contains(&b) {
                        *out.entry(b).or_default() += d;
                    }
                }
            }
            Answer::Series(out)
        }
    }
}

/// Reads `keys` of a moved range; `strong` adds both buffers' pending
/// deltas (for counts, those inside `range` when given).
pub async fn read(
    app: &App,
    mv: &Moved<'_>,
    ns: &str,
    keys: &[&str],
    ask: Ask<'_>,
    strong: bool,
    range: Option<(i64, i64)>,
) -> Result<Answer, ApiError> {
    if !strong {
        return stored(app, mv, ns, keys, ask).await;
    }
    let deadline = Instant::now() + app.config.pool.connect_timeout;
    while Instant::now() < deadline {
        let (Some(et), Some(es)) = (mv.target.buffer.read_epoch(), mv.source.buffer.read_epoch())
        else {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        let mut answer = pending(mv.target, ns, keys, ask, range);
        answer.add(pending(mv.source, ns, keys, ask, range));
        let stored = stored(app, mv, ns, keys, ask).await?;
        if mv.target.buffer.epoch_unchanged(et) && mv.source.buffer.epoch_unchanged(es) {
            answer.add(stored);
            return Ok(answer);
        }
    }
    Err(ApiError::Unavailable(format!(
        "groups {} and {} are committing batches whose outcome is not known yet; retry",
        mv.target.name, mv.source.name
    )))
}

/// Keys of `ns` a group stores inside `spans` (for an exact top-K while a
/// reshard splits some keys over two groups).
pub async fn keys_in(
    app: &App,
    group: &GroupHandle,
    ns: &str,
    spans: &[Span],
) -> Result<Vec<String>, ApiError> {
    if spans.is_empty() {
        return Ok(Vec::new());
    }
    let timeout = app.config.pool.connect_timeout;
    let filter = vec!["ring_pos BETWEEN ? AND ?"; spans.len()].join(" OR ");
    let sql = format!("SELECT ckey FROM counter_total WHERE ns = ? AND ({filter})");
    let mut params = vec![Value::from(ns)];
    params.extend(sql::span_params(spans));
    let work = async {
        let mut c = db::conn(&group.master.pool, timeout).await?;
        let keys: Vec<Vec<u8>> = c.exec(sql, params).await?;
        Ok::<_, DbError>(keys)
    };
    let keys = tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(DbError::Timeout(timeout)))
        .map_err(|e| ApiError::Unavailable(format!("group {} cannot be read: {e}", group.name)))?;
    Ok(keys
        .into_iter()
        .map(|k| String::from_utf8_lossy(&k).into_owned())
        .collect())
}
