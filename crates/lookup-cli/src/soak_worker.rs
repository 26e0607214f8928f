//! `deflookup soak-worker`: one process' worth of random work for `cargo xtask soak`.
//!
//! The realm (the first `--realm`) holds the modules `m0.gts` … `m{M-1}.gts`, module `mI`
//! exporting the class `MI` and carrying a `// version: N` line (the protocol shared with the
//! orchestrator: `soak_protocol.rs`). Several tasks share one lookup (so one process'
//! generations, coalescing and listener) and, until the time is up, each repeatedly picks a
//! random module and:
//!
//! - about 75%: looks its export up (by `mI` or `mI.gts`, at random);
//! - about 15%: **edits** it — writes a strictly higher version atomically (temporary file
//!   and rename) — and then invalidates it;
//! - about 10%: invalidates it.
//!
//! The prerenderer waits a random time after reading each file (`--jitter-ms`), so renders
//! overlap edits and invalidations of this and the other workers.
//!
//! Faults are the point: the orchestrator terminates backends and restarts the server while
//! the workers run. Every failed operation is counted and the loop goes on; a worker never
//! exits because of one. The one exception to "try once" is the invalidation that follows an
//! edit: it is retried until it succeeds (for at most [`FLUSH_GRACE`] past the end), because
//! an edit whose invalidation never happened leaves a stale row that is the harness's fault,
//! not the cache's, and would poison the audit.
//!
//! At the end it prints one JSON line on stdout:
//! `{"lookups":L,"invalidations":I,"edits":E,"errors":X,"resyncs":R,"discarded_by_resync":D,
//! "catch_ups":C,"replayed":N}` (successful lookups, successful invalidations, edits written,
//! failed operations or attempts; the listener's resyncs and the loads in flight they
//! discarded, its catch-ups and the invalidations they replayed).

use crate::out::outln;
use std::fmt::Write as _;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use adapter_pg::PgAdapter;
use adapter_pg::PgPopulateCoordinator;
use anyhow::{Context as _, Result, bail};
use invalidation_listener::PgInvalidationListener;
use lookup_core::InvalidationSink;
use lookup_core::{CachingLookup, CodeRef, NoRemoteRealms};

use crate::files::FilePrerenderer;
use crate::soak_protocol::{class_name, module_file, module_name, source_version, with_version};

/// How long one lookup or invalidation may take before it counts as failed. Bounded so that a
/// worker ends close to its deadline even when the server hangs.
const OP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long past the deadline an edit's invalidation is still retried. Shorter than the 30 s
/// the orchestrator allows before it kills an overrunning worker.
const FLUSH_GRACE: Duration = Duration::from_secs(20);
/// The pause between two attempts of an edit's invalidation.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How many distinct error messages are kept to be shown at the end.
const ERROR_SAMPLES: usize = 5;
/// A lock file older than this is taken to be left behind by a killed worker.
const ABANDONED_LOCK: Duration = Duration::from_secs(10);

/// The options of `soak-worker`.
#[derive(Debug, clap::Args)]
pub(crate) struct SoakArgs {
    /// How long to work, in seconds.
    #[arg(long, value_name = "N")]
    seconds: u64,
    /// Seed of the random choices; give every worker its own.
    #[arg(long, value_name = "S", default_value_t = 1)]
    seed: u64,
    /// How many modules the realm holds (`m0.gts` … `m{M-1}.gts`).
    #[arg(long, value_name = "M")]
    modules: u64,
    /// Concurrent tasks in this process.
    #[arg(long, value_name = "T", default_value_t = 4)]
    tasks: u64,
    /// Each render waits a random 0..=N milliseconds after reading its file.
    #[arg(long, value_name = "N", default_value_t = 40)]
    pub(crate) jitter_ms: u64,
    /// While this file exists, every task stops between two operations (a checkpoint of the
    /// orchestrator); once all are idle the worker creates `--ack-file`, and removes it when
    /// the pause file is gone and work resumes.
    #[arg(long, value_name = "PATH", requires = "ack_file")]
    pause_file: Option<PathBuf>,
    /// See `--pause-file`.
    #[arg(long, value_name = "PATH", requires = "pause_file")]
    ack_file: Option<PathBuf>,
}

type SoakLookup = CachingLookup<PgAdapter, FilePrerenderer, NoRemoteRealms, PgPopulateCoordinator>;

/// The worker's lookup as the listener's sink, counting the loads in flight that each resync
/// discards (what catching up instead of resyncing saves).
pub(crate) struct ResyncCount {
    lookup: SoakLookup,
    discarded: AtomicU64,
}

impl ResyncCount {
    pub(crate) fn new(lookup: SoakLookup) -> Self {
        ResyncCount { lookup, discarded: AtomicU64::new(0) }
    }
}

impl InvalidationSink for ResyncCount {
    fn bump_modules(&self, realm_url: &str, urls: &[String]) {
        self.lookup.bump_modules(realm_url, urls);
    }
    fn bump_realm(&self, realm_url: &str) {
        self.lookup.bump_realm(realm_url);
    }
    fn bump_global(&self) {
        self.lookup.bump_global();
    }
    fn resync(&self) {
        let in_flight = self.lookup.in_flight_count() as u64;
        self.discarded.fetch_add(in_flight, Ordering::Relaxed);
        self.lookup.resync();
    }
    fn connection_lost(&self) {
        self.lookup.connection_lost();
    }
    fn connection_restored(&self) {
        self.lookup.connection_restored();
    }
}

/// What the tasks did, shared by all of them.
#[derive(Debug, Default)]
struct Counters {
    lookups: AtomicU64,
    invalidations: AtomicU64,
    edits: AtomicU64,
    errors: AtomicU64,
    /// Edits whose invalidation never succeeded (reported on stderr; should stay 0).
    unflushed: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Counters {
    fn error(&self, what: &str, error: impl std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let message = format!("{what}: {error}");
        tracing::debug!(%message, "soak operation failed");
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() < ERROR_SAMPLES && !samples.contains(&message) {
            samples.push(message);
        }
    }

    fn summary_json(
        &self,
        listener: Option<&PgInvalidationListener>,
        resyncs: &ResyncCount,
    ) -> String {
        let stats = listener.map(PgInvalidationListener::stats).unwrap_or_default();
        serde_json::json!({
            "lookups": self.lookups.load(Ordering::Relaxed),
            "invalidations": self.invalidations.load(Ordering::Relaxed),
            "edits": self.edits.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
            "resyncs": stats.resyncs,
            "discarded_by_resync": resyncs.discarded.load(Ordering::Relaxed),
            "catch_ups": stats.catch_ups,
            "replayed": stats.replayed_invalidations,
        })
        .to_string()
    }
}

/// Runs the worker until `--seconds` have passed, then prints the summary line.
pub(crate) async fn run(
    lookup: &SoakLookup,
    realms: &[(String, PathBuf)],
    args: &SoakArgs,
    listener: Option<&PgInvalidationListener>,
    resyncs: &ResyncCount,
) -> Result<()> {
    let Some((realm_url, dir)) = realms.first() else {
        bail!("soak-worker needs a --realm holding m0.gts …")
    };
    if args.modules == 0 || args.tasks == 0 {
        bail!("soak-worker needs at least one module and one task");
    }
    for index in 0..args.modules {
        let path = dir.join(module_file(index));
        if !path.is_file() {
            bail!(
                "{} is missing: the realm must hold {} … {}",
                path.display(),
                module_file(0),
                module_file(args.modules - 1)
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let counters = Arc::new(Counters::default());
    let pause = Arc::new(Pause::default());
    let watcher = match (&args.pause_file, &args.ack_file) {
        (Some(pause_file), Some(ack_file)) => Some(tokio::spawn(Arc::clone(&pause).watch(
            pause_file.clone(),
            ack_file.clone(),
            args.tasks,
        ))),
        (None, None) => None,
        _ => bail!("--pause-file and --ack-file go together"),
    };
    let mut tasks = Vec::new();
    for (task, rng) in (0..args.tasks).zip(task_rngs(args.seed)) {
        let worker = Task {
            lookup: lookup.clone(),
            realm_url: realm_url.clone(),
            dir: dir.clone(),
            modules: args.modules,
            deadline,
            pause: Arc::clone(&pause),
            counters: Arc::clone(&counters),
            rng,
            temp_tag: format!("{}-{task}", std::process::id()),
        };
        tasks.push(tokio::spawn(worker.run()));
    }
    for task in tasks {
        task.await.context("a soak task panicked")?;
    }
    if let Some(watcher) = watcher {
        watcher.abort();
    }

    let samples = counters.samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if !samples.is_empty() {
        let mut text = format!(
            "soak-worker: {} failed operations, for example:",
            counters.errors.load(Ordering::Relaxed)
        );
        for sample in samples {
            let _ = write!(text, "\n  {sample}");
        }
        eprintln!("{text}");
    }
    let unflushed = counters.unflushed.load(Ordering::Relaxed);
    if unflushed > 0 {
        eprintln!(
            "soak-worker: warning: {unflushed} edits were never invalidated; their rows may be \
             stale through no fault of the cache"
        );
    }
    outln!("{}", counters.summary_json(listener, resyncs))?;
    Ok(())
}

/// One of the worker's concurrent loops.
struct Task {
    lookup: SoakLookup,
    realm_url: String,
    dir: PathBuf,
    modules: u64,
    deadline: Instant,
    pause: Arc<Pause>,
    counters: Arc<Counters>,
    rng: fastrand::Rng,
    /// Makes this task's temporary file names unique across processes and tasks.
    temp_tag: String,
}

impl Task {
    async fn run(mut self) {
        while Instant::now() < self.deadline {
            if !self.pause.wait_while_paused(self.deadline).await {
                break;
            }
            let index = self.rng.u64(..self.modules);
            match self.rng.u8(..100) {
                0..75 => self.lookup_one(index).await,
                75..90 => self.edit_one(index).await,
                _ => {
                    let _ = self.invalidate_once(index).await;
                }
            }
        }
    }

    async fn lookup_one(&mut self, index: u64) {
        // Both spellings: the extensionless one goes through the population candidates and
        // the alias match, the other straight to the file.
        let module = if self.rng.bool() {
            format!("{}{}", self.realm_url, module_name(index))
        } else {
            format!("{}{}", self.realm_url, module_file(index))
        };
        let code_ref = CodeRef::new(module, class_name(index));
        match tokio::time::timeout(OP_TIMEOUT, self.lookup.lookup_definition(&code_ref, None)).await
        {
            Ok(Ok(_)) => {
                self.counters.lookups.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(error)) => self.counters.error("lookup", error),
            Err(_) => self.counters.error("lookup", "timed out"),
        }
    }

    /// One attempt; true when it succeeded.
    async fn invalidate_once(&self, index: u64) -> bool {
        let url = format!("{}{}", self.realm_url, module_file(index));
        match tokio::time::timeout(OP_TIMEOUT, self.lookup.invalidate(&url)).await {
            Ok(Ok(_)) => {
                self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(Err(error)) => {
                self.counters.error("invalidate", error);
                false
            }
            Err(_) => {
                self.counters.error("invalidate", "timed out");
                false
            }
        }
    }

    async fn edit_one(&mut self, index: u64) {
        let dir = self.dir.clone();
        let tag = self.temp_tag.clone();
        let written = tokio::task::spawn_blocking(move || edit_module(&dir, index, &tag)).await;
        match written {
            Ok(Ok(_version)) => {
                self.counters.edits.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(error)) => return self.counters.error("edit", error),
            Err(error) => return self.counters.error("edit", error),
        }
        // The file changed: its invalidation must happen, whatever the faults.
        let give_up = self.deadline + FLUSH_GRACE;
        while !self.invalidate_once(index).await {
            if Instant::now() >= give_up {
                self.counters.unflushed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// The checkpoint barrier: the orchestrator pauses every worker to audit a quiet table.
///
/// A task only stops *between* operations, so at a pause every edit has been followed by its
/// successful invalidation and no render of this process is in flight: a row older than its
/// file is then stale for good, not "about to be invalidated".
#[derive(Debug, Default)]
struct Pause {
    paused: AtomicBool,
    /// Tasks waiting in [`Pause::wait_while_paused`].
    idle: AtomicU64,
}

/// How often the pause file is looked for, and a paused task looks for the resume.
const PAUSE_POLL: Duration = Duration::from_millis(5);

impl Pause {
    /// Waits while paused. False when the deadline passed meanwhile (the task should end).
    async fn wait_while_paused(&self, deadline: Instant) -> bool {
        if !self.paused.load(Ordering::SeqCst) {
            return true;
        }
        self.idle.fetch_add(1, Ordering::SeqCst);
        while self.paused.load(Ordering::SeqCst) && Instant::now() < deadline {
            tokio::time::sleep(PAUSE_POLL).await;
        }
        self.idle.fetch_sub(1, Ordering::SeqCst);
        Instant::now() < deadline
    }

    /// Follows the pause file until aborted: pauses the tasks while it exists, and reports
    /// through the ack file once all `tasks` are idle.
    async fn watch(self: Arc<Self>, pause_file: PathBuf, ack_file: PathBuf, tasks: u64) {
        let mut acked = false;
        loop {
            let requested = tokio::fs::try_exists(&pause_file).await.unwrap_or(false);
            self.paused.store(requested, Ordering::SeqCst);
            if requested && !acked && self.idle.load(Ordering::SeqCst) == tasks {
                acked = tokio::fs::write(&ack_file, b"").await.is_ok();
            } else if !requested && acked {
                // Gone already is fine: the orchestrator waits for it to go, whoever removes it.
                let _ = tokio::fs::remove_file(&ack_file).await;
                acked = false;
            }
            tokio::time::sleep(PAUSE_POLL).await;
        }
    }
}

/// Gives module `index` a new version, strictly higher than its current one: the current
/// time in microseconds since the epoch, or one more than the current version if that is not
/// higher. Returns the version written.
///
/// Readers see the old file or the new one, never a mix: the new source is written to a
/// temporary file and renamed over the module. Versions must also grow in the order the
/// renames land, even when two workers edit one module at the same moment (otherwise a row
/// rendered from the later rename could carry a lower version than the file and hide a
/// stale row from the audit), so edits of one module are serialised by a lock file.
fn edit_module(dir: &Path, index: u64, temp_tag: &str) -> std::io::Result<u64> {
    let name = module_file(index);
    let path = dir.join(&name);
    let _lock = LockFile::acquire(dir.join(format!(".{name}.lock")))?;
    let source = std::fs::read_to_string(&path)?;
    let current = source_version(&source).unwrap_or(0);
    let version = now_micros().max(current.saturating_add(1));
    let updated = with_version(&source, version);
    let temporary = dir.join(format!(".{name}.{temp_tag}.tmp"));
    std::fs::write(&temporary, updated)?;
    std::fs::rename(&temporary, &path)?;
    Ok(version)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A cross-process lock: the file exists while someone holds it (`create_new` is atomic).
/// Removed on drop.
#[derive(Debug)]
struct LockFile {
    path: PathBuf,
}

impl LockFile {
    /// Waits for the lock (a blocking call: run it off the async threads).
    fn acquire(path: PathBuf) -> std::io::Result<Self> {
        loop {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(_) => return Ok(LockFile { path }),
                Err(error) if error.kind() == ErrorKind::AlreadyExists => {
                    // A worker killed while holding it would block every later edit.
                    let abandoned = std::fs::metadata(&path)
                        .and_then(|meta| meta.modified())
                        .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > ABANDONED_LOCK));
                    if abandoned {
                        let _ = std::fs::remove_file(&path);
                    } else {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The generators of a worker's tasks, in task order: forks of one generator seeded with
/// `seed`, so each task draws its own sequence and a seed reproduces them all.
fn task_rngs(seed: u64) -> impl Iterator<Item = fastrand::Rng> {
    let mut worker = fastrand::Rng::with_seed(seed);
    std::iter::repeat_with(move || worker.fork())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_raise_the_version_strictly() {
        let dir = tempfile::tempdir().expect("temp dir");
        let far_future = u64::MAX - 5;
        std::fs::write(dir.path().join("m3.gts"), format!("// version: {far_future}\n"))
            .expect("write");
        let first = edit_module(dir.path(), 3, "t").expect("edit");
        assert_eq!(first, far_future + 1, "one more when the clock is behind the file");
        std::fs::write(dir.path().join("m3.gts"), "// version: 1\nexport class M3 {}\n")
            .expect("write");
        let second = edit_module(dir.path(), 3, "t").expect("edit");
        assert!(second > 1_600_000_000_000_000, "microseconds since the epoch: {second}");
        let source = std::fs::read_to_string(dir.path().join("m3.gts")).expect("read");
        assert_eq!(source_version(&source), Some(second));
        assert!(source.contains("export class M3 {}"));
        // Nothing is left behind: no lock, no temporary file.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["m3.gts"]);
    }

    #[test]
    fn streams_differ_and_stay_in_range() {
        let draws = |mut rng: fastrand::Rng| (0..32).map(|_| rng.u64(..100)).collect::<Vec<_>>();
        let mut rngs = task_rngs(7);
        let (xs, ys) = (draws(rngs.next().unwrap()), draws(rngs.next().unwrap()));
        assert_ne!(xs, ys);
        assert!(xs.iter().chain(&ys).all(|x| *x < 100));
        assert_ne!(xs, draws(task_rngs(8).next().unwrap()), "seeds differ");
        assert_eq!(xs, draws(task_rngs(7).next().unwrap()), "reproducible");
    }
}
