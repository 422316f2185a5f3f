"""Interpreter exit drains within a bounded deadline and reports leftovers; fork is safe."""

from __future__ import annotations

import asyncio
import os
import re
import textwrap
import threading
import time

import pytest

import conveyor

from conftest import Recorder, fill_up, holding_sink, in_forked_child, run_python


def wait_for_child(pid: int, timeout: float, hung: str) -> None:
    """Waits for a forked child to exit 0; kills it and fails with `hung` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail(hung)
        time.sleep(0.005)


def assert_exits_cleanly(code: str, left: str, runs: int = 1) -> None:
    """Runs `code` (which prints "exiting" last) `runs` times in a fresh interpreter: each must
    exit 0 with no fatal error, and warn about what the exit drain left (`left`, a regex). A
    thread the finalizing interpreter ends must not take the process down with it."""
    for _ in range(runs):
        proc = run_python(code)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "exiting"
        assert "Fatal" not in proc.stderr and "FATAL" not in proc.stderr, proc.stderr
        assert re.search(left, proc.stderr), proc.stderr


def assert_prints_ok(code: str) -> None:
    """Runs `code` in a fresh interpreter: it must exit 0, print "ok" and nothing else, and
    write nothing to stderr (no warning, no unraisable exception)."""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert proc.stderr == ""


def test_exit_right_after_sending_delivers_everything():
    proc = run_python(
        textwrap.dedent(
            """
            import time, conveyor
            def send_to_space(item):
                time.sleep(0.05)
                print("sent", item, flush=True)
            c = conveyor.Conveyor(send_to_space)
            for n in range(3):
                c.send(n)
            print("loop done", flush=True)
            """
        )
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["loop done", "sent 0", "sent 1", "sent 2"]
    # Done well within a second: no warning, and no notice that the exit waits.
    assert proc.stderr == ""


def test_an_exit_drain_that_lasts_says_what_it_waits_for_after_ctrl_c_in_flush():
    # Ctrl-C in flush(): the traceback prints, then the exit hook drains what is left. Without
    # a word, that looked like a hang; after a second it now says what it waits for, for how
    # long at most, and that Ctrl-C stops it.
    proc = run_python(
        textwrap.dedent(
            """
            import os, signal, threading, time, conveyor
            def send_to_space(item):
                time.sleep(0.25)
                print("sent", item, flush=True)
            c = conveyor.Conveyor(send_to_space, name="events")
            for n in range(12):
                c.send(n)
            timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
            timer.daemon = True
            timer.start()
            c.flush()
            """
        )
    )
    assert proc.stdout.split() == [word for n in range(12) for word in ("sent", str(n))]
    assert "KeyboardInterrupt" in proc.stderr, proc.stderr
    after_traceback = proc.stderr.split("KeyboardInterrupt", 1)[1]
    match = re.search(
        r'^conveyor "events" is delivering (\d+) item\(s\) left at interpreter exit: waiting up '
        r"to (\d+) s more \(drain_timeout=30 s\); press Ctrl-C to stop waiting$",
        after_traceback,
        re.M,
    )
    assert match, proc.stderr
    left, waiting = int(match.group(1)), int(match.group(2))
    assert 0 < left < 12 and 0 < waiting <= 30, match.group(0)
    assert after_traceback.count("Ctrl-C") == 1, "one line, once"
    assert "Warning" not in proc.stderr, "everything was delivered: " + proc.stderr


@pytest.mark.parametrize("interrupted", [True, False], ids=["ctrl-c", "normal"])
def test_a_with_block_ended_by_ctrl_c_says_what_its_drain_waits_for(interrupted):
    # Ctrl-C inside a `with` block: its exit drains what is left (up to drain_timeout), which
    # looked like a hang; after a second it now says so. A block that ends normally drains
    # in silence, as asked for.
    raise_it = "raise KeyboardInterrupt" if interrupted else "pass"
    proc = run_python(
        textwrap.dedent(
            f"""
            import time, conveyor
            sent = []
            def send_to_space(item):
                time.sleep(0.25)
                sent.append(item)
            try:
                with conveyor.Conveyor(send_to_space, name="events") as c:
                    for n in range(8):
                        c.send(n)
                    {raise_it}
            except KeyboardInterrupt:
                print("interrupted", flush=True)
            print("sent", len(sent), flush=True)
            """
        )
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["sent", "8"], proc.stdout
    notice = re.search(
        r'^conveyor "events" is delivering (\d+) item\(s\) left when Ctrl-C ended its `with` '
        r"block: waiting up to (\d+) s more \(drain_timeout=30 s\); press Ctrl-C to stop waiting$",
        proc.stderr,
        re.M,
    )
    if interrupted:
        assert proc.stdout.split()[0] == "interrupted"
        assert notice, proc.stderr
        assert 0 < int(notice.group(1)) < 8, notice.group(0)
        assert proc.stderr.count("press Ctrl-C") == 1, "one line, once"
    else:
        assert proc.stderr == ""


def test_ctrl_c_during_a_with_blocks_drain_gives_up_for_good():
    # Ctrl-C in the block, then Ctrl-C again while its drain waits: that means stop waiting.
    # What is left is given up there, with a warning, instead of being drained again by the
    # exit hook for a whole drain_timeout.
    proc = run_python(
        textwrap.dedent(
            """
            import os, signal, threading, time, conveyor
            sent = []
            def send_to_space(item):
                time.sleep(0.25)
                sent.append(item)
            try:
                with conveyor.Conveyor(send_to_space, name="events") as c:
                    for n in range(40):
                        c.send(n)
                    timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT))
                    timer.daemon = True
                    timer.start()
                    raise KeyboardInterrupt
            except KeyboardInterrupt:
                print("interrupted", len(sent), flush=True)
            """
        )
    )
    assert proc.returncode == 0, proc.stderr
    word, count = proc.stdout.split()
    assert word == "interrupted" and 0 < int(count) < 40, proc.stdout
    given_up = re.search(
        r'conveyor "events" at the end of its `with` block: Ctrl-C stopped its drain with '
        r"(\d+) item\(s\) undelivered",
        proc.stderr,
    )
    assert given_up, proc.stderr
    assert 0 < int(given_up.group(1)) < 40
    assert "interpreter exit" not in proc.stderr, "drained again at exit: " + proc.stderr


def test_exit_with_a_stuck_sink_is_bounded_and_reports_the_count():
    start = time.monotonic()
    proc = run_python(
        textwrap.dedent(
            """
            import time, conveyor
            def stuck(item):
                time.sleep(3600)
            c = conveyor.Conveyor(stuck, drain_timeout=0.5, name="events")
            for n in range(5):
                c.send(n)
            print("exiting", flush=True)
            """
        )
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "exiting"
    assert "RuntimeWarning" in proc.stderr, proc.stderr
    assert "left 5 item(s) undelivered" in proc.stderr, proc.stderr
    assert '"events"' in proc.stderr
    assert elapsed < 20, elapsed


@pytest.mark.parametrize(
    "sink, options",
    [
        # Blocked in a call that releases the GIL, and takes it back once the interpreter
        # finalizes.
        ("time.sleep(0.05)", {}),
        # Running Python code on four threads, which hand the GIL over every few milliseconds.
        (
            "end = time.monotonic() + 0.05\n    while time.monotonic() < end: pass",
            {"ordering": "keyed", "concurrency": 4},
        ),
    ],
    ids=["sleeping", "busy"],
)
def test_sink_calls_still_running_when_the_exit_drain_gives_up_do_not_crash_it(sink, options):
    # CPython before 3.14 ends such a thread with pthread_exit when its call takes the GIL
    # back during finalization: the unwind aborted the process ("Fatal Python error:
    # PyGILState_Release", or a segfault) right after the warning. Every run crashed.
    code = f"""
import time, conveyor
def send_to_space(item):
    {sink}
c = conveyor.Conveyor(send_to_space, drain_timeout=0.2, **{options!r})
for n in range(100):
    c.send(n{", key=str(n % 4)" if options else ""})
print("exiting", flush=True)
"""
    assert_exits_cleanly(code, r"item\(s\) undelivered after waiting drain_timeout=0\.2 s", runs=3)


def test_delivery_threads_taking_the_gil_for_their_next_item_at_exit_do_not_crash_it():
    # Short sink calls on four threads, thousands of items left when the exit drain gives up:
    # some thread is always waiting to take the GIL for its next call as the interpreter
    # finalizes, and CPython ends it with pthread_exit there. PyO3's own PyGILState_Ensure
    # parks it instead; taken through a bare `extern "C"` declaration, most runs aborted
    # ("FATAL: exception not rethrown").
    code = """
import conveyor
def send_to_space(item):
    sum(range(3000))
c = conveyor.Conveyor(send_to_space, drain_timeout=0.05, ordering="keyed", concurrency=4)
for n in range(30_000):
    c.send(n, key=str(n % 4))
print("exiting", flush=True)
"""
    assert_exits_cleanly(
        code, r"item\(s\) undelivered after waiting drain_timeout=0\.05 s", runs=5
    )


@pytest.mark.parametrize(
    "setup",
    [
        # An item's `__del__`, run when the delivery thread releases the items it delivered
        # (after the run of items it took at once). The sink takes as long as the drain waits,
        # so that items are left undelivered when the exit stops waiting.
        """
class Item:
    def __del__(self):
        time.sleep(0.3)
c = conveyor.Conveyor(lambda item: time.sleep(0.1), drain_timeout=0.1)
for n in range(3):
    c.send(Item())
""",
        # The `__str__` of the exception a blocking sink raised, read to describe the failure.
        """
class Refused(Exception):
    def __str__(self):
        time.sleep(0.3)
        return "refused"
def send_to_space(item):
    raise Refused()
c = conveyor.Conveyor(send_to_space, drain_timeout=0.1)
c.send(1)
""",
        # The same, on the event-loop thread of an `async def` sink, once the close stopped
        # waiting (1 s) for that thread.
        """
class Refused(Exception):
    def __str__(self):
        time.sleep(1.5)
        return "refused"
async def send_to_space(item):
    raise Refused()
c = conveyor.Conveyor(send_to_space, drain_timeout=0.1)
c.send(1)
""",
    ],
    ids=["item-del", "exception-str", "async-exception-str"],
)
def test_python_code_run_around_the_sink_call_does_not_crash_the_exit(setup):
    # User code that a delivery thread runs outside the sink call itself takes the GIL back
    # in the middle of the interpreter's finalization too, which ends the thread with
    # pthread_exit: the unwind reached PyO3's GIL guard ("Fatal Python error:
    # PyGILState_Release") or a PyO3 method ("FATAL: exception not rethrown"). Every run
    # crashed.
    code = textwrap.dedent(
        f"""
        import time

        class Linger:
            # Deleted as the interpreter finalizes: sleeps there, GIL released, while the
            # delivery thread wakes up and takes the GIL.
            def __del__(self, sleep=time.sleep):
                sleep(1.5)

        linger = Linger()
        import conveyor
        # In a namespace of its own: the conveyor left behind at exit keeps its sink and items,
        # which must not keep this module's globals, and `linger`, from being cleared.
        exec({setup!r}, {{"conveyor": conveyor, "time": time}})
        print("exiting", flush=True)
        """
    )
    assert_exits_cleanly(code, r"item\(s\) undelivered after waiting drain_timeout=0\.1 s")


@pytest.mark.parametrize(
    "wait",
    [
        # Waits for room in `other`, full for good: still waiting when the interpreter finalizes.
        "other.send(item)",
        # These end when the drain gives up on `other`, right as the interpreter finalizes.
        "other.send(item)\n    other.flush(timeout=30)",
        "other.send(item).result(timeout=30)",
    ],
    ids=["send-into-full", "flush", "result"],
)
def test_conveyor_waits_inside_a_sink_when_the_exit_drain_gives_up_do_not_crash_it(wait):
    # These release the GIL through PyO3 and take it back when a slice of the wait ends, or
    # when the drain that gives up on `other` settles what it waited for: often once the
    # interpreter finalizes, which ends the thread with pthread_exit inside PyO3's own
    # re-attach. Before PyO3 0.29 that unwind aborted the process ("FATAL: exception not
    # rethrown") right after the warnings: every send-into-full run, and most of the others.
    code = f"""
import threading, conveyor
gate = threading.Event()
def send_to_space(item):
    {wait}
c = conveyor.Conveyor(send_to_space, drain_timeout=0.1, name="events")
# Drained after "events" at exit, its sink stuck for good: full with the first two items.
other = conveyor.Conveyor(lambda item: gate.wait(), capacity=1, drain_timeout=0.1, name="other")
for n in range(3):
    c.send(n)
print("exiting", flush=True)
"""
    assert_exits_cleanly(
        code,
        r'"events" at interpreter exit left \d item\(s\) undelivered after waiting '
        r"drain_timeout=0\.1 s",
        runs=5,
    )


def test_ctrl_c_during_the_exit_drain_stops_it_without_crashing_the_interpreter():
    # Ctrl-C while the exit hook drains a slow sink: the drain ends there, with a warning that
    # counts what is left, and the sink is never called again. A worker still calling it would
    # take the GIL while the interpreter finalizes, which killed the process (a fatal error or
    # a segfault).
    proc = run_python(
        textwrap.dedent(
            """
            import atexit, time
            calls = []

            def after_conveyors_hook():
                # Registered before conveyor is imported, so it runs after conveyor's hook.
                seen = len(calls)
                time.sleep(2)
                print("calls", seen, len(calls), flush=True)

            atexit.register(after_conveyors_hook)
            import os, signal, threading, conveyor

            def send_to_space(item):
                calls.append(item)
                time.sleep(0.5)

            c = conveyor.Conveyor(send_to_space, drain_timeout=60, name="events")
            for n in range(20):
                c.send(n)
            # Daemon: a plain timer thread would be joined before the exit hook runs.
            timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
            timer.daemon = True
            timer.start()
            """
        )
    )
    assert proc.returncode == 0, proc.stderr
    assert "Fatal" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert '"events" at interpreter exit: Ctrl-C stopped its drain with' in proc.stderr
    word, seen, after = proc.stdout.split()
    assert word == "calls" and 0 < int(seen) < 20, proc.stdout
    assert after == seen, "the sink was called after the interrupt: " + proc.stdout


def test_exit_after_asyncio_run_delivers_from_an_async_sink():
    proc = run_python(
        textwrap.dedent(
            """
            import asyncio, conveyor
            async def send(item):
                await asyncio.sleep(0.01)
                print("sent", item, flush=True)
            c = conveyor.Conveyor(send)
            async def main():
                for n in range(3):
                    await c.asend(n)
            asyncio.run(main())
            """
        )
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["sent 0", "sent 1", "sent 2"]
    assert proc.stderr == ""


def test_exit_with_asends_still_waiting_for_room():
    # The exit drain makes room for asends whose loop will never run again: the thread that
    # resumes them must neither crash nor keep the process alive.
    proc = run_python(
        textwrap.dedent(
            """
            import asyncio, threading, conveyor
            gate = threading.Event()
            def sink(item):
                if item == "hold":
                    gate.wait(30)
                print("sent", item, flush=True)
            c = conveyor.Conveyor(sink, capacity=1)
            loop = asyncio.new_event_loop()
            async def main():
                await c.asend("hold")
                while c.stats.in_flight == 0:
                    await asyncio.sleep(0.001)
                await c.asend("fill")
                tasks = [loop.create_task(c.asend(n)) for n in range(20)]
                await asyncio.sleep(0.05)
                return tasks
            tasks = loop.run_until_complete(main())
            threading.Timer(0.2, gate.set).start()
            print("exiting", flush=True)
            """
        )
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["exiting", "sent hold", "sent fill"]
    assert "Fatal" not in proc.stderr and "panicked" not in proc.stderr, proc.stderr


def test_garbage_collected_conveyor_drains_first():
    assert_prints_ok(
        textwrap.dedent(
            """
            import conveyor, gc
            out = []
            c = conveyor.Conveyor(out.append)
            for n in range(100):
                c.send(n)
            del c
            gc.collect()
            assert out == list(range(100)), out
            print("ok")
            """
        )
    )


# A client object that owns a conveyor whose sink is one of its own methods: the conveyor
# holds the sink, the sink holds the client, the client holds the conveyor.
CLIENT_CYCLE = """
import asyncio, gc, os, threading, time, weakref, conveyor

def threads():
    try:
        return len(os.listdir("/proc/self/task"))  # OS threads, the engine's included
    except OSError:
        return threading.active_count()

class Client:
    def __init__(self, n, log):
        self.n, self.log = n, log
        self.c = conveyor.Conveyor(self.ASYNC and self.apost or self.post)
    def post(self, item):
        time.sleep(0.002)  # slow enough that items are still queued when the cycle is collected
        self.log.append((self.n, item))
    async def apost(self, item):
        await asyncio.sleep(0.002)
        self.log.append((self.n, item))

Client.ASYNC = ASYNC
log, refs = [], []
gc.collect()
before = threads()
for n in range(20):
    client = Client(n, log)
    for item in range(5):
        client.c.send(item)
    refs.append(weakref.ref(client.c))
    del client
    gc.collect()
alive = sum(r() is not None for r in refs)
assert alive == 0, f"{alive} of 20 conveyors in a cycle with their sink were never collected"
# Delivered before collection, by a client whose attributes were all still there.
assert log == [(n, item) for n in range(20) for item in range(5)], log
deadline = time.monotonic() + 20
while threads() > before + 1 and time.monotonic() < deadline:
    time.sleep(0.05)
assert threads() <= before + 1, f"{threads() - before} more threads than before"
print("ok")
"""


@pytest.mark.parametrize("is_async", [False, True], ids=["blocking", "async"])
def test_conveyor_in_a_cycle_with_its_sink_is_collected_after_draining(is_async):
    assert_prints_ok(f"ASYNC = {is_async}\n" + CLIENT_CYCLE)


def test_collection_on_the_conveyors_own_loop_thread_does_not_wait_for_itself():
    # The collector runs wherever memory is allocated, here on the conveyor's own event-loop
    # thread, while nothing reaches the conveyor any more: draining it there would wait for
    # the very loop the collector is blocking, until drain_timeout.
    assert_prints_ok(
        textwrap.dedent(
            """
            import asyncio, functools, gc, threading, time, weakref, conveyor
            delivered, took = [], []
            unreachable = threading.Event()

            async def deliver(holder, item):
                del holder  # the running coroutine no longer reaches the conveyor
                if item == 0:
                    assert unreachable.wait(10)
                    start = time.monotonic()
                    gc.collect()
                    took.append(time.monotonic() - start)
                delivered.append(item)

            holder = []
            holder.append(conveyor.Conveyor(functools.partial(deliver, holder), drain_timeout=30))
            for item in range(3):
                holder[0].send(item)
            ref = weakref.ref(holder[0])
            del holder
            unreachable.set()
            deadline = time.monotonic() + 20
            while not took and time.monotonic() < deadline:
                time.sleep(0.01)
            assert took and took[0] < 10, took
            while ref() is not None and time.monotonic() < deadline:
                gc.collect()
                time.sleep(0.01)
            assert ref() is None, "the conveyor was never collected"
            assert delivered == [0, 1, 2], delivered
            print("ok")
            """
        )
    )


def test_collection_in_an_async_sinks_receipt_callback_does_not_cut_its_drain_short():
    # An async sink's items settle on the conveyor's runtime threads, which run the receipt
    # callbacks. A collection there must not drain the conveyor on a thread it needs: the drain
    # would give up at once and fail the items queued behind. Either of the runtime's two
    # threads may settle an item, whether or not it started one, so the round is repeated.
    assert_prints_ok(
        textwrap.dedent(
            """
            import asyncio, gc, threading, time, weakref, conveyor
            gc.disable()  # collections happen only where this test makes them
            log = []
            attached = threading.Event()

            class Client:
                def __init__(self, n):
                    self.n = n
                    self.c = conveyor.Conveyor(self.apost, drain_timeout=30)
                async def apost(self, item):
                    # Item 0 settles only once its callback is attached: a callback attached
                    # to a settled receipt runs at once on this thread, which would wait for
                    # itself.
                    while item == 0 and not attached.is_set():
                        await asyncio.sleep(0.001)
                    log.append((self.n, item))

            for n in range(20):
                unreachable, collected_there = threading.Event(), threading.Event()
                def collect(receipt):
                    assert unreachable.wait(10)
                    gc.collect()
                    collected_there.set()
                attached.clear()
                client = Client(n)
                first = client.c.send(0)
                first.add_done_callback(collect)
                attached.set()
                for item in range(1, 4):
                    client.c.send(item)
                ref = weakref.ref(client.c)
                del client, first
                unreachable.set()
                assert collected_there.wait(10)
                deadline = time.monotonic() + 20
                while ref() is not None and time.monotonic() < deadline:
                    gc.collect()
                    time.sleep(0.01)
                assert ref() is None, "the conveyor was never collected"
            assert log == [(n, item) for n in range(20) for item in range(4)], log
            print("ok")
            """
        )
    )


def test_interrupted_collection_never_calls_the_cleared_sink():
    # Ctrl-C during the collector's drain: the collector then clears the cycle's objects,
    # here the partial's function and arguments, so the sink must never be called again. The
    # KeyboardInterrupt cannot be raised inside the collector, where nobody could catch it, but
    # it must still reach the program: one Ctrl-C stops it.
    proc = run_python(
        textwrap.dedent(
            """
            import asyncio, functools, gc, os, signal, threading, time, weakref, conveyor
            # Collections happen only where this test makes them: on another thread, Ctrl-C
            # could not interrupt the drain at all.
            gc.disable()
            calls = []

            async def deliver(holder, item):
                del holder  # the running coroutine no longer reaches the conveyor
                calls.append(item)
                if item == 0:
                    # Holds the drain far longer than the 0.3 s until Ctrl-C, even on a loaded
                    # machine (3 s once let the drain finish first).
                    await asyncio.sleep(6)

            holder = []
            holder.append(conveyor.Conveyor(functools.partial(deliver, holder), drain_timeout=30))
            for item in range(3):
                holder[0].send(item)
            while not calls:
                time.sleep(0.01)
            ref = weakref.ref(holder[0])
            del holder
            threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
            try:
                gc.collect()
                time.sleep(10)  # the interrupt comes right after the collection, not after this
            except KeyboardInterrupt:
                print("interrupted")
            assert ref() is None, "the conveyor was never collected"
            time.sleep(4)
            assert calls == [0], calls
            print("ok")
            """
        )
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["interrupted", "ok"], proc.stderr
    assert "drain was interrupted with 3 item(s) left" in proc.stderr


def test_ctrl_c_during_the_drain_of_a_dropped_conveyor_stops_the_program():
    # `del c` drains like a collection does, with nobody to catch an error: Ctrl-C must still
    # stop the program at once, not after the engine's own uninterruptible drain.
    proc = run_python(
        textwrap.dedent(
            """
            import os, signal, threading, time, conveyor
            calls = []

            def sink(item):
                calls.append(item)
                time.sleep(1)

            c = conveyor.Conveyor(sink, drain_timeout=30)
            for item in range(10):
                c.send(item)
            threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
            start = time.monotonic()
            try:
                del c
                while time.monotonic() < start + 30:  # the program goes on, a line at a time
                    time.sleep(0.05)
            except KeyboardInterrupt:
                took = time.monotonic() - start
                at_interrupt = len(calls)
                # The drain left 9 calls of 1 s: "at once" is anything well short of that (a
                # load-proof bound; rounding to 0 s, as this test did, was not).
                print("interrupted", "at once" if took < 5 else "after %.1f s" % took)
            time.sleep(2)  # the call running at Ctrl-C ends; no other starts
            assert len(calls) <= at_interrupt + 1, (at_interrupt, calls)
            print("ok")
            """
        )
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["interrupted", "at", "once", "ok"], proc.stdout + proc.stderr
    assert "drain was interrupted with" in proc.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_inherited_conveyor_raises_closed_in_the_child_and_a_new_one_works(make):
    parent_sink = Recorder()
    c = make(parent_sink)
    r = c.send("before fork")
    r.result(timeout=10)
    def child() -> list[str]:
        lines = []
        try:
            c.send("from child")
            lines.append("send: no error")
        except conveyor.Closed as exc:
            lines.append("send: Closed " + ("fork" in str(exc)) * "mentions fork")
        try:
            c.flush(timeout=1)
            lines.append("flush: no error")
        except conveyor.Closed:
            lines.append("flush: Closed")
        try:
            r.result(timeout=1)
            lines.append("receipt: no error")
        except conveyor.Closed:
            lines.append("receipt: Closed")
        lines.append("repr: " + ("unusable" in repr(c)) * "unusable")
        got = []
        fresh = conveyor.Conveyor(got.append)
        fresh.send("child item")
        fresh.close(timeout=10)
        lines.append(f"fresh: {got}")
        return lines

    assert in_forked_child(child) == [
        "send: Closed mentions fork",
        "flush: Closed",
        "receipt: Closed",
        "repr: unusable",
        "fresh: ['child item']",
    ]
    # The parent's conveyor is unaffected.
    c.send("after fork").result(timeout=10)
    assert parent_sink.items == ["before fork", "after fork"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_fork_while_delivering_never_hangs_the_child(make):
    # Delivery threads release Python references all the time; a fork in the middle of that
    # must not leave the child with a lock nobody will release.
    c = make(lambda item: None, capacity=100_000)
    stop = threading.Event()

    def produce():
        while not stop.is_set():
            c.send(object())

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        for _ in range(30):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    fresh = conveyor.Conveyor(lambda item: None)
                    fresh.send(1).result(timeout=10)
                    fresh.close(timeout=10)
                    code = 0
                finally:
                    os._exit(code)
            wait_for_child(pid, 20, "a child forked during delivery hung")
    finally:
        stop.set()
        producer.join()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_asend_waiting_for_room_works_in_a_forked_child(make):
    # The thread that resumes waiting asends stays in the parent: the child needs its own.
    def blocked_asend_round(make_conveyor):
        gate = threading.Event()
        got = []
        c = make_conveyor(holding_sink(gate, got), capacity=1)

        async def main():
            await fill_up(c)
            waiting = asyncio.ensure_future(c.asend("waited"))
            await asyncio.sleep(0.05)
            gate.set()
            await asyncio.wait_for(waiting, timeout=20)

        asyncio.run(main())
        assert c.flush(timeout=20)
        return got

    assert blocked_asend_round(make) == ["hold", "fill", "waited"]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            c = None

            def fresh(sink, **options):
                nonlocal c
                c = conveyor.Conveyor(sink, **options)
                return c

            if blocked_asend_round(fresh) == ["hold", "fill", "waited"]:
                c.close(timeout=10)
                code = 0
        finally:
            os._exit(code)
    wait_for_child(pid, 60, "a blocked asend in a forked child was never resumed")
    assert blocked_asend_round(make) == ["hold", "fill", "waited"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
@pytest.mark.parametrize("owner", ["Conveyor", "Journal"])
def test_a_forked_child_does_not_keep_the_journal_from_its_parent(tmp_path, owner):
    # The journal's lock (an flock) belongs to the open file description, which fork() shares
    # with the child: a child that lived on used to keep it, so the parent could not open its
    # journal again (refused, naming its own PID), nor a restarted service while a worker forked
    # by the old one still ran. The child leaves through a normal interpreter exit, as a program
    # would; it must not close the inherited SQLite connection either (a close may checkpoint
    # and delete the parent's WAL).
    path = tmp_path / "events.journal"
    conveyor.Conveyor(lambda item: None, journal=path).close(timeout=10)
    proc = run_python(
        textwrap.dedent(
            f"""
            import gc, os, sys
            import conveyor

            PATH = {str(path)!r}

            def open_fds(path):
                # This process's descriptors open on `path`.
                target = os.stat(path)
                found = 0
                for name in os.listdir("/dev/fd"):
                    try:
                        st = os.fstat(int(name))
                    except OSError:
                        continue
                    found += (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)
                return found

            def take():
                if {owner!r} == "Conveyor":
                    return conveyor.Conveyor(lambda item: None, journal=PATH)
                return conveyor.Journal(PATH)

            def use(held):
                if isinstance(held, conveyor.Journal):
                    held.status()
                else:
                    held.send("from the child")

            held = take()
            ready_read, ready_write = os.pipe()
            go_read, go_write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(go_write)
                try:
                    use(held)
                    print("child: used it")
                except (conveyor.Closed, conveyor.JournalError) as exc:
                    print("child: refused" + ", names fork" * ("fork" in str(exc)))
                print("child: lock file open", open_fds(PATH + "-lock"), "time(s)")
                del held
                gc.collect()
                print("child: journal file still open:", open_fds(PATH) > 0)
                sys.stdout.flush()
                os.write(ready_write, b"x")
                os.read(go_read, 1)
                # Leaves through the interpreter's exit: atexit hooks, then finalization.
            else:
                os.read(ready_read, 1)
                held.close()
                again = take()
                print("parent: opened it again")
                os.close(go_write)
                _, status = os.waitpid(pid, 0)
                print("parent: child exited", os.waitstatus_to_exitcode(status))
                use(again)
                again.close()
                print("parent: still works")
            """
        )
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        "child: refused, names fork",
        "child: lock file open 0 time(s)",
        # The inherited connection was never closed: it goes with the child.
        "child: journal file still open: True",
        "parent: opened it again",
        "parent: child exited 0",
        "parent: still works",
    ], proc.stderr
