//! `cargo xtask test-pg`: the Postgres tests, on `DATABASE_URL` or on a throwaway cluster
//! (see [`crate::tests_run`], which `cargo xtask test` runs every test with too).

use anyhow::Result;

use crate::cargo;
use crate::tests_run::{Totals, run_with_postgres};

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
