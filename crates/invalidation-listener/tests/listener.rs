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
// Dispatch.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_pg_notify_is_heard_and_each_kind_is_replayed_once() {
    let Some(db) = TestDb::from_env("raw_pg_notify_is_heard_and_each_kind_is_replayed_once") else {
        return;
    };
    let channel = unique_name("dispatch");
    // A heartbeat far more frequent than notifications, so pings interleave with replays.
    let options = fast_options().heartbeat(Duration::from_millis(5), Duration::from_secs(5));
    let (listener, sink, mut events) =
        start(&db.config(&channel, &channel), Some("me"), options).await;
    let client = db.client().await;
    let realm = "https://r.test/";

    notify(&client, &channel, &module_payload(realm, &["https://r.test/a.gts"])).await;
    expect_event(
        &mut events,
        ListenerEvent::Module {
            realm_url: realm.into(),
            urls: strings(&["https://r.test/a.gts"]),
            replayed: false,
        },
    )
    .await;

    let multi = ["https://r.test/b.gts", "https://r.test/b", "https://r.test/c"];
    notify(&client, &channel, &module_payload(realm, &multi)).await;
    expect_event(
        &mut events,
        ListenerEvent::Module { realm_url: realm.into(), urls: strings(&multi), replayed: false },
    )
    .await;

    notify(&client, &channel, r#"{"k":"realm","r":"https://r.test/","extra":[1,2]}"#).await;
    expect_event(&mut events, ListenerEvent::Realm { realm_url: realm.into(), replayed: false })
        .await;

    notify(&client, &channel, r#"{"k":"global","o":"a-peer"}"#).await;
    expect_event(&mut events, ListenerEvent::Global { replayed: false }).await;

    assert_eq!(
        sink.calls(),
        [
            Call::Modules(realm.into(), strings(&["https://r.test/a.gts"])),
            Call::Modules(realm.into(), strings(&multi)),
            Call::Realm(realm.into()),
            Call::Global,
        ],
        "each URL bumped exactly once, realm and global once each"
    );
    let stats = listener.stats();
    assert!(stats.connected);
    assert!(stats.backend_pid.is_some());
    assert_eq!((stats.module_payloads, stats.realm_payloads, stats.global_payloads), (2, 1, 1));
    assert_eq!((stats.malformed_payloads, stats.own_echoes_skipped), (0, 0));
    assert_eq!((stats.reconnects, stats.resyncs, stats.last_error), (0, 0, None));
    bounded("shutdown", listener.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_empty_payloads_are_ignored_and_listening_goes_on() {
    let Some(db) =
        TestDb::from_env("malformed_and_empty_payloads_are_ignored_and_listening_goes_on")
    else {
        return;
    };
    let channel = unique_name("malformed");
    let (listener, sink, mut events) =
        start(&db.config(&channel, &channel), None, fast_options()).await;
    let client = db.client().await;

    let malformed = [
        "not json",
        r#"{"k":"bogus"}"#,
        r#"{"k":"module","r":"https://r.test/","m":[]}"#,
        r#"{"k":"module","r":"https://r.test/","m":["https://r.test/a",7]}"#,
        r#"{"k":"realm","r":""}"#,
        "[1,2,3]",
    ];
    for payload in malformed {
        notify(&client, &channel, payload).await;
    }
    // Empty payloads, both ways a peer can send one: ignored silently (no event, no count).
    notify(&client, &channel, "").await;
    bounded("NOTIFY", client.batch_execute(&format!("NOTIFY \"{channel}\"")))
        .await
        .expect("NOTIFY");
    notify(&client, &channel, r#"{"k":"realm","r":"https://r.test/"}"#).await;

    for payload in malformed {
        expect_event(&mut events, ListenerEvent::Malformed { payload: payload.into() }).await;
    }
    // The very next event is the realm payload: the empty ones produced nothing.
    expect_event(
        &mut events,
        ListenerEvent::Realm { realm_url: "https://r.test/".into(), replayed: false },
    )
    .await;

    assert_eq!(sink.calls(), [Call::Realm("https://r.test/".into())]);
    let stats = listener.stats();
    assert_eq!(stats.malformed_payloads, malformed.len() as u64);
    assert_eq!(stats.realm_payloads, 1);
    assert!(stats.connected, "a malformed payload must not cost the connection");
    assert_eq!(stats.reconnects, 0);
    bounded("shutdown", listener.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_echo_is_skipped_and_peers_are_not() {
    let Some(db) = TestDb::from_env("own_echo_is_skipped_and_peers_are_not") else {
        return;
    };
    let channel = unique_name("echo");
    let (listener, sink, mut events) =
        start(&db.config(&channel, &channel), Some("origin-me"), fast_options()).await;
    let client = db.client().await;

    notify(
        &client,
        &channel,
        r#"{"k":"module","r":"https://r.test/","m":["https://r.test/a"],"o":"origin-me"}"#,
    )
    .await;
    notify(&client, &channel, r#"{"k":"global","o":"origin-me"}"#).await;
    notify(&client, &channel, r#"{"k":"realm","r":"https://r.test/","o":"origin-peer"}"#).await;
    notify(&client, &channel, r#"{"k":"realm","r":"https://s.test/"}"#).await;

    expect_event(
        &mut events,
        ListenerEvent::Realm { realm_url: "https://r.test/".into(), replayed: false },
    )
    .await;
    expect_event(
        &mut events,
        ListenerEvent::Realm { realm_url: "https://s.test/".into(), replayed: false },
    )
    .await;
    assert_eq!(
        sink.calls(),
        [Call::Realm("https://r.test/".into()), Call::Realm("https://s.test/".into())]
    );
    let stats = listener.stats();
    assert_eq!(stats.own_echoes_skipped, 2);
    assert_eq!((stats.module_payloads, stats.realm_payloads, stats.global_payloads), (0, 2, 0));
    bounded("shutdown", listener.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_case_channel_is_listened_to_verbatim() {
    let Some(db) = TestDb::from_env("a_mixed_case_channel_is_listened_to_verbatim") else {
        return;
    };
    // pg_notify takes the channel verbatim; an unquoted LISTEN would fold it to lower case.
    let channel = format!("Mixed_{}", unique_name("case"));
    let (listener, sink, mut events) =
        start(&db.config(&channel, "t_mixed_case"), None, fast_options()).await;
    let client = db.client().await;
    notify(&client, &channel, r#"{"k":"global"}"#).await;
    expect_event(&mut events, ListenerEvent::Global { replayed: false }).await;
    assert_eq!(sink.calls(), [Call::Global]);
    bounded("shutdown", listener.shutdown()).await;
}

// ---------------------------------------------------------------------------------------------
// Start failures.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_connection_failure_is_returned_without_the_password() {
    // Needs no server: nothing listens on port 1.
    let config =
        PgConfig::new("postgres://alice:s3cret-pw@127.0.0.1:1/app").channel("t_unreachable");
    let sink = Arc::new(RecordingSink::default());
    let error =
        bounded("start to fail", PgInvalidationListener::start(&config, None, sink.clone()))
            .await
            .expect_err("nothing listens on port 1");
    let text = format!("{error} / {error:?}");
    assert!(matches!(error, PgError::Connect { .. }), "{text}");
    assert!(error.is_transient());
    assert!(!text.contains("s3cret-pw"), "password leaked: {text}");
    assert!(text.contains("alice:***@127.0.0.1:1"), "{text}");
    assert!(sink.calls().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_listen_is_returned_and_leaves_no_backend() {
    let Some(db) = TestDb::from_env("a_failing_listen_is_returned_and_leaves_no_backend") else {
        return;
    };
    let name = unique_name("listen_fails");
    // The empty channel passes the config check but `LISTEN ""` is refused by the server.
    let sink = Arc::new(RecordingSink::default());
    let error =
        bounded("start to fail", PgInvalidationListener::start(&db.config("", &name), None, sink))
            .await
            .expect_err("LISTEN \"\" is refused");
    assert!(matches!(error, PgError::Query { operation: "LISTEN", .. }), "{error:?}");
    wait_no_backend_named(&db.client().await, &name).await;
}

// ---------------------------------------------------------------------------------------------
// Faults: reconnect and resync.
// ---------------------------------------------------------------------------------------------

/// After a lost connection: Disconnected, Connected, Resync in that order, with exactly one
/// extra `bump_global` (the resync) and a new backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_verifies_the_server_and_listens_over_tls() {
    let Some(port) = behaviour_suite::xtask_setting("listener TLS", "DEFLOOKUP_TLS_PORT") else {
        return;
    };
    let ca = std::env::var("DEFLOOKUP_TLS_CA").expect("set with DEFLOOKUP_TLS_PORT");
    let url = format!(
        "postgres://postgres@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={ca}"
    );
    let config = PgConfig::new(url).channel(unique_name("tls"));
    let (listener, sink, mut events) = start(&config, None, fast_options()).await;
    let pid = listener.backend_pid().expect("connected");
    let (client, connection) = config.connect_unpooled().await.expect("raw TLS connection");
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT ssl, version FROM pg_stat_ssl WHERE pid = $1", &[&pid])
        .await
        .expect("the listener's backend");
    assert!(row.get::<_, bool>(0), "the LISTEN connection is encrypted");
    notify(&client, config.get_channel(), r#"{"k":"realm","r":"https://r.test/"}"#).await;
    expect_event(
        &mut events,
        ListenerEvent::Realm { realm_url: "https://r.test/".into(), replayed: false },
    )
    .await;
    assert_eq!(sink.calls(), [Call::Realm("https://r.test/".into())]);
    listener.shutdown().await;
    // The wrong CA: the start fails, naming the TLS problem.
    let wrong = std::env::var("DEFLOOKUP_TLS_WRONG_CA").expect("set with DEFLOOKUP_TLS_PORT");
    let url = format!(
        "postgres://postgres@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={wrong}"
    );
    let sink = Arc::new(RecordingSink::default());
    let err = PgInvalidationListener::start(&PgConfig::new(url), None, sink)
        .await
        .expect_err("an untrusted server");
    assert!(err.to_string().contains("not trusted"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_transaction_pooler_the_listener_needs_and_uses_a_direct_url() {
    let Some(db) = TestDb::from_env("listener URL") else { return };
    let Some(bouncer) = behaviour_suite::xtask_setting("listener URL", "DEFLOOKUP_PGBOUNCER_URL")
    else {
        return;
    };
    let client = db.client().await;
    let pooled = PgConfig::new(bouncer).channel(unique_name("pooled"));
    let sink = Arc::new(RecordingSink::default());
    let err = PgInvalidationListener::start(&pooled, None, sink).await.expect_err("no LISTEN URL");
    assert!(err.to_string().contains("listener URL"), "{err}");
    let config = pooled.listen_url(db.url.clone());
    let (listener, sink, mut events) = start(&config, None, fast_options()).await;
    notify(&client, config.get_channel(), r#"{"k":"global"}"#).await;
    expect_event(&mut events, ListenerEvent::Global { replayed: false }).await;
    assert_eq!(sink.calls(), [Call::Global]);
    listener.shutdown().await;
}

async fn expect_reconnect_and_resync(
    listener: &PgInvalidationListener,
    sink: &RecordingSink,
    events: &mut broadcast::Receiver<ListenerEvent>,
    calls_before: usize,
) -> (String, Duration) {
    let error = match next_event(events, "Disconnected").await {
        ListenerEvent::Disconnected { error } => error,
        other => panic!("expected Disconnected, got {other:?}"),
    };
    let down = Instant::now();
    expect_event(events, ListenerEvent::Connected).await;
    let outage = down.elapsed();
    expect_resync(events).await;
    let calls = sink.calls();
    assert_eq!(calls[calls_before..], [Call::Global], "exactly one resync bump");
    let stats = listener.stats();
    assert!(stats.connected);
    assert_eq!((stats.reconnects, stats.resyncs), (1, 1));
    assert!(stats.last_error.is_some());
    (error, outage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_backend_reconnects_resyncs_and_serves() {
    let Some(db) = TestDb::from_env("a_terminated_backend_reconnects_resyncs_and_serves") else {
        return;
    };
    let channel = unique_name("terminate");
    // Production backoff, so the printed reconnect time is the one operators will see.
    let options = ListenerOptions::default();
    let (listener, sink, mut events) = start(&db.config(&channel, &channel), None, options).await;
    let client = db.client().await;
    notify(&client, &channel, r#"{"k":"realm","r":"https://r.test/"}"#).await;
    expect_event(
        &mut events,
        ListenerEvent::Realm { realm_url: "https://r.test/".into(), replayed: false },
    )
    .await;

    let old_pid = listener.backend_pid().expect("connected listener has a backend");
    let killed_at = Instant::now();
    let row = bounded(
        "pg_terminate_backend",
        client.query_one("SELECT pg_terminate_backend($1)", &[&old_pid]),
    )
    .await
    .expect("pg_terminate_backend");
    assert!(row.get::<_, bool>(0), "backend {old_pid} was not terminated");

    let (error, outage) = expect_reconnect_and_resync(&listener, &sink, &mut events, 1).await;
    let reconnect = killed_at.elapsed();
    eprintln!(
        "reconnect after pg_terminate_backend: {reconnect:?} from the kill to the resync \
         ({outage:?} from Disconnected to Connected); error: {error}"
    );
    assert_ne!(listener.backend_pid(), Some(old_pid));
    assert!(!error.contains("s3cret"));

    // Normal service on the new connection.
    notify(
        &client,
        &channel,
        &module_payload("https://r.test/", &["https://r.test/x.gts", "https://r.test/x"]),
    )
    .await;
    expect_event(
        &mut events,
        ListenerEvent::Module {
            realm_url: "https://r.test/".into(),
            urls: strings(&["https://r.test/x.gts", "https://r.test/x"]),
            replayed: false,
        },
    )
    .await;
    assert_eq!(
        sink.calls(),
        [
            Call::Realm("https://r.test/".into()),
            Call::Global,
            Call::Modules(
                "https://r.test/".into(),
                strings(&["https://r.test/x.gts", "https://r.test/x"])
            ),
        ]
    );
    bounded("shutdown", listener.shutdown()).await;
}

/// A TCP relay to the test server that can freeze its current connections: they stay open but
/// nothing passes any more, like a NAT that silently forgot a connection. New connections
/// relay normally.
struct FreezingRelay {
    port: u16,
    freeze: tokio::sync::watch::Sender<u64>,
}

impl FreezingRelay {
    async fn start(upstream: (String, u16)) -> FreezingRelay {
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = socket.local_addr().expect("relay address").port();
        let (freeze, freeze_rx) = tokio::sync::watch::channel(0u64);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = socket.accept().await else { return };
                let mut frozen = freeze_rx.clone();
                let epoch = *frozen.borrow_and_update();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let freeze = async {
                        let _ = frozen.wait_for(|e| *e != epoch).await;
                    };
                    let frozen_now = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
                        () = freeze => true,
                    };
                    if frozen_now {
                        // Hold both sockets open, silent, until the test's runtime ends.
                        std::future::pending::<()>().await;
                    }
                });
            }
        });
        FreezingRelay { port, freeze }
    }

    fn freeze_current_connections(&self) {
        self.freeze.send_modify(|epoch| *epoch += 1);
    }
}

fn quote_conninfo(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_connection_is_noticed_by_the_heartbeat() {
    let Some(db) = TestDb::from_env("a_silently_dead_connection_is_noticed_by_the_heartbeat")
    else {
        return;
    };
    let parsed: tokio_postgres::Config = db.url.parse().expect("DATABASE_URL parses");
    let (Some(tokio_postgres::config::Host::Tcp(host)), Some(port)) =
        (parsed.get_hosts().first(), parsed.get_ports().first().copied().or(Some(5432)))
    else {
        eprintln!("skipping the heartbeat test: DATABASE_URL is not a TCP address");
        return;
    };
    let relay = FreezingRelay::start((host.clone(), port)).await;
    let channel = unique_name("heartbeat");
    let mut conninfo = format!("host=127.0.0.1 port={} application_name={channel}", relay.port);
    if let Some(user) = parsed.get_user() {
        conninfo += &format!(" user={}", quote_conninfo(user));
    }
    if let Some(dbname) = parsed.get_dbname() {
        conninfo += &format!(" dbname={}", quote_conninfo(dbname));
    }
    if let Some(password) = parsed.get_password() {
        conninfo += &format!(" password={}", quote_conninfo(&String::from_utf8_lossy(password)));
    }
    let config = PgConfig::new(conninfo).channel(&channel);
    let options = fast_options().heartbeat(Duration::from_millis(100), Duration::from_millis(300));
    let (listener, sink, mut events) = start(&config, None, options).await;

    relay.freeze_current_connections();
    let (error, outage) = expect_reconnect_and_resync(&listener, &sink, &mut events, 0).await;
    assert!(error.contains("heartbeat"), "{error}");
    eprintln!(
        "reconnect after a silent connection loss: {outage:?} from Disconnected to Connected"
    );

    let client = db.client().await;
    notify(&client, &channel, r#"{"k":"global"}"#).await;
    expect_event(&mut events, ListenerEvent::Global { replayed: false }).await;
    assert_eq!(sink.calls(), [Call::Global, Call::Global]);
    bounded("shutdown", listener.shutdown()).await;
}

// ---------------------------------------------------------------------------------------------
// Shutdown.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_idempotent_and_leaves_no_backend() {
    let Some(db) = TestDb::from_env("shutdown_is_idempotent_and_leaves_no_backend") else {
        return;
    };
    let channel = unique_name("shutdown");
    let (listener, _sink, _events) =
        start(&db.config(&channel, &channel), None, fast_options()).await;
    let pid = listener.backend_pid().expect("connected");
    let client = db.client().await;

    // Two concurrent calls and a later one: all return, none does anything twice.
    bounded("shutdown", async { tokio::join!(listener.shutdown(), listener.shutdown()) }).await;
    bounded("second shutdown", listener.shutdown()).await;
    let stats = listener.stats();
    assert!(!stats.connected);
    assert_eq!(stats.backend_pid, None);
    assert_eq!(stats.last_error, None, "a shutdown is not an error");
    wait_no_backend(&client, "pid = $1", &pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_listener_closes_its_connection() {
    let Some(db) = TestDb::from_env("dropping_the_listener_closes_its_connection") else {
        return;
    };
    let channel = unique_name("drop");
    let (listener, _sink, _events) =
        start(&db.config(&channel, &channel), None, fast_options()).await;
    let pid = listener.backend_pid().expect("connected");
    drop(listener);
    wait_no_backend(&db.client().await, "pid = $1", &pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_racing_a_shutdown_leaves_no_subscription() {
    let Some(db) = TestDb::from_env("a_start_racing_a_shutdown_leaves_no_subscription") else {
        return;
    };
    let name = unique_name("race");
    let config = db.config(&name, &name);
    let client = db.client().await;

    // 1. `start` cancelled at spread-out points: before connecting, while connecting, while
    //    LISTEN is in flight, just after. The delays only vary where the cancellation lands;
    //    the assertion does not depend on them.
    let mut started = 0;
    for step in 0..40u64 {
        let sink = Arc::new(RecordingSink::default());
        let start = PgInvalidationListener::start_with(&config, None, sink, fast_options());
        match tokio::time::timeout(Duration::from_micros(step * 300), start).await {
            Err(_cancelled) => {}
            Ok(Ok(listener)) => {
                started += 1;
                // Alternate the two ways of stopping a listener that did start.
                if step % 2 == 0 {
                    bounded("shutdown", listener.shutdown()).await;
                } else {
                    drop(listener);
                }
            }
            Ok(Err(error)) => panic!("start failed: {error}"),
        }
    }
    eprintln!("race: {started} of 40 starts completed before their cancellation");

    // 2. A shutdown while the task backs off before reconnecting: it must not wait out the
    //    backoff (a minute here, far beyond the bounded wait).
    let slow = ListenerOptions::default().backoff(Duration::from_secs(60), Duration::from_secs(60));
    let (listener, _sink, mut events) = start(&config, None, slow.clone()).await;
    let pid = listener.backend_pid().expect("connected");
    client.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.expect("terminate");
    assert!(matches!(
        next_event(&mut events, "Disconnected").await,
        ListenerEvent::Disconnected { .. }
    ));
    bounded("shutdown during backoff", listener.shutdown()).await;

    // 3. A shutdown racing a reconnect in progress (no backoff to speak of).
    let (listener, _sink, _events) = start(&config, None, fast_options()).await;
    let pid = listener.backend_pid().expect("connected");
    client.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.expect("terminate");
    bounded("shutdown during reconnect", listener.shutdown()).await;
    assert!(!listener.stats().connected);

    // No backend of this test is left, so no LISTEN on its channel survives.
    wait_no_backend_named(&client, &name).await;
}

// ---------------------------------------------------------------------------------------------
// Server restart (run alone by `cargo xtask test-pg`, which sets DEFLOOKUP_PG_RESTART).
// ---------------------------------------------------------------------------------------------

/// Runs the restart command with its output in a file. Its stdio must not be ours: the
/// restarted server inherits the command's stdout and stderr and keeps them open for its
/// whole life, so a pipe (a harness capturing the test's output) would never see its end.
async fn run_restart_command(command: String) -> Instant {
    let log = std::env::temp_dir().join(format!("deflookup-restart-{}.log", std::process::id()));
    let file = std::fs::File::create(&log).expect("create the restart log");
    let stderr = file.try_clone().expect("clone the restart log handle");
    let status = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(&command)
                .stdin(std::process::Stdio::null())
                .stdout(file)
                .stderr(stderr)
                .status()
        }),
    )
    .await
    .expect("the restart command finishes within 2 minutes")
    .expect("the restart command's thread")
    .expect("sh runs");
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.success(),
        "the restart command failed: {status}; its output ({}):\n{output}",
        log.display()
    );
    eprintln!("restart command output (the server keeps logging there): {}", log.display());
    Instant::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the server: run alone by `cargo xtask test-pg` with DEFLOOKUP_PG_RESTART"]
async fn a_server_restart_reconnects_resyncs_and_serves() {
    let Some(db) = TestDb::from_env("a_server_restart_reconnects_resyncs_and_serves") else {
        return;
    };
    let restart = match std::env::var("DEFLOOKUP_PG_RESTART") {
        Ok(command) if !command.trim().is_empty() => command,
        _ if std::env::var_os("CI").is_some() => {
            panic!(
                "DEFLOOKUP_PG_RESTART (a shell command restarting the server) is not set under CI"
            )
        }
        _ => {
            eprintln!("skipping the restart test: DEFLOOKUP_PG_RESTART is not set");
            return;
        }
    };
    let channel = unique_name("restart");
    // Production backoff, so the printed reconnect time is the one operators will see.
    let options = ListenerOptions::default();
    let (listener, sink, mut events) = start(&db.config(&channel, &channel), None, options).await;
    let old_pid = listener.backend_pid();

    // The restart runs alongside, so the events are observed as they happen.
    let restart_began = Instant::now();
    let restart = tokio::spawn(run_restart_command(restart));
    let (error, outage) = expect_reconnect_and_resync(&listener, &sink, &mut events, 0).await;
    let resynced = Instant::now();
    let server_back = restart.await.expect("the restart command's task");
    eprintln!(
        "reconnect after a server restart: {outage:?} from Disconnected to Connected; resync {:?} \
         after the restart command began and {:?} after it reported the server up; error: {error}",
        resynced - restart_began,
        resynced.saturating_duration_since(server_back),
    );
    assert_ne!(listener.backend_pid(), old_pid);

    let client = db.client().await;
    notify(&client, &channel, r#"{"k":"realm","r":"https://r.test/"}"#).await;
    expect_event(
        &mut events,
        ListenerEvent::Realm { realm_url: "https://r.test/".into(), replayed: false },
    )
    .await;
    assert_eq!(sink.calls(), [Call::Global, Call::Realm("https://r.test/".into())]);
    bounded("shutdown", listener.shutdown()).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_invalidate_clear_realm_and_clear_all_reach_the_other_peer() {
    let Some(db) = TestDb::from_env("e2e_kinds") else { return };
    let config = shared_config(&db, "e2e_kinds");
    let mut a = peer(&config).await;
    // B records what its listener replays, with A's adapter as the sender.
    let (b, b_sink, mut b_events) = start(&config, None, fast_options()).await;
    let url = format!("{REALM}card.gts");
    a.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    a.lookup.get_module_entry(&url, None).await.expect("seed");

    let list = a.lookup.invalidate(&url).await.expect("invalidate");
    let heard = next_event(&mut b_events, "the module payload").await;
    assert_eq!(
        heard,
        ListenerEvent::Module { realm_url: REALM.into(), urls: list.clone(), replayed: false }
    );
    a.lookup.clear_realm(REALM).await.expect("clear realm");
    expect_event(&mut b_events, ListenerEvent::Realm { realm_url: REALM.into(), replayed: false })
        .await;
    a.lookup.clear_all().await.expect("clear all");
    expect_event(&mut b_events, ListenerEvent::Global { replayed: false }).await;
    assert_eq!(
        b_sink.calls(),
        [Call::Modules(REALM.into(), list), Call::Realm(REALM.into()), Call::Global],
        "each broadcast is replayed exactly once"
    );
    // A skips its own three echoes. Notifications arrive in commit order, so once a marker
    // sent after them is A's next event, A has seen (and skipped) all three.
    let marker = format!(r#"{{"k":"realm","r":"{REALM}marker/"}}"#);
    notify(&db.client().await, config.get_channel(), &marker).await;
    expect_event(
        &mut a.events,
        ListenerEvent::Realm { realm_url: format!("{REALM}marker/"), replayed: false },
    )
    .await;
    assert_eq!(a.listener.stats().own_echoes_skipped, 3);
    a.listener.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_in_flight_load_started_before_an_invalidation_does_not_persist() {
    let Some(db) = TestDb::from_env("e2e_in_flight") else { return };
    let config = shared_config(&db, "e2e_in_flight");
    let a = peer(&config).await;
    let mut b = peer(&config).await;
    let url = format!("{REALM}card.gts");
    b.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    let gate = b.renderer.gate(&url);
    let load = {
        let lookup = b.lookup.clone();
        let url = url.clone();
        tokio::spawn(async move { lookup.get_module_entry(&url, None).await })
    };
    gate.entered().await; // B has read version 1 and is rendering it
    b.renderer.set(&url, FakeModule::ready(&["Card"], &[]).version(2));
    let list = a.lookup.invalidate(&url).await.expect("A invalidates");
    expect_event(
        &mut b.events,
        ListenerEvent::Module { realm_url: REALM.into(), urls: list, replayed: false },
    )
    .await;
    gate.open();
    let entry = bounded("B's load", load).await.expect("task").expect("load");
    let key = lookup_core::CodeRef::new(url.clone(), "Card").definition_key();
    assert_eq!(entry.definitions[&key]["version"], 2, "B re-ran instead of serving v1");
    assert_eq!(b.renderer.calls(&url), 2);
    // What is in the shared table is version 2, seen from A.
    let stored = a.lookup.get_cached_entry(&url, None).await.expect("read").expect("row");
    assert_eq!(stored.definitions[&key]["version"], 2, "the stale v1 render was never persisted");
    a.listener.shutdown().await;
    b.listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_accepts_but_never_answers_does_not_stall_the_listener() {
    // No database needed: a socket that accepts connections and says nothing.
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = mute.local_addr().expect("addr").port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = mute.accept().await {
            open.push(socket); // keep it open, never write
        }
    });
    let config = PgConfig::new(format!("postgres://u:secret@127.0.0.1:{port}/db"))
        .connect_timeout(Duration::from_millis(200));
    let options = fast_options().heartbeat(Duration::from_secs(30), Duration::from_millis(200));
    let started = Instant::now();
    let result = bounded(
        "start against a mute server",
        PgInvalidationListener::start_with(
            &config,
            None,
            Arc::new(RecordingSink::default()),
            options,
        ),
    )
    .await;
    let error = result.expect_err("a mute server is a failed start").to_string();
    assert!(error.contains("no answer"), "{error}");
    assert!(!error.contains("secret"), "password leaked: {error}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the timeouts: {:?}",
        started.elapsed()
    );
    held.abort();
}

// ---------------------------------------------------------------------------------------------
// Cross-process populate coalescing (BEHAVIOUR §9): every "process" is its own adapter (pool and
// origin), coordinator, signals, listener and renderer, on one shared schema and channels.
// ---------------------------------------------------------------------------------------------

use adapter_pg::{PgPopulateCoordinator, PopulateSettings, PopulateSignals};
use lookup_core::{
    CacheScope, EntryScope, LookupConfig, LookupError, NoRemoteRealms, PopulateCoordinator as _,
    PopulateKey, PopulateLease as _, Woken,
};

type Coordinated = CachingLookup<PgAdapter, FakeRenderer, NoRemoteRealms, PgPopulateCoordinator>;

struct Populator {
    lookup: Coordinated,
    renderer: FakeRenderer,
    coordinator: PgPopulateCoordinator,
    signals: Arc<PopulateSignals>,
    listener: PgInvalidationListener,
    events: broadcast::Receiver<ListenerEvent>,
}

/// The default settings without probes (every 600 s instead of 1 s): these tests check that
/// announcements alone wake waiters, and count lock attempts and waits exactly.
fn announced_only() -> PopulateSettings {
    PopulateSettings { probe_interval: Duration::from_secs(600), ..PopulateSettings::default() }
}

async fn populator(config: &PgConfig, settings: PopulateSettings) -> Populator {
    let db = bounded("connect", PgAdapter::connect(config.clone())).await.expect("adapter");
    let renderer = FakeRenderer::default();
    let signals = Arc::new(PopulateSignals::new());
    let coordinator =
        PgPopulateCoordinator::new(&db, Arc::clone(&signals), settings).expect("coordinator");
    let lookup = CachingLookup::with_coordinator(
        db.clone(),
        renderer.clone(),
        NoRemoteRealms,
        LookupConfig::default(),
        Some(coordinator.clone()),
    );
    lookup
        .register_realm(Realm { url: REALM.into(), owner: "@o:test".into(), public: true })
        .expect("realm");
    let listener = bounded(
        "listener",
        PgInvalidationListener::start_with(
            config,
            Some(db.origin().to_owned()),
            Arc::new(lookup.clone()),
            fast_options().populate(signals.clone()),
        ),
    )
    .await
    .expect("listener");
    let mut events = listener.subscribe();
    expect_event(&mut events, ListenerEvent::Connected).await;
    Populator { lookup, renderer, coordinator, signals, listener, events }
}

fn populate_config(db: &TestDb, test: &str) -> PgConfig {
    shared_config(db, test).populate_channel(unique_name(&format!("{test}_populated")))
}

/// The coalesce key of a public module of [`REALM`], as `coordinator` computes it.
fn key_of(coordinator: &PgPopulateCoordinator, url: &str) -> PopulateKey {
    let scope =
        EntryScope { realm_url: REALM.into(), scope: CacheScope::Public, user: String::new() };
    coordinator.key(&scope, url)
}

/// Polls `condition` (bounded). For states that have no event of their own, such as "the
/// other process has lost the lock and is parked".
async fn until(what: &str, condition: impl Fn() -> bool) {
    bounded(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

fn spawn_load(
    lookup: &Coordinated,
    url: &str,
) -> tokio::task::JoinHandle<Result<Arc<lookup_core::CacheEntry>, LookupError>> {
    let (lookup, url) = (lookup.clone(), url.to_owned());
    tokio::spawn(async move { lookup.get_module_entry(&url, None).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populate_an_uncontended_acquire_runs_and_wakes_a_peer() {
    let Some(db) = TestDb::from_env("populate_uncontended") else { return };
    let config = populate_config(&db, "populate_uncontended");
    let a = populator(&config, announced_only()).await;
    let mut b = populator(&config, announced_only()).await;
    let url = format!("{REALM}card.gts");
    a.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    let mut ticket = b.signals.register(&key_of(&a.coordinator, &url));

    bounded("A's load", a.lookup.get_module_entry(&url, None)).await.expect("A loads");
    assert_eq!(a.renderer.calls(&url), 1);
    let stats = a.coordinator.stats();
    assert_eq!((stats.attempts, stats.acquired, stats.contended, stats.released), (1, 1, 0, 1));
    expect_event(
        &mut b.events,
        ListenerEvent::Populated { key: key_of(&a.coordinator, &url).hash() },
    )
    .await;
    assert_eq!(
        bounded("B's wake-up", ticket.wait(Duration::from_secs(600))).await,
        Woken::Signalled
    );
    a.listener.shutdown().await;
    b.listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populate_two_instances_one_prerender_and_the_loser_never_renders() {
    let Some(db) = TestDb::from_env("populate_contended") else { return };
    let config = populate_config(&db, "populate_contended");
    let a = populator(&config, announced_only()).await;
    let b = populator(&config, announced_only()).await;
    let url = format!("{REALM}card.gts");
    a.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    b.renderer.set(&url, FakeModule::ready(&["Card"], &[]).version(2));
    let gate = a.renderer.gate(&url);
    let a_load = spawn_load(&a.lookup, &url);
    gate.entered().await; // A holds the key's lock and is rendering
    let b_load = spawn_load(&b.lookup, &url);
    until("B to lose the lock", || b.coordinator.stats().contended == 1).await;
    gate.open();

    let a_entry = bounded("A's load", a_load).await.expect("task").expect("A");
    let b_entry = bounded("B's load", b_load).await.expect("task").expect("B");
    assert_eq!(b.renderer.total_calls(), 0, "the loser never runs its render");
    assert_eq!(a.renderer.calls(&url), 1);
    assert_eq!(b_entry.definitions, a_entry.definitions, "B serves A's row (version 1)");
    assert_eq!(b.coordinator.stats().acquired, 0);
    let signals = b.signals.stats();
    assert_eq!((signals.waits_signalled, signals.waits_timed_out), (1, 0));
    assert_eq!(b.signals.waiting(), 0, "tickets are gone with their waits");
    a.listener.shutdown().await;
    b.listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populate_a_wait_resolves_on_its_keys_notify_not_another_keys_and_on_timeout() {
    let Some(db) = TestDb::from_env("populate_wait") else { return };
    let config = populate_config(&db, "populate_wait");
    let mut a = populator(&config, announced_only()).await;
    let (mine, theirs) = (
        key_of(&a.coordinator, &format!("{REALM}a.gts")),
        key_of(&a.coordinator, &format!("{REALM}b.gts")),
    );
    let mut waiting = a.signals.register(&mine);
    let mut other = a.signals.register(&theirs);
    // A raw pg_notify, as a reference peer would send it.
    let client = db.client().await;
    notify(&client, config.get_populate_channel(), &mine.hash().to_string()).await;
    expect_event(&mut a.events, ListenerEvent::Populated { key: mine.hash() }).await;
    assert_eq!(
        bounded("the notified wait", waiting.wait(Duration::from_secs(600))).await,
        Woken::Signalled
    );
    assert_eq!(other.wait(Duration::from_millis(50)).await, Woken::TimedOut);
    // A malformed announcement is counted and ignored.
    notify(&client, config.get_populate_channel(), "not-a-number").await;
    expect_event(&mut a.events, ListenerEvent::Malformed { payload: "not-a-number".into() }).await;
    a.listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populate_an_announcement_between_the_failed_try_and_the_wait_is_not_lost() {
    let Some(db) = TestDb::from_env("populate_lost_wakeup") else { return };
    let config = populate_config(&db, "populate_lost_wakeup");
    let a = populator(&config, announced_only()).await;
    let mut b = populator(&config, announced_only()).await;
    let key = key_of(&a.coordinator, &format!("{REALM}card.gts"));
    let lease = a.coordinator.try_acquire(&key).await.expect("try").expect("A wins");
    // B, as the lookup does it: register, then try.
    let mut ticket = b.signals.register(&key);
    assert!(b.coordinator.try_acquire(&key).await.expect("try").is_none(), "B loses");
    // The worst moment: A announces before B has started waiting.
    lease.release().await.expect("release");
    expect_event(&mut b.events, ListenerEvent::Populated { key: key.hash() }).await;
    let woke = bounded("B's wait", ticket.wait(Duration::from_secs(60))).await;
    assert_eq!(woke, Woken::Signalled, "the announcement was kept for the registered ticket");
    // Registering only after the announcement (the reference's order) would miss it.
    let mut late = b.signals.register(&key);
    assert_eq!(late.wait(Duration::from_millis(50)).await, Woken::TimedOut);
    // And the key is free again.
    let again = b.coordinator.try_acquire(&key).await.expect("try").expect("B wins now");
    again.release().await.expect("release");
    a.listener.shutdown().await;
    b.listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populate_shutdown_releases_parked_waiters() {
    let Some(db) = TestDb::from_env("populate_shutdown") else { return };
    let config = populate_config(&db, "populate_shutdown");
    let a = populator(&config, announced_only()).await;
    let b = populator(&config, announced_only()).await;
    let url = format!("{REALM}card.gts");
    a.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    let gate = a.renderer.gate(&url);
    let a_load = spawn_load(&a.lookup, &url);
    gate.entered().await;
    let b_load = spawn_load(&b.lookup, &url);
    until("B to park", || b.coordinator.stats().contended == 1 && b.signals.waiting() == 1).await;
    b.coordinator.shutdown();
    let error = bounded("B's release", b_load).await.expect("task").expect_err("B gives up");
    assert!(matches!(error, LookupError::PopulateFailed { .. }), "{error:?}");
    assert!(error.to_string().contains("shut down"), "{error}");
    assert!(error.to_string().contains(&url), "the error names the key: {error}");
    gate.open();
    bounded("A's load", a_load).await.expect("task").expect("A finishes normally");
    a.listener.shutdown().await;
    b.listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populate_a_cache_hit_never_touches_the_lock() {
    let Some(db) = TestDb::from_env("populate_hit") else { return };
    let config = populate_config(&db, "populate_hit");
    let a = populator(&config, announced_only()).await;
    let b = populator(&config, announced_only()).await;
    let url = format!("{REALM}card.gts");
    a.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    bounded("the seed", a.lookup.get_module_entry(&url, None)).await.expect("seed");
    // Someone holds the key's lock for good while B reads.
    let holder = db.client().await;
    holder.batch_execute("BEGIN").await.expect("begin");
    let locked: bool = holder
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&key_of(&a.coordinator, &url).hash()])
        .await
        .expect("lock")
        .get(0);
    assert!(locked);
    bounded("B's hit", b.lookup.get_module_entry(&url, None)).await.expect("hit");
    assert_eq!(b.coordinator.stats().attempts, 0, "a hit never tries the lock");
    assert_eq!(b.renderer.total_calls(), 0);
    holder.batch_execute("ROLLBACK").await.expect("rollback");
    a.listener.shutdown().await;
    b.listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populate_winners_leave_a_connection_for_an_invalidation() {
    let Some(db) = TestDb::from_env("populate_pool") else { return };
    let config = populate_config(&db, "populate_pool").pool_size(2);
    let a = populator(&config, announced_only()).await;
    let urls: Vec<String> = (0..5).map(|i| format!("{REALM}m{i}.gts")).collect();
    let gates: Vec<_> = urls
        .iter()
        .map(|url| {
            a.renderer.set(url, FakeModule::ready(&["M"], &[]));
            a.renderer.gate(url)
        })
        .collect();
    let other = format!("{REALM}other.gts");
    a.renderer.set(&other, FakeModule::ready(&["O"], &[]));
    bounded("other's load", a.lookup.get_module_entry(&other, None)).await.expect("other");
    let loads: Vec<_> = urls.iter().map(|url| spawn_load(&a.lookup, url)).collect();
    // Five cold keys, two pooled connections: as many winners as may hold leases render
    // (one), and every other load has started trying (queued for a lease, holding no
    // connection).
    until("the winners to hold every lease", || {
        let stats = a.coordinator.stats();
        let held = stats.acquired - stats.released - stats.rolled_back - stats.abandoned;
        // Six: other.gts's load, then the five.
        held as usize == stats.lease_limit && stats.attempts == 6
    })
    .await;
    assert_eq!(a.coordinator.stats().lease_limit, 1);
    // An invalidation holds the lookup's persist gate while it needs a connection: there
    // must be one left, or it waits for winners that wait for the gate.
    let list = bounded("the invalidation", a.lookup.invalidate(&other)).await.expect("invalidate");
    assert!(list.contains(&other));
    for gate in &gates {
        gate.open();
    }
    for load in loads {
        bounded("a winner's load", load).await.expect("task").expect("load");
    }
    for url in &urls {
        assert_eq!(a.renderer.calls(url), 1, "{url}");
    }
    let stats = a.coordinator.stats();
    // The five, and the first load of other.gts.
    assert_eq!((stats.acquired, stats.released, stats.contended), (6, 6, 0));
    a.listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populate_refuses_a_one_connection_pool_and_an_unguarded_adapter() {
    let Some(db) = TestDb::from_env("populate_refusals") else { return };
    let config = populate_config(&db, "populate_refusals");
    for (config, needle) in [
        (config.clone().pool_size(1), "at least 2 connections"),
        (config.clone().durable_guard(false), "durable guard"),
    ] {
        let adapter = PgAdapter::connect(config).await.expect("adapter");
        let signals = Arc::new(PopulateSignals::new());
        let refused = PgPopulateCoordinator::new(&adapter, signals, PopulateSettings::default());
        let error = refused.expect_err("refused").to_string();
        assert!(error.contains(needle), "{error}");
    }
}

#[test]
fn populate_a_lease_dropped_with_its_runtime_releases_the_lock() {
    let Some(db) = TestDb::from_env("populate_runtime_drop") else { return };
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let config = populate_config(&db, "populate_runtime_drop");
    let (a, key, observer) = main.block_on(async {
        let a = populator(&config, announced_only()).await;
        let key = key_of(&a.coordinator, &format!("{REALM}card.gts"));
        // Warm the pool on this runtime, so its connections are driven here.
        let (x, y) = tokio::join!(a.lookup.db().row_count(), a.lookup.db().row_count());
        x.expect("count");
        y.expect("count");
        (a, key, db.client().await)
    });
    // A second runtime holds a lease in a task, and is dropped with the task still running.
    let other = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let (coordinator, held_key) = (a.coordinator.clone(), key.clone());
    let (won_tx, won_rx) = tokio::sync::oneshot::channel();
    other.spawn(async move {
        let lease = coordinator.try_acquire(&held_key).await.expect("try").expect("won");
        won_tx.send(()).expect("send");
        std::future::pending::<()>().await;
        drop(lease);
    });
    // The other runtime runs its task until the lease is won (the pool's connections are
    // driven by the main runtime's threads meanwhile).
    other.block_on(async { bounded("the lease to be won", won_rx).await.expect("won") });
    drop(other);
    main.block_on(async {
        bounded("the key's lock to be released", async {
            loop {
                let free: bool = observer
                    .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&key.hash()])
                    .await
                    .expect("try")
                    .get(0);
                if free {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert_eq!(a.coordinator.stats().abandoned, 1);
        a.listener.shutdown().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populate_a_failing_winner_shares_its_failure_and_a_panicking_one_wakes_the_losers() {
    let Some(db) = TestDb::from_env("populate_failing") else { return };
    let config = populate_config(&db, "populate_failing");
    // Far beyond the test's bound: a loser that waited out its timeout would fail the test.
    let patient = PopulateSettings { wait_timeout: Duration::from_secs(600), ..announced_only() };
    let a = populator(&config, patient).await;
    let b = populator(&config, patient).await;
    for (round, module) in
        [FakeModule::RendererFails("renderer down".into()), FakeModule::RendererPanics]
            .into_iter()
            .enumerate()
    {
        let url = format!("{REALM}card{round}.gts");
        a.renderer.set(&url, module);
        b.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
        let gate = a.renderer.gate(&url);
        let a_load = spawn_load(&a.lookup, &url);
        gate.entered().await;
        let contended = b.coordinator.stats().contended;
        let b_load = spawn_load(&b.lookup, &url);
        until("B to lose the lock", || b.coordinator.stats().contended == contended + 1).await;
        gate.open();
        let a_result = bounded("A's load", a_load).await;
        assert!(!matches!(a_result, Ok(Ok(_))), "A's render failed: {a_result:?}");
        let b_result = bounded("B's load", b_load).await.expect("task");
        if round == 0 {
            // The renderer's failure is the answer for everyone: B does not render again.
            let error = b_result.expect_err("A's failure, told to B");
            assert!(error.to_string().contains("renderer down"), "{error}");
            assert_eq!(b.renderer.calls(&url), 0, "{url}");
        } else {
            // A panic is A's own trouble: B, woken at once, renders it itself.
            b_result.expect("B renders it itself");
            assert_eq!(b.renderer.calls(&url), 1, "{url}");
        }
    }
    assert_eq!(b.signals.stats().waits_timed_out, 0, "woken, not timed out");
    let a_stats = a.coordinator.stats();
    assert_eq!((a_stats.rolled_back + a_stats.released, a_stats.abandoned), (1, 1));
    a.listener.shutdown().await;
    b.listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populate_a_listener_reconnect_makes_every_waiter_probe_without_losing_its_round() {
    let Some(db) = TestDb::from_env("populate_resync") else { return };
    let config = populate_config(&db, "populate_resync");
    let mut a = populator(&config, announced_only()).await;
    let mut ticket = a.signals.register(&key_of(&a.coordinator, &format!("{REALM}card.gts")));
    let pid = a.listener.backend_pid().expect("pid");
    let client = db.client().await;
    client.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.expect("terminate");
    assert!(matches!(
        next_event(&mut a.events, "Disconnected").await,
        ListenerEvent::Disconnected { .. }
    ));
    expect_event(&mut a.events, ListenerEvent::Connected).await;
    expect_event(&mut a.events, ListenerEvent::CaughtUp { replayed: 0 }).await;
    // Announcements sent while away are in no log: the waiter is asked to probe now, which
    // is not the announcement its round waits for.
    assert_eq!(bounded("the recheck", ticket.wait(Duration::from_secs(600))).await, Woken::Recheck);
    let stats = a.signals.stats();
    assert_eq!((stats.wake_alls, stats.waits_signalled), (1, 0), "{stats:?}");
    a.listener.shutdown().await;
}

/// With a single round allowed, a waiter whose listener reconnects must not spend it: it
/// probes, keeps waiting, and finishes once the holder lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populate_a_waiter_keeps_its_round_across_a_listener_reconnect() {
    let Some(db) = TestDb::from_env("populate_keeps_round") else { return };
    let config = populate_config(&db, "populate_keeps_round");
    let a = populator(&config, announced_only()).await;
    let one_round = PopulateSettings { max_rounds: 1, ..announced_only() };
    let mut b = populator(&config, one_round).await;
    let url = format!("{REALM}card.gts");
    b.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    let key = key_of(&a.coordinator, &url);
    let lease = a.coordinator.try_acquire(&key).await.expect("try").expect("A wins");
    let waiting = spawn_load(&b.lookup, &url);
    until("B to park", || b.coordinator.stats().contended == 1 && b.signals.waiting() == 1).await;
    let pid = b.listener.backend_pid().expect("pid");
    db.client().await.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.expect("kill");
    assert!(matches!(
        next_event(&mut b.events, "Disconnected").await,
        ListenerEvent::Disconnected { .. }
    ));
    expect_event(&mut b.events, ListenerEvent::Connected).await;
    expect_event(&mut b.events, ListenerEvent::CaughtUp { replayed: 0 }).await;
    until("B's probe", || b.coordinator.stats().contended == 2).await;
    assert_eq!(b.signals.waiting(), 1, "still waiting in its round");
    lease.release().await.expect("A lets go without a row");
    bounded("B's load", waiting).await.unwrap().expect("B takes the key and loads");
    assert_eq!(b.renderer.calls(&url), 1);
    a.listener.shutdown().await;
    b.listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populate_gives_up_after_four_rounds_with_an_error_naming_the_key() {
    let Some(db) = TestDb::from_env("populate_rounds") else { return };
    let config = populate_config(&db, "populate_rounds");
    let a = populator(&config, announced_only()).await;
    let impatient =
        PopulateSettings { wait_timeout: Duration::from_millis(20), ..PopulateSettings::default() };
    let b = populator(&config, impatient).await;
    let url = format!("{REALM}card.gts");
    b.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    // A holds the key and never finishes while B tries.
    let lease = a.coordinator.try_acquire(&key_of(&a.coordinator, &url)).await.unwrap().unwrap();
    let error =
        bounded("B's rounds", b.lookup.get_module_entry(&url, None)).await.expect_err("B gives up");
    let text = error.to_string();
    assert!(matches!(error, LookupError::PopulateFailed { .. }), "{error:?}");
    assert!(
        text.contains(&url) && text.contains("4 rounds") && text.contains("timed out"),
        "{text}"
    );
    assert_eq!(b.coordinator.stats().contended, 5, "four waits, then one last try");
    assert_eq!(b.renderer.total_calls(), 0);
    lease.release().await.expect("release");
    // Once the key is free, B loads.
    bounded("B's load", b.lookup.get_module_entry(&url, None)).await.expect("B loads now");
    assert_eq!(b.renderer.calls(&url), 1);
    a.listener.shutdown().await;
    b.listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_follows_a_peers_invalidation_and_is_bypassed_while_disconnected_then_kept() {
    let Some(db) = TestDb::from_env("e2e_l1") else { return };
    let config = shared_config(&db, "e2e_l1");
    let a = peer(&config).await;
    let l1 = lookup_core::L1Config { capacity: 100, max_age: Duration::from_secs(600) };
    let with_l1 = lookup_core::LookupConfig { l1: Some(l1), ..Default::default() };
    let mut b = peer_with(&config, with_l1).await;
    let url = format!("{REALM}card.gts");
    let key = lookup_core::CodeRef::new(url.clone(), "Card").definition_key();
    b.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    b.lookup.get_module_entry(&url, None).await.expect("B loads");
    b.lookup.get_module_entry(&url, None).await.expect("B's tier serves");
    assert_eq!(b.lookup.l1_stats().expect("on").hits, 1);

    // A edits and invalidates; once B has heard it, B never serves v1 again.
    a.renderer.set(&url, FakeModule::ready(&["Card"], &[]).version(2));
    b.renderer.set(&url, FakeModule::ready(&["Card"], &[]).version(2));
    let list = a.lookup.invalidate(&url).await.expect("A invalidates");
    expect_event(
        &mut b.events,
        ListenerEvent::Module { realm_url: REALM.into(), urls: list, replayed: false },
    )
    .await;
    let entry = b.lookup.get_module_entry(&url, None).await.expect("B reloads");
    assert_eq!(entry.definitions[&key]["version"], 2);

    // A lost connection bypasses the tier until the listener is back; it caught up with
    // nothing missed, so the tier kept its entry.
    let pid = b.listener.backend_pid().expect("pid");
    db.client().await.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.expect("kill");
    assert!(matches!(
        next_event(&mut b.events, "Disconnected").await,
        ListenerEvent::Disconnected { .. }
    ));
    // The sink was told before the event was sent.
    assert!(b.lookup.l1_stats().expect("on").suspended);
    expect_event(&mut b.events, ListenerEvent::Connected).await;
    expect_event(&mut b.events, ListenerEvent::CaughtUp { replayed: 0 }).await;
    let stats = b.lookup.l1_stats().expect("on");
    assert!(!stats.suspended && stats.entries == 1, "{stats:?}");
    a.listener.shutdown().await;
    b.listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populate_a_winner_that_dies_without_announcing_is_taken_over_within_a_probe() {
    let Some(db) = TestDb::from_env("populate_dead_winner") else { return };
    let config = populate_config(&db, "populate_dead_winner");
    let a = populator(&config, announced_only()).await;
    let b = populator(&config, PopulateSettings::default()).await;
    let url = format!("{REALM}card.gts");
    b.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    let key = key_of(&a.coordinator, &url);
    let lease = a.coordinator.try_acquire(&key).await.expect("try").expect("A wins");
    let waiting = spawn_load(&b.lookup, &url);
    until("B to park", || b.coordinator.stats().contended == 1 && b.signals.waiting() == 1).await;
    // The session holding the key ends without a word, as under a SIGKILL: its lock goes
    // with it, and no announcement is sent.
    assert_eq!(terminate_lock_holder(&db, &key).await, 1, "A's lease held the key");
    let started = Instant::now();
    let entry = bounded("B takes over (without probes it would wait 180 s)", waiting)
        .await
        .expect("task")
        .expect("B's own render");
    let took = started.elapsed();
    assert_eq!(entry.url, url);
    assert_eq!(b.renderer.calls(&url), 1, "B rendered it itself");
    assert!(took < Duration::from_secs(5), "within a probe or so of the death: {took:?}");
    assert_eq!(b.signals.stats().waits_timed_out, 0, "probes are not timed-out waits");
    drop(lease);
    a.listener.shutdown().await;
    b.listener.shutdown().await;
}

/// Ends the session that holds `key`'s populate lock, as a failover or a terminated backend
/// would; returns how many sessions it ended.
async fn terminate_lock_holder(db: &TestDb, key: &PopulateKey) -> u64 {
    let client = db.client().await;
    // A one-key advisory lock is listed with the key's high and low 32 bits.
    let (high, low) = (key.hash() >> 32 & 0xffff_ffff, key.hash() & 0xffff_ffff);
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' \
             AND granted AND classid = $1::bigint::oid AND objid = $2::bigint::oid \
             AND objsubid = 1",
            &[&high, &low],
        )
        .await
        .expect("terminate the holder")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn populate_a_winner_whose_connection_ends_mid_render_still_stores_its_row() {
    let Some(db) = TestDb::from_env("populate_lost_lease") else { return };
    let config = populate_config(&db, "populate_lost_lease");
    let a = populator(&config, announced_only()).await;
    let url = format!("{REALM}card.gts");
    a.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    let gate = a.renderer.gate(&url);
    let a_load = spawn_load(&a.lookup, &url);
    gate.entered().await; // A holds the lock on its lease's connection and renders
    let key = key_of(&a.coordinator, &url);
    assert_eq!(terminate_lock_holder(&db, &key).await, 1, "the lease's session ends");
    gate.open();
    let entry = bounded("A's load", a_load).await.expect("task").expect("A's render is kept");
    assert_eq!(entry.url, url);
    // The row was written on a pooled connection instead, and is there for everyone.
    let stored = a.lookup.get_cached_entry(&url, None).await.expect("read");
    assert!(stored.is_some(), "the render was stored despite the lost lease");
    assert_eq!(a.renderer.calls(&url), 1, "rendered once");
    a.listener.shutdown().await;
}

/// What a reference server does to the shared table and channel, in plain SQL: its upsert,
/// its consumer query (one per visited module), and its DELETE followed by its payloads.
struct ReferencePeer {
    client: Client,
    channel: String,
}

impl ReferencePeer {
    async fn upsert(&self, url: &str, deps: &[String]) {
        let alias = lookup_core::urls::file_alias(url);
        self.client
            .execute(
                "INSERT INTO modules (url, cache_scope, auth_user_id, resolved_realm_url, \
                 definitions, deps, error_doc, created_at, file_alias) \
                 VALUES ($1, 'public', '', $2, '{}', $3, NULL, 1, $4) \
                 ON CONFLICT ON CONSTRAINT modules_pkey DO UPDATE SET deps = EXCLUDED.deps",
                &[&url, &REALM, &serde_json::json!(deps), &alias],
            )
            .await
            .expect("the reference's upsert");
    }

    /// The reference's invalidation of `url`: its variants, then consumers found module by
    /// module, then DELETE and one module payload (no `"o"`: the reference sends none).
    async fn invalidate(&self, url: &str) -> Vec<String> {
        let mut list = lookup_core::urls::variants(url);
        let mut next = 0;
        while next < list.len() {
            let name = list[next].clone();
            next += 1;
            let rows = self
                .client
                .query(
                    "SELECT url::text, file_alias FROM modules WHERE resolved_realm_url = $1 \
                     AND deps @> jsonb_build_array($2::text)",
                    &[&REALM, &name],
                )
                .await
                .expect("the reference's consumer query");
            for row in rows {
                for found in [row.get::<_, String>(0), row.get::<_, String>(1)] {
                    if !list.contains(&found) {
                        list.push(found);
                    }
                }
            }
        }
        self.client
            .execute(
                "DELETE FROM modules WHERE resolved_realm_url = $1 \
                 AND (url = ANY ($2) OR file_alias = ANY ($2))",
                &[&REALM, &list],
            )
            .await
            .expect("the reference's delete");
        let payload = serde_json::json!({"k": "module", "r": REALM, "m": list}).to_string();
        notify(&self.client, &self.channel, &payload).await;
        list
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_fleet_shares_rows_and_invalidations_with_the_reference_on_either_revision() {
    let Some(db) = TestDb::from_env("mixed fleet") else { return };
    for diagnostics in ["diagnostics", "timing_diagnostics"] {
        let config = shared_config(&db, "mixed_fleet");
        let schema = config.get_schema().expect("a schema").to_owned();
        // The reference set the database up first.
        let admin = db.client().await;
        admin
            .batch_execute(&format!(
                "CREATE SCHEMA {schema}; SET search_path = {schema}; {}",
                behaviour_suite::reference_table_ddl(diagnostics)
            ))
            .await
            .expect("the reference's table");
        let reference = ReferencePeer { client: admin, channel: config.get_channel().to_owned() };
        // The reference also listens, as its servers do, with a connection of its own.
        let (heard_client, mut heard_connection) =
            tokio_postgres::connect(&db.url, NoTls).await.expect("connect");
        let (heard_tx, mut heard) = tokio::sync::mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(Ok(message)) =
                std::future::poll_fn(|cx| heard_connection.poll_message(cx)).await
            {
                if let tokio_postgres::AsyncMessage::Notification(note) = message {
                    let _ = heard_tx.send(note.payload().to_owned());
                }
            }
        });
        heard_client
            .batch_execute(&format!("LISTEN \"{}\"", config.get_channel()))
            .await
            .expect("LISTEN");

        let mut ours = peer(&config).await;
        let leaf = format!("{REALM}leaf.gts");
        let card = format!("{REALM}card.gts");
        // deflookup serves the reference's row without rendering.
        reference.upsert(&leaf, &[]).await;
        ours.lookup.get_module_entry(&leaf, None).await.expect("the reference's row");
        assert_eq!(ours.renderer.total_calls(), 0, "{diagnostics}");
        // deflookup renders a consumer of it; the reference's invalidation of the leaf finds
        // deflookup's row, deletes it, and deflookup's listener hears the payload.
        ours.renderer.set(&card, FakeModule::ready(&["Card"], &[&format!("{REALM}leaf")]));
        ours.lookup.get_module_entry(&card, None).await.expect("deflookup's render");
        let list = reference.invalidate(&leaf).await;
        assert!(list.contains(&card), "{diagnostics}: the reference finds our consumer: {list:?}");
        let event = next_event(&mut ours.events, "the reference's payload").await;
        assert!(
            matches!(&event, ListenerEvent::Module { urls, .. } if urls.contains(&card)),
            "{event:?}"
        );
        assert!(ours.lookup.get_cached_entry(&card, None).await.expect("read").is_none());
        // The other way: the reference's row consumes deflookup's module; deflookup's
        // invalidation deletes it, and the reference hears a payload its parser reads.
        ours.renderer.set(&leaf, FakeModule::ready(&["Leaf"], &[]));
        ours.lookup.get_module_entry(&leaf, None).await.expect("render");
        let user = format!("{REALM}user.gts");
        reference.upsert(&user, &[format!("{REALM}leaf")]).await;
        let invalidated = ours.lookup.invalidate(&leaf).await.expect("invalidate");
        assert!(invalidated.contains(&user), "{diagnostics}: {invalidated:?}");
        // (It first hears its own payload from above.)
        let parsed = bounded("the reference hears deflookup", async {
            loop {
                let payload = heard.recv().await.expect("payload");
                let parsed: serde_json::Value = serde_json::from_str(&payload).expect("JSON");
                if parsed.get("o").is_some() {
                    return parsed;
                }
            }
        })
        .await;
        assert_eq!(parsed["k"], "module");
        assert!(parsed["m"].as_array().expect("m").contains(&serde_json::json!(user)));
        let left: i64 = reference
            .client
            .query_one("SELECT count(*) FROM modules WHERE url = $1", &[&user])
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "{diagnostics}: the reference's consumer row is gone");
        ours.listener.shutdown().await;
    }
}

#[path = "listener/catch_up.rs"]
mod catch_up;
