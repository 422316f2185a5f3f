//! Waiting without the GIL, in slices, so that other threads run while we wait and Ctrl-C
//! interrupts the wait promptly.

use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// How long one slice of a wait lasts before we take the GIL back to check for signals. Python
/// runs signal handlers (and so raises `KeyboardInterrupt`) only when some thread checks; 50 ms
/// keeps Ctrl-C prompt at no measurable cost.
pub(crate) const SLICE: Duration = Duration::from_millis(50);

/// Converts a number of seconds from Python, for an argument that does not take `None`.
///
/// # Errors
/// `ValueError` for a negative or non-finite number, naming the argument.
pub(crate) fn seconds_arg(name: &str, seconds: f64) -> PyResult<Duration> {
    parse_seconds(name, seconds, "")
}

/// Converts an optional number of seconds from Python; `None` stays `None`, which for this
/// argument means what `none_means` says (`"to wait forever"`): the error message offers it.
///
/// # Errors
/// `ValueError` for a negative or non-finite number, naming the argument.
pub(crate) fn optional_seconds_arg(
    name: &str,
    seconds: Option<f64>,
    none_means: &str,
) -> PyResult<Option<Duration>> {
    seconds
        .map(|s| parse_seconds(name, s, &format!(", or None {none_means}")))
        .transpose()
}

/// Converts a timeout in seconds from Python (`None` = wait forever).
///
/// # Errors
/// `ValueError` for a negative or non-finite number, naming the argument.
pub(crate) fn timeout_arg(name: &str, seconds: Option<f64>) -> PyResult<Option<Duration>> {
    optional_seconds_arg(name, seconds, "to wait forever")
}

/// `alternative` completes the error message with what else the argument accepts.
fn parse_seconds(name: &str, seconds: f64, alternative: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(seconds).map_err(|_| {
        PyValueError::new_err(if seconds.is_finite() && seconds > 0.0 {
            // Finite, so "expected a finite number" would be wrong; in full, 1e300 is 301 digits.
            format!(
                "{name}={seconds:e}: too long, expected at most {:e} seconds{alternative}",
                Duration::MAX.as_secs_f64()
            )
        } else {
            format!("{name}={seconds}: expected a finite number of seconds >= 0{alternative}")
        })
    })
}

/// A deadline that may be "never".
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline(Option<Instant>);

impl Deadline {
    /// A timeout too long for the clock to add (`timeout=sys.maxsize`, a common "forever") is
    /// as good as none: adding it would panic.
    pub(crate) fn after(timeout: Option<Duration>) -> Self {
        Deadline(timeout.and_then(|t| Instant::now().checked_add(t)))
    }

    /// The next slice to wait: [`SLICE`], or less when the deadline is closer.
    pub(crate) fn slice(&self) -> Duration {
        match self.0 {
            None => SLICE,
            Some(at) => SLICE.min(at.saturating_duration_since(Instant::now())),
        }
    }

    /// Time left until the deadline; `None` for "never".
    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.0
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    pub(crate) fn passed(&self) -> bool {
        self.0.is_some_and(|at| Instant::now() >= at)
    }
}

/// Calls `step(slice)` with the GIL released until it returns `Some`, or the timeout passes
/// (`Ok(None)`), checking for signals between slices.
///
/// # Errors
/// Whatever a signal handler raises, usually `KeyboardInterrupt`.
pub(crate) fn wait_interruptibly<T, F>(
    py: Python<'_>,
    timeout: Option<Duration>,
    step: F,
) -> PyResult<Option<T>>
where
    T: Send,
    F: FnMut(Duration) -> Option<T> + Send,
{
    wait_unless(py, timeout, None, step)
}

/// [`wait_interruptibly`] that also gives up (`Ok(None)`) once `stop` (a `threading.Event`) is
/// set, looked at between slices: the thread behind a cancelled `aflush` leaves within a slice
/// instead of waiting on for nobody.
///
/// # Errors
/// Whatever a signal handler or `stop.is_set()` raises.
pub(crate) fn wait_unless<T, F>(
    py: Python<'_>,
    timeout: Option<Duration>,
    stop: Option<&Bound<'_, PyAny>>,
    mut step: F,
) -> PyResult<Option<T>>
where
    T: Send,
    F: FnMut(Duration) -> Option<T> + Send,
{
    let deadline = Deadline::after(timeout);
    loop {
        let slice = deadline.slice();
        if let Some(value) = py.detach(|| step(slice)) {
            return Ok(Some(value));
        }
        crate::fork::release_pending(py);
        if deadline.passed() {
            return Ok(None);
        }
        py.check_signals()?;
        if let Some(stop) = stop {
            if stop.call_method0("is_set")?.is_truthy()? {
                return Ok(None);
            }
        }
    }
}
