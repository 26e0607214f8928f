//! Every statement the adapter sends reads only the rows it is about: its cost follows them,
//! not the size of the table or of the realm (`DATABASE_URL`; `cargo xtask test-pg` provides
//! one).
//!
//! Each statement runs (in a transaction rolled back) twice: with the plan the server keeps
//! for a prepared statement after its first runs (the generic plan, parameters unknown) and
//! one name, and with a plan made for the values at hand (custom, as for an unnamed
//! statement) and 50 names; an invalidation's statements run with the invalidation's own
//! settings, which force the generic plan in both runs, as in use. The tables hold 8 000
//! rows, a quarter in the realm the statements are about and the rest in 3 000 small realms
//! (and 2 000 realms' rows).
//! Its plan's counters say how many rows each scan read and threw away: a statement that
//! finds its rows by a realm's index and filters the rest, or scans the table, throws away
//! thousands. A plan for 50 constant names may rightly read the realm's rows and look each
//! up in the names hashed, linear in the rows; a search of an array per row is not. The few
//! statements that read a whole table or a whole realm by design are listed.

use serde_json::Value;
use tokio_postgres::NoTls;
use tokio_postgres::types::Type;

use super::{SCHEMA, Sql, Stmt};
use crate::{PgAdapter, PgConfig, guard};

/// Statements that scan a table by design, and the table.
const WHOLE_TABLE: &[(&str, &str)] = &[
    // Deletes every row.
    ("delete_all", "modules"),
    // Counts every row.
    ("row_count", "modules"),
    // Reads every realm's row: one per realm.
    ("log_since", "modules_guard_realm"),
];

/// Statements that read all of a realm's rows by design (through its index, throwing none
/// away), and the table.
const WHOLE_REALM: &[(&str, &str)] = &[
    // Deletes the realm's rows.
    ("delete_realm", "modules"),
    // Reads the realm's rows, for a large fan-out's walk.
    ("realm_graph", "modules"),
    // Reads the realm's rows and keeps those named (so it may also throw the others away):
    // sent only after the closure read them all (`REALM_GRAPH`), for a fan-out that names a
    // large part of them.
    ("delete_in_realm", "modules"),
    // The same against the names, without the guard.
    ("delete_named_in_realm", "modules"),
    // Reads the realm's rows and deletes all but those of the URLs given (the rows spared):
    // for a fan-out that names most of them.
    ("delete_realm_but", "modules"),
];

/// Statements sent in an invalidation's transaction, after `guard::SETTINGS` (or the lock
/// statement, which applies them too).
const INVALIDATION: &[&str] = &[
    "open_realm",
    "open_realm_leaf",
    "open_global",
    "leaf",
    "leaf_tail",
    "consumers",
    "consumers_limited",
    "realm_graph",
    "record_modules",
    "prune",
    "record_clear",
    "delete_modules",
    "delete_by_hash",
    "delete_by_alias",
    "delete_in_realm",
    "delete_named_in_realm",
    "delete_realm_but",
    "delete_realm",
    "delete_all",
    "notify_all",
    "notify_seq",
    "notify_seq_one",
];

/// The tables whose scans are checked.
const TABLES: &[&str] = &["modules", "modules_guard_log", "modules_guard_realm"];

/// How many rows one scan may read and throw away: a few, never a realm's (2 000 here).
const MAX_DISCARDED: i64 = 20;

/// How many rows one scan may read in all: the statements are about one name, or 50 of which
/// one is a row's, and the oldest 64 log entries of a realm (the prune); never a realm's rows,
/// which a scan may return to a join that throws them away.
const MAX_READ: i64 = 100;

/// A literal of `kind`, for `EXECUTE`. `wide`: an array of 50 names, one of a row in the
/// realm `r1` (2 000 rows), the rest of nothing, as a large fan-out names many rows gone.
fn literal(kind: &Type, wide: bool) -> String {
    match *kind {
        Type::TEXT => "'http://plans.test/r1/'".into(),
        Type::TEXT_ARRAY if wide => {
            let names: Vec<String> = std::iter::once("'http://plans.test/r1/m1.gts'".to_owned())
                .chain((0..49).map(|i| format!("'http://plans.test/r1/gone{i}.gts'")))
                .collect();
            format!("ARRAY[{}]::text[]", names.join(", "))
        }
        Type::TEXT_ARRAY => "ARRAY['http://plans.test/r1/m1.gts']::text[]".into(),
        // A number near the newest: a stamp or a mark is, in use.
        Type::INT8 => "7990::bigint".into(),
        Type::INT4 => "1".into(),
        Type::FLOAT8 => "600::float8".into(),
        Type::JSONB => "'[]'::jsonb".into(),
        Type::INT8_ARRAY => "ARRAY[1]::bigint[]".into(),
        ref other => panic!("no literal for parameters of type {other}"),
    }
}

/// The arguments of statement `name`: a literal per type, except where a statement's text
/// parameters are a row's scope and user (or its URL), which get values rows have (a value
/// no row has lets the planner expect nothing and read anything).
fn arguments(name: &str, types: &[Type], wide: bool) -> Vec<String> {
    let mut args: Vec<String> = types.iter().map(|kind| literal(kind, wide)).collect();
    let (scope, user) = match name {
        // Names nobody consumes (m1999: rows depend on m(i/2) up to m1000), and their hashes,
        // so that the check passes and the record and the DELETE run too.
        "leaf_tail" => {
            let names: Vec<String> = std::iter::once("http://plans.test/r1/m1999.gts".to_owned())
                .chain(
                    (0..if wide { 49 } else { 0 })
                        .map(|i| format!("http://plans.test/r1/gone{i}.gts")),
                )
                .collect();
            let quoted = |f: &dyn Fn(&str) -> String| {
                names.iter().map(|n| f(n)).collect::<Vec<_>>().join(", ")
            };
            args[1] = format!("ARRAY[{}]::text[]", quoted(&|n| format!("'{n}'")));
            args[2] = format!("ARRAY[{}]::text[]", quoted(&|n| format!("md5('{n}')")));
            return args;
        }
        "read_row" | "read_batch" => (1, 2),
        "plain_upsert" | "guarded_insert" => {
            args[0] = "'http://plans.test/r1/m1.gts'".into();
            (1, 2)
        }
        _ => return args,
    };
    args[scope] = "'public'".into();
    args[user] = "''".into();
    args
}

/// One plan node, as far as the test looks.
struct Node {
    kind: String,
    relation: String,
    /// Rows read and thrown away by a filter or a recheck.
    discarded: i64,
    /// Rows read in all: returned or thrown away, over every loop.
    read: i64,
    /// A subplan run again for each row of its parent (not hashed): a search as long as its
    /// result, per row.
    rerun_subplan: bool,
    /// Its filter looks rows up in an array of constants, which Postgres hashes (from nine
    /// values): linear in the rows, what a plan made for many values may rightly prefer to
    /// an index probe per value.
    hashed_constants: bool,
}

/// Every plan node, depth first.
fn nodes(plan: &Value, out: &mut Vec<Node>) {
    let field = |name: &str| plan.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
    let count = |name: &str| plan.get(name).and_then(Value::as_i64).unwrap_or_default();
    let rows = |name: &str| {
        let value = plan.get(name);
        value.and_then(Value::as_f64).map_or(0, |rows| rows.round() as i64)
    };
    // Per-loop averages, as EXPLAIN prints them.
    let discarded = count("Rows Removed by Filter") + count("Rows Removed by Index Recheck");
    out.push(Node {
        kind: field("Node Type"),
        relation: field("Relation Name"),
        discarded,
        // Counts are decimals from Postgres 18 on.
        read: (rows("Actual Rows") + discarded) * count("Actual Loops").max(1),
        rerun_subplan: field("Parent Relationship") == "SubPlan" && count("Actual Loops") > 1,
        hashed_constants: field("Filter").contains("= ANY ('{"),
    });
    for child in plan.get("Plans").and_then(Value::as_array).into_iter().flatten() {
        nodes(child, out);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_statement_reads_only_its_rows() {
    let Some(url) = behaviour_suite::database_url("statement plans") else { return };
    let schema = behaviour_suite::unique_name("plans");
    PgAdapter::connect(PgConfig::new(url.clone()).schema(schema.clone()))
        .await
        .expect("create the schema");
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    // Enough rows that the statistics describe a table in use, and realms of unequal sizes:
    // the statements run on `r1`, a large one (2 000 rows), among 3 000 small ones (2 rows
    // each). A generic plan is made for the average realm, which here is small: a plan that
    // would read "the realm's few rows" reads all of r1's.
    client
        .batch_execute(&format!(
            "INSERT INTO {schema}.modules (url, cache_scope, auth_user_id, resolved_realm_url, \
                 definitions, deps, created_at, file_alias) \
             SELECT realm || 'm' || i || '.gts', 'public', '', realm, '{{}}', \
                 jsonb_build_array(realm || 'm' || (i / 2) || '.gts'), 0, realm || 'm' || i \
             FROM generate_series(1, 8000) AS i, LATERAL (SELECT CASE WHEN i <= 2000 \
                 THEN 'http://plans.test/r1/' \
                 ELSE 'http://plans.test/s' || (i % 3000) || '/' END) AS r(realm); \
             INSERT INTO {schema}.modules_guard_log (realm, seq, urls) \
             SELECT realm, i, ARRAY[realm || 'm' || i || '.gts'] \
             FROM generate_series(1, 8000) AS i, LATERAL (SELECT CASE WHEN i % 4 = 1 \
                 THEN 'http://plans.test/r1/' \
                 ELSE 'http://plans.test/s' || (i % 300) || '/' END) AS r(realm); \
             INSERT INTO {schema}.modules_guard_realm (realm, latest) \
             SELECT 'http://plans.test/r' || i || '/', 4000 FROM generate_series(0, 1999) AS i; \
             ANALYZE {schema}.modules, {schema}.modules_guard_log, {schema}.modules_guard_realm; \
             SELECT nextval('{schema}.modules_guard_seq')"
        ))
        .await
        .expect("fill the tables");

    let sql = Sql::new(Some(&schema), false, "diagnostics");
    let log_since = Stmt::unlisted(
        guard::LOG_SINCE.replace(SCHEMA, &format!("{schema}.")),
        vec![Type::TEXT_ARRAY, Type::INT8_ARRAY, Type::INT8],
    );
    let mut statements = sql.named();
    statements.push(("log_since", &log_since));
    let mut wasteful = Vec::new();
    let mut checked = 0;
    // The plan of a statement prepared long ago (generic) with one name, and the plan made
    // for the values at hand (custom) with many.
    let passes = [("force_generic_plan", false), ("force_custom_plan", true)];
    for (pass, (mode, wide)) in passes.into_iter().enumerate() {
        client.batch_execute(&format!("SET plan_cache_mode = {mode}")).await.expect("set mode");
        for (index, (name, statement)) in statements.iter().enumerate() {
            // Commands without a plan.
            if matches!(*name, "begin" | "commit") {
                continue;
            }
            let types: Vec<String> = statement.types.iter().map(ToString::to_string).collect();
            let args = arguments(name, &statement.types, wide);
            // A module's own invalidation runs with fewer settings when no prune is due, and
            // the generic plan a connection keeps is made under whichever came first: each set
            // gets a statement of its own, planned under it.
            let settings: &[Option<&str>] = match *name {
                "leaf_tail" => &[Some(&sql.settings.text), Some(guard::LEAF_SETTINGS)],
                _ if INVALIDATION.contains(name) => &[Some(&sql.settings.text)],
                _ => &[None],
            };
            let mut found = Vec::new();
            for (set, settings) in settings.iter().enumerate() {
                let prepared = format!("p{pass}_{index}_{set}");
                let prepare = if types.is_empty() {
                    format!("PREPARE {prepared} AS {}", statement.text)
                } else {
                    format!("PREPARE {prepared} ({}) AS {}", types.join(", "), statement.text)
                };
                client.batch_execute(&prepare).await.unwrap_or_else(|e| panic!("{name}: {e:?}"));
                let execute = if args.is_empty() {
                    format!("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {prepared}")
                } else {
                    format!(
                        "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {prepared} ({})",
                        args.join(", ")
                    )
                };
                client.batch_execute("BEGIN").await.expect("begin");
                if let Some(settings) = settings {
                    client.batch_execute(settings).await.expect("settings");
                }
                let rows = client.query(&execute, &[]).await;
                let rows = rows.unwrap_or_else(|e| panic!("{name}: {e:?}"));
                client.batch_execute("ROLLBACK").await.expect("roll back");
                let explained: Value = rows[0].get(0);
                nodes(&explained[0]["Plan"], &mut found);
            }
            checked += 1;
            for node in found {
                if node.rerun_subplan {
                    wasteful.push(format!("{name} ({mode}): a {} subplan runs per row", node.kind));
                }
                let relation = node.relation.as_str();
                if !TABLES.contains(&relation) || WHOLE_TABLE.contains(&(*name, relation)) {
                    continue;
                }
                let wide_and_hashed = wide && node.hashed_constants;
                // The prune reads its batch of oldest entries whether or not they are old enough.
                let may_discard = match *name {
                    "prune" => guard::PRUNE_BATCH,
                    "delete_in_realm" | "delete_named_in_realm" | "delete_realm_but" => i64::MAX,
                    _ => MAX_DISCARDED,
                };
                if node.kind == "Seq Scan" || (node.discarded > may_discard && !wide_and_hashed) {
                    wasteful.push(format!(
                        "{name} ({mode}): {} on {relation} threw {} rows away",
                        node.kind, node.discarded
                    ));
                } else if node.read > MAX_READ
                    && !wide_and_hashed
                    && !WHOLE_REALM.contains(&(*name, relation))
                {
                    wasteful.push(format!(
                        "{name} ({mode}): {} on {relation} read {} rows",
                        node.kind, node.read
                    ));
                }
            }
        }
    }
    assert!(checked >= 40, "only {checked} statements checked");
    assert!(wasteful.is_empty(), "statements reading more than their rows: {wasteful:#?}");
    client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.ok();
}
