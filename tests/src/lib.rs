//! Shared helpers of the process-level tests and benchmarks.

pub mod fio;
pub mod image;
pub mod latency;
