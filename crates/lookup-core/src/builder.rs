//! [`LookupBuilder`]: a lookup's optional parts, each set by name.

use crate::error::LookupError;
use crate::lookup::{CachingLookup, LookupConfig};
use crate::populate::{PopulateCoordinator, Uncoordinated};
use crate::traits::{DbAdapter, NoRemoteRealms, Prerenderer, RealmProbe};
use crate::{L1Config, Realm};

/// Builds a [`CachingLookup`]: storage and renderer first, then only the optional parts the
/// application needs. Start with [`CachingLookup::builder`].
///
/// ```
/// # use lookup_core::{CachingLookup, LookupConfig};
/// # fn parts<D: lookup_core::DbAdapter, P: lookup_core::Prerenderer>(
/// #     db: D,
/// #     renderer: P,
/// # ) -> Result<(), lookup_core::LookupError> {
/// let lookup = CachingLookup::builder(db, renderer)
///     .l1(lookup_core::L1Config::default())
///     .realm(lookup_core::Realm {
///         url: "https://realm.example/".into(),
///         owner: "@owner:example".into(),
///         public: true,
///     })
///     .build()?;
/// # Ok::<(), lookup_core::LookupError>(())
/// # }
/// ```
#[derive(Debug)]
#[must_use = "a builder does nothing until `build`"]
pub struct LookupBuilder<D, P, R = NoRemoteRealms, C = Uncoordinated> {
    db: D,
    prerenderer: P,
    probe: R,
    config: LookupConfig,
    coordinator: Option<C>,
    realms: Vec<Realm>,
}

impl<D: DbAdapter, P: Prerenderer> CachingLookup<D, P> {
    /// A builder over `db` that renders with `prerenderer`; without further settings it
    /// builds what [`CachingLookup::new`] does.
    pub fn builder(db: D, prerenderer: P) -> LookupBuilder<D, P> {
        LookupBuilder {
            db,
            prerenderer,
            probe: NoRemoteRealms,
            config: LookupConfig::default(),
            coordinator: None,
            realms: Vec::new(),
        }
    }
}

impl<D: DbAdapter, P: Prerenderer, R: RealmProbe, C: PopulateCoordinator>
    LookupBuilder<D, P, R, C>
{
    /// Asks `probe` about modules no local realm owns (default: none are remote).
    pub fn probe<R2: RealmProbe>(self, probe: R2) -> LookupBuilder<D, P, R2, C> {
        let LookupBuilder { db, prerenderer, config, coordinator, realms, .. } = self;
        LookupBuilder { db, prerenderer, probe, config, coordinator, realms }
    }

    /// Coalesces cold loads across processes through `coordinator` (default: in-process
    /// coalescing only).
    pub fn coordinator<C2: PopulateCoordinator>(
        self,
        coordinator: C2,
    ) -> LookupBuilder<D, P, R, C2> {
        let LookupBuilder { db, prerenderer, probe, config, realms, .. } = self;
        LookupBuilder { db, prerenderer, probe, config, coordinator: Some(coordinator), realms }
    }

    /// All the tunables at once (default: [`LookupConfig::default`]).
    pub fn config(mut self, config: LookupConfig) -> Self {
        self.config = config;
        self
    }

    /// Turns the in-process tier on (default: off).
    pub fn l1(mut self, l1: L1Config) -> Self {
        self.config.l1 = Some(l1);
        self
    }

    /// Registers a local realm when the lookup is built (see
    /// [`CachingLookup::register_realm`]).
    pub fn realm(mut self, realm: Realm) -> Self {
        self.realms.push(realm);
        self
    }

    /// The lookup, with its realms registered; fails as
    /// [`register_realm`](CachingLookup::register_realm) does on a bad or duplicate realm.
    pub fn build(self) -> Result<CachingLookup<D, P, R, C>, LookupError> {
        let LookupBuilder { db, prerenderer, probe, config, coordinator, realms } = self;
        let lookup = CachingLookup::with_coordinator(db, prerenderer, probe, config, coordinator);
        for realm in realms {
            lookup.register_realm(realm)?;
        }
        Ok(lookup)
    }
}
