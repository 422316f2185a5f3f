//! Helpers shared by the behaviour tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor::Delivery;

/// One sink call as the sink saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub seq: u64,
    pub key: Option<String>,
    pub item: u64,
    pub attempt: u32,
}

/// Records every call, and how many calls ran at once (overall and per key).
#[derive(Default)]
pub struct Recorder {
    pub starts: Mutex<Vec<Call>>,
    pub ends: Mutex<Vec<Call>>,
    running: AtomicUsize,
    pub max_running: AtomicUsize,
    per_key: Mutex<std::collections::HashMap<String, usize>>,
    pub max_per_key: AtomicUsize,
    /// For each start: the item and how many calls had ended before it started.
    pub ended_before_start: Mutex<Vec<(u64, usize)>>,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Call at the start of a sink call; returns a guard for the end.
    pub fn enter(&self, d: &Delivery<u64>) -> Call {
        let call = Call {
            seq: d.seq(),
            key: d.key().map(str::to_owned),
            item: *d.item(),
            attempt: d.attempt(),
        };
        let ended = self.ends.lock().unwrap().len();
        self.ended_before_start
            .lock()
            .unwrap()
            .push((call.item, ended));
        self.starts.lock().unwrap().push(call.clone());
        let now = self.running.fetch_add(1, AtomicOrdering::SeqCst) + 1;
        self.max_running.fetch_max(now, AtomicOrdering::SeqCst);
        let key = call.key.clone().unwrap_or_default();
        let mut per_key = self.per_key.lock().unwrap();
        let n = per_key.entry(key).or_default();
        *n += 1;
        self.max_per_key.fetch_max(*n, AtomicOrdering::SeqCst);
        call
    }

    pub fn leave(&self, call: Call) {
        *self
            .per_key
            .lock()
            .unwrap()
            .get_mut(&call.key.clone().unwrap_or_default())
            .unwrap() -= 1;
        self.running.fetch_sub(1, AtomicOrdering::SeqCst);
        self.ends.lock().unwrap().push(call);
    }

    pub fn items_started(&self) -> Vec<u64> {
        self.starts.lock().unwrap().iter().map(|c| c.item).collect()
    }

    pub fn items_ended(&self) -> Vec<u64> {
        self.ends.lock().unwrap().iter().map(|c| c.item).collect()
    }

    /// Items ended, per key, in order.
    pub fn ended_by_key(&self) -> std::collections::BTreeMap<String, Vec<u64>> {
        let mut map = std::collections::BTreeMap::<String, Vec<u64>>::new();
        for c in self.ends.lock().unwrap().iter() {
            map.entry(c.key.clone().unwrap_or_default())
                .or_default()
                .push(c.item);
        }
        map
    }
}

/// A generous bound for waits in tests: long enough never to fire on a loaded
/// machine, short enough that a hang fails the test instead of the CI run.
pub const GENEROUS: Duration = Duration::from_secs(30);

/// Runs `f` on a thread of its own and returns what it returns, failing the test if it has not
/// returned within [`GENEROUS`]: a hang fails the test instead of stalling the run (the stuck
/// thread is left behind). A panic in `f` is passed on.
pub fn in_time<O: Send + 'static>(what: &str, f: impl FnOnce() -> O + Send + 'static) -> O {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(GENEROUS) {
        Ok(out) => out,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what} hung"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(thread.join().expect_err("it returned nothing"))
        }
    }
}

pub fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// A sink gate: calls block in `pass` until `open` is called.
#[derive(Default)]
pub struct Gate {
    open: Mutex<bool>,
    cv: std::sync::Condvar,
    pub waiting: AtomicUsize,
}

impl Gate {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn pass(&self) {
        self.waiting.fetch_add(1, AtomicOrdering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
        self.waiting.fetch_sub(1, AtomicOrdering::SeqCst);
    }

    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }

    /// Waits (generously) until `n` calls are blocked in the gate.
    pub fn wait_for_callers(&self, n: usize) {
        let deadline = std::time::Instant::now() + GENEROUS;
        while self.waiting.load(AtomicOrdering::SeqCst) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "sink never reached the gate"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A conveyor whose sink blocks in `gate` until it opens.
pub fn gated(builder: conveyor::Builder<u64>, gate: &Arc<Gate>) -> conveyor::Conveyor<u64> {
    let g = gate.clone();
    builder
        .build(move |_d: Delivery<u64>| {
            g.pass();
            Ok(())
        })
        .unwrap()
}

/// A tiny xorshift generator, so the tests need no dependency; seed it with a non-zero value.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
