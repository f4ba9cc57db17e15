//! The ingest contract at the HTTP boundary against real MariaDB: every
//! kind of bad input gets its documented status and code and changes
//! nothing; acknowledgements mean what they say; reads see what was written.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tally_harness::{Cluster, ClusterSpec};
use tally_integration::{Client, TEST_TOKEN, TestProxy, eventually, stored};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

struct Case {
    name: &'static str,
    path: String,
    content_type: &'static str,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    index: Option<u64>,
}

fn case(
    name: &'static str,
    body: impl Into<Vec<u8>>,
    status: u16,
    code: &'static str,
    index: Option<u64>,
) -> Case {
    Case {
        name,
        path: "/v1/events".into(),
        content_type: "application/json",
        body: body.into(),
        status,
        code,
        index,
    }
}

fn bad_cases() -> Vec<Case> {
    let ok = r#"{"ns":"bad","key":"valid","delta":1}"#;
    let arr = |bad: &str| format!("[{ok},{bad}]");
    let many: String = format!(
        "[{}]",
        (0..10_001).map(|_| ok).collect::<Vec<_>>().join(",")
    );
    let mut huge = Vec::with_capacity(9 << 20);
    huge.extend_from_slice(b"[");
    while huge.len() < 9 << 20 {
        huge.extend_from_slice(ok.as_bytes());
        huge.push(b',');
    }
    huge.extend_from_slice(ok.as_bytes());
    huge.push(b']');
    let mut invalid_utf8 = br#"[{"ns":"bad","key":"x"#.to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe]);
    invalid_utf8.extend_from_slice(br#""}]"#);
    let t = now();
    vec![
        case(
            "malformed JSON",
            format!("[{ok},{{\"ns\":"),
            400,
            "invalid_json",
            None,
        ),
        case("not an object", "\"views\"", 400, "invalid_json", None),
        case(
            "wrong type for delta",
            arr(r#"{"ns":"bad","key":"a","delta":"5"}"#),
            400,
            "invalid_event",
            Some(1),
        ),
        case(
            "float delta",
            arr(r#"{"ns":"bad","key":"a","delta":1.5}"#),
            400,
            "invalid_event",
            Some(1),
        ),
        case(
            "wrong type for key",
            arr(r#"{"ns":"bad","key":7}"#),
            400,
            "invalid_event",
            Some(1),
        ),
        case(
            "unknown field (typo)",
            arr(r#"{"ns":"bad","key":"a","detla":5}"#),
            400,
            "invalid_event",
            Some(1),
        ),
        case(
            "missing key",
            arr(r#"{"ns":"bad"}"#),
            400,
            "invalid_event",
            Some(1),
        ),
        case("invalid UTF-8", invalid_utf8, 400, "invalid_json", None),
        case(
            "empty key",
            arr(r#"{"ns":"bad","key":""}"#),
            400,
            "invalid_event",
            Some(1),
        ),
        case(
            "257-byte key",
            arr(&format!(r#"{{"ns":"bad","key":"{}"}}"#, "k".repeat(257))),
            400,
            "invalid_event",
            Some(1),
        ),
        case(
            "control character in key",
            arr(r#"{"ns":"bad","key":"a\nb"}"#),
            400,
            "invalid_event",
            Some(1),
        ),
        case(
            "bad ns",
            arr(r#"{"ns":"Bad-NS","key":"a"}"#),
            400,
            "invalid_event",
            Some(1),
        ),
        case(
            "delta too large",
            arr(r#"{"ns":"bad","key":"a","delta":1000000001}"#),
            400,
            "invalid_event",
            Some(1),
        ),
        case(
            "delta too small",
            arr(r#"{"ns":"bad","key":"a","delta":-1000000001}"#),
            400,
            "invalid_event",
            Some(1),
        ),
        case(
            "ts too old",
            arr(&format!(
                r#"{{"ns":"bad","key":"a","ts":{}}}"#,
                t - 8 * 86400
            )),
            400,
            "ts_out_of_range",
            Some(1),
        ),
        case(
            "ts too far ahead",
            arr(&format!(r#"{{"ns":"bad","key":"a","ts":{}}}"#, t + 3600)),
            400,
            "ts_out_of_range",
            Some(1),
        ),
        case(
            "ts not a time",
            arr(r#"{"ns":"bad","key":"a","ts":"tomorrow"}"#),
            400,
            "invalid_event",
            Some(1),
        ),
        case("empty array", "[]", 400, "invalid_event", None),
        case("10,001 events", many, 413, "payload_too_large", None),
        case("9 MiB body", huge, 413, "payload_too_large", None),
        Case {
            content_type: "text/plain",
            ..case(
                "wrong content type",
                ok,
                415,
                "unsupported_media_type",
                None,
            )
        },
        Case {
            content_type: "application/x-ndjson",
            ..case(
                "NDJSON with a bad third line",
                format!("{ok}\n{ok}\n{{\"ns\":\"bad\"}}\n"),
                400,
                "invalid_event",
                Some(2),
            )
        },
        Case {
            path: "/v1/counters/bad/valid/incr?delta=abc".into(),
            ..case(
                "incr with a non-integer delta",
                "",
                400,
                "invalid_param",
                None,
            )
        },
        Case {
            path: "/v1/counters/bad/valid/incr?dleta=5".into(),
            ..case(
                "incr with an unknown parameter",
                "",
                400,
                "invalid_param",
                None,
            )
        },
        Case {
            path: "/v1/counters/Bad/valid/incr".into(),
            ..case("incr with a bad ns", "", 400, "invalid_param", None)
        },
        Case {
            path: "/v1/events?ack=eventually".into(),
            ..case("unknown ack mode", ok, 400, "invalid_param", None)
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_documented_error_and_changes_nothing() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let proxy = TestProxy::start(&cluster, |_| {}).await;
    let client = Client::new();
    for c in bad_cases() {
        let (status, body) = client
            .post_body(&proxy.url(&c.path), c.content_type, c.body)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(status, c.status, "{}: {body}", c.name);
        assert_eq!(body["error"]["code"], c.code, "{}: {body}", c.name);
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}",
            c.name
        );
        assert_eq!(
            body["error"]["index"].as_u64(),
            c.index,
            "{}: {body}",
            c.name
        );
    }

    // A body streamed without Content-Length is cut off at the limit too.
    let chunks =
        futures::stream::iter((0..9).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1 << 20])));
    let resp = client
        .raw()
        .post(proxy.url("/v1/events"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("chunked post");
    assert_eq!(resp.status(), 413);

    // Hostile keys are data, stored verbatim; the tables survive.
    let hostile = [
        "'; DROP TABLE counter_total; --",
        "\" OR 1=1 --",
        "Robert'); DELETE FROM applied_batches;#",
    ];
    for key in hostile {
        let (status, body) = client
            .post_json(
                &proxy.url("/v1/events?ack=committed"),
                &json!({ "ns": "hostile", "key": key, "delta": 2 }),
            )
            .await
            .expect("post hostile");
        assert_eq!(status, 200, "{body}");
    }
    let (status, _) = client
        .admin_post(&proxy.admin_url("/admin/v1/flush"), TEST_TOKEN)
        .await
        .expect("flush");
    assert_eq!(status, 200);
    let master = &cluster.group(0).master;
    let rows = stored::rows(master, "counter_total", "hostile").await;
    for key in hostile {
        assert_eq!(
            rows.get(&(key.as_bytes().to_vec(), 0)).map(|r| r.0),
            Some(2),
            "{key}"
        );
    }
    // Nothing from any rejected request was applied, in any tier.
    for table in [
        "counter_minute",
        "counter_hour",
        "counter_day",
        "counter_total",
    ] {
        assert!(
            stored::rows(master, table, "bad").await.is_empty(),
            "{table} has rows from rejected requests"
        );
    }
    // The rejections are counted by reason.
    let (_, metrics) = client
        .get(&proxy.admin_url("/metrics"))
        .await
        .expect("metrics");
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    for reason in [
        "invalid_json",
        "invalid_event",
        "ts_out_of_range",
        "payload_too_large",
        "unsupported_media_type",
    ] {
        assert!(
            metrics.contains(&format!(
                "tally_events_rejected_total{{reason=\"{reason}\"}}"
            )),
            "no rejection metric for {reason}"
        );
    }
    proxy.stop().await.expect("clean stop");
}

/// `buffered` answers before the database has the events; `committed` only
/// after; `strong` reads add this proxy's pending deltas; `eventual` reads
/// come from the replica and catch up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_and_consistency_levels_mean_what_they_say() {
    let cluster = Cluster::start(ClusterSpec::default())
        .await
        .expect("cluster");
    // An hour-long interval: only explicit triggers flush.
    let proxy = TestProxy::start(&cluster, |c| {
        c.buffer.flush_interval = Duration::from_secs(3600)
    })
    .await;
    let client = Client::new();
    let master = &cluster.group(0).master;
    let url = |key: &str, consistency: &str| {
        proxy.url(&format!(
            "/v1/counters/acks/{key}?consistency={consistency}"
        ))
    };

    let (status, body) = client
        .post_json(
            &proxy.url("/v1/events"),
            &json!([{ "ns": "acks", "key": "v", "delta": 5 }]),
        )
        .await
        .expect("post");
    assert_eq!(
        (status, body),
        (200, json!({ "accepted": 1, "ack": "buffered" }))
    );
    assert!(
        stored::rows(master, "counter_total", "acks")
            .await
            .is_empty(),
        "buffered must not wait for MySQL"
    );

    let (status, body, headers) = client
        .get_with_headers(&url("v", "strong"))
        .await
        .expect("strong read");
    assert_eq!(status, 200);
    assert_eq!(body, json!({ "ns": "acks", "key": "v", "total": 5 }));
    assert_eq!(headers["x-tally-node"], "master");
    let (_, body, headers) = client
        .get_with_headers(&url("v", "eventual"))
        .await
        .expect("eventual read");
    assert_eq!(body["total"], 0, "nothing flushed yet");
    assert_eq!(headers["x-tally-node"], "replica");

    let (status, body) = client
        .post_body(
            &proxy.url("/v1/counters/acks/v/incr?delta=-2&ack=committed"),
            "application/json",
            Vec::new(),
        )
        .await
        .expect("incr committed");
    assert_eq!(
        (status, body),
        (200, json!({ "accepted": 1, "ack": "committed" }))
    );
    // Committed means on the master now, including the earlier buffered delta.
    let rows = stored::rows(master, "counter_total", "acks").await;
    assert_eq!(rows.get(&(b"v".to_vec(), 0)).map(|r| r.0), Some(3));
    let (_, body) = client.get(&url("v", "strong")).await.expect("strong read");
    assert_eq!(
        body["total"], 3,
        "strong must not count a committed batch twice"
    );

    eventually(Duration::from_secs(10), "replica catches up", || async {
        let (_, body) = client.get(&url("v", "eventual")).await.ok()?;
        (body["total"] == 3).then_some(())
    })
    .await;

    // Unknown counters read 0; percent-encoded keys round-trip.
    let (status, body) = client
        .get(&url("never%2Fseen%20key", "eventual"))
        .await
        .expect("read");
    assert_eq!(
        (status, body),
        (
            200,
            json!({ "ns": "acks", "key": "never/seen key", "total": 0 })
        )
    );
    proxy.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_need_the_bearer_token() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let proxy = TestProxy::start(&cluster, |_| {}).await;
    let client = Client::new();
    for token in ["", "wrong", "test-token-but-longer"] {
        let (status, body) = client
            .admin_post(&proxy.admin_url("/admin/v1/flush"), token)
            .await
            .expect("flush");
        assert_eq!(status, 401, "token {token:?}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let (status, body) = client
        .admin_get(&proxy.admin_url("/admin/v1/topology"), TEST_TOKEN)
        .await
        .expect("topology");
    assert_eq!(status, 200);
    assert_eq!(body["version"], 1);
    assert_eq!(body["groups"][0]["name"], "g0");
    let (status, body) = client
        .admin_get(
            &proxy.admin_url("/admin/v1/route?ns=views&key=abc"),
            TEST_TOKEN,
        )
        .await
        .expect("route");
    assert_eq!(
        (status, body),
        (200, json!({ "group": "g0", "version": 1 }))
    );
    // /metrics is open.
    let (status, body) = client
        .get(&proxy.admin_url("/metrics"))
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    assert!(matches!(body, Value::String(ref s) if s.contains("tally_build_info")));
    proxy.stop().await.expect("clean stop");
}

/// Single-event ingest and a counter's total have a shortcut past the
/// router for plain paths (`api::counter_shortcut`); a path with percent
/// escapes takes the router. Both must give the same answers, count into
/// (and read) the same counter and be measured under the same route label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_event_ingest_and_totals_answer_the_same_with_or_without_the_router() {
    let cluster = Cluster::start(ClusterSpec::default())
        .await
        .expect("cluster");
    // Default settings: the checks read strong, which counts what is
    // pending as well as what was flushed.
    let proxy = TestProxy::start(&cluster, |_| {}).await;
    let client = Client::new();
    let post = |path: String| {
        let (client, url) = (&client, proxy.url(&path));
        async move {
            client
                .post_body(&url, "application/json", Vec::new())
                .await
                .expect("post")
        }
    };
    let route_count = |route: &'static str, status: &'static str| {
        let (client, url) = (&client, proxy.admin_url("/metrics"));
        async move {
            let text = client.raw().get(&url).send().await.expect("metrics");
            let text = text.text().await.expect("metrics body");
            let series = format!(
                "tally_http_request_duration_seconds_count{{route=\"{route}\",status=\"{status}\"}} "
            );
            text.lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .map_or(0, |v| v.trim().parse::<u64>().expect("a count"))
        }
    };
    const INCR: &str = "/v1/counters/{ns}/{key}/incr";
    const TOTAL: &str = "/v1/counters/{ns}/{key}";
    let incr_count = |status| route_count(INCR, status);
    let (ok_before, bad_before) = (incr_count("2xx").await, incr_count("4xx").await);
    let (total_ok_before, total_bad_before) = (
        route_count(TOTAL, "2xx").await,
        route_count(TOTAL, "4xx").await,
    );

    // (plain path: the shortcut, escaped path: the router) for the same request.
    let pairs = [
        ("same/k1/incr?delta=2", "same/k%31/incr?delta=3"),
        ("Bad/k1/incr", "B%61d/k1/incr"),
        ("same/k1/incr?delta=x", "same/k%31/incr?delta=x"),
        ("same/k1/incr?dleta=1", "same/k%31/incr?dleta=1"),
        ("same/k1/incr?ts=yesterday", "same/k%31/incr?ts=yesterday"),
    ];
    for (plain, escaped) in pairs {
        let (a, b) = (
            post(format!("/v1/counters/{plain}")).await,
            post(format!("/v1/counters/{escaped}")).await,
        );
        assert_eq!(a, b, "{plain} vs {escaped}");
    }
    let (status, body) = post("/v1/counters/same/k1/incr".into()).await;
    assert_eq!(
        (status, body),
        (200, json!({ "accepted": 1, "ack": "buffered" }))
    );
    let (_, body) = client
        .get(&proxy.url("/v1/counters/same/k1?consistency=strong"))
        .await
        .expect("read");
    assert_eq!(body["total"], 6, "2 + 3 + 1 from both paths: {body}");

    // Other methods and shapes are the router's: 405 and 404.
    let r = client
        .raw()
        .put(proxy.url("/v1/counters/same/k1/incr"))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status().as_u16(), 405);
    let (status, _) = post("/v1/counters/same/k1/extra/incr".into()).await;
    assert_eq!(status, 404);

    // The shortcut echoes request ids and is measured like the router.
    for (method, path, id) in [
        (Method::POST, "/v1/counters/same/k2/incr", "shortcut-1"),
        (Method::GET, "/v1/counters/same/k1", "shortcut-2"),
    ] {
        let r = client
            .raw()
            .request(method, proxy.url(path))
            .header("x-request-id", id)
            .send()
            .await
            .expect("request with id");
        assert_eq!(r.status().as_u16(), 200, "{path}");
        assert_eq!(r.headers()["x-request-id"], id);
    }
    assert!(
        incr_count("2xx").await >= ok_before + 4,
        "both paths are measured under the route's label"
    );
    assert!(incr_count("4xx").await >= bad_before + 8);

    // The same for a counter's total: status, body and the node that
    // answered, through the shortcut and through the router.
    let get = |path: String| {
        let (client, url) = (&client, proxy.url(&path));
        async move {
            let r = client.raw().get(&url).send().await.expect("get");
            let status = r.status().as_u16();
            let node = r
                .headers()
                .get("x-tally-node")
                .map(|v| v.to_str().expect("ascii").to_owned());
            let body: serde_json::Value = r.json().await.expect("a JSON answer");
            (status, node, body)
        }
    };
    let pairs = [
        ("same/k1?consistency=strong", "same/k%31?consistency=strong"),
        ("same/k1", "same/k%31"),
        ("same/unknown", "same/unkn%6Fwn"),
        ("Bad/k1", "B%61d/k1"),
        ("same/k1?consistency=x", "same/k%31?consistency=x"),
        ("same/k1?consistensy=strong", "same/k%31?consistensy=strong"),
    ];
    for (plain, escaped) in pairs {
        let (a, b) = (
            get(format!("/v1/counters/{plain}")).await,
            get(format!("/v1/counters/{escaped}")).await,
        );
        assert_eq!(a, b, "{plain} vs {escaped}");
    }
    let (status, node, body) = get("/v1/counters/same/k1?consistency=strong".into()).await;
    assert_eq!(
        (status, node.as_deref(), body),
        (
            200,
            Some("master"),
            json!({ "ns": "same", "key": "k1", "total": 6 })
        )
    );
    let (status, _, body) = get("/v1/counters/Bad/k1".into()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_param"))
    );
    // A GET of the ingest route and a POST of a total are the router's 405s.
    let r = client
        .raw()
        .get(proxy.url("/v1/counters/same/k1/incr"))
        .send()
        .await
        .expect("get of incr");
    assert_eq!(r.status().as_u16(), 405);
    let (status, _) = post("/v1/counters/same/k1".into()).await;
    assert_eq!(status, 405);
    assert!(
        route_count(TOTAL, "2xx").await >= total_ok_before + 8,
        "both paths of a total are measured under the route's label"
    );
    assert!(route_count(TOTAL, "4xx").await >= total_bad_before + 6);
    proxy.stop().await.expect("clean stop");
}
