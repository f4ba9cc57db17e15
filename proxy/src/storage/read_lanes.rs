//! Eventual point reads of one group waiting to be asked together.
//!
//! A read of one counter costs the replica far more per statement than per
//! key (parse, plan, a round trip, two thread wake-ups on each side), so
//! concurrent reads of one group and kind (all-time totals of a namespace,
//! or counts of one namespace over one plan) queue in a *lane* and are
//! answered by one `... ckey IN (...)` statement. At most
//! `max_in_flight` statements of a lane run at once; reads that arrive
//! meanwhile wait and form the next statement, so batches grow with the
//! load and an idle lane adds no wait. Reads of the same counter in one
//! statement share its result (single flight).
//!
//! This module only queues; `engine::reads` starts the tasks that run the
//! statements (nothing here spawns), and a runner that stops without
//! draining its lane (a panic) drops the waiters it would have answered,
//! so they fall back to reading alone instead of waiting forever.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::domain::planner::Piece;
use crate::domain::role::Role;
use crate::error::ApiError;

/// What every read of a lane asks: all-time totals (`pieces` is `None`) or
/// counts over one plan, in one namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LaneKey {
    pub ns: String,
    pub pieces: Option<Vec<Piece>>,
}

/// One statement's answer, shared by every read it carried: the stored
/// values of the keys found (absent keys are 0) and the kind of server.
pub type Answer = Arc<Result<(HashMap<Vec<u8>, i64>, Role), ApiError>>;

/// A read waiting in a lane: its counter and where its answer goes.
pub struct Waiter {
    pub key: String,
    pub tx: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct Lane {
    queue: Vec<Waiter>,
    /// Runners of this lane (statements in flight or about to be).
    running: usize,
}

/// The lanes of one group (see the module documentation).
#[derive(Default)]
pub struct ReadLanes {
    lanes: Mutex<HashMap<LaneKey, Lane>>,
}

impl ReadLanes {
    /// Queues `w` in `key`'s lane. `true` when the caller must start a
    /// runner for the lane (fewer than `max_in_flight` run): it then holds
    /// one of the lane's runner slots until [`Self::take`] returns nothing
    /// (or its [`RunnerSlot`] is dropped).
    pub fn enqueue(&self, key: &LaneKey, w: Waiter, max_in_flight: usize) -> bool {
        let mut lanes = self.lanes.lock();
        let lane = match lanes.get_mut(key) {
            Some(lane) => lane,
            None => lanes.entry(key.clone()).or_default(),
        };
        lane.queue.push(w);
        if lane.running < max_in_flight {
            lane.running += 1;
            true
        } else {
            false
        }
    }

    /// Reads waiting in `key`'s lane.
    pub fn waiting(&self, key: &LaneKey) -> usize {
        self.lanes.lock().get(key).map_or(0, |l| l.queue.len())
    }

    /// Up to `max` waiting reads of `key`'s lane, oldest first. Empty when
    /// none waits: the runner's slot is then given back (and an idle lane
    /// removed) under the same lock, so a read queued after this call
    /// starts a runner of its own.
    pub fn take(&self, slot: &mut RunnerSlot<'_>, max: usize) -> Vec<Waiter> {
        let mut lanes = self.lanes.lock();
        let Some(lane) = lanes.get_mut(&slot.key) else {
            slot.released = true;
            return Vec::new();
        };
        if lane.queue.is_empty() {
            lane.running = lane.running.saturating_sub(1);
            if lane.running == 0 {
                lanes.remove(&slot.key);
            }
            slot.released = true;
            return Vec::new();
        }
        let n = lane.queue.len().min(max.max(1));
        lane.queue.drain(..n).collect()
    }

    /// The runner slot a `true` of [`Self::enqueue`] granted.
    pub fn slot(&self, key: LaneKey) -> RunnerSlot<'_> {
        RunnerSlot {
            lanes: self,
            key,
            released: false,
        }
    }
}

/// A runner's hold on one slot of its lane. Dropped before its lane was
/// drained (the runner panicked or was cancelled), it gives the slot back
/// and drops the lane's waiting reads: their senders close and each reads
/// alone.
pub struct RunnerSlot<'l> {
    lanes: &'l ReadLanes,
    pub key: LaneKey,
    released: bool,
}

impl Drop for RunnerSlot<'_> {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let mut lanes = self.lanes.lanes.lock();
        if let Some(lane) = lanes.get_mut(&self.key) {
            lane.running = lane.running.saturating_sub(1);
            if lane.running == 0 {
                let dropped = std::mem::take(&mut lane.queue);
                lanes.remove(&self.key);
                drop(lanes);
                drop(dropped);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LaneKey {
        LaneKey {
            ns: "n".into(),
            pieces: None,
        }
    }

    fn waiter(k: &str) -> (Waiter, oneshot::Receiver<Answer>) {
        let (tx, rx) = oneshot::channel();
        (Waiter { key: k.into(), tx }, rx)
    }

    #[test]
    fn at_most_max_in_flight_runners_and_the_rest_wait_for_the_next_batch() {
        let lanes = ReadLanes::default();
        let mut rxs = Vec::new();
        let mut starts = 0;
        for i in 0..5 {
            let (w, rx) = waiter(&format!("k{i}"));
            rxs.push(rx);
            starts += lanes.enqueue(&key(), w, 2) as usize;
        }
        assert_eq!(starts, 2, "two runners for five reads");
        assert_eq!(lanes.waiting(&key()), 5);
        let mut a = lanes.slot(key());
        let first = lanes.take(&mut a, 3);
        assert_eq!(
            first.iter().map(|w| w.key.as_str()).collect::<Vec<_>>(),
            ["k0", "k1", "k2"]
        );
        let mut b = lanes.slot(key());
        assert_eq!(lanes.take(&mut b, 3).len(), 2);
        assert!(lanes.take(&mut b, 3).is_empty(), "b gives its slot back");
        // One runner (a) still holds a slot: a new read starts a second.
        let (w, _rx) = waiter("late");
        assert!(lanes.enqueue(&key(), w, 2));
        let (w, _rx2) = waiter("later");
        assert!(!lanes.enqueue(&key(), w, 2), "two run again");
        drop(first);
        drop(rxs);
    }

    #[test]
    fn a_runner_dropped_undrained_closes_its_waiters_and_frees_the_lane() {
        let lanes = ReadLanes::default();
        let (w, mut rx) = waiter("a");
        assert!(lanes.enqueue(&key(), w, 1));
        let (w2, mut rx2) = waiter("b");
        assert!(!lanes.enqueue(&key(), w2, 1));
        let slot = lanes.slot(key());
        drop(slot);
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(matches!(
            rx2.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        let (w, _rx) = waiter("c");
        assert!(lanes.enqueue(&key(), w, 1), "the lane is free again");
    }
}
