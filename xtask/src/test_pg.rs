//! `cargo xtask test-pg`: the Postgres tests, on `DATABASE_URL` or on a throwaway cluster.
//!
//! [`run_with_postgres`] is shared with `cargo xtask test`, which runs every test this way.

use std::process::Command;

use anyhow::Result;

use crate::pg::Server;
use crate::services::Extras;
use crate::test::{Totals, run_tests};
use crate::{cargo, run_step};

/// The packages whose tests need Postgres.
const PG_PACKAGES: [&str; 8] =
    ["-p", "adapter-pg", "-p", "invalidation-listener", "-p", "lookup-cli", "-p", "lookup-bench"];

/// Runs the Postgres tests. Extra arguments are passed to `cargo test`.
pub(crate) fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "cargo xtask test-pg [CARGO TEST ARGS]: the tests of {}, on $DATABASE_URL or on a \
             throwaway Postgres cluster (then also the server-restart tests)",
            PG_PACKAGES
                .iter()
                .filter(|word| **word != "-p")
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(());
    }
    let mut test = cargo();
    test.arg("test").args(PG_PACKAGES).arg("--locked").args(args);
    let mut totals = Totals::default();
    let result = run_with_postgres("cargo test (Postgres crates)", test, args, &mut totals);
    totals.finish("xtask test-pg", result)
}

/// Runs `tests` (a `cargo test` command, `args` being the user's part of it) and then the
/// server-restart tests, both with `DATABASE_URL` set, adding their results to `totals`.
///
/// The database is `$DATABASE_URL` when set, else a cluster started here and always stopped
/// and removed before this returns. The restart tests are `#[ignore]`d, so that the main run
/// never restarts the server under its other tests, and run one at a time; they run only on
/// a server xtask may restart: its own, or one `$DEFLOOKUP_PG_RESTART` says how to restart.
pub(crate) fn run_with_postgres(
    title: &str,
    tests: Command,
    args: &[String],
    totals: &mut Totals,
) -> Result<()> {
    let database = Server::from_env_or_start()?;
    // On clusters of our own, also a TLS-only cluster and a PgBouncer (dropped, so stopped,
    // before the main cluster).
    let extras = match &database {
        // A failure to start explains itself (each prints its own log).
        Server::Ephemeral(pg) => Some(Extras::start(pg)?),
        Server::Given { .. } => None,
    };
    let configure = |command: &mut Command| {
        database.configure(command);
        match &extras {
            Some(extras) => {
                extras.configure(command);
                command.env_remove("DEFLOOKUP_USER_DATABASE");
            }
            // The TLS and PgBouncer tests are skipped (they say so) on the user's server.
            None => {
                command.env("DEFLOOKUP_USER_DATABASE", "1");
            }
        }
    };
    let result = run_on(&database, &configure, title, tests, args, totals);
    database.explain_failure(&result);
    // Stop the servers now, so that the caller's summary is the last line.
    drop(extras);
    drop(database);
    result
}

/// The two runs of [`run_with_postgres`] on `database`.
fn run_on(
    database: &Server,
    configure: &dyn Fn(&mut Command),
    title: &str,
    mut tests: Command,
    args: &[String],
    totals: &mut Totals,
) -> Result<()> {
    configure(&mut tests);
    run_tests(title, tests, totals)?;
    if args.is_empty() {
        // The documented wiring must keep working: run it on the same database.
        let mut example = cargo();
        example.args(["run", "-q", "--locked", "-p", "invalidation-listener"]);
        example.args(["--example", "service"]);
        configure(&mut example);
        run_step(
            "the Postgres wiring example (invalidation-listener/examples/service.rs)",
            example,
        )?;
    }
    if database.restart_command().is_none() {
        eprintln!(
            "xtask: skipped the server-restart tests: DATABASE_URL names a server that xtask \
             must not restart (set DEFLOOKUP_PG_RESTART to a shell command restarting it to \
             run them)"
        );
        return Ok(());
    }
    let mut restart_tests = restart_tests_command(args);
    configure(&mut restart_tests);
    let mut restart_totals = Totals::default();
    let title = "cargo test (server-restart tests, one at a time)";
    let result = run_tests(title, restart_tests, &mut restart_totals);
    totals.add_ignored_run(restart_totals);
    result
}

/// `cargo test` of the ignored server-restart tests, keeping the user's cargo options and
/// test filters but not those that would clash with `--ignored --test-threads=1`.
fn restart_tests_command(args: &[String]) -> Command {
    let (cargo_args, harness_args) = match args.iter().position(|a| a == "--") {
        Some(dashes) => (&args[..dashes], &args[dashes + 1..]),
        None => (args, &[][..]),
    };
    let clashes = |a: &&String| {
        a.starts_with("--test-threads") || *a == "--ignored" || *a == "--include-ignored"
    };
    let mut command = cargo();
    command.args(["test", "-p", "invalidation-listener", "--test", "listener", "--locked"]);
    command.args(cargo_args).args(["--", "--ignored", "--test-threads=1"]);
    command.args(harness_args.iter().filter(|a| !clashes(a)));
    command
}
