//! Plain data types shared by the lookup, the adapters and the prerenderers.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Who a cached row is for (BEHAVIOUR §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CacheScope {
    /// One row shared by everyone; its `auth_user_id` is `''`.
    #[serde(rename = "public")]
    Public,
    /// One row per user; its `auth_user_id` is that user.
    #[serde(rename = "realm-auth")]
    RealmAuth,
}

impl CacheScope {
    /// The value stored in the `cache_scope` column.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheScope::Public => "public",
            CacheScope::RealmAuth => "realm-auth",
        }
    }

    /// Parses a `cache_scope` column value.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "public" => Some(CacheScope::Public),
            "realm-auth" => Some(CacheScope::RealmAuth),
            _ => None,
        }
    }
}

impl std::fmt::Display for CacheScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reference to one export of a module.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CodeRef {
    /// The module URL (any form: it is canonicalised before use).
    pub module: String,
    /// The exported name.
    pub name: String,
}

impl CodeRef {
    /// A code ref for `name` exported by `module`.
    pub fn new(module: impl Into<String>, name: impl Into<String>) -> Self {
        CodeRef { module: module.into(), name: name.into() }
    }

    /// The key of this export in a row's `definitions`: `"<alias of canonical module>/<name>"`.
    pub fn definition_key(&self) -> String {
        let module = crate::urls::file_alias(&crate::urls::canonical_url(&self.module));
        format!("{module}/{}", self.name)
    }
}

/// A realm known to this process: the modules under `url` are rendered as `owner`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Realm {
    /// The realm URL; it ends with `/`.
    pub url: String,
    /// The user id modules of this realm are prerendered as.
    pub owner: String,
    /// Whether anyone may read the realm (public scope) or only its users (realm-auth scope).
    pub public: bool,
}

/// The rows a lookup may read and write: one realm, one scope, one cache user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntryScope {
    /// `resolved_realm_url` of the rows.
    pub realm_url: String,
    /// `cache_scope` of the rows.
    pub scope: CacheScope,
    /// `auth_user_id` of the rows (`''` for public rows).
    pub user: String,
}

/// Reads `null` (or a missing field) as the type's default: the reference system writes
/// `null` where there is nothing (`"additionalErrors": null`), and a row it wrote must read.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A status as a number, a numeric string, or (anything else, `null` included) 500.
fn lenient_status<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u16, D::Error> {
    let value = Value::deserialize(deserializer)?;
    let status = match &value {
        Value::Number(number) => number.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    };
    Ok(status.unwrap_or(500))
}

fn default_status() -> u16 {
    500
}

fn default_error_kind() -> String {
    "module-error".to_owned()
}

/// The strings of a JSON list, skipping anything else (`null`, a number): lenient on
/// rows another writer stored.
fn string_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    let value = Option::<Value>::deserialize(deserializer)?;
    Ok(match value {
        Some(Value::Array(items)) => {
            items.into_iter().filter_map(|item| item.as_str().map(str::to_owned)).collect()
        }
        _ => Vec::new(),
    })
}

/// The error document of a module that failed to prerender (`error_doc`). Reading is lenient
/// with rows other writers stored: `null` lists read as empty, a missing or odd `status` as
/// 500, unknown fields are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDoc {
    /// Always `"module-error"` for module errors.
    #[serde(rename = "type", default = "default_error_kind", deserialize_with = "null_as_default")]
    pub kind: String,
    /// What went wrong.
    pub error: ErrorDetail,
}

impl ErrorDoc {
    /// A module error with a message, an HTTP-like status and the dependencies involved.
    pub fn module_error(message: impl Into<String>, status: u16, deps: Vec<String>) -> Self {
        ErrorDoc {
            kind: "module-error".to_owned(),
            error: ErrorDetail {
                id: None,
                message: message.into(),
                status,
                deps,
                additional_errors: Vec::new(),
                extra: Map::new(),
            },
        }
    }
}

/// The body of an [`ErrorDoc`]. Unknown fields (`stack`, `title`, …) are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// The failing module, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A human-readable message.
    #[serde(default, deserialize_with = "null_as_default")]
    pub message: String,
    /// An HTTP-like status; 404 means something was missing.
    #[serde(default = "default_status", deserialize_with = "lenient_status")]
    pub status: u16,
    /// Dependency URLs involved in the failure.
    #[serde(default, deserialize_with = "string_list")]
    pub deps: Vec<String>,
    /// Errors of dependency rows, appended when the error is persisted.
    #[serde(
        default,
        rename = "additionalErrors",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub additional_errors: Vec<ErrorDetail>,
    /// Fields this crate does not interpret, kept as they came.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Outcome reported by a prerender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrerenderStatus {
    /// The module rendered; `definitions` holds its exports.
    Ready,
    /// The module failed; `error` says why.
    Error,
}

/// What a [`Prerenderer`](crate::Prerenderer) is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrerenderRequest {
    /// The candidate module URL to render (it keeps its extension).
    pub module_url: String,
    /// The realm the module belongs to.
    pub realm_url: String,
    /// The user to render as.
    pub user: String,
}

/// What a [`Prerenderer`](crate::Prerenderer) answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrerenderResponse {
    /// Ready or error.
    pub status: PrerenderStatus,
    /// Definition key → `{"type":"definition",…}` or an error entry.
    #[serde(default)]
    pub definitions: Map<String, Value>,
    /// Dependencies as the module wrote them (they are normalised before storage).
    #[serde(default)]
    pub deps: Vec<String>,
    /// The module error when `status` is `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDoc>,
    /// Optional diagnostics, stored in the `diagnostics` column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Value>,
}

impl PrerenderResponse {
    /// A ready response.
    pub fn ready(definitions: Map<String, Value>, deps: Vec<String>) -> Self {
        PrerenderResponse {
            status: PrerenderStatus::Ready,
            definitions,
            deps,
            error: None,
            meta: None,
        }
    }

    /// An error response.
    pub fn error(error: ErrorDoc, deps: Vec<String>) -> Self {
        PrerenderResponse {
            status: PrerenderStatus::Error,
            definitions: Map::new(),
            deps,
            error: Some(error),
            meta: None,
        }
    }

    /// The "this module does not exist" answer: a 404 module error with no dependencies.
    pub fn missing(module_url: &str) -> Self {
        Self::error(
            ErrorDoc::module_error(format!("{module_url} not found"), 404, Vec::new()),
            Vec::new(),
        )
    }
}

/// One row of the `modules` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// The candidate URL that was prerendered (keeps its extension).
    pub url: String,
    /// `url` without its executable extension.
    pub file_alias: String,
    /// Public or realm-auth.
    pub cache_scope: CacheScope,
    /// `''` for public rows, else the user the row belongs to.
    pub auth_user_id: String,
    /// The realm the module belongs to.
    pub resolved_realm_url: String,
    /// Definition key → definition or error entry; empty when the module exports nothing.
    pub definitions: Map<String, Value>,
    /// Normalised dependency URLs.
    pub deps: Vec<String>,
    /// The module error, if it errored.
    pub error: Option<ErrorDoc>,
    /// Epoch milliseconds of the write; rows without it are treated as old.
    pub created_at: Option<i64>,
    /// Optional prerender diagnostics.
    pub diagnostics: Option<Value>,
}

impl CacheEntry {
    /// The scope this row belongs to.
    pub fn entry_scope(&self) -> EntryScope {
        EntryScope {
            realm_url: self.resolved_realm_url.clone(),
            scope: self.cache_scope,
            user: self.auth_user_id.clone(),
        }
    }
}

/// A row that depends on something being invalidated: what the consumer closure returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRow {
    /// The consumer's `url`.
    pub url: String,
    /// The consumer's `file_alias`.
    pub file_alias: String,
    /// The consumer's `deps`.
    pub deps: Vec<String>,
}

/// What a remote realm probe learned about a module (BEHAVIOUR §3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// Whether the remote realm is publicly readable.
    pub is_public: bool,
    /// The remote realm URL that owns the module.
    pub resolved_realm_url: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_rows_written_by_the_reference_system_read() {
        let stored = serde_json::json!({
            "type": "module-error",
            "error": {
                "message": "Cannot find module",
                "status": 404,
                "deps": ["https://r.test/a", null, 3],
                "additionalErrors": null,
                "stack": "at x",
                "title": null
            }
        });
        let doc: ErrorDoc = serde_json::from_value(stored).expect("reads");
        assert_eq!(doc.kind, "module-error");
        assert_eq!(doc.error.message, "Cannot find module");
        assert_eq!(doc.error.status, 404);
        assert_eq!(doc.error.deps, ["https://r.test/a"]);
        assert!(doc.error.additional_errors.is_empty());
        assert_eq!(doc.error.extra.get("stack"), Some(&Value::from("at x")));
        // Odd or missing values read as defaults rather than failing the row.
        let odd = serde_json::json!({"error": {"message": null, "status": "503", "deps": null}});
        let doc: ErrorDoc = serde_json::from_value(odd).expect("reads");
        assert_eq!(
            (doc.kind.as_str(), doc.error.message.as_str(), doc.error.status),
            ("module-error", "", 503)
        );
        let bare = serde_json::json!({"type": "module-error", "error": {"message": "m"}});
        assert_eq!(serde_json::from_value::<ErrorDoc>(bare).expect("reads").error.status, 500);
        // What deflookup writes reads back unchanged.
        let ours = ErrorDoc::module_error("m", 404, vec!["https://r.test/x".into()]);
        let again: ErrorDoc = serde_json::from_value(serde_json::to_value(&ours).unwrap()).unwrap();
        assert_eq!(again, ours);
    }
}
