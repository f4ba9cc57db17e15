//! The fault relay: every mode against a plain echo server (fast, no
//! MariaDB), and the ambiguous-commit scenario against a real master.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tally_harness::mysql_async::prelude::Queryable;
use tally_harness::mysql_async::{self, Conn, Opts};
use tally_harness::{Cluster, ClusterSpec, Fault, FaultRelay};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DEADLINE: Duration = Duration::from_secs(10);

/// An echo server that also reports how many bytes it received per
/// connection once the connection closes.
async fn echo_server() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut total = 0;
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    total += n;
                }
                let _ = tx.send(total);
            });
        }
    });
    (addr, rx)
}

async fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    stream.write_all(msg).await.expect("write");
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("read echo");
    got
}

/// Reads until EOF or error; true if the connection was closed in time.
async fn closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

#[tokio::test]
async fn relay_modes_against_an_echo_server() {
    let (echo, mut received) = echo_server().await;
    let relay = FaultRelay::start(echo).await.expect("relay starts");
    assert_eq!(relay.upstream(), echo);

    // Pass, with many concurrent connections (a pool).
    let mut clients = Vec::new();
    for i in 0..50u32 {
        clients.push(tokio::spawn({
            let addr = relay.addr();
            async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                let msg = format!("hello {i}");
                assert_eq!(round_trip(&mut s, msg.as_bytes()).await, msg.as_bytes());
                s
            }
        }));
    }
    let mut open = Vec::new();
    for c in clients {
        open.push(c.await.expect("client task"));
    }
    assert_eq!(relay.stats().accepted, 50);
    assert_eq!(relay.stats().active, 50);

    // cut_all closes every open connection, and counts them.
    relay.cut_all();
    for s in &mut open {
        assert!(closed(s).await, "cut_all left a connection open");
    }
    assert_eq!(relay.stats().cuts, 50);
    for _ in 0..50 {
        received.recv().await.expect("echo saw the close");
    }
    let started = Instant::now();
    while relay.stats().active != 0 {
        assert!(started.elapsed() < DEADLINE, "{:?}", relay.stats());
        tokio::task::yield_now().await;
    }

    // Delay holds each chunk in each direction.
    relay.delay(Duration::from_millis(150));
    let mut s = TcpStream::connect(relay.addr()).await.expect("connect");
    let started = Instant::now();
    assert_eq!(round_trip(&mut s, b"slow").await, b"slow");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    relay.pass();
    let started = Instant::now();
    assert_eq!(round_trip(&mut s, b"fast").await, b"fast");
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
    drop(s);
    received.recv().await.expect("closed");

    // Byte budget: exactly 5 more bytes reach the server, then both close.
    let mut s = TcpStream::connect(relay.addr()).await.expect("connect");
    assert_eq!(round_trip(&mut s, b"abc").await, b"abc");
    relay.cut_after_bytes_upstream(5);
    s.write_all(b"0123456789").await.expect("write");
    let mut echoed = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut echoed)).await;
    assert_eq!(
        received.recv().await,
        Some(3 + 5),
        "server got more than the budget"
    );
    assert!(echoed.len() <= 5, "{echoed:?}");

    // Pattern: forwarded, reply swallowed, both sides closed.
    relay.cut_on_pattern(b"COMMIT".to_vec());
    let mut s = TcpStream::connect(relay.addr()).await.expect("connect");
    assert_eq!(round_trip(&mut s, b"BEGIN;").await, b"BEGIN;");
    // Split across two writes: the pattern spans reads.
    s.write_all(b"COM").await.expect("write");
    tokio::task::yield_now().await;
    s.write_all(b"MIT;trailing").await.expect("write");
    let mut echoed = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut echoed)).await;
    // "COM" went through (and was echoed) before the match was known; the
    // reply to the completed pattern is swallowed.
    assert!(
        echoed.is_empty() || echoed == b"COM",
        "reply was forwarded: {echoed:?}"
    );
    assert_eq!(
        received.recv().await,
        Some(6 + 6),
        "server saw BEGIN; and COMMIT only"
    );
    assert_eq!(relay.stats().pattern_cuts, 1);

    // Once: the first match is cut, then the relay passes again.
    relay.cut_on_pattern_once(b"X".to_vec());
    let mut a = TcpStream::connect(relay.addr()).await.expect("connect");
    a.write_all(b"X").await.expect("write");
    assert!(closed(&mut a).await);
    assert_eq!(relay.fault(), Fault::Pass);
    let mut b = TcpStream::connect(relay.addr()).await.expect("connect");
    assert_eq!(round_trip(&mut b, b"X").await, b"X");

    // Refuse: new connections close at once, open ones keep working.
    relay.refuse();
    let mut refused = TcpStream::connect(relay.addr()).await.expect("tcp connect");
    assert!(closed(&mut refused).await);
    assert_eq!(relay.stats().refused, 1);
    assert_eq!(round_trip(&mut b, b"still").await, b"still");

    // Dropping the relay closes what it relays.
    drop(relay);
    assert!(closed(&mut b).await);
}

/// "COMMIT sent, answer lost": the client sees a connection error although
/// the transaction is committed, which is exactly why tally's flushes carry
/// a dedup row.
#[tokio::test]
async fn cut_on_commit_leaves_an_ambiguous_but_committed_transaction() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster starts");
    let master = &cluster.group(0).master;
    master
        .exec("CREATE TABLE tally.relay_probe (id INT PRIMARY KEY)")
        .await
        .expect("create table");
    let relay = FaultRelay::start(master.addr())
        .await
        .expect("relay starts");
    let opts = Opts::from_url(&relay.dsn("tally")).expect("relay dsn parses");
    assert!(!opts.prefer_socket());

    let mut conn = Conn::new(opts.clone())
        .await
        .expect("connect through relay");
    let one: Option<i64> = conn
        .query_first("SELECT 1")
        .await
        .expect("query in pass mode");
    assert_eq!(one, Some(1));
    // The connection really goes through the relay (not the unix socket).
    assert_eq!(relay.stats().accepted, 1);
    assert_eq!(relay.stats().active, 1);

    relay.cut_on_pattern(b"COMMIT".to_vec());
    conn.query_drop("START TRANSACTION").await.expect("begin");
    conn.query_drop("INSERT INTO relay_probe VALUES (42)")
        .await
        .expect("insert");
    let commit = conn.query_drop("COMMIT").await;
    match commit {
        Err(mysql_async::Error::Io(_)) => {}
        other => panic!("COMMIT should fail with a connection error, got {other:?}"),
    }
    assert_eq!(relay.stats().pattern_cuts, 1);

    // ... and yet the row is there.
    let rows = master
        .sql("SELECT id FROM tally.relay_probe")
        .await
        .expect("read on master");
    assert_eq!(rows.len(), 1, "the cut COMMIT was not committed");

    // Back to pass: new connections work again.
    relay.pass();
    let mut conn = Conn::new(opts).await.expect("reconnect");
    let n: Option<i64> = conn
        .query_first("SELECT COUNT(*) FROM relay_probe")
        .await
        .expect("query");
    assert_eq!(n, Some(1));
    let _ = conn.disconnect().await;
}
