//! Placeholder: being written.

use std::sync::Arc;

use crate::disk::Disk;
use crate::engine::EngineOptions;
use crate::error::Error;

/// The io_uring engine.
pub struct UringEngine;

impl UringEngine {
    /// Creates the engine.
    pub fn new(_disk: Arc<Disk>, _options: &EngineOptions) -> Result<Box<dyn crate::engine::IoEngine>, Error> {
        Err(Error::InvalidOption("io_uring engine not built yet".into()))
    }
}
