//! `lookup-core`: a cache of expensive, prerendered module definitions that stays correct
//! when many processes share one database.
//!
//! Depend on this crate to look definitions up ([`CachingLookup`]), to write a storage backend
//! ([`DbAdapter`]), a renderer ([`Prerenderer`]) or a remote realm probe ([`RealmProbe`]), or to
//! feed invalidations heard from peers ([`InvalidationSink`]). Cross-process populate
//! coalescing plugs in through [`PopulateCoordinator`] (implemented by `adapter-pg`).
//!
//! It deliberately does no I/O: no sockets, files or database drivers. Backends live in
//! `adapter-sqlite` and `adapter-pg`; the cross-process listener in `invalidation-listener`.
//! The only runtime it needs is tokio's task spawning (coalesced loads run as tasks, so one
//! cancelled caller never cancels the load others wait on).
//!
//! Comments across the workspace cite the behaviour as "BEHAVIOUR §N": the sections of
//! `docs/BEHAVIOUR.md` in the repository.

#![warn(missing_docs)]

mod builder;
mod error;
mod generations;
mod l1;
mod lookup;
mod populate;
mod traits;
mod types;
pub mod urls;
pub mod wire;

pub use builder::LookupBuilder;
pub use error::{LookupError, SharedError};
pub use generations::{Generations, Snapshot};
pub use l1::{L1Config, L1Stats};
pub use lookup::{CachingLookup, LookupConfig, fan_out};
pub use populate::{
    NoLease, NoRow, PopulateCoordinator, PopulateKey, PopulateLease, PopulateSettings,
    PopulateSignalStats, PopulateSignals, PopulateSink, PopulateTicket, Uncoordinated, Woken,
    populate_key_hash,
};
pub use traits::{
    DbAdapter, InvalidationSink, LoadStamp, ModulesInvalidated, NoRemoteRealms, PersistOutcome,
    Prerenderer, RealmProbe, RowStore,
};
pub use types::{
    CacheEntry, CacheScope, CodeRef, ConsumerRow, EntryScope, ErrorDetail, ErrorDoc,
    PrerenderRequest, PrerenderResponse, PrerenderStatus, ProbeResult, Realm,
};
pub use wire::Invalidation;
