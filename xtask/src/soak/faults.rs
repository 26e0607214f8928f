//! The faults injected while the workers run.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::database::connect;

/// How long a server restart may take before the soak fails.
const RESTART_LIMIT: Duration = Duration::from_secs(120);

/// The faults, injected in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum FaultKind {
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
    pub(super) fn schedule(unsafe_mode: bool, can_restart: bool) -> Vec<FaultKind> {
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

    pub(super) fn noun(self) -> &'static str {
        match self {
            FaultKind::Listeners => "terminating the listeners' backends",
            FaultKind::Pool => "terminating the pooled connections",
            FaultKind::Restart => "restarting the server",
        }
    }
}

/// Injects one fault; returns how many things it hit (backends terminated, or 1 restart).
pub(super) fn inject(
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
pub(super) struct FaultLog {
    /// Faults tried, counted or not (picks the next kind).
    pub(super) attempted: usize,
    /// Faults that hit something: the F of the last line.
    pub(super) counted: u64,
    /// Per kind: (faults, backends or restarts hit).
    by_kind: BTreeMap<FaultKind, (u64, u64)>,
}

impl FaultLog {
    pub(super) fn record(&mut self, kind: FaultKind, hits: u64) {
        self.counted += 1;
        let entry = self.by_kind.entry(kind).or_default();
        entry.0 += 1;
        entry.1 += hits;
    }

    pub(super) fn describe(&self) -> String {
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
