//! The read path against real MariaDB: the tier planner against brute
//! force, series, batch queries, top-K, replica routing and fallbacks,
//! strong reads before any flush, bad parameters, health and retention.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use tally_harness::{Cluster, ClusterSpec};
use tally_integration::{Client, TEST_TOKEN, TestProxy, eventually, expected, stored};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn floor(t: i64, step: i64) -> i64 {
    t - t.rem_euclid(step)
}

async fn flush(client: &Client, proxy: &TestProxy) {
    let (status, body) = client
        .admin_post(&proxy.admin_url("/admin/v1/flush"), TEST_TOKEN)
        .await
        .expect("flush");
    assert_eq!(status, 200, "{body}");
}

async fn post(client: &Client, proxy: &TestProxy, events: Vec<Value>) {
    for chunk in events.chunks(5000) {
        let (status, body) = client
            .post_json(&proxy.url("/v1/events"), &Value::Array(chunk.to_vec()))
            .await
            .expect("post");
        assert_eq!(status, 200, "{body}");
    }
}

/// (key, ts, delta) events over the last three days.
fn random_events(
    rng: &mut fastrand::Rng,
    keys: usize,
    n: usize,
    now: i64,
) -> Vec<(String, i64, i64)> {
    (0..n)
        .map(|_| {
            (
                format!("p{}", rng.usize(0..keys)),
                now - rng.i64(0..3 * 86400),
                rng.i64(-3..=10),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_and_series_equal_brute_force_over_500_random_ranges() {
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let proxy = TestProxy::start(&cluster, |_| {}).await;
    let client = Client::new();
    let t = now();
    let mut rng = fastrand::Rng::with_seed(4);
    let events = random_events(&mut rng, 8, 20_000, t);
    post(
        &client,
        &proxy,
        events
            .iter()
            .map(|(k, ts, d)| json!({ "ns": "plan", "key": k, "ts": ts, "delta": d }))
            .collect(),
    )
    .await;
    flush(&client, &proxy).await;

    let brute = |key: &str, from: i64, to: i64| -> i64 {
        let (f, t) = (floor(from, 60), floor(to, 60));
        events
            .iter()
            .filter(|(k, ts, _)| k == key && floor(*ts, 60) >= f && floor(*ts, 60) < t)
            .map(|(_, _, d)| d)
            .sum()
    };
    for i in 0..500 {
        let key = format!("p{}", rng.usize(0..8));
        // Unaligned ends anywhere in (and a bit around) the three days.
        let from = t - 3 * 86400 - 7200 + rng.i64(0..3 * 86400 + 7200);
        let to = from + 1 + rng.i64(0..(t + 600 - from));
        let consistency = if i % 5 == 0 { "strong" } else { "eventual" };
        let (status, body) = client
            .get(&proxy.url(&format!(
                "/v1/counters/plan/{key}/count?from={from}&to={to}&consistency={consistency}"
            )))
            .await
            .expect("count");
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["count"],
            json!(brute(&key, from, to)),
            "{key} [{from}, {to}) {consistency}"
        );
        assert_eq!(body["from"], json!(floor(from, 60)));
    }

    // Series at every step equal brute-force bucket sums (non-zero only).
    for (step, width, span) in [
        ("minute", 60, 6 * 3600),
        ("hour", 3600, 3 * 86400),
        ("day", 86400, 4 * 86400),
    ] {
        for key in ["p0", "p5"] {
            let from = t - span + rng.i64(0..3600);
            let to = t + 60;
            let (f, tt) = (floor(from, width), floor(to, width));
            let mut want: BTreeMap<i64, i64> = BTreeMap::new();
            for (k, ts, d) in &events {
                let b = floor(*ts, width);
                if k == key && b >= f && b < tt {
                    *want.entry(b).or_default() += d;
                }
            }
            want.retain(|_, v| *v != 0);
            let (status, body) = client
                .get(&proxy.url(&format!(
                    "/v1/counters/plan/{key}/series?from={from}&to={to}&step={step}"
                )))
                .await
                .expect("series");
            assert_eq!(status, 200, "{body}");
            let got: BTreeMap<i64, i64> = body["points"]
                .as_array()
                .expect("points")
                .iter()
                .map(|p| {
                    (
                        p["ts"].as_i64().expect("ts"),
                        p["count"].as_i64().expect("count"),
                    )
                })
                .collect();
            assert_eq!(got, want, "{key} step {step}");
            let ts: Vec<i64> = got.keys().copied().collect();
            assert!(ts.windows(2).all(|w| w[0] < w[1]), "ascending");
            assert_eq!(body["complete"], json!(true), "within retention");
            assert_eq!(body["step"], step);
        }
    }
    proxy.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_k_over_10k_keys_and_batch_queries_equal_brute_force() {
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let proxy = TestProxy::start(&cluster, |_| {}).await;
    let client = Client::new();
    let t = now();
    let mut rng = fastrand::Rng::with_seed(9);
    // Small counts so that many keys tie and the key order decides.
    let counts: Vec<(String, i64, i64)> = (0..10_000)
        .map(|i| {
            (
                format!("key{i:05}"),
                rng.i64(1..=40),
                t - rng.i64(0..2 * 86400),
            )
        })
        .collect();
    post(
        &client,
        &proxy,
        counts
            .iter()
            .map(|(k, c, ts)| json!({ "ns": "topk", "key": k, "delta": c, "ts": ts }))
            .collect(),
    )
    .await;
    flush(&client, &proxy).await;

    let brute = |range: Option<(i64, i64)>, limit: usize| -> Vec<Value> {
        let mut v: Vec<(&str, i64)> = counts
            .iter()
            .filter(|(_, _, ts)| {
                range.is_none_or(|(f, t)| {
                    floor(*ts, 60) >= floor(f, 60) && floor(*ts, 60) < floor(t, 60)
                })
            })
            .map(|(k, c, _)| (k.as_str(), *c))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v.truncate(limit);
        v.into_iter()
            .map(|(k, c)| json!({ "key": k, "count": c }))
            .collect()
    };
    for (range, limit) in [
        (None, 10),
        (None, 1000),
        (Some((t - 86400 - 1234, t - 3600 + 17)), 25),
        (Some((t - 3 * 86400, t + 60)), 1000),
    ] {
        let q = match range {
            Some((f, to)) => format!("?from={f}&to={to}&limit={limit}"),
            None => format!("?limit={limit}"),
        };
        for consistency in ["eventual", "strong"] {
            let (status, body) = client
                .get(&proxy.url(&format!("/v1/top/topk{q}&consistency={consistency}")))
                .await
                .expect("top");
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                body["items"],
                Value::Array(brute(range, limit)),
                "{q} {consistency}"
            );
        }
    }

    // Batch query: request order, duplicates and unknown keys, with and
    // without a range.
    let keys = vec!["key00042", "nope", "key09999", "key00042", "key00001"];
    let total = |k: &str| {
        counts
            .iter()
            .find(|(x, _, _)| x == k)
            .map_or(0, |(_, c, _)| *c)
    };
    let (status, body) = client
        .post_json(
            &proxy.url("/v1/counters/query"),
            &json!({ "ns": "topk", "keys": keys }),
        )
        .await
        .expect("query");
    assert_eq!(status, 200, "{body}");
    let want: Vec<Value> = keys
        .iter()
        .map(|k| json!({ "key": k, "count": total(k) }))
        .collect();
    assert_eq!(body["results"], Value::Array(want));

    let all: Vec<String> = (0..1000).map(|i| format!("key{:05}", i * 7)).collect();
    let (f, to) = (t - 86400, t);
    let (status, body) = client
        .post_json(
            &proxy.url("/v1/counters/query?consistency=strong"),
            &json!({ "ns": "topk", "keys": all, "from": f, "to": to }),
        )
        .await
        .expect("query range");
    assert_eq!(status, 200, "{body}");
    for (i, r) in body["results"]
        .as_array()
        .expect("results")
        .iter()
        .enumerate()
    {
        let (k, c, ts) = &counts[i * 7];
        let want = if floor(*ts, 60) >= floor(f, 60) && floor(*ts, 60) < floor(to, 60) {
            *c
        } else {
            0
        };
        assert_eq!(r, &json!({ "key": k, "count": want }));
    }
    proxy.stop().await.expect("clean stop");
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics(client: &Client, proxy: &TestProxy) -> String {
    client
        .get(&proxy.admin_url("/metrics"))
        .await
        .expect("metrics")
        .1
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn read_total(client: &Client, proxy: &TestProxy, key: &str) -> (i64, String) {
    let (status, body, headers) = client
        .get_with_headers(&proxy.url(&format!("/v1/counters/route/{key}")))
        .await
        .expect("read");
    assert_eq!(status, 200, "{body}");
    let node = headers
        .get("x-tally-node")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (body["total"].as_i64().expect("total"), node)
}

/// A stopped SQL thread makes the replica ineligible (reads go to the
/// master and see fresh writes); restarting replication brings reads back
/// to the replica; a dead replica costs no failed read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_follow_replica_health() {
    let cluster = Cluster::start(ClusterSpec::default())
        .await
        .expect("cluster");
    let proxy = TestProxy::start(&cluster, |c| {
        c.health.interval = Duration::from_millis(100);
        c.health.timeout = Duration::from_millis(500);
        // This test follows where each read is routed; a cached total
        // would answer with the role of the read that filled it (for up
        // to `reads.cache.max_age`, as documented) instead.
        c.reads.cache = None;
    })
    .await;
    let client = Client::new();
    let replica = &cluster.group(0).replicas[0];
    let committed = |delta: i64| {
        let (client, proxy) = (&client, &proxy);
        async move {
            let (status, body) = client
                .post_json(
                    &proxy.url("/v1/events?ack=committed"),
                    &json!({ "ns": "route", "key": "r", "delta": delta }),
                )
                .await
                .expect("post");
            assert_eq!(status, 200, "{body}");
        }
    };
    committed(5).await;
    eventually(
        Duration::from_secs(10),
        "replica serves the committed write",
        || async {
            (read_total(&client, &proxy, "r").await == (5, "replica".into())).then_some(())
        },
    )
    .await;

    replica.stop_sql_thread().await.expect("stop sql thread");
    eventually(
        Duration::from_secs(10),
        "health sees the stopped SQL thread",
        || async {
            let (_, h) = client
                .admin_get(&proxy.admin_url("/admin/v1/health"), TEST_TOKEN)
                .await
                .ok()?;
            (h["groups"][0]["replicas"][0]["sql_running"] == json!(false)).then_some(())
        },
    )
    .await;
    let fallbacks_before = metric(
        &metrics(&client, &proxy).await,
        "tally_read_fallbacks_total{group=\"g0\",reason=\"no_replica\"}",
    );
    committed(7).await;
    assert_eq!(
        read_total(&client, &proxy, "r").await,
        (12, "master".into()),
        "fresh write read from the master"
    );
    let fallbacks_after = metric(
        &metrics(&client, &proxy).await,
        "tally_read_fallbacks_total{group=\"g0\",reason=\"no_replica\"}",
    );
    assert!(
        fallbacks_after > fallbacks_before,
        "fallback counted: {fallbacks_before} -> {fallbacks_after}"
    );

    replica.start_replication().await.expect("start slave");
    eventually(
        Duration::from_secs(10),
        "reads return to the replica",
        || async {
            (read_total(&client, &proxy, "r").await == (12, "replica".into())).then_some(())
        },
    )
    .await;
    let m = metrics(&client, &proxy).await;
    assert!(
        metric(
            &m,
            "tally_read_duration_seconds_count{route=\"total\",role=\"replica\"}"
        ) > 0.0,
        "{m}"
    );
    assert!(
        m.contains("tally_replica_lag_seconds{group=\"g0\""),
        "lag metric exported"
    );

    // The only replica dies: every read still succeeds, from the master.
    replica.kill9();
    for _ in 0..20 {
        assert_eq!(
            read_total(&client, &proxy, "r").await,
            (12, "master".into())
        );
    }
    let (_, h) = client
        .admin_get(&proxy.admin_url("/admin/v1/health"), TEST_TOKEN)
        .await
        .expect("health");
    assert_eq!(h["groups"][0]["master"]["up"], json!(true), "{h}");
    assert_eq!(h["groups"][0]["replicas"][0]["up"], json!(false), "{h}");
    assert!(
        h["groups"][0]["replicas"][0]["last_error"].is_string(),
        "{h}"
    );
    proxy.stop().await.expect("clean stop");
}

/// With no flush at all (one-hour interval), strong reads of every kind
/// already see buffered writes; eventual reads do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_reads_see_buffered_writes_before_any_flush() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let proxy = TestProxy::start(&cluster, |c| {
        c.buffer.flush_interval = Duration::from_secs(3600)
    })
    .await;
    let client = Client::new();
    let t = floor(now(), 60);
    post(
        &client,
        &proxy,
        vec![
            json!({ "ns": "strong", "key": "s", "delta": 4, "ts": t - 120 }),
            json!({ "ns": "strong", "key": "s", "delta": 6, "ts": t }),
        ],
    )
    .await;
    let from = t - 180;
    let to = t + 60;
    let get = |path: String| {
        let client = &client;
        let url = proxy.url(&path);
        async move { client.get(&url).await.expect("read").1 }
    };
    assert_eq!(
        get("/v1/counters/strong/s?consistency=strong".into()).await["total"],
        10
    );
    assert_eq!(get("/v1/counters/strong/s".into()).await["total"], 0);
    assert_eq!(
        get(format!(
            "/v1/counters/strong/s/count?from={from}&to={to}&consistency=strong"
        ))
        .await["count"],
        10
    );
    assert_eq!(
        get(format!(
            "/v1/counters/strong/s/count?from={from}&to={t}&consistency=strong"
        ))
        .await["count"],
        4
    );
    let series = get(format!(
        "/v1/counters/strong/s/series?from={from}&to={to}&step=minute&consistency=strong"
    ))
    .await;
    assert_eq!(
        series["points"],
        json!([{ "ts": t - 120, "count": 4 }, { "ts": t, "count": 6 }])
    );
    let top = get("/v1/top/strong?consistency=strong".into()).await;
    assert_eq!(top["items"], json!([{ "key": "s", "count": 10 }]));
    let (_, q) = client
        .post_json(
            &proxy.url("/v1/counters/query?consistency=strong"),
            &json!({ "ns": "strong", "keys": ["s", "x"] }),
        )
        .await
        .expect("query");
    assert_eq!(
        q["results"],
        json!([{ "key": "s", "count": 10 }, { "key": "x", "count": 0 }])
    );
    proxy.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_read_parameters_get_documented_400s() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let proxy = TestProxy::start(&cluster, |_| {}).await;
    let client = Client::new();
    let t = now();
    let gets = [
        ("/v1/counters/v/k/count".to_owned(), "invalid_param"),
        (format!("/v1/counters/v/k/count?from={t}"), "invalid_param"),
        (
            "/v1/counters/v/k/count?from=yesterday&to=now".to_owned(),
            "invalid_param",
        ),
        (
            format!("/v1/counters/v/k/count?from={t}&to={t}"),
            "invalid_range",
        ),
        (
            format!("/v1/counters/v/k/count?from={t}&to={}", t - 60),
            "invalid_range",
        ),
        (
            format!("/v1/counters/v/k/series?from={}&to={t}&step=week", t - 60),
            "invalid_param",
        ),
        (
            format!(
                "/v1/counters/v/k/series?from={}&to={t}&step=minute",
                t - 10_001 * 60
            ),
            "too_many_points",
        ),
        (
            "/v1/counters/v/k?consistency=linearizable".to_owned(),
            "invalid_param",
        ),
        ("/v1/top/v?limit=1001".to_owned(), "invalid_param"),
        ("/v1/top/v?limit=0".to_owned(), "invalid_param"),
        (format!("/v1/top/v?from={t}"), "invalid_param"),
        ("/v1/top/Bad".to_owned(), "invalid_param"),
        // Regressions found by schemathesis (.ci/schemathesis): a time at
        // the edge of i64 overflowed the range arithmetic and the handler
        // panicked, closing the connection without an answer.
        (
            "/v1/counters/v/k/count?from=-9223372036854775808&to=2000-01-01T00:00:00Z".to_owned(),
            "invalid_param",
        ),
        (
            "/v1/counters/v/k/series?from=-9223372036854775808&to=0&step=day".to_owned(),
            "invalid_param",
        ),
        (
            "/v1/top/v?from=-9223372036854775808&to=2000-01-01T00:00:00Z".to_owned(),
            "invalid_param",
        ),
        (
            format!("/v1/counters/v/k/count?from={t}&to=9223372036854775807"),
            "invalid_param",
        ),
        // Regression: a path segment that is not UTF-8 was answered by
        // axum in plain text instead of the JSON error body.
        ("/v1/top/%FF".to_owned(), "invalid_param"),
    ];
    for (path, code) in gets {
        let (status, body) = client.get(&proxy.url(&path)).await.expect("get");
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some(code)),
            "{path}: {body}"
        );
    }
    let too_many: Vec<String> = (0..1001).map(|i| i.to_string()).collect();
    let posts = [
        (json!({ "ns": "v", "keys": too_many }), "invalid_param"),
        (json!({ "ns": "v", "keys": [] }), "invalid_param"),
        (
            json!({ "ns": "v", "keys": ["a"], "form": 1 }),
            "invalid_param",
        ),
        (
            json!({ "ns": "v", "keys": ["a"], "from": t }),
            "invalid_param",
        ),
        (
            json!({ "ns": "v", "keys": ["a"], "from": t, "to": t - 1 }),
            "invalid_range",
        ),
        (json!({ "ns": "v", "keys": [""] }), "invalid_param"),
        (json!({ "ns": "V", "keys": ["a"] }), "invalid_param"),
        // Regression found by schemathesis: panicked like the GETs above.
        (
            json!({ "ns": "a", "keys": ["k"], "from": -9_223_372_036_854_720_001_i64, "to": 0 }),
            "invalid_param",
        ),
    ];
    for (body, code) in posts {
        let (status, resp) = client
            .post_json(&proxy.url("/v1/counters/query"), &body)
            .await
            .expect("post");
        assert_eq!(
            (status, resp["error"]["code"].as_str()),
            (400, Some(code)),
            "{body}: {resp}"
        );
    }
    let (status, resp) = client
        .post_body(
            &proxy.url("/v1/counters/query"),
            "application/json",
            b"{\"ns\":".to_vec(),
        )
        .await
        .expect("post");
    assert_eq!(
        (status, resp["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    // Regression: the query body had no size limit at all (the data
    // router disables axum's default for ingest, which has its own).
    let mut huge = br#"{"ns":"v","keys":[""#.to_vec();
    huge.resize(9 << 20, b'a');
    huge.extend_from_slice(br#""]}"#);
    let (status, resp) = client
        .post_body(&proxy.url("/v1/counters/query"), "application/json", huge)
        .await
        .expect("post");
    assert_eq!(
        (status, resp["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{resp}"
    );
    proxy.stop().await.expect("clean stop");
}

/// Expired minute and hour rows are deleted in chunks; young rows stay; a
/// series reaching past the minute retention says it is incomplete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_expired_rows_in_chunks() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let master = &cluster.group(0).master;
    let t = floor(now(), 3600);
    // 35 expired minute rows, 12 expired hour rows, and young ones of each.
    let mut sql = String::from(
        "INSERT INTO tally.counter_minute (ns, ckey, bucket, ring_pos, count) VALUES ",
    );
    let rows: Vec<String> = (0..35)
        .map(|i| format!("('ret','k',{},0,1)", t - 8 * 86400 - i * 60))
        .chain((0..3).map(|i| format!("('ret','k',{},0,1)", t - i * 60)))
        .collect();
    sql += &rows.join(",");
    master.exec(&sql).await.expect("insert minutes");
    let rows: Vec<String> = (0..12)
        .map(|i| format!("('ret','k',{},0,1)", t - 91 * 86400 - i * 3600))
        .chain([format!("('ret','k',{},0,1)", t - 86400)])
        .collect();
    master
        .exec(&format!(
            "INSERT INTO tally.counter_hour (ns, ckey, bucket, ring_pos, count) VALUES {}",
            rows.join(",")
        ))
        .await
        .expect("insert hours");
    // Minute rows not rolled up yet (at or above the rollup watermark) are
    // the only copy of their minutes: 18 of the expired ones are, first.
    let watermark = |w: i64| async move {
        master
            .exec(&format!(
                "UPDATE tally.rollup_state SET watermark = {w} WHERE id = 1"
            ))
            .await
            .expect("set the watermark");
    };
    watermark(t - 8 * 86400 - 17 * 60).await;
    let proxy = TestProxy::start(&cluster, |c| {
        c.retention.interval = Duration::from_millis(200);
        c.retention.chunk_rows = 10;
        // The watermark stays where this test puts it.
        c.rollup.enabled = false;
    })
    .await;
    let client = Client::new();
    let count_rows = |table: &'static str| async move {
        let rows = master
            .sql(&format!(
                "SELECT COUNT(*) FROM tally.{table} WHERE ns = 'ret'"
            ))
            .await
            .expect("count");
        rows[0].get::<i64, _>(0).expect("count value")
    };
    eventually(
        Duration::from_secs(20),
        "rolled-up expired rows deleted",
        || async {
            (count_rows("counter_minute").await == 3 + 18 && count_rows("counter_hour").await == 1)
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        count_rows("counter_minute").await,
        3 + 18,
        "five more passes kept the minutes above the watermark"
    );
    watermark(t - 7200).await;
    eventually(Duration::from_secs(20), "expired rows deleted", || async {
        (count_rows("counter_minute").await == 3 && count_rows("counter_hour").await == 1)
            .then_some(())
    })
    .await;
    let m = metrics(&client, &proxy).await;
    assert!(
        metric(
            &m,
            "tally_retention_deleted_rows_total{group=\"g0\",table=\"counter_minute\"}"
        ) >= 35.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "tally_retention_deleted_rows_total{group=\"g0\",table=\"counter_hour\"}"
        ) >= 12.0,
        "{m}"
    );

    let (_, body) = client
        .get(&proxy.url(&format!(
            "/v1/counters/ret/k/series?from={}&to={}&step=minute",
            t - 8 * 86400,
            t - 8 * 86400 + 3600
        )))
        .await
        .expect("series");
    assert_eq!(body["complete"], json!(false), "{body}");
    let (_, body) = client
        .get(&proxy.url(&format!(
            "/v1/counters/ret/k/series?from={}&to={}&step=minute",
            t - 600,
            t + 60
        )))
        .await
        .expect("series");
    assert_eq!(body["complete"], json!(true));
    assert_eq!(body["points"].as_array().map(Vec::len), Some(3));
    proxy.stop().await.expect("clean stop");
}

/// A strong top-K counts stored rows plus pending deltas exactly: keys
/// that pending deltas push up (or that have no stored row yet), keys
/// they push down (below others, to zero, negative), ties decided by key;
/// and it reads a number of keys that depends on the limit, not on how
/// many keys have pending deltas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_top_k_adds_pending_deltas_exactly_and_reads_few_keys() {
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    // Nothing is flushed but by the admin flush below.
    let proxy = TestProxy::start(&cluster, |c| {
        c.buffer.flush_interval = Duration::from_secs(3600)
    })
    .await;
    let client = Client::new();
    let t = floor(now(), 60);
    let (early, late) = (t - 3 * 3600, t - 600);
    let range = (t - 3600, t + 60);
    // (ns, key, delta, ts) of what is flushed first, then left pending.
    let mut stored: Vec<(&str, String, i64, i64)> = Vec::new();
    let mut pending: Vec<(&str, String, i64, i64)> = Vec::new();
    let mut rng = fastrand::Rng::with_seed(20);

    // "fall": the stored leader loses almost everything; keys without
    // pending deltas must take its place.
    for (k, c) in [("a", 100), ("b", 50), ("c", 10), ("d", 9)] {
        stored.push(("fall", k.to_owned(), c, late));
    }
    pending.push(("fall", "a".to_owned(), -95, late));
    pending.push(("fall", "c".to_owned(), -20, late));

    // "rise": small stored counts (many ties), pending deltas up and down,
    // keys stored nowhere yet, a key that returns to exactly zero.
    for i in 0..300 {
        let ts = if i % 2 == 0 { early } else { late };
        stored.push(("rise", format!("r{i:03}"), (i % 20) + 1, ts));
    }
    for i in 0..100 {
        let ts = if i % 3 == 0 { early } else { late };
        pending.push(("rise", format!("r{i:03}"), rng.i64(0..=25), ts));
    }
    for i in 100..150 {
        pending.push(("rise", format!("r{i:03}"), -rng.i64(0..=30), late));
    }
    pending.push(("rise", "r150".to_owned(), -(150 % 20 + 1), early));
    for j in 0..20 {
        pending.push(("rise", format!("n{j:02}"), rng.i64(-10..=40), late));
    }

    // "many": 4,000 stored keys far apart, every one with a small pending
    // delta: the strong top-10 must not read them all.
    for i in 0..4000i64 {
        let key = format!("m{i:04}");
        stored.push(("many", key.clone(), (i * 7919 % 4000) * 10 + 1, late));
        pending.push(("many", key, rng.i64(-5..=5), late));
    }

    let body = |events: &[(&str, String, i64, i64)]| -> Vec<Value> {
        events
            .iter()
            .map(|(ns, k, d, ts)| json!({ "ns": ns, "key": k, "delta": d, "ts": ts }))
            .collect()
    };
    post(&client, &proxy, body(&stored)).await;
    flush(&client, &proxy).await;
    post(&client, &proxy, body(&pending)).await;

    let sums = |ns: &str, events: &[&[(&str, String, i64, i64)]], range: Option<(i64, i64)>| {
        let mut out: BTreeMap<String, i64> = BTreeMap::new();
        for (n, k, d, ts) in events.iter().flat_map(|e| e.iter()) {
            if *n == ns && range.is_none_or(|(f, to)| (f..to).contains(ts)) {
                *out.entry(k.clone()).or_default() += d;
            }
        }
        out
    };
    let top = |ns: &str, limit: usize, range: Option<(i64, i64)>, consistency: &str| {
        let q = match range {
            Some((f, to)) => format!("/v1/top/{ns}?limit={limit}&from={f}&to={to}"),
            None => format!("/v1/top/{ns}?limit={limit}"),
        };
        let url = proxy.url(&format!("{q}&consistency={consistency}"));
        let client = &client;
        async move {
            let (status, body) = client.get(&url).await.expect("top");
            assert_eq!(status, 200, "{url}: {body}");
            body["items"].clone()
        }
    };
    for (ns, limits) in [
        ("fall", &[1usize, 2, 3, 10][..]),
        ("rise", &[1, 5, 17, 60, 400][..]),
        ("many", &[1, 10, 100][..]),
    ] {
        for &limit in limits {
            for r in [None, Some(range)] {
                let all = sums(ns, &[&stored, &pending], r);
                assert_eq!(
                    top(ns, limit, r, "strong").await,
                    expected::top_k(&all, limit),
                    "strong top {limit} of {ns} over {r:?}"
                );
                let flushed = sums(ns, &[&stored], r);
                assert_eq!(
                    top(ns, limit, r, "eventual").await,
                    expected::top_k(&flushed, limit),
                    "eventual top {limit} of {ns} over {r:?}"
                );
            }
        }
    }

    // 4,000 keys have pending deltas; the top 10 reads a few dozen rows
    // from each master, not every one of them.
    let masters = [&cluster.group(0).master, &cluster.group(1).master];
    let mut before = 0;
    for m in masters {
        before += stored::rows_sent(m).await;
    }
    let limit = 10;
    let all = sums("many", &[&stored, &pending], None);
    assert_eq!(
        top("many", limit, None, "strong").await,
        expected::top_k(&all, limit)
    );
    let mut after = 0;
    for m in masters {
        after += stored::rows_sent(m).await;
    }
    // Minus the two `SHOW STATUS` rows each master sent us.
    let rows = after - before - masters.len() as u64;
    println!("strong top {limit} over 4,000 pending keys: {rows} rows sent");
    assert!(
        rows <= 50 * limit as u64,
        "a strong top {limit} read {rows} rows from the masters"
    );
    proxy.stop().await.expect("clean stop");
}
