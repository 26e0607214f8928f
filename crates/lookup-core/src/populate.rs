//! Cross-process populate coalescing (BEHAVIOUR §9): the traits a backend implements, the key, and
//! the in-process registry of waiters that a listener wakes.
//!
//! With a [`PopulateCoordinator`], a cold load first registers a [`PopulateTicket`] for its
//! key, then tries the backend's lock. The winner runs the load on the lock's own connection
//! (the [`PopulateLease`]) and announces the key when it releases the lock, whatever the
//! outcome; a loser waits on its ticket (woken by that announcement, by a listener resync, or
//! by a timeout), re-reads the row, and tries again, at most
//! [`PopulateSettings::max_rounds`] times. Registering before trying the lock is what makes a
//! wake-up impossible to lose: an announcement can only follow the failed try, so it finds the
//! ticket already there.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use crate::error::LookupError;
use crate::traits::RowStore;
use crate::types::EntryScope;

/// The stable 64-bit key of BEHAVIOUR §7: the first 8 bytes, big-endian, of the SHA-256 of the
/// UTF-8 text, as a signed integer. Byte-compatible with the reference's peers.
pub fn populate_key_hash(text: &str) -> i64 {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(text.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// What cross-process coalescing is keyed on: the realm, scope, cache user and requested URL
/// of a load (the same key as in-process coalescing), as text and as its 64-bit hash.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PopulateKey {
    text: String,
    hash: i64,
}

impl PopulateKey {
    /// The key of a load of `url` in `scope`.
    pub fn for_load(scope: &EntryScope, url: &str) -> Self {
        Self::from_text(format!(
            "{}|{}|{}|{}",
            scope.realm_url,
            scope.scope.as_str(),
            scope.user,
            url
        ))
    }

    /// A key from its text (for tests and tools).
    pub fn from_text(text: impl Into<String>) -> Self {
        let text = text.into();
        let hash = populate_key_hash(&text);
        PopulateKey { text, hash }
    }

    /// The key as text (`realm|scope|user|url`, maybe with a coordinator's prefix), as error
    /// messages name it.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The 64-bit hash locked on and announced.
    pub fn hash(&self) -> i64 {
        self.hash
    }
}

impl std::fmt::Display for PopulateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (#{})", self.text, self.hash)
    }
}

/// How long a loser waits and how often it tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PopulateSettings {
    /// How long one wait for the winner's announcement lasts before the loser re-reads and
    /// tries the lock again (default 180 s: longer than a slow prerender).
    pub wait_timeout: Duration,
    /// Rounds of "try the lock, else wait" before the load fails (default 4).
    pub max_rounds: u32,
    /// While waiting, how often a loser that heard nothing re-reads the row and tries the lock
    /// again (default 1 s). A winner that died without announcing (killed, its connection
    /// cut) releases its lock with its session, and the next probe takes over: waiters
    /// answer within about this interval of the death instead of sitting out `wait_timeout`.
    pub probe_interval: Duration,
}

impl Default for PopulateSettings {
    fn default() -> Self {
        PopulateSettings {
            wait_timeout: Duration::from_secs(180),
            max_rounds: 4,
            probe_interval: Duration::from_secs(1),
        }
    }
}

/// How a winner's load ended when it left no row to read: what its waiters in every process
/// answer instead of rendering again, one after another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRow {
    /// No candidate of the module exists ([`LookupError::ModuleNotFound`]).
    NotFound {
        /// The module URL.
        url: String,
    },
    /// The prerenderer itself failed ([`LookupError::Prerender`]), with its message.
    RenderFailed {
        /// The candidate URL.
        url: String,
        /// What the prerenderer reported.
        message: String,
    },
}

impl NoRow {
    /// The outcome a load's error stands for, when it is one that leaves no row and means the
    /// same for every process (a database error does not: it is this process's).
    pub fn from_error(error: &LookupError) -> Option<NoRow> {
        match error {
            LookupError::ModuleNotFound { url } => Some(NoRow::NotFound { url: url.clone() }),
            LookupError::Prerender { url, source } => {
                Some(NoRow::RenderFailed { url: url.clone(), message: source.to_string() })
            }
            _ => None,
        }
    }

    /// The error a waiter answers with.
    pub fn to_error(&self) -> LookupError {
        match self {
            NoRow::NotFound { url } => LookupError::ModuleNotFound { url: url.clone() },
            NoRow::RenderFailed { url, message } => LookupError::Prerender {
                url: url.clone(),
                source: crate::SharedError::from(Box::<dyn std::error::Error + Send + Sync>::from(
                    format!("(rendered by another process) {message}"),
                )),
            },
        }
    }
}

/// The row operations of a load, on the connection that holds a won populate lock, and the
/// release of that lock.
pub trait PopulateLease: RowStore {
    /// Makes the load's writes visible, announces the key (waking every waiter in every
    /// process) and releases the lock. Called whether the load succeeded or failed: losers
    /// must not sit out a timeout. An implementation must also announce and release when the
    /// lease is dropped without this call (a panicking or cancelled load).
    fn release(self) -> impl Future<Output = Result<(), LookupError>> + Send;

    /// [`release`](Self::release) for a load that left no row, telling the waiters how it
    /// ended ([`PopulateSink::key_outcome`]) so that they answer the same instead of each
    /// rendering again. The default only releases.
    fn release_without_row(
        self,
        outcome: &NoRow,
    ) -> impl Future<Output = Result<(), LookupError>> + Send
    where
        Self: Sized,
    {
        let _ = outcome;
        self.release()
    }
}

/// A cross-process lock per cold key, and the waiters of the keys this process lost.
pub trait PopulateCoordinator: Send + Sync + 'static {
    /// The lease a won lock comes with.
    type Lease: PopulateLease;

    /// This process's waiters; the listener wakes them (see [`PopulateSink`]).
    fn signals(&self) -> &Arc<PopulateSignals>;

    /// Timeouts and rounds.
    fn settings(&self) -> PopulateSettings;

    /// The key of a load of `url` in `scope`. Override to keep coordinators that share a lock
    /// space apart (Postgres advisory locks are per database, not per schema).
    fn key(&self, scope: &EntryScope, url: &str) -> PopulateKey {
        PopulateKey::for_load(scope, url)
    }

    /// Tries the lock of `key` without waiting: `Some` when this process won it.
    fn try_acquire(
        &self,
        key: &PopulateKey,
    ) -> impl Future<Output = Result<Option<Self::Lease>, LookupError>> + Send;
}

/// Where a listener delivers populate announcements (the `module_cache_populated` channel).
///
/// Synchronous, like [`InvalidationSink`](crate::InvalidationSink): waking is just a signal.
pub trait PopulateSink: Send + Sync + 'static {
    /// A peer (or this process) announced `key_hash` populated.
    fn key_populated(&self, key_hash: i64);
    /// Announcements may have been missed (a reconnect): every waiter should re-read the row
    /// and try the lock now, as its periodic probe does (without ending its round).
    fn wake_all(&self);
    /// The winner of `key_hash` left no row, for this reason; its announcement follows. The
    /// default ignores it (waiters then try for themselves).
    fn key_outcome(&self, key_hash: i64, outcome: NoRow) {
        let _ = (key_hash, outcome);
    }
}

/// The lookup's coordinator type when it has none; it cannot be constructed.
#[derive(Debug, Clone, Copy)]
pub enum Uncoordinated {}

/// The lease of [`Uncoordinated`]; it cannot be constructed.
#[derive(Debug)]
pub enum NoLease {}

impl RowStore for NoLease {
    async fn read_rows(
        &self,
        _: &EntryScope,
        _: &str,
        _: &str,
    ) -> Result<Vec<crate::CacheEntry>, LookupError> {
        match *self {}
    }

    async fn read_rows_batch(
        &self,
        _: &EntryScope,
        _: &[String],
    ) -> Result<Vec<crate::CacheEntry>, LookupError> {
        match *self {}
    }

    async fn upsert(
        &self,
        _: &crate::CacheEntry,
        _: crate::LoadStamp,
    ) -> Result<crate::PersistOutcome, LookupError> {
        match *self {}
    }
}

impl PopulateLease for NoLease {
    async fn release(self) -> Result<(), LookupError> {
        match self {}
    }
}

impl PopulateCoordinator for Uncoordinated {
    type Lease = NoLease;

    fn signals(&self) -> &Arc<PopulateSignals> {
        match *self {}
    }

    fn settings(&self) -> PopulateSettings {
        match *self {}
    }

    async fn try_acquire(&self, _: &PopulateKey) -> Result<Option<NoLease>, LookupError> {
        match *self {}
    }
}

/// How a wait on a [`PopulateTicket`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// The key was announced: re-read.
    Signalled,
    /// Announcements may have been missed (the listener reconnected): probe now (re-read,
    /// try the lock) and keep waiting if the key is still held.
    Recheck,
    /// Nothing came within the timeout.
    TimedOut,
    /// The registry was shut down: stop waiting for good.
    ShutDown,
}

/// Counters of a [`PopulateSignals`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PopulateSignalStats {
    /// Announcements received (for any key, waited on or not).
    pub announcements: u64,
    /// Announcements that woke at least one ticket.
    pub announcements_matched: u64,
    /// Times every waiter was asked to recheck at once (listener reconnects).
    pub wake_alls: u64,
    /// Waits that ended on a signal.
    pub waits_signalled: u64,
    /// Waits that ended on their timeout.
    pub waits_timed_out: u64,
}

#[derive(Debug)]
struct KeyWaiters {
    tickets: usize,
    /// Bumped on every signal for the key; a ticket waits for a change after registering.
    signal: watch::Sender<u64>,
    /// The last winner's outcome when it left no row, with the signal count it was told at.
    outcome: Option<(u64, NoRow)>,
}

#[derive(Debug, Default)]
struct SignalsState {
    keys: HashMap<i64, KeyWaiters>,
    shut_down: bool,
    /// Bumped by [`PopulateSink::wake_all`]: every ticket rechecks.
    recheck: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct SignalCounters {
    announcements: AtomicU64,
    announcements_matched: AtomicU64,
    wake_alls: AtomicU64,
    waits_signalled: AtomicU64,
    waits_timed_out: AtomicU64,
}

/// This process's registry of populate waiters, keyed by key hash. Memory is bounded by the
/// waiters present: a key's entry goes with its last ticket.
#[derive(Debug, Default)]
pub struct PopulateSignals {
    state: Mutex<SignalsState>,
    counters: SignalCounters,
}

impl PopulateSignals {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, SignalsState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers interest in `key` now; signals sent from this moment on wake the ticket,
    /// even if its [`wait`](PopulateTicket::wait) starts later.
    pub fn register(self: &Arc<Self>, key: &PopulateKey) -> PopulateTicket {
        let mut state = self.state();
        let shut_down = state.shut_down;
        let waiters = state.keys.entry(key.hash()).or_insert_with(|| KeyWaiters {
            tickets: 0,
            signal: watch::channel(0).0,
            outcome: None,
        });
        waiters.tickets += 1;
        let signal = waiters.signal.subscribe();
        let registered_at = *signal.borrow();
        let recheck = state.recheck.subscribe();
        PopulateTicket {
            signals: Arc::clone(self),
            key: key.clone(),
            signal,
            recheck,
            registered_at,
            shut_down_at_registration: shut_down,
        }
    }

    /// Number of tickets registered (waiting or about to wait).
    pub fn waiting(&self) -> usize {
        self.state().keys.values().map(|w| w.tickets).sum()
    }

    /// Number of tickets registered for `key`.
    pub fn waiting_on(&self, key: &PopulateKey) -> usize {
        self.state().keys.get(&key.hash()).map_or(0, |w| w.tickets)
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub fn is_shut_down(&self) -> bool {
        self.state().shut_down
    }

    /// Releases every waiter for good: current and future waits end with [`Woken::ShutDown`].
    pub fn shutdown(&self) {
        let mut state = self.state();
        state.shut_down = true;
        for waiters in state.keys.values() {
            waiters.signal.send_modify(|n| *n += 1);
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> PopulateSignalStats {
        let c = &self.counters;
        PopulateSignalStats {
            announcements: c.announcements.load(Ordering::Relaxed),
            announcements_matched: c.announcements_matched.load(Ordering::Relaxed),
            wake_alls: c.wake_alls.load(Ordering::Relaxed),
            waits_signalled: c.waits_signalled.load(Ordering::Relaxed),
            waits_timed_out: c.waits_timed_out.load(Ordering::Relaxed),
        }
    }

    fn unregister(&self, hash: i64) {
        let mut state = self.state();
        if let Some(waiters) = state.keys.get_mut(&hash) {
            waiters.tickets -= 1;
            if waiters.tickets == 0 {
                state.keys.remove(&hash);
            }
        }
    }
}

impl PopulateSink for PopulateSignals {
    fn key_populated(&self, key_hash: i64) {
        self.counters.announcements.fetch_add(1, Ordering::Relaxed);
        if let Some(waiters) = self.state().keys.get(&key_hash) {
            self.counters.announcements_matched.fetch_add(1, Ordering::Relaxed);
            waiters.signal.send_modify(|n| *n += 1);
        }
    }

    fn wake_all(&self) {
        self.counters.wake_alls.fetch_add(1, Ordering::Relaxed);
        self.state().recheck.send_modify(|n| *n += 1);
    }

    fn key_outcome(&self, key_hash: i64, outcome: NoRow) {
        if let Some(waiters) = self.state().keys.get_mut(&key_hash) {
            let mut told_at = 0;
            waiters.signal.send_modify(|n| {
                *n += 1;
                told_at = *n;
            });
            waiters.outcome = Some((told_at, outcome));
        }
    }
}

/// One registered wait for a key. Dropping it unregisters.
#[derive(Debug)]
pub struct PopulateTicket {
    signals: Arc<PopulateSignals>,
    key: PopulateKey,
    signal: watch::Receiver<u64>,
    /// See [`SignalsState::recheck`].
    recheck: watch::Receiver<u64>,
    /// The signal count when the ticket was registered: outcomes told later are for it.
    registered_at: u64,
    shut_down_at_registration: bool,
}

impl PopulateTicket {
    /// The key waited on.
    pub fn key(&self) -> &PopulateKey {
        &self.key
    }

    /// Waits for a signal sent since registration (or since the previous wait ended), at
    /// most `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> Woken {
        let woken = self.wait_part(timeout).await;
        self.count(woken);
        woken
    }

    /// Waits like [`wait`](Self::wait), at most `slice`, as one part of a longer wait: a
    /// timeout is not counted in the stats (the caller probes, then waits on, and calls
    /// [`count`](Self::count) once the whole wait has ended).
    pub async fn wait_part(&mut self, slice: Duration) -> Woken {
        if self.shut_down_at_registration || self.signals.is_shut_down() {
            return Woken::ShutDown;
        }
        // Both senders live in the registry as long as this ticket does. A key's signal wins
        // over a recheck that came with it.
        let mut signal = std::pin::pin!(self.signal.changed());
        let mut recheck = std::pin::pin!(self.recheck.changed());
        let either = std::future::poll_fn(|cx| {
            if signal.as_mut().poll(cx).is_ready() {
                std::task::Poll::Ready(Woken::Signalled)
            } else if recheck.as_mut().poll(cx).is_ready() {
                std::task::Poll::Ready(Woken::Recheck)
            } else {
                std::task::Poll::Pending
            }
        });
        let woken = tokio::time::timeout(slice, either).await.unwrap_or(Woken::TimedOut);
        if self.signals.is_shut_down() {
            return Woken::ShutDown;
        }
        woken
    }

    /// How the winner's load ended, when a winner left no row after this ticket was
    /// registered and said why.
    pub fn outcome(&self) -> Option<NoRow> {
        let state = self.signals.state();
        let (told_at, outcome) = state.keys.get(&self.key.hash())?.outcome.as_ref()?;
        (*told_at > self.registered_at).then(|| outcome.clone())
    }

    /// Counts how a whole wait ended in the stats (`waits_signalled`, `waits_timed_out`).
    pub fn count(&self, woken: Woken) {
        let counter = match woken {
            Woken::TimedOut => &self.signals.counters.waits_timed_out,
            Woken::Signalled => &self.signals.counters.waits_signalled,
            Woken::Recheck | Woken::ShutDown => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for PopulateTicket {
    fn drop(&mut self) {
        self.signals.unregister(self.key.hash());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(30);

    #[test]
    fn the_hash_is_the_first_eight_bytes_of_sha256_big_endian() {
        // SHA-256("abc") = ba7816bf 8f01cfea …
        assert_eq!(
            populate_key_hash("abc"),
            i64::from_be_bytes(*b"\xba\x78\x16\xbf\x8f\x01\xcf\xea")
        );
        assert_eq!(PopulateKey::from_text("abc").hash(), populate_key_hash("abc"));
        assert_ne!(populate_key_hash("a"), populate_key_hash("b"));
    }

    #[tokio::test]
    async fn a_signal_sent_between_registration_and_wait_is_not_lost() {
        let signals = Arc::new(PopulateSignals::new());
        let key = PopulateKey::from_text("k");
        let mut ticket = signals.register(&key);
        signals.key_populated(key.hash());
        assert_eq!(tokio::time::timeout(LONG, ticket.wait(LONG)).await, Ok(Woken::Signalled));
        assert_eq!(signals.stats().announcements_matched, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn another_keys_signal_does_not_wake_and_the_wait_times_out() {
        let signals = Arc::new(PopulateSignals::new());
        let mut ticket = signals.register(&PopulateKey::from_text("mine"));
        signals.key_populated(PopulateKey::from_text("theirs").hash());
        assert_eq!(ticket.wait(Duration::from_secs(5)).await, Woken::TimedOut);
        assert_eq!(signals.stats().waits_timed_out, 1);
        assert_eq!(signals.stats().announcements_matched, 0);
    }

    #[tokio::test]
    async fn wake_all_and_shutdown_release_every_waiter() {
        let signals = Arc::new(PopulateSignals::new());
        let mut a = signals.register(&PopulateKey::from_text("a"));
        let mut b = signals.register(&PopulateKey::from_text("b"));
        signals.wake_all();
        assert_eq!(a.wait(LONG).await, Woken::Recheck);
        assert_eq!(b.wait(LONG).await, Woken::Recheck);
        let parked = tokio::spawn(async move { a.wait(LONG).await });
        signals.shutdown();
        assert_eq!(tokio::time::timeout(LONG, parked).await.unwrap().unwrap(), Woken::ShutDown);
        assert_eq!(b.wait(LONG).await, Woken::ShutDown);
        let mut late = signals.register(&PopulateKey::from_text("late"));
        assert_eq!(late.wait(LONG).await, Woken::ShutDown);
    }

    #[test]
    fn a_keys_entry_goes_with_its_last_ticket() {
        let signals = Arc::new(PopulateSignals::new());
        let key = PopulateKey::from_text("k");
        let first = signals.register(&key);
        let second = signals.register(&key);
        assert_eq!(signals.waiting_on(&key), 2);
        drop(first);
        assert_eq!(signals.waiting_on(&key), 1);
        drop(second);
        assert_eq!(signals.waiting(), 0);
        assert!(signals.state().keys.is_empty());
    }
}
