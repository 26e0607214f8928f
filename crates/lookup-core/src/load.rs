//! The load engine: read-through loads (BEHAVIOUR §3.5), in-process coalescing (§3.6), the
//! generation guard and re-runs (§5), cross-process populate coordination (§9), and the bumps
//! that drop the coalescing slots and in-process entries an invalidation covers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::error::LookupError;
use crate::generations::{Generations, Snapshot};
use crate::key::LoadKey;
use crate::l1::{L1, L1Config};
use crate::populate::{NoRow, PopulateCoordinator, PopulateLease, Woken};
use crate::telemetry;
use crate::traits::{DbAdapter, PersistOutcome, Prerenderer, RealmProbe, RowStore};
use crate::types::{
    CacheEntry, CacheScope, EntryScope, ErrorDetail, PrerenderRequest, PrerenderResponse,
    PrerenderStatus, Realm,
};
use crate::urls;

/// The names of an invalidation, hashed (hashbrown's default hasher: a fan-out's tens of
/// thousands of URLs hash several times faster than with std's).
pub(crate) type Names<'a> = hashbrown::HashSet<&'a str>;

/// Tunables of a [`CachingLookup`](crate::CachingLookup).
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
pub(crate) struct Context {
    pub(crate) scope: EntryScope,
    pub(crate) prerender_user: String,
}

/// A registered local realm, with the context its modules are read in, made once at
/// registration (a lookup shares it instead of building one).
pub(crate) struct LocalRealm {
    pub(crate) realm: Realm,
    pub(crate) context: Arc<Context>,
}

impl LocalRealm {
    pub(crate) fn new(realm: Realm) -> Self {
        let (scope, user) = if realm.public {
            (CacheScope::Public, String::new())
        } else {
            (CacheScope::RealmAuth, realm.owner.clone())
        };
        let context = Arc::new(Context {
            scope: EntryScope { realm_url: realm.url.clone(), scope, user },
            prerender_user: realm.owner.clone(),
        });
        LocalRealm { realm, context }
    }
}

impl std::fmt::Debug for LocalRealm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.realm.fmt(f)
    }
}

/// What a load hands its callers: the entry, and whether it is what the database holds (read
/// from it, or written to it). Only such entries may go to the in-process tier: a result
/// returned unpersisted is in no row, so no invalidation's fan-out would ever name it.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub(crate) entry: Arc<CacheEntry>,
    pub(crate) stored: bool,
}

impl Loaded {
    pub(crate) fn stored(entry: Arc<CacheEntry>) -> Self {
        Loaded { entry, stored: true }
    }
}

type SharedResult = Result<Loaded, LookupError>;

#[derive(Debug)]
pub(crate) struct Slot {
    id: u64,
    /// Shared with the load's task, which sends the result; joiners subscribe.
    pub(crate) result: Arc<watch::Sender<Option<SharedResult>>>,
    /// Cancels the load's task ([`CachingLookup::cancel_loads`](crate::CachingLookup::cancel_loads)).
    pub(crate) task: tokio::task::AbortHandle,
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

pub(crate) struct Inner<D, P, R, C> {
    pub(crate) db: D,
    pub(crate) prerenderer: P,
    pub(crate) probe: R,
    pub(crate) coordinator: Option<C>,
    pub(crate) config: LookupConfig,
    pub(crate) l1: Option<L1>,
    pub(crate) realms: RwLock<Vec<LocalRealm>>,
    pub(crate) generations: Arc<Generations>,
    pub(crate) in_flight: Mutex<HashMap<LoadKey, Slot>>,
    pub(crate) next_slot: AtomicU64,
    /// Serialises "check the snapshot, then upsert" (shared) against an invalidation's "compute
    /// the list and delete (one backend call), then bump" (exclusive). The bump comes after the
    /// DELETE, so without it a persist whose check passed before the bump could land after that
    /// DELETE and resurrect the row.
    pub(crate) persist_gate: tokio::sync::RwLock<()>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
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
    pub(crate) fn slots(&self) -> MutexGuard<'_, HashMap<LoadKey, Slot>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn is_expired(&self, entry: &CacheEntry) -> bool {
        if entry.error.is_none() {
            return false;
        }
        let ttl = i64::try_from(self.config.error_ttl.as_millis()).unwrap_or(i64::MAX);
        entry.created_at.is_none_or(|created| now_ms().saturating_sub(created) > ttl)
    }

    /// BEHAVIOUR §3.4 with the deterministic choice: the exact URL first, then the population
    /// candidates of its alias in order, then anything else by URL.
    pub(crate) async fn read_cached(
        &self,
        store: &impl RowStore,
        scope: &EntryScope,
        url: &str,
    ) -> Result<Option<CacheEntry>, LookupError> {
        let alias = urls::alias_of(url);
        let rows = store.read_rows(scope, url, alias).await?;
        if rows.len() <= 1 {
            return Ok(rows.into_iter().next());
        }
        let mut order = vec![url.to_owned()];
        order.extend(urls::population_candidates(alias));
        let rank =
            |row: &CacheEntry| order.iter().position(|u| *u == row.url).unwrap_or(order.len());
        Ok(rows.into_iter().min_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.url.cmp(&b.url))))
    }

    pub(crate) async fn join_or_start(
        self: &Arc<Self>,
        context: Arc<Context>,
        url: String,
        snapshot: Snapshot,
    ) -> SharedResult {
        let key = LoadKey { scope: context.scope.clone(), url: url.clone() };
        let mut result = {
            let mut slots = self.slots();
            match slots.get(&key) {
                Some(slot) => {
                    telemetry::coalesced_waiter();
                    slot.result.subscribe()
                }
                None => {
                    let id = self.next_slot.fetch_add(1, Ordering::Relaxed);
                    let (tx, rx) = watch::channel(None);
                    let tx = Arc::new(tx);
                    let result = Arc::clone(&tx);
                    let inner = Arc::clone(self);
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

    pub(crate) fn bump_modules(&self, realm_url: &str, list: &[String]) {
        self.generations.bump_modules(realm_url, list);
        // Nothing to look up when no load is in flight and there is no in-process tier: the
        // set below costs about a millisecond for a 10 000-module fan-out's 20 000 names. (A
        // slot that appears after this check could as well have appeared just after the drop
        // below, which never covered those.)
        let loads = !self.slots().is_empty();
        if !loads && self.l1.is_none() {
            return;
        }
        // One set of the names for both tiers, built before either lock is taken: a fan-out
        // names up to tens of thousands of URLs, and each in-flight load and in-process entry
        // is looked up in it once (the loads were searched for in the list, under the lock
        // every lookup takes: loads × names).
        let names: Names<'_> = list.iter().map(String::as_str).collect();
        if loads {
            self.drop_slots(|key| {
                key.scope.realm_url != realm_url || !names.contains(key.url.as_str())
            });
        }
        if let Some(l1) = &self.l1 {
            l1.invalidate_modules(realm_url, &names);
        }
    }

    pub(crate) fn bump_realm(&self, realm_url: &str) {
        self.generations.bump_realm(realm_url);
        self.drop_slots(|key| key.scope.realm_url != realm_url);
        if let Some(l1) = &self.l1 {
            l1.invalidate_realm(realm_url);
        }
    }

    pub(crate) fn bump_global(&self) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
