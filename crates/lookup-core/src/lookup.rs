//! The caching lookup: read-through loads, in-process coalescing, invalidation and the
//! generation guard (BEHAVIOUR §3–§5).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::sync::watch;

use crate::error::LookupError;
use crate::generations::{Generations, Snapshot};
use crate::l1::{L1, L1Config, L1Stats};
use crate::populate::{NoRow, PopulateCoordinator, PopulateLease, Uncoordinated, Woken};
use crate::telemetry;
use crate::traits::{
    DbAdapter, InvalidationSink, NoRemoteRealms, PersistOutcome, Prerenderer, RealmProbe, RowStore,
};
use crate::types::{
    CacheEntry, CacheScope, CodeRef, ConsumerRow, EntryScope, ErrorDetail, PrerenderRequest,
    PrerenderResponse, PrerenderStatus, Realm,
};
use crate::urls;
use crate::wire::Invalidation;

/// Tunables of a [`CachingLookup`].
#[derive(Debug, Clone)]
pub struct LookupConfig {
    /// How long an error row is served from the cache before it is prerendered again (30 s).
    pub error_ttl: Duration,
    /// How many times a load runs when invalidations keep discarding its result (3). The
    /// last attempt's result is returned, unpersisted, if it is discarded too.
    pub max_load_attempts: u32,
    /// The in-process tier in front of the database (off by default); see [`L1Config`] for
    /// what it may serve and for how long.
    pub l1: Option<L1Config>,
}

impl Default for LookupConfig {
    fn default() -> Self {
        LookupConfig { error_ttl: Duration::from_secs(30), max_load_attempts: 3, l1: None }
    }
}

/// Where and as whom a module is read, rendered and cached (BEHAVIOUR §3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Context {
    scope: EntryScope,
    prerender_user: String,
}

/// The coalescing key of BEHAVIOUR §3.6: realm, requested URL, scope and cache user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct LoadKey {
    pub(crate) scope: EntryScope,
    pub(crate) url: String,
}

/// What a load hands its callers: the entry, and whether it is what the database holds (read
/// from it, or written to it). Only such entries may go to the in-process tier: a result
/// returned unpersisted is in no row, so no invalidation's fan-out would ever name it.
#[derive(Debug, Clone)]
struct Loaded {
    entry: Arc<CacheEntry>,
    stored: bool,
}

impl Loaded {
    fn stored(entry: Arc<CacheEntry>) -> Self {
        Loaded { entry, stored: true }
    }
}

type SharedResult = Result<Loaded, LookupError>;

#[derive(Debug)]
struct Slot {
    id: u64,
    /// Shared with the load's task, which sends the result; joiners subscribe.
    result: Arc<watch::Sender<Option<SharedResult>>>,
    /// Cancels the load's task ([`CachingLookup::cancel_loads`]).
    task: tokio::task::AbortHandle,
}

/// Runs a closure when dropped, including during unwinding.
struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// What one attempt of a load produced.
enum Attempt {
    /// Served from the cache or persisted.
    Done(Arc<CacheEntry>),
    /// Rendered, but an invalidation since the snapshot means it must not be persisted.
    Discarded(Arc<CacheEntry>),
}

struct Inner<D, P, R, C> {
    db: D,
    prerenderer: P,
    probe: R,
    coordinator: Option<C>,
    config: LookupConfig,
    l1: Option<L1>,
    realms: RwLock<Vec<Realm>>,
    generations: Arc<Generations>,
    in_flight: Mutex<HashMap<LoadKey, Slot>>,
    next_slot: AtomicU64,
    /// Serialises "check the snapshot, then upsert" (shared) against an invalidation's "compute
    /// the list and delete (one backend call), then bump" (exclusive). The bump comes after the
    /// DELETE, so without it a persist whose check passed before the bump could land after that
    /// DELETE and resurrect the row.
    persist_gate: tokio::sync::RwLock<()>,
}

/// A database-backed cache of prerendered module definitions.
///
/// Cheap to clone (clones share everything). Generic over its storage `D`, its renderer `P`,
/// its remote realm probe `R` and its cross-process populate coordinator `C` (none by
/// default; see [`with_coordinator`](Self::with_coordinator)).
pub struct CachingLookup<D, P, R = NoRemoteRealms, C = Uncoordinated> {
    inner: Arc<Inner<D, P, R, C>>,
}

impl<D, P, R, C> Clone for CachingLookup<D, P, R, C> {
    fn clone(&self) -> Self {
        CachingLookup { inner: Arc::clone(&self.inner) }
    }
}

impl<D, P, R, C> std::fmt::Debug for CachingLookup<D, P, R, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachingLookup")
            .field("config", &self.inner.config)
            .field("realms", &self.inner.realms)
            .field("coordinated", &self.inner.coordinator.is_some())
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn absolute_url(raw: &str) -> Result<String, LookupError> {
    let canonical = urls::canonical_url(raw);
    match url::Url::parse(&canonical) {
        Ok(parsed) if !parsed.cannot_be_a_base() => Ok(canonical),
        Ok(_) => Err(LookupError::InvalidUrl {
            url: raw.to_owned(),
            reason: "not a hierarchical URL".to_owned(),
        }),
        Err(e) => Err(LookupError::InvalidUrl { url: raw.to_owned(), reason: e.to_string() }),
    }
}

impl<D: DbAdapter, P: Prerenderer> CachingLookup<D, P, NoRemoteRealms> {
    /// A lookup over `db` that renders with `prerenderer` and knows no remote realms.
    pub fn new(db: D, prerenderer: P) -> Self {
        Self::with_probe(db, prerenderer, NoRemoteRealms, LookupConfig::default())
    }
}

impl<D: DbAdapter, P: Prerenderer, R: RealmProbe> CachingLookup<D, P, R, Uncoordinated> {
    /// A lookup that asks `probe` about modules no local realm owns.
    pub fn with_probe(db: D, prerenderer: P, probe: R, config: LookupConfig) -> Self {
        Self::with_coordinator(db, prerenderer, probe, config, None)
    }
}

impl<D: DbAdapter, P: Prerenderer, R: RealmProbe, C: PopulateCoordinator>
    CachingLookup<D, P, R, C>
{
    /// A lookup whose cold loads are coalesced across processes by `coordinator` (BEHAVIOUR §9);
    /// with `None` it behaves exactly like [`with_probe`](CachingLookup::with_probe). Cache
    /// hits never touch the coordinator.
    pub fn with_coordinator(
        db: D,
        prerenderer: P,
        probe: R,
        config: LookupConfig,
        coordinator: Option<C>,
    ) -> Self {
        CachingLookup {
            inner: Arc::new(Inner {
                db,
                prerenderer,
                probe,
                coordinator,
                l1: config.l1.map(L1::new),
                config,
                realms: RwLock::new(Vec::new()),
                generations: Arc::new(Generations::default()),
                in_flight: Mutex::new(HashMap::new()),
                next_slot: AtomicU64::new(1),
                persist_gate: tokio::sync::RwLock::new(()),
            }),
        }
    }

    /// The storage backend.
    pub fn db(&self) -> &D {
        &self.inner.db
    }

    /// The renderer.
    pub fn prerenderer(&self) -> &P {
        &self.inner.prerenderer
    }

    /// The in-process tier's counters, when it is on.
    pub fn l1_stats(&self) -> Option<L1Stats> {
        self.inner.l1.as_ref().map(L1::stats)
    }

    /// The cross-process populate coordinator, when there is one.
    pub fn coordinator(&self) -> Option<&C> {
        self.inner.coordinator.as_ref()
    }

    /// The generation tracking (exposed for diagnostics and benchmarks).
    pub fn generations(&self) -> &Arc<Generations> {
        &self.inner.generations
    }

    /// Cancels every load in flight and returns once their tasks have ended: renders in
    /// progress are dropped, and whatever a load held is let go of (a populate lease rolls
    /// back and announces its key). Their callers get [`LookupError::LoadAborted`]. For a
    /// process that was asked to stop.
    pub async fn cancel_loads(&self) {
        let ending: Vec<_> = {
            let slots = self.inner.slots();
            slots.values().map(|slot| (slot.task.clone(), slot.result.subscribe())).collect()
        };
        for (task, _) in &ending {
            task.abort();
        }
        for (_, mut result) in ending {
            // Closed once the task is gone (it holds a sender, and so does its slot until
            // the task's end releases it).
            while result.changed().await.is_ok() {}
        }
    }

    /// Number of loads currently in flight (coalescing slots).
    pub fn in_flight_count(&self) -> usize {
        self.inner.slots().len()
    }

    /// Number of callers currently waiting on in-flight loads (for tests and diagnostics).
    pub fn in_flight_waiters(&self) -> usize {
        self.inner.slots().values().map(|slot| slot.result.receiver_count()).sum()
    }

    /// Registers a local realm. Its URL must be absolute and end with `/`, and not be
    /// registered already ([`LookupError::RealmAlreadyRegistered`]). Realms may nest: a URL
    /// belongs to the realm with the longest URL that is a prefix of it, whatever the order
    /// of registration.
    pub fn register_realm(&self, realm: Realm) -> Result<(), LookupError> {
        let url = absolute_url(&realm.url)?;
        if !url.ends_with('/') {
            return Err(LookupError::InvalidUrl {
                url: realm.url,
                reason: "a realm URL must end with '/'".to_owned(),
            });
        }
        let mut realms = self.inner.realms.write().unwrap_or_else(|p| p.into_inner());
        if realms.iter().any(|r| r.url == url) {
            return Err(LookupError::RealmAlreadyRegistered { url });
        }
        realms.push(Realm { url, ..realm });
        Ok(())
    }

    /// The registered local realm that owns `url` (the longest registered prefix of its
    /// canonical form), if any.
    pub fn owning_realm(&self, url: &str) -> Option<Realm> {
        self.inner.local_realm(&urls::canonical_url(url))
    }

    /// The registered local realms, in registration order.
    pub fn realms(&self) -> Vec<Realm> {
        self.inner.realms.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Looks up one definition, prerendering its module on a miss.
    ///
    /// `for_realm` is the realm the caller acts for; it enables remote realm probing.
    pub async fn lookup_definition(
        &self,
        code_ref: &CodeRef,
        for_realm: Option<&str>,
    ) -> Result<Value, LookupError> {
        let entry = self.get_module_entry(&code_ref.module, for_realm).await?;
        definition_from(&entry, code_ref)
    }

    /// Looks up one definition from the cache only: `Ok(None)` when no row is cached (or the
    /// module has no realm). Never prerenders.
    pub async fn lookup_cached_definition(
        &self,
        code_ref: &CodeRef,
        for_realm: Option<&str>,
    ) -> Result<Option<Value>, LookupError> {
        match self.get_cached_entry(&code_ref.module, for_realm).await? {
            Some(entry) => definition_from(&entry, code_ref).map(Some),
            None => Ok(None),
        }
    }

    /// The cache entry of a module, prerendering it on a miss (BEHAVIOUR §3.5). An entry whose
    /// module errored is returned as [`LookupError::ModuleError`].
    pub async fn get_module_entry(
        &self,
        module_url: &str,
        for_realm: Option<&str>,
    ) -> Result<Arc<CacheEntry>, LookupError> {
        let entry = self.load_entry(module_url, for_realm).await?;
        match &entry.error {
            Some(error) => Err(LookupError::ModuleError {
                url: entry.url.clone(),
                error: Box::new(error.clone()),
            }),
            None => Ok(entry),
        }
    }

    /// Like [`get_module_entry`](Self::get_module_entry), but an errored module's entry is
    /// returned as `Ok` (its `error` is set).
    pub async fn load_entry(
        &self,
        module_url: &str,
        for_realm: Option<&str>,
    ) -> Result<Arc<CacheEntry>, LookupError> {
        // BEHAVIOUR §5: the snapshot is taken before the first await, so an invalidation that runs
        // while we resolve the realm still counts against this load.
        let snapshot = self.inner.generations.snapshot();
        let started = std::time::Instant::now();
        let url = absolute_url(module_url)?;
        let context = self
            .inner
            .context(&url, for_realm)
            .await?
            .ok_or_else(|| LookupError::NoRealm { url: url.clone() })?;

        let Some(l1) = &self.inner.l1 else {
            // Fast path: a hit costs one read and never touches the coalescing map.
            if let Some(entry) =
                self.inner.read_cached(&self.inner.db, &context.scope, &url).await?
                && !self.inner.is_expired(&entry)
            {
                telemetry::hit("db", started);
                return Ok(Arc::new(entry));
            }
            let loaded = self.join_or_start(context, url, snapshot).await?;
            telemetry::miss(started);
            return Ok(loaded.entry);
        };
        let key = LoadKey { scope: context.scope.clone(), url: url.clone() };
        if let Some(entry) = l1.get(&key) {
            telemetry::hit("l1", started);
            return Ok(entry);
        }
        let loaded = match self.inner.read_cached(&self.inner.db, &context.scope, &url).await? {
            Some(entry) if !self.inner.is_expired(&entry) => {
                telemetry::hit("db", started);
                Loaded::stored(Arc::new(entry))
            }
            _ => {
                let loaded = self.join_or_start(context, url, snapshot.clone()).await?;
                telemetry::miss(started);
                loaded
            }
        };
        // Errors expire on their own schedule, and a result the database does not hold would
        // be named by no fan-out: only stored, good entries go to the tier.
        if loaded.stored && loaded.entry.error.is_none() {
            l1.insert(key, Arc::clone(&loaded.entry), &snapshot);
        }
        Ok(loaded.entry)
    }

    async fn join_or_start(
        &self,
        context: Context,
        url: String,
        snapshot: Snapshot,
    ) -> SharedResult {
        let key = LoadKey { scope: context.scope.clone(), url: url.clone() };
        let mut result = {
            let mut slots = self.inner.slots();
            match slots.get(&key) {
                Some(slot) => {
                    telemetry::coalesced_waiter();
                    slot.result.subscribe()
                }
                None => {
                    let id = self.inner.next_slot.fetch_add(1, Ordering::Relaxed);
                    let (tx, rx) = watch::channel(None);
                    let tx = Arc::new(tx);
                    let result = Arc::clone(&tx);
                    let inner = Arc::clone(&self.inner);
                    let url = url.clone();
                    let slot_key = key.clone();
                    // The load runs as its own task: a caller that gives up must not cancel
                    // the load every other caller of the same key is waiting on. (The task
                    // cannot release its slot before it is inserted below: that takes the
                    // lock held here.)
                    let task = tokio::spawn(async move {
                        // Released however the load ends: if it panics (a faulty renderer),
                        // unwinding drops this guard, the slot goes, the last sender goes
                        // with it, and waiters get `LoadAborted` instead of hanging, while
                        // the key is free for the next caller.
                        let release = OnDrop(Some(|| inner.release(&key, id)));
                        let outcome = match &inner.coordinator {
                            Some(coordinator) => {
                                inner.run_coordinated(coordinator, &context, &url, snapshot).await
                            }
                            None => {
                                inner.run_load(&inner.db, &context, &url, snapshot, false).await
                            }
                        };
                        drop(release);
                        // Nobody waiting is fine: the row is persisted either way.
                        tx.send_replace(Some(outcome));
                    });
                    slots.insert(slot_key, Slot { id, result, task: task.abort_handle() });
                    rx
                }
            }
        };
        let settled = result.wait_for(Option::is_some).await;
        match settled {
            Ok(value) => value.clone().unwrap_or_else(|| Err(LookupError::LoadAborted { url })),
            Err(_) => Err(LookupError::LoadAborted { url }),
        }
    }

    /// The cached entry of a module without prerendering: `Ok(None)` when nothing usable is
    /// cached or no realm owns the module. Errored entries are returned as they are stored.
    pub async fn get_cached_entry(
        &self,
        module_url: &str,
        for_realm: Option<&str>,
    ) -> Result<Option<CacheEntry>, LookupError> {
        let url = absolute_url(module_url)?;
        let Some(context) = self.inner.context(&url, for_realm).await? else {
            return Ok(None);
        };
        self.inner.read_cached(&self.inner.db, &context.scope, &url).await
    }

    /// Cached entries for many modules at once, keyed by stored `url` and by `file_alias`.
    /// One query per distinct realm/scope/user among the modules (usually one).
    pub async fn get_cached_entries(
        &self,
        module_urls: &[String],
        for_realm: Option<&str>,
    ) -> Result<HashMap<String, CacheEntry>, LookupError> {
        let mut by_scope: Vec<(EntryScope, Vec<String>)> = Vec::new();
        for raw in module_urls {
            let url = absolute_url(raw)?;
            let Some(context) = self.inner.context(&url, for_realm).await? else {
                continue;
            };
            let names = match by_scope.iter_mut().find(|(s, _)| *s == context.scope) {
                Some((_, names)) => names,
                None => {
                    by_scope.push((context.scope, Vec::new()));
                    &mut by_scope.last_mut().expect("just pushed").1
                }
            };
            names.push(urls::file_alias(&url));
            names.push(url);
        }
        let mut out = HashMap::new();
        for (scope, names) in by_scope {
            for entry in self.inner.db.read_rows_batch(&scope, &names).await? {
                out.entry(entry.file_alias.clone()).or_insert_with(|| entry.clone());
                out.insert(entry.url.clone(), entry);
            }
        }
        Ok(out)
    }

    /// Invalidates a module and, transitively, every cached module that depends on it
    /// (BEHAVIOUR §4.1). Returns every URL invalidated, in fan-out order; `[]` when no local realm
    /// owns the module (nothing is touched then).
    pub async fn invalidate(&self, module_url: &str) -> Result<Vec<String>, LookupError> {
        let url = absolute_url(module_url)?;
        let Some(realm) = self.inner.local_realm(&url) else {
            return Ok(Vec::new());
        };
        // Held until the bump: no load of this process persists (checks its snapshot, then
        // writes) while the rows are deleted and the bump is not yet made, so one that
        // started before this invalidation sees the bump when it gets the gate.
        let started = std::time::Instant::now();
        let _exclusive = self.inner.persist_gate.write().await;
        let variants = urls::variants(&url);
        let outcome = self.inner.db.invalidate_modules(&realm.url, &variants).await;
        let done = match outcome {
            Ok(done) => done,
            Err(error) => {
                // The backend may or may not have deleted (a reply lost at COMMIT), and which
                // consumers it found is unknown: everything of the realm in flight or in the
                // in-process tier is discarded, conservatively.
                self.inner.bump_realm(&realm.url);
                return Err(error);
            }
        };
        // No await between the bump and dropping the slots: a caller arriving after this
        // point can neither join an old load nor see an old load persist.
        self.inner.bump_modules(&realm.url, &done.urls);
        telemetry::invalidation("module", started);
        let (list, deleted) = (done.urls, done.deleted);
        tracing::debug!(module = %url, invalidated = list.len(), deleted, "invalidated module");
        Ok(list)
    }

    /// Drops every cached row of a realm, here and (through the backend) in peers. The realm
    /// need not be registered.
    pub async fn clear_realm(&self, realm_url: &str) -> Result<u64, LookupError> {
        let realm_url = absolute_url(realm_url)?;
        let started = std::time::Instant::now();
        // As in `invalidate`: persists wait for the whole clear, and the bump follows the
        // DELETE, so a lookup that read a row before the DELETE cannot put it in the
        // in-process tier after the bump. On an error the bump happens all the same.
        let _exclusive = self.inner.persist_gate.write().await;
        let outcome = self
            .inner
            .db
            .apply_invalidation(&Invalidation::Realm { realm_url: realm_url.clone() })
            .await;
        self.inner.bump_realm(&realm_url);
        let deleted = outcome?;
        telemetry::invalidation("realm", started);
        tracing::debug!(realm = %realm_url, deleted, "cleared realm");
        Ok(deleted)
    }

    /// Drops every cached row, here and (through the backend) in peers.
    pub async fn clear_all(&self) -> Result<u64, LookupError> {
        let started = std::time::Instant::now();
        let _exclusive = self.inner.persist_gate.write().await;
        let outcome = self.inner.db.apply_invalidation(&Invalidation::Global).await;
        self.inner.bump_global();
        let deleted = outcome?;
        telemetry::invalidation("global", started);
        tracing::debug!(deleted, "cleared all");
        Ok(deleted)
    }
}

/// Orders the invalidation list of BEHAVIOUR §4.1 step 2: the seeds (a module's variants), then
/// consumers breadth-first, each consumer contributing its url then its alias. Duplicates and
/// cycles are dropped.
pub fn fan_out(variants: Vec<String>, consumers: Vec<ConsumerRow>) -> Vec<String> {
    let mut by_dep: HashMap<&str, Vec<&ConsumerRow>> = HashMap::new();
    for row in &consumers {
        for dep in &row.deps {
            by_dep.entry(dep.as_str()).or_default().push(row);
        }
    }
    for rows in by_dep.values_mut() {
        rows.sort_by(|a, b| a.url.cmp(&b.url));
    }
    let mut seen: HashSet<String> = variants.iter().cloned().collect();
    let mut list = variants;
    let mut next = 0;
    while next < list.len() {
        if let Some(rows) = by_dep.get(list[next].as_str()) {
            for row in rows {
                for name in [&row.url, &row.file_alias] {
                    if seen.insert(name.clone()) {
                        list.push(name.clone());
                    }
                }
            }
        }
        next += 1;
    }
    list
}

fn definition_from(entry: &CacheEntry, code_ref: &CodeRef) -> Result<Value, LookupError> {
    if let Some(error) = &entry.error {
        return Err(LookupError::ModuleError {
            url: entry.url.clone(),
            error: Box::new(error.clone()),
        });
    }
    let key = code_ref.definition_key();
    let Some(value) = entry.definitions.get(&key) else {
        return Err(LookupError::DefinitionNotFound { key });
    };
    if value.get("type").and_then(Value::as_str) == Some("definition") {
        return Ok(value.clone());
    }
    let message = value
        .pointer("/error/message")
        .or_else(|| value.get("message"))
        .and_then(Value::as_str)
        .unwrap_or("unknown error")
        .to_owned();
    Err(LookupError::DefinitionError { key, message })
}

/// A 404 module error whose deps are empty or only the candidate itself: the candidate does
/// not exist, so the next one is tried and nothing is stored.
fn is_missing_module(response: &PrerenderResponse, candidate: &str) -> bool {
    let Some(error) = &response.error else {
        return false;
    };
    if response.status != PrerenderStatus::Error || error.error.status != 404 {
        return false;
    }
    let own = urls::variants(candidate);
    let only_self = |deps: &[String]| deps.iter().all(|d| own.contains(&urls::canonical_url(d)));
    only_self(&error.error.deps) && only_self(&response.deps)
}

impl<D: DbAdapter, P: Prerenderer, R: RealmProbe, C: PopulateCoordinator> Inner<D, P, R, C> {
    fn slots(&self) -> MutexGuard<'_, HashMap<LoadKey, Slot>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The registered realm that owns `url`: the one with the longest URL prefix, so a realm
    /// nested in another's URL space owns its own modules (and its rows are filed under it,
    /// where clearing it finds them).
    fn local_realm(&self, url: &str) -> Option<Realm> {
        let realms = self.realms.read().unwrap_or_else(|p| p.into_inner());
        realms.iter().filter(|r| urls::is_under(url, &r.url)).max_by_key(|r| r.url.len()).cloned()
    }

    /// BEHAVIOUR §3.2: a local realm decides; otherwise, for a caller acting for a local realm, the
    /// remote probe does. A failing probe is logged and means "no context".
    async fn context(
        &self,
        url: &str,
        for_realm: Option<&str>,
    ) -> Result<Option<Context>, LookupError> {
        if let Some(realm) = self.local_realm(url) {
            let (scope, user) = if realm.public {
                (CacheScope::Public, String::new())
            } else {
                (CacheScope::RealmAuth, realm.owner.clone())
            };
            return Ok(Some(Context {
                scope: EntryScope { realm_url: realm.url, scope, user },
                prerender_user: realm.owner,
            }));
        }
        let Some(requesting) = for_realm.map(urls::canonical_url) else {
            return Ok(None);
        };
        let owner = {
            let realms = self.realms.read().unwrap_or_else(|p| p.into_inner());
            match realms.iter().find(|r| r.url == requesting) {
                Some(realm) => realm.owner.clone(),
                None => {
                    tracing::debug!(%requesting, "requesting realm is not registered");
                    return Ok(None);
                }
            }
        };
        match self.probe.probe(url, &owner).await {
            Ok(Some(found)) => {
                let (scope, user) = if found.is_public {
                    (CacheScope::Public, String::new())
                } else {
                    (CacheScope::RealmAuth, owner.clone())
                };
                Ok(Some(Context {
                    scope: EntryScope { realm_url: found.resolved_realm_url, scope, user },
                    prerender_user: owner,
                }))
            }
            Ok(None) => Ok(None),
            Err(error) => {
                tracing::warn!(module = %url, %error, "remote realm probe failed");
                Ok(None)
            }
        }
    }

    fn is_expired(&self, entry: &CacheEntry) -> bool {
        if entry.error.is_none() {
            return false;
        }
        let ttl = i64::try_from(self.config.error_ttl.as_millis()).unwrap_or(i64::MAX);
        entry.created_at.is_none_or(|created| now_ms().saturating_sub(created) > ttl)
    }

    /// BEHAVIOUR §3.4 with the deterministic choice: the exact URL first, then the population
    /// candidates of its alias in order, then anything else by URL.
    async fn read_cached(
        &self,
        store: &impl RowStore,
        scope: &EntryScope,
        url: &str,
    ) -> Result<Option<CacheEntry>, LookupError> {
        let alias = urls::file_alias(url);
        let rows = store.read_rows(scope, url, &alias).await?;
        if rows.len() <= 1 {
            return Ok(rows.into_iter().next());
        }
        let mut order = vec![url.to_owned()];
        order.extend(urls::population_candidates(&alias));
        let rank =
            |row: &CacheEntry| order.iter().position(|u| *u == row.url).unwrap_or(order.len());
        Ok(rows.into_iter().min_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.url.cmp(&b.url))))
    }

    fn release(&self, key: &LoadKey, id: u64) {
        let mut slots = self.slots();
        // Remove the slot only if it is still ours: an invalidation may have dropped it and a
        // newer load taken the key, and that newer load must keep serving its callers.
        if slots.get(key).is_some_and(|slot| slot.id == id) {
            slots.remove(key);
        }
    }

    fn drop_slots(&self, keep: impl Fn(&LoadKey) -> bool) {
        self.slots().retain(|key, _| keep(key));
    }

    fn bump_modules(&self, realm_url: &str, list: &[String]) {
        self.generations.bump_modules(realm_url, list);
        self.drop_slots(|key| key.scope.realm_url != realm_url || !list.contains(&key.url));
        if let Some(l1) = &self.l1 {
            l1.invalidate_modules(realm_url, list);
        }
    }

    fn bump_realm(&self, realm_url: &str) {
        self.generations.bump_realm(realm_url);
        self.drop_slots(|key| key.scope.realm_url != realm_url);
        if let Some(l1) = &self.l1 {
            l1.invalidate_realm(realm_url);
        }
    }

    fn bump_global(&self) {
        self.generations.bump_global();
        self.drop_slots(|_| false);
        if let Some(l1) = &self.l1 {
            l1.flush();
        }
    }

    /// Runs a load on `store`, re-running it while invalidations discard its result (BEHAVIOUR §5
    /// Beyond). The first attempt reads the cache first only if `read_first` (the caller may
    /// just have read it).
    async fn run_load(
        &self,
        store: &impl RowStore,
        context: &Context,
        url: &str,
        first: Snapshot,
        read_first: bool,
    ) -> SharedResult {
        let mut snapshot = first;
        let mut attempt = 1;
        loop {
            match self.attempt(store, context, url, &snapshot, read_first || attempt > 1).await? {
                Attempt::Done(entry) => return Ok(Loaded::stored(entry)),
                Attempt::Discarded(entry) if attempt >= self.config.max_load_attempts => {
                    tracing::warn!(module = %url, attempt, "result discarded by invalidations again; returning it unpersisted");
                    return Ok(Loaded { entry, stored: false });
                }
                Attempt::Discarded(_) => {
                    tracing::debug!(module = %url, attempt, "result discarded by an invalidation; loading again");
                    snapshot = self.generations.snapshot();
                    attempt += 1;
                }
            }
        }
    }

    /// BEHAVIOUR §9: a cold load coalesced across processes. Each round registers a wait for the
    /// key *before* trying its lock (so the winner's announcement cannot slip in between),
    /// then either runs the load on the lease's connection and releases it (which announces
    /// the key, also after a failure), or waits, re-reads, and goes again. While it waits
    /// without hearing anything, it probes every `probe_interval`: re-reads the row and tries
    /// the lock, so a winner that died without announcing is taken over within about one
    /// interval of its death.
    async fn run_coordinated(
        &self,
        coordinator: &C,
        context: &Context,
        url: &str,
        first: Snapshot,
    ) -> SharedResult {
        let key = coordinator.key(&context.scope, url);
        let settings = coordinator.settings();
        let rounds = settings.max_rounds.max(1);
        let probe = settings.probe_interval.max(Duration::from_millis(1));
        let mut first = Some(first);
        let mut last_wait = Woken::Signalled;
        // `rounds` waits, each after a lost try, and one last try after the last wait: a
        // winner that failed leaves no row, and the last waiter should then find out why
        // itself rather than give up.
        for round in 1..=rounds + 1 {
            let mut ticket = coordinator.signals().register(&key);
            if let Some(lease) = coordinator.try_acquire(&key).await? {
                drop(ticket);
                telemetry::populate("won");
                return self.run_as_winner(lease, &key, context, url, first.take()).await;
            }
            if round > rounds {
                break;
            }
            telemetry::populate("waited");
            tracing::debug!(%key, round, "another process is populating this module; waiting");
            let deadline = tokio::time::Instant::now() + settings.wait_timeout;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                last_wait = ticket.wait_part(probe.min(left)).await;
                match last_wait {
                    Woken::Signalled => ticket.count(last_wait),
                    Woken::TimedOut if left <= probe => {
                        telemetry::populate("timed_out");
                        ticket.count(last_wait)
                    }
                    _ => {}
                }
                // A recheck (announcements may have been missed) is a probe now, in this round.
                match last_wait {
                    Woken::ShutDown => {
                        return Err(LookupError::PopulateFailed {
                            key: key.to_string(),
                            reason: format!(
                                "the populate coordinator was shut down while round {round} waited"
                            ),
                        });
                    }
                    Woken::Signalled => break,
                    Woken::TimedOut if left <= probe => break,
                    Woken::TimedOut | Woken::Recheck => {}
                }
                // Nothing heard for a whole interval: the winner may have died without a word.
                if let Some(entry) = self.read_cached(&self.db, &context.scope, url).await?
                    && !self.is_expired(&entry)
                {
                    return Ok(Loaded::stored(Arc::new(entry)));
                }
                if let Some(lease) = coordinator.try_acquire(&key).await? {
                    telemetry::populate("took_over");
                    tracing::info!(%key, "took over a populate whose holder went away without announcing");
                    drop(ticket);
                    return self.run_as_winner(lease, &key, context, url, first.take()).await;
                }
            }
            if let Some(entry) = self.read_cached(&self.db, &context.scope, url).await?
                && !self.is_expired(&entry)
            {
                return Ok(Loaded::stored(Arc::new(entry)));
            }
            // The winner left no row and said why (not found, its renderer failed): that is
            // this process's answer too, rather than a render of its own.
            if let Some(outcome) = ticket.outcome() {
                return Err(outcome.to_error());
            }
        }
        let last = match last_wait {
            Woken::TimedOut => format!("the last wait timed out after {:?}", settings.wait_timeout),
            _ => "the last winner left no usable row (its render failed, or the module does \
                  not exist), and another took the lock again"
                .to_owned(),
        };
        Err(LookupError::PopulateFailed {
            key: key.to_string(),
            reason: format!("another process held its lock through {rounds} rounds; {last}"),
        })
    }

    /// Runs the load as the holder of `key`'s lock, on the lease's connection, and releases
    /// the lease (which announces the key) whatever the outcome.
    async fn run_as_winner(
        &self,
        lease: C::Lease,
        key: &crate::populate::PopulateKey,
        context: &Context,
        url: &str,
        first: Option<Snapshot>,
    ) -> SharedResult {
        // A snapshot taken now still precedes every read of this load.
        let snapshot = first.unwrap_or_else(|| self.generations.snapshot());
        let outcome = self.run_load(&lease, context, url, snapshot, true).await;
        let released = match outcome.as_ref().err().and_then(NoRow::from_error) {
            Some(no_row) => lease.release_without_row(&no_row).await,
            None => lease.release().await,
        };
        if let Err(error) = released {
            // The load's writes were in the lease's transaction and are gone with it; the
            // result itself is right, so it is still served.
            tracing::warn!(%key, %error, "releasing the populate lock failed; the result is served but not cached");
            return outcome.map(|loaded| Loaded { stored: false, ..loaded });
        }
        outcome
    }

    /// One pass of BEHAVIOUR §3.5 steps 2–4. The caller already read the cache before the first
    /// attempt, so only re-runs read it again.
    async fn attempt(
        &self,
        store: &impl RowStore,
        context: &Context,
        url: &str,
        snapshot: &Snapshot,
        read_first: bool,
    ) -> Result<Attempt, LookupError> {
        let realm_url = &context.scope.realm_url;
        let stamp = store.begin_load(realm_url, url).await?;
        if read_first
            && let Some(entry) = self.read_cached(store, &context.scope, url).await?
            && !self.is_expired(&entry)
        {
            return Ok(Attempt::Done(Arc::new(entry)));
        }
        for candidate in urls::population_candidates(url) {
            if candidate != url
                && let Some(entry) = self.read_cached(store, &context.scope, &candidate).await?
                && !self.is_expired(&entry)
            {
                return Ok(Attempt::Done(Arc::new(entry)));
            }
            let request = PrerenderRequest {
                module_url: candidate.clone(),
                realm_url: realm_url.clone(),
                user: context.prerender_user.clone(),
            };
            telemetry::prerender();
            let response = self.prerenderer.prerender(&request).await?;
            if is_missing_module(&response, &candidate) {
                continue;
            }
            let entry = Arc::new(self.build_entry(store, context, &candidate, response).await?);

            let _shared = self.persist_gate.read().await;
            let mut checked: Vec<&str> = vec![url, candidate.as_str(), entry.file_alias.as_str()];
            checked.extend(entry.deps.iter().map(String::as_str));
            if !snapshot.is_current(realm_url, &checked) {
                return Ok(Attempt::Discarded(entry));
            }
            return match store.upsert(&entry, stamp).await? {
                PersistOutcome::Written => Ok(Attempt::Done(entry)),
                PersistOutcome::Stale => {
                    telemetry::guard_refusal();
                    Ok(Attempt::Discarded(entry))
                }
            };
        }
        Err(LookupError::ModuleNotFound { url: url.to_owned() })
    }

    /// Turns a prerender response into the row to store; for an error, merges deps and
    /// appends the errors of dependency rows (BEHAVIOUR §3.5).
    async fn build_entry(
        &self,
        store: &impl RowStore,
        context: &Context,
        candidate: &str,
        response: PrerenderResponse,
    ) -> Result<CacheEntry, LookupError> {
        let deps = urls::normalise_deps(candidate, &response.deps);
        let mut entry = CacheEntry {
            url: candidate.to_owned(),
            file_alias: urls::file_alias(candidate),
            cache_scope: context.scope.scope,
            auth_user_id: context.scope.user.clone(),
            resolved_realm_url: context.scope.realm_url.clone(),
            definitions: response.definitions,
            deps,
            error: None,
            created_at: Some(now_ms()),
            diagnostics: response.meta,
        };
        let error = match (response.status, response.error) {
            (PrerenderStatus::Ready, _) => return Ok(entry),
            (PrerenderStatus::Error, Some(error)) => error,
            (PrerenderStatus::Error, None) => crate::types::ErrorDoc::module_error(
                format!("prerender of {candidate} reported an error without details"),
                500,
                Vec::new(),
            ),
        };
        let mut error = error;
        let mut merged = entry.deps.clone();
        for dep in urls::normalise_deps(candidate, &error.error.deps) {
            if !merged.contains(&dep) {
                merged.push(dep);
            }
        }
        error.error.deps = merged.clone();
        entry.deps = merged;
        let found =
            self.dependency_errors(store, &context.scope, &entry.deps, &error.error).await?;
        error.error.additional_errors.extend(found);
        entry.error = Some(error);
        Ok(entry)
    }

    /// Errors of dependency rows, breadth-first through their own deps, skipping `.json`,
    /// de-duplicated by (id, message, status). One batch read per level.
    async fn dependency_errors(
        &self,
        store: &impl RowStore,
        scope: &EntryScope,
        deps: &[String],
        own: &ErrorDetail,
    ) -> Result<Vec<ErrorDetail>, LookupError> {
        let key = |e: &ErrorDetail| (e.id.clone(), e.message.clone(), e.status);
        let mut seen_errors: HashSet<_> = own.additional_errors.iter().map(key).collect();
        seen_errors.insert(key(own));
        let mut visited: HashSet<String> = HashSet::new();
        let mut frontier: VecDeque<String> = deps.iter().cloned().collect();
        let mut found = Vec::new();
        while !frontier.is_empty() {
            let level: Vec<String> = frontier
                .drain(..)
                .filter(|d| !d.ends_with(".json") && visited.insert(d.clone()))
                .collect();
            if level.is_empty() {
                break;
            }
            let mut rows = store.read_rows_batch(scope, &level).await?;
            // Follow the level's order so the appended errors are deterministic.
            rows.sort_by_key(|row| {
                level
                    .iter()
                    .position(|d| *d == row.file_alias || *d == row.url)
                    .unwrap_or(usize::MAX)
            });
            for row in rows {
                if let Some(doc) = &row.error {
                    let mut detail = doc.error.clone();
                    detail.additional_errors.clear();
                    if detail.id.is_none() {
                        detail.id = Some(row.url.clone());
                    }
                    if seen_errors.insert(key(&detail)) {
                        found.push(detail);
                    }
                }
                frontier.extend(row.deps.iter().cloned());
            }
        }
        Ok(found)
    }
}

impl<D: DbAdapter, P: Prerenderer, R: RealmProbe, C: PopulateCoordinator> InvalidationSink
    for CachingLookup<D, P, R, C>
{
    fn bump_modules(&self, realm_url: &str, urls: &[String]) {
        self.inner.bump_modules(realm_url, urls);
    }

    fn bump_realm(&self, realm_url: &str) {
        self.inner.bump_realm(realm_url);
    }

    fn bump_global(&self) {
        self.inner.bump_global();
    }

    /// Invalidations can no longer be heard: the in-process tier is bypassed until the
    /// listener is back (and has replayed what it missed, or resynced).
    fn connection_lost(&self) {
        if let Some(l1) = &self.inner.l1 {
            l1.suspend();
        }
    }

    /// Listening again, the missed invalidations replayed (or everything flushed by a resync):
    /// the tier serves again.
    fn connection_restored(&self) {
        if let Some(l1) = &self.inner.l1 {
            l1.resume();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(url: &str, deps: &[&str]) -> ConsumerRow {
        ConsumerRow {
            url: url.to_owned(),
            file_alias: urls::file_alias(url),
            deps: deps.iter().map(|d| (*d).to_owned()).collect(),
        }
    }

    #[test]
    fn fan_out_matches_the_spec_worked_example() {
        let r = "https://r.test/";
        let consumers = vec![
            row(&format!("{r}deep-card.gts"), &[&format!("{r}middle-field")]),
            row(&format!("{r}middle-field.gts"), &[&format!("{r}leaf-field")]),
        ];
        let list = fan_out(urls::variants(&format!("{r}leaf-field.gts")), consumers);
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
        .map(|s| format!("{r}{s}"))
        .collect();
        assert_eq!(list, expected);
    }

    #[test]
    fn fan_out_terminates_on_cycles() {
        let consumers = vec![row("R/a.gts", &["R/b"]), row("R/b.gts", &["R/a"])];
        let list = fan_out(urls::variants("R/a.gts"), consumers);
        assert_eq!(list.iter().filter(|u| *u == "R/b.gts").count(), 1);
        assert!(list.contains(&"R/b".to_owned()));
    }

    #[test]
    fn missing_module_rule() {
        let candidate = "https://r.test/p.gts";
        assert!(is_missing_module(&PrerenderResponse::missing(candidate), candidate));
        let self_dep = PrerenderResponse::error(
            crate::types::ErrorDoc::module_error("nope", 404, vec!["https://r.test/p".into()]),
            vec![],
        );
        assert!(is_missing_module(&self_dep, candidate));
        let other_dep = PrerenderResponse::error(
            crate::types::ErrorDoc::module_error(
                "dep missing",
                404,
                vec!["https://r.test/q".into()],
            ),
            vec!["https://r.test/q".into()],
        );
        assert!(!is_missing_module(&other_dep, candidate));
        let server = PrerenderResponse::error(
            crate::types::ErrorDoc::module_error("boom", 500, vec![]),
            vec![],
        );
        assert!(!is_missing_module(&server, candidate));
    }
}
