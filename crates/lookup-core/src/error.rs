//! The one error type of the core, shared by every adapter operation.

use std::sync::Arc;

use crate::types::{ErrorDetail, ErrorDoc};

/// A boxed backend or prerenderer error. It is reference-counted so that one failure can be
/// handed to every caller that shared a coalesced load.
pub type SharedError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Everything a lookup, an invalidation or an adapter operation can fail with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError {
    /// The URL given is not an absolute URL this crate can work with.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// A realm with this URL is already registered: registering it again would silently
    /// change which directory, owner or visibility serves its modules.
    #[error("realm {url} is already registered")]
    RealmAlreadyRegistered {
        /// The realm's canonical URL.
        url: String,
    },
    /// No registered realm owns the module and no remote probe claimed it.
    #[error("cannot determine realm for {url}")]
    NoRealm {
        /// The canonical module URL.
        url: String,
    },
    /// No population candidate of the module exists.
    #[error("module entry not found: {url}")]
    ModuleNotFound {
        /// The canonical module URL.
        url: String,
    },
    /// The module exists but failed to prerender; the error document says why.
    #[error("module {url} has an error: {}", .error.error.message)]
    ModuleError {
        /// The canonical module URL.
        url: String,
        /// The stored error document.
        error: Box<ErrorDoc>,
    },
    /// The module rendered but does not export the name.
    #[error("definition not found: {key}")]
    DefinitionNotFound {
        /// The definition key that was looked up.
        key: String,
    },
    /// The module rendered but this export failed.
    #[error("definition {key} had an error: {message}")]
    DefinitionError {
        /// The definition key that was looked up.
        key: String,
        /// The error message stored for it.
        message: String,
    },
    /// The prerenderer itself failed (it did not produce an answer at all).
    #[error("prerender of {url} failed: {source}")]
    Prerender {
        /// The candidate URL being rendered.
        url: String,
        /// What the prerenderer reported.
        #[source]
        source: SharedError,
    },
    /// The database failed.
    #[error("database error during {operation}: {source}")]
    Database {
        /// What was being done (`"upsert"`, `"read"`, …).
        operation: &'static str,
        /// Whether retrying the same operation may succeed.
        transient: bool,
        /// The backend's error.
        #[source]
        source: SharedError,
    },
    /// A broadcast payload was rejected by the wire parser (BEHAVIOUR §7).
    #[error("malformed invalidation payload: {reason}")]
    MalformedPayload {
        /// Why the payload was rejected.
        reason: String,
    },
    /// Cross-process populate coalescing gave up on a key (BEHAVIOUR §9): another process kept
    /// its lock through every round, or the coordinator was shut down.
    #[error("populate of {key} gave up: {reason}")]
    PopulateFailed {
        /// The coalesce key (`realm|scope|user|url (#hash)`).
        key: String,
        /// Why, with the rounds tried and the last wait's outcome.
        reason: String,
    },
    /// The load was abandoned before it produced a result (its task ended abnormally).
    #[error("load of {url} was aborted")]
    LoadAborted {
        /// The canonical module URL.
        url: String,
    },
}

impl LookupError {
    /// A database error from any backend.
    pub fn database(
        operation: &'static str,
        transient: bool,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        LookupError::Database { operation, transient, source: Arc::new(source) }
    }

    /// Whether retrying the same call may succeed (a transient database or prerender failure).
    pub fn is_transient(&self) -> bool {
        match self {
            LookupError::Database { transient, .. } => *transient,
            LookupError::Prerender { .. }
            | LookupError::LoadAborted { .. }
            | LookupError::PopulateFailed { .. } => true,
            _ => false,
        }
    }

    /// Whether the thing asked for does not exist (module or definition).
    pub fn is_not_found(&self) -> bool {
        matches!(self, LookupError::ModuleNotFound { .. } | LookupError::DefinitionNotFound { .. })
    }

    /// The module error detail carried by this error, if any.
    pub fn module_error(&self) -> Option<&ErrorDetail> {
        match self {
            LookupError::ModuleError { error, .. } => Some(&error.error),
            _ => None,
        }
    }
}
