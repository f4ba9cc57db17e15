//! The split of database users (issue #19 item 1) on real servers: the
//! data user of the topology DSNs is fenced by `read_only`, while the admin
//! user of the topology's `admin:` section can do everything the proxy's
//! schema, promotion and fencing need, replication included, with
//! [`ADMIN_PRIVILEGES`] and nothing more.

use std::time::Duration;

use tally_harness::mysql_async::prelude::Queryable;
use tally_harness::mysql_async::{self, Conn, Row};
use tally_harness::{ADMIN_PRIVILEGES, ADMIN_USER, Cluster, ClusterSpec, DATA_USER, Node};

const DEADLINE: Duration = Duration::from_secs(30);
/// `--read-only`: the statement is refused.
const ER_OPTION_PREVENTS_STATEMENT: u16 = 1290;
/// A global privilege is missing.
const ER_SPECIFIC_ACCESS_DENIED: u16 = 1227;
/// No privilege on the table (or database).
const ER_TABLEACCESS_DENIED: u16 = 1142;
/// `KILL` of someone else's session.
const ER_KILL_DENIED: u16 = 1095;

fn code(e: &mysql_async::Error) -> Option<u16> {
    match e {
        mysql_async::Error::Server(s) => Some(s.code),
        _ => None,
    }
}

/// Runs `q` on `conn` and returns the server error code it fails with.
async fn refused(conn: &mut Conn, q: &str) -> Option<u16> {
    match conn.query_drop(q).await {
        Ok(()) => panic!("{q:?} should have been refused"),
        Err(e) => code(&e),
    }
}

async fn run(conn: &mut Conn, q: &str) {
    if let Err(e) = conn.query_drop(q).await {
        panic!("{q:?} failed: {e}");
    }
}

async fn as_user(node: &Node, user: &str, db: Option<&str>) -> Conn {
    node.connect_as(user, db)
        .await
        .unwrap_or_else(|e| panic!("connect as {user}: {e}"))
}

/// The grants of `user`, one string each, as root sees them.
async fn grants(node: &Node, user: &str) -> Vec<String> {
    node.sql(&format!("SHOW GRANTS FOR '{user}'@'127.0.0.1'"))
        .await
        .expect("show grants")
        .iter()
        .filter_map(|r| r.get::<String, _>(0))
        .collect()
}

/// `SHOW SLAVE STATUS` as the admin user: `(Master_User, IO, SQL running)`.
async fn slave_status(admin: &mut Conn) -> (String, String, String) {
    let row: Row = admin
        .query_first("SHOW SLAVE STATUS")
        .await
        .expect("SHOW SLAVE STATUS as the admin user")
        .expect("a replica has a status row");
    let text = |c: &str| row.get::<String, _>(c).unwrap_or_default();
    (
        text("Master_User"),
        text("Slave_IO_Running"),
        text("Slave_SQL_Running"),
    )
}

/// `MASTER_GTID_WAIT` as the admin user on `replica` for what `master`
/// wrote (its position read as the admin user too).
async fn admin_catch_up(master: &Node, replica: &mut Conn) {
    let mut m = as_user(master, ADMIN_USER, None).await;
    let pos: String = m
        .query_first("SELECT @@GLOBAL.gtid_binlog_pos")
        .await
        .expect("gtid_binlog_pos as the admin user")
        .unwrap_or_default();
    assert!(!pos.is_empty(), "the master has written something");
    let waited: Option<Option<i64>> = replica
        .exec_first(
            "SELECT MASTER_GTID_WAIT(?, ?)",
            (pos.clone(), DEADLINE.as_secs()),
        )
        .await
        .expect("MASTER_GTID_WAIT as the admin user");
    assert_eq!(waited.flatten(), Some(0), "caught up to {pos}");
}

async fn count(node: &Node, table: &str) -> usize {
    node.sql(&format!("SELECT * FROM {table}"))
        .await
        .expect("select as root")
        .len()
}

async fn tables(node: &Node) -> usize {
    node.sql("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = 'tally'")
        .await
        .expect("tables")
        .len()
}

fn change_master(master: &Node, gtid_mode: &str) -> String {
    format!(
        "STOP SLAVE; CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={}, \
         MASTER_USER='{ADMIN_USER}', MASTER_PASSWORD='', MASTER_USE_GTID={gtid_mode}, \
         MASTER_CONNECT_RETRY=1; START SLAVE",
        master.port()
    )
}

/// Polls until `SHOW SLAVE STATUS` (as the admin user) says both threads
/// run, replicating as the admin user.
async fn wait_replicating(node: &Node) {
    let mut admin = as_user(node, ADMIN_USER, None).await;
    let started = std::time::Instant::now();
    loop {
        let status = slave_status(&mut admin).await;
        if status == (ADMIN_USER.to_owned(), "Yes".to_owned(), "Yes".to_owned()) {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{} does not replicate as {ADMIN_USER}: {status:?}",
            node.name()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_data_user_is_fenced_and_the_admin_user_can_do_the_rest() {
    let cluster = Cluster::start(ClusterSpec::default())
        .await
        .expect("cluster starts");
    let group = cluster.group(0);
    let (master, replica) = (&group.master, &group.replicas[0]);

    // The accounts, as the topology names them.
    let yaml = cluster.topology_yaml(64);
    assert!(
        yaml.contains(&format!("\nadmin:\n  user: {ADMIN_USER}\n")),
        "{yaml}"
    );
    for node in group.nodes() {
        assert!(
            yaml.contains(&format!("mysql://{DATA_USER}@{}/tally\n", node.addr())),
            "{yaml}"
        );
        // Every server has both accounts and exactly these privileges: the
        // data user no global one (USAGE), the admin user the documented list.
        assert_eq!(
            grants(node, DATA_USER).await,
            [
                "GRANT USAGE ON *.* TO `tally`@`127.0.0.1`",
                "GRANT SELECT, INSERT, UPDATE, DELETE ON `tally`.* TO `tally`@`127.0.0.1`"
            ],
            "{}",
            node.name()
        );
        assert_eq!(
            grants(node, ADMIN_USER).await,
            [
                format!("GRANT {ADMIN_PRIVILEGES} ON *.* TO `tally_admin`@`127.0.0.1`"),
                "GRANT ALL PRIVILEGES ON `tally`.* TO `tally_admin`@`127.0.0.1`".to_owned()
            ],
            "{}",
            node.name()
        );
    }

    // The data user writes its database, nothing else, and no global state.
    let insert = |key: &str| {
        format!(
            "INSERT INTO tally.counter_total (ns, ckey, ring_pos, count) VALUES ('fence', '{key}', 0, 1)"
        )
    };
    let mut data = as_user(master, DATA_USER, Some("tally")).await;
    run(&mut data, &insert("before")).await;
    master
        .exec("CREATE DATABASE other; CREATE TABLE other.t (id INT PRIMARY KEY)")
        .await
        .expect("root creates another database");
    assert_eq!(
        refused(&mut data, "INSERT INTO other.t VALUES (1)").await,
        Some(ER_TABLEACCESS_DENIED)
    );
    assert_eq!(
        refused(&mut data, "SET GLOBAL read_only = ON").await,
        Some(ER_SPECIFIC_ACCESS_DENIED)
    );
    let mut data_on_replica = as_user(replica, DATA_USER, Some("tally")).await;
    assert_eq!(
        refused(&mut data_on_replica, &insert("on-replica")).await,
        Some(ER_OPTION_PREVENTS_STATEMENT),
        "a replica runs read-only"
    );
    assert_eq!(
        refused(&mut data_on_replica, "SHOW SLAVE STATUS").await,
        Some(ER_SPECIFIC_ACCESS_DENIED)
    );

    // The fence: read_only (set by root) refuses the data user's writes,
    // on a session opened before.
    master
        .exec("SET GLOBAL read_only = ON")
        .await
        .expect("root sets read_only");
    assert_eq!(
        refused(&mut data, &insert("fenced")).await,
        Some(ER_OPTION_PREVENTS_STATEMENT)
    );

    // The admin user lifts and sets read_only itself.
    let mut admin = as_user(master, ADMIN_USER, None).await;
    run(&mut admin, "SET GLOBAL read_only = OFF").await;
    run(&mut data, &insert("unfenced")).await;
    run(&mut admin, "SET GLOBAL read_only = ON").await;
    assert_eq!(
        refused(&mut data, &insert("fenced-again")).await,
        Some(ER_OPTION_PREVENTS_STATEMENT)
    );

    // It sees the data user's sessions and ends them; the data user cannot
    // end another user's session.
    let data_id = u64::from(data.id());
    let ids: Vec<u64> = admin
        .exec(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ? AND ID <> CONNECTION_ID()",
            (DATA_USER,),
        )
        .await
        .expect("PROCESSLIST as the admin user");
    assert!(ids.contains(&data_id), "{data_id} not in {ids:?}");
    assert_eq!(
        refused(&mut data, &format!("KILL CONNECTION {}", admin.id())).await,
        Some(ER_KILL_DENIED)
    );
    run(&mut admin, &format!("KILL CONNECTION {data_id}")).await;
    assert!(
        data.query_drop("SELECT 1").await.is_err(),
        "the killed session is gone"
    );
    let ids: Vec<u64> = admin
        .exec(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ?",
            (DATA_USER,),
        )
        .await
        .expect("PROCESSLIST as the admin user");
    assert!(!ids.contains(&data_id), "{data_id} still in {ids:?}");
    run(&mut admin, "SET GLOBAL read_only = OFF").await;

    // The harness's replication runs as the admin user (the replication
    // account), and the admin user reads replica status.
    let mut admin_replica = as_user(replica, ADMIN_USER, None).await;
    assert_eq!(
        slave_status(&mut admin_replica).await,
        (ADMIN_USER.to_owned(), "Yes".to_owned(), "Yes".to_owned())
    );
    // It repoints the replica (STOP SLAVE, CHANGE MASTER, START SLAVE) and
    // what the data user writes arrives.
    run(&mut admin_replica, &change_master(master, "slave_pos")).await;
    wait_replicating(replica).await;
    let mut data = as_user(master, DATA_USER, Some("tally")).await;
    run(&mut data, &insert("replicated")).await;
    admin_catch_up(master, &mut admin_replica).await;
    assert_eq!(count(replica, "tally.counter_total").await, 3);

    // A planned promotion, every step as the admin user: fence the master,
    // make the replica a writable semi-sync master, the old master follows.
    run(&mut admin, "SET GLOBAL read_only = ON").await;
    admin_catch_up(master, &mut admin_replica).await;
    run(
        &mut admin_replica,
        "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = OFF; \
         SET GLOBAL rpl_semi_sync_slave_enabled = OFF; SET GLOBAL rpl_semi_sync_master_enabled = ON",
    )
    .await;
    run(&mut admin, &change_master(replica, "current_pos")).await;
    run(
        &mut admin,
        "SET GLOBAL rpl_semi_sync_master_enabled = OFF; SET GLOBAL rpl_semi_sync_slave_enabled = ON",
    )
    .await;
    wait_replicating(master).await;
    let mut data_on_new = as_user(replica, DATA_USER, Some("tally")).await;
    run(&mut data_on_new, &insert("promoted")).await;
    let mut data_on_old = as_user(master, DATA_USER, Some("tally")).await;
    assert_eq!(
        refused(&mut data_on_old, &insert("old-master")).await,
        Some(ER_OPTION_PREVENTS_STATEMENT)
    );
    let mut admin_old = as_user(master, ADMIN_USER, None).await;
    admin_catch_up(replica, &mut admin_old).await;
    assert_eq!(count(master, "tally.counter_total").await, 4);

    // The admin user creates the schema (here on the new master, replicated
    // to the old one): the database and every statement of it.
    replica
        .exec("DROP DATABASE tally")
        .await
        .expect("root drops the schema");
    let mut admin_new = as_user(replica, ADMIN_USER, None).await;
    run(&mut admin_new, &tally_schema::create_database("tally")).await;
    run(&mut admin_new, "USE tally").await;
    for statement in tally_schema::statements() {
        run(&mut admin_new, &statement).await;
    }
    admin_catch_up(replica, &mut admin_old).await;
    let expected = tally_schema::statements()
        .iter()
        .filter(|s| s.starts_with("CREATE TABLE"))
        .count();
    assert!(expected > 0);
    assert_eq!(tables(replica).await, expected);
    assert_eq!(tables(master).await, expected);
    // The data user's grant outlives the database: it writes the new one.
    run(&mut data_on_new, &insert("new-schema")).await;
    assert_eq!(count(replica, "tally.counter_total").await, 1);
}

/// `_` in a database name is a `GRANT` wildcard: the harness escapes it, so
/// a database of its own grants that database only.
#[tokio::test]
async fn database_grants_cover_exactly_the_clusters_databases() {
    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster starts");
    cluster.add_database("fence_a").await.expect("add database");
    let master = &cluster.group(0).master;
    master
        .exec("CREATE DATABASE fenceXa; CREATE TABLE fenceXa.t (id INT PRIMARY KEY)")
        .await
        .expect("root creates a look-alike database");
    let mut data = as_user(master, DATA_USER, None).await;
    run(
        &mut data,
        "INSERT INTO fence_a.counter_total (ns, ckey, ring_pos, count) VALUES ('n', 'k', 0, 1)",
    )
    .await;
    assert_eq!(
        refused(&mut data, "INSERT INTO fenceXa.t VALUES (1)").await,
        Some(ER_TABLEACCESS_DENIED)
    );
    let mut admin = as_user(master, ADMIN_USER, None).await;
    run(
        &mut admin,
        "CREATE TABLE fence_a.extra (id INT PRIMARY KEY)",
    )
    .await;
    assert_eq!(
        refused(
            &mut admin,
            "CREATE TABLE fenceXa.extra (id INT PRIMARY KEY)"
        )
        .await,
        Some(ER_TABLEACCESS_DENIED)
    );
    assert_eq!(
        refused(&mut admin, "CREATE DATABASE not_granted").await,
        Some(1044),
        "ER_DBACCESS_DENIED_ERROR"
    );
}
