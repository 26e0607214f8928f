//! Cross-process populate coalescing (BEHAVIOUR §9): every "process" is its own adapter (pool and
//! origin), coordinator, signals, listener and renderer, on one shared schema and channels.

use super::*;

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
    terminate_listener(&db, &a.listener, &mut a.events).await;
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
    terminate_listener(&db, &b.listener, &mut b.events).await;
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
