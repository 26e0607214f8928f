//! A [`Prerenderer`] over realm directories on disk: the module at a realm URL is the file at
//! the same relative path under the realm's directory, and "rendering" it means scanning its
//! source for exports and imports ([`crate::scan`]).
//!
//! It stands in for the real, expensive renderer so that the cache can be exercised against
//! files a person edits: each call reads the disk afresh (nothing is cached here — caching is
//! the lookup's job) and counts itself, so a caller can see how often the cache had to render.
//!
//! # URL to path
//!
//! The module URL is canonicalised (query and fragment dropped), the realm with the longest
//! URL prefix is chosen (so a realm nested in another realm's URL space wins for its own
//! files), and the remainder is split on `/`, each segment percent-decoded (`my%20card.gts`
//! is the file `my card.gts`). A segment that decodes to anything but one ordinary file name —
//! `..`, `.`, or text containing a separator or NUL, as `..%2Fsecret` does — is refused, and
//! the module is answered as missing: a URL must never reach outside its realm's directory.
//! Empty segments (`a//b`) are skipped. Bytes that do not decode to UTF-8 are refused too.
//!
//! # What it may read
//!
//! Only regular files inside the realm directory, judged after every symbolic link is
//! resolved: a link (or a linked directory) that leads outside is answered exactly as a
//! missing file, so it can neither read nor probe what exists outside. A FIFO, a device or a
//! socket inside the realm is a module error, never opened for a blocking read, and a source
//! larger than the configured limit ([`FilePrerenderer::with_max_module_bytes`], 8 MiB by
//! default) is a module error with status 413; nothing is read past the limit. Dependencies
//! are checked for existence by the same rules.
//!
//! # Answers
//!
//! - Not under any realm: `Err(LookupError::Prerender)`, since the renderer was asked about
//!   something it cannot serve at all.
//! - No such file, or a directory: [`PrerenderResponse::missing`], which the lookup reads as
//!   "try the next candidate".
//! - A file that cannot be read (permissions, invalid UTF-8): a module error with status 500
//!   naming the path. The renderer worked; the module is broken.
//! - An import of a realm-local module for which no file exists: a module error with status
//!   404 naming the first such dependency, with the module's normalised dependencies.
//! - Otherwise: ready, one definition per export, and the module's dependencies.
//!
//! # Versions
//!
//! A module whose source has a line comment `// version: N` (N an unsigned 64-bit integer,
//! the first such line wins) reports it: every definition of the module carries
//! `"version": N`. It lets an audit tell which edit of a file a cached row was rendered from
//! (`cargo xtask soak` does exactly that).

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lookup_core::urls::{canonical_url, file_alias, normalise_deps, population_candidates};
use lookup_core::{
    CodeRef, ErrorDoc, LookupError, PrerenderRequest, PrerenderResponse, Prerenderer, SharedError,
};
use serde_json::{Map, Value, json};
use url::Url;

use crate::scan::{ModuleScan, scan};
// The `// version: N` line a definition records (the soak audits it).
use crate::soak_protocol::source_version;

/// A prerenderer that reads modules from realm directories (see the module documentation).
///
/// Cloning is cheap and clones share the prerender counter, so a test or a demo can keep a
/// clone to watch how many renders the lookup asked for.
#[derive(Debug, Clone)]
pub(crate) struct FilePrerenderer {
    /// `(canonical realm URL ending in '/', directory)`, in registration order.
    realms: Arc<[(String, PathBuf)]>,
    /// How long each render waits after reading, before answering.
    delay: Duration,
    /// The most each render waits on top of `delay`: a random 0..=max milliseconds.
    jitter_max_ms: u64,
    /// Prerender calls so far, shared by every clone.
    count: Arc<AtomicUsize>,
    /// The largest module source read; a larger one is a module error.
    max_module_bytes: u64,
}

/// Where a URL lands on disk.
#[derive(Debug, PartialEq, Eq)]
enum Location {
    /// No realm's URL is a prefix of it.
    OutsideRealms,
    /// It is under a realm but names no file that may be served (a `..` escape, a decoded
    /// separator, bytes that are not UTF-8).
    Refused,
    /// The file it names (which may or may not exist), in the realm directory `root`.
    File { root: PathBuf, path: PathBuf },
}

/// What a located path holds, once symbolic links are resolved and containment is checked.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// A regular file inside the realm directory, at this resolved path.
    File(PathBuf),
    /// Nothing servable: no such file, a directory, or anything that resolves outside the
    /// realm directory (told apart from nothing, so a link cannot probe what exists outside).
    Missing,
    /// Inside the realm, but not a regular file (a FIFO, a device, a socket).
    NotRegular(&'static str),
}

/// The default of [`FilePrerenderer::with_max_module_bytes`]: 8 MiB.
pub(crate) const DEFAULT_MAX_MODULE_BYTES: u64 = 8 << 20;

impl FilePrerenderer {
    /// A prerenderer serving each realm URL from its directory. Realm URLs are canonicalised
    /// and given a trailing `/` if they lack one, so that `https://r.test/a` cannot claim
    /// `https://r.test/ab/x.gts`.
    pub(crate) fn new(realms: Vec<(String, PathBuf)>) -> Self {
        let realms = realms
            .into_iter()
            .map(|(url, dir)| {
                let mut url = canonical_url(&url);
                if !url.ends_with('/') {
                    url.push('/');
                }
                (url, dir)
            })
            .collect();
        FilePrerenderer {
            realms,
            delay: Duration::ZERO,
            jitter_max_ms: 0,
            count: Arc::new(AtomicUsize::new(0)),
            max_module_bytes: DEFAULT_MAX_MODULE_BYTES,
        }
    }

    /// Reads at most `max` bytes of a module's source; a larger module is a module error
    /// (status 413) naming the limit, instead of a render that reads without bound.
    pub(crate) fn with_max_module_bytes(mut self, max: u64) -> Self {
        self.max_module_bytes = max;
        self
    }

    /// Makes every render wait `delay` after reading the file and before answering, so that a
    /// render can be overlapped with an edit (the answer then describes the file as it was).
    pub(crate) fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Makes every render wait a random 0..=`max` (in whole milliseconds) after reading the
    /// file, on top of any [`with_delay`](Self::with_delay), so that many renders overlap
    /// edits and invalidations at many different offsets (the soak test's workers use it).
    pub(crate) fn with_jitter(mut self, max: Duration) -> Self {
        self.jitter_max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// The wait of one render: the fixed delay plus a fresh random draw of the jitter.
    fn render_wait(&self) -> Duration {
        if self.jitter_max_ms == 0 {
            return self.delay;
        }
        // fastrand's thread-local generator, randomly seeded: draws differ between renders,
        // threads and processes, which is all the jitter needs.
        self.delay + Duration::from_millis(fastrand::u64(0..=self.jitter_max_ms))
    }

    /// How many times `prerender` has been called, on this prerenderer or any clone of it.
    pub(crate) fn prerender_count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Maps a canonical URL to the file it names (see the module documentation).
    fn locate(&self, url: &str) -> Location {
        let Some((realm, dir)) = self
            .realms
            .iter()
            .filter(|(realm, _)| url.starts_with(realm.as_str()))
            .max_by_key(|(realm, _)| realm.len())
        else {
            return Location::OutsideRealms;
        };
        let mut path = dir.clone();
        for segment in url[realm.len()..].split('/').filter(|s| !s.is_empty()) {
            match decode_segment(segment) {
                Some(name) => path.push(name),
                None => return Location::Refused,
            }
        }
        Location::File { root: dir.clone(), path }
    }

    /// Whether some population candidate of the dependency `dep` is a module file. Only asked
    /// for dependencies under a realm; answered by the same rules as a render, so a
    /// dependency can no more probe outside the realm than a module can.
    async fn dependency_exists(&self, dep: &str) -> bool {
        for candidate in population_candidates(dep) {
            if let Location::File { root, path } = self.locate(&candidate)
                && matches!(contained(&root, &path).await, Target::File(_))
            {
                return true;
            }
        }
        false
    }

    /// Everything a render does before the delay: read, scan, check dependencies.
    async fn render(&self, module_url: &str, root: &Path, path: &Path) -> PrerenderResponse {
        let broken = |message: String, status: u16| {
            PrerenderResponse::error(
                ErrorDoc::module_error(message, status, Vec::new()),
                Vec::new(),
            )
        };
        let real = match contained(root, path).await {
            Target::File(real) => real,
            Target::Missing => return PrerenderResponse::missing(module_url),
            Target::NotRegular(kind) => {
                let message =
                    format!("{} (for {module_url}) is {kind}, not a regular file", path.display());
                return broken(message, 500);
            }
        };
        let bytes = match read_capped(&real, self.max_module_bytes).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                let message = format!(
                    "{} (for {module_url}) is larger than the {}-byte limit for a module \
                     (--max-module-bytes)",
                    path.display(),
                    self.max_module_bytes
                );
                return broken(message, 413);
            }
            Err(error) => {
                if is_missing(path, &error).await {
                    return PrerenderResponse::missing(module_url);
                }
                if error.kind() == std::io::ErrorKind::InvalidInput {
                    let message =
                        format!("{} (for {module_url}) is not a regular file", path.display());
                    return broken(message, 500);
                }
                return broken(
                    format!("cannot read {} for {module_url}: {error}", path.display()),
                    500,
                );
            }
        };
        let Ok(source) = String::from_utf8(bytes) else {
            let message = format!("{} (for {module_url}) is not valid UTF-8", path.display());
            return PrerenderResponse::error(
                ErrorDoc::module_error(message, 500, Vec::new()),
                Vec::new(),
            );
        };

        let found = scan(&source);
        let deps = resolve_deps(module_url, &found);
        for dep in &deps {
            // JSON modules are data served by the realm, not files we can vouch for; and
            // dependencies outside every realm are someone else's to check.
            if dep.ends_with(".json") || self.locate(dep) == Location::OutsideRealms {
                continue;
            }
            if !self.dependency_exists(dep).await {
                let message = format!("{module_url} imports missing module {dep}");
                let error = ErrorDoc::module_error(message, 404, vec![file_alias(dep)]);
                return PrerenderResponse::error(error, normalise_deps(module_url, &deps));
            }
        }

        let alias = file_alias(module_url);
        let source_lines = source.lines().count();
        let version = source_version(&source);
        let mut definitions = Map::new();
        for export in &found.exports {
            let mut definition = json!({
                "type": "definition",
                "name": export.name,
                "kind": export.kind.as_str(),
                "module": alias,
            });
            if let Some(extends) = &export.extends {
                definition["extends"] = Value::from(extends.as_str());
            }
            definition["source_lines"] = Value::from(source_lines);
            if let Some(version) = version {
                definition["version"] = Value::from(version);
            }
            definitions.insert(CodeRef::new(module_url, &export.name).definition_key(), definition);
        }
        PrerenderResponse::ready(definitions, deps)
    }
}

impl Prerenderer for FilePrerenderer {
    async fn prerender(
        &self,
        request: &PrerenderRequest,
    ) -> Result<PrerenderResponse, LookupError> {
        self.count.fetch_add(1, Ordering::SeqCst);
        let module_url = canonical_url(&request.module_url);
        let response = match self.locate(&module_url) {
            Location::OutsideRealms => {
                let served: Vec<&str> = self.realms.iter().map(|(url, _)| url.as_str()).collect();
                let reason =
                    format!("not under any realm directory (serving: {})", served.join(", "));
                return Err(LookupError::Prerender {
                    url: module_url,
                    source: SharedError::from(Box::<dyn std::error::Error + Send + Sync>::from(
                        reason,
                    )),
                });
            }
            Location::Refused => PrerenderResponse::missing(&module_url),
            Location::File { root, path } => self.render(&module_url, &root, &path).await,
        };
        tracing::info!(module = %module_url, status = ?response.status, "prerendered (source read)");
        // The wait comes after the read on purpose: an edit made during it is not in this
        // answer, which is exactly the stale render the cache's generation guard must catch.
        let wait = self.render_wait();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(response)
    }
}

/// Resolves `path`'s symbolic links and checks that it stays inside the realm directory
/// `root` (resolved too), then what it is. Anything outside is [`Target::Missing`], exactly
/// like nothing at all, so links cannot be used to learn what exists outside the realm.
async fn contained(root: &Path, path: &Path) -> Target {
    let Ok(root) = tokio::fs::canonicalize(root).await else { return Target::Missing };
    let Ok(real) = tokio::fs::canonicalize(path).await else { return Target::Missing };
    if !real.starts_with(&root) {
        tracing::debug!(path = %path.display(), "refused: it resolves outside its realm directory");
        return Target::Missing;
    }
    match tokio::fs::metadata(&real).await {
        Ok(meta) if meta.is_file() => Target::File(real),
        Ok(meta) if meta.is_dir() => Target::Missing,
        Ok(meta) => Target::NotRegular(file_kind(&meta)),
        Err(_) => Target::Missing,
    }
}

/// What a non-regular, non-directory file is, in words.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    let kind = meta.file_type();
    if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// Reads a regular file, at most `max` bytes: `Ok(None)` when it is larger. Opened without
/// blocking and checked again on the open handle, so a file swapped for a FIFO or a device
/// after [`contained`] looked cannot hang or flood the render.
async fn read_capped(path: &Path, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt as _;
    let file =
        tokio::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).await?;
    let meta = file.metadata().await?;
    if !meta.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"));
    }
    if meta.len() > max {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // One byte past the limit tells a file that grew since the check.
    file.take(max.saturating_add(1)).read_to_end(&mut bytes).await?;
    if bytes.len() as u64 > max {
        return Ok(None);
    }
    Ok(Some(bytes))
}

/// Whether a failed read means "there is no module here": nothing at the path, a directory,
/// or a path through a regular file (`x.gts/y.gts`).
async fn is_missing(path: &Path, error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::NotFound | ErrorKind::NotADirectory | ErrorKind::IsADirectory => true,
        // Some platforms report reading a directory as something else (Windows: permission
        // denied), so ask the file system what is there.
        _ => tokio::fs::metadata(path).await.is_ok_and(|meta| meta.is_dir()),
    }
}

/// The module's dependencies: each import that is relative (`./`, `../`, `/`) or an absolute
/// `http(s)` URL, resolved against the module URL and canonicalised, keeping its extension.
/// Bare specifiers (`lodash`, `@cardstack/x`) are resolved by an import map, not by URL, so
/// they are not dependencies. Order is kept; duplicates (after resolution) dropped.
fn resolve_deps(module_url: &str, found: &ModuleScan) -> Vec<String> {
    let base = Url::parse(module_url).ok();
    let mut deps = Vec::new();
    for specifier in &found.imports {
        let resolved = if ["./", "../", "/"].iter().any(|p| specifier.starts_with(p)) {
            base.as_ref().and_then(|base| base.join(specifier).ok())
        } else if specifier.starts_with("http://") || specifier.starts_with("https://") {
            Url::parse(specifier).ok()
        } else {
            None
        };
        if let Some(url) = resolved {
            let dep = canonical_url(url.as_str());
            if !deps.contains(&dep) {
                deps.push(dep);
            }
        }
    }
    deps
}

/// Percent-decodes one URL path segment into a file name, or `None` when the result is not
/// exactly one ordinary path component (so it cannot climb out, name a root or a drive, or
/// smuggle in a separator) or is not UTF-8. A `%` not followed by two hex digits is literal.
fn decode_segment(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = if bytes[i] == b'%' {
            bytes
                .get(i + 1..i + 3)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        } else {
            None
        };
        match escape {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    let name = String::from_utf8(decoded).ok()?;
    let mut components = Path::new(&name).components();
    let single_normal =
        matches!(components.next(), Some(Component::Normal(_))) && components.next().is_none();
    // `Path::components` quietly drops a trailing separator (`a/` is one component), so
    // separators and NUL are refused outright as well.
    if !single_normal || name.contains(['/', '\\', '\0']) {
        return None;
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use lookup_core::PrerenderStatus;

    use super::*;

    const REALM: &str = "https://r.test/realm/";

    /// A realm directory inside a temporary directory (the parent is free for files that must
    /// stay outside the realm).
    struct Fixture {
        root: tempfile::TempDir,
        renderer: FilePrerenderer,
    }

    impl Fixture {
        fn new() -> Self {
            let root = tempfile::tempdir().expect("temporary directory");
            let realm = root.path().join("realm");
            std::fs::create_dir(&realm).expect("realm directory");
            let renderer = FilePrerenderer::new(vec![(REALM.to_owned(), realm)]);
            Fixture { root, renderer }
        }

        fn write(&self, relative: &str, contents: impl AsRef<[u8]>) {
            let path = self.root.path().join("realm").join(relative);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("directories");
            std::fs::write(path, contents).expect("write");
        }

        async fn render(&self, url: &str) -> PrerenderResponse {
            self.renderer.prerender(&request(url)).await.expect("prerender answers")
        }
    }

    fn request(url: &str) -> PrerenderRequest {
        PrerenderRequest {
            module_url: url.to_owned(),
            realm_url: REALM.to_owned(),
            user: "owner".to_owned(),
        }
    }

    fn url(path: &str) -> String {
        format!("{REALM}{path}")
    }

    fn message(response: &PrerenderResponse) -> &str {
        &response.error.as_ref().expect("an error").error.message
    }

    #[tokio::test]
    async fn a_ready_module_has_definitions_and_deps() {
        let fixture = Fixture::new();
        fixture.write("pet.gts", "export class Pet {}\n");
        fixture.write("shared/util.ts", "export function helper() {}\n");
        fixture.write(
            "cards/person.gts",
            "import { CardDef } from 'https://cardstack.com/base/card-api';\n\
             import { Pet } from '../pet';\n\
             import { helper } from '/realm/shared/util.ts?v=2#x';\n\
             import data from './data.json';\n\
             import lodash from 'lodash';\n\
             import { x } from '@cardstack/runtime-common';\n\
             export class Person extends CardDef {}\n\
             export function greet() {}\n\
             export const LIMIT = 3;\n\
             export default class extends Base.Card {}\n",
        );

        let response = fixture.render(&url("cards/person.gts")).await;

        assert_eq!(response.status, PrerenderStatus::Ready);
        assert_eq!(response.error, None);
        assert_eq!(
            response.deps,
            [
                "https://cardstack.com/base/card-api",
                "https://r.test/realm/pet",
                "https://r.test/realm/shared/util.ts",
                "https://r.test/realm/cards/data.json",
            ]
        );
        let module = "https://r.test/realm/cards/person";
        let expected = json!({
            format!("{module}/Person"): {
                "type": "definition", "name": "Person", "kind": "class", "module": module,
                "extends": "CardDef", "source_lines": 10,
            },
            format!("{module}/greet"): {
                "type": "definition", "name": "greet", "kind": "function", "module": module,
                "source_lines": 10,
            },
            format!("{module}/LIMIT"): {
                "type": "definition", "name": "LIMIT", "kind": "const", "module": module,
                "source_lines": 10,
            },
            format!("{module}/default"): {
                "type": "definition", "name": "default", "kind": "default", "module": module,
                "extends": "Base.Card", "source_lines": 10,
            },
        });
        assert_eq!(Value::Object(response.definitions.clone()), expected);
        // The definition document's key order is part of what a person reads in the demo.
        let keys: Vec<&str> = response.definitions[&format!("{module}/Person")]
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["type", "name", "kind", "module", "extends", "source_lines"]);
    }

    #[tokio::test]
    async fn a_module_without_exports_is_ready_and_empty() {
        let fixture = Fixture::new();
        fixture.write("empty.js", "console.log('hi');\n");
        let response = fixture.render(&url("empty.js")).await;
        assert_eq!(response, PrerenderResponse::ready(Map::new(), Vec::new()));
    }

    #[tokio::test]
    async fn extensions_are_taken_literally() {
        let fixture = Fixture::new();
        fixture.write("person.gts", "export class Person {}\n");
        fixture.write("plain", "export const p = 1;\n");

        // The renderer renders exactly the candidate it is given; trying extensions for an
        // extensionless URL is the lookup's job (population candidates).
        assert_eq!(
            fixture.render(&url("person")).await,
            PrerenderResponse::missing(&url("person"))
        );
        assert_eq!(
            fixture.render(&url("person.ts")).await,
            PrerenderResponse::missing(&url("person.ts"))
        );

        let response = fixture.render(&url("person.gts")).await;
        assert_eq!(response.status, PrerenderStatus::Ready);
        // Definition keys use the alias, whatever extension the candidate had.
        assert!(response.definitions.contains_key("https://r.test/realm/person/Person"));

        let response = fixture.render(&url("plain")).await;
        assert!(response.definitions.contains_key("https://r.test/realm/plain/p"));
    }

    #[tokio::test]
    async fn dependencies_are_found_by_population_candidates() {
        let fixture = Fixture::new();
        fixture.write("a.gts", "");
        fixture.write("b.ts", "");
        fixture.write("c.gjs", "");
        fixture.write("d.js", "");
        fixture.write("e", "");
        fixture.write("f.gts", "");
        fixture.write(
            "consumer.gts",
            "import './a'; import './b'; import './c'; import './d'; import './e'; import './f.gts';\n\
             import 'https://elsewhere.test/not-checked';\n\
             import '../outside-the-realm';\n\
             import './missing.json';\n",
        );
        let response = fixture.render(&url("consumer.gts")).await;
        assert_eq!(response.status, PrerenderStatus::Ready, "{:?}", response.error);
        assert_eq!(response.deps.len(), 9);
    }

    #[tokio::test]
    async fn a_dependency_with_an_extension_must_exist_with_that_extension() {
        let fixture = Fixture::new();
        fixture.write("leaf.gts", "");
        fixture.write("consumer.gts", "import './leaf.ts';\n");
        let response = fixture.render(&url("consumer.gts")).await;
        assert_eq!(response.status, PrerenderStatus::Error);
        assert_eq!(
            message(&response),
            "https://r.test/realm/consumer.gts imports missing module https://r.test/realm/leaf.ts"
        );
    }

    #[tokio::test]
    async fn a_missing_file_is_a_missing_module() {
        let fixture = Fixture::new();
        let missing = url("nope.gts");
        assert_eq!(fixture.render(&missing).await, PrerenderResponse::missing(&missing));
        // Through a regular file, and a directory, are missing too.
        fixture.write("file.gts", "");
        fixture.write("dir/inner.gts", "");
        let through = url("file.gts/inner.gts");
        assert_eq!(fixture.render(&through).await, PrerenderResponse::missing(&through));
        assert_eq!(fixture.render(&url("dir")).await, PrerenderResponse::missing(&url("dir")));
        assert_eq!(fixture.render(REALM).await, PrerenderResponse::missing(REALM));
    }

    #[tokio::test]
    async fn a_missing_dependency_is_a_404_naming_it() {
        let fixture = Fixture::new();
        fixture.write("present.gts", "");
        fixture.write(
            "card.gts",
            "import './present';\nimport { Leaf } from './leaf-field';\nimport './also-missing.gts';\n\
             export class Card {}\n",
        );
        let response = fixture.render(&url("card.gts")).await;

        assert_eq!(response.status, PrerenderStatus::Error);
        assert!(response.definitions.is_empty());
        let error = &response.error.as_ref().expect("an error").error;
        assert_eq!(error.status, 404);
        assert_eq!(
            error.message,
            "https://r.test/realm/card.gts imports missing module https://r.test/realm/leaf-field"
        );
        assert_eq!(error.deps, ["https://r.test/realm/leaf-field"]);
        assert_eq!(
            response.deps,
            [
                "https://r.test/realm/present",
                "https://r.test/realm/leaf-field",
                "https://r.test/realm/also-missing"
            ]
        );
    }

    #[tokio::test]
    async fn unreadable_source_is_a_500_naming_the_path() {
        let fixture = Fixture::new();
        fixture.write("binary.gts", [0xff, 0xfe, 0x00, b'x']);
        let response = fixture.render(&url("binary.gts")).await;
        assert_eq!(response.status, PrerenderStatus::Error);
        let error = &response.error.as_ref().expect("an error").error;
        assert_eq!(error.status, 500);
        let path = fixture.root.path().join("realm").join("binary.gts");
        assert!(error.message.contains(&path.display().to_string()), "{}", error.message);
        assert!(response.deps.is_empty());
    }

    #[tokio::test]
    async fn a_url_outside_every_realm_is_a_prerender_failure() {
        let fixture = Fixture::new();
        let result = fixture.renderer.prerender(&request("https://other.test/realm/x.gts")).await;
        let Err(LookupError::Prerender { url, source }) = result else {
            panic!("expected a prerender failure, got {result:?}");
        };
        assert_eq!(url, "https://other.test/realm/x.gts");
        assert!(source.to_string().contains(REALM), "{source}");
        // A realm URL is a directory prefix, not a string prefix.
        let sibling = fixture.renderer.prerender(&request("https://r.test/realm-two/x.gts")).await;
        assert!(matches!(sibling, Err(LookupError::Prerender { .. })));
    }

    #[tokio::test]
    async fn escapes_out_of_the_realm_are_refused() {
        let fixture = Fixture::new();
        std::fs::write(fixture.root.path().join("secret.gts"), "export const secret = 1;\n")
            .expect("write");

        // A `..` the URL parser resolves leaves the realm's URL space altogether.
        let resolved =
            fixture.renderer.prerender(&request("https://r.test/realm/../secret.gts")).await;
        assert!(matches!(resolved, Err(LookupError::Prerender { .. })));

        // Encoded separators survive URL parsing; they must not survive path mapping.
        for escape in ["..%2Fsecret.gts", "..%5Csecret.gts", "sub/..%2F..%2Fsecret.gts", "%00"] {
            let target = url(escape);
            assert_eq!(
                fixture.render(&target).await,
                PrerenderResponse::missing(&target),
                "{escape}"
            );
        }

        // The mapping itself refuses dot segments in URLs that were never canonicalised.
        assert_eq!(
            fixture.renderer.locate("https://r.test/realm/../secret.gts"),
            Location::Refused
        );
        assert_eq!(fixture.renderer.locate("https://r.test/realm/./x.gts"), Location::Refused);

        // A dependency that would escape is simply missing.
        fixture.write("consumer.gts", "import './..%2Fsecret.gts';\n");
        let response = fixture.render(&url("consumer.gts")).await;
        assert_eq!(response.error.expect("an error").error.status, 404);
    }

    #[tokio::test]
    async fn links_out_of_the_realm_read_nothing_and_reveal_nothing() {
        let fixture = Fixture::new();
        let outside = fixture.root.path().join("outside");
        std::fs::create_dir(&outside).expect("outside directory");
        std::fs::write(outside.join("secret.gts"), "export const secret = 1;\n").expect("write");
        let realm = fixture.root.path().join("realm");
        let link = |name: &str, target: &Path| {
            std::os::unix::fs::symlink(target, realm.join(name)).expect("symlink");
        };
        link("link.gts", &outside.join("secret.gts"));
        link("dangling.gts", &outside.join("nothing-here.gts"));
        link("etc", Path::new("/etc"));
        link("out", &outside);
        // Inside the realm, a link to a sibling is fine.
        fixture.write("real.gts", "export const real = 1;\n");
        link("alias.gts", &realm.join("real.gts"));

        // A link to an existing file outside answers exactly like one to nothing.
        for escape in ["link.gts", "dangling.gts", "etc/passwd", "out/secret.gts"] {
            let target = url(escape);
            assert_eq!(fixture.render(&target).await, PrerenderResponse::missing(&target));
        }
        let alias = fixture.render(&url("alias.gts")).await;
        assert_eq!(alias.status, PrerenderStatus::Ready, "{alias:?}");
        // Dependencies are probed by the same rules: an import of the link is missing too.
        fixture.write("consumer.gts", "import { secret } from './link.gts';\n");
        let response = fixture.render(&url("consumer.gts")).await;
        assert_eq!(response.error.expect("an error").error.status, 404);
    }

    #[tokio::test]
    async fn special_files_are_refused_and_large_ones_capped() {
        let fixture = Fixture::new();
        let realm = fixture.root.path().join("realm");
        let fifo = realm.join("fifo.gts");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
        assert!(made.success());
        std::os::unix::fs::symlink("/dev/zero", realm.join("zero.gts")).expect("symlink");
        // Neither hangs nor reads without bound: bounded here so a regression fails.
        let answer = |name: &'static str| {
            let fixture = &fixture;
            async move {
                tokio::time::timeout(Duration::from_secs(10), fixture.render(&url(name)))
                    .await
                    .expect("answered promptly")
            }
        };
        let response = answer("fifo.gts").await;
        let error = &response.error.as_ref().expect("an error").error;
        assert_eq!(error.status, 500);
        assert!(error.message.contains("a FIFO, not a regular file"), "{}", error.message);
        // /dev/zero is outside the realm: missing. A device inside would be refused like the
        // FIFO; the link shows the read never happens.
        assert_eq!(answer("zero.gts").await, PrerenderResponse::missing(&url("zero.gts")));

        let capped =
            FilePrerenderer::new(vec![(REALM.to_owned(), realm)]).with_max_module_bytes(64);
        fixture.write("big.gts", format!("export const big = 1;\n{}", "// x\n".repeat(20)));
        let response = capped.prerender(&request(&url("big.gts"))).await.expect("answers");
        let error = &response.error.as_ref().expect("an error").error;
        assert_eq!(error.status, 413);
        assert!(error.message.contains("64-byte limit"), "{}", error.message);
        fixture.write("small.gts", "export const small = 1;\n");
        let response = capped.prerender(&request(&url("small.gts"))).await.expect("answers");
        assert_eq!(response.status, PrerenderStatus::Ready);
    }

    #[tokio::test]
    async fn percent_encoded_names_query_and_fragment() {
        let fixture = Fixture::new();
        fixture.write("my card.gts", "export class MyCard {}\n");
        let response = fixture.render(&url("my%20card.gts?fresh=1#top")).await;
        assert_eq!(response.status, PrerenderStatus::Ready);
        assert!(response.definitions.contains_key("https://r.test/realm/my%20card/MyCard"));

        // A `%` without two hex digits after it is taken literally.
        fixture.write("100%.gts", "export const full = 1;\n");
        assert_eq!(fixture.render(&url("100%.gts")).await.status, PrerenderStatus::Ready);
    }

    #[tokio::test]
    async fn the_most_specific_realm_serves_a_url() {
        let root = tempfile::tempdir().expect("temporary directory");
        let outer = root.path().join("outer");
        let inner = root.path().join("inner");
        std::fs::create_dir_all(outer.join("nested")).expect("outer");
        std::fs::create_dir_all(&inner).expect("inner");
        std::fs::write(outer.join("nested").join("x.gts"), "export const fromOuter = 1;\n")
            .expect("write");
        std::fs::write(inner.join("x.gts"), "export const fromInner = 1;\n").expect("write");
        // Registered without trailing slashes and in mixed case: both are normalised.
        let renderer = FilePrerenderer::new(vec![
            ("https://R.test/outer".to_owned(), outer),
            ("https://r.test/outer/nested".to_owned(), inner),
        ]);
        let response = renderer
            .prerender(&request("https://r.test/outer/nested/x.gts"))
            .await
            .expect("answer");
        assert!(response.definitions.contains_key("https://r.test/outer/nested/x/fromInner"));
    }

    #[tokio::test]
    async fn every_call_is_counted_across_clones() {
        let fixture = Fixture::new();
        fixture.write("a.gts", "");
        let clone = fixture.renderer.clone();
        assert_eq!(fixture.renderer.prerender_count(), 0);
        fixture.render(&url("a.gts")).await;
        clone.prerender(&request(&url("missing.gts"))).await.expect("answer");
        let _ = clone.prerender(&request("https://other.test/x.gts")).await;
        assert_eq!(fixture.renderer.prerender_count(), 3);
        assert_eq!(clone.prerender_count(), 3);
    }

    #[tokio::test]
    async fn the_delay_is_honoured() {
        let fixture = Fixture::new();
        fixture.write("slow.gts", "export const before = 1;\n");
        let delay = Duration::from_millis(40);
        let renderer = fixture.renderer.clone().with_delay(delay);

        let started = Instant::now();
        let response = renderer.prerender(&request(&url("slow.gts"))).await.expect("answer");
        // Only a lower bound: an upper bound would be a timing assertion on a busy machine.
        assert!(started.elapsed() >= delay);
        assert!(response.definitions.contains_key("https://r.test/realm/slow/before"));

        // A delayed missing answer waits as well (every render takes the same time).
        let started = Instant::now();
        renderer.prerender(&request(&url("absent.gts"))).await.expect("answer");
        assert!(started.elapsed() >= delay);
    }

    #[tokio::test]
    async fn a_version_comment_is_reported_by_every_definition() {
        let fixture = Fixture::new();
        fixture.write(
            "card.gts",
            "import { Base } from './base';\n// version: 1754000000123456\n\
             export class Card extends Base {}\nexport const LIMIT = 3;\n// version: 7\n",
        );
        fixture.write("base.gts", "export class Base {}\n");
        let response = fixture.render(&url("card.gts")).await;
        assert_eq!(response.status, PrerenderStatus::Ready, "{:?}", response.error);
        for key in ["https://r.test/realm/card/Card", "https://r.test/realm/card/LIMIT"] {
            assert_eq!(response.definitions[key]["version"], 1_754_000_000_123_456_u64, "{key}");
        }
        // Without the comment there is no version key at all.
        let response = fixture.render(&url("base.gts")).await;
        let base =
            response.definitions["https://r.test/realm/base/Base"].as_object().expect("object");
        assert!(!base.contains_key("version"), "{base:?}");
    }

    #[tokio::test]
    async fn jitter_draws_stay_within_the_bound_and_vary() {
        let fixture = Fixture::new();
        let plain = fixture.renderer.clone();
        assert_eq!(plain.render_wait(), Duration::ZERO, "no jitter by default");

        let delay = Duration::from_millis(5);
        let jittered = plain.with_delay(delay).with_jitter(Duration::from_millis(40));
        let waits: Vec<Duration> = (0..200).map(|_| jittered.render_wait()).collect();
        assert!(waits.iter().all(|w| *w >= delay && *w <= delay + Duration::from_millis(40)));
        let distinct: std::collections::BTreeSet<_> = waits.iter().collect();
        assert!(distinct.len() > 10, "draws should vary: {distinct:?}");

        // A jittered render still answers from the file it read.
        fixture.write("j.gts", "// version: 2\nexport class J {}\n");
        let response = jittered.prerender(&request(&url("j.gts"))).await.expect("answer");
        assert_eq!(response.definitions["https://r.test/realm/j/J"]["version"], 2);
    }

    #[test]
    fn segments_decode_to_single_file_names() {
        assert_eq!(decode_segment("a%20b.gts").as_deref(), Some("a b.gts"));
        assert_eq!(decode_segment("caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(decode_segment("50%").as_deref(), Some("50%"));
        assert_eq!(decode_segment("%zz").as_deref(), Some("%zz"));
        assert_eq!(decode_segment("..").as_deref(), None);
        assert_eq!(decode_segment("%2e%2E").as_deref(), None);
        assert_eq!(decode_segment(".").as_deref(), None);
        assert_eq!(decode_segment("a%2Fb").as_deref(), None);
        assert_eq!(decode_segment("a%2F").as_deref(), None);
        assert_eq!(decode_segment("a%5Cb").as_deref(), None);
        assert_eq!(decode_segment("a%00").as_deref(), None);
        assert_eq!(decode_segment("%FF").as_deref(), None);
    }
}
