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

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::app::App;
use crate::storage::buffer::{Batch, GroupBuffer};
use crate::storage::db::{self, FlushError, FlushOutcome, FlushRows};
use crate::telemetry;

/// Upper bound on one flush attempt (connect + transaction). A master that
/// accepts the connection but never answers must not stall the group
/// forever; the attempt is then retried like any other failure.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts a flusher for every group of the current map that has none.
/// A flusher of a group that left the topology ends by itself once its
/// buffer is empty.
pub fn start_all(app: &Arc<App>) {
    let map = app.map.load();
    let mut flushers = app.flushers.lock();
    flushers.retain(|_, task| !task.is_finished());
    for g in &map.groups {
        flushers
            .entry(g.name.clone())
            .or_insert_with(|| tokio::spawn(run(app.clone(), g.buffer.clone(), app.stop_signal())));
    }
}

/// Stops every flusher after it flushed everything and waits for them.
pub async fn stop_all(app: &App) {
    let _ = app.stop.send(true);
    let tasks: Vec<JoinHandle<()>> = app.flushers.lock().drain().map(|(_, t)| t).collect();
    for t in tasks {
        if let Err(e) = t.await {
            tracing::error!(error = %e, "flusher task failed");
        }
    }
}

/// Runs until `stop` turns true and every pending entry is committed.
pub async fn run(app: Arc<App>, buffer: Arc<GroupBuffer>, mut stop: watch::Receiver<bool>) {
    let cfg = app.config.buffer.clone();
    let mut last_cut = Instant::now();
    loop {
        let stopping = *stop.borrow();
        if !stopping {
            tokio::select! {
                _ = tokio::time::sleep_until((last_cut + cfg.flush_interval).into()) => {}
                _ = buffer.wake.notified() => {
                    // A committed waiter lingers briefly to let concurrent
                    // writers join the batch; a full buffer or an explicit
                    // flush request goes at once.
                    if !buffer.take_urgent() && buffer.pending() < cfg.flush_rows && buffer.has_committed_waiters() {
                        tokio::time::sleep(cfg.commit_linger).await;
                    }
                }
                _ = stop.changed() => {}
            }
        }
        let batch = buffer.cut_with(app.wal());
        last_cut = Instant::now();
        if !batch.is_empty() {
            apply(&app, &buffer, &batch).await;
        } else {
            buffer.committed(&batch);
        }
        if let Some(wal) = app.wal() {
            wal.durable(buffer.name(), batch.wal_lsn);
        }
        telemetry::pending_rows(buffer.name(), buffer.pending());
        if buffer.pending() == 0 && app.map.load().group(buffer.name()).is_none() {
            tracing::info!(
                group = buffer.name(),
                "group left the topology; flusher stopped"
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

/// Applies one batch, retrying until it is in the database.
async fn apply(app: &App, buffer: &GroupBuffer, batch: &Batch) {
    let seq = app.next_seq();
    let rows = FlushRows::derive(batch);
    let cfg = &app.config.buffer;
    let mut backoff = cfg.retry_min;
    let mut attempt = 0u32;
    let mut stale = None;
    loop {
        attempt += 1;
        let started = Instant::now();
        let outcome = {
            let _gate = buffer.gate.lock().await;
            attempt_once(app, buffer, seq, &rows, batch.wal_lsn, &mut stale).await
        };
        match outcome {
            Ok(outcome) => {
                if outcome == FlushOutcome::AlreadyApplied {
                    telemetry::flush_duplicate(buffer.name());
                }
                buffer.committed(batch);
                telemetry::flush_committed(buffer.name(), rows.len(), started.elapsed());
                // One line per non-empty flush: operators read throughput,
                // batch size and retries from it.
                tracing::info!(
                    group = buffer.name(),
                    seq,
                    entries = batch.entries,
                    rows = rows.len(),
                    ?outcome,
                    attempt,
                    took_ms = started.elapsed().as_millis() as u64,
                    "flushed batch"
                );
                return;
            }
            Err(e) => {
                if matches!(e, FlushError::NotApplied(_)) {
                    buffer.commit_not_applied();
                }
                telemetry::flush_failed(buffer.name());
                buffer.flush_failed();
                tracing::warn!(group = buffer.name(), seq, attempt, error = %e, retry_in_ms = backoff.as_millis() as u64, "flush failed; will retry the same batch");
            }
        }
        // Full jitter over the upper half keeps retries of many proxies
        // from synchronising while still backing off.
        let jitter = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
        tokio::time::sleep(jitter).await;
        backoff = (backoff * 2).min(cfg.retry_max);
    }
}

/// The server session of a failed attempt. When a connection dies
/// mid-transaction the server may not notice for a long time (a half-open
/// TCP connection waits for `wait_timeout`, 8 h by default), and its open
/// transaction keeps the lock on the batch's dedup row, so the retry would
/// block behind it. The retry therefore kills that session first: its
/// transaction then rolls back (or had already committed, which the dedup
/// row reveals).
struct StaleSession {
    addr: String,
    id: u32,
}

async fn attempt_once(
    app: &App,
    buffer: &GroupBuffer,
    seq: u64,
    rows: &FlushRows,
    wal_lsn: u64,
    stale: &mut Option<StaleSession>,
) -> Result<FlushOutcome, FlushError> {
    let map = app.map.load();
    let Some(group) = map.group(buffer.name()) else {
        return Err(FlushError::NotApplied(db::DbError::Server {
            addr: String::new(),
            message: format!("group {} is no longer in the topology", buffer.name()),
        }));
    };
    let commit_sent = std::sync::atomic::AtomicBool::new(false);
    let work = async {
        group
            .ensure_schema(app.config.pool.connect_timeout)
            .await
            .map_err(FlushError::NotApplied)?;
        let mut conn = db::conn(&group.master.pool, app.config.pool.connect_timeout)
            .await
            .map_err(FlushError::NotApplied)?;
        let addr = group.master.dsn.addr();
        // Only on the same server: ids are per server. An id reused after a
        // master restart may hit another writer's session, which then
        // retries its own batch exactly once like after any other failure.
        if let Some(old) = stale.take().filter(|s| s.addr == addr && s.id != conn.id()) {
            use mysql_async::prelude::Queryable;
            if let Err(e) = conn.query_drop(format!("KILL CONNECTION {}", old.id)).await {
                tracing::debug!(id = old.id, error = %e, "stale flush session already gone");
            }
        }
        let session = StaleSession {
            addr,
            id: conn.id(),
        };
        let result = db::flush(
            &mut conn,
            group.max_packet(),
            &app.writer_id,
            seq,
            rows,
            app.wal().map(|_| db::WalMark {
                wal_id: &app.writer_id,
                group: buffer.name(),
                lsn: wal_lsn,
            }),
            || {
                commit_sent.store(true, Ordering::Relaxed);
                buffer.commit_started();
            },
        )
        .await;
        if result.is_err() {
            *stale = Some(session);
        }
        result
    };
    match tokio::time::timeout(ATTEMPT_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) if commit_sent.load(Ordering::Relaxed) => {
            Err(FlushError::Ambiguous(db::DbError::Timeout(ATTEMPT_TIMEOUT)))
        }
        Err(_) => Err(FlushError::NotApplied(db::DbError::Timeout(
            ATTEMPT_TIMEOUT,
        ))),
    }
}
