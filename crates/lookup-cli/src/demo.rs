//! `deflookup demo`: a narrated session over real files and a real SQLite database, both in a
//! temporary directory that is removed at the end.
//!
//! Every step checks what it narrates (a hit really did not prerender, the coalesced lookups
//! really rendered once, …) and the demo fails loudly if the cache misbehaves, so it doubles
//! as an end-to-end smoke test.

use std::path::Path;
use std::time::{Duration, Instant};

use adapter_sqlite::SqliteAdapter;
use anyhow::{Context as _, Result, ensure};
use lookup_core::{CachingLookup, CodeRef, Realm};

use crate::files::FilePrerenderer;
use crate::out::outln;

const REALM: &str = "http://localhost:4201/demo/";

/// The modules of the demo realm: a small card graph.
const MODULES: [(&str, &str); 6] = [
    (
        "person.gts",
        "import { CardDef, field, contains } from 'https://cardstack.com/base/card-api';\n\
         import StringField from 'https://cardstack.com/base/string';\n\
         export class Person extends CardDef {\n  @field name = contains(StringField);\n}\n",
    ),
    (
        "address.gts",
        "import { FieldDef } from 'https://cardstack.com/base/card-api';\n\
         export class Address extends FieldDef {}\n",
    ),
    (
        "contact.gts",
        "import { Person } from './person';\nimport { Address } from './address.gts';\n\
         export class Contact extends Person {}\nexport const VERSION = 1;\n",
    ),
    ("pet.gts", "import { Person } from './person';\nexport class Pet extends Person {}\n"),
    (
        "invoice.gts",
        "import { CardDef } from 'https://cardstack.com/base/card-api';\n\
         export default class Invoice extends CardDef {}\n",
    ),
    ("report.gts", "import { Chart } from './chart';\nexport function render() {}\n"),
];

fn url(path: &str) -> String {
    format!("{REALM}{path}")
}

fn step(title: &str) -> Result<()> {
    outln!("\n== {title}")
}

/// Runs the demo. `delay` is the prerender delay (the concurrency step uses at least 200 ms).
pub(crate) async fn run(delay: Duration) -> Result<()> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let realm_dir = dir.path().join("realm");
    std::fs::create_dir(&realm_dir)
        .with_context(|| format!("cannot create {}", realm_dir.display()))?;
    for (name, source) in MODULES {
        write(&realm_dir.join(name), source)?;
    }
    let db_path = dir.path().join("cache.sqlite3");
    let db = SqliteAdapter::open(&db_path)
        .with_context(|| format!("cannot open {}", db_path.display()))?;
    let render_delay = delay.max(Duration::from_millis(200));
    let renderer =
        FilePrerenderer::new(vec![(REALM.to_owned(), realm_dir.clone())]).with_delay(render_delay);
    let lookup = CachingLookup::new(db, renderer.clone());
    lookup.register_realm(Realm {
        url: REALM.to_owned(),
        owner: "@owner:localhost".to_owned(),
        public: true,
    })?;
    outln!("deflookup demo")?;
    outln!("  realm    {REALM} -> {}", realm_dir.display())?;
    outln!("  database {} (SQLite)", db_path.display())?;
    outln!(
        "  every prerender takes {} ms here, to stand for an expensive render",
        render_delay.as_millis()
    )?;

    step("1. cold lookup: the module is prerendered and cached")?;
    let contact = CodeRef::new(url("contact"), "Contact");
    let (definition, took) = timed(lookup.lookup_definition(&contact, None)).await;
    let definition = definition?;
    outln!("  lookup {} -> {}", contact.definition_key(), definition)?;
    outln!("  {} prerender(s), {took:?}", renderer.prerender_count())?;
    ensure!(renderer.prerender_count() >= 1, "a cold lookup must prerender");

    step("2. the same lookup again: served from the cache")?;
    let before = renderer.prerender_count();
    let (again, took) = timed(lookup.lookup_definition(&contact, None)).await;
    ensure!(again? == definition, "a hit must return the cached definition");
    ensure!(renderer.prerender_count() == before, "a hit must not prerender");
    outln!("  hit in {took:?}, no prerender")?;

    step("3. eight concurrent lookups of a cold module share one prerender")?;
    let before = renderer.prerender_count();
    let pet = CodeRef::new(url("pet.gts"), "Pet");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let lookup = lookup.clone();
            let pet = pet.clone();
            tokio::spawn(async move { lookup.lookup_definition(&pet, None).await })
        })
        .collect();
    let started = Instant::now();
    for task in tasks {
        task.await.context("lookup task failed")??;
    }
    let renders = renderer.prerender_count() - before;
    outln!("  8 lookups answered in {:?} with {renders} prerender", started.elapsed())?;
    ensure!(renders == 1, "concurrent lookups of one module must coalesce, saw {renders} renders");

    step("4. invalidating person.gts takes its consumers with it")?;
    for m in ["person.gts", "invoice.gts"] {
        lookup.get_module_entry(&url(m), None).await?;
    }
    let list = lookup.invalidate(&url("person.gts")).await?;
    outln!("  invalidated {} URLs:", list.len())?;
    for item in &list {
        outln!("    {}", item.strip_prefix(REALM).unwrap_or(item))?;
    }
    for consumer in ["contact.gts", "pet.gts"] {
        ensure!(list.contains(&url(consumer)), "{consumer} depends on person and must go");
        ensure!(
            lookup.get_cached_entry(&url(consumer), None).await?.is_none(),
            "{consumer} still cached"
        );
    }
    ensure!(!list.contains(&url("invoice.gts")), "invoice does not depend on person");
    ensure!(
        lookup.get_cached_entry(&url("invoice.gts"), None).await?.is_some(),
        "invoice stays cached"
    );
    outln!("  invoice.gts, which does not import person, is still cached")?;

    step("5. edit a module, invalidate it, look it up again")?;
    write(
        &realm_dir.join("person.gts"),
        "import { CardDef } from 'https://cardstack.com/base/card-api';\n\
         export class Person extends CardDef {}\nexport class Employee extends Person {}\n",
    )?;
    outln!("  person.gts now also exports Employee")?;
    lookup.invalidate(&url("person.gts")).await?;
    let employee = lookup.lookup_definition(&CodeRef::new(url("person"), "Employee"), None).await?;
    outln!("  lookup person/Employee -> {employee}")?;

    step("6. a broken import is an error entry, and it recovers when fixed")?;
    let report = CodeRef::new(url("report.gts"), "render");
    match lookup.lookup_definition(&report, None).await {
        Ok(_) => anyhow::bail!("report.gts imports a missing module and must fail"),
        Err(error) => outln!("  lookup report/render -> error: {error}")?,
    }
    write(&realm_dir.join("chart.gts"), "export class Chart {}\n")?;
    let list = lookup.invalidate(&url("chart.gts")).await?;
    ensure!(list.contains(&url("report.gts")), "the errored report depends on chart");
    let fixed = lookup.lookup_definition(&report, None).await?;
    outln!("  after adding chart.gts and invalidating it: report/render -> {fixed}")?;

    outln!(
        "\ndone: {} prerenders in all; the temporary files are removed",
        renderer.prerender_count()
    )?;
    Ok(())
}

fn write(path: &Path, source: &str) -> Result<()> {
    std::fs::write(path, source).with_context(|| format!("cannot write {}", path.display()))
}

async fn timed<F: std::future::Future>(future: F) -> (F::Output, Duration) {
    let start = Instant::now();
    let out = future.await;
    (out, start.elapsed())
}
