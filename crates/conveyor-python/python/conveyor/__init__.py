"""Deliver items to a slow external service strictly in order, without blocking the producer.

>>> import conveyor
>>> delivered = []
>>> with conveyor.Conveyor(delivered.append) as c:   # any callable; blocking is fine
...     for item in ["a", "b", "c"]:
...         receipt = c.send(item)                   # returns at once
>>> delivered
['a', 'b', 'c']

``Conveyor(sink, ...)`` options (all keyword-only):

=================  ============  =================================================================
option             default       meaning
=================  ============  =================================================================
``ordering``       ``"strict"``  ``"strict"``: one item at a time, in order. ``"pipelined"``: start
                                 in order, up to ``in_flight`` (8) at once. ``"keyed"``: strict per
                                 ``key``, up to ``concurrency`` (64) keys at once.
``capacity``       10_000        queued items (in-flight ones not counted)
``backpressure``   ``"block"``   on a full queue: ``"block"`` (wait for room), ``"reject"`` (raise
                                 ``QueueFull``), ``"drop_newest"``, ``"drop_oldest"``
``retries``        0             extra attempts after a sink exception (``PermanentError`` is
                                 never retried)
``backoff``        0.1           retry delay in seconds, doubling: retry n waits a random time
                                 between half and all of ``backoff * 2**(n-1)`` (capped)
``max_backoff``    None          cap on that doubling delay in seconds; ``None``: 30 s
``on_failure``     ``"skip"``    after the last attempt: ``"skip"`` to the next item, or
                                 ``"pause"`` the lane until ``resume(key)``
``rate_limit``     None          at most this many sink calls started per second
``drain_timeout``  30.0          seconds that interpreter exit / ``with`` exit / garbage
                                 collection wait for accepted items before warning about them
``name``           None          shown in ``repr``, in warnings and in the failure log
``journal``        None          path of a journal file (SQLite): accepted items survive a crash
                                 and are delivered after a restart; items must be JSON-serialisable
``durability``     5 ms window   with a journal: commit window in seconds, or ``"sync"``
=================  ============  =================================================================

A sink may be an ``async def`` function: it then runs on an event loop owned by the conveyor.

An item that fails for good (a ``PermanentError``, or any exception on its last attempt) is logged
as a WARNING, with its exception, on ``logging.getLogger("conveyor")``, even if nobody reads its
receipt; without logging configured it shows on stderr. Silence it with
``logging.getLogger("conveyor").setLevel(logging.ERROR)``. At interpreter exit, a drain that lasts
more than a second says on stderr how many items it waits for, how long at most, and that Ctrl-C
stops the wait.

``Journal(path, read_only=False)`` opens a conveyor's journal file without delivering anything, to
look at its pending items, paused lanes and dead letters and to repair them (after a crash, or
with ``read_only=True`` while the conveyor runs).
"""

from __future__ import annotations

import atexit as _atexit
import os as _os

from typing import Optional

from . import _conveyor, _support
from ._conveyor import (
    CloseReport,
    Conveyor,
    DeadLetter,
    Delivery,
    HttpReply,
    Journal,
    JournalStatus,
    LaneStatus,
    Receipt,
    Stats,
    __version__,
)
from ._errors import (
    Closed,
    ConveyorError,
    DeliveryFailed,
    Dropped,
    JournalError,
    PermanentError,
    QueueFull,
    RetryAfter,
)
from ._executor import SerialExecutor

__all__ = [
    "CloseReport",
    "Closed",
    "Conveyor",
    "ConveyorError",
    "DeadLetter",
    "Delivery",
    "DeliveryFailed",
    "Dropped",
    "HttpReply",
    "Journal",
    "JournalError",
    "JournalStatus",
    "LaneStatus",
    "PermanentError",
    "QueueFull",
    "Receipt",
    "RetryAfter",
    "SerialExecutor",
    "Stats",
    "__version__",
    "current_delivery",
]


def current_delivery() -> Optional[Delivery]:
    """The item the calling sink is delivering: ``seq``, ``attempt``, ``key``, ``idempotency_key``.

    Call it from inside a sink (blocking or ``async def``); returns ``None`` anywhere else. Send
    ``idempotency_key`` along (e.g. as an ``Idempotency-Key`` header) so the receiver can drop
    the duplicate a retry after a lost answer produces.
    """
    delivery = _conveyor._current_delivery()
    if delivery is None:
        delivery = _support.CURRENT_DELIVERY.get(None)
    return delivery

# Drain live conveyors at interpreter exit within their drain_timeout, and report what is left.
_atexit.register(_conveyor._shutdown_at_exit)

# After os.fork() the child has none of the parent's delivery threads: mark inherited conveyors
# so that using them raises Closed instead of hanging.
if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_conveyor._after_fork_in_child)
