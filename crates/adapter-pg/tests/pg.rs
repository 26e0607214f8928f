//! The Postgres adapter on a real server (`DATABASE_URL`; `cargo xtask test-pg` provides one):
//! the shared behaviour suite, the table's shape, and the transactional broadcast.

use std::collections::HashSet;
use std::time::Duration;

use adapter_pg::{PgAdapter, PgConfig, parse_payload};
use behaviour_suite::{bounded, database_url, unique_name};
use lookup_core::{CacheEntry, CacheScope, DbAdapter, Invalidation, LoadStamp};
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
    client.batch_execute(&format!("LISTEN {}", config.channel_name())).await.expect("LISTEN");
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
    let schema = config.schema_name().unwrap();
    let versions: Vec<i32> = client
        .query("SELECT version FROM deflookup_schema_version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1], "one migration recorded once");
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

    let urls = vec![format!("{REALM}leaf.gts"), format!("{REALM}leaf")];
    let deleted = db
        .apply_invalidation(&Invalidation::Modules { realm_url: REALM.into(), urls: urls.clone() })
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let payload = bounded("the NOTIFY", heard.recv()).await.expect("payload");
    let parsed = parse_payload(&payload).expect("well-formed");
    assert_eq!(parsed.invalidation, Invalidation::Modules { realm_url: REALM.into(), urls });
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
