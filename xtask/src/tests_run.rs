//! Running `cargo test` for `cargo xtask test` and `cargo xtask test-pg`: the Postgres the
//! tests need ([`run_with_postgres`]), the runs themselves ([`run_tests`]) and the sums of
//! their results ([`Totals`]).

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::pg::Server;
use crate::services::Extras;
use crate::{cargo, interrupted, run_step};

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

/// Sums of the `test result:` lines of cargo test runs.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Totals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// Whether a test run was started at all (not when, say, Postgres failed to start).
    pub started: bool,
}

impl Totals {
    /// Prints the one closing line of a test command, `name: N passed, N failed, N skipped`,
    /// so that a reader (or CI) need not add up the per-binary lines, the last of which is
    /// often an empty doc-test run. Then fails if `result` did, or if no test ran at all.
    pub(crate) fn finish(self, name: &str, result: Result<()>) -> Result<()> {
        println!(
            "{name}: {} passed, {} failed, {} skipped",
            self.passed, self.failed, self.ignored
        );
        result?;
        if self.passed == 0 {
            bail!("no test ran");
        }
        Ok(())
    }

    /// Adds the results of a run of tests that earlier runs counted as ignored (`--ignored`),
    /// so that a test that ran is not also counted as skipped.
    fn add_ignored_run(&mut self, run: Totals) {
        self.ignored = self.ignored.saturating_sub(run.passed + run.failed) + run.ignored;
        self.passed += run.passed;
        self.failed += run.failed;
        self.started |= run.started;
    }

    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else { return };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(count)) = (words.next(), words.next()) else { continue };
            let Ok(count) = count.parse::<u64>() else { continue };
            match label {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

/// Runs a `cargo test` command, echoing its output as it comes and adding its results to
/// `totals`.
fn run_tests(title: &str, mut command: Command, totals: &mut Totals) -> Result<()> {
    eprintln!("xtask: == {title}");
    command.stdout(Stdio::piped());
    let mut child = command.spawn().with_context(|| format!("cannot start {command:?}"))?;
    totals.started = true;
    let stdout = child.stdout.take().context("test output is piped")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading test output")?;
        println!("{line}");
        totals.add_line(&line);
    }
    let status = child.wait().context("waiting for cargo test")?;
    if interrupted() {
        bail!("interrupted");
    }
    if !status.success() {
        bail!("{title} failed ({status})");
    }
    Ok(())
}
