//! A batch past `buffer.transaction_rows` goes in parts, each exactly once
//! (`engine::flusher::apply_parts`). In a file of its own: it panics a
//! flusher, and `tally_flusher_restarts_total` is process-wide, so it must
//! not share a process with `write_exactness.rs`'s panicking flusher.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tally_harness::{Cluster, ClusterSpec};
use tally_integration::{Client, TestProxy};

/// A batch past `buffer.transaction_rows` is applied in parts, one
/// transaction each. The flusher panics after the first part committed
/// (a failpoint); restarted, it repeats the same parts under the same
/// dedup rows, finds the first applied and commits the rest. Strong reads
/// racing the whole time never count a committed part twice (once from
/// the database, once from the batch in flight) nor miss one: every read
/// of a key is 0 (before the write merged) or exactly its delta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_in_parts_counts_each_part_once_across_a_panic_and_strong_reads() {
    let owned = Cluster::start(ClusterSpec {
        groups: 2,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let cluster = &owned;
    let client = Client::new();
    let prefix = "parts-flusher";
    let proxy = TestProxy::start(cluster, |c| {
        c.writer_id = Some(prefix.into());
        c.buffer.commit_timeout = Duration::from_secs(20);
        // 2 rows per counter (a minute and the total): 5 counters a part.
        c.buffer.transaction_rows = 10;
    })
    .await;
    let keys = 60;
    let events: Vec<Value> = (0..keys)
        .map(|i| json!({ "ns": "parts", "key": format!("k{i}"), "delta": 7 }))
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let wrong = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut readers = Vec::new();
    for r in 0..2 {
        let (client, url, stop, wrong) =
            (client.clone(), proxy.url(""), stop.clone(), wrong.clone());
        readers.push(tokio::spawn(async move {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let i = (reads * 7 + r) % keys;
                let (status, body) = client
                    .get(&format!("{url}/v1/counters/parts/k{i}?consistency=strong"))
                    .await
                    .expect("read");
                reads += 1;
                let total = body["total"].as_i64();
                if status != 200 || !matches!(total, Some(0) | Some(7)) {
                    wrong
                        .lock()
                        .expect("wrong")
                        .push(format!("k{i}: {status} {body}"));
                }
            }
            reads
        }));
    }
    tally_proxy::failpoint::arm("flusher.after_commit", prefix);
    let (status, body) = client
        .post_json(&proxy.url("/v1/events?ack=committed"), &json!(events))
        .await
        .expect("write");
    assert_eq!(
        status, 200,
        "the write must commit across the panic: {body}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut reads = 0;
    for r in readers {
        reads += r.await.expect("reader");
    }
    let wrong = wrong.lock().expect("wrong").clone();
    assert!(
        wrong.is_empty(),
        "strong reads off: {:?}",
        &wrong[..wrong.len().min(5)]
    );
    assert!(reads > 20, "the readers raced the write ({reads} reads)");
    for i in 0..keys {
        let (status, body) = client
            .get(&proxy.url(&format!("/v1/counters/parts/k{i}?consistency=strong")))
            .await
            .expect("read");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["total"], 7, "k{i} counted once");
    }
    let metrics = proxy.metrics().await;
    let restarts = metrics
        .lines()
        .filter(|l| l.starts_with("tally_flusher_restarts_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum::<u64>();
    assert_eq!(restarts, 1, "the flusher restarted once: {metrics}");
    // On the masters: every key's total row is 7, and the batch took more
    // than one dedup row (it went in parts).
    let mut dedup_rows = 0;
    for g in cluster.groups() {
        let rows = g
            .master
            .sql(&format!(
                "SELECT COUNT(*) FROM tally.applied_batches WHERE writer_id LIKE '{prefix}%'"
            ))
            .await
            .expect("dedup rows");
        dedup_rows += rows[0].get::<i64, _>(0).unwrap_or(0);
    }
    assert!(
        dedup_rows > 2,
        "the batch went in parts: {dedup_rows} dedup rows"
    );
    proxy.stop().await.expect("clean stop");
    owned.shutdown().await;
}
