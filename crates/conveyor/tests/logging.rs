//! What the engine logs or journals about a failure runs user code (the error's `Display`),
//! and a subscriber's writing: none of it may happen under the engine's locks. A restart logs
//! the lanes a journal keeps paused.
//!
//! A binary of its own: the subscriber installed here is process-wide, since the workers
//! log on their own threads.

mod common;

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Mutex, Once, OnceLock, PoisonError};
use std::time::Duration;

use common::in_time;
use conveyor::{Conveyor, Delivery, OnFailure, Ordering, Retry, SinkError};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Formats every field of every event, as a real subscriber writing logs would.
struct Formatting;

struct Format(String);

impl Visit for Format {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0 += &format!("{field}={value:?} ");
    }
}

impl Subscriber for Formatting {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut line = Format(String::new());
        event.record(&mut line);
        // Not poisoned by a failing test's panic: the other tests log on.
        EVENTS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(line.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// Every event logged, formatted.
static EVENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The conveyors under test, reachable from the error's `Display`.
static LOGGED: OnceLock<Conveyor<u64>> = OnceLock::new();
static JOURNALED: OnceLock<Conveyor<u64>> = OnceLock::new();
/// How often the error was displayed.
static DISPLAYED: AtomicU64 = AtomicU64::new(0);

fn subscribe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| tracing::subscriber::set_global_default(Formatting).unwrap());
}

/// A sink error whose `Display` asks both conveyors for their stats, as an error type that
/// reports context might: under the state lock, that would deadlock the worker.
#[derive(Debug)]
struct Curious;

impl fmt::Display for Curious {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        DISPLAYED.fetch_add(1, AtomicOrdering::Relaxed);
        let stats = [&LOGGED, &JOURNALED].map(|c| c.get().map(|c| c.stats().accepted));
        write!(f, "busy (accepted: {stats:?})")
    }
}

impl std::error::Error for Curious {}

#[test]
fn a_retried_error_is_displayed_outside_the_engine_locks() {
    subscribe();
    let c = LOGGED.get_or_init(|| {
        Conveyor::builder()
            .retry(Retry::exponential(Duration::from_millis(1)).max_attempts(3))
            .build(|d: Delivery<u64>| {
                if d.attempt() < 3 {
                    Err(SinkError::retryable(Curious))
                } else {
                    Ok(())
                }
            })
            .unwrap()
    });
    let mut receipt = c.send(1).unwrap();
    let outcome = receipt.wait_timeout(Duration::from_secs(10));
    assert!(
        matches!(outcome, Some(Ok(()))),
        "the worker got stuck: {outcome:?}"
    );
    assert!(
        DISPLAYED.load(AtomicOrdering::Relaxed) >= 2,
        "each retry was logged"
    );
}

#[test]
fn a_journaled_failure_is_displayed_outside_the_engine_locks() {
    subscribe();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("failures.journal");
    let c = JOURNALED.get_or_init(|| {
        Conveyor::builder()
            .journal(&path)
            .build(|_d: Delivery<u64>| Err(SinkError::permanent(Curious)))
            .unwrap()
    });
    let mut receipt = c.send(1).unwrap();
    let outcome = receipt.wait_timeout(Duration::from_secs(10));
    assert!(
        matches!(outcome, Some(Err(_))),
        "the worker got stuck: {outcome:?}"
    );
    assert!(c.flush_timeout(Duration::from_secs(10)));
    let dead = c.dead_letters().unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].error.starts_with("busy (accepted: "),
        "{}",
        dead[0].error
    );
}

static PAUSED: OnceLock<Conveyor<u64>> = OnceLock::new();
/// How often the pausing error was displayed, and dropped.
static PAUSE_DISPLAYED: AtomicU64 = AtomicU64::new(0);
static PAUSE_DROPPED: AtomicU64 = AtomicU64::new(0);

/// A sink error whose drop asks the conveyor for its stats, as an error holding a handle to
/// report to might: dropped under the state lock, that would deadlock the worker.
#[derive(Debug)]
struct Holding;

impl fmt::Display for Holding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        PAUSE_DISPLAYED.fetch_add(1, AtomicOrdering::Relaxed);
        let accepted = PAUSED.get().map(|c| c.stats().accepted);
        write!(f, "refused (accepted: {accepted:?})")
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        if let Some(c) = PAUSED.get() {
            let _ = c.stats();
        }
        PAUSE_DROPPED.fetch_add(1, AtomicOrdering::Relaxed);
    }
}

impl std::error::Error for Holding {}

#[test]
fn a_pausing_error_is_logged_and_dropped_outside_the_engine_locks() {
    subscribe();
    let c = PAUSED.get_or_init(|| {
        Conveyor::builder()
            .ordering(Ordering::Keyed { concurrency: 1 })
            .on_failure(OnFailure::Pause)
            .build(|_d: Delivery<u64>| Err(SinkError::permanent(Holding)))
            .unwrap()
    });
    c.send_keyed("acct-7", 1).unwrap();
    // The error is shown and dropped before its worker takes the state lock to pause the
    // lane: wait for both.
    let paused = in_time("the pausing worker", || loop {
        let paused = c.paused();
        if PAUSE_DROPPED.load(AtomicOrdering::Relaxed) > 0 && !paused.is_empty() {
            break paused;
        }
        std::thread::sleep(Duration::from_millis(1));
    });
    assert_eq!(paused, ["acct-7"]);
    // The held item's receipt stays pending: the log is where its error shows.
    assert_eq!(PAUSE_DISPLAYED.load(AtomicOrdering::Relaxed), 1);
    let events = EVENTS.lock().unwrap_or_else(PoisonError::into_inner);
    assert!(
        events
            .iter()
            .any(|e| e.contains("lane=\"acct-7\"") && e.contains("refused (accepted: Some(1))")),
        "{events:?}"
    );
}

/// A keyed conveyor on the journal at `path` whose sink refuses every item for good: each lane
/// pauses at its first item.
fn pausing(path: &Path) -> Conveyor<u64> {
    Conveyor::builder()
        .journal(path)
        .ordering(Ordering::Keyed { concurrency: 2 })
        .on_failure(OnFailure::Pause)
        .build(|d: Delivery<u64>| {
            Err(SinkError::permanent(format!(
                "receiver says no to {}",
                d.item()
            )))
        })
        .unwrap()
}

/// Leaves the journal at `path` with one paused lane per key, each holding the item `i` sent
/// with the `i`th key.
fn pause_lanes(path: &Path, keys: &[String]) {
    let c = pausing(path);
    for (i, key) in (0..).zip(keys) {
        c.send_keyed(key.as_str(), i).unwrap();
    }
    c.flush(); // returns once the lanes paused: their held items do not count
    assert_eq!(c.paused(), keys);
    c.close();
}

/// What is logged while a conveyor starts on the journal at `path` (other tests may log
/// meanwhile), and the conveyor. The pauses themselves were logged when they happened.
fn restart(path: &Path) -> (Vec<String>, Conveyor<u64>) {
    let before = EVENTS.lock().unwrap_or_else(PoisonError::into_inner).len();
    let c = pausing(path);
    let events = EVENTS.lock().unwrap_or_else(PoisonError::into_inner);
    (events[before..].to_vec(), c)
}

/// A lane paused before a restart stays paused, and nothing in it is delivered: the restart
/// used to say nothing about it, so a service came back up, delivered nothing on that lane, and
/// (with a strict lane) soon blocked its senders on a full queue, with no word why.
#[test]
fn a_restart_with_paused_lanes_logs_each_with_its_error() {
    subscribe();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    pause_lanes(&path, &["acct-41".to_owned()]);
    let (events, c) = restart(&path);
    assert_eq!(c.paused(), ["acct-41"]);
    assert!(
        events.iter().any(|e| e.contains("lane=\"acct-41\"")
            && e.contains("receiver says no to 0")
            && e.contains("stays paused")),
        "{events:?}"
    );
}

/// A journal may hold thousands of paused keys: a restart names the first ten lanes, each with
/// its error, and counts the rest in one line instead of flooding the log.
#[test]
fn a_restart_with_many_paused_lanes_names_ten_and_counts_the_rest() {
    subscribe();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    // Zero-padded, so that the journal's order of lanes (by name) is the order sent.
    let keys: Vec<String> = (0..13).map(|i| format!("many-{i:02}")).collect();
    pause_lanes(&path, &keys);
    let (events, c) = restart(&path);
    assert_eq!(c.paused(), keys, "all thirteen stay paused");
    let named: Vec<&String> = keys
        .iter()
        .filter(|key| {
            events
                .iter()
                .any(|e| e.contains(&format!("lane={key:?}")) && e.contains("stays paused"))
        })
        .collect();
    assert_eq!(named, keys[..10].iter().collect::<Vec<_>>(), "{events:?}");
    for (i, key) in (0..).zip(&keys[..10]) {
        let error = format!("receiver says no to {i}");
        assert!(
            events
                .iter()
                .any(|e| e.contains(&format!("lane={key:?}")) && e.contains(&error)),
            "{key} logged without its error: {events:?}"
        );
    }
    let counted: Vec<&String> = events
        .iter()
        .filter(|e| e.contains("more lanes paused"))
        .collect();
    assert!(
        counted.len() == 1 && counted[0].contains("more=3 "),
        "{counted:?}"
    );
}
