//! End-to-end tests of the `deflookup` binary on real files and real SQLite databases.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

const REALM: &str = "http://localhost:4201/app/";

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("realm")).expect("realm dir");
        let fixture = Fixture { dir };
        fixture.write("person.gts", "export class Person {}\n");
        fixture.write(
            "pet.gts",
            "import { Person } from './person';\nexport class Pet extends Person {}\n",
        );
        fixture.write("lonely.gts", "export const lonely = 1;\n");
        fixture.write("broken.gts", "import { X } from './nowhere';\nexport class Broken {}\n");
        fixture
    }

    fn write(&self, name: &str, source: &str) {
        std::fs::write(self.dir.path().join("realm").join(name), source).expect("write module");
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("cache.sqlite3")
    }

    /// Runs the binary with this fixture's database and realm before `args`.
    fn run(&self, args: &[&str]) -> Output {
        let realm = format!("{REALM}={}", self.dir.path().join("realm").display());
        let db = format!("sqlite://{}", self.db().display());
        deflookup(&[&["--db", &db, "--realm", &realm], args].concat())
    }

    fn json(&self, args: &[&str]) -> Value {
        let output = self.run(args);
        assert!(output.status.success(), "{args:?} failed: {}", stderr(&output));
        serde_json::from_slice(&output.stdout).expect("stdout is one JSON document")
    }
}

/// The binary with `args`, its environment free of the settings that would change its
/// defaults (`DATABASE_URL`, `RUST_LOG`).
fn deflookup_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_deflookup"));
    command.args(args).env_remove("DATABASE_URL").env_remove("RUST_LOG");
    command
}

fn deflookup(args: &[&str]) -> Output {
    deflookup_command(args).output().expect("deflookup runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A failure is a non-zero exit with exactly one line on stderr that contains `needle`.
fn assert_fails_with(output: &Output, needle: &str) {
    assert!(!output.status.success(), "expected failure, got success: {:?}", output.stdout);
    let err = stderr(output);
    assert_eq!(err.trim_end().lines().count(), 1, "one line on stderr, got {err:?}");
    assert!(err.contains(needle), "stderr {err:?} should mention {needle:?}");
    assert!(!err.contains("panicked"), "never a panic: {err}");
}

/// A usage error is clap's: exit code 2, the reason on the first line of stderr.
fn assert_usage_error(output: &Output, needle: &str) {
    assert_eq!(output.status.code(), Some(2), "usage errors exit with 2");
    let err = stderr(output);
    let first = err.lines().next().unwrap_or_default();
    assert!(first.contains(needle), "first line {first:?} should mention {needle:?}");
}

#[test]
fn demo_runs_and_narrates_every_step() {
    let output = deflookup(&["demo"]);
    assert!(output.status.success(), "demo failed: {}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    for step in [
        "1. cold lookup",
        "2. the same lookup",
        "3. eight concurrent",
        "4. invalidating",
        "5. edit",
        "6. a broken import",
        "done:",
    ] {
        assert!(text.contains(step), "demo output lacks {step:?}:\n{text}");
    }
    assert!(text.contains("with 1 prerender"), "coalescing reported:\n{text}");
}

#[test]
fn lookup_prerenders_once_then_hits_across_processes() {
    let f = Fixture::new();
    let first = f.json(&["lookup", "pet.gts", "Pet"]);
    assert_eq!(first["prerendered"], true);
    assert_eq!(first["definition"]["type"], "definition");
    assert_eq!(first["definition"]["extends"], "Person");
    assert_eq!(first["key"], format!("{REALM}pet/Pet"));

    let second = f.json(&["lookup", &format!("{REALM}pet"), "Pet"]);
    assert_eq!(second["prerendered"], false, "the second process hits the SQLite file");
    assert_eq!(second["definition"], first["definition"]);

    let entry = f.json(&["entry", "pet.gts"]);
    assert_eq!(entry["url"], format!("{REALM}pet.gts"));
    assert_eq!(entry["deps"], serde_json::json!([format!("{REALM}person")]));
    assert_eq!(entry["cache_scope"], "public");
    assert_eq!(entry["prerendered"], false);
}

#[test]
fn invalidate_lists_consumers_and_an_edit_is_then_served() {
    let f = Fixture::new();
    f.json(&["lookup", "pet.gts", "Pet"]);
    f.json(&["lookup", "person.gts", "Person"]);
    f.json(&["lookup", "lonely.gts", "lonely"]);
    let list = f.json(&["invalidate", "person.gts"]);
    let list: Vec<&str> =
        list.as_array().expect("array").iter().filter_map(Value::as_str).collect();
    assert!(list.contains(&format!("{REALM}pet.gts").as_str()), "{list:?}");
    assert!(!list.iter().any(|u| u.contains("lonely")), "{list:?}");

    f.write("person.gts", "export class Person {}\nexport class Employee extends Person {}\n");
    let employee = f.json(&["lookup", "person", "Employee"]);
    assert_eq!(employee["prerendered"], true);
    assert_eq!(f.json(&["lookup", "lonely.gts", "lonely"])["prerendered"], false);

    let cleared = f.json(&["clear-realm", REALM]);
    assert!(cleared["deleted"].as_u64().expect("count") >= 2, "{cleared}");
    assert_eq!(f.json(&["lookup", "lonely.gts", "lonely"])["prerendered"], true);
    assert_eq!(f.json(&["clear-all"])["deleted"], 1);
}

#[test]
fn missing_things_fail_with_one_line() {
    let f = Fixture::new();
    assert_fails_with(&f.run(&["lookup", "ghost.gts", "Ghost"]), "not found");
    assert_fails_with(&f.run(&["lookup", "person.gts", "Nobody"]), "definition not found");
    assert_fails_with(&f.run(&["lookup", "broken.gts", "Broken"]), "nowhere");
    assert_fails_with(
        &f.run(&["lookup", "https://other.test/x.gts", "X"]),
        "cannot determine realm",
    );
    // An errored module's entry is shown (it is what is cached), not an error.
    let entry = f.json(&["entry", "broken.gts"]);
    assert_eq!(entry["error"]["error"]["status"], 404);
}

#[test]
fn bad_input_is_a_clear_error() {
    let f = Fixture::new();
    assert_usage_error(&deflookup(&["--realm", "nodir", "demo"]), "URL=DIR");
    let noslash = deflookup(&["--realm", "http://x.test/noslash=/tmp", "demo"]);
    assert_usage_error(&noslash, "must end with '/'");
    assert_usage_error(&deflookup(&["lookup", "only-module"]), "required");
    assert_fails_with(&deflookup(&["--db", "mysql://x", "clear-all"]), "unsupported database URL");
    assert_fails_with(
        &deflookup(&["--db", "sqlite::memory:", "lookup", "x.gts", "X"]),
        "no --realm",
    );
    let missing_dir = format!("{REALM}={}", f.dir.path().join("absent").display());
    assert_fails_with(
        &deflookup(&["--db", "sqlite::memory:", "--realm", &missing_dir, "clear-all"]),
        "absent",
    );

    let corrupt = f.dir.path().join("corrupt.sqlite3");
    std::fs::write(&corrupt, "this is not a database, just text ".repeat(200)).expect("write");
    let db = format!("sqlite://{}", corrupt.display());
    assert_fails_with(&deflookup(&["--db", &db, "clear-all"]), &corrupt.display().to_string());

    let unwritable = Path::new("/proc/deflookup-cannot-write-here/cache.sqlite3");
    let db = format!("sqlite://{}", unwritable.display());
    assert_fails_with(&deflookup(&["--db", &db, "clear-all"]), &unwritable.display().to_string());
}

/// A fresh Postgres database for one test, from `DATABASE_URL` (skipped without it, failing
/// under CI): returns its URL.
fn fresh_pg_database(test: &str) -> Option<String> {
    let url = behaviour_suite::database_url(test)?;
    let name = behaviour_suite::unique_name("cli");
    // Before creating anything: a connection string that is no URL fails here.
    let fresh = with_database(&url, &name);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    runtime.block_on(async {
        let (client, connection) =
            adapter_pg::tokio_postgres::connect(&url, adapter_pg::tokio_postgres::NoTls)
                .await
                .expect("connect to DATABASE_URL");
        tokio::spawn(connection);
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create database");
    });
    Some(fresh)
}

/// `url` naming the database `name` instead of its own, everything else kept. URLs only: the
/// CLI's `--db` takes no `key=value` connection strings.
fn with_database(url: &str, name: &str) -> String {
    let mut url = url::Url::parse(url)
        .unwrap_or_else(|error| panic!("DATABASE_URL must be a postgres://… URL here: {error}"));
    url.set_path(&format!("/{name}"));
    url.into()
}

#[test]
fn fresh_database_urls_keep_host_port_user_and_query() {
    for (url, expected) in [
        ("postgres://u@h:5432", "postgres://u@h:5432/cli_1"),
        ("postgres://u@h:5432/", "postgres://u@h:5432/cli_1"),
        ("postgres://u@h/db?x=1", "postgres://u@h/cli_1?x=1"),
        ("postgresql://u:p@127.0.0.1:5544/postgres", "postgresql://u:p@127.0.0.1:5544/cli_1"),
    ] {
        assert_eq!(with_database(url, "cli_1"), expected, "{url}");
    }
}

impl Fixture {
    fn run_on(&self, db: &str, args: &[&str]) -> Output {
        let realm = format!("{REALM}={}", self.dir.path().join("realm").display());
        deflookup(&[&["--db", db, "--realm", &realm], args].concat())
    }

    fn json_on(&self, db: &str, args: &[&str]) -> Value {
        let output = self.run_on(db, args);
        assert!(output.status.success(), "{args:?} failed: {}", stderr(&output));
        serde_json::from_slice(&output.stdout).expect("stdout is one JSON document")
    }
}

#[test]
fn every_subcommand_works_on_postgres() {
    let Some(db) = fresh_pg_database("every_subcommand_works_on_postgres") else { return };
    let f = Fixture::new();
    assert_eq!(f.json_on(&db, &["lookup", "pet.gts", "Pet"])["prerendered"], true);
    assert_eq!(f.json_on(&db, &["lookup", "pet", "Pet"])["prerendered"], false);
    let entry = f.json_on(&db, &["entry", "pet.gts"]);
    assert_eq!(entry["deps"], serde_json::json!([format!("{REALM}person")]));
    f.json_on(&db, &["lookup", "lonely.gts", "lonely"]);
    let list = f.json_on(&db, &["invalidate", "person"]);
    assert!(list.as_array().expect("array").contains(&Value::from(format!("{REALM}pet.gts"))));
    assert_eq!(f.json_on(&db, &["lookup", "lonely.gts", "lonely"])["prerendered"], false);
    assert_eq!(f.json_on(&db, &["clear-realm", REALM])["deleted"], 1);
    f.json_on(&db, &["lookup", "lonely.gts", "lonely"]);
    assert_eq!(f.json_on(&db, &["clear-all"])["deleted"], 1);
    assert_fails_with(&f.run_on(&db, &["lookup", "ghost.gts", "Ghost"]), "not found");
    let wrong = db.replace("postgres://", "postgres://nobody:topsecret@");
    let output = f.run_on(&wrong, &["clear-all"]);
    assert!(!output.status.success());
    assert!(!stderr(&output).contains("topsecret"), "password leaked: {}", stderr(&output));
}

/// Reads `child`'s stream line by line until one contains `needle` (bounded by the child's
/// own lifetime: if it exits first, the test fails).
fn wait_for_line(reader: &mut impl std::io::BufRead, needle: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).expect("read child output");
        assert!(n > 0, "the process ended before printing {needle:?}");
        if line.contains(needle) {
            return line.clone();
        }
    }
}

#[test]
fn listen_prints_peers_invalidations_as_json_lines() {
    listen_prints_invalidations(&["listen"]);
}

#[test]
fn listen_serves_its_metrics_in_the_prometheus_format() {
    let Some(db) = fresh_pg_database("listen_metrics") else { return };
    let f = Fixture::new();
    f.json_on(&db, &["lookup", "pet.gts", "Pet"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut listener = Command::new(env!("CARGO_BIN_EXE_deflookup"))
        .args(["--db", &db, "listen", "--metrics-addr", &addr])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("listen starts");
    let mut out = std::io::BufReader::new(listener.stdout.take().expect("stdout"));
    wait_for_line(&mut out, "connected");
    f.json_on(&db, &["invalidate", "pet.gts"]);
    wait_for_line(&mut out, "module");
    let scrape = || -> String {
        use std::io::{Read as _, Write as _};
        let mut socket = std::net::TcpStream::connect(&addr).expect("the metrics endpoint");
        // Bounded: an endpoint that never closes the response fails the test, not hangs it.
        let limit = Some(std::time::Duration::from_secs(10));
        socket.set_read_timeout(limit).expect("read timeout");
        socket
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("request");
        let mut response = String::new();
        socket.read_to_string(&mut response).expect("response");
        response
    };
    let body = scrape();
    let _ = Command::new("kill").args(["-TERM", &listener.id().to_string()]).status();
    let status = listener.wait().expect("listen exits");
    assert!(status.success(), "SIGTERM ends listen cleanly: {status}");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let channel = "channel=\"module_cache_invalidated\"";
    assert!(body.contains(&format!("deflookup_listener_connected{{{channel}}} 1")), "{body}");
    assert!(
        body.contains(&format!(
            "deflookup_listener_invalidations_total{{{channel},kind=\"module\",replayed=\"false\"}} 1"
        )),
        "{body}"
    );
}

#[test]
fn listen_polling_the_log_prints_the_same_lines() {
    listen_prints_invalidations(&["listen", "--poll-ms", "20"]);
}

fn listen_prints_invalidations(command: &[&str]) {
    let Some(db) = fresh_pg_database("listen_prints_peers_invalidations") else { return };
    let f = Fixture::new();
    f.json_on(&db, &["lookup", "pet.gts", "Pet"]);
    let mut listener = Command::new(env!("CARGO_BIN_EXE_deflookup"))
        .args(["--db", &db])
        .args(command)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("listen starts");
    let mut out = std::io::BufReader::new(listener.stdout.take().expect("stdout"));
    assert_eq!(wait_for_line(&mut out, "connected").trim(), r#"{"event":"connected"}"#);
    f.json_on(&db, &["invalidate", "person.gts"]);
    let line = wait_for_line(&mut out, "module");
    let event: Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(event["realm"], REALM);
    assert!(
        event["urls"].as_array().expect("urls").contains(&Value::from(format!("{REALM}pet.gts")))
    );
    f.json_on(&db, &["clear-realm", REALM]);
    assert_eq!(
        wait_for_line(&mut out, "realm").trim(),
        format!(r#"{{"event":"realm","realm":"{REALM}"}}"#)
    );
    f.json_on(&db, &["clear-all"]);
    assert_eq!(wait_for_line(&mut out, "global").trim(), r#"{"event":"global"}"#);
    let _ = Command::new("kill").args(["-TERM", &listener.id().to_string()]).status();
    let status = listener.wait().expect("listen exits");
    assert!(status.success(), "SIGTERM ends listen cleanly: {status}");
}

#[test]
fn a_peers_invalidation_during_a_slow_render_is_not_persisted_stale() {
    let Some(db) = fresh_pg_database("peer_invalidation_during_render") else { return };
    let f = Fixture::new();
    f.write("pet.gts", "export class Pet {}\n");
    let realm = format!("{REALM}={}", f.dir.path().join("realm").display());
    // The render reads pet.gts, logs that it did, then takes three seconds to "finish".
    let mut slow = Command::new(env!("CARGO_BIN_EXE_deflookup"))
        .args([
            "--db",
            &db,
            "--realm",
            &realm,
            "--prerender-delay-ms",
            "3000",
            "lookup",
            "pet.gts",
            "Pet",
        ])
        .env("RUST_LOG", "deflookup=info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("slow lookup starts");
    let mut log = std::io::BufReader::new(slow.stderr.take().expect("stderr"));
    wait_for_line(&mut log, "prerendered (source read)");
    // The render has read the old source: edit it and invalidate from another process.
    f.write("pet.gts", "export class Animal {}\nexport class Pet extends Animal {}\n");
    f.json_on(&db, &["invalidate", "pet.gts"]);
    let output = slow.wait_with_output().expect("slow lookup ends");
    assert!(output.status.success(), "slow lookup failed");
    let answer: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(answer["definition"]["extends"], "Animal", "the discarded render re-ran on v2");
    let entry = f.json_on(&db, &["entry", "pet.gts"]);
    assert_eq!(entry["prerendered"], false);
    let key = format!("{REALM}pet/Pet");
    assert_eq!(entry["definitions"][&key]["extends"], "Animal", "no stale row was persisted");
}

/// Starts `n` lookups of one cold module together, each its own process; returns their
/// answers and the time from the first start to the last exit.
fn herd(f: &Fixture, db: &str, n: usize, extra: &[&str], module: &str) -> (Vec<Value>, Duration) {
    let (outputs, elapsed) = herd_outputs(f, db, n, "2000", extra, &["lookup", module, "Pet"]);
    let answers = outputs
        .iter()
        .map(|output| {
            assert!(output.status.success(), "a lookup failed: {}", stderr(output));
            serde_json::from_slice(&output.stdout).expect("JSON")
        })
        .collect();
    (answers, elapsed)
}

/// Runs `n` processes of `command` at once on the fixture's realm, each render taking
/// `delay_ms`; returns their outputs and the time from the first start to the last exit.
fn herd_outputs(
    f: &Fixture,
    db: &str,
    n: usize,
    delay_ms: &str,
    extra: &[&str],
    command: &[&str],
) -> (Vec<Output>, Duration) {
    let realm = format!("{REALM}={}", f.dir.path().join("realm").display());
    let started = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|_| {
            deflookup_command(&["--db", db, "--realm", &realm, "--prerender-delay-ms", delay_ms])
                // A stuck waiter gives up after 4 × 15 s instead of 4 × 180 s.
                .args(["--populate-timeout-secs", "15"])
                .args(extra)
                .args(command)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("lookup starts")
        })
        .collect();
    let outputs =
        children.into_iter().map(|child| child.wait_with_output().expect("ends")).collect();
    (outputs, started.elapsed())
}

fn prerendered(answers: &[Value]) -> usize {
    answers.iter().filter(|a| a["prerendered"] == true).count()
}

#[test]
fn coordinate_turns_a_herd_of_four_cold_lookups_into_one_prerender() {
    let Some(db) = fresh_pg_database("coordinate_herd") else { return };
    let f = Fixture::new();
    f.write("herd.gts", "export class Pet {}\n");
    f.write("control.gts", "export class Pet {}\n");
    // The schema exists before the herd starts, so the timing is the herd's alone.
    f.json_on(&db, &["clear-all"]);
    let (answers, elapsed) = herd(&f, &db, 4, &["--coordinate"], "herd.gts");
    assert_eq!(prerendered(&answers), 1, "one prerender for four processes: {answers:?}");
    assert!(answers.iter().all(|a| a["definition"] == answers[0]["definition"]));
    assert!(
        elapsed < Duration::from_millis(4000),
        "everyone is served by the one 2 s render, well within two: {elapsed:?}"
    );
    // The control: the same herd without coordination prerenders in several processes.
    let (answers, _) = herd(&f, &db, 4, &[], "control.gts");
    assert!(prerendered(&answers) >= 2, "without --coordinate the herd renders: {answers:?}");
}

#[test]
fn soak_worker_works_for_its_time_and_prints_one_summary_line() {
    let Some(db) = fresh_pg_database("soak_worker_summary") else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let realm_dir = dir.path().join("realm");
    std::fs::create_dir(&realm_dir).expect("realm dir");
    for i in 0..5 {
        let import = if i == 0 { String::new() } else { format!("import './m{}';\n", i - 1) };
        let source = format!("// version: 1\n{import}export class M{i} {{}}\n");
        std::fs::write(realm_dir.join(format!("m{i}.gts")), source).expect("write module");
    }
    let realm = format!("{REALM}={}", realm_dir.display());
    // It starts paused (the orchestrator's checkpoint): it acknowledges, and does nothing
    // until the pause file is gone.
    let control = tempfile::tempdir().expect("control dir");
    let (pause, ack) = (control.path().join("pause"), control.path().join("ack"));
    std::fs::write(&pause, "").expect("pause file");
    let args = ["--seconds", "3", "--seed", "3", "--modules", "5", "--jitter-ms", "5"];
    let worker = Command::new(env!("CARGO_BIN_EXE_deflookup"))
        .args(["--db", &db, "--realm", &realm, "soak-worker"])
        .args(args)
        .arg("--pause-file")
        .arg(&pause)
        .arg("--ack-file")
        .arg(&ack)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("soak-worker starts");
    wait_for_file(&ack, true);
    let sources = || -> Vec<String> {
        (0..5)
            .map(|i| std::fs::read_to_string(realm_dir.join(format!("m{i}.gts"))).unwrap())
            .collect()
    };
    let before = sources();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(sources(), before, "no edit while paused");
    std::fs::remove_file(&pause).expect("resume");
    wait_for_file(&ack, false);
    let output = worker.wait_with_output().expect("soak-worker ends");
    assert!(output.status.success(), "soak-worker failed: {}", stderr(&output));

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.lines().count(), 1, "one line on stdout: {stdout:?}");
    let summary: Value = serde_json::from_str(&stdout).expect("a JSON line");
    let keys: Vec<&str> = summary.as_object().expect("object").keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "lookups",
            "invalidations",
            "edits",
            "errors",
            "resyncs",
            "discarded_by_resync",
            "catch_ups",
            "replayed"
        ]
    );
    // No fault: its listener never reconnected.
    for key in ["resyncs", "discarded_by_resync", "catch_ups", "replayed"] {
        assert_eq!(summary[key], 0, "{summary}");
    }
    assert!(summary["lookups"].as_u64().expect("count") > 0, "{summary}");
    assert_eq!(summary["errors"], 0, "no faults, no errors: {summary} {}", stderr(&output));
    // Every edit raised its module's version and was followed by an invalidation.
    let edits = summary["edits"].as_u64().expect("count");
    assert!(summary["invalidations"].as_u64().expect("count") >= edits, "{summary}");
    let edited = (0..5)
        .filter(|i| {
            let source = std::fs::read_to_string(realm_dir.join(format!("m{i}.gts"))).unwrap();
            !source.starts_with("// version: 1\n")
        })
        .count();
    assert_eq!(edited > 0, edits > 0, "{summary}");
    // No lock or temporary file is left in the realm.
    assert_eq!(std::fs::read_dir(&realm_dir).expect("list").count(), 5);

    // The hidden subcommand is Postgres-only.
    let sqlite = format!("sqlite://{}", dir.path().join("x.sqlite3").display());
    let output = deflookup(&[
        "--db",
        &sqlite,
        "--realm",
        &realm,
        "soak-worker",
        "--seconds",
        "1",
        "--modules",
        "5",
    ]);
    assert_fails_with(&output, "needs a Postgres database");
}

/// Waits (bounded) until `path` exists, or no longer exists.
fn wait_for_file(path: &Path, present: bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while path.exists() != present {
        assert!(std::time::Instant::now() < deadline, "{} never became {present}", path.display());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn unsafe_is_a_documented_global_flag_and_soak_worker_is_hidden() {
    let help = deflookup(&["--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("--unsafe") && text.contains("soak"), "{text}");
    assert!(!text.contains("soak-worker"), "the worker is hidden: {text}");
    // --unsafe changes nothing on SQLite, which has no broadcast to turn off.
    let f = Fixture::new();
    let realm = format!("{REALM}={}", f.dir.path().join("realm").display());
    let db = format!("sqlite://{}", f.db().display());
    let output = deflookup(&["--unsafe", "--db", &db, "--realm", &realm, "lookup", "pet", "Pet"]);
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn bench_is_not_a_command_of_the_product() {
    // The benchmark is its own binary, `deflookup-bench` (crate `lookup-bench`).
    assert_usage_error(&deflookup(&["bench", "--db", "sqlite::memory:"]), "bench");
}

/// `fresh_pg_database`'s database through the PgBouncer of `cargo xtask test-pg`.
fn through_pgbouncer(test: &str, db: &str) -> Option<String> {
    let bouncer = behaviour_suite::xtask_setting(test, "DEFLOOKUP_PGBOUNCER_URL")?;
    let mut bouncer = url::Url::parse(&bouncer).expect("a URL");
    bouncer.set_path(url::Url::parse(db).expect("a URL").path());
    Some(bouncer.to_string())
}

#[test]
fn every_feature_works_through_pgbouncer_with_a_direct_listener() {
    let Some(db) = fresh_pg_database("pgbouncer") else { return };
    let Some(pooled) = through_pgbouncer("pgbouncer", &db) else { return };
    let f = Fixture::new();
    // A lookup listens while it renders; LISTEN cannot go through the pooler.
    assert_fails_with(&f.run_on(&pooled, &["lookup", "pet.gts", "Pet"]), "--listen-db");
    let listen = ["--listen-db", db.as_str()];
    let run = |args: &[&str]| f.json_on(&pooled, &[&listen[..], args].concat());
    assert_eq!(run(&["lookup", "pet.gts", "Pet"])["prerendered"], true);
    // Named prepared statements broke every command after the first: run several.
    for _ in 0..3 {
        assert_eq!(run(&["lookup", "pet", "Pet"])["prerendered"], false);
    }
    let list = run(&["invalidate", "person"]);
    assert!(list.as_array().expect("array").contains(&Value::from(format!("{REALM}pet.gts"))));
    assert_eq!(run(&["lookup", "pet.gts", "Pet"])["prerendered"], true);
    assert_eq!(run(&["clear-realm", REALM])["deleted"], 1);
    run(&["lookup", "lonely.gts", "lonely"]);
    assert_eq!(run(&["clear-all"])["deleted"], 1);
    // Populate coalescing through the pooler, the listener on the direct URL.
    f.write("herd.gts", "export class Pet {}\n");
    let (answers, _) = herd(&f, &pooled, 4, &["--coordinate", "--listen-db", &db], "herd.gts");
    assert_eq!(prerendered(&answers), 1, "one prerender for four processes: {answers:?}");
}

#[test]
fn listen_holds_one_backend() {
    let Some(db) = fresh_pg_database("listen_one_backend") else { return };
    let name = behaviour_suite::unique_name("listen");
    let mut url = url::Url::parse(&db).expect("a URL");
    url.query_pairs_mut().append_pair("application_name", &name);
    let mut listener = Command::new(env!("CARGO_BIN_EXE_deflookup"))
        .args(["--db", url.as_str(), "listen"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("listen starts");
    let mut out = std::io::BufReader::new(listener.stdout.take().expect("stdout"));
    // Printed once LISTEN is established: any pool connection would be open by then.
    wait_for_line(&mut out, "connected");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let backends: i64 = runtime.block_on(async {
        let (client, connection) =
            adapter_pg::tokio_postgres::connect(&db, adapter_pg::tokio_postgres::NoTls)
                .await
                .expect("connect");
        tokio::spawn(connection);
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&name],
            )
            .await
            .expect("count backends");
        row.get(0)
    });
    let _ = Command::new("kill").args(["-TERM", &listener.id().to_string()]).status();
    let status = listener.wait().expect("listen exits");
    assert!(status.success(), "SIGTERM ends listen cleanly: {status}");
    assert_eq!(backends, 1, "`listen` holds only its LISTEN connection");
}

#[test]
fn tls_problems_are_one_clear_line_and_a_verified_server_works() {
    let test = "tls_on_the_command_line";
    let Some(port) = behaviour_suite::xtask_setting(test, "DEFLOOKUP_TLS_PORT") else { return };
    let setting = |name| std::env::var(name).expect("set with DEFLOOKUP_TLS_PORT");
    let url = |host: &str, query: &str| {
        format!("postgres://postgres:n0tShown@{host}:{port}/postgres?{query}")
    };
    let ca = setting("DEFLOOKUP_TLS_CA");
    let f = Fixture::new();
    let cases = [
        (
            url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={}", setting("DEFLOOKUP_TLS_WRONG_CA")),
            ),
            "not trusted",
        ),
        (
            url("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}")),
            "does not match the host name",
        ),
        (url("localhost", "sslmode=disable"), "no encryption"),
        (
            url("localhost", "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"),
            "/nonexistent/ca.pem",
        ),
        (url("localhost", "sslmode=verify_full"), "verify-full"),
    ];
    for (db, needle) in &cases {
        let output = f.run_on(db, &["clear-all"]);
        assert_fails_with(&output, needle);
        assert!(!stderr(&output).contains("n0tShown"), "password leaked: {}", stderr(&output));
    }
    // verify-full against the right CA and name: every command works, the listener included.
    let good = url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}"));
    let schema_free = f.json_on(&good, &["clear-all"]);
    assert!(schema_free["deleted"].is_number());
    assert_eq!(f.json_on(&good, &["lookup", "lonely.gts", "lonely"])["prerendered"], true);
    assert_eq!(f.json_on(&good, &["lookup", "lonely.gts", "lonely"])["prerendered"], false);
    assert_eq!(f.json_on(&good, &["clear-all"])["deleted"], 1);
}

/// Runs the binary on the fixture with its stdout going to `stdout`.
fn run_with_stdout(f: &Fixture, stdout: std::process::Stdio, args: &[&str]) -> Output {
    let realm = format!("{REALM}={}", f.dir.path().join("realm").display());
    let db = format!("sqlite://{}", f.db().display());
    deflookup_command(&["--db", &db, "--realm", &realm])
        .args(args)
        .stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("deflookup runs")
}

#[test]
fn a_closed_stdout_ends_quietly_and_a_full_one_is_a_clear_error() {
    let f = Fixture::new();
    let commands: [&[&str]; 6] = [
        &["lookup", "pet.gts", "Pet"],
        &["entry", "pet.gts"],
        &["invalidate", "person.gts"],
        &["clear-realm", REALM],
        &["clear-all"],
        &["demo"],
    ];
    for args in commands {
        // A pipe whose reader is gone before the command writes: `deflookup … | head -0`.
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        let output = run_with_stdout(&f, writer.into(), args);
        assert!(output.status.success(), "{args:?}: a closed pipe ends quietly: {output:?}");
        assert_eq!(stderr(&output), "", "{args:?}: nothing to say about it");
        // A full device: the work is done, and the failure to report it is an error.
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
        let output = run_with_stdout(&f, full.into(), args);
        assert_fails_with(&output, "cannot write to stdout");
    }
}

#[test]
fn nested_realms_belong_to_the_longest_prefix_in_either_flag_order() {
    let f = Fixture::new();
    let outer = f.dir.path().join("realm");
    let inner = f.dir.path().join("inner");
    std::fs::create_dir(&inner).expect("inner realm");
    std::fs::write(inner.join("card.gts"), "export class Card {}\n").expect("write");
    let db = format!("sqlite://{}", f.db().display());
    let sub = format!("{REALM}sub/");
    let outer_flag = format!("{REALM}={}", outer.display());
    let inner_flag = format!("{sub}={}", inner.display());
    for (first, second) in [(&outer_flag, &inner_flag), (&inner_flag, &outer_flag)] {
        let run = |args: &[&str]| {
            let output =
                deflookup(&[&["--db", &db, "--realm", first, "--realm", second], args].concat());
            assert!(output.status.success(), "{args:?}: {}", stderr(&output));
            serde_json::from_slice::<Value>(&output.stdout).expect("JSON")
        };
        let card = format!("{sub}card.gts");
        assert_eq!(run(&["lookup", &card, "Card"])["prerendered"], true);
        assert_eq!(run(&["lookup", &card, "Card"])["prerendered"], false);
        // The row is the nested realm's: clearing it clears the row.
        assert_eq!(run(&["clear-realm", &sub])["deleted"], 1);
        assert_eq!(run(&["lookup", &card, "Card"])["prerendered"], true);
        run(&["clear-all"]);
    }
    // The same realm twice is an error, not "last one wins".
    let twice = deflookup(&[
        "--db",
        &db,
        "--realm",
        &outer_flag,
        "--realm",
        &format!("{REALM}={}", inner.display()),
        "clear-all",
    ]);
    assert_fails_with(&twice, "already registered");
    // A realm URL may contain `=`: it ends at its `/`.
    let with_equals = format!("http://localhost:4201/a=b/={}", outer.display());
    let output =
        deflookup(&["--db", &db, "--realm", &with_equals, "lookup", "person.gts", "Person"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let answer: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(answer["module"], "http://localhost:4201/a=b/person.gts");
}

#[test]
fn every_spelling_of_a_file_is_one_row_and_one_invalidation_reaches_it() {
    let f = Fixture::new();
    let spellings = [
        format!("{REALM}person.gts"),
        format!("{REALM}%70erson.gts"),
        format!("{REALM}/person.gts"),
    ];
    assert_eq!(f.json(&["lookup", &spellings[0], "Person"])["prerendered"], true);
    for spelling in &spellings {
        let answer = f.json(&["lookup", spelling, "Person"]);
        assert_eq!(answer["prerendered"], false, "{spelling} is the same row");
        assert_eq!(answer["module"], spellings[0].as_str());
    }
    f.write("person.gts", "export class Person {}\nexport class Employee {}\n");
    f.json(&["invalidate", "person.gts"]);
    for spelling in &spellings {
        assert_eq!(f.json(&["lookup", spelling, "Employee"])["definition"]["name"], "Employee");
    }
}

#[test]
fn small_edges_are_clear_errors_or_expected_behaviour() {
    let f = Fixture::new();
    // Logs to a pipe carry no colour codes.
    let realm = format!("{REALM}={}", f.dir.path().join("realm").display());
    let db = format!("sqlite://{}", f.db().display());
    let logged = Command::new(env!("CARGO_BIN_EXE_deflookup"))
        .args(["--db", &db, "--realm", &realm, "lookup", "pet.gts", "Pet"])
        .env("RUST_LOG", "debug")
        .env_remove("DATABASE_URL")
        .output()
        .expect("runs");
    assert!(logged.status.success());
    let log = stderr(&logged);
    assert!(log.contains("prerendered"), "debug logs are shown: {log}");
    assert!(!log.contains('\u{1b}'), "no ANSI escapes in a piped log: {log:?}");

    // An invalidation of a URL no realm owns is an error, as a lookup of it is.
    let foreign = "https://elsewhere.test/x.gts";
    assert_fails_with(&f.run(&["invalidate", foreign]), "cannot determine realm");
    assert_fails_with(&f.run(&["lookup", foreign, "X"]), "cannot determine realm");

    // A database file corrupted after it was opened fine: every error names the file.
    f.json(&["lookup", "person.gts", "Person"]);
    let mut bytes = std::fs::read(f.db()).expect("read the database");
    for byte in bytes.iter_mut().skip(2 * 4096 + 100) {
        *byte = byte.wrapping_mul(7).wrapping_add(13);
    }
    std::fs::write(f.db(), bytes).expect("corrupt the database");
    let path = f.db().display().to_string();
    for args in [&["lookup", "pet.gts", "Pet"][..], &["invalidate", "person.gts"], &["clear-all"]] {
        assert_fails_with(&f.run(args), &path);
    }
}

/// Starts a coordinated `lookup` of `module` with `RUST_LOG` set to `log`, its stderr piped.
fn coordinated_lookup(
    f: &Fixture,
    db: &str,
    module: &str,
    delay_ms: &str,
    log: &str,
) -> std::process::Child {
    let realm = format!("{REALM}={}", f.dir.path().join("realm").display());
    deflookup_command(&["--db", db, "--realm", &realm, "--coordinate"])
        .args(["--prerender-delay-ms", delay_ms])
        // A waiter that missed its take-over gives up after 4 × 15 s, not 4 × 180 s.
        .args(["--populate-timeout-secs", "15"])
        .args(["lookup", module, "Pet"])
        .env("RUST_LOG", log)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("lookup starts")
}

#[test]
fn a_waiter_takes_over_promptly_when_the_coordinated_winner_is_killed_or_stopped() {
    let Some(db) = fresh_pg_database("killed_winner") else { return };
    let f = Fixture::new();
    f.json_on(&db, &["clear-all"]);
    for (signal, bound) in [("KILL", Duration::from_secs(5)), ("TERM", Duration::from_secs(3))] {
        let module = format!("winner-{signal}.gts").to_lowercase();
        f.write(&module, "export class Pet {}\n");
        // A wins the lock and renders for a long time.
        let mut a = coordinated_lookup(&f, &db, &module, "60000", "adapter_pg=debug");
        let mut a_err = std::io::BufReader::new(a.stderr.take().expect("stderr"));
        wait_for_line(&mut a_err, "won the populate lock");
        // B loses and waits (180 s by default).
        let mut b = coordinated_lookup(&f, &db, &module, "0", "lookup_core=debug");
        let mut b_err = std::io::BufReader::new(b.stderr.take().expect("stderr"));
        wait_for_line(&mut b_err, "another process is populating this module");
        let died = Instant::now();
        let _ = Command::new("kill").args([&format!("-{signal}"), &a.id().to_string()]).status();
        let a_status = a.wait().expect("A exits");
        let mut b_out = String::new();
        std::io::Read::read_to_string(&mut b.stdout.take().expect("stdout"), &mut b_out)
            .expect("B's answer");
        let b_status = b.wait().expect("B exits");
        let took = died.elapsed();
        eprintln!("SIG{signal}: the waiter answered {took:?} after the winner was signalled");
        assert!(b_status.success(), "B answers itself");
        let answer: Value = serde_json::from_str(&b_out).expect("JSON");
        assert_eq!(answer["prerendered"], true, "B rendered in A's place");
        assert!(took < bound, "SIG{signal}: B answered {took:?} after, not its 180 s timeout");
        let mut b_log = String::new();
        std::io::Read::read_to_string(&mut b_err, &mut b_log).expect("B's stderr");
        let probed = b_log.contains("went away without announcing");
        if signal == "TERM" {
            // Asked to stop, A lets go of its lock and announces it, says so, and exits
            // non-zero: B is woken by the announcement, not by a probe.
            assert!(!a_status.success());
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut a_err, &mut rest).expect("A's stderr");
            assert!(rest.contains("interrupted by SIGTERM"), "{rest}");
            assert!(!probed, "B heard A's announcement: {b_log}");
        } else {
            assert!(probed, "a killed winner says nothing; B's probe took over: {b_log}");
        }
    }
}

#[test]
fn a_coordinated_herd_on_a_missing_module_all_get_not_found() {
    let Some(db) = fresh_pg_database("missing_herd") else { return };
    let f = Fixture::new();
    f.json_on(&db, &["clear-all"]);
    // Each render (a look for the file) takes a while, so the herd overlaps.
    let lookup = ["lookup", "ghost.gts", "Ghost"];
    let (outputs, took) = herd_outputs(&f, &db, 12, "300", &["--coordinate"], &lookup);
    for output in &outputs {
        // Every process gets the true answer; none gives up on the lock.
        assert_fails_with(output, "not found");
    }
    eprintln!("12 coordinated lookups of a missing module answered in {took:?}");
    assert!(took < Duration::from_secs(30), "promptly: {took:?}");
}

#[test]
fn links_out_of_a_realm_and_special_files_are_never_read() {
    let f = Fixture::new();
    let outside = f.dir.path().join("outside");
    std::fs::create_dir(&outside).expect("outside");
    std::fs::write(outside.join("secret.gts"), "export const secret = 1;\n").expect("write");
    let realm = f.dir.path().join("realm");
    std::os::unix::fs::symlink(outside.join("secret.gts"), realm.join("link.gts")).expect("link");
    std::os::unix::fs::symlink("/etc", realm.join("etc")).expect("link");
    // What exists outside and what does not answer alike: nothing is read or revealed.
    let existing = f.run(&["lookup", "link.gts", "secret"]);
    assert_fails_with(&existing, "not found");
    assert!(!stderr(&existing).contains("secret ="), "{}", stderr(&existing));
    assert_fails_with(&f.run(&["entry", "etc/passwd.gts"]), "not found");
    // A FIFO would hang a read: it is refused at once.
    let made = Command::new("mkfifo").arg(realm.join("fifo.gts")).status().expect("mkfifo");
    assert!(made.success());
    let started = Instant::now();
    assert_fails_with(&f.run(&["lookup", "fifo.gts", "X"]), "not a regular file");
    assert!(started.elapsed() < Duration::from_secs(10));
    // A module past the size limit is a clear module error.
    f.write("big.gts", &format!("export const big = 1;\n{}", "// padding\n".repeat(100)));
    assert_fails_with(
        &f.run(&["--max-module-bytes", "100", "lookup", "big.gts", "big"]),
        "100-byte limit",
    );
}
