#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod adapter;
mod config;
mod conninfo;
mod error;
mod guard;
mod invalidate;
mod log;
mod populate;
mod schema;
mod sql;
mod store;
mod tls;

pub use adapter::{PgAdapter, PgAdapterStats};
pub use config::{PgConfig, PgConnection, PgStream, redact_url};
pub use error::{BoxError, PgError, error_chain};
pub use log::{GuardLog, LogPosition, LogRead};
pub use populate::{PgLease, PgPopulateCoordinator, PgPopulateStats};
pub use tls::SslMode;

pub use lookup_core::wire::{
    INVALIDATION_CHANNEL, POPULATE_CHANNEL, POPULATE_OUTCOME_CHANNEL, ParsedPayload,
    encode_outcome, encode_payloads, parse_outcome, parse_payload,
};
pub use lookup_core::{
    Invalidation, InvalidationSink, NoRow, PopulateCoordinator, PopulateSettings, PopulateSignals,
    PopulateSink,
};
pub use tokio_postgres;
