//! `cargo xtask test`: everything CI checks, in the order that fails fastest, the Postgres
//! tests included (see [`crate::test_pg`]).

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::test_pg::run_with_postgres;
use crate::{cargo, interrupted, run_step};

/// Runs fmt, clippy and the tests. Extra arguments are passed to `cargo test`.
pub(crate) fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "cargo xtask test [CARGO TEST ARGS]: fmt --check, clippy -D warnings, all tests \
             (on $DATABASE_URL or a throwaway Postgres cluster)"
        );
        return Ok(());
    }
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run_step("cargo fmt --check", fmt)?;

    let mut clippy = cargo();
    clippy.args(["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"]);
    run_step("cargo clippy -D warnings", clippy)?;

    // The Postgres tests need a server: the run gets one (`DATABASE_URL`, or a throwaway
    // cluster), and adds the server-restart tests that only run on a cluster of our own.
    let mut test = cargo();
    test.args(["test", "--workspace", "--locked"]).args(args);
    let mut totals = Totals::default();
    let result = run_with_postgres("cargo test --workspace", test, args, &mut totals);
    totals.finish("xtask test", result)
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
    pub(crate) fn add_ignored_run(&mut self, run: Totals) {
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
pub(crate) fn run_tests(title: &str, mut command: Command, totals: &mut Totals) -> Result<()> {
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
