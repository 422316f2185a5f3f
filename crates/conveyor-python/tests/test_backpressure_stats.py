"""Backpressure policies, try_send, stats, pause/resume and close reports."""

from __future__ import annotations

import textwrap
import threading
import time

import pytest

import conveyor

from conftest import Recorder, run_python


def blocked_conveyor(make, **options):
    """A conveyor whose sink holds the first item until `gate` is set."""
    gate = threading.Event()
    sink = Recorder()

    def held(item):
        gate.wait(30)
        return sink(item)

    c = make(held, **options)
    return c, gate, sink


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_reject_raises_queue_full_when_full(make):
    c, gate, sink = blocked_conveyor(make, capacity=3, backpressure="reject")
    c.send(0)
    wait_until(lambda: c.stats.in_flight == 1)
    for n in range(1, 4):
        c.send(n)
    with pytest.raises(conveyor.QueueFull, match=r"full \(capacity 3\)"):
        c.send(4)
    assert c.stats.queued == 3
    gate.set()
    assert c.flush(timeout=10)
    assert sink.items == [0, 1, 2, 3]


def test_try_send_never_waits(make):
    c, gate, sink = blocked_conveyor(make, capacity=2)
    c.send(0)
    wait_until(lambda: c.stats.in_flight == 1)
    c.try_send(1)
    c.try_send(2)
    start = time.perf_counter()
    with pytest.raises(conveyor.QueueFull, match=r"full \(capacity 2\)"):
        c.try_send(3)
    assert time.perf_counter() - start < 1.0
    gate.set()
    assert c.flush(timeout=10)
    assert sink.items == [0, 1, 2]


def test_block_waits_for_room_and_releases_the_gil(make):
    c, gate, sink = blocked_conveyor(make, capacity=1)
    c.send(0)
    wait_until(lambda: c.stats.in_flight == 1)
    c.send(1)
    progress = []

    def other_thread():
        # Runs Python code while the main thread waits in send(): the wait released the GIL.
        for n in range(5):
            progress.append(n)
            time.sleep(0.01)
        gate.set()

    t = threading.Thread(target=other_thread)
    t.start()
    c.send(2)  # waits until the other thread opens the gate and room frees up
    t.join()
    assert progress == [0, 1, 2, 3, 4]
    assert c.flush(timeout=10)
    assert sink.items == [0, 1, 2]


def test_drop_oldest_settles_the_dropped_item(make):
    c, gate, sink = blocked_conveyor(make, capacity=2, backpressure="drop_oldest")
    first = c.send(0)
    wait_until(lambda: c.stats.in_flight == 1)
    r1 = c.send(1)
    c.send(2)
    c.send(3)  # evicts 1
    with pytest.raises(conveyor.Dropped):
        r1.result(timeout=10)
    gate.set()
    assert c.flush(timeout=10)
    assert sink.items == [0, 2, 3]
    assert first.result() == ("ok", 0)
    assert c.stats.dropped == 1


def test_drop_newest_drops_the_new_item(make):
    c, gate, sink = blocked_conveyor(make, capacity=1, backpressure="drop_newest")
    c.send(0)
    wait_until(lambda: c.stats.in_flight == 1)
    c.send(1)
    r2 = c.send(2)
    with pytest.raises(conveyor.Dropped):
        r2.result(timeout=10)
    gate.set()
    assert c.flush(timeout=10)
    assert sink.items == [0, 1]


def test_stats_count_every_outcome(make):
    sink = Recorder(fail=lambda item, attempt: item == 3 or (item == 5 and attempt == 1))
    c = make(sink, retries=1, backoff=0.001)
    for n in range(10):
        c.send(n)
    assert c.flush(timeout=10)
    s = c.stats
    assert (s.accepted, s.delivered, s.failed, s.retried, s.dropped) == (10, 9, 1, 2, 0)
    assert (s.queued, s.in_flight, s.paused) == (0, 0, 0)
    assert s.as_dict()["delivered"] == 9
    assert "delivered=9" in repr(s)


def test_pause_and_resume_a_lane(make):
    broken = {"b"}
    seen = []

    def sink(item):
        key, n = item
        if key in broken:
            raise RuntimeError(f"{key} is down")
        seen.append(item)

    c = make(sink, ordering="keyed", on_failure="pause")
    c.send(("a", 1), key="a")
    c.send(("b", 1), key="b")
    c.send(("b", 2), key="b")
    c.send(("a", 2), key="a")
    wait_until(lambda: c.paused() == ["b"] and c.stats.delivered == 2)
    assert c.stats.paused == 1
    assert ("b", 2) not in seen  # the lane waits behind its failed head
    broken.clear()
    assert c.resume("b") is True
    assert c.flush(timeout=10)
    # The held item is delivered first on resume, then the rest of its lane, in order.
    assert [i for i in seen if i[0] == "b"] == [("b", 1), ("b", 2)]
    assert c.paused() == []
    assert c.resume("b") is False


def test_close_reports_what_was_left(make):
    gate = threading.Event()
    c = make(lambda x: gate.wait(30))
    for n in range(5):
        c.send(n)
    report = c.close(timeout=0.2)
    assert report.left == 5
    assert not report.drained
    assert report.stats.accepted == 5
    assert c.closed
    with pytest.raises(conveyor.Closed, match="closed"):
        c.send(6)
    gate.set()



def test_an_item_in_the_sink_at_close_is_reported_unconfirmed_and_counted_when_it_ends():
    release = threading.Event()
    c = conveyor.Conveyor(lambda x: release.wait(30) and "done")
    in_sink = c.send("in the sink")
    queued = c.send("queued")
    deadline = time.monotonic() + 30
    while c.stats.in_flight == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    report = c.close(timeout=0.2)
    assert report.left == 2
    with pytest.raises(conveyor.Closed, match="whether it arrived is unknown"):
        in_sink.result(timeout=5)
    with pytest.raises(conveyor.Closed, match="it was not delivered"):
        queued.result(timeout=5)
    assert "unconfirmed" in repr(in_sink)
    release.set()
    while c.stats.in_flight:
        assert time.monotonic() < deadline, c.stats
        time.sleep(0.01)
    # The call that was left running ended, and the stats say how: delivered.
    assert c.stats.delivered == 1

def test_close_twice_is_harmless(make):
    c = make(Recorder())
    c.send(1)
    first = c.close()
    second = c.close()
    assert first.drained and second.drained and second.left == 0
    assert first.stats.delivered == 1


def test_after_a_close_that_left_items_nothing_waits_again():
    # Once a close(timeout) has given up on what was left, waiting cannot help: flush, a second
    # close and the `with` exit must answer at once (not spin until their deadline, or forever
    # without one), and the `with` exit must not warn again about what close() reported.
    # In a subprocess with a watchdog, since the failure this guards against is a hang.
    code = textwrap.dedent(
        """
        import os, threading, time, conveyor
        threading.Timer(20, lambda: (print("HUNG", flush=True), os._exit(1))).start()
        release = threading.Event()
        with conveyor.Conveyor(lambda x: release.wait(10), drain_timeout=30) as c:
            for i in range(5):
                c.send(i)
            print("first left", c.close(timeout=0.2).left, flush=True)
            release.set()
            t0 = time.monotonic()
            c.flush(timeout=10)
            print("flush took %.2f" % (time.monotonic() - t0), flush=True)
            t0 = time.monotonic()
            print("second is a", type(c.close()).__name__, flush=True)
            print("second took %.2f" % (time.monotonic() - t0), flush=True)
            t0 = time.monotonic()
        print("exit took %.2f" % (time.monotonic() - t0), flush=True)
        os._exit(0)
        """
    )
    proc = run_python(code, timeout=60)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "first left 5" in out and "second is a CloseReport" in out, out
    for step in ("flush", "second", "exit"):
        took = float(out.split(f"{step} took ")[1].split()[0])
        assert took < 5, f"{step} waited {took} s for items a close had already given up on"
    assert "Warning" not in proc.stderr, proc.stderr


def test_rate_limit_spaces_out_sink_calls(make):
    # 20 calls per second: 11 calls cannot all start within less than about half a second.
    starts = []
    c = make(lambda item: starts.append(time.monotonic()), rate_limit=20)
    for n in range(11):
        c.send(n)
    assert c.flush(timeout=30)
    assert len(starts) == 11
    assert starts[-1] - starts[0] >= 0.4, starts[-1] - starts[0]
