//! The durable journal from Python: items kept as JSON text, dead letters, journal errors.

use std::time::{Duration, UNIX_EPOCH};

use conveyor::{BuildError, DeadLetter, Durability, JournalError};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyInt, PyString, PyType};
use pyo3::IntoPyObjectExt;
use serde_json::value::RawValue;

use crate::sink::{Item, Reply};

fn journal_error_class(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    CLASS.import(py, "conveyor._errors", "JournalError")
}

/// `conveyor.JournalError` with the engine's message (which names the file and what to do),
/// in Python's terms where the engine's names its Rust API.
pub(crate) fn error(py: Python<'_>, err: &JournalError) -> PyErr {
    let message = match err {
        JournalError::NoJournal => NO_JOURNAL.to_owned(),
        JournalError::Closed { path } => format!(
            "the conveyor using journal {} was closed and released the file: create a new \
             Conveyor(..., journal=PATH) to resume it, or open conveyor.Journal(PATH) to read it",
            path.display()
        ),
        JournalError::OtherOrdering {
            path,
            written,
            opened,
            pending,
            paused,
        } => format!(
            "journal {} was written with ordering=\"{written}\" and still holds {pending} pending \
             item(s) and {paused} paused lane(s), which ordering=\"{opened}\" would put in the \
             wrong lanes (\"keyed\" keeps a lane per key, \"strict\" and \"pipelined\" one lane \
             for all); it was left untouched: open it with ordering=\"{written}\" to deliver them \
             (resume() its paused lanes), or use another journal= file. Once it holds nothing \
             pending or paused, any ordering may use it",
            path.display()
        ),
        // The engine would say to stop the process holding it: here, that is this one.
        JournalError::Locked {
            path,
            pid: Some(pid),
        } if *pid == std::process::id() => format!(
            "journal {} is in use by this process, by a conveyor.Journal(PATH) opened without \
             read_only=True or by another Conveyor on it: close() that one first, or give this \
             one another journal= file",
            path.display()
        ),
        other => other.to_string(),
    };
    new_error(py, message)
}

/// `conveyor.JournalError(message)`.
pub(crate) fn new_error(py: Python<'_>, message: String) -> PyErr {
    match journal_error_class(py) {
        Ok(class) => PyErr::from_type(class.clone(), message),
        Err(import_failed) => import_failed,
    }
}

const NO_JOURNAL: &str = "this conveyor has no journal: create it with journal=\"PATH\" to keep \
                          dead letters and a cursor";

/// The Python exception for a conveyor that could not be built.
pub(crate) fn build_error(py: Python<'_>, err: BuildError) -> PyErr {
    match err {
        BuildError::Journal(err) => error(py, &err),
        BuildError::InvalidConfig(_) => PyValueError::new_err(err.to_string()),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

/// The error for a send the journal refused (it cannot be written, e.g. the disk is full).
pub(crate) fn refused(py: Python<'_>, engine: &conveyor::Conveyor<Item, Reply>) -> PyErr {
    let why = engine
        .journal_error()
        .map(|err| err.to_string())
        .unwrap_or_else(|| "the journal cannot be written".to_owned());
    let message = format!(
        "the item was not accepted: {why}; items accepted before are intact, and sends succeed \
         again once the journal can be written"
    );
    new_error(py, message)
}

/// The error for an item too large for the journal: it was not accepted.
pub(crate) fn too_large(size: usize, limit: usize) -> PyErr {
    PyValueError::new_err(format!(
        "the item takes {size} bytes in the journal (as JSON, with its key), more than the \
         {limit} bytes an entry may take, so it was not accepted: split it into smaller items, \
         or send it through a conveyor without journal="
    ))
}

/// `cursor=`: an input position, an int from 0 to 2**64 - 1.
pub(crate) fn cursor_arg(value: &Bound<'_, PyAny>) -> PyResult<u64> {
    if !value.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "cursor= must be an int, an input position such as a line number or an offset; got {}",
            value.get_type().name()?
        )));
    }
    value.extract::<u64>().map_err(|_| {
        PyValueError::new_err(format!(
            "cursor={value}: an input position must be from 0 to 2**64 - 1"
        ))
    })
}

/// `durability=`: a commit window in seconds (group commit), or `"sync"` (each send waits
/// for its own commit). Returns the engine's durability and whether sends wait.
///
/// `"sync"` runs the engine with a zero window (every commit starts at once, shared by the
/// sends that arrive meanwhile) and leaves the wait to the send, which makes it in slices
/// without the GIL: the engine's own `Durability::Sync` wait has no bound, and while the
/// disk is full it would hold the GIL and ignore Ctrl-C.
pub(crate) fn parse_durability(value: &Bound<'_, PyAny>) -> PyResult<(Durability, bool)> {
    // A bool is an int to Python, but `durability=True` surely meant "make it durable", not a
    // one-second window.
    if value.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(format!(
            "durability={}: expected a commit window in seconds (e.g. 0.005) or \"sync\", not a \
             bool; a journal is durable either way",
            value.repr()?
        )));
    }
    let text = value.extract::<String>().ok();
    // Text shown as every option shows it (`ordering="keyed"`), not as Python's repr would.
    let shown = match &text {
        Some(text) => format!("{text:?}"),
        None => value.repr()?.to_string(),
    };
    let message =
        format!("durability={shown}: expected a commit window in seconds (e.g. 0.005) or \"sync\"");
    if let Some(text) = text {
        if text == "sync" {
            return Ok((Durability::Batched(Duration::ZERO), true));
        }
    } else if let Ok(seconds) = value.extract::<f64>() {
        if let Ok(window) = Duration::try_from_secs_f64(seconds) {
            return Ok((Durability::Batched(window), false));
        }
    } else {
        // Neither text nor a number: the wrong kind of value, as for any other option.
        return Err(PyTypeError::new_err(message));
    }
    Err(PyValueError::new_err(message))
}

/// `json.dumps(object)` as the journal's item.
///
/// # Errors
/// `ValueError` naming the type when the object is not JSON-serialisable.
pub(crate) fn dumps(object: &Bound<'_, PyAny>) -> PyResult<Box<RawValue>> {
    static DUMPS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let py = object.py();
    let not_json = |why: String| {
        PyValueError::new_err(format!(
            "a journaled conveyor stores items as JSON, and this {} cannot be: {why}",
            object
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    };
    let text = DUMPS
        .import(py, "json", "dumps")?
        .call1((object,))
        .map_err(|err| not_json(err.to_string()))?;
    let text = text.cast_into::<PyString>()?.to_string();
    // json.dumps writes NaN and Infinity, which JSON (and so the journal) does not allow. The
    // parser's own words ("expected value at line 1 column 9") say neither what nor why.
    RawValue::from_string(text).map_err(|err| {
        not_json(format!(
            "json.dumps wrote something JSON does not allow ({err}), such as NaN or Infinity \
             for a float: send None or a string in its place"
        ))
    })
}

/// `json.loads(text)`: a journaled item as the sink receives it.
pub(crate) fn loads(py: Python<'_>, text: &str) -> PyResult<Py<PyAny>> {
    static LOADS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    Ok(LOADS.import(py, "json", "loads")?.call1((text,))?.unbind())
}

/// An item that failed for good, kept by the journal (`Conveyor.dead_letters()`).
#[pyclass(frozen, get_all, module = "conveyor", name = "DeadLetter")]
pub(crate) struct PyDeadLetter {
    /// The item's seq when it was accepted: pass it to `retry_dead` or `discard_dead`.
    seq: u64,
    /// Its lane (`""` outside keyed mode).
    lane: String,
    /// The key it was sent with, if any.
    key: Option<String>,
    /// The item, as the sink would receive it (`json.loads` of what was stored).
    item: Py<PyAny>,
    /// The sink's last error, as text.
    error: String,
    /// How many attempts were made.
    attempts: u32,
    /// When it failed, in seconds since the epoch (as `time.time()`).
    failed_at: f64,
}

impl PyDeadLetter {
    pub(crate) fn new(py: Python<'_>, letter: DeadLetter) -> PyResult<Self> {
        let item = match std::str::from_utf8(&letter.payload) {
            Ok(text) => loads(py, text)?,
            // Not ours to interpret: hand over the stored bytes.
            Err(_) => pyo3::types::PyBytes::new(py, &letter.payload)
                .into_any()
                .unbind(),
        };
        Ok(PyDeadLetter {
            seq: letter.seq,
            lane: letter.lane,
            key: letter.key,
            item,
            error: letter.error,
            attempts: letter.attempts,
            failed_at: letter
                .failed_at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        })
    }
}

#[pymethods]
impl PyDeadLetter {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "DeadLetter(seq={}, key={}, item={}, attempts={}, error={})",
            self.seq,
            repr(py, &self.key),
            repr(py, &self.item),
            self.attempts,
            repr(py, &self.error)
        )
    }
}

/// Python's `repr()` of a value, for `__repr__`s that read like Python.
pub(crate) fn repr<'py>(py: Python<'py>, value: impl IntoPyObject<'py>) -> String {
    value
        .into_bound_py_any(py)
        .and_then(|value| value.repr())
        .map(|text| text.to_string())
        .unwrap_or_default()
}
