//! [`PgAdapter`]: the `DbAdapter` on a pool of tokio-postgres connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::future::Future;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, QueueMode, RecyclingMethod, Runtime,
    TimeoutType,
};
use lookup_core::{
    CacheEntry, ConsumerRow, DbAdapter, EntryScope, Invalidation, LoadStamp, LookupError,
    ModulesInvalidated, PersistOutcome, RowStore,
};

use crate::config::PgConfig;
use crate::error::PgError;
use crate::guard;
use crate::invalidate::{self, Applied, Failure, Plan};
use crate::schema;
use crate::sql::Sql;
use crate::store::{self, Checkout, query_error};

/// Counters of what the adapter broadcast.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PgAdapterStats {
    /// Invalidations applied (committed).
    pub invalidations: u64,
    /// NOTIFY payloads committed.
    pub payloads_sent: u64,
    /// Invalidation transactions that failed after their DELETE (at NOTIFY or COMMIT).
    pub broadcast_failures: u64,
    /// Invalidations whose rows were deleted without a broadcast (after two failures).
    pub unbroadcast_deletes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    invalidations: AtomicU64,
    payloads_sent: AtomicU64,
    broadcast_failures: AtomicU64,
    unbroadcast_deletes: AtomicU64,
}

/// The Postgres backend: a connection pool, this process's origin id, and the channel.
///
/// Cheap to clone; clones share the pool and counters.
#[derive(Clone)]
pub struct PgAdapter {
    pool: Pool,
    config: Arc<PgConfig>,
    sql: Arc<Sql>,
    origin: Arc<str>,
    counters: Arc<Counters>,
    prune_gate: Arc<guard::PruneGate>,
}

impl std::fmt::Debug for PgAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgAdapter")
            .field("config", &self.config)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// A process-unique id for the `"o"` key of payloads: the pid plus a random number, so two
/// adapters in one process (as in tests) differ too.
fn new_origin() -> String {
    format!("{:x}-{:016x}", std::process::id(), fastrand::u64(..))
}

impl PgAdapter {
    /// Builds the pool, and checks the schema on one connection: creates or upgrades it only
    /// when something is missing (so a read-only role can serve an existing, current schema).
    ///
    /// The pool opens further connections only when an operation needs one. With
    /// `pgbouncer=true` in the URL every statement is sent unnamed and self-contained (see
    /// [`PgConfig`]).
    pub async fn connect(config: PgConfig) -> Result<Self, PgError> {
        let resolved = config.resolve()?;
        let manager = Manager::from_config(
            resolved.pg,
            resolved.tls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        // The connection returned last goes out first: a quiet process keeps reusing the one
        // server backend that is warm (scheduled, its caches hot), and the rest stay idle. The
        // pool's default, oldest first, sends each operation to the backend idle the longest:
        // measured, a cache hit took 1.5-1.75x as long once the pool held 8 connections.
        let pool = Pool::builder(manager)
            .max_size(config.get_pool_size())
            .runtime(Runtime::Tokio1)
            .queue_mode(QueueMode::Lifo)
            .create_timeout(Some(config.get_connect_timeout()))
            // No wait or recycle timeout of the pool's own: every operation checks its
            // connection out inside the operation timeout (`bounded`), which covers the wait,
            // and the fast recycle does no I/O. Each of them built a timer on every checkout
            // (about 850 of a hit's client instructions, callgrind).
            .build()
            .map_err(|e| PgError::InvalidConfig {
                url: config.redacted_url(),
                reason: "cannot build the connection pool".to_owned(),
                source: Some(Box::new(e)),
            })?;
        // The statements name the diagnostics column, which start-up learns from the table.
        let pooler = resolved.pooler;
        let bootstrap = Arc::new(Sql::new(config.get_schema(), pooler, "diagnostics"));
        let origin: Arc<str> = new_origin().into();
        let prune_gate = Arc::new(guard::PruneGate::new(config.get_guard_horizon()));
        let mut adapter = PgAdapter {
            pool,
            config: Arc::new(config),
            sql: bootstrap,
            origin,
            counters: Arc::default(),
            prune_gate,
        };
        let table = adapter
            .bounded("prepare the modules table", async {
                let client = Checkout::new(adapter.client("prepare the modules table").await?);
                let config = &adapter.config;
                let info = schema::ensure(
                    &adapter.sql,
                    client.client(),
                    config.get_schema(),
                    config.get_shared_table_indexes(),
                )
                .await?;
                client.finish();
                Ok(info)
            })
            .await?;
        adapter.sql = Arc::new(Sql::new(adapter.config.get_schema(), pooler, table.diagnostics));
        tracing::debug!(
            url = %adapter.config.redacted_url(),
            origin = %adapter.origin,
            transaction_pooler = adapter.sql.unnamed(),
            "connected to Postgres"
        );
        Ok(adapter)
    }

    /// This process's origin id, sent as `"o"` in every payload. Give it to the listener so
    /// it skips our own echoes.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The settings this adapter was connected with.
    pub fn config(&self) -> &PgConfig {
        &self.config
    }

    /// The broadcast counters so far.
    pub fn stats(&self) -> PgAdapterStats {
        let c = &self.counters;
        PgAdapterStats {
            invalidations: c.invalidations.load(Ordering::Relaxed),
            payloads_sent: c.payloads_sent.load(Ordering::Relaxed),
            broadcast_failures: c.broadcast_failures.load(Ordering::Relaxed),
            unbroadcast_deletes: c.unbroadcast_deletes.load(Ordering::Relaxed),
        }
    }

    /// Connections the pool holds now (busy or idle): it opens them only on demand.
    pub fn open_connections(&self) -> usize {
        self.pool.status().size
    }

    /// Number of rows in the table (for tests and the CLI).
    pub async fn row_count(&self) -> Result<u64, PgError> {
        self.bounded("count rows", async {
            let client = Checkout::new(self.client("count rows").await?);
            let rows = self
                .sql
                .query(client.client(), &self.sql.row_count, &[])
                .await
                .map_err(query_error("count rows"))?;
            client.finish();
            Ok(rows.first().map_or(0, |row| u64::try_from(row.get::<_, i64>(0)).unwrap_or(0)))
        })
        .await
    }

    pub(crate) fn sql(&self) -> &Sql {
        &self.sql
    }

    /// A pooled connection: one waiting in the pool, or a new one (its start-up bounded by
    /// the connect timeout). The wait for a free slot is bounded by the operation timeout of
    /// the [`bounded`](Self::bounded) operation it is called in: every caller is one.
    pub(crate) async fn client(&self, operation: &'static str) -> Result<Object, PgError> {
        // Boxed: the pool's wait is a 1.6 kB future, which every operation's future would
        // otherwise hold inline and copy each time it is moved (a hit moved its 4 kB future
        // five times: measured with callgrind, a quarter of the adapter's own instructions).
        Box::pin(self.pool.get()).await.map_err(|error| match error {
            PoolError::Timeout(TimeoutType::Create) => PgError::connect_timeout(
                self.config.redacted_url(),
                self.config.get_connect_timeout(),
            ),
            PoolError::Backend(source) => {
                PgError::connect(self.config.redacted_url(), Box::new(source))
            }
            other => PgError::Query { operation, source: Box::new(other) },
        })
    }

    /// Runs one database operation within the operation timeout. The operation holds its
    /// connection in a [`Checkout`], so a timed-out one closes its connection instead of
    /// pooling it with a request still in flight.
    ///
    /// Not an `async fn`: that would hold `work` twice (its argument and the timeout around
    /// it) and copy it into the timeout when first polled.
    pub(crate) fn bounded<T>(
        &self,
        operation: &'static str,
        work: impl Future<Output = Result<T, PgError>>,
    ) -> impl Future<Output = Result<T, PgError>> {
        let after = self.config.get_operation_timeout();
        let timed = tokio::time::timeout(after, work);
        async move {
            match timed.await {
                Ok(result) => result,
                Err(_) => Err(PgError::Timeout { operation, url: None, after }),
            }
        }
    }

    /// One invalidation transaction, with the broadcast policy: if the transaction fails at a
    /// NOTIFY or at COMMIT, it is retried once; if that fails too, it runs once more without
    /// its NOTIFYs (the guard record and the DELETE still land) and a warning is logged.
    /// Rationale: the rows are shared, so the delete is what every peer reads; the broadcast
    /// only stops peers' in-flight loads from persisting, which the durable guard (or the
    /// next invalidation) also covers, whereas failing the whole invalidation would leave
    /// stale rows for everyone.
    async fn invalidate(&self, request: &Invalidation) -> Result<Applied, LookupError> {
        let horizon_secs = self.config.get_guard_horizon().as_secs_f64();
        let guarded = self.config.get_durable_guard();
        let pruning = match request {
            Invalidation::Modules { realm_url, .. } if guarded => {
                Some(realm_url).filter(|realm| self.prune_gate.due(realm))
            }
            _ => None,
        };
        let prune = pruning.is_some();
        let broadcasting = Plan {
            guarded,
            notify: self.config.get_broadcast().then(|| (self.config.get_channel(), &*self.origin)),
            horizon_secs,
            prune,
        };
        let checked = |applied: &Applied| {
            if let (Some(realm), Some(pruned)) = (pruning, applied.pruned) {
                self.prune_gate.checked(realm, pruned);
            }
        };
        let mut last_error = None;
        // After a failed attempt, the retry starts from that attempt's whole fan-out: if it did
        // commit (a reply lost at COMMIT), its consumers' rows are gone, and a closure from the
        // seeds alone would no longer find them to report.
        let mut request = request.clone();
        for attempt in 1..=2 {
            match self.invalidate_once(&request, &broadcasting).await? {
                Ok(applied) => {
                    checked(&applied);
                    self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .payloads_sent
                        .fetch_add(applied.payloads as u64, Ordering::Relaxed);
                    return Ok(applied);
                }
                Err(Failure::Invalidation(error)) => return Err(error.into()),
                Err(Failure::Broadcast(error, effective)) => {
                    self.counters.broadcast_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(attempt, %error, "invalidation broadcast failed");
                    last_error = Some(error);
                    request = effective;
                }
            }
        }
        let silent = Plan { guarded, notify: None, horizon_secs, prune };
        let applied = match self.invalidate_once(&request, &silent).await? {
            Ok(applied) => {
                checked(&applied);
                applied
            }
            Err(Failure::Invalidation(error) | Failure::Broadcast(error, _)) => {
                return Err(error.into());
            }
        };
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        self.counters.unbroadcast_deletes.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            error = %last_error.map(|e| e.to_string()).unwrap_or_default(),
            deleted = applied.deleted,
            "rows deleted WITHOUT a broadcast: peers' in-flight loads may persist stale rows"
        );
        Ok(applied)
    }

    /// One invalidation transaction within the operation timeout. `Err` when it timed out
    /// or got no connection (its transaction, if begun, is rolled back by the closed
    /// connection); `Ok` carries how the transaction itself went.
    async fn invalidate_once(
        &self,
        request: &Invalidation,
        plan: &Plan<'_>,
    ) -> Result<Result<Applied, Failure>, PgError> {
        self.bounded("invalidate", async {
            let client = self.client("invalidate").await?;
            Ok(invalidate::run(&self.sql, client, request, plan).await)
        })
        .await
    }
}

impl RowStore for PgAdapter {
    async fn read_rows(
        &self,
        scope: &EntryScope,
        url: &str,
        alias: &str,
    ) -> Result<Vec<CacheEntry>, LookupError> {
        Ok(self
            .bounded("read row", async {
                let client = Checkout::new(self.client("read row").await?);
                let rows = store::read_rows(&self.sql, client.client(), scope, url, alias).await?;
                client.finish();
                Ok(rows)
            })
            .await?)
    }

    async fn read_rows_batch(
        &self,
        scope: &EntryScope,
        names: &[String],
    ) -> Result<Vec<CacheEntry>, LookupError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .bounded("read rows", async {
                let client = Checkout::new(self.client("read rows").await?);
                let rows = store::read_rows_batch(&self.sql, client.client(), scope, names).await?;
                client.finish();
                Ok(rows)
            })
            .await?)
    }

    async fn begin_load(&self, realm_url: &str, _url: &str) -> Result<LoadStamp, LookupError> {
        if !self.config.get_durable_guard() {
            return Ok(LoadStamp::UNGUARDED);
        }
        Ok(self
            .bounded("stamp load", async {
                let client = Checkout::new(self.client("stamp load").await?);
                let stamp = store::stamp(&self.sql, client.client(), realm_url).await?;
                client.finish();
                Ok(stamp)
            })
            .await?)
    }

    /// Unguarded: one `INSERT … ON CONFLICT`. Guarded: a transaction that takes the realm's
    /// shared lock and writes only if still fresh (see guard.rs), pipelined in one round trip.
    async fn upsert(
        &self,
        entry: &CacheEntry,
        stamp: LoadStamp,
    ) -> Result<PersistOutcome, LookupError> {
        let row = store::RowParams::new(entry)?;
        let guarded = self.config.get_durable_guard() && !stamp.is_unguarded();
        Ok(self
            .bounded("upsert", async {
                let client = Checkout::new(self.client("upsert").await?);
                let c = client.client();
                if !guarded {
                    store::plain_upsert(&self.sql, c, &row).await?;
                    client.finish();
                    return Ok(PersistOutcome::Written);
                }
                // Dropped before the COMMIT's answer (an error, a timeout), the connection is
                // closed, which rolls back.
                let sql = &self.sql;
                sql.query(c, &sql.begin, &[]).await.map_err(query_error("upsert"))?;
                let outcome = store::guarded_insert(sql, c, &row, stamp).await?;
                sql.query(c, &sql.commit, &[]).await.map_err(query_error("upsert"))?;
                client.finish();
                Ok(outcome)
            })
            .await?)
    }
}

impl DbAdapter for PgAdapter {
    async fn consumers(
        &self,
        realm_url: &str,
        names: &[String],
    ) -> Result<Vec<ConsumerRow>, LookupError> {
        Ok(self
            .bounded("consumer closure", async {
                let client = Checkout::new(self.client("consumer closure").await?);
                let rows =
                    invalidate::closure(&self.sql, client.client(), realm_url, names).await?;
                client.finish();
                Ok(rows)
            })
            .await?)
    }

    /// DELETE and NOTIFY committed in one transaction (one round trip, three when the module has
    /// consumers: see invalidate.rs); for a
    /// module fan-out, consumers persisted since `invalidation` was computed are added under
    /// the realm's lock. If the transaction fails at a NOTIFY or at COMMIT it is retried once,
    /// then run without its NOTIFYs (the rows are deleted, a warning is logged and
    /// [`PgAdapterStats::unbroadcast_deletes`] counts it).
    async fn apply_invalidation(&self, invalidation: &Invalidation) -> Result<u64, LookupError> {
        Ok(self.invalidate(invalidation).await?.deleted)
    }

    /// The closure is computed inside the invalidation's transaction: one query for it instead
    /// of two, and, with the durable guard (which takes the realm's lock first), no window for
    /// a late consumer.
    async fn invalidate_modules(
        &self,
        realm_url: &str,
        seeds: &[String],
    ) -> Result<ModulesInvalidated, LookupError> {
        let request =
            Invalidation::Modules { realm_url: realm_url.to_owned(), urls: seeds.to_vec() };
        let applied = self.invalidate(&request).await?;
        let urls = match applied.effective {
            Invalidation::Modules { urls, .. } => urls,
            _ => seeds.to_vec(),
        };
        Ok(ModulesInvalidated { urls, deleted: applied.deleted })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server process behind a pooled connection.
    async fn backend(client: &Object) -> i32 {
        let row = client.query_one("SELECT pg_backend_pid()", &[]).await.expect("pid");
        row.get(0)
    }

    /// Each connection runs only the statements it prepared itself: two at once each prepare
    /// their own, and a connection closed and replaced, again and again (its successor may be
    /// given the same memory), leaves nothing its successor would take for its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_connection_runs_the_statements_it_prepared() {
        let Some(url) = behaviour_suite::database_url("statements per connection") else {
            return;
        };
        let schema = behaviour_suite::unique_name("stmts");
        let adapter = PgAdapter::connect(PgConfig::new(url).schema(schema).pool_size(2))
            .await
            .expect("connect");
        let sql = &adapter.sql;
        async fn count(sql: &Sql, client: &Object) {
            sql.query(client, &sql.row_count, &[]).await.expect("row count");
        }
        let (a, b) = (adapter.client("t").await.unwrap(), adapter.client("t").await.unwrap());
        count(sql, &a).await;
        count(sql, &b).await;
        assert_eq!(sql.connections(), 2);
        drop((a, b));
        for turn in 0..20 {
            let client = adapter.client("t").await.expect("a connection");
            count(sql, &client).await;
            // Out of the pool and closed: the next turn opens a new connection.
            drop(Object::take(client));
            assert!(sql.connections() <= 3, "turn {turn}: {} tables", sql.connections());
        }
    }

    /// An operation waiting for a connection of a pool all in use gives up at the operation
    /// timeout, with the timeout's error, and the pool serves again once one is returned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_for_a_busy_pool_ends_at_the_operation_timeout() {
        let Some(url) = behaviour_suite::database_url("busy pool") else { return };
        let schema = behaviour_suite::unique_name("busy");
        let config = PgConfig::new(url)
            .schema(schema)
            .pool_size(1)
            .operation_timeout(std::time::Duration::from_millis(300));
        let adapter = PgAdapter::connect(config).await.expect("connect");
        let held = adapter.client("t").await.expect("the only connection");
        let limit = std::time::Duration::from_secs(10);
        let waited = tokio::time::timeout(limit, adapter.row_count()).await;
        match waited.expect("bounded by the operation timeout, not waiting for ever") {
            Err(PgError::Timeout { operation: "count rows", .. }) => {}
            other => panic!("expected the operation's timeout, got {other:?}"),
        }
        drop(held);
        assert_eq!(adapter.row_count().await.expect("served again"), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pool_hands_out_the_connection_returned_last() {
        let Some(url) = behaviour_suite::database_url("pool order") else { return };
        let schema = behaviour_suite::unique_name("pool");
        let adapter = PgAdapter::connect(PgConfig::new(url).schema(schema).pool_size(4))
            .await
            .expect("connect");
        // Three connections open at once, returned in order: the last one is the warm one.
        let held =
            [adapter.client("t").await, adapter.client("t").await, adapter.client("t").await]
                .map(|client| client.expect("a connection"));
        let mut pids = Vec::new();
        for client in &held {
            pids.push(backend(client).await);
        }
        drop(held);
        assert_eq!(adapter.open_connections(), 3);
        let last = *pids.last().expect("three");
        for turn in 0..4 {
            let client = adapter.client("t").await.expect("a connection");
            assert_eq!(backend(&client).await, last, "turn {turn}: not the connection used last");
        }
    }
}
