//! Connection settings shared by the adapter's pool and the listener's dedicated connection.

use std::time::Duration;

use lookup_core::wire::{INVALIDATION_CHANNEL, POPULATE_CHANNEL};

use crate::error::PgError;

/// Where and how to reach Postgres.
#[derive(Clone)]
pub struct PgConfig {
    url: String,
    schema: Option<String>,
    channel: String,
    populate_channel: String,
    pool_size: usize,
    connect_timeout: Duration,
    broadcast: bool,
    durable_guard: bool,
    guard_horizon: Duration,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("PgConfig")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("channel", &self.channel)
            .field("populate_channel", &self.populate_channel)
            .field("pool_size", &self.pool_size)
            .field("broadcast", &self.broadcast)
            .field("durable_guard", &self.durable_guard)
            .finish()
    }
}

impl PgConfig {
    /// Settings for a `postgres://` or `postgresql://` URL (or a `key=value` string).
    pub fn new(url: impl Into<String>) -> Self {
        PgConfig {
            url: url.into(),
            schema: None,
            channel: INVALIDATION_CHANNEL.to_owned(),
            populate_channel: POPULATE_CHANNEL.to_owned(),
            pool_size: 8,
            connect_timeout: Duration::from_secs(10),
            broadcast: true,
            durable_guard: true,
            guard_horizon: Duration::from_secs(600),
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

    /// Announces populated keys (SPEC §9) on this channel instead of
    /// `module_cache_populated`. Peers must agree on it.
    pub fn populate_channel(mut self, channel: impl Into<String>) -> Self {
        self.populate_channel = channel.into();
        self
    }

    /// Maximum pooled connections for queries (the listener's connection is not pooled).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// How long to wait for a connection to be established.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
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
    pub fn broadcasts(&self) -> bool {
        self.broadcast
    }

    /// Whether persists are checked by the durable guard.
    pub fn guards_persists(&self) -> bool {
        self.durable_guard
    }

    /// The durable guard's memory.
    pub fn guard_horizon_duration(&self) -> Duration {
        self.guard_horizon
    }

    /// The configured schema, if any.
    pub fn schema_name(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The invalidation channel.
    pub fn channel_name(&self) -> &str {
        &self.channel
    }

    /// The populate announcement channel.
    pub fn populate_channel_name(&self) -> &str {
        &self.populate_channel
    }

    /// The pool size.
    pub fn pool_max(&self) -> usize {
        self.pool_size
    }

    /// The URL with any password replaced by `***`, for logs and errors.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// The tokio-postgres settings for one connection: the URL, the connect timeout, and the
    /// schema as the connection's `search_path` (so every statement finds the right table).
    pub fn tokio_postgres_config(&self) -> Result<tokio_postgres::Config, PgError> {
        let mut config: tokio_postgres::Config =
            self.url.parse().map_err(|source| PgError::InvalidConfig {
                url: self.redacted_url(),
                reason: "not a valid Postgres connection string".to_owned(),
                source: Some(Box::new(source)),
            })?;
        config.connect_timeout(self.connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name("deflookup");
        }
        if let Some(schema) = &self.schema {
            validate_identifier(schema, &self.redacted_url())?;
            config.options(format!("-c search_path={schema}"));
        }
        validate_channel(&self.channel, &self.redacted_url())?;
        validate_channel(&self.populate_channel, &self.redacted_url())?;
        Ok(config)
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

/// Replaces the password of a connection URL (or a `password=` setting) with `***`.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _password)) => format!("{user}:***@{host}"),
                None => authority.to_owned(),
            },
            None => authority.to_owned(),
        };
        let tail = redact_query_password(tail);
        return format!("{scheme}://{authority}{tail}");
    }
    // key=value form.
    url.split_whitespace()
        .map(|part| if part.starts_with("password=") { "password=***" } else { part })
        .collect::<Vec<_>>()
        .join(" ")
}

fn redact_query_password(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else { return tail.to_owned() };
    let query = query
        .split('&')
        .map(|kv| if kv.starts_with("password=") { "password=***" } else { kv })
        .collect::<Vec<_>>()
        .join("&");
    format!("{path}?{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_survive_redaction() {
        assert_eq!(
            redact_url("postgres://alice:s3cret@db.test:5432/app"),
            "postgres://alice:***@db.test:5432/app"
        );
        assert_eq!(redact_url("postgres://alice@db.test/app"), "postgres://alice@db.test/app");
        assert_eq!(
            redact_url("postgresql://u:p@h/db?sslmode=disable&password=x"),
            "postgresql://u:***@h/db?sslmode=disable&password=***"
        );
        assert_eq!(redact_url("host=h user=u password=pw"), "host=h user=u password=***");
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
    }
}
