//! `invalidation-listener`: listens on `module_cache_invalidated` and replays every peer's
//! invalidation into this process's lookup.
//!
//! Depend on it in every process that shares a Postgres `modules` table through
//! `adapter-pg` and keeps loads in flight: [`PgInvalidationListener`] holds one dedicated,
//! unpooled connection, `LISTEN`s on the invalidation channel, parses each payload with the
//! core's parser and calls an [`InvalidationSink`] (the lookup): a module payload bumps each
//! URL, a realm payload bumps the realm, a global payload bumps everything. Payloads carrying
//! this process's own origin id are skipped; malformed ones are counted, warned about (at
//! most once every 10 s) and ignored.
//!
//! Notifications sent while a connection is down are lost for good, so after any error or
//! end of the connection the listener reconnects with capped exponential backoff and jitter,
//! `LISTEN`s again and then **catches up**: every guarded invalidation is also recorded, with
//! a sequence number, in the durable guard's tables (in the same transaction as its DELETE),
//! and its payload carries that number; the listener keeps, per realm, the newest number it
//! has accounted for ([`LogPosition`]), and after a reconnect it reads what the log recorded
//! past it ([`GuardLog`]) and replays exactly that. Only when it cannot prove it saw
//! everything (the log was pruned past its position, the log cannot be read, or
//! [`ListenerOptions::untracked_writers`] says writers that record nothing share the database)
//! does it **resync**: bump the global generation, which discards every load that might have
//! missed an invalidation. An idle connection is probed now and then (`SELECT 1`), so one
//! silently dropped by a NAT or firewall is noticed too. Its state is observable through
//! [`PgInvalidationListener::stats`] and [`PgInvalidationListener::subscribe`], and `tracing`
//! events mark every change.
//!
//! Where no connection can `LISTEN`, [`ListenerOptions::poll`] follows the same log by reading
//! it every N milliseconds instead, through any connection, PgBouncer in transaction mode
//! included.
//!
//! What it deliberately does not do:
//! - It does not `LISTEN` through a transaction-pooling proxy: PgBouncer in transaction mode
//!   hands the session to someone else after `LISTEN` and notifications silently stop. Give it
//!   a direct or session-pooled connection, or poll.
//! - It does not share its connection, and one listener per process is enough: every lookup
//!   of the process can be fed through one sink.
//! - It does not delete rows or broadcast; that is `adapter-pg`'s job. (It speaks TLS as the
//!   config's `sslmode` asks, like the pool.)
//!
//! With [`ListenerOptions::populate`], the same connection also `LISTEN`s on
//! `module_cache_populated` and wakes the process's cross-process populate waiters (BEHAVIOUR §9):
//! one key per announcement, all of them after a reconnect and when the listener stops.
//!
//! Its only workspace dependency is `adapter-pg`, whose error type [`PgError`] it reuses.

#![warn(missing_docs)]

mod event;
mod listener;
mod options;

pub use event::{ListenerEvent, ListenerStats};
pub use listener::PgInvalidationListener;
pub use options::ListenerOptions;

pub use adapter_pg::{
    GuardLog, INVALIDATION_CHANNEL, Invalidation, InvalidationSink, LogPosition, LogRead, PgConfig,
    PgError, PopulateSink, parse_payload,
};
