//! Lost wake-ups: trickling sends with random tiny pauses, in every ordering mode, each
//! receipt must settle within a generous timeout. A send followed by a pause is exactly the
//! case where nobody else would wake a worker that missed the item.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::Rng;
use conveyor::{Backpressure, Conveyor, Delivery, OnFailure, Ordering, SinkError};

const SETTLE: Duration = Duration::from_secs(5);

/// How long an item held up by the bug these tests look for may take before it counts as
/// held up. The calls holding it up wait for it much longer ([`HELD`]) and are only released
/// by the test, so the bound tells the bug apart however loaded the machine is.
const PROMPT: Duration = Duration::from_secs(10);

/// How long a call waits for the item that ends it before giving up; far past [`PROMPT`].
const HELD: Duration = Duration::from_secs(60);

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

/// A one-shot event the sinks can wait on (with a timeout, so that a failing round ends).
#[derive(Default)]
struct Event(Mutex<bool>, Condvar);

impl Event {
    fn set(&self) {
        *self.0.lock().unwrap() = true;
        self.1.notify_all();
    }
    fn wait(&self, timeout: Duration) -> bool {
        let g = self.0.lock().unwrap();
        let (g, _) = self.1.wait_timeout_while(g, timeout, |set| !*set).unwrap();
        *g
    }
}

/// Three idle workers. A and B are sent back to back: the first send wakes W1, which drains
/// both, takes A and passes B on to W2 (counted as woken, not running yet). C is sent while
/// W2 is on its way: the send sees a wake-up pending and wakes nobody. W2 takes B from the
/// lanes without looking at the intake, and `pass_work_on` no longer counts the intake, so
/// W3 stays asleep and C waits for A's or B's sink call to end. Here A and B wait for C.
fn woken_worker_passes_on_intake_items(ordering: Ordering, keyed: bool) {
    let mut slow_rounds = 0;
    for round in 0..5 * rounds() {
        let c_done = Arc::new(Event::default());
        let a_started = Arc::new(AtomicBool::new(false));
        let conveyor: Conveyor<u64> = Conveyor::builder()
            .ordering(ordering)
            .build({
                let (c_done, a_started) = (c_done.clone(), a_started.clone());
                move |d: Delivery<u64>| {
                    match *d.item() {
                        1 => {
                            a_started.store(true, AtomicOrdering::Release);
                            c_done.wait(HELD);
                        }
                        2 => {
                            c_done.wait(HELD);
                        }
                        _ => c_done.set(),
                    }
                    Ok(())
                }
            })
            .unwrap();
        let send = |key: &str, item: u64| {
            if keyed {
                conveyor.send_keyed(key, item).unwrap()
            } else {
                conveyor.send(item).unwrap()
            }
        };
        // Every worker spins a little, then sleeps.
        std::thread::sleep(Duration::from_millis(20));
        let _a = send("a", 1);
        let _b = send("b", 2);
        while !a_started.load(AtomicOrdering::Acquire) {
            std::hint::spin_loop();
        }
        let start = Instant::now();
        let mut c = send("c", 3);
        let settled = c.wait_timeout(PROMPT).is_some();
        let took = start.elapsed();
        if !settled {
            c_done.set(); // releases A and B, so the close below ends
            slow_rounds += 1;
            eprintln!("round {round}: item 3 waited {took:?} while a worker was idle");
        }
        assert!(conveyor.close().drained);
    }
    assert_eq!(
        slow_rounds,
        0,
        "{slow_rounds} of {} rounds held item 3 up",
        5 * rounds()
    );
}

#[test]
fn keyed_woken_worker_passes_on_intake_items() {
    woken_worker_passes_on_intake_items(Ordering::Keyed { concurrency: 3 }, true);
}

#[test]
fn pipelined_woken_worker_passes_on_intake_items() {
    woken_worker_passes_on_intake_items(Ordering::Pipelined { in_flight: 3 }, false);
}

/// Makes one worker the lookout and has it take item 1 (key "a") while the other worker
/// sleeps, so that it takes the lookout back once item 1's sink call returns. Returns the
/// conveyor, the gate that holds item 1's sink call, item 1's receipt, and the event item 2
/// (key "b") sets when delivered.
fn retaking_lookout() -> (
    Conveyor<u64>,
    Arc<AtomicBool>,
    conveyor::Receipt<()>,
    Arc<Event>,
) {
    let gate = Arc::new(AtomicBool::new(false));
    let b_done = Arc::new(Event::default());
    let c: Conveyor<u64> = Conveyor::builder()
        .ordering(Ordering::Keyed { concurrency: 2 })
        .build({
            let (gate, b_done) = (gate.clone(), b_done.clone());
            move |d: Delivery<u64>| {
                match *d.item() {
                    1 => {
                        let deadline = Instant::now() + Duration::from_secs(5);
                        while !gate.load(AtomicOrdering::Acquire) && Instant::now() < deadline {
                            std::hint::spin_loop();
                        }
                    }
                    2 => b_done.set(),
                    _ => {}
                }
                Ok(())
            }
        })
        .unwrap();
    // As in `a_waiting_receipt_callback_does_not_hold_up_other_keys`.
    std::thread::sleep(Duration::from_millis(20));
    let warm = c.send_keyed("a", 0).unwrap();
    while !warm.is_settled() {
        std::hint::spin_loop();
    }
    let first = c.send_keyed("a", 1).unwrap();
    (c, gate, first, b_done)
}

/// Sends key b's item while key a's settling waits for it (see `retaking_lookout`), then
/// closes the conveyor; returns whether the item was delivered meanwhile.
fn other_key_runs(c: Conveyor<u64>, b_done: &Event, round: u64, waiting: &str) -> bool {
    let mut second = c.send_keyed("b", 2).unwrap();
    let ran = second.wait_timeout(PROMPT).is_some();
    if !ran {
        b_done.set(); // releases key a's worker, so the close below ends
        eprintln!("round {round}: key b waited for key a's {waiting}");
    }
    assert!(c.close().drained);
    ran
}

/// A waker that blocks (here: until the other key's item is delivered, at most `HELD`).
struct BlockingWaker {
    started: AtomicBool,
    b_done: Arc<Event>,
}

impl std::task::Wake for BlockingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.started.store(true, AtomicOrdering::Release);
        self.b_done.wait(HELD);
    }
}

/// `waker.wake()` is user code that runs on the worker as it settles: had the worker kept
/// the lookout it took back after the sink call, a send meanwhile would wake nobody.
#[test]
fn a_slow_waker_does_not_hold_up_other_keys() {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Waker};
    let mut slow_rounds = 0;
    for round in 0..5 * rounds() {
        let (c, gate, mut first, b_done) = retaking_lookout();
        let state = Arc::new(BlockingWaker {
            started: AtomicBool::new(false),
            b_done: b_done.clone(),
        });
        let waker = Waker::from(state.clone());
        assert!(Pin::new(&mut first)
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        gate.store(true, AtomicOrdering::Release);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !state.started.load(AtomicOrdering::Acquire) && Instant::now() < deadline {
            std::hint::spin_loop();
        }
        if !other_key_runs(c, &b_done, round, "waker") {
            slow_rounds += 1;
        }
    }
    assert_eq!(slow_rounds, 0, "{slow_rounds} of {} rounds", 5 * rounds());
}

/// A receipt callback is user code and may wait long, here for another key's item: the
/// worker running it must not keep sends from waking an idle worker meanwhile.
#[test]
fn a_waiting_receipt_callback_does_not_hold_up_other_keys() {
    let mut slow_rounds = 0;
    for round in 0..5 * rounds() {
        let (c, gate, first, b_done) = retaking_lookout();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let held = b_done.clone();
        first.on_settled(move |_| {
            let _ = started_tx.send(());
            held.wait(HELD);
        });
        gate.store(true, AtomicOrdering::Release);
        started_rx.recv_timeout(SETTLE).expect("the callback runs");
        if !other_key_runs(c, &b_done, round, "callback") {
            slow_rounds += 1;
        }
    }
    assert_eq!(slow_rounds, 0, "{slow_rounds} of {} rounds", 5 * rounds());
}

/// What a quick sink saw of its calls, for [`quick_sinks_lease_pace_and_retry_in_order`].
#[derive(Default)]
struct Seen {
    running: AtomicU64,
    max_running: AtomicU64,
    /// Per lane, the seq and attempt of every call as it began (the lane's call running
    /// meanwhile, if any, flagged in `busy`).
    calls: Mutex<std::collections::HashMap<String, Vec<(u64, u32)>>>,
    busy: Mutex<std::collections::HashSet<String>>,
    overlapped: AtomicBool,
}

/// A sink quick enough for leases of many items, that now and then fails an item's first
/// attempt (retried at once) or takes long enough to make the next lease a job: leases of
/// one item and of many, jobs beside them, failures in leases, paced drains and the lookout
/// kept through leases, while producers send in bursts and gaps.
fn quick_sink(
    seen: Arc<Seen>,
    keyed: bool,
) -> impl Fn(Delivery<u64>) -> Result<(), SinkError> + Send + Sync + 'static {
    move |d: Delivery<u64>| {
        let lane = if keyed {
            d.key().unwrap_or_default().to_owned()
        } else {
            String::new()
        };
        let now = seen.running.fetch_add(1, AtomicOrdering::SeqCst) + 1;
        seen.max_running.fetch_max(now, AtomicOrdering::SeqCst);
        if keyed && !seen.busy.lock().unwrap().insert(lane.clone()) {
            seen.overlapped.store(true, AtomicOrdering::SeqCst);
        }
        let call = (d.seq(), d.attempt());
        seen.calls
            .lock()
            .unwrap()
            .entry(lane.clone())
            .or_default()
            .push(call);
        let mut rng = Rng(d.item().wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let result = match rng.below(400) {
            0..=9 if d.attempt() == 1 => Err(SinkError::retryable("once")),
            10 => {
                spin(100);
                Ok(())
            }
            _ => Ok(()),
        };
        if keyed {
            seen.busy.lock().unwrap().remove(&lane);
        }
        seen.running.fetch_sub(1, AtomicOrdering::SeqCst);
        result
    }
}

/// Leases (of one item or many), paced drains, the lookout kept through leases and a failed
/// first attempt in a lease, under producers that send in bursts with gaps: every item is
/// delivered once, no more calls run at once than allowed, each key's calls run one at a time
/// in order with retries in place, and `flush` returns.
#[test]
fn quick_sinks_lease_pace_and_retry_in_order() {
    let modes = [
        ("pipelined:2", Ordering::Pipelined { in_flight: 2 }, 2),
        ("pipelined:4", Ordering::Pipelined { in_flight: 4 }, 4),
        ("keyed:3", Ordering::Keyed { concurrency: 3 }, 3),
        ("keyed:8", Ordering::Keyed { concurrency: 8 }, 8),
    ];
    for round in 0..rounds() {
        for (name, ordering, workers) in modes {
            let keyed = matches!(ordering, Ordering::Keyed { .. });
            let seen = Arc::new(Seen::default());
            let c = Arc::new(
                Conveyor::builder()
                    .ordering(ordering)
                    .capacity(512)
                    .retry(conveyor::Retry::fixed(Duration::ZERO).max_attempts(2))
                    .build(quick_sink(seen.clone(), keyed))
                    .unwrap(),
            );
            let heeded = round % 2 == 0;
            let producers: Vec<_> = (0..2u64)
                .map(|p| {
                    let c = c.clone();
                    std::thread::spawn(move || {
                        let mut rng = Rng(((p + 3) * 0x2545_F491_4F6C_DD1D) ^ (round + 1));
                        let mut receipts = Vec::new();
                        for i in 0..1_500 {
                            let item = p * 1_000_000 + i;
                            let receipt = if keyed {
                                c.send_keyed(format!("k{}", rng.below(40)), item).unwrap()
                            } else {
                                c.send(item).unwrap()
                            };
                            if rng.below(64) == 0 {
                                pause(&mut rng);
                            }
                            if rng.below(300) == 0 {
                                // A trickle: the next item is sent once this one settled.
                                must_settle(name, round, receipt);
                            } else if heeded {
                                receipts.push(receipt);
                            }
                            // Otherwise dropped: a lease's worker settles nothing for it, and
                            // keeps the lookout while it lets go of its node.
                        }
                        receipts
                    })
                })
                .collect();
            let receipts: Vec<_> = producers
                .into_iter()
                .flat_map(|p| p.join().unwrap())
                .collect();
            assert!(
                c.flush_timeout(SETTLE),
                "{name} round {round}: flush timed out: {:?}",
                c.stats()
            );
            for r in receipts {
                must_settle(name, round, r);
            }
            let stats = c.stats();
            assert_eq!(
                (stats.delivered, stats.failed, stats.queued, stats.in_flight),
                (3_000, 0, 0, 0),
                "{name} round {round}: {stats:?}"
            );
            assert!(
                seen.max_running.load(AtomicOrdering::SeqCst) <= workers,
                "{name}: {} calls at once",
                seen.max_running.load(AtomicOrdering::SeqCst)
            );
            assert!(
                !seen.overlapped.load(AtomicOrdering::SeqCst),
                "{name}: a key ran twice at once"
            );
            for (lane, calls) in seen.calls.lock().unwrap().iter() {
                // Each item's calls, in seq order; a retry right after its failed attempt
                // where a lane runs one at a time.
                let firsts: Vec<u64> = calls.iter().filter(|c| c.1 == 1).map(|c| c.0).collect();
                let mut unique = firsts.clone();
                unique.sort_unstable();
                unique.dedup();
                assert_eq!(unique.len(), firsts.len(), "{name}: an item started twice");
                if keyed {
                    assert!(
                        calls
                            .windows(2)
                            .all(|w| w[0].0 < w[1].0 || (w[0].0 == w[1].0 && w[1].1 == w[0].1 + 1)),
                        "{name} lane {lane}: calls out of order: {calls:?}"
                    );
                }
            }
            assert!(c.close().drained, "{name} round {round}");
        }
    }
}
