//! Dispatch: payloads sent on a real server, parsed and replayed into the sink.

use super::*;

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
