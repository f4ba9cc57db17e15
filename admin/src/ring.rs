//! Who owns a key: the consistent-hash ring over the topology's groups.
//!
//! The routing key of a counter is `ns`, a 0x00 byte, then `key`, so every
//! bucket and the total of one counter land on one group. A key's *ring
//! position* is `FnvBuildHasher::default().hash_one(routing_key)`, exactly the
//! hash `consistent_hash_ring` places it by; the position is stored in every
//! counter row so a future reshard can move exact hash ranges.
//!
//! Ring nodes are group *names* (hashed as strings), so reordering groups in
//! the file never moves a key. The golden-vector test pins the placement of
//! 1,000 keys: a dependency or compiler upgrade that changes the hash fails
//! the build instead of silently rerouting data.

use std::hash::{BuildHasher, Hash, Hasher};

use consistent_hash_ring::{Ring, RingBuilder};
use fnv::FnvBuildHasher;

use crate::topology::Topology;

/// Builds the routing key `ns 0x00 key`.
pub fn routing_key(ns: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(ns.len() + 1 + key.len());
    k.extend_from_slice(ns.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

/// One hash range `[start, end]` (ring positions, inclusive) whose owner
/// changes from `source` to `target`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Move {
    pub start: u64,
    pub end: u64,
    pub source: String,
    pub target: String,
}

impl Move {
    pub fn contains(&self, pos: u64) -> bool {
        (self.start..=self.end).contains(&pos)
    }

    /// The fraction of the hash space this range covers.
    pub fn fraction(&self) -> f64 {
        ((self.end - self.start) as f64 + 1.0) / (u64::MAX as f64 + 1.0)
    }
}

/// A group on the ring: hashed and compared by name only; `index` is the
/// group's position in the topology, handed back so callers avoid a lookup.
#[derive(Debug, Clone)]
struct RingNode {
    name: String,
    index: usize,
}

impl Hash for RingNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl PartialEq for RingNode {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for RingNode {}

/// The ring of one topology version. Immutable once built.
#[derive(Clone)]
pub struct ShardRing {
    ring: Ring<RingNode, FnvBuildHasher>,
}

impl ShardRing {
    /// Each group gets `vnodes × weight` virtual nodes; a group of weight 0
    /// (a reshard source being drained) is not on the ring.
    pub fn new(topology: &Topology) -> ShardRing {
        let weights = topology
            .groups
            .iter()
            .enumerate()
            .map(|(index, g)| (g.name.as_str(), g.weight, index));
        ShardRing::build(topology.vnodes, weights)
    }

    /// The ring a running reshard moves data away from (its `migration`'s
    /// previous weights), with indexes into the current topology's groups.
    pub fn previous(topology: &Topology) -> Option<ShardRing> {
        let m = topology.migration.as_ref()?;
        let weights = topology.groups.iter().enumerate().filter_map(|(index, g)| {
            m.from_weights
                .get(&g.name)
                .map(|w| (g.name.as_str(), *w, index))
        });
        Some(ShardRing::build(m.from_vnodes, weights))
    }

    fn build<'a>(vnodes: u32, weights: impl Iterator<Item = (&'a str, u32, usize)>) -> ShardRing {
        let mut builder = RingBuilder::new(FnvBuildHasher::default());
        for (name, weight, index) in weights.filter(|(_, w, _)| *w > 0) {
            let node = RingNode {
                name: name.to_owned(),
                index,
            };
            builder = builder.weighted_node(node, vnodes as usize * weight as usize);
        }
        ShardRing {
            ring: builder.build(),
        }
    }

    /// The hash ranges whose owner differs from `old` to `new`, adjacent
    /// ranges with the same source and target merged, in position order.
    pub fn moves(old: &ShardRing, new: &ShardRing) -> Vec<Move> {
        let mut out: Vec<Move> = Vec::new();
        for m in consistent_hash_ring::migrated_ranges(&old.ring, &new.ring) {
            let (start, end) = (*m.keys().start(), *m.keys().end());
            let (source, target) = (m.src().name.as_str(), m.dst().name.as_str());
            match out.last_mut() {
                Some(last)
                    if last.source == source
                        && last.target == target
                        && last.end.checked_add(1) == Some(start) =>
                {
                    last.end = end;
                }
                _ => out.push(Move {
                    start,
                    end,
                    source: source.to_owned(),
                    target: target.to_owned(),
                }),
            }
        }
        out.sort_by_key(|m| m.start);
        out
    }

    /// The ring position of a routing key (see the module docs).
    pub fn position(routing_key: &[u8]) -> u64 {
        FnvBuildHasher::default().hash_one(routing_key)
    }

    /// The index (in topology order) of the group owning `routing_key`, or
    /// `None` for an empty ring. A validated topology is never empty.
    pub fn owner(&self, routing_key: &[u8]) -> Option<usize> {
        self.ring.try_get(routing_key).map(|n| n.index)
    }

    /// The name of the group owning `routing_key`.
    pub fn owner_name(&self, routing_key: &[u8]) -> Option<&str> {
        self.ring.try_get(routing_key).map(|n| n.name.as_str())
    }

    /// The fraction of the hash space whose owner differs between two rings
    /// (by name), in [0, 1]. Used to tell operators how much data a
    /// topology change would move.
    pub fn moved_fraction(old: &ShardRing, new: &ShardRing) -> f64 {
        let moved: f64 = consistent_hash_ring::migrated_ranges(&old.ring, &new.ring)
            .map(|m| {
                let r = m.keys();
                (*r.end() - *r.start()) as f64 + 1.0
            })
            .sum();
        moved / (u64::MAX as f64 + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::TopologyDoc;

    fn topology(groups: &[(&str, u32)], vnodes: u32) -> Topology {
        let mut yaml = format!("version: 1\nvnodes: {vnodes}\ngroups:\n");
        for (i, (name, weight)) in groups.iter().enumerate() {
            yaml += &format!(
                "  - name: {name}\n    weight: {weight}\n    master: mysql://root@127.0.0.1:{}/tally\n",
                4000 + i
            );
        }
        TopologyDoc::parse_and_validate(&yaml).expect("valid test topology")
    }

    #[test]
    fn position_is_the_hash_the_ring_uses() {
        // A one-node-per-position check: the owner of a key is the vnode at
        // or after its position, so the key and a u64 probe at the same hash
        // cannot disagree across the whole ring.
        let t = topology(&[("g0", 1), ("g1", 1), ("g2", 1)], 160);
        let ring = ShardRing::new(&t);
        for i in 0..1000 {
            let rk = routing_key("views", &format!("video-{i}"));
            let pos = ShardRing::position(&rk);
            // Owner of the key == owner of the first vnode >= pos.
            let by_pos = ring
                .ring
                .resident_ranges()
                .find(|r| r.keys().contains(&pos))
                .map(|r| r.node().index);
            assert_eq!(ring.owner(&rk), by_pos, "key {i} at {pos}");
        }
    }

    #[test]
    fn group_order_in_the_file_does_not_move_keys() {
        let a = ShardRing::new(&topology(&[("g0", 1), ("g1", 2)], 160));
        let b = ShardRing::new(&topology(&[("g1", 2), ("g0", 1)], 160));
        for i in 0..2000 {
            let rk = routing_key("ns", &i.to_string());
            assert_eq!(a.owner_name(&rk), b.owner_name(&rk));
        }
        assert_eq!(ShardRing::moved_fraction(&a, &b), 0.0);
    }

    #[test]
    fn moves_are_exactly_the_keys_whose_owner_changes() {
        let old = ShardRing::new(&topology(&[("g0", 1), ("g1", 1)], 40));
        let new = ShardRing::new(&topology(&[("g0", 1), ("g1", 1), ("g2", 2)], 40));
        let moves = ShardRing::moves(&old, &new);
        assert!(
            moves.windows(2).all(|w| w[0].end < w[1].start),
            "sorted, disjoint"
        );
        let mut moved = 0;
        for i in 0..5000 {
            let rk = routing_key("v", &format!("k{i}"));
            let pos = ShardRing::position(&rk);
            let (a, b) = (old.owner_name(&rk), new.owner_name(&rk));
            match moves.iter().find(|m| m.contains(pos)) {
                Some(m) => {
                    moved += 1;
                    assert_eq!((a, b), (Some(m.source.as_str()), Some(m.target.as_str())));
                }
                None => assert_eq!(a, b, "key {i} at {pos} moved outside every range"),
            }
        }
        assert!(moved > 0);
        // Only the new group receives keys when one is added.
        assert!(moves.iter().all(|m| m.target == "g2"));
    }

    #[test]
    fn adding_a_group_moves_about_its_share() {
        let old = ShardRing::new(&topology(&[("g0", 1), ("g1", 1)], 160));
        let new = ShardRing::new(&topology(&[("g0", 1), ("g1", 1), ("g2", 1)], 160));
        let f = ShardRing::moved_fraction(&old, &new);
        assert!((0.25..0.42).contains(&f), "moved fraction {f}");
    }
}
