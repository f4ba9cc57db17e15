//! Client connections against a real proxy: a slowloris client is cut after
//! the header read timeout while an idle keep-alive connection is not, idle
//! connections are closed after the idle timeout, oversized headers get 431
//! without disturbing other clients, and connections over the listener's
//! limit are refused with 503 until earlier ones close. Request bodies
//! (issue #20 item 1): a body trickled below the minimum rate or past the
//! body deadline is answered 408 and its connection closed, so trickling
//! clients cannot keep a well-behaved one out; the bytes of bodies a
//! listener holds are bounded (503 beyond); a stop cuts requests still in
//! progress at the drain deadline and flushes what was acknowledged.
//!
//! The clients speak HTTP/1.1 over raw sockets: these tests are about what
//! happens on the wire, which an HTTP client library would hide or retry.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tally_harness::{Cluster, ClusterSpec};
use tally_integration::{Client, TestProxy, eventually, stored};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

async fn cluster() -> &'static Cluster {
    Cluster::shared(ClusterSpec {
        groups: 1,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("shared cluster")
}

/// Generous upper bound for anything the proxy should do "promptly" on a
/// busy 2-core machine.
const PROMPTLY: Duration = Duration::from_secs(15);

/// A raw HTTP/1.1 response: status, lower-cased headers, body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response (head plus `content-length` body). `None` when the
/// connection was closed or reset before a whole response arrived.
async fn read_answer(stream: &mut (impl AsyncRead + Unpin)) -> Option<Answer> {
    read_answer_waiting(stream, PROMPTLY).await
}

/// [`read_answer`], waiting up to `patience` for each read (`None` after
/// that).
async fn read_answer_waiting(
    stream: &mut (impl AsyncRead + Unpin),
    patience: Duration,
) -> Option<Answer> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match tokio::time::timeout(patience, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        match tokio::time::timeout(patience, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => body.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
    Some(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Sends `GET path` on a kept-alive connection and reads the answer.
async fn get(stream: &mut TcpStream, path: &str) -> Option<Answer> {
    let request = format!("GET {path} HTTP/1.1\r\nhost: tally\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    read_answer(stream).await
}

/// Waits until the peer closes `stream` (EOF or reset); returns how long
/// that took, or `None` if it stayed open for `PROMPTLY`.
async fn closed_within(stream: &mut (impl AsyncRead + Unpin)) -> Option<Duration> {
    let started = Instant::now();
    let mut sink = [0u8; 1024];
    loop {
        match tokio::time::timeout(PROMPTLY, stream.read(&mut sink)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// A slowloris client (one header byte per 200 ms) is disconnected once
/// `header_read_timeout` has passed, without an answer; a keep-alive
/// connection left idle for longer than that same timeout still works
/// (the idle timeout governs it), and is closed after the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_idle_connections_live_until_the_idle_timeout() {
    let cluster = cluster().await;
    let header = Duration::from_secs(1);
    let idle = Duration::from_secs(4);
    let proxy = TestProxy::start(cluster, |c| {
        c.connections.header_read_timeout = header;
        c.connections.idle_timeout = idle;
    })
    .await;

    // Slowloris: a request line, then a header trickled byte by byte.
    let (mut read, mut write) = TcpStream::connect(proxy.http)
        .await
        .expect("connect")
        .into_split();
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => return (started.elapsed(), got),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    });
    write
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: tally\r\nx-slow: ")
        .await
        .expect("request line");
    let mut trickled = 0;
    while !reader.is_finished() && started.elapsed() < PROMPTLY {
        if write.write_all(b"a").await.is_err() {
            break;
        }
        trickled += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (cut_after, answer) = tokio::time::timeout(PROMPTLY, reader)
        .await
        .expect("the proxy must close a slowloris connection")
        .expect("reader");
    assert!(
        cut_after >= header - Duration::from_millis(50),
        "cut after {cut_after:?}, before the header timeout {header:?}"
    );
    assert!(cut_after < PROMPTLY, "not cut within {PROMPTLY:?}");
    assert!(trickled >= 3, "the client kept sending ({trickled} bytes)");
    assert!(
        answer.is_empty(),
        "an incomplete request gets no answer: {:?}",
        String::from_utf8_lossy(&answer)
    );

    // A well-behaved keep-alive client: idle longer than the header
    // timeout between requests, still served on the same connection.
    let mut conn = TcpStream::connect(proxy.http).await.expect("connect");
    assert_eq!(
        get(&mut conn, "/healthz").await.map(|a| a.status),
        Some(200)
    );
    tokio::time::sleep(header * 2).await;
    assert_eq!(
        get(&mut conn, "/healthz").await.map(|a| a.status),
        Some(200),
        "an idle keep-alive connection must outlive the header read timeout"
    );
    // Left alone, it is closed by the idle timeout.
    let closed = closed_within(&mut conn)
        .await
        .expect("an idle connection must be closed after the idle timeout");
    assert!(
        closed >= idle - Duration::from_millis(50),
        "closed after {closed:?}, before the idle timeout {idle:?}"
    );

    // The listener is unaffected.
    let (status, _) = Client::new()
        .get(&proxy.url("/healthz"))
        .await
        .expect("healthz");
    assert_eq!(status, 200);
    let metrics = Client::new()
        .get(&proxy.admin_url("/metrics"))
        .await
        .expect("metrics")
        .1;
    let metrics = metrics.as_str().unwrap_or_default();
    for reason in ["header_read", "idle"] {
        assert!(
            metrics.lines().any(|l| l.starts_with(&format!(
                "tally_connections_timed_out_total{{listener=\"http\",reason=\"{reason}\"}}"
            ))),
            "no {reason} timeout counted:\n{metrics}"
        );
    }
    proxy.stop().await.expect("clean stop");
}

/// A request head of 64 KiB (limit 16 KiB) gets 431 or a closed
/// connection, never a normal answer; meanwhile and afterwards other
/// clients are served, including one with a large but allowed header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused_and_others_still_served() {
    let cluster = cluster().await;
    let proxy = TestProxy::start(cluster, |c| {
        c.connections.max_header_bytes = 16 * 1024;
    })
    .await;
    let mut bystander = TcpStream::connect(proxy.http).await.expect("connect");
    assert_eq!(
        get(&mut bystander, "/healthz").await.map(|a| a.status),
        Some(200)
    );

    let mut big = TcpStream::connect(proxy.http).await.expect("connect");
    let request = format!(
        "GET /healthz HTTP/1.1\r\nhost: tally\r\nx-big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    // The proxy may answer and close before it read everything; a failed
    // write is one of the allowed outcomes.
    let sent = big.write_all(request.as_bytes()).await;
    match read_answer(&mut big).await {
        Some(answer) => assert_eq!(answer.status, 431, "{answer:?}"),
        None => assert!(
            sent.is_err() || closed_within(&mut big).await.is_some(),
            "neither answered nor closed"
        ),
    }

    assert_eq!(
        get(&mut bystander, "/healthz").await.map(|a| a.status),
        Some(200),
        "a kept-alive bystander is still served"
    );
    let mut allowed = TcpStream::connect(proxy.http).await.expect("connect");
    let request = format!(
        "GET /healthz HTTP/1.1\r\nhost: tally\r\nx-big: {}\r\n\r\n",
        "a".repeat(8 * 1024)
    );
    allowed
        .write_all(request.as_bytes())
        .await
        .expect("write 8 KiB header");
    assert_eq!(
        read_answer(&mut allowed).await.map(|a| a.status),
        Some(200),
        "an 8 KiB header is within the limit"
    );
    proxy.stop().await.expect("clean stop");
}

/// With a limit of 4 connections, a 5th is answered 503 `overloaded` with
/// `Retry-After` and closed, while the 4 keep working and the admin
/// listener (its own limit) is unaffected; once 2 close, new connections
/// are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused_until_others_close() {
    let cluster = cluster().await;
    let limit = 4;
    let proxy = TestProxy::start(cluster, |c| {
        c.connections.max_per_listener = limit;
    })
    .await;

    // Fill the slots. The readiness probe's connection may still be
    // closing, so a slot is retried until it is ours.
    let mut held = Vec::new();
    for i in 0..limit {
        let deadline = Instant::now() + PROMPTLY;
        loop {
            let mut conn = TcpStream::connect(proxy.http).await.expect("connect");
            match get(&mut conn, "/healthz").await.map(|a| a.status) {
                Some(200) => {
                    held.push(conn);
                    break;
                }
                other => assert!(
                    Instant::now() < deadline,
                    "connection {i} never served: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // One over the limit: refused at once with the contract's 503.
    let started = Instant::now();
    let mut extra = TcpStream::connect(proxy.http).await.expect("connect");
    let answer = get(&mut extra, "/healthz")
        .await
        .expect("a refused connection is answered before it is closed");
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.header("retry-after"), Some("1"), "{answer:?}");
    assert_eq!(answer.header("connection"), Some("close"), "{answer:?}");
    let body: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON body");
    assert_eq!(body["error"]["code"], "overloaded");
    assert!(
        closed_within(&mut extra).await.is_some(),
        "a refused connection is closed"
    );
    assert!(started.elapsed() < PROMPTLY, "refused promptly");

    // The admitted connections still work, and so does the admin listener.
    for conn in &mut held {
        assert_eq!(get(conn, "/healthz").await.map(|a| a.status), Some(200));
    }
    let metrics = Client::new()
        .get(&proxy.admin_url("/metrics"))
        .await
        .expect("admin listener is not limited by the data listener")
        .1;
    let metrics = metrics.as_str().unwrap_or_default();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("tally_connections_refused_total{listener=\"http\"}")
            && !l.ends_with(" 0")),
        "refusal not counted:\n{metrics}"
    );

    // Two close; their slots are reused.
    held.truncate(limit - 2);
    let deadline = Instant::now() + PROMPTLY;
    let mut admitted = 0;
    while admitted < 2 {
        let mut conn = TcpStream::connect(proxy.http).await.expect("connect");
        match get(&mut conn, "/healthz").await.map(|a| a.status) {
            Some(200) => {
                admitted += 1;
                held.push(conn);
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "freed slots not reused: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // Full again: the next one is refused.
    let mut extra = TcpStream::connect(proxy.http).await.expect("connect");
    assert_eq!(
        get(&mut extra, "/healthz").await.map(|a| a.status),
        Some(503)
    );
    drop(held);
    proxy.stop().await.expect("clean stop");
}

/// Sends `POST path` with a JSON `body` on a kept-alive connection and
/// reads the answer.
async fn post(stream: &mut TcpStream, path: &str, body: &str) -> Option<Answer> {
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: tally\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    read_answer(stream).await
}

/// A connection the proxy admitted (a `GET /healthz` on it was answered
/// 200): while the listener is full, new connections are refused, and the
/// readiness probe's connection may still hold a slot for a moment.
async fn admitted(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + PROMPTLY;
    loop {
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        match get(&mut conn, "/healthz").await.map(|a| a.status) {
            Some(200) => return conn,
            other => assert!(Instant::now() < deadline, "never admitted: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a trickling client saw: the answer (if any), how long after its
/// head the connection ended, and how many body bytes it sent.
struct Trickled {
    answer: Option<Answer>,
    ended_after: Duration,
    sent: usize,
}

/// The attack of issue #20 on an admitted connection: the head of
/// `POST /v1/events` declaring `Content-Length: 4000000` (with `Expect:
/// 100-continue`, so the proxy's `100 Continue` shows that its handler is
/// reading the body), then `step` body bytes every `every`, for up to
/// `for_at_most` or until the proxy answers or closes.
async fn trickle(
    mut conn: TcpStream,
    step: usize,
    every: Duration,
    for_at_most: Duration,
) -> JoinHandle<Trickled> {
    conn.write_all(
        b"POST /v1/events HTTP/1.1\r\nhost: tally\r\ncontent-type: application/json\r\ncontent-length: 4000000\r\nexpect: 100-continue\r\n\r\n",
    )
    .await
    .expect("head");
    let started = Instant::now();
    let interim = read_answer(&mut conn).await.map(|a| a.status);
    assert_eq!(interim, Some(100), "the handler reads the body");
    tokio::spawn(async move {
        let (mut read, mut write) = conn.into_split();
        let reader = tokio::spawn(async move {
            let answer =
                tokio::time::timeout(for_at_most, read_answer_waiting(&mut read, for_at_most))
                    .await
                    .ok()
                    .flatten();
            if answer.is_some() {
                // After an answer the proxy must close the connection.
                let _ = tokio::time::timeout(for_at_most, closed_within(&mut read)).await;
            }
            (answer, started.elapsed())
        });
        let mut padding = vec![b' '; step];
        padding[0] = b'[';
        let mut sent = 0;
        while !reader.is_finished() && started.elapsed() < for_at_most {
            if write.write_all(&padding).await.is_err() {
                break;
            }
            padding[0] = b' ';
            sent += step;
            tokio::time::sleep(every).await;
        }
        let (answer, ended_after) = reader.await.expect("reader");
        Trickled {
            answer,
            ended_after,
            sent,
        }
    })
}

/// `listener="http"` samples of a metric, summed over their other labels
/// matching `extra` (e.g. `reason="body"`), from the admin listener.
async fn metric(proxy: &TestProxy, name: &str, extra: &str) -> Option<f64> {
    let (_, text) = Client::new().get(&proxy.admin_url("/metrics")).await.ok()?;
    let text = text.as_str()?.to_owned();
    let samples: Vec<f64> = text
        .lines()
        .filter(|l| {
            l.starts_with(&format!("{name}{{"))
                && l.contains("listener=\"http\"")
                && l.contains(extra)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

/// The attack of issue #20, scaled down: a listener of 4 connections, all
/// held by clients that sent the head of a 4 MB `POST /v1/events`. Three
/// trickle one byte per 500 ms: after the rate grace (1 s) they are below
/// `min_body_rate` and are answered 408 `body_timeout` and closed. The
/// fourth sends fast enough (8 KiB/s) but would take minutes: it is
/// answered 408 at `body_read_timeout` (6 s). Meanwhile a well-behaved
/// client, refused while the slots are full, is served as soon as the
/// slow ones are cut, long before the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_bodies_get_408_and_free_their_slots_for_well_behaved_clients() {
    let cluster = cluster().await;
    let limit = 4;
    let grace = Duration::from_secs(1);
    let deadline = Duration::from_secs(6);
    let proxy = TestProxy::start(cluster, |c| {
        c.connections.max_per_listener = limit;
        c.connections.body_read_timeout = deadline;
        c.connections.min_body_rate = 1024;
        c.connections.body_rate_grace = grace;
    })
    .await;
    let long = Duration::from_secs(60);

    let mut slow = Vec::new();
    for _ in 0..limit - 1 {
        let conn = admitted(proxy.http).await;
        slow.push(trickle(conn, 1, Duration::from_millis(500), long).await);
    }
    let steady = trickle(
        admitted(proxy.http).await,
        2048,
        Duration::from_millis(250),
        long,
    )
    .await;

    // Every slot is held now: a well-behaved client is refused until a
    // trickling one is cut, then served.
    let started = Instant::now();
    let mut refused = 0;
    let served_after = loop {
        let mut conn = TcpStream::connect(proxy.http).await.expect("connect");
        let answer = post(&mut conn, "/v1/events", r#"{"ns":"slowbody","key":"k"}"#).await;
        match answer.as_ref().map(|a| a.status) {
            Some(200) => break started.elapsed(),
            Some(503) => refused += 1,
            _ => {}
        }
        assert!(
            started.elapsed() < PROMPTLY,
            "a well-behaved client was not served within {PROMPTLY:?} while 4 clients trickled their bodies (refused {refused} times; last answer {answer:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        served_after < deadline,
        "served after {served_after:?}: the trickling clients should have been cut by the rate (grace {grace:?}), before the {deadline:?} deadline"
    );

    for client in slow {
        let t = client.await.expect("trickling client");
        let answer = t.answer.unwrap_or_else(|| {
            panic!(
                "a trickling client got no answer ({} bytes in {:?})",
                t.sent, t.ended_after
            )
        });
        assert_eq!(answer.status, 408, "{answer:?}");
        assert_eq!(answer.header("connection"), Some("close"), "{answer:?}");
        let body: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON body");
        assert_eq!(body["error"]["code"], "body_timeout", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("bytes/s"), "cut by the rate: {message}");
        assert!(
            t.ended_after >= grace - Duration::from_millis(50) && t.ended_after < deadline,
            "cut after {:?}: the rate applies after the grace {grace:?} and before the deadline",
            t.ended_after
        );
    }
    let t = steady.await.expect("steady client");
    let answer = t
        .answer
        .expect("the steady client is answered at the deadline");
    assert_eq!(answer.status, 408, "{answer:?}");
    let body: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON body");
    assert_eq!(body["error"]["code"], "body_timeout", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("within 6s"),
        "cut by the deadline: {message}"
    );
    assert!(
        t.ended_after >= deadline - Duration::from_millis(50),
        "cut after {:?}, before the body deadline {deadline:?}",
        t.ended_after
    );
    assert!(
        t.sent >= 8 * 2048,
        "it kept sending above the rate ({} bytes)",
        t.sent
    );

    let timed_out = metric(
        &proxy,
        "tally_connections_timed_out_total",
        "reason=\"body\"",
    )
    .await
    .unwrap_or(0.0);
    assert!(timed_out >= 4.0, "body timeouts counted: {timed_out}");
    proxy.stop().await.expect("clean stop");
}

/// A stop while clients trickle bodies that would take minutes (no rate
/// bound here, a 10-minute body deadline): the data listener waits for
/// them only until `shutdown.drain_deadline` (2 s), cuts them without an
/// answer, and the final flush commits what was acknowledged before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_cuts_requests_in_progress_at_the_drain_deadline_and_flushes_acknowledged_writes() {
    let cluster = cluster().await;
    let drain = Duration::from_secs(2);
    let proxy = TestProxy::start(cluster, |c| {
        c.shutdown.drain_deadline = drain;
        c.connections.body_read_timeout = Duration::from_secs(600);
        c.connections.min_body_rate = 0;
        // Nothing is flushed before the stop: the final flush must do it.
        c.buffer.flush_interval = Duration::from_secs(3600);
    })
    .await;
    let (status, body) = Client::new()
        .post_json(
            &proxy.url("/v1/events"),
            &serde_json::json!([
                {"ns": "drainstop", "key": "a", "delta": 2},
                {"ns": "drainstop", "key": "b"},
                {"ns": "drainstop", "key": "a", "delta": 5},
            ]),
        )
        .await
        .expect("write");
    assert_eq!(
        (status, &body["accepted"]),
        (200, &serde_json::json!(3)),
        "{body}"
    );

    let long = Duration::from_secs(60);
    let mut trickling = Vec::new();
    for _ in 0..2 {
        let conn = admitted(proxy.http).await;
        trickling.push(trickle(conn, 1, Duration::from_millis(300), long).await);
    }

    let started = Instant::now();
    let stopped = tokio::time::timeout(drain + PROMPTLY, proxy.stop()).await;
    let took = started.elapsed();
    match stopped {
        Ok(result) => result.expect("clean stop"),
        Err(_) => panic!(
            "the stop did not finish within {:?} while 2 clients trickled their bodies (drain deadline {drain:?})",
            drain + PROMPTLY
        ),
    }
    assert!(
        took >= drain - Duration::from_millis(50),
        "stopped after {took:?}: the requests in progress had until the drain deadline {drain:?}"
    );
    for client in trickling {
        let t = client.await.expect("trickling client");
        assert!(
            t.answer.is_none(),
            "a request cut at the drain deadline gets no answer: {:?}",
            t.answer
        );
        assert!(
            t.ended_after < long,
            "its connection was closed ({:?})",
            t.ended_after
        );
    }
    let totals: Vec<(Vec<u8>, i64)> =
        stored::rows(&cluster.group(0).master, "counter_total", "drainstop")
            .await
            .into_iter()
            .map(|((key, _), (count, _))| (key, count))
            .collect();
    assert_eq!(
        totals,
        [(b"a".to_vec(), 7), (b"b".to_vec(), 1)],
        "acknowledged writes are flushed by the stop"
    );
}

/// The bytes of request bodies a listener holds are bounded: with
/// `max_body_bytes_in_flight` = 100,000, a body of 40,000 bytes arriving
/// while another request holds 70,000 is answered 503 `overloaded` with
/// `Retry-After` (and its connection closed); once the first is answered,
/// the budget is free again and the same body is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_listener_budget_get_503_until_earlier_ones_are_answered() {
    let cluster = cluster().await;
    let budget = 100_000;
    let proxy = TestProxy::start(cluster, |c| {
        c.limits.max_body_bytes = budget;
        c.connections.max_body_bytes_in_flight = budget;
    })
    .await;
    // Valid bodies padded with JSON whitespace to the sizes wanted.
    let padded = |key: &str, len: usize| {
        let event = format!(r#"[{{"ns":"budget","key":"{key}"}}"#);
        format!("{event}{}]", " ".repeat(len - event.len() - 1))
    };
    let first = padded("first", 80_000);
    let second = padded("second", 40_000);

    let mut holder = admitted(proxy.http).await;
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: tally\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        first.len()
    );
    holder.write_all(head.as_bytes()).await.expect("head");
    holder
        .write_all(&first.as_bytes()[..70_000])
        .await
        .expect("most of the body");
    eventually(PROMPTLY, "the proxy to hold 70,000 body bytes", || async {
        let held = metric(&proxy, "tally_request_body_bytes", "").await?;
        (held >= 70_000.0).then_some(())
    })
    .await;

    let mut late = admitted(proxy.http).await;
    let answer = post(&mut late, "/v1/events", &second)
        .await
        .expect("a body over the budget is answered");
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.header("retry-after"), Some("1"), "{answer:?}");
    let body: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON body");
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    assert!(
        closed_within(&mut late).await.is_some(),
        "a refused body's connection is closed"
    );

    holder
        .write_all(&first.as_bytes()[70_000..])
        .await
        .expect("the rest of the body");
    let answer = read_answer(&mut holder).await.expect("answer");
    assert_eq!(answer.status, 200, "{answer:?}");

    let mut again = admitted(proxy.http).await;
    let answer = post(&mut again, "/v1/events", &second)
        .await
        .expect("answer");
    assert_eq!(answer.status, 200, "the budget is free again: {answer:?}");
    eventually(PROMPTLY, "the held body bytes to return to 0", || async {
        let held = metric(&proxy, "tally_request_body_bytes", "").await?;
        (held == 0.0).then_some(())
    })
    .await;
    let refused = metric(&proxy, "tally_request_bodies_refused_total", "")
        .await
        .unwrap_or(0.0);
    assert_eq!(refused, 1.0, "the refusal is counted");
    proxy.stop().await.expect("clean stop");
}
