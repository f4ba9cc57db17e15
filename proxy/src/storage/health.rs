//! Health of every server, checked in the background.
//!
//! One task per group probes its master (`SELECT 1`) and replicas
//! (`SHOW SLAVE STATUS`: both threads running and `Seconds_Behind_Master`)
//! every `health.interval`, each probe bounded by `health.timeout`. Reads
//! consult the latest result without waiting: an `eventual` read goes to a
//! replica only if it is up, replicating and under `reads.max_replica_lag`.
//! This module holds the results and the probe itself; the tasks that run
//! it live in `engine::probes`.

use std::time::Duration;

use mysql_async::Row;
use mysql_async::prelude::*;
use parking_lot::Mutex;

use crate::storage::db;
use crate::storage::shard_map::{GroupHandle, Node};
use crate::telemetry;

/// The last probe result of one server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// `None` until the first probe finished.
    pub up: Option<bool>,
    pub last_error: Option<String>,
    /// Replicas only: both replication threads and the lag.
    pub io_running: bool,
    pub sql_running: bool,
    pub lag_seconds: Option<u64>,
    /// Probes failed in a row (0 when the last one succeeded); automatic
    /// failover acts on it.
    pub consecutive_failures: u32,
}

/// Shared, cheaply readable health of one server.
#[derive(Debug, Default)]
pub struct NodeHealth(Mutex<Health>);

impl NodeHealth {
    pub fn get(&self) -> Health {
        self.0.lock().clone()
    }

    fn set(&self, h: Health) {
        *self.0.lock() = h;
    }

    /// Whether an `eventual` read may use this replica.
    pub fn eligible_replica(&self, max_lag: Duration) -> bool {
        let h = self.0.lock();
        h.up == Some(true)
            && h.io_running
            && h.sql_running
            && h.lag_seconds.is_some_and(|l| l <= max_lag.as_secs())
    }

    /// Records a failed query on this server so the next reads avoid it
    /// until the next successful probe.
    pub fn mark_down(&self, error: String) {
        let mut h = self.0.lock();
        h.up = Some(false);
        h.last_error = Some(error);
    }
}

/// Probes every server of `group` once.
pub async fn probe_group(group: &GroupHandle, timeout: Duration) {
    let master = probe(&group.master, false, timeout);
    let replicas = group.replicas.iter().map(|r| probe(r, true, timeout));
    let (m, rs) = futures::join!(master, futures::future::join_all(replicas));
    report(group, &group.master, "master", &m);
    for (r, h) in group.replicas.iter().zip(&rs) {
        report(group, r, "replica", h);
    }
}

fn report(group: &GroupHandle, node: &Node, role: &'static str, h: &Health) {
    let before = node.health.get();
    if before.up != h.up && before.up.is_some() {
        match &h.last_error {
            Some(e) => {
                tracing::warn!(group = %group.name, role, addr = %node.dsn.addr(), error = %e, "server is down")
            }
            None => {
                tracing::info!(group = %group.name, role, addr = %node.dsn.addr(), "server is up")
            }
        }
    }
    let mut h = h.clone();
    h.consecutive_failures = if h.up == Some(true) {
        0
    } else {
        before.consecutive_failures.saturating_add(1)
    };
    node.health.set(h.clone());
    telemetry::node_health(
        &group.name,
        role,
        &node.dsn.addr(),
        h.up == Some(true),
        h.lag_seconds,
    );
}

async fn probe(node: &Node, replica: bool, timeout: Duration) -> Health {
    let work = async {
        // A replica's status needs a replication privilege the data user
        // does not have (it has none beyond the tally database).
        let pool = if replica {
            &node.admin_pool
        } else {
            &node.pool
        };
        let mut conn = db::conn(pool, timeout).await?;
        if !replica {
            conn.query_drop("SELECT 1").await?;
            return Ok(Health {
                up: Some(true),
                ..Health::default()
            });
        }
        let status: Option<Row> = conn.query_first("SHOW SLAVE STATUS").await?;
        let Some(row) = status else {
            return Ok(Health {
                up: Some(true),
                last_error: Some("not configured as a replica".into()),
                ..Health::default()
            });
        };
        let yes = |col: &str| {
            row.get_opt::<String, _>(col)
                .and_then(Result::ok)
                .as_deref()
                == Some("Yes")
        };
        let lag: Option<u64> = row
            .get_opt::<Option<u64>, _>("Seconds_Behind_Master")
            .and_then(Result::ok)
            .flatten();
        let error: Option<String> = ["Last_IO_Error", "Last_SQL_Error"]
            .iter()
            .filter_map(|c| row.get_opt::<String, _>(*c).and_then(Result::ok))
            .find(|e| !e.is_empty());
        Ok::<_, db::DbError>(Health {
            up: Some(true),
            last_error: error,
            io_running: yes("Slave_IO_Running"),
            sql_running: yes("Slave_SQL_Running"),
            lag_seconds: lag,
            consecutive_failures: 0,
        })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => down(e.to_string()),
        Err(_) => down(format!("no answer within {timeout:?}")),
    }
}

fn down(error: String) -> Health {
    Health {
        up: Some(false),
        last_error: Some(error),
        ..Health::default()
    }
}
