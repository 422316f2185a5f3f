//! Snapshots of what a conveyor has done, and what shutdown left behind.

/// A consistent snapshot of a conveyor's counters, taken under its state lock.
///
/// At every snapshot `accepted = delivered + failed + dropped + queued + in_flight`:
/// every accepted item is in exactly one of those states. Non-exhaustive: later versions may
/// count more.
///
/// # Examples
///
/// ```
/// use conveyor::Conveyor;
///
/// let c: Conveyor<u32> = Conveyor::builder().build(|_d| Ok(()))?;
/// for i in 0..10 {
///     c.send(i).unwrap();
/// }
/// c.flush();
/// let s = c.stats();
/// assert_eq!((s.accepted, s.delivered, s.queued, s.in_flight), (10, 10, 0, 0));
/// # Ok::<(), conveyor::BuildError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Items accepted by a send (dropped ones included).
    pub accepted: u64,
    /// Items the sink accepted.
    pub delivered: u64,
    /// Items that failed their last attempt and were skipped.
    pub failed: u64,
    /// Retry attempts made (not items: one item retried twice counts 2).
    pub retried: u64,
    /// Items dropped by a drop [`Backpressure`](crate::Backpressure) policy.
    pub dropped: u64,
    /// Items waiting in a lane, including those held in paused lanes.
    pub queued: u64,
    /// Items handed to the sink and not settled yet (retry waits included).
    pub in_flight: u64,
    /// Lanes paused by [`OnFailure::Pause`](crate::OnFailure::Pause).
    pub paused: u64,
}

/// What [`Conveyor::close_timeout`](crate::Conveyor::close_timeout) left behind.
///
/// # Examples
///
/// ```
/// use conveyor::Conveyor;
/// use std::time::Duration;
///
/// let c: Conveyor<u32> = Conveyor::builder().build(|_d| Ok(()))?;
/// c.send(1).unwrap();
/// let report = c.close_timeout(Duration::from_secs(5));
/// assert!(report.drained);
/// assert_eq!((report.left, report.stats.delivered), (0, 1));
/// # Ok::<(), conveyor::BuildError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CloseReport {
    /// The counters at the end of the close.
    pub stats: Stats,
    /// Items not settled when the close returned (queued, held in a paused lane, or
    /// still in a sink call past the deadline). Their receipts report
    /// [`DeliveryError::Closed`](crate::DeliveryError::Closed), or
    /// [`DeliveryError::Unconfirmed`](crate::DeliveryError::Unconfirmed) for a call still
    /// running.
    pub left: u64,
    /// Whether everything accepted was settled (`left == 0`).
    pub drained: bool,
}
