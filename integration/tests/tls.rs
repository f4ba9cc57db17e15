//! Issue #23 item 1, TLS, against real MariaDB: the proxy's sessions to the
//! servers use TLS when the DSNs ask for it (`ssl_mode`, `ssl_ca`), and a
//! certificate signed by another CA is refused with a clear error.

use std::time::Duration;

use serde_json::json;
use tally_harness::{Cluster, ClusterSpec, DATA_USER, Node, TestCa};
use tally_integration::{Client, TEST_TOKEN, TestProxy, eventually};

/// `Ssl_accepts`: TLS handshakes the server completed since it started.
async fn ssl_accepts(node: &Node) -> u64 {
    let rows = node
        .sql("SHOW GLOBAL STATUS LIKE 'Ssl_accepts'")
        .await
        .expect("status");
    let value: String = rows[0].get(1).expect("value");
    value.parse().expect("a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_talks_tls_to_mariadb_and_refuses_a_certificate_of_another_ca() {
    let cluster = Cluster::start(ClusterSpec {
        tls: true,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let tls = cluster.tls().expect("tls files").clone();
    let master = &cluster.group(0).master;
    // The data user may only connect over TLS from now on (replicated to
    // the replica): the proxy's writes and reads work only if its sessions
    // use TLS. The admin user is also the replication account, left as is.
    master
        .exec(&format!("ALTER USER '{DATA_USER}'@'127.0.0.1' REQUIRE SSL"))
        .await
        .expect("require ssl");
    cluster.wait_replicas_caught_up().await.expect("caught up");
    let before = ssl_accepts(master).await;

    let topology = cluster.topology_yaml(160);
    assert!(
        topology.contains(&format!(
            "?ssl_mode=verify_identity&ssl_ca={}",
            tls.ca.display()
        )),
        "{topology}"
    );
    let proxy = TestProxy::start_with_topology(&topology, |_| {}).await;
    let client = Client::new();
    let (status, body) = client
        .post_json(
            &proxy.url("/v1/events?ack=committed"),
            &json!({ "ns": "tls", "key": "k", "delta": 7 }),
        )
        .await
        .expect("write");
    assert_eq!(status, 200, "committed over TLS: {body}");
    let url = proxy.url("/v1/counters/tls/k?consistency=strong");
    eventually(
        Duration::from_secs(10),
        "the counter reads back",
        || async {
            match client.get(&url).await {
                Ok((200, body)) if body["total"] == 7 => Some(()),
                _ => None,
            }
        },
    )
    .await;
    let after = ssl_accepts(master).await;
    assert!(
        after > before,
        "the master accepted TLS sessions: Ssl_accepts {before} -> {after}"
    );
    println!("master Ssl_accepts {before} -> {after}");
    // A plain session of the data user is refused now (the proof above
    // is not the harness's own TLS use: the harness never uses TLS).
    assert!(master.connect_as(DATA_USER, None).await.is_err());
    proxy.stop().await.expect("clean stop");

    // The same servers, verified with a CA that did not sign them.
    let dir = tempfile::tempdir().expect("temp dir");
    let other = TestCa::new("another CA").expect("ca");
    let wrong = dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong, other.cert_pem()).expect("write");
    let topology = topology.replace(&tls.ca.display().to_string(), &wrong.display().to_string());
    let proxy = TestProxy::start_with_topology(&topology, |c| {
        c.health.interval = Duration::from_millis(200);
        c.buffer.commit_timeout = Duration::from_secs(2);
        // The refused write stays pending: the stop must not wait for it.
        c.shutdown.flush_deadline = Some(Duration::from_secs(1));
    })
    .await;
    let error = eventually(
        Duration::from_secs(15),
        "the master is down with a certificate error",
        || async {
            let (_, health) = client
                .admin_get(&proxy.admin_url("/admin/v1/health"), TEST_TOKEN)
                .await
                .ok()?;
            let master = &health["groups"][0]["master"];
            (master["up"] == false)
                .then(|| master["last_error"].as_str().map(str::to_owned))
                .flatten()
        },
    )
    .await;
    println!("with the wrong CA: {error}");
    assert!(
        error.contains("certificate") && error.contains("UnknownIssuer"),
        "{error}"
    );
    let (status, body) = client
        .post_json(
            &proxy.url("/v1/events?ack=committed"),
            &json!({ "ns": "tls", "key": "k", "delta": 1 }),
        )
        .await
        .expect("write");
    assert_ne!(
        status, 200,
        "not committed without a verified server: {body}"
    );
    let stopped = proxy.stop().await;
    assert!(stopped.is_err(), "the write was never flushed: {stopped:?}");
}

/// Issue #23 item 1, HTTPS: both listeners serve TLS with a test CA,
/// plain HTTP is refused, and replaced certificate files are picked up by
/// new connections while an open keep-alive connection keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_listeners_serve_https_refuse_plain_http_and_reload_their_certificate() {
    use tally_harness::tls::{LOCAL_NAMES, write};
    use tally_proxy::config::TlsConfig;

    let cluster = Cluster::start(ClusterSpec {
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster");
    let dir = tempfile::tempdir().expect("temp dir");
    let first = TestCa::new("first CA").expect("ca");
    let files = first
        .write_server(dir.path(), "proxy", &LOCAL_NAMES)
        .expect("files");
    let tls = TlsConfig {
        cert: files.cert.clone(),
        key: files.key.clone(),
    };
    let proxy = TestProxy::start(&cluster, |c| {
        c.http_tls = Some(tls.clone());
        c.admin_tls = Some(tls.clone());
        c.topology_watch_interval = Duration::from_millis(200);
    })
    .await;
    assert!(proxy.url("/healthz").starts_with("https://127.0.0.1:"));
    assert!(proxy.admin_url("/").starts_with("https://127.0.0.1:"));

    let trusts_first = Client::with_ca(first.cert_pem().as_bytes());
    let (status, _) = trusts_first
        .get(&proxy.url("/healthz"))
        .await
        .expect("https healthz");
    assert_eq!(status, 200);
    let (status, health) = trusts_first
        .admin_get(&proxy.admin_url("/admin/v1/health"), TEST_TOKEN)
        .await
        .expect("https admin");
    assert_eq!(status, 200, "{health}");
    // Another CA's client refuses the certificate.
    let second = TestCa::new("second CA").expect("ca");
    let trusts_second = Client::with_ca(second.cert_pem().as_bytes());
    assert!(trusts_second.get(&proxy.url("/healthz")).await.is_err());

    // Plain HTTP on either HTTPS port: answered 400, never served.
    let plain = Client::new();
    for addr in [proxy.http, proxy.admin] {
        let response = plain
            .raw()
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .expect("an answer");
        assert_eq!(response.status(), 400, "{addr}");
        let text = response.text().await.expect("body");
        assert!(text.contains("HTTPS"), "{text}");
    }

    // The first client holds a keep-alive connection (made above). The
    // files are replaced by a certificate of the second CA.
    let issued = second.issue(&LOCAL_NAMES).expect("issue");
    write(&files.key, &issued.key_pem, 0o600).expect("key");
    write(&files.cert, &issued.cert_pem, 0o644).expect("cert");
    eventually(
        Duration::from_secs(10),
        "new connections get the new certificate",
        || async {
            matches!(
                trusts_second.get(&proxy.url("/healthz")).await,
                Ok((200, _))
            )
            .then_some(())
        },
    )
    .await;
    let (status, _) = Client::with_ca(second.cert_pem().as_bytes())
        .admin_get(&proxy.admin_url("/admin/v1/health"), TEST_TOKEN)
        .await
        .expect("the admin listener's new certificate");
    assert_eq!(status, 200);
    // A new connection trusting only the first CA fails now...
    assert!(
        Client::with_ca(first.cert_pem().as_bytes())
            .get(&proxy.url("/healthz"))
            .await
            .is_err()
    );
    // ...while the open one, handshaken with the old certificate, works.
    let (status, _) = trusts_first
        .get(&proxy.url("/healthz"))
        .await
        .expect("the kept-alive connection");
    assert_eq!(status, 200);
    proxy.stop().await.expect("stop");
}
