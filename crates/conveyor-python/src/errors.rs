//! Python exception classes (defined in `conveyor/_errors.py`) and the conversions between them
//! and the engine's error types.

use std::error::Error;
use std::fmt;
use std::time::Duration;

use conveyor::{DeliveryError, SinkError};
use pyo3::exceptions::{PyRuntimeWarning, PyTimeoutError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyType};

/// Looks a class up in `conveyor._errors` once per interpreter. The classes are Python code so
/// they can carry attributes (`DeliveryFailed.attempts`) and be documented like any other.
macro_rules! error_class {
    ($fn_name:ident, $class:literal) => {
        pub(crate) fn $fn_name(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
            static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
            CLASS.import(py, "conveyor._errors", $class)
        }
    };
}

error_class!(queue_full_class, "QueueFull");
error_class!(closed_class, "Closed");
error_class!(dropped_class, "Dropped");
error_class!(delivery_failed_class, "DeliveryFailed");
error_class!(permanent_class, "PermanentError");
error_class!(retry_after_class, "RetryAfter");
error_class!(conveyor_error_class, "ConveyorError");

fn new_err(class: PyResult<&Bound<'_, PyType>>, message: String) -> PyErr {
    match class {
        Ok(class) => PyErr::from_type(class.clone(), message),
        // Only if the package is broken (conveyor._errors missing): say that instead.
        Err(err) => err,
    }
}

pub(crate) fn queue_full(py: Python<'_>, message: String) -> PyErr {
    new_err(queue_full_class(py), message)
}

pub(crate) fn closed(py: Python<'_>, message: String) -> PyErr {
    new_err(closed_class(py), message)
}

pub(crate) fn timeout(py: Python<'_>, message: String) -> PyErr {
    // `concurrent.futures.TimeoutError` is the built-in `TimeoutError` since Python 3.11; on 3.9
    // and 3.10 it is a separate class, and a Future-like object must raise that one.
    static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    match CLASS.import(py, "concurrent.futures", "TimeoutError") {
        Ok(class) => PyErr::from_type(class.clone(), message),
        Err(_) => PyTimeoutError::new_err(message),
    }
}

/// Emits a `RuntimeWarning` (shown by default, unlike `ResourceWarning`): used to report items
/// left undelivered when nobody is there to read a `CloseReport`.
pub(crate) fn warn(py: Python<'_>, message: &str) -> PyResult<()> {
    let message =
        std::ffi::CString::new(message.replace('\0', " ")).expect("NUL bytes were replaced");
    PyErr::warn(py, &py.get_type::<PyRuntimeWarning>(), &message, 1)
}

/// A Python exception raised by the sink, carried through the engine inside a [`SinkError`] so
/// the receipt can hand the very same exception object back to the caller.
pub(crate) struct PyFailure {
    exception: crate::fork::Held,
    /// `"ValueError: bad payload"`, rendered once with the GIL so `Display` never needs it.
    message: String,
}

impl PyFailure {
    fn new(py: Python<'_>, exception: Py<PyAny>) -> Self {
        let message = describe(exception.bind(py));
        PyFailure {
            exception: crate::fork::Held::new(exception),
            message,
        }
    }
}

impl fmt::Debug for PyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PyFailure")
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for PyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Error for PyFailure {}

/// The Python exception inside a sink error, if the failure came from Python code.
pub(crate) fn python_exception(error: &SinkError) -> Option<&Py<PyAny>> {
    error
        .get_ref()
        .downcast_ref::<PyFailure>()
        .map(|failure| &*failure.exception)
}

/// Turns an exception raised by a Python sink into the engine's error: permanent when it is, or
/// was raised `from`, a `conveyor.PermanentError`; otherwise retryable, with a delay hint when it
/// is a `conveyor.RetryAfter`.
pub(crate) fn sink_error(py: Python<'_>, err: PyErr) -> SinkError {
    let value = err.into_value(py).into_any();
    let bound = value.bind(py);
    let permanent = caused_by(bound, permanent_class(py).ok());
    let retry_after = retry_after(bound, retry_after_class(py).ok());
    let failure = PyFailure::new(py, value);
    let error = if permanent {
        SinkError::permanent(failure)
    } else {
        SinkError::retryable(failure)
    };
    match retry_after {
        Some(delay) => error.with_retry_after(delay),
        None => error,
    }
}

/// Turns an exception the bindings raise about a sink's misuse into a failure that is never
/// retried: the next attempt would fail the same way.
pub(crate) fn permanent_sink_error(py: Python<'_>, err: PyErr) -> SinkError {
    SinkError::permanent(PyFailure::new(py, err.into_value(py).into_any()))
}

/// True if `exc` or any exception in its `__cause__` chain is an instance of `class`.
fn caused_by(exc: &Bound<'_, PyAny>, class: Option<&Bound<'_, PyType>>) -> bool {
    let Some(class) = class else { return false };
    let mut current = Some(exc.clone());
    // Bounded walk: a cause chain can, in principle, loop.
    for _ in 0..64 {
        let Some(exc) = current else { return false };
        if exc.is_instance(class).unwrap_or(false) {
            return true;
        }
        current = exc
            .getattr("__cause__")
            .ok()
            .filter(|cause| !cause.is_none());
    }
    false
}

fn retry_after(exc: &Bound<'_, PyAny>, class: Option<&Bound<'_, PyType>>) -> Option<Duration> {
    let class = class?;
    if !exc.is_instance(class).unwrap_or(false) {
        return None;
    }
    let seconds: f64 = exc.getattr("seconds").ok()?.extract().ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

fn describe(exc: &Bound<'_, PyAny>) -> String {
    let name = exc
        .get_type()
        .qualname()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "Exception".to_owned());
    match exc.str() {
        Ok(text) if !text.to_string_lossy().is_empty() => {
            format!("{name}: {}", text.to_string_lossy())
        }
        _ => name,
    }
}

/// The exception a receipt raises for an item that did not get delivered.
pub(crate) fn delivery_error(py: Python<'_>, seq: u64, error: &DeliveryError) -> PyErr {
    match error {
        DeliveryError::Failed { attempts, error } => {
            let last = python_exception(error).map(|e| e.clone_ref(py));
            let status = error
                .get_ref()
                .downcast_ref::<conveyor::HttpError>()
                .and_then(|e| e.status);
            let message = format!("item {seq} failed after {attempts} attempt(s): {error}");
            delivery_failed(py, message, *attempts, last, seq, status)
        }
        DeliveryError::Dropped => new_err(
            dropped_class(py),
            format!("item {seq} was dropped by the backpressure policy to make room; it was not delivered"),
        ),
        DeliveryError::Closed => new_err(
            closed_class(py),
            format!(
                "item {seq} was still pending when the conveyor shut down; it was not delivered \
                 (give close() or drain_timeout more time to deliver everything)"
            ),
        ),
        DeliveryError::Unconfirmed => new_err(
            closed_class(py),
            format!(
                "item {seq} was still in the sink when the conveyor shut down; the call was left \
                 to finish, so whether it arrived is unknown (stats count it once it ends; give \
                 close() or drain_timeout more time)"
            ),
        ),
        other => new_err(conveyor_error_class(py), format!("item {seq}: {other}")),
    }
}

fn delivery_failed(
    py: Python<'_>,
    message: String,
    attempts: u32,
    last: Option<Py<PyAny>>,
    seq: u64,
    status: Option<u16>,
) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let kwargs = PyDict::new(py);
        kwargs.set_item("attempts", attempts)?;
        kwargs.set_item("last_exception", last)?;
        kwargs.set_item("seq", seq)?;
        kwargs.set_item("status", status)?;
        let exc = delivery_failed_class(py)?.call((message,), Some(&kwargs))?;
        Ok(PyErr::from_value(exc))
    };
    build().unwrap_or_else(|err| err)
}
