//! tally's control plane: what the topology is, whether it is valid, and who
//! owns a key.
//!
//! This crate knows nothing about MySQL connections or the aggregation
//! buffer; the proxy builds its live `ShardMap` (ring + pools) from the
//! validated values defined here. Keeping the model here lets `tallyctl`
//! validate and diff topologies without linking the data plane.
//!
//! # Layout
//! - [`problems`]: the "collect every problem, then fail once" error type
//!   shared by every validator.
//! - [`yaml`]: YAML parsing that reports unknown keys as problems instead of
//!   stopping at the first one.
//! - [`dsn`]: `mysql://user:pass@host:port/db` parsing and redaction.
//! - [`topology`]: the topology file model and its validation.
//! - [`ring`]: the consistent-hash ring and the routing key.
//! - [`diff`]: what changing one topology into another does.
//! - [`reshard`]: the plan of an online reshard (moved ranges, the
//!   topologies that start, finish or revert it).
//! - `cli` (only with the `cli` feature): `tallyctl`, the operator CLI over
//!   the admin HTTP API.
//!
//! # Features
//! - `cli` (default): the `cli` module and the `tallyctl` binary, with their
//!   dependencies (clap, clap_complete, reqwest, tokio, humantime). The proxy
//!   depends on this crate with `default-features = false`, so building it
//!   alone does not compile them.
//! - `openapi`: `utoipa` schemas of the documents the admin API exchanges
//!   (the proxy enables it for `GET /openapi.json`).
#![forbid(unsafe_code)]

#[cfg(feature = "cli")]
pub mod cli;
pub mod diff;
pub mod dsn;
pub mod problems;
pub mod reshard;
pub mod ring;
pub mod topology;
pub mod yaml;

pub use diff::{TopologyDiff, diff};
pub use dsn::Dsn;
pub use problems::{Invalid, Problem, Problems};
pub use ring::{Move, ShardRing, routing_key};
pub use topology::{AdminUser, GroupSpec, Topology, TopologyDoc};
