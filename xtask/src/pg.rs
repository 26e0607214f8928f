//! A throwaway Postgres cluster for the tests: [`EphemeralPg`].
//!
//! The cluster lives in one fresh temporary directory (data directory, socket directory and
//! server log), listens on a free loopback port, trusts every local connection, and trades
//! durability for speed (`fsync=off` and friends), except the bench's ([`Server::durable`]:
//! `initdb`'s defaults, so a commit that wrote WAL waits for its flush, as in production).
//! Dropping the guard stops the server and
//! removes the directory, whatever happened in between: tests that fail, a panic, or Ctrl-C
//! (see [`crate::catch_interrupts`]).
//!
//! Every `initdb`/`pg_ctl` call runs in its own process group, so a Ctrl-C on the terminal,
//! which goes to xtask's foreground group, cannot kill a half-done start or the final stop:
//! only the cargo and test processes die, and xtask, which survives, cleans up.

use std::fmt::Write as _;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tempfile::TempDir;

use crate::{catch_interrupts, interrupted};

/// How long `pg_ctl` may wait for the server to start, restart or stop, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// How long the server may take to accept TCP connections once `pg_ctl` says it is up.
const TCP_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Ports tried before giving up: a port found free can be taken by another process before
/// the server binds it.
const PORT_ATTEMPTS: usize = 3;
/// Lines of the server log printed when something fails.
const LOG_TAIL_LINES: usize = 40;
/// The Postgres settings of every cluster, besides port and socket directory.
/// `max_connections` is high because test binaries run many tests at once, each with a pool
/// and a listener (and the bench's scale curves open about 110 connections at most).
const SERVER_SETTINGS: &str = "-c listen_addresses=127.0.0.1 -c max_connections=300";
/// What a test cluster adds: durability traded for speed. Not the bench's: it measures what
/// a commit costs.
const FAST_SETTINGS: &str = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off";

/// A running throwaway Postgres cluster, stopped and deleted on drop.
#[derive(Debug)]
pub(crate) struct EphemeralPg {
    /// The temporary directory holding everything; removed on drop (after `Drop::drop`
    /// stopped the server).
    dir: TempDir,
    /// The directory of `initdb` and `pg_ctl`.
    bin: PathBuf,
    /// Whether the tools run as the `postgres` user (xtask runs as root, which initdb refuses).
    as_postgres: bool,
    port: u16,
    /// Whether `pg_ctl start` has been called, so drop must stop the server.
    launched: bool,
    /// The server certificate and key of a TLS-only cluster.
    tls: Option<(PathBuf, PathBuf)>,
    /// Whether the cluster keeps `initdb`'s durability settings (no [`FAST_SETTINGS`]).
    durable: bool,
}

impl EphemeralPg {
    /// Creates, starts and waits for a new cluster.
    pub(crate) fn start() -> Result<Self> {
        Self::start_with(None, false)
    }

    /// Creates, starts and waits for a new cluster with `initdb`'s durability settings
    /// (`fsync`, `synchronous_commit` and `full_page_writes` on): the bench's.
    pub(crate) fn start_durable() -> Result<Self> {
        Self::start_with(None, true)
    }

    /// Creates and starts a cluster that accepts only TLS connections over TCP (`hostssl`),
    /// with `files`' server certificate.
    pub(crate) fn start_tls(files: &crate::services::TlsFiles) -> Result<Self> {
        Self::start_with(Some((files.server_cert.clone(), files.server_key.clone())), false)
    }

    fn start_with(tls: Option<(PathBuf, PathBuf)>, durable: bool) -> Result<Self> {
        // Before the first child: from now on Ctrl-C only sets a flag, and the guard cleans up.
        catch_interrupts()?;
        let began = Instant::now();
        let bin = find_bin_dir()?;
        let as_postgres = running_as_root()?;
        let dir = temp_dir("deflookup-pg")?;
        // From here on the guard exists, so every early return below removes the directory.
        let mut pg = EphemeralPg { dir, bin, as_postgres, port: 0, launched: false, tls, durable };
        let result = pg.init_and_launch(began);
        if let Err(error) = result {
            if !interrupted() {
                pg.print_log_tail();
            }
            return Err(error);
        }
        Ok(pg)
    }

    /// The TCP port on 127.0.0.1.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server runs as the `postgres` user (xtask runs as root).
    pub(crate) fn as_postgres(&self) -> bool {
        self.as_postgres
    }

    /// `postgres://` URL of the cluster's `postgres` database as the `postgres` superuser.
    pub(crate) fn database_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A shell command (for `sh -c`) that restarts this server with the same options, for
    /// the tests that check recovery from a server restart.
    pub(crate) fn restart_command(&self) -> String {
        let mut words = Vec::new();
        if self.as_postgres {
            words.extend(["runuser", "-u", "postgres", "--"].map(String::from));
        }
        words.push(path_str(&self.bin.join("pg_ctl")));
        words.extend(["restart", "-m", "fast", "-w", "-t", PG_CTL_TIMEOUT_SECS].map(String::from));
        words.extend(["-D".into(), path_str(&self.data_dir())]);
        // The log file matters beyond logging: without `-l` the restarted server would inherit
        // the test's stdout and keep xtask's output pipe open after the tests end.
        words.extend(["-l".into(), path_str(&self.log_file())]);
        words.extend(["-o".into(), self.server_options()]);
        words.iter().map(|word| shell_quote(word)).collect::<Vec<_>>().join(" ")
    }

    /// Prints the end of the server log to stderr, to explain a failure.
    pub(crate) fn print_log_tail(&self) {
        print_file_tail(&self.log_file(), LOG_TAIL_LINES);
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The `-o` argument of `pg_ctl`. pg_ctl hands it to `/bin/sh`, hence the quoted path.
    fn server_options(&self) -> String {
        let socket_dir = shell_quote(&path_str(&self.socket_dir()));
        let fast = if self.durable { "" } else { FAST_SETTINGS };
        format!("-p {} -k {socket_dir} {SERVER_SETTINGS} {fast}", self.port).trim_end().to_owned()
    }

    fn init_and_launch(&mut self, began: Instant) -> Result<()> {
        let socket_dir = self.socket_dir();
        // The longest socket path is `.../sock/.s.PGSQL.65535`; Linux allows 107 bytes.
        if socket_dir.as_os_str().len() + 18 > 107 {
            bail!(
                "the socket path under {} would be too long for a Unix socket; \
                 set TMPDIR to a shorter directory such as /tmp",
                self.dir.path().display()
            );
        }
        std::fs::create_dir(&socket_dir)
            .with_context(|| format!("cannot create {}", socket_dir.display()))?;
        if self.as_postgres {
            let mut chown = Command::new("chown");
            chown.arg("-R").arg("postgres:").arg(self.dir.path());
            run_quietly("chown the cluster directory to postgres", &mut chown)?;
        }
        let version = run_quietly("pg_ctl --version", self.tool("pg_ctl").arg("--version"))?;
        let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();

        // The C locale: the environment's locale may be missing on the machine, and tests
        // should sort the same everywhere.
        let mut initdb = self.tool("initdb");
        initdb.arg("-D").arg(self.data_dir());
        initdb.args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"]);
        run_quietly("initdb", &mut initdb)?;
        check_interrupt()?;
        if let Some((cert, key)) = &self.tls {
            self.configure_tls(cert, key)?;
        }

        for attempt in 1..=PORT_ATTEMPTS {
            self.port = free_port()?;
            eprintln!(
                "xtask: starting Postgres ({version}) in {} on port {}",
                self.dir.path().display(),
                self.port
            );
            let mut start = self.tool("pg_ctl");
            start.arg("start").arg("-D").arg(self.data_dir()).arg("-l").arg(self.log_file());
            start.args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-o", &self.server_options()]);
            // Set before the call: should pg_ctl time out, a server may still come up.
            self.launched = true;
            match run_quietly("pg_ctl start", &mut start) {
                Ok(_) => break,
                Err(_) if attempt < PORT_ATTEMPTS && self.port_was_taken() => {
                    eprintln!("xtask: port {} was taken meanwhile; trying another", self.port);
                }
                Err(error) => return Err(error),
            }
        }
        check_interrupt()?;
        self.wait_for_tcp()?;
        eprintln!(
            "xtask: Postgres ready on port {} after {:.1}s",
            self.port,
            began.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// TLS on, with the given certificate, and `pg_hba.conf` accepting TCP only over TLS.
    fn configure_tls(&self, cert: &Path, key: &Path) -> Result<()> {
        let data = self.data_dir();
        for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
            std::fs::copy(from, data.join(to))
                .with_context(|| format!("cannot copy {} into the cluster", from.display()))?;
        }
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(data.join("server.key"), std::fs::Permissions::from_mode(0o600))
            .context("cannot protect the server key")?;
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf"))
            .context("cannot read postgresql.conf")?;
        conf.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(data.join("postgresql.conf"), conf)
            .context("cannot write postgresql.conf")?;
        let hba = "local all all trust\nhostssl all all 127.0.0.1/32 trust\n\
                   hostssl all all ::1/128 trust\n";
        std::fs::write(data.join("pg_hba.conf"), hba).context("cannot write pg_hba.conf")?;
        if self.as_postgres {
            let mut chown = Command::new("chown");
            chown.arg("-R").arg("postgres:").arg(&data);
            run_quietly("chown the TLS files to postgres", &mut chown)?;
        }
        Ok(())
    }

    /// Whether the server log says the port was in use.
    fn port_was_taken(&self) -> bool {
        std::fs::read_to_string(self.log_file()).is_ok_and(|log| {
            log.contains("Address already in use") || log.contains("could not bind")
        })
    }

    /// Waits until the server accepts TCP connections, which is how the tests connect.
    fn wait_for_tcp(&self) -> Result<()> {
        wait_for_tcp("Postgres", self.port, TCP_READY_TIMEOUT)
    }

    /// A Postgres tool, as the `postgres` user when needed, in its own process group.
    fn tool(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        let mut command = if self.as_postgres {
            let mut runuser = Command::new("runuser");
            runuser.args(["-u", "postgres", "--"]).arg(program);
            runuser
        } else {
            Command::new(program)
        };
        // A directory the postgres user can enter, whatever xtask's own directory is.
        command.current_dir(self.dir.path()).process_group(0);
        command
    }

    /// Stops the server if it runs; reports problems but never fails (it runs from `drop`).
    fn stop(&self) {
        let pid_file = self.data_dir().join("postmaster.pid");
        if !pid_file.exists() {
            // Never started, or already stopped (say by a restart test that failed halfway).
            eprintln!("xtask: Postgres on port {} was not running", self.port);
            return;
        }
        let began = Instant::now();
        let mut stop = self.tool("pg_ctl");
        stop.arg("stop").arg("-D").arg(self.data_dir());
        stop.args(["-m", "immediate", "-w", "-t", PG_CTL_TIMEOUT_SECS]);
        match run_quietly("pg_ctl stop", &mut stop) {
            Ok(_) => eprintln!(
                "xtask: stopped Postgres on port {} in {:.1}s",
                self.port,
                began.elapsed().as_secs_f64()
            ),
            Err(error) => {
                eprintln!("xtask: error: {error:#}");
                self.print_log_tail();
                self.kill_postmaster(&pid_file);
            }
        }
    }

    /// Last resort when `pg_ctl stop` failed: SIGKILL the postmaster named in our own pid file.
    fn kill_postmaster(&self, pid_file: &Path) {
        let pid = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok());
        let Some(pid) = pid else {
            eprintln!("xtask: warning: no pid in {}; the server may still run", pid_file.display());
            return;
        };
        let mut kill = Command::new("kill");
        kill.args(["-KILL", &pid.to_string()]).process_group(0);
        match run_quietly("kill the postmaster", &mut kill) {
            Ok(_) => eprintln!("xtask: killed Postgres (pid {pid})"),
            Err(error) => {
                eprintln!("xtask: warning: {error:#}; Postgres (pid {pid}) may still run")
            }
        }
    }
}

impl Drop for EphemeralPg {
    fn drop(&mut self) {
        if self.launched {
            self.stop();
        }
        // Then `dir` goes, and the directory with it.
    }
}

/// Fails with "interrupted" once Ctrl-C was pressed.
fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Waits until `what` accepts TCP connections on loopback `port`, at most `limit`; gives up
/// at once on Ctrl-C.
pub(crate) fn wait_for_tcp(what: &str, port: u16, limit: Duration) -> Result<()> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + limit;
    loop {
        match TcpStream::connect_timeout(&address, Duration::from_secs(1)) {
            Ok(_) => return Ok(()),
            Err(error) if Instant::now() >= deadline => {
                bail!("{what} does not accept connections on {address}: {error}")
            }
            Err(_) => {
                check_interrupt()?;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Runs a short command with its output captured; fails, quoting that output, if it fails.
pub(crate) fn run_quietly(title: &str, command: &mut Command) -> Result<Output> {
    let output = command.output().with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        let mut message = format!("{title} failed ({})", output.status);
        for stream in [&output.stdout, &output.stderr] {
            let text = String::from_utf8_lossy(stream);
            if !text.trim().is_empty() {
                let _ = write!(message, "\n{}", text.trim_end());
            }
        }
        bail!(message);
    }
    Ok(output)
}

/// The directory holding both `initdb` and `pg_ctl`: the first on `PATH`, else the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian's layout, not on `PATH` by default).
fn find_bin_dir() -> Result<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = std::env::split_paths(&path).find(|dir| has_tools(dir)) {
        return Ok(dir);
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name.split('.').map(str::parse).collect::<Result<Vec<u32>, _>>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| has_tools(bin))
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "initdb and pg_ctl are neither on PATH nor under /usr/lib/postgresql/*/bin; \
             install Postgres, or set DATABASE_URL to a server the tests may use"
        ),
    }
}

/// Whether xtask runs as root, in which case the Postgres tools must run as `postgres`.
fn running_as_root() -> Result<bool> {
    let output = run_quietly("id -u", Command::new("id").arg("-u"))?;
    Ok(String::from_utf8_lossy(&output.stdout).trim() == "0")
}

/// A new directory `<prefix>-XXXXXX` in the system's temporary directory, removed (with
/// everything in it) when the guard is dropped.
pub(crate) fn temp_dir(prefix: &str) -> Result<TempDir> {
    tempfile::Builder::new().prefix(&format!("{prefix}-")).tempdir().with_context(|| {
        format!("cannot create a directory {prefix}-… in {}", std::env::temp_dir().display())
    })
}

/// A loopback port that nobody listened on a moment ago.
pub(crate) fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind a loopback port")?;
    Ok(listener.local_addr().context("reading the bound port")?.port())
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Quotes a word for `sh` unless it is plainly safe.
fn shell_quote(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:@,+".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The Postgres server of an xtask run: `$DATABASE_URL`'s, or a throwaway cluster of our own.
#[derive(Debug)]
pub(crate) enum Server {
    /// `$DATABASE_URL`, and `$DEFLOOKUP_PG_RESTART` if set.
    Given {
        /// The connection URL (it may hold a password: never print it).
        url: String,
        /// A shell command restarting that server, if the user gave one.
        restart: Option<String>,
    },
    /// A cluster of our own, stopped and removed on drop.
    Ephemeral(EphemeralPg),
}

impl Server {
    /// `$DATABASE_URL`'s server when the variable is set, else a cluster started now.
    pub(crate) fn from_env_or_start() -> Result<Self> {
        let non_empty = |name| std::env::var(name).ok().filter(|value: &String| !value.is_empty());
        match non_empty("DATABASE_URL") {
            Some(url) => {
                // Not the URL itself: it may hold a password.
                eprintln!("xtask: using the Postgres server of $DATABASE_URL");
                Ok(Server::Given { url, restart: non_empty("DEFLOOKUP_PG_RESTART") })
            }
            None => Ok(Server::Ephemeral(EphemeralPg::start()?)),
        }
    }

    /// As [`from_env_or_start`](Self::from_env_or_start), but a cluster started now keeps
    /// `initdb`'s durability settings ([`EphemeralPg::start_durable`]): the bench's.
    pub(crate) fn durable() -> Result<Self> {
        match std::env::var("DATABASE_URL").ok().filter(|value| !value.is_empty()) {
            Some(_) => Self::from_env_or_start(),
            None => Ok(Server::Ephemeral(EphemeralPg::start_durable()?)),
        }
    }

    /// The URL to connect to.
    pub(crate) fn url(&self) -> String {
        match self {
            Server::Given { url, .. } => url.clone(),
            Server::Ephemeral(pg) => pg.database_url(),
        }
    }

    /// A shell command that restarts the server, when xtask may restart it.
    pub(crate) fn restart_command(&self) -> Option<String> {
        match self {
            Server::Given { restart, .. } => restart.clone(),
            Server::Ephemeral(pg) => Some(pg.restart_command()),
        }
    }

    /// Points a command at this server (`DATABASE_URL`, `DEFLOOKUP_PG_RESTART`).
    pub(crate) fn configure(&self, command: &mut Command) {
        command.env("DATABASE_URL", self.url());
        match self.restart_command() {
            Some(restart) => command.env("DEFLOOKUP_PG_RESTART", restart),
            None => command.env_remove("DEFLOOKUP_PG_RESTART"),
        };
    }

    /// After a failed step, prints the end of our own cluster's log (unless interrupted).
    pub(crate) fn explain_failure<T>(&self, result: &Result<T>) {
        if let (Err(_), Server::Ephemeral(pg)) = (result, self)
            && !interrupted()
        {
            pg.print_log_tail();
        }
    }
}

/// Prints the last `lines` lines of a log file to stderr, to explain a failure. A file that
/// does not exist prints nothing.
pub(crate) fn print_file_tail(path: &Path, lines: usize) {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            eprintln!("xtask: last {} lines of {}:", tail.len(), path.display());
            for line in tail {
                eprintln!("  {line}");
            }
        }
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(error) => eprintln!("xtask: cannot read {}: {error}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpStream};
    use std::process::Command;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::{EphemeralPg, shell_quote};

    #[test]
    #[ignore = "starts a Postgres cluster: cargo test -p xtask -- --ignored"]
    fn a_cluster_starts_restarts_and_is_gone_after_drop() {
        let pg = EphemeralPg::start().expect("cluster starts");
        let (dir, port) = (pg.dir.path().to_owned(), pg.port);
        let pid_file = pg.data_dir().join("postmaster.pid");
        let pid = || std::fs::read_to_string(&pid_file).unwrap().lines().next().unwrap().to_owned();
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("accepts connections");
        let before = pid();

        // Captured output: a restarted server that inherited the pipe would keep it open and
        // hang the reader, which is what would happen to xtask's test output.
        let restart = pg.restart_command();
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(Command::new("sh").arg("-c").arg(&restart).output());
        });
        let output = finished.recv_timeout(Duration::from_secs(90)).expect("restart finishes");
        let output = output.expect("sh runs");
        assert!(output.status.success(), "{output:?}");
        assert_ne!(pid(), before, "a new postmaster");
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("accepts connections again");

        drop(pg);
        assert!(!dir.exists(), "{} is removed", dir.display());
        assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err(), "the server is gone");
    }

    #[test]
    fn shell_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("/tmp/deflookup-pg-1-0/data"), "/tmp/deflookup-pg-1-0/data");
        assert_eq!(shell_quote("-p 5 -k x"), "'-p 5 -k x'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
