//! Master/replica groups: creating or reusing data directories, starting all
//! servers at once, wiring GTID semi-sync replication and applying the schema.
//!
//! Startup cost is what makes end-to-end tests slow on two cores, so the
//! expensive `mariadb-install-db` runs once per cluster into a template that
//! is copied (`cp -a`) for every node, and all servers boot concurrently.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures::future::{join_all, try_join_all};
use serde::{Deserialize, Serialize};

use crate::HarnessError;
use crate::node::{Node, NodeConfig, Role};
use crate::process::find_binary;
use crate::tls::{TestCa, TlsFiles};

/// The file in a state directory that records the cluster's shape, ports
/// and server ids; its presence marks the directory as ours.
const LAYOUT_FILE: &str = "tally-harness.json";
/// Bumped when the layout or the data directory setup changes incompatibly.
const LAYOUT_FORMAT: u32 = 1;
const REPLICATION_DEADLINE: Duration = Duration::from_secs(60);
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(60);

/// Runs in `mariadb-install-db`'s bootstrap server. Install-db already
/// creates `root@127.0.0.1` with `--auth-root-authentication-method=normal`,
/// but every client here connects over TCP with `--skip-name-resolve`, so
/// the account is too important to rely on a packaging detail: make sure.
/// The bootstrap server runs with grant tables off, where account
/// statements fail (error 1290) until `FLUSH PRIVILEGES` loads them.
const BOOTSTRAP_SQL: &str = "\
FLUSH PRIVILEGES;
CREATE USER IF NOT EXISTS 'root'@'127.0.0.1';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
";

/// The data user: the DSNs of [`Cluster::topology_yaml`] name it, the
/// proxy flushes and reads with it. It may only `SELECT`, `INSERT`, `UPDATE`
/// and `DELETE` in the cluster's databases and has no global privilege, so
/// `SET GLOBAL read_only = ON` stops its writes (the fence of a promotion).
pub const DATA_USER: &str = "tally";

/// The admin user: the `admin:` section of [`Cluster::topology_yaml`] names
/// it; the proxy creates the schema, reads replication status, promotes and
/// fences with it, and it is the replication account (`MASTER_USER`, also
/// of the harness's own replication). It has [`ADMIN_PRIVILEGES`] and every
/// privilege on the cluster's databases, nothing else.
pub const ADMIN_USER: &str = "tally_admin";

/// The admin user's global privileges on MariaDB 10.11 (in the order
/// `SHOW GRANTS` lists them), each one needed:
/// `PROCESS` (see the data user's sessions in `information_schema.PROCESSLIST`),
/// `CONNECTION ADMIN` (`KILL CONNECTION` them), `READ_ONLY ADMIN`
/// (`SET GLOBAL read_only`), `REPLICATION SLAVE ADMIN` (`CHANGE MASTER`,
/// `START`/`STOP SLAVE`, `rpl_semi_sync_slave_enabled`), `RELOAD` (`RESET
/// SLAVE ALL`), `REPLICATION MASTER ADMIN` (`rpl_semi_sync_master_enabled`),
/// `SLAVE MONITOR` (`SHOW SLAVE STATUS`), `REPLICATION SLAVE` (replicas
/// connect as this user). `MASTER_GTID_WAIT` and reading
/// `@@GLOBAL.gtid_binlog_pos` need none. The test
/// `the_data_user_is_fenced_and_the_admin_user_can_do_the_rest`
/// (`tests/users.rs`) exercises every one of them.
pub const ADMIN_PRIVILEGES: &str = "RELOAD, PROCESS, REPLICATION SLAVE, CONNECTION ADMIN, \
     READ_ONLY ADMIN, REPLICATION SLAVE ADMIN, REPLICATION MASTER ADMIN, SLAVE MONITOR";

/// The privileges of the data user on each of the cluster's databases.
pub const DATA_PRIVILEGES: &str = "SELECT, INSERT, UPDATE, DELETE";

/// Creates both accounts (no password; `--skip-name-resolve`, so clients
/// over TCP are `@127.0.0.1`) and the admin user's global privileges. Run
/// as root on every server at every boot, outside the binary log (each
/// server gets its own, no GTID of a replica's own), so a data directory
/// from before the accounts existed gets them too. Privileges on a
/// database come with it (`database_grants`).
fn account_statements() -> Vec<String> {
    vec![
        "SET SESSION sql_log_bin = 0".to_owned(),
        format!("CREATE USER IF NOT EXISTS '{DATA_USER}'@'127.0.0.1'"),
        format!("CREATE USER IF NOT EXISTS '{ADMIN_USER}'@'127.0.0.1'"),
        format!("GRANT {ADMIN_PRIVILEGES} ON *.* TO '{ADMIN_USER}'@'127.0.0.1'"),
    ]
}

/// The data user's DML and the admin user's everything on `database`
/// only. `_` is a wildcard in a database name of `GRANT`, so it is escaped:
/// `shared_a` must not also grant `sharedXa`.
fn database_grants(database: &str) -> Vec<String> {
    let name = database.replace('_', "\\_");
    vec![
        format!("GRANT {DATA_PRIVILEGES} ON `{name}`.* TO '{DATA_USER}'@'127.0.0.1'"),
        format!("GRANT ALL PRIVILEGES ON `{name}`.* TO '{ADMIN_USER}'@'127.0.0.1'"),
    ]
}

/// What to start. `ClusterSpec::default()` is one group with one replica in
/// a fresh temporary directory.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Number of groups (`g0`, `g1`, ...); at least 1.
    pub groups: usize,
    /// Replicas per group; 0 is allowed.
    pub replicas: usize,
    /// Where the data directories live. `None`: a fresh temporary directory
    /// removed on drop. `Some`: created if missing, reused if it holds a
    /// cluster of the same shape (data kept, ports may change).
    pub state_dir: Option<PathBuf>,
    /// Wipe `state_dir` first (only if it is empty or one of ours).
    pub fresh: bool,
    /// The database created on every master, with the tally schema in it.
    pub database: String,
    /// Semi-synchronous replication (master timeout 2 s, then async).
    /// Ignored when `replicas` is 0.
    pub semi_sync: bool,
    /// `--innodb-buffer-pool-size` of every server.
    pub buffer_pool: String,
    /// Extra `mariadbd` arguments for every server, appended last so they
    /// override the harness's settings (e.g. `--innodb-flush-log-at-trx-commit=1`).
    pub extra_args: Vec<String>,
    /// Serve TLS (`--ssl-ca/--ssl-cert/--ssl-key`) with a throwaway CA and
    /// a certificate for 127.0.0.1 and localhost, written to `tls/` in the
    /// state directory (kept across restarts of a reused one; see
    /// [`Cluster::tls`]). Clients may still connect without TLS; the DSNs
    /// of [`Cluster::topology_yaml`] then ask for `ssl_mode=verify_identity`.
    pub tls: bool,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            groups: 1,
            replicas: 1,
            state_dir: None,
            fresh: false,
            database: "tally".to_owned(),
            semi_sync: true,
            buffer_pool: "32M".to_owned(),
            extra_args: Vec::new(),
            tls: false,
        }
    }
}

impl ClusterSpec {
    fn validate(&self) -> Result<(), HarnessError> {
        let mut problems = Vec::new();
        if self.groups == 0 || self.groups > 64 {
            problems.push(format!("groups must be 1..=64, got {}", self.groups));
        }
        if self.replicas > 16 {
            problems.push(format!("replicas must be 0..=16, got {}", self.replicas));
        }
        let identifier = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        if !identifier(&self.database) {
            problems.push(format!(
                "database must match [A-Za-z0-9_]{{1,64}}, got {:?}",
                self.database
            ));
        }
        if self.buffer_pool.is_empty()
            || !self.buffer_pool.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            problems.push(format!(
                "buffer_pool must look like 32M, got {:?}",
                self.buffer_pool
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(HarnessError::InvalidSpec(problems.join("; ")))
        }
    }
}

/// A master and its replicas.
#[derive(Debug)]
pub struct Group {
    /// `g0`, `g1`, ...
    pub name: String,
    /// Takes the writes.
    pub master: Node,
    /// Replicate from `master` by GTID.
    pub replicas: Vec<Node>,
}

impl Group {
    /// The master first, then the replicas.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        std::iter::once(&self.master).chain(&self.replicas)
    }
}

/// Running MariaDB groups. Dropping it SIGKILLs every server (and removes a
/// temporary state directory); [`Cluster::shutdown`] stops them cleanly.
#[derive(Debug)]
pub struct Cluster {
    // Field order matters for Drop: servers die before their directories go.
    groups: Vec<Group>,
    state_dir: PathBuf,
    database: String,
    /// The TLS files the servers use ([`ClusterSpec::tls`]).
    tls: Option<TlsFiles>,
    /// Owns the state directory when the spec gave none.
    _temp_state: Option<tempfile::TempDir>,
    /// Keeps the template alive for clusters started while this one runs.
    _template: Option<Arc<Template>>,
    /// Short directory for the unix sockets (see `socket_dir`).
    _sockets: tempfile::TempDir,
}

/// The persisted shape of a cluster, so a later run can reuse the datadirs.
#[derive(Debug, Serialize, Deserialize)]
struct Layout {
    format: u32,
    /// False while the data directories are being created: a crash then
    /// leaves a directory that must be wiped, not reused.
    complete: bool,
    groups: usize,
    replicas: usize,
    nodes: Vec<NodeLayout>,
}

#[derive(Debug, Serialize, Deserialize)]
struct NodeLayout {
    name: String,
    server_id: u32,
    port: u16,
}

impl Layout {
    fn new(groups: usize, replicas: usize) -> Self {
        let mut nodes = Vec::new();
        for g in 0..groups {
            nodes.push(NodeLayout {
                name: format!("g{g}-master"),
                server_id: 0,
                port: 0,
            });
            for r in 1..=replicas {
                nodes.push(NodeLayout {
                    name: format!("g{g}-replica{r}"),
                    server_id: 0,
                    port: 0,
                });
            }
        }
        for (i, node) in nodes.iter_mut().enumerate() {
            // Server ids must differ within a replication topology; 0 is
            // reserved by MariaDB.
            node.server_id = u32::try_from(i).unwrap_or(u32::MAX - 1) + 1;
        }
        Self {
            format: LAYOUT_FORMAT,
            complete: false,
            groups,
            replicas,
            nodes,
        }
    }

    fn read(dir: &Path) -> Result<Option<Self>, HarnessError> {
        let path = dir.join(LAYOUT_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(HarnessError::io(format!("reading {}", path.display()), e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| HarnessError::StateDir {
                dir: dir.to_owned(),
                problem: format!("{LAYOUT_FILE} is unreadable ({e}); use fresh to wipe it"),
            })
    }

    /// Writes via a temporary file and rename, so a crash never leaves a
    /// truncated layout.
    fn write(&self, dir: &Path) -> Result<(), HarnessError> {
        let path = dir.join(LAYOUT_FILE);
        let tmp = dir.join(format!("{LAYOUT_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| HarnessError::io("serializing the layout", std::io::Error::other(e)))?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))
    }
}

impl Cluster {
    /// Starts (or restarts, from a reused state directory) every server,
    /// configures replication, applies the schema on every master and
    /// returns once every replica has caught up. Needs a tokio runtime (any
    /// flavour); the servers do not depend on it afterwards, so a cluster
    /// may be used from other runtimes (see [`Cluster::shared`]).
    pub async fn start(spec: ClusterSpec) -> Result<Cluster, HarnessError> {
        let began = Instant::now();
        spec.validate()?;
        sweep_stale_dirs(&std::env::temp_dir(), TEMP_STATE_PREFIX);
        sweep_stale_dirs(&socket_dir(), SOCKET_PREFIX);
        let mariadbd = find_binary("mariadbd")?;
        let install_db = find_binary("mariadb-install-db")?;

        let (state_dir, temp_state) = match &spec.state_dir {
            Some(dir) => (dir.clone(), None),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix(&owned_prefix(TEMP_STATE_PREFIX))
                    .tempdir()
                    .map_err(|e| HarnessError::io("creating a temporary state directory", e))?;
                (temp.path().to_owned(), Some(temp))
            }
        };
        let (layout, template) = prepare_state_dir(&spec, &state_dir, &install_db).await?;
        let tls = if spec.tls {
            Some(server_tls_files(&state_dir.join("tls"))?)
        } else {
            None
        };
        let tls_args = tls
            .as_ref()
            .map(crate::tls::server_args)
            .unwrap_or_default();

        let sockets = tempfile::Builder::new()
            .prefix(&owned_prefix(SOCKET_PREFIX))
            .tempdir_in(socket_dir())
            .map_err(|e| HarnessError::io("creating the socket directory", e))?;

        let mut nodes = layout.nodes.iter().map(|n| {
            let role = if n.name.ends_with("-master") {
                Role::Master
            } else {
                Role::Replica
            };
            Node::new(NodeConfig {
                name: n.name.clone(),
                role,
                server_id: n.server_id,
                datadir: state_dir.join(&n.name),
                socket: sockets.path().join(format!("{}.sock", n.name)),
                mariadbd: mariadbd.clone(),
                args: [server_args(&spec, role), tls_args.clone()].concat(),
                preferred_port: n.port,
            })
        });
        let mut groups = Vec::with_capacity(spec.groups);
        for g in 0..spec.groups {
            let master = nodes.next();
            let replicas: Vec<Node> = nodes.by_ref().take(spec.replicas).collect();
            let Some(master) = master else {
                return Err(HarnessError::StateDir {
                    dir: state_dir,
                    problem: format!("{LAYOUT_FILE} lists too few nodes; use fresh"),
                });
            };
            groups.push(Group {
                name: format!("g{g}"),
                master,
                replicas,
            });
        }

        // From here on, an error drops `cluster`, which kills what started.
        let cluster = Cluster {
            groups,
            state_dir,
            database: spec.database.clone(),
            tls,
            _temp_state: temp_state,
            _template: template,
            _sockets: sockets,
        };
        cluster.boot(layout).await?;
        tracing::info!(
            groups = spec.groups,
            replicas = spec.replicas,
            elapsed = ?began.elapsed(),
            dir = %cluster.state_dir.display(),
            "MariaDB cluster ready"
        );
        Ok(cluster)
    }

    async fn boot(&self, mut layout: Layout) -> Result<(), HarnessError> {
        let began = Instant::now();
        // Every server at once: they mostly wait on disk, not on the CPU.
        try_join_all(self.nodes().map(|n| n.launch(true))).await?;
        tracing::debug!(elapsed = ?began.elapsed(), "all servers accept connections");

        // Ports may have changed (a reused port was taken): persist them so
        // the next run tries these first.
        for entry in &mut layout.nodes {
            if let Some(node) = self.nodes().find(|n| n.name == entry.name) {
                entry.port = node.port();
            }
        }
        layout.write(&self.state_dir)?;

        let accounts = account_statements();
        try_join_all(self.nodes().map(|n| n.exec_all("root", None, &accounts))).await?;

        // Replication first: with semi-sync on and no replica connected,
        // each schema statement would stall for the 2 s master timeout.
        try_join_all(self.groups.iter().flat_map(|g| {
            g.replicas.iter().map(move |r| async move {
                r.replicate_from(&g.master).await?;
                r.wait_replication_running(REPLICATION_DEADLINE).await
            })
        }))
        .await?;

        try_join_all(
            self.groups
                .iter()
                .map(|g| apply_schema(&g.master, &self.database)),
        )
        .await?;
        tracing::debug!(elapsed = ?began.elapsed(), "replication running, schema applied");

        self.wait_replicas_caught_up().await
    }

    /// All groups, in order `g0`, `g1`, ...
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// Group `i`. Panics if `i >= groups().len()`, like slice indexing.
    pub fn group(&self, i: usize) -> &Group {
        &self.groups[i]
    }

    /// Every node of every group, masters before their replicas.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.groups.iter().flat_map(Group::nodes)
    }

    /// The database that holds the schema.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// Where the data directories live.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// A process-wide cluster, started by the first call and shared by every
    /// test of the test binary (tests are threads of one process), because
    /// starting servers costs seconds. Isolate tests by namespace or with
    /// [`Cluster::add_database`]; a test that kills, stops or reconfigures
    /// servers needs its own cluster.
    ///
    /// The first call's spec wins; later calls must ask for the same shape.
    /// A shared cluster is never dropped: its servers die with the process
    /// (parent-death signal) and its temporary directory is removed by the
    /// next harness run that finds its process gone.
    pub async fn shared(spec: ClusterSpec) -> Result<&'static Cluster, HarnessError> {
        static SHARED: tokio::sync::OnceCell<Cluster> = tokio::sync::OnceCell::const_new();
        let shape = (spec.groups, spec.replicas);
        let cluster = SHARED.get_or_try_init(|| Cluster::start(spec)).await?;
        let running = (cluster.groups.len(), cluster.groups[0].replicas.len());
        if running != shape {
            return Err(HarnessError::InvalidSpec(format!(
                "the shared cluster is {} x {}, asked for {} x {}",
                running.0, running.1, shape.0, shape.1
            )));
        }
        Ok(cluster)
    }

    /// Creates another database with the tally schema on every master and
    /// waits until every replica has it (for tests that share a cluster).
    pub async fn add_database(&self, name: &str) -> Result<(), HarnessError> {
        ClusterSpec {
            database: name.to_owned(),
            ..ClusterSpec::default()
        }
        .validate()?;
        try_join_all(self.groups.iter().map(|g| apply_schema(&g.master, name))).await?;
        self.wait_replicas_caught_up().await
    }

    /// Waits until every replica has applied everything its master wrote.
    pub async fn wait_replicas_caught_up(&self) -> Result<(), HarnessError> {
        try_join_all(self.groups.iter().flat_map(|g| {
            g.replicas
                .iter()
                .map(move |r| r.wait_caught_up(&g.master, CATCH_UP_DEADLINE))
        }))
        .await?;
        Ok(())
    }

    /// The topology file (SPEC §4) describing this cluster, every group with
    /// weight 1 and DSNs of the [`DATA_USER`] on the cluster's database, and
    /// the [`ADMIN_USER`] in its `admin:` section.
    pub fn topology_yaml(&self, vnodes: u32) -> String {
        self.topology_yaml_for(&self.database, vnodes)
    }

    /// The TLS files of the servers when they serve TLS
    /// ([`ClusterSpec::tls`]): `ca` is what a client verifies them with.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The DSN query that makes a proxy use TLS to these servers
    /// (`?ssl_mode=verify_identity&ssl_ca=...`), empty without TLS.
    pub fn tls_query(&self) -> String {
        self.tls.as_ref().map_or_else(String::new, |t| {
            format!("?ssl_mode=verify_identity&ssl_ca={}", t.ca.display())
        })
    }

    /// Like [`Cluster::topology_yaml`], with DSNs on `database`; with
    /// [`ClusterSpec::tls`], every DSN has [`Cluster::tls_query`].
    pub fn topology_yaml_for(&self, database: &str, vnodes: u32) -> String {
        let q = self.tls_query();
        let mut yaml =
            format!("version: 1\nvnodes: {vnodes}\nadmin:\n  user: {ADMIN_USER}\ngroups:\n");
        for group in &self.groups {
            yaml.push_str(&format!(
                "  - name: {}\n    weight: 1\n    master: {}{q}\n",
                group.name,
                group.master.dsn(database)
            ));
            if group.replicas.is_empty() {
                yaml.push_str("    replicas: []\n");
            } else {
                yaml.push_str("    replicas:\n");
                for replica in &group.replicas {
                    yaml.push_str(&format!("      - {}{q}\n", replica.dsn(database)));
                }
            }
        }
        yaml
    }

    /// Stops every server cleanly (SIGTERM, wait for exit), all at once.
    pub async fn shutdown(self) {
        join_all(self.nodes().map(Node::stop)).await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Explicit so the order is obvious: every server is SIGKILLed and
        // reaped here, then the fields (directories) are dropped.
        for node in self.nodes() {
            node.kill9();
        }
    }
}

/// Name prefixes of the temporary directories the harness creates; the
/// creating process's pid follows, so stale ones can be recognised.
const TEMP_STATE_PREFIX: &str = "tally-harness-";
const SOCKET_PREFIX: &str = "tally-sock-";

/// `prefix` + our pid + `-`.
fn owned_prefix(prefix: &str) -> String {
    format!("{prefix}{}-", std::process::id())
}

/// Removes temporary directories left by harness processes that died
/// without running destructors (SIGKILL, a shared cluster at exit). Their
/// servers are already gone: they received SIGKILL with their parent.
fn sweep_stale_dirs(parent: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::debug!(dir = %entry.path().display(), "removing a stale harness directory");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Sockets go to a short directory: a unix socket path is limited to 107
/// bytes and a state directory (or `$TMPDIR`) can be much longer.
fn socket_dir() -> PathBuf {
    PathBuf::from("/tmp")
}

/// The servers' TLS files in `dir`: kept when all three are there (a
/// reused state directory keeps its CA, so clients that trust it still
/// do), else a new CA and server certificate.
fn server_tls_files(dir: &Path) -> Result<TlsFiles, HarnessError> {
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
    };
    if files.ca.exists() && files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    TestCa::new("tally-harness CA")?.write_server(dir, "server", &crate::tls::LOCAL_NAMES)
}

/// Settings shared by every server, then the role's, then the caller's.
fn server_args(spec: &ClusterSpec, role: Role) -> Vec<String> {
    let mut args: Vec<String> = [
        "--user=root",
        "--bind-address=127.0.0.1",
        // Clients arrive as root@127.0.0.1; no DNS lookups on connect.
        "--skip-name-resolve",
        "--log-bin=bin",
        "--relay-log=relay",
        "--binlog-format=ROW",
        "--character-set-server=utf8mb4",
        "--innodb-log-file-size=8M",
        // The default 12 MB temporary tablespace is written in full at every
        // start: wasted I/O for a test server.
        "--innodb-temp-data-file-path=ibtmp1:1M:autoextend",
        // The harness simulates process deaths, never OS crashes, and a
        // killed process loses nothing with 2: commits only skip the fsync.
        "--innodb-flush-log-at-trx-commit=2",
        "--max-connections=200",
        // Replicas notice a silent master within seconds, not a minute.
        "--slave-net-timeout=10",
    ]
    .map(str::to_owned)
    .into();
    args.push(format!("--innodb-buffer-pool-size={}", spec.buffer_pool));
    // A master without replicas would wait out the semi-sync timeout on its
    // first commits before falling back to async; there is nobody to ack.
    let semi_sync = spec.semi_sync && spec.replicas > 0;
    match (role, semi_sync) {
        (Role::Master, true) => args.extend(
            [
                "--rpl-semi-sync-master-enabled=ON",
                "--rpl-semi-sync-master-timeout=2000",
            ]
            .map(str::to_owned),
        ),
        (Role::Master, false) => {}
        (Role::Replica, semi_sync) => {
            if semi_sync {
                args.push("--rpl-semi-sync-slave-enabled=ON".to_owned());
            }
            args.extend(["--read-only=ON", "--log-slave-updates"].map(str::to_owned));
        }
    }
    args.extend(spec.extra_args.iter().cloned());
    args
}

/// Makes `dir` hold data directories for `spec`: reuses a matching earlier
/// cluster, or creates new ones from a template. Returns the layout to boot
/// and the template used, if any.
async fn prepare_state_dir(
    spec: &ClusterSpec,
    dir: &Path,
    install_db: &Path,
) -> Result<(Layout, Option<Arc<Template>>), HarnessError> {
    let state_error = |problem: String| HarnessError::StateDir {
        dir: dir.to_owned(),
        problem,
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
    if spec.fresh && !is_empty_dir(dir)? {
        // Only a directory we created (or an empty one) may be wiped.
        if !dir.join(LAYOUT_FILE).exists() {
            return Err(state_error(format!(
                "refusing to wipe a non-empty directory without {LAYOUT_FILE}"
            )));
        }
        wipe_dir(dir)?;
    }
    if let Some(layout) = Layout::read(dir)? {
        if layout.format != LAYOUT_FORMAT || !layout.complete {
            return Err(state_error(
                "holds an incomplete or older cluster; use fresh to wipe it".to_owned(),
            ));
        }
        if (layout.groups, layout.replicas) != (spec.groups, spec.replicas) {
            return Err(state_error(format!(
                "holds a cluster of {} group(s) x {} replica(s), not {} x {}; use fresh to wipe it",
                layout.groups, layout.replicas, spec.groups, spec.replicas
            )));
        }
        tracing::info!(dir = %dir.display(), "reusing MariaDB data directories");
        return Ok((layout, None));
    }
    if !is_empty_dir(dir)? {
        return Err(state_error(format!(
            "is not empty and holds no {LAYOUT_FILE}; use an empty directory"
        )));
    }

    let mut layout = Layout::new(spec.groups, spec.replicas);
    // Written before any data directory exists: it marks the directory as
    // ours (so `fresh` may wipe it) while `complete` stays false.
    layout.write(dir)?;
    let template = template(install_db).await?;
    try_join_all(
        layout
            .nodes
            .iter()
            .map(|n| copy_dir(&template.datadir, dir.join(&n.name))),
    )
    .await?;
    layout.complete = true;
    layout.write(dir)?;
    Ok((layout, Some(template)))
}

/// Grants both users their privileges on `database` (as root, replicated),
/// then creates the database and every schema statement on `master` as the
/// admin user, as the proxy does; all are idempotent, so a reused cluster
/// gets the same treatment.
async fn apply_schema(master: &Node, database: &str) -> Result<(), HarnessError> {
    master
        .exec_all("root", None, &database_grants(database))
        .await?;
    master
        .exec_all(ADMIN_USER, None, &[tally_schema::create_database(database)])
        .await?;
    master
        .exec_all(ADMIN_USER, Some(database), &tally_schema::statements())
        .await
}

fn is_empty_dir(dir: &Path) -> Result<bool, HarnessError> {
    std::fs::read_dir(dir)
        .map(|mut entries| entries.next().is_none())
        .map_err(|e| HarnessError::io(format!("listing {}", dir.display()), e))
}

fn wipe_dir(dir: &Path) -> Result<(), HarnessError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| HarnessError::io(format!("listing {}", dir.display()), e))?;
    for entry in entries {
        let path = entry
            .map_err(|e| HarnessError::io(format!("listing {}", dir.display()), e))?
            .path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| HarnessError::io(format!("removing {}", path.display()), e))?;
    }
    Ok(())
}

/// A data directory fresh from `mariadb-install-db`; every node's datadir
/// starts as a copy of it.
#[derive(Debug)]
struct Template {
    /// Removed when the last cluster holding the template is dropped.
    _holder: tempfile::TempDir,
    datadir: PathBuf,
}

/// The template shared by every cluster of this process that is alive.
///
/// `mariadb-install-db` costs about a second of CPU and test binaries start
/// clusters in parallel, so they share one template while any of them runs
/// (each holds an `Arc`); the last one to drop removes it. A template held
/// at exit (the shared cluster) carries our pid in its name and is swept by
/// a later run.
async fn template(install_db: &Path) -> Result<Arc<Template>, HarnessError> {
    // An async mutex: concurrent starters wait for one install.
    static TEMPLATE: tokio::sync::Mutex<Weak<Template>> =
        tokio::sync::Mutex::const_new(Weak::new());
    let mut slot = TEMPLATE.lock().await;
    if let Some(template) = slot.upgrade() {
        return Ok(template);
    }
    let holder = tempfile::Builder::new()
        .prefix(&owned_prefix(TEMP_STATE_PREFIX))
        .tempdir()
        .map_err(|e| HarnessError::io("creating the template directory", e))?;
    let datadir = holder.path().join("datadir");
    install_template(install_db, &datadir).await?;
    let template = Arc::new(Template {
        _holder: holder,
        datadir,
    });
    *slot = Arc::downgrade(&template);
    Ok(template)
}

/// Runs `mariadb-install-db` into `template`.
async fn install_template(install_db: &Path, template: &Path) -> Result<(), HarnessError> {
    let extra = template.with_extension("sql");
    let tmpdir = template.with_extension("tmp");
    std::fs::create_dir_all(&tmpdir)
        .map_err(|e| HarnessError::io(format!("creating {}", tmpdir.display()), e))?;
    std::fs::write(&extra, BOOTSTRAP_SQL)
        .map_err(|e| HarnessError::io(format!("writing {}", extra.display()), e))?;
    let began = Instant::now();
    let output = tokio::process::Command::new(install_db)
        .arg("--no-defaults")
        .arg(format!("--datadir={}", template.display()))
        .arg("--user=root")
        .arg("--auth-root-authentication-method=normal")
        .arg("--skip-name-resolve")
        .arg("--skip-test-db")
        .arg(format!("--extra-file={}", extra.display()))
        // See `Node::tmpdir`: a shared /tmp lets concurrent servers delete
        // each other's temporary tables.
        .arg(format!("--tmpdir={}", tmpdir.display()))
        // Passed through to the bootstrap server: the redo log is created
        // at this size, so every copy is 8 MB instead of 96 MB.
        .arg("--innodb-log-file-size=8M")
        .arg("--innodb-buffer-pool-size=32M")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| HarnessError::io(format!("running {}", install_db.display()), e))?;
    let _ = std::fs::remove_file(&extra);
    if !output.status.success() {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let lines: Vec<&str> = text.lines().collect();
        return Err(HarnessError::InstallDb {
            status: output.status.to_string(),
            output: lines[lines.len().saturating_sub(30)..].join("\n"),
        });
    }
    tracing::debug!(elapsed = ?began.elapsed(), "template data directory created");
    Ok(())
}

async fn copy_dir(from: &Path, to: PathBuf) -> Result<(), HarnessError> {
    let status = tokio::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(&to)
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| HarnessError::io("running cp", e))?;
    if status.success() {
        Ok(())
    } else {
        Err(HarnessError::io(
            format!("copying {} to {}", from.display(), to.display()),
            std::io::Error::other(format!("cp exited with {status}")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_gives_unique_nonzero_server_ids_and_names() {
        let layout = Layout::new(2, 2);
        let names: Vec<&str> = layout.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "g0-master",
                "g0-replica1",
                "g0-replica2",
                "g1-master",
                "g1-replica1",
                "g1-replica2"
            ]
        );
        let mut ids: Vec<u32> = layout.nodes.iter().map(|n| n.server_id).collect();
        ids.dedup();
        assert_eq!(ids, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn spec_validation_reports_every_problem() {
        let spec = ClusterSpec {
            groups: 0,
            database: "bad-name".into(),
            buffer_pool: "32M; DROP".into(),
            ..ClusterSpec::default()
        };
        let message = spec.validate().expect_err("invalid spec").to_string();
        for needle in ["groups", "database", "buffer_pool"] {
            assert!(message.contains(needle), "{message}");
        }
        ClusterSpec::default()
            .validate()
            .expect("default spec is valid");
    }

    #[test]
    fn replica_args_are_read_only_and_semi_sync() {
        let spec = ClusterSpec::default();
        let replica = server_args(&spec, Role::Replica);
        assert!(replica.contains(&"--read-only=ON".to_owned()));
        assert!(replica.contains(&"--rpl-semi-sync-slave-enabled=ON".to_owned()));
        let master = server_args(
            &ClusterSpec {
                semi_sync: false,
                ..spec
            },
            Role::Master,
        );
        assert!(!master.iter().any(|a| a.contains("semi-sync")));
    }
}
