"""Receipts behave like concurrent.futures.Future; errors are the package's exception classes."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

import conveyor

from conftest import Recorder


def test_result_returns_what_the_sink_returned(make):
    c = make(lambda x: x * 2)
    receipts = [c.send(n) for n in range(10)]
    assert [r.result(timeout=10) for r in receipts] == [n * 2 for n in range(10)]
    assert all(r.done() and not r.cancelled() for r in receipts)
    assert receipts[3].exception(timeout=10) is None
    assert "delivered" in repr(receipts[3]) or "settled" in repr(receipts[3])


def test_the_sink_gets_the_sent_object_and_its_reply_is_the_result(make):
    # The sink is called with the object itself (borrowed, no argument tuple), and a `None`
    # reply is kept without a reference: both must stay invisible to Python code.
    seen = []
    replies = {0: None, 1: "text", 2: seen}
    c = make(lambda x: (seen.append(x), replies[x["n"]])[1])
    items = [{"n": n} for n in range(3)]
    receipts = [c.send(item) for item in items]
    assert receipts[0].result(timeout=10) is None
    assert receipts[1].result(timeout=10) == "text"
    assert receipts[2].result(timeout=10) is seen
    assert all(a is b for a, b in zip(seen, items))
    assert "delivered" in repr(receipts[0]) or "settled" in repr(receipts[0])


def test_result_timeout_raises_timeout_error(make):
    gate = threading.Event()
    c = make(lambda x: gate.wait(10))
    r = c.send(1)
    with pytest.raises(concurrent.futures.TimeoutError):
        r.result(timeout=0.05)
    assert not r.done()
    gate.set()
    assert r.result(timeout=10) is True


def test_failure_raises_delivery_failed_with_attempts_and_cause(make):
    def sink(item):
        raise KeyError(f"no such user {item}")

    c = make(sink, retries=2, backoff=0.001)
    r = c.send("u1")
    with pytest.raises(conveyor.DeliveryFailed) as info:
        r.result(timeout=10)
    err = info.value
    assert isinstance(err, conveyor.ConveyorError)
    assert err.attempts == 3
    assert err.seq == r.seq
    assert isinstance(err.last_exception, KeyError)
    assert err.__cause__ is err.last_exception
    assert "3 attempt" in str(err) and "no such user u1" in str(err)
    assert isinstance(r.exception(), conveyor.DeliveryFailed)


def test_permanent_error_is_not_retried(make):
    calls = []

    def permanent(item):
        calls.append(item)
        raise conveyor.PermanentError("bad payload")

    c = make(permanent, retries=5, backoff=0.001)
    with pytest.raises(conveyor.DeliveryFailed) as info:
        c.send(1).result(timeout=10)
    assert info.value.attempts == 1
    assert isinstance(info.value.last_exception, conveyor.PermanentError)
    assert calls == [1]


def test_exception_raised_from_permanent_error_is_not_retried(make):
    calls = []

    def sink(item):
        calls.append(item)
        try:
            raise conveyor.PermanentError("HTTP 400")
        except conveyor.PermanentError as exc:
            raise RuntimeError("request rejected") from exc

    c = make(sink, retries=5, backoff=0.001)
    with pytest.raises(conveyor.DeliveryFailed) as info:
        c.send(1).result(timeout=10)
    assert info.value.attempts == 1
    assert isinstance(info.value.last_exception, RuntimeError)
    assert calls == [1]


def test_retry_after_is_retried(make):
    attempts = []

    def sink(item):
        attempts.append(item)
        if len(attempts) == 1:
            raise conveyor.RetryAfter(0.01, "HTTP 429")
        return "ok"

    c = make(sink, retries=1, backoff=0.001)
    assert c.send(1).result(timeout=10) == "ok"
    assert attempts == [1, 1]


def test_add_done_callback_gets_the_receipt(make):
    gate = threading.Event()
    c = make(lambda x: gate.wait(10) and x)
    r = c.send("a")
    got = []
    done = threading.Event()

    def callback(receipt):
        got.append((receipt is r, receipt.result()))
        done.set()

    r.add_done_callback(callback)
    gate.set()
    assert done.wait(10)
    assert got == [(True, "a")]

    # On a settled receipt the callback runs at once, on the calling thread.
    late = []
    r.add_done_callback(lambda receipt: late.append(threading.current_thread()))
    assert late == [threading.current_thread()]


def test_future_works_with_concurrent_futures_wait(make):
    c = make(lambda x: x + 1)
    futures = [c.send(n).future() for n in range(5)]
    done, not_done = concurrent.futures.wait(futures, timeout=10)
    assert not not_done
    assert sorted(f.result() for f in done) == [1, 2, 3, 4, 5]


def test_dropping_a_receipt_does_not_cancel_delivery(make):
    sink = Recorder()
    c = make(sink)
    for n in range(100):
        c.send(n)  # receipts thrown away at once
    assert c.flush(timeout=10)
    assert sink.items == list(range(100))


def test_receipt_cannot_be_cancelled(make):
    c = make(Recorder(delay=0.01))
    r = c.send(1)
    assert r.cancel() is False
    assert r.cancelled() is False
    r.result(timeout=10)


def test_a_nan_timeout_is_a_clear_error(make):
    c = make(Recorder())
    r = c.send(1)
    with pytest.raises(ValueError, match="timeout"):
        r.result(timeout=float("nan"))
    r.result(timeout=10)


def test_a_blocking_sink_that_returns_a_coroutine_fails_clearly(make):
    # `Conveyor(lambda x: client.post(x))` with an async client makes a coroutine that nothing
    # runs: reporting that as "delivered" would lose every item without a word.
    ran = []

    async def post(item):
        ran.append(item)

    c = make(lambda item: post(item), retries=3, backoff=0.001)
    with pytest.raises(conveyor.DeliveryFailed, match="async def") as info:
        c.send(1).result(timeout=10)
    assert isinstance(info.value.last_exception, TypeError)
    assert info.value.attempts == 1  # the same call cannot do better on a retry
    assert ran == []


def test_a_negative_timeout_times_out_like_a_future(make):
    # concurrent.futures.Future.result(-1) raises TimeoutError: code that passes
    # `deadline - time.monotonic()` must not get a ValueError once the deadline has passed.
    gate = threading.Event()
    c = make(lambda x: gate.wait(10))
    r = c.send(1)
    for call in (r.result, r.exception, concurrent.futures.Future().result):
        with pytest.raises(concurrent.futures.TimeoutError):
            call(timeout=-1)
    gate.set()
    assert r.result(timeout=10) is True
    assert r.result(timeout=-1) is True


def test_repr_of_a_settled_receipt_names_its_outcome(make):
    c = make(lambda x: 1 / x)
    ok, bad = c.send(1), c.send(0)
    assert c.flush(timeout=10)
    # Nobody asked for these outcomes yet: repr alone still names them.
    assert repr(ok) == "<conveyor.Receipt seq=1 delivered>"
    assert repr(bad) == "<conveyor.Receipt seq=2 failed>"
