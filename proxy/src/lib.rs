//! tally's data plane: the proxy clients talk to.
//!
//! A request is parsed and validated in full ([`domain::event`]), routed by
//! the consistent-hash ring of the current `ShardMap` (one `ArcSwap` load
//! per request), merged into the owning group's `GroupBuffer` and
//! answered; one flusher per group applies batches exactly once to the
//! group's master.
//!
//! # Layout: layers, each using only the ones above it in this list
//! - leaves: [`error`] (every request failure by its code), [`config`]
//!   (`proxy.yaml` → validated [`ProxyConfig`]), `telemetry` (every
//!   exported metric, logging), [`failpoint`] (test-only panics), `notify`
//!   (the service manager's `sd_notify` protocol);
//! - [`domain`]: event parsing, the range planner, tiers, roles, the clock;
//! - `storage`: MariaDB access, the aggregation buffer, the WAL, health
//!   state, the shard map, the topology store;
//! - `app`: the state shared by handlers and tasks (holds, spawns nothing);
//! - `engine`: flushers, health probes, retention, WAL replay, reads of
//!   moved keys;
//! - `control`: topology changes, failover, resharding, heartbeat;
//! - `http`: routers, handlers, OpenAPI, params, the error → status map,
//!   connection handling;
//! - `server`: `run(config, listeners, shutdown)`, process wiring.
//!
//! `proxy/tests/layers.rs` reads the sources and fails on any import that
//! runs up this list. Modules are crate-private; what other crates (the
//! integration tests, benchmarks and fuzz targets) use is re-exported below
//! on purpose.
#![forbid(unsafe_code)]

pub mod config;
pub mod domain;
pub mod error;
pub mod failpoint;

pub(crate) mod app;
pub(crate) mod control;
pub(crate) mod engine;
pub(crate) mod http;
pub(crate) mod notify;
pub(crate) mod server;
pub(crate) mod storage;
pub(crate) mod telemetry;

pub use config::ProxyConfig;
pub use server::{Listeners, StartError, run};
pub use telemetry::init_logging;

/// What the benchmarks, the fuzz targets and the integration tests drive
/// directly, below the HTTP API.
pub mod testing {
    pub use crate::domain::tier::Tier;
    pub use crate::http::params::Params;
    pub use crate::http::read_api::{self, MAX_KEYS, MAX_POINTS, MAX_TOP};
    pub use crate::storage::buffer::{Delta, GroupBuffer, IdEvent};
    pub use crate::storage::ids;
    pub use crate::storage::reshard_sql::copy_id_sets;
    pub use crate::storage::rows::FlushRows;
    pub use crate::storage::store::Store;
}
