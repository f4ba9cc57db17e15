//! The `tally-proxy` binary as an operator runs it: config errors, startup
//! against real MariaDB, readiness, and a SIGTERM that flushes and exits 0.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tally_harness::mysql_async::prelude::Queryable;
use tally_harness::{Cluster, ClusterSpec};

mod common;

use common::{BIN, KillOnDrop, exit_status, free_port, sigterm};

fn write_config(dir: &Path, http: u16, admin: u16, extra: &str) -> std::path::PathBuf {
    let path = dir.join("proxy.yaml");
    std::fs::write(
        &path,
        format!("listen:\n  http: 127.0.0.1:{http}\n  admin: 127.0.0.1:{admin}\ntopology:\n  file: topology.yaml\n{extra}"),
    )
    .expect("write proxy.yaml");
    path
}

async fn wait_ready(client: &reqwest::Client, http: u16, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{http}/readyz"))
            .send()
            .await
            && r.status() == 200
        {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("tally-proxy exited during startup: {status}");
        }
        assert!(Instant::now() < deadline, "tally-proxy not ready in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts `tally-proxy --config cfg [extra]` with `token` as the admin
/// token, waits until `/readyz` answers, and reads its stderr on the side
/// (joined when the process ends), so the child stays owned by the guard.
async fn start_proxy(
    client: &reqwest::Client,
    cfg: &Path,
    http: u16,
    token: &str,
    extra: &[&str],
) -> (KillOnDrop, std::thread::JoinHandle<String>) {
    let mut child = KillOnDrop(
        Command::new(BIN)
            .arg("--config")
            .arg(cfg)
            .args(extra)
            .env("TALLY_ADMIN_TOKEN", token)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tally-proxy"),
    );
    wait_ready(client, http, &mut child.0).await;
    let mut stderr = child.0.stderr.take().expect("stderr");
    let log_reader = std::thread::spawn(move || {
        let mut log = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut log);
        log
    });
    (child, log_reader)
}

#[test]
fn invalid_config_lists_every_problem_and_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("proxy.yaml");
    std::fs::write(
        &path,
        "listen:\n  http: nowhere\nbuffer:\n  flush_interval: soon\n  colour: red\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run tally-proxy");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("3 problems"), "{err}");
    for needle in [
        "listen.http",
        "buffer.flush_interval",
        "buffer.colour: unknown key",
    ] {
        assert!(err.contains(needle), "missing {needle}: {err}");
    }
}

#[test]
fn missing_topology_file_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), free_port(), free_port(), "");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run tally-proxy");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read topology file") && err.contains("topology.yaml"),
        "{err}"
    );
}

#[test]
fn non_loopback_admin_without_token_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("proxy.yaml");
    std::fs::write(
        &path,
        format!(
            "listen:\n  http: 127.0.0.1:{}\n  admin: 0.0.0.0:{}\n",
            free_port(),
            free_port()
        ),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("topology.yaml"),
        "groups:\n  - name: g0\n    master: mysql://root@127.0.0.1:1/tally\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .env_remove("TALLY_ADMIN_TOKEN")
        .output()
        .expect("run tally-proxy");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no admin token"),
        "{out:?}"
    );
}

/// Starts against a real group, answers /readyz and /metrics, accepts
/// buffered events that cannot have been flushed yet (1 h interval), and on
/// SIGTERM flushes them before exiting 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_serves_and_flushes_on_sigterm() {
    let cluster = Cluster::start(ClusterSpec::default())
        .await
        .expect("cluster");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("topology.yaml"), cluster.topology_yaml(160))
        .expect("write topology");
    let (http, admin) = (free_port(), free_port());
    let cfg = write_config(dir.path(), http, admin, "buffer:\n  flush_interval: 1h\n");
    let client = reqwest::Client::new();
    let (child, log_reader) = start_proxy(&client, &cfg, http, "s3cret", &[]).await;

    let metrics = client
        .get(format!("http://127.0.0.1:{admin}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    for series in [
        "tally_build_info{",
        "tally_topology_version 1",
        "tally_uptime_seconds ",
        "tally_ready 1",
    ] {
        assert!(metrics.contains(series), "missing {series} in:\n{metrics}");
    }
    let r = client
        .post(format!("http://127.0.0.1:{http}/v1/events"))
        .header("content-type", "application/json")
        .body(r#"[{"ns":"views","key":"sigterm","delta":40},{"ns":"views","key":"sigterm","delta":2}]"#)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);

    // Nothing is flushed yet with a one-hour interval.
    let master = &cluster.group(0).master;
    let count_rows = || async {
        let mut conn = master.connect().await.expect("connect");
        let v: Option<i64> = conn
            .query_first(
                "SELECT count FROM tally.counter_total WHERE ns = 'views' AND ckey = 'sigterm'",
            )
            .await
            .expect("query");
        v
    };
    assert_eq!(count_rows().await, None);

    sigterm(&child);
    let status = exit_status(child).await;
    let log = log_reader.join().expect("log reader");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("stopped cleanly"), "{log}");
    assert_eq!(
        count_rows().await,
        Some(42),
        "SIGTERM must flush buffered events"
    );
}

/// Two separate proxy processes with the same topology route 100k keys
/// identically (and as the ring computed here does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_route_100k_keys_identically() {
    use tally_admin::{ShardRing, TopologyDoc, routing_key};

    let dir = tempfile::tempdir().expect("tempdir");
    // Unreachable masters are fine: routing needs no database.
    let topology = "version: 7\nvnodes: 160\ngroups:\n\
        \x20 - { name: g0, weight: 1, master: 'mysql://root@127.0.0.1:1/tally' }\n\
        \x20 - { name: g1, weight: 2, master: 'mysql://root@127.0.0.1:2/tally' }\n\
        \x20 - { name: g2, weight: 1, master: 'mysql://root@127.0.0.1:3/tally' }\n";
    std::fs::write(dir.path().join("topology.yaml"), topology).expect("write topology");
    let ring = ShardRing::new(&TopologyDoc::parse_and_validate(topology).expect("valid"));
    let client = reqwest::Client::new();
    let mut children = Vec::new();
    let mut admins = Vec::new();
    for i in 0..2 {
        let sub = dir.path().join(format!("p{i}"));
        std::fs::create_dir(&sub).expect("mkdir");
        std::fs::copy(dir.path().join("topology.yaml"), sub.join("topology.yaml")).expect("copy");
        let (http, admin) = (free_port(), free_port());
        let cfg = write_config(&sub, http, admin, "");
        let (child, _log) = start_proxy(&client, &cfg, http, "t", &[]).await;
        children.push(child);
        admins.push(admin);
    }
    let keys: Vec<String> = (0..100_000).map(|i| format!("key-{i}-é")).collect();
    let want: Vec<&str> = keys
        .iter()
        .map(|k| ring.owner_name(&routing_key("views", k)).expect("owner"))
        .collect();
    // All 100k through the batch form, 1,000 per request...
    for admin in &admins {
        for (chunk, want) in keys.chunks(1000).zip(want.chunks(1000)) {
            let body: serde_json::Value = client
                .post(format!("http://127.0.0.1:{admin}/admin/v1/route"))
                .bearer_auth("t")
                .json(&serde_json::json!({ "ns": "views", "keys": chunk }))
                .send()
                .await
                .expect("route")
                .json()
                .await
                .expect("json");
            assert_eq!(body["version"], 7);
            assert_eq!(
                body["groups"],
                serde_json::json!(want),
                "proxy on admin port {admin}"
            );
        }
    }
    // ...and a sample through the single-key GET, with awkward keys.
    let sample = ["a b/c?d&e=f", "日本語", "'; DROP TABLE x; --", "key-42-é"];
    for key in sample {
        let want = ring.owner_name(&routing_key("views", key)).expect("owner");
        for admin in &admins {
            let body: serde_json::Value = client
                .get(format!("http://127.0.0.1:{admin}/admin/v1/route"))
                .query(&[("ns", "views"), ("key", key)])
                .bearer_auth("t")
                .send()
                .await
                .expect("route")
                .json()
                .await
                .expect("json");
            assert_eq!(
                body,
                serde_json::json!({ "group": want, "version": 7 }),
                "{key}"
            );
        }
    }
    for mut child in children {
        // SAFETY: kill(2) on the pid of our own, still unreaped child.
        unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
        assert_eq!(child.0.wait().expect("wait").code(), Some(0));
    }
}

/// `--log-format json`: every line is a JSON object; flushes and topology
/// changes are logged with their numbers; a DSN password never appears,
/// not even when a change makes a server unreachable; requests carry an id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_never_show_a_password() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let master = &cluster.group(0).master;
    master
        .exec("CREATE USER 'app'@'127.0.0.1' IDENTIFIED BY 'hunter2-secret'; GRANT ALL ON *.* TO 'app'@'127.0.0.1'")
        .await
        .expect("create user");
    let dir = tempfile::tempdir().expect("tempdir");
    let topology = format!(
        "version: 1\ngroups:\n  - name: g0\n    master: mysql://app:hunter2-secret@{}/tally\n",
        master.addr()
    );
    std::fs::write(dir.path().join("topology.yaml"), &topology).expect("write topology");
    let (http, admin) = (free_port(), free_port());
    let cfg = write_config(
        dir.path(),
        http,
        admin,
        "buffer:\n  flush_interval: 100ms\n",
    );
    let client = reqwest::Client::new();
    let (mut child, log_reader) =
        start_proxy(&client, &cfg, http, "t", &["--log-format", "json"]).await;

    let r = client
        .post(format!("http://127.0.0.1:{http}/v1/events?ack=committed"))
        .header("x-request-id", "req-42")
        .json(&serde_json::json!({ "ns": "logs", "key": "k" }))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "req-42", "the id is echoed");
    let r = client
        .get(format!("http://127.0.0.1:{http}/v1/counters/logs/k"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.headers()["x-request-id"].len(), 16, "an id is generated");

    // A password change to a wrong password: the server now refuses the
    // proxy, which logs errors about it.
    let doc = serde_json::json!({
        "groups": [{ "name": "g0", "master": format!("mysql://app:s3cond-secret@{}/tally", master.addr()) }],
    });
    let r = client
        .put(format!("http://127.0.0.1:{admin}/admin/v1/topology"))
        .bearer_auth("t")
        .header("if-match", "\"1\"")
        .json(&doc)
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 200);
    client
        .post(format!("http://127.0.0.1:{http}/v1/events"))
        .json(&serde_json::json!({ "ns": "logs", "key": "k" }))
        .send()
        .await
        .expect("post");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The file the proxy persisted keeps the real password (it must), the
    // logs never do.
    let persisted = std::fs::read_to_string(dir.path().join("topology.yaml")).expect("read");
    assert!(persisted.contains("s3cond-secret"));

    // SAFETY: kill(2) on the pid of our own, still unreaped child. A second
    // signal ends the stop that waits for the unreachable group.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    tokio::time::sleep(Duration::from_millis(500)).await;
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let _ = tokio::task::spawn_blocking(move || child.0.wait()).await;
    let log = log_reader.join().expect("log reader");
    let mut lines = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["fields"].is_object() || v["message"].is_string(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines > 5, "{log}");
    for secret in ["hunter2-secret", "s3cond-secret"] {
        assert!(!log.contains(secret), "a password reached the log:\n{log}");
    }
    assert!(
        log.contains("flushed batch") && log.contains("\"rows\""),
        "{log}"
    );
    assert!(log.contains("topology applied"), "{log}");
    assert!(
        log.contains("flush failed"),
        "the wrong password was noticed: {log}"
    );
}
