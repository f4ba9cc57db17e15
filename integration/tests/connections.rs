//! Client connections against a real proxy: a slowloris client is cut after
//! the header read timeout while an idle keep-alive connection is not, idle
//! connections are closed after the idle timeout, oversized headers get 431
//! without disturbing other clients, and connections over the listener's
//! limit are refused with 503 until earlier ones close.
//!
//! The clients speak HTTP/1.1 over raw sockets: these tests are about what
//! happens on the wire, which an HTTP client library would hide or retry.

use std::time::{Duration, Instant};

use tally_harness::{Cluster, ClusterSpec};
use tally_integration::{Client, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
async fn read_answer(stream: &mut TcpStream) -> Option<Answer> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match tokio::time::timeout(PROMPTLY, stream.read(&mut chunk)).await {
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
        match tokio::time::timeout(PROMPTLY, stream.read(&mut chunk)).await {
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
async fn closed_within(stream: &mut TcpStream) -> Option<Duration> {
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
