//! Placeholder.
/// Request kinds.
#[derive(Debug)]
pub enum RequestKind { Read }
/// A completion.
#[derive(Debug)]
pub struct Completion;
/// A queue.
pub struct DiskQueue;
