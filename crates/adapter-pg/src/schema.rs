//! Versioned, idempotent creation of the `modules` table (BEHAVIOUR §2).
//!
//! Start-up first *reads* the recorded version: a current schema needs nothing more, so a
//! role that may only read (and write rows) starts without any DDL privilege. Only a missing
//! or older schema is migrated, inside one transaction holding a transaction-scoped advisory
//! lock, so many processes starting at once on an empty database serialise there: the first
//! creates the table, the others find the version already recorded and do nothing.
//!
//! Everything here is sent with the simple query protocol (no prepared statements, no
//! session state), so it works through a transaction pooler too.

use deadpool_postgres::ClientWrapper;
use tokio_postgres::SimpleQueryMessage;

use crate::error::PgError;
use crate::sql::Sql;

/// Advisory lock key for schema changes (an arbitrary constant: "deflookup" in ASCII).
const SCHEMA_LOCK_KEY: i64 = 0x6465_666c_6f6f_6b75;

/// The migrations, in order; the version of the schema is the number applied.
/// Each migration in two parts: what it does to the `modules` table (skipped on a table
/// adopted from another system, see [`adopt`]), and what it does to deflookup's own objects.
const MIGRATIONS: &[(&str, &str)] = &[
    // 1: the table of BEHAVIOUR §2. UNLOGGED: it is a cache, losing it on a crash is fine and its
    // writes skip the WAL. The GIN index serves the consumer closure (`deps @> [name]`).
    (
        "CREATE UNLOGGED TABLE _S_modules (
        url text NOT NULL,
        cache_scope text NOT NULL,
        auth_user_id text NOT NULL,
        resolved_realm_url text NOT NULL,
        definitions jsonb,
        deps jsonb,
        error_doc jsonb,
        created_at bigint,
        file_alias text,
        url_hash text GENERATED ALWAYS AS (md5(url)) STORED,
        diagnostics jsonb,
        CONSTRAINT modules_pkey PRIMARY KEY (url_hash, cache_scope, auth_user_id)
    );
    CREATE INDEX modules_resolved_realm_url_index ON _S_modules (resolved_realm_url);
    CREATE INDEX modules_file_alias_index ON _S_modules (file_alias);
    CREATE INDEX modules_deps_index ON _S_modules USING gin (deps jsonb_path_ops);",
        "",
    ),
    // 2: the durable persist guard (see guard.rs). Logged tables, unlike `modules`: after a
    // crash an empty guard would wave stale persists through.
    (
        "",
        "CREATE SEQUENCE _S_modules_guard_seq;
    CREATE TABLE _S_modules_guard (
        realm text NOT NULL,
        url text NOT NULL,
        seq bigint NOT NULL,
        at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (realm, url)
    );
    CREATE INDEX modules_guard_age_index ON _S_modules_guard (realm, at);
    CREATE TABLE _S_modules_guard_realm (
        realm text PRIMARY KEY,
        latest bigint NOT NULL DEFAULT 0,
        cleared bigint NOT NULL DEFAULT 0,
        pruned_through bigint NOT NULL DEFAULT 0
    );",
    ),
    // 3: new deps entries go straight into the GIN index instead of its pending list. With
    // the pending list on, every `deps @>` probe of the consumer closure scans all rows
    // written since the last VACUUM (measured: 0.6 ms per probe instead of 2 µs after a
    // burst of 10 000 inserts), which a busy realm would pay on every invalidation.
    ("ALTER INDEX _S_modules_deps_index SET (fastupdate = off);", ""),
    // 4: URLs of any length. A btree index entry must fit in a third of a page (2704 bytes),
    // so a long URL (or realm URL) made its row, or its invalidation's guard record,
    // unwritable. Lookups by `file_alias` and `resolved_realm_url` are equalities: hash
    // indexes serve them and store a hash whatever the length (the file_alias index takes
    // the name the reference system gives its own). The guard tables are keyed by the md5
    // of their URLs instead of the URLs.
    (
        "DROP INDEX _S_modules_file_alias_index;
    CREATE INDEX modules_resolved_realm_url_file_alias_index ON _S_modules USING hash (file_alias);
    DROP INDEX _S_modules_resolved_realm_url_index;
    CREATE INDEX modules_resolved_realm_url_index ON _S_modules USING hash (resolved_realm_url);",
        "ALTER TABLE _S_modules_guard DROP CONSTRAINT modules_guard_pkey;
    CREATE UNIQUE INDEX modules_guard_key ON _S_modules_guard (md5(realm), md5(url));
    DROP INDEX _S_modules_guard_age_index;
    CREATE INDEX modules_guard_age_index ON _S_modules_guard (md5(realm), at);
    ALTER TABLE _S_modules_guard_realm DROP CONSTRAINT modules_guard_realm_pkey;
    CREATE UNIQUE INDEX modules_guard_realm_key ON _S_modules_guard_realm (md5(realm));",
    ),
    // 5: the guard's records read as a log (listeners catching up after a lost connection,
    // or polling): a realm's records past a number, without reading the realm's others.
    ("", "CREATE INDEX modules_guard_seq_index ON _S_modules_guard (md5(realm), seq);"),
    // 6: one log entry per invalidation (its URLs in an array) instead of one row per URL: a
    // fan-out writes one row and one index entry instead of, per URL, a row and three index
    // entries with a uniqueness check (measured: 0.25 ms of a one-module invalidation's
    // 0.9 ms). A persist's check reads only the entries past its stamp (the `seq` index),
    // and the prune reads that index from the oldest entry (see guard.rs). The records of
    // version 5 are carried over, one entry per number, so loads in flight stay guarded.
    // A realm's row is updated by every invalidation of the realm; each update leaves the old
    // version on the page until the page is pruned, which Postgres does once the page's free
    // space falls below its fillfactor's reserve. At the default (100), about 120 versions of
    // a row piled up first, each read by every invalidation and every load's stamp; with 10,
    // the page is pruned after a dozen.
    (
        "",
        "CREATE TABLE _S_modules_guard_log (
        realm text NOT NULL,
        seq bigint NOT NULL,
        urls text[] NOT NULL,
        at timestamptz NOT NULL DEFAULT statement_timestamp()
    );
    CREATE INDEX modules_guard_log_seq_index ON _S_modules_guard_log (md5(realm), seq);
    INSERT INTO _S_modules_guard_log (realm, seq, urls, at)
        SELECT realm, seq, array_agg(url ORDER BY url), max(at) FROM _S_modules_guard
        GROUP BY realm, seq;
    DROP TABLE _S_modules_guard;
    ALTER TABLE _S_modules_guard_realm SET (fillfactor = 10);",
    ),
];

/// The newest schema version this build knows.
pub(crate) const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

fn schema_error(source: tokio_postgres::Error) -> PgError {
    match PgError::query("create or upgrade the modules schema", source) {
        PgError::Query { source, .. } => PgError::Schema { source },
        denied => denied,
    }
}

/// The first column of the first row of a simple query's reply.
fn first_value(reply: &[SimpleQueryMessage]) -> Option<String> {
    reply.iter().find_map(|message| match message {
        SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    })
}

/// The recorded schema version (0 when nothing was ever created).
async fn recorded_version(sql: &Sql, client: &ClientWrapper) -> Result<i32, PgError> {
    let table = sql.text("_S_deflookup_schema_version");
    let exists = client
        .simple_query(&format!("SELECT to_regclass('{table}') IS NOT NULL"))
        .await
        .map_err(schema_error)?;
    if first_value(&exists).as_deref() != Some("t") {
        return Ok(0);
    }
    let reply = client
        .simple_query(&format!("SELECT coalesce(max(version), 0) FROM {table}"))
        .await
        .map_err(schema_error)?;
    Ok(first_value(&reply).and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// What start-up learnt about the `modules` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableInfo {
    /// The diagnostics column: `diagnostics`, or `timing_diagnostics` on a table made by the
    /// reference system's seed-era revision.
    pub(crate) diagnostics: &'static str,
}

/// Makes sure the schema is at [`SCHEMA_VERSION`]: reads the version, and migrates only when
/// it is behind. A `modules` table another system made (the reference's) is adopted, not
/// altered: see [`adopt`]. The caller closes the connection if this fails (a migration's
/// transaction is then rolled back).
pub(crate) async fn ensure(
    sql: &Sql,
    client: &ClientWrapper,
    schema: Option<&str>,
    shared_indexes: bool,
) -> Result<TableInfo, PgError> {
    let found = recorded_version(sql, client).await?;
    if found > SCHEMA_VERSION {
        return Err(PgError::UnsupportedSchemaVersion { found, supported: SCHEMA_VERSION });
    }
    if found < SCHEMA_VERSION {
        migrate(sql, client, schema, shared_indexes).await?;
    }
    table_info(sql, client).await
}

/// The diagnostics column of the table.
async fn table_info(sql: &Sql, client: &ClientWrapper) -> Result<TableInfo, PgError> {
    let columns = columns(sql, client).await?;
    let diagnostics = if columns.iter().any(|(name, _)| name == "diagnostics") {
        "diagnostics"
    } else {
        "timing_diagnostics"
    };
    Ok(TableInfo { diagnostics })
}

/// The `modules` table's columns and their types, as `format_type` spells them.
async fn columns(sql: &Sql, client: &ClientWrapper) -> Result<Vec<(String, String)>, PgError> {
    let table = sql.text("_S_modules");
    let reply = client
        .simple_query(&format!(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = to_regclass('{table}') AND attnum > 0 AND NOT attisdropped"
        ))
        .await
        .map_err(schema_error)?;
    Ok(reply
        .iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some((row.get(0)?.to_owned(), row.get(1)?.to_owned())),
            _ => None,
        })
        .collect())
}

/// Checks that a `modules` table deflookup did not create can be shared: every column
/// deflookup reads and writes, by name and kind (`text` or `varchar` alike), collations that
/// compare byte for byte, and the primary key its upserts name. Everything that differs is
/// listed in the error.
async fn check_shareable(sql: &Sql, client: &ClientWrapper) -> Result<(), PgError> {
    let columns = columns(sql, client).await?;
    let kind_of = |name: &str| columns.iter().find(|(n, _)| n == name).map(|(_, t)| t.as_str());
    let text_like = |t: &str| t == "text" || t.starts_with("character varying");
    let mut differences = Vec::new();
    let expected: [(&str, &str); 10] = [
        ("url", "text"),
        ("cache_scope", "text"),
        ("auth_user_id", "text"),
        ("resolved_realm_url", "text"),
        ("definitions", "jsonb"),
        ("deps", "jsonb"),
        ("error_doc", "jsonb"),
        ("created_at", "bigint"),
        ("file_alias", "text"),
        ("url_hash", "text"),
    ];
    for (name, kind) in expected {
        match kind_of(name) {
            None => differences.push(format!("column {name} is missing")),
            Some(found) if kind == "text" && !text_like(found) => {
                differences.push(format!("column {name} is {found}, not text or varchar"))
            }
            Some(found) if kind != "text" && found != kind => {
                differences.push(format!("column {name} is {found}, not {kind}"))
            }
            Some(_) => {}
        }
    }
    match (kind_of("diagnostics"), kind_of("timing_diagnostics")) {
        (Some("jsonb"), _) | (None, Some("jsonb")) => {}
        (None, None) => {
            differences.push("column diagnostics (or timing_diagnostics) is missing".into())
        }
        _ => differences.push("column diagnostics is not jsonb".into()),
    }
    let table = sql.text("_S_modules");
    // Reads ask for a realm, scope and user by equality and take the row's from what they
    // asked (store.rs); URLs and aliases are matched the same way. That holds only for a
    // collation that compares byte for byte.
    let loose = client
        .simple_query(&format!(
            "SELECT a.attname, c.collname FROM pg_attribute a \
             JOIN pg_collation c ON c.oid = a.attcollation \
             WHERE a.attrelid = to_regclass('{table}') AND a.attnum > 0 \
             AND NOT a.attisdropped AND NOT c.collisdeterministic ORDER BY a.attnum"
        ))
        .await
        .map_err(schema_error)?;
    for message in &loose {
        if let SimpleQueryMessage::Row(row) = message {
            let (column, collation) = (row.get(0).unwrap_or("?"), row.get(1).unwrap_or("?"));
            differences.push(format!(
                "column {column} has the nondeterministic collation {collation}, and deflookup \
                 compares values byte for byte"
            ));
        }
    }
    let pkey = client
        .simple_query(&format!(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE conrelid = to_regclass('{table}') AND conname = 'modules_pkey'"
        ))
        .await
        .map_err(schema_error)?;
    let pkey = first_value(&pkey);
    if pkey.as_deref() != Some("PRIMARY KEY (url_hash, cache_scope, auth_user_id)") {
        differences.push(format!(
            "its primary key modules_pkey is {}, not (url_hash, cache_scope, auth_user_id)",
            pkey.as_deref().unwrap_or("missing")
        ));
    }
    if differences.is_empty() {
        Ok(())
    } else {
        Err(PgError::IncompatibleTable { table, differences: differences.join("; ") })
    }
}

/// Adopts a `modules` table another system created (the reference's, either revision): it is
/// checked, never altered; next to it deflookup adds only its own objects: its version
/// table, the guard tables, a marker that the table is adopted and, unless
/// `shared_indexes` is off, the one index it needs that the reference does not make (GIN
/// on `deps`, for the consumer closure), under a name of its own.
async fn adopt(sql: &Sql, client: &ClientWrapper, shared_indexes: bool) -> Result<(), PgError> {
    check_shareable(sql, client).await?;
    let mut statements = vec![sql.text("CREATE TABLE IF NOT EXISTS _S_deflookup_adopted_table ()")];
    if shared_indexes {
        statements.push(sql.text(
            "CREATE INDEX IF NOT EXISTS deflookup_modules_deps_index ON _S_modules \
             USING gin (deps jsonb_path_ops) WITH (fastupdate = off)",
        ));
    }
    client.batch_execute(&statements.join("; ")).await.map_err(schema_error)?;
    tracing::info!(table = %sql.text("_S_modules"), "adopted an existing modules table");
    Ok(())
}

/// Brings the schema up to [`SCHEMA_VERSION`] in one transaction; a no-op when another
/// process did it first.
async fn migrate(
    sql: &Sql,
    client: &ClientWrapper,
    schema: Option<&str>,
    shared_indexes: bool,
) -> Result<(), PgError> {
    client
        .batch_execute(&format!("BEGIN; SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY})"))
        .await
        .map_err(schema_error)?;
    if let Some(schema) = schema {
        // The name was validated as a plain identifier by `PgConfig`.
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .await
            .map_err(schema_error)?;
    }
    let table = sql.text("_S_deflookup_schema_version");
    client
        .batch_execute(&format!("CREATE TABLE IF NOT EXISTS {table} (version integer NOT NULL)"))
        .await
        .map_err(schema_error)?;
    let found = recorded_version(sql, client).await?;
    if found > SCHEMA_VERSION {
        return Err(PgError::UnsupportedSchemaVersion { found, supported: SCHEMA_VERSION });
    }
    let exists = |name: &str| {
        let name = sql.text(name);
        async move {
            let reply = client
                .simple_query(&format!("SELECT to_regclass('{name}') IS NOT NULL"))
                .await
                .map_err(schema_error)?;
            Ok::<bool, PgError>(first_value(&reply).as_deref() == Some("t"))
        }
    };
    // A table nobody recorded creating is another system's: adopt it.
    if found == 0 && exists("_S_modules").await? {
        adopt(sql, client, shared_indexes).await?;
    }
    let adopted = exists("_S_deflookup_adopted_table").await?;
    for (index, (on_modules, own)) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = index as i32 + 1;
        let mut text = String::new();
        if !adopted && !on_modules.is_empty() {
            text.push_str(&sql.text(on_modules));
            text.push_str(";\n");
        }
        if !own.is_empty() {
            text.push_str(&sql.text(own));
            text.push_str(";\n");
        }
        text.push_str(&format!("INSERT INTO {table} (version) VALUES ({version})"));
        client.batch_execute(&text).await.map_err(schema_error)?;
        tracing::info!(version, adopted, "applied modules schema migration");
    }
    client.batch_execute("COMMIT").await.map_err(schema_error)
}
