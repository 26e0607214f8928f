//! `cargo xtask bench [--quick]`: the benchmarks of `deflookup-bench` (crate `lookup-bench`),
//! each with its baseline measured in the same process and run, on a release build.
//!
//! The server is `$DATABASE_URL`'s or a throwaway cluster ([`Server`], as for the soak); the
//! binary works in a schema and on channels of its own and drops them at the end. The binary
//! prints the table (passed through to stdout) and writes `target/bench/summary.json`.

use std::process::Command;

use anyhow::{Result, bail};

use crate::pg::Server;
use crate::services::Extras;
use crate::{catch_interrupts, release_binary, run_step, workspace_root};

fn usage() -> &'static str {
    "cargo xtask bench [--quick]: builds deflookup-bench in release mode and runs its measurements \
     against their baselines on $DATABASE_URL or a throwaway Postgres cluster; prints a table \
     and writes target/bench/summary.json. --quick takes fewer samples (a few minutes)."
}

/// Runs the benchmarks (see the module documentation).
pub(crate) fn run(args: &[String]) -> Result<()> {
    let mut quick = false;
    for arg in args {
        match arg.as_str() {
            "--quick" => quick = true,
            "--help" | "-h" => {
                println!("{}", usage());
                return Ok(());
            }
            _ => bail!("unknown argument {arg:?}\n{}", usage()),
        }
    }
    catch_interrupts()?;
    let mut build = crate::cargo();
    build.args(["build", "--release", "--locked", "-p", "lookup-bench"]);
    run_step("cargo build --release -p lookup-bench", build)?;
    let binary = release_binary("deflookup-bench")?;

    let server = Server::from_env_or_start()?;
    // On a cluster of our own, also the TLS cluster and PgBouncer of the tests, for the
    // connection-mode figures (stopped before the main cluster).
    let extras = match &server {
        Server::Ephemeral(pg) => Some(Extras::start(pg)?),
        Server::Given { .. } => None,
    };
    let out = workspace_root().join("target").join("bench").join("summary.json");
    let mut bench = Command::new(&binary);
    bench.arg("--db").arg(server.url()).arg("--out").arg(&out);
    if let Some(extras) = &extras {
        bench.arg("--pgbouncer-db").arg(extras.pgbouncer_url());
        bench.arg("--tls-db").arg(extras.tls_url());
    }
    if quick {
        bench.arg("--quick");
    }
    // The URL is passed explicitly; the variable would only be a second source of truth.
    bench.env_remove("DATABASE_URL");
    let result = run_step("deflookup-bench", bench);
    server.explain_failure(&result);
    drop(extras);
    drop(server);
    result
}
