//! The cases themselves. Each takes a fresh adapter and panics on failure.

use std::sync::Arc;

use std::time::Duration;

use lookup_core::{
    CacheEntry, CacheScope, CachingLookup, CodeRef, DbAdapter, EntryScope, Invalidation,
    InvalidationSink, L1Config, LoadStamp, LookupConfig, LookupError, Realm,
};
use serde_json::Map;
use tokio::task::JoinHandle;

use crate::{FakeModule, FakeProbe, FakeRenderer, bounded, fake_definition};

/// The public local realm every case registers.
pub const REALM: &str = "https://realm.test/app/";
/// Owner of [`REALM`].
pub const OWNER: &str = "@alice:realm.test";

type Lookup<D> = CachingLookup<D, FakeRenderer, FakeProbe>;

/// A lookup over `db` with the public realm [`REALM`] registered.
#[derive(Debug)]
pub struct Harness<D> {
    /// The lookup under test.
    pub lookup: Lookup<D>,
    /// Its renderer.
    pub renderer: FakeRenderer,
    /// Its remote realm probe.
    pub probe: FakeProbe,
}

impl<D: DbAdapter> Harness<D> {
    /// A harness with the default configuration.
    pub fn new(db: D) -> Self {
        Self::with_config(db, LookupConfig::default())
    }

    /// A harness with a chosen configuration.
    pub fn with_config(db: D, config: LookupConfig) -> Self {
        let renderer = FakeRenderer::default();
        let probe = FakeProbe::default();
        let lookup = CachingLookup::with_probe(db, renderer.clone(), probe.clone(), config);
        lookup
            .register_realm(Realm { url: REALM.to_owned(), owner: OWNER.to_owned(), public: true })
            .expect("realm registers");
        Harness { lookup, renderer, probe }
    }

    /// Spawns a read-through load of `url` (as a task, so the test can act while it runs).
    pub fn spawn_load(&self, url: &str) -> JoinHandle<Result<Arc<CacheEntry>, LookupError>> {
        let lookup = self.lookup.clone();
        let url = url.to_owned();
        tokio::spawn(async move { lookup.get_module_entry(&url, None).await })
    }

    /// The cached row for `url` in the public scope of [`REALM`], read straight from the db.
    pub async fn row(&self, url: &str) -> Option<CacheEntry> {
        let scope = public_scope(REALM);
        let alias = lookup_core::urls::file_alias(url);
        let rows = self.lookup.db().read_rows(&scope, url, &alias).await.expect("db read");
        rows.into_iter().find(|r| r.url == url)
    }

    /// Starts `n` loads of `url` at once, holds its render until all `n` callers wait on the
    /// one load in flight, then lets it finish.
    pub async fn coalesced_loads(
        &self,
        url: &str,
        n: usize,
    ) -> Vec<JoinHandle<Result<Arc<CacheEntry>, LookupError>>> {
        let gate = self.renderer.gate(url);
        let loads = (0..n).map(|_| self.spawn_load(url)).collect();
        gate.entered().await;
        self.waiters(n).await;
        assert_eq!(self.lookup.in_flight_count(), 1, "one load in flight for all {n} callers");
        gate.open();
        loads
    }

    /// Waits (bounded) until `n` callers wait on in-flight loads.
    pub async fn waiters(&self, n: usize) {
        bounded("callers to join the in-flight load", async {
            while self.lookup.in_flight_waiters() < n {
                tokio::task::yield_now().await;
            }
        })
        .await;
    }
}

fn u(path: &str) -> String {
    format!("{REALM}{path}")
}

fn public_scope(realm: &str) -> EntryScope {
    EntryScope { realm_url: realm.to_owned(), scope: CacheScope::Public, user: String::new() }
}

fn version_of(entry: &CacheEntry, name: &str) -> u64 {
    let key = CodeRef::new(entry.url.clone(), name).definition_key();
    entry.definitions[&key]["version"].as_u64().expect("fake definitions carry a version")
}

async fn joined<T>(handle: JoinHandle<T>) -> T {
    bounded("a spawned lookup", handle).await.expect("lookup task panicked")
}

/// Cold lookup prerenders once, then every form of the URL hits.
pub async fn cold_lookup_prerenders_once_then_hits<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    h.renderer.set(&u("person.gts"), FakeModule::ready(&["Person"], &[]));
    let person = CodeRef::new(u("person.gts"), "Person");
    let first = h.lookup.lookup_definition(&person, None).await.expect("cold lookup");
    assert_eq!(first, fake_definition(&u("person.gts"), "Person", 1));
    assert_eq!(h.renderer.calls(&u("person.gts")), 1);

    let again = h.lookup.lookup_definition(&person, None).await.expect("hit");
    assert_eq!(again, first);
    let extensionless = CodeRef::new(u("person?query=1#x"), "Person");
    assert_eq!(h.lookup.lookup_definition(&extensionless, None).await.expect("alias hit"), first);
    assert_eq!(h.renderer.total_calls(), 1, "hits must not prerender");
    let row = h.row(&u("person.gts")).await.expect("row stored");
    assert_eq!(row.file_alias, u("person"));
    assert!(row.created_at.is_some());
}

/// Invalidating a URL no local realm owns touches nothing.
pub async fn invalidate_of_unregistered_realm_does_nothing<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let foreign = "https://elsewhere.test/realm/";
    let mut entry = sample_entry(foreign, &format!("{foreign}x.gts"));
    entry.definitions = Map::new();
    h.lookup.db().upsert(&entry, LoadStamp::UNGUARDED).await.expect("seed row");

    let list = h.lookup.invalidate(&format!("{foreign}x.gts")).await.expect("invalidate");
    assert!(list.is_empty());
    let scope = public_scope(foreign);
    let rows = h.lookup.db().read_rows(&scope, &entry.url, &entry.file_alias).await.expect("read");
    assert_eq!(rows.len(), 1, "the foreign row must survive");
}

/// A stored-looking public row of `url` in `realm`: no definitions, no deps, written at 1.
pub fn sample_entry(realm: &str, url: &str) -> CacheEntry {
    CacheEntry {
        url: url.to_owned(),
        file_alias: lookup_core::urls::file_alias(url),
        cache_scope: CacheScope::Public,
        auth_user_id: String::new(),
        resolved_realm_url: realm.to_owned(),
        definitions: Map::new(),
        deps: Vec::new(),
        error: None,
        created_at: Some(1),
        diagnostics: None,
    }
}

/// `invalidate(x)` clears the row stored for `x.gts`.
pub async fn extensionless_invalidate_clears_the_extension_row<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    h.renderer.set(&u("person.gts"), FakeModule::ready(&["Person"], &[]));
    h.lookup.get_module_entry(&u("person"), None).await.expect("lookup by alias");
    assert!(h.row(&u("person.gts")).await.is_some(), "the .gts candidate was stored");

    let list = h.lookup.invalidate(&u("person")).await.expect("invalidate");
    assert!(list.contains(&u("person.gts")));
    assert!(h.row(&u("person.gts")).await.is_none());
}

/// A module without exports is cached as an empty marker and not rendered again.
pub async fn empty_definitions_are_cached_as_a_marker<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    h.renderer.set(&u("empty.gts"), FakeModule::ready(&[], &[]));
    let entry = h.lookup.get_module_entry(&u("empty.gts"), None).await.expect("lookup");
    assert!(entry.definitions.is_empty());
    h.lookup.get_module_entry(&u("empty.gts"), None).await.expect("hit");
    assert_eq!(h.renderer.calls(&u("empty.gts")), 1);
    let missing = h.lookup.lookup_definition(&CodeRef::new(u("empty.gts"), "X"), None).await;
    assert!(matches!(missing, Err(LookupError::DefinitionNotFound { .. })), "{missing:?}");
    assert_eq!(h.renderer.calls(&u("empty.gts")), 1);
}

/// An edit is invisible until invalidated, then served.
pub async fn update_then_invalidate_serves_v2<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let url = u("person.gts");
    h.renderer.set(&url, FakeModule::ready(&["Person"], &[]));
    let v1 = h.lookup.get_module_entry(&url, None).await.expect("v1");
    assert_eq!(version_of(&v1, "Person"), 1);
    h.renderer.set(&url, FakeModule::ready(&["Person"], &[]).version(2));
    let cached = h.lookup.get_module_entry(&url, None).await.expect("still cached");
    assert_eq!(version_of(&cached, "Person"), 1);
    h.lookup.invalidate(&url).await.expect("invalidate");
    let v2 = h.lookup.get_module_entry(&url, None).await.expect("v2");
    assert_eq!(version_of(&v2, "Person"), 2);
    assert_eq!(version_of(&h.row(&url).await.expect("row"), "Person"), 2);
}

/// A deleted module, once invalidated, is not found.
pub async fn deletion_then_invalidate_rejects<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let url = u("gone.gts");
    h.renderer.set(&url, FakeModule::ready(&["Gone"], &[]));
    h.lookup.get_module_entry(&url, None).await.expect("exists");
    h.renderer.remove(&url);
    h.lookup.invalidate(&url).await.expect("invalidate");
    let err = h.lookup.get_module_entry(&url, None).await.expect_err("deleted");
    assert!(matches!(err, LookupError::ModuleNotFound { .. }), "{err:?}");
    assert!(err.is_not_found());
    let by_alias = h.lookup.get_module_entry(&u("gone"), None).await.expect_err("deleted");
    assert!(by_alias.is_not_found(), "{by_alias:?}");
    assert!(h.row(&url).await.is_none(), "a missing module stores nothing");
}

async fn seed_chain<D: DbAdapter>(h: &Harness<D>) {
    h.renderer.set(&u("deep-card.gts"), FakeModule::ready(&["DeepCard"], &["./middle-field"]));
    h.renderer.set(&u("middle-field.gts"), FakeModule::ready(&["Middle"], &["./leaf-field.gts"]));
    h.renderer.set(&u("leaf-field.gts"), FakeModule::ready(&["Leaf"], &[]));
    h.renderer.set(&u("other.gts"), FakeModule::ready(&["Other"], &["https://cdn.test/lib.js"]));
    for m in ["deep-card.gts", "middle-field.gts", "leaf-field.gts", "other.gts"] {
        h.lookup.get_module_entry(&u(m), None).await.expect("seed lookup");
    }
}

/// BEHAVIOUR §4.1's worked example, exactly.
pub async fn dependency_chain_invalidation_removes_exactly_the_consumers<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    seed_chain(&h).await;
    assert_eq!(h.row(&u("middle-field.gts")).await.expect("row").deps, [u("leaf-field")]);

    let list = h.lookup.invalidate(&u("leaf-field.gts")).await.expect("invalidate");
    let expected: Vec<String> = [
        "leaf-field.gts",
        "leaf-field",
        "leaf-field.js",
        "leaf-field.gjs",
        "leaf-field.ts",
        "middle-field.gts",
        "middle-field",
        "deep-card.gts",
        "deep-card",
    ]
    .iter()
    .map(|p| u(p))
    .collect();
    assert_eq!(list, expected);
    for gone in ["deep-card.gts", "middle-field.gts", "leaf-field.gts"] {
        assert!(h.row(&u(gone)).await.is_none(), "{gone} should be deleted");
    }
    assert!(h.row(&u("other.gts")).await.is_some(), "unrelated row survives");
}

/// A graph with branches: only the transitive consumers go.
pub async fn branching_graph_invalidation_removes_exactly_the_consumers<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let graph: [(&str, &[&str]); 6] = [
        ("leaf.gts", &[]),
        ("a.gts", &["./leaf"]),
        ("b.gts", &["./leaf", "./d"]),
        ("c.gts", &["./b.gts"]),
        ("d.gts", &[]),
        ("e.gts", &["./d"]),
    ];
    for (m, deps) in graph {
        h.renderer.set(&u(m), FakeModule::ready(&["X"], deps));
        h.lookup.get_module_entry(&u(m), None).await.expect("seed");
    }
    let list = h.lookup.invalidate(&u("leaf.gts")).await.expect("invalidate");
    for consumer in ["a.gts", "a", "b.gts", "b", "c.gts", "c"] {
        assert!(list.contains(&u(consumer)), "{consumer} missing from {list:?}");
    }
    for kept in ["d.gts", "d", "e.gts", "e"] {
        assert!(!list.contains(&u(kept)), "{kept} wrongly invalidated");
    }
    for (m, _) in graph {
        let expect_gone = ["leaf.gts", "a.gts", "b.gts", "c.gts"].contains(&m);
        assert_eq!(h.row(&u(m)).await.is_none(), expect_gone, "row {m}");
    }
}

/// A broken dependency's error reaches its dependents, and fixing it recovers them.
pub async fn module_errors_propagate_to_dependents_and_recover<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let leaf = u("leaf-field.gts");
    let card = u("card.gts");
    h.renderer.set(
        &leaf,
        FakeModule::Broken { message: "syntax error".into(), status: 500, deps: vec![] },
    );
    h.renderer.set(
        &card,
        FakeModule::Broken {
            message: "cannot render card".into(),
            status: 500,
            deps: vec!["./leaf-field".into()],
        },
    );
    let leaf_err = h.lookup.get_module_entry(&leaf, None).await.expect_err("leaf broken");
    assert_eq!(leaf_err.module_error().expect("module error").message, "syntax error");

    let card_err = h.lookup.get_module_entry(&card, None).await.expect_err("card broken");
    let detail = card_err.module_error().expect("module error");
    assert_eq!(detail.message, "cannot render card");
    assert_eq!(detail.deps, [u("leaf-field")]);
    let additional: Vec<&str> =
        detail.additional_errors.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(additional, ["syntax error"], "the dependency's error is appended once");
    let def = h.lookup.lookup_definition(&CodeRef::new(card.clone(), "Card"), None).await;
    assert!(matches!(def, Err(LookupError::ModuleError { .. })), "{def:?}");

    // Served from cache while fresh.
    h.lookup.get_module_entry(&card, None).await.expect_err("still broken");
    assert_eq!(h.renderer.calls(&card), 1);

    h.renderer.set(&leaf, FakeModule::ready(&["Leaf"], &[]));
    h.renderer.set(&card, FakeModule::ready(&["Card"], &["./leaf-field"]));
    let list = h.lookup.invalidate(&leaf).await.expect("invalidate");
    assert!(list.contains(&card), "the errored dependent is a consumer: {list:?}");
    let fixed = h.lookup.lookup_definition(&CodeRef::new(card.clone(), "Card"), None).await;
    assert_eq!(fixed.expect("recovered"), fake_definition(&card, "Card", 1));
}

/// Local realms: public rows are shared (`''`), private rows belong to the owner.
pub async fn public_and_realm_auth_scopes_for_local_realms<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let private = "https://realm.test/private/";
    h.lookup
        .register_realm(Realm {
            url: private.into(),
            owner: "@bob:realm.test".into(),
            public: false,
        })
        .expect("register");
    h.renderer.set(&u("pub.gts"), FakeModule::ready(&["P"], &[]));
    h.renderer.set(&format!("{private}secret.gts"), FakeModule::ready(&["S"], &[]));
    h.lookup.get_module_entry(&u("pub.gts"), None).await.expect("public");
    h.lookup.get_module_entry(&format!("{private}secret.gts"), None).await.expect("private");

    let public_row = h.row(&u("pub.gts")).await.expect("public row");
    assert_eq!(
        (public_row.cache_scope, public_row.auth_user_id.as_str()),
        (CacheScope::Public, "")
    );
    let scope = EntryScope {
        realm_url: private.into(),
        scope: CacheScope::RealmAuth,
        user: "@bob:realm.test".into(),
    };
    let url = format!("{private}secret.gts");
    let rows =
        h.lookup.db().read_rows(&scope, &url, &format!("{private}secret")).await.expect("read");
    assert_eq!(rows.len(), 1, "private row is stored per owner");
    assert_eq!(rows[0].entry_scope(), scope, "a row read carries the realm, scope and user read");
    let users: Vec<String> = h.renderer.requests().into_iter().map(|r| r.user).collect();
    assert_eq!(users, [OWNER, "@bob:realm.test"], "each realm renders as its owner");
    assert!(h.probe.calls().is_empty(), "local realms are never probed");
}

/// Remote realms: only a caller acting for a realm may probe; scope follows the probe.
pub async fn public_and_realm_auth_scopes_for_remote_realms<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let public_remote = "https://remote.test/pub/";
    let private_remote = "https://remote.test/priv/";
    h.probe.add_realm(public_remote, true);
    h.probe.add_realm(private_remote, false);
    let pub_mod = format!("{public_remote}card.gts");
    let priv_mod = format!("{private_remote}card.gts");
    h.renderer.set(&pub_mod, FakeModule::ready(&["Card"], &[]));
    h.renderer.set(&priv_mod, FakeModule::ready(&["Card"], &[]));

    let unscoped = h.lookup.get_module_entry(&pub_mod, None).await.expect_err("no context");
    assert!(matches!(unscoped, LookupError::NoRealm { .. }), "{unscoped:?}");
    assert!(h.lookup.get_cached_entry(&pub_mod, None).await.expect("read").is_none());
    assert_eq!(h.renderer.total_calls(), 0);

    let public = h.lookup.get_module_entry(&pub_mod, Some(REALM)).await.expect("public remote");
    assert_eq!((public.cache_scope, public.auth_user_id.as_str()), (CacheScope::Public, ""));
    assert_eq!(public.resolved_realm_url, public_remote);
    let private = h.lookup.get_module_entry(&priv_mod, Some(REALM)).await.expect("private remote");
    assert_eq!(
        (private.cache_scope, private.auth_user_id.as_str()),
        (CacheScope::RealmAuth, OWNER)
    );
    assert!(h.probe.calls().iter().all(|(_, user)| user == OWNER), "probes assume the owner");
    assert!(h.renderer.requests().iter().all(|r| r.user == OWNER));
}

/// Two requesting realms with different owners never share a private remote row.
pub async fn private_remote_module_is_isolated_per_requesting_owner<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let other = "https://realm.test/bobs/";
    h.lookup
        .register_realm(Realm { url: other.into(), owner: "@bob:realm.test".into(), public: true })
        .expect("register");
    let remote = "https://remote.test/priv/";
    h.probe.add_realm(remote, false);
    let module = format!("{remote}diary.gts");
    h.renderer.set(&module, FakeModule::ready(&["Diary"], &[]));

    let alice = h.lookup.get_module_entry(&module, Some(REALM)).await.expect("alice");
    let bob = h.lookup.get_module_entry(&module, Some(other)).await.expect("bob");
    assert_eq!(alice.auth_user_id, OWNER);
    assert_eq!(bob.auth_user_id, "@bob:realm.test");
    assert_eq!(h.renderer.calls(&module), 2, "bob must not be served alice's row");
    for (realm, owner) in [(REALM, OWNER), (other, "@bob:realm.test")] {
        let entry = h.lookup.get_module_entry(&module, Some(realm)).await.expect("hit");
        assert_eq!(entry.auth_user_id, owner);
    }
    assert_eq!(h.renderer.calls(&module), 2, "each owner hits their own row");
    let users: Vec<String> = h.renderer.requests().into_iter().map(|r| r.user).collect();
    assert_eq!(users, [OWNER, "@bob:realm.test"]);
}

/// An error row is served for 30 s, then rendered again; a row without a time is expired.
pub async fn expired_error_re_prerenders<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let url = u("flaky.gts");
    h.renderer.set(&url, FakeModule::Broken { message: "boom".into(), status: 500, deps: vec![] });
    h.lookup.get_module_entry(&url, None).await.expect_err("broken");
    h.lookup.get_module_entry(&url, None).await.expect_err("cached error");
    assert_eq!(h.renderer.calls(&url), 1, "a fresh error is served from the cache");

    let mut row = h.row(&url).await.expect("error row");
    row.created_at = row.created_at.map(|t| t - 30_001);
    h.lookup.db().upsert(&row, LoadStamp::UNGUARDED).await.expect("age the row");
    h.lookup.get_module_entry(&url, None).await.expect_err("still broken");
    assert_eq!(h.renderer.calls(&url), 2, "an expired error re-prerenders");

    let mut row = h.row(&url).await.expect("error row");
    row.created_at = None;
    h.lookup.db().upsert(&row, LoadStamp::UNGUARDED).await.expect("drop the time");
    h.renderer.set(&url, FakeModule::ready(&["Flaky"], &[]));
    h.lookup.get_module_entry(&url, None).await.expect("recovered");
    assert_eq!(h.renderer.calls(&url), 3);
}

/// Concurrent lookups of one key share one render and one result.
pub async fn concurrent_same_key_lookups_coalesce<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let url = u("slow.gts");
    h.renderer.set(&url, FakeModule::ready(&["Slow"], &[]));
    for load in h.coalesced_loads(&url, 5).await {
        assert_eq!(version_of(&joined(load).await.expect("load"), "Slow"), 1);
    }
    assert_eq!(h.renderer.calls(&url), 1);
    assert_eq!(h.lookup.in_flight_count(), 0, "the slot is released when the load settles");
}

/// Loads of different keys run side by side.
pub async fn different_keys_do_not_coalesce<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let (a, b) = (u("a.gts"), u("b.gts"));
    h.renderer.set(&a, FakeModule::ready(&["A"], &[]));
    h.renderer.set(&b, FakeModule::ready(&["B"], &[]));
    let (gate_a, gate_b) = (h.renderer.gate(&a), h.renderer.gate(&b));
    let (load_a, load_b) = (h.spawn_load(&a), h.spawn_load(&b));
    // Both renders are paused at once: neither waited for the other.
    gate_a.entered().await;
    gate_b.entered().await;
    assert_eq!(h.lookup.in_flight_count(), 2);
    gate_a.open();
    gate_b.open();
    assert_eq!(joined(load_a).await.expect("a").url, a);
    assert_eq!(joined(load_b).await.expect("b").url, b);
}

/// A failure shared by coalesced callers still releases the slot.
pub async fn a_shared_error_releases_the_slot<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let url = u("fails.gts");
    h.renderer.set(&url, FakeModule::RendererFails("renderer down".into()));
    for load in h.coalesced_loads(&url, 3).await {
        let err = joined(load).await.expect_err("renderer failure");
        assert!(matches!(err, LookupError::Prerender { .. }), "{err:?}");
        assert!(err.is_transient());
    }
    assert_eq!(h.renderer.calls(&url), 1);
    assert_eq!(h.lookup.in_flight_count(), 0);
    assert!(h.row(&url).await.is_none(), "a renderer failure stores nothing");
    h.renderer.set(&url, FakeModule::ready(&["Fine"], &[]));
    h.lookup.get_module_entry(&url, None).await.expect("next caller renders afresh");
    assert_eq!(h.renderer.calls(&url), 2);
}

/// A renderer that panics aborts the load for everyone waiting on it, and frees the key.
pub async fn a_panicking_renderer_aborts_the_load_and_frees_the_key<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let url = u("faulty.gts");
    h.renderer.set(&url, FakeModule::RendererPanics);
    for load in h.coalesced_loads(&url, 3).await {
        let err = joined(load).await.expect_err("the load panicked");
        assert!(matches!(err, LookupError::LoadAborted { .. }), "{err:?}");
    }
    assert_eq!(h.lookup.in_flight_count(), 0, "the panicking load released its slot");
    h.renderer.set(&url, FakeModule::ready(&["Fixed"], &[]));
    h.lookup.get_module_entry(&url, None).await.expect("the key is free again");
    assert_eq!(h.renderer.calls(&url), 2);
}

/// After `invalidate` returns, a new caller starts a new load instead of joining the old.
pub async fn invalidate_drops_in_flight_so_later_callers_never_see_the_old_version<D: DbAdapter>(
    db: D,
) {
    let h = Harness::new(db);
    let url = u("card.gts");
    h.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    let gate = h.renderer.gate(&url);
    let old = h.spawn_load(&url);
    gate.entered().await;
    h.renderer.set(&url, FakeModule::ready(&["Card"], &[]).version(2));
    h.lookup.invalidate(&url).await.expect("invalidate");
    let new = h.spawn_load(&url);
    gate.entered().await; // the new caller renders on its own: it did not join the old load
    gate.open();
    assert_eq!(version_of(&joined(new).await.expect("new"), "Card"), 2);
    assert_eq!(version_of(&joined(old).await.expect("old"), "Card"), 2, "discarded load re-ran");
    assert_eq!(version_of(&h.row(&url).await.expect("row"), "Card"), 2);
}

async fn dropped_in_flight<D: DbAdapter, F, Fut>(db: D, invalidate: F)
where
    F: FnOnce(Lookup<D>, String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let h = Harness::new(db);
    let url = u("card.gts");
    h.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    let gate = h.renderer.gate(&url);
    let load = h.spawn_load(&url);
    gate.entered().await;
    h.renderer.set(&url, FakeModule::ready(&["Card"], &[]).version(2));
    invalidate(h.lookup.clone(), url.clone()).await;
    assert_eq!(h.lookup.in_flight_count(), 0, "the in-flight slot was dropped");
    gate.open();
    let entry = joined(load).await.expect("load");
    assert_eq!(version_of(&entry, "Card"), 2, "the caller gets the re-run, not the stale render");
    assert_eq!(h.renderer.calls(&url), 2);
    assert_eq!(version_of(&h.row(&url).await.expect("row"), "Card"), 2, "v1 was never persisted");
}

/// An in-flight result is not persisted after `invalidate` of its module.
pub async fn in_flight_result_dropped_by_invalidate<D: DbAdapter>(db: D) {
    dropped_in_flight(db, |lookup, url| async move {
        lookup.invalidate(&url).await.expect("invalidate");
    })
    .await;
}

/// An in-flight result is not persisted after `clear_realm`.
pub async fn in_flight_result_dropped_by_clear_realm<D: DbAdapter>(db: D) {
    dropped_in_flight(db, |lookup, _| async move {
        lookup.clear_realm(REALM).await.expect("clear realm");
    })
    .await;
}

/// An in-flight result is not persisted after `clear_all`.
pub async fn in_flight_result_dropped_by_clear_all<D: DbAdapter>(db: D) {
    dropped_in_flight(db, |lookup, _| async move {
        lookup.clear_all().await.expect("clear all");
    })
    .await;
}

/// A bump replayed from a peer (what the listener does) discards the in-flight result too.
pub async fn in_flight_result_dropped_by_a_peer_bump<D: DbAdapter>(db: D) {
    dropped_in_flight(db, |lookup, url| async move {
        let alias = lookup_core::urls::file_alias(&url);
        InvalidationSink::bump_modules(&lookup, REALM, &[url, alias]);
    })
    .await;
}

/// Invalidating X leaves an in-flight load of unrelated Y alone.
pub async fn unrelated_module_is_not_discarded<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let (x, y) = (u("x.gts"), u("y.gts"));
    h.renderer.set(&x, FakeModule::ready(&["X"], &[]));
    h.renderer.set(&y, FakeModule::ready(&["Y"], &[]));
    h.lookup.get_module_entry(&x, None).await.expect("x");
    let gate = h.renderer.gate(&y);
    let load = h.spawn_load(&y);
    gate.entered().await;
    h.lookup.invalidate(&x).await.expect("invalidate x");
    assert_eq!(h.lookup.in_flight_count(), 1, "y's slot survives");
    gate.open();
    joined(load).await.expect("y");
    assert_eq!(h.renderer.calls(&y), 1, "y was not re-run");
    assert!(h.row(&y).await.is_some(), "y persisted");
}

/// A load that settles after its slot was replaced must not remove the newer slot.
pub async fn a_settled_load_does_not_delete_a_newer_slot<D: DbAdapter>(db: D) {
    // One attempt only, so the old load settles (unpersisted) right after its render.
    let config = LookupConfig { max_load_attempts: 1, ..LookupConfig::default() };
    let h = Harness::with_config(db, config);
    let url = u("card.gts");
    h.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    let gate = h.renderer.gate(&url);
    let old = h.spawn_load(&url);
    gate.entered().await;
    h.lookup.invalidate(&url).await.expect("invalidate");
    let newer = h.spawn_load(&url);
    gate.entered().await;
    gate.release_one(); // first come, first released: the old load
    joined(old).await.expect("old load settles");
    assert_eq!(h.lookup.in_flight_count(), 1, "the newer slot is still there");
    assert!(h.row(&url).await.is_none(), "the old, discarded result was not persisted");

    let late = h.spawn_load(&url);
    h.waiters(2).await;
    gate.release_one(); // only the newer load's render: the late caller must have joined it
    joined(newer).await.expect("newer");
    joined(late).await.expect("late caller shares the newer load");
    assert_eq!(h.renderer.calls(&url), 2);
}

/// Without interference, an in-flight load persists its result.
pub async fn a_normal_in_flight_load_persists<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let url = u("card.gts");
    h.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    let gate = h.renderer.gate(&url);
    let load = h.spawn_load(&url);
    gate.entered().await;
    gate.open();
    joined(load).await.expect("load");
    assert_eq!(h.renderer.calls(&url), 1);
    assert!(h.row(&url).await.is_some());
}

/// Cache-only reads never render, and pick the same row every time when several match.
pub async fn cached_reads_never_prerender_and_choose_deterministically<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let card = CodeRef::new(u("x"), "X");
    assert_eq!(h.lookup.lookup_cached_definition(&card, None).await.expect("miss"), None);
    assert_eq!(h.renderer.total_calls(), 0);

    for (stored, version) in [("x.ts", 3), ("x.gts", 2), ("x", 1)] {
        let mut entry = sample_entry(REALM, &u(stored));
        entry.definitions.insert(card.definition_key(), fake_definition(&u(stored), "X", version));
        h.lookup.db().upsert(&entry, LoadStamp::UNGUARDED).await.expect("seed");
    }
    for _ in 0..3 {
        let exact = h.lookup.get_cached_entry(&u("x.ts"), None).await.expect("read").expect("row");
        assert_eq!(exact.url, u("x.ts"), "an exact url match wins");
        let bare = h.lookup.get_cached_entry(&u("x"), None).await.expect("read").expect("row");
        assert_eq!(bare.url, u("x"));
    }
    // No exact row: the population-candidate order of the alias decides (.gts before .ts).
    for _ in 0..3 {
        let entry = h.lookup.get_cached_entry(&u("x.js"), None).await.expect("read").expect("row");
        assert_eq!(entry.url, u("x.gts"));
    }
    let definition = h.lookup.lookup_cached_definition(&card, None).await.expect("read");
    assert_eq!(definition.as_ref().and_then(|d| d["version"].as_u64()), Some(1));
    assert_eq!(h.renderer.total_calls(), 0, "cache-only reads never render");
}

/// The batch read answers for many modules at once, by stored url and by alias.
pub async fn batch_read_returns_entries_by_url_and_alias<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    for m in ["a.gts", "b.gts"] {
        h.renderer.set(&u(m), FakeModule::ready(&["X"], &[]));
        h.lookup.get_module_entry(&u(m), None).await.expect("seed");
    }
    let asked = vec![u("a"), u("b.gts"), u("missing"), "https://nowhere.test/x".to_owned()];
    let found = h.lookup.get_cached_entries(&asked, None).await.expect("batch");
    for key in ["a.gts", "a", "b.gts", "b"] {
        assert!(found.contains_key(&u(key)), "{key} missing from the batch");
    }
    assert_eq!(found.len(), 4);
    assert_eq!(found[&u("a")].url, u("a.gts"));
}

/// Malformed input gives a clear error, never a panic.
pub async fn bad_urls_are_clear_errors<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let err = h.lookup.lookup_definition(&CodeRef::new("not a url", "X"), None).await;
    assert!(matches!(err, Err(LookupError::InvalidUrl { .. })), "{err:?}");
    let err = h.lookup.invalidate("::").await;
    assert!(matches!(err, Err(LookupError::InvalidUrl { .. })), "{err:?}");
    let err = h.lookup.register_realm(Realm {
        url: "https://realm.test/no-slash".into(),
        owner: OWNER.into(),
        public: true,
    });
    assert!(matches!(err, Err(LookupError::InvalidUrl { .. })), "{err:?}");
    let err = h.lookup.get_module_entry("https://unknown.test/x.gts", None).await;
    assert!(matches!(err, Err(LookupError::NoRealm { .. })), "{err:?}");
    let message = err.expect_err("no realm").to_string();
    assert!(message.contains("https://unknown.test/x.gts"), "the error names the URL: {message}");
}

/// A realm nested in another's URL space owns its modules whatever the order of
/// registration: their rows are filed under it, and clearing it clears them. The same realm
/// cannot be registered twice.
pub async fn the_longest_registered_realm_owns_a_url<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    let nested = format!("{REALM}sub/");
    h.lookup
        .register_realm(Realm { url: nested.clone(), owner: OWNER.into(), public: true })
        .expect("a nested realm");
    let module = format!("{nested}card.gts");
    h.renderer.set(&module, FakeModule::ready(&["Card"], &[]));
    h.lookup.lookup_definition(&CodeRef::new(&module, "Card"), None).await.expect("lookup");
    let row = h
        .lookup
        .db()
        .read_rows(&public_scope(&nested), &module, &lookup_core::urls::file_alias(&module))
        .await
        .expect("read");
    assert_eq!(row.len(), 1, "the row is filed under the nested realm");
    assert_eq!(h.lookup.clear_realm(&nested).await.expect("clear"), 1, "and cleared with it");
    let again =
        h.lookup.register_realm(Realm { url: nested.clone(), owner: OWNER.into(), public: false });
    assert!(matches!(again, Err(LookupError::RealmAlreadyRegistered { .. })), "{again:?}");
    // A spelling of the same URL is the same realm.
    let spelled = h.lookup.register_realm(Realm {
        url: format!("{REALM}%73ub//"),
        owner: OWNER.into(),
        public: true,
    });
    assert!(matches!(spelled, Err(LookupError::RealmAlreadyRegistered { .. })), "{spelled:?}");
}

/// URLs far past an index entry's size (about 3 KB; a btree entry holds at most 2704 bytes)
/// are cached, read, and invalidated with their consumers like any other.
pub async fn long_urls_are_cached_and_invalidated<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    // Hex of a multiplicative hash: text that does not compress (Postgres compresses long
    // index entries, so a repetitive URL would slip under the limit).
    let noise: String = (0..400u64)
        .map(|i| format!("{:08x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32))
        .collect();
    let long = |name: &str| u(&format!("{noise}/{name}"));
    let (leaf, card) = (long("leaf.gts"), long("card.gts"));
    assert!(leaf.len() > 3000);
    h.renderer.set(&leaf, FakeModule::ready(&["Leaf"], &[]));
    h.renderer.set(&card, FakeModule::ready(&["Card"], &[&lookup_core::urls::file_alias(&leaf)]));
    for (url, name) in [(&leaf, "Leaf"), (&card, "Card")] {
        let found = h.lookup.lookup_definition(&CodeRef::new(url, name), None).await;
        assert_eq!(found.expect("cached"), fake_definition(url, name, 1));
    }
    assert!(h.row(&card).await.is_some(), "the long consumer is stored");
    h.renderer.set(&leaf, FakeModule::ready(&["Leaf"], &[]).version(2));
    let list = h.lookup.invalidate(&leaf).await.expect("invalidating a long URL");
    assert!(list.contains(&card), "its long consumer is invalidated too");
    assert!(h.row(&card).await.is_none() && h.row(&leaf).await.is_none());
    let found = h.lookup.lookup_definition(&CodeRef::new(&leaf, "Leaf"), None).await;
    assert_eq!(found.expect("re-rendered"), fake_definition(&leaf, "Leaf", 2));
}

/// Every spelling of a module URL is one row, and invalidating any spelling reaches it.
pub async fn every_spelling_of_a_module_is_one_row<D: DbAdapter>(db: D) {
    let h = Harness::new(db);
    h.renderer.set(&u("person.gts"), FakeModule::ready(&["Person"], &[]));
    let spellings = [u("person.gts"), u("%70erson.gts"), format!("{REALM}/person.gts")];
    for spelling in &spellings {
        let found = h.lookup.lookup_definition(&CodeRef::new(spelling, "Person"), None).await;
        assert_eq!(found.expect("lookup"), fake_definition(&u("person.gts"), "Person", 1));
    }
    assert_eq!(h.renderer.total_calls(), 1, "one row for every spelling");
    h.renderer.set(&u("person.gts"), FakeModule::ready(&["Person"], &[]).version(2));
    let list = h.lookup.invalidate(&u("%70erson")).await.expect("invalidate");
    assert!(list.contains(&u("person.gts")), "{list:?}");
    for spelling in &spellings {
        let found = h.lookup.lookup_definition(&CodeRef::new(spelling, "Person"), None).await;
        assert_eq!(found.expect("lookup"), fake_definition(&u("person.gts"), "Person", 2));
    }
}

// ---------------------------------------------------------------------------------------------
// The in-process tier (L1).
// ---------------------------------------------------------------------------------------------

fn with_l1(max_age: Duration) -> LookupConfig {
    LookupConfig { l1: Some(L1Config { capacity: 100, max_age }), ..LookupConfig::default() }
}

const LONG_AGE: Duration = Duration::from_secs(600);

/// A repeat lookup is served by the tier, even when the row went behind the cache's back
/// (no invalidation): that is the staleness the maximum age bounds.
pub async fn l1_serves_repeat_lookups<D: DbAdapter>(db: D) {
    let h = Harness::with_config(db, with_l1(LONG_AGE));
    let url = u("card.gts");
    h.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    h.lookup.get_module_entry(&url, None).await.expect("load");
    h.lookup.get_module_entry(&url, None).await.expect("again");
    let stats = h.lookup.l1_stats().expect("on");
    assert_eq!((stats.hits, stats.entries), (1, 1));
    h.lookup.db().apply_invalidation(&Invalidation::Global).await.expect("wipe");
    h.lookup.get_module_entry(&url, None).await.expect("served by the tier");
    assert_eq!(h.renderer.calls(&url), 1);
    assert!(h.lookup.l1_stats().is_some_and(|s| s.hits == 2));
}

/// An entry older than the maximum age is never served.
pub async fn l1_never_serves_past_the_max_age<D: DbAdapter>(db: D) {
    let h = Harness::with_config(db, with_l1(Duration::ZERO));
    let url = u("card.gts");
    h.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    h.lookup.get_module_entry(&url, None).await.expect("load");
    h.lookup.db().apply_invalidation(&Invalidation::Global).await.expect("wipe");
    h.lookup.get_module_entry(&url, None).await.expect("reloads");
    assert_eq!(h.renderer.calls(&url), 2, "the expired entry was not served");
    let stats = h.lookup.l1_stats().expect("on");
    assert_eq!((stats.hits, stats.expired), (0, 1));
}

/// Invalidations made here or heard from peers remove what they cover, consumers included;
/// clears empty the tier.
pub async fn l1_follows_every_invalidation<D: DbAdapter>(db: D) {
    let h = Harness::with_config(db, with_l1(LONG_AGE));
    let (leaf, card, other) = (u("leaf.gts"), u("card.gts"), u("other.gts"));
    h.renderer.set(&leaf, FakeModule::ready(&["Leaf"], &[]));
    h.renderer.set(&card, FakeModule::ready(&["Card"], &["./leaf"]));
    h.renderer.set(&other, FakeModule::ready(&["Other"], &[]));
    for url in [&leaf, &card, &other] {
        h.lookup.get_module_entry(url, None).await.expect("load");
    }
    assert_eq!(h.lookup.l1_stats().expect("on").entries, 3);
    // A local invalidation of the leaf takes its consumer with it, and v2 is served.
    h.renderer.set(&card, FakeModule::ready(&["Card"], &["./leaf"]).version(2));
    h.lookup.invalidate(&leaf).await.expect("invalidate");
    assert_eq!(h.lookup.l1_stats().expect("on").entries, 1, "only other.gts is left");
    let entry = h.lookup.get_module_entry(&card, None).await.expect("card");
    let key = CodeRef::new(card.clone(), "Card").definition_key();
    assert_eq!(entry.definitions[&key]["version"], 2);
    // A peer's bump (as the listener replays it) by alias: served by the tier before it, from
    // the database (where the row still is) after it.
    h.lookup.get_module_entry(&other, None).await.expect("other, from the tier");
    assert!(h.lookup.l1_stats().is_some_and(|s| s.hits == 1));
    InvalidationSink::bump_modules(&h.lookup, REALM, &[lookup_core::urls::file_alias(&other)]);
    assert_eq!(h.lookup.l1_stats().expect("on").entries, 1, "the bump removed it; card stays");
    h.lookup.get_module_entry(&other, None).await.expect("other");
    assert_eq!(h.renderer.calls(&other), 1, "the row was still in the db");
    assert!(h.lookup.l1_stats().is_some_and(|s| s.hits == 1), "never served after a bump");
    // Realm and global clears.
    h.lookup.clear_realm(REALM).await.expect("clear realm");
    assert_eq!(h.lookup.l1_stats().expect("on").entries, 0);
    h.lookup.get_module_entry(&other, None).await.expect("other");
    InvalidationSink::bump_global(&h.lookup);
    assert_eq!(h.lookup.l1_stats().expect("on").entries, 0);
}

/// While the listener is disconnected the tier is bypassed (neither served nor filled); it
/// keeps what it holds, which the invalidations replayed on reconnection remove where they
/// cover it (or a resync's global bump, all of it), and serves again once the listener is
/// back.
pub async fn l1_is_bypassed_while_the_listener_is_disconnected<D: DbAdapter>(db: D) {
    let h = Harness::with_config(db, with_l1(LONG_AGE));
    let (card, other) = (u("card.gts"), u("other.gts"));
    for url in [&card, &other] {
        h.renderer.set(url, FakeModule::ready(&["M"], &[]));
        h.lookup.get_module_entry(url, None).await.expect("load");
    }
    InvalidationSink::connection_lost(&h.lookup);
    let stats = h.lookup.l1_stats().expect("on");
    assert!(stats.suspended && stats.entries == 2, "{stats:?}");
    h.lookup.get_module_entry(&card, None).await.expect("from the db");
    let stats = h.lookup.l1_stats().expect("on");
    assert_eq!((stats.hits, stats.entries), (0, 2), "not served, nothing stored while deaf");
    // The catch-up replays an invalidation of `other` missed while away.
    InvalidationSink::bump_modules(&h.lookup, REALM, std::slice::from_ref(&other));
    InvalidationSink::connection_restored(&h.lookup);
    h.lookup.get_module_entry(&card, None).await.expect("from the tier");
    let stats = h.lookup.l1_stats().expect("on");
    assert!(!stats.suspended && stats.hits == 1 && stats.entries == 1, "{stats:?}");
    // A resync throws everything away.
    InvalidationSink::connection_lost(&h.lookup);
    InvalidationSink::resync(&h.lookup);
    InvalidationSink::connection_restored(&h.lookup);
    assert_eq!(h.lookup.l1_stats().expect("on").entries, 0);
    h.lookup.get_module_entry(&card, None).await.expect("from the db");
    h.lookup.get_module_entry(&card, None).await.expect("from the tier");
    let stats = h.lookup.l1_stats().expect("on");
    assert!(stats.hits == 2 && stats.entries == 1, "{stats:?}");
    assert_eq!(h.renderer.calls(&card), 1);
}

/// A storage wrapper whose `apply_invalidation` waits at a gate before running: it holds a
/// clear between its start and its DELETE, the window a concurrent lookup must not exploit.
struct PausedClears<D> {
    inner: D,
    entered: Arc<tokio::sync::Semaphore>,
    release: Arc<tokio::sync::Semaphore>,
}

impl<D: DbAdapter> lookup_core::RowStore for PausedClears<D> {
    async fn read_rows(
        &self,
        scope: &EntryScope,
        url: &str,
        alias: &str,
    ) -> Result<Vec<CacheEntry>, LookupError> {
        self.inner.read_rows(scope, url, alias).await
    }

    async fn read_rows_batch(
        &self,
        scope: &EntryScope,
        names: &[String],
    ) -> Result<Vec<CacheEntry>, LookupError> {
        self.inner.read_rows_batch(scope, names).await
    }

    async fn begin_load(
        &self,
        realm_url: &str,
        url: &str,
    ) -> Result<lookup_core::LoadStamp, LookupError> {
        self.inner.begin_load(realm_url, url).await
    }

    async fn upsert(
        &self,
        entry: &CacheEntry,
        stamp: lookup_core::LoadStamp,
    ) -> Result<lookup_core::PersistOutcome, LookupError> {
        self.inner.upsert(entry, stamp).await
    }
}

impl<D: DbAdapter> DbAdapter for PausedClears<D> {
    async fn consumers(
        &self,
        realm_url: &str,
        names: &[String],
    ) -> Result<Vec<lookup_core::ConsumerRow>, LookupError> {
        self.inner.consumers(realm_url, names).await
    }

    async fn apply_invalidation(&self, invalidation: &Invalidation) -> Result<u64, LookupError> {
        self.entered.add_permits(1);
        let permit = bounded("the clear to be released", self.release.acquire()).await;
        permit.expect("never closed").forget();
        self.inner.apply_invalidation(invalidation).await
    }
}

/// A lookup that reads a row while a realm clear is between its start and its DELETE must not
/// leave that row in the tier once the clear has returned.
pub async fn l1_keeps_nothing_a_concurrent_clear_deleted<D: DbAdapter>(db: D) {
    let entered = Arc::new(tokio::sync::Semaphore::new(0));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let paused =
        PausedClears { inner: db, entered: Arc::clone(&entered), release: Arc::clone(&release) };
    let h = Harness::with_config(paused, with_l1(LONG_AGE));
    let url = u("card.gts");
    h.renderer.set(&url, FakeModule::ready(&["Card"], &[]));
    h.lookup.get_module_entry(&url, None).await.expect("v1 loads");
    // Drop the tier's copy so the next lookup reads the database.
    InvalidationSink::connection_lost(&h.lookup);
    InvalidationSink::connection_restored(&h.lookup);
    let clear = {
        let lookup = h.lookup.clone();
        tokio::spawn(async move { lookup.clear_realm(REALM).await })
    };
    bounded("the clear to start", entered.acquire()).await.expect("never closed").forget();
    // The clear holds before its DELETE: this lookup reads v1 from the database.
    h.lookup.get_module_entry(&url, None).await.expect("v1 read");
    release.add_permits(1);
    joined(clear).await.expect("clear");
    h.renderer.set(&url, FakeModule::ready(&["Card"], &[]).version(2));
    let entry = h.lookup.get_module_entry(&url, None).await.expect("after the clear");
    let key = CodeRef::new(url.clone(), "Card").definition_key();
    assert_eq!(entry.definitions[&key]["version"], 2, "the tier kept a cleared row");
}

/// A result returned unpersisted (discarded by an invalidation of its dependency) is in no row
/// and is never stored in the tier.
pub async fn l1_never_stores_an_unpersisted_result<D: DbAdapter>(db: D) {
    let config = LookupConfig { max_load_attempts: 1, ..with_l1(LONG_AGE) };
    let h = Harness::with_config(db, config);
    let (leaf, card) = (u("leaf.gts"), u("card.gts"));
    h.renderer.set(&leaf, FakeModule::ready(&["Leaf"], &[]));
    h.renderer.set(&card, FakeModule::ready(&["Card"], &["./leaf"]));
    h.lookup.get_module_entry(&leaf, None).await.expect("leaf");
    let gate = h.renderer.gate(&card);
    let load = h.spawn_load(&card);
    gate.entered().await;
    h.lookup.invalidate(&leaf).await.expect("invalidate the dependency mid-render");
    gate.open();
    joined(load).await.expect("card, returned unpersisted");
    assert!(h.row(&card).await.is_none(), "not persisted");
    assert_eq!(h.lookup.l1_stats().expect("on").entries, 0, "not in the tier either");
    h.lookup.get_module_entry(&card, None).await.expect("card again");
    assert_eq!(h.renderer.calls(&card), 2, "rendered again, not served from the tier");
}
