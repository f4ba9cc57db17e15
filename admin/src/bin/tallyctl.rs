//! `tallyctl`: the operator CLI. Everything but argument parsing lives in
//! [`tally_admin::cli`], where it is documented and tested (exit codes: 0
//! success, 1 server refused/failed, 2 usage or local input error, 3 admin
//! API unreachable).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tally_admin::cli::run(tally_admin::cli::Args::parse())
}
