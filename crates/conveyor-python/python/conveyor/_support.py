"""Python-side helpers the Rust extension calls into.

Everything here is off the hot path: ``send`` is pure Rust. What lives here is what is clearer in
Python: the event-loop thread that runs ``async def`` sinks, and the thread-backed awaitables that
let asyncio code wait for capacity, ``flush`` or ``close`` without blocking its event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import threading
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")

# The delivery an `async def` sink is running, per task (each coroutine runs in its own task, so
# concurrent deliveries of a pipelined or keyed conveyor each see their own).
CURRENT_DELIVERY: "contextvars.ContextVar[Any]" = contextvars.ContextVar("conveyor_delivery")

def is_async_callable(fn: Any) -> bool:
    """True for ``async def`` functions, partials of them and objects with an async ``__call__``."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - we want the bound method, not callable()
    return call is not None and inspect.iscoroutinefunction(call)


class LoopThread:
    """An event loop on a daemon thread, owned by one conveyor, that runs its ``async def`` sink.

    One loop per conveyor keeps coroutines of one conveyor together (so a sink can keep loop-bound
    state such as an ``aiohttp`` session in a closure) and away from the caller's event loop, which
    may block, stop or be a different loop from one ``asyncio.run`` to the next. The thread is a
    daemon so that a stuck coroutine can never keep the interpreter from exiting; the conveyor stops
    it when it closes.
    """

    def __init__(self, name: str, conveyor_id: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._conveyor_id = conveyor_id
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from . import _conveyor

        asyncio.set_event_loop(self._loop)
        # Lets the conveyor notice a coroutine that waits on its own conveyor (would never end).
        _conveyor._mark_sink_thread(self._conveyor_id)
        try:
            self._loop.run_forever()
        finally:
            # Cancel what is still running (the conveyor has given up on it) and close the loop
            # here, on its own thread, so no "unclosed event loop" warning is ever left behind.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def submit(self, fn: Callable[[Any], Any], item: Any, delivery: Any) -> "concurrent.futures.Future[Any]":
        """Start ``fn(item)`` on the loop; the returned future settles with its outcome."""
        coro = fn(item)
        if not inspect.isawaitable(coro):
            raise TypeError(
                f"the async sink {fn!r} returned {type(coro).__name__}, not an awaitable; "
                "pass an `async def` function, or a plain function for a blocking sink"
            )
        return asyncio.run_coroutine_threadsafe(_as_coroutine(coro, delivery), self._loop)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop the loop and wait (at most ``timeout`` s) for its thread; idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            self._loop.call_soon_threadsafe(self._loop.stop)
        except RuntimeError:  # already closed
            return
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


async def _as_coroutine(awaitable: Any, delivery: Any) -> Any:
    CURRENT_DELIVERY.set(delivery)  # in this task's own context: no reset needed
    return await awaitable


def _settle(loop: asyncio.AbstractEventLoop, fut: "asyncio.Future[Any]", ok: bool, value: Any) -> None:
    def set_outcome() -> None:
        if fut.done():  # cancelled while we were waiting
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    try:
        loop.call_soon_threadsafe(set_outcome)
    except RuntimeError:
        # The event loop was closed (asyncio.run returned) before the wait ended: nobody is
        # left to tell, and the outcome is still visible through receipts and stats.
        pass


def run_in_thread(
    fn: Callable[..., T], *args: Any, on_cancel: Optional[Callable[[], None]] = None
) -> "asyncio.Future[T]":
    """Run a blocking call on a fresh daemon thread and await its outcome from asyncio.

    A dedicated thread rather than the loop's default executor: these waits can last long
    (``flush`` on a slow sink) and must not starve the executor's few threads or make
    ``asyncio.run`` wait for them on exit. ``on_cancel`` runs (on the loop) if the awaiting task
    is cancelled, to tell the call that nobody waits for it any more.
    """
    loop = asyncio.get_running_loop()
    fut: "asyncio.Future[T]" = loop.create_future()
    if on_cancel is not None:
        stop = on_cancel
        fut.add_done_callback(lambda f: stop() if f.cancelled() else None)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task, never lost in the thread
            _settle(loop, fut, False, exc)
        else:
            _settle(loop, fut, True, result)

    threading.Thread(target=run, name="conveyor-wait", daemon=True).start()
    return fut


class Sending:
    """What ``asend`` returns when its item must wait: for room in a full queue, or under
    ``durability="sync"`` for its commit; and what ``await_committed`` returns for an item not
    committed yet. Awaiting it never blocks the event loop.

    ``pending`` (``asend.rs``) is the engine's send, polled here on the loop's thread. Between
    polls this waits on a plain future, which the package's one dispatcher thread resolves once
    the send may progress.

    While it waits for room, only a poll can accept the item, and the poll that does returns
    straight from here, so a cancellation (which arrives between polls) always finds the item
    not accepted, and dropping the send makes sure it never will be: ``CancelledError`` means
    not sent. Once the item is accepted, a cancellation cannot take it back, so the task returns
    the receipt instead, at once and without waiting for the commit, as for an item the call
    itself accepted (``Ready``). Hence the coroutine protocol by hand: an ``async def`` cancelled
    before it first runs raises without running any of its code. ``await_committed`` accepted
    nothing, so its cancellation raises, and drops the wait.
    """

    __slots__ = ("_pending",)

    def __init__(self, pending: Any) -> None:
        self._pending = pending

    def __await__(self) -> "Sending":
        return self

    def __iter__(self) -> "Sending":
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, _value: Any) -> Any:
        pending = self._pending
        try:
            loop = asyncio.get_running_loop()
            while True:
                receipt = pending.poll()
                if receipt is not None:
                    raise StopIteration(receipt)
                woken: "asyncio.Future[None]" = loop.create_future()
                if pending.wake_later(_resumer(loop, woken)):
                    # What `await woken` yields: the task resumes us once it is done.
                    woken._asyncio_future_blocking = True
                    return woken
        except BaseException:
            pending.cancel()
            raise

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        error = typ if val is None else val
        if isinstance(error, type):
            error = error()
        accepted = self._pending.accepted()
        self._pending.cancel()
        if accepted is not None and isinstance(error, asyncio.CancelledError):
            raise StopIteration(accepted)
        raise error

    def close(self) -> None:
        self._pending.cancel()


def _resumer(loop: asyncio.AbstractEventLoop, woken: "asyncio.Future[None]") -> Callable[[], None]:
    """What the dispatcher thread calls to resume a ``Sending`` waiting on ``woken``."""

    def resume() -> None:
        try:
            loop.call_soon_threadsafe(_resolve, woken)
        except RuntimeError:
            # The event loop was closed (asyncio.run returned) while the send waited: nobody
            # is left to resume, and the send was dropped with its coroutine.
            pass

    return resume


def _resolve(woken: "asyncio.Future[None]") -> None:
    if not woken.done():  # cancelled while the wake-up was on its way
        woken.set_result(None)


async def aflush(conveyor: Any, timeout: Optional[float]) -> bool:
    # A cancelled aflush (a `wait_for` timeout) stops its thread's wait: repeated ones on a
    # stuck sink would otherwise each leave a thread waiting for good.
    stop = threading.Event()
    return await run_in_thread(conveyor._flush_unless, timeout, stop, on_cancel=stop.set)


async def aclose(conveyor: Any, timeout: Optional[float]) -> Any:
    return await run_in_thread(conveyor.close, timeout)


async def aexit(conveyor: Any) -> None:
    await run_in_thread(conveyor._close_on_exit)


async def aenter(conveyor: T) -> T:
    return conveyor


class ReceiptFuture(concurrent.futures.Future[Any]):
    """The ``concurrent.futures.Future`` behind a receipt: it cannot be cancelled either.

    ``asyncio.wrap_future`` cancels the future it wraps when the awaiting task is cancelled, as
    ``asyncio.wait_for(receipt, t)`` does when ``t`` passes. A cancelled future would fire the
    receipt's callbacks while the item is still being delivered and could never take its real
    outcome; the item is accepted, so like ``Receipt.cancel()`` this refuses, as a running
    ``Future`` does.
    """

    def cancel(self) -> bool:
        return False


def new_future() -> "concurrent.futures.Future[Any]":
    return ReceiptFuture()


def receipt_await(receipt: Any) -> Any:
    """``await receipt``: the receipt's lazily made ``concurrent.futures.Future`` wrapped for asyncio."""
    return asyncio.wrap_future(receipt.future()).__await__()


def call_done_callback(fn: Callable[[Any], Any], receipt: Any) -> Callable[[Any], None]:
    """Adapt a user callback to ``Future.add_done_callback``: it gets the receipt, not our future."""

    def callback(_future: Any) -> None:
        fn(receipt)

    return callback
