"""The seed scenario: a loop that must hand items, in order, to a slow blocking call.

`send_to_space` stands for an unmodifiable function that wraps `requests.post` and takes about
50 ms. The loop below hands each item to a conveyor and moves on at once; the conveyor calls
`send_to_space` one item at a time, in order, on its own thread. Run it with:

    python crates/conveyor-python/examples/send_to_space.py
"""

from __future__ import annotations

import time

import conveyor


def send_to_space(sub_item: str) -> str:
    """A slow, blocking call we cannot change (here: 50 ms of pretend network)."""
    time.sleep(0.05)
    print(f"  {time.perf_counter() - START:6.3f} s  delivered {sub_item}")
    return f"ack:{sub_item}"


START = time.perf_counter()


def main() -> None:
    items = [{"sub_item": f"sub-item-{n}"} for n in range(3)]

    # Retry a failing send up to 3 more times (waiting 0.05-0.1 s, 0.1-0.2 s, then 0.2-0.4 s:
    # random within each range), and give the conveyor 10 s at interpreter exit to deliver what
    # is still queued.
    with conveyor.Conveyor(send_to_space, retries=3, backoff=0.1, drain_timeout=10) as c:
        global START
        START = time.perf_counter()
        receipts = []
        for item in items:
            receipts.append(c.send(item["sub_item"]))  # returns at once
        print(f"  {time.perf_counter() - START:6.3f} s  loop done: {len(items)} items handed over")

        # The receipts say what happened to each item (they can also be awaited in asyncio).
        print("  first reply:", receipts[0].result(timeout=5))
    # Leaving the `with` block waited for the rest (at most drain_timeout).
    print(f"  {time.perf_counter() - START:6.3f} s  all delivered: {c.stats}")


if __name__ == "__main__":
    main()
