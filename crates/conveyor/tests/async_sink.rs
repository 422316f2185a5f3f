//! Async sinks, async senders and awaitable receipts.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::GENEROUS;
use conveyor::{Backpressure, Conveyor, Delivery, DeliveryError, Ordering, SinkError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_sink_on_the_ambient_runtime_keeps_order() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let c: Conveyor<u64, u64> = Conveyor::builder()
        .build_async(move |d: Delivery<u64>| {
            let s = s.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                s.lock().unwrap().push(*d.item());
                Ok(*d.item() * 2)
            }
        })
        .unwrap();
    let mut receipts = Vec::new();
    for i in 0..50 {
        receipts.push(c.send_async(i).await.unwrap());
    }
    for (i, r) in receipts.into_iter().enumerate() {
        assert_eq!(r.await.unwrap(), i as u64 * 2);
    }
    c.flush_async().await;
    assert_eq!(*seen.lock().unwrap(), (0..50).collect::<Vec<_>>());
}

#[tokio::test(flavor = "current_thread")]
async fn send_async_awaits_room_without_blocking_the_runtime() {
    let c: Conveyor<u64> = Conveyor::builder()
        .capacity(2)
        .backpressure(Backpressure::Block)
        .ordering(Ordering::Keyed { concurrency: 2 })
        .build_async(|_d: Delivery<u64>| async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(())
        })
        .unwrap();
    // On a single-threaded runtime, a blocking wait here would deadlock the sink.
    for i in 0..40 {
        c.send_keyed_async(format!("{}", i % 3), i).await.unwrap();
        assert!(c.stats().queued <= 2);
    }
    tokio::time::timeout(GENEROUS, c.flush_async())
        .await
        .unwrap();
    assert_eq!(c.stats().delivered, 40);
}

#[test]
fn async_sink_outside_a_runtime_uses_its_own_and_handles_failures() {
    let c: Conveyor<u64> = Conveyor::builder()
        .ordering(Ordering::Pipelined { in_flight: 4 })
        .build_async(|d: Delivery<u64>| async move {
            match *d.item() {
                3 => Err(SinkError::permanent("three is rejected")),
                5 => panic!("five panics"),
                _ => Ok(()),
            }
        })
        .unwrap();
    let receipts: Vec<_> = (0..8).map(|i| c.send(i).unwrap()).collect();
    let failed: Vec<usize> = receipts
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| match r.wait() {
            Ok(()) => None,
            Err(DeliveryError::Failed { .. }) => Some(i),
            Err(other) => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(failed, vec![3, 5]);
    let report = c.close_timeout(GENEROUS);
    assert!(report.drained);
    assert_eq!((report.stats.delivered, report.stats.failed), (6, 2));
}

#[test]
fn an_async_lane_held_up_does_not_hold_up_the_others() {
    // Lane "a" is held until the round ends; every other key must still be delivered
    // meanwhile, whether its send finds the second worker idle or just back from a call.
    for round in 0..8 {
        let release = Arc::new(tokio::sync::Notify::new());
        let r = release.clone();
        let c: Conveyor<u64> = Conveyor::builder()
            .ordering(Ordering::Keyed { concurrency: 2 })
            .build_async(move |d: Delivery<u64>| {
                let (r, held) = (r.clone(), d.key() == Some("a"));
                async move {
                    if held {
                        r.notified().await;
                    }
                    Ok(())
                }
            })
            .unwrap();
        if round % 2 == 1 {
            std::thread::sleep(Duration::from_millis(20)); // both workers idle first
        }
        let a = c.send_keyed("a", 0).unwrap();
        while c.stats().in_flight == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        for (i, key) in ["c", "b", "d"].into_iter().enumerate() {
            let mut receipt = c.send_keyed(key, i as u64 + 1).unwrap();
            assert!(
                matches!(receipt.wait_timeout(GENEROUS), Some(Ok(()))),
                "round {round}: {key} waited for lane a"
            );
        }
        assert!(!a.is_settled(), "lane a is still held");
        release.notify_one(); // keeps a permit if the held call is not waiting yet
        a.wait().unwrap();
    }
}

/// An async sink on the ambient current-thread runtime, built inside it.
fn on_this_runtime(capacity: usize) -> Conveyor<u64> {
    Conveyor::builder()
        .capacity(capacity)
        .drain_timeout(GENEROUS)
        .build_async(|_d: Delivery<u64>| async { Ok(()) })
        .unwrap()
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast_ref::<&str>() {
        Some(text) => (*text).to_owned(),
        None => payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default(),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn blocking_waits_on_the_sinks_own_runtime_thread_fail_loudly_instead_of_hanging() {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let c = on_this_runtime(1);
    // Finds room, so it never waits; and fills the queue (capacity 1), as nothing runs
    // until this task awaits.
    let mut receipt = c.send(1).unwrap();
    let flush = catch_unwind(AssertUnwindSafe(|| c.flush())).unwrap_err();
    assert!(panic_message(flush).contains("flush_async"));
    // A bounded flush only says how things stand.
    assert!(!c.flush_timeout(GENEROUS));
    let send = catch_unwind(AssertUnwindSafe(|| c.send(2))).unwrap_err();
    assert!(panic_message(send).contains("send_async"));
    // Nor can a receipt be waited for here: only this thread's runtime could settle it.
    assert!(receipt.wait_timeout(GENEROUS).is_none());
    let wait = catch_unwind(AssertUnwindSafe(move || receipt.wait())).unwrap_err();
    assert!(panic_message(wait).contains(".await the receipt"));
    c.flush_async().await;
    assert_eq!(c.stats().delivered, 1);
    // Nothing left after the async flush: close returns at once, drained.
    assert!(c.close().drained);
}

#[tokio::test(flavor = "current_thread")]
async fn dropping_on_the_sinks_own_runtime_thread_reports_at_once() {
    let c = on_this_runtime(100);
    let receipts: Vec<_> = (0..5).map(|i| c.send(i).unwrap()).collect();
    let started = std::time::Instant::now();
    let report = c.close_timeout(GENEROUS);
    assert!(
        started.elapsed() < GENEROUS,
        "close did not wait for workers that cannot run"
    );
    assert_eq!((report.drained, report.left), (false, 5));
    for r in receipts {
        assert!(matches!(r.await, Err(DeliveryError::Closed)));
    }
}

#[test]
fn a_runtime_shut_down_under_the_workers_leaves_nothing_to_wait_for() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let c: Conveyor<u64> = rt.block_on(async {
        let c = Conveyor::builder()
            .drain_timeout(GENEROUS)
            .build_async(|_d: Delivery<u64>| std::future::pending())
            .unwrap();
        c.send_async(1).await.unwrap();
        c.send_async(2).await.unwrap();
        tokio::task::yield_now().await; // a worker takes item 1 and waits in the sink
        c
    });
    drop(rt); // drops the worker tasks where they wait
    let started = std::time::Instant::now();
    assert!(!c.flush_timeout(GENEROUS), "no worker is left to deliver");
    let report = c.close_timeout(GENEROUS);
    assert!(
        started.elapsed() < GENEROUS,
        "waited for workers that are gone"
    );
    assert_eq!((report.drained, report.left), (false, 2));
}

/// On the thread of the current-thread runtime that runs the sink, waits do not block, even
/// with a timeout too large to add to the clock (it used to read as "forever" and panic).
#[tokio::test(flavor = "current_thread")]
async fn a_huge_timeout_on_the_sinks_own_runtime_thread_returns_at_once() {
    let c: Conveyor<u32> = Conveyor::builder()
        .build_async(|_d| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        })
        .unwrap();
    let mut receipt = c.try_send(1).unwrap();
    assert!(receipt.wait_timeout(Duration::MAX).is_none());
    assert!(!c.flush_timeout(Duration::MAX));
    c.close_timeout(Duration::ZERO);
}
