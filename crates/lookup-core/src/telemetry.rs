//! What the lookup reports through the [`metrics`] facade. The application picks the exporter
//! (Prometheus, StatsD, …) by installing a recorder; without one, every call is a no-op.
//!
//! Names and labels (all counters end in `_total`, durations are in seconds):
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `deflookup_lookups_total` | counter | `result` = `hit` \| `miss`, `tier` = `l1` \| `db` (hits) | entries asked for |
//! | `deflookup_hit_seconds` | histogram | `tier` | a hit, from the call to the entry |
//! | `deflookup_miss_seconds` | histogram | | a miss, from the call to the entry (render included) |
//! | `deflookup_prerenders_total` | counter | | renders started |
//! | `deflookup_coalesced_waiters_total` | counter | | callers that joined a load already in flight |
//! | `deflookup_guard_refusals_total` | counter | | results not stored: an invalidation overtook their load |
//! | `deflookup_invalidations_total` | counter | `kind` = `module` \| `realm` \| `global` | invalidations this process made |
//! | `deflookup_invalidate_seconds` | histogram | `kind` | one invalidation, fan-out, delete and broadcast included |
//! | `deflookup_populate_total` | counter | `outcome` = `won` \| `waited` \| `timed_out` \| `took_over` | cross-process populate rounds |
//!
//! The listener (`invalidation-listener`) adds its own, documented there and in
//! `docs/OPERATIONS.md`.

use std::time::Instant;

/// The tier that answered a hit (`tier` label).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Tier {
    L1,
    Db,
}

pub(crate) fn hit(tier: Tier, started: Instant) {
    // Literal labels: the macros then build their keys once, statically, instead of a label
    // vector (and its hash) per call, which a hit would pay for even without a recorder.
    let (counter, histogram) = match tier {
        Tier::L1 => (
            ::metrics::counter!("deflookup_lookups_total", "result" => "hit", "tier" => "l1"),
            ::metrics::histogram!("deflookup_hit_seconds", "tier" => "l1"),
        ),
        Tier::Db => (
            ::metrics::counter!("deflookup_lookups_total", "result" => "hit", "tier" => "db"),
            ::metrics::histogram!("deflookup_hit_seconds", "tier" => "db"),
        ),
    };
    counter.increment(1);
    histogram.record(started.elapsed());
}

pub(crate) fn miss(started: Instant) {
    ::metrics::counter!("deflookup_lookups_total", "result" => "miss").increment(1);
    ::metrics::histogram!("deflookup_miss_seconds").record(started.elapsed());
}

pub(crate) fn prerender() {
    ::metrics::counter!("deflookup_prerenders_total").increment(1);
}

pub(crate) fn coalesced_waiter() {
    ::metrics::counter!("deflookup_coalesced_waiters_total").increment(1);
}

pub(crate) fn guard_refusal() {
    ::metrics::counter!("deflookup_guard_refusals_total").increment(1);
}

pub(crate) fn invalidation(kind: &'static str, started: Instant) {
    ::metrics::counter!("deflookup_invalidations_total", "kind" => kind).increment(1);
    ::metrics::histogram!("deflookup_invalidate_seconds", "kind" => kind).record(started.elapsed());
}

pub(crate) fn populate(outcome: &'static str) {
    ::metrics::counter!("deflookup_populate_total", "outcome" => outcome).increment(1);
}
