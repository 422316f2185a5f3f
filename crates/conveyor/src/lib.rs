//! Conveyor: ordered, non-blocking delivery to a slow external service.

#[cfg(feature = "http")]
mod http;
#[cfg(feature = "http")]
pub use crate::http::{HttpBuildError, HttpReply, HttpSink, HttpSinkBuilder};
