//! Properties: for random workloads and failure patterns, per-lane order and the
//! accounting invariant hold.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use conveyor::{
    Backpressure, Conveyor, Delivery, DeliveryError, OnFailure, Ordering, Retry, SinkError,
};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy)]
enum Fault {
    None,
    RetryableOnce,
    AlwaysRetryable,
    Permanent,
    Panic,
}

impl Fault {
    /// What the sink does on this attempt of an item with this fault: fail, panic, or go on.
    fn strike(self, attempt: u32) -> Result<(), SinkError> {
        match self {
            Fault::RetryableOnce if attempt == 1 => Err(SinkError::retryable("once")),
            Fault::AlwaysRetryable => Err(SinkError::retryable("always")),
            Fault::Permanent => Err(SinkError::permanent("never")),
            Fault::Panic => panic!("sink panic"),
            Fault::None | Fault::RetryableOnce => Ok(()),
        }
    }
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        6 => Just(Fault::None),
        2 => Just(Fault::RetryableOnce),
        1 => Just(Fault::AlwaysRetryable),
        1 => Just(Fault::Permanent),
        1 => Just(Fault::Panic),
    ]
}

fn ordering() -> impl Strategy<Value = Ordering> {
    prop_oneof![
        Just(Ordering::Strict),
        (1usize..5).prop_map(|n| Ordering::Keyed { concurrency: n }),
        (1usize..5).prop_map(|n| Ordering::Pipelined { in_flight: n }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn order_and_accounting_hold(
        ordering in ordering(),
        items in proptest::collection::vec((0u8..4, fault()), 0..60),
        pause in any::<bool>(),
    ) {
        let faults: Vec<Fault> = items.iter().map(|(_, f)| *f).collect();
        let delivered = Arc::new(Mutex::new(BTreeMap::<String, Vec<u64>>::new()));
        let dl = delivered.clone();
        let c: Conveyor<u64> = Conveyor::builder()
            .ordering(ordering)
            .retry(Retry::fixed(Duration::ZERO).max_attempts(2))
            .on_failure(if pause { OnFailure::Pause } else { OnFailure::Skip })
            .build(move |d: Delivery<u64>| {
                let i = *d.item() as usize;
                faults[i].strike(d.attempt())?;
                dl.lock().unwrap().entry(d.key().unwrap_or("").to_owned()).or_default().push(i as u64);
                Ok(())
            })
            .unwrap();
        let keyed = matches!(ordering, Ordering::Keyed { .. });
        for (i, (key, _)) in items.iter().enumerate() {
            c.send_keyed(format!("k{key}"), i as u64).unwrap();
            let s = c.stats();
            prop_assert_eq!(s.accepted, s.delivered + s.failed + s.dropped + s.queued + s.in_flight);
        }
        prop_assert!(c.flush_timeout(Duration::from_secs(30)));
        let s = c.stats();
        prop_assert_eq!(s.accepted, items.len() as u64);
        prop_assert_eq!(s.accepted, s.delivered + s.failed + s.dropped + s.queued + s.in_flight);
        prop_assert_eq!(s.in_flight, 0);
        let delivered = delivered.lock().unwrap().clone();
        let total: usize = delivered.values().map(Vec::len).sum();
        prop_assert_eq!(total as u64, s.delivered);
        let is_fatal = |f: Fault| matches!(f, Fault::AlwaysRetryable | Fault::Permanent | Fault::Panic);
        for (key, got) in &delivered {
            // Every delivered lane is in increasing order where order is promised.
            if !matches!(ordering, Ordering::Pipelined { .. }) {
                prop_assert!(got.windows(2).all(|w| w[0] < w[1]), "lane {} out of order: {:?}", key, got);
            }
            // Under Skip, a lane delivers exactly its non-fatal items.
            if !pause && (keyed || matches!(ordering, Ordering::Strict)) {
                let expected: Vec<u64> = items.iter().enumerate()
                    .filter(|(_, (k, f))| &format!("k{k}") == key && !is_fatal(*f))
                    .map(|(i, _)| i as u64).collect();
                prop_assert_eq!(got, &expected);
            }
        }
        if pause {
            // Under Pause, a strict/keyed lane delivers exactly its items before its
            // first fatal one, and the rest are held, not lost.
            prop_assert_eq!(s.failed, 0);
            if !matches!(ordering, Ordering::Pipelined { .. }) {
                let lanes: Vec<String> = if keyed {
                    (0..4).map(|k| format!("k{k}")).collect()
                } else {
                    vec![String::new()]
                };
                let mut held = 0u64;
                for lane in lanes {
                    let lane_items: Vec<(usize, Fault)> = items.iter().enumerate()
                        .filter(|(_, (k, _))| !keyed || format!("k{k}") == lane)
                        .map(|(i, (_, f))| (i, *f)).collect();
                    let cut = lane_items.iter().position(|(_, f)| is_fatal(*f)).unwrap_or(lane_items.len());
                    held += (lane_items.len() - cut) as u64;
                }
                prop_assert_eq!(s.queued, held);
            }
        } else {
            prop_assert_eq!(s.queued, 0);
        }
        let report = c.close_timeout(Duration::from_secs(30));
        prop_assert_eq!(report.left, s.queued);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Several producers into a small queue: sends switch between the intake and the
    /// full-queue path all the time, and seqs, lane order and counts must still hold.
    #[test]
    fn concurrent_producers_into_a_small_queue_keep_order_and_counts(
        ordering in ordering(),
        capacity in 1usize..8,
        producers in 1usize..4,
        per_producer in 1usize..150,
        faults in proptest::collection::vec(fault(), 64),
    ) {
        // (lane, seq, producer, index) of every delivered item, in delivery order.
        let seen = Arc::new(Mutex::new(Vec::<(String, u64, u64, u64)>::new()));
        let s = seen.clone();
        let c = Arc::new(Conveyor::<u64>::builder()
            .ordering(ordering)
            .capacity(capacity)
            .retry(Retry::fixed(Duration::ZERO).max_attempts(2))
            .build(move |d: Delivery<u64>| {
                let (producer, index) = (*d.item() / 1_000, *d.item() % 1_000);
                faults[(d.item() % 64) as usize].strike(d.attempt())?;
                let lane = d.key().unwrap_or("").to_owned();
                s.lock().unwrap().push((lane, d.seq(), producer, index));
                Ok(())
            })
            .unwrap());
        let threads: Vec<_> = (0..producers as u64)
            .map(|p| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..per_producer as u64 {
                        c.send_keyed(format!("k{}", i % 3), p * 1_000 + i).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        prop_assert!(c.flush_timeout(Duration::from_secs(30)));
        let st = c.stats();
        let total = (producers * per_producer) as u64;
        prop_assert_eq!(st.accepted, total);
        prop_assert_eq!((st.queued, st.in_flight, st.dropped), (0, 0, 0));
        prop_assert_eq!(st.delivered + st.failed, total);
        let seen = seen.lock().unwrap().clone();
        prop_assert_eq!(seen.len() as u64, st.delivered);
        if !matches!(ordering, Ordering::Pipelined { .. }) {
            let keyed = matches!(ordering, Ordering::Keyed { .. });
            let mut last_seq = BTreeMap::<String, u64>::new();
            let mut last_index = BTreeMap::<(String, u64), u64>::new();
            for (lane, seq, producer, index) in &seen {
                let lane = if keyed { lane.clone() } else { String::new() };
                if let Some(prev) = last_seq.insert(lane.clone(), *seq) {
                    prop_assert!(prev < *seq, "lane {:?}: seq {} after {}", lane, seq, prev);
                }
                if let Some(prev) = last_index.insert((lane.clone(), *producer), *index) {
                    prop_assert!(prev < *index, "producer {} out of order in lane {:?}", producer, lane);
                }
            }
        }
    }
}

/// The policies that never wait for room.
fn overflow() -> impl Strategy<Value = Backpressure> {
    prop_oneof![
        Just(Backpressure::Reject),
        Just(Backpressure::DropNewest),
        Just(Backpressure::DropOldest),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A small queue overflows while the sink holds every call until the sends are done:
    /// each item is refused (its send hands it back), dropped (its receipt says so) or
    /// delivered, in its lane's order; the counts agree with the receipts, and the queue never
    /// holds more than its capacity. Items sent without a key go to the lane `""`.
    #[test]
    fn an_overflowing_queue_refuses_or_drops_items_visibly_and_keeps_order(
        ordering in ordering(),
        policy in overflow(),
        capacity in 1usize..6,
        keys in proptest::collection::vec(proptest::option::of(0u8..3), 0..40),
    ) {
        let open = Arc::new((Mutex::new(false), Condvar::new()));
        // (key, item) of every delivered item, in delivery order.
        let delivered = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
        let (o, dl) = (open.clone(), delivered.clone());
        let c: Conveyor<u64> = Conveyor::builder()
            .ordering(ordering)
            .capacity(capacity)
            .backpressure(policy)
            .build(move |d: Delivery<u64>| {
                let (lock, opened) = &*o;
                drop(opened.wait_while(lock.lock().unwrap(), |open| !*open).unwrap());
                dl.lock().unwrap().push((d.key().unwrap_or("").to_owned(), *d.item()));
                Ok(())
            })
            .unwrap();
        let mut receipts = Vec::new();
        let mut refused = 0u64;
        for (i, key) in (0u64..).zip(&keys) {
            let sent = match key {
                Some(k) => c.send_keyed(format!("k{k}"), i),
                None => c.send(i),
            };
            match sent {
                Ok(receipt) => receipts.push((i, receipt)),
                Err(e) => {
                    prop_assert!(e.is_full() && policy == Backpressure::Reject, "{}", e);
                    prop_assert_eq!(e.into_inner(), i);
                    refused += 1;
                }
            }
            let s = c.stats();
            prop_assert_eq!(s.accepted, s.delivered + s.failed + s.dropped + s.queued + s.in_flight);
            prop_assert!(s.queued <= capacity as u64, "{:?}", s);
        }
        {
            let (lock, opened) = &*open;
            *lock.lock().unwrap() = true;
            opened.notify_all();
        }
        prop_assert!(c.flush_timeout(Duration::from_secs(30)));
        let mut dropped = 0u64;
        for (i, mut receipt) in receipts {
            match receipt.wait_timeout(Duration::from_secs(30)) {
                Some(Ok(())) => {}
                Some(Err(DeliveryError::Dropped)) => dropped += 1,
                other => prop_assert!(false, "item {}: {:?}", i, other),
            }
        }
        let s = c.stats();
        prop_assert_eq!(s.accepted + refused, keys.len() as u64);
        prop_assert_eq!(s.dropped, dropped);
        prop_assert_eq!(s.delivered + s.dropped, s.accepted);
        prop_assert_eq!((s.queued, s.in_flight, s.failed), (0, 0, 0));
        // Nothing is delivered before the sends end: all but the queue's and the calls' fill
        // was refused or dropped.
        let calls = match ordering {
            Ordering::Keyed { concurrency: n } | Ordering::Pipelined { in_flight: n } => n,
            _ => 1,
        };
        let overflow = keys.len().saturating_sub(capacity + calls) as u64;
        prop_assert!(refused + dropped >= overflow, "{} + {} < {}", refused, dropped, overflow);
        if policy == Backpressure::Reject {
            prop_assert_eq!(dropped, 0);
        } else {
            prop_assert_eq!(refused, 0);
        }
        let delivered = delivered.lock().unwrap().clone();
        prop_assert_eq!(delivered.len() as u64, s.delivered);
        if !matches!(ordering, Ordering::Pipelined { .. }) {
            let keyed = matches!(ordering, Ordering::Keyed { .. });
            let mut last = BTreeMap::<String, u64>::new();
            for (key, item) in delivered {
                let lane = if keyed { key } else { String::new() };
                if let Some(prev) = last.insert(lane.clone(), item) {
                    prop_assert!(prev < item, "lane {:?}: {} after {}", lane, item, prev);
                }
            }
        }
    }
}
