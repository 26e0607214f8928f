//! The stale-write guard of BEHAVIOUR §5, with memory bounded by in-flight work.
//!
//! Instead of keeping one counter per URL forever, every bump advances a single epoch and is
//! remembered only while some load that started before it is still running. A load snapshots
//! the epoch when it starts; it may persist only if no bump of its realm, of the global scope,
//! or of one of the URLs it checks happened after that epoch. "Only equality with a snapshot
//! matters" (BEHAVIOUR §5.4) becomes "only bumps newer than a snapshot matter", which lets us
//! forget a bump as soon as no live snapshot predates it. With no load in flight, nothing is
//! stored, however many URLs are invalidated.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

/// Above this many remembered bumps, they are folded into one global bump. That only costs
/// re-runs of the loads in flight (they are discarded conservatively), never correctness.
const MAX_REMEMBERED_BUMPS: usize = 65_536;

#[derive(Debug, Default)]
struct State {
    /// Advanced by every bump and read by every snapshot.
    epoch: u64,
    /// Epoch of the last global bump that some live snapshot predates.
    global: u64,
    /// Realm URL → epoch of its last remembered bump.
    realms: HashMap<String, u64>,
    /// Realm URL → module URL → epoch of its last remembered bump.
    modules: HashMap<String, HashMap<String, u64>>,
    /// Number of remembered module bumps (the sum of the inner maps' sizes).
    module_count: usize,
    /// Snapshot epoch → number of live snapshots taken at it.
    live: Live,
}

impl State {
    fn bump(&mut self) -> Option<u64> {
        self.epoch += 1;
        // A bump nobody started before cannot make anyone stale: keep nothing.
        (!self.live.is_empty()).then_some(self.epoch)
    }

    fn forget_everything(&mut self) {
        self.global = 0;
        // Replace rather than clear, so a burst does not keep its capacity allocated (and
        // leave alone what holds nothing, as after every lookup in a quiet process).
        if self.realms.capacity() > 0 {
            self.realms = HashMap::new();
        }
        if self.modules.capacity() > 0 {
            self.modules = HashMap::new();
        }
        self.module_count = 0;
    }

    /// Drops bumps no live snapshot predates, then folds the rest into a global bump if there
    /// are still too many.
    fn prune(&mut self) {
        let Some(oldest) = self.live.oldest() else {
            self.forget_everything();
            return;
        };
        self.realms.retain(|_, e| *e > oldest);
        let mut count = 0;
        self.modules.retain(|_, urls| {
            urls.retain(|_, e| *e > oldest);
            count += urls.len();
            !urls.is_empty()
        });
        self.module_count = count;
        if self.module_count + self.realms.len() > MAX_REMEMBERED_BUMPS {
            let epoch = self.epoch;
            self.forget_everything();
            self.global = epoch;
        }
    }
}

/// The epochs of the live snapshots with how many were taken at each, oldest first. A snapshot
/// is taken at the current epoch, which never goes back, so a new one goes at the end (or
/// counts at the last epoch): no allocation per snapshot, as a map's node would be.
#[derive(Debug, Default)]
struct Live {
    epochs: VecDeque<(u64, usize)>,
}

impl Live {
    fn is_empty(&self) -> bool {
        self.epochs.is_empty()
    }

    fn len(&self) -> usize {
        self.epochs.len()
    }

    fn oldest(&self) -> Option<u64> {
        self.epochs.front().map(|&(epoch, _)| epoch)
    }

    fn pin(&mut self, epoch: u64) {
        match self.epochs.back_mut() {
            Some((last, count)) if *last == epoch => *count += 1,
            Some((last, _)) if *last > epoch => {
                // A clone of an older snapshot (whose epoch is live already).
                match self.epochs.binary_search_by_key(&epoch, |&(e, _)| e) {
                    Ok(at) => self.epochs[at].1 += 1,
                    Err(at) => self.epochs.insert(at, (epoch, 1)),
                }
            }
            _ => self.epochs.push_back((epoch, 1)),
        }
    }

    /// Releases one snapshot of `epoch`; `true` when it was the last one at that epoch.
    fn unpin(&mut self, epoch: u64) -> bool {
        let Ok(at) = self.epochs.binary_search_by_key(&epoch, |&(e, _)| e) else {
            return false;
        };
        self.epochs[at].1 -= 1;
        if self.epochs[at].1 > 0 {
            return false;
        }
        self.epochs.remove(at);
        // What a burst of loads needed is not kept once they are gone.
        if self.epochs.is_empty() && self.epochs.capacity() > 64 {
            self.epochs = VecDeque::new();
        }
        true
    }
}

/// Generation tracking shared by a lookup and its listener.
#[derive(Debug, Default)]
pub(crate) struct Generations {
    state: Mutex<State>,
}

impl Generations {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps inconsistent in a way that
        // matters for safety (worst case: extra discards), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes a snapshot; hold it for as long as the load runs.
    pub(crate) fn snapshot(self: &Arc<Self>) -> Snapshot {
        let mut state = self.lock();
        let epoch = state.epoch;
        state.live.pin(epoch);
        Snapshot { generations: Arc::clone(self), epoch }
    }

    /// Records that `urls` of `realm_url` were invalidated.
    pub(crate) fn bump_modules(&self, realm_url: &str, urls: &[String]) {
        let mut state = self.lock();
        let Some(epoch) = state.bump() else { return };
        let realm = state.modules.entry(realm_url.to_owned()).or_default();
        let mut added = 0;
        for url in urls {
            if realm.insert(url.clone(), epoch).is_none() {
                added += 1;
            }
        }
        state.module_count += added;
        if state.module_count + state.realms.len() > MAX_REMEMBERED_BUMPS {
            state.prune();
        }
    }

    /// Records that a whole realm was invalidated.
    pub(crate) fn bump_realm(&self, realm_url: &str) {
        let mut state = self.lock();
        if let Some(epoch) = state.bump() {
            state.realms.insert(realm_url.to_owned(), epoch);
        }
    }

    /// Records that everything was invalidated.
    pub(crate) fn bump_global(&self) {
        let mut state = self.lock();
        if let Some(epoch) = state.bump() {
            state.global = epoch;
        }
    }

    /// Approximate heap bytes held by remembered bumps (for the memory benchmark).
    pub(crate) fn approx_heap_bytes(&self) -> usize {
        let state = self.lock();
        let entry = std::mem::size_of::<(String, u64)>() + 1;
        let mut bytes = state.realms.capacity() * entry
            + state.realms.keys().map(String::capacity).sum::<usize>()
            + state.modules.capacity()
                * (std::mem::size_of::<(String, HashMap<String, u64>)>() + 1)
            + state.live.len() * 3 * std::mem::size_of::<(u64, usize)>();
        for (realm, urls) in &state.modules {
            bytes += realm.capacity() + urls.capacity() * entry;
            bytes += urls.keys().map(String::capacity).sum::<usize>();
        }
        bytes
    }

    /// Number of bumps currently remembered (module and realm).
    #[cfg(test)]
    pub(crate) fn remembered_bumps(&self) -> usize {
        let state = self.lock();
        state.module_count + state.realms.len()
    }
}

/// A load's view of the generations when it started. Dropping it releases what it pinned.
#[derive(Debug)]
pub(crate) struct Snapshot {
    generations: Arc<Generations>,
    epoch: u64,
}

impl Snapshot {
    /// Whether nothing covering `realm_url` or any of `urls` was invalidated since the snapshot.
    pub(crate) fn is_current<S: AsRef<str>>(&self, realm_url: &str, urls: &[S]) -> bool {
        let state = self.generations.lock();
        if state.global > self.epoch {
            return false;
        }
        if state.realms.get(realm_url).is_some_and(|e| *e > self.epoch) {
            return false;
        }
        match state.modules.get(realm_url) {
            Some(bumped) => {
                !urls.iter().any(|u| bumped.get(u.as_ref()).is_some_and(|e| *e > self.epoch))
            }
            None => true,
        }
    }
}

impl Clone for Snapshot {
    /// Another snapshot at the same epoch (pinning what this one pins).
    fn clone(&self) -> Self {
        let mut state = self.generations.lock();
        state.live.pin(self.epoch);
        Snapshot { generations: Arc::clone(&self.generations), epoch: self.epoch }
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let mut state = self.generations.lock();
        if state.live.unpin(self.epoch) {
            // Only the oldest snapshot leaving can make remembered bumps forgettable.
            let oldest_left = state.live.oldest().is_none_or(|e| e > self.epoch);
            if oldest_left {
                state.prune();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &[&str]) -> Vec<String> {
        list.iter().map(|u| (*u).to_owned()).collect()
    }

    #[test]
    fn a_bump_after_the_snapshot_makes_it_stale_only_where_it_applies() {
        let g = Arc::new(Generations::default());
        let snap = g.snapshot();
        g.bump_modules("R/", &urls(&["R/x"]));
        assert!(!snap.is_current("R/", &["R/x"]));
        assert!(snap.is_current("R/", &["R/y"]), "unrelated module must stay current");
        assert!(snap.is_current("S/", &["R/x"]), "same URL in another realm stays current");
        let later = g.snapshot();
        assert!(later.is_current("R/", &["R/x"]), "bumps before a snapshot do not count");
    }

    #[test]
    fn realm_and_global_bumps_cover_everything_below_them() {
        let g = Arc::new(Generations::default());
        let snap = g.snapshot();
        g.bump_realm("R/");
        assert!(!snap.is_current("R/", &["R/x"]));
        assert!(snap.is_current("S/", &["S/x"]));
        g.bump_global();
        assert!(!snap.is_current("S/", &["S/x"]));
    }

    #[test]
    fn nothing_is_remembered_without_loads_in_flight() {
        let g = Arc::new(Generations::default());
        for i in 0..10_000 {
            g.bump_modules("R/", &[format!("R/m{i}")]);
        }
        assert_eq!(g.remembered_bumps(), 0);
        let snap = g.snapshot();
        g.bump_modules("R/", &urls(&["R/a", "R/b"]));
        assert_eq!(g.remembered_bumps(), 2);
        drop(snap);
        assert_eq!(g.remembered_bumps(), 0, "the last snapshot leaving forgets everything");
    }

    #[test]
    fn bumps_older_than_every_live_snapshot_are_pruned() {
        let g = Arc::new(Generations::default());
        let old = g.snapshot();
        g.bump_modules("R/", &urls(&["R/a"]));
        let young = g.snapshot();
        g.bump_modules("R/", &urls(&["R/b"]));
        drop(old);
        assert_eq!(g.remembered_bumps(), 1, "R/a predates the only live snapshot");
        assert!(young.is_current("R/", &["R/a"]));
        assert!(!young.is_current("R/", &["R/b"]));
    }

    #[test]
    fn too_many_bumps_fold_into_a_global_one() {
        let g = Arc::new(Generations::default());
        let snap = g.snapshot();
        for i in 0..(MAX_REMEMBERED_BUMPS + 10) {
            g.bump_modules("R/", &[format!("R/m{i}")]);
        }
        assert!(g.remembered_bumps() <= MAX_REMEMBERED_BUMPS);
        assert!(!snap.is_current("S/", &["S/unrelated"]), "folding is conservative");
        let fresh = g.snapshot();
        assert!(fresh.is_current("S/", &["S/unrelated"]));
    }
}
