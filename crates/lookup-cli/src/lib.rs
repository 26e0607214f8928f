//! The library part of the `deflookup` package, shared with `deflookup-bench` (crate
//! `lookup-bench`): the module source scanner ([`scan`]), which the binary's file prerenderer
//! uses and the bench measures, and the binaries' logging set-up ([`init_logging`]).

#![forbid(unsafe_code)]

pub mod scan;

/// Logs to stderr: warnings and errors by default, more as `RUST_LOG` asks.
pub fn init_logging() {
    // RUST_LOG uses the `target=level` syntax; warnings and errors are shown by default.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|spec| spec.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::WARN)
        });
    use std::io::IsTerminal as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // Colours only for a person at a terminal who has not asked for none (`NO_COLOR`).
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(colour))
        .with(filter)
        .try_init();
}
