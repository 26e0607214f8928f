//! `deflookup-bench`: the cache's measurements, each next to a baseline measured in the same
//! process and run, printed as a table and (with `--out`) written as a JSON summary and an SVG
//! plot. `cargo xtask bench` builds it in release mode and runs it; see `docs/BENCHMARKS.md`.
//!
//! It lives apart from the `deflookup` binary so that the product carries only its user
//! commands; it measures the same libraries (and the `deflookup` package's source scanner).

#![forbid(unsafe_code)]

mod bench;
mod curves;
mod plot;
mod relay;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;

fn main() -> ExitCode {
    let args = bench::BenchArgs::parse();
    lookup_cli::init_logging();
    let ran = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(bench::run(args)));
    if let Err(error) = ran {
        // One line: the error and its causes, outermost first.
        eprintln!("deflookup-bench: error: {error:#}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
