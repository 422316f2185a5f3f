"""journal=: accepted items survive a crash; dead letters can be listed, retried, discarded."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import conveyor

from conftest import Recorder, fill_up, holding_sink, interrupt_main_after, run_python


def test_items_round_trip_through_json(make, tmp_path):
    seen = []

    def sink(item):
        seen.append(item)
        return ("ok", item)

    c = make(sink, journal=tmp_path / "events.journal")
    receipts = [c.send({"n": 1, "tags": ("a", "b")}), c.send("text"), c.send([1, 2.5, None])]
    assert [r.result(timeout=10) for r in receipts] == [
        ("ok", {"n": 1, "tags": ["a", "b"]}),
        ("ok", "text"),
        ("ok", [1, 2.5, None]),
    ]
    # The sink sees json.loads(json.dumps(item)), the same before and after a restart.
    assert seen == [{"n": 1, "tags": ["a", "b"]}, "text", [1, 2.5, None]]


def test_items_that_are_not_json_are_refused_at_send(make, tmp_path):
    c = make(Recorder(), journal=str(tmp_path / "events.journal"))
    with pytest.raises(ValueError, match="JSON"):
        c.send(object())
    with pytest.raises(ValueError, match="JSON"):
        c.send(float("nan"))
    assert c.stats.accepted == 0


@pytest.mark.parametrize("number", [float("nan"), float("inf"), -float("inf")], ids=repr)
def test_a_float_json_cannot_hold_is_named_with_what_to_send_instead(make, tmp_path, number):
    # Said only "expected value at line 1 column 13", the JSON parser's position in the output
    # of json.dumps, leaving the user to find the NaN in their item.
    c = make(Recorder(), journal=tmp_path / "events.journal")
    with pytest.raises(ValueError) as info:
        c.send({"temperature": [20.5, number]})
    message = str(info.value)
    assert message.startswith("a journaled conveyor stores items as JSON, and this dict cannot be: ")
    assert "NaN or Infinity for a float: send None or a string in its place" in message
    assert c.stats.accepted == 0


def test_accepted_items_survive_a_crash_and_are_delivered_in_order(tmp_path):
    path = tmp_path / "events.journal"
    crashed = run_python(
        textwrap.dedent(
            f"""
            import os, threading, conveyor
            stuck, reached = threading.Event(), threading.Event()
            def sink(item):
                print("delivered", item, flush=True)
                if item == 2:
                    reached.set()
                    stuck.wait()  # the process dies while item 2 is in flight
            c = conveyor.Conveyor(sink, journal={str(path)!r}, durability="sync")
            for n in range(6):
                c.send(n)
            reached.wait(30)
            os._exit(9)  # like kill -9: no atexit, no drain
            """
        )
    )
    assert crashed.returncode == 9, crashed.stderr
    assert crashed.stdout.splitlines() == ["delivered 0", "delivered 1", "delivered 2"]

    restarted = run_python(
        textwrap.dedent(
            f"""
            import conveyor
            seen = []
            c = conveyor.Conveyor(seen.append, journal={str(path)!r})
            c.close(timeout=30)
            print(seen)
            """
        )
    )
    assert restarted.returncode == 0, restarted.stderr
    # At least once, never out of order: everything from the last recorded settlement on comes
    # again (item 2 was in flight; 0 and 1 too if their settlement was not committed yet).
    redelivered = json.loads(restarted.stdout)
    assert redelivered in ([2, 3, 4, 5], [1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]), redelivered



def test_a_sync_send_on_a_full_disk_releases_the_gil_and_yields_to_ctrl_c(tmp_path):
    # Writes fail with EFBIG once the file size limit is reached, as on a full disk (Python
    # ignores SIGXFSZ). The send waits while the journal retries; meanwhile other threads run,
    # and Ctrl-C interrupts it.
    code = textwrap.dedent(
        f"""
        import os, resource, signal, threading, time, conveyor
        path = {str(tmp_path / "j")!r}
        stall = threading.Event()
        def sink(item):
            # Items stay pending until the test ends (each is written before it reaches the
            # sink anyway).
            if item != "warm":
                stall.wait()
        c = conveyor.Conveyor(sink, journal=path, durability="sync")
        c.send("warm").result(timeout=5)
        c.flush()
        time.sleep(0.5)  # the writer's checkpoint is done before the disk "fills"
        size = os.path.getsize(path + "-wal")
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
        ticks = []
        def ticker():
            while True:
                ticks.append(1)
                time.sleep(0.01)
        threading.Thread(target=ticker, daemon=True).start()
        threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        watchdog = threading.Timer(20.0, lambda: (os.write(1, b"HUNG\\n"), os._exit(3)))
        watchdog.daemon = True
        watchdog.start()
        try:
            for i in range(100):
                c.send("x" * 10000)
            print("OUTCOME sent")
        except KeyboardInterrupt:
            print("OUTCOME KeyboardInterrupt", "ticks", len(ticks) > 10)
        except conveyor.JournalError:
            print("OUTCOME JournalError")
        os._exit(0)
        """
    )
    proc = run_python(code, timeout=60)
    # Refused at once (a later send sees the failure) or interrupted while waiting: either way
    # the process answered, and another thread ran meanwhile.
    assert (
        "OUTCOME KeyboardInterrupt ticks True" in proc.stdout or "OUTCOME JournalError" in proc.stdout
    ), proc.stdout + proc.stderr

# Holds SQLite's write lock on a journal until its stdin closes.
HOLD_WRITE_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.read()
db.execute("ROLLBACK")
"""


class HeldCommits:
    """Holds back a journal's commits, as a hung disk would, until `release(by)`.

    Another process holds SQLite's write lock on the journal (as a backup tool or a stray
    `sqlite3` shell might): each commit waits out SQLite's busy timeout, fails and is retried.
    Not this process: two copies of SQLite in one process do not see each other's locks. A
    watchdog releases it after `patience` s, so a test whose event loop stands still fails
    (`released_by == "watchdog"`) instead of hanging.
    """

    def __init__(self, path: os.PathLike, patience: float = 4.0) -> None:
        self._holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_WRITE_LOCK, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._holder.stdout is not None
        assert self._holder.stdout.readline() == "held\n"
        self._lock = threading.Lock()
        self.released_by = None
        self._watchdog = threading.Timer(patience, self.release, ("watchdog",))
        self._watchdog.start()

    def release(self, by: str) -> None:
        with self._lock:
            if self.released_by is None:
                self.released_by = by
                self._holder.communicate(timeout=30)

    def __enter__(self) -> "HeldCommits":
        return self

    def __exit__(self, *exc: object) -> None:
        self._watchdog.cancel()
        self.release("exit")


def sync_conveyor(make, path, durability="sync"):
    """A durability="sync" (or `durability`) conveyor on `path` that delivered 0 and left its
    journal's writer nothing to commit, so that holding commits back holds back only what
    follows; and the list of what it delivered."""
    delivered = []
    c = make(delivered.append, journal=path, durability=durability)
    c.send(0)
    assert c.flush(timeout=10)
    return c, delivered


def batched_conveyor(make, path):
    """`sync_conveyor` under the default batched durability."""
    return sync_conveyor(make, path, durability=0.005)


def assert_in_order(receipts):
    seqs = [r.seq for r in receipts]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs


def test_a_sync_asend_awaits_its_commit_without_blocking_the_loop(make, tmp_path):
    # Under durability="sync", asend waited for its item's commit on the event loop's thread:
    # every other task stood still for each commit, and for good while the disk hung or was
    # full. Here the loop must go on running while three asends wait for their commit, and
    # release it itself.
    path = tmp_path / "j"
    c, delivered = sync_conveyor(make, path)

    async def main():
        with HeldCommits(path) as held:
            sends = [asyncio.ensure_future(c.asend(n)) for n in (1, 2, 3)]
            for _ in range(20):
                await asyncio.sleep(0.005)
            waiting = [not send.done() for send in sends]
            held.release("loop")
            receipts = await asyncio.wait_for(asyncio.gather(*sends), timeout=30)
        return held.released_by, waiting, receipts

    released_by, waiting, receipts = asyncio.run(main())
    assert released_by == "loop", "the event loop stood still while an asend awaited its commit"
    assert waiting == [True, True, True]
    assert_in_order(receipts)
    assert c.flush(timeout=10)
    assert delivered == [0, 1, 2, 3]


def test_a_sync_asend_that_waited_for_room_awaits_its_commit_without_blocking_the_loop(
    make, tmp_path
):
    # The same once asend has waited for room: the poll that accepts the item must not then
    # wait for its commit on the loop's thread.
    path = tmp_path / "j"
    gate = threading.Event()
    delivered = []
    c = make(holding_sink(gate, delivered), journal=path, durability="sync", capacity=1)

    async def main():
        await fill_up(c)
        with HeldCommits(path) as held:
            late = asyncio.ensure_future(c.asend("late"))  # the queue is full: waits for room
            gate.set()
            while c.stats.accepted < 3:
                await asyncio.sleep(0.001)
            for _ in range(20):
                await asyncio.sleep(0.005)
            waiting = not late.done()
            held.release("loop")
            receipt = await asyncio.wait_for(late, timeout=30)
        return held.released_by, waiting, receipt

    released_by, waiting, receipt = asyncio.run(main())
    assert released_by == "loop", "the event loop stood still while an asend awaited its commit"
    assert waiting
    assert receipt.result(timeout=10) is None
    assert delivered == ["hold", "fill", "late"]


def test_a_sync_asend_cancelled_during_its_commit_returns_the_receipt(make, tmp_path):
    # Once asend accepted its item, cancelling the task cannot take it back: whether it was
    # cancelled before it first ran, while it awaited the commit, or by a wait_for timeout,
    # the task returns the receipt at once (the commit still held back), never CancelledError
    # or TimeoutError for an item that will be delivered.
    path = tmp_path / "j"
    c, delivered = sync_conveyor(make, path)

    async def main():
        with HeldCommits(path) as held:
            unstarted = asyncio.ensure_future(c.asend(1))
            unstarted.cancel()
            started = asyncio.ensure_future(c.asend(2))
            await asyncio.sleep(0)  # `started` runs, and awaits its commit
            waiting = not started.done()
            started.cancel()
            timed_out = await asyncio.wait_for(c.asend(3), timeout=0.05)
            receipts = [await unstarted, await started, timed_out]
            delivered_meanwhile = [r.done() for r in receipts]
            held.release("loop")
        return held.released_by, waiting, receipts, delivered_meanwhile

    released_by, waiting, receipts, delivered_meanwhile = asyncio.run(main())
    assert released_by == "loop", "the event loop stood still while an asend awaited its commit"
    assert waiting
    assert delivered_meanwhile == [False, False, False], "delivered before its commit"
    assert_in_order(receipts)
    assert [r.result(timeout=10) for r in receipts] == [None, None, None]
    assert delivered == [0, 1, 2, 3]


def test_a_sync_asend_on_a_full_disk_waits_with_the_loop_running_until_cancelled(tmp_path):
    # While the disk is full, a sync asend waits as the journal retries, as `send` does, but
    # with the event loop running; a wait_for timeout ends that wait with the receipt (the item
    # stays accepted), later sends are refused with JournalError, and once there is room the
    # item is committed and delivered, in order.
    code = textwrap.dedent(
        f"""
        import asyncio, os, resource, threading, conveyor
        delivered = []
        c = conveyor.Conveyor(delivered.append, journal={str(tmp_path / "j")!r}, durability="sync")
        c.send(0)
        assert c.flush(timeout=10)
        # Every write to a file fails with EFBIG, as on a full disk (Python ignores SIGXFSZ).
        fill_disk = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        free_disk = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        watchdog = threading.Timer(20.0, lambda: (os.write(1, b"HUNG\\n"), os._exit(3)))
        watchdog.daemon = True
        watchdog.start()
        async def main():
            fill_disk()
            # Only a loop that runs meanwhile can fire the timeout.
            receipt = await asyncio.wait_for(c.asend(1), timeout=0.5)
            print("DELIVERED", receipt.done())
            try:
                await c.asend(2)
            except conveyor.JournalError:
                print("REFUSED")
            free_disk()
            result = await asyncio.wait_for(receipt, timeout=10)  # once the writer retried
            print("FLUSHED", await c.aflush(timeout=10), delivered, result)
        asyncio.run(main())
        c.close()
        os._exit(0)
        """
    )
    proc = run_python(code, timeout=60)
    assert proc.stdout.splitlines() == [
        "DELIVERED False",
        "REFUSED",
        "FLUSHED True [0, 1] None",
    ], proc.stdout + proc.stderr


def test_wait_committed_has_the_journal_commit_now_rather_than_when_its_window_ends(make, tmp_path):
    # One sender must know that one item is on disk (to acknowledge it upstream) while other
    # sends stay fire-and-forget. A 60 s commit window, and the only worker busy with "hold"
    # (a worker taking an item would ask for a commit itself): only the wait asks for this one.
    path = tmp_path / "j"
    gate = threading.Event()
    delivered = []
    c = make(holding_sink(gate, delivered), journal=path, durability=60.0)
    try:
        c.send("hold")
        while c.stats.in_flight == 0:
            time.sleep(0.001)
        receipt = c.send("x")
        assert c.wait_committed(receipt, timeout=10) is True
        with conveyor.Journal(path, read_only=True) as journal:
            assert journal.status().pending == 2, "both on disk, neither settled"
        assert not receipt.done()
    finally:
        gate.set()
    assert c.flush(timeout=10) and delivered == ["hold", "x"]


def test_wait_committed_is_false_at_its_timeout_while_commits_are_held_back(make, tmp_path):
    path = tmp_path / "j"
    c, delivered = batched_conveyor(make, path)
    with HeldCommits(path) as held:
        receipt = c.send(1)
        # A receipt whose outcome is watched (a callback, an await, a future) is waited for
        # by its item's number alone.
        watched = c.send(2)
        watched.add_done_callback(lambda _receipt: None)
        assert c.wait_committed(receipt, timeout=0.2) is False
        assert c.wait_committed(watched, timeout=0) is False
        held.release("test")
        assert c.wait_committed(receipt, timeout=30) is True
        assert c.wait_committed(watched, timeout=30) is True
    assert held.released_by == "test", "the wait returned only once the watchdog released it"
    assert c.flush(timeout=10) and delivered == [0, 1, 2]


def test_ctrl_c_interrupts_wait_committed(make, tmp_path):
    path = tmp_path / "j"
    c, _delivered = batched_conveyor(make, path)
    with HeldCommits(path) as held:
        receipt = c.send(1)
        with pytest.raises(KeyboardInterrupt):
            interrupt_main_after(0.2)
            c.wait_committed(receipt)
        held.release("test")
    assert held.released_by == "test", "the wait returned only once the watchdog released it"
    assert c.wait_committed(receipt, timeout=30) is True


def test_await_committed_lets_the_loop_run_while_commits_are_held_back(make, tmp_path):
    path = tmp_path / "j"
    c, delivered = batched_conveyor(make, path)

    async def main():
        with HeldCommits(path) as held:
            receipt = c.send(1)
            committed = asyncio.ensure_future(c.await_committed(receipt))
            for _ in range(20):
                await asyncio.sleep(0.005)
            waiting = not committed.done()
            held.release("loop")
            return held.released_by, waiting, await asyncio.wait_for(committed, timeout=30)

    released_by, waiting, committed = asyncio.run(main())
    assert released_by == "loop", "the event loop stood still while await_committed waited"
    assert waiting and committed is True
    assert c.flush(timeout=10) and delivered == [0, 1]


def test_cancelled_await_committed_leave_nothing_waiting(make, tmp_path):
    # The wait is the engine's future polled on the loop: a cancellation drops it, with no
    # thread of its own to leave behind (a thread per wait grew the process by one per
    # `wait_for` timeout while the disk hung).
    path = tmp_path / "j"
    c, _delivered = batched_conveyor(make, path)

    def threads():
        return len(os.listdir("/proc/self/task"))

    async def main():
        with HeldCommits(path) as held:
            receipt = c.send(1)
            before = threads()
            for _ in range(20):
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(c.await_committed(receipt), timeout=0.01)
            # The one dispatcher thread that resumes waits may have started on the first.
            grew = threads() - before
            waiting = asyncio.ensure_future(c.await_committed(receipt))  # not cancelled
            await asyncio.sleep(0.05)
            was_waiting = not waiting.done()
            held.release("loop")
            return grew, was_waiting, await asyncio.wait_for(waiting, timeout=30)

    grew, was_waiting, committed = asyncio.run(main())
    assert grew <= 1, f"{grew} threads left by cancelled await_committed() calls"
    assert was_waiting and committed is True


def test_wait_committed_is_true_at_once_with_nothing_to_wait_for(make, tmp_path):
    # A settled item has nothing left to lose; without a journal nothing is ever on disk; after
    # close() what was not committed is reported as left: none of them is an error.
    c = make(Recorder(), journal=tmp_path / "j")
    receipt = c.send(1)
    assert receipt.result(timeout=10) == ("ok", 1)
    assert c.wait_committed(receipt, timeout=0) is True
    assert asyncio.run(c.await_committed(receipt)) is True
    assert c.close(timeout=10).left == 0
    assert c.wait_committed(receipt, timeout=0) is True
    assert asyncio.run(c.await_committed(receipt)) is True

    gate = threading.Event()
    plain = make(holding_sink(gate, []))
    pending = plain.send("hold")
    assert plain.wait_committed(pending, timeout=0) is True
    assert asyncio.run(plain.await_committed(pending)) is True
    assert not pending.done()
    gate.set()


def test_wait_committed_refuses_a_receipt_of_another_conveyor(make, tmp_path):
    c = make(Recorder(), journal=tmp_path / "j")
    other = make(Recorder(), journal=tmp_path / "other")
    foreign = other.send(1)
    for wait in (c.wait_committed, c.await_committed):
        with pytest.raises(ValueError, match=r"^receipt= \(item 1\) was returned by another conveyor"):
            wait(foreign)
        with pytest.raises(TypeError, match="receipt"):
            wait(1)


def test_dead_letters_can_be_listed_retried_and_discarded(make, tmp_path):
    broken = {"bad-1", "bad-2"}
    delivered = []

    def sink(item):
        if item in broken:
            raise conveyor.PermanentError(f"rejected {item}")
        delivered.append(item)

    c = make(sink, journal=tmp_path / "events.journal")
    for item in ["ok-1", "bad-1", "bad-2", "ok-2"]:
        c.send(item)
    assert c.flush(timeout=10)
    dead = c.dead_letters()
    assert [(d.item, d.attempts) for d in dead] == [("bad-1", 1), ("bad-2", 1)]
    assert "rejected bad-1" in dead[0].error
    assert dead[0].failed_at > 0
    assert isinstance(dead[0], conveyor.DeadLetter)

    broken.clear()
    assert c.retry_dead(dead[0].seq).result(timeout=10) is None
    c.discard_dead(dead[1].seq)
    assert c.dead_letters() == []
    assert delivered == ["ok-1", "ok-2", "bad-1"]
    with pytest.raises(conveyor.JournalError):
        c.discard_dead(dead[1].seq)


def test_a_keyed_journal_holding_a_paused_key_is_refused_by_another_ordering(tmp_path):
    path = tmp_path / "events.journal"
    broken = {"alice"}
    seen = []

    def sink(item):
        if item[0] in broken:
            raise RuntimeError(f"{item[0]} is down")
        seen.append(item)

    c = conveyor.Conveyor(sink, journal=path, ordering="keyed", on_failure="pause")
    c.send(["alice", 1], key="alice")
    c.send(["alice", 2], key="alice")
    c.send(["bob", 1], key="bob")
    assert c.flush(timeout=10)
    assert c.paused() == ["alice"]
    assert c.close(timeout=10).left == 2

    for other in ({}, {"ordering": "pipelined", "in_flight": 2}):
        with pytest.raises(conveyor.JournalError, match='ordering="keyed"') as caught:
            conveyor.Conveyor(sink, journal=path, **other)
        assert "another journal= file" in str(caught.value)
    assert seen == [["bob", 1]], "the held items were not sent again without a resume"

    reopened = conveyor.Conveyor(sink, journal=path, ordering="keyed")
    assert reopened.paused() == ["alice"]
    broken.clear()
    assert reopened.resume("alice")
    assert reopened.flush(timeout=10)
    assert seen == [["bob", 1], ["alice", 1], ["alice", 2]]
    reopened.close(timeout=10)
    # Once it holds nothing pending or paused, another ordering may use it.
    conveyor.Conveyor(sink, journal=path).close(timeout=10)


def test_a_journal_of_another_program_is_refused(tmp_path):
    path = tmp_path / "events.journal"
    gate = threading.Event()
    c = conveyor.Conveyor(lambda item: gate.wait(10), journal=path)
    c.send("held")
    assert c.close(timeout=0.1).left == 1
    gate.set()
    # As if `conveyor send` (the command) had written it.
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = 'conveyor-cli' WHERE name = 'kind'")
    db.commit()
    db.close()
    with pytest.raises(conveyor.JournalError, match="another program") as caught:
        conveyor.Conveyor(Recorder(), journal=path)
    assert "conveyor-cli" in str(caught.value)


def test_dead_letters_need_a_journal(make):
    c = make(Recorder())
    with pytest.raises(conveyor.JournalError):
        c.dead_letters()


def test_a_journal_open_elsewhere_is_a_clear_error(make, tmp_path):
    path = tmp_path / "events.journal"
    make(Recorder(), journal=path)
    with pytest.raises(conveyor.JournalError, match="events.journal"):
        conveyor.Conveyor(Recorder(), journal=path)


def test_durability_needs_a_journal_and_a_valid_value(tmp_path):
    with pytest.raises(ValueError, match="journal"):
        conveyor.Conveyor(print, durability="sync")
    # Quoted as every other option's text value is: `ordering="sometimes"`.
    with pytest.raises(ValueError, match='^durability="sometimes": expected'):
        conveyor.Conveyor(print, journal=tmp_path / "j", durability="sometimes")
    for flag in (True, False):
        with pytest.raises(TypeError, match="not a bool"):
            conveyor.Conveyor(print, journal=tmp_path / "j", durability=flag)


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_journal_file_is_private(make, tmp_path):
    path = tmp_path / "events.journal"
    make(Recorder(), journal=path).send(1).result(timeout=10)
    assert os.stat(path).st_mode & 0o077 == 0


def test_a_cursor_is_stored_with_its_item_by_every_send(make, tmp_path):
    path = tmp_path / "events.journal"
    c = make(Recorder(), journal=path, ordering="keyed", concurrency=2)
    assert c.cursor() is None
    c.send("a", cursor=1)
    assert c.cursor() == 1
    c.try_send("b", key="k", cursor=2)
    assert c.cursor() == 2
    c.set_cursor(3)  # a record that sends nothing
    assert c.cursor() == 3

    async def main():
        await c.asend("d", key="k", cursor=4)

    asyncio.run(main())
    assert c.cursor() == 4
    c.close(timeout=10)
    reopened = make(Recorder(), journal=path, ordering="keyed", concurrency=2)
    assert reopened.cursor() == 4


def test_a_cursor_needs_a_journal(make):
    c = make(Recorder())
    for attempt in (
        lambda: c.send(1, cursor=1),
        lambda: c.try_send(1, cursor=1),
        lambda: c.set_cursor(1),
        c.cursor,
    ):
        with pytest.raises(conveyor.JournalError, match='journal="PATH"'):
            attempt()
    assert c.stats.accepted == 0, "nothing was sent without its cursor"


def test_a_rerun_resumes_its_input_at_the_cursor_after_a_crash(tmp_path):
    """The producer's input is ten lines. The process dies (like kill -9) while line 3 is in
    flight, after sending lines 0-6 with their positions. A rerun reads its input from
    `cursor()` on: every line arrives, in order, and only lines in the journal's replay window
    arrive twice (none of those sent again by the rerun)."""
    path = tmp_path / "events.journal"
    delivered = tmp_path / "delivered.txt"
    program = textwrap.dedent(
        f"""
        import os, threading, conveyor
        crash = MODE == "crash"
        lines = [f"line {{n}}" for n in range(10)]
        reached = threading.Event()
        def sink(item):
            with open({str(delivered)!r}, "a") as out:
                out.write(item + "\\n")
            if crash and item == "line 3":
                reached.set()
                threading.Event().wait()  # the process dies meanwhile
        c = conveyor.Conveyor(sink, journal={str(path)!r}, durability="sync")
        start = c.cursor() or 0
        print("resumed at", start, flush=True)
        for n in range(start, len(lines)):
            c.send(lines[n], cursor=n + 1)
            if crash and n == 6:
                reached.wait(30)
                os._exit(9)
        c.close(timeout=30)
        """
    )
    crashed = run_python('MODE = "crash"' + program)
    assert crashed.returncode == 9, crashed.stderr
    assert delivered.read_text().splitlines() == [f"line {n}" for n in range(4)]
    rerun = run_python('MODE = "rerun"' + program)
    assert rerun.returncode == 0, rerun.stderr
    # Under durability="sync" each send returned after its commit: the cursor says 7.
    assert rerun.stdout.splitlines() == ["resumed at 7"], rerun.stdout
    seen = delivered.read_text().splitlines()
    # The rerun delivered the journal's pending items from where the last committed
    # settlement left off (line 3 was in flight: line 3 at the latest), then lines 7-9.
    again = seen[4:]
    first = int(again[0].split()[1])
    assert first <= 3 and again == [f"line {n}" for n in range(first, 10)], seen


def test_journal_errors_speak_python(make, tmp_path):
    c = make(Recorder(), journal=tmp_path / "events.journal")
    c.close(timeout=10)
    for closed_out in (c.cursor, c.dead_letters):
        with pytest.raises(
            conveyor.JournalError, match=r"Conveyor\(\.\.\., journal=PATH\)"
        ) as caught:
            closed_out()
        assert "::" not in str(caught.value), "no Rust API in a Python message"
    plain = make(Recorder())
    with pytest.raises(conveyor.JournalError) as caught:
        plain.dead_letters()
    assert "::" not in str(caught.value) and 'journal="PATH"' in str(caught.value)


def test_set_cursor_after_close_raises_instead_of_losing_it(make, tmp_path):
    path = tmp_path / "events.journal"
    c = make(Recorder(), journal=path)
    c.send("a", cursor=1)
    c.close(timeout=10)
    with pytest.raises(conveyor.JournalError, match="closed"):
        c.set_cursor(2)
    assert make(Recorder(), journal=path).cursor() == 1


def test_an_item_dropped_by_policy_still_moves_the_cursor(make, tmp_path):
    gate, started = threading.Event(), threading.Event()

    def sink(item):
        started.set()
        gate.wait(10)

    c = make(sink, journal=tmp_path / "events.journal", capacity=1, backpressure="drop_newest")
    try:
        c.send(1, cursor=1)
        assert started.wait(10), "item 1 reached the sink"
        c.send(2, cursor=2)  # queued: the queue is full
        dropped = c.send(3, cursor=3)
        assert isinstance(dropped.exception(timeout=10), conveyor.Dropped)
        assert c.cursor() == 3
    finally:
        gate.set()


@pytest.mark.parametrize(
    "cursor, error, message",
    [
        (-1, ValueError, "from 0 to 2\\*\\*64 - 1"),
        (2**64, ValueError, "cursor="),
        ("7", TypeError, "must be an int"),
    ],
)
def test_a_cursor_out_of_range_or_of_the_wrong_type_names_the_argument(
    make, tmp_path, cursor, error, message
):
    c = make(Recorder(), journal=tmp_path / "events.journal")
    for attempt in (lambda: c.send("a", cursor=cursor), lambda: c.set_cursor(cursor)):
        with pytest.raises(error, match=message):
            attempt()
    assert c.stats.accepted == 0 and c.cursor() is None
