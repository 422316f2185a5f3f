//! What the engine logs or journals about a failure runs user code (the error's `Display`),
//! and a subscriber's writing: none of it may happen under the engine's locks.
//!
//! A binary of its own: the subscriber installed here is process-wide, since the workers
//! log on their own threads.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Once, OnceLock};
use std::time::Duration;

use conveyor::{Conveyor, Delivery, Retry, SinkError};
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
        event.record(&mut Format(String::new()));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

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
