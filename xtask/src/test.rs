//! `cargo xtask test`: everything CI checks, in the order that fails fastest.

use anyhow::Result;

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
    run_step("cargo test --workspace", test)?;
    eprintln!("xtask: all checks passed");
    Ok(())
}
