//! Support code of the `conveyor` command that is worth sharing with its tests.
//!
//! The command itself lives in `main.rs`; this library only holds [`server`], the small recording
//! HTTP server behind `conveyor demo`, which the integration tests and the benchmark script drive
//! as well, so the demo's order check and the tests' checks look at the same record.

#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

pub mod server;
