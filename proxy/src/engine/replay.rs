//! Replaying the logs of earlier lives after a crash.
//!
//! Each earlier life's records are read back, split per group, and applied
//! per group by `db::replay`: one transaction that takes a locking read of
//! the group's `wal_applied` LSN for that life (waiting for a COMMIT the
//! dead process may still have in flight), applies only the records above
//! it, and raises it. A repeated replay (a crash during replay, a lost
//! COMMIT answer) therefore applies nothing twice.
//!
//! A record is replayed to the group that accepted it, unless its key
//! belongs to another group now (a reshard ran while the proxy was down):
//! then to that owner, first, in a transaction that raises the owner's own
//! mark for them (`>group`), so they too are applied exactly once.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use fnv::FnvBuildHasher;

use crate::app::App;
use crate::storage::buffer::{Batch, IdEvent, Minutes, Sum};
use crate::storage::db;
use crate::storage::shard_map::ShardMap;
use crate::storage::wal::lives::OldLife;
use crate::storage::wal::record::OwnedDelta;
use crate::telemetry;

/// Replays every earlier life, each group until it is applied; removes a
/// life's directory once all its groups are. Returns when everything is
/// replayed or, for a group gone from the topology, reported.
pub async fn run(app: Arc<App>, lives: Vec<OldLife>) {
    for life in lives {
        let entries = life.entries();
        tracing::info!(life = %life.writer_id, entries, groups = life.groups.len(), "replaying the write-ahead log of an earlier life");
        let mut all_done = true;
        for (group, records) in &life.groups {
            if !replay_group(&app, &life, group, records).await {
                all_done = false;
            }
        }
        if all_done {
            match std::fs::remove_dir_all(&life.dir) {
                Ok(()) => {
                    tracing::info!(life = %life.writer_id, entries, "write-ahead log replayed and removed")
                }
                Err(e) => {
                    tracing::warn!(dir = %life.dir.display(), error = %e, "replayed, but cannot remove the directory; the next start replays it again as a no-op")
                }
            }
        }
    }
}

/// Applies one group's records of one life, retrying until done. Returns
/// false when the group is not in the topology (kept for the operator).
async fn replay_group(
    app: &App,
    life: &OldLife,
    group: &str,
    records: &[(u64, OwnedDelta)],
) -> bool {
    let cfg = &app.config.buffer;
    let mut backoff = cfg.retry_min;
    loop {
        let map = app.map.load_full();
        let Some(handle) = map.group(group) else {
            tracing::error!(life = %life.writer_id, group, dir = %life.dir.display(), "the write-ahead log holds records of a group that is not in the topology; kept, not replayed");
            telemetry::wal_replay_stuck();
            return false;
        };
        let attempt = async {
            // No replay while the group's masters change (like a flush).
            let _gate = handle.buffer.gate.lock().await;
            let mut conn = handle
                .master_conn(app.config.pool.connect_timeout)
                .await
                .map_err(db::FlushError::NotApplied)?;
            // Records of keys that moved while this proxy was down go to
            // their owners first, each owner keeping a mark of its own for
            // them; the group's own transaction then skips them.
            let applied_here = db::applied_lsn(&mut conn, &life.writer_id, group)
                .await
                .map_err(db::FlushError::NotApplied)?;
            move_orphans(app, &map, life, group, applied_here, records).await?;
            db::replay(
                &mut conn,
                handle.max_packet(),
                &life.writer_id,
                group,
                |applied| {
                    let split = split(&map, group, applied, records);
                    Ok(db::ReplayPlan {
                        orphans: split.orphans.len(),
                        last_lsn: split.last_lsn,
                        batch: split.batch,
                    })
                },
            )
            .await
        };
        match tokio::time::timeout(Duration::from_secs(60), attempt).await {
            Ok(Ok(done)) => {
                tracing::info!(life = %life.writer_id, group, applied_entries = done.entries, rows = done.rows, orphaned = done.orphans, already_applied_through = done.applied_before, duplicates = done.duplicates, "replayed");
                telemetry::duplicate_events(group, "store", done.duplicates);
                telemetry::wal_replayed(done.entries);
                telemetry::quarantined(group, done.held.deltas);
                return true;
            }
            Ok(Err(e)) => {
                tracing::warn!(life = %life.writer_id, group, error = %e, retry_in_ms = backoff.as_millis() as u64, "WAL replay failed; will retry")
            }
            Err(_) => {
                tracing::warn!(life = %life.writer_id, group, "WAL replay attempt timed out; will retry")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(cfg.retry_max);
    }
}

/// What a replay transaction applies: the batch of records above
/// `applied` whose keys the group still owns, those it no longer owns, and
/// the highest LSN of them all.
pub struct Split {
    pub batch: Batch,
    pub orphans: Vec<OwnedDelta>,
    pub last_lsn: u64,
}

fn split(map: &ShardMap, group: &str, applied: u64, records: &[(u64, OwnedDelta)]) -> Split {
    let mut counters: HashMap<&[u8], Minutes> = HashMap::new();
    let mut orphans = Vec::new();
    let mut last_lsn = applied;
    let mut entries = 0;
    let mut ids = Vec::new();
    for (lsn, d) in records.iter().filter(|(lsn, _)| *lsn > applied) {
        last_lsn = last_lsn.max(*lsn);
        let owner = map
            .ring
            .owner(&d.routing_key)
            .map(|i| map.groups[i].name.as_str());
        if owner != Some(group) {
            orphans.push(d.clone());
            continue;
        }
        let minutes = counters.entry(&d.routing_key).or_default();
        if minutes.add(d.minute, Sum::from(d.delta)) {
            entries += 1;
        }
        if let Some(id) = &d.id {
            // Decided in the replay transaction like in a flush (the
            // events may have been counted through another proxy, or
            // retried into this life's log twice).
            ids.push(IdEvent::new(&d.routing_key, id, d.minute, d.delta, None));
            entries += 1;
        }
    }
    let mut counters: Vec<_> = counters
        .into_iter()
        .map(|(k, v)| (Box::<[u8]>::from(k), v))
        .collect();
    counters.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Split {
        batch: Batch {
            counters,
            entries,
            ids,
            // Routed by this map's ring: a source's fence refuses the
            // replay while the map is older than a reshard there (the
            // retry splits again by the newer map).
            routed_by: map.version(),
            ..Batch::default()
        },
        orphans,
        last_lsn,
    }
}

/// The owner's `wal_applied.grp` for records moved away from `group`:
/// `>group`, which no group name can be (names are `[a-z0-9_-]`). The
/// column holds 64 bytes, so the longest names keep a prefix and a hash
/// of the whole name.
pub(crate) fn moved_mark(group: &str) -> String {
    let mark = format!(">{group}");
    if mark.len() <= 64 {
        return mark;
    }
    let hash = FnvBuildHasher::default().hash_one(group);
    format!(">{}~{hash:016x}", &group[..46])
}

/// Applies the records of `group` above `applied_here` whose keys another
/// group owns now (a reshard ran while this proxy was down) to that owner,
/// exactly once: under the owner's `wal_applied` mark `>group` for this
/// life, raised in the same transaction. Records at or below
/// `applied_here` reached `group` before the crash and moved with the
/// reshard's copy.
async fn move_orphans(
    app: &App,
    map: &ShardMap,
    life: &OldLife,
    group: &str,
    applied_here: u64,
    records: &[(u64, OwnedDelta)],
) -> Result<(), db::FlushError> {
    let mut by_owner: BTreeMap<usize, Vec<(u64, OwnedDelta)>> = BTreeMap::new();
    for (lsn, d) in records.iter().filter(|(lsn, _)| *lsn > applied_here) {
        if let Some(owner) = map.ring.owner(&d.routing_key)
            && map.groups[owner].name != group
        {
            by_owner.entry(owner).or_default().push((*lsn, d.clone()));
        }
    }
    let timeout = app.config.pool.connect_timeout;
    let mark = moved_mark(group);
    for (owner, moved) in by_owner {
        let target = &map.groups[owner];
        let _gate = target.buffer.gate.lock().await;
        let mut conn = target
            .master_conn(timeout)
            .await
            .map_err(db::FlushError::NotApplied)?;
        let done = db::replay(
            &mut conn,
            target.max_packet(),
            &life.writer_id,
            &mark,
            |applied| {
                let split = split(map, &target.name, applied, &moved);
                Ok(db::ReplayPlan {
                    orphans: split.orphans.len(),
                    last_lsn: split.last_lsn,
                    batch: split.batch,
                })
            },
        )
        .await?;
        telemetry::quarantined(&target.name, done.held.deltas);
        tracing::info!(life = %life.writer_id, from = group, to = %target.name, applied_entries = done.entries, rows = done.rows, "replayed records of keys that moved while this proxy was down on their new owner");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_marks_fit_the_column_and_never_name_a_group() {
        assert_eq!(moved_mark("g0"), ">g0");
        let a = "a".repeat(64);
        let b = format!("{}b", "a".repeat(63));
        assert!(moved_mark(&a).len() <= 64 && moved_mark(&b).len() <= 64);
        assert_ne!(moved_mark(&a), moved_mark(&b));
        assert!(moved_mark(&"x".repeat(63)).starts_with('>'));
    }
    use crate::config::ProxyConfig;
    use crate::storage::shard_map::ShardMap;

    fn delta(key: &str, minute: i64) -> OwnedDelta {
        OwnedDelta {
            routing_key: format!("v\0{key}").into_bytes().into(),
            minute,
            delta: 2,
            id: None,
        }
    }

    #[tokio::test]
    async fn split_applies_owned_keys_above_the_applied_lsn_and_orphans_moved_ones() {
        let doc = crate::control::topology::parse_doc(
            "version: 1\ngroups:\n  - name: g0\n    master: mysql://root@127.0.0.1:1/t\n  - name: g1\n    master: mysql://root@127.0.0.1:2/t\n",
        )
        .expect("doc");
        let map = ShardMap::build(
            doc.validate().expect("valid"),
            &ProxyConfig::defaults(),
            None,
        );
        // Records of g0 (as the dead life routed them): 200 keys, LSN 1..=200,
        // each twice in two minutes, the second time in the same record.
        let mut records = Vec::new();
        // Keys spread over the ring (FNV positions of keys that differ
        // only in their last bytes lie close together).
        let key_of = |i: u64| format!("k{i}-{:x}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for i in 0..200u64 {
            let key = key_of(i);
            records.push((i + 1, delta(&key, 60)));
            records.push((i + 1, delta(&key, 120)));
            records.push((i + 1, delta(&key, 120)));
        }
        let owned_by_g0 = |k: &str| {
            map.route(format!("v\0{k}").as_bytes())
                .is_some_and(|g| g.name == "g0")
        };
        let s = split(&map, "g0", 50, &records);
        assert_eq!(s.last_lsn, 200);
        let keys_above: Vec<String> = (50..200).map(key_of).collect();
        let owned: Vec<&String> = keys_above.iter().filter(|k| owned_by_g0(k)).collect();
        assert!(
            !owned.is_empty() && owned.len() < keys_above.len(),
            "both groups own some: {} of {}",
            owned.len(),
            keys_above.len()
        );
        // Owned keys: one counter each, minutes 60 (2) and 120 (4).
        assert_eq!(s.batch.counters.len(), owned.len());
        assert_eq!(s.batch.entries, 2 * owned.len());
        assert!(
            s.batch.counters.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted"
        );
        for (rk, minutes) in &s.batch.counters {
            let mut m: Vec<(i64, Sum)> = minutes.iter().collect();
            m.sort_unstable();
            assert_eq!(m, vec![(60, 2), (120, 4)], "{rk:?}");
        }
        // Moved keys are orphans, delta by delta; nothing at or below 50.
        assert_eq!(s.orphans.len(), 3 * (keys_above.len() - owned.len()));
        assert!(s.orphans.iter().all(|d| {
            let k = String::from_utf8_lossy(&d.routing_key[2..]).into_owned();
            !owned_by_g0(&k) && keys_above.contains(&k)
        }));
        // Everything applied already: nothing to do.
        let s = split(&map, "g0", 200, &records);
        assert!(s.batch.counters.is_empty() && s.orphans.is_empty());
        assert_eq!(s.last_lsn, 200);
    }
}
