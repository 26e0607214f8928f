//! Tests of the SQLite specifics: schema, SQL and error reporting. Cache behaviour common to
//! every adapter belongs in the shared behaviour suite, not here.

use std::path::Path;

use lookup_core::{
    CacheEntry, CacheScope, DbAdapter, EntryScope, ErrorDetail, ErrorDoc, Invalidation, LoadStamp,
    LookupError, PersistOutcome, RowStore, urls,
};
use serde_json::{Map, json};

use crate::{SqliteAdapter, SqliteError};

const REALM: &str = "http://test-realm/test/";
const OTHER_REALM: &str = "http://other-realm/test/";

fn public(realm: &str) -> EntryScope {
    EntryScope { realm_url: realm.to_owned(), scope: CacheScope::Public, user: String::new() }
}

fn private(realm: &str, user: &str) -> EntryScope {
    EntryScope { realm_url: realm.to_owned(), scope: CacheScope::RealmAuth, user: user.to_owned() }
}

/// A ready row for `module` (relative to the scope's realm) depending on `deps` (likewise).
fn entry(scope: &EntryScope, module: &str, deps: &[&str]) -> CacheEntry {
    let url = format!("{}{module}", scope.realm_url);
    let alias = urls::file_alias(&url);
    let mut definitions = Map::new();
    definitions.insert(format!("{alias}/default"), json!({"type": "definition", "name": module}));
    CacheEntry {
        file_alias: alias,
        url,
        cache_scope: scope.scope,
        auth_user_id: scope.user.clone(),
        resolved_realm_url: scope.realm_url.clone(),
        definitions,
        deps: deps.iter().map(|dep| format!("{}{dep}", scope.realm_url)).collect(),
        error: None,
        created_at: Some(1_700_000_000_000),
        diagnostics: None,
    }
}

fn names(realm: &str, modules: &[&str]) -> Vec<String> {
    modules.iter().map(|module| format!("{realm}{module}")).collect()
}

async fn put(db: &SqliteAdapter, entry: &CacheEntry) {
    let outcome = db.upsert(entry, LoadStamp::UNGUARDED).await.expect("upsert");
    assert_eq!(outcome, PersistOutcome::Written);
}

fn sorted_urls(entries: &[CacheEntry]) -> Vec<&str> {
    let mut urls: Vec<&str> = entries.iter().map(|entry| entry.url.as_str()).collect();
    urls.sort_unstable();
    urls
}

/// Writes a row by hand through a second connection, bypassing the adapter's encoding.
fn raw_insert(path: &Path, url: &str, definitions: &str, deps: &str) {
    let conn = rusqlite::Connection::open(path).expect("raw open");
    conn.execute(
        "INSERT INTO modules (url, cache_scope, auth_user_id, resolved_realm_url, definitions,
                              deps, file_alias)
         VALUES (?1, 'public', '', ?2, ?3, ?4, ?5)",
        rusqlite::params![url, REALM, definitions, deps, urls::file_alias(url)],
    )
    .expect("raw insert");
}

fn user_version(path: &Path) -> i64 {
    let conn = rusqlite::Connection::open(path).expect("raw open");
    conn.query_row("PRAGMA user_version", [], |row| row.get(0)).expect("user_version")
}

#[tokio::test]
async fn schema_is_idempotent_on_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.db");

    let first = SqliteAdapter::open(&path).expect("first open creates the file");
    put(&first, &entry(&public(REALM), "person.gts", &[])).await;
    // A second adapter on the same file while the first is alive, then a reopen after both
    // are gone: neither recreates the table or loses the row.
    let second = SqliteAdapter::open(&path).expect("second open is a no-op");
    assert_eq!(second.row_count().await.unwrap(), 1);
    drop((first, second));
    let third = SqliteAdapter::open(&path).expect("reopen");
    assert_eq!(third.row_count().await.unwrap(), 1);
    assert_eq!(user_version(&path), crate::schema::LATEST_VERSION);

    let mode: String = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn concurrent_first_opens_of_a_fresh_file_all_succeed() {
    // Several processes starting together on a new cache file: the WAL switch and the schema
    // creation race. Repeated on fresh files because one round rarely hits the window.
    let dir = tempfile::tempdir().unwrap();
    for round in 0..10 {
        let path = dir.path().join(format!("race-{round}.db"));
        let start = std::sync::Arc::new(std::sync::Barrier::new(6));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (path, start) = (path.clone(), std::sync::Arc::clone(&start));
                std::thread::spawn(move || {
                    start.wait();
                    SqliteAdapter::open(path).map(drop)
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("no panic").expect("every racing open succeeds");
        }
        assert_eq!(user_version(&path), crate::schema::LATEST_VERSION);
    }
}

#[test]
fn newer_schema_version_is_refused_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("future.db");
    rusqlite::Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();

    let error = SqliteAdapter::open(&path).expect_err("version 99 is unknown");
    assert!(
        matches!(error, SqliteError::UnsupportedSchemaVersion { found: 99, supported: 1, .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains(&path.display().to_string()), "{error}");
    // Refusing wrote nothing.
    assert_eq!(user_version(&path), 99);
}

#[test]
fn corrupt_file_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.db");
    std::fs::write(&path, "this is not a database, just some text\n".repeat(100)).unwrap();

    let error = SqliteAdapter::open(&path).expect_err("garbage is not a database");
    assert!(matches!(error, SqliteError::Open { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("not a database"), "{message}");
}

#[test]
fn unopenable_paths_are_errors_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing_dir = dir.path().join("no-such-dir").join("cache.db");
    let a_directory = dir.path().to_path_buf();

    for path in [missing_dir, a_directory] {
        let error = SqliteAdapter::open(&path).expect_err("cannot open");
        assert!(matches!(error, SqliteError::Open { .. }), "{error:?}");
        assert!(error.to_string().contains(&path.display().to_string()), "{error}");
        assert!(!error.is_transient());
    }
}

#[tokio::test]
async fn from_url_accepts_memory_and_paths() {
    let memory = SqliteAdapter::from_url("sqlite::memory:").expect("memory");
    assert_eq!(memory.row_count().await.unwrap(), 0);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("from-url.db");
    let url = format!("sqlite://{}", path.display());
    assert!(url.starts_with("sqlite:///"), "an absolute path gives three slashes: {url}");
    SqliteAdapter::from_url(&url).expect("absolute path");
    assert!(path.exists());

    // A relative path is taken relative to the working directory; a missing directory keeps
    // this from creating anything there, and the error shows the path was parsed as relative.
    let error = SqliteAdapter::from_url("sqlite://no-such-dir-for-deflookup/x.db").unwrap_err();
    match &error {
        SqliteError::Open { path, .. } => {
            assert_eq!(path, Path::new("no-such-dir-for-deflookup/x.db"));
        }
        other => panic!("expected an open error, got {other:?}"),
    }
}

#[test]
fn from_url_rejects_other_forms_naming_the_url() {
    for url in [
        "postgres://localhost/deflookup",
        "sqlite://",
        "sqlite:cache.db",
        "sqlite::memory",
        "sqlite://cache.db?mode=ro",
        "",
    ] {
        let error = SqliteAdapter::from_url(url).expect_err(url);
        assert!(matches!(error, SqliteError::InvalidUrl { .. }), "{url}: {error:?}");
        assert!(error.to_string().contains(&format!("{url:?}")), "{error}");
    }
}

#[tokio::test]
async fn upsert_round_trips_every_field() {
    let db = SqliteAdapter::open_in_memory().unwrap();
    let scope = private(REALM, "@alice:localhost");

    let mut errored = entry(&scope, "broken.gts", &["dep-a", "dep-b"]);
    let mut detail = ErrorDetail {
        id: Some(errored.url.clone()),
        message: "boom".to_owned(),
        status: 500,
        deps: vec![format!("{REALM}dep-a")],
        additional_errors: vec![ErrorDoc::module_error("dep-a is missing", 404, Vec::new()).error],
        extra: Map::new(),
    };
    detail.extra.insert("stack".to_owned(), json!("at line 1"));
    errored.error = Some(ErrorDoc { kind: "module-error".to_owned(), error: detail });
    errored.diagnostics = Some(json!({"renderMs": 12, "notes": ["a", "b"]}));
    put(&db, &errored).await;

    let mut empty = entry(&scope, "empty.gts", &[]);
    empty.definitions.clear();
    empty.created_at = None;
    put(&db, &empty).await;

    for expected in [errored, empty] {
        let rows = db.read_rows(&scope, &expected.url, &expected.file_alias).await.unwrap();
        assert_eq!(rows, vec![expected]);
    }
}

#[tokio::test]
async fn upsert_replaces_the_row_with_the_same_key() {
    let db = SqliteAdapter::open_in_memory().unwrap();
    let scope = public(REALM);
    let mut row = entry(&scope, "person.gts", &["a"]);
    put(&db, &row).await;

    row.deps = vec![format!("{REALM}b")];
    row.definitions.insert("extra".to_owned(), json!({"type": "definition"}));
    row.diagnostics = Some(json!({"second": true}));
    row.created_at = Some(1_800_000_000_000);
    put(&db, &row).await;

    assert_eq!(db.row_count().await.unwrap(), 1);
    assert_eq!(db.read_rows(&scope, &row.url, &row.file_alias).await.unwrap(), vec![row]);
}

#[tokio::test]
async fn read_rows_matches_url_or_alias_within_one_scope() {
    let db = SqliteAdapter::open_in_memory().unwrap();
    let scope = public(REALM);
    let gts = entry(&scope, "person.gts", &[]);
    put(&db, &gts).await;
    // The same module in other scopes, users and realms must stay invisible.
    put(&db, &entry(&private(REALM, "alice"), "person.gts", &[])).await;
    put(&db, &entry(&private(REALM, "bob"), "person.gts", &[])).await;
    put(&db, &entry(&public(OTHER_REALM), "person.gts", &[])).await;
    put(&db, &entry(&scope, "pet.gts", &[])).await;

    let by_url = db.read_rows(&scope, &gts.url, "nothing").await.unwrap();
    assert_eq!(by_url, vec![gts.clone()]);
    let by_alias = db.read_rows(&scope, "nothing", &gts.file_alias).await.unwrap();
    assert_eq!(by_alias, vec![gts.clone()]);
    let none = db.read_rows(&scope, &format!("{REALM}person.js"), "nothing").await.unwrap();
    assert!(none.is_empty());

    let alice = db.read_rows(&private(REALM, "alice"), &gts.url, &gts.file_alias).await.unwrap();
    assert_eq!(alice.len(), 1);
    assert_eq!(alice[0].auth_user_id, "alice");
    assert_eq!(alice[0].cache_scope, CacheScope::RealmAuth);
    let carol = db.read_rows(&private(REALM, "carol"), &gts.url, &gts.file_alias).await.unwrap();
    assert!(carol.is_empty());
}

#[tokio::test]
async fn read_rows_batch_matches_urls_and_aliases_in_one_call() {
    let db = SqliteAdapter::open_in_memory().unwrap();
    let scope = public(REALM);
    for module in ["a.gts", "b.gts", "c.gts", "d.gts"] {
        put(&db, &entry(&scope, module, &[])).await;
    }
    put(&db, &entry(&private(REALM, "alice"), "a.gts", &[])).await;

    // `a` by alias, `b.gts` by url, `c.js` matches nothing, `d` is not asked for.
    let asked = names(REALM, &["a", "b.gts", "c.js", "missing"]);
    let rows = db.read_rows_batch(&scope, &asked).await.unwrap();
    assert_eq!(sorted_urls(&rows), names(REALM, &["a.gts", "b.gts"]));
    assert!(rows.iter().all(|row| row.cache_scope == CacheScope::Public));

    assert!(db.read_rows_batch(&scope, &[]).await.unwrap().is_empty());
}

fn consumer_urls(rows: &[lookup_core::ConsumerRow]) -> Vec<String> {
    let mut urls: Vec<String> = rows.iter().map(|row| row.url.clone()).collect();
    urls.sort_unstable();
    urls.dedup();
    urls
}

#[tokio::test]
async fn consumers_follow_the_dependency_chain_transitively() {
    let db = SqliteAdapter::open_in_memory().unwrap();
    let scope = public(REALM);
    put(&db, &entry(&scope, "deep-card.gts", &["middle-field"])).await;
    put(&db, &entry(&scope, "middle-field.gts", &["leaf-field"])).await;
    put(&db, &entry(&scope, "leaf-field.gts", &[])).await;
    put(&db, &entry(&scope, "unrelated.gts", &["other"])).await;
    // Another user's copy of a consumer counts (every scope of the realm) ...
    put(&db, &entry(&private(REALM, "alice"), "deep-card.gts", &["middle-field"])).await;
    // ... but another realm's rows never do, whatever they depend on.
    let elsewhere = public(OTHER_REALM);
    let mut foreign = entry(&elsewhere, "spy.gts", &[]);
    foreign.deps = names(REALM, &["leaf-field"]);
    put(&db, &foreign).await;

    let rows = db.consumers(REALM, &urls::variants(&format!("{REALM}leaf-field.gts"))).await;
    let rows = rows.unwrap();
    assert_eq!(consumer_urls(&rows), names(REALM, &["deep-card.gts", "middle-field.gts"]));
    let middle = rows.iter().find(|row| row.url.ends_with("middle-field.gts")).unwrap();
    assert_eq!(middle.file_alias, format!("{REALM}middle-field"));
    assert_eq!(middle.deps, names(REALM, &["leaf-field"]));

    // Starting from the middle reaches only the card; starting from the top reaches nothing.
    let rows = db.consumers(REALM, &names(REALM, &["middle-field"])).await.unwrap();
    assert_eq!(consumer_urls(&rows), names(REALM, &["deep-card.gts"]));
    let rows = db.consumers(REALM, &names(REALM, &["deep-card"])).await.unwrap();
    assert!(rows.is_empty());
    assert!(db.consumers(REALM, &[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn consumers_terminate_on_cycles() {
    let db = SqliteAdapter::open_in_memory().unwrap();
    let scope = public(REALM);
    // a → b → c → a, plus d depending on the cycle from outside.
    put(&db, &entry(&scope, "a.gts", &["b"])).await;
    put(&db, &entry(&scope, "b.gts", &["c"])).await;
    put(&db, &entry(&scope, "c.gts", &["a"])).await;
    put(&db, &entry(&scope, "d.gts", &["c"])).await;
    put(&db, &entry(&scope, "self.gts", &["self"])).await;

    let rows = db.consumers(REALM, &names(REALM, &["a"])).await.unwrap();
    assert_eq!(consumer_urls(&rows), names(REALM, &["a.gts", "b.gts", "c.gts", "d.gts"]));
    let rows = db.consumers(REALM, &names(REALM, &["self"])).await.unwrap();
    assert_eq!(consumer_urls(&rows), names(REALM, &["self.gts"]));
}

#[tokio::test]
async fn apply_invalidation_deletes_what_each_kind_covers() {
    let db = SqliteAdapter::open_in_memory().unwrap();
    for scope in [public(REALM), private(REALM, "alice")] {
        for module in ["a.gts", "b.gts", "c.gts"] {
            put(&db, &entry(&scope, module, &[])).await;
        }
    }
    for module in ["a.gts", "z.gts"] {
        put(&db, &entry(&public(OTHER_REALM), module, &[])).await;
    }
    assert_eq!(db.row_count().await.unwrap(), 8);

    // Modules: `a` by alias and `b.gts` by url, in both scopes of this realm only.
    let modules = Invalidation::Modules {
        realm_url: REALM.to_owned(),
        urls: names(REALM, &["a", "b.gts", "never-cached"]),
    };
    assert_eq!(db.apply_invalidation(&modules).await.unwrap(), 4);
    assert_eq!(db.row_count().await.unwrap(), 4);
    let empty = Invalidation::Modules { realm_url: REALM.to_owned(), urls: Vec::new() };
    assert_eq!(db.apply_invalidation(&empty).await.unwrap(), 0);

    let realm = Invalidation::Realm { realm_url: REALM.to_owned() };
    assert_eq!(db.apply_invalidation(&realm).await.unwrap(), 2);
    let left = db.read_rows_batch(&public(OTHER_REALM), &names(OTHER_REALM, &["a", "z"])).await;
    assert_eq!(left.unwrap().len(), 2);

    assert_eq!(db.apply_invalidation(&Invalidation::Global).await.unwrap(), 2);
    assert_eq!(db.row_count().await.unwrap(), 0);
    assert_eq!(db.apply_invalidation(&Invalidation::Global).await.unwrap(), 0);
}

#[tokio::test]
async fn stored_json_that_does_not_parse_is_a_database_error_naming_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.db");
    let db = SqliteAdapter::open(&path).unwrap();
    let bad_definitions = format!("{REALM}bad-definitions.gts");
    let bad_deps = format!("{REALM}bad-deps.gts");
    raw_insert(&path, &bad_definitions, "{not json", "[]");
    raw_insert(&path, &bad_deps, "{}", "[\"unterminated");
    let scope = public(REALM);

    for (url, column) in [(&bad_definitions, "definitions"), (&bad_deps, "deps")] {
        let error = db.read_rows(&scope, url, &urls::file_alias(url)).await.unwrap_err();
        assert!(matches!(error, LookupError::Database { operation: "read_rows", .. }), "{error:?}");
        let source = std::error::Error::source(&error).unwrap().to_string();
        assert!(source.contains(url.as_str()) && source.contains(column), "{source}");
        assert!(!error.is_transient());
    }

    // The consumer closure reports the unreadable row rather than skipping a possible consumer.
    let error = db.consumers(REALM, &names(REALM, &["anything"])).await.unwrap_err();
    assert!(matches!(error, LookupError::Database { operation: "consumers", .. }), "{error:?}");
    let source = std::error::Error::source(&error).unwrap().to_string();
    assert!(source.contains(&bad_deps), "{source}");

    // Invalidation still clears them.
    let realm = Invalidation::Realm { realm_url: REALM.to_owned() };
    assert_eq!(db.apply_invalidation(&realm).await.unwrap(), 2);
}

#[test]
fn busy_and_locked_are_transient_in_the_lookup_error() {
    let busy = rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
        Some("database is locked".to_owned()),
    );
    let locked = rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_LOCKED),
        None,
    );
    let constraint = rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT),
        None,
    );
    for (source, transient) in [(busy, true), (locked, true), (constraint, false)] {
        let error: LookupError =
            SqliteError::query(std::path::Path::new("cache.sqlite3"), "upsert", source).into();
        assert!(matches!(error, LookupError::Database { operation: "upsert", .. }), "{error:?}");
        assert_eq!(error.is_transient(), transient, "{error}");
    }
}
