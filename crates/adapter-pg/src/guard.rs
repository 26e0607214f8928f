//! The durable persist guard: correctness that does not depend on NOTIFY timing.
//!
//! The in-memory generations stop a load from persisting after an invalidation this process
//! *heard of*. A peer's invalidation is heard only after its NOTIFY arrives, and not at all
//! while the listener is disconnected; a render finishing in that window would re-insert the
//! row the peer just deleted. The guard closes the window in the database itself:
//!
//! - Every invalidation takes a sequence number and records it, in the same transaction as
//!   its DELETE: a module fan-out as one entry of the log (`modules_guard_log`: realm,
//!   number, the URLs), and every invalidation in its realm's row (`modules_guard_realm`:
//!   `latest` for any invalidation of the realm, `cleared` for a whole-realm clear; the row
//!   `''` is the global scope).
//! - A load records its *stamp* when it starts: the newest committed sequence of its realm
//!   and of the global scope.
//! - A persist succeeds only if no invalidation newer than the stamp covers the row's URL, its
//!   alias or one of its dependencies, its realm, or everything.
//!
//! Why the stamp is sound: invalidations of one realm hold an exclusive transaction-scoped
//! advisory lock on the realm (and a shared one on the global key); a global clear holds the
//! global key exclusively. So the invalidations that can cover a realm commit one at a time,
//! and each takes its sequence number while holding the lock: within a realm, sequence order
//! is commit order. A stamp read from committed rows is therefore below the number of every
//! invalidation covering the realm that commits later, including one in progress at the time.
//!
//! Why the check is sound: a persist takes the same two keys *shared*, checks and writes in
//! one statement, and commits before releasing them. An invalidation covering the realm either
//! committed before the check (its record is seen) or starts after the persist committed (its
//! DELETE removes the row). Locks are always taken global first, then realm, so the two
//! orders cannot deadlock.
//!
//! Log entries older than the horizon are pruned by the realm's later module invalidations (at
//! most [`PRUNE_BATCH`] at a time, when the realm is due: see [`PruneGate`]; clears prune
//! nothing, their realm row covers what they clear); the realm remembers the newest pruned
//! sequence, and a load stamped before it is treated as stale, since what it would have
//! needed to check is gone.

/// Advisory lock namespaces (the two-key form, which never overlaps the one-key form used for
/// schema changes and populate coalescing): "dflg" for the global key, "dflr" for realms.
pub(crate) const LOCK_NS_GLOBAL: i32 = 0x6466_6c67;
/// See [`LOCK_NS_GLOBAL`].
pub(crate) const LOCK_NS_REALM: i32 = 0x6466_6c72;

/// Takes the global key shared, then the realm key shared (a guarded persist). The FROM
/// subquery runs first, and it is not flattened (it calls a volatile function), which fixes
/// the order: global before realm, everywhere.
pub(crate) const LOCK_REALM_SHARED: &str = "SELECT pg_advisory_xact_lock_shared($1, hashtext($2)) \
     FROM (SELECT pg_advisory_xact_lock_shared($3, 0)) AS g";

/// Settings of an invalidation's transaction (`set_config(…, true)`: they end with it).
///
/// - `jit = off`: the consumer closure is a recursive query whose estimated cost grows with
///   the table (the planner assumes every step multiplies the rows), far past the threshold
///   at which Postgres compiles a query to machine code; measured on a 100 000-row table,
///   compiling took 270-630 ms of a query that ran in 0.2 ms, on every invalidation.
/// - `work_mem = 64kB`: the closure's de-duplicating hash table is allocated up front at the
///   size the same estimate asks for, capped by `work_mem`: with the default 4 MB, 3 ms of a
///   0.5 ms query; with 64 MB, 8 ms. The table still grows as far as a real closure needs.
///
/// - `plan_cache_mode = force_generic_plan`: each statement is planned once per connection,
///   for any values, instead of for its values on a connection's first five runs (Postgres'
///   default). A plan for the values of a fan-out is planned for its thousands of constants:
///   measured on the bench's 10 000-module fan-out, 15 ms of the DELETE's 21 ms went to
///   binding it (planning included), and the closure's custom plans cost 3-6 ms each; the generic
///   plans are the ones the plan test (`sql/plans.rs`) checks, which probe indexes however many
///   names a statement carries.
/// - `enable_sort = off`: the guard record's prune reads a realm's oldest log entries in the
///   order of the `(md5(realm), seq)` index. A generic plan estimates a realm to one entry
///   (the hash and the exact comparison together) and would as soon read them all and sort
///   them: 2 ms on a realm with 2 000 entries, growing with the log (the plan test builds
///   one). No statement of an invalidation needs a sort.
///
/// With them, `deflookup.apply = on`: the statements that write ([`RECORD_MODULES`],
/// [`RECORD_CLEAR`], [`PRUNE`], the DELETE of a fan-out and the NOTIFYs) act only while it is on, and an
/// invalidation that finds its module has consumers turns it off (see `invalidate.rs`).
///
/// Sent in the statement that takes the lock (no statement of its own), or alone when the
/// guard is off ([`SETTINGS`]).
macro_rules! settings {
    () => {
        concat!(
            leaf_settings!(),
            ", set_config('work_mem', '64kB', true), set_config('enable_sort', 'off', true)"
        )
    };
}

/// The [`settings!`] a module's own invalidation needs when the realm is not due for a prune
/// ([`OPEN_REALM_LEAF`]): `work_mem` serves the closure and `enable_sort` the prune, neither
/// of which its transaction runs. Each `set_config` costs the server about 10 000
/// instructions (callgrind), on the path most invalidations take.
macro_rules! leaf_settings {
    () => {
        "set_config('jit', 'off', true), \
         set_config('plan_cache_mode', 'force_generic_plan', true), \
         set_config('deflookup.apply', 'on', true)"
    };
}

/// [`settings!`] alone: for an invalidation without the guard, and for the closure read
/// outside an invalidation.
pub(crate) const SETTINGS: &str = concat!("SELECT ", settings!());

/// Whether this transaction's writes go ahead (see [`settings!`]).
macro_rules! apply {
    () => {
        "current_setting('deflookup.apply')::boolean"
    };
}
pub(crate) use apply;

/// The number [`OPEN_REALM`] or [`OPEN_GLOBAL`] took in this transaction, as one value (a
/// subquery, evaluated once: an index can be searched with it).
macro_rules! taken {
    () => {
        "(SELECT currval('_S_modules_guard_seq'))"
    };
}
pub(crate) use taken;

/// Opens a realm's invalidation: takes the global key shared, then the realm key exclusive
/// (see [`LOCK_REALM_SHARED`] for the order), then the invalidation's sequence number, and
/// applies [`settings!`]. The number is taken once the lock is held (the outer SELECT is
/// evaluated on the row the subquery returns): what makes sequence order commit order.
pub(crate) const OPEN_REALM: &str = concat!(
    "SELECT nextval('_S_modules_guard_seq'), ",
    settings!(),
    " FROM (SELECT pg_advisory_xact_lock($1, hashtext($2)) \
     FROM (SELECT pg_advisory_xact_lock_shared($3, 0)) AS g) AS l"
);
/// [`leaf_settings!`] alone, for the plan test.
#[cfg(test)]
pub(crate) const LEAF_SETTINGS: &str = concat!("SELECT ", leaf_settings!());

/// [`OPEN_REALM`] with [`leaf_settings!`]: for a module's own invalidation in a realm not due
/// for a prune, whose check, record and DELETE are one statement (`invalidate::LEAF_TAIL`).
pub(crate) const OPEN_REALM_LEAF: &str = concat!(
    "SELECT nextval('_S_modules_guard_seq'), ",
    leaf_settings!(),
    " FROM (SELECT pg_advisory_xact_lock($1, hashtext($2)) \
     FROM (SELECT pg_advisory_xact_lock_shared($3, 0)) AS g) AS l"
);
/// Opens a global clear, which excludes every persist and every realm invalidation: the
/// global key exclusive, then the number and the settings, as [`OPEN_REALM`].
pub(crate) const OPEN_GLOBAL: &str = concat!(
    "SELECT nextval('_S_modules_guard_seq'), ",
    settings!(),
    " FROM (SELECT pg_advisory_xact_lock($1, 0)) AS l"
);

// Rows are found by `md5(realm)` (the indexes of schema versions 4 and 6), so that realm URLs
// of any length Postgres can store fit an index; the plain comparison next to each hash keeps
// the answer exact.

/// The stamp of a load in realm `$1`.
pub(crate) const STAMP: &str = "SELECT coalesce(max(latest), 0) FROM _S_modules_guard_realm \
     WHERE md5(realm) IN (md5($1), md5('')) AND realm IN ($1, '')";

/// Records a module fan-out as one entry of the log: `$1` realm, `$2` its URLs; the number is
/// the one [`OPEN_REALM`] (or [`OPEN_REALM_LEAF`]) took. In the same statement, the realm's
/// row notes the number, by an upsert (under the realm's lock nobody else writes the row; its
/// arbiter is the rows' unique `md5(realm)`, as for [`RECORD_CLEAR`], so two realm URLs with
/// one md5 would share a row). Nothing when [`apply!`] is off.
///
/// One upsert rather than an UPDATE and an INSERT for a missing row: each data-modifying part
/// costs the executor its start-up (opening the table and its index) whether or not it
/// writes, and counted with callgrind the upsert saved 26 000 of a leaf invalidation's 906 000
/// server instructions, for 56 more bytes of WAL (the tuple lock it takes before updating).
///
/// An entry's `at` is its statement's start, after the lock: within a realm, `at` grows with
/// `seq`, so the entries past the horizon are the realm's first ones in `seq` order (what
/// [`PRUNE`] relies on).
pub(crate) const RECORD_MODULES: &str =
    concat!("WITH ", record_modules_ctes!(apply!()), " SELECT 1");

/// [`RECORD_MODULES`]'s writes, as the parts `u` and `g` of a `WITH`, each writing only
/// when the condition `$when` holds (`$1` realm, `$2` its URLs): also run, gated on its
/// consumer check, by `invalidate::LEAF_TAIL`.
macro_rules! record_modules_ctes {
    ($when:expr) => {
        concat!(
            "u AS (INSERT INTO _S_modules_guard_realm (realm, latest) SELECT $1, ",
            $crate::guard::taken!(),
            " WHERE ",
            $when,
            " ON CONFLICT ((md5(realm))) DO UPDATE SET latest = EXCLUDED.latest), \
             g AS (INSERT INTO _S_modules_guard_log (realm, seq, urls, at) SELECT $1, ",
            $crate::guard::taken!(),
            ", $2::text[], statement_timestamp() WHERE ",
            $when,
            ")"
        )
    };
}
pub(crate) use record_modules_ctes;

/// How many log entries one [`PRUNE`] deletes at most.
pub(crate) const PRUNE_BATCH: i64 = 64;

/// Deletes realm `$1`'s log entries older than `$2` seconds among its [`PRUNE_BATCH`] oldest,
/// and notes the newest number deleted in the realm's row (`pruned_through`); answers how
/// many it deleted. Sent after the guard's record in a module invalidation of the realm, when
/// the [`PruneGate`] says the realm is due (nothing when [`apply!`] is off). Never the entry
/// this transaction records (with a horizon near zero it would be old enough already): the
/// entry covers loads until the next invalidation prunes it, as when the prune was part of the
/// record's own statement.
///
/// It reads only the oldest [`PRUNE_BATCH`] entries of the `(md5(realm), seq)` index, whether
/// or not they are past the horizon: a realm's entries past the horizon are its first ones in
/// `seq` order (see [`RECORD_MODULES`]), so a backlog (a burst of invalidations aging out at
/// once) drains a bounded batch at a time instead of being read whole (measured: 52 ms an
/// invalidation with 30 000 entries aged out, when the prune looked for the first young one).
pub(crate) const PRUNE: &str = concat!(
    "WITH gone AS (DELETE FROM _S_modules_guard_log \
         WHERE md5(realm) = md5($1) AND seq = ANY (ARRAY( \
             SELECT seq FROM _S_modules_guard_log WHERE md5(realm) = md5($1) AND realm = $1 \
             ORDER BY seq LIMIT 64)) \
         AND at < statement_timestamp() - make_interval(secs => $2) AND seq < ",
    taken!(),
    " AND ",
    apply!(),
    " RETURNING seq), \
     u AS (UPDATE _S_modules_guard_realm \
         SET pruned_through = greatest(pruned_through, (SELECT max(seq) FROM gone)) \
         WHERE md5(realm) = md5($1) AND realm = $1 AND EXISTS (SELECT 1 FROM gone)) \
     SELECT count(*) FROM gone"
);

/// When each realm's log is next due for a [`PRUNE`], in this process.
///
/// Checking on every invalidation cost as much as recording it (about 40 µs of a statement
/// that usually found nothing to delete). A realm is due when this process has not checked
/// it yet, or a period after its last check (a sixteenth of the horizon), or at once when the
/// last check filled its batch (a backlog drains one batch an invalidation). So an entry
/// outlives the horizon by a period at most, plus the wait for the realm's next module
/// invalidation, in any process; nothing depends on how soon entries go (a load stamped before
/// the newest pruned number is refused, see the module docs), only the log's size.
#[derive(Debug)]
pub(crate) struct PruneGate {
    period: std::time::Duration,
    next: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl PruneGate {
    /// Realms remembered at most: past that the memory starts over (every realm due once).
    const REALMS: usize = 4096;

    /// The longest wait between two checks of a realm, whatever the horizon.
    const LONGEST_PERIOD: std::time::Duration = std::time::Duration::from_secs(3600);

    /// A gate for `horizon`.
    pub(crate) fn new(horizon: std::time::Duration) -> PruneGate {
        let period = (horizon / 16).min(Self::LONGEST_PERIOD);
        PruneGate { period, next: Default::default() }
    }

    /// Whether `realm`'s log is due for a check.
    pub(crate) fn due(&self, realm: &str) -> bool {
        let next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        next.get(realm).is_none_or(|at| *at <= std::time::Instant::now())
    }

    /// `realm`'s log was checked and `pruned` entries deleted.
    pub(crate) fn checked(&self, realm: &str, pruned: i64) {
        let mut next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if pruned >= PRUNE_BATCH {
            next.remove(realm);
            return;
        }
        if next.len() >= Self::REALMS && !next.contains_key(realm) {
            next.clear();
        }
        next.insert(realm.to_owned(), std::time::Instant::now() + self.period);
    }
}

/// Records a whole-realm (or, with `''`, global) clear: `$1` realm; the number is the one
/// taken by [`OPEN_REALM`] or [`OPEN_GLOBAL`]. Nothing when [`apply!`] is off.
pub(crate) const RECORD_CLEAR: &str = concat!(
    "INSERT INTO _S_modules_guard_realm (realm, latest, cleared) SELECT $1, s, s FROM ",
    taken!(),
    " AS n(s) WHERE ",
    apply!(),
    " ON CONFLICT ((md5(realm))) DO UPDATE SET latest = EXCLUDED.latest, cleared = EXCLUDED.cleared"
);

/// The condition under which a persist of a row in realm `$4`, checking URLs `$11` with stamp
/// `$12`, is still fresh.
pub(crate) const FRESH: &str = "NOT EXISTS (SELECT 1 FROM _S_modules_guard_log \
         WHERE md5(realm) = md5($4) AND realm = $4 AND seq > $12 AND urls && $11::text[]) \
     AND NOT EXISTS (SELECT 1 FROM _S_modules_guard_realm WHERE \
         (md5(realm) = md5($4) AND realm = $4 AND (cleared > $12 OR pruned_through > $12)) \
         OR (md5(realm) = md5('') AND realm = '' AND cleared > $12))";

/// What the log holds past a listener's position, in one statement (one snapshot, so the
/// realm rows and the URL records agree; no transaction, so it works through a transaction
/// pooler). `$1`/`$2`: the realms the listener has a mark for (each once) and their marks;
/// `$3`: its global mark, which every realm's mark is at least. One row per realm whose
/// `latest` is past its mark, or below the realm's own mark (the log went back: a failover
/// to a replica that had not seen it all, a restore), with its `cleared` and
/// `pruned_through`; when neither is past the mark, one row per URL recorded past it instead
/// (the URL column is NULL otherwise).
pub(crate) const LOG_SINCE: &str = "WITH m AS (SELECT * FROM unnest($1::text[], $2::bigint[]) AS m(realm, mark)), \
     r AS (SELECT g.realm, g.latest, g.cleared, g.pruned_through, coalesce(m.mark, 0) AS own, \
                  greatest(coalesce(m.mark, 0), $3) AS mark \
           FROM _S_modules_guard_realm g LEFT JOIN m ON m.realm = g.realm) \
     SELECT r.realm, r.latest, r.cleared, r.pruned_through, r.mark, r.own, u.url FROM r \
     LEFT JOIN LATERAL (SELECT unnest(x.urls) AS url FROM _S_modules_guard_log x \
         WHERE md5(x.realm) = md5(r.realm) AND x.realm = r.realm AND x.seq > r.mark \
         AND r.cleared <= r.mark AND r.pruned_through <= r.mark) AS u ON true \
     WHERE r.latest > r.mark OR r.latest < r.own";

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_prune_reads_one_batch() {
        assert!(PRUNE.contains(&format!("LIMIT {PRUNE_BATCH})")), "{PRUNE}");
    }

    #[test]
    fn a_realm_is_due_until_checked_then_after_a_period_or_at_once_after_a_full_batch() {
        let gate = PruneGate::new(Duration::from_secs(1600));
        assert!(gate.due("a"), "never checked");
        gate.checked("a", 3);
        assert!(!gate.due("a"), "checked a moment ago, less than a batch found");
        assert!(gate.due("b"), "another realm");
        gate.checked("a", PRUNE_BATCH);
        assert!(gate.due("a"), "a full batch: the backlog goes on at the next invalidation");
        let soon = PruneGate::new(Duration::ZERO);
        soon.checked("a", 0);
        assert!(soon.due("a"), "the period has passed");
    }

    #[test]
    fn the_gate_remembers_a_bounded_number_of_realms() {
        let gate = PruneGate::new(Duration::from_secs(1600));
        for realm in 0..PruneGate::REALMS {
            gate.checked(&realm.to_string(), 0);
        }
        assert!(!gate.due("0"));
        gate.checked("one more", 0);
        assert!(gate.due("0"), "started over");
        assert!(!gate.due("one more"));
        let size = gate.next.lock().unwrap().len();
        assert_eq!(size, 1);
    }
}
