//! Logs every item that fails for good on the `conveyor` logger of Python's `logging`.
//!
//! A program that sends without keeping receipts would otherwise never hear of a failure: the
//! engine's own `tracing` events reach no Python handler. So, as Celery logs a task's failure
//! and asyncio an exception nobody retrieved, the sink wrapper logs a WARNING (with the
//! exception, so handlers show its traceback; `Conveyor.http`'s failures have none) when an
//! attempt's failure is final: the item is
//! skipped, kept as a dead letter, or pauses its lane. A program without logging configured
//! still sees it, through `logging.lastResort` on stderr; `logging.getLogger("conveyor")
//! .setLevel(logging.ERROR)` silences it.

use conveyor::{Delivery, SinkError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

use crate::errors;
use crate::finalizing;

/// The name of the logger, `logging.getLogger(LOGGER)`.
pub(crate) const LOGGER: &str = "conveyor";

/// What happens to an item after its final failure, fixed by the conveyor's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Then {
    /// `on_failure="skip"` without a journal.
    Skipped,
    /// `on_failure="skip"` with a journal: listed by `dead_letters()`.
    DeadLetter,
    /// `on_failure="pause"`: the lane waits for `resume(key)`.
    Paused,
}

/// What a conveyor's failure records say about it.
#[derive(Debug)]
pub(crate) struct FailureLog {
    /// `conveyor "events"`, or `conveyor` for one without a name.
    label: String,
    then: Then,
}

/// One attempt of one item, as the log record names it; taken from the [`Delivery`] while it
/// is at hand (an `async def` sink's outcome comes back after the delivery is gone).
#[derive(Debug)]
pub(crate) struct Attempt {
    seq: u64,
    key: Option<String>,
    attempt: u32,
    last: bool,
}

impl<T> From<&Delivery<T>> for Attempt {
    fn from(delivery: &Delivery<T>) -> Self {
        Attempt {
            seq: delivery.seq(),
            key: delivery.key().map(str::to_owned),
            attempt: delivery.attempt(),
            last: delivery.is_last_attempt(),
        }
    }
}

impl Attempt {
    /// Whether `error` ends the item's attempts, as the engine will decide with the same facts:
    /// a permanent error, or any error on the last attempt.
    fn is_final(&self, error: &SinkError) -> bool {
        !error.is_retryable() || self.last
    }
}

impl FailureLog {
    pub(crate) fn new(label: String, then: Then) -> Self {
        FailureLog { label, then }
    }

    /// Logs `error` if it ends the item's attempts ([`Attempt::is_final`]). Only failures the
    /// sink's Python code raised are logged; the others (the interpreter exiting, the sink
    /// released) are what the exit and collection warnings report.
    ///
    /// Call it with the GIL already held, and no engine lock: a handler is user code, and may
    /// be slow or ask the conveyor for its stats.
    pub(crate) fn report(&self, py: Python<'_>, attempt: &Attempt, error: &SinkError) {
        if !attempt.is_final(error) {
            return;
        }
        let Some(exception) = errors::python_exception(error) else {
            return;
        };
        self.log_or_say_why_not(py, attempt, error, Some(exception.bind(py)));
    }

    /// [`report`](FailureLog::report) for `Conveyor.http`, whose failures are the HTTP sink's
    /// own errors (a status, a refused connection): it takes the GIL for the record, on the
    /// failure path only, so the send path still runs without it.
    pub(crate) fn report_http(&self, attempt: &Attempt, error: &SinkError) {
        if !attempt.is_final(error) {
            return;
        }
        finalizing::attach(|py| self.log_or_say_why_not(py, attempt, error, None));
    }

    fn log_or_say_why_not(
        &self,
        py: Python<'_>,
        attempt: &Attempt,
        error: &SinkError,
        exception: Option<&Bound<'_, PyAny>>,
    ) {
        if let Err(err) = self.log(py, attempt, error, exception) {
            // A handler or filter that raised: logging's own handlers report theirs, and
            // this is the only place left to say it, since the sink's outcome stands.
            err.write_unraisable(py, None);
        }
    }

    fn log(
        &self,
        py: Python<'_>,
        attempt: &Attempt,
        error: &SinkError,
        exception: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        static LOG: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let logger = LOG.get_or_try_init(py, || -> PyResult<_> {
            Ok(py
                .import("logging")?
                .call_method1("getLogger", (LOGGER,))?
                .unbind())
        })?;
        let key = match &attempt.key {
            Some(key) => format!(" (key {key:?})"),
            None => String::new(),
        };
        let then = match self.then {
            Then::Skipped => "was skipped".to_owned(),
            Then::DeadLetter => "was kept as a dead letter (see dead_letters())".to_owned(),
            Then::Paused => format!(
                "paused its lane until resume({})",
                attempt
                    .key
                    .as_deref()
                    .map(|key| format!("{key:?}"))
                    .unwrap_or_default()
            ),
        };
        // A constant format with arguments, as logging wants: tools that group records by
        // message (Sentry's logging integration) see one kind of failure, not one per item.
        let args = (
            "%s: item %d%s failed after %d attempt(s) and %s: %s",
            &self.label,
            attempt.seq,
            key,
            attempt.attempt,
            then,
            error.get_ref().to_string(),
        );
        let kwargs = PyDict::new(py);
        if let Some(exception) = exception {
            kwargs.set_item("exc_info", exception)?;
        }
        finalizing::call_method_kw(logger.bind(py), "warning", args, Some(&kwargs))?;
        Ok(())
    }
}
