//! The bounded-staleness cache of eventual totals.
//!
//! An eventual read may already be as old as the flush interval plus the
//! replica's lag; keeping its answer for a short `max_age` adds at most
//! that to the bound and lets a counter read by many clients (a hot key)
//! cost one statement per `max_age` instead of one per read.
//!
//! - An entry is served only while younger than `max_age`, counted from
//!   when its read was *sent* (what the replica showed can only be older).
//! - This proxy's own commits forget the counters they touched, and a read
//!   sent before such a forget is not stored afterwards: once a batch of
//!   this proxy committed, no value read before that commit is served
//!   from here.
//! - Strong reads never look here (the caller's rule; `engine::reads`).
//! - Memory is bounded by entries and bytes, per shard; a full shard first
//!   drops its expired entries, then refuses new ones until some expire.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::ReadCacheConfig;
use crate::domain::role::Role;

const SHARDS: usize = 16;

/// What an entry costs beyond its key: the map slot, the value, the
/// instant, the role and the key's allocation header.
const ENTRY_OVERHEAD: usize = 64;

#[derive(Clone, Copy)]
struct Entry {
    value: i64,
    role: Role,
    sent: Instant,
}

struct Shard {
    map: HashMap<Vec<u8>, Entry, foldhash::fast::RandomState>,
    bytes: usize,
    /// The last time this proxy's commit forgot counters of this shard:
    /// reads sent before it are not stored.
    forgot: Option<Instant>,
    last_sweep: Option<Instant>,
}

/// A value served from the cache and how old it is.
pub struct Hit {
    pub value: i64,
    pub role: Role,
    pub age: Duration,
}

/// See the module documentation. Keyed by routing key (`ns 0x00 key`).
pub struct ReadCache {
    shards: Vec<Mutex<Shard>>,
    max_age: Duration,
    shard_entries: usize,
    shard_bytes: usize,
}

fn shard_of(rk: &[u8]) -> usize {
    // FNV-1a of the key: the shard only spreads the locks.
    let mut h: u32 = 0x811c_9dc5;
    for b in rk {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    h as usize % SHARDS
}

impl ReadCache {
    pub fn new(cfg: &ReadCacheConfig) -> ReadCache {
        ReadCache {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::default(),
                        bytes: 0,
                        forgot: None,
                        last_sweep: None,
                    })
                })
                .collect(),
            max_age: cfg.max_age,
            shard_entries: cfg.max_entries.div_ceil(SHARDS).max(1),
            shard_bytes: cfg.max_bytes.div_ceil(SHARDS).max(1),
        }
    }

    /// The value of `rk` if one younger than `max_age` is held.
    pub fn get(&self, rk: &[u8], now: Instant) -> Option<Hit> {
        let shard = self.shards[shard_of(rk)].lock();
        let e = shard.map.get(rk)?;
        let age = now.saturating_duration_since(e.sent);
        (age < self.max_age).then_some(Hit {
            value: e.value,
            role: e.role,
            age,
        })
    }

    /// Keeps `value` of `rk`, read by a statement sent at `sent`, unless a
    /// newer read is held, this proxy committed to the shard's counters
    /// since, it is already too old, or the shard is full of live entries.
    pub fn put(&self, rk: &[u8], value: i64, role: Role, sent: Instant, now: Instant) {
        if now.saturating_duration_since(sent) >= self.max_age {
            return;
        }
        let mut shard = self.shards[shard_of(rk)].lock();
        if shard.forgot.is_some_and(|f| sent <= f) {
            return;
        }
        let entry = Entry { value, role, sent };
        if let Some(e) = shard.map.get_mut(rk) {
            if e.sent < sent {
                *e = entry;
            }
            return;
        }
        let cost = rk.len() + ENTRY_OVERHEAD;
        if shard.map.len() >= self.shard_entries || shard.bytes + cost > self.shard_bytes {
            self.sweep(&mut shard, now);
            if shard.map.len() >= self.shard_entries || shard.bytes + cost > self.shard_bytes {
                return;
            }
        }
        shard.bytes += cost;
        shard.map.insert(rk.to_vec(), entry);
    }

    /// Drops expired entries, at most once per quarter of `max_age` per
    /// shard (a shard full of live entries is not scanned on every put).
    fn sweep(&self, shard: &mut Shard, now: Instant) {
        if shard
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < self.max_age / 4)
        {
            return;
        }
        shard.last_sweep = Some(now);
        let max_age = self.max_age;
        let mut freed = 0;
        shard.map.retain(|k, e| {
            let keep = now.saturating_duration_since(e.sent) < max_age;
            if !keep {
                freed += k.len() + ENTRY_OVERHEAD;
            }
            keep
        });
        shard.bytes -= freed;
    }

    /// Forgets the counters a batch of this proxy committed (their routing
    /// keys), called once the commit is known; reads sent before `now` are
    /// no longer stored for any counter of the shards touched. Returns how
    /// many entries were dropped.
    pub fn forget<'k>(&self, rks: impl IntoIterator<Item = &'k [u8]>, now: Instant) -> usize {
        let mut by_shard: Vec<Vec<&[u8]>> = vec![Vec::new(); SHARDS];
        for rk in rks {
            by_shard[shard_of(rk)].push(rk);
        }
        let mut dropped = 0;
        for (i, keys) in by_shard.into_iter().enumerate() {
            if keys.is_empty() {
                continue;
            }
            let mut shard = self.shards[i].lock();
            shard.forgot = Some(now);
            for rk in keys {
                if shard.map.remove(rk).is_some() {
                    shard.bytes -= rk.len() + ENTRY_OVERHEAD;
                    dropped += 1;
                }
            }
        }
        dropped
    }

    /// Entries held (live or not yet swept).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(entries: usize) -> ReadCache {
        ReadCache::new(&ReadCacheConfig {
            max_age: Duration::from_millis(100),
            max_entries: entries,
            max_bytes: 1 << 20,
        })
    }

    #[test]
    fn an_entry_is_served_only_while_younger_than_max_age_from_when_it_was_sent() {
        let c = cache(1000);
        let t0 = Instant::now();
        c.put(b"n\0k", 7, Role::Replica, t0, t0 + Duration::from_millis(5));
        let hit = c
            .get(b"n\0k", t0 + Duration::from_millis(99))
            .expect("fresh");
        assert_eq!((hit.value, hit.role), (7, Role::Replica));
        assert_eq!(hit.age, Duration::from_millis(99));
        assert!(c.get(b"n\0k", t0 + Duration::from_millis(100)).is_none());
        // An answer that arrives already too old is not kept.
        c.put(
            b"n\0x",
            1,
            Role::Replica,
            t0,
            t0 + Duration::from_millis(150),
        );
        assert!(c.get(b"n\0x", t0 + Duration::from_millis(150)).is_none());
    }

    #[test]
    fn a_newer_read_replaces_an_older_one_never_the_reverse() {
        let c = cache(1000);
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(10);
        c.put(b"k", 5, Role::Replica, t1, t1);
        c.put(b"k", 4, Role::Replica, t0, t1);
        assert_eq!(c.get(b"k", t1).map(|h| h.value), Some(5));
        let t2 = t1 + Duration::from_millis(1);
        c.put(b"k", 6, Role::Master, t2, t2);
        assert_eq!(c.get(b"k", t2).map(|h| h.value), Some(6));
    }

    #[test]
    fn a_commit_forgets_its_counters_and_refuses_reads_sent_before_it() {
        let c = cache(1000);
        let t0 = Instant::now();
        c.put(b"a", 1, Role::Replica, t0, t0);
        c.put(b"b", 1, Role::Replica, t0, t0);
        let commit = t0 + Duration::from_millis(2);
        assert_eq!(c.forget([b"a".as_slice()], commit), 1);
        assert!(c.get(b"a", commit).is_none());
        assert_eq!(c.get(b"b", commit).map(|h| h.value), Some(1));
        // A read of `a` sent before the commit and answered after it.
        c.put(
            b"a",
            1,
            Role::Replica,
            t0 + Duration::from_millis(1),
            commit,
        );
        assert!(c.get(b"a", commit).is_none());
        let later = commit + Duration::from_millis(1);
        c.put(b"a", 2, Role::Replica, later, later);
        assert_eq!(c.get(b"a", later).map(|h| h.value), Some(2));
    }

    #[test]
    fn memory_is_bounded_and_expired_entries_make_room() {
        let c = cache(SHARDS);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            c.put(&i.to_be_bytes(), 1, Role::Replica, t0, t0);
        }
        assert!(c.len() <= SHARDS, "one entry per shard at most");
        let later = t0 + Duration::from_millis(200);
        for i in 10_000..20_000u32 {
            c.put(&i.to_be_bytes(), 2, Role::Replica, later, later);
        }
        assert!(c.len() <= SHARDS);
        assert!(!c.is_empty(), "expired entries were swept for new ones");
        let bytes = ReadCache::new(&ReadCacheConfig {
            max_age: Duration::from_secs(1),
            max_entries: 1_000_000,
            max_bytes: SHARDS * (ENTRY_OVERHEAD + 4),
        });
        for i in 0..10_000u32 {
            bytes.put(&i.to_be_bytes(), 1, Role::Replica, t0, t0);
        }
        assert!(bytes.len() <= SHARDS, "the byte bound holds too");
    }
}
