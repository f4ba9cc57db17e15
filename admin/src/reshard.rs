//! The pure half of online resharding: from the running topology and a
//! target, the topology that carries the reshard (its [`Migration`]), the
//! ranges that move, and the topologies that finish or revert it.
//!
//! The proxy's reshard driver persists these documents as ordinary topology
//! versions; keeping the arithmetic here lets `tallyctl` show the same plan
//! the proxy will execute, and lets it be tested without a database.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::ring::{Move, ShardRing};
use crate::topology::{GroupSpec, LastReshard, Migration, Outcome, Phase, Topology, Verified};

/// Why a reshard cannot start from these topologies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("a reshard ({0}) is already in progress; wait for it or cancel it")]
    InProgress(String),
    #[error(
        "the target moves no key (same groups, weights and vnodes); apply it as a topology change"
    )]
    NothingMoves,
    #[error("the target must not carry a migration section")]
    TargetHasMigration,
    #[error(
        "group {0} changes its servers in the same step; change servers and the ring separately"
    )]
    ServersChange(String),
}

/// What a reshard moves, per source → target pair.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairPlan {
    pub source: String,
    pub target: String,
    pub ranges: usize,
    /// The fraction of the hash space (≈ of keys) moving along this pair.
    pub fraction: f64,
}

/// The moved ranges of a topology that carries a migration, in position
/// order (empty without one).
pub fn moves(topology: &Topology) -> Vec<Move> {
    match ShardRing::previous(topology) {
        Some(old) => ShardRing::moves(&old, &ShardRing::new(topology)),
        None => Vec::new(),
    }
}

/// Sums `moves` per source → target pair.
pub fn pairs(moves: &[Move]) -> Vec<PairPlan> {
    let mut by_pair: BTreeMap<(&str, &str), PairPlan> = BTreeMap::new();
    for m in moves {
        let p = by_pair
            .entry((&m.source, &m.target))
            .or_insert_with(|| PairPlan {
                source: m.source.clone(),
                target: m.target.clone(),
                ranges: 0,
                fraction: 0.0,
            });
        p.ranges += 1;
        p.fraction += m.fraction();
    }
    by_pair.into_values().collect()
}

/// The topology that starts a reshard from `current` to `target`: the
/// target's groups, plus every group being removed kept with weight 0 (a
/// source still to be read and copied), and the migration section naming
/// the previous ring. Its version is the next one.
pub fn begin(current: &Topology, target: &Topology, id: &str) -> Result<Topology, PlanError> {
    if let Some(m) = &current.migration {
        return Err(PlanError::InProgress(m.id.clone()));
    }
    if target.migration.is_some() {
        return Err(PlanError::TargetHasMigration);
    }
    for g in &target.groups {
        if let Some(old) = current.group(&g.name)
            && (old.master != g.master || old.replicas != g.replicas)
        {
            return Err(PlanError::ServersChange(g.name.clone()));
        }
    }
    let mut groups = target.groups.clone();
    for g in &current.groups {
        if target.group(&g.name).is_none() {
            groups.push(GroupSpec {
                weight: 0,
                ..g.clone()
            });
        }
    }
    let next = Topology {
        version: current.version + 1,
        vnodes: target.vnodes,
        groups,
        migration: Some(Migration {
            id: id.to_owned(),
            phase: Phase::Copying,
            since: current.version + 1,
            from_vnodes: current.vnodes,
            from_weights: weights(current),
            reverts: None,
            verified: Vec::new(),
        }),
        admin: target.admin.clone(),
        // The previous outcome stays until this reshard ends.
        last_reshard: current.last_reshard.clone(),
    };
    if moves(&next).is_empty() {
        return Err(PlanError::NothingMoves);
    }
    Ok(next)
}

/// The topology once a reshard is done: no migration, drained groups gone,
/// and its outcome recorded (`at`: Unix seconds): `done`, or for the
/// reverse of a cancelled reshard, `cancelled` under the cancelled one's id
/// (`failed` stays `failed`, now with `reverted_by`).
pub fn finish(migrating: &Topology, at: u64) -> Topology {
    let version = migrating.version + 1;
    let last_reshard = match &migrating.migration {
        None => migrating.last_reshard.clone(),
        Some(m) => Some(match (&m.reverts, &migrating.last_reshard) {
            (None, _) => LastReshard {
                id: m.id.clone(),
                state: Outcome::Done,
                version,
                at,
                reverted_by: None,
                error: None,
                verified: m.verified.clone(),
            },
            (Some(undone), Some(last)) if last.id == *undone => LastReshard {
                version,
                at,
                reverted_by: Some(m.id.clone()),
                ..last.clone()
            },
            (Some(undone), _) => LastReshard {
                id: undone.clone(),
                state: Outcome::Cancelled,
                version,
                at,
                reverted_by: Some(m.id.clone()),
                error: None,
                verified: Vec::new(),
            },
        }),
    };
    Topology {
        version: migrating.version + 1,
        vnodes: migrating.vnodes,
        groups: migrating
            .groups
            .iter()
            .filter(|g| g.weight > 0)
            .cloned()
            .collect(),
        migration: None,
        admin: migrating.admin.clone(),
        last_reshard,
    }
}

/// The next version of `migrating` with its reshard recorded as `failed`
/// (its verification found `verified` unequal): the migration stays, so
/// routing and reads are unchanged, and the driver stops working on it.
/// A cancel rolls it back; the outcome stays `failed`.
pub fn fail(migrating: &Topology, error: &str, verified: Vec<Verified>, at: u64) -> Topology {
    let mut next = migrating.clone();
    next.version = migrating.version + 1;
    if let Some(m) = &migrating.migration {
        next.last_reshard = Some(LastReshard {
            id: m.id.clone(),
            state: Outcome::Failed,
            version: next.version,
            at,
            reverted_by: None,
            error: Some(error.to_owned()),
            verified,
        });
    }
    next
}

/// The running reshard's failure, when it has been recorded as `failed`.
pub fn failure(topology: &Topology) -> Option<&LastReshard> {
    let m = topology.migration.as_ref()?;
    topology
        .last_reshard
        .as_ref()
        .filter(|l| l.id == m.id && l.state == Outcome::Failed)
}

/// The reshard that undoes `migrating` (after its copies were undone): the
/// previous ring becomes the target again, and groups the cancelled reshard
/// added become sources (weight 0) until their new data is copied back.
pub fn reverse(migrating: &Topology, id: &str) -> Option<Topology> {
    let m = migrating.migration.as_ref()?;
    let groups = migrating
        .groups
        .iter()
        .map(|g| GroupSpec {
            weight: m.from_weights.get(&g.name).copied().unwrap_or(0),
            ..g.clone()
        })
        .collect();
    Some(Topology {
        version: migrating.version + 1,
        vnodes: m.from_vnodes,
        groups,
        migration: Some(Migration {
            id: id.to_owned(),
            phase: Phase::Copying,
            since: migrating.version + 1,
            from_vnodes: migrating.vnodes,
            from_weights: weights(migrating),
            reverts: Some(m.id.clone()),
            verified: Vec::new(),
        }),
        admin: migrating.admin.clone(),
        last_reshard: migrating.last_reshard.clone(),
    })
}

/// The ring weights of a topology (groups above weight 0).
fn weights(t: &Topology) -> BTreeMap<String, u32> {
    t.groups
        .iter()
        .filter(|g| g.weight > 0)
        .map(|g| (g.name.clone(), g.weight))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::routing_key;
    use crate::topology::TopologyDoc;

    fn topology(groups: &[&str]) -> Topology {
        let mut yaml = "version: 4\nvnodes: 32\ngroups:\n".to_owned();
        for name in groups {
            yaml += &format!(
                "  - name: {name}\n    master: mysql://root@127.0.0.1:{}/tally\n",
                4000 + u16::from(name.as_bytes()[1])
            );
        }
        TopologyDoc::parse_and_validate(&yaml).expect("valid test topology")
    }

    fn owner(t: &Topology, ring: &ShardRing, rk: &[u8]) -> String {
        ring.owner(rk)
            .map(|i| t.groups[i].name.clone())
            .unwrap_or_default()
    }

    #[test]
    fn begin_keeps_removed_groups_as_sources_and_round_trips() {
        let two = topology(&["g0", "g1"]);
        let three = topology(&["g0", "g1", "g2"]);
        let m = begin(&three, &two, "r1").expect("plan");
        assert_eq!(m.version, 5);
        assert_eq!(m.group("g2").map(|g| g.weight), Some(0));
        let mig = m.migration.as_ref().expect("migration");
        assert_eq!(mig.since, 5);
        assert_eq!(mig.from_weights.len(), 3);
        // Persisted and parsed back, it is the same topology.
        let again = TopologyDoc::parse_and_validate(&m.to_yaml()).expect("valid");
        assert_eq!(again, m);
        // Every key that g2 held now goes to g0 or g1, and only those move.
        let (old, new) = (
            ShardRing::previous(&m).expect("previous"),
            ShardRing::new(&m),
        );
        let mv = moves(&m);
        for i in 0..3000 {
            let rk = routing_key("v", &i.to_string());
            let (a, b) = (owner(&m, &old, &rk), owner(&m, &new, &rk));
            let pos = ShardRing::position(&rk);
            assert_eq!(a != b, mv.iter().any(|x| x.contains(pos)), "key {i}");
            assert_ne!(b, "g2", "nothing routes to a drained group");
            if a != b {
                assert_eq!(a, "g2");
            }
        }
        let done = finish(&m, 7);
        assert!(done.migration.is_none());
        assert_eq!(done.groups.len(), 2);
        let total: f64 = pairs(&mv).iter().map(|p| p.fraction).sum();
        assert!((0.2..0.45).contains(&total), "{total}");
    }

    #[test]
    fn reverse_restores_the_previous_ring() {
        let two = topology(&["g0", "g1"]);
        let three = topology(&["g0", "g1", "g2"]);
        let m = begin(&two, &three, "r1").expect("plan");
        let r = reverse(&m, "r2").expect("reverse");
        assert_eq!(
            r.migration.as_ref().and_then(|x| x.reverts.as_deref()),
            Some("r1")
        );
        assert_eq!(r.group("g2").map(|g| g.weight), Some(0));
        let fwd = moves(&m);
        let back = moves(&r);
        // The reverse moves exactly the same hash space the other way.
        let space = |v: &[Move]| v.iter().map(|x| x.end - x.start).sum::<u64>();
        assert_eq!(space(&fwd), space(&back));
        assert!(back.iter().all(|x| x.source == "g2"));
        let final_ring = ShardRing::new(&finish(&r, 7));
        let orig = ShardRing::new(&two);
        assert_eq!(ShardRing::moved_fraction(&orig, &final_ring), 0.0);
    }

    /// Issue #19 item 6: the outcome is recorded in the version that ends
    /// the reshard, kept by the next reshard until that one ends, and
    /// persisted (YAML) with the topology.
    #[test]
    fn the_outcome_is_recorded_with_the_topology() {
        let two = topology(&["g0", "g1"]);
        let three = topology(&["g0", "g1", "g2"]);
        assert!(!two.to_yaml().contains("last_reshard"));
        let m = begin(&two, &three, "r1").expect("plan");
        assert_eq!(m.last_reshard, None);
        let done = finish(&m, 1234);
        let last = done.last_reshard.clone().expect("recorded");
        assert_eq!(
            (last.id.as_str(), last.state, last.version, last.at),
            ("r1", Outcome::Done, m.version + 1, 1234)
        );
        let again = TopologyDoc::parse_and_validate(&done.to_yaml()).expect("valid");
        assert_eq!(again, done);
        // The next reshard carries it until it ends; cancelled, its
        // reverse ends it as `cancelled` under the cancelled id.
        let m2 = begin(&done, &two, "r2").expect("plan");
        assert_eq!(m2.last_reshard, done.last_reshard);
        let r = reverse(&m2, "r3").expect("reverse");
        assert_eq!(r.last_reshard, done.last_reshard);
        let back = finish(&r, 99);
        let last = back.last_reshard.expect("recorded");
        assert_eq!(
            (last.id.as_str(), last.state, last.reverted_by.as_deref()),
            ("r2", Outcome::Cancelled, Some("r3"))
        );
        // A failed one stays failed through its roll back.
        let m4 = begin(&done, &two, "r4").expect("plan");
        assert_eq!(failure(&m4), None);
        let failed = fail(&m4, "sums differ", Vec::new(), 5);
        assert_eq!(failed.migration, m4.migration);
        assert_eq!(failed.version, m4.version + 1);
        assert_eq!(failure(&failed).map(|l| l.state), Some(Outcome::Failed));
        let back = finish(&reverse(&failed, "r5").expect("reverse"), 6);
        let last = back.last_reshard.expect("recorded");
        assert_eq!(
            (
                last.id.as_str(),
                last.state,
                last.reverted_by.as_deref(),
                last.error.as_deref()
            ),
            ("r4", Outcome::Failed, Some("r5"), Some("sums differ"))
        );
    }

    #[test]
    fn refuses_what_cannot_be_a_reshard() {
        let two = topology(&["g0", "g1"]);
        assert_eq!(begin(&two, &two, "r"), Err(PlanError::NothingMoves));
        let m = begin(&two, &topology(&["g0", "g1", "g2"]), "r1").expect("plan");
        assert_eq!(
            begin(&m, &two, "r2"),
            Err(PlanError::InProgress("r1".into()))
        );
    }
}
