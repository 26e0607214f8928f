//! Project automation, run as `cargo xtask <command>`.
//!
//! - `test`: formatting check, clippy with warnings denied, and every test of the workspace,
//!   the Postgres tests included (`test.rs`).
//! - `test-pg`: the tests of the crates that need Postgres (`test_pg.rs`). Both run their
//!   tests through `tests_run.rs`.
//! - `soak`: many `deflookup` processes on one database under injected faults, then an
//!   audit of stale rows (`soak/`). Not part of `test`: it runs for a minute by default.
//!
//! - `bench`: the benchmarks of `deflookup-bench` (crate `lookup-bench`) against their
//!   baselines, on a release build (`bench.rs`); writes `target/bench/summary.json` (with
//!   `--scale`, the scale curves: `target/bench/scale.json`).
//!
//! `test` and `test-pg` run the Postgres tests on `$DATABASE_URL` when it is set. Otherwise they start a
//! throwaway cluster with the machine's `initdb` and `pg_ctl` (`pg.rs`), pass its URL to the
//! tests as `DATABASE_URL` and a command restarting it as `DEFLOOKUP_PG_RESTART`, run the
//! `#[ignore]`d server-restart tests of `invalidation-listener` one at a time after the
//! others, and always stop and delete the cluster, also when tests fail or on Ctrl-C.

#![forbid(unsafe_code)]

mod bench;
mod pg;
mod services;
mod soak;
mod test;
mod test_pg;
mod tests_run;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, Result, anyhow, bail};

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test::run(&args[1..]),
        Some("test-pg") => test_pg::run(&args[1..]),
        Some("soak") => soak::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("help" | "--help" | "-h") | None => {
            print_help();
            Ok(())
        }
        Some(other) => {
            Err(anyhow::anyhow!("unknown xtask command {other:?} (try `cargo xtask help`)"))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn print_help() {
    println!("cargo xtask <command>\n");
    println!("  test [CARGO TEST ARGS]     fmt --check, clippy -D warnings, and every test of the");
    println!("                             workspace, the Postgres tests included");
    println!("  test-pg [CARGO TEST ARGS]  the tests of adapter-pg, invalidation-listener,");
    println!("                             lookup-cli and lookup-bench, then the server-restart");
    println!("                             tests");
    println!("  soak [--seconds N] [--processes P] [--unsafe]");
    println!("                             P deflookup processes (3) for N seconds (60) under");
    println!("                             injected faults, then an audit; last line:");
    println!("                             `stale rows: S of R rows; invalidations: I; …`");
    println!("  bench [--quick] [--scale]  measurements against their baselines on a release");
    println!("                             build; a table, and target/bench/summary.json;");
    println!("                             --scale: the scale curves, target/bench/scale.json\n");
    println!("The Postgres tests use $DATABASE_URL when it is set; the server-restart tests then");
    println!("run only if $DEFLOOKUP_PG_RESTART holds a shell command that restarts that server.");
    println!("Otherwise xtask starts a throwaway cluster with initdb and pg_ctl (from PATH or");
    println!("/usr/lib/postgresql/*/bin) and always stops and deletes it, also on Ctrl-C.");
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

/// A `cargo` command (the same cargo that runs xtask) in the workspace root.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

/// Where the release binary `name` lands: `<target dir>/release/<name>`.
pub fn release_binary(name: &str) -> Result<PathBuf> {
    let mut metadata = cargo();
    metadata.args(["metadata", "--format-version", "1", "--no-deps"]);
    let output = metadata.output().context("cannot run cargo metadata")?;
    if !output.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("cargo metadata printed no JSON")?;
    let target = metadata["target_directory"].as_str().context("no target_directory")?;
    let binary = Path::new(target).join("release").join(name);
    if !binary.is_file() {
        bail!("the build left no binary at {}", binary.display());
    }
    Ok(binary)
}

/// Runs a command, announcing it, and fails if it fails.
pub fn run_step(title: &str, mut command: Command) -> Result<()> {
    eprintln!("xtask: == {title}");
    let status = command.status().with_context(|| format!("cannot start {command:?}"))?;
    if interrupted() {
        bail!("interrupted");
    }
    if !status.success() {
        bail!("{title} failed ({status})");
    }
    Ok(())
}

/// Set by the Ctrl-C handler.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// From now on, Ctrl-C (SIGINT) does not end xtask: it only sets a flag ([`interrupted`]).
///
/// A Ctrl-C on a terminal reaches the whole foreground process group, so the cargo and test
/// processes xtask waits for still die, xtask sees them end, returns "interrupted", and the
/// guards it holds (the Postgres cluster) clean up on the way out. Idempotent.
pub fn catch_interrupts() -> Result<()> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))
                .map_err(|error| error.to_string())
        })
        .clone()
        .map_err(|error| anyhow!("cannot install the Ctrl-C handler: {error}"))
}

/// Whether Ctrl-C was pressed since [`catch_interrupts`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
