//! One invalidation committed by one transaction: one round trip when its fan-out is known
//! before it starts; three when consumers must be found first (a first transaction that finds
//! them and commits nothing, then two flights), four past 512 consumers.
//!
//! - **One flight** (a realm or global clear; a module invalidation whose names nobody
//!   consumes): `BEGIN`; the realm's (or global) advisory lock, the invalidation's sequence
//!   number and the transaction's settings, in one statement (`guard::OPEN_REALM`); for a
//!   module, [`LEAF`], which checks under the lock that no row consumes the names and
//!   otherwise turns the writes off; the guard's record (and, for a module fan-out in a realm
//!   due for it, a prune of the realm's oldest log entries: `guard::PruneGate`), the DELETE, the
//!   NOTIFY payloads (one statement; the number, taken by the server in this flight, is put
//!   into the last payload by [`NOTIFY_SEQ`]); and `COMMIT`. With the guard, a module's check,
//!   record and DELETE are one statement ([`LEAF_TAIL`]), the prune (when due) after it: five
//!   statements in all where there were seven (six with the prune, four without a broadcast).
//! - **Then two flights**, in a second transaction, when [`LEAF`] found consumers (the first
//!   then committed nothing): `BEGIN`, the lock, the consumer closure (its own statement after the lock, so
//!   its snapshot is taken once the lock is held: every guarded persist that committed
//!   earlier is in it, and every later one waits for the lock and then sees this
//!   invalidation's record); then, once the fan-out is known, the record, the DELETE, the
//!   NOTIFY and `COMMIT`. A closure that turns out large (over 512 consumers) is finished from
//!   one scan of the realm's edges instead, at the cost of one more round trip.
//!
//! Within a flight every statement is written to the connection before any reply is awaited
//! (tokio-postgres sends a request on its future's first poll), so each flight costs one round
//! trip however many statements it holds. Each statement still runs on its own, in order, with
//! its own snapshot (READ COMMITTED); one that fails aborts the rest of the transaction.
//! Statements are few because each one costs the server a bind and an execution of its own
//! (6-15 µs each, measured), whatever it does.

use std::borrow::Cow;

use deadpool_postgres::Object;
use lookup_core::wire::encode_payloads;
use lookup_core::{ConsumerRow, Invalidation, RealmRows, fan_out, fan_out_over_realm};
use tokio_postgres::Row;
use tokio_postgres::types::{Json, ToSql};

use crate::error::PgError;
use crate::guard;
use crate::sql::{Answer, Flight, Sql, Stmt, pipelined};
use crate::store::{self, Checkout, query_error};

/// The rows whose deps contain the name `$name` (a column of the query around it), as `m`,
/// followed by a condition on their realm: `… WHERE m.resolved_realm_url = $1`.
///
/// The GIN index on deps answers `@>` without reading the realm. The subquery knows only the
/// name (`OFFSET 0` keeps the planner from merging the realm's condition into it), so that
/// the index is the only way to its rows: Postgres estimates that a name has 1% of the table
/// as consumers, and a plan kept for the prepared statement, made for an average realm,
/// would rather read the whole realm and match each row against the names (measured: 12 ms
/// for a module of a 10 000-row realm instead of 0.1 ms; the plan test, `sql/plans.rs`,
/// builds such a realm).
macro_rules! consumers_of {
    ($name:literal) => {
        concat!(
            " CROSS JOIN LATERAL (SELECT c.url, c.file_alias, c.deps, c.resolved_realm_url \
             FROM _S_modules c WHERE c.deps @> jsonb_build_array(",
            $name,
            ") OFFSET 0) AS m "
        )
    };
}

/// The consumer closure of names `$2` in realm `$1`, in one recursive query. Each step finds
/// the rows whose deps contain a name (see [`consumers_of`]); UNION de-duplicates, so a
/// dependency cycle ends.
macro_rules! consumers_sql {
    () => {
        concat!(
            "WITH RECURSIVE consumer(url, file_alias, deps) AS ( \
                SELECT m.url, m.file_alias, m.deps FROM unnest($2::text[]) AS v(name)",
            consumers_of!("v.name"),
            "WHERE m.resolved_realm_url = $1 \
              UNION \
                SELECT m.url, m.file_alias, m.deps FROM consumer p \
                CROSS JOIN LATERAL (VALUES (p.url), (p.file_alias)) AS x(name)",
            consumers_of!("x.name"),
            "WHERE m.resolved_realm_url = $1 \
            ) SELECT url, file_alias, deps FROM consumer"
        )
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

/// A DELETE of the rows of `_S_modules` that meet the conditions (concatenated), only while
/// `guard::apply!` is on. Its count is its command tag's (`Sql::answer`): counted by a query
/// around it (`WITH d AS (DELETE … RETURNING 1) SELECT count(*) FROM d`), every row deleted
/// would be written to a store of the query's results first, which the invalidation's small
/// `work_mem` sends to disk past a few thousand (measured: 3-4 ms of a 10 000-row DELETE).
macro_rules! delete_where {
    ($($condition:expr),+) => {
        concat!("DELETE FROM _S_modules WHERE ", $($condition,)+ " AND ", guard::apply!())
    };
}

/// Whether a fan-out of `names` in a realm of `rows` rows is deleted by reading the realm
/// ([`DELETE_IN_REALM`]) rather than by a probe per name: when the names are at least a
/// quarter of the rows (a probe of both indexes costs several times a row read and looked up
/// in the names hashed).
fn reads_realm(names: usize, rows: usize) -> bool {
    names.saturating_mul(4) >= rows
}

/// A fan-out naming more than this many URLs is recorded for the durable guard as a clear of
/// its realm (one row) instead of one row per URL (measured: 20 000 guard rows take about
/// 250 ms to write). Conservative: loads of the realm stamped before it are refused and re-run,
/// not only those the fan-out covers.
const GUARD_PER_URL_LIMIT: usize = 2048;

/// The rows of realm `$1` named by `$2` (by alias) or whose URL's md5 is in `$3` (the rows'
/// `url_hash`, computed here: see [`url_hashes`]), in one statement: for a fan-out of at most
/// [`FEW_NAMES`] names, such as a module's variants (its rows found by either index are
/// checked again against at most that many names). More names go through
/// [`DELETE_BY_HASH`] and [`DELETE_BY_ALIAS`]. Nothing when `guard::apply!` is off.
pub(crate) const DELETE_MODULES: &str =
    delete_where!(crate::sql::in_realm!(), named_by_hash_or_alias!());

/// [`DELETE_MODULES`]'s condition on the rows, after the realm's: named by an alias in `$2` or
/// a URL whose md5 is in `$3`.
macro_rules! named_by_hash_or_alias {
    () => {
        " AND (url_hash = ANY ($3::text[]) OR file_alias = ANY ($2::text[]))"
    };
}
use named_by_hash_or_alias;

/// A fan-out naming at most this many URLs is deleted by [`DELETE_MODULES`], one statement
/// (the one-flight invalidation of a module names its five variants).
const FEW_NAMES: usize = 16;

/// The rows of realm `$1` whose URL's md5 is in `$2` (the rows' `url_hash`, computed here:
/// see [`url_hashes`]); then [`DELETE_BY_ALIAS`] deletes those named by their alias. Each
/// array is a parameter the index is probed with, so the plan kept for the prepared statement
/// is an index probe per name, whatever the fan-out's size.
///
/// Two statements rather than one with `OR`: the alias index is a hash index, whose matches
/// Postgres checks again against the condition, and a generic plan searches a parameter array
/// linearly (it hashes only constants). In one statement, every row of the fan-out was so
/// checked against every name (measured: 1.5 s for a 10 000-module fan-out once its plan was
/// generic); run second, the alias DELETE checks again only rows the first left (its snapshot
/// no longer sees those), usually none, though it still probes every name and visits the
/// pages of the rows found (about a fifth of a 10 000-row DELETE: this path serves fan-outs
/// of fewer than 512 consumers).
///
/// The forms measured worse: `url_hash = ANY (SELECT md5(u) …)` is a subplan applied as a
/// filter to every row of the realm; `= ANY (ARRAY(SELECT md5(u) …))` leaves the planner free
/// to do the same with a linear search of the array per row (1.9 s for a fan-out of 10 000
/// names); two semi-joins are linear but cost 0.13 ms for one module's five names.
/// Nothing when `guard::apply!` is off.
pub(crate) const DELETE_BY_HASH: &str =
    delete_where!(crate::sql::in_realm!(), " AND url_hash = ANY ($2::text[])");

/// The rows of realm `$1` named by `$2` by their alias: see [`DELETE_BY_HASH`].
pub(crate) const DELETE_BY_ALIAS: &str =
    delete_where!(crate::sql::in_realm!(), " AND file_alias = ANY ($2::text[])");

/// The rows of realm `$1` whose URL is in `$2`, found by reading the realm's rows and looking
/// each URL up in `$2` hashed (a hashed subplan, built once): for a fan-out whose closure read
/// every row of the realm anyway ([`REALM_GRAPH`]), which gives the URLs of the rows to delete
/// ([`Rows::Read`]), and names a large part of them (see [`reads_realm`]), no more than half
/// (more: [`DELETE_REALM_BUT`]). Linear in the realm, and no hashes to compute and send:
/// probing 20 000 names instead costs more (measured when this statement deleted whole
/// realms: 40 ms to sort and probe the hashes alone, against 12 ms for the whole DELETE of
/// 10 000 rows).
///
/// The URLs of the rows rather than the fan-out's names, by URL or by alias: half the names
/// to hash and one lookup per row (measured on 10 000 rows: 14 ms instead of 17). `IS TRUE`
/// keeps the subplan a filter: as a join, its hash table would be held to the invalidation's
/// small `work_mem` and spill to disk (43-54 ms). Nothing when `guard::apply!` is off.
pub(crate) const DELETE_IN_REALM: &str =
    delete_where!("resolved_realm_url = $1 AND (url IN (SELECT unnest($2::text[]))) IS TRUE");

/// The rows of realm `$1` named by `$2` (by URL or by alias), found as [`DELETE_IN_REALM`]
/// finds its rows, for a fan-out without the guard, whose rows' URLs are not enough (see
/// [`Rows::Read`]): two hashed lookups per row, over every name. Nothing when `guard::apply!`
/// is off.
pub(crate) const DELETE_NAMED_IN_REALM: &str = delete_where!(
    "resolved_realm_url = $1 AND (url IN (SELECT unnest($2::text[])) \
     OR file_alias IN (SELECT unnest($2::text[])))"
);

/// The rows of realm `$1` except those whose URL is in `$2`, found as [`DELETE_IN_REALM`]
/// finds its rows: for a fan-out whose closure read every row of the realm and names most of
/// them ([`Rows::AllBut`]), which sends the URLs of the rows it spares rather than of those it
/// deletes (none, when a fan-out reaches the whole realm: 10 000 fewer URLs to send, decode
/// and hash). Exact while the guard holds the lock, and so only with the guard (as
/// [`Rows::Read`]). Nothing when `guard::apply!` is off.
pub(crate) const DELETE_REALM_BUT: &str =
    delete_where!("resolved_realm_url = $1 AND (url IN (SELECT unnest($2::text[]))) IS NOT TRUE");

/// [`LEAF`]'s query: its answer as `ok`.
macro_rules! leaf_sql {
    () => {
        concat!(
            "SELECT set_config('deflookup.apply', ((SELECT count(*) \
             FROM unnest($2::text[]) AS v(name)",
            consumers_of!("v.name"),
            "WHERE m.resolved_realm_url = $1) = 0)::text, true)::boolean AS ok"
        )
    };
}

/// Whether rows of realm `$1` consume any of the names `$2` (the closure's first step, under
/// the lock): when one does, turns the transaction's writes off and answers `false`. Counted
/// rather than `EXISTS` (or a count of a `LIMIT 1`), which the planner answers by scanning the
/// table in the hope of an early match (the plan test catches it); a count is the closure's
/// own join, a probe of the `deps` index per name, at the price of reading every direct
/// consumer of a module that has many.
pub(crate) const LEAF: &str = concat!("SELECT ok FROM (", leaf_sql!(), ") AS leaf");

/// The invalidation of a module whose names (`$2`, their hashes `$3`) are its fan-out unless
/// rows consume them, with the guard, in one statement after the lock: [`LEAF`], then, only
/// when no row consumes them, the record ([`guard::RECORD_MODULES`]) and the DELETE
/// ([`DELETE_MODULES`]). Answers the rows deleted and whether no row consumes the names; the
/// NOTIFY follows in its own statement, so that a failed broadcast is told apart from a
/// failed DELETE (see `PgAdapter`'s broadcast policy).
///
/// One statement instead of three: each statement costs the server a bind and an execution
/// and the client its own message and reply (7-8 µs each, measured), on the path every
/// invalidation of a module nobody consumes takes. The data-modifying parts all see the
/// statement's snapshot, taken after the lock as [`LEAF`]'s is, and each waits on the check
/// (a one-time filter: nothing is read when it fails). The check turns `deflookup.apply`
/// off for the statements after it (the prune, the NOTIFY).
pub(crate) const LEAF_TAIL: &str = concat!(
    "WITH leaf AS MATERIALIZED (",
    leaf_sql!(),
    "), ",
    guard::record_modules_ctes!("(SELECT ok FROM leaf)"),
    ", d AS (DELETE FROM _S_modules WHERE ",
    crate::sql::in_realm!(),
    named_by_hash_or_alias!(),
    " AND (SELECT ok FROM leaf) RETURNING 1) \
     SELECT (SELECT count(*) FROM d), (SELECT ok FROM leaf)"
);

/// Whether a module invalidation of `names` names, nothing known yet of their consumers,
/// checks, records and deletes in one statement ([`LEAF_TAIL`]): with the guard, for a few.
fn one_statement(guarded: bool, names: usize) -> bool {
    guarded && names <= FEW_NAMES
}

/// Whether a transaction that checks, records and deletes in [`LEAF_TAIL`] opens with the
/// fewer settings of `guard::OPEN_REALM_LEAF`: when it sends no prune. Decided here for both
/// the statements prepared (`run`) and those sent (`flight`).
fn opens_lean(one_statement: bool, prune: bool) -> bool {
    one_statement && !prune
}

/// The `url_hash` of each URL, as Postgres computes it (`md5(url)`: the lowercase hex digest
/// of its UTF-8 bytes).
pub(crate) fn url_hashes(urls: &[String]) -> Vec<String> {
    use md5::{Digest, Md5};
    // By hand rather than through `format!`, whose machinery cost more than the digest
    // (measured with callgrind: 17 000 instructions for a module's five URLs, a tenth of an
    // invalidation's client work).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    urls.iter()
        .map(|url| {
            let digest = Md5::digest(url.as_bytes());
            let hex: Vec<u8> = digest
                .iter()
                .flat_map(|byte| [HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 0xf)]])
                .collect();
            String::from_utf8(hex).unwrap_or_default()
        })
        .collect()
}

pub(crate) const DELETE_REALM: &str = "DELETE FROM _S_modules WHERE resolved_realm_url = $1";
pub(crate) const DELETE_ALL: &str = "DELETE FROM _S_modules";
pub(crate) const NOTIFY: &str = "SELECT pg_notify($1, $2)";
/// Every payload `$2` on channel `$1`, in order, in one statement. Nothing when
/// `guard::apply!` is off.
pub(crate) const NOTIFY_ALL: &str =
    concat!("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p WHERE ", guard::apply!());

/// [`NOTIFY_ALL`] for payloads encoded before the transaction took its number: the last one
/// ends with `"s":` and [`SEQ_PLACEHOLDER`] (see [`encode_with_placeholder`]), which is
/// replaced by the number taken in this transaction.
pub(crate) const NOTIFY_SEQ: &str = concat!(
    "SELECT pg_notify($1, CASE WHEN o < cardinality($2::text[]) THEN p \
         ELSE left(p, -20) || ",
    guard::taken!(),
    " || '}' END) \
     FROM unnest($2::text[]) WITH ORDINALITY AS x(p, o) WHERE ",
    guard::apply!()
);

/// [`NOTIFY_SEQ`] for one payload, `$2`, sent without its placeholder number and `}` (the last
/// [`PLACEHOLDER_TAIL`] characters), which the statement puts back with the number: a module's
/// own invalidation has one payload (and so has a clear), and this costs the server about
/// 17 000 instructions less than taking it apart with `unnest` and `CASE` (callgrind).
pub(crate) const NOTIFY_SEQ_ONE: &str =
    concat!("SELECT pg_notify($1, $2 || ", guard::taken!(), " || '}') WHERE ", guard::apply!());

/// How many characters end the last payload after `"s":`: [`SEQ_PLACEHOLDER`]'s 19 digits and
/// `}`.
const PLACEHOLDER_TAIL: usize = PLACEHOLDER_END.len() - "\"s\":".len();

/// The number the payloads are encoded with before it is known: the widest an `i64` prints
/// (19 digits), so that every chunk still fits once the real number replaces it.
const SEQ_PLACEHOLDER: i64 = i64::MAX;

/// How the last payload ends when it carries [`SEQ_PLACEHOLDER`] (spelled out rather than
/// formatted on every invalidation; a test checks it).
const PLACEHOLDER_END: &str = "\"s\":9223372036854775807}";

/// The payloads of `invalidation`, the last ending with the placeholder number and `}` (20
/// characters, which [`NOTIFY_SEQ`] replaces); `None` when they carry no number (a realm
/// widened to a global payload, whose number would be the realm's).
fn encode_with_placeholder(invalidation: &Invalidation, origin: &str) -> Option<Vec<String>> {
    let payloads = encode_payloads(invalidation, Some(origin), Some(SEQ_PLACEHOLDER));
    payloads.last().is_some_and(|last| last.ends_with(PLACEHOLDER_END)).then_some(payloads)
}

/// A row of a consumer-closure query (or of [`REALM_GRAPH`]).
fn consumer_row(row: &Row) -> ConsumerRow {
    let url: String = row.get(0);
    // Straight into names when every dep is one (always, as the lookup writes them);
    // otherwise through a JSON value, keeping the names.
    let deps = match row.try_get::<_, Option<Json<Vec<String>>>>(2) {
        Ok(deps) => deps.map(|Json(deps)| deps).unwrap_or_default(),
        Err(_) => store::string_list(row.get(2)),
    };
    let alias: Option<String> = row.get(1);
    ConsumerRow {
        file_alias: alias.unwrap_or_else(|| lookup_core::urls::file_alias(&url)),
        url,
        deps,
    }
}

/// The rows of a consumer-closure query.
pub(crate) fn consumer_rows(rows: &[Row]) -> Vec<ConsumerRow> {
    rows.iter().map(consumer_row).collect()
}

type Reply<'a> = crate::sql::Pending<'a, Result<Answer, tokio_postgres::Error>>;

/// The replies of a flight, in the order of its statements.
type Replies = Vec<Result<Answer, tokio_postgres::Error>>;

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
    Ok(consumer_rows(&replies.swap_remove(2).unwrap_or_default()))
}

/// The first failure of a flight (later statements only fail because of it), with its index.
fn first_failure<T: Default>(
    replies: &mut [Result<T, tokio_postgres::Error>],
) -> Option<(usize, tokio_postgres::Error)> {
    let index = replies.iter().position(Result::is_err)?;
    let failed = std::mem::replace(&mut replies[index], Ok(T::default()));
    failed.err().map(|error| (index, error))
}

/// What one transaction did.
pub(crate) struct Applied {
    /// What was deleted and broadcast: for a fan-out, the names asked for plus every consumer
    /// found under the lock, in fan-out order.
    pub(crate) effective: Invalidation,
    pub(crate) deleted: u64,
    pub(crate) payloads: usize,
    /// How many log entries [`guard::PRUNE`] deleted, when it was sent.
    pub(crate) pruned: Option<i64>,
}

/// Why a transaction failed.
pub(crate) enum Failure {
    /// The server refused a statement before the NOTIFYs (the DELETE, the record, the prune):
    /// nothing happened.
    Invalidation(PgError),
    /// At a NOTIFY or the COMMIT, or the connection broke during the flight that holds the
    /// COMMIT:
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
    /// With the guard, for a module invalidation: also [`guard::PRUNE`] the realm's log.
    pub(crate) prune: bool,
}

/// The statements opening a transaction, after `BEGIN`.
struct Head<'a> {
    /// The lock, number and settings (`guard::OPEN_REALM`/`OPEN_GLOBAL`) with the guard;
    /// without it, the settings alone.
    guarded: bool,
    global: bool,
    realm: &'a str,
    /// [`LEAF`] on these names.
    leaf: Option<&'a [String]>,
    /// The closure of these names ([`CONSUMERS_LIMITED`]).
    closure: Option<&'a [String]>,
}

/// The statements applying a known fan-out, ending with `COMMIT`.
struct Tail<'a> {
    effective: &'a Invalidation,
    /// With the guard, the record ([`guard::RECORD_MODULES`] or, for a clear or a fan-out too
    /// large for one entry, [`guard::RECORD_CLEAR`]) and, if asked, the prune.
    plan: &'a Plan<'a>,
    /// The `url_hash` of each URL the DELETE probes for (see [`Rows`]).
    hashes: Vec<String>,
    /// How a module fan-out's DELETE finds its rows.
    rows: Rows,
    /// The number when known (see [`Tail::new`]).
    seq: Option<i64>,
    /// The channel and payloads, and whether the last one ends with the placeholder number:
    /// encoded when first asked for (see [`Tail::notify`]).
    notify: std::sync::OnceLock<Option<Notify<'a>>>,
}

/// A tail's channel and payloads, and whether the last one ends with the placeholder number.
type Notify<'a> = (&'a str, Vec<String>, bool);

/// How a module fan-out's DELETE finds its rows.
enum Rows {
    /// By the fan-out's names, by URL and by alias ([`DELETE_MODULES`], or [`DELETE_BY_HASH`]
    /// then [`DELETE_BY_ALIAS`]).
    Named,
    /// The URLs of the rows to delete, from the realm's rows read under the lock
    /// ([`REALM_GRAPH`]: those the fan-out names by URL or by alias,
    /// `lookup_core::fan_out_over_realm`), probed by their hash ([`DELETE_BY_HASH`]). As
    /// exact as the names while the guard holds the lock (a guarded write waits for the
    /// invalidation's commit), so only with the guard: without it a row written between the
    /// read and the DELETE would be left unless its URL was read.
    Read(Vec<String>),
    /// [`Rows::Read`] when the fan-out names a large part of the realm ([`reads_realm`]), yet
    /// no more than half its rows (more: [`Rows::AllBut`]): deleted by reading the realm's rows
    /// again ([`DELETE_IN_REALM`]).
    ReadInRealm(Vec<String>),
    /// Without the guard, a fan-out that read the realm and names a large part of it
    /// ([`reads_realm`]): deleted by reading the realm's rows against the names
    /// ([`DELETE_NAMED_IN_REALM`]).
    NamedInRealm,
    /// With the guard, a fan-out that read the realm and names most of its rows: every row of
    /// the realm but those of these URLs, the rows it does not name ([`RealmRows::AllBut`]),
    /// deleted by reading the realm's rows ([`DELETE_REALM_BUT`]).
    AllBut(Vec<String>),
}

impl<'a> Tail<'a> {
    /// The tail of `effective`; `seq`: the number when known, `None` when it is taken in the
    /// same flight (the payloads then carry the placeholder) or there is none (no guard);
    /// `rows`: see [`Rows`].
    fn new(
        effective: &'a Invalidation,
        plan: &'a Plan<'a>,
        seq: Option<i64>,
        rows: Rows,
    ) -> Tail<'a> {
        let hashes = match (effective, &rows) {
            (Invalidation::Modules { urls, .. }, Rows::Named) => url_hashes(urls),
            (_, Rows::Read(urls)) => url_hashes(urls),
            _ => Vec::new(),
        };
        Tail { effective, plan, hashes, rows, seq, notify: std::sync::OnceLock::new() }
    }

    /// The channel and payloads, encoded on the first call.
    fn notify(&self) -> Option<&Notify<'a>> {
        let encode = || {
            let (channel, origin) = self.plan.notify?;
            if self.seq.is_none()
                && self.plan.guarded
                && let Some(payloads) = encode_with_placeholder(self.effective, origin)
            {
                return Some((channel, payloads, true));
            }
            Some((channel, encode_payloads(self.effective, Some(origin), self.seq), false))
        };
        self.notify.get_or_init(encode).as_ref()
    }

    /// Whether the statements before the NOTIFY are sent before the payloads are encoded, so
    /// that the server deletes while the client encodes: for a fan-out of more than a
    /// module's names (a 10 000-module fan-out's 20 000 names take about a millisecond to
    /// encode). A module's own invalidation sends all its statements at once.
    fn sends_before_encoding(&self) -> bool {
        matches!(self.effective, Invalidation::Modules { urls, .. } if urls.len() > FEW_NAMES)
    }

    fn payloads(&self) -> usize {
        self.notify().map_or(0, |(_, payloads, _)| payloads.len())
    }
}

/// Where the replies of a flight's statements are.
#[derive(Default)]
struct Positions {
    open: Option<usize>,
    /// The statement and column of the consumer check's answer.
    leaf: Option<(usize, usize)>,
    closure: Option<usize>,
    prune: Option<usize>,
    /// The DELETE statements, counted by their command tags (two for a module fan-out probed
    /// per name).
    deletes: Vec<usize>,
    /// [`LEAF_TAIL`], which counts its DELETE in its first column.
    leaf_tail: Option<usize>,
    /// The first statement of the broadcast: the NOTIFYs, or the COMMIT when there are none.
    broadcast: Option<usize>,
}

/// The statements and the connection of a flight.
struct On<'a> {
    sql: &'a Sql,
    client: &'a deadpool_postgres::ClientWrapper,
}

impl On<'_> {
    /// `statement` with `params`, as a request of a flight. The statement must have been
    /// prepared ([`Sql::prepare`]) before the flight: one that is not is prepared by its own
    /// round trip when first polled, and its request then reaches the server after the
    /// flight's later ones, out of order (checked in debug builds).
    fn query<'f>(&'f self, statement: &'f Stmt, params: &'f [&'f (dyn ToSql + Sync)]) -> Reply<'f> {
        debug_assert!(
            self.sql.is_ready(self.client, statement),
            "sent in a flight without being prepared first: {}",
            statement.text
        );
        Box::pin(self.sql.answer(self.client, statement, params))
    }
}

/// Sends `head` (after `BEGIN`) and `tail` as one flight and awaits every reply.
async fn flight(
    sql: &Sql,
    c: &deadpool_postgres::ClientWrapper,
    head: Option<&Head<'_>>,
    tail: Option<&Tail<'_>>,
) -> (Replies, Positions) {
    // Every parameter list lives as long as the flight (declared before it).
    let realm = head.map(|h| h.realm).unwrap_or_default();
    let realm_lock: [&(dyn ToSql + Sync); 3] =
        [&guard::LOCK_NS_REALM, &realm, &guard::LOCK_NS_GLOBAL];
    let global_lock: [&(dyn ToSql + Sync); 1] = [&guard::LOCK_NS_GLOBAL];
    let leaf_names = head.and_then(|h| h.leaf).unwrap_or_default();
    let leaf_params: [&(dyn ToSql + Sync); 2] = [&realm, &leaf_names];
    let closure_names = head.and_then(|h| h.closure).unwrap_or_default();
    let closure_params: [&(dyn ToSql + Sync); 3] = [&realm, &closure_names, &LARGE_FAN_OUT];
    let (tail_realm, list): (&str, &[String]) = match tail.map(|t| t.effective) {
        Some(Invalidation::Modules { realm_url, urls }) => (realm_url, urls),
        Some(Invalidation::Realm { realm_url }) => (realm_url, &[]),
        _ => ("", &[]),
    };
    let hashes: &[String] = tail.map(|t| t.hashes.as_slice()).unwrap_or_default();
    let horizon = tail.map(|t| t.plan.horizon_secs).unwrap_or_default();
    let record_modules_params: [&(dyn ToSql + Sync); 2] = [&tail_realm, &list];
    let prune_params: [&(dyn ToSql + Sync); 2] = [&tail_realm, &horizon];
    let record_clear_params: [&(dyn ToSql + Sync); 1] = [&tail_realm];
    let hash_params: [&(dyn ToSql + Sync); 2] = [&tail_realm, &hashes];
    let modules_params: [&(dyn ToSql + Sync); 3] = [&tail_realm, &list, &hashes];
    // The names, for the alias DELETE.
    let names_params: [&(dyn ToSql + Sync); 2] = [&tail_realm, &list];
    // The URLs a DELETE reading the realm looks its rows up in: those to delete, or to spare.
    let looked_up: &[String] = match tail.map(|t| &t.rows) {
        Some(Rows::ReadInRealm(urls) | Rows::AllBut(urls)) => urls,
        _ => &[],
    };
    let rows_params: [&(dyn ToSql + Sync); 2] = [&tail_realm, &looked_up];
    let realm_params: [&(dyn ToSql + Sync); 1] = [&tail_realm];
    // A module's names, with the guard, and nothing known yet about their consumers: the
    // check, the record and the DELETE in one statement (`LEAF_TAIL`).
    // (`leaf` is set only for a module's names, and the tail of the same flight is theirs.)
    let one_statement = match (head, tail) {
        (Some(head), Some(_)) => head.leaf.is_some() && one_statement(head.guarded, list.len()),
        _ => false,
    };
    let leaf_tail_params: [&(dyn ToSql + Sync); 3] = [&tail_realm, &list, &hashes];
    // Without a prune, that statement needs fewer settings (`guard::OPEN_REALM_LEAF`).
    let lean = opens_lean(one_statement, tail.is_some_and(|tail| tail.plan.prune));
    // Set once the payloads are encoded (see `Tail::sends_before_encoding`).
    let notify_params: std::sync::OnceLock<[&(dyn ToSql + Sync); 2]> = std::sync::OnceLock::new();
    // A single payload without its placeholder number (`NOTIFY_SEQ_ONE`).
    let notify_cut: std::sync::OnceLock<&str> = std::sync::OnceLock::new();
    let on = On { sql, client: c };
    let mut at = Positions::default();
    let mut flight: Flight<'_, _> = Flight::new(Vec::new());
    if let Some(head) = head {
        flight.push(on.query(&sql.begin, &[]));
        at.open = Some(flight.len());
        if head.guarded && head.global {
            flight.push(on.query(&sql.open_global, &global_lock));
        } else if head.guarded && lean {
            flight.push(on.query(&sql.open_realm_leaf, &realm_lock));
        } else if head.guarded {
            flight.push(on.query(&sql.open_realm, &realm_lock));
        } else {
            flight.push(on.query(&sql.settings, &[]));
        }
        if head.leaf.is_some() && !one_statement {
            at.leaf = Some((flight.len(), 0));
            flight.push(on.query(&sql.leaf, &leaf_params));
        }
        if head.closure.is_some() {
            at.closure = Some(flight.len());
            flight.push(on.query(&sql.consumers_limited, &closure_params));
        }
    }

    if let Some(tail) = tail {
        let is_modules = matches!(tail.effective, Invalidation::Modules { .. });
        if one_statement {
            at.leaf = Some((flight.len(), 1));
            at.leaf_tail = Some(flight.len());
            flight.push(on.query(&sql.leaf_tail, &leaf_tail_params));
        } else if tail.plan.guarded {
            if is_modules && list.len() <= GUARD_PER_URL_LIMIT {
                flight.push(on.query(&sql.record_modules, &record_modules_params));
            } else {
                flight.push(on.query(&sql.record_clear, &record_clear_params));
            }
        }
        if tail.plan.guarded && tail.plan.prune && is_modules {
            at.prune = Some(flight.len());
            flight.push(on.query(&sql.prune, &prune_params));
        }
        let deletes: Vec<Reply<'_>> = match (tail.effective, &tail.rows) {
            _ if one_statement => Vec::new(),
            (Invalidation::Modules { .. }, Rows::Read(_)) => {
                vec![on.query(&sql.delete_by_hash, &hash_params)]
            }
            (Invalidation::Modules { .. }, Rows::ReadInRealm(_)) => {
                vec![on.query(&sql.delete_in_realm, &rows_params)]
            }
            (Invalidation::Modules { .. }, Rows::NamedInRealm) => {
                vec![on.query(&sql.delete_named_in_realm, &names_params)]
            }
            (Invalidation::Modules { .. }, Rows::AllBut(_)) => {
                vec![on.query(&sql.delete_realm_but, &rows_params)]
            }
            (Invalidation::Modules { .. }, Rows::Named) if list.len() <= FEW_NAMES => {
                vec![on.query(&sql.delete_modules, &modules_params)]
            }
            (Invalidation::Modules { .. }, Rows::Named) => vec![
                on.query(&sql.delete_by_hash, &hash_params),
                on.query(&sql.delete_by_alias, &names_params),
            ],
            (Invalidation::Realm { .. }, _) => vec![on.query(&sql.delete_realm, &realm_params)],
            (Invalidation::Global, _) => vec![on.query(&sql.delete_all, &[])],
        };
        for delete in deletes {
            at.deletes.push(flight.len());
            flight.push(delete);
        }
        if tail.sends_before_encoding() {
            flight.send().await;
        }
        if let Some((channel, payloads, with_seq)) = tail.notify()
            && !payloads.is_empty()
        {
            let (notify, params) = match (with_seq, payloads.as_slice()) {
                (true, [payload]) => {
                    let cut =
                        notify_cut.get_or_init(|| &payload[..payload.len() - PLACEHOLDER_TAIL]);
                    (&sql.notify_seq_one, notify_params.get_or_init(|| [channel, cut]))
                }
                (true, _) => (&sql.notify_seq, notify_params.get_or_init(|| [channel, payloads])),
                (false, _) => (&sql.notify_all, notify_params.get_or_init(|| [channel, payloads])),
            };
            at.broadcast = Some(flight.len());
            flight.push(on.query(notify, params));
        }
        // NOTIFY is delivered at commit, so peers hear it if and only if the delete commits.
        at.broadcast.get_or_insert(flight.len());
        flight.push(on.query(&sql.commit, &[]));
    }
    (flight.finish().await, at)
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
    // Each transaction's statements are prepared before it begins (free once in the
    // connection's table), so that a fresh connection pays for preparing before it holds the
    // realm's lock, not under it; the second transaction's only when there is one.
    let open = match (plan.guarded, request) {
        (false, _) => &sql.settings,
        (true, Invalidation::Global) => &sql.open_global,
        (true, _) => &sql.open_realm,
    };
    let leaf_tail = match request {
        Invalidation::Modules { urls, .. } => one_statement(plan.guarded, urls.len()),
        _ => false,
    };
    // What a second transaction may send besides its opening, once the closure is known.
    let fan_out_statements = [
        &sql.consumers_limited,
        &sql.realm_graph,
        &sql.record_modules,
        &sql.prune,
        &sql.record_clear,
        &sql.delete_modules,
        &sql.delete_by_hash,
        &sql.delete_by_alias,
        &sql.delete_in_realm,
        &sql.delete_named_in_realm,
        &sql.delete_realm_but,
    ];
    let first_open = if opens_lean(leaf_tail, plan.prune) { &sql.open_realm_leaf } else { open };
    let mut first = vec![
        &sql.begin,
        &sql.commit,
        first_open,
        &sql.notify_all,
        &sql.notify_seq,
        &sql.notify_seq_one,
    ];
    match request {
        Invalidation::Modules { .. } if leaf_tail => {
            first.push(&sql.leaf_tail);
            first.extend(plan.prune.then_some(&sql.prune));
        }
        Invalidation::Modules { .. } => {
            first.push(&sql.leaf);
            first.extend(fan_out_statements);
        }
        Invalidation::Realm { .. } => first.extend([&sql.record_clear, &sql.delete_realm]),
        Invalidation::Global => first.extend([&sql.record_clear, &sql.delete_all]),
    }
    sql.prepare(c, &first).await.map_err(before)?;
    let (realm, names): (&str, &[String]) = match request {
        Invalidation::Modules { realm_url, urls } => (realm_url, urls),
        Invalidation::Realm { realm_url } => (realm_url, &[]),
        Invalidation::Global => ("", &[]),
    };
    let is_modules = matches!(request, Invalidation::Modules { .. });
    let head = |leaf: bool| Head {
        guarded: plan.guarded,
        global: matches!(request, Invalidation::Global),
        realm,
        leaf: (leaf && is_modules).then_some(names),
        closure: (!leaf && is_modules).then_some(names),
    };

    // One flight: the fan-out is the request itself, unless the names have consumers.
    let tail = Tail::new(request, plan, None, Rows::Named);
    let (replies, at) = flight(sql, c, Some(&head(true)), Some(&tail)).await;
    let payloads = tail.payloads();
    let done = finish(replies, &at, payloads, Cow::Borrowed(request))?;
    if let Some(applied) = done {
        tx.finish();
        return Ok(applied);
    }

    // Consumers: their closure under the lock of a second transaction, then the fan-out.
    if leaf_tail {
        let second: Vec<&Stmt> = std::iter::once(open).chain(fan_out_statements).collect();
        sql.prepare(c, &second).await.map_err(before)?;
    }
    let (mut replies, at) = flight(sql, c, Some(&head(false)), None).await;
    if let Some((_, error)) = first_failure(&mut replies) {
        return Err(before(error));
    }
    let seq = match at.open.filter(|_| plan.guarded).map(|i| &replies[i]) {
        Some(Ok(answer)) => match answer.rows.first() {
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
    let taken = at.closure.map(|i| std::mem::replace(&mut replies[i], Ok(Answer::default())));
    let mut consumers = consumer_rows(&taken.and_then(Result::ok).unwrap_or_default().rows);
    let graph = consumers.len() as i64 >= LARGE_FAN_OUT;
    if graph {
        // Still under the lock, with a fresh snapshot: the whole realm's edges, decoded as
        // they arrive. Walking from the names, rows that do not consume them are never reached.
        consumers.clear();
        let each = |row: Row| consumers.push(consumer_row(&row));
        sql.for_each_row(c, &sql.realm_graph, &[&realm], each).await.map_err(before)?;
    }
    let realm_rows = consumers.len();
    // The rows to delete are known from those just read (by their URLs, or as all the realm's
    // but the URLs spared). Only with the guard: without it nothing holds back writes between
    // the read and the DELETE, and a row written then (or its alias changed) is found by the
    // names, not by the URLs read.
    let (urls, read) = if graph && plan.guarded {
        let (urls, read) = fan_out_over_realm(names.to_vec(), consumers);
        (urls, Some(read))
    } else {
        (fan_out(names.to_vec(), consumers), None)
    };
    let rows = match (read, graph && reads_realm(urls.len(), realm_rows)) {
        (Some(RealmRows::AllBut(spared)), _) => Rows::AllBut(spared),
        (Some(RealmRows::Urls(read)), true) => Rows::ReadInRealm(read),
        (Some(RealmRows::Urls(read)), false) => Rows::Read(read),
        (None, true) => Rows::NamedInRealm,
        (None, false) => Rows::Named,
    };
    let effective = Invalidation::Modules { realm_url: realm.to_owned(), urls };
    let tail = Tail::new(&effective, plan, seq, rows);
    let (replies, at) = flight(sql, c, None, Some(&tail)).await;
    let payloads = tail.payloads();
    drop(tail);
    // The fan-out moves into the answer: a 10 000-module one names 20 000 URLs.
    match finish(replies, &at, payloads, Cow::Owned(effective))? {
        Some(applied) => {
            tx.finish();
            Ok(applied)
        }
        None => Err(Failure::Invalidation(PgError::Query {
            operation: "invalidate",
            source: "the fan-out's writes were turned off".into(),
        })),
    }
}

/// How a flight with a tail went: `Ok(None)` when [`LEAF`] found consumers (the transaction
/// committed nothing).
fn finish(
    mut replies: Replies,
    at: &Positions,
    payloads: usize,
    effective: Cow<'_, Invalidation>,
) -> Result<Option<Applied>, Failure> {
    let broadcast = at.broadcast.expect("a tail ends with its broadcast and COMMIT");
    if let Some((index, error)) = first_failure(&mut replies) {
        // A broken connection says nothing about how far the server got (COMMIT may have
        // been sent): only a statement the server refused before the NOTIFYs means "nothing
        // happened".
        let refused_early = index < broadcast && !error.is_closed();
        let error = query_error("invalidate")(error);
        return Err(if refused_early {
            Failure::Invalidation(error)
        } else {
            Failure::Broadcast(error, effective.into_owned())
        });
    }
    if let Some((index, column)) = at.leaf {
        let rows = replies[index].as_ref().ok().map(|answer| &answer.rows);
        match rows.and_then(|rows| rows.first()).map(|row| row.try_get::<_, bool>(column)) {
            Some(Ok(true)) => {}
            Some(Ok(false)) => return Ok(None),
            // Never expected: the check's answer is how the writes are known to have happened.
            _ => {
                return Err(Failure::Invalidation(PgError::Query {
                    operation: "invalidate",
                    source: "the consumer check gave no answer".into(),
                }));
            }
        }
    }
    // A count in a reply's first column (LEAF_TAIL's DELETE, the prune).
    let counted = |index: usize| {
        let rows = replies[index].as_ref().ok().map(|answer| &answer.rows);
        rows.and_then(|rows| rows.first()).map_or(0, |row| row.get::<_, i64>(0))
    };
    let tagged = |index: &usize| replies[*index].as_ref().map_or(0, |answer| answer.written);
    let deleted = at.deletes.iter().map(tagged).sum::<u64>()
        + at.leaf_tail.map_or(0, |index| u64::try_from(counted(index)).unwrap_or(0));
    let pruned = at.prune.map(counted);
    Ok(Some(Applied { effective: effective.into_owned(), deleted, payloads, pruned }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fan_out_reads_its_realm_only_when_it_names_a_large_part_of_it() {
        assert!(reads_realm(20_000, 10_000), "the bench's: every row, by URL and by alias");
        assert!(reads_realm(2_500, 10_000));
        assert!(!reads_realm(1_200, 100_000), "600 consumers of a large realm are probed");
    }

    #[test]
    fn url_hashes_are_md5_in_lowercase_hex() {
        let urls = ["".to_owned(), "abc".to_owned(), "https://r.test/é.gts".to_owned()];
        let hashes = url_hashes(&urls);
        assert_eq!(hashes[0], "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(hashes[1], "900150983cd24fb0d6963f7d28e17f72");
        assert!(hashes[2].len() == 32 && hashes[2].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(hashes[2], hashes[2].to_lowercase());
    }

    /// A leaf flight whose consumer check came back without its row (never expected: the
    /// statement always answers) is an error the caller sees, not a panic and not a success
    /// that would claim rows were deleted.
    #[test]
    fn a_consumer_check_without_an_answer_fails_the_invalidation() {
        let at = Positions { leaf: Some((1, 0)), broadcast: Some(2), ..Positions::default() };
        let effective = Invalidation::Modules {
            realm_url: "https://r.test/".into(),
            urls: vec!["https://r.test/a.gts".into()],
        };
        let replies = (0..4).map(|_| Ok(Answer::default())).collect();
        match finish(replies, &at, 1, Cow::Owned(effective)) {
            Err(Failure::Invalidation(error)) => {
                let message = error.to_string();
                assert!(message.contains("the consumer check gave no answer"), "{message}");
                assert!(!error.is_transient(), "not worth retrying as it is: {message}");
            }
            Err(Failure::Broadcast(error, _)) => panic!("not a broadcast failure: {error}"),
            Ok(outcome) => panic!("reported as done: {}", outcome.is_some()),
        }
    }

    #[test]
    fn notify_seq_cuts_exactly_the_placeholder() {
        let tail = format!("{SEQ_PLACEHOLDER}}}");
        assert_eq!(tail.len(), PLACEHOLDER_TAIL);
        assert_eq!(PLACEHOLDER_END, format!("\"s\":{tail}"));
        assert!(NOTIFY_SEQ.contains(&format!("left(p, -{})", tail.len())), "{NOTIFY_SEQ}");
        for invalidation in [
            Invalidation::Global,
            Invalidation::Realm { realm_url: "https://r.test/".into() },
            Invalidation::Modules { realm_url: "https://r.test/".into(), urls: vec!["a".into()] },
        ] {
            let payloads = encode_with_placeholder(&invalidation, "origin").expect("a number");
            assert!(payloads.last().expect("one").ends_with(&format!("\"s\":{tail}")));
        }
    }
}
