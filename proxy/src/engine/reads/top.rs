//! Exact top-K from ranked lists, reading a number of keys that follows
//! the limit (a threshold algorithm, Fagin et al.).
//!
//! A key's value is a sum of parts that live in different places: its
//! stored count, the pending deltas of the open shards and of the batch in
//! flight (a strong read), its rows on the source and on the target of a
//! running reshard. Each place can list its highest parts cheaply (`ORDER
//! BY ... LIMIT n` on a server, a heap of `n` over a buffer), and the
//! value of a given key can be read exactly (a primary-key lookup, a
//! buffer lookup). A *round* lists the top `n` of every part, reads the
//! exact value of every key listed anywhere (*seen*), and knows from each
//! list's last entry a [`Bound`] on that part for every key it did not
//! list. A key seen nowhere is worth at most the sum of the bounds; once
//! `limit` seen keys rank above that, no unseen key can be in the top
//! `limit`, and the seen keys' top is the exact answer. Otherwise the next
//! round lists twice as many.
//!
//! What is bounded, and what is not. A round reads `O(n)` keys per list
//! and holds `O(n)` in memory; the first round asks `2 × limit` of every
//! list. Whether it settles depends on the data, not on how many keys
//! exist: a round does not settle when the seen keys' `limit`-th value is
//! not above the sum of the bounds (pending deltas that are large next to
//! the gaps between stored counts, negative parts that pull listed keys
//! below keys no list showed, many ties at the bound). Then `n` doubles,
//! so the keys read stay within twice those of the last round. No fixed
//! multiple of `limit` is exact for every data set (when every stored key
//! a list of `n` shows is taken down by a negative pending delta, the
//! answer is in what a longer list shows): in the worst case the rounds
//! read every key their lists cover, about twice. A list shorter than
//! asked is complete (every key not in it has 0 there), so the rounds end
//! at the latest when every list is.

use std::collections::HashMap;
use std::future::Future;

use crate::domain::count::Sum;
use crate::storage::buffer::RankedKey;

/// The top `limit` of `candidates`: non-zero counts, by count descending,
/// ties by key ascending.
pub fn rank(mut candidates: Vec<(Vec<u8>, i64)>, limit: usize) -> Vec<(Vec<u8>, i64)> {
    candidates.retain(|(_, c)| *c != 0);
    candidates.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    candidates.truncate(limit);
    candidates
}

/// What one list says about the keys it did not list: their part is at
/// most `value` (never below 0: a key may have nothing there), and one
/// whose part is exactly `value` has a key greater than `after` (when
/// known). `exact`: their part is exactly 0 (the list holds every non-zero
/// part).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    value: Sum,
    after: Option<Vec<u8>>,
    exact: bool,
}

impl Bound {
    /// Every non-zero part was listed.
    pub const COMPLETE: Bound = Bound {
        value: 0,
        after: None,
        exact: true,
    };

    /// The bound of a list of non-zero parts in rank order (count
    /// descending, key ascending), asked for `asked` entries.
    pub fn of_list(asked: usize, list: &[(Vec<u8>, i64)]) -> Bound {
        match list.last() {
            Some((key, last)) if list.len() >= asked => Bound::below(Sum::from(*last), key),
            _ => Bound::COMPLETE,
        }
    }

    /// The bound of a ranking that left keys out below `cut`, the lowest
    /// `(part, key)` it kept (`None`: it left nothing out).
    pub fn of_cut(cut: Option<RankedKey>) -> Bound {
        match cut {
            Some((last, key)) => Bound::below(last, &key),
            None => Bound::COMPLETE,
        }
    }

    /// Keys not listed rank below `(last, key)`, or have nothing there.
    fn below(last: Sum, key: &[u8]) -> Bound {
        if last > 0 {
            Bound {
                value: last,
                after: Some(key.to_vec()),
                exact: false,
            }
        } else {
            // A key without this part (0) ranks above a negative last.
            Bound {
                value: 0,
                after: None,
                exact: false,
            }
        }
    }
}

/// What one round found: the exact values of the keys it saw, and a bound
/// per list on everything else.
#[derive(Debug, Default)]
pub struct Round {
    pub seen: HashMap<Vec<u8>, i64>,
    pub bounds: Vec<Bound>,
}

/// The exact top `limit` when `round` decides it: either every list was
/// complete (an unseen key is worth 0, and zeros do not rank), or the
/// `limit`-th seen key ranks above anything an unseen key can be worth.
pub fn settled(round: Round, limit: usize) -> Option<Vec<(Vec<u8>, i64)>> {
    let Round { seen, bounds } = round;
    let top = rank(seen.into_iter().collect(), limit);
    if bounds.iter().all(|b| b.exact) {
        return Some(top);
    }
    if top.len() < limit {
        return None;
    }
    let (key, last) = top.last()?;
    let last = Sum::from(*last);
    let most: Sum = bounds.iter().map(|b| b.value).sum();
    // An unseen key worth exactly `most` is at every bound at once, so its
    // key is greater than every `after` known: it ranks below a key at or
    // before the greatest of them.
    let ahead = last > most
        || (last == most
            && bounds
                .iter()
                .filter_map(|b| b.after.as_deref())
                .max()
                .is_some_and(|after| key.as_slice() <= after));
    ahead.then_some(top)
}

/// Entries every list is asked for in the first round.
pub fn first_round(limit: usize) -> usize {
    limit.max(1).saturating_mul(2)
}

/// Runs `round(n)` for `n` = [`first_round`], doubling, until a round
/// settles the top `limit` (see the module documentation).
pub async fn search<E, F, Fut>(limit: usize, mut round: F) -> Result<Vec<(Vec<u8>, i64)>, E>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<Round, E>>,
{
    let mut n = first_round(limit);
    loop {
        if let Some(top) = settled(round(n).await?, limit) {
            return Ok(top);
        }
        n = n.saturating_mul(2);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::storage::buffer::{Delta, GroupBuffer};

    fn kc(k: &str, c: i64) -> (Vec<u8>, i64) {
        (k.as_bytes().to_vec(), c)
    }

    fn bound(value: Sum, after: Option<&str>) -> Bound {
        Bound {
            value,
            after: after.map(|a| a.as_bytes().to_vec()),
            exact: false,
        }
    }

    fn round(seen: &[(&str, i64)], bounds: Vec<Bound>) -> Round {
        Round {
            seen: seen.iter().map(|(k, c)| kc(k, *c)).collect(),
            bounds,
        }
    }

    #[test]
    fn rank_orders_by_count_then_key_and_drops_zeros() {
        let ranked = rank(
            vec![kc("b", 5), kc("z", 0), kc("a", 5), kc("c", 9), kc("d", -1)],
            3,
        );
        assert_eq!(ranked, vec![kc("c", 9), kc("a", 5), kc("b", 5)]);
        // Negative counts rank below positive ones but are kept.
        let all = rank(vec![kc("d", -1), kc("e", 2)], 10);
        assert_eq!(all, vec![kc("e", 2), kc("d", -1)]);
    }

    #[test]
    fn a_list_bounds_what_it_did_not_list() {
        // Shorter than asked: it holds every non-zero part.
        assert_eq!(
            Bound::of_list(3, &[kc("a", 9), kc("b", 4)]),
            Bound::COMPLETE
        );
        assert_eq!(Bound::of_list(3, &[]), Bound::COMPLETE);
        // Full: the others are at most its last, and after its key on a tie.
        assert_eq!(
            Bound::of_list(2, &[kc("a", 9), kc("b", 4)]),
            bound(4, Some("b"))
        );
        // Full down to negative parts: an unlisted key may have 0 there.
        assert_eq!(
            Bound::of_list(2, &[kc("a", 9), kc("b", -4)]),
            bound(0, None)
        );
        assert_eq!(Bound::of_cut(None), Bound::COMPLETE);
        assert_eq!(Bound::of_cut(Some((7, b"k".to_vec()))), bound(7, Some("k")));
        assert_eq!(Bound::of_cut(Some((-7, b"k".to_vec()))), bound(0, None));
    }

    #[test]
    fn settled_only_when_no_unseen_key_can_rank_in() {
        // Complete lists: the seen keys are every non-zero key.
        let r = round(&[("a", 3), ("b", -2), ("z", 0)], vec![Bound::COMPLETE]);
        assert_eq!(settled(r, 10), Some(vec![kc("a", 3), kc("b", -2)]));
        // An unseen key may be worth up to 4 + 3 = 7.
        let bounds = || vec![bound(4, Some("m")), bound(3, Some("c"))];
        let r = round(&[("a", 8), ("b", 7)], bounds());
        assert_eq!(settled(r, 1), Some(vec![kc("a", 8)]));
        // A tie with the bound: an unseen "n" worth 7 would rank above "x".
        let r = round(&[("a", 8), ("x", 7)], bounds());
        assert_eq!(settled(r, 2), None);
        // ... but not above "b" (an unseen key at 7 is after "m").
        let r = round(&[("a", 8), ("b", 7)], bounds());
        assert_eq!(settled(r, 2), Some(vec![kc("a", 8), kc("b", 7)]));
        let r = round(&[("a", 8), ("m", 7)], bounds());
        assert_eq!(settled(r, 2), Some(vec![kc("a", 8), kc("m", 7)]));
        // Without a key to compare, a tie is not enough.
        let r = round(&[("a", 8), ("b", 7)], vec![bound(7, None)]);
        assert_eq!(settled(r, 2), None);
        // Too few seen, or the last seen negative: unseen keys may rank in.
        let r = round(&[("a", 8)], bounds());
        assert_eq!(settled(r, 2), None);
        let r = round(&[("a", 8), ("b", -1)], vec![bound(0, None)]);
        assert_eq!(settled(r, 2), None);
    }

    /// A group in memory: stored counts listed like `query::top` does and
    /// pending deltas in a real buffer, ranked by `pending_top`.
    struct Model {
        stored: BTreeMap<String, i64>,
        buffer: GroupBuffer,
        /// Keys the stored list ranks but the answer must not hold (what
        /// `reads::group_round` drops: keys a reshard moves, when the
        /// statement could not filter them).
        foreign: Vec<String>,
        /// Keys whose exact value a round read, over all rounds.
        read: usize,
    }

    impl Model {
        fn new(stored: BTreeMap<String, i64>) -> Model {
            Model {
                stored,
                buffer: GroupBuffer::new("g0", 1 << 20, 1 << 20),
                foreign: Vec::new(),
                read: 0,
            }
        }

        fn add(&self, key: &str, delta: i64) {
            let rk = tally_admin::routing_key("ns", key);
            self.buffer.merge([Delta {
                routing_key: &rk,
                ring_pos: tally_admin::ShardRing::position(&rk),
                minute: 60,
                delta,
                id: None,
                dups: None,
            }]);
        }

        fn truth(&self) -> Vec<(Vec<u8>, i64)> {
            let mut all: BTreeMap<String, i64> = self.stored.clone();
            for (k, s) in &self.stored {
                let rk = tally_admin::routing_key("ns", k);
                let pos = tally_admin::ShardRing::position(&rk);
                all.insert(
                    k.clone(),
                    *s + self.buffer.pending_sum(&rk, pos, None) as i64,
                );
            }
            all.into_iter()
                .filter(|(k, _)| !self.foreign.contains(k))
                .map(|(k, c)| (k.into_bytes(), c))
                .collect()
        }

        /// What `reads::group_round` does, against the model.
        fn round(&mut self, n: usize) -> Round {
            let foreign: Vec<Vec<u8>> = self
                .foreign
                .iter()
                .map(|k| tally_admin::routing_key("ns", k))
                .collect();
            let pending = self
                .buffer
                .pending_top("ns", None, n, |rk| !foreign.iter().any(|f| f == rk));
            let mut list: Vec<(Vec<u8>, i64)> = self
                .stored
                .iter()
                .filter(|(_, c)| **c != 0)
                .map(|(k, c)| (k.clone().into_bytes(), *c))
                .collect();
            list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            list.truncate(n);
            let mut keys: Vec<Vec<u8>> = list
                .iter()
                .map(|(k, _)| k.clone())
                .filter(|k| !self.foreign.iter().any(|f| f.as_bytes() == k.as_slice()))
                .collect();
            keys.extend(pending.keys.iter().cloned());
            keys.sort();
            keys.dedup();
            self.read += keys.len();
            let names: Vec<String> = keys
                .iter()
                .map(|k| String::from_utf8(k.clone()).expect("utf-8"))
                .collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let seen = self
                .buffer
                .pending_sums("ns", &refs, None)
                .into_iter()
                .map(|(k, p)| {
                    let s = self.stored[std::str::from_utf8(&k).expect("utf-8")];
                    (k, s + p as i64)
                })
                .collect();
            let [open, flying] = pending.cuts;
            Round {
                seen,
                bounds: vec![
                    Bound::of_list(n, &list),
                    Bound::of_cut(open),
                    Bound::of_cut(flying),
                ],
            }
        }
    }

    fn run(model: &mut Model, limit: usize) -> Vec<(Vec<u8>, i64)> {
        futures::executor::block_on(search(limit, |n| {
            std::future::ready(Ok::<_, ()>(model.round(n)))
        }))
        .expect("search")
    }

    #[test]
    fn search_equals_brute_force_with_ties_zeros_and_negative_deltas() {
        for seed in 0..60 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let keys = rng.usize(1..300);
            let stored: BTreeMap<String, i64> = (0..keys)
                .map(|i| (format!("k{i:03}"), rng.i64(-5..=30)))
                .collect();
            let mut model = Model::new(stored);
            for i in 0..keys {
                if rng.bool() {
                    model.add(&format!("k{i:03}"), rng.i64(-40..=40));
                }
            }
            // Some deltas are in flight, some open, some in both.
            if seed % 3 == 0 {
                let _batch = model.buffer.cut();
                for i in 0..keys / 4 {
                    model.add(&format!("k{i:03}"), rng.i64(-10..=10));
                }
            }
            for limit in [1, 3, 10, 50, 400] {
                assert_eq!(
                    run(&mut model, limit),
                    rank(model.truth(), limit),
                    "seed {seed}, limit {limit}"
                );
            }
        }
    }

    #[test]
    fn search_is_exact_when_a_list_also_ranks_keys_it_must_leave_out() {
        for seed in 0..30 {
            let mut rng = fastrand::Rng::with_seed(100 + seed);
            let stored: BTreeMap<String, i64> = (0..200)
                .map(|i| (format!("k{i:03}"), rng.i64(-5..=30)))
                .collect();
            let mut model = Model::new(stored);
            // A third of the keys belong elsewhere, the highest ones too.
            model.foreign = (0..200)
                .filter(|i| i % 3 == 0)
                .map(|i| format!("k{i:03}"))
                .collect();
            for i in 0..200 {
                if rng.bool() {
                    model.add(&format!("k{i:03}"), rng.i64(-40..=40));
                }
            }
            for limit in [1, 7, 60] {
                assert_eq!(
                    run(&mut model, limit),
                    rank(model.truth(), limit),
                    "seed {seed}, limit {limit}"
                );
            }
        }
    }

    #[test]
    fn search_reads_keys_by_the_limit_not_by_the_pending_keys() {
        // 10,000 stored keys far apart, every one with a small pending
        // delta: one round of 2 × limit per list settles it.
        let stored: BTreeMap<String, i64> = (0..10_000)
            .map(|i| (format!("k{i:05}"), (i * 7919 % 10_000) * 10 + 1))
            .collect();
        let mut model = Model::new(stored);
        let mut rng = fastrand::Rng::with_seed(1);
        for i in 0..10_000 {
            model.add(&format!("k{i:05}"), rng.i64(-5..=5));
        }
        for limit in [1, 10, 100] {
            model.read = 0;
            assert_eq!(run(&mut model, limit), rank(model.truth(), limit));
            assert!(
                model.read <= 2 * first_round(limit),
                "top {limit} read {} keys",
                model.read
            );
        }
        // The stored leader loses almost everything: the next round reads
        // more, still a small multiple of the limit.
        let leader = model
            .stored
            .iter()
            .max_by_key(|(_, c)| **c)
            .map(|(k, _)| k.clone())
            .expect("keys");
        model.add(&leader, -99_900);
        model.read = 0;
        assert_eq!(run(&mut model, 10), rank(model.truth(), 10));
        assert!(
            model.read <= 8 * first_round(10),
            "read {} keys",
            model.read
        );
    }
}
