//! Issue #23 item 2 against real MariaDB: DSN and admin passwords read
//! from files (`password_file`), never written back in clear. The proxy
//! connects with them, persists and shows the references, and picks up a
//! rotated secret on `POST /admin/v1/reload`.

use std::time::Duration;

use serde_json::{Value, json};
use tally_harness::{ADMIN_USER, Cluster, ClusterSpec, DATA_USER};
use tally_integration::{Client, TEST_TOKEN, TestProxy, eventually};

const DATA_PW: &str = "d4ta-s3cret-1";
const DATA_PW_ROTATED: &str = "d4ta-s3cret-2";
const ADMIN_PW: &str = "adm1n-s3cret";

async fn set_password(cluster: &Cluster, user: &str, password: &str) {
    for group in cluster.groups() {
        group
            .master
            .exec(&format!(
                "ALTER USER '{user}'@'127.0.0.1' IDENTIFIED BY '{password}'"
            ))
            .await
            .expect("alter user");
    }
    cluster
        .wait_replicas_caught_up()
        .await
        .expect("replicas caught up");
}

/// Writes one event and waits until the counter reads `want`.
async fn write_and_read(client: &Client, proxy: &TestProxy, key: &str, want: i64) {
    let (status, body) = client
        .post_json(
            &proxy.url("/v1/events?ack=committed"),
            &json!({ "ns": "secrets", "key": key, "delta": want }),
        )
        .await
        .expect("write");
    assert_eq!(status, 200, "committed with the file's password: {body}");
    let url = proxy.url(&format!("/v1/counters/secrets/{key}?consistency=strong"));
    eventually(
        Duration::from_secs(10),
        "the counter reads back",
        || async {
            match client.get(&url).await {
                Ok((200, body)) if body["total"] == want => Some(()),
                _ => None,
            }
        },
    )
    .await;
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [DATA_PW, DATA_PW_ROTATED, ADMIN_PW] {
        assert!(!text.contains(secret), "{what} holds a secret: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_connects_with_passwords_from_files_and_never_writes_them_back() {
    // A private cluster: its users get passwords.
    let cluster = Cluster::start(ClusterSpec::default())
        .await
        .expect("cluster");
    set_password(&cluster, DATA_USER, DATA_PW).await;
    set_password(&cluster, ADMIN_USER, ADMIN_PW).await;

    let dir = tempfile::tempdir().expect("temp dir");
    let data_file = dir.path().join("data.pw").display().to_string();
    let admin_file = dir.path().join("admin.pw").display().to_string();
    std::fs::write(&data_file, format!("{DATA_PW}\n")).expect("write");
    std::fs::write(&admin_file, ADMIN_PW).expect("write");
    let topology = cluster
        .topology_yaml(160)
        .lines()
        .map(|line| {
            if line.contains("mysql://") {
                format!("{line}?password_file={data_file}\n")
            } else if line == format!("  user: {ADMIN_USER}") {
                format!("{line}\n  password_file: {admin_file}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect::<String>();

    let proxy = TestProxy::start_with_topology(&topology, |_| {}).await;
    let client = Client::new();
    write_and_read(&client, &proxy, "a", 1).await;

    // GET shows the references as written, no secret and no `***`.
    let (status, shown) = client
        .admin_get(&proxy.admin_url("/admin/v1/topology"), TEST_TOKEN)
        .await
        .expect("get topology");
    assert_eq!(status, 200, "{shown}");
    let text = shown.to_string();
    assert_no_secret("GET /admin/v1/topology", &text);
    assert!(!text.contains("***"), "{text}");
    let master = shown["groups"][0]["master"].as_str().expect("master");
    assert!(
        master.ends_with(&format!("?password_file={data_file}")),
        "{master}"
    );
    assert_eq!(shown["admin"]["password_file"], json!(admin_file));

    // A rotation: the account's password and the file change together;
    // a reload reads the file again (a new version, new pools) and the
    // persisted file holds the references only.
    set_password(&cluster, DATA_USER, DATA_PW_ROTATED).await;
    std::fs::write(&data_file, format!("{DATA_PW_ROTATED}\n")).expect("write");
    let (status, body) = client
        .admin_post(&proxy.admin_url("/admin/v1/reload"), TEST_TOKEN)
        .await
        .expect("reload");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], json!(2), "{body}");
    let file = std::fs::read_to_string(&proxy.topology_file).expect("file");
    assert_no_secret("the persisted topology file", &file);
    assert!(
        file.contains(&format!("?password_file={data_file}")),
        "{file}"
    );
    assert!(
        file.contains(&format!("password_file: {admin_file}")),
        "{file}"
    );
    assert!(file.contains("version: 2"), "{file}");
    write_and_read(&client, &proxy, "b", 2).await;

    // A PUT naming an unreadable file: 422 naming the path, nothing
    // changes.
    let mut doc: Value = shown.clone();
    let missing = dir.path().join("missing.pw").display().to_string();
    doc["groups"][0]["master"] = json!(master.replace(&data_file, &missing));
    let (status, body) = proxy.put_topology(&client, &doc, 2).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["problems"][0]["path"], "groups[0].master");
    let message = body["error"]["problems"][0]["message"]
        .as_str()
        .expect("message");
    assert!(message.contains(&missing), "{message}");
    assert_no_secret("a 422 answer", &body.to_string());
    assert_eq!(proxy.topology_version(&client).await, Some(2));
    write_and_read(&client, &proxy, "c", 3).await;

    proxy.stop().await.expect("clean stop");
    cluster.shutdown().await;
}
