//! Connection strings as users write them, in libpq's two forms: a URL
//! (`postgres://user:password@host:port/db?key=value&…`) or `key=value` words.
//!
//! Two jobs, both done on the *user's* string before the driver sees it:
//!
//! - **Our own settings** (`sslmode`'s verifying values, `sslrootcert`, `pgbouncer`) are taken
//!   out, since tokio-postgres refuses keys and values it does not know; the rest is handed to
//!   the driver untouched. Keys are found the way the driver finds them (a URL's credentials
//!   end at its first `@`, its parameters start at the first `?` after that, keys and values
//!   are percent-decoded; `key=value` words may be single-quoted with backslash escapes).
//! - **Redaction**: the password is replaced by `***` however the string is spelled. It errs
//!   on the side of hiding: a URL's credentials are taken to end at its *last* `@`, so a raw
//!   `@`, `/`, `?`, `#` or `:` in a password never lets part of it through (at worst, some of
//!   the host is hidden too).

use std::borrow::Cow;
use std::ops::Range;

/// Settings deflookup reads itself; the driver never sees them.
pub(crate) const OWN_KEYS: [&str; 3] = ["sslmode", "sslrootcert", "pgbouncer"];

/// Keys tokio-postgres understands (besides [`OWN_KEYS`]).
const DRIVER_KEYS: [&str; 18] = [
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslnegotiation",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

/// One `key=value` setting of a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Setting {
    /// Decoded key.
    pub(crate) key: String,
    /// Decoded value.
    pub(crate) value: String,
    /// Where the whole setting (key, `=`, value) is in the string.
    span: Range<usize>,
}

/// A connection string split into what the driver gets and the settings found in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnInfo {
    /// The string for tokio-postgres: the user's, minus [`OWN_KEYS`].
    pub(crate) driver: String,
    /// Every setting found (the driver's and ours), in order.
    pub(crate) settings: Vec<Setting>,
}

impl ConnInfo {
    /// The last value given for `key` (as libpq, a later setting wins).
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.settings.iter().rev().find(|s| s.key == key).map(|s| s.value.as_str())
    }

    /// Whether the user set `key` at all.
    pub(crate) fn has(&self, key: &str) -> bool {
        self.settings.iter().any(|s| s.key == key)
    }
}

/// Why a connection string cannot be used. Never quotes the string itself (it may hold a
/// password); keys are quoted only when they look like keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnInfoError(pub(crate) String);

impl std::fmt::Display for ConnInfoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The URL form's body (after `postgres://` or `postgresql://`), if the string is a URL.
fn url_body(text: &str) -> Option<(&str, &str)> {
    ["postgresql://", "postgres://"]
        .iter()
        .find_map(|scheme| text.strip_prefix(scheme).map(|body| (*scheme, body)))
}

fn decode(text: &str) -> Cow<'_, str> {
    percent_encoding::percent_decode_str(text).decode_utf8_lossy()
}

/// Splits `text` into the driver's string and the settings, refusing keys nobody knows.
pub(crate) fn parse(text: &str) -> Result<ConnInfo, ConnInfoError> {
    let settings = match url_body(text) {
        Some((scheme, body)) => url_settings(body, scheme.len())?,
        None => word_settings(text)?,
    };
    for setting in &settings {
        let key = setting.key.as_str();
        if matches!(key, "sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "sslcrldir") {
            return Err(ConnInfoError(format!(
                "{key} is not supported: deflookup does not present client certificates or \
                 check revocation lists"
            )));
        }
        if !OWN_KEYS.contains(&key) && !DRIVER_KEYS.contains(&key) {
            let shown = if key.chars().all(|c| c.is_ascii_lowercase() || c == '_') && key.len() < 40
            {
                format!("{key:?}")
            } else {
                "(a key that is not a word; is a password missing its percent-encoding?)".to_owned()
            };
            return Err(ConnInfoError(format!("unknown connection setting {shown}")));
        }
    }
    let is_own = |setting: &&Setting| OWN_KEYS.contains(&setting.key.as_str());
    let own: Vec<&Range<usize>> = settings.iter().filter(is_own).map(|s| &s.span).collect();
    let driver = if own.is_empty() {
        text.to_owned()
    } else if let Some((scheme, body)) = url_body(text) {
        // The URL up to its `?`, then the driver's parameters, as they were written.
        let question =
            scheme.len() + url_query_start(body).expect("settings were found after a `?`");
        let kept: Vec<&str> = settings
            .iter()
            .filter(|setting| !is_own(setting))
            .map(|setting| &text[setting.span.clone()])
            .collect();
        if kept.is_empty() {
            text[..question].to_owned()
        } else {
            format!("{}?{}", &text[..question], kept.join("&"))
        }
    } else {
        let mut out = String::new();
        let mut at = 0;
        for span in own {
            out.push_str(&text[at..span.start]);
            at = span.end;
        }
        out.push_str(&text[at..]);
        out
    };
    Ok(ConnInfo { driver, settings })
}

/// Where a URL's parameters start: the first `?` after the credentials (which end at the
/// first `@`, as the driver reads them).
fn url_query_start(body: &str) -> Option<usize> {
    let after_credentials = body.find('@').map_or(0, |at| at + 1);
    body[after_credentials..].find('?').map(|q| after_credentials + q)
}

fn url_settings(body: &str, offset: usize) -> Result<Vec<Setting>, ConnInfoError> {
    let Some(question) = url_query_start(body) else { return Ok(Vec::new()) };
    let mut settings = Vec::new();
    let mut start = question + 1;
    for piece in body[question + 1..].split('&') {
        let span = offset + start..offset + start + piece.len();
        start += piece.len() + 1;
        if piece.is_empty() {
            continue;
        }
        let Some((key, value)) = piece.split_once('=') else {
            return Err(ConnInfoError(
                "a URL parameter has no `=` (is a password missing its percent-encoding?)".into(),
            ));
        };
        settings.push(Setting {
            key: decode(key).into_owned(),
            value: decode(value).into_owned(),
            span,
        });
    }
    Ok(settings)
}

/// The `key=value` words of libpq's other form: whitespace-separated, spaces allowed around
/// `=`, a value single-quoted (with `\'` and `\\`) or bare (with backslash escapes).
fn word_settings(text: &str) -> Result<Vec<Setting>, ConnInfoError> {
    let bytes = text.as_bytes();
    let mut settings = Vec::new();
    let mut i = 0;
    let skip_space = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_space(i);
        if i >= bytes.len() {
            return Ok(settings);
        }
        let start = i;
        while i < bytes.len() && !bytes[i].is_ascii_whitespace() && bytes[i] != b'=' {
            i += 1;
        }
        let key = text[start..i].to_owned();
        i = skip_space(i);
        if bytes.get(i) != Some(&b'=') {
            return Err(ConnInfoError(format!(
                "expected `=` after the setting {:?}",
                if key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    key
                } else {
                    "…".into()
                }
            )));
        }
        i = skip_space(i + 1);
        let mut value = String::new();
        if bytes.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return Err(ConnInfoError("a quoted value is not closed".into())),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < bytes.len() => {
                        let c = text[i + 1..].chars().next().expect("in bounds");
                        value.push(c);
                        i += 1 + c.len_utf8();
                    }
                    Some(_) => {
                        let c = text[i..].chars().next().expect("in bounds");
                        value.push(c);
                        i += c.len_utf8();
                    }
                }
            }
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                let c = text[i..].chars().next().expect("in bounds");
                value.push(c);
                i += c.len_utf8();
            }
        }
        settings.push(Setting { key, value, span: start..i });
    }
}

/// The connection string with its password replaced by `***`, for logs and errors. See the
/// module docs for why it may hide more than the password.
pub(crate) fn redact(text: &str) -> String {
    match url_body(text) {
        Some((scheme, body)) => redact_url_body(scheme, body),
        None => redact_words(text),
    }
}

fn redact_url_body(scheme: &str, body: &str) -> String {
    let mut hidden: Vec<Range<usize>> = Vec::new();
    // The credentials: everything after a plain user name up to the last `@`.
    if let Some(last_at) = body.rfind('@') {
        let credentials = &body[..last_at];
        if let Some(end) = credentials.find([':', '@', '/', '?', '#', '&', '=']) {
            let start = if credentials.as_bytes()[end] == b':' { end + 1 } else { end };
            hidden.push(start..last_at);
        }
    }
    // `password` parameters, after any `?` or `&` (not only the driver's: over-hiding is safe).
    // A raw `&` may be part of the password: the pieces after it are hidden too until one that
    // starts with a known key.
    let delimiters: Vec<usize> = body.match_indices(['?', '&']).map(|(i, _)| i).collect();
    let mut hiding = false;
    for (n, &at) in delimiters.iter().enumerate() {
        let end = delimiters.get(n + 1).copied().unwrap_or(body.len());
        let piece = &body[at + 1..end];
        let key = piece.split_once('=').map(|(key, _)| decode(key));
        let known =
            key.as_deref().is_some_and(|key| OWN_KEYS.contains(&key) || DRIVER_KEYS.contains(&key));
        if key.as_deref().is_some_and(|key| key.eq_ignore_ascii_case("password")) {
            let value_start = at + 1 + piece.find('=').expect("a key was found") + 1;
            hidden.push(value_start..end);
            hiding = true;
        } else if hiding && !known {
            hidden.push(at..end);
        } else {
            hiding = false;
        }
    }
    hidden.sort_by_key(|range| range.start);
    let mut out = String::from(scheme);
    let mut at = 0;
    for range in hidden {
        if range.end <= at {
            continue;
        }
        if range.start >= at {
            out.push_str(&body[at..range.start]);
            out.push_str("***");
        }
        at = range.end;
    }
    out.push_str(&body[at..]);
    out
}

fn redact_words(text: &str) -> String {
    match word_settings(text) {
        Ok(settings) => {
            let mut out = String::new();
            let mut at = 0;
            for setting in settings.iter().filter(|s| s.key == "password") {
                out.push_str(&text[at..setting.span.start]);
                out.push_str("password=***");
                at = setting.span.end;
            }
            out.push_str(&text[at..]);
            out
        }
        // Unreadable: keep what comes before anything that could be a password setting.
        Err(_) => match text.find("password") {
            Some(at) => format!("{}password=***", &text[..at]),
            None => text.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_settings_are_taken_out_of_urls_and_words() {
        let info = parse("postgres://u:p@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem&pgbouncer=true").unwrap();
        assert_eq!(info.driver, "postgres://u:p@h:5/db?application_name=x");
        assert_eq!(info.get("sslmode"), Some("verify-full"));
        assert_eq!(info.get("sslrootcert"), Some("/tmp/ca.pem"));
        assert_eq!(info.get("pgbouncer"), Some("true"));
        let info = parse("postgres://u@h/db?sslmode=require").unwrap();
        assert_eq!(info.driver, "postgres://u@h/db");
        // A `?` inside the credentials is not where the parameters start.
        let info = parse("postgres://u:a?b@h/db?pgbouncer=true").unwrap();
        assert_eq!(info.driver, "postgres://u:a?b@h/db");
        let info = parse("host=h sslmode = 'verify-ca' user=u sslrootcert='/a b/ca.pem' dbname=d")
            .unwrap();
        assert_eq!(info.driver, "host=h  user=u  dbname=d");
        assert_eq!(info.get("sslrootcert"), Some("/a b/ca.pem"));
        assert_eq!(parse("postgres://h/db").unwrap().settings, Vec::new());
    }

    #[test]
    fn unknown_keys_are_refused_without_quoting_what_may_be_a_secret() {
        let err = parse("postgres://h/db?sslcert=x").unwrap_err();
        assert!(err.0.contains("sslcert is not supported"), "{err}");
        let err = parse("postgres://h/db?sslmdoe=require").unwrap_err();
        assert!(err.0.contains("\"sslmdoe\""), "{err}");
        let err = parse("postgres://h/db?password=a&S3CR3T").unwrap_err();
        assert!(!err.0.contains("S3CR3T"), "{err}");
        let err = parse("postgres://h/db?password=a&S3CR3T=1").unwrap_err();
        assert!(!err.0.contains("S3CR3T"), "{err}");
        assert!(parse("host=h password='unterminated").is_err());
    }

    #[test]
    fn passwords_never_survive_redaction() {
        assert_eq!(
            redact("postgres://alice:s3cret@db.test:5432/app"),
            "postgres://alice:***@db.test:5432/app"
        );
        assert_eq!(redact("postgres://alice@db.test/app"), "postgres://alice@db.test/app");
        assert_eq!(
            redact("postgresql://u:p@h/db?sslmode=disable&password=x"),
            "postgresql://u:***@h/db?sslmode=disable&password=***"
        );
        assert_eq!(redact("postgres://u:pa/ss?w@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://h/db?pass%77ord=x"), "postgres://h/db?pass%77ord=***");
        assert_eq!(redact("host=h user=u password=pw"), "host=h user=u password=***");
        assert_eq!(redact("host=h password = 'p w' user=u"), "host=h password=*** user=u");
        assert_eq!(redact("host=h password='open"), "host=h password=***");
    }
}
