//! Storage: everything that holds or moves counts, below the shared state.
//! MariaDB access ([`db`]: pools, schema, the flush transaction; [`rows`]:
//! the rows a batch writes and their upsert; [`ids`]: which events with
//! an idempotency id count, decided in the flush transaction; [`quarantine`]: counters the
//! database refuses, held aside; [`query`]: read SQL; [`reshard_sql`]:
//! chunk copy, verify and cleanup statements; [`rollup`]: hour and day rows
//! rolled up from minute rows behind a watermark),
//! the in-memory aggregate ([`buffer`], a counter's minutes in
//! [`minutes`]), the write-ahead log ([`wal`]),
//! server health ([`health`]), the routing state as one value
//! ([`shard_map`]), the shared topology store ([`store`]), the copy
//! markers seen by reads ([`known_copies`]), eventual reads waiting to be
//! asked together ([`read_lanes`]) and the bounded-staleness cache of
//! eventual totals ([`read_cache`]).
//!
//! May know MySQL; knows no HTTP framework and no `App`; spawns no tokio
//! task (the WAL's sync and preallocation threads are its own).

pub mod buffer;
pub mod db;
pub mod health;
pub mod id_sets;
pub mod ids;
pub mod known_copies;
pub mod minutes;
pub mod quarantine;
pub mod query;
pub mod read_cache;
pub mod read_lanes;
pub mod reshard_sql;
pub mod rollup;
pub mod rows;
pub mod shard_map;
pub mod store;
pub mod wal;
