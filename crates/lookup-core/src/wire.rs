//! The wire contract of SPEC §7: invalidation payloads on `module_cache_invalidated`.
//!
//! Pure functions only. Encoding chunks a module fan-out so that every payload stays under
//! Postgres' NOTIFY limit; parsing accepts exactly what SPEC §7 accepts and never panics.

use serde::Serialize;
use serde_json::Value;

use crate::error::LookupError;

/// The channel invalidations are broadcast on.
pub const INVALIDATION_CHANNEL: &str = "module_cache_invalidated";

/// The channel a populate winner notifies when it is done (SPEC §9).
pub const POPULATE_CHANNEL: &str = "module_cache_populated";

/// Every encoded payload is strictly shorter than this many bytes (Postgres refuses 8000).
pub const PAYLOAD_BUDGET_BYTES: usize = 7000;

/// Channel on which a populate winner that left no row says why, just before it announces
/// its key on [`POPULATE_CHANNEL`] (a deflookup addition: the reference's peers do not listen
/// to it, so its announcements stay exactly theirs).
pub const POPULATE_OUTCOME_CHANNEL: &str = "module_cache_populate_outcome";

/// The payload of a populate outcome: `{"h":<key hash>,"k":"not-found"|"render-failed",
/// "u":<url>,"m":<message>}`, within [`PAYLOAD_BUDGET_BYTES`] (a long message is cut); `None`
/// when even the URL does not fit (waiters then find out for themselves).
pub fn encode_outcome(key_hash: i64, outcome: &crate::NoRow) -> Option<String> {
    let (kind, url, message) = match outcome {
        crate::NoRow::NotFound { url } => ("not-found", url, ""),
        crate::NoRow::RenderFailed { url, message } => ("render-failed", url, message.as_str()),
    };
    let encode = |message: &str| {
        serde_json::json!({"h": key_hash, "k": kind, "u": url, "m": message}).to_string()
    };
    let full = encode(message);
    if full.len() <= PAYLOAD_BUDGET_BYTES {
        return Some(full);
    }
    let mut cut =
        PAYLOAD_BUDGET_BYTES.saturating_sub(full.len() - message.len()).min(message.len());
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    // Escapes may make the cut message longer than its bytes: check again.
    let shorter = encode(&message[..cut]);
    (shorter.len() <= PAYLOAD_BUDGET_BYTES).then_some(shorter)
}

/// Reads a populate outcome payload (see [`encode_outcome`]).
pub fn parse_outcome(payload: &str) -> Result<(i64, crate::NoRow), LookupError> {
    let malformed = |reason: &str| LookupError::MalformedPayload { reason: reason.to_owned() };
    let value: Value = serde_json::from_str(payload).map_err(|_| malformed("not JSON"))?;
    let hash = value.get("h").and_then(Value::as_i64).ok_or_else(|| malformed("no key hash"))?;
    let url = value
        .get("u")
        .and_then(Value::as_str)
        .filter(|url| !url.is_empty())
        .ok_or_else(|| malformed("no url"))?
        .to_owned();
    let message = value.get("m").and_then(Value::as_str).unwrap_or_default().to_owned();
    let outcome = match value.get("k").and_then(Value::as_str) {
        Some("not-found") => crate::NoRow::NotFound { url },
        Some("render-failed") => crate::NoRow::RenderFailed { url, message },
        _ => return Err(malformed("unknown outcome kind")),
    };
    Ok((hash, outcome))
}

/// One invalidation, as applied locally and as carried on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// Some module URLs of a realm (an `invalidate` fan-out).
    Modules {
        /// The realm the URLs belong to.
        realm_url: String,
        /// The invalidated URLs, in fan-out order.
        urls: Vec<String>,
    },
    /// Every row of one realm.
    Realm {
        /// The realm cleared.
        realm_url: String,
    },
    /// Every row.
    Global,
}

/// A payload accepted by [`parse_payload`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedPayload {
    /// What to invalidate.
    pub invalidation: Invalidation,
    /// The sender's origin id (`"o"`), when it sent one.
    pub origin: Option<String>,
}

#[derive(Serialize)]
struct ModulePayload<'a> {
    k: &'static str,
    r: &'a str,
    m: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    o: Option<&'a str>,
}

#[derive(Serialize)]
struct RealmPayload<'a> {
    k: &'static str,
    r: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    o: Option<&'a str>,
}

#[derive(Serialize)]
struct GlobalPayload<'a> {
    k: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    o: Option<&'a str>,
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serialising these plain structs of strings cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

fn json_len(text: &str) -> usize {
    to_json(&text).len()
}

/// Encodes an invalidation as one or more payloads, each strictly under
/// [`PAYLOAD_BUDGET_BYTES`] bytes, with the origin id as `"o"` when given.
///
/// A module fan-out is split into chunks whose union is the fan-out, in order. If any single
/// URL cannot fit a payload on its own, the whole fan-out is sent as a realm payload instead
/// (conservative: peers drop more than needed, never less). A realm payload that cannot fit
/// becomes a global one for the same reason. An empty fan-out encodes to nothing.
pub fn encode_payloads(invalidation: &Invalidation, origin: Option<&str>) -> Vec<String> {
    match invalidation {
        Invalidation::Global => vec![to_json(&GlobalPayload { k: "global", o: origin })],
        Invalidation::Realm { realm_url } => {
            let payload = to_json(&RealmPayload { k: "realm", r: realm_url, o: origin });
            if payload.len() < PAYLOAD_BUDGET_BYTES {
                vec![payload]
            } else {
                encode_payloads(&Invalidation::Global, origin)
            }
        }
        Invalidation::Modules { realm_url, urls } => {
            if urls.is_empty() {
                return Vec::new();
            }
            let empty = to_json(&ModulePayload { k: "module", r: realm_url, m: &[], o: origin });
            let mut chunks = Vec::new();
            let mut start = 0;
            let mut size = empty.len();
            for (i, url) in urls.iter().enumerate() {
                // Each URL adds its JSON string form, plus a comma unless it opens the chunk.
                let first = i == start;
                let added = json_len(url) + usize::from(!first);
                if empty.len() + json_len(url) >= PAYLOAD_BUDGET_BYTES {
                    let realm = Invalidation::Realm { realm_url: realm_url.clone() };
                    return encode_payloads(&realm, origin);
                }
                if size + added >= PAYLOAD_BUDGET_BYTES {
                    chunks.push(&urls[start..i]);
                    start = i;
                    size = empty.len() + json_len(url);
                } else {
                    size += added;
                }
            }
            chunks.push(&urls[start..]);
            chunks
                .into_iter()
                .map(|m| to_json(&ModulePayload { k: "module", r: realm_url, m, o: origin }))
                .collect()
        }
    }
}

fn malformed(reason: impl Into<String>) -> LookupError {
    LookupError::MalformedPayload { reason: reason.into() }
}

fn non_empty_str<'a>(object: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a str> {
    object.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Parses one payload. Extra keys are ignored; anything SPEC §7 rejects is an error and the
/// whole payload is rejected. Never panics, whatever the input.
pub fn parse_payload(payload: &str) -> Result<ParsedPayload, LookupError> {
    let value: Value =
        serde_json::from_str(payload).map_err(|e| malformed(format!("not JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(malformed("not a JSON object"));
    };
    let origin = object.get("o").and_then(Value::as_str).map(str::to_owned);
    let invalidation = match object.get("k").and_then(Value::as_str) {
        Some("module") => {
            let realm_url = non_empty_str(&object, "r")
                .ok_or_else(|| malformed("module payload without a non-empty \"r\""))?;
            let Some(Value::Array(items)) = object.get("m") else {
                return Err(malformed("module payload without an \"m\" array"));
            };
            if items.is_empty() {
                return Err(malformed("module payload with an empty \"m\""));
            }
            let urls = items
                .iter()
                .map(|item| item.as_str().filter(|s| !s.is_empty()).map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    malformed("module payload with a URL that is not a non-empty string")
                })?;
            Invalidation::Modules { realm_url: realm_url.to_owned(), urls }
        }
        Some("realm") => {
            let realm_url = non_empty_str(&object, "r")
                .ok_or_else(|| malformed("realm payload without a non-empty \"r\""))?;
            Invalidation::Realm { realm_url: realm_url.to_owned() }
        }
        Some("global") => Invalidation::Global,
        Some(other) => return Err(malformed(format!("unknown kind {other:?}"))),
        None => return Err(malformed("missing kind \"k\"")),
    };
    Ok(ParsedPayload { invalidation, origin })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn modules(realm: &str, urls: &[&str]) -> Invalidation {
        Invalidation::Modules {
            realm_url: realm.to_owned(),
            urls: urls.iter().map(|u| (*u).to_owned()).collect(),
        }
    }

    #[test]
    fn encodes_in_the_reference_key_order() {
        let inv = modules("https://r.test/", &["https://r.test/a.gts", "https://r.test/a"]);
        assert_eq!(
            encode_payloads(&inv, None),
            [
                r#"{"k":"module","r":"https://r.test/","m":["https://r.test/a.gts","https://r.test/a"]}"#
            ]
        );
        assert_eq!(
            encode_payloads(
                &Invalidation::Realm { realm_url: "https://r.test/".into() },
                Some("p1")
            ),
            [r#"{"k":"realm","r":"https://r.test/","o":"p1"}"#]
        );
        assert_eq!(encode_payloads(&Invalidation::Global, None), [r#"{"k":"global"}"#]);
    }

    #[test]
    fn parses_the_three_kinds_and_ignores_extra_keys() {
        let single =
            parse_payload(r#"{"k":"module","r":"https://r.test/","m":["https://r.test/a"]}"#);
        assert_eq!(single.unwrap().invalidation, modules("https://r.test/", &["https://r.test/a"]));
        let multi =
            parse_payload(r#"{"k":"module","r":"R/","m":["R/a","R/b"],"o":"x","z":1}"#).unwrap();
        assert_eq!(multi.invalidation, modules("R/", &["R/a", "R/b"]));
        assert_eq!(multi.origin.as_deref(), Some("x"));
        assert_eq!(
            parse_payload(r#"{"k":"realm","r":"R/"}"#).unwrap().invalidation,
            Invalidation::Realm { realm_url: "R/".into() }
        );
        assert_eq!(parse_payload(r#"{"k":"global"}"#).unwrap().invalidation, Invalidation::Global);
    }

    #[test]
    fn rejects_what_the_spec_rejects() {
        for bad in [
            "not json",
            "[1,2]",
            "\"text\"",
            r#"{"r":"R/"}"#,
            r#"{"k":"bogus"}"#,
            r#"{"k":7}"#,
            r#"{"k":"module","r":"","m":["R/a"]}"#,
            r#"{"k":"module","m":["R/a"]}"#,
            r#"{"k":"module","r":"R/","m":[]}"#,
            r#"{"k":"module","r":"R/","m":"R/a"}"#,
            r#"{"k":"module","r":"R/","m":["R/a",3]}"#,
            r#"{"k":"module","r":"R/","m":["R/a",""]}"#,
            r#"{"k":"realm"}"#,
            r#"{"k":"realm","r":""}"#,
            r#"{"k":"realm","r":5}"#,
            "",
        ] {
            assert!(parse_payload(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn an_oversize_url_turns_the_fan_out_into_a_realm_payload() {
        let long = format!("https://r.test/{}", "x".repeat(PAYLOAD_BUDGET_BYTES));
        let inv = Invalidation::Modules {
            realm_url: "https://r.test/".into(),
            urls: vec!["https://r.test/a".into(), long],
        };
        let payloads = encode_payloads(&inv, Some("me"));
        assert_eq!(payloads, [r#"{"k":"realm","r":"https://r.test/","o":"me"}"#]);
    }

    fn url_strategy() -> impl Strategy<Value = String> {
        // Mostly ordinary URLs, sometimes long ones, with multi-byte and escaped characters.
        prop_oneof![
            8 => "[a-z0-9/._-]{1,60}".prop_map(|p| format!("https://r.test/{p}")),
            2 => "[a-zé\"\\\\ü€]{100,900}".prop_map(|p| format!("https://r.test/{p}")),
            1 => "[a-z]{6990,7100}".prop_map(|p| format!("https://r.test/{p}")),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn parse_never_panics(text in ".{0,200}") {
            let _ = parse_payload(&text);
        }

        #[test]
        fn parse_never_panics_on_json_like_input(
            k in prop_oneof![Just("module".to_owned()), Just("realm".to_owned()), Just("global".to_owned()), "[a-z]{0,6}"],
            r in prop_oneof![Just("\"R/\"".to_owned()), Just("\"\"".to_owned()), Just("3".to_owned()), Just("null".to_owned())],
            m in prop_oneof![Just("[]".to_owned()), Just("[\"a\",1]".to_owned()), Just("[\"a\"]".to_owned()), Just("{}".to_owned())],
        ) {
            let _ = parse_payload(&format!(r#"{{"k":"{k}","r":{r},"m":{m}}}"#));
        }

        #[test]
        fn chunks_fit_and_round_trip(
            urls in prop::collection::vec(url_strategy(), 1..120),
            origin in proptest::option::of("[a-f0-9]{8,32}"),
        ) {
            let realm = "https://r.test/".to_owned();
            let inv = Invalidation::Modules { realm_url: realm.clone(), urls: urls.clone() };
            let payloads = encode_payloads(&inv, origin.as_deref());
            prop_assert!(!payloads.is_empty());
            let mut union = Vec::new();
            let mut saw_realm = false;
            for payload in &payloads {
                prop_assert!(payload.len() < PAYLOAD_BUDGET_BYTES, "payload of {} bytes", payload.len());
                let parsed = parse_payload(payload).expect("own payload parses");
                prop_assert_eq!(parsed.origin.as_deref(), origin.as_deref());
                match parsed.invalidation {
                    Invalidation::Modules { realm_url, urls } => {
                        prop_assert_eq!(&realm_url, &realm);
                        union.extend(urls);
                    }
                    Invalidation::Realm { realm_url } => {
                        prop_assert_eq!(&realm_url, &realm);
                        saw_realm = true;
                    }
                    Invalidation::Global => prop_assert!(false, "unexpected global payload"),
                }
            }
            let empty = encode_payloads(&Invalidation::Modules { realm_url: realm.clone(), urls: vec![String::new()] }, origin.as_deref());
            let overhead = empty[0].len() - json_len("");
            let oversize = urls.iter().any(|u| overhead + json_len(u) >= PAYLOAD_BUDGET_BYTES);
            prop_assert_eq!(saw_realm, oversize, "realm fallback exactly when one URL cannot fit");
            if saw_realm {
                prop_assert_eq!(payloads.len(), 1);
            } else {
                prop_assert_eq!(union, urls);
            }
        }
    }

    #[test]
    fn populate_outcomes_round_trip_within_the_budget() {
        let not_found = crate::NoRow::NotFound { url: "https://r.test/x.gts".into() };
        let payload = encode_outcome(-7, &not_found).expect("fits");
        assert_eq!(parse_outcome(&payload).expect("parses"), (-7, not_found));
        let long_message = "é\"".repeat(5000);
        let failed =
            crate::NoRow::RenderFailed { url: "https://r.test/y".into(), message: long_message };
        let payload = encode_outcome(3, &failed).expect("the message is cut to fit");
        assert!(payload.len() <= PAYLOAD_BUDGET_BYTES);
        let (hash, parsed) = parse_outcome(&payload).expect("parses");
        assert!(hash == 3 && matches!(parsed, crate::NoRow::RenderFailed { .. }));
        let huge = crate::NoRow::NotFound { url: "x".repeat(PAYLOAD_BUDGET_BYTES) };
        assert_eq!(encode_outcome(1, &huge), None, "a URL that cannot fit is not sent");
        for bad in
            ["", "{}", r#"{"h":1,"k":"other","u":"u"}"#, r#"{"h":"1","k":"not-found","u":"u"}"#]
        {
            assert!(parse_outcome(bad).is_err(), "{bad}");
        }
    }
}
