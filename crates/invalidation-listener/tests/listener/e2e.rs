//! End to end: two "processes" (two lookups, two adapters, two origins) on one database.

use super::*;

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
    terminate_listener(&db, &b.listener, &mut b.events).await;
    // The sink was told before the event was sent.
    assert!(b.lookup.l1_stats().expect("on").suspended);
    expect_event(&mut b.events, ListenerEvent::Connected).await;
    expect_event(&mut b.events, ListenerEvent::CaughtUp { replayed: 0 }).await;
    let stats = b.lookup.l1_stats().expect("on");
    assert!(!stats.suspended && stats.entries == 1, "{stats:?}");
    a.listener.shutdown().await;
    b.listener.shutdown().await;
}
