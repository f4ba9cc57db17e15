//! The shared topology store: versioned topology documents, the proxy
//! registry and leases, in a MariaDB database every proxy reaches.
//!
//! With `topology.store` set, the store (not the file) is the source of
//! truth: a change made through any proxy is inserted as the next version
//! (the primary key makes it a compare-and-set), and every proxy polls
//! `MAX(version)` (a cheap index lookup) and applies what is newer. When the
//! store is unreachable the proxies keep serving with the topology they
//! have; only changes are refused.

use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Conn, Pool};
use serde::Serialize;
use tally_admin::Dsn;

use crate::config::PoolConfig;
use crate::storage::db::{self, DbError};

const ER_DUP_ENTRY: u16 = 1062;

/// A proxy is shown as gone after this long without a heartbeat.
pub const ALIVE_WITHIN: Duration = Duration::from_secs(5);

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
        }
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
                        alive: ms <= ALIVE_WITHIN.as_millis() as u64,
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
