//! URL helpers of BEHAVIOUR §3.1: canonical form, aliases, variants, population candidates and
//! dependency normalisation. Everything here is a pure function of its input.

use url::Url;

/// Executable extensions, in the order they are tried when trimming an alias.
pub const EXECUTABLE_EXTENSIONS: [&str; 4] = [".js", ".gjs", ".ts", ".gts"];

/// Extensions tried, in this order, when an extensionless module is populated.
const CANDIDATE_EXTENSIONS: [&str; 4] = [".gts", ".ts", ".gjs", ".js"];

/// The canonical form of a module URL: parsed (which resolves `.` and `..` segments and
/// lower-cases the scheme and host), without query and fragment, and with one spelling per
/// path: percent-escapes of unreserved characters decoded (`%70erson` is `person`), the other
/// escapes in upper case, and runs of `/` collapsed into one (`a//b` is `a/b`). Every spelling
/// that reaches the same file is the same canonical URL, so one module has one row, and an
/// invalidation of any spelling reaches it.
///
/// A string that does not parse as a URL is cut at its first `#`, then at its first `?`, and
/// otherwise kept.
pub fn canonical_url(raw: &str) -> String {
    if is_plainly_canonical(raw) {
        return raw.to_owned();
    }
    match Url::parse(raw) {
        Ok(url) => canonicalise(url),
        Err(_) => cut_query_and_fragment(raw).to_owned(),
    }
}

/// [`canonical_url`] of a URL that must be hierarchical (`scheme://…` or `scheme:/…`, one that
/// can be a base): `Ok` with the canonical URL, or `Err` with why it is not such a URL. The
/// same verdict as parsing the canonical URL again, with (usually) one parse instead of two,
/// and none for a URL already in canonical form.
pub(crate) fn canonical_hierarchical_url(raw: &str) -> Result<String, String> {
    if is_plainly_canonical(raw) {
        return Ok(raw.to_owned());
    }
    let hierarchical = |url: &Url| {
        if url.cannot_be_a_base() { Err("not a hierarchical URL".to_owned()) } else { Ok(()) }
    };
    match Url::parse(raw) {
        Ok(url) => {
            // Serialising a parsed URL and parsing it again gives the same URL, so the verdict
            // on the canonical form is the verdict on this one.
            hierarchical(&url)?;
            Ok(canonicalise(url))
        }
        // The cut string is what `canonical_url` gives; it is judged as it is.
        Err(_) => {
            let cut = cut_query_and_fragment(raw);
            let url = Url::parse(cut).map_err(|e| e.to_string())?;
            hierarchical(&url)?;
            Ok(cut.to_owned())
        }
    }
}

/// The canonical form of a parsed URL (see [`canonical_url`]).
fn canonicalise(mut url: Url) -> String {
    url.set_query(None);
    url.set_fragment(None);
    if !url.cannot_be_a_base() {
        let path = normalise_path(url.path());
        if path != url.path() {
            url.set_path(&path);
        }
    }
    url.into()
}

/// A string that is no URL, without its fragment and query.
fn cut_query_and_fragment(raw: &str) -> &str {
    let cut = raw.split('#').next().unwrap_or(raw);
    cut.split('?').next().unwrap_or(cut)
}

/// Whether `raw` is, by a conservative check, an `http` or `https` URL that [`canonical_url`]
/// returns unchanged, so that the parse can be skipped: a lower-case host name (letters,
/// digits, `-`; no IP address, no punycode), a port only if not the default one, a path whose
/// segments hold only characters that need no escape (no `%`), none empty but the last and
/// none `.` or `..`, and no query, fragment or user info. Anything else (which may well be
/// canonical too) goes through the parser.
fn is_plainly_canonical(raw: &str) -> bool {
    let (rest, default_port) = if let Some(rest) = raw.strip_prefix("https://") {
        (rest, "443")
    } else if let Some(rest) = raw.strip_prefix("http://") {
        (rest, "80")
    } else {
        return false;
    };
    let Some(slash) = rest.find('/') else {
        return false;
    };
    let (authority, path) = rest.split_at(slash);
    let (host, port) = match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    if let Some(port) = port {
        let digits =
            !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
        if !digits || port.starts_with('0') || port == default_port {
            return false;
        }
        if port.parse::<u32>().map_or(true, |n| n > u32::from(u16::MAX)) {
            return false;
        }
    }
    // A domain whose last label starts with a letter is never read as an IPv4 address, and
    // ASCII labels without `xn--` pass the IDNA mapping unchanged.
    // Byte slices are split by a plain loop (a `str` split searches for the separator with
    // its general machinery, which cost most of this check).
    let mut last_label: &[u8] = &[];
    for label in host.as_bytes().split(|&b| b == b'.') {
        let plain = label.iter().all(|&b| BYTE_CLASS[usize::from(b)] & HOST_BYTE != 0);
        if label.is_empty() || !plain || label.starts_with(b"xn--") {
            return false;
        }
        last_label = label;
    }
    if !last_label.first().is_some_and(u8::is_ascii_lowercase) {
        return false;
    }
    let mut segments = path.as_bytes()[1..].split(|&b| b == b'/').peekable();
    while let Some(segment) = segments.next() {
        if segment.is_empty() {
            if segments.peek().is_some() {
                return false;
            }
            continue;
        }
        let plain = segment.iter().all(|&b| BYTE_CLASS[usize::from(b)] & PATH_BYTE != 0);
        if segment == b"." || segment == b".." || !plain {
            return false;
        }
    }
    true
}

/// The classes of each byte for [`is_plainly_canonical`], looked up instead of tested (a
/// module URL's every byte goes through one of the tests on every lookup).
static BYTE_CLASS: [u8; 256] = {
    let mut table = [0; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        if b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' {
            table[byte] |= HOST_BYTE;
        }
        if plain_path_byte(b) {
            table[byte] |= PATH_BYTE;
        }
        byte += 1;
    }
    table
};

/// A byte of a host label that the URL parser keeps as it is: a lower-case letter, a digit, `-`.
const HOST_BYTE: u8 = 1;
/// A byte of [`plain_path_byte`].
const PATH_BYTE: u8 = 2;

/// A path byte that a URL keeps as it is and [`normalise_escapes`] leaves alone: unreserved
/// characters and sub-delimiters, `:` and `@` (RFC 3986 `pchar` without `%`).
const fn plain_path_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
        || matches!(
            byte,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
}

/// A parsed URL's path in one spelling (see [`canonical_url`]).
fn normalise_path(path: &str) -> String {
    if path.is_empty() {
        return String::new();
    }
    let segments: Vec<String> = path
        .split('/')
        .filter(|segment| !segment.is_empty())
        .map(|segment| {
            let decoded = normalise_escapes(segment);
            // A segment that would now read as `.` or `..` keeps its escapes: it names a file.
            if decoded == "." || decoded == ".." { segment.to_ascii_uppercase() } else { decoded }
        })
        .collect();
    let mut out = format!("/{}", segments.join("/"));
    if path.ends_with('/') && !segments.is_empty() {
        out.push('/');
    }
    out
}

/// Decodes the percent-escapes of unreserved characters and upper-cases the others.
fn normalise_escapes(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = String::with_capacity(segment.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            let byte = (high * 16 + low) as u8;
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(byte));
            } else {
                out.push('%');
                out.push_str(&segment[i + 1..i + 3].to_ascii_uppercase());
            }
            i += 3;
            continue;
        }
        let c = segment[i..].chars().next().expect("in bounds");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// Whether `url` ends in an executable extension. `x.d.ts` is a declaration file, not an
/// executable module.
pub fn has_executable_extension(url: &str) -> bool {
    !url.ends_with(".d.ts") && EXECUTABLE_EXTENSIONS.iter().any(|ext| url.ends_with(ext))
}

/// The `file_alias` of a URL: the URL with one trailing executable extension removed
/// (`x.d.ts` becomes `x.d`, as in the reference).
pub fn file_alias(url: &str) -> String {
    alias_of(url).to_owned()
}

/// [`file_alias`], borrowed from `url`.
pub(crate) fn alias_of(url: &str) -> &str {
    EXECUTABLE_EXTENSIONS.iter().find_map(|ext| url.strip_suffix(ext)).unwrap_or(url)
}

/// The variants of a URL used by invalidation: the URL, its alias and, unless it ends with
/// `/`, the alias with each executable extension. Ordered and de-duplicated.
pub fn variants(url: &str) -> Vec<String> {
    let alias = file_alias(url);
    let mut out = Vec::with_capacity(2 + EXECUTABLE_EXTENSIONS.len());
    push_unique(&mut out, url.to_owned());
    push_unique(&mut out, alias.clone());
    if !url.ends_with('/') {
        for ext in EXECUTABLE_EXTENSIONS {
            push_unique(&mut out, joined(&alias, ext));
        }
    }
    out
}

/// The URLs tried, in order, to populate a requested module: the URL itself when it carries an
/// executable extension, otherwise `url.gts`, `url.ts`, `url.gjs`, `url.js`, then `url`.
pub fn population_candidates(url: &str) -> Vec<String> {
    if has_executable_extension(url) {
        return vec![url.to_owned()];
    }
    CANDIDATE_EXTENSIONS
        .iter()
        .map(|ext| joined(url, ext))
        .chain(std::iter::once(url.to_owned()))
        .collect()
}

/// Normalises a module's dependency list: each entry is resolved against the module URL,
/// canonicalised and stripped of an executable extension; duplicates are dropped, first
/// occurrence kept.
pub fn normalise_deps<S: AsRef<str>>(module_url: &str, deps: &[S]) -> Vec<String> {
    let base = Url::parse(module_url).ok();
    let mut out = Vec::with_capacity(deps.len());
    for dep in deps {
        let dep = dep.as_ref();
        let resolved = match &base {
            Some(base) => base.join(dep).map(String::from).unwrap_or_else(|_| dep.to_owned()),
            None => dep.to_owned(),
        };
        push_unique(&mut out, file_alias(&canonical_url(&resolved)));
    }
    out
}

/// Whether `url` lies under the realm URL `realm` (a prefix ending in `/`).
pub fn is_under(url: &str, realm: &str) -> bool {
    url.starts_with(realm)
}

/// `url` followed by `ext`, without `format!`'s machinery (which cost an invalidation more
/// than its variants' own work: callgrind).
fn joined(url: &str, ext: &str) -> String {
    let mut out = String::with_capacity(url.len() + ext.len());
    out.push_str(url);
    out.push_str(ext);
    out
}

fn push_unique(list: &mut Vec<String>, item: String) {
    if !list.contains(&item) {
        list.push(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_drops_query_and_fragment() {
        assert_eq!(canonical_url("https://r.test/a/b.gts?x=1#frag"), "https://r.test/a/b.gts");
        assert_eq!(canonical_url("not a url#frag?q"), "not a url");
        assert_eq!(canonical_url("not a url?q#f"), "not a url");
    }

    #[test]
    fn every_spelling_of_a_path_is_one_canonical_url() {
        let canonical = "http://r.test/app/person.gts";
        for spelling in [
            "http://r.test/app/person.gts",
            "http://r.test/app/%70erson.gts",
            "http://r.test/app/%70%65rson%2Egts",
            "http://r.test//app//person.gts",
            "HTTP://R.TEST/app/./x/../person.gts",
            "http://r.test/app/person.gts?v=1#top",
        ] {
            assert_eq!(canonical_url(spelling), canonical, "{spelling}");
        }
        // Escapes of reserved and non-ASCII characters stay escapes, in one case.
        assert_eq!(canonical_url("http://r.test/a%2fb%c3%a9"), "http://r.test/a%2Fb%C3%A9");
        assert_eq!(canonical_url("http://r.test/my%20card.gts"), "http://r.test/my%20card.gts");
        // A realm keeps its trailing slash; the root stays the root.
        assert_eq!(canonical_url("http://r.test/app//"), "http://r.test/app/");
        assert_eq!(canonical_url("http://r.test"), "http://r.test/");
        // An escaped dot segment names a file: it is not resolved away.
        assert_eq!(canonical_url("http://r.test/a/%2E%2E%2Fx"), "http://r.test/a/..%2Fx");
        assert_eq!(normalise_path("/a/%2e%2e/b"), "/a/%2E%2E/b");
    }

    /// `canonical_url` as it was before the plainly-canonical shortcut, and the absolute-URL
    /// check as it was (parse the canonical form again): what the shortcuts must agree with.
    fn reference_canonical(raw: &str) -> String {
        match Url::parse(raw) {
            Ok(url) => canonicalise(url),
            Err(_) => {
                let cut = raw.split('#').next().unwrap_or(raw);
                cut.split('?').next().unwrap_or(cut).to_owned()
            }
        }
    }

    fn reference_hierarchical(raw: &str) -> Result<String, String> {
        let canonical = reference_canonical(raw);
        match Url::parse(&canonical) {
            Ok(parsed) if !parsed.cannot_be_a_base() => Ok(canonical),
            Ok(_) => Err("not a hierarchical URL".to_owned()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn assert_agrees(raw: &str) {
        assert_eq!(canonical_url(raw), reference_canonical(raw), "canonical_url({raw:?})");
        assert_eq!(
            canonical_hierarchical_url(raw),
            reference_hierarchical(raw),
            "canonical_hierarchical_url({raw:?})"
        );
    }

    #[test]
    fn the_shortcuts_agree_with_parsing_on_the_edge_cases() {
        for raw in [
            "http://r.test/a/b.gts",
            "https://r.test:8443/a/",
            "https://r.test:443/a",
            "http://r.test:80/a",
            "http://r.test:080/a",
            "http://r.test:0/a",
            "http://r.test:65535/a",
            "http://r.test:65536/a",
            "http://r.test:/a",
            "http://r.test",
            "http://r.test/",
            "http://R.test/a",
            "http://r.test./a",
            "http://.r.test/a",
            "http://1.2.3.4/a",
            "http://1.2.3/a",
            "http://r.0x1/a",
            "http://r.1x/a",
            "http://xn--a.test/a",
            "http://xn--nxasmq6b.test/a",
            "http://a--b.test/a",
            "http://-.test/-",
            "http://u@r.test/a",
            "http://r.test/a//b",
            "http://r.test/a/./b",
            "http://r.test/a/../b",
            "http://r.test/a/..",
            "http://r.test/a/.",
            "http://r.test/.../b",
            "http://r.test/a%2Fb",
            "http://r.test/a b",
            "http://r.test/a?b#c",
            "http://r.test/a\\b",
            "http://r.test/a\tb",
            " http://r.test/a",
            "http://r.test/~a_b-c.d!$&'()*+,;=:@",
            "http://r.test/a`b",
            "http://r.test/a{b}",
            "http://r.test/a^b|c",
            "http://r.test/é",
            "HTTP://r.test/a",
            "file:///C:/a/../b",
            "mailto:someone@r.test",
            "foo:/a//b",
            "foo://h/a",
            "not a url#frag?q",
            "http://[::1]/a",
            "http://exa mple.test/a?q",
            "",
        ] {
            assert_agrees(raw);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

        #[test]
        fn the_shortcuts_agree_with_parsing(
            scheme in "(http|https|HTTP|file|foo|)(://|:/|:)?",
            host in "([a-zA-Z0-9-]{0,4}|xn--[a-z]{1,3}|0x[0-9a-f]{1,2}|[0-9]{1,3}|\\[::1\\]|u@r)(\\.([a-z0-9-]{0,4}|0x1|[0-9]{1,3}))*\\.?",
            port in "(:([0-9]{0,6}))?",
            path in "(/([a-zA-Z0-9._~!$&'()*+,;=:@%-]|%2[eE]|%[0-9a-fA-F]{2}|\\.|\\.\\.| |\\\\|`|\\^|é){0,4}){0,4}",
            tail in "(\\?[a-z]*)?(#[a-z?]*)?",
        ) {
            assert_agrees(&format!("{scheme}{host}{port}{path}{tail}"));
        }

        /// Mostly URLs the shortcut takes, and their near misses.
        #[test]
        fn the_shortcut_agrees_with_parsing_near_canonical_urls(
            scheme in "https?://",
            host in "[a-z0-9-]{1,5}(\\.[a-z0-9-]{1,5}){0,2}",
            port in "(:[0-9]{1,5})?",
            path in "(/[a-zA-Z0-9._~!$&'()*+,;=:@-]{0,5}){1,4}",
        ) {
            assert_agrees(&format!("{scheme}{host}{port}{path}"));
        }
    }

    #[test]
    fn alias_trims_one_executable_extension() {
        assert_eq!(file_alias("https://r.test/person.gts"), "https://r.test/person");
        assert_eq!(file_alias("https://r.test/person"), "https://r.test/person");
        assert_eq!(file_alias("https://r.test/x.d.ts"), "https://r.test/x.d");
        assert_eq!(file_alias("https://r.test/data.json"), "https://r.test/data.json");
        assert!(!has_executable_extension("https://r.test/x.d.ts"));
        assert!(has_executable_extension("https://r.test/x.gjs"));
    }

    #[test]
    fn variants_are_ordered_and_unique() {
        assert_eq!(
            variants("https://r.test/p.gts"),
            [
                "https://r.test/p.gts",
                "https://r.test/p",
                "https://r.test/p.js",
                "https://r.test/p.gjs",
                "https://r.test/p.ts",
            ]
        );
        assert_eq!(variants("https://r.test/dir/"), ["https://r.test/dir/"]);
    }

    #[test]
    fn candidates_follow_the_reference_order() {
        assert_eq!(population_candidates("https://r.test/p.ts"), ["https://r.test/p.ts"]);
        assert_eq!(
            population_candidates("https://r.test/p"),
            [
                "https://r.test/p.gts",
                "https://r.test/p.ts",
                "https://r.test/p.gjs",
                "https://r.test/p.js",
                "https://r.test/p",
            ]
        );
    }

    #[test]
    fn deps_are_resolved_canonicalised_trimmed_and_unique() {
        let deps = ["./leaf.gts", "../other/x.js?v=2", "./leaf", "https://cdn.test/lib.js#a"];
        assert_eq!(
            normalise_deps("https://r.test/cards/card.gts", &deps),
            ["https://r.test/cards/leaf", "https://r.test/other/x", "https://cdn.test/lib"]
        );
    }
}
