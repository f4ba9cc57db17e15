//! Hermetic MariaDB master/replica groups for tally's end-to-end tests, the
//! `tally-dev` launcher and the benchmark, plus a TCP fault relay.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tally_harness::HarnessError> {
//! use std::time::Duration;
//! use tally_harness::{Cluster, ClusterSpec};
//!
//! let cluster = Cluster::start(ClusterSpec { groups: 2, ..ClusterSpec::default() }).await?;
//! let g0 = cluster.group(0);
//! g0.master.exec("INSERT INTO tally.counter_total (ns, ckey, ring_pos, count) VALUES ('v', 'k', 0, 1)").await?;
//! g0.replicas[0].wait_caught_up(&g0.master, Duration::from_secs(10)).await?;
//! std::fs::write("topology.yaml", cluster.topology_yaml(160)).ok();
//! cluster.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Every server is a `mariadbd` from `PATH` (or `/usr/sbin`) started with
//! `--no-defaults`, its own data directory, a port picked at run time, a
//! unique server id and a binary log; replicas follow their master by GTID
//! with semi-sync. Clients connect over TCP to 127.0.0.1 without a
//! password, as one of three accounts every server has: the proxy's data
//! user [`DATA_USER`] (`tally`, DML on the cluster's databases only, so
//! `read_only` fences it; the topology DSNs, [`Node::dsn`]), the admin user
//! [`ADMIN_USER`] (`tally_admin`, [`ADMIN_PRIVILEGES`]: schema, promotion,
//! fencing, and the replication account; the topology's `admin:` section)
//! and `root` (the harness's own SQL, [`Node::sql`], and anything else:
//! [`Node::root_dsn`], e.g. a topology store). No server outlives the
//! process that started it: dropping a [`Cluster`] kills its servers, and
//! each server also gets SIGKILL from the kernel when the process dies.
//!
//! # Layout
//!
//! - `cluster`: [`ClusterSpec`], [`Cluster`], [`Group`]; data directories
//!   copied from one `mariadb-install-db` template, concurrent boot,
//!   replication wiring, schema, state-directory reuse, and
//!   [`Cluster::shared`], the process-wide cluster for tests that neither
//!   kill nor reconfigure servers.
//! - `node`: [`Node`], one server: start/stop/kill, SQL helpers, replica
//!   status, GTID catch-up.
//! - `process`: finding the binaries and spawning servers tied to our life
//!   (the only `unsafe` code).
//! - `relay`: [`FaultRelay`], a TCP relay that delays, cuts or refuses
//!   connections, including the "COMMIT sent, answer lost" case.
//! - `error`: [`HarnessError`].
//!
//! Temporary directories (a state directory when none is given, the
//! template, the short unix-socket directory under `/tmp`) are named
//! `tally-harness-<pid>-*` / `tally-sock-<pid>-*`; `Drop` removes them, and
//! any left by a process that died abruptly are swept by the next start.
//!
//! A state directory (`ClusterSpec::state_dir`) holds one subdirectory per
//! node (`g0-master`, `g0-replica1`, ...; `mariadbd.log` inside each is the
//! server's output) and `tally-harness.json`, the recorded shape, ports and
//! server ids that let a later run reuse the data.

mod cluster;
mod error;
mod node;
mod process;
mod relay;
pub mod tls;

pub use cluster::{
    ADMIN_PRIVILEGES, ADMIN_USER, Cluster, ClusterSpec, DATA_PRIVILEGES, DATA_USER, Group,
};
pub use error::HarnessError;
pub use node::{Node, ReplicaStatus, Role};
pub use relay::{Fault, FaultRelay, RelayStats};
pub use tls::{TestCa, TlsFiles};

/// The driver the harness speaks, re-exported so callers use the same
/// version for [`Node::sql`] rows.
pub use mysql_async;
