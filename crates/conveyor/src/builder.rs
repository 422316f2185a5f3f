//! Configuration: the builder, its policies and their defaults.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::conveyor::Conveyor;
use crate::durable::{Codec, Durability, JournalSettings};
use crate::error::{BuildError, SinkError};
use crate::receipt::Delivery;
use crate::retry::Retry;
use crate::worker::Sink;

/// How items are ordered on their way to the sink.
///
/// # Examples
///
/// ```
/// use conveyor::Ordering;
///
/// assert_eq!(Ordering::default(), Ordering::Strict);
/// let _pipelined = Ordering::Pipelined { in_flight: 8 };
/// let _keyed = Ordering::Keyed { concurrency: 64 };
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ordering {
    /// Item n+1 is handed to the sink only after item n is settled: one call at a
    /// time. The default.
    ///
    /// While a blocking sink's calls return within microseconds, its worker takes what was
    /// sent in batches, at most every 50 µs, so that it does not meet the sending thread at
    /// every item: an item may then wait up to that long before its call starts.
    #[default]
    Strict,
    /// Items are handed to the sink in submission order, with at most `in_flight`
    /// calls at once. Each call runs on its own worker, so two calls handed out a
    /// moment apart may begin in either order (item n+`in_flight` never begins before
    /// item n was handed out); later calls may finish before earlier ones, and a retried
    /// or paused item can be passed by items that were already in flight.
    ///
    /// `in_flight` is a bound, not a target: while a blocking sink's calls return within
    /// microseconds, one worker runs a few of them in a row, since more workers would only
    /// contend for the queue, and takes what was sent in batches, at most every 50 µs (an
    /// item may wait up to that long before its call starts), as [`Ordering::Strict`] does.
    /// Should one of those calls then stall, another worker takes over the items after it
    /// within about a millisecond.
    Pipelined {
        /// The most calls in progress at once (from 1 to [`Ordering::MAX_PARALLEL`]).
        in_flight: usize,
    },
    /// Strict within a key (see [`Conveyor::send_keyed`]), with up to `concurrency`
    /// keys in flight at once. Items sent without a key share the lane `""`.
    ///
    /// While a blocking sink's calls return within microseconds, a key's worker runs a few
    /// of its items in a row and takes what was sent in batches, at most every 50 µs, as
    /// [`Ordering::Strict`] does: an item may wait up to that long before its call starts.
    Keyed {
        /// The most keys in flight at once (from 1 to [`Ordering::MAX_PARALLEL`]).
        concurrency: usize,
    },
}

impl Ordering {
    /// The most calls a conveyor runs at once: each has a worker of its own (an OS thread for
    /// a blocking sink, a task for an async one).
    pub const MAX_PARALLEL: usize = 10_000;

    /// How many sink calls may run at once under this mode.
    pub(crate) fn workers(self) -> usize {
        match self {
            Ordering::Strict => 1,
            Ordering::Pipelined { in_flight } => in_flight,
            Ordering::Keyed { concurrency } => concurrency,
        }
    }

    pub(crate) fn is_keyed(self) -> bool {
        matches!(self, Ordering::Keyed { .. })
    }

    /// The name a journal records, and its errors show: `"strict"`, `"pipelined"`, `"keyed"`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Ordering::Strict => "strict",
            Ordering::Pipelined { .. } => "pipelined",
            Ordering::Keyed { .. } => "keyed",
        }
    }
}

/// What `send` does when the queue is at capacity.
///
/// Every policy is visible: [`Reject`](Backpressure::Reject) hands the item back,
/// the drop policies settle the dropped item's receipt as
/// [`DeliveryError::Dropped`](crate::DeliveryError::Dropped) and count it in
/// [`Stats::dropped`](crate::Stats::dropped).
///
/// # Examples
///
/// ```
/// use conveyor::{Backpressure, Conveyor, SendError};
/// use std::sync::{mpsc, Mutex};
///
/// let (release, gate) = mpsc::channel::<()>();
/// let gate = Mutex::new(gate);
/// let c: Conveyor<u32> = Conveyor::builder()
///     .capacity(1)
///     .backpressure(Backpressure::Reject)
///     .build(move |_d| {
///         gate.lock().unwrap().recv().ok(); // stalls until released
///         Ok(())
///     })?;
/// let refused: Vec<u32> = (1..=3)
///     .filter_map(|i| c.send(i).err().map(SendError::into_inner))
///     .collect();
/// assert!(!refused.is_empty(), "one item in flight and one queued fill a capacity of 1");
/// drop(release);
/// # Ok::<(), conveyor::BuildError>(())
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backpressure {
    /// Wait for room (the default). `try_send` still never waits.
    #[default]
    Block,
    /// Return [`SendError::Full`](crate::SendError::Full) with the item.
    Reject,
    /// Accept the new item and drop it at once.
    DropNewest,
    /// Drop the oldest queued item (not one in flight, nor one held in a paused lane)
    /// to make room; if there is none, drop the new item.
    DropOldest,
}

/// What happens to an item whose last attempt failed.
///
/// # Examples
///
/// ```
/// use conveyor::{Conveyor, OnFailure, SinkError};
///
/// let c: Conveyor<u32> = Conveyor::builder()
///     .on_failure(OnFailure::Pause)
///     .build(|d| match d.item() {
///         1 => Err(SinkError::permanent("rejected")),
///         _ => Ok(()),
///     })?;
/// c.send(1).unwrap();
/// c.send(2).unwrap();
/// c.flush(); // returns: held items do not count
/// assert_eq!(c.paused(), vec![String::new()]); // the lane of items sent without a key
/// assert_eq!(c.stats().delivered, 0, "item 2 waits behind item 1");
/// # Ok::<(), conveyor::BuildError>(())
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFailure {
    /// Settle it as failed (its receipt reports the last error) and move on to the
    /// next item. The default.
    #[default]
    Skip,
    /// Keep it at the head of its lane and stop that lane (other lanes go on) until
    /// [`Conveyor::resume`] is called; [`Conveyor::paused`] lists paused lanes. The held
    /// item's receipt stays pending, so its last error is logged instead (a `tracing` warning
    /// naming the lane), and with a journal recorded with the pause.
    ///
    /// The items a paused lane holds still count against the
    /// [`capacity`](crate::Builder::capacity), so that memory stays bounded: once they fill
    /// it, sends for every lane meet a full queue ([`Backpressure::Block`] waits for a
    /// resume). Watch [`Conveyor::paused`], or size the capacity for the backlog a lane may
    /// gather before an operator acts.
    Pause,
}

/// Settings shared by every kind of sink, validated by [`Config::validate`].
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) ordering: Ordering,
    pub(crate) capacity: usize,
    pub(crate) backpressure: Backpressure,
    pub(crate) retry: Retry,
    pub(crate) on_failure: OnFailure,
    pub(crate) rate_limit: Option<u32>,
    pub(crate) drain_timeout: Duration,
    pub(crate) durability: Durability,
    /// See [`Builder::journal_kind`].
    pub(crate) journal_kind: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ordering: Ordering::Strict,
            capacity: 10_000,
            backpressure: Backpressure::Block,
            retry: Retry::none(),
            on_failure: OnFailure::Skip,
            rate_limit: None,
            drain_timeout: Duration::from_secs(30),
            durability: Durability::default(),
            journal_kind: None,
        }
    }
}

impl Config {
    fn validate(&self) -> Result<(), BuildError> {
        let invalid = |msg: &str| Err(BuildError::InvalidConfig(msg.to_owned()));
        match self.ordering {
            Ordering::Pipelined { in_flight: 0 } => {
                return invalid("Ordering::Pipelined needs in_flight >= 1 (1 behaves like Strict)")
            }
            Ordering::Keyed { concurrency: 0 } => {
                return invalid(
                    "Ordering::Keyed needs concurrency >= 1 (1 keeps a single key in flight)",
                )
            }
            _ => {}
        }
        if self.ordering.workers() > Ordering::MAX_PARALLEL {
            let field = if self.ordering.is_keyed() {
                "concurrency"
            } else {
                "in_flight"
            };
            return Err(BuildError::InvalidConfig(format!(
                "{:?} runs more calls at once than the {max} a conveyor allows: each needs a \
                 worker of its own (a thread for a blocking sink); set {field} to at most {max}",
                self.ordering,
                max = Ordering::MAX_PARALLEL
            )));
        }
        if self.capacity == 0 {
            return invalid("capacity must be at least 1 queued item (default 10000)");
        }
        if self.rate_limit == Some(0) {
            return invalid(
                "rate_limit must be at least 1 call per second; leave it unset for no limit",
            );
        }
        Ok(())
    }
}

/// Configures and starts a [`Conveyor`]. Obtain one with [`Conveyor::builder`].
///
/// | setting | default | meaning |
/// |---|---|---|
/// | [`ordering`](Builder::ordering) | [`Ordering::Strict`] | strict, pipelined or keyed |
/// | [`capacity`](Builder::capacity) | 10 000 | queued items (in-flight ones not counted) |
/// | [`backpressure`](Builder::backpressure) | [`Backpressure::Block`] | what a send does when full |
/// | [`retry`](Builder::retry) | [`Retry::none`] | attempts and backoff per item |
/// | [`on_failure`](Builder::on_failure) | [`OnFailure::Skip`] | after the last attempt |
/// | [`rate_limit`](Builder::rate_limit) | none | sink calls started per second |
/// | [`drain_timeout`](Builder::drain_timeout) | 30 s | how long dropping the conveyor drains |
/// | [`journal`](Builder::journal) | none (in memory) | a file that keeps accepted items across crashes |
/// | [`durability`](Builder::durability) | `Batched(5 ms)` | when a journaled item is on disk |
/// | [`journal_kind`](Builder::journal_kind) | none (opens any journal) | what the journaled items are |
///
/// # Examples
///
/// ```
/// use conveyor::{Backpressure, Conveyor, OnFailure, Ordering, Retry, SinkError};
/// use std::time::Duration;
///
/// let c: Conveyor<String> = Conveyor::builder()
///     .ordering(Ordering::Keyed { concurrency: 4 })
///     .capacity(1_000)
///     .backpressure(Backpressure::Block)
///     .retry(Retry::exponential(Duration::from_millis(10)).max_attempts(3))
///     .on_failure(OnFailure::Skip)
///     .drain_timeout(Duration::from_secs(5))
///     .build(|d: conveyor::Delivery<String>| {
///         if d.item().is_empty() {
///             return Err(SinkError::permanent("empty message"));
///         }
///         Ok(())
///     })?;
/// c.send_keyed("chat-1", "hello".to_owned()).unwrap();
/// c.flush();
/// assert_eq!(c.stats().delivered, 1);
/// # Ok::<(), conveyor::BuildError>(())
/// ```
#[must_use = "a builder does nothing until `build` or `build_async` is called"]
pub struct Builder<T, R = ()> {
    pub(crate) config: Config,
    /// Set by [`Builder::journal`], the only place that knows `T` is serde-capable.
    journal: Option<JournalSettings<T>>,
    _types: PhantomData<fn(T) -> R>,
}

impl<T, R> fmt::Debug for Builder<T, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .field("journal", &self.journal.as_ref().map(|j| &j.path))
            .finish()
    }
}

impl<T, R> Clone for Builder<T, R> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            journal: self.journal.clone(),
            _types: PhantomData,
        }
    }
}

impl<T, R> Default for Builder<T, R> {
    fn default() -> Self {
        Self {
            config: Config::default(),
            journal: None,
            _types: PhantomData,
        }
    }
}

impl<T: Send + Sync + 'static, R: Send + 'static> Builder<T, R> {
    /// Sets the ordering mode.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, Ordering};
    /// use std::sync::{Arc, Mutex};
    ///
    /// let seen = Arc::new(Mutex::new(Vec::new()));
    /// let s = seen.clone();
    /// let c: Conveyor<u32> = Conveyor::builder()
    ///     .ordering(Ordering::Keyed { concurrency: 2 })
    ///     .build(move |d| {
    ///         if d.key() == Some("a") {
    ///             s.lock().unwrap().push(*d.item());
    ///         }
    ///         Ok(())
    ///     })?;
    /// for i in 1..=3 {
    ///     c.send_keyed("a", i).unwrap();
    ///     c.send_keyed("b", i).unwrap();
    /// }
    /// c.flush();
    /// assert_eq!(*seen.lock().unwrap(), [1, 2, 3]); // in order within key "a"
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn ordering(mut self, ordering: Ordering) -> Self {
        self.config.ordering = ordering;
        self
    }

    /// Sets how many items may wait in the queue (items being delivered are not
    /// counted). Memory stays bounded by this number when the sink stalls. Items in flight
    /// that go back to the queue unsettled (their lane paused by [`OnFailure::Pause`], or a
    /// shutdown interrupted them between attempts) may take it past the limit by at most one
    /// per worker, and a worker with a fast sink lets go of the items it delivered up to a
    /// few hundred at a time (at most 255 after their delivery, per worker). The memory the
    /// queued items took at the queue's fullest (up to 16 MiB, plus 1 MiB the producer lets
    /// cool before reusing it) is kept for the items sent after them, so that a burst does not
    /// allocate again, and so is the room of the lane that held them (16 bytes per
    /// item; in keyed mode, the largest lane's).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    /// use std::sync::{mpsc, Mutex};
    ///
    /// let (release, gate) = mpsc::channel::<()>();
    /// let gate = Mutex::new(gate);
    /// let c: Conveyor<u32> = Conveyor::builder().capacity(2).build(move |_d| {
    ///     gate.lock().unwrap().recv().ok(); // stalls until released
    ///     Ok(())
    /// })?;
    /// let accepted = (0..10).filter(|&i| c.try_send(i).is_ok()).count();
    /// // Two queued, and one in flight once a worker has taken it.
    /// assert!((2..=3).contains(&accepted));
    /// assert!(c.stats().queued <= 2);
    /// drop(release);
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.config.capacity = capacity;
        self
    }

    /// Sets what `send` does when the queue is full.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Backpressure, Conveyor};
    /// use std::sync::{mpsc, Mutex};
    ///
    /// let (release, gate) = mpsc::channel::<()>();
    /// let gate = Mutex::new(gate);
    /// let c: Conveyor<u32> = Conveyor::builder()
    ///     .capacity(1)
    ///     .backpressure(Backpressure::DropNewest)
    ///     .build(move |_d| {
    ///         gate.lock().unwrap().recv().ok(); // stalls until released
    ///         Ok(())
    ///     })?;
    /// for i in 1..=3 {
    ///     c.send(i).unwrap(); // never waits, never refuses
    /// }
    /// drop(release);
    /// let stats = c.close().stats;
    /// assert!(stats.dropped >= 1);
    /// assert_eq!(stats.delivered + stats.dropped, 3);
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn backpressure(mut self, policy: Backpressure) -> Self {
        self.config.backpressure = policy;
        self
    }

    /// Sets the retry policy for retryable sink errors.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, Retry, SinkError};
    /// use std::time::Duration;
    ///
    /// let c: Conveyor<&str> = Conveyor::builder()
    ///     .retry(Retry::fixed(Duration::from_millis(1)).max_attempts(3))
    ///     .build(|d| if d.attempt() < 3 { Err(SinkError::retryable("503")) } else { Ok(()) })?;
    /// c.send("hello").unwrap().wait().unwrap(); // delivered on the third attempt
    /// assert_eq!(c.stats().retried, 2);
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn retry(mut self, retry: Retry) -> Self {
        self.config.retry = retry;
        self
    }

    /// Sets what happens to an item after its last failed attempt.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, DeliveryError, OnFailure, SinkError};
    ///
    /// let c: Conveyor<u32> = Conveyor::builder()
    ///     .on_failure(OnFailure::Skip)
    ///     .build(|d| match d.item() {
    ///         1 => Err(SinkError::permanent("rejected")),
    ///         _ => Ok(()),
    ///     })?;
    /// let first = c.send(1).unwrap();
    /// let second = c.send(2).unwrap();
    /// assert!(matches!(first.wait(), Err(DeliveryError::Failed { attempts: 1, .. })));
    /// assert!(second.wait().is_ok());
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn on_failure(mut self, policy: OnFailure) -> Self {
        self.config.on_failure = policy;
        self
    }

    /// Starts at most `calls_per_second` sink calls per second (retries included),
    /// evenly spaced: one every `1 s / calls_per_second`, with no burst allowance after an
    /// idle spell. The limit is shared by every lane (keys included), and calls start in the
    /// order they were taken from their lanes. A retry takes its slot once its backoff is over,
    /// so a long backoff of one key does not hold up the others.
    ///
    /// An item waiting for its slot counts as in flight in [`Stats`](crate::Stats); a
    /// shutdown does not wait for the slot: under
    /// [`stop_timeout`](Conveyor::stop_timeout) the item is not started, and past a drain
    /// deadline it is reported as left ([`DeliveryError::Closed`](crate::DeliveryError::Closed)).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    /// use std::time::{Duration, Instant};
    ///
    /// let c: Conveyor<u32> = Conveyor::builder().rate_limit(200).build(|_d| Ok(()))?;
    /// let started = Instant::now();
    /// for i in 0..3 {
    ///     c.send(i).unwrap();
    /// }
    /// c.flush();
    /// // One call every 5 ms: the third starts 10 ms after the first.
    /// assert!(started.elapsed() >= Duration::from_millis(10));
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn rate_limit(mut self, calls_per_second: u32) -> Self {
        self.config.rate_limit = Some(calls_per_second);
        self
    }

    /// Sets how long [`Conveyor::close`] and dropping the conveyor wait for pending items
    /// before they report them as left (default 30 s); see [`Conveyor::close_timeout`] and, in
    /// async code, [`Conveyor::close_async`], which take a deadline of their own.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    /// use std::sync::{mpsc, Mutex};
    /// use std::time::Duration;
    ///
    /// let (release, gate) = mpsc::channel::<()>();
    /// let gate = Mutex::new(gate);
    /// let c: Conveyor<u32> = Conveyor::builder()
    ///     .drain_timeout(Duration::from_millis(10))
    ///     .build(move |_d| {
    ///         gate.lock().unwrap().recv().ok(); // stalls until released
    ///         Ok(())
    ///     })?;
    /// c.send(1).unwrap();
    /// c.send(2).unwrap();
    /// let report = c.close(); // gives up after 10 ms
    /// assert!(!report.drained);
    /// assert_eq!(report.left, 2);
    /// drop(release);
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    /// Sets when a journaled item is on disk (default `Durability::Batched(5 ms)`); see
    /// [`Durability`]. Without a [`journal`](Builder::journal) it has no effect.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, Durability};
    /// use std::time::Duration;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let c: Conveyor<String> = Conveyor::builder()
    ///     .journal(dir.path().join("events.journal"))
    ///     .durability(Durability::Sync)
    ///     .build(|_d| Ok(()))?;
    /// let receipt = c.send("on disk before send returns".to_owned()).unwrap();
    /// assert!(c.wait_committed(&receipt, Duration::ZERO)); // nothing left to wait for
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn durability(mut self, durability: Durability) -> Self {
        self.config.durability = durability;
        self
    }

    /// Names the kind of items this conveyor journals, for example `"my-app/order-event"`; the
    /// journal records it when this conveyor opens it. Without a [`journal`](Builder::journal)
    /// it has no effect.
    ///
    /// A journal is only useful to a program that can decode its items. With a kind set,
    /// [`build`](Builder::build) refuses a journal recorded with another kind while it holds
    /// anything (pending items, paused lanes, dead letters or a cursor) with
    /// [`JournalError::OtherKind`](crate::JournalError::OtherKind), rather than reading another
    /// program's items as this one's; an empty journal takes the new kind. Without one (the
    /// default) any journal opens, and a pending item that cannot be decoded as `T` becomes a
    /// dead letter, counted in [`Stats::failed`](crate::Stats::failed). Under
    /// [`OnFailure::Pause`] it holds its lane instead, as a failing item does: the items before
    /// it are delivered, its lane pauses when it is next, and
    /// [`Conveyor::resume`](crate::Conveyor::resume) makes it a dead letter; a later start with
    /// an item type that decodes it delivers it in its place.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{BuildError, Conveyor, JournalError};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("events.journal");
    /// let orders: Conveyor<u32> = Conveyor::builder()
    ///     .journal(&path)
    ///     .journal_kind("orders")
    ///     .build(|_d| Err(conveyor::SinkError::permanent("down")))?;
    /// orders.send(7).unwrap();
    /// orders.close(); // item 7 is now a dead letter
    /// let other = Conveyor::<String>::builder()
    ///     .journal(&path)
    ///     .journal_kind("emails")
    ///     .build(|_d| Ok(()));
    /// assert!(matches!(other, Err(BuildError::Journal(JournalError::OtherKind { .. }))));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn journal_kind(mut self, kind: impl Into<String>) -> Self {
        self.config.journal_kind = Some(kind.into());
        self
    }

    /// Starts the conveyor with a blocking sink, called on threads the conveyor owns
    /// (never on the caller's thread or a Tokio worker).
    ///
    /// # Errors
    ///
    /// [`BuildError::InvalidConfig`] for an out-of-range setting, [`BuildError::Spawn`]
    /// if a worker thread cannot be started.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{BuildError, Conveyor};
    ///
    /// let c: Conveyor<u32, u32> = Conveyor::builder().build(|d| Ok(d.item() * 2))?;
    /// assert_eq!(c.send(21).unwrap().wait().unwrap(), 42);
    ///
    /// let invalid = Conveyor::<u32>::builder().capacity(0).build(|_d| Ok(()));
    /// assert!(matches!(invalid, Err(BuildError::InvalidConfig(_))));
    /// # Ok::<(), BuildError>(())
    /// ```
    pub fn build<F>(self, sink: F) -> Result<Conveyor<T, R>, BuildError>
    where
        F: Fn(Delivery<T>) -> Result<R, SinkError> + Send + Sync + 'static,
    {
        self.config.validate()?;
        Conveyor::start(self.config, Sink::Blocking(Arc::new(sink)), self.journal)
    }

    /// Starts the conveyor with an async sink. It runs on the multi-threaded Tokio runtime
    /// this is called from, or else on a small multi-threaded runtime the conveyor owns (shut
    /// down when the conveyor is dropped), with Tokio's time and I/O drivers.
    ///
    /// Should the runtime it was built in shut down while the conveyor is still open, nothing
    /// can deliver any more: the conveyor closes (with a logged warning), later sends return
    /// [`SendError::Closed`](crate::SendError::Closed), and what was left settles as
    /// [`DeliveryError::Closed`](crate::DeliveryError::Closed) (or `Unconfirmed` for a call that
    /// was running) instead of waiting for good. Close the conveyor before its runtime ends.
    ///
    /// Built inside a current-thread runtime (`#[tokio::main(flavor = "current_thread")]`,
    /// `Runtime::block_on`), the sink runs on the conveyor's own runtime, not that one: a
    /// current-thread runtime runs its tasks only while a thread is inside its `block_on`, so
    /// once that returns, or while its thread blocks in [`Conveyor::flush`],
    /// [`Conveyor::close`], a drop or [`Receipt::wait`](crate::Receipt::wait), the sink could
    /// not run and the wait would never end. On the conveyor's runtime, every wait works from
    /// any thread, and dropping your runtime loses nothing sent.
    ///
    /// So the sink's future is polled on the conveyor's runtime: `tokio::spawn` in it spawns
    /// there, and its timers follow the real clock (not a paused test clock). Tokio resources
    /// made on your current-thread runtime and used by the sink (a socket, a client whose
    /// connections were opened there, a channel fed by one of its tasks) still work, but they
    /// make progress only while your runtime runs: awaiting ([`Conveyor::flush_async`],
    /// [`Conveyor::send_async`], [`Conveyor::close_async`], a receipt) lets it run, blocking its
    /// thread in `flush` or `close` does not (a flush then waits for as long as that thread is
    /// blocked, a close until its deadline), and once that runtime is dropped Tokio fails their
    /// calls with an error. Resources the sink makes itself belong to the conveyor's runtime and
    /// have none of these limits.
    ///
    /// # Errors
    ///
    /// As for [`Builder::build`]; also [`BuildError::Spawn`] if the conveyor's own
    /// runtime cannot be started.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    ///
    /// let c: Conveyor<u32, u32> = Conveyor::builder().build_async(|d| async move {
    ///     tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    ///     Ok(*d.item() + 1)
    /// })?;
    /// assert_eq!(c.send(1).unwrap().wait().unwrap(), 2);
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn build_async<F, Fut>(self, sink: F) -> Result<Conveyor<T, R>, BuildError>
    where
        F: Fn(Delivery<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, SinkError>> + Send + 'static,
    {
        self.config.validate()?;
        Conveyor::start(
            self.config,
            Sink::Async(Arc::new(move |d| Box::pin(sink(d)))),
            self.journal,
        )
    }
}

impl<T, R> Builder<T, R>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    R: Send + 'static,
{
    /// Keeps accepted items in a journal file (SQLite), so that they survive a crash, a
    /// `kill -9` or a power cut, and are delivered after a restart, in order. Items are stored
    /// as JSON. An item is safe once its commit is done: `send` returns before that under the
    /// default [`Durability::Batched`] (a crash loses what was accepted in the last 5 ms), after
    /// it under [`Durability::Sync`]; [`Conveyor::wait_committed`] waits for one item.
    ///
    /// On build, items the journal still holds are delivered first, in their original order
    /// per lane, before anything sent later; lanes paused before stay paused. Delivery becomes
    /// at-least-once: items delivered just before a crash (in flight, or settled in the last
    /// commit window) may be delivered again, in order, with the same [`Delivery::seq`] and
    /// [`Delivery::idempotency_key`]. Items that fail for
    /// good under [`OnFailure::Skip`] are kept as dead letters
    /// ([`Conveyor::dead_letters`]). The file is created owner-only (0600) and one process at
    /// a time may use it; see [`Journal`](crate::Journal) to inspect it offline.
    ///
    /// An item reaches the sink only once it is on disk: under `Batched`, the worker that takes
    /// an item not yet committed has the writer commit at once, and waits for it (while the
    /// journal cannot be written, deliveries wait too). So an item delivered before a crash is
    /// always in the journal after it, and comes back with its own seq, never as a new item.
    ///
    /// Seqs are reserved in the journal ahead of use (a seq handed out before a crash must
    /// never be reused, even if its item was not committed), so after a restart they continue
    /// past the reservation and may jump by up to 65,536: they only ever increase. While the
    /// journal's old items are loaded, new sends wait as for a full queue (`try_send` and
    /// `Backpressure::Reject` refuse them, the drop policies drop them). If the journal cannot
    /// be written (disk full), sends are refused with
    /// [`SendError::Journal`](crate::SendError::Journal) until a retried commit succeeds (a
    /// send that was waiting for room is refused when it gets some); so they are while the
    /// journal's old items cannot be read (sends waiting for them to load are woken and
    /// refused). Items accepted before stay intact. An item too large for a journal entry
    /// (SQLite's limit of about 1 GB, as JSON with its key) is refused with
    /// [`SendError::TooLarge`](crate::SendError::TooLarge), and one whose `Serialize` fails
    /// with [`SendError::Encode`](crate::SendError::Encode). An item must come back from its
    /// JSON as it went in: `serde_json` writes a float that is NaN or infinite as `null`, which
    /// a restart cannot read back as a float, so such an item left pending by a crash becomes a
    /// dead letter (kept, never lost, but no longer a float); wrap such values in a type whose
    /// `Serialize` keeps them (a string, say).
    ///
    /// Known limit: the backlog of a lane paused before the restart is loaded into memory
    /// whole (only unpaused items count against the capacity during the replay).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("events.journal");
    /// let c: Conveyor<String> = Conveyor::builder()
    ///     .journal(&path)
    ///     .build(|d| { println!("{}: {}", d.idempotency_key(), d.item()); Ok(()) })?;
    /// c.send("hello".to_owned()).unwrap();
    /// c.close();
    /// assert_eq!(conveyor::Journal::open(&path)?.status()?.pending, 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn journal(mut self, path: impl Into<PathBuf>) -> Self {
        self.journal = Some(JournalSettings {
            path: path.into(),
            codec: Codec::json(),
        });
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = Config::default();
        assert_eq!(c.capacity, 10_000);
        assert_eq!(c.ordering, Ordering::Strict);
        assert_eq!(c.backpressure, Backpressure::Block);
        assert_eq!(c.on_failure, OnFailure::Skip);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.retry, Retry::none());
        assert_eq!(c.rate_limit, None);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn out_of_range_settings_are_rejected_with_a_named_reason() {
        let base = Config::default;
        let cases = [
            (
                Config {
                    capacity: 0,
                    ..base()
                },
                "capacity",
            ),
            (
                Config {
                    ordering: Ordering::Pipelined { in_flight: 0 },
                    ..base()
                },
                "in_flight",
            ),
            (
                Config {
                    ordering: Ordering::Keyed { concurrency: 0 },
                    ..base()
                },
                "concurrency",
            ),
            (
                Config {
                    rate_limit: Some(0),
                    ..base()
                },
                "rate_limit",
            ),
            // Out of range the other way: a worker per call would not fit (it used to
            // panic with a capacity overflow).
            (
                Config {
                    ordering: Ordering::Keyed {
                        concurrency: usize::MAX,
                    },
                    ..base()
                },
                "concurrency",
            ),
            (
                Config {
                    ordering: Ordering::Pipelined {
                        in_flight: Ordering::MAX_PARALLEL + 1,
                    },
                    ..base()
                },
                "in_flight",
            ),
        ];
        for (config, name) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
            if config.ordering.workers() > Ordering::MAX_PARALLEL {
                assert!(
                    err.contains(&format!("set {name} to at most 10000")),
                    "{err}"
                );
            }
        }
    }
}
