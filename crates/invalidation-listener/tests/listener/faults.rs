//! Connection faults: reconnect and resync, heartbeat, TLS, poolers, mute and restarted servers.

use super::*;

// ---------------------------------------------------------------------------------------------
// Faults: reconnect and resync.
// ---------------------------------------------------------------------------------------------

/// The pool and the listener verify the server (verify-full) and LISTEN over TLS.
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

/// After a lost connection of a listener without a position in the invalidation log (these
/// tests have no table): Disconnected, Connected, Resync in that order, with exactly one extra
/// `bump_global` (the resync) and a new backend.
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
