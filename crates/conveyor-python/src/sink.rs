//! The engine's sink for a Python callable: a blocking function called on the conveyor's
//! threads, or an `async def` function run on the conveyor's own event-loop thread.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, PoisonError, TryLockError};

use conveyor::{Delivery, HttpReply, SinkError};
use pyo3::prelude::*;
use pyo3::{PyTraverseError, PyVisit};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use crate::errors;
use crate::failure_log::{Attempt, FailureLog};
use crate::finalizing;
use crate::fork::Held;

/// What the sink returned for one item.
pub(crate) enum Reply {
    /// A Python sink that returned `None`, as most do: no reference to hold, and none to hand
    /// back to the GIL when the reply is dropped on a delivery thread.
    None,
    /// A Python sink's return value (not `None`).
    Object(Held),
    /// An HTTP sink's response, turned into a `conveyor.HttpReply` when Python reads it.
    Http(HttpReply),
}

impl Reply {
    pub(crate) fn clone_ref(&self, py: Python<'_>) -> Reply {
        match self {
            Reply::None => Reply::None,
            Reply::Object(object) => Reply::Object(object.clone_ref(py)),
            Reply::Http(reply) => Reply::Http(reply.clone()),
        }
    }

    /// What a Python sink returned.
    fn from_object(value: Bound<'_, PyAny>) -> Reply {
        if value.is_none() {
            Reply::None
        } else {
            Reply::Object(Held::new(value.unbind()))
        }
    }

    pub(crate) fn to_py(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match self {
            Reply::None => Ok(py.None()),
            Reply::Object(object) => Ok((**object).clone_ref(py)),
            Reply::Http(reply) => {
                Ok(Py::new(py, crate::http::PyHttpReply::new(py, reply))?.into_any())
            }
        }
    }
}

/// One item as the engine carries it.
pub(crate) enum Item {
    /// Any Python object, handed to the sink as it is.
    Object(Held),
    /// An item of a journaled conveyor: the JSON text `json.dumps` made of it at `send` time
    /// (with the GIL), which the journal stores as it is and the sink gets back through
    /// `json.loads`, the same way before and after a restart.
    Json(Box<RawValue>),
    /// The request body of an HTTP conveyor, made from the sent object at `send` time (with the
    /// GIL) so that the HTTP sink never needs the GIL.
    Body(Vec<u8>),
}

/// The HTTP sink reads the body through this. Only HTTP conveyors use that sink: their `send`
/// makes `Body` items, or `Json` ones (the body's text) with a journal, which also replays them
/// as `Json`. So the empty slice for `Object` is never sent.
impl AsRef<[u8]> for Item {
    fn as_ref(&self) -> &[u8] {
        match self {
            Item::Body(body) => body,
            Item::Json(json) => json.get().as_bytes(),
            Item::Object(_) => &[],
        }
    }
}

impl Item {
    pub(crate) fn clone_ref(&self, py: Python<'_>) -> Item {
        match self {
            Item::Object(object) => Item::Object(object.clone_ref(py)),
            Item::Json(json) => Item::Json(json.clone()),
            Item::Body(body) => Item::Body(body.clone()),
        }
    }

    /// Calls `sink` with the item: the object itself, borrowed (no reference taken), or the
    /// object made of the JSON text or body.
    fn deliver_to<'py>(&self, sink: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        match self {
            Item::Object(object) => finalizing::call1(sink, object.bind(sink.py())),
            other => finalizing::call1(sink, other.to_py(sink.py())?.bind(sink.py())),
        }
    }

    /// The object the sink is called with.
    pub(crate) fn to_py(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match self {
            Item::Object(object) => Ok((**object).clone_ref(py)),
            Item::Json(json) => crate::journal::loads(py, json.get()),
            Item::Body(body) => Ok(pyo3::types::PyBytes::new(py, body).into_any().unbind()),
        }
    }
}

/// Only journaled conveyors serialise items, and their `send` only makes `Json` items.
impl Serialize for Item {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Item::Json(json) => json.serialize(serializer),
            Item::Object(_) | Item::Body(_) => Err(serde::ser::Error::custom(
                "a Python object can only be journaled as JSON (conveyor created without journal=)",
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(deserializer).map(Item::Json)
    }
}

/// What one call of the async sink returns to the engine.
pub(crate) type SinkFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<Reply, SinkError>> + Send>>;

thread_local! {
    /// Id of the conveyor whose sink is running on this thread (0: none). Lets `send`, `flush`
    /// and `close` notice that they are called from inside their own sink, where waiting would
    /// mean waiting for ourselves forever.
    static IN_SINK: Cell<u64> = const { Cell::new(0) };
}

thread_local! {
    /// Id of the conveyor whose delivery threads include this one (0: none). Engine threads
    /// belong to one conveyor for their whole life, so this is set and never cleared.
    static WORKS_FOR: Cell<u64> = const { Cell::new(0) };
}

thread_local! {
    /// Whether this engine thread already holds a permanent Python thread state.
    static HAS_THREAD_STATE: Cell<bool> = const { Cell::new(false) };
}

/// Gives the current (engine-owned) thread a Python thread state that outlives each call.
///
/// `Python::attach` on a thread Python does not know creates a thread state and destroys it
/// again when the GIL is released: a few microseconds per item, more than everything else on the
/// delivery path together. Taking one `PyGILState_Ensure` that is never released keeps the state
/// alive, so each later `attach` only takes and drops the GIL.
fn keep_thread_state() {
    HAS_THREAD_STATE.with(|has| {
        if !has.get() {
            // Ensure takes the GIL and creates the thread state; SaveThread releases the GIL but
            // keeps the state, whose gilstate counter stays at 1 for the life of the thread.
            // PyO3's Ensure parks the thread should the interpreter be finalizing.
            // SAFETY: PyGILState_Ensure may be called on any thread, with or without a thread
            // state, and SaveThread right after it, holding the GIL it took.
            unsafe {
                pyo3::ffi::PyGILState_Ensure();
                pyo3::ffi::PyEval_SaveThread();
            }
            has.set(true);
        }
    });
}

thread_local! {
    /// The delivery whose blocking sink call is running on this thread (null: none). Only a
    /// pointer, so a sink that never asks pays nothing; it is valid exactly while the call runs,
    /// because the delivery lives in the frame that set it and clears it after the call.
    static CURRENT: Cell<*const Delivery<Item>> = const { Cell::new(std::ptr::null()) };
}

/// `conveyor.Delivery`: which item a sink is delivering, for idempotent receivers.
#[pyclass(frozen, get_all, module = "conveyor", name = "Delivery")]
pub(crate) struct PyDelivery {
    /// The item's sequence number (1 for the first item sent to the conveyor).
    seq: u64,
    /// Which attempt this is: 1 on the first try.
    attempt: u32,
    /// The lane key given to `send(..., key=...)`, or `None`.
    key: Option<String>,
    /// Same on every attempt of this item, different for every other item (and conveyor):
    /// send it as an `Idempotency-Key` header so the receiver can drop duplicates.
    idempotency_key: String,
}

impl PyDelivery {
    fn new(delivery: &Delivery<Item>) -> Self {
        PyDelivery {
            seq: delivery.seq(),
            attempt: delivery.attempt(),
            key: delivery.key().map(str::to_owned),
            idempotency_key: delivery.idempotency_key(),
        }
    }
}

#[pymethods]
impl PyDelivery {
    fn __repr__(&self) -> String {
        format!(
            "Delivery(seq={}, attempt={}, key={:?}, idempotency_key={:?})",
            self.seq, self.attempt, self.key, self.idempotency_key
        )
    }
}

/// The delivery a blocking sink is running on this thread, if any (see `conveyor.current_delivery`).
#[pyfunction]
pub(crate) fn _current_delivery() -> Option<PyDelivery> {
    let current = CURRENT.with(Cell::get);
    // SAFETY: non-null only while `blocking`'s closure is inside the sink call on this thread,
    // and that frame owns the delivery the pointer refers to.
    unsafe { current.as_ref() }.map(PyDelivery::new)
}

/// True if the current thread is running the sink of conveyor `id`.
pub(crate) fn inside_sink_of(id: u64) -> bool {
    IN_SINK.with(|current| current.get() == id)
}

/// True if conveyor `id` needs the current thread to deliver its items: waiting here for it to
/// drain would wait for this very thread.
pub(crate) fn thread_works_for(id: u64) -> bool {
    inside_sink_of(id) || WORKS_FOR.with(Cell::get) == id
}

/// Marks the current thread as one of conveyor `id`'s delivery threads, for [`thread_works_for`].
fn mark_works_for(id: u64) {
    WORKS_FOR.with(|works_for| works_for.set(id));
}

/// Marks the current thread as one that runs conveyor `id`'s sink (the async sink's loop thread).
pub(crate) fn mark_sink_thread(id: u64) {
    IN_SINK.with(|current| current.set(id));
}

/// State shared by a conveyor and its sink closure.
pub(crate) struct SinkState {
    /// Identifies the conveyor for [`inside_sink_of`].
    pub(crate) id: u64,
    /// Set once the conveyor was given up on at interpreter exit: from then on the sink fails
    /// items without touching Python, because taking the GIL while the interpreter finalizes
    /// can kill or hang the thread.
    pub(crate) abandoned: AtomicBool,
    /// The Python sink (`None` for an HTTP conveyor, or once released). The conveyor's only
    /// lasting reference to it, kept here rather than in the closure so that the conveyor can
    /// show it to Python's cyclic garbage collector ([`SinkState::traverse`]) and drop it to
    /// break a cycle ([`SinkState::release`]): a sink that is a method of an object owning the
    /// conveyor would otherwise keep both alive until interpreter exit.
    ///
    /// Locked only with the GIL held and never across a call into Python, so the collector (which
    /// holds the GIL) never finds it locked by a thread waiting for the GIL, and `os.fork()` never
    /// copies it locked.
    callable: Mutex<Option<Held>>,
    /// Called once when the conveyor gives up on items that then never reach the sink (see
    /// [`SinkState::abandon`]), so that whoever wraps the sink can settle what it promised for
    /// them (`SerialExecutor` cancels their futures). Locked like `callable`, and shown to the
    /// collector with it.
    on_abandon: Mutex<Option<Held>>,
    /// Logs the items that fail for good, which nothing else may ever report.
    failures: FailureLog,
}

impl std::fmt::Debug for SinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkState")
            .field("id", &self.id)
            .field("abandoned", &self.abandoned)
            .finish_non_exhaustive()
    }
}

impl SinkState {
    /// State for conveyor `id` delivering to `callable` (`None` for an HTTP conveyor).
    pub(crate) fn new(id: u64, callable: Option<Py<PyAny>>, failures: FailureLog) -> Self {
        SinkState {
            id,
            abandoned: AtomicBool::new(false),
            callable: Mutex::new(callable.map(Held::new)),
            on_abandon: Mutex::new(None),
            failures,
        }
    }

    /// Logs a failed attempt if it is the item's last (see [`FailureLog::report`]); not for a
    /// conveyor given up on at exit, whose leftovers the exit warning reports.
    fn report_failure(&self, py: Python<'_>, attempt: &Attempt, error: &SinkError) {
        if !self.abandoned.load(AtomicOrdering::Acquire) {
            self.failures.report(py, attempt, error);
        }
    }

    /// [`report_failure`](SinkState::report_failure) for `Conveyor.http`, without the GIL.
    pub(crate) fn report_http_failure(&self, delivery: &Delivery<Item>, error: &SinkError) {
        if !self.abandoned.load(AtomicOrdering::Acquire) {
            self.failures.report_http(&Attempt::from(delivery), error);
        }
    }

    /// A reference of our own for one call, so the lock is not held while Python runs; the
    /// failure to report instead if the conveyor was given up on or released its sink.
    ///
    /// Given up on is checked again here, with the GIL held: a collection may have given the
    /// conveyor up while this thread waited for the GIL, and may clear the objects the sink
    /// holds (a `functools.partial`'s arguments) before it clears the conveyor.
    fn callable(&self, py: Python<'_>) -> Result<Py<PyAny>, SinkError> {
        if self.abandoned.load(AtomicOrdering::Acquire) {
            return Err(abandoned_error());
        }
        let callable = self.callable.lock().unwrap_or_else(PoisonError::into_inner);
        callable
            .as_ref()
            .map(|sink| (**sink).clone_ref(py))
            .ok_or_else(released_error)
    }

    /// Shows the sink and its abandon hook to the garbage collector (`__traverse__`): no
    /// Python, no blocking lock.
    ///
    /// Shows nothing on a thread the conveyor delivers on. Collecting the conveyor there would
    /// mean draining it there, waiting for this very thread until `drain_timeout`; hidden, they
    /// count as reachable, so the cycle is left for a collection on any other thread.
    pub(crate) fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        if thread_works_for(self.id) {
            return Ok(());
        }
        for slot in [&self.callable, &self.on_abandon] {
            let held = match slot.try_lock() {
                Ok(held) => held,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                // Only a thread holding the GIL can hold it, and the collector holds the GIL.
                Err(TryLockError::WouldBlock) => continue,
            };
            if let Some(object) = &*held {
                visit.call(&**object)?;
            }
        }
        Ok(())
    }

    /// Drops the conveyor's references to the sink and its hook (`__clear__`), once nothing
    /// will call them.
    pub(crate) fn release(&self, py: Python<'_>) {
        let released = (take(&self.callable), take(&self.on_abandon));
        // Outside the lock, and at once rather than at the next `release_pending`: freeing the
        // sink may free the object that owns the conveyor, which is the point of clearing it.
        drop(released);
        crate::fork::release_pending(py);
    }

    /// Sets `on_abandon` (`Conveyor._on_abandon`).
    pub(crate) fn set_on_abandon(&self, hook: Py<PyAny>) {
        let previous = self
            .on_abandon
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(Held::new(hook));
        // Dropped outside the lock: `Held` defers the decref, so no Python runs under it.
        drop(previous);
    }

    /// Gives up on the items not started yet: from now on they fail without reaching the sink
    /// (see [`SinkState::callable`]). Then calls the `on_abandon` hook, once; what it raises is
    /// reported as unraisable, since the give-up goes on regardless.
    pub(crate) fn abandon(&self, py: Python<'_>) {
        self.abandoned.store(true, AtomicOrdering::Release);
        let Some(hook) = take(&self.on_abandon) else {
            return;
        };
        if let Err(err) = crate::finalizing::call(hook.bind(py), ()) {
            err.write_unraisable(py, Some(hook.bind(py)));
        }
    }
}

/// Empties `slot`, without holding its lock past this line.
fn take(slot: &Mutex<Option<Held>>) -> Option<Held> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}

fn abandoned_error() -> SinkError {
    SinkError::permanent("the Python interpreter is exiting; the conveyor was closed at exit")
}

/// For an item that reaches a sink the conveyor already released (none should: the sink is
/// released only once the conveyor closed or gave up); failing beats calling nothing.
fn released_error() -> SinkError {
    SinkError::permanent("the conveyor was garbage-collected; its sink is gone")
}

/// The sink for a blocking Python callable: takes the GIL only for the call itself.
pub(crate) fn blocking(
    state: Arc<SinkState>,
) -> impl Fn(Delivery<Item>) -> Result<Reply, SinkError> + Send + Sync + 'static {
    move |delivery| {
        if state.abandoned.load(AtomicOrdering::Acquire) {
            return Err(abandoned_error());
        }
        // Before taking the GIL: the collector may run as soon as we hold it.
        mark_works_for(state.id);
        keep_thread_state();
        finalizing::attach(|py| {
            crate::fork::release_pending(py);
            let sink = state.callable(py)?;
            let previous = IN_SINK.with(|current| current.replace(state.id));
            // Saved and restored, not cleared: a sink may itself run another conveyor's sink.
            let outer = CURRENT.with(|current| current.replace(&delivery));
            let outcome = match delivery.item().deliver_to(sink.bind(py)) {
                // Most sinks return `None`, which is no coroutine: no look at its type.
                Ok(value) if value.is_none() => Ok(Reply::None),
                Ok(value) if is_coroutine(py, &value) => {
                    Err(coroutine_returned(py, &value, sink.bind(py)))
                }
                Ok(value) => Ok(Reply::from_object(value)),
                Err(err) => Err(errors::sink_error(py, err)),
            };
            // Here, while the GIL is held anyway: a failure costs no second acquisition. And
            // still as the sink: a handler may ask `current_delivery()` for the item's
            // idempotency key, and one that sends the record to this very conveyor gets
            // `QueueFull` rather than wait for room only this thread could make.
            if let Err(error) = &outcome {
                state.report_failure(py, &Attempt::from(&delivery), error);
            }
            CURRENT.with(|current| current.set(outer));
            IN_SINK.with(|current| current.set(previous));
            outcome
        })
    }
}

/// True if `value` is a coroutine object: what a plain function that calls an `async def` one
/// (`lambda x: client.post(x)`) returns, with nothing to run it.
fn is_coroutine(py: Python<'_>, value: &Bound<'_, PyAny>) -> bool {
    static COROUTINE: pyo3::sync::PyOnceLock<Py<pyo3::types::PyType>> =
        pyo3::sync::PyOnceLock::new();
    // A type comparison, not `inspect.isawaitable`: it runs on every delivery. Of pointers, so
    // that it takes no reference to the type (a function call each way in the stable ABI).
    COROUTINE
        .import(py, "types", "CoroutineType")
        .is_ok_and(|class| std::ptr::eq(value.get_type_ptr(), class.as_type_ptr()))
}

/// The permanent failure for a blocking sink that returned a coroutine. Counting it as
/// delivered would lose the item without a word, and a retry would only make another one.
fn coroutine_returned(
    py: Python<'_>,
    coroutine: &Bound<'_, PyAny>,
    sink: &Bound<'_, PyAny>,
) -> SinkError {
    // Closed so that Python does not warn "coroutine ... was never awaited" on top of this error.
    let _ = coroutine.call_method0("close");
    let sink = sink
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "the sink".to_owned());
    let err = pyo3::exceptions::PyTypeError::new_err(format!(
        "the sink {sink} returned a coroutine instead of delivering the item, so nothing ran it; \
         pass the `async def` function itself (Conveyor(post), not Conveyor(lambda x: post(x))), \
         or make the sink an `async def` that awaits it"
    ));
    errors::permanent_sink_error(py, err)
}

/// The sink for an `async def` callable.
///
/// Each delivery starts the coroutine on the conveyor's event-loop thread (`runner`, a
/// `conveyor._support.LoopThread`) and completes when the coroutine does. The engine's own
/// async machinery waits on a oneshot channel, so no engine thread is held while the coroutine
/// runs, and pipelined or keyed conveyors run several coroutines concurrently on that one loop.
pub(crate) fn asynchronous(
    state: Arc<SinkState>,
    runner: Py<PyAny>,
) -> impl Fn(Delivery<Item>) -> SinkFuture + Send + Sync + 'static {
    let runner = Held::new(runner);
    move |delivery| {
        if state.abandoned.load(AtomicOrdering::Acquire) {
            return Box::pin(std::future::ready(Err(abandoned_error())));
        }
        let (tx, rx) = oneshot::channel();
        // Before taking the GIL: the collector may run as soon as we hold it.
        mark_works_for(state.id);
        keep_thread_state();
        let started = finalizing::attach(|py| -> Result<(), SinkError> {
            crate::fork::release_pending(py);
            let sink = state.callable(py)?;
            let start = || -> PyResult<()> {
                let info = Py::new(py, PyDelivery::new(&delivery))?;
                let future = finalizing::call_method(
                    runner.bind(py),
                    "submit",
                    (sink.bind(py), delivery.item().to_py(py)?, info),
                )?;
                let done = Py::new(
                    py,
                    CoroutineDone {
                        tx: Mutex::new(Some(tx)),
                        state: state.clone(),
                        attempt: Attempt::from(&delivery),
                    },
                )?;
                finalizing::call_method(&future, "add_done_callback", (done,))?;
                Ok(())
            };
            start().map_err(|err| {
                let error = errors::sink_error(py, err);
                state.report_failure(py, &Attempt::from(&delivery), &error);
                error
            })
        });
        let id = state.id;
        Box::pin(async move {
            started?;
            let outcome = rx.await.unwrap_or_else(|_| {
                Err(SinkError::retryable(
                    "the conveyor's event loop stopped before the coroutine finished",
                ))
            });
            // The engine settles the item, and runs its receipt callbacks, on whichever runtime
            // thread polls this to the end, maybe not the one that started it: a collection
            // there must find the sink hidden too.
            mark_works_for(id);
            outcome
        })
    }
}

/// `add_done_callback` target that hands a finished coroutine's outcome to the engine.
#[pyclass(frozen)]
struct CoroutineDone {
    /// `Option` because a callback must fire at most once; the `Mutex` makes the class `Sync`.
    tx: Mutex<Option<oneshot::Sender<Result<Reply, SinkError>>>>,
    /// For logging a final failure here, on the loop thread that already holds the GIL, rather
    /// than taking it again where the engine receives the outcome.
    state: Arc<SinkState>,
    attempt: Attempt,
}

#[pymethods]
impl CoroutineDone {
    fn __call__(&self, py: Python<'_>, future: &Bound<'_, PyAny>) {
        // On the loop thread, a daemon the finalizing interpreter ends when the exception's
        // `__str__` or a log handler takes the GIL back: parked there, before PyO3's frames.
        finalizing::park_on_exit(|| {
            let outcome = future
                .call_method0("result")
                .map(Reply::from_object)
                .map_err(|err| errors::sink_error(py, err));
            if let Err(error) = &outcome {
                self.state.report_failure(py, &self.attempt, error);
            }
            if let Some(tx) = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
                // The receiver is gone only if the engine gave up on this delivery: nothing to do.
                let _ = tx.send(outcome);
            }
        });
    }
}
