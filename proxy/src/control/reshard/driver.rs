//! The reshard state machine, run by one proxy at a time (the holder of the
//! `reshard` lease in the shared store; without a store, the only proxy).
//!
//! Each pass looks at the running topology's migration and does the next
//! idempotent step of its phase; everything it learns is durable (markers
//! on the targets, phases in the topology), so a driver that dies is
//! replaced by another that resumes where the markers say.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_admin::reshard as plan;
use tally_admin::topology::{Migration, Phase, Verified};
use tally_admin::{Move, Topology};
use tokio::sync::watch;

use crate::app::{App, ReshardProgress};
use crate::config::ReshardConfig;
use crate::domain::clock::unix_now;
use crate::domain::latency::next_rate;
use crate::storage::db;
use crate::storage::reshard_sql::{self as sql, ChunkSums, Span};
use crate::storage::shard_map::{GroupHandle, ShardMap};
use crate::telemetry;

const LEASE: &str = "reshard";
const LEASE_TTL: Duration = Duration::from_secs(10);

/// Why a pass stopped early; the next pass retries.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("{0}")]
    Db(#[from] db::DbError),
    #[error("{0}")]
    Other(String),
    /// The topology changed under the pass (a cancel, another driver).
    #[error("the topology changed")]
    Superseded,
}

impl From<mysql_async::Error> for StepError {
    fn from(e: mysql_async::Error) -> Self {
        StepError::Db(e.into())
    }
}

/// Runs passes until `stop`.
pub async fn run(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let every = app.config.reshard.poll_interval;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let map = app.map.load_full();
        let Some(m) = map.topology.migration.clone() else {
            continue;
        };
        if !holds_lease(&app).await {
            continue;
        }
        {
            let mut p = app.reshard.lock();
            if p.id != m.id {
                *p = ReshardProgress {
                    id: m.id.clone(),
                    latency_before: latency_before(&app),
                    ..Default::default()
                };
            }
        }
        let pass = tokio::select! {
            r = pass(&app, &map, &m) => r,
            _ = stop.changed() => return,
        };
        match pass {
            Ok(()) => app.reshard.lock().last_error = None,
            Err(StepError::Superseded) => {}
            Err(e) => {
                tracing::warn!(id = %m.id, phase = m.phase.as_str(), error = %e, "reshard step failed; retrying");
                app.reshard.lock().last_error = Some(e.to_string());
            }
        }
    }
}

/// Requests seen in this window before the reshard give its reference p99.
const BEFORE_WINDOW: Duration = Duration::from_secs(10);
/// The adaptive throttle compares the p99 of this last window...
const RECENT_WINDOW: Duration = Duration::from_secs(1);
/// ...at most this often (a chunk's effect shows within one window).
const ADJUST_EVERY: Duration = Duration::from_millis(500);
/// Fewer requests than this in a window say nothing about its p99.
const MIN_SAMPLES: usize = 50;

/// This proxy's request p99 of the last [`BEFORE_WINDOW`], taken when the
/// driver first sees a reshard (within `poll_interval` of its start).
fn latency_before(app: &App) -> Option<Duration> {
    app.latency
        .quantile(Instant::now(), BEFORE_WINDOW, 0.99)
        .filter(|(_, n)| *n >= MIN_SAMPLES)
        .map(|(p99, _)| p99)
}

/// The copy's rows/s for the next chunk: `max_rows_per_sec`, or with the
/// adaptive throttle the rate [`crate::domain::latency::next_rate`] steers by the
/// p99 of the last second against the one before the reshard (no
/// reference, or too few recent requests: no pressure, the rate climbs).
fn copy_rate(app: &App) -> f64 {
    let cfg = &app.config.reshard;
    let max = cfg.max_rows_per_sec as f64;
    let Some(ratio) = cfg.adaptive_ratio else {
        return max;
    };
    let now = Instant::now();
    let mut p = app.reshard.lock();
    let rate = p.rate.unwrap_or(max);
    if p.rate_adjusted.is_some_and(|t| now < t + ADJUST_EVERY) {
        return rate;
    }
    let recent = app
        .latency
        .quantile(now, RECENT_WINDOW, 0.99)
        .filter(|(_, n)| *n >= MIN_SAMPLES)
        .map(|(p99, _)| p99);
    let next = match (recent, p.latency_before) {
        (Some(recent), Some(before)) => next_rate(
            rate,
            recent,
            before,
            ratio,
            cfg.min_rows_per_sec as f64,
            max,
        ),
        _ => (rate + max / 10.0).min(max),
    };
    if p.rate.is_some_and(|r| r != next) {
        tracing::debug!(rows_per_sec = next.round(), ?recent, before = ?p.latency_before, "reshard copy rate adjusted");
    }
    p.rate = Some(next);
    p.rate_adjusted = Some(now);
    next
}

async fn holds_lease(app: &App) -> bool {
    match &app.store {
        None => true,
        Some(store) => store
            .try_lease(LEASE, &app.writer_id, LEASE_TTL)
            .await
            .unwrap_or(false),
    }
}

fn step(app: &App, what: &str) {
    app.reshard.lock().step = what.to_owned();
}

async fn pass(app: &Arc<App>, map: &Arc<ShardMap>, m: &Migration) -> Result<(), StepError> {
    match m.phase {
        Phase::Copying => copying(app, map, m).await,
        Phase::Cancelling => cancelling(app, map, m).await,
        Phase::Cleaning => cleaning(app, map, m).await,
    }
}

/// Fails with `Superseded` once the running topology is not `map` any more.
fn still_current(app: &App, map: &ShardMap) -> Result<(), StepError> {
    if app.map.load().version() == map.version() {
        Ok(())
    } else {
        Err(StepError::Superseded)
    }
}

fn group<'m>(map: &'m ShardMap, name: &str) -> Result<&'m Arc<GroupHandle>, StepError> {
    map.group(name)
        .ok_or_else(|| StepError::Other(format!("group {name} is not in the topology")))
}

async fn master(app: &App, g: &GroupHandle) -> Result<mysql_async::Conn, StepError> {
    Ok(db::conn(&g.master.pool, app.config.pool.connect_timeout).await?)
}

/// Copy every moved range, verify, then publish `cleaning`. A failed
/// verification publishes the reshard as `failed` (the version that ends
/// it): from then on nothing is done until a cancel rolls it back.
async fn copying(app: &Arc<App>, map: &Arc<ShardMap>, m: &Migration) -> Result<(), StepError> {
    if let Some(failed) = plan::failure(&map.topology) {
        step(app, "failed; cancel to roll it back");
        app.reshard.lock().last_error = failed.error.clone();
        return Ok(());
    }
    step(app, "waiting for every proxy to settle the new routing");
    let waiting = super::unsettled(app, m.since)
        .await
        .map_err(StepError::Other)?;
    app.reshard.lock().waiting_for = waiting.clone();
    if !waiting.is_empty() {
        return Ok(());
    }
    for g in &map.groups {
        g.ensure_schema(app.config.pool.connect_timeout).await?;
    }
    let moves = &map.moves;
    // The fence: from its commit on, no batch routed by the previous ring
    // commits on a source (a proxy that missed this reshard, cut off from
    // the store, is refused there and routes its batch again), so what the
    // copy reads on the sources is final. Raised every pass (idempotent).
    let sources: std::collections::BTreeSet<&str> =
        moves.iter().map(|mv| mv.source.as_str()).collect();
    for source in sources {
        let mut c = master(app, group(map, source)?).await?;
        db::raise_ring_fence(&mut c, m.since).await?;
    }
    if app.reshard.lock().rows_total.is_none() {
        step(app, "counting rows to copy");
        let mut total = 0;
        for mv in moves {
            let mut c = master(app, group(map, &mv.source)?).await?;
            total += sql::count_rows(&mut c, &[span(mv)]).await?;
        }
        let mut p = app.reshard.lock();
        p.rows_total = Some(total);
        p.copy_started = Some(Instant::now());
    }
    step(app, "copying");
    // The event id sets first, whole (a set mixes every range's counters):
    // a move is not done before its sources' ids are on its target.
    for p in plan::pairs(moves) {
        let mut src = master(app, group(map, &p.source)?).await?;
        let target = group(map, &p.target)?;
        let mut dst = master(app, target).await?;
        let sets = sql::copy_id_sets(&mut src, &mut dst, target.max_packet()).await?;
        tracing::info!(id = %m.id, source = %p.source, target = %p.target, sets, "event id sets copied");
    }
    for mv in moves {
        copy_range(app, map, m, mv).await?;
    }
    step(app, "verifying");
    let verified = verify(app, map, m).await?;
    if let Some(bad) = verified.iter().find(|v| !v.ok()) {
        let error = format!(
            "verification failed for {} -> {}: source has {} counters summing to {}, copies recorded {} summing to {}; not cleaning up",
            bad.source,
            bad.target,
            bad.source_counters,
            bad.source_sum,
            bad.copied_counters,
            bad.copied_sum
        );
        let failed = plan::fail(&map.topology, &error, verified, unix_now().max(0) as u64);
        still_current(app, map)?;
        let v = super::publish(app, map.version(), failed)
            .await
            .map_err(|e| StepError::Other(e.to_string()))?;
        tracing::error!(id = %m.id, version = v, error, "reshard failed; POST /admin/v1/reshard/cancel rolls it back");
        return Err(StepError::Other(error));
    }
    let mut next = map.topology.clone();
    if let Some(mm) = next.migration.as_mut() {
        mm.phase = Phase::Cleaning;
        mm.verified = verified;
    }
    still_current(app, map)?;
    let v = super::publish(app, map.version(), next)
        .await
        .map_err(|e| StepError::Other(e.to_string()))?;
    tracing::info!(id = %m.id, version = v, "reshard copied and verified; cleaning up the sources");
    Ok(())
}

fn span(mv: &Move) -> Span {
    Span {
        start: mv.start,
        end: mv.end,
    }
}

/// Copies one moved range chunk by chunk, from where its markers end.
async fn copy_range(
    app: &Arc<App>,
    map: &Arc<ShardMap>,
    m: &Migration,
    mv: &Move,
) -> Result<(), StepError> {
    let cfg: &ReshardConfig = &app.config.reshard;
    let (source, target) = (group(map, &mv.source)?, group(map, &mv.target)?);
    let mut src = master(app, source).await?;
    let mut dst = master(app, target).await?;
    let done = sql::copied_spans(&mut dst, &m.id).await?;
    let mut at = done
        .iter()
        .filter(|s| mv.contains(s.start))
        .map(|s| s.end)
        .max()
        .map_or(Some(mv.start), |end| end.checked_add(1));
    while let Some(start) = at.filter(|s| *s <= mv.end) {
        still_current(app, map)?;
        if !holds_lease(app).await {
            return Err(StepError::Other("lost the reshard lease".into()));
        }
        let started = Instant::now();
        let end = sql::chunk_end(&mut src, start, mv.end, cfg.chunk_counters).await?;
        let s = Span { start, end };
        let (rows, sums) = sql::read_span(&mut src, s).await?;
        let ids = sql::read_span_ids(&mut src, s).await?;
        let applied = sql::copy_span(
            &mut dst,
            target.max_packet(),
            &m.id,
            &mv.source,
            s,
            &rows,
            &ids,
            sums,
        )
        .await?;
        if applied {
            app.reshard.lock().rows_copied += sums.rows;
            telemetry::reshard_rows_copied(sums.rows);
        }
        at = end.checked_add(1);
        // Throttle: a chunk of n rows takes at least n / rate seconds.
        let budget = Duration::from_secs_f64(sums.rows as f64 / copy_rate(app));
        if let Some(rest) = budget.checked_sub(started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
    Ok(())
}

/// Per source → target pair: what the source holds in the moved ranges
/// against what the copies recorded.
async fn verify(app: &App, map: &ShardMap, m: &Migration) -> Result<Vec<Verified>, StepError> {
    let mut out = Vec::new();
    for p in plan::pairs(&map.moves) {
        let spans: Vec<Span> = map
            .moves
            .iter()
            .filter(|x| x.source == p.source && x.target == p.target)
            .map(span)
            .collect();
        let mut src = master(app, group(map, &p.source)?).await?;
        let mut dst = master(app, group(map, &p.target)?).await?;
        let have = sql::source_sums(&mut src, &spans).await?;
        let copied: ChunkSums = sql::copied_sums(&mut dst, &m.id, &p.source).await?;
        // Event ids: the target holds every id the source counted in the
        // moved ranges (and maybe newer ones), or the copy is retried
        // rather than the sources cleaned up.
        // (Ids within ten minutes of expiry may go on one side first.)
        let since = unix_now() - app.config.idempotency.window.as_secs() as i64 + 600;
        let (src_ids, dst_ids) = (
            sql::count_ids(&mut src, &spans, since).await?,
            sql::count_ids(&mut dst, &spans, since).await?,
        );
        if dst_ids < src_ids {
            return Err(StepError::Other(format!(
                "{} holds {src_ids} event ids of the moved ranges, {} only {dst_ids}; copying again",
                p.source, p.target
            )));
        }
        out.push(Verified {
            source: p.source,
            target: p.target,
            source_counters: have.counters,
            source_sum: have.total_sum,
            copied_counters: copied.counters,
            copied_sum: copied.total_sum,
        });
    }
    Ok(out)
}

/// Undo every copied chunk, then publish the reverse reshard.
async fn cancelling(app: &Arc<App>, map: &Arc<ShardMap>, m: &Migration) -> Result<(), StepError> {
    step(app, "undoing copies");
    for mv in &map.moves {
        let (source, target) = (group(map, &mv.source)?, group(map, &mv.target)?);
        let mut src = master(app, source).await?;
        let mut dst = master(app, target).await?;
        let spans: Vec<Span> = sql::copied_spans(&mut dst, &m.id)
            .await?
            .into_iter()
            .filter(|s| mv.contains(s.start))
            .collect();
        for s in spans {
            still_current(app, map)?;
            let (rows, _) = sql::read_span(&mut src, s).await?;
            sql::undo_span(&mut dst, target.max_packet(), &m.id, s, &rows).await?;
        }
    }
    let Some(reverse) = plan::reverse(&map.topology, &super::new_id()) else {
        return Ok(());
    };
    still_current(app, map)?;
    let v = super::publish(app, map.version(), reverse)
        .await
        .map_err(|e| StepError::Other(e.to_string()))?;
    tracing::info!(id = %m.id, version = v, "reshard cancelled; moving new writes back");
    Ok(())
}

/// Wait out reads that looked at a target before its marker, delete the
/// sources' moved rows, wait for the targets' replicas, publish the end.
async fn cleaning(app: &Arc<App>, map: &Arc<ShardMap>, m: &Migration) -> Result<(), StepError> {
    step(app, "grace period before cleanup");
    tokio::time::sleep(app.config.reshard.cleanup_grace).await;
    step(app, "deleting moved rows from the sources");
    for mv in &map.moves {
        let mut src = master(app, group(map, &mv.source)?).await?;
        for table in 0..sql::TABLE_COUNT {
            loop {
                still_current(app, map)?;
                let n = sql::delete_some(&mut src, table, span(mv), app.config.reshard.delete_rows)
                    .await?;
                if n == 0 {
                    break;
                }
            }
        }
    }
    step(app, "waiting for the targets' replicas");
    wait_replicas(app, map, m).await?;
    let done: Topology = plan::finish(&map.topology, unix_now().max(0) as u64);
    still_current(app, map)?;
    let v = super::publish(app, map.version(), done)
        .await
        .map_err(|e| StepError::Other(e.to_string()))?;
    tracing::info!(id = %m.id, version = v, reverts = ?m.reverts, "reshard done");
    app.reshard.lock().step = "done".into();
    Ok(())
}

/// Every reachable replica of a target holds all of the reshard's markers
/// (and so every copied row), so an eventual read after the end cannot
/// miss copied data. An unreachable replica is not eligible for reads.
async fn wait_replicas(app: &App, map: &ShardMap, m: &Migration) -> Result<(), StepError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for p in plan::pairs(&map.moves) {
        let target = group(map, &p.target)?;
        let want = sql::marker_count(&mut master(app, target).await?, &m.id).await?;
        for r in &target.replicas {
            loop {
                let have = match db::conn(&r.pool, app.config.pool.connect_timeout).await {
                    Ok(mut c) => sql::marker_count(&mut c, &m.id).await.ok(),
                    Err(_) => None,
                };
                match have {
                    None => break,
                    Some(n) if n >= want => break,
                    Some(_) if Instant::now() > deadline => {
                        return Err(StepError::Other(format!(
                            "replica {} of {} has not caught up with the copies",
                            r.dsn.addr(),
                            target.name
                        )));
                    }
                    Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
    }
    Ok(())
}
