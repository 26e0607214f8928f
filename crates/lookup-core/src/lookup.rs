//! The caching lookup's public handle, [`CachingLookup`]: constructors, lookups, invalidation
//! and clearing, the local realms, and the [`InvalidationSink`] the listener calls. The loads
//! themselves run in the load engine (`load.rs`).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde_json::Value;

use crate::error::LookupError;
use crate::generations::Generations;
use crate::key::LoadKey;
use crate::l1::{L1, L1Stats};
pub use crate::load::LookupConfig;
use crate::load::{Context, Inner, Loaded, LocalRealm};
use crate::populate::{PopulateCoordinator, Uncoordinated};
use crate::telemetry::{self, Tier};
use crate::traits::{DbAdapter, InvalidationSink, NoRemoteRealms, Prerenderer, RealmProbe};
use crate::types::{CacheEntry, CacheScope, CodeRef, ConsumerRow, EntryScope, Realm};
use crate::urls;
use crate::wire::Invalidation;

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

/// The canonical form of a URL that must be absolute and hierarchical.
fn absolute_url(raw: &str) -> Result<String, LookupError> {
    urls::canonical_hierarchical_url(raw)
        .map_err(|reason| LookupError::InvalidUrl { url: raw.to_owned(), reason })
}

/// An entry a load found: a row just read, which the caller owns, or an entry others may
/// share (a coalesced load's, the in-process tier's). A hit's own row is not put behind an
/// `Arc` only for its definition to be taken back out.
// Boxing the entry would cost the allocation this type saves; a `Found` lives for one call.
#[allow(clippy::large_enum_variant)]
enum Found {
    Own(CacheEntry),
    Shared(Arc<CacheEntry>),
}

impl Found {
    fn into_shared(self) -> Arc<CacheEntry> {
        match self {
            Found::Own(entry) => Arc::new(entry),
            Found::Shared(shared) => shared,
        }
    }
}

/// The key of `name` in the `definitions` of the module whose canonical URL is `url` (what
/// [`CodeRef::definition_key`] gives, without canonicalising the URL again).
fn definition_key(url: &str, name: &str) -> String {
    let alias = urls::alias_of(url);
    let mut key = String::with_capacity(alias.len() + 1 + name.len());
    key.push_str(alias);
    key.push('/');
    key.push_str(name);
    key
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

    /// Approximate heap bytes the generation counters hold for remembered invalidations
    /// (diagnostics: it stays bounded however many invalidations the process sees).
    pub fn generation_state_bytes(&self) -> usize {
        self.inner.generations.approx_heap_bytes()
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
        if realms.iter().any(|r| r.realm.url == url) {
            return Err(LookupError::RealmAlreadyRegistered { url });
        }
        realms.push(LocalRealm::new(Realm { url, ..realm }));
        Ok(())
    }

    /// The registered local realm that owns `url` (the longest registered prefix of its
    /// canonical form), if any.
    pub fn owning_realm(&self, url: &str) -> Option<Realm> {
        self.inner.local_realm(&urls::canonical_url(url))
    }

    /// The registered local realms, in registration order.
    pub fn realms(&self) -> Vec<Realm> {
        let realms = self.inner.realms.read().unwrap_or_else(|p| p.into_inner());
        realms.iter().map(|r| r.realm.clone()).collect()
    }

    /// Looks up one definition, prerendering its module on a miss.
    ///
    /// `for_realm` is the realm the caller acts for; it enables remote realm probing.
    pub async fn lookup_definition(
        &self,
        code_ref: &CodeRef,
        for_realm: Option<&str>,
    ) -> Result<Value, LookupError> {
        let started = Instant::now();
        let url = absolute_url(&code_ref.module)?;
        let key = definition_key(&url, &code_ref.name);
        // An errored module's entry is a `ModuleError`, as from `get_module_entry`.
        let found = self.load_canonical(url, for_realm, started).await?;
        take_definition(found, key)
    }

    /// Looks up one definition from the cache only: `Ok(None)` when no row is cached (or the
    /// module has no realm). Never prerenders.
    pub async fn lookup_cached_definition(
        &self,
        code_ref: &CodeRef,
        for_realm: Option<&str>,
    ) -> Result<Option<Value>, LookupError> {
        let url = absolute_url(&code_ref.module)?;
        let key = definition_key(&url, &code_ref.name);
        match self.cached_canonical(url, for_realm).await? {
            Some(entry) => definition_out_of(entry, key).map(Some),
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
        check_module(&entry)?;
        Ok(entry)
    }

    /// Like [`get_module_entry`](Self::get_module_entry), but an errored module's entry is
    /// returned as `Ok` (its `error` is set).
    pub async fn load_entry(
        &self,
        module_url: &str,
        for_realm: Option<&str>,
    ) -> Result<Arc<CacheEntry>, LookupError> {
        let started = Instant::now();
        let url = absolute_url(module_url)?;
        Ok(self.load_canonical(url, for_realm, started).await?.into_shared())
    }

    /// [`load_entry`](Self::load_entry) of a canonical URL; `started` is when the call began
    /// (for the metrics).
    async fn load_canonical(
        &self,
        url: String,
        for_realm: Option<&str>,
        started: Instant,
    ) -> Result<Found, LookupError> {
        // BEHAVIOUR §5: the snapshot is taken before the first await, so an invalidation that runs
        // while we resolve the realm still counts against this load.
        let snapshot = self.inner.generations.snapshot();
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
                telemetry::hit(Tier::Db, started);
                return Ok(Found::Own(entry));
            }
            let loaded = self.inner.join_or_start(context, url, snapshot).await?;
            telemetry::miss(started);
            return Ok(Found::Shared(loaded.entry));
        };
        let key = LoadKey { scope: context.scope.clone(), url: url.clone() };
        if let Some(entry) = l1.get(&key) {
            telemetry::hit(Tier::L1, started);
            return Ok(Found::Shared(entry));
        }
        let loaded = match self.inner.read_cached(&self.inner.db, &context.scope, &url).await? {
            Some(entry) if !self.inner.is_expired(&entry) => {
                telemetry::hit(Tier::Db, started);
                Loaded::stored(Arc::new(entry))
            }
            _ => {
                let loaded = self.inner.join_or_start(context, url, snapshot.clone()).await?;
                telemetry::miss(started);
                loaded
            }
        };
        // Errors expire on their own schedule, and a result the database does not hold would
        // be named by no fan-out: only stored, good entries go to the tier.
        if loaded.stored && loaded.entry.error.is_none() {
            l1.insert(key, Arc::clone(&loaded.entry), &snapshot);
        }
        Ok(Found::Shared(loaded.entry))
    }

    /// The cached entry of a module without prerendering: `Ok(None)` when nothing usable is
    /// cached or no realm owns the module. Errored entries are returned as they are stored.
    pub async fn get_cached_entry(
        &self,
        module_url: &str,
        for_realm: Option<&str>,
    ) -> Result<Option<CacheEntry>, LookupError> {
        self.cached_canonical(absolute_url(module_url)?, for_realm).await
    }

    /// [`get_cached_entry`](Self::get_cached_entry) of a canonical URL.
    async fn cached_canonical(
        &self,
        url: String,
        for_realm: Option<&str>,
    ) -> Result<Option<CacheEntry>, LookupError> {
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
                    by_scope.push((context.scope.clone(), Vec::new()));
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
        let started = Instant::now();
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
        let started = Instant::now();
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
        let started = Instant::now();
        let _exclusive = self.inner.persist_gate.write().await;
        let outcome = self.inner.db.apply_invalidation(&Invalidation::Global).await;
        self.inner.bump_global();
        let deleted = outcome?;
        telemetry::invalidation("global", started);
        tracing::debug!(deleted, "cleared all");
        Ok(deleted)
    }
}

/// Orders the invalidation list of BEHAVIOUR §4.1 step 2: the seeds (a module's variants) as
/// given, then consumers breadth-first, each consumer contributing its url then its alias
/// unless already listed (so a cycle ends).
pub fn fan_out(variants: Vec<String>, consumers: Vec<ConsumerRow>) -> Vec<String> {
    walk(variants, consumers, |_, _, _| ()).0
}

/// The rows of a realm that an invalidation list names (by their URL or by their alias), given
/// every row of the realm: as the URLs of those rows, or as every row of the realm but those of
/// some URLs, whichever stands for fewer rows (see [`fan_out_over_realm`]). Either list may
/// hold a URL more than once (rows of one URL in several scopes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RealmRows {
    /// The URL of every row named, in the order of the rows given.
    Urls(Vec<String>),
    /// Every row of the realm except those whose URL is here: the URL of every row not named,
    /// in the order of the rows given, leaving out a URL that a named row also has (rows of one
    /// URL in several scopes), so that no named row is spared.
    AllBut(Vec<String>),
}

/// [`fan_out`] over every row of a realm, and the rows the list names there ([`RealmRows`]):
/// those it reached, the seeds' own, and any other sharing a name. An invalidation deletes
/// exactly those.
pub fn fan_out_over_realm(
    variants: Vec<String>,
    rows: Vec<ConsumerRow>,
) -> (Vec<String>, RealmRows) {
    walk(variants, rows, realm_rows)
}

/// [`fan_out`], and what `named` makes of the rows, of each row's (URL, alias) numbers and of
/// which numbers the list holds, before the names found are moved out of the rows.
fn walk<T>(
    variants: Vec<String>,
    mut rows: Vec<ConsumerRow>,
    named: impl FnOnce(&[ConsumerRow], &[(usize, usize)], &[bool]) -> T,
) -> (Vec<String>, T) {
    // Every name gets a number, hashed once where it occurs: each row's URL, alias and deps,
    // then the seeds. The walk itself then runs on numbers (hashbrown's default hasher,
    // foldhash: a fan-out of 10 000 modules holds some 30 000 names, and std's SipHash took
    // half the walk's time).
    let mut ids: hashbrown::HashMap<&str, usize> =
        hashbrown::HashMap::with_capacity(rows.len() * 3 + variants.len());
    // Each row's (URL, alias) numbers, and its deps' numbers, in order.
    let mut own = Vec::with_capacity(rows.len());
    let mut dep_ids = Vec::with_capacity(rows.len());
    for row in &rows {
        own.push((number(&mut ids, &row.url), number(&mut ids, &row.file_alias)));
        for dep in &row.deps {
            dep_ids.push(number(&mut ids, dep));
        }
    }
    let seeds: Vec<usize> = variants.iter().map(|seed| number(&mut ids, seed)).collect();
    let names = ids.len();
    // The rows depending on each name, as ranges of one list (`starts`), each in URL order
    // (the order in which the consumers of a name join the list).
    let mut starts = vec![0; names + 1];
    for &id in &dep_ids {
        starts[id + 1] += 1;
    }
    for id in 0..names {
        starts[id + 1] += starts[id];
    }
    let mut filled = starts.clone();
    let mut by_dep = vec![0; dep_ids.len()];
    let mut dep_ids = dep_ids.into_iter();
    for (index, row) in rows.iter().enumerate() {
        for id in dep_ids.by_ref().take(row.deps.len()) {
            by_dep[filled[id]] = index;
            filled[id] += 1;
        }
    }
    drop(filled);
    for id in 0..names {
        let consumers = &mut by_dep[starts[id]..starts[id + 1]];
        if consumers.len() > 1 {
            consumers.sort_by(|&a, &b| rows[a].url.cmp(&rows[b].url));
        }
    }
    // The borrows end here (hashbrown's maps, unlike std's, hold theirs until dropped).
    drop(ids);
    // The walk: names by number, each once; a seed listed twice is walked twice, as the
    // list holds it twice (its second walk adds nothing).
    let mut seen = vec![false; names];
    for &id in &seeds {
        seen[id] = true;
    }
    // (row, whether the name is its alias), in list order.
    let mut found: Vec<(usize, bool)> = Vec::with_capacity(rows.len() * 2);
    for next in 0.. {
        let id = match seeds.get(next) {
            Some(&id) => id,
            None => match found.get(next - seeds.len()) {
                Some(&(index, alias)) => {
                    if alias {
                        own[index].1
                    } else {
                        own[index].0
                    }
                }
                None => break,
            },
        };
        for &index in &by_dep[starts[id]..starts[id + 1]] {
            let (url, alias) = own[index];
            for (name, is_alias) in [(url, false), (alias, true)] {
                if !std::mem::replace(&mut seen[name], true) {
                    found.push((index, is_alias));
                }
            }
        }
    }
    let named = named(&rows, &own, &seen);
    // The names found are moved out of their rows, each once.
    let mut list = variants;
    list.reserve(found.len());
    for (index, alias) in found {
        let row = &mut rows[index];
        list.push(std::mem::take(if alias { &mut row.file_alias } else { &mut row.url }));
    }
    (list, named)
}

/// [`RealmRows`] of `rows`, whose (URL, alias) numbers are `own`, for a list that holds the
/// names numbered where `listed` is true.
fn realm_rows(rows: &[ConsumerRow], own: &[(usize, usize)], listed: &[bool]) -> RealmRows {
    let named: Vec<bool> = own.iter().map(|&(url, alias)| listed[url] || listed[alias]).collect();
    let count = named.iter().filter(|&&named| named).count();
    if count <= rows.len() - count {
        let urls = rows.iter().zip(&named).filter(|(_, named)| **named);
        return RealmRows::Urls(urls.map(|(row, _)| row.url.clone()).collect());
    }
    // A URL is spared only if no row of it is named.
    let mut spared = vec![true; listed.len()];
    for (&(url, _), &named) in own.iter().zip(&named) {
        if named {
            spared[url] = false;
        }
    }
    let kept = rows.iter().zip(own).filter(|(_, (url, _))| spared[*url]);
    RealmRows::AllBut(kept.map(|(row, _)| row.url.clone()).collect())
}

/// The number of `name` in `ids`, a new one if it has none yet.
fn number<'a>(ids: &mut hashbrown::HashMap<&'a str, usize>, name: &'a str) -> usize {
    let fresh = ids.len();
    *ids.entry(name).or_insert(fresh)
}

/// The definition under `key` (see [`definition_key`]) in `entry`.
fn definition_from(entry: &CacheEntry, key: String) -> Result<Value, LookupError> {
    check_module(entry)?;
    let found = entry.definitions.get(&key);
    judge(found, key)?;
    Ok(found.cloned().unwrap_or_default())
}

/// [`definition_from`], taking the definition out of the entry instead of copying it when
/// nobody else holds the entry: a row just read (a hit without the in-process tier), or a
/// load's result that no other caller joined.
fn take_definition(entry: Found, key: String) -> Result<Value, LookupError> {
    match entry {
        Found::Own(entry) => definition_out_of(entry, key),
        Found::Shared(shared) => match Arc::try_unwrap(shared) {
            Ok(entry) => definition_out_of(entry, key),
            Err(shared) => definition_from(&shared, key),
        },
    }
}

/// [`definition_from`] an entry of our own, moved out of it (the key is hashed once).
fn definition_out_of(mut entry: CacheEntry, key: String) -> Result<Value, LookupError> {
    check_module(&entry)?;
    let found = entry.definitions.remove(&key);
    judge(found.as_ref(), key)?;
    Ok(found.unwrap_or_default())
}

/// The error a lookup in `entry` returns if its module errored (`LookupError::ModuleError`).
fn check_module(entry: &CacheEntry) -> Result<(), LookupError> {
    match &entry.error {
        Some(error) => {
            Err(LookupError::ModuleError { url: entry.url.clone(), error: Box::new(error.clone()) })
        }
        None => Ok(()),
    }
}

/// The error of a lookup of `key` that `found` under it, if it is not a good definition.
fn judge(found: Option<&Value>, key: String) -> Result<(), LookupError> {
    let Some(value) = found else {
        return Err(LookupError::DefinitionNotFound { key });
    };
    if value.get("type").and_then(Value::as_str) == Some("definition") {
        return Ok(());
    }
    let message = value
        .pointer("/error/message")
        .or_else(|| value.get("message"))
        .and_then(Value::as_str)
        .unwrap_or("unknown error")
        .to_owned();
    Err(LookupError::DefinitionError { key, message })
}

impl<D: DbAdapter, P: Prerenderer, R: RealmProbe, C: PopulateCoordinator> Inner<D, P, R, C> {
    /// The registered realm that owns `url`: the one with the longest URL prefix, so a realm
    /// nested in another's URL space owns its own modules (and its rows are filed under it,
    /// where clearing it finds them).
    pub(crate) fn local_realm(&self, url: &str) -> Option<Realm> {
        self.owner_of(url, |local| local.realm.clone())
    }

    /// What `map` makes of the registered realm that owns `url` (see
    /// [`local_realm`](Self::local_realm)), read under the lock.
    fn owner_of<T>(&self, url: &str, map: impl FnOnce(&LocalRealm) -> T) -> Option<T> {
        let realms = self.realms.read().unwrap_or_else(|p| p.into_inner());
        realms
            .iter()
            .filter(|r| urls::is_under(url, &r.realm.url))
            .max_by_key(|r| r.realm.url.len())
            .map(map)
    }

    /// BEHAVIOUR §3.2: a local realm decides; otherwise, for a caller acting for a local realm, the
    /// remote probe does. A failing probe is logged and means "no context".
    pub(crate) async fn context(
        &self,
        url: &str,
        for_realm: Option<&str>,
    ) -> Result<Option<Arc<Context>>, LookupError> {
        if let Some(context) = self.owner_of(url, |local| Arc::clone(&local.context)) {
            return Ok(Some(context));
        }
        let Some(requesting) = for_realm.map(urls::canonical_url) else {
            return Ok(None);
        };
        let owner = {
            let realms = self.realms.read().unwrap_or_else(|p| p.into_inner());
            match realms.iter().find(|r| r.realm.url == requesting) {
                Some(local) => local.realm.owner.clone(),
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
                Ok(Some(Arc::new(Context {
                    scope: EntryScope { realm_url: found.resolved_realm_url, scope, user },
                    prerender_user: owner,
                })))
            }
            Ok(None) => Ok(None),
            Err(error) => {
                tracing::warn!(module = %url, %error, "remote realm probe failed");
                Ok(None)
            }
        }
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

    /// Every way a definition is taken out of an entry (moved out of one of its own, out of a
    /// shared one nobody else holds, copied from a shared one) gives the same verdict: the
    /// definition, the module's error, a definition error with its message, or none found.
    #[test]
    fn every_way_of_taking_a_definition_gives_the_same_verdict() {
        let url = "https://r.test/card.gts";
        let mut definitions = serde_json::Map::new();
        definitions.insert("good".into(), serde_json::json!({"type": "definition", "n": 1}));
        let nested = serde_json::json!({"type": "error", "error": {"message": "bad field"}});
        definitions.insert("nested".into(), nested);
        definitions.insert("flat".into(), serde_json::json!({"type": "error", "message": "flat"}));
        definitions.insert("bare".into(), serde_json::json!({"type": "error"}));
        let entry = CacheEntry {
            url: url.into(),
            file_alias: urls::file_alias(url),
            cache_scope: crate::CacheScope::Public,
            auth_user_id: String::new(),
            resolved_realm_url: "https://r.test/".into(),
            definitions,
            deps: Vec::new(),
            error: None,
            created_at: Some(1),
            diagnostics: None,
        };
        let verdict = |result: Result<Value, LookupError>| match result {
            Ok(value) => format!("ok {value}"),
            Err(LookupError::DefinitionError { key, message }) => format!("error {key}: {message}"),
            Err(LookupError::DefinitionNotFound { key }) => format!("none {key}"),
            Err(LookupError::ModuleError { url, error }) => {
                format!("module {url}: {}", error.error.message)
            }
            Err(other) => format!("other {other}"),
        };
        let expected = [
            ("good", r#"ok {"type":"definition","n":1}"#),
            ("nested", "error nested: bad field"),
            ("flat", "error flat: flat"),
            ("bare", "error bare: unknown error"),
            ("missing", "none missing"),
        ];
        let mut errored = entry.clone();
        errored.error = Some(crate::ErrorDoc::module_error("it broke", 500, Vec::new()));
        let cases = expected
            .iter()
            .map(|(key, want)| (entry.clone(), *key, want.to_string()))
            .chain(std::iter::once((errored, "good", format!("module {url}: it broke"))));
        for (entry, key, want) in cases {
            let shared = Arc::new(entry.clone());
            let held = Arc::clone(&shared);
            let ways = [
                take_definition(Found::Own(entry.clone()), key.into()),
                take_definition(Found::Shared(Arc::new(entry)), key.into()),
                take_definition(Found::Shared(shared), key.into()),
            ];
            for (way, result) in ways.into_iter().enumerate() {
                assert_eq!(verdict(result), want, "way {way}, key {key}");
            }
            assert_eq!(held.definitions.len(), 4, "a shared entry keeps its definitions");
        }
    }

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

    /// BEHAVIOUR §4.1 step 2 read literally: a queue of names; for each, the rows whose deps
    /// hold it, in URL order (rows of one URL in their given order), each adding its URL then
    /// its alias unless already listed.
    fn fan_out_by_the_book(variants: Vec<String>, consumers: &[ConsumerRow]) -> Vec<String> {
        let mut list = variants;
        let mut next = 0;
        while next < list.len() {
            let name = list[next].clone();
            let mut rows: Vec<&ConsumerRow> =
                consumers.iter().filter(|row| row.deps.contains(&name)).collect();
            rows.sort_by(|a, b| a.url.cmp(&b.url));
            for row in rows {
                for added in [&row.url, &row.file_alias] {
                    if !list.contains(added) {
                        list.push(added.clone());
                    }
                }
            }
            next += 1;
        }
        list
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Small names, so that graphs have shared deps, cycles, rows of one URL in several
        /// scopes, URLs equal to another row's alias, and seeds listed twice.
        #[test]
        fn fan_out_lists_what_the_spec_lists(
            seeds in proptest::collection::vec("[a-e]{1,2}", 1..4),
            rows in proptest::collection::vec(
                ("[a-f]{1,2}", "[a-f]{1,2}", proptest::collection::vec("[a-f]{1,2}", 0..4)),
                0..24,
            ),
        ) {
            let consumers: Vec<ConsumerRow> = rows
                .into_iter()
                .map(|(url, file_alias, deps)| ConsumerRow { url, file_alias, deps })
                .collect();
            let expected = fan_out_by_the_book(seeds.clone(), &consumers);
            let named: Vec<String> = consumers
                .iter()
                .filter(|row| expected.contains(&row.url) || expected.contains(&row.file_alias))
                .map(|row| row.url.clone())
                .collect();
            let unnamed = consumers.len() - named.len();
            let rows = if named.len() <= unnamed {
                RealmRows::Urls(named)
            } else {
                // Every URL of a row not named, unless a named row has it too.
                let spared = consumers.iter().filter(|row| !named.contains(&row.url));
                RealmRows::AllBut(spared.map(|row| row.url.clone()).collect())
            };
            let both = fan_out_over_realm(seeds.clone(), consumers.clone());
            proptest::prop_assert_eq!(fan_out(seeds, consumers), expected.clone());
            proptest::prop_assert_eq!(both, (expected, rows));
        }
    }
}
