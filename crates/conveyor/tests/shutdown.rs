//! Flush and close are bounded and report what is left.

mod common;

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{gated, sleep_ms, Gate, GENEROUS};
use conveyor::{Conveyor, Delivery, DeliveryError, Ordering, SendError};

#[test]
fn close_drains_everything_and_refuses_later_sends() {
    let count = Arc::new(AtomicU64::new(0));
    let n = count.clone();
    let c: Conveyor<u64> = Conveyor::builder()
        .ordering(Ordering::Keyed { concurrency: 4 })
        .build(move |_d: Delivery<u64>| {
            sleep_ms(1);
            n.fetch_add(1, AtomicOrdering::SeqCst);
            Ok(())
        })
        .unwrap();
    for i in 0..100 {
        c.send_keyed(format!("{}", i % 10), i).unwrap();
    }
    let report = c.close_timeout(GENEROUS);
    assert!(report.drained);
    assert_eq!(report.left, 0);
    assert_eq!(count.load(AtomicOrdering::SeqCst), 100);
    assert_eq!(report.stats.delivered, 100);
    assert!(matches!(c.send(7), Err(SendError::Closed(7))));
    assert!(matches!(c.try_send(8), Err(SendError::Closed(8))));
}

#[test]
fn close_with_a_stuck_sink_returns_at_the_deadline_and_reports_what_is_left() {
    let gate = Gate::new();
    let c = gated(Conveyor::builder(), &gate);
    let receipts: Vec<_> = (0..5).map(|i| c.send(i).unwrap()).collect();
    gate.wait_for_callers(1);
    let started = Instant::now();
    let report = c.close_timeout(Duration::from_millis(100));
    assert!(started.elapsed() < GENEROUS);
    assert!(!report.drained);
    assert_eq!(report.left, 5, "one in flight and four queued");
    assert_eq!(report.stats.queued + report.stats.in_flight, 5);
    let mut receipts = receipts.into_iter();
    // The call in progress may still deliver its item: its receipt says so, not "not
    // delivered"; the queued items were never handed to the sink.
    let first = receipts.next().unwrap().wait();
    assert!(
        matches!(first, Err(DeliveryError::Unconfirmed)),
        "{first:?}"
    );
    for r in receipts {
        assert!(matches!(r.wait(), Err(DeliveryError::Closed)));
    }
    gate.open();
    // The call ends after the close and is counted as what it was: delivered.
    let deadline = Instant::now() + GENEROUS;
    while c.stats().in_flight > 0 {
        assert!(Instant::now() < deadline, "the call never ended");
        sleep_ms(5);
    }
    let stats = c.stats();
    assert_eq!((stats.delivered, stats.queued), (1, 4), "{stats:?}");
}

#[test]
fn drop_is_bounded_by_the_drain_timeout() {
    let gate = Gate::new();
    let c = gated(
        Conveyor::builder().drain_timeout(Duration::from_millis(100)),
        &gate,
    );
    let r = c.send(1).unwrap();
    gate.wait_for_callers(1);
    let started = Instant::now();
    drop(c);
    assert!(started.elapsed() < GENEROUS);
    assert!(matches!(r.wait(), Err(DeliveryError::Unconfirmed)));
    gate.open();
}

#[test]
fn flush_timeout_reports_whether_everything_settled() {
    let gate = Gate::new();
    let c = gated(Conveyor::builder(), &gate);
    c.send(1).unwrap();
    assert!(!c.flush_timeout(Duration::from_millis(20)));
    gate.open();
    assert!(c.flush_timeout(GENEROUS));
    // Flushing an idle conveyor returns at once.
    c.flush();
}

#[test]
fn receipt_wait_timeout_and_callbacks() {
    let gate = Gate::new();
    let g = gate.clone();
    let c: Conveyor<u64, u64> = Conveyor::builder()
        .build(move |d: Delivery<u64>| {
            g.pass();
            Ok(*d.item() + 1)
        })
        .unwrap();
    let mut r = c.send(1).unwrap();
    assert!(r.wait_timeout(Duration::from_millis(10)).is_none());
    assert!(!r.is_settled());
    let (tx, rx) = std::sync::mpsc::channel();
    c.send(41)
        .unwrap()
        .on_settled(move |res| tx.send(res.unwrap()).unwrap());
    gate.open();
    assert_eq!(r.wait_timeout(GENEROUS).unwrap().unwrap(), 2);
    assert_eq!(rx.recv_timeout(GENEROUS).unwrap(), 42);
}

#[test]
fn dropping_receipts_does_not_cancel_delivery() {
    let count = Arc::new(AtomicU64::new(0));
    let n = count.clone();
    let c: Conveyor<u64> = Conveyor::builder()
        .build(move |_d: Delivery<u64>| {
            n.fetch_add(1, AtomicOrdering::SeqCst);
            Ok(())
        })
        .unwrap();
    for i in 0..50 {
        drop(c.send(i).unwrap());
    }
    assert!(c.close_timeout(GENEROUS).drained);
    assert_eq!(count.load(AtomicOrdering::SeqCst), 50);
}

/// After `close_timeout` gave up, the workers are gone but the items stay counted as queued, so
/// a later `flush()` waits forever.
#[test]
fn flush_after_a_timed_out_close_returns_at_once() {
    let c: Conveyor<u32> = Conveyor::builder()
        .build(|_d| {
            std::thread::sleep(Duration::from_millis(200));
            Ok(())
        })
        .unwrap();
    c.send(1).unwrap();
    c.send(2).unwrap();
    let report = c.close_timeout(Duration::from_millis(20));
    assert!(!report.drained);
    let started = Instant::now();
    assert!(
        !c.flush_timeout(GENEROUS),
        "items left by the close are not settled"
    );
    assert!(
        started.elapsed() < GENEROUS,
        "flush returned at once, not at its timeout"
    );
    c.flush(); // and an unbounded flush returns too
}

/// An item whose start waits for the rate limiter (or a retry backoff) is reported as
/// `Closed` by `close`, but the worker still calls the sink with it after `close` returned.
#[test]
fn an_item_reported_closed_is_never_handed_to_the_sink() {
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let after_close = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (n, late) = (calls.clone(), after_close.clone());
    let c: Conveyor<u32> = Conveyor::builder()
        .rate_limit(1)
        .build(move |_d| {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if late.load(std::sync::atomic::Ordering::SeqCst) {
                eprintln!("sink called after close returned");
            }
            Ok(())
        })
        .unwrap();
    c.send(1).unwrap();
    let r2 = c.send(2).unwrap();
    // Item 1 done, item 2 waits a second for its slot. (A 100 ms flush here was not always
    // long enough on a loaded machine, and item 1 was then left too.)
    let deadline = Instant::now() + GENEROUS;
    while c.stats().delivered < 1 {
        assert!(Instant::now() < deadline, "item 1 was never delivered");
        sleep_ms(1);
    }
    let report = c.close_timeout(Duration::from_millis(10));
    after_close.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(report.left, 1);
    assert!(matches!(r2.wait(), Err(DeliveryError::Closed)));
    std::thread::sleep(Duration::from_millis(1_500)); // past item 2's slot
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "item 2 was reported Closed, then handed to the sink anyway"
    );
}

/// `flush` returns once the counters say settled, before the receipts are settled (that
/// happens after the worker releases the lock): a callback has not run yet.
#[test]
fn flush_returns_only_after_receipts_and_callbacks_settled() {
    let c: Conveyor<u32> = Conveyor::builder()
        .build(|_d| {
            std::thread::sleep(Duration::from_millis(50));
            Ok(())
        })
        .unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    c.send(1).unwrap().on_settled(move |_| {
        std::thread::sleep(Duration::from_millis(300));
        d.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    c.flush();
    assert!(
        done.load(std::sync::atomic::Ordering::SeqCst),
        "the receipt of item 1 is not settled after flush"
    );
}

#[test]
fn stop_finishes_the_call_in_flight_and_starts_nothing_queued() {
    let gate = Gate::new();
    let started = Arc::new(AtomicU64::new(0));
    let (g, n) = (gate.clone(), started.clone());
    // Capacity 4: with item 0 in flight and 1..=4 queued the queue is full, so `try_send`
    // answers `Full` until the stop has begun and `Closed` after, and probing adds nothing.
    let c: Arc<Conveyor<u64>> = Arc::new(
        Conveyor::builder()
            .capacity(4)
            .build(move |_d: Delivery<u64>| {
                n.fetch_add(1, AtomicOrdering::SeqCst);
                g.pass();
                Ok(())
            })
            .unwrap(),
    );
    let receipts: Vec<_> = (0..5).map(|i| c.send(i).unwrap()).collect();
    gate.wait_for_callers(1);
    // The gate opens only once the stop has begun (a fixed sleep here let a preempted test
    // thread open it before `stop_timeout` ran, and the worker went on to item 1).
    let stopper = std::thread::spawn({
        let (gate, c) = (gate.clone(), c.clone());
        move || {
            let deadline = Instant::now() + GENEROUS;
            loop {
                match c.try_send(99) {
                    Err(SendError::Closed(_)) => break,
                    Err(SendError::Full(_)) => {}
                    other => panic!("the probe was not refused: {:?}", other.map(drop)),
                }
                assert!(Instant::now() < deadline, "the stop never began");
                sleep_ms(1);
            }
            gate.open(); // the call in flight finishes while stop waits for it
        }
    });
    let report = c.stop_timeout(GENEROUS);
    stopper.join().unwrap();
    assert_eq!(
        started.load(AtomicOrdering::SeqCst),
        1,
        "no queued item was started"
    );
    assert_eq!((report.stats.delivered, report.left), (1, 4));
    assert!(!report.drained);
    let outcomes: Vec<_> = receipts.into_iter().map(|r| r.wait()).collect();
    assert!(outcomes[0].is_ok());
    assert!(outcomes[1..]
        .iter()
        .all(|o| matches!(o, Err(DeliveryError::Closed))));
    assert!(matches!(c.send(9), Err(SendError::Closed(9))));
}

/// A receipt callback on the worker that runs it: `close`, `flush` or the drop of the last
/// handle must not wait for that callback's own return (it would sit out the deadline).
fn from_a_callback<O: Send + 'static>(
    act: impl FnOnce(Conveyor<u32>) -> O + Send + 'static,
) -> (Duration, O) {
    let c: Conveyor<u32> = Conveyor::builder()
        .drain_timeout(Duration::from_secs(10))
        .build(|_d| Ok(()))
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let receipt = c.send(1).unwrap();
    let c = std::sync::Mutex::new(Some(c));
    receipt.on_settled(move |_| {
        let c = c.lock().unwrap().take().unwrap();
        let started = Instant::now();
        let out = act(c);
        tx.send((started.elapsed(), out)).unwrap();
    });
    rx.recv_timeout(GENEROUS).unwrap()
}

#[test]
fn close_flush_or_drop_from_a_receipt_callback_do_not_wait_for_that_callback() {
    let (took, report) = from_a_callback(|c| c.close_timeout(Duration::from_secs(10)));
    assert!(report.drained, "{report:?}");
    assert!(took < Duration::from_secs(5), "close waited {took:?}");
    let (took, flushed) = from_a_callback(|c| c.flush_timeout(Duration::from_secs(10)));
    assert!(
        flushed && took < Duration::from_secs(5),
        "flush: {flushed} in {took:?}"
    );
    let (took, ()) = from_a_callback(drop);
    assert!(took < Duration::from_secs(5), "drop waited {took:?}");
}

/// `stop_timeout` starts nothing queued: an item taken but still waiting for its rate-limit
/// slot was not started, and goes back to the queue.
#[test]
fn stop_does_not_start_items_waiting_for_a_rate_limit_slot() {
    let calls = Arc::new(AtomicU64::new(0));
    let n = calls.clone();
    let c: Conveyor<u32> = Conveyor::builder()
        .ordering(Ordering::Pipelined { in_flight: 4 })
        .rate_limit(1)
        .build(move |_d| {
            n.fetch_add(1, AtomicOrdering::SeqCst);
            Ok(())
        })
        .unwrap();
    for i in 0..4 {
        c.send(i).unwrap();
    }
    // The first call starts at once; the next slots are a second apart.
    let deadline = Instant::now() + GENEROUS;
    while calls.load(AtomicOrdering::SeqCst) == 0 {
        assert!(Instant::now() < deadline);
        sleep_ms(1);
    }
    let report = c.stop_timeout(GENEROUS);
    assert_eq!(calls.load(AtomicOrdering::SeqCst), 1, "{report:?}");
    assert_eq!((report.stats.delivered, report.left), (1, 3), "{report:?}");
}

/// Two workers: item 0's call ends once the main thread is closing the conveyor, so its worker
/// is leaving when it runs item 0's callback, which closes the conveyor too, within `timeout`.
/// Item 1's call runs until the test opens its gate: 200 ms after the callback started
/// closing when `end_item_1_while_closing`, else only once that close returned (or failed to
/// within [`GENEROUS`]). Returns that close's report.
fn close_from_the_callback_of_a_leaving_worker(
    timeout: Duration,
    end_item_1_while_closing: bool,
) -> Result<conveyor::CloseReport, RecvTimeoutError> {
    let gate = Gate::new();
    let g = gate.clone();
    let (closing, main_is_closing) = channel::<()>();
    let main_is_closing = Mutex::new(main_is_closing);
    let c: Arc<Conveyor<u32>> = Arc::new(
        Conveyor::builder()
            .ordering(Ordering::Pipelined { in_flight: 2 })
            .build(move |d: Delivery<u32>| {
                if *d.item() == 0 {
                    let _ = main_is_closing.lock().unwrap().recv_timeout(GENEROUS);
                    sleep_ms(100); // its close begins
                } else {
                    g.pass();
                }
                Ok(())
            })
            .unwrap(),
    );
    let (tx, rx) = channel();
    let (callback_started, callback_is_closing) = channel();
    let me = c.clone();
    c.send(0).unwrap().on_settled(move |_| {
        let _ = callback_started.send(());
        let _ = tx.send(me.close_timeout(timeout));
    });
    c.send(1).unwrap();
    // Items start in order: item 1's call in the gate means both calls are running.
    gate.wait_for_callers(1);
    let main = {
        let c = c.clone();
        std::thread::spawn(move || {
            closing.send(()).unwrap();
            c.close_timeout(GENEROUS)
        })
    };
    if end_item_1_while_closing {
        callback_is_closing
            .recv_timeout(GENEROUS)
            .expect("item 0's callback ran");
        sleep_ms(200); // a close that gives up on item 1 does so meanwhile
        gate.open();
    }
    let report = rx.recv_timeout(GENEROUS);
    gate.open();
    main.join().unwrap();
    report
}

/// A leaving worker no longer counts as live: its callback's close still waits for the
/// other worker's call (it used to count itself and give up on it), and keeps its deadline
/// (it used to join the other worker's thread for the whole call).
#[test]
fn a_close_from_the_callback_of_a_leaving_worker_waits_for_the_others_and_its_deadline() {
    let report = close_from_the_callback_of_a_leaving_worker(GENEROUS, true)
        .expect("the callback's close returned once the other worker's call ended");
    assert!(
        report.drained,
        "the other worker's call was given up: {report:?}"
    );
    // The other worker's call runs until this close returns: one that waits for the call
    // past its deadline never returns.
    let report = close_from_the_callback_of_a_leaving_worker(Duration::from_millis(100), false)
        .expect("close_timeout(100 ms) returned while the other worker's call still ran");
    assert!(!report.drained, "{report:?}");
}

/// Strict: item 0's callback flushes while item 1 is queued, which only the callback's own
/// worker could deliver. The flush says so at once (`flush()` used to hang for good).
#[test]
fn a_flush_from_a_callback_does_not_wait_for_items_only_its_worker_could_deliver() {
    // Item 0 stays in its call until its callback is attached: settled first, the callback
    // ran on this thread, at `on_settled`, and waited there for this thread (a quick enough
    // send made that happen).
    let gate = Gate::new();
    let g = gate.clone();
    let c: Arc<Conveyor<u32>> = Arc::new(
        Conveyor::builder()
            .build(move |d: Delivery<u32>| {
                if *d.item() == 0 {
                    g.pass();
                }
                Ok(())
            })
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let me = c.clone();
    let queued = Arc::new(std::sync::Barrier::new(2));
    let q = queued.clone();
    c.send(0).unwrap().on_settled(move |_| {
        q.wait(); // item 1 is queued
        let started = Instant::now();
        let flushed = me.flush_timeout(Duration::from_secs(10));
        tx.send((started.elapsed(), flushed)).unwrap();
    });
    c.send(1).unwrap();
    gate.open();
    queued.wait();
    let (took, flushed) = rx.recv_timeout(GENEROUS).unwrap();
    assert!(!flushed);
    assert!(
        took < Duration::from_secs(5),
        "the flush sat out its deadline: {took:?}"
    );
    assert!(
        c.flush_timeout(GENEROUS),
        "item 1 is delivered once the callback returns"
    );
}

/// Tells `dropped` when the sink that owns it is dropped.
struct DropFlag(std::sync::mpsc::Sender<()>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// A sink told to retry in an hour (`Retry-After`): closing cuts the backoff short, so the
/// worker leaves and the sink is dropped right after the conveyor, not an hour later. A close
/// used to leave the worker thread asleep, holding the sink and everything it owns.
fn backoff_cut_short_by(
    shut: impl FnOnce(&Conveyor<u32>) -> conveyor::CloseReport,
    blocking: bool,
) {
    let (flag, dropped) = std::sync::mpsc::channel();
    let flag = DropFlag(flag);
    let (tried, first_try) = std::sync::mpsc::channel();
    let tried = std::sync::Mutex::new(tried);
    let busy = move || {
        let _ = tried.lock().unwrap().send(());
        Err(conveyor::SinkError::retryable("busy").with_retry_after(Duration::from_secs(3600)))
    };
    let builder = Conveyor::builder()
        .retry(conveyor::Retry::fixed(Duration::from_millis(10)).max_attempts(3));
    // An async sink runs on the runtime it was built in, which outlives the conveyor here
    // (the conveyor's own runtime would take the sleeping task down with it).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let c: Conveyor<u32> = if blocking {
        builder.build(move |_d: Delivery<u32>| {
            let _owned = &flag;
            busy()
        })
    } else {
        let busy = Arc::new(busy);
        let flag = Arc::new(flag);
        runtime.block_on(async {
            builder.build_async(move |_d: Delivery<u32>| {
                let (busy, _owned) = (busy.clone(), flag.clone());
                async move { busy() }
            })
        })
    }
    .unwrap();
    let receipt = c.send(1).unwrap();
    first_try.recv_timeout(GENEROUS).unwrap();
    let report = shut(&c);
    assert_eq!(report.left, 1, "{report:?}");
    assert!(matches!(receipt.wait(), Err(DeliveryError::Closed)));
    let started = Instant::now();
    drop(c);
    dropped
        .recv_timeout(GENEROUS)
        .expect("the sink is dropped once the conveyor is");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the drop waited for the backoff: {:?}",
        started.elapsed()
    );
}

#[test]
fn close_cuts_a_long_backoff_short() {
    backoff_cut_short_by(|c| c.close_timeout(Duration::from_millis(200)), true);
    backoff_cut_short_by(|c| c.stop_timeout(Duration::from_millis(200)), true);
}

#[test]
fn close_cuts_a_long_backoff_short_for_an_async_sink() {
    backoff_cut_short_by(|c| c.close_timeout(Duration::from_millis(200)), false);
}

/// Sends racing a close from another thread: the close moves every item sent before it into
/// the lanes and delivers it, so every accepted item is delivered and counted, and every later
/// send is refused as closed. (An item left behind in the intake would be neither.)
#[test]
fn a_close_racing_sends_delivers_and_counts_every_item_it_accepted() {
    for round in 0..20 {
        let delivered = Arc::new(AtomicU64::new(0));
        let c: Arc<Conveyor<u64>> = Arc::new(
            Conveyor::builder()
                .ordering(Ordering::Keyed { concurrency: 2 })
                .build({
                    let delivered = delivered.clone();
                    move |_d: Delivery<u64>| {
                        delivered.fetch_add(1, AtomicOrdering::SeqCst);
                        Ok(())
                    }
                })
                .unwrap(),
        );
        let sent = Arc::new(AtomicU64::new(0));
        let producers: Vec<_> = (0..2u64)
            .map(|p| {
                let (c, sent) = (c.clone(), sent.clone());
                std::thread::spawn(move || {
                    let mut receipts = Vec::new();
                    for i in 0u64.. {
                        match c.send_keyed(format!("{}", i % 3), (p << 32) | i) {
                            Ok(receipt) => {
                                receipts.push(receipt);
                                sent.fetch_add(1, AtomicOrdering::Relaxed);
                            }
                            Err(SendError::Closed(_)) => break,
                            Err(e) => panic!("{e:?}"),
                        }
                    }
                    receipts
                })
            })
            .collect();
        // Both producers are sending by now.
        while sent.load(AtomicOrdering::Relaxed) < 200 {
            std::thread::yield_now();
        }
        let report = c.close_timeout(GENEROUS);
        let mut receipts: Vec<_> = producers
            .into_iter()
            .flat_map(|p| p.join().unwrap())
            .collect();
        assert!(report.drained, "round {round}");
        assert_eq!(
            report.stats.accepted,
            receipts.len() as u64,
            "round {round}: the close counts every item accepted"
        );
        for receipt in &mut receipts {
            assert!(
                matches!(receipt.wait_timeout(GENEROUS), Some(Ok(()))),
                "round {round}: item {} not delivered",
                receipt.seq()
            );
        }
        assert_eq!(
            delivered.load(AtomicOrdering::SeqCst),
            receipts.len() as u64
        );
    }
}
