//! Catch-up after a lost connection, its fallbacks, and the polling transport.
//!
//! The gate that makes "an invalidation committed while the listener is away" deterministic:
//! the listener logs in as a role of its own; the test refuses that role's logins
//! (`NOLOGIN`), terminates the listener's backend, invalidates while every reconnect attempt
//! is refused, and only then lets it log in again.

use super::*;
use invalidation_listener::Invalidation;
use lookup_core::DbAdapter as _;

/// A login role for one listener, allowed to read one schema.
struct ListenerRole {
    name: String,
    admin: Client,
}

impl ListenerRole {
    async fn create(db: &TestDb, schema: &str) -> ListenerRole {
        let name = unique_name("listener_role");
        let admin = db.client().await;
        admin
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN; GRANT USAGE ON SCHEMA {schema} TO {name}; \
                 GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {name}"
            ))
            .await
            .expect("create the listener's role");
        ListenerRole { name, admin }
    }

    /// The settings of a listener (or poller) of `config`'s schema and channel that logs in
    /// as this role.
    fn config(&self, db: &TestDb, config: &PgConfig) -> PgConfig {
        on_url(&with_setting(&db.url, "user", &self.name), config)
    }

    /// Refuses the role's logins and ends the listener's session: the listener is away, and
    /// stays away until [`restore`](Self::restore).
    async fn cut(&self, listener: &PgInvalidationListener, events: &mut Events) {
        let pid = listener.backend_pid().expect("connected");
        self.admin.batch_execute(&format!("ALTER ROLE {} NOLOGIN", self.name)).await.unwrap();
        self.admin.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap();
        match next_event(events, "Disconnected").await {
            ListenerEvent::Disconnected { .. } => {}
            other => panic!("expected Disconnected, got {other:?}"),
        }
    }

    /// Lets the listener log in again; returns the events up to and including its
    /// `CaughtUp` or `Resync`.
    async fn restore(&self, events: &mut Events) -> Vec<ListenerEvent> {
        self.admin.batch_execute(&format!("ALTER ROLE {} LOGIN", self.name)).await.unwrap();
        expect_event(events, ListenerEvent::Connected).await;
        let mut seen = Vec::new();
        loop {
            let event = next_event(events, "CaughtUp or Resync").await;
            let done =
                matches!(event, ListenerEvent::CaughtUp { .. } | ListenerEvent::Resync { .. });
            seen.push(event);
            if done {
                return seen;
            }
        }
    }
}

type Events = broadcast::Receiver<ListenerEvent>;

/// The URLs of a fan-out in the order the log gives them.
fn sorted(mut urls: Vec<String>) -> Vec<String> {
    urls.sort_unstable();
    urls
}

/// Settings on `url` for `config`'s schema and channel.
fn on_url(url: &str, config: &PgConfig) -> PgConfig {
    PgConfig::new(url).schema(config.get_schema().expect("a schema")).channel(config.get_channel())
}

/// The URLs of the module events among `events`, and whether each was replayed.
fn module_urls(events: &[ListenerEvent]) -> Vec<(String, bool)> {
    events
        .iter()
        .flat_map(|event| match event {
            ListenerEvent::Module { urls, replayed, .. } => {
                urls.iter().map(|url| (url.clone(), *replayed)).collect()
            }
            _ => Vec::new(),
        })
        .collect()
}

/// The core promise: terminated again and again while another process invalidates, the
/// listener sees every invalidation (live, or replayed from the log after reconnecting), and
/// never needs to resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_cut_off_again_and_again_misses_no_invalidation_and_never_resyncs() {
    let Some(db) = TestDb::from_env("catch_up_repeated") else { return };
    let totals = behaviour_suite::metrics::Totals::install();
    let config = shared_config(&db, "catch_up_repeated");
    let a = peer(&config).await;
    let role = ListenerRole::create(&db, config.get_schema().unwrap()).await;
    let (listener, sink, mut events) =
        start(&role.config(&db, &config), None, fast_options()).await;
    let mut expected = Vec::new();
    for round in 0..5 {
        // Heard live.
        let live = a.lookup.invalidate(&format!("{REALM}live{round}.gts")).await.unwrap();
        match next_event(&mut events, "a live invalidation").await {
            ListenerEvent::Module { urls, replayed: false, .. } => assert_eq!(urls, live),
            other => panic!("expected the live invalidation, got {other:?}"),
        }
        expected.extend(live);
        // Committed while the listener is away: between the lost connection and the new
        // LISTEN, two of them in the same realm and one realm clear in another.
        role.cut(&listener, &mut events).await;
        for name in ["a", "b"] {
            expected
                .extend(a.lookup.invalidate(&format!("{REALM}{name}{round}.gts")).await.unwrap());
        }
        let other_realm = format!("https://other{round}.test/");
        a.lookup
            .db()
            .apply_invalidation(&Invalidation::Realm { realm_url: other_realm.clone() })
            .await
            .unwrap();
        let caught = role.restore(&mut events).await;
        assert_eq!(caught.last(), Some(&ListenerEvent::CaughtUp { replayed: 2 }), "{caught:?}");
        assert!(
            caught.contains(&ListenerEvent::Realm { realm_url: other_realm, replayed: true }),
            "{caught:?}"
        );
        assert!(module_urls(&caught).iter().all(|(_, replayed)| *replayed), "{caught:?}");
    }
    let live: Vec<String> = sink
        .calls()
        .iter()
        .flat_map(|call| match call {
            Call::Modules(_, urls) => urls.clone(),
            _ => Vec::new(),
        })
        .collect();
    for url in &expected {
        assert!(live.contains(url), "{url} was never replayed into the sink");
    }
    assert!(!sink.calls().contains(&Call::Global), "no resync bump: {:?}", sink.calls());
    let stats = listener.stats();
    assert_eq!((stats.reconnects, stats.catch_ups, stats.resyncs), (5, 5, 0), "{stats:?}");
    assert_eq!(stats.replayed_invalidations, 10);
    // The same, as metrics (A's listener shares the channel label but never reconnected).
    let channel = [("channel", config.get_channel())];
    assert_eq!(totals.counter("deflookup_listener_reconnects_total", &channel), 5);
    assert_eq!(totals.counter("deflookup_listener_catch_ups_total", &channel), 5);
    assert_eq!(totals.counter("deflookup_listener_resyncs_total", &channel), 0);
    for kind in ["module", "realm"] {
        let labels = [("channel", config.get_channel()), ("kind", kind), ("replayed", "true")];
        assert_eq!(totals.counter("deflookup_listener_invalidations_total", &labels), 5, "{kind}");
    }
    assert_eq!(stats.untracked_payloads, 0, "every payload of A's is in the log");
    // A writer outside the log (a bare NOTIFY, as a reference server sends) is noticed.
    let raw = r#"{"k":"realm","r":"https://raw.test/"}"#;
    notify(&role.admin, config.get_channel(), raw).await;
    let heard = ListenerEvent::Realm { realm_url: "https://raw.test/".into(), replayed: false };
    expect_event(&mut events, heard).await;
    assert_eq!(listener.stats().untracked_payloads, 1);
    listener.shutdown().await;
    a.listener.shutdown().await;
}

/// What the catch-up does not cover is kept: a load in flight of another module persists its
/// result instead of being discarded and rendered again, and the in-process tier keeps its
/// entries (before catch-up, the resync's global bump threw both away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_discards_only_what_it_replays() {
    let Some(db) = TestDb::from_env("catch_up_keeps") else { return };
    let config = shared_config(&db, "catch_up_keeps");
    let a = peer(&config).await;
    let role = ListenerRole::create(&db, config.get_schema().unwrap()).await;
    let l1 = lookup_core::L1Config { capacity: 100, max_age: Duration::from_secs(600) };
    let with_l1 = lookup_core::LookupConfig { l1: Some(l1), ..Default::default() };
    let b_config = config.clone().listen_url(with_setting(&db.url, "user", &role.name));
    let mut b = peer_with(&b_config, with_l1).await;
    let (kept, slow, other) =
        (format!("{REALM}kept.gts"), format!("{REALM}slow.gts"), format!("{REALM}other.gts"));
    for url in [&kept, &slow, &other] {
        b.renderer.set(url, FakeModule::ready(&["M"], &[]));
    }
    b.lookup.get_module_entry(&kept, None).await.expect("B loads kept");
    b.lookup.get_module_entry(&other, None).await.expect("B loads other");
    assert_eq!(b.lookup.l1_stats().unwrap().entries, 2);
    // A render of `slow` is in flight across the outage.
    let gate = b.renderer.gate(&slow);
    let in_flight = {
        let (lookup, slow) = (b.lookup.clone(), slow.clone());
        tokio::spawn(async move { lookup.get_module_entry(&slow, None).await })
    };
    gate.entered().await;
    role.cut(&b.listener, &mut b.events).await;
    assert!(b.lookup.l1_stats().unwrap().suspended, "bypassed while away");
    let list = sorted(a.lookup.invalidate(&other).await.expect("A invalidates other"));
    let caught = role.restore(&mut b.events).await;
    assert_eq!(
        caught,
        [
            ListenerEvent::Module { realm_url: REALM.into(), urls: list, replayed: true },
            ListenerEvent::CaughtUp { replayed: 1 }
        ]
    );
    let stats = b.lookup.l1_stats().unwrap();
    assert!(!stats.suspended && stats.entries == 1, "only `other` went: {stats:?}");
    gate.release_one();
    let entry = bounded("the load in flight", in_flight).await.unwrap().expect("slow loads");
    assert_eq!(entry.url, slow);
    assert_eq!(b.renderer.calls(&slow), 1, "not discarded, not rendered again");
    b.lookup.get_module_entry(&kept, None).await.unwrap();
    assert_eq!(b.renderer.calls(&kept), 1, "kept was served from the tier or the table");
    assert_eq!(b.listener.stats().resyncs, 0);
    a.listener.shutdown().await;
    b.listener.shutdown().await;
}

/// The fallbacks: a log pruned past the listener's position, a log it may not read, and
/// catch-up switched off for mixed fleets all resync, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_cannot_prove_it_saw_everything_resyncs() {
    let Some(db) = TestDb::from_env("catch_up_fallbacks") else { return };
    let config = shared_config(&db, "catch_up_fallbacks");
    // A forgets every record at its next invalidation of the realm.
    let a = peer(&config.clone().guard_horizon(Duration::ZERO)).await;
    let role = ListenerRole::create(&db, config.get_schema().unwrap()).await;
    let listen = role.config(&db, &config);
    let (listener, sink, mut events) = start(&listen, None, fast_options()).await;

    role.cut(&listener, &mut events).await;
    for name in ["x", "y", "z"] {
        a.lookup.invalidate(&format!("{REALM}{name}.gts")).await.unwrap();
    }
    let seen = role.restore(&mut events).await;
    match seen.as_slice() {
        [ListenerEvent::Resync { reason }] => assert!(reason.contains("pruned"), "{reason}"),
        other => panic!("expected a resync for the pruned log, got {other:?}"),
    }
    assert_eq!(sink.calls().last(), Some(&Call::Global));

    // Past the resync, the listener has a position again: the next outage catches up.
    role.cut(&listener, &mut events).await;
    let a_clear = a.lookup.clear_realm(REALM).await;
    a_clear.expect("A clears the realm");
    let seen = role.restore(&mut events).await;
    assert_eq!(
        seen,
        [
            ListenerEvent::Realm { realm_url: REALM.into(), replayed: true },
            ListenerEvent::CaughtUp { replayed: 1 }
        ]
    );

    // A log that went back below what the listener heard (a failover to a replica that had
    // not seen the newest invalidations, a restore): numbers it already holds come again.
    let schema = config.get_schema().unwrap();
    role.cut(&listener, &mut events).await;
    role.admin
        .batch_execute(&format!(
            "ALTER SEQUENCE {schema}.modules_guard_seq RESTART WITH 1; \
             DELETE FROM {schema}.modules_guard_log; DELETE FROM {schema}.modules_guard_realm"
        ))
        .await
        .unwrap();
    a.lookup.invalidate(&format!("{REALM}after_failover.gts")).await.unwrap();
    let seen = role.restore(&mut events).await;
    match seen.as_slice() {
        [ListenerEvent::Resync { reason }] => assert!(reason.contains("went back"), "{reason}"),
        other => panic!("expected a resync for the log gone back, got {other:?}"),
    }

    // A log the listener may not read.
    role.admin
        .batch_execute(&format!("REVOKE SELECT ON {schema}.modules_guard_realm FROM {}", role.name))
        .await
        .unwrap();
    role.cut(&listener, &mut events).await;
    let seen = role.restore(&mut events).await;
    match seen.as_slice() {
        [ListenerEvent::Resync { reason }] => {
            assert!(reason.contains("cannot be read"), "{reason}")
        }
        other => panic!("expected a resync for the unreadable log, got {other:?}"),
    }
    assert_eq!(listener.stats().resyncs, 3);
    listener.shutdown().await;

    // Mixed fleets: catch-up off.
    let (listener, _, mut events) =
        start(&listen, None, fast_options().untracked_writers(true)).await;
    role.cut(&listener, &mut events).await;
    let seen = role.restore(&mut events).await;
    match seen.as_slice() {
        [ListenerEvent::Resync { reason }] => {
            assert!(reason.contains("catch-up is off"), "{reason}")
        }
        other => panic!("expected a resync with catch-up off, got {other:?}"),
    }
    listener.shutdown().await;
    a.listener.shutdown().await;
}

/// A poller hears what the listener hears, from the log; cut off, it catches up the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poller_follows_the_log_and_catches_up_after_a_lost_connection() {
    let Some(db) = TestDb::from_env("poll") else { return };
    let config = shared_config(&db, "poll");
    let a = peer(&config).await;
    let role = ListenerRole::create(&db, config.get_schema().unwrap()).await;
    let options = fast_options().poll(Duration::from_millis(20));
    let (poller, sink, mut events) = start(&role.config(&db, &config), None, options).await;
    let list = sorted(a.lookup.invalidate(&format!("{REALM}card.gts")).await.unwrap());
    expect_event(
        &mut events,
        ListenerEvent::Module { realm_url: REALM.into(), urls: list.clone(), replayed: false },
    )
    .await;
    role.cut(&poller, &mut events).await;
    let cleared = "https://elsewhere.test/".to_owned();
    a.lookup
        .db()
        .apply_invalidation(&Invalidation::Realm { realm_url: cleared.clone() })
        .await
        .unwrap();
    let seen = role.restore(&mut events).await;
    assert_eq!(
        seen,
        [
            ListenerEvent::Realm { realm_url: cleared.clone(), replayed: true },
            ListenerEvent::CaughtUp { replayed: 1 }
        ]
    );
    assert_eq!(
        sink.calls(),
        [Call::Modules(REALM.into(), list), Call::Realm(cleared)],
        "each invalidation once, no resync"
    );
    assert!(poller.stats().polls >= 1);
    poller.shutdown().await;

    // Untracked writers never reach the log: polling is refused with them.
    let refused = PgInvalidationListener::start_with(
        &config,
        None,
        Arc::new(RecordingSink::default()),
        fast_options().poll(Duration::from_millis(20)).untracked_writers(true),
    )
    .await
    .expect_err("polling with untracked writers");
    assert!(refused.to_string().contains("untracked writers"), "{refused}");
    a.listener.shutdown().await;
}

/// Through PgBouncer in transaction mode, where LISTEN cannot go, a poller hears a peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poller_works_through_a_transaction_pooler() {
    let Some(db) = TestDb::from_env("poll through pgbouncer") else { return };
    let Some(bouncer) =
        behaviour_suite::xtask_setting("poll through pgbouncer", "DEFLOOKUP_PGBOUNCER_URL")
    else {
        return;
    };
    let config = shared_config(&db, "poll_bouncer");
    let a = peer(&config).await;
    let pooled = on_url(&bouncer, &config);
    let options = fast_options().poll(Duration::from_millis(20));
    let (poller, _, mut events) = start(&pooled, None, options).await;
    for round in 0..3 {
        let list = sorted(a.lookup.invalidate(&format!("{REALM}card{round}.gts")).await.unwrap());
        expect_event(
            &mut events,
            ListenerEvent::Module { realm_url: REALM.into(), urls: list, replayed: false },
        )
        .await;
    }
    assert_eq!(poller.stats().resyncs, 0);
    poller.shutdown().await;
    a.listener.shutdown().await;
}
