//! The row operations of a load (read, stamp, write) over any connection: a pooled one for
//! [`PgAdapter`](crate::PgAdapter), or the one a populate lease holds its lock on.

use std::future::Future as _;
use std::task::Poll;

use deadpool_postgres::{ClientWrapper, Object};
use lookup_core::{CacheEntry, EntryScope, ErrorDoc, LoadStamp, PersistOutcome};
use serde_json::{Map, Value};
use tokio_postgres::Row;
use tokio_postgres::types::{Json, ToSql};

use crate::error::PgError;
use crate::guard;
use crate::sql::{Sql, Stmt};

/// The columns read, `_D_` standing for the diagnostics column (`diagnostics`, or
/// `timing_diagnostics` in a table of the reference's seed-era revision). Not the realm, the
/// scope or the user: every read asks for rows of one realm, scope and user by equality
/// (byte for byte: an adopted table whose collation compares otherwise is refused,
/// `schema::check_shareable`), so a row read has the ones asked for, and decoding them again (a
/// type check, a UTF-8 check and a copy each) cost a sixth of the adapter's work on a hit.
const SELECT_COLUMNS: &str =
    "url, definitions, deps, error_doc, created_at, file_alias, _D_ AS diagnostics";

/// The positions of [`SELECT_COLUMNS`] in a row read: rows are decoded by position, without
/// looking each column up by name.
mod col {
    pub(super) const URL: usize = 0;
    pub(super) const DEFINITIONS: usize = 1;
    pub(super) const DEPS: usize = 2;
    pub(super) const ERROR_DOC: usize = 3;
    pub(super) const CREATED_AT: usize = 4;
    pub(super) const FILE_ALIAS: usize = 5;
    pub(super) const DIAGNOSTICS: usize = 6;
}

/// The columns written.
const COLUMNS: &str = "url, cache_scope, auth_user_id, resolved_realm_url, definitions, deps, \
                       error_doc, created_at, file_alias, _D_";

/// What an upsert does when the row exists: replace everything but the key.
const UPSERT_TAIL: &str = "ON CONFLICT ON CONSTRAINT modules_pkey DO UPDATE SET \
     resolved_realm_url = EXCLUDED.resolved_realm_url, definitions = EXCLUDED.definitions, \
     deps = EXCLUDED.deps, error_doc = EXCLUDED.error_doc, created_at = EXCLUDED.created_at, \
     file_alias = EXCLUDED.file_alias, _D_ = EXCLUDED._D_";

pub(crate) fn query_error(
    operation: &'static str,
) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    move |source| PgError::query(operation, source)
}

/// Rows of `$1..$3` (realm, scope, user) whose url is `$4` (found through `url_hash`, the
/// primary key) or whose alias is `$5`.
pub(crate) fn read_row_sql() -> String {
    format!(
        "SELECT {SELECT_COLUMNS} FROM _S_modules WHERE {} \
         AND cache_scope = $2 AND auth_user_id = $3 AND (url_hash = md5($4) OR file_alias = $5)",
        crate::sql::in_realm!()
    )
}

/// Rows of `$1..$3` whose url or alias is one of `$4`: those found by URL, then those found
/// by alias (a row found both ways, or named twice, comes more than once; [`read_rows_batch`]
/// keeps it once). Each name is looked up in the primary key or the alias index by a
/// subquery that knows only the name and the scope (`OFFSET 0` keeps the planner from
/// merging the realm's condition into it): a plan kept for the prepared statement is made
/// for an average realm, and one that reads "the realm's few rows" and matches them against
/// the names reads every row of a large realm (the plan test, `sql/plans.rs`, builds one).
pub(crate) fn read_batch_sql() -> String {
    let found = |by: &str| {
        format!(
            "SELECT {SELECT_COLUMNS} FROM unnest($4::text[]) AS n(name) \
             CROSS JOIN LATERAL (SELECT * FROM _S_modules WHERE {by} \
                 AND cache_scope = $2 AND auth_user_id = $3 OFFSET 0) AS m \
             WHERE m.resolved_realm_url = $1"
        )
    };
    format!("{} UNION ALL {}", found("url_hash = md5(n.name)"), found("file_alias = n.name"))
}

/// The unconditional write of a row.
pub(crate) fn plain_upsert_sql() -> String {
    format!(
        "INSERT INTO _S_modules ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         {UPSERT_TAIL}"
    )
}

/// The guarded write: only if [`guard::FRESH`]; returns a row when written.
pub(crate) fn guarded_insert_sql() -> String {
    format!(
        "INSERT INTO _S_modules ({COLUMNS}) SELECT $1::text, $2::text, $3::text, $4::text, \
         $5::jsonb, $6::jsonb, $7::jsonb, $8::bigint, $9::text, $10::jsonb WHERE {} {UPSERT_TAIL} RETURNING 1",
        guard::FRESH
    )
}

/// Rows of `scope` whose url is `url` or whose alias is `alias`.
pub(crate) async fn read_rows(
    sql: &Sql,
    client: &ClientWrapper,
    scope: &EntryScope,
    url: &str,
    alias: &str,
) -> Result<Vec<CacheEntry>, PgError> {
    let params: [&(dyn ToSql + Sync); 5] =
        [&scope.realm_url, &scope.scope.as_str(), &scope.user, &url, &alias];
    read_entries(sql, client, &sql.read_row, &params, scope, "read row").await
}

/// Rows of `scope` whose url or alias is one of `names`.
pub(crate) async fn read_rows_batch(
    sql: &Sql,
    client: &ClientWrapper,
    scope: &EntryScope,
    names: &[String],
) -> Result<Vec<CacheEntry>, PgError> {
    let params: [&(dyn ToSql + Sync); 4] =
        [&scope.realm_url, &scope.scope.as_str(), &scope.user, &names];
    let mut rows = read_entries(sql, client, &sql.read_batch, &params, scope, "read rows").await?;
    // One scope: a row is its URL. Found by URL and by alias, it came twice.
    let mut seen = std::collections::HashSet::new();
    rows.retain(|row| seen.insert(row.url.clone()));
    Ok(rows)
}

/// The durable guard's stamp of a load in `realm_url` (see guard.rs).
pub(crate) async fn stamp(
    sql: &Sql,
    client: &ClientWrapper,
    realm_url: &str,
) -> Result<LoadStamp, PgError> {
    let rows =
        sql.query(client, &sql.stamp, &[&realm_url]).await.map_err(query_error("stamp load"))?;
    Ok(LoadStamp(rows.first().map(|row| row.get(0)).unwrap_or(0)))
}

/// A row's columns, encoded once for either kind of write.
pub(crate) struct RowParams<'a> {
    entry: &'a CacheEntry,
    scope: &'static str,
    definitions: Value,
    deps: Value,
    error_doc: Option<Value>,
    diagnostics: Option<Value>,
}

impl<'a> RowParams<'a> {
    pub(crate) fn new(entry: &'a CacheEntry) -> Result<Self, PgError> {
        let error_doc = match &entry.error {
            Some(doc) => Some(serde_json::to_value(doc).map_err(|e| PgError::CorruptRow {
                url: entry.url.clone(),
                column: "error_doc",
                source: Box::new(e),
            })?),
            None => None,
        };
        Ok(RowParams {
            entry,
            scope: entry.cache_scope.as_str(),
            definitions: Value::Object(entry.definitions.clone()),
            deps: serde_json::to_value(&entry.deps).unwrap_or_default(),
            error_doc,
            diagnostics: entry.diagnostics.clone().filter(|v| !v.is_null()),
        })
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 10] {
        let e = self.entry;
        [
            &e.url,
            &self.scope,
            &e.auth_user_id,
            &e.resolved_realm_url,
            &self.definitions,
            &self.deps,
            &self.error_doc,
            &e.created_at,
            &e.file_alias,
            &self.diagnostics,
        ]
    }
}

/// Writes the row unconditionally.
pub(crate) async fn plain_upsert(
    sql: &Sql,
    client: &ClientWrapper,
    row: &RowParams<'_>,
) -> Result<(), PgError> {
    sql.query(client, &sql.plain_upsert, &row.params()).await.map_err(query_error("upsert"))?;
    Ok(())
}

/// The guarded write, inside a transaction the caller owns: takes the realm's shared lock and
/// inserts only if no invalidation newer than `stamp` covers the row. The caller commits (and
/// must not release the lock before the commit).
pub(crate) async fn guarded_insert(
    sql: &Sql,
    client: &ClientWrapper,
    row: &RowParams<'_>,
    stamp: LoadStamp,
) -> Result<PersistOutcome, PgError> {
    sql.prepare(client, &[&sql.lock_realm_shared, &sql.guarded_insert])
        .await
        .map_err(query_error("upsert"))?;
    let entry = row.entry;
    let mut checked: Vec<&str> = vec![&entry.url, &entry.file_alias];
    checked.extend(entry.deps.iter().map(String::as_str));
    let mut all: Vec<&(dyn ToSql + Sync)> = row.params().to_vec();
    all.push(&checked);
    all.push(&stamp.0);
    // Pipelined: the lock request is written to the connection by the first poll of its
    // future, before the insert's future even exists, so the server runs the lock first
    // and the insert (with a fresh snapshot, as its own statement) once the lock is held.
    // One round trip for both.
    let lock_params: [&(dyn ToSql + Sync); 3] =
        [&guard::LOCK_NS_REALM, &entry.resolved_realm_url, &guard::LOCK_NS_GLOBAL];
    let (locked, written) = {
        let mut locking = std::pin::pin!(sql.query(client, &sql.lock_realm_shared, &lock_params));
        let first_poll = std::future::poll_fn(|cx| Poll::Ready(locking.as_mut().poll(cx))).await;
        let inserting = sql.query(client, &sql.guarded_insert, &all);
        let locked = async {
            match first_poll {
                Poll::Ready(result) => result,
                Poll::Pending => locking.await,
            }
        };
        tokio::join!(locked, inserting)
    };
    locked.map_err(query_error("upsert"))?;
    let written = written.map_err(query_error("upsert"))?;
    Ok(if written.is_empty() { PersistOutcome::Stale } else { PersistOutcome::Written })
}

/// A JSON column decoded as `T`; SQL `NULL` and JSON `null` are `None`. A document that is not
/// a `T` is a [`PgError::CorruptRow`].
fn decode_json<T: serde::de::DeserializeOwned>(
    row: &Row,
    row_url: &str,
    index: usize,
    column: &'static str,
) -> Result<Option<T>, PgError> {
    let corrupt = |source: Box<dyn std::error::Error + Sync + Send>| PgError::CorruptRow {
        url: row_url.to_owned(),
        column,
        source,
    };
    // The driver's `Json` decodes straight into `T`, without a `Value` in between.
    let decoded = row.try_get::<_, Option<Json<Option<T>>>>(index);
    Ok(decoded.map_err(|e| corrupt(Box::new(e)))?.and_then(|Json(value)| value))
}

/// The entry of a row read in `scope` (see [`SELECT_COLUMNS`]).
fn entry_from_row(row: &Row, scope: &EntryScope) -> Result<CacheEntry, PgError> {
    let url: String = row.get(col::URL);
    // Lenient with rows another writer stored (the reference system shares the table): a
    // `null` or odd `definitions` reads as none, `deps` keeps its strings.
    let definitions: Map<String, Value> = match row.get::<_, Option<Value>>(col::DEFINITIONS) {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    };
    let deps = string_list(row.get(col::DEPS));
    let error: Option<ErrorDoc> = decode_json(row, &url, col::ERROR_DOC, "error_doc")?;
    let file_alias: Option<String> = row.get(col::FILE_ALIAS);
    Ok(CacheEntry {
        file_alias: file_alias.unwrap_or_else(|| lookup_core::urls::file_alias(&url)),
        url,
        cache_scope: scope.scope,
        auth_user_id: scope.user.clone(),
        resolved_realm_url: scope.realm_url.clone(),
        definitions,
        deps,
        error,
        created_at: row.get(col::CREATED_AT),
        diagnostics: row.get::<_, Option<Value>>(col::DIAGNOSTICS).filter(|v| !v.is_null()),
    })
}

/// The strings of a stored JSON list (`deps`), skipping anything else; `null` or a non-list
/// is no list.
pub(crate) fn string_list(value: Option<Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => {
            let string = |item| match item {
                Value::String(text) => Some(text),
                _ => None,
            };
            items.into_iter().filter_map(string).collect()
        }
        _ => Vec::new(),
    }
}

/// The entries of the rows `statement` reads in `scope`, each decoded as it arrives (no list
/// of rows in between); the first row that cannot be decoded is the error.
async fn read_entries(
    sql: &Sql,
    client: &ClientWrapper,
    statement: &Stmt,
    params: &[&(dyn ToSql + Sync)],
    scope: &EntryScope,
    operation: &'static str,
) -> Result<Vec<CacheEntry>, PgError> {
    let mut entries = Vec::new();
    let mut corrupt = None;
    // After a corrupt row the rest are only drained, not decoded.
    let decode = |row: Row| {
        if corrupt.is_none() {
            match entry_from_row(&row, scope) {
                Ok(entry) => entries.push(entry),
                Err(error) => corrupt = Some(error),
            }
        }
    };
    sql.for_each_row(client, statement, params, decode).await.map_err(query_error(operation))?;
    match corrupt {
        Some(error) => Err(error),
        None => Ok(entries),
    }
}

/// A pooled connection checked out for one operation, which goes back to the pool only when
/// the operation [`finish`](Self::finish)es. Dropped unfinished (an error, a timeout, or the
/// caller cancelled the operation), the connection is closed rather than pooled: the server
/// rolls back any transaction begun by a raw `BEGIN` and releases its locks, and the pool's
/// next user never inherits an open transaction or a request still waiting for its answer.
pub(crate) struct Checkout {
    client: Option<Object>,
}

impl Checkout {
    pub(crate) fn new(client: Object) -> Self {
        Checkout { client: Some(client) }
    }

    pub(crate) fn client(&self) -> &Object {
        self.client.as_ref().expect("present until finished")
    }

    /// The transaction ended (committed or rolled back): the connection may be pooled.
    pub(crate) fn finish(mut self) {
        self.client.take();
    }

    /// The transaction goes on elsewhere (a populate lease): hands the connection over.
    pub(crate) fn into_inner(mut self) -> Object {
        self.client.take().expect("present until finished")
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_column_positions_follow_the_select_list() {
        let names: Vec<&str> = SELECT_COLUMNS
            .split(',')
            .map(|column| column.split_whitespace().last().expect("a column"))
            .collect();
        let positions = [
            ("url", col::URL),
            ("definitions", col::DEFINITIONS),
            ("deps", col::DEPS),
            ("error_doc", col::ERROR_DOC),
            ("created_at", col::CREATED_AT),
            ("file_alias", col::FILE_ALIAS),
            ("diagnostics", col::DIAGNOSTICS),
        ];
        assert_eq!(names.len(), positions.len());
        for (name, position) in positions {
            assert_eq!(names[position], name);
        }
    }
}
