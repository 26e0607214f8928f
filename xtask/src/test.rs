//! `cargo xtask test`: everything CI checks, in the order that fails fastest, the Postgres
//! tests included (run as for `cargo xtask test-pg`, see [`crate::tests_run`]).

use anyhow::Result;

use crate::tests_run::{Totals, run_with_postgres};
use crate::{cargo, run_step};

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
