//! `cargo xtask bench [--quick] [--scale]`: the benchmarks of `deflookup-bench` (crate
//! `lookup-bench`), each with its baseline measured in the same process and run, on a release
//! build.
//!
//! The server is `$DATABASE_URL`'s or a throwaway cluster with `initdb`'s durability settings
//! ([`Server::durable`]: `fsync` and `synchronous_commit` on, so a commit that wrote WAL waits
//! for its flush, as in production); the binary works in a schema and on channels of its own
//! and drops them at the end. The binary prints the table (passed through to stdout) and
//! writes `target/bench/summary.json` and `target/bench/propagation.svg`; with `--scale`, the
//! scale curves instead: `target/bench/scale.json` and `target/bench/scale.svg`.

use std::process::Command;

use anyhow::{Result, bail};

use crate::pg::Server;
use crate::services::Extras;
use crate::{catch_interrupts, release_binary, run_step, workspace_root};

fn usage() -> &'static str {
    "cargo xtask bench [--quick] [--scale]: builds deflookup-bench in release mode and runs its \
     measurements against their baselines on $DATABASE_URL or a throwaway Postgres cluster \
     (fsync on); prints a table and writes target/bench/summary.json. --quick takes fewer \
     samples (a few minutes). --scale measures the scale curves instead (1-50 listening \
     processes, 1-16 invalidators, 1-32 concurrent lookups, each against a bare baseline; a \
     few minutes) and writes target/bench/scale.json and target/bench/scale.svg."
}

/// Runs the benchmarks (see the module documentation).
pub(crate) fn run(args: &[String]) -> Result<()> {
    let (mut quick, mut scale) = (false, false);
    for arg in args {
        match arg.as_str() {
            "--quick" => quick = true,
            "--scale" => scale = true,
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

    let server = Server::durable()?;
    // On a cluster of our own, also the TLS cluster and PgBouncer of the tests, for the
    // connection-mode figures (stopped before the main cluster); the curves need neither.
    let extras = match &server {
        Server::Ephemeral(pg) if !scale => Some(Extras::start(pg)?),
        _ => None,
    };
    let file = if scale { "scale.json" } else { "summary.json" };
    let out = workspace_root().join("target").join("bench").join(file);
    let mut bench = Command::new(&binary);
    bench.arg("--db").arg(server.url()).arg("--out").arg(&out);
    if scale {
        bench.arg("--curves");
    }
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
