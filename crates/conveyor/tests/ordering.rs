//! Order and concurrency bounds under each ordering mode.

mod common;

use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;

use common::{sleep_ms, Gate, Recorder, GENEROUS};
use conveyor::{Conveyor, Delivery, Ordering};

fn recording(ordering: Ordering, rec: &Arc<Recorder>, sleep: u64) -> Conveyor<u64> {
    let rec = rec.clone();
    Conveyor::builder()
        .ordering(ordering)
        .build(move |d: Delivery<u64>| {
            let call = rec.enter(&d);
            sleep_ms(sleep);
            rec.leave(call);
            Ok(())
        })
        .unwrap()
}

#[test]
fn strict_delivers_in_submission_order_one_at_a_time() {
    let rec = Recorder::new();
    let c = recording(Ordering::Strict, &rec, 0);
    for i in 0..2_000 {
        c.send(i).unwrap();
    }
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(rec.items_ended(), (0..2_000).collect::<Vec<_>>());
    assert_eq!(rec.max_running.load(AtomicOrdering::SeqCst), 1);
    let seqs: Vec<u64> = rec.starts.lock().unwrap().iter().map(|c| c.seq).collect();
    assert_eq!(
        seqs,
        (1..=2_000).collect::<Vec<_>>(),
        "seqs start at 1 and increase"
    );
}

/// Four producers send 500 items each; delivery must follow seq order and keep each
/// producer's order.
fn four_producers_keep_order(c: Conveyor<u64>, rec: &Recorder) {
    let c = Arc::new(c);
    let producers: Vec<_> = (0..4u64)
        .map(|p| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..500u64 {
                    c.send(p * 1_000_000 + i).unwrap();
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    assert!(c.flush_timeout(GENEROUS));
    let calls = rec.ends.lock().unwrap().clone();
    assert_eq!(calls.len(), 2_000);
    // Delivery order is seq order, and each producer's items keep their order.
    assert!(calls.windows(2).all(|w| w[0].seq < w[1].seq));
    for p in 0..4u64 {
        let mine: Vec<u64> = calls
            .iter()
            .filter(|c| c.item / 1_000_000 == p)
            .map(|c| c.item % 1_000_000)
            .collect();
        assert_eq!(mine, (0..500).collect::<Vec<_>>());
    }
    let s = c.stats();
    assert_eq!((s.accepted, s.delivered, s.queued), (2_000, 2_000, 0));
}

#[test]
fn strict_keeps_each_producers_order_and_seq_order_across_threads() {
    let rec = Recorder::new();
    four_producers_keep_order(recording(Ordering::Strict, &rec, 0), &rec);
}

#[test]
fn order_holds_when_sends_keep_filling_a_small_queue() {
    // A capacity of 4 sends most items down the full-queue path, between sends that
    // find room: both paths must hand out seqs in the order items reach the lanes.
    let rec = Recorder::new();
    let r = rec.clone();
    let c = Conveyor::builder()
        .capacity(4)
        .build(move |d: Delivery<u64>| {
            r.leave(r.enter(&d));
            Ok(())
        })
        .unwrap();
    four_producers_keep_order(c, &rec);
}

#[test]
fn pipelined_starts_in_order_with_bounded_parallelism() {
    let rec = Recorder::new();
    let c = recording(Ordering::Pipelined { in_flight: 4 }, &rec, 5);
    for i in 0..200 {
        c.send(i).unwrap();
    }
    assert!(c.flush_timeout(GENEROUS));
    let max = rec.max_running.load(AtomicOrdering::SeqCst);
    assert!(max <= 4, "at most 4 in flight, saw {max}");
    assert!(max >= 2, "pipelining overlapped calls, saw {max}");
    let starts = rec.items_started();
    let mut sorted = starts.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..200).collect::<Vec<_>>());
    // Items are taken in order with at most 4 in flight: item n can only start once
    // n - 3 earlier calls have ended.
    for (item, ended) in rec.ended_before_start.lock().unwrap().iter() {
        assert!(
            *ended as u64 + 3 >= *item,
            "item {item} started after only {ended} ends"
        );
    }
}

#[test]
fn keyed_is_strict_per_key_and_parallel_across_keys() {
    let rec = Recorder::new();
    let c = recording(Ordering::Keyed { concurrency: 3 }, &rec, 2);
    for i in 0..300u64 {
        c.send_keyed(format!("k{}", i % 7), i).unwrap();
    }
    // Keyless items share the "" lane.
    for i in 300..310u64 {
        c.send(i).unwrap();
    }
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(rec.max_per_key.load(AtomicOrdering::SeqCst), 1);
    let max = rec.max_running.load(AtomicOrdering::SeqCst);
    assert!((2..=3).contains(&max), "1 < keys in flight <= 3, saw {max}");
    let by_key = rec.ended_by_key();
    for k in 0..7u64 {
        let expected: Vec<u64> = (0..300).filter(|i| i % 7 == k).collect();
        assert_eq!(by_key[&format!("k{k}")], expected);
    }
    assert_eq!(by_key[""], (300..310).collect::<Vec<_>>());
    let s = c.stats();
    assert_eq!((s.accepted, s.delivered), (310, 310));
}

#[test]
fn receipts_carry_replies_and_seqs() {
    let c: Conveyor<u64, u64> = Conveyor::builder()
        .ordering(Ordering::Pipelined { in_flight: 3 })
        .build(|d: Delivery<u64>| Ok(d.item() * 10 + d.seq()))
        .unwrap();
    let receipts: Vec<_> = (0..50).map(|i| c.send(i).unwrap()).collect();
    for (i, r) in receipts.into_iter().enumerate() {
        let seq = r.seq();
        assert_eq!(seq, i as u64 + 1);
        assert_eq!(r.wait().unwrap(), i as u64 * 10 + seq);
    }
}

#[test]
fn delivery_idempotency_keys_are_stable_per_item_and_distinct() {
    use conveyor::{Retry, SinkError};
    use std::sync::Mutex;
    let keys = Arc::new(Mutex::new(Vec::new()));
    let k = keys.clone();
    let c: Conveyor<u64> = Conveyor::builder()
        .retry(Retry::fixed(std::time::Duration::from_millis(1)).max_attempts(2))
        .build(move |d: Delivery<u64>| {
            k.lock().unwrap().push((d.seq(), d.idempotency_key()));
            if d.attempt() == 1 {
                Err(SinkError::retryable("first attempt fails"))
            } else {
                Ok(())
            }
        })
        .unwrap();
    c.send(1).unwrap();
    c.send(2).unwrap();
    assert!(c.flush_timeout(GENEROUS));
    let keys = keys.lock().unwrap();
    assert_eq!(keys.len(), 4);
    assert_eq!(keys[0], keys[1], "same item, same key on retry");
    assert_ne!(keys[1].1, keys[2].1, "different items, different keys");
}

#[test]
fn a_held_lane_never_holds_up_the_others_however_the_second_worker_waits() {
    // Lane "a" is held until the round ends. Every other key must be delivered meanwhile,
    // whether the second worker is asleep, spinning for items, or just back from a call,
    // and whether "a" arrives alone or in one batch with the others.
    for round in 0..40 {
        let gate = Gate::new();
        let g = gate.clone();
        let c: Conveyor<u64> = Conveyor::builder()
            .ordering(Ordering::Keyed { concurrency: 2 })
            .build(move |d: Delivery<u64>| {
                if d.key() == Some("a") {
                    g.pass();
                }
                Ok(())
            })
            .unwrap();
        if round % 4 == 1 {
            sleep_ms(20); // both workers asleep first
        }
        let a = c.send_keyed("a", 0).unwrap();
        if round % 2 == 0 {
            gate.wait_for_callers(1);
        }
        for (i, key) in ["c", "b", "d", "c"].into_iter().enumerate() {
            let mut receipt = c.send_keyed(key, i as u64 + 1).unwrap();
            assert!(
                matches!(receipt.wait_timeout(GENEROUS), Some(Ok(()))),
                "round {round}: {key} waited for lane a"
            );
        }
        assert!(!a.is_settled(), "lane a is still held");
        gate.open();
        a.wait().unwrap();
    }
}
