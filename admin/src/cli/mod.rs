//! `tallyctl`, the operator CLI over the admin HTTP API (SPEC §3).
//!
//! It lives in the library, not in the binary, so the argument model, the
//! rendering and the exit-code mapping can be unit-tested and reused; the
//! binary only parses arguments and calls [`run`].
//!
//! Topology files are validated locally with the same code the proxy uses
//! ([`crate::TopologyDoc::parse_and_validate`]) before anything is sent, and
//! changes are previewed with [`crate::diff`], so an operator sees every
//! mistake and every consequence before the server is asked.
//!
//! # Exit codes
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | success (also: `health` with nodes down, `topology diff` with differences: both are reports) |
//! | 1 | the server refused or failed (any 4xx/5xx, an unreadable answer, or no answer within `--timeout`) |
//! | 2 | usage or local input error (bad arguments, unreadable or invalid topology file); nothing was sent |
//! | 3 | the admin API cannot be reached (connection refused, unknown host, connect timeout) |
//!
//! `--json` prints the server's JSON answer verbatim on stdout (also for
//! error answers), so scripts can branch on the exit code and parse stdout;
//! human messages always go to stderr. Every command's `--help` shows
//! examples and these exit codes; `tallyctl completions <bash|zsh|fish>`
//! prints a completion script generated from the same argument model.

pub mod client;
pub mod commands;
pub mod render;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::problems::Invalid;
use client::ServerError;

/// Where the admin API listens by default (SPEC §3); also used when
/// `TALLY_ADMIN_URL` is set but empty.
pub const DEFAULT_URL: &str = "http://127.0.0.1:9090";

/// The exit codes, appended to every command's `--help` (they are the
/// contract scripts rely on, so each help page states them).
macro_rules! exit_codes {
    () => {
        "Exit codes:
  0  success (health and diff report problems/differences but still exit 0)
  1  the server refused or failed (4xx/5xx, unreadable answer, --timeout hit)
  2  usage or local input error (bad arguments, invalid topology file)
  3  cannot reach the admin API (is the proxy running? set TALLY_ADMIN_URL)"
    };
}

/// `after_help` of a command: its examples, then the exit codes.
macro_rules! help {
    ($examples:literal) => {
        concat!($examples, "\n\n", exit_codes!())
    };
}

/// Appended to `tallyctl --help`: one example per command, exit codes.
const AFTER_HELP: &str = help!(
    "Examples:
  tallyctl topology show
  tallyctl topology diff topology.yaml
  tallyctl topology apply topology.yaml
  tallyctl topology apply --if-match 7 topology.yaml
  tallyctl route views 'video/BV1x 2'
  tallyctl health
  tallyctl flush
  tallyctl reshard start three-groups.yaml
  tallyctl reshard status
  tallyctl reload
  tallyctl proxies
  tallyctl promote g0 10.0.0.7:3306
  tallyctl completions bash > /etc/bash_completion.d/tallyctl
  TALLY_ADMIN_URL=http://10.0.0.5:9090 TALLY_ADMIN_TOKEN=... tallyctl --json health
  tallyctl --url https://127.0.0.1:9090 --ca /etc/tally/ca.pem health"
);

/// Shells `tallyctl completions` writes scripts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

impl From<CompletionShell> for clap_complete::Shell {
    fn from(s: CompletionShell) -> Self {
        match s {
            CompletionShell::Bash => clap_complete::Shell::Bash,
            CompletionShell::Zsh => clap_complete::Shell::Zsh,
            CompletionShell::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// Operate a tally proxy through its admin API.
#[derive(Debug, Parser)]
#[command(
    name = "tallyctl",
    version,
    about = "Operate a tally proxy through its admin API",
    long_about = "Operate a tally proxy through its admin HTTP API: inspect and change the \
                  topology (validated and diffed locally first), look up which group owns a \
                  key, check the health of every MariaDB node, flush pending counts, reload \
                  the topology file.",
    after_help = AFTER_HELP
)]
pub struct Args {
    /// Base URL of the proxy's admin listener.
    #[arg(long, env = "TALLY_ADMIN_URL", default_value = DEFAULT_URL, global = true)]
    pub url: String,

    /// Bearer token for /admin/v1 (the proxy reads it from TALLY_ADMIN_TOKEN too).
    #[arg(long, env = "TALLY_ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,

    /// CA certificate(s), PEM, to verify an https:// admin listener with
    /// (instead of the system's roots; `cargo dev --tls` prints its `ca=`).
    #[arg(long, env = "TALLY_ADMIN_CA", value_name = "FILE", global = true)]
    pub ca: Option<std::path::PathBuf>,

    /// Print the server's raw JSON answer instead of a table (for scripts).
    #[arg(long, global = true)]
    pub json: bool,

    /// Give up on a request after this long (`30s`, `500ms`, `2m`, or seconds).
    #[arg(long, default_value = "30s", value_parser = parse_timeout, global = true)]
    pub timeout: Duration,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show, diff or apply the topology (groups, weights, servers).
    #[command(
        subcommand,
        after_help = help!(
            "Examples:
  tallyctl topology show
  tallyctl topology diff topology.yaml
  tallyctl topology apply --if-match 7 topology.yaml"
        )
    )]
    Topology(TopologyCommand),

    /// Show which group owns a counter.
    #[command(after_help = help!(
        "Example:
  tallyctl route views 'video/BV1x 2'
  views/video/BV1x 2 -> g1 (topology version 7)"
    ))]
    Route {
        /// Namespace, e.g. `views`.
        ns: String,
        /// Counter key (any characters; sent percent-encoded).
        key: String,
    },

    /// Report every master and replica: up, replication lag, last error.
    #[command(after_help = help!(
        "Example:
  tallyctl health

Exits 0 even when nodes are down (it is a report); the last line then says how many."
    ))]
    Health,

    /// Flush every pending aggregate to MariaDB and wait until committed.
    #[command(after_help = help!(
        "Example:
  tallyctl flush
  flushed 1234 rows"
    ))]
    Flush,

    /// Make the proxy re-read its topology file.
    #[command(after_help = help!(
        "Example:
  tallyctl reload
  reloaded: topology version 8 (changed)"
    ))]
    Reload,

    /// List the proxies sharing the topology store: address, version, pending
    /// rows, and whether their heartbeat is recent.
    #[command(after_help = help!(
        "Example:
  tallyctl proxies

Without a shared store (topology.store) the proxy lists only itself."
    ))]
    Proxies,

    /// Promote a replica to master of its group (planned switchover when the
    /// master answers, emergency failover when it is down).
    #[command(after_help = help!(
        "Example:
  tallyctl promote g0 10.0.0.7:3306
  promoted 10.0.0.7:3306 in g0 (planned, 412 ms): topology version 9

An emergency promotion refuses a replica that is behind another one (it would lose
transactions); --force promotes it anyway."
    ))]
    Promote {
        /// The group, e.g. `g0`.
        group: String,
        /// The replica's `host:port`, as `tallyctl topology show` lists it.
        replica: String,
        /// Promote even if another replica has received more transactions.
        #[arg(long)]
        force: bool,
    },

    /// Add, remove or reweight groups online: start a reshard, follow it,
    /// cancel it before cutover.
    #[command(
        subcommand,
        after_help = help!(
            "Examples:
  tallyctl reshard start three-groups.yaml
  tallyctl reshard status
  tallyctl reshard cancel"
        )
    )]
    Reshard(ReshardCommand),

    /// Print a shell completion script (needs no proxy).
    #[command(after_help = help!(
        "Examples:
  tallyctl completions bash > /etc/bash_completion.d/tallyctl
  tallyctl completions zsh > \"${fpath[1]}/_tallyctl\"
  tallyctl completions fish > ~/.config/fish/completions/tallyctl.fish"
    ))]
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: CompletionShell,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReshardCommand {
    /// Start a reshard to the topology in FILE (validated locally first);
    /// prints the plan: which groups give which share of keys to which.
    #[command(after_help = help!(
        "Example:
  tallyctl topology show --json > three-groups.json   # then add group g2
  tallyctl reshard start three-groups.json
  reshard r1764000000-1a2b started (topology version 12): 33.4% of keys move
    g0 -> g2  16.8%  (57 ranges)
    g1 -> g2  16.6%  (55 ranges)

Writes switch to the new owners at once; reads stay exact throughout."
    ))]
    Start {
        /// The target topology (the format of config/topology.yaml), e.g. with a group added.
        file: std::path::PathBuf,
    },
    /// Show the running reshard (state, plan, progress, rows copied, rate,
    /// ETA, verification) or how the last one ended: done, cancelled or
    /// failed, the same from every proxy.
    #[command(after_help = help!(
        "Example:
  tallyctl reshard status
  tallyctl --json reshard status"
    ))]
    Status,
    /// Cancel the running reshard before cutover (while copying): copies are
    /// undone and the original topology comes back, counts exact.
    #[command(after_help = help!(
        "Example:
  tallyctl reshard cancel

Refused (exit 1) once the reshard is verified and cleaning up."
    ))]
    Cancel,
}

#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Show the current topology (passwords are shown as ***).
    #[command(after_help = help!(
        "Examples:
  tallyctl topology show
  tallyctl --json topology show"
    ))]
    Show,

    /// Compare a topology file with the current topology; exits 0 either way.
    #[command(after_help = help!(
        "Example:
  tallyctl topology diff topology.yaml

The server shows passwords as ***; a *** in FILE means \"unchanged\", and password
changes cannot be seen from here."
    ))]
    Diff {
        /// The topology YAML file (the format of config/topology.yaml).
        file: PathBuf,
    },

    /// Validate a topology file, show what changes, and apply it.
    #[command(after_help = help!(
        "Examples:
  tallyctl topology apply topology.yaml
  tallyctl topology apply --if-match 7 topology.yaml

The file is validated locally first: every problem is listed and nothing is sent if any
is found (exit 2). The change is sent with If-Match: \"<version>\" so a concurrent
change is refused (409) instead of overwritten. A DSN password of *** keeps the server's
current password."
    ))]
    Apply {
        /// The topology YAML file (the format of config/topology.yaml).
        file: PathBuf,
        /// Apply only if the current topology version is VERSION (default: the
        /// version read just before applying).
        #[arg(long, value_name = "VERSION")]
        if_match: Option<u64>,
    },
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s).map_err(|e| format!("{e} (try 30s or 500ms)"))?,
    };
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

/// Everything that can stop a command, each with its exit code.
#[derive(Debug)]
pub enum CliError {
    /// Bad arguments or local environment (exit 2).
    Usage(String),
    /// The topology file does not validate (exit 2); nothing was sent.
    InvalidFile { file: String, invalid: Invalid },
    /// No connection to the admin API (exit 3).
    Unreachable { url: String, detail: String },
    /// Connected, but no answer within `--timeout` (exit 1): the request may
    /// still take effect.
    Timeout { url: String, detail: String },
    /// The server answered 4xx/5xx (exit 1). `raw_json` is the body when it
    /// was JSON, printed with `--json`.
    Server {
        status: u16,
        error: ServerError,
        raw_json: Option<String>,
    },
    /// The server's answer could not be understood (exit 1).
    BadResponse(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::InvalidFile { .. } => 2,
            CliError::Unreachable { .. } => 3,
            CliError::Timeout { .. } | CliError::Server { .. } | CliError::BadResponse(_) => 1,
        }
    }
}

/// Runs one command: output on stdout, messages on stderr, and the exit
/// code documented in the module docs.
pub fn run(args: Args) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tallyctl: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = runtime.block_on(commands::execute(&args, &mut out));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let (
                true,
                CliError::Server {
                    raw_json: Some(raw),
                    ..
                },
            ) = (args.json, &e)
            {
                // A broken stdout pipe is not worth a second error.
                let _ = writeln!(out, "{}", raw.trim_end());
            }
            let _ = out.flush();
            eprintln!("{}", render::error(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn argument_model_is_consistent() {
        Args::command().debug_assert();
    }

    /// Every command, nested ones included, shows an example and the exit
    /// codes in its help.
    #[test]
    fn every_command_documents_an_example_and_the_exit_codes() {
        fn walk(cmd: &clap::Command, path: &str, seen: &mut usize) {
            let help = cmd
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            assert!(help.contains("Example"), "{path}: no example");
            assert!(help.contains("Exit codes:"), "{path}: no exit codes");
            *seen += 1;
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), seen);
            }
        }
        let mut seen = 0;
        walk(&Args::command(), "tallyctl", &mut seen);
        // tallyctl, topology + 3, route, health, flush, reload, proxies,
        // promote, reshard + 3, completions.
        assert_eq!(seen, 16);
    }

    #[test]
    fn timeouts_accept_units_and_plain_seconds() {
        assert_eq!(parse_timeout("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("7"), Ok(Duration::from_secs(7)));
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("soon").is_err());
    }

    #[test]
    fn globals_may_follow_the_command() {
        let args = Args::try_parse_from([
            "tallyctl",
            "health",
            "--json",
            "--url",
            "http://h:1",
            "--timeout",
            "2s",
        ])
        .expect("parses");
        assert!(args.json);
        assert_eq!(args.url, "http://h:1");
        assert_eq!(args.timeout, Duration::from_secs(2));
    }

    #[test]
    fn exit_codes_follow_the_contract() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        let unreachable = CliError::Unreachable {
            url: "u".into(),
            detail: "d".into(),
        };
        assert_eq!(unreachable.exit_code(), 3);
        assert_eq!(CliError::BadResponse("x".into()).exit_code(), 1);
    }
}
