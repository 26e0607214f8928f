//! The lookup's metrics, read back through a recording backend (one test: the recorder is
//! global to the process).

use adapter_sqlite::SqliteAdapter;
use behaviour_suite::metrics::Totals;
use behaviour_suite::{FakeModule, FakeRenderer, bounded};
use lookup_core::{CachingLookup, CodeRef, L1Config, Realm};

const REALM: &str = "https://realm.test/";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_renders_coalescing_and_invalidations_are_counted() {
    let totals = Totals::install();

    let renderer = FakeRenderer::default();
    let lookup = CachingLookup::builder(SqliteAdapter::open_in_memory().unwrap(), renderer.clone())
        .l1(L1Config::default())
        .realm(Realm { url: REALM.into(), owner: "@o:test".into(), public: true })
        .build()
        .unwrap();
    let card = format!("{REALM}card.gts");
    renderer.set(&card, FakeModule::ready(&["Card"], &[]));

    // Two callers of a cold module: one render, one of them joins the other's load.
    let gate = renderer.gate(&card);
    let first = tokio::spawn({
        let lookup = lookup.clone();
        let card = card.clone();
        async move { lookup.get_module_entry(&card, None).await }
    });
    gate.entered().await;
    let second = tokio::spawn({
        let lookup = lookup.clone();
        let card = card.clone();
        async move { lookup.get_module_entry(&card, None).await }
    });
    bounded("the second caller to join", async {
        while lookup.in_flight_waiters() < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    gate.open();
    bounded("both", first).await.unwrap().unwrap();
    bounded("both", second).await.unwrap().unwrap();
    assert_eq!(totals.counter("deflookup_prerenders_total", &[]), 1);
    assert_eq!(totals.counter("deflookup_coalesced_waiters_total", &[]), 1);
    assert_eq!(totals.counter("deflookup_lookups_total", &[("result", "miss")]), 2);
    assert_eq!(totals.samples("deflookup_miss_seconds", &[]), 2);

    // Hits: the tier, then the table once the tier was emptied by a bump of everything.
    let code_ref = CodeRef::new(card.clone(), "Card");
    lookup.lookup_definition(&code_ref, None).await.unwrap();
    lookup_core::InvalidationSink::bump_global(&lookup);
    lookup.lookup_definition(&code_ref, None).await.unwrap();
    let hit = [("result", "hit"), ("tier", "l1")];
    assert_eq!(totals.counter("deflookup_lookups_total", &hit), 1);
    let hit = [("result", "hit"), ("tier", "db")];
    assert_eq!(totals.counter("deflookup_lookups_total", &hit), 1);
    assert_eq!(totals.samples("deflookup_hit_seconds", &[("tier", "l1")]), 1);

    // Invalidations made here, by kind, with their durations.
    lookup.invalidate(&card).await.unwrap();
    lookup.clear_realm(REALM).await.unwrap();
    lookup.clear_all().await.unwrap();
    for kind in ["module", "realm", "global"] {
        assert_eq!(totals.counter("deflookup_invalidations_total", &[("kind", kind)]), 1);
        assert_eq!(totals.samples("deflookup_invalidate_seconds", &[("kind", kind)]), 1);
    }
}
