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
//! therefore enforced by a per-connection watchdog (`Watchdog`) following the
//! connection's phase, set by the socket reads and the request handler.
//!
//! Shutdown: when `drain` turns true the listener stops accepting, every
//! connection is told to finish (hyper closes idle ones at once and lets a
//! request in progress complete), and [`serve`] returns when all are gone.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Either};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service as _;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, Sleep};

use crate::config::ConnectionsConfig;
use crate::telemetry;

/// Refused connections being answered at the same time, at most; beyond
/// that a refused connection is closed without an answer, so a flood of
/// connections cannot grow the refusal work without bound either.
const REFUSALS_IN_FLIGHT: usize = 64;

/// How long a refused connection may take to receive its 503 (see
/// [`refuse`]).
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// The smallest read buffer we give hyper (its own minimum is 8 KiB), so
/// request bodies are still read in large chunks under a small head limit.
const MIN_BUF: usize = 64 * 1024;

/// At most this much of a refused connection's input is read and dropped.
const REFUSAL_DRAIN: usize = 64 * 1024;

/// The answer to a connection over the limit: the contract's error shape,
/// `Retry-After`, and `Connection: close`.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 82\r\n\
\r\n\
{\"error\":{\"code\":\"overloaded\",\"message\":\"too many open connections; retry later\"}}";

/// What a listener serves: requests the shortcut accepts go to it, every
/// other request to the router.
#[derive(Clone)]
pub struct Routes {
    pub router: Router,
    pub shortcut: Option<Shortcut>,
}

/// A handler for one hot kind of request, tried before the router (see
/// `api::incr_shortcut`).
#[derive(Clone)]
pub struct Shortcut {
    pub accepts: fn(&axum::extract::Request) -> bool,
    pub handle: Arc<dyn Fn(axum::extract::Request) -> BoxFuture<'static, Response> + Send + Sync>,
}

/// Serves `routes` on `listener` until `drain` turns true and every
/// connection has finished. `name` labels the metrics (`http`, `admin`).
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
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
                // Answers leave at once instead of waiting for the client's
                // ACK of the previous segment (Nagle's algorithm): a
                // response hyper writes in more than one piece would
                // otherwise stall behind a delayed ACK.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(listener = name, error = %e, "cannot set TCP_NODELAY");
                }
                tokio::spawn(connection(
                    stream,
                    routes.clone(),
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
            while drained < REFUSAL_DRAIN {
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
    Routes { router, shortcut }: Routes,
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
        let req = req.map(Body::new);
        let response = match &shortcut {
            Some(shortcut) if (shortcut.accepts)(&req) => {
                Either::Left((shortcut.handle)(req).map(Ok::<_, Infallible>))
            }
            _ => Either::Right(routes.call(req)),
        };
        async move {
            let response = response.await;
            clock.set(Phase::Idle);
            response
        }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut watchdog = Watchdog::new(clock, timeouts);
    let mut draining = false;
    loop {
        // Biased: the connection first, so the watchdog sees the phase the
        // connection's reads and handler just set.
        tokio::select! {
            biased;
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
            why = std::future::poll_fn(|cx| watchdog.poll_expired(cx)) => {
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
/// (a read while idle starts a request head) and the service (busy, then
/// idle once the response is ready), read by the [`Watchdog`]. All of them
/// run on the connection's task; atomics only make the value shareable.
struct Clock {
    origin: Instant,
    /// Milliseconds since `origin` << 2 | phase.
    state: AtomicU64,
}

impl Clock {
    /// A new connection is reading its first head from the start.
    fn new() -> Clock {
        Clock {
            origin: Instant::now(),
            state: AtomicU64::new(Phase::Reading as u64),
        }
    }

    fn load(&self) -> (Phase, Instant) {
        let v = self.state.load(Ordering::Relaxed);
        let phase = match v & 3 {
            0 => Phase::Reading,
            1 => Phase::Busy,
            _ => Phase::Idle,
        };
        (phase, self.origin + Duration::from_millis(v >> 2))
    }

    fn set(&self, phase: Phase) {
        let millis = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX >> 2);
        self.state
            .store((millis << 2) | phase as u64, Ordering::Relaxed);
    }

    /// Bytes arrived: if the connection was idle, a request head begins.
    fn on_read(&self) {
        if self.load().0 == Phase::Idle {
            self.set(Phase::Reading);
        }
    }
}

/// Closes a connection whose phase outlives its bound, with one timer per
/// connection and no wake-up per request: the timer is moved earlier only
/// when the current phase's deadline lies before it; otherwise it fires,
/// and is re-armed for whatever the phase is by then. It is polled right
/// after the connection (same task), so it always sees the latest phase.
struct Watchdog {
    clock: Arc<Clock>,
    timeouts: Timeouts,
    timer: Pin<Box<Sleep>>,
    armed: Instant,
}

impl Watchdog {
    fn new(clock: Arc<Clock>, timeouts: Timeouts) -> Watchdog {
        let armed = clock.origin + timeouts.header;
        Watchdog {
            clock,
            timeouts,
            timer: Box::pin(tokio::time::sleep_until(armed)),
            armed,
        }
    }

    /// The current phase's deadline, `None` while busy.
    fn due(&self) -> Option<(Instant, Expired)> {
        match self.clock.load() {
            (Phase::Reading, since) => Some((since + self.timeouts.header, Expired::HeaderRead)),
            (Phase::Idle, since) => Some((since + self.timeouts.idle, Expired::Idle)),
            (Phase::Busy, _) => None,
        }
    }

    fn arm(&mut self, at: Instant) {
        self.armed = at;
        self.timer.as_mut().reset(at);
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<Expired> {
        loop {
            let due = self.due();
            if let Some((at, _)) = due
                && at < self.armed
            {
                self.arm(at);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            match due {
                Some((at, why)) if at <= Instant::now() => return Poll::Ready(why),
                Some((at, _)) => self.arm(at),
                // Busy: no deadline. Any time will do, as the phase that
                // follows pulls the timer earlier if its deadline needs it.
                None => {
                    let step = self.timeouts.header.min(self.timeouts.idle);
                    self.arm(Instant::now() + step);
                }
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

    /// Drives a watchdog the way a connection task does: each step changes
    /// the phase (as the connection's reads and handler would) and the
    /// watchdog is polled right after. Returns why it fired and when,
    /// measured from the last step.
    async fn run(
        t: Timeouts,
        clock: Arc<Clock>,
        steps: &[(Duration, Phase)],
    ) -> (Expired, Duration) {
        let mut dog = Watchdog::new(clock.clone(), t);
        let mut last = Instant::now();
        let mut steps = steps.iter();
        let mut next = steps.next();
        loop {
            let wait = next.map_or(Duration::from_secs(3600), |(after, _)| *after);
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(last + wait), if next.is_some() => {
                    let (_, phase) = next.expect("a step");
                    if *phase == Phase::Reading {
                        clock.on_read();
                    } else {
                        clock.set(*phase);
                    }
                    last = Instant::now();
                    next = steps.next();
                }
                why = std::future::poll_fn(|cx| dog.poll_expired(cx)) => {
                    return (why, last.elapsed());
                }
            }
        }
    }

    /// Real time, in units of 200 ms: long enough to order the steps on a
    /// busy machine, short enough for a unit test. Upper bounds are loose
    /// except where they are the point (before a later deadline).
    #[tokio::test]
    async fn watchdog_bounds_reading_and_idle_but_not_busy() {
        let unit = Duration::from_millis(200);
        let t = Timeouts {
            header: 3 * unit,
            idle: 10 * unit,
        };
        // A new connection reads its first head: cut after `header`.
        let (why, took) = run(t, Arc::new(Clock::new()), &[]).await;
        assert_eq!(why, Expired::HeaderRead);
        assert_between(took, 3 * unit, 3 * unit + SLACK);

        // Busy for longer than both bounds: not cut. Then idle (the timer
        // is re-armed for the idle deadline), and bytes arrive: the header
        // bound applies from the first byte and pulls the timer earlier.
        let long_idle = Timeouts {
            header: 3 * unit,
            idle: 30 * unit,
        };
        let steps = [
            (Duration::ZERO, Phase::Busy),
            (12 * unit, Phase::Idle),
            (4 * unit, Phase::Reading),
        ];
        let (why, took) = run(long_idle, Arc::new(Clock::new()), &steps).await;
        assert_eq!(why, Expired::HeaderRead);
        assert_between(took, 3 * unit, 20 * unit);

        // Left idle after a request, the idle bound applies, although the
        // first head's deadline was armed earlier.
        let steps = [(Duration::ZERO, Phase::Busy), (unit, Phase::Idle)];
        let (why, took) = run(t, Arc::new(Clock::new()), &steps).await;
        assert_eq!(why, Expired::Idle);
        assert_between(took, 10 * unit, 10 * unit + SLACK);
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
