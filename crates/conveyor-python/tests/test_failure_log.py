"""Items that fail for good are logged on the "conveyor" logger, even when nobody keeps receipts."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from typing import Iterator, List

import pytest

import conveyor

from conftest import Recorder, run_python


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Captures what the "conveyor" logger logs, whatever its level was."""
    with caplog.at_level(logging.DEBUG, logger="conveyor"):
        yield caplog


def conveyor_records(caplog: pytest.LogCaptureFixture) -> List[logging.LogRecord]:
    # Read at the end: pytest gives each phase of a test a new list of records.
    return [r for r in caplog.records if r.name == "conveyor"]


def test_a_fire_and_forget_failing_sink_logs_each_failure(make, records):
    def broken(item):
        raise ValueError(f"rejected {item}")

    c = make(broken, name="events")
    for n in range(3):
        c.send(n)  # receipts dropped: the log is the only report
    assert c.flush(timeout=10)
    logged = conveyor_records(records)
    assert [r.levelno for r in logged] == [logging.WARNING] * 3
    assert [r.getMessage() for r in logged] == [
        f'conveyor "events": item {seq} failed after 1 attempt(s) and was skipped: '
        f"ValueError: rejected {seq - 1}"
        for seq in (1, 2, 3)
    ]
    for record in logged:
        assert record.exc_info is not None
        exc_type, exc, tb = record.exc_info
        assert exc_type is ValueError and tb is not None, "the traceback goes with the record"


def test_retryable_failures_log_only_the_last_attempt(make, records):
    # Item "flaky" works on its second attempt: never logged. Item "down" never works: logged
    # once, after its third. Item "poison" raises PermanentError: logged on its first.
    def fail(item, attempt):
        return item == "down" or (item == "flaky" and attempt == 1)

    recorder = Recorder(fail=fail)

    def sink(item):
        if item == "poison":
            raise conveyor.PermanentError("never valid")
        return recorder(item)

    c = make(sink, retries=2, backoff=0.001)
    for item in ["flaky", "down", "poison"]:
        c.send(item)
    assert c.flush(timeout=10)
    assert recorder.attempts == {"flaky": 2, "down": 3}
    messages = [r.getMessage() for r in conveyor_records(records)]
    assert messages == [
        "conveyor: item 2 failed after 3 attempt(s) and was skipped: "
        "ValueError: sink failed on 'down' (attempt 3)",
        "conveyor: item 3 failed after 1 attempt(s) and was skipped: "
        "PermanentError: never valid",
    ]


def test_a_pause_logs_and_so_does_the_next_pause_after_resume(make, records):
    recorder = Recorder(fail=lambda item, attempt: True)
    c = make(recorder, ordering="keyed", on_failure="pause", retries=1, backoff=0.001)
    c.send("a", key="user-1")
    assert c.flush(timeout=10)
    assert c.paused() == ["user-1"]
    assert [r.getMessage() for r in conveyor_records(records)] == [
        'conveyor: item 1 (key "user-1") failed after 2 attempt(s) and paused its lane until '
        "resume(\"user-1\"): ValueError: sink failed on 'a' (attempt 2)"
    ]
    # The resume gives a fresh budget of two attempts (3 and 4): only the 4th is the last.
    assert c.resume("user-1")
    assert c.flush(timeout=10)
    assert c.paused() == ["user-1"]
    assert recorder.attempts == {"a": 4}
    logged = conveyor_records(records)
    assert len(logged) == 2, [r.getMessage() for r in logged]
    assert "failed after 4 attempt(s) and paused its lane" in logged[1].getMessage()
    c.close(timeout=0)


def test_a_strict_pause_names_resume_without_a_key(make, records):
    c = make(Recorder(fail=lambda item, attempt: True), on_failure="pause")
    c.send("a")
    assert c.flush(timeout=10)
    assert conveyor_records(records)[0].getMessage().startswith(
        "conveyor: item 1 failed after 1 attempt(s) and paused its lane until resume(): "
    )
    c.close(timeout=0)


def test_with_a_journal_the_log_says_the_item_is_a_dead_letter(make, records, tmp_path):
    c = make(Recorder(fail=lambda item, attempt: True), journal=str(tmp_path / "j"))
    c.send("a")
    assert c.flush(timeout=10)
    assert [d.seq for d in c.dead_letters()] == [1]
    assert conveyor_records(records)[0].getMessage().startswith(
        "conveyor: item 1 failed after 1 attempt(s) and was kept as a dead letter "
        "(see dead_letters()): ValueError"
    )


def test_an_async_sink_failure_is_logged_too(make, records):
    async def broken(item):
        await asyncio.sleep(0)
        raise ConnectionError(f"refused {item}")

    c = make(broken, name="aio", ordering="pipelined")
    c.send("x")
    assert c.flush(timeout=10)
    logged = conveyor_records(records)
    assert [r.getMessage() for r in logged] == [
        'conveyor "aio": item 1 failed after 1 attempt(s) and was skipped: '
        "ConnectionError: refused x"
    ]
    assert logged[0].exc_info is not None and logged[0].exc_info[0] is ConnectionError


def test_a_blocking_sink_that_returns_a_coroutine_is_logged(make, records):
    async def post(item):
        pass

    c = make(lambda item: post(item))
    c.send("x")
    assert c.flush(timeout=10)
    [record] = conveyor_records(records)
    assert "returned a coroutine" in record.getMessage()


def test_setting_the_loggers_level_silences_it(make, records):
    logger = logging.getLogger("conveyor")
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        c = make(Recorder(fail=lambda item, attempt: True))
        receipt = c.send("a")
        assert c.flush(timeout=10)
    finally:
        logger.setLevel(before)
    assert conveyor_records(records) == []
    # Silenced, not lost: the receipt and the stats still say so.
    assert isinstance(receipt.exception(timeout=0), conveyor.DeliveryFailed)
    assert c.stats.failed == 1


def test_an_unconfigured_program_prints_the_failure_on_stderr():
    # No logging.basicConfig: logging's last-resort handler writes WARNING records to stderr.
    proc = run_python(
        textwrap.dedent(
            """
            import conveyor
            def send_to_space(item):
                raise ValueError("service says no")
            c = conveyor.Conveyor(send_to_space, name="events")
            c.send({"n": 1})
            c.flush()
            print("done", flush=True)
            """
        )
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert (
        'conveyor "events": item 1 failed after 1 attempt(s) and was skipped: '
        "ValueError: service says no\nTraceback (most recent call last):\n"
    ) in proc.stderr, proc.stderr
    assert 'line 4, in send_to_space\n' in proc.stderr, "the traceback shows the sink"


def test_an_http_conveyor_logs_its_final_failures(records):
    from test_http import Server

    server = Server()
    # A 400 is permanent: logged at once; a 503 is retried: logged only after the last attempt.
    server.script = [(400, {}), (503, {}), (503, {})]
    try:
        with conveyor.Conveyor.http(server.url, retries=1, backoff=0.01, name="hooks") as c:
            for body in ("bad", "down", "good"):
                c.send(body)  # fire and forget
            assert c.flush(timeout=10)
    finally:
        server.close()
    logged = conveyor_records(records)
    assert [r.levelno for r in logged] == [logging.WARNING] * 2
    messages = [r.getMessage() for r in logged]
    assert messages[0].startswith('conveyor "hooks": item 1 failed after 1 attempt(s) and was skipped')
    assert "400" in messages[0]
    assert messages[1].startswith('conveyor "hooks": item 2 failed after 2 attempt(s) and was skipped')
    assert "503" in messages[1]
    assert all(r.exc_info is None for r in logged), "no Python exception to show"
    assert server.bodies == [b"good"]
