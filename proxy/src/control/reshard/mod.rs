//! Online resharding: add, remove or reweight groups while clients write
//! and read, without counting any acknowledged increment zero times or twice.
//!
//! # The design
//! Counts are additive, so a key's value may live on two groups at once.
//! A reshard is a topology version that carries a `migration` section (the
//! previous ring). From that version on:
//! 1. **Writes** of every key go to its owner on the new ring.
//! 2. **Reads** of a key in a moved range read the target and, in the same
//!    statement (one snapshot), whether the key's range has been copied there
//!    (a marker row in `reshard_chunks`). Copied: the target holds
//!    everything. Not copied: the source master's rows are added. A target
//!    replica answers eventual reads of the keys whose copy it already holds
//!    (see `engine::moved_reads`).
//! 3. **Copy** starts only once every live proxy has *settled* the version:
//!    it applied it and committed everything it accepted under the old ring
//!    (the registry says so). From then on no write reaches a source for a
//!    moved key, so a source's moved rows are frozen. Each chunk is added to
//!    the target in one transaction together with its marker: a retried or
//!    concurrent copy finds the marker and applies nothing.
//! 4. **Verify**: per source → target pair, the source's counters and totals
//!    in the moved ranges equal what the markers recorded (VDiff-like).
//! 5. **Cleanup** (after a grace period for reads that looked at a target
//!    before its marker existed) deletes the sources' moved rows in chunks,
//!    waits for the targets' replicas to hold every copy, and publishes the
//!    final topology without the migration and without drained groups.
//!
//! Cancel (before cleanup) undoes each copied chunk (marker deleted and
//! rows subtracted in one transaction), then runs the reverse reshard, which
//! copies what was written to the new owners back to the old ones.
//!
//! Every phase change is an ordinary topology version, so the state is
//! persisted where the topology is (file or shared store) and any proxy can
//! resume it; with a store, one driver at a time holds the `reshard` lease.
//!
//! - `storage::reshard_sql`: the statements.
//! - [`driver`]: the state machine that runs the phases (and the adaptive
//!   copy throttle).
//! - `engine::moved_reads`: how the read path sums source and target.

pub mod driver;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tally_admin::reshard::{self as plan, PlanError};
use tally_admin::{Topology, TopologyDoc};

use crate::app::App;
use crate::control::topology::{self, ChangeError, Source};
use crate::domain::clock::unix_now;
use crate::error::ApiError;
use crate::storage::shard_map::ShardMap;
use crate::storage::{db, reshard_sql};

/// After a routing change is swapped in: waits until no request holds the
/// previous map, then commits everything buffered, then records `version`
/// as settled. Runs in the background, one settle at a time.
pub fn settle(app: &Arc<App>, previous: Arc<ShardMap>, version: u64) {
    if previous.groups.is_empty() {
        // The first topology of this process: nothing was routed before it
        // (ingest without groups is refused), so there is nothing to
        // commit. Flushing here anyway would cut whatever the first
        // requests buffered right after the start, ahead of the interval.
        app.settled.fetch_max(version, Ordering::AcqRel);
        return;
    }
    let app = app.clone();
    tokio::spawn(async move {
        let _one_at_a_time = app.settle_lock.lock().await;
        // An ingest request that loaded the previous map may still be
        // merging into a buffer by the old ring; it holds the map until it
        // is done, which takes microseconds. Ten seconds is a backstop.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&previous) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(previous);
        let mut stop = app.stop_signal();
        loop {
            match app.flush_all(Duration::from_secs(60)).await {
                Ok(_) => break,
                Err(failed) => {
                    tracing::warn!(version, groups = %failed.join(", "), "cannot settle the routing change yet; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => return,
                    }
                }
            }
        }
        app.settled.fetch_max(version, Ordering::AcqRel);
        tracing::info!(version, "routing change settled");
    });
}

/// Proxies that have not settled `version` yet (empty: every live proxy
/// has). Without a store, only this proxy counts.
pub async fn unsettled(app: &App, version: u64) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    if app.settled.load(Ordering::Acquire) < version {
        out.push(app.writer_id.clone());
    }
    if let Some(store) = &app.store {
        let proxies = store.proxies().await.map_err(|e| e.to_string())?;
        out.extend(
            proxies
                .into_iter()
                .filter(|p| p.alive && p.id != app.writer_id && p.settled < version)
                .map(|p| p.id),
        );
    }
    Ok(out)
}

/// A reshard id: time-ordered and unique enough across proxies.
fn new_id() -> String {
    format!("r{}-{:04x}", unix_now(), fastrand::u16(..))
}

impl From<PlanError> for ApiError {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::InProgress(_) => ApiError::ReshardInProgress(e.to_string()),
            PlanError::NothingMoves
            | PlanError::TargetHasMigration
            | PlanError::ServersChange(_) => ApiError::InvalidParam(e.to_string()),
        }
    }
}

/// `POST /admin/v1/reshard`: validates the target, publishes the version
/// that switches writes to the new ring, and returns the plan. The driver
/// does the rest in the background.
pub async fn start(app: &Arc<App>, text: &str) -> Result<Value, ApiError> {
    let doc = topology::parse_doc(text)?;
    let _serial = app.topology_lock.lock().await;
    let current = app.map.load_full();
    // Validated as the step that publishes it will be: `***` kept, the
    // secrets of its references read (the running ones kept), so that its
    // unchanged servers compare equal to the running ones.
    let target = topology::validated(doc, &current, Source::Reshard)?;
    let next = plan::begin(&current.topology, &target, &new_id())?;
    let moves = plan::moves(&next);
    let id = next
        .migration
        .as_ref()
        .map(|m| m.id.clone())
        .unwrap_or_default();
    let applied = topology::apply_locked(app, next.to_doc(false), Source::Reshard, None).await?;
    tracing::info!(
        id,
        version = applied.version,
        ranges = moves.len(),
        "reshard started"
    );
    Ok(json!({
        "id": id,
        "version": applied.version,
        "phase": "copying",
        "moves": plan::pairs(&moves),
        "fraction": moves.iter().map(|m| m.fraction()).sum::<f64>(),
    }))
}

/// `POST /admin/v1/reshard/cancel`: allowed while copying; turns the
/// reshard into `cancelling`, after which the driver undoes the copies and
/// runs the reverse reshard.
pub async fn cancel(app: &Arc<App>) -> Result<Value, ApiError> {
    let _serial = app.topology_lock.lock().await;
    let current = app.map.load_full();
    let Some(m) = &current.topology.migration else {
        return Err(ApiError::NotFound("no reshard is in progress".into()));
    };
    match m.phase {
        tally_admin::topology::Phase::Copying => {}
        tally_admin::topology::Phase::Cancelling => {
            return Ok(json!({ "id": m.id, "phase": "cancelling", "version": current.version() }));
        }
        tally_admin::topology::Phase::Cleaning => {
            return Err(ApiError::PastCutover(format!(
                "reshard {} is verified and cleaning up the sources; it can no longer be cancelled",
                m.id
            )));
        }
    }
    if m.reverts.is_some() {
        return Err(ApiError::PastCutover(format!(
            "reshard {} is itself the undo of a cancelled reshard",
            m.id
        )));
    }
    let mut next: Topology = current.topology.clone();
    if let Some(m) = next.migration.as_mut() {
        m.phase = tally_admin::topology::Phase::Cancelling;
    }
    let applied = topology::apply_locked(app, next.to_doc(false), Source::Reshard, None).await?;
    Ok(json!({ "id": m.id, "phase": "cancelling", "version": applied.version }))
}

/// Publishes `next` as the version after `based_on` (a phase change): a
/// compare-and-set, so a cancel (or any change) published meanwhile is
/// never overwritten by a driver working from an older snapshot.
pub(crate) async fn publish(
    app: &Arc<App>,
    based_on: u64,
    next: Topology,
) -> Result<u64, ChangeError> {
    let doc: TopologyDoc = next.to_doc(false);
    Ok(topology::apply(app, doc, Source::Reshard, Some(based_on))
        .await?
        .version)
}

/// `GET /admin/v1/reshard`: the same answer on every proxy, from the
/// persisted state (phase, plan, verification, how the last reshard
/// ended) and the copy markers on the targets, plus, on the proxy driving
/// it, rows copied, rate, ETA and the proxies it waits for.
///
/// `state` is the reshard's: `copying`, `cancelling` (also while the
/// reverse reshard runs), `cleaning` while active (`failed` once its
/// verification failed: it waits for a cancel), then `done`, `cancelled`
/// or `failed` from `last_reshard`. `progress` is the fraction of the moved
/// key space copied to its new owners (1 once cleaning or ended; it falls
/// back while a cancel undoes copies); `null` when no reshard ever ran or
/// a target cannot be asked.
pub async fn status(app: &Arc<App>) -> Value {
    let map = app.map.load_full();
    let last = map.topology.last_reshard.as_ref().map(|l| {
        let mut v = json!(l);
        // `outcome`: the name before the outcome was persisted.
        v["outcome"] = json!(l.state.as_str());
        v
    });
    let Some(m) = &map.topology.migration else {
        return json!({
            "active": false,
            "id": last.as_ref().map(|l| l["id"].clone()),
            "state": last.as_ref().map(|l| l["state"].clone()),
            "progress": last.as_ref().map(|_| 1.0),
            "version": map.version(),
            "last": last,
        });
    };
    let state = if plan::failure(&map.topology).is_some() {
        "failed"
    } else if m.reverts.is_some() {
        "cancelling"
    } else {
        m.phase.as_str()
    };
    let copied = match m.phase {
        tally_admin::topology::Phase::Cleaning => Some(1.0),
        _ => copied_fraction(app, &map, &m.id).await,
    };
    let moves = &map.moves;
    let progress = app.reshard.lock();
    let mine = progress.id == m.id;
    let rate = match (mine, progress.copy_started) {
        (true, Some(t)) if t.elapsed().as_secs_f64() > 0.0 => {
            progress.rows_copied as f64 / t.elapsed().as_secs_f64()
        }
        _ => 0.0,
    };
    let eta = match (mine, progress.rows_total) {
        (true, Some(total)) if rate > 0.0 => {
            json!((total.saturating_sub(progress.rows_copied) as f64 / rate).ceil())
        }
        _ => Value::Null,
    };
    json!({
        "active": true,
        "id": m.id,
        "state": state,
        "progress": copied,
        "phase": m.phase.as_str(),
        "version": map.version(),
        "since": m.since,
        "reverts": m.reverts,
        "moves": plan::pairs(moves),
        "ranges": moves.len(),
        "fraction": moves.iter().map(|x| x.fraction()).sum::<f64>(),
        "verified": m.verified,
        "last": last,
        "driver": if mine { json!({
            "proxy": app.writer_id,
            "step": progress.step,
            "rows_total": progress.rows_total,
            "rows_copied": progress.rows_copied,
            "rows_per_sec": rate.round(),
            "rows_per_sec_limit": progress.rate.map(f64::round),
            "request_p99_before_ms": progress.latency_before.map(|d| d.as_secs_f64() * 1000.0),
            "eta_seconds": eta,
            "waiting_for": progress.waiting_for,
            "last_error": progress.last_error,
        }) } else { Value::Null },
    })
}

/// The fraction of the moved key space whose copy markers (reshard `id`)
/// are on the targets: what any proxy can tell. `None` when a target's
/// master does not answer within two seconds.
async fn copied_fraction(app: &App, map: &ShardMap, id: &str) -> Option<f64> {
    let size = |start: u64, end: u64| u128::from(end - start) + 1;
    let total: u128 = map.moves.iter().map(|mv| size(mv.start, mv.end)).sum();
    if total == 0 {
        return Some(1.0);
    }
    let targets: BTreeSet<&str> = map.moves.iter().map(|mv| mv.target.as_str()).collect();
    let mut copied: u128 = 0;
    for target in targets {
        let g = map.group(target)?;
        let ask = async {
            let mut c = db::conn(&g.master.pool, app.config.pool.connect_timeout).await?;
            reshard_sql::copied_spans(&mut c, id).await
        };
        let spans = tokio::time::timeout(Duration::from_secs(2), ask)
            .await
            .ok()?
            .ok()?;
        copied += spans
            .iter()
            .filter(|s| {
                map.moves
                    .iter()
                    .any(|mv| mv.target == target && mv.contains(s.start))
            })
            .map(|s| size(s.start, s.end))
            .sum::<u128>();
    }
    Some((copied as f64 / total as f64).min(1.0))
}
