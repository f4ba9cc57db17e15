//! Replication, replica control, kill/restart and cleanup against real
//! MariaDB servers. Each test owns its cluster because it kills or stops
//! servers.

use std::path::Path;
use std::time::{Duration, Instant};

use tally_harness::mysql_async::Row;
use tally_harness::{Cluster, ClusterSpec, HarnessError, Node};

const DEADLINE: Duration = Duration::from_secs(30);

fn proc_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Running, as opposed to gone or a zombie. A server whose parent died is
/// reaped by init, which may take a moment (or never happen in a container
/// whose pid 1 does not reap); a zombie is dead for our purposes.
fn proc_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// The `v` column of `t.rows` for `id`, if the row exists.
async fn read_row(node: &Node, id: u32) -> Option<String> {
    let rows: Vec<Row> = node
        .sql(&format!("SELECT v FROM t.rows WHERE id = {id}"))
        .await
        .expect("select from t.rows");
    rows.first().and_then(|r| r.get::<String, _>(0))
}

/// Polls `read_row` until the row shows up or the deadline passes.
async fn wait_for_row(node: &Node, id: u32) -> String {
    let started = Instant::now();
    loop {
        if let Some(v) = read_row(node, id).await {
            return v;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "row {id} never appeared on {}",
            node.name()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status_value(node: &Node, name: &str) -> String {
    let rows = node
        .sql(&format!("SHOW GLOBAL STATUS LIKE '{name}'"))
        .await
        .expect("show status");
    rows.first()
        .and_then(|r| r.get::<String, _>(1))
        .unwrap_or_default()
}

async fn create_test_table(master: &Node) {
    master
        .exec("CREATE DATABASE IF NOT EXISTS t")
        .await
        .expect("create db");
    master
        .exec("CREATE TABLE IF NOT EXISTS t.rows (id INT PRIMARY KEY, v VARCHAR(32) NOT NULL)")
        .await
        .expect("create table");
}

#[tokio::test]
async fn replication_and_sql_thread_control() {
    let started = Instant::now();
    let cluster = Cluster::start(ClusterSpec::default())
        .await
        .expect("cluster starts");
    eprintln!("1x1 cluster started in {:?}", started.elapsed());
    let group = cluster.group(0);
    let (master, replica) = (&group.master, &group.replicas[0]);

    // Root over TCP is root@127.0.0.1 (the server runs with skip-name-resolve).
    let user = master
        .sql("SELECT CURRENT_USER()")
        .await
        .expect("current_user");
    assert_eq!(
        user[0].get::<String, _>(0).as_deref(),
        Some("root@127.0.0.1")
    );
    // Semi-sync is on and the replica is its client.
    assert_eq!(
        status_value(master, "Rpl_semi_sync_master_status").await,
        "ON"
    );
    assert_eq!(
        status_value(master, "Rpl_semi_sync_master_clients").await,
        "1"
    );
    assert_eq!(
        status_value(replica, "Rpl_semi_sync_slave_status").await,
        "ON"
    );

    // The schema reached the replica by replication.
    let tables = replica
        .sql("SHOW TABLES FROM tally")
        .await
        .expect("show tables");
    let created_tables = tally_schema::statements()
        .iter()
        .filter(|s| s.starts_with("CREATE TABLE"))
        .count();
    assert_eq!(tables.len(), created_tables);

    create_test_table(master).await;
    master
        .exec("INSERT INTO t.rows VALUES (1, 'one')")
        .await
        .expect("insert 1");
    assert_eq!(wait_for_row(replica, 1).await, "one");
    let status = replica.replica_status().await.expect("replica status");
    assert!(status.io_running && status.sql_running, "{status:?}");
    assert_eq!(status.lag_seconds, Some(0), "{status:?}");
    assert!(!status.gtid_slave_pos.is_empty(), "{status:?}");
    assert_eq!(
        status.gtid_slave_pos,
        master.gtid_binlog_pos().await.expect("pos")
    );

    // A stopped SQL thread keeps receiving but applies nothing.
    replica.stop_sql_thread().await.expect("stop sql thread");
    let status = replica.replica_status().await.expect("replica status");
    assert!(status.io_running && !status.sql_running, "{status:?}");
    assert_eq!(status.lag_seconds, None, "{status:?}");
    master
        .exec("INSERT INTO t.rows VALUES (2, 'two')")
        .await
        .expect("insert 2");
    let waited = replica.wait_caught_up(master, Duration::from_secs(1)).await;
    assert!(
        matches!(waited, Err(HarnessError::Timeout { .. })),
        "{waited:?}"
    );
    assert_eq!(read_row(replica, 2).await, None);

    replica
        .start_replication()
        .await
        .expect("start replication");
    replica
        .wait_caught_up(master, DEADLINE)
        .await
        .expect("catches up");
    assert_eq!(read_row(replica, 2).await.as_deref(), Some("two"));

    // Not a replica: a clear error, not a panic or an empty status.
    let not_replica = master.replica_status().await;
    assert!(
        matches!(not_replica, Err(HarnessError::NotAReplica { .. })),
        "{not_replica:?}"
    );

    let shutdown = Instant::now();
    cluster.shutdown().await;
    eprintln!("clean shutdown took {:?}", shutdown.elapsed());
}

#[tokio::test]
async fn kill9_restart_and_drop_cleanup() {
    // Directories of a harness process that died without cleaning up (its
    // pid in the name, the process gone) are swept by the next start.
    let mut exited = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let dead_pid = exited.id();
    exited.wait().expect("reap true");
    let stale = [
        std::env::temp_dir().join(format!("tally-harness-{dead_pid}-stale")),
        Path::new("/tmp").join(format!("tally-sock-{dead_pid}-stale")),
    ];
    for dir in &stale {
        std::fs::create_dir_all(dir).expect("create a stale dir");
    }

    let cluster = Cluster::start(ClusterSpec::default())
        .await
        .expect("cluster starts");
    for dir in &stale {
        assert!(!dir.exists(), "{} was not swept", dir.display());
    }
    let group = cluster.group(0);
    let (master, replica) = (&group.master, &group.replicas[0]);
    create_test_table(master).await;
    master
        .exec("INSERT INTO t.rows VALUES (1, 'before')")
        .await
        .expect("insert");

    let pid = master.pid().expect("master runs");
    let port = master.port();
    master.kill9();
    assert!(!proc_exists(pid), "pid {pid} still exists after kill9");
    assert_eq!(master.pid(), None);
    assert!(
        master.sql("SELECT 1").await.is_err(),
        "a killed master answered"
    );

    master.start().await.expect("master restarts");
    assert_eq!(master.port(), port, "restart keeps the port");
    assert_ne!(master.pid(), Some(pid));
    assert_eq!(read_row(master, 1).await.as_deref(), Some("before"));
    // The replica reconnects to the restarted master by itself.
    master
        .exec("INSERT INTO t.rows VALUES (2, 'after')")
        .await
        .expect("insert");
    replica
        .wait_caught_up(master, DEADLINE)
        .await
        .expect("replica follows restarted master");
    assert_eq!(read_row(replica, 2).await.as_deref(), Some("after"));

    // A killed replica restarts and resumes replication.
    replica.kill9();
    master
        .exec("INSERT INTO t.rows VALUES (3, 'while down')")
        .await
        .expect("insert");
    replica.start().await.expect("replica restarts");
    replica
        .wait_caught_up(master, DEADLINE)
        .await
        .expect("replica catches up");
    assert_eq!(read_row(replica, 3).await.as_deref(), Some("while down"));

    // Dropping the cluster kills every server and removes the temp dir.
    let pids: Vec<u32> = cluster.nodes().filter_map(Node::pid).collect();
    assert_eq!(pids.len(), 2);
    let dir = cluster.state_dir().to_owned();
    assert!(dir.exists());
    let sockets = master
        .socket_path()
        .parent()
        .expect("socket dir")
        .to_owned();
    assert!(sockets.exists());
    assert!(
        master.socket_path().as_os_str().len() < 100,
        "{}",
        master.socket_path().display()
    );
    drop(cluster);
    assert!(!sockets.exists(), "{} survived the drop", sockets.display());
    for pid in pids {
        assert!(!proc_exists(pid), "mariadbd {pid} survived the drop");
    }
    assert!(!dir.exists(), "{} survived the drop", dir.display());
}

/// The process-death guard: a test process killed with SIGKILL runs no
/// destructors, yet its servers must die with it. The test re-runs itself
/// as a child that starts a cluster and waits; the parent kills the child.
#[tokio::test]
async fn servers_die_with_the_test_process() {
    const CHILD_ENV: &str = "TALLY_HARNESS_DEATH_CHILD";
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let spec = ClusterSpec {
            replicas: 0,
            state_dir: Some(dir.into()),
            ..ClusterSpec::default()
        };
        let cluster = Cluster::start(spec).await.expect("child cluster starts");
        let pids: Vec<String> = cluster
            .nodes()
            .filter_map(Node::pid)
            .map(|p| p.to_string())
            .collect();
        println!("HARNESS_PIDS {}", pids.join(" "));
        // Wait to be killed; the parent has a deadline.
        std::future::pending::<()>().await;
    }

    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let state = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .args([
            "--exact",
            "servers_die_with_the_test_process",
            "--nocapture",
        ])
        .env(CHILD_ENV, state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child test");
    let stdout = child.stdout.take().expect("child stdout");
    let pids: Vec<u32> = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| {
                line.strip_prefix("HARNESS_PIDS ")
                    .map(|rest| rest.split(' ').map(|p| p.parse().expect("pid")).collect())
            })
    })
    .await
    .expect("reader")
    .expect("child printed its server pids");
    assert_eq!(pids.len(), 1);
    assert!(pids.iter().all(|&p| proc_alive(p)));

    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    let started = Instant::now();
    while pids.iter().any(|&p| proc_alive(p)) {
        assert!(
            started.elapsed() < DEADLINE,
            "mariadbd {pids:?} outlived its killed parent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
