//! End-to-end tests of the `deflookup-bench` binary on the Postgres of `DATABASE_URL` (with the
//! PgBouncer and TLS cluster of `cargo xtask test-pg` when it provides them).

use std::process::{Command, Output};

use serde_json::Value;

/// The binary with `args`, its environment free of `DATABASE_URL` and `RUST_LOG`.
fn bench(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_deflookup-bench"));
    command.args(args).env_remove("DATABASE_URL").env_remove("RUST_LOG");
    command.output().expect("deflookup-bench runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Every key of the bench summary, each either a number or listed in `not_measured`.
const BENCH_KEYS: [&str; 40] = [
    "bare_select_p50_us",
    "hit_p50_us",
    "hit_ratio",
    "bare_notify_p50_us",
    "propagation_p50_us",
    "propagation_p99_us",
    "propagation_ratio",
    "fanout_10k_ms",
    "fanout_naive_10k_ms",
    "fanout_speedup",
    "coalesce_1000_prerenders",
    "generation_state_bytes_after_1m_invalidations",
    "l1_hit_p50_us",
    "sqlite_hit_p50_us",
    "sqlite_miss_p50_us",
    "propagation_applied_before_return_fraction",
    "propagation_after_return_p50_us",
    "propagation_after_return_p99_us",
    "miss_p50_us",
    "coordinated_miss_p50_us",
    "populate_miss_overhead_us",
    "hit_unnamed_p50_us",
    "hit_unnamed_ratio",
    "hit_pgbouncer_p50_us",
    "hit_tls_p50_us",
    "connect_plain_p50_ms",
    "connect_tls_p50_ms",
    "scan_20k_exports_ms",
    "scan_40k_exports_ms",
    "scan_doubling_ratio",
    "scan_40k_imports_ms",
    "durable_floor_p50_us",
    "durable_floor_one_row_p50_us",
    "propagation_vs_durable_ratio",
    "invalidate_round_trips",
    "invalidate_round_trips_by_delay",
    "invalidate_with_consumer_round_trips",
    "durable_floor_round_trips",
    "fanout_floor_10k_ms",
    "fanout_vs_floor_ratio",
];

#[test]
fn bench_quick_writes_a_summary_with_every_key() {
    // The run works in a schema and on channels of its own, and drops them at the end.
    let Some(db) = behaviour_suite::database_url("bench_quick_writes_a_summary") else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("bench").join("summary.json");
    let out_arg = out.display().to_string();
    let mut args = vec!["--db", &db, "--quick", "--scale", "0.01", "--out", &out_arg];
    // The connection-mode figures need the PgBouncer and the TLS cluster of xtask.
    let bouncer =
        behaviour_suite::xtask_setting("bench_quick_writes_a_summary", "DEFLOOKUP_PGBOUNCER_URL")
            .map(|bouncer| {
                let mut bouncer = url::Url::parse(&bouncer).expect("a URL");
                bouncer.set_path(url::Url::parse(&db).expect("a URL").path());
                bouncer.to_string()
            });
    let tls = behaviour_suite::xtask_setting("bench_quick_writes_a_summary", "DEFLOOKUP_TLS_PORT")
        .map(|port| {
            let ca = std::env::var("DEFLOOKUP_TLS_CA").expect("set with DEFLOOKUP_TLS_PORT");
            format!(
                "postgres://postgres@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={ca}"
            )
        });
    if let (Some(bouncer), Some(tls)) = (&bouncer, &tls) {
        args.extend(["--pgbouncer-db", bouncer, "--tls-db", tls]);
    }
    let output = bench(&args);
    assert!(output.status.success(), "bench failed: {}", stderr(&output));
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("hit_ratio"), "the table is printed: {table}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("summary written"))
            .expect("the summary is JSON");
    let missing: Vec<&str> = summary["not_measured"]
        .as_array()
        .expect("not_measured is an array")
        .iter()
        .map(|entry| entry["key"].as_str().expect("a key"))
        .collect();
    for key in BENCH_KEYS {
        match summary.get(key) {
            Some(value) => {
                assert!(value.is_number(), "{key} is a number: {value}");
                assert!(!missing.contains(&key), "{key} is both measured and not");
            }
            None => assert!(missing.contains(&key), "{key} is neither measured nor explained"),
        }
    }
    if bouncer.is_some() && tls.is_some() {
        assert!(missing.is_empty(), "every key is measured: {missing:?}");
    }
    // Deterministic outcomes, unlike timings: a test may check them.
    assert_eq!(summary["coalesce_1000_prerenders"], 1.0);
    // Round trips are reported only when the flight count and the delay agree (a machine busy
    // enough to blur a 25 ms delay leaves them not measured); when reported, they are exact.
    // A module nobody consumes is one round trip; one with a consumer finds that out in the
    // first and takes a second transaction of two.
    let exact = [
        ("durable_floor_round_trips", 1.0),
        ("invalidate_round_trips", 1.0),
        ("invalidate_with_consumer_round_trips", 3.0),
    ];
    for (key, expected) in exact {
        if let Some(counted) = summary.get(key).and_then(Value::as_f64) {
            assert_eq!(counted, expected, "{key}");
        }
    }
    assert!(summary["server"]["fsync"].is_string(), "the server's settings are recorded");
    let plot = std::fs::read_to_string(out.with_file_name("propagation.svg")).expect("plot");
    assert!(plot.starts_with("<svg") && plot.matches("<polyline").count() == 2, "{plot}");
}

#[test]
fn bench_curves_write_every_curve_and_the_plot() {
    let Some(db) = behaviour_suite::database_url("bench_curves_write_every_curve") else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("scale.json");
    let out_arg = out.display().to_string();
    let output = bench(&["--db", &db, "--curves", "--quick", "--scale", "0.05", "--out", &out_arg]);
    assert!(output.status.success(), "bench failed: {}", stderr(&output));
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("invalidators") && table.contains("lookups"), "{table}");
    let curves: Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("curves written"))
            .expect("the curves are JSON");
    let loads = |curve: &str, key: &str| -> Vec<f64> {
        let points = curves[curve].as_array().unwrap_or_else(|| panic!("{curve} is an array"));
        points.iter().map(|point| point[key].as_f64().expect("a number")).collect()
    };
    assert_eq!(loads("listeners", "listeners"), [1.0, 10.0, 50.0]);
    assert_eq!(loads("invalidators", "invalidators"), [1.0, 4.0, 16.0]);
    assert_eq!(loads("lookups", "lookups"), [1.0, 8.0, 32.0]);
    for (curve, key) in [
        ("listeners", "propagation_p50_us"),
        ("listeners", "durable_floor_p50_us"),
        ("invalidators", "one_realm_per_s"),
        ("invalidators", "bare_durable_per_s"),
        ("lookups", "hits_per_s"),
    ] {
        assert!(loads(curve, key).iter().all(|v| *v > 0.0), "{curve}.{key} measured");
    }
    let plot = std::fs::read_to_string(out.with_file_name("scale.svg")).expect("plot");
    assert!(plot.starts_with("<svg") && plot.matches("<polyline").count() == 10, "{plot}");
}

#[test]
fn bench_needs_postgres() {
    let output = bench(&["--db", "sqlite::memory:"]);
    assert!(!output.status.success(), "expected failure, got success");
    let err = stderr(&output);
    assert_eq!(err.trim_end().lines().count(), 1, "one line on stderr, got {err:?}");
    assert!(err.contains("postgres"), "stderr {err:?} should mention postgres");
}
