//! `tallyctl` end to end against a real proxy and real MariaDB, including
//! its error paths and exit codes (0 ok, 1 refused, 2 local input, 3
//! unreachable).

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::{Value, json};
use tally_harness::{Cluster, ClusterSpec};
use tally_integration::{Client, TEST_TOKEN, TestProxy};

fn tallyctl() -> PathBuf {
    tally_integration::cargo_bin("tally-admin", "tallyctl")
}

fn run(bin: &PathBuf, url: &str, token: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env("TALLY_ADMIN_URL", url)
        .env("TALLY_ADMIN_TOKEN", token)
        .output()
        .expect("run tallyctl")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tallyctl_drives_a_real_proxy() {
    let bin = tokio::task::spawn_blocking(tallyctl).await.expect("build");
    let cluster = Cluster::start(ClusterSpec {
        groups: 2,
        replicas: 1,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let proxy = TestProxy::start(&cluster, |_| {}).await;
    let url = format!("http://{}", proxy.admin);
    let ctl = |args: &[&str]| run(&bin, &url, TEST_TOKEN, args);

    let o = ctl(&["topology", "show"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("topology version 1") && text(&o).contains("g1"),
        "{}",
        text(&o)
    );

    let o = ctl(&["--json", "route", "views", "a key/with?odd&chars"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let route: Value = serde_json::from_slice(&o.stdout).expect("json");
    let want = tally_integration::routing::owner(
        &cluster.topology_yaml(160),
        "views",
        "a key/with?odd&chars",
    );
    assert_eq!(route, json!({ "group": want, "version": 1 }));

    let o = ctl(&["health"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("all 4 nodes up"), "{}", text(&o));

    let client = Client::new();
    client
        .post_json(
            &proxy.url("/v1/events"),
            &json!({ "ns": "ctl", "key": "k", "delta": 3 }),
        )
        .await
        .expect("write");
    let o = ctl(&["flush"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("flushed"), "{}", text(&o));

    // Apply: drop g0's replica. The diff is shown, the version bumps.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut doc: Value = serde_yaml_ng::from_str(&cluster.topology_yaml(160)).expect("yaml");
    doc["groups"][0]["replicas"] = json!([]);
    let file = dir.path().join("t.yaml");
    std::fs::write(&file, serde_yaml_ng::to_string(&doc).expect("yaml")).expect("write");
    let file = file.to_str().expect("utf8 path");
    let o = ctl(&["topology", "diff", file]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("routing unchanged"),
        "removing a replica moves no keys: {}",
        text(&o)
    );
    let o = ctl(&["topology", "apply", file]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("applied: topology version 2"),
        "{}",
        text(&o)
    );
    let o = ctl(&["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("version 2") && text(&o).contains("unchanged"),
        "{}",
        text(&o)
    );

    // A stale version: 409 with an explanation, exit 1.
    let o = ctl(&["topology", "apply", file, "--if-match", "1"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).to_lowercase().contains("changed since"),
        "{}",
        text(&o)
    );

    // A key-moving change while data exists: reshard_required, exit 1.
    doc["groups"][1]["weight"] = json!(3);
    std::fs::write(
        dir.path().join("w.yaml"),
        serde_yaml_ng::to_string(&doc).expect("yaml"),
    )
    .expect("write");
    let o = ctl(&[
        "topology",
        "apply",
        dir.path().join("w.yaml").to_str().expect("path"),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("reshard"), "{}", text(&o));

    // Invalid locally: every problem, nothing sent, exit 2.
    std::fs::write(
        dir.path().join("bad.yaml"),
        "vnodes: 0\ngroups:\n  - name: BAD\n    weight: 0\n",
    )
    .expect("write");
    let o = ctl(&[
        "topology",
        "apply",
        dir.path().join("bad.yaml").to_str().expect("path"),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    for p in [
        "vnodes",
        "groups[0].name",
        "groups[0].weight",
        "groups[0].master",
    ] {
        assert!(text(&o).contains(p), "missing {p}: {}", text(&o));
    }
    // Invalid only server-side (`***` for a server that is not running): 422 lists it.
    let mut ghost = doc.clone();
    ghost["groups"][1]["weight"] = json!(1);
    ghost["groups"][0]["replicas"] = json!(["mysql://root:***@127.0.0.1:9/tally"]);
    std::fs::write(
        dir.path().join("ghost.yaml"),
        serde_yaml_ng::to_string(&ghost).expect("yaml"),
    )
    .expect("write");
    let o = ctl(&[
        "topology",
        "apply",
        dir.path().join("ghost.yaml").to_str().expect("path"),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("groups[0].replicas[0]") && text(&o).contains("no running server"),
        "{}",
        text(&o)
    );

    // Wrong token: 401, exit 1. Nothing listening: exit 3.
    let o = run(&bin, &url, "wrong", &["topology", "show"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("unauthorized"), "{}", text(&o));
    let o = run(&bin, "http://127.0.0.1:1", TEST_TOKEN, &["health"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("cannot reach"), "{}", text(&o));

    // Without a shared store the registry is this proxy alone.
    let o = ctl(&["proxies"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains(&proxy.http.to_string()) && text(&o).contains("1 proxies, 0 gone"),
        "{}",
        text(&o)
    );

    // Promotion: a planned switchover of g0 to its replica, then a refusal
    // for an address that is not a replica (exit 1, clear message).
    let replica = cluster.group(0).replicas[0].addr().to_string();
    let o = ctl(&["promote", "g0", &replica]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "g0's replica was dropped above: {}",
        text(&o)
    );
    assert!(text(&o).contains("not a replica of g0"), "{}", text(&o));
    let replica = cluster.group(1).replicas[0].addr().to_string();
    let o = ctl(&["promote", "g1", &replica]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("promoted {replica} in g1 (planned")),
        "{}",
        text(&o)
    );

    // The running topology is version 3 (the apply, then the promotion).
    let (_, topo) = client
        .admin_get(&proxy.admin_url("/admin/v1/topology"), TEST_TOKEN)
        .await
        .expect("topology");
    assert_eq!(topo["version"], 3);
    assert_eq!(
        topo["groups"][1]["master"],
        json!(format!("mysql://tally@{replica}/tally"))
    );
    proxy.stop().await.expect("clean stop");
}

/// `tallyctl reshard start | status | cancel` against one proxy without a
/// shared store (it drives the reshard itself): 2 → 3 groups, exact after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tallyctl_runs_a_reshard() {
    let bin = tokio::task::spawn_blocking(tallyctl).await.expect("build");
    let cluster = Cluster::start(ClusterSpec {
        groups: 3,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let mut doc: Value = serde_yaml_ng::from_str(&cluster.topology_yaml(64)).expect("yaml");
    let three = doc.clone();
    doc["groups"].as_array_mut().expect("groups").truncate(2);
    let proxy =
        TestProxy::start_with_topology(&serde_yaml_ng::to_string(&doc).expect("yaml"), |c| {
            c.reshard.poll_interval = std::time::Duration::from_millis(100);
            c.reshard.cleanup_grace = std::time::Duration::from_secs(2);
        })
        .await;
    let client = Client::new();
    let events: Vec<Value> = (0..300)
        .map(|i| json!({ "ns": "r", "key": format!("k{i}"), "delta": i + 1 }))
        .collect();
    let (status, body) = client
        .post_json(&proxy.url("/v1/events?ack=committed"), &json!(events))
        .await
        .expect("write");
    assert_eq!(status, 200, "{body}");
    let url = format!("http://{}", proxy.admin);
    let ctl = |args: &[&str]| run(&bin, &url, TEST_TOKEN, args);

    let o = ctl(&["reshard", "status"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("no reshard in progress"), "{}", text(&o));
    let o = ctl(&["reshard", "cancel"]);
    assert_eq!(o.status.code(), Some(1), "nothing to cancel: {}", text(&o));

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("three.yaml");
    std::fs::write(&file, serde_yaml_ng::to_string(&three).expect("yaml")).expect("write");
    let file = file.to_string_lossy().into_owned();
    // A plain apply of the same file is refused and points to the reshard.
    let o = ctl(&["topology", "apply", &file]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("reshard start"), "{}", text(&o));

    let o = ctl(&["reshard", "start", &file]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("-> g2") && text(&o).contains("of keys move"),
        "{}",
        text(&o)
    );
    let o = ctl(&["reshard", "start", &file]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "one reshard at a time: {}",
        text(&o)
    );
    let o = ctl(&["--json", "reshard", "status"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let s: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(s["active"], true, "{s}");

    tally_integration::eventually(
        std::time::Duration::from_secs(90),
        "the reshard to finish",
        || async {
            let o = ctl(&["reshard", "status"]);
            text(&o).contains("last: ").then(|| text(&o))
        },
    )
    .await;
    let o = ctl(&["reshard", "status"]);
    assert!(text(&o).contains(" done"), "{}", text(&o));
    let o = ctl(&["topology", "show"]);
    assert!(text(&o).contains("g2"), "{}", text(&o));
    for i in 0..300 {
        let (status, v) = client
            .get(&proxy.url(&format!("/v1/counters/r/k{i}")))
            .await
            .expect("read");
        assert_eq!((status, v["total"].as_i64()), (200, Some(i + 1)), "k{i}");
    }
}
