//! The on-disk format of one WAL record, and reading a segment back.
//!
//! A record is the part of one accepted request that went to one or more
//! groups: `[u32 body length][u32 CRC-32 of body][body]`, little endian,
//! where the body is `u16 groups`, then per group `u8 name length, name,
//! u32 deltas`, then per delta `u16 routing-key length, routing key, i64
//! minute, i64 delta`. A record that carries any event id (idempotent
//! increments) sets the high bit of `groups` ([`WITH_IDS`]) and follows
//! each delta with `u8 id length, id` (0: none); records without ids keep
//! the original layout byte for byte, so logs of earlier releases replay
//! unchanged and plain writes pay nothing. A record's LSN is not stored: it is the record's
//! ordinal within its life's log (segment files are named by the LSN of
//! their first record), which the single appender guarantees.
//!
//! Segments are preallocated with zeros, so a zero header ends the log.
//! A crash can leave a torn record at the end of the newest segment (only
//! zeros behind it); the reader stops there ([`Tail::Torn`]). A record that
//! fails its CRC with data behind it is corruption, reported, never
//! skipped silently.

use crate::storage::buffer::Delta;

/// Bytes of the record header (length + CRC).
pub const HEADER: usize = 8;

/// The flag in the group count of a record whose deltas carry ids. Group
/// counts are far below it (a topology has at most a few hundred groups).
pub const WITH_IDS: u16 = 0x8000;

/// One decoded delta of a record, owning its routing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedDelta {
    pub routing_key: Box<[u8]>,
    pub minute: i64,
    pub delta: i64,
    /// The event's idempotency id, if it had one.
    pub id: Option<Box<[u8]>>,
}

/// One decoded record: per group name, its deltas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub groups: Vec<(String, Vec<OwnedDelta>)>,
}

/// Encodes one record (header included) for the given groups' deltas.
/// Group names are at most 255 bytes and routing keys at most 65,535
/// (validation keeps them far below: names are topology identifiers, keys
/// are `ns 0x00 key` of at most 64 + 1 + 256 bytes).
pub fn encode(groups: &[(&str, Vec<Delta<'_>>)]) -> Vec<u8> {
    let with_ids = groups
        .iter()
        .any(|(_, ds)| ds.iter().any(|d| d.id.is_some()));
    let size: usize = 2 + groups
        .iter()
        .map(|(name, ds)| {
            1 + name.len()
                + 4
                + ds.iter()
                    .map(|d| {
                        2 + d.routing_key.len()
                            + 16
                            + usize::from(with_ids)
                            + d.id.map_or(0, <[u8]>::len)
                    })
                    .sum::<usize>()
        })
        .sum::<usize>();
    let mut out = Vec::with_capacity(HEADER + size);
    out.extend_from_slice(&[0; HEADER]);
    let flag = if with_ids { WITH_IDS } else { 0 };
    out.extend_from_slice(&(groups.len() as u16 | flag).to_le_bytes());
    for (name, deltas) in groups {
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(deltas.len() as u32).to_le_bytes());
        for d in deltas {
            out.extend_from_slice(&(d.routing_key.len() as u16).to_le_bytes());
            out.extend_from_slice(d.routing_key);
            out.extend_from_slice(&d.minute.to_le_bytes());
            out.extend_from_slice(&d.delta.to_le_bytes());
            if with_ids {
                // Ids are at most 134 bytes (`Idempotency-Key` + `/index`).
                let id = d.id.unwrap_or_default();
                out.push(id.len() as u8);
                out.extend_from_slice(id);
            }
        }
    }
    let body_len = (out.len() - HEADER) as u32;
    let crc = crc32fast::hash(&out[HEADER..]);
    out[0..4].copy_from_slice(&body_len.to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// How a segment's bytes ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// Every byte belonged to a whole, intact record.
    Clean,
    /// The last record is incomplete or fails its CRC and nothing follows
    /// it: a write cut short by a crash (never acknowledged).
    Torn { offset: usize },
    /// A damaged record with more data behind it.
    Corrupt { offset: usize, why: String },
}

/// Decodes every record of one segment's bytes, in order.
pub fn decode_all(bytes: &[u8]) -> (Vec<Record>, Tail) {
    let mut records = Vec::new();
    let mut at = 0;
    let zeros_from = |from: usize| bytes.get(from..).is_none_or(|r| r.iter().all(|b| *b == 0));
    while at < bytes.len() {
        if zeros_from(at) {
            // The preallocated, never written rest of the segment.
            return (records, Tail::Clean);
        }
        let Some(header) = bytes.get(at..at + HEADER) else {
            return (records, Tail::Torn { offset: at });
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let Some(body) = bytes.get(at + HEADER..at + HEADER + len) else {
            return (records, Tail::Torn { offset: at });
        };
        let end = at + HEADER + len;
        let damaged = |why: String| {
            if zeros_from(end) {
                Tail::Torn { offset: at }
            } else {
                Tail::Corrupt { offset: at, why }
            }
        };
        if crc32fast::hash(body) != crc {
            return (records, damaged("CRC mismatch".into()));
        }
        match decode_body(body) {
            Some(r) => records.push(r),
            None => return (records, damaged("malformed record body".into())),
        }
        at = end;
    }
    (records, Tail::Clean)
}

/// A little cursor over a record body; `None` on any overrun.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i64(&mut self) -> Option<i64> {
        let b = self.take(8)?;
        let mut a = [0; 8];
        a.copy_from_slice(b);
        Some(i64::from_le_bytes(a))
    }
}

fn decode_body(body: &[u8]) -> Option<Record> {
    let mut c = Cursor(body);
    let flagged = c.u16()?;
    let with_ids = flagged & WITH_IDS != 0;
    let n_groups = flagged & !WITH_IDS;
    let mut groups = Vec::with_capacity(n_groups as usize);
    for _ in 0..n_groups {
        let name_len = c.u8()? as usize;
        let name = String::from_utf8(c.take(name_len)?.to_vec()).ok()?;
        let n = c.u32()? as usize;
        // Each delta takes at least 18 bytes: a bogus count cannot make
        // us allocate more than the body could hold.
        let mut deltas = Vec::with_capacity(n.min(c.0.len() / 18));
        for _ in 0..n {
            let klen = c.u16()? as usize;
            let routing_key = c.take(klen)?.into();
            let minute = c.i64()?;
            let delta = c.i64()?;
            let id = match with_ids {
                true => match c.u8()? as usize {
                    0 => None,
                    len => Some(Box::from(c.take(len)?)),
                },
                false => None,
            };
            deltas.push(OwnedDelta {
                routing_key,
                minute,
                delta,
                id,
            });
        }
        groups.push((name, deltas));
    }
    c.0.is_empty().then_some(Record { groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        encode(&[
            (
                "g0",
                vec![
                    Delta {
                        routing_key: b"v\0a",
                        ring_pos: 1,
                        minute: 60,
                        delta: 5,
                        id: None,
                        dups: None,
                    },
                    Delta {
                        routing_key: b"v\0b",
                        ring_pos: 2,
                        minute: -120,
                        delta: -3,
                        id: None,
                        dups: None,
                    },
                ],
            ),
            (
                "g1",
                vec![Delta {
                    routing_key: b"w\0c",
                    ring_pos: 3,
                    minute: i64::MAX - 59,
                    delta: i64::MIN,
                    id: None,
                    dups: None,
                }],
            ),
        ])
    }

    #[test]
    fn round_trips_records_in_order() {
        let mut bytes = sample();
        bytes.extend(encode(&[("g2", vec![])]));
        let (records, tail) = decode_all(&bytes);
        assert_eq!(tail, Tail::Clean);
        assert_eq!(records.len(), 2);
        let g = &records[0].groups;
        assert_eq!(g[0].0, "g0");
        assert_eq!(&*g[0].1[1].routing_key, b"v\0b");
        assert_eq!((g[0].1[1].minute, g[0].1[1].delta), (-120, -3));
        assert_eq!(g[1].1[0].delta, i64::MIN);
        assert_eq!(records[1].groups, vec![("g2".to_string(), vec![])]);
    }

    /// A record written by the previous release (no ids, the original
    /// layout, bytes spelled out here rather than produced by `encode`)
    /// still decodes; one with ids round-trips them, and a plain record is
    /// still written in the old layout.
    #[test]
    fn old_format_records_replay_and_ids_round_trip() {
        let mut body = Vec::new();
        body.extend_from_slice(&1u16.to_le_bytes());
        body.push(2);
        body.extend_from_slice(b"g0");
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&3u16.to_le_bytes());
        body.extend_from_slice(b"v\0a");
        body.extend_from_slice(&60i64.to_le_bytes());
        body.extend_from_slice(&7i64.to_le_bytes());
        let mut old = Vec::new();
        old.extend_from_slice(&(body.len() as u32).to_le_bytes());
        old.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        old.extend_from_slice(&body);
        let (records, tail) = decode_all(&old);
        assert_eq!(tail, Tail::Clean);
        let want = OwnedDelta {
            routing_key: b"v\0a".as_slice().into(),
            minute: 60,
            delta: 7,
            id: None,
        };
        assert_eq!(records[0].groups, vec![("g0".to_string(), vec![want])]);
        let plain = Delta {
            routing_key: b"v\0a",
            ring_pos: 1,
            minute: 60,
            delta: 7,
            id: None,
            dups: None,
        };
        assert_eq!(
            encode(&[("g0", vec![plain])]),
            old,
            "plain records keep the old layout"
        );

        let ided = Delta {
            id: Some(b"pv-1"),
            ..plain
        };
        let bytes = encode(&[("g0", vec![ided, plain])]);
        let (records, tail) = decode_all(&bytes);
        assert_eq!(tail, Tail::Clean);
        let ds = &records[0].groups[0].1;
        assert_eq!(ds[0].id.as_deref(), Some(b"pv-1".as_slice()));
        assert_eq!((ds[1].id.as_deref(), ds[1].delta), (None, 7));
        // Cut anywhere, a record with ids is a torn tail, never garbage.
        for cut in 1..bytes.len() {
            let (records, _) = decode_all(&bytes[..cut]);
            assert!(records.is_empty(), "cut at {cut}");
        }
    }

    #[test]
    fn a_cut_short_last_record_is_a_torn_tail_at_every_length() {
        let one = sample();
        for cut in 1..one.len() {
            let mut bytes = one.clone();
            bytes.extend_from_slice(&one[..cut]);
            let (records, tail) = decode_all(&bytes);
            assert_eq!(records.len(), 1, "cut at {cut}");
            assert_eq!(tail, Tail::Torn { offset: one.len() }, "cut at {cut}");
        }
    }

    #[test]
    fn zeros_end_the_log_and_a_torn_record_before_zeros_is_a_tail() {
        let one = sample();
        let mut bytes = one.clone();
        bytes.extend(vec![0; 4096]);
        let (records, tail) = decode_all(&bytes);
        assert_eq!((records.len(), tail), (1, Tail::Clean));
        // A record cut short inside a preallocated segment: its prefix,
        // then zeros.
        for cut in 1..one.len() {
            let mut bytes = one.clone();
            bytes.extend_from_slice(&one[..cut]);
            bytes.extend(vec![0; 4096]);
            let (records, tail) = decode_all(&bytes);
            assert_eq!(records.len(), 1, "cut at {cut}");
            if cut > HEADER {
                assert_eq!(tail, Tail::Torn { offset: one.len() }, "cut at {cut}");
            } else {
                // A partial header followed by zeros is still the tail
                // (a zero header with data behind it would not be).
                assert_ne!(
                    std::mem::discriminant(&tail),
                    std::mem::discriminant(&Tail::Corrupt {
                        offset: 0,
                        why: String::new()
                    }),
                    "cut at {cut}: {tail:?}"
                );
            }
        }
        // Zeros followed by data are corruption.
        let mut bytes = one.clone();
        bytes.extend(vec![0; 64]);
        bytes.extend_from_slice(&one);
        let (records, tail) = decode_all(&bytes);
        assert_eq!(records.len(), 1);
        assert!(matches!(tail, Tail::Corrupt { .. }), "{tail:?}");
    }

    #[test]
    fn damage_with_data_behind_it_is_corruption_not_a_tail() {
        let one = sample();
        let mut bytes = one.clone();
        bytes.extend_from_slice(&one);
        bytes[HEADER + 3] ^= 0x40;
        let (records, tail) = decode_all(&bytes);
        assert!(records.is_empty());
        assert!(matches!(tail, Tail::Corrupt { offset: 0, .. }), "{tail:?}");
        // The same flip in the last record is a torn tail.
        let mut bytes = one.clone();
        bytes.extend_from_slice(&one);
        bytes[one.len() + HEADER + 3] ^= 0x40;
        let (records, tail) = decode_all(&bytes);
        assert_eq!(records.len(), 1);
        assert_eq!(tail, Tail::Torn { offset: one.len() });
    }
}
