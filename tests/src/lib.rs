//! Shared helpers of the process-level tests and benchmarks.
