//! Reading the durable guard's records as a log of invalidations, for listeners that were
//! away (a lost connection) or that poll instead of listening.
//!
//! Every guarded invalidation takes a sequence number while holding its realm's lock (or the
//! global lock) and records it with its DELETE (see `guard.rs`). So, within one realm, and
//! between any realm and the global scope, sequence order is commit order. A listener keeps a
//! [`LogPosition`]: per realm, the newest number it has accounted for (heard, replayed, or
//! committed before it started), and a global mark that every realm's mark is at least.
//! Whatever it has not accounted for is exactly what the log holds past those marks:
//!
//! - an invalidation of realm `R` that commits later takes a number above every number of
//!   `R` committed so far, so above `R`'s mark;
//! - a global clear excludes every realm invalidation, so a realm's number below a global
//!   clear's committed before that clear: hearing the clear accounts for every realm up to it.
//!
//! The log forgets: entries older than the guard's horizon are pruned, the realm remembering
//! the newest number pruned. A position whose mark is below that cannot be
//! caught up from the log; [`LogRead::gaps`] names such realms.

use std::collections::{BTreeMap, HashMap};

use lookup_core::Invalidation;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::config::PgConfig;
use crate::error::PgError;
use crate::guard;
use crate::sql::SCHEMA;

/// Per realm, the newest invalidation number a listener has accounted for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogPosition {
    /// Realm URL → mark; the global scope is the realm `""`.
    marks: HashMap<String, i64>,
}

impl LogPosition {
    /// A position before everything: a read from it returns the whole log.
    pub fn new() -> Self {
        Self::default()
    }

    /// The mark of `realm` (`""` for the global scope): numbers at or below it are accounted
    /// for.
    pub fn mark(&self, realm: &str) -> i64 {
        let global = self.marks.get("").copied().unwrap_or(0);
        self.marks.get(realm).copied().unwrap_or(0).max(global)
    }

    /// Records that the invalidation numbered `seq` of `realm` (`""`: a global clear) was
    /// applied, and with it every earlier one of that realm (notifications arrive in commit
    /// order, and within a realm that is number order).
    pub fn heard(&mut self, realm: &str, seq: i64) {
        let mark = self.marks.entry(realm.to_owned()).or_insert(0);
        *mark = (*mark).max(seq);
    }

    /// Moves past what `read` returned.
    pub fn advance(&mut self, read: &LogRead) {
        for (realm, latest) in &read.latest {
            self.heard(realm, *latest);
        }
    }

    /// How many realms have a mark.
    pub fn realms(&self) -> usize {
        self.marks.len()
    }
}

/// What the log holds past a [`LogPosition`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogRead {
    /// What to replay: a global clear alone (it covers the rest), or per realm a realm clear
    /// or one module invalidation naming every URL recorded past the mark (in URL order; the
    /// log does not keep fan-out order).
    pub invalidations: Vec<Invalidation>,
    /// Realms whose records past the mark were partly pruned: the read cannot account for
    /// them. Empty when the read is complete.
    pub gaps: Vec<String>,
    /// Per realm read, its newest number ([`LogPosition::advance`] moves there).
    latest: Vec<(String, i64)>,
}

impl LogRead {
    /// Whether nothing was recorded past the position.
    pub fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }
}

/// Reads the log of one schema (the `PgConfig`'s), on any connection: the statement is sent
/// unnamed and self-contained, so it works through a transaction pooler too.
#[derive(Debug, Clone)]
pub struct GuardLog {
    since: String,
    latest: String,
}

/// One row of [`guard::LOG_SINCE`].
struct SinceRow {
    realm: String,
    latest: i64,
    cleared: i64,
    pruned_through: i64,
    mark: i64,
    /// The realm's own mark (without the global one).
    own: i64,
    url: Option<String>,
}

impl GuardLog {
    /// The log of `config`'s schema.
    pub fn new(config: &PgConfig) -> GuardLog {
        let prefix = config.get_schema().map(|s| format!("{s}.")).unwrap_or_default();
        GuardLog {
            since: guard::LOG_SINCE.replace(SCHEMA, &prefix),
            latest: "SELECT realm, latest FROM _S_modules_guard_realm".replace(SCHEMA, &prefix),
        }
    }

    /// The position of a listener that starts now: every realm at its newest committed
    /// number. Read it after `LISTEN` is established, so that whatever commits later is heard.
    pub async fn now(&self, client: &Client) -> Result<LogPosition, PgError> {
        let rows = client
            .query_typed(&self.latest, &[])
            .await
            .map_err(|e| PgError::query("read the invalidation log", e))?;
        let mut position = LogPosition::new();
        for row in rows {
            position.heard(row.try_get(0).map_err(log_error)?, row.try_get(1).map_err(log_error)?);
        }
        Ok(position)
    }

    /// What was recorded past `position`, in one statement.
    pub async fn read_since(
        &self,
        client: &Client,
        position: &LogPosition,
    ) -> Result<LogRead, PgError> {
        let realms: Vec<&str> = position.marks.keys().map(String::as_str).collect();
        let marks: Vec<i64> = position.marks.values().copied().collect();
        let global = position.mark("");
        let rows = client
            .query_typed(
                &self.since,
                &[(&realms, Type::TEXT_ARRAY), (&marks, Type::INT8_ARRAY), (&global, Type::INT8)],
            )
            .await
            .map_err(|e| PgError::query("read the invalidation log", e))?;
        let rows = rows
            .iter()
            .map(|row| {
                Ok(SinceRow {
                    realm: row.try_get(0)?,
                    latest: row.try_get(1)?,
                    cleared: row.try_get(2)?,
                    pruned_through: row.try_get(3)?,
                    mark: row.try_get(4)?,
                    own: row.try_get(5)?,
                    url: row.try_get(6)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(log_error)?;
        Ok(collect(rows))
    }
}

fn log_error(error: tokio_postgres::Error) -> PgError {
    PgError::query("read the invalidation log", error)
}

/// Groups the rows of [`guard::LOG_SINCE`] (in any order) into what to replay, realms in
/// URL order.
fn collect(rows: Vec<SinceRow>) -> LogRead {
    /// One realm's rows.
    struct Realm {
        latest: i64,
        gap: bool,
        cleared: bool,
        urls: Vec<String>,
    }
    let mut realms: BTreeMap<String, Realm> = BTreeMap::new();
    for row in rows {
        // A clear past the mark covers whatever of the realm was pruned; a log that went back
        // proves nothing.
        let cleared = row.cleared > row.mark && row.latest >= row.own;
        let realm = realms.entry(row.realm).or_insert(Realm {
            latest: row.latest,
            gap: row.latest < row.own || (row.pruned_through > row.mark && !cleared),
            cleared,
            urls: Vec::new(),
        });
        realm.urls.extend(row.url);
    }
    // Everything cleared past the global mark covers every realm's gap too.
    let global = realms.get("").is_some_and(|realm| realm.cleared && !realm.gap);
    let mut read = LogRead::default();
    let mut modules = Vec::new();
    for (realm_url, realm) in realms {
        if realm.gap && !global {
            read.gaps.push(realm_url.clone());
        } else if realm.cleared && realm_url.is_empty() {
            read.invalidations = vec![Invalidation::Global];
        } else if realm.cleared {
            read.invalidations.push(Invalidation::Realm { realm_url: realm_url.clone() });
        } else if !realm.urls.is_empty() {
            let mut urls = realm.urls;
            // A URL invalidated twice past the mark: one replay covers both.
            urls.sort_unstable();
            urls.dedup();
            modules.push(Invalidation::Modules { realm_url: realm_url.clone(), urls });
        }
        read.latest.push((realm_url, realm.latest));
    }
    // A global clear covers everything else (the realm `""` sorts first).
    if read.invalidations.first() != Some(&Invalidation::Global) {
        read.invalidations.extend(modules);
    } else {
        read.invalidations.truncate(1);
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        realm: &str,
        latest: i64,
        cleared: i64,
        pruned: i64,
        mark: i64,
        url: Option<&str>,
    ) -> SinceRow {
        SinceRow {
            realm: realm.into(),
            latest,
            cleared,
            pruned_through: pruned,
            mark,
            own: mark,
            url: url.map(str::to_owned),
        }
    }

    #[test]
    fn a_global_mark_accounts_for_every_realm_below_it() {
        let mut position = LogPosition::new();
        position.heard("R/", 5);
        assert_eq!((position.mark("R/"), position.mark("Q/"), position.mark("")), (5, 0, 0));
        position.heard("", 7);
        assert_eq!((position.mark("R/"), position.mark("Q/")), (7, 7));
        position.heard("R/", 9);
        position.heard("R/", 8);
        assert_eq!((position.mark("R/"), position.mark("Q/")), (9, 7), "marks never go back");
    }

    #[test]
    fn rows_group_into_one_replay_per_realm() {
        let read = collect(vec![
            row("A/", 12, 0, 0, 3, Some("A/x")),
            row("A/", 12, 0, 0, 3, Some("A/y")),
            row("B/", 9, 9, 0, 3, None),
            row("C/", 11, 0, 4, 3, None),
            row("D/", 10, 0, 0, 3, None),
        ]);
        assert_eq!(
            read.invalidations,
            [
                Invalidation::Realm { realm_url: "B/".into() },
                Invalidation::Modules {
                    realm_url: "A/".into(),
                    urls: vec!["A/x".into(), "A/y".into()]
                },
            ]
        );
        assert_eq!(read.gaps, ["C/"]);
        let mut position = LogPosition::new();
        position.advance(&read);
        assert_eq!(["A/", "B/", "C/", "D/"].map(|realm| position.mark(realm)), [12, 9, 11, 10]);
        assert!(collect(Vec::new()).is_empty());
    }

    #[test]
    fn a_clear_past_the_mark_covers_what_was_pruned_and_a_log_gone_back_is_a_gap() {
        let read = collect(vec![row("A/", 12, 11, 8, 3, None)]);
        assert_eq!((read.invalidations.len(), read.gaps.len()), (1, 0), "{read:?}");
        let read = collect(vec![row("", 20, 20, 0, 1, None), row("C/", 11, 0, 4, 1, None)]);
        assert_eq!(read.invalidations, [Invalidation::Global]);
        assert!(read.gaps.is_empty(), "a global clear covers every realm");
        // The realm's numbers went back below what this listener heard of it.
        let back = SinceRow { own: 30, mark: 30, ..row("A/", 12, 0, 0, 30, None) };
        assert_eq!(collect(vec![back]).gaps, ["A/"]);
    }

    #[test]
    fn a_global_clear_replaces_the_rest() {
        let read = collect(vec![row("", 20, 20, 0, 1, None), row("A/", 12, 0, 0, 1, Some("A/x"))]);
        assert_eq!(read.invalidations, [Invalidation::Global]);
        assert!(read.gaps.is_empty());
    }
}
