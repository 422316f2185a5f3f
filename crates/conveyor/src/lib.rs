//! Conveyor delivers items to a slow, blocking external service strictly in order,
//! without making the code that produces them wait.
//!
//! [`Conveyor::send`] accepts an item and returns at once with a [`Receipt`]; workers
//! the conveyor owns hand items to your *sink* (a blocking function or an async one)
//! in order:
//!
//! - [`Ordering::Strict`]: item n+1 starts only after item n settled (the default);
//! - [`Ordering::Pipelined`]: calls start in order, up to N at once;
//! - [`Ordering::Keyed`]: strict per key, keys in parallel.
//!
//! Failures are retried in place with backoff ([`Retry`]); after the last attempt an
//! item is skipped or pauses its lane ([`OnFailure`]). Every accepted item ends in one
//! visible state: delivered, failed, dropped by an explicit [`Backpressure`] policy,
//! or reported as left at shutdown ([`CloseReport`]). Nothing is lost silently.
//!
//! In async code, await the same steps instead of blocking the runtime's thread:
//! [`Conveyor::send_async`], [`Conveyor::flush_async`], the receipts (they are futures), and
//! [`Conveyor::close_async`] rather than [`Conveyor::close_timeout`]: on a current-thread
//! runtime, a blocking close stops every task there, those the sink needs included, until its
//! deadline.
//!
//! # Example
//!
//! ```
//! use conveyor::{Conveyor, Delivery, Retry, SinkError};
//! use std::time::{Duration, Instant};
//!
//! fn send_to_space(item: &str) -> Result<(), SinkError> {
//!     std::thread::sleep(Duration::from_millis(50)); // the slow network call
//!     if item.is_empty() {
//!         return Err(SinkError::permanent("empty item"));
//!     }
//!     Ok(())
//! }
//!
//! let c: Conveyor<String> = Conveyor::builder()
//!     .retry(Retry::exponential(Duration::from_millis(10)).max_attempts(3))
//!     .build(|d: Delivery<String>| send_to_space(d.item()))?;
//!
//! let started = Instant::now();
//! for item in ["alpha", "beta", "gamma"] {
//!     c.send(item.to_owned()).unwrap(); // returns at once
//! }
//! // A loop that waited for the sink would take 150 ms.
//! assert!(started.elapsed() < Duration::from_millis(50), "the loop did not wait");
//!
//! let report = c.close_timeout(Duration::from_secs(10));
//! assert!(report.drained);
//! assert_eq!(report.stats.delivered, 3);
//! # Ok::<(), conveyor::BuildError>(())
//! ```
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

mod alarm;
mod builder;
mod conveyor;
mod durable;
mod error;
mod fork;
#[cfg(feature = "http")]
mod http;
mod intake;
mod journal;
mod keys;
mod ops;
mod queue;
mod receipt;
mod retry;
mod slab;
mod spin_lock;
mod stats;
mod worker;

#[cfg(feature = "http")]
pub use crate::http::{HttpBuildError, HttpError, HttpReply, HttpSink, HttpSinkBuilder};
pub use crate::{
    builder::{Backpressure, Builder, OnFailure, Ordering},
    conveyor::Conveyor,
    durable::Durability,
    error::{BuildError, DeliveryError, SendError, SinkError},
    journal::{DeadLetter, Holder, Journal, JournalError, JournalStatus, LaneStatus},
    receipt::{Delivery, Receipt},
    retry::Retry,
    stats::{CloseReport, Stats},
};
