//! `PgInvalidationListener`: one task that owns one dedicated connection.
//!
//! # Why a start racing a shutdown leaves no subscription behind
//!
//! A subscription lives exactly as long as a session (Postgres drops a session's `LISTEN`s
//! when the session ends), and every session is owned by the listener's single task: no
//! other code holds the client or the connection. The task stops on a *level-triggered*
//! signal, a `watch` whose value is `true` after [`PgInvalidationListener::shutdown`] and
//! whose channel closes when the listener (or a cancelled `start` future, which owns the
//! listener until it returns it) is dropped. Every await of the task — connecting,
//! `LISTEN`ing, serving, backing off — sits in a `select!` with that signal, and the signal
//! is checked first (`biased`). A shutdown that arrives before the task reaches one of those
//! awaits is still seen there (a level, not an edge, so no wake-up is lost), and whatever
//! session the task held is then closed or dropped, ending the server backend and its
//! `LISTEN`. So once `shutdown` returns, or shortly after a drop, no session of this
//! listener remains; `shutdown` itself waits for the task to be gone.

use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, poll_fn};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use adapter_pg::tokio_postgres::{AsyncMessage, Client, Notification, SimpleQueryMessage};
use adapter_pg::{
    GuardLog, Invalidation, InvalidationSink, LogPosition, LogRead, PgAdapter, PgConfig,
    PgConnection, PgError, PopulateSink, error_chain, parse_outcome, parse_payload,
};
use tokio::sync::{broadcast, oneshot, watch};

use crate::event::{ListenerEvent, ListenerStats};
use crate::options::{Backoff, ListenerOptions};

/// At most one malformed-payload warning per this interval; the rest are counted.
const MALFORMED_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// How long a clean close may take before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How much of a malformed payload a log line shows.
const LOGGED_PAYLOAD_BYTES: usize = 200;

/// Replays peers' invalidations, heard on a dedicated `LISTEN` connection, into a sink.
///
/// Create it with [`start`](Self::start), which returns once `LISTEN` is established; stop it
/// with [`shutdown`](Self::shutdown). Dropping it also stops it (the connection is closed in
/// the background). Dropping a `start` future before it resolves cancels the start and leaves
/// no connection behind.
pub struct PgInvalidationListener {
    shared: Arc<Shared>,
    /// `true` asks the task to stop; dropping it (with the listener) does too.
    shutdown: watch::Sender<bool>,
    /// Closes when the task has ended (its sender lives in the task).
    stopped: watch::Receiver<()>,
    /// Created before the task started, so the first subscriber also sees the events of the
    /// first connection, which happen before `start` returns.
    first_events: Mutex<Option<broadcast::Receiver<ListenerEvent>>>,
}

impl fmt::Debug for PgInvalidationListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgInvalidationListener")
            .field("url", &self.shared.redacted_url)
            .field("channel", &self.shared.channel)
            .field("origin", &self.shared.origin)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl PgInvalidationListener {
    /// Starts the listener of the process that works through `adapter`: on its config (URL,
    /// listener URL, schema, channels) and with its origin id, so that this process's own
    /// invalidations, already applied locally, are not applied again. The usual way in.
    pub async fn attach(
        adapter: &PgAdapter,
        sink: Arc<dyn InvalidationSink>,
        options: ListenerOptions,
    ) -> Result<PgInvalidationListener, PgError> {
        let origin = Some(adapter.origin().to_owned());
        Self::start_with(adapter.config(), origin, sink, options).await
    }

    /// Connects, `LISTEN`s on `config`'s channel and starts replaying notifications into
    /// `sink`, with the default [`ListenerOptions`]. See [`start_with`](Self::start_with).
    pub async fn start(
        config: &PgConfig,
        origin: Option<String>,
        sink: Arc<dyn InvalidationSink>,
    ) -> Result<PgInvalidationListener, PgError> {
        Self::start_with(config, origin, sink, ListenerOptions::default()).await
    }

    /// Connects, `LISTEN`s on `config`'s channel and starts replaying notifications into
    /// `sink`. Payloads whose origin id (`"o"`) equals `origin` are this process's own
    /// broadcasts echoed back and are skipped: pass the origin of the process's
    /// [`PgAdapter`] (or use [`attach`](Self::attach), which does), or `None` for a listener
    /// that only watches.
    ///
    /// Resolves once `LISTEN` is established on the first connection. A failure of that first
    /// connection is returned (nothing is retried: a wrong URL should fail loudly at startup);
    /// later failures are retried forever with backoff.
    pub async fn start_with(
        config: &PgConfig,
        origin: Option<String>,
        sink: Arc<dyn InvalidationSink>,
        options: ListenerOptions,
    ) -> Result<PgInvalidationListener, PgError> {
        // The listener's own URL when one is set (the pool's may go through a transaction
        // pooler, which cannot carry LISTEN); a bad URL fails the first connection, whose
        // error `start` returns. A poller reads the log through the pool's URL.
        let pg = match options.poll {
            Some(_) if options.untracked_writers || !config.get_durable_guard() => {
                return Err(PgError::InvalidConfig {
                    url: config.redacted_url(),
                    reason: "polling follows the durable guard's log of invalidations, which \
                             writers that do not record them never reach: with untracked writers \
                             or the durable guard off, LISTEN instead"
                        .to_owned(),
                    source: None,
                });
            }
            Some(_) => config.poller_config(),
            None => config.listener_config()?,
        };
        let (events, first_events) = broadcast::channel(options.event_capacity);
        let populate =
            options.populate.clone().map(|sink| (config.get_populate_channel().to_owned(), sink));
        let shared = Arc::new(Shared {
            sink,
            populate,
            populate_outcome: config.get_populate_outcome_channel().to_owned(),
            origin,
            channel: config.get_channel().to_owned(),
            redacted_url: pg.redacted_url(),
            stats: Mutex::new(ListenerStats::default()),
            events,
            log: GuardLog::new(config),
            catch_up: !options.untracked_writers && config.get_durable_guard(),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (stopped_tx, stopped) = watch::channel(());
        let (ready_tx, ready_rx) = oneshot::channel();
        // The listener exists before the first await: if this future is dropped, so is the
        // listener, which closes the shutdown channel and stops the task.
        let listener = PgInvalidationListener {
            shared: Arc::clone(&shared),
            shutdown,
            stopped,
            first_events: Mutex::new(Some(first_events)),
        };
        let task = Task {
            shared,
            pg,
            options,
            position: None,
            shutdown: shutdown_rx,
            _stopped: stopped_tx,
        };
        tokio::spawn(task.run(ready_tx));
        match ready_rx.await {
            Ok(Ok(())) => Ok(listener),
            Ok(Err(error)) => Err(error),
            // The task ended without a word: it panicked or its runtime is shutting down.
            Err(_) => Err(PgError::ShutDown),
        }
    }

    /// Stops the listener and closes its connection; returns once the task has ended.
    /// Idempotent: later (or concurrent) calls wait for the same end and do nothing more.
    pub async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        let mut stopped = self.stopped.clone();
        // The sender is never used to send; `changed` fails once the task has dropped it.
        while stopped.changed().await.is_ok() {}
    }

    /// A snapshot of the state and counters.
    pub fn stats(&self) -> ListenerStats {
        self.shared.stats().clone()
    }

    /// The server process id of the current `LISTEN` connection, when connected.
    pub fn backend_pid(&self) -> Option<i32> {
        self.shared.stats().backend_pid
    }

    /// The channel listened on.
    pub fn channel(&self) -> &str {
        &self.shared.channel
    }

    /// Events from now on. The first call also receives the events since `start` (at least
    /// the first [`ListenerEvent::Connected`]), so a program that subscribes right after
    /// `start` misses nothing. A receiver that falls more than the configured capacity behind
    /// gets `RecvError::Lagged` and then continues with the newest events.
    pub fn subscribe(&self) -> broadcast::Receiver<ListenerEvent> {
        let first = self.first_events.lock().unwrap_or_else(PoisonError::into_inner).take();
        first.unwrap_or_else(|| self.shared.events.subscribe())
    }
}

/// State shared by the handle and the task.
struct Shared {
    sink: Arc<dyn InvalidationSink>,
    /// The populate channel and the waiters its announcements wake, when asked for.
    populate: Option<(String, Arc<dyn PopulateSink>)>,
    /// The channel on which winners that left no row say why (LISTENed with `populate`).
    populate_outcome: String,
    origin: Option<String>,
    channel: String,
    redacted_url: String,
    stats: Mutex<ListenerStats>,
    events: broadcast::Sender<ListenerEvent>,
    /// The durable guard's records, read as a log of invalidations.
    log: GuardLog,
    /// Whether a reconnect may catch up from the log (no untracked writers, guard on).
    catch_up: bool,
}

/// How a reconnect accounted for what it missed.
enum Recovery {
    /// Read from the log and replayed this many invalidations.
    CaughtUp(u64),
    /// Could not prove it saw everything, for this reason: everything is bumped.
    Resync(String),
}

impl Shared {
    fn stats(&self) -> MutexGuard<'_, ListenerStats> {
        // Counters stay meaningful even if a panic interrupted an update.
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, event: ListenerEvent) {
        // No receiver is not an error: events are optional observability.
        let _ = self.events.send(event);
    }

    /// Adds one to the counter `name` of this listener's channel.
    fn count(&self, name: &'static str) {
        metrics::counter!(name, "channel" => self.channel.clone()).increment(1);
    }

    fn malformed(&self) {
        self.stats().malformed_payloads += 1;
        self.count("deflookup_listener_malformed_payloads_total");
    }

    /// Whether `LISTEN` (or the poller's connection) is up, as a 0/1 gauge.
    fn set_connected(&self, up: bool) {
        let gauge =
            metrics::gauge!("deflookup_listener_connected", "channel" => self.channel.clone());
        gauge.set(if up { 1.0 } else { 0.0 });
    }

    /// `LISTEN` is established on `session` (or the polling connection is open).
    fn connected(&self, session: &Session, reconnected: bool) {
        {
            let mut stats = self.stats();
            stats.connected = true;
            stats.backend_pid = session.backend_pid;
            if reconnected {
                stats.reconnects += 1;
            }
        }
        self.set_connected(true);
        if reconnected {
            self.count("deflookup_listener_reconnects_total");
        }
        tracing::info!(
            url = %self.redacted_url,
            channel = %self.channel,
            backend_pid = session.backend_pid,
            reconnected,
            "invalidation listener is listening"
        );
        self.emit(ListenerEvent::Connected);
    }

    /// After a reconnect: what was missed is accounted for (replayed, or everything bumped);
    /// the sink may serve from its in-process tier again.
    fn recovered(&self, recovery: Recovery) {
        let event = match recovery {
            Recovery::CaughtUp(replayed) => {
                self.stats().catch_ups += 1;
                self.count("deflookup_listener_catch_ups_total");
                tracing::info!(channel = %self.channel, replayed, "caught up after reconnect: replayed the invalidations missed");
                ListenerEvent::CaughtUp { replayed }
            }
            Recovery::Resync(reason) => self.resync(reason),
        };
        self.sink.connection_restored();
        // Announcements sent while away are not in any log: every populate waiter probes now.
        if let Some((_, populate)) = &self.populate {
            populate.wake_all();
        }
        // Last: a receiver of the event may rely on all of the above.
        self.emit(event);
    }

    /// Bumps everything because the listener cannot prove it saw every invalidation, counts
    /// it, and returns the event to send (once the caller has done the rest of its step).
    fn resync(&self, reason: String) -> ListenerEvent {
        self.sink.resync();
        self.stats().resyncs += 1;
        self.count("deflookup_listener_resyncs_total");
        tracing::info!(channel = %self.channel, %reason, "resynced: bumped the global generation");
        ListenerEvent::Resync { reason }
    }

    /// Replays what a read of the log found; returns how many invalidations.
    fn replay_read(&self, read: &LogRead, replayed: bool) -> u64 {
        for invalidation in &read.invalidations {
            self.apply(invalidation.clone(), replayed);
        }
        read.invalidations.len() as u64
    }

    fn disconnected(&self, error: String) {
        // From now until the catch-up (or resync), peers' invalidations go unheard.
        self.sink.connection_lost();
        self.set_connected(false);
        tracing::warn!(
            url = %self.redacted_url,
            channel = %self.channel,
            %error,
            "invalidation listener lost its connection; reconnecting"
        );
        {
            let mut stats = self.stats();
            stats.connected = false;
            stats.backend_pid = None;
            stats.last_error = Some(error.clone());
        }
        self.emit(ListenerEvent::Disconnected { error });
    }

    fn reconnect_failed(&self, error: &PgError, attempt: u32) {
        let error = error_chain(error);
        tracing::warn!(%error, attempt, "invalidation listener cannot reconnect yet; backing off");
        self.stats().last_error = Some(error);
    }

    /// Routes one notification by its channel. Returns the log number an invalidation payload
    /// carried, with the realm it belongs to.
    fn dispatch(
        &self,
        note: &Notification,
        warnings: &mut MalformedWarnings,
    ) -> Option<(String, i64)> {
        match &self.populate {
            Some((channel, populate)) if note.channel() == channel => {
                self.populated(channel, populate.as_ref(), note.payload(), warnings);
                None
            }
            Some((_, populate)) if note.channel() == self.populate_outcome => {
                match parse_outcome(note.payload()) {
                    Ok((key, outcome)) => populate.key_outcome(key, outcome),
                    Err(error) => {
                        self.malformed();
                        warnings.note(&self.populate_outcome, note.payload(), &error);
                    }
                }
                None
            }
            _ => self.replay(note.payload(), warnings),
        }
    }

    /// Wakes the waiters of one announced populate key (payload: the key's decimal hash).
    fn populated(
        &self,
        channel: &str,
        populate: &dyn PopulateSink,
        payload: &str,
        warnings: &mut MalformedWarnings,
    ) {
        match payload.trim().parse::<i64>() {
            Ok(key) => {
                populate.key_populated(key);
                self.stats().populated_payloads += 1;
                self.count("deflookup_listener_populated_total");
                self.emit(ListenerEvent::Populated { key });
            }
            Err(error) => {
                self.malformed();
                warnings.note(channel, payload, &error);
                self.emit(ListenerEvent::Malformed { payload: payload.to_owned() });
            }
        }
    }

    /// Replays one invalidation payload; returns its log number and realm, also for an own
    /// echo (which is not replayed, but is accounted for).
    fn replay(&self, payload: &str, warnings: &mut MalformedWarnings) -> Option<(String, i64)> {
        if payload.is_empty() {
            // A bare `NOTIFY channel` carries nothing to replay.
            return None;
        }
        let parsed = match parse_payload(payload) {
            Ok(parsed) => parsed,
            Err(error) => {
                self.malformed();
                warnings.note(&self.channel, payload, &error);
                self.emit(ListenerEvent::Malformed { payload: payload.to_owned() });
                return None;
            }
        };
        let mark = parsed.seq.map(|seq| (parsed.log_realm().to_owned(), seq));
        // Not in the log: no origin (not deflookup), or a realm or global payload without a
        // number (a module payload without one may be a chunk before its transaction's last).
        let untracked = parsed.origin.is_none()
            || (parsed.seq.is_none()
                && !matches!(parsed.invalidation, Invalidation::Modules { .. }));
        if untracked {
            self.stats().untracked_payloads += 1;
            self.count("deflookup_listener_untracked_payloads_total");
            if self.catch_up {
                warnings.untracked(&self.channel);
            }
        }
        if self.origin.is_some() && parsed.origin == self.origin {
            // Our own broadcast: the local invalidation already bumped, and replaying it now
            // could discard a load that legitimately started after that invalidation.
            self.stats().own_echoes_skipped += 1;
            tracing::trace!(channel = %self.channel, "skipped own invalidation echo");
            return mark;
        }
        self.apply(parsed.invalidation, false);
        mark
    }

    /// Replays one invalidation into the sink, then counts it and sends its event.
    fn apply(&self, invalidation: Invalidation, replayed: bool) {
        self.sink.apply(&invalidation);
        tracing::debug!(channel = %self.channel, ?invalidation, replayed, "replayed invalidation");
        let kind = match &invalidation {
            Invalidation::Modules { .. } => "module",
            Invalidation::Realm { .. } => "realm",
            Invalidation::Global => "global",
        };
        metrics::counter!(
            "deflookup_listener_invalidations_total",
            "channel" => self.channel.clone(),
            "kind" => kind,
            "replayed" => if replayed { "true" } else { "false" },
        )
        .increment(1);
        let event = {
            let mut stats = self.stats();
            if replayed {
                stats.replayed_invalidations += 1;
            }
            match invalidation {
                Invalidation::Modules { realm_url, urls } => {
                    stats.module_payloads += 1;
                    ListenerEvent::Module { realm_url, urls, replayed }
                }
                Invalidation::Realm { realm_url } => {
                    stats.realm_payloads += 1;
                    ListenerEvent::Realm { realm_url, replayed }
                }
                Invalidation::Global => {
                    stats.global_payloads += 1;
                    ListenerEvent::Global { replayed }
                }
            }
        };
        self.emit(event);
    }
}

/// Rate-limits the malformed-payload warning: a peer spamming garbage must not flood logs.
/// The untracked-writer warning is given once per listener.
#[derive(Debug, Default)]
struct MalformedWarnings {
    last: Option<Instant>,
    suppressed: u64,
    untracked_warned: bool,
}

impl MalformedWarnings {
    fn untracked(&mut self, channel: &str) {
        if !std::mem::replace(&mut self.untracked_warned, true) {
            tracing::warn!(
                channel,
                "heard an invalidation that is not in the invalidation log (a writer without \
                 deflookup's durable guard: a reference server, a bare NOTIFY, or deflookup with \
                 the guard off); after a lost connection, catch-up cannot see such writers' \
                 invalidations: if they share this database, set untracked_writers \
                 (--untracked-writers)"
            );
        }
    }

    fn note(&mut self, channel: &str, payload: &str, error: &dyn std::error::Error) {
        let now = Instant::now();
        if self.last.is_some_and(|last| now.duration_since(last) < MALFORMED_WARNING_INTERVAL) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            channel,
            payload = %truncate(payload, LOGGED_PAYLOAD_BYTES),
            %error,
            suppressed_since_last_warning = self.suppressed,
            "ignoring a malformed invalidation payload"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// The task: owns every session, reconnects, and is the only code that touches the sink.
struct Task {
    shared: Arc<Shared>,
    pg: PgConfig,
    options: ListenerOptions,
    /// What this listener has accounted for in the invalidation log; `None` when unknown
    /// (the log could not be read, or catch-up is off), and a reconnect must then resync.
    position: Option<LogPosition>,
    shutdown: watch::Receiver<bool>,
    /// Dropped when the task ends, whichever way: that is what `shutdown` waits for.
    _stopped: watch::Sender<()>,
}

/// Opens a session, bounded in time as a whole: tokio-postgres' connect timeout covers
/// only the socket connect, so a server that accepts the connection and then never
/// answers the startup or the LISTEN would otherwise stall reconnection indefinitely.
async fn open_session(
    pg: &PgConfig,
    shared: &Shared,
    options: &ListenerOptions,
) -> Result<Session, PgError> {
    let limit = pg.get_connect_timeout() + options.heartbeat_timeout;
    let mut channels = Vec::new();
    if options.poll.is_none() {
        channels.push(shared.channel.as_str());
        if let Some((populate, _)) = &shared.populate {
            channels.push(populate);
            channels.push(&shared.populate_outcome);
        }
    }
    match tokio::time::timeout(limit, Session::open(pg, &channels)).await {
        Ok(opened) => opened,
        Err(_) => Err(PgError::Connect {
            url: shared.redacted_url.clone(),
            source: format!("no answer within {limit:?} while opening the LISTEN session").into(),
        }),
    }
}

impl Task {
    async fn run(mut self, ready: oneshot::Sender<Result<(), PgError>>) {
        // Its own receiver, so the methods below may borrow the task whole.
        let mut shutdown = self.shutdown.clone();
        let opened = tokio::select! {
            biased;
            () = signalled(&mut shutdown) => Err(PgError::ShutDown),
            opened = self.open_first() => opened,
        };
        let mut session = match opened {
            Ok(session) => session,
            Err(error) => {
                let _ = ready.send(Err(error));
                return;
            }
        };
        self.shared.connected(&session, false);
        if ready.send(Ok(())).is_err() {
            // `start` was cancelled; the listener it owned is gone with it.
            session.close().await;
            return;
        }

        let mut backoff = Backoff::new(&self.options);
        let mut warnings = MalformedWarnings::default();
        // When the current session opened: how long it lived decides the next backoff.
        let mut up_since = Instant::now();
        loop {
            let served = tokio::select! {
                biased;
                () = signalled(&mut shutdown) => None,
                error = self.serve(&mut session, &mut warnings) => Some(error),
            };
            let Some(mut error) = served else {
                session.close().await;
                return;
            };
            // A connection lost while catching up is one more outage of the same kind: the
            // position is kept for the next attempt.
            loop {
                drop(session);
                self.shared.disconnected(error);
                // A connection that stayed up a while starts the next outage from the shortest
                // delay; one that keeps failing right after connecting keeps backing off.
                if up_since.elapsed() >= self.options.max_backoff {
                    backoff.reset();
                }
                session = loop {
                    let delay = backoff.next_delay();
                    tokio::select! {
                        biased;
                        () = signalled(&mut shutdown) => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    let opened = tokio::select! {
                        biased;
                        () = signalled(&mut shutdown) => return,
                        opened = open_session(&self.pg, &self.shared, &self.options) => opened,
                    };
                    match opened {
                        Ok(session) => break session,
                        Err(error) => self.shared.reconnect_failed(&error, backoff.attempts()),
                    }
                };
                up_since = Instant::now();
                self.shared.connected(&session, true);
                let recovered = tokio::select! {
                    biased;
                    () = signalled(&mut shutdown) => return,
                    recovered = self.recover(&mut session) => recovered,
                };
                match recovered {
                    Ok(recovery) => {
                        self.shared.recovered(recovery);
                        break;
                    }
                    Err(again) => error = again,
                }
            }
        }
    }

    /// The first session, and the position it starts from (read after `LISTEN`, so whatever
    /// commits later is heard). A listener that cannot read the log still starts (it resyncs
    /// on reconnects); a poller cannot.
    async fn open_first(&mut self) -> Result<Session, PgError> {
        let mut session = open_session(&self.pg, &self.shared, &self.options).await?;
        if self.shared.catch_up || self.options.poll.is_some() {
            match session.read_now(&self.shared.log, self.options.heartbeat_timeout).await {
                Ok(position) => self.position = Some(position),
                Err(error) if self.options.poll.is_some() => return Err(error),
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "cannot read the invalidation log: reconnects will resync instead of catching up");
                }
            }
        }
        Ok(session)
    }

    /// After a reconnect, accounts for what was missed: replays what the log recorded past the
    /// position, or, when it cannot prove it saw everything, resyncs and takes a new position.
    /// `Err`: the connection was lost meanwhile (the position is kept, unless the read timed
    /// out: a backlog too slow to read is not read again, the next attempt resyncs).
    async fn recover(&mut self, session: &mut Session) -> Result<Recovery, String> {
        let timeout = self.options.heartbeat_timeout;
        let log = &self.shared.log;
        let reason = match &self.position {
            _ if !self.shared.catch_up => {
                return Ok(Recovery::Resync(
                    "catch-up is off: writers that do not record their invalidations may share \
                     the database"
                        .to_owned(),
                ));
            }
            None => "this listener has no position in the invalidation log".to_owned(),
            Some(position) => match session.read_since(log, position, timeout).await {
                Ok(read) if read.gaps.is_empty() => {
                    let replayed = self.shared.replay_read(&read, true);
                    if let Some(position) = &mut self.position {
                        position.advance(&read);
                    }
                    return Ok(Recovery::CaughtUp(replayed));
                }
                Ok(read) => format!(
                    "the invalidation log no longer holds everything past this listener's \
                     position in {} realm(s), e.g. {:?} (pruned past the guard's horizon, or \
                     the log went back, as after a failover or a restore)",
                    read.gaps.len(),
                    read.gaps[0]
                ),
                Err(error) => match session.lost {
                    Some(lost) => {
                        if lost == Lost::TimedOut {
                            self.position = None;
                        }
                        return Err(error_chain(&error));
                    }
                    None => format!("the invalidation log cannot be read: {}", error_chain(&error)),
                },
            },
        };
        // After the resync's bump, everything committed so far is accounted for: start again
        // from the log's present (one cheap read), not from the old position.
        self.position = match session.read_now(log, timeout).await {
            Ok(position) => Some(position),
            Err(error) if session.lost.is_some() => return Err(error_chain(&error)),
            Err(_) => None,
        };
        Ok(Recovery::Resync(reason))
    }

    /// Serves `session` until its connection fails or ends; returns why.
    async fn serve(&mut self, session: &mut Session, warnings: &mut MalformedWarnings) -> String {
        match self.options.poll {
            Some(interval) => self.poll(session, interval).await,
            None => session.serve(&self.shared, &self.options, warnings, &mut self.position).await,
        }
    }

    /// Reads the log every `interval` and replays what it holds past the position.
    async fn poll(&mut self, session: &mut Session, interval: Duration) -> String {
        loop {
            if let Err(error) = session.idle(interval).await {
                return error;
            }
            let Some(position) = &mut self.position else {
                return "the poller has no position in the invalidation log".to_owned();
            };
            let read =
                session.read_since(&self.shared.log, position, self.options.heartbeat_timeout);
            let read = match read.await {
                Ok(read) => read,
                Err(error) => {
                    if session.lost == Some(Lost::TimedOut) {
                        // Not read again from the same place: the reconnect resyncs.
                        self.position = None;
                    }
                    return format!("poll failed: {}", error_chain(&error));
                }
            };
            self.shared.stats().polls += 1;
            self.shared.count("deflookup_listener_polls_total");
            if read.gaps.is_empty() {
                self.shared.replay_read(&read, false);
            } else {
                // Fell more than the guard's horizon behind (a stalled process).
                let reason = format!(
                    "the poller fell behind the invalidation log's horizon in {} realm(s)",
                    read.gaps.len()
                );
                let event = self.shared.resync(reason);
                self.shared.emit(event);
            }
            position.advance(&read);
        }
    }
}

impl Drop for Task {
    // Runs however the task ends (shutdown, a failed start, a panicking sink, a runtime
    // shutting down), so the stats never claim a connection that is gone.
    fn drop(&mut self) {
        {
            let mut stats = self.shared.stats();
            stats.connected = false;
            stats.backend_pid = None;
        }
        self.shared.set_connected(false);
        // Peers' invalidations are no longer heard. (Not while unwinding from a panicking
        // sink: calling it again could panic twice and abort the process.)
        if !std::thread::panicking() {
            self.shared.sink.connection_lost();
        }
        // Nobody will hear announcements any more: let populate waiters re-read now rather
        // than sit out their timeout.
        if let Some((_, populate)) = &self.shared.populate {
            populate.wake_all();
        }
        if std::thread::panicking() {
            tracing::error!(channel = %self.shared.channel, "invalidation listener died in a panic; invalidations from peers are no longer replayed");
        } else {
            tracing::info!(channel = %self.shared.channel, "invalidation listener stopped");
        }
    }
}

/// Resolves once shutdown is asked for or the listener is gone. Level-triggered: it resolves
/// at once if that already happened.
async fn signalled(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender (the listener) was dropped: stop as well.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// The next message of a connection; also drives its I/O (queries of the client progress
/// only while this is polled). Dropping the future loses nothing: the state is in the
/// connection.
fn next_message(
    connection: &mut PgConnection,
) -> impl Future<Output = Option<Result<AsyncMessage, adapter_pg::tokio_postgres::Error>>> + '_ {
    poll_fn(move |cx| connection.poll_message(cx))
}

/// One connection with `LISTEN` established.
struct Session {
    client: Client,
    connection: PgConnection,
    backend_pid: Option<i32>,
    /// Notifications that arrived while `LISTEN` was being confirmed, or during a read of the
    /// log.
    early: VecDeque<Notification>,
    /// Why a read of the log failed, when the connection is to blame.
    lost: Option<Lost>,
}

/// How a connection failed a read of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lost {
    /// It failed or ended.
    Connection,
    /// It did not answer in time.
    TimedOut,
}

impl Session {
    async fn open(pg: &PgConfig, channels: &[&str]) -> Result<Session, PgError> {
        let (client, mut connection) = pg.connect_unpooled().await?;
        let listen_failed = |source: adapter_pg::tokio_postgres::Error| PgError::Query {
            operation: "LISTEN",
            source: Box::new(source),
        };
        // One round trip: subscribe and learn the backend pid (for operators and tests).
        // Quoted, because `pg_notify` takes the channel name verbatim (no case folding).
        let mut sql = String::new();
        for channel in channels {
            sql.push_str(&format!("LISTEN {}; ", quote_identifier(channel)));
        }
        sql.push_str("SELECT pg_backend_pid()");
        let mut early = VecDeque::new();
        let reply = {
            let query = client.simple_query(&sql);
            tokio::pin!(query);
            loop {
                tokio::select! {
                    biased;
                    reply = &mut query => break reply.map_err(listen_failed)?,
                    message = next_message(&mut connection) => match message {
                        Some(Ok(AsyncMessage::Notification(note))) => early.push_back(note),
                        Some(Ok(_)) => {}
                        Some(Err(error)) => return Err(listen_failed(error)),
                        None => {
                            return Err(PgError::Query {
                                operation: "LISTEN",
                                source: "the server closed the connection".into(),
                            });
                        }
                    },
                }
            }
        };
        let backend_pid = reply.iter().find_map(|message| match message {
            SimpleQueryMessage::Row(row) => row.get(0).and_then(|pid| pid.parse().ok()),
            _ => None,
        });
        Ok(Session { client, connection, backend_pid, early, lost: None })
    }

    /// Replays notifications until the connection fails or ends; returns why. Every log
    /// number heard moves `position` on.
    async fn serve(
        &mut self,
        shared: &Shared,
        options: &ListenerOptions,
        warnings: &mut MalformedWarnings,
        position: &mut Option<LogPosition>,
    ) -> String {
        let mut heard = |mark: Option<(String, i64)>| {
            if let (Some(position), Some((realm, seq))) = (position.as_mut(), mark) {
                position.heard(&realm, seq);
            }
        };
        while let Some(note) = self.early.pop_front() {
            heard(shared.dispatch(&note, warnings));
        }
        let Session { client, connection, .. } = self;
        let heartbeat = heartbeat(client, options.heartbeat_interval, options.heartbeat_timeout);
        tokio::pin!(heartbeat);
        loop {
            tokio::select! {
                // Messages first: when the connection dies, its own error explains more than
                // the heartbeat's.
                biased;
                message = next_message(connection) => match message {
                    Some(Ok(AsyncMessage::Notification(note))) => {
                        heard(shared.dispatch(&note, warnings));
                    }
                    Some(Ok(AsyncMessage::Notice(notice))) => {
                        tracing::debug!(notice = %notice, "notice on the listener connection");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return error_chain(&error),
                    None => return "the server closed the connection".to_owned(),
                },
                reason = &mut heartbeat => return reason,
            }
        }
    }

    /// Drives the connection for `duration` (a poller between two reads); `Err` when it
    /// fails or ends meanwhile.
    async fn idle(&mut self, duration: Duration) -> Result<(), String> {
        let sleep = tokio::time::sleep(duration);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                biased;
                message = next_message(&mut self.connection) => match message {
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(error_chain(&error)),
                    None => return Err("the server closed the connection".to_owned()),
                },
                () = &mut sleep => return Ok(()),
            }
        }
    }

    /// The position of a listener starting now (see [`GuardLog::now`]), bounded by `timeout`.
    async fn read_now(
        &mut self,
        log: &GuardLog,
        timeout: Duration,
    ) -> Result<LogPosition, PgError> {
        let Session { client, connection, early, lost, .. } = self;
        drive(connection, early, lost, timeout, log.now(client)).await
    }

    /// What the log holds past `position` (see [`GuardLog::read_since`]), bounded by `timeout`.
    async fn read_since(
        &mut self,
        log: &GuardLog,
        position: &LogPosition,
        timeout: Duration,
    ) -> Result<LogRead, PgError> {
        let Session { client, connection, early, lost, .. } = self;
        drive(connection, early, lost, timeout, log.read_since(client, position)).await
    }

    /// Closes cleanly (a Terminate message, then the socket), bounded in time; a server that
    /// does not answer just gets the socket dropped.
    async fn close(self) {
        let Session { client, mut connection, .. } = self;
        // With the client gone and nothing pending, the connection sends Terminate and ends.
        drop(client);
        let drain = async { while let Some(Ok(_)) = next_message(&mut connection).await {} };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain).await;
    }
}

/// Awaits `request` (a query of the connection's client) while driving the connection, at
/// most `timeout`; notifications that arrive meanwhile are queued in `early`. Sets `lost`
/// when the failure is the connection's (it failed, ended, or did not answer in time).
async fn drive<T>(
    connection: &mut PgConnection,
    early: &mut VecDeque<Notification>,
    lost: &mut Option<Lost>,
    timeout: Duration,
    request: impl Future<Output = Result<T, PgError>>,
) -> Result<T, PgError> {
    let failed = |source: adapter_pg::BoxError| PgError::Query {
        operation: "read the invalidation log",
        source,
    };
    let work = async {
        tokio::pin!(request);
        loop {
            tokio::select! {
                biased;
                reply = &mut request => {
                    let gone = reply.as_ref().err().is_some_and(connection_closed);
                    return (reply, gone.then_some(Lost::Connection));
                }
                message = next_message(connection) => match message {
                    Some(Ok(AsyncMessage::Notification(note))) => early.push_back(note),
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return (Err(failed(Box::new(error))), Some(Lost::Connection)),
                    None => {
                        let closed = failed("the server closed the connection".into());
                        return (Err(closed), Some(Lost::Connection));
                    }
                },
            }
        }
    };
    let (reply, failure) = match tokio::time::timeout(timeout, work).await {
        Ok(done) => done,
        Err(_) => {
            (Err(failed(format!("no answer within {timeout:?}").into())), Some(Lost::TimedOut))
        }
    };
    if failure.is_some() {
        *lost = failure;
    }
    reply
}

/// Whether `error` says the connection is gone (rather than the server refusing a statement).
fn connection_closed(error: &PgError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if error.downcast_ref::<adapter_pg::tokio_postgres::Error>().is_some_and(|e| e.is_closed())
        {
            return true;
        }
        source = error.source();
    }
    false
}

/// Probes an idle connection; resolves only when a probe fails or times out.
async fn heartbeat(client: &Client, interval: Duration, timeout: Duration) -> String {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, client.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return format!("heartbeat failed: {}", error_chain(&error)),
            Err(_) => return format!("heartbeat got no answer within {timeout:?}"),
        }
    }
}

/// `"name"`, with embedded quotes doubled.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// At most `max` bytes of `text`, cut on a character boundary, with `…` when cut.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_warnings_are_rate_limited_and_count_the_suppressed() {
        let error = std::io::Error::other("bad");
        let mut warnings = MalformedWarnings::default();
        warnings.note("c", "x", &error);
        assert_eq!(warnings.suppressed, 0);
        let first = warnings.last.expect("the first one is logged");
        warnings.note("c", "y", &error);
        warnings.note("c", "z", &error);
        assert_eq!((warnings.last, warnings.suppressed), (Some(first), 2));
        // Once the interval has passed, the next one is logged with the count, which resets.
        warnings.last = Some(first - MALFORMED_WARNING_INTERVAL);
        warnings.note("c", "w", &error);
        assert_eq!(warnings.suppressed, 0);
        assert!(warnings.last.is_some_and(|last| last > first - MALFORMED_WARNING_INTERVAL));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_identifier("module_cache_invalidated"), "\"module_cache_invalidated\"");
        assert_eq!(quote_identifier("Mixed"), "\"Mixed\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("ééé", 3), "é…");
        assert_eq!(truncate("abcdef", 3), "abc…");
    }
}
