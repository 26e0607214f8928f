//! Connection settings shared by the adapter's pool and the listener's dedicated connection.

use std::time::Duration;

use lookup_core::wire::{INVALIDATION_CHANNEL, POPULATE_CHANNEL, POPULATE_OUTCOME_CHANNEL};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Connection, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::conninfo::{self, ConnInfo};
use crate::error::PgError;
use crate::tls::{SslMode, TlsSettings};

/// The stream of a connection made with [`PgConfig`]: TLS or plain, as `sslmode` decided.
pub type PgStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

/// An unpooled connection made by [`PgConfig::connect_unpooled`].
pub type PgConnection = Connection<Socket, PgStream>;

/// TCP keepalive defaults: an idle connection is probed after 30 s, every 10 s, and given up
/// after 3 unanswered probes, so a peer that vanished (a failover, a cut network) is noticed
/// in about a minute instead of the system's two hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

/// Where and how to reach Postgres.
///
/// The URL is libpq's (a `postgres://` URL or `key=value` words), with these settings read by
/// deflookup itself:
///
/// - `sslmode` = `disable` | `prefer` (default) | `require` | `verify-ca` | `verify-full`,
///   and `sslrootcert` = a PEM file or `system`: TLS with rustls, for the pool and the
///   listener alike (see the crate docs for what each mode checks).
/// - `pgbouncer=true`: the pool goes through a transaction-mode pooler (PgBouncer and the
///   like): no named prepared statements and no session state. The listener cannot go through
///   such a pooler; give it a direct URL with [`listen_url`](Self::listen_url).
///
/// Every wait is bounded: [`connect_timeout`](Self::connect_timeout) covers a connection's
/// whole start-up (TCP, TLS, authentication), [`operation_timeout`](Self::operation_timeout)
/// each database operation, and TCP keepalives notice a vanished server.
#[derive(Clone)]
pub struct PgConfig {
    url: String,
    listen_url: Option<String>,
    schema: Option<String>,
    channel: String,
    populate_channel: String,
    populate_outcome_channel: String,
    pool_size: usize,
    connect_timeout: Duration,
    operation_timeout: Duration,
    transaction_pooler: Option<bool>,
    /// Set by the caller; `None`: `deflookup`, or `deflookup-listener` for the listener.
    application_name: Option<String>,
    shared_indexes: bool,
    broadcast: bool,
    durable_guard: bool,
    guard_horizon: Duration,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("PgConfig")
            .field("url", &redact_url(&self.url))
            .field("listen_url", &self.listen_url.as_deref().map(redact_url))
            .field("schema", &self.schema)
            .field("channel", &self.channel)
            .field("populate_channel", &self.populate_channel)
            .field("populate_outcome_channel", &self.populate_outcome_channel)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("transaction_pooler", &self.transaction_pooler)
            .field("broadcast", &self.broadcast)
            .field("durable_guard", &self.durable_guard)
            .finish()
    }
}

/// A [`PgConfig`] read and checked: what a connection needs.
pub(crate) struct Resolved {
    pub(crate) pg: tokio_postgres::Config,
    pub(crate) tls: MakeRustlsConnect,
    pub(crate) pooler: bool,
}

impl PgConfig {
    /// Settings for a `postgres://` or `postgresql://` URL (or a `key=value` string).
    pub fn new(url: impl Into<String>) -> Self {
        PgConfig {
            url: url.into(),
            listen_url: None,
            schema: None,
            channel: INVALIDATION_CHANNEL.to_owned(),
            populate_channel: POPULATE_CHANNEL.to_owned(),
            populate_outcome_channel: POPULATE_OUTCOME_CHANNEL.to_owned(),
            pool_size: 8,
            connect_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(15),
            transaction_pooler: None,
            application_name: None,
            shared_indexes: true,
            broadcast: true,
            durable_guard: true,
            guard_horizon: Duration::from_secs(600),
        }
    }

    /// The listener connects here instead of to the pool's URL: a direct (or session-pooled)
    /// connection to Postgres, for when the pool's URL goes through a transaction pooler,
    /// which cannot carry `LISTEN`. Its own `sslmode`/`sslrootcert` apply to it.
    pub fn listen_url(mut self, url: impl Into<String>) -> Self {
        self.listen_url = Some(url.into());
        self
    }

    /// The settings the listener connects with: these, on the [`listen_url`](Self::listen_url)
    /// when one is set, named `deflookup-listener` unless the caller named them. Refused when
    /// the pool goes through a transaction pooler and no listener URL is set: `LISTEN`
    /// through such a pooler is silently lost.
    pub fn listener_config(&self) -> Result<PgConfig, PgError> {
        let mut listener = self.listener_url_config()?;
        listener.application_name.get_or_insert_with(|| "deflookup-listener".to_owned());
        Ok(listener)
    }

    /// The settings of a connection that follows the invalidation log by polling instead of
    /// listening: the pool's own URL (a transaction pooler is fine: each poll is one
    /// self-contained statement), named `deflookup-listener` unless the caller named it.
    pub fn poller_config(&self) -> PgConfig {
        let mut poller = self.clone();
        poller.listen_url = None;
        poller.application_name.get_or_insert_with(|| "deflookup-listener".to_owned());
        poller
    }

    fn listener_url_config(&self) -> Result<PgConfig, PgError> {
        match &self.listen_url {
            Some(url) => {
                let mut config = self.clone();
                config.url = url.clone();
                config.listen_url = None;
                config.transaction_pooler = None;
                if config.resolve_info()?.1 {
                    return Err(PgError::InvalidConfig {
                        url: config.redacted_url(),
                        reason: "the listener URL has pgbouncer=true, but LISTEN needs a direct \
                                 or session-pooled connection"
                            .to_owned(),
                        source: None,
                    });
                }
                Ok(config)
            }
            None if self.resolve_info()?.1 => Err(PgError::InvalidConfig {
                url: self.redacted_url(),
                reason: "with pgbouncer=true the listener needs its own direct connection: set \
                         a listener URL (PgConfig::listen_url, `--listen-db` on the command line)"
                    .to_owned(),
                source: None,
            }),
            None => Ok(self.clone()),
        }
    }

    /// Keeps the `modules` table in this schema (created if missing) instead of the
    /// connection's default search path. Tests use one schema each.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Broadcasts and listens on this channel instead of `module_cache_invalidated`. Peers
    /// must agree on it; tests use one each so parallel tests do not hear each other.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = channel.into();
        self
    }

    /// Announces populated keys (BEHAVIOUR §9) on this channel instead of
    /// `module_cache_populated`. Peers must agree on it.
    pub fn populate_channel(mut self, channel: impl Into<String>) -> Self {
        self.populate_channel = channel.into();
        self
    }

    /// Tells populate waiters why a winner left no row on this channel instead of
    /// `module_cache_populate_outcome`. Peers must agree on it.
    pub fn populate_outcome_channel(mut self, channel: impl Into<String>) -> Self {
        self.populate_outcome_channel = channel.into();
        self
    }

    /// Maximum pooled connections for queries (the listener's connection is not pooled).
    /// Connections are opened only when an operation needs one.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// How long a connection's whole start-up may take: TCP connect, TLS handshake,
    /// authentication and the server's first answer (default 10 s). A server that accepts
    /// the connection and then stays silent fails here.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How long one database operation may take (default 15 s): a read, a write, an
    /// invalidation's transaction, a populate lock attempt. Includes waiting for a pooled
    /// connection. The connection of an operation that timed out is closed, not pooled.
    /// Renders are not database operations and are not bounded by it.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Whether the pool goes through a transaction pooler, overriding the URL's `pgbouncer`
    /// setting.
    pub fn transaction_pooler(mut self, on: bool) -> Self {
        self.transaction_pooler = Some(on);
        self
    }

    /// The `application_name` operators see in `pg_stat_activity`, unless the URL sets one
    /// (default `deflookup` for the pool, `deflookup-listener` for the listener).
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = Some(name.into());
        self
    }

    /// When deflookup adopts a `modules` table another system created (the reference's), it
    /// adds next to it the one index it needs that such a table lacks: a GIN index on `deps`
    /// for the consumer closure (named `deflookup_modules_deps_index`). `false` adds nothing to
    /// the shared table (invalidations then scan the realm's rows to find consumers).
    pub fn shared_table_indexes(mut self, on: bool) -> Self {
        self.shared_indexes = on;
        self
    }

    /// Whether an adopted table gets deflookup's index (see
    /// [`shared_table_indexes`](Self::shared_table_indexes)).
    pub fn get_shared_table_indexes(&self) -> bool {
        self.shared_indexes
    }

    /// Turns the NOTIFY broadcast of invalidations off. **Unsafe**: peers' in-flight loads no
    /// longer hear invalidations. Only for the soak test's control run.
    pub fn broadcast(mut self, on: bool) -> Self {
        self.broadcast = on;
        self
    }

    /// Turns the durable persist guard off. **Unsafe**: a persist is no longer checked against
    /// invalidations committed since its load began. Only for the soak test's control run.
    pub fn durable_guard(mut self, on: bool) -> Self {
        self.durable_guard = on;
        self
    }

    /// How long the durable guard remembers an invalidated URL (default 10 minutes). A load
    /// that started before a forgotten invalidation of its realm is treated as stale.
    pub fn guard_horizon(mut self, horizon: Duration) -> Self {
        self.guard_horizon = horizon;
        self
    }

    /// Whether invalidations are broadcast.
    pub fn get_broadcast(&self) -> bool {
        self.broadcast
    }

    /// Whether persists are checked by the durable guard.
    pub fn get_durable_guard(&self) -> bool {
        self.durable_guard
    }

    /// The durable guard's memory.
    pub fn get_guard_horizon(&self) -> Duration {
        self.guard_horizon
    }

    /// The configured schema, if any.
    pub fn get_schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The invalidation channel.
    pub fn get_channel(&self) -> &str {
        &self.channel
    }

    /// The populate announcement channel.
    pub fn get_populate_channel(&self) -> &str {
        &self.populate_channel
    }

    /// The populate outcome channel.
    pub fn get_populate_outcome_channel(&self) -> &str {
        &self.populate_outcome_channel
    }

    /// The pool size.
    pub fn get_pool_size(&self) -> usize {
        self.pool_size
    }

    /// The bound on a connection's start-up: the URL's `connect_timeout` (seconds, as in
    /// libpq) when it sets one, else [`connect_timeout`](Self::connect_timeout)'s.
    pub fn get_connect_timeout(&self) -> Duration {
        conninfo::parse(&self.url)
            .ok()
            .and_then(|info| info.get("connect_timeout").and_then(|v| v.trim().parse::<u64>().ok()))
            .filter(|secs| *secs > 0)
            .map_or(self.connect_timeout, Duration::from_secs)
    }

    /// The bound on one database operation.
    pub fn get_operation_timeout(&self) -> Duration {
        self.operation_timeout
    }

    /// Whether the pool goes through a transaction pooler (`pgbouncer=true` in the URL, or
    /// [`transaction_pooler`](Self::transaction_pooler)). `false` for an unreadable URL.
    pub fn get_transaction_pooler(&self) -> bool {
        self.resolve_info().map(|(_, pooler)| pooler).unwrap_or(false)
    }

    /// The TLS mode the URL asks for (`sslmode`, as libpq combines it with `sslrootcert`).
    pub fn ssl_mode(&self) -> Result<SslMode, PgError> {
        let (info, _) = self.resolve_info()?;
        Ok(self.tls_settings(&info)?.mode)
    }

    /// The URL with any password replaced by `***`, for logs and errors.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    fn invalid(&self, reason: String) -> PgError {
        PgError::InvalidConfig { url: self.redacted_url(), reason, source: None }
    }

    /// The URL split into the driver's part and ours, and whether a pooler is in between.
    fn resolve_info(&self) -> Result<(ConnInfo, bool), PgError> {
        let info = conninfo::parse(&self.url).map_err(|e| self.invalid(e.0))?;
        let pooler = match (self.transaction_pooler, info.get("pgbouncer")) {
            (Some(on), _) => on,
            (None, None) => false,
            (None, Some("true" | "1" | "on" | "yes")) => true,
            (None, Some("false" | "0" | "off" | "no")) => false,
            (None, Some(other)) => {
                return Err(self.invalid(format!("pgbouncer={other:?} is neither true nor false")));
            }
        };
        Ok((info, pooler))
    }

    fn tls_settings(&self, info: &ConnInfo) -> Result<TlsSettings, PgError> {
        TlsSettings::new(info.get("sslmode"), info.get("sslrootcert")).map_err(|e| self.invalid(e))
    }

    /// Everything a connection needs, checked: the driver's settings, the TLS connector and
    /// whether a transaction pooler is in between.
    pub(crate) fn resolve(&self) -> Result<Resolved, PgError> {
        let (info, pooler) = self.resolve_info()?;
        let tls = self.tls_settings(&info)?;
        let mut pg = self.driver_config(&info, pooler)?;
        pg.ssl_mode(tls.mode.driver());
        let connector = tls.connector().map_err(|e| self.invalid(e))?;
        Ok(Resolved { pg, tls: connector, pooler })
    }

    fn driver_config(
        &self,
        info: &ConnInfo,
        pooler: bool,
    ) -> Result<tokio_postgres::Config, PgError> {
        let mut config: tokio_postgres::Config =
            info.driver.parse().map_err(|source| PgError::InvalidConfig {
                url: self.redacted_url(),
                reason: "not a valid Postgres connection string".to_owned(),
                source: Some(Box::new(source)),
            })?;
        config.connect_timeout(self.get_connect_timeout());
        if !info.has("keepalives_idle") {
            config.keepalives_idle(KEEPALIVE_IDLE);
        }
        if !info.has("keepalives_interval") {
            config.keepalives_interval(KEEPALIVE_INTERVAL);
        }
        if !info.has("keepalives_retries") {
            config.keepalives_retries(KEEPALIVE_RETRIES);
        }
        if config.get_application_name().is_none() {
            config.application_name(self.application_name.as_deref().unwrap_or("deflookup"));
        }
        if let Some(schema) = &self.schema {
            validate_identifier(schema, &self.redacted_url())?;
            // Statements name the schema themselves; the search path only helps people (and
            // tests) typing SQL on such a connection. A transaction pooler refuses the
            // `options` start-up parameter, so it is left out there.
            if !pooler {
                config.options(format!("-c search_path={schema}"));
            }
        }
        validate_channel(&self.channel, &self.redacted_url())?;
        validate_channel(&self.populate_channel, &self.redacted_url())?;
        validate_channel(&self.populate_outcome_channel, &self.redacted_url())?;
        Ok(config)
    }

    /// The tokio-postgres settings for one connection: the URL (without deflookup's own
    /// settings), the timeouts and keepalives, and the schema as the connection's
    /// `search_path`. Connect it with [`connect_unpooled`](Self::connect_unpooled) to get
    /// TLS as the URL asks.
    pub fn tokio_postgres_config(&self) -> Result<tokio_postgres::Config, PgError> {
        Ok(self.resolve()?.pg)
    }

    /// Opens one connection outside any pool, with TLS as the URL asks, its whole start-up
    /// bounded by [`connect_timeout`](Self::connect_timeout). The caller drives the
    /// connection (spawn it, or poll it for notifications).
    pub async fn connect_unpooled(&self) -> Result<(Client, PgConnection), PgError> {
        let resolved = self.resolve()?;
        let url = self.redacted_url();
        let limit = self.get_connect_timeout();
        match tokio::time::timeout(limit, resolved.pg.connect(resolved.tls)).await {
            Ok(Ok(connected)) => Ok(connected),
            Ok(Err(source)) => Err(PgError::connect(url, Box::new(source))),
            Err(_) => Err(PgError::connect_timeout(url, limit)),
        }
    }
}

/// Schema names go into `search_path` and DDL, so only plain identifiers are accepted.
fn validate_identifier(name: &str, url: &str) -> Result<(), PgError> {
    let ok = !name.is_empty()
        && name.len() < 64
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(PgError::InvalidConfig {
            url: url.to_owned(),
            reason: format!("schema {name:?} must be a lower-case identifier (a-z, 0-9, _)"),
            source: None,
        })
    }
}

/// Channels are sent as a parameter of `pg_notify`, but LISTEN needs an identifier; accept
/// what both can carry without quoting surprises. The empty channel is accepted here so that
/// a broken broadcast can be simulated; `pg_notify` refuses it at run time.
fn validate_channel(channel: &str, url: &str) -> Result<(), PgError> {
    if channel.len() < 64 && channel.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(PgError::InvalidConfig {
            url: url.to_owned(),
            reason: format!("channel {channel:?} must be at most 63 characters of a-z, 0-9, _"),
            source: None,
        })
    }
}

/// Replaces the password of a connection string (URL or `key=value` words) with `***`,
/// however it is spelled: raw or percent-encoded, in the credentials or as a `password`
/// setting, holding `:`, `/`, `?`, `#` or `@`. When in doubt it hides more than the password.
pub fn redact_url(url: &str) -> String {
    conninfo::redact(url)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Letters that appear only in generated passwords (not in hex digits, schemes, hosts or
    /// keys), so any one of them in the output is a leak.
    const SECRET: [char; 4] = ['Q', 'X', 'Z', 'W'];

    fn encode(text: &str) -> String {
        percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
    }

    /// A password as people write them: secret letters mixed with the URL's delimiters.
    fn password() -> impl Strategy<Value = String> {
        "[QXZW:/?#@%&= ']{0,6}[QXZW][QXZW:/?#@%&= ']{0,6}"
    }

    /// The same password in every spelling a user may give it.
    fn spellings(pw: &str) -> Vec<String> {
        let quoted = pw.replace('\\', "\\\\").replace('\'', "\\'");
        let bare: String = pw
            .chars()
            .flat_map(|c| if c == ' ' || c == '\'' { vec!['\\', c] } else { vec![c] })
            .collect();
        vec![
            format!("postgres://user:{pw}@db.test:5432/app?sslmode=require"),
            format!("postgresql://user:{pw}@db.test/app"),
            format!("postgres://user:{}@db.test/app?application_name=a", encode(pw)),
            format!("postgres://user@db.test/app?password={pw}&sslmode=prefer"),
            format!("postgres://user@db.test/app?sslmode=prefer&password={pw}"),
            format!("postgres://user@db.test/app?password={}", encode(pw)),
            format!("postgres://db.test/app?pass%77ord={}", encode(pw)),
            format!("host=db.test user=user password='{quoted}' dbname=app"),
            format!("host=db.test password = '{quoted}'"),
            format!("host=db.test password={bare} dbname=app"),
        ]
    }

    fn leaks(text: &str) -> bool {
        text.contains(SECRET)
    }

    proptest! {
        #[test]
        fn no_spelling_of_a_password_survives_redaction(pw in password()) {
            for url in spellings(&pw) {
                let redacted = redact_url(&url);
                prop_assert!(!leaks(&redacted), "{url:?} -> {redacted:?}");
                prop_assert!(redacted.contains("db.test") || redacted.contains("***"), "{redacted:?}");
                let config = PgConfig::new(url.clone()).listen_url(url.clone());
                let debug = format!("{config:?}");
                prop_assert!(!leaks(&debug), "{debug}");
                if let Err(error) = config.tokio_postgres_config() {
                    let message = format!("{error} {error:?}");
                    prop_assert!(!leaks(&message), "{url:?}: {message}");
                }
            }
        }
    }

    #[test]
    fn passwords_never_survive_redaction() {
        assert_eq!(
            redact_url("postgres://alice:s3cret@db.test:5432/app"),
            "postgres://alice:***@db.test:5432/app"
        );
        assert_eq!(redact_url("postgres://alice@db.test/app"), "postgres://alice@db.test/app");
        assert_eq!(redact_url("host=h user=u password=pw"), "host=h user=u password=***");
        // A raw `&` in a password hides what follows until a known setting.
        assert_eq!(
            redact_url("postgres://h/db?password=ab&cd&sslmode=require"),
            "postgres://h/db?password=******&sslmode=require"
        );
        let config = PgConfig::new("postgres://alice:s3cret@db.test/app");
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn bad_settings_are_refused_with_the_url_redacted() {
        let err =
            PgConfig::new("postgres://u:pw@h/db").schema("Robert'); DROP").tokio_postgres_config();
        let message = err.expect_err("bad schema").to_string();
        assert!(message.contains("schema") && !message.contains("pw@"), "{message}");
        let err = PgConfig::new("postgres://u:pw@h/db").channel("a-b").tokio_postgres_config();
        assert!(err.is_err());
        let err = PgConfig::new("postgres://u:pw@h:notaport/db").tokio_postgres_config();
        assert!(!err.expect_err("bad url").to_string().contains("pw"));
        let err = PgConfig::new("postgres://h/db?sslmode=verify").tokio_postgres_config();
        assert!(err.expect_err("bad mode").to_string().contains("verify-full"));
        let err = PgConfig::new("postgres://h/db?pgbouncer=maybe").tokio_postgres_config();
        assert!(err.expect_err("bad flag").to_string().contains("pgbouncer"));
    }

    #[test]
    fn own_settings_reach_the_driver_as_its_own() {
        let config = PgConfig::new("postgres://h/db?sslmode=disable&pgbouncer=true").schema("s");
        let pg = config.tokio_postgres_config().unwrap();
        assert_eq!(pg.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
        // A transaction pooler refuses the `options` start-up parameter.
        assert_eq!(pg.get_options(), None);
        assert!(config.get_transaction_pooler());
        let pg =
            PgConfig::new("postgres://h/db?keepalives_idle=7").tokio_postgres_config().unwrap();
        assert_eq!(pg.get_keepalives_idle(), Duration::from_secs(7));
        assert_eq!(pg.get_keepalives_interval(), Some(KEEPALIVE_INTERVAL));
        assert_eq!(pg.get_ssl_mode(), tokio_postgres::config::SslMode::Prefer);
    }

    #[test]
    fn a_pooled_url_needs_a_direct_listener_url() {
        let pooled = PgConfig::new("postgres://bouncer/db?pgbouncer=true");
        assert!(pooled.listener_config().unwrap_err().to_string().contains("listener URL"));
        let direct = pooled.clone().listen_url("postgres://db/db?sslmode=disable");
        let listener = direct.listener_config().unwrap();
        assert_eq!(listener.redacted_url(), "postgres://db/db?sslmode=disable");
        assert!(!listener.get_transaction_pooler());
        let wrong = pooled.listen_url("postgres://bouncer/db?pgbouncer=true");
        assert!(wrong.listener_config().is_err());
        // Named for operators: the listener apart from the pool, unless the caller named both.
        let name = |config: &PgConfig| {
            config.tokio_postgres_config().unwrap().get_application_name().map(str::to_owned)
        };
        let plain = PgConfig::new("postgres://db/db?sslmode=disable");
        assert_eq!(name(&plain).as_deref(), Some("deflookup"));
        assert_eq!(name(&plain.listener_config().unwrap()).as_deref(), Some("deflookup-listener"));
        let named = plain.application_name("svc");
        assert_eq!(name(&named.listener_config().unwrap()).as_deref(), Some("svc"));
    }
}
