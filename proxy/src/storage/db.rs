//! MySQL access: pools, schema, and the transactions that apply batches
//! exactly once (flushes and write-ahead-log replay).
//!
//! Every value reaches SQL as a bound parameter; the only text spliced into
//! statements is table names from [`Tier`] and the database name, which the
//! DSN validator restricts to `[A-Za-z0-9_]`.

use std::collections::HashSet;
use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Conn, Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts, SslOpts, TxOpts};
use tally_admin::Dsn;
use tally_admin::dsn::SslMode;

use crate::config::PoolConfig;
use crate::storage::buffer::{Batch, NOT_ROUTED};
use crate::storage::ids;
use crate::storage::quarantine::{Held, upsert_or_hold};
use crate::storage::rows::FlushRows;

/// The server's `max_allowed_packet`, read once per group with the schema.
pub async fn max_allowed_packet(conn: &mut Conn) -> Result<usize, DbError> {
    let v: Option<u64> = conn.query_first("SELECT @@max_allowed_packet").await?;
    Ok(v.unwrap_or(1 << 20) as usize)
}

/// MySQL error numbers we act on.
pub const ER_DUP_ENTRY: u16 = 1062;

/// A failure talking to MySQL, classified by what the caller may assume.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: mysql_async::Error,
    },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Mysql(#[from] mysql_async::Error),
    #[error("server {addr}: {message}")]
    Server { addr: String, message: String },
}

/// Builds a pool for one server. Pools connect lazily; [`ping`] proves one.
pub fn pool(dsn: &Dsn, cfg: &PoolConfig) -> Pool {
    let constraints = PoolConstraints::new(cfg.min, cfg.max.max(cfg.min).max(1))
        .unwrap_or_else(|| PoolConstraints::new(1, 16).unwrap_or_default());
    let opts = OptsBuilder::default()
        .ip_or_hostname(dsn.host.clone())
        .tcp_port(dsn.port)
        .user(Some(dsn.user.clone()))
        .pass(dsn.password.clone())
        .db_name(Some(dsn.database.clone()))
        .prefer_socket(false)
        .ssl_opts(ssl_opts(dsn))
        .stmt_cache_size(64)
        // A connection behind a dead network path is noticed by the kernel
        // (probes after 30 s idle) instead of waiting forever on a read.
        .tcp_keepalive(Some(Duration::from_secs(30)))
        // mysql_async's defaults keep at most `min` idle connections (any
        // other returned connection is closed, so concurrent requests keep
        // opening new ones) and reset every returned connection (which
        // also drops its prepared statements, so every statement is
        // prepared again). Keep up to `max` idle for a minute, and keep
        // their sessions: nothing here changes session state (an open
        // transaction is still rolled back when a connection is returned).
        .pool_opts(
            PoolOpts::default()
                .with_constraints(constraints)
                .with_inactive_connection_ttl(Duration::from_secs(60))
                .with_reset_connection(false),
        );
    Pool::new(Opts::from(opts))
}

/// The DSN's `ssl_mode` as mysql_async TLS options (rustls): none when
/// disabled; `required` encrypts without checking the certificate;
/// `verify_ca` checks it against `ssl_ca` only (no built-in roots), and
/// `verify_identity` also checks that it names the DSN's host. The CA file
/// is read at each new connection. A server without TLS fails the connect
/// ("Client requires secure connection but server does not have this
/// capability") in every mode but `disabled`.
///
/// mysql_async 0.37.1 skips the host check of `verify_ca` by matching
/// rustls' error text `NotValidForName`, which rustls 0.23.46 no longer
/// prints: until that is fixed upstream, `verify_ca` also refuses a
/// certificate that does not name the host (stricter, never weaker).
fn ssl_opts(dsn: &Dsn) -> Option<SslOpts> {
    let tls = &dsn.tls;
    let ca = || {
        tls.ca
            .iter()
            .map(|p| std::path::PathBuf::from(p).into())
            .collect()
    };
    match tls.mode {
        SslMode::Disabled => None,
        SslMode::Required => Some(SslOpts::default().with_danger_accept_invalid_certs(true)),
        SslMode::VerifyCa => Some(
            SslOpts::default()
                .with_root_certs(ca())
                .with_disable_built_in_roots(true)
                .with_danger_skip_domain_validation(true),
        ),
        SslMode::VerifyIdentity => Some(
            SslOpts::default()
                .with_root_certs(ca())
                .with_disable_built_in_roots(true),
        ),
    }
}

/// Gets a connection within `timeout`.
pub async fn conn(pool: &Pool, timeout: Duration) -> Result<Conn, DbError> {
    match tokio::time::timeout(timeout, pool.get_conn()).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(DbError::Timeout(timeout)),
    }
}

/// A fresh connection outside any pool (a pooled one may be stale behind a
/// dead path), on `database` if given.
pub async fn connect(dsn: &Dsn, database: Option<&str>) -> Result<Conn, DbError> {
    let opts = OptsBuilder::default()
        .ip_or_hostname(dsn.host.clone())
        .tcp_port(dsn.port)
        .user(Some(dsn.user.clone()))
        .pass(dsn.password.clone())
        .db_name(database)
        .prefer_socket(false)
        .ssl_opts(ssl_opts(dsn));
    Conn::new(opts).await.map_err(|source| DbError::Connect {
        addr: dsn.addr(),
        source,
    })
}

/// Creates the database if needed (connecting without a default database,
/// since it may not exist yet), applies every schema statement and returns
/// the server's `max_allowed_packet`.
pub async fn apply_schema(dsn: &Dsn, timeout: Duration) -> Result<usize, DbError> {
    let work = async {
        let mut c = prepare_database(dsn, &tally_schema::statements()).await?;
        let packet = max_allowed_packet(&mut c).await?;
        c.disconnect().await?;
        Ok(packet)
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(DbError::Timeout(timeout)))
}

/// Connects without a default database (it may not exist yet), creates
/// the DSN's database, switches to it and runs `statements` (idempotent DDL).
/// Shared by the shard schema and the topology store's schema.
pub async fn prepare_database(dsn: &Dsn, statements: &[String]) -> Result<Conn, DbError> {
    let mut c = connect(dsn, None).await?;
    c.query_drop(tally_schema::create_database(&dsn.database))
        .await?;
    c.query_drop(format!("USE `{}`", dsn.database)).await?;
    for stmt in statements {
        c.query_drop(stmt).await?;
    }
    Ok(c)
}

/// How a flush attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub enum FlushOutcome {
    /// The batch was applied by this attempt; `rows` rows were upserted and
    /// the deltas of `held.counters` counters went to the quarantine table;
    /// `duplicates` events with an id were already counted (left out).
    Applied {
        rows: usize,
        held: Held,
        duplicates: usize,
    },
    /// The dedup row already existed: an earlier, ambiguous attempt applied
    /// it (and `duplicates` of its id'd events were left out then).
    AlreadyApplied { duplicates: usize },
    /// Not applied: the master is the source of a reshard whose fence
    /// (`ring_fence`, the first version of the new ring) is newer than
    /// the ring that routed some of the batch's deltas. Its moved keys
    /// belong to another group now; the caller routes again by a map at
    /// least as new as `fence`.
    StaleRing { fence: u64 },
}

/// Where a flush attempt failed; decides whether the outcome is known.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// Failed before COMMIT was sent: the transaction is rolled back.
    #[error("before commit: {0}")]
    NotApplied(DbError),
    /// COMMIT was sent but its answer did not arrive: applied or not.
    #[error("commit outcome unknown: {0}")]
    Ambiguous(DbError),
}

impl FlushError {
    /// A failure before COMMIT was sent.
    pub fn not_applied(e: mysql_async::Error) -> FlushError {
        FlushError::NotApplied(DbError::Mysql(e))
    }
}

/// Starts an exactly-once transaction (flush, replay, quarantine re-apply).
pub async fn begin(conn: &mut Conn) -> Result<mysql_async::Transaction<'_>, FlushError> {
    conn.start_transaction(TxOpts::default())
        .await
        .map_err(FlushError::not_applied)
}

/// Commits one: a lost answer leaves the outcome unknown (the caller's
/// dedup row or mark decides on the retry).
pub async fn commit(tx: mysql_async::Transaction<'_>) -> Result<(), FlushError> {
    tx.commit()
        .await
        .map_err(|e| FlushError::Ambiguous(DbError::Mysql(e)))
}

/// The dedup row of a flush, with a short lock wait for this statement
/// only. The only transaction that can hold the row is an earlier attempt
/// of the same batch whose connection died (a black-holed path leaves its
/// session open at the server); waiting the server default of 50 s would
/// only delay the retry that kills that session (`engine::flusher`), so
/// the attempt gives up after 5 s instead. Not set for the session: the
/// pool's connections also serve the WAL replay, whose locking read must
/// wait for a dead process's commit.
const DEDUP_INSERT: &str = "SET STATEMENT innodb_lock_wait_timeout = 5 FOR \
     INSERT INTO applied_batches (writer_id, seq, row_count) VALUES (?, ?, ?)";

/// Applies one batch exactly once: the `(writer_id, seq)` dedup row is
/// inserted first in the same transaction as the upserts; if it already
/// exists, an earlier attempt committed the batch and nothing is applied.
/// Counters the database refuses deterministically are quarantined in the
/// same transaction ([`upsert_or_hold`]), so a batch never fails forever.
#[allow(clippy::too_many_arguments)]
pub async fn flush(
    conn: &mut Conn,
    max_packet: usize,
    writer_id: &str,
    seq: u64,
    batch: &Batch,
    rows: &FlushRows,
    wal: Option<WalMark<'_>>,
    counted_elsewhere: &HashSet<Vec<u8>>,
    before_commit: impl FnOnce(),
) -> Result<FlushOutcome, FlushError> {
    let not_applied = FlushError::not_applied;
    let source = format!("batch {writer_id}/{seq}");
    let mut tx = begin(conn).await?;
    let dedup = tx
        .exec_drop(DEDUP_INSERT, (writer_id, seq, rows.len() as u64))
        .await;
    match dedup {
        Ok(()) => {}
        Err(mysql_async::Error::Server(e)) if e.code == ER_DUP_ENTRY => {
            tx.rollback().await.map_err(not_applied)?;
            // Which of its id'd events counted: the rows it inserted.
            let mut duplicates = 0;
            if !batch.ids.is_empty() {
                let all: Vec<_> = batch.ids.iter().collect();
                let counted = ids::counted_by(conn, &source, &all, ids::MAX_SET_ENTRIES)
                    .await
                    .map_err(not_applied)?;
                let repeats = &batch.id_plan().repeats;
                duplicates = ids::report(
                    &batch.ids,
                    &ids::duplicates_of(&batch.ids, &counted, repeats),
                );
            }
            return Ok(FlushOutcome::AlreadyApplied { duplicates });
        }
        Err(e) => return Err(not_applied(e)),
    }
    if let Some(fence) = refused_by_fence(&mut tx, batch.routed_by)
        .await
        .map_err(not_applied)?
    {
        tx.rollback().await.map_err(not_applied)?;
        return Ok(FlushOutcome::StaleRing { fence });
    }
    let decided = decide_ids(&mut tx, max_packet, batch, &source, counted_elsewhere).await?;
    let adjusted = adjusted(batch, decided.as_deref());
    let (counters, rows) = match &adjusted {
        Some((c, r)) => (c.as_slice(), r),
        None => (batch.counters.as_slice(), rows),
    };
    let held = upsert_or_hold(&mut tx, max_packet, counters, rows, &source)
        .await
        .map_err(not_applied)?;
    if let Some(mark) = wal {
        mark_wal(&mut tx, mark).await.map_err(not_applied)?;
    }
    before_commit();
    commit(tx).await?;
    let duplicates = decided.map_or(0, |d| ids::report(&batch.ids, &d));
    Ok(FlushOutcome::Applied {
        rows: rows.len(),
        held,
        duplicates,
    })
}

/// The id decision of a batch with ids ([`ids::decide`]); `None` without.
async fn decide_ids(
    tx: &mut mysql_async::Transaction<'_>,
    max_packet: usize,
    batch: &Batch,
    source: &str,
    elsewhere: &HashSet<Vec<u8>>,
) -> Result<Option<Vec<bool>>, FlushError> {
    if batch.ids.is_empty() {
        return Ok(None);
    }
    ids::decide(
        tx,
        &batch.ids,
        batch.id_plan(),
        source,
        elsewhere,
        ids::MAX_SET_ENTRIES,
        max_packet,
    )
    .await
    .map(Some)
    .map_err(FlushError::not_applied)
}

/// The batch's counters and rows without its duplicates, when it has any
/// (`None`: apply them as they are).
fn adjusted(
    batch: &Batch,
    decided: Option<&[bool]>,
) -> Option<(Vec<crate::storage::rows::Counter>, FlushRows)> {
    let dup = decided.filter(|d| d.iter().any(|x| *x))?;
    let counters = ids::without(&batch.counters, &batch.ids, dup);
    let rows = FlushRows::derive_fresh(&counters);
    Some((counters, rows))
}

/// The master's reshard fence when it is newer than `routed_by` (the
/// oldest ring version behind a batch), read with a shared lock: a fence
/// raised after this read waits for this transaction, so a batch either
/// commits before the fence (and so before the copy it guards) or sees it.
async fn refused_by_fence(
    tx: &mut mysql_async::Transaction<'_>,
    routed_by: u64,
) -> Result<Option<u64>, mysql_async::Error> {
    if routed_by == NOT_ROUTED {
        return Ok(None);
    }
    let fence: Option<u64> = tx
        .query_first("SELECT version FROM ring_fence WHERE id = 1 LOCK IN SHARE MODE")
        .await?;
    Ok(fence.filter(|f| *f > routed_by))
}

/// Raises this master's reshard fence to `version` (never lowers it):
/// from its commit on, no batch routed by an older ring commits here.
/// Waits for flushes that already read the fence.
pub async fn raise_ring_fence(conn: &mut Conn, version: u64) -> Result<(), mysql_async::Error> {
    conn.exec_drop(
        "INSERT INTO ring_fence (id, version) VALUES (1, ?) \
         ON DUPLICATE KEY UPDATE version = GREATEST(version, VALUES(version))",
        (version,),
    )
    .await
}

/// "Every write-ahead-log record of life `wal_id` for group `group` up to
/// `lsn` is in this database", written in the transaction that makes it
/// true (`schema/004_wal.sql`).
#[derive(Debug, Clone, Copy)]
pub struct WalMark<'a> {
    pub wal_id: &'a str,
    pub group: &'a str,
    pub lsn: u64,
}

async fn mark_wal(
    tx: &mut mysql_async::Transaction<'_>,
    mark: WalMark<'_>,
) -> Result<(), mysql_async::Error> {
    tx.exec_drop(
        "INSERT INTO wal_applied (wal_id, grp, lsn) VALUES (?, ?, ?) \
         ON DUPLICATE KEY UPDATE lsn = GREATEST(lsn, VALUES(lsn))",
        (mark.wal_id, mark.group, mark.lsn),
    )
    .await
}

/// How far the batches of life `wal_id` got in `group` (0: none). A
/// locking read in its own transaction: it waits out a COMMIT the dead
/// process may still have in flight.
pub async fn applied_lsn(conn: &mut Conn, wal_id: &str, group: &str) -> Result<u64, DbError> {
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    let applied: Option<u64> = tx
        .exec_first(
            "SELECT lsn FROM wal_applied WHERE wal_id = ? AND grp = ? FOR UPDATE",
            (wal_id, group),
        )
        .await?;
    tx.commit().await?;
    Ok(applied.unwrap_or(0))
}

/// What a replay transaction applies, decided once the applied LSN is
/// known (see [`replay`]).
pub struct ReplayPlan {
    /// The records to apply, merged per counter and minute.
    pub batch: Batch,
    /// Deltas not applied here (their keys moved to another group).
    pub orphans: usize,
    /// The highest LSN the plan covers.
    pub last_lsn: u64,
}

/// The outcome of a replay transaction.
#[derive(Debug, Clone, Copy)]
pub struct Replayed {
    pub entries: usize,
    pub rows: usize,
    /// Counters quarantined instead of applied.
    pub held: Held,
    pub orphans: usize,
    /// The group's LSN for that life before this replay.
    pub applied_before: u64,
    /// Replayed events whose id was already counted (left out).
    pub duplicates: usize,
}

/// Replays one earlier life's records of one group exactly once. The
/// applied LSN is read with a *locking* read: it waits for any transaction
/// of the dead process still committing on the server and sees the newest
/// committed value, so `plan(applied)` gets exactly the records not yet
/// applied. Their rows and the raised LSN commit together; a repeated
/// replay finds the raised LSN and applies nothing.
pub async fn replay(
    conn: &mut Conn,
    max_packet: usize,
    wal_id: &str,
    group: &str,
    plan: impl FnOnce(u64) -> Result<ReplayPlan, String>,
) -> Result<Replayed, FlushError> {
    let not_applied = FlushError::not_applied;
    let mut tx = begin(conn).await?;
    let applied: Option<u64> = tx
        .exec_first(
            "SELECT lsn FROM wal_applied WHERE wal_id = ? AND grp = ? FOR UPDATE",
            (wal_id, group),
        )
        .await
        .map_err(not_applied)?;
    let applied = applied.unwrap_or(0);
    let plan = plan(applied).map_err(|message| {
        FlushError::NotApplied(DbError::Server {
            addr: String::new(),
            message,
        })
    })?;
    let rows = FlushRows::derive_fresh(&plan.batch.counters);
    let mut done = Replayed {
        entries: plan.batch.entries,
        rows: rows.len(),
        held: Held::default(),
        orphans: plan.orphans,
        applied_before: applied,
        duplicates: 0,
    };
    if plan.last_lsn <= applied {
        tx.rollback().await.map_err(not_applied)?;
        return Ok(done);
    }
    if let Some(fence) = refused_by_fence(&mut tx, plan.batch.routed_by)
        .await
        .map_err(not_applied)?
    {
        tx.rollback().await.map_err(not_applied)?;
        return Err(FlushError::NotApplied(DbError::Server {
            addr: String::new(),
            message: format!(
                "routed by topology version {}, older than this master's reshard fence {fence}; replayed again once the topology is current",
                plan.batch.routed_by
            ),
        }));
    }
    let source = format!("wal {wal_id}/{group}/{}", plan.last_lsn);
    let decided = decide_ids(&mut tx, max_packet, &plan.batch, &source, &HashSet::new()).await?;
    let adjusted = adjusted(&plan.batch, decided.as_deref());
    let (counters, rows) = match &adjusted {
        Some((c, r)) => (c.as_slice(), r),
        None => (plan.batch.counters.as_slice(), &rows),
    };
    done.rows = rows.len();
    done.held = upsert_or_hold(&mut tx, max_packet, counters, rows, &source)
        .await
        .map_err(not_applied)?;
    mark_wal(
        &mut tx,
        WalMark {
            wal_id,
            group,
            lsn: plan.last_lsn,
        },
    )
    .await
    .map_err(not_applied)?;
    commit(tx).await?;
    done.duplicates = decided.map_or(0, |d| ids::report(&plan.batch.ids, &d));
    Ok(done)
}
