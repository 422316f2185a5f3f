"""``SerialExecutor``: a drop-in for ``ThreadPoolExecutor(max_workers=1)`` built on a conveyor."""

from __future__ import annotations

import concurrent.futures
import numbers
import threading
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar

from ._conveyor import Conveyor
from ._errors import Closed, QueueFull

T = TypeVar("T")

_Call = Tuple["concurrent.futures.Future[Any]", Callable[..., Any], Tuple[Any, ...], Dict[str, Any]]


class _Runner:
    """The executor's sink: runs each call and settles its future.

    It keeps the futures of the calls not started yet, so that ``shutdown(cancel_futures=True)``
    can cancel them at once, as ``ThreadPoolExecutor`` does, and so that those the conveyor gives
    up on are cancelled rather than left pending. Dict operations are atomic under the GIL.
    """

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending: Dict[int, "concurrent.futures.Future[Any]"] = {}

    def __call__(self, call: _Call) -> None:
        future, fn, args, kwargs = call
        self.pending.pop(id(future), None)
        # Same protocol as ThreadPoolExecutor's worker: a future cancelled while queued is
        # skipped, and whatever fn raises goes to its future, never to the conveyor (so it is
        # never retried).
        try:
            if not future.set_running_or_notify_cancel():
                return
        except RuntimeError:
            return  # cancelled and notified by abandoned() meanwhile
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def abandoned(self) -> None:
        """The conveyor gave up on the calls not started (its drain at garbage collection or
        interpreter exit reached drain_timeout, or Ctrl-C cut it short): they will never run,
        and a future left pending would hang whoever waits for its result. The conveyor's
        warning says how many; their futures are cancelled, as shutdown(cancel_futures=True)
        would."""
        for future in list(self.pending.values()):
            # Notified too: concurrent.futures.wait() and as_completed() miss a bare cancel().
            if future.cancel():
                future.set_running_or_notify_cancel()


class SerialExecutor(concurrent.futures.Executor):
    """Runs submitted calls one at a time, in submission order, on a thread the executor owns.

    A drop-in replacement for ``ThreadPoolExecutor(max_workers=1)`` (``submit``, ``map``,
    ``shutdown(wait, cancel_futures=...)``, ``with``), with what that class lacks:

    * bounded memory: at most ``capacity`` calls wait; ``submit`` then waits for room (and stays
      interruptible with Ctrl-C) instead of growing an unbounded queue;
    * a bounded exit: at interpreter exit (or when it is garbage-collected without
      ``shutdown()``), queued calls get ``drain_timeout`` seconds to run; whatever is left is
      reported in a ``RuntimeWarning`` instead of hanging the exit, never runs, and has its
      future cancelled.

    Args:
        max_workers: ``None`` or ``1``, so that ``SerialExecutor(1)`` means what
            ``ThreadPoolExecutor(1)`` does; any other number is a ``ValueError``, anything else
            a ``TypeError``.
        capacity: how many submitted calls may wait to run (the running one not counted).
        drain_timeout: seconds the interpreter-exit drain waits before reporting what is left.
    """

    def __init__(
        self, max_workers: Optional[int] = None, *, capacity: int = 10_000, drain_timeout: float = 30.0
    ) -> None:
        if max_workers is not None and not isinstance(max_workers, numbers.Real):
            # As ThreadPoolExecutor("1") raises TypeError (and takes 1.0): the type is wrong.
            raise TypeError(f"max_workers={max_workers!r}: expected None or 1")
        if max_workers is not None and max_workers != 1:
            raise ValueError(
                f"max_workers={max_workers!r}: a SerialExecutor runs one call at a time; "
                "use ThreadPoolExecutor for parallel calls"
            )
        runner = _Runner()
        self._pending = runner.pending  # futures of the calls not started yet
        self._capacity = capacity
        self._conveyor = Conveyor(runner, capacity=capacity, drain_timeout=drain_timeout, name="SerialExecutor")
        self._conveyor._on_abandon(runner.abandoned)
        self._shutdown_lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> "concurrent.futures.Future[T]":
        """Schedule ``fn(*args, **kwargs)``; returns a ``concurrent.futures.Future``.

        Raises:
            RuntimeError: after ``shutdown()``, or once the interpreter-exit drain has closed the
                executor, like ``ThreadPoolExecutor``.
        """
        future: "concurrent.futures.Future[T]" = concurrent.futures.Future()
        call = (future, fn, args, kwargs)
        try:
            with self._shutdown_lock:
                if self._shutdown:
                    raise RuntimeError("cannot schedule new futures after shutdown")
                # Sent under the lock so shutdown() cannot close the conveyor between the check
                # and the send (which would turn a valid submit into a conveyor.Closed error).
                self._pending[id(future)] = future
                receipt = self._conveyor._send_wait(call, None, None, 0.0)
            if receipt is None:
                # The queue is full: wait for room outside the lock so shutdown() is not held up.
                try:
                    self._conveyor.send(call)
                except QueueFull:
                    # The conveyor refuses to wait for room from inside its own sink, which is
                    # one of our tasks: say it in an executor's words.
                    raise QueueFull(
                        f"SerialExecutor is full (capacity={self._capacity}) and submit() was called "
                        "from inside one of its own tasks: waiting for room would wait for that very "
                        "task to finish; raise capacity, or submit from outside the executor"
                    ) from None
        except Closed as exc:
            # Closed by shutdown() while waiting for room, or by conveyor's interpreter-exit
            # hook (which does not go through shutdown()): ThreadPoolExecutor says RuntimeError.
            self._pending.pop(id(future), None)
            raise RuntimeError("cannot schedule new futures after shutdown") from exc
        except BaseException:  # QueueFull from inside a task, KeyboardInterrupt while waiting
            self._pending.pop(id(future), None)
            raise
        return future

    def __repr__(self) -> str:
        # A snapshot of counters, like concurrent.futures.Future's repr: it never waits.
        if not hasattr(self, "_shutdown"):
            # Its constructor raised (a traceback shows such half-made objects too).
            return "<conveyor.SerialExecutor not started>"
        stats = self._conveyor.stats
        state = ", shutdown" if self._shutdown or self._conveyor.closed else ""
        return f"<conveyor.SerialExecutor running={stats.in_flight}, pending={stats.queued}{state}>"

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting calls; with ``wait``, return once every accepted call has run.

        ``cancel_futures=True`` cancels the calls that have not started yet.
        """
        with self._shutdown_lock:
            self._shutdown = True
            if cancel_futures:
                for future in list(self._pending.values()):
                    future.cancel()
        if wait:
            try:
                self._conveyor.close()
            except RuntimeError:
                # Raised only when called from inside the conveyor's own sink: one of our tasks.
                raise RuntimeError(
                    "shutdown(wait=True) was called from inside one of this executor's own tasks: "
                    "it would wait for that very task to finish; use shutdown(wait=False) there "
                    "(the accepted calls still run)"
                ) from None
        else:
            # Like ThreadPoolExecutor: return now, let the accepted calls run to the end.
            threading.Thread(target=self._conveyor.close, name="SerialExecutor-shutdown", daemon=True).start()
