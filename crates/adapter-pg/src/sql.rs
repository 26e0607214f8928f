//! Every statement the adapter sends, and the two ways it sends them.
//!
//! - **Prepared** (the default): each statement is prepared once per connection (kept in the
//!   connection's table, [`Connections`]) and then only bound and executed: the cheapest hit
//!   path.
//! - **Unnamed** (`pgbouncer=true`): a transaction pooler hands each transaction to whichever
//!   server connection is free, so a statement prepared in one transaction is missing, or
//!   another client's, in the next. Every statement is then sent whole, as the unnamed
//!   statement, with its parameter types (tokio-postgres' `query_typed`): parse, bind and
//!   execute in one message batch, self-contained.
//!
//! Statements name their tables with the configured schema (`_S_` in the texts below), so no
//! session state (`search_path`) is needed either.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use deadpool_postgres::ClientWrapper;
use tokio::time::{Instant, Sleep};
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

/// Realm `$1`'s rows, as a condition the planner applies to the rows an index found for
/// the statement's names, never as a way to find them: `resolved_realm_url` has an index,
/// and a plan kept for a prepared statement is made for an average realm, which on a
/// database of many small realms looks cheaper to read whole than to probe an index per
/// name; a large realm then has every row read for each statement (the plan test,
/// `sql/plans.rs`, builds such a database). Wrapped in `IS TRUE` (the column is never NULL,
/// so the answer is the same), the comparison is no longer one an index can serve.
macro_rules! in_realm {
    () => {
        "(resolved_realm_url = $1) IS TRUE"
    };
}
pub(crate) use in_realm;

/// A request on a connection, awaited with others by [`pipelined`].
pub(crate) type Pending<'a, T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Awaits every request of a flight. Each future is polled once, in order, before any is
/// polled again, so the requests reach the connection in that order (tokio-postgres sends a
/// request on its future's first poll): one round trip for all of them.
pub(crate) async fn pipelined<T>(flight: Vec<Pending<'_, T>>) -> Vec<T> {
    let mut flight = Flight::new(flight);
    flight.finish().await
}

/// Requests on one connection, sent in order without waiting for replies; more may be added
/// after the first are sent ([`send`](Self::send)), so that the server starts on them while
/// the client prepares the rest.
pub(crate) struct Flight<'a, T> {
    requests: Vec<Pending<'a, T>>,
    replies: Vec<Option<T>>,
    /// How many requests have been polled at least once (sent).
    sent: usize,
}

impl<'a, T> Flight<'a, T> {
    pub(crate) fn new(requests: Vec<Pending<'a, T>>) -> Self {
        let replies = requests.iter().map(|_| None).collect();
        Flight { requests, replies, sent: 0 }
    }

    /// Adds a request after those already in the flight.
    pub(crate) fn push(&mut self, request: Pending<'a, T>) {
        self.requests.push(request);
        self.replies.push(None);
    }

    /// How many requests the flight holds.
    pub(crate) fn len(&self) -> usize {
        self.requests.len()
    }

    /// Polls every request once, in order, keeping any reply: all of them are sent.
    fn poll_all(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        for (request, reply) in self.requests.iter_mut().zip(self.replies.iter_mut()) {
            if reply.is_none()
                && let std::task::Poll::Ready(done) = request.as_mut().poll(cx)
            {
                *reply = Some(done);
            }
        }
        self.sent = self.requests.len();
        self.replies.iter().all(Option::is_some)
    }

    /// Sends the requests not sent yet, without waiting for any reply.
    pub(crate) async fn send(&mut self) {
        if self.sent < self.requests.len() {
            std::future::poll_fn(|cx| {
                self.poll_all(cx);
                std::task::Poll::Ready(())
            })
            .await;
        }
    }

    /// Sends what is left and awaits every reply, in the order of the requests.
    pub(crate) async fn finish(&mut self) -> Vec<T> {
        std::future::poll_fn(|cx| {
            if self.poll_all(cx) { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
        })
        .await;
        self.replies.drain(..).map(|reply| reply.expect("every reply is in")).collect()
    }
}

/// A statement's text (schema filled in) and its parameter types.
#[derive(Debug)]
pub(crate) struct Stmt {
    pub(crate) text: String,
    types: Vec<Type>,
    /// Its place in each connection's [`Connections`] table (past its end for a statement
    /// built outside [`Sql::new`], looked up in the connection's cache instead).
    index: usize,
}

impl Stmt {
    /// `text` (schema filled in) with parameters of `types`, outside the per-connection tables.
    #[cfg(test)]
    pub(crate) fn unlisted(text: String, types: Vec<Type>) -> Stmt {
        Stmt { text, types, index: usize::MAX }
    }
}

/// The statements each pooled connection has prepared, by their place in [`Sql`]: a query
/// finds its statement by an index instead of through deadpool's statement cache, which hashes
/// the statement's whole text with SipHash on every lookup (about 1 300 of a cache hit's
/// 27 000 client instructions, counted with callgrind; 7 lookups an invalidation).
///
/// A connection is known by its statement cache's allocation (`ClientWrapper::statement_cache`,
/// one per connection, for its life). The table keeps a `Weak` to it, so that the allocation,
/// and with it the address, is not reused by a later connection while the entry exists: an
/// entry whose connection is gone is dropped when a new connection is added.
#[derive(Default)]
struct Connections {
    known: Mutex<Vec<Known>>,
}

/// One connection's prepared statements.
struct Known {
    cache: std::sync::Weak<deadpool_postgres::StatementCache>,
    statements: Arc<[OnceLock<tokio_postgres::Statement>]>,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let known = self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f.debug_struct("Connections").field("known", &known.len()).finish()
    }
}

impl Connections {
    /// `client`'s table of `size` statements (empty the first time).
    fn of(
        &self,
        client: &ClientWrapper,
        size: usize,
    ) -> Arc<[OnceLock<tokio_postgres::Statement>]> {
        let mut known = self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = find(&known, client) {
            return entry.statements.clone();
        }
        known.retain(|entry| entry.cache.strong_count() > 0);
        let statements: Arc<[OnceLock<tokio_postgres::Statement>]> =
            (0..size).map(|_| OnceLock::new()).collect();
        known.push(Known {
            cache: Arc::downgrade(&client.statement_cache),
            statements: statements.clone(),
        });
        statements
    }

    /// Whether `client` has prepared the statement at `index`; looks only, adding no table.
    fn prepared(&self, client: &ClientWrapper, index: usize) -> bool {
        let known = self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        find(&known, client).is_some_and(|entry| slot(&entry.statements, index).is_some())
    }

    /// How many connections have a table.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.known.lock().unwrap().len()
    }
}

/// `client`'s entry among `known`.
fn find<'k>(known: &'k [Known], client: &ClientWrapper) -> Option<&'k Known> {
    let cache = Arc::as_ptr(&client.statement_cache);
    known.iter().find(|entry| std::ptr::eq(entry.cache.as_ptr(), cache))
}

/// The statement at `index` of a connection's `table`, once prepared.
fn slot(
    table: &[OnceLock<tokio_postgres::Statement>],
    index: usize,
) -> Option<&tokio_postgres::Statement> {
    table.get(index).and_then(OnceLock::get)
}

/// The schema placeholder of the statement texts.
pub(crate) const SCHEMA: &str = "_S_";

/// The statements of one adapter, for its schema and connection mode, built once.
#[derive(Debug)]
pub(crate) struct Sql {
    unnamed: bool,
    prefix: String,
    pub(crate) read_row: Stmt,
    pub(crate) read_batch: Stmt,
    pub(crate) stamp: Stmt,
    pub(crate) plain_upsert: Stmt,
    pub(crate) guarded_insert: Stmt,
    pub(crate) lock_realm_shared: Stmt,
    pub(crate) open_realm: Stmt,
    pub(crate) open_realm_leaf: Stmt,
    pub(crate) open_global: Stmt,
    pub(crate) settings: Stmt,
    pub(crate) leaf: Stmt,
    pub(crate) leaf_tail: Stmt,
    pub(crate) record_modules: Stmt,
    pub(crate) prune: Stmt,
    pub(crate) record_clear: Stmt,
    pub(crate) delete_modules: Stmt,
    pub(crate) delete_by_hash: Stmt,
    pub(crate) delete_by_alias: Stmt,
    pub(crate) delete_in_realm: Stmt,
    pub(crate) delete_named_in_realm: Stmt,
    pub(crate) delete_realm_but: Stmt,
    pub(crate) delete_realm: Stmt,
    pub(crate) delete_all: Stmt,
    pub(crate) notify: Stmt,
    pub(crate) notify_all: Stmt,
    pub(crate) notify_seq: Stmt,
    pub(crate) notify_seq_one: Stmt,
    pub(crate) consumers: Stmt,
    pub(crate) consumers_limited: Stmt,
    pub(crate) realm_graph: Stmt,
    pub(crate) begin: Stmt,
    pub(crate) commit: Stmt,
    pub(crate) row_count: Stmt,
    keeper: TimerKeeper,
    /// How many statements `Sql::new` built (each connection's table has a place for each).
    listed: usize,
    connections: Connections,
}

impl Sql {
    /// `schema`: validated by `PgConfig`. `unnamed`: through a transaction pooler.
    /// `diagnostics`: the table's diagnostics column (see `schema::TableInfo`).
    pub(crate) fn new(schema: Option<&str>, unnamed: bool, diagnostics: &str) -> Sql {
        use crate::{guard, invalidate, store};
        let prefix = schema.map(|s| format!("{s}.")).unwrap_or_default();
        let mut listed = 0;
        let mut stmt = |text: &str, types: &[Type]| {
            listed += 1;
            Stmt {
                text: text.replace(SCHEMA, &prefix).replace("_D_", diagnostics),
                types: types.to_vec(),
                index: listed - 1,
            }
        };
        Sql {
            unnamed,
            read_row: stmt(&store::read_row_sql(), types::READ_ROW),
            read_batch: stmt(&store::read_batch_sql(), types::READ_BATCH),
            stamp: stmt(guard::STAMP, types::TEXT),
            plain_upsert: stmt(&store::plain_upsert_sql(), types::ROW),
            guarded_insert: stmt(
                &store::guarded_insert_sql(),
                &[types::ROW, &[Type::TEXT_ARRAY, Type::INT8]].concat(),
            ),
            lock_realm_shared: stmt(guard::LOCK_REALM_SHARED, types::LOCK_REALM),
            open_realm: stmt(guard::OPEN_REALM, types::LOCK_REALM),
            open_realm_leaf: stmt(guard::OPEN_REALM_LEAF, types::LOCK_REALM),
            open_global: stmt(guard::OPEN_GLOBAL, types::LOCK_GLOBAL),
            settings: stmt(guard::SETTINGS, types::NONE),
            leaf: stmt(invalidate::LEAF, types::TEXT_TEXTS),
            leaf_tail: stmt(
                invalidate::LEAF_TAIL,
                &[Type::TEXT, Type::TEXT_ARRAY, Type::TEXT_ARRAY],
            ),
            record_modules: stmt(guard::RECORD_MODULES, types::TEXT_TEXTS),
            prune: stmt(guard::PRUNE, &[Type::TEXT, Type::FLOAT8]),
            record_clear: stmt(guard::RECORD_CLEAR, types::TEXT),
            delete_modules: stmt(
                invalidate::DELETE_MODULES,
                &[Type::TEXT, Type::TEXT_ARRAY, Type::TEXT_ARRAY],
            ),
            delete_by_hash: stmt(invalidate::DELETE_BY_HASH, types::TEXT_TEXTS),
            delete_by_alias: stmt(invalidate::DELETE_BY_ALIAS, types::TEXT_TEXTS),
            delete_in_realm: stmt(invalidate::DELETE_IN_REALM, types::TEXT_TEXTS),
            delete_named_in_realm: stmt(invalidate::DELETE_NAMED_IN_REALM, types::TEXT_TEXTS),
            delete_realm_but: stmt(invalidate::DELETE_REALM_BUT, types::TEXT_TEXTS),
            delete_realm: stmt(invalidate::DELETE_REALM, types::TEXT),
            delete_all: stmt(invalidate::DELETE_ALL, types::NONE),
            notify: stmt(invalidate::NOTIFY, types::TWO_TEXTS),
            notify_all: stmt(invalidate::NOTIFY_ALL, types::TEXT_TEXTS),
            notify_seq: stmt(invalidate::NOTIFY_SEQ, types::TEXT_TEXTS),
            notify_seq_one: stmt(invalidate::NOTIFY_SEQ_ONE, types::TWO_TEXTS),
            consumers: stmt(invalidate::CONSUMERS, types::TEXT_TEXTS),
            consumers_limited: stmt(invalidate::CONSUMERS_LIMITED, types::TEXT_TEXTS_INT),
            realm_graph: stmt(invalidate::REALM_GRAPH, types::TEXT),
            begin: stmt("BEGIN", types::NONE),
            commit: stmt("COMMIT", types::NONE),
            row_count: stmt("SELECT count(*) FROM _S_modules", types::NONE),
            listed,
            connections: Connections::default(),
            prefix,
            keeper: TimerKeeper::default(),
        }
    }

    /// Every statement, by name (for the plan tests).
    #[cfg(test)]
    fn named(&self) -> Vec<(&'static str, &Stmt)> {
        vec![
            ("read_row", &self.read_row),
            ("read_batch", &self.read_batch),
            ("stamp", &self.stamp),
            ("plain_upsert", &self.plain_upsert),
            ("guarded_insert", &self.guarded_insert),
            ("lock_realm_shared", &self.lock_realm_shared),
            ("open_realm", &self.open_realm),
            ("open_realm_leaf", &self.open_realm_leaf),
            ("open_global", &self.open_global),
            ("settings", &self.settings),
            ("leaf", &self.leaf),
            ("leaf_tail", &self.leaf_tail),
            ("record_modules", &self.record_modules),
            ("prune", &self.prune),
            ("record_clear", &self.record_clear),
            ("delete_modules", &self.delete_modules),
            ("delete_by_hash", &self.delete_by_hash),
            ("delete_by_alias", &self.delete_by_alias),
            ("delete_in_realm", &self.delete_in_realm),
            ("delete_named_in_realm", &self.delete_named_in_realm),
            ("delete_realm_but", &self.delete_realm_but),
            ("delete_realm", &self.delete_realm),
            ("delete_all", &self.delete_all),
            ("notify", &self.notify),
            ("notify_all", &self.notify_all),
            ("notify_seq", &self.notify_seq),
            ("notify_seq_one", &self.notify_seq_one),
            ("consumers", &self.consumers),
            ("consumers_limited", &self.consumers_limited),
            ("realm_graph", &self.realm_graph),
            ("begin", &self.begin),
            ("commit", &self.commit),
            ("row_count", &self.row_count),
        ]
    }

    /// How many connections have a table of prepared statements.
    #[cfg(test)]
    pub(crate) fn connections(&self) -> usize {
        self.connections.len()
    }

    /// Whether statements are sent unnamed (through a transaction pooler).
    pub(crate) fn unnamed(&self) -> bool {
        self.unnamed
    }

    /// `text` with the schema filled in.
    pub(crate) fn text(&self, text: &str) -> String {
        text.replace(SCHEMA, &self.prefix)
    }

    /// Prepares `statements` on `client` ahead of use (a no-op when unnamed), into the
    /// connection's table, so that a later [`query`](Self::query) finds each there and sends
    /// its request on its first poll: what pipelining needs. Those not prepared yet are
    /// prepared in one flight, not one round trip each (an invalidation on a fresh connection
    /// prepares a dozen).
    pub(crate) async fn prepare(
        &self,
        client: &ClientWrapper,
        statements: &[&Stmt],
    ) -> Result<(), tokio_postgres::Error> {
        if self.unnamed {
            return Ok(());
        }
        let table = self.connections.of(client, self.listed);
        if statements.iter().all(|statement| slot(&table, statement.index).is_some()) {
            // The usual case, a connection that has run these before: no flight to build.
            return Ok(());
        }
        type Statement = Result<tokio_postgres::Statement, tokio_postgres::Error>;
        let preparing: Vec<Pending<'_, Statement>> = statements
            .iter()
            .map(|statement| {
                Box::pin(self.statement(client, &table, statement)) as Pending<'_, Statement>
            })
            .collect();
        pipelined(preparing).await.into_iter().try_for_each(|prepared| prepared.map(drop))
    }

    /// Whether a request of `statement` on `client` is sent on its first poll: always when
    /// unnamed, otherwise once [`prepare`](Self::prepare)d on that connection.
    pub(crate) fn is_ready(&self, client: &ClientWrapper, statement: &Stmt) -> bool {
        self.unnamed || self.connections.prepared(client, statement.index)
    }

    /// `statement` as prepared on `client`, whose statements `table` holds: from the table,
    /// or prepared (through the connection's cache) and kept there.
    async fn statement(
        &self,
        client: &ClientWrapper,
        table: &[OnceLock<tokio_postgres::Statement>],
        statement: &Stmt,
    ) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        if let Some(prepared) = slot(table, statement.index) {
            return Ok(prepared.clone());
        }
        let prepared = client.prepare_cached(&statement.text).await?;
        Ok(match table.get(statement.index) {
            Some(place) => place.get_or_init(|| prepared).clone(),
            None => prepared,
        })
    }

    /// Runs `statement` with `params` and hands each row to `each` as it arrives, without
    /// collecting them first: for a large result, the caller's work on the rows overlaps the
    /// server's scan and the transfer (measured: decoding a 10 000-row realm's edges took 3 ms
    /// after the 6 ms it took them to arrive). The statement as the connection's table holds
    /// it, or prepared now (see [`prepare`](Self::prepare)). Answers the count of the
    /// statement's command tag, when it has one (see [`answer`](Self::answer)).
    pub(crate) async fn for_each_row(
        &self,
        client: &ClientWrapper,
        statement: &Stmt,
        params: &[&(dyn ToSql + Sync)],
        mut each: impl FnMut(Row),
    ) -> Result<Option<u64>, tokio_postgres::Error> {
        use futures_core::Stream as _;
        // Before the operation's timeout registers its timer, which happens once this first
        // poll is pending.
        self.keeper.keep();
        // Boxed, so that every query's future does not hold theirs inline (see
        // `PgAdapter::client`): the preparing a statement not in the connection's table yet
        // needs (a large future, rarely run), and the unnamed request.
        let stream = if self.unnamed {
            debug_assert_eq!(params.len(), statement.types.len(), "{}", statement.text);
            let typed = params.iter().copied().zip(statement.types.iter().cloned());
            Box::pin(client.query_typed_raw(&statement.text, typed)).await?
        } else {
            let table = self.connections.of(client, self.listed);
            let prepared = match slot(&table, statement.index) {
                Some(prepared) => prepared.clone(),
                None => Box::pin(self.statement(client, &table, statement)).await?,
            };
            client.query_raw(&prepared, params.iter().copied()).await?
        };
        let mut stream = std::pin::pin!(stream);
        while let Some(row) = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)).await {
            each(row?);
        }
        Ok(stream.rows_affected())
    }

    /// Runs `statement` with `params` (as many as its types). A prepared statement's request
    /// is sent on the first poll once [`prepare`](Self::prepare)d; an unnamed one's always is.
    pub(crate) async fn query(
        &self,
        client: &ClientWrapper,
        statement: &Stmt,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        Ok(self.answer(client, statement, params).await?.rows)
    }

    /// [`query`](Self::query), with the count of its command tag: for a DELETE, the rows it
    /// deleted, which then need no `RETURNING` and no counting query around it.
    pub(crate) async fn answer(
        &self,
        client: &ClientWrapper,
        statement: &Stmt,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Answer, tokio_postgres::Error> {
        let mut rows = Vec::new();
        let written = self.for_each_row(client, statement, params, |row| rows.push(row)).await?;
        Ok(Answer { rows, written: written.unwrap_or(0) })
    }
}

/// A statement's rows, and the count of its command tag (see [`Sql::answer`]).
#[derive(Debug, Default)]
pub(crate) struct Answer {
    pub(crate) rows: Vec<Row>,
    /// The count of the command tag: the rows a DELETE deleted (a SELECT's counts the rows
    /// returned); 0 when the tag has none.
    pub(crate) written: u64,
}

/// How far ahead the [`TimerKeeper`]'s timer is due: shorter than any sensible operation
/// timeout (15 s by default), long enough that re-arming it costs nothing measurable.
const KEEPER_PERIOD: Duration = Duration::from_secs(1);

/// Keeps a timer of the adapter's pending in the runtime's timer wheel, so that registering an
/// operation's timeout does not wake the timer driver.
///
/// Every operation runs under a timeout (`PgAdapter::bounded`). Tokio wakes its timer driver
/// (a system call, and a worker thread that wakes up for nothing) whenever a timer is
/// registered that is due sooner than any the driver knew of when it went to sleep, which is
/// always when it knew of none: on a runtime with no other timer, one more wake-up per query,
/// a couple of microseconds of a cache hit (measured). This timer is due within
/// [`KEEPER_PERIOD`], before any operation's deadline, so an operation's timer is never the
/// soonest and registering it wakes nobody. Nothing runs when it fires; the next query arms it
/// again (at most once a period while queries flow, not at all once they stop).
#[derive(Default)]
struct TimerKeeper {
    /// When the armed timer is due, in nanoseconds after `origin` (0: none armed yet).
    due: AtomicU64,
    origin: std::sync::OnceLock<Instant>,
    /// The timer, in the runtime it was made in (a timer must not be touched from another
    /// runtime, which may be gone).
    timer: Mutex<Option<(tokio::runtime::Id, Pin<Box<Sleep>>)>>,
}

impl std::fmt::Debug for TimerKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimerKeeper").field("due", &self.due).finish_non_exhaustive()
    }
}

impl TimerKeeper {
    fn keep(&self) {
        let now = Instant::now();
        let origin = *self.origin.get_or_init(|| now);
        let nanos = |at: Instant| {
            u64::try_from(at.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX)
        };
        if self.due.load(Ordering::Relaxed) > nanos(now) {
            return;
        }
        // Outside a runtime there is no timer to keep; when another query is arming it, that
        // one is enough.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(mut timer) = self.timer.try_lock() else {
            return;
        };
        let deadline = now + KEEPER_PERIOD;
        let sleep = match &mut *timer {
            Some((id, sleep)) if *id == runtime.id() => sleep,
            slot => {
                &mut slot.insert((runtime.id(), Box::pin(tokio::time::sleep_until(deadline)))).1
            }
        };
        // Registers the timer with the driver; no task waits on it.
        sleep.as_mut().reset(deadline);
        self.due.store(nanos(deadline), Ordering::Relaxed);
    }
}

/// Parameter types, named once.
pub(crate) mod types {
    use tokio_postgres::types::Type;

    pub(crate) const NONE: &[Type] = &[];
    pub(crate) const TEXT: &[Type] = &[Type::TEXT];
    pub(crate) const TEXT_TEXTS: &[Type] = &[Type::TEXT, Type::TEXT_ARRAY];
    pub(crate) const TEXT_TEXTS_INT: &[Type] = &[Type::TEXT, Type::TEXT_ARRAY, Type::INT8];
    pub(crate) const TWO_TEXTS: &[Type] = &[Type::TEXT, Type::TEXT];
    pub(crate) const READ_ROW: &[Type] = &[Type::TEXT; 5];
    pub(crate) const READ_BATCH: &[Type] = &[Type::TEXT, Type::TEXT, Type::TEXT, Type::TEXT_ARRAY];
    pub(crate) const LOCK_REALM: &[Type] = &[Type::INT4, Type::TEXT, Type::INT4];
    pub(crate) const LOCK_GLOBAL: &[Type] = &[Type::INT4];
    /// The ten columns of a row, in `store::COLUMNS` order.
    pub(crate) const ROW: &[Type] = &[
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::JSONB,
        Type::JSONB,
        Type::JSONB,
        Type::INT8,
        Type::TEXT,
        Type::JSONB,
    ];
}

#[cfg(test)]
mod plans;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_statement_declares_a_type_for_each_of_its_parameters() {
        // Unnamed statements are sent with these types, one per parameter value.
        let sql = Sql::new(Some("s"), true, "diagnostics");
        for (name, statement) in sql.named() {
            let text = statement.text.as_bytes();
            let highest = (0..text.len())
                .filter(|&i| text[i] == b'$')
                .filter_map(|i| {
                    let digits: String = text[i + 1..]
                        .iter()
                        .take_while(|b| b.is_ascii_digit())
                        .map(|&b| b as char)
                        .collect();
                    digits.parse::<usize>().ok()
                })
                .max()
                .unwrap_or(0);
            assert_eq!(highest, statement.types.len(), "{name}: {}", statement.text);
        }
    }

    #[test]
    fn the_keeper_needs_a_runtime() {
        let keeper = TimerKeeper::default();
        keeper.keep();
        assert_eq!(keeper.due.load(Ordering::Relaxed), 0);
        assert!(keeper.timer.lock().expect("not poisoned").is_none());
    }

    #[tokio::test]
    async fn the_keeper_arms_its_timer_once_a_period() {
        let keeper = TimerKeeper::default();
        keeper.keep();
        let due = keeper.due.load(Ordering::Relaxed);
        assert!(due > 0);
        {
            let timer = keeper.timer.lock().expect("not poisoned");
            let (id, sleep) = timer.as_ref().expect("armed");
            assert_eq!(*id, tokio::runtime::Handle::current().id());
            assert!(!sleep.is_elapsed());
        }
        keeper.keep();
        assert_eq!(keeper.due.load(Ordering::Relaxed), due, "still armed: left alone");
    }
}
