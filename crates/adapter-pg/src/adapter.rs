//! [`PgAdapter`]: the `DbAdapter` on a pool of tokio-postgres connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use lookup_core::wire::encode_payloads;
use lookup_core::{
    CacheEntry, ConsumerRow, DbAdapter, EntryScope, Invalidation, LoadStamp, LookupError,
    PersistOutcome, RowStore,
};
use tokio_postgres::NoTls;

use crate::config::PgConfig;
use crate::error::PgError;
use crate::store::{self, query_error};
use crate::{guard, schema};

/// The consumer closure of names `$2` in realm `$1`, in one recursive query. Each step finds
/// rows whose deps contain a name with `@>`, which the GIN index on deps answers without
/// scanning the realm; UNION de-duplicates, so a dependency cycle ends.
const CONSUMERS: &str = "WITH RECURSIVE consumer(url, file_alias, deps) AS ( \
        SELECT m.url, m.file_alias, m.deps FROM unnest($2::text[]) AS v(name) \
        JOIN modules m ON m.resolved_realm_url = $1 AND m.deps @> jsonb_build_array(v.name) \
      UNION \
        SELECT m.url, m.file_alias, m.deps FROM consumer c \
        CROSS JOIN LATERAL (VALUES (c.url), (c.file_alias)) AS x(name) \
        JOIN modules m ON m.resolved_realm_url = $1 AND m.deps @> jsonb_build_array(x.name) \
    ) SELECT url, file_alias, deps FROM consumer";

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

    /// Deletes what `invalidation` covers; returns the number of rows.
    async fn delete(
        client: &impl deadpool_postgres::GenericClient,
        invalidation: &Invalidation,
    ) -> Result<u64, tokio_postgres::Error> {
        match invalidation {
            Invalidation::Modules { realm_url, urls } => {
                client
                    .execute(
                        "DELETE FROM modules WHERE resolved_realm_url = $1 AND \
                         (url_hash = ANY (SELECT md5(u) FROM unnest($2::text[]) AS u) \
                          OR file_alias = ANY ($2))",
                        &[realm_url, urls],
                    )
                    .await
            }
            Invalidation::Realm { realm_url } => {
                client
                    .execute("DELETE FROM modules WHERE resolved_realm_url = $1", &[realm_url])
                    .await
            }
            Invalidation::Global => client.execute("DELETE FROM modules", &[]).await,
        }
    }

    /// One attempt: the guard record, the DELETE and every NOTIFY in one transaction; returns
    /// the rows deleted and the payloads sent. The error says whether the invalidation itself
    /// failed (`Err(Ok(e))`) or only what came after its DELETE (`Err(Err(e))`).
    async fn invalidate_in_transaction(
        &self,
        client: &mut Object,
        invalidation: &Invalidation,
        broadcast: bool,
    ) -> Result<(u64, usize), Result<tokio_postgres::Error, tokio_postgres::Error>> {
        let tx = client.transaction().await.map_err(Ok)?;
        let effective = if self.config.guards_persists() {
            self.record(&tx, invalidation).await.map_err(Ok)?
        } else {
            invalidation.clone()
        };
        let deleted = Self::delete(&tx, &effective).await.map_err(Ok)?;
        let payloads = if broadcast && self.config.broadcasts() {
            encode_payloads(&effective, Some(&self.origin))
        } else {
            Vec::new()
        };
        let channel = self.config.channel_name();
        for payload in &payloads {
            tx.execute("SELECT pg_notify($1, $2)", &[&channel, payload]).await.map_err(Err)?;
        }
        // NOTIFY is delivered at commit, so peers hear it if and only if the delete commits.
        tx.commit().await.map_err(Err)?;
        Ok((deleted, payloads.len()))
    }

    /// Takes the invalidation's lock and records it for the durable guard (see guard.rs).
    /// Returns what to delete and broadcast: for a module fan-out, the fan-out plus every
    /// consumer of it persisted since the caller computed it.
    ///
    /// The caller's fan-out was computed before this lock was held, so a peer may have
    /// persisted a new consumer in between (its guarded persist saw no record yet and landed).
    /// Under the lock the closure is computed again: every persist that committed earlier is
    /// visible to this statement, and every later one waits for the lock and then sees the
    /// records written here.
    async fn record(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        invalidation: &Invalidation,
    ) -> Result<Invalidation, tokio_postgres::Error> {
        match invalidation {
            Invalidation::Modules { realm_url, urls } => {
                let lock = tx.prepare_cached(guard::LOCK_REALM_EXCLUSIVE).await?;
                tx.execute(&lock, &[&guard::LOCK_NS_REALM, realm_url, &guard::LOCK_NS_GLOBAL])
                    .await?;
                let closure = tx.prepare_cached(CONSUMERS).await?;
                let mut urls = urls.clone();
                for row in tx.query(&closure, &[realm_url, &urls]).await? {
                    for name in [
                        row.get::<_, String>(0),
                        row.get::<_, Option<String>>(1).unwrap_or_default(),
                    ] {
                        if !name.is_empty() && !urls.contains(&name) {
                            urls.push(name);
                        }
                    }
                }
                let record = tx.prepare_cached(guard::RECORD_MODULES).await?;
                tx.execute(&record, &[realm_url, &urls]).await?;
                let horizon = self.config.guard_horizon_duration().as_secs_f64();
                let prune = tx.prepare_cached(guard::PRUNE).await?;
                tx.execute(&prune, &[realm_url, &horizon]).await?;
                Ok(Invalidation::Modules { realm_url: realm_url.clone(), urls })
            }
            Invalidation::Realm { realm_url } => {
                let lock = tx.prepare_cached(guard::LOCK_REALM_EXCLUSIVE).await?;
                tx.execute(&lock, &[&guard::LOCK_NS_REALM, realm_url, &guard::LOCK_NS_GLOBAL])
                    .await?;
                let record = tx.prepare_cached(guard::RECORD_CLEAR).await?;
                tx.execute(&record, &[realm_url]).await?;
                Ok(invalidation.clone())
            }
            Invalidation::Global => {
                let lock = tx.prepare_cached(guard::LOCK_GLOBAL_EXCLUSIVE).await?;
                tx.execute(&lock, &[&guard::LOCK_NS_GLOBAL]).await?;
                let record = tx.prepare_cached(guard::RECORD_CLEAR).await?;
                tx.execute(&record, &[&""]).await?;
                Ok(invalidation.clone())
            }
        }
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
        let statement =
            client.prepare_cached(CONSUMERS).await.map_err(query_error("consumer closure"))?;
        let rows = client
            .query(&statement, &[&realm_url, &names])
            .await
            .map_err(query_error("consumer closure"))?;
        rows.iter()
            .map(|row| {
                let url: String = row.get(0);
                let deps: Vec<String> =
                    store::decode_json(&url, "deps", row.get(2))?.unwrap_or_default();
                let alias: Option<String> = row.get(1);
                Ok(ConsumerRow {
                    file_alias: alias.unwrap_or_else(|| lookup_core::urls::file_alias(&url)),
                    url,
                    deps,
                })
            })
            .collect::<Result<_, PgError>>()
            .map_err(LookupError::from)
    }

    /// DELETE and NOTIFY in one transaction. If the transaction fails after its DELETE (at a
    /// NOTIFY or at COMMIT), it is retried once; if that fails too, the rows are deleted
    /// without a broadcast and a warning is logged. Rationale: the rows are shared, so the
    /// delete is what every peer reads; the broadcast only stops peers' in-flight loads from
    /// persisting, which the next invalidation (or the durable guard) also covers, whereas
    /// failing the whole invalidation would leave stale rows for everyone.
    async fn apply_invalidation(&self, invalidation: &Invalidation) -> Result<u64, LookupError> {
        let mut client = self.client("invalidate").await?;
        let mut last_error = None;
        for attempt in 1..=2 {
            match self.invalidate_in_transaction(&mut client, invalidation, true).await {
                Ok((deleted, sent)) => {
                    self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
                    self.counters.payloads_sent.fetch_add(sent as u64, Ordering::Relaxed);
                    return Ok(deleted);
                }
                Err(Ok(delete_error)) => return Err(query_error("invalidate")(delete_error).into()),
                Err(Err(broadcast_error)) => {
                    self.counters.broadcast_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(attempt, error = %broadcast_error, "invalidation broadcast failed");
                    last_error = Some(broadcast_error);
                    if client.is_closed() {
                        client = self.client("invalidate").await?;
                    }
                }
            }
        }
        // The same transaction without its NOTIFYs: the guard record and the DELETE still land.
        let (deleted, _) = self
            .invalidate_in_transaction(&mut client, invalidation, false)
            .await
            .map_err(|e| query_error("invalidate")(e.unwrap_or_else(|e| e)))?;
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        self.counters.unbroadcast_deletes.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            error = %last_error.map(|e| e.to_string()).unwrap_or_default(),
            deleted,
            "rows deleted WITHOUT a broadcast: peers' in-flight loads may persist stale rows"
        );
        Ok(deleted)
    }
}
