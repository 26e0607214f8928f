//! The in-process tier (L1): a bounded LRU map of recently served entries in front of the
//! database, opt-in through [`LookupConfig::l1`](crate::LookupConfig::l1).
//!
//! Coherence, in order of strength:
//! - only entries the database holds (read from it, or written by the load) are stored: a
//!   result returned unpersisted is in no row, so no fan-out would ever name it;
//! - every invalidation this process makes or hears (a module fan-out, a realm, everything)
//!   removes the entries it covers, and those depending on a name it covers, in the same
//!   synchronous step that bumps the generations (after the backend's DELETE);
//! - an entry is stored only if no such invalidation of it or of one of its dependencies
//!   happened since the lookup that read it took its generation snapshot (checked under the
//!   tier's lock, so a bump either precedes the check and the entry is not stored, or follows
//!   the insert and removes it);
//! - while the listener is disconnected the tier is emptied and bypassed, and it is emptied
//!   again when the listener resyncs (invalidations sent meanwhile were never heard);
//! - an entry older than `max_age` is never served: that bounds what a connection that died
//!   silently (and that the listener's heartbeat has not noticed yet) can cost.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hashlink::LruCache;

use crate::generations::Snapshot;
use crate::key::LoadKey;
use crate::load::Names;
use crate::types::CacheEntry;

/// Settings of the in-process tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Config {
    /// Most entries kept; the least recently used goes first (default 10 000).
    pub capacity: usize,
    /// Oldest an entry may be when served (default 5 s).
    pub max_age: Duration,
}

impl Default for L1Config {
    fn default() -> Self {
        L1Config { capacity: 10_000, max_age: Duration::from_secs(5) }
    }
}

/// Counters of the tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct L1Stats {
    /// Entries held now.
    pub entries: usize,
    /// Lookups served from the tier.
    pub hits: u64,
    /// Lookups that went to the database.
    pub misses: u64,
    /// Entries not stored because an invalidation overtook the lookup that read them.
    pub refused_stale: u64,
    /// Entries dropped because they were older than `max_age`.
    pub expired: u64,
    /// Times the tier was emptied whole (a global bump, a listener resync).
    pub flushes: u64,
    /// Whether the tier is bypassed (the listener is disconnected).
    pub suspended: bool,
}

#[derive(Debug)]
struct Stored {
    entry: Arc<CacheEntry>,
    stored_at: Instant,
}

#[derive(Debug)]
struct State {
    map: LruCache<LoadKey, Stored>,
    suspended: bool,
    stats: L1Stats,
}

/// The tier, keyed like in-process coalescing (scope and requested URL).
#[derive(Debug)]
pub(crate) struct L1 {
    config: L1Config,
    state: Mutex<State>,
}

impl L1 {
    pub(crate) fn new(config: L1Config) -> Self {
        L1 {
            config,
            state: Mutex::new(State {
                map: LruCache::new(config.capacity.max(1)),
                suspended: false,
                stats: L1Stats::default(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry for `key`, if present and young enough.
    pub(crate) fn get(&self, key: &LoadKey) -> Option<Arc<CacheEntry>> {
        let mut state = self.state();
        if state.suspended {
            return None;
        }
        let found = match state.map.get(key) {
            Some(stored) if stored.stored_at.elapsed() <= self.config.max_age => {
                Some(Arc::clone(&stored.entry))
            }
            Some(_) => {
                state.map.remove(key);
                state.stats.expired += 1;
                None
            }
            None => None,
        };
        match found {
            Some(_) => state.stats.hits += 1,
            None => state.stats.misses += 1,
        }
        found
    }

    /// Stores what a lookup that took `snapshot` read, unless an invalidation of it (or of its
    /// realm, or of everything) has happened since.
    pub(crate) fn insert(&self, key: LoadKey, entry: Arc<CacheEntry>, snapshot: &Snapshot) {
        let mut state = self.state();
        if state.suspended {
            return;
        }
        let mut names = vec![key.url.as_str(), entry.url.as_str(), entry.file_alias.as_str()];
        names.extend(entry.deps.iter().map(String::as_str));
        if !snapshot.is_current(&key.scope.realm_url, &names) {
            state.stats.refused_stale += 1;
            return;
        }
        state.map.insert(key, Stored { entry, stored_at: Instant::now() });
    }

    /// Drops the entries of `realm_url` that `names` name (by requested URL, stored URL or
    /// alias) or that depend on one of them directly (so coherence does not rest on the
    /// database's closure alone).
    pub(crate) fn invalidate_modules(&self, realm_url: &str, names: &Names<'_>) {
        let mut state = self.state();
        if state.map.is_empty() {
            return;
        }
        state.map.retain(|key, stored| {
            key.scope.realm_url != realm_url
                || !(names.contains(key.url.as_str())
                    || names.contains(stored.entry.url.as_str())
                    || names.contains(stored.entry.file_alias.as_str())
                    || stored.entry.deps.iter().any(|dep| names.contains(dep.as_str())))
        });
    }

    /// Drops every entry of `realm_url`.
    pub(crate) fn invalidate_realm(&self, realm_url: &str) {
        self.state().map.retain(|key, _| key.scope.realm_url != realm_url);
    }

    /// Drops everything.
    pub(crate) fn flush(&self) {
        let mut state = self.state();
        state.map.clear();
        state.stats.flushes += 1;
    }

    /// Bypasses the tier until [`resume`](Self::resume). What it holds is kept: the
    /// invalidations missed meanwhile are replayed (or everything is flushed) before it
    /// resumes.
    pub(crate) fn suspend(&self) {
        self.state().suspended = true;
    }

    /// Serves from the tier again.
    pub(crate) fn resume(&self) {
        self.state().suspended = false;
    }

    pub(crate) fn stats(&self) -> L1Stats {
        let state = self.state();
        L1Stats { entries: state.map.len(), suspended: state.suspended, ..state.stats }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generations::Generations;
    use crate::types::{CacheScope, EntryScope};

    const REALM: &str = "https://r.test/";

    fn key(url: &str) -> LoadKey {
        let scope =
            EntryScope { realm_url: REALM.into(), scope: CacheScope::Public, user: String::new() };
        LoadKey { scope, url: format!("{REALM}{url}") }
    }

    fn entry(url: &str) -> Arc<CacheEntry> {
        let url = format!("{REALM}{url}");
        Arc::new(CacheEntry {
            file_alias: crate::urls::file_alias(&url),
            url,
            cache_scope: CacheScope::Public,
            auth_user_id: String::new(),
            resolved_realm_url: REALM.into(),
            definitions: Default::default(),
            deps: Vec::new(),
            error: None,
            created_at: Some(0),
            diagnostics: None,
        })
    }

    #[test]
    fn an_entry_read_before_an_invalidation_is_not_stored_after_it() {
        let generations = Arc::new(Generations::default());
        let l1 = L1::new(L1Config::default());
        // A lookup took its snapshot and read the row; an invalidation of that row runs
        // (bump, then the tier's removal, which finds nothing yet); then the lookup stores.
        let snapshot = generations.snapshot();
        generations.bump_modules(REALM, &[format!("{REALM}a")]);
        let a = format!("{REALM}a");
        l1.invalidate_modules(REALM, &Names::from_iter([a.as_str()]));
        l1.insert(key("a.gts"), entry("a.gts"), &snapshot);
        assert!(l1.get(&key("a.gts")).is_none());
        assert_eq!(l1.stats().refused_stale, 1);
        // An unrelated entry with the same snapshot is stored.
        l1.insert(key("b.gts"), entry("b.gts"), &snapshot);
        assert!(l1.get(&key("b.gts")).is_some());
    }

    #[test]
    fn capacity_evicts_the_least_recently_used() {
        let generations = Arc::new(Generations::default());
        let l1 = L1::new(L1Config { capacity: 2, max_age: Duration::from_secs(60) });
        let snapshot = generations.snapshot();
        l1.insert(key("a.gts"), entry("a.gts"), &snapshot);
        l1.insert(key("b.gts"), entry("b.gts"), &snapshot);
        assert!(l1.get(&key("a.gts")).is_some()); // a is now the most recent
        l1.insert(key("c.gts"), entry("c.gts"), &snapshot);
        assert!(l1.get(&key("b.gts")).is_none());
        assert!(l1.get(&key("a.gts")).is_some() && l1.get(&key("c.gts")).is_some());
        assert_eq!(l1.stats().entries, 2);
    }
}
