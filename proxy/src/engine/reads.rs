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
use std::sync::atomic::{AtomicBool, Ordering};
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
use crate::storage::buffer::PendingTop;
use crate::storage::db::DbError;
use crate::storage::query::{self, Positions};
use crate::storage::reshard_sql::{self as sql, Span};
use crate::storage::shard_map::{GroupHandle, Moved, Node, ShardMap};
use crate::telemetry;

mod coalesce;
mod top;

use top::{Bound, Round, rank};

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
    // Only all-time totals are cached: a range's plan moves with the clock.
    let cache = app.read_cache.as_ref().filter(|_| pieces.is_none());
    let sent = Instant::now();
    if let Some(cache) = cache {
        if let Some(hit) = cache.get(&rk, sent) {
            telemetry::read_cache_hit(hit.age);
            return Ok(Served {
                value: hit.value,
                role: hit.role,
            });
        }
        telemetry::read_cache_miss();
    }
    let coalesced = match &app.config.reads.coalesce {
        Some(cfg) => coalesce::read(app, group, cfg, ns, key, pieces).await?,
        None => None,
    };
    let (value, role) = match coalesced {
        Some(found) => found,
        None => eventual(app, group, read).await?,
    };
    if let Some(cache) = cache {
        cache.put(&rk, value, role, sent, Instant::now());
    }
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
/// `limit`. While a reshard runs, a moved key's count may be split over
/// its source and its target: the groups then rank only their other keys,
/// and each source → target pair ranks the keys it moves, exactly
/// ([`ManyKeys::moved_top`]). A strong read ranks stored counts plus
/// pending deltas ([`ManyKeys::group_top`]). What either reads grows with
/// `limit`, not with the keys moved or pending ([`top::search`]).
pub async fn top(
    app: &App,
    ns: &str,
    limit: usize,
    scope: Scope<'_>,
) -> Result<Served<Vec<(Vec<u8>, i64)>>, ApiError> {
    let map = app.map.load_full();
    let read = ManyKeys::new(app, &map, ns, scope);
    let pairs = moved_pairs(&map);
    let moved = merged(pairs.iter().flat_map(|p| p.spans.iter().copied()).collect());
    let scatter = map
        .groups
        .iter()
        .map(|group| read.group_top(group, limit, &moved));
    let across = pairs.iter().map(|pair| read.moved_top(pair, limit));
    let (groups, pairs) = tokio::join!(join_all(scatter), join_all(across));
    let mut all = Served {
        value: Vec::new(),
        role: Role::Replica,
    };
    for served in groups {
        all.absorb(served?);
    }
    for found in pairs {
        all.value.extend(found?);
        all.role = Role::Master;
    }
    Ok(Served {
        value: rank(all.value, limit),
        role: all.role,
    })
}

/// The keys a running reshard moves from one group to another: the two
/// groups and the ranges (sorted, adjacent ones merged).
struct MovedPair<'m> {
    source: &'m GroupHandle,
    target: &'m GroupHandle,
    spans: Vec<Span>,
}

/// The source → target pairs of the map's running reshard (none without).
fn moved_pairs(map: &ShardMap) -> Vec<MovedPair<'_>> {
    let mut by_pair: BTreeMap<(&str, &str), Vec<Span>> = BTreeMap::new();
    for m in &map.moves {
        by_pair
            .entry((&m.source, &m.target))
            .or_default()
            .push(Span {
                start: m.start,
                end: m.end,
            });
    }
    by_pair
        .into_iter()
        .filter_map(|((source, target), spans)| {
            Some(MovedPair {
                source: map.group(source)?,
                target: map.group(target)?,
                spans: merged(spans),
            })
        })
        .collect()
}

/// `spans` sorted, overlapping and adjacent ones merged (what
/// [`sql::covered`] needs, and fewer `BETWEEN`s in a statement).
fn merged(mut spans: Vec<Span>) -> Vec<Span> {
    spans.sort_by_key(|s| s.start);
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for s in spans {
        match out.last_mut() {
            Some(last) if s.start <= last.end.saturating_add(1) => last.end = last.end.max(s.end),
            _ => out.push(s),
        }
    }
    out
}

/// `ring_pos BETWEEN` ranges a top-K statement carries at most (two
/// placeholders each, per piece of the plan: far below the server's
/// 65,535). Beyond, statements filter less and the proxy drops what they
/// should not have listed.
const MAX_STMT_SPANS: usize = 1_000;

/// At most `max` spans covering every position of `spans` (sorted,
/// disjoint): the narrowest gaps between them are filled first.
fn coarsened(spans: &[Span], max: usize) -> Vec<Span> {
    if spans.len() <= max.max(1) {
        return spans.to_vec();
    }
    let mut gaps: Vec<usize> = (1..spans.len()).collect();
    gaps.sort_by_key(|&i| spans[i].start - spans[i - 1].end);
    let mut fill = vec![false; spans.len()];
    for &i in &gaps[..spans.len() - max.max(1)] {
        fill[i] = true;
    }
    let mut out: Vec<Span> = Vec::with_capacity(max);
    for (i, s) in spans.iter().enumerate() {
        match out.last_mut() {
            Some(last) if fill[i] => last.end = s.end,
            _ => out.push(*s),
        }
    }
    out
}

/// The ring position of `key` of `ns`.
fn position(ns: &str, key: &[u8]) -> u64 {
    let mut rk = Vec::with_capacity(ns.len() + 1 + key.len());
    rk.extend_from_slice(ns.as_bytes());
    rk.push(0);
    rk.extend_from_slice(key);
    ShardRing::position(&rk)
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

    /// One group's exact top `limit` among its keys outside `moved`
    /// (stored counts on a replica, or on the master plus pending deltas).
    async fn group_top(
        &self,
        group: &GroupHandle,
        limit: usize,
        moved: &[Span],
    ) -> Result<Served<Vec<(Vec<u8>, i64)>>, ApiError> {
        let ManyKeys { app, ns, scope, .. } = *self;
        if !scope.strong && moved.is_empty() {
            let pieces = scope.pieces;
            let read_top = |mut c: Conn| async move {
                query::top(&mut c, ns, pieces, limit, Positions::Outside(&[])).await
            };
            let (value, role) = eventual(app, group, read_top).await?;
            return Ok(Served { value, role });
        }
        let on_master = &AtomicBool::new(false);
        let value = top::search(limit, |n| async move {
            let (round, role) = self.group_round(group, n, moved).await?;
            if role == Role::Master {
                on_master.store(true, Ordering::Relaxed);
            }
            Ok::<_, ApiError>(round)
        })
        .await?;
        let role = match on_master.load(Ordering::Relaxed) {
            true => Role::Master,
            false => Role::Replica,
        };
        Ok(Served { value, role })
    }

    /// One round of a top-K over a group's keys outside `moved`: its top
    /// `n` stored counts (eventual: on a replica, else the master), and
    /// when strong, the top `n` pending sums of each buffer part and the
    /// stored count plus pending deltas of every key listed, all within
    /// one unchanged commit epoch. Reads at most `3n` keys.
    async fn group_round(
        &self,
        group: &GroupHandle,
        n: usize,
        moved: &[Span],
    ) -> Result<(Round, Role), ApiError> {
        let ManyKeys { app, ns, scope, .. } = *self;
        let (range, pieces) = (scope.range, scope.pieces);
        // With too many moved ranges for one statement, the list ranks
        // moved keys too and they are dropped here: a list over more keys
        // still bounds the ones it did not show.
        let outside = Positions::Outside(if moved.len() <= MAX_STMT_SPANS {
            moved
        } else {
            &[]
        });
        let is_moved = |key: &[u8]| !moved.is_empty() && sql::covered(moved, position(ns, key));
        if !scope.strong {
            let read =
                |mut c: Conn| async move { query::top(&mut c, ns, pieces, n, outside).await };
            let (mut list, role) = eventual(app, group, read).await?;
            let bound = Bound::of_list(n, &list);
            list.retain(|(k, _)| !is_moved(k));
            let round = Round {
                seen: list.into_iter().collect(),
                bounds: vec![bound],
            };
            return Ok((round, role));
        }
        let buffer = &group.buffer;
        let keep = |rk: &[u8]| moved.is_empty() || !sql::covered(moved, ShardRing::position(rk));
        let (keep, is_moved) = (&keep, &is_moved);
        let read = |mut c: Conn| async move {
            let pending = buffer.pending_top(ns, range, n, keep);
            let list = query::top(&mut c, ns, pieces, n, outside).await?;
            let mut stored: HashMap<Vec<u8>, i64> =
                list.iter().filter(|(k, _)| !is_moved(k)).cloned().collect();
            let unlisted: Vec<String> = pending
                .keys
                .iter()
                .filter(|k| !stored.contains_key(*k))
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            for chunk in unlisted.chunks(MAX_KEYS) {
                let keys: Vec<&str> = chunk.iter().map(String::as_str).collect();
                let found = query::counts(&mut c, ns, &keys, pieces).await?;
                for k in keys {
                    let v = found.get(k.as_bytes()).copied().unwrap_or(0);
                    stored.insert(k.as_bytes().to_vec(), v);
                }
            }
            let names: Vec<String> = stored
                .keys()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            let keys: Vec<&str> = names.iter().map(String::as_str).collect();
            let deltas = buffer.pending_sums(ns, &keys, range);
            Ok((list, pending.cuts, stored, deltas))
        };
        let ((list, [open, flying], mut stored, deltas), ()) =
            strong(app, group, || (), read).await?;
        add_pending(&mut stored, deltas)?;
        let round = Round {
            seen: stored,
            bounds: vec![
                Bound::of_list(n, &list),
                Bound::of_cut(open),
                Bound::of_cut(flying),
            ],
        };
        Ok((round, Role::Master))
    }

    /// The exact top `limit` of the keys `pair` moves, by rounds
    /// ([`top::search`]): see [`Self::moved_round`].
    async fn moved_top(
        &self,
        pair: &MovedPair<'_>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, i64)>, ApiError> {
        top::search(limit, |n| self.moved_round(pair, n)).await
    }

    /// One round over the keys `pair` moves. Such a key's count is its
    /// target's rows plus, until its chunk is copied, its source's rows
    /// (plus both buffers' pending deltas when strong): at most what the
    /// source lists plus what the target lists (each part bounded by its
    /// list). Each group lists its top `n` within the pair's ranges on its
    /// master (strong: after its pending parts, so that a batch committing
    /// meanwhile is listed twice rather than missed), and every key listed
    /// is read exactly from both groups ([`Self::moved_counts`]). The two
    /// lists are read at the same time, within one read timeout: a
    /// source's moved rows are deleted only a grace period (at least that
    /// timeout) after the copy that put them on the target, so one of the
    /// two lists sees them.
    async fn moved_round(&self, pair: &MovedPair<'_>, n: usize) -> Result<Round, ApiError> {
        let (source, target) = tokio::join!(
            self.moved_list(pair.source, &pair.spans, n),
            self.moved_list(pair.target, &pair.spans, n)
        );
        let mut bounds = Vec::new();
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for (pending, rows) in [source?, target?] {
            bounds.push(Bound::of_list(n, &rows));
            keys.extend(
                rows.into_iter()
                    .map(|(k, _)| k)
                    .filter(|k| sql::covered(&pair.spans, position(self.ns, k))),
            );
            if let Some(p) = pending {
                let [open, flying] = p.cuts;
                bounds.extend([Bound::of_cut(open), Bound::of_cut(flying)]);
                keys.extend(p.keys);
            }
        }
        keys.sort_unstable();
        keys.dedup();
        let names: Vec<String> = keys
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        let keys: Vec<&str> = names.iter().map(String::as_str).collect();
        Ok(Round {
            seen: self.moved_counts(&keys).await?,
            bounds,
        })
    }

    /// One group's top `n` within `spans` on its master (a statement may
    /// rank a few more keys: see [`coarsened`]), after (strong) its
    /// buffer's top `n` pending sums within them.
    async fn moved_list(
        &self,
        group: &GroupHandle,
        spans: &[Span],
        n: usize,
    ) -> Result<(Option<PendingTop>, Vec<(Vec<u8>, i64)>), ApiError> {
        let ManyKeys { app, ns, scope, .. } = *self;
        let pending = scope.strong.then(|| {
            let within = |rk: &[u8]| sql::covered(spans, ShardRing::position(rk));
            group.buffer.pending_top(ns, scope.range, n, within)
        });
        let pieces = scope.pieces;
        let stmt_spans = coarsened(spans, MAX_STMT_SPANS);
        let within = Positions::Within(&stmt_spans);
        let read = |mut c: Conn| async move { query::top(&mut c, ns, pieces, n, within).await };
        let rows = run_on(app, &group.master, &read)
            .await
            .map_err(|e| unavailable(group, e))?;
        Ok((pending, rows))
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
    run_within(app.config.pool.connect_timeout, node, f).await
}

/// Runs `f` on a connection of `node` within `timeout`.
async fn run_within<T, F, Fut>(timeout: Duration, node: &Node, f: &F) -> Result<T, DbError>
where
    F: Fn(Conn) -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    on_node(node, Instant::now() + timeout, timeout, f).await
}

/// What an eventual read needs of the configuration (a coalesced
/// statement runs in a task of its own, without the `App`).
#[derive(Clone, Copy)]
struct ReadLimits {
    timeout: Duration,
    max_lag: Duration,
}

impl ReadLimits {
    fn of(app: &App) -> ReadLimits {
        ReadLimits {
            timeout: app.config.pool.connect_timeout,
            max_lag: app.config.reads.max_replica_lag,
        }
    }
}

/// An `eventual` read: an eligible replica, else (or after its failure)
/// the master.
async fn eventual<T, F, Fut>(app: &App, group: &GroupHandle, f: F) -> Result<(T, Role), ApiError>
where
    F: Fn(Conn) -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    eventual_within(ReadLimits::of(app), group, f).await
}

/// [`eventual`] with its limits given.
async fn eventual_within<T, F, Fut>(
    limits: ReadLimits,
    group: &GroupHandle,
    f: F,
) -> Result<(T, Role), ApiError>
where
    F: Fn(Conn) -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    match group.pick_replica(limits.max_lag) {
        Some(replica) => match run_within(limits.timeout, replica, &f).await {
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
    let v = run_within(limits.timeout, &group.master, &f)
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

    fn span(start: u64, end: u64) -> Span {
        Span { start, end }
    }

    #[test]
    fn moved_spans_are_sorted_and_merged_when_they_touch() {
        assert_eq!(
            merged(vec![
                span(20, 29),
                span(0, 9),
                span(10, 14),
                span(40, 49),
                span(45, 60)
            ]),
            vec![span(0, 14), span(20, 29), span(40, 60)]
        );
        assert_eq!(
            merged(vec![span(5, u64::MAX), span(0, 4)]),
            vec![span(0, u64::MAX)]
        );
        assert_eq!(merged(Vec::new()), Vec::new());
    }

    #[test]
    fn coarsened_spans_cover_every_position_in_at_most_max_spans() {
        let spans = vec![
            span(0, 9),
            span(12, 19),
            span(100, 109),
            span(111, 119),
            span(500, 509),
        ];
        assert_eq!(coarsened(&spans, 10), spans);
        // The two narrowest gaps (2 and 2) are filled first.
        assert_eq!(
            coarsened(&spans, 3),
            vec![span(0, 19), span(100, 119), span(500, 509)]
        );
        assert_eq!(coarsened(&spans, 1), vec![span(0, 509)]);
        let many: Vec<Span> = (0..5000u64)
            .map(|i| span(i * 100, i * 100 + 9 + i % 7))
            .collect();
        let fewer = coarsened(&many, MAX_STMT_SPANS);
        assert_eq!(fewer.len(), MAX_STMT_SPANS);
        for s in &many {
            assert!(sql::covered(&fewer, s.start) && sql::covered(&fewer, s.end));
        }
    }
}
