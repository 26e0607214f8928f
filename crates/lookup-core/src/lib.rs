#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod builder;
mod error;
mod generations;
mod key;
mod l1;
mod load;
mod lookup;
mod populate;
pub mod telemetry;
mod traits;
mod types;
pub mod urls;
pub mod wire;

pub use builder::LookupBuilder;
pub use error::{LookupError, SharedError};
pub use l1::{L1Config, L1Stats};
pub use lookup::{CachingLookup, LookupConfig, RealmRows, fan_out, fan_out_over_realm};
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
