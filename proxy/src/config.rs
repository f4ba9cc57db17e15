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
use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::Value;
use tally_admin::{Invalid, Problems, yaml};

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
    /// Name of the environment variable holding the admin bearer token.
    pub admin_token_env: String,
    /// The admin bearer token, read from `admin_token_env` by [`ProxyConfig::load`].
    pub admin_token: Option<Secret>,
    /// Absolute, or relative to the directory of `proxy.yaml`.
    pub topology_file: PathBuf,
    /// How often the topology file is checked for changes.
    pub topology_watch_interval: Duration,
    /// The shared topology store (`mysql://…/tally_meta`); `None` = the file.
    pub topology_store: Option<tally_admin::Dsn>,
    /// How often the store is polled for a newer version.
    pub store_poll_interval: Duration,
    /// How often this proxy's registry row is refreshed.
    pub heartbeat_interval: Duration,
    /// Identity used in the `(writer_id, seq)` dedup rows; random when unset.
    pub writer_id: Option<String>,
    pub buffer: BufferConfig,
    pub events: EventsConfig,
    pub limits: LimitsConfig,
    pub retention: RetentionConfig,
    pub reads: ReadsConfig,
    pub health: HealthConfig,
    pub failover: FailoverConfig,
    pub pool: PoolConfig,
    pub reshard: ReshardConfig,
    pub connections: ConnectionsConfig,
    /// `durability: wal`: the write-ahead log; `None` = `durability: memory`.
    pub wal: Option<WalConfig>,
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
    /// Per-group bound on pending (counter, minute) entries; beyond it
    /// writes routed to that group get 503.
    pub max_pending_rows: usize,
    /// How long a flush waits for more writes when `ack=committed` waiters exist.
    pub commit_linger: Duration,
    /// How long `ack=committed` waits before answering 504.
    pub commit_timeout: Duration,
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
}

/// `failover.mode: auto` promotes a replica when the master failed `after`
/// health probes in a row.
#[derive(Debug, Clone)]
pub struct FailoverConfig {
    pub auto: bool,
    pub after: u32,
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
    reads: RawReads,
    health: RawHealth,
    failover: RawFailover,
    pool: RawPool,
    reshard: RawReshard,
    connections: RawConnections,
    durability: RawDurability,
    wal: RawWal,
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
}

impl Default for RawConnections {
    fn default() -> Self {
        Self {
            max_per_listener: 10_000,
            header_read_timeout: "10s".into(),
            idle_timeout: "75s".into(),
            max_header_bytes: 16 * 1024,
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawFailover {
    mode: String,
    after: u64,
}

impl Default for RawFailover {
    fn default() -> Self {
        Self {
            mode: "manual".into(),
            after: 3,
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawListen {
    http: String,
    admin: String,
}

impl Default for RawListen {
    fn default() -> Self {
        Self {
            http: DEFAULT_HTTP.into(),
            admin: DEFAULT_ADMIN.into(),
        }
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
}

impl Default for RawTopology {
    fn default() -> Self {
        Self {
            file: "topology.yaml".into(),
            watch_interval: "1s".into(),
            store: None,
            poll_interval: "500ms".into(),
            heartbeat_interval: "1s".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawBuffer {
    flush_interval: String,
    flush_rows: u64,
    max_pending_rows: u64,
    commit_linger: String,
    commit_timeout: String,
    retry_min: String,
    retry_max: String,
}

impl Default for RawBuffer {
    fn default() -> Self {
        Self {
            flush_interval: "1s".into(),
            flush_rows: 200_000,
            max_pending_rows: 2_000_000,
            commit_linger: "2ms".into(),
            commit_timeout: "10s".into(),
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
struct RawReads {
    max_replica_lag: String,
}

impl Default for RawReads {
    fn default() -> Self {
        Self {
            max_replica_lag: "5s".into(),
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

fn validate(raw: Raw, p: &mut Problems) -> ProxyConfig {
    let buffer = BufferConfig {
        flush_interval: duration(p, "buffer.flush_interval", &raw.buffer.flush_interval),
        flush_rows: count(
            p,
            "buffer.flush_rows",
            raw.buffer.flush_rows,
            1,
            100_000_000,
        ),
        max_pending_rows: count(
            p,
            "buffer.max_pending_rows",
            raw.buffer.max_pending_rows,
            1,
            1_000_000_000,
        ),
        commit_linger: duration(p, "buffer.commit_linger", &raw.buffer.commit_linger),
        commit_timeout: duration(p, "buffer.commit_timeout", &raw.buffer.commit_timeout),
        retry_min: duration(p, "buffer.retry_min", &raw.buffer.retry_min),
        retry_max: duration(p, "buffer.retry_max", &raw.buffer.retry_max),
    };
    // A zero interval that parsed (`0s`) is its own problem; an unparsable
    // one was reported already.
    if buffer.flush_interval.is_zero() && parse_duration(&raw.buffer.flush_interval).is_ok() {
        p.push("buffer.flush_interval", "must be greater than 0");
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
    let pool = PoolConfig {
        min: count(p, "pool.min", raw.pool.min, 0, 1000),
        max: count(p, "pool.max", raw.pool.max, 1, 1000),
        connect_timeout: duration(p, "pool.connect_timeout", &raw.pool.connect_timeout),
    };
    let read_timeout = pool.connect_timeout;
    if pool.min > pool.max {
        p.push("pool.min", "must not exceed pool.max");
    }
    let connections = ConnectionsConfig {
        max_per_listener: count(
            p,
            "connections.max_per_listener",
            raw.connections.max_per_listener,
            1,
            1_000_000,
        ),
        header_read_timeout: positive(
            p,
            "connections.header_read_timeout",
            &raw.connections.header_read_timeout,
        ),
        idle_timeout: positive(p, "connections.idle_timeout", &raw.connections.idle_timeout),
        max_header_bytes: count(
            p,
            "connections.max_header_bytes",
            raw.connections.max_header_bytes,
            1024,
            1024 * 1024,
        ),
    };
    if let Some(w) = &raw.writer_id
        && !(1..=64).contains(&w.len())
    {
        p.push("writer_id", "must be 1 to 64 bytes");
    }
    if raw.admin.token_env.is_empty() {
        p.push("admin.token_env", "must name an environment variable");
    }
    if raw.topology.file.is_empty() {
        p.push("topology.file", "must be a path");
    }
    let wal = WalConfig {
        dir: PathBuf::from(&raw.wal.dir),
        segment_bytes: count(p, "wal.segment_bytes", raw.wal.segment_bytes, 4096, 1 << 34) as u64,
        max_bytes: count(p, "wal.max_bytes", raw.wal.max_bytes, 1 << 20, 1 << 50) as u64,
        replay_wait: duration(p, "wal.replay_wait", &raw.wal.replay_wait),
    };
    if wal.max_bytes < 2 * wal.segment_bytes {
        p.push(
            "wal.max_bytes",
            "must be at least twice wal.segment_bytes (the open segment is never deleted)",
        );
    }
    if raw.wal.dir.is_empty() {
        p.push("wal.dir", "must be a path");
    }
    ProxyConfig {
        http_addr: addr(p, "listen.http", &raw.listen.http),
        admin_addr: addr(p, "listen.admin", &raw.listen.admin),
        admin_token_env: raw.admin.token_env,
        admin_token: None,
        topology_watch_interval: duration(
            p,
            "topology.watch_interval",
            &raw.topology.watch_interval,
        ),
        topology_store: raw.topology.store.as_deref().and_then(
            |text| match tally_admin::Dsn::parse(text) {
                Ok(dsn) => Some(dsn),
                Err(why) => {
                    p.push("topology.store", format!("invalid DSN: {why}"));
                    None
                }
            },
        ),
        store_poll_interval: duration(p, "topology.poll_interval", &raw.topology.poll_interval),
        heartbeat_interval: duration(
            p,
            "topology.heartbeat_interval",
            &raw.topology.heartbeat_interval,
        ),
        topology_file: PathBuf::from(raw.topology.file),
        writer_id: raw.writer_id,
        buffer,
        events: EventsConfig {
            max_age: duration(p, "events.max_age", &raw.events.max_age),
            max_future: duration(p, "events.max_future", &raw.events.max_future),
        },
        limits: LimitsConfig {
            max_events: count(p, "limits.max_events", raw.limits.max_events, 1, 10_000_000),
            max_body_bytes: count(
                p,
                "limits.max_body_bytes",
                raw.limits.max_body_bytes,
                1,
                1 << 32,
            ),
        },
        retention: RetentionConfig {
            minute: retention(p, "retention.minute", &raw.retention.minute),
            hour: retention(p, "retention.hour", &raw.retention.hour),
            day: retention(p, "retention.day", &raw.retention.day),
            interval: duration(p, "retention.interval", &raw.retention.interval),
            chunk_rows: count(
                p,
                "retention.chunk_rows",
                raw.retention.chunk_rows,
                1,
                100_000,
            ),
        },
        reads: ReadsConfig {
            max_replica_lag: duration(p, "reads.max_replica_lag", &raw.reads.max_replica_lag),
        },
        health: HealthConfig {
            interval: duration(p, "health.interval", &raw.health.interval),
            timeout: duration(p, "health.timeout", &raw.health.timeout),
        },
        failover: FailoverConfig {
            auto: match raw.failover.mode.as_str() {
                "auto" => true,
                "manual" => false,
                other => {
                    p.push("failover.mode", format!("{other:?} must be manual or auto"));
                    false
                }
            },
            after: count(p, "failover.after", raw.failover.after, 1, 1000) as u32,
        },
        pool,
        reshard: ReshardConfig {
            cleanup_grace: {
                // A moved-key read spends at most one read timeout
                // (pool.connect_timeout) between its target snapshot and its
                // source read; cleanup must not start inside that window.
                let grace = duration(p, "reshard.cleanup_grace", &raw.reshard.cleanup_grace);
                if grace < read_timeout && parse_duration(&raw.reshard.cleanup_grace).is_ok() {
                    p.push(
                        "reshard.cleanup_grace",
                        format!(
                            "must be at least pool.connect_timeout ({read_timeout:?}), the longest a read of a moved key waits between its two groups"
                        ),
                    );
                }
                grace
            },
            poll_interval: duration(p, "reshard.poll_interval", &raw.reshard.poll_interval),
            chunk_counters: count(
                p,
                "reshard.chunk_counters",
                raw.reshard.chunk_counters,
                1,
                100_000,
            ),
            max_rows_per_sec: count(
                p,
                "reshard.max_rows_per_sec",
                raw.reshard.max_rows_per_sec,
                1,
                100_000_000,
            ),
            adaptive_ratio: {
                let r = raw.reshard.adaptive_ratio;
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
                raw.reshard.min_rows_per_sec,
                1,
                100_000_000,
            )
            .min(raw.reshard.max_rows_per_sec.max(1) as usize),
            delete_rows: count(
                p,
                "reshard.delete_rows",
                raw.reshard.delete_rows,
                1,
                100_000,
            ),
        },
        connections,
        wal: (raw.durability == RawDurability::Wal).then_some(wal),
    }
}

/// Parses `500ms`, `1s`, `5m`, `7d`, ...
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like 500ms, 1s, 7d ({e})"))
}

fn duration(p: &mut Problems, path: &str, text: &str) -> Duration {
    parse_duration(text).unwrap_or_else(|why| {
        p.push(path, why);
        Duration::ZERO
    })
}

/// A duration that must be greater than zero (a zero timeout would cut
/// every connection at once).
fn positive(p: &mut Problems, path: &str, text: &str) -> Duration {
    let d = duration(p, path, text);
    if d.is_zero() && parse_duration(text).is_ok() {
        p.push(path, "must be greater than 0");
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
        let text = "
connections:
  max_per_listener: 0
  header_read_timeout: 0s
  idle_timeout: never
  max_header_bytes: 100
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
            ],
            "{err}"
        );
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
}
