//! The behaviour suite of BEHAVIOUR §10, written once and run against every
//! [`DbAdapter`](lookup_core::DbAdapter).
//!
//! An adapter crate instantiates it from its own integration test binary:
//!
//! ```ignore
//! behaviour_suite::behaviour_suite!(|| async { SqliteAdapter::open_in_memory().unwrap() });
//! ```
//!
//! Each case receives a fresh, empty adapter from the factory. The fakes here
//! ([`FakeRenderer`], [`FakeProbe`], [`Gate`]) count calls and pause renders on demand, so
//! concurrency cases are driven by gates with bounded timeouts, never by sleeps.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lookup_core::{
    CodeRef, ErrorDoc, LookupError, PrerenderRequest, PrerenderResponse, Prerenderer, ProbeResult,
    RealmProbe,
};
use serde_json::{Map, Value, json};
use tokio::sync::{Semaphore, watch};

pub mod cases;
pub mod metrics;

/// How long any single wait in the suite may take before the case fails instead of hanging.
pub const BOUND: Duration = Duration::from_secs(20);

/// Awaits `future`, failing the test if it takes longer than [`BOUND`].
pub async fn bounded<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(BOUND, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {BOUND:?} waiting for {what}"),
    }
}

/// What the fake renderer answers for one module URL.
#[derive(Debug, Clone)]
pub enum FakeModule {
    /// A module exporting `names`, importing `deps`; `version` is stamped into every definition.
    Ready {
        /// Exported names.
        names: Vec<String>,
        /// Imports as written (relative or absolute).
        deps: Vec<String>,
        /// Stamped into each definition as `"version"`.
        version: u32,
    },
    /// A module that fails to render with this message and status, naming `deps`.
    Broken {
        /// The error message.
        message: String,
        /// The error status.
        status: u16,
        /// Dependencies involved.
        deps: Vec<String>,
    },
    /// The renderer itself fails (no response at all).
    RendererFails(String),
    /// The renderer panics (a faulty implementation).
    RendererPanics,
}

impl FakeModule {
    /// A ready module at version 1.
    pub fn ready(names: &[&str], deps: &[&str]) -> Self {
        FakeModule::Ready {
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            deps: deps.iter().map(|d| (*d).to_owned()).collect(),
            version: 1,
        }
    }

    /// The same module at another version.
    pub fn version(self, version: u32) -> Self {
        match self {
            FakeModule::Ready { names, deps, .. } => FakeModule::Ready { names, deps, version },
            other => other,
        }
    }
}

/// A pause point for renders of one URL: renders wait at it until they are released one by
/// one (first come, first released) or the gate is opened for good.
#[derive(Debug, Clone)]
pub struct Gate {
    entered: Arc<Semaphore>,
    released: Arc<Semaphore>,
    open: watch::Sender<bool>,
}

impl Gate {
    fn new() -> Self {
        Gate {
            entered: Arc::new(Semaphore::new(0)),
            released: Arc::new(Semaphore::new(0)),
            open: watch::channel(false).0,
        }
    }

    /// Lets exactly one waiting (or the next) render through.
    pub fn release_one(&self) {
        self.released.add_permits(1);
    }

    /// Waits (bounded) until one more render has reached the gate.
    pub async fn entered(&self) {
        let permit = bounded("a render to reach the gate", self.entered.acquire()).await;
        permit.expect("gate semaphore is never closed").forget();
    }

    /// Lets every waiting and future render through.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    async fn pass(&self) {
        self.entered.add_permits(1);
        let mut open = self.open.subscribe();
        tokio::select! {
            permit = self.released.acquire() => {
                permit.expect("gate semaphore is never closed").forget();
            }
            // The gate lives as long as the renderer; an error only happens at teardown.
            _ = open.wait_for(|o| *o) => {}
        }
    }
}

#[derive(Debug, Default)]
struct RendererState {
    modules: HashMap<String, FakeModule>,
    calls: HashMap<String, usize>,
    gates: HashMap<String, Gate>,
    requests: Vec<PrerenderRequest>,
}

/// A prerenderer whose modules are set by the test; it counts calls and honours gates.
/// Clones share state.
#[derive(Debug, Clone, Default)]
pub struct FakeRenderer {
    state: Arc<Mutex<RendererState>>,
}

impl FakeRenderer {
    fn lock(&self) -> std::sync::MutexGuard<'_, RendererState> {
        self.state.lock().expect("renderer state poisoned")
    }

    /// Sets (or replaces) what `url` renders to.
    pub fn set(&self, url: &str, module: FakeModule) {
        self.lock().modules.insert(url.to_owned(), module);
    }

    /// Deletes a module: it renders as missing (404, no deps) from now on.
    pub fn remove(&self, url: &str) {
        self.lock().modules.remove(url);
    }

    /// Installs a gate on renders of `url` and returns it.
    pub fn gate(&self, url: &str) -> Gate {
        self.lock().gates.entry(url.to_owned()).or_insert_with(Gate::new).clone()
    }

    /// Renders of `url` so far (also counts renders that answered "missing").
    pub fn calls(&self, url: &str) -> usize {
        self.lock().calls.get(url).copied().unwrap_or(0)
    }

    /// Renders so far, of any URL.
    pub fn total_calls(&self) -> usize {
        self.lock().calls.values().sum()
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<PrerenderRequest> {
        self.lock().requests.clone()
    }
}

/// The definition the fake renders for `name` in `module` at `version`.
pub fn fake_definition(module: &str, name: &str, version: u32) -> Value {
    json!({ "type": "definition", "name": name, "module": module, "version": version })
}

impl Prerenderer for FakeRenderer {
    async fn prerender(
        &self,
        request: &PrerenderRequest,
    ) -> Result<PrerenderResponse, LookupError> {
        let url = request.module_url.clone();
        // The module is read when the render starts, as a real renderer reads the source and
        // then works on it: an edit made while the render is paused is not what it returns.
        let (module, gate) = {
            let mut state = self.lock();
            *state.calls.entry(url.clone()).or_default() += 1;
            state.requests.push(request.clone());
            (state.modules.get(&url).cloned(), state.gates.get(&url).cloned())
        };
        if let Some(gate) = gate {
            gate.pass().await;
        }
        Ok(match module {
            None => PrerenderResponse::missing(&url),
            Some(FakeModule::Ready { names, deps, version }) => {
                let mut definitions = Map::new();
                for name in &names {
                    let key = CodeRef::new(url.clone(), name.clone()).definition_key();
                    definitions.insert(key, fake_definition(&url, name, version));
                }
                PrerenderResponse::ready(definitions, deps)
            }
            Some(FakeModule::Broken { message, status, deps }) => PrerenderResponse::error(
                ErrorDoc::module_error(message, status, deps.clone()),
                deps,
            ),
            Some(FakeModule::RendererPanics) => panic!("fake renderer panics on {url}"),
            Some(FakeModule::RendererFails(message)) => {
                return Err(LookupError::Prerender {
                    url,
                    source: Arc::new(std::io::Error::other(message)),
                });
            }
        })
    }
}

/// A remote realm probe answering from a table of realm prefixes; it counts calls.
#[derive(Debug, Clone, Default)]
pub struct FakeProbe {
    realms: Arc<Mutex<Vec<(String, bool)>>>,
    calls: Arc<Mutex<Vec<(String, String)>>>,
}

impl FakeProbe {
    /// Declares a remote realm.
    pub fn add_realm(&self, realm_url: &str, is_public: bool) {
        self.realms.lock().expect("probe poisoned").push((realm_url.to_owned(), is_public));
    }

    /// `(module_url, user)` of every probe so far.
    pub fn calls(&self) -> Vec<(String, String)> {
        self.calls.lock().expect("probe poisoned").clone()
    }
}

impl RealmProbe for FakeProbe {
    async fn probe(
        &self,
        module_url: &str,
        user: &str,
    ) -> Result<Option<ProbeResult>, LookupError> {
        self.calls.lock().expect("probe poisoned").push((module_url.to_owned(), user.to_owned()));
        let realms = self.realms.lock().expect("probe poisoned");
        Ok(realms
            .iter()
            .find(|(r, _)| module_url.starts_with(r.as_str()))
            .map(|(r, public)| ProbeResult { is_public: *public, resolved_realm_url: r.clone() }))
    }
}

/// Instantiates every behaviour case as a `#[tokio::test]` for one adapter.
///
/// `$make` is an expression callable with no arguments that returns a future of a fresh,
/// empty adapter (e.g. `|| async { SqliteAdapter::open_in_memory().unwrap() }`). With
/// `optional:` before it, the future yields an `Option` instead, and `None` skips the case
/// (for backends that need a server, see [`database_url`]).
#[macro_export]
macro_rules! behaviour_suite {
    (optional: $make:expr) => {
        $crate::behaviour_suite!(@all $make);
    };
    ($make:expr) => {
        $crate::behaviour_suite!(@all || async { Some(($make)().await) });
    };
    (@all $make:expr) => {
        $crate::behaviour_suite!(@cases $make;
            cold_lookup_prerenders_once_then_hits,
            invalidate_of_unregistered_realm_does_nothing,
            extensionless_invalidate_clears_the_extension_row,
            empty_definitions_are_cached_as_a_marker,
            update_then_invalidate_serves_v2,
            deletion_then_invalidate_rejects,
            dependency_chain_invalidation_removes_exactly_the_consumers,
            branching_graph_invalidation_removes_exactly_the_consumers,
            module_errors_propagate_to_dependents_and_recover,
            public_and_realm_auth_scopes_for_local_realms,
            public_and_realm_auth_scopes_for_remote_realms,
            private_remote_module_is_isolated_per_requesting_owner,
            expired_error_re_prerenders,
            concurrent_same_key_lookups_coalesce,
            different_keys_do_not_coalesce,
            a_shared_error_releases_the_slot,
            a_panicking_renderer_aborts_the_load_and_frees_the_key,
            invalidate_drops_in_flight_so_later_callers_never_see_the_old_version,
            in_flight_result_dropped_by_invalidate,
            in_flight_result_dropped_by_clear_realm,
            in_flight_result_dropped_by_clear_all,
            in_flight_result_dropped_by_a_peer_bump,
            unrelated_module_is_not_discarded,
            a_settled_load_does_not_delete_a_newer_slot,
            a_normal_in_flight_load_persists,
            cached_reads_never_prerender_and_choose_deterministically,
            batch_read_returns_entries_by_url_and_alias,
            bad_urls_are_clear_errors,
            the_longest_registered_realm_owns_a_url,
            every_spelling_of_a_module_is_one_row,
            long_urls_are_cached_and_invalidated,
            l1_serves_repeat_lookups,
            l1_never_serves_past_the_max_age,
            l1_follows_every_invalidation,
            l1_is_bypassed_while_the_listener_is_disconnected,
            l1_keeps_nothing_a_concurrent_clear_deleted,
            l1_never_stores_an_unpersisted_result,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                if let Some(db) = ($make)().await {
                    $crate::cases::$case(db).await;
                }
            }
        )*
    };
}

/// The database URL for tests that need a real server (Postgres), from `DATABASE_URL`.
///
/// Without one, the test is skipped with a notice, except under `CI`, where it fails: a CI
/// run that silently skipped the Postgres suite would prove nothing.
pub fn database_url(test: &str) -> Option<String> {
    required_setting(test, "DATABASE_URL", std::env::var_os("CI").is_some())
}

/// A setting the Postgres tests get from `cargo xtask test-pg` besides `DATABASE_URL` (the
/// PgBouncer URL, the TLS cluster's): the variable `name`'s value.
///
/// Missing, the test is skipped with a notice, except under `CI` when xtask started the
/// servers itself (no `DATABASE_URL` of the user's), where it fails.
pub fn xtask_setting(test: &str, name: &str) -> Option<String> {
    let required =
        std::env::var_os("CI").is_some() && std::env::var_os("DEFLOOKUP_USER_DATABASE").is_none();
    required_setting(test, name, required)
}

/// The non-empty value of the variable `name`; without one, a panic when `required`, else a
/// skip notice for `test` and `None`.
fn required_setting(test: &str, name: &str, required: bool) -> Option<String> {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => Some(value),
        _ if required => panic!("{test}: {name} is not set under CI; run `cargo xtask test-pg`"),
        _ => {
            eprintln!("{test}: skipped, {name} is not set (`cargo xtask test-pg` sets it)");
            None
        }
    }
}

/// A name no other test (or run) uses, valid as a Postgres schema, channel or application
/// name: `prefix_<pid>_<counter>_<nanos>`, with the prefix lower-cased, anything but ASCII
/// letters and digits turned into `_`, and the whole at most 63 bytes.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let suffix =
        format!("_{}_{}_{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let prefix: String = prefix
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
        .take(63 - suffix.len())
        .collect();
    format!("{prefix}{suffix}")
}

/// The reference system's `modules` table, from the facts of its migrations: `varchar` keys,
/// `url_hash` generated from `md5(url::text)`, its own index names, and the diagnostics
/// column under the name of its `revision` (`diagnostics`, or the seed's `timing_diagnostics`).
pub fn reference_table_ddl(diagnostics: &str) -> String {
    format!(
        "CREATE UNLOGGED TABLE modules (
            url varchar NOT NULL,
            cache_scope varchar NOT NULL,
            auth_user_id varchar NOT NULL,
            resolved_realm_url varchar NOT NULL,
            definitions jsonb,
            deps jsonb,
            error_doc jsonb,
            created_at bigint,
            file_alias text,
            url_hash text NOT NULL GENERATED ALWAYS AS (md5(url::text)) STORED,
            {diagnostics} jsonb,
            CONSTRAINT modules_pkey PRIMARY KEY (url_hash, cache_scope, auth_user_id)
        );
        CREATE INDEX modules_resolved_realm_url_index ON modules (resolved_realm_url);
        CREATE INDEX modules_resolved_realm_url_file_alias_index ON modules USING hash (file_alias);
        CREATE TABLE pgmigrations (id serial PRIMARY KEY, name varchar NOT NULL, run_on timestamp NOT NULL);"
    )
}
