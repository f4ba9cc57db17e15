//! Idempotent increments in the apply transaction (`schema/007_applied_ids.sql`).
//!
//! A batch's events with an id ([`IdEvent`]) are in its per-minute sums as
//! if new. The flush (and the WAL replay) decides, in the transaction that
//! upserts the counters and right after the batch's dedup row, which of
//! them count: [`decide`] inserts their rows with `INSERT IGNORE` in
//! primary-key order and the rows this batch inserted are the new events;
//! the others were counted before (or are being counted by a concurrent
//! transaction of another proxy, whose insert this one waits for), and
//! [`without`] takes their deltas out of the sums. The id rows and the
//! upserts commit together, so an id counts at most once per counter.
//!
//! Batches without ids never come here: plain events take the old path.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use mysql_async::Value;
use mysql_async::prelude::*;
use tally_admin::ShardRing;

use crate::storage::buffer::{IdEvent, Minutes, Sum};
use crate::storage::rows::{Counter, ns_and_key};

/// Id rows per `INSERT IGNORE` (6 parameters each, far below the packet
/// limit with keys of at most 256 bytes and ids of at most 160).
const CHUNK: usize = 256;

/// The id insert waits at most this long for a concurrent transaction that
/// holds one of its keys (another proxy counting the same id). A session
/// left behind a dead path would otherwise hold it for the server's 50 s;
/// the whole batch is retried instead (its dedup row keeps that safe).
fn insert_sql(rows: usize) -> String {
    let mut sql = String::from(
        "SET STATEMENT innodb_lock_wait_timeout = 10 FOR \
         INSERT IGNORE INTO applied_ids (ns, ckey, id, ring_pos, at, src) VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str("(?, ?, ?, ?, UNIX_TIMESTAMP(), ?)");
    }
    sql
}

/// `routing key 0x00 id`: one event's identity, as a set member.
fn identity(routing_key: &[u8], id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(routing_key.len() + 1 + id.len());
    k.extend_from_slice(routing_key);
    k.push(0);
    k.extend_from_slice(id);
    k
}

/// Decides, inside the apply transaction labelled `src`, which of `ids`
/// (sorted by routing key and id) are duplicates (`true`): a later copy of
/// an id within the batch, an id a reshard source counted (`elsewhere`,
/// see [`counted_among`]), or an id whose row this transaction did not
/// insert. When every row was inserted (the usual case), nothing is read
/// back.
pub async fn decide(
    tx: &mut mysql_async::Transaction<'_>,
    ids: &[IdEvent],
    src: &str,
    elsewhere: &HashSet<Vec<u8>>,
) -> Result<Vec<bool>, mysql_async::Error> {
    let mut dup = vec![false; ids.len()];
    let mut fresh = Vec::with_capacity(ids.len());
    for i in 0..ids.len() {
        let same =
            i > 0 && ids[i - 1].routing_key == ids[i].routing_key && ids[i - 1].id == ids[i].id;
        let counted =
            !elsewhere.is_empty() && elsewhere.contains(&identity(&ids[i].routing_key, &ids[i].id));
        if same || counted {
            dup[i] = true;
        } else {
            fresh.push(i);
        }
    }
    let mut inserted = 0u64;
    for chunk in fresh.chunks(CHUNK) {
        let mut params: Vec<Value> = Vec::with_capacity(chunk.len() * 5);
        for &i in chunk {
            let e = &ids[i];
            let (ns, key) = ns_and_key(&e.routing_key);
            params.push(ns.into());
            params.push(key.into());
            params.push(e.id.as_ref().into());
            params.push(ShardRing::position(&e.routing_key).into());
            params.push(src_tag(src).into());
        }
        tx.exec_drop(insert_sql(chunk.len()), params).await?;
        inserted += tx.affected_rows();
    }
    if inserted == fresh.len() as u64 {
        return Ok(dup);
    }
    let candidates: Vec<&IdEvent> = fresh.iter().map(|&i| &ids[i]).collect();
    let ours = counted_by(tx, src, &candidates).await?;
    for i in fresh {
        if !ours.contains(&identity(&ids[i].routing_key, &ids[i].id)) {
            dup[i] = true;
        }
    }
    Ok(dup)
}

/// The batch label as stored in `applied_ids.src`: 8 bytes per row
/// instead of the label's ~80 (FNV-1a; two batches that count the same id
/// and share a tag would have to collide in 64 bits).
pub fn src_tag(src: &str) -> u64 {
    use std::hash::BuildHasher;
    fnv::FnvBuildHasher::default().hash_one(src)
}

/// The identities (`routing key 0x00 id`) of those of `ids` whose row the
/// batch `src` inserted (primary-key lookups): which of its events
/// counted, in its own transaction or after an ambiguous commit that
/// turned out applied.
pub async fn counted_by(
    conn: &mut impl Queryable,
    src: &str,
    ids: &[&IdEvent],
) -> Result<HashSet<Vec<u8>>, mysql_async::Error> {
    let tag = src_tag(src);
    Ok(lookup(conn, ids)
        .await?
        .into_iter()
        .filter(|(_, t)| *t == tag)
        .map(|(identity, _)| identity)
        .collect())
}

/// `(ns, ckey, id, src)` as stored.
type StoredId = (Vec<u8>, Vec<u8>, Vec<u8>, u64);

/// The rows of `ids` that exist: identity and `src` tag.
async fn lookup(
    conn: &mut impl Queryable,
    ids: &[&IdEvent],
) -> Result<Vec<(Vec<u8>, u64)>, mysql_async::Error> {
    let mut found = Vec::new();
    for chunk in ids.chunks(CHUNK) {
        let mut sql =
            String::from("SELECT ns, ckey, id, src FROM applied_ids WHERE (ns, ckey, id) IN (");
        let mut params: Vec<Value> = Vec::with_capacity(chunk.len() * 3);
        for (i, e) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str("(?, ?, ?)");
            let (ns, key) = ns_and_key(&e.routing_key);
            params.extend([ns.into(), key.into(), e.id.as_ref().into()]);
        }
        sql.push(')');
        let rows: Vec<StoredId> = conn.exec(sql, params).await?;
        for (ns, key, id, tag) in rows {
            let mut rk = ns;
            rk.push(0);
            rk.extend_from_slice(&key);
            found.push((identity(&rk, &id), tag));
        }
    }
    Ok(found)
}

/// Which of `ids` a server counted already (their identities): during a
/// reshard, the source of a moved range is asked for the ids of events
/// its target is about to count, since the source's id rows reach the
/// target only with their chunk's copy. The source takes no more writes
/// for those keys (the ring fence), so what it answers is final.
pub async fn counted_among(
    conn: &mut impl Queryable,
    ids: &[&IdEvent],
) -> Result<HashSet<Vec<u8>>, mysql_async::Error> {
    Ok(lookup(conn, ids)
        .await?
        .into_iter()
        .map(|(identity, _)| identity)
        .collect())
}

/// Marks as duplicates the events of `ids` that are not in `counted`
/// (see [`counted_by`]).
pub fn duplicates_of(ids: &[IdEvent], counted: &HashSet<Vec<u8>>) -> Vec<bool> {
    ids.iter()
        .map(|e| !counted.contains(&identity(&e.routing_key, &e.id)))
        .collect()
}

/// `counters` without the deltas of the duplicate events; minutes left at
/// zero by that, and counters left with no minute, are dropped (they
/// would write rows of nothing).
pub fn without(counters: &[Counter], ids: &[IdEvent], dup: &[bool]) -> Vec<Counter> {
    let mut out: Vec<Counter> = counters.to_vec();
    let mut touched = vec![false; out.len()];
    for (e, _) in ids.iter().zip(dup).filter(|(_, d)| **d) {
        if let Ok(i) = out.binary_search_by(|(k, _)| k.as_ref().cmp(&e.routing_key)) {
            out[i].1.add(e.minute, -Sum::from(e.delta));
            touched[i] = true;
        }
    }
    let mut kept = Vec::with_capacity(out.len());
    for ((rk, minutes), touched) in out.into_iter().zip(touched) {
        if !touched {
            kept.push((rk, minutes));
            continue;
        }
        let left: Vec<(i64, Sum)> = minutes.iter().filter(|(_, s)| *s != 0).collect();
        if !left.is_empty() {
            kept.push((rk, Minutes::from(left)));
        }
    }
    kept
}

/// Once the batch's outcome is known: tells each duplicate's request (an
/// `ack=committed` answer reads it); returns how many there were.
pub fn report(ids: &[IdEvent], dup: &[bool]) -> usize {
    let mut n = 0;
    for (e, _) in ids.iter().zip(dup).filter(|(_, d)| **d) {
        n += 1;
        if let Some(slot) = &e.dups {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(key: &str, id: &str, minute: i64, delta: i64) -> IdEvent {
        IdEvent {
            routing_key: format!("v\0{key}").into_bytes().into(),
            id: id.as_bytes().into(),
            minute,
            delta,
            dups: None,
        }
    }

    #[test]
    fn duplicates_leave_the_sums_and_empty_minutes_and_counters_go() {
        let counters: Vec<Counter> = vec![
            (
                b"v\0a".as_slice().into(),
                Minutes::from(vec![(60, 5), (120, 2)]),
            ),
            (b"v\0b".as_slice().into(), Minutes::from(vec![(60, 3)])),
            (b"v\0c".as_slice().into(), Minutes::from(vec![(60, 1)])),
        ];
        // a: 2 plain at 60 + id x (3) at 60 + id y (2) at 120;
        // b: only id z (3); c: plain.
        let ids = vec![
            ev("a", "x", 60, 3),
            ev("a", "y", 120, 2),
            ev("b", "z", 60, 3),
        ];
        let out = without(&counters, &ids, &[true, true, true]);
        type Sums = Vec<(Vec<u8>, Vec<(i64, Sum)>)>;
        let sums: Sums = out
            .iter()
            .map(|(k, m)| (k.to_vec(), m.iter().collect()))
            .collect();
        assert_eq!(
            sums,
            vec![
                (b"v\0a".to_vec(), vec![(60, 2)]),
                (b"v\0c".to_vec(), vec![(60, 1)]),
            ]
        );
        assert_eq!(without(&counters, &ids, &[false; 3]), counters);
        let counted: HashSet<Vec<u8>> = [identity(b"v\0a", b"y")].into_iter().collect();
        assert_eq!(duplicates_of(&ids, &counted), vec![true, false, true]);
    }

    #[test]
    fn the_insert_has_one_row_of_placeholders_per_event() {
        let sql = insert_sql(3);
        assert_eq!(sql.matches("(?, ?, ?, ?, UNIX_TIMESTAMP(), ?)").count(), 3);
        assert!(sql.contains("INSERT IGNORE INTO applied_ids"));
    }
}
