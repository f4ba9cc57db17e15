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
//! - **Body deadline and rate.** A request body must be complete within
//!   `body_read_timeout` of the end of its head and, once
//!   `body_rate_grace` has passed, must have averaged `min_body_rate`
//!   bytes/s since then; otherwise the handler reading it gets
//!   [`BodyError`], answers 408 `body_timeout`, and the connection is
//!   closed. A client trickling a body (issue #20: one byte every two
//!   seconds) holds its slot for about the grace, not for ever.
//! - **Body byte budget.** The bytes of request bodies a listener's
//!   requests hold (read, and not yet answered) are bounded by
//!   `max_body_bytes_in_flight` over all its connections; the body whose
//!   bytes would pass it is answered 503 `overloaded` with `Retry-After`
//!   and its connection closed. After a refused body, the connection
//!   drains its input briefly before it closes (as [`refuse`] does), so
//!   the answer is not lost to a reset.
//!
//! The body bounds live in the body ([`TimedBody`]), not in the watchdog:
//! the watchdog can only drop a connection, while a 408 or 503 must be
//! answered by the handler that reads the body, through the one error
//! mapping. The body's timer exists only while a read of it waits.
//!
//! hyper has a `header_read_timeout` of its own, but the same timer also
//! runs while a keep-alive connection is idle, so one value would have to
//! serve both purposes: short enough to cut slowloris clients (seconds)
//! and longer than a load balancer's idle timeout (often 60 s; shorter
//! makes the balancer reuse connections we just closed). Both timeouts are
//! therefore enforced by a per-connection watchdog (`Watchdog`) following the
//! connection's phase, set by the socket reads and the request handler.
//!
//! **HTTPS** (optional, per listener: [`ListenerTls`]): the TLS handshake
//! runs in the connection's task after its slot was taken, under the
//! header read timeout (a client that never completes it is cut like a
//! slowloris one). A connection whose first byte is not a TLS handshake
//! (plain HTTP on an HTTPS port) is answered `400` in plain text and
//! closed, never served. The certificate is read through a resolver over
//! an `ArcSwap`: [`ListenerTls::reload`] swaps it for new handshakes while
//! open connections keep theirs.
//!
//! Shutdown: when `drain` turns true the listener stops accepting, every
//! connection is told to finish (hyper closes idle ones at once and lets a
//! request in progress complete), and [`serve`] returns when all are gone.
//! With a drain deadline, connections still open when it passes are cut
//! (closed without an answer, their handlers dropped) and [`serve`]
//! returns once they are.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Either};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::Service as _;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, Sleep};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::{ConnectionsConfig, TlsConfig};
use crate::error::ApiError;
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

/// At most this much of a refused connection's input is read and dropped
/// (also after a refused body).
const REFUSAL_DRAIN: usize = 64 * 1024;

/// What a client whose body did not fit the budget is told to wait.
const BODY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The answer to a connection over the limit: the contract's error shape,
/// `Retry-After`, and `Connection: close`.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 82\r\n\
\r\n\
{\"error\":{\"code\":\"overloaded\",\"message\":\"too many open connections; retry later\"}}";

/// The answer to plain HTTP on an HTTPS listener.
const PLAIN_ON_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
content-type: text/plain\r\n\
connection: close\r\n\
content-length: 43\r\n\
\r\n\
this port serves HTTPS: use an https:// URL";

/// The first byte of a TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// A listener's HTTPS: its certificate files, the certificate in use and
/// the acceptor that hands it to new handshakes.
pub struct ListenerTls {
    config: TlsConfig,
    current: Arc<CurrentCert>,
    acceptor: TlsAcceptor,
    /// The files' identity when last read (modified, length, inode).
    stamp: parking_lot::Mutex<Option<FileStamp>>,
}

type FileStamp = [(std::time::SystemTime, u64, u64); 2];

/// The certificate new handshakes get.
#[derive(Debug)]
struct CurrentCert(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

impl ListenerTls {
    /// Reads the certificate and key ([`TlsConfig::load`]); an error names
    /// the file and the problem.
    pub fn new(config: &TlsConfig) -> Result<Arc<ListenerTls>, String> {
        let stamp = file_stamp(config);
        let current = Arc::new(CurrentCert(ArcSwap::new(config.load()?)));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(ListenerTls {
            config: config.clone(),
            current,
            acceptor: TlsAcceptor::from(Arc::new(server)),
            stamp: parking_lot::Mutex::new(stamp),
        }))
    }

    /// The certificate and key files.
    pub fn config(&self) -> &TlsConfig {
        &self.config
    }

    /// Reads the files again (`force`: always, as on SIGHUP; else only when
    /// either changed since the last read) and, if they make a usable
    /// certificate, gives it to new handshakes; open connections keep the
    /// one they have. `Ok(true)`: replaced. A failure keeps the
    /// certificate in use (and is not retried until the files change
    /// again or `force`).
    pub fn reload(&self, force: bool) -> Result<bool, String> {
        let stamp = file_stamp(&self.config);
        {
            let mut last = self.stamp.lock();
            if !force && *last == stamp {
                return Ok(false);
            }
            *last = stamp;
        }
        let cert = self.config.load()?;
        self.current.0.store(cert);
        Ok(true)
    }
}

fn file_stamp(config: &TlsConfig) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    let one = |path: &std::path::Path| {
        let m = std::fs::metadata(path).ok()?;
        Some((m.modified().ok()?, m.len(), m.ino()))
    };
    Some([one(&config.cert)?, one(&config.key)?])
}

/// What a listener serves: requests the shortcut accepts go to it, every
/// other request to the router.
#[derive(Clone)]
pub struct Routes {
    pub router: Router,
    pub shortcut: Option<Shortcut>,
}

/// A handler for one hot kind of request, tried before the router (see
/// `api::counter_shortcut`).
#[derive(Clone)]
pub struct Shortcut {
    pub accepts: fn(&axum::extract::Request) -> bool,
    pub handle: Arc<dyn Fn(axum::extract::Request) -> BoxFuture<'static, Response> + Send + Sync>,
}

/// Serves `routes` on `listener` until `drain` turns true and every
/// connection has finished, or, with a `drain_deadline`, until that long
/// after `drain` turned true, when the connections still open are cut.
/// `name` labels the metrics (`http`, `admin`).
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    limits: ConnectionsConfig,
    drain_deadline: Option<Duration>,
    name: &'static str,
    tls: Option<Arc<ListenerTls>>,
    mut drain: watch::Receiver<bool>,
) {
    // Validation caps the limit at 1,000,000, far below u32::MAX.
    let max = u32::try_from(limits.max_per_listener).unwrap_or(u32::MAX);
    let slots = Arc::new(Semaphore::new(max as usize));
    let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
    let rules = Arc::new(BodyRules::new(&limits, name));
    telemetry::listener(
        name,
        limits.max_per_listener,
        limits.max_body_bytes_in_flight,
    );
    let (cut, cut_rx) = watch::channel(false);
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
                let open = telemetry::connection_accepted(name);
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
                    ConnSetup {
                        builder: builder.clone(),
                        timeouts,
                        rules: rules.clone(),
                        drain: drain.clone(),
                        cut: cut_rx.clone(),
                        permit,
                        open,
                        name,
                        tls: tls.as_ref().map(|t| t.acceptor.clone()),
                    },
                ));
            }
            Err(_) => refuse(stream, &refusals, name),
        }
    }
    drop(listener);
    // Every connection holds a permit until it is gone.
    let all_closed = slots.acquire_many(max);
    let Some(deadline) = drain_deadline else {
        let _ = all_closed.await;
        return;
    };
    tokio::pin!(all_closed);
    if tokio::time::timeout(deadline, &mut all_closed)
        .await
        .is_err()
    {
        let open = max as usize - slots.available_permits();
        tracing::warn!(
            listener = name,
            open,
            ?deadline,
            "drain deadline passed: cutting the connections still open (their requests get no answer)"
        );
        let _ = cut.send(true);
        let _ = all_closed.await;
    }
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

/// What a connection task gets besides its socket and routes.
struct ConnSetup {
    builder: http1::Builder,
    timeouts: Timeouts,
    rules: Arc<BodyRules>,
    drain: watch::Receiver<bool>,
    /// Turns true when the drain deadline passed: drop everything.
    cut: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
    /// `tally_connections_open` counts the connection until this is dropped.
    open: telemetry::OpenConnection,
    name: &'static str,
    /// HTTPS: the handshake comes first.
    tls: Option<TlsAcceptor>,
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

async fn connection(stream: TcpStream, Routes { router, shortcut }: Routes, setup: ConnSetup) {
    let ConnSetup {
        builder,
        timeouts,
        rules,
        mut drain,
        mut cut,
        permit,
        open,
        name,
        tls,
    } = setup;
    let clock = Arc::new(Clock::new());
    let bodies = Arc::new(ConnBodies::new(rules));
    let mut watchdog = Watchdog::new(clock.clone(), timeouts);
    let watched = Watched {
        inner: stream,
        clock: clock.clone(),
        bodies: bodies.clone(),
        closing: Closing::Open,
    };
    let io = match tls {
        None => Io::Plain(watched),
        Some(acceptor) => {
            // Under the watchdog (reading the first head: the header
            // timeout), and cut by the drain deadline.
            let handshake = tls_handshake(watched, acceptor, name);
            let tls = tokio::select! {
                biased;
                tls = handshake => tls,
                () = drained(&mut cut) => None,
                why = std::future::poll_fn(|cx| watchdog.poll_expired(cx)) => {
                    telemetry::connection_timed_out(name, why.as_str());
                    None
                }
            };
            match tls {
                Some(tls) => Io::Tls(Box::new(tls)),
                None => {
                    drop((permit, open));
                    return;
                }
            }
        }
    };
    let io = TokioIo::new(io);
    let routes = TowerToHyperService::new(router);
    let service_clock = clock.clone();
    let service_bodies = bodies.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        service_clock.set(Phase::Busy);
        let clock = service_clock.clone();
        // Requests without a body (most: GETs, single-event ingest) pay
        // for none of this.
        let held = (!hyper::body::Body::is_end_stream(req.body())).then(|| service_bodies.clone());
        let req = match &held {
            None => req.map(Body::new),
            Some(bodies) => req.map(|b| Body::new(TimedBody::new(b, bodies.clone()))),
        };
        let response = match &shortcut {
            Some(shortcut) if (shortcut.accepts)(&req) => {
                Either::Left((shortcut.handle)(req).map(Ok::<_, Infallible>))
            }
            _ => Either::Right(routes.call(req)),
        };
        async move {
            let response = response.await;
            // The handler is done with the body's bytes.
            if let Some(bodies) = held {
                bodies.release();
            }
            clock.set(Phase::Idle);
            response
        }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
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
            () = drained(&mut cut) => {
                // Dropping the connection drops its handler and closes
                // the socket.
                telemetry::connection_timed_out(name, "drain");
                break;
            }
            why = std::future::poll_fn(|cx| watchdog.poll_expired(cx)) => {
                // Dropping the connection closes the socket.
                tracing::debug!(listener = name, reason = why.as_str(), "connection timed out");
                telemetry::connection_timed_out(name, why.as_str());
                break;
            }
        }
    }
    // A request cut before its answer held its body's bytes until now.
    bodies.release();
    drop(permit);
    drop(open);
}

/// The TLS handshake of a connection to an HTTPS listener; `None` when it
/// failed (logged at debug) or the client spoke plain HTTP (answered 400).
async fn tls_handshake(
    mut watched: Watched,
    acceptor: TlsAcceptor,
    name: &'static str,
) -> Option<TlsStream<Watched>> {
    let mut first = [0u8; 1];
    match watched.inner.peek(&mut first).await {
        Ok(1) if first[0] == TLS_HANDSHAKE => {}
        Ok(1) => {
            tracing::debug!(
                listener = name,
                "plain HTTP on an HTTPS listener: answered 400"
            );
            watched.bodies.linger.store(true, Ordering::Relaxed);
            let _ = async {
                watched.write_all(PLAIN_ON_TLS).await?;
                watched.shutdown().await
            }
            .await;
            return None;
        }
        _ => return None,
    }
    match acceptor.accept(watched).await {
        Ok(tls) => Some(tls),
        Err(e) => {
            tracing::debug!(listener = name, error = %e, "TLS handshake failed");
            None
        }
    }
}

/// A connection's transport: the socket, or TLS over it.
enum Io {
    Plain(Watched),
    Tls(Box<TlsStream<Watched>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
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

/// The client socket, reporting reads to the connection's [`Clock`], and
/// lingering at its close after a refused body ([`ConnBodies::linger`]).
struct Watched {
    inner: TcpStream,
    clock: Arc<Clock>,
    bodies: Arc<ConnBodies>,
    closing: Closing,
}

/// Where [`Watched`] is in closing its write side.
enum Closing {
    Open,
    /// Written side shut down; reading and dropping what the client still
    /// sends, for a moment, before the socket is closed.
    Lingering {
        until: Pin<Box<Sleep>>,
        drained: usize,
    },
    Closed,
}

impl Watched {
    /// Reads and drops input until the client closes, [`REFUSAL_DRAIN`]
    /// bytes went, or [`REFUSAL_LINGER`] passed. Closing a socket with
    /// unread input makes the kernel send a reset, which can destroy the
    /// answer before the client read it.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Closing::Lingering { until, drained } = &mut self.closing else {
            return Poll::Ready(());
        };
        let mut sink = [0u8; 4096];
        while *drained < REFUSAL_DRAIN {
            let mut buf = ReadBuf::new(&mut sink);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => *drained += buf.filled().len(),
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => return until.as_mut().poll(cx),
            }
        }
        Poll::Ready(())
    }
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
        let this = &mut *self;
        if let Closing::Open = this.closing {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.closing = if this.bodies.linger.load(Ordering::Relaxed) {
                Closing::Lingering {
                    until: Box::pin(tokio::time::sleep(REFUSAL_LINGER)),
                    drained: 0,
                }
            } else {
                Closing::Closed
            };
        }
        ready!(this.poll_linger(cx));
        this.closing = Closing::Closed;
        Poll::Ready(Ok(()))
    }
}

/// How one listener bounds request bodies (module docs).
struct BodyRules {
    timeout: Duration,
    /// Bytes per second; 0: no rate.
    min_rate: u64,
    grace: Duration,
    budget: BodyBudget,
    listener: &'static str,
}

impl BodyRules {
    fn new(limits: &ConnectionsConfig, listener: &'static str) -> BodyRules {
        // The gauge exists (at 0) before the first body.
        telemetry::body_bytes_held(listener, 0);
        BodyRules {
            timeout: limits.body_read_timeout,
            min_rate: limits.min_body_rate,
            grace: limits.body_rate_grace,
            budget: BodyBudget {
                max: limits.max_body_bytes_in_flight,
                used: AtomicUsize::new(0),
            },
            listener,
        }
    }

    /// When, counted from the end of its head, a body of which `received`
    /// bytes arrived is overdue unless more arrives, and what it is then
    /// told. By the rate it is owed `received / min_rate` seconds (at
    /// least the grace); the deadline caps that.
    fn due(&self, received: u64) -> (Duration, BodyError) {
        let deadline = (self.timeout, BodyError::Deadline(self.timeout));
        if self.min_rate == 0 {
            return deadline;
        }
        let nanos = u128::from(received) * 1_000_000_000 / u128::from(self.min_rate);
        let owed = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        let by_rate = owed.max(self.grace);
        if by_rate < self.timeout {
            (by_rate, BodyError::TooSlow(self.min_rate))
        } else {
            deadline
        }
    }
}

/// The bytes of request bodies one listener's requests hold.
struct BodyBudget {
    max: usize,
    used: AtomicUsize,
}

impl BodyBudget {
    /// Takes `n` bytes unless that would pass the maximum; concurrent
    /// bodies never pass it together (compare and swap).
    fn try_take(&self, n: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used.saturating_add(n) > self.max {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}

/// One connection's share of the body rules: the bytes its current
/// request holds (one request at a time on an HTTP/1 connection), and
/// whether it must linger at its close.
struct ConnBodies {
    rules: Arc<BodyRules>,
    held: AtomicUsize,
    /// Set when a body was refused while it was arriving: the client is
    /// likely still sending it.
    linger: AtomicBool,
}

impl ConnBodies {
    fn new(rules: Arc<BodyRules>) -> ConnBodies {
        ConnBodies {
            rules,
            held: AtomicUsize::new(0),
            linger: AtomicBool::new(false),
        }
    }

    /// Takes `n` more bytes for the current request from the listener's
    /// budget.
    fn take(&self, n: usize) -> bool {
        if !self.rules.budget.try_take(n) {
            return false;
        }
        self.held.fetch_add(n, Ordering::Relaxed);
        telemetry::body_bytes_held(self.rules.listener, n);
        true
    }

    /// Gives back what the current request held: it has been answered, or
    /// the connection is gone.
    fn release(&self) {
        let n = self.held.swap(0, Ordering::Relaxed);
        if n > 0 {
            self.rules.budget.give_back(n);
            telemetry::body_bytes_released(self.rules.listener, n);
        }
    }
}

/// Why a request body was refused while it arrived. Handlers reading a
/// body find it as the source of the body's error (see
/// `api::read_body`) and answer it through [`ApiError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the request body did not arrive within {0:?}")]
    Deadline(Duration),
    #[error("the request body arrived slower than {0} bytes/s")]
    TooSlow(u64),
    #[error("too many request bodies are being read at once")]
    Budget,
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> ApiError {
        match e {
            BodyError::Budget => ApiError::BodyBudgetFull {
                retry_after: BODY_RETRY_AFTER,
            },
            slow => ApiError::BodyTimeout(slow.to_string()),
        }
    }
}

/// A request body under its listener's [`BodyRules`]: each data frame
/// takes its bytes from the budget, and while a read waits, a timer runs
/// until the body is overdue ([`BodyRules::due`]); then, or when the
/// budget is full, the read fails with a [`BodyError`] and the body ends.
struct TimedBody<B> {
    inner: B,
    bodies: Arc<ConnBodies>,
    /// The end of the request's head.
    started: Instant,
    received: u64,
    /// Made at the first read that waits (a body that is there at once
    /// never needs one).
    timer: Option<Pin<Box<Sleep>>>,
    failed: bool,
}

impl<B> TimedBody<B> {
    fn new(inner: B, bodies: Arc<ConnBodies>) -> TimedBody<B> {
        TimedBody {
            inner,
            bodies,
            started: Instant::now(),
            received: 0,
            timer: None,
            failed: false,
        }
    }

    fn fail(&mut self, why: BodyError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.failed = true;
        self.bodies.linger.store(true, Ordering::Relaxed);
        let listener = self.bodies.rules.listener;
        match why {
            BodyError::Budget => telemetry::body_refused(listener),
            _ => telemetry::connection_timed_out(listener, "body"),
        }
        tracing::debug!(listener, received = self.received, error = %why, "request body refused");
        Poll::Ready(Some(Err(Box::new(why))))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> hyper::body::Body for TimedBody<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !this.bodies.take(data.len()) {
                        return this.fail(BodyError::Budget);
                    }
                    this.received += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let (after, why) = this.bodies.rules.due(this.received);
                let at = this.started + after;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => this.fail(why),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use hyper::body::Body as _;

    use super::*;

    #[test]
    fn plain_http_on_tls_declares_its_body_length() {
        let text = std::str::from_utf8(PLAIN_ON_TLS).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{text}"
        );
    }

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

    fn rules(timeout: u64, min_rate: u64, grace: u64, budget: usize) -> Arc<BodyRules> {
        let mut limits = crate::config::ProxyConfig::defaults().connections;
        limits.body_read_timeout = Duration::from_secs(timeout);
        limits.min_body_rate = min_rate;
        limits.body_rate_grace = Duration::from_secs(grace);
        limits.max_body_bytes_in_flight = budget;
        Arc::new(BodyRules::new(&limits, "test"))
    }

    #[test]
    fn a_body_is_due_by_its_rate_after_the_grace_and_at_the_deadline_at_the_latest() {
        let secs = Duration::from_secs;
        let r = rules(30, 1000, 5, 1 << 20);
        // Within the grace any rate will do.
        assert_eq!(r.due(0), (secs(5), BodyError::TooSlow(1000)));
        assert_eq!(r.due(4_999), (secs(5), BodyError::TooSlow(1000)));
        // Then each 1000 bytes buy a second, counted from the head.
        assert_eq!(r.due(12_000), (secs(12), BodyError::TooSlow(1000)));
        assert_eq!(
            r.due(12_500),
            (Duration::from_millis(12_500), BodyError::TooSlow(1000))
        );
        // However fast, the whole body is due at the deadline.
        assert_eq!(r.due(30_000), (secs(30), BodyError::Deadline(secs(30))));
        assert_eq!(r.due(u64::MAX), (secs(30), BodyError::Deadline(secs(30))));
        // Without a rate only the deadline counts.
        let r = rules(30, 0, 5, 1 << 20);
        assert_eq!(r.due(0), (secs(30), BodyError::Deadline(secs(30))));
    }

    #[test]
    fn the_budget_is_never_passed_and_comes_back_when_requests_are_answered() {
        let r = rules(30, 0, 5, 100);
        let (a, b) = (ConnBodies::new(r.clone()), ConnBodies::new(r.clone()));
        assert!(a.take(60));
        assert!(!b.take(41), "60 + 41 > 100");
        assert!(b.take(40));
        assert!(!a.take(1), "full");
        assert_eq!(r.budget.used.load(Ordering::Relaxed), 100);
        a.release();
        assert_eq!(r.budget.used.load(Ordering::Relaxed), 40);
        // Releasing twice (answer, then connection end) gives back once.
        a.release();
        assert_eq!(r.budget.used.load(Ordering::Relaxed), 40);
        assert!(a.take(60));
        b.release();
        a.release();
        assert_eq!(r.budget.used.load(Ordering::Relaxed), 0);
    }

    /// A body whose frames are `chunks`, then no more for ever (a client
    /// that stopped sending).
    struct Stalled(std::collections::VecDeque<Bytes>);

    impl hyper::body::Body for Stalled {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            match self.0.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                None => Poll::Pending,
            }
        }
    }

    fn timed(chunks: &[usize], bodies: &Arc<ConnBodies>, age: Duration) -> TimedBody<Stalled> {
        let chunks = chunks.iter().map(|&n| Bytes::from(vec![b' '; n])).collect();
        let mut body = TimedBody::new(Stalled(chunks), bodies.clone());
        // As if its head had ended `age` ago.
        body.started = Instant::now() - age;
        body
    }

    /// The next frame's outcome if there is one now: `Some(Ok(len))`,
    /// `Some(Err)`, or `None` while the read waits.
    fn next_now<B>(body: &mut TimedBody<B>) -> Option<Result<usize, BodyError>>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let frame =
            std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).now_or_never()?;
        Some(match frame.expect("a frame or an error") {
            Ok(frame) => Ok(frame.into_data().map_or(0, |d| d.len())),
            Err(e) => Err(*e.downcast::<BodyError>().expect("a BodyError")),
        })
    }

    #[tokio::test]
    async fn a_stalled_body_fails_once_overdue_and_not_before() {
        let r = rules(60, 1000, 5, 1 << 20);
        let bodies = Arc::new(ConnBodies::new(r));
        // 20 s after its head, 40,000 bytes are owed 40 s: it may wait.
        let mut body = timed(&[20_000, 20_000], &bodies, Duration::from_secs(20));
        assert_eq!(next_now(&mut body), Some(Ok(20_000)));
        assert_eq!(next_now(&mut body), Some(Ok(20_000)));
        assert_eq!(next_now(&mut body), None, "not overdue yet");
        assert!(!bodies.linger.load(Ordering::Relaxed));
        // 10,000 bytes owed 10 s are overdue 20 s after the head.
        let mut body = timed(&[10_000], &bodies, Duration::from_secs(20));
        assert_eq!(next_now(&mut body), Some(Ok(10_000)));
        assert_eq!(next_now(&mut body), Some(Err(BodyError::TooSlow(1000))));
        // It is over: the handler sees its end, the connection lingers.
        assert_eq!(
            std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
                .now_or_never()
                .map(|f| f.is_none()),
            Some(true)
        );
        assert!(body.is_end_stream());
        assert!(bodies.linger.load(Ordering::Relaxed));
        // Past the deadline, however much arrived.
        let mut body = timed(&[1 << 19], &bodies, Duration::from_secs(61));
        assert_eq!(next_now(&mut body), Some(Ok(1 << 19)));
        assert_eq!(
            next_now(&mut body),
            Some(Err(BodyError::Deadline(Duration::from_secs(60))))
        );
    }

    #[tokio::test]
    async fn a_body_past_the_budget_fails_and_its_bytes_come_back_when_answered() {
        let r = rules(30, 0, 5, 100_000);
        let (first, second) = (
            Arc::new(ConnBodies::new(r.clone())),
            Arc::new(ConnBodies::new(r.clone())),
        );
        let mut holder = timed(&[70_000], &first, Duration::ZERO);
        assert_eq!(next_now(&mut holder), Some(Ok(70_000)));
        let mut late = timed(&[20_000, 20_000], &second, Duration::ZERO);
        assert_eq!(next_now(&mut late), Some(Ok(20_000)));
        assert_eq!(next_now(&mut late), Some(Err(BodyError::Budget)));
        assert!(second.linger.load(Ordering::Relaxed));
        assert!(!first.linger.load(Ordering::Relaxed));
        // Answered: what the refused body held comes back, and the
        // holder's bytes when it is answered.
        second.release();
        assert_eq!(r.budget.used.load(Ordering::Relaxed), 70_000);
        first.release();
        assert_eq!(r.budget.used.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn body_refusals_are_answered_408_or_503_overloaded() {
        let e = ApiError::from(BodyError::TooSlow(1024));
        assert_eq!(e.code(), "body_timeout");
        assert_eq!(
            e.to_string(),
            "the request body arrived slower than 1024 bytes/s"
        );
        let e = ApiError::from(BodyError::Deadline(Duration::from_secs(30)));
        assert_eq!(e.code(), "body_timeout");
        assert_eq!(e.to_string(), "the request body did not arrive within 30s");
        let e = ApiError::from(BodyError::Budget);
        assert_eq!(e.code(), "overloaded");
        assert!(
            matches!(e, ApiError::BodyBudgetFull { retry_after } if retry_after == BODY_RETRY_AFTER)
        );
    }

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
