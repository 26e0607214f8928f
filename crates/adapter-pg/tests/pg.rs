//! The Postgres adapter on a real server (`DATABASE_URL`; `cargo xtask test-pg` provides one):
//! the shared behaviour suite, the table's shape, and the transactional broadcast.

use std::collections::HashSet;
use std::time::Duration;

use adapter_pg::{PgAdapter, PgConfig, parse_payload};
use behaviour_suite::{bounded, database_url, unique_name};
use lookup_core::{CacheEntry, CacheScope, DbAdapter, Invalidation, LoadStamp, RowStore};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

/// Settings for one test: its own schema and channel, so parallel tests never meet.
fn config(test: &str) -> Option<PgConfig> {
    let url = database_url(test)?;
    Some(PgConfig::new(url).schema(unique_name("t")).channel(unique_name("c")))
}

async fn adapter(test: &str) -> Option<PgAdapter> {
    let config = config(test)?;
    Some(PgAdapter::connect(config).await.expect("connect to the test database"))
}

behaviour_suite::behaviour_suite!(optional: || async { adapter("behaviour").await });

/// The PgBouncer (transaction mode) in front of the test server, with `pgbouncer=true`.
fn pgbouncer_config(test: &str) -> Option<PgConfig> {
    let url = behaviour_suite::xtask_setting(test, "DEFLOOKUP_PGBOUNCER_URL")?;
    Some(PgConfig::new(url).schema(unique_name("b")).channel(unique_name("c")))
}

/// The whole behaviour suite again, every statement through a real PgBouncer in transaction
/// mode: lookups, invalidations with the durable guard, the in-process tier.
mod through_pgbouncer {
    use super::*;

    async fn adapter() -> Option<PgAdapter> {
        let config = pgbouncer_config("behaviour through PgBouncer")?;
        Some(PgAdapter::connect(config).await.expect("connect through PgBouncer"))
    }

    behaviour_suite::behaviour_suite!(optional: || async { adapter().await });
}

/// A raw LISTEN connection collecting the payloads of the config's channel.
async fn listen(config: &PgConfig) -> (tokio_postgres::Client, mpsc::UnboundedReceiver<String>) {
    let (client, mut connection) =
        config.tokio_postgres_config().expect("config").connect(NoTls).await.expect("connect");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n.payload().to_owned());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    client.batch_execute(&format!("LISTEN {}", config.get_channel())).await.expect("LISTEN");
    (client, rx)
}

fn entry(realm: &str, path: &str, deps: &[&str]) -> CacheEntry {
    let url = format!("{realm}{path}");
    CacheEntry {
        file_alias: lookup_core::urls::file_alias(&url),
        url,
        cache_scope: CacheScope::Public,
        auth_user_id: String::new(),
        resolved_realm_url: realm.to_owned(),
        definitions: serde_json::Map::new(),
        deps: deps.iter().map(|d| format!("{realm}{d}")).collect(),
        error: None,
        created_at: Some(1),
        diagnostics: None,
    }
}

const REALM: &str = "https://realm.test/app/";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_matches_the_spec_and_creation_is_idempotent_under_concurrency() {
    let Some(config) = config("schema") else { return };
    // Ten processes' worth of adapters starting at once on an empty schema.
    let starts: Vec<_> =
        (0..10).map(|_| tokio::spawn(PgAdapter::connect(config.clone()))).collect();
    for start in starts {
        bounded("concurrent schema creation", start).await.expect("task").expect("connect");
    }
    let (client, connection) =
        config.tokio_postgres_config().unwrap().connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    let schema = config.get_schema().unwrap();
    let versions: Vec<i32> = client
        .query("SELECT version FROM deflookup_schema_version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1, 2, 3, 4, 5, 6], "each migration recorded once");
    // The realm rows' pages keep room for the versions every invalidation leaves (schema 6).
    let options: Option<Vec<String>> = client
        .query_one(
            "SELECT reloptions FROM pg_class WHERE oid = 'modules_guard_realm'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(options, Some(vec!["fillfactor=10".to_owned()]));
    let columns: Vec<(String, String)> = client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = 'modules' ORDER BY ordinal_position",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected = [
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
        ("diagnostics", "jsonb"),
    ];
    let expected: Vec<(String, String)> =
        expected.iter().map(|(c, t)| ((*c).to_owned(), (*t).to_owned())).collect();
    assert_eq!(columns, expected);
    let pkey: String = client
        .query_one(
            "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c JOIN pg_namespace n \
             ON n.oid = c.connamespace WHERE c.conname = 'modules_pkey' AND n.nspname = $1",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pkey, "PRIMARY KEY (url_hash, cache_scope, auth_user_id)");
    let hash_ok: bool = client
        .query_one("INSERT INTO modules (url, cache_scope, auth_user_id, resolved_realm_url) VALUES ('u', 'public', '', 'r') RETURNING url_hash = md5('u')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(hash_ok, "url_hash is md5(url), generated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_deletes_and_notifies_in_one_transaction() {
    let Some(config) = config("notify") else { return };
    let db = PgAdapter::connect(config.clone()).await.expect("connect");
    let (_client, mut heard) = listen(&config).await;
    db.upsert(&entry(REALM, "leaf.gts", &[]), LoadStamp::UNGUARDED).await.unwrap();
    db.upsert(&entry(REALM, "card.gts", &["leaf"]), LoadStamp::UNGUARDED).await.unwrap();
    db.upsert(&entry(REALM, "other.gts", &[]), LoadStamp::UNGUARDED).await.unwrap();

    let urls = vec![format!("{REALM}leaf.gts"), format!("{REALM}leaf")];
    let deleted = db
        .apply_invalidation(&Invalidation::Modules { realm_url: REALM.into(), urls: urls.clone() })
        .await
        .unwrap();
    assert_eq!(deleted, 2, "leaf and, found again under the guard's lock, its consumer card");
    let payload = bounded("the NOTIFY", heard.recv()).await.expect("payload");
    let parsed = parse_payload(&payload).expect("well-formed");
    let mut expected = urls;
    expected.extend([format!("{REALM}card.gts"), format!("{REALM}card")]);
    let expected = Invalidation::Modules { realm_url: REALM.into(), urls: expected };
    assert_eq!(parsed.invalidation, expected);
    assert_eq!(parsed.origin.as_deref(), Some(db.origin()));
    assert!(payload.starts_with(r#"{"k":"module","r":"#), "reference key order: {payload}");

    db.apply_invalidation(&Invalidation::Realm { realm_url: REALM.into() }).await.unwrap();
    db.apply_invalidation(&Invalidation::Global).await.unwrap();
    let realm = parse_payload(&bounded("realm", heard.recv()).await.unwrap()).unwrap();
    assert_eq!(realm.invalidation, Invalidation::Realm { realm_url: REALM.into() });
    let global = parse_payload(&bounded("global", heard.recv()).await.unwrap()).unwrap();
    assert_eq!(global.invalidation, Invalidation::Global);
    assert_eq!(db.row_count().await.unwrap(), 0);
    assert_eq!(db.stats().payloads_sent, 3);
}

/// An invalidation whose fan-out is known before it starts (a clear; a module nobody
/// consumes) is one round trip, its payloads encoded before the server takes its number: the
/// number is put into the last payload by the server. Every payload carries the number the
/// log recorded, a module with consumers (found under the lock of a second transaction, the
/// first committing nothing) included, and a fan-out of several payloads carries it on the
/// last one only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_payload_carries_the_number_its_invalidation_recorded() {
    let Some(config) = config("payload numbers") else { return };
    let db = PgAdapter::connect(config.clone()).await.expect("connect");
    let (client, mut heard) = listen(&config).await;
    for row in [
        entry(REALM, "lone.gts", &[]),
        entry(REALM, "leaf.gts", &[]),
        entry(REALM, "card.gts", &["leaf"]),
    ] {
        db.upsert(&row, LoadStamp::UNGUARDED).await.unwrap();
    }
    let many: Vec<String> =
        (0..400).map(|i| format!("{REALM}{}/m{i}.gts", "d".repeat(40))).collect();
    let requests = [
        modules(&["lone.gts", "lone"]),
        modules(&["leaf.gts", "leaf"]),
        Invalidation::Modules { realm_url: REALM.into(), urls: many.clone() },
        Invalidation::Realm { realm_url: REALM.into() },
        Invalidation::Global,
    ];
    let (mut numbers, mut chunks) = (Vec::new(), Vec::new());
    for request in &requests {
        let before = db.stats().payloads_sent;
        db.apply_invalidation(request).await.unwrap();
        let sent = db.stats().payloads_sent - before;
        chunks.push(sent);
        let mut parsed = Vec::new();
        for _ in 0..sent {
            let payload = bounded("a payload", heard.recv()).await.expect("payload");
            parsed.push(parse_payload(&payload).unwrap_or_else(|e| panic!("{e}: {payload}")));
        }
        let (last, earlier) = parsed.split_last().expect("a payload");
        assert!(earlier.iter().all(|p| p.seq.is_none()), "only the last carries the number");
        numbers.push(last.seq.expect("the last payload carries the number"));
        if let Invalidation::Modules { urls, .. } = request {
            let heard: Vec<String> = parsed
                .iter()
                .flat_map(|p| match &p.invalidation {
                    Invalidation::Modules { urls, .. } => urls.clone(),
                    other => panic!("{other:?}"),
                })
                .collect();
            assert!(urls.iter().all(|url| heard.contains(url)), "{heard:?}");
        }
    }
    assert!(chunks[2] > 1, "the long fan-out takes several payloads: {chunks:?}");
    assert_eq!([chunks[0], chunks[1], chunks[3], chunks[4]], [1; 4]);
    // The log: one entry per module invalidation (the first attempt of the one with a
    // consumer recorded nothing), under the numbers the payloads carry.
    let entries = log_entries(&client).await;
    let logged: Vec<i64> = entries.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(logged, numbers[..3], "{entries:?}");
    assert!(entries[1].1.contains(&format!("{REALM}card.gts")), "the consumer is recorded");
    assert_eq!(entries[2].1.len(), many.len());
    let cleared: Vec<(String, i64)> = client
        .query("SELECT realm, cleared FROM modules_guard_realm ORDER BY realm", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(cleared, [(String::new(), numbers[4]), (REALM.to_owned(), numbers[3])]);
}

/// Rows are found by URL or by alias (the batch read in two halves): a row both name is read
/// once, deleted once and counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_named_by_its_url_and_its_alias_is_read_and_deleted_once() {
    let Some(db) = adapter("url and alias").await else { return };
    let (card, other) = (entry(REALM, "card.gts", &[]), entry(REALM, "other.gts", &[]));
    for row in [&card, &other] {
        db.upsert(row, LoadStamp::UNGUARDED).await.unwrap();
    }
    let scope = lookup_core::EntryScope {
        realm_url: REALM.into(),
        scope: CacheScope::Public,
        user: String::new(),
    };
    // The card by both names, the other only by its alias.
    let names = [card.url.clone(), card.file_alias.clone(), other.file_alias.clone()];
    let mut read: Vec<String> =
        db.read_rows_batch(&scope, &names).await.unwrap().into_iter().map(|r| r.url).collect();
    read.sort();
    assert_eq!(read, [card.url.clone(), other.url.clone()]);
    let request = Invalidation::Modules { realm_url: REALM.into(), urls: names.to_vec() };
    assert_eq!(db.apply_invalidation(&request).await.unwrap(), 2, "two rows, each counted once");
    assert!(db.read_rows_batch(&scope, &names).await.unwrap().is_empty());
}

/// A fan-out of more names than one statement checks again (16) is deleted by URL, then by
/// alias: every row named either way goes, each counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_of_many_names_is_deleted_by_url_then_by_alias() {
    let Some(db) = adapter("many names").await else { return };
    let mut rows = vec![entry(REALM, "root.gts", &[])];
    rows.extend((0..12).map(|i| entry(REALM, &format!("c{i}.gts"), &["root"])));
    // Named only by its alias (c3, as c3.gts's), and named by nothing.
    rows.push(entry(REALM, "c3.js", &[]));
    rows.push(entry(REALM, "bystander.gts", &[]));
    for row in &rows {
        db.upsert(row, LoadStamp::UNGUARDED).await.unwrap();
    }
    let root = format!("{REALM}root.gts");
    let done = db.invalidate_modules(REALM, &lookup_core::urls::variants(&root)).await.unwrap();
    assert!(done.urls.len() > 16, "{} names", done.urls.len());
    assert_eq!(done.deleted, 1 + 12 + 1, "the root, its consumers and c3.js");
    let scope = lookup_core::EntryScope {
        realm_url: REALM.into(),
        scope: CacheScope::Public,
        user: String::new(),
    };
    let urls: Vec<String> = rows.iter().map(|row| row.url.clone()).collect();
    let left: Vec<String> =
        db.read_rows_batch(&scope, &urls).await.unwrap().into_iter().map(|r| r.url).collect();
    assert_eq!(left, [format!("{REALM}bystander.gts")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_fan_out_is_chunked_and_an_oversize_url_becomes_a_realm_payload() {
    let Some(config) = config("chunks") else { return };
    let db = PgAdapter::connect(config.clone()).await.expect("connect");
    let (_client, mut heard) = listen(&config).await;
    let urls: Vec<String> =
        (0..600).map(|i| format!("{REALM}cards/module-number-{i:04}.gts")).collect();
    db.apply_invalidation(&Invalidation::Modules { realm_url: REALM.into(), urls: urls.clone() })
        .await
        .unwrap();
    let sent = db.stats().payloads_sent as usize;
    assert!(sent > 1, "600 long URLs do not fit one payload");
    let mut union = Vec::new();
    for _ in 0..sent {
        let payload = bounded("a chunk", heard.recv()).await.expect("chunk");
        assert!(payload.len() < 7000, "chunk of {} bytes", payload.len());
        match parse_payload(&payload).unwrap().invalidation {
            Invalidation::Modules { urls, .. } => union.extend(urls),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(union, urls, "the union of the chunks is the fan-out, in order");

    let huge = format!("{REALM}{}", "x".repeat(8000));
    db.apply_invalidation(&Invalidation::Modules {
        realm_url: REALM.into(),
        urls: vec![format!("{REALM}a.gts"), huge],
    })
    .await
    .unwrap();
    let payload = bounded("the fallback", heard.recv()).await.unwrap();
    assert_eq!(
        parse_payload(&payload).unwrap().invalidation,
        Invalidation::Realm { realm_url: REALM.into() },
        "an oversize URL is never dropped: the realm is invalidated instead"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_notify_still_deletes_after_one_retry() {
    let Some(config) = config("notify-fails") else { return };
    // pg_notify refuses an empty channel name: every broadcast fails at NOTIFY.
    let db = PgAdapter::connect(config.channel("")).await.expect("connect");
    db.upsert(&entry(REALM, "leaf.gts", &[]), LoadStamp::UNGUARDED).await.unwrap();
    let deleted = db
        .apply_invalidation(&Invalidation::Modules {
            realm_url: REALM.into(),
            urls: vec![format!("{REALM}leaf.gts")],
        })
        .await
        .expect("the local invalidation is not lost");
    assert_eq!(deleted, 1);
    assert_eq!(db.row_count().await.unwrap(), 0);
    let stats = db.stats();
    assert_eq!(
        (stats.broadcast_failures, stats.unbroadcast_deletes, stats.payloads_sent),
        (2, 1, 0)
    );
}

/// A statement the server refuses before the NOTIFYs means nothing happened, wherever it
/// stands: the prune, which follows a module's one-statement check, record and DELETE, fails
/// the invalidation, which is neither retried nor run again without its NOTIFYs as a failed
/// broadcast would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_prune_fails_the_invalidation_and_is_not_taken_for_a_broadcast() {
    let Some(config) = config("prune refused") else { return };
    let db = PgAdapter::connect(config.clone()).await.unwrap();
    let client = raw_client(&config).await;
    db.upsert(&entry(REALM, "a.gts", &[]), LoadStamp::UNGUARDED).await.unwrap();
    client
        .batch_execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN RAISE EXCEPTION 'prune refused'; END $$;
             CREATE TRIGGER refuse BEFORE DELETE ON modules_guard_log
                 FOR EACH STATEMENT EXECUTE FUNCTION refuse();",
        )
        .await
        .unwrap();
    // A new adapter prunes a realm on its first module invalidation there.
    let failed = db.apply_invalidation(&modules(&["a.gts"])).await;
    assert!(failed.is_err(), "the invalidation reports the refusal: {failed:?}");
    assert_eq!(db.row_count().await.unwrap(), 1, "nothing happened: the row is still there");
    let stats = db.stats();
    assert_eq!((stats.broadcast_failures, stats.unbroadcast_deletes), (0, 0), "{stats:?}");
    assert!(log_entries(&client).await.is_empty(), "nothing recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_closure_is_one_query_that_survives_cycles() {
    let Some(db) = adapter("closure").await else { return };
    for (path, deps) in [
        ("deep-card.gts", &["middle-field"][..]),
        ("middle-field.gts", &["leaf-field"]),
        ("leaf-field.gts", &[]),
        ("a.gts", &["b"]),
        ("b.gts", &["a", "leaf-field"]),
    ] {
        db.upsert(&entry(REALM, path, deps), LoadStamp::UNGUARDED).await.unwrap();
    }
    let other_realm = entry("https://other.test/", "x.gts", &[]);
    let mut foreign = other_realm.clone();
    foreign.deps = vec![format!("{REALM}leaf-field")];
    db.upsert(&foreign, LoadStamp::UNGUARDED).await.unwrap();
    let names = lookup_core::urls::variants(&format!("{REALM}leaf-field.gts"));
    let found: HashSet<String> =
        db.consumers(REALM, &names).await.unwrap().into_iter().map(|r| r.url).collect();
    let expected: HashSet<String> = ["middle-field.gts", "deep-card.gts", "a.gts", "b.gts"]
        .iter()
        .map(|p| format!("{REALM}{p}"))
        .collect();
    assert_eq!(found, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_never_show_the_password() {
    let Some(url) = database_url("redaction") else { return };
    // A real server that refuses the role, and a port nobody listens on: both fail to connect.
    let host = url.split('@').nth(1).unwrap_or("127.0.0.1:5432/postgres").to_owned();
    for bad in [
        format!("postgres://nobody_here:hunter2secret@{host}"),
        "postgres://nobody:hunter2secret@127.0.0.1:1/x".to_owned(),
    ] {
        let config = PgConfig::new(bad).connect_timeout(Duration::from_secs(5));
        let err = PgAdapter::connect(config).await.expect_err("cannot connect");
        let message = format!("{err} {err:?}");
        assert!(!message.contains("hunter2secret"), "password leaked: {message}");
        assert!(err.is_transient() || message.contains("nobody_here"), "{message}");
    }
}

// ---------------------------------------------------------------------------------------------
// The durable guard (see src/guard.rs), driven through its interleavings.
// ---------------------------------------------------------------------------------------------

use lookup_core::{CachingLookup, PersistOutcome, Realm};

/// The advisory keys of src/guard.rs: (namespace, hashtext(realm)) and (namespace, 0).
const LOCK_NS_GLOBAL: i32 = 0x6466_6c67;
const LOCK_NS_REALM: i32 = 0x6466_6c72;

fn modules(urls: &[&str]) -> Invalidation {
    Invalidation::Modules {
        realm_url: REALM.into(),
        urls: urls.iter().map(|p| format!("{REALM}{p}")).collect(),
    }
}

async fn raw_client(config: &PgConfig) -> tokio_postgres::Client {
    let (client, connection) =
        config.tokio_postgres_config().unwrap().connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// Inserts the public rows of `REALM` that `rows` generates: a query of `url`, `deps` and
/// `file_alias` in which `$1` is the realm.
async fn insert_generated(raw: &tokio_postgres::Client, rows: &str) {
    let rows = rows.replace("$1", "$1::text");
    raw.execute(
        &format!(
            "INSERT INTO modules (url, cache_scope, auth_user_id, resolved_realm_url, \
             definitions, deps, created_at, file_alias) \
             SELECT url, 'public', '', $1, '{{}}'::jsonb, deps, 0, file_alias FROM ({rows}) AS g"
        ),
        &[&REALM],
    )
    .await
    .unwrap();
}

/// The guard log's entries, oldest first: each number and its URLs.
async fn log_entries(client: &tokio_postgres::Client) -> Vec<(i64, Vec<String>)> {
    let rows = client.query("SELECT seq, urls FROM modules_guard_log ORDER BY seq", &[]).await;
    rows.unwrap().iter().map(|row| (row.get(0), row.get(1))).collect()
}

/// The guard log's numbers, oldest first.
async fn log_numbers(client: &tokio_postgres::Client) -> Vec<i64> {
    log_entries(client).await.into_iter().map(|(seq, _)| seq).collect()
}

/// The newest number pruned from [`REALM`]'s log.
async fn pruned_through(client: &tokio_postgres::Client) -> i64 {
    let sql = "SELECT pruned_through FROM modules_guard_realm WHERE realm = $1";
    client.query_one(sql, &[&REALM]).await.unwrap().get(0)
}

/// Waits (bounded) until some backend waits for an advisory lock: the server's own word that
/// the other party is blocked, the gate for the concurrent interleavings below.
async fn someone_waits_for_a_lock(client: &tokio_postgres::Client) {
    bounded("a backend to wait on the guard's lock", async {
        loop {
            let waiting: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if waiting > 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persist_after_a_peers_invalidation_is_refused_and_before_it_is_deleted() {
    let Some(config) = config("guard-orders") else { return };
    let a = PgAdapter::connect(config.clone()).await.unwrap();
    let b = PgAdapter::connect(config).await.unwrap();
    let card = entry(REALM, "card.gts", &["leaf"]);

    // Invalidation first: B's commit lands between A's stamp and A's persist.
    let stamp = a.begin_load(REALM, &card.url).await.unwrap();
    b.apply_invalidation(&modules(&["card.gts", "card"])).await.unwrap();
    assert_eq!(a.upsert(&card, stamp).await.unwrap(), PersistOutcome::Stale);
    assert_eq!(a.row_count().await.unwrap(), 0, "the stale render was not persisted");

    // A dependency's invalidation counts too.
    let stamp = a.begin_load(REALM, &card.url).await.unwrap();
    b.apply_invalidation(&modules(&["leaf.gts", "leaf"])).await.unwrap();
    assert_eq!(a.upsert(&card, stamp).await.unwrap(), PersistOutcome::Stale);

    // An unrelated module's invalidation does not.
    let stamp = a.begin_load(REALM, &card.url).await.unwrap();
    b.apply_invalidation(&modules(&["other.gts"])).await.unwrap();
    assert_eq!(a.upsert(&card, stamp).await.unwrap(), PersistOutcome::Written);

    // Persist first: the later invalidation deletes the row.
    let deleted = b.apply_invalidation(&modules(&["card.gts", "card"])).await.unwrap();
    assert_eq!(deleted, 1);

    // Realm and global clears cover everything in their scope.
    for clear in [Invalidation::Realm { realm_url: REALM.into() }, Invalidation::Global] {
        let stamp = a.begin_load(REALM, &card.url).await.unwrap();
        b.apply_invalidation(&clear).await.unwrap();
        assert_eq!(a.upsert(&card, stamp).await.unwrap(), PersistOutcome::Stale, "{clear:?}");
    }
    let stamp = a.begin_load(REALM, &card.url).await.unwrap();
    assert_eq!(a.upsert(&card, stamp).await.unwrap(), PersistOutcome::Written, "fresh load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_waits_for_a_persist_in_progress_then_deletes_its_row() {
    let Some(config) = config("guard-persist-first") else { return };
    let b = PgAdapter::connect(config.clone()).await.unwrap();
    let mut persist = raw_client(&config).await;
    let observer = raw_client(&config).await;
    // A persist in progress: it holds the realm's key shared and has written its row.
    let tx = persist.transaction().await.unwrap();
    tx.execute(
        "SELECT pg_advisory_xact_lock_shared($1, hashtext($2)) FROM (SELECT pg_advisory_xact_lock_shared($3, 0)) g",
        &[&LOCK_NS_REALM, &REALM, &LOCK_NS_GLOBAL],
    )
    .await
    .unwrap();
    tx.execute(
        "INSERT INTO modules (url, cache_scope, auth_user_id, resolved_realm_url, deps) \
         VALUES ($1, 'public', '', $2, '[]')",
        &[&format!("{REALM}card.gts"), &REALM],
    )
    .await
    .unwrap();
    let invalidation =
        tokio::spawn(async move { b.apply_invalidation(&modules(&["card.gts"])).await });
    someone_waits_for_a_lock(&observer).await;
    assert!(!invalidation.is_finished(), "the invalidation must wait for the persist");
    tx.commit().await.unwrap();
    let deleted = bounded("the invalidation", invalidation).await.unwrap().unwrap();
    assert_eq!(deleted, 1, "the invalidation ran after the persist and deleted its row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persist_waits_for_an_invalidation_in_progress_then_is_refused() {
    let Some(config) = config("guard-invalidation-first") else { return };
    let a = PgAdapter::connect(config.clone()).await.unwrap();
    let mut peer = raw_client(&config).await;
    let observer = raw_client(&config).await;
    let card = entry(REALM, "card.gts", &[]);
    let stamp = a.begin_load(REALM, &card.url).await.unwrap();
    // An invalidation in progress: realm key exclusive, sequence taken and recorded, not yet
    // committed (exactly the statements of src/guard.rs).
    let tx = peer.transaction().await.unwrap();
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2)) FROM (SELECT pg_advisory_xact_lock_shared($3, 0)) g",
        &[&LOCK_NS_REALM, &REALM, &LOCK_NS_GLOBAL],
    )
    .await
    .unwrap();
    tx.execute(
        "INSERT INTO modules_guard_log (realm, seq, urls) \
         VALUES ($1, nextval('modules_guard_seq'), ARRAY[$2::text])",
        &[&REALM, &card.url],
    )
    .await
    .unwrap();
    let persist = tokio::spawn(async move { a.upsert(&card, stamp).await });
    someone_waits_for_a_lock(&observer).await;
    assert!(!persist.is_finished(), "the persist must wait for the invalidation");
    tx.commit().await.unwrap();
    let outcome = bounded("the persist", persist).await.unwrap().unwrap();
    assert_eq!(outcome, PersistOutcome::Stale, "the invalidation committed after the stamp");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_older_than_the_guard_horizon_is_stale() {
    let Some(config) = config("guard-horizon") else { return };
    let a = PgAdapter::connect(config.clone().guard_horizon(Duration::ZERO)).await.unwrap();
    let z = entry(REALM, "z.gts", &[]);
    let old = a.begin_load(REALM, &z.url).await.unwrap();
    a.apply_invalidation(&modules(&["x.gts"])).await.unwrap();
    // This one prunes x's record (older than a zero horizon): what `old` would need is gone.
    a.apply_invalidation(&modules(&["y.gts"])).await.unwrap();
    assert_eq!(a.upsert(&z, old).await.unwrap(), PersistOutcome::Stale);
    let fresh = a.begin_load(REALM, &z.url).await.unwrap();
    assert_eq!(a.upsert(&z, fresh).await.unwrap(), PersistOutcome::Written);
}

/// The consumer closure's estimated cost grows with the table (every recursive step is
/// assumed to multiply the rows): with the server's defaults, Postgres compiles it to machine
/// code and sizes its hash table by that estimate, milliseconds to hundreds of milliseconds a
/// time on a large table; a fan-out's statements, planned for their values on a connection's
/// first runs, are planned for thousands of constants; and the prune's ordered read of a
/// realm's log is planned as a read of it all and a sort. Module invalidations therefore run
/// with JIT off, a small `work_mem`, generic plans and no sorts; a trigger on the DELETEs
/// notes the settings in force in the transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_invalidations_run_with_their_own_planner_settings() {
    let Some(config) = config("invalidation settings") else { return };
    let guarded = PgAdapter::connect(config.clone()).await.unwrap();
    let unguarded = PgAdapter::connect(config.clone().durable_guard(false)).await.unwrap();
    let client = raw_client(&config).await;
    client
        .batch_execute(
            "CREATE TABLE seen (settings text);
             CREATE FUNCTION note_settings() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     INSERT INTO seen VALUES (concat_ws(' ', current_setting('jit'),
                         current_setting('work_mem'), current_setting('plan_cache_mode'),
                         current_setting('enable_sort')));
                     RETURN NULL;
                 END $$;
             CREATE TRIGGER note AFTER DELETE ON modules
                 FOR EACH STATEMENT EXECUTE FUNCTION note_settings();",
        )
        .await
        .unwrap();
    for db in [&guarded, &unguarded] {
        db.apply_invalidation(&modules(&["a.gts"])).await.unwrap();
    }
    let seen = client.query("SELECT settings FROM seen", &[]).await.unwrap();
    let seen: Vec<String> = seen.iter().map(|row| row.get(0)).collect();
    // A session's own: the server's defaults, which the invalidation's settings do not touch.
    let sql = "SELECT concat_ws(' ', current_setting('jit'), current_setting('work_mem'), \
               current_setting('plan_cache_mode'), current_setting('enable_sort'))";
    let own: String = client.query_one(sql, &[]).await.unwrap().get(0);
    let forced = ["off", "64kB", "force_generic_plan", "off"];
    for (own, forced) in own.split(' ').zip(forced) {
        assert_ne!(own, forced, "the session's own setting, which the test means to override");
    }
    // Each invalidation's DELETE ran with the settings.
    assert_eq!(seen.len(), 2, "one DELETE statement a module invalidation: {seen:?}");
    assert!(seen.iter().all(|s| *s == forced.join(" ")), "{seen:?}");
}

/// Entries past the horizon are pruned a bounded batch at a time (the realm's 64 oldest), so
/// that a backlog (a burst of invalidations aging out together) costs each later invalidation
/// little instead of being read whole every time; the realm remembers the newest pruned. A
/// realm is checked again at its next invalidation while its backlog fills the batch, and
/// otherwise not before a sixteenth of the horizon has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_old_log_entries_is_pruned_a_bounded_batch_at_a_time() {
    let Some(config) = config("prune batch") else { return };
    let db = PgAdapter::connect(config.clone()).await.unwrap();
    let client = raw_client(&config).await;
    let age_entries = |count: i32| {
        let client = &client;
        async move {
            client
                .execute(
                    "INSERT INTO modules_guard_log (realm, seq, urls, at) \
                     SELECT $1, nextval('modules_guard_seq'), ARRAY[$1 || 'old' || i], \
                         now() - interval '1 hour' FROM generate_series(1, $2) AS i",
                    &[&REALM, &count],
                )
                .await
                .unwrap();
        }
    };
    age_entries(100).await;
    let oldest = log_numbers(&client).await;
    let count = || async { log_numbers(&client).await.len() };
    let pruned = || pruned_through(&client);
    db.apply_invalidation(&modules(&["a.gts"])).await.unwrap();
    assert_eq!(count().await, 100 - 64 + 1, "one batch of the backlog, and the new entry");
    assert_eq!(pruned().await, oldest[63]);
    db.apply_invalidation(&modules(&["b.gts"])).await.unwrap();
    assert_eq!(count().await, 2, "the rest of the backlog is gone, the young entries stay");
    assert_eq!(pruned().await, oldest[99]);
    // The last check found less than a batch: the realm is not checked again so soon.
    age_entries(5).await;
    db.apply_invalidation(&modules(&["c.gts"])).await.unwrap();
    assert_eq!(count().await, 2 + 5 + 1, "not due: nothing pruned");
    assert_eq!(pruned().await, oldest[99]);
    // Another process has not checked the realm yet.
    let other = PgAdapter::connect(config.clone()).await.unwrap();
    other.apply_invalidation(&modules(&["d.gts"])).await.unwrap();
    assert_eq!(count().await, 4, "the five aged entries pruned by the other process");
}

/// The prune never takes the entry its own transaction records, however short the horizon:
/// the entry covers loads until a later invalidation of the realm prunes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_never_prunes_its_own_entry() {
    let Some(config) = config("own entry") else { return };
    let db = PgAdapter::connect(config.clone().guard_horizon(Duration::ZERO)).await.unwrap();
    let client = raw_client(&config).await;
    let log = || log_numbers(&client);
    db.apply_invalidation(&modules(&["a.gts"])).await.unwrap();
    let first = log().await;
    assert_eq!(first.len(), 1, "its own entry stays");
    db.apply_invalidation(&modules(&["b.gts"])).await.unwrap();
    let second = log().await;
    assert_eq!(second.len(), 1, "the first entry pruned by the second invalidation");
    assert!(second[0] > first[0]);
    assert_eq!(pruned_through(&client).await, first[0]);
}

/// A process that hears nothing (its listener is disconnected, or it has none) renders a
/// module while a peer invalidates it. With the guard its stale render is refused and re-run;
/// without it (the control) the stale render lands.
async fn deaf_peer_render(config: PgConfig) -> (u64, usize) {
    let peer = PgAdapter::connect(config.clone()).await.unwrap();
    let deaf_db = PgAdapter::connect(config).await.unwrap();
    let renderer = behaviour_suite::FakeRenderer::default();
    let deaf = CachingLookup::new(deaf_db, renderer.clone());
    deaf.register_realm(Realm { url: REALM.into(), owner: "@o:test".into(), public: true })
        .unwrap();
    let url = format!("{REALM}card.gts");
    renderer.set(&url, behaviour_suite::FakeModule::ready(&["Card"], &[]));
    let gate = renderer.gate(&url);
    let load = {
        let deaf = deaf.clone();
        let url = url.clone();
        tokio::spawn(async move { deaf.get_module_entry(&url, None).await })
    };
    gate.entered().await;
    renderer.set(&url, behaviour_suite::FakeModule::ready(&["Card"], &[]).version(2));
    peer.apply_invalidation(&modules(&["card.gts", "card"])).await.unwrap();
    gate.open();
    bounded("the deaf load", load).await.unwrap().unwrap();
    let key = lookup_core::CodeRef::new(url.clone(), "Card").definition_key();
    let stored = deaf.get_cached_entry(&url, None).await.unwrap().expect("a row");
    (stored.definitions[&key]["version"].as_u64().unwrap(), renderer.calls(&url))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persist_whose_listener_is_disconnected_is_refused_by_the_guard() {
    let Some(config) = config("guard-deaf") else { return };
    let (version, renders) = deaf_peer_render(config).await;
    assert_eq!(version, 2, "the stale v1 render was refused");
    assert_eq!(renders, 2, "and the load re-ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_guard_a_deaf_peer_persists_a_stale_row() {
    let Some(config) = config("guard-off") else { return };
    let (version, renders) = deaf_peer_render(config.durable_guard(false)).await;
    assert_eq!((version, renders), (1, 1), "control: the window the guard closes is real");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_persisted_after_the_fan_out_was_computed_is_still_invalidated() {
    let Some(config) = config("guard-late-consumer") else { return };
    let a = PgAdapter::connect(config.clone()).await.unwrap();
    let b = PgAdapter::connect(config.clone()).await.unwrap();
    let (_client, mut heard) = listen(&config).await;
    let consumer = entry(REALM, "card.gts", &["leaf"]);
    let stamp = a.begin_load(REALM, &consumer.url).await.unwrap();
    // B computed its fan-out of leaf before the consumer existed: only leaf's variants.
    let leaf_variants = lookup_core::urls::variants(&format!("{REALM}leaf.gts"));
    assert!(b.consumers(REALM, &leaf_variants).await.unwrap().is_empty());
    // A's render of card (built on the old leaf) persists before B takes its lock.
    assert_eq!(a.upsert(&consumer, stamp).await.unwrap(), PersistOutcome::Written);
    let deleted = b.apply_invalidation(&modules(&["leaf.gts", "leaf"])).await.unwrap();
    assert_eq!(deleted, 1, "the late consumer is found under the lock and deleted");
    assert_eq!(a.row_count().await.unwrap(), 0);
    let payload = parse_payload(&bounded("the NOTIFY", heard.recv()).await.unwrap()).unwrap();
    let Invalidation::Modules { urls, .. } = payload.invalidation else { panic!("module payload") };
    assert!(urls.contains(&consumer.url), "peers hear of the late consumer too: {urls:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_invalidation_never_returns_an_open_transaction_to_the_pool() {
    let Some(config) = config("cancelled-invalidation") else { return };
    // One pooled connection: whatever the cancelled invalidation leaves behind, the next
    // operation gets.
    let a = PgAdapter::connect(config.clone().pool_size(1)).await.unwrap();
    a.upsert(&entry(REALM, "card.gts", &[]), LoadStamp::UNGUARDED).await.unwrap();
    let mut holder = raw_client(&config).await;
    let observer = raw_client(&config).await;
    // Hold the realm's key so the invalidation stops mid-transaction (after its BEGIN).
    let tx = holder.transaction().await.unwrap();
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2)) FROM (SELECT pg_advisory_xact_lock_shared($3, 0)) g",
        &[&LOCK_NS_REALM, &REALM, &LOCK_NS_GLOBAL],
    )
    .await
    .unwrap();
    let invalidation = {
        let a = a.clone();
        tokio::spawn(async move { a.apply_invalidation(&modules(&["card.gts"])).await })
    };
    someone_waits_for_a_lock(&observer).await;
    invalidation.abort();
    assert!(invalidation.await.unwrap_err().is_cancelled());
    tx.rollback().await.unwrap();
    // The next user of the pool is not inside the cancelled transaction: its plain write
    // commits at once, visible from another session (inside a leftover transaction it would
    // never be).
    bounded("the next write", a.upsert(&entry(REALM, "other.gts", &[]), LoadStamp::UNGUARDED))
        .await
        .unwrap();
    let other = format!("{REALM}other.gts");
    let seen: i64 = observer
        .query_one("SELECT count(*) FROM modules WHERE url = $1", &[&other])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 1, "the write committed on its own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_fan_out_is_exact_and_guards_its_realm() {
    let Some(config) = config("large-fan-out") else { return };
    let db = PgAdapter::connect(config.clone()).await.unwrap();
    let raw = raw_client(&config).await;
    // 1500 modules, each a transitive consumer of m0 (chains and fan-out), plus bystanders:
    // one in the realm that depends on nothing, one in another realm that names m0; and a
    // module named only by its alias (m7.js, alias m7, as m7.gts's), which goes too. So large
    // a closure reads the realm's rows, and so does its DELETE.
    insert_generated(
        &raw,
        "SELECT $1 || 'm' || i || '.gts' AS url, CASE WHEN i = 0 THEN '[]'::jsonb \
           ELSE jsonb_build_array($1 || 'm' || (CASE WHEN i % 3 = 0 THEN i - 1 ELSE i / 8 END)) \
           END AS deps, $1 || 'm' || i AS file_alias \
         FROM generate_series(0, 1499) AS i",
    )
    .await;
    db.upsert(&entry(REALM, "bystander.gts", &[]), LoadStamp::UNGUARDED).await.unwrap();
    db.upsert(&entry(REALM, "m7.js", &[]), LoadStamp::UNGUARDED).await.unwrap();
    let mut foreign = entry("https://other.test/", "x.gts", &[]);
    foreign.deps = vec![format!("{REALM}m0")];
    db.upsert(&foreign, LoadStamp::UNGUARDED).await.unwrap();
    let late = entry(REALM, "late.gts", &[]);
    let stamped_before = db.begin_load(REALM, &late.url).await.unwrap();

    let root = format!("{REALM}m0.gts");
    let done = db.invalidate_modules(REALM, &lookup_core::urls::variants(&root)).await.unwrap();
    assert_eq!(done.deleted, 1501, "the 1500 modules and m7.js");
    let named: HashSet<&str> = done.urls.iter().map(String::as_str).collect();
    assert_eq!(named.len(), done.urls.len(), "no name twice");
    for i in 0..1500 {
        assert!(named.contains(format!("{REALM}m{i}.gts").as_str()), "m{i}.gts");
        assert!(named.contains(format!("{REALM}m{i}").as_str()), "m{i}");
    }
    assert!(!named.contains(format!("{REALM}bystander.gts").as_str()));
    let left: Vec<String> = raw
        .query("SELECT url FROM modules ORDER BY url", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(left, [foreign.url.clone(), format!("{REALM}bystander.gts")]);
    // So large a fan-out is guarded as a clear of its realm: a load of the realm stamped
    // before it is refused, even for a module it did not name; one stamped after is not.
    assert_eq!(db.upsert(&late, stamped_before).await.unwrap(), PersistOutcome::Stale);
    let stamped_after = db.begin_load(REALM, &late.url).await.unwrap();
    assert_eq!(db.upsert(&late, stamped_after).await.unwrap(), PersistOutcome::Written);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_fan_out_of_a_small_part_of_its_realm_deletes_the_rows_it_read() {
    let Some(config) = config("large-fan-out-part") else { return };
    // 600 consumers of m0 (past the probe, so the closure reads the realm's rows) in a realm
    // of 5 000 rows: too small a part of it to read it again, so the rows read are deleted by
    // their URLs.
    fan_out_of_600_among(config, true, 4400).await;
}

/// Rows m0.gts to m599.gts for [`insert_generated`], each m(i) depending on m(i/2): 600
/// consumers of m0, transitively.
const TREE_OF_600: &str = "SELECT $1 || 'm' || i || '.gts' AS url, CASE WHEN i = 0 THEN '[]'::jsonb \
     ELSE jsonb_build_array($1 || 'm' || (i / 2)) END AS deps, $1 || 'm' || i AS file_alias \
     FROM generate_series(0, 599) AS i";

/// Invalidates m0 in a realm of 600 consumers of it (a tree: m(i) depends on m(i/2)), m7.js
/// (named only by the alias it shares with m7.gts) and `others` rows that depend on none of
/// them, with or without the guard; checks that exactly the 601 rows named are gone.
async fn fan_out_of_600_among(config: PgConfig, guarded: bool, others: i64) {
    let db = PgAdapter::connect(config.clone().durable_guard(guarded)).await.unwrap();
    let raw = raw_client(&config).await;
    insert_generated(
        &raw,
        &format!(
            "{TREE_OF_600} UNION ALL \
             SELECT $1 || 'other' || i || '.gts', jsonb_build_array($1 || 'other' || (i / 2)), \
               $1 || 'other' || i \
             FROM generate_series(0, {}) AS i",
            others - 1
        ),
    )
    .await;
    db.upsert(&entry(REALM, "m7.js", &[]), LoadStamp::UNGUARDED).await.unwrap();
    let root = format!("{REALM}m0.gts");
    let done = db.invalidate_modules(REALM, &lookup_core::urls::variants(&root)).await.unwrap();
    assert_eq!(done.deleted, 601, "guard {guarded}: the 600 modules and m7.js");
    let left: Vec<String> = raw
        .query("SELECT url FROM modules WHERE url NOT LIKE $1", &[&format!("{REALM}other%")])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(left.is_empty(), "guard {guarded}: left {left:?}");
    let count: i64 = raw.query_one("SELECT count(*) FROM modules", &[]).await.unwrap().get(0);
    assert_eq!(count, others, "guard {guarded}: the rest of the realm stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_fan_out_without_the_guard_is_deleted_by_its_names() {
    let Some(config) = config("large-fan-out-unguarded") else { return };
    let db = PgAdapter::connect(config.clone().durable_guard(false)).await.unwrap();
    let raw = raw_client(&config).await;
    // 600 consumers of m0: the closure reads the realm, and the fan-out names most of it.
    insert_generated(&raw, TREE_OF_600).await;
    db.upsert(&entry(REALM, "m7.js", &[]), LoadStamp::UNGUARDED).await.unwrap();
    db.upsert(&entry(REALM, "bystander.gts", &[]), LoadStamp::UNGUARDED).await.unwrap();
    let root = format!("{REALM}m0.gts");
    let done = db.invalidate_modules(REALM, &lookup_core::urls::variants(&root)).await.unwrap();
    assert_eq!(done.deleted, 601, "the 600 modules and m7.js, named by its alias");
    let left: Vec<String> =
        raw.query("SELECT url FROM modules", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(left, [format!("{REALM}bystander.gts")]);
}

/// A fan-out that reaches every row of its realm spares none, and deletes the realm's rows by
/// the realm alone; a URL whose row in one scope the fan-out names (here only by its alias)
/// is not spared in another scope, where the fan-out names neither its URL nor its alias.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_of_its_whole_realm_spares_no_row_of_a_url_it_names() {
    let Some(config) = config("whole-realm-fan-out") else { return };
    let db = PgAdapter::connect(config.clone()).await.unwrap();
    let raw = raw_client(&config).await;
    insert_generated(&raw, TREE_OF_600).await;
    // shared.gts, public, under m5's alias (named); and the same URL for a user, under its
    // own alias (named neither way).
    let mut named = entry(REALM, "shared.gts", &[]);
    named.file_alias = format!("{REALM}m5");
    db.upsert(&named, LoadStamp::UNGUARDED).await.unwrap();
    let mut other_scope = entry(REALM, "shared.gts", &[]);
    other_scope.cache_scope = CacheScope::RealmAuth;
    other_scope.auth_user_id = "@user:test".into();
    db.upsert(&other_scope, LoadStamp::UNGUARDED).await.unwrap();
    let root = format!("{REALM}m0.gts");
    let done = db.invalidate_modules(REALM, &lookup_core::urls::variants(&root)).await.unwrap();
    assert_eq!(done.deleted, 602, "the 600 modules and both rows of shared.gts");
    assert!(!done.urls.contains(&named.url), "shared.gts is named only by its alias");
    let left: i64 = raw.query_one("SELECT count(*) FROM modules", &[]).await.unwrap().get(0);
    assert_eq!(left, 0, "nothing of the realm is left");
}

/// A fan-out that reads its realm and names a large part of it, but less than half: the
/// DELETE reads the realm against the URLs read (with the guard) or the names (without), not
/// against the rows spared, which are more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_fan_out_of_under_half_its_realm_deletes_its_rows_with_or_without_the_guard() {
    for guarded in [true, false] {
        let Some(config) = config(&format!("large-fan-out-third-{guarded}")) else { return };
        // 600 consumers of m0 and m7.js in a realm of 1 501 rows: 1 200 names, enough to read
        // the realm again, and 601 rows, fewer than the 900 spared.
        fan_out_of_600_among(config, guarded, 900).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_populate_lease_works_on_its_own_connection_when_the_pool_is_exhausted() {
    use lookup_core::{PopulateCoordinator as _, PopulateKey, PopulateLease as _};
    let Some(config) = config("populate-pinned") else { return };
    let db = PgAdapter::connect(config.clone().pool_size(3)).await.unwrap();
    let signals = std::sync::Arc::new(adapter_pg::PopulateSignals::new());
    let coordinator = adapter_pg::PgPopulateCoordinator::new(&db, signals, Default::default())
        .expect("coordinator");
    // Two leases (pool size − 1) hold two connections…
    let first = coordinator.try_acquire(&PopulateKey::from_text("a")).await.unwrap().unwrap();
    let second = coordinator.try_acquire(&PopulateKey::from_text("b")).await.unwrap().unwrap();
    // …and the third waits on a lock the test holds (a realm clear of another realm).
    let other = "https://other.test/";
    let mut holder = raw_client(&config).await;
    let observer = raw_client(&config).await;
    let tx = holder.transaction().await.unwrap();
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2)) FROM (SELECT pg_advisory_xact_lock_shared($3, 0)) g",
        &[&LOCK_NS_REALM, &other, &LOCK_NS_GLOBAL],
    )
    .await
    .unwrap();
    let blocked = {
        let db = db.clone();
        tokio::spawn(async move {
            db.apply_invalidation(&Invalidation::Realm { realm_url: other.to_owned() }).await
        })
    };
    someone_waits_for_a_lock(&observer).await;
    // Every row operation of a lease still completes: none asks the pool.
    let card = entry(REALM, "card.gts", &[]);
    let scope = card.entry_scope();
    let work = async {
        let stamp = first.begin_load(REALM, &card.url).await.unwrap();
        assert!(first.read_rows(&scope, &card.url, &card.file_alias).await.unwrap().is_empty());
        assert_eq!(first.upsert(&card, stamp).await.unwrap(), PersistOutcome::Written);
        assert_eq!(first.read_rows(&scope, &card.url, &card.file_alias).await.unwrap().len(), 1);
        first.release().await.unwrap();
        second.release().await.unwrap();
    };
    bounded("the leases' work with an exhausted pool", work).await;
    tx.rollback().await.unwrap();
    bounded("the clear", blocked).await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Field-ready connections: TLS, bounded waits, a read-only role.
// ---------------------------------------------------------------------------------------------

/// The TLS-only cluster of `cargo xtask test-pg`: a URL for `host` with `query` settings.
fn tls_url(test: &str, host: &str, query: &str) -> Option<String> {
    let port = behaviour_suite::xtask_setting(test, "DEFLOOKUP_TLS_PORT")?;
    Some(format!("postgres://postgres@{host}:{port}/postgres?{query}"))
}

fn tls_ca(name: &str) -> String {
    std::env::var(name).expect("set with DEFLOOKUP_TLS_PORT")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_connects_the_pool_over_tls() {
    let ca = "DEFLOOKUP_TLS_CA";
    let Some(url) = tls_url("verify-full", "localhost", "sslmode=verify-full") else { return };
    let url = format!("{url}&sslrootcert={}", tls_ca(ca));
    let app = unique_name("tls");
    let config = PgConfig::new(url).schema(unique_name("t")).application_name(app.clone());
    let db = PgAdapter::connect(config.clone()).await.expect("verify-full connects");
    db.upsert(&entry(REALM, "tls.gts", &[]), LoadStamp::UNGUARDED).await.expect("write over TLS");
    assert_eq!(db.row_count().await.unwrap(), 1);
    // The server's word: every connection of the pool is encrypted.
    let (client, connection) = config.connect_unpooled().await.expect("raw TLS connection");
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT count(*), bool_and(s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s \
             USING (pid) WHERE a.application_name = $1",
            &[&app],
        )
        .await
        .unwrap();
    let (count, all_ssl): (i64, bool) = (row.get(0), row.get(1));
    assert!(count >= 2 && all_ssl, "{count} connections, all TLS: {all_ssl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_or_misnamed_certificate_and_a_plain_connection_are_refused_clearly() {
    let Some(base) = tls_url("tls refusals", "localhost", "sslmode=verify-full") else { return };
    let connect = |url: String| async move {
        PgAdapter::connect(PgConfig::new(url).schema(unique_name("t"))).await
    };
    // A CA that did not sign the server's certificate.
    let err = connect(format!("{base}&sslrootcert={}", tls_ca("DEFLOOKUP_TLS_WRONG_CA")))
        .await
        .expect_err("the wrong CA");
    assert!(matches!(err, adapter_pg::PgError::Tls { .. }), "{err:?}");
    assert!(err.to_string().contains("not trusted"), "{err}");
    assert!(!err.is_transient(), "retrying cannot fix a certificate");
    // The certificate names `localhost`, not 127.0.0.1: verify-full refuses, verify-ca accepts.
    let ca = tls_ca("DEFLOOKUP_TLS_CA");
    let by_ip = tls_url("tls refusals", "127.0.0.1", "sslmode=verify-full").unwrap();
    let err = connect(format!("{by_ip}&sslrootcert={ca}")).await.expect_err("wrong host name");
    assert!(err.to_string().contains("does not match the host name"), "{err}");
    let by_ip = tls_url("tls refusals", "127.0.0.1", "sslmode=verify-ca").unwrap();
    connect(format!("{by_ip}&sslrootcert={ca}")).await.expect("verify-ca ignores the name");
    // `require` encrypts without verifying anything.
    connect(tls_url("tls refusals", "127.0.0.1", "sslmode=require").unwrap())
        .await
        .expect("require connects");
    // The server accepts only TLS: a plain connection is refused by pg_hba, and said so.
    let err = connect(tls_url("tls refusals", "localhost", "sslmode=disable").unwrap())
        .await
        .expect_err("plain text is refused");
    let message = err.to_string();
    assert!(message.contains("pg_hba.conf") && message.contains("no encryption"), "{message}");
    // And a server without TLS fails `require` with a TLS error, not a hang or a panic.
    if let Some(plain) = database_url("tls refusals") {
        let plain = if plain.contains('?') { format!("{plain}&") } else { format!("{plain}?") };
        let err = connect(format!("{plain}sslmode=require")).await.expect_err("no TLS there");
        assert!(err.to_string().contains("does not accept TLS"), "{err}");
    }
}

/// A socket that accepts connections and never says a word.
async fn silent_server() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable"), task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_an_error_within_the_connect_timeout() {
    let (url, server) = silent_server().await;
    for url in [url.clone(), url.replace("sslmode=disable", "sslmode=prefer")] {
        let config = PgConfig::new(url).connect_timeout(Duration::from_millis(500));
        let started = std::time::Instant::now();
        let err = bounded("a start-up against a silent server", PgAdapter::connect(config.clone()))
            .await
            .expect_err("no answer");
        assert!(matches!(err, adapter_pg::PgError::Timeout { .. }), "{err:?}");
        assert!(err.to_string().contains("no answer"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "bounded: {:?}", started.elapsed());
        let err = bounded("an unpooled start-up", config.connect_unpooled()).await.err();
        assert!(matches!(err, Some(adapter_pg::PgError::Timeout { .. })), "{err:?}");
    }
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_the_server_does_not_answer_times_out_and_the_pool_recovers() {
    let Some(config) = config("operation timeout") else { return };
    let config = config.operation_timeout(Duration::from_millis(500)).pool_size(2);
    let db = PgAdapter::connect(config.clone()).await.expect("connect");
    db.upsert(&entry(REALM, "a.gts", &[]), LoadStamp::UNGUARDED).await.unwrap();
    // Another session holds the table: every statement on it waits, as on a stopped server.
    let locker = raw_client(&config).await;
    locker.batch_execute("BEGIN; LOCK TABLE modules IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let scope = lookup_core::EntryScope {
        realm_url: REALM.into(),
        scope: CacheScope::Public,
        user: String::new(),
    };
    let url = format!("{REALM}a.gts");
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let err = bounded("a read that waits", db.read_rows(&scope, &url, &url))
            .await
            .expect_err("the read cannot finish");
        assert!(err.to_string().contains("no answer"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "bounded: {:?}", started.elapsed());
    }
    let err = bounded("an invalidation that waits", db.apply_invalidation(&modules(&["a.gts"])))
        .await
        .expect_err("the invalidation cannot finish");
    assert!(err.to_string().contains("no answer"), "{err}");
    locker.batch_execute("ROLLBACK").await.unwrap();
    // Timed-out connections were closed, not pooled with a request in flight: the next
    // operations get fresh ones and work.
    let rows = bounded("a read after", db.read_rows(&scope, &url, &url)).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(db.apply_invalidation(&modules(&["a.gts"])).await.unwrap(), 1);
}

/// `DATABASE_URL`'s server as another role, in `key=value` form.
fn as_role(config: &PgConfig, role: &str) -> String {
    let pg = config.tokio_postgres_config().unwrap();
    let host = match &pg.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
    };
    format!(
        "host={host} port={} dbname={} user={role} sslmode=disable",
        pg.get_ports()[0],
        pg.get_dbname().unwrap_or("postgres")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_role_serves_hits_and_is_told_clearly_it_cannot_write() {
    let Some(config) = config("read-only role") else { return };
    let owner = PgAdapter::connect(config.clone()).await.expect("owner creates the schema");
    owner.upsert(&entry(REALM, "a.gts", &[]), LoadStamp::UNGUARDED).await.unwrap();
    let role = unique_name("ro");
    let schema = config.get_schema().unwrap();
    let admin = raw_client(&config).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA {schema} TO {role}; \
             GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}"
        ))
        .await
        .unwrap();
    let reader_config = PgConfig::new(as_role(&config, &role)).schema(schema);
    let reader = PgAdapter::connect(reader_config).await.expect("no DDL for a current schema");
    let scope = lookup_core::EntryScope {
        realm_url: REALM.into(),
        scope: CacheScope::Public,
        user: String::new(),
    };
    let url = format!("{REALM}a.gts");
    assert_eq!(reader.read_rows(&scope, &url, &url).await.unwrap().len(), 1, "a hit");
    reader.begin_load(REALM, &url).await.expect("a stamp is a read");
    let err = reader.upsert(&entry(REALM, "b.gts", &[]), LoadStamp::UNGUARDED).await.unwrap_err();
    assert!(err.to_string().contains("lacks the privilege"), "{err}");
    let err = reader.apply_invalidation(&modules(&["a.gts"])).await.unwrap_err();
    assert!(err.to_string().contains("lacks the privilege"), "{err}");
    // A schema that does not exist yet cannot be created by this role: said so.
    let missing = PgConfig::new(as_role(&config, &role)).schema(unique_name("none"));
    let err = PgAdapter::connect(missing).await.expect_err("no privilege to create");
    assert!(err.to_string().contains("lacks the privilege"), "{err}");
    drop(reader);
    admin.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}")).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_3_schema_is_upgraded_to_take_urls_of_any_length() {
    let Some(config) = config("upgrade to 4") else { return };
    PgAdapter::connect(config.clone()).await.expect("a current schema");
    // Back to version 3's indexes and keys, as a database created before version 4 has them.
    let client = raw_client(&config).await;
    client
        .batch_execute(
            "CREATE TABLE modules_guard (realm text NOT NULL, url text NOT NULL, seq bigint NOT NULL,
                 at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (realm, url));
             CREATE INDEX modules_guard_age_index ON modules_guard (realm, at);
             DROP TABLE modules_guard_log;
             DROP INDEX modules_resolved_realm_url_file_alias_index;
             CREATE INDEX modules_file_alias_index ON modules (file_alias);
             DROP INDEX modules_resolved_realm_url_index;
             CREATE INDEX modules_resolved_realm_url_index ON modules (resolved_realm_url);
             DROP INDEX modules_guard_realm_key;
             ALTER TABLE modules_guard_realm ADD PRIMARY KEY (realm);
             DELETE FROM deflookup_schema_version WHERE version >= 4;",
        )
        .await
        .expect("downgrade to version 3");
    let db = PgAdapter::connect(config.clone()).await.expect("upgrade to version 4");
    let kinds: Vec<(String, String)> = client
        .query(
            "SELECT c.relname::text, a.amname::text FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam \
             JOIN pg_class t ON t.oid = i.indrelid \
             WHERE t.relname = 'modules' AND t.relnamespace = $1::text::regnamespace ORDER BY 1",
            &[&config.get_schema().unwrap()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let kinds: Vec<(&str, &str)> = kinds.iter().map(|(n, k)| (n.as_str(), k.as_str())).collect();
    assert_eq!(
        kinds,
        [
            ("modules_deps_index", "gin"),
            ("modules_pkey", "btree"),
            ("modules_resolved_realm_url_file_alias_index", "hash"),
            ("modules_resolved_realm_url_index", "hash"),
        ]
    );
    // A 3 KB URL that does not compress, and its invalidation's guard record, now fit.
    let noise: String = (0..400u64)
        .map(|i| format!("{:08x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32))
        .collect();
    let long = format!("{noise}/x.gts");
    db.upsert(&entry(REALM, &long, &[]), LoadStamp::UNGUARDED).await.expect("a long row");
    assert_eq!(db.apply_invalidation(&modules(&[&long])).await.expect("its invalidation"), 1);
}

/// Version 6 keeps one log entry per invalidation instead of one row per URL; an upgrade
/// carries version 5's records over, so a load stamped before the upgrade is still refused
/// when an invalidation recorded before it covers its row, and the log replays them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_5_schema_is_upgraded_and_its_records_still_guard() {
    let Some(config) = config("upgrade to 6") else { return };
    let old = PgAdapter::connect(config.clone()).await.expect("a current schema");
    let card = entry(REALM, "card.gts", &[]);
    let stamp = old.begin_load(REALM, &card.url).await.unwrap();
    // Back to version 5's table, holding the record of an invalidation of the card (and of
    // another URL under the same number), committed after the stamp.
    let client = raw_client(&config).await;
    client
        .batch_execute(&format!(
            "DROP TABLE modules_guard_log;
             CREATE TABLE modules_guard (realm text NOT NULL, url text NOT NULL,
                 seq bigint NOT NULL, at timestamptz NOT NULL DEFAULT now());
             CREATE UNIQUE INDEX modules_guard_key ON modules_guard (md5(realm), md5(url));
             CREATE INDEX modules_guard_age_index ON modules_guard (md5(realm), at);
             CREATE INDEX modules_guard_seq_index ON modules_guard (md5(realm), seq);
             DELETE FROM deflookup_schema_version WHERE version >= 6;
             INSERT INTO modules_guard (realm, url, seq)
                 SELECT '{REALM}', u, nextval('modules_guard_seq')
                 FROM (VALUES ('{url}'), ('{REALM}other.gts')) AS v(u);
             UPDATE modules_guard SET seq = (SELECT max(seq) FROM modules_guard);
             INSERT INTO modules_guard_realm (realm, latest)
                 SELECT '{REALM}', max(seq) FROM modules_guard;",
            url = card.url,
        ))
        .await
        .expect("downgrade to version 5");
    let db = PgAdapter::connect(config.clone()).await.expect("upgrade to version 6");
    let entries = log_entries(&client).await;
    assert_eq!(entries.len(), 1, "one entry per number: {entries:?}");
    assert_eq!(entries[0].1, [card.url.clone(), format!("{REALM}other.gts")]);
    assert_eq!(db.upsert(&card, stamp).await.unwrap(), PersistOutcome::Stale);
    let fresh = db.begin_load(REALM, &card.url).await.unwrap();
    assert_eq!(db.upsert(&card, fresh).await.unwrap(), PersistOutcome::Written);
}

/// A build facing a schema newer than it knows refuses to start, saying so, rather than run
/// statements against tables it does not know (what a fleet mid-upgrade meets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_newer_than_the_build_is_refused_clearly() {
    let Some(config) = config("newer schema") else { return };
    PgAdapter::connect(config.clone()).await.expect("a current schema");
    let client = raw_client(&config).await;
    client
        .batch_execute("INSERT INTO deflookup_schema_version (version) SELECT max(version) + 1 FROM deflookup_schema_version")
        .await
        .unwrap();
    let error = PgAdapter::connect(config).await.expect_err("a newer schema");
    assert!(error.to_string().contains("newer than this build supports"), "{error}");
}

/// A row's `error_doc` is decoded straight into the error document: JSON `null` reads as no
/// error, and a document that is not one is an error naming the row and the column, never a
/// panic or a silently dropped error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_error_doc_is_an_error_naming_its_column() {
    let Some(db) = adapter("error_doc").await else { return };
    let client = raw_client(db.config()).await;
    let scope = lookup_core::EntryScope {
        realm_url: REALM.into(),
        scope: CacheScope::Public,
        user: String::new(),
    };
    for (path, doc) in [("null.gts", "null"), ("odd.gts", "42")] {
        client
            .execute(
                "INSERT INTO modules (url, cache_scope, auth_user_id, resolved_realm_url, deps, \
                 error_doc) VALUES ($1, 'public', '', $2, '[]', $3::text::jsonb)",
                &[&format!("{REALM}{path}"), &REALM, &doc],
            )
            .await
            .unwrap();
    }
    let url = format!("{REALM}null.gts");
    let rows = db.read_rows(&scope, &url, &url).await.unwrap();
    assert!(rows[0].error.is_none(), "JSON null is no error");
    let url = format!("{REALM}odd.gts");
    let error = db.read_rows(&scope, &url, &url).await.expect_err("42 is no error document");
    let text = error.to_string();
    assert!(text.contains("error_doc") && text.contains("odd.gts"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_reference_system_writes_are_read_and_its_error_rows_give_the_module_error() {
    let Some(config) = config("reference rows") else { return };
    let db = PgAdapter::connect(config.clone()).await.expect("connect");
    let client = raw_client(&config).await;
    let now = i64::try_from(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis(),
    )
    .unwrap();
    // As the reference writes them: `additionalErrors: null`, fields deflookup does not know,
    // and a consumer whose deps hold something else than strings.
    client
        .execute(
            "INSERT INTO modules (url, cache_scope, auth_user_id, resolved_realm_url, \
             definitions, deps, error_doc, created_at, file_alias) VALUES \
             ($1, 'public', '', $2, '{}', '[]', $3, $4, $5), \
             ($6, 'public', '', $2, NULL, $7, NULL, $4, $8)",
            &[
                &format!("{REALM}broken.gts"),
                &REALM,
                &serde_json::json!({"type": "module-error", "error": {
                    "message": "boom", "status": 500, "additionalErrors": null,
                    "deps": null, "stack": "at render", "isCardError": true}}),
                &now,
                &format!("{REALM}broken"),
                &format!("{REALM}user.gts"),
                &serde_json::json!([format!("{REALM}broken"), null, 7]),
                &format!("{REALM}user"),
            ],
        )
        .await
        .expect("reference rows");
    let lookup = CachingLookup::new(db.clone(), behaviour_suite::FakeRenderer::default());
    lookup
        .register_realm(Realm { url: REALM.into(), owner: "@o:test".into(), public: true })
        .unwrap();
    let err = lookup
        .lookup_definition(&lookup_core::CodeRef::new(format!("{REALM}broken.gts"), "X"), None)
        .await
        .expect_err("the module's error");
    let detail = err.module_error().expect("a module error, not a database error");
    assert_eq!((detail.message.as_str(), detail.status), ("boom", 500));
    assert_eq!(lookup.prerenderer().total_calls(), 0, "served from the reference's row");
    // Its invalidation finds the reference's consumer through its deps.
    let list = lookup.invalidate(&format!("{REALM}broken.gts")).await.expect("invalidate");
    assert!(list.contains(&format!("{REALM}user.gts")), "{list:?}");
    assert_eq!(db.row_count().await.unwrap(), 0);
}

/// `name type` of each column of `schema.modules`, in order.
async fn column_list(client: &tokio_postgres::Client, schema: &str) -> Vec<String> {
    client
        .query(
            "SELECT column_name::text || ' ' || data_type::text FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = 'modules' ORDER BY ordinal_position",
            &[&schema],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_table_of_either_revision_is_adopted_unaltered_and_shared() {
    let Some(base) = config("adopt") else { return };
    for diagnostics in ["diagnostics", "timing_diagnostics"] {
        let config = base.clone().schema(unique_name("ref"));
        let schema = config.get_schema().unwrap().to_owned();
        let client = raw_client(&config.clone().schema("public")).await;
        client
            .batch_execute(&format!(
                "CREATE SCHEMA {schema}; SET search_path = {schema}; {}",
                behaviour_suite::reference_table_ddl(diagnostics)
            ))
            .await
            .expect("the reference's table");
        let columns_before = column_list(&client, &schema).await;
        // The reference writes a row, as its upsert does.
        client
            .execute(
                &format!(
                    "INSERT INTO modules (url, cache_scope, auth_user_id, resolved_realm_url, \
                     definitions, deps, error_doc, created_at, file_alias, {diagnostics}) \
                     VALUES ($1, 'public', '', $2, '{{}}', '[]', NULL, 1, $3, '{{\"ms\": 5}}') \
                     ON CONFLICT ON CONSTRAINT modules_pkey DO NOTHING"
                ),
                &[&format!("{REALM}theirs.gts"), &REALM, &format!("{REALM}theirs")],
            )
            .await
            .expect("the reference's row");
        let db = PgAdapter::connect(config.clone()).await.expect("adopts the table");
        let scope = lookup_core::EntryScope {
            realm_url: REALM.into(),
            scope: CacheScope::Public,
            user: String::new(),
        };
        let theirs = format!("{REALM}theirs.gts");
        let rows = db.read_rows(&scope, &theirs, &format!("{REALM}theirs")).await.expect("read");
        assert_eq!(rows.len(), 1, "{diagnostics}: deflookup reads the reference's row");
        assert_eq!(rows[0].diagnostics, Some(serde_json::json!({"ms": 5})));
        let mut ours = entry(REALM, "ours.gts", &["theirs"]);
        ours.diagnostics = Some(serde_json::json!({"by": "deflookup"}));
        db.upsert(&ours, LoadStamp::UNGUARDED).await.expect("write into the shared table");
        let written: serde_json::Value = client
            .query_one(&format!("SELECT {diagnostics} FROM modules WHERE url = $1"), &[&ours.url])
            .await
            .expect("the reference reads deflookup's row")
            .get(0);
        assert_eq!(written, serde_json::json!({"by": "deflookup"}));
        // The reference's columns are as they were; deflookup's objects sit next to them.
        let columns_after = column_list(&client, &schema).await;
        assert_eq!(columns_after, columns_before, "{diagnostics}: never altered");
        // Invalidating the reference's module removes deflookup's consumer of it too.
        let seeds = [format!("{REALM}theirs.gts"), format!("{REALM}theirs")];
        let done = db.invalidate_modules(REALM, &seeds).await.unwrap();
        assert!(done.urls.contains(&ours.url), "{done:?}");
        assert_eq!(done.deleted, 2);
        // A second process starts on the adopted table without touching it again.
        PgAdapter::connect(config).await.expect("a second start");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_deflookup_cannot_share_is_a_clear_error_naming_what_differs() {
    let Some(base) = config("incompatible") else { return };
    let config = base.schema(unique_name("bad"));
    let schema = config.get_schema().unwrap().to_owned();
    let client = raw_client(&config.clone().schema("public")).await;
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; \
             CREATE COLLATION {schema}.loose (provider = icu, locale = 'und-u-ks-level2', \
                 deterministic = false); \
             CREATE TABLE {schema}.modules (url text PRIMARY KEY, deps text, \
                 resolved_realm_url text COLLATE {schema}.loose)"
        ))
        .await
        .unwrap();
    let err = PgAdapter::connect(config).await.expect_err("not shareable");
    let message = err.to_string();
    for needle in [
        "cannot be shared",
        "column cache_scope is missing",
        "column deps is text, not jsonb",
        "column resolved_realm_url has the nondeterministic collation loose",
        "primary key",
    ] {
        assert!(message.contains(needle), "{needle}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_opens_connections_only_when_an_operation_needs_one() {
    let Some(config) = config("lazy pool") else { return };
    let db = PgAdapter::connect(config.pool_size(8)).await.expect("connect");
    assert_eq!(db.open_connections(), 1, "start-up checks the schema on one connection");
    db.upsert(&entry(REALM, "a.gts", &[]), LoadStamp::UNGUARDED).await.unwrap();
    db.row_count().await.unwrap();
    assert_eq!(db.open_connections(), 1, "one operation at a time reuses that connection");
}

/// What a client sent that names statements: a Parse (the statement's name and text) or a
/// Bind (the name of the statement it runs).
#[derive(Debug, Clone)]
enum Sent {
    Parse { name: String, text: String },
    Bind { statement: String },
}

/// A relay between clients and the test server that records each client's Parse and Bind
/// messages, in order, per connection. Plain connections only (`sslmode=disable`).
async fn recording_relay(
    config: &PgConfig,
) -> (PgConfig, std::sync::Arc<std::sync::Mutex<Vec<Vec<Sent>>>>) {
    use tokio_postgres::config::Host;
    let upstream = config.tokio_postgres_config().expect("the test server's settings");
    let port = upstream.get_ports().first().copied().unwrap_or(5432);
    let host = upstream.get_hosts().first().cloned().expect("a host");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let relay_port = listener.local_addr().expect("address").port();
    let recorded = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let connections = recorded.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let index = {
                let mut all = connections.lock().unwrap();
                all.push(Vec::new());
                all.len() - 1
            };
            let log = connections.clone();
            let record = move |sent: Sent| log.lock().unwrap()[index].push(sent);
            match &host {
                Host::Tcp(name) => {
                    let server = tokio::net::TcpStream::connect((name.as_str(), port))
                        .await
                        .expect("server");
                    tokio::spawn(relay_recording(client, server, record));
                }
                #[cfg(unix)]
                Host::Unix(dir) => {
                    let path = dir.join(format!(".s.PGSQL.{port}"));
                    let server = tokio::net::UnixStream::connect(path).await.expect("server");
                    tokio::spawn(relay_recording(client, server, record));
                }
            }
        }
    });
    let quoted = |value: &str| format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut conninfo = format!("host=127.0.0.1 port={relay_port} sslmode=disable");
    if let Some(user) = upstream.get_user() {
        conninfo += &format!(" user={}", quoted(user));
    }
    if let Some(dbname) = upstream.get_dbname() {
        conninfo += &format!(" dbname={}", quoted(dbname));
    }
    if let Some(password) = upstream.get_password() {
        conninfo += &format!(" password={}", quoted(&String::from_utf8_lossy(password)));
    }
    let relayed = PgConfig::new(conninfo)
        .schema(config.get_schema().expect("a schema").to_owned())
        .channel(config.get_channel().to_owned());
    (relayed, recorded)
}

/// Copies bytes both ways, reading the client's messages as they pass.
async fn relay_recording(
    client: tokio::net::TcpStream,
    server: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    mut record: impl FnMut(Sent) + Send + 'static,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = tokio::io::split(server);
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
    });
    let mut pending: Vec<u8> = Vec::new();
    // The start-up (and any SSL request before it) has no type byte.
    let mut untyped = true;
    let mut chunk = vec![0; 16 * 1024];
    loop {
        let Ok(read) = client_read.read(&mut chunk).await else { return };
        if read == 0 {
            return;
        }
        pending.extend_from_slice(&chunk[..read]);
        loop {
            let header = if untyped { 0 } else { 1 };
            let Some(length) = pending.get(header..header + 4) else { break };
            let length = u32::from_be_bytes(length.try_into().expect("four bytes")) as usize;
            let Some(message) = pending.get(..header + length) else { break };
            let message = message.to_vec();
            pending.drain(..header + length);
            if untyped {
                // An SSL or GSS encryption request is followed by the start-up, still untyped.
                let code = u32::from_be_bytes(message[4..8].try_into().expect("four bytes"));
                untyped = matches!(code, 80_877_103 | 80_877_104);
                continue;
            }
            let mut fields = message[5..].split(|&b| b == 0).map(String::from_utf8_lossy);
            let mut next = || fields.next().map(|f| f.into_owned()).unwrap_or_default();
            match message[0] {
                b'P' => record(Sent::Parse { name: next(), text: next() }),
                b'B' => {
                    let _portal = next();
                    record(Sent::Bind { statement: next() });
                }
                _ => {}
            }
        }
        // Recorded before the server sees them, so before any reply the client waits for.
        if server_write.write_all(&chunk[..read]).await.is_err() {
            return;
        }
    }
}

/// OPERATIONS: an invalidation on a fresh connection prepares the statements of a transaction
/// before the transaction begins, so no lock is ever held across a round trip spent preparing.
/// Checked on the wire, for the one-transaction path (a module nobody consumes, a realm clear)
/// and the two-transaction one (a module with a consumer), each on a fresh adapter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_connection_prepares_before_its_transaction_begins() {
    let Some(config) = config("prepare before the lock") else { return };
    let db = PgAdapter::connect(config.clone()).await.expect("connect");
    for row in [
        entry(REALM, "leaf.gts", &[]),
        entry(REALM, "used.gts", &[]),
        entry(REALM, "user.gts", &["used"]),
    ] {
        db.upsert(&row, LoadStamp::UNGUARDED).await.expect("seed");
    }
    let modules = |path: &str| Invalidation::Modules {
        realm_url: REALM.into(),
        urls: lookup_core::urls::variants(&format!("{REALM}{path}")),
    };
    let cases = [
        ("a module nobody consumes", modules("leaf.gts"), 1),
        ("a module with a consumer", modules("used.gts"), 2),
        ("a realm clear", Invalidation::Realm { realm_url: REALM.into() }, 1),
    ];
    for (case, invalidation, transactions) in cases {
        let (relayed, recorded) = recording_relay(&config).await;
        let fresh =
            PgAdapter::connect(relayed.pool_size(1)).await.expect("connect through the relay");
        recorded.lock().unwrap().iter_mut().for_each(Vec::clear);
        bounded(case, fresh.apply_invalidation(&invalidation)).await.expect(case);
        let sent: Vec<Sent> = recorded.lock().unwrap().concat();
        let mut texts = std::collections::HashMap::new();
        let (mut inside, mut begun, mut parsed) = (false, 0, 0);
        for message in &sent {
            match message {
                Sent::Parse { name, text } => {
                    assert!(!inside, "{case}: {text:?} prepared inside a transaction: {sent:#?}");
                    texts.insert(name.clone(), text.clone());
                    parsed += 1;
                }
                Sent::Bind { statement } => {
                    let text = texts.get(statement).map(String::as_str).unwrap_or_default();
                    if text == "BEGIN" {
                        inside = true;
                        begun += 1;
                    } else if text == "COMMIT" || text == "ROLLBACK" {
                        inside = false;
                    }
                }
            }
        }
        assert!(parsed > 0, "{case}: the connection was fresh, so it prepared: {sent:#?}");
        assert_eq!(begun, transactions, "{case}: {sent:#?}");
        assert!(!inside, "{case}: the last transaction ended: {sent:#?}");
    }
}
