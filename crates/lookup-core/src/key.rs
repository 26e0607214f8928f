//! The identity of a load, shared by the load engine (the key of its coalescing map) and the
//! in-process tier (the key of its entries).

use crate::types::EntryScope;

/// The coalescing key of BEHAVIOUR §3.6: realm, requested URL, scope and cache user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct LoadKey {
    pub(crate) scope: EntryScope,
    pub(crate) url: String,
}
