//! `await conveyor.asend(item)` on a full queue, or under `durability="sync"`, made
//! cancel-safe and never blocking the event loop.
//!
//! The engine's futures are polled on the event loop's own thread, by the awaitable that awaits
//! them (`conveyor._support.Sending`). On a full queue that is the engine's `send_async`: only a
//! poll can accept the item, and the poll that accepts it hands the receipt straight to that
//! awaitable, so there is no moment at which the item is accepted while the awaiting task can
//! still be cancelled. A cancellation arrives between polls and drops the future, which the
//! engine guarantees accepts nothing.
//!
//! Under `durability="sync"` the accepted item's commit is then awaited the same way
//! (`Conveyor::wait_committed_async`), rather than waited for on the loop's thread, which
//! stalled every task on the loop for each commit, and for good while the disk was full. The
//! item is accepted by then, so a cancellation cannot take it back: the awaitable returns the
//! receipt at once instead of raising, as `asend` does for an item its call accepted. Awaiting
//! the commit on the loop rather than on a helper thread (as `aflush` does) costs no thread per
//! send and no polling delay, and reuses the one dispatcher below.
//!
//! `await conveyor.await_committed(receipt)` awaits the same commit future for an item sent
//! earlier (`Stage::Committed`). It accepted nothing, so a cancellation raises there, and drops
//! the future: no wait is left behind.
//!
//! The future waits on `tokio::sync::Notify`, which needs no runtime, only a `Waker`. Ours cannot
//! resume the coroutine itself: the engine wakes it while holding its state lock, which the event
//! loop's thread takes (with the GIL held) whenever it sends, so taking the GIL there could
//! deadlock. The waker only pushes its pending send on a lock-free stack and unparks one
//! dispatcher thread per process, which takes the GIL once per batch of woken sends and resumes
//! each coroutine through its loop's `call_soon_threadsafe`; it sends nothing itself. One thread
//! per process rather than per conveyor: a thousand blocked `asend`s, on any number of
//! conveyors and loops, cost one thread, which never needs stopping when a conveyor closes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Wake, Waker};
use std::thread::Thread;

use conveyor::SendError;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyBool;

use crate::fork::Held;
use crate::pyconveyor::{exiting, same_process, PyConveyor};
use crate::receipt::PyReceipt;
use crate::sink::{Item, Reply};
use crate::stack::Stack;

/// The engine's send future, owning what it borrows so that it can wait across Python calls.
pub(crate) type SendFuture = Pin<
    Box<dyn Future<Output = Result<conveyor::Receipt<Reply>, SendError<Item>>> + Send + 'static>,
>;

/// The engine's wait for an accepted item's commit (`Conveyor::wait_committed_async`).
pub(crate) type CommitFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What `await_committed` returns once its wait is over.
pub(crate) fn committed(py: Python<'_>) -> Py<PyAny> {
    PyBool::new(py, true).to_owned().into_any().unbind()
}

/// What an `asend` waits for.
pub(crate) enum Stage {
    /// Room in the queue: the engine's send future, which accepts the item in the poll that
    /// returns its receipt. Dropping it accepts nothing.
    Room(SendFuture),
    /// The journal's commit of the accepted item (`durability="sync"`): the receipt is the
    /// outcome whatever happens now, cancellation included.
    Commit(CommitFuture, Py<PyReceipt>),
    /// `await_committed`'s wait for an item's commit: `True` once it is over. Nothing was
    /// accepted by this call, so a cancellation raises as for any other await.
    Committed(CommitFuture),
}

/// Woken sends whose coroutines the dispatcher has yet to resume. A lock-free stack because the
/// waker runs under the engine's lock and must neither block nor leave a lock for `os.fork()`
/// to copy locked.
static WOKEN: Stack<Arc<Signal>> = Stack::new();

/// This process's dispatcher thread, with the fork generation it was started in: a forked child
/// does not have its parent's and starts its own on its first wait. Locked only with the GIL
/// held and never across Python code, so `os.fork()` (which holds the GIL) never copies it locked.
static DISPATCHER: Mutex<Option<(u64, Thread)>> = Mutex::new(None);

/// The dispatcher thread of this process, started on first use.
fn dispatcher(_py: Python<'_>, fork_gen: u64) -> PyResult<Thread> {
    let mut slot = DISPATCHER.lock().unwrap_or_else(PoisonError::into_inner);
    match &*slot {
        Some((started_in, thread)) if *started_in == fork_gen => Ok(thread.clone()),
        _ => {
            // Detached: it parks when idle, and the process exits without waiting for it.
            let started = std::thread::Builder::new()
                .name("conveyor-asend".to_owned())
                .spawn(dispatch)
                .map_err(|err| {
                    PyRuntimeError::new_err(format!(
                        "asend() or await_committed() could not start the thread that resumes \
                         their waits: {err}; raise the process's thread limit, or use send() \
                         and wait_committed() from a thread"
                    ))
                })?;
            let thread = started.thread().clone();
            *slot = Some((fork_gen, thread.clone()));
            Ok(thread)
        }
    }
}

/// The dispatcher thread's loop: resumes the coroutines of woken sends, taking the GIL once per
/// batch.
fn dispatch() {
    loop {
        let woken = WOKEN.take_all();
        if woken.is_empty() {
            // A push after the check above unparks us, so this never sleeps through a wake.
            std::thread::park();
            continue;
        }
        // After the exit hook, taking the GIL may hang or kill this thread as the interpreter
        // finalizes: the woken sends are dropped instead (their loops have stopped by then).
        if exiting() {
            continue;
        }
        crate::finalizing::attach(|py| {
            for signal in woken {
                // Sends inherited from before a fork belong to the parent's loops.
                if same_process(signal.fork_gen) {
                    signal.resume(py);
                }
            }
            crate::fork::release_pending(py);
        });
    }
}

/// The future's waker, and how to resume the coroutine waiting for it.
///
/// A wake and a wait can race (the engine wakes from its own threads): `woken` and `armed` make
/// sure each wait is resumed exactly once, however they interleave. The waker sets `woken`, then
/// queues the send if it takes `armed`; `wake_later` sets `armed`, then takes it back if `woken`
/// is already set. Both are sequentially consistent, so at least one side sees the other's
/// write, and the `armed` swap lets only one of them act.
struct Signal {
    /// Set by a wake, cleared before each poll: a wake during or after a poll is not lost.
    woken: AtomicBool,
    /// Set while the coroutine waits to be resumed; whoever clears it resumes it.
    armed: AtomicBool,
    /// Resumes the waiting awaitable (`_support.Sending` makes it); taken by the dispatcher,
    /// or dropped by `cancel`. Locked only with the GIL held and never across Python code.
    resume: Mutex<Option<Held>>,
    /// The dispatcher to unpark after queueing this send.
    dispatcher: Thread,
    /// The process the send was made in (see `pyconveyor::FORK_GEN`).
    fork_gen: u64,
}

impl std::fmt::Debug for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signal")
            .field("woken", &self.woken)
            .field("armed", &self.armed)
            .finish_non_exhaustive()
    }
}

impl Signal {
    fn resume_slot(&self) -> MutexGuard<'_, Option<Held>> {
        self.resume.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// On the dispatcher thread: schedules the waiting coroutine on its loop.
    fn resume(&self, py: Python<'_>) {
        let Some(resume) = self.resume_slot().take() else {
            return; // cancelled meanwhile
        };
        if let Err(err) = crate::finalizing::call(resume.bind(py), ()) {
            err.write_unraisable(py, Some(resume.bind(py)));
        }
    }
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        if self.armed.swap(false, Ordering::SeqCst) {
            WOKEN.push(Arc::clone(self));
            self.dispatcher.unpark();
        }
    }
}

/// An `asend` waiting for room or for its commit, or an `await_committed`: the engine's
/// future and its waker.
#[pyclass(frozen, module = "conveyor._conveyor")]
pub(crate) struct PendingSend {
    /// `None` before `start` and once the send finished or was cancelled. A mutex only to make
    /// the class `Sync`: it is used by the event loop's thread alone.
    stage: Mutex<Option<Stage>>,
    signal: Arc<Signal>,
    /// Keeps the conveyor alive while the future holds its engine: the future's reference is
    /// never the last, so the conveyor's own `Drop` still decides how the engine ends.
    conveyor: Py<PyConveyor>,
}

impl std::fmt::Debug for PendingSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSend").finish_non_exhaustive()
    }
}

impl PendingSend {
    /// Starts this process's dispatcher thread if it has none yet, which can fail: before the
    /// item is accepted, so that no error follows an accepted item. `start` sets what it waits
    /// for.
    pub(crate) fn new(py: Python<'_>, conveyor: Py<PyConveyor>, fork_gen: u64) -> PyResult<Self> {
        let signal = Signal {
            woken: AtomicBool::new(false),
            armed: AtomicBool::new(false),
            resume: Mutex::new(None),
            dispatcher: dispatcher(py, fork_gen)?,
            fork_gen,
        };
        Ok(PendingSend {
            stage: Mutex::new(None),
            signal: Arc::new(signal),
            conveyor,
        })
    }

    pub(crate) fn start(&self, stage: Stage) {
        *self.slot() = Some(stage);
    }

    fn slot(&self) -> MutexGuard<'_, Option<Stage>> {
        self.stage.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the future, which un-registers its wait under the engine's lock; in a forked child
    /// that lock may have been copied locked, so the future is leaked there instead.
    fn discard(&self) {
        if let Some(stage) = self.slot().take() {
            if same_process(self.signal.fork_gen) {
                drop(stage);
            } else {
                std::mem::forget(stage);
            }
        }
        // Nobody waits any more; a wake already queued finds nothing to resume.
        self.signal.armed.store(false, Ordering::SeqCst);
        self.signal.resume_slot().take();
    }
}

#[pymethods]
impl PendingSend {
    /// Polls the send on the calling thread (the event loop's): the receipt once the item is
    /// accepted (and under `durability="sync"` committed), `None` while it waits for room or
    /// for the commit (`wake_later` then says when to poll again). For `await_committed`,
    /// `True` once the commit is over.
    ///
    /// Raises what `send` raises (`Closed`, `JournalError`, ...), only before the item is
    /// accepted.
    fn poll(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let mut slot = self.slot();
        self.signal.woken.store(false, Ordering::SeqCst);
        let waker = Waker::from(Arc::clone(&self.signal));
        let conveyor = self.conveyor.get();
        loop {
            let polled = match slot.as_mut() {
                None => return Err(PyRuntimeError::new_err(
                    "this asend() already finished or was cancelled; call asend() again to send",
                )),
                Some(Stage::Committed(commit)) => {
                    let done = conveyor.poll_commit(py, commit, &waker);
                    if !matches!(done, Ok(false)) {
                        slot.take();
                    }
                    return done.map(|done| done.then(|| committed(py)));
                }
                Some(Stage::Room(future)) => conveyor.poll_send(py, future, &waker),
                Some(Stage::Commit(commit, receipt)) => {
                    let receipt = receipt.clone_ref(py);
                    conveyor
                        .poll_commit(py, commit, &waker)
                        .map(|done| done.then(|| (receipt, None)))
                }
            };
            match polled {
                Ok(None) => return Ok(None),
                // Accepted, with a commit to wait for: polled at once, as it may be done.
                Ok(Some((receipt, Some(commit)))) => {
                    *slot = Some(Stage::Commit(commit, receipt));
                }
                // Finished: the item is accepted, or refused for good.
                done => {
                    slot.take();
                    return done.map(|finished| finished.map(|(receipt, _)| receipt.into_any()));
                }
            }
        }
    }

    /// The receipt of an item accepted while its commit is awaited, else `None`: what a
    /// cancelled `asend` returns instead of raising.
    fn accepted(&self, py: Python<'_>) -> Option<Py<PyReceipt>> {
        match self.slot().as_ref() {
            Some(Stage::Commit(_, receipt)) => Some(receipt.clone_ref(py)),
            _ => None,
        }
    }

    /// After a poll that returned `None`: arranges for `resume()` to be called, on the
    /// dispatcher thread, once the send may progress, and returns true. Returns false if it
    /// already may (or is over): poll again at once. `resume` only schedules the coroutine on its
    /// loop; the dispatcher never touches the future, so it can never accept the item.
    fn wake_later(&self, resume: Py<PyAny>) -> bool {
        if self.slot().is_none() {
            return false;
        }
        let signal = &self.signal;
        *signal.resume_slot() = Some(Held::new(resume));
        signal.armed.store(true, Ordering::SeqCst);
        if signal.woken.load(Ordering::SeqCst) && signal.armed.swap(false, Ordering::SeqCst) {
            signal.resume_slot().take();
            return false;
        }
        true
    }

    /// Gives up on the send: an item not accepted by now never will be. Harmless once finished.
    fn cancel(&self) {
        self.discard();
    }
}

impl Drop for PendingSend {
    fn drop(&mut self) {
        self.discard();
    }
}
