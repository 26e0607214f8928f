//! The shared behaviour suite (BEHAVIOUR §10 lookup cases) on SQLite: one in-memory database per
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

/// The lookup side of cross-process populate coalescing, with a coordinator whose lock is
/// always held by "another process" (the backend does not matter here: SQLite stands in).
mod coordinated {
    use std::sync::Arc;
    use std::time::Duration;

    use behaviour_suite::{FakeRenderer, bounded};
    use lookup_core::{
        CachingLookup, LoadStamp, LookupConfig, LookupError, NoLease, NoRemoteRealms,
        PopulateCoordinator, PopulateKey, PopulateSettings, PopulateSignals, PopulateSink as _,
        Realm, RowStore as _,
    };

    use super::SqliteAdapter;

    const REALM: &str = "https://realm.test/app/";

    /// The other process finishes exactly between this one's failed try and its wait: its
    /// row lands and its announcement arrives while `try_acquire` is returning "lost".
    struct RacingPeer {
        db: SqliteAdapter,
        signals: Arc<PopulateSignals>,
    }

    impl PopulateCoordinator for RacingPeer {
        type Lease = NoLease;

        fn signals(&self) -> &Arc<PopulateSignals> {
            &self.signals
        }

        fn settings(&self) -> PopulateSettings {
            // Far beyond the test's bound: only a kept wake-up lets the lookup finish.
            PopulateSettings {
                wait_timeout: Duration::from_secs(600),
                probe_interval: Duration::from_secs(600),
                ..PopulateSettings::default()
            }
        }

        async fn try_acquire(&self, key: &PopulateKey) -> Result<Option<NoLease>, LookupError> {
            let row = behaviour_suite::cases::sample_entry(REALM, &format!("{REALM}card.gts"));
            self.db.upsert(&row, LoadStamp::UNGUARDED).await?;
            self.signals.key_populated(key.hash());
            Ok(None)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lookup_registers_its_wait_before_it_tries_the_lock() {
        let db = SqliteAdapter::open_in_memory().expect("SQLite");
        let signals = Arc::new(PopulateSignals::new());
        let peer = RacingPeer { db: db.clone(), signals: Arc::clone(&signals) };
        let renderer = FakeRenderer::default();
        let lookup = CachingLookup::with_coordinator(
            db,
            renderer.clone(),
            NoRemoteRealms,
            LookupConfig::default(),
            Some(peer),
        );
        lookup
            .register_realm(Realm { url: REALM.into(), owner: "@o:test".into(), public: true })
            .expect("realm");
        let entry = bounded(
            "the lookup (a lost wake-up would wait 600 s)",
            lookup.get_module_entry(&format!("{REALM}card.gts"), None),
        )
        .await
        .expect("the peer's row");
        assert_eq!(entry.url, format!("{REALM}card.gts"));
        assert_eq!(renderer.total_calls(), 0, "this process never rendered");
        assert_eq!(signals.stats().waits_signalled, 1);
        assert_eq!(signals.waiting(), 0);
    }
}
