//! The in-memory aggregation buffer of one group.
//!
//! Writes merge `(counter, minute) → delta` into one of several shards, each
//! behind its own mutex, so the two cores never serialize on one lock. The
//! group's flusher periodically *cuts* a batch: it takes every shard's map in
//! one pass and advances the shard's generation. A writer learns, under the
//! shard lock, which generation its deltas went into; `ack=committed` waits
//! until that generation's batch is committed.
//!
//! Pending entries (open shards plus the batch being flushed) are bounded per
//! group; a write first reserves room for all of its events
//! ([`GroupBuffer::reserve`]) and is refused before anything is merged when
//! the room is not there, so a dead master fills only its own group's
//! buffer, and concurrent writers cannot push it past the bound.
//!
//! Strong reads need "committed rows + not yet committed deltas" without
//! counting a batch twice or zero times while it commits; `commit_epoch` is a
//! seqlock for that: it is odd while a batch's COMMIT is in flight or its
//! outcome is unknown.

use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use tally_admin::{ShardRing, routing_key};
use tokio::sync::{Notify, watch};

pub use crate::domain::count::Sum;
use crate::storage::id_sets::{self, Entry, Plan};
use crate::storage::wal::Wal;
use crate::telemetry;

/// Shards per group; a power of two comfortably above the core count.
const SHARDS: usize = 16;

/// Id'd events a shard keeps room for after a cut (~9 MB of list at 136
/// bytes an event), so a keyed load does not fault its memory in anew
/// each batch.
const KEPT_IDS_PER_SHARD: usize = 1 << 16;

/// The hasher of a shard's map: foldhash, seeded at random for each map.
/// Keys are chosen by clients, so an unkeyed hash would let anyone compute
/// colliding keys offline and turn every merge into a long probe chain;
/// with a secret seed per map there is nothing to compute. (The shard of a
/// key is picked by the low bits of its ring position, which every key of
/// the shard shares: the map's hash must not reuse them, and does not.)
pub type KeyHasher = foldhash::fast::RandomState;

/// One delta to merge: routing key (`ns 0x00 key`), ring position, minute
/// bucket start (unix seconds) and delta; with the client's idempotency
/// `id`, the request's duplicate count to report to.
#[derive(Debug, Clone, Copy)]
pub struct Delta<'a> {
    pub routing_key: &'a [u8],
    pub ring_pos: u64,
    pub minute: i64,
    pub delta: i64,
    pub id: Option<&'a [u8]>,
    pub dups: Option<&'a Duplicates>,
}

/// One request's count of its events found already counted: bumped when
/// the batch holding the event commits and the event repeated an earlier
/// one of the batch or the database knew the id. An `ack=committed`
/// answer reads it after the commit wait.
pub type Duplicates = Arc<AtomicUsize>;

/// An event with an idempotency id, kept apart from the per-minute sums:
/// whether it counts is decided by the flush transaction (the id sets),
/// so its delta must be removable from the batch. (The batch's `counters`
/// include it, as if new, for strong reads.)
#[derive(Debug, Clone)]
pub struct IdEvent {
    /// `routing key 0x00 id`.
    key: IdKey,
    /// Where the routing key ends (the 0x00 before the id).
    split: usize,
    /// Its entry in an id set, hashed when the event was merged (on the
    /// request's thread, while its bytes are at hand) rather than by the
    /// flusher, which does one group's batches one after another.
    entry: Entry,
    pub minute: i64,
    pub delta: i64,
    pub dups: Option<Duplicates>,
}

impl IdEvent {
    pub fn new(
        routing_key: &[u8],
        id: &[u8],
        minute: i64,
        delta: i64,
        dups: Option<Duplicates>,
    ) -> IdEvent {
        IdEvent {
            key: IdKey::new(routing_key, id),
            split: routing_key.len(),
            entry: id_sets::entry(routing_key, id),
            minute,
            delta,
            dups,
        }
    }

    /// Its entry in an id set ([`id_sets::entry`]).
    pub fn entry(&self) -> Entry {
        self.entry
    }

    /// The plan of `events` (grouped by set, [`Plan::of`]).
    pub fn plan(events: &[IdEvent]) -> Plan {
        Plan::of(events.iter().map(|e| (e.id(), e.entry)))
    }

    pub fn routing_key(&self) -> &[u8] {
        &self.key.bytes()[..self.split]
    }

    pub fn id(&self) -> &[u8] {
        self.key.bytes().get(self.split + 1..).unwrap_or_default()
    }

    /// `routing key 0x00 id`: the event's identity (what "counted once"
    /// is about).
    pub fn identity(&self) -> &[u8] {
        self.key.bytes()
    }
}

/// Bytes of `routing key 0x00 id` an [`IdKey`] holds in itself (the
/// key plus its length and tag make 88 bytes).
const INLINE_KEY: usize = 86;

/// An id'd event's `routing key 0x00 id`: inside the event when it is
/// short enough (most are), else on the heap. Held inline, a keyed load
/// allocates nothing per event on the request path and frees nothing on
/// the flusher's, and the cut's plan reads each id from the list it
/// walks anyway, instead of missing the cache on a separate allocation
/// per event (the plan's `set_of` was 7 % of the proxy's CPU).
#[derive(Clone)]
enum IdKey {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Heap(Box<[u8]>),
}

impl IdKey {
    fn new(routing_key: &[u8], id: &[u8]) -> IdKey {
        let len = routing_key.len() + 1 + id.len();
        if len > INLINE_KEY {
            return IdKey::Heap(id_sets::identity(routing_key, id).into());
        }
        let mut bytes = [0u8; INLINE_KEY];
        bytes[..routing_key.len()].copy_from_slice(routing_key);
        bytes[routing_key.len() + 1..len].copy_from_slice(id);
        IdKey::Inline {
            len: len as u8,
            bytes,
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            IdKey::Inline { len, bytes } => &bytes[..usize::from(*len)],
            IdKey::Heap(bytes) => bytes,
        }
    }
}

impl std::fmt::Debug for IdKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.bytes().escape_ascii().to_string())
    }
}

pub use crate::storage::minutes::Minutes;

struct Shard {
    generation: u64,
    counters: HashMap<Box<[u8]>, Minutes, KeyHasher>,
    /// Events with an id since the last cut (their deltas are in
    /// `counters` too), in arrival order; empty unless clients send ids.
    ids: Vec<IdEvent>,
    entries: usize,
    /// The oldest topology version any delta merged here since the last
    /// cut was routed by (`u64::MAX`: none). Kept under the shard's lock
    /// with the deltas, so a cut takes both together.
    routed_by: u64,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            generation: 1,
            counters: HashMap::default(),
            ids: Vec::new(),
            entries: 0,
            routed_by: NOT_ROUTED,
        }
    }
}

/// The routing version of deltas merged outside a request (tests and
/// tools): no ring decided where they went, so no fence refuses them.
pub const NOT_ROUTED: u64 = u64::MAX;

/// A cut batch: every pending counter with its minutes, sorted by routing
/// key so that rows reach MySQL in primary-key order.
#[derive(Debug)]
pub struct Batch {
    pub generation: u64,
    pub counters: Vec<(Box<[u8]>, Minutes)>,
    pub entries: usize,
    /// With a write-ahead log: the last LSN appended at the cut; every
    /// record of this group up to it is in this batch or an earlier one.
    pub wal_lsn: u64,
    /// The sequence number of the batch's `(writer_id, seq)` dedup row,
    /// taken at its first flush attempt and kept with the batch, so every
    /// retry (also by a restarted flusher) uses the same one.
    pub seq: OnceLock<u64>,
    /// The oldest topology version by whose ring any of its deltas was
    /// routed ([`NOT_ROUTED`] when none was): a reshard source's fence
    /// (`ring_fence`) refuses the batch when it is older than the fence.
    pub routed_by: u64,
    /// The batch's events with an id; their deltas are also in
    /// `counters`, and the flush takes out those the database already
    /// knew.
    pub ids: Vec<IdEvent>,
    /// `ids` grouped by set, computed once for every attempt.
    pub id_plan: OnceLock<Plan>,
    /// When the batch is applied in several transactions: each part's
    /// range of `counters` and dedup sequence number, fixed at the first
    /// attempt so a restarted flusher repeats the same parts.
    pub parts: OnceLock<Vec<(std::ops::Range<usize>, u64)>>,
    /// How many of `counters` (from the first) are committed by the parts
    /// applied so far: strong reads no longer add them from the batch.
    /// Advanced by [`GroupBuffer::part_committed`].
    pub committed_upto: AtomicUsize,
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            generation: 0,
            counters: Vec::new(),
            entries: 0,
            wal_lsn: 0,
            seq: OnceLock::new(),
            routed_by: NOT_ROUTED,
            ids: Vec::new(),
            id_plan: OnceLock::new(),
            parts: OnceLock::new(),
            committed_upto: AtomicUsize::new(0),
        }
    }
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// The batch's counters in `range`, as a batch of its own to apply (a
    /// part, or what is left of the batch): no ids, the same routing
    /// version and log position.
    pub fn counters_in(&self, range: std::ops::Range<usize>) -> Batch {
        let counters = self.counters[range].to_vec();
        Batch {
            entries: counters.iter().map(|(_, m)| m.len()).sum(),
            counters,
            wal_lsn: self.wal_lsn,
            routed_by: self.routed_by,
            ..Batch::default()
        }
    }

    /// The batch's ids grouped by set (computed at the first call).
    pub fn id_plan(&self) -> &Plan {
        self.id_plan.get_or_init(|| IdEvent::plan(&self.ids))
    }

    /// Sum of this batch's deltas for one counter within `[from, to)`
    /// minutes (all of them when `None`).
    fn sum(&self, routing_key: &[u8], range: Option<(i64, i64)>) -> Sum {
        match self.uncommitted(routing_key) {
            Some(minutes) => sum_minutes(minutes, range),
            None => 0,
        }
    }

    /// The minutes of one counter of the batch, unless a part that holds
    /// it is committed already (its rows are in the database then).
    fn uncommitted(&self, routing_key: &[u8]) -> Option<&Minutes> {
        let counters = self.uncommitted_counters();
        let i = counters
            .binary_search_by(|(k, _)| k.as_ref().cmp(routing_key))
            .ok()?;
        Some(&counters[i].1)
    }

    /// The counters of the batch no committed part holds.
    fn uncommitted_counters(&self) -> &[(Box<[u8]>, Minutes)] {
        let upto = self.committed_upto.load(Ordering::Acquire);
        self.counters.get(upto..).unwrap_or_default()
    }
}

fn sum_minutes(minutes: &Minutes, range: Option<(i64, i64)>) -> Sum {
    minutes
        .iter()
        .filter(|(m, _)| range.is_none_or(|(from, to)| *m >= from && *m < to))
        .map(|(_, d)| d)
        .sum()
}

/// A key (without `ns 0x00`) and its pending sum in one part of a buffer.
pub type RankedKey = (Sum, Vec<u8>);

/// What [`GroupBuffer::pending_top`] found.
#[derive(Debug, Default, PartialEq)]
pub struct PendingTop {
    /// The keys ranked (without `ns 0x00`), sorted, each once.
    pub keys: Vec<Vec<u8>>,
    /// Per part (open shards, then the batch in flight): `None` when no
    /// key of that part was left out, else the lowest-ranked `(sum, key)`
    /// it kept. Every key it left out ranks below that one: a lower sum in
    /// that part, or the same sum and a greater key.
    pub cuts: [Option<RankedKey>; 2],
}

/// The `n` highest-ranked `(sum, key)` offered: sum descending, ties by key
/// ascending. A key is copied only when it enters the ranking, into the
/// buffer of the key it evicts.
struct Highest {
    n: usize,
    /// A max-heap of [`Lowest`]: its top is the lowest-ranked key kept.
    kept: BinaryHeap<Lowest>,
    cut: bool,
}

/// A ranked key ordered so that the lowest-ranked is the greatest.
#[derive(PartialEq, Eq)]
struct Lowest(Sum, Vec<u8>);

impl Ord for Lowest {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.0.cmp(&self.0).then_with(|| self.1.cmp(&other.1))
    }
}

impl PartialOrd for Lowest {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Highest {
    fn new(n: usize) -> Highest {
        Highest {
            n: n.max(1),
            kept: BinaryHeap::new(),
            cut: false,
        }
    }

    fn offer(&mut self, sum: Sum, key: &[u8]) {
        if self.kept.len() < self.n {
            self.kept.push(Lowest(sum, key.to_vec()));
            return;
        }
        self.cut = true;
        if let Some(mut lowest) = self.kept.peek_mut()
            && (sum > lowest.0 || (sum == lowest.0 && key < lowest.1.as_slice()))
        {
            lowest.0 = sum;
            lowest.1.clear();
            lowest.1.extend_from_slice(key);
        }
    }

    /// The keys kept and, when some were left out, the lowest kept.
    fn finish(mut self) -> (Vec<Vec<u8>>, Option<RankedKey>) {
        let cut = if self.cut {
            self.kept.peek().map(|Lowest(s, k)| (*s, k.clone()))
        } else {
            None
        };
        let keys = self.kept.drain().map(|Lowest(_, k)| k).collect();
        (keys, cut)
    }
}

/// Why a merge was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// Room for `n` entries under a group's bound (see
/// [`GroupBuffer::reserve`]); released when dropped unused.
#[must_use = "dropping a reservation releases it"]
pub struct Reservation<'b> {
    buffer: &'b GroupBuffer,
    n: usize,
}

impl Reservation<'_> {
    /// Merges at most `n` deltas into the reserved room (merging into an
    /// existing entry needs none of it, and the rest is released); returns
    /// the highest generation they went into.
    /// `routed_by` is the topology version whose ring chose this group.
    pub fn merge<'a>(mut self, routed_by: u64, deltas: impl IntoIterator<Item = Delta<'a>>) -> u64 {
        let (generation, added) = self.buffer.merge_entries(routed_by, deltas);
        // What stays reserved is released by `drop`: the unused part.
        // More entries than reserved would be a caller bug; still count them.
        if added > self.n {
            let extra = added - self.n;
            self.buffer.pending.fetch_add(extra, Ordering::Relaxed);
            self.n = 0;
        } else {
            self.n -= added;
        }
        generation
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.buffer.pending.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// The buffer of one group; shared by writers, the flusher and strong reads.
pub struct GroupBuffer {
    name: String,
    shards: Box<[Mutex<Shard>]>,
    pending: AtomicUsize,
    max_pending: usize,
    flush_rows: usize,
    /// Wakes the flusher early: size threshold reached or a committed waiter.
    pub(crate) wake: Notify,
    committed: watch::Sender<u64>,
    committed_waiters: AtomicUsize,
    urgent: AtomicBool,
    rows_committed: AtomicU64,
    failures: AtomicU64,
    /// The last flush attempt failed (cleared by a commit): writes that
    /// find the group full are refused at once instead of waiting.
    failing: AtomicBool,
    /// Turns at each flush outcome (a commit or a failed attempt): what a
    /// write waiting for room watches.
    outcomes: watch::Sender<u64>,
    inflight: Mutex<Option<Arc<Batch>>>,
    commit_epoch: AtomicU64,
    /// An attempt's COMMIT of the batch (or part) in flight got no answer,
    /// and no attempt since has found out whether it was applied: the
    /// epoch stays odd whatever later attempts fail with.
    commit_in_doubt: AtomicBool,
    /// Events with an id pending (open shards and the batch in flight).
    pending_ids: AtomicUsize,
    /// The emptied id list of a committed batch, kept for the next cut
    /// ([`Self::recycle`]): a keyed load's list is tens of megabytes, and
    /// a new one each batch is faulted in page by page (page faults were
    /// 13-16 % of the proxy's CPU in `tally-bench ids`).
    spare_ids: Mutex<Vec<IdEvent>>,
    /// Held by the flusher for each attempt and by a promotion for the
    /// whole switchover, so no batch is written while masters change.
    pub gate: tokio::sync::Mutex<()>,
}

impl GroupBuffer {
    pub fn new(name: &str, max_pending: usize, flush_rows: usize) -> GroupBuffer {
        let shards = (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect();
        GroupBuffer {
            name: name.to_owned(),
            shards,
            pending: AtomicUsize::new(0),
            max_pending,
            flush_rows,
            wake: Notify::new(),
            committed: watch::Sender::new(0),
            committed_waiters: AtomicUsize::new(0),
            urgent: AtomicBool::new(false),
            rows_committed: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            outcomes: watch::Sender::new(0),
            inflight: Mutex::new(None),
            commit_epoch: AtomicU64::new(0),
            commit_in_doubt: AtomicBool::new(false),
            pending_ids: AtomicUsize::new(0),
            spare_ids: Mutex::new(Vec::new()),
            gate: tokio::sync::Mutex::new(()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Pending entries: open shards plus the batch being flushed.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Pending events with an id (bounded apart from the entries).
    pub fn pending_ids(&self) -> usize {
        self.pending_ids.load(Ordering::Relaxed)
    }

    /// Takes room for `n` entries from the bound, or refuses if they do not
    /// fit. The room counts as pending until the reservation merges (then
    /// only the entries it really added stay) or is dropped. Taken for every
    /// target group before any merge, so a refused request changes nothing;
    /// taken atomically, so concurrent requests never pass the bound with
    /// their entries.
    ///
    /// The bound (`buffer.max_pending_rows`) also counts the pending events
    /// with an id: one cannot be folded into a sum, so each is an event the
    /// batch carries (~140 bytes, like an entry) and a 16-byte set entry of
    /// the flush, not a row (it does not count towards `flush_rows`). The
    /// ids a merge adds may pass the bound by at most the request's own
    /// size (a soft bound for them). Half the bound in ids wakes the
    /// flusher, so one batch commits while the next fills.
    pub fn reserve(&self, n: usize) -> Result<Reservation<'_>, Full> {
        let before = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                p.checked_add(n)
                    .filter(|total| total + self.pending_ids() <= self.max_pending)
            })
            .map_err(|_| Full)?;
        if before < self.flush_rows && before + n >= self.flush_rows {
            self.wake.notify_one();
        }
        Ok(Reservation { buffer: self, n })
    }

    /// Merges deltas outside the bound (tests and tools; requests go
    /// through [`Self::reserve`]); returns the highest generation they went
    /// into.
    pub fn merge<'a>(&self, deltas: impl IntoIterator<Item = Delta<'a>>) -> u64 {
        let (generation, added) = self.merge_entries(NOT_ROUTED, deltas);
        let now = self.pending.fetch_add(added, Ordering::Relaxed) + added;
        if now >= self.flush_rows && now - added < self.flush_rows {
            self.wake.notify_one();
        }
        generation
    }

    /// Merges into the shards; returns the highest generation the deltas
    /// went into and how many new entries they created. `pending` is the
    /// caller's business.
    fn merge_entries<'a>(
        &self,
        routed_by: u64,
        deltas: impl IntoIterator<Item = Delta<'a>>,
    ) -> (u64, usize) {
        let mut generation = 0;
        let mut added = 0;
        for d in deltas {
            // Built before the shard's lock is taken.
            let id =
                d.id.map(|id| IdEvent::new(d.routing_key, id, d.minute, d.delta, d.dups.cloned()));
            let mut shard = self.shards[shard_of(d.ring_pos)].lock();
            generation = generation.max(shard.generation);
            shard.routed_by = shard.routed_by.min(routed_by);
            if let Some(event) = id {
                // Even when a copy of it is pending too: the cut's plan
                // finds the copies of an id ([`Plan::of`]'s repeats) and
                // the flush counts only the first. Looking each event up
                // here, in a set of every pending entry, missed the cache
                // for every event of a keyed load (a seventh of the
                // proxy's CPU) to find what the plan finds anyway.
                shard.ids.push(event);
                // Counted apart from the entries (`reserve`): an id is no
                // row of the flush, a 16-byte set entry. Under the shard's
                // lock, so a cut never takes an event not counted yet (its
                // commit subtracts what it took).
                let before = self.pending_ids.fetch_add(1, Ordering::Relaxed);
                if before + 1 == self.max_pending / 2 {
                    self.wake.notify_one();
                }
            }
            let delta = Sum::from(d.delta);
            let new_entry = match shard.counters.get_mut(d.routing_key) {
                Some(minutes) => minutes.add(d.minute, delta),
                None => {
                    shard
                        .counters
                        .insert(d.routing_key.into(), Minutes::one(d.minute, delta));
                    true
                }
            };
            if new_entry {
                shard.entries += 1;
                added += 1;
            }
        }
        (generation, added)
    }

    /// Cuts the open shards into a batch (the flusher's job). The batch
    /// stays visible to strong reads until [`Self::committed`] or forever
    /// if the flusher keeps retrying it.
    pub fn cut(&self) -> Arc<Batch> {
        self.cut_with(None)
    }

    /// [`Self::cut`] under the write-ahead log's fence (exclusive), so the
    /// batch holds exactly this group's records up to the LSN it notes.
    pub fn cut_with(&self, wal: Option<&Wal>) -> Arc<Batch> {
        // Strong reads that overlap a cut retry: deltas move from the open
        // shards to the in-flight batch one shard at a time.
        debug_assert!(
            self.inflight.lock().is_none(),
            "cut while a batch is in flight"
        );
        self.commit_epoch.fetch_add(1, Ordering::AcqRel);
        let mut maps = Vec::with_capacity(SHARDS);
        let mut entries = 0;
        let mut generation = 0;
        let fence = wal.map(|w| w.cut_fence());
        let mut routed_by = NOT_ROUTED;
        let mut ids = self.id_list_for(self.pending_ids());
        for shard in self.shards.iter() {
            let mut s = shard.lock();
            generation = s.generation;
            s.generation += 1;
            entries += std::mem::take(&mut s.entries);
            routed_by = routed_by.min(std::mem::replace(&mut s.routed_by, NOT_ROUTED));
            maps.push(std::mem::take(&mut s.counters));
            if !s.ids.is_empty() {
                // Copied out, so that the shard keeps its list (its
                // memory faulted in already) for the next batch of a
                // keyed load, which is about as large.
                ids.append(&mut s.ids);
                s.ids.shrink_to(KEPT_IDS_PER_SHARD);
            }
        }
        // Sized once: a batch held through a master outage carries no
        // doubling slack (and no shard lock is held while it is filled).
        let mut counters = Vec::with_capacity(maps.iter().map(HashMap::len).sum());
        for map in maps {
            counters.extend(map);
        }
        let wal_lsn = fence.map(|(_guard, lsn)| lsn).unwrap_or(0);
        counters.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let batch = Arc::new(Batch {
            generation,
            counters,
            entries,
            wal_lsn,
            seq: OnceLock::new(),
            routed_by,
            ids,
            id_plan: OnceLock::new(),
            parts: OnceLock::new(),
            committed_upto: AtomicUsize::new(0),
        });
        *self.inflight.lock() = Some(batch.clone());
        self.commit_epoch.fetch_add(1, Ordering::AcqRel);
        batch
    }

    /// An empty list for about `n` id'd events of a cut (in no particular
    /// order: the flush groups them by set, [`Batch::id_plan`]): the spare
    /// one when it is large enough. Never grown from the spare: a growing
    /// list is copied whole, capacity and all, into new memory.
    fn id_list_for(&self, n: usize) -> Vec<IdEvent> {
        if n == 0 {
            return Vec::new();
        }
        let spare = std::mem::take(&mut *self.spare_ids.lock());
        if spare.capacity() >= n + n / 8 {
            spare
        } else {
            // Twice the need, so later batches up to that size fit the
            // spare too (room never touched costs address space only).
            Vec::with_capacity(2 * n)
        }
    }

    /// Takes back a committed batch's id list (emptied) for a later cut,
    /// when nothing else holds the batch any more (a strong read may, for
    /// a moment: then the list is simply freed).
    pub fn recycle(&self, batch: Arc<Batch>) {
        let Ok(batch) = Arc::try_unwrap(batch) else {
            return;
        };
        let mut ids = batch.ids;
        if ids.capacity() == 0 {
            return;
        }
        ids.clear();
        let mut spare = self.spare_ids.lock();
        if ids.capacity() > spare.capacity() {
            *spare = ids;
        }
    }

    /// Marks the start of a COMMIT whose outcome decides whether the
    /// in-flight batch is in the database.
    pub fn commit_started(&self) {
        if self.commit_epoch.load(Ordering::Acquire).is_multiple_of(2) {
            self.commit_epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// This attempt's COMMIT got no answer: the batch may be in the
    /// database and is still pending, so strong reads wait until an
    /// attempt finds out ([`GroupBuffer::committed`],
    /// [`GroupBuffer::part_committed`], [`GroupBuffer::commit_refused`]).
    pub fn commit_ambiguous(&self) {
        if !self.commit_in_doubt.swap(true, Ordering::AcqRel) {
            telemetry::commit_in_doubt(&self.name, true);
        }
        self.commit_started();
    }

    /// An attempt found out whether the batch (or part) in doubt was
    /// applied.
    fn doubt_resolved(&self) {
        if self.commit_in_doubt.swap(false, Ordering::AcqRel) {
            telemetry::commit_in_doubt(&self.name, false);
        }
    }

    /// This attempt failed before its COMMIT was sent (or it was rolled
    /// back): even again, unless an earlier attempt's COMMIT is still in
    /// doubt. An attempt that failed proves nothing about that one (a
    /// master turned read-only after applying it refuses the retry's dedup
    /// row), and strong reads would count the batch twice, stored and
    /// pending.
    pub fn commit_not_applied(&self) {
        if self.commit_in_doubt.load(Ordering::Acquire) {
            return;
        }
        self.turn_even();
    }

    /// This attempt inserted the batch's dedup row and then rolled back
    /// (a reshard fence refused it): no attempt applied the batch, so an
    /// earlier doubt is resolved too.
    pub fn commit_refused(&self) {
        self.doubt_resolved();
        self.turn_even();
    }

    fn turn_even(&self) {
        if !self.commit_epoch.load(Ordering::Acquire).is_multiple_of(2) {
            self.commit_epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The parts of the in-flight `batch` up to its counter `upto` are in
    /// the database (committed, or found applied): strong reads stop
    /// adding them from the batch, in the same step as the commit's
    /// seqlock turns even again.
    pub fn part_committed(&self, batch: &Batch, upto: usize) {
        let _inflight = self.inflight.lock();
        batch.committed_upto.store(upto, Ordering::Release);
        self.doubt_resolved();
        // Even afterwards, and changed in any case: a part found applied
        // (no COMMIT of this attempt) may meet an even epoch, and a read
        // that began before must still see the change.
        let e = self.commit_epoch.load(Ordering::Acquire);
        let step = if e.is_multiple_of(2) { 2 } else { 1 };
        self.commit_epoch.fetch_add(step, Ordering::AcqRel);
    }

    /// The batch is in the database: drop it, release its pending entries
    /// and wake `ack=committed` waiters of its generation.
    pub fn committed(&self, batch: &Batch) {
        {
            let mut inflight = self.inflight.lock();
            *inflight = None;
            self.doubt_resolved();
            self.turn_even();
        }
        self.pending.fetch_sub(batch.entries, Ordering::Relaxed);
        self.pending_ids
            .fetch_sub(batch.ids.len(), Ordering::Relaxed);
        self.rows_committed
            .fetch_add(batch.entries as u64, Ordering::Relaxed);
        self.committed.send_replace(batch.generation);
        self.failing.store(false, Ordering::Relaxed);
        self.outcomes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees every later flush outcome of the group (a
    /// commit, which frees room, or a failed attempt).
    pub fn flush_outcomes(&self) -> watch::Receiver<u64> {
        self.outcomes.subscribe()
    }

    /// Whether the group's last flush attempt failed and none committed
    /// since: its buffer will not drain soon.
    pub fn flush_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// The batch cut but not yet committed, if any: what a restarted
    /// flusher must apply before it cuts another.
    pub fn in_flight(&self) -> Option<Arc<Batch>> {
        self.inflight.lock().clone()
    }

    /// Waits until the batch of `generation` (or a later one) committed.
    pub async fn wait_committed(&self, generation: u64) {
        let mut rx = self.committed.subscribe();
        self.committed_waiters.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
        let _ = rx.wait_for(|c| *c >= generation).await;
        self.committed_waiters.fetch_sub(1, Ordering::Relaxed);
    }

    /// Asks the flusher to cut a batch now (no linger, no interval) and
    /// returns the generation that batch will carry.
    pub fn request_flush(&self) -> u64 {
        let generation = self.shards[0].lock().generation;
        self.urgent.store(true, Ordering::Relaxed);
        self.wake.notify_one();
        generation
    }

    /// Consumes a pending [`Self::request_flush`].
    pub fn take_urgent(&self) -> bool {
        self.urgent.swap(false, Ordering::Relaxed)
    }

    /// Counts a failed flush attempt (the admin flush watches it).
    pub fn flush_failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.failing.store(true, Ordering::Relaxed);
        self.outcomes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Failed flush attempts since start.
    pub fn flush_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Entries committed since start (for `POST /admin/v1/flush`).
    pub fn entries_committed(&self) -> u64 {
        self.rows_committed.load(Ordering::Relaxed)
    }

    /// Whether someone waits for a commit (the flusher then lingers briefly
    /// instead of waiting a whole interval).
    pub fn has_committed_waiters(&self) -> bool {
        self.committed_waiters.load(Ordering::Relaxed) > 0
    }

    pub fn has_open_entries(&self) -> bool {
        self.shards.iter().any(|s| s.lock().entries > 0)
    }

    /// Epoch snapshot for a strong read; `None` while a commit is in flight
    /// (the caller retries).
    pub fn read_epoch(&self) -> Option<u64> {
        let e = self.commit_epoch.load(Ordering::Acquire);
        e.is_multiple_of(2).then_some(e)
    }

    pub fn epoch_unchanged(&self, epoch: u64) -> bool {
        self.commit_epoch.load(Ordering::Acquire) == epoch
    }

    /// Not yet committed `(minute, delta)` pairs of one counter (open and in
    /// flight; a minute may appear twice).
    pub fn pending_minutes(&self, routing_key: &[u8], ring_pos: u64) -> Vec<(i64, Sum)> {
        let mut out: Vec<(i64, Sum)> = {
            let shard = self.shards[shard_of(ring_pos)].lock();
            shard
                .counters
                .get(routing_key)
                .map(|m| m.iter().collect())
                .unwrap_or_default()
        };
        if let Some(b) = self.inflight.lock().as_ref()
            && let Some(minutes) = b.uncommitted(routing_key)
        {
            out.extend(minutes.iter());
        }
        out
    }

    /// The keys of `ns` that rank highest by their not yet committed sum
    /// over `[from, to)` minutes (all of them when `range` is `None`):
    /// sum descending, ties by key ascending, zero sums left out, only
    /// routing keys `keep` accepts. At most `n` come from the open shards
    /// and at most `n` from the batch in flight, each ranked by its sum in
    /// that part (a key in both parts sums the two: see
    /// [`Self::pending_sums`]).
    ///
    /// Meant for strong top-K reads, which need the few keys that pending
    /// deltas may push up, not every pending key. Each shard is scanned
    /// under its own lock (one at a time) with no allocation but for a key
    /// that enters the ranking; the ranking holds at most `n` keys, so a
    /// read's memory is bounded by `n`, whatever the buffer holds. The
    /// batch in flight is immutable and sorted: only its keys of `ns` are
    /// visited, under no lock.
    pub fn pending_top(
        &self,
        ns: &str,
        range: Option<(i64, i64)>,
        n: usize,
        keep: impl Fn(&[u8]) -> bool,
    ) -> PendingTop {
        let prefix = routing_key(ns, "");
        let mut open = Highest::new(n);
        for shard in self.shards.iter() {
            let shard = shard.lock();
            for (k, minutes) in shard.counters.iter() {
                if !k.starts_with(&prefix) {
                    continue;
                }
                let sum = sum_minutes(minutes, range);
                if sum != 0 && keep(k) {
                    open.offer(sum, &k[prefix.len()..]);
                }
            }
        }
        let mut flying = Highest::new(n);
        let batch = self.inflight.lock().clone();
        if let Some(b) = batch {
            let counters = b.uncommitted_counters();
            let from = counters.partition_point(|(k, _)| k.as_ref() < prefix.as_slice());
            let of_ns = counters[from..]
                .iter()
                .take_while(|(k, _)| k.starts_with(&prefix));
            for (k, minutes) in of_ns {
                let sum = sum_minutes(minutes, range);
                if sum != 0 && keep(k) {
                    flying.offer(sum, &k[prefix.len()..]);
                }
            }
        }
        let (mut keys, open_cut) = open.finish();
        let (more, flying_cut) = flying.finish();
        keys.extend(more);
        keys.sort_unstable();
        keys.dedup();
        PendingTop {
            keys,
            cuts: [open_cut, flying_cut],
        }
    }

    /// The pending sums of `keys` of `ns` (over `range`, or all time), by
    /// key: what strong multi-key reads add to the stored values.
    pub fn pending_sums(
        &self,
        ns: &str,
        keys: &[&str],
        range: Option<(i64, i64)>,
    ) -> Vec<(Vec<u8>, Sum)> {
        keys.iter()
            .map(|k| {
                let rk = routing_key(ns, k);
                let sum = self.pending_sum(&rk, ShardRing::position(&rk), range);
                (k.as_bytes().to_vec(), sum)
            })
            .collect()
    }

    /// Not yet committed deltas of one counter, in `[from, to)` minutes or
    /// all of them.
    pub fn pending_sum(&self, routing_key: &[u8], ring_pos: u64, range: Option<(i64, i64)>) -> Sum {
        let open = {
            let shard = self.shards[shard_of(ring_pos)].lock();
            shard
                .counters
                .get(routing_key)
                .map_or(0, |m| sum_minutes(m, range))
        };
        let inflight = self
            .inflight
            .lock()
            .as_ref()
            .map_or(0, |b| b.sum(routing_key, range));
        open + inflight
    }
}

fn shard_of(ring_pos: u64) -> usize {
    // The low bits of FNV are well mixed; the ring uses the whole value.
    (ring_pos as usize) & (SHARDS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(key: &[u8], minute: i64, delta: i64) -> Delta<'_> {
        Delta {
            routing_key: key,
            ring_pos: tally_admin::ShardRing::position(key),
            minute,
            delta,
            id: None,
            dups: None,
        }
    }

    #[test]
    fn reservations_hold_the_bound_and_release_what_they_do_not_use() {
        let b = GroupBuffer::new("g0", 10, 10);
        let r = b.reserve(4).expect("room");
        assert_eq!(b.pending(), 4, "reserved room counts as pending");
        assert_eq!(b.reserve(7).err(), Some(Full));
        // Two deltas into one entry: 3 of the 4 reserved are released.
        r.merge(1, [d(b"a\0x", 60, 1), d(b"a\0x", 60, 2)]);
        assert_eq!(b.pending(), 1);
        let r = b.reserve(9).expect("exactly the bound");
        assert_eq!(b.reserve(1).err(), Some(Full));
        drop(r);
        assert_eq!(b.pending(), 1, "an unused reservation is released");

        // Many threads reserving at once never pass the bound together.
        let b = Arc::new(GroupBuffer::new("g1", 1000, 1000));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut taken = 0;
                    for i in 0..1000 {
                        let key = format!("a\0{t}-{i}");
                        if let Ok(r) = b.reserve(1) {
                            r.merge(1, [d(key.as_bytes(), 60, 1)]);
                            taken += 1;
                        }
                        assert!(b.pending() <= 1000);
                    }
                    taken
                })
            })
            .collect();
        let taken: usize = threads.into_iter().map(|t| t.join().expect("thread")).sum();
        assert_eq!((taken, b.pending()), (1000, 1000));
    }

    #[test]
    fn shard_maps_hash_keys_with_a_secret_seed() {
        // A fixed hash lets clients compute colliding keys offline; two
        // maps (and two processes) must hash the same key differently.
        use std::hash::BuildHasher;
        let (a, b) = (KeyHasher::default(), KeyHasher::default());
        let key: &[u8] = b"views\0BV1xx411c7mD";
        assert_ne!(a.hash_one(key), b.hash_one(key));
        assert_eq!(a.hash_one(key), a.hash_one(key), "stable within a map");
    }

    #[test]
    fn sums_past_64_bits_are_kept_exactly() {
        let b = GroupBuffer::new("g0", 100, 50);
        b.merge([d(b"a\0x", 60, i64::MAX), d(b"a\0x", 60, 2)]);
        b.merge([d(b"a\0x", 60, i64::MAX)]);
        let pos = tally_admin::ShardRing::position(b"a\0x");
        let minutes = b.pending_minutes(b"a\0x", pos);
        assert!(minutes.iter().all(|(m, _)| *m == 60));
        let sum: Sum = minutes.iter().map(|(_, d)| d).sum();
        assert_eq!(sum, 2 * i128::from(i64::MAX) + 2, "{minutes:?}");
    }

    #[test]
    fn merges_by_counter_and_minute_and_counts_entries() {
        let b = GroupBuffer::new("g0", 100, 50);
        let g = b.merge([
            d(b"a\0x", 60, 1),
            d(b"a\0x", 60, 2),
            d(b"a\0x", 120, -1),
            d(b"a\0y", 60, 5),
        ]);
        assert_eq!(g, 1);
        assert_eq!(b.pending(), 3);
        let batch = b.cut();
        assert_eq!(batch.entries, 3);
        assert_eq!(batch.generation, 1);
        let keys: Vec<&[u8]> = batch.counters.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(
            keys,
            [b"a\0x".as_slice(), b"a\0y".as_slice()],
            "sorted by routing key"
        );
        let mut x: Vec<(i64, Sum)> = batch.counters[0].1.iter().collect();
        x.sort();
        assert_eq!(x, [(60, 3), (120, -1)]);
        // Still pending until committed; new writes go to generation 2.
        assert_eq!(b.pending(), 3);
        assert_eq!(b.merge([d(b"a\0x", 60, 1)]), 2);
        b.committed(&batch);
        assert_eq!(b.pending(), 1);
    }

    /// A batch carries the oldest ring version its deltas were routed by,
    /// whichever shard they went to, and the next batch starts afresh.
    #[test]
    fn a_batch_knows_the_oldest_ring_that_routed_into_it() {
        let b = GroupBuffer::new("g0", 100, 50);
        b.reserve(1).expect("room").merge(7, [d(b"a\0x", 60, 1)]);
        b.reserve(1).expect("room").merge(5, [d(b"a\0q", 60, 1)]);
        b.reserve(1).expect("room").merge(9, [d(b"a\0x", 60, 1)]);
        let batch = b.cut();
        assert_eq!(batch.routed_by, 5);
        b.committed(&batch);
        b.reserve(1).expect("room").merge(9, [d(b"a\0x", 60, 1)]);
        let batch = b.cut();
        assert_eq!(batch.routed_by, 9, "the older routing went with its batch");
        b.committed(&batch);
        b.merge([d(b"a\0x", 60, 1)]);
        assert_eq!(b.cut().routed_by, NOT_ROUTED, "merged outside a request");
    }

    /// A batch applied in parts: the counters of a committed part leave
    /// the pending sums (their rows are in the database), the others stay,
    /// and the seqlock turns even with it.
    #[test]
    fn committed_parts_leave_the_pending_sums() {
        let b = GroupBuffer::new("g0", 100, 50);
        b.merge([d(b"v\0a", 60, 1), d(b"v\0b", 60, 2), d(b"v\0c", 60, 4)]);
        let batch = b.cut();
        let pos = |k: &[u8]| tally_admin::ShardRing::position(k);
        assert_eq!(b.pending_sum(b"v\0a", pos(b"v\0a"), None), 1);
        b.commit_started();
        assert!(b.read_epoch().is_none(), "a part's COMMIT in flight");
        b.part_committed(&batch, 1);
        let even = b.read_epoch().expect("even again");
        // A part found applied without a COMMIT of its own, the epoch even:
        // still a change for a read that began before.
        b.part_committed(&batch, 2);
        assert!(!b.epoch_unchanged(even) && b.read_epoch().is_some());
        assert_eq!(b.pending_sum(b"v\0a", pos(b"v\0a"), None), 0);
        assert_eq!(b.pending_sum(b"v\0b", pos(b"v\0b"), None), 0);
        assert_eq!(b.pending_sum(b"v\0c", pos(b"v\0c"), None), 4);
        assert!(b.pending_minutes(b"v\0b", pos(b"v\0b")).is_empty());
        assert_eq!(b.pending_minutes(b"v\0c", pos(b"v\0c")), vec![(60, 4)]);
        let top = b.pending_top("v", None, 10, |_| true);
        assert_eq!(top.keys, vec![b"c".to_vec()]);
        b.committed(&batch);
        assert_eq!(b.pending_sum(b"v\0c", pos(b"v\0c"), None), 0);
    }

    /// Half the bound in ids pending wakes the flusher (the next batch
    /// fills while one commits), far below `flush_rows` entries.
    #[test]
    fn half_the_id_bound_pending_wakes_the_flusher() {
        use futures::FutureExt;
        let b = GroupBuffer::new("g0", 100, 1000);
        let ids: Vec<Vec<u8>> = (0..50).map(|i| format!("r/{i}").into_bytes()).collect();
        let with_id = |id: &'static [u8]| Delta {
            id: Some(id),
            ..d(b"v\0a", 60, 1)
        };
        let ids: &'static [Vec<u8>] = Box::leak(ids.into_boxed_slice());
        b.merge(ids[..49].iter().map(|id| with_id(id)));
        assert_eq!(
            b.pending(),
            1,
            "one counter-minute; the ids are counted apart"
        );
        assert!(b.wake.notified().now_or_never().is_none(), "not yet");
        b.merge([with_id(&ids[49])]);
        assert!(
            b.wake.notified().now_or_never().is_some(),
            "50 ids: half of the bound of 100"
        );
    }

    /// A committed batch's id list serves the next cut (its memory is
    /// already faulted in), unless something still holds the batch.
    #[test]
    fn the_next_cut_reuses_a_committed_batch_s_id_list() {
        let b = GroupBuffer::new("g0", 10_000, 10_000);
        let ids: Vec<Vec<u8>> = (0..100).map(|i| format!("r/{i}").into_bytes()).collect();
        let ids: &'static [Vec<u8>] = Box::leak(ids.into_boxed_slice());
        let with_id = |id: &'static [u8]| Delta {
            id: Some(id),
            ..d(b"v\0a", 60, 1)
        };
        b.merge(ids.iter().map(|id| with_id(id)));
        let first = b.cut();
        let capacity = first.ids.capacity();
        assert!(capacity >= 100);
        b.committed(&first);
        b.recycle(first);
        b.merge(ids[..3].iter().map(|id| with_id(id)));
        let second = b.cut();
        assert_eq!(second.ids.len(), 3);
        assert_eq!(second.ids.capacity(), capacity, "the same list");
        b.committed(&second);
        let held = second.clone();
        b.recycle(second);
        b.merge([with_id(&ids[5])]);
        assert!(
            b.cut().ids.capacity() < capacity,
            "held elsewhere: not taken"
        );
        drop(held);
    }

    /// A short key lives in the event, a long one on the heap; both give
    /// back the same routing key, id and identity.
    #[test]
    fn an_id_event_s_key_is_the_same_inline_or_on_the_heap() {
        for id_len in [1, INLINE_KEY - 5, INLINE_KEY - 4, INLINE_KEY - 3, 128] {
            let id = vec![b'i'; id_len];
            let e = IdEvent::new(b"v\0a", &id, 60, 1, None);
            assert_eq!(
                matches!(e.key, IdKey::Inline { .. }),
                3 + 1 + id_len <= INLINE_KEY,
                "{id_len}"
            );
            assert_eq!(e.routing_key(), b"v\0a");
            assert_eq!(e.id(), id.as_slice());
            assert_eq!(e.identity(), [b"v\0a".as_slice(), b"\0", &id].concat());
        }
        assert_eq!(std::mem::size_of::<IdKey>(), 88);
        assert_eq!(
            std::mem::size_of::<IdEvent>(),
            136,
            "as KEPT_IDS_PER_SHARD says"
        );
    }

    /// Two copies of an id pending in one buffer both go into the batch
    /// (with their deltas in the sums, which strong reads add as if new),
    /// and the batch's plan names the later copy a repeat: the flush
    /// counts the first only. The same id on another counter is another
    /// event.
    #[test]
    fn copies_of_an_id_in_the_buffer_are_repeats_in_the_batch_s_plan() {
        let b = GroupBuffer::new("g0", 100, 50);
        let slot = Duplicates::default();
        let with_id = |key: &'static [u8], id: &'static [u8], delta| Delta {
            id: Some(id),
            dups: Some(&slot),
            ..d(key, 60, delta)
        };
        b.merge([
            with_id(b"v\0b", b"x", 5),
            with_id(b"v\0a", b"y", 2),
            with_id(b"v\0a", b"x", 3),
            d(b"v\0a", 60, 10),
        ]);
        b.merge([with_id(b"v\0a", b"x", 3), with_id(b"v\0b", b"x", 5)]);
        assert_eq!(slot.load(Ordering::Relaxed), 0, "told at the commit");
        let pos = tally_admin::ShardRing::position(b"v\0a");
        assert_eq!(b.pending_sum(b"v\0a", pos, None), 18, "copies as if new");
        let batch = b.cut();
        let ids: Vec<(&[u8], &[u8], i64)> = batch
            .ids
            .iter()
            .map(|e| (e.routing_key(), e.id(), e.delta))
            .collect();
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            vec![
                (b"v\0a".as_slice(), b"x".as_slice(), 3),
                (b"v\0a".as_slice(), b"x".as_slice(), 3),
                (b"v\0a".as_slice(), b"y".as_slice(), 2),
                (b"v\0b".as_slice(), b"x".as_slice(), 5),
                (b"v\0b".as_slice(), b"x".as_slice(), 5),
            ]
        );
        // The repeats are the later copies of v/a x and v/b x.
        let repeats = &batch.id_plan().repeats;
        assert_eq!(repeats.len(), 2);
        for &r in repeats {
            assert!(
                ids[..r].contains(&ids[r]),
                "{:?} repeats an earlier event",
                ids[r]
            );
        }
        // 2 entries and 5 ids pending: the bound of 100 shares them.
        assert!(b.reserve(94).is_err(), "entries and ids share the bound");
        assert!(b.reserve(93).is_ok());
        b.committed(&batch);
        assert_eq!(b.pending(), 0, "id entries are released with the batch");
        assert!(
            b.reserve(101).is_err(),
            "bounded by max_pending, with the entries"
        );
        assert!(b.reserve(100).is_ok());
    }

    #[test]
    fn bound_refuses_before_merging() {
        let b = GroupBuffer::new("g0", 2, 1);
        let room = b.reserve(2).expect("room for 2");
        room.merge(1, [d(b"a\0x", 60, 1), d(b"a\0y", 60, 1)]);
        // Merging into an existing entry needs no room but the check is
        // conservative: it counts events, not new entries.
        assert_eq!(b.reserve(1).err(), Some(Full));
        assert_eq!(b.pending(), 2);
    }

    #[test]
    fn pending_sum_sees_open_and_inflight_deltas() {
        let b = GroupBuffer::new("g0", 100, 50);
        let key = b"v\0k";
        let pos = tally_admin::ShardRing::position(key);
        b.merge([d(key, 60, 4), d(key, 180, 1)]);
        let batch = b.cut();
        b.merge([d(key, 60, 10)]);
        assert_eq!(b.pending_sum(key, pos, None), 15);
        assert_eq!(b.pending_sum(key, pos, Some((0, 120))), 14);
        b.committed(&batch);
        assert_eq!(b.pending_sum(key, pos, None), 10);
    }

    fn keys(v: &[&str]) -> Vec<Vec<u8>> {
        v.iter().map(|k| k.as_bytes().to_vec()).collect()
    }

    fn cut(sum: Sum, key: &str) -> Option<(Sum, Vec<u8>)> {
        Some((sum, key.as_bytes().to_vec()))
    }

    #[test]
    fn pending_top_ranks_one_namespace_by_sum_then_key_and_says_where_it_cut() {
        let b = GroupBuffer::new("g0", 1000, 1000);
        b.merge([
            d(b"v\0a", 60, 5),
            d(b"v\0b", 120, 5),
            d(b"v\0c", 60, 3),
            d(b"v\0d", 60, -2),
            d(b"v\0e", 60, -3),
            // Deltas that cancel: a zero sum is nothing to rank.
            d(b"v\0z", 60, 7),
            d(b"v\0z", 60, -7),
            // Other namespaces, one of them a prefix of "vx".
            d(b"w\0x", 60, 100),
            d(b"vx\0y", 60, 50),
        ]);
        let all = |_: &[u8]| true;
        let top = b.pending_top("v", None, 10, all);
        assert_eq!(top.keys, keys(&["a", "b", "c", "d", "e"]));
        assert_eq!(top.cuts, [None, None], "nothing was left out");
        // Ties by key ascending; what was left out ranks below the cut.
        let top = b.pending_top("v", None, 1, all);
        assert_eq!((top.keys, top.cuts), (keys(&["a"]), [cut(5, "a"), None]));
        let top = b.pending_top("v", None, 3, all);
        assert_eq!(
            (top.keys, top.cuts),
            (keys(&["a", "b", "c"]), [cut(3, "c"), None])
        );
        // Negative sums rank last.
        let top = b.pending_top("v", None, 4, all);
        assert_eq!(
            (top.keys, top.cuts),
            (keys(&["a", "b", "c", "d"]), [cut(-2, "d"), None])
        );
        // Over a range of minutes, and only keys `keep` accepts.
        let top = b.pending_top("v", Some((120, 180)), 10, all);
        assert_eq!((top.keys, top.cuts), (keys(&["b"]), [None, None]));
        let top = b.pending_top("v", None, 2, |rk: &[u8]| rk != b"v\0a");
        assert_eq!(
            (top.keys, top.cuts),
            (keys(&["b", "c"]), [cut(3, "c"), None])
        );

        // The batch in flight is ranked on its own; a key in both parts is
        // listed once.
        let batch = b.cut();
        b.merge([d(b"v\0c", 60, 10), d(b"v\0f", 60, 1), d(b"v\0g", 60, 2)]);
        let top = b.pending_top("v", None, 2, all);
        assert_eq!(top.keys, keys(&["a", "b", "c", "g"]));
        assert_eq!(top.cuts, [cut(2, "g"), cut(5, "b")]);
        b.committed(&batch);
        let top = b.pending_top("v", None, 2, all);
        assert_eq!(
            (top.keys, top.cuts),
            (keys(&["c", "g"]), [cut(2, "g"), None])
        );
    }

    #[test]
    fn pending_top_holds_n_keys_of_a_large_buffer_the_highest_ones() {
        let b = GroupBuffer::new("g0", 1 << 20, 1 << 20);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut sums: Vec<(Sum, Vec<u8>)> = Vec::new();
        for i in 0..10_000 {
            let key = format!("k{i:05}");
            let delta = rng.i64(-1000..=1000);
            b.merge([d(format!("v\0{key}").as_bytes(), 60, delta)]);
            if delta != 0 {
                sums.push((Sum::from(delta), key.into_bytes()));
            }
        }
        sums.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let top = b.pending_top("v", None, 10, |_| true);
        let mut want: Vec<Vec<u8>> = sums[..10].iter().map(|(_, k)| k.clone()).collect();
        want.sort();
        assert_eq!(top.keys, want);
        assert_eq!(top.cuts[0], Some(sums[9].clone()));
    }

    #[test]
    fn epoch_is_odd_while_commit_outcome_is_unknown() {
        let b = GroupBuffer::new("g0", 100, 50);
        let e = b.read_epoch().expect("even at start");
        let batch = b.cut();
        assert!(!b.epoch_unchanged(e), "a cut changes the epoch");
        b.commit_started();
        assert_eq!(b.read_epoch(), None);
        b.commit_started(); // a retry of an ambiguous commit keeps it odd
        assert_eq!(b.read_epoch(), None);
        b.committed(&batch);
        assert!(b.read_epoch().is_some());
        assert!(!b.epoch_unchanged(e));
    }

    #[test]
    fn a_commit_in_doubt_stays_odd_until_an_attempt_finds_out() {
        let b = GroupBuffer::new("g0", 100, 50);
        let batch = b.cut();
        // A COMMIT whose answer was lost, then a retry that failed before
        // its own COMMIT: the first may still have applied the batch.
        b.commit_started();
        b.commit_ambiguous();
        b.commit_not_applied();
        assert_eq!(b.read_epoch(), None, "still in doubt");
        // A retry refused after its dedup row: nothing was applied.
        b.commit_refused();
        assert!(b.read_epoch().is_some());
        // Without a doubt, a failed attempt turns it even at once.
        b.commit_started();
        b.commit_not_applied();
        assert!(b.read_epoch().is_some());
        // A doubt is also ended by the batch (or a part) found applied.
        b.commit_started();
        b.commit_ambiguous();
        b.part_committed(&batch, 0);
        b.commit_not_applied();
        assert!(b.read_epoch().is_some());
        b.commit_started();
        b.commit_ambiguous();
        b.committed(&batch);
        let e = b.read_epoch().expect("even once committed");
        b.commit_not_applied();
        assert!(b.epoch_unchanged(e));
    }

    #[tokio::test]
    async fn committed_waiters_wake_on_their_generation() {
        let b = Arc::new(GroupBuffer::new("g0", 100, 50));
        let g = b.merge([d(b"a\0x", 60, 1)]);
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.wait_committed(g).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let batch = b.cut();
        b.committed(&batch);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("joined");
    }
}
