//! Reading metrics back in tests: a recording backend installed once for the whole test
//! binary, and the totals of everything it recorded.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};

/// A metric's identity: kind, name, and labels in order.
type Identity = (MetricKind, String, Vec<(String, String)>);

/// The binary's recorder and the totals read from it so far. A snapshot drains the recorder,
/// so totals are kept here for every test of the binary at once.
struct Recorded {
    snapshotter: Snapshotter,
    totals: Mutex<HashMap<Identity, u64>>,
}

/// Totals of what the binary's recording backend has seen: counters by value, histograms by
/// number of samples. Tests of one binary share the backend: query by labels that are the
/// test's own (a listener's channel), or keep the test alone in its binary.
#[derive(Debug, Clone, Copy)]
pub struct Totals {
    recorded: &'static Recorded,
}

impl std::fmt::Debug for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorded").finish_non_exhaustive()
    }
}

impl Totals {
    /// The binary's recorder, installed on first use.
    pub fn install() -> Totals {
        static RECORDED: OnceLock<Recorded> = OnceLock::new();
        let recorded = RECORDED.get_or_init(|| {
            let recorder = DebuggingRecorder::new();
            let snapshotter = recorder.snapshotter();
            recorder.install().expect("no other metrics recorder in a test binary");
            Recorded { snapshotter, totals: Mutex::new(HashMap::new()) }
        });
        Totals { recorded }
    }

    /// The total of the metric `kind` `name` with exactly `labels` (in any order); 0 when
    /// never recorded.
    pub fn get(&self, kind: MetricKind, name: &str, labels: &[(&str, &str)]) -> u64 {
        let mut totals = self.recorded.totals.lock().unwrap_or_else(|p| p.into_inner());
        for (key, _, _, value) in self.recorded.snapshotter.snapshot().into_vec() {
            let added = match value {
                DebugValue::Counter(n) => n,
                DebugValue::Histogram(samples) => samples.len() as u64,
                DebugValue::Gauge(_) => continue,
            };
            *totals.entry(identity(&key)).or_default() += added;
        }
        let mut labels: Vec<(String, String)> =
            labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        labels.sort_unstable();
        totals.get(&(kind, name.to_owned(), labels)).copied().unwrap_or(0)
    }

    /// The counter `name` with exactly `labels`.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.get(MetricKind::Counter, name, labels)
    }

    /// How many samples the histogram `name` with exactly `labels` holds.
    pub fn samples(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.get(MetricKind::Histogram, name, labels)
    }
}

fn identity(key: &CompositeKey) -> Identity {
    let mut labels: Vec<(String, String)> =
        key.key().labels().map(|l| (l.key().to_owned(), l.value().to_owned())).collect();
    labels.sort_unstable();
    (key.kind(), key.key().name().to_owned(), labels)
}
