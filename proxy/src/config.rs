//! Process settings from `proxy.yaml`: YAML → raw struct → validated
//! [`ProxyConfig`], with every problem reported at once.
//!
//! The raw layer keeps durations and addresses as text so that a bad value is
//! a collected problem rather than an abort at the first mistake. Environment
//! variables `TALLY__SECTION__FIELD=value` override any setting (the value is
//! read as YAML, so `TALLY__BUFFER__FLUSH_INTERVAL=2s` and
//! `TALLY__LIMITS__MAX_EVENTS=500` both work); an override naming an unknown
//! setting is a problem like an unknown key in the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::sign::CertifiedKey;

use serde::Deserialize;
use serde_yaml_ng::Value;
use tally_admin::{Dsn, Invalid, Problems, yaml};

/// Prefix of environment overrides; sections are separated by `__`.
pub const ENV_PREFIX: &str = "TALLY__";

pub const DEFAULT_HTTP: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9090";
pub const DEFAULT_TOKEN_ENV: &str = "TALLY_ADMIN_TOKEN";

/// The validated process settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub http_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// HTTPS on the data listener (`listen.http_tls`, else `listen.tls`);
    /// `None`: plain HTTP.
    pub http_tls: Option<TlsConfig>,
    /// HTTPS on the admin listener (`listen.admin_tls`, else `listen.tls`).
    pub admin_tls: Option<TlsConfig>,
    /// Name of the environment variable holding the admin bearer token.
    pub admin_token_env: String,
    /// The admin bearer token, read from `admin_token_env` by [`ProxyConfig::load`].
    pub admin_token: Option<Secret>,
    /// Absolute, or relative to the directory of `proxy.yaml`.
    pub topology_file: PathBuf,
    /// How often the topology file is checked for changes.
    pub topology_watch_interval: Duration,
    /// The shared topology store (`mysql://…/tally_meta`); `None` = the file.
    pub topology_store: Option<Dsn>,
    /// How often the store is polled for a newer version.
    pub store_poll_interval: Duration,
    /// How often this proxy's registry row is refreshed.
    pub heartbeat_interval: Duration,
    /// A proxy whose last heartbeat is older than this is taken for gone
    /// (a reshard stops waiting for it); this proxy refuses writes after
    /// [`ProxyConfig::store_fence_after`] without reaching the store.
    pub store_alive_window: Duration,
    /// Identity used in the `(writer_id, seq)` dedup rows; random when unset.
    pub writer_id: Option<String>,
    pub buffer: BufferConfig,
    pub events: EventsConfig,
    pub limits: LimitsConfig,
    pub retention: RetentionConfig,
    pub idempotency: IdempotencyConfig,
    pub rollup: RollupConfig,
    pub reads: ReadsConfig,
    pub health: HealthConfig,
    pub failover: FailoverConfig,
    pub pool: PoolConfig,
    pub reshard: ReshardConfig,
    pub connections: ConnectionsConfig,
    /// `durability: wal`: the write-ahead log; `None` = `durability: memory`.
    pub wal: Option<WalConfig>,
    pub shutdown: ShutdownConfig,
}

/// What a stop (SIGTERM) may wait for.
#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    /// How long the data listener's requests in progress may take to
    /// finish once a stop began; past it they are cut (their connections
    /// closed without an answer) and the final flush starts.
    pub drain_deadline: Duration,
    /// How long the final flush may take after the data listener closed
    /// (the admin listener serves until then, so a dead master can be
    /// replaced by a promotion). `None`: until everything is committed.
    pub flush_deadline: Option<Duration>,
}

/// The write-ahead log of `durability: wal` (see `crate::storage::wal`).
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Absolute, or relative to the directory of `proxy.yaml`. One proxy
    /// process per directory (locked).
    pub dir: PathBuf,
    /// A segment is closed once it holds about this many bytes.
    pub segment_bytes: u64,
    /// Writes get 503 `overloaded` while segments not yet deletable hold
    /// this many bytes.
    pub max_bytes: u64,
    /// How long start waits for the replay of earlier logs before serving
    /// (it continues in the background after that).
    pub replay_wait: Duration,
}

/// A value that must never be logged; `Debug` prints `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, Clone)]
pub struct BufferConfig {
    /// A batch is cut at most this long after the previous one committed.
    pub flush_interval: Duration,
    /// A batch is cut early once a group holds this many pending entries.
    pub flush_rows: usize,
    /// Rows per flush transaction at most: a larger batch of plain events
    /// is applied in several exactly-once transactions, one after the
    /// other, so the replicas apply one while the master writes the next
    /// (0: one transaction per batch).
    pub transaction_rows: usize,
    /// Per-group bound on pending (counter, minute) entries and events with
    /// an id together; beyond it writes routed to that group wait
    /// (`admission_wait`), then get 503.
    pub max_pending_rows: usize,
    /// How long a flush waits for more writes when `ack=committed` waiters exist.
    pub commit_linger: Duration,
    /// How long `ack=committed` waits before answering 504.
    pub commit_timeout: Duration,
    /// How long a write that finds a target group's buffer full waits for
    /// that group's flush to make room before it is answered 503 (0:
    /// refused at once). A group whose last flush attempt failed refuses
    /// at once whatever this is.
    pub admission_wait: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
}

#[derive(Debug, Clone)]
pub struct EventsConfig {
    pub max_age: Duration,
    pub max_future: Duration,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub max_events: usize,
    pub max_body_bytes: usize,
}

/// `None` keeps a tier forever.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    pub minute: Option<Duration>,
    pub hour: Option<Duration>,
    pub day: Option<Duration>,
    /// Pause between retention passes.
    pub interval: Duration,
    /// Rows per DELETE statement: small, so a pass never holds long locks.
    pub chunk_rows: usize,
}

/// The rollup of minute rows into hour and day rows (`rollup.*`).
#[derive(Debug, Clone)]
pub struct RollupConfig {
    /// Whether this proxy rolls up at all (every proxy does by default;
    /// one roller per group is enough, and any number is safe).
    pub enabled: bool,
    /// Pause between two looks at each group's watermark (a look rolls up
    /// every closed hour it finds, one transaction per hour).
    pub interval: Duration,
    /// An hour is rolled up once it ended this long ago: events of a
    /// closed hour that arrive later take the late path (their flush also
    /// writes hour and day rows), which costs more rows.
    pub delay: Duration,
}

/// Idempotent increments (`idempotency.*`).
#[derive(Debug, Clone)]
pub struct IdempotencyConfig {
    /// How long an event id is remembered per counter: a copy within it is
    /// a duplicate, one after it a new event. Retention deletes older id
    /// rows (in `retention.chunk_rows` chunks, every `retention.interval`).
    pub window: Duration,
}

/// Online resharding (`reshard.*`): how fast rows are copied and how
/// carefully the sources are cleaned up.
#[derive(Debug, Clone)]
pub struct ReshardConfig {
    /// How often the driver looks for work (and retries a failed step).
    pub poll_interval: Duration,
    /// Counters per copy transaction (every row of theirs, all tiers).
    pub chunk_counters: usize,
    /// Copy throttle, in rows per second over all tiers.
    pub max_rows_per_sec: usize,
    /// Adaptive throttle: while the p99 of this proxy's requests over the
    /// last second exceeds this multiple of their p99 before the reshard,
    /// the copy rate halves (down to `min_rows_per_sec`); otherwise it
    /// climbs back by a tenth of `max_rows_per_sec` per step. `None`: a
    /// fixed `max_rows_per_sec`.
    pub adaptive_ratio: Option<f64>,
    /// The adaptive throttle's floor, in rows per second.
    pub min_rows_per_sec: usize,
    /// Wait between verification and deleting the sources' moved rows, for
    /// reads that looked at a target before its last copy committed.
    pub cleanup_grace: Duration,
    /// Rows per cleanup DELETE.
    pub delete_rows: usize,
}

#[derive(Debug, Clone)]
pub struct ReadsConfig {
    pub max_replica_lag: Duration,
    /// Concurrent eventual point reads of one group gathered into one
    /// statement (`None`: off, one statement per read).
    pub coalesce: Option<CoalesceConfig>,
    /// The bounded-staleness cache of eventual totals (`None`: off).
    pub cache: Option<ReadCacheConfig>,
}

/// `reads.coalesce`: how eventual point reads are gathered per group.
#[derive(Debug, Clone)]
pub struct CoalesceConfig {
    /// Keys one statement asks at most.
    pub max_batch: usize,
    /// Statements of one group and kind (total, or one range) in flight at
    /// once; reads arriving meanwhile wait and go in the next statement.
    pub max_in_flight: usize,
    /// How long a statement waits for more reads before it is sent (0:
    /// only the reads already waiting go in it).
    pub window: Duration,
}

/// `reads.cache`: eventual totals kept for at most `max_age`.
#[derive(Debug, Clone)]
pub struct ReadCacheConfig {
    pub max_age: Duration,
    pub max_entries: usize,
    pub max_bytes: usize,
}

/// `failover.mode: auto` promotes a replica when the master failed `after`
/// health probes in a row.
#[derive(Debug, Clone)]
pub struct FailoverConfig {
    pub auto: bool,
    pub after: u32,
    /// How long a promotion keeps trying to reach the master (a fresh
    /// admin connection and `SELECT 1`) before it takes it for gone. A
    /// master that answers within it is fenced (`read_only`, the data
    /// user's sessions ended) and the switchover is planned; only one that
    /// never answers is left out (emergency), so a merely slow master is
    /// never left writable next to a new one.
    pub unreachable_after: Duration,
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
}

/// Limits on client connections, applied to each listener (data and admin)
/// separately, so a flood on one never locks operators out of the other.
#[derive(Debug, Clone)]
pub struct ConnectionsConfig {
    /// Open connections per listener; one more is answered 503 and closed.
    pub max_per_listener: usize,
    /// From the first byte of a request (for a new connection: from accept)
    /// until its headers are complete; a slower client is disconnected.
    pub header_read_timeout: Duration,
    /// A keep-alive connection waiting for its next request is closed
    /// after this long.
    pub idle_timeout: Duration,
    /// Request line plus headers; larger ones are answered 431 and closed.
    pub max_header_bytes: usize,
    /// A request's whole body must arrive within this, counted from the
    /// end of its head; else it is answered 408 and the connection closed.
    pub body_read_timeout: Duration,
    /// Bytes per second a request body must average from the end of its
    /// head, once `body_rate_grace` has passed; else 408 and closed.
    /// 0: no rate, only `body_read_timeout`.
    pub min_body_rate: u64,
    /// How long a body may arrive at any rate before `min_body_rate`
    /// applies (a small body sent in a few slow segments is never cut).
    pub body_rate_grace: Duration,
    /// Bytes of request bodies the listener's requests may hold at once
    /// (read and not yet answered), over all its connections; a body that
    /// would pass it is answered 503 `overloaded` with `Retry-After`.
    pub max_body_bytes_in_flight: usize,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub min: usize,
    pub max: usize,
    pub connect_timeout: Duration,
}

// ---- raw layer -------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(default)]
struct Raw {
    listen: RawListen,
    admin: RawAdmin,
    topology: RawTopology,
    writer_id: Option<String>,
    buffer: RawBuffer,
    events: RawEvents,
    limits: RawLimits,
    retention: RawRetention,
    idempotency: RawIdempotency,
    rollup: RawRollup,
    reads: RawReads,
    health: RawHealth,
    failover: RawFailover,
    pool: RawPool,
    reshard: RawReshard,
    connections: RawConnections,
    durability: RawDurability,
    wal: RawWal,
    shutdown: RawShutdown,
}

#[derive(Deserialize)]
#[serde(default)]
struct RawShutdown {
    drain_deadline: String,
    /// A duration, or absent (the default): no deadline.
    flush_deadline: Option<String>,
}

impl Default for RawShutdown {
    fn default() -> Self {
        Self {
            drain_deadline: "30s".into(),
            flush_deadline: None,
        }
    }
}

impl RawShutdown {
    fn validate(self, p: &mut Problems) -> ShutdownConfig {
        ShutdownConfig {
            drain_deadline: positive(p, "shutdown.drain_deadline", &self.drain_deadline),
            flush_deadline: self
                .flush_deadline
                .map(|d| positive(p, "shutdown.flush_deadline", &d)),
        }
    }
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawDurability {
    #[default]
    Memory,
    Wal,
}

#[derive(Deserialize)]
#[serde(default)]
struct RawWal {
    dir: String,
    segment_bytes: u64,
    max_bytes: u64,
    replay_wait: String,
}

impl Default for RawWal {
    fn default() -> Self {
        Self {
            dir: "wal".into(),
            segment_bytes: 64 * 1024 * 1024,
            max_bytes: 4 * 1024 * 1024 * 1024,
            replay_wait: "10s".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawReshard {
    poll_interval: String,
    chunk_counters: u64,
    max_rows_per_sec: u64,
    adaptive_ratio: f64,
    min_rows_per_sec: u64,
    cleanup_grace: String,
    delete_rows: u64,
}

impl Default for RawReshard {
    fn default() -> Self {
        Self {
            poll_interval: "500ms".into(),
            chunk_counters: 100,
            max_rows_per_sec: 5_000,
            adaptive_ratio: 1.5,
            min_rows_per_sec: 500,
            cleanup_grace: "10s".into(),
            delete_rows: 1000,
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawConnections {
    max_per_listener: u64,
    header_read_timeout: String,
    idle_timeout: String,
    max_header_bytes: u64,
    body_read_timeout: String,
    min_body_rate: u64,
    body_rate_grace: String,
    max_body_bytes_in_flight: u64,
}

impl Default for RawConnections {
    fn default() -> Self {
        Self {
            max_per_listener: 10_000,
            header_read_timeout: "10s".into(),
            idle_timeout: "75s".into(),
            max_header_bytes: 16 * 1024,
            body_read_timeout: "30s".into(),
            min_body_rate: 1024,
            body_rate_grace: "5s".into(),
            max_body_bytes_in_flight: 256 * 1024 * 1024,
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawFailover {
    mode: String,
    after: u64,
    unreachable_after: String,
}

impl Default for RawFailover {
    fn default() -> Self {
        Self {
            mode: "manual".into(),
            after: 3,
            unreachable_after: "5s".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawListen {
    http: String,
    admin: String,
    // Not `Option`s: an unknown key inside is then reported at its plain
    // path (`listen.tls.ca`); both fields empty means "not configured".
    tls: RawTls,
    http_tls: RawTls,
    admin_tls: RawTls,
}

impl Default for RawListen {
    fn default() -> Self {
        Self {
            http: DEFAULT_HTTP.into(),
            admin: DEFAULT_ADMIN.into(),
            tls: RawTls::default(),
            http_tls: RawTls::default(),
            admin_tls: RawTls::default(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawTls {
    cert: String,
    key: String,
}

/// A listener's certificate: the PEM files of its chain (leaf first) and
/// its private key. Absolute, or relative to the directory of
/// `proxy.yaml`. Read at start (a problem stops the start), then again on
/// SIGHUP and when either file changes; a reload that fails keeps the
/// certificate in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsConfig {
    /// Reads and checks both files: at least one certificate, a private
    /// key (PKCS#8, PKCS#1 or SEC1), and the key matching the leaf.
    /// Errors name the file and the problem.
    pub fn load(&self) -> Result<Arc<CertifiedKey>, String> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let read = |path: &Path, what: &str| {
            std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
        };
        let pem = read(&self.cert, "certificate file")?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{} is not PEM certificates: {e}", self.cert.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{} holds no certificate (-----BEGIN CERTIFICATE-----)",
                self.cert.display()
            ));
        }
        let pem = read(&self.key, "key file")?;
        let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
            format!(
                "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                self.key.display()
            )
        })?;
        let provider = rustls::crypto::ring::default_provider();
        let certified = CertifiedKey::from_der(certs, key, &provider).map_err(|e| {
            format!(
                "{} and {} do not make a usable certificate: {e}",
                self.cert.display(),
                self.key.display()
            )
        })?;
        Ok(Arc::new(certified))
    }

    fn resolve(&mut self, dir: &Path) {
        for path in [&mut self.cert, &mut self.key] {
            if path.is_relative() {
                *path = dir.join(&*path);
            }
        }
    }
}

impl RawTls {
    fn validate(self, p: &mut Problems, at: &str) -> Option<TlsConfig> {
        if self.cert.is_empty() && self.key.is_empty() {
            return None;
        }
        let mut ok = true;
        for (field, value) in [("cert", &self.cert), ("key", &self.key)] {
            if value.is_empty() {
                p.push(format!("{at}.{field}"), "must be a path to a PEM file");
                ok = false;
            }
        }
        ok.then(|| TlsConfig {
            cert: PathBuf::from(self.cert),
            key: PathBuf::from(self.key),
        })
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawAdmin {
    token_env: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            token_env: DEFAULT_TOKEN_ENV.into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawTopology {
    file: String,
    watch_interval: String,
    store: Option<String>,
    poll_interval: String,
    heartbeat_interval: String,
    alive_window: String,
}

impl Default for RawTopology {
    fn default() -> Self {
        Self {
            file: "topology.yaml".into(),
            watch_interval: "1s".into(),
            store: None,
            poll_interval: "500ms".into(),
            heartbeat_interval: "1s".into(),
            alive_window: "5s".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawBuffer {
    flush_interval: String,
    flush_rows: u64,
    transaction_rows: u64,
    max_pending_rows: u64,
    commit_linger: String,
    commit_timeout: String,
    admission_wait: String,
    retry_min: String,
    retry_max: String,
}

impl Default for RawBuffer {
    fn default() -> Self {
        Self {
            flush_interval: "1s".into(),
            flush_rows: 200_000,
            transaction_rows: 25_000,
            max_pending_rows: 2_000_000,
            commit_linger: "2ms".into(),
            commit_timeout: "10s".into(),
            admission_wait: "1s".into(),
            retry_min: "50ms".into(),
            retry_max: "5s".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawEvents {
    max_age: String,
    max_future: String,
}

impl Default for RawEvents {
    fn default() -> Self {
        Self {
            max_age: "7d".into(),
            max_future: "5m".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawLimits {
    max_events: u64,
    max_body_bytes: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_events: 10_000,
            max_body_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawRetention {
    minute: String,
    hour: String,
    day: String,
    interval: String,
    chunk_rows: u64,
}

impl Default for RawRetention {
    fn default() -> Self {
        Self {
            minute: "7d".into(),
            hour: "90d".into(),
            day: "forever".into(),
            interval: "1m".into(),
            chunk_rows: 1000,
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawIdempotency {
    window: String,
}

impl Default for RawIdempotency {
    fn default() -> Self {
        Self {
            window: "24h".into(),
        }
    }
}

impl RawIdempotency {
    fn validate(self, p: &mut Problems) -> IdempotencyConfig {
        IdempotencyConfig {
            window: positive(p, "idempotency.window", &self.window),
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawRollup {
    enabled: bool,
    interval: String,
    delay: String,
}

impl Default for RawRollup {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: "10s".into(),
            delay: "2m".into(),
        }
    }
}

impl RawRollup {
    fn validate(self, p: &mut Problems) -> RollupConfig {
        RollupConfig {
            enabled: self.enabled,
            interval: at_most_5m(p, "rollup.interval", &self.interval),
            delay: duration(p, "rollup.delay", &self.delay),
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawReads {
    max_replica_lag: String,
    coalesce: RawCoalesce,
    cache: RawReadCache,
}

impl Default for RawReads {
    fn default() -> Self {
        Self {
            max_replica_lag: "5s".into(),
            coalesce: RawCoalesce::default(),
            cache: RawReadCache::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawCoalesce {
    enabled: bool,
    max_batch: u64,
    max_in_flight: u64,
    window: String,
}

impl Default for RawCoalesce {
    fn default() -> Self {
        Self {
            enabled: true,
            max_batch: 128,
            max_in_flight: 2,
            window: "0s".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawReadCache {
    enabled: bool,
    max_age: String,
    max_entries: u64,
    max_bytes: u64,
}

impl Default for RawReadCache {
    fn default() -> Self {
        Self {
            enabled: true,
            max_age: "100ms".into(),
            max_entries: 100_000,
            max_bytes: 32 << 20,
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawHealth {
    interval: String,
    timeout: String,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            interval: "1s".into(),
            timeout: "1s".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawPool {
    min: u64,
    max: u64,
    connect_timeout: String,
}

impl Default for RawPool {
    fn default() -> Self {
        Self {
            min: 1,
            max: 16,
            connect_timeout: "2s".into(),
        }
    }
}

// ---- loading and validation -------------------------------------------------

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration in {path}: {invalid}")]
    Invalid { path: PathBuf, invalid: Invalid },
}

impl ProxyConfig {
    /// Reads `path`, applies `TALLY__*` overrides from the process
    /// environment and validates. A relative topology path is resolved
    /// against the directory of `path`.
    pub fn load(path: &Path) -> Result<ProxyConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg =
            Self::from_yaml(&text, std::env::vars()).map_err(|invalid| ConfigError::Invalid {
                path: path.to_owned(),
                invalid,
            })?;
        cfg.admin_token = std::env::var(&cfg.admin_token_env)
            .ok()
            .filter(|t| !t.is_empty())
            .map(Secret);
        if cfg.topology_file.is_relative()
            && let Some(dir) = path.parent()
        {
            cfg.topology_file = dir.join(&cfg.topology_file);
        }
        if let Some(wal) = &mut cfg.wal
            && wal.dir.is_relative()
            && let Some(dir) = path.parent()
        {
            wal.dir = dir.join(&wal.dir);
        }
        let dir = path.parent().unwrap_or(Path::new(""));
        let mut problems = Problems::new();
        for (at, tls) in [
            ("listen.http_tls", &mut cfg.http_tls),
            ("listen.admin_tls", &mut cfg.admin_tls),
        ] {
            if let Some(tls) = tls {
                tls.resolve(dir);
                if let Err(why) = tls.load() {
                    problems.push(at, why);
                }
            }
        }
        problems
            .finish(())
            .map_err(|invalid| ConfigError::Invalid {
                path: path.to_owned(),
                invalid,
            })?;
        Ok(cfg)
    }

    /// Parses and validates YAML text with the given environment.
    pub fn from_yaml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<ProxyConfig, Invalid> {
        let mut problems = Problems::new();
        let mut value: Value = if text.trim().is_empty() {
            Value::Mapping(Default::default())
        } else {
            match serde_yaml_ng::from_str(text) {
                Ok(v) => v,
                Err(e) => {
                    problems.push("", format!("cannot parse YAML: {e}"));
                    return problems.fail();
                }
            }
        };
        apply_env_overrides(&mut value, env, &mut problems);
        let raw: Raw = yaml::parse_value(value, &mut problems)?;
        let cfg = validate(raw, &mut problems);
        problems.finish(cfg)
    }

    /// All defaults, as used by tests and `tally-dev`.
    pub fn defaults() -> ProxyConfig {
        let mut problems = Problems::new();
        validate(Raw::default(), &mut problems)
    }
}

fn apply_env_overrides(
    value: &mut Value,
    env: impl IntoIterator<Item = (String, String)>,
    problems: &mut Problems,
) {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.iter().any(String::is_empty) {
            problems.push(name.clone(), "malformed override name");
            continue;
        }
        let parsed: Value = serde_yaml_ng::from_str(&raw).unwrap_or(Value::String(raw.clone()));
        let mut node = &mut *value;
        for (i, part) in path.iter().enumerate() {
            if !node.is_mapping() {
                *node = Value::Mapping(Default::default());
            }
            let Value::Mapping(map) = node else {
                unreachable!("just made a mapping")
            };
            let key = Value::String(part.clone());
            if i + 1 == path.len() {
                map.insert(key, parsed.clone());
                break;
            }
            node = map.entry(key).or_insert(Value::Mapping(Default::default()));
        }
    }
}

/// Every section in turn, each pushing its own problems, so one pass reports
/// all of them.
fn validate(raw: Raw, p: &mut Problems) -> ProxyConfig {
    let buffer = raw.buffer.validate(p);
    let pool = raw.pool.validate(p);
    let connections = raw.connections.validate(raw.limits.max_body_bytes, p);
    let writer_id = validate_writer_id(raw.writer_id, p);
    let admin_token_env = raw.admin.validate(p);
    let wal = raw.wal.validate(raw.durability, p);
    let listen = raw.listen.validate(p);
    let topology = raw.topology.validate(p);
    let events = raw.events.validate(p);
    let limits = raw.limits.validate(p);
    let retention = raw.retention.validate(p);
    let idempotency = raw.idempotency.validate(p);
    let rollup = raw.rollup.validate(p);
    let reads = raw.reads.validate(p);
    let health = raw.health.validate(p);
    let failover = raw.failover.validate(p);
    let reshard = raw.reshard.validate(pool.connect_timeout, p);
    let shutdown = raw.shutdown.validate(p);
    ProxyConfig {
        http_addr: listen.http,
        admin_addr: listen.admin,
        http_tls: listen.http_tls,
        admin_tls: listen.admin_tls,
        admin_token_env,
        admin_token: None,
        topology_file: topology.file,
        topology_watch_interval: topology.watch_interval,
        topology_store: topology.store,
        store_poll_interval: topology.poll_interval,
        heartbeat_interval: topology.heartbeat_interval,
        store_alive_window: topology.alive_window,
        writer_id,
        buffer,
        events,
        limits,
        retention,
        idempotency,
        rollup,
        reads,
        health,
        failover,
        pool,
        reshard,
        connections,
        wal,
        shutdown,
    }
}

impl RawBuffer {
    fn validate(self, p: &mut Problems) -> BufferConfig {
        let buffer = BufferConfig {
            flush_interval: positive(p, "buffer.flush_interval", &self.flush_interval),
            flush_rows: count(p, "buffer.flush_rows", self.flush_rows, 1, 100_000_000),
            transaction_rows: count(
                p,
                "buffer.transaction_rows",
                self.transaction_rows,
                0,
                100_000_000,
            ),
            max_pending_rows: count(
                p,
                "buffer.max_pending_rows",
                self.max_pending_rows,
                1,
                1_000_000_000,
            ),
            commit_linger: duration(p, "buffer.commit_linger", &self.commit_linger),
            commit_timeout: positive(p, "buffer.commit_timeout", &self.commit_timeout),
            admission_wait: duration(p, "buffer.admission_wait", &self.admission_wait),
            // A zero backoff retries a dead master in a busy loop.
            retry_min: positive(p, "buffer.retry_min", &self.retry_min),
            retry_max: positive(p, "buffer.retry_max", &self.retry_max),
        };
        // A flush lingering as long as a committed write may wait answers
        // every such write 504. (A bad commit_timeout is its own problem.)
        if buffer.commit_linger >= buffer.commit_timeout && !buffer.commit_timeout.is_zero() {
            p.push(
                "buffer.commit_linger",
                "must be less than buffer.commit_timeout",
            );
        }
        // A waiting write holds its connection and its parsed body.
        if buffer.admission_wait > MAX_ADMISSION_WAIT {
            p.push("buffer.admission_wait", "must be at most 60s");
        }
        if buffer.retry_min > buffer.retry_max {
            p.push("buffer.retry_min", "must not exceed buffer.retry_max");
        }
        if buffer.flush_rows > buffer.max_pending_rows {
            p.push(
                "buffer.flush_rows",
                "must not exceed buffer.max_pending_rows",
            );
        }
        buffer
    }
}

impl RawPool {
    fn validate(self, p: &mut Problems) -> PoolConfig {
        let pool = PoolConfig {
            min: count(p, "pool.min", self.min, 0, 1000),
            max: count(p, "pool.max", self.max, 1, 1000),
            connect_timeout: positive(p, "pool.connect_timeout", &self.connect_timeout),
        };
        if pool.min > pool.max {
            p.push("pool.min", "must not exceed pool.max");
        }
        pool
    }
}

impl RawConnections {
    /// `max_body_bytes` is `limits.max_body_bytes` as written: the budget
    /// of bodies in flight must hold at least one body of that size.
    fn validate(self, max_body_bytes: u64, p: &mut Problems) -> ConnectionsConfig {
        let connections = ConnectionsConfig {
            max_per_listener: count(
                p,
                "connections.max_per_listener",
                self.max_per_listener,
                1,
                1_000_000,
            ),
            header_read_timeout: positive(
                p,
                "connections.header_read_timeout",
                &self.header_read_timeout,
            ),
            idle_timeout: positive(p, "connections.idle_timeout", &self.idle_timeout),
            max_header_bytes: count(
                p,
                "connections.max_header_bytes",
                self.max_header_bytes,
                1024,
                1024 * 1024,
            ),
            body_read_timeout: positive(
                p,
                "connections.body_read_timeout",
                &self.body_read_timeout,
            ),
            min_body_rate: count(
                p,
                "connections.min_body_rate",
                self.min_body_rate,
                0,
                1 << 30,
            ) as u64,
            body_rate_grace: positive(p, "connections.body_rate_grace", &self.body_rate_grace),
            max_body_bytes_in_flight: count(
                p,
                "connections.max_body_bytes_in_flight",
                self.max_body_bytes_in_flight,
                64 * 1024,
                1 << 40,
            ),
        };
        // Past the deadline the rate no longer matters: a grace as long
        // would switch the rate off without saying so (0 does that).
        if connections.body_rate_grace > connections.body_read_timeout
            && !connections.body_read_timeout.is_zero()
        {
            p.push(
                "connections.body_rate_grace",
                "must not exceed connections.body_read_timeout",
            );
        }
        // (An invalid limits.max_body_bytes is that section's problem.)
        if (connections.max_body_bytes_in_flight as u64) < max_body_bytes
            && max_body_bytes <= MAX_BODY_BYTES
        {
            p.push(
                "connections.max_body_bytes_in_flight",
                format!(
                    "must be at least limits.max_body_bytes ({max_body_bytes}), or no body of that size is ever read"
                ),
            );
        }
        connections
    }
}

/// The longest `writer_id` prefix. The proxy appends its start time and
/// random bits and never cuts them off, and the whole identity must fit the
/// dedup rows' `VARBINARY(64)` (see `App::new`).
pub const WRITER_ID_PREFIX_MAX: usize = 32;

/// `writer_id` is only a prefix: 1 to [`WRITER_ID_PREFIX_MAX`] bytes of
/// `A-Z a-z 0-9 . _ -` (ASCII, so bytes are characters, and safe as the
/// write-ahead log's directory name).
fn validate_writer_id(writer_id: Option<String>, p: &mut Problems) -> Option<String> {
    if let Some(w) = &writer_id
        && (!(1..=WRITER_ID_PREFIX_MAX).contains(&w.len())
            || !w
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)))
    {
        p.push(
            "writer_id",
            format!("must be 1 to {WRITER_ID_PREFIX_MAX} characters of A-Z a-z 0-9 . _ -"),
        );
    }
    writer_id
}

impl RawAdmin {
    /// The name of the token's environment variable.
    fn validate(self, p: &mut Problems) -> String {
        if self.token_env.is_empty() {
            p.push("admin.token_env", "must name an environment variable");
        }
        self.token_env
    }
}

impl RawWal {
    /// The `wal` section is checked whatever the durability, so a mistake
    /// shows before `durability: wal` is switched on; `None` unless it is.
    fn validate(self, durability: RawDurability, p: &mut Problems) -> Option<WalConfig> {
        let wal = WalConfig {
            dir: PathBuf::from(&self.dir),
            segment_bytes: count(p, "wal.segment_bytes", self.segment_bytes, 4096, 1 << 34) as u64,
            max_bytes: count(p, "wal.max_bytes", self.max_bytes, 1 << 20, 1 << 50) as u64,
            replay_wait: duration(p, "wal.replay_wait", &self.replay_wait),
        };
        if wal.max_bytes < 2 * wal.segment_bytes {
            p.push(
                "wal.max_bytes",
                "must be at least twice wal.segment_bytes (the open segment is never deleted)",
            );
        }
        if self.dir.is_empty() {
            p.push("wal.dir", "must be a path");
        }
        (durability == RawDurability::Wal).then_some(wal)
    }
}

/// The validated `listen` section.
struct Listen {
    http: SocketAddr,
    admin: SocketAddr,
    http_tls: Option<TlsConfig>,
    admin_tls: Option<TlsConfig>,
}

impl RawListen {
    fn validate(self, p: &mut Problems) -> Listen {
        let both = self.tls.validate(p, "listen.tls");
        let http_tls = self.http_tls.validate(p, "listen.http_tls");
        let admin_tls = self.admin_tls.validate(p, "listen.admin_tls");
        Listen {
            http: addr(p, "listen.http", &self.http),
            admin: addr(p, "listen.admin", &self.admin),
            http_tls: http_tls.or_else(|| both.clone()),
            admin_tls: admin_tls.or(both),
        }
    }
}

/// The validated `topology` section.
struct Topology {
    file: PathBuf,
    watch_interval: Duration,
    store: Option<Dsn>,
    poll_interval: Duration,
    heartbeat_interval: Duration,
    alive_window: Duration,
}

impl RawTopology {
    fn validate(self, p: &mut Problems) -> Topology {
        if self.file.is_empty() {
            p.push("topology.file", "must be a path");
        }
        let watch_interval = positive(p, "topology.watch_interval", &self.watch_interval);
        let store = self
            .store
            .as_deref()
            .and_then(|text| match Dsn::parse(text) {
                // A `password_file` or `password_env` is read once, here
                // (the configuration is not reloaded).
                Ok(mut dsn) => match dsn.resolve() {
                    Ok(()) => Some(dsn),
                    Err(why) => {
                        p.push("topology.store", why);
                        None
                    }
                },
                Err(why) => {
                    p.push("topology.store", format!("invalid DSN: {why}"));
                    None
                }
            });
        let poll_interval = positive(p, "topology.poll_interval", &self.poll_interval);
        let heartbeat_interval =
            positive(p, "topology.heartbeat_interval", &self.heartbeat_interval);
        let alive_window = positive(p, "topology.alive_window", &self.alive_window);
        // Together: a heartbeat may be late once without this proxy being
        // taken for gone, a new version is seen well within the window,
        // and the self-fence (3/4 of the window) starts before the others
        // stop waiting for this proxy.
        let half = alive_window / 2;
        if !alive_window.is_zero() && alive_window <= MAX_DURATION {
            for (path, every, why) in [
                (
                    "topology.heartbeat_interval",
                    heartbeat_interval,
                    "one late heartbeat must not make this proxy look gone",
                ),
                (
                    "topology.poll_interval",
                    poll_interval,
                    "a proxy must see a new topology version well within the window",
                ),
            ] {
                if every > half && every <= MAX_DURATION {
                    p.push(
                        path,
                        format!(
                            "must be at most {half:?}, half of topology.alive_window ({alive_window:?}): {why}"
                        ),
                    );
                }
            }
        }
        Topology {
            watch_interval,
            store,
            poll_interval,
            heartbeat_interval,
            alive_window,
            file: PathBuf::from(self.file),
        }
    }
}

impl RawEvents {
    fn validate(self, p: &mut Problems) -> EventsConfig {
        EventsConfig {
            max_age: positive(p, "events.max_age", &self.max_age),
            max_future: duration(p, "events.max_future", &self.max_future),
        }
    }
}

/// The largest `limits.max_body_bytes`.
const MAX_BODY_BYTES: u64 = 1 << 32;

impl RawLimits {
    fn validate(self, p: &mut Problems) -> LimitsConfig {
        LimitsConfig {
            max_events: count(p, "limits.max_events", self.max_events, 1, 10_000_000),
            max_body_bytes: count(
                p,
                "limits.max_body_bytes",
                self.max_body_bytes,
                1,
                MAX_BODY_BYTES,
            ),
        }
    }
}

impl RawRetention {
    fn validate(self, p: &mut Problems) -> RetentionConfig {
        RetentionConfig {
            minute: retention(p, "retention.minute", &self.minute),
            hour: retention(p, "retention.hour", &self.hour),
            day: retention(p, "retention.day", &self.day),
            interval: positive(p, "retention.interval", &self.interval),
            chunk_rows: count(p, "retention.chunk_rows", self.chunk_rows, 1, 100_000),
        }
    }
}

impl RawReads {
    fn validate(self, p: &mut Problems) -> ReadsConfig {
        let max_replica_lag = duration(p, "reads.max_replica_lag", &self.max_replica_lag);
        let c = self.coalesce;
        let coalesce = CoalesceConfig {
            max_batch: count(p, "reads.coalesce.max_batch", c.max_batch, 1, MAX_COALESCE),
            max_in_flight: count(p, "reads.coalesce.max_in_flight", c.max_in_flight, 1, 64),
            window: duration(p, "reads.coalesce.window", &c.window),
        };
        if coalesce.window > Duration::from_secs(1) {
            p.push("reads.coalesce.window", "must be at most 1s");
        }
        let k = self.cache;
        let cache = ReadCacheConfig {
            max_age: positive(p, "reads.cache.max_age", &k.max_age),
            max_entries: count(p, "reads.cache.max_entries", k.max_entries, 1, 1 << 32),
            max_bytes: count(p, "reads.cache.max_bytes", k.max_bytes, 1 << 10, 1 << 40),
        };
        if cache.max_age > Duration::from_secs(60) {
            p.push("reads.cache.max_age", "must be at most 60s");
        }
        ReadsConfig {
            max_replica_lag,
            coalesce: c.enabled.then_some(coalesce),
            cache: k.enabled.then_some(cache),
        }
    }
}

impl RawHealth {
    fn validate(self, p: &mut Problems) -> HealthConfig {
        HealthConfig {
            // tokio's interval panics on a zero period.
            interval: positive(p, "health.interval", &self.interval),
            timeout: positive(p, "health.timeout", &self.timeout),
        }
    }
}

impl RawFailover {
    fn validate(self, p: &mut Problems) -> FailoverConfig {
        FailoverConfig {
            auto: match self.mode.as_str() {
                "auto" => true,
                "manual" => false,
                other => {
                    p.push("failover.mode", format!("{other:?} must be manual or auto"));
                    false
                }
            },
            after: count(p, "failover.after", self.after, 1, 1000) as u32,
            unreachable_after: positive(p, "failover.unreachable_after", &self.unreachable_after),
        }
    }
}

impl RawReshard {
    /// `read_timeout` is the validated `pool.connect_timeout`, the floor of
    /// `cleanup_grace`.
    fn validate(self, read_timeout: Duration, p: &mut Problems) -> ReshardConfig {
        ReshardConfig {
            cleanup_grace: {
                // A moved-key read spends at most one read timeout
                // (pool.connect_timeout) between its target snapshot and its
                // source read; cleanup must not start inside that window.
                let grace = duration(p, "reshard.cleanup_grace", &self.cleanup_grace);
                if grace < read_timeout && parse_duration(&self.cleanup_grace).is_ok() {
                    p.push(
                        "reshard.cleanup_grace",
                        format!(
                            "must be at least pool.connect_timeout ({read_timeout:?}), the longest a read of a moved key waits between its two groups"
                        ),
                    );
                }
                grace
            },
            poll_interval: positive(p, "reshard.poll_interval", &self.poll_interval),
            chunk_counters: count(p, "reshard.chunk_counters", self.chunk_counters, 1, 100_000),
            max_rows_per_sec: count(
                p,
                "reshard.max_rows_per_sec",
                self.max_rows_per_sec,
                1,
                100_000_000,
            ),
            adaptive_ratio: {
                let r = self.adaptive_ratio;
                if r == 0.0 {
                    None
                } else {
                    if !(1.0..=100.0).contains(&r) {
                        p.push(
                            "reshard.adaptive_ratio",
                            format!("{r} must be 0 (off) or between 1 and 100"),
                        );
                    }
                    Some(r)
                }
            },
            // Above max_rows_per_sec it is max_rows_per_sec (the copy
            // never exceeds the maximum).
            min_rows_per_sec: count(
                p,
                "reshard.min_rows_per_sec",
                self.min_rows_per_sec,
                1,
                100_000_000,
            )
            .min(self.max_rows_per_sec.max(1) as usize),
            delete_rows: count(p, "reshard.delete_rows", self.delete_rows, 1, 100_000),
        }
    }
}

/// Parses `500ms`, `1s`, `5m`, `7d`, ...
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like 500ms, 1s, 7d ({e})"))
}

/// The longest duration of any setting: 100 years (of humantime's 365.25
/// days). Longer ones do not fit the `i64` seconds of the time arithmetic
/// (a retention would wrap around to a cutoff in the future, expiring
/// every row) or overflow an `Instant`.
const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

impl ProxyConfig {
    /// How long this proxy may go without a heartbeat recorded in the
    /// store before it refuses writes: 3/4 of `topology.alive_window`.
    /// Above the longest heartbeat interval (half the window), so one
    /// heartbeat a little late does not fence, and a quarter of the window
    /// before the others take this proxy for gone (and, say, a reshard
    /// stops waiting for it), so it stops writing by an old ring first.
    pub fn store_fence_after(&self) -> Duration {
        fence_after(self.store_alive_window)
    }
}

fn fence_after(alive_window: Duration) -> Duration {
    alive_window / 4 * 3
}

/// Keys one coalesced read statement may ask at most (as many
/// placeholders as `POST /v1/counters/query` binds).
const MAX_COALESCE: u64 = 1_000;

/// The longest `buffer.admission_wait`: a waiting write holds a
/// connection and its parsed events.
const MAX_ADMISSION_WAIT: Duration = Duration::from_secs(60);

/// A duration of at most [`MAX_DURATION`]; zero when it does not parse.
fn duration(p: &mut Problems, path: &str, text: &str) -> Duration {
    match parse_duration(text) {
        Ok(d) if d > MAX_DURATION => {
            p.push(path, "must be at most 100 years");
            d
        }
        Ok(d) => d,
        Err(why) => {
            p.push(path, why);
            Duration::ZERO
        }
    }
}

/// A duration that must be greater than zero: a zero timeout would cut
/// every connection or probe at once, a zero interval would spin a loop
/// (or panic tokio's `interval`).
fn positive(p: &mut Problems, path: &str, text: &str) -> Duration {
    let d = duration(p, path, text);
    if d.is_zero() && parse_duration(text).is_ok() {
        p.push(path, "must be greater than 0");
    }
    d
}

/// A positive interval of a task that refreshes a gauge at every turn:
/// gauges not set for 5 minutes (`telemetry::GAUGE_IDLE_TIMEOUT`) leave
/// the scrape.
fn at_most_5m(p: &mut Problems, path: &str, text: &str) -> Duration {
    let d = positive(p, path, text);
    if d > Duration::from_secs(300) {
        p.push(
            path,
            "must be at most 5m (its gauge is refreshed at every turn)",
        );
    }
    d
}

fn retention(p: &mut Problems, path: &str, text: &str) -> Option<Duration> {
    if text.trim() == "forever" {
        return None;
    }
    let d = duration(p, path, text);
    if d < Duration::from_secs(3600) {
        p.push(path, "must be at least 1h, or `forever`");
    }
    Some(d)
}

fn count(p: &mut Problems, path: &str, value: u64, min: u64, max: u64) -> usize {
    if !(min..=max).contains(&value) {
        p.push(path, format!("must be {min}..={max}, got {value}"));
    }
    usize::try_from(value).unwrap_or(usize::MAX)
}

fn addr(p: &mut Problems, path: &str, text: &str) -> SocketAddr {
    text.parse().unwrap_or_else(|_| {
        p.push(
            path,
            format!("{text:?} is not an address like 127.0.0.1:8080"),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn empty_file_means_defaults() {
        let cfg = ProxyConfig::from_yaml("", no_env()).expect("defaults are valid");
        assert_eq!(cfg.http_addr.to_string(), DEFAULT_HTTP);
        assert_eq!(cfg.events.max_age, Duration::from_secs(7 * 86400));
        assert_eq!(cfg.retention.day, None);
        assert_eq!(cfg.retention.hour, Some(Duration::from_secs(90 * 86400)));
        assert_eq!(cfg.limits.max_body_bytes, 8 << 20);
    }

    #[test]
    fn five_mistakes_give_five_problems() {
        let text = "
listen:
  http: localhost-8080
buffer:
  flush_interval: soon
  flush_intreval: 1s
events:
  max_future: -5m
pool:
  min: 20
  max: 10
";
        let err = ProxyConfig::from_yaml(text, no_env()).expect_err("invalid");
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "buffer.flush_intreval",
                "buffer.flush_interval",
                "pool.min",
                "listen.http",
                "events.max_future",
            ],
            "{err}"
        );
        assert!(err.problems[0].message.contains("unknown key"));
    }

    #[test]
    fn env_overrides_replace_file_values_and_unknown_ones_are_reported() {
        let env = vec![
            (
                "TALLY__BUFFER__FLUSH_INTERVAL".to_owned(),
                "250ms".to_owned(),
            ),
            ("TALLY__LISTEN__HTTP".to_owned(), "0.0.0.0:18080".to_owned()),
            ("TALLY__LIMITS__MAX_EVENTS".to_owned(), "500".to_owned()),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ];
        let cfg = ProxyConfig::from_yaml("buffer:\n  flush_interval: 5s\n", env).expect("valid");
        assert_eq!(cfg.buffer.flush_interval, Duration::from_millis(250));
        assert_eq!(cfg.http_addr.to_string(), "0.0.0.0:18080");
        assert_eq!(cfg.limits.max_events, 500);

        let env = vec![("TALLY__BUFER__FLUSH_INTERVAL".to_owned(), "1s".to_owned())];
        let err = ProxyConfig::from_yaml("", env).expect_err("typo in override");
        assert_eq!(err.problems[0].path, "bufer");
    }

    #[test]
    fn reshard_cleanup_grace_covers_a_read() {
        let err = ProxyConfig::from_yaml(
            "pool:\n  connect_timeout: 3s\nreshard:\n  cleanup_grace: 1s\n",
            no_env(),
        )
        .expect_err("grace shorter than a read");
        assert_eq!(err.problems[0].path, "reshard.cleanup_grace");
        let cfg =
            ProxyConfig::from_yaml("reshard:\n  max_rows_per_sec: 500\n", no_env()).expect("valid");
        assert_eq!(cfg.reshard.max_rows_per_sec, 500);
        assert_eq!(cfg.reshard.cleanup_grace, Duration::from_secs(10));
    }

    #[test]
    fn reshard_adaptive_throttle_settings() {
        let cfg = ProxyConfig::from_yaml("", no_env()).expect("defaults are valid");
        assert_eq!(cfg.reshard.adaptive_ratio, Some(1.5));
        assert_eq!(cfg.reshard.min_rows_per_sec, 500);
        // 0 turns it off; a floor above the maximum is the maximum.
        let cfg = ProxyConfig::from_yaml(
            "reshard:\n  adaptive_ratio: 0\n  max_rows_per_sec: 200\n",
            no_env(),
        )
        .expect("valid");
        assert_eq!(cfg.reshard.adaptive_ratio, None);
        assert_eq!(cfg.reshard.min_rows_per_sec, 200);
        let cfg =
            ProxyConfig::from_yaml("reshard:\n  adaptive_ratio: 2\n", no_env()).expect("valid");
        assert_eq!(cfg.reshard.adaptive_ratio, Some(2.0));
        let err = ProxyConfig::from_yaml(
            "reshard:\n  adaptive_ratio: 0.5\n  min_rows_per_sec: 0\n",
            no_env(),
        )
        .expect_err("invalid");
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            ["reshard.adaptive_ratio", "reshard.min_rows_per_sec"]
        );
    }

    #[test]
    fn connection_limits_have_defaults_and_reject_zero() {
        let cfg = ProxyConfig::from_yaml("", no_env()).expect("defaults are valid");
        assert_eq!(cfg.connections.max_per_listener, 10_000);
        assert_eq!(cfg.connections.header_read_timeout, Duration::from_secs(10));
        assert_eq!(cfg.connections.idle_timeout, Duration::from_secs(75));
        assert_eq!(cfg.connections.max_header_bytes, 16 * 1024);
        assert_eq!(cfg.connections.body_read_timeout, Duration::from_secs(30));
        assert_eq!(cfg.connections.min_body_rate, 1024);
        assert_eq!(cfg.connections.body_rate_grace, Duration::from_secs(5));
        assert_eq!(cfg.connections.max_body_bytes_in_flight, 256 << 20);
        let text = "
connections:
  max_per_listener: 0
  header_read_timeout: 0s
  idle_timeout: never
  max_header_bytes: 100
  body_read_timeout: 0s
  body_rate_grace: 0s
  max_body_bytes_in_flight: 0
";
        let err = ProxyConfig::from_yaml(text, no_env()).expect_err("invalid");
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "connections.max_per_listener",
                "connections.header_read_timeout",
                "connections.idle_timeout",
                "connections.max_header_bytes",
                "connections.body_read_timeout",
                "connections.body_rate_grace",
                "connections.max_body_bytes_in_flight",
                "connections.max_body_bytes_in_flight",
            ],
            "{err}"
        );
    }

    #[test]
    fn body_bounds_are_read_from_the_file_and_the_environment() {
        let text = "
connections:
  body_read_timeout: 2m
  min_body_rate: 0
  body_rate_grace: 10s
limits:
  max_body_bytes: 1048576
";
        let env = vec![(
            "TALLY__CONNECTIONS__MAX_BODY_BYTES_IN_FLIGHT".to_owned(),
            "1048576".to_owned(),
        )];
        let cfg = ProxyConfig::from_yaml(text, env).expect("valid");
        assert_eq!(cfg.connections.body_read_timeout, Duration::from_secs(120));
        // 0 switches the rate off (only the deadline remains).
        assert_eq!(cfg.connections.min_body_rate, 0);
        assert_eq!(cfg.connections.body_rate_grace, Duration::from_secs(10));
        assert_eq!(cfg.connections.max_body_bytes_in_flight, 1 << 20);
    }

    #[test]
    fn the_body_budget_holds_at_least_one_largest_body() {
        // The default budget (256 MiB) is below a 512 MiB body limit.
        let err = ProxyConfig::from_yaml("limits:\n  max_body_bytes: 536870912\n", no_env())
            .expect_err("budget below the body limit");
        assert_eq!(
            err.problems
                .iter()
                .map(|p| (p.path.as_str(), p.message.as_str()))
                .collect::<Vec<_>>(),
            [(
                "connections.max_body_bytes_in_flight",
                "must be at least limits.max_body_bytes (536870912), or no body of that size is ever read"
            )]
        );
        // An invalid body limit is reported once, in its own section.
        let err = ProxyConfig::from_yaml("limits:\n  max_body_bytes: 8589934592\n", no_env())
            .expect_err("body limit out of range");
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["limits.max_body_bytes"]);
        // Equal is enough.
        let cfg = ProxyConfig::from_yaml(
            "limits:\n  max_body_bytes: 65536\nconnections:\n  max_body_bytes_in_flight: 65536\n",
            no_env(),
        )
        .expect("valid");
        assert_eq!(cfg.connections.max_body_bytes_in_flight, 65536);
    }

    /// Issue #20 item 7: a duration that would panic (`health.interval: 0s`
    /// is a zero-period tokio interval), spin (a zero pause between
    /// retention passes, file or store polls, heartbeats, reshard steps,
    /// or a zero retry backoff), time out every request (a zero timeout)
    /// or overflow (a retention past `i64` seconds wraps to a cutoff in
    /// the future: every row expired) is refused at load, naming the
    /// setting and why, like every other problem.
    #[test]
    fn durations_that_panic_spin_or_overflow_are_refused_at_load() {
        const ZERO: &str = "must be greater than 0";
        const HUGE: &str = "300000000000y";
        const CEILING: &str = "must be at most 100 years";
        let cases = [
            ("health", "interval", "0s", ZERO),
            ("health", "timeout", "0s", ZERO),
            ("failover", "unreachable_after", "0s", ZERO),
            ("retention", "interval", "0s", ZERO),
            ("idempotency", "window", "0s", ZERO),
            ("rollup", "interval", "0s", ZERO),
            ("topology", "watch_interval", "0s", ZERO),
            ("topology", "poll_interval", "0s", ZERO),
            ("topology", "heartbeat_interval", "0s", ZERO),
            ("buffer", "commit_timeout", "0s", ZERO),
            ("buffer", "retry_min", "0s", ZERO),
            ("buffer", "retry_max", "0s", ZERO),
            ("pool", "connect_timeout", "0s", ZERO),
            ("reshard", "poll_interval", "0s", ZERO),
            ("events", "max_age", "0s", ZERO),
            // Other proxies take a proxy silent for 5 s for gone (and a
            // reshard stops waiting for it to settle).
            (
                "topology",
                "heartbeat_interval",
                "5s",
                "must be at most 2.5s",
            ),
            // Every `ack=committed` write would wait out its timeout.
            (
                "buffer",
                "commit_linger",
                "10s",
                "must be less than buffer.commit_timeout",
            ),
            ("retention", "minute", HUGE, CEILING),
            ("retention", "hour", HUGE, CEILING),
            ("idempotency", "window", HUGE, CEILING),
            ("rollup", "delay", HUGE, CEILING),
            ("events", "max_age", HUGE, CEILING),
            ("events", "max_future", HUGE, CEILING),
            ("reads", "max_replica_lag", HUGE, CEILING),
            ("wal", "replay_wait", HUGE, CEILING),
            ("buffer", "flush_interval", HUGE, CEILING),
            ("health", "interval", HUGE, CEILING),
            ("reshard", "cleanup_grace", HUGE, CEILING),
            ("connections", "idle_timeout", HUGE, CEILING),
            ("shutdown", "drain_deadline", HUGE, CEILING),
            ("shutdown", "flush_deadline", HUGE, CEILING),
        ];
        let mut missed = Vec::new();
        for (section, key, value, why) in cases {
            let text = format!("{section}:\n  {key}: {value}\n");
            let path = format!("{section}.{key}");
            match ProxyConfig::from_yaml(&text, no_env()) {
                Ok(_) => missed.push(format!("{path}: {value} was accepted")),
                Err(err) => {
                    if !err
                        .problems
                        .iter()
                        .any(|p| p.path == path && p.message.contains(why))
                    {
                        missed.push(format!("{path}: {value}: want {why:?}, got {err}"));
                    }
                }
            }
        }
        assert!(missed.is_empty(), "{}", missed.join("\n"));
    }

    /// Issue #19 item 4: the heartbeat and poll intervals are checked
    /// against the alive window together (every problem at once), and the
    /// self-fence falls between the longest heartbeat interval and the
    /// window.
    #[test]
    fn heartbeat_poll_and_alive_window_are_validated_together() {
        let cfg = ProxyConfig::defaults();
        assert_eq!(cfg.store_alive_window, Duration::from_secs(5));
        assert_eq!(cfg.store_fence_after(), Duration::from_millis(3750));
        // Both intervals too long for the window: both reported.
        let err = ProxyConfig::from_yaml(
            "topology:\n  alive_window: 2s\n  heartbeat_interval: 1500ms\n  poll_interval: 1001ms\n",
            no_env(),
        )
        .expect_err("too long for the window");
        let found: Vec<(&str, &str)> = err
            .problems
            .iter()
            .map(|p| (p.path.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(found.len(), 2, "{found:?}");
        for path in ["topology.heartbeat_interval", "topology.poll_interval"] {
            let why = found
                .iter()
                .find(|(p, _)| *p == path)
                .map(|(_, m)| *m)
                .unwrap_or_else(|| panic!("no problem at {path}: {found:?}"));
            assert!(
                why.starts_with("must be at most 1s, half of topology.alive_window (2s)"),
                "{path}: {why}"
            );
        }
        // A longer window allows longer intervals; the fence follows it.
        let cfg = ProxyConfig::from_yaml(
            "topology:\n  alive_window: 20s\n  heartbeat_interval: 10s\n  poll_interval: 10s\n",
            no_env(),
        )
        .expect("valid");
        assert_eq!(cfg.store_alive_window, Duration::from_secs(20));
        assert_eq!(cfg.store_fence_after(), Duration::from_secs(15));
        // Exactly half is accepted; a zero or unparsable window is its own
        // problem, not a second one for each interval.
        ProxyConfig::from_yaml(
            "topology:\n  alive_window: 3s\n  heartbeat_interval: 1500ms\n  poll_interval: 1500ms\n",
            no_env(),
        )
        .expect("half the window is accepted");
        for window in ["0s", "soon"] {
            let err =
                ProxyConfig::from_yaml(&format!("topology:\n  alive_window: {window}\n"), no_env())
                    .expect_err("invalid window");
            let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
            assert_eq!(paths, ["topology.alive_window"], "{window}");
        }
        // Every window: the fence comes after the longest heartbeat
        // interval and before the window ends.
        for ms in [2, 1000, 5000, 60_000, 3_600_000] {
            let window = Duration::from_millis(ms);
            let fence = fence_after(window);
            assert!(
                fence > window / 2 && fence < window,
                "{window:?}: {fence:?}"
            );
        }
    }

    /// Zero where zero means something: no lag tolerated, no future
    /// timestamps, no linger, no wait for the replay.
    #[test]
    fn zero_is_accepted_where_it_has_a_meaning() {
        let text = "
reads:
  max_replica_lag: 0s
events:
  max_future: 0s
buffer:
  commit_linger: 0s
wal:
  replay_wait: 0s
";
        let cfg = ProxyConfig::from_yaml(text, no_env()).expect("valid");
        assert_eq!(cfg.reads.max_replica_lag, Duration::ZERO);
        assert_eq!(cfg.events.max_future, Duration::ZERO);
        assert_eq!(cfg.buffer.commit_linger, Duration::ZERO);
        // The longest accepted values load too.
        let text = "
topology:
  heartbeat_interval: 2500ms
  watch_interval: 1h
retention:
  minute: 100y
buffer:
  flush_interval: 1h
  commit_linger: 9s
";
        let cfg = ProxyConfig::from_yaml(text, no_env()).expect("valid");
        assert_eq!(cfg.heartbeat_interval, Duration::from_millis(2500));
    }

    #[test]
    fn retention_accepts_forever_and_rejects_tiny_values() {
        let cfg =
            ProxyConfig::from_yaml("retention:\n  minute: forever\n", no_env()).expect("valid");
        assert_eq!(cfg.retention.minute, None);
        let err =
            ProxyConfig::from_yaml("retention:\n  hour: 5m\n", no_env()).expect_err("too short");
        assert_eq!(err.problems[0].path, "retention.hour");
    }

    /// What a section's validation pushed, as `(path, message)` pairs.
    fn pushed(validate: impl FnOnce(&mut Problems)) -> Vec<(String, String)> {
        let mut p = Problems::new();
        validate(&mut p);
        match p.finish(()) {
            Ok(()) => Vec::new(),
            Err(invalid) => invalid
                .problems
                .into_iter()
                .map(|problem| (problem.path, problem.message))
                .collect(),
        }
    }

    fn paths(problems: &[(String, String)]) -> Vec<&str> {
        problems.iter().map(|(path, _)| path.as_str()).collect()
    }

    fn message<'a>(problems: &'a [(String, String)], path: &str) -> &'a str {
        problems
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, m)| m.as_str())
            .unwrap_or_else(|| panic!("no problem at {path}: {problems:?}"))
    }

    #[test]
    fn default_sections_report_nothing() {
        let found = pushed(|p| {
            validate(Raw::default(), p);
        });
        assert_eq!(found, Vec::<(String, String)>::new());
        let found = pushed(|p| {
            assert!(RawWal::default().validate(RawDurability::Wal, p).is_some());
        });
        assert_eq!(found, Vec::<(String, String)>::new());
    }

    #[test]
    fn buffer_section_reports_its_problems() {
        let raw = RawBuffer {
            flush_interval: "0s".into(),
            flush_rows: 500,
            max_pending_rows: 100,
            commit_timeout: "later".into(),
            admission_wait: "2m".into(),
            retry_min: "10s".into(),
            retry_max: "1s".into(),
            ..RawBuffer::default()
        };
        let found = pushed(|p| {
            let buffer = raw.validate(p);
            assert_eq!(buffer.flush_rows, 500);
            assert_eq!(buffer.commit_timeout, Duration::ZERO);
        });
        assert_eq!(
            paths(&found),
            [
                "buffer.flush_interval",
                "buffer.commit_timeout",
                "buffer.admission_wait",
                "buffer.retry_min",
                "buffer.flush_rows",
            ]
        );
        assert_eq!(
            message(&found, "buffer.admission_wait"),
            "must be at most 60s"
        );
        assert!(message(&found, "buffer.commit_timeout").contains("is not a duration"));
        assert_eq!(
            message(&found, "buffer.flush_interval"),
            "must be greater than 0"
        );
        assert_eq!(
            message(&found, "buffer.retry_min"),
            "must not exceed buffer.retry_max"
        );
        assert_eq!(
            message(&found, "buffer.flush_rows"),
            "must not exceed buffer.max_pending_rows"
        );
    }

    #[test]
    fn pool_section_reports_its_problems() {
        let raw = RawPool {
            min: 5,
            max: 0,
            connect_timeout: "x".into(),
        };
        let found = pushed(|p| {
            raw.validate(p);
        });
        assert_eq!(
            paths(&found),
            ["pool.max", "pool.connect_timeout", "pool.min"]
        );
        assert_eq!(message(&found, "pool.max"), "must be 1..=1000, got 0");
        assert_eq!(message(&found, "pool.min"), "must not exceed pool.max");
    }

    #[test]
    fn connections_section_reports_its_problems() {
        let raw = RawConnections {
            max_per_listener: 0,
            header_read_timeout: "0s".into(),
            idle_timeout: "never".into(),
            max_header_bytes: 100,
            body_read_timeout: "10s".into(),
            min_body_rate: 1 << 31,
            body_rate_grace: "11s".into(),
            max_body_bytes_in_flight: 1 << 20,
        };
        let found = pushed(|p| {
            raw.validate(2 << 20, p);
        });
        assert_eq!(
            paths(&found),
            [
                "connections.max_per_listener",
                "connections.header_read_timeout",
                "connections.idle_timeout",
                "connections.max_header_bytes",
                "connections.min_body_rate",
                "connections.body_rate_grace",
                "connections.max_body_bytes_in_flight",
            ]
        );
        assert_eq!(
            message(&found, "connections.min_body_rate"),
            "must be 0..=1073741824, got 2147483648"
        );
        assert_eq!(
            message(&found, "connections.body_rate_grace"),
            "must not exceed connections.body_read_timeout"
        );
        assert_eq!(
            message(&found, "connections.max_body_bytes_in_flight"),
            "must be at least limits.max_body_bytes (2097152), or no body of that size is ever read"
        );
        assert_eq!(
            message(&found, "connections.max_per_listener"),
            "must be 1..=1000000, got 0"
        );
        assert_eq!(
            message(&found, "connections.header_read_timeout"),
            "must be greater than 0"
        );
        assert_eq!(
            message(&found, "connections.max_header_bytes"),
            "must be 1024..=1048576, got 100"
        );
    }

    #[test]
    fn writer_id_is_a_short_plain_prefix() {
        let bads = [
            String::new(),
            "w".repeat(33),
            "w".repeat(64),
            "web 7".into(),
            "wéb-7".into(),
            "web/7".into(),
        ];
        for bad in bads {
            let found = pushed(|p| {
                validate_writer_id(Some(bad.clone()), p);
            });
            assert_eq!(
                found,
                [(
                    "writer_id".to_owned(),
                    "must be 1 to 32 characters of A-Z a-z 0-9 . _ -".to_owned()
                )],
                "{bad:?}"
            );
        }
        let found = pushed(|p| {
            assert_eq!(
                validate_writer_id(Some("proxy-a".into()), p).as_deref(),
                Some("proxy-a")
            );
            let longest = "Az09._-".repeat(5)[..32].to_owned();
            assert_eq!(
                validate_writer_id(Some(longest.clone()), p).as_deref(),
                Some(longest.as_str())
            );
            assert_eq!(validate_writer_id(None, p), None);
        });
        assert_eq!(found, Vec::<(String, String)>::new());
    }

    #[test]
    fn admin_section_reports_its_problems() {
        let found = pushed(|p| {
            RawAdmin {
                token_env: String::new(),
            }
            .validate(p);
        });
        assert_eq!(
            found,
            [(
                "admin.token_env".to_owned(),
                "must name an environment variable".to_owned()
            )]
        );
    }

    #[test]
    fn wal_section_reports_its_problems_whatever_the_durability() {
        let bad = || RawWal {
            dir: String::new(),
            segment_bytes: 100,
            max_bytes: 1 << 10,
            replay_wait: "soon".into(),
        };
        for durability in [RawDurability::Memory, RawDurability::Wal] {
            let found = pushed(|p| {
                bad().validate(durability, p);
            });
            assert_eq!(
                paths(&found),
                [
                    "wal.segment_bytes",
                    "wal.max_bytes",
                    "wal.replay_wait",
                    "wal.dir"
                ]
            );
            assert_eq!(
                message(&found, "wal.segment_bytes"),
                "must be 4096..=17179869184, got 100"
            );
            assert_eq!(message(&found, "wal.dir"), "must be a path");
        }
        let raw = RawWal {
            segment_bytes: 1 << 20,
            max_bytes: 1 << 20,
            ..RawWal::default()
        };
        let found = pushed(|p| {
            raw.validate(RawDurability::Wal, p);
        });
        assert_eq!(
            found,
            [(
                "wal.max_bytes".to_owned(),
                "must be at least twice wal.segment_bytes (the open segment is never deleted)"
                    .to_owned()
            )]
        );
        let found = pushed(|p| {
            assert!(
                RawWal::default()
                    .validate(RawDurability::Memory, p)
                    .is_none()
            );
            let wal = RawWal::default()
                .validate(RawDurability::Wal, p)
                .expect("durability: wal");
            assert_eq!(wal.dir, PathBuf::from("wal"));
            assert_eq!(wal.replay_wait, Duration::from_secs(10));
        });
        assert_eq!(found, Vec::<(String, String)>::new());
    }

    #[test]
    fn listen_section_reports_its_problems() {
        let raw = RawListen {
            http: "nowhere".into(),
            admin: "127.0.0.1".into(),
            ..RawListen::default()
        };
        let found = pushed(|p| {
            raw.validate(p);
        });
        assert_eq!(paths(&found), ["listen.http", "listen.admin"]);
        assert_eq!(
            message(&found, "listen.http"),
            "\"nowhere\" is not an address like 127.0.0.1:8080"
        );
    }

    /// Issue #23 item 1: HTTPS per listener. `listen.tls` serves both,
    /// `http_tls` / `admin_tls` one each (and win over `tls`).
    #[test]
    fn listen_tls_applies_to_both_listeners_or_one() {
        let cfg = ProxyConfig::defaults();
        assert_eq!((cfg.http_tls, cfg.admin_tls), (None, None));
        let tls = |cert: &str, key: &str| TlsConfig {
            cert: cert.into(),
            key: key.into(),
        };
        let cfg = ProxyConfig::from_yaml(
            "listen:\n  tls:\n    cert: /c.pem\n    key: /k.pem\n",
            vec![],
        )
        .expect("valid");
        assert_eq!(cfg.http_tls, Some(tls("/c.pem", "/k.pem")));
        assert_eq!(cfg.admin_tls, Some(tls("/c.pem", "/k.pem")));
        let cfg = ProxyConfig::from_yaml(
            "listen:\n  tls: {cert: /c.pem, key: /k.pem}\n  admin_tls: {cert: /a.pem, key: /ak.pem}\n",
            vec![],
        )
        .expect("valid");
        assert_eq!(cfg.http_tls, Some(tls("/c.pem", "/k.pem")));
        assert_eq!(cfg.admin_tls, Some(tls("/a.pem", "/ak.pem")));
        let cfg =
            ProxyConfig::from_yaml("listen:\n  http_tls: {cert: /c.pem, key: /k.pem}\n", vec![])
                .expect("valid");
        assert_eq!(cfg.admin_tls, None);
        assert!(cfg.http_tls.is_some());

        let invalid = ProxyConfig::from_yaml(
            "listen:\n  tls: {cert: /c.pem}\n  admin_tls: {cert: /c.pem, key: /k.pem, ca: /x}\n",
            vec![],
        )
        .expect_err("invalid");
        let text = invalid.to_string();
        assert!(text.contains("listen.tls.key"), "{text}");
        assert!(text.contains("listen.admin_tls.ca"), "{text}");
    }

    /// The files are read at load (relative to proxy.yaml), and a file
    /// that is missing, not PEM, or a key of another certificate is a
    /// problem naming the listener and the file.
    #[test]
    fn listen_tls_files_are_checked_at_load() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = tally_harness::TestCa::new("test").expect("ca");
        let files = ca
            .write_server(dir.path(), "server", &["127.0.0.1"])
            .expect("files");
        let other = ca
            .write_server(&dir.path().join("other"), "server", &["127.0.0.1"])
            .expect("files");
        let config = dir.path().join("proxy.yaml");
        let load = |yaml: &str| {
            std::fs::write(&config, yaml).expect("write");
            ProxyConfig::load(&config)
        };
        let cfg = load("listen:\n  tls: {cert: server.pem, key: server-key.pem}\n").expect("valid");
        assert_eq!(cfg.http_tls.as_ref().map(|t| &t.cert), Some(&files.cert));
        assert!(cfg.http_tls.expect("tls").load().is_ok());

        std::fs::write(dir.path().join("garbage.pem"), "not pem").expect("write");
        for (yaml, want) in [
            (
                "listen:\n  http_tls: {cert: missing.pem, key: server-key.pem}\n".to_owned(),
                "listen.http_tls: cannot read certificate file",
            ),
            (
                "listen:\n  admin_tls: {cert: garbage.pem, key: server-key.pem}\n".to_owned(),
                "holds no certificate",
            ),
            (
                "listen:\n  tls: {cert: server.pem, key: garbage.pem}\n".to_owned(),
                "holds no PEM private key",
            ),
            (
                format!(
                    "listen:\n  tls: {{cert: server.pem, key: {}}}\n",
                    other.key.display()
                ),
                "do not make a usable certificate",
            ),
        ] {
            let err = load(&yaml).expect_err(&yaml).to_string();
            assert!(err.contains(want), "{yaml}: {err}");
        }
    }

    #[test]
    fn topology_section_reports_its_problems() {
        let raw = RawTopology {
            file: String::new(),
            watch_interval: "x".into(),
            store: Some("postgres://tally@db1/tally_meta".into()),
            poll_interval: "y".into(),
            heartbeat_interval: "z".into(),
            alive_window: "w".into(),
        };
        let found = pushed(|p| {
            assert!(raw.validate(p).store.is_none());
        });
        assert_eq!(
            paths(&found),
            [
                "topology.file",
                "topology.watch_interval",
                "topology.store",
                "topology.poll_interval",
                "topology.heartbeat_interval",
                "topology.alive_window",
            ]
        );
        assert_eq!(message(&found, "topology.file"), "must be a path");
        assert_eq!(
            message(&found, "topology.store"),
            "invalid DSN: scheme must be mysql://, not postgres://"
        );
        let raw = RawTopology {
            store: Some("mysql://tally@db1/tally_meta".into()),
            ..RawTopology::default()
        };
        let found = pushed(|p| {
            assert!(raw.validate(p).store.is_some());
        });
        assert_eq!(found, Vec::<(String, String)>::new());

        // Issue #23 item 2: the store's password from a file; an unreadable
        // one is a problem naming the path.
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("store.pw").display().to_string();
        std::fs::write(&file, "s3cret\n").expect("write");
        let raw = RawTopology {
            store: Some(format!("mysql://tally@db1/tally_meta?password_file={file}")),
            ..RawTopology::default()
        };
        let found = pushed(|p| {
            let store = raw.validate(p).store.expect("store");
            assert_eq!(store.password.as_deref(), Some("s3cret"));
            assert!(!format!("{store} {store:?}").contains("s3cret"));
        });
        assert_eq!(found, Vec::<(String, String)>::new());
        let raw = RawTopology {
            store: Some("mysql://tally@db1/tally_meta?password_file=/nonexistent/store.pw".into()),
            ..RawTopology::default()
        };
        let found = pushed(|p| {
            assert!(raw.validate(p).store.is_none());
        });
        assert_eq!(paths(&found), ["topology.store"]);
        assert!(
            message(&found, "topology.store")
                .starts_with("cannot read password_file /nonexistent/store.pw: "),
            "{found:?}"
        );
    }

    #[test]
    fn events_limits_reads_and_health_sections_report_their_problems() {
        let found = pushed(|p| {
            RawEvents {
                max_age: "x".into(),
                max_future: "-5m".into(),
            }
            .validate(p);
            RawLimits {
                max_events: 0,
                max_body_bytes: 1 << 33,
            }
            .validate(p);
            RawReads {
                max_replica_lag: "never".into(),
                ..RawReads::default()
            }
            .validate(p);
            RawHealth {
                interval: "x".into(),
                timeout: "y".into(),
            }
            .validate(p);
        });
        assert_eq!(
            paths(&found),
            [
                "events.max_age",
                "events.max_future",
                "limits.max_events",
                "limits.max_body_bytes",
                "reads.max_replica_lag",
                "health.interval",
                "health.timeout",
            ]
        );
        assert_eq!(
            message(&found, "limits.max_body_bytes"),
            "must be 1..=4294967296, got 8589934592"
        );
    }

    #[test]
    fn read_coalescing_and_cache_have_defaults_an_off_switch_and_bounds() {
        let cfg = ProxyConfig::defaults();
        let c = cfg.reads.coalesce.expect("coalescing is on by default");
        assert_eq!((c.max_batch, c.max_in_flight), (128, 2));
        assert_eq!(c.window, Duration::ZERO);
        let k = cfg.reads.cache.expect("the cache is on by default");
        assert_eq!(k.max_age, Duration::from_millis(100));
        assert_eq!((k.max_entries, k.max_bytes), (100_000, 32 << 20));
        let off = "reads:\n  coalesce:\n    enabled: false\n  cache:\n    enabled: false\n";
        let cfg = ProxyConfig::from_yaml(off, no_env()).expect("off");
        assert!(cfg.reads.coalesce.is_none() && cfg.reads.cache.is_none());
        let found = pushed(|p| {
            RawReads {
                coalesce: RawCoalesce {
                    max_batch: 0,
                    max_in_flight: 65,
                    window: "2s".into(),
                    ..RawCoalesce::default()
                },
                cache: RawReadCache {
                    max_age: "0s".into(),
                    max_entries: 0,
                    max_bytes: 1,
                    ..RawReadCache::default()
                },
                ..RawReads::default()
            }
            .validate(p);
        });
        assert_eq!(
            paths(&found),
            [
                "reads.coalesce.max_batch",
                "reads.coalesce.max_in_flight",
                "reads.coalesce.window",
                "reads.cache.max_age",
                "reads.cache.max_entries",
                "reads.cache.max_bytes",
            ]
        );
    }

    #[test]
    fn retention_section_reports_its_problems() {
        let raw = RawRetention {
            minute: "30m".into(),
            hour: "forever".into(),
            day: "x".into(),
            interval: "y".into(),
            chunk_rows: 0,
        };
        let found = pushed(|p| {
            assert_eq!(raw.validate(p).hour, None);
        });
        // An unparsable tier is also shorter than an hour (it reads as 0).
        assert_eq!(
            paths(&found),
            [
                "retention.minute",
                "retention.day",
                "retention.day",
                "retention.interval",
                "retention.chunk_rows",
            ]
        );
        assert_eq!(
            message(&found, "retention.minute"),
            "must be at least 1h, or `forever`"
        );
    }

    #[test]
    fn failover_section_reports_its_problems() {
        let found = pushed(|p| {
            RawFailover {
                mode: "sometimes".into(),
                after: 0,
                unreachable_after: "5s".into(),
            }
            .validate(p);
        });
        assert_eq!(
            found,
            [
                (
                    "failover.mode".to_owned(),
                    "\"sometimes\" must be manual or auto".to_owned()
                ),
                (
                    "failover.after".to_owned(),
                    "must be 1..=1000, got 0".to_owned()
                ),
            ]
        );
        let found = pushed(|p| {
            let failover = RawFailover {
                mode: "auto".into(),
                after: 5,
                unreachable_after: "10s".into(),
            }
            .validate(p);
            assert!(failover.auto);
            assert_eq!(failover.after, 5);
            assert_eq!(failover.unreachable_after, Duration::from_secs(10));
        });
        assert_eq!(found, Vec::<(String, String)>::new());
    }

    #[test]
    fn reshard_section_reports_its_problems() {
        let raw = RawReshard {
            poll_interval: "x".into(),
            chunk_counters: 0,
            max_rows_per_sec: 0,
            adaptive_ratio: 0.5,
            min_rows_per_sec: 0,
            cleanup_grace: "1s".into(),
            delete_rows: 0,
        };
        let found = pushed(|p| {
            raw.validate(Duration::from_secs(3), p);
        });
        assert_eq!(
            paths(&found),
            [
                "reshard.cleanup_grace",
                "reshard.poll_interval",
                "reshard.chunk_counters",
                "reshard.max_rows_per_sec",
                "reshard.adaptive_ratio",
                "reshard.min_rows_per_sec",
                "reshard.delete_rows",
            ]
        );
        assert!(
            message(&found, "reshard.cleanup_grace")
                .starts_with("must be at least pool.connect_timeout (3s)"),
            "{found:?}"
        );
        assert_eq!(
            message(&found, "reshard.adaptive_ratio"),
            "0.5 must be 0 (off) or between 1 and 100"
        );
        // The grace only has to cover the read timeout it is given.
        let found = pushed(|p| {
            RawReshard {
                cleanup_grace: "1s".into(),
                ..RawReshard::default()
            }
            .validate(Duration::from_secs(1), p);
        });
        assert_eq!(found, Vec::<(String, String)>::new());
    }

    #[test]
    fn shutdown_drain_deadline_defaults_to_30s_and_is_positive() {
        let cfg = ProxyConfig::from_yaml("", no_env()).expect("defaults");
        assert_eq!(cfg.shutdown.drain_deadline, Duration::from_secs(30));
        let set =
            ProxyConfig::from_yaml("shutdown:\n  drain_deadline: 2m\n", no_env()).expect("valid");
        assert_eq!(set.shutdown.drain_deadline, Duration::from_secs(120));
        for (bad, want) in [
            ("0s", "must be greater than 0"),
            ("never", "is not a duration"),
        ] {
            let err =
                ProxyConfig::from_yaml(&format!("shutdown:\n  drain_deadline: {bad}\n"), no_env())
                    .expect_err("invalid");
            assert_eq!(err.problems.len(), 1, "{bad}: {err}");
            assert_eq!(err.problems[0].path, "shutdown.drain_deadline");
            assert!(err.problems[0].message.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn shutdown_flush_deadline_is_optional_and_positive() {
        let none = ProxyConfig::from_yaml("", no_env()).expect("defaults");
        assert_eq!(none.shutdown.flush_deadline, None);
        let set =
            ProxyConfig::from_yaml("shutdown:\n  flush_deadline: 5m\n", no_env()).expect("valid");
        assert_eq!(set.shutdown.flush_deadline, Some(Duration::from_secs(300)));
        for bad in ["0s", "soon"] {
            let err =
                ProxyConfig::from_yaml(&format!("shutdown:\n  flush_deadline: {bad}\n"), no_env())
                    .expect_err("invalid");
            let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
            assert_eq!(paths, ["shutdown.flush_deadline"], "{bad}");
        }
    }

    /// The documented `config/proxy.yaml` (every default, with comments)
    /// is a valid configuration.
    #[test]
    fn the_documented_proxy_yaml_is_valid() {
        let text = include_str!("../../config/proxy.yaml");
        if let Err(e) = ProxyConfig::from_yaml(text, no_env()) {
            panic!("config/proxy.yaml: {e}");
        }
    }

    #[test]
    fn problems_in_every_section_are_reported_together() {
        let text = r#"
listen:
  http: nowhere
admin:
  token_env: ""
topology:
  file: ""
  store: "postgres://tally@db1/tally_meta"
writer_id: ""
buffer:
  flush_interval: 0s
events:
  max_age: soon
limits:
  max_events: 0
retention:
  minute: 5m
reads:
  max_replica_lag: never
health:
  timeout: never
failover:
  mode: sometimes
pool:
  min: 20
  max: 10
reshard:
  delete_rows: 0
connections:
  idle_timeout: 0s
durability: wal
wal:
  dir: ""
"#;
        let err = ProxyConfig::from_yaml(text, no_env()).expect_err("invalid");
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "buffer.flush_interval",
                "pool.min",
                "connections.idle_timeout",
                "writer_id",
                "admin.token_env",
                "wal.dir",
                "listen.http",
                "topology.file",
                "topology.store",
                "events.max_age",
                "limits.max_events",
                "retention.minute",
                "reads.max_replica_lag",
                "health.timeout",
                "failover.mode",
                "reshard.delete_rows",
            ],
            "{err}"
        );
        assert!(err.to_string().starts_with("16 problems\n"), "{err}");
    }
}
