//! Replica promotion: planned switchover and emergency failover.
//!
//! A promotion holds the topology lock (no other change interleaves) and
//! the group's flush gate (no batch is written while masters change; writers
//! keep buffering, `ack=committed` writers wait — that is the write pause).
//!
//! - **Planned** (the master answers): old master `read_only` and the data
//!   user's sessions on it ended (the fence) → wait until
//!   the candidate applied the master's `gtid_binlog_pos` → stop and reset
//!   replication on the candidate, make it writable (semi-sync master) →
//!   repoint the other replicas and the old master (`current_pos`) to it.
//! - **Emergency** (the master is gone): every reachable replica reports
//!   what it received; a candidate behind another is refused unless
//!   `force`. The candidate applies its relay log, is reset and made
//!   writable, the others are repointed; the dead master leaves the group.
//!
//! Then the new topology goes through the ordinary change path (validated,
//! persisted, version bumped, swapped), and the gate opens: a batch that was
//! in flight is retried on the new master with the same `(writer_id, seq)`,
//! and the dedup row that replicated from the old master (semi-sync: every
//! acknowledged commit reached a replica) keeps it from applying twice.
//!
//! All of it runs as the topology's **admin user** (`admin:`), which is also
//! the replication account; the data user (the DSNs' own) has no global
//! privilege, so `read_only` stops it. The mode is chosen by an explicit
//! probe of `failover.unreachable_after`: a master that answers at all,
//! however slowly, is fenced and switched over as planned; only one that
//! never answers is left out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use mysql_async::{Conn, Row};
use tally_admin::Dsn;

use crate::app::App;
use crate::control::topology::{self, ChangeError, Source};
use crate::error::ApiError;
use crate::storage::db;
use crate::storage::shard_map::{GroupHandle, Node};
use crate::telemetry;

/// How long an automatic-failover lease lasts: longer than a promotion, so
/// a second proxy cannot start one meanwhile.
const LEASE_TTL: Duration = Duration::from_secs(60);

/// How long a planned switchover waits for the candidate to catch up.
const CATCH_UP: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Planned,
    Emergency,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Planned => "planned",
            Mode::Emergency => "emergency",
        }
    }
}

/// A completed promotion.
#[derive(Debug, Clone)]
pub struct Promoted {
    pub version: u64,
    pub master: String,
    pub mode: Mode,
    pub took: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    #[error("no group {0:?} in the topology")]
    NoGroup(String),
    #[error("{0}")]
    NotAReplica(String),
    #[error("{0}")]
    Behind(String),
    #[error("promotion failed: {0}")]
    Failed(String),
    #[error(transparent)]
    Change(#[from] ChangeError),
}

fn failed(step: &str, e: impl std::fmt::Display) -> PromoteError {
    PromoteError::Failed(format!("{step}: {e}"))
}

/// Promotes `replica_addr` (`host:port`) to master of `group_name`.
pub async fn promote(
    app: &Arc<App>,
    group_name: &str,
    replica_addr: &str,
    force: bool,
) -> Result<Promoted, PromoteError> {
    let started = Instant::now();
    let _serial = app.topology_lock.lock().await;
    let map = app.map.load_full();
    let group = map
        .group(group_name)
        .cloned()
        .ok_or_else(|| PromoteError::NoGroup(group_name.to_owned()))?;
    let Some(candidate) = group.replicas.iter().find(|r| r.dsn.addr() == replica_addr) else {
        let known: Vec<String> = group.replicas.iter().map(|r| r.dsn.addr()).collect();
        return Err(PromoteError::NotAReplica(format!(
            "{replica_addr} is not a replica of {group_name}; its replicas are: {}",
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        )));
    };
    let paused = Instant::now();
    let _gate = group.buffer.gate.lock().await;
    let timeout = app.config.pool.connect_timeout;
    let mode = match reach(&group.master, app.config.failover.unreachable_after).await {
        Some(conn) => {
            planned(&group, candidate, conn, timeout).await?;
            Mode::Planned
        }
        None => {
            emergency(&group, candidate, force, timeout).await?;
            Mode::Emergency
        }
    };
    // The new topology: the candidate leads; the old master follows it
    // after a planned switchover and leaves the group after a crash.
    let mut doc = map.topology.to_doc(false);
    let spec = doc
        .groups
        .iter_mut()
        .find(|g| g.name == group_name)
        .ok_or_else(|| PromoteError::NoGroup(group_name.to_owned()))?;
    let old_master = std::mem::replace(&mut spec.master, candidate.dsn.expose());
    spec.replicas
        .retain(|r| Dsn::parse(r).map(|d| d.addr()).ok().as_deref() != Some(replica_addr));
    if mode == Mode::Planned {
        spec.replicas.push(old_master);
    }
    let applied = topology::apply_locked(app, doc, Source::Promotion, None).await?;
    let took = started.elapsed();
    telemetry::promotion(group_name, mode.as_str(), took, paused.elapsed());
    tracing::info!(
        group = group_name,
        master = replica_addr,
        mode = mode.as_str(),
        version = applied.version,
        took_ms = took.as_millis() as u64,
        "promoted"
    );
    Ok(Promoted {
        version: applied.version,
        master: replica_addr.to_owned(),
        mode,
        took,
    })
}

/// The explicit probe that decides the mode: fresh admin connections and
/// `SELECT 1`, retried until `within` has passed. `Some` as soon as the
/// master answers, however slowly (it is then fenced before anything
/// else); `None` only when it never did.
async fn reach(node: &Node, within: Duration) -> Option<Conn> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = async {
            let mut c = db::connect(&node.admin_dsn, Some(&node.admin_dsn.database)).await?;
            c.query_drop("SELECT 1").await?;
            Ok::<_, db::DbError>(c)
        };
        match tokio::time::timeout(left, attempt).await {
            Ok(Ok(c)) => return Some(c),
            Ok(Err(e)) => {
                tracing::warn!(master = %node.dsn.addr(), error = %e, "master does not answer the promotion's probe")
            }
            Err(_) => {}
        }
        if Instant::now() + PROBE_PAUSE >= deadline {
            tracing::warn!(master = %node.dsn.addr(), within = ?within, "master unreachable: emergency promotion");
            return None;
        }
        tokio::time::sleep(PROBE_PAUSE).await;
    }
}

const PROBE_PAUSE: Duration = Duration::from_millis(250);

/// An admin-user connection to `node`: promotion and fencing are admin work.
async fn conn(node: &Node, timeout: Duration) -> Result<Conn, PromoteError> {
    db::conn(&node.admin_pool, timeout)
        .await
        .map_err(|e| failed(&format!("connecting to {}", node.dsn.addr()), e))
}

/// Ends every session of the data user on a server just made `read_only`
/// (the fence): a transaction it opened before is rolled back, so no batch
/// commits there after the GTID position is read. The batch is retried,
/// refused by `read_only`, and applied on the new master with its
/// `(writer_id, seq)`. Nothing to end when the data user is the admin user
/// (a topology without `admin`): then `read_only` does not stop it either.
async fn end_data_sessions(c: &mut Conn, node: &Node) -> Result<usize, PromoteError> {
    if node.admin_dsn.user == node.dsn.user {
        return Ok(0);
    }
    let ids: Vec<u64> = c
        .exec(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ? AND ID <> CONNECTION_ID()",
            (&node.dsn.user,),
        )
        .await
        .map_err(|e| failed("listing the data user's sessions", e))?;
    let mut ended = 0;
    for id in ids {
        match c.query_drop(format!("KILL CONNECTION {id}")).await {
            Ok(()) => ended += 1,
            // It ended by itself meanwhile.
            Err(mysql_async::Error::Server(e)) if e.code == ER_NO_SUCH_THREAD => {}
            Err(e) => return Err(failed("ending the data user's sessions", e)),
        }
    }
    Ok(ended)
}

const ER_NO_SUCH_THREAD: u16 = 1094;

async fn planned(
    group: &GroupHandle,
    candidate: &Node,
    mut old: Conn,
    timeout: Duration,
) -> Result<(), PromoteError> {
    // Waits for transactions in progress; bounded, so a session stuck on
    // a dead client path cannot hold the switchover forever.
    match tokio::time::timeout(CATCH_UP, old.query_drop("SET GLOBAL read_only = ON")).await {
        Ok(r) => r.map_err(|e| failed("setting the old master read-only", e))?,
        Err(_) => {
            return Err(failed(
                "setting the old master read-only",
                format!("no answer within {CATCH_UP:?}"),
            ));
        }
    }
    let result = async {
        let ended = end_data_sessions(&mut old, &group.master).await?;
        tracing::info!(group = %group.name, master = %group.master.dsn.addr(), sessions_ended = ended, "old master fenced");
        let pos: Option<String> = old
            .query_first("SELECT @@GLOBAL.gtid_binlog_pos")
            .await
            .map_err(|e| failed("reading the master's GTID position", e))?;
        let pos = pos.unwrap_or_default();
        let mut c = conn(candidate, timeout).await?;
        wait_for_gtid(&mut c, &pos).await?;
        // The old master follows the new one, so semi-sync has an acker.
        make_master(&mut c, true).await?;
        for r in group.replicas.iter().filter(|r| r.dsn.addr() != candidate.dsn.addr()) {
            let mut rc = conn(r, timeout).await?;
            follow(&mut rc, &candidate.admin_dsn, "slave_pos").await?;
        }
        // The old master joins as a replica from where its binlog ends.
        follow(&mut old, &candidate.admin_dsn, "current_pos").await?;
        old.query_drop("SET GLOBAL rpl_semi_sync_master_enabled = OFF; SET GLOBAL rpl_semi_sync_slave_enabled = ON")
            .await
            .map_err(|e| failed("switching the old master's semi-sync role", e))?;
        Ok(())
    }
    .await;
    if result.is_err() {
        // Nothing was repointed yet when most steps fail; let the old master
        // take writes again rather than leave the group read-only.
        let _ = old.query_drop("SET GLOBAL read_only = OFF").await;
    }
    result
}

async fn emergency(
    group: &GroupHandle,
    candidate: &Node,
    force: bool,
    timeout: Duration,
) -> Result<(), PromoteError> {
    // What every reachable replica has received.
    let mut received: Vec<(&Node, String)> = Vec::new();
    for r in &group.replicas {
        match received_by(r, timeout).await {
            Some(pos) => received.push((r, pos)),
            _ if r.dsn.addr() == candidate.dsn.addr() => {
                return Err(failed(
                    "reaching the candidate",
                    format!("{} does not answer", r.dsn.addr()),
                ));
            }
            _ => {
                tracing::warn!(replica = %r.dsn.addr(), "unreachable during failover; it will not be repointed")
            }
        }
    }
    let mine = received
        .iter()
        .find(|(r, _)| r.dsn.addr() == candidate.dsn.addr())
        .map(|(_, p)| p.clone())
        .unwrap_or_default();
    if !force
        && let Some((ahead, pos)) = received
            .iter()
            .find(|(r, p)| r.dsn.addr() != candidate.dsn.addr() && is_behind(&mine, p))
    {
        return Err(PromoteError::Behind(format!(
            "{} has received up to {mine:?}, but {} has {pos:?}: promoting it would lose transactions; promote {} instead, or pass force",
            candidate.dsn.addr(),
            ahead.dsn.addr(),
            ahead.dsn.addr()
        )));
    }
    let mut c = conn(candidate, timeout).await?;
    // Apply everything already received before taking writes.
    c.query_drop("START SLAVE SQL_THREAD")
        .await
        .map_err(|e| failed("starting the candidate's SQL thread", e))?;
    wait_for_gtid(&mut c, &mine).await?;
    let followers = received
        .iter()
        .any(|(r, _)| r.dsn.addr() != candidate.dsn.addr());
    make_master(&mut c, followers).await?;
    for (r, _) in received
        .iter()
        .filter(|(r, _)| r.dsn.addr() != candidate.dsn.addr())
    {
        let mut rc = conn(r, timeout).await?;
        follow(&mut rc, &candidate.admin_dsn, "slave_pos").await?;
    }
    Ok(())
}

/// What `node` has received, or `None` when it does not answer in time.
async fn received_by(node: &Node, timeout: Duration) -> Option<String> {
    let probe = async {
        let mut c = db::conn(&node.admin_pool, timeout).await?;
        Ok::<_, db::DbError>(received_pos(&mut c).await?)
    };
    tokio::time::timeout(timeout, probe).await.ok()?.ok()
}

/// The GTID position a replica received (IO thread), or applied when it has
/// no relay position.
async fn received_pos(c: &mut Conn) -> Result<String, mysql_async::Error> {
    let status: Option<Row> = c.query_first("SHOW SLAVE STATUS").await?;
    let io = status
        .and_then(|row| row.get_opt::<String, _>("Gtid_IO_Pos").and_then(Result::ok))
        .unwrap_or_default();
    if !io.is_empty() {
        return Ok(io);
    }
    let applied: Option<String> = c.query_first("SELECT @@GLOBAL.gtid_slave_pos").await?;
    Ok(applied.unwrap_or_default())
}

async fn wait_for_gtid(c: &mut Conn, pos: &str) -> Result<(), PromoteError> {
    if pos.is_empty() {
        return Ok(());
    }
    let r: Option<i64> = c
        .exec_first("SELECT MASTER_GTID_WAIT(?, ?)", (pos, CATCH_UP.as_secs()))
        .await
        .map_err(|e| failed("waiting for the candidate to catch up", e))?;
    match r {
        Some(0) => Ok(()),
        _ => Err(failed(
            "waiting for the candidate to catch up",
            format!("it did not reach {pos} within {CATCH_UP:?}"),
        )),
    }
}

/// Resets replication on the candidate and makes it writable. Semi-sync is
/// enabled only when some server will follow it: a semi-sync master without
/// replicas stalls every commit for `rpl_semi_sync_master_timeout`.
async fn make_master(c: &mut Conn, followers: bool) -> Result<(), PromoteError> {
    let semi_sync = if followers { "ON" } else { "OFF" };
    c.query_drop(format!(
        "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = OFF; \
         SET GLOBAL rpl_semi_sync_slave_enabled = OFF; SET GLOBAL rpl_semi_sync_master_enabled = {semi_sync}"
    ))
    .await
    .map_err(|e| failed("making the candidate writable", e))
}

/// Points a server at `master` by GTID. `CHANGE MASTER` takes no bound
/// parameters, so the values (from a validated DSN) are quoted here.
async fn follow(c: &mut Conn, master: &Dsn, gtid_mode: &str) -> Result<(), PromoteError> {
    let sql = format!(
        "STOP SLAVE; CHANGE MASTER TO MASTER_HOST={}, MASTER_PORT={}, MASTER_USER={}, MASTER_PASSWORD={}, \
         MASTER_USE_GTID={gtid_mode}, MASTER_CONNECT_RETRY=1; START SLAVE",
        quote(&master.host),
        master.port,
        quote(&master.user),
        quote(master.password.as_deref().unwrap_or("")),
    );
    c.query_drop(sql)
        .await
        .map_err(|e| failed("repointing a replica", e))
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for ch in s.chars() {
        match ch {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// `domain → sequence` of a GTID position such as `0-1-42,1-2-7`.
fn parse_gtid(pos: &str) -> BTreeMap<u32, u64> {
    pos.split(',')
        .filter_map(|g| {
            let mut parts = g.trim().split('-');
            let domain = parts.next()?.parse().ok()?;
            let _server = parts.next()?;
            let seq = parts.next()?.parse().ok()?;
            Some((domain, seq))
        })
        .collect()
}

/// Whether `a` lacks something `b` has (in any replication domain).
pub fn is_behind(a: &str, b: &str) -> bool {
    let (a, b) = (parse_gtid(a), parse_gtid(b));
    b.iter()
        .any(|(d, seq)| a.get(d).is_none_or(|mine| mine < seq))
}

/// Automatic failover (`failover.mode: auto`): a master that failed
/// `failover.after` probes in a row while a replica answers is replaced by
/// the most advanced replica. With a shared store only the holder of the
/// group's failover lease acts.
pub async fn auto(app: Arc<App>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let cfg = app.config.failover.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(app.config.health.interval) => {}
            _ = stop.changed() => return,
        }
        for group in app.groups() {
            let h = group.master.health.get();
            if h.up != Some(false) || h.consecutive_failures < cfg.after {
                continue;
            }
            // With a shared store, exactly one proxy may act: the holder of
            // the group's failover lease. The others follow the new
            // topology through the store.
            if let Some(store) = &app.store {
                let lease = format!("failover:{}", group.name);
                match store.try_lease(&lease, &app.writer_id, LEASE_TTL).await {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::warn!(group = %group.name, error = %e, "cannot take the failover lease; not promoting");
                        continue;
                    }
                }
            }
            let Some(best) = most_advanced(&app, &group).await else {
                continue;
            };
            tracing::warn!(group = %group.name, failures = h.consecutive_failures, candidate = %best, "master unreachable: automatic failover");
            match promote(&app, &group.name, &best, false).await {
                Ok(p) => {
                    tracing::warn!(group = %group.name, master = %p.master, version = p.version, "automatic failover done")
                }
                Err(e) => {
                    tracing::error!(group = %group.name, error = %e, "automatic failover failed")
                }
            }
        }
    }
}

async fn most_advanced(app: &App, group: &GroupHandle) -> Option<String> {
    let timeout = app.config.health.timeout;
    let mut best: Option<(String, String)> = None;
    for r in &group.replicas {
        if let Some(pos) = received_by(r, timeout).await
            && best.as_ref().is_none_or(|(_, b)| is_behind(b, &pos))
        {
            best = Some((r.dsn.addr(), pos));
        }
    }
    best.map(|(addr, _)| addr)
}

impl From<PromoteError> for ApiError {
    fn from(e: PromoteError) -> Self {
        use PromoteError as P;
        match e {
            e @ P::NoGroup(_) => ApiError::NotFound(e.to_string()),
            P::NotAReplica(m) => ApiError::InvalidParam(m),
            P::Behind(m) => ApiError::ReplicaBehind(m),
            e @ P::Failed(_) => ApiError::PromotionFailed(e.to_string()),
            P::Change(c) => c.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gtid_positions_compare_per_domain() {
        assert!(is_behind("0-1-5", "0-1-6"));
        assert!(!is_behind("0-1-6", "0-1-6"));
        assert!(
            !is_behind("0-1-7", "0-2-6"),
            "the server id does not matter"
        );
        assert!(
            is_behind("0-1-9", "0-1-9,1-3-1"),
            "a missing domain is behind"
        );
        assert!(!is_behind("0-1-9,1-3-1", "0-1-9"));
        assert!(is_behind("", "0-1-1"));
        assert!(!is_behind("0-1-1", ""));
    }

    #[test]
    fn quoting_escapes_quotes_and_backslashes() {
        assert_eq!(quote("a'b\\c"), "'a''b\\\\c'");
    }
}
