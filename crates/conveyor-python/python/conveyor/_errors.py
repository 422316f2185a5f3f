"""Exception classes raised by conveyor.

They are plain Python classes (not defined in Rust) so they can carry attributes, be subclassed
and pickled like any other exception; the Rust extension looks them up here when it raises.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

__all__ = [
    "ConveyorError",
    "QueueFull",
    "Closed",
    "DeliveryFailed",
    "Dropped",
    "JournalError",
    "PermanentError",
    "RetryAfter",
]


class ConveyorError(Exception):
    """Base class of every error conveyor raises to its caller."""


class QueueFull(ConveyorError):
    """``send`` found the queue full and the backpressure policy is ``"reject"``.

    Also raised, instead of waiting forever, when a sink sends to its own full conveyor: the sink
    would be waiting for room that only it can free.
    """


class Closed(ConveyorError):
    """The conveyor no longer accepts items: it was closed, or it belongs to the parent process
    of an ``os.fork()``. A receipt raises it for an item that was still pending when the conveyor
    shut down: not delivered, or, if its sink call was still running then, not known to be (the
    message says which; ``stats`` count that call once it ends)."""


class Dropped(ConveyorError):
    """The item was dropped by the ``"drop_newest"`` / ``"drop_oldest"`` backpressure policy."""


class JournalError(ConveyorError):
    """The journal cannot be used: it is open in another process, damaged, not a journal, or
    cannot be written (disk full: the item was not accepted, and sends succeed again once the
    journal can be written). The message names the file and what to do."""


class DeliveryFailed(ConveyorError):
    """The sink failed on this item after every allowed attempt.

    Attributes:
        attempts: how many times the sink was called with the item.
        last_exception: the exception the sink raised on the last attempt (also ``__cause__``),
            or ``None`` when the failure did not come from a Python exception.
        seq: the item's sequence number (1 for the first item sent to the conveyor).
        status: for ``Conveyor.http``, the HTTP status of the last response (``404``, ``503``),
            or ``None`` when no response came back (connection refused, timeout) or the sink
            is not HTTP.
    """

    def __init__(
        self,
        message: str,
        *,
        attempts: int = 0,
        last_exception: Optional[BaseException] = None,
        seq: Optional[int] = None,
        status: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_exception = last_exception
        self.seq = seq
        self.status = status
        if last_exception is not None:
            self.__cause__ = last_exception

    def __setstate__(self, state: Optional[Dict[str, object]]) -> None:
        # Pickle and copy restore the attributes but never __cause__: link it again.
        super().__setstate__(state)
        if self.last_exception is not None:
            self.__cause__ = self.last_exception


class PermanentError(Exception):
    """Raise this from a sink (or ``raise ... from PermanentError()``) to fail the item at once.

    Any other exception is retried when ``retries`` is set. Use it for errors that cannot
    succeed on a later attempt, such as a rejected payload (HTTP 400).
    """


class RetryAfter(Exception):
    """Raise this from a sink to retry the item no sooner than ``seconds`` from now.

    Useful for rate-limit answers such as HTTP 429 with a ``Retry-After`` header. Counts as an
    attempt; when no attempts are left the item fails like any other error. A wait longer than
    an hour (or than ``max_backoff``, if that is longer) is cut to it, so that a server asking
    for days does not stall the lane for good.
    """

    def __init__(self, seconds: float, message: str = "") -> None:
        if seconds < 0:
            raise ValueError(f"RetryAfter(seconds={seconds!r}): seconds must be >= 0")
        super().__init__(message or f"retry after {seconds} s")
        self.seconds = float(seconds)

    def __reduce__(self) -> Tuple[object, ...]:
        # ``args`` holds the message only: rebuild from ``seconds`` and the message (pickle and
        # copy would otherwise call ``RetryAfter(message)``).
        return (type(self), (self.seconds, *self.args[:1]), self.__dict__)
