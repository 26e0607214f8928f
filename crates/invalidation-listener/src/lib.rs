//! `invalidation-listener`: listens on `module_cache_invalidated` and replays every peer's
//! invalidation into this process's generations.
//!
//! This crate is a placeholder that fixes the dependency line: its only workspace dependency
//! is `adapter-pg`, which re-exports the wire parser and the sink trait from the core. The
//! listener itself arrives with the Postgres issue.

#![warn(missing_docs)]

pub use adapter_pg::{INVALIDATION_CHANNEL, InvalidationSink, parse_payload};
