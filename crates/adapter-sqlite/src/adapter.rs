//! [`SqliteAdapter`]: the connection, its one blocking entry point, and the SQL of each
//! [`DbAdapter`] operation.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lookup_core::{
    CacheEntry, ConsumerRow, DbAdapter, EntryScope, Invalidation, LoadStamp, LookupError,
    PersistOutcome, RowStore,
};
use rusqlite::{Connection, params};

use crate::error::{SqliteError, is_busy};
use crate::rows::{self, RawRow, entry_columns};
use crate::schema::{self, MigrateError};

/// How long a statement waits for another connection's lock before failing as transient.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`SqliteAdapter::from_url`] accepts for an in-memory database.
const MEMORY_URL: &str = "sqlite::memory:";

/// The prefix of a file URL accepted by [`SqliteAdapter::from_url`].
const FILE_URL_PREFIX: &str = "sqlite://";

/// A [`DbAdapter`] over one SQLite connection.
///
/// Cloning is cheap and shares the connection. Every operation locks the connection on a
/// blocking thread (see the crate documentation), so operations of one adapter run one at a time.
#[derive(Clone)]
pub struct SqliteAdapter {
    conn: Arc<Mutex<Connection>>,
    /// The file, or `:memory:`; kept for `Debug` and error messages.
    path: PathBuf,
}

impl std::fmt::Debug for SqliteAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteAdapter").field("path", &self.path).finish_non_exhaustive()
    }
}

impl SqliteAdapter {
    /// Opens (creating it if missing) the database file at `path` and brings its schema up to
    /// date.
    ///
    /// The file is switched to WAL journaling and statements wait up to 5 s for a lock. This
    /// call blocks on file I/O: call it at startup, or inside `spawn_blocking`.
    ///
    /// # Errors
    /// [`SqliteError::Open`] when the path cannot be opened or is not an SQLite database,
    /// [`SqliteError::Schema`] when the table cannot be created, and
    /// [`SqliteError::UnsupportedSchemaVersion`] when a newer build wrote the file. Each names
    /// the path.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SqliteError> {
        let path = path.as_ref().to_path_buf();
        let conn = Connection::open(&path).map_err(|e| open_error(&path, e))?;
        Self::init(conn, path, true)
    }

    /// Opens a fresh, private in-memory database (gone when the last clone is dropped).
    ///
    /// # Errors
    /// [`SqliteError::Open`] or [`SqliteError::Schema`] if SQLite cannot allocate it.
    pub fn open_in_memory() -> Result<Self, SqliteError> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(|e| open_error(&path, e))?;
        Self::init(conn, path, false)
    }

    /// Opens the database a URL names: `sqlite://PATH` (PATH relative, or absolute as in
    /// `sqlite:///var/cache/deflookup.db`) or `sqlite::memory:`.
    ///
    /// # Errors
    /// [`SqliteError::InvalidUrl`], naming the URL, for any other form (including query
    /// strings such as `?mode=ro`, which are not interpreted); otherwise as [`Self::open`].
    pub fn from_url(url: &str) -> Result<Self, SqliteError> {
        if url == MEMORY_URL {
            return Self::open_in_memory();
        }
        let invalid = |reason| SqliteError::InvalidUrl { url: url.to_owned(), reason };
        let path = url.strip_prefix(FILE_URL_PREFIX).ok_or_else(|| invalid("not a sqlite URL"))?;
        if path.is_empty() {
            return Err(invalid("the path is empty"));
        }
        // Refused rather than taken literally: `x.db?mode=ro` would otherwise silently create
        // a writable file of that name.
        if path.contains(['?', '#']) {
            return Err(invalid("query strings and fragments are not supported"));
        }
        Self::open(path)
    }

    fn init(mut conn: Connection, path: PathBuf, file: bool) -> Result<Self, SqliteError> {
        conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| open_error(&path, e))?;
        if file {
            // WAL lets readers in other processes (an operator's `sqlite3` shell, a CLI) read
            // while this one writes. This is also the first statement that reads the file, so
            // it is where a file that is not a database is caught.
            let mode = enable_wal(&conn).map_err(|e| open_error(&path, e))?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(path = %path.display(), mode, "SQLite refused WAL journaling");
            }
            // In WAL mode NORMAL cannot corrupt the file; it may lose the last commits on power
            // loss, which a cache tolerates (the rows are re-rendered).
            conn.pragma_update(None, "synchronous", "NORMAL").map_err(|e| open_error(&path, e))?;
        }
        schema::migrate(&mut conn).map_err(|e| match e {
            MigrateError::Sqlite(source) => {
                SqliteError::Schema { path: path.clone(), source: Box::new(source) }
            }
            MigrateError::Unsupported(found) => SqliteError::UnsupportedSchemaVersion {
                path: path.clone(),
                found,
                supported: schema::LATEST_VERSION,
            },
        })?;
        Ok(SqliteAdapter { conn: Arc::new(Mutex::new(conn)), path })
    }

    /// The number of rows in `modules`, across every realm, scope and user.
    ///
    /// # Errors
    /// [`SqliteError::Query`] when SQLite fails.
    pub async fn row_count(&self) -> Result<u64, SqliteError> {
        let count: i64 = self
            .with_conn("row_count", |conn| {
                conn.query_row("SELECT COUNT(*) FROM modules", [], |row| row.get(0))
            })
            .await?;
        Ok(u64::try_from(count).unwrap_or_default())
    }

    /// Runs `f` with the connection on tokio's blocking pool. This is the only place this crate
    /// touches the connection after construction.
    ///
    /// The work is not cancelled with the caller: if the returned future is dropped, `f` still
    /// runs to completion, so an upsert lands whole or (on error) not at all.
    async fn with_conn<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, SqliteError> {
        let conn = Arc::clone(&self.conn);
        let joined = tokio::task::spawn_blocking(move || {
            // A panic inside an earlier `f` poisons the mutex, but cannot leave the connection
            // mid-transaction (rusqlite rolls back on drop), so the connection is still sound.
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn)
        })
        .await;
        match joined {
            Ok(result) => result.map_err(|e| SqliteError::query(&self.path, op, e)),
            Err(e) => Err(SqliteError::Worker { operation: op, source: Box::new(e) }),
        }
    }

    /// Reads entries with `sql`, whose five parameters are realm, scope, user and two more.
    async fn read_entries(
        &self,
        op: &'static str,
        sql: &'static str,
        scope: &EntryScope,
        first: String,
        second: String,
    ) -> Result<Vec<CacheEntry>, SqliteError> {
        let (realm, cache_scope, user) =
            (scope.realm_url.clone(), scope.scope.as_str(), scope.user.clone());
        let raw = self
            .with_conn(op, move |conn| {
                let mut stmt = conn.prepare_cached(sql)?;
                let rows = stmt.query_map(
                    params![realm, cache_scope, user, first, second],
                    RawRow::from_row,
                )?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        raw.into_iter().map(|row| row.decode(op)).collect()
    }
}

/// Switches the file to WAL journaling and returns the journal mode now in force.
///
/// Switching a fresh file needs an exclusive lock, and when another connection opening the same
/// fresh file holds a shared lock, SQLite answers BUSY at once instead of waiting (waiting
/// there could deadlock), so the busy timeout does not cover it. Two processes starting
/// together on a new cache file would otherwise fail at random; retry until the timeout instead.
/// Once the file is in WAL mode (the mode is stored in the file), the switch is a no-op.
fn enable_wal(conn: &Connection) -> rusqlite::Result<String> {
    let deadline = Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0)) {
            Err(e) if is_busy(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

/// Wraps an error met while opening or configuring `path`.
fn open_error(path: &Path, source: rusqlite::Error) -> SqliteError {
    SqliteError::Open { path: path.to_path_buf(), source: Box::new(source) }
}

/// Encodes names as a JSON array, so a list of any length binds as one parameter for
/// `json_each` (no SQL built per call, no variable-count placeholders).
fn json_array(names: &[String]) -> String {
    // A slice of strings always serialises.
    serde_json::to_string(names).unwrap_or_else(|_| "[]".to_owned())
}

// In the reads and the module delete below, `+resolved_realm_url` (a unary plus) keeps SQLite
// from using the realm index for that term. Without table statistics the planner may otherwise
// pick it and scan every row of a large realm; with it, the planner looks the url up in the
// primary key and the alias in the `file_alias` index (a multi-index OR), then checks the realm.

const READ_ROWS_SQL: &str = concat!(
    "SELECT ",
    entry_columns!(),
    " FROM modules
     WHERE +resolved_realm_url = ?1 AND cache_scope = ?2 AND auth_user_id = ?3
       AND (url = ?4 OR file_alias = ?5)"
);

// ?5 repeats ?4: `read_entries` binds five parameters and the names go in both.
const READ_ROWS_BATCH_SQL: &str = concat!(
    "SELECT ",
    entry_columns!(),
    " FROM modules
     WHERE +resolved_realm_url = ?1 AND cache_scope = ?2 AND auth_user_id = ?3
       AND (url IN (SELECT value FROM json_each(?4))
            OR file_alias IN (SELECT value FROM json_each(?5)))"
);

const UPSERT_SQL: &str = "
    INSERT INTO modules (url, cache_scope, auth_user_id, resolved_realm_url, definitions, deps,
                         error_doc, created_at, file_alias, diagnostics)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
    ON CONFLICT (url, cache_scope, auth_user_id) DO UPDATE SET
        resolved_realm_url = excluded.resolved_realm_url,
        definitions = excluded.definitions,
        deps = excluded.deps,
        error_doc = excluded.error_doc,
        created_at = excluded.created_at,
        file_alias = excluded.file_alias,
        diagnostics = excluded.diagnostics";

/// The consumer closure in one statement (BEHAVIOUR §4.1, **Beyond**).
///
/// `reach` starts from the given names; each row of the realm whose `deps` contain a reached
/// name adds its `url` and `file_alias`. `UNION` (not `UNION ALL`) discards names already
/// reached, so a dependency cycle stops growing and the recursion ends. The outer query returns
/// every row of the realm with a dependency in `reach`, which covers rows depending directly on
/// a given name as well as transitive ones.
///
/// A `deps` that is not valid JSON would abort `json_each` with an error naming no row, so it
/// is read as `[]` inside the recursion, and the row itself is returned; decoding it then fails
/// with an error naming its `url`, instead of the invalidation silently missing a consumer.
const CONSUMERS_SQL: &str = "
    WITH RECURSIVE reach(name) AS (
        SELECT value FROM json_each(?2)
        UNION
        SELECT x.value
        FROM reach
        JOIN modules AS m ON m.resolved_realm_url = ?1
        JOIN json_each(CASE WHEN json_valid(m.deps) THEN m.deps ELSE '[]' END) AS d
            ON d.value = reach.name
        JOIN json_each(json_array(m.url, m.file_alias)) AS x
        WHERE x.value IS NOT NULL
    )
    SELECT m.url, m.file_alias, m.deps
    FROM modules AS m
    WHERE m.resolved_realm_url = ?1
      AND (EXISTS (SELECT 1
                   FROM json_each(CASE WHEN json_valid(m.deps) THEN m.deps ELSE '[]' END) AS d
                   WHERE d.value IN (SELECT name FROM reach))
           OR (m.deps IS NOT NULL AND NOT json_valid(m.deps)))";

const DELETE_MODULES_SQL: &str = "
    DELETE FROM modules
    WHERE +resolved_realm_url = ?1
      AND (url IN (SELECT value FROM json_each(?2))
           OR file_alias IN (SELECT value FROM json_each(?2)))";

impl RowStore for SqliteAdapter {
    async fn read_rows(
        &self,
        scope: &EntryScope,
        url: &str,
        alias: &str,
    ) -> Result<Vec<CacheEntry>, LookupError> {
        let rows = self
            .read_entries("read_rows", READ_ROWS_SQL, scope, url.to_owned(), alias.to_owned())
            .await?;
        Ok(rows)
    }

    async fn read_rows_batch(
        &self,
        scope: &EntryScope,
        names: &[String],
    ) -> Result<Vec<CacheEntry>, LookupError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let names = json_array(names);
        let rows = self
            .read_entries("read_rows_batch", READ_ROWS_BATCH_SQL, scope, names.clone(), names)
            .await?;
        Ok(rows)
    }

    /// Writes the row in one `INSERT … ON CONFLICT DO UPDATE`. The stamp is ignored: this
    /// backend has no durable guard (a single process owns the file, and the core's in-memory
    /// generations already refuse stale loads), so the outcome is always `Written`.
    async fn upsert(
        &self,
        entry: &CacheEntry,
        _stamp: LoadStamp,
    ) -> Result<PersistOutcome, LookupError> {
        let json = rows::encode(entry)?;
        // The blocking task outlives this borrow, so it gets owned copies of the key columns.
        let url = entry.url.clone();
        let scope = entry.cache_scope.as_str();
        let user = entry.auth_user_id.clone();
        let realm = entry.resolved_realm_url.clone();
        let created_at = entry.created_at;
        let alias = entry.file_alias.clone();
        self.with_conn("upsert", move |conn| {
            conn.prepare_cached(UPSERT_SQL)?.execute(params![
                url,
                scope,
                user,
                realm,
                json.definitions,
                json.deps,
                json.error_doc,
                created_at,
                alias,
                json.diagnostics,
            ])
        })
        .await?;
        Ok(PersistOutcome::Written)
    }
}

impl DbAdapter for SqliteAdapter {
    async fn consumers(
        &self,
        realm_url: &str,
        names: &[String],
    ) -> Result<Vec<ConsumerRow>, LookupError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let (realm, names) = (realm_url.to_owned(), json_array(names));
        let raw = self
            .with_conn("consumers", move |conn| {
                let mut stmt = conn.prepare_cached(CONSUMERS_SQL)?;
                let rows = stmt.query_map(params![realm, names], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })?;
                rows.collect::<rusqlite::Result<Vec<rows::RawConsumer>>>()
            })
            .await?;
        let consumers = raw
            .into_iter()
            .map(|row| rows::decode_consumer("consumers", row))
            .collect::<Result<_, _>>()?;
        Ok(consumers)
    }

    /// Deletes what `invalidation` covers. There is no broadcast: SQLite has no `NOTIFY`, and a
    /// single process owns the file, so there are no peers to tell.
    async fn apply_invalidation(&self, invalidation: &Invalidation) -> Result<u64, LookupError> {
        const OP: &str = "apply_invalidation";
        let deleted = match invalidation {
            Invalidation::Modules { urls, .. } if urls.is_empty() => 0,
            Invalidation::Modules { realm_url, urls } => {
                let (realm, urls) = (realm_url.clone(), json_array(urls));
                self.with_conn(OP, move |conn| {
                    conn.prepare_cached(DELETE_MODULES_SQL)?.execute(params![realm, urls])
                })
                .await?
            }
            Invalidation::Realm { realm_url } => {
                let realm = realm_url.clone();
                self.with_conn(OP, move |conn| {
                    conn.execute("DELETE FROM modules WHERE resolved_realm_url = ?1", [realm])
                })
                .await?
            }
            Invalidation::Global => {
                self.with_conn(OP, |conn| conn.execute("DELETE FROM modules", [])).await?
            }
        };
        Ok(u64::try_from(deleted).unwrap_or(u64::MAX))
    }
}
