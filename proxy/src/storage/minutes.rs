//! One counter's pending deltas by minute, as the buffer, the flush and the
//! WAL replay hold them.
//!
//! Most counters have one or a few minutes pending, and a short vector
//! searched linearly is the cheapest thing for them. A counter whose events
//! spread over many minutes (up to `events.max_age` of them: ~10k for a
//! week) would make every merge a linear search and the merges of a batch
//! quadratic; past [`FEW`] minutes the entries therefore move into an
//! ordered map, so a merge costs O(log m) and a batch O(m log m).

use std::collections::BTreeMap;

use crate::domain::count::Sum;

/// Minutes kept in the vector form at most.
const FEW: usize = 32;

/// A counter's pending `(minute, sum)` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Minutes {
    /// At most [`FEW`] entries, in arrival order; a minute may appear more
    /// than once only when built by [`Minutes::from`] (tests, replay).
    Few(Vec<(i64, Sum)>),
    /// Ordered by minute, one entry each.
    Many(BTreeMap<i64, Sum>),
}

impl Default for Minutes {
    fn default() -> Self {
        Minutes::Few(Vec::new())
    }
}

impl From<Vec<(i64, Sum)>> for Minutes {
    fn from(v: Vec<(i64, Sum)>) -> Self {
        if v.len() <= FEW {
            return Minutes::Few(v);
        }
        let mut m = BTreeMap::new();
        for (minute, d) in v {
            *m.entry(minute).or_default() += d;
        }
        Minutes::Many(m)
    }
}

impl Minutes {
    /// One entry.
    pub fn one(minute: i64, delta: Sum) -> Minutes {
        Minutes::Few(vec![(minute, delta)])
    }

    /// Adds `delta` to `minute`; true when that made a new entry.
    pub fn add(&mut self, minute: i64, delta: Sum) -> bool {
        match self {
            Minutes::Few(v) => {
                if let Some((_, sum)) = v.iter_mut().find(|(m, _)| *m == minute) {
                    *sum += delta;
                    return false;
                }
                if v.len() < FEW {
                    v.push((minute, delta));
                    return true;
                }
                let mut map: BTreeMap<i64, Sum> = BTreeMap::new();
                for (m, d) in v.drain(..) {
                    *map.entry(m).or_default() += d;
                }
                map.insert(minute, delta);
                *self = Minutes::Many(map);
                true
            }
            Minutes::Many(map) => {
                let mut new = false;
                *map.entry(minute).or_insert_with(|| {
                    new = true;
                    0
                }) += delta;
                new
            }
        }
    }

    /// Entries (a minute may repeat in the vector form built by `from`).
    pub fn len(&self) -> usize {
        match self {
            Minutes::Few(v) => v.len(),
            Minutes::Many(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> Iter<'_> {
        match self {
            Minutes::Few(v) => Iter::Few(v.iter()),
            Minutes::Many(m) => Iter::Many(m.iter()),
        }
    }
}

/// The entries of [`Minutes`], by value.
pub enum Iter<'a> {
    Few(std::slice::Iter<'a, (i64, Sum)>),
    Many(std::collections::btree_map::Iter<'a, i64, Sum>),
}

impl Iterator for Iter<'_> {
    type Item = (i64, Sum);

    fn next(&mut self) -> Option<(i64, Sum)> {
        match self {
            Iter::Few(i) => i.next().copied(),
            Iter::Many(i) => i.next().map(|(m, d)| (*m, *d)),
        }
    }
}

impl<'a> IntoIterator for &'a Minutes {
    type Item = (i64, Sum);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_by_minute_in_either_form_and_counts_new_entries() {
        let mut m = Minutes::one(60, 1);
        assert!(!m.add(60, 2));
        assert!(m.add(120, -1));
        assert_eq!(m.iter().collect::<Vec<_>>(), [(60, 3), (120, -1)]);
        // Past the vector form: an ordered map, same sums.
        let mut wide = Minutes::default();
        for i in 0..1000 {
            assert!(wide.add(60 * (1000 - i), 1), "minute {i} is new");
        }
        assert!(matches!(wide, Minutes::Many(_)));
        for i in 0..1000 {
            assert!(!wide.add(60 * (1000 - i), 2));
        }
        assert_eq!(wide.len(), 1000);
        assert!(wide.iter().all(|(_, d)| d == 3));
        let minutes: Vec<i64> = wide.iter().map(|(m, _)| m).collect();
        assert!(minutes.windows(2).all(|w| w[0] < w[1]), "ordered");
    }

    #[test]
    fn a_wide_spread_is_merged_with_logarithmic_work() {
        // The vector form searches linearly; a counter spread over many
        // minutes must not stay in it (that is what made merging
        // quadratic): it holds at most FEW entries.
        let mut m = Minutes::default();
        for i in 0..10_000 {
            m.add(i * 60, 1);
            if let Minutes::Few(v) = &m {
                assert!(v.len() <= FEW);
            }
        }
        assert!(matches!(m, Minutes::Many(ref map) if map.len() == 10_000));
    }
}
