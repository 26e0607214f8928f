//! Mapping between [`CacheEntry`] and the columns of `modules`.
//!
//! Rows leave the blocking task as raw column values and are decoded afterwards, so that a row
//! whose JSON does not parse becomes an error naming its `url` and column, not a bare SQLite
//! conversion error.

use lookup_core::{CacheEntry, CacheScope, ConsumerRow, ErrorDoc, urls};
use serde_json::{Map, Value};

use crate::error::SqliteError;

/// The columns every entry read selects, in the order [`RawRow::from_row`] reads them.
macro_rules! entry_columns {
    () => {
        "url, cache_scope, auth_user_id, resolved_realm_url, definitions, deps, error_doc, \
         created_at, file_alias, diagnostics"
    };
}
pub(crate) use entry_columns;

/// One row of `modules` as SQLite returned it.
#[derive(Debug)]
pub(crate) struct RawRow {
    url: String,
    cache_scope: String,
    auth_user_id: String,
    resolved_realm_url: String,
    definitions: Option<String>,
    deps: Option<String>,
    error_doc: Option<String>,
    created_at: Option<i64>,
    file_alias: Option<String>,
    diagnostics: Option<String>,
}

impl RawRow {
    /// Reads a row selected with [`entry_columns!`].
    pub(crate) fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawRow {
            url: row.get(0)?,
            cache_scope: row.get(1)?,
            auth_user_id: row.get(2)?,
            resolved_realm_url: row.get(3)?,
            definitions: row.get(4)?,
            deps: row.get(5)?,
            error_doc: row.get(6)?,
            created_at: row.get(7)?,
            file_alias: row.get(8)?,
            diagnostics: row.get(9)?,
        })
    }

    /// Decodes the JSON columns; `operation` names the read in the error.
    pub(crate) fn decode(self, operation: &'static str) -> Result<CacheEntry, SqliteError> {
        let corrupt = |column: &'static str, source: Box<dyn std::error::Error + Send + Sync>| {
            SqliteError::CorruptRow { operation, url: self.url.clone(), column, source }
        };
        let cache_scope = CacheScope::parse(&self.cache_scope).ok_or_else(|| {
            corrupt("cache_scope", format!("unknown cache scope {:?}", self.cache_scope).into())
        })?;
        // SQL NULL in a JSON column means "none", as in the reference table.
        let definitions: Map<String, Value> = match &self.definitions {
            Some(text) => {
                serde_json::from_str(text).map_err(|e| corrupt("definitions", e.into()))?
            }
            None => Map::new(),
        };
        let deps = parse_deps(self.deps.as_deref()).map_err(|e| corrupt("deps", e.into()))?;
        let error: Option<ErrorDoc> = match &self.error_doc {
            Some(text) => serde_json::from_str(text).map_err(|e| corrupt("error_doc", e.into()))?,
            None => None,
        };
        let diagnostics: Option<Value> = match &self.diagnostics {
            Some(text) => {
                serde_json::from_str(text).map_err(|e| corrupt("diagnostics", e.into()))?
            }
            None => None,
        };
        // Every row this adapter writes has an alias; a NULL one (a hand-written row) is
        // recomputed rather than refused, since it is a pure function of `url`.
        let file_alias = self.file_alias.unwrap_or_else(|| urls::file_alias(&self.url));
        Ok(CacheEntry {
            url: self.url,
            file_alias,
            cache_scope,
            auth_user_id: self.auth_user_id,
            resolved_realm_url: self.resolved_realm_url,
            definitions,
            deps,
            error,
            created_at: self.created_at,
            diagnostics,
        })
    }
}

/// One row of the consumer closure as SQLite returned it: `url`, `file_alias`, `deps`.
pub(crate) type RawConsumer = (String, Option<String>, Option<String>);

/// Decodes a consumer row; a `deps` that does not parse names the row.
pub(crate) fn decode_consumer(
    operation: &'static str,
    (url, file_alias, deps): RawConsumer,
) -> Result<ConsumerRow, SqliteError> {
    let deps = match parse_deps(deps.as_deref()) {
        Ok(deps) => deps,
        Err(e) => {
            return Err(SqliteError::CorruptRow {
                operation,
                url,
                column: "deps",
                source: e.into(),
            });
        }
    };
    let file_alias = file_alias.unwrap_or_else(|| urls::file_alias(&url));
    Ok(ConsumerRow { url, file_alias, deps })
}

fn parse_deps(text: Option<&str>) -> Result<Vec<String>, serde_json::Error> {
    match text {
        Some(text) => serde_json::from_str(text),
        None => Ok(Vec::new()),
    }
}

/// The JSON columns of an entry, encoded for binding.
#[derive(Debug)]
pub(crate) struct EncodedJson {
    pub(crate) definitions: String,
    pub(crate) deps: String,
    pub(crate) error_doc: Option<String>,
    pub(crate) diagnostics: Option<String>,
}

/// Encodes the JSON columns of `entry`. `None` (and a JSON `null` diagnostic) become SQL NULL.
pub(crate) fn encode(entry: &CacheEntry) -> Result<EncodedJson, SqliteError> {
    let fail = |column: &'static str, source: serde_json::Error| SqliteError::Encode {
        url: entry.url.clone(),
        column,
        source: Box::new(source),
    };
    Ok(EncodedJson {
        definitions: serde_json::to_string(&entry.definitions)
            .map_err(|e| fail("definitions", e))?,
        deps: serde_json::to_string(&entry.deps).map_err(|e| fail("deps", e))?,
        error_doc: entry
            .error
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| fail("error_doc", e))?,
        diagnostics: entry
            .diagnostics
            .as_ref()
            .filter(|value| !value.is_null())
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| fail("diagnostics", e))?,
    })
}
