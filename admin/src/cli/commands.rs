//! One function per `tallyctl` command: which requests it makes, in which
//! order, and what it prints.
//!
//! Local work (reading and validating a topology file) always happens before
//! the first request, so an invalid file never reaches the server.

use std::io::Write;
use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::client::{AdminClient, Reply, encode_query_value};
use super::render;
use super::{
    Args, CliError, Command, CompletionShell, DEFAULT_URL, ReshardCommand, TopologyCommand,
};
use crate::diff::diff;
use crate::topology::{Topology, TopologyDoc};

const TOPOLOGY: &str = "/admin/v1/topology";

/// Runs the command in `args`, writing its output to `out`.
pub async fn execute(args: &Args, out: &mut dyn Write) -> Result<(), CliError> {
    // Completions need neither a URL nor a server.
    if let Command::Completions { shell } = args.command {
        return completions(shell, out);
    }
    // Read the file first: its problems are reported even when the URL or
    // the server is wrong too, and nothing is sent for an invalid file.
    let file = match &args.command {
        Command::Topology(TopologyCommand::Apply { file, .. } | TopologyCommand::Diff { file })
        | Command::Reshard(ReshardCommand::Start { file }) => {
            Some((file.as_path(), load_file(file)?))
        }
        _ => None,
    };
    // An exported but empty TALLY_ADMIN_URL means "not set", as for the token.
    let url = if args.url.trim().is_empty() {
        DEFAULT_URL
    } else {
        args.url.trim()
    };
    let client = AdminClient::new(url, args.token.as_deref(), args.timeout, args.ca.as_deref())?;
    match (&args.command, file) {
        (Command::Topology(TopologyCommand::Show), _) => show(&client, args.json, out).await,
        (Command::Topology(TopologyCommand::Diff { .. }), Some((path, new))) => {
            diff_file(&client, path, &new, args.json, out).await
        }
        (Command::Topology(TopologyCommand::Apply { if_match, .. }), Some((path, new))) => {
            apply(&client, path, &new, *if_match, args.json, out).await
        }
        (Command::Topology(_), None) => Err(CliError::Usage("missing topology file".into())),
        (Command::Route { ns, key }, _) => route(&client, ns, key, args.json, out).await,
        (Command::Health, _) => health(&client, args.json, out).await,
        (Command::Flush, _) => flush(&client, args.json, out).await,
        (Command::Reload, _) => reload(&client, args.json, out).await,
        (Command::Proxies, _) => proxies(&client, args.json, out).await,
        (Command::Reshard(ReshardCommand::Start { .. }), Some((_, target))) => {
            reshard_start(&client, &target, args.json, out).await
        }
        (Command::Reshard(ReshardCommand::Start { .. }), None) => {
            Err(CliError::Usage("missing topology file".into()))
        }
        (Command::Reshard(ReshardCommand::Status), _) => {
            reshard_status(&client, args.json, out).await
        }
        (Command::Reshard(ReshardCommand::Cancel), _) => {
            let reply = client.post("/admin/v1/reshard/cancel").await?;
            if args.json {
                raw(out, &reply);
            } else {
                let v: Value = reply.parse("reshard cancel")?;
                say(
                    out,
                    &format!(
                        "reshard {} is cancelling (topology version {}): copies are undone, then new writes move back",
                        v["id"].as_str().unwrap_or("?"),
                        v["version"]
                    ),
                );
            }
            Ok(())
        }
        (
            Command::Promote {
                group,
                replica,
                force,
            },
            _,
        ) => promote(&client, group, replica, *force, args.json, out).await,
        (Command::Completions { .. }, _) => Ok(()),
    }
}

/// Writes the completion script for `shell`. clap_complete panics when its
/// writer fails, so the script is rendered into memory first and written
/// like any other output (a closed stdout is not an error).
fn completions(shell: CompletionShell, out: &mut dyn Write) -> Result<(), CliError> {
    let mut script = Vec::new();
    clap_complete::generate(
        clap_complete::Shell::from(shell),
        &mut <Args as clap::CommandFactory>::command(),
        "tallyctl",
        &mut script,
    );
    let _ = out.write_all(&script);
    Ok(())
}

/// Writes text, ignoring a closed stdout (`tallyctl health | head -1`): the
/// reader went away, which is not the command's failure.
fn say(out: &mut dyn Write, text: &str) {
    let _ = out.write_all(text.as_bytes());
    if !text.ends_with('\n') {
        let _ = out.write_all(b"\n");
    }
}

fn raw(out: &mut dyn Write, reply: &Reply) {
    say(out, reply.raw.trim_end());
}

/// Shows a reply: as received with `--json`, else parsed as `T` (`what`
/// names it when the body does not fit) and written as `text` makes it.
fn present<T: DeserializeOwned>(
    out: &mut dyn Write,
    reply: &Reply,
    json: bool,
    what: &str,
    text: impl FnOnce(T) -> String,
) -> Result<(), CliError> {
    if json {
        raw(out, reply);
    } else {
        say(out, &text(reply.parse(what)?));
    }
    Ok(())
}

fn load_file(path: &Path) -> Result<Topology, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    TopologyDoc::parse_and_validate(&text).map_err(|invalid| CliError::InvalidFile {
        file: path.display().to_string(),
        invalid,
    })
}

/// The server's current topology, validated with the same rules as a file
/// (its passwords read `***`, which parse as a password).
async fn current(client: &AdminClient) -> Result<Topology, CliError> {
    let doc: TopologyDoc = client.get(TOPOLOGY).await?.parse("topology")?;
    doc.validate().map_err(|invalid| {
        CliError::BadResponse(format!(
            "the server's current topology does not validate in this tallyctl: {invalid}"
        ))
    })
}

async fn show(client: &AdminClient, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let reply = client.get(TOPOLOGY).await?;
    present(out, &reply, json, "topology", |doc: TopologyDoc| {
        render::topology(&doc)
    })
}

async fn diff_file(
    client: &AdminClient,
    path: &Path,
    new: &Topology,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let old = current(client).await?;
    let d = diff(&old, new);
    if json {
        let mut v = json!(d);
        if let Value::Object(map) = &mut v {
            map.insert("from_version".into(), json!(old.version));
            map.insert("moves_keys".into(), json!(d.moves_keys()));
            map.insert("is_empty".into(), json!(d.is_empty()));
        }
        say(out, &v.to_string());
        return Ok(());
    }
    say(
        out,
        &format!(
            "changes from topology version {} to {}:",
            old.version,
            path.display()
        ),
    );
    say(out, &d.to_string());
    if let Some(note) = render::password_note(new) {
        say(out, &note);
    }
    Ok(())
}

async fn apply(
    client: &AdminClient,
    path: &Path,
    new: &Topology,
    if_match: Option<u64>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    // The current topology is needed for its version and for the preview;
    // with both a pinned version and --json there is nothing to read.
    let expected = match (if_match, json) {
        (Some(v), true) => v,
        _ => {
            let old = current(client).await?;
            if !json {
                say(
                    out,
                    &format!(
                        "changes from topology version {} to {}:",
                        old.version,
                        path.display()
                    ),
                );
                say(out, &diff(&old, new).to_string());
                if let Some(note) = render::password_note(new) {
                    say(out, &note);
                }
            }
            if_match.unwrap_or(old.version)
        }
    };
    // The body is the GET shape with the file's real passwords (a `***`
    // stays `***`, which the server reads as "keep the current one").
    let mut doc = new.to_doc(false);
    doc.version = expected;
    let reply = client.put(TOPOLOGY, &json!(doc), expected).await?;
    #[derive(Deserialize)]
    struct Applied {
        version: u64,
    }
    present(out, &reply, json, "apply", |applied: Applied| {
        format!("applied: topology version {}", applied.version)
    })
}

async fn route(
    client: &AdminClient,
    ns: &str,
    key: &str,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let path = format!(
        "/admin/v1/route?ns={}&key={}",
        encode_query_value(ns),
        encode_query_value(key)
    );
    let reply = client.get(&path).await?;
    #[derive(Deserialize)]
    struct Route {
        group: String,
        version: u64,
    }
    present(out, &reply, json, "route", |r: Route| {
        format!("{ns}/{key} -> {} (topology version {})", r.group, r.version)
    })
}

async fn health(client: &AdminClient, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let reply = client.get("/admin/v1/health").await?;
    present(out, &reply, json, "health", |h: render::Health| {
        render::health(&h)
    })
}

async fn flush(client: &AdminClient, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let reply = client.post("/admin/v1/flush").await?;
    #[derive(Deserialize)]
    struct Flushed {
        flushed_rows: u64,
    }
    present(out, &reply, json, "flush", |f: Flushed| {
        format!("flushed {} rows", f.flushed_rows)
    })
}

async fn proxies(client: &AdminClient, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let reply = client.get("/admin/v1/proxies").await?;
    if json {
        raw(out, &reply);
        return Ok(());
    }
    #[derive(Deserialize)]
    struct Proxy {
        id: String,
        http: String,
        admin: String,
        version: u64,
        pending: u64,
        last_seen_ms: u64,
        alive: bool,
    }
    #[derive(Deserialize)]
    struct Proxies {
        proxies: Vec<Proxy>,
    }
    let list: Proxies = reply.parse("proxies")?;
    let mut text = format!(
        "{:<40} {:<22} {:<22} {:>7} {:>9} {:>10} STATE\n",
        "ID", "HTTP", "ADMIN", "VERSION", "PENDING", "SEEN"
    );
    for p in &list.proxies {
        text += &format!(
            "{:<40} {:<22} {:<22} {:>7} {:>9} {:>8}ms {}\n",
            p.id,
            p.http,
            p.admin,
            p.version,
            p.pending,
            p.last_seen_ms,
            if p.alive { "alive" } else { "gone" }
        );
    }
    let gone = list.proxies.iter().filter(|p| !p.alive).count();
    text += &format!("{} proxies, {gone} gone", list.proxies.len());
    say(out, &text);
    Ok(())
}

async fn promote(
    client: &AdminClient,
    group: &str,
    replica: &str,
    force: bool,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let body = serde_json::json!({ "replica": replica, "force": force });
    let path = format!(
        "/admin/v1/groups/{}/promote",
        crate::cli::client::encode_query_value(group)
    );
    let reply = client.post_json(&path, &body).await?;
    #[derive(Deserialize)]
    struct Promoted {
        version: u64,
        master: String,
        mode: String,
        took_ms: u64,
    }
    present(out, &reply, json, "promote", |p: Promoted| {
        format!(
            "promoted {} in {group} ({}, {} ms): topology version {}",
            p.master, p.mode, p.took_ms, p.version
        )
    })
}

async fn reload(client: &AdminClient, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let reply = client.post("/admin/v1/reload").await?;
    #[derive(Deserialize)]
    struct Reloaded {
        version: u64,
        changed: bool,
    }
    present(out, &reply, json, "reload", |r: Reloaded| {
        format!(
            "reloaded: topology version {} ({})",
            r.version,
            if r.changed { "changed" } else { "unchanged" }
        )
    })
}

fn pct(v: &Value) -> String {
    format!("{:.1}%", v.as_f64().unwrap_or(0.0) * 100.0)
}

fn plan_lines(v: &Value) -> String {
    let mut text = String::new();
    for m in v["moves"].as_array().into_iter().flatten() {
        text += &format!(
            "  {} -> {}  {}  ({} ranges)\n",
            m["source"].as_str().unwrap_or("?"),
            m["target"].as_str().unwrap_or("?"),
            pct(&m["fraction"]),
            m["ranges"]
        );
    }
    text
}

async fn reshard_start(
    client: &AdminClient,
    target: &Topology,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let body = serde_json::to_value(target.to_doc(false))
        .map_err(|e| CliError::Usage(format!("cannot encode the topology: {e}")))?;
    let reply = client.post_json("/admin/v1/reshard", &body).await?;
    present(out, &reply, json, "reshard start", |v: Value| {
        format!(
            "reshard {} started (topology version {}): {} of keys move\n{}follow it with: tallyctl reshard status",
            v["id"].as_str().unwrap_or("?"),
            v["version"],
            pct(&v["fraction"]),
            plan_lines(&v)
        )
    })
}

async fn reshard_status(
    client: &AdminClient,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let reply = client.get("/admin/v1/reshard").await?;
    if json {
        raw(out, &reply);
        return Ok(());
    }
    let v: Value = reply.parse("reshard status")?;
    if v["active"] != json!(true) {
        let last = match v["last"].as_object() {
            Some(l) => format!(
                "; last: {} {}{}{}",
                l.get("id").and_then(Value::as_str).unwrap_or("?"),
                // `outcome`: proxies from before the outcome was persisted.
                l.get("state")
                    .or_else(|| l.get("outcome"))
                    .and_then(Value::as_str)
                    .unwrap_or("?"),
                match l.get("reverted_by").and_then(Value::as_str) {
                    Some(r) => format!(", rolled back by {r}"),
                    None => String::new(),
                },
                match l.get("error").and_then(Value::as_str) {
                    Some(e) => format!(": {e}"),
                    None => String::new(),
                }
            ),
            None => String::new(),
        };
        say(
            out,
            &format!(
                "no reshard in progress (topology version {}){last}",
                v["version"]
            ),
        );
        return Ok(());
    }
    let copied = match v["progress"].as_f64() {
        Some(_) => format!(", {} copied", pct(&v["progress"])),
        None => String::new(),
    };
    let mut text = format!(
        "reshard {}: {} (topology version {}, routing switched at {}){}\n{} of keys move{copied}\n{}",
        v["id"].as_str().unwrap_or("?"),
        v["state"]
            .as_str()
            .or_else(|| v["phase"].as_str())
            .unwrap_or("?"),
        v["version"],
        v["since"],
        match v["reverts"].as_str() {
            Some(r) => format!(", undoing {r}"),
            None => String::new(),
        },
        pct(&v["fraction"]),
        plan_lines(&v)
    );
    if v["state"] == "failed"
        && let Some(e) = v["last"]["error"].as_str()
    {
        text += &format!("{e}\ncancel it to roll it back: tallyctl reshard cancel\n");
    }
    let d = &v["driver"];
    if d.is_object() {
        text += &format!(
            "driver: {} ({})\ncopied: {} of {} rows, {} rows/s, ETA {}s\n",
            d["proxy"].as_str().unwrap_or("?"),
            d["step"].as_str().unwrap_or("?"),
            d["rows_copied"],
            d["rows_total"],
            d["rows_per_sec"],
            d["eta_seconds"]
        );
        if let Some(w) = d["waiting_for"].as_array().filter(|w| !w.is_empty()) {
            text += &format!(
                "waiting for {} proxies to settle the new routing\n",
                w.len()
            );
        }
        if let Some(e) = d["last_error"].as_str() {
            text += &format!("last error: {e}\n");
        }
    } else {
        text += "driver: another proxy (ask the proxy holding the reshard lease for rates)\n";
    }
    for x in v["verified"].as_array().into_iter().flatten() {
        text += &format!(
            "verified {} -> {}: source {} counters / sum {}, copied {} / {}\n",
            x["source"].as_str().unwrap_or("?"),
            x["target"].as_str().unwrap_or("?"),
            x["source_counters"],
            x["source_sum"],
            x["copied_counters"],
            x["copied_sum"]
        );
    }
    say(out, text.trim_end());
    Ok(())
}
