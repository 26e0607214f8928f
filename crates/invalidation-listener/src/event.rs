//! What the listener reports: a stats snapshot and a stream of events.

use serde::Serialize;

/// A snapshot of the listener's state and counters.
///
/// Counters only grow. `module_payloads`, `realm_payloads` and `global_payloads` count
/// payloads replayed into the sink; own echoes and malformed payloads are counted apart and
/// replay nothing. Empty payloads are ignored without being counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerStats {
    /// Whether `LISTEN` is established on a live connection right now.
    pub connected: bool,
    /// The server process id of the current connection, when connected.
    pub backend_pid: Option<i32>,
    /// Successful re-establishments of `LISTEN` (or of the polling connection) after a lost
    /// connection.
    pub reconnects: u64,
    /// Reconnects after which the invalidations missed were read from the log and replayed.
    pub catch_ups: u64,
    /// Invalidations replayed by catch-ups (see [`ListenerEvent::CaughtUp`]).
    pub replayed_invalidations: u64,
    /// Fallbacks: global bumps made because the listener could not prove it saw every
    /// invalidation (see [`ListenerEvent::Resync`]).
    pub resyncs: u64,
    /// Reads of the log by a polling listener.
    pub polls: u64,
    /// The last connection error (password redacted), if any; kept after recovery.
    pub last_error: Option<String>,
    /// Module invalidations replayed (live or caught up).
    pub module_payloads: u64,
    /// Realm invalidations replayed (live or caught up).
    pub realm_payloads: u64,
    /// Global invalidations replayed (live or caught up).
    pub global_payloads: u64,
    /// Payloads rejected by the parser.
    pub malformed_payloads: u64,
    /// Payloads skipped because they carried this process's own origin id.
    pub own_echoes_skipped: u64,
    /// Payloads from writers that do not record their invalidations in the log (no origin id:
    /// the reference system's servers or a bare `pg_notify`; or a realm or global payload
    /// without a log number: deflookup with the durable guard off). While catch-up is on,
    /// each is a warning sign: a reconnect's catch-up cannot see what such a writer did (see
    /// [`ListenerOptions::untracked_writers`](crate::ListenerOptions::untracked_writers)).
    pub untracked_payloads: u64,
    /// Populate announcements heard (when listening for them).
    pub populated_payloads: u64,
}

/// One change of the listener, as broadcast by [`subscribe`](crate::PgInvalidationListener::subscribe).
///
/// Replay events (`Module`, `Realm`, `Global`, `Resync`) are sent *after* the sink has been
/// called, so a receiver that sees one may rely on the bump having happened.
///
/// [`to_json`](ListenerEvent::to_json) renders the one-line JSON form printed by
/// `deflookup listen`, e.g. `{"event":"module","realm":"…","urls":["…"]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ListenerEvent {
    /// `LISTEN` is established (on the first connection and after every reconnect), or the
    /// polling connection is open.
    Connected,
    /// The connection failed or ended; the listener is reconnecting.
    Disconnected {
        /// What happened (password redacted).
        error: String,
    },
    /// After a reconnect, the invalidations missed while away were read from the log and
    /// replayed (each as a `Module`, `Realm` or `Global` event marked `replayed`, before this).
    #[serde(rename = "caught-up")]
    CaughtUp {
        /// How many invalidations were replayed.
        replayed: u64,
    },
    /// The listener could not prove it saw every invalidation (catch-up is off, the log was
    /// pruned past its position or could not be read), so it bumped the global generation.
    Resync {
        /// Why.
        reason: String,
    },
    /// A module invalidation was replayed.
    Module {
        /// The realm of the URLs.
        #[serde(rename = "realm")]
        realm_url: String,
        /// The URLs bumped.
        urls: Vec<String>,
        /// Read from the log by a catch-up, rather than heard (or polled) as it happened.
        #[serde(skip_serializing_if = "is_false")]
        replayed: bool,
    },
    /// A realm invalidation was replayed.
    Realm {
        /// The realm bumped.
        #[serde(rename = "realm")]
        realm_url: String,
        /// See [`Module`](Self::Module).
        #[serde(skip_serializing_if = "is_false")]
        replayed: bool,
    },
    /// A global invalidation was replayed.
    Global {
        /// See [`Module`](Self::Module).
        #[serde(skip_serializing_if = "is_false")]
        replayed: bool,
    },
    /// A populate announcement woke this process's waiters of the key (BEHAVIOUR §9).
    Populated {
        /// The key's 64-bit hash.
        key: i64,
    },
    /// A payload was rejected by the parser and ignored.
    Malformed {
        /// The payload as received.
        payload: String,
    },
}

fn is_false(value: &bool) -> bool {
    !value
}

impl ListenerEvent {
    /// The event as one line of JSON (no trailing newline), keys in a fixed order.
    pub fn to_json(&self) -> String {
        // Serialising plain strings and unit variants cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_render_as_the_cli_json_lines() {
        let cases = [
            (ListenerEvent::Connected, r#"{"event":"connected"}"#),
            (
                ListenerEvent::Disconnected { error: "gone \"away\"".into() },
                r#"{"event":"disconnected","error":"gone \"away\""}"#,
            ),
            (
                ListenerEvent::Resync { reason: "pruned".into() },
                r#"{"event":"resync","reason":"pruned"}"#,
            ),
            (ListenerEvent::CaughtUp { replayed: 3 }, r#"{"event":"caught-up","replayed":3}"#),
            (
                ListenerEvent::Module {
                    realm_url: "R/".into(),
                    urls: vec!["R/a".into()],
                    replayed: false,
                },
                r#"{"event":"module","realm":"R/","urls":["R/a"]}"#,
            ),
            (
                ListenerEvent::Module {
                    realm_url: "R/".into(),
                    urls: vec!["R/a".into()],
                    replayed: true,
                },
                r#"{"event":"module","realm":"R/","urls":["R/a"],"replayed":true}"#,
            ),
            (
                ListenerEvent::Realm { realm_url: "R/".into(), replayed: false },
                r#"{"event":"realm","realm":"R/"}"#,
            ),
            (ListenerEvent::Global { replayed: true }, r#"{"event":"global","replayed":true}"#),
            (ListenerEvent::Populated { key: -42 }, r#"{"event":"populated","key":-42}"#),
            (
                ListenerEvent::Malformed { payload: "{oops".into() },
                r#"{"event":"malformed","payload":"{oops"}"#,
            ),
        ];
        for (event, json) in cases {
            assert_eq!(event.to_json(), json);
        }
    }
}
