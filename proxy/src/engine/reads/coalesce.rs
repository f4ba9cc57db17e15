//! Coalesced eventual point reads: the runners of a group's read lanes
//! (`storage::read_lanes`).
//!
//! A read joins its lane (group, namespace, and the range's plan or none
//! for totals). When fewer than `max_in_flight` statements of that lane
//! run, the read also starts a runner task: it takes up to `max_batch`
//! waiting reads, asks their distinct keys in one statement through the
//! ordinary eventual path (an eligible replica, else or after its failure
//! the master: reads still never fail because a replica did), hands the
//! one answer to every read it carried, and goes on while reads wait.
//!
//! The statement's key list is padded to a power of two (by repeating a
//! key; `IN` is a set) so a connection's prepared-statement cache holds
//! one statement per size class instead of one per batch size.
//!
//! Keys a running reshard moves never come here (the caller reads them
//! from both owners), and a batch runs on the very group handle its reads
//! were routed with (lanes live in the handle).

use std::sync::Arc;

use mysql_async::Conn;
use tokio::sync::oneshot;

use super::{ReadLimits, eventual_within};
use crate::app::App;
use crate::config::CoalesceConfig;
use crate::domain::planner::Piece;
use crate::domain::role::Role;
use crate::error::ApiError;
use crate::storage::query;
use crate::storage::read_lanes::{LaneKey, Waiter};
use crate::storage::shard_map::GroupHandle;
use crate::telemetry;

/// One counter's stored total (`pieces` is `None`) or count over a plan,
/// read together with concurrent reads of its lane. `Ok(None)` when the
/// runner that took it stopped without answering (it panicked): the caller
/// then reads alone.
pub(super) async fn read(
    app: &App,
    group: &Arc<GroupHandle>,
    cfg: &CoalesceConfig,
    ns: &str,
    key: &str,
    pieces: Option<&[Piece]>,
) -> Result<Option<(i64, Role)>, ApiError> {
    let lane = LaneKey {
        ns: ns.to_owned(),
        pieces: pieces.map(<[Piece]>::to_vec),
    };
    let (tx, rx) = oneshot::channel();
    let waiter = Waiter {
        key: key.to_owned(),
        tx,
    };
    if group.read_lanes.enqueue(&lane, waiter, cfg.max_in_flight) {
        tokio::spawn(run(
            Arc::clone(group),
            lane,
            ReadLimits::of(app),
            cfg.clone(),
        ));
    }
    let Ok(answer) = rx.await else {
        return Ok(None);
    };
    match &*answer {
        Ok((found, role)) => Ok(Some((
            found.get(key.as_bytes()).copied().unwrap_or(0),
            *role,
        ))),
        Err(e) => Err(reissue(e)),
    }
}

/// The same failure for every read a statement carried.
fn reissue(e: &ApiError) -> ApiError {
    match e {
        ApiError::GroupUnavailable { group, detail } => ApiError::GroupUnavailable {
            group: group.clone(),
            detail: detail.clone(),
        },
        other => ApiError::Unavailable(other.to_string()),
    }
}

/// A runner: statements of one lane until none waits.
async fn run(group: Arc<GroupHandle>, lane: LaneKey, limits: ReadLimits, cfg: CoalesceConfig) {
    let lanes = &group.read_lanes;
    let mut slot = lanes.slot(lane);
    loop {
        if !cfg.window.is_zero() && lanes.waiting(&slot.key) < cfg.max_batch {
            tokio::time::sleep(cfg.window).await;
        }
        let batch = lanes.take(&mut slot, cfg.max_batch);
        if batch.is_empty() {
            return;
        }
        let answer = {
            let mut keys: Vec<&str> = batch.iter().map(|w| w.key.as_str()).collect();
            keys.sort_unstable();
            keys.dedup();
            telemetry::read_batch(batch.len(), keys.len());
            pad(&mut keys);
            let (ns, pieces) = (slot.key.ns.as_str(), slot.key.pieces.as_deref());
            let keys = &keys;
            let read = |mut c: Conn| async move {
                match pieces {
                    None => query::counts(&mut c, ns, keys, None).await,
                    Some(pieces) => query::range_counts(&mut c, ns, keys, pieces).await,
                }
            };
            Arc::new(eventual_within(limits, &group, read).await)
        };
        for w in batch {
            // A reader that went away (its client closed) needs no answer.
            let _ = w.tx.send(Arc::clone(&answer));
        }
    }
}

/// Pads `keys` (not empty) to the next power of two by repeating the last.
fn pad(keys: &mut Vec<&str>) {
    if let Some(&last) = keys.last() {
        keys.resize(keys.len().next_power_of_two(), last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lists_are_padded_to_powers_of_two_with_a_key_already_asked() {
        let mut one = vec!["a"];
        pad(&mut one);
        assert_eq!(one, ["a"]);
        let mut three = vec!["a", "b", "c"];
        pad(&mut three);
        assert_eq!(three, ["a", "b", "c", "c"]);
        let mut five: Vec<&str> = vec!["a", "b", "c", "d", "e"];
        pad(&mut five);
        assert_eq!(five.len(), 8);
        assert!(five[5..].iter().all(|k| *k == "e"));
        let mut none: Vec<&str> = Vec::new();
        pad(&mut none);
        assert!(none.is_empty());
    }
}
