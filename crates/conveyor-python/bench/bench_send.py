"""Producer cost per send and end-to-end throughput: conveyor vs the usual Python tools.

Runs everything side by side in one process, so the ratios compare like with like:

    .venv/bin/python crates/conveyor-python/bench/bench_send.py            # after scripts/test-python.sh
    .venv/bin/python crates/conveyor-python/bench/bench_send.py --n 200000 --repeat 5

Each contender delivers N items to a trivial sink (it appends to a list):

* producer cost: time of the producer's loop divided by N (the loop itself included);
* end-to-end: N divided by the time from the first send until the sink has seen every item.

`await asyncio.to_thread(...)` is run per item, as people do to keep order, so its producer
cost and end-to-end time are the same thing; it runs on N/20 items to keep the run short.
Prints a Markdown table (best of --repeat runs) with ratios against conveyor.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import gc
import platform
import queue
import sys
import threading
import time
from typing import Callable, Dict, List, Tuple

import conveyor

Result = Tuple[float, float]  # (producer seconds per item, end-to-end items per second)


def bench_conveyor(n: int) -> Result:
    out: List[int] = []
    c = conveyor.Conveyor(out.append, capacity=n)
    send = c.send
    start = time.perf_counter()
    for i in range(n):
        send(i)
    produced = time.perf_counter()
    c.flush()
    done = time.perf_counter()
    assert len(out) == n
    c.close()
    return (produced - start) / n, n / (done - start)


def bench_executor(make: Callable[[int], concurrent.futures.Executor], n: int) -> Result:
    out: List[int] = []
    ex = make(n)
    submit = ex.submit
    start = time.perf_counter()
    for i in range(n):
        submit(out.append, i)
    produced = time.perf_counter()
    ex.shutdown(wait=True)
    done = time.perf_counter()
    assert len(out) == n
    return (produced - start) / n, n / (done - start)


def bench_simple_queue(n: int) -> Result:
    out: List[int] = []
    q: "queue.SimpleQueue[object]" = queue.SimpleQueue()
    stop = object()

    def consumer() -> None:
        get = q.get
        sink = out.append
        while True:
            item = get()
            if item is stop:
                return
            sink(item)  # type: ignore[arg-type]

    t = threading.Thread(target=consumer)
    t.start()
    put = q.put
    start = time.perf_counter()
    for i in range(n):
        put(i)
    produced = time.perf_counter()
    put(stop)
    t.join()
    done = time.perf_counter()
    assert len(out) == n
    return (produced - start) / n, n / (done - start)


def bench_to_thread(n: int) -> Result:
    out: List[int] = []

    async def main() -> float:
        start = time.perf_counter()
        for i in range(n):
            await asyncio.to_thread(out.append, i)
        return time.perf_counter() - start

    elapsed = asyncio.run(main())
    assert len(out) == n
    return elapsed / n, n / elapsed


CONTENDERS: Dict[str, Tuple[Callable[[int], Result], int]] = {
    # name: (function, divisor of N)
    "conveyor `Conveyor.send`": (bench_conveyor, 1),
    "conveyor `SerialExecutor.submit`": (
        functools.partial(bench_executor, lambda n: conveyor.SerialExecutor(capacity=n)),
        1,
    ),
    "`ThreadPoolExecutor(1).submit`": (
        functools.partial(bench_executor, lambda n: concurrent.futures.ThreadPoolExecutor(max_workers=1)),
        1,
    ),
    "`queue.SimpleQueue` + thread": (bench_simple_queue, 1),
    "`await asyncio.to_thread` per item": (bench_to_thread, 20),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="items per run (default 100000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender; the best is kept")
    args = parser.parse_args()

    best: Dict[str, Result] = {}
    for _ in range(args.repeat):
        # Interleaved, so a noisy moment on the machine hits every contender alike.
        for name, (fn, divisor) in CONTENDERS.items():
            gc.collect()
            cost, rate = fn(max(1, args.n // divisor))
            old = best.get(name)
            best[name] = (min(cost, old[0]), max(rate, old[1])) if old else (cost, rate)

    base_cost, base_rate = best["conveyor `Conveyor.send`"]
    sq_rate = best["`queue.SimpleQueue` + thread"][1]
    print(f"Python {platform.python_version()} on {platform.machine()}, N={args.n}, best of {args.repeat}\n")
    print("| contender | producer cost per item | vs `Conveyor.send` | end-to-end items/s | vs SimpleQueue + thread |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (cost, rate) in best.items():
        print(
            f"| {name} | {cost * 1e6:.3f} µs | {cost / base_cost:.1f}x | {rate:,.0f} | {rate / sq_rate:.2f} |"
        )
    tpe_cost = best["`ThreadPoolExecutor(1).submit`"][0]
    print()
    print(f"send: {base_cost * 1e9:.0f} ns; ThreadPoolExecutor(1).submit is {tpe_cost / base_cost:.0f}x dearer")
    print(f"end-to-end: {base_rate / sq_rate:.2f} of SimpleQueue + thread")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
