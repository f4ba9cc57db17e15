//! What the benchmark talks to: its own MariaDB cluster (harness) with the
//! proxy in a child process, or an already running proxy.
//!
//! The proxy child is this same executable re-run as `tally-bench __proxy
//! <proxy.yaml>`: it calls `tally_proxy::run` exactly like the production
//! binary, binds port 0, prints `ready http=.. admin=..` and stops
//! gracefully (flushing) when its stdin closes, so it never outlives the
//! benchmark. A separate process keeps the proxy's CPU time and RSS apart
//! from the load generator's. The bare hyper baseline runs the same way
//! (`__bare`).
//!
//! An older build of the proxy (`--before-proxy`, a `tally-proxy`
//! executable built from an earlier commit) runs as that executable with
//! the same `proxy.yaml` plus a `listen:` section of two free ports; it
//! stops on SIGTERM (flushing) like in production, and gets a parent-death
//! signal so it never outlives the benchmark either.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use tally_harness::{Cluster, ClusterSpec};
use tally_proxy::{Listeners, ProxyConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdin, Command};

/// A proxy to benchmark.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub http: SocketAddr,
    pub admin_url: String,
    pub token: String,
}

impl Endpoint {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }
}

/// Buffer settings for a proxy child.
#[derive(Clone, Debug)]
pub struct BufferSettings {
    pub flush_interval: String,
    pub flush_rows: usize,
    pub max_pending_rows: usize,
}

impl Default for BufferSettings {
    /// The documented production defaults (config/proxy.yaml).
    fn default() -> Self {
        BufferSettings {
            flush_interval: "1s".into(),
            flush_rows: 200_000,
            max_pending_rows: 2_000_000,
        }
    }
}

/// How a child is asked to stop gracefully.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopBy {
    /// Close its stdin (this executable's `__proxy` / `__bare`).
    StdinClose,
    /// SIGTERM (an external `tally-proxy`).
    Sigterm,
}

/// A child process (proxy or bare server).
pub struct ChildProc {
    child: Child,
    stdin: Option<ChildStdin>,
    stop_by: StopBy,
    pub pid: u32,
    pub http: SocketAddr,
    pub admin: Option<SocketAddr>,
    _dir: Option<tempfile::TempDir>,
}

impl ChildProc {
    /// Starts a proxy child over `topology_yaml`.
    pub async fn proxy(
        topology_yaml: &str,
        buffer: &BufferSettings,
        token: &str,
    ) -> Result<ChildProc, String> {
        Self::proxy_with(topology_yaml, buffer, token, "").await
    }

    /// [`ChildProc::proxy`] with more `proxy.yaml` sections appended.
    pub async fn proxy_with(
        topology_yaml: &str,
        buffer: &BufferSettings,
        token: &str,
        extra_yaml: &str,
    ) -> Result<ChildProc, String> {
        let (dir, config) = write_config(topology_yaml, buffer, extra_yaml)?;
        let mut p = Self::spawn(&["__proxy", &config.to_string_lossy()], token).await?;
        p._dir = Some(dir);
        Ok(p)
    }

    /// Starts `exe` (a `tally-proxy` of another build) as
    /// `exe --config proxy.yaml` with the config [`ChildProc::proxy_with`]
    /// gives this executable's child, plus `listen:` on two free ports
    /// (the production binary binds what its config says). Returns once
    /// `GET /readyz` answers 200; fails if the process exits first.
    pub async fn external_proxy(
        exe: &Path,
        topology_yaml: &str,
        buffer: &BufferSettings,
        token: &str,
        extra_yaml: &str,
    ) -> Result<ChildProc, String> {
        let (http, admin) = (free_addr()?, free_addr()?);
        let listen = format!("listen:\n  http: {http}\n  admin: {admin}\n");
        let (dir, config) = write_config(topology_yaml, buffer, &(listen + extra_yaml))?;
        let mut cmd = Command::new(exe);
        cmd.arg("--config")
            .arg(&config)
            .env("TALLY_ADMIN_TOKEN", token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // Warnings only, like this executable's child (the production
        // default is info: a line per flush).
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl(2), which is async-signal-safe; it allocates nothing.
        // The signal comes when the forking thread ends: the benchmark's
        // scenarios run on the main thread (`block_on`), which ends with
        // the process.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", exe.display()))?;
        let pid = child.id().unwrap_or(0);
        let ep = Endpoint {
            http,
            admin_url: format!("http://{admin}"),
            token: token.to_owned(),
        };
        // Exit first: if another process held a port, our child failed to
        // bind and the server answering is not ours.
        wait_ready_while(&ep, Duration::from_secs(60), || match child.try_wait() {
            Ok(Some(status)) => Err(format!("exited with {status} before it was ready")),
            _ => Ok(()),
        })
        .await
        .map_err(|e| format!("{}: {e}", exe.display()))?;
        Ok(ChildProc {
            child,
            stdin: None,
            stop_by: StopBy::Sigterm,
            pid,
            http,
            admin: Some(admin),
            _dir: Some(dir),
        })
    }

    /// Starts the bare hyper server child.
    pub async fn bare() -> Result<ChildProc, String> {
        Self::spawn(&["__bare"], "").await
    }

    async fn spawn(args: &[&str], token: &str) -> Result<ChildProc, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args(args)
            .env("TALLY_ADMIN_TOKEN", token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawn child: {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .map_err(|_| "child not ready within 60 s".to_string())?
            .map_err(|e| e.to_string())?
            .ok_or("child exited before it was ready")?;
        let field = |name: &str| -> Option<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|a| a.parse().ok())
        };
        let http = field("http=").ok_or_else(|| format!("bad ready line {line:?}"))?;
        let admin = field("admin=");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let pid = child.id().unwrap_or(0);
        Ok(ChildProc {
            child,
            stdin,
            stop_by: StopBy::StdinClose,
            pid,
            http,
            admin,
            _dir: None,
        })
    }

    pub fn endpoint(&self, token: &str) -> Endpoint {
        Endpoint {
            http: self.http,
            admin_url: format!("http://{}", self.admin.unwrap_or(self.http)),
            token: token.to_owned(),
        }
    }

    /// Graceful stop: the proxy flushes everything pending, then exits.
    pub async fn stop(mut self, within: Duration) {
        match self.stop_by {
            StopBy::StdinClose => drop(self.stdin.take()),
            StopBy::Sigterm => {
                if let Some(pid) = self.child.id() {
                    // SAFETY: kill(2) on the pid of our own, still unreaped child.
                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                }
            }
        }
        if tokio::time::timeout(within, self.child.wait())
            .await
            .is_err()
        {
            eprintln!(
                "child {} did not stop within {within:?}; killing it",
                self.pid
            );
            let _ = self.child.kill().await;
        }
    }

    /// Kill -9: buffered events are discarded (memory runs only).
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// Resident set size in bytes (`VmRSS`).
    pub fn rss(&self) -> Option<u64> {
        rss_of(self.pid)
    }

    /// User + system CPU seconds used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds_of(self.pid)
    }
}

/// Writes `topology.yaml` and `proxy.yaml` (the buffer settings, then
/// `extra_yaml`) into a fresh directory; returns it and the config's path.
fn write_config(
    topology_yaml: &str,
    buffer: &BufferSettings,
    extra_yaml: &str,
) -> Result<(tempfile::TempDir, PathBuf), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    std::fs::write(dir.path().join("topology.yaml"), topology_yaml).map_err(|e| e.to_string())?;
    let yaml = format!(
        "topology:\n  file: topology.yaml\n  watch_interval: 1h\nbuffer:\n  flush_interval: {}\n  flush_rows: {}\n  max_pending_rows: {}\n",
        buffer.flush_interval, buffer.flush_rows, buffer.max_pending_rows
    ) + extra_yaml;
    let config = dir.path().join("proxy.yaml");
    std::fs::write(&config, yaml).map_err(|e| e.to_string())?;
    Ok((dir, config))
}

/// A loopback address with a port free right now (the external proxy
/// binds it a moment later; if something takes it first, that proxy exits
/// and [`ChildProc::external_proxy`] says so).
fn free_addr() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("free port: {e}"))
}

pub fn rss_of(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn cpu_seconds_of(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The benchmark's own cluster: `groups` groups of a master and
/// `replicas` replicas, durable settings.
pub async fn start_cluster(groups: usize, replicas: usize) -> Result<Cluster, String> {
    Cluster::start(ClusterSpec {
        groups,
        replicas,
        buffer_pool: "256M".into(),
        extra_args: durable_args(),
        ..ClusterSpec::default()
    })
    .await
    .map_err(|e| format!("start cluster: {e}"))
}

/// The MariaDB settings of every benchmark server: every commit is durable
/// (redo log written and fsynced at commit), and the redo log is large
/// enough not to force checkpoints every few seconds under load.
/// `TALLY_BENCH_MARIADB_ARGS` (whitespace-separated) adds settings to every
/// server, for comparing MariaDB settings with the same command.
pub fn durable_args() -> Vec<String> {
    let mut args = vec![
        "--innodb-flush-log-at-trx-commit=1".to_owned(),
        "--innodb-log-file-size=256M".to_owned(),
    ];
    if let Ok(extra) = std::env::var("TALLY_BENCH_MARIADB_ARGS") {
        args.extend(extra.split_whitespace().map(str::to_owned));
    }
    args
}

/// `tally-bench __proxy <proxy.yaml>` / `tally-bench __bare`: the child
/// process side. Returns `None` when `args` is not a child invocation.
pub fn child_main(args: &[String]) -> Option<ExitCode> {
    let mode = args.get(1)?.as_str();
    if mode != "__proxy" && mode != "__bare" {
        return None;
    }
    // As `tally-proxy` does at start (its `no_transparent_huge_pages`),
    // and for the bare baseline alike.
    // SAFETY: prctl(2) with integer arguments only.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    Some(rt.block_on(async {
        let stdin_closed = async {
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 64];
            while let Ok(n) = stdin.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        match mode {
            "__bare" => {
                let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                println!("ready http={}", l.local_addr().expect("addr"));
                tokio::select! {
                    _ = super::http::serve_bare(l) => {}
                    _ = stdin_closed => {}
                }
                ExitCode::SUCCESS
            }
            _ => {
                let Some(path) = args.get(2) else {
                    eprintln!("__proxy needs a config path");
                    return ExitCode::from(2);
                };
                run_proxy_child(Path::new(path), stdin_closed).await
            }
        }
    }))
}

async fn run_proxy_child(
    path: &Path,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> ExitCode {
    // Warnings only: the proxy logs every flush at debug level.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let config = match ProxyConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("proxy child: {e}");
            return ExitCode::from(2);
        }
    };
    let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    println!(
        "ready http={} admin={}",
        http.local_addr().expect("addr"),
        admin.local_addr().expect("addr")
    );
    match tally_proxy::run(config, Listeners { http, admin }, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy child: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Waits until `GET /readyz` answers 200.
pub async fn wait_ready(ep: &Endpoint, within: Duration) -> Result<(), String> {
    wait_ready_while(ep, within, || Ok(())).await
}

/// [`wait_ready`], giving up as soon as `alive` says the server is gone.
async fn wait_ready_while(
    ep: &Endpoint,
    within: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + within;
    loop {
        alive()?;
        if let Ok(r) = client.get(ep.url("/readyz")).send().await
            && r.status().as_u16() == 200
        {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("{} not ready within {within:?}", ep.http));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
