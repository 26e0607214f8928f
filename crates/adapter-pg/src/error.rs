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
    #[error("cannot connect to {url}: {}", error_chain(source.as_ref()))]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
    /// Creating or upgrading the schema failed.
    #[error("cannot prepare the modules table: {}", error_chain(source.as_ref()))]
    Schema {
        /// The driver's error.
        #[source]
        source: BoxError,
    },
    /// A statement failed.
    #[error("{operation} failed: {}", error_chain(source.as_ref()))]
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
    /// The TLS handshake failed: the server's certificate is not trusted, does not name the
    /// host, or the server does not speak TLS as `sslmode` demands.
    #[error("cannot connect to {url} with TLS: {problem}")]
    Tls {
        /// The URL, password redacted.
        url: String,
        /// What went wrong, in plain words.
        problem: String,
        /// The TLS library's error.
        #[source]
        source: BoxError,
    },
    /// A connection's start-up or a database operation did not finish in time.
    #[error(
        "{operation}{}: no answer from the database within {after:?}",
        url.as_ref().map(|url| format!(" {url}")).unwrap_or_default()
    )]
    Timeout {
        /// What was being done (`connect to` for a connection's start-up).
        operation: &'static str,
        /// For a start-up, the URL (password redacted).
        url: Option<String>,
        /// The bound that ran out.
        after: std::time::Duration,
    },
    /// The database role may not do this: a read-only role asked to write the cache, or to
    /// create or upgrade its schema.
    #[error("{operation} failed: the database role lacks the privilege ({})", error_chain(source.as_ref()))]
    PermissionDenied {
        /// What was being done.
        operation: &'static str,
        /// The server's error.
        #[source]
        source: BoxError,
    },
    /// A `modules` table exists that deflookup cannot share.
    #[error("the existing table {table} cannot be shared with deflookup: {differences}")]
    IncompatibleTable {
        /// The table.
        table: String,
        /// What differs from what deflookup needs.
        differences: String,
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
    /// A failed connection attempt: a TLS failure is told in plain words, anything else is
    /// [`PgError::Connect`].
    pub(crate) fn connect(url: String, source: BoxError) -> PgError {
        match crate::tls::describe_failure(source.as_ref()) {
            Some(problem) => PgError::Tls { url, problem, source },
            None if is_tls_refusal(source.as_ref()) => PgError::Tls {
                url,
                problem: "the server does not accept TLS connections (sslmode requires TLS)"
                    .to_owned(),
                source,
            },
            None => PgError::Connect { url, source },
        }
    }

    /// A connection whose start-up did not finish within `after`.
    pub(crate) fn connect_timeout(url: String, after: std::time::Duration) -> PgError {
        PgError::Timeout { operation: "connect to", url: Some(url), after }
    }

    /// A statement failed: a missing privilege is told as such.
    pub(crate) fn query(operation: &'static str, source: tokio_postgres::Error) -> PgError {
        if source.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
            PgError::PermissionDenied { operation, source: Box::new(source) }
        } else {
            PgError::Query { operation, source: Box::new(source) }
        }
    }

    /// Whether the same operation may succeed if retried (a connection problem, a
    /// serialization failure or a deadlock), as opposed to a bug or bad input.
    pub fn is_transient(&self) -> bool {
        match self {
            PgError::Connect { .. } | PgError::Timeout { .. } => true,
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
            PgError::Connect { .. } | PgError::Tls { .. } => "connect",
            PgError::Timeout { operation, .. } => operation,
            PgError::PermissionDenied { operation, .. } => operation,
            _ => "postgres",
        };
        let transient = error.is_transient();
        lookup_core::LookupError::database(operation, transient, error)
    }
}

/// Whether the driver gave up because the server refused TLS (`sslmode=require` or stricter
/// against a server without it).
fn is_tls_refusal(source: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(source);
    while let Some(error) = current {
        if error.to_string().contains("server does not support TLS") {
            return true;
        }
        current = error.source();
    }
    false
}

/// An error and its causes, `": "`-separated, skipping a cause the text so far already
/// spells out: the driver's own message is often only "db error", with the server's words in
/// its source. [`PgError`]s carry redacted URLs only, and driver errors carry none, so the
/// result is safe to log.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chains_include_each_cause_once() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("outer")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        assert_eq!(error_chain(&Outer(std::io::Error::other("inner"))), "outer: inner");
        let connect = PgError::Connect {
            url: "postgres://u:***@h/db".into(),
            source: Box::new(Outer(std::io::Error::other("refused"))),
        };
        // The message already holds its causes; the chain does not repeat them.
        assert_eq!(connect.to_string(), "cannot connect to postgres://u:***@h/db: outer: refused");
        assert_eq!(error_chain(&connect), connect.to_string());
    }
}
