//! The shared behaviour suite (SPEC §10 lookup cases) on SQLite: one in-memory database per
//! case, plus a few cases on a real file.

use adapter_sqlite::SqliteAdapter;

behaviour_suite::behaviour_suite!(|| async {
    SqliteAdapter::open_in_memory().expect("in-memory SQLite opens")
});

/// The same suite on real files, so WAL mode and the blocking pool are exercised too.
mod on_file {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::SqliteAdapter;

    static NEXT: AtomicUsize = AtomicUsize::new(0);

    /// A fresh database file under cargo's per-target scratch directory (reused, not leaked,
    /// across runs: a stale file from an earlier run is removed first).
    fn fresh_file() -> SqliteAdapter {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("adapter-sqlite-suite");
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let path = dir.join(format!("case-{}.sqlite3", NEXT.fetch_add(1, Ordering::Relaxed)));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        SqliteAdapter::open(&path).expect("file SQLite opens")
    }

    behaviour_suite::behaviour_suite!(|| async { fresh_file() });
}
