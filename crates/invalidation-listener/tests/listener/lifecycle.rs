//! Starting and stopping a listener: start failures, shutdown and drop.

use super::*;

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
