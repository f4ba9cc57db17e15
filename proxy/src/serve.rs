//! Serving one listener: HTTP/1 connections under limits a hostile or
//! broken client cannot stretch.
//!
//! - **Connection limit.** Each listener holds at most
//!   `connections.max_per_listener` connections (a semaphore permit each).
//!   One more is answered `503 overloaded` with `Retry-After` and closed at
//!   once, never parked in the accept backlog where its client would wait
//!   without an answer.
//! - **Header read timeout.** A request's line and headers must be complete
//!   within `header_read_timeout` of its first byte (of the accept, for a
//!   connection's first request); a slowloris client trickling header bytes
//!   is disconnected.
//! - **Idle timeout.** A keep-alive connection waiting for its next request
//!   is closed after `idle_timeout`.
//! - **Header size.** hyper answers request heads over `max_header_bytes`
//!   with 431 and closes the connection; its read buffer is capped so a
//!   head cannot grow memory beyond a small multiple of that.
//!
//! hyper has a `header_read_timeout` of its own, but the same timer also
//! runs while a keep-alive connection is idle, so one value would have to
//! serve both purposes: short enough to cut slowloris clients (seconds)
//! and longer than a load balancer's idle timeout (often 60 s; shorter
//! makes the balancer reuse connections we just closed). Both timeouts are
//! therefore enforced by a per-connection watchdog fed by the socket reads
//! and the request handler (see [`Clock`]).
//!
//! Shutdown: when `drain` turns true the listener stops accepting, every
//! connection is told to finish (hyper closes idle ones at once and lets a
//! request in progress complete), and [`serve`] returns when all are gone.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service as _;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use crate::config::ConnectionsConfig;
use crate::telemetry;

/// Refused connections being answered at the same time, at most; beyond
/// that a refused connection is closed without an answer, so a flood of
/// connections cannot grow the refusal work without bound either.
const REFUSALS_IN_FLIGHT: usize = 64;

/// How long a refused connection may take to receive its 503 (see
/// [`refuse`]).
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// hyper's smallest allowed read buffer.
const MIN_BUF: usize = 64 * 1024;

/// The answer to a connection over the limit: the contract's error shape,
/// `Retry-After`, and `Connection: close`.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 82\r\n\
\r\n\
{\"error\":{\"code\":\"overloaded\",\"message\":\"too many open connections; retry later\"}}";

/// Serves `router` on `listener` until `drain` turns true and every
/// connection has finished. `name` labels the metrics (`http`, `admin`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionsConfig,
    name: &'static str,
    mut drain: watch::Receiver<bool>,
) {
    // Validation caps the limit at 1,000,000, far below u32::MAX.
    let max = u32::try_from(limits.max_per_listener).unwrap_or(u32::MAX);
    let slots = Arc::new(Semaphore::new(max as usize));
    let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
    let mut builder = http1::Builder::new();
    builder
        // Enforced by the watchdog instead (module docs).
        .header_read_timeout(None::<Duration>)
        .max_header_size(limits.max_header_bytes)
        // The read buffer must exceed the largest head we accept, or hyper
        // reports "too large" before it has seen the whole head.
        .max_buf_size((2 * limits.max_header_bytes).max(MIN_BUF))
        .keep_alive(true);
    let timeouts = Timeouts {
        header: limits.header_read_timeout,
        idle: limits.idle_timeout,
    };
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    accept_failed(name, e).await;
                    continue;
                }
            },
            () = drained(&mut drain) => break,
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                telemetry::connection_accepted(name);
                tokio::spawn(connection(
                    stream,
                    router.clone(),
                    builder.clone(),
                    timeouts,
                    drain.clone(),
                    permit,
                    name,
                ));
            }
            Err(_) => refuse(stream, &refusals, name),
        }
    }
    drop(listener);
    // Every connection holds a permit until it is gone.
    let _all_closed = slots.acquire_many(max).await;
}

/// Completes once `drain` is true (or its sender is gone).
async fn drained(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|d| *d).await;
}

/// A failed `accept` either concerns one connection (the client gave up
/// before we took it) or the process (out of file descriptors): then wait a
/// little instead of spinning on the error.
async fn accept_failed(name: &str, e: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(listener = name, error = %e, "accept failed; pausing the listener for 100ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Answers a connection over the limit with 503 and closes it. The client
/// has usually sent its request already; closing a socket with unread
/// input makes the kernel reset the connection, which can destroy the 503
/// before the client reads it, so the input is drained for a moment first.
fn refuse(mut stream: TcpStream, refusals: &Arc<Semaphore>, name: &'static str) {
    telemetry::connection_refused(name);
    let Ok(permit) = refusals.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let answer = async {
            stream.write_all(REFUSAL).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            let mut drained = 0;
            while drained < MIN_BUF {
                match stream.read(&mut sink).await? {
                    0 => break,
                    n => drained += n,
                }
            }
            Ok::<_, io::Error>(())
        };
        let _ = tokio::time::timeout(REFUSAL_LINGER, answer).await;
    });
}

#[derive(Debug, Clone, Copy)]
struct Timeouts {
    header: Duration,
    idle: Duration,
}

/// Why the watchdog closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    HeaderRead,
    Idle,
}

impl Expired {
    fn as_str(self) -> &'static str {
        match self {
            Expired::HeaderRead => "header_read",
            Expired::Idle => "idle",
        }
    }
}

async fn connection(
    stream: TcpStream,
    router: Router,
    builder: http1::Builder,
    timeouts: Timeouts,
    mut drain: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
    name: &'static str,
) {
    let clock = Arc::new(Clock::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        clock: clock.clone(),
    });
    let routes = TowerToHyperService::new(router);
    let service_clock = clock.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        service_clock.set(Phase::Busy);
        let clock = service_clock.clone();
        let response = routes.call(req.map(Body::new));
        async move {
            let response = response.await;
            clock.set(Phase::Idle);
            response
        }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let watchdog = clock.expired(timeouts);
    tokio::pin!(watchdog);
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(listener = name, error = %e, "connection ended with an error");
                }
                break;
            }
            () = drained(&mut drain), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            why = &mut watchdog => {
                // Dropping the connection closes the socket.
                tracing::debug!(listener = name, reason = why.as_str(), "connection timed out");
                telemetry::connection_timed_out(name, why.as_str());
                break;
            }
        }
    }
    drop(permit);
}

/// Where a connection is in its request cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Receiving a request head: bounded by the header read timeout.
    Reading = 0,
    /// A handler is running (body, database, response): no bound here.
    Busy = 1,
    /// Waiting for the next request: bounded by the idle timeout.
    Idle = 2,
}

/// A connection's phase and when it began, shared by the socket wrapper
/// (a read while idle starts a request head), the service (busy, then idle
/// once the response is ready) and the watchdog. All three run on the
/// connection's task; atomics only make the value shareable.
struct Clock {
    origin: Instant,
    /// Milliseconds since `origin` << 2 | phase.
    state: AtomicU64,
    changed: Notify,
}

impl Clock {
    /// A new connection is reading its first head from the start.
    fn new() -> Clock {
        Clock {
            origin: Instant::now(),
            state: AtomicU64::new(Phase::Reading as u64),
            changed: Notify::new(),
        }
    }

    fn load(&self) -> (Phase, u64) {
        let v = self.state.load(Ordering::Acquire);
        let phase = match v & 3 {
            0 => Phase::Reading,
            1 => Phase::Busy,
            _ => Phase::Idle,
        };
        (phase, v >> 2)
    }

    fn set(&self, phase: Phase) {
        let millis = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX >> 2);
        self.state
            .store((millis << 2) | phase as u64, Ordering::Release);
        self.changed.notify_one();
    }

    /// Bytes arrived: if the connection was idle, a request head begins.
    fn on_read(&self) {
        if self.load().0 == Phase::Idle {
            self.set(Phase::Reading);
        }
    }

    /// Completes when the current phase outlives its bound.
    async fn expired(&self, t: Timeouts) -> Expired {
        loop {
            let (phase, since) = self.load();
            // Registered before the deadline is computed, so a change made
            // meanwhile still wakes us (`notify_one` keeps a permit).
            let changed = self.changed.notified();
            let (bound, why) = match phase {
                Phase::Reading => (t.header, Expired::HeaderRead),
                Phase::Idle => (t.idle, Expired::Idle),
                Phase::Busy => {
                    changed.await;
                    continue;
                }
            };
            let deadline = self.origin + Duration::from_millis(since) + bound;
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    if self.load() == (phase, since) {
                        return why;
                    }
                }
                _ = changed => {}
            }
        }
    }
}

/// The client socket, reporting reads to the connection's [`Clock`].
struct Watched {
    inner: TcpStream,
    clock: Arc<Clock>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.on_read();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_declares_its_body_length() {
        let text = std::str::from_utf8(REFUSAL).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        let declared: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.parse().ok())
            .expect("content-length");
        assert_eq!(declared, body.len());
        let json: serde_json::Value = serde_json::from_str(body).expect("JSON body");
        assert_eq!(json["error"]["code"], "overloaded");
    }

    /// Real time, in units of 200 ms: long enough to order the steps on a
    /// busy machine, short enough for a unit test. Upper bounds are loose
    /// except where they are the point (before the idle deadline).
    #[tokio::test]
    async fn watchdog_bounds_reading_and_idle_but_not_busy() {
        let unit = Duration::from_millis(200);
        let t = Timeouts {
            header: 3 * unit,
            idle: 10 * unit,
        };
        // A new connection reads its first head: cut after `header`.
        let clock = Clock::new();
        let started = Instant::now();
        assert_eq!(clock.expired(t).await, Expired::HeaderRead);
        assert_between(started.elapsed(), 3 * unit, 3 * unit + SLACK);

        // Busy for longer than both bounds: never cut.
        let clock = Arc::new(Clock::new());
        clock.set(Phase::Busy);
        let watch = tokio::spawn({
            let clock = clock.clone();
            async move { clock.expired(t).await }
        });
        tokio::time::sleep(12 * unit).await;
        assert!(!watch.is_finished(), "a busy connection has no bound");
        // Idle, then bytes arrive: the (shorter) header bound applies from
        // the first byte, although the idle deadline lies later.
        clock.set(Phase::Idle);
        tokio::time::sleep(unit).await;
        let first_byte = Instant::now();
        clock.on_read();
        assert_eq!(watch.await.expect("watchdog"), Expired::HeaderRead);
        assert_between(first_byte.elapsed(), 3 * unit, 8 * unit);

        // Left idle, the idle bound applies.
        let clock = Clock::new();
        clock.set(Phase::Idle);
        let idle_since = Instant::now();
        assert_eq!(clock.expired(t).await, Expired::Idle);
        assert_between(idle_since.elapsed(), 10 * unit, 10 * unit + SLACK);
    }

    const SLACK: Duration = Duration::from_secs(2);

    /// Phases are stored with millisecond resolution; a timer fires no
    /// earlier than its deadline, maybe later on a loaded machine.
    fn assert_between(took: Duration, low: Duration, high: Duration) {
        let low = low - Duration::from_millis(2);
        assert!(
            took >= low && took <= high,
            "took {took:?}, want {low:?}..{high:?}"
        );
    }
}
