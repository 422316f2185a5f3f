"""SerialExecutor passes the same checks as ThreadPoolExecutor(max_workers=1)."""

from __future__ import annotations

import concurrent.futures
import gc
import re
import textwrap
import threading
import time

import pytest

import conveyor

from conftest import run_python


def thread_pool():
    return concurrent.futures.ThreadPoolExecutor(max_workers=1)


@pytest.fixture(params=[thread_pool, conveyor.SerialExecutor], ids=["ThreadPoolExecutor(1)", "SerialExecutor"])
def executor_factory(request):
    return request.param


def test_is_an_executor(executor_factory):
    with executor_factory() as ex:
        assert isinstance(ex, concurrent.futures.Executor)


def test_submit_returns_futures_with_results(executor_factory):
    with executor_factory() as ex:
        futures = [ex.submit(pow, 2, n) for n in range(10)]
        assert [f.result(timeout=10) for f in futures] == [2**n for n in range(10)]
        assert all(isinstance(f, concurrent.futures.Future) for f in futures)


def test_runs_calls_one_at_a_time_in_order(executor_factory):
    order = []
    active = []

    def task(n):
        active.append(n)
        assert len(active) == 1
        time.sleep(0.001)
        order.append(n)
        active.remove(n)

    with executor_factory() as ex:
        futures = [ex.submit(task, n) for n in range(50)]
    assert order == list(range(50))
    assert all(f.exception() is None for f in futures)


def test_exceptions_go_to_the_future_and_later_calls_still_run(executor_factory):
    def boom():
        raise ValueError("boom")

    with executor_factory() as ex:
        bad = ex.submit(boom)
        good = ex.submit(lambda: "fine")
        with pytest.raises(ValueError, match="boom"):
            bad.result(timeout=10)
        assert good.result(timeout=10) == "fine"


def test_kwargs_are_passed(executor_factory):
    with executor_factory() as ex:
        assert ex.submit(dict, a=1, b=2).result(timeout=10) == {"a": 1, "b": 2}


def test_map_keeps_order(executor_factory):
    with executor_factory() as ex:
        assert list(ex.map(lambda x, y: x * y, range(20), range(20), timeout=10)) == [n * n for n in range(20)]


def test_shutdown_wait_runs_everything(executor_factory):
    done = []
    ex = executor_factory()
    for n in range(20):
        ex.submit(lambda n=n: (time.sleep(0.001), done.append(n)))
    ex.shutdown(wait=True)
    assert done == list(range(20))


def test_submit_after_shutdown_raises_runtime_error(executor_factory):
    ex = executor_factory()
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(print)


def test_submit_after_the_interpreter_exit_drain_raises_runtime_error():
    # An atexit handler registered before `import conveyor` runs after conveyor's exit hook
    # has closed the executor's conveyor (without shutdown()). ThreadPoolExecutor raises
    # RuntimeError there; so must its drop-in, without keeping the refused future.
    code = textwrap.dedent(
        """
        import atexit, concurrent.futures as cf
        def late():
            for name, ex in [("TPE", tpe), ("Serial", ser)]:
                try:
                    ex.submit(int, "5").result(2)
                    print(name, "ran")
                except BaseException as exc:
                    print(name, type(exc).__name__)
            print("pending", len(ser._pending))
        atexit.register(late)
        import conveyor
        tpe = cf.ThreadPoolExecutor(max_workers=1)
        ser = conveyor.SerialExecutor()
        """
    )
    proc = run_python(code, timeout=60)
    assert "TPE RuntimeError" in proc.stdout, proc.stdout + proc.stderr
    assert "Serial RuntimeError" in proc.stdout, proc.stdout + proc.stderr
    assert "pending 0" in proc.stdout, proc.stdout + proc.stderr


def test_shutdown_cancel_futures_cancels_pending_calls(executor_factory):
    gate, started = threading.Event(), threading.Event()
    ex = executor_factory()

    def first_call():
        started.set()
        return gate.wait(10)

    first = ex.submit(first_call)
    # The first call must be running, not queued, or the shutdown cancels it too (a fixed
    # 50 ms sleep here was not always enough on a loaded machine).
    assert started.wait(10)
    pending = [ex.submit(lambda: None) for _ in range(5)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in pending)
    gate.set()
    assert first.result(timeout=10) is True
    ex.shutdown(wait=True)


def test_cancel_a_queued_future(executor_factory):
    gate = threading.Event()
    ran = []
    with executor_factory() as ex:
        ex.submit(gate.wait, 10)
        queued = ex.submit(ran.append, "should not run")
        assert queued.cancel()
        gate.set()
    assert ran == []
    assert queued.cancelled()


def test_as_completed_and_wait_accept_its_futures(executor_factory):
    with executor_factory() as ex:
        futures = [ex.submit(lambda n=n: n) for n in range(5)]
        assert sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=10)) == list(range(5))


def test_serial_executor_capacity_bounds_the_queue():
    gate = threading.Event()
    ex = conveyor.SerialExecutor(capacity=2)
    ex.submit(gate.wait, 10)
    time.sleep(0.05)
    ex.submit(lambda: None)
    ex.submit(lambda: None)
    blocked = threading.Event()
    finished = threading.Event()

    def fourth():
        blocked.set()
        ex.submit(lambda: None)  # waits for room: the queue holds 2
        finished.set()

    t = threading.Thread(target=fourth)
    t.start()
    assert blocked.wait(10)
    assert not finished.wait(0.2)
    gate.set()
    assert finished.wait(10)
    t.join()
    ex.shutdown()


def test_serial_executor_task_submitting_to_its_full_executor_gets_queue_full():
    ex = conveyor.SerialExecutor(capacity=1)

    def task():
        ex.submit(lambda: None)  # fills the queue
        with pytest.raises(conveyor.QueueFull):
            ex.submit(lambda: None)  # would wait for this very task to finish
        return "ok"

    assert ex.submit(task).result(timeout=10) == "ok"
    ex.shutdown()


def test_serial_executor_takes_max_workers_1_like_thread_pool_executor():
    # Swapping the class name in `ThreadPoolExecutor(1)` must not turn the 1 into a queue
    # capacity of one call (submit would then wait behind a slow call).
    gate = threading.Event()
    ex = conveyor.SerialExecutor(1)
    first = ex.submit(gate.wait, 10)
    submitted = threading.Event()

    def submit_more():
        for _ in range(5):
            ex.submit(lambda: None)
        submitted.set()

    t = threading.Thread(target=submit_more)
    t.start()
    assert submitted.wait(10), "submit waited for room although only 5 calls were queued"
    gate.set()
    t.join()
    assert first.result(timeout=10) is True
    ex.shutdown()
    with pytest.raises(ValueError, match="max_workers=2"):
        conveyor.SerialExecutor(max_workers=2)


@pytest.mark.parametrize("max_workers", ["1", [1]])
def test_serial_executor_max_workers_of_the_wrong_type_is_a_type_error(max_workers):
    # As for ThreadPoolExecutor("1"); a ValueError suggested the value, not its type, was wrong.
    with pytest.raises(TypeError, match=re.escape(f"max_workers={max_workers!r}: expected None or 1")):
        conveyor.SerialExecutor(max_workers)  # type: ignore[arg-type]


def test_a_serial_executor_whose_constructor_raised_still_has_a_repr():
    # Tracebacks and debuggers show half-made objects; their repr must not raise in turn.
    made = conveyor.SerialExecutor.__new__(conveyor.SerialExecutor)
    assert repr(made) == "<conveyor.SerialExecutor not started>"


def test_serial_executor_repr_shows_its_state_and_pending_calls():
    gate, started = threading.Event(), threading.Event()
    ex = conveyor.SerialExecutor()

    def first():
        started.set()
        gate.wait(10)

    ex.submit(first)
    assert started.wait(10)
    ex.submit(lambda: None)
    ex.submit(lambda: None)
    assert repr(ex) == "<conveyor.SerialExecutor running=1, pending=2>"
    gate.set()
    ex.shutdown()
    assert repr(ex) == "<conveyor.SerialExecutor running=0, pending=0, shutdown>"


def test_serial_executor_shutdown_wait_from_its_own_task_speaks_of_tasks():
    # ThreadPoolExecutor raises RuntimeError here too ("cannot join current thread").
    ex = conveyor.SerialExecutor()

    def task():
        with pytest.raises(RuntimeError) as info:
            ex.shutdown(wait=True)
        return str(info.value)

    message = ex.submit(task).result(timeout=10)
    assert "own tasks" in message and "sink" not in message, message
    ex.shutdown()


def test_serial_executor_submit_to_its_full_self_from_a_task_speaks_of_tasks():
    ex = conveyor.SerialExecutor(capacity=1)

    def task():
        ex.submit(lambda: None)  # fills the queue
        with pytest.raises(conveyor.QueueFull) as info:
            ex.submit(lambda: None)
        return str(info.value)

    message = ex.submit(task).result(timeout=10)
    assert "own tasks" in message and "sink" not in message and "capacity" in message, message
    ex.shutdown()


@pytest.mark.parametrize("in_a_cycle", [False, True], ids=["dropped", "collected"])
def test_serial_executor_let_go_of_with_calls_it_gave_up_on_cancels_their_futures(in_a_cycle):
    # Its drain is bounded (drain_timeout); ThreadPoolExecutor's is not. A call the drain gave up
    # on never runs, and a future left pending would hang whoever waits for its result: cancel
    # it, as shutdown(cancel_futures=True) does.
    gate, started = threading.Event(), threading.Event()
    ex = conveyor.SerialExecutor(drain_timeout=0.2)
    if in_a_cycle:
        ex.me = ex  # type: ignore[attr-defined]

    def first():
        started.set()
        return gate.wait(10)

    running = ex.submit(first)
    assert started.wait(10)
    left = [ex.submit(lambda: None) for _ in range(3)]
    with pytest.warns(RuntimeWarning, match=re.escape("left 4 item(s) undelivered")):  # 3 and the running one
        del ex
        gc.collect()
    gate.set()
    assert running.result(timeout=10) is True
    done, not_done = concurrent.futures.wait(left, timeout=10)
    assert not not_done, "futures of calls that will never run were left pending"
    assert all(f.cancelled() for f in left)


def test_serial_executor_calls_the_exit_drain_gave_up_on_have_cancelled_futures():
    # An atexit handler registered before `import conveyor` runs after conveyor's exit hook:
    # a future of a call that hook gave up on must not keep it waiting.
    code = textwrap.dedent(
        """
        import atexit, time, concurrent.futures as cf
        def late():
            try:
                left.result(timeout=10)
                print("ran")
            except BaseException as exc:
                print(type(exc).__name__)
        atexit.register(late)
        import conveyor
        ex = conveyor.SerialExecutor(drain_timeout=0.2)
        ex.submit(time.sleep, 1)
        left = ex.submit(int, "5")
        """
    )
    proc = run_python(code, timeout=60)
    assert "CancelledError" in proc.stdout, proc.stdout + proc.stderr
    assert "left 2 item(s) undelivered" in proc.stderr, proc.stderr
