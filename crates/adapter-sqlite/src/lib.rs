//! `adapter-sqlite`: the embedded SQLite backend of deflookup.
//!
//! [`SqliteAdapter`] implements [`lookup_core::DbAdapter`] over the `modules` table of BEHAVIOUR §2
//! (SQLite flavour: JSON as TEXT, keyed on `url` directly since SQLite has no `md5`), creating
//! and versioning the schema itself. Depend on it for tests, the CLI, and single-process
//! deployments that want a persistent cache without a database server. It depends only on
//! `lookup-core`.
//!
//! # Blocking
//! `rusqlite` is synchronous. The adapter holds one [`rusqlite::Connection`] behind an
//! `Arc<std::sync::Mutex<_>>`, and every operation after construction goes through one private
//! helper, `with_conn`, which locks it inside `tokio::task::spawn_blocking`. So no SQLite call
//! ever runs on an async worker thread, and operations of one adapter are serialised. The
//! constructors are the exception: they are synchronous and do their file I/O on the calling
//! thread, since they run once at startup.
//!
//! # What it does not do
//! - **No broadcast.** SQLite has no `NOTIFY`: `apply_invalidation` only deletes rows. This
//!   assumes a single process owns the file; other processes sharing it would not hear of
//!   invalidations and could keep serving what they hold in memory. Use `adapter-pg` for that.
//! - **No durable stale-write guard.** `upsert` ignores its [`LoadStamp`](lookup_core::LoadStamp)
//!   and always reports [`PersistOutcome::Written`](lookup_core::PersistOutcome::Written); the
//!   core's in-memory generations are the guard within the one owning process.
//! - No connection pool: one connection, one operation at a time.

#![warn(missing_docs)]

mod adapter;
mod error;
mod rows;
mod schema;

#[cfg(test)]
mod tests;

pub use adapter::SqliteAdapter;
pub use error::SqliteError;
