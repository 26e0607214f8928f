//! Every statement the adapter sends reads only the rows it is about: its cost follows them,
//! not the size of the table or of the realm (`DATABASE_URL`; `cargo xtask test-pg` provides
//! one).
//!
//! Each statement runs (in a transaction rolled back) with the plan the server uses for a
//! prepared statement after its first runs (the generic plan, parameters unknown), on tables
//! of 4 000 rows in 20 realms (and 2 000 realms' rows), and its plan's counters say how many rows each scan read and
//! threw away. A statement that finds its rows by a realm's index and filters the rest, or
//! scans the table, throws away hundreds. The few statements that read a whole table by
//! design are listed.

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

/// The tables whose scans are checked.
const TABLES: &[&str] = &["modules", "modules_guard_log", "modules_guard_realm"];

/// How many rows one scan may read and throw away: a few, never a realm's (200 here).
const MAX_DISCARDED: i64 = 20;

/// A literal of `kind`, for `EXECUTE` (the generic plan does not depend on it).
fn literal(kind: &Type) -> &'static str {
    match *kind {
        Type::TEXT => "'http://plans.test/r1/'",
        Type::TEXT_ARRAY => "ARRAY['http://plans.test/r1/m1.gts']::text[]",
        // A number near the newest: a stamp or a mark is, in use.
        Type::INT8 => "3990::bigint",
        Type::INT4 => "1",
        Type::FLOAT8 => "600::float8",
        Type::JSONB => "'[]'::jsonb",
        Type::INT8_ARRAY => "ARRAY[1]::bigint[]",
        ref other => panic!("no literal for parameters of type {other}"),
    }
}

/// Every plan node's (type, relation, rows discarded), depth first.
fn nodes(plan: &Value, out: &mut Vec<(String, String, i64)>) {
    let field = |name: &str| plan.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
    let count = |name: &str| plan.get(name).and_then(Value::as_i64).unwrap_or_default();
    let discarded = count("Rows Removed by Filter") + count("Rows Removed by Index Recheck");
    out.push((field("Node Type"), field("Relation Name"), discarded));
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
    // Enough rows, in several realms, that the statistics describe a table in use.
    client
        .batch_execute(&format!(
            "INSERT INTO {schema}.modules (url, cache_scope, auth_user_id, resolved_realm_url, \
                 definitions, deps, created_at, file_alias) \
             SELECT 'http://plans.test/r' || (i % 20) || '/m' || i || '.gts', 'public', '', \
                 'http://plans.test/r' || (i % 20) || '/', '{{}}', \
                 jsonb_build_array('http://plans.test/r' || (i % 20) || '/m' || (i / 2) || '.gts'), \
                 0, 'http://plans.test/r' || (i % 20) || '/m' || i \
             FROM generate_series(1, 4000) AS i; \
             INSERT INTO {schema}.modules_guard_log (realm, seq, urls) \
             SELECT 'http://plans.test/r' || (i % 20) || '/', i, \
                 ARRAY['http://plans.test/r' || (i % 20) || '/m' || i || '.gts'] \
             FROM generate_series(1, 4000) AS i; \
             INSERT INTO {schema}.modules_guard_realm (realm, latest) \
             SELECT 'http://plans.test/r' || i || '/', 4000 FROM generate_series(0, 1999) AS i; \
             ANALYZE {schema}.modules, {schema}.modules_guard_log, {schema}.modules_guard_realm; \
             SET plan_cache_mode = force_generic_plan"
        ))
        .await
        .expect("fill the tables");

    let sql = Sql::new(Some(&schema), false, "diagnostics");
    let log_since = Stmt {
        text: guard::LOG_SINCE.replace(SCHEMA, &format!("{schema}.")),
        types: vec![Type::TEXT_ARRAY, Type::INT8_ARRAY, Type::INT8],
    };
    let mut statements = sql.named();
    statements.push(("log_since", &log_since));
    let mut wasteful = Vec::new();
    let mut checked = 0;
    for (index, (name, statement)) in statements.into_iter().enumerate() {
        if matches!(statement.text.as_str(), "BEGIN" | "COMMIT") {
            continue;
        }
        let types: Vec<String> = statement.types.iter().map(ToString::to_string).collect();
        let args: Vec<&str> = statement.types.iter().map(literal).collect();
        let prepare = if types.is_empty() {
            format!("PREPARE p{index} AS {}", statement.text)
        } else {
            format!("PREPARE p{index} ({}) AS {}", types.join(", "), statement.text)
        };
        client.batch_execute(&prepare).await.unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let execute = if args.is_empty() {
            format!("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE p{index}")
        } else {
            format!("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE p{index} ({})", args.join(", "))
        };
        client.batch_execute("BEGIN").await.expect("begin");
        let rows = client.query(&execute, &[]).await.unwrap_or_else(|e| panic!("{name}: {e:?}"));
        client.batch_execute("ROLLBACK").await.expect("roll back");
        let explained: Value = rows[0].get(0);
        let mut found = Vec::new();
        nodes(&explained[0]["Plan"], &mut found);
        checked += 1;
        for (node, relation, discarded) in found {
            if !TABLES.contains(&relation.as_str())
                || WHOLE_TABLE.contains(&(name, relation.as_str()))
            {
                continue;
            }
            if node == "Seq Scan" || discarded > MAX_DISCARDED {
                wasteful.push(format!("{name}: {node} on {relation} threw {discarded} rows away"));
            }
        }
    }
    assert!(checked >= 20, "only {checked} statements checked");
    assert!(wasteful.is_empty(), "statements reading more than their rows: {wasteful:#?}");
    client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.ok();
}
