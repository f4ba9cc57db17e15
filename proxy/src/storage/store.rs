//! The shared topology store: versioned topology documents, the proxy
//! registry and leases, in a MariaDB database every proxy reaches.
//!
//! With `topology.store` set, the store (not the file) is the source of
//! truth: a change made through any proxy is inserted as the next version
//! (the primary key makes it a compare-and-set), and every proxy polls
//! `MAX(version)` (a cheap index lookup) and applies what is newer. When the
//! store is unreachable the proxies keep serving reads with the topology
//! they have; changes are refused, and so are writes once this proxy's
//! [`StoreLease`] has lapsed (others may have taken it for gone).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use mysql_async::prelude::*;
use mysql_async::{Conn, Pool};
use serde::Serialize;
use tally_admin::Dsn;

use crate::config::PoolConfig;
use crate::storage::db::{self, DbError};
use crate::telemetry;

const ER_DUP_ENTRY: u16 = 1062;

/// How long a proxy is taken for alive after its last heartbeat unless
/// configured (`topology.alive_window`).
pub const DEFAULT_ALIVE_WINDOW: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("version {0} already exists in the topology store")]
    Conflict(u64),
    #[error("the topology store is unreachable: {0}")]
    Unavailable(String),
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

impl From<mysql_async::Error> for StoreError {
    fn from(e: mysql_async::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// One registered proxy, as `GET /admin/v1/proxies` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ProxyInfo {
    pub id: String,
    pub http: String,
    pub admin: String,
    pub version: u64,
    pub pending: u64,
    /// The newest routing change this proxy has settled (see
    /// `reshard::settle`).
    pub settled: u64,
    /// Milliseconds since the last heartbeat.
    pub last_seen_ms: u64,
    pub alive: bool,
}

pub struct Store {
    pub dsn: Dsn,
    pool: Pool,
    timeout: Duration,
    /// A proxy whose last heartbeat is older than this is shown as gone.
    alive_window: Duration,
}

impl Store {
    /// A store handle; the schema is applied by [`Store::init`].
    pub fn new(dsn: Dsn, cfg: &PoolConfig) -> Store {
        let small = PoolConfig {
            min: 0,
            max: 4,
            connect_timeout: cfg.connect_timeout,
        };
        Store {
            pool: db::pool(&dsn, &small),
            dsn,
            timeout: cfg.connect_timeout,
            alive_window: DEFAULT_ALIVE_WINDOW,
        }
    }

    /// The registry's alive window (`topology.alive_window`).
    pub fn with_alive_window(mut self, window: Duration) -> Store {
        self.alive_window = window;
        self
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        Ok(db::conn(&self.pool, self.timeout).await?)
    }

    /// Bounds every store operation: a hung store must not hang a caller.
    async fn bounded<T>(
        &self,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let limit = self.timeout * 2;
        tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "no answer within {limit:?}"
            )))
        })
    }

    /// Creates the database and tables if needed.
    pub async fn init(&self) -> Result<(), StoreError> {
        self.bounded(async {
            let c = db::prepare_database(&self.dsn, &tally_schema::meta_statements()).await?;
            c.disconnect().await?;
            Ok(())
        })
        .await
    }

    /// The newest version number (0 when the store is empty).
    pub async fn latest_version(&self) -> Result<u64, StoreError> {
        self.bounded(async {
            let mut c = self.conn().await?;
            let v: Option<Option<u64>> = c
                .query_first("SELECT MAX(version) FROM topology_versions")
                .await?;
            Ok(v.flatten().unwrap_or(0))
        })
        .await
    }

    /// The newest document and its version.
    pub async fn latest(&self) -> Result<Option<(u64, String)>, StoreError> {
        self.bounded(async {
            let mut c = self.conn().await?;
            Ok(c.query_first(
                "SELECT version, doc FROM topology_versions ORDER BY version DESC LIMIT 1",
            )
            .await?)
        })
        .await
    }

    /// Compare-and-set: records `doc` as `version`, which must not exist.
    pub async fn insert(
        &self,
        version: u64,
        doc: &str,
        source: &str,
        proxy_id: &str,
    ) -> Result<(), StoreError> {
        self.bounded(async {
            let mut c = self.conn().await?;
            let r = c
                .exec_drop(
                    "INSERT INTO topology_versions (version, doc, source, proxy_id) VALUES (?, ?, ?, ?)",
                    (version, doc, source, proxy_id),
                )
                .await;
            match r {
                Ok(()) => Ok(()),
                Err(mysql_async::Error::Server(e)) if e.code == ER_DUP_ENTRY => Err(StoreError::Conflict(version)),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// How many stored versions came from `source` (e.g. `promotion`).
    pub async fn count_source(&self, source: &str) -> Result<u64, StoreError> {
        self.bounded(async {
            let mut c = self.conn().await?;
            let n: Option<u64> = c
                .exec_first(
                    "SELECT COUNT(*) FROM topology_versions WHERE source = ?",
                    (source,),
                )
                .await?;
            Ok(n.unwrap_or(0))
        })
        .await
    }

    /// Records this proxy's heartbeat.
    pub async fn heartbeat(
        &self,
        id: &str,
        http: &str,
        admin: &str,
        version: u64,
        pending: u64,
        settled: u64,
    ) -> Result<(), StoreError> {
        self.bounded(async {
            let mut c = self.conn().await?;
            c.exec_drop(
                "INSERT INTO proxies (id, http, admin, version, pending, settled, last_seen) VALUES (?, ?, ?, ?, ?, ?, NOW(3)) \
                 ON DUPLICATE KEY UPDATE http = VALUES(http), admin = VALUES(admin), version = VALUES(version), \
                 pending = VALUES(pending), settled = VALUES(settled), last_seen = NOW(3)",
                (id, http, admin, version, pending, settled),
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// Every registered proxy, newest heartbeat first.
    pub async fn proxies(&self) -> Result<Vec<ProxyInfo>, StoreError> {
        self.bounded(async {
            let mut c = self.conn().await?;
            let rows: Vec<(String, String, String, u64, u64, u64, i64)> = c
                .query(
                    "SELECT id, http, admin, version, pending, settled, \
                     CAST(TIMESTAMPDIFF(MICROSECOND, last_seen, NOW(3)) DIV 1000 AS SIGNED) \
                     FROM proxies ORDER BY last_seen DESC, id",
                )
                .await?;
            Ok(rows
                .into_iter()
                .map(|(id, http, admin, version, pending, settled, ms)| {
                    let ms = ms.max(0) as u64;
                    ProxyInfo {
                        id,
                        http,
                        admin,
                        version,
                        pending,
                        settled,
                        last_seen_ms: ms,
                        alive: u128::from(ms) <= self.alive_window.as_millis(),
                    }
                })
                .collect())
        })
        .await
    }

    /// Takes or renews the lease `name` for `holder` for `ttl`; true when
    /// `holder` holds it afterwards. Expiry is judged by the store's clock.
    /// (MariaDB applies the assignments left to right, so `expires_at` is
    /// refreshed only when `holder` is, by then, the caller.)
    pub async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.bounded(async {
            let mut c = self.conn().await?;
            let micros = ttl.as_micros() as u64;
            c.exec_drop(
                "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, NOW(3) + INTERVAL ? MICROSECOND) \
                 ON DUPLICATE KEY UPDATE \
                 holder = IF(expires_at < NOW(3) OR holder = VALUES(holder), VALUES(holder), holder), \
                 expires_at = IF(holder = VALUES(holder), VALUES(expires_at), expires_at)",
                (name, holder, micros),
            )
            .await?;
            let owner: Option<String> = c.exec_first("SELECT holder FROM leases WHERE name = ?", (name,)).await?;
            Ok(owner.as_deref() == Some(holder))
        })
        .await
    }
}

/// This proxy's right to write while it follows a shared store.
///
/// Other proxies (and the reshard driver) judge whether a proxy is alive by
/// its last heartbeat row: silent for the alive window, it is taken for
/// gone and no longer waited for, while it may still route by an old ring.
/// So a proxy holds a lease renewed by each heartbeat the store recorded,
/// counted from when that heartbeat was *sent* (the row's time is later,
/// and a slow answer must not extend the lease): past `fence_after`
/// (shorter than the window) without one, it is *fenced* and refuses
/// writes. A lapsed lease is not restored by the next heartbeat alone:
/// the proxy may have been taken for gone meanwhile, so it also has to
/// read the store (and apply what is newer) with a read sent after that
/// heartbeat was recorded. A new proxy starts lapsed: it writes only once
/// it is registered and has read the store.
pub struct StoreLease {
    origin: Instant,
    fence_after: Duration,
    /// Nanoseconds after `origin` at which the newest recorded heartbeat
    /// was sent, plus one (0: never).
    renewed: AtomicU64,
    /// False from a lapse until a read covers it.
    synced: AtomicBool,
    /// Read the store at least once (readiness).
    ever_synced: AtomicBool,
    /// The state last reported (log line and gauge), to report changes once.
    reported_fenced: AtomicBool,
    /// After a lapse: the instant a covering read must be sent after.
    read_after: Mutex<Option<Instant>>,
}

impl StoreLease {
    pub fn new(fence_after: Duration) -> StoreLease {
        StoreLease {
            origin: Instant::now(),
            fence_after,
            renewed: AtomicU64::new(0),
            synced: AtomicBool::new(false),
            ever_synced: AtomicBool::new(false),
            reported_fenced: AtomicBool::new(true),
            read_after: Mutex::new(None),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_nanos() as u64 + 1
    }

    /// When the newest recorded heartbeat was sent.
    fn renewed_at(&self) -> Option<Instant> {
        match self.renewed.load(Ordering::Acquire) {
            0 => None,
            n => Some(self.origin + Duration::from_nanos(n - 1)),
        }
    }

    /// A heartbeat sent at `sent` was recorded. Returns true when the
    /// lease had lapsed, so a read of the store is needed before writes.
    pub fn heartbeat_recorded(&self, sent: Instant) -> bool {
        let now = Instant::now();
        let mut read_after = self.read_after.lock();
        let lapsed = self
            .renewed_at()
            .is_none_or(|at| now.saturating_duration_since(at) > self.fence_after);
        if lapsed {
            self.synced.store(false, Ordering::Release);
            *read_after = Some(now);
        }
        self.renewed.fetch_max(self.nanos(sent), Ordering::AcqRel);
        !self.synced.load(Ordering::Acquire)
    }

    /// This proxy read the store's newest version (and applied it) with a
    /// read sent at `sent`. Returns true when that ended a lapse.
    pub fn store_read(&self, sent: Instant) -> bool {
        let read_after = self.read_after.lock();
        if self.synced.load(Ordering::Acquire) || read_after.is_none_or(|at| sent < at) {
            return false;
        }
        self.synced.store(true, Ordering::Release);
        self.ever_synced.store(true, Ordering::Release);
        true
    }

    /// Whether writes are refused now. Cheap: two atomic loads and a clock
    /// read.
    pub fn fenced(&self) -> bool {
        if !self.synced.load(Ordering::Acquire) {
            return true;
        }
        let renewed = self.renewed.load(Ordering::Acquire);
        renewed == 0
            || self
                .origin
                .elapsed()
                .saturating_sub(Duration::from_nanos(renewed - 1))
                > self.fence_after
    }

    /// Has read the store at least once since this proxy started.
    pub fn ever_synced(&self) -> bool {
        self.ever_synced.load(Ordering::Acquire)
    }

    /// Time since the newest recorded heartbeat was sent.
    pub fn since_renewed(&self) -> Option<Duration> {
        self.renewed_at().map(|at| at.elapsed())
    }

    pub fn fence_after(&self) -> Duration {
        self.fence_after
    }

    /// The current state if it differs from the one last reported (then
    /// reported: the caller logs it once).
    fn changed(&self) -> Option<bool> {
        let fenced = self.fenced();
        (self.reported_fenced.swap(fenced, Ordering::AcqRel) != fenced).then_some(fenced)
    }

    /// Logs a change of state once and exports it (`tally_store_fenced`,
    /// and the time since the last recorded heartbeat), whoever notices it
    /// first: a refused write or the store follower's periodic check.
    pub fn report(&self) {
        telemetry::store_renewed(self.renewed_at());
        match self.changed() {
            Some(true) => {
                telemetry::store_fenced(true);
                tracing::warn!(
                    fence_after = ?self.fence_after,
                    since_heartbeat = ?self.since_renewed(),
                    "self-fenced: no heartbeat reached the topology store within the lease; writes are refused (503 store_unreachable) until the store is read again, reads go on"
                );
            }
            Some(false) => {
                telemetry::store_fenced(false);
                tracing::info!("store lease renewed and the store read: writes accepted again");
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FENCE: Duration = Duration::from_millis(60);

    #[test]
    fn a_new_lease_is_fenced_until_a_heartbeat_and_a_later_read() {
        let lease = StoreLease::new(FENCE);
        assert!(lease.fenced() && !lease.ever_synced());
        // A read before the first heartbeat does not count: the proxy was
        // not registered when it read.
        let early = Instant::now();
        assert!(!lease.store_read(early));
        assert!(lease.heartbeat_recorded(Instant::now()), "needs a read");
        assert!(lease.fenced());
        assert!(!lease.store_read(early), "a read sent before the heartbeat");
        assert!(lease.store_read(Instant::now()));
        assert!(!lease.fenced() && lease.ever_synced());
        assert_eq!(lease.changed(), Some(false));
        assert_eq!(lease.changed(), None, "reported once");
    }

    #[test]
    fn the_lease_lapses_from_when_the_heartbeat_was_sent_and_needs_a_read() {
        let lease = StoreLease::new(FENCE);
        lease.heartbeat_recorded(Instant::now());
        lease.store_read(Instant::now());
        assert_eq!(lease.changed(), Some(false));
        // Heartbeats in time keep it.
        std::thread::sleep(FENCE / 2);
        assert!(!lease.heartbeat_recorded(Instant::now()));
        assert!(!lease.fenced());
        // A heartbeat sent long ago and answered only now: the lease
        // counts from the sending, so it has lapsed.
        let sent = Instant::now();
        std::thread::sleep(FENCE + FENCE / 2);
        assert!(lease.fenced());
        assert_eq!(lease.changed(), Some(true));
        assert!(lease.heartbeat_recorded(sent), "lapsed: a read is needed");
        assert!(lease.fenced(), "still fenced: too old, and no read");
        // A fresh heartbeat alone does not lift the fence either.
        assert!(lease.heartbeat_recorded(Instant::now()));
        assert!(lease.fenced());
        assert!(lease.store_read(Instant::now()));
        assert!(!lease.fenced());
        assert_eq!(lease.changed(), Some(false));
    }
}
