//! The run's own database, and the plain connections of the faults and the audit.

use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::pg::Server;

/// The `application_name` of the fault connection, so it never terminates itself.
const FAULT_APPLICATION: &str = "deflookup-soak";

/// The run's own database on the server.
#[derive(Debug)]
pub(super) struct SoakDatabase {
    name: String,
    pub(super) url: String,
}

impl SoakDatabase {
    pub(super) fn create(runtime: &tokio::runtime::Runtime, server: &Server) -> Result<Self> {
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
    pub(super) fn drop_if_external(&self, runtime: &tokio::runtime::Runtime, server: &Server) {
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
pub(super) async fn connect(url: &str) -> Result<tokio_postgres::Client> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runs_database_replaces_the_urls_path() {
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
    }
}
