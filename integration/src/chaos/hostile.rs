//! Hostile clients for `tally-chaos --hostile`, run next to the ledger's
//! writers for the whole soak: slow bodies (a trickle cut by
//! `min_body_rate`, a steady crawl cut by `body_read_timeout`), maximal
//! bodies (`limits.max_events` events in exactly `limits.max_body_bytes`,
//! and one byte or one event past), a stream of distinct 256-byte keys whose
//! ring positions collide in their low bits (one buffer shard), one counter's
//! events at every minute of the accepted window, and storms of strong
//! top-K reads.
//!
//! They write only to namespaces of their own, so the ledger of [`NS`] stays
//! exact. Refusals are their expected answers (408, 413, 400) and so is 503
//! (overloaded, or a group down during a fault), as are connections cut by
//! a fault: all are counted, none is an error. What is *unexpected* is a
//! bound that does not hold (a slow body not cut, an over-limit body
//! accepted, a maximal one refused, a 500) and a strong top-K answer of
//! [`NS`] above what was sent, or below what was acknowledged (committed
//! through either proxy, or buffered through proxy 1, which they target)
//! while one ready proxy life served it (a restarting proxy serves before its WAL
//! replay is done: those answers are tallied apart).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fastrand::Rng;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::sleep;

use super::{NS, WriterState};
use crate::Client;

/// Namespaces of the hostile clients (never the ledger's [`NS`]).
const NS_MAX: &str = "chaos_max";
const NS_KEYS: &str = "chaos_keys";
const NS_SPREAD: &str = "chaos_spread";

/// The longest key the proxy accepts (SPEC §1).
const KEY_BYTES: usize = 256;
/// Colliding keys agree in this many low bits of their ring position: the
/// buffer shard (the low 4) and the bucket of any table up to 4096 slots
/// indexed by the unkeyed hash.
const COLLIDING_BITS: u32 = 12;
/// New colliding keys per request, and the pause between requests.
const KEYS_PER_REQUEST: usize = 100;
const KEYS_PAUSE: Duration = Duration::from_secs(1);
/// Counters of the minute spreads (one request each, in turn).
const SPREAD_COUNTERS: usize = 3;
const SPREAD_PAUSE: Duration = Duration::from_secs(3);
const MAXIMAL_PAUSE: Duration = Duration::from_secs(2);
/// Clients per kind of slow body, and what they declare.
const TRICKLE_CLIENTS: usize = 4;
const CRAWL_CLIENTS: usize = 2;
const SLOW_DECLARED: usize = 4_000_000;
/// Concurrent strong top-K loops, and each one's pause.
const TOPK_STORMS: usize = 2;
const TOPK_PAUSE: Duration = Duration::from_millis(100);
/// Examples kept per kind of unexpected answers.
const EXAMPLES: usize = 5;

/// What a hostile client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HostileKind {
    /// One byte every 500 ms of a declared 4 MB body.
    TrickledBody,
    /// Twice `min_body_rate` of a declared 4 MB body.
    CrawlingBody,
    /// Bodies at the limits and one byte / one event past them.
    MaximalBody,
    /// Distinct longest keys whose ring positions share their low bits.
    CollidingKeys,
    /// One counter's events at distinct minutes over the whole window.
    MinuteSpread,
    /// Strong top-K reads in a loop, several at once.
    StrongTopK,
}

impl HostileKind {
    pub const ALL: [HostileKind; 6] = [
        HostileKind::TrickledBody,
        HostileKind::CrawlingBody,
        HostileKind::MaximalBody,
        HostileKind::CollidingKeys,
        HostileKind::MinuteSpread,
        HostileKind::StrongTopK,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HostileKind::TrickledBody => "slow body, 1 byte per 500 ms (cut by min_body_rate)",
            HostileKind::CrawlingBody => {
                "slow body, 2 x min_body_rate of 4 MB (cut by body_read_timeout)"
            }
            HostileKind::MaximalBody => "max_events in max_body_bytes; 1 byte past; 1 event past",
            HostileKind::CollidingKeys => {
                "distinct 256-byte keys, ring positions equal in the low 12 bits"
            }
            HostileKind::MinuteSpread => "a counter's events at every minute of events.max_age",
            HostileKind::StrongTopK => "strong top-K storm, limit 1000, ledger's and own ns",
        }
    }
}

/// One hostile kind's tally.
#[derive(Debug, Clone, Default)]
pub struct HostileStats {
    pub requests: u64,
    /// Answers by status (`"408"`), or `"no connection"` (refused: the
    /// proxy was restarting) and `"no answer"` (cut by a fault).
    pub answers: BTreeMap<String, u64>,
    /// Answers that break a bound or a promise (see the module notes).
    pub unexpected: u64,
    /// The first few of them.
    pub examples: Vec<String>,
    /// Strong top-K answers of the ledger's namespace checked against it
    /// (read while one ready proxy life served).
    pub ledger_checked: u64,
    /// Those read while the proxy was restarting (a stop or kill until the
    /// next life answered `/readyz`), and how many of them were below what
    /// was acknowledged: the data listener serves before the WAL replay is
    /// done. Never above what was sent (that is always unexpected).
    pub unready_reads: u64,
    pub unready_below_ledger: u64,
}

impl HostileStats {
    /// How many requests got `answer` (`"200"`, `"no answer"`, ...).
    pub fn answered(&self, answer: &str) -> u64 {
        self.answers.get(answer).copied().unwrap_or(0)
    }
}

/// What a request came to.
enum Outcome {
    Status(u16),
    NoConnection,
    NoAnswer,
}

/// The proxy's bounds the clients aim at, from the config it runs with.
#[derive(Debug, Clone)]
pub(super) struct Limits {
    max_events: usize,
    max_body_bytes: usize,
    max_age: Duration,
    body_read_timeout: Duration,
    min_body_rate: u64,
}

impl Limits {
    pub(super) fn of(cfg: &tally_proxy::ProxyConfig) -> Limits {
        Limits {
            max_events: cfg.limits.max_events,
            max_body_bytes: cfg.limits.max_body_bytes,
            max_age: cfg.events.max_age,
            body_read_timeout: cfg.connections.body_read_timeout,
            min_body_rate: cfg.connections.min_body_rate,
        }
    }
}

/// What the hostile tasks share.
struct Ctx {
    addr: SocketAddr,
    limits: Limits,
    seed: u64,
    /// When the clients started (the examples say when, to be matched with
    /// the fault turns' log lines).
    started: Instant,
    stop: AtomicBool,
    stats: Mutex<BTreeMap<HostileKind, HostileStats>>,
    /// The writers' ledger, to check strong top-K answers of [`NS`].
    ledger: Arc<WriterState>,
    /// The proxy's lives: odd while it restarts (`ProxyProc::lives`).
    lives: Arc<AtomicU64>,
}

impl Ctx {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Counts one request. `expected` are the statuses it should get; a 503
    /// and a connection refused or cut (faults) are always acceptable.
    fn record(&self, kind: HostileKind, outcome: Outcome, expected: &[u16], what: &str) {
        let mut stats = self.stats.lock().expect("hostile stats");
        let s = stats.entry(kind).or_default();
        s.requests += 1;
        let label = match outcome {
            Outcome::Status(code) => {
                if code != 503 && !expected.contains(&code) {
                    s.unexpected += 1;
                    if s.examples.len() < EXAMPLES {
                        s.examples.push(format!(
                            "{:.1}s: {what}: answered {code}, expected {expected:?}",
                            self.started.elapsed().as_secs_f64()
                        ));
                    }
                }
                code.to_string()
            }
            Outcome::NoConnection => "no connection".into(),
            Outcome::NoAnswer => "no answer".into(),
        };
        *s.answers.entry(label).or_default() += 1;
    }

    /// An answer that breaks a promise beyond its status.
    fn unexpected(&self, kind: HostileKind, why: String) {
        let mut stats = self.stats.lock().expect("hostile stats");
        let s = stats.entry(kind).or_default();
        s.unexpected += 1;
        if s.examples.len() < EXAMPLES {
            s.examples.push(format!(
                "{:.1}s: {why}",
                self.started.elapsed().as_secs_f64()
            ));
        }
    }

    /// Sends a request and records its outcome.
    async fn send(
        &self,
        kind: HostileKind,
        req: reqwest::RequestBuilder,
        expected: &[u16],
        what: &str,
    ) -> Option<Value> {
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp.bytes().await.ok();
                self.record(kind, Outcome::Status(status), expected, what);
                (status == 200)
                    .then(|| body.and_then(|b| serde_json::from_slice(&b).ok()))
                    .flatten()
            }
            Err(e) if e.is_connect() => {
                self.record(kind, Outcome::NoConnection, expected, what);
                sleep(Duration::from_millis(200)).await;
                None
            }
            Err(_) => {
                self.record(kind, Outcome::NoAnswer, expected, what);
                sleep(Duration::from_millis(200)).await;
                None
            }
        }
    }
}

/// The running hostile clients.
pub(super) struct Hostile {
    ctx: Arc<Ctx>,
    tasks: Vec<JoinHandle<()>>,
}

impl Hostile {
    /// Starts every hostile client against the proxy listening on `http`.
    pub(super) fn start(
        seed: u64,
        http: u16,
        limits: Limits,
        ledger: Arc<WriterState>,
        lives: Arc<AtomicU64>,
    ) -> Hostile {
        let ctx = Arc::new(Ctx {
            addr: SocketAddr::from(([127, 0, 0, 1], http)),
            limits,
            seed,
            started: Instant::now(),
            stop: AtomicBool::new(false),
            stats: Mutex::new(BTreeMap::new()),
            ledger,
            lives,
        });
        let mut tasks = Vec::new();
        // A trickle: far below any rate, cut once the grace has passed.
        for _ in 0..TRICKLE_CLIENTS {
            let pace = Pace {
                kind: HostileKind::TrickledBody,
                bytes: 1,
                every: Duration::from_millis(500),
            };
            tasks.push(tokio::spawn(slow_bodies(ctx.clone(), pace)));
        }
        // A crawl: fast enough for the rate, too slow for the deadline.
        let rate = usize::try_from(ctx.limits.min_body_rate.max(512)).unwrap_or(usize::MAX);
        for _ in 0..CRAWL_CLIENTS {
            let pace = Pace {
                kind: HostileKind::CrawlingBody,
                bytes: rate,
                every: Duration::from_millis(500),
            };
            tasks.push(tokio::spawn(slow_bodies(ctx.clone(), pace)));
        }
        tasks.push(tokio::spawn(maximal_bodies(ctx.clone())));
        tasks.push(tokio::spawn(colliding_keys(ctx.clone())));
        tasks.push(tokio::spawn(minute_spreads(ctx.clone())));
        for i in 0..TOPK_STORMS {
            tasks.push(tokio::spawn(top_k_storm(ctx.clone(), i)));
        }
        Hostile { ctx, tasks }
    }

    /// Stops the clients (each finishes the request it is in) and returns
    /// their tally.
    pub(super) async fn stop(self) -> BTreeMap<HostileKind, HostileStats> {
        self.ctx.stop.store(true, Ordering::Relaxed);
        for mut task in self.tasks {
            if tokio::time::timeout(Duration::from_secs(90), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        self.ctx.stats.lock().expect("hostile stats").clone()
    }
}

/// How a slow client sends its body.
#[derive(Clone, Copy)]
struct Pace {
    kind: HostileKind,
    bytes: usize,
    every: Duration,
}

/// What became of one slow body.
enum Trickled {
    Answered(u16),
    Cut,
    /// Still being read after this long: the body bounds did not hold.
    NotCut(Duration),
    Stopped,
}

/// A raw TCP client that sends the head of `POST /v1/events` declaring
/// [`SLOW_DECLARED`] bytes and then its body at `pace`, until the proxy
/// answers (408 expected) or cuts; then it connects again.
async fn slow_bodies(ctx: Arc<Ctx>, pace: Pace) {
    // Twice the deadline and some: a loaded machine may be late, a proxy
    // that does not bound bodies never answers.
    let give_up = ctx.limits.body_read_timeout * 2 + Duration::from_secs(5);
    let what = format!("a slow body ({} bytes every {:?})", pace.bytes, pace.every);
    while !ctx.stopped() {
        let Ok(mut stream) = TcpStream::connect(ctx.addr).await else {
            ctx.record(pace.kind, Outcome::NoConnection, &[408], &what);
            sleep(Duration::from_millis(200)).await;
            continue;
        };
        let head = format!(
            "POST /v1/events HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
             content-length: {SLOW_DECLARED}\r\n\r\n",
            ctx.addr
        );
        match trickle(&mut stream, head.as_bytes(), pace, give_up, &ctx.stop).await {
            Trickled::Answered(code) => ctx.record(pace.kind, Outcome::Status(code), &[408], &what),
            Trickled::Cut => ctx.record(pace.kind, Outcome::NoAnswer, &[408], &what),
            Trickled::NotCut(after) => {
                ctx.record(pace.kind, Outcome::NoAnswer, &[408], &what);
                ctx.unexpected(
                    pace.kind,
                    format!("{what} was still being read after {after:?}"),
                );
            }
            Trickled::Stopped => break,
        }
    }
}

async fn trickle(
    stream: &mut TcpStream,
    head: &[u8],
    pace: Pace,
    give_up: Duration,
    stop: &AtomicBool,
) -> Trickled {
    if stream.write_all(head).await.is_err() {
        return Trickled::Cut;
    }
    let filler = vec![b' '; pace.bytes];
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let mut writing = true;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Trickled::Stopped;
        }
        if started.elapsed() > give_up {
            return Trickled::NotCut(started.elapsed());
        }
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(n) if n > 0 => {
                    answer.extend_from_slice(&buf[..n]);
                    if let Some(code) = status_of(&answer) {
                        return Trickled::Answered(code);
                    }
                }
                _ => return status_of(&answer).map_or(Trickled::Cut, Trickled::Answered),
            },
            _ = sleep(pace.every) => {
                // After a failed write the answer may still be readable.
                if writing && stream.write_all(&filler).await.is_err() {
                    writing = false;
                }
            }
        }
    }
}

/// The status code of an HTTP/1.1 answer, once its status line is complete.
fn status_of(answer: &[u8]) -> Option<u16> {
    let line_end = answer.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&answer[..line_end]).ok()?;
    line.split(' ').nth(1)?.parse().ok()
}

/// Bodies at the limits: `max_events` events of the longest keys padded
/// with whitespace to exactly `max_body_bytes` (200), the same one byte
/// longer (413), and `max_events + 1` small events (413), in turn.
async fn maximal_bodies(ctx: Arc<Ctx>) {
    let limits = ctx.limits.clone();
    let Ok((at_limit, byte_past, event_past)) = tokio::task::spawn_blocking(move || {
        (
            maximal_body(limits.max_events, limits.max_body_bytes),
            maximal_body(limits.max_events, limits.max_body_bytes + 1),
            too_many_events(limits.max_events + 1),
        )
    })
    .await
    else {
        return;
    };
    let client = Client::new();
    let url = ctx.url("/v1/events");
    let bodies = [
        (at_limit, 200, "a body at max_events and max_body_bytes"),
        (byte_past, 413, "a body one byte past max_body_bytes"),
        (event_past, 413, "a body one event past max_events"),
    ];
    for i in 0.. {
        if ctx.stopped() {
            break;
        }
        let (body, expected, what) = &bodies[i % bodies.len()];
        let req = client
            .raw()
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone());
        ctx.send(HostileKind::MaximalBody, req, &[*expected], what)
            .await;
        sleep(MAXIMAL_PAUSE).await;
    }
}

/// A JSON array of at most `max_events` events (keys of [`KEY_BYTES`],
/// sixteen distinct ones so the aggregate stays small) padded with
/// whitespace to exactly `bytes`.
fn maximal_body(max_events: usize, bytes: usize) -> Bytes {
    let mut body = String::with_capacity(bytes);
    body.push('[');
    for i in 0..max_events {
        let mut key = format!("m{:02}-", i % 16);
        key.extend(std::iter::repeat_n('y', KEY_BYTES - key.len()));
        let event = format!(r#"{{"ns":"{NS_MAX}","key":"{key}","delta":1}}"#);
        let sep = usize::from(i > 0);
        if body.len() + sep + event.len() + 1 > bytes {
            break;
        }
        if sep == 1 {
            body.push(',');
        }
        body.push_str(&event);
    }
    let pad = bytes.saturating_sub(body.len() + 1);
    body.extend(std::iter::repeat_n(' ', pad));
    body.push(']');
    Bytes::from(body)
}

/// A JSON array of `n` small events.
fn too_many_events(n: usize) -> Bytes {
    let event = format!(r#"{{"ns":"{NS_MAX}","key":"e","delta":1}}"#);
    let mut body = String::from("[");
    body += &vec![event; n].join(",");
    body.push(']');
    Bytes::from(body)
}

/// New keys all the time: [`KEYS_PER_REQUEST`] distinct keys of the longest
/// length per request, every one with the same low [`COLLIDING_BITS`] bits
/// of its ring position (an unkeyed hash anyone can compute), so they all
/// land in one of a group buffer's shards.
async fn colliding_keys(ctx: Arc<Ctx>) {
    let client = Client::new();
    let url = ctx.url("/v1/events");
    let low = Rng::with_seed(ctx.seed ^ 0xC011).u64(..) & ((1 << COLLIDING_BITS) - 1);
    let mut next = 0u64;
    while !ctx.stopped() {
        let first = next;
        next += KEYS_PER_REQUEST as u64;
        let Ok(body) = tokio::task::spawn_blocking(move || {
            let events: Vec<String> = (first..first + KEYS_PER_REQUEST as u64)
                .map(|n| {
                    let key = colliding_key(NS_KEYS, n, low);
                    format!(r#"{{"ns":"{NS_KEYS}","key":"{key}","delta":1}}"#)
                })
                .collect();
            format!("[{}]", events.join(","))
        })
        .await
        else {
            return;
        };
        let req = client
            .raw()
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        ctx.send(
            HostileKind::CollidingKeys,
            req,
            &[200],
            "a batch of new colliding keys",
        )
        .await;
        sleep(KEYS_PAUSE).await;
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// FNV-1a over `bytes`, continuing from `hash`.
fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// The `n`th key of [`KEY_BYTES`] bytes in `ns` whose ring position (FNV-1a
/// of the routing key as `Hash` feeds it: its length, then its bytes) has
/// `low` in its low [`COLLIDING_BITS`] bits. The hash of everything but the
/// last four characters is computed once; only those are searched.
fn colliding_key(ns: &str, n: u64, low: u64) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
    let mut key = format!("c{n:012}-");
    key.extend(std::iter::repeat_n('x', KEY_BYTES - 4 - key.len()));
    let routing_len = ns.len() + 1 + KEY_BYTES;
    let mut prefix = fnv(FNV_OFFSET, &routing_len.to_ne_bytes());
    prefix = fnv(prefix, ns.as_bytes());
    prefix = fnv(prefix, &[0]);
    prefix = fnv(prefix, key.as_bytes());
    let mask = (1u64 << COLLIDING_BITS) - 1;
    for i in 0..64u32.pow(4) {
        let suffix = [0, 6, 12, 18].map(|shift| ALPHABET[(i >> shift) as usize & 63]);
        if fnv(prefix, &suffix) & mask == low {
            key.extend(suffix.map(char::from));
            return key;
        }
    }
    unreachable!("16M suffixes and none of them hits 12 bits")
}

/// Events of one counter at distinct minutes spread over the whole
/// accepted window (`now - events.max_age` to now), `max_events` per
/// request, the counters in turn; every other round also an event just
/// older than the window (400 `ts_out_of_range`).
async fn minute_spreads(ctx: Arc<Ctx>) {
    let client = Client::new();
    let url = ctx.url("/v1/events");
    let max_age = i64::try_from(ctx.limits.max_age.as_secs()).unwrap_or(i64::MAX / 2);
    let max_events = ctx.limits.max_events;
    for round in 0usize.. {
        if ctx.stopped() {
            break;
        }
        let counter = format!("s{}", round % SPREAD_COUNTERS);
        let now = unix_now();
        let Ok(body) =
            tokio::task::spawn_blocking(move || spread_body(&counter, now, max_age, max_events))
                .await
        else {
            return;
        };
        let req = client
            .raw()
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        ctx.send(
            HostileKind::MinuteSpread,
            req,
            &[200],
            "a counter's events over the whole window",
        )
        .await;
        if round % 2 == 1 {
            let late = serde_json::json!({
                "ns": NS_SPREAD, "key": "s0", "delta": 1, "ts": now - max_age - 3600
            });
            let req = client.raw().post(&url).json(&late);
            ctx.send(
                HostileKind::MinuteSpread,
                req,
                &[400],
                "an event an hour older than events.max_age",
            )
            .await;
        }
        sleep(SPREAD_PAUSE).await;
    }
}

/// The events of `counter` at `min(max_events, minutes in the window)`
/// distinct minutes from the second-oldest whole minute of the window
/// (so it stays inside for a minute) to the current one, evenly spread.
fn spread_body(counter: &str, now: i64, max_age: i64, max_events: usize) -> String {
    let oldest = ((now - max_age).div_euclid(60) + 2) * 60;
    let newest = now - now.rem_euclid(60);
    let minutes = ((newest - oldest) / 60 + 1).max(1) as usize;
    let n = max_events.min(minutes).max(1);
    let events: Vec<String> = (0..n)
        .map(|i| {
            let step = if n > 1 {
                i * (minutes - 1) / (n - 1)
            } else {
                0
            };
            let ts = oldest + step as i64 * 60;
            format!(r#"{{"ns":"{NS_SPREAD}","key":"{counter}","delta":1,"ts":{ts}}}"#)
        })
        .collect();
    format!("[{}]", events.join(","))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Strong top-K reads of the largest `limit`, one after another with a
/// short pause, over the ledger's namespace and the hostile ones (the minute
/// spreads over their whole window). An answer of [`NS`] is checked against
/// the ledger: every key at least what was acknowledged before the read
/// went out, at most what was sent once it came back.
async fn top_k_storm(ctx: Arc<Ctx>, i: usize) {
    let client = Client::new();
    let max_age = i64::try_from(ctx.limits.max_age.as_secs()).unwrap_or(i64::MAX / 2);
    let limit = tally_proxy::testing::MAX_TOP;
    let namespaces = [NS, NS_KEYS, NS_SPREAD, NS_MAX];
    for round in i.. {
        if ctx.stopped() {
            break;
        }
        let ns = namespaces[round % namespaces.len()];
        let range = if ns == NS_SPREAD {
            let now = unix_now();
            format!("&from={}&to={}", now - max_age, now + 60)
        } else {
            String::new()
        };
        let url = ctx.url(&format!(
            "/v1/top/{ns}?consistency=strong&limit={limit}{range}"
        ));
        let life = ctx.lives.load(Ordering::SeqCst);
        // Buffered writes through proxy 2 are pending there: a strong read
        // through proxy 1 counts only what it must see.
        let acked_before = (ns == NS).then(|| ledger_column(&ctx.ledger, |e| e.acked_first));
        let what = format!("strong top-K of {ns}");
        let asked = Instant::now();
        let answer = ctx
            .send(
                HostileKind::StrongTopK,
                client.raw().get(&url),
                &[200],
                &what,
            )
            .await;
        if let (Some(acked), Some(answer)) = (acked_before, answer) {
            let sent = ledger_column(&ctx.ledger, |e| e.sent);
            let ready = life.is_multiple_of(2) && ctx.lives.load(Ordering::SeqCst) == life;
            let read = LedgerRead {
                acked: &acked,
                sent: &sent,
                took: asked.elapsed(),
                ready,
            };
            check_against_ledger(&ctx, &answer, read);
        }
        sleep(TOPK_PAUSE).await;
    }
}

/// One column of the writers' ledger, by key.
fn ledger_column(
    ledger: &WriterState,
    column: impl Fn(&super::LedgerEntry) -> i64,
) -> BTreeMap<String, i64> {
    let ledger = ledger.ledger.lock().expect("ledger");
    ledger.iter().map(|(k, e)| (k.clone(), column(e))).collect()
}

/// A strong top-K read of [`NS`] and the ledger around it.
struct LedgerRead<'a> {
    /// Acknowledged before the read went out.
    acked: &'a BTreeMap<String, i64>,
    /// Sent when its answer was back.
    sent: &'a BTreeMap<String, i64>,
    took: Duration,
    /// One proxy life, ready before the read went out, served it.
    ready: bool,
}

/// `acked ≤ count ≤ sent` for every key of the writers' ledger in a strong
/// top-K answer of [`NS`] (its limit exceeds the ledger's keys, so a key
/// missing from the answer counts 0). Keys written by fault turns are not
/// in the writers' ledger and not checked. A restarting proxy serves before
/// its WAL replay is done, so an answer below the ledger is tallied apart
/// when the read overlapped a restart.
fn check_against_ledger(ctx: &Ctx, answer: &Value, read: LedgerRead<'_>) {
    let LedgerRead {
        acked,
        sent,
        took,
        ready,
    } = read;
    let Some(items) = answer["items"].as_array() else {
        ctx.unexpected(
            HostileKind::StrongTopK,
            format!("a strong top-K answer of {NS} without items: {answer}"),
        );
        return;
    };
    let counts: BTreeMap<&str, i64> = items
        .iter()
        .filter_map(|it| Some((it["key"].as_str()?, it["count"].as_i64()?)))
        .collect();
    let mut under = Vec::new();
    for (key, acked) in acked {
        let count = counts.get(key.as_str()).copied().unwrap_or(0);
        if count < *acked {
            under.push((key.as_str(), count, *acked));
        }
    }
    let mut over = Vec::new();
    for (key, count) in &counts {
        if let Some(sent) = sent.get(*key)
            && count > sent
        {
            over.push((*key, *count, *sent));
        }
    }
    if !ready {
        let mut stats = ctx.stats.lock().expect("hostile stats");
        let s = stats.entry(HostileKind::StrongTopK).or_default();
        s.unready_reads += 1;
        s.unready_below_ledger += u64::from(!under.is_empty());
        under.clear();
    }
    let mut problems = Vec::new();
    if let Some((key, count, acked)) = under.first() {
        let short: i64 = under.iter().map(|(_, c, a)| a - c).sum();
        problems.push(format!(
            "{} keys below what was acknowledged before the read, {short} in all \
             (first {key}: {count} < {acked})",
            under.len()
        ));
    }
    if let Some((key, count, sent)) = over.first() {
        let extra: i64 = over.iter().map(|(_, c, s)| c - s).sum();
        problems.push(format!(
            "{} keys above what was sent, {extra} in all (first {key}: {count} > {sent})",
            over.len()
        ));
    }
    if problems.is_empty() && ready {
        let mut stats = ctx.stats.lock().expect("hostile stats");
        stats
            .entry(HostileKind::StrongTopK)
            .or_default()
            .ledger_checked += 1;
    } else if !problems.is_empty() {
        ctx.unexpected(
            HostileKind::StrongTopK,
            format!(
                "a strong top-K of {NS} (read in {took:?}) outside the ledger: {}",
                problems.join("; ")
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colliding_keys_are_distinct_longest_keys_with_the_same_low_ring_bits() {
        let low = 0xabc;
        let keys: Vec<String> = (0..50).map(|n| colliding_key(NS_KEYS, n, low)).collect();
        let distinct: std::collections::BTreeSet<&String> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len());
        for key in &keys {
            assert_eq!(key.len(), KEY_BYTES, "{key}");
            let pos = tally_admin::ShardRing::position(&tally_admin::routing_key(NS_KEYS, key));
            assert_eq!(pos & ((1 << COLLIDING_BITS) - 1), low, "{key}");
        }
    }

    #[test]
    fn a_maximal_body_is_exactly_at_both_limits_and_parses() {
        let body = maximal_body(10_000, 8 << 20);
        assert_eq!(body.len(), 8 << 20);
        let events: Vec<Value> = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(events.len(), 10_000);
        assert_eq!(events[0]["key"].as_str().map(str::len), Some(KEY_BYTES));
        // When the bytes run out first, the body holds what fits.
        let small = maximal_body(10_000, 100_000);
        assert_eq!(small.len(), 100_000);
        let events: Vec<Value> = serde_json::from_slice(&small).expect("JSON");
        assert!(events.len() < 10_000 && !events.is_empty());
    }

    #[test]
    fn a_spread_covers_the_window_at_distinct_minutes_inside_it() {
        let (now, max_age) = (1_700_000_030, 7 * 86_400);
        let events: Vec<Value> =
            serde_json::from_str(&spread_body("s0", now, max_age, 10_000)).expect("JSON");
        let ts: Vec<i64> = events.iter().filter_map(|e| e["ts"].as_i64()).collect();
        assert_eq!(ts.len(), 10_000);
        assert!(ts.windows(2).all(|w| w[0] < w[1]), "ascending, distinct");
        assert!(ts.iter().all(|t| t % 60 == 0));
        assert!(ts[0] >= now - max_age + 60, "a minute inside the window");
        assert!(ts[0] < now - max_age + 180, "from its oldest minutes");
        assert_eq!(*ts.last().expect("events"), now - now % 60);
    }

    #[test]
    fn a_status_line_is_read_once_complete() {
        assert_eq!(status_of(b"HTTP/1.1 408 Request Timeout\r\n"), Some(408));
        assert_eq!(status_of(b"HTTP/1.1 40"), None);
        assert_eq!(status_of(b""), None);
    }
}
