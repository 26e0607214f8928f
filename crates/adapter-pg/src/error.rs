//! The one error type of the Postgres crates.

/// A boxed backend error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything the Postgres adapter (and the listener built on it) can fail with. URLs in
/// messages never carry a password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The connection settings are unusable.
    #[error("invalid Postgres settings for {url}: {reason}")]
    InvalidConfig {
        /// The URL, password redacted.
        url: String,
        /// What is wrong.
        reason: String,
        /// The parser's error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// A connection could not be established.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
    /// Creating or upgrading the schema failed.
    #[error("cannot prepare the modules table: {source}")]
    Schema {
        /// The driver's error.
        #[source]
        source: BoxError,
    },
    /// A statement failed.
    #[error("{operation} failed: {source}")]
    Query {
        /// What was being done.
        operation: &'static str,
        /// The driver's or pool's error.
        #[source]
        source: BoxError,
    },
    /// A stored row could not be decoded.
    #[error("row {url} has an unreadable {column}: {source}")]
    CorruptRow {
        /// The row's url.
        url: String,
        /// The column.
        column: &'static str,
        /// The decoder's error.
        #[source]
        source: BoxError,
    },
    /// The database schema is newer than this code.
    #[error(
        "the modules schema is at version {found}, newer than this build supports ({supported})"
    )]
    UnsupportedSchemaVersion {
        /// Version found in the database.
        found: i32,
        /// Newest version this build knows.
        supported: i32,
    },
    /// The listener was shut down before it could start.
    #[error("the listener was shut down")]
    ShutDown,
}

impl PgError {
    /// Whether the same operation may succeed if retried (a connection problem, a
    /// serialization failure or a deadlock), as opposed to a bug or bad input.
    pub fn is_transient(&self) -> bool {
        match self {
            PgError::Connect { .. } => true,
            PgError::Query { source, .. } | PgError::Schema { source } => {
                is_transient_source(source.as_ref())
            }
            _ => false,
        }
    }
}

fn is_transient_source(source: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(pool) = source.downcast_ref::<deadpool_postgres::PoolError>() {
        return match pool {
            deadpool_postgres::PoolError::Backend(e) => is_transient_pg(e),
            _ => true,
        };
    }
    source.downcast_ref::<tokio_postgres::Error>().is_some_and(is_transient_pg)
}

fn is_transient_pg(error: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    match error.code() {
        Some(code) => {
            [
                SqlState::T_R_SERIALIZATION_FAILURE,
                SqlState::T_R_DEADLOCK_DETECTED,
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::TOO_MANY_CONNECTIONS,
            ]
            .contains(code)
                || code.code().starts_with("08")
        }
        // No SQLSTATE: the connection itself failed.
        None => error.is_closed() || error.as_db_error().is_none(),
    }
}

impl From<PgError> for lookup_core::LookupError {
    fn from(error: PgError) -> Self {
        let operation = match &error {
            PgError::Query { operation, .. } => operation,
            PgError::CorruptRow { .. } => "decode row",
            PgError::Connect { .. } => "connect",
            _ => "postgres",
        };
        let transient = error.is_transient();
        lookup_core::LookupError::database(operation, transient, error)
    }
}
