//! `conveyor.Receipt`: the handle `send` returns, shaped like `concurrent.futures.Future`.
//!
//! `send` must stay well under a microsecond, so a fresh receipt is only the engine's receipt in
//! a small Python object. The machinery for waiting, callbacks and `await` (a [`Slot`] filled by
//! the engine's `on_settled`, and a real `concurrent.futures.Future` for callbacks and asyncio)
//! is made the first time somebody asks for it, and most receipts are never asked.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use conveyor::DeliveryError;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use crate::errors;
use crate::fork::Held;
use crate::sink::Reply;
use crate::wait::{timeout_arg, wait_interruptibly};

type EngineReceipt = conveyor::Receipt<Reply>;
type Outcome = Result<Reply, DeliveryError>;

/// Locks a mutex even if a panicking thread poisoned it: our state stays consistent because
/// every critical section only moves values in or out.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

enum State {
    /// Nobody has waited on this receipt or asked for a future yet.
    Pending(EngineReceipt),
    /// `on_settled` was registered and will fill the slot.
    Watched(Arc<Slot>),
}

/// Where a watched receipt's outcome lands.
///
/// Lock order: the GIL may be held while taking `inner`, but no one holding `inner` ever waits
/// for the GIL, so the two can never deadlock.
#[derive(Default)]
struct Slot {
    inner: Mutex<SlotInner>,
    /// Signalled when `outcome` is set.
    settled: Condvar,
}

#[derive(Default)]
struct SlotInner {
    outcome: Option<Outcome>,
    /// The `concurrent.futures.Future` handed out by `Receipt.future()`, if any; the settling
    /// thread completes it.
    future: Option<Held>,
}

impl Slot {
    fn is_settled(&self) -> bool {
        lock(&self.inner).outcome.is_some()
    }

    /// Called by the engine on the settling thread, without the GIL.
    fn settle(&self, seq: u64, outcome: Outcome) {
        let future = {
            let mut inner = lock(&self.inner);
            inner.outcome = Some(outcome);
            inner.future.take()
        };
        self.settled.notify_all();
        if let Some(future) = future {
            crate::finalizing::attach(|py| {
                let outcome = lock(&self.inner)
                    .outcome
                    .as_ref()
                    .map(|o| clone_outcome(py, o));
                if let Some(outcome) = outcome {
                    complete_future(py, future.bind(py), seq, &outcome);
                }
            });
        }
    }
}

fn clone_outcome(py: Python<'_>, outcome: &Outcome) -> Outcome {
    match outcome {
        Ok(value) => Ok(value.clone_ref(py)),
        Err(err) => Err(err.clone()),
    }
}

fn complete_future(py: Python<'_>, future: &Bound<'_, PyAny>, seq: u64, outcome: &Outcome) {
    let result = match outcome {
        Ok(reply) => reply
            .to_py(py)
            .and_then(|value| crate::finalizing::call_method(future, "set_result", (value,))),
        // Its done callbacks run in there: user code, on the thread that settles the item.
        Err(err) => crate::finalizing::call_method(
            future,
            "set_exception",
            (errors::delivery_error(py, seq, err).into_value(py),),
        ),
    };
    if let Err(err) = result {
        // Only a broken future could refuse; report it like Python reports errors in callbacks.
        err.write_unraisable(py, Some(future));
    }
}

/// The result of one item sent to a conveyor. Behaves like `concurrent.futures.Future`
/// (`result`, `exception`, `done`, `add_done_callback`) and can be awaited from asyncio.
///
/// Dropping a receipt never cancels the delivery.
#[pyclass(frozen, freelist = 1024, module = "conveyor", name = "Receipt")]
pub(crate) struct PyReceipt {
    seq: u64,
    /// The process generation at `send` time: a receipt inherited through `os.fork()` belongs to
    /// delivery threads that do not exist in the child, so waiting on it must fail, not hang.
    fork_gen: u64,
    /// The conveyor's sink id (see `sink::inside_sink_of`): waiting without a timeout from
    /// inside that sink could wait for the sink itself.
    sink_id: u64,
    state: Mutex<State>,
}

impl PyReceipt {
    pub(crate) fn new(receipt: EngineReceipt, fork_gen: u64, sink_id: u64) -> Self {
        PyReceipt {
            seq: receipt.seq(),
            fork_gen,
            sink_id,
            state: Mutex::new(State::Pending(receipt)),
        }
    }

    /// The sink id of the conveyor that accepted the item (see `sink::inside_sink_of`).
    pub(crate) fn sink_id(&self) -> u64 {
        self.sink_id
    }

    /// Whether the item has settled: delivered, failed, dropped or abandoned at shutdown.
    pub(crate) fn is_settled(&self) -> bool {
        match &*lock(&self.state) {
            State::Pending(receipt) => receipt.is_settled(),
            State::Watched(slot) => slot.is_settled(),
        }
    }

    /// Switches to the watched state (once) and returns the slot.
    fn watch(&self, py: Python<'_>) -> Arc<Slot> {
        let (receipt, slot) = {
            let mut state = lock(&self.state);
            if let State::Watched(slot) = &*state {
                return slot.clone();
            }
            let slot = Arc::new(Slot::default());
            match std::mem::replace(&mut *state, State::Watched(slot.clone())) {
                State::Pending(receipt) => (receipt, slot),
                State::Watched(_) => unreachable!("checked above while holding the lock"),
            }
        };
        let seq = self.seq;
        let target = slot.clone();
        // Without the GIL: if the item is already settled, `on_settled` runs the callback right
        // here, and the callback may take the GIL itself.
        py.detach(move || receipt.on_settled(move |outcome| target.settle(seq, outcome)));
        slot
    }

    fn check_process(&self, py: Python<'_>) -> PyResult<()> {
        if crate::pyconveyor::same_process(self.fork_gen) {
            Ok(())
        } else {
            Err(errors::closed(
                py,
                format!(
                    "receipt for item {} belongs to the parent process: after os.fork() its delivery \
                     threads do not exist here; create a new Conveyor in the child",
                    self.seq
                ),
            ))
        }
    }

    /// Waits (interruptibly, without the GIL) for the outcome.
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Outcome> {
        // A negative timeout means "no time left", as for `concurrent.futures.Future`: code
        // that passes `deadline - time.monotonic()` gets a TimeoutError, not a ValueError.
        let timeout = timeout_arg("timeout", timeout.map(|t| if t < 0.0 { 0.0 } else { t }))?;
        self.check_process(py)?;
        let slot = self.watch(py);
        if timeout.is_none() && crate::sink::inside_sink_of(self.sink_id) && !slot.is_settled() {
            // Under strict ordering (or for a later item of the same key) only this very sink
            // call's worker could deliver the item, after the call returns. As `flush` does here,
            // refuse rather than judge whether another worker might; a timeout bounds the wait.
            return Err(PyRuntimeError::new_err(format!(
                "result() or exception() without a timeout was called from inside this conveyor's own sink, on \
                 item {} that has not settled: it may wait for the very sink call that waits for \
                 it; pass a timeout, or use add_done_callback()",
                self.seq
            )));
        }
        let settled = wait_interruptibly(py, timeout, |slice: Duration| {
            let inner = lock(&slot.inner);
            let (inner, _) = slot
                .settled
                .wait_timeout_while(inner, slice, |inner| inner.outcome.is_none())
                .unwrap_or_else(|e| e.into_inner());
            inner.outcome.is_some().then_some(())
        })?;
        if settled.is_none() {
            return Err(errors::timeout(
                py,
                format!(
                    "item {} was not settled within {:?} s",
                    self.seq,
                    timeout.unwrap_or_default().as_secs_f64()
                ),
            ));
        }
        let inner = lock(&slot.inner);
        Ok(clone_outcome(
            py,
            inner.outcome.as_ref().expect("settled above"),
        ))
    }
}

#[pymethods]
impl PyReceipt {
    /// The item's sequence number: 1 for the first item sent to the conveyor, then increasing
    /// in submission order.
    #[getter]
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// Waits for the item to settle and returns what the sink returned.
    ///
    /// Raises `DeliveryFailed`, `Dropped` or `Closed` if the item was not delivered, and
    /// `TimeoutError` if it is still pending after `timeout` seconds. Releases the GIL while
    /// waiting; Ctrl-C interrupts the wait. Called without a timeout from inside this
    /// conveyor's own sink on an item not settled yet, it raises `RuntimeError`: the item may
    /// only start once that sink call returns.
    #[pyo3(signature = (timeout = None))]
    fn result(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = crate::args::timeout)] timeout: Option<f64>,
    ) -> PyResult<Py<PyAny>> {
        match self.wait(py, timeout)? {
            Ok(reply) => reply.to_py(py),
            Err(err) => Err(errors::delivery_error(py, self.seq, &err)),
        }
    }

    /// Waits like `result` and returns the exception that `result` would raise, or `None` when
    /// the item was delivered.
    #[pyo3(signature = (timeout = None))]
    fn exception(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = crate::args::timeout)] timeout: Option<f64>,
    ) -> PyResult<Option<Py<PyAny>>> {
        match self.wait(py, timeout)? {
            Ok(_) => Ok(None),
            Err(err) => Ok(Some(
                errors::delivery_error(py, self.seq, &err)
                    .into_value(py)
                    .into_any(),
            )),
        }
    }

    /// True once the item is settled: delivered, failed, dropped or abandoned at shutdown.
    fn done(&self) -> bool {
        self.is_settled()
    }

    /// Always `False`: delivery cannot be cancelled once an item is accepted (present for
    /// `concurrent.futures.Future` compatibility).
    fn cancel(&self) -> bool {
        false
    }

    /// Always `False` (see `cancel`).
    fn cancelled(&self) -> bool {
        false
    }

    /// True while the item is not settled yet (queued or being delivered).
    fn running(&self) -> bool {
        !self.done()
    }

    /// Calls `fn(receipt)` once the item settles, on the thread that settles it (immediately if
    /// it already has). Keep it short: on a strict conveyor the next item waits for it.
    fn add_done_callback(slf: &Bound<'_, Self>, func: Py<PyAny>) -> PyResult<()> {
        let py = slf.py();
        let future = slf.get().future(py)?;
        let callback = support(py)?.call_method1("call_done_callback", (func, slf))?;
        future.call_method1(py, "add_done_callback", (callback,))?;
        Ok(())
    }

    /// A `concurrent.futures.Future` that settles with this receipt, for APIs that need a real
    /// one (`concurrent.futures.wait`, `as_completed`, `asyncio.wrap_future`). Made on first use.
    fn future(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.check_process(py)?;
        let slot = self.watch(py);
        let (future, settled) = {
            let mut inner = lock(&slot.inner);
            if let Some(future) = &inner.future {
                return Ok((**future).clone_ref(py));
            }
            let future = support(py)?.call_method0("new_future")?.unbind();
            // Not settled yet: the settling thread will complete it (it takes the future out).
            // Settled already: we complete it below.
            inner.future = Some(Held::new(future.clone_ref(py)));
            (future, inner.outcome.as_ref().map(|o| clone_outcome(py, o)))
        };
        if let Some(outcome) = settled {
            // Completed outside the lock: completing runs callbacks, which may use this receipt.
            complete_future(py, future.bind(py), self.seq, &outcome);
        }
        Ok(future)
    }

    /// `Receipt[Reply]` in annotations evaluated at run time.
    #[classmethod]
    fn __class_getitem__(
        cls: &Bound<'_, pyo3::types::PyType>,
        item: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        crate::generic_alias(cls, item)
    }

    fn __await__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        Ok(support(slf.py())?
            .call_method1("receipt_await", (slf,))?
            .unbind())
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let settled =
            matches!(&*lock(&self.state), State::Pending(receipt) if receipt.is_settled());
        if settled && crate::pyconveyor::same_process(self.fork_gen) {
            // Settled already, so watching it takes the outcome at once, without waiting; then
            // repr can say which outcome it is.
            self.watch(py);
        }
        let state = match &*lock(&self.state) {
            State::Pending(receipt) if !receipt.is_settled() => "pending",
            State::Watched(slot) if lock(&slot.inner).outcome.is_none() => "pending",
            State::Pending(_) => "settled",
            State::Watched(slot) => match lock(&slot.inner).outcome {
                Some(Ok(_)) => "delivered",
                Some(Err(DeliveryError::Failed { .. })) => "failed",
                Some(Err(DeliveryError::Dropped)) => "dropped",
                Some(Err(DeliveryError::Unconfirmed)) => "unconfirmed",
                _ => "not delivered",
            },
        };
        format!("<conveyor.Receipt seq={} {state}>", self.seq)
    }
}

/// A coroutine that is already complete: `asend` returns one when the item was accepted at
/// once, which skips creating a Python coroutine on the common path.
#[pyclass(frozen, module = "conveyor._conveyor")]
pub(crate) struct Ready {
    value: Py<PyAny>,
}

impl Ready {
    pub(crate) fn new(value: Py<PyAny>) -> Self {
        Ready { value }
    }
}

#[pymethods]
impl Ready {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Err(pyo3::exceptions::PyStopIteration::new_err((self
            .value
            .clone_ref(py),)))
    }

    fn send(&self, py: Python<'_>, _value: Py<PyAny>) -> PyResult<Py<PyAny>> {
        self.__next__(py)
    }

    /// With `send` and `close`, makes a `Ready` a `collections.abc.Coroutine`, which
    /// `asyncio.create_task` and `asyncio.run` require. A coroutine that has not started
    /// raises what is thrown into it, except a cancellation: the item is accepted already, and
    /// a `CancelledError` would tell the caller it was not (one who sends it again would have
    /// it delivered twice), so a task cancelled before it started returns the receipt.
    #[pyo3(signature = (typ, val = None, _tb = None))]
    fn throw(
        &self,
        py: Python<'_>,
        typ: Bound<'_, PyAny>,
        val: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let error = PyErr::from_value(val.filter(|v| !v.is_none()).unwrap_or(typ));
        if error.is_instance_of::<pyo3::exceptions::asyncio::CancelledError>(py) {
            return self.__next__(py);
        }
        Err(error)
    }

    /// Nothing to clean up: the item was accepted when `asend` was called.
    fn close(&self) {}
}

/// The `conveyor._support` module, imported once.
pub(crate) fn support(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    static MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    MODULE
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(py.import("conveyor._support")?.unbind())
        })
        .map(|m| m.bind(py))
}
