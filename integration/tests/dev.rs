//! `cargo dev` as a new user runs it: the ready line, a working system,
//! Ctrl-C leaving nothing behind, and the state directory reused next time.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tally_integration::{Client, KillOnDrop};

const BIN: &str = env!("CARGO_BIN_EXE_tally-dev");

struct Ready {
    http: String,
    admin: String,
    token: String,
}

fn start(state_dir: &Path, extra: &[&str]) -> (KillOnDrop, Ready) {
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args([
                "--http",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--state-dir",
            ])
            .arg(state_dir)
            .args(extra)
            .env_remove("TALLY_ADMIN_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tally-dev"),
    );
    let stdout = child.stdout.take().expect("stdout");
    let started = Instant::now();
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read ready line");
    // The documented format, exactly.
    let parts: Vec<&str> = line.trim_end().split(' ').collect();
    assert_eq!(parts.len(), 5, "ready line: {line:?}");
    assert_eq!(&parts[..2], ["tally-dev", "ready"], "{line:?}");
    let field = |i: usize, name: &str| {
        parts[i]
            .strip_prefix(&format!("{name}="))
            .unwrap_or_else(|| panic!("{name}= missing in {line:?}"))
            .to_owned()
    };
    let ready = Ready {
        http: field(2, "http"),
        admin: field(3, "admin"),
        token: field(4, "token"),
    };
    assert!(ready.token.len() >= 16, "generated token too short");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "ready after {:?}",
        started.elapsed()
    );
    (child, ready)
}

fn stop(mut child: KillOnDrop) {
    // SAFETY: kill(2) on the pid of our own, still unreaped child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert_eq!(status.code(), Some(0), "tally-dev exit status");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "tally-dev did not stop within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `mariadbd` processes whose command line mentions `needle` (our state
/// directory).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("mariadbd") && c.contains(needle))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cargo_dev_runs_the_system_and_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let (child, ready) = start(&state, &["--groups", "2", "--replicas", "1"]);
    let client = Client::new();

    let (status, _) = client
        .get(&format!("http://{}/readyz", ready.http))
        .await
        .expect("readyz");
    assert_eq!(status, 200);
    let (status, metrics) = client
        .get(&format!("http://{}/metrics", ready.admin))
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics.lines().any(|l| l.starts_with("tally_")),
        "{metrics}"
    );
    let (status, body) = client
        .post_json(
            &format!("http://{}/v1/events", ready.http),
            &json!([{ "ns": "views", "key": "BV1x", "delta": 3 }, { "ns": "views", "key": "BV1x" }]),
        )
        .await
        .expect("write");
    assert_eq!(
        (status, body),
        (200, json!({ "accepted": 2, "ack": "buffered" }))
    );
    let (status, body) = client
        .get(&format!(
            "http://{}/v1/counters/views/BV1x?consistency=strong",
            ready.http
        ))
        .await
        .expect("read");
    assert_eq!((status, body["total"].clone()), (200, json!(4)));
    let (status, _) = client
        .admin_post(
            &format!("http://{}/admin/v1/flush", ready.admin),
            &ready.token,
        )
        .await
        .expect("flush");
    assert_eq!(status, 200);
    assert_eq!(
        processes_mentioning(&state.to_string_lossy()).len(),
        4,
        "2 masters + 2 replicas running"
    );

    stop(child);
    let left = processes_mentioning(&state.to_string_lossy());
    assert!(left.is_empty(), "processes left behind: {left:#?}");

    // The state directory is reused: the count survives a restart.
    let (child, ready) = start(&state, &["--groups", "2", "--replicas", "1"]);
    let (_, body) = client
        .get(&format!(
            "http://{}/v1/counters/views/BV1x?consistency=strong",
            ready.http
        ))
        .await
        .expect("read after restart");
    assert_eq!(body["total"], 4, "data kept across restarts");
    stop(child);
    assert!(processes_mentioning(&state.to_string_lossy()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cargo_dev_runs_several_proxies_on_one_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let (child, ready) = start(
        &state,
        &["--groups", "1", "--replicas", "1", "--proxies", "3"],
    );
    let https: Vec<&str> = ready.http.split(',').collect();
    let admins: Vec<&str> = ready.admin.split(',').collect();
    assert_eq!(
        (https.len(), admins.len()),
        (3, 3),
        "{} / {}",
        ready.http,
        ready.admin
    );
    let client = Client::new();
    for h in &https {
        let (status, _) = client
            .get(&format!("http://{h}/readyz"))
            .await
            .expect("readyz");
        assert_eq!(status, 200, "{h}");
    }
    let (status, body) = client
        .admin_get(
            &format!("http://{}/admin/v1/proxies", admins[2]),
            &ready.token,
        )
        .await
        .expect("proxies");
    assert_eq!(status, 200, "{body}");
    let listed: Vec<&str> = body["proxies"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|p| p["http"].as_str())
        .collect();
    for h in &https {
        assert!(listed.contains(h), "{h} missing from {body}");
    }
    // A write through one proxy is read through another (strong: master).
    let (status, _) = client
        .post_json(
            &format!("http://{}/v1/events?ack=committed", https[0]),
            &json!({ "ns": "multi", "key": "k", "delta": 9 }),
        )
        .await
        .expect("write");
    assert_eq!(status, 200);
    let (_, body) = client
        .get(&format!(
            "http://{}/v1/counters/multi/k?consistency=strong",
            https[2]
        ))
        .await
        .expect("read");
    assert_eq!(body["total"], 9);

    // Issue #22: 200 events with ids posted four times through
    // alternating proxies (committed and buffered), and one plain request
    // retried three times under one Idempotency-Key, count once each.
    let events: Vec<serde_json::Value> = (0..200)
        .map(|i| json!({ "ns": "idem", "key": format!("k{}", i % 7), "delta": 1 + i % 3, "id": format!("ev-{i}") }))
        .collect();
    let events = serde_json::Value::Array(events);
    for round in 0..4 {
        let ack = if round % 2 == 0 {
            "committed"
        } else {
            "buffered"
        };
        let url = format!("http://{}/v1/events?ack={ack}", https[round % 2]);
        let (status, body) = client.post_json(&url, &events).await.expect("write");
        assert_eq!(status, 200, "{body}");
        if round == 2 {
            assert_eq!(body["duplicates"], 200, "{body}");
        }
    }
    for round in 0..3 {
        let resp = client
            .raw()
            .post(format!(
                "http://{}/v1/events?ack=committed",
                https[round % 3]
            ))
            .header("Idempotency-Key", "dev-retry-1")
            .json(&json!([{ "ns": "idem", "key": "plain", "delta": 5 }]))
            .send()
            .await
            .expect("write");
        assert_eq!(resp.status().as_u16(), 200);
    }
    for a in &admins {
        let (status, body) = client
            .admin_post(&format!("http://{a}/admin/v1/flush"), &ready.token)
            .await
            .expect("flush");
        assert_eq!(status, 200, "{body}");
    }
    let mut want = std::collections::BTreeMap::new();
    for i in 0..200 {
        *want.entry(format!("k{}", i % 7)).or_insert(0) += 1 + i % 3;
    }
    want.insert("plain".to_owned(), 5);
    for (key, total) in want {
        let (_, body) = client
            .get(&format!(
                "http://{}/v1/counters/idem/{key}?consistency=strong",
                https[2]
            ))
            .await
            .expect("read");
        assert_eq!(body["total"], total, "{key}");
    }
    stop(child);
    assert!(processes_mentioning(&state.to_string_lossy()).is_empty());
}
