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
    /// Successful re-establishments of `LISTEN` after a lost connection.
    pub reconnects: u64,
    /// Global bumps made because notifications may have been lost while disconnected.
    pub resyncs: u64,
    /// The last connection error (password redacted), if any; kept after recovery.
    pub last_error: Option<String>,
    /// Module payloads replayed.
    pub module_payloads: u64,
    /// Realm payloads replayed.
    pub realm_payloads: u64,
    /// Global payloads replayed.
    pub global_payloads: u64,
    /// Payloads rejected by the parser.
    pub malformed_payloads: u64,
    /// Payloads skipped because they carried this process's own origin id.
    pub own_echoes_skipped: u64,
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
    /// `LISTEN` is established (on the first connection and after every reconnect).
    Connected,
    /// The connection failed or ended; the listener is reconnecting.
    Disconnected {
        /// What happened (password redacted).
        error: String,
    },
    /// After a reconnect, the global generation was bumped because notifications sent while
    /// disconnected are lost.
    Resync,
    /// A module payload was replayed.
    Module {
        /// The realm of the URLs.
        #[serde(rename = "realm")]
        realm_url: String,
        /// The URLs bumped.
        urls: Vec<String>,
    },
    /// A realm payload was replayed.
    Realm {
        /// The realm bumped.
        #[serde(rename = "realm")]
        realm_url: String,
    },
    /// A global payload was replayed.
    Global,
    /// A populate announcement woke this process's waiters of the key (SPEC §9).
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
            (ListenerEvent::Resync, r#"{"event":"resync"}"#),
            (
                ListenerEvent::Module { realm_url: "R/".into(), urls: vec!["R/a".into()] },
                r#"{"event":"module","realm":"R/","urls":["R/a"]}"#,
            ),
            (ListenerEvent::Realm { realm_url: "R/".into() }, r#"{"event":"realm","realm":"R/"}"#),
            (ListenerEvent::Global, r#"{"event":"global"}"#),
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
