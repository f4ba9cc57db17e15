//! Three `tally-proxy` processes share a topology store; clients spread
//! `ack=committed` writes over them and retry on another proxy when one
//! fails; one proxy is killed with SIGKILL. Every acknowledged increment is
//! stored, and nothing beyond what was sent.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tally_harness::{Cluster, ClusterSpec};
use tally_integration::{Client, KillOnDrop, free_port, stored};

struct Proc {
    child: KillOnDrop,
    http: u16,
    admin: u16,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_killed_proxy() {
    let bin =
        tokio::task::spawn_blocking(|| tally_integration::cargo_bin("tally-proxy", "tally-proxy"))
            .await
            .expect("build");
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut topology: serde_json::Value =
        serde_yaml_ng::from_str(&cluster.topology_yaml(160)).expect("yaml");
    topology["groups"]
        .as_array_mut()
        .expect("groups")
        .truncate(1);
    let store = cluster.group(1).master.root_dsn("tally_meta");
    let client = Client::new();
    let mut procs = Vec::new();
    for i in 0..3 {
        let sub = dir.path().join(format!("p{i}"));
        std::fs::create_dir(&sub).expect("mkdir");
        std::fs::write(
            sub.join("topology.yaml"),
            serde_yaml_ng::to_string(&topology).expect("yaml"),
        )
        .expect("write");
        let (http, admin) = (free_port(), free_port());
        std::fs::write(
            sub.join("proxy.yaml"),
            format!(
                "listen: {{ http: 127.0.0.1:{http}, admin: 127.0.0.1:{admin} }}\n\
                 topology: {{ file: topology.yaml, store: '{store}', poll_interval: 200ms }}\n\
                 buffer: {{ flush_interval: 100ms }}\n"
            ),
        )
        .expect("write config");
        let child = KillOnDrop(
            Command::new(&bin)
                .arg("--config")
                .arg(sub.join("proxy.yaml"))
                .env("TALLY_ADMIN_TOKEN", "t")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn proxy"),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(
            client.get(&format!("http://127.0.0.1:{http}/readyz")).await,
            Ok((200, _))
        ) {
            assert!(Instant::now() < deadline, "proxy {i} not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        procs.push(Proc { child, http, admin });
    }
    let ports: Vec<u16> = procs.iter().map(|p| p.http).collect();

    // Per key: (acknowledged, sent).
    let ledger: Arc<Mutex<HashMap<String, (i64, i64)>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let (ledger, done, client, ports) =
                (ledger.clone(), done.clone(), client.clone(), ports.clone());
            tokio::spawn(async move {
                let (mut acked, mut retried) = (0u64, 0u64);
                let mut target = w % ports.len();
                let mut i = 0;
                while !done.load(Ordering::Relaxed) {
                    i += 1;
                    let key = format!("w{w}-{}", i % 4);
                    ledger
                        .lock()
                        .expect("ledger")
                        .entry(key.clone())
                        .or_default()
                        .1 += 1;
                    let url = format!("http://127.0.0.1:{}/v1/events?ack=committed", ports[target]);
                    match client
                        .post_json(&url, &json!({ "ns": "kill", "key": key }))
                        .await
                    {
                        Ok((200, _)) => {
                            acked += 1;
                            ledger.lock().expect("ledger").entry(key).or_default().0 += 1;
                        }
                        _ => {
                            // Unknown outcome: try the next proxy.
                            retried += 1;
                            target = (target + 1) % ports.len();
                        }
                    }
                }
                (acked, retried)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // SAFETY: kill(2) on the pid of our own, still unreaped child.
    unsafe { libc::kill(procs[0].child.id() as i32, libc::SIGKILL) };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    done.store(true, Ordering::Relaxed);
    let (mut acked, mut retried) = (0, 0);
    for w in writers {
        let (a, r) = w.await.expect("writer");
        acked += a;
        retried += r;
    }
    println!("{acked} acknowledged, {retried} retried on another proxy");
    assert!(acked > 100, "load ran");
    assert!(retried >= 1, "the killed proxy made clients retry");

    let master = &cluster.group(0).master;
    let totals: HashMap<String, i64> = stored::rows(master, "counter_total", "kill")
        .await
        .into_iter()
        .map(|((k, _), (c, _))| (String::from_utf8_lossy(&k).into_owned(), c))
        .collect();
    for (key, (acked, sent)) in ledger.lock().expect("ledger").iter() {
        let got = totals.get(key).copied().unwrap_or(0);
        assert!(got >= *acked, "{key}: {got} stored < {acked} acknowledged");
        assert!(got <= *sent, "{key}: {got} stored > {sent} sent");
    }
    let (status, body) = client
        .admin_get(
            &format!("http://127.0.0.1:{}/admin/v1/proxies", procs[1].admin),
            "t",
        )
        .await
        .expect("proxies");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["proxies"].as_array().map(Vec::len), Some(3), "{body}");
    // The killed proxy stops heartbeating and is shown as gone.
    let killed_admin = format!("127.0.0.1:{}", procs[0].admin);
    tally_integration::eventually(
        Duration::from_secs(15),
        "the killed proxy shows as gone",
        || async {
            let (_, body) = client
                .admin_get(
                    &format!("http://127.0.0.1:{}/admin/v1/proxies", procs[1].admin),
                    "t",
                )
                .await
                .ok()?;
            let list = body["proxies"].as_array()?;
            let killed = list.iter().find(|p| p["admin"] == killed_admin.as_str())?;
            let others_alive = list.iter().filter(|p| p["alive"] == true).count() == 2;
            (killed["alive"] == false && others_alive).then_some(())
        },
    )
    .await;
    for mut p in procs {
        // SAFETY: kill(2) on the pid of our own child (already dead is fine).
        unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
        let _ = p.child.wait();
    }
}
