//! The routing state: ring + per-group nodes and buffers + version, as one
//! immutable value.
//!
//! The proxy keeps the current [`ShardMap`] behind one `ArcSwap`; a request
//! loads it once and uses that snapshot throughout, so no request ever sees
//! half of a topology change. Buffers are keyed by group name and carried
//! over into the next map, so a change of servers (a new DSN, a promotion)
//! keeps every pending delta.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use mysql_async::{Conn, Pool};
use tally_admin::{Dsn, Move, ShardRing, Topology};

use crate::config::ProxyConfig;
use crate::storage::buffer::GroupBuffer;
use crate::storage::db;
use crate::storage::health::NodeHealth;
use crate::storage::read_lanes::ReadLanes;
use crate::telemetry;

/// One MySQL server of a group, its pools and its last known health.
pub struct Node {
    /// The data user's DSN (the topology's).
    pub dsn: Dsn,
    /// The data user: flushes, reads, replay, retention, reshard copies.
    pub pool: Pool,
    /// The admin user's DSN on this server (the data DSN when the topology
    /// names no admin user).
    pub admin_dsn: Dsn,
    /// The admin user: schema, replication status, promotion, fencing.
    /// Small and lazy: it is used rarely.
    pub admin_pool: Pool,
    pub health: Arc<NodeHealth>,
}

/// One group: its servers and its aggregation buffer.
pub struct GroupHandle {
    pub name: String,
    pub master: Node,
    pub replicas: Vec<Node>,
    pub buffer: Arc<GroupBuffer>,
    /// Eventual point reads of this group waiting to be asked together.
    pub read_lanes: ReadLanes,
    next_replica: AtomicUsize,
    schema_ready: AtomicBool,
    /// The master's `max_allowed_packet`, learnt with the schema.
    max_packet: AtomicUsize,
}

impl GroupHandle {
    /// Applies the schema to the master once per map (idempotent). Called at
    /// start and before a flush, so a master that was down at start gets its
    /// tables as soon as it is back.
    pub async fn ensure_schema(&self, timeout: std::time::Duration) -> Result<(), db::DbError> {
        if self.schema_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let packet = db::apply_schema(&self.master.admin_dsn, timeout).await?;
        self.max_packet.store(packet, Ordering::Relaxed);
        self.schema_ready.store(true, Ordering::Release);
        telemetry::schema_applied(&self.name);
        Ok(())
    }

    /// A connection to the master, its schema applied first: what every
    /// writer to the master (flush, replay, quarantine) starts with.
    pub async fn master_conn(&self, timeout: std::time::Duration) -> Result<Conn, db::DbError> {
        self.ensure_schema(timeout).await?;
        db::conn(&self.master.pool, timeout).await
    }

    /// The master's `max_allowed_packet` (1 MiB until learnt).
    pub fn max_packet(&self) -> usize {
        self.max_packet.load(Ordering::Relaxed)
    }

    /// The next eligible replica in round-robin order: up, both
    /// replication threads running, lag at most `max_lag`.
    pub fn pick_replica(&self, max_lag: std::time::Duration) -> Option<&Node> {
        let n = self.replicas.len();
        let start = self.next_replica.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.replicas[(start + i) % n])
            .find(|r| r.health.eligible_replica(max_lag))
    }
}

/// A complete, immutable routing state.
pub struct ShardMap {
    pub topology: Topology,
    pub ring: ShardRing,
    pub groups: Vec<Arc<GroupHandle>>,
    /// While a reshard runs: the ranges whose owner changed from the
    /// previous ring, in position order (see [`ShardMap::moved`]).
    pub moves: Vec<Move>,
}

/// A key of a moved range: its rows may be on the previous owner
/// (`source`), the new one (`target`), or both.
pub struct Moved<'m> {
    pub reshard_id: &'m str,
    pub source: &'m Arc<GroupHandle>,
    pub target: &'m Arc<GroupHandle>,
}

impl ShardMap {
    /// Builds the map for `topology`, reusing the buffers of `previous`
    /// groups with the same name. Pools connect lazily; the caller proves
    /// reachability (and applies the schema) before swapping the map in.
    pub fn build(topology: Topology, cfg: &ProxyConfig, previous: Option<&ShardMap>) -> ShardMap {
        let old_groups: HashMap<&str, &Arc<GroupHandle>> = previous
            .map(|p| p.groups.iter().map(|g| (g.name.as_str(), g)).collect())
            .unwrap_or_default();
        // Servers whose DSN is unchanged keep their pool (warm connections)
        // and health; a changed DSN (new password, new address) gets new ones.
        let old_nodes: HashMap<&Dsn, &Node> = previous
            .map(|p| {
                p.groups
                    .iter()
                    .flat_map(|g| std::iter::once(&g.master).chain(&g.replicas))
                    .map(|n| (&n.dsn, n))
                    .collect()
            })
            .unwrap_or_default();
        let admin_cfg = crate::config::PoolConfig {
            min: 0,
            max: 4,
            connect_timeout: cfg.pool.connect_timeout,
        };
        let node = |dsn: &Dsn| {
            let admin_dsn = topology.admin_dsn(dsn);
            let old = old_nodes.get(dsn);
            Node {
                dsn: dsn.clone(),
                pool: old.map_or_else(|| db::pool(dsn, &cfg.pool), |o| o.pool.clone()),
                admin_pool: match old.filter(|o| o.admin_dsn == admin_dsn) {
                    Some(o) => o.admin_pool.clone(),
                    None => db::pool(&admin_dsn, &admin_cfg),
                },
                admin_dsn,
                health: old.map_or_else(|| Arc::new(NodeHealth::default()), |o| o.health.clone()),
            }
        };
        let groups = topology
            .groups
            .iter()
            .map(|g| {
                let old = old_groups.get(g.name.as_str());
                let buffer = old.map(|o| Arc::clone(&o.buffer)).unwrap_or_else(|| {
                    Arc::new(GroupBuffer::new(
                        &g.name,
                        cfg.buffer.max_pending_rows,
                        cfg.buffer.flush_rows,
                    ))
                });
                // The schema is known to be on an unchanged master.
                let same_master = old.filter(|o| o.master.dsn == g.master);
                Arc::new(GroupHandle {
                    name: g.name.clone(),
                    master: node(&g.master),
                    replicas: g.replicas.iter().map(node).collect(),
                    buffer,
                    read_lanes: ReadLanes::default(),
                    next_replica: AtomicUsize::new(0),
                    schema_ready: AtomicBool::new(
                        same_master.is_some_and(|o| o.schema_ready.load(Ordering::Acquire)),
                    ),
                    max_packet: AtomicUsize::new(
                        same_master.map_or(1 << 20, |o| o.max_packet.load(Ordering::Relaxed)),
                    ),
                })
            })
            .collect();
        ShardMap {
            ring: ShardRing::new(&topology),
            moves: tally_admin::reshard::moves(&topology),
            topology,
            groups,
        }
    }

    /// The map before the first topology is applied: no groups, version 0.
    /// Startup applies the file to it like any other change.
    pub fn empty() -> ShardMap {
        let topology = Topology {
            version: 0,
            vnodes: tally_admin::topology::DEFAULT_VNODES,
            groups: Vec::new(),
            migration: None,
            admin: None,
            last_reshard: None,
        };
        ShardMap {
            ring: ShardRing::new(&topology),
            topology,
            groups: Vec::new(),
            moves: Vec::new(),
        }
    }

    pub fn version(&self) -> u64 {
        self.topology.version
    }

    /// The group owning a routing key. A validated topology has at least one
    /// group, so this always finds one.
    pub fn route(&self, routing_key: &[u8]) -> Option<&Arc<GroupHandle>> {
        self.ring
            .owner(routing_key)
            .and_then(|i| self.groups.get(i))
    }

    /// Whether the key at ring position `pos` is in a range a running
    /// reshard moves, and between which groups.
    pub fn moved(&self, pos: u64) -> Option<Moved<'_>> {
        let id = &self.topology.migration.as_ref()?.id;
        let i = self.moves.partition_point(|m| m.end < pos);
        let m = self.moves.get(i).filter(|m| m.contains(pos))?;
        Some(Moved {
            reshard_id: id,
            source: self.group(&m.source)?,
            target: self.group(&m.target)?,
        })
    }

    pub fn group(&self, name: &str) -> Option<&Arc<GroupHandle>> {
        self.groups.iter().find(|g| g.name == name)
    }
}
