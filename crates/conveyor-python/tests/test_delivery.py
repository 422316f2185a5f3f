"""conveyor.current_delivery(): what a sink knows about the item it delivers."""

from __future__ import annotations

import asyncio

import conveyor


def test_blocking_sink_sees_seq_attempt_and_a_stable_idempotency_key(make):
    seen = []

    def sink(item):
        d = conveyor.current_delivery()
        seen.append((item, d.seq, d.attempt, d.key, d.idempotency_key))
        if item == "flaky" and d.attempt == 1:
            raise ConnectionError("lost the answer")

    c = make(sink, retries=2, backoff=0.001)
    c.send("first")
    c.send("flaky")
    assert c.flush(timeout=10)
    assert [(i, s, a, k) for i, s, a, k, _ in seen] == [
        ("first", 1, 1, None),
        ("flaky", 2, 1, None),
        ("flaky", 2, 2, None),
    ]
    keys = [key for *_, key in seen]
    assert keys[1] == keys[2], "a retry keeps its idempotency key"
    assert keys[0] != keys[1]
    assert all(keys)


def test_keyed_sink_sees_its_key(make):
    keys = []
    c = make(lambda item: keys.append(conveyor.current_delivery().key), ordering="keyed")
    c.send(1, key="user-42")
    assert c.flush(timeout=10)
    assert keys == ["user-42"]


def test_outside_a_sink_there_is_no_delivery(make):
    assert conveyor.current_delivery() is None
    c = make(lambda item: None)
    c.send(1)
    assert c.flush(timeout=10)
    assert conveyor.current_delivery() is None


def test_async_sinks_each_see_their_own_delivery(make):
    seen = []

    async def sink(item):
        before = conveyor.current_delivery()
        await asyncio.sleep(0.01)  # other deliveries run meanwhile on the same loop
        after = conveyor.current_delivery()
        seen.append((item, before.seq, after.seq))

    c = make(sink, ordering="pipelined", in_flight=4)
    for n in range(8):
        c.send(n)
    assert c.flush(timeout=10)
    assert sorted(seen) == [(n, n + 1, n + 1) for n in range(8)]
