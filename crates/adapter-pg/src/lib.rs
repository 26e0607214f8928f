//! `adapter-pg`: the Postgres backend of deflookup.
//!
//! Depend on it to share one `modules` table between many processes: [`PgAdapter`] implements
//! the core's `DbAdapter` on a deadpool of tokio-postgres connections, and every invalidation
//! deletes its rows and `pg_notify`s peers **in one transaction**, so peers hear of it if and
//! only if the delete committed. The listening side lives in `invalidation-listener`, which
//! depends only on this crate; the core items it needs are re-exported here.
//!
//! With [`PgPopulateCoordinator`], cold loads are also coalesced across processes (BEHAVIOUR §9):
//! one prerender per cold module for the whole fleet.
//!
//! Connections are field-ready: TLS with rustls driven by libpq's `sslmode`/`sslrootcert`
//! URL settings, a transaction-pooler mode (`pgbouncer=true`: unnamed, self-contained
//! statements), a bounded start-up and a per-operation timeout, TCP keepalives, and URLs
//! whose password is never printed. See [`PgConfig`].
//!
//! It deliberately does not listen for notifications (a pooled connection would drop them).

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
