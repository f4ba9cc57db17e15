//! Idempotent increments in the apply transaction (`schema/010_id_sets.sql`,
//! `schema/007_applied_ids.sql`).
//!
//! A batch's events with an id ([`IdEvent`]) are in its per-minute sums as
//! if new. The flush (and the WAL replay) decides, in the transaction that
//! upserts the counters and right after the batch's dedup row, which of
//! them count ([`decide`]): each event's entry goes into its id's *set*
//! (the ids of one request share one), one segment per batch and set, and
//! an entry some other batch already put there is a duplicate; a set grown
//! past [`MAX_SET_ENTRIES`] is closed and its new events take a row each
//! in `applied_ids` (`INSERT IGNORE`, the rows this batch inserted are the
//! new events). [`without`] takes the duplicates' deltas out of the sums.
//! The sets, the rows and the upserts commit together, so an id counts at
//! most once per counter; a concurrent transaction of another proxy on the
//! same set holds its row's lock until it commits or rolls back.
//!
//! Batches without ids never come here: plain events take the old path.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use mysql_async::Value;
use mysql_async::prelude::*;
use tally_admin::ShardRing;

use crate::storage::buffer::{IdEvent, Minutes, Sum};
use crate::storage::id_sets::{self, Entry, Member, Plan, Segment};
use crate::storage::rows::{Counter, ns_and_key};

/// Id rows per `INSERT IGNORE` (6 parameters each, far below the packet
/// limit with keys of at most 256 bytes and ids of at most 160).
const CHUNK: usize = 256;

/// The id insert waits at most this long for a concurrent transaction that
/// holds one of its keys (another proxy counting the same id). A session
/// left behind a dead path would otherwise hold it for the server's 50 s;
/// the whole batch is retried instead (its dedup row keeps that safe).
fn insert_sql(rows: usize) -> String {
    format!(
        "SET STATEMENT innodb_lock_wait_timeout = 10 FOR \
         INSERT IGNORE INTO applied_ids (ns, ckey, id, ring_pos, at, src) VALUES {}",
        repeated("(?, ?, ?, ?, UNIX_TIMESTAMP(), ?)", rows)
    )
}

/// `tuple` `n` times, comma-separated: a statement's placeholder list.
fn repeated(tuple: &str, n: usize) -> String {
    vec![tuple; n].join(", ")
}

/// Rewrites a set row (a segment taken out, or copies merged).
const REWRITE_SET: &str = "UPDATE applied_id_sets SET segs = ?, n = ? WHERE skey = ?";

/// Entries a set takes at most: past them it is closed, and its new ids
/// go to `applied_ids`, a row each (a set row stays well below the
/// packet limit: at most 1.25 times this many entries of 16 bytes).
pub const MAX_SET_ENTRIES: usize = 16_384;

/// Set rows per statement.
const SET_CHUNK: usize = 128;

/// The start of a statement that writes set rows. Waits at most 10 s for
/// another proxy's transaction on one of the rows (see [`insert_sql`]).
const SETS_INSERT: &str = "SET STATEMENT innodb_lock_wait_timeout = 10 FOR \
     INSERT INTO applied_id_sets (skey, n, at, segs) VALUES ";

/// Raises each set's size to close it without adding entries; the row's
/// `at` is renewed and the row stays locked by this transaction.
fn close_sets_sql(rows: usize) -> String {
    format!(
        "{SETS_INSERT}{} ON DUPLICATE KEY UPDATE n = GREATEST(n, VALUES(n)), at = VALUES(at)",
        repeated("(?, ?, UNIX_TIMESTAMP(), ?)", rows)
    )
}

/// A statement that appends each set's segment (creating the rows that
/// are new), renews the row's `at` and keeps the row locked by this
/// transaction. Keys and segments are spelled in the statement as hex
/// literals, not sent as parameters: with the binary log on, the server
/// rewrites a prepared statement with its parameters escaped into it
/// for the log, and checks each string parameter's characters, which
/// for the segments (16 bytes an event) was most of its work on the
/// sets of a flush; a hex literal is read once and needs neither.
struct AppendSets {
    /// Bytes, not a `String`: the client sends them as they are, and a
    /// byte pushed to a `String` is checked to be a character.
    sql: Vec<u8>,
    rows: usize,
}

impl AppendSets {
    /// Room for `rows` rows of `bytes` key and segment bytes in all.
    fn with_capacity(rows: usize, bytes: usize) -> AppendSets {
        let mut sql = Vec::with_capacity(SETS_INSERT.len() + 2 * bytes + 64 * rows + 160);
        sql.extend_from_slice(SETS_INSERT.as_bytes());
        AppendSets { sql, rows: 0 }
    }

    fn row(&mut self, key: &[u8], n: usize, seg: &[u8]) {
        use std::io::Write;
        if self.rows > 0 {
            self.sql.extend_from_slice(b", ");
        }
        self.rows += 1;
        self.sql.push(b'(');
        push_hex(&mut self.sql, key);
        // Writing to a Vec cannot fail.
        let _ = write!(self.sql, ", {n}, UNIX_TIMESTAMP(), ");
        push_hex(&mut self.sql, seg);
        self.sql.push(b')');
    }

    fn finish(mut self) -> Vec<u8> {
        self.sql.extend_from_slice(
            b" ON DUPLICATE KEY UPDATE segs = CONCAT(segs, VALUES(segs)), \
             n = n + VALUES(n), at = VALUES(at)",
        );
        self.sql
    }
}

/// `bytes` as an SQL hex literal, `X'…'` (binary; `X''` is the empty
/// string).
fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    out.reserve(bytes.len() * 2 + 3);
    out.extend_from_slice(b"X'");
    out.extend(
        bytes
            .iter()
            .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]]),
    );
    out.push(b'\'');
}

/// Splits `items` into runs of at most [`SET_CHUNK`] whose `size`s add up
/// to at most `budget` bytes (a run holds one item at least): one
/// statement each, within the server's packet limit.
fn runs<T>(items: &[T], size: impl Fn(&T) -> usize, budget: usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < items.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < items.len()
            && end - start < SET_CHUNK
            && (end == start || bytes + size(&items[end]) <= budget)
        {
            bytes += size(&items[end]);
            end += 1;
        }
        out.push(&items[start..end]);
        start = end;
    }
    out
}

/// A set row as read: its size (`n`) and segments.
type SetRow = (u64, Vec<Segment>);

/// The rows of the sets `keys` (absent ones are left out); `lock` reads
/// them with `FOR UPDATE` (rows this transaction already locked).
async fn read_sets(
    conn: &mut impl Queryable,
    keys: &[&[u8]],
    lock: bool,
) -> Result<HashMap<Vec<u8>, SetRow>, mysql_async::Error> {
    let mut found = HashMap::new();
    for chunk in keys.chunks(SET_CHUNK) {
        let sql = format!(
            "SELECT skey, n, segs FROM applied_id_sets WHERE skey IN ({}){}",
            repeated("?", chunk.len()),
            if lock { " FOR UPDATE" } else { "" }
        );
        let params: Vec<Value> = chunk.iter().map(|k| (*k).into()).collect();
        let rows: Vec<(Vec<u8>, u64, Vec<u8>)> = conn.exec(sql, params).await?;
        for (key, n, segs) in rows {
            let segs = id_sets::decode(&segs).map_err(|e| mysql_async::Error::Other(e.into()))?;
            found.insert(key, (n, segs));
        }
    }
    Ok(found)
}

/// Decides, inside the apply transaction labelled `src`, which of `ids`
/// (grouped by set in `plan`, [`Plan::of`]) are duplicates (`true`): a
/// repeat within the batch, an id a reshard source counted (`elsewhere`,
/// see [`counted_among`]), or an id already in its set (or, for a closed
/// set, in `applied_ids`).
///
/// The batch adds one segment to each of its sets (`schema/010_id_sets.sql`)
/// in one statement per [`SET_CHUNK`] sets; when every row was new (the
/// usual case: a request's own sets), nothing is read back. Otherwise the
/// rows, now locked by this transaction, are read: entries other batches
/// added make duplicates, which leave the segment again. A set too large
/// for one segment (over a quarter of `max_set` entries from this batch)
/// is closed instead, and the events of closed sets are decided by a row
/// each in `applied_ids` ([`decide_rows`]).
pub async fn decide(
    tx: &mut mysql_async::Transaction<'_>,
    ids: &[IdEvent],
    plan: &Plan,
    src: &str,
    elsewhere: &HashSet<Vec<u8>>,
    max_set: usize,
    max_packet: usize,
) -> Result<Vec<bool>, mysql_async::Error> {
    let tag = src_tag(src);
    let mut dup = vec![false; ids.len()];
    for &i in &plan.repeats {
        dup[i] = true;
    }
    // During a reshard: what a source counted is out (and so is its set
    // when nothing of it is left).
    let filtered: Vec<(&[u8], Vec<Member>)>;
    let sets: Vec<(&[u8], &[Member])> = if elsewhere.is_empty() {
        plan.sets
            .iter()
            .map(|(k, m)| (k.as_slice(), m.as_slice()))
            .collect()
    } else {
        filtered = plan
            .sets
            .iter()
            .map(|(k, m)| {
                let kept = m
                    .iter()
                    .filter(|(_, i)| {
                        let counted = elsewhere.contains(ids[*i].identity());
                        dup[*i] |= counted;
                        !counted
                    })
                    .copied()
                    .collect();
                (k.as_slice(), kept)
            })
            .filter(|(_, m): &(&[u8], Vec<_>)| !m.is_empty())
            .collect();
        filtered.iter().map(|(k, m)| (*k, m.as_slice())).collect()
    };
    let big = (max_set / 4).max(1);
    let (appended, closed): (Vec<usize>, Vec<usize>) =
        (0..sets.len()).partition(|&s| sets[s].1.len() <= big);
    // Ids an older release counted, while any may be in the window: rows
    // of schema 3, and entries schema 4 kept at a key that moved since.
    let events = || -> Vec<&IdEvent> {
        sets.iter()
            .flat_map(|(_, m)| m.iter().map(|(_, i)| &ids[*i]))
            .collect()
    };
    let mut legacy: HashSet<Vec<u8>> = if has_legacy(tx).await? {
        lookup(tx, &events(), None).await?
    } else {
        HashSet::new()
    };
    if packing_changes_over(tx).await? {
        legacy.extend(counted_at_v4_keys(tx, &events(), max_set).await?);
    }
    // Sets whose rows existed (or that this batch closes, or that hold an
    // id counted by an older release): read back.
    let mut check: Vec<usize> = if legacy.is_empty() {
        closed.clone()
    } else {
        (0..sets.len()).collect()
    };
    let recheck_all = !legacy.is_empty();
    let segment_bytes = |s: &usize| sets[*s].0.len() + 16 + sets[*s].1.len() * id_sets::ENTRY_LEN;
    // A set the first events of many requests share (`Sequence` in
    // `id_sets`) was most likely begun by an earlier batch: it goes in a
    // statement of its own, so that only it is read back, not the new sets
    // of its statement too. Key order, the order rows are locked in, stays.
    let shared = |s: &usize| id_sets::is_shared(sets[*s].0);
    // A quarter of the packet: the statement spells each byte in two.
    let statements = appended
        .chunk_by(|a, b| !shared(a) && !shared(b))
        .flat_map(|stretch| runs(stretch, segment_bytes, max_packet / 4));
    let mut seg = Vec::new();
    for chunk in statements {
        let bytes: usize = chunk.iter().map(segment_bytes).sum();
        let mut sql = AppendSets::with_capacity(chunk.len(), bytes);
        for &s in chunk {
            let (key, members) = sets[s];
            let entries: Vec<Entry> = members.iter().map(|(e, _)| *e).collect();
            seg.clear();
            id_sets::encode(tag, &entries, &mut seg);
            sql.row(key, members.len(), &seg);
        }
        tx.query_drop(sql.finish()).await?;
        if tx.affected_rows() != chunk.len() as u64 && !recheck_all {
            check.extend_from_slice(chunk);
        }
    }
    for chunk in closed.chunks(SET_CHUNK) {
        let mut params: Vec<Value> = Vec::with_capacity(chunk.len() * 3);
        for &s in chunk {
            params.extend([
                sets[s].0.into(),
                (max_set as u64).into(),
                Vec::<u8>::new().into(),
            ]);
        }
        tx.exec_drop(close_sets_sql(chunk.len()), params).await?;
    }
    let mut spill = Vec::new();
    if !check.is_empty() {
        let keys: Vec<&[u8]> = check.iter().map(|&s| sets[s].0).collect();
        let mut rows = read_sets(tx, &keys, true).await?;
        for s in check {
            let (key, members) = sets[s];
            let (n, segs) = rows.remove(key).unwrap_or_default();
            let ours = if closed.contains(&s) {
                0
            } else {
                members.len() as u64
            };
            let others: Vec<Segment> = segs.into_iter().filter(|g| g.tag != tag).collect();
            let known: HashSet<Entry> = others
                .iter()
                .flat_map(|g| g.entries.iter().copied())
                .collect();
            let before = n.saturating_sub(ours);
            let mut kept = Vec::new();
            for (e, i) in members {
                if known.contains(e) || legacy.contains(ids[*i].identity()) {
                    dup[*i] = true;
                } else {
                    kept.push((*e, *i));
                }
            }
            let full = ours == 0 || before >= max_set as u64;
            if full {
                spill.extend(kept.iter().map(|(_, i)| *i));
            }
            // The segment as it should stay: without duplicates, and none
            // in a closed set (its events are decided by a row each).
            if ours > 0 && (full || kept.len() < members.len()) {
                let mut row = Vec::new();
                for g in &others {
                    id_sets::encode(g.tag, &g.entries, &mut row);
                }
                let mut size = before;
                if !full {
                    let entries: Vec<Entry> = kept.iter().map(|(e, _)| *e).collect();
                    id_sets::encode(tag, &entries, &mut row);
                    size += entries.len() as u64;
                }
                tx.exec_drop(REWRITE_SET, (row, size, key)).await?;
            }
        }
    }
    if !spill.is_empty() {
        // Primary-key order, so two batches never wait for each other
        // crosswise.
        spill.sort_unstable_by(|a, b| ids[*a].identity().cmp(ids[*b].identity()));
        for (i, is_dup) in decide_rows(tx, ids, &spill, tag).await? {
            dup[i] = is_dup;
        }
    }
    Ok(dup)
}

/// Whether `applied_ids` may still hold ids an older release counted
/// (`id_sets_state.legacy_at`, `schema/010_id_sets.sql`): one probe of its
/// `by_age` index, false once retention deleted them.
async fn has_legacy(tx: &mut mysql_async::Transaction<'_>) -> Result<bool, mysql_async::Error> {
    let found: Option<i64> = tx
        .query_first(
            "SELECT 1 FROM applied_ids WHERE at <= \
             (SELECT legacy_at FROM id_sets_state WHERE id = 1) LIMIT 1",
        )
        .await?;
    Ok(found.is_some())
}

/// When the change-over to packed sets began (`id_sets_state.packed_at`,
/// `schema/011_packed_sets.sql`; unix seconds), 0 when none is under way:
/// one primary-key read.
pub async fn packed_at(conn: &mut impl Queryable) -> Result<i64, mysql_async::Error> {
    let packed_at: Option<Option<i64>> = conn
        .query_first("SELECT packed_at FROM id_sets_state WHERE id = 1")
        .await?;
    Ok(packed_at.flatten().unwrap_or(0))
}

/// Whether sets written before schema version 5 may still hold ids at a
/// key that moved: false once retention ended the change-over.
async fn packing_changes_over(conn: &mut impl Queryable) -> Result<bool, mysql_async::Error> {
    Ok(packed_at(conn).await? > 0)
}

/// Ends the change-over to packed sets once the idempotency window has
/// passed since it began (`expired_before`: now minus the window): every
/// entry written at an old key is then older than the window. Retention's
/// job; returns whether it ended now.
pub async fn end_packing_change_over(
    conn: &mut mysql_async::Conn,
    expired_before: i64,
) -> Result<bool, mysql_async::Error> {
    conn.exec_drop(
        "UPDATE id_sets_state SET packed_at = 0 WHERE id = 1 AND packed_at > 0 AND packed_at < ?",
        (expired_before,),
    )
    .await?;
    Ok(conn.affected_rows() > 0)
}

/// The identities of those of `ids` that schema version 4 counted at the
/// key their set had then ([`id_sets::v4_key_if_moved`]): in a segment of
/// that row, or a row of their own when that set was closed. Only the first
/// events of numbered requests moved, and nothing writes them at the old
/// key any more (the older release's proxies are stopped before the
/// upgrade), so a plain read is final.
async fn counted_at_v4_keys(
    conn: &mut impl Queryable,
    ids: &[&IdEvent],
    max_set: usize,
) -> Result<HashSet<Vec<u8>>, mysql_async::Error> {
    let moved: Vec<(&IdEvent, Vec<u8>)> = ids
        .iter()
        .filter_map(|e| id_sets::v4_key_if_moved(e.id()).map(|k| (*e, k)))
        .collect();
    // An id without a version-4 set row was not counted by version 4 (an
    // older release's row is found through its current key, [`known`]).
    known_at(conn, &moved, None, max_set, false).await
}

/// The events `fresh` (indexes into `ids`, in primary-key order) of
/// closed sets, decided by a row each in `applied_ids`: the rows this
/// transaction inserted are the new events.
async fn decide_rows(
    tx: &mut mysql_async::Transaction<'_>,
    ids: &[IdEvent],
    fresh: &[usize],
    tag: u64,
) -> Result<Vec<(usize, bool)>, mysql_async::Error> {
    let mut inserted = 0u64;
    for chunk in fresh.chunks(CHUNK) {
        let mut params: Vec<Value> = Vec::with_capacity(chunk.len() * 5);
        for &i in chunk {
            let e = &ids[i];
            let (ns, key) = ns_and_key(e.routing_key());
            params.push(ns.into());
            params.push(key.into());
            params.push(e.id().into());
            params.push(ShardRing::position(e.routing_key()).into());
            params.push(tag.into());
        }
        tx.exec_drop(insert_sql(chunk.len()), params).await?;
        inserted += tx.affected_rows();
    }
    if inserted == fresh.len() as u64 {
        return Ok(fresh.iter().map(|&i| (i, false)).collect());
    }
    let candidates: Vec<&IdEvent> = fresh.iter().map(|&i| &ids[i]).collect();
    let ours = lookup(tx, &candidates, Some(tag)).await?;
    Ok(fresh
        .iter()
        .map(|&i| (i, !ours.contains(ids[i].identity())))
        .collect())
}

/// A set row as stored: `(skey, n, at, segs)`.
pub type SetRowStored = (Vec<u8>, u64, i64, Vec<u8>);

/// Merges set rows of another server (a reshard source) into this one's,
/// inside `tx`: a row new here is inserted as it is; one that exists
/// becomes the union of both (one segment per batch tag, each entry
/// once, closed if either was), with the later `at`. Copying the same rows
/// again changes nothing. `budget` bounds one statement's bytes.
pub async fn merge_sets(
    tx: &mut mysql_async::Transaction<'_>,
    rows: &[SetRowStored],
    budget: usize,
) -> Result<(), mysql_async::Error> {
    for part in runs(rows, |r| r.0.len() + r.3.len() + 32, budget) {
        let sql = format!(
            "INSERT INTO applied_id_sets (skey, n, at, segs) VALUES {} \
             ON DUPLICATE KEY UPDATE segs = CONCAT(segs, VALUES(segs)), \
             n = GREATEST(n, VALUES(n)), at = GREATEST(at, VALUES(at))",
            repeated("(?, ?, ?, ?)", part.len())
        );
        let mut params: Vec<Value> = Vec::with_capacity(part.len() * 4);
        for (key, n, at, segs) in part {
            params.extend([
                key.as_slice().into(),
                (*n).into(),
                (*at).into(),
                segs.as_slice().into(),
            ]);
        }
        tx.exec_drop(sql, params).await?;
        if tx.affected_rows() != part.len() as u64 {
            // Some existed: both lists are now in one row; keep their union.
            let keys: Vec<&[u8]> = part.iter().map(|r| r.0.as_slice()).collect();
            for (key, (n, segs)) in read_sets(tx, &keys, true).await? {
                let (row, count) = id_sets::union([segs.as_slice()]);
                let size = n.max(count as u64);
                tx.exec_drop(REWRITE_SET, (row, size, key)).await?;
            }
        }
    }
    Ok(())
}

/// The batch label as stored in `applied_ids.src`: 8 bytes per row
/// instead of the label's ~80 (FNV-1a; two batches that count the same id
/// and share a tag would have to collide in 64 bits).
pub fn src_tag(src: &str) -> u64 {
    use std::hash::BuildHasher;
    fnv::FnvBuildHasher::default().hash_one(src)
}

/// The identities (`routing key 0x00 id`) of those of `ids` that the
/// batch `src` counted (its set segments and its rows in `applied_ids`):
/// which of its events counted, after an ambiguous commit that turned out
/// applied.
pub async fn counted_by(
    conn: &mut impl Queryable,
    src: &str,
    ids: &[&IdEvent],
    max_set: usize,
) -> Result<HashSet<Vec<u8>>, mysql_async::Error> {
    known(conn, ids, Some(src_tag(src)), max_set).await
}

/// The identities of those of `ids` that a server counted: in a set
/// segment (of the batch `tag` only, when given) or a row of their own.
async fn known(
    conn: &mut impl Queryable,
    ids: &[&IdEvent],
    tag: Option<u64>,
    max_set: usize,
) -> Result<HashSet<Vec<u8>>, mysql_async::Error> {
    let keyed: Vec<(&IdEvent, Vec<u8>)> =
        ids.iter().map(|e| (*e, id_sets::set_key(e.id()))).collect();
    let mut found = known_at(conn, &keyed, tag, max_set, true).await?;
    // Any batch may have counted an id at a key that moved since, but only
    // a release before schema version 5: the batch of a tag is this one's.
    if tag.is_none() && packing_changes_over(conn).await? {
        found.extend(counted_at_v4_keys(conn, ids, max_set).await?);
    }
    Ok(found)
}

/// [`known`] with each event's set key given: in a segment of that set
/// (of the batch `tag` only, when given) or a row of its own, looked up
/// when its set is closed or, with `unset_in_rows`, has no row.
async fn known_at(
    conn: &mut impl Queryable,
    keyed: &[(&IdEvent, Vec<u8>)],
    tag: Option<u64>,
    max_set: usize,
    unset_in_rows: bool,
) -> Result<HashSet<Vec<u8>>, mysql_async::Error> {
    let mut distinct: Vec<&[u8]> = keyed.iter().map(|(_, k)| k.as_slice()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    // Per set: its entries (of the batch `tag` only, when given) and
    // whether it is closed.
    let sets: HashMap<Vec<u8>, (HashSet<Entry>, bool)> = read_sets(conn, &distinct, false)
        .await?
        .into_iter()
        .map(|(key, (n, segs))| {
            let entries = segs
                .iter()
                .filter(|g| tag.is_none_or(|tag| g.tag == tag))
                .flat_map(|g| g.entries.iter().copied())
                .collect();
            (key, (entries, n >= max_set as u64))
        })
        .collect();
    let mut found = HashSet::new();
    // Only an id of a closed set, or of no set (an older release's), can
    // be a row in `applied_ids`.
    let mut rows = Vec::new();
    for (e, key) in keyed {
        match sets.get(key) {
            Some((entries, _)) if entries.contains(&e.entry()) => {
                found.insert(e.identity().to_vec());
            }
            Some((_, true)) => rows.push(*e),
            None if unset_in_rows => rows.push(*e),
            _ => {}
        }
    }
    found.extend(lookup(conn, &rows, tag).await?);
    Ok(found)
}

/// `(ns, ckey, id, src)` as stored.
type StoredId = (Vec<u8>, Vec<u8>, Vec<u8>, u64);

/// The identities of those of `ids` that have a row in `applied_ids`
/// (counted by the batch `tag` only, when given).
async fn lookup(
    conn: &mut impl Queryable,
    ids: &[&IdEvent],
    tag: Option<u64>,
) -> Result<HashSet<Vec<u8>>, mysql_async::Error> {
    let mut found = HashSet::new();
    for chunk in ids.chunks(CHUNK) {
        let sql = format!(
            "SELECT ns, ckey, id, src FROM applied_ids WHERE (ns, ckey, id) IN ({})",
            repeated("(?, ?, ?)", chunk.len())
        );
        let mut params: Vec<Value> = Vec::with_capacity(chunk.len() * 3);
        for e in chunk {
            let (ns, key) = ns_and_key(e.routing_key());
            params.extend([ns.into(), key.into(), e.id().into()]);
        }
        let rows: Vec<StoredId> = conn.exec(sql, params).await?;
        for (ns, key, id, src) in rows {
            if tag.is_none_or(|tag| tag == src) {
                let mut rk = ns;
                rk.push(0);
                rk.extend_from_slice(&key);
                found.insert(id_sets::identity(&rk, &id));
            }
        }
    }
    Ok(found)
}

/// Which of `ids` a server counted already (their identities): during a
/// reshard, the source of a moved range is asked for the ids of events
/// its target is about to count, since the source's ids reach the target
/// only with the copy. The source takes no more writes for those keys
/// (the ring fence), so what it answers is final.
pub async fn counted_among(
    conn: &mut impl Queryable,
    ids: &[&IdEvent],
    max_set: usize,
) -> Result<HashSet<Vec<u8>>, mysql_async::Error> {
    known(conn, ids, None, max_set).await
}

/// Marks as duplicates the events of `ids` that are not in `counted`
/// (see [`counted_by`]), and the `repeats` (indexes of later copies of
/// an id in `ids`, [`Plan::repeats`]): their identity is counted, by the
/// first copy.
pub fn duplicates_of(ids: &[IdEvent], counted: &HashSet<Vec<u8>>, repeats: &[usize]) -> Vec<bool> {
    let mut dup: Vec<bool> = ids
        .iter()
        .map(|e| !counted.contains(e.identity()))
        .collect();
    for &i in repeats {
        dup[i] = true;
    }
    dup
}

/// `counters` without the deltas of the duplicate events; minutes left at
/// zero by that, and counters left with no minute, are dropped (they
/// would write rows of nothing).
pub fn without(counters: &[Counter], ids: &[IdEvent], dup: &[bool]) -> Vec<Counter> {
    let mut out: Vec<Counter> = counters.to_vec();
    let mut touched = vec![false; out.len()];
    for (e, _) in ids.iter().zip(dup).filter(|(_, d)| **d) {
        if let Ok(i) = out.binary_search_by(|(k, _)| k.as_ref().cmp(e.routing_key())) {
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
        IdEvent::new(
            format!("v\0{key}").as_bytes(),
            id.as_bytes(),
            minute,
            delta,
            None,
        )
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
        let counted: HashSet<Vec<u8>> = [id_sets::identity(b"v\0a", b"y")].into_iter().collect();
        assert_eq!(duplicates_of(&ids, &counted, &[]), vec![true, false, true]);
        // A batch whose rows all counted, where the third event repeated
        // an earlier one: that copy is a duplicate all the same.
        let all: HashSet<Vec<u8>> = ids.iter().map(|e| e.identity().to_vec()).collect();
        assert_eq!(duplicates_of(&ids, &all, &[2]), vec![false, false, true]);
    }

    #[test]
    fn runs_keep_within_the_byte_budget_and_the_row_count() {
        let sizes = [40, 40, 40, 100, 10];
        let lens: Vec<usize> = runs(&sizes, |s| *s, 100).iter().map(|r| r.len()).collect();
        assert_eq!(lens, vec![2, 1, 1, 1], "40+40, 40, 100 alone, 10");
        let one_too_big: Vec<usize> = runs(&[500, 1], |s| *s, 100)
            .iter()
            .map(|r| r.len())
            .collect();
        assert_eq!(
            one_too_big,
            vec![1, 1],
            "an item over the budget goes alone"
        );
        let many = vec![1usize; SET_CHUNK * 2 + 1];
        let lens: Vec<usize> = runs(&many, |s| *s, usize::MAX)
            .iter()
            .map(|r| r.len())
            .collect();
        assert_eq!(lens, vec![SET_CHUNK, SET_CHUNK, 1]);
    }

    #[test]
    fn appended_sets_are_spelled_as_hex_literals() {
        let mut sql = AppendSets::with_capacity(2, 8);
        sql.row(b"k\x00\x01", 2, &[0xab, 0x00, 0x7f]);
        sql.row(b"j", 0, &[]);
        let sql = String::from_utf8(sql.finish()).expect("ASCII");
        assert!(sql.starts_with(SETS_INSERT), "{sql}");
        assert!(
            sql.contains(
                "(X'6B0001', 2, UNIX_TIMESTAMP(), X'AB007F'), (X'6A', 0, UNIX_TIMESTAMP(), X'')"
            ),
            "{sql}"
        );
        assert!(sql.ends_with("at = VALUES(at)"), "{sql}");
    }

    #[test]
    fn the_insert_has_one_row_of_placeholders_per_event() {
        let sql = insert_sql(3);
        assert_eq!(sql.matches("(?, ?, ?, ?, UNIX_TIMESTAMP(), ?)").count(), 3);
        assert!(sql.contains("INSERT IGNORE INTO applied_ids"));
    }
}
