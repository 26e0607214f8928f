//! The one error type of this crate, and how it becomes a [`LookupError`].

use std::path::PathBuf;

use lookup_core::LookupError;

/// A backend error, boxed so that `rusqlite` and `serde_json` stay out of this crate's public
/// API. [`SqliteError::is_transient`] looks inside it for the SQLite result code.
pub(crate) type BoxSource = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything the SQLite adapter can fail with.
///
/// Trait methods of [`DbAdapter`](lookup_core::DbAdapter) hand it to the core as
/// [`LookupError::Database`] (see the `From` impl), keeping this value as the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqliteError {
    /// The connection URL is not `sqlite://PATH` or `sqlite::memory:`.
    #[error(
        "unsupported SQLite URL {url:?}: {reason} (expected `sqlite://PATH` or `sqlite::memory:`)"
    )]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The database could not be opened or configured: a missing or unwritable directory, a
    /// file that is not an SQLite database, a lock held too long by another process.
    #[error("cannot open SQLite database {}: {source}", .path.display())]
    Open {
        /// The file (`:memory:` for an in-memory database).
        path: PathBuf,
        /// What SQLite reported.
        #[source]
        source: BoxSource,
    },
    /// Creating or upgrading the `modules` table failed.
    #[error("cannot create the schema of SQLite database {}: {source}", .path.display())]
    Schema {
        /// The file (`:memory:` for an in-memory database).
        path: PathBuf,
        /// What SQLite reported.
        #[source]
        source: BoxSource,
    },
    /// The file was written by a newer build: its schema version is one this code does not know,
    /// so it refuses to touch it rather than guess.
    #[error(
        "SQLite database {} has schema version {found}, but this build only knows versions up to \
         {supported}; use a newer deflookup or delete the cache file",
        .path.display()
    )]
    UnsupportedSchemaVersion {
        /// The file.
        path: PathBuf,
        /// The `user_version` found in the file.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// A statement failed.
    #[error("SQLite {operation} on {} failed: {source}", .path.display())]
    Query {
        /// The file (`:memory:` for an in-memory database), so that an error met long after
        /// opening (a corrupt page, a full disk) still names it.
        path: PathBuf,
        /// What was being done (`"upsert"`, `"read_rows"`, …).
        operation: &'static str,
        /// What SQLite reported.
        #[source]
        source: BoxSource,
    },
    /// A stored row could not be decoded (its JSON does not parse, or its scope is unknown).
    #[error("stored row {url} has an unreadable {column} column: {source}")]
    CorruptRow {
        /// What was being done when the row was read.
        operation: &'static str,
        /// The row's `url`.
        url: String,
        /// The column that could not be decoded.
        column: &'static str,
        /// Why it could not be decoded.
        #[source]
        source: BoxSource,
    },
    /// A field of an entry could not be encoded as JSON for storage.
    #[error("cannot encode the {column} of {url} as JSON: {source}")]
    Encode {
        /// The entry's `url`.
        url: String,
        /// The column being encoded.
        column: &'static str,
        /// Why it could not be encoded.
        #[source]
        source: BoxSource,
    },
    /// The blocking task that runs SQLite calls panicked or was cancelled.
    #[error("the SQLite worker running {operation} ended abnormally: {source}")]
    Worker {
        /// What was being done.
        operation: &'static str,
        /// What tokio reported.
        #[source]
        source: BoxSource,
    },
}

impl SqliteError {
    pub(crate) fn query(
        path: &std::path::Path,
        operation: &'static str,
        source: rusqlite::Error,
    ) -> Self {
        SqliteError::Query { path: path.to_path_buf(), operation, source: Box::new(source) }
    }

    /// Whether retrying the same call may succeed: SQLite reported the database busy or locked
    /// (another connection held a lock longer than the busy timeout).
    pub fn is_transient(&self) -> bool {
        let source = match self {
            SqliteError::Open { source, .. }
            | SqliteError::Schema { source, .. }
            | SqliteError::Query { source, .. } => source,
            _ => return false,
        };
        source.downcast_ref::<rusqlite::Error>().is_some_and(is_busy)
    }

    /// The operation that failed, as reported in [`LookupError::Database`].
    pub fn operation(&self) -> &'static str {
        match self {
            SqliteError::InvalidUrl { .. } | SqliteError::Open { .. } => "open",
            SqliteError::Schema { .. } | SqliteError::UnsupportedSchemaVersion { .. } => "migrate",
            SqliteError::Encode { .. } => "upsert",
            SqliteError::Query { operation, .. }
            | SqliteError::CorruptRow { operation, .. }
            | SqliteError::Worker { operation, .. } => operation,
        }
    }
}

/// Whether SQLite reported `SQLITE_BUSY` or `SQLITE_LOCKED`: another connection held a lock.
pub(crate) fn is_busy(error: &rusqlite::Error) -> bool {
    error.sqlite_error_code().is_some_and(|code| {
        matches!(code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    })
}

impl From<SqliteError> for LookupError {
    fn from(error: SqliteError) -> Self {
        LookupError::database(error.operation(), error.is_transient(), error)
    }
}
