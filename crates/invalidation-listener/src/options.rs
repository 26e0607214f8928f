//! Tuning knobs, and the reconnect backoff they drive.

use std::sync::Arc;
use std::time::Duration;

use adapter_pg::{PgPopulateCoordinator, PopulateCoordinator as _, PopulateSink};

/// How the listener reconnects and checks its connection. The defaults suit production;
/// tests shorten the backoff.
#[derive(Clone)]
pub struct ListenerOptions {
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) heartbeat_timeout: Duration,
    pub(crate) event_capacity: usize,
    pub(crate) populate: Option<Arc<dyn PopulateSink>>,
    pub(crate) poll: Option<Duration>,
    pub(crate) untracked_writers: bool,
}

impl std::fmt::Debug for ListenerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerOptions")
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("event_capacity", &self.event_capacity)
            .field("populate", &self.populate.is_some())
            .field("poll", &self.poll)
            .field("untracked_writers", &self.untracked_writers)
            .finish()
    }
}

impl Default for ListenerOptions {
    fn default() -> Self {
        ListenerOptions {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(10),
            event_capacity: 256,
            populate: None,
            poll: None,
            untracked_writers: false,
        }
    }
}

impl ListenerOptions {
    /// Reconnect delays start at `initial` (default 100 ms) and double up to `max`
    /// (default 5 s), each with jitter. `initial` is at least 1 ms so a server that is down
    /// is never retried in a busy loop; `max` is at least `initial`.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial.max(Duration::from_millis(1));
        self.max_backoff = max.max(self.initial_backoff);
        self
    }

    /// An idle connection is probed with `SELECT 1` every `interval` (default 30 s); no
    /// answer within `timeout` (default 10 s) counts as a lost connection. Without it, a
    /// connection silently dropped by a NAT or firewall would wait for notifications forever.
    pub fn heartbeat(mut self, interval: Duration, timeout: Duration) -> Self {
        self.heartbeat_interval = interval.max(Duration::from_millis(1));
        self.heartbeat_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How many events a slow [`subscribe`](crate::PgInvalidationListener::subscribe)r may
    /// fall behind before it sees `RecvError::Lagged` (default 256). Until the first
    /// subscription, up to this many events are kept for it.
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = capacity.max(1);
        self
    }

    /// Follows the invalidation log by reading it every `interval` instead of `LISTEN`ing:
    /// for where no connection can `LISTEN` (only a transaction pooler is reachable, a
    /// serverless front end). Same sink, same events; an invalidation is replayed about one
    /// interval plus one read after it commits at worst. The connection is the config's own URL
    /// (not its listener URL), and each poll is one self-contained statement, so it works
    /// through PgBouncer in transaction mode. The interval is at least 1 ms.
    ///
    /// What polling cannot do: populate announcements are not in the log, so with
    /// [`populate`](Self::populate) waiters learn of a finished winner by their own probe
    /// (every `PopulateSettings::probe_interval`); and the log does not say who invalidated,
    /// so this process's own invalidations are replayed too (harmless: at worst a load that
    /// started after one re-runs). Refused with [`untracked_writers`](Self::untracked_writers):
    /// their invalidations are not in the log at all.
    pub fn poll(mut self, interval: Duration) -> Self {
        self.poll = Some(interval.max(Duration::from_millis(1)));
        self
    }

    /// Says that writers which do not record their invalidations in the durable guard's log
    /// may share the database (the reference system's servers, or deflookup processes with
    /// the durable guard off). The log then cannot prove what was missed while the connection
    /// was down, so every reconnect resyncs (bumps everything) instead of catching up. Off by
    /// default; a config whose durable guard is off implies it.
    pub fn untracked_writers(mut self, on: bool) -> Self {
        self.untracked_writers = on;
        self
    }

    /// Wakes the waiters of `coordinator` (the process's cross-process populate coordinator):
    /// [`populate`](Self::populate) with its signals.
    pub fn coordinator(self, coordinator: &PgPopulateCoordinator) -> Self {
        let signals: Arc<dyn PopulateSink> = coordinator.signals().clone();
        self.populate(signals)
    }

    /// Also `LISTEN`s on the config's populate channel (BEHAVIOUR §9) on the same connection and
    /// wakes `sink`'s waiters: one key per announcement, and all of them after a reconnect
    /// (announcements sent while away are lost) and when the listener stops.
    pub fn populate(mut self, sink: Arc<dyn PopulateSink>) -> Self {
        self.populate = Some(sink);
        self
    }
}

/// Capped exponential backoff with "equal jitter": each delay is half the capped exponential
/// step plus a random part of the other half, so processes that lost the same server spread
/// their reconnects out, yet none hammers it at once.
#[derive(Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    /// Randomly seeded per backoff; enough for jitter.
    random: fastrand::Rng,
}

impl Backoff {
    pub(crate) fn new(options: &ListenerOptions) -> Self {
        Backoff {
            initial: options.initial_backoff,
            max: options.max_backoff,
            attempt: 0,
            random: fastrand::Rng::new(),
        }
    }

    /// Starts the next outage from the initial delay again.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many delays were handed out since the last reset.
    pub(crate) fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The step before jitter: `initial * 2^attempt`, capped at `max`.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 1u32 << self.attempt.min(20);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay to wait before the next attempt; advances the attempt counter.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let half = self.ceiling() / 2;
        // `f64()` is in [0, 1).
        let delay = half + half.mul_f64(self.random.f64());
        self.attempt = self.attempt.saturating_add(1);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_jitter_and_stay_capped() {
        let options = ListenerOptions::default();
        let mut backoff = Backoff::new(&options);
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay();
            assert!(delay >= ceiling / 2 && delay <= ceiling, "{delay:?} outside {ceiling:?}");
            ceilings.push(ceiling.as_millis());
        }
        assert_eq!(ceilings[..7], [100, 200, 400, 800, 1600, 3200, 5000]);
        assert!(ceilings[7..].iter().all(|c| *c == 5000));
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(100));
        // Many attempts never overflow.
        for _ in 0..100 {
            assert!(backoff.next_delay() <= Duration::from_secs(5));
        }
    }

    #[test]
    fn jitter_varies() {
        let options =
            ListenerOptions::default().backoff(Duration::from_secs(1), Duration::from_secs(1));
        let delays: std::collections::HashSet<_> = (0..16)
            .map(|_| {
                let mut backoff = Backoff::new(&options);
                backoff.next_delay()
            })
            .collect();
        assert!(delays.len() > 1, "16 jittered delays were all equal");
    }

    #[test]
    fn silly_bounds_are_clamped() {
        let options = ListenerOptions::default().backoff(Duration::ZERO, Duration::ZERO);
        assert_eq!(options.initial_backoff, Duration::from_millis(1));
        assert_eq!(options.max_backoff, Duration::from_millis(1));
        let options = ListenerOptions::default()
            .backoff(Duration::from_secs(2), Duration::from_secs(1))
            .event_capacity(0);
        assert_eq!(options.max_backoff, Duration::from_secs(2));
        assert_eq!(options.event_capacity, 1);
    }
}
