//! `conveyor.Journal`: a journal file opened without a Conveyor, to inspect and repair what it
//! holds without delivering anything.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, TryLockError};

use conveyor::{Journal, JournalError, JournalStatus, LaneStatus};
use pyo3::prelude::*;

use crate::args;
use crate::journal::{cursor_arg, new_error, repr, PyDeadLetter};
use crate::pyconveyor::{fork_gen, same_process};

/// `Journal(path, *, read_only=False)`: a Conveyor's journal file (its `journal=` path), opened
/// to look at what it holds (pending items, paused lanes, dead letters, the input cursor) and to
/// repair it, without a Conveyor delivering from it.
///
/// With `read_only=False` it takes the journal for itself, as a Conveyor would: it is refused
/// while a Conveyor (in this process or another) uses the file, and no Conveyor can open the
/// file until `close()`. With `read_only=True` it takes nothing and works while a Conveyor runs
/// on the file, showing what that Conveyor has committed so far; the methods that change the
/// journal then raise `JournalError`.
///
/// It never creates a journal: a path with no journal raises `JournalError` and leaves nothing
/// behind (`Conveyor(..., journal=PATH)` creates one). Use it in a `with` block or call
/// `close()`; after that every method raises `JournalError`. Inherited through `os.fork()`, it
/// stays the parent's: in the child every method raises `JournalError` and `close()` does
/// nothing; open it again there. The child does not keep the file from the parent, which may
/// close it and open it again while the child runs.
#[pyclass(frozen, module = "conveyor", name = "Journal")]
pub(crate) struct PyJournal {
    /// The open journal; `None` once closed. A mutex because Python threads share this object
    /// and a SQLite connection serves one at a time. It is taken only without the GIL, so a
    /// thread waiting for it never holds the GIL that the other threads need.
    journal: Mutex<Option<Journal>>,
    /// As given, kept for messages after `close()`.
    path: PathBuf,
    /// The journal's id, fixed at its creation.
    id: String,
    read_only: bool,
    /// The fork generation it was opened in (see `pyconveyor::same_process`). A child of that
    /// process must not touch the journal: SQLite forbids using a connection in a child of the
    /// process that opened it (two processes on one connection can corrupt the file), and the
    /// mutex may have been copied locked by a parent thread inside a call, which no thread of
    /// the child would ever unlock.
    fork_gen: u64,
}

impl PyJournal {
    /// Runs `op` on the open journal without the GIL: each call reads or writes the disk.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        op: impl FnOnce(&mut Journal) -> Result<T, JournalError> + Send,
    ) -> PyResult<T> {
        self.refuse_if_inherited(py)?;
        let done = py.detach(|| {
            let mut journal = self.journal.lock().unwrap_or_else(PoisonError::into_inner);
            journal.as_mut().map(op)
        });
        match done {
            Some(Ok(value)) => Ok(value),
            Some(Err(err)) => Err(error(py, &err)),
            None => Err(new_error(
                py,
                format!(
                    "this conveyor.Journal on {} was closed: open it again with \
                     conveyor.Journal(PATH)",
                    self.path.display()
                ),
            )),
        }
    }

    /// Refuses a journal inherited through `os.fork()` (see `fork_gen`), before its mutex is
    /// taken.
    fn refuse_if_inherited(&self, py: Python<'_>) -> PyResult<()> {
        if same_process(self.fork_gen) {
            return Ok(());
        }
        Err(new_error(
            py,
            format!(
                "this conveyor.Journal on {} was opened before os.fork(), in the parent process, \
                 whose SQLite connection the child must not use: open it again in this process \
                 with conveyor.Journal(PATH)",
                self.path.display()
            ),
        ))
    }

    fn is_closed(&self) -> bool {
        match self.journal.try_lock() {
            Ok(journal) => journal.is_none(),
            // Another thread is reading or writing it, so it is open.
            Err(TryLockError::WouldBlock) => false,
            Err(TryLockError::Poisoned(journal)) => journal.into_inner().is_none(),
        }
    }
}

#[pymethods]
impl PyJournal {
    /// Opens the journal (see the class's doc).
    #[new]
    #[pyo3(signature = (path, *, read_only = false))]
    fn new(py: Python<'_>, path: PathBuf, read_only: bool) -> PyResult<Self> {
        let journal = py
            .detach(|| open(&path, read_only))
            .map_err(|err| error(py, &err))?;
        Ok(PyJournal {
            id: journal.id().to_owned(),
            journal: Mutex::new(Some(journal)),
            path,
            read_only,
            fork_gen: fork_gen(),
        })
    }

    /// The journal file's path, as given.
    #[getter]
    fn path(&self) -> &OsStr {
        // A `str`, as the stubs say: PyO3 makes a `pathlib.Path` of a `Path`.
        self.path.as_os_str()
    }

    /// The journal's id: the prefix of every item's `idempotency_key` (`"{id}-{seq}"`).
    #[getter]
    fn id(&self) -> &str {
        &self.id
    }

    /// Whether it was opened with `read_only=True`.
    #[getter]
    fn read_only(&self) -> bool {
        self.read_only
    }

    /// True once `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.is_closed()
    }

    /// What the journal holds, as a `JournalStatus`: items pending in all lanes and per lane,
    /// paused lanes with the error that paused them, dead letters, the last seq, the cursor and
    /// the size on disk, read in one consistent snapshot.
    fn status(&self, py: Python<'_>) -> PyResult<PyJournalStatus> {
        self.with(py, |journal| journal.status()).map(Into::into)
    }

    /// The dead letters (items that failed for good under `on_failure="skip"`), oldest first,
    /// as `DeadLetter` objects.
    fn dead_letters(&self, py: Python<'_>) -> PyResult<Vec<PyDeadLetter>> {
        self.with(py, |journal| journal.dead_letters())?
            .into_iter()
            .map(|letter| PyDeadLetter::new(py, letter))
            .collect()
    }

    /// Puts dead letter `seq` back at the end of its lane with a new seq, and returns that
    /// seq: the next Conveyor on this journal delivers it after what is already pending. The new
    /// seq gives it a new `idempotency_key`, so retry only what the receiver did not take.
    /// Raises `JournalError` if there is no such dead letter.
    fn retry_dead(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::seq)] seq: u64,
    ) -> PyResult<u64> {
        self.with(py, |journal| journal.retry_dead(seq))
    }

    /// Deletes dead letter `seq` for good. Raises `JournalError` if there is none.
    fn discard_dead(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::seq)] seq: u64,
    ) -> PyResult<()> {
        self.with(py, |journal| journal.discard_dead(seq))
    }

    /// Clears the pause on the lane of `key` (`""` for the single lane of a strict or
    /// pipelined conveyor), as `Conveyor.resume(key)` does; returns `False` if it was not
    /// paused. The next Conveyor on this journal delivers the lane again, starting with the item
    /// that paused it.
    #[pyo3(signature = (key = String::new()), text_signature = "($self, /, key=\"\")")]
    fn resume(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::lane_key)] key: String,
    ) -> PyResult<bool> {
        self.with(py, |journal| journal.resume(&key))
    }

    /// The input position last stored (`send(..., cursor=N)`, `set_cursor(N)`), or `None`.
    fn cursor(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        self.with(py, |journal| journal.cursor())
    }

    /// Stores the input position, where the next run resumes reading its input.
    fn set_cursor(&self, py: Python<'_>, cursor: &Bound<'_, PyAny>) -> PyResult<()> {
        let cursor = cursor_arg(cursor)?;
        self.with(py, |journal| journal.set_cursor(cursor))
    }

    /// Closes the file, and releases it for a Conveyor; does nothing if already closed, or in a
    /// child of the process that opened it (the file stays the parent's). Every other method
    /// then raises `JournalError`.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if !same_process(self.fork_gen) {
            return Ok(());
        }
        let closed = py.detach(|| {
            let mut journal = self.journal.lock().unwrap_or_else(PoisonError::into_inner);
            journal.take().map(Journal::close)
        });
        match closed {
            Some(Err(err)) => Err(error(py, &err)),
            _ => Ok(()),
        }
    }

    fn __enter__(slf: &Bound<'_, Self>) -> PyResult<Py<Self>> {
        // As for a file: entering a closed one is a mistake worth saying at once.
        slf.get().with(slf.py(), |_| Ok(()))?;
        Ok(slf.clone().unbind())
    }

    #[pyo3(signature = (*_exc_info))]
    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_info: &Bound<'_, pyo3::types::PyTuple>,
    ) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        if !same_process(self.fork_gen) {
            return format!(
                "<conveyor.Journal {}, inherited through fork: unusable>",
                repr(py, &self.path)
            );
        }
        format!(
            "<conveyor.Journal {}{}{}>",
            repr(py, &self.path),
            if self.read_only {
                ", read_only=True"
            } else {
                ""
            },
            if self.is_closed() { ", closed" } else { "" }
        )
    }
}

impl Drop for PyJournal {
    fn drop(&mut self) {
        if !same_process(self.fork_gen) {
            // Closing would be a use of the parent's connection (see `fork_gen`), and SQLite's
            // close can checkpoint and delete the parent's write-ahead log: it is left as the
            // fork copied it, and goes with the child. `get_mut` never waits for the mutex.
            let journal = self
                .journal
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner);
            std::mem::forget(journal.take());
        }
    }
}

/// Opens a journal without ever creating one: for a tool that inspects and repairs, a new empty
/// journal at a mistyped path would only hide the mistake.
fn open(path: &Path, read_only: bool) -> Result<Journal, JournalError> {
    if read_only {
        Journal::open_read_only(path)
    } else {
        Journal::open_existing(path)
    }
}

/// `conveyor.JournalError` in this class's terms where the engine's message names its Rust API
/// or advice that suits a Conveyor taking the file, not a tool looking into it.
fn error(py: Python<'_>, err: &JournalError) -> PyErr {
    let message = match err {
        JournalError::Locked { path, pid } => format!(
            "journal {} is in use by {}, most likely by a Conveyor delivering from it: open it \
             with conveyor.Journal(PATH, read_only=True) to look at it meanwhile, and make \
             changes through that Conveyor (its retry_dead(), discard_dead(), resume(), \
             set_cursor()), or with conveyor.Journal(PATH) once it is closed",
            path.display(),
            holder(*pid)
        ),
        JournalError::ReadOnly { path } => format!(
            "journal {} was opened with read_only=True, which changes nothing: make changes \
             through the Conveyor that owns it (its retry_dead(), discard_dead(), resume(), \
             set_cursor()), or once none does, open it with conveyor.Journal(PATH)",
            path.display()
        ),
        JournalError::Missing { path } => format!(
            "no journal at {}: pass the journal= path a Conveyor used (conveyor.Journal opens a \
             journal and never creates one; Conveyor(..., journal=PATH) does)",
            path.display()
        ),
        JournalError::IsADirectory { path } => format!(
            "{} is a directory, not a journal file: pass the journal= path a Conveyor used, \
             such as {}",
            path.display(),
            path.join("events.journal").display()
        ),
        JournalError::NotAJournal { path } => format!(
            "{} is not a Conveyor journal (it does not start like a SQLite database, which a \
             journal is); it was left untouched: pass the journal= path a Conveyor used (if it \
             was a journal, its start is damaged: restore it from a backup)",
            path.display()
        ),
        JournalError::Foreign { path } => format!(
            "{} is a SQLite database but not a Conveyor journal; it was left untouched: pass the \
             journal= path a Conveyor used",
            path.display()
        ),
        other => return crate::journal::error(py, other),
    };
    new_error(py, message)
}

fn holder(pid: Option<u32>) -> String {
    match pid {
        Some(pid) if pid == std::process::id() => format!("process {pid} (this process)"),
        Some(pid) => format!("process {pid}"),
        None => "another process".to_owned(),
    }
}

/// What a journal holds, from `Journal.status()`: a snapshot, equal to another with the same
/// figures.
#[pyclass(frozen, get_all, eq, module = "conveyor", name = "JournalStatus")]
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PyJournalStatus {
    /// Items accepted and not settled (delivered, failed or dropped), all lanes together.
    pending: u64,
    /// Dead letters held.
    dead_letters: u64,
    /// Lanes with pending items or a pause, sorted by name, as `LaneStatus` objects.
    lanes: Vec<PyLaneStatus>,
    /// The highest seq handed out or reserved; the next item gets a greater one.
    last_seq: u64,
    /// The input position last stored, or `None`.
    cursor: Option<u64>,
    /// Bytes on disk: the database and its write-ahead log.
    file_bytes: u64,
    /// Whether the Conveyor that last used the journal was keyed (`True`), strict or pipelined
    /// (`False`); `None` if none used it yet. A Conveyor of the other kind is refused while
    /// items are pending or lanes paused.
    keyed: Option<bool>,
    /// The journal's id, the prefix of every `idempotency_key`.
    id: String,
}

impl From<JournalStatus> for PyJournalStatus {
    fn from(status: JournalStatus) -> Self {
        PyJournalStatus {
            pending: status.pending,
            dead_letters: status.dead_letters,
            lanes: status.lanes.into_iter().map(Into::into).collect(),
            last_seq: status.last_seq,
            cursor: status.cursor,
            file_bytes: status.file_bytes,
            keyed: status.keyed,
            id: status.id,
        }
    }
}

#[pymethods]
impl PyJournalStatus {
    fn __repr__(&self, py: Python<'_>) -> String {
        let lanes: Vec<String> = self.lanes.iter().map(|lane| lane.__repr__(py)).collect();
        format!(
            "JournalStatus(pending={}, dead_letters={}, lanes=[{}], last_seq={}, cursor={}, \
             file_bytes={}, keyed={}, id={})",
            self.pending,
            self.dead_letters,
            lanes.join(", "),
            self.last_seq,
            repr(py, self.cursor),
            self.file_bytes,
            repr(py, self.keyed),
            repr(py, &self.id)
        )
    }
}

/// One lane of a `JournalStatus`.
#[pyclass(frozen, get_all, eq, module = "conveyor", name = "LaneStatus")]
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PyLaneStatus {
    /// The lane: the key in a keyed conveyor, `""` for the single lane of the others.
    lane: String,
    /// Items accepted and not settled in this lane.
    pending: u64,
    /// The error of the item that paused the lane (`""` if none was recorded), or `None` when
    /// the lane is not paused.
    paused: Option<String>,
}

impl From<LaneStatus> for PyLaneStatus {
    fn from(lane: LaneStatus) -> Self {
        PyLaneStatus {
            lane: lane.lane,
            pending: lane.pending,
            paused: lane.paused,
        }
    }
}

#[pymethods]
impl PyLaneStatus {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "LaneStatus(lane={}, pending={}, paused={})",
            repr(py, &self.lane),
            self.pending,
            repr(py, &self.paused)
        )
    }
}
