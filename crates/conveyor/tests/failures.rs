//! Retries in place, permanent failures, panics, pause and resume.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Recorder, GENEROUS};
use conveyor::{Conveyor, Delivery, DeliveryError, OnFailure, Ordering, Retry, SinkError};

fn fast_retry(attempts: u32) -> Retry {
    Retry::exponential(Duration::from_millis(1))
        .max_delay(Duration::from_millis(5))
        .max_attempts(attempts)
}

#[test]
fn retries_happen_in_place_and_nothing_overtakes() {
    let rec = Recorder::new();
    let r = rec.clone();
    // Item 3 fails twice before succeeding.
    let c: Conveyor<u64> = Conveyor::builder()
        .retry(fast_retry(5))
        .build(move |d: Delivery<u64>| {
            let call = r.enter(&d);
            r.leave(call);
            if *d.item() == 3 && d.attempt() < 3 {
                return Err(SinkError::retryable("flaky"));
            }
            Ok(())
        })
        .unwrap();
    let receipts: Vec<_> = (0..10).map(|i| c.send(i).unwrap()).collect();
    for r in receipts {
        r.wait().unwrap();
    }
    let started = rec.items_started();
    assert_eq!(started, vec![0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9]);
    let attempts: Vec<u32> = rec.starts.lock().unwrap()[3..6]
        .iter()
        .map(|c| c.attempt)
        .collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    let s = c.stats();
    assert_eq!((s.delivered, s.retried, s.failed), (10, 2, 0));
}

/// Pipelined: while item 0 waits out its backoff, nothing behind it starts, though the other
/// worker is free. Items may start between the sink's failure and the engine recording it (a
/// window of a few instructions, or of a preemption on a loaded machine), so the test looks at
/// the end of the backoff: a free worker allowed to go on would start items all through it.
fn a_pipelined_retry_is_not_overtaken_during_its_backoff(asynchronous: bool) {
    const BACKOFF: Duration = Duration::from_millis(400);
    // Each other item takes this long: a worker not held starts one every 20 ms.
    const CALL: Duration = Duration::from_millis(20);
    let starts = Arc::new(Mutex::new(Vec::new()));
    let l = starts.clone();
    // The attempt's outcome, and how long the call takes before it.
    let attempt = move |d: &Delivery<u64>| {
        l.lock()
            .unwrap()
            .push((*d.item(), d.attempt(), Instant::now()));
        if *d.item() == 0 && d.attempt() == 1 {
            return (Err(SinkError::retryable("try again")), Duration::ZERO);
        }
        (Ok(()), CALL)
    };
    let builder = Conveyor::builder()
        .ordering(Ordering::Pipelined { in_flight: 2 })
        .retry(Retry::fixed(BACKOFF).jitter(false).max_attempts(2));
    let c: Conveyor<u64> = if asynchronous {
        let attempt = Arc::new(attempt);
        builder.build_async(move |d| {
            let (outcome, takes) = attempt(&d);
            async move {
                tokio::time::sleep(takes).await;
                outcome
            }
        })
    } else {
        builder.build(move |d| {
            let (outcome, takes) = attempt(&d);
            std::thread::sleep(takes);
            outcome
        })
    }
    .unwrap();
    for i in 0..30 {
        c.send(i).unwrap();
    }
    assert!(c.flush_timeout(GENEROUS));
    let starts = starts.lock().unwrap();
    let retry = starts
        .iter()
        .find(|(i, a, _)| (*i, *a) == (0, 2))
        .unwrap()
        .2;
    // The last three quarters of the backoff: 300 ms, time for 15 items if they could start.
    let quiet = retry - BACKOFF * 3 / 4;
    let during: Vec<u64> = starts
        .iter()
        .filter(|(i, _, at)| *i != 0 && (quiet..retry).contains(at))
        .map(|(i, _, _)| *i)
        .collect();
    // At most the one item the other worker had already taken when the hold began, whose
    // call a busy machine may start late.
    assert!(
        during.len() <= 1,
        "items started during item 0's backoff: {during:?}"
    );
    let s = c.stats();
    assert_eq!((s.delivered, s.retried, s.failed), (30, 1, 0));
}

#[test]
fn a_pipelined_retry_is_not_overtaken_during_its_backoff_blocking_sink() {
    a_pipelined_retry_is_not_overtaken_during_its_backoff(false);
}

#[test]
fn a_pipelined_retry_is_not_overtaken_during_its_backoff_async_sink() {
    a_pipelined_retry_is_not_overtaken_during_its_backoff(true);
}

#[test]
fn exhausted_retries_fail_the_item_with_the_last_error_and_move_on() {
    let c: Conveyor<u64> = Conveyor::builder()
        .retry(fast_retry(3))
        .build(|d: Delivery<u64>| {
            if *d.item() == 1 {
                Err(SinkError::retryable(format!(
                    "attempt {} failed",
                    d.attempt()
                )))
            } else {
                Ok(())
            }
        })
        .unwrap();
    let r0 = c.send(0).unwrap();
    let r1 = c.send(1).unwrap();
    let r2 = c.send(2).unwrap();
    r0.wait().unwrap();
    match r1.wait() {
        Err(DeliveryError::Failed { attempts, error }) => {
            assert_eq!(attempts, 3);
            assert_eq!(error.to_string(), "attempt 3 failed");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    r2.wait().unwrap();
    let s = c.stats();
    assert_eq!((s.delivered, s.failed, s.retried), (2, 1, 2));
}

#[test]
fn permanent_errors_are_not_retried() {
    let c: Conveyor<u64> = Conveyor::builder()
        .retry(fast_retry(5))
        .build(|_d: Delivery<u64>| Err(SinkError::permanent("400 bad request")))
        .unwrap();
    match c.send(1).unwrap().wait() {
        Err(DeliveryError::Failed { attempts: 1, error }) => assert!(!error.is_retryable()),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.stats().retried, 0);
}

#[test]
fn a_panicking_sink_fails_that_item_and_the_worker_keeps_going() {
    let c: Conveyor<u64> = Conveyor::builder()
        .retry(fast_retry(5))
        .build(|d: Delivery<u64>| {
            if *d.item() == 2 {
                panic!("boom on {}", d.item());
            }
            Ok(())
        })
        .unwrap();
    let receipts: Vec<_> = (0..5).map(|i| c.send(i).unwrap()).collect();
    let outcomes: Vec<_> = receipts.into_iter().map(|r| r.wait()).collect();
    for (i, o) in outcomes.iter().enumerate() {
        if i == 2 {
            match o {
                Err(DeliveryError::Failed { attempts: 1, error }) => {
                    assert!(error.to_string().contains("boom on 2"), "{error}")
                }
                other => panic!("{other:?}"),
            }
        } else {
            assert!(o.is_ok());
        }
    }
    assert_eq!(c.stats().failed, 1);
}

/// An item whose drop panics.
struct Grenade(u64);

impl Drop for Grenade {
    fn drop(&mut self) {
        if self.0 == 1 && !std::thread::panicking() {
            panic!("grenade {}", self.0);
        }
    }
}

/// What settling runs is user code too: a receipt callback, or the drop of an item whose
/// receipt is gone (the worker then holds its last reference). A panic there must not end
/// the only worker of a strict conveyor.
#[test]
fn a_panic_while_settling_does_not_end_the_worker() {
    let c: Conveyor<Grenade> = Conveyor::builder()
        .build(|_d: Delivery<Grenade>| Ok(()))
        .unwrap();
    // Dropped at once: the item dies on the worker, after delivery.
    drop(c.send(Grenade(1)).unwrap());
    let mut after_drop = c.send(Grenade(2)).unwrap();
    assert!(
        matches!(after_drop.wait_timeout(GENEROUS), Some(Ok(()))),
        "the worker died with the panicking item drop"
    );

    let gate = Arc::new(AtomicBool::new(false));
    let open = gate.clone();
    let c: Conveyor<u64> = Conveyor::builder()
        .build(move |d: Delivery<u64>| {
            // Held until the callback below is registered.
            let deadline = Instant::now() + GENEROUS;
            while *d.item() == 1 && !open.load(AtomicOrdering::Acquire) && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        })
        .unwrap();
    c.send(1)
        .unwrap()
        .on_settled(|_| panic!("a callback that panics"));
    gate.store(true, AtomicOrdering::Release);
    let mut after_callback = c.send(2).unwrap();
    assert!(
        matches!(after_callback.wait_timeout(GENEROUS), Some(Ok(()))),
        "the worker died with the panicking callback"
    );
    assert!(c.close().drained);
}

#[test]
fn retry_after_hint_is_honoured() {
    let times = Arc::new(Mutex::new(Vec::new()));
    let t = times.clone();
    let c: Conveyor<u64> = Conveyor::builder()
        .retry(Retry::fixed(Duration::from_millis(1)).max_attempts(2))
        .build(move |d: Delivery<u64>| {
            t.lock().unwrap().push(Instant::now());
            if d.attempt() == 1 {
                Err(SinkError::retryable("429").with_retry_after(Duration::from_millis(150)))
            } else {
                Ok(())
            }
        })
        .unwrap();
    c.send(1).unwrap().wait().unwrap();
    let times = times.lock().unwrap();
    assert!(times[1] - times[0] >= Duration::from_millis(150));
}

#[test]
fn pause_holds_a_lane_other_lanes_continue_and_resume_delivers_in_order() {
    let broken = Arc::new(Mutex::new(true));
    let delivered = Arc::new(Mutex::new(HashMap::<String, Vec<u64>>::new()));
    let (b, dl) = (broken.clone(), delivered.clone());
    let c: Conveyor<u64> = Conveyor::builder()
        .ordering(Ordering::Keyed { concurrency: 4 })
        .on_failure(OnFailure::Pause)
        .retry(fast_retry(2))
        .build(move |d: Delivery<u64>| {
            if d.key() == Some("poison") && *d.item() == 1 && *b.lock().unwrap() {
                return Err(SinkError::retryable("service rejects item 1"));
            }
            dl.lock()
                .unwrap()
                .entry(d.key().unwrap().to_owned())
                .or_default()
                .push(*d.item());
            Ok(())
        })
        .unwrap();
    for i in 0..5 {
        c.send_keyed("poison", i).unwrap();
        c.send_keyed("healthy", i).unwrap();
    }
    assert!(
        c.flush_timeout(GENEROUS),
        "flush skips items held by a paused lane"
    );
    assert_eq!(c.paused(), vec!["poison".to_owned()]);
    let s = c.stats();
    assert_eq!((s.paused, s.queued, s.failed), (1, 4, 0));
    assert_eq!(delivered.lock().unwrap()["healthy"], vec![0, 1, 2, 3, 4]);
    assert_eq!(delivered.lock().unwrap()["poison"], vec![0]);

    *broken.lock().unwrap() = false;
    assert!(c.resume("poison"));
    assert!(!c.resume("healthy"), "an unpaused lane is not resumed");
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(delivered.lock().unwrap()["poison"], vec![0, 1, 2, 3, 4]);
    assert!(c.paused().is_empty());
    let s = c.stats();
    assert_eq!((s.delivered, s.failed, s.paused, s.queued), (10, 0, 0, 0));
}

#[test]
fn strict_pause_stops_everything_under_the_empty_lane_name() {
    let ok = Arc::new(AtomicBool::new(false));
    let o = ok.clone();
    let c: Conveyor<u64> = Conveyor::builder()
        .on_failure(OnFailure::Pause)
        .build(move |d: Delivery<u64>| {
            if *d.item() == 0 && !o.load(AtomicOrdering::SeqCst) {
                Err(SinkError::permanent("nope"))
            } else {
                Ok(())
            }
        })
        .unwrap();
    let receipts: Vec<_> = (0..3).map(|i| c.send(i).unwrap()).collect();
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.paused(), vec![String::new()]);
    assert_eq!(c.stats().delivered, 0);
    ok.store(true, AtomicOrdering::SeqCst);
    assert!(c.resume(""));
    for r in receipts {
        r.wait().unwrap();
    }
    assert_eq!(c.stats().delivered, 3);
}

/// A `retry_after` hint of `Duration::MAX` used to overflow `Instant + Duration` in the
/// worker, killing it with the item in flight. Now the hint is capped, the worker waits, and a
/// close reports the item instead of hanging.
#[test]
fn a_huge_retry_after_hint_neither_kills_the_worker_nor_blocks_close() {
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let n = calls.clone();
    let c: Conveyor<u32> = Conveyor::builder()
        .retry(Retry::fixed(Duration::from_millis(1)).max_attempts(2))
        .build(move |_d| {
            n.fetch_add(1, AtomicOrdering::SeqCst);
            Err(SinkError::retryable("busy").with_retry_after(Duration::MAX))
        })
        .unwrap();
    let r = c.send(1).unwrap();
    let deadline = Instant::now() + GENEROUS;
    while calls.load(AtomicOrdering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the sink was never called");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        !c.flush_timeout(Duration::from_millis(50)),
        "the retry waits (an hour at most)"
    );
    let report = c.close_timeout(Duration::from_millis(100));
    assert_eq!((report.left, report.stats.in_flight), (1, 1));
    assert!(matches!(r.wait(), Err(DeliveryError::Closed)));
    // The worker survived, waiting out the capped hint, and no second call was made.
    assert_eq!(
        (calls.load(AtomicOrdering::SeqCst), report.stats.retried),
        (1, 0)
    );
}

/// `Stats::retried` counts retries made: one a close abandoned during its backoff was not.
#[test]
fn retried_counts_only_retries_made() {
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let n = calls.clone();
    let c: Conveyor<u32> = Conveyor::builder()
        .retry(Retry::fixed(Duration::from_secs(60)).jitter(false))
        .build(move |_d| {
            n.fetch_add(1, AtomicOrdering::SeqCst);
            Err(SinkError::retryable("busy"))
        })
        .unwrap();
    c.send(1).unwrap();
    let deadline = Instant::now() + GENEROUS;
    while calls.load(AtomicOrdering::SeqCst) == 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50)); // the retry is scheduled meanwhile
    let report = c.close_timeout(Duration::from_millis(100));
    assert_eq!(calls.load(AtomicOrdering::SeqCst), 1);
    assert_eq!(report.stats.retried, 0, "{report:?}");
}

/// Pipelined under Pause: both items in flight fail and are held; `resume` gives each of
/// them a fresh retry budget, not only the first.
#[test]
fn a_pipelined_resume_gives_every_held_item_a_fresh_retry_budget() {
    let healthy = Arc::new(AtomicBool::new(false));
    let after_resume = Arc::new(Mutex::new(Vec::new()));
    let together = Arc::new(std::sync::Barrier::new(2));
    let (h, log, b) = (healthy.clone(), after_resume.clone(), together.clone());
    let c: Conveyor<u32> = Conveyor::builder()
        .ordering(Ordering::Pipelined { in_flight: 2 })
        .retry(Retry::fixed(Duration::from_millis(1)).max_attempts(2))
        .on_failure(OnFailure::Pause)
        .build(move |d: Delivery<u32>| {
            if !h.load(AtomicOrdering::SeqCst) {
                if d.attempt() == 1 {
                    b.wait(); // both in flight together
                }
                return Err(SinkError::permanent("down"));
            }
            let mut log = log.lock().unwrap();
            log.push(*d.item());
            // After the resume, each item's first call fails (retryably), its second works.
            if log.iter().filter(|i| *i == d.item()).count() == 1 {
                Err(SinkError::retryable("flaky"))
            } else {
                Ok(())
            }
        })
        .unwrap();
    c.send(0).unwrap();
    c.send(1).unwrap();
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!((c.paused(), c.stats().queued), (vec![String::new()], 2));
    healthy.store(true, AtomicOrdering::SeqCst);
    assert!(c.resume(""));
    assert!(c.flush_timeout(GENEROUS));
    assert!(
        c.paused().is_empty(),
        "paused again: {:?}",
        after_resume.lock()
    );
    assert_eq!(c.stats().delivered, 2);
}

/// `is_last_attempt` follows the item's budget, not the policy's count: after a permanent
/// failure on attempt 1 paused the lane, the resume gives attempts 2 to 3, so the last one
/// is 3, not 2 (as `attempt() == attempts()` would say).
#[test]
fn is_last_attempt_follows_the_fresh_budget_a_resume_gives() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let c: Conveyor<u32> = Conveyor::builder()
        .retry(Retry::fixed(Duration::from_millis(1)).max_attempts(2))
        .on_failure(OnFailure::Pause)
        .build(move |d: Delivery<u32>| {
            log.lock().unwrap().push((d.attempt(), d.is_last_attempt()));
            if d.attempt() == 1 {
                Err(SinkError::permanent("rejected"))
            } else {
                Err(SinkError::retryable("still down"))
            }
        })
        .unwrap();
    c.send(7).unwrap();
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(*seen.lock().unwrap(), [(1, false)]);
    assert!(c.resume(""));
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(
        c.paused(),
        vec![String::new()],
        "paused again after its budget"
    );
    assert_eq!(*seen.lock().unwrap(), [(1, false), (2, false), (3, true)]);
}

/// A paused lane's items count against the capacity (memory stays bounded): once they fill
/// it, a send for a healthy key meets a full queue too, until the lane is resumed.
#[test]
fn a_paused_lanes_backlog_counts_against_the_capacity_of_every_lane() {
    let broken = Arc::new(AtomicBool::new(true));
    let b = broken.clone();
    let c: Conveyor<u32> = Conveyor::builder()
        .ordering(Ordering::Keyed { concurrency: 2 })
        .capacity(2)
        .on_failure(OnFailure::Pause)
        .build(move |d: Delivery<u32>| {
            if d.key() == Some("poison") && b.load(AtomicOrdering::SeqCst) {
                return Err(SinkError::permanent("rejected"));
            }
            Ok(())
        })
        .unwrap();
    c.send_keyed("poison", 0).unwrap();
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.paused(), vec!["poison".to_owned()]);
    c.send_keyed("poison", 1).unwrap(); // held with item 0: the queue is full
    assert!(matches!(
        c.try_send_keyed("healthy", 9),
        Err(conveyor::SendError::Full(9))
    ));
    broken.store(false, AtomicOrdering::SeqCst);
    assert!(c.resume("poison"));
    assert!(c.flush_timeout(GENEROUS));
    c.try_send_keyed("healthy", 9).unwrap();
    assert!(c.flush_timeout(GENEROUS));
    assert_eq!(c.stats().delivered, 3);
}

/// Keyed under a rate limit: one key's retry waiting out a long `retry_after` must not take the
/// limiter's slots with it. Its retry used to reserve the slot right after its backoff, which
/// moved every later slot past it: the other keys waited an hour for a server's `Retry-After`
/// meant for one key.
#[test]
fn a_keyed_retry_under_a_rate_limit_does_not_hold_up_the_other_keys() {
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let n = calls.clone();
    let c: Conveyor<u64> = Conveyor::builder()
        .ordering(Ordering::Keyed { concurrency: 4 })
        .rate_limit(1_000)
        .retry(Retry::fixed(Duration::from_millis(1)).max_attempts(2))
        .drain_timeout(Duration::from_millis(100))
        .build(move |d: Delivery<u64>| {
            n.fetch_add(1, AtomicOrdering::SeqCst);
            if d.key() == Some("throttled") && d.attempt() == 1 {
                let wait = Duration::from_secs(3600);
                return Err(SinkError::retryable("429").with_retry_after(wait));
            }
            Ok(())
        })
        .unwrap();
    let mut throttled = c.send_keyed("throttled", 0).unwrap();
    let deadline = Instant::now() + GENEROUS;
    while calls.load(AtomicOrdering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the sink was never called");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Time for its retry to be scheduled, an hour away (were it not yet, the test would pass
    // without showing anything, never fail).
    std::thread::sleep(Duration::from_millis(50));
    let others: Vec<_> = (1..=5).map(|i| c.send_keyed("other", i).unwrap()).collect();
    for mut r in others {
        assert!(
            matches!(r.wait_timeout(GENEROUS), Some(Ok(()))),
            "another key waited for the throttled key's retry"
        );
    }
    assert!(throttled.wait_timeout(Duration::ZERO).is_none());
    let report = c.close_timeout(Duration::from_millis(100));
    assert_eq!((report.left, report.stats.delivered), (1, 5));
}

/// Retries count against the rate limit like first attempts: five attempts at 10 calls per
/// second take at least 400 ms, however short the backoff.
#[test]
fn retries_wait_for_rate_limit_slots_too() {
    let starts = Arc::new(Mutex::new(Vec::new()));
    let s = starts.clone();
    let c: Conveyor<u64> = Conveyor::builder()
        .rate_limit(10)
        .retry(Retry::fixed(Duration::ZERO).max_attempts(5))
        .build(move |d: Delivery<u64>| {
            s.lock().unwrap().push(Instant::now());
            if d.attempt() < 5 {
                return Err(SinkError::retryable("busy"));
            }
            Ok(())
        })
        .unwrap();
    // Slots are 100 ms apart from the first, which comes no earlier than the send: a bound
    // from the send, unlike the gaps between calls, holds however late a call begins.
    let sent = Instant::now();
    c.send(1).unwrap().wait().unwrap();
    let starts = starts.lock().unwrap();
    assert_eq!(starts.len(), 5);
    assert!(
        starts[4] - sent >= Duration::from_millis(390),
        "{:?}",
        starts[4] - sent
    );
    assert_eq!(c.stats().retried, 4);
}
