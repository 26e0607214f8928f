//! The worker processes (`deflookup … soak-worker`) and their summary lines.

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::MODULES;
use super::options::Options;
use super::realm::{REALM_URL, RealmDir};
use crate::interrupted;

/// Concurrent tasks per worker (`soak-worker --tasks`).
const WORKER_TASKS: u64 = 4;
/// The most a worker's render waits after reading its file (`soak-worker --jitter-ms`).
const WORKER_JITTER_MS: u64 = 40;
/// How long the workers may take to pause, or to resume.
const PAUSE_LIMIT: Duration = Duration::from_secs(40);
/// How long past its N seconds a worker may take to stop before it is killed.
pub(super) const OVERRUN_LIMIT: Duration = Duration::from_secs(30);

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
pub(super) struct Workers(Vec<Worker>);

impl Workers {
    pub(super) fn start(
        binary: &Path,
        options: &Options,
        db_url: &str,
        realm: &RealmDir,
    ) -> Result<Self> {
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
    pub(super) fn pause(&mut self, pause_file: &Path) -> Result<()> {
        File::create(pause_file)
            .with_context(|| format!("cannot create {}", pause_file.display()))?;
        self.wait_for_acks(true, "pause")
    }

    /// Lets the workers go on, and waits until every one has noticed.
    pub(super) fn resume(&mut self, pause_file: &Path) -> Result<()> {
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
    pub(super) fn check_none_failed(&mut self) -> Result<()> {
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
    pub(super) fn wait_all(&mut self, limit: Instant) -> Result<Vec<Summary>> {
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
pub(super) struct Summary {
    pub(super) lookups: u64,
    pub(super) invalidations: u64,
    pub(super) edits: u64,
    pub(super) errors: u64,
    pub(super) resyncs: u64,
    pub(super) discarded_by_resync: u64,
    pub(super) catch_ups: u64,
    pub(super) replayed: u64,
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

    pub(super) fn sum(summaries: &[Summary]) -> Summary {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_line_needs_every_count() {
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
