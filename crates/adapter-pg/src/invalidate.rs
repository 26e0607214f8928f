//! One invalidation as one transaction in two round trips.
//!
//! 1. `BEGIN`; the realm's (or global) advisory lock, the invalidation's sequence number and
//!    the transaction's settings, in one statement (`guard::OPEN_REALM`); and, for a module
//!    fan-out, the consumer closure. The closure is its own statement, sent after the lock, so
//!    its snapshot is taken once the lock is held: every guarded persist that committed
//!    earlier is in it, and every later one waits for the lock and then sees this
//!    invalidation's record. A closure that turns out large (over 512 consumers) is finished
//!    from one scan of the realm's edges instead, at the cost of one more round trip.
//! 2. For a fan-out, `work_mem` back to the session's; the guard's record (with the prune),
//!    the DELETE, the NOTIFY payloads (one statement), and `COMMIT`.
//!
//! Within a flight every statement is written to the connection before any reply is awaited
//! (tokio-postgres sends a request on its future's first poll), so each flight costs one round
//! trip however many statements it holds. Each statement still runs on its own, in order, with
//! its own snapshot (READ COMMITTED); one that fails aborts the rest of the transaction.
//! Statements are few because each one costs the server a bind and an execution of its own
//! (about 15 µs each, measured), whatever it does.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use deadpool_postgres::Object;
use lookup_core::wire::encode_payloads;
use lookup_core::{ConsumerRow, Invalidation, fan_out};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::error::PgError;
use crate::guard;
use crate::sql::Sql;
use crate::store::{self, Checkout, query_error};

/// The consumer closure of names `$2` in realm `$1`, in one recursive query. Each step finds
/// rows whose deps contain a name with `@>`, which the GIN index on deps answers without
/// scanning the realm; UNION de-duplicates, so a dependency cycle ends.
macro_rules! consumers_sql {
    () => {
        "WITH RECURSIVE consumer(url, file_alias, deps) AS ( \
            SELECT m.url, m.file_alias, m.deps FROM unnest($2::text[]) AS v(name) \
            JOIN _S_modules m ON m.resolved_realm_url = $1 AND m.deps @> jsonb_build_array(v.name) \
          UNION \
            SELECT m.url, m.file_alias, m.deps FROM consumer c \
            CROSS JOIN LATERAL (VALUES (c.url), (c.file_alias)) AS x(name) \
            JOIN _S_modules m ON m.resolved_realm_url = $1 AND m.deps @> jsonb_build_array(x.name) \
        ) SELECT url, file_alias, deps FROM consumer"
    };
}

/// See [`consumers_sql`].
pub(crate) const CONSUMERS: &str = consumers_sql!();

/// [`CONSUMERS`], stopped after `$3` rows: a probe for a large fan-out.
pub(crate) const CONSUMERS_LIMITED: &str =
    concat!("SELECT * FROM (", consumers_sql!(), " LIMIT $3) AS limited");

/// Every row's edges in realm `$1`: for a large fan-out, one scan and a walk in memory beat
/// an index probe per name (measured on the bench's 10 000-module graph: 190 ms of probes,
/// a few ms for the scan).
pub(crate) const REALM_GRAPH: &str =
    "SELECT url, file_alias, deps FROM _S_modules WHERE resolved_realm_url = $1";

/// A closure that reaches this many consumers is finished from [`REALM_GRAPH`] instead.
const LARGE_FAN_OUT: i64 = 512;

/// A fan-out naming more than this many URLs is recorded for the durable guard as a clear of
/// its realm (one row) instead of one row per URL (measured: 20 000 guard rows take about
/// 250 ms to write). Conservative: loads of the realm stamped before it are refused and re-run,
/// not only those the fan-out covers.
const GUARD_PER_URL_LIMIT: usize = 2048;

/// The rows of realm `$1` named by `$2` (by alias) or whose URL's md5 is in `$3` (the rows'
/// `url_hash`, computed here: see [`url_hashes`]). Both arrays are parameters an index is
/// probed with, so the plan kept for the prepared statement is two index scans, one probe per
/// name. A large fan-out is sent unprepared instead (see [`run`]), planned for its values:
/// then the planner may rather read the realm's rows and look each up in the arrays, which it
/// hashes because they are constants.
///
/// The forms measured worse: `url_hash = ANY (SELECT md5(u) …)` is a subplan applied as a
/// filter to every row of the realm; `= ANY (ARRAY(SELECT md5(u) …))` leaves the planner free
/// to do the same with a linear search of the array per row (1.9 s for a fan-out of 10 000
/// names); two semi-joins are linear but cost 0.13 ms for one module's five names.
pub(crate) const DELETE_MODULES: &str = "WITH d AS (DELETE FROM _S_modules WHERE resolved_realm_url = $1 \
         AND (url_hash = ANY ($3::text[]) OR file_alias = ANY ($2::text[])) RETURNING 1) \
     SELECT count(*) FROM d";

/// The `url_hash` of each URL, as Postgres computes it (`md5(url)`: the lowercase hex digest
/// of its UTF-8 bytes).
pub(crate) fn url_hashes(urls: &[String]) -> Vec<String> {
    use md5::{Digest, Md5};
    use std::fmt::Write as _;
    urls.iter()
        .map(|url| {
            Md5::digest(url.as_bytes()).iter().fold(String::with_capacity(32), |mut hex, byte| {
                let _ = write!(hex, "{byte:02x}");
                hex
            })
        })
        .collect()
}

pub(crate) const DELETE_REALM: &str = "WITH d AS (DELETE FROM _S_modules WHERE resolved_realm_url = $1 \
     RETURNING 1) SELECT count(*) FROM d";
pub(crate) const DELETE_ALL: &str =
    "WITH d AS (DELETE FROM _S_modules RETURNING 1) SELECT count(*) FROM d";
pub(crate) const NOTIFY: &str = "SELECT pg_notify($1, $2)";
/// Every payload `$2` on channel `$1`, in order, in one statement.
pub(crate) const NOTIFY_ALL: &str = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p";

/// The rows of a consumer-closure query.
pub(crate) fn consumer_rows(rows: &[Row]) -> Result<Vec<ConsumerRow>, PgError> {
    rows.iter()
        .map(|row| {
            let url: String = row.get(0);
            let deps = store::string_list(row.get(2));
            let alias: Option<String> = row.get(1);
            Ok(ConsumerRow {
                file_alias: alias.unwrap_or_else(|| lookup_core::urls::file_alias(&url)),
                url,
                deps,
            })
        })
        .collect()
}

type Reply<'a> = Pin<Box<dyn Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 'a>>;

/// Awaits every reply of a flight. Each future is polled once, in order, before any is
/// polled again, so the requests reach the connection in that order.
async fn pipelined(mut flight: Vec<Reply<'_>>) -> Vec<Result<Vec<Row>, tokio_postgres::Error>> {
    let mut replies: Vec<Option<Result<Vec<Row>, tokio_postgres::Error>>> =
        flight.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (future, reply) in flight.iter_mut().zip(replies.iter_mut()) {
            if reply.is_none()
                && let Poll::Ready(done) = future.as_mut().poll(cx)
            {
                *reply = Some(done);
            }
        }
        if replies.iter().all(Option::is_some) { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    replies.into_iter().map(|reply| reply.expect("every reply is in")).collect()
}

/// The consumer closure of `names` in `realm`, outside an invalidation: in a transaction of
/// its own with the invalidation's settings (see `guard::SETTINGS`), in one round trip.
pub(crate) async fn closure(
    sql: &Sql,
    client: &deadpool_postgres::ClientWrapper,
    realm: &str,
    names: &[String],
) -> Result<Vec<ConsumerRow>, PgError> {
    let statements = [&sql.begin, &sql.settings, &sql.consumers, &sql.commit];
    sql.prepare(client, &statements).await.map_err(query_error("consumer closure"))?;
    let params: [&(dyn ToSql + Sync); 2] = [&realm, &names];
    let mut replies = pipelined(vec![
        Box::pin(sql.query(client, &sql.begin, &[])),
        Box::pin(sql.query(client, &sql.settings, &[])),
        Box::pin(sql.query(client, &sql.consumers, &params)),
        Box::pin(sql.query(client, &sql.commit, &[])),
    ])
    .await;
    if let Some((_, error)) = first_failure(&mut replies) {
        return Err(query_error("consumer closure")(error));
    }
    consumer_rows(&replies.swap_remove(2).unwrap_or_default())
}

/// The first failure of a flight (later statements only fail because of it), with its index.
fn first_failure(
    replies: &mut [Result<Vec<Row>, tokio_postgres::Error>],
) -> Option<(usize, tokio_postgres::Error)> {
    let index = replies.iter().position(Result::is_err)?;
    let failed = std::mem::replace(&mut replies[index], Ok(Vec::new()));
    failed.err().map(|error| (index, error))
}

/// What one transaction did.
pub(crate) struct Applied {
    /// What was deleted and broadcast: for a fan-out, the names asked for plus every consumer
    /// found under the lock, in fan-out order.
    pub(crate) effective: Invalidation,
    pub(crate) deleted: u64,
    pub(crate) payloads: usize,
}

/// Why a transaction failed.
pub(crate) enum Failure {
    /// The server refused a statement before or at the DELETE: nothing happened.
    Invalidation(PgError),
    /// At a NOTIFY or the COMMIT, or the connection broke during the second round trip:
    /// rolled back, or (a reply lost at COMMIT) maybe committed. Carries the fan-out the
    /// transaction was deleting, so a retry deletes (and reports) no less.
    Broadcast(PgError, Invalidation),
}

/// Settings of one transaction.
pub(crate) struct Plan<'a> {
    pub(crate) guarded: bool,
    /// `None`: no broadcast.
    pub(crate) notify: Option<(&'a str, &'a str)>,
    pub(crate) horizon_secs: f64,
}

/// Runs `request` as one transaction on `client` (see the module docs). For a module
/// invalidation, `urls` are the names to start from (a module's variants, or a whole fan-out
/// computed earlier); the closure under the lock adds their consumers.
pub(crate) async fn run(
    sql: &Sql,
    client: Object,
    request: &Invalidation,
    plan: &Plan<'_>,
) -> Result<Applied, Failure> {
    let before = |e| Failure::Invalidation(query_error("invalidate")(e));
    let tx = Checkout::new(client);
    let c = tx.client();
    let delete = match request {
        Invalidation::Modules { .. } => &sql.delete_modules,
        Invalidation::Realm { .. } => &sql.delete_realm,
        Invalidation::Global => &sql.delete_all,
    };
    let open = match request {
        Invalidation::Global => &sql.open_global,
        _ => &sql.open_realm,
    };
    // Every statement is prepared first (free once cached on the connection), so that a
    // fresh connection pays for preparing before it holds the realm's lock, not under it.
    let all = [
        &sql.begin,
        &sql.commit,
        &sql.realm_graph,
        &sql.settings,
        &sql.restore_work_mem,
        &sql.record_modules,
        &sql.record_clear,
        delete,
        &sql.notify_all,
        open,
        &sql.consumers_limited,
    ];
    sql.prepare(c, &all).await.map_err(before)?;

    // Flight 1: BEGIN, the lock with the number and the settings, the closure.
    let (realm, names): (&str, &[String]) = match request {
        Invalidation::Modules { realm_url, urls } => (realm_url, urls),
        Invalidation::Realm { realm_url } => (realm_url, &[]),
        Invalidation::Global => ("", &[]),
    };
    let realm_lock: [&(dyn ToSql + Sync); 3] =
        [&guard::LOCK_NS_REALM, &realm, &guard::LOCK_NS_GLOBAL];
    let global_lock: [&(dyn ToSql + Sync); 1] = [&guard::LOCK_NS_GLOBAL];
    let closure_params: [&(dyn ToSql + Sync); 3] = [&realm, &names, &LARGE_FAN_OUT];
    let is_modules = matches!(request, Invalidation::Modules { .. });
    let mut flight: Vec<Reply<'_>> = vec![Box::pin(sql.query(c, &sql.begin, &[]))];
    if plan.guarded {
        let params: &[&(dyn ToSql + Sync)] =
            if matches!(request, Invalidation::Global) { &global_lock } else { &realm_lock };
        flight.push(Box::pin(sql.query(c, open, params)));
    } else if is_modules {
        flight.push(Box::pin(sql.query(c, &sql.settings, &[])));
    }
    if is_modules {
        flight.push(Box::pin(sql.query(c, &sql.consumers_limited, &closure_params)));
    }
    let mut replies = pipelined(flight).await;
    if let Some((_, error)) = first_failure(&mut replies) {
        return Err(before(error));
    }
    // BEGIN, then the lock's reply: the number in its first column.
    let seq: Option<i64> = match replies.get(1).filter(|_| plan.guarded) {
        Some(Ok(rows)) => match rows.first() {
            Some(row) => Some(row.try_get(0).map_err(before)?),
            None => {
                return Err(Failure::Invalidation(PgError::Query {
                    operation: "invalidate",
                    source: "the lock statement returned no row".into(),
                }));
            }
        },
        _ => None,
    };
    let effective = match request {
        Invalidation::Modules { realm_url, urls } => {
            let mut rows = replies.pop().and_then(Result::ok).unwrap_or_default();
            if rows.len() as i64 >= LARGE_FAN_OUT {
                // Still under the lock, with a fresh snapshot: the whole realm's edges.
                rows = sql.query(c, &sql.realm_graph, &[&realm]).await.map_err(before)?;
            }
            // Walking from the names, rows that do not consume them are never reached.
            let consumers = consumer_rows(&rows).map_err(Failure::Invalidation)?;
            Invalidation::Modules {
                realm_url: realm_url.clone(),
                urls: fan_out(urls.clone(), consumers),
            }
        }
        other => other.clone(),
    };

    // Flight 2: record (with the prune), DELETE, NOTIFY, COMMIT.
    let list: &[String] = match &effective {
        Invalidation::Modules { urls, .. } => urls,
        _ => &[],
    };
    let per_url = is_modules && list.len() <= GUARD_PER_URL_LIMIT;
    let record = if per_url { &sql.record_modules } else { &sql.record_clear };
    let payloads = match plan.notify {
        Some((_, origin)) => encode_payloads(&effective, Some(origin), seq),
        None => Vec::new(),
    };
    let channel = plan.notify.map(|(channel, _)| channel).unwrap_or_default();
    let seq_value = seq.unwrap_or_default();
    let hashes = url_hashes(list);
    let modules_params: [&(dyn ToSql + Sync); 3] = [&realm, &list, &hashes];
    let record_modules_params: [&(dyn ToSql + Sync); 4] =
        [&realm, &list, &seq_value, &plan.horizon_secs];
    let realm_params: [&(dyn ToSql + Sync); 1] = [&realm];
    let record_clear_params: [&(dyn ToSql + Sync); 2] = [&realm, &seq_value];
    let notify_params: [&(dyn ToSql + Sync); 2] = [&channel, &payloads];
    let mut flight: Vec<Reply<'_>> = Vec::new();
    if is_modules {
        flight.push(Box::pin(sql.query(c, &sql.restore_work_mem, &[])));
    }
    if plan.guarded {
        let params: &[&(dyn ToSql + Sync)] =
            if per_url { &record_modules_params } else { &record_clear_params };
        flight.push(Box::pin(sql.query(c, record, params)));
    }
    let delete_index = flight.len();
    let delete_params: &[&(dyn ToSql + Sync)] = match &effective {
        Invalidation::Modules { .. } => &modules_params,
        Invalidation::Realm { .. } => &realm_params,
        Invalidation::Global => &[],
    };
    if list.len() as i64 > LARGE_FAN_OUT {
        // Planned for its values (see `DELETE_MODULES`).
        flight.push(Box::pin(sql.query_unprepared(c, delete, delete_params)));
    } else {
        flight.push(Box::pin(sql.query(c, delete, delete_params)));
    }
    if !payloads.is_empty() {
        flight.push(Box::pin(sql.query(c, &sql.notify_all, &notify_params)));
    }
    // NOTIFY is delivered at commit, so peers hear it if and only if the delete commits.
    flight.push(Box::pin(sql.query(c, &sql.commit, &[])));
    let mut replies = pipelined(flight).await;
    if let Some((index, error)) = first_failure(&mut replies) {
        // A broken connection says nothing about how far the server got (COMMIT may have
        // been sent): only a statement the server refused before the NOTIFYs means "nothing
        // happened".
        let refused_early = index <= delete_index && !error.is_closed();
        let error = query_error("invalidate")(error);
        return Err(if refused_early {
            Failure::Invalidation(error)
        } else {
            Failure::Broadcast(error, effective)
        });
    }
    let deleted = replies[delete_index]
        .as_ref()
        .ok()
        .and_then(|rows| rows.first())
        .map_or(0, |row| u64::try_from(row.get::<_, i64>(0)).unwrap_or(0));
    tx.finish();
    Ok(Applied { effective, deleted, payloads: payloads.len() })
}
