//! `cargo xtask test`: everything CI checks, in the order that fails fastest.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, run_step};

/// Runs fmt, clippy and the tests. Extra arguments are passed to `cargo test`.
pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("cargo xtask test [CARGO TEST ARGS]: fmt --check, clippy -D warnings, all tests");
        return Ok(());
    }
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run_step("cargo fmt --check", fmt)?;

    let mut clippy = cargo();
    clippy.args(["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"]);
    run_step("cargo clippy -D warnings", clippy)?;

    let mut test = cargo();
    test.args(["test", "--workspace", "--locked"]).args(args);
    let totals = run_tests("cargo test --workspace", test)?;
    // One plain closing line for the whole run, so a reader (or CI) need not add up the
    // per-binary lines, the last of which is often an empty doc-test run.
    println!(
        "xtask test: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Sums of the `test result:` lines of a cargo test run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Totals {
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

/// Runs a `cargo test` command, echoing its output as it comes and adding up its results.
pub fn run_tests(title: &str, mut command: Command) -> Result<Totals> {
    eprintln!("xtask: == {title}");
    command.stdout(Stdio::piped());
    let mut child = command.spawn().with_context(|| format!("cannot start {command:?}"))?;
    let stdout = child.stdout.take().context("test output is piped")?;
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading test output")?;
        println!("{line}");
        totals.add_line(&line);
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() {
        println!(
            "xtask test: {} passed, {} failed, {} skipped",
            totals.passed, totals.failed, totals.ignored
        );
        bail!("{title} failed ({status})");
    }
    Ok(totals)
}
