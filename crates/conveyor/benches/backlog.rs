//! A strict worker draining a backlog alone: 100,000 items queued behind a held first item,
//! then released, with an instant sink. Made to be counted rather than timed (wall time on a
//! shared machine is noise; instructions are not):
//!
//! ```sh
//! cargo bench -p conveyor --bench backlog --no-run   # prints the binary's path
//! valgrind --tool=callgrind --callgrind-out-file=backlog.out target/release/deps/backlog-HASH
//! callgrind_annotate --inclusive=yes backlog.out | grep -E 'thread_worker|settle_all|::step '
//! ```
//!
//! The worker thread's inclusive count divided by the item count is the worker's
//! instructions per item (`BENCHMARKS.md`). Run plainly, it prints the wall time per item.

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Instant;

use conveyor::{Conveyor, Delivery};

const ITEMS: u64 = 100_000;

fn main() {
    let open = Arc::new(AtomicBool::new(false));
    let c: Conveyor<u64> = Conveyor::builder()
        .capacity(ITEMS as usize)
        .build({
            let open = open.clone();
            move |d: Delivery<u64>| {
                while !open.load(AtomicOrdering::Acquire) {
                    std::thread::yield_now();
                }
                std::hint::black_box(d.item());
                Ok(())
            }
        })
        .expect("valid configuration");
    for i in 0..ITEMS {
        // Receipts dropped at once, as fire-and-forget senders do.
        c.send(i).expect("room for every item");
    }
    let start = Instant::now();
    open.store(true, AtomicOrdering::Release);
    c.flush();
    let per_item = start.elapsed().as_nanos() as f64 / ITEMS as f64;
    assert_eq!(c.stats().delivered, ITEMS);
    println!("backlog of {ITEMS}: {per_item:.1} ns per item, worker alone");
}
