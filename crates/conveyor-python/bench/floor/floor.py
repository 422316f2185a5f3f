"""How close the Python package can get to `queue.SimpleQueue` + a thread, end to end.

Issue #5's target: end-to-end throughput (first send to last delivery, a trivial sink) at least
half of SimpleQueue + thread. With the GIL, the producer's loop and the sink's calls cannot run
at the same time, so an item costs at least one `send` plus one sink call, whatever the engine
does between them. This times, side by side in one process:

* `floor send`: a PyO3 method (the package's PyO3 and features) that only takes the item and
  returns a fresh receipt object, as `Conveyor.send` must: no queue, no thread, no engine;
* the sink calls alone (`list.append`, as bench_send.py's sink), made from Rust over a list
  of the items with the GIL held throughout, as a delivery thread would at best;
* SimpleQueue + thread, end to end, as bench_send.py runs it;
* conveyor's own `send` and end-to-end, for reference.

Run by run.sh; prints the best of --repeat runs in ns per item.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict

import _floor  # built by run.sh
from bench_send import bench_conveyor, bench_simple_queue  # the same runs as bench_send.py


def loop(fn: Callable[[int], object], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="items per run (default 100000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each; the best is kept (default 5)")
    args = parser.parse_args()
    n = args.n
    best: Dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(seconds, best.get(name, seconds))

    for _ in range(args.repeat):
        # Interleaved, so a noisy moment on the machine hits every row alike.
        keep("floor send (PyO3 method returning a fresh receipt)", loop(_floor.Floor().send, n))
        items = list(range(n))
        start = time.perf_counter()
        assert _floor.Floor.deliver([].append, items) == 0
        keep("sink calls from Rust, GIL held (list.append)", (time.perf_counter() - start) / n)
        keep("SimpleQueue + thread, end to end", 1 / bench_simple_queue(n)[1])
        send, rate = bench_conveyor(n)
        keep("conveyor send", send)
        keep("conveyor, end to end", 1 / rate)

    for name, seconds in best.items():
        print(f"| {name} | {seconds * 1e9:.0f} ns |")
    sq = best["SimpleQueue + thread, end to end"]
    floor = best["floor send (PyO3 method returning a fresh receipt)"] + best["sink calls from Rust, GIL held (list.append)"]
    print()
    print(f"target: end to end within {2 * sq * 1e9:.0f} ns per item (half of SimpleQueue + thread)")
    print(f"floor: {floor * 1e9:.0f} ns per item (floor send + sink call), at best {sq / floor:.2f} of SimpleQueue + thread")
    print(f"conveyor: {sq / best['conveyor, end to end']:.2f} of SimpleQueue + thread")


if __name__ == "__main__":
    main()
