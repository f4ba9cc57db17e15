//! One flusher task per group: cuts batches from the group's buffer and
//! applies each exactly once to the group's current master.
//!
//! The flusher is self-clocking: it cuts a new batch only after the previous
//! one committed and the interval passed (or the buffer grew past
//! `flush_rows`, or an `ack=committed` writer waits, after a short linger).
//! Under heavy load batches therefore grow and aggregate more instead of
//! queueing. A failed batch is retried with the same `(writer_id, seq)`
//! under capped exponential backoff with jitter, on whatever master the
//! current shard map names, until it is applied; newer deltas meanwhile
//! collect in the next batch. A slow or dead master stalls only its own
//! group's flusher.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use mysql_async::prelude::Queryable;
use tokio::sync::watch;

use crate::app::{App, FlusherTask};
use crate::config::BufferConfig;
use crate::engine::moved_ids;
use crate::engine::replay::moved_mark;
use crate::failpoint;
use crate::storage::buffer::{Batch, GroupBuffer, IdEvent, Minutes};
use crate::storage::db::{self, FlushError, FlushOutcome};
use crate::storage::rows::FlushRows;
use crate::telemetry;

/// Upper bound on one flush attempt (connect + transaction). A master that
/// accepts the connection but never answers must not stall the group
/// forever; the attempt is then retried like any other failure.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts a flusher for every buffer of the current map that has none.
/// A flusher whose buffer left the map (its group removed, or removed and
/// added back with a new buffer) ends by itself once that buffer is empty.
pub fn start_all(app: &Arc<App>) {
    // After the stop signal the running flushers do the final flush; a
    // topology change then (a promotion that rescues it) must not start a
    // second flusher for a buffer `stop_all` already took out of the list.
    if *app.stop.borrow() {
        return;
    }
    let map = app.map.load();
    let mut flushers = app.flushers.lock();
    flushers.retain(|f| !f.task.is_finished());
    for g in &map.groups {
        if !flushers.iter().any(|f| Arc::ptr_eq(&f.buffer, &g.buffer)) {
            flushers.push(FlusherTask {
                buffer: g.buffer.clone(),
                task: tokio::spawn(supervise(app.clone(), g.buffer.clone(), app.stop_signal())),
            });
        }
    }
}

/// Stops every flusher after it flushed everything and waits for them.
pub async fn stop_all(app: &App) {
    let _ = app.stop.send(true);
    let flushers: Vec<FlusherTask> = app.flushers.lock().drain(..).collect();
    for f in flushers {
        if let Err(e) = f.task.await {
            tracing::error!(error = %e, "flusher task failed");
        }
    }
}

/// Runs the group's flusher and restarts it when it panics (a bug): the
/// batch it was applying stays in the buffer (`GroupBuffer::in_flight`,
/// with its dedup sequence number), and the new run applies it before it
/// cuts another, so nothing is lost or applied twice and the group does not
/// stop flushing. Each restart is logged and counted
/// (`tally_flusher_restarts_total`); a restart waits `buffer.retry_min` so
/// a panic on every attempt does not spin.
async fn supervise(app: Arc<App>, buffer: Arc<GroupBuffer>, stop: watch::Receiver<bool>) {
    telemetry::quarantined(buffer.name(), 0);
    telemetry::flusher_restarted(buffer.name(), 0);
    loop {
        let run = run(app.clone(), buffer.clone(), stop.clone());
        match AssertUnwindSafe(run).catch_unwind().await {
            Ok(()) => return,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(group = buffer.name(), panic = %message, "flusher panicked; restarting it with its batch");
                telemetry::flusher_restarted(buffer.name(), 1);
                tokio::time::sleep(app.config.buffer.retry_min).await;
            }
        }
    }
}

/// Runs until `stop` turns true and every pending entry is committed.
/// First applies the batch a panicked run left in flight, if any.
pub async fn run(app: Arc<App>, buffer: Arc<GroupBuffer>, mut stop: watch::Receiver<bool>) {
    let cfg = app.config.buffer.clone();
    if let Some(batch) = buffer.in_flight() {
        apply(&app, &buffer, &batch).await;
        if let Some(wal) = app.wal() {
            wal.durable(buffer.name(), batch.wal_lsn);
        }
    }
    let mut last_cut = Instant::now();
    loop {
        let stopping = *stop.borrow();
        if !stopping {
            tokio::select! {
                _ = tokio::time::sleep_until((last_cut + cfg.flush_interval).into()) => {}
                _ = buffer.wake.notified() => {
                    let urgent = buffer.take_urgent();
                    if let Some(linger) = linger_after_wake(urgent, buffer.pending(), buffer.has_committed_waiters(), &cfg) {
                        tokio::time::sleep(linger).await;
                    }
                }
                _ = stop.changed() => {}
            }
        }
        let batch = {
            let (app, buffer) = (app.clone(), buffer.clone());
            let large = buffer.pending() + buffer.pending_ids() > OFF_RUNTIME_ENTRIES;
            off_runtime(large, move || buffer.cut_with(app.wal())).await
        };
        last_cut = Instant::now();
        if !batch.is_empty() {
            apply(&app, &buffer, &batch).await;
        } else {
            buffer.committed(&batch);
        }
        if let Some(wal) = app.wal() {
            wal.durable(buffer.name(), batch.wal_lsn);
        }
        buffer.recycle(batch);
        // What the bound counts: entries and id'd events alike.
        telemetry::pending_rows(buffer.name(), buffer.pending() + buffer.pending_ids());
        if buffer.pending() == 0 && !in_map(&app, &buffer) {
            tracing::info!(
                group = buffer.name(),
                "buffer left the topology; flusher stopped"
            );
            return;
        }
        if stopping && !buffer.has_open_entries() {
            tracing::info!(
                group = buffer.name(),
                "flusher stopped with nothing pending"
            );
            return;
        }
    }
}

/// Whether the current map still routes to `buffer` (its group is there
/// with this very buffer, not a new one under the same name).
fn in_map(app: &App, buffer: &Arc<GroupBuffer>) -> bool {
    app.map
        .load()
        .group(buffer.name())
        .is_some_and(|g| Arc::ptr_eq(&g.buffer, buffer))
}

/// The ranges of `counters` (sorted, consecutive) to apply in a
/// transaction each, at most `limit` rows (a counter's minute rows and its
/// total) per range; `None` when the batch fits in one (or `limit` is 0).
fn split(counters: &[Counter], limit: usize) -> Option<Vec<Range<usize>>> {
    let rows = |(_, m): &Counter| m.len() + 1;
    if limit == 0 || counters.iter().map(rows).sum::<usize>() <= limit {
        return None;
    }
    let mut parts = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, c) in counters.iter().enumerate() {
        if size > 0 && size + rows(c) > limit {
            parts.push(start..i);
            (start, size) = (i, 0);
        }
        size += rows(c);
    }
    parts.push(start..counters.len());
    Some(parts)
}

/// Applies one batch, retrying until it is in the database.
async fn apply(app: &App, buffer: &GroupBuffer, batch: &Arc<Batch>) {
    // A batch of plain events past `transaction_rows` goes in parts (a
    // replica applies one while the master writes the next). Not with ids
    // (decided over the whole batch) nor with a write-ahead log (its mark
    // is per batch: a crash between parts would replay the first again).
    if batch.ids.is_empty() && app.wal().is_none() {
        let parts = batch.parts.get_or_init(|| {
            split(&batch.counters, app.config.buffer.transaction_rows)
                .unwrap_or_default()
                .into_iter()
                .map(|r| (r, app.next_seq()))
                .collect()
        });
        if !parts.is_empty() {
            return apply_parts(app, buffer, batch, parts).await;
        }
    }
    let seq = *batch.seq.get_or_init(|| app.next_seq());
    let preparing = Instant::now();
    let rows = {
        let batch = batch.clone();
        off_runtime(
            batch.entries + batch.ids.len() > OFF_RUNTIME_ENTRIES,
            move || {
                // The ids' grouping too (it hashes every event), once for
                // every attempt.
                batch.id_plan();
                FlushRows::derive_fresh(&batch.counters)
            },
        )
        .await
    };
    let prepare_ms = preparing.elapsed().as_millis() as u64;
    let cfg = &app.config.buffer;
    let mut backoff = cfg.retry_min;
    let mut attempt = 0u32;
    let mut stale = None;
    loop {
        attempt += 1;
        let started = Instant::now();
        let outcome = {
            let _gate = buffer.gate.lock().await;
            attempt_once(app, buffer, seq, batch, &rows, &mut stale).await
        };
        match outcome {
            Ok(FlushOutcome::StaleRing { fence }) => {
                if let Some(parts) = stale_ring(app, buffer, batch, None, seq, fence).await {
                    telemetry::flush_committed(buffer.name(), rows.len(), started.elapsed());
                    tracing::warn!(
                        group = buffer.name(),
                        seq,
                        fence,
                        entries = batch.entries,
                        parts,
                        "batch routed by an older ring than the master's reshard fence: applied to the current owners instead"
                    );
                    return;
                }
            }
            Ok(outcome) => {
                // Tests panic here: the batch is in the database, the
                // buffer does not know it yet.
                failpoint::hit("flusher.after_commit", &app.writer_id);
                match outcome {
                    FlushOutcome::AlreadyApplied { duplicates } => {
                        telemetry::flush_duplicate(buffer.name());
                        count_duplicates(buffer.name(), batch, duplicates);
                    }
                    FlushOutcome::Applied {
                        held, duplicates, ..
                    } => {
                        telemetry::quarantined(buffer.name(), held.deltas);
                        count_duplicates(buffer.name(), batch, duplicates);
                    }
                    FlushOutcome::StaleRing { .. } => {}
                }
                // Before the waiters of `ack=committed` are answered: a
                // client that reads after its acknowledgement must not get
                // a total cached before the commit.
                app.committed_to(batch);
                buffer.committed(batch);
                telemetry::flush_committed(buffer.name(), rows.len(), started.elapsed());
                // One line per non-empty flush: operators read throughput,
                // batch size and retries from it.
                tracing::info!(
                    group = buffer.name(),
                    seq,
                    entries = batch.entries,
                    ids = batch.ids.len(),
                    rows = rows.len(),
                    ?outcome,
                    attempt,
                    // Deriving the rows and grouping the ids, before the
                    // first attempt (not in `took_ms`).
                    prepare_ms,
                    took_ms = started.elapsed().as_millis() as u64,
                    "flushed batch"
                );
                return;
            }
            Err(e) => failed(
                buffer,
                &e,
                seq,
                attempt,
                backoff,
                "flush failed; will retry the same batch",
            ),
        }
        backoff = pause(backoff, cfg).await;
    }
}

/// A failed attempt: counted and logged; one that surely applied nothing
/// turns the commit seqlock even again (unless an earlier one is still in
/// doubt), one whose COMMIT got no answer leaves it odd until an attempt
/// finds out.
fn failed(
    buffer: &GroupBuffer,
    e: &FlushError,
    seq: u64,
    attempt: u32,
    backoff: Duration,
    what: &str,
) {
    match e {
        FlushError::NotApplied(_) => buffer.commit_not_applied(),
        FlushError::Ambiguous(_) => buffer.commit_ambiguous(),
    }
    telemetry::flush_failed(buffer.name());
    buffer.flush_failed();
    tracing::warn!(group = buffer.name(), seq, attempt, error = %e, retry_in_ms = backoff.as_millis() as u64, "{what}");
}

/// An attempt of `batch` (from its counter `rest.start` on, when given)
/// refused by a reshard source's fence, after inserting its dedup row: it
/// applied nothing. Once this proxy has the fence's topology, what is left
/// goes to the current owners and the batch is done (`Some`: the parts
/// applied); until then it is held (`None`) and retried.
async fn stale_ring(
    app: &App,
    buffer: &GroupBuffer,
    batch: &Batch,
    rest: Option<Range<usize>>,
    seq: u64,
    fence: u64,
) -> Option<usize> {
    buffer.commit_refused();
    let version = app.map.load().version();
    if version < fence {
        tracing::warn!(
            group = buffer.name(),
            seq,
            fence,
            routed_by = batch.routed_by,
            version,
            "batch routed by an older ring than the master's reshard fence; held until this proxy has the newer topology"
        );
        return None;
    }
    let parts = match rest {
        None => reroute(app, buffer, batch, seq).await,
        Some(rest) => reroute(app, buffer, &batch.counters_in(rest), seq).await,
    };
    app.committed_to(batch);
    buffer.committed(batch);
    Some(parts)
}

/// Waits out `backoff` (jittered) before the next attempt; the next one.
async fn pause(backoff: Duration, cfg: &BufferConfig) -> Duration {
    tokio::time::sleep(jittered(backoff, fastrand::f64())).await;
    next_backoff(backoff, cfg.retry_max)
}

/// Applies a batch part by part, each exactly once under its own dedup
/// row, in counter order; a part found applied (a restarted flusher, an
/// ambiguous commit) is passed. After each part strong reads stop adding
/// its counters from the batch ([`GroupBuffer::part_committed`]); the
/// batch's writers are answered when the last part is in. A reshard
/// fence met on the way sends what is left to the current owners.
async fn apply_parts(
    app: &App,
    buffer: &GroupBuffer,
    batch: &Arc<Batch>,
    parts: &[(Range<usize>, u64)],
) {
    let cfg = &app.config.buffer;
    let started = Instant::now();
    let mut stale = None;
    let mut rows_total = 0;
    for (range, seq) in parts {
        if range.end <= batch.committed_upto.load(Ordering::Acquire) {
            continue;
        }
        let part = batch.counters_in(range.clone());
        let rows = FlushRows::derive_fresh(&part.counters);
        rows_total += rows.len();
        let mut backoff = cfg.retry_min;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let outcome = {
                let _gate = buffer.gate.lock().await;
                attempt_once(app, buffer, *seq, &part, &rows, &mut stale).await
            };
            match outcome {
                Ok(FlushOutcome::StaleRing { fence }) => {
                    let rest = Some(range.start..batch.counters.len());
                    if let Some(n) = stale_ring(app, buffer, batch, rest, *seq, fence).await {
                        tracing::warn!(
                            group = buffer.name(),
                            seq,
                            fence,
                            parts = n,
                            "batch routed by an older ring than the master's reshard fence: its parts not applied yet went to the current owners"
                        );
                        return;
                    }
                }
                Ok(outcome) => {
                    failpoint::hit("flusher.after_commit", &app.writer_id);
                    if let FlushOutcome::Applied { held, .. } = &outcome {
                        telemetry::quarantined(buffer.name(), held.deltas);
                    } else {
                        telemetry::flush_duplicate(buffer.name());
                    }
                    buffer.part_committed(batch, range.end);
                    break;
                }
                Err(e) => failed(
                    buffer,
                    &e,
                    *seq,
                    attempt,
                    backoff,
                    "flush of a batch part failed; will retry the same part",
                ),
            }
            backoff = pause(backoff, cfg).await;
        }
    }
    app.committed_to(batch);
    buffer.committed(batch);
    telemetry::flush_committed(buffer.name(), rows_total, started.elapsed());
    tracing::info!(
        group = buffer.name(),
        entries = batch.entries,
        rows = rows_total,
        parts = parts.len(),
        took_ms = started.elapsed().as_millis() as u64,
        "flushed batch in parts"
    );
}

/// Applies a batch that a reshard source's fence refused (some deltas were
/// routed by a ring older than the reshard: this proxy missed it, e.g. cut
/// off from the topology store) to the groups that own its counters in the
/// current map, each part exactly once under its own dedup row there, the
/// group's own part last with its write-ahead-log mark; parts on other
/// groups carry the mark `>group` that WAL replay consults for moved
/// records, so a crash meanwhile replays none of them twice. A part a
/// newer fence refuses again is split again by a newer map (with fresh
/// dedup rows for what was not applied yet). Returns how many parts.
async fn reroute(app: &App, buffer: &GroupBuffer, batch: &Batch, seq: u64) -> usize {
    let mut applied: HashSet<Box<[u8]>> = HashSet::new();
    let mut parts = 0;
    let mut pass = 0u32;
    let mut backoff = app.config.buffer.retry_min;
    loop {
        pass += 1;
        let map = app.map.load_full();
        let mut by_owner: BTreeMap<&str, Vec<Counter>> = BTreeMap::new();
        for (rk, minutes) in &batch.counters {
            if applied.contains(rk.as_ref()) {
                continue;
            }
            if let Some(owner) = map.route(rk) {
                by_owner
                    .entry(owner.name.as_str())
                    .or_default()
                    .push((rk.clone(), minutes.clone()));
            }
        }
        // The group's own part last: its WAL mark covers the whole batch.
        let own = by_owner.remove(buffer.name());
        let order = by_owner.into_iter().chain(own.map(|o| (buffer.name(), o)));
        let mut refused = false;
        for (owner, counters) in order {
            // A counter's id'd events go with it.
            let ids: Vec<IdEvent> = batch
                .ids
                .iter()
                .filter(|e| {
                    counters
                        .binary_search_by(|(k, _)| k.as_ref().cmp(e.routing_key()))
                        .is_ok()
                })
                .cloned()
                .collect();
            let part = Batch {
                entries: counters.iter().map(|(_, m)| m.len()).sum(),
                counters,
                ids,
                wal_lsn: batch.wal_lsn,
                routed_by: map.version(),
                ..Batch::default()
            };
            // The batch's own dedup row the first time (a restarted
            // flusher repeats this pass and finds its parts applied);
            // fresh ones for what a later pass sends. Not covered: a
            // flusher that panics between parts while the map changes
            // again would split differently and find a part's row under
            // the old split (both are needed at once; none is seen).
            let part_seq = if pass == 1 { seq } else { app.next_seq() };
            let mark = if owner == buffer.name() {
                owner.to_owned()
            } else {
                moved_mark(buffer.name())
            };
            if !apply_part(app, owner, part_seq, &part, &mark).await {
                refused = true;
                break;
            }
            parts += 1;
            applied.extend(part.counters.into_iter().map(|(rk, _)| rk));
        }
        if !refused {
            return parts;
        }
        tokio::time::sleep(jittered(backoff, fastrand::f64())).await;
        backoff = next_backoff(backoff, app.config.buffer.retry_max);
    }
}

/// Counts a committed batch's `duplicates` (every id'd event that did not
/// count) by where they were found: copies of an id within the batch
/// (its plan's repeats, pending in this proxy at once: `buffer`) and ids
/// the database already knew (`store`).
fn count_duplicates(group: &str, batch: &Batch, duplicates: usize) {
    let repeats = if batch.ids.is_empty() {
        0
    } else {
        batch.id_plan().repeats.len()
    };
    telemetry::duplicate_events(group, "buffer", repeats);
    telemetry::duplicate_events(group, "store", duplicates.saturating_sub(repeats));
}

/// A counter of a batch: its routing key and pending minutes.
type Counter = (Box<[u8]>, Minutes);

/// One part of a re-routed batch on `owner`'s master, retried until it is
/// in (true) or a fence there refuses it too (false: split again).
async fn apply_part(app: &App, owner: &str, seq: u64, part: &Batch, wal_group: &str) -> bool {
    let rows = FlushRows::derive_fresh(&part.counters);
    let mut backoff = app.config.buffer.retry_min;
    loop {
        let map = app.map.load_full();
        let Some(group) = map.group(owner) else {
            return false;
        };
        let attempt = async {
            let _gate = group.buffer.gate.lock().await;
            let elsewhere = moved_ids::counted_on_sources(app, &map, owner, &part.ids).await?;
            let mut conn = group
                .master_conn(app.config.pool.connect_timeout)
                .await
                .map_err(FlushError::NotApplied)?;
            db::flush(
                &mut conn,
                group.max_packet(),
                &app.writer_id,
                seq,
                part,
                &rows,
                app.wal().map(|_| db::WalMark {
                    wal_id: &app.writer_id,
                    group: wal_group,
                    lsn: part.wal_lsn,
                }),
                &elsewhere,
                || {},
            )
            .await
        };
        match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
            Ok(Ok(FlushOutcome::StaleRing { .. })) => return false,
            Ok(Ok(outcome)) => {
                match outcome {
                    FlushOutcome::Applied {
                        held, duplicates, ..
                    } => {
                        telemetry::quarantined(owner, held.deltas);
                        count_duplicates(owner, part, duplicates);
                    }
                    FlushOutcome::AlreadyApplied { duplicates } => {
                        count_duplicates(owner, part, duplicates);
                    }
                    FlushOutcome::StaleRing { .. } => {}
                }
                return true;
            }
            Ok(Err(e)) => {
                tracing::warn!(group = owner, seq, error = %e, "re-routed part not applied; will retry")
            }
            Err(_) => tracing::warn!(group = owner, seq, "re-routed part timed out; will retry"),
        }
        tokio::time::sleep(jittered(backoff, fastrand::f64())).await;
        backoff = next_backoff(backoff, app.config.buffer.retry_max);
    }
}

/// Entries above which cutting a batch (sorting its counters) and deriving
/// its rows run on a blocking thread: a few million entries take long
/// enough to stall the async workers that answer requests.
const OFF_RUNTIME_ENTRIES: usize = 20_000;

/// Runs `work` on a blocking thread when `large`, inline otherwise (a
/// thread hop costs more than a small batch). A panic in it is resumed
/// here, so the flusher's supervisor sees it like any other.
async fn off_runtime<T: Send + 'static>(
    large: bool,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    if !large {
        return work();
    }
    match tokio::task::spawn_blocking(work).await {
        Ok(out) => out,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// How long to wait, after a wake-up, before cutting a batch. A committed
/// waiter lingers briefly (`commit_linger`) to let concurrent writers join
/// the batch; a full buffer (`flush_rows` pending) or an explicit flush
/// request (`urgent`) goes at once, and so does a wake-up without waiters.
fn linger_after_wake(
    urgent: bool,
    pending: usize,
    committed_waiters: bool,
    cfg: &BufferConfig,
) -> Option<Duration> {
    (!urgent && pending < cfg.flush_rows && committed_waiters).then_some(cfg.commit_linger)
}

/// The pause before retrying after `backoff`: jittered over its upper half,
/// `[backoff / 2, backoff)` for `unit` in `[0, 1)` (a uniform draw). The
/// jitter keeps retries of many proxies from synchronising while still
/// backing off.
fn jittered(backoff: Duration, unit: f64) -> Duration {
    backoff.mul_f64(0.5 + unit * 0.5)
}

/// The backoff after another failure: doubled, capped at `max`.
fn next_backoff(backoff: Duration, max: Duration) -> Duration {
    (backoff * 2).min(max)
}

/// The server session of a failed attempt. When a connection dies
/// mid-transaction the server may not notice for a long time (a half-open
/// TCP connection waits for `wait_timeout`, 8 h by default), and its open
/// transaction keeps the lock on the batch's dedup row, so the retry would
/// block behind it. The retry therefore kills that session first: its
/// transaction then rolls back (or had already committed, which the dedup
/// row reveals).
#[derive(Debug, PartialEq, Eq)]
struct StaleSession {
    addr: String,
    id: u32,
}

/// The stale session a new attempt on connection `current` of server `addr`
/// kills first: only on the same server (ids are per server), and never the
/// attempt's own connection (the pool may hand the same one out again).
fn session_to_kill(stale: Option<StaleSession>, addr: &str, current: u32) -> Option<StaleSession> {
    stale.filter(|s| s.addr == addr && s.id != current)
}

async fn attempt_once(
    app: &App,
    buffer: &GroupBuffer,
    seq: u64,
    batch: &Batch,
    rows: &FlushRows,
    stale: &mut Option<StaleSession>,
) -> Result<FlushOutcome, FlushError> {
    let map = app.map.load();
    let Some(group) = map.group(buffer.name()) else {
        return Err(FlushError::NotApplied(db::DbError::Server {
            addr: String::new(),
            message: format!("group {} is no longer in the topology", buffer.name()),
        }));
    };
    let commit_sent = AtomicBool::new(false);
    // This attempt's server session, known before its transaction starts:
    // when the attempt times out, `work` is dropped mid-transaction, and a
    // session behind a dead network path lives on at the server holding
    // the lock on the batch's dedup row. The next attempt must end it.
    let mut session: Option<StaleSession> = None;
    let work = async {
        let elsewhere = moved_ids::counted_on_sources(app, &map, buffer.name(), &batch.ids).await?;
        let mut conn = group
            .master_conn(app.config.pool.connect_timeout)
            .await
            .map_err(FlushError::NotApplied)?;
        let addr = group.master.dsn.addr();
        // Only on the same server: ids are per server. An id reused after a
        // master restart may hit another writer's session, which then
        // retries its own batch exactly once like after any other failure.
        if let Some(old) = session_to_kill(stale.take(), &addr, conn.id())
            && let Err(e) = conn.query_drop(format!("KILL CONNECTION {}", old.id)).await
        {
            tracing::debug!(id = old.id, error = %e, "stale flush session already gone");
        }
        session = Some(StaleSession {
            addr,
            id: conn.id(),
        });
        db::flush(
            &mut conn,
            group.max_packet(),
            &app.writer_id,
            seq,
            batch,
            rows,
            app.wal().map(|_| db::WalMark {
                wal_id: &app.writer_id,
                group: buffer.name(),
                lsn: batch.wal_lsn,
            }),
            &elsewhere,
            || {
                commit_sent.store(true, Ordering::Relaxed);
                buffer.commit_started();
            },
        )
        .await
    };
    let result = match tokio::time::timeout(ATTEMPT_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(timed_out(commit_sent.load(Ordering::Relaxed))),
    };
    // A failed attempt that got a session leaves it to be killed; one that
    // failed before (no connection) keeps the older stale session.
    if result.is_err()
        && let Some(s) = session
    {
        *stale = Some(s);
    }
    result
}

/// An attempt that ran out of [`ATTEMPT_TIMEOUT`]: once COMMIT was sent the
/// batch may or may not be applied (the retry's dedup row decides);
/// before, the transaction is rolled back.
fn timed_out(commit_sent: bool) -> FlushError {
    let e = db::DbError::Timeout(ATTEMPT_TIMEOUT);
    if commit_sent {
        FlushError::Ambiguous(e)
    } else {
        FlushError::NotApplied(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn cfg() -> BufferConfig {
        BufferConfig {
            flush_interval: Duration::from_secs(1),
            flush_rows: 1000,
            transaction_rows: 0,
            max_pending_rows: 10_000,
            commit_linger: 2 * MS,
            commit_timeout: Duration::from_secs(5),
            admission_wait: Duration::from_secs(1),
            retry_min: 50 * MS,
            retry_max: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_batch_past_transaction_rows_splits_into_consecutive_parts() {
        let c = |k: &str, minutes: &[i64]| -> Counter {
            (
                k.as_bytes().into(),
                Minutes::from(minutes.iter().map(|m| (*m, 1)).collect::<Vec<_>>()),
            )
        };
        // Rows per counter: its minutes and its total (2, 3, 2, 4).
        let counters = vec![
            c("a", &[60]),
            c("b", &[60, 120]),
            c("c", &[60]),
            c("d", &[60, 120, 180]),
        ];
        assert_eq!(split(&counters, 0), None, "0: never");
        assert_eq!(split(&counters, 11), None, "fits in one");
        assert_eq!(split(&counters, 5), Some(vec![0..2, 2..3, 3..4]));
        // A counter with more rows than the limit is a part of its own.
        assert_eq!(split(&counters, 3), Some(vec![0..1, 1..2, 2..3, 3..4]));
        assert_eq!(split(&counters, 1), Some(vec![0..1, 1..2, 2..3, 3..4]));
    }

    #[test]
    fn only_a_committed_waiter_below_flush_rows_lingers_before_the_cut() {
        let cfg = cfg();
        // An ack=committed writer waits: give concurrent writers the
        // linger to join its batch.
        assert_eq!(linger_after_wake(false, 0, true, &cfg), Some(2 * MS));
        assert_eq!(linger_after_wake(false, 999, true, &cfg), Some(2 * MS));
        // The buffer reached flush_rows: cut at once.
        assert_eq!(linger_after_wake(false, 1000, true, &cfg), None);
        assert_eq!(linger_after_wake(false, 5000, false, &cfg), None);
        // POST /admin/v1/flush (urgent): cut at once, waiters or not.
        assert_eq!(linger_after_wake(true, 0, true, &cfg), None);
        assert_eq!(linger_after_wake(true, 10, false, &cfg), None);
        // A wake-up with no waiter below flush_rows (a notification left
        // from a batch already cut) has nobody to gather writers for.
        assert_eq!(linger_after_wake(false, 10, false, &cfg), None);
    }

    #[test]
    fn backoff_doubles_from_retry_min_up_to_retry_max() {
        let cfg = cfg();
        let mut backoff = cfg.retry_min;
        let mut seen = vec![backoff];
        for _ in 0..10 {
            backoff = next_backoff(backoff, cfg.retry_max);
            seen.push(backoff);
        }
        let ms: Vec<u128> = seen.iter().map(Duration::as_millis).collect();
        assert_eq!(
            ms,
            [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]
        );
        // A retry_max that is not a power-of-two multiple is reached, not
        // overshot; retry_min == retry_max stays put.
        assert_eq!(next_backoff(300 * MS, 500 * MS), 500 * MS);
        assert_eq!(next_backoff(500 * MS, 500 * MS), 500 * MS);
    }

    #[test]
    fn jitter_covers_the_upper_half_of_the_backoff() {
        let backoff = Duration::from_millis(800);
        // The ends of the uniform draw map to the ends of the half.
        assert_eq!(jittered(backoff, 0.0), 400 * MS);
        assert_eq!(jittered(backoff, 0.5), 600 * MS);
        assert!(jittered(backoff, 0.999_999) < backoff);
        assert!(jittered(backoff, 0.999_999) > 799 * MS);
        // Monotone in the draw: a higher draw never waits less.
        let draws = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999];
        let waits: Vec<Duration> = draws.iter().map(|u| jittered(backoff, *u)).collect();
        assert!(waits.windows(2).all(|w| w[0] < w[1]), "{waits:?}");
    }

    #[test]
    fn random_retry_delays_stay_in_bounds_and_spread_out() {
        // As `apply` draws them: every delay in [backoff / 2, backoff] and
        // both quarters of the half are hit, so proxies do not retry in
        // lockstep.
        let mut rng = fastrand::Rng::with_seed(17);
        for backoff in [50 * MS, 800 * MS, Duration::from_secs(5)] {
            let (mut low, mut high) = (0, 0);
            for _ in 0..2000 {
                let d = jittered(backoff, rng.f64());
                assert!(d >= backoff / 2 && d <= backoff, "{d:?} for {backoff:?}");
                if d < backoff.mul_f64(0.75) {
                    low += 1;
                } else {
                    high += 1;
                }
            }
            assert!(
                low > 800 && high > 800,
                "{low} low, {high} high for {backoff:?}"
            );
        }
    }

    #[test]
    fn a_retry_kills_only_the_failed_session_on_the_same_server() {
        let stale = |addr: &str, id| {
            Some(StaleSession {
                addr: addr.into(),
                id,
            })
        };
        assert_eq!(
            session_to_kill(stale("db1:3306", 41), "db1:3306", 42),
            stale("db1:3306", 41)
        );
        // Ids are per server: 41 on another server is someone else.
        assert_eq!(session_to_kill(stale("db1:3306", 41), "db2:3306", 42), None);
        // The pool handed out the same connection again: it is alive and
        // ours, so there is nothing stale to kill.
        assert_eq!(session_to_kill(stale("db1:3306", 41), "db1:3306", 41), None);
        assert_eq!(session_to_kill(None, "db1:3306", 41), None);
    }

    #[test]
    fn a_timeout_is_ambiguous_only_once_commit_was_sent() {
        // Exactly once hinges on this: an ambiguous batch is retried with
        // its dedup row deciding; one that never reached COMMIT was rolled
        // back.
        assert!(matches!(
            timed_out(true),
            FlushError::Ambiguous(db::DbError::Timeout(d)) if d == ATTEMPT_TIMEOUT
        ));
        assert!(matches!(
            timed_out(false),
            FlushError::NotApplied(db::DbError::Timeout(d)) if d == ATTEMPT_TIMEOUT
        ));
    }
}
