//! What a send does when the queue is full, and the bound on memory.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Gate, GENEROUS};
use conveyor::{Backpressure, Conveyor, DeliveryError, SendError};

fn gated(capacity: usize, policy: Backpressure, gate: &Arc<Gate>) -> Conveyor<u64> {
    common::gated(
        Conveyor::builder().capacity(capacity).backpressure(policy),
        gate,
    )
}

#[test]
fn reject_hands_the_item_back_when_full() {
    let gate = Gate::new();
    let c = gated(2, Backpressure::Reject, &gate);
    c.send(0).unwrap();
    gate.wait_for_callers(1); // item 0 in flight, not counted against capacity
    c.send(1).unwrap();
    c.send(2).unwrap();
    match c.send(3) {
        Err(e @ SendError::Full(_)) => {
            assert!(e.to_string().contains("full"));
            assert_eq!(e.into_inner(), 3);
        }
        other => panic!("{other:?}"),
    }
    let s = c.stats();
    assert_eq!((s.accepted, s.queued, s.in_flight), (3, 2, 1));
    gate.open();
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, 3);
}

#[test]
fn concurrent_try_sends_never_exceed_the_capacity() {
    let gate = Gate::new();
    let c = Arc::new(gated(64, Backpressure::Reject, &gate));
    c.send(u64::MAX).unwrap();
    gate.wait_for_callers(1); // in flight: the 64 places are all for the producers
    let producers: Vec<_> = (0..4u64)
        .map(|p| {
            let c = c.clone();
            std::thread::spawn(move || {
                let (mut taken, mut refused) = (Vec::new(), 0);
                for i in 0..100u64 {
                    match c.try_send(p * 1_000 + i) {
                        Ok(receipt) => taken.push((i, receipt)),
                        Err(SendError::Full(item)) => {
                            assert_eq!(item, p * 1_000 + i, "the refused item comes back");
                            refused += 1;
                        }
                        Err(e) => panic!("{e:?}"),
                    }
                }
                (taken, refused)
            })
        })
        .collect();
    let results: Vec<_> = producers.into_iter().map(|p| p.join().unwrap()).collect();
    let accepted: usize = results.iter().map(|(t, _)| t.len()).sum();
    let refused: usize = results.iter().map(|(_, r)| r).sum();
    assert_eq!((accepted, refused), (64, 400 - 64));
    let s = c.stats();
    assert_eq!((s.accepted, s.queued, s.in_flight), (65, 64, 1));
    gate.open();
    for (taken, _) in results {
        for (_, receipt) in taken {
            receipt.wait().unwrap();
        }
    }
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, 65);
}

#[test]
fn drop_newest_settles_the_new_item_as_dropped() {
    let gate = Gate::new();
    let c = gated(1, Backpressure::DropNewest, &gate);
    let r0 = c.send(0).unwrap();
    gate.wait_for_callers(1);
    let r1 = c.send(1).unwrap();
    let r2 = c.send(2).unwrap();
    assert!(matches!(r2.wait(), Err(DeliveryError::Dropped)));
    gate.open();
    r0.wait().unwrap();
    r1.wait().unwrap();
    let s = c.stats();
    assert_eq!((s.accepted, s.delivered, s.dropped), (3, 2, 1));
}

#[test]
fn drop_oldest_evicts_the_oldest_queued_item() {
    let gate = Gate::new();
    let c = gated(2, Backpressure::DropOldest, &gate);
    let r0 = c.send(0).unwrap();
    gate.wait_for_callers(1);
    let r1 = c.send(1).unwrap();
    let r2 = c.send(2).unwrap();
    let r3 = c.send(3).unwrap();
    assert!(matches!(r1.wait(), Err(DeliveryError::Dropped)));
    gate.open();
    for r in [r0, r2, r3] {
        r.wait().unwrap();
    }
    let s = c.stats();
    assert_eq!((s.accepted, s.delivered, s.dropped), (4, 3, 1));
}

#[test]
fn block_waits_for_room_and_try_send_never_waits() {
    let gate = Gate::new();
    let c = Arc::new(gated(2, Backpressure::Block, &gate));
    c.send(0).unwrap();
    gate.wait_for_callers(1);
    c.send(1).unwrap();
    c.send(2).unwrap();
    assert!(matches!(c.try_send(9), Err(SendError::Full(9))));
    let producer = {
        let c = c.clone();
        std::thread::spawn(move || {
            for i in 3..20 {
                c.send(i).unwrap();
                let s = c.stats();
                assert!(s.queued <= 2, "queue exceeded its capacity: {s:?}");
            }
        })
    };
    // The producer is blocked: nothing beyond capacity was accepted.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(c.stats().accepted, 3);
    gate.open();
    producer.join().unwrap();
    assert!(c.flush_timeout(GENEROUS));
    let s = c.stats();
    assert_eq!((s.accepted, s.delivered), (20, 20));
}

#[test]
fn a_blocked_sender_is_released_by_close_with_its_item() {
    let gate = Gate::new();
    let c = Arc::new(gated(1, Backpressure::Block, &gate));
    c.send(0).unwrap();
    gate.wait_for_callers(1);
    c.send(1).unwrap();
    let blocked = {
        let c = c.clone();
        std::thread::spawn(move || c.send(2))
    };
    std::thread::sleep(Duration::from_millis(20));
    let closer = {
        let c = c.clone();
        std::thread::spawn(move || c.close_timeout(Duration::from_millis(100)))
    };
    match blocked.join().unwrap() {
        Err(SendError::Closed(2)) => {}
        other => panic!("{other:?}"),
    }
    let report = closer.join().unwrap();
    assert_eq!(report.left, 2);
    gate.open();
}

/// Receipt callbacks that send a follow-up item into their own conveyor, full and blocking:
/// each worker takes its next job, which frees a place, before it runs the callback of the
/// item it finished. A worker that ran the callback first would wait for room that only a
/// worker taking a job makes, and with every worker in such a callback, nothing would move.
fn follow_ups_from_callbacks_into_a_full_conveyor(ordering: conveyor::Ordering) {
    use std::time::Instant;
    let c: Arc<Conveyor<u64>> = Arc::new(
        Conveyor::builder()
            .ordering(ordering)
            .capacity(2)
            .drain_timeout(Duration::from_secs(1))
            .build(|d: conveyor::Delivery<u64>| {
                if *d.item() < 3 {
                    // Long enough for the test to fill the queue with items 3 and 4.
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(())
            })
            .unwrap(),
    );
    for i in 1..=2u64 {
        let me = c.clone();
        c.send_keyed(format!("k{i}"), i)
            .unwrap()
            .on_settled(move |_| {
                // Refused only once the conveyor is closed, when the test has failed.
                let _ = me.send_keyed(format!("k{i}"), 10 + i);
            });
    }
    c.send_keyed("k3", 3).unwrap();
    c.send_keyed("k4", 4).unwrap();
    let start = Instant::now();
    let flushed = c.flush_timeout(GENEROUS);
    let stats = c.stats();
    let report = c.close();
    assert!(
        flushed,
        "stuck after {:?}: {stats:?} (close: {report:?})",
        start.elapsed()
    );
    assert_eq!(stats.delivered, 6, "{stats:?}");
}

#[test]
fn follow_ups_from_callbacks_into_a_full_pipelined_conveyor() {
    follow_ups_from_callbacks_into_a_full_conveyor(conveyor::Ordering::Pipelined { in_flight: 2 });
}

#[test]
fn follow_ups_from_callbacks_into_a_full_keyed_conveyor() {
    follow_ups_from_callbacks_into_a_full_conveyor(conveyor::Ordering::Keyed { concurrency: 2 });
}
