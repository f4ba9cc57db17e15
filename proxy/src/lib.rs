//! tally's data plane: the proxy clients talk to.
//!
//! A request is parsed and validated in full ([`event`]), routed by the
//! consistent-hash ring of the current [`shard_map::ShardMap`] (one
//! `ArcSwap` load per request), merged into the owning group's
//! [`buffer::GroupBuffer`] and answered; one [`flusher`] per group applies
//! batches exactly once to the group's master ([`db`]).
//!
//! # Layout
//! - [`config`]: `proxy.yaml` → validated [`config::ProxyConfig`].
//! - [`server`]: `run(config, listeners, shutdown)`, process wiring.
//! - [`serve`]: one listener's connections: limit, header/idle timeouts,
//!   header size.
//! - [`app`]: state shared by handlers and tasks.
//! - [`api`] / [`admin_api`]: the two HTTP routers; [`error`] maps failures
//!   to statuses in one place; [`params`] parses query and path input.
//! - [`openapi`]: the OpenAPI 3.1 documents assembled from the handlers'
//!   annotations, served at `GET /openapi.json` on both listeners.
//! - [`event`]: body parsing and event validation.
//! - [`shard_map`]: ring + pools + buffers as one immutable value.
//! - [`buffer`], [`flusher`], [`db`]: aggregation, batching, SQL.
//! - [`read_api`], [`planner`], [`query`]: reads, the tier planner, read SQL.
//! - [`health`]: background probes that decide which replica may serve.
//! - [`retention`]: deletes expired minute and hour rows in chunks.
//! - [`topology_ctl`]: the one path for every topology change.
//! - [`failover`]: planned and emergency replica promotion.
//! - [`reshard`]: online resharding (copy, verify, cleanup) and the reads
//!   that span two owners meanwhile.
//! - [`store`]: the shared topology store, proxy registry and leases.
//! - [`telemetry`]: every exported metric.
#![forbid(unsafe_code)]

pub mod admin_api;
pub mod api;
pub mod app;
pub mod buffer;
pub mod config;
pub mod db;
pub mod error;
pub mod event;
pub mod failover;
pub mod flusher;
pub mod health;
pub mod latency;
pub mod openapi;
pub mod params;
pub mod planner;
pub mod query;
pub mod read_api;
pub mod reshard;
pub mod retention;
pub mod serve;
pub mod server;
pub mod shard_map;
pub mod store;
pub mod telemetry;
pub mod topology_ctl;
pub mod wal;

pub use config::ProxyConfig;
pub use server::{Listeners, StartError, run};
