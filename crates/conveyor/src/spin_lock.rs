//! The intake's lock (see `intake.rs`): taken with one atomic operation and given up with a
//! plain store.
//!
//! Every send takes the intake lock once. A `std::sync::Mutex` costs two atomic
//! read-modify-write operations a turn, the second on release (to learn whether a thread
//! sleeps on it), and on the machine of BENCHMARKS.md each costs about 6.5 ns: 13 of the
//! 21-23 ns a send took with its producer alone. Given up with a store, the lock saves one.
//!
//! The price: nobody sleeps on it. A thread that finds it taken spins a little, then yields
//! its CPU until it is free (crossbeam's `Backoff`, as crossbeam-channel waits for a slot).
//! Whoever holds it never waits for another thread nor runs user code: a send appends one
//! node; a worker swaps the batch, and sorts it into the lanes after giving the lock up.
//! Only a close and a send on the slow path, which numbers its own item right after, sort a
//! batch under it (`Shared::drain_locked`), and that send notifies a condition variable. A
//! waiter waits as long as those take, or, if the holder was preempted, until it runs again,
//! as a sleeper on a mutex would, but yielding meanwhile. A worker that its producer's sends
//! starved of the lock on a shared CPU (the producer holds it most of its time) is what
//! `Intake::try_accept`'s giving way also covers: without it, such rounds came back.
//!
//! Its guard is not `Send`, as std's is not: a future holding it across an `.await` is not
//! `Send` either, which the compiler points out where it is spawned. (Held there, a task
//! waiting for the lock on the same thread would spin for good.)

use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_utils::Backoff;
use lock_api::{GuardNoSend, RawMutex};

/// A lock around a `T` that spins, then yields, while another thread holds it (see the
/// module doc).
pub(crate) type SpinLock<T> = lock_api::Mutex<RawSpinLock, T>;
/// What [`SpinLock::lock`] returns: the lock, held until it drops.
pub(crate) type SpinGuard<'a, T> = lock_api::MutexGuard<'a, RawSpinLock, T>;

/// The lock's state alone, for [`lock_api`] to wrap around the data it guards.
pub(crate) struct RawSpinLock {
    locked: AtomicBool,
}

// SAFETY: `try_lock` takes the lock with an acquiring compare-exchange from free to taken,
// which only one thread can win until `unlock` stores free again, releasing what the holder
// wrote; `lock` retries `try_lock` until it wins.
unsafe impl RawMutex for RawSpinLock {
    // `INIT` is only ever copied into a new lock, as `lock_api` intends.
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = Self {
        locked: AtomicBool::new(false),
    };

    type GuardMarker = GuardNoSend;

    #[inline]
    fn lock(&self) {
        if !self.try_lock() {
            self.lock_contended();
        }
    }

    #[inline]
    fn try_lock(&self) -> bool {
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    #[inline]
    unsafe fn unlock(&self) {
        self.locked.store(false, Ordering::Release);
    }

    #[inline]
    fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }
}

impl RawSpinLock {
    /// Out of line: sends rarely find the lock taken.
    #[cold]
    #[inline(never)]
    fn lock_contended(&self) {
        let backoff = Backoff::new();
        loop {
            // Read, not written, while taken: a failed compare-exchange would take the line
            // from the holder each time.
            while self.is_locked() {
                backoff.snooze();
            }
            if self.try_lock() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    use super::*;

    /// More threads than this machine has CPUs add to a plain counter under the lock: a lost
    /// update, or two holders at once, would show in the total or the holder count.
    #[test]
    fn one_holder_at_a_time() {
        const THREADS: usize = 6;
        const TURNS: usize = 20_000;
        let lock = Arc::new(SpinLock::new(0_usize));
        let holders = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (lock, holders, start) = (lock.clone(), holders.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    for _ in 0..TURNS {
                        let mut count = lock.lock();
                        assert_eq!(holders.fetch_add(1, Ordering::Relaxed), 0, "two holders");
                        *count += 1;
                        holders.fetch_sub(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("no thread failed");
        }
        assert_eq!(*lock.lock(), THREADS * TURNS);
    }

    /// A waiter gets the lock once a holder that took long (asleep, as if preempted) gives it
    /// up, and sees what the holder wrote.
    #[test]
    fn a_waiter_gets_the_lock_after_a_slow_holder() {
        let lock = Arc::new(SpinLock::new(Vec::new()));
        let held = Arc::new(Barrier::new(2));
        let mut guard = lock.lock();
        let waiter = {
            let (lock, held) = (lock.clone(), held.clone());
            std::thread::spawn(move || {
                held.wait();
                assert!(lock.try_lock().is_none(), "taken by the main thread");
                let mut seen = lock.lock();
                seen.push("waiter");
                seen.clone()
            })
        };
        held.wait();
        std::thread::sleep(Duration::from_millis(50));
        guard.push("holder");
        drop(guard);
        assert_eq!(waiter.join().expect("waiter"), ["holder", "waiter"]);
    }
}
