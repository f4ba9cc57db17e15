//! `tally-chaos`: a soak under faults with a client ledger.
//!
//! Writers send batches (three with `ack=committed`, one with
//! `ack=buffered`) to two real `tally-proxy` processes (each request picks
//! one) over two MariaDB groups (master behind a [`FaultRelay`], two
//! replicas each). The proxies share a topology store (`tally_meta` on a
//! server of its own that no fault touches); proxy 2 reaches it through a
//! relay of its own. One fault after another hits the system: kill -9 of a
//! replica, kill -9 of a master followed by promotion (one group's, once,
//! through proxy 1; proxy 2 learns the new master from the store), a
//! planned switchover to a replica and back through proxy 1 while both
//! proxies write (it must answer `mode: planned`, and proxy 2 must follow
//! each step through the store), a connection cut right after COMMIT (the
//! answer is lost), a connection black-holed at COMMIT (nothing is
//! forwarded, nothing closed: the flush attempt times out and its stale
//! session must be killed), proxy 2's path to the topology store
//! black-holed for longer than the registry's alive window (its writes
//! may be refused, 503 `store_unreachable`, never acknowledged and then
//! lost), replication stopped and restarted, SIGTERM and restart of one
//! proxy (the other must keep serving), SIGTERM of one proxy while a master
//! is dead (the stop waits, the admin listener still serves, and it
//! completes once the master is back), a counter whose total overflows 64
//! bits (it must be quarantined, and nothing else may stall), and with
//! `wal` (`durability: wal`) also kill -9 of one proxy and restart: the
//! log's replay must keep every `ack=buffered` write.
//! Every request's deltas are added to `sent` before it goes out
//! and to `acked` when it is answered 200 (refusals are counted per proxy
//! and code). At the end every counter must
//! satisfy `acked ≤ stored ≤ sent`: nothing acknowledged lost, nothing
//! counted twice. After every fault a committed write through each proxy
//! must succeed again, and in every pause between two faults the writers
//! must get acknowledgements: the faults and the hostile clients may not
//! starve them.
//!
//! With `ids` (`tally-chaos --ids`), every writer event carries an
//! idempotency `id` and a request that is not answered 200 is retried,
//! with the same ids, through a proxy drawn again, until it is: the
//! verdict is then exact equality, `stored = acked` for every writer
//! counter (nothing lost, nothing counted twice, however many retries).
//!
//! With `hostile`, clients that mean harm run against proxy 1 next to the
//! writers for the whole soak, in namespaces of their own (see
//! `chaos/hostile.rs`): slow bodies, maximal bodies, colliding keys, wide
//! minute spreads and strong top-K storms. Their refusals are counted; a
//! bound that does not hold, or a strong top-K answer outside the ledger,
//! fails the soak.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fastrand::Rng;
use serde_json::{Value, json};
use tally_harness::{Cluster, ClusterSpec, FaultRelay};
use tempfile::{TempDir, tempdir};
use tokio::task::JoinHandle;
use tokio::time::sleep;

use crate::{Client, KillOnDrop};

mod hostile;

pub use hostile::{HostileKind, HostileStats};

const NS: &str = "chaos";
/// Writer counters per group: every group takes writes, so every fault
/// aimed at one group (a cut COMMIT, a killed master) meets writer traffic.
const KEYS_PER_GROUP: usize = 32;
const TOKEN: &str = "chaos-token";
/// How long proxy 2's path to the topology store stays a black hole:
/// longer than the registry's alive window (5 s), past which a proxy that
/// has not read the store may route by a ring the others have left.
const STORE_BLACK_HOLE: Duration = Duration::from_secs(8);
/// How long proxy 2 may take to follow a change made through proxy 1 (it
/// polls the store every 200 ms).
const FOLLOW_WITHIN: Duration = Duration::from_secs(10);
/// An injection that did not take effect (counted as a skipped turn).
const NOT_FIRED: &str = "the fault did not fire";

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// How long faults are injected (load runs a little longer).
    pub duration: Duration,
    /// Pause between two faults.
    pub every: Duration,
    pub seed: u64,
    /// The `tally-proxy` executable (both proxies run it).
    pub proxy_bin: PathBuf,
    /// Run the proxies with `durability: wal` and add kill -9 of one proxy
    /// to the faults.
    pub wal: bool,
    /// Keep injecting past `duration` until every kind came up this many
    /// times (turns, skipped ones included), so a slow fault (a black-holed
    /// COMMIT takes the flusher's 30 s attempt timeout) cannot crowd the
    /// others out.
    pub min_rounds: usize,
    /// Run hostile clients next to the writers (`hostile.rs`, against
    /// proxy 1); the proxies get a short body deadline (4 s, rate grace 1 s) so slow bodies cycle.
    pub hostile: bool,
    /// Events carry ids and every failed request is retried until it is
    /// acknowledged; the verdict is exact equality with the ledger.
    pub ids: bool,
}

/// The kinds of fault, injected round-robin in a seeded order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    KillReplica,
    KillMasterAndPromote,
    CutAfterCommit,
    StopReplication,
    RestartProxy,
    BlackHoleCommit,
    OverflowCounter,
    StopWithDeadMaster,
    /// Proxy 2's path to the topology store, for longer than the alive
    /// window.
    BlackHoleStore,
    /// A planned promotion of a replica through proxy 1 and one back to
    /// the first master, while both proxies write.
    Switchover,
    /// Only with the WAL.
    KillProxy,
}

impl FaultKind {
    const ALL: [FaultKind; 10] = [
        FaultKind::KillReplica,
        FaultKind::KillMasterAndPromote,
        FaultKind::CutAfterCommit,
        FaultKind::StopReplication,
        FaultKind::RestartProxy,
        FaultKind::BlackHoleCommit,
        FaultKind::OverflowCounter,
        FaultKind::StopWithDeadMaster,
        FaultKind::BlackHoleStore,
        FaultKind::Switchover,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillReplica => "kill -9 a replica, restart it",
            FaultKind::KillMasterAndPromote => "kill -9 a master, promote a replica",
            FaultKind::CutAfterCommit => "cut the connection after COMMIT",
            FaultKind::StopReplication => "stop replication, restart it",
            FaultKind::RestartProxy => "SIGTERM a proxy, restart it",
            FaultKind::BlackHoleCommit => "black-hole the connection at COMMIT",
            FaultKind::OverflowCounter => "overflow a counter past 2^63-1",
            FaultKind::StopWithDeadMaster => "SIGTERM a proxy with a dead master, then restart it",
            FaultKind::BlackHoleStore => "black-hole proxy 2's path to the topology store",
            FaultKind::Switchover => "planned switchover to a replica and back (2 proxies)",
            FaultKind::KillProxy => "kill -9 a proxy, restart it (WAL replay)",
        }
    }
}

/// One fault kind's tally.
#[derive(Debug, Clone, Default)]
pub struct FaultStats {
    pub injected: u32,
    /// Committed writes succeeded again after it.
    pub recovered: u32,
    pub worst_recovery: Duration,
    /// Turns that drew this fault but could not inject it (e.g. every
    /// group's master was already promoted away from its relay).
    pub skipped: u32,
    /// What went differently than planned (e.g. a refused promotion).
    pub notes: Vec<String>,
}

/// The outcome of a soak.
#[derive(Debug, Clone, Default)]
pub struct ChaosReport {
    pub faults: BTreeMap<FaultKind, FaultStats>,
    pub requests: u64,
    pub acked_requests: u64,
    pub counters: usize,
    /// Counters whose stored value is below what was acknowledged.
    pub lost: Vec<String>,
    /// Counters whose stored value exceeds everything sent (with `ids`:
    /// exceeds what was acknowledged).
    pub doubled: Vec<String>,
    /// With `ids`: the verdict is exact equality, and these writer
    /// requests were given up after retrying for [`RETRY_FOR`].
    pub exact: bool,
    pub unresolved: u64,
    /// Pauses between faults (`every`), and those in which no writer
    /// request was acknowledged.
    pub pauses: u32,
    pub unserved_pauses: u32,
    /// The fewest writer requests acknowledged in one pause.
    pub fewest_acks_in_a_pause: Option<u64>,
    /// Writer requests not acknowledged, by proxy and answer
    /// (`"proxy 2: 503 store_unreachable"`, `"proxy 1: no answer"`):
    /// expected during faults, counted in `sent` only.
    pub refused: BTreeMap<String, u64>,
    /// What a fault turn found broken besides the ledger (a switchover that
    /// was not planned, a proxy that did not follow the store, a proxy that
    /// stopped serving while the other one restarted).
    pub problems: Vec<String>,
    /// What the hostile clients did (empty without `hostile`).
    pub hostile: BTreeMap<HostileKind, HostileStats>,
}

impl ChaosReport {
    pub fn ok(&self) -> bool {
        self.lost.is_empty()
            && self.doubled.is_empty()
            && self.unresolved == 0
            && self.faults.values().all(|f| f.recovered == f.injected)
            && self.unserved_pauses == 0
            && self.problems.is_empty()
            && self.hostile.values().all(|h| h.unexpected == 0)
    }

    /// A Markdown table of the faults, then the verdict.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "| fault | injected | recovered | worst recovery | skipped turns |\n| --- | ---: | ---: | ---: | ---: |\n",
        );
        for (kind, f) in &self.faults {
            out += &format!(
                "| {} | {} | {} | {:.1} s | {} |\n",
                kind.name(),
                f.injected,
                f.recovered,
                f.worst_recovery.as_secs_f64(),
                f.skipped
            );
            for n in &f.notes {
                out += &format!("|   note: {n} | | | | |\n");
            }
        }
        out += &format!(
            "\n{} requests, {} acknowledged; {} counters: {} lost an acknowledged increment, {} counted more than was sent\n",
            self.requests,
            self.acked_requests,
            self.counters,
            self.lost.len(),
            self.doubled.len()
        );
        if self.exact {
            out += &format!(
                "with ids, every failed request retried until acknowledged ({} given up): verdict stored = acknowledged, exactly\n",
                self.unresolved
            );
        }
        out += &format!(
            "writers acknowledged in {} of {} pauses between faults (fewest {} requests in one)\n",
            self.pauses - self.unserved_pauses,
            self.pauses,
            self.fewest_acks_in_a_pause.unwrap_or(0)
        );
        if !self.refused.is_empty() {
            let refused: Vec<String> = self
                .refused
                .iter()
                .map(|(answer, n)| format!("{answer} x{n}"))
                .collect();
            out += &format!(
                "writer requests refused or unanswered (expected, never acknowledged): {}\n",
                refused.join(", ")
            );
        }
        for p in &self.problems {
            out += &format!("PROBLEM: {p}\n");
        }
        if !self.hostile.is_empty() {
            out += &self.render_hostile();
        }
        out
    }

    /// The hostile clients: a row per kind, then one line over all.
    fn render_hostile(&self) -> String {
        let mut out = String::from(
            "\n| hostile client | requests | answers | unexpected |\n| --- | ---: | --- | ---: |\n",
        );
        let mut classes: BTreeMap<&str, u64> = BTreeMap::new();
        let (mut requests, mut unexpected, mut checked) = (0, 0, 0);
        let (mut unready, mut unready_below) = (0, 0);
        for (kind, h) in &self.hostile {
            let answers: Vec<String> = h.answers.iter().map(|(a, n)| format!("{a} x{n}")).collect();
            out += &format!(
                "| {} | {} | {} | {} |\n",
                kind.name(),
                h.requests,
                answers.join(", "),
                h.unexpected
            );
            for e in &h.examples {
                out += &format!("|   unexpected: {e} | | | |\n");
            }
            for (answer, n) in &h.answers {
                let class = match answer.as_bytes()[0] {
                    b'2' => "2xx",
                    b'4' => "4xx",
                    b'5' => "5xx",
                    _ => "no answer",
                };
                *classes.entry(class).or_default() += n;
            }
            requests += h.requests;
            unexpected += h.unexpected;
            checked += h.ledger_checked;
            unready += h.unready_reads;
            unready_below += h.unready_below_ledger;
        }
        let classes: Vec<String> = classes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        out += &format!(
            "\nhostile clients: {requests} requests next to the writers ({}); {unexpected} unexpected; \
             {checked} strong top-K answers of `{NS}` within the ledger\n",
            classes.join(", ")
        );
        if unready > 0 {
            out += &format!(
                "{unready} strong top-K answers of `{NS}` came from a restarting proxy (before \
                 /readyz), {unready_below} of them below what was acknowledged\n"
            );
        }
        out
    }
}

/// One counter's line in the client ledger. A counter is correct when
/// `acked ≤ stored ≤ sent`.
#[derive(Debug, Clone, Copy, Default)]
struct LedgerEntry {
    /// Deltas of requests answered 200: the store must hold at least this.
    acked: i64,
    /// Of `acked`, what a strong read through proxy 1 must count at once:
    /// committed through either proxy, or buffered through proxy 1 (a
    /// buffered write through proxy 2 is pending there until it flushes).
    acked_first: i64,
    /// Deltas of every request that went out, answered or not: the store
    /// may hold at most this.
    sent: i64,
}

/// Per counter key: what was sent and acknowledged.
type Ledger = BTreeMap<String, LedgerEntry>;

/// One increment of a writer's batch.
struct Increment {
    key: String,
    delta: i64,
}

/// The system under test and what the fault turns change in it.
///
/// Field order is drop order: on any early return the proxies are killed
/// before their temporary directory (configs, logs, WALs) is removed and
/// before the relays and MariaDB servers they talk to go away.
struct System {
    client: Client,
    /// Proxy 1 (index 0: the hostile clients' target, promotions go
    /// through it, it reaches the store directly) and proxy 2 (index 1:
    /// its store path runs through `store_relay`).
    proxies: [ProxyProc; 2],
    /// Kept only to be removed at the end (it holds the proxies' files).
    _dir: TempDir,
    relays: Vec<FaultRelay>,
    /// Proxy 2's path to the topology store.
    store_relay: FaultRelay,
    cluster: Cluster,
    /// The topology store's server (`tally_meta`), which no fault touches.
    _store: Cluster,
    /// Per group: the index of the replica promoted to master, if any.
    promoted: [Option<usize>; 2],
    /// The topology document the proxy started with (routing by name is
    /// the same after a promotion).
    topology: String,
    /// Keys of [`NS`] written by the fault turns themselves (acknowledged
    /// `ack=buffered` writes made just before a stop with a dead master).
    turn_writes: Ledger,
}

/// One proxy child process and how to restart it.
struct ProxyProc {
    /// "proxy 1" or "proxy 2", for messages.
    name: String,
    bin: PathBuf,
    config: PathBuf,
    http: u16,
    admin: u16,
    child: Option<KillOnDrop>,
    /// Odd from a stop or kill until the next life is ready, so a reader
    /// can tell whether one life served it throughout.
    lives: Arc<AtomicU64>,
}

impl ProxyProc {
    /// Writes `proxy.yaml` and `topology.yaml` into a directory of proxy
    /// `n` (1 or 2) under `dir` (fresh ports; the shared topology `store`;
    /// fast flush, health, retry and store poll intervals so that faults
    /// are noticed and healed within a turn) and returns the proxy, not
    /// started yet.
    fn configure(
        cfg: &ChaosConfig,
        dir: &Path,
        n: usize,
        store: &str,
        topology: &str,
    ) -> Result<ProxyProc, String> {
        let dir = dir.join(format!("proxy{n}"));
        fs::create_dir(&dir).map_err(|e| e.to_string())?;
        fs::write(dir.join("topology.yaml"), topology).map_err(|e| e.to_string())?;
        let (http, admin) = (free_port()?, free_port()?);
        let config = dir.join("proxy.yaml");
        fs::write(
            &config,
            format!(
                "listen: {{ http: 127.0.0.1:{http}, admin: 127.0.0.1:{admin} }}\n\
                 writer_id: chaos-p{n}\n\
                 topology: {{ store: '{store}', poll_interval: 200ms, heartbeat_interval: 500ms }}\n\
                 buffer: {{ flush_interval: 100ms, retry_max: 500ms }}\n\
                 health: {{ interval: 200ms, timeout: 500ms }}\n\
                 pool: {{ connect_timeout: 1s }}\n{}{}",
                if cfg.wal {
                    "durability: wal\nwal: { dir: wal, replay_wait: 5s }\n"
                } else {
                    ""
                },
                // Slow bodies are cut within a few seconds, so the hostile
                // ones cycle (and a stop's drain waits that long at most).
                if cfg.hostile {
                    "connections: { body_read_timeout: 4s, body_rate_grace: 1s }\n"
                } else {
                    ""
                }
            ),
        )
        .map_err(|e| e.to_string())?;
        Ok(ProxyProc {
            name: format!("proxy {n}"),
            bin: cfg.proxy_bin.clone(),
            config,
            http,
            admin,
            child: None,
            lives: Arc::new(AtomicU64::new(0)),
        })
    }

    fn log(&self) -> PathBuf {
        self.config.with_file_name("proxy.log")
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .map_err(|e| e.to_string())?;
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .env("TALLY_ADMIN_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn tally-proxy ({}): {e}", self.name))?;
        self.child = Some(KillOnDrop(child));
        Ok(())
    }

    async fn wait_ready(&self, client: &Client) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !matches!(client.get(&self.url("/readyz")).await, Ok((200, _))) {
            if Instant::now() > deadline {
                let log = fs::read_to_string(self.log()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                return Err(format!(
                    "{} did not become ready within 60 s; its log ends:\n{}",
                    self.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
            sleep(Duration::from_millis(50)).await;
        }
        self.came_up();
        Ok(())
    }

    /// A stop or kill begins: not ready until the next life is.
    fn going_down(&self) {
        let _ = self
            .lives
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                n.is_multiple_of(2).then_some(n + 1)
            });
    }

    /// A life answered ready.
    fn came_up(&self) {
        let _ = self
            .lives
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (!n.is_multiple_of(2)).then_some(n + 1)
            });
    }

    /// SIGKILL (no flush: the WAL must keep buffered writes).
    fn kill(&mut self) -> Result<(), String> {
        self.going_down();
        if let Some(mut child) = self.child.take() {
            child.kill().map_err(|e| e.to_string())?;
            child.wait().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Starts the next life and waits until it is ready.
    async fn start(&mut self, client: &Client) -> Result<(), String> {
        self.spawn()?;
        self.wait_ready(client).await
    }

    /// Earlier lives still waiting in the WAL directory (replay not done).
    fn unreplayed_lives(&self) -> usize {
        let dir = self.config.with_file_name("wal");
        fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .count()
            })
            .unwrap_or(0)
            .saturating_sub(1)
    }

    /// SIGTERM and wait (at most a minute) for the graceful exit, which
    /// must succeed: the proxy flushes everything on the way out.
    async fn stop(&mut self) -> Result<(), String> {
        self.signal_stop();
        self.wait_exit().await
    }

    /// SIGTERM, without waiting.
    fn signal_stop(&self) {
        self.going_down();
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on the pid of our own, still unreaped child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
    }

    /// Whether the process is still running.
    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits (at most a minute) for the exit after a SIGTERM, which must
    /// be a success.
    async fn wait_exit(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => return Err(format!("{} exited with {status}", self.name)),
                _ if Instant::now() > deadline => {
                    return Err(format!("{} did not stop within 60 s of SIGTERM", self.name));
                }
                _ => sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin)
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

/// Runs the soak; `Err` only when the soak itself could not run.
pub async fn run(cfg: ChaosConfig) -> Result<ChaosReport, String> {
    let mut sys = start_system(&cfg).await?;
    // The bounds the hostile clients aim at: the config proxy 1 runs with.
    let limits = if cfg.hostile {
        let proxy_cfg = tally_proxy::ProxyConfig::load(&sys.proxies[0].config)
            .map_err(|e| format!("reading the proxy's config: {e}"))?;
        Some(hostile::Limits::of(&proxy_cfg))
    } else {
        None
    };
    let writers = Writers::start(&cfg, &sys.proxies, &sys.topology);
    let hostile = limits.map(|limits| {
        hostile::Hostile::start(
            cfg.seed,
            sys.proxies[0].http,
            limits,
            writers.state.clone(),
            sys.proxies[0].lives.clone(),
        )
    });
    let mut report = ChaosReport::default();
    let soak = async {
        inject_faults(&cfg, &mut sys, &writers, &mut report).await?;
        if let Some(hostile) = hostile {
            report.hostile = hostile.stop().await;
        }
        let load = writers.stop().await?;
        report.refused = load.refused.clone();
        settle(&sys).await?;
        verify_ledger(&sys, &load, cfg.ids, &mut report).await
    };
    let outcome = soak.await;
    // The proxies' logs live in a temporary directory; keep copies where
    // `TALLY_CHAOS_LOG` says (proxy 2's with `.2` appended), for looking
    // into a run afterwards.
    if let Ok(copy) = std::env::var("TALLY_CHAOS_LOG") {
        let _ = fs::copy(sys.proxies[0].log(), &copy);
        let _ = fs::copy(sys.proxies[1].log(), format!("{copy}.2"));
    }
    outcome?;
    shut_down(&mut sys).await;
    Ok(report)
}

/// Starts what the soak hits: two MariaDB groups (a master and two
/// replicas each), a [`FaultRelay`] in front of each master so that
/// connections to it can be cut, the topology store's server (one more
/// MariaDB, `tally_meta`) with a relay for proxy 2's path to it, and the
/// two proxies, ready to serve (proxy 1 first: it seeds the store).
async fn start_system(cfg: &ChaosConfig) -> Result<System, String> {
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        replicas: 2,
        ..ClusterSpec::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let store = Cluster::start(ClusterSpec {
        groups: 1,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let store_node = &store.group(0).master;
    let store_relay = FaultRelay::start(store_node.addr())
        .await
        .map_err(|e| e.to_string())?;
    // Not `FaultRelay::dsn`: its query string is no topology DSN, and the
    // store needs root (it creates `tally_meta`).
    let stores = [
        store_node.root_dsn("tally_meta"),
        format!("mysql://root@{}/tally_meta", store_relay.addr()),
    ];
    let mut relays = Vec::new();
    for g in 0..2 {
        relays.push(
            FaultRelay::start(cluster.group(g).master.addr())
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let dir = tempdir().map_err(|e| e.to_string())?;
    let topology = topology_yaml(&cluster, &relays);
    let proxies = [
        ProxyProc::configure(cfg, dir.path(), 1, &stores[0], &topology)?,
        ProxyProc::configure(cfg, dir.path(), 2, &stores[1], &topology)?,
    ];
    let mut sys = System {
        client: Client::new(),
        proxies,
        _dir: dir,
        relays,
        store_relay,
        cluster,
        _store: store,
        promoted: [None; 2],
        topology,
        turn_writes: Ledger::new(),
    };
    for p in &mut sys.proxies {
        p.start(&sys.client).await?;
    }
    Ok(sys)
}

/// What the writers share with each other and with [`Writers::stop`].
#[derive(Default)]
struct WriterState {
    ledger: Mutex<Ledger>,
    stop: AtomicBool,
    requests: AtomicU64,
    acked: AtomicU64,
    /// Requests not acknowledged, by proxy and answer.
    refused: Mutex<BTreeMap<String, u64>>,
    /// With ids: requests given up after retrying for [`RETRY_FOR`].
    unresolved: AtomicU64,
}

/// With ids, how long a writer retries one request before giving up on it
/// (which fails the soak).
const RETRY_FOR: Duration = Duration::from_secs(180);

impl WriterState {
    /// Before a batch goes out: whatever happens to it, the store may now
    /// hold its deltas.
    fn record_sent(&self, batch: &[Increment]) {
        let mut ledger = self.ledger.lock().expect("ledger");
        for inc in batch {
            ledger.entry(inc.key.clone()).or_default().sent += inc.delta;
        }
    }

    /// After a 200: the store must now hold the batch's deltas, and a
    /// strong read through proxy 1 must count them if `first_sees` them
    /// (committed, or buffered through proxy 1).
    fn record_acked(&self, batch: &[Increment], first_sees: bool) {
        let mut ledger = self.ledger.lock().expect("ledger");
        for inc in batch {
            let e = ledger.entry(inc.key.clone()).or_default();
            e.acked += inc.delta;
            if first_sees {
                e.acked_first += inc.delta;
            }
        }
    }

    /// A request not acknowledged: `answer` is `"503 store_unreachable"`
    /// or `"no answer"`.
    fn record_refused(&self, proxy: &str, answer: &str) {
        let mut refused = self.refused.lock().expect("refusals");
        *refused.entry(format!("{proxy}: {answer}")).or_default() += 1;
    }

    /// Requests through `proxy` refused so far with `answer`.
    fn refused(&self, proxy: &str, answer: &str) -> u64 {
        let refused = self.refused.lock().expect("refusals");
        refused
            .get(&format!("{proxy}: {answer}"))
            .copied()
            .unwrap_or(0)
    }
}

/// The load running during the faults.
struct Writers {
    state: Arc<WriterState>,
    tasks: Vec<JoinHandle<()>>,
}

/// What the writers sent, read once they have all stopped.
struct LoadTotals {
    requests: u64,
    acked_requests: u64,
    ledger: Ledger,
    refused: BTreeMap<String, u64>,
    unresolved: u64,
}

impl Writers {
    /// Starts four writers, each with its own seeded key sequence; three
    /// use `ack=committed` and one `ack=buffered`, so both acknowledgement
    /// paths are under test. Each request goes to one of the `proxies`,
    /// drawn from the writer's sequence.
    fn start(cfg: &ChaosConfig, proxies: &[ProxyProc; 2], topology: &str) -> Writers {
        let state = Arc::new(WriterState::default());
        let keys: Arc<[String]> = writer_keys(topology).into();
        let tasks = (0..4u64)
            .map(|w| {
                // One writer of four takes `ack=buffered`: a graceful
                // restart must keep what it acknowledged before the commit.
                let ack = if w == 3 { "buffered" } else { "committed" };
                let targets = proxies
                    .each_ref()
                    .map(|p| (p.name.clone(), p.url(&format!("/v1/events?ack={ack}"))));
                let rng = Rng::with_seed(cfg.seed ^ (w + 1));
                let committed = ack == "committed";
                // Ids unique per soak (the seed) and writer.
                let ids = cfg.ids.then(|| format!("s{}-w{w}", cfg.seed));
                tokio::spawn(write_until_stopped(
                    state.clone(),
                    keys.clone(),
                    targets,
                    committed,
                    rng,
                    ids,
                ))
            })
            .collect();
        Writers { state, tasks }
    }

    /// Writer requests acknowledged so far.
    fn acked(&self) -> u64 {
        self.state.acked.load(Ordering::Relaxed)
    }

    /// Stops the writers and waits for each one's request in flight, so
    /// that the ledger no longer changes when it is compared.
    async fn stop(self) -> Result<LoadTotals, String> {
        self.state.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.map_err(|e| e.to_string())?;
        }
        Ok(LoadTotals {
            requests: self.state.requests.load(Ordering::Relaxed),
            acked_requests: self.state.acked.load(Ordering::Relaxed),
            ledger: self.state.ledger.lock().expect("ledger").clone(),
            refused: self.state.refused.lock().expect("refusals").clone(),
            unresolved: self.state.unresolved.load(Ordering::Relaxed),
        })
    }
}

/// The writers' counters: [`KEYS_PER_GROUP`] on each group of the soak's
/// two. Keys picked without the ring (`k0`..`k63`) all landed on g0, so a
/// fault on g1 met no writer at all and a relay fault there could not fire.
fn writer_keys(topology: &str) -> Vec<String> {
    ["g0", "g1"]
        .iter()
        .flat_map(|g| crate::routing::keys_on(topology, NS, "k", g, KEYS_PER_GROUP))
        .collect()
}

/// One writer: batches of five random increments, each to one of the two
/// `targets` (name, URL), until told to stop. A batch is entered as sent
/// *before* it goes out (so a write whose answer is lost still bounds the
/// stored value) and as acknowledged only on 200. With `ids` (the writer's
/// id prefix) every event carries an id and a failed request is sent
/// again, same ids, until it is acknowledged (or [`RETRY_FOR`] passed).
async fn write_until_stopped(
    state: Arc<WriterState>,
    keys: Arc<[String]>,
    targets: [(String, String); 2],
    committed: bool,
    mut rng: Rng,
    ids: Option<String>,
) {
    let client = Client::new();
    let mut n = 0u64;
    while !state.stop.load(Ordering::Relaxed) {
        n += 1;
        let batch: Vec<Increment> = (0..5)
            .map(|_| Increment {
                key: keys[rng.usize(..keys.len())].clone(),
                delta: rng.i64(1..=3),
            })
            .collect();
        state.record_sent(&batch);
        let body: Vec<Value> = batch
            .iter()
            .enumerate()
            .map(|(i, inc)| match &ids {
                Some(prefix) => json!({ "ns": NS, "key": inc.key, "delta": inc.delta, "id": format!("{prefix}-r{n}-e{i}") }),
                None => json!({ "ns": NS, "key": inc.key, "delta": inc.delta }),
            })
            .collect();
        let first_try = Instant::now();
        loop {
            let to = rng.usize(..2);
            if send_once(&state, &client, &targets, to, committed, &batch, &body).await {
                break;
            }
            if ids.is_none() {
                break;
            }
            if first_try.elapsed() > RETRY_FOR {
                state.unresolved.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
}

/// One attempt of a writer request through proxy `to`: true when it was
/// acknowledged (and entered as such in the ledger).
async fn send_once(
    state: &WriterState,
    client: &Client,
    targets: &[(String, String); 2],
    to: usize,
    committed: bool,
    batch: &[Increment],
    body: &[Value],
) -> bool {
    let (proxy, url) = &targets[to];
    {
        state.requests.fetch_add(1, Ordering::Relaxed);
        match client.post_json(url, &json!(body)).await {
            Ok((200, _)) => {
                state.acked.fetch_add(1, Ordering::Relaxed);
                state.record_acked(batch, committed || to == 0);
                true
            }
            // Refused, failed or unknown: only `sent` counts it.
            answer => {
                let answer = match answer {
                    Ok((status, body)) => {
                        format!("{status} {}", body["error"]["code"].as_str().unwrap_or("?"))
                    }
                    Err(_) => "no answer".to_owned(),
                };
                state.record_refused(proxy, &answer);
                sleep(Duration::from_millis(20)).await;
                false
            }
        }
    }
}

/// The seeded fault order and the choice of the group each fault hits;
/// the same seed replays the same soak.
struct FaultPlan {
    order: Vec<FaultKind>,
    rng: Rng,
    turn: usize,
    /// Repeats of the current turn's kind after it did not fire.
    retries: u32,
}

impl FaultPlan {
    /// Every kind (kill -9 of the proxy only with the WAL, which is what
    /// makes it survivable), shuffled once, then taken round-robin.
    fn new(cfg: &ChaosConfig) -> FaultPlan {
        let mut order = FaultKind::ALL.to_vec();
        if cfg.wal {
            order.push(FaultKind::KillProxy);
        }
        let mut rng = Rng::with_seed(cfg.seed);
        rng.shuffle(&mut order);
        FaultPlan {
            order,
            rng,
            turn: 0,
            retries: 0,
        }
    }

    fn next_kind(&mut self) -> FaultKind {
        let kind = self.order[self.turn % self.order.len()];
        self.turn += 1;
        kind
    }

    /// The group `kind` hits this turn; `None` when it cannot be injected.
    fn target(&mut self, kind: FaultKind, promoted: &[Option<usize>; 2]) -> Option<Target> {
        // The proxy a stop or kill hits (drawn every turn, so the order of
        // draws does not depend on the kind).
        let proxy = self.rng.usize(..2);
        let group = self.group(kind, promoted)?;
        Some(Target { group, proxy })
    }

    fn group(&mut self, kind: FaultKind, promoted: &[Option<usize>; 2]) -> Option<usize> {
        // Only g1's master is ever promoted away (once), so g0 always
        // serves behind its relay and every relay-cut turn has a target.
        // A switchover goes there and back, so its group keeps its first
        // master.
        match kind {
            FaultKind::KillMasterAndPromote if promoted[1].is_some() => None,
            FaultKind::KillMasterAndPromote => Some(1),
            // Only a group's first master can be killed and started again
            // (the harness restarts a promoted replica as a replica).
            FaultKind::CutAfterCommit
            | FaultKind::BlackHoleCommit
            | FaultKind::StopWithDeadMaster
            | FaultKind::Switchover
                if promoted[1].is_some() =>
            {
                Some(0)
            }
            _ => Some(self.rng.usize(..2)),
        }
    }
}

/// Where a fault turn hits.
#[derive(Debug, Clone, Copy)]
struct Target {
    group: usize,
    /// The proxy (index) a stop or kill hits.
    proxy: usize,
}

impl Target {
    /// For the turn's log line.
    fn describe(self, kind: FaultKind) -> String {
        let (g, p) = (self.group, self.proxy + 1);
        match kind {
            FaultKind::RestartProxy | FaultKind::KillProxy => format!("proxy {p}"),
            FaultKind::StopWithDeadMaster => format!("g{g}, proxy {p}"),
            FaultKind::BlackHoleStore => "proxy 2".into(),
            FaultKind::Switchover | FaultKind::KillMasterAndPromote => {
                format!("g{g}, through proxy 1")
            }
            _ => format!("g{g}"),
        }
    }
}

/// The soak proper: one fault every `cfg.every` until `cfg.duration` has
/// passed, each tallied in `report`, and how the writers were served in
/// each pause between two faults.
async fn inject_faults(
    cfg: &ChaosConfig,
    sys: &mut System,
    writers: &Writers,
    report: &mut ChaosReport,
) -> Result<(), String> {
    let mut plan = FaultPlan::new(cfg);
    let started = Instant::now();
    let min_turns = cfg.min_rounds * plan.order.len();
    while started.elapsed() < cfg.duration || plan.turn < min_turns {
        // The pause: the last fault (if any) has recovered (a committed
        // write went through), so the writers must be served again.
        let before = writers.acked();
        sleep(cfg.every).await;
        let acked = writers.acked() - before;
        report.pauses += 1;
        if acked == 0 {
            report.unserved_pauses += 1;
        }
        report.fewest_acks_in_a_pause = Some(
            report
                .fewest_acks_in_a_pause
                .map_or(acked, |f| f.min(acked)),
        );
        let kind = plan.next_kind();
        let Some(at) = plan.target(kind, &sys.promoted) else {
            report.faults.entry(kind).or_default().skipped += 1;
            continue;
        };
        eprintln!(
            "tally-chaos: {:>5.1}s {} ({})",
            started.elapsed().as_secs_f64(),
            kind.name(),
            at.describe(kind)
        );
        let fired = fault_turn(kind, at, sys, &writers.state, report).await?;
        // A relay fault that found no statement to hit within its wait
        // comes up again next turn (at most twice more), so that every
        // kind is really injected `min_rounds` times.
        if !fired && plan.retries < 2 {
            plan.turn -= 1;
            plan.retries += 1;
        } else {
            plan.retries = 0;
        }
    }
    Ok(())
}

/// One turn: injects `kind` at `at`, then measures how long until
/// committed writes through each proxy succeed again (the recovery the
/// report asserts).
async fn fault_turn(
    kind: FaultKind,
    at: Target,
    sys: &mut System,
    writers: &WriterState,
    report: &mut ChaosReport,
) -> Result<bool, String> {
    let note = match inject(kind, at, sys, writers, &mut report.problems).await {
        Err(e) if e == NOT_FIRED => {
            report.faults.entry(kind).or_default().skipped += 1;
            return Ok(false);
        }
        other => other?,
    };
    let stats = report.faults.entry(kind).or_default();
    stats.injected += 1;
    if let Some(n) = note {
        stats.notes.push(n);
    }
    match recovered(&sys.client, &sys.proxies, &sys.topology).await {
        Ok(took) => {
            stats.recovered += 1;
            stats.worst_recovery = stats.worst_recovery.max(took);
        }
        Err(which) => stats.notes.push(format!(
            "no committed write through {which} succeeded within 60 s afterwards"
        )),
    }
    Ok(true)
}

/// Brings everything acknowledged into the store before it is read: the
/// relays pass again, each proxy flushes its buffer, and a WAL replay
/// still retrying (its group's master was down at the restart) finishes.
async fn settle(sys: &System) -> Result<(), String> {
    for r in sys.relays.iter().chain([&sys.store_relay]) {
        r.pass();
    }
    for proxy in &sys.proxies {
        // A flush fails when one of its attempts does: right after the
        // last fault (a cut or black-holed connection) one may, and its
        // retry commits; only a flush that keeps failing for a minute is
        // an error.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = sys
                .client
                .admin_post(&proxy.admin_url("/admin/v1/flush"), TOKEN)
                .await
                .map_err(|e| e.to_string())?;
            if status == 200 {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the final flush of {} answered {status}: {body}",
                    proxy.name
                ));
            }
            sleep(Duration::from_millis(500)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while proxy.unreplayed_lives() > 0 {
            if Instant::now() > deadline {
                return Err(format!(
                    "a WAL replay of {} did not finish within 60 s after the faults",
                    proxy.name
                ));
            }
            sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The verdict: reads every counter the writers touched through each proxy
/// (strong reads, so nothing pending is missed; both proxies must know the
/// current masters) and checks `acked ≤ stored ≤ sent`.
async fn verify_ledger(
    sys: &System,
    load: &LoadTotals,
    ids: bool,
    report: &mut ChaosReport,
) -> Result<(), String> {
    report.requests = load.requests;
    report.acked_requests = load.acked_requests;
    report.counters = load.ledger.len();
    report.exact = ids;
    report.unresolved = load.unresolved;
    let mut ledger = load.ledger.clone();
    for (key, entry) in &sys.turn_writes {
        let e = ledger.entry(key.clone()).or_default();
        e.acked += entry.acked;
        e.sent += entry.sent;
    }
    for (key, entry) in &ledger {
        for proxy in &sys.proxies {
            let (status, v) = sys
                .client
                .get(&proxy.url(&format!("/v1/counters/{NS}/{key}?consistency=strong")))
                .await
                .map_err(|e| e.to_string())?;
            let stored = v["total"].as_i64().ok_or_else(|| {
                format!(
                    "reading {key} through {} answered {status}: {v}",
                    proxy.name
                )
            })?;
            // With ids every writer request was retried until acknowledged:
            // the store holds exactly what was acknowledged. (The keys the
            // fault turns write themselves carry no ids: bounds only.)
            if ids && load.ledger.contains_key(key) && stored != entry.acked {
                let list = if stored < entry.acked {
                    &mut report.lost
                } else {
                    &mut report.doubled
                };
                list.push(format!(
                    "{key}: stored {stored} != acknowledged {} with ids (read through {})",
                    entry.acked, proxy.name
                ));
                continue;
            }
            if stored < entry.acked {
                report.lost.push(format!(
                    "{key}: stored {stored} < acknowledged {} (read through {})",
                    entry.acked, proxy.name
                ));
            }
            if stored > entry.sent {
                report.doubled.push(format!(
                    "{key}: stored {stored} > sent {} (read through {})",
                    entry.sent, proxy.name
                ));
            }
        }
    }
    Ok(())
}

/// Stops the proxies gracefully so that they leave nothing behind. The
/// verdict is in; a bad exit now is reported, not fatal.
async fn shut_down(sys: &mut System) {
    for proxy in &mut sys.proxies {
        if let Err(e) = proxy.stop().await {
            eprintln!("tally-chaos: stopping {} at the end: {e}", proxy.name);
        }
    }
}

/// The topology: each master through its relay, replicas direct.
fn topology_yaml(cluster: &Cluster, relays: &[FaultRelay]) -> String {
    let mut yaml = format!(
        "version: 1\nvnodes: 64\nadmin:\n  user: {}\ngroups:\n",
        tally_harness::ADMIN_USER
    );
    for (g, relay) in relays.iter().enumerate() {
        let group = cluster.group(g);
        yaml += &format!(
            "  - name: g{g}\n    master: mysql://{}@{}/{}\n    replicas:\n",
            tally_harness::DATA_USER,
            relay.addr(),
            cluster.database()
        );
        for r in &group.replicas {
            yaml += &format!("      - {}\n", r.dsn(cluster.database()));
        }
    }
    yaml
}

/// Injects one fault and undoes it where that is part of the fault.
/// What it finds broken besides (the other proxy not serving, a switchover
/// not planned or not followed) goes to `problems`.
async fn inject(
    kind: FaultKind,
    at: Target,
    sys: &mut System,
    writers: &WriterState,
    problems: &mut Vec<String>,
) -> Result<Option<String>, String> {
    let System {
        client,
        proxies,
        relays,
        store_relay,
        cluster,
        promoted,
        topology,
        turn_writes,
        ..
    } = sys;
    let (g, p) = (at.group, at.proxy);
    let group = cluster.group(g);
    // A replica that replicates: after a promotion, the one that was not
    // promoted (the promotion repointed it to the new master).
    let replica = group
        .replicas
        .iter()
        .enumerate()
        .find(|(i, _)| promoted[g] != Some(*i))
        .map(|(_, r)| r)
        .ok_or("no replica")?;
    match kind {
        FaultKind::KillReplica => {
            replica.kill9();
            sleep(Duration::from_secs(2)).await;
            replica.start().await.map_err(|e| e.to_string())?;
        }
        FaultKind::StopReplication => {
            replica
                .stop_replication()
                .await
                .map_err(|e| e.to_string())?;
            sleep(Duration::from_secs(2)).await;
            replica
                .start_replication()
                .await
                .map_err(|e| e.to_string())?;
        }
        FaultKind::CutAfterCommit => {
            let cuts = relays[g].stats().pattern_cuts;
            relays[g].cut_on_pattern_once(b"COMMIT".to_vec());
            let deadline = Instant::now() + Duration::from_secs(5);
            while relays[g].stats().pattern_cuts == cuts && Instant::now() < deadline {
                sleep(Duration::from_millis(50)).await;
            }
            relays[g].pass();
            if relays[g].stats().pattern_cuts == cuts {
                return Err(NOT_FIRED.into());
            }
        }
        FaultKind::BlackHoleCommit => {
            // The held COMMIT never reaches the server: its transaction
            // keeps the batch's dedup row locked until the flusher's
            // attempt times out and the retry kills that session.
            let holds = relays[g].stats().holds;
            relays[g].hold_on_pattern_once(b"COMMIT".to_vec());
            let deadline = Instant::now() + Duration::from_secs(5);
            while relays[g].stats().holds == holds && Instant::now() < deadline {
                sleep(Duration::from_millis(50)).await;
            }
            relays[g].pass();
            if relays[g].stats().holds == holds {
                return Err(NOT_FIRED.into());
            }
        }
        FaultKind::OverflowCounter => {
            let master = promoted[g].map_or(&group.master, |i| &group.replicas[i]);
            overflow_one_counter(client, &proxies[0], master, cluster.database(), topology, g)
                .await?;
        }
        FaultKind::StopWithDeadMaster => {
            let proxy = &mut proxies[p];
            let master = promoted[g].map_or(&group.master, |i| &group.replicas[i]);
            master.kill9();
            // Something of the group is pending for sure: a buffered write
            // acknowledged after the master died.
            let key = crate::routing::keys_on(topology, NS, "stop", &format!("g{g}"), 1)
                .pop()
                .ok_or("no key")?;
            let event = json!({ "ns": NS, "key": key, "delta": 1 });
            let entry = turn_writes.entry(key).or_default();
            entry.sent += 1;
            match client.post_json(&proxy.url("/v1/events"), &event).await {
                Ok((200, _)) => entry.acked += 1,
                other => {
                    return Err(format!(
                        "a buffered write through {} with a dead master was refused: {other:?}",
                        proxy.name
                    ));
                }
            }
            proxy.signal_stop();
            sleep(Duration::from_secs(2)).await;
            // The final flush waits for the dead master, and the admin
            // listener serves meanwhile (a promotion could rescue it).
            if !proxy.running() {
                return Err(format!(
                    "{} exited while a master was dead: acknowledged events of its group would be lost",
                    proxy.name
                ));
            }
            if !matches!(client.get(&proxy.admin_url("/metrics")).await, Ok((200, _))) {
                return Err(format!(
                    "the admin listener of {} did not answer during the final flush",
                    proxy.name
                ));
            }
            master.start().await.map_err(|e| e.to_string())?;
            proxy.wait_exit().await?;
            proxy.start(client).await?;
        }
        FaultKind::RestartProxy => {
            proxies[p].stop().await?;
            other_serves(client, proxies, p, topology, problems).await;
            proxies[p].start(client).await?;
        }
        FaultKind::KillProxy => {
            proxies[p].kill()?;
            other_serves(client, proxies, p, topology, problems).await;
            proxies[p].start(client).await?;
        }
        FaultKind::BlackHoleStore => {
            // Every chunk on proxy 2's store path is held, nothing closed:
            // its polls and heartbeats hang until their own timeouts.
            let answer = "503 store_unreachable";
            let before = writers.refused(&proxies[1].name, answer);
            store_relay.delay(Duration::from_secs(3600));
            sleep(STORE_BLACK_HOLE).await;
            store_relay.pass();
            // The held connections stay stuck; close them.
            store_relay.cut_all();
            let refused = writers.refused(&proxies[1].name, answer) - before;
            return Ok(Some(format!(
                "writes through proxy 2 answered {answer} during the black hole: {refused}"
            )));
        }
        FaultKind::Switchover => {
            // To a replica, then back to the first master (listed by its
            // relay's address), so the relay faults keep their target.
            let to_replica = replica.addr().to_string();
            let back = relays[g].addr().to_string();
            for (step, to) in [("to a replica", to_replica), ("back", back)] {
                let version = match switch_over(client, proxies, g, &to, problems).await {
                    Ok(version) => version,
                    Err(why) if step == "back" => {
                        return Err(format!(
                            "the switchover of g{g} back to its first master failed: {why}"
                        ));
                    }
                    // Master and replica are up: nothing excuses a refusal.
                    Err(why) => {
                        problems.push(format!("a planned switchover in g{g} was refused: {why}"));
                        return Ok(Some(format!("switchover refused: {why}")));
                    }
                };
                // Proxy 2 learns the new master from the store.
                if let Err(saw) = follows(client, &proxies[1], version).await {
                    problems.push(format!(
                        "proxy 2 did not follow the switchover of g{g} {step} (version \
                         {version}) within {FOLLOW_WITHIN:?}: it answers version {saw:?}"
                    ));
                }
                // Both proxies write to the new master for a while.
                sleep(Duration::from_secs(1)).await;
            }
        }
        FaultKind::KillMasterAndPromote => {
            group.master.kill9();
            sleep(Duration::from_millis(500)).await;
            let mut why = Vec::new();
            for (i, r) in group.replicas.iter().enumerate() {
                let body = json!({ "replica": r.addr().to_string() });
                let res = client
                    .raw()
                    .post(proxies[0].admin_url(&format!("/admin/v1/groups/g{g}/promote")))
                    .bearer_auth(TOKEN)
                    .json(&body)
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status().is_success() => {
                        promoted[g] = Some(i);
                        let version = r
                            .json::<Value>()
                            .await
                            .ok()
                            .and_then(|v| v["version"].as_u64())
                            .unwrap_or(0);
                        if let Err(saw) = follows(client, &proxies[1], version).await {
                            problems.push(format!(
                                "proxy 2 did not follow the promotion in g{g} (version {version}) \
                                 within {FOLLOW_WITHIN:?}: it answers version {saw:?}"
                            ));
                        }
                        return Ok(None);
                    }
                    Ok(r) => why.push(format!(
                        "{}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => why.push(e.to_string()),
                }
            }
            group.master.start().await.map_err(|e| e.to_string())?;
            return Ok(Some(format!(
                "promotion refused ({}); the master was restarted instead",
                why.join("; ")
            )));
        }
    }
    Ok(None)
}

/// While proxy `down` is stopped: a committed write to every group through
/// the other one must succeed within 10 s.
async fn other_serves(
    client: &Client,
    proxies: &[ProxyProc; 2],
    down: usize,
    topology: &str,
    problems: &mut Vec<String>,
) {
    let other = &proxies[1 - down];
    if committed_probe(client, other, topology, Duration::from_secs(10))
        .await
        .is_none()
    {
        problems.push(format!(
            "{} did not commit a write within 10 s while {} was down",
            other.name, proxies[down].name
        ));
    }
}

/// A planned promotion of `to` (`host:port`) in group `g` through proxy 1;
/// the new topology version, or why it was refused. An answer other than
/// `mode: planned` (the master is alive) goes to `problems`.
async fn switch_over(
    client: &Client,
    proxies: &[ProxyProc; 2],
    g: usize,
    to: &str,
    problems: &mut Vec<String>,
) -> Result<u64, String> {
    let res = client
        .raw()
        .post(proxies[0].admin_url(&format!("/admin/v1/groups/g{g}/promote")))
        .bearer_auth(TOKEN)
        .json(&json!({ "replica": to }))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = res.status();
    let text = res.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(format!("{status}: {text}"));
    }
    let body: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    if body["mode"] != "planned" {
        problems.push(format!(
            "a promotion in g{g} with its master alive answered {body} (not mode: planned)"
        ));
    }
    body["version"]
        .as_u64()
        .ok_or_else(|| format!("no version in {body}"))
}

/// Waits until `proxy` runs topology `version` or newer (from the store);
/// otherwise the version it answers last.
async fn follows(client: &Client, proxy: &ProxyProc, version: u64) -> Result<(), Option<u64>> {
    let deadline = Instant::now() + FOLLOW_WITHIN;
    loop {
        let seen = match client.get(&proxy.url("/readyz")).await {
            Ok((_, body)) => body["topology_version"].as_u64(),
            Err(_) => None,
        };
        if seen.is_some_and(|v| v >= version) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(seen);
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// How long until a committed write to every group through each proxy
/// succeeds again; `Err` names the first proxy that did not within 60 s.
async fn recovered(
    client: &Client,
    proxies: &[ProxyProc; 2],
    topology: &str,
) -> Result<Duration, String> {
    let started = Instant::now();
    for proxy in proxies {
        let left = Duration::from_secs(60).saturating_sub(started.elapsed());
        if committed_probe(client, proxy, topology, left)
            .await
            .is_none()
        {
            return Err(proxy.name.clone());
        }
    }
    Ok(started.elapsed())
}

/// Retries a committed write to every group through `proxy` for at most
/// `within`; how long it took.
async fn committed_probe(
    client: &Client,
    proxy: &ProxyProc,
    topology: &str,
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    // Eight keys on each group, chosen by the ring (keys that differ only
    // in their last byte tend to share an arc of it: `k0`..`k63` of one
    // namespace may all land on one group); a whole batch succeeds only if
    // both groups commit.
    let probe: Vec<Value> = ["g0", "g1"]
        .iter()
        .flat_map(|g| crate::routing::keys_on(topology, "chaos_probe", "probe", g, 8))
        .map(|key| json!({ "ns": "chaos_probe", "key": key, "delta": 1 }))
        .collect();
    while started.elapsed() < within {
        if let Ok((200, _)) = client
            .post_json(&proxy.url("/v1/events?ack=committed"), &json!(probe))
            .await
        {
            return Some(started.elapsed());
        }
        sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Sets a counter of group `g` (on its current `master`) to 2^63-6 and adds
/// 10 through the proxy with `ack=committed`: the flush must quarantine it
/// (the write is answered 200, the delta is held in the quarantine table)
/// instead of retrying the out-of-range upsert forever. The counter has a
/// namespace of its own, outside the ledger.
async fn overflow_one_counter(
    client: &Client,
    proxy: &ProxyProc,
    master: &tally_harness::Node,
    database: &str,
    topology: &str,
    g: usize,
) -> Result<(), String> {
    const NS_OVF: &str = "chaos_ovf";
    let held = || async {
        match client
            .admin_get(&proxy.admin_url("/admin/v1/quarantine"), TOKEN)
            .await
        {
            Ok((200, body)) => body["groups"].as_array().map(|gs| {
                gs.iter()
                    .filter_map(|g| g["held_rows"].as_u64())
                    .sum::<u64>()
            }),
            _ => None,
        }
    };
    let before = held().await.ok_or("the quarantine cannot be listed")?;
    let key = crate::routing::keys_on(
        topology,
        NS_OVF,
        &format!("ovf{before}"),
        &format!("g{g}"),
        1,
    )
    .pop()
    .ok_or("no key")?;
    let pos = tally_admin::ShardRing::position(&tally_admin::routing_key(NS_OVF, &key));
    master
        .exec(&format!(
            "INSERT INTO `{database}`.counter_total (ns, ckey, ring_pos, count) \
             VALUES ('{NS_OVF}', '{key}', {pos}, {}) ON DUPLICATE KEY UPDATE count = VALUES(count)",
            i64::MAX - 5
        ))
        .await
        .map_err(|e| e.to_string())?;
    let event = json!({ "ns": NS_OVF, "key": key, "delta": 10 });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client
            .post_json(&proxy.url("/v1/events?ack=committed"), &event)
            .await
        {
            Ok((200, _)) => break,
            _ if Instant::now() > deadline => {
                return Err(format!(
                    "the overflowing write to {key} was not committed within 60 s"
                ));
            }
            _ => sleep(Duration::from_millis(200)).await,
        }
    }
    match held().await {
        Some(after) if after > before => Ok(()),
        other => Err(format!(
            "the overflowing delta of {key} was not quarantined (held rows {before} → {other:?})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_write_to_both_groups_in_equal_parts() {
        let yaml = "version: 1\nvnodes: 64\ngroups:\n  - name: g0\n    master: mysql://u@127.0.0.1:1/t\n  - name: g1\n    master: mysql://u@127.0.0.1:2/t\n";
        let keys = writer_keys(yaml);
        let on_g1 = keys
            .iter()
            .filter(|k| crate::routing::owner(yaml, NS, k) == "g1")
            .count();
        assert_eq!(keys.len(), 2 * KEYS_PER_GROUP);
        assert_eq!(on_g1, KEYS_PER_GROUP, "{keys:?}");
        let distinct: std::collections::BTreeSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len());
    }
}
