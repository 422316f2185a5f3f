//! Stress tests for the node slab (`slab.rs`, `receipt.rs`): references to nodes dropped on
//! every thread, in every order, before and after their conveyor. Meant to be run under
//! valgrind as well:
//!   valgrind --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite <binary>

mod common;

use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Rng, GENEROUS};
use conveyor::{Conveyor, Delivery, OnFailure, Ordering, Receipt, SendError, SinkError};

/// Counts live values of a type, to check that every item and reply drops exactly once.
#[derive(Debug)]
struct Tracked {
    text: String,
    live: Arc<AtomicUsize>,
}
impl Tracked {
    fn new(text: String, live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, AtomicOrdering::SeqCst);
        Self {
            text,
            live: live.clone(),
        }
    }
}
impl Drop for Tracked {
    fn drop(&mut self) {
        self.live.fetch_sub(1, AtomicOrdering::SeqCst);
    }
}

fn scale(n: usize) -> usize {
    // Fewer iterations under valgrind (run with VALGRIND=1).
    if std::env::var_os("VALGRIND").is_some() {
        n / 10
    } else {
        n
    }
}

#[test]
fn receipts_and_deliveries_dropped_anywhere_in_any_order() {
    let items = Arc::new(AtomicUsize::new(0));
    let replies = Arc::new(AtomicUsize::new(0));
    let kept: Arc<Mutex<Vec<Delivery<Tracked>>>> = Arc::default();
    {
        let (r, k) = (replies.clone(), kept.clone());
        let c: Arc<Conveyor<Tracked, Tracked>> = Arc::new(
            Conveyor::builder()
                .ordering(Ordering::Keyed { concurrency: 4 })
                .capacity(64)
                .build(move |d: Delivery<Tracked>| {
                    let reply = Tracked::new(format!("re:{}:{}", d.item().text, d.seq()), &r);
                    assert_eq!(d.idempotency_key().split('-').count(), 2);
                    if d.seq() % 7 == 0 {
                        // Outlives its sink call, its receipt and (for some) the conveyor.
                        k.lock().unwrap().push(d);
                    }
                    Ok(reply)
                })
                .unwrap(),
        );
        let (tx, rx) = std::sync::mpsc::channel::<Receipt<Tracked>>();
        let rx = Arc::new(Mutex::new(rx));
        let waiters: Vec<_> = (0..3)
            .map(|w| {
                let rx = rx.clone();
                std::thread::spawn(move || {
                    let mut rng = Rng(0x9e37_79b9 + w);
                    loop {
                        let Ok(mut receipt) = rx.lock().unwrap().recv() else {
                            return;
                        };
                        match rng.next() % 3 {
                            0 => drop(receipt),
                            1 => {
                                let seq = receipt.seq();
                                let reply = receipt.wait_timeout(GENEROUS).expect("settles");
                                let reply = reply.expect("delivered");
                                assert!(reply.text.ends_with(&format!(":{seq}")));
                            }
                            _ => receipt.on_settled(drop),
                        }
                    }
                })
            })
            .collect();
        let producers: Vec<_> = (0..4u64)
            .map(|p| {
                let (c, items, tx) = (c.clone(), items.clone(), tx.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng(0x1234_5678 + p);
                    for i in 0..scale(4000) {
                        let item = Tracked::new(format!("{p}/{i}"), &items);
                        let key = format!("k{}", rng.next() % 5);
                        let receipt = match rng.next() % 3 {
                            0 => c.send_keyed(key, item).unwrap(),
                            1 => match c.try_send_keyed(key, item) {
                                Ok(r) => r,
                                Err(SendError::Full(back)) => {
                                    assert!(back.text.starts_with(&format!("{p}/")));
                                    continue;
                                }
                                Err(e) => panic!("unexpected {e:?}"),
                            },
                            _ => c.send(item).unwrap(),
                        };
                        match rng.next() % 4 {
                            0 => drop(receipt),
                            1 => {
                                receipt.wait().unwrap();
                            }
                            _ => tx.send(receipt).unwrap(),
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        for p in producers {
            p.join().unwrap();
        }
        c.flush();
        for w in waiters {
            w.join().unwrap();
        }
        // The conveyor goes, kept deliveries stay: their context must still be there.
        drop(c);
    }
    let kept = std::mem::take(&mut *kept.lock().unwrap());
    assert!(!kept.is_empty());
    let handle = std::thread::spawn(move || {
        for d in &kept {
            assert!(d.idempotency_key().ends_with(&format!("-{}", d.seq())));
            assert!(d.item().text.contains('/'));
        }
        drop(kept);
    });
    handle.join().unwrap();
    assert_eq!(
        items.load(AtomicOrdering::SeqCst),
        0,
        "every item dropped once"
    );
    assert_eq!(
        replies.load(AtomicOrdering::SeqCst),
        0,
        "every reply dropped once"
    );
}

#[test]
fn try_send_refusals_give_the_item_back_intact() {
    let items = Arc::new(AtomicUsize::new(0));
    let gate = common::Gate::new();
    let g = gate.clone();
    let c: Conveyor<Tracked, String> = Conveyor::builder()
        .capacity(1)
        .build(move |d: Delivery<Tracked>| {
            g.pass();
            Ok(d.item().text.clone())
        })
        .unwrap();
    let first = c.send(Tracked::new("first".into(), &items)).unwrap();
    gate.wait_for_callers(1);
    let second = c.try_send(Tracked::new("second".into(), &items)).unwrap();
    // Full now: the fast path refuses, the slow path refuses, the item comes back.
    for i in 0..scale(2000) {
        let text = format!("refused {i}");
        match c.try_send(Tracked::new(text.clone(), &items)) {
            Err(SendError::Full(back)) => assert_eq!(back.text, text),
            other => panic!("expected Full, got {other:?}"),
        }
    }
    gate.open();
    assert_eq!(first.wait().unwrap(), "first");
    assert_eq!(second.wait().unwrap(), "second");
    c.close();
    match c.send(Tracked::new("late".into(), &items)) {
        Err(SendError::Closed(back)) => assert_eq!(back.text, "late"),
        other => panic!("expected Closed, got {other:?}"),
    }
    drop(c);
    assert_eq!(items.load(AtomicOrdering::SeqCst), 0);
}

#[test]
fn receipts_outlive_their_conveyor_on_other_threads() {
    let items = Arc::new(AtomicUsize::new(0));
    let c: Conveyor<Tracked, String> = Conveyor::builder()
        .ordering(Ordering::Pipelined { in_flight: 3 })
        .build(|d: Delivery<Tracked>| Ok(format!("{}#{}", d.item().text, d.seq())))
        .unwrap();
    let receipts: Vec<_> = (0..scale(1000))
        .map(|i| c.send(Tracked::new(i.to_string(), &items)).unwrap())
        .collect();
    c.close();
    drop(c);
    let mut chunks: Vec<Vec<Receipt<String>>> = vec![Vec::new(), Vec::new(), Vec::new()];
    for (i, r) in receipts.into_iter().enumerate() {
        chunks[i % 3].push(r);
    }
    let handles: Vec<_> = chunks
        .into_iter()
        .enumerate()
        .map(|(t, rs)| {
            std::thread::spawn(move || {
                for (i, r) in rs.into_iter().enumerate() {
                    if (i + t) % 2 == 0 {
                        let seq = r.seq();
                        assert!(r.is_settled());
                        assert!(r.wait().unwrap().ends_with(&format!("#{seq}")));
                    } else {
                        drop(r);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(items.load(AtomicOrdering::SeqCst), 0);
}

/// A strict worker running leases of an instant sink: deliveries kept past the call, or dropped
/// on another thread during or after it, keep their items alive exactly as long as they live;
/// a callback given before the receipt dropped still runs; every other item is dropped by the
/// time `flush` returns.
#[test]
fn deliveries_kept_or_dropped_elsewhere_with_unheld_receipts_of_a_strict_worker() {
    let items = Arc::new(AtomicUsize::new(0));
    let called_back = Arc::new(AtomicUsize::new(0));
    let kept: Arc<Mutex<Vec<Delivery<Tracked>>>> = Arc::default();
    let (to_dropper, dropper) = std::sync::mpsc::channel::<(Delivery<Tracked>, bool)>();
    let (dropped_tx, dropped_rx) = std::sync::mpsc::channel::<()>();
    // Drops what it is sent on its own thread, telling the sink first if asked to.
    let dropper = std::thread::spawn(move || {
        for (delivery, during_call) in dropper {
            drop(delivery);
            if during_call {
                dropped_tx.send(()).unwrap();
            }
        }
    });
    let n = scale(20_000) as u64;
    let mut callbacks = 0;
    {
        let (k, to_dropper) = (kept.clone(), Mutex::new(to_dropper));
        let dropped_rx = Mutex::new(dropped_rx);
        let c: Conveyor<Tracked> = Conveyor::builder()
            .build(move |d: Delivery<Tracked>| {
                assert!(d.item().text.ends_with(&format!("#{}", d.seq())));
                match d.seq() % 7 {
                    // Kept past the call (and past the conveyor).
                    0 => k.lock().unwrap().push(d),
                    // Dropped on another thread during the call.
                    1 => {
                        to_dropper.lock().unwrap().send((d, true)).unwrap();
                        dropped_rx.lock().unwrap().recv().unwrap();
                    }
                    // Dropped on another thread, whenever it gets there.
                    2 => to_dropper.lock().unwrap().send((d, false)).unwrap(),
                    _ => {}
                }
                Ok(())
            })
            .unwrap();
        for i in 1..=n {
            let mut receipt = c.send(Tracked::new(format!("{i}#{i}"), &items)).unwrap();
            match i % 5 {
                0 => {
                    let count = called_back.clone();
                    receipt.on_settled(move |outcome| {
                        outcome.unwrap();
                        count.fetch_add(1, AtomicOrdering::SeqCst);
                    });
                    callbacks += 1;
                }
                1 if i % 1000 == 1 => receipt.wait_timeout(GENEROUS).unwrap().unwrap(),
                _ => drop(receipt),
            }
        }
        assert!(c.flush_timeout(GENEROUS), "flush returns");
        assert_eq!(called_back.load(AtomicOrdering::SeqCst), callbacks);
        assert_eq!(c.stats().delivered, n);
        // Every item is gone but those a kept delivery holds, or one on its way to the dropper.
        let kept_now = kept.lock().unwrap().len();
        assert_eq!(kept_now as u64, n / 7);
        let live = items.load(AtomicOrdering::SeqCst);
        assert!(
            (kept_now..=kept_now + (n as usize).div_ceil(7)).contains(&live),
            "{live} items alive, {kept_now} kept"
        );
    }
    let kept = std::mem::take(&mut *kept.lock().unwrap());
    let reader = std::thread::spawn(move || {
        for d in &kept {
            assert!(d.item().text.ends_with(&format!("#{}", d.seq())));
            assert_eq!(d.seq() % 7, 0);
        }
        drop(kept);
    });
    reader.join().unwrap();
    dropper.join().unwrap();
    assert_eq!(
        items.load(AtomicOrdering::SeqCst),
        0,
        "every item dropped once"
    );
}

/// Items whose first call failed and paused their lane are called again after `resume`, most
/// of them both times in a lease of an instant sink's backlog: the deliveries kept from both
/// calls (each lent, see `Delivery::lend`) each keep the item alive, in whichever order they
/// drop.
#[test]
fn deliveries_kept_from_calls_before_and_after_a_pause_each_keep_the_item() {
    const FAILING: u64 = 40;
    for drop_first_calls_first in [true, false] {
        let items = Arc::new(AtomicUsize::new(0));
        let kept: Arc<Mutex<Vec<Delivery<Tracked>>>> = Arc::default();
        let k = kept.clone();
        let c: Arc<Conveyor<Tracked>> = Arc::new(
            Conveyor::builder()
                .on_failure(OnFailure::Pause)
                .build(move |d: Delivery<Tracked>| {
                    if d.seq() % FAILING != 0 {
                        return Ok(());
                    }
                    let first = d.attempt() == 1;
                    k.lock().unwrap().push(d);
                    if first {
                        Err(SinkError::permanent("the first call fails"))
                    } else {
                        Ok(())
                    }
                })
                .unwrap(),
        );
        let n = scale(4_000) as u64;
        let receipts: Vec<_> = (1..=n)
            .map(|i| c.send(Tracked::new(format!("{i}"), &items)).unwrap())
            .collect();
        // Resumes each pause until every item is delivered.
        let resumer = {
            let c = c.clone();
            std::thread::spawn(move || {
                while c.stats().delivered < n {
                    if !c.paused().is_empty() {
                        c.resume("");
                    }
                    std::thread::yield_now();
                }
            })
        };
        for mut receipt in receipts {
            receipt.wait_timeout(GENEROUS).unwrap().unwrap();
        }
        resumer.join().unwrap();
        drop(Arc::into_inner(c).expect("the resumer is done"));
        let kept = std::mem::take(&mut *kept.lock().unwrap());
        let failing = (n / FAILING) as usize;
        assert_eq!(
            kept.len(),
            2 * failing,
            "both calls of each kept their delivery"
        );
        assert_eq!(items.load(AtomicOrdering::SeqCst), failing);
        let (mut first, mut second): (Vec<_>, Vec<_>) =
            kept.into_iter().partition(|d| d.attempt() == 1);
        assert_eq!(first.len(), failing);
        if !drop_first_calls_first {
            std::mem::swap(&mut first, &mut second);
        }
        drop(first);
        assert_eq!(
            items.load(AtomicOrdering::SeqCst),
            failing,
            "the other delivery of each still holds it"
        );
        drop(second);
        assert_eq!(
            items.load(AtomicOrdering::SeqCst),
            0,
            "each dropped with its last delivery (first calls' first: {drop_first_calls_first})"
        );
    }
}

/// With every receipt dropped, a strict worker has nothing to settle but the items' drops:
/// `flush` still returns, and only once they all ran.
#[test]
fn flush_returns_once_fire_and_forget_items_dropped() {
    for n in [1, 2, 3, 40, 1000] {
        let items = Arc::new(AtomicUsize::new(0));
        let c: Conveyor<Tracked> = Conveyor::builder()
            .build(|d: Delivery<Tracked>| {
                assert!(!d.item().text.is_empty());
                Ok(())
            })
            .unwrap();
        for i in 0..n {
            drop(c.send(Tracked::new(i.to_string(), &items)).unwrap());
        }
        assert!(c.flush_timeout(GENEROUS), "flush after {n} items");
        assert_eq!(items.load(AtomicOrdering::SeqCst), 0, "{n} items dropped");
    }
}

#[repr(align(256))]
#[derive(Debug)]
struct Big([u8; 300]);

#[test]
fn over_aligned_items_are_aligned_and_intact() {
    let c: Conveyor<Big, Big> = Conveyor::builder()
        .ordering(Ordering::Pipelined { in_flight: 2 })
        .build(|d: Delivery<Big>| {
            let at = d.item() as *const Big as usize;
            assert_eq!(at % 256, 0, "item misaligned at {at:#x}");
            let b = d.item().0[0];
            assert!(d.item().0.iter().all(|&x| x == b));
            Ok(Big([b.wrapping_add(1); 300]))
        })
        .unwrap();
    let receipts: Vec<_> = (0..scale(500))
        .map(|i| c.send(Big([i as u8; 300])).unwrap())
        .collect();
    for (i, r) in receipts.into_iter().enumerate() {
        let reply = r.wait().unwrap();
        assert_eq!(&reply as *const Big as usize % 256, 0);
        assert!(reply.0.iter().all(|&x| x == (i as u8).wrapping_add(1)));
    }
}

#[test]
fn zero_sized_items_and_replies() {
    let c: Conveyor<(), ()> = Conveyor::builder()
        .ordering(Ordering::Keyed { concurrency: 3 })
        .build(|_d: Delivery<()>| Ok(()))
        .unwrap();
    for i in 0..scale(3000) {
        let r = c.send_keyed(format!("{}", i % 4), ()).unwrap();
        if i % 5 == 0 {
            r.wait().unwrap();
        }
    }
    c.flush();
    assert_eq!(c.stats().delivered as usize, scale(3000));
}

/// An item whose drop panics: a leak is acceptable, undefined behaviour is not.
struct Bomb(u32);
impl Drop for Bomb {
    fn drop(&mut self) {
        if self.0 % 3 == 0 && !std::thread::panicking() {
            panic!("bomb {}", self.0);
        }
    }
}

#[test]
fn a_panicking_item_drop_leaks_at_worst() {
    // The last reference to each node is the receipt, dropped here: the panic surfaces on
    // this thread, never in a worker.
    let c: Conveyor<Bomb, ()> = Conveyor::builder()
        .build(|_d: Delivery<Bomb>| Ok(()))
        .unwrap();
    let mut receipts: Vec<_> = (0..200).map(|i| c.send(Bomb(i)).unwrap()).collect();
    for r in &mut receipts {
        r.wait_timeout(GENEROUS).unwrap().unwrap();
    }
    c.flush();
    let mut panics = 0;
    for r in receipts {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(r))).is_err() {
            panics += 1;
        }
    }
    assert_eq!(panics, 67);
    // The conveyor still works.
    assert!(matches!(c.send(Bomb(1)).unwrap().wait(), Ok(())));
    // A refused item is handed back before anything drops it.
    c.close();
    let back = c.send(Bomb(4)).err().unwrap().into_inner();
    assert_eq!(back.0, 4);
}

#[test]
fn no_lost_wakeup_when_items_trickle_in() {
    // A producer about as fast as the worker: the worker alternates between spinning and
    // sleeping. Every receipt must settle promptly.
    for ordering in [
        Ordering::Strict,
        Ordering::Pipelined { in_flight: 3 },
        Ordering::Keyed { concurrency: 3 },
    ] {
        let c: Conveyor<u64, u64> = Conveyor::builder()
            .ordering(ordering)
            .build(|d: Delivery<u64>| Ok(*d.item()))
            .unwrap();
        let mut rng = Rng(42);
        for i in 0..scale(3000) as u64 {
            let mut r = c.send_keyed(format!("{}", i % 3), i).unwrap();
            match rng.next() % 4 {
                0 => {}
                1 => std::thread::yield_now(),
                2 => std::thread::sleep(Duration::from_micros(rng.next() % 50)),
                _ => {
                    let got = r.wait_timeout(Duration::from_secs(10));
                    assert_eq!(
                        got.map(Result::unwrap),
                        Some(i),
                        "{ordering:?}: lost wake-up"
                    );
                }
            }
        }
        assert!(
            c.flush_timeout(Duration::from_secs(10)),
            "{ordering:?}: lost wake-up"
        );
    }
}

#[test]
fn async_sink_and_string_receipts_awaited_elsewhere() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let c: Arc<Conveyor<String, String>> = Arc::new(
        Conveyor::builder()
            .ordering(Ordering::Keyed { concurrency: 4 })
            .capacity(16)
            .build_async(|d: Delivery<String>| async move {
                tokio::task::yield_now().await;
                Ok(format!("{}!", d.item()))
            })
            .unwrap(),
    );
    let tasks: Vec<_> = (0..4)
        .map(|t| {
            let c = c.clone();
            rt.spawn(async move {
                for i in 0..scale(500) {
                    let r = c
                        .send_keyed_async(format!("{}", i % 3), format!("{t}.{i}"))
                        .await
                        .unwrap();
                    if i % 2 == 0 {
                        assert_eq!(r.await.unwrap(), format!("{t}.{i}!"));
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        rt.block_on(t).unwrap();
    }
    c.flush();
    let c = Arc::try_unwrap(c).ok().unwrap();
    let report = c.close();
    assert!(report.drained);
}

/// Receipts and deliveries go to any thread whatever their type parameters, as they did when
/// they were trait objects: this only has to compile.
#[allow(dead_code)]
fn receipts_and_deliveries_are_send_and_sync_for_any_types<R: 'static, T: 'static>(
    receipt: Receipt<R>,
    delivery: Delivery<T>,
) {
    fn check<X: Send + Sync + 'static>(_: &X) {}
    check(&receipt);
    check(&delivery);
}
