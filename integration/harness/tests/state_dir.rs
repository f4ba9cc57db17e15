//! Reusing a state directory across runs, as `tally-dev --state-dir` does,
//! including a master whose old port is taken, and `fresh`.

use std::time::Duration;

use tally_harness::{Cluster, ClusterSpec, HarnessError, Node};

const DEADLINE: Duration = Duration::from_secs(30);

async fn ids(node: &Node) -> Vec<i64> {
    node.sql("SELECT id FROM t.rows ORDER BY id")
        .await
        .expect("select")
        .iter()
        .filter_map(|r| r.get::<i64, _>(0))
        .collect()
}

#[tokio::test]
async fn state_dir_is_reused_with_data_and_replication() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = ClusterSpec {
        groups: 2,
        state_dir: Some(dir.path().join("state")),
        ..ClusterSpec::default()
    };

    let started = std::time::Instant::now();
    let cluster = Cluster::start(spec.clone()).await.expect("first start");
    eprintln!("2x1 cluster started in {:?}", started.elapsed());
    let yaml = cluster.topology_yaml(160);
    for node in cluster.nodes() {
        assert!(yaml.contains(&node.dsn("tally")), "{yaml}");
    }
    assert!(
        yaml.starts_with(
            "version: 1\nvnodes: 160\nadmin:\n  user: tally_admin\ngroups:\n  - name: g0\n"
        ),
        "{yaml}"
    );
    let g1 = cluster.group(1);
    g1.master
        .exec("CREATE DATABASE t")
        .await
        .expect("create db");
    g1.master
        .exec("CREATE TABLE t.rows (id BIGINT PRIMARY KEY)")
        .await
        .expect("create table");
    g1.master
        .exec("INSERT INTO t.rows VALUES (1)")
        .await
        .expect("insert");
    let old_g0_master_port = cluster.group(0).master.port();
    cluster.shutdown().await;

    // Another shape is refused before anything starts.
    let wrong = Cluster::start(ClusterSpec {
        groups: 1,
        ..spec.clone()
    })
    .await;
    assert!(
        matches!(wrong, Err(HarnessError::StateDir { .. })),
        "{wrong:?}"
    );

    // Occupy g0's old master port: it must move, and its replica follow.
    let squatter =
        std::net::TcpListener::bind(("127.0.0.1", old_g0_master_port)).expect("take the port");
    let cluster = Cluster::start(spec.clone()).await.expect("second start");
    drop(squatter);
    let (g0, g1) = (cluster.group(0), cluster.group(1));
    assert_ne!(g0.master.port(), old_g0_master_port);
    assert_eq!(ids(&g1.master).await, [1], "data kept across restarts");
    g1.master
        .exec("INSERT INTO t.rows VALUES (2)")
        .await
        .expect("insert");
    g1.replicas[0]
        .wait_caught_up(&g1.master, DEADLINE)
        .await
        .expect("g1 replicates");
    assert_eq!(ids(&g1.replicas[0]).await, [1, 2]);
    g0.master
        .exec("CREATE DATABASE t")
        .await
        .expect("create db on g0");
    g0.master
        .exec("CREATE TABLE t.rows (id BIGINT PRIMARY KEY)")
        .await
        .expect("create table on g0");
    g0.replicas[0]
        .wait_caught_up(&g0.master, DEADLINE)
        .await
        .expect("g0 replicates from the moved master");
    assert_eq!(ids(&g0.replicas[0]).await, Vec::<i64>::new());
    cluster.shutdown().await;

    // fresh wipes the old cluster.
    let cluster = Cluster::start(ClusterSpec {
        fresh: true,
        ..spec
    })
    .await
    .expect("fresh start");
    let gone = cluster.group(1).master.sql("SELECT id FROM t.rows").await;
    assert!(gone.is_err(), "fresh kept old data: {gone:?}");
    cluster.shutdown().await;

    // A non-empty directory that is not ours is never used or wiped.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).expect("mkdir");
    std::fs::write(foreign.join("precious.txt"), "data").expect("write");
    let refused = Cluster::start(ClusterSpec {
        state_dir: Some(foreign.clone()),
        fresh: true,
        ..ClusterSpec::default()
    })
    .await;
    assert!(
        matches!(refused, Err(HarnessError::StateDir { .. })),
        "{refused:?}"
    );
    assert!(foreign.join("precious.txt").exists());
}

/// A data directory from before the harness had its two accounts (or one
/// whose accounts were dropped) gets them back at the next start, on every
/// server, and replication (as the admin user) runs again.
#[tokio::test]
async fn a_reused_state_dir_without_the_accounts_gets_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = ClusterSpec {
        state_dir: Some(dir.path().join("state")),
        ..ClusterSpec::default()
    };
    let cluster = Cluster::start(spec.clone()).await.expect("first start");
    let accounts =
        "SELECT User FROM mysql.user WHERE User IN ('tally', 'tally_admin') ORDER BY User";
    for node in cluster.nodes() {
        node.exec(
            "SET SESSION sql_log_bin = 0; STOP SLAVE; \
             DROP USER 'tally'@'127.0.0.1', 'tally_admin'@'127.0.0.1'",
        )
        .await
        .expect("drop the accounts");
        assert!(node.sql(accounts).await.expect("users").is_empty());
    }
    cluster.shutdown().await;

    let cluster = Cluster::start(spec).await.expect("second start");
    for node in cluster.nodes() {
        let users: Vec<String> = node
            .sql(accounts)
            .await
            .expect("users")
            .iter()
            .filter_map(|r| r.get::<String, _>(0))
            .collect();
        assert_eq!(users, ["tally", "tally_admin"], "{}", node.name());
    }
    let g0 = cluster.group(0);
    g0.master
        .exec("INSERT INTO tally.counter_total (ns, ckey, ring_pos, count) VALUES ('n', 'k', 0, 1)")
        .await
        .expect("insert");
    g0.replicas[0]
        .wait_caught_up(&g0.master, DEADLINE)
        .await
        .expect("replicates again");
    let status = g0.replicas[0].replica_status().await.expect("status");
    assert!(status.io_running && status.sql_running, "{status:?}");
    cluster.shutdown().await;
}
