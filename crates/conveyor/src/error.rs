//! Errors: one type per failing operation, each handing back what the caller needs.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The boxed error a sink reports, shared so that [`SinkError`] and
/// [`DeliveryError`] can be cloned into every receipt and log line.
type Source = Arc<dyn StdError + Send + Sync + 'static>;

/// What a sink returns when a delivery attempt fails.
///
/// A sink decides whether a failure is worth another attempt:
/// [`SinkError::retryable`] failures are retried according to the conveyor's
/// [`Retry`](crate::Retry) policy, [`SinkError::permanent`] failures settle the
/// item at once (as failed, or by pausing its lane under
/// [`OnFailure::Pause`](crate::OnFailure::Pause)).
///
/// # Examples
///
/// ```
/// use conveyor::SinkError;
/// use std::time::Duration;
///
/// let busy = SinkError::retryable("503 Service Unavailable")
///     .with_retry_after(Duration::from_secs(2));
/// assert!(busy.is_retryable());
/// assert_eq!(busy.retry_after(), Some(Duration::from_secs(2)));
///
/// let bad = SinkError::permanent(format!("400 Bad Request: {}", "missing field"));
/// assert!(!bad.is_retryable());
/// assert_eq!(bad.to_string(), "400 Bad Request: missing field");
/// ```
#[derive(Clone)]
pub struct SinkError {
    /// Boxed: a sink's `Result<(), SinkError>` is then one word, which comes back from the
    /// call in a register; inline, the worker read it back from memory the sink had just
    /// written in parts, at the cost of waiting for every store before it, for every item.
    failure: Box<Failure>,
}

/// What a [`SinkError`] says.
#[derive(Clone)]
struct Failure {
    source: Source,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl SinkError {
    fn new(source: Box<dyn StdError + Send + Sync + 'static>, retryable: bool) -> Self {
        Self {
            failure: Box::new(Failure {
                source: Arc::from(source),
                retryable,
                retry_after: None,
            }),
        }
    }

    /// A failure that may succeed if tried again (a timeout, a 503, a dropped connection).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, DeliveryError, Retry, SinkError};
    /// use std::time::Duration;
    ///
    /// let c: Conveyor<u32> = Conveyor::builder()
    ///     .retry(Retry::fixed(Duration::from_millis(1)).max_attempts(2))
    ///     .build(|_d| Err(SinkError::retryable("connection reset")))?;
    /// match c.send(1).unwrap().wait() {
    ///     Err(DeliveryError::Failed { attempts, .. }) => assert_eq!(attempts, 2),
    ///     other => panic!("unexpected {other:?}"),
    /// }
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn retryable(error: impl Into<Box<dyn StdError + Send + Sync + 'static>>) -> Self {
        Self::new(error.into(), true)
    }

    /// A failure that will not go away by retrying (a 400, a rejected payload).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, Delivery, DeliveryError, Retry, SinkError};
    /// use std::time::Duration;
    ///
    /// let c: Conveyor<String> = Conveyor::builder()
    ///     .retry(Retry::fixed(Duration::from_millis(1)).max_attempts(3))
    ///     .build(|d: Delivery<String>| {
    ///         if d.item().is_empty() {
    ///             return Err(SinkError::permanent("400 Bad Request: empty body"));
    ///         }
    ///         Ok(())
    ///     })?;
    /// match c.send(String::new()).unwrap().wait() {
    ///     Err(DeliveryError::Failed { attempts, .. }) => assert_eq!(attempts, 1), // not retried
    ///     other => panic!("unexpected {other:?}"),
    /// }
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn permanent(error: impl Into<Box<dyn StdError + Send + Sync + 'static>>) -> Self {
        Self::new(error.into(), false)
    }

    /// Asks the conveyor to wait at least `delay` before the next attempt, for example
    /// the value of an HTTP `Retry-After` header. The conveyor waits for the longer of
    /// this hint and its own backoff, but no longer than [`Retry::MAX_HINT`](crate::Retry::MAX_HINT)
    /// or the policy's `max_delay`, whichever is longer.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::SinkError;
    /// use std::time::Duration;
    ///
    /// // A 429 whose `Retry-After: 2` asks for two seconds' rest.
    /// let busy = SinkError::retryable("429 Too Many Requests")
    ///     .with_retry_after(Duration::from_secs(2));
    /// assert_eq!(busy.retry_after(), Some(Duration::from_secs(2)));
    /// assert!(busy.is_retryable());
    /// ```
    #[must_use]
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.failure.retry_after = Some(delay);
        self
    }

    /// Whether another attempt may succeed.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::{Conveyor, DeliveryError, SinkError};
    ///
    /// let c: Conveyor<u32> = Conveyor::builder()
    ///     .build(|_d| Err(SinkError::retryable("timed out")))?;
    /// match c.send(1).unwrap().wait() {
    ///     // Out of attempts (the default is one), not refused for good.
    ///     Err(DeliveryError::Failed { error, .. }) => assert!(error.is_retryable()),
    ///     other => panic!("unexpected {other:?}"),
    /// }
    /// assert!(!SinkError::permanent("410 Gone").is_retryable());
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn is_retryable(&self) -> bool {
        self.failure.retryable
    }

    /// The delay the sink asked for before the next attempt, if any.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::SinkError;
    /// use std::time::Duration;
    ///
    /// assert_eq!(SinkError::retryable("503").retry_after(), None);
    /// let hinted = SinkError::retryable("503").with_retry_after(Duration::from_secs(30));
    /// assert_eq!(hinted.retry_after(), Some(Duration::from_secs(30)));
    /// ```
    pub fn retry_after(&self) -> Option<Duration> {
        self.failure.retry_after
    }

    /// The error the sink gave, to inspect or downcast: `Display` and
    /// [`source`](StdError::source) pass through to it, so this is the way to reach the error
    /// itself (as with [`std::io::Error::get_ref`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::SinkError;
    ///
    /// #[derive(Debug)]
    /// struct Status(u16);
    /// impl std::fmt::Display for Status {
    ///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    ///         write!(f, "HTTP {}", self.0)
    ///     }
    /// }
    /// impl std::error::Error for Status {}
    ///
    /// let e = SinkError::permanent(Status(410));
    /// assert_eq!(e.get_ref().downcast_ref::<Status>().map(|s| s.0), Some(410));
    /// ```
    pub fn get_ref(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.failure.source
    }

    /// Turns a panic payload into a permanent error: a panicking sink fails its item,
    /// it does not take the worker down.
    pub(crate) fn from_panic(payload: &(dyn std::any::Any + Send)) -> Self {
        Self::permanent(format!("sink panicked: {}", panic_message(payload)))
    }
}

/// The message a panic was raised with, if it has one.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

impl fmt::Debug for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SinkError")
            .field("error", &self.failure.source.to_string())
            .field("retryable", &self.failure.retryable)
            .field("retry_after", &self.failure.retry_after)
            .finish()
    }
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.failure.source, f)
    }
}

impl StdError for SinkError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.failure.source.source()
    }
}

/// Why [`Conveyor::send`](crate::Conveyor::send) (or one of its variants) did not
/// accept an item. The item is handed back: nothing is lost on a refused send.
///
/// # Examples
///
/// ```
/// use conveyor::{Backpressure, Conveyor, SendError};
///
/// let c: Conveyor<u32> = Conveyor::builder()
///     .capacity(1)
///     .backpressure(Backpressure::Reject)
///     .build(|_d| {
///         std::thread::sleep(std::time::Duration::from_millis(50));
///         Ok(())
///     })?;
/// c.close();
/// match c.send(7) {
///     Err(SendError::Closed(item)) => assert_eq!(item, 7),
///     other => panic!("unexpected {other:?}"),
/// }
/// # Ok::<(), conveyor::BuildError>(())
/// ```
#[non_exhaustive]
#[derive(PartialEq, Eq, Clone)]
pub enum SendError<T> {
    /// The queue is at capacity and the call may not wait: the policy is
    /// [`Backpressure::Reject`](crate::Backpressure::Reject), or the call was a `try_send`.
    /// With a journal, also while its writer is that far behind a slow disk (see
    /// [`Durability::Batched`](crate::Durability::Batched)). Try again later, raise the
    /// capacity, or use a waiting `send`.
    Full(T),
    /// The conveyor was closed; it accepts nothing more.
    Closed(T),
    /// The conveyor's journal could not store the item (disk full, file unwritable), or the
    /// items it holds from before this start cannot be read (the item would go ahead of them),
    /// so it was not accepted. Items accepted before stay intact; the journal is tried again,
    /// and sends succeed again once it can be written and read (never after a bug stopped
    /// its writer: [`JournalError::WriterStopped`](crate::JournalError::WriterStopped)).
    /// [`Conveyor::journal_error`](crate::Conveyor::journal_error) tells why.
    Journal(T),
    /// The item's `Serialize` implementation failed, so the journal could never store it (as
    /// JSON: serde_json refuses a map whose keys are not strings, for example): it was not
    /// accepted. Sending it again fails the same way; other items are not affected.
    ///
    /// ```
    /// use conveyor::{Conveyor, SendError};
    /// use std::collections::HashMap;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let c: Conveyor<HashMap<(u32, u32), u32>> = Conveyor::builder()
    ///     .journal(dir.path().join("events.journal"))
    ///     .build(|_d| Ok(()))?;
    /// match c.send(HashMap::from([((1, 2), 3)])) {
    ///     Err(SendError::Encode { reason, .. }) => assert!(reason.contains("key must be a string")),
    ///     other => panic!("unexpected {other:?}"),
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    Encode {
        /// The refused item.
        item: T,
        /// The encoder's error.
        reason: String,
    },
    /// The item, encoded for the journal, is larger than a journal entry may be (SQLite's
    /// length limit, about 1 GB, less room for a dead letter's error text), so it could never
    /// be stored: it was not accepted. Other items are not affected.
    TooLarge {
        /// The refused item.
        item: T,
        /// Its size in the journal, in bytes: the encoded item, and its key (stored twice, as
        /// the key and as the lane).
        size: usize,
        /// The most bytes an entry may take.
        limit: usize,
    },
}

impl<T> SendError<T> {
    /// Gives the refused item back.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    ///
    /// let c: Conveyor<String> = Conveyor::builder().build(|_d| Ok(()))?;
    /// c.close();
    /// let refused = c.send("late".to_owned()).unwrap_err();
    /// assert_eq!(refused.into_inner(), "late"); // to keep, log or send elsewhere
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn into_inner(self) -> T {
        match self {
            SendError::Full(item)
            | SendError::Closed(item)
            | SendError::Journal(item)
            | SendError::Encode { item, .. }
            | SendError::TooLarge { item, .. } => item,
        }
    }

    /// Whether the queue was full (as opposed to the conveyor being closed).
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    /// use std::sync::{mpsc, Mutex};
    ///
    /// let (release, gate) = mpsc::channel::<()>();
    /// let gate = Mutex::new(gate);
    /// let c: Conveyor<u32> = Conveyor::builder().capacity(1).build(move |_d| {
    ///     gate.lock().unwrap().recv().ok(); // stalls until released
    ///     Ok(())
    /// })?;
    /// let refused: Vec<_> = (0..3).filter_map(|i| c.try_send(i).err()).collect();
    /// assert!(!refused.is_empty() && refused.iter().all(|e| e.is_full()));
    /// drop(release);
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn is_full(&self) -> bool {
        matches!(self, SendError::Full(_))
    }

    /// Whether the conveyor was closed.
    ///
    /// # Examples
    ///
    /// ```
    /// use conveyor::Conveyor;
    ///
    /// let c: Conveyor<u32> = Conveyor::builder().build(|_d| Ok(()))?;
    /// c.close();
    /// let refused = c.send(1).unwrap_err();
    /// assert!(refused.is_closed() && !refused.is_full());
    /// # Ok::<(), conveyor::BuildError>(())
    /// ```
    pub fn is_closed(&self) -> bool {
        matches!(self, SendError::Closed(_))
    }
}

impl<T> fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Full(_) => f.write_str("Full(..)"),
            SendError::Closed(_) => f.write_str("Closed(..)"),
            SendError::Journal(_) => f.write_str("Journal(..)"),
            SendError::Encode { reason, .. } => f
                .debug_struct("Encode")
                .field("reason", reason)
                .finish_non_exhaustive(),
            SendError::TooLarge { size, limit, .. } => f
                .debug_struct("TooLarge")
                .field("size", size)
                .field("limit", limit)
                .finish_non_exhaustive(),
        }
    }
}

impl<T> fmt::Display for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Full(_) => f.write_str(
                "the conveyor's queue is full: retry later, raise `capacity`, or use a blocking send",
            ),
            SendError::Closed(_) => {
                f.write_str("the conveyor is closed and accepts no more items")
            }
            SendError::Journal(_) => f.write_str(
                "the conveyor's journal could not store the item, so it was not accepted: \
                 see Conveyor::journal_error() for the cause (e.g. free disk space), then retry",
            ),
            SendError::Encode { reason, .. } => write!(
                f,
                "the item could not be encoded for the journal ({reason}), so it was not \
                 accepted: fix its Serialize implementation, or send it through a conveyor \
                 without a journal"
            ),
            SendError::TooLarge { size, limit, .. } => write!(
                f,
                "the item takes {size} bytes in the journal, more than the {limit} bytes an entry \
                 may take, so it was not accepted: split it into smaller items, or send it \
                 through a conveyor without a journal"
            ),
        }
    }
}

impl<T> StdError for SendError<T> {}

/// How an accepted item ended when it was not delivered, as reported by its
/// [`Receipt`](crate::Receipt).
///
/// # Examples
///
/// ```
/// use conveyor::{Conveyor, DeliveryError, SinkError};
///
/// let c: Conveyor<u32> = Conveyor::builder().build(|_d| Err(SinkError::permanent("410 Gone")))?;
/// let err = c.send(1).unwrap().wait().unwrap_err();
/// assert_eq!(err.to_string(), "delivery failed after 1 attempt(s): 410 Gone");
/// match &err {
///     DeliveryError::Failed { attempts, error } => {
///         assert_eq!((*attempts, error.is_retryable()), (1, false));
///     }
///     DeliveryError::Dropped => eprintln!("dropped: the queue was full"),
///     DeliveryError::Closed | DeliveryError::Unconfirmed => eprintln!("left at shutdown"),
///     _ => eprintln!("{err}"),
/// }
/// # Ok::<(), conveyor::BuildError>(())
/// ```
#[non_exhaustive]
#[derive(Debug, Clone)]
pub enum DeliveryError {
    /// The sink failed on every attempt (or failed permanently); `error` is the last
    /// failure.
    Failed {
        /// How many times the sink was called for this item.
        attempts: u32,
        /// The sink's last error.
        error: SinkError,
    },
    /// The item was dropped by the [`Backpressure`](crate::Backpressure) policy
    /// (`DropNewest` or `DropOldest`) because the queue was full.
    Dropped,
    /// The item was still pending when the conveyor shut down and its drain deadline
    /// passed. It was not delivered by this conveyor.
    Closed,
    /// The conveyor shut down while this item's sink call was still running, and its drain
    /// deadline passed. The call was left to finish on its own, so whether the item arrived
    /// is unknown here; once it ends, [`Conveyor::stats`](crate::Conveyor::stats) count it as
    /// delivered or failed (a failure it would have retried leaves it queued). With a
    /// journal, unless that outcome was committed before the journal closed, the item stays
    /// pending and the next start sends it again under the same idempotency key.
    Unconfirmed,
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeliveryError::Failed { attempts, error } => {
                write!(f, "delivery failed after {attempts} attempt(s): {error}")
            }
            DeliveryError::Dropped => {
                f.write_str("dropped by the backpressure policy because the queue was full")
            }
            DeliveryError::Closed => {
                f.write_str("still pending when the conveyor shut down; not delivered")
            }
            DeliveryError::Unconfirmed => f.write_str(
                "its sink call was still running when the conveyor shut down; \
                 whether it arrived is unknown",
            ),
        }
    }
}

impl StdError for DeliveryError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            DeliveryError::Failed { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// A configuration the [`Builder`](crate::Builder) refuses, or a resource it could not
/// set up.
///
/// # Examples
///
/// ```
/// use conveyor::{BuildError, Conveyor, Ordering};
///
/// let err = Conveyor::<u32>::builder()
///     .ordering(Ordering::Pipelined { in_flight: 0 })
///     .build(|_d| Ok(()))
///     .unwrap_err();
/// assert!(matches!(err, BuildError::InvalidConfig(_)));
/// assert!(err.to_string().contains("in_flight >= 1"), "{err}");
/// ```
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A setting is out of range; the message names it and the accepted values.
    #[error("invalid conveyor configuration: {0}")]
    InvalidConfig(String),
    /// A worker thread or async runtime could not be started: the system refused a thread
    /// (a limit on threads or memory). The message says which settings to lower.
    #[error(
        "could not start the conveyor's workers: {0}; a blocking sink has a thread per call in \
         progress: lower Ordering::Pipelined's in_flight or Ordering::Keyed's concurrency, or \
         raise the process's limits on threads and memory"
    )]
    Spawn(#[from] std::io::Error),
    /// The journal could not be opened: in use by another process, damaged, not a journal,
    /// or not writable. The message names the file and what to do.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink's result comes back from every call in a register (see `SinkError::failure`).
    #[test]
    fn a_sink_result_is_one_word() {
        assert_eq!(
            std::mem::size_of::<Result<(), SinkError>>(),
            std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn a_sink_error_keeps_what_it_was_told() {
        let error = SinkError::retryable("503").with_retry_after(Duration::from_secs(3));
        let copy = error.clone();
        assert!(copy.is_retryable());
        assert_eq!(copy.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(copy.to_string(), "503");
        assert!(!SinkError::permanent("400").is_retryable());
    }

    #[test]
    fn a_refused_thread_says_which_settings_to_lower() {
        // What `std::thread::Builder::spawn` returns once the system's thread limit is reached.
        let refused = std::io::Error::from(std::io::ErrorKind::WouldBlock);
        let err = BuildError::Spawn(refused).to_string();
        assert!(
            err.contains("in_flight") && err.contains("concurrency") && err.contains("limits"),
            "{err}"
        );
    }
}
