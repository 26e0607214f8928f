//! The traits the lookup is generic over: storage, rendering, remote realms, and the sink the
//! invalidation listener feeds.

use std::future::Future;

use crate::error::LookupError;
use crate::types::{
    CacheEntry, ConsumerRow, EntryScope, PrerenderRequest, PrerenderResponse, ProbeResult,
};
use crate::wire::Invalidation;

/// An opaque marker a backend hands out when a load starts and checks when it persists.
///
/// Backends without a durable guard return [`LoadStamp::UNGUARDED`] and ignore it; a backend
/// with one (the Postgres adapter) records its invalidation sequence here, so that a persist
/// can be refused when the database saw an invalidation after the load began. Writing with
/// [`LoadStamp::UNGUARDED`] bypasses a durable guard (for seeding and repairs, not loads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LoadStamp(pub i64);

impl LoadStamp {
    /// No stamp: the write is not checked against invalidations.
    pub const UNGUARDED: LoadStamp = LoadStamp(i64::MIN);

    /// Whether this stamp asks for no check.
    pub fn is_unguarded(self) -> bool {
        self == Self::UNGUARDED
    }
}

/// What became of an upsert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersistOutcome {
    /// The row was written.
    Written,
    /// The backend's durable guard saw an invalidation after the load's stamp and refused.
    Stale,
}

/// The row operations a load needs: read, stamp, write. Each backend writes its own SQL.
///
/// A [`DbAdapter`] is one; so is a [`PopulateLease`](crate::PopulateLease), which runs them on
/// the connection that holds a cross-process populate lock. Every method is one round trip
/// (or one transaction) so that the core controls ordering. Implementations must never leave
/// a half-written row: an upsert lands whole or not at all.
pub trait RowStore: Send + Sync + 'static {
    /// Rows of `scope` whose `url` is `url` or whose `file_alias` is `alias`, in any order.
    fn read_rows(
        &self,
        scope: &EntryScope,
        url: &str,
        alias: &str,
    ) -> impl Future<Output = Result<Vec<CacheEntry>, LookupError>> + Send;

    /// Rows of `scope` whose `url` or `file_alias` is one of `names`, in one query.
    fn read_rows_batch(
        &self,
        scope: &EntryScope,
        names: &[String],
    ) -> impl Future<Output = Result<Vec<CacheEntry>, LookupError>> + Send;

    /// Called when a load starts, after the in-memory snapshot. The default has no guard.
    fn begin_load(
        &self,
        _realm_url: &str,
        _url: &str,
    ) -> impl Future<Output = Result<LoadStamp, LookupError>> + Send {
        async { Ok(LoadStamp::UNGUARDED) }
    }

    /// Inserts or replaces the row keyed by (`url`, `cache_scope`, `auth_user_id`), unless the
    /// backend's durable guard says the load that produced it is stale.
    fn upsert(
        &self,
        entry: &CacheEntry,
        stamp: LoadStamp,
    ) -> impl Future<Output = Result<PersistOutcome, LookupError>> + Send;
}

/// Storage for the `modules` table, in cache terms: the [`RowStore`] operations plus the
/// consumer closure and the invalidation (delete and tell peers).
pub trait DbAdapter: RowStore {
    /// Every row of `realm_url` (any scope or user) that depends, directly or transitively, on
    /// one of `names`: a row whose `deps` contain a name is a consumer, and its `url` and
    /// `file_alias` become names in turn. One query; order does not matter (the core orders).
    fn consumers(
        &self,
        realm_url: &str,
        names: &[String],
    ) -> impl Future<Output = Result<Vec<ConsumerRow>, LookupError>> + Send;

    /// Deletes what `invalidation` covers and tells peers, atomically where the backend can:
    /// peers hear of it if and only if the delete committed. Returns the rows deleted.
    fn apply_invalidation(
        &self,
        invalidation: &Invalidation,
    ) -> impl Future<Output = Result<u64, LookupError>> + Send;

    /// BEHAVIOUR §4.1 steps 2–4 for one module: finds the transitive consumers of `seeds` (the
    /// module's variants) in `realm_url`, orders the fan-out with [`fan_out`](crate::fan_out),
    /// and deletes and broadcasts it as [`apply_invalidation`](Self::apply_invalidation) does.
    ///
    /// The default is [`consumers`](Self::consumers) then `apply_invalidation`. A backend
    /// that can should do it all in one transaction (the Postgres adapter computes the
    /// closure under the realm's lock and pipelines the rest), so that no consumer persisted
    /// between the closure and the delete escapes.
    fn invalidate_modules(
        &self,
        realm_url: &str,
        seeds: &[String],
    ) -> impl Future<Output = Result<ModulesInvalidated, LookupError>> + Send {
        async move {
            let consumers = self.consumers(realm_url, seeds).await?;
            let urls = crate::fan_out(seeds.to_vec(), consumers);
            let invalidation =
                Invalidation::Modules { realm_url: realm_url.to_owned(), urls: urls.clone() };
            let deleted = self.apply_invalidation(&invalidation).await?;
            Ok(ModulesInvalidated { urls, deleted })
        }
    }
}

/// What [`DbAdapter::invalidate_modules`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModulesInvalidated {
    /// Every name invalidated, in fan-out order (seeds first).
    pub urls: Vec<String>,
    /// Rows deleted.
    pub deleted: u64,
}

/// The expensive computation the cache exists to avoid repeating.
pub trait Prerenderer: Send + Sync + 'static {
    /// Renders one candidate module. `Err` means the renderer itself failed (nothing is
    /// stored); a module that fails to render is an `Ok` response with status `error`.
    fn prerender(
        &self,
        request: &PrerenderRequest,
    ) -> impl Future<Output = Result<PrerenderResponse, LookupError>> + Send;
}

/// Decides the realm of a module no local realm owns (BEHAVIOUR §3.3).
pub trait RealmProbe: Send + Sync + 'static {
    /// Probes `module_url` as `user`. `Ok(None)` means "not a realm module"; an error is logged
    /// by the caller and treated the same way.
    fn probe(
        &self,
        module_url: &str,
        user: &str,
    ) -> impl Future<Output = Result<Option<ProbeResult>, LookupError>> + Send;
}

/// The probe used when no remote realms are expected: it never claims a module.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRemoteRealms;

impl RealmProbe for NoRemoteRealms {
    async fn probe(
        &self,
        _module_url: &str,
        _user: &str,
    ) -> Result<Option<ProbeResult>, LookupError> {
        Ok(None)
    }
}

/// Where invalidations heard from peers are replayed (the listener calls this).
///
/// Methods are synchronous on purpose: a bump must take effect before the next notification
/// is read, with no await in between.
pub trait InvalidationSink: Send + Sync + 'static {
    /// Bumps the module generation of each URL of `realm_url` and drops matching in-flight loads.
    fn bump_modules(&self, realm_url: &str, urls: &[String]);
    /// Bumps the generation of a realm and drops its in-flight loads.
    fn bump_realm(&self, realm_url: &str);
    /// Bumps the global generation and drops every in-flight load.
    fn bump_global(&self);

    /// The listener lost its connection: invalidations may now go unheard until it is back.
    /// The default does nothing (the invalidations missed are replayed when it is back, or
    /// [`resync`](Self::resync) discards everything).
    fn connection_lost(&self) {}

    /// The listener could not prove it heard every invalidation (see the listener's catch-up):
    /// everything in flight must be discarded. The default is [`bump_global`](Self::bump_global).
    fn resync(&self) {
        self.bump_global();
    }

    /// The listener is listening again, after a reconnect and after the invalidations it
    /// missed were replayed (or after [`resync`](Self::resync)).
    fn connection_restored(&self) {}

    /// Replays one parsed invalidation.
    fn apply(&self, invalidation: &Invalidation) {
        match invalidation {
            Invalidation::Modules { realm_url, urls } => self.bump_modules(realm_url, urls),
            Invalidation::Realm { realm_url } => self.bump_realm(realm_url),
            Invalidation::Global => self.bump_global(),
        }
    }
}
