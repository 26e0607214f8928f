//! The durable persist guard: correctness that does not depend on NOTIFY timing.
//!
//! The in-memory generations stop a load from persisting after an invalidation this process
//! *heard of*. A peer's invalidation is heard only after its NOTIFY arrives, and not at all
//! while the listener is disconnected; a render finishing in that window would re-insert the
//! row the peer just deleted. The guard closes the window in the database itself:
//!
//! - Every invalidation takes a sequence number and records it, in the same transaction as
//!   its DELETE: per invalidated URL (`modules_guard`), and per realm (`modules_guard_realm`:
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
//! Records older than the horizon are pruned (by the next invalidation of the realm); the
//! realm remembers the newest pruned sequence, and a load stamped before it is treated as
//! stale, since what it would have needed to check is gone.

/// Advisory lock namespaces (the two-key form, which never overlaps the one-key form used for
/// schema changes and populate coalescing): "dflg" for the global key, "dflr" for realms.
pub(crate) const LOCK_NS_GLOBAL: i32 = 0x6466_6c67;
/// See [`LOCK_NS_GLOBAL`].
pub(crate) const LOCK_NS_REALM: i32 = 0x6466_6c72;

/// Takes the global key shared, then the realm key (exclusive when `exclusive`). The FROM
/// subquery runs first, and it is not flattened (it calls a volatile function), which fixes
/// the order: global before realm, everywhere.
pub(crate) const LOCK_REALM_SHARED: &str = "SELECT pg_advisory_xact_lock_shared($1, hashtext($2)) \
     FROM (SELECT pg_advisory_xact_lock_shared($3, 0)) AS g";
/// See [`LOCK_REALM_SHARED`].
pub(crate) const LOCK_REALM_EXCLUSIVE: &str = "SELECT pg_advisory_xact_lock($1, hashtext($2)) \
     FROM (SELECT pg_advisory_xact_lock_shared($3, 0)) AS g";
/// A global clear excludes every persist and every realm invalidation.
pub(crate) const LOCK_GLOBAL_EXCLUSIVE: &str = "SELECT pg_advisory_xact_lock($1, 0)";

// Rows are found by `md5(realm)` and `md5(url)` (the unique indexes of schema version 4), so
// that URLs of any length Postgres can store fit an index; the plain comparison next to each
// hash keeps the answer exact.

/// The stamp of a load in realm `$1`.
pub(crate) const STAMP: &str = "SELECT coalesce(max(latest), 0) FROM _S_modules_guard_realm \
     WHERE md5(realm) IN (md5($1), md5('')) AND realm IN ($1, '')";

/// Takes an invalidation's sequence number. Sent after the lock statement (same transaction),
/// so the number is taken while holding the lock: what makes sequence order commit order.
pub(crate) const NEXT_SEQ: &str = "SELECT nextval('_S_modules_guard_seq')";

/// Records a module fan-out: `$1` realm, `$2` URLs, `$3` the sequence taken by [`NEXT_SEQ`].
pub(crate) const RECORD_MODULES: &str = "WITH r AS (INSERT INTO _S_modules_guard_realm (realm, latest) VALUES ($1, $3) \
           ON CONFLICT ((md5(realm))) DO UPDATE SET latest = EXCLUDED.latest) \
     INSERT INTO _S_modules_guard (realm, url, seq) \
           SELECT $1, x.url, $3 FROM (SELECT DISTINCT unnest($2::text[]) AS url) AS x \
           ON CONFLICT ((md5(realm)), (md5(url))) DO UPDATE SET seq = EXCLUDED.seq, at = now()";

/// Records a whole-realm (or, with `''`, global) clear: `$1` realm, `$2` the sequence.
pub(crate) const RECORD_CLEAR: &str = "INSERT INTO _S_modules_guard_realm (realm, latest, cleared) VALUES ($1, $2, $2) \
     ON CONFLICT ((md5(realm))) DO UPDATE SET latest = EXCLUDED.latest, cleared = EXCLUDED.cleared";

/// Forgets URL records of realm `$1` older than `$2` seconds, remembering the newest forgotten.
pub(crate) const PRUNE: &str = "WITH gone AS (DELETE FROM _S_modules_guard \
         WHERE md5(realm) = md5($1) AND realm = $1 AND at < now() - make_interval(secs => $2) \
         RETURNING seq) \
     UPDATE _S_modules_guard_realm SET pruned_through = greatest(pruned_through, \
         (SELECT max(seq) FROM gone)) \
     WHERE md5(realm) = md5($1) AND realm = $1 AND EXISTS (SELECT 1 FROM gone)";

/// The condition under which a persist of a row in realm `$4`, checking URLs `$11` with stamp
/// `$12`, is still fresh.
pub(crate) const FRESH: &str = "NOT EXISTS (SELECT 1 FROM _S_modules_guard \
         WHERE md5(realm) = md5($4) AND realm = $4 \
         AND md5(url) = ANY (SELECT md5(c) FROM unnest($11::text[]) AS c) \
         AND url = ANY ($11::text[]) AND seq > $12) \
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
     LEFT JOIN LATERAL (SELECT x.url FROM _S_modules_guard x \
         WHERE md5(x.realm) = md5(r.realm) AND x.realm = r.realm AND x.seq > r.mark \
         AND r.cleared <= r.mark AND r.pruned_through <= r.mark) AS u ON true \
     WHERE r.latest > r.mark OR r.latest < r.own";
