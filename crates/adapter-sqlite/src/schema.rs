//! The versioned schema of the `modules` table (BEHAVIOUR §2, SQLite flavour).
//!
//! The file's `PRAGMA user_version` records how many entries of [`MIGRATIONS`] have been
//! applied. Migrating reads it and applies the missing steps inside one `BEGIN IMMEDIATE`
//! transaction, so two processes opening a fresh file at once cannot both create the table:
//! the second waits for the first's write lock (up to the busy timeout), then finds the
//! version already current and does nothing.

use rusqlite::{Connection, TransactionBehavior};

/// Version 1: the `modules` table and its two indexes.
///
/// JSON columns are TEXT. There is no `url_hash` column: Postgres keys on `md5(url)` to keep
/// long URLs out of its btree limits, but SQLite has no such limit (and no `md5`), so it keys on
/// `url` directly. The constraint keeps the reference's name so operators recognise it.
const V1: &str = "
CREATE TABLE modules (
    url                TEXT NOT NULL,
    cache_scope        TEXT NOT NULL,
    auth_user_id       TEXT NOT NULL,
    resolved_realm_url TEXT NOT NULL,
    definitions        TEXT,
    deps               TEXT,
    error_doc          TEXT,
    created_at         INTEGER,
    file_alias         TEXT,
    diagnostics        TEXT,
    CONSTRAINT modules_pkey PRIMARY KEY (url, cache_scope, auth_user_id)
);
CREATE INDEX modules_resolved_realm_url_index ON modules (resolved_realm_url);
CREATE INDEX modules_file_alias_index ON modules (file_alias);
";

/// Every schema step, in order; step `i` takes the file from version `i` to `i + 1`.
/// Steps are only ever appended: a released step is never edited.
const MIGRATIONS: &[&str] = &[V1];

/// The schema version this build creates and understands.
pub(crate) const LATEST_VERSION: i64 = MIGRATIONS.len() as i64;

/// Why [`migrate`] failed.
#[derive(Debug)]
pub(crate) enum MigrateError {
    /// SQLite refused a statement.
    Sqlite(rusqlite::Error),
    /// The file's version is one this build does not know (newer, or negative).
    Unsupported(i64),
}

impl From<rusqlite::Error> for MigrateError {
    fn from(error: rusqlite::Error) -> Self {
        MigrateError::Sqlite(error)
    }
}

/// Brings the schema of `conn` to [`LATEST_VERSION`]; a no-op when it is already there.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), MigrateError> {
    // IMMEDIATE takes the write lock before reading the version, so the read and the steps it
    // decides on cannot interleave with another process doing the same.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if !(0..=LATEST_VERSION).contains(&found) {
        // Dropping `tx` rolls back; nothing was written.
        return Err(MigrateError::Unsupported(found));
    }
    if found == LATEST_VERSION {
        return Ok(());
    }
    for step in &MIGRATIONS[found as usize..] {
        tx.execute_batch(step)?;
    }
    // `user_version` lives in the database header, which is written by the same transaction,
    // so the version and the tables it describes commit together.
    tx.pragma_update(None, "user_version", LATEST_VERSION)?;
    tx.commit()?;
    Ok(())
}
