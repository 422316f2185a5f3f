"""Checked by `mypy --strict` (scripts/test-python.sh): the stubs describe real usage."""

from __future__ import annotations

import asyncio
import concurrent.futures

import conveyor


def send_to_space(item: dict[str, int]) -> int:
    return item["n"]


async def async_send(item: str) -> None:
    await asyncio.sleep(0)


def sync_usage() -> int:
    with conveyor.Conveyor(send_to_space, ordering="keyed", concurrency=16, retries=5) as c:
        receipt: conveyor.Receipt[int] = c.send({"n": 1}, key="user-42")
        value: int = receipt.result(timeout=1.0)
        c.flush(timeout=5)
        stats: conveyor.Stats = c.stats
        paused: list[str] = c.paused()
        c.resume("user-42")
        future: concurrent.futures.Future[int] = receipt.future()
        receipt.add_done_callback(lambda r: print(r.seq))
    report: conveyor.CloseReport = c.close(timeout=1.0)
    return value + stats.delivered + report.left + len(paused) + future.result()


async def async_usage() -> None:
    async with conveyor.Conveyor(async_send) as c:
        receipt = await c.asend("x")
        await receipt
        ok: bool = await c.aflush()
        assert ok
        on_disk: bool = await asyncio.wait_for(c.await_committed(receipt), timeout=5)
        assert on_disk and c.wait_committed(receipt, timeout=1.0)


def executor_usage() -> str:
    with conveyor.SerialExecutor(capacity=10) as ex:
        return ex.submit(str.upper, "a").result()


def errors() -> None:
    try:
        raise conveyor.DeliveryFailed("x", attempts=2, last_exception=ValueError())
    except conveyor.ConveyorError as exc:
        assert isinstance(exc, conveyor.DeliveryFailed)
        print(exc.attempts, exc.last_exception)


def delivery_usage(item: str) -> str:
    d = conveyor.current_delivery()
    return "" if d is None else f"{d.seq}/{d.attempt}/{d.key}/{d.idempotency_key}"


def http_usage() -> int:
    with conveyor.Conveyor.http(
        "http://127.0.0.1:9/x", headers={"X-Token": "t"}, retries=3, max_reply_body=None
    ) as c:
        reply: conveyor.HttpReply = c.send({"n": 1}).result()
        truncated: bool = reply.truncated
        return reply.status + len(reply.body) + int(truncated)


async def asend_as_task() -> int:
    async with conveyor.Conveyor(send_to_space) as c:
        receipt = await asyncio.create_task(c.asend({"n": 1}))
        return await receipt


def journal_usage(path: str) -> int:
    with conveyor.Journal(path, read_only=True) as monitor:
        status: conveyor.JournalStatus = monitor.status()
        lanes: list[conveyor.LaneStatus] = status.lanes
        paused: str | None = lanes[0].paused
        dead: list[conveyor.DeadLetter] = monitor.dead_letters()
        cursor: int | None = monitor.cursor()
    with conveyor.Journal(path) as journal:
        new_seq: int = journal.retry_dead(dead[0].seq)
        resumed: bool = journal.resume("user-42")
        journal.set_cursor(cursor or 0)
    return status.pending + new_seq + int(resumed) + len(paused or "")
