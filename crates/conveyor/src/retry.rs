//! Retry policy and the start-rate limiter: both decide *when* the next sink call may begin.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How often, and how far apart, a failing item is tried again.
///
/// Retries happen in place: the item keeps its position in its lane and nothing
/// behind it starts meanwhile (in [`Ordering::Pipelined`](crate::Ordering::Pipelined),
/// items already in flight finish on their own).
///
/// | setting | default |
/// |---|---|
/// | attempts | 1 (no retry) for [`Retry::none`], 5 for the constructors below |
/// | delay | `base`, doubling for [`Retry::exponential`], constant for [`Retry::fixed`] |
/// | cap on one delay | 30 s |
/// | jitter | on: each delay is drawn uniformly from `[delay/2, delay]` |
///
/// # Examples
///
/// ```
/// use conveyor::Retry;
/// use std::time::Duration;
///
/// let policy = Retry::exponential(Duration::from_millis(100))
///     .max_attempts(5)
///     .max_delay(Duration::from_secs(2));
/// assert_eq!(policy.attempts(), 5);
/// // The nominal delays: 100 ms, 200 ms, 400 ms, ... up to 2 s. The wait itself is drawn
/// // from half of each to all of it, unless `.jitter(false)`.
/// assert_eq!(policy.delay_after(1), Duration::from_millis(100));
/// assert_eq!(policy.delay_after(3), Duration::from_millis(400));
/// assert_eq!(policy.delay_after(10), Duration::from_secs(2));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    attempts: u32,
    base: Duration,
    exponential: bool,
    max_delay: Duration,
    jitter: bool,
}

impl Retry {
    const DEFAULT_ATTEMPTS: u32 = 5;
    /// The cap on one delay unless [`Retry::max_delay`] sets another.
    pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(30);
    /// How long a sink's `retry_after` hint may hold an item at most, when [`Retry::max_delay`]
    /// is shorter: a server asking for days (or `Duration::MAX`) does not stall its lane
    /// for good.
    pub const MAX_HINT: Duration = Duration::from_secs(3600);

    /// One attempt, no retry: the default.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, Retry, SinkError};
    ///
    /// assert_eq!(Retry::none().attempts(), 1);
    /// assert_eq!(Retry::default(), Retry::none()); // what a builder uses unless told otherwise
    /// let c: Conveyor<u32> = Conveyor::builder()
    ///     .retry(Retry::none())
    ///     .build(|_d| Err(SinkError::retryable("timed out")))?;
    /// c.send(1).unwrap();
    /// c.flush();
    /// let stats = c.stats();
    /// assert_eq!((stats.failed, stats.retried), (1, 0));
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn none() -> Self {
        Self {
            attempts: 1,
            base: Duration::ZERO,
            exponential: false,
            max_delay: Self::DEFAULT_MAX_DELAY,
            jitter: false,
        }
    }

    /// Up to 5 attempts, waiting `base`, then twice as long each time (up to 30 s, with
    /// jitter: see [`Retry::max_delay`] and [`Retry::jitter`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Retry;
    /// use std::time::Duration;
    ///
    /// let policy = Retry::exponential(Duration::from_millis(10));
    /// assert_eq!(policy.attempts(), 5);
    /// let delays: Vec<u128> = (1..5).map(|n| policy.delay_after(n).as_millis()).collect();
    /// assert_eq!(delays, [10, 20, 40, 80]);
    /// ```
    pub fn exponential(base: Duration) -> Self {
        Self {
            attempts: Self::DEFAULT_ATTEMPTS,
            base,
            exponential: true,
            max_delay: Self::DEFAULT_MAX_DELAY,
            jitter: true,
        }
    }

    /// Up to 5 attempts, waiting `delay` between them (with jitter, between `delay/2` and
    /// `delay`, unless [`Retry::jitter`] turns it off).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Retry;
    /// use std::time::Duration;
    ///
    /// let policy = Retry::fixed(Duration::from_millis(250));
    /// assert_eq!(policy.attempts(), 5);
    /// assert_eq!(policy.delay_after(1), Duration::from_millis(250));
    /// assert_eq!(policy.delay_after(4), Duration::from_millis(250));
    /// ```
    pub fn fixed(delay: Duration) -> Self {
        Self {
            exponential: false,
            ..Self::exponential(delay)
        }
    }

    /// Sets the total number of attempts, the first included. `0` is treated as `1`.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Retry;
    /// use std::time::Duration;
    ///
    /// let policy = Retry::fixed(Duration::from_secs(1)).max_attempts(3);
    /// assert_eq!(policy.attempts(), 3); // the first attempt and two retries
    /// assert_eq!(policy.max_attempts(0).attempts(), 1);
    /// ```
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// Caps any single delay (default [`Retry::DEFAULT_MAX_DELAY`]). A sink's `retry_after`
    /// hint may wait longer, up to the larger of this cap and [`Retry::MAX_HINT`].
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Retry;
    /// use std::time::Duration;
    ///
    /// let policy = Retry::exponential(Duration::from_secs(1)).max_delay(Duration::from_secs(5));
    /// assert_eq!(policy.delay_after(3), Duration::from_secs(4));
    /// assert_eq!(policy.delay_after(4), Duration::from_secs(5)); // 8 s, capped
    /// ```
    #[must_use]
    pub fn max_delay(mut self, cap: Duration) -> Self {
        self.max_delay = cap;
        self
    }

    /// Turns jitter on or off (on for [`Retry::exponential`] and [`Retry::fixed`]). Jitter
    /// spreads retries of many lanes so that they do not hit a recovering service at the same
    /// instant.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, Retry, SinkError};
    /// use std::time::{Duration, Instant};
    ///
    /// let policy = Retry::fixed(Duration::from_millis(10)).max_attempts(2).jitter(false);
    /// let c: Conveyor<u32> = Conveyor::builder().retry(policy).build(|d| {
    ///     if d.attempt() == 1 { Err(SinkError::retryable("busy")) } else { Ok(()) }
    /// })?;
    /// let started = Instant::now();
    /// c.send(1).unwrap().wait().unwrap();
    /// // Without jitter the retry waits the full 10 ms; with it, from 5 to 10 ms.
    /// assert!(started.elapsed() >= Duration::from_millis(10));
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    #[must_use]
    pub fn jitter(mut self, on: bool) -> Self {
        self.jitter = on;
        self
    }

    /// The total number of attempts allowed for one item.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, DeliveryError, Retry, SinkError};
    /// use std::time::Duration;
    ///
    /// let policy = Retry::fixed(Duration::from_millis(1)).max_attempts(3);
    /// let c: Conveyor<u32> = Conveyor::builder().retry(policy).build(move |d| {
    ///     if d.attempt() == policy.attempts() {
    ///         eprintln!("last attempt for item {}", d.item());
    ///     }
    ///     Err(SinkError::retryable("service down"))
    /// })?;
    /// match c.send(1).unwrap().wait() {
    ///     Err(DeliveryError::Failed { attempts, .. }) => assert_eq!(attempts, policy.attempts()),
    ///     other => panic!("unexpected {other:?}"),
    /// }
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The delay before attempt `failed + 1`, after `failed` failed attempts (without
    /// jitter; see [`Retry::jitter`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Retry;
    /// use std::time::Duration;
    ///
    /// let policy = Retry::exponential(Duration::from_secs(1));
    /// // With jitter on (the default here) the wait is drawn from half this to all of it.
    /// assert_eq!(policy.delay_after(1), Duration::from_secs(1)); // after the first failure
    /// assert_eq!(policy.delay_after(3), Duration::from_secs(4));
    /// // 512 s, capped by the default `max_delay`.
    /// assert_eq!(policy.delay_after(10), Retry::DEFAULT_MAX_DELAY);
    /// ```
    pub fn delay_after(&self, failed: u32) -> Duration {
        let doublings = if self.exponential {
            failed.saturating_sub(1).min(32)
        } else {
            0
        };
        self.base
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.max_delay)
    }

    /// The delay to actually wait: [`Retry::delay_after`] with jitter applied, and never
    /// shorter than the sink's own `retry_after` hint.
    pub(crate) fn backoff(&self, failed: u32, hint: Option<Duration>) -> Duration {
        let mut delay = self.delay_after(failed);
        if self.jitter && !delay.is_zero() {
            // Uniform in [delay/2, delay]: keeps the expected growth, breaks lockstep.
            let half = delay / 2;
            delay = half + half.mul_f64(unit_random());
        }
        // A hint is honoured beyond `max_delay`, but not without bound: a server asking
        // for days (or `Duration::MAX`) gets at most the larger of `max_delay` and an hour.
        let hint_cap = self.max_delay.max(Self::MAX_HINT);
        match hint {
            Some(h) => delay.max(h.min(hint_cap)),
            None => delay,
        }
    }
}

impl Default for Retry {
    fn default() -> Self {
        Self::none()
    }
}

/// A uniform number in `[0, 1)`.
fn unit_random() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// A number from a per-thread xorshift generator. Jitter and per-conveyor ids need
/// spread, not cryptographic quality, so a dependency would be overkill.
pub(crate) fn random_u64() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9E37_79B9_7F4A_7C15);
            // The address of a stack value differs per thread, so threads started in
            // the same nanosecond still diverge.
            let here = &nanos as *const u64 as u64;
            (nanos ^ here.rotate_left(32)) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

/// Spaces sink-call starts at least `interval` apart (a GCRA with no burst).
///
/// Slots are reserved under the engine's state lock at the moment an item is taken
/// from its lane, so reservations follow submission order and a pipelined lane keeps
/// its start order even while workers sleep until their slot. A retry reserves its slot
/// when its backoff is over, never ahead: a slot far in the future would hold up every
/// reservation after it.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    interval: Duration,
    next: Option<Instant>,
}

impl RateLimiter {
    pub(crate) fn per_second(rate: u32) -> Self {
        Self {
            interval: Duration::from_secs(1) / rate.max(1),
            next: None,
        }
    }

    /// Reserves the next start slot and returns when it begins.
    pub(crate) fn reserve(&mut self, now: Instant) -> Instant {
        let at = match self.next {
            Some(next) if next > now => next,
            _ => now,
        };
        self.next = Some(at + self.interval);
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_doubles_and_caps() {
        let r = Retry::exponential(Duration::from_millis(10))
            .max_delay(Duration::from_millis(50))
            .jitter(false);
        let delays: Vec<_> = (1..=5).map(|n| r.delay_after(n).as_millis()).collect();
        assert_eq!(delays, vec![10, 20, 40, 50, 50]);
    }

    #[test]
    fn fixed_stays_constant_and_huge_counts_do_not_overflow() {
        let r = Retry::fixed(Duration::from_millis(7)).jitter(false);
        assert_eq!(r.delay_after(1), Duration::from_millis(7));
        assert_eq!(r.delay_after(u32::MAX), Duration::from_millis(7));
        let e = Retry::exponential(Duration::from_secs(1));
        assert_eq!(e.delay_after(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_within_half_and_full_delay() {
        let r = Retry::exponential(Duration::from_millis(100));
        for _ in 0..1000 {
            let d = r.backoff(2, None);
            assert!(
                d >= Duration::from_millis(100) && d <= Duration::from_millis(200),
                "{d:?}"
            );
        }
    }

    #[test]
    fn retry_after_hint_extends_backoff() {
        let r = Retry::fixed(Duration::from_millis(10));
        assert_eq!(
            r.backoff(1, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert!(r.backoff(1, Some(Duration::from_millis(1))) <= Duration::from_millis(10));
    }

    #[test]
    fn huge_hints_are_capped_at_an_hour_or_max_delay() {
        let r = Retry::fixed(Duration::from_millis(10));
        assert_eq!(r.backoff(1, Some(Duration::MAX)), Duration::from_secs(3600));
        let long = r.max_delay(Duration::from_secs(7200));
        assert_eq!(
            long.backoff(1, Some(Duration::MAX)),
            Duration::from_secs(7200)
        );
    }

    #[test]
    fn zero_attempts_means_one() {
        assert_eq!(Retry::fixed(Duration::ZERO).max_attempts(0).attempts(), 1);
        assert_eq!(Retry::none().attempts(), 1);
    }

    #[test]
    fn rate_limiter_spaces_reservations() {
        let mut rl = RateLimiter::per_second(10);
        let t0 = Instant::now();
        let slots: Vec<_> = (0..4).map(|_| rl.reserve(t0)).collect();
        for (i, s) in slots.iter().enumerate() {
            assert_eq!(*s - t0, Duration::from_millis(100) * i as u32);
        }
        // After an idle gap, no burst credit accumulates beyond "now".
        let later = t0 + Duration::from_secs(5);
        assert_eq!(rl.reserve(later), later);
        assert_eq!(rl.reserve(later), later + Duration::from_millis(100));
    }
}
