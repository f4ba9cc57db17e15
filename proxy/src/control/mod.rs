//! The control plane inside the proxy: the one path for topology changes
//! ([`topology`], with its file watch and store follower), replica
//! promotion ([`failover`]), online resharding ([`reshard`]) and this
//! proxy's registry heartbeat ([`heartbeat`]).
//!
//! Uses the engines (it starts flushers and probes for a new map); knows no
//! HTTP framework.

pub mod failover;
pub mod heartbeat;
pub mod reshard;
pub mod topology;
