//! Human-readable output of `tallyctl`: tables and error messages.
//!
//! Kept apart from the commands so the text an operator reads can be tested
//! without a server, and so `--json` (which bypasses all of this) and the
//! tables never drift into each other.

use serde::Deserialize;

use super::CliError;
use crate::dsn::Dsn;
use crate::topology::{Topology, TopologyDoc};

/// A left-aligned text table; columns are separated by two spaces and the
/// last column is not padded (no trailing blanks).
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: Vec<&'static str>) -> Self {
        Table {
            header,
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut text = String::new();
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(columns) {
                if i + 1 == columns {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }
}

/// `topology show`: a version/vnodes line, then one row per group.
pub fn topology(doc: &TopologyDoc) -> String {
    let mut table = Table::new(vec!["NAME", "WEIGHT", "MASTER", "REPLICAS"]);
    for g in &doc.groups {
        let replicas = if g.replicas.is_empty() {
            "-".to_owned()
        } else {
            g.replicas.join(", ")
        };
        table.row(vec![
            g.name.clone(),
            g.weight.to_string(),
            g.master.clone(),
            replicas,
        ]);
    }
    format!(
        "topology version {}, {} vnodes per unit of weight, {} group{}\n\n{}",
        doc.version,
        doc.vnodes,
        doc.groups.len(),
        if doc.groups.len() == 1 { "" } else { "s" },
        table.render()
    )
}

/// The `GET /admin/v1/health` answer. `up` and `addr` are required so a
/// changed shape fails loudly instead of showing nodes as down.
#[derive(Debug, Deserialize)]
pub struct Health {
    pub groups: Vec<GroupHealth>,
}

#[derive(Debug, Deserialize)]
pub struct GroupHealth {
    pub name: String,
    pub master: NodeHealth,
    #[serde(default)]
    pub replicas: Vec<NodeHealth>,
}

#[derive(Debug, Deserialize)]
pub struct NodeHealth {
    pub addr: String,
    pub up: bool,
    /// Replicas only; `None` when unknown (replication stopped, node down).
    #[serde(default)]
    pub lag_seconds: Option<f64>,
    #[serde(default)]
    pub io_running: Option<bool>,
    #[serde(default)]
    pub sql_running: Option<bool>,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// `health`: GROUP ROLE ADDR UP LAG ERROR, then a summary line.
pub fn health(h: &Health) -> String {
    let mut table = Table::new(vec!["GROUP", "ROLE", "ADDR", "UP", "LAG", "ERROR"]);
    let (mut total, mut down) = (0usize, 0usize);
    for g in &h.groups {
        let nodes =
            std::iter::once(("master", &g.master)).chain(g.replicas.iter().map(|r| ("replica", r)));
        for (role, n) in nodes {
            total += 1;
            if !n.up {
                down += 1;
            }
            let lag = match (role, n.lag_seconds) {
                ("master", _) => "-".to_owned(),
                (_, Some(s)) => format!("{s}s"),
                (_, None) => "?".to_owned(),
            };
            // A stopped replication thread is an error even when the server
            // itself answers, so it is shown next to any reported error.
            let mut errors = Vec::new();
            if n.io_running == Some(false) {
                errors.push("replication IO thread not running".to_owned());
            }
            if n.sql_running == Some(false) {
                errors.push("replication SQL thread not running".to_owned());
            }
            if let Some(e) = n.last_error.as_deref().filter(|e| !e.is_empty()) {
                errors.push(e.replace('\n', " "));
            }
            table.row(vec![
                g.name.clone(),
                role.to_owned(),
                n.addr.clone(),
                if n.up { "yes" } else { "NO" }.to_owned(),
                lag,
                if errors.is_empty() {
                    "-".to_owned()
                } else {
                    errors.join("; ")
                },
            ]);
        }
    }
    let summary = if down > 0 {
        format!("{down} of {total} nodes down")
    } else {
        format!("all {total} nodes up")
    };
    format!("{}{summary}", table.render())
}

/// The server shows passwords as `***`, so a diff cannot see a password
/// change; say so when the file carries real passwords.
pub fn password_note(file: &Topology) -> Option<String> {
    let real = |d: &Dsn| d.password.is_some() && !d.password_is_redacted();
    let any = file
        .groups
        .iter()
        .flat_map(|g| std::iter::once(&g.master).chain(&g.replicas))
        .any(real);
    any.then(|| {
        "note: the server shows passwords as ***, so password changes are not listed; \
         apply sends the file's passwords as written"
            .to_owned()
    })
}

/// The message for a failed command, for stderr.
pub fn error(e: &CliError) -> String {
    match e {
        CliError::Usage(msg) => format!("tallyctl: {msg}"),
        CliError::InvalidFile { file, invalid } => {
            let n = invalid.problems.len();
            let mut text = format!(
                "tallyctl: {file} is not a valid topology ({n} problem{}); nothing was sent:",
                plural(n)
            );
            for p in &invalid.problems {
                text.push_str(&format!("\n  - {p}"));
            }
            text
        }
        CliError::Unreachable { url, detail } => format!(
            "tallyctl: cannot reach the admin API at {url}: {detail} \
             (is the proxy running? set TALLY_ADMIN_URL or --url)"
        ),
        CliError::Timeout { url, detail } => format!(
            "tallyctl: no answer from the admin API at {url} within --timeout: {detail}; \
             the request may still complete on the server"
        ),
        CliError::BadResponse(msg) => format!("tallyctl: {msg}"),
        CliError::Server { status, error, .. } => match (*status, error.code.as_str()) {
            (401, _) | (_, "unauthorized") => {
                "tallyctl: unauthorized: set TALLY_ADMIN_TOKEN or --token".to_owned()
            }
            (_, "version_conflict") => format!(
                "tallyctl: version conflict: the topology changed since it was read ({}); \
                 re-run the command to see and apply the change against the current version",
                error.message
            ),
            (_, "reshard_required") => format!("tallyctl: reshard required: {}", error.message),
            (_, "replica_behind") => format!("tallyctl: refused: {}", error.message),
            (_, "promotion_failed") => format!("tallyctl: {}", error.message),
            (_, "invalid_topology") if !error.problems.is_empty() => {
                let n = error.problems.len();
                let mut text = format!(
                    "tallyctl: the server rejected the topology ({n} problem{}):",
                    plural(n)
                );
                for p in &error.problems {
                    if p.path.is_empty() {
                        text.push_str(&format!("\n  - {}", p.message));
                    } else {
                        text.push_str(&format!("\n  - {}: {}", p.path, p.message));
                    }
                }
                text
            }
            (404, "not_found") => format!(
                "tallyctl: server error 404 not_found: {} (is this proxy older than tallyctl?)",
                error.message
            ),
            (status, code) => format!("tallyctl: server error {status} {code}: {}", error.message),
        },
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::client::{ServerError, ServerProblem};

    #[test]
    fn tables_align_columns_without_trailing_blanks() {
        let mut t = Table::new(vec!["A", "LONGER", "C"]);
        t.row(vec!["xxxx".into(), "y".into(), "".into()]);
        assert_eq!(t.render(), "A     LONGER  C\nxxxx  y\n");
    }

    #[test]
    fn health_counts_down_nodes_and_shows_unknown_lag() {
        let h: Health = serde_json::from_str(
            r#"{"groups":[{"name":"g0",
                "master":{"addr":"127.0.0.1:3307","up":true,"last_error":null},
                "replicas":[
                  {"addr":"127.0.0.1:3308","up":false,"lag_seconds":null,"io_running":false,
                   "sql_running":true,"last_error":"connection refused"},
                  {"addr":"127.0.0.1:3309","up":true,"lag_seconds":2,"io_running":true,
                   "sql_running":true,"last_error":null}]}]}"#,
        )
        .expect("health shape");
        let text = health(&h);
        assert!(text.ends_with("1 of 3 nodes down"), "{text}");
        let down = text
            .lines()
            .find(|l| l.contains("3308"))
            .expect("row for 3308");
        assert!(down.contains(" NO "), "{down}");
        assert!(down.contains(" ? "), "{down}");
        assert!(
            down.contains("IO thread not running; connection refused"),
            "{down}"
        );
        assert!(text.contains("2s"), "{text}");
    }

    #[test]
    fn every_server_problem_is_listed() {
        let e = CliError::Server {
            status: 422,
            error: ServerError {
                code: "invalid_topology".into(),
                message: "2 problems".into(),
                problems: vec![
                    ServerProblem {
                        path: "groups[0].weight".into(),
                        message: "must be 1..=1000, got 0".into(),
                    },
                    ServerProblem {
                        path: "groups[1].master".into(),
                        message: "a DSN is required".into(),
                    },
                ],
            },
            raw_json: None,
        };
        let text = error(&e);
        assert!(text.contains("2 problems"), "{text}");
        assert!(
            text.contains("\n  - groups[0].weight: must be 1..=1000, got 0"),
            "{text}"
        );
        assert!(
            text.contains("\n  - groups[1].master: a DSN is required"),
            "{text}"
        );
    }
}
