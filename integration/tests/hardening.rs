//! Secrets and leaks (issue #20, item 6) against a real proxy and MariaDB:
//! the topology file keeps its passwords to its owner, a DSN that does not
//! parse is never echoed with its password, data-plane clients are not told
//! database addresses or driver errors, and a web page in an operator's
//! browser cannot drive the admin API.

use std::os::unix::fs::PermissionsExt;

use serde_json::{Value, json};
use tally_harness::{Cluster, ClusterSpec};
use tally_integration::{Client, TEST_TOKEN, TestProxy, free_port};

async fn cluster() -> &'static Cluster {
    Cluster::shared(ClusterSpec {
        groups: 1,
        replicas: 0,
        ..ClusterSpec::default()
    })
    .await
    .expect("shared cluster")
}

fn topology(cluster: &Cluster) -> Value {
    serde_yaml_ng::from_str(&cluster.topology_yaml(160)).expect("topology yaml")
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// The topology file holds the DSN passwords. It used to be rewritten
/// with the default mode (0644 under the usual umask) on the first change,
/// so every local user could read them; it is written 0600 whatever the
/// file's mode was, and no temporary file is left next to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topology_file_is_rewritten_readable_by_its_owner_only() {
    let cluster = cluster().await;
    let proxy = TestProxy::start(cluster, |_| {}).await;
    let client = Client::new();
    let file = &proxy.topology_file;
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).expect("chmod 644");

    let plain = topology(cluster);
    let mut with_replica = plain.clone();
    // A replica that is not there: a server change, always accepted.
    with_replica["groups"][0]["replicas"] = json!([format!(
        "mysql://root:s3cret@127.0.0.1:{}/tally",
        free_port()
    )]);
    for (doc, version) in [(&with_replica, 1), (&plain, 2)] {
        let (status, body) = proxy.put_topology(&client, doc, version).await;
        assert_eq!(status, 200, "{body}");
        let got = mode(file);
        assert_eq!(
            got,
            0o600,
            "mode {got:o} after the change to version {}",
            version + 1
        );
    }
    let text = std::fs::read_to_string(file).expect("topology file");
    assert!(text.contains("version: 3"), "{text}");
    let dir = file.parent().expect("dir");
    let names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["topology.yaml"], "temporary files left behind");
    proxy.stop().await.expect("clean stop");
}

/// A DSN whose password does not percent-decode was quoted in the 422
/// problem (and in the log line of a rejected file) with its password; so
/// was a DSN where the document wants a list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dsn_that_does_not_parse_is_not_echoed_with_its_password() {
    let cluster = cluster().await;
    let proxy = TestProxy::start(cluster, |_| {}).await;
    let client = Client::new();
    let mut undecodable = topology(cluster);
    undecodable["groups"][0]["master"] = json!("mysql://root:s3cret%FF@127.0.0.1:3306/tally");
    let mut not_a_list = topology(cluster);
    not_a_list["groups"][0]["replicas"] = json!("mysql://root:s3cret@127.0.0.1:3306/tally");
    for (doc, what) in [(&undecodable, "password"), (&not_a_list, "sequence")] {
        let (status, body) = proxy.put_topology(&client, doc, 1).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["error"]["code"], "invalid_topology", "{body}");
        let text = body.to_string();
        assert!(!text.contains("s3cret"), "the password is echoed: {text}");
        assert!(text.contains(what), "the problem is not named: {text}");
    }
    proxy.stop().await.expect("clean stop");
}

/// A read of a group whose master cannot be reached used to answer
/// `group g0 cannot be read: cannot connect to 127.0.0.1:<port>: <driver
/// error>`. Data-plane clients now learn which group and to retry; the
/// detail is logged and the admin API still shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_plane_errors_name_the_group_not_the_database() {
    let cluster = cluster().await;
    let proxy = TestProxy::start(cluster, |_| {}).await;
    let client = Client::new();
    let port = free_port();
    let mut dead = topology(cluster);
    dead["groups"][0]["master"] = json!(format!("mysql://root:s3cret@127.0.0.1:{port}/tally"));
    let (status, body) = proxy.put_topology(&client, &dead, 1).await;
    assert_eq!(status, 200, "{body}");

    let reads = [
        ("GET", "/v1/counters/hard/k".to_owned(), None),
        (
            "GET",
            "/v1/counters/hard/k?consistency=strong".to_owned(),
            None,
        ),
        (
            "GET",
            "/v1/counters/hard/k/count?from=2024-01-01T00:00:00Z&to=2024-01-02T00:00:00Z"
                .to_owned(),
            None,
        ),
        ("GET", "/v1/top/hard".to_owned(), None),
        (
            "POST",
            "/v1/counters/query".to_owned(),
            Some(json!({ "ns": "hard", "keys": ["a", "b"] })),
        ),
    ];
    for (method, path, body) in reads {
        let mut req = client
            .raw()
            .request(method.parse().expect("method"), proxy.url(&path));
        if let Some(body) = &body {
            req = req.json(body);
        }
        let resp = req.send().await.expect("read");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        assert_eq!(status, 503, "{method} {path}: {text}");
        let answer: Value = serde_json::from_str(&text).expect("JSON error");
        assert_eq!(answer["error"]["code"], "unavailable", "{text}");
        assert_eq!(
            answer["error"]["message"], "group g0 is unavailable; retry later",
            "{method} {path}"
        );
        for leak in [
            &port.to_string(),
            "127.0.0.1",
            "s3cret",
            "connect",
            "refused",
        ] {
            assert!(
                !text.contains(leak),
                "{method} {path} tells {leak:?}: {text}"
            );
        }
    }
    // Operators still see why.
    let (status, health) = client
        .admin_get(&proxy.admin_url("/admin/v1/health"), TEST_TOKEN)
        .await
        .expect("health");
    assert_eq!(status, 200);
    let master = &health["groups"][0]["master"];
    assert_eq!(master["addr"], format!("127.0.0.1:{port}"), "{health}");
    assert!(master["last_error"].is_string(), "{health}");
    proxy.stop().await.expect("clean stop");
}

/// With no token the admin listener is loopback only, but a web page in
/// an operator's browser can still reach loopback: a form or `fetch` in
/// `no-cors` mode POSTs `text/plain` without a preflight. Body endpoints
/// now require a JSON (or YAML) content type, which a page cannot send
/// cross-origin without a preflight the proxy never grants, and requests
/// a browser marks as coming from a page (`Origin`, `Sec-Fetch-Site`) are
/// refused with 403 `forbidden_origin` before anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_cannot_drive_the_admin_api() {
    let cluster = cluster().await;
    let proxy = TestProxy::start(cluster, |c| c.admin_token = None).await;
    let client = Client::new();
    let doc = topology(cluster);
    let send = |method: &str, path: &str, headers: &[(&str, &str)], body: Option<String>| {
        let mut req = client
            .raw()
            .request(method.parse().expect("method"), proxy.admin_url(path));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(body) = body {
            req = req.body(body);
        }
        async move {
            let resp = req.send().await.expect("admin request");
            let status = resp.status().as_u16();
            let text = resp.text().await.expect("body");
            (
                status,
                serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
            )
        }
    };

    // Bodies a page can send without a preflight are refused.
    let promote = json!({ "replica": "127.0.0.1:1" }).to_string();
    let route = json!({ "ns": "hard", "keys": ["a"] }).to_string();
    let plain = [("content-type", "text/plain")];
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let if_match = [("content-type", "text/plain"), ("if-match", "\"1\"")];
    for (method, path, headers, body) in [
        ("POST", "/admin/v1/groups/g0/promote", &plain[..], &promote),
        ("POST", "/admin/v1/groups/g0/promote", &form[..], &promote),
        ("POST", "/admin/v1/groups/g0/promote", &[][..], &promote),
        ("POST", "/admin/v1/reshard", &plain[..], &doc.to_string()),
        ("PUT", "/admin/v1/topology", &if_match[..], &doc.to_string()),
        ("POST", "/admin/v1/route", &plain[..], &route),
    ] {
        let (status, body) = send(method, path, headers, Some(body.clone())).await;
        assert_eq!(status, 415, "{method} {path} {headers:?}: {body}");
        assert_eq!(body["error"]["code"], "unsupported_media_type", "{body}");
    }
    // JSON, and YAML where a topology is taken, are accepted.
    let (status, body) = send(
        "POST",
        "/admin/v1/route",
        &[("content-type", "application/json")],
        Some(route.clone()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = send(
        "PUT",
        "/admin/v1/topology",
        &[("content-type", "application/yaml"), ("if-match", "\"1\"")],
        Some(cluster.topology_yaml(160)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = send(
        "POST",
        "/admin/v1/route",
        &[("content-type", "application/yaml")],
        Some(route.clone()),
    )
    .await;
    assert_eq!(status, 415, "route takes JSON only: {body}");

    // Whatever a page sends, a browser marks it; those are refused first.
    let json_type = ("content-type", "application/json");
    for (method, path, headers, body) in [
        (
            "POST",
            "/admin/v1/flush",
            vec![("origin", "http://evil.example")],
            None,
        ),
        ("POST", "/admin/v1/reload", vec![("origin", "null")], None),
        (
            "POST",
            "/admin/v1/groups/g0/promote",
            vec![json_type, ("origin", "http://localhost:3000")],
            Some(promote.clone()),
        ),
        (
            "GET",
            "/admin/v1/topology",
            vec![("sec-fetch-site", "cross-site")],
            None,
        ),
        (
            "GET",
            "/admin/v1/health",
            vec![("sec-fetch-site", "same-site")],
            None,
        ),
        (
            "POST",
            "/admin/v1/reshard/cancel",
            vec![("sec-fetch-site", "cross-site")],
            None,
        ),
    ] {
        let (status, answer) = send(method, path, &headers, body).await;
        assert_eq!(status, 403, "{method} {path} {headers:?}: {answer}");
        assert_eq!(answer["error"]["code"], "forbidden_origin", "{answer}");
    }
    // An address typed into the browser is no page's request; tools send
    // none of these headers; /metrics stays open.
    let (status, body) = send(
        "GET",
        "/admin/v1/topology",
        &[("sec-fetch-site", "none")],
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = send("POST", "/admin/v1/flush", &[], None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = send(
        "GET",
        "/metrics",
        &[("origin", "http://evil.example")],
        None,
    )
    .await;
    assert_eq!(status, 200);
    proxy.stop().await.expect("clean stop");
}
