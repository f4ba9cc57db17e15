//! One `mariadbd` instance: its process, its address and the SQL helpers
//! tests use to write, inspect replication and wait for catch-up.
//!
//! A [`Node`] is shared by reference (`&Node`) between a test body and the
//! [`Cluster`](crate::Cluster) that owns it, yet tests must be able to kill
//! and restart it; the child process therefore sits behind a mutex (held only
//! briefly, never across an `.await`) and the port in an atomic.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Row};

use crate::HarnessError;
use crate::process::{self, POLL};
use crate::{ADMIN_USER, DATA_USER};

/// How long a server may take to accept connections. Crash recovery after a
/// SIGKILL on a loaded 2-core machine takes seconds, not minutes.
const START_DEADLINE: Duration = Duration::from_secs(120);
/// How long a clean (SIGTERM) shutdown may take before we SIGKILL.
const STOP_DEADLINE: Duration = Duration::from_secs(60);
/// How often a start is retried on a fresh port after "address in use".
const PORT_ATTEMPTS: usize = 5;
/// Lines of the server log quoted in a start error.
const LOG_TAIL_LINES: usize = 25;

/// Whether a node is a group's master or one of its replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Takes writes; semi-sync master.
    Master,
    /// Read-only, replicates from its group's master by GTID.
    Replica,
}

/// What `SHOW SLAVE STATUS` (plus `@@gtid_slave_pos`) says about a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// `Slave_IO_Running = Yes`: connected to the master and receiving.
    pub io_running: bool,
    /// `Slave_SQL_Running = Yes`: applying the relay log.
    pub sql_running: bool,
    /// The raw `Slave_IO_Running` value (`Yes`, `No`, `Connecting`, ...).
    pub io_state: String,
    /// `Seconds_Behind_Master`; `None` when the SQL thread is not running.
    pub lag_seconds: Option<u64>,
    /// `@@gtid_slave_pos`: the last GTID applied per domain.
    pub gtid_slave_pos: String,
    /// `Last_IO_Error` and `Last_SQL_Error`, joined; empty when healthy.
    pub last_error: String,
}

/// One MariaDB server of a [`Cluster`](crate::Cluster).
#[derive(Debug)]
pub struct Node {
    pub(crate) name: String,
    pub(crate) role: Role,
    pub(crate) server_id: u32,
    datadir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    mariadbd: PathBuf,
    /// Role and size settings; the identity arguments are added per launch.
    args: Vec<String>,
    /// 0 until the first launch picked a port.
    port: AtomicU16,
    child: Mutex<Option<Child>>,
    /// Set once `CHANGE MASTER` ran, so a restart knows it may `START SLAVE`.
    replication_configured: AtomicBool,
}

/// Everything a node needs to know before its first start.
pub(crate) struct NodeConfig {
    pub name: String,
    pub role: Role,
    pub server_id: u32,
    pub datadir: PathBuf,
    /// Unix socket path; must stay under the 107-byte limit.
    pub socket: PathBuf,
    pub mariadbd: PathBuf,
    /// Role and size settings (everything but the per-node identity).
    pub args: Vec<String>,
    /// The port to try first (0: any free port).
    pub preferred_port: u16,
}

/// Why one launch attempt failed: a port clash is retried with another port.
enum LaunchError {
    AddrInUse(HarnessError),
    Other(HarnessError),
}

impl Node {
    pub(crate) fn new(config: NodeConfig) -> Self {
        let NodeConfig {
            name,
            role,
            server_id,
            datadir,
            socket,
            mariadbd,
            args,
            preferred_port,
        } = config;
        Self {
            log: datadir.join("mariadbd.log"),
            name,
            role,
            server_id,
            datadir,
            socket,
            mariadbd,
            args,
            port: AtomicU16::new(preferred_port),
            child: Mutex::new(None),
            replication_configured: AtomicBool::new(false),
        }
    }

    /// The node's name, e.g. `g0-master` or `g1-replica1`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Master or replica (as configured at start; promotion is not tracked).
    pub fn role(&self) -> Role {
        self.role
    }

    /// The `--server-id`, unique within the cluster.
    pub fn server_id(&self) -> u32 {
        self.server_id
    }

    /// The data directory; `mariadbd.log` in it is the server's output.
    pub fn datadir(&self) -> &Path {
        &self.datadir
    }

    /// The unix socket (`mariadb -S <path> -u root` for a quick look).
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The server's log file (stdout and stderr of `mariadbd`).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port()))
    }

    /// The TCP port (fixed after the first start; restarts keep it).
    pub fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }

    /// `mysql://tally@127.0.0.1:PORT/db`: the [`DATA_USER`]'s DSN, the one
    /// the topology file names (the proxy flushes and reads with it, and
    /// `read_only` fences it). It may only read and write the cluster's
    /// databases: use [`Node::root_dsn`] for anything else (a topology store
    /// in `tally_meta`, administrative SQL).
    ///
    /// Note for `mysql_async` users: by default the driver asks the server
    /// for its unix socket after connecting and silently reconnects through
    /// it. That is harmless here but bypasses a [`FaultRelay`](crate::FaultRelay);
    /// append `?prefer_socket=false` (or use `OptsBuilder::prefer_socket`)
    /// when the TCP path matters.
    pub fn dsn(&self, db: &str) -> String {
        self.dsn_as(DATA_USER, db)
    }

    /// `mysql://tally_admin@127.0.0.1:PORT/db`: the [`ADMIN_USER`]'s DSN
    /// (schema, replication, promotion and fencing; see [`ADMIN_USER`]).
    pub fn admin_dsn(&self, db: &str) -> String {
        self.dsn_as(ADMIN_USER, db)
    }

    /// `mysql://root@127.0.0.1:PORT/db`: every privilege, for what is
    /// neither data nor tally's administration (the topology store's
    /// `tally_meta`, a test's own SQL).
    pub fn root_dsn(&self, db: &str) -> String {
        self.dsn_as("root", db)
    }

    fn dsn_as(&self, user: &str, db: &str) -> String {
        format!("mysql://{user}@127.0.0.1:{}/{db}", self.port())
    }

    /// The process id while the server runs; `None` once it exited or was
    /// stopped.
    pub fn pid(&self) -> Option<u32> {
        let mut child = self.child();
        match child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => child.as_ref().map(Child::id),
            _ => None,
        }
    }

    /// SIGKILLs the server; the process is gone (reaped) when this returns.
    pub fn kill9(&self) {
        if let Some(mut child) = self.child().take() {
            process::kill_and_reap(&mut child);
        }
    }

    /// Stops the server cleanly (SIGTERM) and waits for it to exit; after
    /// a minute it is SIGKILLed instead.
    pub async fn stop(&self) {
        match self.child().as_ref() {
            Some(child) => process::sigterm(child),
            None => return,
        }
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            {
                let mut guard = self.child();
                let Some(child) = guard.as_mut() else { return };
                if !matches!(child.try_wait(), Ok(None)) {
                    *guard = None;
                    return;
                }
            }
            if Instant::now() >= deadline {
                tracing::warn!(node = %self.name, "clean shutdown timed out; killing");
                self.kill9();
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// (Re)starts the server on the same data directory and port and waits
    /// until it accepts connections; a replica resumes replication. Does
    /// nothing if the server is already running.
    pub async fn start(&self) -> Result<(), HarnessError> {
        self.launch(false).await?;
        if self.replication_configured.load(Ordering::SeqCst) {
            // The server restarts its replication threads by itself unless
            // they had been stopped; START SLAVE covers both cases.
            self.start_replication().await?;
        }
        Ok(())
    }

    /// Starts the server; with `allow_new_port` a port clash (or no port
    /// yet) makes it pick a free port, otherwise the current one is kept.
    pub(crate) async fn launch(&self, allow_new_port: bool) -> Result<(), HarnessError> {
        // A remembered port (reused state directory) that is visibly taken
        // is replaced up front rather than by a failed server start.
        if self.port() == 0 || (allow_new_port && !port_is_free(self.port())) {
            self.port.store(free_port()?, Ordering::SeqCst);
        }
        let mut attempt = 1;
        loop {
            match self.launch_once().await {
                Ok(()) => return Ok(()),
                Err(LaunchError::AddrInUse(e)) if allow_new_port && attempt < PORT_ATTEMPTS => {
                    tracing::debug!(node = %self.name, error = %e, "port taken; retrying");
                    self.port.store(free_port()?, Ordering::SeqCst);
                    attempt += 1;
                }
                Err(LaunchError::AddrInUse(e) | LaunchError::Other(e)) => return Err(e),
            }
        }
    }

    async fn launch_once(&self) -> Result<(), LaunchError> {
        if self.pid().is_some() {
            return Ok(());
        }
        let port = self.port();
        // Read only what this attempt writes, so an old "address in use"
        // in the (appended) log cannot be mistaken for a new one.
        let log_offset = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let command = self.command(port).map_err(LaunchError::Other)?;
        let child = process::spawn_tied_to_process(command)
            .await
            .map_err(LaunchError::Other)?;
        *self.child() = Some(child);

        let started = Instant::now();
        loop {
            // mariadbd lingers for seconds after logging "Aborting" (e.g. on
            // a port clash); the log tells us sooner than its exit does.
            if log_tail(&self.log, log_offset).contains("[ERROR] Aborting") {
                self.kill9();
            }
            let exited = {
                let mut guard = self.child();
                match guard.as_mut().map(Child::try_wait) {
                    Some(Ok(None)) => None,
                    Some(Ok(Some(status))) => {
                        *guard = None;
                        Some(format!("exited with {status}"))
                    }
                    Some(Err(e)) => {
                        *guard = None;
                        Some(format!("could not be waited for: {e}"))
                    }
                    None => Some("exited (or was killed) while starting".to_owned()),
                }
            };
            if let Some(reason) = exited {
                let log_tail = log_tail(&self.log, log_offset);
                let error = self.start_failed(reason, log_tail.clone());
                return Err(if log_tail.contains("Bind on TCP/IP port") {
                    LaunchError::AddrInUse(error)
                } else {
                    LaunchError::Other(error)
                });
            }
            let attempt = tokio::time::timeout(Duration::from_secs(5), self.connect()).await;
            if let Ok(Ok(mut conn)) = attempt {
                // Whoever answers on the port must be this node's server:
                // another one (of this or a concurrent cluster) that holds
                // it answers while ours is still about to fail its bind,
                // and two nodes would then share one server.
                let datadir: Option<String> =
                    conn.query_first("SELECT @@datadir").await.ok().flatten();
                let _ = conn.disconnect().await;
                match datadir {
                    Some(dir) if same_dir(Path::new(&dir), &self.datadir) => {
                        tracing::debug!(node = %self.name, port, elapsed = ?started.elapsed(), "mariadbd ready");
                        return Ok(());
                    }
                    Some(dir) => {
                        self.kill9();
                        let reason =
                            format!("port {port} is served by another server (datadir {dir})");
                        return Err(LaunchError::AddrInUse(
                            self.start_failed(reason, log_tail(&self.log, log_offset)),
                        ));
                    }
                    // Not answering the query yet: poll again.
                    None => {}
                }
            }
            if started.elapsed() >= START_DEADLINE {
                self.kill9();
                let reason = format!("no connection accepted within {START_DEADLINE:?}");
                return Err(LaunchError::Other(
                    self.start_failed(reason, log_tail(&self.log, log_offset)),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn start_failed(&self, reason: String, log_tail: String) -> HarnessError {
        HarnessError::StartFailed {
            node: self.name.clone(),
            reason,
            log: self.log.clone(),
            log_tail,
        }
    }

    fn command(&self, port: u16) -> Result<Command, HarnessError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| HarnessError::io(format!("opening {}", self.log.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| HarnessError::io("duplicating the log handle", e))?;
        let mut command = Command::new(&self.mariadbd);
        // `--no-defaults` must come first: it keeps /etc/mysql out.
        command
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.datadir.display()))
            .arg(format!("--socket={}", self.socket.display()))
            .arg(format!(
                "--pid-file={}",
                self.datadir.join("mariadbd.pid").display()
            ))
            // Every server gets its own tmpdir: at startup MariaDB deletes
            // every `#sql*` file in its tmpdir, so servers (and install-db
            // runs) sharing /tmp destroy each other's temporary tables.
            .arg(format!("--tmpdir={}", self.tmpdir()?.display()))
            .arg(format!("--port={port}"))
            .arg(format!("--server-id={}", self.server_id))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        Ok(command)
    }

    /// `<datadir>.tmp`, created on demand: a sibling, because a directory
    /// inside the datadir would show up as a database.
    fn tmpdir(&self) -> Result<PathBuf, HarnessError> {
        let dir = self.datadir.with_extension("tmp");
        std::fs::create_dir_all(&dir)
            .map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        Ok(dir)
    }

    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        // A panic while holding this lock cannot leave the Option half
        // updated, so a poisoned lock is still usable.
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connection options: root over TCP, never switching to the socket.
    pub fn opts(&self, db: Option<&str>) -> Opts {
        self.opts_as("root", db)
    }

    /// Connection options for `user` (no password: [`DATA_USER`],
    /// [`ADMIN_USER`] or root) over TCP, never switching to the socket.
    pub fn opts_as(&self, user: &str, db: Option<&str>) -> Opts {
        OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(self.port())
            .user(Some(user))
            .db_name(db)
            .prefer_socket(false)
            .into()
    }

    /// Opens a fresh connection as `user` over TCP (see [`Node::opts_as`]).
    pub async fn connect_as(&self, user: &str, db: Option<&str>) -> Result<Conn, HarnessError> {
        Conn::new(self.opts_as(user, db))
            .await
            .map_err(|source| self.sql_error(&format!("connect as {user}"), source))
    }

    /// Opens a fresh connection as root over TCP, without a default database.
    pub async fn connect(&self) -> Result<Conn, HarnessError> {
        Conn::new(self.opts(None))
            .await
            .map_err(|source| self.sql_error("connect", source))
    }

    fn sql_error(&self, query: &str, source: mysql_async::Error) -> HarnessError {
        HarnessError::Sql {
            node: self.name.clone(),
            query: query.to_owned(),
            source,
        }
    }

    /// Runs one statement on a fresh connection and returns its rows.
    pub async fn sql(&self, q: &str) -> Result<Vec<Row>, HarnessError> {
        let mut conn = self.connect().await?;
        let rows = conn
            .query::<Row, _>(q)
            .await
            .map_err(|source| self.sql_error(q, source));
        let _ = conn.disconnect().await;
        rows
    }

    /// Runs one statement (or several, `;`-separated) on a fresh connection.
    pub async fn exec(&self, q: &str) -> Result<(), HarnessError> {
        let mut conn = self.connect().await?;
        let result = conn
            .query_drop(q)
            .await
            .map_err(|source| self.sql_error(q, source));
        let _ = conn.disconnect().await;
        result
    }

    /// Runs statements in order on one fresh connection as `user` to
    /// database `db`.
    pub(crate) async fn exec_all(
        &self,
        user: &str,
        db: Option<&str>,
        statements: &[String],
    ) -> Result<(), HarnessError> {
        let mut conn = self.connect_as(user, db).await?;
        let mut result = Ok(());
        for statement in statements {
            result = conn
                .query_drop(statement)
                .await
                .map_err(|source| self.sql_error(statement, source));
            if result.is_err() {
                break;
            }
        }
        let _ = conn.disconnect().await;
        result
    }

    /// Runs a query expected to return one scalar.
    async fn scalar<T: mysql_async::prelude::FromValue + Send + 'static>(
        &self,
        q: &str,
    ) -> Result<Option<T>, HarnessError> {
        let mut conn = self.connect().await?;
        let value = conn
            .query_first::<T, _>(q)
            .await
            .map_err(|source| self.sql_error(q, source));
        let _ = conn.disconnect().await;
        value
    }

    /// `STOP SLAVE`: both the IO and the SQL thread.
    pub async fn stop_replication(&self) -> Result<(), HarnessError> {
        self.exec("STOP SLAVE").await
    }

    /// `START SLAVE` (harmless when already running).
    pub async fn start_replication(&self) -> Result<(), HarnessError> {
        self.exec("START SLAVE").await
    }

    /// `STOP SLAVE SQL_THREAD`: keeps receiving, stops applying; the way to
    /// make a replica lag on purpose.
    pub async fn stop_sql_thread(&self) -> Result<(), HarnessError> {
        self.exec("STOP SLAVE SQL_THREAD").await
    }

    /// Points this replica at `master` by GTID and starts replicating, as
    /// the [`ADMIN_USER`] (the replication account, as after a promotion
    /// by the proxy).
    ///
    /// `MASTER_CONNECT_RETRY=1` makes the replica notice a restarted master
    /// within a second instead of the default 60.
    pub(crate) async fn replicate_from(&self, master: &Node) -> Result<(), HarnessError> {
        self.exec("STOP SLAVE").await?;
        self.exec(&format!(
            "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={}, MASTER_USER='{ADMIN_USER}', \
             MASTER_PASSWORD='', MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1",
            master.port()
        ))
        .await?;
        self.replication_configured.store(true, Ordering::SeqCst);
        self.exec("START SLAVE").await
    }

    /// Reads `SHOW SLAVE STATUS` and `@@gtid_slave_pos`.
    pub async fn replica_status(&self) -> Result<ReplicaStatus, HarnessError> {
        let mut conn = self.connect().await?;
        let status = self.read_replica_status(&mut conn).await;
        let _ = conn.disconnect().await;
        status
    }

    async fn read_replica_status(&self, conn: &mut Conn) -> Result<ReplicaStatus, HarnessError> {
        const SHOW: &str = "SHOW SLAVE STATUS";
        let row = conn
            .query_first::<Row, _>(SHOW)
            .await
            .map_err(|source| self.sql_error(SHOW, source))?
            .ok_or_else(|| HarnessError::NotAReplica {
                node: self.name.clone(),
            })?;
        let text = |column: &str| -> String {
            row.get_opt::<Option<String>, _>(column)
                .and_then(Result::ok)
                .flatten()
                .unwrap_or_default()
        };
        let io_state = text("Slave_IO_Running");
        let last_error = [text("Last_IO_Error"), text("Last_SQL_Error")]
            .into_iter()
            .filter(|e| !e.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        // MariaDB reports the applied position only in SHOW ALL SLAVES
        // STATUS; the global variable is simpler.
        const POS: &str = "SELECT @@GLOBAL.gtid_slave_pos";
        let gtid_slave_pos = conn
            .query_first::<String, _>(POS)
            .await
            .map_err(|source| self.sql_error(POS, source))?
            .unwrap_or_default();
        Ok(ReplicaStatus {
            io_running: io_state == "Yes",
            sql_running: text("Slave_SQL_Running") == "Yes",
            lag_seconds: row
                .get_opt::<Option<u64>, _>("Seconds_Behind_Master")
                .and_then(Result::ok)
                .flatten(),
            io_state,
            gtid_slave_pos,
            last_error,
        })
    }

    /// Polls until both replication threads run.
    pub async fn wait_replication_running(&self, deadline: Duration) -> Result<(), HarnessError> {
        let started = Instant::now();
        loop {
            let status = self.replica_status().await;
            if let Ok(s) = &status
                && s.io_running
                && s.sql_running
            {
                return Ok(());
            }
            if started.elapsed() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!("replication threads of {} to run", self.name),
                    waited: started.elapsed(),
                    detail: match status {
                        Ok(s) => format!("{s:?}"),
                        Err(e) => e.to_string(),
                    },
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `@@GLOBAL.gtid_binlog_pos`: the last GTID this server wrote to its
    /// binary log, per domain (empty when it wrote nothing yet).
    pub async fn gtid_binlog_pos(&self) -> Result<String, HarnessError> {
        Ok(self
            .scalar::<String>("SELECT @@GLOBAL.gtid_binlog_pos")
            .await?
            .unwrap_or_default())
    }

    /// Waits until this replica has applied everything `master` had written
    /// when the call started (`MASTER_GTID_WAIT`, so no polling).
    pub async fn wait_caught_up(
        &self,
        master: &Node,
        deadline: Duration,
    ) -> Result<(), HarnessError> {
        let pos = master.gtid_binlog_pos().await?;
        let q = "SELECT MASTER_GTID_WAIT(?, ?)";
        let mut conn = self.connect().await?;
        let waited = conn
            .exec_first::<Option<i64>, _, _>(q, (pos.clone(), deadline.as_secs_f64()))
            .await
            .map_err(|source| self.sql_error(q, source));
        let _ = conn.disconnect().await;
        match waited?.flatten() {
            Some(0) => Ok(()),
            _ => Err(HarnessError::Timeout {
                what: format!("{} to apply {} up to {pos}", self.name, master.name),
                waited: deadline,
                detail: match self.replica_status().await {
                    Ok(s) => format!("{s:?}"),
                    Err(e) => e.to_string(),
                },
            }),
        }
    }
}

/// Asks the OS for a free port on 127.0.0.1. The port is released before
/// `mariadbd` binds it, so another process may grab it in between; the
/// caller retries on "address in use".
fn free_port() -> Result<u16, HarnessError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| HarnessError::io("finding a free port", e))
}

/// Whether `reported` (a server's `@@datadir`, resolved, with a trailing
/// slash) is `ours`: compared resolved when both resolve, else by their
/// last two components (a node's datadir sits in a directory of its own).
fn same_dir(reported: &Path, ours: &Path) -> bool {
    if let (Ok(a), Ok(b)) = (reported.canonicalize(), ours.canonicalize()) {
        return a == b;
    }
    let tail = |p: &Path| -> Vec<std::ffi::OsString> {
        p.components()
            .rev()
            .take(2)
            .map(|c| c.as_os_str().to_owned())
            .collect()
    };
    tail(reported) == tail(ours)
}

/// Whether nothing listens on 127.0.0.1:`port` right now.
fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// The last lines written to `log` after byte `offset`.
fn log_tail(log: &Path, offset: u64) -> String {
    let mut text = String::new();
    let read = File::open(log).and_then(|mut f| {
        f.seek(SeekFrom::Start(offset))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(())
    });
    if let Err(e) = read {
        return format!("(could not read the log: {e})");
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

impl Drop for Node {
    /// A node never outlives its handle: dropping it kills the server.
    fn drop(&mut self) {
        self.kill9();
    }
}

#[cfg(test)]
mod tests {
    use super::same_dir;

    #[test]
    fn a_server_is_ours_only_when_it_reports_our_datadir() {
        let root = tempfile::tempdir().expect("tempdir");
        let (ours, other) = (root.path().join("g1-master"), root.path().join("g2-master"));
        std::fs::create_dir_all(&ours).expect("mkdir");
        std::fs::create_dir_all(&other).expect("mkdir");
        // As MariaDB reports it: resolved, with a trailing slash.
        let reported = format!("{}/", ours.canonicalize().expect("resolve").display());
        assert!(same_dir(std::path::Path::new(&reported), &ours));
        assert!(!same_dir(&other, &ours));
        // Paths that do not resolve are compared by their last components.
        assert!(!same_dir(
            std::path::Path::new("/gone/a/g1-master/"),
            std::path::Path::new("/gone/b/g1-master")
        ));
        assert!(same_dir(
            std::path::Path::new("/gone/a/g1-master/"),
            std::path::Path::new("/elsewhere/a/g1-master")
        ));
    }
}
