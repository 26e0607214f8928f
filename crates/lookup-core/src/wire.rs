//! The wire contract of BEHAVIOUR §7: invalidation payloads on `module_cache_invalidated`.
//!
//! Pure functions only. Encoding chunks a module fan-out so that every payload stays under
//! Postgres' NOTIFY limit; parsing accepts exactly what BEHAVIOUR §7 accepts and never panics.

use serde::Serialize;
use serde_json::Value;

use crate::error::LookupError;

/// The channel invalidations are broadcast on.
pub const INVALIDATION_CHANNEL: &str = "module_cache_invalidated";

/// The channel a populate winner notifies when it is done (BEHAVIOUR §9).
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
    /// The sequence number the sender's invalidation took in the durable guard's log
    /// (`"s"`), on the last payload of its transaction only: a listener that has read this
    /// payload has read every payload of that transaction.
    pub seq: Option<i64>,
}

#[derive(Serialize)]
struct ModulePayload<'a> {
    k: &'static str,
    r: &'a str,
    m: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    o: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    s: Option<i64>,
}

#[derive(Serialize)]
struct RealmPayload<'a> {
    k: &'static str,
    r: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    o: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    s: Option<i64>,
}

#[derive(Serialize)]
struct GlobalPayload<'a> {
    k: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    o: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    s: Option<i64>,
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serialising these plain structs of strings cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

/// [`to_json`] into a buffer of `capacity` bytes (the payload's size, known beforehand).
fn to_json_sized<T: Serialize>(value: &T, capacity: usize) -> String {
    let mut out = Vec::with_capacity(capacity);
    // Serialising these plain structs of strings cannot fail, and writes UTF-8.
    let _ = serde_json::to_writer(&mut out, value);
    String::from_utf8(out).unwrap_or_default()
}

/// The length of `text` as a JSON string, counted as serde_json writes it, without building
/// it (a fan-out of 10 000 modules measures 20 000 names: building each twice took most of
/// the encoding's time).
fn json_len(text: &str) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Counting cannot fail.
    let _ = serde_json::to_writer(&mut count, text);
    count.0
}

/// Encodes an invalidation as one or more payloads, each strictly under
/// [`PAYLOAD_BUDGET_BYTES`] bytes, with the origin id as `"o"` when given, and the
/// invalidation's sequence number in the durable guard's log as `"s"` (on the last payload
/// only) when given.
///
/// A module fan-out is split into chunks whose union is the fan-out, in order. If any single
/// URL cannot fit a payload on its own, the whole fan-out is sent as a realm payload instead
/// (conservative: peers drop more than needed, never less). A realm payload that cannot fit
/// becomes a global one for the same reason, without `"s"`: the number belongs to the realm's
/// log, and a listener would credit it to the global one. An empty fan-out encodes to nothing.
pub fn encode_payloads(
    invalidation: &Invalidation,
    origin: Option<&str>,
    seq: Option<i64>,
) -> Vec<String> {
    match invalidation {
        Invalidation::Global => vec![to_json(&GlobalPayload { k: "global", o: origin, s: seq })],
        Invalidation::Realm { realm_url } => {
            let payload = to_json(&RealmPayload { k: "realm", r: realm_url, o: origin, s: seq });
            if payload.len() < PAYLOAD_BUDGET_BYTES {
                vec![payload]
            } else {
                encode_payloads(&Invalidation::Global, origin, None)
            }
        }
        Invalidation::Modules { realm_url, urls } => {
            if urls.is_empty() {
                return Vec::new();
            }
            // Sized with `"s"`, which only the last chunk carries: every chunk fits either way.
            let empty =
                to_json(&ModulePayload { k: "module", r: realm_url, m: &[], o: origin, s: seq });
            // Each chunk with its size (with `"s"`).
            let mut chunks = Vec::new();
            let mut start = 0;
            let mut size = empty.len();
            for (i, url) in urls.iter().enumerate() {
                // Each URL adds its JSON string form, plus a comma unless it opens the chunk.
                let first = i == start;
                let length = json_len(url);
                let added = length + usize::from(!first);
                if empty.len() + length >= PAYLOAD_BUDGET_BYTES {
                    let realm = Invalidation::Realm { realm_url: realm_url.clone() };
                    return encode_payloads(&realm, origin, seq);
                }
                if size + added >= PAYLOAD_BUDGET_BYTES {
                    chunks.push((&urls[start..i], size));
                    start = i;
                    size = empty.len() + length;
                } else {
                    size += added;
                }
            }
            chunks.push((&urls[start..], size));
            let last = chunks.len() - 1;
            chunks
                .into_iter()
                .enumerate()
                .map(|(i, (m, size))| {
                    let s = if i == last { seq } else { None };
                    to_json_sized(
                        &ModulePayload { k: "module", r: realm_url, m, o: origin, s },
                        size,
                    )
                })
                .collect()
        }
    }
}

fn malformed(reason: impl Into<String>) -> LookupError {
    LookupError::MalformedPayload { reason: reason.into() }
}

/// A JSON string as bytes: lone UTF-16 surrogate escapes (`\ud800`), which JavaScript's
/// `JSON.parse` accepts, are kept instead of failing the whole payload; such a string is
/// not valid UTF-8 and is handled by widening (see [`parse_payload`]).
struct JsonBytes(Vec<u8>);

impl<'de> serde::Deserialize<'de> for JsonBytes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl<'de> serde::de::Visitor<'de> for Bytes {
            type Value = JsonBytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_bytes<E>(self, bytes: &[u8]) -> Result<JsonBytes, E> {
                Ok(JsonBytes(bytes.to_vec()))
            }
            fn visit_str<E>(self, text: &str) -> Result<JsonBytes, E> {
                Ok(JsonBytes(text.as_bytes().to_vec()))
            }
        }
        deserializer.deserialize_bytes(Bytes)
    }
}

/// The keys of a payload this crate reads, as they came.
#[derive(Default)]
struct Fields {
    k: Option<JsonBytes>,
    r: Option<JsonBytes>,
    m: Option<Vec<JsonBytes>>,
    o: Option<JsonBytes>,
    s: Option<Value>,
}

/// Reads a payload's top-level object. Unknown keys are skipped whatever they hold (serde's
/// `IgnoredAny` walks nesting iteratively and never converts numbers, so a value 200 levels
/// deep or `1e400` is skipped as `JSON.parse` would read it). With `ours` the keys deflookup
/// adds (`"o"`, `"s"`) are read too; without it they are skipped (the reference does not know
/// them, so an odd `"o"` or `"s"` must not reject what the reference acts on). A repeated key
/// keeps its last value, as in JavaScript.
struct FieldsSeed {
    ours: bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for FieldsSeed {
    type Value = Fields;
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Fields, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for FieldsSeed {
    type Value = Fields;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        use serde::de::IgnoredAny;
        let mut fields = Fields::default();
        while let Some(key) = map.next_key::<JsonBytes>()? {
            match (key.0.as_slice(), self.ours) {
                (b"k", _) => fields.k = Some(map.next_value()?),
                (b"r", _) => fields.r = Some(map.next_value()?),
                (b"m", _) => fields.m = Some(map.next_value()?),
                (b"o", true) => fields.o = Some(map.next_value()?),
                (b"s", true) => fields.s = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(fields)
    }
}

fn read_fields(payload: &str, ours: bool) -> Result<Fields, serde_json::Error> {
    use serde::de::DeserializeSeed as _;
    let mut deserializer = serde_json::Deserializer::from_str(payload);
    let fields = FieldsSeed { ours }.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(fields)
}

/// A non-empty text: `Some(Ok)` for UTF-8, `Some(Err(()))` for one holding a lone surrogate.
fn text(bytes: Option<&JsonBytes>) -> Option<Result<String, ()>> {
    let bytes = bytes?;
    if bytes.0.is_empty() {
        return None;
    }
    Some(String::from_utf8(bytes.0.clone()).map_err(|_| ()))
}

/// Parses one payload as the reference's peers do (JavaScript's `JSON.parse`, unknown keys
/// ignored), never narrower: every payload they act on, this acts on with the same or a wider
/// invalidation. A URL this crate cannot represent (a lone UTF-16 surrogate) widens its module
/// payload to the realm; a realm it cannot represent widens to everything. What BEHAVIOUR §7
/// rejects (not JSON, not an object, unknown or missing `k`, a bad `r` or `m`) is an error and
/// the whole payload is rejected. Never panics, whatever the input.
pub fn parse_payload(payload: &str) -> Result<ParsedPayload, LookupError> {
    // One pass; a second, skipping `"o"` and `"s"`, only when the first failed: those keys are
    // ours, and an odd one is no origin or number rather than a reason to reject the payload.
    let fields = match read_fields(payload, true) {
        Ok(fields) => fields,
        Err(_) => read_fields(payload, false).map_err(|e| malformed(format!("not JSON: {e}")))?,
    };
    let origin = fields.o.as_ref().and_then(|o| String::from_utf8(o.0.clone()).ok());
    let seq = fields.s.as_ref().and_then(Value::as_i64).filter(|seq| *seq > 0);
    let kind = fields.k.as_ref().map(|k| k.0.as_slice());
    let realm = text(fields.r.as_ref());
    let invalidation = match kind {
        Some(b"module") => {
            let realm_url =
                realm.ok_or_else(|| malformed("module payload without a non-empty \"r\""))?;
            let Some(items) = fields.m else {
                return Err(malformed("module payload without an \"m\" array"));
            };
            if items.is_empty() {
                return Err(malformed("module payload with an empty \"m\""));
            }
            let urls =
                items.iter().map(|item| text(Some(item))).collect::<Option<Vec<_>>>().ok_or_else(
                    || malformed("module payload with a URL that is not a non-empty string"),
                )?;
            match (realm_url, urls.into_iter().collect::<Result<Vec<_>, ()>>()) {
                (Ok(realm_url), Ok(urls)) => Invalidation::Modules { realm_url, urls },
                (Ok(realm_url), Err(())) => Invalidation::Realm { realm_url },
                (Err(()), _) => return Ok(ParsedPayload::widened(origin)),
            }
        }
        Some(b"realm") => match realm {
            Some(Ok(realm_url)) => Invalidation::Realm { realm_url },
            Some(Err(())) => return Ok(ParsedPayload::widened(origin)),
            None => return Err(malformed("realm payload without a non-empty \"r\"")),
        },
        Some(b"global") => Invalidation::Global,
        Some(other) => {
            return Err(malformed(format!("unknown kind {:?}", String::from_utf8_lossy(other))));
        }
        None => return Err(malformed("missing kind \"k\"")),
    };
    Ok(ParsedPayload { invalidation, origin, seq })
}

impl ParsedPayload {
    /// A payload whose realm this crate cannot represent, widened to everything. Its `"s"`
    /// is dropped: the number belongs to that realm's log, not to the global one.
    fn widened(origin: Option<String>) -> ParsedPayload {
        ParsedPayload { invalidation: Invalidation::Global, origin, seq: None }
    }

    /// The log the payload's `seq` belongs to: its realm, or `""` for everything.
    pub fn log_realm(&self) -> &str {
        match &self.invalidation {
            Invalidation::Modules { realm_url, .. } | Invalidation::Realm { realm_url } => {
                realm_url
            }
            Invalidation::Global => "",
        }
    }
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
            encode_payloads(&inv, None, None),
            [
                r#"{"k":"module","r":"https://r.test/","m":["https://r.test/a.gts","https://r.test/a"]}"#
            ]
        );
        assert_eq!(
            encode_payloads(
                &Invalidation::Realm { realm_url: "https://r.test/".into() },
                Some("p1"),
                None
            ),
            [r#"{"k":"realm","r":"https://r.test/","o":"p1"}"#]
        );
        assert_eq!(encode_payloads(&Invalidation::Global, None, None), [r#"{"k":"global"}"#]);
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
    fn the_log_number_is_read_when_it_is_one_and_never_rejects_a_payload() {
        let parsed = parse_payload(r#"{"k":"realm","r":"R/","o":"x","s":42}"#).unwrap();
        assert_eq!((parsed.seq, parsed.log_realm()), (Some(42), "R/"));
        assert_eq!(parse_payload(r#"{"k":"global","s":9}"#).unwrap().log_realm(), "");
        for odd in [r#""42""#, "-1", "0", "1.5", "1e400", "null", "[1]", "99999999999999999999"] {
            let payload = format!(r#"{{"k":"module","r":"R/","m":["R/a"],"o":"x","s":{odd}}}"#);
            let parsed = parse_payload(&payload).unwrap_or_else(|e| panic!("{payload}: {e}"));
            assert_eq!(parsed.seq, None, "{payload}");
            assert_eq!(parsed.invalidation, modules("R/", &["R/a"]));
        }
        // A realm widened to everything does not credit its number to the global log.
        let widened = parse_payload(r#"{"k":"realm","r":"R\ud800/","s":5}"#).unwrap();
        assert_eq!((widened.invalidation, widened.seq), (Invalidation::Global, None));
        // Nor does an encoded realm too long for a payload.
        let long = Invalidation::Realm { realm_url: "R".repeat(PAYLOAD_BUDGET_BYTES) };
        assert_eq!(encode_payloads(&long, None, Some(3)), [r#"{"k":"global"}"#]);
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
        let payloads = encode_payloads(&inv, Some("me"), Some(7));
        assert_eq!(payloads, [r#"{"k":"realm","r":"https://r.test/","o":"me","s":7}"#]);
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
        fn json_len_counts_what_serde_json_writes(text in "(?s).{0,80}", control in "[\\x00-\\x1f\"\\\\\\x7f]{0,8}") {
            for text in [text.clone(), format!("{control}{text}{control}")] {
                prop_assert_eq!(json_len(&text), to_json(&text).len(), "{:?}", text);
            }
        }

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
            seq in proptest::option::of(1..i64::MAX),
        ) {
            let realm = "https://r.test/".to_owned();
            let inv = Invalidation::Modules { realm_url: realm.clone(), urls: urls.clone() };
            let payloads = encode_payloads(&inv, origin.as_deref(), seq);
            prop_assert!(!payloads.is_empty());
            let mut union = Vec::new();
            let mut saw_realm = false;
            for (i, payload) in payloads.iter().enumerate() {
                prop_assert!(payload.len() < PAYLOAD_BUDGET_BYTES, "payload of {} bytes", payload.len());
                let parsed = parse_payload(payload).expect("own payload parses");
                prop_assert_eq!(parsed.origin.as_deref(), origin.as_deref());
                // The log's number closes the transaction: on the last payload only.
                let last = i + 1 == payloads.len();
                prop_assert_eq!(parsed.seq, if last { seq } else { None });
                prop_assert_eq!(parsed.log_realm(), realm.as_str());
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
            let empty = encode_payloads(&Invalidation::Modules { realm_url: realm.clone(), urls: vec![String::new()] }, origin.as_deref(), seq);
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

    #[test]
    fn payloads_the_reference_acts_on_are_acted_on_never_narrower() {
        let parsed = |payload: &str| parse_payload(payload).expect(payload).invalidation;
        let realm = "https://r.test/";
        // A URL with a lone UTF-16 surrogate: the fan-out widens to its realm.
        assert_eq!(
            parsed(
                r#"{"k":"module","r":"https://r.test/","m":["https://r.test/a","https://r.test/\ud800x"]}"#
            ),
            Invalidation::Realm { realm_url: realm.into() }
        );
        // A realm it cannot represent: everything.
        assert_eq!(parsed(r#"{"k":"realm","r":"https://r.test/\udc00"}"#), Invalidation::Global);
        assert_eq!(parsed(r#"{"k":"module","r":"\ud800","m":["x"]}"#), Invalidation::Global);
        // Unknown keys are skipped whatever they hold: deep nesting, huge numbers.
        let deep =
            format!(r#"{{"k":"realm","r":"{realm}","x":{}1{}}}"#, "[".repeat(200), "]".repeat(200));
        assert_eq!(parsed(&deep), Invalidation::Realm { realm_url: realm.into() });
        assert_eq!(
            parsed(r#"{"k":"global","big":1e400,"neg":-1e400,"o":7}"#),
            Invalidation::Global
        );
        assert_eq!(parse_payload(r#"{"k":"global","o":7}"#).unwrap().origin, None);
        // A repeated key keeps its last value, as in JavaScript.
        assert_eq!(
            parsed(r#"{"k":"global","k":"realm","r":"https://r.test/"}"#),
            Invalidation::Realm { realm_url: realm.into() }
        );
        // Well-formed surrogate pairs are ordinary text.
        assert_eq!(
            parsed(r#"{"k":"module","r":"https://r.test/","m":["https://r.test/\ud83d\ude00"]}"#),
            Invalidation::Modules {
                realm_url: realm.into(),
                urls: vec!["https://r.test/😀".into()]
            }
        );
        // What the reference rejects stays rejected.
        for rejected in [
            r#"{"k":"global""#,
            r#"{"k":"global"} x"#,
            r#"{"k":"module","r":"https://r.test/","m":["a",]}"#,
            r#"{"k":"module","r":"https://r.test/","m":[1]}"#,
            r#"{"k":"realm","r":2}"#,
            r#"{"k":"unknown"}"#,
            r#"["k","global"]"#,
        ] {
            assert!(parse_payload(rejected).is_err(), "{rejected}");
        }
    }
}
