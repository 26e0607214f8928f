//! URL helpers of SPEC §3.1: canonical form, aliases, variants, population candidates and
//! dependency normalisation. Everything here is a pure function of its input.

use url::Url;

/// Executable extensions, in the order they are tried when trimming an alias.
pub const EXECUTABLE_EXTENSIONS: [&str; 4] = [".js", ".gjs", ".ts", ".gts"];

/// Extensions tried, in this order, when an extensionless module is populated.
const CANDIDATE_EXTENSIONS: [&str; 4] = [".gts", ".ts", ".gjs", ".js"];

/// The canonical form of a module URL: parsed, without query and fragment. A string that does
/// not parse as a URL is cut at its first `#`, then at its first `?`, and otherwise kept.
pub fn canonical_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) => {
            url.set_query(None);
            url.set_fragment(None);
            url.into()
        }
        Err(_) => {
            let cut = raw.split('#').next().unwrap_or(raw);
            cut.split('?').next().unwrap_or(cut).to_owned()
        }
    }
}

/// Whether `url` ends in an executable extension. `x.d.ts` is a declaration file, not an
/// executable module.
pub fn has_executable_extension(url: &str) -> bool {
    !url.ends_with(".d.ts") && EXECUTABLE_EXTENSIONS.iter().any(|ext| url.ends_with(ext))
}

/// The `file_alias` of a URL: the URL with one trailing executable extension removed
/// (`x.d.ts` becomes `x.d`, as in the reference).
pub fn file_alias(url: &str) -> String {
    EXECUTABLE_EXTENSIONS.iter().find_map(|ext| url.strip_suffix(ext)).unwrap_or(url).to_owned()
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
            push_unique(&mut out, format!("{alias}{ext}"));
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
        .map(|ext| format!("{url}{ext}"))
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
