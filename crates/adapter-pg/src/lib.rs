//! `adapter-pg`: the Postgres backend of deflookup.
//!
//! This crate is a placeholder: it fixes the dependency line
//! (`lookup-core ← adapter-pg ← invalidation-listener`) and re-exports what the listener will
//! need from the core. The `DbAdapter` implementation on tokio-postgres arrives with the
//! Postgres issue; until then, use `adapter-sqlite`.

#![warn(missing_docs)]

pub use lookup_core::wire::{INVALIDATION_CHANNEL, ParsedPayload, parse_payload};
pub use lookup_core::{Invalidation, InvalidationSink};
