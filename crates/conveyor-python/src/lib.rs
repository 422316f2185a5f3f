//! Python bindings for Conveyor (the `conveyor._conveyor` extension module).
//!
//! The public Python API is re-exported by `python/conveyor/__init__.py`; see the package
//! README for how it is used. Design in brief:
//!
//! * `send` is pure Rust: one engine `try_send` and one small `Receipt` object, no Python-level
//!   future, so it stays well under a microsecond.
//! * A blocking Python sink runs on the engine's threads and holds the GIL only while the
//!   callable runs. An `async def` sink runs on one event-loop thread owned by the conveyor.
//! * Every wait (`flush`, `close`, `Receipt.result`, `send` on a full queue) releases the GIL
//!   and wakes every 50 ms to run signal handlers, so Ctrl-C interrupts it.
//! * Interpreter exit drains each live conveyor within its `drain_timeout` and warns about what
//!   is left; after `os.fork()` an inherited conveyor raises `Closed` instead of hanging.
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

mod args;
mod asend;
mod errors;
mod failure_log;
mod finalizing;
mod fork;
mod http;
mod journal;
mod pyconveyor;
mod pyjournal;
mod receipt;
mod sink;
mod stack;
mod stats;
mod wait;

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use pyo3::prelude::*;

thread_local! {
    /// A small runtime per producer thread, only for waiting on a full queue with a deadline
    /// (`send_async` raced against a timer). Made on first use; the hot path never touches it.
    static WAIT_RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// Runs `future` on this thread for at most `timeout`; `None` if it did not finish in time.
fn block_on_timeout<F: Future>(timeout: Duration, future: F) -> Option<F::Output> {
    WAIT_RUNTIME.with(|cell| {
        let mut cell = cell.borrow_mut();
        let runtime = cell.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect(
                    "a current-thread runtime with a timer needs no OS resources that can run out",
                )
        });
        runtime.block_on(async { tokio::time::timeout(timeout, future).await.ok() })
    })
}

/// `types.GenericAlias(cls, item)`: what `__class_getitem__` returns for a generic class.
fn generic_alias(
    cls: &Bound<'_, pyo3::types::PyType>,
    item: &Bound<'_, PyAny>,
) -> PyResult<Py<PyAny>> {
    let py = cls.py();
    static ALIAS: pyo3::sync::PyOnceLock<Py<pyo3::types::PyType>> = pyo3::sync::PyOnceLock::new();
    Ok(ALIAS
        .import(py, "types", "GenericAlias")?
        .call1((cls, item))?
        .unbind())
}

/// The extension module. Exceptions, the executor and asyncio helpers are Python code in the
/// `conveyor` package; everything here is re-exported there.
///
/// `gil_used = true`, PyO3's default before 0.28: the bindings were written and tested for an
/// interpreter with a GIL, so a free-threaded one should turn its GIL on when it imports them
/// rather than run them without (the abi3 wheel loads on no free-threaded build today).
#[pymodule(gil_used = true)]
fn _conveyor(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<pyconveyor::PyConveyor>()?;
    m.add_class::<receipt::PyReceipt>()?;
    m.add_class::<stats::PyStats>()?;
    m.add_class::<stats::PyCloseReport>()?;
    m.add_class::<sink::PyDelivery>()?;
    m.add_class::<journal::PyDeadLetter>()?;
    m.add_class::<pyjournal::PyJournal>()?;
    m.add_class::<pyjournal::PyJournalStatus>()?;
    m.add_class::<pyjournal::PyLaneStatus>()?;
    m.add_class::<http::PyHttpReply>()?;
    m.add_function(wrap_pyfunction!(pyconveyor::_shutdown_at_exit, m)?)?;
    m.add_function(wrap_pyfunction!(pyconveyor::_after_fork_in_child, m)?)?;
    m.add_function(wrap_pyfunction!(pyconveyor::_mark_sink_thread, m)?)?;
    m.add_function(wrap_pyfunction!(sink::_current_delivery, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
