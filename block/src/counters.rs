//! Placeholder.
/// Per-disk counters.
#[derive(Debug, Default)]
pub struct DiskCounters;
/// A copy of the counters.
#[derive(Debug, Default)]
pub struct CountersSnapshot;
