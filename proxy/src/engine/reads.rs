//! The read engine: which server answers a read, and the reads themselves.
//!
//! `eventual` (default) reads an eligible replica (up, replicating, lag at
//! most `reads.max_replica_lag`), falling back to the master when none is
//! eligible or the replica query fails (retried once there). `strong` reads
//! the master and adds this proxy's not yet committed deltas, consistently
//! with a batch that commits meanwhile (see the buffer's commit epoch).
//! Keys a running reshard moves are read from both owners
//! ([`moved_reads`]). Every answer says which [`Role`] served it; the HTTP
//! layer turns that into `X-Tally-Node`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use mysql_async::Conn;
use tally_admin::{ShardRing, routing_key};

use crate::app::App;
use crate::domain::count::{self, Sum};
use crate::domain::planner::{self, Piece};
use crate::domain::role::Role;
use crate::domain::tier::Tier;
use crate::engine::moved_reads::{self, Ask, on_node, unavailable};
use crate::error::ApiError;
use crate::storage::db::DbError;
use crate::storage::query;
use crate::storage::reshard_sql::Span;
use crate::storage::shard_map::{GroupHandle, Moved, Node, ShardMap};
use crate::telemetry;

/// Keys read from one statement at most (`POST /v1/counters/query`, and
/// the chunks of moved keys and pending keys of a strong top-K).
pub const MAX_KEYS: usize = 1_000;

/// What a multi-key read covers and how: all time (`pieces` is `None`) or
/// the planned `range`, eventual or strong.
#[derive(Clone, Copy)]
pub struct Scope<'p> {
    pub range: Option<(i64, i64)>,
    pub pieces: Option<&'p [Piece]>,
    pub strong: bool,
}

/// A value and the kind of server that answered it.
pub struct Served<T> {
    pub value: T,
    pub role: Role,
}

/// The all-time total of one counter.
pub async fn total(app: &App, ns: &str, key: &str, strong: bool) -> Result<Served<i64>, ApiError> {
    point(app, ns, key, None, strong).await
}

/// The count of one counter over `pieces`, which cover exactly `range`.
pub async fn count(
    app: &App,
    ns: &str,
    key: &str,
    range: (i64, i64),
    pieces: &[Piece],
    strong: bool,
) -> Result<Served<i64>, ApiError> {
    point(app, ns, key, Some((range, pieces)), strong).await
}

/// One counter's total (`span` is `None`) or count over a planned range.
async fn point(
    app: &App,
    ns: &str,
    key: &str,
    span: Option<((i64, i64), &[Piece])>,
    strong_read: bool,
) -> Result<Served<i64>, ApiError> {
    let map = app.map.load_full();
    let rk = routing_key(ns, key);
    let pos = ShardRing::position(&rk);
    let range = span.map(|(r, _)| r);
    let pieces = span.map(|(_, p)| p);
    if let Some(mv) = map.moved(pos) {
        let (found, role) = moved_reads::read(
            app,
            &mv,
            ns,
            &[key],
            Ask::Counts(pieces),
            strong_read,
            range,
        )
        .await?;
        let value = found
            .into_counts()
            .get(key.as_bytes())
            .copied()
            .unwrap_or(0);
        return Ok(Served { value, role });
    }
    let group = route(&map, &rk)?;
    let read = |mut c: Conn| async move {
        match pieces {
            None => query::total(&mut c, ns, key).await,
            Some(pieces) => query::count(&mut c, ns, key, pieces).await,
        }
    };
    if strong_read {
        let pending = || group.buffer.pending_sum(&rk, pos, range);
        let (stored, pending) = strong(app, group, pending, read).await?;
        return Ok(Served {
            value: count::answerable(key.as_bytes(), stored, pending)?,
            role: Role::Master,
        });
    }
    let (value, role) = eventual(app, group, read).await?;
    Ok(Served { value, role })
}

/// The buckets of `tier` in `[from, to)` of one counter, ascending, zeros
/// included (the caller drops them).
pub async fn series(
    app: &App,
    ns: &str,
    key: &str,
    tier: Tier,
    (from, to): (i64, i64),
    strong_read: bool,
) -> Result<Served<Vec<(i64, i64)>>, ApiError> {
    let width = tier.width().unwrap_or(60);
    let map = app.map.load_full();
    let rk = routing_key(ns, key);
    let pos = ShardRing::position(&rk);
    if let Some(mv) = map.moved(pos) {
        let ask = Ask::Series { tier, from, to };
        let (found, role) = moved_reads::read(app, &mv, ns, &[key], ask, strong_read, None).await?;
        let value = found.into_series().into_iter().collect();
        return Ok(Served { value, role });
    }
    let group = route(&map, &rk)?;
    let read = |mut c: Conn| async move { query::series(&mut c, ns, key, tier, from, to).await };
    if !strong_read {
        let (value, role) = eventual(app, group, read).await?;
        return Ok(Served { value, role });
    }
    let (stored, pending) =
        strong(app, group, || group.buffer.pending_minutes(&rk, pos), read).await?;
    let mut sums: BTreeMap<i64, (i64, Sum)> =
        stored.into_iter().map(|(b, c)| (b, (c, 0))).collect();
    for (minute, delta) in pending {
        let bucket = planner::floor(minute, width);
        if (from..to).contains(&bucket) {
            sums.entry(bucket).or_default().1 += delta;
        }
    }
    let value = sums
        .into_iter()
        .map(|(b, (c, d))| Ok((b, count::answerable(key.as_bytes(), c, d)?)))
        .collect::<Result<_, ApiError>>()?;
    Ok(Served {
        value,
        role: Role::Master,
    })
}

/// Distinct keys of a multi-key read, by where they are read.
#[derive(Default)]
struct KeysByOwner<'k> {
    /// Per group index of the map: the keys it owns.
    per_group: HashMap<usize, Vec<&'k str>>,
    /// Keys a running reshard moves (read from both owners).
    moved: Vec<&'k str>,
}

fn keys_by_owner<'k>(
    map: &ShardMap,
    ns: &str,
    keys: &'k [String],
) -> Result<KeysByOwner<'k>, ApiError> {
    let mut out = KeysByOwner::default();
    for k in keys {
        let rk = routing_key(ns, k);
        let bucket = if map.moved(ShardRing::position(&rk)).is_some() {
            &mut out.moved
        } else {
            let owner = map
                .ring
                .owner(&rk)
                .ok_or_else(|| ApiError::Unavailable("the topology has no group".into()))?;
            out.per_group.entry(owner).or_default()
        };
        if !bucket.contains(&k.as_str()) {
            bucket.push(k);
        }
    }
    Ok(out)
}

/// A multi-key read of one namespace over one map: what `counts`, `top`
/// and their per-group and moved-key steps share.
#[derive(Clone, Copy)]
struct ManyKeys<'a> {
    app: &'a App,
    map: &'a ShardMap,
    ns: &'a str,
    scope: Scope<'a>,
}

impl<'a> ManyKeys<'a> {
    fn new(app: &'a App, map: &'a ShardMap, ns: &'a str, scope: Scope<'a>) -> Self {
        ManyKeys {
            app,
            map,
            ns,
            scope,
        }
    }
}

/// Counts of many keys of one namespace: totals (`pieces` is `None`) or
/// over a planned `range`. Groups are read in parallel; every key is in
/// the answer (0 when absent). The role is `Master` if any group was read
/// on its master.
pub async fn counts(
    app: &App,
    ns: &str,
    keys: &[String],
    scope: Scope<'_>,
) -> Result<Served<HashMap<Vec<u8>, i64>>, ApiError> {
    let map = app.map.load_full();
    let read = ManyKeys::new(app, &map, ns, scope);
    let owners = keys_by_owner(&map, ns, keys)?;
    let lookups = owners.per_group.into_iter().map(|(gi, keys)| {
        let group = &map.groups[gi];
        async move { read.group_counts(group, &keys).await }
    });
    let mut found = Served {
        value: HashMap::new(),
        role: Role::Replica,
    };
    if !owners.moved.is_empty() {
        found.value = read.moved_counts(&owners.moved).await?;
        found.role = Role::Master;
    }
    for served in join_all(lookups).await {
        found.absorb(served?);
    }
    Ok(found)
}

/// The exact top `limit` keys of `ns` by count (ties by key ascending),
/// over `pieces` or all time. Each key lives on one group, so the global
/// top `limit` is the top `limit` of the union of every group's top
/// `limit`; during a reshard every moved key is read exactly from both of
/// its owners and replaces the partial values.
pub async fn top(
    app: &App,
    ns: &str,
    limit: usize,
    scope: Scope<'_>,
) -> Result<Served<Vec<(Vec<u8>, i64)>>, ApiError> {
    let map = app.map.load_full();
    let read = ManyKeys::new(app, &map, ns, scope);
    let scatter = map.groups.iter().map(|group| read.group_top(group, limit));
    let mut all = Served {
        value: Vec::new(),
        role: Role::Replica,
    };
    for served in join_all(scatter).await {
        all.absorb(served?);
    }
    if !map.moves.is_empty() {
        let exact = read.moved_values().await?;
        all.value.retain(|(k, _)| !exact.contains_key(k));
        all.value.extend(exact);
        all.role = Role::Master;
    }
    Ok(Served {
        value: rank(all.value, limit),
        role: all.role,
    })
}

impl<T: IntoIterator> Served<T> {
    /// Adds another group's answer: its values, and `Master` if it was
    /// read there.
    fn absorb<U>(&mut self, other: Served<U>)
    where
        T: Extend<U::Item>,
        U: IntoIterator,
    {
        self.value.extend(other.value);
        if other.role == Role::Master {
            self.role = Role::Master;
        }
    }
}

/// The top `limit` of `candidates`: non-zero counts, by count descending,
/// ties by key ascending.
pub fn rank(mut candidates: Vec<(Vec<u8>, i64)>, limit: usize) -> Vec<(Vec<u8>, i64)> {
    candidates.retain(|(_, c)| *c != 0);
    candidates.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    candidates.truncate(limit);
    candidates
}

/// Adds pending deltas to stored values read in the same epoch.
fn add_pending(
    stored: &mut HashMap<Vec<u8>, i64>,
    pending: impl IntoIterator<Item = (Vec<u8>, Sum)>,
) -> Result<(), ApiError> {
    for (k, d) in pending {
        let count = count::answerable(&k, stored.get(&k).copied().unwrap_or(0), d)?;
        stored.insert(k, count);
    }
    Ok(())
}

impl ManyKeys<'_> {
    /// The counts of `keys`, all owned by `group`, in one statement.
    async fn group_counts(
        &self,
        group: &GroupHandle,
        keys: &[&str],
    ) -> Result<Served<HashMap<Vec<u8>, i64>>, ApiError> {
        let ManyKeys { app, ns, scope, .. } = *self;
        let (range, pieces) = (scope.range, scope.pieces);
        let read = |mut c: Conn| async move { query::counts(&mut c, ns, keys, pieces).await };
        if !scope.strong {
            let (value, role) = eventual(app, group, read).await?;
            return Ok(Served { value, role });
        }
        let snapshot = || group.buffer.pending_sums(ns, keys, range);
        let (mut stored, pending) = strong(app, group, snapshot, read).await?;
        add_pending(&mut stored, pending)?;
        Ok(Served {
            value: stored,
            role: Role::Master,
        })
    }

    /// One group's top-K candidates. A strong read also considers every
    /// key with pending deltas: a key without any keeps its stored rank
    /// among the others, so the stored top plus the pending keys (their
    /// stored values read in the same epoch) hold the group's true top.
    async fn group_top(
        &self,
        group: &GroupHandle,
        limit: usize,
    ) -> Result<Served<Vec<(Vec<u8>, i64)>>, ApiError> {
        let ManyKeys { app, ns, scope, .. } = *self;
        let (range, pieces) = (scope.range, scope.pieces);
        if !scope.strong {
            let read_top = |mut c: Conn| async move { query::top(&mut c, ns, pieces, limit).await };
            let (value, role) = eventual(app, group, read_top).await?;
            return Ok(Served { value, role });
        }
        let mut prefix = ns.as_bytes().to_vec();
        prefix.push(0);
        let snapshot = || group.buffer.pending_with_prefix(&prefix, range);
        let read = |mut c: Conn| {
            let pending_keys: Vec<String> = snapshot()
                .into_keys()
                .map(|k| String::from_utf8_lossy(&k).into_owned())
                .collect();
            async move {
                let mut top: HashMap<Vec<u8>, i64> = query::top(&mut c, ns, pieces, limit)
                    .await?
                    .into_iter()
                    .collect();
                for chunk in pending_keys.chunks(MAX_KEYS) {
                    let keys: Vec<&str> = chunk.iter().map(String::as_str).collect();
                    let stored = query::counts(&mut c, ns, &keys, pieces).await?;
                    for k in keys {
                        let v = stored.get(k.as_bytes()).copied().unwrap_or(0);
                        top.insert(k.as_bytes().to_vec(), v);
                    }
                }
                Ok(top)
            }
        };
        let (mut stored, pending) = strong(app, group, snapshot, read).await?;
        add_pending(&mut stored, pending)?;
        Ok(Served {
            value: stored.into_iter().collect(),
            role: Role::Master,
        })
    }

    /// Exact values of every key of the namespace that a running reshard
    /// moves, from both groups of each moved range (for the top-K).
    async fn moved_values(&self) -> Result<HashMap<Vec<u8>, i64>, ApiError> {
        let map = self.map;
        let mut keys: Vec<String> = Vec::new();
        for p in tally_admin::reshard::pairs(&map.moves) {
            let spans: Vec<Span> = map
                .moves
                .iter()
                .filter(|m| m.source == p.source && m.target == p.target)
                .map(|m| Span {
                    start: m.start,
                    end: m.end,
                })
                .collect();
            for name in [&p.source, &p.target] {
                if let Some(g) = map.group(name) {
                    keys.extend(moved_reads::keys_in(self.app, g, self.ns, &spans).await?);
                }
            }
        }
        keys.sort_unstable();
        keys.dedup();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.moved_counts(&keys).await
    }

    /// Values of `keys` (all in ranges a running reshard moves), read from
    /// both groups of their range, [`MAX_KEYS`] at a time; every key is in
    /// the answer (0 when absent).
    async fn moved_counts(&self, keys: &[&str]) -> Result<HashMap<Vec<u8>, i64>, ApiError> {
        let ns = self.ns;
        let mut per_move: HashMap<(&str, &str), (Moved<'_>, Vec<&str>)> = HashMap::new();
        for k in keys {
            if let Some(mv) = self.map.moved(ShardRing::position(&routing_key(ns, k))) {
                per_move
                    .entry((mv.source.name.as_str(), mv.target.name.as_str()))
                    .or_insert_with(|| (mv, Vec::new()))
                    .1
                    .push(k);
            }
        }
        let Scope {
            range,
            pieces,
            strong,
        } = self.scope;
        let mut out = HashMap::new();
        for (mv, group_keys) in per_move.values() {
            for chunk in group_keys.chunks(MAX_KEYS) {
                let ask = Ask::Counts(pieces);
                let (found, _) =
                    moved_reads::read(self.app, mv, ns, chunk, ask, strong, range).await?;
                let mut found = found.into_counts();
                for k in chunk {
                    let v = found.remove(k.as_bytes()).unwrap_or(0);
                    out.insert(k.as_bytes().to_vec(), v);
                }
            }
        }
        Ok(out)
    }
}

fn route<'m>(map: &'m ShardMap, rk: &[u8]) -> Result<&'m Arc<GroupHandle>, ApiError> {
    map.route(rk)
        .ok_or_else(|| ApiError::Unavailable("the topology has no group".into()))
}

/// Runs `f` on a connection of `node` within the read timeout.
async fn run_on<T, F, Fut>(app: &App, node: &Node, f: &F) -> Result<T, DbError>
where
    F: Fn(Conn) -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let timeout = app.config.pool.connect_timeout;
    on_node(node, Instant::now() + timeout, timeout, f).await
}

/// An `eventual` read: an eligible replica, else (or after its failure)
/// the master.
async fn eventual<T, F, Fut>(app: &App, group: &GroupHandle, f: F) -> Result<(T, Role), ApiError>
where
    F: Fn(Conn) -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    match group.pick_replica(app.config.reads.max_replica_lag) {
        Some(replica) => match run_on(app, replica, &f).await {
            Ok(v) => return Ok((v, Role::Replica)),
            Err(e) => {
                tracing::warn!(group = %group.name, replica = %replica.dsn.addr(), error = %e, "replica read failed; retrying on the master");
                replica.health.mark_down(e.to_string());
                telemetry::read_fallback(&group.name, "replica_error");
            }
        },
        None if !group.replicas.is_empty() => telemetry::read_fallback(&group.name, "no_replica"),
        None => {}
    }
    let v = run_on(app, &group.master, &f)
        .await
        .map_err(|e| unavailable(group, e))?;
    Ok((v, Role::Master))
}

/// A `strong` read: master rows and `snapshot()` of the pending deltas,
/// taken within one unchanged commit epoch so a batch committing meanwhile
/// is counted exactly once.
async fn strong<T, P, F, Fut>(
    app: &App,
    group: &GroupHandle,
    snapshot: impl Fn() -> P,
    f: F,
) -> Result<(T, P), ApiError>
where
    F: Fn(Conn) -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let deadline = Instant::now() + app.config.pool.connect_timeout;
    while Instant::now() < deadline {
        let Some(epoch) = group.buffer.read_epoch() else {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        let pending = snapshot();
        let stored = run_on(app, &group.master, &f)
            .await
            .map_err(|e| unavailable(group, e))?;
        if group.buffer.epoch_unchanged(epoch) {
            return Ok((stored, pending));
        }
    }
    Err(ApiError::Unavailable(format!(
        "group {} is committing a batch whose outcome is not known yet; retry",
        group.name
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kc(k: &str, c: i64) -> (Vec<u8>, i64) {
        (k.as_bytes().to_vec(), c)
    }

    #[test]
    fn rank_orders_by_count_then_key_and_drops_zeros() {
        let ranked = rank(
            vec![kc("b", 5), kc("z", 0), kc("a", 5), kc("c", 9), kc("d", -1)],
            3,
        );
        assert_eq!(ranked, vec![kc("c", 9), kc("a", 5), kc("b", 5)]);
        // Negative counts rank below positive ones but are kept.
        let all = rank(vec![kc("d", -1), kc("e", 2)], 10);
        assert_eq!(all, vec![kc("e", 2), kc("d", -1)]);
    }
}
