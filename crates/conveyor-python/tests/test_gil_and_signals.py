"""Waiting releases the GIL and stays interruptible; sinks that wait or re-enter don't deadlock."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time

import pytest

import conveyor

from conftest import Recorder, interrupt_main_after


def stuck_conveyor(make, **options):
    gate = threading.Event()
    c = make(lambda item: gate.wait(60), **options)
    return c, gate


def wait_until_full(c):
    """Waits until a capacity-1 conveyor has an item in flight and one queued."""
    deadline = time.monotonic() + 10
    while c.stats.queued < 1 or c.stats.in_flight < 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_flush_releases_the_gil(make):
    c, gate = stuck_conveyor(make)
    c.send(1)
    counter = []

    def spin():
        # Pure Python work: it only progresses if flush() let go of the GIL.
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            counter.append(1)
        gate.set()

    t = threading.Thread(target=spin)
    t.start()
    assert c.flush(timeout=30)
    t.join()
    assert len(counter) > 1000


def test_ctrl_c_interrupts_flush(make):
    c, gate = stuck_conveyor(make)
    c.send(1)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        interrupt_main_after(0.2)
        c.flush()
    assert time.monotonic() - start < 5
    gate.set()


def test_ctrl_c_interrupts_receipt_result(make):
    c, gate = stuck_conveyor(make)
    r = c.send(1)
    with pytest.raises(KeyboardInterrupt):
        interrupt_main_after(0.2)
        r.result()
    gate.set()
    assert r.result(timeout=30) is True


def test_ctrl_c_interrupts_close(make):
    c, gate = stuck_conveyor(make)
    c.send(1)
    with pytest.raises(KeyboardInterrupt):
        interrupt_main_after(0.2)
        c.close()
    gate.set()
    assert c.close(timeout=30).left == 0


def test_ctrl_c_interrupts_send_on_a_full_queue(make):
    c, gate = stuck_conveyor(make, capacity=1)
    c.send(1)
    c.send(2)  # in flight + one queued: the next send must wait
    wait_until_full(c)
    with pytest.raises(KeyboardInterrupt):
        interrupt_main_after(0.2)
        c.send(3)
    gate.set()
    assert c.flush(timeout=30)
    assert c.stats.accepted == 2


def test_ctrl_c_interrupts_retry_dead_on_a_full_queue(make, tmp_path):
    gate = threading.Event()

    def sink(item):
        if item == "bad":
            raise conveyor.PermanentError("rejected")
        gate.wait(60)

    c = make(sink, capacity=1, journal=tmp_path / "events.journal")
    assert c.send("bad").exception(timeout=10) is not None
    [dead] = c.dead_letters()
    c.send(1)
    c.send(2)
    wait_until_full(c)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        interrupt_main_after(0.2)
        c.retry_dead(dead.seq)
    assert time.monotonic() - start < 5
    # Interrupted before it was accepted: still a dead letter, and retried once room is made.
    assert [d.seq for d in c.dead_letters()] == [dead.seq]
    gate.set()
    assert c.retry_dead(dead.seq).exception(timeout=30) is not None  # still "bad"
    assert c.flush(timeout=30)
    assert c.stats.accepted == 4


def test_sink_that_waits_on_another_thread(make):
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)

    def sink(item):
        # The helper thread needs the GIL to run; the sink must not be holding it while waiting.
        return pool.submit(lambda: item * 10).result(timeout=10)

    c = make(sink)
    receipts = [c.send(n) for n in range(50)]
    assert [r.result(timeout=30) for r in receipts] == [n * 10 for n in range(50)]
    pool.shutdown()


def test_sink_that_joins_a_thread(make):
    results = queue.SimpleQueue()

    def sink(item):
        t = threading.Thread(target=lambda: results.put(item))
        t.start()
        t.join(10)

    c = make(sink)
    for n in range(20):
        c.send(n)
    assert c.flush(timeout=30)
    assert [results.get_nowait() for _ in range(20)] == list(range(20))


def test_sink_sends_to_its_own_conveyor(make):
    seen = []
    holder = {}

    def sink(item):
        seen.append(item)
        if item < 5:
            holder["c"].send(item + 1)

    c = make(sink)
    holder["c"] = c
    c.send(0)
    deadline = time.monotonic() + 10
    while len(seen) < 6:
        assert time.monotonic() < deadline, seen
        time.sleep(0.005)
    assert c.flush(timeout=10)
    assert seen == [0, 1, 2, 3, 4, 5]


def test_sink_sending_to_its_own_full_conveyor_gets_queue_full(make):
    errors = []
    holder = {}

    def sink(item):
        if item == "first":
            c = holder["c"]
            c.send("fills the queue")
            try:
                c.send("no room: waiting here would wait for ourselves")
            except conveyor.QueueFull as exc:
                errors.append(exc)

    c = make(sink, capacity=1)
    holder["c"] = c
    c.send("first")
    assert c.flush(timeout=30)
    assert len(errors) == 1
    assert "own sink" in str(errors[0])


def test_flush_from_inside_the_sink_is_a_clear_error(make):
    errors = []
    holder = {}

    def sink(item):
        try:
            holder["c"].flush()
        except RuntimeError as exc:
            errors.append(exc)

    c = make(sink)
    holder["c"] = c
    c.send(1)
    assert c.flush(timeout=30)
    assert len(errors) == 1 and "own sink" in str(errors[0])


def test_waiting_for_a_later_item_from_inside_the_sink_is_a_clear_error(make):
    # Strict: the later item can only start once this sink call returns, so result() without
    # a timeout would wait forever. With a timeout it waits as asked, and times out.
    outcomes = []
    holder = {}

    def sink(item):
        if item != "first":
            return item
        later = holder["c"].send("second")
        try:
            later.result()
        except RuntimeError as exc:
            outcomes.append(exc)
        try:
            later.result(timeout=0.05)
        except TimeoutError as exc:
            outcomes.append(exc)
        return item

    c = make(sink)
    holder["c"] = c
    c.send("first")
    assert c.flush(timeout=30)
    assert [type(o) for o in outcomes] == [RuntimeError, TimeoutError], outcomes
    assert "own sink" in str(outcomes[0]) and "timeout" in str(outcomes[0])
    assert c.stats.delivered == 2


def test_many_threads_send_while_sink_is_slow(make):
    sink = Recorder(delay=0.0005)
    c = make(sink, capacity=16)
    threads = [threading.Thread(target=lambda t=t: [c.send((t, n)) for n in range(100)]) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert c.flush(timeout=60)
    assert len(sink.items) == 400


def test_ctrl_c_interrupts_asend_on_a_full_queue(make):
    c, gate = stuck_conveyor(make, capacity=1)
    c.send(1)
    c.send(2)  # in flight + one queued: the next asend must wait
    wait_until_full(c)

    async def main():
        await c.asend(3)

    with pytest.raises(KeyboardInterrupt):
        interrupt_main_after(0.2)
        asyncio.run(main())
    gate.set()
    assert c.flush(timeout=30)
    assert c.stats.accepted == 2  # the interrupted asend's item was never accepted
