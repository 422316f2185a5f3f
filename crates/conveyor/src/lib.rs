//! Conveyor: ordered, non-blocking delivery to a slow external service.

mod journal;

pub use crate::journal::{DeadLetter, Journal, JournalError, JournalStatus, LaneStatus};
