//! The rows a batch writes: derivation of minute, hour, day and total rows
//! from a batch's counters, and the additive multi-row upsert that writes
//! them (flushes, WAL replay, re-applied quarantine, the rollup and the
//! reshard copy).
//!
//! Since schema version 2 a batch writes hour and day rows only for its
//! minutes below the group's rollup watermark ("late" minutes, whose hours
//! are rolled up already); the rollup writes the others later
//! (`storage::rollup`). The watermark is known only inside the flush's
//! transaction, so rows are derived first for the common case (nothing
//! late) and again, rarely, when the watermark says otherwise
//! ([`FlushRows::for_watermark`]).
//!
//! Every value reaches SQL as a bound parameter; the only text spliced into
//! statements is table names from [`Tier`].

use std::sync::Arc;

use mysql_async::Value;
use mysql_async::prelude::*;

use crate::domain::tier::Tier;
use crate::storage::buffer::{Batch, Minutes, Sum};

/// Rows per multi-row upsert at most. 1,000 rows × 5 parameters stays far
/// below the 65,535-parameter limit.
pub const ROWS_PER_STATEMENT: usize = 1000;

/// Encoded size of one row's parameters beyond its ns and key bytes (three
/// 8-byte integers, type and length headers, with slack).
const ROW_OVERHEAD_BYTES: usize = 48;

/// Splits rows into statements of at most [`ROWS_PER_STATEMENT`] rows and
/// at most `max_bytes` of parameters, so no statement can exceed the
/// server's `max_allowed_packet`.
fn chunks(rows: &[Row], max_bytes: usize) -> Vec<&[Row]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, r) in rows.iter().enumerate() {
        let size = r.counter.len() + ROW_OVERHEAD_BYTES;
        if i > start && (i - start == ROWS_PER_STATEMENT || bytes + size > max_bytes) {
            out.push(&rows[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < rows.len() {
        out.push(&rows[start..]);
    }
    out
}

/// The rows one batch writes, per tier, in primary-key order.
#[derive(Debug, Clone)]
pub struct FlushRows {
    pub tiers: [(Tier, Vec<Row>); 4],
    /// Counters (indices into the derived slice) one of whose sums does not
    /// fit a stored BIGINT: they have no rows here; a flush quarantines them.
    pub unfit: Vec<usize>,
    /// Hour and day rows hold the minutes below this (the rollup
    /// watermark they were derived for); `i64::MAX`: every minute.
    pub below: i64,
    /// The earliest and latest minute of the derived counters.
    pub minutes: Option<(i64, i64)>,
}

/// One upsert row. `bucket` is ignored for the total tier. The counter's
/// routing key is shared (`Arc`): its rows of every tier point to one copy,
/// so a batch held through a long master outage costs its rows 40 bytes
/// each beyond the batch itself, not four copies of every key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// `ns 0x00 key`.
    pub counter: Arc<[u8]>,
    pub bucket: i64,
    pub ring_pos: u64,
    pub delta: i64,
}

impl Row {
    pub fn new(ns: &[u8], key: &[u8], bucket: i64, ring_pos: u64, delta: i64) -> Row {
        let mut rk = Vec::with_capacity(ns.len() + 1 + key.len());
        rk.extend_from_slice(ns);
        rk.push(0);
        rk.extend_from_slice(key);
        Row {
            counter: rk.into(),
            bucket,
            ring_pos,
            delta,
        }
    }

    pub fn ns(&self) -> &[u8] {
        ns_and_key(&self.counter).0
    }

    pub fn key(&self) -> &[u8] {
        ns_and_key(&self.counter).1
    }
}

/// A counter of a batch: its routing key (`ns 0x00 key`) and pending minutes.
pub type Counter = (Box<[u8]>, Minutes);

/// Splits a routing key into namespace and key.
pub fn ns_and_key(rk: &[u8]) -> (&[u8], &[u8]) {
    let split = rk.iter().position(|b| *b == 0).unwrap_or(rk.len());
    (&rk[..split], rk.get(split + 1..).unwrap_or_default())
}

/// A counter's minutes summed per bucket of `width` seconds (all in one
/// for `None`) into `out`, ascending, buckets that cancel out dropped. `sorted` is the
/// counter's entries sorted by minute, so one bucket's minutes are
/// adjacent: O(m log m) for the sort, linear here.
pub fn bucket_sums(sorted: &[(i64, Sum)], width: Option<i64>, out: &mut Vec<(i64, Sum)>) {
    out.clear();
    for &(m, d) in sorted {
        let b = width.map_or(0, |w| m - m.rem_euclid(w));
        match out.last_mut() {
            Some((last, sum)) if *last == b => *sum += d,
            _ => out.push((b, d)),
        }
    }
    out.retain(|(_, d)| *d != 0);
}

impl FlushRows {
    /// Rows read from storage (a reshard copy, the rollup): nothing unfit,
    /// hour and day rows as they are.
    pub fn stored(tiers: [(Tier, Vec<Row>); 4]) -> FlushRows {
        FlushRows {
            tiers,
            unfit: Vec::new(),
            below: i64::MAX,
            minutes: None,
        }
    }

    /// Derives minute, hour, day and total rows from a batch, every minute
    /// late (the most rows a batch can write: what a group whose watermark
    /// passed all its minutes gets). Counters are
    /// already sorted by routing key (`ns 0x00 key`), which orders like the
    /// `(ns, ckey)` primary key prefix because `ns` never contains 0x00.
    /// Buckets whose deltas cancel out are skipped: they change nothing.
    pub fn derive(batch: &Batch) -> FlushRows {
        Self::derive_below(&batch.counters, i64::MAX)
    }

    /// The rows of a batch for the common case, nothing late: minute and
    /// total rows only. The flush transaction derives again if its group's
    /// watermark says some minutes are late ([`Self::for_watermark`]).
    pub fn derive_fresh(counters: &[Counter]) -> FlushRows {
        Self::derive_below(counters, i64::MIN)
    }

    /// The rows of a batch written to a group whose rollup watermark is
    /// `below`: minute and total rows of every minute, hour and day rows of
    /// the minutes below it. A counter with any bucket
    /// sum outside the BIGINT range gets no rows and is listed in `unfit`
    /// (all its tiers or none, so its minutes, hours, days and total keep
    /// agreeing).
    pub fn derive_below(counters: &[Counter], below: i64) -> FlushRows {
        // Exact for the common case of one minute per counter; a batch held
        // through an outage then carries no doubling slack.
        let entries: usize = counters.iter().map(|(_, m)| m.len()).sum();
        let mut tiers = [
            (Tier::Minute, Vec::with_capacity(entries)),
            (Tier::Hour, Vec::with_capacity(entries)),
            (Tier::Day, Vec::with_capacity(entries)),
            (Tier::Total, Vec::with_capacity(counters.len())),
        ];
        let mut unfit = Vec::new();
        let mut sorted: Vec<(i64, Sum)> = Vec::new();
        let mut sums: [Vec<(i64, Sum)>; 4] = Default::default();
        let mut span: Option<(i64, i64)> = None;
        for (i, (rk, minutes)) in counters.iter().enumerate() {
            sorted.clear();
            sorted.extend(minutes.iter());
            sorted.sort_unstable_by_key(|(m, _)| *m);
            if let (Some(first), Some(last)) = (sorted.first(), sorted.last()) {
                span = Some(span.map_or((first.0, last.0), |(lo, hi)| {
                    (lo.min(first.0), hi.max(last.0))
                }));
            }
            // Late minutes (below the watermark) come first in `sorted`.
            let late = sorted.partition_point(|(m, _)| *m < below);
            for (s, (tier, _)) in sums.iter_mut().zip(&tiers) {
                let of = match tier {
                    Tier::Hour | Tier::Day => &sorted[..late],
                    Tier::Minute | Tier::Total => &sorted[..],
                };
                bucket_sums(of, tier.width(), s);
            }
            // A counter with a minute row always has a total row, even one
            // whose deltas sum to zero: a reshard finds a range's minute
            // rows through the totals (schema version 3).
            if sums[3].is_empty() && !sums[0].is_empty() {
                sums[3].push((0, Sum::default()));
            }
            let fits = |s: &Vec<(i64, Sum)>| s.iter().all(|(_, d)| i64::try_from(*d).is_ok());
            if !sums.iter().all(fits) {
                unfit.push(i);
                continue;
            }
            let ring_pos = tally_admin::ShardRing::position(rk);
            let counter: Arc<[u8]> = Arc::from(&rk[..]);
            for ((_, rows), s) in tiers.iter_mut().zip(&sums) {
                for &(bucket, delta) in s {
                    rows.push(Row {
                        counter: counter.clone(),
                        bucket,
                        ring_pos,
                        // Checked just above.
                        delta: i64::try_from(delta).unwrap_or_default(),
                    });
                }
            }
        }
        FlushRows {
            tiers,
            unfit,
            below,
            minutes: span,
        }
    }

    /// These rows when they are right for a group whose watermark is
    /// `watermark`, else `counters` derived again for it. They are right
    /// when no minute of theirs lies between the watermark they were
    /// derived for and this one: then the same minutes are late.
    pub fn for_watermark<'a>(
        &'a self,
        counters: &[Counter],
        watermark: i64,
    ) -> std::borrow::Cow<'a, FlushRows> {
        let (lo, hi) = (self.below.min(watermark), self.below.max(watermark));
        let same = match self.minutes {
            None => true,
            Some((first, last)) => last < lo || first >= hi,
        };
        if same {
            std::borrow::Cow::Borrowed(self)
        } else {
            std::borrow::Cow::Owned(Self::derive_below(counters, watermark))
        }
    }

    pub fn len(&self) -> usize {
        self.tiers.iter().map(|(_, r)| r.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.tiers.iter().all(|(_, r)| r.is_empty())
    }
}

fn upsert_sql(tier: Tier, rows: usize) -> String {
    let (cols, one) = match tier {
        Tier::Total => ("ns, ckey, ring_pos, count", "(?,?,?,?)"),
        _ => ("ns, ckey, bucket, ring_pos, count", "(?,?,?,?,?)"),
    };
    let mut sql = format!("INSERT INTO {} ({cols}) VALUES ", tier.table());
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str(one);
    }
    sql.push_str(" ON DUPLICATE KEY UPDATE count = count + VALUES(count)");
    sql
}

fn params(tier: Tier, rows: &[Row]) -> Vec<Value> {
    let mut p = Vec::with_capacity(rows.len() * 5);
    for r in rows {
        p.push(Value::Bytes(r.ns().to_vec()));
        p.push(Value::Bytes(r.key().to_vec()));
        if tier != Tier::Total {
            p.push(Value::Int(r.bucket));
        }
        p.push(Value::UInt(r.ring_pos));
        p.push(Value::Int(r.delta));
    }
    p
}

/// Adds every row's delta to its stored count (inserting absent rows), in
/// multi-row statements that fit `max_packet`. Shared by flushes and by the
/// reshard copy, which moves rows additively.
pub async fn upsert(
    tx: &mut mysql_async::Transaction<'_>,
    max_packet: usize,
    rows: &FlushRows,
) -> Result<(), mysql_async::Error> {
    for (tier, tier_rows) in &rows.tiers {
        // Half the packet leaves room for the statement text and framing.
        for chunk in chunks(tier_rows, max_packet / 2) {
            tx.exec_drop(upsert_sql(*tier, chunk.len()), params(*tier, chunk))
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_every_tier_and_skips_cancelled_buckets() {
        // 2024-01-01T00:00Z = 1704067200, a day boundary.
        let day = 1_704_067_200;
        let batch = Batch {
            generation: 1,
            counters: vec![
                (
                    b"v\0a".to_vec().into(),
                    vec![(day + 60, 2), (day + 3600, 3), (day - 60, 5)].into(),
                ),
                (
                    b"v\0b".to_vec().into(),
                    vec![(day, 1), (day + 60, -1)].into(),
                ),
            ],
            entries: 5,
            ..Batch::default()
        };
        let rows = FlushRows::derive(&batch);
        let get = |t: Tier| -> Vec<(String, i64, i64)> {
            rows.tiers
                .iter()
                .find(|(x, _)| *x == t)
                .map(|(_, r)| {
                    r.iter()
                        .map(|r| {
                            (
                                String::from_utf8_lossy(r.key()).into_owned(),
                                r.bucket,
                                r.delta,
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(
            get(Tier::Minute),
            [
                ("a".into(), day - 60, 5),
                ("a".into(), day + 60, 2),
                ("a".into(), day + 3600, 3),
                ("b".into(), day, 1),
                ("b".into(), day + 60, -1)
            ]
        );
        assert_eq!(
            get(Tier::Hour),
            [
                ("a".into(), day - 3600, 5),
                ("a".into(), day, 2),
                ("a".into(), day + 3600, 3)
            ],
            "b's hour cancels out"
        );
        assert_eq!(
            get(Tier::Day),
            [("a".into(), day - 86400, 5), ("a".into(), day, 5)]
        );
        // b's total adds 0, but its row is written: it has minute rows.
        assert_eq!(get(Tier::Total), [("a".into(), 0, 10), ("b".into(), 0, 0)]);
        let a = &rows.tiers[0].1[0];
        assert_eq!(*a.ns(), *b"v");
        assert_eq!(a.ring_pos, tally_admin::ShardRing::position(b"v\0a"));
    }

    #[test]
    fn hour_and_day_rows_come_only_from_minutes_below_the_watermark() {
        let day = 1_704_067_200;
        let counters: Vec<crate::storage::rows::Counter> = vec![(
            b"v\0a".to_vec().into(),
            vec![
                (day - 60, 1),
                (day + 60, 2),
                (day + 3600, 4),
                (day + 7200, 8),
            ]
            .into(),
        )];
        let buckets = |rows: &FlushRows, t: Tier| -> Vec<(i64, i64)> {
            rows.tiers
                .iter()
                .find(|(x, _)| *x == t)
                .map(|(_, r)| r.iter().map(|r| (r.bucket, r.delta)).collect())
                .unwrap_or_default()
        };
        // Nothing late: minute and total rows only.
        let fresh = FlushRows::derive_fresh(&counters);
        assert_eq!(buckets(&fresh, Tier::Minute).len(), 4);
        assert_eq!(buckets(&fresh, Tier::Total), [(0, 15)]);
        assert!(buckets(&fresh, Tier::Hour).is_empty() && buckets(&fresh, Tier::Day).is_empty());
        assert_eq!(fresh.minutes, Some((day - 60, day + 7200)));
        // The watermark at day + 1h: the first two minutes are late.
        let w = day + 3600;
        let late = fresh.for_watermark(&counters, w);
        assert!(matches!(late, std::borrow::Cow::Owned(_)));
        assert_eq!(buckets(&late, Tier::Hour), [(day - 3600, 1), (day, 2)]);
        assert_eq!(buckets(&late, Tier::Day), [(day - 86_400, 1), (day, 2)]);
        assert_eq!(buckets(&late, Tier::Minute), buckets(&fresh, Tier::Minute));
        assert_eq!(buckets(&late, Tier::Total), [(0, 15)]);
        // Derived for one watermark, right for another with no minute in
        // between: kept as they are.
        assert!(matches!(
            fresh.for_watermark(&counters, day - 3600),
            std::borrow::Cow::Borrowed(_)
        ));
        let all_late = FlushRows::derive_below(&counters, day + 7260);
        assert_eq!(buckets(&all_late, Tier::Hour).len(), 4);
        assert!(matches!(
            all_late.for_watermark(&counters, day + 10_800),
            std::borrow::Cow::Borrowed(_)
        ));
        assert!(matches!(
            late.for_watermark(&counters, day + 3600 + 1),
            std::borrow::Cow::Owned(_)
        ));
    }

    #[test]
    fn chunks_respect_row_and_byte_limits() {
        let row = |key_len: usize| Row::new(b"v", &vec![b'k'; key_len], 0, 0, 1);
        let rows: Vec<Row> = (0..2500).map(|_| row(10)).collect();
        let sizes: Vec<usize> = chunks(&rows, usize::MAX).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        // 59 bytes per row: 10 rows fit in 600 bytes.
        let sizes: Vec<usize> = chunks(&rows[..25], 600).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [10, 10, 5]);
        // A single row larger than the limit still goes out alone.
        let big = [row(256), row(256)];
        assert_eq!(chunks(&big, 10).len(), 2);
        assert!(chunks(&[], 10).is_empty());
    }

    #[test]
    fn upsert_sql_has_one_placeholder_group_per_row() {
        let sql = upsert_sql(Tier::Hour, 3);
        assert_eq!(sql.matches("(?,?,?,?,?)").count(), 3);
        assert!(sql.starts_with("INSERT INTO counter_hour"));
        assert_eq!(upsert_sql(Tier::Total, 2).matches("(?,?,?,?)").count(), 2);
    }

    // 2024-01-01T00:00Z, a day (and hour, and minute) boundary.
    const DAY0: i64 = 1_704_067_200;

    /// A routing key and its (minute, delta) entries.
    type Counter<'a> = (&'a [u8], Vec<(i64, i64)>);

    fn batch(counters: Vec<Counter<'_>>) -> Batch {
        let entries = counters.iter().map(|(_, m)| m.len()).sum();
        Batch {
            generation: 1,
            counters: counters
                .into_iter()
                .map(|(rk, m)| {
                    let m: Vec<(i64, Sum)> =
                        m.into_iter().map(|(at, d)| (at, Sum::from(d))).collect();
                    let m = Minutes::from(m);
                    (rk.to_vec().into_boxed_slice(), m)
                })
                .collect(),
            entries,
            ..Batch::default()
        }
    }

    fn tier_rows(rows: &FlushRows, t: Tier) -> &[Row] {
        &rows
            .tiers
            .iter()
            .find(|(x, _)| *x == t)
            .expect("every tier is present")
            .1
    }

    fn counts(rows: &FlushRows) -> [usize; 4] {
        [Tier::Minute, Tier::Hour, Tier::Day, Tier::Total].map(|t| tier_rows(rows, t).len())
    }

    #[test]
    fn a_counter_whose_sums_do_not_fit_64_bits_writes_no_row() {
        let rows = FlushRows::derive(&batch(vec![
            (b"v\0a", vec![(DAY0, 1)]),
            (b"v\0big", vec![(DAY0, i64::MAX), (DAY0 + 60, 2)]),
        ]));
        assert_eq!(counts(&rows), [1, 1, 1, 1], "only v/a has rows");
        assert!(
            rows.tiers
                .iter()
                .all(|(_, r)| r.iter().all(|r| *r.key() == *b"a"))
        );
    }

    #[test]
    fn tiers_come_in_a_fixed_order() {
        // One writer order for every flush: minute, hour, day, total.
        let rows = FlushRows::derive(&batch(vec![(b"v\0a", vec![(DAY0, 1)])]));
        let order: Vec<Tier> = rows.tiers.iter().map(|(t, _)| *t).collect();
        assert_eq!(order, [Tier::Minute, Tier::Hour, Tier::Day, Tier::Total]);
    }

    #[test]
    fn row_counts_follow_the_distinct_buckets_of_each_tier() {
        // One counter: 3 minutes in hour 0, 2 minutes in hour 1 of day 0,
        // 1 minute in day 1. Minute rows: 6; hours: 0, 1 and day 1's hour
        // 0 = 3; days: 2; total: 1.
        let minutes = vec![
            (DAY0, 1),
            (DAY0 + 60, 1),
            (DAY0 + 59 * 60, 1),
            (DAY0 + 3600, 1),
            (DAY0 + 3600 + 120, 1),
            (DAY0 + 86_400 + 600, 1),
        ];
        let rows = FlushRows::derive(&batch(vec![(b"v\0a", minutes)]));
        assert_eq!(counts(&rows), [6, 3, 2, 1]);
        assert_eq!(rows.len(), 12);
        // Every tier carries the same six events.
        for (tier, r) in &rows.tiers {
            assert_eq!(r.iter().map(|r| r.delta).sum::<i64>(), 6, "{tier:?}");
        }
        assert_eq!(
            tier_rows(&rows, Tier::Hour)
                .iter()
                .map(|r| (r.bucket, r.delta))
                .collect::<Vec<_>>(),
            [(DAY0, 3), (DAY0 + 3600, 2), (DAY0 + 86_400, 1)]
        );

        // n counters with one minute each: n rows in every tier.
        let keys: Vec<Vec<u8>> = (0..50)
            .map(|i| format!("v\0k{i:03}").into_bytes())
            .collect();
        let rows = FlushRows::derive(&batch(
            keys.iter()
                .map(|k| (k.as_slice(), vec![(DAY0, 2)]))
                .collect(),
        ));
        assert_eq!(counts(&rows), [50, 50, 50, 50]);
        assert_eq!(rows.len(), 200);
    }

    #[test]
    fn rows_go_out_in_primary_key_order() {
        // A batch's counters are sorted by routing key (`ns 0x00 key`);
        // a counter's minutes may come in any order. Every tier must come
        // out ordered by its primary key (ns, ckey, bucket) so that
        // concurrent flushes lock rows in one order.
        let rows = FlushRows::derive(&batch(vec![
            (
                b"follows\0u1",
                vec![(DAY0 + 7200, 1), (DAY0 - 60, 1), (DAY0, 1)],
            ),
            (b"follows\0u1x", vec![(DAY0 + 86_400 * 3, 4), (DAY0, 4)]),
            (
                b"views\0a",
                vec![(DAY0 + 300, 2), (DAY0 - 86_400, 3), (DAY0 + 60, 5)],
            ),
            (b"views_2\0a", vec![(DAY0 + 120, 1), (DAY0 + 60, 1)]),
        ]));
        for (tier, r) in &rows.tiers {
            let keys: Vec<(&[u8], &[u8], i64)> =
                r.iter().map(|r| (r.ns(), r.key(), r.bucket)).collect();
            assert!(
                keys.windows(2).all(|w| w[0] < w[1]),
                "{tier:?} rows out of primary-key order (or repeated): {keys:?}"
            );
        }
        let minute_keys: Vec<(&[u8], i64)> = tier_rows(&rows, Tier::Minute)
            .iter()
            .filter(|r| *r.ns() == *b"views" && *r.key() == *b"a")
            .map(|r| (r.key(), r.bucket))
            .collect();
        assert_eq!(
            minute_keys,
            [
                (&b"a"[..], DAY0 - 86_400),
                (&b"a"[..], DAY0 + 60),
                (&b"a"[..], DAY0 + 300)
            ]
        );
    }

    #[test]
    fn rows_carry_ns_key_and_ring_position_of_their_counter() {
        // The routing key is `ns 0x00 key`; ns never holds 0x00 and keys
        // hold no control character, so the first 0x00 separates them.
        let rows = FlushRows::derive(&batch(vec![
            (b"follows\0user 42", vec![(DAY0, 1), (DAY0 + 86_400, 1)]),
            (b"views\0BV1x", vec![(DAY0, 1)]),
        ]));
        for (tier, r) in &rows.tiers {
            let split: Vec<(&[u8], &[u8])> = r.iter().map(|r| (r.ns(), r.key())).collect();
            assert_eq!(
                split.first(),
                Some(&(&b"follows"[..], &b"user 42"[..])),
                "{tier:?}"
            );
            assert_eq!(
                split.last(),
                Some(&(&b"views"[..], &b"BV1x"[..])),
                "{tier:?}"
            );
            // Every row of a counter carries the ring position of its
            // routing key, the one a reshard selects rows by.
            for row in r {
                let mut rk = row.ns().to_vec();
                rk.push(0);
                rk.extend_from_slice(row.key());
                assert_eq!(
                    row.ring_pos,
                    tally_admin::ShardRing::position(&rk),
                    "{tier:?}"
                );
            }
        }
    }

    #[test]
    fn buckets_that_sum_to_zero_write_no_row() {
        // Two minutes of one hour that cancel: both minute rows stay (each
        // changes its minute), the hour and day rows would add 0. The
        // total row stays, adding 0: a counter with minute rows has one.
        let rows = FlushRows::derive(&batch(vec![(b"f\0u", vec![(DAY0, 3), (DAY0 + 60, -3)])]));
        assert_eq!(counts(&rows), [2, 0, 0, 1]);
        assert_eq!(tier_rows(&rows, Tier::Total)[0].delta, 0);
        // A minute whose own delta is 0 writes nothing anywhere.
        let rows = FlushRows::derive(&batch(vec![(b"f\0u", vec![(DAY0, 0)])]));
        assert_eq!(rows.len(), 0);
        // Cancelling across hours of one day: minute and hour rows stay,
        // the day goes (the total adds 0).
        let rows = FlushRows::derive(&batch(vec![(b"f\0u", vec![(DAY0, 5), (DAY0 + 3600, -5)])]));
        assert_eq!(counts(&rows), [2, 2, 0, 1]);
        // Across days: only the total cancels, and is kept at 0.
        let rows = FlushRows::derive(&batch(vec![(
            b"f\0u",
            vec![(DAY0, 5), (DAY0 + 86_400, -5)],
        )]));
        assert_eq!(counts(&rows), [2, 2, 2, 1]);
        // One cancelling counter does not hide its neighbours.
        let rows = FlushRows::derive(&batch(vec![
            (b"f\0a", vec![(DAY0, 1)]),
            (b"f\0b", vec![(DAY0, 0)]),
            (b"f\0c", vec![(DAY0, -1)]),
        ]));
        let keys: Vec<&[u8]> = tier_rows(&rows, Tier::Total)
            .iter()
            .map(|r| r.key())
            .collect();
        assert_eq!(keys, [&b"a"[..], &b"c"[..]]);
    }

    #[test]
    fn buckets_floor_to_utc_hours_and_days_also_before_1970() {
        // -60 is 1969-12-31T23:59Z: hour 23:00 (-3600), day 1969-12-31.
        let rows = FlushRows::derive(&batch(vec![(b"v\0a", vec![(-60, 1), (0, 1)])]));
        let buckets = |t| -> Vec<i64> { tier_rows(&rows, t).iter().map(|r| r.bucket).collect() };
        assert_eq!(buckets(Tier::Minute), [-60, 0]);
        assert_eq!(buckets(Tier::Hour), [-3600, 0]);
        assert_eq!(buckets(Tier::Day), [-86_400, 0]);
        assert_eq!(tier_rows(&rows, Tier::Total)[0].delta, 2);
    }

    #[test]
    fn upsert_sql_is_one_additive_multi_row_insert() {
        for (tier, table, cols) in [
            (Tier::Minute, "counter_minute", 5),
            (Tier::Hour, "counter_hour", 5),
            (Tier::Day, "counter_day", 5),
            (Tier::Total, "counter_total", 4),
        ] {
            for n in [1, 2, 7, ROWS_PER_STATEMENT] {
                let sql = upsert_sql(tier, n);
                let head = format!("INSERT INTO {table} (");
                assert!(sql.starts_with(&head), "{sql}");
                // Stored counts grow by the delta; an absent row is inserted
                // with it.
                assert!(
                    sql.ends_with(" ON DUPLICATE KEY UPDATE count = count + VALUES(count)"),
                    "{sql}"
                );
                let columns = &sql[head.len()..sql.find(") VALUES ").expect("VALUES")];
                let columns: Vec<&str> = columns.split(", ").collect();
                assert_eq!(columns.len(), cols, "{tier:?}: {columns:?}");
                assert_eq!(columns[..2], ["ns", "ckey"]);
                assert_eq!(columns[cols - 2..], ["ring_pos", "count"]);
                assert_eq!(columns.contains(&"bucket"), tier != Tier::Total);
                // n groups of one placeholder per column, comma-separated.
                let one = format!("({})", vec!["?"; cols].join(","));
                let values = vec![one.as_str(); n].join(",");
                assert!(
                    sql.contains(&format!(" VALUES {values} ON ")),
                    "{tier:?} n={n}"
                );
                assert_eq!(sql.matches('?').count(), n * cols);
            }
        }
    }

    #[test]
    fn params_follow_the_column_order_row_by_row() {
        let rows = [
            Row::new(b"views", b"a", DAY0, u64::MAX, -4),
            Row::new(b"views", b"b", DAY0 + 60, 7, 9),
        ];
        let bytes = |b: &[u8]| Value::Bytes(b.to_vec());
        assert_eq!(
            params(Tier::Minute, &rows),
            [
                bytes(b"views"),
                bytes(b"a"),
                Value::Int(DAY0),
                Value::UInt(u64::MAX),
                Value::Int(-4),
                bytes(b"views"),
                bytes(b"b"),
                Value::Int(DAY0 + 60),
                Value::UInt(7),
                Value::Int(9),
            ]
        );
        // The total has no bucket column (and ignores the row's bucket).
        assert_eq!(
            params(Tier::Total, &rows),
            [
                bytes(b"views"),
                bytes(b"a"),
                Value::UInt(u64::MAX),
                Value::Int(-4),
                bytes(b"views"),
                bytes(b"b"),
                Value::UInt(7),
                Value::Int(9),
            ]
        );
        assert!(params(Tier::Hour, &[]).is_empty());
    }

    #[test]
    fn every_statement_of_a_flush_binds_one_parameter_per_placeholder() {
        // What `upsert` sends: per tier, per chunk, a statement and its
        // parameters. Their counts must agree or the server refuses it.
        let keys: Vec<Vec<u8>> = (0..1500)
            .map(|i| format!("v\0k{i:05}").into_bytes())
            .collect();
        let rows = FlushRows::derive(&batch(
            keys.iter()
                .map(|k| (k.as_slice(), vec![(DAY0, 1), (DAY0 + 3600, 1)]))
                .collect(),
        ));
        let mut statements = 0;
        let mut sent = 0;
        for (tier, tier_rows) in &rows.tiers {
            for chunk in chunks(tier_rows, 1 << 20) {
                let sql = upsert_sql(*tier, chunk.len());
                assert_eq!(sql.matches('?').count(), params(*tier, chunk).len());
                statements += 1;
                sent += chunk.len();
            }
        }
        // Minute and hour: 3000 rows = 3 statements each; day and total:
        // 1500 rows = 2 statements each.
        assert_eq!(statements, 10);
        assert_eq!(sent, rows.len());
        assert_eq!(sent, 3000 + 3000 + 1500 + 1500);
    }
}
