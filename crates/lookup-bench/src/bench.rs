//! The measurements of `deflookup-bench`, each next to a baseline measured in the same process
//! and run (a bare query, a bare NOTIFY hop, a naive walk), printed as a table and written as a
//! JSON summary. `cargo xtask bench` builds the release binary and runs it.
//!
//! Every Postgres measurement runs in a schema and on channels of its own, dropped at the end.
//! Latencies are p50/p99 of individual samples; where a measurement and its baseline are both
//! sampled, they alternate in one loop so that both see the same noise.
//!
//! Propagation is timed from the *start* of `invalidate()` (and of the bare `pg_notify`) to the
//! bump applied in the peer, not from its return as the goal is worded: Postgres delivers a
//! NOTIFY at commit, before the sender reads its reply, so the peer usually has the bump
//! before the call returns (`propagation_applied_before_return_fraction` says how often) and
//! "from the return" would be zero at the median.
//!
//! Extra keys (`invalidate_call_p50_us`, `fanout_closure_query_10k_ms`,
//! `propagation_applied_before_return_fraction`, and `miss_p50_us` /
//! `coordinated_miss_p50_us` / `populate_miss_overhead_us`, the price of `--coordinate`) explain
//! a number rather than set a goal.
//! `run` records the sample counts; `not_measured` lists what is missing and why.
//!
//! Hits are measured in rounds, each on a pool that a burst of concurrent lookups opened to
//! several connections (`hit_pool_connections`), as a service's is; the bare SELECT runs on a
//! plain connection. `hit_ratio` is the median of the rounds' ratios (their spread:
//! `hit_ratio_rounds_min`/`_max`).
//!
//! `l1_hit_p50_us` is a `lookup_definition` answered by the in-process tier (`LookupConfig::l1`)
//! over the same row; its baseline is the same lookup without the tier (`hit_p50_us`).
//!
//! Floors: `durable_floor_p50_us` is the least a coherent invalidation can cost, one round trip
//! carrying `BEGIN`, a logged INSERT (a guard-like record), the DELETE the invalidation must
//! make (the rows named by the module's variants, by URL or by alias), `pg_notify` and
//! `COMMIT` (a WAL flush on a durable server), timed like propagation to a bare listener's
//! receipt (`durable_floor_one_row_p50_us`: the same deleting by the module's URL alone);
//! `fanout_floor_10k_ms` deletes the fan-out's rows by one DELETE of the known URLs and sends
//! the same payloads, in one pipelined transaction. The ratios say how far the library is
//! from them. The fan-outs run in turns, the library's then the floor's, and
//! `fanout_vs_floor_ratio` is the median of the turns' ratios (their spread:
//! `fanout_vs_floor_turns_min`/`_max`). `invalidate_round_trips` is counted through a relay
//! (`relay.rs`).
//!
//! With `--curves`, the scale curves instead (`curves.rs`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use adapter_pg::tokio_postgres::{self, AsyncMessage, NoTls};
use adapter_pg::{PgAdapter, PgConfig, PgPopulateCoordinator, PopulateSettings, PopulateSignals};
use adapter_sqlite::SqliteAdapter;
use anyhow::{Context as _, Result, bail};
use invalidation_listener::{ListenerOptions, PgInvalidationListener};
use lookup_core::wire::encode_payloads;
use lookup_core::{
    CachingLookup, CodeRef, DbAdapter, Invalidation, InvalidationSink, L1Config, LookupConfig,
    LookupError, NoRemoteRealms, PrerenderRequest, PrerenderResponse, Prerenderer, Realm, urls,
};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

/// The realm of the latency measurements.
pub(crate) const REALM: &str = "http://bench.test/realm/";
/// The realm of the rows the durable floor deletes (no lookup serves it).
pub(crate) const FLOOR_REALM: &str = "http://bench.test/floor/";
/// The realm holding the fan-out graph.
const FANOUT_REALM: &str = "http://bench.test/fanout/";
/// The realm of the coalescing measurement.
const COALESCE_REALM: &str = "http://bench.test/coalesce/";
/// The adapter's own read of a row (realm, scope, user, URL, alias), as a plain statement: the
/// baseline of the hit path. The realm is a condition on the rows the primary key or the alias
/// index finds, never an index to read (see adapter-pg's `in_realm!`).
/// The same columns too: the row's realm, scope and user are the ones asked for.
pub(crate) const BARE_READ: &str = "SELECT url, definitions, deps, error_doc, created_at, file_alias, \
     diagnostics FROM modules WHERE (resolved_realm_url = $1) IS TRUE \
     AND cache_scope = $2 AND auth_user_id = $3 AND (url_hash = md5($4) OR file_alias = $5)";
/// The place of `definitions` in a row of [`BARE_READ`].
pub(crate) const BARE_DEFINITIONS: usize = 1;

/// Concurrent lookups run before the hits are measured, so that the pool holds several
/// connections, as a service's does after a burst.
const HIT_BURST: usize = 8;

/// The realms of the steady state's background rows (see [`PgBench::settle`]), `…/bg0/` on.
const BACKGROUND_REALMS: &str = "http://bench.test/bg";
/// The background: realms, rows in each, and module invalidations in each (log entries).
const BACKGROUND: (usize, usize, usize) = (8, 500, 50);
/// The exported name every bench module defines.
pub(crate) const EXPORT: &str = "Thing";
/// How long a propagation or NOTIFY sample may take before the run fails.
const HOP_TIMEOUT: Duration = Duration::from_secs(10);
/// What the counting relay holds each server reply back by, to count round trips.
const ROUND_TRIP_DELAY: Duration = Duration::from_millis(25);
/// How long the coalescing measurement may wait for its lookups to gather.
pub(crate) const GATHER_TIMEOUT: Duration = Duration::from_secs(60);

/// The cache's measurements with their baselines (what `cargo xtask bench` runs): a table on
/// stdout and, with `--out`, a JSON summary (Postgres only; SQLite is measured in a temporary
/// file).
#[derive(Debug, clap::Parser)]
#[command(name = "deflookup-bench", version)]
pub(crate) struct BenchArgs {
    /// Fewer samples (a couple of minutes on a 2-core machine).
    #[arg(long)]
    pub(crate) quick: bool,
    /// Postgres URL (`postgres://…`). Defaults to $DATABASE_URL.
    #[arg(long = "db", value_name = "URL")]
    db: Option<String>,
    /// Where to write the JSON summary.
    #[arg(long, value_name = "PATH")]
    pub(crate) out: Option<PathBuf>,
    /// The same database through a transaction pooler (`…?pgbouncer=true`): measures the hit
    /// path through it (`cargo xtask bench` passes its own PgBouncer's).
    #[arg(long, value_name = "URL")]
    pgbouncer_db: Option<String>,
    /// A TLS server (`…?sslmode=verify-full&sslrootcert=…`): measures the TLS handshake per
    /// connection and the hit path over TLS (`cargo xtask bench` passes its TLS cluster's).
    #[arg(long, value_name = "URL")]
    tls_db: Option<String>,
    /// Multiplies every sample count and size (for tests: `--scale 0.01`).
    #[arg(long, value_name = "F", default_value_t = 1.0, hide = true)]
    pub(crate) scale: f64,
    /// The scale curves instead (listening processes, concurrent invalidators, concurrent
    /// lookups, each against a bare baseline): `--out` is then the curves' JSON, and the plot
    /// is written next to it as `scale.svg`.
    #[arg(long)]
    pub(crate) curves: bool,
}

/// Sample counts and sizes of one run.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    hit_samples: usize,
    hop_samples: usize,
    fanout_modules: usize,
    coalesce_lookups: usize,
    generation_bumps: usize,
    sqlite_samples: usize,
    poll_samples: usize,
    /// Fan-outs of the library and of the floor, in turns (the medians are reported).
    fanout_turns: usize,
    /// Rounds of the hit measurement (see `measure_hits`).
    hit_rounds: usize,
}

impl Sizes {
    fn new(quick: bool, scale: f64) -> Sizes {
        let (hits, hops, sqlite) = if quick { (2_000, 300, 500) } else { (20_000, 2_000, 5_000) };
        let scaled = |n: usize, min: usize| ((n as f64 * scale).round() as usize).max(min);
        Sizes {
            hit_samples: scaled(hits, 5),
            hop_samples: scaled(hops, 5),
            fanout_modules: scaled(10_000, 20),
            coalesce_lookups: scaled(1_000, 2),
            generation_bumps: scaled(1_000_000, 100),
            sqlite_samples: scaled(sqlite, 5),
            poll_samples: scaled(if quick { 40 } else { 200 }, 5),
            fanout_turns: if quick { 5 } else { 9 },
            hit_rounds: if quick { 5 } else { 9 },
        }
    }
}

/// Runs every measurement, prints the table, writes the summary.
pub(crate) async fn run(args: BenchArgs) -> Result<()> {
    if !(args.scale > 0.0 && args.scale.is_finite()) {
        bail!("--scale must be a positive number");
    }
    let url = args
        .db
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok().filter(|s| !s.is_empty()))
        .context("bench needs a Postgres database: pass --db postgres://… or set DATABASE_URL")?;
    if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
        bail!("bench needs a postgres://… URL");
    }
    if args.curves {
        return crate::curves::run(&args, url).await;
    }
    let sizes = Sizes::new(args.quick, args.scale);
    let began = Instant::now();
    let mut summary = Summary::default();

    let name = unique_name();
    let config = PgConfig::new(url.clone()).schema(name.clone()).channel(name.clone());
    let bench = PgBench::connect(config).await?;
    summary.server = bench.server_settings().await.unwrap_or_default();
    let mut measured = bench.measure_all(&sizes, &mut summary).await;
    if measured.is_ok() {
        eprintln!("bench: round trips of one invalidation, through a counting relay");
        measured = bench.measure_round_trips(&url, &sizes, &mut summary).await;
    }
    if measured.is_ok() {
        measured = bench.measure_connection_modes(&args, &sizes, &mut summary).await;
    }
    bench.cleanup().await;
    measured?;

    measure_generations(&sizes, &mut summary)?;
    measure_scanner(&sizes, &mut summary);
    measure_sqlite(&sizes, &mut summary).await?;

    summary.print(began.elapsed(), args.quick, args.scale)?;
    if let Some(out) = &args.out {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let text = serde_json::to_string_pretty(&summary.to_json(&sizes, args.quick))?;
        std::fs::write(out, text + "\n")
            .with_context(|| format!("cannot write {}", out.display()))?;
        write_stdout(&format!("summary written to {}\n", out.display()))?;
        if let Some((bare, library)) = &summary.propagation_samples {
            let chart = crate::plot::cdf_svg(
                "Invalidation propagation to a peer vs a bare NOTIFY hop",
                &[
                    crate::plot::Series {
                        label: "bare pg_notify → LISTEN",
                        color: "#1f77b4",
                        samples: bare,
                    },
                    crate::plot::Series {
                        label: "invalidate() start → peer's bump applied",
                        color: "#d62728",
                        samples: library,
                    },
                ],
            );
            let svg = out.with_file_name("propagation.svg");
            std::fs::write(&svg, chart)
                .with_context(|| format!("cannot write {}", svg.display()))?;
            write_stdout(&format!("plot written to {}\n", svg.display()))?;
        }
    }
    Ok(())
}

/// Writes `text` (whole lines) to stdout, flushed: a failed write is an error to report, not
/// `print!`'s panic.
pub(crate) fn write_stdout(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")
}

/// A name for the run's schema and channels: `deflookup_bench_<pid>_<millis>`.
pub(crate) fn unique_name() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!("deflookup_bench_{}_{millis}", std::process::id())
}

/// The measured numbers, in the order they were taken, and what could not be measured.
#[derive(Debug, Default)]
struct Summary {
    values: Map<String, Value>,
    missing: Vec<(String, String)>,
    /// Propagation samples (µs), for the plot: the bare hop, then the library's.
    propagation_samples: Option<(Vec<f64>, Vec<f64>)>,
    /// The server's durability settings and version (`server` in the summary).
    server: Map<String, Value>,
}

impl Summary {
    fn set(&mut self, key: &str, value: f64) {
        if !value.is_finite() {
            self.not_measured(key, &format!("the measurement gave {value} (a zero baseline?)"));
            return;
        }
        // Rounded to keep the summary readable; sub-0.01 differences are noise here.
        let rounded = (value * 100.0).round() / 100.0;
        self.values.insert(key.to_owned(), json!(rounded));
    }

    fn not_measured(&mut self, key: &str, reason: &str) {
        self.missing.push((key.to_owned(), reason.to_owned()));
    }

    fn get(&self, key: &str) -> Option<f64> {
        self.values.get(key).and_then(Value::as_f64)
    }

    fn to_json(&self, sizes: &Sizes, quick: bool) -> Value {
        let mut out = self.values.clone();
        let missing: Vec<Value> = self
            .missing
            .iter()
            .map(|(key, reason)| json!({"key": key, "reason": reason}))
            .collect();
        out.insert("not_measured".to_owned(), Value::Array(missing));
        out.insert("server".to_owned(), Value::Object(self.server.clone()));
        out.insert(
            "run".to_owned(),
            json!({
                "quick": quick,
                "hit_samples": sizes.hit_samples,
                "hop_samples": sizes.hop_samples,
                "fanout_modules": sizes.fanout_modules,
                "fanout_turns": sizes.fanout_turns,
                "hit_rounds": sizes.hit_rounds,
                "coalesce_lookups": sizes.coalesce_lookups,
                "generation_bumps": sizes.generation_bumps,
                "sqlite_samples": sizes.sqlite_samples,
                "poll_samples": sizes.poll_samples,
                "load_average": load_average(),
            }),
        );
        Value::Object(out)
    }

    fn print(&self, elapsed: Duration, quick: bool, scale: f64) -> Result<()> {
        // (key, goal) in display order; a goal of "" has none.
        const ROWS: &[(&str, &str)] = &[
            ("bare_select_p50_us", ""),
            ("hit_p50_us", ""),
            ("hit_ratio", "<= 1.10"),
            ("hit_ratio_rounds_min", ""),
            ("hit_ratio_rounds_max", ""),
            ("hit_pool_connections", ""),
            ("hit_unnamed_p50_us", ""),
            ("hit_unnamed_ratio", ""),
            ("hit_pgbouncer_p50_us", ""),
            ("hit_tls_p50_us", ""),
            ("connect_plain_p50_ms", ""),
            ("connect_tls_p50_ms", ""),
            ("bare_notify_p50_us", ""),
            ("propagation_p50_us", ""),
            ("propagation_p99_us", ""),
            ("propagation_ratio", "<= 1.5"),
            ("durable_floor_p50_us", ""),
            ("propagation_vs_durable_ratio", "<= 1.5"),
            ("durable_floor_one_row_p50_us", ""),
            ("invalidate_round_trips", ""),
            ("invalidate_round_trips_by_delay", ""),
            ("invalidate_with_consumer_round_trips", ""),
            ("durable_floor_round_trips", ""),
            ("propagation_after_return_p50_us", ""),
            ("propagation_after_return_p99_us", ""),
            ("invalidate_call_p50_us", ""),
            ("propagation_applied_before_return_fraction", ""),
            ("poll_100ms_propagation_p50_us", ""),
            ("poll_100ms_propagation_p99_us", ""),
            ("fanout_10k_ms", ""),
            ("fanout_naive_10k_ms", ""),
            ("fanout_speedup", ">= 20"),
            ("fanout_floor_10k_ms", ""),
            ("fanout_vs_floor_ratio", "<= 2"),
            ("fanout_vs_floor_turns_min", ""),
            ("fanout_vs_floor_turns_max", ""),
            ("fanout_closure_query_10k_ms", ""),
            ("coalesce_1000_prerenders", "1"),
            ("miss_p50_us", ""),
            ("coordinated_miss_p50_us", ""),
            ("populate_miss_overhead_us", ""),
            ("generation_state_bytes_after_1m_invalidations", "<= 1048576"),
            ("l1_hit_p50_us", "<= 5"),
            ("scan_20k_exports_ms", ""),
            ("scan_40k_exports_ms", ""),
            ("scan_doubling_ratio", "<= 2.5"),
            ("scan_40k_imports_ms", ""),
            ("sqlite_hit_p50_us", ""),
            ("sqlite_miss_p50_us", ""),
        ];
        let mode = if quick { "quick" } else { "full" };
        let scaled = if scale == 1.0 { String::new() } else { format!(", scale {scale}") };
        let mut table = String::new();
        writeln!(table, "deflookup bench ({mode}{scaled}, {:.0} s)", elapsed.as_secs_f64())?;
        writeln!(table, "{:<48} {:>14}  goal", "measurement", "value")?;
        writeln!(table, "{}", "-".repeat(74))?;
        for (key, goal) in ROWS {
            let value = match self.get(key) {
                Some(value) => format!("{value:.2}"),
                None => "not measured".to_owned(),
            };
            writeln!(table, "{key:<48} {value:>14}  {goal}")?;
        }
        for (key, reason) in &self.missing {
            writeln!(table, "not measured: {key}: {reason}")?;
        }
        if !self.server.is_empty() {
            writeln!(table, "server: {}", server_line(&self.server))?;
        }
        write_stdout(&table)
    }
}

/// A prerenderer that counts its calls; every module defines [`EXPORT`] and depends on
/// nothing. A gated one holds every render until [`CountingRenderer::open`].
#[derive(Debug, Clone, Default)]
pub(crate) struct CountingRenderer {
    gate: Option<Arc<tokio::sync::watch::Sender<bool>>>,
    count: Arc<AtomicU64>,
}

impl CountingRenderer {
    fn gated() -> Self {
        let gate = tokio::sync::watch::channel(false).0;
        CountingRenderer { gate: Some(Arc::new(gate)), count: Arc::default() }
    }

    fn open(&self) {
        if let Some(gate) = &self.gate {
            gate.send_replace(true);
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
}

impl Prerenderer for CountingRenderer {
    async fn prerender(
        &self,
        request: &PrerenderRequest,
    ) -> Result<PrerenderResponse, LookupError> {
        self.count.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            // The sender lives as long as the renderer, so this only ends when opened.
            let _ = gate.subscribe().wait_for(|open| *open).await;
        }
        let key = format!("{}/{EXPORT}", urls::file_alias(&request.module_url));
        let mut definitions = Map::new();
        definitions.insert(key, json!({"type": "definition", "name": EXPORT}));
        Ok(PrerenderResponse::ready(definitions, Vec::new()))
    }
}

pub(crate) fn public_realm(url: &str) -> Realm {
    Realm { url: url.to_owned(), owner: "@bench:localhost".to_owned(), public: true }
}

/// Sorted samples → the value at quantile `q` (nearest rank).
pub(crate) fn quantile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    let rank = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

pub(crate) fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

pub(crate) type PgLookup = CachingLookup<PgAdapter, CountingRenderer>;

/// The Postgres side of the run: process A's lookup, a plain client for baselines and
/// setup, and the schema they share.
pub(crate) struct PgBench {
    pub(crate) config: PgConfig,
    pub(crate) lookup: PgLookup,
    pub(crate) client: tokio_postgres::Client,
}

impl PgBench {
    pub(crate) async fn connect(config: PgConfig) -> Result<PgBench> {
        let db = PgAdapter::connect(config.clone()).await.context("cannot open Postgres")?;
        let lookup = CachingLookup::new(db, CountingRenderer::default());
        for realm in [REALM, FANOUT_REALM] {
            lookup.register_realm(public_realm(realm))?;
        }
        let client = plain_client(&config).await?;
        // The durable floor's record: a logged table with an index, like the guard's log.
        client
            .batch_execute(
                "CREATE TABLE floor_guard (realm text NOT NULL, url text NOT NULL, \
                 seq bigint NOT NULL, at timestamptz NOT NULL DEFAULT now()); \
                 CREATE INDEX floor_guard_key ON floor_guard (md5(realm), md5(url))",
            )
            .await
            .context("cannot create the durable floor's table")?;
        let bench = PgBench { config, lookup, client };
        bench.settle().await.context("cannot bring the tables to a steady state")?;
        Ok(bench)
    }

    /// Brings the tables to the state of a database in use before anything is measured: rows
    /// in several realms with dependencies, a guard log with entries, and planner statistics
    /// for them, as autovacuum keeps them. Fresh tables have no statistics: the planner takes
    /// them for small, and a statement prepared then keeps its plan until the first ANALYZE,
    /// which autovacuum runs a minute or so after the first writes, later than a quick run
    /// ends. Measured on fresh tables: a consumer check reading the whole realm (150 µs, not
    /// 10), the guard record sorting the realm's log to find its oldest entry, so an
    /// invalidation costing what the tables' history made it rather than what it costs.
    async fn settle(&self) -> Result<()> {
        let (realms, rows, invalidations) = BACKGROUND;
        let (last_realm, last_row) = (realms as i32 - 1, rows as i32 - 1);
        // Each module depends on the one at half its number (a tree): rows above the middle
        // have no consumers.
        self.client
            .execute(
                "INSERT INTO modules (url, cache_scope, auth_user_id, resolved_realm_url, \
                 definitions, deps, created_at, file_alias) \
                 SELECT $1 || r || '/m' || i || '.gts', 'public', '', $1 || r || '/', '{}', \
                   CASE WHEN i = 0 THEN '[]'::jsonb \
                        ELSE jsonb_build_array($1 || r || '/m' || (i / 2)) END, \
                   0, $1 || r || '/m' || i \
                 FROM generate_series(0, $2::int) AS r, generate_series(0, $3::int) AS i",
                &[&BACKGROUND_REALMS, &last_realm, &last_row],
            )
            .await?;
        let db = self.lookup.db();
        for realm in 0..realms {
            let realm_url = format!("{BACKGROUND_REALMS}{realm}/");
            for module in rows - invalidations..rows {
                let variants = urls::variants(&format!("{realm_url}m{module}.gts"));
                db.invalidate_modules(&realm_url, &variants).await?;
            }
        }
        self.client
            .batch_execute("ANALYZE modules, modules_guard_log, modules_guard_realm, floor_guard")
            .await?;
        Ok(())
    }

    /// The server's version and the settings that decide what a commit costs.
    pub(crate) async fn server_settings(&self) -> Result<Map<String, Value>> {
        let rows = self
            .client
            .query(
                "SELECT name, setting FROM pg_settings WHERE name IN ('server_version', \
                 'fsync', 'synchronous_commit', 'full_page_writes', 'wal_sync_method', \
                 'max_connections') ORDER BY name",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| (row.get::<_, String>(0), json!(row.get::<_, String>(1))))
            .collect())
    }

    /// Inserts a cached row for `url` in `realm` (its alias too), if it is not there.
    pub(crate) async fn seed_row(&self, realm: &str, url: &str) -> Result<()> {
        self.client
            .execute(
                "INSERT INTO modules (url, cache_scope, auth_user_id, resolved_realm_url, \
                 definitions, deps, created_at, file_alias) \
                 VALUES ($2, 'public', '', $1, '{}'::jsonb, '[]'::jsonb, 0, $3) \
                 ON CONFLICT DO NOTHING",
                &[&realm, &url, &urls::file_alias(url)],
            )
            .await?;
        Ok(())
    }

    /// Inserts a cached row for `url` in `realm` that depends on `dep`, if it is not there.
    async fn seed_consumer(&self, realm: &str, url: &str, dep: &str) -> Result<()> {
        self.client
            .execute(
                "INSERT INTO modules (url, cache_scope, auth_user_id, resolved_realm_url, \
                 definitions, deps, created_at, file_alias) \
                 VALUES ($2, 'public', '', $1, '{}'::jsonb, jsonb_build_array($4::text), 0, $3) \
                 ON CONFLICT DO NOTHING",
                &[&realm, &url, &urls::file_alias(url), &dep],
            )
            .await?;
        Ok(())
    }

    async fn measure_all(&self, sizes: &Sizes, summary: &mut Summary) -> Result<()> {
        eprintln!("bench: cache hit vs bare SELECT ({} pairs)", sizes.hit_samples);
        self.measure_hits(sizes, summary).await?;
        eprintln!("bench: in-process tier hits ({})", sizes.hit_samples);
        self.measure_l1_hits(sizes, summary).await?;
        eprintln!("bench: propagation vs bare NOTIFY ({} pairs)", sizes.hop_samples);
        self.measure_propagation(sizes, summary).await?;
        eprintln!(
            "bench: propagation to a peer polling every 100 ms ({} samples)",
            sizes.poll_samples
        );
        self.measure_poll_propagation(sizes, summary).await?;
        eprintln!(
            "bench: fan-out of {} modules vs its floor ({} turns) and a walk",
            sizes.fanout_modules, sizes.fanout_turns
        );
        self.measure_fanout(sizes, summary).await?;
        eprintln!("bench: {} concurrent cold lookups", sizes.coalesce_lookups);
        self.measure_coalescing(sizes, summary).await?;
        eprintln!("bench: miss with vs without populate coalescing ({} pairs)", sizes.hop_samples);
        self.measure_populate_cost(sizes, summary).await
    }

    /// Drops the run's schema. Best effort: a failure is only reported.
    pub(crate) async fn cleanup(&self) {
        let schema = self.config.get_schema().unwrap_or_default();
        if let Err(error) =
            self.client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await
        {
            eprintln!("bench: warning: cannot drop schema {schema}: {error}");
        }
    }

    /// A hit answered by the in-process tier, in front of the same database.
    async fn measure_l1_hits(&self, sizes: &Sizes, summary: &mut Summary) -> Result<()> {
        let config = LookupConfig { l1: Some(L1Config::default()), ..LookupConfig::default() };
        let renderer = CountingRenderer::default();
        let lookup = CachingLookup::with_probe(
            self.lookup.db().clone(),
            renderer.clone(),
            NoRemoteRealms,
            config,
        );
        lookup.register_realm(public_realm(REALM))?;
        let code_ref = CodeRef::new(format!("{REALM}l1.gts"), EXPORT);
        let p50 = repeated_lookup_p50(&lookup, &code_ref, sizes).await?;
        let stats = lookup.l1_stats().context("the tier is on")?;
        if renderer.count() != 1 || stats.hits < sizes.hit_samples as u64 {
            bail!("the tier did not answer the hits: {stats:?}");
        }
        summary.set("l1_hit_p50_us", p50);
        Ok(())
    }

    async fn measure_hits(&self, sizes: &Sizes, summary: &mut Summary) -> Result<()> {
        let module = format!("{REALM}hit.gts");
        let code_ref = CodeRef::new(module.clone(), EXPORT);
        self.lookup.lookup_definition(&code_ref, None).await?;
        // The adapter's own read, on a plain connection: same row, same columns, and the
        // definitions decoded as JSON, as the lookup must do too.
        let statement = self.client.prepare(BARE_READ).await?;
        let alias = urls::file_alias(&module);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&REALM, &"public", &"", &module, &alias];
        // In rounds, each after a burst of concurrent lookups: the pool is then as a
        // service's is (several connections open, most idle), and the connection the hits
        // use, and the threads its task and the bare client's run on, change from round to
        // round. Which threads they land on moves a round's figures by up to 2x either way on
        // a 2-core machine, so the ratio is the median of the rounds' ratios.
        let rounds = sizes.hit_rounds;
        let per_round = (sizes.hit_samples / rounds).max(1);
        let (mut bare, mut hit, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let mut burst = tokio::task::JoinSet::new();
            for _ in 0..HIT_BURST {
                let (lookup, code_ref) = (self.lookup.clone(), code_ref.clone());
                burst.spawn(
                    async move { lookup.lookup_definition(&code_ref, None).await.map(drop) },
                );
            }
            while let Some(done) = burst.join_next().await {
                done??;
            }
            let (mut round_bare, mut round_hit) = (Vec::new(), Vec::new());
            // A few pairs first so that connections, caches and statements are warm.
            let warmup = (per_round / 10).max(1);
            for i in 0..warmup + per_round {
                let started = Instant::now();
                let rows = self.client.query(&statement, &params).await?;
                let definitions: Value =
                    rows.first().context("the hit row is missing")?.get(BARE_DEFINITIONS);
                let bare_time = started.elapsed();
                std::hint::black_box(definitions);
                let started = Instant::now();
                std::hint::black_box(self.lookup.lookup_definition(&code_ref, None).await?);
                let hit_time = started.elapsed();
                if i >= warmup {
                    round_bare.push(micros(bare_time));
                    round_hit.push(micros(hit_time));
                }
            }
            let (b, h) = (quantile(&mut round_bare, 0.5), quantile(&mut round_hit, 0.5));
            ratios.push(h / b);
            bare.extend(round_bare);
            hit.extend(round_hit);
        }
        summary.set("hit_pool_connections", self.lookup.db().open_connections() as f64);
        if self.lookup.prerenderer().count() != 1 {
            bail!("the hit measurement prerendered again: the row was not a hit");
        }
        summary.set("bare_select_p50_us", quantile(&mut bare, 0.5));
        summary.set("hit_p50_us", quantile(&mut hit, 0.5));
        summary.set("hit_ratio", quantile(&mut ratios, 0.5));
        summary.set("hit_ratio_rounds_min", quantile(&mut ratios, 0.0));
        summary.set("hit_ratio_rounds_max", quantile(&mut ratios, 1.0));
        Ok(())
    }

    /// The hit path with unnamed statements (`pgbouncer=true`) on the same server, through a
    /// real transaction pooler, and over TLS; and a connection's start-up with and without
    /// TLS. Each against `hit_p50_us` or a plain start-up measured in the same run.
    async fn measure_connection_modes(
        &self,
        args: &BenchArgs,
        sizes: &Sizes,
        summary: &mut Summary,
    ) -> Result<()> {
        let schema = self.config.get_schema().unwrap_or_default().to_owned();
        eprintln!("bench: hits with unnamed statements ({})", sizes.hit_samples);
        let unnamed = self.config.clone().transaction_pooler(true);
        let p50 = hit_p50(unnamed, sizes).await?;
        summary.set("hit_unnamed_p50_us", p50);
        if let Some(hit) = summary.get("hit_p50_us") {
            summary.set("hit_unnamed_ratio", p50 / hit);
        }
        match &args.pgbouncer_db {
            Some(url) => {
                eprintln!("bench: hits through PgBouncer ({})", sizes.hit_samples);
                let through = PgConfig::new(url.clone()).schema(schema.clone());
                summary.set("hit_pgbouncer_p50_us", hit_p50(through, sizes).await?);
            }
            None => summary.not_measured("hit_pgbouncer_p50_us", "no --pgbouncer-db"),
        }
        let starts = (sizes.hop_samples / 10).max(5);
        eprintln!("bench: connection start-up, plain and TLS ({starts} each)");
        summary.set("connect_plain_p50_ms", connect_p50(&self.config, starts).await?);
        match &args.tls_db {
            Some(url) => {
                let tls = PgConfig::new(url.clone()).schema(schema);
                summary.set("connect_tls_p50_ms", connect_p50(&tls, starts).await?);
                eprintln!("bench: hits over TLS ({})", sizes.hit_samples);
                let measured = hit_p50(tls.clone(), sizes).await;
                // The TLS server is another cluster: drop the schema made there.
                if let Ok((client, connection)) = tls.connect_unpooled().await {
                    tokio::spawn(connection);
                    let drop = format!(
                        "DROP SCHEMA IF EXISTS {} CASCADE",
                        tls.get_schema().unwrap_or_default()
                    );
                    let _ = client.batch_execute(&drop).await;
                }
                summary.set("hit_tls_p50_us", measured?);
            }
            None => {
                summary.not_measured("connect_tls_p50_ms", "no --tls-db");
                summary.not_measured("hit_tls_p50_us", "no --tls-db");
            }
        }
        Ok(())
    }

    async fn measure_propagation(&self, sizes: &Sizes, summary: &mut Summary) -> Result<()> {
        // Process B: its own adapter (so its own origin id), lookup and listener.
        let peer_db = PgAdapter::connect(self.config.clone()).await?;
        let origin = Some(peer_db.origin().to_owned());
        let peer = CachingLookup::new(peer_db, CountingRenderer::default());
        peer.register_realm(public_realm(REALM))?;
        let (applied_tx, mut applied) = mpsc::unbounded_channel();
        let sink = Arc::new(TimedSink { inner: peer, applied: applied_tx });
        let listener = PgInvalidationListener::start(&self.config, origin, sink).await?;

        // The bare hop: one plain connection LISTENs, another runs pg_notify.
        let bare_channel = format!("{}_bare", self.config.get_channel());
        let (heard_tx, mut heard) = mpsc::unbounded_channel();
        let (_listening_client, listening) =
            bare_listener(&self.config, &bare_channel, heard_tx).await?;
        let notify = self.client.prepare("SELECT pg_notify($1, $2)").await?;

        let origin = self.lookup.db().origin().to_owned();
        let result = async {
            let (mut bare, mut propagation, mut calls) = (Vec::new(), Vec::new(), Vec::new());
            let (mut after_return, mut floor, mut one_row) = (Vec::new(), Vec::new(), Vec::new());
            let warmup = (sizes.hop_samples / 10).max(1);
            let mut early = 0_usize;
            for i in 0..warmup + sizes.hop_samples {
                // Each invalidation deletes a cached row, the library's as the floor's.
                let module = format!("{REALM}p{i}.gts");
                let floor_module = format!("{FLOOR_REALM}p{i}.gts");
                self.seed_row(REALM, &module).await?;
                self.seed_row(FLOOR_REALM, &floor_module).await?;
                // Every hop is timed from the start of the call that sends the notification:
                // timed from its return, they are mostly zero, because Postgres delivers a
                // NOTIFY at commit, before the sender has its reply.
                let payload = format!("bench {i}");
                let started = Instant::now();
                self.client.execute(&notify, &[&bare_channel, &payload]).await?;
                let arrived = receive(&mut heard, "the bare NOTIFY").await?;
                let bare_time = arrived.saturating_duration_since(started);

                // The durable floor: one round trip, one transaction, one WAL flush.
                let sql = floor_sql(&floor_module, i as i64, &bare_channel, &origin);
                let started = Instant::now();
                self.client.batch_execute(&sql).await?;
                let arrived = receive(&mut heard, "the durable floor's NOTIFY").await?;
                let floor_time = arrived.saturating_duration_since(started);
                // The same, deleting by the module's URL alone (its row, seeded again).
                self.seed_row(FLOOR_REALM, &floor_module).await?;
                let sql = one_row_floor_sql(&floor_module, i as i64, &bare_channel, &origin);
                let started = Instant::now();
                self.client.batch_execute(&sql).await?;
                let arrived = receive(&mut heard, "the one-row floor's NOTIFY").await?;
                let one_row_time = arrived.saturating_duration_since(started);

                let started = Instant::now();
                self.lookup.invalidate(&module).await?;
                let returned = Instant::now();
                let applied_at = receive(&mut applied, "the propagated invalidation").await?;
                let propagation_time = applied_at.saturating_duration_since(started);
                if i >= warmup {
                    bare.push(micros(bare_time));
                    floor.push(micros(floor_time));
                    one_row.push(micros(one_row_time));
                    propagation.push(micros(propagation_time));
                    calls.push(micros(returned - started));
                    after_return.push(micros(applied_at.saturating_duration_since(returned)));
                    early += usize::from(applied_at <= returned);
                }
            }
            let bare_p50 = quantile(&mut bare, 0.5);
            let p50 = quantile(&mut propagation, 0.5);
            summary.set("bare_notify_p50_us", bare_p50);
            summary.set("propagation_p50_us", p50);
            summary.set("propagation_p99_us", quantile(&mut propagation, 0.99));
            summary.set("propagation_ratio", p50 / bare_p50);
            let floor_p50 = quantile(&mut floor, 0.5);
            summary.set("durable_floor_p50_us", floor_p50);
            summary.set("propagation_vs_durable_ratio", p50 / floor_p50);
            summary.set("durable_floor_one_row_p50_us", quantile(&mut one_row, 0.5));
            // The goal's literal wording: from the call's return (zero when the bump was applied
            // before the call returned).
            summary.set("propagation_after_return_p50_us", quantile(&mut after_return, 0.5));
            summary.set("propagation_after_return_p99_us", quantile(&mut after_return, 0.99));
            summary.propagation_samples = Some((bare.clone(), propagation.clone()));
            // Not goals, explanations: how long the sender's call itself takes, and how often
            // the peer had applied the bump before that call returned.
            summary.set("invalidate_call_p50_us", quantile(&mut calls, 0.5));
            summary.set(
                "propagation_applied_before_return_fraction",
                early as f64 / sizes.hop_samples as f64,
            );
            anyhow::Ok(())
        }
        .await;
        listening.abort();
        listener.shutdown().await;
        result
    }

    /// From the start of `invalidate()` to a polling peer's bump, polling every 100 ms. The
    /// pause before each invalidation walks through the poll period, so the samples do not
    /// all land at one phase of the poller's timer.
    async fn measure_poll_propagation(&self, sizes: &Sizes, summary: &mut Summary) -> Result<()> {
        const INTERVAL: Duration = Duration::from_millis(100);
        let peer = CachingLookup::new(self.lookup.db().clone(), CountingRenderer::default());
        peer.register_realm(public_realm(REALM))?;
        let (applied_tx, mut applied) = mpsc::unbounded_channel();
        let sink = Arc::new(TimedSink { inner: peer, applied: applied_tx });
        let options = ListenerOptions::default().poll(INTERVAL);
        let poller = PgInvalidationListener::start_with(&self.config, None, sink, options).await?;
        let result = async {
            let mut samples = Vec::new();
            for i in 0..sizes.poll_samples {
                let phase = (i as u64 * 37) % INTERVAL.as_millis() as u64;
                tokio::time::sleep(Duration::from_millis(phase)).await;
                let started = Instant::now();
                self.lookup.invalidate(&format!("{REALM}poll{i}.gts")).await?;
                let applied_at = receive(&mut applied, "the polled invalidation").await?;
                samples.push(micros(applied_at.saturating_duration_since(started)));
            }
            summary.set("poll_100ms_propagation_p50_us", quantile(&mut samples, 0.5));
            summary.set("poll_100ms_propagation_p99_us", quantile(&mut samples, 0.99));
            anyhow::Ok(())
        }
        .await;
        poller.shutdown().await;
        result
    }

    async fn measure_fanout(&self, sizes: &Sizes, summary: &mut Summary) -> Result<()> {
        let modules = sizes.fanout_modules;
        let root = format!("{FANOUT_REALM}m0.gts");

        self.build_graph(modules).await?;
        // Not a goal, an explanation: how much of the library's time is the closure query
        // (an invalidation runs it once, under the realm's lock). Its first run on the
        // connection, so it includes planning and a cold cache.
        let started = Instant::now();
        let closure = self.lookup.db().consumers(FANOUT_REALM, &urls::variants(&root)).await?;
        summary.set("fanout_closure_query_10k_ms", started.elapsed().as_secs_f64() * 1e3);
        if closure.len() + 1 < modules {
            bail!("the closure found {} consumers of {modules} modules", closure.len());
        }
        // The library and the floor (the same rows, whose URLs it knows, the same payloads,
        // fewest statements) in turns, on a graph built anew each time: one fan-out is one
        // sample, which a busy machine can double, so each figure is the median of a few.
        let (mut library, mut floor) = (Vec::new(), Vec::new());
        for turn in 0..sizes.fanout_turns {
            if turn > 0 {
                self.build_graph(modules).await?;
            }
            let started = Instant::now();
            let list = self.lookup.invalidate(&root).await?;
            library.push(started.elapsed().as_secs_f64() * 1e3);
            self.check_graph_gone(modules, list.len()).await?;

            self.build_graph(modules).await?;
            floor.push(self.fanout_floor(&list).await?.as_secs_f64() * 1e3);
            self.check_graph_gone(modules, list.len()).await?;
        }

        self.build_graph(modules).await?;
        let started = Instant::now();
        let walked = self.naive_invalidate(&root).await?;
        let naive = started.elapsed();
        self.check_graph_gone(modules, walked).await?;

        // Each turn's ratio compares two fan-outs run one after the other, so a burst of load
        // on the host moves both; the ratio is the median of the turns'.
        let mut ratios: Vec<f64> = library.iter().zip(&floor).map(|(l, f)| l / f).collect();
        let (library, floor) = (quantile(&mut library, 0.5), quantile(&mut floor, 0.5));
        let naive = naive.as_secs_f64() * 1e3;
        summary.set("fanout_10k_ms", library);
        summary.set("fanout_naive_10k_ms", naive);
        summary.set("fanout_speedup", naive / library);
        summary.set("fanout_floor_10k_ms", floor);
        summary.set("fanout_vs_floor_ratio", quantile(&mut ratios, 0.5));
        summary.set("fanout_vs_floor_turns_min", quantile(&mut ratios, 0.0));
        summary.set("fanout_vs_floor_turns_max", quantile(&mut ratios, 1.0));
        Ok(())
    }

    /// The fewest-statements floor of a fan-out whose URLs are known: one pipelined
    /// transaction of `BEGIN`, one DELETE of the rows named by `list`, one statement sending
    /// the payloads the library sends for that list (encoded by the same function), `COMMIT`.
    async fn fanout_floor(&self, list: &[String]) -> Result<Duration> {
        let invalidation =
            Invalidation::Modules { realm_url: FANOUT_REALM.to_owned(), urls: list.to_vec() };
        let payloads = encode_payloads(&invalidation, Some(self.lookup.db().origin()), Some(1));
        let channel = self.config.get_channel();
        let c = &self.client;
        let begin = c.prepare("BEGIN").await?;
        let delete = c
            .prepare("DELETE FROM modules WHERE resolved_realm_url = $1 AND url = ANY ($2::text[])")
            .await?;
        let notify = c.prepare("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p").await?;
        let commit = c.prepare("COMMIT").await?;
        let started = Instant::now();
        let replies = pipelined(vec![
            Box::pin(c.execute(&begin, &[])),
            Box::pin(c.execute(&delete, &[&FANOUT_REALM, &list])),
            Box::pin(c.execute(&notify, &[&channel, &payloads])),
            Box::pin(c.execute(&commit, &[])),
        ])
        .await;
        let elapsed = started.elapsed();
        let counts = replies.into_iter().collect::<Result<Vec<u64>, _>>()?;
        if counts[2] != payloads.len() as u64 {
            bail!("the fan-out floor sent {} of {} payloads", counts[2], payloads.len());
        }
        Ok(elapsed)
    }

    /// Counts the round trips of one module invalidation (and, to check the method, of the
    /// durable floor's one simple query) through a relay (`relay.rs`): client flights under a
    /// delay, and the call's growth under that delay.
    async fn measure_round_trips(
        &self,
        url: &str,
        sizes: &Sizes,
        summary: &mut Summary,
    ) -> Result<()> {
        let keys = [
            "invalidate_round_trips",
            "invalidate_round_trips_by_delay",
            "invalidate_with_consumer_round_trips",
        ];
        let Some(upstream) = tcp_upstream(url).await? else {
            for key in keys.into_iter().chain(["durable_floor_round_trips"]) {
                summary.not_measured(key, "the server is not reached over TCP");
            }
            return Ok(());
        };
        let relay = crate::relay::Relay::start(upstream).await?;
        let mut through = url::Url::parse(url).context("the database URL")?;
        through.set_host(Some("127.0.0.1")).context("cannot point the URL at the relay")?;
        if through.set_port(Some(relay.port())).is_err() {
            bail!("cannot point the database URL at the relay's port");
        }
        let config = PgConfig::new(through.to_string())
            .schema(self.config.get_schema().unwrap_or_default().to_owned())
            .channel(self.config.get_channel().to_owned());
        let db =
            PgAdapter::connect(config.clone()).await.context("cannot connect through the relay")?;
        let lookup = CachingLookup::new(db, CountingRenderer::default());
        lookup.register_realm(public_realm(REALM))?;
        let client = plain_client(&config).await?;
        let origin = lookup.db().origin().to_owned();
        let channel = format!("{}_bare", self.config.get_channel());
        let samples = (sizes.hop_samples / 30).max(3);

        // Statements are prepared once per connection: the first calls are not counted.
        for i in 0..3 {
            lookup.invalidate(&format!("{REALM}rt-warm{i}.gts")).await?;
        }
        let (mut flights, mut plain, mut delayed) = (Vec::new(), Vec::new(), Vec::new());
        let (mut floor_flights, mut floor_plain, mut floor_delayed) =
            (Vec::new(), Vec::new(), Vec::new());
        let mut consumer_flights = Vec::new();
        for i in 0..samples {
            for (delay, tag) in [(Duration::ZERO, "a"), (ROUND_TRIP_DELAY, "b")] {
                let module = format!("{REALM}rt-{tag}{i}.gts");
                let floor_module = format!("{FLOOR_REALM}rt-{tag}{i}.gts");
                self.seed_row(REALM, &module).await?;
                self.seed_row(FLOOR_REALM, &floor_module).await?;
                relay.set_delay(delay);
                let before = relay.flights();
                let started = Instant::now();
                lookup.invalidate(&module).await?;
                let call = micros(started.elapsed());
                let counted = (relay.flights() - before) as f64;

                let sql = floor_sql(&floor_module, -(i as i64) - 1, &channel, &origin);
                let floor_before = relay.flights();
                let started = Instant::now();
                client.batch_execute(&sql).await?;
                let floor_call = micros(started.elapsed());
                let floor_counted = (relay.flights() - floor_before) as f64;
                if delay.is_zero() {
                    plain.push(call);
                    floor_plain.push(floor_call);
                } else {
                    delayed.push(call);
                    flights.push(counted);
                    floor_delayed.push(floor_call);
                    floor_flights.push(floor_counted);
                }
            }
            // A module with a consumer: its fan-out is found under the lock of a second
            // transaction. Counted under the delay only (flights are exact there).
            let (module, consumer) = (format!("{REALM}rt-c{i}.gts"), format!("{REALM}rt-d{i}.gts"));
            self.seed_row(REALM, &module).await?;
            self.seed_consumer(REALM, &consumer, &urls::file_alias(&module)).await?;
            relay.set_delay(ROUND_TRIP_DELAY);
            let before = relay.flights();
            let invalidated = lookup.invalidate(&module).await?;
            consumer_flights.push((relay.flights() - before) as f64);
            if !invalidated.contains(&consumer) {
                bail!("the consumer {consumer} was not invalidated: {invalidated:?}");
            }
        }
        relay.set_delay(Duration::ZERO);
        let per_delay = micros(ROUND_TRIP_DELAY);
        let by_delay = (quantile(&mut delayed, 0.5) - quantile(&mut plain, 0.5)) / per_delay;
        let floor_by_delay =
            (quantile(&mut floor_delayed, 0.5) - quantile(&mut floor_plain, 0.5)) / per_delay;
        let (counted, floor_counted) =
            (quantile(&mut flights, 0.5), quantile(&mut floor_flights, 0.5));
        summary.set("invalidate_round_trips_by_delay", by_delay);
        summary.set("invalidate_with_consumer_round_trips", quantile(&mut consumer_flights, 0.5));
        // A count is reported only when the two methods agree.
        for (key, counted, by_delay) in [
            ("invalidate_round_trips", counted, by_delay),
            ("durable_floor_round_trips", floor_counted, floor_by_delay),
        ] {
            if (counted - by_delay).abs() < 0.5 {
                summary.set(key, counted);
            } else {
                summary.not_measured(
                    key,
                    &format!(
                        "{counted} flights counted, but the delay added {by_delay:.2} round trips"
                    ),
                );
            }
        }
        Ok(())
    }

    /// Inserts `modules` rows `m0` … into the fan-out realm in one statement. Module `i > 0`
    /// depends on one earlier module: on `i - 1` when `i` is a multiple of 3 (chains), else on
    /// `i / 8` (fan-out of up to 8), so every module is a transitive consumer of `m0`. Deps are
    /// stored as aliases (no extension), as the lookup stores them.
    async fn build_graph(&self, modules: usize) -> Result<()> {
        let last = i32::try_from(modules - 1).context("graph too large")?;
        self.client
            .execute("DELETE FROM modules WHERE resolved_realm_url = $1", &[&FANOUT_REALM])
            .await?;
        self.client
            .execute(
                "INSERT INTO modules (url, cache_scope, auth_user_id, resolved_realm_url, \
                 definitions, deps, created_at, file_alias) \
                 SELECT $1 || 'm' || i || '.gts', 'public', '', $1, '{}'::jsonb, \
                   CASE WHEN i = 0 THEN '[]'::jsonb \
                        ELSE jsonb_build_array($1 || 'm' || \
                          (CASE WHEN i % 3 = 0 THEN i - 1 ELSE i / 8 END)) END, \
                   0, $1 || 'm' || i \
                 FROM generate_series(0, $2::int) AS i",
                &[&FANOUT_REALM, &last],
            )
            .await?;
        // VACUUM, not only ANALYZE: it moves the fresh rows from the GIN index's pending list
        // into the index proper. Left pending, every `deps @>` probe scans the whole list
        // (measured: 0.6 ms a probe instead of 2 µs, both ways 100 times slower), which would
        // time the bulk insert's leftovers rather than either algorithm.
        self.client.batch_execute("VACUUM ANALYZE modules").await?;
        Ok(())
    }

    /// Fails unless the invalidation reached every module and left none of its rows.
    async fn check_graph_gone(&self, modules: usize, invalidated: usize) -> Result<()> {
        let left: i64 = self
            .client
            .query_one(
                "SELECT count(*) FROM modules WHERE resolved_realm_url = $1",
                &[&FANOUT_REALM],
            )
            .await?
            .get(0);
        // Each module contributes its URL and its alias to the list.
        if left != 0 || invalidated < 2 * modules {
            bail!(
                "the fan-out left {left} rows and named {invalidated} URLs for {modules} modules"
            );
        }
        Ok(())
    }

    /// The reference's way: breadth-first, one query per name for its direct consumers, then
    /// one DELETE. Each step uses `deps @> [name]`, which the GIN index answers, so this
    /// baseline is kinder than a `jsonb_array_elements` scan. Returns the names invalidated.
    async fn naive_invalidate(&self, root: &str) -> Result<usize> {
        let step = self
            .client
            .prepare(
                "SELECT url, file_alias FROM modules WHERE resolved_realm_url = $1 \
                 AND deps @> jsonb_build_array($2::text)",
            )
            .await?;
        let mut list = urls::variants(root);
        let mut seen: std::collections::HashSet<String> = list.iter().cloned().collect();
        let mut next = 0;
        while next < list.len() {
            let name = list[next].clone();
            for row in self.client.query(&step, &[&FANOUT_REALM, &name]).await? {
                for found in [row.get::<_, String>(0), row.get::<_, String>(1)] {
                    if seen.insert(found.clone()) {
                        list.push(found);
                    }
                }
            }
            next += 1;
        }
        self.client
            .execute(
                "DELETE FROM modules WHERE resolved_realm_url = $1 AND url = ANY ($2)",
                &[&FANOUT_REALM, &list],
            )
            .await?;
        Ok(list.len())
    }

    async fn measure_coalescing(&self, sizes: &Sizes, summary: &mut Summary) -> Result<()> {
        let renderer = CountingRenderer::gated();
        let lookup = CachingLookup::new(self.lookup.db().clone(), renderer.clone());
        lookup.register_realm(public_realm(COALESCE_REALM))?;
        let code_ref = CodeRef::new(format!("{COALESCE_REALM}one.gts"), EXPORT);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..sizes.coalesce_lookups {
            let (lookup, code_ref) = (lookup.clone(), code_ref.clone());
            tasks.spawn(async move { lookup.lookup_definition(&code_ref, None).await });
        }
        // The render is held until every caller waits on an in-flight load: a gate, not a
        // guess at how long spawning takes. Without coalescing each caller would have its own
        // load (and render); with it, all of them wait on one.
        let gathered = tokio::time::timeout(GATHER_TIMEOUT, async {
            while lookup.in_flight_waiters() < sizes.coalesce_lookups {
                tokio::task::yield_now().await;
            }
        });
        gathered.await.context("the coalesced lookups did not all reach the load")?;
        renderer.open();
        let finished = tokio::time::timeout(GATHER_TIMEOUT, async {
            while let Some(joined) = tasks.join_next().await {
                joined.context("a lookup task panicked")??;
            }
            anyhow::Ok(())
        });
        finished.await.context("the coalesced lookups did not finish")??;
        summary.set("coalesce_1000_prerenders", lookup.prerenderer().count() as f64);
        Ok(())
    }
}

impl PgBench {
    /// What cross-process populate coalescing adds to an uncontended miss (instant render):
    /// the lock's transaction and the announcement, next to the same miss without it.
    async fn measure_populate_cost(&self, sizes: &Sizes, summary: &mut Summary) -> Result<()> {
        let db = self.lookup.db().clone();
        let signals = Arc::new(PopulateSignals::new());
        let coordinator = PgPopulateCoordinator::new(&db, signals, PopulateSettings::default())?;
        let coordinated = CachingLookup::with_coordinator(
            db,
            CountingRenderer::default(),
            NoRemoteRealms,
            LookupConfig::default(),
            Some(coordinator),
        );
        coordinated.register_realm(public_realm(REALM))?;
        let (mut plain, mut with) = (Vec::new(), Vec::new());
        for i in 0..sizes.hop_samples {
            let started = Instant::now();
            self.lookup
                .lookup_definition(&CodeRef::new(format!("{REALM}miss-{i}.gts"), EXPORT), None)
                .await?;
            plain.push(micros(started.elapsed()));
            let started = Instant::now();
            coordinated
                .lookup_definition(&CodeRef::new(format!("{REALM}cmiss-{i}.gts"), EXPORT), None)
                .await?;
            with.push(micros(started.elapsed()));
        }
        let (plain, with) = (quantile(&mut plain, 0.5), quantile(&mut with, 0.5));
        summary.set("miss_p50_us", plain);
        summary.set("coordinated_miss_p50_us", with);
        summary.set("populate_miss_overhead_us", with - plain);
        Ok(())
    }
}

/// Process B's sink: the lookup's own bump, then the time it was applied.
pub(crate) struct TimedSink {
    pub(crate) inner: PgLookup,
    pub(crate) applied: mpsc::UnboundedSender<Instant>,
}

impl InvalidationSink for TimedSink {
    fn bump_modules(&self, realm_url: &str, urls: &[String]) {
        self.inner.bump_modules(realm_url, urls);
        let _ = self.applied.send(Instant::now());
    }

    fn bump_realm(&self, realm_url: &str) {
        self.inner.bump_realm(realm_url);
    }

    fn bump_global(&self) {
        self.inner.bump_global();
    }
}

/// The durable floor's transaction, as one simple-query string (one round trip): a logged
/// guard-like record, the DELETE an invalidation of `module` in [`FLOOR_REALM`] must make
/// (the rows named by the module's variants, by URL or by alias: what the library deletes
/// before any consumer), the NOTIFY the library would send for it on `channel` (encoded by
/// the library's own function), and `COMMIT`.
pub(crate) fn floor_sql(module: &str, seq: i64, channel: &str, origin: &str) -> String {
    let names: Vec<String> = urls::variants(module).iter().map(|name| literal(name)).collect();
    let hashes: Vec<String> = names.iter().map(|name| format!("md5({name})")).collect();
    let (hashes, names) = (hashes.join(", "), names.join(", "));
    floor_transaction(
        module,
        seq,
        channel,
        origin,
        &format!("(url_hash IN ({hashes}) OR file_alias IN ({names}))"),
    )
}

/// [`floor_sql`] deleting by `module`'s URL alone (one index probe): the floor of the issue
/// that set it, kept as `durable_floor_one_row_p50_us` to compare runs across the change.
fn one_row_floor_sql(module: &str, seq: i64, channel: &str, origin: &str) -> String {
    let condition = format!("url_hash = md5({})", literal(module));
    floor_transaction(module, seq, channel, origin, &condition)
}

/// The floor's transaction, deleting the rows of [`FLOOR_REALM`] that meet `condition`.
fn floor_transaction(
    module: &str,
    seq: i64,
    channel: &str,
    origin: &str,
    condition: &str,
) -> String {
    let invalidation =
        Invalidation::Modules { realm_url: FLOOR_REALM.to_owned(), urls: urls::variants(module) };
    let payload = encode_payloads(&invalidation, Some(origin), Some(seq)).swap_remove(0);
    let (realm, module, channel, payload) =
        (literal(FLOOR_REALM), literal(module), literal(channel), literal(&payload));
    format!(
        "BEGIN; INSERT INTO floor_guard (realm, url, seq) VALUES ({realm}, {module}, {seq}); \
         DELETE FROM modules WHERE resolved_realm_url = {realm} AND {condition}; \
         SELECT pg_notify({channel}, {payload}); COMMIT"
    )
}

/// `text` as an SQL string literal (`standard_conforming_strings` is on since Postgres 9.1).
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The machine's load averages (1, 5 and 15 minutes) at the end of the run, from
/// `/proc/loadavg` (empty elsewhere): on a shared machine, what else was running.
pub(crate) fn load_average() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_default()
}

/// One line naming the server's settings, for the table.
pub(crate) fn server_line(server: &Map<String, Value>) -> String {
    server
        .iter()
        .map(|(name, value)| format!("{name}={}", value.as_str().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(" ")
}

type Reply<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// Awaits every reply of a flight. Each future is polled once, in order, before any is polled
/// again, and tokio-postgres sends a request at its future's first poll: the requests leave
/// in order, before any reply is awaited (one round trip).
async fn pipelined(mut flight: Vec<Reply<'_>>) -> Vec<Result<u64, tokio_postgres::Error>> {
    let mut replies: Vec<Option<Result<u64, tokio_postgres::Error>>> =
        flight.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (future, reply) in flight.iter_mut().zip(replies.iter_mut()) {
            if reply.is_none()
                && let std::task::Poll::Ready(done) = future.as_mut().poll(cx)
            {
                *reply = Some(done);
            }
        }
        if replies.iter().all(Option::is_some) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    replies.into_iter().flatten().collect()
}

/// The address of a `postgres://host:port/…` URL's server, or `None` when it is not reached
/// over TCP (a Unix socket directory as host).
async fn tcp_upstream(url: &str) -> Result<Option<std::net::SocketAddr>> {
    let parsed = url::Url::parse(url).context("the database URL")?;
    let Some(host) = parsed.host_str().filter(|host| !host.is_empty()) else { return Ok(None) };
    if parsed.query_pairs().any(|(key, _)| key == "host" || key == "hostaddr") {
        return Ok(None);
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = parsed.port().unwrap_or(5432);
    let mut found = tokio::net::lookup_host((host, port)).await?;
    Ok(found.next())
}

/// The p50 of cached lookups of one module over an adapter made from `config` (its first
/// lookup renders and stores the row, or finds it).
async fn hit_p50(config: PgConfig, sizes: &Sizes) -> Result<f64> {
    let db = PgAdapter::connect(config).await.context("cannot open Postgres")?;
    let lookup = CachingLookup::new(db, CountingRenderer::default());
    lookup.register_realm(public_realm(REALM))?;
    let code_ref = CodeRef::new(format!("{REALM}modes.gts"), EXPORT);
    let p50 = repeated_lookup_p50(&lookup, &code_ref, sizes).await?;
    if lookup.prerenderer().count() > 1 {
        bail!("the hit measurement prerendered again: the row was not a hit");
    }
    Ok(p50)
}

/// The p50, in microseconds, of `sizes.hit_samples` lookups of `code_ref` after a warm-up
/// of a tenth as many (the first of which may render).
async fn repeated_lookup_p50<D: DbAdapter>(
    lookup: &CachingLookup<D, CountingRenderer>,
    code_ref: &CodeRef,
    sizes: &Sizes,
) -> Result<f64> {
    let warmup = (sizes.hit_samples / 10).max(1);
    let mut samples = Vec::with_capacity(sizes.hit_samples);
    for i in 0..warmup + sizes.hit_samples {
        let started = Instant::now();
        std::hint::black_box(lookup.lookup_definition(code_ref, None).await?);
        if i >= warmup {
            samples.push(micros(started.elapsed()));
        }
    }
    Ok(quantile(&mut samples, 0.5))
}

/// The p50, in milliseconds, of opening one connection with `config` (TCP, TLS as its URL
/// says, authentication) and closing it.
async fn connect_p50(config: &PgConfig, count: usize) -> Result<f64> {
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let (client, connection) = config.connect_unpooled().await?;
        let elapsed = started.elapsed();
        drop(client);
        let _ = connection.await;
        samples.push(elapsed.as_secs_f64() * 1000.0);
    }
    Ok(quantile(&mut samples, 0.5))
}

/// The source scanner on modules of 20 000 and 40 000 exports (and 40 000 imports): the
/// time of one scan, best of a few, and the ratio of the two export sizes (2 for a linear
/// scan, 4 for a quadratic one).
fn measure_scanner(sizes: &Sizes, summary: &mut Summary) {
    let rounds = if sizes.hit_samples >= 20_000 { 9 } else { 5 };
    let best_ms = |source: &str| {
        (0..rounds)
            .map(|_| {
                let started = Instant::now();
                std::hint::black_box(lookup_cli::scan::scan(source));
                started.elapsed().as_secs_f64() * 1000.0
            })
            .fold(f64::INFINITY, f64::min)
    };
    let exports = |n: usize| {
        (0..n).map(|i| format!("export class E{i} extends Base {{}}\n")).collect::<String>()
    };
    let imports = |n: usize| {
        (0..n).map(|i| format!("import {{ x{i} }} from './m{i}';\n")).collect::<String>()
    };
    let small = best_ms(&exports(20_000));
    let large = best_ms(&exports(40_000));
    summary.set("scan_20k_exports_ms", small);
    summary.set("scan_40k_exports_ms", large);
    summary.set("scan_doubling_ratio", large / small);
    summary.set("scan_40k_imports_ms", best_ms(&imports(40_000)));
}

/// A plain tokio-postgres connection (the run's schema on its search path), driven by a task.
pub(crate) async fn plain_client(config: &PgConfig) -> Result<tokio_postgres::Client> {
    let mut pg = config.tokio_postgres_config()?;
    pg.application_name("deflookup-bench");
    let (client, connection) = pg.connect(NoTls).await.context("cannot connect to Postgres")?;
    tokio::spawn(async move {
        // Its errors surface as the client's.
        let _ = connection.await;
    });
    Ok(client)
}

/// A plain connection LISTENing on `channel`, driven through `poll_message` by a task that
/// sends the arrival time of each notification. The client must be kept alive meanwhile.
pub(crate) async fn bare_listener(
    config: &PgConfig,
    channel: &str,
    heard: mpsc::UnboundedSender<Instant>,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
    let mut pg = config.tokio_postgres_config()?;
    pg.application_name("deflookup-bench-listen");
    let (client, mut connection) = pg.connect(NoTls).await.context("cannot connect to Postgres")?;
    let task = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    let _ = heard.send(Instant::now());
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
    });
    // The channel is the run's own name (an identifier `PgConfig` validated) plus `_bare`.
    client.batch_execute(&format!("LISTEN {channel}")).await?;
    Ok((client, task))
}

pub(crate) async fn receive(
    rx: &mut mpsc::UnboundedReceiver<Instant>,
    what: &str,
) -> Result<Instant> {
    match tokio::time::timeout(HOP_TIMEOUT, rx.recv()).await {
        Ok(Some(at)) => Ok(at),
        Ok(None) => bail!("{what}: the receiving side stopped"),
        Err(_) => bail!("{what} did not arrive within {HOP_TIMEOUT:?}"),
    }
}

/// Memory of the generation state after many distinct module bumps with no load in flight.
fn measure_generations(sizes: &Sizes, summary: &mut Summary) -> Result<()> {
    eprintln!("bench: {} distinct module invalidations", sizes.generation_bumps);
    let db = SqliteAdapter::open_in_memory()?;
    let lookup = CachingLookup::new(db, CountingRenderer::default());
    lookup.register_realm(public_realm(REALM))?;
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..sizes.generation_bumps {
        batch.push(format!("{REALM}gen/m{i}.gts"));
        if batch.len() == batch.capacity() || i + 1 == sizes.generation_bumps {
            InvalidationSink::bump_modules(&lookup, REALM, &batch);
            batch.clear();
        }
    }
    let bytes = lookup.generation_state_bytes();
    summary.set("generation_state_bytes_after_1m_invalidations", bytes as f64);
    Ok(())
}

/// Hits and misses on a real SQLite file; a miss reads, renders (no delay) and persists.
async fn measure_sqlite(sizes: &Sizes, summary: &mut Summary) -> Result<()> {
    eprintln!("bench: SQLite hits and misses ({} each)", sizes.sqlite_samples);
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let db = SqliteAdapter::open(dir.path().join("bench.sqlite3"))?;
    let lookup = CachingLookup::new(db, CountingRenderer::default());
    lookup.register_realm(public_realm(REALM))?;
    let (mut hits, mut misses) = (Vec::new(), Vec::new());
    let hot = CodeRef::new(format!("{REALM}hot.gts"), EXPORT);
    lookup.lookup_definition(&hot, None).await?;
    for i in 0..sizes.sqlite_samples {
        let cold = CodeRef::new(format!("{REALM}cold{i}.gts"), EXPORT);
        let started = Instant::now();
        std::hint::black_box(lookup.lookup_definition(&cold, None).await?);
        misses.push(micros(started.elapsed()));
        let started = Instant::now();
        std::hint::black_box(lookup.lookup_definition(&hot, None).await?);
        hits.push(micros(started.elapsed()));
    }
    let expected = sizes.sqlite_samples as u64 + 1;
    if lookup.prerenderer().count() != expected {
        bail!("SQLite: {} prerenders, expected {expected}", lookup.prerenderer().count());
    }
    summary.set("sqlite_hit_p50_us", quantile(&mut hits, 0.5));
    summary.set("sqlite_miss_p50_us", quantile(&mut misses, 0.5));
    Ok(())
}
