//! A Toxiproxy-like TCP relay for fault injection between a client (the
//! proxy's connection pool) and a MariaDB server.
//!
//! Exactly-once flushing is only testable if the harness can produce the
//! awkward failures on demand: a connection that dies mid-request, a slow
//! network, a server that refuses connections, and above all the ambiguous
//! commit, where `COMMIT` reaches the server and commits but the reply never
//! reaches the client. The relay forwards bytes unchanged and applies the
//! current [`Fault`], which tests may change at any time.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::HarnessError;

/// After a pattern cut, how long the relay waits for the server's reply
/// (which it then swallows) before closing anyway. Waiting makes the
/// "committed, but the client never heard" outcome deterministic: when the
/// client sees its error, the server has already answered. Longer than the
/// semi-sync timeout, which can delay a COMMIT by 2 s.
const REPLY_WAIT: Duration = Duration::from_secs(10);
const BUFFER: usize = 16 * 1024;

/// What the relay does to traffic. Applies to connections already open as
/// well as new ones (except `Refuse`, which only affects new connections).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Fault {
    /// Forward everything unchanged.
    #[default]
    Pass,
    /// Hold every chunk, in both directions, this long before forwarding.
    Delay(Duration),
    /// Per connection: forward this many more client→server bytes (counted
    /// from when the fault was set, or from connect), then close both sides.
    CutAfterBytesUpstream(u64),
    /// When the client→server stream contains `pattern` (e.g. `b"COMMIT"`),
    /// forward it, swallow the server's reply and close both sides. With
    /// `once`, only the first matching connection is cut and the relay
    /// returns to `Pass`. An empty pattern never matches.
    CutOnPattern {
        /// Bytes to look for (may span reads).
        pattern: Vec<u8>,
        /// Cut one connection only.
        once: bool,
    },
    /// Accept and immediately close new connections; open ones keep working.
    Refuse,
    /// A black hole, once: the first connection whose client→server stream
    /// contains `pattern` stops there. Nothing more reaches the server (not
    /// even the chunk with the pattern), nothing reaches the client, and
    /// neither side is closed, even when the client gives up: the server's
    /// session stays open and idle (with its transaction and locks) until
    /// the relay is dropped, like a peer behind a dead network path. The
    /// relay then returns to `Pass`.
    HoldOnPattern(Vec<u8>),
}

/// Counters for assertions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Connections relayed (not counting refused ones).
    pub accepted: u64,
    /// Connections closed at once because of [`Fault::Refuse`].
    pub refused: u64,
    /// Connections currently open.
    pub active: u64,
    /// Connections closed by a fault (byte limit, pattern or `cut_all`).
    pub cuts: u64,
    /// Of those, connections cut by [`Fault::CutOnPattern`].
    pub pattern_cuts: u64,
    /// Connections held by [`Fault::HoldOnPattern`].
    pub holds: u64,
}

/// A TCP relay on `127.0.0.1:<random port>` in front of one upstream.
/// Dropping it closes the listener and every relayed connection.
#[derive(Debug)]
pub struct FaultRelay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    /// The current fault and a version bumped on every change, so that a
    /// connection can tell a new fault (fresh byte budget) from the old one.
    fault: Mutex<(Arc<Fault>, u64)>,
    /// Bumped by `cut_all`; every connection watches it.
    cut_all: watch::Sender<u64>,
    accepted: AtomicU64,
    refused: AtomicU64,
    active: AtomicU64,
    cuts: AtomicU64,
    pattern_cuts: AtomicU64,
    holds: AtomicU64,
}

impl Shared {
    fn fault(&self) -> (Arc<Fault>, u64) {
        let guard = self.fault.lock().unwrap_or_else(PoisonError::into_inner);
        (guard.0.clone(), guard.1)
    }

    fn set_fault(&self, fault: Fault) {
        let mut guard = self.fault.lock().unwrap_or_else(PoisonError::into_inner);
        *guard = (Arc::new(fault), guard.1 + 1);
    }

    /// For a one-shot fault: true for exactly one caller, which also resets
    /// the relay to `Pass` (unless the fault changed meanwhile).
    fn claim_once(&self, version: u64) -> bool {
        let mut guard = self.fault.lock().unwrap_or_else(PoisonError::into_inner);
        if guard.1 != version {
            return false;
        }
        *guard = (Arc::new(Fault::Pass), guard.1 + 1);
        true
    }
}

impl FaultRelay {
    /// Starts relaying from a fresh port on 127.0.0.1 to `upstream`, in
    /// [`Fault::Pass`] mode. Needs a tokio runtime.
    pub async fn start(upstream: SocketAddr) -> Result<FaultRelay, HarnessError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|e| HarnessError::io("binding the fault relay", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| HarnessError::io("reading the fault relay address", e))?;
        let shared = Arc::new(Shared {
            upstream,
            fault: Mutex::new((Arc::new(Fault::Pass), 0)),
            cut_all: watch::Sender::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            active: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            pattern_cuts: AtomicU64::new(0),
            holds: AtomicU64::new(0),
        });
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultRelay {
            addr,
            shared,
            accept_task,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the relay forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// `mysql://tally@<relay>/db?prefer_socket=false`, as the data user
    /// ([`DATA_USER`](crate::DATA_USER)), like [`Node::dsn`](crate::Node::dsn).
    /// The parameter matters: without it `mysql_async` reconnects through
    /// the server's unix socket right after connecting, silently bypassing
    /// the relay.
    pub fn dsn(&self, db: &str) -> String {
        format!(
            "mysql://{}@{}/{db}?prefer_socket=false",
            crate::DATA_USER,
            self.addr
        )
    }

    /// The fault currently applied.
    pub fn fault(&self) -> Fault {
        (*self.shared.fault().0).clone()
    }

    /// Replaces the current fault.
    pub fn set_fault(&self, fault: Fault) {
        tracing::debug!(relay = %self.addr, ?fault, "fault relay mode");
        self.shared.set_fault(fault);
    }

    /// [`Fault::Pass`].
    pub fn pass(&self) {
        self.set_fault(Fault::Pass);
    }

    /// [`Fault::Delay`].
    pub fn delay(&self, delay: Duration) {
        self.set_fault(Fault::Delay(delay));
    }

    /// [`Fault::CutAfterBytesUpstream`].
    pub fn cut_after_bytes_upstream(&self, bytes: u64) {
        self.set_fault(Fault::CutAfterBytesUpstream(bytes));
    }

    /// [`Fault::CutOnPattern`], cutting every matching connection.
    pub fn cut_on_pattern(&self, pattern: impl Into<Vec<u8>>) {
        self.set_fault(Fault::CutOnPattern {
            pattern: pattern.into(),
            once: false,
        });
    }

    /// [`Fault::CutOnPattern`], cutting only the first matching connection.
    pub fn cut_on_pattern_once(&self, pattern: impl Into<Vec<u8>>) {
        self.set_fault(Fault::CutOnPattern {
            pattern: pattern.into(),
            once: true,
        });
    }

    /// [`Fault::HoldOnPattern`].
    pub fn hold_on_pattern_once(&self, pattern: impl Into<Vec<u8>>) {
        self.set_fault(Fault::HoldOnPattern(pattern.into()));
    }

    /// [`Fault::Refuse`].
    pub fn refuse(&self) {
        self.set_fault(Fault::Refuse);
    }

    /// Closes every connection open right now; the mode is unchanged.
    pub fn cut_all(&self) {
        self.shared.cut_all.send_modify(|epoch| *epoch += 1);
    }

    /// Connection and cut counters.
    pub fn stats(&self) -> RelayStats {
        let s = &self.shared;
        RelayStats {
            accepted: s.accepted.load(Ordering::SeqCst),
            refused: s.refused.load(Ordering::SeqCst),
            active: s.active.load(Ordering::SeqCst),
            cuts: s.cuts.load(Ordering::SeqCst),
            pattern_cuts: s.pattern_cuts.load(Ordering::SeqCst),
            holds: s.holds.load(Ordering::SeqCst),
        }
    }
}

impl Drop for FaultRelay {
    fn drop(&mut self) {
        // The accept task owns the JoinSet of connection tasks; aborting it
        // drops the set, which aborts (and so closes) every connection.
        self.accept_task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    if matches!(*shared.fault().0, Fault::Refuse) {
                        shared.refused.fetch_add(1, Ordering::SeqCst);
                        drop(client);
                        continue;
                    }
                    shared.accepted.fetch_add(1, Ordering::SeqCst);
                    // Subscribed here, not in the task, so a `cut_all` right
                    // after accept still reaches this connection.
                    let cut_all = shared.cut_all.subscribe();
                    connections.spawn(relay_connection(client, shared.clone(), cut_all));
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "fault relay accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections so the set does not grow forever.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// How one direction of a connection ended.
enum End {
    /// The sender closed its side; the other direction may go on.
    Eof,
    /// A read or write failed; the connection is over.
    Broken,
    /// A fault closes the connection now.
    Cut,
    /// The pattern was forwarded; close once the server's reply is swallowed.
    CutAfterReply,
    /// A black hole: forward nothing more, close nothing.
    Hold,
}

/// Decrements the active gauge however the task ends (also when aborted).
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn relay_connection(
    client: TcpStream,
    shared: Arc<Shared>,
    mut cut_all: watch::Receiver<u64>,
) {
    shared.active.fetch_add(1, Ordering::SeqCst);
    let _active = ActiveGuard(shared.clone());
    let upstream = match TcpStream::connect(shared.upstream).await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::debug!(error = %e, "fault relay cannot reach upstream");
            return;
        }
    };
    // Small request/response packets: do not let Nagle add latency.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let swallow_reply = AtomicBool::new(false);

    let up = pump_up(client_read, upstream_write, &shared, &swallow_reply);
    let down = pump_down(upstream_read, client_write, &shared, &swallow_reply);
    tokio::pin!(up, down);
    let (mut up_open, mut down_open) = (true, true);
    let reply_deadline = tokio::time::sleep(REPLY_WAIT);
    tokio::pin!(reply_deadline);
    let mut awaiting_reply = false;
    let cut = loop {
        tokio::select! {
            end = &mut up, if up_open => match end {
                End::Eof => up_open = false,
                End::Broken => break false,
                End::Cut => break true,
                End::Hold => {
                    shared.holds.fetch_add(1, Ordering::SeqCst);
                    // The down pump keeps the server's socket open (and
                    // forwards nothing: an idle server sends nothing).
                    up_open = false;
                }
                End::CutAfterReply => {
                    up_open = false;
                    awaiting_reply = true;
                    reply_deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + REPLY_WAIT);
                }
            },
            end = &mut down, if down_open => match end {
                End::Eof if !awaiting_reply => down_open = false,
                End::Broken if !awaiting_reply => break false,
                _ => break true,
            },
            _ = cut_all.changed() => break true,
            () = &mut reply_deadline, if awaiting_reply => break true,
        }
        if !up_open && !down_open {
            break false;
        }
    };
    if cut {
        shared.cuts.fetch_add(1, Ordering::SeqCst);
        if swallow_reply.load(Ordering::SeqCst) {
            shared.pattern_cuts.fetch_add(1, Ordering::SeqCst);
        }
    }
    // Returning drops both pumps and with them all four socket halves:
    // the client and the server each see the connection close.
}

/// Client → server, where the byte and pattern faults apply.
async fn pump_up(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: &Shared,
    swallow_reply: &AtomicBool,
) -> End {
    let mut buf = vec![0u8; BUFFER];
    // (fault version, bytes still allowed) for CutAfterBytesUpstream.
    let mut budget: Option<(u64, u64)> = None;
    // (fault version, last pattern.len()-1 bytes) so a pattern split across
    // two reads is still found.
    let mut carry: (u64, Vec<u8>) = (u64::MAX, Vec::new());
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => {
                let _ = to.shutdown().await;
                return End::Eof;
            }
            Ok(n) => n,
            Err(_) => return End::Broken,
        };
        let data = &buf[..n];
        let (fault, version) = shared.fault();
        match &*fault {
            Fault::Pass | Fault::Refuse => {}
            Fault::Delay(delay) => tokio::time::sleep(*delay).await,
            Fault::CutAfterBytesUpstream(limit) => {
                let remaining = match budget {
                    Some((v, remaining)) if v == version => remaining,
                    _ => *limit,
                };
                let len = n as u64;
                if len >= remaining {
                    // `remaining < len <= BUFFER`, so the cast is lossless.
                    let _ = to.write_all(&data[..remaining as usize]).await;
                    return End::Cut;
                }
                budget = Some((version, remaining - len));
            }
            Fault::HoldOnPattern(pattern) => {
                if pattern_end(&mut carry, version, data, pattern).is_some()
                    && shared.claim_once(version)
                {
                    // No FIN to the server when this half goes.
                    to.forget();
                    return End::Hold;
                }
            }
            Fault::CutOnPattern { pattern, once } => {
                if let Some(end_in_data) = pattern_end(&mut carry, version, data, pattern)
                    && (!*once || shared.claim_once(version))
                {
                    // Set before the pattern leaves: the reply can only
                    // arrive after it, and the down pump checks the flag
                    // after each read.
                    swallow_reply.store(true, Ordering::SeqCst);
                    if to.write_all(&data[..end_in_data]).await.is_err() {
                        return End::Cut;
                    }
                    // Dropping the half normally sends FIN; the server must
                    // not see the client go away before it has answered.
                    to.forget();
                    return End::CutAfterReply;
                }
            }
        }
        if to.write_all(data).await.is_err() {
            return End::Broken;
        }
    }
}

/// Server → client: only delays apply, and the reply swallowing of a
/// pattern cut.
async fn pump_down(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: &Shared,
    swallow_reply: &AtomicBool,
) -> End {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => {
                let _ = to.shutdown().await;
                return End::Eof;
            }
            Ok(n) => n,
            Err(_) => return End::Broken,
        };
        if swallow_reply.load(Ordering::SeqCst) {
            return End::Cut;
        }
        if let Fault::Delay(delay) = *shared.fault().0 {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return End::Broken;
        }
    }
}

/// Looks for `pattern` in what a connection sent since the fault `version`
/// took effect, across reads (`carry` keeps the tail of the previous
/// ones): the index in `data` just past the match (0 when it ended in the
/// carried bytes).
fn pattern_end(
    carry: &mut (u64, Vec<u8>),
    version: u64,
    data: &[u8],
    pattern: &[u8],
) -> Option<usize> {
    if carry.0 != version {
        *carry = (version, Vec::new());
    }
    let mut window = std::mem::take(&mut carry.1);
    let carried = window.len();
    window.extend_from_slice(data);
    let found = find_end(&window, pattern).map(|end| end.saturating_sub(carried));
    let keep = pattern.len().saturating_sub(1);
    carry.1 = window[window.len().saturating_sub(keep)..].to_vec();
    found
}

/// The index just past the first occurrence of `pattern` in `haystack`.
fn find_end(haystack: &[u8], pattern: &[u8]) -> Option<usize> {
    if pattern.is_empty() {
        return None;
    }
    haystack
        .windows(pattern.len())
        .position(|w| w == pattern)
        .map(|start| start + pattern.len())
}

#[cfg(test)]
mod tests {
    use super::find_end;

    #[test]
    fn find_end_points_past_the_match() {
        assert_eq!(find_end(b"xxCOMMITyy", b"COMMIT"), Some(8));
        assert_eq!(find_end(b"COMMI", b"COMMIT"), None);
        assert_eq!(find_end(b"abc", b""), None);
    }
}
