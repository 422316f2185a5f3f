"""Order holds under every mode, with sink exceptions, with retries, across sending threads."""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict

import pytest

import conveyor
from conftest import Recorder


def test_strict_delivers_in_submission_order(make):
    sink = Recorder()
    c = make(sink)
    receipts = [c.send(n) for n in range(2000)]
    assert c.flush(timeout=30)
    assert sink.items == list(range(2000))
    assert [r.seq for r in receipts] == list(range(1, 2001))


def test_strict_never_runs_two_items_at_once(make):
    active = 0
    peak = 0
    lock = threading.Lock()

    def sink(item):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.001)
        with lock:
            active -= 1

    c = make(sink)
    for n in range(50):
        c.send(n)
    assert c.flush(timeout=30)
    assert peak == 1


def test_strict_order_with_failures_and_retries(make):
    # Every third item fails on its first two attempts; retries happen in place, so the
    # delivered order is still the submission order.
    sink = Recorder(fail=lambda item, attempt: item % 3 == 0 and attempt <= 2)
    c = make(sink, retries=3, backoff=0.001)
    receipts = [c.send(n) for n in range(60)]
    assert c.flush(timeout=30)
    assert sink.items == list(range(60))
    assert all(r.result() == ("ok", n) for n, r in enumerate(receipts))
    assert c.stats.retried == 2 * 20


def test_retry_n_waits_between_half_and_all_of_the_doubling_capped_backoff(make):
    # As documented: retry n waits a random time in [d/2, d], d = backoff * 2**(n-1) capped
    # at max_backoff. Here d is 0.4 s, then 0.6 s twice (0.8 s and 1.6 s capped).
    starts = []

    def sink(item):
        starts.append(time.monotonic())
        raise ValueError("fails every time")

    c = make(sink, retries=3, backoff=0.4, max_backoff=0.6)
    assert c.send(1).exception(timeout=30) is not None
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
    assert len(gaps) == 3
    # A wait can only come late (a busy machine), never early: the lower bound is exact.
    late = 0.2
    for gap, delay in zip(gaps, [0.4, 0.6, 0.6]):
        assert delay / 2 <= gap <= delay + late, f"gaps {gaps}, delay {delay}"


def test_strict_skips_failed_items_and_keeps_order(make):
    sink = Recorder(fail=lambda item, attempt: item % 5 == 0)
    c = make(sink)
    for n in range(50):
        c.send(n)
    assert c.flush(timeout=30)
    assert sink.items == [n for n in range(50) if n % 5 != 0]
    assert sink.calls == list(range(50))
    assert c.stats.failed == 10


def test_pipelined_starts_in_order_and_bounds_in_flight(make):
    started = []
    active = 0
    peak = 0
    lock = threading.Lock()

    def sink(item):
        nonlocal active, peak
        with lock:
            started.append(item)
            active += 1
            peak = max(peak, active)
        time.sleep(random.uniform(0, 0.003))
        with lock:
            active -= 1
        return item

    c = make(sink, ordering="pipelined", in_flight=4)
    receipts = [c.send(n) for n in range(200)]
    assert c.flush(timeout=30)
    # Items are handed out in order; the workers then race for the GIL to enter the sink, so
    # entry order may be shuffled a little, within a few windows of in_flight items.
    assert sorted(started) == list(range(200))
    assert all(abs(pos - n) < 3 * 4 for pos, n in enumerate(started)), started
    assert 1 <= peak <= 4
    assert [r.result() for r in receipts] == list(range(200))



def test_a_pipelined_retry_is_not_overtaken_during_its_backoff(make):
    log = []
    lock = threading.Lock()

    def sink(item):
        with lock:
            log.append((item, conveyor.current_delivery().attempt))
        if item == 0 and conveyor.current_delivery().attempt == 1:
            raise ValueError("the first attempt of item 0 fails")
        time.sleep(0.02)  # in 0.5 s of backoff, the free worker could run every other item

    c = make(sink, ordering="pipelined", in_flight=2, retries=1, backoff=0.5)
    for n in range(20):
        c.send(n)
    assert c.flush(timeout=30)
    retry_at = log.index((0, 2))
    # Only what was already taken when item 0 failed may start before its retry: the item in
    # flight beside it (and, with unlucky scheduling, the one after).
    started_before = [item for item, _ in log[:retry_at] if item != 0]
    assert len(started_before) <= 2, f"started during item 0's backoff: {log}"
    assert sorted(item for item, attempt in log if attempt == 1) == list(range(20))

def test_keyed_keeps_order_per_key(make):
    seen = defaultdict(list)
    lock = threading.Lock()

    def sink(item):
        key, n = item
        time.sleep(random.uniform(0, 0.002))
        with lock:
            seen[key].append(n)

    c = make(sink, ordering="keyed", concurrency=4)
    for n in range(100):
        for key in ("a", "b", "c", "d", "e"):
            c.send((key, n), key=key)
    assert c.flush(timeout=30)
    assert set(seen) == {"a", "b", "c", "d", "e"}
    for key, ns in seen.items():
        assert ns == list(range(100)), key


def test_keyed_with_retries_keeps_order_per_key(make):
    seen = defaultdict(list)
    attempts = defaultdict(int)
    lock = threading.Lock()

    def sink(item):
        key, n = item
        with lock:
            attempts[item] += 1
            if n % 4 == 1 and attempts[item] == 1:
                raise ConnectionError("transient")
            seen[key].append(n)

    c = make(sink, ordering="keyed", concurrency=8, retries=2, backoff=0.001)
    for n in range(40):
        for key in ("x", "y", "z"):
            c.send((key, n), key=key)
    assert c.flush(timeout=30)
    for key in ("x", "y", "z"):
        assert seen[key] == list(range(40))


def test_order_across_sending_threads(make):
    # Each thread's items arrive in that thread's order, and the global order is the order in
    # which send() accepted them (their sequence numbers).
    sink = Recorder()
    c = make(sink)
    accepted = []
    lock = threading.Lock()

    def producer(tid):
        for n in range(500):
            r = c.send((tid, n))
            with lock:
                accepted.append((r.seq, (tid, n)))

    threads = [threading.Thread(target=producer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.flush(timeout=30)
    assert len(sink.items) == 2000
    for tid in range(4):
        assert [n for t, n in sink.items if t == tid] == list(range(500))
    assert sink.items == [item for _, item in sorted(accepted)]


@pytest.mark.parametrize("ordering", ["strict", "pipelined", "keyed"])
def test_every_mode_delivers_everything_once(make, ordering):
    sink = Recorder()
    c = make(sink, ordering=ordering)
    for n in range(300):
        c.send(n, key=str(n % 7)) if ordering == "keyed" else c.send(n)
    assert c.flush(timeout=30)
    assert sorted(sink.items) == list(range(300))
    assert c.stats.delivered == 300


def test_key_on_a_strict_conveyor_is_a_clear_error(make):
    c = make(Recorder())
    with pytest.raises(ValueError, match="ordering=\"keyed\""):
        c.send(1, key="k")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ordering": "random"}, "ordering"),
        ({"ordering": "strict", "concurrency": 3}, "concurrency"),
        ({"ordering": "keyed", "in_flight": 3}, "in_flight"),
        ({"backpressure": "sometimes"}, "backpressure"),
        ({"on_failure": "explode"}, "on_failure"),
        ({"drain_timeout": -1.0}, "drain_timeout"),
        ({"capacity": 0}, "capacity"),
        # Checked without retries too (the default retries=0): a mistake either way.
        ({"backoff": float("inf")}, "backoff"),
        ({"max_backoff": -1.0}, "max_backoff"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    import conveyor

    with pytest.raises(ValueError, match=message):
        conveyor.Conveyor(print, **options)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0])
@pytest.mark.parametrize("option", ["drain_timeout", "backoff", "http timeout"])
def test_a_bad_duration_names_the_argument_and_offers_only_what_it_takes(option, value):
    import conveyor

    def make(value):
        if option == "http timeout":
            return conveyor.Conveyor.http("http://127.0.0.1:9/", timeout=value)
        return conveyor.Conveyor(print, retries=1, **{option: value})

    name = option.split()[-1]
    with pytest.raises(ValueError, match=f"^{name}=") as info:
        make(value)
    # These take no None: the message must not suggest it.
    assert "None" not in str(info.value), str(info.value)
    with pytest.raises(TypeError):
        make(None)


def test_a_bad_optional_duration_says_what_none_means(make):
    import conveyor

    with pytest.raises(ValueError, match=r"^max_backoff=inf: .*, or None for the default cap of 30 s$"):
        conveyor.Conveyor(print, retries=1, max_backoff=float("inf"))
    c = make(print)
    with pytest.raises(ValueError, match=r"^timeout=-1: .*, or None to wait forever$"):
        c.flush(timeout=-1)
    assert c.flush(timeout=None)


def test_sink_must_be_callable():
    import conveyor

    with pytest.raises(TypeError, match="callable"):
        conveyor.Conveyor(42)  # type: ignore[arg-type]
