//! Cross-process populate coalescing on Postgres (BEHAVIOUR §9): one prerender per cold key across
//! every process sharing the database.
//!
//! Per key, a transaction-scoped `pg_try_advisory_xact_lock` on the key's 64-bit hash (the
//! one-key form, which never overlaps the durable guard's two-key locks). The winner keeps
//! that transaction open on its pooled connection (the *pinned* connection) and does all of
//! the load's database work on it, so a process whose every pooled connection is a winner
//! cannot deadlock waiting for a second one. Releasing commits the load's write and
//! `pg_notify`s the key on the populate channel in the same transaction: peers are woken
//! exactly when the row becomes visible. A failed or abandoned load still announces the key,
//! so losers re-read at once instead of sitting out their timeout.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::Object;
use lookup_core::wire::encode_outcome;
use lookup_core::{
    CacheEntry, EntryScope, LoadStamp, LookupError, NoRow, PersistOutcome, PopulateCoordinator,
    PopulateKey, PopulateLease, PopulateSettings, PopulateSignals, RowStore,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::SimpleQueryMessage;

use crate::adapter::PgAdapter;
use crate::error::PgError;
use crate::store::{self, Checkout, query_error};

/// Counters of a [`PgPopulateCoordinator`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PgPopulateStats {
    /// Locks tried (one per round of a cold load; cache hits never try).
    pub attempts: u64,
    /// Locks won: loads run by this process.
    pub acquired: u64,
    /// Locks held elsewhere: rounds this process waited instead of rendering.
    pub contended: u64,
    /// Leases released with their write committed and their key announced.
    pub released: u64,
    /// Leases whose transaction failed; the key was announced after a rollback.
    pub rolled_back: u64,
    /// Leases dropped without a release (a panicking or cancelled load), cleaned up in the
    /// background.
    pub abandoned: u64,
    /// Most leases held at once (pool size − 1).
    pub lease_limit: usize,
}

/// Cleanups of abandoned leases still running (see [`PgPopulateCoordinator::settle`]).
#[derive(Debug, Default)]
struct Cleanups {
    running: std::sync::atomic::AtomicUsize,
    done: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Counters {
    attempts: AtomicU64,
    acquired: AtomicU64,
    contended: AtomicU64,
    released: AtomicU64,
    rolled_back: AtomicU64,
    abandoned: AtomicU64,
}

/// The Postgres [`PopulateCoordinator`]. Give the same [`PopulateSignals`] to this process's
/// invalidation listener (`ListenerOptions::populate`), which wakes waiters when peers
/// announce keys and wakes them all after a reconnect.
///
/// At most `pool size − 1` leases are held at once (a further winner waits for one to end
/// before it takes a connection), so one pooled connection is always left for the rest of the
/// process: an invalidation that holds the lookup's persist gate while it waits for a
/// connection would otherwise wait forever for winners that wait for that gate.
#[derive(Debug, Clone)]
pub struct PgPopulateCoordinator {
    adapter: PgAdapter,
    signals: Arc<PopulateSignals>,
    settings: PopulateSettings,
    leases: Arc<Semaphore>,
    counters: Arc<Counters>,
    cleanups: Arc<Cleanups>,
}

impl PgPopulateCoordinator {
    /// A coordinator that takes its connections from `adapter`'s pool.
    ///
    /// Refused when the pool has fewer than 2 connections (one must stay free, see above) or
    /// when the durable guard is off: a lease commits its write at release, after the
    /// lookup's in-process check, and only the guard's lock keeps an invalidation from
    /// deleting in between and the stale write from landing after it.
    pub fn new(
        adapter: &PgAdapter,
        signals: Arc<PopulateSignals>,
        settings: PopulateSettings,
    ) -> Result<Self, PgError> {
        let config = adapter.config();
        let refuse = |reason: &str| PgError::InvalidConfig {
            url: config.redacted_url(),
            reason: format!("populate coalescing needs {reason}"),
            source: None,
        };
        if config.get_pool_size() < 2 {
            return Err(refuse("a pool of at least 2 connections"));
        }
        if !config.get_durable_guard() {
            return Err(refuse("the durable guard"));
        }
        Ok(PgPopulateCoordinator {
            adapter: adapter.clone(),
            signals,
            settings,
            leases: Arc::new(Semaphore::new(config.get_pool_size() - 1)),
            counters: Arc::default(),
            cleanups: Arc::default(),
        })
    }

    /// Waits until every lease dropped without a release (a cancelled load: say the process
    /// was asked to stop mid-render) has rolled back, released its lock and announced its key,
    /// at most the operation timeout. A process that stops should call it after cancelling
    /// its work and before exiting, so that its peers' waiters take over at once.
    pub async fn settle(&self) {
        let limit = self.adapter.config().get_operation_timeout();
        let settled = async {
            loop {
                let done = self.cleanups.done.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                if self.cleanups.running.load(Ordering::SeqCst) == 0 {
                    return;
                }
                done.await;
            }
        };
        if tokio::time::timeout(limit, settled).await.is_err() {
            tracing::warn!(
                ?limit,
                "abandoned populate leases did not finish their cleanup in time"
            );
        }
    }

    /// Releases every parked waiter (their loads fail with `PopulateFailed`) and refuses new
    /// rounds. Idempotent.
    pub fn shutdown(&self) {
        self.signals.shutdown();
    }

    /// The counters so far.
    pub fn stats(&self) -> PgPopulateStats {
        let c = &self.counters;
        PgPopulateStats {
            attempts: c.attempts.load(Ordering::Relaxed),
            acquired: c.acquired.load(Ordering::Relaxed),
            contended: c.contended.load(Ordering::Relaxed),
            released: c.released.load(Ordering::Relaxed),
            rolled_back: c.rolled_back.load(Ordering::Relaxed),
            abandoned: c.abandoned.load(Ordering::Relaxed),
            lease_limit: self.adapter.config().get_pool_size() - 1,
        }
    }
}

/// Whether a simple-query reply's first row says `t`.
fn first_bool(reply: &[SimpleQueryMessage]) -> Option<bool> {
    reply.iter().find_map(|message| match message {
        SimpleQueryMessage::Row(row) => row.get(0).map(|v| v == "t"),
        _ => None,
    })
}

impl PopulateCoordinator for PgPopulateCoordinator {
    type Lease = PgLease;

    fn signals(&self) -> &Arc<PopulateSignals> {
        &self.signals
    }

    fn settings(&self) -> PopulateSettings {
        self.settings
    }

    /// Advisory locks are shared by the whole database, so with a schema configured the key
    /// is prefixed with it: deployments in two schemas never wait on each other's keys. The
    /// default schema keeps the plain key, as the reference's peers compute it.
    fn key(&self, scope: &EntryScope, url: &str) -> PopulateKey {
        let key = PopulateKey::for_load(scope, url);
        match self.adapter.config().get_schema() {
            Some(schema) => PopulateKey::from_text(format!("{schema}:{}", key.text())),
            None => key,
        }
    }

    async fn try_acquire(&self, key: &PopulateKey) -> Result<Option<PgLease>, LookupError> {
        if self.signals.is_shut_down() {
            return Err(LookupError::PopulateFailed {
                key: key.to_string(),
                reason: "the populate coordinator is shut down".to_owned(),
            });
        }
        self.counters.attempts.fetch_add(1, Ordering::Relaxed);
        // The semaphore is never closed.
        let permit = Arc::clone(&self.leases).acquire_owned().await.map_err(|_| {
            LookupError::PopulateFailed {
                key: key.to_string(),
                reason: "the lease semaphore is closed".to_owned(),
            }
        })?;
        let lock = async {
            // Until it is settled below, a connection whose BEGIN was sent is closed rather
            // than pooled if this future is dropped (a timeout) or fails: it may hold the key
            // inside a transaction.
            let tx = Checkout::new(self.adapter.client("populate lock").await?);
            // One round trip: open the transaction and try the key. The hash is a number we
            // formatted, so it is safe to inline.
            let sql = format!("BEGIN; SELECT pg_try_advisory_xact_lock({})", key.hash());
            let reply =
                tx.client().simple_query(&sql).await.map_err(query_error("populate lock"))?;
            let won = first_bool(&reply).unwrap_or(false);
            if !won {
                // One more round trip, but a loser is about to wait far longer than that.
                tx.client()
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(query_error("populate lock"))?;
                tx.finish();
                return Ok(None);
            }
            Ok(Some(tx))
        };
        let Some(tx) = self.adapter.bounded("populate lock", lock).await? else {
            self.counters.contended.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let client = tx.into_inner();
        self.counters.acquired.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%key, "won the populate lock");
        Ok(Some(PgLease {
            client: Some(client),
            key_hash: key.hash(),
            announce: format!(
                "SELECT pg_notify('{}', '{}')",
                self.adapter.config().get_populate_channel(),
                key.hash()
            ),
            guarded: self.adapter.config().get_durable_guard(),
            adapter: self.adapter.clone(),
            counters: Arc::clone(&self.counters),
            cleanups: Arc::clone(&self.cleanups),
            fell_back: Default::default(),
            broken: Default::default(),
            wrote_on_lease: Default::default(),
            _permit: permit,
        }))
    }
}

/// A won populate lock: the pooled connection holding it, inside its open transaction. Every
/// row operation of the load runs on that connection; [`release`](PopulateLease::release)
/// commits and announces. Dropped without a release, it rolls back and announces in the
/// background.
#[derive(Debug)]
pub struct PgLease {
    client: Option<Object>,
    /// `SELECT pg_notify('<channel>', '<hash>')`; the channel name is validated by `PgConfig`.
    announce: String,
    /// The key's hash, for the outcome of a load that left no row.
    key_hash: i64,
    guarded: bool,
    adapter: PgAdapter,
    counters: Arc<Counters>,
    cleanups: Arc<Cleanups>,
    /// The lease's connection was found gone and the load went on on the pool.
    fell_back: std::sync::atomic::AtomicBool,
    /// An operation on the lease failed at the connection level.
    broken: std::sync::atomic::AtomicBool,
    /// A row was written inside the lease's transaction (so it needs the commit).
    wrote_on_lease: std::sync::atomic::AtomicBool,
    /// One of the coordinator's `pool size − 1` leases, given back with the lease.
    _permit: OwnedSemaphorePermit,
}

impl PgLease {
    fn client(&self) -> Result<&Object, PgError> {
        self.client.as_ref().ok_or_else(|| PgError::Query {
            operation: "populate lease",
            source: "the lease was already released".into(),
        })
    }
}

/// Rolls the lease's transaction back and announces the key outside it, within `limit`;
/// closes the connection if that fails, which releases the lock anyway. Returns whether it
/// announced.
async fn roll_back_and_announce(client: Object, announce: &str, limit: Duration) -> bool {
    let rolled_back =
        tokio::time::timeout(limit, client.simple_query(&format!("ROLLBACK; {announce}"))).await;
    match rolled_back {
        Ok(Ok(_)) => true,
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot roll back a populate lease; closing its connection");
            drop(Object::take(client));
            false
        }
        Err(_) => {
            tracing::warn!(
                ?limit,
                "no answer to a populate lease's rollback; closing its connection"
            );
            drop(Object::take(client));
            false
        }
    }
}

impl PgLease {
    /// Whether the lease's connection is gone (a terminated backend, a failover, a cut
    /// network): its transaction and its lock went with it.
    fn lease_gone(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
            || self.client.as_ref().is_none_or(|client| client.is_closed())
    }

    /// Notes a failed operation on the lease: a connection-level failure (the server ended
    /// the session, the connection broke or timed out) means the lease is gone, even if the
    /// driver has not noticed the closed socket yet.
    fn note_failure(&self, error: &LookupError) {
        if error.is_transient() {
            self.broken.store(true, Ordering::Relaxed);
        }
    }

    /// Once the lease's connection is gone, the rest of the load runs on pooled connections:
    /// a write there is checked by the durable guard like any other, so nothing stale can
    /// land, and a long render is not thrown away because its lock's session ended.
    fn fall_back(&self, operation: &str) -> bool {
        if !self.lease_gone() {
            return false;
        }
        if !self.fell_back.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                operation,
                "the populate lease's connection is gone; finishing the load on the pool"
            );
        }
        true
    }

    /// Runs `work` on the lease's connection, within the operation timeout, unless the lease
    /// is gone. `None`: the lease is (or has just turned out to be) gone, and the caller goes
    /// on on the pool instead (see [`fall_back`](Self::fall_back)).
    async fn on_lease<T>(
        &self,
        operation: &'static str,
        work: impl Future<Output = Result<T, PgError>>,
    ) -> Option<Result<T, LookupError>> {
        if self.fall_back(operation) {
            return None;
        }
        let result = self.adapter.bounded(operation, work).await.map_err(LookupError::from);
        if let Err(error) = &result {
            self.note_failure(error);
            if self.fall_back(operation) {
                return None;
            }
        }
        Some(result)
    }
}

impl RowStore for PgLease {
    async fn read_rows(
        &self,
        scope: &EntryScope,
        url: &str,
        alias: &str,
    ) -> Result<Vec<CacheEntry>, LookupError> {
        let sql = self.adapter.sql();
        let read = async { store::read_rows(sql, self.client()?, scope, url, alias).await };
        match self.on_lease("read row", read).await {
            Some(result) => result,
            None => self.adapter.read_rows(scope, url, alias).await,
        }
    }

    async fn read_rows_batch(
        &self,
        scope: &EntryScope,
        names: &[String],
    ) -> Result<Vec<CacheEntry>, LookupError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let sql = self.adapter.sql();
        let read = async { store::read_rows_batch(sql, self.client()?, scope, names).await };
        match self.on_lease("read rows", read).await {
            Some(result) => result,
            None => self.adapter.read_rows_batch(scope, names).await,
        }
    }

    async fn begin_load(&self, realm_url: &str, url: &str) -> Result<LoadStamp, LookupError> {
        if !self.guarded {
            return Ok(LoadStamp::UNGUARDED);
        }
        let stamp = async { store::stamp(self.adapter.sql(), self.client()?, realm_url).await };
        match self.on_lease("stamp load", stamp).await {
            Some(result) => result,
            None => self.adapter.begin_load(realm_url, url).await,
        }
    }

    /// Writes inside the lease's transaction (visible at release). Guarded, the write runs in
    /// a savepoint: when the guard refuses it, rolling back to the savepoint also gives back
    /// the realm's shared lock, so invalidations need not wait for the load's re-run. A
    /// written row keeps the lock until the commit, as the guard requires. If the lease's
    /// connection is gone, the write is made once on a pooled connection instead.
    async fn upsert(
        &self,
        entry: &CacheEntry,
        stamp: LoadStamp,
    ) -> Result<PersistOutcome, LookupError> {
        let row = store::RowParams::new(entry)?;
        let sql = self.adapter.sql();
        let write = async {
            let client = self.client()?;
            if !self.guarded || stamp.is_unguarded() {
                store::plain_upsert(sql, client, &row).await?;
                return Ok(PersistOutcome::Written);
            }
            client
                .batch_execute("SAVEPOINT populate_persist")
                .await
                .map_err(query_error("upsert"))?;
            let outcome = store::guarded_insert(sql, client, &row, stamp).await?;
            if outcome == PersistOutcome::Stale {
                client
                    .batch_execute("ROLLBACK TO SAVEPOINT populate_persist")
                    .await
                    .map_err(query_error("upsert"))?;
            }
            Ok(outcome)
        };
        match self.on_lease("upsert", write).await {
            Some(Ok(PersistOutcome::Written)) => {
                self.wrote_on_lease.store(true, Ordering::Relaxed);
                Ok(PersistOutcome::Written)
            }
            Some(result) => result,
            None => self.adapter.upsert(entry, stamp).await,
        }
    }
}

impl PopulateLease for PgLease {
    /// Says why the load left no row on the outcome channel, inside the lease's transaction
    /// (so it is delivered at the commit, just before the key's announcement), then releases.
    /// If the outcome cannot be sent, the release goes on without it.
    async fn release_without_row(self, outcome: &NoRow) -> Result<(), LookupError> {
        if let (Some(client), Some(payload)) =
            (self.client.as_ref(), encode_outcome(self.key_hash, outcome))
            && !self.lease_gone()
        {
            let sql = self.adapter.sql();
            let channel = self.adapter.config().get_populate_outcome_channel();
            let told = async {
                sql.query(client, &sql.notify, &[&channel, &payload])
                    .await
                    .map_err(query_error("populate outcome"))
            };
            if let Err(error) = self.adapter.bounded("populate outcome", told).await {
                tracing::warn!(%error, "cannot tell populate waiters why no row was left");
            }
        }
        self.release().await
    }

    async fn release(mut self) -> Result<(), LookupError> {
        let gone = self.lease_gone();
        let Some(client) = self.client.take() else {
            return Ok(());
        };
        if gone {
            // Its transaction (and lock) failed or went with the session: nothing to commit,
            // but the waiters must still hear of the key. A write made on the lease before it
            // went is lost; one made on the pool since (see `fall_back`) is not.
            self.counters.rolled_back.fetch_add(1, Ordering::Relaxed);
            let limit = self.adapter.config().get_operation_timeout();
            if client.is_closed() || !roll_back_and_announce(client, &self.announce, limit).await {
                self.announce_on_pool().await;
            }
            if self.wrote_on_lease.load(Ordering::Relaxed) {
                return Err(PgError::Query {
                    operation: "populate release",
                    source: "the lease's connection was lost before its write committed".into(),
                }
                .into());
            }
            return Ok(());
        }
        // One round trip: the announcement is delivered at the commit, with the row.
        let limit = self.adapter.config().get_operation_timeout();
        let text = format!("{}; COMMIT", self.announce);
        let commit = client.simple_query(&text);
        let committed = match tokio::time::timeout(limit, commit).await {
            Ok(result) => result.map_err(query_error("populate release")),
            Err(_) => {
                Err(PgError::Timeout { operation: "populate release", url: None, after: limit })
            }
        };
        match committed {
            Ok(_) => {
                self.counters.released.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(error) => {
                // A statement of the load failed earlier (the transaction is aborted), or the
                // connection broke. Either way nothing was written; wake the losers anyway.
                self.counters.rolled_back.fetch_add(1, Ordering::Relaxed);
                if !roll_back_and_announce(client, &self.announce, limit).await {
                    self.announce_on_pool().await;
                }
                Err(error.into())
            }
        }
    }
}

impl PgLease {
    /// Announces the key on a pooled connection (the lease's own being unusable).
    async fn announce_on_pool(&self) {
        let announce = async {
            let other = Checkout::new(self.adapter.client("populate announce").await?);
            other
                .client()
                .simple_query(&self.announce)
                .await
                .map_err(query_error("populate announce"))?;
            other.finish();
            Ok(())
        };
        if self.adapter.bounded("populate announce", announce).await.is_err() {
            tracing::warn!("cannot announce a populate; its waiters will find out by probing");
        }
    }
}

impl Drop for PgLease {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        self.counters.abandoned.fetch_add(1, Ordering::Relaxed);
        // Out of the pool first: if the cleanup below never runs (a runtime shutting down
        // drops its tasks), dropping the connection closes it, which releases the lock,
        // instead of pooling it inside the open transaction.
        let client = Object::take(client);
        let announce = std::mem::take(&mut self.announce);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let limit = self.adapter.config().get_operation_timeout();
            let cleanups = Arc::clone(&self.cleanups);
            cleanups.running.fetch_add(1, Ordering::SeqCst);
            runtime.spawn(async move {
                // Announced outside the rolled-back transaction; the connection closes after.
                let text = format!("ROLLBACK; {announce}");
                let cleanup = client.simple_query(&text);
                let _ = tokio::time::timeout(limit, cleanup).await;
                drop(client);
                cleanups.running.fetch_sub(1, Ordering::SeqCst);
                cleanups.done.notify_waiters();
            });
        }
    }
}
