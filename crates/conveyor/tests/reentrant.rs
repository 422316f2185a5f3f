//! Calls into a conveyor from inside its own sink call or receipt callback: a blocking send
//! on a full queue, a flush, a close, or a wait for a receipt. The calling worker delivers
//! nothing while it waits, so each waits only for what the other workers can still do, and
//! never for itself.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{sleep_ms, GENEROUS};
use conveyor::{CloseReport, Conveyor, Delivery, Ordering, Receipt, SendError};

/// Long enough that a call which waits for it is told apart from one that does not.
const LONG: Duration = Duration::from_secs(10);

/// A conveyor whose sink runs `inside` with the conveyor itself, on the item `trigger`
/// (and sleeps `slow_ms` on every item named in `slow`).
fn calling_itself(
    ordering: Ordering,
    capacity: usize,
    trigger: u64,
    slow: &'static [u64],
    inside: impl Fn(&Conveyor<u64>, &Delivery<u64>) + Send + Sync + 'static,
) -> Arc<Conveyor<u64>> {
    let slow = move |item: u64| {
        if slow.contains(&item) {
            sleep_ms(300);
        }
    };
    calling_itself_after(ordering, capacity, trigger, slow, inside)
}

/// [`calling_itself`], whose sink first runs `before` with every item.
fn calling_itself_after(
    ordering: Ordering,
    capacity: usize,
    trigger: u64,
    before: impl Fn(u64) + Send + Sync + 'static,
    inside: impl Fn(&Conveyor<u64>, &Delivery<u64>) + Send + Sync + 'static,
) -> Arc<Conveyor<u64>> {
    let me: Arc<OnceLock<Arc<Conveyor<u64>>>> = Arc::new(OnceLock::new());
    let myself = me.clone();
    let c = Arc::new(
        Conveyor::builder()
            .ordering(ordering)
            .capacity(capacity)
            .drain_timeout(Duration::from_secs(1))
            .build(move |d: Delivery<u64>| {
                before(*d.item());
                if *d.item() == trigger {
                    inside(myself.get().expect("set before the first send"), &d);
                }
                Ok(())
            })
            .unwrap(),
    );
    me.set(c.clone()).ok();
    c
}

fn outcome(r: Result<conveyor::Receipt<()>, SendError<u64>>) -> Result<(), String> {
    r.map(drop).map_err(|e| format!("{e:?}"))
}

/// Strict, capacity 1: the sink of item 1 fills the queue, then sends once more. Only its own
/// worker could make room, after the call returns: the send refuses at once (it used to wait
/// for good, and with it the conveyor).
#[test]
fn a_sink_sending_into_its_own_full_queue_is_refused_instead_of_waiting_for_itself() {
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let c = calling_itself(Ordering::Strict, 1, 1, &[], move |c, _| {
        let first = outcome(c.send(100));
        let started = Instant::now();
        let second = c.send(101);
        let took = started.elapsed();
        let second = match second {
            Err(SendError::Full(item)) => Ok(item),
            other => Err(format!("{:?}", other.map(drop))),
        };
        tx.lock().unwrap().send((first, second, took)).unwrap();
    });
    c.send(1).unwrap();
    let (first, second, took) = rx.recv_timeout(GENEROUS).expect("the send came back");
    assert_eq!(first, Ok(()));
    assert_eq!(second, Ok(101), "the item comes back with the refusal");
    assert!(took < Duration::from_secs(5), "the send waited {took:?}");
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!((c.stats().accepted, c.stats().delivered), (2, 2));
}

/// Keyed, capacity 1: the sink of `a1` sends `a3` while `b2` fills the queue and `b1` is still
/// running on the other worker. That worker makes room once `b1` ends, so the send waits for
/// it and succeeds; a second send, once only this worker could make room, is refused.
#[test]
fn a_sink_waits_for_room_that_another_worker_makes() {
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    // b1 runs until the test lets it end, and says so before it returns: only then can its
    // worker take b2 and make room. The flag orders the send's return after b1's end
    // however the threads are scheduled.
    let b1_running = Arc::new(Barrier::new(2));
    let (end_b1, b1_may_end) = channel::<()>();
    let b1_may_end = Mutex::new(b1_may_end);
    let b1_ended = Arc::new(AtomicBool::new(false));
    let queue_full = Arc::new(Barrier::new(2));
    let (running, ended, full) = (b1_running.clone(), b1_ended.clone(), queue_full.clone());
    let hold_b1 = move |item| {
        if item == 2 {
            running.wait();
            let _ = b1_may_end.lock().unwrap().recv_timeout(GENEROUS);
            ended.store(true, SeqCst);
        }
    };
    // Items: a1 = 1, b1 = 2 (held), b2 = 3, a3 = 4, a4 = 5.
    let c = calling_itself_after(
        Ordering::Keyed { concurrency: 2 },
        1,
        1,
        hold_b1,
        move |c, _| {
            full.wait();
            let waited = outcome(c.send_keyed("a", 4));
            let after_b1 = b1_ended.load(SeqCst);
            let refused = matches!(c.send_keyed("a", 5), Err(SendError::Full(5)));
            tx.lock()
                .unwrap()
                .send((waited, after_b1, refused))
                .unwrap();
        },
    );
    c.send_keyed("b", 2).unwrap();
    b1_running.wait();
    c.send_keyed("a", 1).unwrap();
    c.send_keyed("b", 3).unwrap();
    queue_full.wait();
    // Give a send that does not wait for room (refused, or let past the capacity) time to
    // come back before b1 ends. The flag, not this pause, tells it from one that waited.
    sleep_ms(100);
    end_b1.send(()).unwrap();
    let (waited, after_b1, refused) = rx.recv_timeout(GENEROUS).expect("the sends came back");
    assert_eq!(waited, Ok(()));
    assert!(
        after_b1,
        "the send came back before b1 ended, which alone could make room"
    );
    assert!(
        refused,
        "a3 fills the queue behind the sink's own item: nobody else can make room"
    );
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, 4);
}

/// Pipelined, two workers, capacity 1, both sinks sending into the full queue: the first waits
/// for the other worker, which then finds every other worker waiting and is refused. Its call
/// returns, its worker makes room, and the first send goes through. Nothing waits for good.
#[test]
fn two_sinks_waiting_for_each_other_are_not_a_deadlock() {
    let (tx, rx) = channel::<(u64, Result<(), String>)>();
    let tx = Mutex::new(tx);
    // Both workers in their sink calls, and item 3 queued.
    let queue_full = Arc::new(Barrier::new(3));
    let full = queue_full.clone();
    let me: Arc<OnceLock<Arc<Conveyor<u64>>>> = Arc::new(OnceLock::new());
    let myself = me.clone();
    let c = Arc::new(
        Conveyor::builder()
            .ordering(Ordering::Pipelined { in_flight: 2 })
            .capacity(1)
            .drain_timeout(Duration::from_secs(1))
            .build(move |d: Delivery<u64>| {
                if *d.item() <= 2 {
                    full.wait();
                    if *d.item() == 2 {
                        sleep_ms(200); // item 1's send waits first
                    }
                    let sent = outcome(myself.get().unwrap().send(10 + d.item()));
                    tx.lock().unwrap().send((*d.item(), sent)).unwrap();
                }
                Ok(())
            })
            .unwrap(),
    );
    me.set(c.clone()).ok();
    c.send(1).unwrap();
    c.send(2).unwrap();
    c.send(3).unwrap(); // fills the queue
    queue_full.wait();
    let mut outcomes = vec![
        rx.recv_timeout(GENEROUS).expect("a send came back"),
        rx.recv_timeout(GENEROUS).expect("both sends came back"),
    ];
    outcomes.sort();
    assert_eq!(outcomes[0], (1, Ok(())), "{outcomes:?}");
    assert_eq!(
        outcomes[1],
        (2, Err("Full(..)".to_string())),
        "{outcomes:?}"
    );
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, 4, "items 1, 2, 3 and 11");
}

/// Runs `act` inside the sink of item 1 (strict, or keyed with `b1` running on the other
/// worker) and returns how long it took and what it returned.
fn from_inside_the_sink<O: Send + 'static>(
    ordering: Ordering,
    act: impl Fn(&Conveyor<u64>) -> O + Send + Sync + 'static,
) -> (Arc<Conveyor<u64>>, Duration, O) {
    let (tx, rx) = channel();
    let tx: Mutex<Sender<_>> = Mutex::new(tx);
    let c = calling_itself(ordering, 100, 1, &[2], move |c, _| {
        let started = Instant::now();
        let out = act(c);
        tx.lock().unwrap().send((started.elapsed(), out)).unwrap();
    });
    c.send_keyed("b", 2).unwrap();
    c.send_keyed("a", 1).unwrap();
    c.send_keyed("a", 3).unwrap(); // behind the sink's own item
    let (took, out) = rx.recv_timeout(GENEROUS).expect("the call came back");
    (c, took, out)
}

/// A flush from inside the sink cannot see the sink's own item settle: strict, it says so at
/// once (it used to wait for good); keyed, it waits for what the other worker is delivering,
/// then says so.
#[test]
fn a_flush_from_inside_the_sink_waits_only_for_the_other_workers() {
    let (c, took, flushed) = from_inside_the_sink(Ordering::Strict, |c| c.flush_timeout(LONG));
    assert!(!flushed);
    assert!(took < Duration::from_secs(5), "flush waited {took:?}");
    assert!(c.flush_timeout(GENEROUS));

    let (c, took, (flushed, b_delivered)) =
        from_inside_the_sink(Ordering::Keyed { concurrency: 2 }, |c| {
            let flushed = c.flush_timeout(LONG);
            (flushed, c.stats().delivered)
        });
    assert!(!flushed);
    assert!(took < Duration::from_secs(5), "flush waited {took:?}");
    assert_eq!(b_delivered, 1, "b1, on the other worker, was waited for");
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, 3);

    // The same without a deadline: `flush()` returns.
    let (c, took, ()) = from_inside_the_sink(Ordering::Strict, Conveyor::flush);
    assert!(took < Duration::from_secs(5), "flush waited {took:?}");
    assert!(c.flush_timeout(GENEROUS));
}

/// A close from inside the sink cannot wait for the sink's own call: it closes once the other
/// workers are done, and reports the sink's own item (unconfirmed) and what queues behind it.
#[test]
fn a_close_from_inside_the_sink_does_not_wait_for_its_own_call() {
    let (_c, took, report): (_, _, CloseReport) =
        from_inside_the_sink(Ordering::Keyed { concurrency: 2 }, |c| {
            c.close_timeout(LONG)
        });
    assert!(took < Duration::from_secs(5), "close waited {took:?}");
    assert_eq!(report.stats.delivered, 1, "b1 was waited for: {report:?}");
    assert_eq!(
        report.left, 2,
        "a1, in the sink, and a3 behind it: {report:?}"
    );
}

/// Keyed: item `a1`'s callback flushes after its worker took `a2`, which only that worker
/// will run. The flush waits for the other workers only (it used to sit out its deadline).
#[test]
fn a_flush_from_a_callback_does_not_wait_for_the_next_item_its_worker_took() {
    let c: Arc<Conveyor<u64>> = Arc::new(
        Conveyor::builder()
            .ordering(Ordering::Keyed { concurrency: 2 })
            .build(|d: Delivery<u64>| {
                if *d.item() == 1 {
                    sleep_ms(100); // a2 is queued meanwhile
                }
                Ok(())
            })
            .unwrap(),
    );
    let (tx, rx) = channel();
    let me = c.clone();
    c.send_keyed("a", 1).unwrap().on_settled(move |_| {
        let started = Instant::now();
        let flushed = me.flush_timeout(LONG);
        tx.send((flushed, started.elapsed())).unwrap();
    });
    c.send_keyed("a", 2).unwrap();
    let (flushed, took) = rx.recv_timeout(GENEROUS).expect("the flush came back");
    assert!(!flushed);
    assert!(took < Duration::from_secs(5), "flush waited {took:?}");
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, 2);
}

/// Pipelined, two workers: the sinks of items 1 and 2 each run `inside` with the conveyor once
/// both are in their sink calls. Returns what each one sent back, with its item, as they came.
fn two_sinks_at_once<O: Send + 'static>(
    inside: impl Fn(&Conveyor<u64>, u64) -> O + Send + Sync + 'static,
) -> (Arc<Conveyor<u64>>, [(u64, O); 2]) {
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let both = Arc::new(Barrier::new(2));
    let me: Arc<OnceLock<Arc<Conveyor<u64>>>> = Arc::new(OnceLock::new());
    let myself = me.clone();
    let c = Arc::new(
        Conveyor::builder()
            .ordering(Ordering::Pipelined { in_flight: 2 })
            .drain_timeout(Duration::from_secs(1))
            .build(move |d: Delivery<u64>| {
                if *d.item() <= 2 {
                    both.wait();
                    let out = inside(myself.get().unwrap(), *d.item());
                    tx.lock().unwrap().send((*d.item(), out)).unwrap();
                }
                Ok(())
            })
            .unwrap(),
    );
    me.set(c.clone()).ok();
    c.send(1).unwrap();
    c.send(2).unwrap();
    let first = rx.recv_timeout(GENEROUS).expect("a sink came back");
    let second = rx.recv_timeout(GENEROUS).expect("both sinks came back");
    (c, [first, second])
}

/// Both workers' sinks close their conveyor at once: neither waits for the other's call (each
/// used to wait for the other worker to leave, and both sat out their whole deadline).
#[test]
fn two_sinks_closing_their_conveyor_at_once_do_not_wait_for_each_other() {
    let (_c, [a, b]) = two_sinks_at_once(|c, _| {
        let started = Instant::now();
        let _report = c.close_timeout(LONG);
        started.elapsed()
    });
    assert!(
        a.1 < Duration::from_secs(5) && b.1 < Duration::from_secs(5),
        "closes from inside two sinks waited for each other: {a:?} {b:?}"
    );
}

/// Item 1's callback flushes while item 2's callback runs on the other worker: the flush
/// waits for that callback, then reports everything settled (a worker settling receipts
/// counts as one that can still make progress).
#[test]
fn a_flush_from_a_callback_waits_for_the_other_workers_callbacks() {
    let go = Arc::new(Barrier::new(3));
    let sink_go = go.clone();
    let c: Arc<Conveyor<u64>> = Arc::new(
        Conveyor::builder()
            .ordering(Ordering::Pipelined { in_flight: 2 })
            .build(move |_d: Delivery<u64>| {
                sink_go.wait(); // both items in flight on two workers, callbacks attached
                Ok(())
            })
            .unwrap(),
    );
    let (b_running_tx, b_running) = channel::<()>();
    let b_running = Mutex::new(b_running);
    let (tx, rx) = channel();
    let me = c.clone();
    c.send(1).unwrap().on_settled(move |_| {
        b_running
            .lock()
            .unwrap()
            .recv_timeout(GENEROUS)
            .expect("item 2's callback started");
        let started = Instant::now();
        let flushed = me.flush_timeout(LONG);
        tx.send((flushed, started.elapsed())).unwrap();
    });
    c.send(2).unwrap().on_settled(move |_| {
        b_running_tx.send(()).unwrap();
        sleep_ms(300); // a slow callback on the other worker
    });
    go.wait();
    let (flushed, took) = rx.recv_timeout(GENEROUS).expect("the flush came back");
    assert!(
        flushed,
        "the flush gave up after {took:?} while the other worker's callback ran"
    );
    assert!(c.flush_timeout(GENEROUS));
}

/// An async sink (strict, capacity 1) calling its own conveyor: the blocking `send`, the
/// awaited `send_async`, `flush_async` and a blocking `wait_timeout` for the item it queued each
/// see that only its own worker could help, and return instead of waiting for good.
#[test]
fn an_async_sink_calling_its_own_conveyor_does_not_wait_for_itself() {
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let me: Arc<OnceLock<Arc<Conveyor<u64>>>> = Arc::new(OnceLock::new());
    let myself = me.clone();
    let c = Arc::new(
        Conveyor::builder()
            .capacity(1)
            .drain_timeout(Duration::from_secs(1))
            .build_async(move |d: Delivery<u64>| {
                let c = myself.get().unwrap().clone();
                let tx = (*d.item() == 1).then(|| tx.lock().unwrap().clone());
                async move {
                    if let Some(tx) = tx {
                        let first = c.send(100);
                        let blocking = matches!(c.send(101), Err(SendError::Full(101)));
                        let awaited = matches!(c.send_async(102).await, Err(SendError::Full(102)));
                        let started = Instant::now();
                        c.flush_async().await;
                        let flush_took = started.elapsed();
                        let waited = first.ok().map(|mut first| {
                            let started = Instant::now();
                            let waited = first.wait_timeout(LONG).map(|r| r.is_ok());
                            (waited, started.elapsed())
                        });
                        tx.send((blocking, awaited, flush_took, waited)).ok();
                    }
                    Ok(())
                }
            })
            .unwrap(),
    );
    me.set(c.clone()).ok();
    c.send(1).unwrap();
    // (The sink's handle keeps the conveyor alive: no drop waits for a stuck worker.)
    let (blocking, awaited, flush_took, waited) =
        rx.recv_timeout(GENEROUS).expect("the calls came back");
    assert!(blocking && awaited, "{blocking} {awaited}");
    assert!(
        flush_took < Duration::from_secs(5),
        "flush_async waited {flush_took:?}"
    );
    let (waited, took) = waited.expect("the first send was accepted");
    gave_up_at_once(waited, took);
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, 2, "items 1 and 100");
}

/// The text of a caught panic.
fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(text) => *text,
        Err(panic) => panic
            .downcast::<&'static str>()
            .map_or_else(|_| "(no text)".to_owned(), |text| (*text).to_owned()),
    }
}

/// Asserts that a `wait_timeout` (with a `LONG` timeout) from inside, which nobody else could
/// end, returned `None` long before its deadline.
fn gave_up_at_once(waited: Option<bool>, took: Duration) {
    assert_eq!(waited, None);
    assert!(
        took < Duration::from_secs(5),
        "wait_timeout waited {took:?}"
    );
}

/// Strict: the sink of item 1 waits for the receipt of item 2, which can only start once that
/// sink call returns. The wait panics (it used to wait for good, and with it the conveyor), the
/// panic fails item 1 with a message that says what to do, and item 2 is delivered after.
#[test]
fn a_sink_waiting_for_its_own_next_item_fails_its_item_instead_of_hanging() {
    let c = calling_itself(Ordering::Strict, 100, 1, &[], |c, _| {
        let _ = c.send(2).unwrap().wait();
    });
    let mut first = c.send(1).unwrap();
    let outcome = first
        .wait_timeout(GENEROUS)
        .expect("item 1 settled: the sink's wait did not hang");
    let error = outcome.expect_err("the sink's wait panicked").to_string();
    assert!(
        error.contains("Receipt::wait would wait forever") && error.contains("on_settled"),
        "{error}"
    );
    assert!(c.flush_timeout(GENEROUS));
    let stats = c.stats();
    assert_eq!((stats.failed, stats.delivered), (1, 1), "{stats:?}");
}

/// `wait_timeout` from inside the sink, or from a receipt callback whose worker took the next
/// item already, for an item only that worker could deliver: `None` at once, not at the end
/// of its (long) timeout.
#[test]
fn wait_timeout_from_inside_gives_up_at_once_when_nobody_else_can_settle() {
    let (c, took, waited) = from_inside_the_sink(Ordering::Strict, |c| {
        let mut second = c.send(4).unwrap();
        second.wait_timeout(LONG).map(|r| r.is_ok())
    });
    gave_up_at_once(waited, took);
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, 4);

    // A callback of item 1, run by its worker after it took item 2.
    let c: Arc<Conveyor<u64>> = Arc::new(
        Conveyor::builder()
            .build(|d: Delivery<u64>| {
                if *d.item() == 1 {
                    sleep_ms(100); // item 2 is queued meanwhile
                }
                Ok(())
            })
            .unwrap(),
    );
    let (tx, rx) = channel();
    let (second_tx, second_rx) = channel::<conveyor::Receipt<()>>();
    c.send(1).unwrap().on_settled(move |_| {
        let mut second = second_rx.recv().unwrap();
        let started = Instant::now();
        let waited = second.wait_timeout(LONG).map(|r| r.is_ok());
        tx.send((waited, started.elapsed())).unwrap();
    });
    second_tx.send(c.send(2).unwrap()).unwrap();
    let (waited, took) = rx.recv_timeout(GENEROUS).expect("the wait came back");
    gave_up_at_once(waited, took);
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, 2);
}

/// Keyed: the sink of `a1` waits for `b2`, which the other worker delivers: the wait returns
/// its outcome. It then waits for `a5`, behind its own item in lane `a`: once the other worker
/// is idle, nobody else can settle it, and `wait_timeout` says so instead of sitting out its
/// deadline.
#[test]
fn keyed_a_sink_gets_another_keys_outcome_but_not_its_own_keys() {
    let (c, took, (other, own, own_took)) =
        from_inside_the_sink(Ordering::Keyed { concurrency: 2 }, |c| {
            let other = c
                .send_keyed("b", 4)
                .unwrap()
                .wait()
                .map_err(|e| e.to_string());
            let mut own = c.send_keyed("a", 5).unwrap();
            let started = Instant::now();
            let own = own.wait_timeout(LONG).map(|r| r.is_ok());
            (other, own, started.elapsed())
        });
    assert_eq!(other, Ok(()), "b's item, delivered by the other worker");
    gave_up_at_once(own, own_took);
    assert!(took < Duration::from_secs(5), "the sink took {took:?}");
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, 5);
}

/// Keyed: the sink of `a1` waits for `a4`, the next item of its own key, while `b2` still runs
/// on the other worker (for 300 ms). Only the sink's own worker can deliver `a4`, whatever the
/// other worker does: the wait panics instead of waiting for good.
#[test]
fn keyed_a_sink_waiting_for_its_own_keys_next_item_does_not_hang() {
    let (c, took, panicked) = from_inside_the_sink(Ordering::Keyed { concurrency: 2 }, |c| {
        let own = c.send_keyed("a", 4).unwrap();
        let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| own.wait()));
        waited.map_err(panic_text).map(drop)
    });
    let text = panicked.expect_err("the wait panicked");
    assert!(text.contains("Receipt::wait would wait forever"), "{text}");
    assert!(took < Duration::from_secs(5), "the wait took {took:?}");
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, 4);
}

/// Pipelined, two workers, both in their sink calls: item 1's sink waits for item 11, then
/// item 2's sink waits for item 12. Item 2's worker finds the only other worker waiting too,
/// so its wait gives up at once; its call returns, it delivers item 11, and item 1's wait gets
/// the outcome. Nothing waits for good.
#[test]
fn pipelined_two_sinks_waiting_on_later_items_are_not_a_deadlock() {
    let (c, mut waits) = two_sinks_at_once(|c, item| {
        if item == 2 {
            sleep_ms(200); // item 1's wait starts first
        }
        let mut later = c.send(10 + item).unwrap();
        let started = Instant::now();
        let waited = later.wait_timeout(LONG).map(|r| r.is_ok());
        (waited, started.elapsed())
    });
    waits.sort_by_key(|w| w.0);
    let [(_, (first, first_took)), (_, (second, second_took))] = waits;
    assert_eq!(
        first,
        Some(true),
        "item 11 was delivered by the other worker"
    );
    gave_up_at_once(second, second_took);
    assert!(first_took < Duration::from_secs(5), "{first_took:?}");
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, 4);
}

/// Runs `inside` in the sink of item `a1` (which gets its own receipt), while another thread
/// keeps sending `b` items that take 5 ms each, so that the other worker is never idle
/// meanwhile; returns what `inside` returned.
fn with_the_other_worker_busy<O: Send + 'static>(
    ordering: Ordering,
    inside: impl Fn(&Conveyor<u64>, Receipt<()>) -> O + Send + Sync + 'static,
) -> (Arc<Conveyor<u64>>, O) {
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let own: Arc<Mutex<Option<Receipt<()>>>> = Arc::new(Mutex::new(None));
    let me: Arc<OnceLock<Arc<Conveyor<u64>>>> = Arc::new(OnceLock::new());
    let (mine, myself) = (own.clone(), me.clone());
    let c = Arc::new(
        Conveyor::builder()
            .ordering(ordering)
            .capacity(8)
            .drain_timeout(Duration::from_secs(1))
            .build(move |d: Delivery<u64>| {
                if d.key() != Some("a") {
                    sleep_ms(5);
                }
                if d.key() != Some("a") || *d.item() != 1 {
                    return Ok(());
                }
                let receipt = loop {
                    if let Some(receipt) = mine.lock().unwrap().take() {
                        break receipt;
                    }
                    sleep_ms(1);
                };
                let out = inside(myself.get().expect("set before the first send"), receipt);
                tx.lock().unwrap().send(out).unwrap();
                Ok(())
            })
            .unwrap(),
    );
    me.set(c.clone()).ok();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (c, stop) = (c.clone(), stop.clone());
        std::thread::spawn(move || {
            for i in 1000.. {
                if stop.load(SeqCst) || c.send_keyed("b", i).is_err() {
                    return;
                }
            }
        })
    };
    sleep_ms(100); // the other worker is busy
    *own.lock().unwrap() = Some(c.send_keyed("a", 1).unwrap());
    let out = rx.recv_timeout(GENEROUS);
    stop.store(true, SeqCst);
    traffic.join().unwrap();
    (c, out.expect("the sink came back"))
}

/// Keyed: the sink of `a1` waits for `a2`, queued behind its own item in lane `a`, while the
/// other worker is kept busy with lane `b`. Nobody but the sink's own worker can ever settle
/// `a2`, whatever the other worker does: `wait_timeout` gives up at once, and `wait` panics
/// (both used to go on for as long as lane `b` had traffic, for ever on a busy service).
#[test]
fn keyed_a_wait_for_its_own_lane_gives_up_while_other_lanes_are_busy() {
    let (c, (waited, waited_long, panicked, took)) =
        with_the_other_worker_busy(Ordering::Keyed { concurrency: 2 }, |c, _| {
            let mut own = c.send_keyed("a", 2).unwrap();
            let started = Instant::now();
            let waited = own.wait_timeout(LONG).map(|r| r.is_ok());
            let waited_long = started.elapsed();
            let own = c.send_keyed("a", 3).unwrap();
            let started = Instant::now();
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| own.wait()))
                .map_err(panic_text)
                .map(drop);
            (waited, waited_long, panicked, started.elapsed())
        });
    gave_up_at_once(waited, waited_long);
    let text = panicked.expect_err("the wait panicked");
    assert!(text.contains("Receipt::wait would wait forever"), "{text}");
    assert!(took < Duration::from_secs(5), "the wait took {took:?}");
    assert!(c.flush_timeout(GENEROUS));
}

/// Pipelined: the sink of item `a1` waits for its own receipt, while the other worker is kept
/// busy. Only the call that waits could settle it: the wait gives up at once (it used to go on
/// for as long as the other worker had work).
#[test]
fn pipelined_a_sink_waiting_for_its_own_item_gives_up_while_the_others_are_busy() {
    let (c, (waited, took)) =
        with_the_other_worker_busy(Ordering::Pipelined { in_flight: 2 }, |_, mut own| {
            let started = Instant::now();
            (own.wait_timeout(LONG).map(|r| r.is_ok()), started.elapsed())
        });
    gave_up_at_once(waited, took);
    assert!(c.flush_timeout(GENEROUS));
}

/// Pipelined, two workers, a quick sink: once its calls are measured quick enough for leases,
/// the item the sink runs when it waits may be leased alone. Its wait for a later item is a
/// wait for what the other worker can deliver, as it is for a job (see
/// `pipelined_two_sinks_waiting_on_later_items_are_not_a_deadlock`): it returns the outcome,
/// where it gave up at once while the lease held the lane.
#[test]
fn pipelined_a_quick_sink_waiting_on_a_later_item_gets_its_outcome() {
    const TRIGGER: u64 = 1_000_000;
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let c = calling_itself_after(
        Ordering::Pipelined { in_flight: 2 },
        4096,
        TRIGGER,
        |_| {},
        move |c, _| {
            let mut later = c.send(TRIGGER + 1).unwrap();
            let started = Instant::now();
            let waited = later.wait_timeout(LONG).map(|r| r.is_ok());
            tx.lock()
                .unwrap()
                .send((waited, started.elapsed()))
                .unwrap();
        },
    );
    // Quick calls: the workers lease from now on.
    for i in 0..2_000 {
        c.send(i).unwrap();
    }
    assert!(c.flush_timeout(GENEROUS));
    sleep_ms(20); // both workers asleep: the next item is alone in the lane
    c.send(TRIGGER).unwrap();
    let (waited, took) = rx.recv_timeout(GENEROUS).expect("the sink came back");
    assert_eq!(
        waited,
        Some(true),
        "the other worker delivered it (after {took:?})"
    );
    assert!(took < Duration::from_secs(5), "the wait took {took:?}");
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, 2_002);
}
