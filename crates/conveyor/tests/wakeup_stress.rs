//! Lost wake-ups: trickling sends with random tiny pauses, in every ordering mode, each
//! receipt must settle within a generous timeout. A send followed by a pause is exactly the
//! case where nobody else would wake a worker that missed the item.

mod common;

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Rng;
use conveyor::{Backpressure, Conveyor, Delivery, OnFailure, Ordering, SinkError};

const SETTLE: Duration = Duration::from_secs(5);

/// Rounds per test: `STRESS_ROUNDS=N` runs more.
fn rounds() -> u64 {
    std::env::var("STRESS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

/// Runs `check(round, name, ordering, keyed)` for every round and ordering mode.
fn each_mode(mut check: impl FnMut(u64, &'static str, Ordering, bool)) {
    for round in 0..rounds() {
        for (name, ordering) in modes() {
            check(
                round,
                name,
                ordering,
                matches!(ordering, Ordering::Keyed { .. }),
            );
        }
    }
}

fn spin(us: u64) {
    let end = Instant::now() + Duration::from_micros(us);
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}

/// A random tiny pause: none, a yield, a few µs of spinning (about the spinner's window),
/// or a short sleep (long enough for a worker to go to sleep).
fn pause(rng: &mut Rng) {
    match rng.below(6) {
        0 => {}
        1 => std::thread::yield_now(),
        2 => spin(rng.below(3)),
        3 => spin(2 + rng.below(40)),
        4 => spin(40 + rng.below(200)),
        _ => std::thread::sleep(Duration::from_micros(rng.below(300))),
    }
}

fn modes() -> Vec<(&'static str, Ordering)> {
    vec![
        ("strict", Ordering::Strict),
        ("pipelined:1", Ordering::Pipelined { in_flight: 1 }),
        ("pipelined:3", Ordering::Pipelined { in_flight: 3 }),
        ("keyed:1", Ordering::Keyed { concurrency: 1 }),
        ("keyed:3", Ordering::Keyed { concurrency: 3 }),
        ("keyed:8", Ordering::Keyed { concurrency: 8 }),
    ]
}

/// A sink that is usually instant and sometimes works a little.
fn sink(seed: u64) -> impl Fn(Delivery<u64>) -> Result<(), SinkError> + Send + Sync + 'static {
    move |d: Delivery<u64>| {
        let mut rng = Rng((seed ^ d.item().wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1);
        match rng.below(8) {
            0 => spin(rng.below(30)),
            1 => std::thread::yield_now(),
            _ => {}
        }
        Ok(())
    }
}

fn send(c: &Conveyor<u64>, keyed: bool, rng: &mut Rng, item: u64) -> conveyor::Receipt<()> {
    if keyed && rng.below(4) != 0 {
        c.send_keyed(format!("k{}", rng.below(5)), item).unwrap()
    } else {
        c.send(item).unwrap()
    }
}

fn must_settle(mode: &str, round: u64, mut r: conveyor::Receipt<()>) {
    let seq = r.seq();
    match r.wait_timeout(SETTLE) {
        Some(Ok(())) => {}
        Some(Err(e)) => panic!("{mode} round {round}: seq {seq} failed: {e}"),
        None => {
            panic!("{mode} round {round}: seq {seq} not settled after {SETTLE:?}: lost wake-up?")
        }
    }
}

/// One producer; after each send (or small burst) it waits for the receipts, so every
/// item is the last one before a pause.
#[test]
fn trickling_sends_always_settle() {
    each_mode(|round, name, ordering, keyed| {
        let c: Conveyor<u64> = Conveyor::builder()
            .ordering(ordering)
            .capacity(8)
            .build(sink(round + 1))
            .unwrap();
        let mut rng = Rng(0x2545_F491_4F6C_DD1D ^ (round + 1));
        let mut item = 0;
        for _ in 0..400 {
            let burst = 1 + rng.below(3);
            let mut receipts = Vec::new();
            for _ in 0..burst {
                item += 1;
                receipts.push(send(&c, keyed, &mut rng, item));
                pause(&mut rng);
            }
            for r in receipts {
                must_settle(name, round, r);
            }
            pause(&mut rng);
        }
        let report = c.close();
        assert!(report.drained, "{name}: {report:?}");
    });
}

/// Several producers trickling at once, with `stats()` and `flush_timeout` draining the
/// intake from another thread (a drain wakes nobody), and full-queue slow-path sends.
#[test]
fn concurrent_trickles_with_drains_always_settle() {
    each_mode(|round, name, ordering, keyed| {
        let c: Arc<Conveyor<u64>> = Arc::new(
            Conveyor::builder()
                .ordering(ordering)
                .capacity(4)
                .backpressure(Backpressure::Block)
                .build(sink(round + 7))
                .unwrap(),
        );
        let done = Arc::new(AtomicU64::new(0));
        let observer = {
            let c = c.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(99 + round);
                while done.load(AtomicOrdering::Relaxed) < 3 {
                    if rng.below(2) == 0 {
                        let _ = c.stats();
                    } else {
                        let _ = c.flush_timeout(Duration::from_micros(rng.below(50)));
                    }
                    pause(&mut rng);
                }
            })
        };
        let producers: Vec<_> = (0..3)
            .map(|p| {
                let c = c.clone();
                let done = done.clone();
                std::thread::spawn(move || {
                    let mut rng = Rng(((p + 1) * 0x1234_5678_9ABC_DEF1) ^ round);
                    for i in 0..300 {
                        let r = send(&c, keyed, &mut rng, p * 1_000_000 + i);
                        pause(&mut rng);
                        if rng.below(2) == 0 {
                            must_settle(name, round, r);
                        }
                    }
                    done.fetch_add(1, AtomicOrdering::Relaxed);
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        observer.join().unwrap();
        assert!(
            c.flush_timeout(SETTLE),
            "{name}: flush timed out: {:?}",
            c.stats()
        );
    });
}

/// Keyed lanes paused by a failure and resumed while other keys trickle on.
#[test]
fn trickling_sends_with_pause_and_resume_settle() {
    let rounds = rounds();
    for round in 0..rounds {
        for concurrency in [1, 2, 4] {
            let c: Conveyor<u64> = Conveyor::builder()
                .ordering(Ordering::Keyed { concurrency })
                .on_failure(OnFailure::Pause)
                .retry(conveyor::Retry::none())
                .build(move |d: Delivery<u64>| {
                    if d.attempt() == 1 && *d.item() % 7 == 0 {
                        Err(SinkError::permanent("pause"))
                    } else {
                        Ok(())
                    }
                })
                .unwrap();
            let mut rng = Rng(0xDEAD_BEEF ^ round);
            for i in 1..300u64 {
                let key = format!("k{}", rng.below(4));
                let mut r = c.send_keyed(key.clone(), i).unwrap();
                pause(&mut rng);
                // Resume whatever paused; its backlog (and this item) must then run.
                let deadline = Instant::now() + SETTLE;
                loop {
                    for lane in c.paused() {
                        c.resume(&lane);
                    }
                    if let Some(res) = r.wait_timeout(Duration::from_millis(1)) {
                        res.unwrap();
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "keyed:{concurrency} item {i} stuck: {:?}",
                        c.stats()
                    );
                }
            }
            assert!(c.close().drained);
        }
    }
}

/// The async worker path (never spins) with the same trickle.
#[test]
fn async_trickling_sends_always_settle() {
    let rounds = rounds();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _enter = rt.enter();
    for round in 0..rounds {
        for (name, ordering) in modes() {
            let keyed = matches!(ordering, Ordering::Keyed { .. });
            let c: Conveyor<u64> = Conveyor::builder()
                .ordering(ordering)
                .capacity(8)
                .build_async(|_d: Delivery<u64>| async { Ok(()) })
                .unwrap();
            let mut rng = Rng(77 + round);
            for i in 0..300 {
                let r = send(&c, keyed, &mut rng, i);
                pause(&mut rng);
                must_settle(name, round, r);
            }
            assert!(c.flush_timeout(SETTLE));
        }
    }
}

/// A receipt callback is user code and may wait long, here for another key's item: the
/// worker running it must not keep sends from waking an idle worker meanwhile. The item
/// whose callback waits is sent while a worker spins for items, so that worker goes back
/// to looking out for sends as soon as its sink call returns.
#[test]
fn a_waiting_receipt_callback_does_not_hold_up_other_keys() {
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;

    for round in 0..10 * rounds() {
        let gate = Arc::new(AtomicBool::new(false));
        let (delivered_tx, delivered_rx) = mpsc::channel::<u64>();
        let c: Conveyor<u64> = Conveyor::builder()
            .ordering(Ordering::Keyed { concurrency: 2 })
            .build({
                let gate = gate.clone();
                move |d: Delivery<u64>| {
                    if *d.item() == 1 {
                        // Held until its callback is registered.
                        let deadline = Instant::now() + SETTLE;
                        while !gate.load(AtomicOrdering::Acquire) && Instant::now() < deadline {
                            std::hint::spin_loop();
                        }
                    } else {
                        let _ = delivered_tx.send(*d.item());
                    }
                    Ok(())
                }
            })
            .unwrap();
        // Both workers spin for a few microseconds, then sleep. A warm-up item wakes one;
        // once it settles, that worker looks out for the next send.
        std::thread::sleep(Duration::from_millis(20));
        let warm = c.send_keyed("a", 0).unwrap();
        while !warm.is_settled() {
            std::hint::spin_loop();
        }
        assert_eq!(delivered_rx.recv_timeout(SETTLE), Ok(0));
        let first = c.send_keyed("a", 1).unwrap();
        let (other_tx, other_rx) = mpsc::channel::<Result<u64, mpsc::RecvTimeoutError>>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        first.on_settled(move |outcome| {
            outcome.unwrap();
            let _ = started_tx.send(());
            // Waits for the other key's item, which only another worker can deliver now.
            let _ = other_tx.send(delivered_rx.recv_timeout(SETTLE));
        });
        gate.store(true, AtomicOrdering::Release);
        started_rx.recv_timeout(SETTLE).expect("the callback runs");
        let second = c.send_keyed("b", 2).unwrap();
        assert_eq!(
            other_rx.recv_timeout(SETTLE * 2).unwrap(),
            Ok(2),
            "round {round}: key b waited for key a's callback"
        );
        must_settle("keyed:2", round, second);
        assert!(c.close().drained);
    }
}
