//! The engines that run over the shared state: the flusher of each group,
//! the health probes, retention, the rollup of hours and days, the replay of earlier lives' logs and
//! the reads that span the two owners of a moved key, and the quarantine
//! of counters the database refuses.
//!
//! Uses [`crate::app::App`] and the layers below it; knows no HTTP
//! framework. The first layer that may spawn tasks.

pub mod each_group;
pub mod flusher;
pub mod ingest;
pub mod moved_ids;
pub mod moved_reads;
pub mod probes;
pub mod quarantine;
pub mod reads;
pub mod replay;
pub mod retention;
pub mod rollup;
