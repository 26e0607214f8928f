//! The temporary realm directory the workers serve.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::MODULES;
use super::soak_protocol::module_sources;
use crate::pg::temp_dir;

/// The realm's URL; the workers serve it from the temporary directory.
pub(super) const REALM_URL: &str = "http://soak.test/realm/";

/// The temporary realm directory, removed on drop.
#[derive(Debug)]
pub(super) struct RealmDir {
    dir: tempfile::TempDir,
}

impl RealmDir {
    pub(super) fn create() -> Result<Self> {
        let realm = RealmDir { dir: temp_dir("deflookup-soak")? };
        for (name, source) in module_sources(MODULES) {
            let path = realm.path().join(&name);
            std::fs::write(&path, source)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(realm)
    }

    pub(super) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// While this file exists the workers pause (see `soak_worker.rs`).
    pub(super) fn pause_file(&self) -> PathBuf {
        self.path().join(".soak-pause")
    }

    /// Worker `number` creates this file once it has paused.
    pub(super) fn ack_file(&self, number: u64) -> PathBuf {
        self.path().join(format!(".soak-paused-{number}"))
    }
}
