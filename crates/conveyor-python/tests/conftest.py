"""Shared helpers for the conveyor test suite."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator, List

import pytest

import conveyor


class Recorder:
    """A sink that records what it was given, optionally slowly, failing on demand."""

    def __init__(self, delay: float = 0.0, fail: Callable[[Any, int], bool] | None = None) -> None:
        self.delay = delay
        self.fail = fail
        self.items: List[Any] = []
        self.calls: List[Any] = []
        self.attempts: dict = {}
        self.lock = threading.Lock()

    def __call__(self, item: Any) -> Any:
        with self.lock:
            self.calls.append(item)
            attempt = self.attempts.get(item, 0) + 1
            self.attempts[item] = attempt
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None and self.fail(item, attempt):
            raise ValueError(f"sink failed on {item!r} (attempt {attempt})")
        with self.lock:
            self.items.append(item)
        return ("ok", item)


@pytest.fixture
def make() -> Iterator[Callable[..., conveyor.Conveyor]]:
    """Creates conveyors and closes them when the test ends, so none is left to the GC."""
    made: List[conveyor.Conveyor] = []

    def factory(sink: Callable[..., Any], **options: Any) -> conveyor.Conveyor:
        c = conveyor.Conveyor(sink, **options)
        made.append(c)
        return c

    yield factory
    for c in made:
        if not c.closed:
            report = c.close(timeout=10)
            assert report.left == 0, f"test left {report.left} item(s) in {c!r}"


def holding_sink(gate: threading.Event, delivered: List[Any]) -> Callable[[Any], None]:
    """A sink that records what it was given, holding the item "hold" until `gate` opens."""

    def sink(item: Any) -> None:
        if item == "hold":
            gate.wait(30)
        delivered.append(item)

    return sink


async def fill_up(c: conveyor.Conveyor, hold: Any = "hold", fill: Any = "fill") -> None:
    """Fills a capacity-1 conveyor whose sink holds `hold` (as a `holding_sink` does): `hold`
    in the sink, `fill` queued."""
    await c.asend(hold)
    while c.stats.in_flight == 0:
        await asyncio.sleep(0.001)
    await c.asend(fill)


def interrupt_main_after(seconds: float) -> threading.Timer:
    """Sends a real SIGINT to this process after `seconds`, as Ctrl-C would.

    Start it inside the `pytest.raises(KeyboardInterrupt)` block, right before the call it
    interrupts: on a busy machine the SIGINT may land before that call waits, and outside the
    block its KeyboardInterrupt would escape and stop the whole test session.
    """
    timer = threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.daemon = True
    timer.start()
    return timer


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter with warnings shown (not turned into errors)."""
    return subprocess.run(
        [sys.executable, "-W", "default", "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def in_forked_child(body: Callable[[], List[str]]) -> List[str]:
    """Runs `body` in a child made with `os.fork()` and returns the lines it returned, once the
    child has exited 0. The child never returns into pytest: it leaves with `os._exit`."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.write(write_fd, "\n".join(body()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return report.splitlines()
