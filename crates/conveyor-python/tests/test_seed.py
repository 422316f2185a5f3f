"""The seed scenario from the project vision: a loop over a slow, blocking send_to_space."""

from __future__ import annotations

import threading
import time

import conveyor

from conftest import Recorder


def test_three_items_arrive_in_order_while_the_loop_runs_on(make):
    send_to_space = Recorder(delay=0.05)
    items = [{"sub_item": n} for n in range(3)]
    c = make(send_to_space)

    start = time.perf_counter()
    for item in items:
        c.send(item["sub_item"])
    loop_time = time.perf_counter() - start
    assert c.flush(timeout=10)
    total = time.perf_counter() - start

    assert send_to_space.items == [0, 1, 2]
    # The loop does not wait for a single 50 ms send (it takes microseconds; see BENCHMARKS.md).
    assert loop_time < 0.05, loop_time
    # Strictly one after another: three sends cannot take less than 3 x 50 ms.
    assert total >= 0.15, total
    assert total < 5.0, total


def test_send_never_waits_for_a_slow_sink(make):
    # The sink is held until all 20 sends have returned: a send that waited for the sink would
    # never return. (Timing 20 sends against a 0.3 s sink instead made a preempted test thread
    # look like a send that waited.)
    gate = threading.Event()
    sink = Recorder()
    c = make(lambda item: gate.wait(30) and sink(item))
    receipts = []
    sender = threading.Thread(target=lambda: receipts.extend(c.send(n) for n in range(20)))
    sender.start()
    sender.join(30)
    returned = not sender.is_alive()
    settled = [r for r in receipts if r.done()]
    gate.set()
    assert returned, "send waited for the sink"
    assert len(receipts) == 20 and settled == [], "an item settled while the sink was held"
    assert c.flush(timeout=30)
    assert sink.items == list(range(20))


def test_with_block_drains_on_exit():
    sink = Recorder(delay=0.01)
    with conveyor.Conveyor(sink) as c:
        for n in range(10):
            c.send(n)
    assert sink.items == list(range(10))
    assert c.closed
    assert c.stats.delivered == 10
