//! [`PgAdapter`]: the `DbAdapter` on a pool of tokio-postgres connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use lookup_core::{
    CacheEntry, ConsumerRow, DbAdapter, EntryScope, Invalidation, LoadStamp, LookupError,
    ModulesInvalidated, PersistOutcome, RowStore,
};
use tokio_postgres::NoTls;

use crate::config::PgConfig;
use crate::error::PgError;
use crate::invalidate::{self, Applied, Failure, Plan};
use crate::schema;
use crate::store::{self, query_error};

/// Counters of what the adapter broadcast.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
    origin: Arc<str>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for PgAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgAdapter")
            .field("config", &self.config)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// A process-unique id for the `"o"` key of payloads: the pid plus a random-seeded hash, so
/// two adapters in one process (as in tests) differ too.
fn new_origin() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("{:x}-{:016x}", std::process::id(), hasher.finish())
}

impl PgAdapter {
    /// Connects a pool, checks the server answers, and creates or upgrades the schema.
    pub async fn connect(config: PgConfig) -> Result<Self, PgError> {
        let pg_config = config.tokio_postgres_config()?;
        let manager = Manager::from_config(
            pg_config,
            NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager).max_size(config.pool_max()).build().map_err(|e| {
            PgError::InvalidConfig {
                url: config.redacted_url(),
                reason: "cannot build the connection pool".to_owned(),
                source: Some(Box::new(e)),
            }
        })?;
        let mut client = pool
            .get()
            .await
            .map_err(|e| PgError::Connect { url: config.redacted_url(), source: Box::new(e) })?;
        schema::migrate(&mut client, config.schema_name()).await?;
        drop(client);
        let origin: Arc<str> = new_origin().into();
        tracing::debug!(url = %config.redacted_url(), %origin, "connected to Postgres");
        Ok(PgAdapter { pool, config: Arc::new(config), origin, counters: Arc::default() })
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

    /// Number of rows in the table (for tests and the CLI).
    pub async fn row_count(&self) -> Result<u64, PgError> {
        let client = self.client("count rows").await?;
        let row = client
            .query_one("SELECT count(*) FROM modules", &[])
            .await
            .map_err(query_error("count rows"))?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    pub(crate) async fn client(&self, operation: &'static str) -> Result<Object, PgError> {
        self.pool.get().await.map_err(|e| PgError::Query { operation, source: Box::new(e) })
    }

    /// One invalidation transaction, with the broadcast policy: if the transaction fails at a
    /// NOTIFY or at COMMIT, it is retried once; if that fails too, it runs once more without
    /// its NOTIFYs (the guard record and the DELETE still land) and a warning is logged.
    /// Rationale: the rows are shared, so the delete is what every peer reads; the broadcast
    /// only stops peers' in-flight loads from persisting, which the durable guard (or the
    /// next invalidation) also covers, whereas failing the whole invalidation would leave
    /// stale rows for everyone.
    async fn invalidate(&self, request: &Invalidation) -> Result<Applied, LookupError> {
        let horizon_secs = self.config.guard_horizon_duration().as_secs_f64();
        let guarded = self.config.guards_persists();
        let broadcasting = Plan {
            guarded,
            notify: self.config.broadcasts().then(|| (self.config.channel_name(), &*self.origin)),
            horizon_secs,
        };
        let mut last_error = None;
        // After a failed attempt, the retry starts from that attempt's whole fan-out: if it did
        // commit (a reply lost at COMMIT), its consumers' rows are gone, and a closure from the
        // seeds alone would no longer find them to report.
        let mut request = request.clone();
        for attempt in 1..=2 {
            let client = self.client("invalidate").await?;
            match invalidate::run(client, &request, &broadcasting).await {
                Ok(applied) => {
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
        let silent = Plan { guarded, notify: None, horizon_secs };
        let client = self.client("invalidate").await?;
        let applied = match invalidate::run(client, &request, &silent).await {
            Ok(applied) => applied,
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
}

impl RowStore for PgAdapter {
    async fn read_rows(
        &self,
        scope: &EntryScope,
        url: &str,
        alias: &str,
    ) -> Result<Vec<CacheEntry>, LookupError> {
        let client = self.client("read row").await?;
        Ok(store::read_rows(&client, scope, url, alias).await?)
    }

    async fn read_rows_batch(
        &self,
        scope: &EntryScope,
        names: &[String],
    ) -> Result<Vec<CacheEntry>, LookupError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client("read rows").await?;
        Ok(store::read_rows_batch(&client, scope, names).await?)
    }

    async fn begin_load(&self, realm_url: &str, _url: &str) -> Result<LoadStamp, LookupError> {
        if !self.config.guards_persists() {
            return Ok(LoadStamp::UNGUARDED);
        }
        let client = self.client("stamp load").await?;
        Ok(store::stamp(&client, realm_url).await?)
    }

    /// Unguarded: one `INSERT … ON CONFLICT`. Guarded: a transaction that takes the realm's
    /// shared lock and writes only if still fresh (see guard.rs), pipelined in one round trip.
    async fn upsert(
        &self,
        entry: &CacheEntry,
        stamp: LoadStamp,
    ) -> Result<PersistOutcome, LookupError> {
        let row = store::RowParams::new(entry)?;
        let mut client = self.client("upsert").await?;
        if !self.config.guards_persists() || stamp.is_unguarded() {
            store::plain_upsert(&client, &row).await?;
            return Ok(PersistOutcome::Written);
        }
        let tx = client.transaction().await.map_err(query_error("upsert"))?;
        let outcome = store::guarded_insert(&tx, &row, stamp).await?;
        tx.commit().await.map_err(query_error("upsert"))?;
        Ok(outcome)
    }
}

impl DbAdapter for PgAdapter {
    async fn consumers(
        &self,
        realm_url: &str,
        names: &[String],
    ) -> Result<Vec<ConsumerRow>, LookupError> {
        let client = self.client("consumer closure").await?;
        let statement = client
            .prepare_cached(invalidate::CONSUMERS)
            .await
            .map_err(query_error("consumer closure"))?;
        let rows = client
            .query(&statement, &[&realm_url, &names])
            .await
            .map_err(query_error("consumer closure"))?;
        Ok(invalidate::consumer_rows(&rows)?)
    }

    /// DELETE and NOTIFY in one transaction of two round trips (see invalidate.rs); for a
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
