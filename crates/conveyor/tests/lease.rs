//! A worker runs the head items of a strict or keyed lane several per turn of the state lock
//! (a lease): each receipt still settles before the next item's sink call, failures go back to
//! the one-item path in order, a shutdown stops the worker between the items it holds, and
//! other keys go on while a lease's call is stuck. Each test runs in strict mode and in keyed
//! mode with every item in one lane (sent without a key).

mod common;

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{sleep_ms, Gate, Recorder, GENEROUS};
use conveyor::{Conveyor, Delivery, DeliveryError, OnFailure, Ordering, Retry, SinkError, Stats};

const ITEMS: u64 = 200;

/// The orderings whose lanes are leased, each with other workers around in keyed mode.
const LEASING: [Ordering; 2] = [Ordering::Strict, Ordering::Keyed { concurrency: 4 }];

fn balanced(s: &Stats) -> bool {
    s.accepted == s.delivered + s.failed + s.dropped + s.queued + s.in_flight
}

/// Sends `ITEMS` items while the sink holds item 0 in `gate`, so that the worker then takes
/// the whole backlog at its next turn of the lock.
fn backlog<R>(c: &Conveyor<u64, R>, gate: &Gate) -> Vec<conveyor::Receipt<R>>
where
    R: Send + 'static,
{
    let receipts: Vec<_> = (0..ITEMS).map(|i| c.send(i).unwrap()).collect();
    gate.wait_for_callers(1);
    receipts
}

/// What a close past its deadline reports and settles while item 50 of `receipts` (the
/// items `0..ITEMS`) is stuck in its call: the items before it delivered, it unconfirmed, the
/// others closed.
fn assert_closed_at_50(report: &conveyor::CloseReport, receipts: Vec<conveyor::Receipt<()>>) {
    assert_eq!(report.left, ITEMS - 50, "{report:?}");
    assert!(balanced(&report.stats), "{report:?}");
    let outcomes: Vec<_> = receipts
        .into_iter()
        .map(|mut r| r.wait_timeout(GENEROUS).expect("settled"))
        .collect();
    assert!(outcomes[..50].iter().all(Result::is_ok));
    assert!(matches!(outcomes[50], Err(DeliveryError::Unconfirmed)));
    assert!(outcomes[51..]
        .iter()
        .all(|o| matches!(o, Err(DeliveryError::Closed))));
}

/// A conveyor whose sink records every call in `rec` and holds item 0 in `first` and item
/// `at` in `then`.
fn held_at_0_and(
    ordering: Ordering,
    at: u64,
    first: &Arc<Gate>,
    then: &Arc<Gate>,
    rec: &Arc<Recorder>,
) -> Conveyor<u64> {
    let (g1, g2, r) = (first.clone(), then.clone(), rec.clone());
    Conveyor::builder()
        .ordering(ordering)
        .build(move |d: Delivery<u64>| {
            let call = r.enter(&d);
            r.leave(call);
            match *d.item() {
                0 => g1.pass(),
                n if n == at => g2.pass(),
                _ => {}
            }
            Ok(())
        })
        .unwrap()
}

/// Every receipt of a backlog settles (its callback done) before the next item reaches the
/// sink, and `stats()` stays balanced while the worker runs the backlog.
#[test]
fn each_receipt_settles_before_the_next_call() {
    for ordering in LEASING {
        eprintln!("{ordering:?}");
        each_receipt_settles_before_the_next_call_in(ordering);
    }
}

fn each_receipt_settles_before_the_next_call_in(ordering: Ordering) {
    let gate = Gate::new();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (g, l) = (gate.clone(), log.clone());
    let c: Arc<Conveyor<u64>> = Arc::new(
        Conveyor::builder()
            .ordering(ordering)
            .build(move |d: Delivery<u64>| {
                if *d.item() == 0 {
                    g.pass();
                }
                l.lock().unwrap().push(format!("call {}", d.item()));
                Ok(())
            })
            .unwrap(),
    );
    let receipts = backlog(&c, &gate);
    for (i, r) in receipts.into_iter().enumerate() {
        let l = log.clone();
        r.on_settled(move |outcome| {
            assert!(outcome.is_ok());
            l.lock().unwrap().push(format!("settled {i}"));
        });
    }
    let done = Arc::new(AtomicBool::new(false));
    let (looking, looked) = std::sync::mpsc::channel();
    let watcher = std::thread::spawn({
        let (c, done) = (c.clone(), done.clone());
        move || {
            let mut looks = 0u64;
            while !done.load(AtomicOrdering::SeqCst) {
                let s = c.stats();
                assert!(balanced(&s), "{s:?}");
                assert!(s.in_flight <= 1, "{s:?}");
                looks += 1;
                if looks == 1 {
                    looking.send(()).unwrap();
                }
            }
            looks
        }
    });
    // The watcher is looking before the backlog runs (it may not be scheduled until it is
    // over, on a loaded machine).
    looked.recv_timeout(GENEROUS).unwrap();
    gate.open();
    c.flush();
    done.store(true, AtomicOrdering::SeqCst);
    assert!(watcher.join().unwrap() > 0);
    let expected: Vec<String> = (0..ITEMS)
        .flat_map(|i| [format!("call {i}"), format!("settled {i}")])
        .collect();
    assert_eq!(*log.lock().unwrap(), expected);
    let s = c.stats();
    assert_eq!((s.delivered, s.queued, s.in_flight), (ITEMS, 0, 0), "{s:?}");
}

/// Once the last receipt sent has settled, `stats()` counts every item as delivered: the
/// counters of a run of items move no later than the last one's receipt settles.
#[test]
fn stats_count_every_item_once_the_last_receipt_settled() {
    for ordering in LEASING {
        eprintln!("{ordering:?}");
        stats_count_every_item_once_the_last_receipt_settled_in(ordering);
    }
}

fn stats_count_every_item_once_the_last_receipt_settled_in(ordering: Ordering) {
    let gate = Gate::new();
    let g = gate.clone();
    let c: Conveyor<u64> = Conveyor::builder()
        .ordering(ordering)
        .build(move |d: Delivery<u64>| {
            if *d.item() == 0 {
                g.pass();
            }
            Ok(())
        })
        .unwrap();
    let receipts = backlog(&c, &gate);
    gate.open();
    let last = receipts.into_iter().last().unwrap();
    last.wait().unwrap();
    let s = c.stats();
    assert_eq!((s.delivered, s.queued, s.in_flight), (ITEMS, 0, 0), "{s:?}");
}

/// While the worker runs a backlog, `stats()` counts the items it delivered so far, not only
/// those of its earlier turns of the lock: with a slow sink a run of items takes long (the exit
/// notices of the Python package report what is left from them).
#[test]
fn stats_count_what_the_worker_delivered_in_the_middle_of_a_backlog() {
    for ordering in LEASING {
        eprintln!("{ordering:?}");
        stats_count_what_the_worker_delivered_in_the_middle_of_a_backlog_in(ordering);
    }
}

fn stats_count_what_the_worker_delivered_in_the_middle_of_a_backlog_in(ordering: Ordering) {
    let (first, later) = (Gate::new(), Gate::new());
    let c = held_at_0_and(ordering, 10, &first, &later, &Recorder::new());
    let receipts = backlog(&c, &first);
    first.open();
    later.wait_for_callers(1);
    let s = c.stats();
    assert_eq!(
        (s.delivered, s.in_flight, s.queued),
        (10, 1, ITEMS - 11),
        "{s:?}"
    );
    later.open();
    receipts.into_iter().last().unwrap().wait().unwrap();
    assert_eq!(c.stats().delivered, ITEMS);
}

/// In the middle of a backlog: a retryable failure is retried in place, a permanent one fails
/// its item alone, and the items behind them keep their order.
#[test]
fn failures_in_a_backlog_are_retried_or_failed_in_order() {
    for ordering in LEASING {
        eprintln!("{ordering:?}");
        failures_in_a_backlog_are_retried_or_failed_in_order_in(ordering);
    }
}

fn failures_in_a_backlog_are_retried_or_failed_in_order_in(ordering: Ordering) {
    let gate = Gate::new();
    let rec = Recorder::new();
    let (g, r) = (gate.clone(), rec.clone());
    let c: Conveyor<u64> = Conveyor::builder()
        .ordering(ordering)
        .retry(Retry::fixed(Duration::from_millis(1)).max_attempts(3))
        .build(move |d: Delivery<u64>| {
            let call = r.enter(&d);
            r.leave(call);
            match (*d.item(), d.attempt()) {
                (0, _) => g.pass(),
                (10 | 11, 1) | (40, 1 | 2) => return Err(SinkError::retryable("again")),
                (25, _) => return Err(SinkError::permanent("never")),
                _ => {}
            }
            Ok(())
        })
        .unwrap();
    let receipts = backlog(&c, &gate);
    gate.open();
    assert!(c.flush_timeout(GENEROUS));
    let mut expected = Vec::new();
    for i in 0..ITEMS {
        let attempts = match i {
            10 | 11 => 2,
            25 => 1,
            40 => 3,
            _ => 1,
        };
        expected.extend(std::iter::repeat(i).take(attempts));
    }
    assert_eq!(rec.items_started(), expected);
    for (i, r) in receipts.into_iter().enumerate() {
        match r.wait() {
            Err(DeliveryError::Failed { attempts: 1, .. }) if i == 25 => {}
            Ok(()) if i != 25 => {}
            other => panic!("item {i}: {other:?}"),
        }
    }
    let s = c.stats();
    assert_eq!((s.delivered, s.failed, s.retried), (ITEMS - 1, 1, 4));
    assert!(balanced(&s), "{s:?}");
}

/// Under `OnFailure::Pause`, an item that fails in the middle of a backlog pauses the lane
/// with everything behind it still queued, and `resume` goes on from it, in order.
#[test]
fn a_pause_in_a_backlog_holds_the_rest_in_order() {
    for ordering in LEASING {
        eprintln!("{ordering:?}");
        a_pause_in_a_backlog_holds_the_rest_in_order_in(ordering);
    }
}

fn a_pause_in_a_backlog_holds_the_rest_in_order_in(ordering: Ordering) {
    let gate = Gate::new();
    let rec = Recorder::new();
    let fail = Arc::new(AtomicBool::new(true));
    let (g, r, f) = (gate.clone(), rec.clone(), fail.clone());
    let c: Conveyor<u64> = Conveyor::builder()
        .ordering(ordering)
        .on_failure(OnFailure::Pause)
        .build(move |d: Delivery<u64>| {
            let call = r.enter(&d);
            r.leave(call);
            if *d.item() == 0 {
                g.pass();
            }
            if *d.item() == 30 && f.load(AtomicOrdering::SeqCst) {
                return Err(SinkError::permanent("not yet"));
            }
            Ok(())
        })
        .unwrap();
    let receipts = backlog(&c, &gate);
    gate.open();
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.paused(), vec![String::new()]);
    let s = c.stats();
    assert_eq!(
        (s.delivered, s.queued, s.in_flight),
        (30, ITEMS - 30, 0),
        "{s:?}"
    );
    assert_eq!(rec.items_started(), (0..=30).collect::<Vec<_>>());
    fail.store(false, AtomicOrdering::SeqCst);
    assert!(c.resume(""));
    assert!(c.flush_timeout(GENEROUS));
    let mut expected: Vec<u64> = (0..=30).collect();
    expected.extend(30..ITEMS);
    assert_eq!(rec.items_started(), expected);
    for r in receipts {
        r.wait().unwrap();
    }
}

/// A close whose deadline passes while the sink is stuck in the middle of a backlog the
/// worker holds: the items after the stuck one are reported and settled as closed, at once,
/// and never reach the sink; the stuck one is unconfirmed; those before it were delivered.
#[test]
fn a_close_past_its_deadline_reports_the_items_the_worker_holds() {
    for ordering in LEASING {
        eprintln!("{ordering:?}");
        a_close_past_its_deadline_reports_the_items_the_worker_holds_in(ordering);
    }
}

fn a_close_past_its_deadline_reports_the_items_the_worker_holds_in(ordering: Ordering) {
    let (first, stuck) = (Gate::new(), Gate::new());
    let rec = Recorder::new();
    let c = held_at_0_and(ordering, 50, &first, &stuck, &rec);
    let receipts = backlog(&c, &first);
    first.open();
    stuck.wait_for_callers(1);
    let report = c.close_timeout(Duration::from_millis(50));
    assert_eq!(report.stats.delivered, 50, "{report:?}");
    // Settled by the close, while item 50's call is still stuck.
    assert_closed_at_50(&report, receipts);
    stuck.open();
    // Nothing to wait for but the absence of a call: the worker leaves after item 50, where it
    // would start item 51 within microseconds.
    sleep_ms(200);
    assert_eq!(rec.items_started(), (0..=50).collect::<Vec<_>>());
}

/// A sender blocked on a full queue is woken when a lease ends, not as each of its items is
/// delivered, so a slow sink gets no leases: each item it finishes lets a blocked sender in at
/// once, as before leases, rather than at the end of a run of slow calls.
#[test]
fn a_slow_sink_lets_a_blocked_sender_in_item_by_item() {
    for ordering in LEASING {
        eprintln!("{ordering:?}");
        a_slow_sink_lets_a_blocked_sender_in_item_by_item_in(ordering);
    }
}

fn a_slow_sink_lets_a_blocked_sender_in_item_by_item_in(ordering: Ordering) {
    let gates: Vec<Arc<Gate>> = (0..5).map(|_| Gate::new()).collect();
    let g = gates.clone();
    let c: Arc<Conveyor<u64>> = Arc::new(
        Conveyor::builder()
            .ordering(ordering)
            .capacity(2)
            .build(move |d: Delivery<u64>| {
                g[*d.item() as usize].pass();
                Ok(())
            })
            .unwrap(),
    );
    let mut receipts = vec![c.send(0).unwrap()];
    gates[0].wait_for_callers(1);
    receipts.extend([1, 2].map(|i| c.send(i).unwrap()));
    // Sends 3 and then 4, each waiting for room; says when each got in.
    let (accepted, sent) = std::sync::mpsc::channel();
    let sender = {
        let c = c.clone();
        std::thread::spawn(move || {
            [3, 4].map(|i| {
                let receipt = c.send(i).unwrap();
                accepted.send(i).unwrap();
                receipt
            })
        })
    };
    let got_in = |what: &str| {
        sent.recv_timeout(GENEROUS)
            .unwrap_or_else(|_| panic!("{what} was not let in ({:?})", c.stats()))
    };
    gates[0].open();
    assert_eq!(got_in("item 3, once item 1 started"), 3);
    gates[1].wait_for_callers(1);
    gates[1].open();
    gates[2].wait_for_callers(1);
    // Item 2 is in the sink, item 3 alone is queued: item 4 gets in now, while item 2's call
    // still waits.
    assert_eq!(got_in("item 4, once item 2 started"), 4);
    assert_eq!(gates[2].waiting.load(AtomicOrdering::SeqCst), 1);
    for gate in &gates[2..] {
        gate.open();
    }
    receipts.extend(sender.join().unwrap());
    for r in receipts {
        r.wait().unwrap();
    }
    assert_eq!(c.stats().delivered, 5);
}

/// A close made from the receipt callback of an item in the middle of a lease counts that
/// item as delivered (its receipt settled, with its reply, before the close began), as a close
/// from a callback did before leases: it was reported left, and `delivered` one short.
#[test]
fn a_close_from_a_receipt_callback_in_a_lease_counts_that_item_delivered() {
    for ordering in LEASING {
        eprintln!("{ordering:?}");
        a_close_from_a_receipt_callback_in_a_lease_counts_that_item_delivered_in(ordering);
    }
}

fn a_close_from_a_receipt_callback_in_a_lease_counts_that_item_delivered_in(ordering: Ordering) {
    let gate = Gate::new();
    let g = gate.clone();
    let c: Arc<Conveyor<u64>> = Arc::new(
        Conveyor::builder()
            .ordering(ordering)
            .build(move |d: Delivery<u64>| {
                if *d.item() == 0 {
                    g.pass();
                }
                Ok(())
            })
            .unwrap(),
    );
    // Item 0 alone in the first lease; the others in the next, where item 5 is neither first
    // nor last.
    let first = c.send(0).unwrap();
    gate.wait_for_callers(1);
    let mut receipts: Vec<_> = (1..ITEMS).map(|i| c.send(i).unwrap()).collect();
    let fifth = receipts.remove(4);
    let (report_tx, report) = std::sync::mpsc::channel();
    let closing = c.clone();
    fifth.on_settled(move |outcome| {
        let report = closing.close();
        report_tx.send((outcome, report)).unwrap();
    });
    gate.open();
    let (outcome, report) = report.recv_timeout(GENEROUS).unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(first.wait().is_ok());
    assert_eq!(report.stats.delivered, 6, "{report:?}");
    assert_eq!(report.left, ITEMS - 6, "{report:?}");
    assert!(balanced(&report.stats), "{report:?}");
    for (i, r) in receipts.into_iter().enumerate() {
        let item = i as u64 + if i < 4 { 1 } else { 2 };
        match r.wait() {
            Ok(()) if item < 6 => {}
            Err(DeliveryError::Closed) if item >= 6 => {}
            other => panic!("item {item}: {other:?}"),
        }
    }
}

/// A sink that sends one item into its own conveyor per item it is given never finds the
/// queue fuller than when its item was taken: an item the worker delivered in its lease
/// leaves room, as it did when every item left the queue as its call began.
#[test]
fn a_sink_sending_into_its_own_conveyor_finds_the_room_its_lease_delivered() {
    for ordering in LEASING {
        eprintln!("{ordering:?}");
        a_sink_sending_into_its_own_conveyor_finds_the_room_its_lease_delivered_in(ordering);
    }
}

fn a_sink_sending_into_its_own_conveyor_finds_the_room_its_lease_delivered_in(ordering: Ordering) {
    use conveyor::Backpressure;
    use std::sync::OnceLock;
    let gate = Gate::new();
    let own: Arc<OnceLock<std::sync::Weak<Conveyor<u64>>>> = Arc::new(OnceLock::new());
    let refused = Arc::new(Mutex::new(Vec::new()));
    let (g, o, r) = (gate.clone(), own.clone(), refused.clone());
    let c: Arc<Conveyor<u64>> = Arc::new(
        Conveyor::builder()
            .ordering(ordering)
            .capacity(8)
            .backpressure(Backpressure::Block)
            .build(move |d: Delivery<u64>| {
                let item = *d.item();
                if item == 0 {
                    g.pass();
                }
                // Items 1 to 8 each send one follow-up, 101 to 108.
                if (1..=8).contains(&item) {
                    let c = o.get().unwrap().upgrade().unwrap();
                    if let Err(e) = c.send(item + 100) {
                        r.lock().unwrap().push((item, e.to_string()));
                    }
                }
                Ok(())
            })
            .unwrap(),
    );
    own.set(Arc::downgrade(&c)).unwrap();
    c.send(0).unwrap();
    gate.wait_for_callers(1);
    // A full queue behind item 0: the next lease holds all eight.
    for i in 1..=8 {
        c.send(i).unwrap();
    }
    gate.open();
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(*refused.lock().unwrap(), Vec::new());
    assert_eq!(c.stats().delivered, 17);
}

/// Keyed: while a call in the middle of one key's lease is stuck, the other keys' items are
/// delivered, in order, by the other workers; a close past its deadline then reports the
/// stuck lease's items, and only those.
#[test]
fn other_keys_go_on_while_a_call_in_a_lease_is_stuck() {
    let (first, stuck) = (Gate::new(), Gate::new());
    let rec = Recorder::new();
    let c = held_at_0_and(Ordering::Keyed { concurrency: 4 }, 50, &first, &stuck, &rec);
    let held: Vec<_> = (0..ITEMS).map(|i| c.send_keyed("a", i).unwrap()).collect();
    first.wait_for_callers(1);
    first.open();
    stuck.wait_for_callers(1);
    let others: Vec<_> = (1000..1000 + ITEMS)
        .map(|i| c.send_keyed("b", i).unwrap())
        .collect();
    for (i, mut r) in others.into_iter().enumerate() {
        let outcome = r.wait_timeout(GENEROUS);
        assert!(matches!(outcome, Some(Ok(()))), "b's item {i}: {outcome:?}");
    }
    let by_key = rec.ended_by_key();
    assert_eq!(by_key["b"], (1000..1000 + ITEMS).collect::<Vec<_>>());
    // The recorder counts a call ended before the sink waits at the gate.
    assert_eq!(by_key["a"], (0..=50).collect::<Vec<_>>());
    let report = c.close_timeout(Duration::from_millis(50));
    assert_eq!(report.stats.delivered, ITEMS + 50, "{report:?}");
    assert_closed_at_50(&report, held);
    stuck.open();
}

/// Keyed: a lease keeps the lookout, so sends wake nobody while it runs. Once a call in it is
/// stuck, the worker standing by takes the lookout away: the other keys' items, sent one by
/// one meanwhile, are delivered while the sends go on, not once the stuck call returns.
#[test]
fn other_keys_sent_one_by_one_go_on_while_a_call_in_a_keyed_lease_is_stuck() {
    const PACED: u64 = 300;
    let (first, stuck) = (Gate::new(), Gate::new());
    let rec = Recorder::new();
    let c = held_at_0_and(Ordering::Keyed { concurrency: 4 }, 50, &first, &stuck, &rec);
    for i in 0..ITEMS {
        c.send_keyed("a", i).unwrap();
    }
    first.wait_for_callers(1);
    first.open();
    stuck.wait_for_callers(1);
    // A send every 200 us or so, well within the millisecond the worker standing by waits for
    // the lease to move.
    let receipts: Vec<_> = (1000..1000 + PACED)
        .map(|i| {
            let receipt = c.send_keyed("b", i).unwrap();
            std::thread::sleep(Duration::from_micros(200));
            receipt
        })
        .collect();
    let during = c.stats();
    // Opened before any assertion, so that a failure does not wait for the drop's deadline.
    stuck.open();
    assert!(
        during.delivered >= 50 + PACED / 2,
        "{} delivered while the sends went on ({during:?})",
        during.delivered
    );
    for (i, r) in receipts.into_iter().enumerate() {
        assert!(r.wait().is_ok(), "b's item {i}");
    }
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, ITEMS + PACED);
    let by_key = rec.ended_by_key();
    assert_eq!(by_key["a"], (0..ITEMS).collect::<Vec<_>>());
    assert_eq!(by_key["b"], (1000..1000 + PACED).collect::<Vec<_>>());
}

/// Keyed: the worker woken to stand by a lease that keeps the lookout may find another key's
/// item sent meanwhile (which woke nobody) and run it instead. If that call is stuck, and then
/// one in the lease too, an idle worker must stand by in its place: sends, seeing the lookout,
/// wake nobody, so a third key's items would wait for one of the stuck calls.
#[test]
fn an_idle_worker_stands_by_when_the_one_woken_for_it_runs_a_stuck_call() {
    use std::sync::{OnceLock, Weak};
    let (first, b_gate, stuck) = (Gate::new(), Gate::new(), Gate::new());
    let own: Arc<OnceLock<Weak<Conveyor<u64>>>> = Arc::new(OnceLock::new());
    let rec = Recorder::new();
    let (g1, gb, gs, o, r) = (
        first.clone(),
        b_gate.clone(),
        stuck.clone(),
        own.clone(),
        rec.clone(),
    );
    let c = Arc::new(
        Conveyor::builder()
            .ordering(Ordering::Keyed { concurrency: 3 })
            .build(move |d: Delivery<u64>| {
                let call = r.enter(&d);
                r.leave(call);
                match (d.key(), *d.item()) {
                    (Some("a"), 0) => g1.pass(),
                    // In the lease of a's backlog (item 1 ran at once): b's item, sent from
                    // here, wakes nobody, and the worker woken to stand by finds it.
                    (Some("a"), 2) => {
                        let c = o.get().unwrap().upgrade().unwrap();
                        drop(c.send_keyed("b", 1000).unwrap());
                        gb.wait_for_callers(1);
                    }
                    (Some("a"), 3) => gs.pass(),
                    (Some("b"), _) => gb.pass(),
                    _ => {}
                }
                Ok(())
            })
            .unwrap(),
    );
    own.set(Arc::downgrade(&c)).unwrap();
    for i in 0..ITEMS {
        c.send_keyed("a", i).unwrap();
    }
    first.wait_for_callers(1);
    first.open();
    stuck.wait_for_callers(1);
    let mut receipt = c.send_keyed("c", 2000).unwrap();
    // Far more than the millisecond a worker standing by lets a lease stall.
    let outcome = receipt.wait_timeout(Duration::from_secs(5));
    let during = c.stats();
    // Opened before any assertion, so that a failure does not wait for the drop's deadline.
    b_gate.open();
    stuck.open();
    assert!(
        matches!(outcome, Some(Ok(()))),
        "c's item while a's lease and b's call were stuck: {outcome:?} ({during:?})"
    );
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, ITEMS + 2);
    assert_eq!(rec.ended_by_key()["a"], (0..ITEMS).collect::<Vec<_>>());
}

/// A pipelined conveyor whose workers have seen its sink return at once (so that they lease),
/// with item `at` of the items sent next held in `gate` and the sink's calls in `rec`.
fn pipelined_after_warm_up(at: u64, gate: &Arc<Gate>, rec: &Arc<Recorder>) -> Conveyor<u64> {
    let first = Gate::new();
    first.open();
    let c = held_at_0_and(Ordering::Pipelined { in_flight: 4 }, at, &first, gate, rec);
    for i in 0..ITEMS {
        c.send(i).unwrap();
    }
    assert!(c.flush_timeout(GENEROUS));
    c
}

/// Pipelined: a call stuck in the middle of a lease holds up only its own item, as outside a
/// lease: the lease is cut, and the other workers deliver the items after it meanwhile.
#[test]
fn a_stuck_call_in_a_pipelined_lease_holds_up_only_its_own_item() {
    let (stuck, rec) = (Gate::new(), Recorder::new());
    let c = pipelined_after_warm_up(ITEMS + 50, &stuck, &rec);
    let receipts: Vec<_> = (ITEMS..2 * ITEMS).map(|i| c.send(i).unwrap()).collect();
    stuck.wait_for_callers(1);
    for (i, mut r) in (ITEMS..).zip(receipts) {
        if i != ITEMS + 50 {
            let outcome = r.wait_timeout(GENEROUS);
            assert!(matches!(outcome, Some(Ok(()))), "item {i}: {outcome:?}");
        }
    }
    let s = c.stats();
    assert_eq!(
        (s.delivered, s.in_flight, s.queued),
        (2 * ITEMS - 1, 1, 0),
        "{s:?}"
    );
    stuck.open();
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, 2 * ITEMS);
    let mut started = rec.items_started();
    started.sort_unstable();
    assert_eq!(started, (0..2 * ITEMS).collect::<Vec<_>>());
}

/// Pipelined: a retryable failure in the middle of a lease is retried in place, and nothing
/// after it starts before its first attempt failed; a permanent one fails its item alone.
#[test]
fn failures_in_a_pipelined_lease_are_retried_or_failed() {
    let (retried, failed) = (ITEMS + 50, ITEMS + 100);
    let rec = Recorder::new();
    let r = rec.clone();
    let c: Conveyor<u64> = Conveyor::builder()
        .ordering(Ordering::Pipelined { in_flight: 4 })
        .retry(Retry::fixed(Duration::from_millis(1)).max_attempts(3))
        .build(move |d: Delivery<u64>| {
            let call = r.enter(&d);
            r.leave(call);
            match (*d.item(), d.attempt()) {
                (i, 1) if i == retried => Err(SinkError::retryable("again")),
                (i, _) if i == failed => Err(SinkError::permanent("never")),
                _ => Ok(()),
            }
        })
        .unwrap();
    for i in 0..ITEMS {
        c.send(i).unwrap();
    }
    assert!(c.flush_timeout(GENEROUS));
    let receipts: Vec<_> = (ITEMS..2 * ITEMS).map(|i| c.send(i).unwrap()).collect();
    assert!(c.flush_timeout(GENEROUS));
    for (i, r) in (ITEMS..).zip(receipts) {
        match r.wait() {
            Err(DeliveryError::Failed { attempts: 1, .. }) if i == failed => {}
            Ok(()) if i != failed => {}
            other => panic!("item {i}: {other:?}"),
        }
    }
    let s = c.stats();
    assert_eq!((s.delivered, s.failed, s.retried), (2 * ITEMS - 1, 1, 1));
    assert!(balanced(&s), "{s:?}");
    let started = rec.items_started();
    let first = |item: u64| started.iter().position(|&i| i == item).unwrap();
    assert!(first(retried + 1) > first(retried), "{started:?}");
    let mut expected: Vec<u64> = (0..2 * ITEMS).chain([retried]).collect();
    expected.sort_unstable();
    let mut started = started.clone();
    started.sort_unstable();
    assert_eq!(started, expected);
}

/// Pipelined: sends that keep waking the worker standing by while a call in a lease is stuck
/// do not keep it from cutting the lease: the items after the stuck one are delivered while the
/// sends go on, not once they stop.
#[test]
fn a_stuck_pipelined_lease_is_cut_while_sends_keep_coming() {
    const PACED: u64 = 300;
    let (stuck, rec) = (Gate::new(), Recorder::new());
    let c = pipelined_after_warm_up(ITEMS + 50, &stuck, &rec);
    let mut receipts: Vec<_> = (ITEMS..2 * ITEMS).map(|i| c.send(i).unwrap()).collect();
    stuck.wait_for_callers(1);
    // A send every 200 us or so: each may wake the worker standing by, well within the
    // millisecond it waits for the lease to move.
    for i in 2 * ITEMS..2 * ITEMS + PACED {
        receipts.push(c.send(i).unwrap());
        std::thread::sleep(Duration::from_micros(200));
    }
    let delivered = c.stats().delivered;
    assert!(
        delivered >= 2 * ITEMS + PACED / 2,
        "{delivered} delivered while the sends went on ({:?})",
        c.stats()
    );
    stuck.open();
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, 2 * ITEMS + PACED);
}

/// The item a [`pipelined_paused`] conveyor's lane is paused at: resumed, it heads the lease the
/// first worker to look takes, with the items sent after it.
const PAUSED_AT: u64 = ITEMS;

/// A pipelined conveyor whose workers have seen its sink return at once (so that they lease),
/// paused at item [`PAUSED_AT`] (its first attempt fails under `OnFailure::Pause`), so that the
/// items sent next wait for `resume` and go into a lease together: their receipts can be given
/// callbacks first. The sink records its calls in `rec`, then returns what `then` says of the
/// item and attempt; a retryable failure is retried after 20 ms, up to 3 attempts in all.
fn pipelined_paused(
    rec: &Arc<Recorder>,
    then: impl Fn(u64, u32) -> Result<(), SinkError> + Send + Sync + 'static,
) -> Arc<Conveyor<u64>> {
    let r = rec.clone();
    let c = Conveyor::builder()
        .ordering(Ordering::Pipelined { in_flight: 4 })
        .on_failure(OnFailure::Pause)
        .retry(Retry::fixed(Duration::from_millis(20)).max_attempts(3))
        .build(move |d: Delivery<u64>| {
            let call = r.enter(&d);
            r.leave(call);
            match (*d.item(), d.attempt()) {
                (PAUSED_AT, 1) => Err(SinkError::permanent("not yet")),
                (item, attempt) => then(item, attempt),
            }
        })
        .unwrap();
    for i in 0..=PAUSED_AT {
        c.send(i).unwrap();
    }
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.paused(), [""]);
    Arc::new(c)
}

/// A sink's `then` for [`pipelined_paused`] that holds item `at` in `gate`.
fn hold(at: u64, gate: &Arc<Gate>) -> impl Fn(u64, u32) -> Result<(), SinkError> + Send + Sync {
    let gate = gate.clone();
    move |item, _| {
        if item == at {
            gate.pass();
        }
        Ok(())
    }
}

/// Sends the items after [`PAUSED_AT`], up to `2 * ITEMS`, to a [`pipelined_paused`]
/// conveyor, item `at` with `callback` on its receipt, and resumes the lane; returns the last
/// item's receipt.
fn resume_with_a_callback_at(
    c: &Conveyor<u64>,
    at: u64,
    callback: impl FnOnce(Result<(), DeliveryError>) + Send + 'static,
) -> conveyor::Receipt<()> {
    let mut callback = Some(callback);
    let mut last = None;
    for i in PAUSED_AT + 1..2 * ITEMS {
        let r = c.send(i).unwrap();
        match callback.take_if(|_| i == at) {
            Some(callback) => r.on_settled(callback),
            None => last = Some(r),
        }
    }
    assert!(c.resume(""));
    last.expect("items after the one with the callback")
}

/// Pipelined: a receipt callback that stalls in the middle of a lease gets the lease cut, so the
/// other workers deliver the items after it, and `flush` still waits for that callback: it
/// returns only once every receipt has settled.
#[test]
fn flush_waits_for_a_receipt_callback_stalled_in_a_cut_pipelined_lease() {
    let rec = Recorder::new();
    let c = pipelined_paused(&rec, |_, _| Ok(()));
    let stall = Gate::new();
    let s = stall.clone();
    let mut last = resume_with_a_callback_at(&c, PAUSED_AT + 40, move |outcome| {
        assert!(outcome.is_ok());
        s.pass();
    });
    stall.wait_for_callers(1);
    let outcome = last.wait_timeout(GENEROUS);
    assert!(matches!(outcome, Some(Ok(()))), "{outcome:?}");
    let (returned, stats) = (c.flush_timeout(Duration::from_millis(100)), c.stats());
    stall.open();
    assert!(
        !returned,
        "flush returned while a receipt callback was still running ({stats:?})"
    );
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, 2 * ITEMS);
}

/// Pipelined: a close made from the receipt callback of an item whose call got its lease cut
/// (it was stuck), once the call returned, counts that item as delivered, as a close from any
/// other receipt callback in a lease does.
#[test]
fn a_close_from_the_receipt_callback_of_a_cut_leases_item_counts_it_delivered() {
    let (stuck, rec, at) = (Gate::new(), Recorder::new(), PAUSED_AT + 40);
    let c = pipelined_paused(&rec, hold(at, &stuck));
    let (report_tx, report) = std::sync::mpsc::channel();
    let closing = c.clone();
    let mut last = resume_with_a_callback_at(&c, at, move |outcome| {
        let report = closing.close();
        report_tx.send((outcome, report)).unwrap();
    });
    stuck.wait_for_callers(1);
    // Delivered past the stuck call: its lease was cut.
    let outcome = last.wait_timeout(GENEROUS);
    assert!(matches!(outcome, Some(Ok(()))), "{outcome:?}");
    stuck.open();
    let (outcome, report) = report.recv_timeout(GENEROUS).unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(
        (report.left, report.stats.delivered),
        (0, 2 * ITEMS),
        "{report:?}"
    );
    assert!(balanced(&report.stats), "{report:?}");
}

/// Pipelined: `resume` gives a fresh retry budget to the item that paused the lane while the
/// call that got its lease cut is still stuck at the head of the lane.
#[test]
fn resume_behind_a_stuck_call_of_a_cut_lease_gives_a_fresh_retry_budget() {
    let (stuck, rec) = (Gate::new(), Recorder::new());
    let (at, failing) = (PAUSED_AT + 40, PAUSED_AT + 60);
    // Three failed attempts pause the lane; after the resume, one more fails, the next passes.
    let failures = Arc::new(std::sync::atomic::AtomicU32::new(4));
    let (s, f) = (stuck.clone(), failures.clone());
    let c = pipelined_paused(&rec, move |item, _| {
        if item == at {
            s.pass();
        }
        let fail = item == failing
            && f.fetch_update(AtomicOrdering::SeqCst, AtomicOrdering::SeqCst, |n| {
                n.checked_sub(1)
            })
            .is_ok();
        if fail {
            Err(SinkError::retryable("not yet"))
        } else {
            Ok(())
        }
    });
    let receipts: Vec<_> = (PAUSED_AT + 1..PAUSED_AT + 80)
        .map(|i| c.send(i).unwrap())
        .collect();
    assert!(c.resume(""));
    stuck.wait_for_callers(1);
    let deadline = std::time::Instant::now() + GENEROUS;
    while c.paused().is_empty() {
        assert!(std::time::Instant::now() < deadline, "{:?}", c.stats());
        sleep_ms(1);
    }
    assert_eq!(failures.load(AtomicOrdering::SeqCst), 1);
    assert!(c.resume(""));
    stuck.open();
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.paused(), Vec::<String>::new(), "{:?}", c.stats());
    for r in receipts {
        r.wait().unwrap();
    }
}

/// The calls a sink saw, as (item, attempt), for items that wait for them as they drop.
#[derive(Default)]
struct Starts {
    calls: Mutex<Vec<(u64, u32)>>,
    started: std::sync::Condvar,
    /// A slow drop (see `SlowToDrop`) saw an item start that overtook a retry.
    overtaken: AtomicBool,
    /// The thread that made the first attempt of each item.
    threads: Mutex<std::collections::HashMap<u64, std::thread::ThreadId>>,
}

/// Whether, in `calls`, an item after `failing` started after the first attempt of `failing`
/// failed (noted as its attempt 0) and before its second attempt started.
fn overtaken(calls: &[(u64, u32)], failing: u64) -> bool {
    calls
        .iter()
        .skip_while(|&&call| call != (failing, 0))
        .take_while(|&&call| call != (failing, 2))
        .any(|&(n, _)| n > failing)
}

/// An item that, if `slow` and dropped once the first attempt of item `after` failed, by the
/// thread that made that attempt (as the worker whose lease held both does when the lease
/// ends), waits as it drops (half a second at most) for an item after that one to start, and
/// notes such a start, if anything allows it meanwhile. Dropped elsewhere, the two items ran as
/// separate jobs, whose failure another worker may overtake before it is recorded (as before
/// leases): nothing is checked.
struct SlowToDrop {
    n: u64,
    slow: bool,
    after: u64,
    starts: Arc<Starts>,
}

impl Drop for SlowToDrop {
    fn drop(&mut self) {
        let same_thread = self.starts.threads.lock().unwrap().get(&self.after)
            == Some(&std::thread::current().id());
        let calls = self.starts.calls.lock().unwrap();
        if self.slow && same_thread && calls.contains(&(self.after, 0)) {
            let (calls, _) = self
                .starts
                .started
                .wait_timeout_while(calls, Duration::from_millis(500), |calls| {
                    !overtaken(calls, self.after)
                })
                .unwrap();
            if overtaken(&calls, self.after) {
                self.starts.overtaken.store(true, AtomicOrdering::SeqCst);
            }
        }
    }
}

/// Pipelined: an item whose first attempt fails in the middle of a lease is retried before any
/// item after it starts, however long the worker takes to get to its retry: here, the drop of
/// the item before it, which the worker lets go of as the lease ends (if it was in that
/// lease), sees no item after it start. (The order the sink records calls in is not quite the
/// order they start in: a retry that has begun may be recorded after the items it let start.)
#[test]
fn a_retry_out_of_a_pipelined_lease_is_not_overtaken() {
    let starts = Arc::new(Starts::default());
    let (paused, failing) = (ITEMS, ITEMS + 40);
    let s = starts.clone();
    let c: Conveyor<SlowToDrop> = Conveyor::builder()
        .ordering(Ordering::Pipelined { in_flight: 4 })
        .on_failure(OnFailure::Pause)
        .retry(Retry::fixed(Duration::from_millis(1)).max_attempts(3))
        .build(move |d: Delivery<SlowToDrop>| {
            let (n, attempt) = (d.item().n, d.attempt());
            if attempt == 1 {
                s.threads
                    .lock()
                    .unwrap()
                    .insert(n, std::thread::current().id());
            }
            s.calls.lock().unwrap().push((n, attempt));
            s.started.notify_all();
            match attempt {
                1 if n == paused => Err(SinkError::permanent("not yet")),
                1 if n == failing => {
                    // Its failure, as the call returns.
                    s.calls.lock().unwrap().push((n, 0));
                    Err(SinkError::retryable("again"))
                }
                _ => Ok(()),
            }
        })
        .unwrap();
    let item = |n| SlowToDrop {
        n,
        slow: n == failing - 1,
        after: failing,
        starts: starts.clone(),
    };
    // Warmed up (so that the workers lease), then paused, so that the items sent next go into
    // one lease as the lane is resumed.
    for n in 0..=paused {
        c.send(item(n)).unwrap();
    }
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.paused(), [""]);
    for n in paused + 1..paused + 60 {
        c.send(item(n)).unwrap();
    }
    assert!(c.resume(""));
    assert!(c.flush_timeout(GENEROUS));
    let calls = starts.calls.lock().unwrap().clone();
    assert!(calls.contains(&(failing, 2)), "{calls:?}");
    assert!(
        !starts.overtaken.load(AtomicOrdering::SeqCst),
        "{:?}",
        &calls[paused as usize..]
    );
    assert_eq!(c.stats().delivered, paused + 60);
}

/// Pipelined: an item whose first attempt fails in a lease goes on as a job and is retried;
/// while its retry's call is stuck, the items sent meanwhile are delivered by the other
/// workers, as when the item failed outside a lease (the worker that kept the lookout through
/// its lease must not keep it through the job).
#[test]
fn items_sent_while_a_retry_out_of_a_pipelined_lease_is_stuck_are_delivered() {
    let (stuck, rec, failing) = (Gate::new(), Recorder::new(), PAUSED_AT + 40);
    let s = stuck.clone();
    let c = pipelined_paused(&rec, move |item, attempt| match attempt {
        1 if item == failing => Err(SinkError::retryable("again")),
        2 if item == failing => {
            s.pass();
            Ok(())
        }
        _ => Ok(()),
    });
    let mut receipts: Vec<_> = (PAUSED_AT + 1..=failing)
        .map(|i| c.send(i).unwrap())
        .collect();
    assert!(c.resume(""));
    stuck.wait_for_callers(1);
    let later: Vec<_> = (failing + 1..failing + 1 + ITEMS)
        .map(|i| c.send(i).unwrap())
        .collect();
    for (i, mut r) in (failing + 1..).zip(later) {
        let outcome = r.wait_timeout(GENEROUS);
        assert!(matches!(outcome, Some(Ok(()))), "item {i}: {outcome:?}");
    }
    stuck.open();
    assert!(c.flush_timeout(GENEROUS));
    for r in receipts.drain(..) {
        r.wait().unwrap();
    }
    assert_eq!(c.stats().delivered, failing + 1 + ITEMS);
}

/// Pipelined: a close that drains the queue while a worker holds a lease keeps the other
/// workers until the lease ends: a call stuck in it then holds up only its own item, as
/// before the close.
#[test]
fn a_call_stuck_in_a_pipelined_lease_during_a_close_holds_up_only_its_own_item() {
    let (stuck, rec, at) = (Gate::new(), Recorder::new(), PAUSED_AT + 150);
    let c = pipelined_paused(&rec, hold(at, &stuck));
    let mut last = None;
    for i in PAUSED_AT + 1..2 * ITEMS {
        last = Some(c.send(i).unwrap());
    }
    let last = last.unwrap();
    let watcher = std::thread::spawn({
        let stuck = stuck.clone();
        move || {
            let mut last = last;
            let outcome = last.wait_timeout(GENEROUS);
            stuck.open();
            outcome
        }
    });
    assert!(c.resume(""));
    let report = c.close_timeout(GENEROUS);
    let outcome = watcher.join().unwrap();
    assert!(
        matches!(outcome, Some(Ok(()))),
        "the last item, while item {at} was stuck: {outcome:?}"
    );
    assert_eq!(
        (report.left, report.stats.delivered),
        (0, 2 * ITEMS),
        "{report:?}"
    );
}
