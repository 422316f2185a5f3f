//! A deadline to await by the real clock, whatever runtime polls the future (or none).
//!
//! `close_async` bounds its waits by a deadline, like `close_timeout`, but Tokio's timer would
//! not do: it panics outside a runtime with a time driver, and on a runtime whose clock is
//! paused (`#[tokio::test(start_paused = true)]`) it jumps to the deadline as soon as the
//! runtime is idle, which it is while it awaits worker threads, so the close would give up at
//! once. A thread of its own waits out the real deadline instead: it exists only while a close
//! awaits, and goes as soon as the alarm is dropped.

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::Notify;

/// Rings at a deadline (never, for `None`). The thread behind it starts on the first await.
pub(crate) struct Alarm {
    deadline: Option<Instant>,
    bell: Option<Arc<Bell>>,
}

/// What the alarm's thread and the awaiting task share.
#[derive(Default)]
struct Bell {
    /// Set by the alarm's drop: the thread stops waiting and leaves.
    dropped: Mutex<bool>,
    /// The thread waits here, for the deadline or the drop.
    dropped_cv: Condvar,
    /// Set once the deadline passed, before `ring` tells the task.
    rang: AtomicBool,
    ring: Notify,
}

impl Alarm {
    pub(crate) fn at(deadline: Option<Instant>) -> Self {
        Self {
            deadline,
            bell: None,
        }
    }

    /// Whether the deadline has passed.
    pub(crate) fn passed(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Completes once the deadline has passed; never without a deadline. Cancel safe: awaited
    /// again, it goes on waiting for the same deadline.
    pub(crate) async fn rung(&mut self) {
        let Some(deadline) = self.deadline else {
            return std::future::pending().await;
        };
        if self.passed() {
            return;
        }
        let bell = match &self.bell {
            Some(bell) => bell.clone(),
            None => match ring_at(deadline) {
                Some(bell) => self.bell.insert(bell).clone(),
                None => return tokio_timer(deadline).await,
            },
        };
        loop {
            // Enabled before the check: a ring right after it still wakes this task.
            let ring = bell.ring.notified();
            tokio::pin!(ring);
            ring.as_mut().enable();
            if bell.rang.load(AtomicOrdering::Acquire) {
                return;
            }
            ring.await;
        }
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        if let Some(bell) = &self.bell {
            *bell.dropped.lock().unwrap_or_else(PoisonError::into_inner) = true;
            bell.dropped_cv.notify_one();
        }
    }
}

/// Starts the thread that rings at `deadline`; `None` if it cannot be started.
fn ring_at(deadline: Instant) -> Option<Arc<Bell>> {
    let bell = Arc::new(Bell::default());
    let ringer = bell.clone();
    let spawned = std::thread::Builder::new()
        .name("conveyor-alarm".to_owned())
        .spawn(move || {
            let mut dropped = ringer
                .dropped
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            loop {
                if *dropped {
                    return;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                dropped = ringer
                    .dropped_cv
                    .wait_timeout(dropped, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            drop(dropped);
            ringer.rang.store(true, AtomicOrdering::Release);
            ringer.ring.notify_waiters();
        });
    match spawned {
        Ok(_) => Some(bell),
        Err(error) => {
            tracing::warn!(%error, "no thread for a close's deadline: Tokio's timer keeps it");
            None
        }
    }
}

/// The deadline by Tokio's timer, when no thread could be started for it: on a runtime with
/// a time driver, or else at once (the close reports what is left rather than panicking or
/// waiting for good).
async fn tokio_timer(deadline: Instant) {
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rings_at_its_deadline_by_the_real_clock_even_when_tokio_s_clock_is_paused() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let started = Instant::now();
        let wait = Duration::from_millis(50);
        runtime.block_on(async {
            let mut alarm = Alarm::at(Some(started + wait));
            alarm.rung().await;
            assert!(alarm.passed());
        });
        assert!(started.elapsed() >= wait, "rang before its deadline");
    }

    #[test]
    fn a_passed_deadline_rings_at_once_without_a_thread_and_none_never_rings() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut passed = Alarm::at(Some(Instant::now()));
            passed.rung().await;
            assert!(passed.bell.is_none());
            let mut never = Alarm::at(None);
            assert!(!never.passed());
            let waited = tokio::time::timeout(Duration::from_millis(20), never.rung()).await;
            assert!(waited.is_err(), "an alarm without a deadline rang");
        });
    }

    #[test]
    fn its_thread_leaves_when_the_alarm_is_dropped() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let bell = runtime.block_on(async {
            let mut alarm = Alarm::at(Some(Instant::now() + Duration::from_secs(3600)));
            let waited = tokio::time::timeout(Duration::from_millis(10), alarm.rung()).await;
            assert!(waited.is_err());
            alarm.bell.clone().unwrap()
        });
        // The thread held the only other reference; it drops it as it leaves.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Arc::strong_count(&bell) > 1 {
            assert!(
                Instant::now() < deadline,
                "the alarm's thread is still waiting"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!bell.rang.load(AtomicOrdering::Acquire));
    }
}
