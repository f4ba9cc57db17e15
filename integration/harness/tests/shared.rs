//! The process-wide shared cluster: started once, used from several tests
//! (each with its own tokio runtime), isolated by database.

use std::time::Duration;

use tally_harness::{Cluster, ClusterSpec, HarnessError};

fn spec() -> ClusterSpec {
    ClusterSpec {
        groups: 2,
        ..ClusterSpec::default()
    }
}

/// Writes a row in a database of its own on every master and waits until
/// every replica has it.
async fn use_own_database(db: &str) {
    let cluster = Cluster::shared(spec()).await.expect("shared cluster");
    cluster.add_database(db).await.expect("add database");
    for group in cluster.groups() {
        group
            .master
            .exec(&format!(
                "INSERT INTO {db}.counter_total (ns, ckey, ring_pos, count) VALUES ('n', 'k', 0, 1)"
            ))
            .await
            .expect("insert");
    }
    cluster.wait_replicas_caught_up().await.expect("caught up");
    for group in cluster.groups() {
        let rows = group.replicas[0]
            .sql(&format!("SELECT count FROM {db}.counter_total"))
            .await
            .expect("select on replica");
        assert_eq!(rows.len(), 1, "{db} on {}", group.name);
    }
    let yaml = cluster.topology_yaml_for(db, 64);
    assert_eq!(yaml.matches(&format!("/{db}\n")).count(), 4, "{yaml}");
}

#[tokio::test]
async fn first_test_on_the_shared_cluster() {
    use_own_database("shared_a").await;
}

#[tokio::test]
async fn second_test_on_the_shared_cluster() {
    use_own_database("shared_b").await;
}

#[tokio::test]
async fn the_shared_cluster_is_one_cluster() {
    let a = Cluster::shared(spec()).await.expect("shared cluster");
    let b = Cluster::shared(spec()).await.expect("shared cluster");
    assert!(std::ptr::eq(a, b));
    let other_shape = Cluster::shared(ClusterSpec::default()).await;
    assert!(
        matches!(other_shape, Err(HarnessError::InvalidSpec(_))),
        "{other_shape:?}"
    );
    // Servers started under another test's runtime answer this one.
    a.group(1).replicas[0]
        .wait_caught_up(&a.group(1).master, Duration::from_secs(30))
        .await
        .expect("replica reachable");
}
