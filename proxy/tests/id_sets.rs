//! Event id sets against a real `mariadbd` (`storage::ids`, schema
//! `010_id_sets.sql`), below the HTTP API: what the flush transaction
//! decides for ids already in a set, in a closed set (a row each in
//! `applied_ids`), in a set another transaction is deciding right now,
//! after a reshard's copy of the sets to another server, and across the
//! upgrades to schema versions 4 and 5.

use std::collections::HashSet;
use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Conn, TxOpts};
use tally_harness::{Cluster, ClusterSpec};
use tally_proxy::testing::{IdEvent, copy_id_sets, ids};

fn ev(key: &str, id: &str) -> IdEvent {
    IdEvent::new(format!("v\0{key}").as_bytes(), id.as_bytes(), 60, 1, None)
}

/// `ids` sorted as a batch holds them: by routing key, then id.
fn batch(mut ids: Vec<IdEvent>) -> Vec<IdEvent> {
    ids.sort_by(|a, b| a.identity().cmp(b.identity()));
    ids
}

/// Decides `ids` as the batch `src` in one committed transaction.
async fn decide(conn: &mut Conn, ids: &[IdEvent], src: &str, max_set: usize) -> Vec<bool> {
    let mut tx = conn
        .start_transaction(TxOpts::default())
        .await
        .expect("begin");
    let plan = IdEvent::plan(ids);
    let dup = ids::decide(&mut tx, ids, &plan, src, &HashSet::new(), max_set, 16 << 20)
        .await
        .expect("decide");
    tx.commit().await.expect("commit");
    dup
}

async fn count(conn: &mut Conn, sql: &str) -> i64 {
    conn.query_first::<i64, _>(sql)
        .await
        .expect("count")
        .unwrap_or(-1)
}

fn identities(events: &[IdEvent]) -> HashSet<Vec<u8>> {
    events.iter().map(|e| e.identity().to_vec()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sets_decide_retries_closed_sets_concurrent_batches_and_copies() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    cluster
        .add_database("other")
        .await
        .expect("second database");
    let master = &cluster.group(0).master;
    let connect =
        |db: &'static str| async move { Conn::new(master.opts(Some(db))).await.expect("connect") };
    let mut conn = connect("tally").await;
    let max = 1_000;

    // A request's events (ids `r/<index>`), the same id on two counters.
    let first = batch(vec![ev("a", "r/0"), ev("a", "r/1"), ev("b", "r/0")]);
    assert_eq!(
        decide(&mut conn, &first, "batch w/1", max).await,
        [false; 3]
    );
    assert_eq!(
        count(&mut conn, "SELECT COUNT(*) FROM applied_id_sets").await,
        1
    );
    assert_eq!(
        count(&mut conn, "SELECT COUNT(*) FROM applied_ids").await,
        0
    );

    // A retry of part of it with new events in the same set.
    let second = batch(vec![ev("a", "r/1"), ev("a", "r/2"), ev("c", "r/0")]);
    assert_eq!(
        decide(&mut conn, &second, "batch w/2", max).await,
        [true, false, false],
        "r/1 on a was counted by the first batch"
    );
    assert_eq!(count(&mut conn, "SELECT n FROM applied_id_sets").await, 5);

    // Which batch counted what (an ambiguous commit's answer).
    let all: Vec<IdEvent> = batch(first.iter().chain(&second).cloned().collect());
    let refs: Vec<&IdEvent> = all.iter().collect();
    let by_first = ids::counted_by(&mut conn, "batch w/1", &refs, max)
        .await
        .expect("by");
    assert_eq!(by_first, identities(&first));
    let by_second = ids::counted_by(&mut conn, "batch w/2", &refs, max)
        .await
        .expect("by");
    assert_eq!(by_second, identities(&second[1..]), "not the duplicate");
    let known = ids::counted_among(&mut conn, &refs, max)
        .await
        .expect("among");
    assert_eq!(known.len(), 5);

    // With sets of at most 4 entries the set (5) is closed: new ids of it
    // take a row each, and are duplicates the next time.
    let closed = batch(vec![ev("a", "r/3"), ev("a", "r/4")]);
    assert_eq!(
        decide(&mut conn, &closed, "batch w/3", 4).await,
        [false, false]
    );
    assert_eq!(
        count(&mut conn, "SELECT COUNT(*) FROM applied_ids").await,
        2
    );
    assert_eq!(
        count(&mut conn, "SELECT n FROM applied_id_sets").await,
        5,
        "the closed set took no entry"
    );
    let again = batch(vec![ev("a", "r/3"), ev("a", "r/0"), ev("d", "r/3")]);
    assert_eq!(
        decide(&mut conn, &again, "batch w/4", 4).await,
        [true, true, false],
        "in batch order: r/0 on a from the set, r/3 on a from its row; r/3 on d is new"
    );
    // Counted sets and rows both answer for a batch.
    let closed_refs: Vec<&IdEvent> = closed.iter().collect();
    let by_third = ids::counted_by(&mut conn, "batch w/3", &closed_refs, 4)
        .await
        .expect("by");
    assert_eq!(by_third, identities(&closed));

    // Too many entries for one segment (over max/4 = 1): the new set `q`
    // is closed at once; its ids take rows, and a later batch that would
    // fit finds the set closed and its retry a duplicate.
    let wide = batch(vec![ev("a", "q/0"), ev("b", "q/0")]);
    assert_eq!(
        decide(&mut conn, &wide, "batch w/5", 4).await,
        [false, false]
    );
    let retry = batch(vec![ev("b", "q/0")]);
    assert_eq!(decide(&mut conn, &retry, "batch w/6", 4).await, [true]);

    // Two proxies deciding the same id at once: the second waits for the
    // first's transaction on the set's row and sees its entry.
    let mut other = connect("tally").await;
    let mut tx = conn
        .start_transaction(TxOpts::default())
        .await
        .expect("begin");
    let same = batch(vec![ev("e", "s/0")]);
    let d = ids::decide(
        &mut tx,
        &same,
        &IdEvent::plan(&same),
        "batch p1/1",
        &HashSet::new(),
        max,
        16 << 20,
    )
    .await
    .expect("decide");
    assert_eq!(d, [false]);
    let racing = {
        let same = same.clone();
        tokio::spawn(async move {
            let mut tx = other
                .start_transaction(TxOpts::default())
                .await
                .expect("begin");
            let plan = IdEvent::plan(&same);
            let d = ids::decide(
                &mut tx,
                &same,
                &plan,
                "batch p2/1",
                &HashSet::new(),
                max,
                16 << 20,
            )
            .await
            .expect("decide");
            tx.commit().await.expect("commit");
            d
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!racing.is_finished(), "the second waits for the first");
    tx.commit().await.expect("commit");
    assert_eq!(racing.await.expect("join"), [true]);

    // A reshard's copy: every set reaches the other server, twice is
    // once, and a copy merges with a set the target already holds.
    let mut target = connect("other").await;
    let target_only = batch(vec![ev("z", "r/9")]);
    assert_eq!(
        decide(&mut target, &target_only, "batch t/1", max).await,
        [false]
    );
    let max_packet = 16 << 20;
    copy_id_sets(&mut conn, &mut target, max_packet)
        .await
        .expect("copy");
    let rows = "SELECT GROUP_CONCAT(skey, n, HEX(segs) ORDER BY skey) FROM applied_id_sets";
    let once: Option<String> = target.query_first(rows).await.expect("rows");
    copy_id_sets(&mut conn, &mut target, max_packet)
        .await
        .expect("copy again");
    let twice: Option<String> = target.query_first(rows).await.expect("rows");
    assert_eq!(once, twice, "copying again changes nothing");
    let everything: Vec<IdEvent> = batch(
        all.iter()
            .chain(&same)
            .chain(&target_only)
            .chain(&wide)
            .cloned()
            .collect(),
    );
    let refs: Vec<&IdEvent> = everything.iter().collect();
    let on_target = ids::counted_among(&mut target, &refs, 4)
        .await
        .expect("among");
    let without_rows: Vec<IdEvent> = everything
        .iter()
        .filter(|e| e.id() != b"q/0")
        .cloned()
        .collect();
    assert_eq!(
        on_target,
        identities(&without_rows),
        "every set entry is on the target (rows of closed sets move with their ranges)"
    );
    let retried = batch(vec![
        ev("c", "r/0"),
        ev("z", "r/9"),
        ev("e", "s/0"),
        ev("f", "s/0"),
    ]);
    // In batch order: c r/0 (copied), e s/0 (copied), f s/0 (new), z r/9
    // (the target's own).
    assert_eq!(
        decide(&mut target, &retried, "batch t/2", max).await,
        [true, true, false, true]
    );

    // An upgrade: ids an older release counted are rows in `applied_ids`.
    // A schema-3 database (no id sets yet) with such a row; the schema run
    // at start (as the proxy runs it) marks its newest as `legacy_at`.
    // While one is left, a retry of it is a duplicate and stays out of the
    // set.
    let mut upgraded = older_database(
        &cluster,
        "upgraded",
        "DROP TABLE applied_id_sets, id_sets_state",
    )
    .await;
    upgraded
        .query_drop(
            "INSERT INTO applied_ids (ns, ckey, id, ring_pos, at, src) \
             VALUES ('v', 'a', 'old/1', 0, UNIX_TIMESTAMP() - 10, 7)",
        )
        .await
        .expect("a row of the older release");
    run_schema(&mut upgraded).await;
    let marked = count(
        &mut upgraded,
        "SELECT legacy_at - (SELECT at FROM applied_ids) FROM id_sets_state",
    )
    .await;
    assert_eq!(marked, 0, "legacy_at is the older release's newest id");
    let across = batch(vec![ev("a", "old/1"), ev("a", "old/2")]);
    assert_eq!(
        decide(&mut upgraded, &across, "batch u/1", max).await,
        [true, false],
        "old/1 was counted before the upgrade"
    );
    assert_eq!(
        count(&mut upgraded, "SELECT n FROM applied_id_sets").await,
        1
    );
    // Once retention took the old rows, the sets alone decide.
    upgraded
        .query_drop("DELETE FROM applied_ids")
        .await
        .expect("expired");
    let later = batch(vec![ev("a", "old/2"), ev("a", "old/3")]);
    assert_eq!(
        decide(&mut upgraded, &later, "batch u/2", max).await,
        [true, false],
        "old/2 is in the set"
    );

    // Schema 5 on a new database: no change-over to look back for.
    assert_eq!(
        count(&mut conn, "SELECT packed_at FROM id_sets_state").await,
        0
    );
    // Single-event requests under numbered keys share a set per 1024.
    let singles: Vec<IdEvent> = batch((0..50).map(|m| ev("a", &format!("k-{m}/0"))).collect());
    assert_eq!(
        decide(&mut conn, &singles, "batch w/7", max).await,
        vec![false; 50]
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT COUNT(*) FROM applied_id_sets WHERE skey LIKE 'k-%'"
        )
        .await,
        1,
        "fifty requests, one row"
    );
    let retry = batch(vec![ev("a", "k-7/0"), ev("a", "k-50/0")]);
    // In batch order: k-50/0 (new), k-7/0 (counted above).
    assert_eq!(
        decide(&mut conn, &retry, "batch w/8", max).await,
        [false, true]
    );

    // An upgrade from schema 4: the older release kept `req-5/0` in its
    // request's set `req-5 0x00 0`. The schema run at start (as the proxy
    // runs it) begins the change-over; during it, a retry is a duplicate
    // (and the reshard's question, "counted?", says so too).
    let mut packed = older_database(
        &cluster,
        "packed",
        "ALTER TABLE id_sets_state DROP COLUMN packed_at",
    )
    .await;
    let before = ev("a", "req-5/0");
    let mut segment = 9u64.to_le_bytes().to_vec();
    segment.extend_from_slice(&1u32.to_le_bytes());
    segment.extend_from_slice(&before.entry());
    packed
        .exec_drop(
            "INSERT INTO applied_id_sets (skey, n, at, segs) VALUES (?, 1, UNIX_TIMESTAMP(), ?)",
            (b"req-5\x000".to_vec(), segment),
        )
        .await
        .expect("a set of the older release");
    run_schema(&mut packed).await;
    let began = "SELECT UNIX_TIMESTAMP() - packed_at FROM id_sets_state";
    let since = count(&mut packed, began).await;
    assert!(
        (0..60).contains(&since),
        "the change-over began now: {since}"
    );
    // A later start does not begin it again.
    packed
        .query_drop("UPDATE id_sets_state SET packed_at = packed_at - 1000")
        .await
        .expect("began 1000 s earlier");
    run_schema(&mut packed).await;
    let since = count(&mut packed, began).await;
    assert!((1000..1060).contains(&since), "kept: {since}");
    let moved = batch(vec![ev("a", "req-5/0"), ev("a", "req-6/0")]);
    let refs: Vec<&IdEvent> = moved.iter().collect();
    assert_eq!(
        ids::counted_among(&mut packed, &refs, max)
            .await
            .expect("among"),
        identities(&moved[..1])
    );
    assert_eq!(
        decide(&mut packed, &moved, "batch p/1", max).await,
        [true, false],
        "req-5/0 was counted before the upgrade, at its old key"
    );
    // Retention ends the change-over a window after it began; the old key
    // is no longer read (a retry that late is past the window).
    packed
        .query_drop("UPDATE id_sets_state SET packed_at = UNIX_TIMESTAMP() - 100")
        .await
        .expect("the change-over began 100 s ago");
    assert!(
        !ids::end_packing_change_over(&mut packed, now_secs() - 200)
            .await
            .expect("end"),
        "a window of 200 s has not passed"
    );
    assert!(
        ids::end_packing_change_over(&mut packed, now_secs() - 50)
            .await
            .expect("end"),
        "a window of 50 s has"
    );
    assert_eq!(
        decide(
            &mut packed,
            &batch(vec![ev("a", "req-5/0")]),
            "batch p/2",
            max
        )
        .await,
        [false],
        "after the change-over only the packed set is read"
    );
    cluster.shutdown().await;
}

/// A new database of group 0's master with `undo` run on its schema: a
/// database as an older release left it.
async fn older_database(cluster: &Cluster, name: &str, undo: &str) -> Conn {
    cluster.add_database(name).await.expect("database");
    let mut conn = Conn::new(cluster.group(0).master.opts(Some(name)))
        .await
        .expect("connect");
    conn.query_drop(undo)
        .await
        .expect("back to the older schema");
    conn
}

/// Every schema statement, as the proxy runs them at start.
async fn run_schema(conn: &mut Conn) {
    for statement in tally_schema::statements() {
        conn.query_drop(statement).await.expect("schema");
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}
