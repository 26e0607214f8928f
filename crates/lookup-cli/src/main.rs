//! `deflookup`: look module definitions up through the cache, invalidate them, and watch the
//! cache work in a narrated demo.
//!
//! Realms are directories of module files (`--realm URL=DIR`); modules are "prerendered" by a
//! small source scanner (see `scan/`). The database is an embedded SQLite file by default.

#![forbid(unsafe_code)]

mod demo;
mod files;
mod out;
mod soak_protocol;
mod soak_worker;

// The scanner lives in the package's library, which `deflookup-bench` measures too.
use lookup_cli::scan;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::sync::Arc;

use adapter_pg::{PgAdapter, PgConfig, PgPopulateCoordinator, PopulateSettings, PopulateSignals};
use adapter_sqlite::SqliteAdapter;
use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use invalidation_listener::{ListenerOptions, PgInvalidationListener};
use lookup_core::{
    CachingLookup, CodeRef, DbAdapter, InvalidationSink, LookupError, NoRemoteRealms,
    PopulateCoordinator, Realm, Uncoordinated,
};
use serde_json::json;

use crate::files::FilePrerenderer;
use crate::out::outln;

/// The default database: an SQLite file in the current directory.
const DEFAULT_DB: &str = "sqlite://deflookup.sqlite3";

/// Cache of prerendered module definitions, shared safely by many processes.
#[derive(Debug, Parser)]
#[command(name = "deflookup", version, about, long_about = None)]
struct Cli {
    /// Database URL: `sqlite://PATH`, `sqlite::memory:` or `postgres://…`.
    /// Defaults to $DATABASE_URL, else `sqlite://deflookup.sqlite3`.
    #[arg(long, value_name = "URL")]
    db: Option<String>,

    /// Postgres URL for the invalidation listener, when `--db` goes through a transaction
    /// pooler (`pgbouncer=true`), which cannot carry LISTEN: a direct or session-pooled
    /// connection. `listen` uses it when given.
    #[arg(long, value_name = "URL")]
    listen_db: Option<String>,

    /// Follow peers' invalidations by reading the database's invalidation log every N
    /// milliseconds instead of LISTENing (Postgres): for where no connection can LISTEN, e.g.
    /// only PgBouncer in transaction mode is reachable. Needs no `--listen-db`.
    #[arg(long, value_name = "N", global = true, value_parser = clap::value_parser!(u64).range(1..))]
    poll_ms: Option<u64>,

    /// Writers that do not record their invalidations (the reference servers, `--unsafe`
    /// processes) share the database (Postgres): after a lost connection, resync (discard
    /// everything in flight) instead of catching up from the invalidation log.
    #[arg(long, global = true, conflicts_with = "poll_ms")]
    untracked_writers: bool,

    /// Seconds one database operation may take before it fails (Postgres).
    #[arg(long, value_name = "SECS", default_value_t = 15)]
    operation_timeout_secs: u64,

    /// A local realm backed by a directory, as `URL=DIR` (repeatable). URL must end with `/`.
    #[arg(long = "realm", value_name = "URL=DIR", value_parser = parse_realm)]
    realms: Vec<(String, PathBuf)>,

    /// Make the `--realm`s private (rows per owner) instead of public.
    #[arg(long)]
    private: bool,

    /// The user realms belong to and modules are rendered as.
    #[arg(long, value_name = "USER", default_value = "@owner:localhost")]
    owner: String,

    /// Milliseconds the file prerenderer waits after reading a module, to make renders slow.
    #[arg(long, value_name = "N", default_value_t = 0)]
    prerender_delay_ms: u64,

    /// The largest module source the file prerenderer reads, in bytes; a larger module is a
    /// module error.
    #[arg(long, value_name = "BYTES", default_value_t = files::DEFAULT_MAX_MODULE_BYTES)]
    max_module_bytes: u64,

    /// Coalesce cold loads across processes (Postgres): of all the processes missing the
    /// same module at once, one prerenders it and the others wait for its row.
    #[arg(long)]
    coordinate: bool,

    /// With `--coordinate`: how long one wait for another process's prerender lasts before
    /// trying again (at most 4 rounds).
    #[arg(long, value_name = "SECS", default_value_t = 180)]
    populate_timeout_secs: u64,

    /// For the soak test's control run only: turns off the NOTIFY broadcast of invalidations,
    /// the durable persist guard, and the invalidation listener (Postgres). Peers can then
    /// persist stale rows; never use it for real work.
    #[arg(long = "unsafe")]
    unsafe_mode: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A self-contained, narrated session in a temporary directory and database.
    Demo,
    /// Look one exported definition up: prints {"definition", "prerendered", …}.
    Lookup {
        /// Absolute module URL, or a path relative to the first realm.
        module: String,
        /// The exported name (`default` for the default export).
        name: String,
    },
    /// Print the cache entry of a module (prerendering it on a miss).
    Entry {
        /// Absolute module URL, or a path relative to the first realm.
        module: String,
    },
    /// Invalidate a module and everything that depends on it; prints every URL invalidated.
    Invalidate {
        /// Absolute module URL, or a path relative to the first realm.
        module: String,
    },
    /// Drop every cached row of a realm.
    ClearRealm {
        /// The realm URL.
        realm_url: String,
    },
    /// Drop every cached row.
    ClearAll,
    /// Print every invalidation broadcast on the database, one JSON object per line, until
    /// Ctrl-C or SIGTERM (Postgres only).
    Listen {
        /// Also serve the listener's metrics in the Prometheus text format on this address
        /// (`host:port`), at any path.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// One worker of `cargo xtask soak`: random lookups, edits and invalidations over the
    /// first `--realm`'s modules `m0.gts`…, then one JSON summary line (Postgres only).
    #[command(hide = true)]
    SoakWorker(soak_worker::SoakArgs),
}

fn parse_realm(text: &str) -> Result<(String, PathBuf), String> {
    // The URL ends with `/`, so the first `/=` ends it: a URL may itself contain `=`.
    let (url, dir) =
        text.find("/=").map(|at| (&text[..=at], &text[at + 2..])).ok_or_else(|| {
            format!("expected URL=DIR, where the URL must end with '/', got {text:?}")
        })?;
    if url.is_empty() || dir.is_empty() {
        return Err(format!("expected URL=DIR with both parts, got {text:?}"));
    }
    let parsed = url::Url::parse(url).map_err(|e| format!("realm URL {url:?} is invalid: {e}"))?;
    if !parsed.as_str().ends_with('/') {
        return Err(format!("realm URL {url:?} must end with '/'"));
    }
    Ok((parsed.to_string(), PathBuf::from(dir)))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    lookup_cli::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("deflookup: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`| head`): nothing more to say, and nobody to say it to.
        Err(error) if out::is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            // One line: the error and its causes, outermost first.
            let chain: Vec<String> = error.chain().map(ToString::to_string).collect();
            eprintln!("deflookup: error: {}", dedup_chain(chain).join(": "));
            ExitCode::FAILURE
        }
    }
}

/// Drops causes already spelled out by the message before them.
fn dedup_chain(chain: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for message in chain {
        if !out.last().is_some_and(|prev| prev.contains(&message)) {
            out.push(message);
        }
    }
    out
}

async fn run(cli: Cli) -> Result<()> {
    if matches!(cli.command, Command::Demo) {
        return demo::run(Duration::from_millis(cli.prerender_delay_ms)).await;
    }
    let db_url = cli
        .db
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| DEFAULT_DB.to_owned());
    if db_url.starts_with("sqlite:") {
        if matches!(cli.command, Command::Listen { .. }) {
            bail!("`listen` needs a Postgres database: SQLite has no broadcast");
        }
        if matches!(cli.command, Command::SoakWorker(_)) {
            bail!("`soak-worker` needs a Postgres database: it is about sharing one");
        }
        if cli.coordinate {
            bail!("--coordinate needs a Postgres database: an SQLite file has one process");
        }
        if cli.listen_db.is_some() || cli.poll_ms.is_some() || cli.untracked_writers {
            bail!(
                "--listen-db, --poll-ms and --untracked-writers need a Postgres --db: SQLite has \
                 no broadcast to follow"
            );
        }
        let db = SqliteAdapter::from_url(&db_url)
            .with_context(|| format!("cannot open database {db_url}"))?;
        execute(&build_lookup::<_, Uncoordinated>(db, &cli, None)?, &cli).await
    } else if db_url.starts_with("postgres://") || db_url.starts_with("postgresql://") {
        let mut config = PgConfig::new(db_url)
            .operation_timeout(Duration::from_secs(cli.operation_timeout_secs.max(1)));
        if let Some(listen_db) = &cli.listen_db {
            config = config.listen_url(listen_db.clone());
        }
        if cli.unsafe_mode {
            tracing::warn!("--unsafe: no broadcast, no durable guard, no listener");
            config = config.broadcast(false).durable_guard(false);
        }
        run_postgres(config, cli).await
    } else {
        let shown = adapter_pg::redact_url(&db_url);
        bail!(
            "unsupported database URL {shown:?}: expected sqlite://PATH, sqlite::memory: or postgres://…"
        )
    }
}

async fn run_postgres(config: PgConfig, cli: Cli) -> Result<()> {
    if matches!(cli.command, Command::Listen { .. }) {
        // Only the LISTEN connection: watching needs no pool and no table.
        return listen(&config, &cli).await;
    }
    let renders = matches!(
        cli.command,
        Command::Lookup { .. } | Command::Entry { .. } | Command::SoakWorker(_)
    );
    if renders && !cli.unsafe_mode && cli.poll_ms.is_none() {
        // Before any work: a rendering process must be able to listen (not through a
        // transaction pooler), or poll.
        config.listener_config().context("cannot LISTEN")?;
    }
    let db =
        PgAdapter::connect(config.clone()).await.context("cannot open the Postgres database")?;
    if cli.unsafe_mode && (cli.poll_ms.is_some() || cli.untracked_writers) {
        bail!(
            "--poll-ms and --untracked-writers set up the invalidation listener, which --unsafe turns off"
        );
    }
    if cli.coordinate && cli.unsafe_mode {
        bail!("--coordinate needs the invalidation listener, which --unsafe turns off");
    }
    let signals = Arc::new(PopulateSignals::new());
    let coordinator = if cli.coordinate && renders {
        let settings = PopulateSettings {
            wait_timeout: Duration::from_secs(cli.populate_timeout_secs),
            ..PopulateSettings::default()
        };
        Some(
            PgPopulateCoordinator::new(&db, Arc::clone(&signals), settings)
                .context("cannot coordinate")?,
        )
    } else {
        None
    };
    let lookup = build_lookup(db.clone(), &cli, coordinator.clone())?;
    // A render can take long: listen while it runs, so a peer's invalidation of the module
    // discards our stale result instead of letting us persist it (and, coordinated, so a
    // peer's finished prerender wakes us). `--unsafe` (the soak's control run) deliberately
    // does without invalidations.
    let resyncs = Arc::new(soak_worker::ResyncCount::new(lookup.clone()));
    let listener = if renders && !cli.unsafe_mode {
        let sink: Arc<dyn InvalidationSink> = match &cli.command {
            Command::SoakWorker(_) => resyncs.clone(),
            _ => Arc::new(lookup.clone()),
        };
        let origin = Some(db.origin().to_owned());
        let mut options = listener_options(&cli);
        if coordinator.is_some() {
            options = options.populate(signals);
        }
        let started = PgInvalidationListener::start_with(&config, origin, sink, options).await;
        Some(started.context(if cli.poll_ms.is_some() {
            "cannot poll"
        } else {
            "cannot LISTEN"
        })?)
    } else {
        None
    };
    let work = async {
        match &cli.command {
            Command::SoakWorker(args) => {
                soak_worker::run(&lookup, &cli.realms, args, listener.as_ref(), &resyncs).await
            }
            _ => execute(&lookup, &cli).await,
        }
    };
    // Asked to stop (a deploy's SIGTERM, Ctrl-C): the work is dropped here, which cancels a
    // render in progress; a populate lock it held is then released and its key announced
    // (`settle` below), so the peers waiting for it take over at once.
    let result = tokio::select! {
        result = work => result,
        signal = stop_requested() => {
            lookup.cancel_loads().await;
            Err(anyhow::anyhow!("interrupted by {signal}"))
        }
    };
    if let Some(coordinator) = &coordinator {
        coordinator.settle().await;
        let stats = coordinator.stats();
        tracing::info!(
            acquired = stats.acquired,
            contended = stats.contended,
            "cross-process populate coalescing"
        );
    }
    if let Some(listener) = listener {
        listener.shutdown().await;
    }
    result
}

/// Resolves with the signal's name once the process is asked to stop (SIGINT or SIGTERM).
async fn stop_requested() -> &'static str {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(terminate) => terminate,
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM");
                return std::future::pending().await;
            }
        };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}

/// The listener's options the command line asks for.
fn listener_options(cli: &Cli) -> ListenerOptions {
    let mut options = ListenerOptions::default().untracked_writers(cli.untracked_writers);
    if let Some(ms) = cli.poll_ms {
        options = options.poll(Duration::from_millis(ms));
    }
    options
}

/// `deflookup listen`: prints listener events as JSON lines until Ctrl-C or SIGTERM.
async fn listen(config: &PgConfig, cli: &Cli) -> Result<()> {
    use tokio::io::AsyncWriteExt as _;
    use tokio::sync::broadcast::error::RecvError;
    if let Command::Listen { metrics_addr: Some(addr), .. } = &cli.command {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(*addr)
            .install()
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(%addr, "serving metrics in the Prometheus text format");
    }
    let options = listener_options(cli);
    let listener = PgInvalidationListener::start_with(config, None, Arc::new(IgnoreBumps), options)
        .await
        .context(if cli.poll_ms.is_some() { "cannot poll" } else { "cannot LISTEN" })?;
    let mut events = listener.subscribe();
    let mut stdout = tokio::io::stdout();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch SIGTERM")?;
    let outcome = loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = terminate.recv() => break Ok(()),
        };
        match event {
            Ok(event) => {
                let line = format!("{}\n", event.to_json());
                let written = async {
                    stdout.write_all(line.as_bytes()).await?;
                    stdout.flush().await
                };
                if let Err(e) = written.await {
                    // A closed stdout (e.g. `| head`) ends the command quietly.
                    break if e.kind() == std::io::ErrorKind::BrokenPipe {
                        Ok(())
                    } else {
                        Err(e.into())
                    };
                }
            }
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "output fell behind; events were skipped");
            }
            Err(RecvError::Closed) => break Err(anyhow::anyhow!("the listener stopped")),
        }
    };
    listener.shutdown().await;
    outcome
}

/// `listen` only watches: it has no cache of its own to bump.
struct IgnoreBumps;

impl InvalidationSink for IgnoreBumps {
    fn bump_modules(&self, _realm_url: &str, _urls: &[String]) {}
    fn bump_realm(&self, _realm_url: &str) {}
    fn bump_global(&self) {}
}

/// The lookup the commands run on.
type CliLookup<D, C> = CachingLookup<D, FilePrerenderer, NoRemoteRealms, C>;

/// Builds the lookup over `db` with the command line's realms.
fn build_lookup<D: DbAdapter, C: PopulateCoordinator>(
    db: D,
    cli: &Cli,
    coordinator: Option<C>,
) -> Result<CliLookup<D, C>> {
    let mut prerenderer =
        FilePrerenderer::new(cli.realms.clone()).with_max_module_bytes(cli.max_module_bytes);
    if cli.prerender_delay_ms > 0 {
        prerenderer = prerenderer.with_delay(Duration::from_millis(cli.prerender_delay_ms));
    }
    if let Command::SoakWorker(args) = &cli.command {
        prerenderer = prerenderer.with_jitter(Duration::from_millis(args.jitter_ms));
    }
    let config = lookup_core::LookupConfig::default();
    let lookup =
        CachingLookup::with_coordinator(db, prerenderer, NoRemoteRealms, config, coordinator);
    for (url, dir) in &cli.realms {
        if !dir.is_dir() {
            bail!("realm directory {} does not exist or is not a directory", dir.display());
        }
        lookup.register_realm(Realm {
            url: url.clone(),
            owner: cli.owner.clone(),
            public: !cli.private,
        })?;
    }
    Ok(lookup)
}

/// An absolute URL stays as it is; anything else is a path under the first realm.
fn module_url(cli: &Cli, module: &str) -> Result<String> {
    if url::Url::parse(module).is_ok() {
        return Ok(module.to_owned());
    }
    let Some((realm, _)) = cli.realms.first() else {
        bail!("{module:?} is not an absolute URL and no --realm was given to resolve it against")
    };
    let base = url::Url::parse(realm).with_context(|| format!("realm URL {realm}"))?;
    let joined = base
        .join(module.trim_start_matches('/'))
        .with_context(|| format!("cannot resolve {module:?} against {realm}"))?;
    Ok(joined.to_string())
}

fn print_json(value: &serde_json::Value) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?)?;
    Ok(())
}

async fn execute<D: DbAdapter, C: PopulateCoordinator>(
    lookup: &CliLookup<D, C>,
    cli: &Cli,
) -> Result<()> {
    let renders_before = lookup.prerenderer().prerender_count();
    match &cli.command {
        Command::Demo | Command::Listen { .. } | Command::SoakWorker(_) => {
            unreachable!("run without `execute`")
        }
        Command::Lookup { module, name } => {
            let url = module_url(cli, module)?;
            let code_ref = CodeRef::new(url.clone(), name.clone());
            let definition = lookup.lookup_definition(&code_ref, None).await.map_err(explain)?;
            let prerendered = lookup.prerenderer().prerender_count() > renders_before;
            print_json(&json!({
                "module": lookup_core::urls::canonical_url(&url),
                "key": code_ref.definition_key(),
                "definition": definition,
                "prerendered": prerendered,
            }))
        }
        Command::Entry { module } => {
            let url = module_url(cli, module)?;
            let entry = lookup.load_entry(&url, None).await.map_err(explain)?;
            let prerendered = lookup.prerenderer().prerender_count() > renders_before;
            let mut value = serde_json::to_value(&*entry)?;
            value["prerendered"] = json!(prerendered);
            print_json(&value)
        }
        Command::Invalidate { module } => {
            let url = module_url(cli, module)?;
            // The library invalidates nothing for a URL no local realm owns (peers may own
            // it); on the command line that is a mistake to report, as `lookup` does.
            if lookup.owning_realm(&url).is_none() {
                bail!("cannot determine realm for {url}: no --realm owns it");
            }
            let list = lookup.invalidate(&url).await.map_err(explain)?;
            print_json(&json!(list))
        }
        Command::ClearRealm { realm_url } => {
            let deleted = lookup.clear_realm(realm_url).await.map_err(explain)?;
            print_json(&json!({ "realm": realm_url, "deleted": deleted }))
        }
        Command::ClearAll => {
            let deleted = lookup.clear_all().await.map_err(explain)?;
            print_json(&json!({ "deleted": deleted }))
        }
    }
}

/// Lookup errors become one readable line (module errors keep their dependency errors).
fn explain(error: LookupError) -> anyhow::Error {
    if let Some(detail) = error.module_error() {
        let mut line = error.to_string();
        for extra in &detail.additional_errors {
            let from = extra.id.as_deref().unwrap_or("a dependency");
            line.push_str(&format!("; caused by {from}: {}", extra.message));
        }
        return anyhow::anyhow!(line);
    }
    anyhow::Error::new(error)
}
