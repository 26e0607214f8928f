//! The servers the Postgres tests need besides the main cluster: a TLS-only cluster with
//! certificates made here, and a PgBouncer in transaction mode in front of the main cluster.
//!
//! Both are owned by guards that stop them and remove their files on drop, like
//! [`EphemeralPg`].

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

use crate::pg::{EphemeralPg, free_port, print_file_tail, run_quietly, temp_dir, wait_for_tcp};

/// PEM files for the TLS cluster: a CA, a server certificate it signed for `localhost` only,
/// and a second CA that signed nothing (the "wrong CA" of the tests).
#[derive(Debug)]
pub(crate) struct TlsFiles {
    pub ca: PathBuf,
    pub wrong_ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TlsFiles {
    /// Makes the certificates in `dir`.
    pub(crate) fn create(dir: &Path) -> Result<TlsFiles> {
        let ca = certificate_authority("deflookup test CA")?;
        let wrong = certificate_authority("deflookup unrelated CA")?;
        let server_key = KeyPair::generate().context("generating the server key")?;
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])
            .context("server certificate parameters")?;
        params.distinguished_name.push(DnType::CommonName, "localhost");
        let server =
            params.signed_by(&server_key, &ca).context("signing the server certificate")?;
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            wrong_ca: dir.join("wrong-ca.pem"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
        };
        write(&files.ca, &ca.pem())?;
        write(&files.wrong_ca, &wrong.pem())?;
        write(&files.server_cert, &server.pem())?;
        write(&files.server_key, &server_key.serialize_pem())?;
        Ok(files)
    }
}

fn certificate_authority(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    let key = KeyPair::generate().context("generating a CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, key).context("self-signing a CA")
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// A PgBouncer in transaction mode on a free loopback port, in front of `127.0.0.1:pg_port`,
/// stopped and its directory removed on drop.
#[derive(Debug)]
pub(crate) struct PgBouncer {
    /// Removed on drop, after `Drop::drop` stopped PgBouncer.
    dir: tempfile::TempDir,
    port: u16,
}

impl PgBouncer {
    /// Starts one, as the `postgres` user when running as root (PgBouncer refuses root).
    pub(crate) fn start(pg_port: u16, as_postgres: bool) -> Result<PgBouncer> {
        let binary = find_pgbouncer()?;
        let dir = temp_dir("deflookup-pgbouncer")?;
        let mut bouncer = PgBouncer { dir, port: 0 };
        let ini = bouncer.dir.path().join("pgbouncer.ini");
        for _attempt in 0..3 {
            bouncer.port = free_port()?;
            // `auth_type = any`: the test cluster trusts local connections, and PgBouncer logs
            // in as `postgres` whatever the client's user name.
            let config = format!(
                "[databases]\n* = host=127.0.0.1 port={pg_port} user=postgres\n\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_type = any\npool_mode = transaction\n\
                 max_client_conn = 800\ndefault_pool_size = 60\n\
                 logfile = {log}\npidfile = {pid}\n",
                port = bouncer.port,
                log = bouncer.log_file().display(),
                pid = bouncer.pid_file().display(),
            );
            write(&ini, &config)?;
            if as_postgres {
                let mut chown = Command::new("chown");
                chown.arg("-R").arg("postgres:").arg(bouncer.dir.path());
                run_quietly("chown the PgBouncer directory", &mut chown)?;
            }
            let mut start = if as_postgres {
                let mut runuser = Command::new("runuser");
                runuser.args(["-u", "postgres", "--"]).arg(&binary);
                runuser
            } else {
                Command::new(&binary)
            };
            start.arg("-d").arg(&ini).current_dir(bouncer.dir.path()).process_group(0);
            run_quietly("start PgBouncer", &mut start)?;
            if wait_for_tcp("PgBouncer", bouncer.port, Duration::from_secs(10)).is_ok() {
                eprintln!("xtask: PgBouncer (transaction mode) ready on port {}", bouncer.port);
                return Ok(bouncer);
            }
            bouncer.stop();
        }
        print_file_tail(&bouncer.log_file(), 20);
        bail!("PgBouncer did not start (see its log above)")
    }

    /// The URL of the main cluster through PgBouncer, with deflookup's pooler setting.
    pub(crate) fn database_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres?pgbouncer=true", self.port)
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("pgbouncer.log")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.path().join("pgbouncer.pid")
    }

    fn stop(&self) {
        let Some(pid) = std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
        else {
            return;
        };
        // SIGTERM: PgBouncer shuts down at once (the tests are over).
        let mut kill = Command::new("kill");
        kill.args(["-TERM", &pid.to_string()]).process_group(0);
        if let Err(error) = run_quietly("stop PgBouncer", &mut kill) {
            eprintln!("xtask: warning: {error:#}");
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `pgbouncer` on `PATH`, or Debian's `/usr/sbin/pgbouncer`.
fn find_pgbouncer() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let candidates = std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin")]);
    for dir in candidates {
        let binary = dir.join("pgbouncer");
        if binary.is_file() {
            return Ok(binary);
        }
    }
    bail!(
        "pgbouncer is not installed; the tests run part of the Postgres suite through it \
         (Debian: `apt-get install pgbouncer`)"
    )
}

/// The extra servers of a run on clusters of our own, and their settings for the tests.
#[derive(Debug)]
pub(crate) struct Extras {
    tls: EphemeralPg,
    tls_files: TlsFiles,
    /// Kept for its files; removed on drop.
    _tls_dir: tempfile::TempDir,
    bouncer: PgBouncer,
}

impl Extras {
    /// Starts the TLS cluster and the PgBouncer in front of `main`.
    pub(crate) fn start(main: &EphemeralPg) -> Result<Extras> {
        let tls_dir = tempfile::Builder::new().prefix("deflookup-certs").tempdir()?;
        let tls_files = TlsFiles::create(tls_dir.path())?;
        let tls = EphemeralPg::start_tls(&tls_files)?;
        let bouncer = PgBouncer::start(main.port(), main.as_postgres())?;
        Ok(Extras { tls, tls_files, _tls_dir: tls_dir, bouncer })
    }

    /// The main cluster through PgBouncer, with `pgbouncer=true`.
    pub(crate) fn pgbouncer_url(&self) -> String {
        self.bouncer.database_url()
    }

    /// The TLS cluster, verified in full against the CA made here.
    pub(crate) fn tls_url(&self) -> String {
        format!(
            "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
            self.tls.port(),
            self.tls_files.ca.display()
        )
    }

    /// Passes their settings to a test command.
    pub(crate) fn configure(&self, command: &mut Command) {
        command.env("DEFLOOKUP_PGBOUNCER_URL", self.bouncer.database_url());
        command.env("DEFLOOKUP_TLS_PORT", self.tls.port().to_string());
        command.env("DEFLOOKUP_TLS_CA", &self.tls_files.ca);
        command.env("DEFLOOKUP_TLS_WRONG_CA", &self.tls_files.wrong_ca);
    }
}
