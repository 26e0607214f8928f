//! `cargo xtask soak [--seconds N] [--processes P] [--unsafe | --poll-ms N | --untracked-writers]`: many real `deflookup`
//! processes share one Postgres database while faults are injected, and audits count the
//! stale rows in the cache.
//!
//! 1. The server is `$DATABASE_URL`'s, or a throwaway cluster ([`Server`]). The binary is
//!    built in release mode; the run gets a fresh database and a temporary realm directory
//!    holding a module graph ([`module_sources`]) whose files carry `// version: N`.
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

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

use crate::pg::{Server, temp_dir};
use crate::{cargo, catch_interrupts, interrupted, run_step};

/// The realm's URL; the workers serve it from the temporary directory.
const REALM_URL: &str = "http://soak.test/realm/";
/// Modules in the graph.
const MODULES: u64 = 40;
/// Leaves of the graph (`m0` … `m3` import nothing).
const LEAVES: u64 = 4;
/// Concurrent tasks per worker (`soak-worker --tasks`).
const WORKER_TASKS: u64 = 4;
/// The most a worker's render waits after reading its file (`soak-worker --jitter-ms`).
const WORKER_JITTER_MS: u64 = 40;
/// Time between two faults.
const FAULT_INTERVAL: Duration = Duration::from_secs(9);
/// Time between two checkpoints (pause, audit, resume).
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);
/// No checkpoint this close to the end: the final audit comes soon anyway.
const CHECKPOINT_END_MARGIN: Duration = Duration::from_secs(3);
/// How long the workers may take to pause, or to resume.
const PAUSE_LIMIT: Duration = Duration::from_secs(40);
/// The pause between the workers going quiet and an audit (for the last of their
/// connections' work to land).
const CHECKPOINT_SETTLE: Duration = Duration::from_millis(200);
/// Time between two progress lines.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// How long past its N seconds a worker may take to stop before it is killed.
const OVERRUN_LIMIT: Duration = Duration::from_secs(30);
/// How long a server restart may take before the soak fails.
const RESTART_LIMIT: Duration = Duration::from_secs(120);
/// The `application_name` of the fault connection, so it never terminates itself.
const FAULT_APPLICATION: &str = "deflookup-soak";
/// Stale rows listed on stderr.
const SHOWN_STALE: usize = 10;

/// The command line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    seconds: u64,
    processes: u64,
    unsafe_mode: bool,
    /// The workers poll the log every this many milliseconds instead of listening.
    poll_ms: Option<u64>,
    /// The workers' listeners resync after every reconnect instead of catching up.
    untracked_writers: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            seconds: 60,
            processes: 3,
            unsafe_mode: false,
            poll_ms: None,
            untracked_writers: false,
        }
    }
}

fn usage() -> &'static str {
    "cargo xtask soak [--seconds N] [--processes P] [--unsafe | --poll-ms N | \
     --untracked-writers]: P deflookup processes \
     (default 3) look up, edit and invalidate modules for N seconds (default 60) on one \
     Postgres database ($DATABASE_URL or a throwaway cluster) while listener backends and \
     pooled connections are terminated and the server is restarted; then it audits the table. \
     Last line: `stale rows: S of R rows; invalidations: I; lookups: L; faults: F`. \
     --unsafe runs the workers without broadcast, durable guard and listener (the control); \
     --poll-ms N makes them poll the invalidation log instead of listening; \
     --untracked-writers makes their listeners resync after a reconnect instead of catching up."
}

fn parse_options(args: &[String]) -> Result<Option<Options>> {
    let mut options = Options::default();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        let (flag, inline) = match word.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_owned())),
            None => (word.as_str(), None),
        };
        let mut value = |name: &str| -> Result<u64> {
            let text = inline.clone().or_else(|| words.next().cloned());
            let text = text.with_context(|| format!("{name} needs a value"))?;
            text.parse().map_err(|_| anyhow!("{name} expects a whole number, got {text:?}"))
        };
        match flag {
            "--help" | "-h" => return Ok(None),
            "--seconds" => options.seconds = value("--seconds")?,
            "--processes" => options.processes = value("--processes")?,
            "--unsafe" if inline.is_none() => options.unsafe_mode = true,
            "--poll-ms" => options.poll_ms = Some(value("--poll-ms")?),
            "--untracked-writers" if inline.is_none() => options.untracked_writers = true,
            _ => bail!("unknown argument {word:?}\n{}", usage()),
        }
    }
    if options.seconds == 0 || options.processes == 0 || options.poll_ms == Some(0) {
        bail!("--seconds, --processes and --poll-ms must be at least 1");
    }
    let modes = [options.unsafe_mode, options.poll_ms.is_some(), options.untracked_writers];
    if modes.iter().filter(|on| **on).count() > 1 {
        bail!("--unsafe, --poll-ms and --untracked-writers go one at a time");
    }
    Ok(Some(options))
}

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
        auditor.stale.len(),
        auditor.seen.len(),
        totals.invalidations,
        totals.lookups,
        faults.counted
    ))
}

/// Where the release binary `name` lands: `<target dir>/release/<name>`.
pub(crate) fn release_binary(name: &str) -> Result<PathBuf> {
    let mut metadata = cargo();
    metadata.args(["metadata", "--format-version", "1", "--no-deps"]);
    let output = metadata.output().context("cannot run cargo metadata")?;
    if !output.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let metadata: Value =
        serde_json::from_slice(&output.stdout).context("cargo metadata printed no JSON")?;
    let target = metadata["target_directory"].as_str().context("no target_directory")?;
    let binary = Path::new(target).join("release").join(name);
    if !binary.is_file() {
        bail!("the build left no binary at {}", binary.display());
    }
    Ok(binary)
}

/// The run's own database on the server.
#[derive(Debug)]
struct SoakDatabase {
    name: String,
    url: String,
}

impl SoakDatabase {
    fn create(runtime: &tokio::runtime::Runtime, server: &Server) -> Result<Self> {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        let name = format!("deflookup_soak_{}_{millis}", std::process::id());
        let server_url = server.url();
        runtime.block_on(async {
            let client = connect(&server_url).await?;
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .with_context(|| format!("cannot create the database {name}"))
        })?;
        let url = with_database(&server_url, &name)?;
        Ok(SoakDatabase { name, url })
    }

    /// Drops the database from a server that outlives the run (the throwaway cluster goes
    /// as a whole). Best effort: a failure is only reported.
    fn drop_if_external(&self, runtime: &tokio::runtime::Runtime, server: &Server) {
        if !matches!(server, Server::Given { .. }) {
            return;
        }
        let server_url = server.url();
        let dropped = runtime.block_on(async {
            let client = connect(&server_url).await?;
            client.batch_execute(&format!("DROP DATABASE IF EXISTS {}", self.name)).await?;
            anyhow::Ok(())
        });
        if let Err(error) = dropped {
            eprintln!("xtask: warning: cannot drop the database {}: {error:#}", self.name);
        }
    }
}

/// `url` naming the database `name` instead of its own (URL form only; query kept).
fn with_database(url: &str, name: &str) -> Result<String> {
    let mut url = url::Url::parse(url)
        .with_context(|| format!("the soak needs a postgres://… URL, not {url:?}"))?;
    url.set_path(&format!("/{name}"));
    Ok(url.into())
}

/// A connection of our own (named [`FAULT_APPLICATION`]), driven on the current runtime.
async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let mut config: tokio_postgres::Config =
        url.parse().context("the database URL is not a valid Postgres connection string")?;
    config.application_name(FAULT_APPLICATION).connect_timeout(Duration::from_secs(5));
    let (client, connection) =
        config.connect(tokio_postgres::NoTls).await.context("cannot connect to Postgres")?;
    tokio::spawn(async move {
        // Its errors surface as the client's.
        let _ = connection.await;
    });
    Ok(client)
}

/// The temporary realm directory, removed on drop.
#[derive(Debug)]
struct RealmDir {
    dir: tempfile::TempDir,
}

impl RealmDir {
    fn create() -> Result<Self> {
        let realm = RealmDir { dir: temp_dir("deflookup-soak")? };
        for (name, source) in module_sources(MODULES) {
            let path = realm.path().join(&name);
            std::fs::write(&path, source)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(realm)
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// While this file exists the workers pause (see `soak_worker.rs`).
    fn pause_file(&self) -> PathBuf {
        self.path().join(".soak-pause")
    }

    /// Worker `number` creates this file once it has paused.
    fn ack_file(&self, number: u64) -> PathBuf {
        self.path().join(format!(".soak-paused-{number}"))
    }
}

/// The module graph: `m0.gts` … `m{count-1}.gts`, module `mI` exporting class `MI`, each at
/// `// version: 1`. The first [`LEAVES`] import nothing and are imported by many (fan-in);
/// the others form chains of three (`a ← b ← c`, each importing the one before it), the head
/// of a chain importing one or two of the leaves and its tail one more leaf, and sometimes
/// the head too (so one to three imports each). Specifiers are relative, alternately with
/// and without the extension. Deterministic.
///
/// The graph is kept shallow on purpose: an edit of a leaf invalidates the chains that
/// import it, an edit elsewhere at most three modules. A deep graph (one long chain)
/// turns nearly every edit into an invalidation of everything, so rows, stale ones included,
/// live for milliseconds and the audits see little.
fn module_sources(count: u64) -> Vec<(String, String)> {
    let mut rng = fastrand::Rng::with_seed(0x5eed_50a4_c0ff_ee01);
    (0..count)
        .map(|i| {
            let mut imports: Vec<u64> = Vec::new();
            if i >= LEAVES {
                let leaf = |rng: &mut fastrand::Rng| rng.u64(..LEAVES.min(i));
                match (i - LEAVES) % 3 {
                    0 => {
                        imports.push(leaf(&mut rng));
                        if rng.bool() {
                            let second = leaf(&mut rng);
                            if !imports.contains(&second) {
                                imports.push(second);
                            }
                        }
                    }
                    position => {
                        imports.push(i - 1);
                        if position == 2 {
                            imports.push(leaf(&mut rng));
                            if rng.bool() {
                                imports.push(i - 2);
                            }
                        }
                    }
                }
            }
            let mut source = String::from("// version: 1\n");
            for j in &imports {
                let extension = if j % 2 == 0 { ".gts" } else { "" };
                source.push_str(&format!("import {{ M{j} }} from './m{j}{extension}';\n"));
            }
            match imports.first() {
                Some(base) => source.push_str(&format!("export class M{i} extends M{base} {{}}\n")),
                None => source.push_str(&format!("export class M{i} {{}}\n")),
            }
            (format!("m{i}.gts"), source)
        })
        .collect()
}

/// One worker process and where its stderr goes.
#[derive(Debug)]
struct Worker {
    number: u64,
    child: Child,
    log: PathBuf,
    /// Exists while the worker is paused.
    ack: PathBuf,
    /// Set once it has exited.
    status: Option<std::process::ExitStatus>,
}

/// The worker processes, killed on drop if still running (an error or Ctrl-C on the way).
#[derive(Debug)]
struct Workers(Vec<Worker>);

impl Workers {
    fn start(binary: &Path, options: &Options, db_url: &str, realm: &RealmDir) -> Result<Self> {
        let mut workers = Workers(Vec::new());
        let realm_arg = format!("{REALM_URL}={}", realm.path().display());
        for number in 1..=options.processes {
            // Beside the modules: the workers only ever read `m*.gts` files.
            let log = realm.path().join(format!("worker-{number}.log"));
            let stderr =
                File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
            let mut command = Command::new(binary);
            command.args(["--db", db_url, "--realm", &realm_arg]);
            if options.unsafe_mode {
                command.arg("--unsafe");
            }
            if let Some(ms) = options.poll_ms {
                command.args(["--poll-ms", &ms.to_string()]);
            }
            if options.untracked_writers {
                command.arg("--untracked-writers");
            }
            command.arg("soak-worker");
            command.args(["--seconds", &options.seconds.to_string()]);
            command.args(["--seed", &number.to_string()]);
            command.args(["--modules", &MODULES.to_string()]);
            command.args(["--tasks", &WORKER_TASKS.to_string()]);
            command.args(["--jitter-ms", &WORKER_JITTER_MS.to_string()]);
            command.arg("--pause-file").arg(realm.pause_file());
            command.arg("--ack-file").arg(realm.ack_file(number));
            command.env_remove("DATABASE_URL").stdout(Stdio::piped()).stderr(stderr);
            let child = command
                .spawn()
                .with_context(|| format!("cannot start worker {number} ({})", binary.display()))?;
            let ack = realm.ack_file(number);
            workers.0.push(Worker { number, child, log, ack, status: None });
        }
        Ok(workers)
    }

    /// Pauses every worker between two operations: creates the pause file and waits for each
    /// worker's acknowledgement.
    fn pause(&mut self, pause_file: &Path) -> Result<()> {
        File::create(pause_file)
            .with_context(|| format!("cannot create {}", pause_file.display()))?;
        self.wait_for_acks(true, "pause")
    }

    /// Lets the workers go on, and waits until every one has noticed.
    fn resume(&mut self, pause_file: &Path) -> Result<()> {
        std::fs::remove_file(pause_file)
            .with_context(|| format!("cannot remove {}", pause_file.display()))?;
        self.wait_for_acks(false, "resume")
    }

    fn wait_for_acks(&mut self, present: bool, what: &str) -> Result<()> {
        let limit = Instant::now() + PAUSE_LIMIT;
        loop {
            if interrupted() {
                bail!("interrupted");
            }
            self.check_none_failed()?;
            let waiting: Vec<String> = self
                .0
                .iter()
                .filter(|worker| worker.ack.exists() != present)
                .map(|worker| worker.number.to_string())
                .collect();
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() >= limit {
                bail!(
                    "worker(s) {} did not {what} within {} s",
                    waiting.join(", "),
                    PAUSE_LIMIT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Fails if a worker has already ended badly (a worker never ends early on its own).
    fn check_none_failed(&mut self) -> Result<()> {
        for worker in &mut self.0 {
            if worker.status.is_none() {
                worker.status = worker.child.try_wait().context("waiting for a worker")?;
            }
            if let Some(status) = worker.status.filter(|status| !status.success()) {
                crate::pg::print_file_tail(&worker.log, 20);
                bail!("worker {} crashed ({status})", worker.number);
            }
        }
        Ok(())
    }

    /// Waits for every worker to stop, killing those still running at `limit`, and returns
    /// their summaries.
    fn wait_all(&mut self, limit: Instant) -> Result<Vec<Summary>> {
        loop {
            if interrupted() {
                bail!("interrupted");
            }
            self.check_none_failed()?;
            if self.0.iter().all(|worker| worker.status.is_some()) {
                break;
            }
            if Instant::now() >= limit {
                let late: Vec<String> = self
                    .0
                    .iter()
                    .filter(|worker| worker.status.is_none())
                    .map(|worker| worker.number.to_string())
                    .collect();
                for worker in self.0.iter_mut().filter(|worker| worker.status.is_none()) {
                    crate::pg::print_file_tail(&worker.log, 20);
                    let _ = worker.child.kill();
                }
                bail!(
                    "worker(s) {} still ran {} s after their time; killed",
                    late.join(", "),
                    OVERRUN_LIMIT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut summaries = Vec::new();
        for worker in &mut self.0 {
            let mut stdout = String::new();
            if let Some(mut pipe) = worker.child.stdout.take() {
                pipe.read_to_string(&mut stdout).context("reading a worker's output")?;
            }
            let summary = stdout.lines().last().and_then(Summary::parse);
            let Some(summary) = summary else {
                crate::pg::print_file_tail(&worker.log, 20);
                bail!("worker {} printed no summary line (stdout: {stdout:?})", worker.number);
            };
            eprintln!("xtask: worker {}: {}", worker.number, stdout.trim());
            summaries.push(summary);
        }
        Ok(summaries)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for worker in &mut self.0 {
            if worker.status.is_none() {
                let _ = worker.child.kill();
                let _ = worker.child.wait();
            }
            let _ = std::fs::remove_file(&worker.log);
        }
    }
}

/// A worker's summary line, `{"lookups":L,"invalidations":I,"edits":E,"errors":X}`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Summary {
    lookups: u64,
    invalidations: u64,
    edits: u64,
    errors: u64,
    resyncs: u64,
    discarded_by_resync: u64,
    catch_ups: u64,
    replayed: u64,
}

impl Summary {
    fn parse(line: &str) -> Option<Summary> {
        let value: Value = serde_json::from_str(line).ok()?;
        let count = |key: &str| value.get(key).and_then(Value::as_u64);
        Some(Summary {
            lookups: count("lookups")?,
            invalidations: count("invalidations")?,
            edits: count("edits")?,
            errors: count("errors")?,
            resyncs: count("resyncs")?,
            discarded_by_resync: count("discarded_by_resync")?,
            catch_ups: count("catch_ups")?,
            replayed: count("replayed")?,
        })
    }

    fn sum(summaries: &[Summary]) -> Summary {
        summaries.iter().fold(Summary::default(), |total, s| Summary {
            lookups: total.lookups + s.lookups,
            invalidations: total.invalidations + s.invalidations,
            edits: total.edits + s.edits,
            errors: total.errors + s.errors,
            resyncs: total.resyncs + s.resyncs,
            discarded_by_resync: total.discarded_by_resync + s.discarded_by_resync,
            catch_ups: total.catch_ups + s.catch_ups,
            replayed: total.replayed + s.replayed,
        })
    }
}

/// The faults, injected in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum FaultKind {
    /// `pg_terminate_backend` of every listener connection of the run's database.
    Listeners,
    /// `pg_terminate_backend` of every pooled query connection of the run's database.
    Pool,
    /// `pg_ctl restart -m fast`.
    Restart,
}

impl FaultKind {
    /// The turn of faults. An unsafe run has no listeners to terminate, and a server we may
    /// not restart is not restarted.
    fn schedule(unsafe_mode: bool, can_restart: bool) -> Vec<FaultKind> {
        let mut kinds = Vec::new();
        if !unsafe_mode {
            kinds.push(FaultKind::Listeners);
        }
        kinds.push(FaultKind::Pool);
        if can_restart {
            kinds.push(FaultKind::Restart);
        }
        kinds
    }

    fn noun(self) -> &'static str {
        match self {
            FaultKind::Listeners => "terminating the listeners' backends",
            FaultKind::Pool => "terminating the pooled connections",
            FaultKind::Restart => "restarting the server",
        }
    }
}

/// Injects one fault; returns how many things it hit (backends terminated, or 1 restart).
fn inject(
    runtime: &tokio::runtime::Runtime,
    kind: FaultKind,
    db_url: &str,
    restart: Option<&str>,
) -> Result<u64> {
    let application = match kind {
        FaultKind::Listeners => "deflookup-listener",
        FaultKind::Pool => "deflookup",
        FaultKind::Restart => {
            let command = restart.context("no restart command")?;
            let began = Instant::now();
            // Its own process group, as every pg_ctl call of pg.rs: a Ctrl-C must not kill a
            // half-done restart, which would leave the cluster for the guard to find stopped.
            // No pipes: a restarted server inherits the command's stdout and stderr, and a
            // pipe it holds open would never reach end of file. The wait is bounded.
            let mut child = Command::new("sh")
                .args(["-c", command])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .context("cannot run the restart command")?;
            let status = loop {
                if let Some(status) = child.try_wait().context("waiting for the restart")? {
                    break status;
                }
                if began.elapsed() > RESTART_LIMIT {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("the restart command did not finish within {RESTART_LIMIT:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            if !status.success() {
                bail!("the restart command failed ({status}); see the server log");
            }
            eprintln!(
                "xtask: fault: restarted the server in {:.1}s",
                began.elapsed().as_secs_f64()
            );
            return Ok(1);
        }
    };
    let terminated = runtime.block_on(async {
        let client = connect(db_url).await?;
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) \
                 FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = $1 \
                   AND pid <> pg_backend_pid()",
                &[&application],
            )
            .await
            .context("pg_terminate_backend")?;
        anyhow::Ok(row.get::<_, i64>(0))
    })?;
    if terminated > 0 {
        eprintln!("xtask: fault: terminated {terminated} backends named {application:?}");
    }
    Ok(u64::try_from(terminated).unwrap_or(0))
}

/// The faults injected so far.
#[derive(Debug, Default)]
struct FaultLog {
    /// Faults tried, counted or not (picks the next kind).
    attempted: usize,
    /// Faults that hit something: the F of the last line.
    counted: u64,
    /// Per kind: (faults, backends or restarts hit).
    by_kind: BTreeMap<FaultKind, (u64, u64)>,
}

impl FaultLog {
    fn record(&mut self, kind: FaultKind, hits: u64) {
        self.counted += 1;
        let entry = self.by_kind.entry(kind).or_default();
        entry.0 += 1;
        entry.1 += hits;
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (kind, (faults, hits)) in &self.by_kind {
            parts.push(match kind {
                FaultKind::Listeners => format!("{faults} listener kills ({hits} backends)"),
                FaultKind::Pool => format!("{faults} pool kills ({hits} backends)"),
                FaultKind::Restart => format!("{faults} server restarts"),
            });
        }
        if parts.is_empty() {
            return "0".to_owned();
        }
        format!("{} ({})", self.counted, parts.join(", "))
    }
}

/// One row of `modules`, as the audit needs it.
#[derive(Debug)]
struct Row {
    url: String,
    scope: String,
    user: String,
    created_at: i64,
    definitions: Value,
}

async fn read_rows(db_url: &str) -> Result<Vec<Row>> {
    let client = connect(db_url).await?;
    let rows = client
        .query(
            "SELECT url, cache_scope, auth_user_id, coalesce(created_at, 0), \
                    coalesce(definitions, '{}'::jsonb) \
             FROM modules ORDER BY url",
            &[],
        )
        .await
        .context("cannot read the modules table")?;
    Ok(rows
        .iter()
        .map(|row| Row {
            url: row.get(0),
            scope: row.get(1),
            user: row.get(2),
            created_at: row.get(3),
            definitions: row.get(4),
        })
        .collect())
}

/// What an audit says of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Its recorded version is its file's current one.
    Fresh,
    /// Rendered from an older version of its file than the one on disk.
    Stale { recorded: u64, current: u64 },
    /// No recorded version (an error row) or none in the file: not stale.
    Unversioned,
    /// Newer than its file: impossible while versions only grow.
    Newer { recorded: u64, current: u64 },
    /// No module file for its URL.
    Orphan,
}

/// Judges one row against the realm directory as it is now.
fn verdict(row: &Row, realm_dir: &Path) -> Result<Verdict> {
    let Some(recorded) = recorded_version(&row.definitions) else {
        return Ok(Verdict::Unversioned);
    };
    let Some(path) = module_path(&row.url, realm_dir) else { return Ok(Verdict::Orphan) };
    let source = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(match source_version(&source) {
        None => Verdict::Unversioned,
        Some(current) if recorded < current => Verdict::Stale { recorded, current },
        Some(current) if recorded > current => Verdict::Newer { recorded, current },
        Some(_) => Verdict::Fresh,
    })
}

/// A row as written once: a rewrite of the same key is a new row.
type RowId = (String, String, String, i64, Option<u64>);

/// The audits so far.
#[derive(Debug, Default)]
struct Auditor {
    audits: u64,
    /// Every distinct row seen.
    seen: BTreeSet<RowId>,
    /// The stale ones, with their verdict.
    stale: BTreeMap<RowId, Verdict>,
    /// Rows newer than their file, or without one: they mean the harness is wrong.
    anomalies: BTreeMap<RowId, Verdict>,
    unversioned: BTreeSet<RowId>,
}

impl Auditor {
    /// Audits `rows` against the files as they are now.
    fn add(&mut self, rows: &[Row], realm_dir: &Path) -> Result<()> {
        self.audits += 1;
        for row in rows {
            let id = (
                row.url.clone(),
                row.scope.clone(),
                row.user.clone(),
                row.created_at,
                recorded_version(&row.definitions),
            );
            let verdict = verdict(row, realm_dir)?;
            match verdict {
                Verdict::Fresh => {}
                Verdict::Stale { .. } => {
                    self.stale.insert(id.clone(), verdict);
                }
                Verdict::Unversioned => {
                    self.unversioned.insert(id.clone());
                }
                Verdict::Newer { .. } | Verdict::Orphan => {
                    self.anomalies.insert(id.clone(), verdict);
                }
            }
            self.seen.insert(id);
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("audits: {}, stale rows: {} of {}", self.audits, self.stale.len(), self.seen.len())
    }

    fn report(&self) {
        eprintln!("xtask: {}", self.describe());
        for ((url, ..), verdict) in self.stale.iter().take(SHOWN_STALE) {
            if let Verdict::Stale { recorded, current } = verdict {
                eprintln!(
                    "xtask: stale row: {url} recorded version {recorded}, its file had {current}"
                );
            }
        }
        if self.stale.len() > SHOWN_STALE {
            eprintln!("xtask: … and {} more stale rows", self.stale.len() - SHOWN_STALE);
        }
        for ((url, ..), verdict) in &self.anomalies {
            eprintln!("xtask: warning: the audit cannot be trusted: {url}: {verdict:?}");
        }
        if !self.unversioned.is_empty() {
            eprintln!("xtask: {} rows recorded no version (not stale)", self.unversioned.len());
        }
    }
}

/// The version a row was rendered from: the `version` of its definitions (the lowest, should
/// they disagree), or `None` when no definition carries one (an error row, say).
fn recorded_version(definitions: &Value) -> Option<u64> {
    definitions.as_object()?.values().filter_map(|d| d.get("version")?.as_u64()).min()
}

/// The `N` of the first line that is exactly `// version: N`. Must read what the CLI's file
/// prerenderer reads (`source_version` in `crates/lookup-cli/src/files.rs`).
fn source_version(source: &str) -> Option<u64> {
    source.lines().find_map(|line| {
        let comment = line.trim().strip_prefix("//")?;
        let number = comment.trim_start().strip_prefix("version:")?;
        number.trim().parse().ok()
    })
}

/// The file of a row's URL: the URL's path under the realm, or that path plus `.gts` when the
/// row is for an extensionless URL. `None` for URLs outside the realm or without a file.
fn module_path(url: &str, realm_dir: &Path) -> Option<PathBuf> {
    let relative = url.strip_prefix(REALM_URL)?;
    if relative.is_empty() || relative.contains(['/', '\\']) || relative.starts_with('.') {
        return None;
    }
    [realm_dir.join(relative), realm_dir.join(format!("{relative}.gts"))]
        .into_iter()
        .find(|path| path.is_file())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_rows_version_is_its_definitions_version() {
        let definitions = json!({
            "http://soak.test/realm/m1/M1": {"type": "definition", "name": "M1", "version": 17},
            "http://soak.test/realm/m1/Other": {"type": "definition", "version": 12},
            "http://soak.test/realm/m1/Plain": {"type": "definition"},
        });
        assert_eq!(recorded_version(&definitions), Some(12), "the lowest when they disagree");
        assert_eq!(recorded_version(&json!({})), None, "no definitions: an error row");
        let unversioned = json!({"k": {"type": "definition", "version": "3"}});
        assert_eq!(recorded_version(&unversioned), None, "only numbers count");
        assert_eq!(recorded_version(&json!({"k": {"type": "error", "error": {}}})), None);
        assert_eq!(recorded_version(&Value::Null), None);
    }

    #[test]
    fn a_files_version_is_its_first_well_formed_version_comment() {
        assert_eq!(source_version("// version: 1\nexport class M0 {}\n"), Some(1));
        assert_eq!(
            source_version("import x from './a';\n  //version:  1754000000123456 \n"),
            Some(1_754_000_000_123_456)
        );
        assert_eq!(source_version("// version: ?\n// version: 9\n// version: 10\n"), Some(9));
        assert_eq!(source_version("/* version: 3 */\nlet a; // version: 3\n"), None);
        assert_eq!(source_version("// version: 3 beta\n// version: -4\n"), None);
    }

    #[test]
    fn stale_means_older_than_the_file_and_rows_count_once() {
        let temp = tempfile::tempdir().expect("dir");
        let dir = temp.path();
        for i in 0..3 {
            let source = format!("// version: 5\nexport class M{i} {{}}\n");
            std::fs::write(dir.join(format!("m{i}.gts")), source).expect("write");
        }
        let row = |url: &str, created_at: i64, version: Option<u64>| Row {
            url: format!("{REALM_URL}{url}"),
            scope: "public".to_owned(),
            user: String::new(),
            created_at,
            definitions: match version {
                Some(v) => json!({ "k": {"type": "definition", "version": v} }),
                None => json!({}),
            },
        };
        let first = [
            row("m0.gts", 1, Some(4)),
            row("m1", 1, Some(5)),
            row("m2.gts", 1, None),
            row("m2.gts", 2, Some(6)),
            row("m9.gts", 1, Some(1)),
        ];
        let mut auditor = Auditor::default();
        auditor.add(&first, dir).expect("audit");
        assert_eq!(verdict(&first[0], dir).unwrap(), Verdict::Stale { recorded: 4, current: 5 });
        assert_eq!(verdict(&first[1], dir).unwrap(), Verdict::Fresh);
        assert_eq!(verdict(&first[2], dir).unwrap(), Verdict::Unversioned);
        assert_eq!(verdict(&first[3], dir).unwrap(), Verdict::Newer { recorded: 6, current: 5 });
        assert_eq!(verdict(&first[4], dir).unwrap(), Verdict::Orphan);
        assert_eq!((auditor.stale.len(), auditor.seen.len()), (1, 5));

        // A later audit: the same stale row again counts once; its rewrite is a new row.
        auditor.add(&[row("m0.gts", 1, Some(4)), row("m0.gts", 3, Some(5))], dir).unwrap();
        assert_eq!((auditor.audits, auditor.stale.len(), auditor.seen.len()), (2, 1, 6));
        assert_eq!(auditor.anomalies.len(), 2);
        assert_eq!(auditor.unversioned.len(), 1);
    }

    #[test]
    fn the_graph_has_leaves_chains_and_fan_in() {
        let sources = module_sources(MODULES);
        assert_eq!(sources.len(), 40);
        let imports = |source: &str| source.matches("import ").count();
        assert!(sources[..4].iter().all(|(_, source)| imports(source) == 0));
        assert!(sources[4..].iter().all(|(_, source)| (1..=3).contains(&imports(source))));
        assert!(sources[5].1.contains("from './m4.gts'"), "odd modules continue a chain");
        let consumers_of_m0 = sources.iter().filter(|(_, s)| s.contains("'./m0.gts'")).count();
        assert!(consumers_of_m0 >= 4, "m0 has many consumers: {consumers_of_m0}");
        for (i, (name, source)) in sources.iter().enumerate() {
            assert_eq!(name, &format!("m{i}.gts"));
            assert_eq!(source_version(source), Some(1));
            assert!(source.contains(&format!("export class M{i} ")), "{source}");
        }
        assert_eq!(sources, module_sources(MODULES), "deterministic");
    }

    #[test]
    fn options_and_urls() {
        let args = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_options(&[]).unwrap(), Some(Options::default()));
        assert_eq!(
            parse_options(&args(&["--seconds", "20", "--processes=2", "--unsafe"])).unwrap(),
            Some(Options { seconds: 20, processes: 2, unsafe_mode: true, ..Options::default() })
        );
        assert_eq!(
            parse_options(&args(&["--poll-ms=100"])).unwrap(),
            Some(Options { poll_ms: Some(100), ..Options::default() })
        );
        assert!(parse_options(&args(&["--poll-ms", "0"])).is_err());
        assert!(parse_options(&args(&["--poll-ms", "5", "--untracked-writers"])).is_err());
        assert_eq!(parse_options(&args(&["--help"])).unwrap(), None);
        assert!(parse_options(&args(&["--seconds"])).is_err());
        assert!(parse_options(&args(&["--seconds", "x"])).is_err());
        assert!(parse_options(&args(&["--processes", "0"])).is_err());
        assert!(parse_options(&args(&["--bogus"])).is_err());

        let with_database = |url: &str| with_database(url, "soak").unwrap();
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres"),
            "postgres://postgres@127.0.0.1:5432/soak"
        );
        assert_eq!(
            with_database("postgresql://u:p@h/db?sslmode=disable"),
            "postgresql://u:p@h/soak?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:5432"), "postgres://h:5432/soak");
        assert_eq!(with_database("postgres://u@h:5432/"), "postgres://u@h:5432/soak");
        assert!(super::with_database("host=h dbname=db", "soak").is_err(), "URLs only");
        assert_eq!(
            Summary::parse(
                r#"{"lookups":5,"invalidations":2,"edits":1,"errors":0,"resyncs":1,"discarded_by_resync":3,"catch_ups":4,"replayed":6}"#
            ),
            Some(Summary {
                lookups: 5,
                invalidations: 2,
                edits: 1,
                errors: 0,
                resyncs: 1,
                discarded_by_resync: 3,
                catch_ups: 4,
                replayed: 6
            })
        );
        assert_eq!(Summary::parse(r#"{"lookups":5}"#), None);
    }
}
