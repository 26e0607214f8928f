//! The whole Postgres wiring of a service that caches rendered module definitions in a shared
//! database: config → adapter → cross-process coordinator → lookup with the service's own
//! renderer → listener → work → shutdown.
//!
//! ```sh
//! DATABASE_URL=postgres://user@host/db cargo run -p invalidation-listener --example service
//! ```
//!
//! It works in a schema of its own (`deflookup_example`), which it drops at the end, so it can
//! be pointed at any database. `cargo xtask test` runs it against its test cluster.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use adapter_pg::{PgAdapter, PgConfig, PgPopulateCoordinator, PopulateSettings, PopulateSignals};
use invalidation_listener::{ListenerOptions, PgInvalidationListener};
use lookup_core::{
    CachingLookup, CodeRef, InvalidationSink, LookupError, PrerenderRequest, PrerenderResponse,
    Prerenderer, Realm,
};
use serde_json::{Map, json};

const REALM: &str = "https://realm.example/app/";
const SCHEMA: &str = "deflookup_example";

/// The service's own renderer: here, module sources in memory, each exporting the names it
/// lists; a real service would compile the module. It counts its renders.
#[derive(Clone, Default)]
struct Renderer {
    sources: Arc<Mutex<HashMap<String, Vec<String>>>>,
    renders: Arc<AtomicUsize>,
}

impl Prerenderer for Renderer {
    async fn prerender(
        &self,
        request: &PrerenderRequest,
    ) -> Result<PrerenderResponse, LookupError> {
        self.renders.fetch_add(1, Ordering::Relaxed);
        let exports = self.sources.lock().map_err(|_| LookupError::Prerender {
            url: request.module_url.clone(),
            source: Arc::new(std::io::Error::other("renderer state poisoned")),
        })?;
        let Some(names) = exports.get(&request.module_url) else {
            return Ok(PrerenderResponse::missing(&request.module_url));
        };
        let mut definitions = Map::new();
        for name in names {
            let key = CodeRef::new(request.module_url.clone(), name.clone()).definition_key();
            definitions.insert(key, json!({ "type": "definition", "name": name }));
        }
        Ok(PrerenderResponse::ready(definitions, Vec::new()))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        return Err("set DATABASE_URL to a Postgres URL (postgres://user@host/db)".into());
    };

    // 1. Config and adapter: the pool, the schema (created or adopted), the broadcast.
    let config = PgConfig::new(url).schema(SCHEMA);
    let db = PgAdapter::connect(config).await?;

    // 2. Cross-process coalescing of cold loads (optional): one render per module for the
    //    whole fleet. Its waiters are woken by the listener below.
    let signals = Arc::new(PopulateSignals::new());
    let coordinator = PgPopulateCoordinator::new(&db, signals, PopulateSettings::default())?;

    // 3. The lookup, with the service's renderer and its realm.
    let renderer = Renderer::default();
    renderer
        .sources
        .lock()
        .map_err(|_| "poisoned")?
        .insert(format!("{REALM}person.gts"), vec!["Person".to_owned()]);
    let lookup = CachingLookup::builder(db.clone(), renderer.clone())
        .coordinator(coordinator.clone())
        .realm(Realm { url: REALM.into(), owner: "@owner:example".into(), public: true })
        .build()?;

    // 4. The listener: peers' invalidations reach this process's lookup; attached to the
    //    adapter, it skips this process's own (by the adapter's origin id).
    let sink: Arc<dyn InvalidationSink> = Arc::new(lookup.clone());
    let options = ListenerOptions::default().coordinator(&coordinator);
    let listener = PgInvalidationListener::attach(&db, sink, options).await?;

    // 5. Work: a cold lookup renders, a second one is a hit, an invalidation drops the row.
    let person = CodeRef::new(format!("{REALM}person.gts"), "Person");
    let first = lookup.lookup_definition(&person, None).await?;
    let second = lookup.lookup_definition(&person, None).await?;
    println!("definition: {first}");
    println!("renders after two lookups: {}", renderer.renders.load(Ordering::Relaxed));
    assert_eq!(first, second, "the second lookup is served from the cache");
    let invalidated = lookup.invalidate(&format!("{REALM}person.gts")).await?;
    println!("invalidated: {}", invalidated.join(", "));
    lookup.lookup_definition(&person, None).await?;
    println!("renders after the invalidation: {}", renderer.renders.load(Ordering::Relaxed));
    println!("listener: {:?}", listener.stats());

    // 6. Shutdown: loads in flight end, populate leases roll back and announce, the listener
    //    closes its connection.
    lookup.cancel_loads().await;
    coordinator.settle().await;
    listener.shutdown().await;
    drop_schema(&db).await?;
    println!("done");
    Ok(())
}

/// Leaves the database as it was found.
async fn drop_schema(db: &PgAdapter) -> Result<(), Box<dyn std::error::Error>> {
    let (client, connection) = db.config().connect_unpooled().await?;
    let driver = tokio::spawn(connection);
    client.batch_execute(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")).await?;
    drop(client);
    let _ = driver.await;
    Ok(())
}
