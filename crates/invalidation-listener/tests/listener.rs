//! The listener on a real Postgres, found through `DATABASE_URL`.
//!
//! Without `DATABASE_URL` these tests print a skip notice and pass, except under `CI`, where
//! they fail: a CI run must never pass without having exercised Postgres. Each test listens
//! on its own channel (and names its connections with its own `application_name`), so tests
//! running in parallel on one server do not hear or count each other.
//!
//! Waits are bounded ([`bounded`], 20 s) and gated on the listener's own events, which it
//! sends only after the sink was called. The exceptions are states that offer no event (a
//! server backend gone after a close, another process parked on a lock, a lock released):
//! those are polled, bounded (`wait_no_backend`, `until`, and an inline loop or two).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adapter_pg::tokio_postgres::{self, Client, NoTls};
use behaviour_suite::{FakeModule, FakeRenderer, bounded, unique_name};
use invalidation_listener::{
    InvalidationSink, ListenerEvent, ListenerOptions, PgConfig, PgError, PgInvalidationListener,
};
use tokio::sync::broadcast;

// ---------------------------------------------------------------------------------------------
// Helpers (also meant for the end-to-end A→B tests with real lookups).
// ---------------------------------------------------------------------------------------------

/// A Postgres server to test against.
#[derive(Debug, Clone)]
struct TestDb {
    url: String,
}

impl TestDb {
    /// The server of `DATABASE_URL`. Without one: under `CI`, panics (a CI run must exercise
    /// Postgres); otherwise prints a skip notice for `test` and returns `None`.
    fn from_env(test: &str) -> Option<TestDb> {
        behaviour_suite::database_url(test).map(|url| TestDb { url })
    }

    /// Settings on `channel`, with connections named `application_name` so the test can find
    /// its own backends in `pg_stat_activity`. Add `.schema(unique_name(..))` for a table.
    fn config(&self, channel: &str, application_name: &str) -> PgConfig {
        PgConfig::new(with_application_name(&self.url, application_name)).channel(channel)
    }

    /// A plain client for notifying and inspecting, its connection driven in the background.
    async fn client(&self) -> Client {
        let (client, connection) =
            bounded("a test connection", tokio_postgres::connect(&self.url, NoTls))
                .await
                .expect("connect to DATABASE_URL");
        tokio::spawn(async move {
            // Ends with an error when the server goes away (restart test); nothing to do.
            let _ = connection.await;
        });
        client
    }
}

/// Adds `application_name` to a URL or key=value connection string.
fn with_application_name(url: &str, name: &str) -> String {
    with_setting(url, "application_name", name)
}

/// Adds the setting `key` (a later setting wins over an earlier one) to a URL or key=value
/// connection string.
fn with_setting(url: &str, key: &str, value: &str) -> String {
    if url.contains("://") {
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}{key}={value}")
    } else {
        format!("{url} {key}={value}")
    }
}

async fn notify(client: &Client, channel: &str, payload: &str) {
    bounded("pg_notify", client.execute("SELECT pg_notify($1, $2)", &[&channel, &payload]))
        .await
        .expect("pg_notify");
}

/// Polls (bounded) until no backend matches `condition` with parameter `value`. The server has
/// no event for "a backend has exited", so this waits by polling (as `until` below does).
async fn wait_no_backend(
    client: &Client,
    condition: &str,
    value: &(dyn tokio_postgres::types::ToSql + Sync),
) {
    let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE {condition}");
    bounded("the listener's backend to exit", async {
        loop {
            let count: i64 =
                client.query_one(&sql, &[value]).await.expect("pg_stat_activity").get(0);
            if count == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

async fn wait_no_backend_named(client: &Client, application_name: &str) {
    // The listener's connections are named exactly as configured (the default "deflookup"
    // alone becomes "deflookup-listener").
    wait_no_backend(client, "application_name = $1", &application_name).await;
}

/// What the sink was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Modules(String, Vec<String>),
    Realm(String),
    Global,
}

/// A sink that records every call.
#[derive(Debug, Default)]
struct RecordingSink {
    calls: Mutex<Vec<Call>>,
}

impl RecordingSink {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

impl InvalidationSink for RecordingSink {
    fn bump_modules(&self, realm_url: &str, urls: &[String]) {
        self.calls.lock().unwrap().push(Call::Modules(realm_url.to_owned(), urls.to_vec()));
    }
    fn bump_realm(&self, realm_url: &str) {
        self.calls.lock().unwrap().push(Call::Realm(realm_url.to_owned()));
    }
    fn bump_global(&self) {
        self.calls.lock().unwrap().push(Call::Global);
    }
}

fn fast_options() -> ListenerOptions {
    ListenerOptions::default().backoff(Duration::from_millis(20), Duration::from_millis(500))
}

async fn start(
    config: &PgConfig,
    origin: Option<&str>,
    options: ListenerOptions,
) -> (PgInvalidationListener, Arc<RecordingSink>, broadcast::Receiver<ListenerEvent>) {
    let sink = Arc::new(RecordingSink::default());
    let listener = bounded(
        "the listener to start",
        PgInvalidationListener::start_with(
            config,
            origin.map(str::to_owned),
            sink.clone(),
            options,
        ),
    )
    .await
    .expect("listener starts");
    let mut events = listener.subscribe();
    expect_event(&mut events, ListenerEvent::Connected).await;
    (listener, sink, events)
}

async fn next_event(events: &mut broadcast::Receiver<ListenerEvent>, what: &str) -> ListenerEvent {
    bounded(what, events.recv())
        .await
        .unwrap_or_else(|e| panic!("event stream failed waiting for {what}: {e}"))
}

/// The very next event must be `expected` (so no unexpected event slipped in before it).
async fn expect_event(events: &mut broadcast::Receiver<ListenerEvent>, expected: ListenerEvent) {
    let got = next_event(events, &format!("{expected:?}")).await;
    assert_eq!(got, expected);
}

/// Ends `listener`'s session from the server side and waits for its `Disconnected` event.
async fn terminate_listener(
    db: &TestDb,
    listener: &PgInvalidationListener,
    events: &mut broadcast::Receiver<ListenerEvent>,
) {
    let pid = listener.backend_pid().expect("connected");
    db.client().await.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.expect("kill");
    match next_event(events, "Disconnected").await {
        ListenerEvent::Disconnected { .. } => {}
        other => panic!("expected Disconnected, got {other:?}"),
    }
}

/// The very next event must be a resync.
async fn expect_resync(events: &mut broadcast::Receiver<ListenerEvent>) -> String {
    match next_event(events, "Resync").await {
        ListenerEvent::Resync { reason } => reason,
        other => panic!("expected Resync, got {other:?}"),
    }
}

fn module_payload(realm: &str, urls: &[&str]) -> String {
    checked(&format!(
        r#"{{"k":"module","r":"{realm}","m":[{}]}}"#,
        urls.iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(",")
    ))
}

/// Payloads here are written by hand on purpose (they are what a peer sends); this only
/// checks that the test wrote valid wire text where it meant to.
fn checked(text: &str) -> String {
    assert!(
        invalidation_listener::parse_payload(text).is_ok(),
        "test payload {text} does not parse"
    );
    text.to_owned()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

// ---------------------------------------------------------------------------------------------
// End to end: two "processes" (two lookups, two adapters, two origins) on one database.
// ---------------------------------------------------------------------------------------------

use adapter_pg::PgAdapter;

use lookup_core::{CachingLookup, Realm};

const REALM: &str = "https://realm.test/app/";

/// One peer: its own adapter (own origin and pool) on the shared schema and channel, a
/// lookup with its own renderer, and a listener feeding that lookup.
struct Peer {
    lookup: CachingLookup<PgAdapter, FakeRenderer>,
    renderer: FakeRenderer,
    listener: PgInvalidationListener,
    events: broadcast::Receiver<ListenerEvent>,
}

async fn peer(config: &PgConfig) -> Peer {
    peer_with(config, lookup_core::LookupConfig::default()).await
}

async fn peer_with(config: &PgConfig, lookup_config: lookup_core::LookupConfig) -> Peer {
    let db = bounded("connect", PgAdapter::connect(config.clone())).await.expect("adapter");
    let renderer = FakeRenderer::default();
    let lookup = CachingLookup::with_probe(
        db.clone(),
        renderer.clone(),
        lookup_core::NoRemoteRealms,
        lookup_config,
    );
    lookup
        .register_realm(Realm { url: REALM.into(), owner: "@o:test".into(), public: true })
        .expect("realm");
    let sink: Arc<dyn InvalidationSink> = Arc::new(lookup.clone());
    let origin = Some(db.origin().to_owned());
    let listener = bounded(
        "listener",
        PgInvalidationListener::start_with(config, origin, sink, fast_options()),
    )
    .await
    .expect("listener");
    let mut events = listener.subscribe();
    expect_event(&mut events, ListenerEvent::Connected).await;
    Peer { lookup, renderer, listener, events }
}

fn shared_config(db: &TestDb, test: &str) -> PgConfig {
    db.config(&unique_name(test), &unique_name(test)).schema(unique_name(test))
}

#[path = "listener/catch_up.rs"]
mod catch_up;
#[path = "listener/e2e.rs"]
mod e2e;
#[path = "listener/faults.rs"]
mod faults;
#[path = "listener/interop.rs"]
mod interop;
#[path = "listener/lifecycle.rs"]
mod lifecycle;
#[path = "listener/populate.rs"]
mod populate;
#[path = "listener/wire.rs"]
mod wire;
