//! `conveyor.Conveyor`: the engine with a Python sink, plus what Python needs around it
//! (interruptible waits, interpreter-exit drain, fork safety, asyncio entry points).

use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use conveyor::{Backpressure, Builder, JournalError, OnFailure, Ordering, Retry, SendError};
use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyWeakrefReference;
use pyo3::{PyTraverseError, PyVisit};

use crate::args::{self, str_arg};
use crate::asend::{CommitFuture, PendingSend, SendFuture, Stage};
use crate::errors;
use crate::failure_log::{FailureLog, Then};
use crate::fork::Held;
use crate::receipt::{support, PyReceipt, Ready};
use crate::sink::{self, Item, Reply, SinkState};
use crate::stats::{PyCloseReport, PyStats};
use crate::wait::{
    optional_seconds_arg, seconds_arg, timeout_arg, wait_interruptibly, wait_unless, Deadline,
};

type Engine = conveyor::Conveyor<Item, Reply>;

/// Source of conveyor ids (for [`sink::inside_sink_of`]); 0 means "no conveyor".
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Bumped in the child after every `os.fork()`. A conveyor (or a `conveyor.Journal`) remembers
/// the value it was made with: a mismatch means it was inherited from the parent, whose delivery
/// threads (or SQLite connection) the child must not use. One atomic load per call, where
/// `os.getpid()` would be a system call.
static FORK_GEN: AtomicU64 = AtomicU64::new(0);

/// Set when the interpreter-exit hook starts: after it, dropping a conveyor never waits.
static EXITING: AtomicBool = AtomicBool::new(false);

/// Live conveyors, for the interpreter-exit drain. Weak so the registry never keeps one alive.
/// Only touched with the GIL held, so `os.fork()` (which holds the GIL) never sees it locked.
static LIVE: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());

/// True once the interpreter-exit hook started: threads of ours must no longer take the GIL.
pub(crate) fn exiting() -> bool {
    EXITING.load(AtomicOrdering::Acquire)
}

/// The fork generation of this process, for an object to remember at its creation and check
/// with [`same_process`].
pub(crate) fn fork_gen() -> u64 {
    FORK_GEN.load(AtomicOrdering::Relaxed)
}

/// Whether an object made in fork generation `made_in` is used in the process that made it.
pub(crate) fn same_process(made_in: u64) -> bool {
    fork_gen() == made_in
}

/// The engine and what the exit hook needs to close it.
struct Shared {
    engine: Engine,
    sink: Arc<SinkState>,
    fork_gen: u64,
    drain_timeout: Duration,
    /// The event-loop thread of an `async def` sink (`conveyor._support.LoopThread`).
    runner: Option<Held>,
    /// `close()` started: `send` refuses new items from here on. Kept here rather than relying
    /// on the engine's own flag because the engine's `close_timeout` gives up on everything left
    /// when its deadline passes, so it cannot be called in short interruptible slices.
    closing: AtomicBool,
    /// The engine was closed (by `close()`, a `with` block, or the exit hook), and whoever did it
    /// got or printed the report: the exit hook and `Drop` leave this conveyor alone.
    closed: AtomicBool,
    name: String,
}

/// How messages name a conveyor: `conveyor "events"`, or `conveyor` for one without a name.
fn label(name: &str) -> String {
    if name.is_empty() {
        "conveyor".to_owned()
    } else {
        format!("conveyor {name:?}")
    }
}

impl Shared {
    fn label(&self) -> String {
        label(&self.name)
    }

    /// Waits (at most `timeout`, forever for `None`) until every accepted item is settled;
    /// returns whether they are. Interruptible: Ctrl-C raises `KeyboardInterrupt`, and setting
    /// `stop` (a `threading.Event`) ends the wait within a slice, returning false.
    fn settle(
        &self,
        py: Python<'_>,
        timeout: Option<Duration>,
        stop: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let engine = &self.engine;
        let settled = wait_unless(py, timeout, stop, |slice| {
            let started = Instant::now();
            if engine.flush_timeout(slice) {
                Some(true)
            } else if started.elapsed() < slice {
                // The engine gives up before its slice is over only when waiting cannot help:
                // a close gave up on the workers (what it left stays unsettled), no worker is
                // left, or the journal failed to commit. Asking again would spin at full speed
                // until the deadline, or forever without one: its answer stands.
                Some(false)
            } else {
                None
            }
        })?;
        Ok(settled.unwrap_or(false))
    }

    /// Closes the engine, waiting at most `timeout` (forever for `None`) for accepted items.
    /// Also returns whether this call is the one that closed it; a later call returns at once.
    fn close(
        &self,
        py: Python<'_>,
        timeout: Option<Duration>,
    ) -> PyResult<(conveyor::CloseReport, bool)> {
        self.closing.store(true, AtomicOrdering::Release);
        let engine = &self.engine;
        let deadline = Deadline::after(timeout);
        // The long wait, in interruptible slices: Ctrl-C here leaves the conveyor refusing new
        // items but still delivering, and close() can be called again.
        self.settle(py, timeout, None)?;
        // Everything deliverable is settled (or the deadline passed): stopping the workers is
        // quick now. Items in paused lanes, or still pending at the deadline, are what is left.
        // After an earlier close, the engine reports at once.
        let rest = deadline.remaining().unwrap_or(self.drain_timeout);
        let report = py.detach(|| engine.close_timeout(rest));
        let first = !self.closed.swap(true, AtomicOrdering::AcqRel);
        if !report.drained {
            // What is left is reported; the sink must not start on it afterwards.
            self.sink.abandon(py);
        }
        self.stop_runner(py);
        Ok((report, first))
    }

    fn stop_runner(&self, py: Python<'_>) {
        if let Some(runner) = &self.runner {
            if let Err(err) = runner.call_method1(py, "stop", (1.0,)) {
                err.write_unraisable(py, Some(runner.bind(py)));
            }
        }
    }

    /// Whether closing this conveyor on this thread may wait for its delivery threads. Not in a
    /// forked child (they stayed in the parent), nor once the exit hook ran or gave up on them,
    /// nor on one of those very threads (it would wait for itself until `drain_timeout`).
    fn may_wait_here(&self) -> bool {
        same_process(self.fork_gen)
            && !exiting()
            && !self.sink.abandoned.load(AtomicOrdering::Acquire)
            && !sink::thread_works_for(self.sink.id)
    }

    /// What happens to a conveyor nobody closed when the program lets go of it (dropped or
    /// garbage-collected): the same bounded drain as the exit hook, with a warning naming what
    /// it left. Nobody can catch an error here, so it is reported as unraisable.
    ///
    /// Returns true if Ctrl-C cut the drain short. The conveyor is then given up on, and the
    /// caller must call [`interrupt_again`] once it has run its last Python code.
    #[must_use]
    fn close_unattended(&self, py: Python<'_>) -> bool {
        if self.closed.load(AtomicOrdering::Acquire) {
            return false;
        }
        match self.close_and_report(
            py,
            "was garbage-collected without close() and",
            self.drain_timeout,
        ) {
            Ok(_) => false,
            Err(err) if err.is_instance_of::<PyKeyboardInterrupt>(py) => {
                self.give_up_interrupted(py);
                true
            }
            Err(err) => {
                err.write_unraisable(py, None);
                false
            }
        }
    }

    /// After Ctrl-C cut an unattended drain short: once the drop or collection is over, the
    /// objects the sink uses may be gone (the collector clears a cycle's objects, and a
    /// `functools.partial` without its function crashes when called), so no delivery may
    /// call it from here on.
    fn give_up_interrupted(&self, py: Python<'_>) {
        self.sink.abandon(py);
        let stats = self.engine.stats();
        let warned = errors::warn(
            py,
            &format!(
                "{} was garbage-collected and its drain was interrupted with {} item(s) left: \
                 those the sink has not started will fail without reaching it; call close() \
                 before letting go of a conveyor to wait for them",
                self.label(),
                stats.queued + stats.in_flight
            ),
        );
        if let Err(err) = warned {
            err.write_unraisable(py, None);
        }
    }

    /// The exit hook's drain: [`Shared::close_announced`].
    fn close_at_exit(&self, py: Python<'_>) -> PyResult<PyCloseReport> {
        self.close_announced(py, "left at interpreter exit", "at interpreter exit")
    }

    /// [`Shared::close_and_report`], saying on stderr what it waits for once it has lasted
    /// [`QUIET_EXIT`] (the items `left`, and `when` in the warning about what remains). After
    /// a traceback (Ctrl-C in `flush()` or in a `with` block) the program would otherwise seem
    /// to hang for up to `drain_timeout`, with nothing to say that one more Ctrl-C ends the
    /// wait.
    fn close_announced(&self, py: Python<'_>, left: &str, when: &str) -> PyResult<PyCloseReport> {
        // Refused from now on, as `close` would: what the notice counts stays the whole lot.
        self.closing.store(true, AtomicOrdering::Release);
        let deadline = Deadline::after(Some(self.drain_timeout));
        let quiet = QUIET_EXIT.min(self.drain_timeout);
        let started = Instant::now();
        // Too early an end means waiting cannot help (see `settle`): the close says why.
        if !self.settle(py, Some(quiet), None)? && started.elapsed() >= quiet && !deadline.passed()
        {
            let stats = self.engine.stats();
            let waiting = deadline.remaining().unwrap_or_default();
            let notice = format!(
                "{} is delivering {} item(s) {left}: waiting up to {} s more \
                 (drain_timeout={} s); press Ctrl-C to stop waiting\n",
                self.label(),
                stats.queued + stats.in_flight,
                waiting.as_secs_f64().ceil(),
                self.drain_timeout.as_secs_f64(),
            );
            match print_to_stderr(py, &notice) {
                Err(err) if err.is_instance_of::<PyKeyboardInterrupt>(py) => return Err(err),
                // Nowhere left to report that stderr failed: the drain goes on regardless.
                _ => {}
            }
        }
        let rest = deadline.remaining().unwrap_or_default();
        self.close_and_report(py, when, rest)
    }

    /// After Ctrl-C cut the exit hook's drain short: the workers start nothing more, and the
    /// sink is never called again. A worker left calling it would take the GIL while the
    /// interpreter finalizes, which kills the process (`PyGILState_Release` fatal error, or a
    /// segfault). What was not delivered stays in the journal, if there is one.
    fn give_up_at_exit(&self, py: Python<'_>) -> PyResult<()> {
        self.give_up(
            py,
            "at interpreter exit",
            "call flush()/close() before exiting to wait for them",
        )
    }

    /// After Ctrl-C cut a drain short that nobody would otherwise stop (the exit hook's, a
    /// `with` block's): give up on what is left at once, as [`Shared::give_up_at_exit`] says,
    /// and warn with the count, `when` and what to do (`advice`).
    fn give_up(&self, py: Python<'_>, when: &str, advice: &str) -> PyResult<()> {
        self.closing.store(true, AtomicOrdering::Release);
        let report = py.detach(|| self.engine.stop_timeout(Duration::ZERO));
        self.sink.abandon(py);
        self.closed.store(true, AtomicOrdering::Release);
        if report.left == 0 {
            return Ok(());
        }
        errors::warn(
            py,
            &format!(
                "{} {when}: Ctrl-C stopped its drain with {} item(s) undelivered; {advice}",
                self.label(),
                report.left
            ),
        )
    }

    /// Close within `timeout`, what is left of the drain deadline; warn about anything left,
    /// since nobody reads the report (interpreter exit, `with` block exit, garbage collection).
    /// What an earlier close left was reported by it already: no second warning.
    fn close_and_report(
        &self,
        py: Python<'_>,
        when: &str,
        timeout: Duration,
    ) -> PyResult<PyCloseReport> {
        let (report, first) = self.close(py, Some(timeout))?;
        let report: PyCloseReport = report.into();
        if first && report.left() > 0 {
            errors::warn(
                py,
                &format!(
                    "{} {when} left {} item(s) undelivered after waiting drain_timeout={} s; \
                     raise drain_timeout, or call flush()/close() earlier to wait for them",
                    self.label(),
                    report.left(),
                    self.drain_timeout.as_secs_f64()
                ),
            )?;
        }
        Ok(report)
    }
}

/// How long the exit hook drains a conveyor in silence before it says what it waits for: an
/// exit that is quick anyway prints nothing.
const QUIET_EXIT: Duration = Duration::from_secs(1);

/// Writes `text` to `sys.stderr` and flushes it; nothing if there is none (`pythonw`).
fn print_to_stderr(py: Python<'_>, text: &str) -> PyResult<()> {
    let stderr = py.import("sys")?.getattr("stderr")?;
    if stderr.is_none() {
        return Ok(());
    }
    stderr.call_method1("write", (text,))?;
    stderr.call_method0("flush")?;
    Ok(())
}

/// Parsed constructor options that matter after construction.
struct Options {
    block: bool,
    keyed: bool,
    /// Items are journaled: `send` turns them into JSON text (`Item::Json`).
    journaled: bool,
    /// Items become HTTP request bodies at `send` time (`Conveyor.http`).
    http: bool,
    /// `durability="sync"`: a send returns once its item is committed.
    sync: bool,
    /// For `QueueFull`'s message.
    capacity: usize,
    describe: String,
}

/// Delivers items to `sink` in order, on threads the conveyor owns, without blocking `send`.
///
/// See the package documentation (`help(conveyor)`) for every option.
#[pyclass(frozen, weakref, module = "conveyor", name = "Conveyor")]
pub(crate) struct PyConveyor {
    /// `ManuallyDrop` so `Drop` can choose between draining (normal) and leaking (a forked
    /// child, or a conveyor given up on at exit, whose threads must not be waited for).
    shared: ManuallyDrop<Arc<Shared>>,
    options: Options,
    /// A weak reference to this object whose callback ([`Collected`]) drains the conveyor when
    /// the garbage collector finds it unreachable. Set once, right after the object is made;
    /// `Drop` removes it first, so the callback runs for a collection only, never for a drop.
    on_collect: OnceLock<Py<PyAny>>,
}

/// Drains a conveyor that the cyclic garbage collector found unreachable (typically one whose
/// sink is a method of an object that owns it: `self.c = Conveyor(self.post)`).
///
/// A weakref callback because the collector calls those before it clears any object of the
/// cycle (`__clear__`): the sink and everything it uses are still intact, so the items still
/// queued are delivered as they would be from `Drop`, not to an object whose attributes are gone.
#[pyclass(frozen)]
struct Collected {
    /// Weak: this callback must not keep the engine alive.
    shared: Weak<Shared>,
}

#[pymethods]
impl Collected {
    fn __call__(&self, py: Python<'_>, _reference: &Bound<'_, PyAny>) -> PyResult<()> {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(());
        };
        // Otherwise `Drop` leaves its threads running, as it does for any drop here; on the
        // conveyor's own threads its sink was hidden from the collector, so it stays intact.
        if shared.may_wait_here() && shared.close_unattended(py) {
            interrupt_again();
        }
        Ok(())
    }
}

/// Raises Ctrl-C again, for the program's next line, after a drain from a drop or a
/// collection swallowed its `KeyboardInterrupt`: raised there, nobody could catch it, yet one
/// Ctrl-C must stop the program. Call it last: Python code run after it (a warning, say) would
/// meet the interrupt there, where it is swallowed again.
fn interrupt_again() {
    // SAFETY: only sets the flag that the main thread checks to run the SIGINT handler.
    unsafe { pyo3::ffi::PyErr_SetInterrupt() };
}

/// The awaitable `asend` returns when the item must wait, for room or for its commit:
/// `conveyor._support.Sending`, which polls `pending` on the event loop (see `asend.rs`).
fn sending(py: Python<'_>, pending: PendingSend, stage: Stage) -> PyResult<Py<PyAny>> {
    pending.start(stage);
    Ok(support(py)?.call_method1("Sending", (pending,))?.unbind())
}

/// The engine's `send_async` for an item with or without a key and an input position.
async fn send_to<K: Into<String>>(
    engine: &conveyor::Conveyor<Item, Reply>,
    item: Item,
    key: Option<K>,
    cursor: Option<u64>,
) -> Result<conveyor::Receipt<Reply>, SendError<Item>> {
    match (key, cursor) {
        (None, None) => engine.send_async(item).await,
        (Some(key), None) => engine.send_keyed_async(key, item).await,
        (None, Some(cursor)) => engine.send_async_and_set_cursor(item, cursor).await,
        (Some(key), Some(cursor)) => {
            engine
                .send_keyed_async_and_set_cursor(key, item, cursor)
                .await
        }
    }
}

fn in_flight_arg(value: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
    args::optional_count(value, "in_flight", 1)
}

fn concurrency_arg(value: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
    args::optional_count(value, "concurrency", 1)
}

fn capacity_arg(value: &Bound<'_, PyAny>) -> PyResult<usize> {
    args::count(value, "capacity", 1)
}

fn retries_arg(value: &Bound<'_, PyAny>) -> PyResult<u32> {
    args::count(value, "retries", 0)
}

fn rate_limit_arg(value: &Bound<'_, PyAny>) -> PyResult<Option<u32>> {
    args::optional_count(value, "rate_limit", 1)
}

fn max_reply_body_arg(value: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
    args::optional_count(value, "max_reply_body", 0)
}

/// Values of the string options, in the order error messages list them.
const ORDERINGS: &[&str] = &["strict", "pipelined", "keyed"];
const BACKPRESSURES: &[&str] = &["block", "reject", "drop_newest", "drop_oldest"];
const ON_FAILURES: &[&str] = &["skip", "pause"];

fn ordering_arg(value: &Bound<'_, PyAny>) -> PyResult<&'static str> {
    args::choice(value, "ordering", ORDERINGS)
}

fn backpressure_arg(value: &Bound<'_, PyAny>) -> PyResult<&'static str> {
    args::choice(value, "backpressure", BACKPRESSURES)
}

fn on_failure_arg(value: &Bound<'_, PyAny>) -> PyResult<&'static str> {
    args::choice(value, "on_failure", ON_FAILURES)
}

fn parse_ordering(
    ordering: &str,
    in_flight: Option<usize>,
    concurrency: Option<usize>,
) -> PyResult<Ordering> {
    let misplaced = |arg: &str, needs: &str| {
        PyValueError::new_err(format!(
            "{arg}= applies to ordering={needs:?}, not ordering={ordering:?}"
        ))
    };
    match ordering {
        "strict" => {
            if in_flight.is_some() {
                return Err(misplaced("in_flight", "pipelined"));
            }
            if concurrency.is_some() {
                return Err(misplaced("concurrency", "keyed"));
            }
            Ok(Ordering::Strict)
        }
        "pipelined" => {
            if concurrency.is_some() {
                return Err(misplaced("concurrency", "keyed"));
            }
            Ok(Ordering::Pipelined {
                in_flight: in_flight.unwrap_or(8),
            })
        }
        "keyed" => {
            if in_flight.is_some() {
                return Err(misplaced("in_flight", "pipelined"));
            }
            Ok(Ordering::Keyed {
                concurrency: concurrency.unwrap_or(64),
            })
        }
        other => Err(args::unknown_choice("ordering", other, ORDERINGS)),
    }
}

fn parse_backpressure(backpressure: &str) -> PyResult<Backpressure> {
    match backpressure {
        "block" => Ok(Backpressure::Block),
        "reject" => Ok(Backpressure::Reject),
        "drop_newest" => Ok(Backpressure::DropNewest),
        "drop_oldest" => Ok(Backpressure::DropOldest),
        other => Err(args::unknown_choice("backpressure", other, BACKPRESSURES)),
    }
}

fn parse_on_failure(on_failure: &str) -> PyResult<OnFailure> {
    match on_failure {
        "skip" => Ok(OnFailure::Skip),
        "pause" => Ok(OnFailure::Pause),
        other => Err(args::unknown_choice("on_failure", other, ON_FAILURES)),
    }
}

fn parse_retry(retries: u32, backoff: f64, max_backoff: Option<f64>) -> PyResult<Retry> {
    // Checked with or without retries: a bad value is a mistake either way.
    let backoff = seconds_arg("backoff", backoff)?;
    let default_cap = format!(
        "for the default cap of {} s",
        Retry::DEFAULT_MAX_DELAY.as_secs()
    );
    let max_backoff = optional_seconds_arg("max_backoff", max_backoff, &default_cap)?;
    if retries == 0 {
        return Ok(Retry::none());
    }
    let mut retry = Retry::exponential(backoff).max_attempts(retries.saturating_add(1));
    if let Some(max) = max_backoff {
        retry = retry.max_delay(max);
    }
    Ok(retry)
}

impl PyConveyor {
    /// The shared state, unless this object was inherited through `os.fork()`.
    #[inline]
    fn live(&self, py: Python<'_>) -> PyResult<&Shared> {
        let shared: &Shared = &self.shared;
        if same_process(shared.fork_gen) {
            Ok(shared)
        } else {
            Err(errors::closed(
                py,
                format!(
                    "{} was created before os.fork(): its delivery threads live in the parent process \
                     and items sent here would never be delivered; create a new Conveyor in the child",
                    shared.label()
                ),
            ))
        }
    }

    /// The engine's form of a sent object: the object itself, or for a journaled conveyor its
    /// JSON text, made now while we hold the GIL.
    #[inline]
    fn item(&self, py: Python<'_>, object: Py<PyAny>) -> PyResult<Item> {
        if self.options.http && self.options.journaled {
            crate::http::json_body(object.bind(py)).map(Item::Json)
        } else if self.options.http {
            crate::http::body(object.bind(py)).map(Item::Body)
        } else if self.options.journaled {
            crate::journal::dumps(object.bind(py)).map(Item::Json)
        } else {
            Ok(Item::Object(Held::new(object)))
        }
    }

    /// Checks that a send's `key=` and `cursor=` fit this conveyor; returns the cursor.
    #[inline]
    fn check_send_options(
        &self,
        py: Python<'_>,
        key: &Option<String>,
        cursor: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<u64>> {
        let cursor = cursor.map(crate::journal::cursor_arg).transpose()?;
        if key.is_some() && !self.options.keyed {
            return Err(PyValueError::new_err(
                "key= needs a keyed conveyor: create it with ordering=\"keyed\" (strict and pipelined conveyors have one lane)",
            ));
        }
        if cursor.is_some() && !self.options.journaled {
            return Err(crate::journal::error(py, &JournalError::NoJournal));
        }
        Ok(cursor)
    }

    fn not_from_own_sink(&self, shared: &Shared, what: &str) -> PyResult<()> {
        if sink::inside_sink_of(shared.sink.id) {
            return Err(PyRuntimeError::new_err(format!(
                "{what}() was called from inside this conveyor's own sink: it would wait for the item \
                 the sink is delivering, which cannot finish until the sink returns"
            )));
        }
        Ok(())
    }

    /// For the asyncio forms of `flush` and `close`, which wait on a helper thread that cannot
    /// tell whether it waits for the `async def` sink it was started from: check here, on the
    /// calling thread (the sink's loop thread, if that is where we are).
    fn waitable_from_here(&self, py: Python<'_>, what: &str) -> PyResult<()> {
        let shared = self.live(py)?;
        self.not_from_own_sink(shared, what)
    }

    /// Before an attempt to send: `close()` refuses new items before the engine itself is
    /// closed, and what a forked child's parent left is released first.
    fn admit(&self, py: Python<'_>, shared: &Shared) -> PyResult<()> {
        if shared.closing.load(AtomicOrdering::Acquire) {
            return Err(self.closed_error(py, shared));
        }
        crate::fork::release_pending(py);
        Ok(())
    }

    /// One non-waiting attempt: the engine's receipt of the accepted item, which the caller
    /// hands over through `accepted` or `accepted_async`. `Ok(Err(item))` hands the item back
    /// when the queue is full and the policy is to block, so the caller can decide how to wait.
    fn try_once(
        &self,
        py: Python<'_>,
        shared: &Shared,
        item: Item,
        key: Option<&str>,
        cursor: Option<u64>,
    ) -> PyResult<Result<conveyor::Receipt<Reply>, Item>> {
        self.admit(py, shared)?;
        let engine = &shared.engine;
        let attempt = match (key, cursor) {
            (None, None) => engine.try_send(item),
            (Some(key), None) => engine.try_send_keyed(key, item),
            (None, Some(cursor)) => engine.try_send_and_set_cursor(item, cursor),
            (Some(key), Some(cursor)) => engine.try_send_keyed_and_set_cursor(key, item, cursor),
        };
        match attempt {
            Ok(receipt) => Ok(Ok(receipt)),
            Err(SendError::Full(item)) if self.options.block => Ok(Err(item)),
            Err(SendError::Full(_)) => Err(errors::queue_full(
                py,
                format!(
                    "{} is full (capacity {}) and backpressure is \"reject\"; \
                     retry later, raise capacity, or use backpressure=\"block\"",
                    shared.label(),
                    self.options.capacity
                ),
            )),
            Err(other) => Err(self.refused(py, shared, other)),
        }
    }

    /// The error for a send the engine refused for good (not for a full queue to wait on).
    fn refused(&self, py: Python<'_>, shared: &Shared, error: SendError<Item>) -> PyErr {
        match error {
            SendError::Closed(_) => self.closed_error(py, shared),
            SendError::Journal(_) => crate::journal::refused(py, &shared.engine),
            SendError::TooLarge { size, limit, .. } => crate::journal::too_large(size, limit),
            // Not reached today (items reach the engine already as JSON), but bad input all the
            // same, never a closed conveyor.
            encode @ SendError::Encode { .. } => {
                pyo3::exceptions::PyValueError::new_err(encode.to_string())
            }
            other => errors::closed(py, other.to_string()),
        }
    }

    /// The engine's `send_async` for `asend`, owning a reference to the engine so that it can
    /// wait across calls (see `asend.rs`).
    fn send_future(&self, item: Item, key: Option<String>, cursor: Option<u64>) -> SendFuture {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move { send_to(&shared.engine, item, key, cursor).await })
    }

    /// One poll of an `asend`'s send future, on the event loop's thread: once the item is
    /// accepted, what `accepted_async` makes of it; `None` while it waits for room (`waker` then
    /// says when to poll again).
    pub(crate) fn poll_send(
        &self,
        py: Python<'_>,
        future: &mut SendFuture,
        waker: &Waker,
    ) -> PyResult<Option<(Py<PyReceipt>, Option<CommitFuture>)>> {
        let shared = self.live(py)?;
        self.admit(py, shared)?;
        match future.as_mut().poll(&mut Context::from_waker(waker)) {
            Poll::Pending => Ok(None),
            Poll::Ready(Ok(receipt)) => Ok(Some(self.accepted_async(py, shared, receipt)?)),
            Poll::Ready(Err(SendError::Full(_))) => Err(errors::queue_full(
                py,
                format!(
                    "{} is full and only the sink waiting for this asend() could make room; \
                     raise capacity, or use try_send() and handle QueueFull",
                    shared.label()
                ),
            )),
            Poll::Ready(Err(other)) => Err(self.refused(py, shared, other)),
        }
    }

    /// An accepted item's receipt. Under `durability="sync"` it first waits until the journal
    /// holds the item (see `journal::parse_durability`); Ctrl-C interrupts that wait, and the
    /// item stays accepted.
    fn accepted(
        &self,
        py: Python<'_>,
        shared: &Shared,
        receipt: conveyor::Receipt<Reply>,
    ) -> PyResult<PyReceipt> {
        if self.options.sync {
            let engine = &shared.engine;
            wait_interruptibly(py, None, |slice| {
                engine.wait_committed(&receipt, slice).then_some(())
            })?;
        }
        Ok(PyReceipt::new(receipt, shared.fork_gen, shared.sink.id))
    }

    /// `accepted` for `asend`, which must not block its event loop: the receipt at once, and
    /// under `durability="sync"` the commit for the loop to await before handing it over.
    fn accepted_async(
        &self,
        py: Python<'_>,
        shared: &Shared,
        receipt: conveyor::Receipt<Reply>,
    ) -> PyResult<(Py<PyReceipt>, Option<CommitFuture>)> {
        let commit = self
            .options
            .sync
            .then(|| -> CommitFuture { Box::pin(shared.engine.wait_committed_async(&receipt)) });
        let receipt = Py::new(py, PyReceipt::new(receipt, shared.fork_gen, shared.sink.id))?;
        Ok((receipt, commit))
    }

    /// One poll of an accepted `asend`'s commit, on the event loop's thread: whether the
    /// journal holds the item now (or never will: the conveyor closed). `waker` says when to
    /// poll again.
    pub(crate) fn poll_commit(
        &self,
        py: Python<'_>,
        commit: &mut CommitFuture,
        waker: &Waker,
    ) -> PyResult<bool> {
        // Not `admit`: a conveyor closing meanwhile still commits what it accepted.
        self.live(py)?;
        Ok(commit
            .as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_ready())
    }

    /// For `wait_committed` and `await_committed`: the sequence number of `receipt`'s item if
    /// there may be a commit to wait for; `None` without a journal or for a settled item, which
    /// has nothing left to lose (as the engine's `wait_committed` decides).
    ///
    /// # Errors
    /// `ValueError` for a receipt of another conveyor: its number means another item here.
    fn uncommitted_seq(&self, shared: &Shared, receipt: &PyReceipt) -> PyResult<Option<u64>> {
        if receipt.sink_id() != shared.sink.id {
            return Err(PyValueError::new_err(format!(
                "receipt= (item {}) was returned by another conveyor's send, not by {}'s; \
                 wait on the conveyor that accepted the item",
                receipt.seq(),
                shared.label()
            )));
        }
        Ok((self.options.journaled && !receipt.is_settled()).then(|| receipt.seq()))
    }

    fn closed_error(&self, py: Python<'_>, shared: &Shared) -> PyErr {
        errors::closed(
            py,
            format!("{} is closed and accepts no more items", shared.label()),
        )
    }

    /// The queue is full: `QueueFull` if `what` (a send that would wait for room) was called
    /// from inside this conveyor's own sink, where only that very sink could make room.
    fn not_waiting_on_own_sink(&self, py: Python<'_>, shared: &Shared, what: &str) -> PyResult<()> {
        if sink::inside_sink_of(shared.sink.id) {
            return Err(errors::queue_full(
                py,
                format!(
                    "{} is full and {what}() was called from inside its own sink: waiting for room \
                     would wait for this very sink to return; raise capacity, or use try_send() and \
                     handle QueueFull",
                    shared.label()
                ),
            ));
        }
        Ok(())
    }

    /// Waits for room (at most `timeout`), interruptibly and without the GIL.
    fn send_waiting(
        &self,
        py: Python<'_>,
        shared: &Shared,
        item: Item,
        key: Option<&str>,
        cursor: Option<u64>,
        timeout: Option<Duration>,
    ) -> PyResult<Option<PyReceipt>> {
        self.not_waiting_on_own_sink(py, shared, "send")?;
        let deadline = Deadline::after(timeout);
        loop {
            // A fresh reference per slice: a slice that times out drops its copy with the future.
            let attempt = item.clone_ref(py);
            let slice = deadline.slice();
            let engine = &shared.engine;
            let sent =
                py.detach(|| crate::block_on_timeout(slice, send_to(engine, attempt, key, cursor)));
            match sent {
                Some(Ok(receipt)) => return Ok(Some(self.accepted(py, shared, receipt)?)),
                Some(Err(SendError::Full(_))) | None => {}
                Some(Err(other)) => return Err(self.refused(py, shared, other)),
            }
            if deadline.passed() {
                return Ok(None);
            }
            py.check_signals()?;
        }
    }
}

#[pymethods]
impl PyConveyor {
    #[new]
    #[pyo3(signature = (
        sink,
        *,
        ordering = "strict",
        in_flight = None,
        concurrency = None,
        capacity = 10_000,
        backpressure = "block",
        retries = 0,
        backoff = 0.1,
        max_backoff = None,
        on_failure = "skip",
        rate_limit = None,
        drain_timeout = 30.0,
        name = None,
        journal = None,
        durability = None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        sink: Py<PyAny>,
        #[pyo3(from_py_with = ordering_arg)] ordering: &str,
        #[pyo3(from_py_with = in_flight_arg)] in_flight: Option<usize>,
        #[pyo3(from_py_with = concurrency_arg)] concurrency: Option<usize>,
        #[pyo3(from_py_with = capacity_arg)] capacity: usize,
        #[pyo3(from_py_with = backpressure_arg)] backpressure: &str,
        #[pyo3(from_py_with = retries_arg)] retries: u32,
        #[pyo3(from_py_with = args::backoff)] backoff: f64,
        #[pyo3(from_py_with = args::max_backoff)] max_backoff: Option<f64>,
        #[pyo3(from_py_with = on_failure_arg)] on_failure: &str,
        #[pyo3(from_py_with = rate_limit_arg)] rate_limit: Option<u32>,
        #[pyo3(from_py_with = args::drain_timeout)] drain_timeout: f64,
        name: Option<&Bound<'_, PyAny>>,
        journal: Option<std::path::PathBuf>,
        durability: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<Self>> {
        let http_sink = match sink.bind(py).cast::<crate::http::PyHttpSink>() {
            Ok(handle) => Some(handle.get().take()?),
            Err(_) => None,
        };
        if http_sink.is_none() && !sink.bind(py).is_callable() {
            return Err(PyTypeError::new_err(format!(
                "sink must be a callable that takes one item, got {}",
                sink.bind(py).repr()?
            )));
        }
        let parsed_ordering = parse_ordering(ordering, in_flight, concurrency)?;
        let parsed_backpressure = parse_backpressure(backpressure)?;
        let drain = seconds_arg("drain_timeout", drain_timeout)?;
        let mut builder: Builder<Item, Reply> = Engine::builder()
            .ordering(parsed_ordering)
            .capacity(capacity)
            .backpressure(parsed_backpressure)
            .retry(parse_retry(retries, backoff, max_backoff)?)
            .on_failure(parse_on_failure(on_failure)?)
            .drain_timeout(drain);
        if let Some(rate) = rate_limit {
            builder = builder.rate_limit(rate);
        }
        let mut sync = false;
        if let Some(durability) = durability {
            if journal.is_none() {
                return Err(PyValueError::new_err(
                    "durability= applies to a journaled conveyor: give journal=\"PATH\" too",
                ));
            }
            let (parsed, wait) = crate::journal::parse_durability(durability)?;
            builder = builder.durability(parsed);
            sync = wait;
        }
        let journaled = journal.is_some();
        if let Some(path) = journal {
            // Marks the journal as holding JSON items of this package: another program's
            // journal is refused rather than delivered as something it is not.
            builder = builder.journal(path).journal_kind("conveyor-python");
        }

        let name = name
            .map(|name| str_arg(name, "name", "a str or None"))
            .transpose()?
            .unwrap_or_default();
        let then = match (on_failure, journaled) {
            ("pause", _) => Then::Paused,
            (_, true) => Then::DeadLetter,
            _ => Then::Skipped,
        };
        let id = NEXT_ID.fetch_add(1, AtomicOrdering::Relaxed);
        let state = Arc::new(SinkState::new(
            id,
            http_sink.is_none().then(|| sink.clone_ref(py)),
            FailureLog::new(label(&name), then),
        ));
        let is_async: bool = http_sink.is_none()
            && support(py)?
                .call_method1("is_async_callable", (sink.bind(py),))?
                .extract()?;
        let http = http_sink.is_some();
        let (built, runner) = if let Some(http_sink) = http_sink {
            let sink = crate::http::sink(http_sink, state.clone());
            (py.detach(|| builder.build(sink)), None)
        } else if is_async {
            let thread_name = if name.is_empty() {
                "conveyor-loop".to_owned()
            } else {
                format!("conveyor-loop-{name}")
            };
            let runner = support(py)?
                .call_method1("LoopThread", (thread_name, id))?
                .unbind();
            let sink = sink::asynchronous(state.clone(), runner.clone_ref(py));
            // Without the GIL: opening a journal reads the disk.
            let built = py.detach(|| builder.build_async(sink));
            (built, Some(runner))
        } else {
            let sink = sink::blocking(state.clone());
            (py.detach(|| builder.build(sink)), None)
        };
        let runner = runner.map(Held::new);
        let engine = match built {
            Ok(engine) => engine,
            Err(err) => {
                if let Some(runner) = &runner {
                    runner.call_method1(py, "stop", (1.0,))?;
                }
                return Err(crate::journal::build_error(py, err));
            }
        };

        let shared = Arc::new(Shared {
            engine,
            sink: state,
            fork_gen: fork_gen(),
            drain_timeout: drain,
            runner,
            closing: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            name: name.clone(),
        });
        {
            let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
            live.retain(|weak| weak.strong_count() > 0);
            live.push(Arc::downgrade(&shared));
        }
        let mut describe = format!("ordering={ordering:?}");
        match parsed_ordering {
            Ordering::Pipelined { in_flight } => {
                describe.push_str(&format!(", in_flight={in_flight}"))
            }
            Ordering::Keyed { concurrency } => {
                describe.push_str(&format!(", concurrency={concurrency}"))
            }
            _ => {}
        }
        if !name.is_empty() {
            describe = format!("name={name:?}, {describe}");
        }
        let collected = Collected {
            shared: Arc::downgrade(&shared),
        };
        let conveyor = Bound::new(
            py,
            PyConveyor {
                shared: ManuallyDrop::new(shared),
                options: Options {
                    block: matches!(parsed_backpressure, Backpressure::Block),
                    keyed: matches!(parsed_ordering, Ordering::Keyed { .. }),
                    journaled,
                    http,
                    sync,
                    capacity,
                    describe,
                },
                on_collect: OnceLock::new(),
            },
        )?;
        let reference = PyWeakrefReference::new_with(conveyor.as_any(), collected)?;
        // Only `new` sets it, once.
        let _ = conveyor.get().on_collect.set(reference.into_any().unbind());
        Ok(conveyor.unbind())
    }

    /// Shows the sink to Python's cyclic garbage collector, so that a cycle through it (a sink
    /// that is a method of an object owning this conveyor) can be collected.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        self.shared.sink.traverse(&visit)
    }

    /// Breaks a cycle through the sink, once the conveyor will not call it again: by then the
    /// collector has drained it (see [`Collected`]). A conveyor still running keeps its sink
    /// (only possible when this thread is not the one that made it garbage: see
    /// `SinkState::traverse`), and the other objects of the cycle break it.
    fn __clear__(&self) {
        let shared: &Shared = &self.shared;
        // Nothing calls the sink again once the conveyor is closed or given up on, and a
        // forked child has no delivery threads at all.
        if shared.closed.load(AtomicOrdering::Acquire)
            || shared.sink.abandoned.load(AtomicOrdering::Acquire)
            || !same_process(shared.fork_gen)
        {
            // The collector calls this with the GIL held.
            Python::attach(|py| shared.sink.release(py));
        }
    }

    /// A conveyor whose sink is an HTTP request per item, made entirely in Rust without the GIL.
    ///
    /// Each item becomes a request body when it is sent: `bytes`-like objects as they are, `str`
    /// as UTF-8, anything else as JSON (`json.dumps`). 2xx is delivered (the receipt's result is
    /// a `conveyor.HttpReply`); connection errors, timeouts, 408, 425, 429 and 5xx but 501 and
    /// 505 are retried when `retries` is set, honouring `Retry-After`; any other status (501 Not
    /// Implemented and 505 HTTP Version Not Supported too: no retry changes them) fails the item
    /// at once.
    /// `headers` values are treated as secrets: never shown by conveyor, and replaced with
    /// `<redacted>` in server text quoted in errors (each value, and each word of one, of at
    /// least 6 characters; shorter ones are no secrets). `cafile` names a PEM file of
    /// certificate authorities to trust as well as the built-in ones, for an `https` server
    /// whose certificate a private (company) CA signed. `max_reply_body` is how many bytes of
    /// a 2xx body the `HttpReply` keeps (16 MiB by default): the rest is never read, so a server
    /// answering with a huge or endless body costs no more memory than that, and the reply's
    /// `truncated` says it was cut (the item is delivered all the same); `0` keeps none, `None`
    /// keeps every body whole, however large. Every other keyword is a `Conveyor` option.
    #[staticmethod]
    // `method` is read by hand, for a clear `TypeError`: its default is written out for `help()`,
    // as is `max_reply_body`'s (the engine's default).
    #[pyo3(
        signature = (
            url,
            *,
            headers = None,
            method = None,
            timeout = 30.0,
            cafile = None,
            max_reply_body = Some(conveyor::HttpSinkBuilder::DEFAULT_MAX_REPLY_BODY),
            **options
        ),
        text_signature = "(url, *, headers=None, method=\"POST\", timeout=30.0, cafile=None, max_reply_body=16777216, **options)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn http(
        py: Python<'_>,
        url: &Bound<'_, PyAny>,
        #[pyo3(from_py_with = args::headers)] headers: Option<
            std::collections::BTreeMap<String, String>,
        >,
        method: Option<&Bound<'_, PyAny>>,
        #[pyo3(from_py_with = args::bounded_timeout)] timeout: f64,
        cafile: Option<std::path::PathBuf>,
        #[pyo3(from_py_with = max_reply_body_arg)] max_reply_body: Option<usize>,
        options: Option<&Bound<'_, pyo3::types::PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let url = str_arg(url, "url", "a str such as \"https://example.com/events\"")?;
        let method = method
            .map(|method| str_arg(method, "method", "a str such as \"POST\""))
            .transpose()?;
        let timeout = seconds_arg("timeout", timeout)?;
        let handle = crate::http::PyHttpSink::new(
            &url,
            headers.unwrap_or_default(),
            method.as_deref().unwrap_or("POST"),
            timeout,
            cafile.as_deref(),
            max_reply_body,
        )?;
        Ok(py
            .get_type::<PyConveyor>()
            .call((Py::new(py, handle)?,), options)?
            .unbind())
    }

    /// Accepts `item` for delivery and returns its `Receipt` at once; never waits for the sink.
    ///
    /// On a full queue it waits for room with `backpressure="block"` (the default; without the
    /// GIL, interruptible with Ctrl-C), raises `QueueFull` with `"reject"`, and drops an item
    /// with `"drop_newest"` / `"drop_oldest"`. `key` picks the lane of a keyed conveyor;
    /// items sent without one share the lane `""` (a strict or pipelined conveyor has only
    /// that lane, whatever the key).
    /// With a journal, `cursor=N` stores N (your input position after this item, such as a
    /// line number or an offset) in the same commit as the item: after a crash, `cursor()`
    /// says where to resume reading, and nothing before it is lost or sent twice (an item a drop
    /// policy dropped counts as handled).
    ///
    /// Raises `Closed` after `close()`, `JournalError` for `cursor=` without a journal.
    #[pyo3(signature = (item, *, key = None, cursor = None))]
    fn send(
        &self,
        py: Python<'_>,
        item: Py<PyAny>,
        #[pyo3(from_py_with = args::key)] key: Option<String>,
        cursor: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyReceipt> {
        let shared = self.live(py)?;
        let cursor = self.check_send_options(py, &key, cursor)?;
        let item = self.item(py, item)?;
        match self.try_once(py, shared, item, key.as_deref(), cursor)? {
            Ok(receipt) => self.accepted(py, shared, receipt),
            Err(item) => Ok(self
                .send_waiting(py, shared, item, key.as_deref(), cursor, None)?
                .expect("waiting without a deadline only ends with a receipt or an error")),
        }
    }

    /// Like `send`, but never waits: raises `QueueFull` when the queue is full.
    #[pyo3(signature = (item, *, key = None, cursor = None))]
    fn try_send(
        &self,
        py: Python<'_>,
        item: Py<PyAny>,
        #[pyo3(from_py_with = args::key)] key: Option<String>,
        cursor: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyReceipt> {
        let shared = self.live(py)?;
        let cursor = self.check_send_options(py, &key, cursor)?;
        let item = self.item(py, item)?;
        match self.try_once(py, shared, item, key.as_deref(), cursor)? {
            Ok(receipt) => self.accepted(py, shared, receipt),
            Err(_) => Err(errors::queue_full(
                py,
                format!(
                    "{} is full (capacity {}); try again later or use send() \
                     to wait for room",
                    shared.label(),
                    self.options.capacity
                ),
            )),
        }
    }

    /// `send` for asyncio code: `await c.asend(item)` waits for queue room only (never blocking
    /// the event loop), never for delivery. Returns the `Receipt`.
    ///
    /// When the queue has room, the item is accepted by the call itself, before the result is
    /// awaited (as `send` would): awaiting only hands over the receipt, and cancelling a task
    /// made of it cannot take the item back, so that task returns the receipt anyway. When the
    /// queue is full, the item is accepted while awaited, once there is room. Cancelling the
    /// await (a `wait_for` timeout, a `TaskGroup` giving up) is safe: if it raises
    /// `CancelledError`, the item was not accepted and is never sent later, so sending it again
    /// cannot deliver it twice; if it returns, the item was accepted once.
    ///
    /// With `durability="sync"`, the await then lasts until the journal holds the item, and the
    /// loop runs other tasks meanwhile. While the disk is full (or hangs) that wait goes on as
    /// the journal retries, as for `send`; cancelling it (a `wait_for` timeout) returns the
    /// receipt at once, since the item is accepted: it is committed once the journal can write
    /// it, and delivered after that (awaiting the receipt waits for that delivery).
    ///
    /// From this conveyor's own `async def` sink, a full queue raises `QueueFull`, as `send` does.
    #[pyo3(signature = (item, *, key = None, cursor = None))]
    fn asend(
        slf: &Bound<'_, Self>,
        item: Py<PyAny>,
        #[pyo3(from_py_with = args::key)] key: Option<String>,
        cursor: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let this = slf.get();
        let shared = this.live(py)?;
        let cursor = this.check_send_options(py, &key, cursor)?;
        let item = this.item(py, item)?;
        let pending = || PendingSend::new(py, slf.clone().unbind(), shared.fork_gen);
        // Made before the item is accepted: failing to make it then would raise for an
        // accepted item.
        let committing = this.options.sync.then(pending).transpose()?;
        match this.try_once(py, shared, item, key.as_deref(), cursor)? {
            Ok(receipt) => {
                let (receipt, commit) = this.accepted_async(py, shared, receipt)?;
                match commit.zip(committing) {
                    Some((commit, pending)) => sending(py, pending, Stage::Commit(commit, receipt)),
                    None => Ok(Py::new(py, Ready::new(receipt.into_any()))?.into_any()),
                }
            }
            // Waiting for room would wait for this very sink when called from it.
            Err(item) => {
                this.not_waiting_on_own_sink(py, shared, "asend")?;
                let future = this.send_future(item, key, cursor);
                let pending = committing.map_or_else(pending, Ok)?;
                sending(py, pending, Stage::Room(future))
            }
        }
    }

    /// Internal: send, waiting at most `timeout` s for room; `None` if there was none.
    #[pyo3(signature = (item, key, cursor, timeout))]
    fn _send_wait(
        &self,
        py: Python<'_>,
        item: Py<PyAny>,
        #[pyo3(from_py_with = args::key)] key: Option<String>,
        cursor: Option<&Bound<'_, PyAny>>,
        #[pyo3(from_py_with = args::bounded_timeout)] timeout: f64,
    ) -> PyResult<Option<PyReceipt>> {
        let shared = self.live(py)?;
        let cursor = self.check_send_options(py, &key, cursor)?;
        let timeout = seconds_arg("timeout", timeout)?;
        let item = self.item(py, item)?;
        match self.try_once(py, shared, item, key.as_deref(), cursor)? {
            Ok(receipt) => Ok(Some(self.accepted(py, shared, receipt)?)),
            Err(_) if timeout.is_zero() => Ok(None),
            Err(item) => self.send_waiting(py, shared, item, key.as_deref(), cursor, Some(timeout)),
        }
    }

    /// Waits until every item accepted so far is settled (delivered, failed or dropped).
    ///
    /// Returns `True` when they are, `False` if `timeout` seconds passed first, or at once if
    /// they never can be (after a `close(timeout)` that left items) or the journal cannot be
    /// written (a send then raises `JournalError` saying why). Releases the GIL while waiting;
    /// Ctrl-C raises `KeyboardInterrupt`.
    #[pyo3(signature = (timeout = None))]
    fn flush(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::timeout)] timeout: Option<f64>,
    ) -> PyResult<bool> {
        let timeout = timeout_arg("timeout", timeout)?;
        let shared = self.live(py)?;
        self.not_from_own_sink(shared, "flush")?;
        shared.settle(py, timeout, None)
    }

    /// Internal: `flush` for `aflush`'s thread, which gives up (returning `False`) once `stop`
    /// (a `threading.Event`) is set: the awaiting task was cancelled, and nobody is left to tell.
    #[pyo3(signature = (timeout, stop))]
    fn _flush_unless(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::timeout)] timeout: Option<f64>,
        stop: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let timeout = timeout_arg("timeout", timeout)?;
        let shared = self.live(py)?;
        self.not_from_own_sink(shared, "flush")?;
        shared.settle(py, timeout, Some(stop))
    }

    /// `flush` for asyncio code: waits on another thread, never blocking the event loop.
    /// Cancelling the await (a `wait_for` timeout) ends that thread's wait too. Like `flush`,
    /// raises `RuntimeError` from this conveyor's own sink.
    #[pyo3(signature = (timeout = None))]
    fn aflush(
        slf: &Bound<'_, Self>,
        #[pyo3(from_py_with = args::timeout)] timeout: Option<f64>,
    ) -> PyResult<Py<PyAny>> {
        timeout_arg("timeout", timeout)?;
        slf.get().waitable_from_here(slf.py(), "aflush")?;
        Ok(support(slf.py())?
            .call_method1("aflush", (slf, timeout))?
            .unbind())
    }

    /// Waits until the journal holds `receipt`'s item on disk, for at most `timeout` seconds
    /// (`None` = as long as it takes). Returns `True` once it does, `False` if the time ran out.
    ///
    /// With the default batched durability, lets one sender wait for one item (before it
    /// acknowledges upstream, say) while other sends return at once: it has the journal commit
    /// now rather than when its window ends. While the journal cannot be written (a send then
    /// raises `JournalError` saying why) it keeps retrying and this keeps waiting. Returns
    /// `True` at once without a journal, for an item already settled (nothing is left to
    /// lose), and after `close()` (what was not committed then is counted as left in its
    /// report). Releases the GIL while waiting; Ctrl-C raises `KeyboardInterrupt`.
    ///
    /// Raises `ValueError` for a receipt another conveyor returned.
    ///
    /// ```python
    /// receipt = c.send(order)
    /// if c.wait_committed(receipt, timeout=5):
    ///     acknowledge(order)  # it survives a crash from here on
    /// ```
    #[pyo3(signature = (receipt, timeout = None))]
    fn wait_committed(
        &self,
        py: Python<'_>,
        receipt: PyRef<'_, PyReceipt>,
        #[pyo3(from_py_with = args::timeout)] timeout: Option<f64>,
    ) -> PyResult<bool> {
        let timeout = timeout_arg("timeout", timeout)?;
        let shared = self.live(py)?;
        let Some(seq) = self.uncommitted_seq(shared, &receipt)? else {
            return Ok(true);
        };
        let engine = &shared.engine;
        let committed = wait_interruptibly(py, timeout, |slice| {
            engine.wait_committed_seq(seq, slice).then_some(())
        })?;
        Ok(committed.is_some())
    }

    /// `wait_committed` for asyncio code: `await c.await_committed(receipt)` returns `True`
    /// once the journal holds the item, and the event loop runs other tasks meanwhile.
    ///
    /// It has no timeout of its own, as the journal keeps retrying while it cannot write: bound
    /// it with `asyncio.wait_for` (a timeout raises `TimeoutError`; the item stays accepted and
    /// is committed once the journal can write it). Cancelling the await leaves nothing
    /// waiting. Raises `ValueError` for a receipt another conveyor returned.
    ///
    /// ```python
    /// receipt = await c.asend(order)
    /// await asyncio.wait_for(c.await_committed(receipt), timeout=5)
    /// await acknowledge(order)  # it survives a crash from here on
    /// ```
    fn await_committed(
        slf: &Bound<'_, Self>,
        receipt: PyRef<'_, PyReceipt>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let this = slf.get();
        let shared = this.live(py)?;
        let Some(seq) = this.uncommitted_seq(shared, &receipt)? else {
            return Ok(Py::new(py, Ready::new(crate::asend::committed(py)))?.into_any());
        };
        let pending = PendingSend::new(py, slf.clone().unbind(), shared.fork_gen)?;
        let commit: CommitFuture = Box::pin(shared.engine.wait_committed_seq_async(seq));
        sending(py, pending, Stage::Committed(commit))
    }

    /// Stops accepting items and waits (at most `timeout` s; `None` = until done) for the
    /// accepted ones to settle. Returns a `CloseReport` saying how many were left.
    ///
    /// Calling it again is harmless: once closed, it returns a report at once (and what an
    /// earlier close left stays undelivered). Ctrl-C interrupts the wait.
    #[pyo3(signature = (timeout = None))]
    fn close(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::timeout)] timeout: Option<f64>,
    ) -> PyResult<PyCloseReport> {
        let timeout = timeout_arg("timeout", timeout)?;
        let shared = self.live(py)?;
        self.not_from_own_sink(shared, "close")?;
        Ok(shared.close(py, timeout)?.0.into())
    }

    /// `close` for asyncio code: waits on another thread, never blocking the event loop.
    /// Like `close`, raises `RuntimeError` from this conveyor's own sink.
    #[pyo3(signature = (timeout = None))]
    fn aclose(
        slf: &Bound<'_, Self>,
        #[pyo3(from_py_with = args::timeout)] timeout: Option<f64>,
    ) -> PyResult<Py<PyAny>> {
        timeout_arg("timeout", timeout)?;
        slf.get().waitable_from_here(slf.py(), "aclose")?;
        Ok(support(slf.py())?
            .call_method1("aclose", (slf, timeout))?
            .unbind())
    }

    /// Internal: the `with`-block exit: close within `drain_timeout`, warn about what is left.
    fn _close_on_exit(&self, py: Python<'_>) -> PyResult<PyCloseReport> {
        let shared = self.live(py)?;
        self.not_from_own_sink(shared, "close")?;
        shared.close_and_report(
            py,
            "closing at the end of its `with` block",
            shared.drain_timeout,
        )
    }

    /// Internal: calls `hook()` once, with the GIL, when this conveyor gives up on accepted
    /// items that will then never reach the sink: a close whose deadline passed (`close(timeout)`,
    /// a drain at garbage collection or interpreter exit), or one that Ctrl-C cut short.
    /// `SerialExecutor` cancels the futures of those calls, which would hang their waiters.
    fn _on_abandon(&self, hook: Py<PyAny>) {
        self.shared.sink.set_on_abandon(hook);
    }

    /// Current counters (a `Stats` snapshot).
    #[getter]
    fn stats(&self, py: Python<'_>) -> PyResult<PyStats> {
        Ok(self.live(py)?.engine.stats().into())
    }

    /// True once `close()` was called (or the conveyor was closed at interpreter exit): it
    /// accepts no more items.
    #[getter]
    fn closed(&self) -> bool {
        self.shared.closing.load(AtomicOrdering::Acquire)
    }

    /// The `name` given at construction (`""` if none).
    #[getter]
    fn name(&self) -> &str {
        &self.shared.name
    }

    /// Keys of the lanes paused by a failed item (`on_failure="pause"`); `""` is the single lane
    /// of a strict or pipelined conveyor.
    fn paused(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        Ok(self.live(py)?.engine.paused())
    }

    /// Resumes a paused lane; returns `False` if it was not paused.
    #[pyo3(signature = (key = String::new()), text_signature = "($self, /, key=\"\")")]
    fn resume(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::lane_key)] key: String,
    ) -> PyResult<bool> {
        Ok(self.live(py)?.engine.resume(&key))
    }

    /// Items that failed for good and were kept by the journal (`journal=` with
    /// `on_failure="skip"`), oldest first, as `DeadLetter` objects.
    ///
    /// Raises `JournalError` without a journal.
    fn dead_letters(&self, py: Python<'_>) -> PyResult<Vec<crate::journal::PyDeadLetter>> {
        let engine = &self.live(py)?.engine;
        let dead = py
            .detach(|| engine.dead_letters())
            .map_err(|err| crate::journal::error(py, &err))?;
        dead.into_iter()
            .map(|letter| crate::journal::PyDeadLetter::new(py, letter))
            .collect()
    }

    /// Sends dead letter `seq` again, at the end of its lane with a new seq; returns its
    /// `Receipt`. Raises `JournalError` if there is no such dead letter. The new seq gives it a
    /// new `idempotency_key`: a receiver that drops repeats does not recognise it as the item
    /// that failed, so retry only what the receiver did not take. On a full queue it waits for
    /// room whatever the backpressure (a dead letter is never dropped on its way back), and
    /// Ctrl-C interrupts that wait, leaving the dead letter where it was.
    fn retry_dead(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::seq)] seq: u64,
    ) -> PyResult<PyReceipt> {
        let shared = self.live(py)?;
        let engine = &shared.engine;
        // In slices, for Ctrl-C: a slice that finds the queue still full leaves the dead letter
        // untouched, and the next one claims it again.
        let retried = wait_interruptibly(py, None, |slice| {
            match engine.retry_dead_timeout(seq, slice) {
                Err(JournalError::QueueFull { .. }) => None,
                done => Some(done),
            }
        })?
        .expect("a wait without a timeout ends with its result");
        let receipt = retried.map_err(|err| crate::journal::error(py, &err))?;
        self.accepted(py, shared, receipt)
    }

    /// Deletes dead letter `seq` for good. Raises `JournalError` if there is none.
    fn discard_dead(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::seq)] seq: u64,
    ) -> PyResult<()> {
        let engine = &self.live(py)?.engine;
        py.detach(|| engine.discard_dead(seq))
            .map_err(|err| crate::journal::error(py, &err))
    }

    /// The input position last stored in the journal (by `send(..., cursor=N)` or
    /// `set_cursor(N)`), or `None` if none was: where a rerun resumes reading its input.
    ///
    /// Raises `JournalError` without a journal or after `close()`.
    fn cursor(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        let engine = &self.live(py)?.engine;
        py.detach(|| engine.cursor())
            .map_err(|err| crate::journal::error(py, &err))
    }

    /// Stores an input position that sends nothing (a blank or skipped record). To store the
    /// position of an item, pass `cursor=` to `send`: the item and the position are then
    /// committed together, so a crash cannot keep one without the other.
    ///
    /// Raises `JournalError` without a journal or after `close()`.
    fn set_cursor(&self, py: Python<'_>, cursor: &Bound<'_, PyAny>) -> PyResult<()> {
        let cursor = crate::journal::cursor_arg(cursor)?;
        let engine = &self.live(py)?.engine;
        py.detach(|| engine.set_cursor(cursor))
            .map_err(|err| crate::journal::error(py, &err))
    }

    /// `Conveyor[Item, Reply]` in annotations evaluated at run time.
    #[classmethod]
    fn __class_getitem__(
        cls: &Bound<'_, pyo3::types::PyType>,
        item: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        crate::generic_alias(cls, item)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*exc_info))]
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_info: &Bound<'_, pyo3::types::PyTuple>,
    ) -> PyResult<bool> {
        let interrupted = exc_info.get_item(0).is_ok_and(|kind| {
            kind.cast::<pyo3::types::PyType>().is_ok_and(|kind| {
                kind.is_subclass_of::<PyKeyboardInterrupt>()
                    .unwrap_or(false)
            })
        });
        let closed = if interrupted {
            // Ctrl-C ended the block: the drain that follows must not look like a hang.
            let shared = self.live(py)?;
            self.not_from_own_sink(shared, "close")?;
            shared.close_announced(
                py,
                "left when Ctrl-C ended its `with` block",
                "closing at the end of its `with` block",
            )
        } else {
            self._close_on_exit(py)
        };
        match closed {
            Ok(_) => Ok(false),
            // Ctrl-C during the drain means stop waiting: what is left is given up now, or the
            // exit hook would drain it again for a whole drain_timeout.
            Err(err) if err.is_instance_of::<PyKeyboardInterrupt>(py) => {
                self.live(py)?.give_up(
                    py,
                    "at the end of its `with` block",
                    "let its drain finish to deliver them, or raise drain_timeout",
                )?;
                Err(err)
            }
            Err(err) => Err(err),
        }
    }

    fn __aenter__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        Ok(support(slf.py())?.call_method1("aenter", (slf,))?.unbind())
    }

    #[pyo3(signature = (*_exc_info))]
    fn __aexit__(
        slf: &Bound<'_, Self>,
        _exc_info: &Bound<'_, pyo3::types::PyTuple>,
    ) -> PyResult<Py<PyAny>> {
        slf.get().waitable_from_here(slf.py(), "close")?;
        Ok(support(slf.py())?.call_method1("aexit", (slf,))?.unbind())
    }

    fn __repr__(&self) -> String {
        if !same_process(self.shared.fork_gen) {
            // The engine's lock may have been held by a parent thread at fork time: don't touch it.
            return format!(
                "<conveyor.Conveyor {}, inherited through fork: unusable>",
                self.options.describe
            );
        }
        let stats = self.shared.engine.stats();
        format!(
            "<conveyor.Conveyor {}, queued={}, in_flight={}{}>",
            self.options.describe,
            stats.queued,
            stats.in_flight,
            if self.closed() { ", closed" } else { "" }
        )
    }
}

impl Drop for PyConveyor {
    fn drop(&mut self) {
        // Python drops us with the GIL held, so the weak reference goes at once: its callback
        // must not run for a conveyor already gone.
        drop(self.on_collect.take());
        // SAFETY: `shared` is not used again after this line.
        let shared = unsafe { ManuallyDrop::take(&mut self.shared) };
        if !shared.may_wait_here() {
            // Never wait for threads that do not exist (fork), were given up on (exit) or are
            // this very thread (dropped from inside the sink).
            std::mem::forget(shared);
            return;
        }
        Python::attach(|py| {
            let interrupted = shared.close_unattended(py);
            shared.stop_runner(py);
            if shared.sink.abandoned.load(AtomicOrdering::Acquire) {
                std::mem::forget(shared);
            } else {
                py.detach(move || drop(shared));
            }
            if interrupted {
                interrupt_again();
            }
        });
    }
}

/// Interpreter-exit hook (registered with `atexit` by `conveyor/__init__.py`): closes every
/// live conveyor within its `drain_timeout` and warns about what was left.
#[pyfunction]
pub(crate) fn _shutdown_at_exit(py: Python<'_>) -> PyResult<()> {
    EXITING.store(true, AtomicOrdering::Release);
    let live = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|e| e.into_inner()));
    let mut first_error = None;
    let mut interrupted = false;
    for weak in live {
        let Some(shared) = weak.upgrade() else {
            continue;
        };
        if same_process(shared.fork_gen) && !shared.closed.load(AtomicOrdering::Acquire) {
            if !interrupted {
                match shared.close_at_exit(py) {
                    Ok(_) => {}
                    // The warning below says what the interrupt did; raised from here, Python
                    // would only print it as an ignored exception.
                    Err(err) if err.is_instance_of::<PyKeyboardInterrupt>(py) => interrupted = true,
                    Err(err) => {
                        first_error.get_or_insert(err);
                    }
                }
            }
            // One Ctrl-C stops the whole exit: conveyors not drained yet are not waited for.
            if interrupted {
                if let Err(err) = shared.give_up_at_exit(py) {
                    first_error.get_or_insert(err);
                }
            }
        }
        // Never let the exit hook run a conveyor's last drop: it must not wait again.
        std::mem::forget(shared);
    }
    first_error.map_or(Ok(()), Err)
}

/// `os.register_at_fork(after_in_child=...)` hook: marks every existing conveyor and journal as
/// inherited.
#[pyfunction]
pub(crate) fn _after_fork_in_child() {
    FORK_GEN.fetch_add(1, AtomicOrdering::Relaxed);
}

/// Called by an async sink's loop thread on start (see `conveyor._support.LoopThread`).
#[pyfunction]
pub(crate) fn _mark_sink_thread(id: u64) {
    sink::mark_sink_thread(id);
}
