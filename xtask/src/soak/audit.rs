//! The audit: which rows of `modules` were rendered from an older version of their file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde_json::Value;

use super::database::connect;
use super::realm::REALM_URL;
use super::soak_protocol::source_version;

/// Stale rows listed on stderr.
const SHOWN_STALE: usize = 10;

/// One row of `modules`, as the audit needs it.
#[derive(Debug)]
pub(super) struct Row {
    url: String,
    scope: String,
    user: String,
    created_at: i64,
    definitions: Value,
}

pub(super) async fn read_rows(db_url: &str) -> Result<Vec<Row>> {
    let client = connect(db_url).await?;
    let rows = client
        .query(
            "SELECT url, cache_scope, auth_user_id, coalesce(created_at, 0), \
                    coalesce(definitions, '{}'::jsonb) \
             FROM modules ORDER BY url",
            &[],
        )
        .await
        .context("cannot read the modules table")?;
    Ok(rows
        .iter()
        .map(|row| Row {
            url: row.get(0),
            scope: row.get(1),
            user: row.get(2),
            created_at: row.get(3),
            definitions: row.get(4),
        })
        .collect())
}

/// What an audit says of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Its recorded version is its file's current one.
    Fresh,
    /// Rendered from an older version of its file than the one on disk.
    Stale { recorded: u64, current: u64 },
    /// No recorded version (an error row) or none in the file: not stale.
    Unversioned,
    /// Newer than its file: impossible while versions only grow.
    Newer { recorded: u64, current: u64 },
    /// No module file for its URL.
    Orphan,
}

/// Judges one row against the realm directory as it is now.
fn verdict(row: &Row, realm_dir: &Path) -> Result<Verdict> {
    let Some(recorded) = recorded_version(&row.definitions) else {
        return Ok(Verdict::Unversioned);
    };
    let Some(path) = module_path(&row.url, realm_dir) else { return Ok(Verdict::Orphan) };
    let source = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(match source_version(&source) {
        None => Verdict::Unversioned,
        Some(current) if recorded < current => Verdict::Stale { recorded, current },
        Some(current) if recorded > current => Verdict::Newer { recorded, current },
        Some(_) => Verdict::Fresh,
    })
}

/// A row as written once: a rewrite of the same key is a new row.
type RowId = (String, String, String, i64, Option<u64>);

/// The audits so far.
#[derive(Debug, Default)]
pub(super) struct Auditor {
    audits: u64,
    /// Every distinct row seen.
    seen: BTreeSet<RowId>,
    /// The stale ones, with their verdict.
    stale: BTreeMap<RowId, Verdict>,
    /// Rows newer than their file, or without one: they mean the harness is wrong.
    anomalies: BTreeMap<RowId, Verdict>,
    unversioned: BTreeSet<RowId>,
}

impl Auditor {
    /// Audits `rows` against the files as they are now.
    pub(super) fn add(&mut self, rows: &[Row], realm_dir: &Path) -> Result<()> {
        self.audits += 1;
        for row in rows {
            let id = (
                row.url.clone(),
                row.scope.clone(),
                row.user.clone(),
                row.created_at,
                recorded_version(&row.definitions),
            );
            let verdict = verdict(row, realm_dir)?;
            match verdict {
                Verdict::Fresh => {}
                Verdict::Stale { .. } => {
                    self.stale.insert(id.clone(), verdict);
                }
                Verdict::Unversioned => {
                    self.unversioned.insert(id.clone());
                }
                Verdict::Newer { .. } | Verdict::Orphan => {
                    self.anomalies.insert(id.clone(), verdict);
                }
            }
            self.seen.insert(id);
        }
        Ok(())
    }

    /// The distinct rows seen by all audits: the R of the last line.
    pub(super) fn rows_seen(&self) -> usize {
        self.seen.len()
    }

    /// How many of them were stale: the S of the last line.
    pub(super) fn stale_rows(&self) -> usize {
        self.stale.len()
    }

    pub(super) fn describe(&self) -> String {
        format!("audits: {}, stale rows: {} of {}", self.audits, self.stale.len(), self.seen.len())
    }

    pub(super) fn report(&self) {
        eprintln!("xtask: {}", self.describe());
        for ((url, ..), verdict) in self.stale.iter().take(SHOWN_STALE) {
            if let Verdict::Stale { recorded, current } = verdict {
                eprintln!(
                    "xtask: stale row: {url} recorded version {recorded}, its file had {current}"
                );
            }
        }
        if self.stale.len() > SHOWN_STALE {
            eprintln!("xtask: … and {} more stale rows", self.stale.len() - SHOWN_STALE);
        }
        for ((url, ..), verdict) in &self.anomalies {
            eprintln!("xtask: warning: the audit cannot be trusted: {url}: {verdict:?}");
        }
        if !self.unversioned.is_empty() {
            eprintln!("xtask: {} rows recorded no version (not stale)", self.unversioned.len());
        }
    }
}

/// The version a row was rendered from: the `version` of its definitions (the lowest, should
/// they disagree), or `None` when no definition carries one (an error row, say).
fn recorded_version(definitions: &Value) -> Option<u64> {
    definitions.as_object()?.values().filter_map(|d| d.get("version")?.as_u64()).min()
}

/// The file of a row's URL: the URL's path under the realm, or that path plus `.gts` when the
/// row is for an extensionless URL. `None` for URLs outside the realm or without a file.
fn module_path(url: &str, realm_dir: &Path) -> Option<PathBuf> {
    let relative = url.strip_prefix(REALM_URL)?;
    if relative.is_empty() || relative.contains(['/', '\\']) || relative.starts_with('.') {
        return None;
    }
    [realm_dir.join(relative), realm_dir.join(format!("{relative}.gts"))]
        .into_iter()
        .find(|path| path.is_file())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_rows_version_is_its_definitions_version() {
        let definitions = json!({
            "http://soak.test/realm/m1/M1": {"type": "definition", "name": "M1", "version": 17},
            "http://soak.test/realm/m1/Other": {"type": "definition", "version": 12},
            "http://soak.test/realm/m1/Plain": {"type": "definition"},
        });
        assert_eq!(recorded_version(&definitions), Some(12), "the lowest when they disagree");
        assert_eq!(recorded_version(&json!({})), None, "no definitions: an error row");
        let unversioned = json!({"k": {"type": "definition", "version": "3"}});
        assert_eq!(recorded_version(&unversioned), None, "only numbers count");
        assert_eq!(recorded_version(&json!({"k": {"type": "error", "error": {}}})), None);
        assert_eq!(recorded_version(&Value::Null), None);
    }

    #[test]
    fn stale_means_older_than_the_file_and_rows_count_once() {
        let temp = tempfile::tempdir().expect("dir");
        let dir = temp.path();
        for i in 0..3 {
            let source = format!("// version: 5\nexport class M{i} {{}}\n");
            std::fs::write(dir.join(format!("m{i}.gts")), source).expect("write");
        }
        let row = |url: &str, created_at: i64, version: Option<u64>| Row {
            url: format!("{REALM_URL}{url}"),
            scope: "public".to_owned(),
            user: String::new(),
            created_at,
            definitions: match version {
                Some(v) => json!({ "k": {"type": "definition", "version": v} }),
                None => json!({}),
            },
        };
        let first = [
            row("m0.gts", 1, Some(4)),
            row("m1", 1, Some(5)),
            row("m2.gts", 1, None),
            row("m2.gts", 2, Some(6)),
            row("m9.gts", 1, Some(1)),
        ];
        let mut auditor = Auditor::default();
        auditor.add(&first, dir).expect("audit");
        assert_eq!(verdict(&first[0], dir).unwrap(), Verdict::Stale { recorded: 4, current: 5 });
        assert_eq!(verdict(&first[1], dir).unwrap(), Verdict::Fresh);
        assert_eq!(verdict(&first[2], dir).unwrap(), Verdict::Unversioned);
        assert_eq!(verdict(&first[3], dir).unwrap(), Verdict::Newer { recorded: 6, current: 5 });
        assert_eq!(verdict(&first[4], dir).unwrap(), Verdict::Orphan);
        assert_eq!((auditor.stale.len(), auditor.seen.len()), (1, 5));

        // A later audit: the same stale row again counts once; its rewrite is a new row.
        auditor.add(&[row("m0.gts", 1, Some(4)), row("m0.gts", 3, Some(5))], dir).unwrap();
        assert_eq!((auditor.audits, auditor.stale.len(), auditor.seen.len()), (2, 1, 6));
        assert_eq!(auditor.anomalies.len(), 2);
        assert_eq!(auditor.unversioned.len(), 1);
    }
}
