//! Baselines measured in the same invocation as the proxy: one autocommit
//! upsert per event, and the `mariadb` client loading the rows of a flush
//! (the v1 layout's four rows per counter-minute, today's two, or one
//! primary-key-only row).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mysql_async::prelude::*;
use mysql_async::{OptsBuilder, Pool, PoolConstraints, PoolOpts};
use tally_admin::{ShardRing, routing_key};

use super::keys::KeySpace;

/// Result of the naive-upsert baseline.
pub struct UpsertResult {
    pub events: u64,
    pub elapsed: Duration,
    pub hist: Histogram<u64>,
}

impl UpsertResult {
    pub fn eps(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

/// What a user writes without tally: every event is one autocommit
/// `INSERT … ON DUPLICATE KEY UPDATE` of the counter's total, from `conns`
/// connections (as many as the proxy's pool may open), for `duration`.
/// Into `counter_total`, the cheapest of tally's tables (one row per
/// counter, no bucket), which favours the baseline.
pub async fn naive_upserts(
    master: SocketAddr,
    database: &str,
    ns: &str,
    keys: Arc<KeySpace>,
    conns: usize,
    duration: Duration,
) -> Result<UpsertResult, String> {
    let opts = OptsBuilder::default()
        .ip_or_hostname(master.ip().to_string())
        .tcp_port(master.port())
        .user(Some("root"))
        .db_name(Some(database))
        .prefer_socket(false)
        .pool_opts(
            PoolOpts::default()
                .with_constraints(PoolConstraints::new(conns, conns).expect("pool bounds")),
        );
    let pool = Pool::new(opts);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for w in 0..conns {
        let (pool, keys, ns) = (pool.clone(), keys.clone(), ns.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
            let mut rng = fastrand::Rng::with_seed(w as u64 + 99);
            let mut conn = pool.get_conn().await.map_err(|e| e.to_string())?;
            let stmt = conn
                .prep(
                    "INSERT INTO counter_total (ns, ckey, ring_pos, count) VALUES (?, ?, ?, 1) \
                     ON DUPLICATE KEY UPDATE count = count + 1",
                )
                .await
                .map_err(|e| e.to_string())?;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let k = keys.name(keys.sample(&mut rng));
                let pos = ShardRing::position(&routing_key(&ns, k));
                let t = Instant::now();
                conn.exec_drop(&stmt, (ns.as_str(), k, pos))
                    .await
                    .map_err(|e| e.to_string())?;
                hist.saturating_record(t.elapsed().as_micros() as u64);
                n += 1;
            }
            Ok::<_, String>((n, hist))
        }));
    }
    let mut events = 0;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
    for t in tasks {
        let (n, h) = t.await.map_err(|e| e.to_string())??;
        events += n;
        hist.add(&h).expect("same bounds");
    }
    let elapsed = started.elapsed();
    let _ = pool.disconnect().await;
    Ok(UpsertResult {
        events,
        elapsed,
        hist,
    })
}

/// A table a flush writes and its bucket width (`None`: the total).
pub type FlushTable = (&'static str, Option<i64>);

/// What the v1 layout's flush wrote per counter-minute: every tier.
pub const FOUR_ROWS: &[FlushTable] = &[
    ("counter_minute", Some(60)),
    ("counter_hour", Some(3600)),
    ("counter_day", Some(86400)),
    ("counter_total", None),
];

/// What today's flush writes per counter-minute (hours and days are
/// rolled up later): the least the layout stores, so the ceiling of any
/// flush into it.
pub const TWO_ROWS: &[FlushTable] = &[("counter_minute", Some(60)), ("counter_total", None)];

/// Writes the rows a flush of one event per key (same minute) produces
/// into `tables`, in primary-key order, as 1,000-row upserts in one
/// transaction, like the proxy's flush. Returns the row count.
pub fn flush_sql(
    path: &std::path::Path,
    ns: &str,
    keys: &[String],
    now: i64,
    tables: &[FlushTable],
) -> usize {
    let minute = now - now % 60;
    let mut sorted: Vec<&String> = keys.iter().collect();
    sorted.sort();
    let mut sql = String::with_capacity(keys.len() * tables.len() * 64);
    sql.push_str("SET autocommit=0;\nSTART TRANSACTION;\n");
    let mut rows = 0;
    for &(table, width) in tables {
        for chunk in sorted.chunks(1000) {
            match width {
                Some(_) => sql.push_str(&format!(
                    "INSERT INTO {table} (ns, ckey, bucket, ring_pos, count) VALUES "
                )),
                None => sql.push_str(&format!(
                    "INSERT INTO {table} (ns, ckey, ring_pos, count) VALUES "
                )),
            }
            for (i, k) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push(',');
                }
                let pos = ShardRing::position(&routing_key(ns, k));
                match width {
                    Some(w) => {
                        let _ = write!(sql, "('{ns}','{k}',{},{pos},1)", minute - minute % w);
                    }
                    None => {
                        let _ = write!(sql, "('{ns}','{k}',{pos},1)");
                    }
                }
                rows += 1;
            }
            sql.push_str(" ON DUPLICATE KEY UPDATE count = count + VALUES(count);\n");
        }
    }
    sql.push_str("COMMIT;\n");
    std::fs::write(path, sql).expect("write SQL file");
    rows
}

/// The database of the primary-key-only baseline: apart from tally's, so
/// no build of the proxy ever sees its table.
pub const PK_ONLY_DATABASE: &str = "tally_bench";

/// A root connection to `master`, without a default database.
async fn root_conn(master: SocketAddr) -> Result<mysql_async::Conn, String> {
    let opts = OptsBuilder::default()
        .ip_or_hostname(master.ip().to_string())
        .tcp_port(master.port())
        .user(Some("root"))
        .prefer_socket(false);
    mysql_async::Conn::new(opts)
        .await
        .map_err(|e| format!("connect to {master}: {e}"))
}

/// Creates `tally_bench.pk_only`: the primary key of tally's minute rows
/// `(ns, ckey, bucket)`, same types, and no other column or index: the
/// least a store of counter-minutes can write per counter-minute.
pub async fn prepare_pk_only(master: SocketAddr) -> Result<(), String> {
    let mut c = root_conn(master).await?;
    for stmt in [
        format!("CREATE DATABASE IF NOT EXISTS `{PK_ONLY_DATABASE}`"),
        format!(
            "CREATE TABLE IF NOT EXISTS `{PK_ONLY_DATABASE}`.pk_only (\
             ns VARBINARY(64) NOT NULL, ckey VARBINARY(256) NOT NULL, bucket BIGINT NOT NULL, \
             PRIMARY KEY (ns, ckey, bucket)) ENGINE = InnoDB"
        ),
    ] {
        c.query_drop(&stmt)
            .await
            .map_err(|e| format!("{stmt}: {e}"))?;
    }
    let _ = c.disconnect().await;
    Ok(())
}

/// Rows of namespace `ns` in `tally_bench.pk_only`.
pub async fn pk_only_rows(master: SocketAddr, ns: &str) -> Result<u64, String> {
    let mut c = root_conn(master).await?;
    let n: Option<u64> = c
        .exec_first(
            format!("SELECT COUNT(*) FROM `{PK_ONLY_DATABASE}`.pk_only WHERE ns = ?"),
            (ns,),
        )
        .await
        .map_err(|e| format!("count pk_only rows: {e}"))?;
    let _ = c.disconnect().await;
    Ok(n.unwrap_or(0))
}

/// Writes one primary-key-only row per key (all in the same minute) for
/// `tally_bench.pk_only`, in primary-key order, as 1,000-row `INSERT`s in
/// one transaction, like the proxy's flush. Returns the row count.
pub fn pk_only_sql(path: &std::path::Path, ns: &str, keys: &[String], now: i64) -> usize {
    let minute = now - now % 60;
    let mut sorted: Vec<&String> = keys.iter().collect();
    sorted.sort();
    let mut sql = String::with_capacity(keys.len() * 48);
    sql.push_str("SET autocommit=0;\nSTART TRANSACTION;\n");
    for chunk in sorted.chunks(1000) {
        sql.push_str("INSERT INTO pk_only (ns, ckey, bucket) VALUES ");
        for (i, k) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            let _ = write!(sql, "('{ns}','{k}',{minute})");
        }
        sql.push_str(";\n");
    }
    sql.push_str("COMMIT;\n");
    std::fs::write(path, sql).expect("write SQL file");
    sorted.len()
}

/// Times `mariadb -h127.0.0.1 -P<port> -uroot <db> < file`.
pub async fn mariadb_client_load(
    master: SocketAddr,
    database: &str,
    file: &std::path::Path,
) -> Result<Duration, String> {
    let input = std::fs::File::open(file).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let out = tokio::process::Command::new("mariadb")
        .arg(format!("-h{}", master.ip()))
        .arg(format!("-P{}", master.port()))
        .arg("-uroot")
        .arg(database)
        .stdin(std::process::Stdio::from(input))
        .output()
        .await
        .map_err(|e| format!("run mariadb client: {e}"))?;
    let took = t.elapsed();
    if !out.status.success() {
        return Err(format!(
            "mariadb client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(took)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_sql_writes_each_table_of_the_layout_once_per_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("two.sql");
        let keys: Vec<String> = (0..1500).map(|i| format!("k-{i:05}")).collect();
        assert_eq!(flush_sql(&file, "ns1", &keys, 3600 + 61, TWO_ROWS), 3000);
        let sql = std::fs::read_to_string(&file).expect("read");
        assert_eq!(sql.matches("INSERT INTO counter_minute ").count(), 2);
        assert_eq!(sql.matches("INSERT INTO counter_total ").count(), 2);
        assert!(!sql.contains("counter_hour") && !sql.contains("counter_day"));
        // Minute rows in the event's minute; totals without a bucket.
        assert_eq!(sql.matches("('ns1','k-00007',3660,").count(), 1);
        let four = dir.path().join("four.sql");
        assert_eq!(flush_sql(&four, "ns1", &keys, 3600 + 61, FOUR_ROWS), 6000);
    }

    #[test]
    fn pk_only_sql_is_one_row_per_key_in_key_order_1000_per_insert() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pk.sql");
        let keys: Vec<String> = (0..2500).rev().map(|i| format!("k-{i:05}")).collect();
        let rows = pk_only_sql(&file, "ns1", &keys, 120 + 59);
        assert_eq!(rows, 2500);
        let sql = std::fs::read_to_string(&file).expect("read");
        assert_eq!(sql.matches("INSERT INTO pk_only").count(), 3);
        assert_eq!(sql.matches("('ns1','k-").count(), 2500);
        // Every row in the minute's bucket, keys ascending.
        assert_eq!(sql.matches(",120)").count(), 2500);
        let first = sql.find("'k-00000'").expect("first key");
        let last = sql.find("'k-02499'").expect("last key");
        assert!(first < last);
        assert!(sql.starts_with("SET autocommit=0;") && sql.ends_with("COMMIT;\n"));
    }
}
