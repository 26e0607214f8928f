//! `cargo xtask test-pg`: the Postgres tests, on `DATABASE_URL` or on a throwaway cluster.
//!
//! [`run_with_postgres`] is shared with `cargo xtask test`, which runs every test this way.

use std::process::Command;

use anyhow::Result;

use crate::pg::EphemeralPg;
use crate::test::{Totals, run_tests};
use crate::{cargo, interrupted};

/// The packages whose tests need Postgres.
const PG_PACKAGES: [&str; 6] =
    ["-p", "adapter-pg", "-p", "invalidation-listener", "-p", "lookup-cli"];

/// Runs the Postgres tests. Extra arguments are passed to `cargo test`.
pub fn run(args: &[String]) -> Result<()> {
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
pub fn run_with_postgres(
    title: &str,
    tests: Command,
    args: &[String],
    totals: &mut Totals,
) -> Result<()> {
    let database = TestDatabase::from_env_or_start()?;
    let result = run_on(&database, title, tests, args, totals);
    if let (Err(_), TestDatabase::Ephemeral(pg)) = (&result, &database) {
        if !interrupted() {
            pg.print_log_tail();
        }
    }
    // Stop the cluster now, so that the caller's summary is the last line.
    drop(database);
    result
}

/// The two runs of [`run_with_postgres`] on `database`.
fn run_on(
    database: &TestDatabase,
    title: &str,
    mut tests: Command,
    args: &[String],
    totals: &mut Totals,
) -> Result<()> {
    database.configure(&mut tests);
    run_tests(title, tests, totals)?;
    if database.restart_command().is_none() {
        eprintln!(
            "xtask: skipped the server-restart tests: DATABASE_URL names a server that xtask \
             must not restart (set DEFLOOKUP_PG_RESTART to a shell command restarting it to \
             run them)"
        );
        return Ok(());
    }
    let mut restart_tests = restart_tests_command(args);
    database.configure(&mut restart_tests);
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

/// Where the Postgres tests connect.
#[derive(Debug)]
enum TestDatabase {
    /// `$DATABASE_URL`, and `$DEFLOOKUP_PG_RESTART` if set.
    Given { url: String, restart: Option<String> },
    /// A cluster of our own.
    Ephemeral(EphemeralPg),
}

impl TestDatabase {
    fn from_env_or_start() -> Result<Self> {
        let non_empty = |name| std::env::var(name).ok().filter(|value| !value.is_empty());
        match non_empty("DATABASE_URL") {
            Some(url) => {
                // Not the URL itself: it may hold a password.
                eprintln!("xtask: using the Postgres server of $DATABASE_URL");
                Ok(TestDatabase::Given { url, restart: non_empty("DEFLOOKUP_PG_RESTART") })
            }
            None => Ok(TestDatabase::Ephemeral(EphemeralPg::start()?)),
        }
    }

    fn restart_command(&self) -> Option<String> {
        match self {
            TestDatabase::Given { restart, .. } => restart.clone(),
            TestDatabase::Ephemeral(pg) => Some(pg.restart_command()),
        }
    }

    /// Points a test command at this database.
    fn configure(&self, command: &mut Command) {
        let url = match self {
            TestDatabase::Given { url, .. } => url.clone(),
            TestDatabase::Ephemeral(pg) => pg.database_url(),
        };
        command.env("DATABASE_URL", url);
        match self.restart_command() {
            Some(restart) => command.env("DEFLOOKUP_PG_RESTART", restart),
            None => command.env_remove("DEFLOOKUP_PG_RESTART"),
        };
    }
}
