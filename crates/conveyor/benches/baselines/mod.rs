//! What a user would otherwise wire up instead of a conveyor, shared by the benches that
//! compare against it (`engine.rs`, `steady.rs`), so that both measure the same baseline.

use std::hint::black_box;
use std::sync::mpsc;
use std::thread::JoinHandle;

/// Large enough that the producer never waits for room within one measured batch.
pub const CAPACITY: usize = 1 << 20;

/// An instant-sink baseline: a channel with one consumer.
pub struct Baseline {
    pub send: Box<dyn FnMut(u64)>,
    /// Blocks until the consumer has seen every item sent so far.
    pub drain: Box<dyn FnMut()>,
    /// Joined on drop, so that one trial's consumer is gone before the next trial starts.
    consumer: Option<JoinHandle<()>>,
}

impl Baseline {
    /// A baseline whose consumer this process does not join (a task on a runtime `send`
    /// keeps alive, say).
    #[allow(dead_code)] // `steady.rs` uses thread baselines only.
    pub fn new(send: impl FnMut(u64) + 'static, drain: impl FnMut() + 'static) -> Self {
        Self {
            send: Box::new(send),
            drain: Box::new(drain),
            consumer: None,
        }
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        // The consumer ends once every sender is gone, and both closures hold one.
        self.send = Box::new(|_| {});
        self.drain = Box::new(|| {});
        if let Some(consumer) = self.consumer.take() {
            consumer.join().expect("the consumer ends");
        }
    }
}

/// A consumer thread over `items`; `u64::MAX` is the drain marker.
pub fn thread_baseline(
    send: impl Fn(u64) + Clone + 'static,
    items: impl Iterator<Item = u64> + Send + 'static,
) -> Baseline {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let consumer = std::thread::spawn(move || {
        for item in items {
            if item == u64::MAX {
                let _ = done_tx.send(());
            } else {
                black_box(item);
            }
        }
    });
    let marker = send.clone();
    Baseline {
        send: Box::new(send),
        drain: Box::new(move || {
            marker(u64::MAX);
            done_rx.recv().unwrap();
        }),
        consumer: Some(consumer),
    }
}

/// Crossbeam's bounded channel and a consumer thread: the baseline the targets name.
pub fn crossbeam() -> Baseline {
    let (tx, rx) = crossbeam_channel::bounded::<u64>(CAPACITY);
    thread_baseline(move |i| tx.send(i).unwrap(), rx.into_iter())
}
