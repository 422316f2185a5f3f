//! `conveyor.Stats` and `conveyor.CloseReport`: read-only snapshots.

use pyo3::prelude::*;

/// Counters of a conveyor at one moment (`Conveyor.stats`).
///
/// `accepted` items end up `delivered`, `failed` or `dropped`, or are still `queued` or
/// `in_flight`. `retried` counts retry attempts; `paused` counts paused lanes (keys).
#[pyclass(frozen, get_all, eq, module = "conveyor", name = "Stats")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PyStats {
    accepted: u64,
    delivered: u64,
    failed: u64,
    retried: u64,
    dropped: u64,
    queued: u64,
    in_flight: u64,
    paused: u64,
}

impl From<conveyor::Stats> for PyStats {
    fn from(s: conveyor::Stats) -> Self {
        PyStats {
            accepted: s.accepted,
            delivered: s.delivered,
            failed: s.failed,
            retried: s.retried,
            dropped: s.dropped,
            queued: s.queued,
            in_flight: s.in_flight,
            paused: s.paused,
        }
    }
}

#[pymethods]
impl PyStats {
    /// The counters as a plain dict, for logging or JSON.
    fn as_dict(&self) -> std::collections::BTreeMap<&'static str, u64> {
        [
            ("accepted", self.accepted),
            ("delivered", self.delivered),
            ("failed", self.failed),
            ("retried", self.retried),
            ("dropped", self.dropped),
            ("queued", self.queued),
            ("in_flight", self.in_flight),
            ("paused", self.paused),
        ]
        .into_iter()
        .collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "Stats(accepted={}, delivered={}, failed={}, retried={}, dropped={}, queued={}, in_flight={}, paused={})",
            self.accepted, self.delivered, self.failed, self.retried, self.dropped, self.queued, self.in_flight, self.paused
        )
    }
}

/// What `Conveyor.close` left behind: `left` items were not settled before the deadline
/// (`drained` is `left == 0`); `stats` are the final counters.
#[pyclass(frozen, get_all, module = "conveyor", name = "CloseReport")]
#[derive(Clone, Debug)]
pub(crate) struct PyCloseReport {
    left: u64,
    drained: bool,
    stats: PyStats,
}

impl From<conveyor::CloseReport> for PyCloseReport {
    fn from(r: conveyor::CloseReport) -> Self {
        PyCloseReport {
            left: r.left,
            drained: r.drained,
            stats: r.stats.into(),
        }
    }
}

impl PyCloseReport {
    pub(crate) fn left(&self) -> u64 {
        self.left
    }
}

#[pymethods]
impl PyCloseReport {
    fn __repr__(&self) -> String {
        format!(
            "CloseReport(left={}, drained={}, stats={})",
            self.left,
            if self.drained { "True" } else { "False" },
            self.stats.__repr__()
        )
    }
}
