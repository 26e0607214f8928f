//! `cargo xtask soak [--seconds N] [--processes P] [--unsafe | --poll-ms N | --untracked-writers]`: many real `deflookup`
//! processes share one Postgres database while faults are injected, and audits count the
//! stale rows in the cache.
//!
//! 1. The server is `$DATABASE_URL`'s, or a throwaway cluster ([`Server`]). The binary is
//!    built in release mode; the run gets a fresh database and a temporary realm directory
//!    holding a module graph ([`soak_protocol::module_sources`]) whose files carry
//!    `// version: N`.
//! 2. P workers (`deflookup … soak-worker`, see `crates/lookup-cli/src/soak_worker.rs`) do
//!    random lookups, edits (a strictly higher version, then an invalidation) and
//!    invalidations for N seconds, their renders overlapping edits at random offsets.
//! 3. Meanwhile, every [`FAULT_INTERVAL`], a fault from a plain connection of our own, in
//!    turn: terminate the workers' listener backends (`application_name`
//!    `deflookup-listener`), terminate their pooled query connections (`deflookup`, so
//!    renders and persists in flight lose their connection), restart the server (only one
//!    xtask may restart: its own cluster, or `$DEFLOOKUP_PG_RESTART` for `$DATABASE_URL`).
//!    Only faults that hit something are counted.
//! 4. Every [`CHECKPOINT_INTERVAL`] the workers are paused between two operations (a pause
//!    file, acknowledged per worker), the table is audited, and they resume; once they have
//!    stopped (they stop themselves; one overrunning by [`OVERRUN_LIMIT`] is killed and fails
//!    the run) the table is audited a last time. An audit reads every row: a row whose
//!    definitions record a version older than the `// version:` its file has now is stale.
//!
//! Why several audits: a stale row lives only until the next invalidation that covers it
//! (here, a fraction of a second), so one audit at the end samples the stale rows *of that
//! moment*, a number that does not grow with the length of the run. Measured on the 2-core
//! machine, 60 s and 3 processes `--unsafe`: audited only at the end, two runs found 0 stale
//! rows of 21 (the control proved nothing); audited every 2 s, a run found 20 of 560.
//! Checkpoints sample many moments, so the control's finds grow with the run, and so does
//! what a zero in the guarded run means.
//!
//! The line before the last tells what the listeners' reconnects cost:
//! `listener: resyncs: R (loads in flight discarded: D); catch-ups: C (invalidations replayed: N)`.
//! `--untracked-writers` turns catch-up off (every reconnect resyncs, as before catch-up
//! existed: the comparison); `--poll-ms N` makes every worker poll the invalidation log
//! instead of listening.
//!
//! Its last line on stdout is exactly
//! `stale rows: S of R rows; invalidations: I; lookups: L; faults: F`, where R counts the
//! distinct rows seen by all audits (a row rewritten is a new row; one seen twice counts
//! once) and S those of them that were stale; everything else goes to stderr. It reports and
//! does not judge: it exits 0 whatever S is, and fails only when it cannot do its job (a
//! worker that does not start, crashes, does not pause, or prints no summary).
//!
//! Here: the run and its loop. `options.rs` reads the command line, `database.rs` makes the
//! run's database and the plain connections, `realm.rs` the realm directory, `workers.rs`
//! starts, pauses and waits for the workers, `faults.rs` injects the faults and `audit.rs`
//! judges the rows. What the workers must agree on (module names, the version line) is
//! `soak_protocol`, the very file `lookup-cli` compiles too
//! (`crates/lookup-cli/src/soak_protocol.rs`): xtask includes it by path rather than
//! depending on the library crates.

mod audit;
mod database;
mod faults;
mod options;
mod realm;
#[path = "../../../crates/lookup-cli/src/soak_protocol.rs"]
mod soak_protocol;
mod workers;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use self::audit::{Auditor, read_rows};
use self::database::SoakDatabase;
use self::faults::{FaultKind, FaultLog, inject};
use self::options::{Options, parse_options, usage};
use self::realm::RealmDir;
use self::workers::{OVERRUN_LIMIT, Summary, Workers};
use crate::pg::Server;
use crate::{cargo, catch_interrupts, interrupted, release_binary, run_step};

/// Modules in the graph.
const MODULES: u64 = 40;
/// Time between two faults.
const FAULT_INTERVAL: Duration = Duration::from_secs(9);
/// Time between two checkpoints (pause, audit, resume).
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);
/// No checkpoint this close to the end: the final audit comes soon anyway.
const CHECKPOINT_END_MARGIN: Duration = Duration::from_secs(3);
/// The pause between the workers going quiet and an audit (for the last of their
/// connections' work to land).
const CHECKPOINT_SETTLE: Duration = Duration::from_millis(200);
/// Time between two progress lines.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the soak (see the module documentation).
pub(crate) fn run(args: &[String]) -> Result<()> {
    let Some(options) = parse_options(args)? else {
        println!("{}", usage());
        return Ok(());
    };
    catch_interrupts()?;
    let mut build = cargo();
    build.args(["build", "--release", "--locked", "-p", "lookup-cli"]);
    run_step("cargo build --release -p lookup-cli", build)?;
    let binary = release_binary("deflookup")?;

    let server = Server::from_env_or_start()?;
    // The run's database is named by rewriting the URL's path, and the workers' `--db` takes
    // URLs only.
    if let Server::Given { url, .. } = &server
        && !url.starts_with("postgres://")
        && !url.starts_with("postgresql://")
    {
        bail!("the soak needs $DATABASE_URL in the postgres://… form");
    }
    let realm = RealmDir::create()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let database = SoakDatabase::create(&runtime, &server)?;
    let result = soak(&runtime, &options, &server, &database, &realm, &binary);
    server.explain_failure(&result);
    database.drop_if_external(&runtime, &server);
    let line = result?;
    // Drop the cluster and the realm first, so that their notices come before the last line.
    drop(realm);
    drop(server);
    println!("{line}");
    Ok(())
}

/// The run itself; returns the last line.
fn soak(
    runtime: &tokio::runtime::Runtime,
    options: &Options,
    server: &Server,
    database: &SoakDatabase,
    realm: &RealmDir,
    binary: &Path,
) -> Result<String> {
    let restart = server.restart_command();
    if restart.is_none() {
        eprintln!(
            "xtask: notice: no server restarts in this run: $DATABASE_URL names a server xtask \
             must not restart (set DEFLOOKUP_PG_RESTART to a command restarting it)"
        );
    }
    let schedule = FaultKind::schedule(options.unsafe_mode, restart.is_some());
    let polling = options.poll_ms.map(|ms| format!(" polling every {ms} ms"));
    let mode = match (options.unsafe_mode, options.untracked_writers, &polling) {
        (true, _, _) => " UNSAFE (no broadcast, no guard, no listener)",
        (_, true, _) => " resyncing after every reconnect (catch-up off)",
        (_, _, Some(polling)) => polling,
        _ => "",
    };
    eprintln!(
        "xtask: soak{mode}: {} workers for {} s over {MODULES} modules in {}",
        options.processes,
        options.seconds,
        realm.path().display()
    );

    let mut workers = Workers::start(binary, options, &database.url, realm)?;
    let began = Instant::now();
    let run_for = Duration::from_secs(options.seconds);
    let mut faults = FaultLog::default();
    let mut auditor = Auditor::default();
    let mut next_fault = began + FAULT_INTERVAL;
    let mut next_checkpoint = began + CHECKPOINT_INTERVAL;
    let mut next_progress = began + PROGRESS_INTERVAL;
    while began.elapsed() < run_for {
        if interrupted() {
            bail!("interrupted");
        }
        workers.check_none_failed()?;
        if Instant::now() >= next_fault {
            let kind = schedule[faults.attempted % schedule.len()];
            faults.attempted += 1;
            match inject(runtime, kind, &database.url, restart.as_deref()) {
                Ok(0) => eprintln!("xtask: fault: {} hit nothing (not counted)", kind.noun()),
                Ok(hits) => faults.record(kind, hits),
                Err(error) => eprintln!("xtask: fault: {} failed: {error:#}", kind.noun()),
            }
            next_fault = Instant::now().max(next_fault) + FAULT_INTERVAL;
        }
        if Instant::now() >= next_checkpoint {
            if began.elapsed() + CHECKPOINT_END_MARGIN < run_for {
                workers.pause(&realm.pause_file())?;
                std::thread::sleep(CHECKPOINT_SETTLE);
                // Rows *and files* are read while every worker is paused: a file read after
                // the resume could hold an edit whose invalidation is still to come, and make
                // a fresh row look stale.
                let audited = runtime
                    .block_on(read_rows(&database.url))
                    .and_then(|rows| auditor.add(&rows, realm.path()));
                // Resume before reporting a failure: the workers must not wait for us.
                workers.resume(&realm.pause_file())?;
                audited?;
            }
            next_checkpoint = Instant::now().max(next_checkpoint) + CHECKPOINT_INTERVAL;
        }
        if Instant::now() >= next_progress {
            eprintln!(
                "xtask: soak {:>3} s of {}: faults so far: {}; {}",
                began.elapsed().as_secs(),
                options.seconds,
                faults.describe(),
                auditor.describe()
            );
            next_progress = Instant::now().max(next_progress) + PROGRESS_INTERVAL;
        }
        std::thread::sleep(Duration::from_millis(100).min(run_for.saturating_sub(began.elapsed())));
    }

    eprintln!("xtask: time is up; waiting for the workers to stop");
    // Every worker has exited and its replies were read: nothing of theirs can still land.
    let summaries = workers.wait_all(began + run_for + OVERRUN_LIMIT)?;
    let totals = Summary::sum(&summaries);
    eprintln!(
        "xtask: workers: {} lookups, {} invalidations, {} edits, {} failed operations",
        totals.lookups, totals.invalidations, totals.edits, totals.errors
    );
    eprintln!("xtask: faults: {}", faults.describe());

    let rows = runtime.block_on(read_rows(&database.url))?;
    auditor.add(&rows, realm.path())?;
    auditor.report();
    println!(
        "listener: resyncs: {} (loads in flight discarded: {}); catch-ups: {} (invalidations replayed: {})",
        totals.resyncs, totals.discarded_by_resync, totals.catch_ups, totals.replayed
    );
    Ok(format!(
        "stale rows: {} of {} rows; invalidations: {}; lookups: {}; faults: {}",
        auditor.stale_rows(),
        auditor.rows_seen(),
        totals.invalidations,
        totals.lookups,
        faults.counted
    ))
}
