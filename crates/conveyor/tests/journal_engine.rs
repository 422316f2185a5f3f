//! A conveyor with a journal: restart replays what was not settled, in order and before new
//! items; dead letters, pauses and the cursor survive restarts; one process per file; a full
//! disk makes `send` fail without harming what was accepted.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor::{
    Backpressure, BuildError, Conveyor, Delivery, DeliveryError, Durability, Journal, JournalError,
    OnFailure, Ordering, SendError, SinkError,
};

/// What a sink saw: (seq, key, item, idempotency key).
type Seen = Arc<Mutex<Vec<(u64, Option<String>, u64, String)>>>;

fn recorder() -> (
    Seen,
    impl Fn(Delivery<u64>) -> Result<(), SinkError> + Send + Sync + 'static,
) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let sink = move |d: Delivery<u64>| {
        log.lock().unwrap().push((
            d.seq(),
            d.key().map(str::to_owned),
            *d.item(),
            d.idempotency_key(),
        ));
        Ok(())
    };
    (seen, sink)
}

/// A conveyor on `path` whose sink records what it sees.
fn recording(path: &Path, ordering: Ordering) -> (Seen, Conveyor<u64>) {
    let (seen, sink) = recorder();
    let c = Conveyor::builder()
        .journal(path)
        .ordering(ordering)
        .build(sink)
        .unwrap();
    (seen, c)
}

/// A conveyor whose sink never finishes until the returned sender is dropped: everything sent
/// stays unsettled, as in a crash.
fn stalled<T>(path: &Path, ordering: Ordering) -> (Conveyor<T>, mpsc::Sender<()>)
where
    T: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (gate_tx, gate) = mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let c = Conveyor::builder()
        .journal(path)
        .ordering(ordering)
        .capacity(1_000_000)
        .drain_timeout(Duration::from_millis(50))
        .build(move |_d: Delivery<T>| {
            let _ = gate.lock().unwrap().recv();
            Err(SinkError::permanent("stopped"))
        })
        .unwrap();
    (c, gate_tx)
}

/// Leaves items `0..n` pending in the strict journal at `path`, as a crash would.
fn leave_pending(path: &Path, n: u64) {
    let (c, gate) = stalled(path, Ordering::Strict);
    for i in 0..n {
        c.send(i).unwrap();
    }
    c.close_timeout(Duration::from_millis(50));
    drop(c);
    drop(gate);
}

#[test]
fn unsettled_items_are_delivered_after_a_restart_in_order_and_before_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.journal");
    let keyed = Ordering::Keyed { concurrency: 4 };
    let (c, gate) = stalled(&path, keyed);
    for i in 0..90u64 {
        c.send_keyed(format!("k{}", i % 3), i).unwrap();
    }
    let report = c.close_timeout(Duration::from_millis(50));
    assert_eq!(report.left, 90, "nothing settled: {report:?}");
    drop(c);
    drop(gate);

    let (seen, c) = recording(&path, keyed);
    for i in 90..99u64 {
        c.send_keyed(format!("k{}", i % 3), i).unwrap();
    }
    c.flush();
    assert!(c.close().drained);
    let id = Journal::open(&path).unwrap().id().to_owned();
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.len(),
        99,
        "each item exactly once: none was settled before"
    );
    for lane in ["k0", "k1", "k2"] {
        let items: Vec<u64> = seen
            .iter()
            .filter(|s| s.1.as_deref() == Some(lane))
            .map(|s| s.2)
            .collect();
        let expected: Vec<u64> = (0..99).filter(|i| format!("k{}", i % 3) == lane).collect();
        assert_eq!(
            items, expected,
            "lane {lane}: old items first, in order, then new ones"
        );
    }
    for (seq, _, item, key) in seen.iter() {
        if *item < 90 {
            assert_eq!(*seq, item + 1, "replayed items keep their seqs");
        } else {
            assert!(
                *seq > 90,
                "new items get seqs after every seq handed out before"
            );
        }
        assert_eq!(
            *key,
            format!("{id}-{seq}"),
            "idempotency keys are the journal id and seq"
        );
    }
    assert_eq!(Journal::open(&path).unwrap().status().unwrap().pending, 0);
}

#[test]
fn replay_of_a_backlog_larger_than_the_capacity_keeps_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    leave_pending(&path, 500);
    let (seen, sink) = recorder();
    let c = Conveyor::builder()
        .journal(&path)
        .capacity(16)
        .build(sink)
        .unwrap();
    for i in 500..520u64 {
        c.send(i).unwrap(); // waits while the backlog is loaded, then goes after it
    }
    c.flush();
    let items: Vec<u64> = seen.lock().unwrap().iter().map(|s| s.2).collect();
    assert_eq!(items, (0..520).collect::<Vec<_>>());
}

#[test]
fn replay_holds_no_more_than_the_capacity_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let (c, gate) = stalled(&path, Ordering::Strict);
    for i in 0..2_000u64 {
        c.send(i).unwrap();
    }
    c.close_timeout(Duration::from_millis(50));
    drop(c);
    drop(gate);
    let (gate_tx, gate) = mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let c: Conveyor<u64> = Conveyor::builder()
        .journal(&path)
        .capacity(16)
        .drain_timeout(Duration::from_millis(50))
        .build(move |_d: Delivery<u64>| {
            let _ = gate.lock().unwrap().recv();
            Ok(())
        })
        .unwrap();
    // Wait until replay filled the queue, then give it time to overfill: it must not.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while c.stats().accepted < 17 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    let stats = c.stats();
    assert_eq!(stats.queued, 16, "{stats:?}");
    assert_eq!(stats.in_flight, 1, "{stats:?}");
    assert_eq!(stats.accepted, 17, "{stats:?}");
    assert!(
        c.try_send(99).unwrap_err().is_full(),
        "new items wait behind the replay"
    );
    drop(c);
    drop(gate_tx);
    assert_eq!(
        Journal::open(&path).unwrap().status().unwrap().pending,
        2_000
    );
}

#[test]
fn items_that_no_longer_decode_become_dead_letters_instead_of_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    leave_pending(&path, 3);
    // Reopened with another item type: the old payloads (JSON numbers) are not strings.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let c: Conveyor<String> = Conveyor::builder()
        .journal(&path)
        .build(move |d: Delivery<String>| {
            log.lock().unwrap().push(d.item().clone());
            Ok(())
        })
        .unwrap();
    c.send("new".to_owned()).unwrap();
    c.flush();
    assert_eq!(*seen.lock().unwrap(), vec!["new".to_owned()]);
    let stats = c.stats();
    assert_eq!(
        (stats.accepted, stats.delivered, stats.failed),
        (4, 1, 3),
        "the items that cannot be decoded count as failed, not as nothing: {stats:?}"
    );
    let dead = c.dead_letters().unwrap();
    assert_eq!(
        dead.iter().map(|d| d.payload.clone()).collect::<Vec<_>>(),
        vec![b"0".to_vec(), b"1".to_vec(), b"2".to_vec()]
    );
    assert!(
        dead[0].error.contains("cannot be decoded"),
        "{}",
        dead[0].error
    );
}

/// Retrying a dead letter that no longer decodes used to fail with `JournalError::Encode`,
/// whose message sends the user to the item's `Serialize` implementation.
#[test]
fn retrying_a_dead_letter_that_no_longer_decodes_says_so_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    leave_pending(&path, 1);
    let c: Conveyor<String> = Conveyor::builder()
        .journal(&path)
        .build(|_d| Ok(()))
        .unwrap();
    c.flush();
    let seq = c.dead_letters().unwrap()[0].seq;
    let err = c.retry_dead(seq).unwrap_err();
    assert!(
        matches!(&err, JournalError::Undecodable { seq: s, .. } if *s == seq),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("cannot be decoded") && message.contains("discard_dead"),
        "the message says what is wrong and what to do: {message}"
    );
    assert!(
        !message.contains("Serialize"),
        "nothing to encode: {message}"
    );
    assert_eq!(c.dead_letters().unwrap()[0].seq, seq, "still a dead letter");
}

/// Leaves `items` pending in the journal at `path` as JSON values, each sent with its key when
/// one is given, as a crash would.
fn leave_pending_values(
    path: &Path,
    ordering: Ordering,
    items: &[(Option<&str>, serde_json::Value)],
) {
    let (c, gate) = stalled::<serde_json::Value>(path, ordering);
    for (key, item) in items {
        match key {
            Some(key) => c.send_keyed(*key, item.clone()).unwrap(),
            None => c.send(item.clone()).unwrap(),
        };
    }
    c.close_timeout(Duration::from_millis(50));
    drop(c);
    drop(gate);
}

/// A conveyor of `String`s on `path`, pausing on failure, whose sink records what it sees.
fn recording_strings(
    path: &Path,
    ordering: Ordering,
) -> (Arc<Mutex<Vec<String>>>, Conveyor<String>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let c = Conveyor::builder()
        .journal(path)
        .ordering(ordering)
        .on_failure(OnFailure::Pause)
        .build(move |d: Delivery<String>| {
            log.lock().unwrap().push(d.item().clone());
            Ok(())
        })
        .unwrap();
    (seen, c)
}

/// Under `OnFailure::Pause`, an item the journal holds that no longer decodes (the item type
/// changed) holds its lane where it stands, as a failing item does: what comes before it is
/// delivered, nothing after it overtakes it, and `resume` makes it a dead letter and goes on.
/// A build that decodes it again delivers it in its place, unasked.
#[test]
fn under_pause_an_item_that_no_longer_decodes_holds_its_lane_until_resume() {
    use serde_json::json;
    for ordering in [Ordering::Strict, Ordering::Pipelined { in_flight: 4 }] {
        // Pipelined calls start in order but may record themselves in another: compare the
        // items delivered before and after the pause as sets there.
        let calls = |seen: &Mutex<Vec<String>>| {
            let mut calls = seen.lock().unwrap().clone();
            if ordering != Ordering::Strict {
                calls.sort();
            }
            calls
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let items = [json!("a"), json!("b"), json!(5), json!("c")];
        leave_pending_values(&path, ordering, &items.map(|item| (None, item)));

        let (seen, c) = recording_strings(&path, ordering);
        c.send("new".to_owned()).unwrap();
        assert!(
            c.flush_timeout(Duration::from_secs(30)),
            "{ordering:?}: held items do not count"
        );
        assert_eq!(calls(&seen), ["a", "b"], "{ordering:?}");
        assert_eq!(c.paused(), [""], "{ordering:?}");
        let stats = c.stats();
        assert_eq!(
            (stats.accepted, stats.delivered, stats.failed, stats.queued),
            (5, 2, 0, 3),
            "{ordering:?}: {stats:?}"
        );
        drop(c);

        // Still held after a restart with the same item type.
        let (seen, c) = recording_strings(&path, ordering);
        assert!(c.flush_timeout(Duration::from_secs(30)));
        assert!(seen.lock().unwrap().is_empty(), "{ordering:?}");
        assert_eq!(c.paused(), [""], "{ordering:?}");
        assert!(c.resume(""));
        assert!(c.flush_timeout(Duration::from_secs(30)));
        assert_eq!(calls(&seen), ["c", "new"], "{ordering:?}");
        let dead = c.dead_letters().unwrap();
        assert_eq!(dead.len(), 1, "{ordering:?}");
        assert_eq!(dead[0].payload, b"5", "{ordering:?}");
        assert!(
            dead[0].error.contains("cannot be decoded"),
            "{}",
            dead[0].error
        );
        let stats = c.stats();
        assert_eq!(
            (stats.failed, stats.queued, stats.paused),
            (1, 0, 0),
            "{ordering:?}: {stats:?}"
        );
    }

    // Rolled back to a type that decodes it: delivered in its place.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    leave_pending_values(
        &path,
        Ordering::Strict,
        &[(None, json!("a")), (None, json!(5)), (None, json!("b"))],
    );
    drop(recording_strings(&path, Ordering::Strict));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let c: Conveyor<serde_json::Value> = Conveyor::builder()
        .journal(&path)
        .on_failure(OnFailure::Pause)
        .build(move |d: Delivery<serde_json::Value>| {
            log.lock().unwrap().push(d.item().clone());
            Ok(())
        })
        .unwrap();
    assert!(c.flush_timeout(Duration::from_secs(30)));
    assert_eq!(*seen.lock().unwrap(), [json!(5), json!("b")]);
    assert!(c.paused().is_empty());
}

/// An item that fails for good before one that no longer decodes pauses its lane for that
/// failure, holding the undecodable one with the rest: `flush` does not wait for it, `resume`
/// retries the failed item (it does not give the undecodable one up), and the lane pauses
/// again at the undecodable one.
#[test]
fn a_failure_before_an_item_that_no_longer_decodes_is_resumed_first() {
    use serde_json::json;
    for ordering in [Ordering::Strict, Ordering::Pipelined { in_flight: 4 }] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let items = [json!("a"), json!(5), json!("b")];
        leave_pending_values(&path, ordering, &items.map(|item| (None, item)));

        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let c: Conveyor<String> = Conveyor::builder()
            .journal(&path)
            .ordering(ordering)
            .on_failure(OnFailure::Pause)
            .build(move |d: Delivery<String>| {
                if d.item() == "a" && d.attempt() == 1 {
                    return Err(SinkError::permanent("refused once"));
                }
                log.lock().unwrap().push(d.item().clone());
                Ok(())
            })
            .unwrap();
        assert!(
            c.flush_timeout(Duration::from_secs(30)),
            "{ordering:?}: the paused lane holds the undecodable item too"
        );
        assert!(seen.lock().unwrap().is_empty(), "{ordering:?}");
        assert_eq!(c.paused(), [""], "{ordering:?}");
        assert!(c.resume(""), "{ordering:?}");
        assert!(c.flush_timeout(Duration::from_secs(30)), "{ordering:?}");
        assert_eq!(
            *seen.lock().unwrap(),
            ["a"],
            "{ordering:?}: the failed item again"
        );
        assert!(c.dead_letters().unwrap().is_empty(), "{ordering:?}");
        assert_eq!(
            c.paused(),
            [""],
            "{ordering:?}: held at the undecodable item"
        );
        assert!(c.resume(""), "{ordering:?}");
        assert!(c.flush_timeout(Duration::from_secs(30)), "{ordering:?}");
        assert_eq!(*seen.lock().unwrap(), ["a", "b"], "{ordering:?}");
        assert_eq!(c.dead_letters().unwrap()[0].payload, b"5", "{ordering:?}");
        let stats = c.stats();
        assert_eq!(
            (stats.delivered, stats.failed, stats.queued, stats.paused),
            (2, 1, 0, 0),
            "{ordering:?}: {stats:?}"
        );
    }
}

/// Giving an undecodable item up frees its room in the queue: a send waiting for room is woken.
#[test]
fn resume_giving_up_an_item_that_no_longer_decodes_wakes_a_send_waiting_for_room() {
    use std::future::Future;
    use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
    use std::task::{Context, Wake, Waker};

    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, AtomicOrdering::SeqCst);
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    leave_pending_values(&path, Ordering::Strict, &[(None, serde_json::json!(5))]);
    let c: Conveyor<String> = Conveyor::builder()
        .journal(&path)
        .capacity(1)
        .backpressure(Backpressure::Block)
        .on_failure(OnFailure::Pause)
        .build(|_d: Delivery<String>| Ok(()))
        .unwrap();
    assert!(c.flush_timeout(Duration::from_secs(30)), "replayed");
    assert_eq!(c.paused(), [""]);

    let flag = Arc::new(Flag(AtomicBool::new(false)));
    let waker = Waker::from(flag.clone());
    let mut send = std::pin::pin!(c.send_async("new".to_owned()));
    assert!(
        send.as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending(),
        "the held item fills the queue"
    );
    assert!(c.resume(""));
    assert!(
        flag.0.load(AtomicOrdering::SeqCst),
        "the waiting send was not woken"
    );
    assert!(send
        .as_mut()
        .poll(&mut Context::from_waker(&waker))
        .is_ready());
    assert!(c.flush_timeout(Duration::from_secs(30)));
    assert_eq!((c.stats().delivered, c.stats().failed), (1, 1));
}

/// Keyed: only the key of the item that no longer decodes is held.
#[test]
fn under_pause_an_item_that_no_longer_decodes_holds_only_its_key() {
    use serde_json::json;
    let keyed = Ordering::Keyed { concurrency: 2 };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    leave_pending_values(
        &path,
        keyed,
        &[
            (Some("k1"), json!("a")),
            (Some("k2"), json!(5)),
            (Some("k1"), json!("b")),
            (Some("k2"), json!("c")),
        ],
    );
    let (seen, c) = recording_strings(&path, keyed);
    c.send_keyed("k2", "new".to_owned()).unwrap();
    assert!(c.flush_timeout(Duration::from_secs(30)));
    assert_eq!(*seen.lock().unwrap(), ["a", "b"]);
    assert_eq!(c.paused(), ["k2"]);
    assert!(c.resume("k2"));
    assert!(c.flush_timeout(Duration::from_secs(30)));
    assert_eq!(*seen.lock().unwrap(), ["a", "b", "c", "new"]);
    assert_eq!(c.dead_letters().unwrap()[0].payload, b"5");
    assert!(c.paused().is_empty());
}

#[test]
fn dead_letters_are_kept_across_restarts_and_can_be_retried_or_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    {
        let c: Conveyor<u64> = Conveyor::builder()
            .journal(&path)
            .on_failure(OnFailure::Skip)
            .build(|d| match *d.item() {
                13 | 14 => Err(SinkError::permanent(format!("item {} refused", d.item()))),
                _ => Ok(()),
            })
            .unwrap();
        for i in 10..20 {
            c.send(i).unwrap();
        }
        c.flush();
        let dead = c.dead_letters().unwrap();
        assert_eq!(
            dead.iter().map(|d| d.payload.clone()).collect::<Vec<_>>(),
            vec![b"13".to_vec(), b"14".to_vec()]
        );
        assert_eq!(dead[0].error, "item 13 refused");
        assert_eq!(dead[0].attempts, 1);
    }
    let (seen, sink) = recorder();
    let c = Conveyor::builder().journal(&path).build(sink).unwrap();
    let dead = c.dead_letters().unwrap();
    assert_eq!(dead.len(), 2, "dead letters survive a restart");
    let receipt = c.retry_dead(dead[0].seq).unwrap();
    receipt.wait().unwrap();
    c.discard_dead(dead[1].seq).unwrap();
    assert!(matches!(
        c.discard_dead(dead[1].seq),
        Err(JournalError::NoSuchDeadLetter { .. })
    ));
    assert!(c.dead_letters().unwrap().is_empty());
    assert_eq!(
        seen.lock().unwrap().iter().map(|s| s.2).collect::<Vec<_>>(),
        vec![13]
    );
    assert!(
        seen.lock().unwrap()[0].0 > 10,
        "a retried dead letter gets a new seq"
    );
    drop(c);
    let status = Journal::open(&path).unwrap().status().unwrap();
    assert_eq!((status.pending, status.dead_letters), (0, 0));
}

#[test]
fn concurrent_operator_calls_on_one_dead_letter_act_once() {
    let dir = tempfile::tempdir().unwrap();
    let (seen, sink) = recorder();
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = failing.clone();
    let c = Arc::new(
        Conveyor::builder()
            .journal(dir.path().join("j"))
            .build(move |d: Delivery<u64>| {
                if f.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(SinkError::permanent("down"));
                }
                sink(d)
            })
            .unwrap(),
    );
    for round in 0..20u64 {
        failing.store(true, std::sync::atomic::Ordering::SeqCst);
        c.send(round).unwrap().wait().unwrap_err();
        failing.store(false, std::sync::atomic::Ordering::SeqCst);
        let seq = c.dead_letters().unwrap()[0].seq;
        // Four operators act on the same dead letter at once: two retry, two discard.
        let start = Arc::new(std::sync::Barrier::new(4));
        let calls: Vec<_> = (0..4)
            .map(|i| {
                let (c, start) = (c.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    if i % 2 == 0 {
                        c.retry_dead(seq).map(|r| r.wait().unwrap())
                    } else {
                        c.discard_dead(seq)
                    }
                })
            })
            .collect();
        let results: Vec<_> = calls.into_iter().map(|t| t.join().unwrap()).collect();
        let acted = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(acted, 1, "round {round}: {results:?}");
        assert!(results
            .iter()
            .all(|r| matches!(r, Ok(()) | Err(JournalError::NoSuchDeadLetter { .. }))));
        assert!(c.dead_letters().unwrap().is_empty());
    }
    c.flush();
    let delivered: Vec<u64> = seen.lock().unwrap().iter().map(|s| s.2).collect();
    let mut unique = delivered.clone();
    unique.dedup();
    assert_eq!(delivered, unique, "a dead letter was sent again twice");
}

/// Leaves the journal at `path` with key "bad" paused by its item 1 (error "503"), holding items
/// 1 and 2, after item 3 of key "good" was delivered.
fn pause_key_bad(path: &Path, keyed: Ordering) {
    let c: Conveyor<u64> = Conveyor::builder()
        .journal(path)
        .ordering(keyed)
        .on_failure(OnFailure::Pause)
        .build(|d| {
            if d.key() == Some("bad") {
                Err(SinkError::permanent("503"))
            } else {
                Ok(())
            }
        })
        .unwrap();
    c.send_keyed("bad", 1).unwrap();
    c.send_keyed("bad", 2).unwrap();
    c.send_keyed("good", 3).unwrap();
    c.flush();
    assert_eq!(c.paused(), vec!["bad".to_owned()]);
}

#[test]
fn paused_lanes_stay_paused_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let keyed = Ordering::Keyed { concurrency: 2 };
    pause_key_bad(&path, keyed);
    let status = Journal::open(&path).unwrap().status().unwrap();
    let bad = status.lanes.iter().find(|l| l.lane == "bad").unwrap();
    assert_eq!((bad.pending, bad.paused.as_deref()), (2, Some("503")));

    let (seen, c) = recording(&path, keyed);
    c.send_keyed("good", 4).unwrap();
    c.flush();
    assert_eq!(
        c.paused(),
        vec!["bad".to_owned()],
        "the pause is remembered"
    );
    assert_eq!(
        seen.lock().unwrap().iter().map(|s| s.2).collect::<Vec<_>>(),
        vec![4]
    );
    assert!(c.resume("bad"));
    c.flush();
    assert_eq!(
        seen.lock().unwrap().iter().map(|s| s.2).collect::<Vec<_>>(),
        vec![4, 1, 2]
    );
    drop(c);
    let status = Journal::open(&path).unwrap().status().unwrap();
    assert_eq!(status.pending, 0);
    assert!(status.lanes.is_empty(), "{status:?}");
}

/// A conveyor on `path` with `ordering` whose sink records what it sees, or the build error.
fn try_recording(path: &Path, ordering: Ordering) -> Result<(Seen, Conveyor<u64>), BuildError> {
    let (seen, sink) = recorder();
    let c = Conveyor::builder()
        .journal(path)
        .ordering(ordering)
        .build(sink)?;
    Ok((seen, c))
}

#[test]
fn a_keyed_journal_holding_a_pause_is_refused_by_strict_and_pipelined_ordering() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let keyed = Ordering::Keyed { concurrency: 2 };
    pause_key_bad(&path, keyed);
    let before = Journal::open(&path).unwrap().status().unwrap();
    assert_eq!(before.keyed, Some(true));

    for other in [Ordering::Strict, Ordering::Pipelined { in_flight: 2 }] {
        let err = match try_recording(&path, other) {
            Ok((seen, _c)) => panic!(
                "{other:?} opened a keyed journal holding a paused key, and sent {:?}",
                seen.lock().unwrap()
            ),
            Err(err) => err,
        };
        match &err {
            BuildError::Journal(JournalError::OtherOrdering {
                written,
                pending,
                paused,
                ..
            }) => assert_eq!((written.as_str(), *pending, *paused), ("keyed", 2, 1)),
            other => panic!("expected OtherOrdering, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string())
                && msg.contains("open it with keyed ordering")
                && msg.contains("another journal file"),
            "the message names the file, the ordering it needs and the way out: {msg}"
        );
        let after = Journal::open(&path).unwrap().status().unwrap();
        assert_eq!(
            (&after.lanes, after.last_seq, after.keyed),
            (&before.lanes, before.last_seq, before.keyed),
            "a refused journal is left as it was"
        );
    }

    // With its own ordering it delivers the held items once resumed; empty, it may switch.
    let (seen, c) = recording(&path, keyed);
    assert_eq!(c.paused(), vec!["bad".to_owned()]);
    assert!(c.resume("bad"));
    c.flush();
    assert_eq!(
        seen.lock().unwrap().iter().map(|s| s.2).collect::<Vec<_>>(),
        vec![1, 2]
    );
    drop(c);
    let (seen, c) = recording(&path, Ordering::Strict);
    c.send(4).unwrap();
    c.flush();
    assert!(c.paused().is_empty());
    assert_eq!(
        seen.lock().unwrap().iter().map(|s| s.2).collect::<Vec<_>>(),
        vec![4]
    );
    drop(c);
    let status = Journal::open(&path).unwrap().status().unwrap();
    assert_eq!(
        (status.keyed, status.pending, status.lanes.len()),
        (Some(false), 0, 0)
    );
}

#[test]
fn a_strict_journal_holding_items_is_refused_by_keyed_ordering() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    leave_pending(&path, 3);
    let err = try_recording(&path, Ordering::Keyed { concurrency: 2 })
        .expect_err("a keyed conveyor must not take over a strict journal's items");
    assert!(
        matches!(
            &err,
            BuildError::Journal(JournalError::OtherOrdering { written, opened, pending: 3, paused: 0, .. })
                if written == "strict" && opened == "keyed"
        ),
        "{err:?}"
    );
    // Pipelined ordering has one lane too: it delivers them.
    let (seen, c) = recording(&path, Ordering::Pipelined { in_flight: 1 });
    c.flush();
    assert_eq!(
        seen.lock().unwrap().iter().map(|s| s.2).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
}

#[test]
fn a_journal_of_another_kind_is_refused_while_it_holds_anything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let open = |kind: &str| {
        Conveyor::<u64>::builder()
            .journal(&path)
            .journal_kind(kind)
            .build(|d| {
                if *d.item() == 13 {
                    Err(SinkError::permanent("unlucky"))
                } else {
                    Ok(())
                }
            })
    };
    let c = open("numbers").unwrap();
    c.send(13).unwrap();
    assert!(c.close().drained);
    drop(c);
    let err = open("lines").unwrap_err();
    match &err {
        BuildError::Journal(JournalError::OtherKind {
            written, opened, ..
        }) => assert_eq!((written.as_str(), opened.as_str()), ("numbers", "lines")),
        other => panic!("expected OtherKind, got {other:?}"),
    }
    assert!(err.to_string().contains("another journal file"), "{err}");
    assert_eq!(
        Journal::open(&path).unwrap().status().unwrap().dead_letters,
        1
    );
    // Its own kind opens it; once it holds nothing, another kind may take it over.
    let c = open("numbers").unwrap();
    let dead = c.dead_letters().unwrap();
    c.discard_dead(dead[0].seq).unwrap();
    drop(c);
    let c = open("lines").expect("an empty journal takes the new kind");
    drop(c);
    assert!(
        open("numbers").is_ok(),
        "it holds nothing: the old kind may take it back"
    );
}

#[test]
fn a_second_conveyor_on_the_same_journal_is_refused_with_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let (_seen, sink) = recorder();
    let first = Conveyor::builder().journal(&path).build(sink).unwrap();
    let (_seen, sink) = recorder();
    let err = Conveyor::builder().journal(&path).build(sink).unwrap_err();
    match &err {
        BuildError::Journal(JournalError::Locked { pid: Some(pid), .. }) => {
            assert_eq!(*pid, std::process::id())
        }
        other => panic!("expected a lock error, got {other:?}"),
    }
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    drop(first);
    let (_seen, sink) = recorder();
    let again = Conveyor::builder().journal(&path).build(sink);
    assert!(
        again.is_ok(),
        "free again once the first is dropped: {:?}",
        again.err()
    );
}

#[test]
fn a_damaged_journal_fails_the_build_with_its_name_and_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.journal");
    // A SQLite header, then garbage where the database's own header and pages should be.
    let mut garbage = b"SQLite format 3\0".to_vec();
    garbage.extend(b"\x00\x01 not a database, maybe half a disk block \xff".repeat(100));
    std::fs::write(&path, &garbage).unwrap();
    let (_seen, sink) = recorder();
    let err = Conveyor::builder().journal(&path).build(sink).unwrap_err();
    assert!(
        matches!(err, BuildError::Journal(JournalError::Corrupt { .. })),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("move it aside"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        garbage,
        "never truncated or reset"
    );
}

#[test]
fn the_cursor_is_kept_with_the_items_sent_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    {
        let (_seen, sink) = recorder();
        let c = Conveyor::builder().journal(&path).build(sink).unwrap();
        assert_eq!(c.cursor().unwrap(), None);
        c.send(1).unwrap();
        c.set_cursor(1).unwrap();
        c.send(2).unwrap();
        c.set_cursor(2).unwrap();
        assert_eq!(c.cursor().unwrap(), Some(2));
    }
    let (_seen, sink) = recorder();
    let c = Conveyor::builder().journal(&path).build(sink).unwrap();
    assert_eq!(c.cursor().unwrap(), Some(2));
    let (_seen, sink) = recorder();
    let plain = Conveyor::builder().build(sink).unwrap();
    assert!(matches!(plain.cursor(), Err(JournalError::NoJournal)));
}

#[test]
fn every_send_variant_stores_its_cursor_with_the_item() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    {
        let (c, gate) = stalled(&path, Ordering::Keyed { concurrency: 2 });
        let mut cursors = Vec::new();
        let mut check = |sent: Result<conveyor::Receipt<()>, SendError<u64>>, cursor| {
            let receipt = sent.unwrap();
            assert_eq!(c.cursor().unwrap(), Some(cursor));
            cursors.push((receipt.seq(), cursor));
        };
        check(c.send_and_set_cursor(1, 10), 10);
        check(c.send_keyed_and_set_cursor("k", 2, 20), 20);
        check(c.try_send_and_set_cursor(3, 30), 30);
        check(c.try_send_keyed_and_set_cursor("k", 4, 40), 40);
        check(rt.block_on(c.send_async_and_set_cursor(5, 50)), 50);
        check(
            rt.block_on(c.send_keyed_async_and_set_cursor("k", 6, 60)),
            60,
        );
        assert_eq!(
            cursors.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6]
        );
        // Closed while its sink calls still wait: every item stays pending.
        drop(c);
        drop(gate);
    }
    let (seen, c) = recording(&path, Ordering::Keyed { concurrency: 2 });
    assert_eq!(c.cursor().unwrap(), Some(60));
    c.flush();
    let mut items: Vec<u64> = seen.lock().unwrap().iter().map(|s| s.2).collect();
    items.sort_unstable();
    assert_eq!(items, [1, 2, 3, 4, 5, 6]);
}

#[test]
fn set_cursor_after_close_is_refused_rather_than_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let (_seen, c) = recording(&path, Ordering::Strict);
    c.send_and_set_cursor(1, 1).unwrap();
    c.close();
    assert!(matches!(c.set_cursor(2), Err(JournalError::Closed { .. })));
    drop(c);
    let (_seen, reopened) = recording(&path, Ordering::Strict);
    assert_eq!(reopened.cursor().unwrap(), Some(1));
}

/// An item a drop policy drops has a settled fate (dropped, counted): a rerun that resumes at
/// the cursor must not send it again.
#[test]
fn an_item_dropped_by_policy_still_moves_the_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let (gate_tx, gate) = mpsc::channel::<()>();
    let (started_tx, started) = mpsc::channel::<()>();
    let (gate, started_tx) = (Mutex::new(gate), Mutex::new(started_tx));
    let c = Conveyor::builder()
        .journal(&path)
        .capacity(1)
        .backpressure(Backpressure::DropNewest)
        .build(move |_d: Delivery<u64>| {
            let _ = started_tx.lock().unwrap().send(());
            let _ = gate.lock().unwrap().recv();
            Ok(())
        })
        .unwrap();
    c.send_and_set_cursor(1, 1).unwrap();
    started.recv().unwrap(); // item 1 is in its sink call
    c.send_and_set_cursor(2, 2).unwrap(); // queued: the queue is full
    let mut dropped = c.send_and_set_cursor(3, 3).unwrap();
    assert!(matches!(
        dropped.wait_timeout(Duration::ZERO),
        Some(Err(DeliveryError::Dropped))
    ));
    assert_eq!(c.cursor().unwrap(), Some(3));
    drop(gate_tx);
}

#[test]
fn sync_durability_with_many_producers_delivers_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let (seen, sink) = recorder();
    let c = Arc::new(
        Conveyor::builder()
            .journal(&path)
            .durability(Durability::Sync)
            .ordering(Ordering::Keyed { concurrency: 8 })
            .build(sink)
            .unwrap(),
    );
    let producers: Vec<_> = (0..8u64)
        .map(|p| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    c.send_keyed(format!("p{p}"), p * 1000 + i).unwrap();
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    c.flush();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1600);
    for p in 0..8u64 {
        let items: Vec<u64> = seen
            .iter()
            .filter(|s| s.1.as_deref() == Some(&format!("p{p}")))
            .map(|s| s.2)
            .collect();
        assert_eq!(items, (0..200).map(|i| p * 1000 + i).collect::<Vec<_>>());
    }
}

/// A tmpfs of `size` mounted on a fresh directory for the test's duration (the test runs as
/// root, like CI here: a real "disk full" needs a small file system).
struct TinyDisk {
    dir: tempfile::TempDir,
}

impl TinyDisk {
    fn new(size: &str) -> TinyDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root (as CI has)"
        );
        TinyDisk { dir }
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_full_disk_makes_send_fail_with_the_item_and_keeps_what_was_accepted() {
    let disk = TinyDisk::new("1m");
    // Ballast, removed later to play the operator who frees space.
    let ballast = disk.dir.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; 512 * 1024]).unwrap();
    let path = disk.dir.path().join("j");
    let (c, gate) = stalled(&path, Ordering::Strict);
    let big = |i: u64| i * 1_000_000_007; // small JSON payloads; a few thousand fill the disk
    let mut accepted = 0u64;
    let mut refused = None;
    for i in 0..200_000u64 {
        match c.send(big(i)) {
            Ok(_) => accepted += 1,
            Err(SendError::Journal(item)) => {
                refused = Some((i, item));
                break;
            }
            Err(other) => panic!("unexpected {other}"),
        }
        if i % 100 == 99 {
            // Let the writer catch up (reading the cursor commits what is queued), so what is
            // accepted but not yet committed when the disk fills stays small enough to fit
            // once space is freed.
            let _ = c.cursor();
        }
    }
    let (i, item) = refused.expect("the journal never reported the full disk");
    assert_eq!(item, big(i), "the refused item is handed back");
    let cause = c.journal_error().expect("the cause is available");
    assert!(matches!(*cause, JournalError::DiskFull { .. }), "{cause}");
    assert!(cause.to_string().contains("disk is full"), "{cause}");

    // Space comes back: the writer's retry commits what was accepted, sends work again.
    std::fs::remove_file(&ballast).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while c.journal_error().is_some() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(e) = c.journal_error() {
        panic!("the journal did not recover once space was freed: {e}");
    }
    c.send(item).unwrap();
    accepted += 1;
    drop(c);
    drop(gate);
    let status = Journal::open(&path).unwrap().status().unwrap();
    assert_eq!(
        status.pending, accepted,
        "every accepted item is in the journal: {status:?}"
    );
}

/// With a journal and `DropNewest`, dropped items use up seqs that are never appended, so the
/// writer never extends the reserved seq range: once 65,536 seqs were dropped, `is_full` stays
/// true forever and every later item is dropped even with an empty queue.
#[test]
fn drop_newest_with_a_journal_keeps_accepting_after_many_drops() {
    let dir = tempfile::tempdir().unwrap();
    let (gate_tx, gate) = std::sync::mpsc::channel::<()>();
    let gate = std::sync::Mutex::new(gate);
    let c: Conveyor<u64> = Conveyor::builder()
        .journal(dir.path().join("j"))
        .capacity(1)
        .backpressure(conveyor::Backpressure::DropNewest)
        .build(move |d: Delivery<u64>| {
            if *d.item() == 0 {
                let _ = gate.lock().unwrap().recv();
            }
            Ok(())
        })
        .unwrap();
    c.send(0).unwrap(); // in flight, stalls
    while c.stats().in_flight == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    for i in 1..70_000u64 {
        let _ = c.send(i); // queue full: 1 queued, the rest dropped
    }
    drop(gate_tx); // the sink recovers
    c.flush();
    assert_eq!(c.stats().queued, 0);
    let r = c.send(1_000_000).unwrap();
    assert!(
        r.wait().is_ok(),
        "the queue is empty, yet the item was dropped: {:?}",
        c.stats()
    );
}

/// A send under `DropOldest` while the journal is replayed evicts an old (replayed) item
/// and then drops the new one as well (`is_full` stays true while replaying); nobody wakes the
/// replay thread for the room the eviction made, so it stalls and `flush` hangs; and the evicted
/// item's settlement is never journaled, so the next start delivers it again, after later items
/// of its lane.
#[test]
fn drop_oldest_during_replay_never_evicts_replayed_items() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    {
        let (gate_tx, gate) = std::sync::mpsc::channel::<()>();
        let gate = std::sync::Mutex::new(gate);
        let c: Conveyor<u64> = Conveyor::builder()
            .journal(&path)
            .drain_timeout(Duration::from_millis(50))
            .build(move |_d| {
                let _ = gate.lock().unwrap().recv();
                Err(SinkError::permanent("stopped"))
            })
            .unwrap();
        for i in 1..=5 {
            c.send(i).unwrap();
        }
        // The sink is stalled: the flush gives up, as intended.
        let _ = c.flush_timeout(Duration::from_millis(50));
        drop(c); // 5 items stay pending in the journal
        drop(gate_tx);
    }
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (flushed_during_replay, dropped);
    {
        let log = seen.clone();
        let c: Conveyor<u64> = Conveyor::builder()
            .journal(&path)
            .capacity(1)
            .backpressure(conveyor::Backpressure::DropOldest)
            .build(move |d| {
                std::thread::sleep(Duration::from_millis(150));
                log.lock().unwrap().push(*d.item());
                Ok(())
            })
            .unwrap();
        // Item 1 in flight, item 2 queued, the replay waits for room.
        std::thread::sleep(Duration::from_millis(50));
        let _ = c.send(100); // during replay
        flushed_during_replay = c.flush_timeout(Duration::from_secs(30));
        dropped = c.stats().dropped;
        drop(c);
    }
    let first: Vec<u64> = seen.lock().unwrap().clone();
    seen.lock().unwrap().clear();
    {
        let log = seen.clone();
        let c: Conveyor<u64> = Conveyor::builder()
            .journal(&path)
            .build(move |d| {
                log.lock().unwrap().push(*d.item());
                Ok(())
            })
            .unwrap();
        c.flush();
    }
    let second: Vec<u64> = seen.lock().unwrap().clone();
    assert!(
        flushed_during_replay && dropped <= 1,
        "the eviction woke nobody: the replay stalls and flush hangs ({dropped} dropped for one send)"
    );
    assert!(
        second.is_empty(),
        "first restart delivered {first:?}, the next one delivers {second:?} again, \
         after later items of the same lane"
    );
}

/// An async-sink conveyor built inside a current-thread runtime, on a journal
/// left with `pending` items (so it starts by replaying them).
fn replaying_on_this_runtime(pending: u64, capacity: usize) -> (tempfile::TempDir, Conveyor<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let (c, release) = stalled(&path, Ordering::Strict);
    for i in 0..pending {
        c.send(i).unwrap();
    }
    drop(c); // the drain deadline passes: everything stays pending
    drop(release);
    let c = Conveyor::builder()
        .journal(&path)
        .capacity(capacity)
        .build_async(|_d: Delivery<u64>| async { Ok(()) })
        .unwrap();
    (dir, c)
}

#[tokio::test(flavor = "current_thread")]
async fn a_send_waiting_for_a_replay_that_needs_no_worker_waits() {
    // The whole backlog fits in the capacity: the replay finishes on its own thread.
    let (_dir, c) = replaying_on_this_runtime(20_000, 100_000);
    let receipt = c.send(1).unwrap();
    c.flush_async().await;
    assert_eq!(c.stats().delivered, 20_001);
    receipt.await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_send_waiting_for_a_replay_that_needs_the_workers_waits() {
    // The replay stops at the capacity until workers make room; they run on the conveyor's own
    // runtime, so a blocking send on this runtime's thread may wait for them.
    let (_dir, c) = replaying_on_this_runtime(5_000, 100);
    let receipt = c.send(1).unwrap();
    c.flush();
    assert_eq!(c.stats().delivered, 5_001);
    receipt.await.unwrap();
}

#[test]
fn a_retry_waiting_for_room_does_not_hold_up_other_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let (release, gate) = mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let c = Arc::new(
        Conveyor::builder()
            .journal(dir.path().join("j"))
            .capacity(1)
            .build(move |d: Delivery<u64>| {
                if *d.item() < 2 {
                    return Err(SinkError::permanent("refused"));
                }
                let _ = gate.lock().unwrap().recv(); // stuck until released
                Ok(())
            })
            .unwrap(),
    );
    for i in 0..2 {
        c.send(i).unwrap().wait().unwrap_err();
    }
    let dead: Vec<u64> = c.dead_letters().unwrap().iter().map(|d| d.seq).collect();
    c.send(2).unwrap(); // in flight, stuck
    while c.stats().in_flight == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    c.send(3).unwrap(); // the queue is full
    let retry = {
        let c = c.clone();
        let seq = dead[0];
        std::thread::spawn(move || c.retry_dead(seq).map(|r| r.seq()))
    };
    // The retry has claimed its dead letter and now waits for room.
    while c.dead_letters().unwrap().len() == 2 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (done_tx, done) = mpsc::channel();
    let discard = {
        let (c, seq) = (c.clone(), dead[1]);
        std::thread::spawn(move || done_tx.send(c.discard_dead(seq)).unwrap())
    };
    let discarded = done.recv_timeout(Duration::from_secs(30));
    drop(release);
    discard.join().unwrap();
    assert!(
        matches!(discarded, Ok(Ok(()))),
        "the discard waited for the retry's room: {discarded:?}"
    );
    let retried = retry.join().unwrap().unwrap();
    c.flush();
    // The retried item failed again (the sink refuses it): a new dead letter, under its new seq.
    let left: Vec<u64> = c.dead_letters().unwrap().iter().map(|d| d.seq).collect();
    assert_eq!(left, vec![retried]);
}

const WAIT_CHILD: &str = "CONVEYOR_WAIT_COMMITTED_CHILD";
/// How the child ends: "wait" for item 7 to be committed, "fail" it and wait, or "none".
const WAIT_MODE: &str = "CONVEYOR_WAIT_COMMITTED_MODE";

/// The child of `wait_committed_puts_an_item_on_disk_before_its_window_ends`, under a window
/// far longer than the test. Item 1 is taken by the worker (and so committed first: nothing
/// reaches the sink before it is on disk) and held in the sink; item 7 queues behind it, so
/// nothing but `wait_committed` commits it. In mode "fail" item 7 is the first item, and the
/// sink fails it. Then the child dies at once, as under `kill -9`.
#[test]
fn wait_committed_child() {
    let Some(dir) = std::env::var_os(WAIT_CHILD) else {
        return; // run as a test of its own: nothing to do
    };
    let mode = std::env::var(WAIT_MODE).unwrap();
    let (taken, took) = mpsc::channel();
    let taken = Mutex::new(taken);
    let c: Conveyor<u64> = Conveyor::builder()
        .journal(Path::new(&dir).join("j"))
        .durability(Durability::Batched(Duration::from_secs(600)))
        .build(move |d: Delivery<u64>| {
            if *d.item() == 7 {
                return Err(SinkError::permanent("refused"));
            }
            taken.lock().unwrap().send(()).unwrap();
            // Never settles: the item stays pending until the abort.
            std::thread::sleep(Duration::from_secs(3600));
            Ok(())
        })
        .unwrap();
    if mode != "fail" {
        c.send(1).unwrap();
        took.recv().unwrap();
    }
    let mut receipt = c.send(7).unwrap();
    if mode == "fail" {
        assert!(matches!(
            receipt.wait_timeout(Duration::from_secs(120)),
            Some(Err(DeliveryError::Failed { .. }))
        ));
    }
    if mode != "none" {
        assert!(c.wait_committed(&receipt, Duration::from_secs(120)));
    }
    std::process::abort();
}

#[test]
fn wait_committed_puts_an_item_on_disk_before_its_window_ends() {
    let after_crash = |mode: &str| {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "wait_committed_child", "--nocapture"])
            .env(WAIT_CHILD, dir.path())
            .env(WAIT_MODE, mode)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(!status.success(), "the child dies by abort");
        let status = Journal::open(dir.path().join("j"))
            .unwrap()
            .status()
            .unwrap();
        (status.pending, status.dead_letters)
    };
    assert_eq!(
        after_crash("wait"),
        (2, 0),
        "item 7, waited for, is on disk"
    );
    // Without the wait, the 600 s window had not ended: the same crash loses item 7, which is
    // what makes the first assertion mean something.
    assert_eq!(after_crash("none"), (1, 0));
    // A failed item is on disk too (its append was committed before its attempt), pending or
    // as a dead letter: the wait said so, and a crash must not lose it.
    let (pending, dead) = after_crash("fail");
    assert_eq!(pending + dead, 1, "the failed item survives the crash");
}

#[test]
fn wait_committed_returns_at_once_without_a_journal_or_for_a_settled_item() {
    let dir = tempfile::tempdir().unwrap();
    let (_seen, c) = recording(&dir.path().join("j"), Ordering::Strict);
    let receipt = c.send(1).unwrap();
    c.flush();
    assert!(c.wait_committed(&receipt, Duration::ZERO));
    let plain: Conveyor<u64> = Conveyor::builder().build(|_d| Ok(())).unwrap();
    let receipt = plain.send(1).unwrap();
    assert!(plain.wait_committed(&receipt, Duration::ZERO));
}

/// After `close`, the writer is gone: a resume would be dropped unseen, so it is refused, and
/// the journal still holds the pause for the next start (or `Journal::resume`).
#[test]
fn resume_after_close_is_refused_and_the_pause_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let c: Conveyor<u32> = Conveyor::builder()
        .journal(&path)
        .on_failure(OnFailure::Pause)
        .build(|_d| Err(SinkError::permanent("down")))
        .unwrap();
    c.send(1).unwrap();
    c.flush();
    assert_eq!(c.paused(), vec![String::new()]);
    c.close();
    assert!(!c.resume(""), "a resume after close would be lost");
    let status = Journal::open(&path).unwrap().status().unwrap();
    assert!(
        status.lanes.iter().any(|l| l.paused.is_some()),
        "{status:?}"
    );
}

/// `retry_dead` from inside the conveyor's own sink, on a full queue that only that sink's
/// worker could make room in, is refused with an error that says so, and the dead letter stays
/// (the wait for room used to be endless).
#[test]
fn retry_dead_from_inside_the_sink_on_a_full_queue_does_not_wait_for_itself() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let me: Arc<std::sync::OnceLock<Arc<Conveyor<u64>>>> = Arc::default();
    let myself = me.clone();
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let c = Arc::new(
        Conveyor::builder()
            .journal(&path)
            .capacity(1)
            .build(move |d: Delivery<u64>| match *d.item() {
                1 => Err(SinkError::permanent("refused")),
                2 => {
                    let c = myself.get().unwrap();
                    let dead = c.dead_letters().unwrap();
                    c.send(3).unwrap(); // fills the queue
                    let retried = c.retry_dead(dead[0].seq).map(|r| r.seq());
                    tx.lock().unwrap().send(retried).unwrap();
                    Ok(())
                }
                _ => Ok(()),
            })
            .unwrap(),
    );
    me.set(c.clone()).ok();
    c.send(1).unwrap().wait().unwrap_err();
    c.send(2).unwrap();
    let retried = rx.recv_timeout(Duration::from_secs(30)).expect("came back");
    assert!(
        matches!(retried, Err(JournalError::WouldWaitForItself { .. })),
        "{retried:?}"
    );
    assert!(c.flush_timeout(Duration::from_secs(30)));
    let dead = c.dead_letters().unwrap();
    assert_eq!(dead.len(), 1, "the dead letter stays for a later retry");
    assert!(
        c.retry_dead(dead[0].seq).unwrap().wait().is_err(),
        "item 1 still fails"
    );
}

/// Another program's keyed journal opened in strict ordering: refused for its kind, the reason
/// that holds whatever the ordering (a refusal for the ordering would send the user to a keyed
/// reopen, only to be refused again).
#[test]
fn another_kinds_journal_is_refused_for_its_kind_before_its_ordering() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let (c, _stall) = {
        let (tx, rx) = mpsc::channel::<()>();
        let rx = Mutex::new(rx);
        let c: Conveyor<u64> = Conveyor::builder()
            .journal(&path)
            .journal_kind("cli")
            .ordering(Ordering::Keyed { concurrency: 2 })
            .drain_timeout(Duration::from_millis(100))
            .build(move |_d| {
                let _ = rx.lock().unwrap().recv();
                Ok(())
            })
            .unwrap();
        (c, tx)
    };
    c.send_keyed("u1", 1).unwrap();
    drop(c); // the item stays pending
    let err = Conveyor::<u64>::builder()
        .journal(&path)
        .journal_kind("python")
        .build(|_d| Ok(()))
        .unwrap_err();
    assert!(
        matches!(err, BuildError::Journal(JournalError::OtherKind { .. })),
        "{err:?}"
    );
}

/// An item whose `Serialize` fails for `0`, as serde_json fails for a map with non-string keys.
#[derive(Debug, PartialEq, serde::Deserialize)]
struct Picky(u32);

impl serde::Serialize for Picky {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.0 == 0 {
            return Err(serde::ser::Error::custom("zero cannot be journaled"));
        }
        serializer.serialize_u32(self.0)
    }
}

type PickySent = Result<conveyor::Receipt<u32>, SendError<Picky>>;

/// An item that cannot be encoded is the caller's mistake, not the journal's: the error used
/// to be `SendError::Journal`, whose message sends the user to `journal_error()` (which is
/// `None`) and says to retry (which fails the same way for ever), while the reason went only
/// to the log.
#[test]
fn an_item_that_cannot_be_encoded_is_refused_with_the_encoders_reason() {
    let dir = tempfile::tempdir().unwrap();
    let c: Conveyor<Picky, u32> = Conveyor::builder()
        .journal(dir.path().join("j"))
        .build(|d: Delivery<Picky>| Ok(d.item().0))
        .unwrap();
    let sends: [&dyn Fn(Picky) -> PickySent; 3] =
        [&|item| c.send(item), &|item| c.try_send(item), &|item| {
            tokio_block_on(c.send_async(item))
        }];
    for send in sends {
        match send(Picky(0)) {
            Err(SendError::Encode { item, reason }) => {
                assert_eq!(item, Picky(0), "the refused item is handed back");
                assert!(reason.contains("zero cannot be journaled"), "{reason}");
            }
            other => panic!("expected SendError::Encode, got {other:?}"),
        }
    }
    let message = c.send(Picky(0)).unwrap_err().to_string();
    assert!(
        message.contains("zero cannot be journaled") && message.contains("Serialize"),
        "the message gives the reason and what to fix: {message}"
    );
    assert!(
        !message.contains("journal_error"),
        "nothing there to see: {message}"
    );
    assert!(c.journal_error().is_none(), "the journal itself is fine");
    assert_eq!(c.send(Picky(7)).unwrap().wait().unwrap(), 7);
    assert_eq!(
        c.close().stats.accepted,
        1,
        "only the encodable item was accepted"
    );
}

fn tokio_block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(future)
}

/// A commit window too long for the clock (`Duration::MAX`, a front's "forever") commits only
/// when asked to (a flush, the close), instead of panicking the journal's writer, after which
/// nothing would ever be delivered.
#[test]
fn a_commit_window_too_long_for_the_clock_commits_when_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let (seen, sink) = recorder();
    let c: Conveyor<u64> = Conveyor::builder()
        .journal(&path)
        .durability(Durability::Batched(Duration::MAX))
        .build(sink)
        .unwrap();
    for i in 0..3 {
        c.send(i).unwrap();
    }
    assert!(
        c.flush_timeout(Duration::from_secs(60)),
        "{:?}",
        c.journal_error()
    );
    let items: Vec<u64> = seen.lock().unwrap().iter().map(|s| s.2).collect();
    assert_eq!(items, [0, 1, 2]);
    assert_eq!(c.close_timeout(Duration::from_secs(60)).left, 0);
    let status = Journal::open_read_only(&path).unwrap().status().unwrap();
    assert_eq!(status.pending, 0, "{status:?}");
}
