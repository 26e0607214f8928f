//! The scale curves (`deflookup-bench --curves`, run by `cargo xtask bench --scale`): how the
//! library's figures move with load, each point next to a bare baseline measured at the same
//! load in the same run.
//!
//! - **Listening processes** (P = 1, 10, 50): P listeners in this process, each a
//!   `PgInvalidationListener` with its own LISTEN connection and its own sink (a lookup of its
//!   own), as P processes would have. A sample is timed from the start of `invalidate()` to the
//!   bump applied by the *slowest* of the P; the baseline is a bare `pg_notify` to P bare
//!   LISTEN connections, timed to the slowest receipt, and beside it the durable floor's
//!   transaction (as `durable_floor_p50_us`) notifying the same P. The three alternate.
//! - **Concurrent invalidators** (C = 1, 4, 16): C tasks, each with a lookup and pool of its own
//!   (as C processes would have: a lookup runs its own invalidations one at a time), each
//!   invalidating modules of a realm of its own, then all of one realm; against C plain
//!   connections running the durable floor's transaction (logged record, DELETE, NOTIFY,
//!   COMMIT) back to back. One listener drains each channel meanwhile.
//! - **Concurrent lookups** (C = 1, 8, 32): C tasks looking up cached rows through one lookup
//!   whose pool has C connections, against C plain connections running the hit's bare prepared
//!   SELECT.
//!
//! Rates are counted over a window after a warm-up, with every task running throughout. The
//! windows are interleaved: each round runs every load of a curve, and at each load the
//! library's and the baseline's windows in turn (the order rotating); each rate is the median
//! of its rounds, and every round is kept in the JSON. A slow spell of the machine (a 2-core
//! virtual machine shares its disk, whose flush latency varies by 100×, and its CPUs) then
//! falls on every point and side alike instead of bending one point of a curve.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use adapter_pg::tokio_postgres::{self, types::ToSql};
use adapter_pg::{PgAdapter, PgConfig};
use anyhow::{Context as _, Result, bail};
use invalidation_listener::PgInvalidationListener;
use lookup_core::{CachingLookup, CodeRef, InvalidationSink, urls};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::bench::{
    BARE_DEFINITIONS, BARE_READ, BenchArgs, CountingRenderer, EXPORT, FLOOR_REALM, PgBench,
    PgLookup, REALM, TimedSink, bare_listener, floor_sql, micros, plain_client, public_realm,
    quantile, receive, server_line, unique_name, write_stdout,
};

/// The loads of each curve.
const LISTENERS: [usize; 3] = [1, 10, 50];
const INVALIDATORS: [usize; 3] = [1, 4, 16];
const LOOKUPS: [usize; 3] = [1, 8, 32];
/// Distinct cached modules the concurrent lookups read (task `k` reads module `k % HOT`).
const HOT: usize = 32;
/// The realm all invalidators share in the one-realm curve.
const SHARED_REALM: &str = "http://bench.test/shared/";

/// Samples and windows of one run.
#[derive(Debug, Clone, Copy)]
struct CurveSizes {
    listener_samples: usize,
    warmup: Duration,
    window: Duration,
    rounds: usize,
}

impl CurveSizes {
    fn new(quick: bool, scale: f64) -> CurveSizes {
        let (samples, window, rounds) = if quick { (60, 0.8, 3) } else { (200, 1.2, 5) };
        CurveSizes {
            listener_samples: ((samples as f64 * scale).round() as usize).max(3),
            warmup: Duration::from_secs_f64((0.3 * scale).max(0.05)),
            window: Duration::from_secs_f64((window * scale).max(0.1)),
            rounds,
        }
    }
}

/// Measures every curve, prints them, writes `--out` (JSON) and `scale.svg` next to it.
pub(crate) async fn run(args: &BenchArgs, url: String) -> Result<()> {
    let sizes = CurveSizes::new(args.quick, args.scale);
    let began = Instant::now();
    let name = unique_name();
    let config = PgConfig::new(url).schema(name.clone()).channel(name.clone());
    let bench = PgBench::connect(config).await?;
    let server = bench.server_settings().await.unwrap_or_default();
    let measured = measure(&bench, &sizes).await;
    bench.cleanup().await;
    let curves = measured?;

    let mut out = Map::new();
    out.insert("listeners".to_owned(), json!(curves.listeners));
    out.insert("invalidators".to_owned(), json!(curves.invalidators));
    out.insert("lookups".to_owned(), json!(curves.lookups));
    out.insert("server".to_owned(), Value::Object(server.clone()));
    out.insert(
        "run".to_owned(),
        json!({
            "quick": args.quick,
            "listener_samples": sizes.listener_samples,
            "warmup_s": sizes.warmup.as_secs_f64(),
            "window_s": sizes.window.as_secs_f64(),
            "rounds": sizes.rounds,
            "load_average": crate::bench::load_average(),
        }),
    );
    print(&curves, &server, began.elapsed(), args.quick)?;
    if let Some(path) = &args.out {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let text = serde_json::to_string_pretty(&Value::Object(out))?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        write_stdout(&format!("curves written to {}\n", path.display()))?;
        let svg = path.with_file_name("scale.svg");
        std::fs::write(&svg, chart(&curves))
            .with_context(|| format!("cannot write {}", svg.display()))?;
        write_stdout(&format!("plot written to {}\n", svg.display()))?;
    }
    Ok(())
}

/// Every point of every curve, rounded for the JSON.
#[derive(Debug, Default)]
struct Curves {
    listeners: Vec<Value>,
    invalidators: Vec<Value>,
    lookups: Vec<Value>,
}

/// The point's number at `key` (0 when missing).
fn at(point: &Value, key: &str) -> f64 {
    point.get(key).and_then(Value::as_f64).unwrap_or_default()
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

async fn measure(bench: &PgBench, sizes: &CurveSizes) -> Result<Curves> {
    let mut curves = Curves::default();
    for p in LISTENERS {
        eprintln!("bench: propagation to {p} listeners vs a bare NOTIFY to {p}");
        curves.listeners.push(listener_point(bench, p, sizes).await?);
    }
    eprintln!("bench: concurrent invalidators ({INVALIDATORS:?})");
    curves.invalidators = invalidator_points(bench, sizes).await?;
    eprintln!("bench: concurrent lookups of cached rows ({LOOKUPS:?})");
    curves.lookups = lookup_points(bench, sizes).await?;
    Ok(curves)
}

/// Waits for `count` arrivals on `rx` and returns the latest.
async fn slowest(
    rx: &mut mpsc::UnboundedReceiver<Instant>,
    count: usize,
    what: &str,
) -> Result<Instant> {
    let mut latest = receive(rx, what).await?;
    for _ in 1..count {
        latest = latest.max(receive(rx, what).await?);
    }
    Ok(latest)
}

/// Propagation to the slowest of `p` listeners, against a bare NOTIFY to `p` bare listeners.
async fn listener_point(bench: &PgBench, p: usize, sizes: &CurveSizes) -> Result<Value> {
    let config = &bench.config;
    let peers = PgAdapter::connect(config.clone()).await?;
    let (applied_tx, mut applied) = mpsc::unbounded_channel();
    let mut listeners = Vec::with_capacity(p);
    let bare_channel = format!("{}_bare", config.get_channel());
    let (heard_tx, mut heard) = mpsc::unbounded_channel();
    let mut bare = Vec::with_capacity(p);
    let started = async {
        for _ in 0..p {
            let lookup = CachingLookup::new(peers.clone(), CountingRenderer::default());
            lookup.register_realm(public_realm(REALM))?;
            let sink = Arc::new(TimedSink { inner: lookup, applied: applied_tx.clone() });
            listeners.push(PgInvalidationListener::start(config, None, sink).await?);
            bare.push(bare_listener(config, &bare_channel, heard_tx.clone()).await?);
        }
        anyhow::Ok(())
    }
    .await;
    let origin = bench.lookup.db().origin().to_owned();
    let result = async {
        started?;
        let notify = bench.client.prepare("SELECT pg_notify($1, $2)").await?;
        let (mut library, mut baseline, mut floor) = (Vec::new(), Vec::new(), Vec::new());
        let warmup = (sizes.listener_samples / 10).max(1);
        for i in 0..warmup + sizes.listener_samples {
            let module = format!("{REALM}fan{p}-{i}.gts");
            let floor_module = format!("{FLOOR_REALM}fan{p}-{i}.gts");
            bench.seed_row(REALM, &module).await?;
            bench.seed_row(FLOOR_REALM, &floor_module).await?;
            let payload = format!("bench {i}");
            let begin = Instant::now();
            bench.client.execute(&notify, &[&bare_channel, &payload]).await?;
            let bare_time = slowest(&mut heard, p, "the bare NOTIFY").await? - begin;
            let sql = floor_sql(&floor_module, i as i64, &bare_channel, &origin);
            let begin = Instant::now();
            bench.client.batch_execute(&sql).await?;
            let floor_time = slowest(&mut heard, p, "the durable floor's NOTIFY").await? - begin;
            let begin = Instant::now();
            bench.lookup.invalidate(&module).await?;
            let library_time =
                slowest(&mut applied, p, "the propagated invalidation").await? - begin;
            if i >= warmup {
                baseline.push(micros(bare_time));
                floor.push(micros(floor_time));
                library.push(micros(library_time));
            }
        }
        let (p50, bare_p50) = (quantile(&mut library, 0.5), quantile(&mut baseline, 0.5));
        let floor_p50 = quantile(&mut floor, 0.5);
        anyhow::Ok(json!({
            "listeners": p,
            "propagation_p50_us": round2(p50),
            "propagation_p99_us": round2(quantile(&mut library, 0.99)),
            "bare_notify_p50_us": round2(bare_p50),
            "bare_notify_p99_us": round2(quantile(&mut baseline, 0.99)),
            "durable_floor_p50_us": round2(floor_p50),
            "durable_floor_p99_us": round2(quantile(&mut floor, 0.99)),
            "ratio_p50": round2(p50 / bare_p50),
            "vs_durable_ratio_p50": round2(p50 / floor_p50),
        }))
    }
    .await;
    for listener in &listeners {
        listener.shutdown().await;
    }
    for (_client, task) in bare {
        task.abort();
    }
    result
}

type OpFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;
/// One operation of task `k` (its `n`th).
type Op = Arc<dyn Fn(usize, u64) -> OpFuture + Send + Sync>;

/// The rates of every op of every load (`(tasks, ops)`): `sizes.rounds` rounds, each running
/// every load's ops once (one window each, the order of a load's ops rotating from round to
/// round), so that a slow spell of the machine falls on every load and op alike rather than
/// on one point of a curve. Returns each op's rates, round by round: `[load][op][round]`.
async fn grid(sizes: &CurveSizes, loads: &[(usize, Vec<Op>)]) -> Result<Vec<Vec<Vec<f64>>>> {
    let mut rates: Vec<Vec<Vec<f64>>> =
        loads.iter().map(|(_, ops)| vec![Vec::new(); ops.len()]).collect();
    for round in 0..sizes.rounds {
        for ((tasks, ops), rates) in loads.iter().zip(rates.iter_mut()) {
            for i in 0..ops.len() {
                let which = (i + round) % ops.len();
                rates[which].push(throughput(*tasks, sizes, Arc::clone(&ops[which])).await?);
            }
        }
    }
    Ok(rates)
}

/// The median of `rounds` (rounded), and every round, for the JSON.
fn median_and_rounds(rounds: &[f64]) -> (f64, Value) {
    let mut sorted = rounds.to_vec();
    (
        round2(quantile(&mut sorted, 0.5)),
        json!(rounds.iter().map(|r| r.round()).collect::<Vec<_>>()),
    )
}

/// Operations per second of `tasks` tasks each running `op` back to back: counted over
/// `sizes.window` after `sizes.warmup`, every task running throughout.
async fn throughput(tasks: usize, sizes: &CurveSizes, op: Op) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for k in 0..tasks {
        let (stop, done, op) = (Arc::clone(&stop), Arc::clone(&done), Arc::clone(&op));
        set.spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                op(k, n).await?;
                n += 1;
                done.fetch_add(1, Ordering::SeqCst);
            }
            anyhow::Ok(())
        });
    }
    let measured = async {
        tokio::time::sleep(sizes.warmup).await;
        let (first, began) = (done.load(Ordering::SeqCst), Instant::now());
        tokio::time::sleep(sizes.window).await;
        let (last, ended) = (done.load(Ordering::SeqCst), Instant::now());
        (last - first) as f64 / (ended - began).as_secs_f64()
    };
    // A failing task ends the measurement early: its error is what to report.
    let rate = tokio::select! {
        rate = measured => Some(rate),
        Some(joined) = set.join_next() => {
            joined.context("a task panicked")??;
            None
        }
    };
    stop.store(true, Ordering::SeqCst);
    // Each task finishes its operation in flight, each bounded by the adapter's timeout.
    let drained = tokio::time::timeout(crate::bench::GATHER_TIMEOUT, async {
        while let Some(joined) = set.join_next().await {
            joined.context("a task panicked")??;
        }
        anyhow::Ok(())
    });
    drained.await.context("the tasks did not stop")??;
    rate.context("a task stopped early")
}

/// Invalidations per second of C invalidators, each its own "process", on distinct realms and
/// on one realm, against C plain connections running the durable floor's transaction.
async fn invalidator_points(bench: &PgBench, sizes: &CurveSizes) -> Result<Vec<Value>> {
    let most = INVALIDATORS.into_iter().max().unwrap_or(1);
    let config = &bench.config;
    let realm_of = |k: usize| format!("http://bench.test/inv{k}/");
    let mut lookups: Vec<PgLookup> = Vec::with_capacity(most);
    let mut clients = Vec::with_capacity(most);
    for k in 0..most {
        let db = PgAdapter::connect(config.clone().pool_size(2)).await?;
        let lookup = CachingLookup::new(db, CountingRenderer::default());
        lookup.register_realm(public_realm(&realm_of(k)))?;
        lookup.register_realm(public_realm(SHARED_REALM))?;
        lookups.push(lookup);
        clients.push(plain_client(config).await?);
    }
    let (lookups, clients) = (Arc::new(lookups), Arc::new(clients));
    // The listeners a deployment has: each invalidation is heard and applied.
    let drain_lookup = CachingLookup::new(bench.lookup.db().clone(), CountingRenderer::default());
    let sink: Arc<dyn InvalidationSink> = Arc::new(drain_lookup);
    let drain = PgInvalidationListener::start(config, None, sink).await?;
    let bare_channel = format!("{}_bare", config.get_channel());
    let (heard_tx, heard) = mpsc::unbounded_channel();
    drop(heard);
    let (_bare_client, bare_task) = bare_listener(config, &bare_channel, heard_tx).await?;

    let result = async {
        let mut points = Vec::new();
        let origin = bench.lookup.db().origin().to_owned();
        // Every invalidation names a module of its own.
        let names = Arc::new(AtomicU64::new(0));
        let mut loads = Vec::new();
        for c in INVALIDATORS {
            let mut ops: Vec<Op> = Vec::new();
            for shared in [false, true] {
                let (lookups, names) = (Arc::clone(&lookups), Arc::clone(&names));
                let op: Op = Arc::new(move |k, _| {
                    let lookup = lookups[k].clone();
                    let realm = if shared { SHARED_REALM.to_owned() } else { realm_of(k) };
                    let name = names.fetch_add(1, Ordering::Relaxed);
                    Box::pin(async move {
                        lookup.invalidate(&format!("{realm}m{name}.gts")).await?;
                        Ok(())
                    })
                });
                ops.push(op);
            }
            let (clients, channel, origin) =
                (Arc::clone(&clients), bare_channel.clone(), origin.clone());
            let names = Arc::clone(&names);
            ops.push(Arc::new(move |k, _| {
                let name = names.fetch_add(1, Ordering::Relaxed);
                let (clients, sql) = (Arc::clone(&clients), {
                    let module = format!("{FLOOR_REALM}inv-m{name}.gts");
                    floor_sql(&module, name as i64, &channel, &origin)
                });
                Box::pin(async move {
                    clients[k].batch_execute(&sql).await?;
                    Ok(())
                })
            }));
            loads.push((c, ops));
        }
        for ((c, _), rates) in loads.iter().zip(grid(sizes, &loads).await?) {
            let (distinct, distinct_rounds) = median_and_rounds(&rates[0]);
            let (one, one_rounds) = median_and_rounds(&rates[1]);
            let (bare, bare_rounds) = median_and_rounds(&rates[2]);
            points.push(json!({
                "invalidators": c,
                "distinct_realms_per_s": distinct,
                "one_realm_per_s": one,
                "bare_durable_per_s": bare,
                "distinct_realms_ratio": round2(distinct / bare),
                "one_realm_ratio": round2(one / bare),
                "distinct_realms_rounds": distinct_rounds,
                "one_realm_rounds": one_rounds,
                "bare_durable_rounds": bare_rounds,
            }));
        }
        anyhow::Ok(points)
    }
    .await;
    drain.shutdown().await;
    bare_task.abort();
    result
}

/// Hits per second of C concurrent lookups of cached rows through one lookup (a pool of C),
/// against the bare prepared SELECT on C plain connections.
async fn lookup_points(bench: &PgBench, sizes: &CurveSizes) -> Result<Vec<Value>> {
    let modules: Arc<Vec<String>> =
        Arc::new((0..HOT).map(|k| format!("{REALM}hot{k}.gts")).collect());
    for module in modules.iter() {
        bench.lookup.lookup_definition(&CodeRef::new(module.clone(), EXPORT), None).await?;
    }
    let most = LOOKUPS.into_iter().max().unwrap_or(1);
    let sql = BARE_READ;
    let mut bare = Vec::with_capacity(most);
    for _ in 0..most {
        let client = plain_client(&bench.config).await?;
        let statement = client.prepare(sql).await?;
        bare.push((client, statement));
    }
    let bare = Arc::new(bare);
    let (mut loads, mut lookups) = (Vec::new(), Vec::new());
    for c in LOOKUPS {
        let db = PgAdapter::connect(bench.config.clone().pool_size(c)).await?;
        let lookup = CachingLookup::new(db, CountingRenderer::default());
        lookup.register_realm(public_realm(REALM))?;
        let hits: Op = {
            let (lookup, modules) = (lookup.clone(), Arc::clone(&modules));
            Arc::new(move |k, _| {
                let lookup = lookup.clone();
                let code_ref = CodeRef::new(modules[k % HOT].clone(), EXPORT);
                Box::pin(async move {
                    std::hint::black_box(lookup.lookup_definition(&code_ref, None).await?);
                    Ok(())
                })
            })
        };
        let selects: Op = {
            let (bare, modules) = (Arc::clone(&bare), Arc::clone(&modules));
            Arc::new(move |k, _| {
                let bare = Arc::clone(&bare);
                let module = modules[k % HOT].clone();
                Box::pin(async move {
                    let (client, statement) = &bare[k];
                    let alias = urls::file_alias(&module);
                    let params: [&(dyn ToSql + Sync); 5] =
                        [&REALM, &"public", &"", &module, &alias];
                    let rows: Vec<tokio_postgres::Row> = client.query(statement, &params).await?;
                    let definitions: Value =
                        rows.first().context("the row is missing")?.get(BARE_DEFINITIONS);
                    std::hint::black_box(definitions);
                    Ok(())
                })
            })
        };
        loads.push((c, vec![hits, selects]));
        lookups.push(lookup);
    }
    let mut points = Vec::new();
    for ((c, _), rates) in loads.iter().zip(grid(sizes, &loads).await?) {
        let (hits, hits_rounds) = median_and_rounds(&rates[0]);
        let (selects, selects_rounds) = median_and_rounds(&rates[1]);
        points.push(json!({
            "lookups": c,
            "hits_per_s": hits,
            "bare_selects_per_s": selects,
            "ratio": round2(hits / selects),
            "hits_rounds": hits_rounds,
            "bare_selects_rounds": selects_rounds,
        }));
    }
    if lookups.iter().any(|lookup| lookup.prerenderer().count() != 0) {
        bail!("the concurrent lookups rendered: they were not all hits");
    }
    Ok(points)
}

/// The curves as tables, then the server's settings.
fn print(
    curves: &Curves,
    server: &Map<String, Value>,
    elapsed: Duration,
    quick: bool,
) -> Result<()> {
    let mode = if quick { "quick" } else { "full" };
    let mut out = String::new();
    writeln!(out, "deflookup bench scale curves ({mode}, {:.0} s)", elapsed.as_secs_f64())?;
    writeln!(
        out,
        "{:>10} {:>12} {:>12} {:>12} {:>12} {:>13} {:>8} {:>8}",
        "listeners",
        "prop p50 us",
        "prop p99 us",
        "bare p50 us",
        "bare p99 us",
        "floor p50 us",
        "vs bare",
        "vs floor"
    )?;
    for point in &curves.listeners {
        writeln!(
            out,
            "{:>10} {:>12.0} {:>12.0} {:>12.0} {:>12.0} {:>13.0} {:>8.2} {:>8.2}",
            at(point, "listeners"),
            at(point, "propagation_p50_us"),
            at(point, "propagation_p99_us"),
            at(point, "bare_notify_p50_us"),
            at(point, "bare_notify_p99_us"),
            at(point, "durable_floor_p50_us"),
            at(point, "ratio_p50"),
            at(point, "vs_durable_ratio_p50"),
        )?;
    }
    writeln!(
        out,
        "{:>12} {:>16} {:>16} {:>16}",
        "invalidators", "distinct /s", "one realm /s", "bare durable /s"
    )?;
    for point in &curves.invalidators {
        writeln!(
            out,
            "{:>12} {:>16.0} {:>16.0} {:>16.0}",
            at(point, "invalidators"),
            at(point, "distinct_realms_per_s"),
            at(point, "one_realm_per_s"),
            at(point, "bare_durable_per_s"),
        )?;
    }
    writeln!(out, "{:>12} {:>16} {:>16} {:>8}", "lookups", "hits /s", "bare selects /s", "ratio")?;
    for point in &curves.lookups {
        writeln!(
            out,
            "{:>12} {:>16.0} {:>16.0} {:>8.2}",
            at(point, "lookups"),
            at(point, "hits_per_s"),
            at(point, "bare_selects_per_s"),
            at(point, "ratio"),
        )?;
    }
    if !server.is_empty() {
        writeln!(out, "server: {}", server_line(server))?;
    }
    write_stdout(&out)
}

/// The three panels of `scale.svg`.
fn chart(curves: &Curves) -> String {
    use crate::plot::{Curve, Panel};
    let series = |points: &[Value], x: &str, y: &str, scale: f64| -> Vec<(f64, f64)> {
        points.iter().map(|point| (at(point, x), at(point, y) * scale)).collect()
    };
    let (red, blue) = ("#d62728", "#1f77b4");
    let panels = [
        Panel {
            title: "Propagation to the slowest of P listening processes",
            x_label: "listening processes P (log scale)",
            y_label: "milliseconds",
            curves: vec![
                Curve {
                    label: "invalidate() → bump, p50",
                    color: red,
                    dashed: false,
                    points: series(&curves.listeners, "listeners", "propagation_p50_us", 1e-3),
                },
                Curve {
                    label: "invalidate() → bump, p99",
                    color: "#ff9896",
                    dashed: false,
                    points: series(&curves.listeners, "listeners", "propagation_p99_us", 1e-3),
                },
                Curve {
                    label: "bare NOTIFY → LISTEN, p50",
                    color: blue,
                    dashed: true,
                    points: series(&curves.listeners, "listeners", "bare_notify_p50_us", 1e-3),
                },
                Curve {
                    label: "bare NOTIFY → LISTEN, p99",
                    color: "#aec7e8",
                    dashed: true,
                    points: series(&curves.listeners, "listeners", "bare_notify_p99_us", 1e-3),
                },
                Curve {
                    label: "durable floor → LISTEN, p50",
                    color: "#2ca02c",
                    dashed: true,
                    points: series(&curves.listeners, "listeners", "durable_floor_p50_us", 1e-3),
                },
            ],
        },
        Panel {
            title: "Invalidations per second, C concurrent invalidators",
            x_label: "invalidators C (log scale)",
            y_label: "per second",
            curves: vec![
                Curve {
                    label: "library, a realm each",
                    color: red,
                    dashed: false,
                    points: series(
                        &curves.invalidators,
                        "invalidators",
                        "distinct_realms_per_s",
                        1.0,
                    ),
                },
                Curve {
                    label: "library, one realm",
                    color: "#ff7f0e",
                    dashed: false,
                    points: series(&curves.invalidators, "invalidators", "one_realm_per_s", 1.0),
                },
                Curve {
                    label: "bare durable DELETE+NOTIFY",
                    color: blue,
                    dashed: true,
                    points: series(&curves.invalidators, "invalidators", "bare_durable_per_s", 1.0),
                },
            ],
        },
        Panel {
            title: "Cache hits per second, C concurrent lookups",
            x_label: "concurrent lookups C (log scale)",
            y_label: "per second",
            curves: vec![
                Curve {
                    label: "lookup_definition hits",
                    color: red,
                    dashed: false,
                    points: series(&curves.lookups, "lookups", "hits_per_s", 1.0),
                },
                Curve {
                    label: "bare prepared SELECT",
                    color: blue,
                    dashed: true,
                    points: series(&curves.lookups, "lookups", "bare_selects_per_s", 1.0),
                },
            ],
        },
    ];
    crate::plot::curves_svg(
        "deflookup scale curves (each against a bare baseline, same run)",
        &panels,
    )
}
