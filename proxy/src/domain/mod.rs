//! The domain: pure logic over counts, with no I/O. Event bodies are parsed
//! and validated here, ranges are planned over the storage tiers, and the
//! small value types every layer shares (tiers, server roles, the clock,
//! the recent-latency window) live here.
//!
//! Knows neither axum nor MySQL; spawns nothing.

pub mod clock;
pub mod count;
pub mod event;
pub mod latency;
pub mod planner;
pub mod role;
pub mod tier;
