//! Reads of keys in a range a running reshard moves.
//!
//! # Exactly once, per statement
//! A copy adds a chunk's rows to the target *and* inserts the chunk's
//! marker (`reshard_chunks`) in one transaction, so any consistent read of
//! the target sees either both or neither. A read of moved keys therefore
//! sends the target **one** `SELECT`: the asked rows `UNION ALL` the
//! markers that may cover the keys' positions. One InnoDB statement reads
//! every table it touches in one read view (at REPEATABLE READ, READ
//! COMMITTED or SERIALIZABLE with autocommit; READ UNCOMMITTED, which no
//! part of tally supports, would break this), so data and markers come from
//! the same committed state, with no transaction to open and commit. Then
//! per key:
//! - **covered** by a marker of that read: the target's rows are the whole
//!   value (the copied rows plus every write since the routing change,
//!   which all go to the target); the source is not counted;
//! - **not covered**: the target holds only writes since the routing
//!   change, and the source's rows are added. The source's moved rows are
//!   frozen once copying starts (every proxy settled the new ring first) and
//!   deleted only after verification plus `reshard.cleanup_grace`, which is
//!   at least `pool.connect_timeout`. The copy that covers the key commits
//!   after the target read, so the deletion starts more than a grace period
//!   after it; the source read ends no later than one read timeout after
//!   the target read began (one deadline bounds both), so it still sees
//!   every frozen row, and none of them is in the target's answer.
//!
//! Since a covered key ignores the source, the source may be read *at the
//! same time* as the target (its answer is kept only for keys the target
//! read does not cover): an increment flushed before the read began is on
//! the source then, or in the target's copied rows, never in both answers
//! that are kept. Keys whose chunk this proxy already saw copied skip the
//! source read; if the target read then does not cover one after all (a
//! cancel undid the copy), the source is read after it, still within the
//! deadline.
//!
//! # Replicas
//! An eventual read of keys whose chunks this proxy already saw copied
//! first asks a target **replica** the same statement. A replica applies
//! each copy transaction whole, so if its statement sees the marker it sees
//! the chunk's rows: for such keys its answer is exact up to its lag of the
//! target's own new writes (what any replica read may miss). Keys it does
//! not cover are read on the masters as above: a replica's "not copied"
//! can be older than the cleanup, so it never leads to a source read.
//! Strong reads use masters only. Both groups' pending deltas are added
//! within unchanged commit epochs of both buffers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use mysql_async::{Conn, Value};
use tally_admin::{ShardRing, routing_key};

use crate::app::App;
use crate::domain::count::{self, Sum};
use crate::domain::planner::{self, Piece};
use crate::domain::role::Role;
use crate::domain::tier::Tier;
use crate::error::ApiError;
use crate::storage::db::{self, DbError};
use crate::storage::query::{self, Stmt};
use crate::storage::reshard_sql::{self as sql, Span};
use crate::storage::shard_map::{GroupHandle, Moved, Node};
use crate::telemetry;

/// Up to this many keys, a read probes the marker at or before each key's
/// position; beyond, the probe at the lowest position and every marker up
/// to the highest.
const FEW_KEYS: usize = 8;

/// What to read for a set of keys of one namespace.
#[derive(Clone, Copy)]
pub enum Ask<'a> {
    /// Totals (`None`) or range counts, per key.
    Counts(Option<&'a [Piece]>),
    /// Non-zero buckets of one tier in `[from, to)` (one key).
    Series { tier: Tier, from: i64, to: i64 },
}

impl Ask<'_> {
    fn empty(self) -> Answer {
        match self {
            Ask::Counts(_) => Answer::Counts(HashMap::new()),
            Ask::Series { .. } => Answer::Series(BTreeMap::new()),
        }
    }

    /// The statement of the asked rows (two columns: key or bucket, count);
    /// `None` when nothing can be found.
    fn stmt(self, ns: &str, keys: &[&str]) -> Option<Stmt> {
        match self {
            Ask::Counts(pieces) => query::counts_stmt(ns, keys, pieces),
            Ask::Series { tier, from, to } => keys
                .first()
                .map(|k| query::series_stmt(ns, k, tier, from, to)),
        }
    }
}

/// The answer to an [`Ask`]; answers of two groups add up.
#[derive(Debug, PartialEq)]
pub enum Answer {
    Counts(HashMap<Vec<u8>, i64>),
    Series(BTreeMap<i64, i64>),
}

impl Answer {
    /// Adds `other` (the other group's answer, or pending deltas) in; a sum
    /// outside the 64-bit range is an error, never a wrapped count.
    fn add(&mut self, other: Answer) -> Result<(), ApiError> {
        match (self, other) {
            (Answer::Counts(a), Answer::Counts(b)) => {
                for (k, v) in b {
                    let sum = count::answerable(&k, a.get(&k).copied().unwrap_or(0), Sum::from(v))?;
                    a.insert(k, sum);
                }
            }
            (Answer::Series(a), Answer::Series(b)) => {
                for (bucket, v) in b {
                    let c = a.entry(bucket).or_default();
                    *c = count::answerable(b"", *c, Sum::from(v))?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Only what belongs to `keys` (a series answers for its one key).
    fn only(self, keys: &[&str]) -> Answer {
        match self {
            Answer::Counts(mut c) => {
                let keep: HashSet<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
                c.retain(|k, _| keep.contains(k.as_slice()));
                Answer::Counts(c)
            }
            Answer::Series(s) if !keys.is_empty() => Answer::Series(s),
            Answer::Series(_) => Answer::Series(BTreeMap::new()),
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

/// The one statement a moved-key read sends to a target server: the asked
/// rows (`data`, two columns) `UNION ALL` the markers that may cover
/// `positions` (in columns three and four; NULL on data rows).
fn target_stmt(reshard_id: &str, data: Option<Stmt>, positions: &[u64]) -> Stmt {
    let mut parts = Vec::new();
    let mut params = Vec::new();
    if let Some(d) = data {
        parts.push(format!(
            "SELECT d.*, NULL AS range_start, NULL AS range_end FROM ({}) AS d",
            d.sql
        ));
        params.extend(d.params);
    }
    let probe = "(SELECT NULL, NULL, range_start, range_end FROM reshard_chunks \
                 WHERE reshard_id = ? AND range_start <= ? ORDER BY range_start DESC LIMIT 1)";
    let mut sorted = positions.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    match (sorted.first(), sorted.last()) {
        (Some(&low), Some(&high)) if sorted.len() > FEW_KEYS => {
            // The marker covering `low` starts at or before it; any other
            // covering marker starts in `(low, high]` (markers never overlap).
            parts.push(probe.to_owned());
            params.extend([Value::from(reshard_id), Value::UInt(low)]);
            parts.push(
                "SELECT NULL, NULL, range_start, range_end FROM reshard_chunks \
                 WHERE reshard_id = ? AND range_start > ? AND range_start <= ?"
                    .to_owned(),
            );
            params.extend([Value::from(reshard_id), Value::UInt(low), Value::UInt(high)]);
        }
        _ => {
            for pos in &sorted {
                parts.push(probe.to_owned());
                params.extend([Value::from(reshard_id), Value::UInt(*pos)]);
            }
        }
    }
    Stmt {
        sql: parts.join(" UNION ALL "),
        params,
    }
}

/// A row of [`target_stmt`]: key or bucket and count (a data row), or
/// NULL, NULL and a marker's start and end.
type TargetRow = (Value, Option<i64>, Option<u64>, Option<u64>);

/// Sends [`target_stmt`] and splits its rows: the markers read (sorted)
/// and the target's answer.
async fn on_target(
    q: &mut impl Queryable,
    reshard_id: &str,
    ns: &str,
    keys: &[&str],
    positions: &[u64],
    ask: Ask<'_>,
) -> Result<(Vec<Span>, Answer), DbError> {
    let Stmt { sql, params } = target_stmt(reshard_id, ask.stmt(ns, keys), positions);
    let rows: Vec<TargetRow> = q.exec(sql, params).await?;
    let mut spans = Vec::new();
    let mut answer = ask.empty();
    for (first, count, start, end) in rows {
        if let (Some(start), Some(end)) = (start, end) {
            spans.push(Span { start, end });
            continue;
        }
        let count = count.unwrap_or(0);
        let bad = |e: mysql_async::FromValueError| {
            DbError::from(mysql_async::Error::Driver(
                mysql_async::DriverError::FromValue { value: e.0 },
            ))
        };
        match &mut answer {
            Answer::Counts(c) => {
                let key: Vec<u8> = mysql_async::from_value_opt(first).map_err(bad)?;
                *c.entry(key).or_default() += count;
            }
            Answer::Series(s) => {
                let bucket: i64 = mysql_async::from_value_opt(first).map_err(bad)?;
                *s.entry(bucket).or_default() += count;
            }
        }
    }
    spans.sort_by_key(|s| s.start);
    spans.dedup();
    Ok((spans, answer))
}

/// The source's rows of `keys` (a plain read).
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

/// Runs `work` on a connection of `node` before `deadline` (connecting
/// included); `timeout` is what a miss reports.
pub(crate) async fn on_node<T, F, Fut>(
    node: &Node,
    deadline: Instant,
    timeout: Duration,
    work: F,
) -> Result<T, DbError>
where
    F: FnOnce(Conn) -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let job = async {
        let left = deadline.saturating_duration_since(Instant::now());
        work(db::conn(&node.pool, left).await?).await
    };
    tokio::time::timeout_at(deadline.into(), job)
        .await
        .unwrap_or(Err(DbError::Timeout(timeout)))
}

/// Indices of `keys` whose position lies in `spans`.
fn split_covered(spans: &[Span], positions: &[u64]) -> (Vec<usize>, Vec<usize>) {
    (0..positions.len()).partition(|&i| sql::covered(spans, positions[i]))
}

/// Stored values of `keys` (all in ranges `mv` moves): see the module
/// documentation for why every flushed increment counts exactly once.
async fn stored(
    app: &App,
    mv: &Moved<'_>,
    ns: &str,
    keys: &[&str],
    ask: Ask<'_>,
    strong: bool,
) -> Result<(Answer, Role), ApiError> {
    let mut answer = ask.empty();
    if ask.stmt(ns, keys).is_none() {
        return Ok((answer, Role::Master));
    }
    let mut rest: Vec<&str> = keys.to_vec();
    if !strong {
        on_target_replica(app, mv, ns, &mut rest, ask, &mut answer).await?;
        if rest.is_empty() {
            return Ok((answer, Role::Replica));
        }
    }
    answer.add(on_masters(app, mv, ns, &rest, ask).await?)?;
    Ok((answer, Role::Master))
}

/// Eventual reads, step 1: keys of chunks known to be copied are asked of
/// a target replica; those its statement shows covered are answered and
/// leave `rest`. A failing replica is marked down and changes nothing.
async fn on_target_replica(
    app: &App,
    mv: &Moved<'_>,
    ns: &str,
    rest: &mut Vec<&str>,
    ask: Ask<'_>,
    answer: &mut Answer,
) -> Result<(), ApiError> {
    let id = mv.reshard_id;
    let timeout = app.config.pool.connect_timeout;
    let pos = positions(ns, rest);
    let hint = app.known_copies.covers(id, &pos);
    let ask_replica: Vec<usize> = (0..rest.len()).filter(|&i| hint[i]).collect();
    let replica = mv.target.pick_replica(app.config.reads.max_replica_lag);
    let Some(replica) = replica.filter(|_| !ask_replica.is_empty()) else {
        return Ok(());
    };
    let rkeys: Vec<&str> = ask_replica.iter().map(|&i| rest[i]).collect();
    let rpos: Vec<u64> = ask_replica.iter().map(|&i| pos[i]).collect();
    let deadline = Instant::now() + timeout;
    let (rk, rp) = (&rkeys, &rpos);
    let read = on_node(replica, deadline, timeout, |mut c| async move {
        on_target(&mut c, id, ns, rk, rp, ask).await
    })
    .await;
    match read {
        Ok((spans, got)) => {
            let (covered, _) = split_covered(&spans, &rpos);
            let done: Vec<&str> = covered.iter().map(|&i| rkeys[i]).collect();
            tracing::debug!(group = %mv.target.name, asked = rkeys.len(), answered = done.len(), "moved keys read on a target replica");
            answer.add(got.only(&done))?;
            rest.retain(|k| !done.contains(k));
        }
        Err(e) => {
            tracing::warn!(group = %mv.target.name, replica = %replica.dsn.addr(), error = %e, "replica read of moved keys failed; reading the master");
            replica.health.mark_down(e.to_string());
            telemetry::read_fallback(&mv.target.name, "replica_error");
        }
    }
    Ok(())
}

/// Step 2: the target master, and at the same time the source master for
/// keys not known to be copied; one deadline bounds both. Keys the target
/// read does not cover are answered by the source.
async fn on_masters(
    app: &App,
    mv: &Moved<'_>,
    ns: &str,
    rest: &[&str],
    ask: Ask<'_>,
) -> Result<Answer, ApiError> {
    let id = mv.reshard_id;
    let timeout = app.config.pool.connect_timeout;
    let known = &app.known_copies;
    let mut answer = ask.empty();
    let pos = positions(ns, rest);
    let hint = known.covers(id, &pos);
    let early: Vec<&str> = (0..rest.len())
        .filter(|&i| !hint[i])
        .map(|i| rest[i])
        .collect();
    let deadline = Instant::now() + timeout;
    let (pos_ref, early_ref) = (&pos, &early);
    let on_target_master = on_node(&mv.target.master, deadline, timeout, |mut c| async move {
        on_target(&mut c, id, ns, rest, pos_ref, ask).await
    });
    let on_source_master = async {
        if early_ref.is_empty() {
            return Ok(ask.empty());
        }
        on_node(&mv.source.master, deadline, timeout, |mut c| async move {
            ask_on(&mut c, ns, early_ref, ask).await
        })
        .await
    };
    let (t, s) = tokio::join!(on_target_master, on_source_master);
    let (spans, got) = t.map_err(|e| unavailable(mv.target, e))?;
    known.learn(id, &spans);
    answer.add(got)?;
    let (_, uncovered) = split_covered(&spans, &pos);
    let uncovered: Vec<&str> = uncovered.iter().map(|&i| rest[i]).collect();
    if uncovered.is_empty() {
        return Ok(answer);
    }
    let from_source = s.map_err(|e| unavailable(mv.source, e))?;
    answer.add(from_source.only(&uncovered))?;
    // Keys the hint said were copied but this target read did not cover
    // (a cancel undid their copy): the source now, after the target read.
    let late: Vec<&str> = uncovered
        .iter()
        .copied()
        .filter(|k| !early.contains(k))
        .collect();
    if !late.is_empty() {
        let more = on_node(&mv.source.master, deadline, timeout, |mut c| {
            let late = late.as_slice();
            async move { ask_on(&mut c, ns, late, ask).await }
        })
        .await
        .map_err(|e| unavailable(mv.source, e))?;
        answer.add(more)?;
    }
    Ok(answer)
}

/// Ring positions of `keys` of `ns`.
fn positions(ns: &str, keys: &[&str]) -> Vec<u64> {
    keys.iter()
        .map(|k| ShardRing::position(&routing_key(ns, k)))
        .collect()
}

/// A group that could not answer a read: the client is told the group,
/// the log gets the error (server address, driver message).
pub(crate) fn unavailable(g: &GroupHandle, e: DbError) -> ApiError {
    ApiError::GroupUnavailable {
        group: g.name.clone(),
        detail: e.to_string(),
    }
}

/// Pending deltas of `keys` in one buffer, shaped like the ask's answer.
fn pending(
    group: &GroupHandle,
    ns: &str,
    keys: &[&str],
    ask: Ask<'_>,
    range: Option<(i64, i64)>,
) -> Result<Answer, ApiError> {
    Ok(match ask {
        Ask::Counts(_) => Answer::Counts(
            group
                .buffer
                .pending_sums(ns, keys, range)
                .into_iter()
                .map(|(k, d)| count::answerable(&k, 0, d).map(|c| (k, c)))
                .collect::<Result<_, _>>()?,
        ),
        Ask::Series { tier, from, to } => {
            let width = tier.width().unwrap_or(60);
            let mut sums: BTreeMap<i64, Sum> = BTreeMap::new();
            let mut key = &b""[..];
            for k in keys.iter().take(1) {
                key = k.as_bytes();
                let rk = routing_key(ns, k);
                for (minute, d) in group.buffer.pending_minutes(&rk, ShardRing::position(&rk)) {
                    let b = planner::floor(minute, width);
                    if (from..to).contains(&b) {
                        *sums.entry(b).or_default() += d;
                    }
                }
            }
            Answer::Series(
                sums.into_iter()
                    .map(|(b, d)| Ok((b, count::answerable(key, 0, d)?)))
                    .collect::<Result<_, ApiError>>()?,
            )
        }
    })
}

/// Reads `keys` of a moved range; `strong` adds both buffers' pending
/// deltas (for counts, those inside `range` when given). The role says
/// whether a replica answered for every key.
pub async fn read(
    app: &App,
    mv: &Moved<'_>,
    ns: &str,
    keys: &[&str],
    ask: Ask<'_>,
    strong: bool,
    range: Option<(i64, i64)>,
) -> Result<(Answer, Role), ApiError> {
    if !strong {
        return stored(app, mv, ns, keys, ask, false).await;
    }
    let deadline = Instant::now() + app.config.pool.connect_timeout;
    while Instant::now() < deadline {
        let (Some(et), Some(es)) = (mv.target.buffer.read_epoch(), mv.source.buffer.read_epoch())
        else {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        let mut answer = pending(mv.target, ns, keys, ask, range)?;
        answer.add(pending(mv.source, ns, keys, ask, range)?)?;
        let (stored, _) = stored(app, mv, ns, keys, ask, true).await?;
        if mv.target.buffer.epoch_unchanged(et) && mv.source.buffer.epoch_unchanged(es) {
            answer.add(stored)?;
            return Ok((answer, Role::Master));
        }
    }
    Err(ApiError::Unavailable(format!(
        "groups {} and {} are committing batches whose outcome is not known yet; retry",
        mv.target.name, mv.source.name
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: u64, end: u64) -> Span {
        Span { start, end }
    }

    #[test]
    fn few_keys_probe_the_marker_at_each_position() {
        let data = Stmt {
            sql: "SELECT ckey, count FROM counter_total WHERE ns = ? AND ckey IN (?)".into(),
            params: vec![Value::from("ns"), Value::from("k")],
        };
        let s = target_stmt("r1", Some(data), &[7, 3, 7]);
        // The data rows, then one probe per distinct position, one statement.
        assert_eq!(s.sql.matches(" UNION ALL ").count(), 2, "{}", s.sql);
        assert!(s.sql.starts_with(
            "SELECT d.*, NULL AS range_start, NULL AS range_end FROM (SELECT ckey, count"
        ));
        assert_eq!(
            s.sql
                .matches("range_start <= ? ORDER BY range_start DESC LIMIT 1)")
                .count(),
            2
        );
        assert_eq!(
            s.params[2..],
            [
                Value::from("r1"),
                Value::UInt(3),
                Value::from("r1"),
                Value::UInt(7)
            ]
        );
        assert_eq!(s.params.len(), 6);
    }

    #[test]
    fn many_keys_read_the_markers_between_lowest_and_highest() {
        let positions: Vec<u64> = (0..20).map(|i| 1000 - i * 10).collect();
        let s = target_stmt("r1", None, &positions);
        assert_eq!(s.sql.matches(" UNION ALL ").count(), 1, "{}", s.sql);
        assert!(s.sql.contains("range_start > ? AND range_start <= ?"));
        assert_eq!(
            s.params,
            [
                Value::from("r1"),
                Value::UInt(810),
                Value::from("r1"),
                Value::UInt(810),
                Value::UInt(1000)
            ]
        );
    }

    #[test]
    fn split_covered_partitions_positions_by_marker() {
        let spans = [span(10, 19), span(30, 39)];
        assert_eq!(
            split_covered(&spans, &[5, 10, 25, 39, 40]),
            (vec![1, 3], vec![0, 2, 4])
        );
    }

    #[test]
    fn only_keeps_the_answers_of_the_given_keys() {
        let counts = Answer::Counts(HashMap::from([(b"a".to_vec(), 1), (b"b".to_vec(), 2)]));
        assert_eq!(
            counts.only(&["b", "c"]),
            Answer::Counts(HashMap::from([(b"b".to_vec(), 2)]))
        );
        let series = Answer::Series(BTreeMap::from([(60, 1)]));
        assert_eq!(
            series.only(&["k"]),
            Answer::Series(BTreeMap::from([(60, 1)]))
        );
        let series = Answer::Series(BTreeMap::from([(60, 1)]));
        assert_eq!(series.only(&[]), Answer::Series(BTreeMap::new()));
    }
}
