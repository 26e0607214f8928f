//! Measures what the durable guard adds to the miss path: the stamp read when a load starts
//! plus the guarded persist, against a plain persist, on the same server in the same run.
//!
//! `DATABASE_URL=postgres://… cargo run --release -p adapter-pg --example guard_cost [N]`

use std::time::{Duration, Instant};

use adapter_pg::{PgAdapter, PgConfig};
use lookup_core::{CacheEntry, CacheScope, DbAdapter, RowStore};

const REALM: &str = "https://realm.test/bench/";

fn entry(i: usize) -> CacheEntry {
    let url = format!("{REALM}m{i}.gts");
    CacheEntry {
        file_alias: lookup_core::urls::file_alias(&url),
        url,
        cache_scope: CacheScope::Public,
        auth_user_id: String::new(),
        resolved_realm_url: REALM.to_owned(),
        definitions: serde_json::Map::new(),
        deps: vec![format!("{REALM}dep-a"), format!("{REALM}dep-b")],
        error: None,
        created_at: Some(1),
        diagnostics: None,
    }
}

async fn measure(db: &PgAdapter, n: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let row = entry(i);
        let start = Instant::now();
        let stamp = db.begin_load(REALM, &row.url).await.expect("stamp");
        db.upsert(&row, stamp).await.expect("upsert");
        samples.push(start.elapsed());
    }
    samples.sort();
    samples
}

fn pct(samples: &[Duration], p: f64) -> f64 {
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i].as_secs_f64() * 1e6
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let url = std::env::var("DATABASE_URL").expect("set DATABASE_URL");
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let stamp = std::process::id();
    let plain =
        PgConfig::new(url.clone()).schema(format!("guard_cost_off_{stamp}")).durable_guard(false);
    let guarded = PgConfig::new(url).schema(format!("guard_cost_on_{stamp}"));
    let plain = PgAdapter::connect(plain).await.expect("connect");
    let guarded = PgAdapter::connect(guarded).await.expect("connect");
    // Some invalidation records to check against, as in a live realm.
    for i in 0..200 {
        let urls = vec![format!("{REALM}other{i}.gts"), format!("{REALM}other{i}")];
        let inv = lookup_core::Invalidation::Modules { realm_url: REALM.into(), urls };
        guarded.apply_invalidation(&inv).await.expect("seed");
    }
    measure(&plain, 200).await; // warm both up
    measure(&guarded, 200).await;
    let (off, on) = (measure(&plain, n).await, measure(&guarded, n).await);
    println!("persist on the miss path, {n} rows each (µs):");
    println!("  guard off: p50 {:7.1}  p99 {:7.1}", pct(&off, 0.5), pct(&off, 0.99));
    println!("  guard on:  p50 {:7.1}  p99 {:7.1}", pct(&on, 0.5), pct(&on, 0.99));
    println!(
        "  added at p50: {:.1} µs ({:.2}x)",
        pct(&on, 0.5) - pct(&off, 0.5),
        pct(&on, 0.5) / pct(&off, 0.5)
    );
}
