//! Async sinks, async senders and awaitable receipts.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{in_time, GENEROUS};
use conveyor::{
    Backpressure, Conveyor, Delivery, DeliveryError, Ordering, Receipt, SendError, SinkError,
};

/// The name of the thread this runs on, for tests of where sinks run.
fn thread_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_sink_on_the_ambient_runtime_keeps_order() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let threads = Arc::new(Mutex::new(Vec::new()));
    let (s, t) = (seen.clone(), threads.clone());
    let c: Conveyor<u64, u64> = Conveyor::builder()
        .build_async(move |d: Delivery<u64>| {
            let (s, t) = (s.clone(), t.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                s.lock().unwrap().push(*d.item());
                t.lock().unwrap().push(thread_name());
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
    // On this test's runtime's workers, not on one the conveyor made (`conveyor-async`).
    let ours = tokio::spawn(async { thread_name() }).await.unwrap();
    let threads = threads.lock().unwrap();
    assert_eq!(threads.len(), 50);
    assert!(
        threads.iter().all(|name| *name == ours),
        "{ours}: {threads:?}"
    );
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
    let threads = Arc::new(Mutex::new(Vec::new()));
    let t = threads.clone();
    let c: Conveyor<u64> = Conveyor::builder()
        .ordering(Ordering::Pipelined { in_flight: 4 })
        .build_async(move |d: Delivery<u64>| {
            let t = t.clone();
            async move {
                t.lock().unwrap().push(thread_name());
                match *d.item() {
                    3 => Err(SinkError::permanent("three is rejected")),
                    5 => panic!("five panics"),
                    _ => Ok(()),
                }
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
    let threads = threads.lock().unwrap();
    assert_eq!(threads.len(), 8);
    assert!(
        threads.iter().all(|name| name == "conveyor-async"),
        "on the runtime the conveyor made: {threads:?}"
    );
}

/// A blocking sink runs on the worker threads the conveyor owns: never on a thread that
/// sends, whether a plain thread or a Tokio runtime's worker, even when the conveyor was built
/// inside that runtime.
#[test]
fn a_blocking_sink_runs_on_the_conveyors_threads_not_the_senders_nor_tokio_workers() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("app-runtime")
        .enable_all()
        .build()
        .unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let t = calls.clone();
    let c = Arc::new(rt.block_on(async move {
        Conveyor::<u64>::builder()
            .ordering(Ordering::Keyed { concurrency: 2 })
            .build(move |_d: Delivery<u64>| {
                t.lock()
                    .unwrap()
                    .push((std::thread::current().id(), thread_name()));
                Ok(())
            })
            .unwrap()
    }));
    let senders: Vec<_> = (0..4u64)
        .map(|task| {
            let c = c.clone();
            rt.spawn(async move {
                for i in 0..50 {
                    c.send_keyed_async(format!("{}", i % 3), task * 100 + i)
                        .await
                        .unwrap();
                    tokio::task::yield_now().await;
                }
                (std::thread::current().id(), thread_name())
            })
        })
        .collect();
    for i in 0..50 {
        c.send(1000 + i).unwrap();
    }
    let mut sending = rt.block_on(async {
        let mut threads = Vec::new();
        for sender in senders {
            threads.push(sender.await.unwrap());
        }
        threads
    });
    assert!(sending.iter().all(|(_, name)| name == "app-runtime"));
    sending.push((std::thread::current().id(), thread_name()));
    assert!(c.flush_timeout(GENEROUS));
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 250);
    for (id, name) in calls.iter() {
        assert!(
            name.starts_with("conveyor-") && sending.iter().all(|(sender, _)| sender != id),
            "a call on {name} ({id:?}); the senders: {sending:?}"
        );
    }
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

/// An async sink built on the ambient current-thread runtime.
fn on_this_runtime(capacity: usize) -> Conveyor<u64> {
    Conveyor::builder()
        .capacity(capacity)
        .drain_timeout(GENEROUS)
        .build_async(|_d: Delivery<u64>| async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(())
        })
        .unwrap()
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A conveyor built inside `rt.block_on`, with `n` items sent there, handed back once
/// `block_on` has returned: `rt` still exists but runs nothing until something drives it again.
/// Its drain deadline is an hour, so a close that waits for it counts as a hang.
fn built_in_block_on(rt: &tokio::runtime::Runtime, n: u64) -> (Conveyor<u64>, Vec<Receipt<()>>) {
    rt.block_on(async {
        let c = Conveyor::builder()
            .drain_timeout(Duration::from_secs(3600))
            .build_async(|_d: Delivery<u64>| async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(())
            })
            .unwrap();
        let mut receipts = Vec::new();
        for i in 0..n {
            receipts.push(c.send_async(i).await.unwrap());
        }
        (c, receipts)
    })
}

#[test]
fn waits_after_a_current_thread_block_on_returned_do_not_hang() {
    let rt = current_thread_runtime();
    let (c, receipts) = built_in_block_on(&rt, 5);
    // Nothing drives `rt` from here on: the sink must run elsewhere.
    in_time("Receipt::wait", move || {
        for r in receipts {
            r.wait().unwrap();
        }
    });
    let c = in_time("flush", move || {
        c.flush();
        c
    });
    assert_eq!(c.stats().delivered, 5);
    let report = in_time("close", move || c.close());
    assert!(report.drained, "{report:?}");
    drop(rt);
}

#[test]
fn closing_after_a_current_thread_block_on_returned_drains_instead_of_sitting_out_the_deadline() {
    let rt = current_thread_runtime();
    let (c, receipts) = built_in_block_on(&rt, 5);
    let report = in_time("close", move || c.close());
    assert!(report.drained, "{report:?}");
    assert_eq!(report.stats.delivered, 5);
    for r in receipts {
        r.wait().unwrap();
    }
}

#[test]
fn dropping_the_current_thread_runtime_a_conveyor_was_built_in_loses_nothing() {
    let rt = current_thread_runtime();
    let (c, receipts) = built_in_block_on(&rt, 5);
    drop(rt);
    let report = in_time("close", move || c.close());
    assert!(report.drained, "{report:?}");
    for r in receipts {
        r.wait().unwrap();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn blocking_waits_on_a_current_thread_runtime_deliver() {
    let c = on_this_runtime(1);
    // Sends that wait for room, a receipt's wait and a flush, each blocking this runtime's only
    // thread (they used to panic here, as the sink ran on this runtime).
    let receipts: Vec<_> = (0..5).map(|i| c.send(i).unwrap()).collect();
    receipts.into_iter().next().unwrap().wait().unwrap();
    c.flush();
    assert_eq!(c.stats().delivered, 5);
    assert!(c.close().drained);
}

#[tokio::test(flavor = "current_thread")]
async fn a_flush_on_another_thread_does_not_need_this_runtime_to_run() {
    let c = Arc::new(on_this_runtime(100));
    for i in 0..5 {
        c.send_async(i).await.unwrap();
    }
    let other = c.clone();
    // This runtime's thread blocks, without awaiting, until the other thread's flush is done.
    in_time("flush on another thread", move || other.flush());
    assert_eq!(c.stats().delivered, 5);
}

#[tokio::test(flavor = "current_thread")]
async fn dropping_on_a_current_thread_runtime_delivers_what_was_sent() {
    let c = on_this_runtime(100);
    let receipts: Vec<_> = (0..5).map(|i| c.send(i).unwrap()).collect();
    drop(c);
    for r in receipts {
        r.await.unwrap();
    }
}

/// Tokio I/O resources are driven by the runtime that made them, wherever they are polled: a
/// sink on the conveyor's own runtime can use a socket made on the caller's current-thread
/// runtime while that runtime runs (here, while this task awaits).
#[tokio::test(flavor = "current_thread")]
async fn a_sink_may_use_a_socket_made_on_the_current_thread_runtime_it_was_built_in() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let out = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (mut inbox, _) = listener.accept().await.unwrap();
    let out = Arc::new(tokio::sync::Mutex::new(out));
    let c: Conveyor<u64> = Conveyor::builder()
        .build_async(move |d: Delivery<u64>| {
            let out = out.clone();
            async move {
                let mut out = out.lock().await;
                out.write_all(&d.item().to_be_bytes())
                    .await
                    .map_err(SinkError::retryable)
            }
        })
        .unwrap();
    for i in 0..5 {
        c.send_async(i).await.unwrap();
    }
    tokio::time::timeout(GENEROUS, c.flush_async())
        .await
        .unwrap();
    let mut got = [0u8; 40];
    inbox.read_exact(&mut got).await.unwrap();
    let items: Vec<u64> = got
        .chunks(8)
        .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(items, (0..5).collect::<Vec<_>>());
}

/// Its runtime gone, a conveyor built on it delivers nothing more: sends are refused, and the
/// receipts of what was left settle, and flush and close end, instead of waiting for good.
#[test]
fn a_runtime_shut_down_under_the_workers_closes_the_conveyor() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (in_sink, sink_entered) = std::sync::mpsc::channel();
    let (c, first, second) = rt.block_on(async {
        let c: Conveyor<u64> = Conveyor::builder()
            .drain_timeout(Duration::from_secs(3600))
            .build_async(move |_d: Delivery<u64>| {
                let _ = in_sink.send(());
                std::future::pending()
            })
            .unwrap();
        let first = c.send_async(1).await.unwrap();
        let second = c.send_async(2).await.unwrap();
        (c, first, second)
    });
    sink_entered.recv_timeout(GENEROUS).unwrap(); // a worker took item 1 and waits in the sink
    drop(rt); // drops the worker tasks where they wait
    let (first, second) = in_time("the receipts", move || (first.wait(), second.wait()));
    assert!(
        matches!(first, Err(DeliveryError::Unconfirmed)),
        "{first:?}"
    );
    assert!(matches!(second, Err(DeliveryError::Closed)), "{second:?}");
    assert!(matches!(c.send(3), Err(SendError::Closed(3))));
    let started = std::time::Instant::now();
    let (flushed, report) = in_time("flush and close", move || {
        (c.flush_timeout(GENEROUS), c.close())
    });
    assert!(!flushed, "no worker is left to deliver");
    assert!(
        started.elapsed() < GENEROUS,
        "waited for workers that are gone"
    );
    assert_eq!((report.drained, report.left), (false, 2));
    assert_eq!((report.stats.accepted, report.stats.delivered), (2, 0));
}

/// Worker tasks their runtime drops before they ever ran (here it was shut down before they
/// were spawned) leave too: nothing waits for them, sends are soon refused, and what was
/// accepted meanwhile is reported as closed.
#[test]
fn worker_tasks_dropped_before_they_ever_ran_leave_nothing_to_wait_for() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let handle = rt.handle().clone();
    rt.shutdown_background();
    let inside = handle.enter();
    let c: Conveyor<u64> = Conveyor::builder()
        .drain_timeout(Duration::from_secs(3600))
        .build_async(|_d: Delivery<u64>| async { Ok(()) })
        .unwrap();
    drop(inside);
    // The runtime drops the tasks on a thread of its own, soon after the spawn.
    let deadline = std::time::Instant::now() + GENEROUS;
    let mut accepted = Vec::new();
    loop {
        match c.try_send(accepted.len() as u64) {
            Ok(receipt) => accepted.push(receipt),
            Err(SendError::Closed(_)) => break,
            Err(SendError::Full(_)) => panic!("the queue filled up: sends still accepted"),
            Err(other) => panic!("{other:?}"),
        }
        assert!(std::time::Instant::now() < deadline, "sends still accepted");
        std::thread::sleep(Duration::from_millis(1));
    }
    let outcomes = in_time("the receipts", move || {
        accepted.into_iter().map(Receipt::wait).collect::<Vec<_>>()
    });
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Err(DeliveryError::Closed))),
        "{outcomes:?}"
    );
    let report = in_time("close", move || c.close());
    assert_eq!(report.drained, outcomes.is_empty());
    assert_eq!(report.left as usize, outcomes.len());
}

/// Waits with a timeout too large to add to the clock wait as long as needed (it used to read
/// as "forever" and panic).
#[tokio::test(flavor = "current_thread")]
async fn a_huge_timeout_is_a_far_deadline() {
    let c = on_this_runtime(100);
    let mut receipt = c.try_send(1).unwrap();
    assert!(matches!(receipt.wait_timeout(Duration::MAX), Some(Ok(()))));
    assert!(c.flush_timeout(Duration::MAX));
    assert!(c.close_timeout(Duration::MAX).drained);
}

/// A blocking `Receipt::wait` inside an async sink, for an item another worker task delivers
/// on the same runtime: the runtime hands the waiting thread's other tasks to a new thread, so
/// the wait ends even when the sink holds the runtime's only thread.
#[test]
fn a_blocking_wait_in_an_async_sink_does_not_starve_its_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let other: Arc<Mutex<Option<Receipt<()>>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let c: Conveyor<u64> = rt.block_on(async {
        let other = other.clone();
        let tx = Mutex::new(tx);
        Conveyor::builder()
            .ordering(Ordering::Keyed { concurrency: 2 })
            .drain_timeout(Duration::from_secs(1))
            .build_async(move |d: Delivery<u64>| {
                let waits = (*d.item() == 1).then(|| (other.clone(), tx.lock().unwrap().clone()));
                async move {
                    if let Some((other, tx)) = waits {
                        let receipt = loop {
                            if let Some(receipt) = other.lock().unwrap().take() {
                                break receipt;
                            }
                            std::thread::sleep(Duration::from_millis(1));
                        };
                        tx.send(receipt.wait()).ok();
                    }
                    Ok(())
                }
            })
            .unwrap()
    });
    c.send_keyed("a", 1).unwrap();
    *other.lock().unwrap() = Some(c.send_keyed("b", 2).unwrap());
    let waited = rx.recv_timeout(GENEROUS);
    let ok = matches!(waited, Ok(Ok(())));
    let flushed = ok && c.flush_timeout(GENEROUS);
    // Not dropped while a thread of it may still be stuck in the sink.
    rt.shutdown_background();
    assert!(
        ok,
        "{waited:?}: the other key's item never ran, the wait blocked the runtime's only thread"
    );
    assert!(flushed);
    assert_eq!(c.stats().delivered, 2);
}

/// A blocking `send` into its own full queue from an async sink, while another worker task on
/// the same runtime can make room: the runtime hands that task to a new thread, so the send
/// gets its room even when the sink holds the runtime's only thread.
#[test]
fn a_blocking_send_in_an_async_sink_does_not_starve_its_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let go = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let me: Arc<std::sync::OnceLock<Conveyor<u64>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let c = rt.block_on(async {
        let (go, me) = (go.clone(), me.clone());
        let tx = Mutex::new(tx);
        Conveyor::builder()
            .ordering(Ordering::Keyed { concurrency: 2 })
            .capacity(1)
            .drain_timeout(Duration::from_secs(1))
            .build_async(move |d: Delivery<u64>| {
                let sends =
                    (*d.item() == 1).then(|| (go.clone(), me.clone(), tx.lock().unwrap().clone()));
                async move {
                    if let Some((go, me, tx)) = sends {
                        // Holds the runtime's only thread until the queue is full.
                        while !go.load(std::sync::atomic::Ordering::Acquire) {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        let sent = me.get().unwrap().send_keyed("c", 3).map(|_| ());
                        tx.send(sent.map_err(|e| e.to_string())).ok();
                    }
                    Ok(())
                }
            })
            .unwrap()
    });
    let c = me.get_or_init(|| c);
    c.send_keyed("a", 1).unwrap();
    // Queued: the other worker's task cannot run while the sink holds the runtime's thread.
    c.send_keyed("b", 2).unwrap();
    assert!(
        matches!(c.try_send(9), Err(SendError::Full(9))),
        "the queue is full"
    );
    go.store(true, std::sync::atomic::Ordering::Release);
    let sent = rx.recv_timeout(GENEROUS);
    let flushed = matches!(sent, Ok(Ok(()))) && c.flush_timeout(GENEROUS);
    // Not dropped while a thread of it may still be stuck in the sink.
    rt.shutdown_background();
    assert_eq!(
        sent,
        Ok(Ok(())),
        "the other worker never ran: the send blocked the runtime's only thread"
    );
    assert!(flushed);
    assert_eq!(c.stats().delivered, 3);
}

/// Blocking calls a task may make: a send waiting for room, receipt waits, a flush, a drop.
/// Returns how many items were delivered.
fn blocking_calls() -> u64 {
    let c: Conveyor<u64> = Conveyor::builder()
        .capacity(1)
        .build(|_: Delivery<u64>| {
            std::thread::sleep(Duration::from_millis(1));
            Ok(())
        })
        .unwrap();
    let first = c.send(1).unwrap();
    // The queue holds one item: these sends wait for room.
    for i in 2..5 {
        c.send(i).unwrap();
    }
    first.wait().unwrap();
    let mut last = c.send(5).unwrap();
    assert!(last.wait_timeout(GENEROUS).is_some());
    assert!(c.flush_timeout(GENEROUS));
    c.stats().delivered
}

/// A `LocalSet` forbids `block_in_place` on the thread that drives it, even on a
/// multi-threaded runtime, and that thread is no worker of the runtime anyway: blocking calls
/// there block plainly instead of panicking, in the set's own future and in its local tasks.
#[test]
fn blocking_calls_in_a_local_set_on_a_multi_threaded_runtime_do_not_panic() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let delivered = local.block_on(&rt, async {
        let here = blocking_calls();
        let spawned = tokio::task::spawn_local(async { blocking_calls() });
        (here, spawned.await.unwrap())
    });
    assert_eq!(delivered, (5, 5));
}

// `close_async`: a close that awaits, on the runtime of the code that closes.

type Ask = tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>;

/// A task on the calling runtime that answers the first `answered` requests, each after a
/// 1 ms sleep there, and holds the later ones unanswered: a sink that asks it finishes a call
/// only while that runtime runs.
fn spawn_service(answered: usize) -> Ask {
    let (ask, mut asks) =
        tokio::sync::mpsc::unbounded_channel::<tokio::sync::oneshot::Sender<()>>();
    tokio::spawn(async move {
        let (mut replied, mut held) = (0, Vec::new());
        while let Some(reply) = asks.recv().await {
            if replied == answered {
                held.push(reply);
                continue;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            let _ = reply.send(());
            replied += 1;
        }
    });
    ask
}

/// An async sink that asks `service` before each delivery (it runs on the conveyor's own
/// runtime: the caller's is a current-thread one).
fn asking(builder: conveyor::Builder<u64>, service: Ask) -> Conveyor<u64> {
    builder
        .build_async(move |_d: Delivery<u64>| {
            let service = service.clone();
            async move {
                let (reply, answer) = tokio::sync::oneshot::channel();
                service
                    .send(reply)
                    .map_err(|_| SinkError::permanent("service gone"))?;
                answer.await.map_err(SinkError::permanent)
            }
        })
        .unwrap()
}

/// Asserts that a close delivered every item sent, each of `receipts`.
async fn drained_all(report: &conveyor::CloseReport, receipts: Vec<Receipt<()>>) {
    let sent = receipts.len() as u64;
    assert_eq!(
        (report.drained, report.left, report.stats.delivered),
        (true, 0, sent),
        "{report:?}"
    );
    for r in receipts {
        r.await.unwrap();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn close_async_drains_a_sink_that_needs_the_current_thread_runtime_it_is_awaited_on() {
    let c = asking(Conveyor::builder(), spawn_service(usize::MAX));
    let receipts: Vec<_> = (0..20).map(|i| c.send(i).unwrap()).collect();
    let started = std::time::Instant::now();
    let report = c.close_async(GENEROUS).await;
    assert!(started.elapsed() < GENEROUS, "it sat out its deadline");
    drained_all(&report, receipts).await;
    assert!(matches!(c.send(20), Err(SendError::Closed(20))));
}

/// What `close_async` is for: `close_timeout` blocks the runtime's only thread, so the task the
/// sink needs never runs, and the drain gets nowhere before its deadline.
#[tokio::test(flavor = "current_thread")]
async fn close_timeout_cannot_drain_a_sink_that_needs_the_current_thread_runtime_it_blocks() {
    let c = asking(Conveyor::builder(), spawn_service(usize::MAX));
    let receipts: Vec<_> = (0..20).map(|i| c.send(i).unwrap()).collect();
    let report = c.close_timeout(Duration::from_millis(100));
    assert_eq!(
        (report.drained, report.left, report.stats.delivered),
        (false, 20, 0),
        "{report:?}"
    );
    for r in receipts.into_iter().skip(1) {
        assert!(matches!(r.await, Err(DeliveryError::Closed)));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn close_async_with_a_stuck_sink_returns_at_its_deadline_and_reports_what_is_left() {
    let c: Conveyor<u64> = Conveyor::builder()
        .drain_timeout(Duration::from_secs(3600))
        .build_async(|_d: Delivery<u64>| std::future::pending())
        .unwrap();
    let receipts: Vec<_> = (0..5).map(|i| c.send(i).unwrap()).collect();
    while c.stats().in_flight == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let other_task = tokio::spawn(async {});
    let timeout = Duration::from_millis(100);
    let started = std::time::Instant::now();
    let report = c.close_async(timeout).await;
    let waited = started.elapsed();
    assert!(waited >= timeout && waited < GENEROUS, "{waited:?}");
    assert!(
        other_task.is_finished(),
        "another task of this runtime ran while it waited"
    );
    assert_eq!((report.drained, report.left), (false, 5), "{report:?}");
    assert_eq!((report.stats.in_flight, report.stats.queued), (1, 4));
    let mut receipts = receipts.into_iter();
    let first = receipts.next().unwrap().await;
    assert!(
        matches!(first, Err(DeliveryError::Unconfirmed)),
        "{first:?}"
    );
    for r in receipts {
        assert!(matches!(r.await, Err(DeliveryError::Closed)));
    }
    // Every later close, and the drop, report at once (the drain timeout is an hour).
    let again = c.close_async(GENEROUS).await;
    assert_eq!((again.drained, again.left), (false, 5));
    let c = in_time("close after close_async", move || {
        assert_eq!(c.close().left, 5);
        c
    });
    in_time("drop after close_async", move || drop(c));
}

/// A blocking sink whose calls need a task of the current-thread runtime the close is awaited
/// on: its worker threads are awaited, not joined by blocking that runtime's thread, and they
/// have ended (their sink dropped) once the close returns.
#[tokio::test(flavor = "current_thread")]
async fn close_async_drains_and_joins_a_blocking_sink_without_blocking_its_runtime() {
    let service = spawn_service(usize::MAX);
    let sink_alive = Arc::new(());
    let held = sink_alive.clone();
    let c: Conveyor<u64> = Conveyor::builder()
        .ordering(Ordering::Keyed { concurrency: 3 })
        .build(move |_d: Delivery<u64>| {
            let _held = &held;
            let (reply, answer) = tokio::sync::oneshot::channel();
            service
                .send(reply)
                .map_err(|_| SinkError::permanent("service gone"))?;
            answer.blocking_recv().map_err(SinkError::permanent)
        })
        .unwrap();
    for i in 0..30 {
        c.send_keyed(format!("{}", i % 5), i).unwrap();
    }
    let report = c.close_async(GENEROUS).await;
    assert_eq!(
        (report.drained, report.left, report.stats.delivered),
        (true, 0, 30),
        "{report:?}"
    );
    assert_eq!(
        Arc::strong_count(&sink_alive),
        1,
        "a worker thread had not ended: it still held the sink"
    );
}

/// Dropped while it waits, a close leaves the conveyor closed and draining; a later close
/// finishes the job.
#[tokio::test(flavor = "current_thread")]
async fn a_close_async_dropped_midway_leaves_the_conveyor_closed_for_a_later_close() {
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let permits = release.clone();
    let c = Arc::new(
        Conveyor::builder()
            .build_async(move |_d: Delivery<u64>| {
                let permits = permits.clone();
                async move {
                    permits.acquire().await.unwrap().forget();
                    Ok(())
                }
            })
            .unwrap(),
    );
    let receipts: Vec<_> = (0..5).map(|i| c.send(i).unwrap()).collect();
    tokio::select! {
        _ = c.close_async(GENEROUS) => panic!("closed while every call was held"),
        () = tokio::time::sleep(Duration::from_millis(50)) => {}
    }
    assert!(matches!(c.send(5), Err(SendError::Closed(5))));
    assert!(
        receipts.iter().all(|r| !r.is_settled()),
        "nothing was given up"
    );
    // Spawned: the future can move between threads.
    let closing = tokio::spawn({
        let c = c.clone();
        async move { c.close_async(GENEROUS).await }
    });
    release.add_permits(5);
    drained_all(&closing.await.unwrap(), receipts).await;
}

/// With a journal: what the report counts as left is what the journal holds as pending, and
/// the journal is closed (free for another process) once the close returns.
#[tokio::test(flavor = "current_thread")]
async fn close_async_leaves_in_the_journal_what_it_reports_as_left() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.journal");
    let c = asking(Conveyor::builder().journal(&path), spawn_service(3));
    for i in 0..10 {
        c.send_async(i).await.unwrap();
    }
    let answered = async {
        while c.stats().delivered < 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(GENEROUS, answered).await.unwrap();
    let report = c.close_async(Duration::from_millis(100)).await;
    assert_eq!(
        (report.stats.delivered, report.left),
        (3, 7),
        "the service answers three calls: {report:?}"
    );
    let journal = conveyor::Journal::open(&path).expect("the close released the journal");
    assert_eq!(journal.status().unwrap().pending, report.left);
    drop(journal);
    drop(c);
}

/// Its deadline follows the real clock: a paused Tokio clock, which jumps ahead whenever the
/// runtime is idle (as it is while the close awaits worker threads), does not cut it short.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn close_async_s_deadline_is_not_cut_short_by_a_paused_tokio_clock() {
    let c: Conveyor<u64> = Conveyor::builder()
        .build(|_d: Delivery<u64>| {
            std::thread::sleep(Duration::from_millis(2));
            Ok(())
        })
        .unwrap();
    for i in 0..20 {
        c.send(i).unwrap();
    }
    let report = c.close_async(GENEROUS).await;
    assert_eq!(
        (report.drained, report.left, report.stats.delivered),
        (true, 0, 20),
        "{report:?}"
    );
}
