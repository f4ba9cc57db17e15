//! The real `tallyctl` binary against a stub admin API.
//!
//! The stub (axum on 127.0.0.1:0) records every request and answers with
//! what each test scripts, so these tests pin the CLI's side of the contract
//! (SPEC §3): paths, headers, bodies, percent-encoding, messages and exit
//! codes. The end-to-end run against the real proxy lives with the
//! integration suites.

use std::collections::HashMap;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// One request as the stub saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: Option<String>,
    headers: HashMap<String, String>,
    body: String,
}

/// What the stub answers.
struct Answer {
    status: u16,
    body: String,
    delay: Duration,
}

fn ok(body: Value) -> Answer {
    answer(200, body)
}

fn answer(status: u16, body: Value) -> Answer {
    Answer {
        status,
        body: body.to_string(),
        delay: Duration::ZERO,
    }
}

fn error(status: u16, code: &str, message: &str) -> Answer {
    answer(
        status,
        json!({ "error": { "code": code, "message": message } }),
    )
}

type Handler = Arc<dyn Fn(&Seen) -> Answer + Send + Sync>;

struct StubState {
    handler: Handler,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// A stub admin API on its own thread and runtime; stops when dropped.
struct Stub {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stub {
    fn start(handler: impl Fn(&Seen) -> Answer + Send + Sync + 'static) -> Stub {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(StubState {
            handler: Arc::new(handler),
            seen: seen.clone(),
        });
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("stub runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind stub");
                addr_tx
                    .send(listener.local_addr().expect("stub addr"))
                    .expect("send addr");
                let app = Router::new().fallback(record).with_state(state);
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("stub serve");
            });
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("stub started");
        Stub {
            url: format!("http://{addr}"),
            seen,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen lock").clone()
    }

    fn only(&self, method: &str) -> Vec<Seen> {
        self.requests()
            .into_iter()
            .filter(|s| s.method == method)
            .collect()
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn record(
    State(state): State<Arc<StubState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let seen = Seen {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    v.to_str().unwrap_or("<binary>").to_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    state.seen.lock().expect("seen lock").push(seen.clone());
    let a = (state.handler)(&seen);
    if !a.delay.is_zero() {
        tokio::time::sleep(a.delay).await;
    }
    let status = StatusCode::from_u16(a.status).expect("status");
    (status, [("content-type", "application/json")], a.body).into_response()
}

/// Runs tallyctl with `TALLY_ADMIN_URL=url` and no token from the
/// environment of whoever runs the tests.
fn tallyctl(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tallyctl"))
        .args(args)
        .env("TALLY_ADMIN_URL", url)
        .env_remove("TALLY_ADMIN_TOKEN")
        .output()
        .expect("run tallyctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code, not a signal")
}

/// The current topology as the proxy shows it: version 7, two groups,
/// passwords redacted.
fn current_topology() -> Value {
    json!({
        "version": 7,
        "vnodes": 160,
        "groups": [
            { "name": "g0", "weight": 1,
              "master": "mysql://app:***@127.0.0.1:3307/tally",
              "replicas": ["mysql://app:***@127.0.0.1:3308/tally"] },
            { "name": "g1", "weight": 1,
              "master": "mysql://root@127.0.0.1:3309/tally",
              "replicas": [] }
        ]
    })
}

/// A stub serving the current topology and answering PUT with `put`.
fn topology_stub(put: impl Fn(&Seen) -> Answer + Send + Sync + 'static) -> Stub {
    Stub::start(move |req| match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/admin/v1/topology") => ok(current_topology()),
        ("PUT", "/admin/v1/topology") => put(req),
        _ => error(404, "not_found", "no such route"),
    })
}

/// The current topology plus a third group and a replica; g0 keeps its
/// redacted password, the new group has a real one.
const THREE_GROUPS: &str = "
version: 1
vnodes: 160
groups:
  - name: g0
    weight: 1
    master: mysql://app:***@127.0.0.1:3307/tally
    replicas:
      - mysql://app:***@127.0.0.1:3308/tally
  - name: g1
    master: mysql://root@127.0.0.1:3309/tally
    replicas: [ 'mysql://root@127.0.0.1:3310/tally' ]
  - name: g2
    master: mysql://app:n3w%20pw@127.0.0.1:3311/tally
";

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp file");
    std::io::Write::write_all(&mut f, text.as_bytes()).expect("write temp file");
    f
}

fn path(f: &tempfile::NamedTempFile) -> &str {
    f.path().to_str().expect("utf-8 temp path")
}

#[test]
fn topology_show_prints_a_table_and_sends_the_token() {
    let stub = topology_stub(|_| error(500, "internal", "unused"));
    let out = tallyctl(&stub.url, &["--token", "s3cret", "topology", "show"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("topology version 7, 160 vnodes"), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    let header = lines
        .iter()
        .find(|l| l.starts_with("NAME"))
        .expect("header row");
    assert!(
        header
            .split_whitespace()
            .eq(["NAME", "WEIGHT", "MASTER", "REPLICAS"]),
        "{header}"
    );
    let g0 = lines.iter().find(|l| l.starts_with("g0")).expect("g0 row");
    assert!(
        g0.split_whitespace().eq([
            "g0",
            "1",
            "mysql://app:***@127.0.0.1:3307/tally",
            "mysql://app:***@127.0.0.1:3308/tally"
        ]),
        "{g0}"
    );
    let g1 = lines.iter().find(|l| l.starts_with("g1")).expect("g1 row");
    assert!(g1.ends_with(" -"), "no replicas shown as '-': {g1}");
    let reqs = stub.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        reqs[0].headers.get("authorization").map(String::as_str),
        Some("Bearer s3cret")
    );
}

#[test]
fn apply_previews_the_diff_and_puts_with_if_match_of_the_current_version() {
    let stub = topology_stub(|_| ok(json!({ "version": 8 })));
    let f = file(THREE_GROUPS);
    let out = tallyctl(&stub.url, &["topology", "apply", path(&f)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("groups added:     g2 (weight 1)"), "{text}");
    assert!(
        text.contains("replicas added:   g1 +127.0.0.1:3310"),
        "{text}"
    );
    assert!(text.contains("% of the hash space"), "{text}");
    assert!(
        text.trim_end().ends_with("applied: topology version 8"),
        "{text}"
    );
    assert!(!text.contains("n3w"), "a password was printed: {text}");

    let puts = stub.only("PUT");
    assert_eq!(puts.len(), 1, "{:?}", stub.requests());
    let put = &puts[0];
    assert_eq!(put.path, "/admin/v1/topology");
    assert_eq!(
        put.headers.get("if-match").map(String::as_str),
        Some("\"7\"")
    );
    assert_eq!(
        put.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    let body: Value = serde_json::from_str(&put.body).expect("JSON body");
    assert_eq!(body["vnodes"], 160);
    let groups = body["groups"].as_array().expect("groups array");
    let names: Vec<&str> = groups.iter().filter_map(|g| g["name"].as_str()).collect();
    assert_eq!(names, ["g0", "g1", "g2"]);
    // `***` stays `***` (keep the current password); a real one is sent.
    assert_eq!(groups[0]["master"], "mysql://app:***@127.0.0.1:3307/tally");
    assert_eq!(
        groups[2]["master"],
        "mysql://app:n3w%20pw@127.0.0.1:3311/tally"
    );
    assert_eq!(
        groups[1]["replicas"][0],
        "mysql://root@127.0.0.1:3310/tally"
    );
    assert_eq!(groups[2]["weight"], 1);
}

#[test]
fn apply_with_pinned_version_and_json_sends_only_the_put() {
    let stub = topology_stub(|_| ok(json!({ "version": 6 })));
    let f = file(THREE_GROUPS);
    let out = tallyctl(
        &stub.url,
        &["--json", "topology", "apply", "--if-match", "5", path(&f)],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let printed: Value = serde_json::from_str(&stdout(&out)).expect("stdout is JSON");
    assert_eq!(printed, json!({ "version": 6 }));
    let reqs = stub.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].method, "PUT");
    assert_eq!(
        reqs[0].headers.get("if-match").map(String::as_str),
        Some("\"5\"")
    );
}

#[test]
fn apply_of_an_invalid_file_lists_every_problem_and_sends_nothing() {
    let stub = topology_stub(|_| ok(json!({ "version": 8 })));
    let f = file(
        "
vnodes: 0
colour: blue
groups:
  - name: G0
    master: mysql://root@127.0.0.1:3307/tally
  - name: g1
    weight: 0
    master: mysql://root@127.0.0.1:3307/tally
",
    );
    let out = tallyctl(&stub.url, &["topology", "apply", path(&f)]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let err = stderr(&out);
    for expected in [
        "5 problems",
        "  - colour: unknown key",
        "  - vnodes: must be",
        "  - groups[0].name: ",
        "  - groups[1].weight: must be 1..=1000, got 0",
        "  - groups[1].master: server 127.0.0.1:3307 is already used",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(stub.requests().is_empty(), "{:?}", stub.requests());
}

#[test]
fn a_missing_file_is_a_local_error() {
    let stub = topology_stub(|_| ok(json!({ "version": 8 })));
    let out = tallyctl(
        &stub.url,
        &["topology", "diff", "/nonexistent/topology.yaml"],
    );
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("cannot read /nonexistent/topology.yaml"));
    assert!(stub.requests().is_empty());
}

#[test]
fn unauthorized_says_how_to_pass_the_token() {
    let stub = Stub::start(|_| error(401, "unauthorized", "missing or wrong bearer token"));
    let out = tallyctl(&stub.url, &["health"]);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("unauthorized: set TALLY_ADMIN_TOKEN or --token"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    // No token given: no Authorization header at all.
    assert!(!stub.requests()[0].headers.contains_key("authorization"));
}

#[test]
fn version_conflict_says_the_topology_changed() {
    let stub =
        topology_stub(|_| error(409, "version_conflict", "expected version 7, current is 8"));
    let f = file(THREE_GROUPS);
    let out = tallyctl(&stub.url, &["topology", "apply", path(&f)]);
    assert_eq!(code(&out), 1);
    let err = stderr(&out);
    assert!(
        err.contains("the topology changed since it was read"),
        "{err}"
    );
    assert!(err.contains("re-run"), "{err}");
    assert!(err.contains("current is 8"), "{err}");
}

#[test]
fn reshard_required_prints_the_server_message() {
    let stub = topology_stub(|_| {
        error(
            409,
            "reshard_required",
            "adding group g2 moves 33% of keys; use POST /admin/v1/reshard",
        )
    });
    let f = file(THREE_GROUPS);
    let out = tallyctl(&stub.url, &["topology", "apply", path(&f)]);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("adding group g2 moves 33% of keys; use POST /admin/v1/reshard"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn invalid_topology_from_the_server_lists_every_problem() {
    let stub = topology_stub(|_| {
        answer(
            422,
            json!({ "error": {
                "code": "invalid_topology",
                "message": "3 problems",
                "problems": [
                    { "path": "groups[2].master", "message": "cannot connect: access denied" },
                    { "path": "groups[1].replicas[0]", "message": "server unreachable" },
                    { "path": "", "message": "a whole-document problem" }
                ]
            }}),
        )
    });
    let f = file(THREE_GROUPS);
    let out = tallyctl(&stub.url, &["topology", "apply", path(&f)]);
    assert_eq!(code(&out), 1);
    let err = stderr(&out);
    for expected in [
        "3 problems",
        "\n  - groups[2].master: cannot connect: access denied",
        "\n  - groups[1].replicas[0]: server unreachable",
        "\n  - a whole-document problem",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

#[test]
fn unreachable_admin_api_exits_3_with_a_hint() {
    // A port that was just free: connection refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = tallyctl(&url, &["topology", "show"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot reach the admin API at {url}")),
        "{err}"
    );
    assert!(
        err.contains("is the proxy running? set TALLY_ADMIN_URL"),
        "{err}"
    );
}

#[test]
fn route_percent_encodes_spaces_and_slashes() {
    let stub = Stub::start(|_| ok(json!({ "group": "g1", "version": 7 })));
    let out = tallyctl(&stub.url, &["route", "views", "video/BV1x 2&x=1"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim_end(),
        "views/video/BV1x 2&x=1 -> g1 (topology version 7)"
    );
    let req = &stub.requests()[0];
    assert_eq!(req.path, "/admin/v1/route");
    assert_eq!(
        req.query.as_deref(),
        Some("ns=views&key=video%2FBV1x%202%26x%3D1")
    );
}

#[test]
fn json_prints_the_raw_answer_for_success_and_errors() {
    let health = json!({ "groups": [ { "name": "g0",
        "master": { "addr": "127.0.0.1:3307", "up": true, "last_error": null },
        "replicas": [] } ] });
    let body = health.clone();
    let stub = Stub::start(move |req| match req.path.as_str() {
        "/admin/v1/health" => ok(body.clone()),
        _ => error(
            503,
            "unavailable",
            "group g0 unreachable; data stays queued",
        ),
    });
    let out = tallyctl(&stub.url, &["health", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let printed: Value = serde_json::from_str(&stdout(&out)).expect("stdout is JSON");
    assert_eq!(printed, health);

    let out = tallyctl(&stub.url, &["--json", "flush"]);
    assert_eq!(code(&out), 1);
    let printed: Value = serde_json::from_str(&stdout(&out)).expect("error stdout is JSON");
    assert_eq!(printed["error"]["code"], "unavailable");
    assert!(
        stderr(&out).contains("server error 503 unavailable: group g0 unreachable"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn diff_shows_changes_and_the_moved_fraction_without_applying() {
    let stub = topology_stub(|_| ok(json!({ "version": 8 })));
    let f = file(THREE_GROUPS);
    let out = tallyctl(&stub.url, &["topology", "diff", path(&f)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("changes from topology version 7"), "{text}");
    assert!(text.contains("groups added:     g2 (weight 1)"), "{text}");
    let moving = text
        .lines()
        .find(|l| l.starts_with("keys moving:"))
        .expect("keys moving line");
    let pct: f64 = moving
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.strip_suffix('%'))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no percentage in {moving:?}"));
    assert!((25.0..42.0).contains(&pct), "{moving}");
    // The `***` passwords of g0 equal the server's `***`: no DSN change.
    assert!(!text.contains("dsn changed"), "{text}");
    assert!(text.contains("password changes are not listed"), "{text}");
    assert!(stub.only("PUT").is_empty(), "diff must not apply");

    let out = tallyctl(&stub.url, &["topology", "diff", "--json", path(&f)]);
    let d: Value = serde_json::from_str(&stdout(&out)).expect("diff --json");
    assert_eq!(d["from_version"], 7);
    assert_eq!(d["moves_keys"], true);
    let fraction = d["moved_fraction"].as_f64().expect("moved_fraction");
    assert!(
        (pct / 100.0 - fraction).abs() < 0.001,
        "{fraction} vs {pct}%"
    );
}

#[test]
fn diff_against_an_identical_file_says_no_changes() {
    let stub = topology_stub(|_| ok(json!({ "version": 8 })));
    let same = serde_json::to_string(&current_topology()).expect("json");
    let f = file(&same);
    let out = tallyctl(&stub.url, &["topology", "diff", path(&f)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("no changes"), "{}", stdout(&out));
    assert!(!stdout(&out).contains("keys moving"), "{}", stdout(&out));
}

#[test]
fn health_reports_down_nodes_but_exits_0() {
    let stub = Stub::start(|_| {
        ok(json!({ "groups": [ { "name": "g0",
            "master": { "addr": "127.0.0.1:3307", "up": true, "last_error": null },
            "replicas": [
                { "addr": "127.0.0.1:3308", "up": false, "lag_seconds": null,
                  "io_running": false, "sql_running": false,
                  "last_error": "Can't connect to server" },
                { "addr": "127.0.0.1:3309", "up": true, "lag_seconds": 3,
                  "io_running": true, "sql_running": true, "last_error": null }
            ] } ] }))
    });
    let out = tallyctl(&stub.url, &["health"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    let header = text.lines().next().expect("header");
    assert!(
        header
            .split_whitespace()
            .eq(["GROUP", "ROLE", "ADDR", "UP", "LAG", "ERROR"]),
        "{header}"
    );
    let down = text
        .lines()
        .find(|l| l.contains("127.0.0.1:3308"))
        .expect("3308 row");
    assert!(down.contains("Can't connect to server"), "{down}");
    assert_eq!(text.trim_end().lines().last(), Some("1 of 3 nodes down"));
}

#[test]
fn flush_and_reload_report_their_results() {
    let stub = Stub::start(|req| match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/admin/v1/flush") => ok(json!({ "flushed_rows": 42 })),
        ("POST", "/admin/v1/reload") => ok(json!({ "version": 9, "changed": true })),
        _ => error(404, "not_found", "no such route"),
    });
    let out = tallyctl(&stub.url, &["flush"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out).trim_end(), "flushed 42 rows");
    let out = tallyctl(&stub.url, &["reload"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim_end(),
        "reloaded: topology version 9 (changed)"
    );
}

#[test]
fn a_server_that_does_not_answer_in_time_is_a_failure_not_unreachable() {
    let stub = Stub::start(|_| Answer {
        delay: Duration::from_secs(3),
        ..ok(json!({ "flushed_rows": 1 }))
    });
    let started = std::time::Instant::now();
    let out = tallyctl(&stub.url, &["--timeout", "300ms", "flush"]);
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "timeout ignored"
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("may still complete"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_unexpected_answer_shape_is_a_clear_failure() {
    let stub = Stub::start(|_| ok(json!({ "owner": "g1" })));
    let out = tallyctl(&stub.url, &["route", "views", "k"]);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("unexpected route response"),
        "{}",
        stderr(&out)
    );
}

/// `completions bash` needs no server and prints a script that completes
/// every subcommand.
#[test]
fn completions_print_a_script_for_every_subcommand() {
    // An unreachable URL: completions must not try to connect.
    let out = tallyctl("http://127.0.0.1:1", &["completions", "bash"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let script = stdout(&out);
    assert!(
        script.contains("_tallyctl()"),
        "not a bash completion script"
    );
    for sub in [
        "topology",
        "show",
        "diff",
        "apply",
        "route",
        "health",
        "flush",
        "reload",
        "proxies",
        "promote",
        "completions",
    ] {
        assert!(script.contains(sub), "bash script does not mention {sub}");
    }
    for shell in ["zsh", "fish"] {
        let out = tallyctl("http://127.0.0.1:1", &["completions", shell]);
        assert_eq!(code(&out), 0, "{shell}: {}", stderr(&out));
        assert!(stdout(&out).contains("promote"), "{shell} script");
    }
    let out = tallyctl("http://127.0.0.1:1", &["completions", "tcsh"]);
    assert_eq!(code(&out), 2, "an unknown shell is a usage error");
}

/// Every subcommand's `--help` shows an example and the exit codes.
#[test]
fn every_subcommand_help_has_an_example_and_the_exit_codes() {
    let commands: &[&[&str]] = &[
        &[],
        &["topology"],
        &["topology", "show"],
        &["topology", "diff"],
        &["topology", "apply"],
        &["route"],
        &["health"],
        &["flush"],
        &["reload"],
        &["proxies"],
        &["promote"],
        &["completions"],
    ];
    for cmd in commands {
        let mut args = cmd.to_vec();
        args.push("--help");
        let out = tallyctl("http://127.0.0.1:1", &args);
        assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
        let help = stdout(&out);
        assert!(
            help.contains("Example"),
            "{args:?} --help has no example:\n{help}"
        );
        assert!(
            help.contains("Exit codes:") && help.contains("3  cannot reach the admin API"),
            "{args:?} --help lacks the exit codes:\n{help}"
        );
    }
}
