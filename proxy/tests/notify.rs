//! `tally-proxy` under a service manager (systemd `Type=notify`): with
//! `NOTIFY_SOCKET` set it sends `READY=1` when `/readyz` turns 200, not
//! before, `STOPPING=1` when a SIGTERM starts the stop, and `WATCHDOG=1`
//! when `WATCHDOG_USEC` asks for it. The test plays the manager: a unix
//! datagram socket in a temporary directory.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tally_harness::{Cluster, ClusterSpec, FaultRelay};
use tokio::net::UnixDatagram;

mod common;

use common::{BIN, KillOnDrop, exit_status, free_port, sigterm};

/// The notifications received so far, one string per datagram.
struct Manager {
    socket: UnixDatagram,
    received: Vec<String>,
}

impl Manager {
    /// Waits up to `within` for a datagram; `None` when none came.
    async fn next(&mut self, within: Duration) -> Option<String> {
        let mut buf = vec![0u8; 4096];
        let len = tokio::time::timeout(within, self.socket.recv(&mut buf))
            .await
            .ok()?
            .expect("recv");
        let msg = String::from_utf8(buf[..len].to_vec()).expect("UTF-8 notification");
        self.received.push(msg.clone());
        Some(msg)
    }

    /// Waits up to `within` for a datagram that assigns `assignment`
    /// (`READY=1`), returning it.
    async fn wait_for(&mut self, assignment: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(msg) if msg.lines().any(|l| l == assignment) => return msg,
                Some(_) => {}
                None => panic!(
                    "no {assignment} within {within:?}; received: {:?}",
                    self.received
                ),
            }
        }
    }

    /// Whether any datagram so far assigned `assignment`.
    fn seen(&self, assignment: &str) -> bool {
        self.received
            .iter()
            .any(|m| m.lines().any(|l| l == assignment))
    }
}

async fn readyz(client: &reqwest::Client, http: u16) -> Option<u16> {
    let r = client
        .get(format!("http://127.0.0.1:{http}/readyz"))
        .send()
        .await
        .ok()?;
    Some(r.status().as_u16())
}

/// The proxy starts while its topology store cannot be reached, so it
/// serves HTTP but is not ready (`/readyz` 503): no `READY=1` is sent
/// meanwhile, only `STATUS=not ready: …` and watchdog pings. Once the
/// store path passes, `READY=1` arrives and `/readyz` answers 200 at that
/// moment. A SIGTERM sends `STOPPING=1`, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_when_readyz_turns_200_and_stopping_on_sigterm() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let master = &cluster.group(0).master;
    let relay = FaultRelay::start(master.addr()).await.expect("relay");
    relay.refuse();

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("topology.yaml"), cluster.topology_yaml(160))
        .expect("write topology");
    let (http, admin) = (free_port(), free_port());
    let cfg = dir.path().join("proxy.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen:\n  http: 127.0.0.1:{http}\n  admin: 127.0.0.1:{admin}\n\
             topology:\n  file: topology.yaml\n  store: mysql://root@{}/tally_meta\n\
             \x20 poll_interval: 200ms\n  heartbeat_interval: 200ms\n",
            relay.addr()
        ),
    )
    .expect("write proxy.yaml");

    let notify_path = dir.path().join("notify.sock");
    let mut manager = Manager {
        socket: UnixDatagram::bind(&notify_path).expect("bind the notify socket"),
        received: Vec::new(),
    };
    let mut child = KillOnDrop(
        Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .env("TALLY_ADMIN_TOKEN", "t")
            .env("NOTIFY_SOCKET", &notify_path)
            // A ping every 100 ms.
            .env("WATCHDOG_USEC", "200000")
            .env_remove("WATCHDOG_PID")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tally-proxy"),
    );
    let mut stderr = child.0.stderr.take().expect("stderr");
    let log_reader = std::thread::spawn(move || {
        let mut log = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut log);
        log
    });

    // Serving HTTP, but not ready while the store is unreachable.
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while readyz(&client, http).await.is_none() {
        assert!(
            child.0.try_wait().expect("try_wait").is_none(),
            "tally-proxy exited during startup"
        );
        assert!(Instant::now() < deadline, "tally-proxy never served HTTP");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let until = Instant::now() + Duration::from_millis(1500);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if manager.next(left).await.is_none() {
            break;
        }
    }
    assert_eq!(readyz(&client, http).await, Some(503));
    assert!(
        !manager.seen("READY=1"),
        "READY=1 before /readyz answers 200: {:?}",
        manager.received
    );
    assert!(manager.seen("WATCHDOG=1"), "{:?}", manager.received);
    assert!(
        manager
            .received
            .iter()
            .any(|m| m.contains("STATUS=not ready: waiting to read the topology store")),
        "{:?}",
        manager.received
    );

    // The store path passes: READY=1, and /readyz agrees at that moment.
    relay.pass();
    let ready = manager.wait_for("READY=1", Duration::from_secs(20)).await;
    assert!(
        ready.contains("STATUS=ready: topology version 1"),
        "{ready}"
    );
    assert_eq!(readyz(&client, http).await, Some(200));

    // SIGTERM: STOPPING=1 arrives while the process is still stopping,
    // then it exits 0; nothing says READY=1 again.
    sigterm(&child);
    let stopping = manager
        .wait_for("STOPPING=1", Duration::from_secs(20))
        .await;
    assert!(stopping.contains("STATUS=stopping"), "{stopping}");
    let status = exit_status(child).await;
    let log = log_reader.join().expect("log reader");
    assert_eq!(status.code(), Some(0), "{log}");
    while manager.next(Duration::from_millis(100)).await.is_some() {}
    let ready_count = manager
        .received
        .iter()
        .filter(|m| m.lines().any(|l| l == "READY=1"))
        .count();
    assert_eq!(ready_count, 1, "{:?}", manager.received);
    assert!(log.contains("notifying the service manager"), "{log}");
}

/// Without `NOTIFY_SOCKET` nothing is sent, and an unusable one (a
/// relative path) is logged, not fatal: the proxy starts and stops as
/// usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_notify_socket_is_logged_not_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Unreachable masters are fine: the proxy is ready without them.
    std::fs::write(
        dir.path().join("topology.yaml"),
        "groups:\n  - name: g0\n    master: mysql://root@127.0.0.1:1/tally\n",
    )
    .expect("write topology");
    let (http, admin) = (free_port(), free_port());
    let cfg = dir.path().join("proxy.yaml");
    std::fs::write(
        &cfg,
        format!("listen:\n  http: 127.0.0.1:{http}\n  admin: 127.0.0.1:{admin}\n"),
    )
    .expect("write proxy.yaml");
    let mut child = KillOnDrop(
        Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .env("TALLY_ADMIN_TOKEN", "t")
            .env("NOTIFY_SOCKET", "relative/notify.sock")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tally-proxy"),
    );
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while readyz(&client, http).await != Some(200) {
        assert!(
            child.0.try_wait().expect("try_wait").is_none(),
            "tally-proxy exited during startup"
        );
        assert!(Instant::now() < deadline, "tally-proxy not ready in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SAFETY: kill(2) on the pid of our own, still unreaped child.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    let mut stderr = child.0.stderr.take().expect("stderr");
    let out = tokio::task::spawn_blocking(move || {
        let mut log = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut log);
        let status = child.0.wait().expect("wait");
        (status, log)
    })
    .await
    .expect("join");
    let (status, log) = out;
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("NOTIFY_SOCKET unusable"), "{log}");
}

/// The shipped unit waits for this readiness protocol, runs the command
/// the docs name, does not restart after an invalid configuration (exit
/// 2, see `process.rs`), and passes `systemd-analyze verify` (when
/// installed; Debian package `systemd`) with its `ExecStart` pointed at
/// the binary built here.
#[test]
fn the_shipped_unit_waits_for_ready_and_verifies() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ops/systemd/tally-proxy.service"
    );
    let unit = std::fs::read_to_string(path).expect("read the unit");
    let settings: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    for want in [
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=/usr/local/bin/tally-proxy --config /etc/tally/proxy.yaml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "StateDirectory=tally",
        "UMask=0077",
        "EnvironmentFile=-/etc/tally/env",
    ] {
        assert!(settings.contains(&want), "{want} missing from {path}");
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not installed: `verify` skipped");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("tally-proxy.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/tally-proxy", BIN)).expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {out:?}"
    );
}
