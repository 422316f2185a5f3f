//! `await conveyor.asend(item)` on a full queue, made cancel-safe.
//!
//! The engine's `send_async` future is polled on the event loop's own thread, by the coroutine
//! that awaits it (`conveyor._support.asend_slow`): only a poll can accept the item, and the
//! poll that accepts it hands the receipt straight to that coroutine, so there is no moment at
//! which the item is accepted while the awaiting task can still be cancelled. A cancellation
//! arrives between polls and drops the future, which the engine guarantees accepts nothing.
//!
//! The future waits on `tokio::sync::Notify`, which needs no runtime, only a `Waker`. Ours cannot
//! resume the coroutine itself: the engine wakes it while holding its state lock, which the event
//! loop's thread takes (with the GIL held) whenever it sends, so taking the GIL there could
//! deadlock. The waker only sets a flag; a helper thread waiting for that flag (without the GIL)
//! resumes the coroutine through `loop.call_soon_threadsafe`, and sends nothing itself.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Wake, Waker};

use conveyor::SendError;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::pyconveyor::{same_process, PyConveyor};
use crate::receipt::PyReceipt;
use crate::sink::{Item, Reply};

/// The engine's send future, owning what it borrows so that it can wait across Python calls.
pub(crate) type SendFuture = Pin<
    Box<dyn Future<Output = Result<conveyor::Receipt<Reply>, SendError<Item>>> + Send + 'static>,
>;

/// The future's waker: records that the future may progress and wakes the helper thread.
#[derive(Debug, Default)]
struct Signal {
    /// Set by a wake (or by `cancel`), cleared before each poll: a wake that comes while the
    /// helper thread is not waiting yet is not lost.
    woken: Mutex<bool>,
    changed: Condvar,
}

impl Signal {
    fn set(&self, woken: bool) {
        *self.woken.lock().unwrap_or_else(PoisonError::into_inner) = woken;
        if woken {
            self.changed.notify_all();
        }
    }
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.set(true);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.set(true);
    }
}

/// An `asend` waiting for room: the engine's send future and its waker.
#[pyclass(frozen, module = "conveyor._conveyor")]
pub(crate) struct PendingSend {
    /// `None` once the send finished or was cancelled. A mutex only to make the class `Sync`:
    /// it is used by the event loop's thread alone.
    future: Mutex<Option<SendFuture>>,
    signal: Arc<Signal>,
    /// Keeps the conveyor alive while the future holds its engine: the future's reference is
    /// never the last, so the conveyor's own `Drop` still decides how the engine ends.
    conveyor: Py<PyConveyor>,
    /// The process the future was made in (see `pyconveyor::FORK_GEN`).
    fork_gen: u64,
}

impl std::fmt::Debug for PendingSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSend").finish_non_exhaustive()
    }
}

impl PendingSend {
    pub(crate) fn new(conveyor: Py<PyConveyor>, future: SendFuture, fork_gen: u64) -> Self {
        PendingSend {
            future: Mutex::new(Some(future)),
            signal: Arc::default(),
            conveyor,
            fork_gen,
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<SendFuture>> {
        self.future.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the future, which un-registers its wait under the engine's lock; in a forked child
    /// that lock may have been copied locked, so the future is leaked there instead.
    fn discard(&self) {
        if let Some(future) = self.slot().take() {
            if same_process(self.fork_gen) {
                drop(future);
            } else {
                std::mem::forget(future);
            }
        }
        // Lets a helper thread still waiting for a wake-up finish.
        self.signal.set(true);
    }
}

#[pymethods]
impl PendingSend {
    /// Polls the send on the calling thread (the event loop's): the receipt once the item is
    /// accepted, `None` while it waits for room (`wait` then returns when to poll again).
    ///
    /// Raises what `send` raises (`Closed`, `JournalError`, ...).
    fn poll(&self, py: Python<'_>) -> PyResult<Option<PyReceipt>> {
        let mut slot = self.slot();
        let Some(future) = slot.as_mut() else {
            return Err(PyRuntimeError::new_err(
                "this asend() already finished or was cancelled; call asend() again to send",
            ));
        };
        self.signal.set(false);
        let waker = Waker::from(Arc::clone(&self.signal));
        let polled = self.conveyor.get().poll_send(py, future, &waker);
        if !matches!(polled, Ok(None)) {
            // Finished: the item is accepted or refused for good.
            slot.take();
        }
        polled
    }

    /// Waits, without the GIL, until the send may progress or is cancelled. For a helper
    /// thread: it never touches the future, so it can never accept the item.
    fn wait(&self, py: Python<'_>) {
        let signal = &self.signal;
        py.allow_threads(|| {
            let woken = signal.woken.lock().unwrap_or_else(PoisonError::into_inner);
            let _woken = signal
                .changed
                .wait_while(woken, |woken| !*woken)
                .unwrap_or_else(PoisonError::into_inner);
        });
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
