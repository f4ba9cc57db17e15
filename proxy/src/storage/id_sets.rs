//! The stored form of event id sets (`schema/010_id_sets.sql`,
//! `schema/011_packed_sets.sql`), as pure functions: which set an id
//! belongs to, an event's entry, and the segment list a set row holds.
//!
//! Kept apart from the SQL (`storage::ids`) so the encoding can be tested
//! and reasoned about alone: a set row is what makes a retried event a
//! duplicate, so reading it wrong would count twice.

use std::collections::{BTreeMap, HashMap, HashSet};

use sha2::{Digest, Sha256};

/// Ids `<prefix>/<n>` with `n` in one block of this many share a set.
const BLOCK: u64 = 1024;

/// Bytes of one entry.
pub const ENTRY_LEN: usize = 16;

/// One counted event: the first 16 bytes of SHA-256 over
/// `routing key 0x00 id`. Two different events share an entry with
/// probability about 2^-128 per pair: below any hardware error rate.
pub type Entry = [u8; ENTRY_LEN];

/// Bytes of a segment's header: tag (8) and entry count (4).
const HEADER_LEN: usize = 12;

/// The set key of an id:
///
/// - `<p> 0x01 <m div 1024>` for `<p><m>/0`, where `<m>` is the
///   decimal (1 to 18 digits) that ends the part before the slash: the
///   first event of requests whose `Idempotency-Key`s end in a sequence
///   number, so a thousand single-event requests share a row (schema
///   version 5, `schema/011_packed_sets.sql`);
/// - `<prefix> 0x00 <n div 1024>` for any other `<prefix>/<n>` with `n` a
///   plain decimal (no sign, no leading zero, at most 9 digits): the
///   events of one request;
/// - the id itself otherwise.
///
/// An id is printable ASCII, so a key with a 0x00 or 0x01 is never an
/// id's own key, and the two kinds of block never meet.
pub fn set_key(id: &[u8]) -> Vec<u8> {
    key_of(set_of(id))
}

/// Whether `key` is the set of the first events of a block of numbered
/// requests (`<p> 0x01 <block>`): the only sets that ids of many requests
/// share. No other key holds a 0x01 (ids are printable ASCII).
pub fn is_shared(key: &[u8]) -> bool {
    key.contains(&1)
}

/// The key of the set schema version 4 kept `id` in, when version 5 keeps
/// it elsewhere (`<p><m>/0`): where a retry of an event counted by an
/// older release is found during the change-over.
pub fn v4_key_if_moved(id: &[u8]) -> Option<Vec<u8>> {
    let (now, then) = (set_of(id), v4_set_of(id));
    (now != then).then(|| key_of(then))
}

/// A set key as parts, borrowed from the id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SetParts<'a> {
    /// The id is its own set.
    Own(&'a [u8]),
    /// `<prefix>/<n>`: the prefix and `n`'s block.
    Request(&'a [u8], u64),
    /// `<p><m>/0`: `p` and `m`'s block.
    Sequence(&'a [u8], u64),
}

fn set_of(id: &[u8]) -> SetParts<'_> {
    match indexed(id) {
        Some((head, 0)) => match numbered(head) {
            Some((p, m)) => SetParts::Sequence(p, m / BLOCK),
            None => SetParts::Request(head, 0),
        },
        Some((head, n)) => SetParts::Request(head, n / BLOCK),
        None => SetParts::Own(id),
    }
}

/// [`set_of`] as schema version 4 had it: no sequence sets.
fn v4_set_of(id: &[u8]) -> SetParts<'_> {
    match indexed(id) {
        Some((head, n)) => SetParts::Request(head, n / BLOCK),
        None => SetParts::Own(id),
    }
}

/// `<head>/<n>` with `n` a plain decimal (no sign, no leading zero, at
/// most 9 digits): the head and `n`.
fn indexed(id: &[u8]) -> Option<(&[u8], u64)> {
    let slash = id.iter().rposition(|b| *b == b'/')?;
    let digits = &id[slash + 1..];
    let plain = !digits.is_empty()
        && digits.len() <= 9
        && digits.iter().all(u8::is_ascii_digit)
        && (digits.len() == 1 || digits[0] != b'0');
    plain.then(|| (&id[..slash], decimal(digits)))
}

/// `<p><m>` with `m` the decimal of 1 to 18 digits (leading zeros
/// allowed) that ends `head`: `p` and `m`.
fn numbered(head: &[u8]) -> Option<(&[u8], u64)> {
    let p = head.len() - head.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    let digits = &head[p..];
    (1..=18)
        .contains(&digits.len())
        .then(|| (&head[..p], decimal(digits)))
}

/// The value of ASCII digits (at most 19 of them, so it fits).
fn decimal(digits: &[u8]) -> u64 {
    digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'))
}

fn key_of(parts: SetParts<'_>) -> Vec<u8> {
    let (prefix, mark, block) = match parts {
        SetParts::Own(id) => return id.to_vec(),
        SetParts::Request(prefix, block) => (prefix, 0u8, block),
        SetParts::Sequence(p, block) => (p, 1u8, block),
    };
    let mut key = prefix.to_vec();
    key.push(mark);
    key.extend_from_slice(block.to_string().as_bytes());
    key
}

/// One event of a set in a [`Plan`]: its entry and its index in the batch.
pub type Member = (Entry, usize);

/// A set's key and members.
pub type PlannedSet = (Vec<u8>, Vec<Member>);

/// A batch's ids grouped by set: what the flush transaction writes and
/// reads, computed once per batch (it hashes every event).
#[derive(Debug, Default)]
pub struct Plan {
    /// In set-key order (the order rows are locked in, so two batches
    /// never wait for each other crosswise): each set's key and members,
    /// `(entry, index of the event in the batch)` in entry order.
    pub sets: Vec<PlannedSet>,
    /// Events that repeat an earlier one of the batch (same counter and
    /// id; a replayed log may hold a retry twice): duplicates whatever
    /// the database says.
    pub repeats: Vec<usize>,
}

impl Plan {
    /// The plan of events given as `(id, entry)` (the entry of the event's
    /// counter and id, [`entry`]), in batch order.
    pub fn of<'a>(events: impl IntoIterator<Item = (&'a [u8], Entry)>) -> Plan {
        // Each set's parts and members, found through `index`. A request's
        // events reach a shard one after another, so most events share the
        // previous one's set: the map is asked only when the set changes
        // (hashing a set's parts for every event was 5 % of the proxy's CPU).
        let mut groups: Vec<(SetParts<'a>, Vec<Member>)> = Vec::new();
        let mut index: HashMap<SetParts<'a>, usize, foldhash::fast::RandomState> =
            HashMap::default();
        let mut last: Option<(SetParts<'a>, usize)> = None;
        for (i, (id, entry)) in events.into_iter().enumerate() {
            let parts = set_of(id);
            let g = match last {
                Some((current, g)) if current == parts => g,
                _ => {
                    let g = *index.entry(parts).or_insert_with(|| {
                        groups.push((parts, Vec::new()));
                        groups.len() - 1
                    });
                    last = Some((parts, g));
                    g
                }
            };
            groups[g].1.push((entry, i));
        }
        let mut repeats = Vec::new();
        let mut sets: Vec<PlannedSet> = groups
            .into_iter()
            .map(|(parts, mut members)| {
                // The first copy of an entry counts; later ones repeat it.
                // Entry order is the bytes' order, compared as one
                // big-endian number rather than through `memcmp`.
                members.sort_unstable_by_key(|(e, i)| (u128::from_be_bytes(*e), *i));
                members.dedup_by(|later, first| {
                    let same = later.0 == first.0;
                    if same {
                        repeats.push(later.1);
                    }
                    same
                });
                (key_of(parts), members)
            })
            .collect();
        sets.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        repeats.sort_unstable();
        Plan { sets, repeats }
    }
}

/// `routing key 0x00 id`: one event's identity (what "counted once" is
/// about; its [`entry`] is a hash of these bytes).
pub fn identity(routing_key: &[u8], id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(routing_key.len() + 1 + id.len());
    k.extend_from_slice(routing_key);
    k.push(0);
    k.extend_from_slice(id);
    k
}

/// The entry of one event (see [`Entry`]).
pub fn entry(routing_key: &[u8], id: &[u8]) -> Entry {
    let mut h = Sha256::new();
    h.update(routing_key);
    h.update([0u8]);
    h.update(id);
    let digest = h.finalize();
    let mut e = [0u8; ENTRY_LEN];
    e.copy_from_slice(&digest[..ENTRY_LEN]);
    e
}

/// What one batch added to a set: its tag and entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub tag: u64,
    pub entries: Vec<Entry>,
}

/// A stored segment list that does not parse: something other than tally
/// wrote the row.
#[derive(Debug, thiserror::Error)]
#[error("malformed event id set row: {0}")]
pub struct Malformed(&'static str);

/// Appends one segment's bytes to `out`.
pub fn encode(tag: u64, entries: &[Entry], out: &mut Vec<u8>) {
    out.reserve(HEADER_LEN + entries.len() * ENTRY_LEN);
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(e);
    }
}

/// The segments of a stored row, in the order they were added.
pub fn decode(mut segs: &[u8]) -> Result<Vec<Segment>, Malformed> {
    let mut out = Vec::new();
    while !segs.is_empty() {
        let (header, rest) = segs
            .split_at_checked(HEADER_LEN)
            .ok_or(Malformed("a segment header is cut short"))?;
        let (tag, count) = header.split_at(8);
        let tag = u64::from_le_bytes(tag.try_into().map_err(|_| Malformed("tag"))?);
        let count = u32::from_le_bytes(count.try_into().map_err(|_| Malformed("count"))?) as usize;
        let (body, rest) = count
            .checked_mul(ENTRY_LEN)
            .and_then(|len| rest.split_at_checked(len))
            .ok_or(Malformed("a segment's entries are cut short"))?;
        let entries = body
            .chunks_exact(ENTRY_LEN)
            .map(|c| {
                let mut e = [0u8; ENTRY_LEN];
                e.copy_from_slice(c);
                e
            })
            .collect();
        out.push(Segment { tag, entries });
        segs = rest;
    }
    Ok(out)
}

/// The union of segment lists, one segment per tag (a copy of a row may
/// reach a server that holds an older copy of the same row): the encoded
/// row and its entry count. Entries of one tag are kept once each.
pub fn union<'a>(lists: impl IntoIterator<Item = &'a [Segment]>) -> (Vec<u8>, usize) {
    let mut by_tag: BTreeMap<u64, (Vec<Entry>, HashSet<Entry>)> = BTreeMap::new();
    for list in lists {
        for s in list {
            let (ordered, seen) = by_tag.entry(s.tag).or_default();
            for e in &s.entries {
                if seen.insert(*e) {
                    ordered.push(*e);
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut n = 0;
    for (tag, (entries, _)) in by_tag {
        n += entries.len();
        encode(tag, &entries, &mut out);
    }
    (out, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_one_request_share_a_set_per_block_and_other_ids_are_their_own() {
        assert_eq!(set_key(b"req-7/1023"), b"req-7\x000");
        assert_eq!(set_key(b"req-7/1024"), b"req-7\x001");
        // A key may itself hold slashes: the last one splits.
        assert_eq!(set_key(b"a/b/12"), b"a/b\x000");
        // The first event of a request whose key ends in a number: the
        // requests' block of 1024 numbers shares one set.
        assert_eq!(set_key(b"req-7/0"), b"req-\x010");
        assert_eq!(set_key(b"req-1023/0"), b"req-\x010");
        assert_eq!(set_key(b"req-1024/0"), b"req-\x011");
        assert_eq!(set_key(b"req-0009/0"), b"req-\x010", "leading zeros");
        assert_eq!(set_key(b"42/0"), b"\x010", "a key that is a number");
        assert_eq!(set_key(b"req-7/1"), b"req-7\x000", "the rest stay");
        let long = b"r123456789012345678/0";
        assert_eq!(set_key(long), b"r\x01120563270519868", "18 digits");
        assert_eq!(
            set_key(b"r1234567890123456789/0"),
            b"r1234567890123456789\x000"
        );
        assert_eq!(set_key(b"req-x/0"), b"req-x\x000", "no number");
        assert!(is_shared(&set_key(b"req-7/0")));
        for own in [&b"req-7/1"[..], b"req-x/0", b"own"] {
            assert!(!is_shared(&set_key(own)));
        }
        // Where version 4 kept the ids that moved (and only those).
        assert_eq!(v4_key_if_moved(b"req-7/0"), Some(b"req-7\x000".to_vec()));
        for stayed in [&b"req-7/1"[..], b"req-x/0", b"own", b"a/b/12"] {
            assert_eq!(v4_key_if_moved(stayed), None);
        }
        // Not a plain decimal: the id is its own set.
        for id in [
            &b"page-view-1"[..],
            b"x/",
            b"x/01",
            b"x/-1",
            b"x/1e3",
            b"x/1234567890",
        ] {
            assert_eq!(set_key(id), id, "{}", String::from_utf8_lossy(id));
        }
    }

    #[test]
    fn a_plan_groups_by_set_in_key_order_and_finds_repeats() {
        let events: Vec<(&[u8], &[u8])> = vec![
            (b"v\0a", b"r/1"),
            (b"v\0b", b"own"),
            (b"v\0a", b"r/0"),
            (b"v\0a", b"r/1"), // a repeat of event 0
            (b"v\0b", b"r/2000"),
            (b"v\0c", b"r/1"), // the same id on another counter: no repeat
        ];
        let plan = Plan::of(events.iter().map(|&(rk, id)| (id, entry(rk, id))));
        assert_eq!(plan.repeats, vec![3]);
        let keys: Vec<&[u8]> = plan.sets.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(keys, vec![&b"own"[..], b"r\x000", b"r\x001"]);
        let mut members: Vec<usize> = plan.sets[1].1.iter().map(|(_, i)| *i).collect();
        members.sort_unstable();
        assert_eq!(members, vec![0, 2, 5], "r/0, r/1 on a and r/1 on c");
        for (key, members) in &plan.sets {
            for (e, i) in members {
                let (rk, id) = events[*i];
                assert_eq!(*e, entry(rk, id));
                assert_eq!(set_key(id), *key);
            }
            assert!(members.windows(2).all(|w| w[0].0 < w[1].0), "entry order");
        }
    }

    #[test]
    fn an_entry_depends_on_the_counter_and_the_id() {
        let a = entry(b"v\0a", b"x/1");
        assert_eq!(a, entry(b"v\0a", b"x/1"));
        assert_ne!(a, entry(b"v\0b", b"x/1"), "the same id on another counter");
        assert_ne!(a, entry(b"v\0a", b"x/2"));
        // The separator keeps `routing key | id` splits apart.
        assert_ne!(entry(b"v\0a", b"bc"), entry(b"v\0ab", b"c"));
    }

    #[test]
    fn segments_round_trip_and_a_cut_row_is_refused() {
        let (e1, e2, e3) = (entry(b"v\0a", b"1"), entry(b"v\0a", b"2"), [7u8; 16]);
        let mut row = Vec::new();
        encode(9, &[e1, e2], &mut row);
        encode(4, &[], &mut row);
        encode(u64::MAX, &[e3], &mut row);
        let segs = decode(&row).expect("decodes");
        assert_eq!(
            segs,
            vec![
                Segment {
                    tag: 9,
                    entries: vec![e1, e2]
                },
                Segment {
                    tag: 4,
                    entries: vec![]
                },
                Segment {
                    tag: u64::MAX,
                    entries: vec![e3]
                },
            ]
        );
        assert!(decode(&row[..row.len() - 1]).is_err(), "entries cut");
        assert!(decode(&row[..5]).is_err(), "header cut");
        assert_eq!(decode(&[]).expect("empty").len(), 0);
    }

    #[test]
    fn the_union_keeps_one_segment_per_tag_and_each_entry_once() {
        let (e1, e2, e3) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        let here = vec![
            Segment {
                tag: 5,
                entries: vec![e1, e2],
            },
            Segment {
                tag: 6,
                entries: vec![e3],
            },
        ];
        // A copy of the row that holds the tag-5 segment again, and more.
        let copy = vec![
            Segment {
                tag: 5,
                entries: vec![e1, e2],
            },
            Segment {
                tag: 7,
                entries: vec![e1],
            },
        ];
        let (row, n) = union([here.as_slice(), copy.as_slice()]);
        assert_eq!(n, 4);
        let segs = decode(&row).expect("decodes");
        let tags: Vec<u64> = segs.iter().map(|s| s.tag).collect();
        assert_eq!(tags, vec![5, 6, 7]);
        assert_eq!(segs[0].entries, vec![e1, e2]);
        // Idempotent: the union with itself is itself.
        let (again, m) = union([segs.as_slice(), segs.as_slice()]);
        assert_eq!((again, m), (row, n));
    }
}
