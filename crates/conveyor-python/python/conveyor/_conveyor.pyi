"""Type stubs for the Rust extension module ``conveyor._conveyor``."""

import concurrent.futures
import os
import threading
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, final, overload

from typing_extensions import Self

_T = TypeVar("_T")
_R = TypeVar("_R")

__all__ = [
    "CloseReport",
    "Conveyor",
    "DeadLetter",
    "Delivery",
    "HttpReply",
    "Journal",
    "JournalStatus",
    "LaneStatus",
    "Receipt",
    "Stats",
    "__version__",
    "_after_fork_in_child",
    "_current_delivery",
    "_mark_sink_thread",
    "_shutdown_at_exit",
]
__version__: str

@final
class Stats:
    @property
    def accepted(self) -> int: ...
    @property
    def delivered(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def retried(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def paused(self) -> int: ...
    def as_dict(self) -> dict[str, int]: ...
    def __eq__(self, other: object) -> bool: ...

@final
class CloseReport:
    @property
    def left(self) -> int: ...
    @property
    def drained(self) -> bool: ...
    @property
    def stats(self) -> Stats: ...

@final
class DeadLetter:
    @property
    def seq(self) -> int: ...
    @property
    def lane(self) -> str: ...
    @property
    def key(self) -> str | None: ...
    @property
    def item(self) -> Any: ...
    @property
    def error(self) -> str: ...
    @property
    def attempts(self) -> int: ...
    @property
    def failed_at(self) -> float: ...

@final
class LaneStatus:
    """One lane of a ``JournalStatus``."""

    @property
    def lane(self) -> str:
        """The key of a keyed conveyor's lane, ``""`` for the single lane of the others."""
    @property
    def pending(self) -> int:
        """Items accepted and not settled in this lane."""
    @property
    def paused(self) -> str | None:
        """The error of the item that paused the lane (``""`` if none was recorded), or
        ``None`` when the lane is not paused."""
    def __eq__(self, other: object) -> bool: ...

@final
class JournalStatus:
    """What a journal holds, from ``Journal.status()``: one consistent snapshot."""

    @property
    def pending(self) -> int:
        """Items accepted and not settled (delivered, failed or dropped), all lanes together."""
    @property
    def dead_letters(self) -> int:
        """Dead letters held."""
    @property
    def lanes(self) -> list[LaneStatus]:
        """Lanes with pending items or a pause, sorted by name."""
    @property
    def last_seq(self) -> int:
        """The highest seq handed out or reserved; the next item gets a greater one."""
    @property
    def cursor(self) -> int | None:
        """The input position last stored, or ``None``."""
    @property
    def file_bytes(self) -> int:
        """Bytes on disk: the database and its write-ahead log."""
    @property
    def keyed(self) -> bool | None:
        """Whether the Conveyor that last used the journal was keyed (``True``) or strict or
        pipelined (``False``); ``None`` if none used it yet."""
    @property
    def id(self) -> str:
        """The journal's id, the prefix of every ``idempotency_key``."""
    def __eq__(self, other: object) -> bool: ...

@final
class Journal:
    """A Conveyor's journal file, opened to inspect and repair it without delivering anything.

    ``read_only=False`` takes the file for itself (refused while a Conveyor uses it, and no
    Conveyor can open it until ``close()``); ``read_only=True`` takes nothing and shows what a
    running Conveyor has committed so far, and its changing methods raise ``JournalError``. A
    path with no journal raises ``JournalError``: it never creates one. Use it as a context
    manager, or call ``close()``; after that every method raises ``JournalError``. Inherited
    through ``os.fork()`` it stays the parent's: in the child every method raises
    ``JournalError`` and ``close()`` does nothing; open it again there. The child does not keep
    the file from the parent, which may close it and open it again while the child runs.
    """

    def __new__(cls, path: str | os.PathLike[str], *, read_only: bool = False) -> Journal: ...
    @property
    def path(self) -> str:
        """The journal file's path, as given."""
    @property
    def id(self) -> str:
        """The journal's id: the prefix of every item's ``idempotency_key``."""
    @property
    def read_only(self) -> bool:
        """Whether it was opened with ``read_only=True``."""
    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
    def status(self) -> JournalStatus:
        """Pending items (all lanes and per lane), paused lanes, dead letters, last seq, cursor,
        size on disk."""
    def dead_letters(self) -> list[DeadLetter]:
        """The dead letters, oldest first."""
    def retry_dead(self, seq: int) -> int:
        """Puts dead letter ``seq`` back at the end of its lane; returns its new seq."""
    def discard_dead(self, seq: int) -> None:
        """Deletes dead letter ``seq`` for good."""
    def resume(self, key: str = "") -> bool:
        """Clears the pause on the lane of ``key`` (``""`` for the one lane of a strict or
        pipelined conveyor); returns ``False`` if it was not paused."""
    def cursor(self) -> int | None:
        """The input position last stored, or ``None``."""
    def set_cursor(self, cursor: int) -> None:
        """Stores the input position where the next run resumes reading its input."""
    def close(self) -> None:
        """Closes the file and releases it for a Conveyor; does nothing if already closed, or
        in a forked child (the file stays the parent's)."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> None: ...

@final
class Delivery:
    @property
    def seq(self) -> int: ...
    @property
    def attempt(self) -> int: ...
    @property
    def key(self) -> str | None: ...
    @property
    def idempotency_key(self) -> str: ...

@final
class HttpReply:
    @property
    def status(self) -> int: ...
    @property
    def body(self) -> bytes: ...
    @property
    def truncated(self) -> bool: ...
    def text(self) -> str: ...
    def json(self) -> Any: ...

@final
class Receipt(Generic[_R]):
    @property
    def seq(self) -> int: ...
    def result(self, timeout: float | None = None) -> _R: ...
    def exception(self, timeout: float | None = None) -> BaseException | None: ...
    def done(self) -> bool: ...
    def cancel(self) -> bool: ...
    def cancelled(self) -> bool: ...
    def running(self) -> bool: ...
    def add_done_callback(self, func: Callable[[Receipt[_R]], object]) -> None: ...
    def future(self) -> concurrent.futures.Future[_R]: ...
    def __await__(self) -> Generator[Any, None, _R]: ...
    @classmethod
    def __class_getitem__(cls, item: Any) -> types.GenericAlias: ...

@final
class Conveyor(Generic[_T, _R]):
    @overload
    def __new__(
        cls,
        sink: Callable[[_T], Awaitable[_R]],
        *,
        ordering: Literal["strict", "pipelined", "keyed"] = "strict",
        in_flight: int | None = None,
        concurrency: int | None = None,
        capacity: int = 10_000,
        backpressure: Literal["block", "reject", "drop_newest", "drop_oldest"] = "block",
        retries: int = 0,
        backoff: float = 0.1,
        max_backoff: float | None = None,
        on_failure: Literal["skip", "pause"] = "skip",
        rate_limit: int | None = None,
        drain_timeout: float = 30.0,
        name: str | None = None,
        journal: str | os.PathLike[str] | None = None,
        durability: float | Literal["sync"] | None = None,
    ) -> Conveyor[_T, _R]: ...
    @overload
    def __new__(
        cls,
        sink: Callable[[_T], _R],
        *,
        ordering: Literal["strict", "pipelined", "keyed"] = "strict",
        in_flight: int | None = None,
        concurrency: int | None = None,
        capacity: int = 10_000,
        backpressure: Literal["block", "reject", "drop_newest", "drop_oldest"] = "block",
        retries: int = 0,
        backoff: float = 0.1,
        max_backoff: float | None = None,
        on_failure: Literal["skip", "pause"] = "skip",
        rate_limit: int | None = None,
        drain_timeout: float = 30.0,
        name: str | None = None,
        journal: str | os.PathLike[str] | None = None,
        durability: float | Literal["sync"] | None = None,
    ) -> Conveyor[_T, _R]: ...
    @classmethod
    def __class_getitem__(cls, item: Any) -> types.GenericAlias: ...
    @staticmethod
    def http(
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        method: str = "POST",
        timeout: float = 30.0,
        cafile: str | os.PathLike[str] | None = None,
        max_reply_body: int | None = 16_777_216,
        ordering: Literal["strict", "pipelined", "keyed"] = "strict",
        in_flight: int | None = None,
        concurrency: int | None = None,
        capacity: int = 10_000,
        backpressure: Literal["block", "reject", "drop_newest", "drop_oldest"] = "block",
        retries: int = 0,
        backoff: float = 0.1,
        max_backoff: float | None = None,
        on_failure: Literal["skip", "pause"] = "skip",
        rate_limit: int | None = None,
        drain_timeout: float = 30.0,
        name: str | None = None,
        journal: str | os.PathLike[str] | None = None,
        durability: float | Literal["sync"] | None = None,
    ) -> Conveyor[Any, HttpReply]: ...
    def send(self, item: _T, *, key: str | None = None, cursor: int | None = None) -> Receipt[_R]: ...
    def try_send(
        self, item: _T, *, key: str | None = None, cursor: int | None = None
    ) -> Receipt[_R]: ...
    def asend(
        self, item: _T, *, key: str | None = None, cursor: int | None = None
    ) -> Coroutine[Any, Any, Receipt[_R]]: ...
    def _send_wait(
        self, item: _T, key: str | None, cursor: int | None, timeout: float
    ) -> Receipt[_R] | None: ...
    def flush(self, timeout: float | None = None) -> bool: ...
    def aflush(self, timeout: float | None = None) -> Awaitable[bool]: ...
    def _flush_unless(self, timeout: float | None, stop: threading.Event) -> bool: ...
    def wait_committed(self, receipt: Receipt[_R], timeout: float | None = None) -> bool:
        """Waits until the journal holds ``receipt``'s item on disk, for at most ``timeout``
        seconds (``None``: as long as it takes); ``True`` once it does, ``False`` at the timeout.

        With the default batched durability one sender can wait for one item while other sends
        stay fire-and-forget; it has the journal commit now rather than when its window ends.
        ``True`` at once without a journal, for a settled item, and after ``close()``. While the
        journal cannot be written it keeps waiting; Ctrl-C interrupts it. ``ValueError`` for a
        receipt another conveyor returned.

        >>> receipt = c.send(order)
        >>> if c.wait_committed(receipt, timeout=5):
        ...     acknowledge(order)  # it survives a crash from here on
        """
    def await_committed(self, receipt: Receipt[_R]) -> Coroutine[Any, Any, bool]:
        """``wait_committed`` for asyncio code, without blocking the event loop and without a
        timeout of its own: bound it with ``asyncio.wait_for``. Cancelling it leaves nothing
        waiting.

        >>> receipt = await c.asend(order)
        >>> await asyncio.wait_for(c.await_committed(receipt), timeout=5)
        True
        """
    def close(self, timeout: float | None = None) -> CloseReport: ...
    def aclose(self, timeout: float | None = None) -> Awaitable[CloseReport]: ...
    def _close_on_exit(self) -> CloseReport: ...
    def _on_abandon(self, hook: Callable[[], object]) -> None: ...
    @property
    def stats(self) -> Stats: ...
    @property
    def closed(self) -> bool: ...
    @property
    def name(self) -> str: ...
    def paused(self) -> list[str]: ...
    def resume(self, key: str = "") -> bool: ...
    def dead_letters(self) -> list[DeadLetter]: ...
    def retry_dead(self, seq: int) -> Receipt[_R]: ...
    def discard_dead(self, seq: int) -> None: ...
    def cursor(self) -> int | None: ...
    def set_cursor(self, cursor: int) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> None: ...
    def __aenter__(self) -> Awaitable[Self]: ...
    def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> Awaitable[None]: ...

def _shutdown_at_exit() -> None: ...
def _after_fork_in_child() -> None: ...
def _mark_sink_thread(id: int) -> None: ...
def _current_delivery() -> Delivery | None: ...
