//! The one error type of the harness.
//!
//! Tests, `tally-dev` and the benchmark mostly print these errors and stop, so
//! every variant carries enough context (which node, which query, the tail of
//! the server log) to diagnose a failure without re-running it.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while spawning, driving or stopping servers.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A MariaDB executable is missing; the message tells how to install it.
    #[error(
        "{binary} not found on PATH: install the Debian package `mariadb-server` (apt-get install -y mariadb-server)"
    )]
    BinaryNotFound {
        /// `mariadbd` or `mariadb-install-db`.
        binary: &'static str,
    },

    /// A file system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// `mariadb-install-db` failed to create the template data directory.
    #[error("mariadb-install-db failed ({status}); last output:\n{output}")]
    InstallDb {
        /// Exit status as printed by the OS.
        status: String,
        /// The end of its stdout and stderr.
        output: String,
    },

    /// A `mariadbd` exited or never accepted connections.
    #[error("{node}: mariadbd failed to start: {reason}; last lines of {}:\n{log_tail}", log.display())]
    StartFailed {
        /// Node name, e.g. `g0-master`.
        node: String,
        /// Why the harness gave up.
        reason: String,
        /// The server's log file.
        log: PathBuf,
        /// The last lines of that log written by this start attempt.
        log_tail: String,
    },

    /// A statement sent to a node failed.
    #[error("{node}: `{query}` failed: {source}")]
    Sql {
        /// Node name.
        node: String,
        /// The statement (or a short description of it).
        query: String,
        /// The driver's error.
        #[source]
        source: mysql_async::Error,
    },

    /// A condition was not reached before its deadline.
    #[error("timed out after {waited:?} waiting for {what}{}", last_state(.detail))]
    Timeout {
        /// The awaited condition.
        what: String,
        /// How long the harness waited.
        waited: Duration,
        /// The last observed state, when it helps.
        detail: String,
    },

    /// A replica-only operation was used on a node that replicates from nobody.
    #[error("{node} is not a replica (SHOW SLAVE STATUS is empty)")]
    NotAReplica {
        /// Node name.
        node: String,
    },

    /// The state directory cannot be used for the requested cluster.
    #[error("state directory {}: {problem}", dir.display())]
    StateDir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    /// The spec asks for something the harness cannot build.
    #[error("invalid cluster spec: {0}")]
    InvalidSpec(String),
}

fn last_state(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!("; last state: {detail}")
    }
}

impl HarnessError {
    /// Wraps an I/O error with what the harness was doing.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
